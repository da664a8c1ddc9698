"""Sequence-to-sequence fine-tuning: translation, summarization and dialogue responses.

Reading (this rank's pairs only), tokenisation with counted truncation, teacher-forced loss
summed over target tokens, evaluation by generation and scoring with the standard scorers:
SacreBLEU (BLEU, chrF) and Google's rouge-score (ROUGE-1/2/L/Lsum).

Inputs (one example = one source -> target pair):

- JSON lines / JSON array / CSV / TSV (with a header row) with two text columns,
  `--source-column` / `--target-column` (default: the first present of SOURCE_COLUMNS /
  TARGET_COLUMNS, e.g. text -> summary, article -> highlights, source -> target);
- `{"translation": {"en": ..., "fr": ...}}` rows (the Hub's translation datasets) with
  `--source-lang` / `--target-lang` naming the keys;
- the Tatoeba / Anki pair format: any other extension (eng-fra.txt), no header, tab-separated,
  `first<TAB>second[<TAB>attribution]`. Its columns are "0", "1" (and "2"); a file named
  `<a>-<b>.txt` (eng-fra.txt) also calls them `<a>` and `<b>`, so `--source-lang fra
  --target-lang eng` (or `--source-column 1 --target-column 0`) translates French -> English.
  The default is column 0 -> column 1;
- multi-turn dialogues: JSON lines whose `dialog` / `turns` / `utterances` / `dialogue` field
  (or `--turns-column`) is a list of turns (strings, or objects with a `text` field, as in
  DailyDialog and many others). Every turn t >= 1 of a dialogue gives one pair: the target is
  turn t and the source is the `--context-turns` N turns before it (0: all earlier turns),
  stripped and joined with `--turn-separator` (default " | "). A source longer than
  `--max-source-length` loses its OLDEST tokens (left truncation: the latest turns matter
  most), counted like any other truncation. For `hvdft predict` a dialogue gives one example:
  the reply to its last N turns;
- Hub dataset rows of any of these shapes.

Sharding: pairs are numbered in file order (a dialogue contributes one per response) and pair
i belongs to rank i % world; other ranks' pairs are counted, never validated.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from hvdft.config import option, validate_fields
from hvdft.data.files import Shard, Split, file_format, iter_table_rows, read_lines
from hvdft.errors import HvdftError
from hvdft.tasks.base import Task
from hvdft.tasks.classify import escape

SOURCE_COLUMNS = ("source", "src", "input", "text", "document", "article", "dialogue", "context", "question")
TARGET_COLUMNS = ("target", "tgt", "output", "summary", "highlights", "abstract", "response", "answer")
TURNS_COLUMNS = ("dialog", "turns", "utterances", "dialogue")  # taken only when the value is a list
SUMMARY_TARGETS = ("summary", "highlights", "abstract", "headline")
METRICS = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum")
DEFAULT_METRIC = {"translation": "bleu", "dialogue": "bleu", "summarization": "rougeL", "text": "bleu"}
# hvdft's generation defaults where neither the command line nor (for predict) the model says.
GENERATION_DEFAULTS = {"num_beams": 4, "length_penalty": 1.0, "no_repeat_ngram_size": 0}
GENERATION_KEYS = ("num_beams", "max_new_tokens", "length_penalty", "no_repeat_ngram_size")
# Settings saved in the model's config (`hvdft_seq2seq`) so `hvdft predict` builds its inputs the
# same way as training did; a value given on the predict command line wins.
STORED_KEYS = ("source_prefix", "turn_separator", "context_turns", "max_source_length", "max_target_length",
               "source_lang", "target_lang", "lowercase_scores", "bleu_tokenize", "rouge_stemmer")
DEFAULT_TARGET_LENGTH = 128
DEFAULT_SEPARATOR = " | "
MULTILINGUAL_TOKENIZERS = ("MBart", "MBart50", "M2M100", "Nllb")  # class-name prefixes (as run_translation.py)
LANG_CODE = re.compile(r"^(__[a-z]{2,3}__|[a-z]{2,3}_[A-Za-z]{2,4})$")  # fr_XX, fra_Latn, __fr__


@dataclass
class Seq2seqOptions:
    """`hvdft train seq2seq` / `hvdft predict` options of this task (None: decided as each help says)."""

    source_column: str | None = option(None, "Column holding the source text [default: the first present of "
                                             + ", ".join(SOURCE_COLUMNS) + "; pair files: 0].")
    target_column: str | None = option(None, "Column holding the target text [default: the first present of "
                                             + ", ".join(TARGET_COLUMNS) + "; pair files: 1].")
    source_lang: str | None = option(None, "Source language: the key in {'translation': {...}} rows, a column "
                                           "of an <a>-<b>.txt pair file, and mBART/NLLB's source language.")
    target_lang: str | None = option(None, "Target language (as --source-lang).")
    source_prefix: str | None = option(None, "Text put before every source, e.g. T5's 'translate French to "
                                             "English: ' [default: none, or what the model was trained with].")
    turns_column: str | None = option(None, "Dialogue files: the column holding the list of turns [default: "
                                            + ", ".join(TURNS_COLUMNS) + " when it holds a list].")
    context_turns: int | None = option(None, "Dialogue files: how many turns before a response make its "
                                             "source, 0 = all earlier turns [default: 0].", at_least=0)
    turn_separator: str | None = option(None, f"Dialogue files: what joins the context turns "
                                              f"[default: {DEFAULT_SEPARATOR!r}].")
    max_source_length: int | None = option(None, "Source tokens kept; longer sources are cut and counted "
                                                 "[default: --max-length, else the model's limit].", at_least=1)
    max_target_length: int | None = option(None, "Target tokens kept, eos included; longer targets are cut and "
                                                 f"counted [default: {DEFAULT_TARGET_LENGTH}].", at_least=1)
    label_smoothing: float = option(0.0, "Label smoothing of the token cross-entropy (as torch's "
                                         "cross_entropy(label_smoothing=...)).", at_least=0, below=1)
    num_beams: int | None = option(None, "Beam size for generation [default: 4].", at_least=1)
    max_new_tokens: int | None = option(None, "Most tokens generated per output [default: --max-target-length].",
                                        at_least=1)
    length_penalty: float | None = option(None, "Beam-search length penalty [default: 1.0].")
    no_repeat_ngram_size: int | None = option(None, "Never repeat an n-gram of this size, 0 = off [default: 0].",
                                              at_least=0)
    lowercase_scores: bool | None = option(None, "Case-insensitive BLEU/chrF [default: on when the tokenizer "
                                                 "lowercases, as uncased MiniLM does].")
    bleu_tokenize: str | None = option(None, "SacreBLEU tokenizer: 13a, intl, zh, ja-mecab, ... [default: 13a].")
    rouge_stemmer: bool | None = option(None, "Porter stemming in ROUGE (rouge-score's use_stemmer) [default: on].")

    def validate(self) -> None:
        """One-line HvdftError for a value out of range, an unknown SacreBLEU tokenizer (or one whose
        extra package is missing), or the same source and target language. The engine calls it
        with the other option checks, before Horovod starts."""
        validate_fields(self)
        if self.bleu_tokenize is not None:
            from sacrebleu.metrics import BLEU
            from sacrebleu.metrics import bleu as bleu_module

            known = list(getattr(bleu_module, "_TOKENIZERS", {}))  # sacrebleu's table of tokenizer names
            if known and self.bleu_tokenize not in known:
                raise HvdftError(f"--bleu-tokenize must be one of {', '.join(known)}, got {self.bleu_tokenize!r}")
            try:  # e.g. ja-mecab needs an extra package
                BLEU(tokenize=self.bleu_tokenize)
            except Exception as exc:  # noqa: BLE001 - any failure here is a setup problem to report in one line
                raise HvdftError(f"--bleu-tokenize {self.bleu_tokenize}: " + " ".join(str(exc).split())) from None
        if self.source_lang and self.source_lang == self.target_lang:
            raise HvdftError(f"--source-lang and --target-lang are both '{self.source_lang}'")


def resolve_settings(options: Seq2seqOptions, stored: dict[str, Any] | None = None) -> dict[str, Any]:
    """The input/scoring settings in force: the option if given, else the model's stored one, else hvdft's."""
    stored = stored or {}
    defaults = {"source_prefix": "", "turn_separator": DEFAULT_SEPARATOR, "context_turns": 0,
                "max_source_length": None, "max_target_length": DEFAULT_TARGET_LENGTH, "source_lang": None,
                "target_lang": None, "lowercase_scores": None, "bleu_tokenize": "13a", "rouge_stemmer": True}
    out = {}
    for key in STORED_KEYS:
        given = getattr(options, key)
        out[key] = given if given is not None else stored.get(key, defaults[key])
    return out


# ============================================================================ reading


@dataclass(frozen=True)
class Layout:
    """Where a file's (or dataset's) pairs are, decided on its first record (the same on every rank)."""

    kind: str  # "columns" | "translation" | "dialogue"
    source: str  # column; language key ("translation"); turns column ("dialogue")
    target: str | None  # column; language key; None for dialogues (the next turn) and unlabelled reading
    use: str  # "translation" | "summarization" | "dialogue" | "text": picks the default metric


@dataclass
class _Where:
    """Where a record came from, for one-line errors: FILE:LINE: or DATASET[split]: row N:."""

    path: str
    line: int | None = None
    row: int | None = None

    def error(self, message: str) -> HvdftError:
        return HvdftError(f"row {self.row}: {message}" if self.row is not None else message, self.path, self.line)


def pair_file_aliases(path: str | Path) -> dict[str, str]:
    """Language names of a Tatoeba/Anki-style `<a>-<b>.txt` file: {'eng': '0', 'fra': '1'}."""
    parts = Path(path).stem.split("-")
    if len(parts) == 2 and all(re.fullmatch(r"[A-Za-z]{2,8}", p) for p in parts) and parts[0] != parts[1]:
        return {parts[0]: "0", parts[1]: "1"}
    return {}


def resolve_layout(
    row: dict[str, Any], options: Seq2seqOptions, where: _Where, labelled: bool = True,
    pair_file: bool = False, aliases: dict[str, str] | None = None,
) -> Layout:
    """Which fields hold the source and target, from the first record and the options.

    Order: --turns-column; explicit --source-column/--target-column; `translation` dict rows
    (need --source-lang/--target-lang); a list-valued dialogue field; the default column names.
    Raises HvdftError naming the available columns when a needed one is absent.
    """
    columns = list(row)
    listed = ", ".join(map(str, columns))
    o = options
    if o.turns_column:
        if o.turns_column not in row:
            raise where.error(f"no column '{o.turns_column}' (columns: {listed}); use --turns-column")
        return Layout("dialogue", o.turns_column, None, "dialogue")
    if pair_file:
        aliases = aliases or {}
        names = {**{c: c for c in columns}, **aliases}

        def pick(column: str | None, lang: str | None, default: str, what: str) -> str:
            if column is not None:
                if column not in names:
                    raise where.error(f"no column '{column}' in a headerless pair file (columns: {listed}); "
                                      f"use --{what}-column")
                return names[column]
            if lang is not None:
                if lang not in aliases:
                    known = f"its languages: {', '.join(aliases)}" if aliases else "name it <a>-<b>.txt"
                    raise where.error(f"--{what}-lang {lang!r} is not a column of this pair file ({known}); "
                                      f"or use --{what}-column 0/1")
                return aliases[lang]
            return default

        src = pick(o.source_column, o.source_lang, "0", "source")
        tgt = pick(o.target_column, o.target_lang, "1" if src != "1" else "0", "target") if labelled else None
        if tgt == src:
            raise where.error(f"source and target are both column {src}")
        return Layout("columns", src, tgt, "translation")
    explicit = o.source_column is not None or o.target_column is not None
    if not explicit and isinstance(row.get("translation"), dict):
        langs = ", ".join(map(str, row["translation"]))
        if not o.source_lang or (labelled and not o.target_lang):
            raise where.error(f"rows hold 'translation' pairs ({langs}): give --source-lang and --target-lang")
        return Layout("translation", o.source_lang, o.target_lang if labelled else None, "translation")
    if not explicit:
        for name in TURNS_COLUMNS:
            if isinstance(row.get(name), list):
                return Layout("dialogue", name, None, "dialogue")

    def choose(given: str | None, candidates: tuple[str, ...], what: str) -> str:
        if given is not None:
            if given not in row:
                raise where.error(f"no column '{given}' (columns: {listed}); use --{what}-column")
            return given
        for name in candidates:
            if name in row:
                return name
        hint = " (the first row of a CSV/TSV file must name the columns)" if where.line == 1 else ""
        raise where.error(f"no {what} column: none of {', '.join(candidates)} among the columns ({listed}); "
                          f"use --{what}-column{hint}")

    src = choose(o.source_column, SOURCE_COLUMNS, "source")
    tgt = choose(o.target_column, tuple(c for c in TARGET_COLUMNS if c != src), "target") if labelled else None
    if tgt is not None and tgt == src:
        raise where.error(f"source and target are both column '{src}'")
    if tgt is not None and tgt.lower() in SUMMARY_TARGETS:
        use = "summarization"
    elif o.source_lang or o.target_lang:
        use = "translation"
    else:
        use = "text"
    return Layout("columns", src, tgt, use)


def _text(value: Any, what: str, column: str, where: _Where) -> str:
    """A non-empty text cell (numbers are read as their text); HvdftError otherwise."""
    if value is None:
        raise where.error(f"empty {what} in column '{column}'")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise where.error(f"column '{column}' holds a {type(value).__name__}, expected {what} text")
    text = str(value)
    if not text.strip():
        raise where.error(f"empty {what} in column '{column}'")
    return text


def pair_example(row: dict[str, Any], layout: Layout, where: _Where) -> dict[str, Any]:
    """One example {source, target, line, left_truncate} from a columns/translation record."""
    if layout.kind == "translation":
        pair = row.get("translation")
        if not isinstance(pair, dict):
            raise where.error("no 'translation' object in this row")
        for lang, option_name in ((layout.source, "--source-lang"), (layout.target, "--target-lang")):
            if lang is not None and lang not in pair:
                raise where.error(f"no '{lang}' in 'translation' (languages: {', '.join(map(str, pair))}); "
                                  f"use {option_name}")
        source = _text(pair[layout.source], "source", f"translation.{layout.source}", where)
        target = (_text(pair[layout.target], "target", f"translation.{layout.target}", where)
                  if layout.target is not None else None)
    else:
        for col, what in ((layout.source, "source"), (layout.target, "target")):
            if col is not None and col not in row:
                raise where.error(f"no column '{col}' (columns: {', '.join(map(str, row))}); use --{what}-column")
        source = _text(row[layout.source], "source", layout.source, where)
        target = _text(row[layout.target], "target", layout.target, where) if layout.target is not None else None
    return {"source": source, "target": target, "line": where.line, "left_truncate": False}


def _turn_text(turn: Any, index: int, column: str, where: _Where) -> str:
    if isinstance(turn, dict):
        key = next((k for k in ("text", "utterance", "content") if k in turn), None)
        if key is None:
            raise where.error(f"turn {index} of '{column}' is an object without a text/utterance/content field")
        turn = turn[key]
    if not isinstance(turn, str):
        raise where.error(f"turn {index} of '{column}' is a {type(turn).__name__}, expected text")
    if not turn.strip():
        raise where.error(f"turn {index} of '{column}' is empty")
    return turn.strip()  # DailyDialog pads turns with spaces: " Hello , how are you ? "


def dialogue_turns(row: dict[str, Any], column: str, where: _Where) -> list[Any]:
    """The raw turn list of a dialogue record (not validated: that happens per owned pair)."""
    if column not in row:
        raise where.error(f"no column '{column}' (columns: {', '.join(map(str, row))}); use --turns-column")
    turns = row[column]
    if not isinstance(turns, list):
        raise where.error(f"column '{column}' holds a {type(turns).__name__}, expected a list of turns")
    return turns


def dialogue_example(turns: list[Any], response: int | None, context_turns: int, separator: str, column: str,
                     where: _Where) -> dict[str, Any]:
    """The pair (context -> turns[response]); response=None: the context is the whole dialogue's end.

    The context is the `context_turns` turns before the response (0: all of them).
    """
    end = len(turns) if response is None else response
    start = max(0, end - context_turns) if context_turns else 0
    context = [_turn_text(turns[i], i, column, where) for i in range(start, end)]
    target = _turn_text(turns[response], response, column, where) if response is not None else None
    return {"source": separator.join(context), "target": target, "line": where.line, "left_truncate": True}


def read_pairs(
    path: str, shard: Shard, options: Seq2seqOptions, encoding: str = "utf-8", labelled: bool = True,
    settings: dict[str, Any] | None = None,
) -> tuple[Split, Layout | None]:
    """This rank's pairs of one local file (see the module docstring for the formats).

    Unlabelled (hvdft predict): targets are not read; a dialogue gives one example (its reply).
    Raises HvdftError (FILE:LINE: cause) for a missing column, a non-text or empty source/target.
    """
    settings = settings or resolve_settings(options)
    fmt = file_format(path)
    pair_file = fmt == "conll"  # any extension other than .csv/.tsv/.json/.jsonl
    rows = iter_table_rows(path, "tsv" if pair_file else fmt, encoding, header=not pair_file)
    aliases = pair_file_aliases(path) if pair_file else {}
    layout: Layout | None = None
    total, ids, examples = 0, [], []
    for line, row in rows:
        where = _Where(str(path), line)
        if layout is None:
            layout = resolve_layout(row, options, where, labelled, pair_file, aliases)
        if layout.kind == "dialogue":
            turns = dialogue_turns(row, layout.source, where)
            responses: list[int | None] = list(range(1, len(turns))) if labelled else [None] * bool(turns)
            for response in responses:
                if shard.owns(total):
                    ids.append(total)
                    examples.append(dialogue_example(turns, response, settings["context_turns"],
                                                     settings["turn_separator"], layout.source, where))
                total += 1
            continue
        if shard.owns(total):
            ids.append(total)
            examples.append(pair_example(row, layout, where))
        total += 1
    if total == 0:
        raise HvdftError("no pairs in file" if labelled else "nothing to predict: the file has no rows", path)
    return Split("train" if labelled else "predict", str(path), total, ids, examples), layout


def read_plain_sources(path: str, shard: Shard, encoding: str = "utf-8") -> Split:
    """hvdft predict on plain text: one source per non-blank line."""
    total, ids, examples = 0, [], []
    for number, line in enumerate(read_lines(path, encoding), 1):
        if not line.strip():
            continue
        if shard.owns(total):
            ids.append(total)
            examples.append({"source": line, "target": None, "line": number, "left_truncate": False})
        total += 1
    if total == 0:
        raise HvdftError("nothing to predict: the file has no text", path)
    return Split("predict", str(path), total, ids, examples)


def read_hub_pairs(
    dataset: Any, shard: Shard, options: Seq2seqOptions, name: str, labelled: bool = True,
    settings: dict[str, Any] | None = None,
) -> tuple[Split | None, Layout | None]:
    """This rank's pairs of one split of a loaded Hugging Face dataset; (None, layout) when every
    target of a labelled split is empty (references withheld), so the engine leaves it out."""
    settings = settings or resolve_settings(options)
    if len(dataset) == 0:
        raise HvdftError("no rows", name)
    layout = resolve_layout(dataset[0], options, _Where(name, None, 0), labelled)
    ids, examples = [], []
    if layout.kind == "dialogue":
        counts = [len(t) if isinstance(t, list) else 0 for t in dataset[layout.source]]
        total = 0
        for index, n in enumerate(counts):
            responses: list[int | None] = list(range(1, n)) if labelled else [None] * bool(n)
            owned = [(total + k, r) for k, r in enumerate(responses) if shard.owns(total + k)]
            total += len(responses)
            if owned:
                where = _Where(name, None, index)
                turns = dialogue_turns(dataset[index], layout.source, where)
                for gid, response in owned:
                    ids.append(gid)
                    examples.append(dialogue_example(turns, response, settings["context_turns"],
                                                     settings["turn_separator"], layout.source, where))
        return Split("train", name, total, ids, examples), layout
    if labelled and layout.kind == "columns":
        targets = dataset[layout.target]
        if all(t is None or (isinstance(t, str) and not t.strip()) for t in targets):
            return None, layout  # e.g. a test split published without references
    owned = range(shard.rank, len(dataset), shard.world)
    for index, row in zip(owned, dataset.select(owned), strict=True):
        ids.append(index)
        examples.append(pair_example(row, layout, _Where(name, None, index)))
    return Split("train", name, len(dataset), ids, examples), layout


# ============================================================================ model


@dataclass
class ModelPlan:
    """How the checkpoint becomes a seq2seq model, and the ids generation and targets need."""

    kind: str  # "seq2seq" (AutoModelForSeq2SeqLM) | "warm-start" (EncoderDecoderModel from an encoder)
    model_type: str
    decoder_start_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    decoder_positions: int | None  # most decoder positions (learned position embeddings), None if unbounded

    def header(self, path: str, tokenizer: Any) -> str:
        def name(token_id: int | None) -> str:
            return f"{tokenizer.convert_ids_to_tokens(token_id)}={token_id}" if token_id is not None else "none"

        ids = (f"decoder start {name(self.decoder_start_token_id)}, eos {name(self.eos_token_id)}, "
               f"pad {name(self.pad_token_id)}")
        if self.kind == "warm-start":
            return (f"model: encoder-decoder warm-started from the encoder-only checkpoint {path} "
                    f"({self.model_type}): encoder = its weights; decoder = the same weights with is_decoder=True "
                    f"and new, randomly initialised cross-attention and LM head transform; {ids}")
        return f"model: {self.model_type} sequence-to-sequence checkpoint {path}; {ids}"


def plan_model(config: Any, tokenizer: Any) -> ModelPlan:
    """Seq2seq checkpoints load as they are; encoder-only ones (BERT-like) are warm-started.

    A warm-started encoder-decoder starts decoding with the tokenizer's [CLS] (else its bos),
    ends with [SEP] (else eos) and pads with its pad token, as in Rothe et al. (2020) and the
    transformers bert2bert recipe. Raises HvdftError for checkpoints that cannot be either.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", "") or ""
    if model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        if model_type == "encoder-decoder":  # a saved EncoderDecoderModel (hvdft's own output)
            positions = getattr(config.decoder, "max_position_embeddings", None)
            pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
            eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.sep_token_id
        else:
            positions = None  # the relative-position / long-context models: the tokenizer limits
            pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
            eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
        start = getattr(config, "decoder_start_token_id", None)
        if start is None:
            start = pad if model_type in ("t5", "mt5", "umt5", "marian", "longt5") else eos
        return ModelPlan("seq2seq", model_type, start, eos, pad, positions)
    if getattr(config, "is_encoder_decoder", False):
        raise HvdftError(f"'{model_type}' is an encoder-decoder that AutoModelForSeq2SeqLM does not load")
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        if start is None or eos is None or pad is None:
            raise HvdftError(f"the '{model_type}' tokenizer lacks a [CLS]/bos, [SEP]/eos or pad token: "
                             "cannot warm-start an encoder-decoder from it")
        return ModelPlan("warm-start", model_type, start, eos, pad,
                         getattr(config, "max_position_embeddings", None))
    raise HvdftError(
        f"'{model_type}' checkpoints cannot be fine-tuned for seq2seq: give an encoder-decoder (T5, BART, "
        "Marian, mBART) or an encoder-only checkpoint that can also act as a decoder (BERT, RoBERTa, ELECTRA, "
        "MiniLM) to warm-start an encoder-decoder from"
    )


