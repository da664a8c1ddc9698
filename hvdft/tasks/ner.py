"""Named-entity recognition: CoNLL-style reading, sub-word alignment, seqeval scoring."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvdft.config import option
from hvdft.data.files import Shard, Split, file_format, hub_rows, iter_table_rows, read_lines, require_columns
from hvdft.errors import HvdftError
from hvdft.tasks.base import Task

WHOLE_FILE = Shard()  # one process reads every example
COLUMNS = re.compile(r"[ \t]+")  # not str.split(): U+00A0 or U+3000 can be a word


def parse_conll(
    lines: list[str], path: str | Path, shard: Shard = WHOLE_FILE
) -> tuple[int, list[int], list[dict[str, Any]]]:
    """(total sentences, owned global ids, owned examples) of a CoNLL file.

    The word is the first column and the tag the last; blank or whitespace-only lines end
    a sentence; `-DOCSTART-` lines mark documents. Only this rank's sentences are parsed
    and validated: the others are counted. The tag scheme is decided from the tag column
    of the whole file (every rank decides alike); a file that starts with ESCAPE_MARKER
    holds escaped words and tags (hvdft's own predictions files).
    """
    escaped = is_escaped(lines)
    total, ids, examples = 0, [], []
    start: int | None = None  # 0-based line index where the current sentence began
    end = 0

    def flush() -> None:
        nonlocal total, start
        if start is None:
            return
        if shard.owns(total):
            ids.append(total)
            examples.append(_parse_sentence(lines, start, end, path, escaped))
        total += 1
        start = None

    for i, line in enumerate(lines):
        if not line.strip(" \t\r\f\v"):
            flush()
        elif line.lstrip(" \t").startswith("-DOCSTART-"):
            flush()
        else:
            if start is None:
                start = i
            end = i + 1
    flush()
    apply_scheme(examples, detect_scheme(conll_tag_sentences(lines, escaped), path))
    return total, ids, examples


def _parse_sentence(lines: list[str], start: int, end: int, path: str | Path, escaped: bool = False) -> dict[str, Any]:
    words, tags = [], []
    for i in range(start, end):
        cols = COLUMNS.split(lines[i].strip(" \t\r"))
        if len(cols) < 2:
            raise HvdftError(
                f"expected 'word ... tag' (2 or more columns), found 1 column: {lines[i]!r}",
                path,
                i + 1,
            )
        word, tag = cols[0], cols[-1]
        if escaped:
            word, tag = unescape_field(word, path, i + 1), unescape_field(tag, path, i + 1)
        check_tag(tag, path, i + 1)
        words.append(word)
        tags.append(tag)
    return {"words": words, "tags": to_iob2(tags), "given": tags, "line": start + 1}


def _as_list(value: Any, path: str | Path, line: int, column: str) -> list:
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                raise HvdftError(f"column '{column}' is not a valid JSON list", path, line) from None
            if isinstance(parsed, list):
                return parsed
        return text.split()
    raise HvdftError(f"column '{column}' must be a list or a space-separated string", path, line)


@dataclass
class NerOptions:
    text_column: str = option("tokens", "Column with the words in JSON/CSV data (a list, a JSON list or a "
                              "space-separated string).")
    label_column: str = option("ner_tags", "Column with the tags in JSON/CSV data.")
    label_all_tokens: bool = option(False, "Label every sub-word (B-X continues as I-X), not only the first.",
                                    must_match=True)


class NerTask(Task):
    """Token classification (NER) on CoNLL, JSON-lines or CSV data.

    Every word is predicted and scored, also in sentences longer than --max-length
    (they are split into windows). Writes the best model, eval/test reports
    (seqeval, entity level), test_predictions.conll and all_results.json.
    """

    name = "ner"
    pipeline = "token-classification"
    metric_names = ("f1",)
    default_metric = "f1"
    Options = NerOptions
    predictions_suffix = ".conll"

    # ------------------------------------------------------------------ reading
    def read(self, source: str, split: str, shard: Shard) -> Split:
        if file_format(source) == "conll":
            total, ids, examples = parse_conll(read_lines(source, self.encoding), source, shard)
            result = Split(split, source, total, ids, examples)
        else:
            result = self.read_table(source, split, shard)
            # The scheme is decided on the whole file's tags, identically on every rank.
            sentences = table_tag_sentences(source, file_format(source), self.encoding, self.options.label_column)
            apply_scheme(result.examples, detect_scheme(sentences, source))
        if result.total == 0:
            raise HvdftError("no sentences in file", source)
        return result

    def example_from_row(self, row: dict[str, Any], source: str, line: int | None, index: int) -> dict | None:
        text_col, label_col = self.options.text_column, self.options.label_column
        require_columns(list(row), [(text_col, "--text-column"), (label_col, "--label-column")], source, line)
        words = [str(w) for w in _as_list(row[text_col], source, line, text_col)]
        tags = _as_list(row[label_col], source, line, label_col)
        if any(not isinstance(t, str) for t in tags):
            raise HvdftError(
                f"column '{label_col}' holds integer tags but a local file has no "
                "label names: write the tag strings (B-PER, O, ...)",
                source,
                line,
            )
        if len(words) != len(tags):
            raise HvdftError(f"{len(words)} tokens but {len(tags)} tags", source, line)
        for t in tags:
            check_tag(t, source, line)
        return {"words": words, "tags": to_iob2(tags), "given": tags, "line": line} if words else None

    def read_unlabelled(self, source: str, shard: Shard) -> Split:
        """A CoNLL file (tags ignored) or plain text, one whitespace-tokenized sentence per line."""
        if file_format(source) != "conll":
            result = self.read_table(source, "predict", shard)
        elif _looks_like_conll(lines := read_lines(source, self.encoding)):
            result = Split("predict", source, *parse_conll(lines, source, shard))
        else:
            result = self.read_text_lines(source, shard, lambda text, number: {
                "words": text.split(), "tags": ["O"] * len(text.split()), "line": number})
        if result.total == 0:
            raise HvdftError("nothing to predict: the file has no sentences", source)
        return result

    def write_unlabelled_predictions(self, path, examples, predictions):
        write_columns(path, [list(zip(ex["words"], pred, strict=True))
                             for ex, pred in zip(examples, predictions, strict=True)])

    def read_hub(self, dataset: Any, split: str, shard: Shard, name: str) -> Split:
        text_col, label_col = self.options.text_column, self.options.label_column
        require_columns(list(dataset.column_names), [(text_col, "--text-column"), (label_col, "--label-column")],
                        f"{name}[{split}]", None)
        feature = dataset.features[label_col]
        names = getattr(getattr(feature, "feature", None), "names", None)
        ids, examples = [], []
        for gid, row in hub_rows(dataset, shard):
            tags = [names[t] if names and isinstance(t, int) else str(t) for t in row[label_col]]
            for t in tags:
                check_tag(t, name, None)
            ids.append(gid)
            examples.append({"words": list(row[text_col]), "tags": to_iob2(tags), "given": tags, "line": None})
        all_tags = ([(None, names[t] if names and isinstance(t, int) else str(t)) for t in row]
                    for row in dataset[label_col])
        apply_scheme(examples, detect_scheme(all_tags, name))
        return Split(split, name, len(dataset), ids, examples)

    def labels_of_examples(self, examples: list[dict[str, Any]]) -> list[str]:
        return [t for ex in examples for t in ex["tags"]]

    def sort_labels(self, labels: set[str]) -> list[str]:
        # "O" first, then by entity type and B before I: readable id2label in the config.
        order = {"B": 0, "I": 1, "E": 2, "S": 3, "L": 4, "U": 5}
        rest = sorted((t for t in labels if t != "O"), key=lambda t: (t[2:], order.get(t[0], 9)))
        return ["O"] + rest

    def model_class(self) -> Any:
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification

    # ------------------------------------------------------------------ features
    def featurize(self, batch, tokenizer, label2id, max_length):
        """Sub-word alignment with windows: every word gets a first sub-word in some row.

        Words the tokenizer reduces to nothing (U+FE0F, control characters) are fed as
        the unknown token so they still get a prediction. Sentences longer than
        `max_length` are cut into consecutive windows at word boundaries.
        """
        label_all = self.options.label_all_tokens
        prefix, suffix = special_frame(tokenizer)
        budget = max_length - len(prefix) - len(suffix)
        out: dict[str, list] = {"input_ids": [], "labels": [], "word_index": [], "example": [], "length": []}
        words_batch = batch["words"]
        # verbose=False: whole sentences are tokenized here and windowed below, so
        # transformers' "sequence length is longer than the specified maximum ... will
        # result in indexing errors" would be false (it is the only warning this call has).
        enc = tokenizer(words_batch, is_split_into_words=True, add_special_tokens=False, verbose=False)
        for b, words in enumerate(words_batch):
            ids, word_ids = enc["input_ids"][b], enc.word_ids(b)
            present = set(word_ids)
            if len(present) < len(words):
                patched = [w if i in present else tokenizer.unk_token for i, w in enumerate(words)]
                one = tokenizer([patched], is_split_into_words=True, add_special_tokens=False, verbose=False)
                ids, word_ids = one["input_ids"][0], one.word_ids(0)
            pieces: list[list[int]] = [[] for _ in words]
            for tok, w in zip(ids, word_ids, strict=True):
                pieces[w].append(tok)
            tags = batch["tags"][b]
            for start, stop in _windows([len(p) for p in pieces], budget):
                tok_ids, labels, word_index = [], [], []
                for w in range(start, stop):
                    piece = pieces[w][: budget] if stop - start == 1 else pieces[w]
                    tag = tags[w]
                    first = label2id.get(tag, -100)
                    rest = -100
                    if label_all and tag != "O" and first != -100:
                        rest = label2id.get("I-" + tag[2:], first) if tag.startswith("B-") else first
                    tok_ids.extend(piece)
                    labels.extend([first] + [rest] * (len(piece) - 1))
                    word_index.extend([w] + [-1] * (len(piece) - 1))
                full = prefix + tok_ids + suffix
                lab = [-100] * len(prefix) + labels + [-100] * len(suffix)
                wix = [-1] * len(prefix) + word_index + [-1] * len(suffix)
                out["input_ids"].append(full)
                out["labels"].append(lab)
                out["word_index"].append(wix)
                out["example"].append(batch["example"][b])
                out["length"].append(len(full))
        return out

    # ------------------------------------------------------------------ predictions
    def predictions(self, rows, outputs, batch, model):
        best = outputs.logits.argmax(-1).cpu().tolist()
        result = []
        for row, pred in zip(rows, best, strict=True):
            result.append([(w, p) for w, p in zip(row["word_index"], pred, strict=False) if w >= 0])
        return result

    def merge(self, example, pieces, id2label):
        tags = ["O"] * len(example["words"])
        for piece in pieces:
            for w, p in piece:
                tags[w] = id2label[p]
        # The model's labels are IOB2 (or an older model's IOBES): the prediction is
        # returned in the example's own scheme, as it is written and scored.
        return TagScheme.of(example).encode(tags)

    def score(self, examples, predictions):
        """seqeval in strict mode with the scheme of the examples' file (see score_tags)."""
        schemes = {TagScheme.of(ex) for ex in examples}
        # One file, one scheme; should a split ever mix files, entities are scored in IOB2.
        scheme = schemes.pop() if len(schemes) == 1 else TagScheme()
        gold = [scheme.encode(ex["tags"], bare=False) for ex in examples]
        pred = [scheme.encode(p, bare=False) for p in predictions]
        return score_tags(gold, pred, scheme)

    def write_predictions(self, folder, prefix, examples, predictions):
        if prefix in self.predictions_for:
            write_columns(folder / f"{prefix}_predictions{self.predictions_suffix}",
                          [list(zip(ex["words"], ex.get("given", ex["tags"]), pred, strict=True))
                           for ex, pred in zip(examples, predictions, strict=True)])


def special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens a tokenizer puts before and after one sequence ([CLS] / [SEP])."""
    enc = tokenizer([["a"]], is_split_into_words=True, add_special_tokens=True)
    ids, word_ids = enc["input_ids"][0], enc.word_ids(0)
    first = word_ids.index(0)
    last = len(word_ids) - 1 - word_ids[::-1].index(0)
    return ids[:first], ids[last + 1 :]


def _looks_like_conll(lines: list[str]) -> bool:
    """Every non-blank line is 'word ... TAG' (else: plain text, a sentence per line)."""
    content = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("-DOCSTART-")]
    return bool(content) and all(
        len(cols := COLUMNS.split(ln.strip(" \t\r"))) >= 2 and parse_tag(cols[-1]) is not None for ln in content
    )


def _windows(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """[start, stop) word ranges whose sub-words fit in `budget` (an oversize word alone)."""
    spans, start, used = [], 0, 0
    for w, n in enumerate(lengths):
        if w > start and used + n > budget:
            spans.append((start, w))
            start, used = w, 0
        used += n
    spans.append((start, len(lengths)))
    return spans


# ---------------------------------------------------------------------------- tag schemes
#
# Every scheme is read into one internal scheme, typed IOB2 (B-X, I-X, O): the model's
# label set, what training sees, and what `transformers.pipeline("token-classification",
# aggregation_strategy=...)` understands (it groups B-/I- labels only: a U-ORG or L-ORG
# label would become an entity group of its own). Predictions are converted back to the
# scheme of the file they belong to, written in it and scored with seqeval in strict mode
# with the matching scheme class. Untyped tags (B, I, O) get the type UNTYPED inside.

SCHEMES = ("IOB1", "IOB2", "IOBES", "BILUO")
UNTYPED = "ENTITY"  # the entity type of untyped tags (B, I, O): label B-ENTITY, report row ENTITY
ACCEPTED_TAGS = (
    "hvdft reads O with B-/I- (IOB1, IOB2), B-/I-/E-/S- (IOBES) or B-/I-/L-/U- (BILUO) tags, "
    "typed (B-PER) or untyped (B)"
)
_TAG = re.compile(r"([BIESLU])(?:-(\S.*))?")  # '.' stops at a newline: such a tag is refused
_STARTS = frozenset("BSU")  # a B-, S- or U- tag always begins an entity
_ENDS = frozenset("ESLU")  # an E-, S-, L- or U- tag always ends one
_SINGLE = {"IOB1": "I", "IOB2": "B", "IOBES": "S", "BILUO": "U"}  # one-token entity
_FIRST = {"IOB1": "I", "IOB2": "B", "IOBES": "B", "BILUO": "B"}
_LAST = {"IOB1": "I", "IOB2": "I", "IOBES": "E", "BILUO": "L"}

Entity = tuple[str | None, int, int]  # (type or None for untyped, first word, last word + 1)


def parse_tag(tag: str) -> tuple[str, str | None] | None:
    """('O', None), (prefix, type) or (prefix, None) for an untyped tag; None if no scheme fits.

    Prefixes: B I E S L U. A type is anything non-empty after the dash that does not
    start with whitespace ('B-PER', 'I-creative-work', 'B-Drug name').
    """
    if tag == "O":
        return "O", None
    m = _TAG.fullmatch(tag)
    if m is None:
        return None
    return m.group(1), m.group(2)


def check_tag(tag: Any, path: str | Path, line: int | None) -> None:
    """Raise the one-line error for a tag that fits no scheme (file and line, schemes accepted)."""
    if not isinstance(tag, str) or parse_tag(tag) is None:
        raise HvdftError(f"tag {tag!r} fits no tag scheme: {ACCEPTED_TAGS}", path, line)


def tag_entities(tags: Sequence[str]) -> list[Entity]:
    """Entity spans of a tag sequence in any of the schemes (one decoder for all of them).

    B-, S- and U- begin an entity; I-, E- and L- continue the open entity of their type
    and otherwise begin one (as conlleval and seqeval's default mode read an I-X after O);
    E-, S-, L- and U- end it. So valid IOB1, IOB2, IOBES and BILUO decode as their schemes
    define them, and ill-formed sequences (a model's output, an annotation slip) decode to
    what conlleval would count. A tag that fits no scheme counts as O.
    """
    entities: list[Entity] = []
    open_type: str | None = None
    start = -1  # -1: no entity is open
    for i, tag in enumerate(tags):
        parsed = parse_tag(tag)
        prefix, kind = parsed if parsed else ("O", None)
        if start >= 0 and (prefix == "O" or prefix in _STARTS or kind != open_type):
            entities.append((open_type, start, i))
            start = -1
        if prefix == "O":
            continue
        if start < 0:
            start, open_type = i, kind
        if prefix in _ENDS:
            entities.append((kind, start, i + 1))
            start = -1
    if start >= 0:
        entities.append((open_type, start, len(tags)))
    return entities


def entity_tags(entities: Iterable[Entity], length: int, scheme: str) -> list[str]:
    """The tags of `length` words holding these (non-overlapping, sorted) entities in `scheme`.

    A None type writes untyped tags (B, I, ...). IOB1 uses B- only for an entity that
    directly follows one of the same type, as its definition says.
    """
    tags = ["O"] * length
    previous: Entity | None = None
    for kind, start, stop in entities:
        dash = "" if kind is None else f"-{kind}"
        if stop - start == 1:
            first = _SINGLE[scheme]
        else:
            first = _FIRST[scheme]
            for i in range(start + 1, stop - 1):
                tags[i] = "I" + dash
            tags[stop - 1] = _LAST[scheme] + dash
        if scheme == "IOB1" and previous is not None and previous[2] == start and previous[0] == kind:
            first = "B"
        tags[start] = first + dash
        previous = (kind, start, stop)
    return tags


def to_iob2(tags: Sequence[str]) -> list[str]:
    """Any scheme -> the internal typed IOB2 (untyped entities get the type UNTYPED).

    `["U-ORG", "B-LOC", "L-LOC"]` -> `["B-ORG", "B-LOC", "I-LOC"]`;
    `["I-PER", "B-PER"]` (IOB1) -> `["B-PER", "B-PER"]`; `["B", "I", "O"]` -> `["B-ENTITY", "I-ENTITY", "O"]`.
    """
    return entity_tags(((k or UNTYPED, s, e) for k, s, e in tag_entities(tags)), len(tags), "IOB2")


@dataclass(frozen=True)
class TagScheme:
    """The tag scheme of one file: its name (SCHEMES) and whether its tags are untyped."""

    name: str = "IOB2"
    untyped: bool = False

    @property
    def key(self) -> str:
        """How examples carry it (a string: examples pass through `datasets` columns)."""
        return self.name + ("/untyped" if self.untyped else "")

    @classmethod
    def from_key(cls, key: str) -> TagScheme:
        name, _, rest = key.partition("/")
        return cls(name, rest == "untyped")

    @classmethod
    def of(cls, example: dict[str, Any]) -> TagScheme:
        """The scheme an example was read in (IOB2 for examples without one: plain text)."""
        key = example.get("scheme")
        return cls.from_key(key) if key else cls()

    def encode(self, tags: Sequence[str], bare: bool = True) -> list[str]:
        """Tags in any scheme (internal IOB2, a model's labels) -> this scheme.

        With `bare` an untyped scheme writes the UNTYPED type as bare tags (B, L, ...), as the
        file had them; without it the type is kept (seqeval reports it by that name).
        """
        entities = tag_entities(tags)
        if self.untyped and bare:
            entities = [(None if k == UNTYPED else k, s, e) for k, s, e in entities]
        elif not bare:
            entities = [(k or UNTYPED, s, e) for k, s, e in entities]
        return entity_tags(entities, len(tags), self.name)

    def seqeval_scheme(self) -> type:
        """seqeval's class for this scheme (seqeval spells BILUO 'BILOU')."""
        from seqeval import scheme

        return {"IOB1": scheme.IOB1, "IOB2": scheme.IOB2, "IOBES": scheme.IOBES, "BILUO": scheme.BILOU}[self.name]


def detect_scheme(sentences: Iterable[Iterable[tuple[int | None, str]]], path: str | Path) -> TagScheme:
    """The one tag scheme of a file, from all its sentences' (line, tag) pairs.

    E-/S- tags mean IOBES and L-/U- tags BILUO; both in one file is an error that names the
    two lines. B-/I- only: IOB1 when more entities begin with I- than with B- after O or
    another type (in IOB1 a B- only separates two adjacent entities of one type), else IOB2
    (a stray I- after O in IOB2 data is read as beginning an entity either way). Typed and
    untyped tags in one file is an error. Tags that fit no scheme are skipped here: each
    rank reports those of its own shard with their line.
    """
    seen: dict[str, tuple[int | None, str]] = {}  # evidence -> its first (line, tag)
    i_starts = b_starts = 0

    def clash(a: str, b: str, rule: str) -> None:
        if a not in seen or b not in seen:
            return
        # reported at the later of the two lines (where the file stops making sense)
        (later, first) = (a, b) if (seen[b][0] or 0) <= (seen[a][0] or 0) else (b, a)
        (line, tag), (other_line, other) = seen[later], seen[first]
        where = f"line {other_line}" if other_line is not None else "another sentence"
        raise HvdftError(f"tag '{tag}' is {later}, but {where} has '{other}', which is {first}: {rule}",
                         path, line)

    for sentence in sentences:
        prev: tuple[str, str | None] = ("O", None)
        for line, tag in sentence:
            parsed = parse_tag(tag) if isinstance(tag, str) else None
            if parsed is None:
                continue
            prefix, kind = parsed
            if prefix != "O":
                if prefix in "ES":
                    seen.setdefault("IOBES", (line, tag))
                elif prefix in "LU":
                    seen.setdefault("BILUO", (line, tag))
                seen.setdefault("untyped" if kind is None else "typed", (line, tag))
                continues = prev[0] in "BI" and prev[1] == kind
                if prefix == "I" and not continues:
                    i_starts += 1
                elif prefix == "B" and not continues:
                    b_starts += 1
                clash("IOBES", "BILUO", "one file must use one tag scheme")
                clash("typed", "untyped", "one file must use typed or untyped tags, not both")
            prev = (prefix, kind)
    untyped = "untyped" in seen
    if "IOBES" in seen:
        return TagScheme("IOBES", untyped)
    if "BILUO" in seen:
        return TagScheme("BILUO", untyped)
    return TagScheme("IOB1" if i_starts > b_starts else "IOB2", untyped)


def apply_scheme(examples: list[dict[str, Any]], scheme: TagScheme) -> None:
    """Mark a file's examples with its scheme (their predictions are written and scored in it)."""
    for ex in examples:
        ex["scheme"] = scheme.key


def conll_tag_sentences(lines: list[str], escaped: bool = False) -> Iterator[list[tuple[int, str]]]:
    """(line number, tag) of every sentence of a CoNLL file, without validating anything.

    The same sentence breaks as parse_conll; lines without a tag column are skipped (the
    rank that owns them reports them).
    """
    sentence: list[tuple[int, str]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip(" \t\r\f\v") or line.lstrip(" \t").startswith("-DOCSTART-"):
            if sentence:
                yield sentence
            sentence = []
            continue
        text = line.rstrip(" \t\r")
        cut = max(text.rfind(" "), text.rfind("\t"))
        if cut < 0 or not text[:cut].strip(" \t\r"):
            continue
        tag = text[cut + 1 :]
        if escaped and "\\" in tag:
            try:
                tag = unescape_field(tag, "", number)
            except HvdftError:
                continue
        sentence.append((number, tag))
    if sentence:
        yield sentence


def table_tag_sentences(source: str, fmt: str, encoding: str, label_col: str) -> Iterator[list[tuple[int, str]]]:
    """(line, tag) of every record of a JSON-lines/CSV/TSV file, without validating anything."""
    for line, row in iter_table_rows(source, fmt, encoding):
        try:
            tags = _as_list(row.get(label_col), source, line, label_col)
        except HvdftError:
            continue
        yield [(line, t) for t in tags if isinstance(t, str)]


def score_tags(gold: list[list[str]], pred: list[list[str]], scheme: TagScheme) -> tuple[dict[str, float], str]:
    """seqeval metrics and report of well-formed, typed tags in `scheme` (strict mode).

    Strict mode with the matching scheme class counts an entity only where it is well
    formed in that scheme; default mode is conlleval's and knows B/I/E/S only (it would
    merge two adjacent U-ORG entities and warn that U-/L- tags are not NE tags). Both
    sides are canonical encodings of decoded entities here, so the numbers equal a
    scoring of the same entities in IOB2. `accuracy` is per word, in `scheme`.
    """
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    kwargs = {"zero_division": 0, "mode": "strict", "scheme": scheme.seqeval_scheme()}
    total = sum(len(g) for g in gold)
    right = sum(a == b for g, p in zip(gold, pred, strict=True) for a, b in zip(g, p, strict=True))
    metrics = {
        "precision": float(precision_score(gold, pred, **kwargs)),
        "recall": float(recall_score(gold, pred, **kwargs)),
        "f1": float(f1_score(gold, pred, **kwargs)),
        "f1_macro": float(f1_score(gold, pred, average="macro", **kwargs)),
        "accuracy": right / total if total else 0.0,
        "sentences": float(len(gold)),
    }
    return metrics, classification_report(gold, pred, digits=4, **kwargs)


# ---------------------------------------------------------------------------- escaped words
#
# A predictions file holds one word per line, `word gold predicted` (or `word predicted`),
# space-separated. A word that cannot stand there as-is (empty, whitespace or a control
# character anywhere in it, or the start of a -DOCSTART- marker) makes the whole file
# escaped: its first line is ESCAPE_MARKER (a -DOCSTART- line, so CoNLL readers and
# conlleval skip it) and every field is written with backslash escapes. Files without
# such words stay exactly as before: no marker, backslashes as they are.

ESCAPE_MARKER = "-DOCSTART-hvdft-escaped"
_NAMED = {" ": "s", "\t": "t", "\n": "n", "\r": "r", "\f": "f", "\v": "v", "\\": "\\"}
_UNNAMED = {v: k for k, v in _NAMED.items()}
_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|.?)", re.DOTALL)


def _odd(ch: str) -> bool:
    # Whitespace (Python's str.split() would cut there), controls (NUL, escape codes) and the
    # BOM (read_lines drops it at the start of a file).
    return ch.isspace() or ch == "\ufeff" or unicodedata.category(ch) == "Cc"


def needs_escape(field: str) -> bool:
    """Whether a word (or tag) cannot be written as-is in a column file."""
    return field == "" or field.startswith("-DOCSTART-") or any(_odd(ch) for ch in field)


def escape_field(field: str) -> str:
    """The escaped form: `\\s` space, `\\t` `\\n` `\\r` `\\f` `\\v`, `\\\\` backslash, `\\uXXXX` other
    whitespace/controls and a leading '-' of -DOCSTART-, `\\e` the empty word."""
    if field == "":
        return "\\e"
    out = []
    for i, ch in enumerate(field):
        if ch in _NAMED:
            out.append("\\" + _NAMED[ch])
        elif _odd(ch) or (i == 0 and field.startswith("-DOCSTART-")):
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def unescape_field(text: str, path: str | Path, line: int | None) -> str:
    """The field escape_field wrote; an unknown escape is a one-line error with file and line."""
    if text == "\\e":
        return ""

    def one(m: re.Match) -> str:
        code = m.group(1)
        if code in _UNNAMED:
            return _UNNAMED[code]
        if len(code) == 5:
            return chr(int(code[1:], 16))
        raise HvdftError(f"unknown escape '\\{code}' in {text!r} (the file starts with {ESCAPE_MARKER}: "
                         "see the README for its escapes)", path, line)

    return _ESCAPE.sub(one, text)


def is_escaped(lines: list[str]) -> bool:
    """Whether a column file holds escaped fields (its first line is ESCAPE_MARKER ...)."""
    return bool(lines) and COLUMNS.split(lines[0].strip(" \t\r"))[0] == ESCAPE_MARKER


def write_columns(path: str | Path, sentences: list[list[tuple[str, ...]]]) -> None:
    """One line per word, fields separated by a space, a blank line after each sentence,
    escaped (ESCAPE_MARKER first) only if some field needs it."""
    escaped = any(needs_escape(field) for sentence in sentences for row in sentence for field in row)
    width = len(sentences[0][0]) if sentences and sentences[0] else 2
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        if escaped:
            f.write(" ".join([ESCAPE_MARKER] + ["O"] * (width - 1)) + "\n\n")
        for sentence in sentences:
            for row in sentence:
                f.write(" ".join(escape_field(x) if escaped else x for x in row) + "\n")
            f.write("\n")