def set_language_codes(tokenizer: Any, source_lang: str | None, target_lang: str | None) -> tuple[str | None, ...]:
    """mBART / mBART-50 / M2M100 / NLLB tokenizers: set src_lang/tgt_lang (as run_translation.py).

    'fr' picks the one language code starting with 'fr_' (fr_XX) when it is not itself a code.
    Returns (source code, target code), (None, None) for other tokenizers.
    """
    if not type(tokenizer).__name__.startswith(MULTILINGUAL_TOKENIZERS):
        return None, None
    codes = sorted({t for t in getattr(tokenizer, "all_special_tokens", []) if LANG_CODE.match(str(t))}
                   | set(getattr(tokenizer, "lang_code_to_id", {}) or {}))

    def code(lang: str | None, what: str) -> str:
        if lang is None:
            raise HvdftError(f"{type(tokenizer).__name__} needs --{what}-lang (one of: {', '.join(codes)})")
        if lang in codes:
            return lang
        matches = [c for c in codes if c.startswith(lang + "_") or c == f"__{lang}__"]
        if len(matches) != 1:
            raise HvdftError(f"--{what}-lang {lang!r} is not one of the tokenizer's language codes "
                             f"({', '.join(codes)})")
        return matches[0]

    src, tgt = code(source_lang, "source"), code(target_lang, "target")
    tokenizer.src_lang, tokenizer.tgt_lang = src, tgt
    return src, tgt


def warm_start_model(path: str, plan: ModelPlan, config: Any = None, **load_kwargs: Any) -> Any:
    """EncoderDecoderModel with both halves from one encoder checkpoint; ids set in config and generation.

    `config` (the checkpoint's, as the engine adjusted it: e.g. --no-dropout) is copied for the
    encoder and, with is_decoder and add_cross_attention set, for the decoder; None: the
    checkpoint's own.
    """
    import copy

    from transformers import EncoderDecoderModel

    kwargs = {f"{half}_{k}": v for k, v in load_kwargs.items() for half in ("encoder", "decoder")}
    if config is not None:
        encoder, decoder = copy.deepcopy(config), copy.deepcopy(config)
        encoder.is_decoder, encoder.add_cross_attention = False, False
        decoder.is_decoder, decoder.add_cross_attention = True, True
        kwargs.update(encoder_config=encoder, decoder_config=decoder)
    from transformers.utils import logging as hf_logging

    # transformers' load report lists the cross-attention and LM-head transform as missing and
    # calls the checkpoint "corrupted" for the LM head's tied bias: both are what warm-starting
    # means (the run header says so), and a warning every run would teach users to ignore them.
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(path, path, **kwargs)
    finally:
        hf_logging.set_verbosity(previous)
    model.config.decoder_start_token_id = plan.decoder_start_token_id
    model.config.eos_token_id = plan.eos_token_id
    model.config.pad_token_id = plan.pad_token_id
    model.config.vocab_size = model.config.decoder.vocab_size
    return model


def apply_generation(model: Any, settings: dict[str, Any], plan: ModelPlan | None = None) -> dict[str, Any]:
    """Write generation settings (and the plan's special ids) into `model.generation_config`.

    That object is saved with the model (generation_config.json) and is what `generate()`,
    in-training evaluation, the final test and `hvdft predict` all read: one set of settings.
    max_new_tokens is stored as max_length = max_new_tokens + 1 (an encoder-decoder's output
    starts with the decoder start token, which max_length counts): transformers 4.x pipelines
    replace a model's max_new_tokens by their own default (256) but honour its max_length
    (unless it is 20, generate's global default: --max-new-tokens 19 is the one value they
    would not follow). Returns the effective values of GENERATION_KEYS.
    """
    gc = model.generation_config
    for key, value in settings.items():
        if key == "max_new_tokens" and value is not None:
            gc.max_new_tokens, gc.max_length = None, value + 1
        elif value is not None:
            setattr(gc, key, value)
    if plan is not None:
        for key in ("decoder_start_token_id", "eos_token_id", "pad_token_id"):
            if getattr(gc, key, None) is None and getattr(plan, key) is not None:
                setattr(gc, key, getattr(plan, key))
    return generation_values(gc)


def generation_values(gc: Any) -> dict[str, Any]:
    """num_beams, max_new_tokens, length_penalty, no_repeat_ngram_size of a GenerationConfig
    (max_new_tokens read back from max_length; unset values as generate() takes them)."""
    new = gc.max_new_tokens if gc.max_new_tokens is not None else (gc.max_length or 20) - 1
    return {"num_beams": gc.num_beams or 1, "max_new_tokens": new,
            "length_penalty": gc.length_penalty if gc.length_penalty is not None else 1.0,
            "no_repeat_ngram_size": gc.no_repeat_ngram_size or 0}


def training_generation(options: Seq2seqOptions, max_target_length: int) -> dict[str, Any]:
    """The generation settings of a training run: the options, else hvdft's defaults."""
    values = {k: getattr(options, k) for k in GENERATION_KEYS}
    for key, default in GENERATION_DEFAULTS.items():
        if values[key] is None:
            values[key] = default
    if values["max_new_tokens"] is None:
        values["max_new_tokens"] = max_target_length
    return values


# ============================================================================ features


def encode(
    tokenizer: Any, texts: list[str], max_length: int, target: bool = False, left: list[bool] | None = None,
    drop_first: int | None = None,
) -> tuple[list[list[int]], list[int]]:
    """Token ids of each text, cut to `max_length`, and a 0/1 flag per text: was it cut?

    `target` tokenises with `text_target=` (the tokenizer's target-side special tokens: mBART
    language codes). `left[i]` cuts text i from the left (dialogue contexts keep their latest
    turns); special tokens stay. `drop_first`: a first token equal to it is removed (the
    decoder start token, which the model's shift-right prepends itself: BERT's [CLS] in a
    warm-started encoder-decoder), and does not count towards `max_length`.
    """
    call = (lambda xs, **kw: tokenizer(text_target=xs, **kw)) if target else (lambda xs, **kw: tokenizer(xs, **kw))
    ids = call(texts, verbose=False)["input_ids"]
    # A dropped first token does not count: such rows may hold one token more before the drop.
    budget = [max_length + (drop_first is not None and row[:1] == [drop_first]) for row in ids]
    cut = [int(len(row) > b) for row, b in zip(ids, budget, strict=True)]
    groups: dict[tuple[str, int], list[int]] = {}
    for i in (i for i, c in enumerate(cut) if c):
        groups.setdefault(("left" if left and left[i] else "right", budget[i]), []).append(i)
    for (side, limit), todo in groups.items():
        previous = tokenizer.truncation_side
        tokenizer.truncation_side = side
        try:
            again = call([texts[i] for i in todo], truncation=True, max_length=limit, verbose=False)["input_ids"]
        finally:
            tokenizer.truncation_side = previous
        for i, row in zip(todo, again, strict=True):
            ids[i] = row
    if drop_first is not None:
        ids = [row[1:] if row[:1] == [drop_first] else row for row in ids]
    return ids, cut


def featurize_pairs(
    batch: dict[str, list], tokenizer: Any, max_source_length: int, max_target_length: int, source_prefix: str = "",
    drop_first: int | None = None,
) -> dict[str, list]:
    """Columnar examples -> columnar rows: input_ids, labels (target ids, eos included; [] when
    unlabelled), example, length (source + target tokens, for length grouping), source_truncated,
    target_truncated (0/1: the counts of what was cut, for the run's report)."""
    sources = [source_prefix + s for s in batch["source"]]
    left = [bool(x) for x in batch.get("left_truncate") or [False] * len(sources)]
    input_ids, source_cut = encode(tokenizer, sources, max_source_length, left=left)
    lost = [i for i in range(len(sources)) if left[i] and source_cut[i] and source_prefix]
    if lost:  # a left cut took the prefix with the oldest turns: keep the prefix, cut the context
        prefix_ids = tokenizer(source_prefix, add_special_tokens=False)["input_ids"]
        mask = tokenizer("a", return_special_tokens_mask=True)["special_tokens_mask"]
        lead = mask.index(0)  # special tokens before the text ([CLS]; none for T5)
        kept, _ = encode(tokenizer, [batch["source"][i] for i in lost], max_source_length - len(prefix_ids),
                         left=[True] * len(lost))
        for i, row in zip(lost, kept, strict=True):
            input_ids[i] = row[:lead] + prefix_ids + row[lead:]
    targets = batch.get("target") or [None] * len(sources)
    have = [i for i, t in enumerate(targets) if t is not None]
    labels: list[list[int]] = [[] for _ in sources]
    target_cut = [0] * len(sources)
    if have:
        ids, cut = encode(tokenizer, [targets[i] for i in have], max_target_length, target=True,
                          drop_first=drop_first)
        for i, row, c in zip(have, ids, cut, strict=True):
            labels[i], target_cut[i] = row, c
    return {
        "input_ids": input_ids,
        "labels": labels,
        "example": list(batch["example"]),
        "length": [len(a) + len(b) for a, b in zip(input_ids, labels, strict=True)],
        "source_truncated": source_cut,
        "target_truncated": target_cut,
    }


def truncation_summary(source: str, counts: dict[str, int], max_source_length: int, max_target_length: int) -> str:
    """The warning line for what featurizing cut (`counts`: count_features' keys, summed over ranks)."""
    return (f"{source}: {counts.get('source_truncated', 0)} of {counts.get('sources', 0)} sources cut to "
            f"--max-source-length {max_source_length}, {counts.get('target_truncated', 0)} targets cut to "
            f"--max-target-length {max_target_length}")


# ============================================================================ loss


def decoder_inputs(model: Any, labels: torch.Tensor) -> torch.Tensor:
    """Teacher forcing: the labels shifted right behind the decoder start token, -100 -> pad.

    Uses the model's own `prepare_decoder_input_ids_from_labels` (T5, BART, Marian, mBART's
    language-code wrap, EncoderDecoderModel all define it).
    """
    inner = getattr(model, "module", model)
    prepare = getattr(inner, "prepare_decoder_input_ids_from_labels", None)
    if prepare is not None:
        return prepare(labels=labels)
    start, pad = inner.config.decoder_start_token_id, inner.config.pad_token_id
    shifted = labels.new_full(labels.shape, pad)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start
    return shifted.masked_fill(shifted == -100, pad)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy SUMMED over target tokens (labels -100 ignored), in float32.

    With label smoothing e each token costs (1-e) * -log p(y) + e * mean_k(-log p(k)), exactly
    torch.nn.functional.cross_entropy(label_smoothing=e, reduction="sum").
    """
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum",
        label_smoothing=label_smoothing,
    )


def seq2seq_loss(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, Any]:
    """Teacher-forced forward: (summed token loss, model outputs). Shapes: [batch, source/target tokens]."""
    outputs = model(input_ids=input_ids, attention_mask=attention_mask,
                    decoder_input_ids=decoder_inputs(model, labels))
    return token_loss_sum(outputs.logits, labels, label_smoothing), outputs


# ============================================================================ generation


def decode_generated(sequences: torch.Tensor, tokenizer: Any, eos_token_id: int | list[int] | None,
                     ) -> list[tuple[str, bool]]:
    """(text, cut) per generated row: the decoder start token (position 0) dropped, the row cut at
    its first eos (what follows is the batch's padding), special tokens skipped; cut = no eos was
    generated (the output stopped at max_new_tokens)."""
    eos = set(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id] if eos_token_id is not None else [])
    out = []
    for row in sequences.tolist():
        content = row[1:]
        stop = next((i for i, t in enumerate(content) if t in eos), None)
        if stop is not None:
            content = content[:stop]
        out.append((tokenizer.decode(content, skip_special_tokens=True), stop is None))
    return out


@torch.no_grad()
def generate(model: Any, tokenizer: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             ) -> list[tuple[str, bool]]:
    """(text, cut) for each row of a (right-padded) batch, with the model's generation_config."""
    inner = getattr(model, "module", model)
    device = next(inner.parameters()).device
    was_training = inner.training
    inner.eval()
    try:
        sequences = inner.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    finally:
        inner.train(was_training)
    return decode_generated(sequences.cpu(), tokenizer, inner.generation_config.eos_token_id)


# ============================================================================ scoring


def corpus_scores(hypotheses: list[str], references: list[str], lowercase: bool = False, bleu_tokenize: str = "13a",
                  rouge_stemmer: bool = True) -> tuple[dict[str, float], str]:
    """BLEU and chrF (SacreBLEU, corpus level, one reference each) and ROUGE-1/2/L/Lsum F-measures
    (rouge-score: the mean over examples of its per-example scores, x100), with a report that
    states each scorer's settings.

    rouge-score's tokenizer keeps [a-z0-9] only (lowercased): ROUGE is for English text. rougeLsum
    splits summaries into sentences at newlines (no NLTK sentence splitting).
    """
    import logging

    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU, CHRF

    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs "Using default tokenizer." at INFO

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    bleu = BLEU(lowercase=lowercase, tokenize=bleu_tokenize)
    chrf = CHRF(lowercase=lowercase)
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    kinds = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(kinds, use_stemmer=rouge_stemmer)
    sums = dict.fromkeys(kinds, 0.0)
    for ref, hyp in zip(references, hypotheses, strict=True):
        for kind, score in scorer.score(ref, hyp).items():
            sums[kind] += score.fmeasure
    n = max(len(references), 1)
    metrics = {"bleu": b.score, "chrf": c.score, **{k: 100.0 * v / n for k, v in sums.items()}}
    from importlib.metadata import version

    report = "\n".join([
        f"{b}  ({bleu.get_signature()})",
        f"{c}  ({chrf.get_signature()})",
        f"ROUGE F-measure, mean of {len(references)} examples (rouge-score {version('rouge-score')}, "
        f"use_stemmer={rouge_stemmer}, English tokenizer, rougeLsum splits at newlines): "
        + "  ".join(f"{k} {metrics[k]:.2f}" for k in kinds),
    ]) + "\n"
    return metrics, report


# ============================================================================ writers


def write_pairs_tsv(path: Path, examples: list[dict[str, Any]], predictions: list[Any], with_reference: bool) -> None:
    """source [reference] hypothesis, one row per example in input order; cells escaped as classify's escape()."""
    columns = ["source"] + ["reference"] * with_reference + ["hypothesis"]
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\t".join(columns) + "\n")
        for ex, pred in zip(examples, predictions, strict=True):
            cells = [ex["source"]] + [ex["target"] or ""] * with_reference + [_hypothesis(pred)]
            f.write("\t".join(escape(c) for c in cells) + "\n")


def _hypothesis(pred: Any) -> str:
    return pred[0] if isinstance(pred, (tuple, list)) else str(pred)


def unescape(cell: str) -> str:
    """Inverse of classify.escape: \\\\, \\t, \\n, \\r back to the characters."""
    return re.sub(r"\\(.)", lambda m: {"t": "\t", "n": "\n", "r": "\r"}.get(m.group(1), m.group(1)), cell)


# ============================================================================ the task


class Seq2seqTask(Task):
    """Sequence-to-sequence fine-tuning: translation, summarization, dialogue responses.

    AutoModelForSeq2SeqLM checkpoints (T5, BART, Marian, mBART, ...), or an encoder-decoder
    warm-started from an encoder-only checkpoint (--model minilm, a BERT folder) for both
    halves. Teacher-forced training; evaluation by generation (--num-beams, --max-new-tokens,
    --length-penalty, --no-repeat-ngram-size: one set of settings, saved with the model, for
    validation, test and hvdft predict), scored with SacreBLEU (BLEU, chrF) and rouge-score
    (ROUGE-1/2/L/Lsum). The best model is chosen by BLEU for translation and dialogue, by
    ROUGE-L for summarization (a summary/highlights/abstract target column), unless --metric.
    """

    name: ClassVar[str] = "seq2seq"
    # transformers 4.x: pipeline("text2text-generation", model=OUTPUT_DIR) loads the output, the
    # warm-started EncoderDecoderModel included. transformers 5 removed that pipeline (and
    # "summarization"/"translation"): AutoModelForSeq2SeqLM + model.generate() load and run it.
    pipeline: ClassVar[str] = "text2text-generation"
    usage_code: ClassVar[str] = (
        "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer\n\n"
        'tok = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")\n'
        'model = AutoModelForSeq2SeqLM.from_pretrained("PATH/TO/THIS/FOLDER")  # + generation_config.json\n'
        'prefix = getattr(model.config, "prefix", None) or ""  # the training --source-prefix, if any\n'
        'batch = tok([prefix + "a source text"], return_tensors="pt", padding=True)\n'
        "print(tok.batch_decode(model.generate(**batch), skip_special_tokens=True))"
    )  # transformers 5 has no text2text-generation pipeline
    metric_names: ClassVar[tuple[str, ...]] = METRICS
    default_metric: str = "bleu"  # decided by the training data's use when it is read (see Layout.use)
    default_metric_text: ClassVar[str] = "bleu; rougeL for summarization"  # --help's [default: ...]
    Options: ClassVar[type] = Seq2seqOptions
    has_labels: ClassVar[bool] = False
    needs_fast_tokenizer: ClassVar[bool] = False  # no word alignment: Marian's SentencePiece tokenizer will do
    model_inputs: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask")
    targets: ClassVar[dict[str, int]] = {"labels": -100}

    def __init__(self, options: Seq2seqOptions | None = None, encoding: str = "utf-8") -> None:
        super().__init__(options, encoding)
        self.options.validate()
        self.settings = resolve_settings(self.options)
        self.use: str | None = None
        self.tokenizer: Any = None
        self.plan: ModelPlan | None = None
        self.max_source_length: int | None = None
        self.lowercase = bool(self.settings["lowercase_scores"])
        self._model_path = "?"

    # ------------------------------------------------------------------ reading
    def _note_use(self, layout: Layout | None, split: str) -> None:
        if layout is not None and split == "train":
            self.use = layout.use
            self.default_metric = DEFAULT_METRIC[layout.use]

    def read(self, source: str, split: str, shard: Shard) -> Split:
        part, layout = read_pairs(source, shard, self.options, self.encoding, True, self.settings)
        part.name = split
        self._note_use(layout, split)
        return part

    def read_hub(self, dataset: Any, split: str, shard: Shard, name: str) -> Split | None:
        part, layout = read_hub_pairs(dataset, shard, self.options, f"{name}[{split}]", True, self.settings)
        if part is not None:
            part.name = split
        self._note_use(layout, split)
        return part

    def read_unlabelled(self, source: str, shard: Shard) -> Split:
        """CSV/TSV/JSON lines (source column, or dialogues), a pair file (lines with a TAB), or plain
        text: one source per line."""
        if file_format(source) == "conll":
            first = next((ln for ln in read_lines(source, self.encoding) if ln.strip()), "")
            if "\t" not in first:
                return read_plain_sources(source, shard, self.encoding)
        part, _ = read_pairs(source, shard, self.options, self.encoding, False, self.settings)
        return part

    # ------------------------------------------------------------------ model
    def model_class(self) -> Any:
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM

    def prepare(self, model_config: Any, tokenizer: Any, max_length: int) -> None:
        """Decide the model plan and the settings in force, before any data is read.

        `model_config`: the checkpoint's (training) or the trained model's (hvdft predict/eval:
        its stored `hvdft_seq2seq` settings are the defaults, options given on the command
        line win; so predict builds dialogue contexts with the trained window). `max_length`:
        the engine's --max-length (else the model's limit), the source limit unless
        --max-source-length. Raises HvdftError for a checkpoint that is neither seq2seq nor
        an encoder to warm-start from, or limits the model cannot hold.
        """
        self.settings = resolve_settings(self.options, getattr(model_config, "hvdft_seq2seq", None))
        self.tokenizer = tokenizer
        set_language_codes(tokenizer, self.settings["source_lang"], self.settings["target_lang"])
        self.plan = plan_model(model_config, tokenizer)
        given = self.settings["max_source_length"]
        if given is not None and given > max_length:
            raise HvdftError(f"--max-source-length {given} is over the model's limit of {max_length} tokens")
        self.max_source_length = given or max_length
        # Teacher forcing feeds [start] + target[:-1]: a target of N tokens takes N positions.
        if self.plan.decoder_positions and self.settings["max_target_length"] > self.plan.decoder_positions:
            raise HvdftError(f"--max-target-length {self.settings['max_target_length']} does not fit the "
                             f"decoder's {self.plan.decoder_positions} positions")
        if self.settings["lowercase_scores"] is None:
            self.settings["lowercase_scores"] = bool(getattr(tokenizer, "do_lower_case", False))
        self.lowercase = self.settings["lowercase_scores"]
        self._model_path = getattr(tokenizer, "name_or_path", "") or "?"

    def cache_key(self) -> str:
        """What the features depend on beyond the options, tokenizer and code: the settings
        resolved in `prepare` (a trained model's stored ones in predict), the source limit and
        the decoder start token dropped from targets."""
        return json.dumps({"settings": self.settings, "max_source_length": self.max_source_length,
                           "drop_first": self._drop_first()}, sort_keys=True)

    def _drop_first(self) -> int | None:
        return self.plan.decoder_start_token_id if self.plan is not None else None

    def _ready(self) -> ModelPlan:
        if self.plan is None:
            raise RuntimeError("Seq2seqTask.prepare(model_config, tokenizer, max_length) must run first")
        return self.plan

    def build_model(self, path: str, config: Any, tokenizer: Any, **load_kwargs: Any) -> Any:
        """The model to train, with its generation settings and input settings written into it.

        A warm-started encoder-decoder gets `config` (the engine's: dropout, hvdft_task) for
        its encoder and, with is_decoder and cross-attention, for its decoder.
        """
        plan = self._ready()
        if plan.kind == "warm-start":
            model = warm_start_model(path, plan, config, **load_kwargs)
        else:
            model = self.model_class().from_pretrained(path, config=config, **load_kwargs)
        model.config.hvdft_task = self.name
        generation = training_generation(self.options, self.settings["max_target_length"])
        # N new tokens are made from inputs of at most [start] + N - 1 tokens: N positions.
        if plan.decoder_positions and generation["max_new_tokens"] > plan.decoder_positions:
            raise HvdftError(f"--max-new-tokens {generation['max_new_tokens']} does not fit the decoder's "
                             f"{plan.decoder_positions} positions")
        src, tgt = set_language_codes(tokenizer, self.settings["source_lang"], self.settings["target_lang"])
        if tgt is not None:  # multilingual decoders are told the target language (run_translation.py)
            lang_id = tokenizer.convert_tokens_to_ids(tgt)
            model.generation_config.forced_bos_token_id = lang_id
            if model.config.decoder_start_token_id is None:
                model.config.decoder_start_token_id = lang_id
        apply_generation(model, generation, plan)
        stored = dict(self.settings)
        stored["max_source_length"] = self.max_source_length
        model.config.hvdft_seq2seq = stored
        if self.settings["source_prefix"]:
            model.config.prefix = self.settings["source_prefix"]  # what transformers 4.x pipelines put before inputs
        return model

    def describe(self, model: Any) -> list[str]:
        """The run header's lines: how the model was assembled, scoring settings, the use and
        default metric (from the training data) and the generation settings in force."""
        lines = []
        if self.plan is not None:
            lines.append(self.plan.header(self._model_path, self.tokenizer))
            if self.plan.model_type in ("t5", "mt5") and not self.settings["source_prefix"]:
                lines.append("note: T5 checkpoints were pretrained with task prefixes; consider --source-prefix")
        case = "case-insensitive" if self.lowercase else "case-sensitive"
        why = " (the tokenizer lowercases)" if self.lowercase and self.options.lowercase_scores is None else ""
        lines.append(f"scores: BLEU/chrF {case}{why}, BLEU tokenizer {self.settings['bleu_tokenize']}; "
                     f"ROUGE use_stemmer={self.settings['rouge_stemmer']}")
        if self.use is not None:
            lines.append(f"data: {self.use}, default metric {self.default_metric} (--metric chooses another)")
        if model is not None:
            lines.append(self.generation_header(model))
        return lines

    def generation_header(self, model: Any) -> str:
        """The generation settings in force (explicit options applied first, as predictions() does)."""
        self.apply_overrides(model)
        values = generation_values(getattr(model, "module", model).generation_config)
        text = " ".join(f"{k}={v}" for k, v in values.items())
        return f"generation: {text} (generation_config.json: evaluation, test and hvdft predict use these)"

    def apply_overrides(self, model: Any) -> None:
        """Generation options given on this command line replace the model's stored ones (hvdft
        predict/eval); in training they are already in the model (build_model): no change."""
        given = {k: getattr(self.options, k) for k in GENERATION_KEYS if getattr(self.options, k) is not None}
        if given:
            apply_generation(getattr(model, "module", model), given)

    # ------------------------------------------------------------------ features
    def featurize(self, batch: dict[str, list], tokenizer: Any, label2id: dict[str, int], max_length: int,
                  ) -> dict[str, list]:
        """See featurize_pairs; the source limit is the one `prepare` decided."""
        self._ready()
        return featurize_pairs(batch, tokenizer, self.max_source_length or max_length,
                               self.settings["max_target_length"], self.settings["source_prefix"],
                               self._drop_first())

    def count_features(self, features: dict[str, list]) -> dict[str, int]:
        """This rank's truncated sources and targets (the engine sums them over the ranks)."""
        return {"sources": len(features.get("input_ids", [])),
                "source_truncated": int(sum(features.get("source_truncated", []))),
                "target_truncated": int(sum(features.get("target_truncated", [])))}

    def describe_counts(self, split: Split, counts: dict[str, int], max_length: int) -> str:
        """One warning line when anything was cut (never silent); nothing otherwise."""
        src, tgt = counts.get("source_truncated", 0), counts.get("target_truncated", 0)
        if not src and not tgt:
            return ""
        return truncation_summary(split.source, counts, self.max_source_length or max_length,
                                  self.settings["max_target_length"])

    # ------------------------------------------------------------------ the step
    def target_count(self, batch: Any) -> int:
        """Target tokens (eos included, padding excluded): the engine sums this over ranks."""
        return int((batch.targets["labels"] != -100).sum())

    def loss(self, model: Any, batch: Any) -> tuple[torch.Tensor, Any]:
        return seq2seq_loss(model, batch.inputs["input_ids"], batch.inputs["attention_mask"],
                            batch.targets["labels"], self.options.label_smoothing)

    def forward(self, model: Any, batch: Any) -> Any:
        """hvdft predict: no teacher-forced pass (there are no targets); `predictions` generates."""
        return None

    # ------------------------------------------------------------------ evaluation
    def predictions(self, rows: list[dict], outputs: Any, batch: Any, model: Any) -> list[tuple[str, bool]]:
        """(text, cut) per row, generated with the model's generation_config (see apply_generation)."""
        if self.tokenizer is None:
            raise RuntimeError("Seq2seqTask.prepare(model_config, tokenizer, max_length) must run first")
        self.apply_overrides(model)
        return generate(model, self.tokenizer, batch.inputs["input_ids"], batch.inputs["attention_mask"])

    def merge(self, example: dict[str, Any], pieces: list[Any], id2label: dict[int, str]) -> tuple[str, bool]:
        ((text, cut),) = pieces  # one row per example
        return text, bool(cut)

    def score(self, examples: list[dict[str, Any]], predictions: list[Any]) -> tuple[dict[str, float], str]:
        hyps = [_hypothesis(p) for p in predictions]
        refs = [ex["target"] for ex in examples]
        metrics, report = corpus_scores(hyps, refs, self.lowercase, self.settings["bleu_tokenize"],
                                        self.settings["rouge_stemmer"])
        cut = sum(1 for p in predictions if isinstance(p, (tuple, list)) and p[1])
        metrics["cut_generations"] = float(cut)
        report += f"generations that stopped at max_new_tokens without eos: {cut} of {len(predictions)}\n"
        return metrics, report

    def write_predictions(self, folder: Path, prefix: str, examples: list[dict[str, Any]], predictions: list[Any],
                          ) -> None:
        """FOLDER/<prefix>_predictions.tsv (prefix in `predictions_for`): source, reference, hypothesis."""
        if prefix in self.predictions_for:
            write_pairs_tsv(Path(folder) / f"{prefix}_predictions.tsv", examples, predictions, with_reference=True)

    def write_unlabelled_predictions(self, path: Path, examples: list[dict[str, Any]], predictions: list[Any],
                                     ) -> None:
        write_pairs_tsv(Path(path), examples, predictions, with_reference=False)
