"""Named-entity recognition: CoNLL-style reading, sub-word alignment, seqeval scoring."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvdft.config import option
from hvdft.data.files import Shard, Split, file_format, hub_rows, read_lines, require_columns
from hvdft.errors import HvdftError
from hvdft.tasks.base import Task

WHOLE_FILE = Shard()  # one process reads every example
TAG = re.compile(r"^(O|[BIES]-\S.*)$")
COLUMNS = re.compile(r"[ \t]+")  # not str.split(): U+00A0 or U+3000 can be a word


def parse_conll(
    lines: list[str], path: str | Path, shard: Shard = WHOLE_FILE
) -> tuple[int, list[int], list[dict[str, Any]]]:
    """(total sentences, owned global ids, owned examples) of a CoNLL file.

    The word is the first column and the tag the last; blank or whitespace-only lines end
    a sentence; `-DOCSTART-` lines mark documents. Only this rank's sentences are parsed
    and validated: the others are counted.
    """
    total, ids, examples = 0, [], []
    start: int | None = None  # 0-based line index where the current sentence began
    end = 0

    def flush() -> None:
        nonlocal total, start
        if start is None:
            return
        if shard.owns(total):
            ids.append(total)
            examples.append(_parse_sentence(lines, start, end, path))
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
    return total, ids, examples


def _parse_sentence(lines: list[str], start: int, end: int, path: str | Path) -> dict[str, Any]:
    words, tags = [], []
    for i in range(start, end):
        cols = COLUMNS.split(lines[i].strip(" \t\r"))
        if len(cols) < 2:
            raise HvdftError(
                f"expected 'word ... tag' (2 or more columns), found 1 column: {lines[i]!r}",
                path,
                i + 1,
            )
        tag = cols[-1]
        if not TAG.match(tag):
            raise HvdftError(
                f"tag '{tag}' is neither 'O' nor B-/I-/E-/S- prefixed "
                "(hvdft reads IOB1, IOB2 and IOBES tags)",
                path,
                i + 1,
            )
        words.append(cols[0])
        tags.append(tag)
    return {"words": words, "tags": to_iob2(tags), "line": start + 1}


def to_iob2(tags: list[str]) -> list[str]:
    """IOB1 -> IOB2: an I-X that does not continue an X entity starts one (B-X).

    Valid IOB2 is unchanged, and so is IOBES (E-/S- tags mark it).
    """
    if any(t[:2] in ("E-", "S-") for t in tags):
        return tags
    out = list(tags)
    for i, tag in enumerate(tags):
        if tag.startswith("I-"):
            prev = out[i - 1] if i else "O"
            if prev == "O" or prev[2:] != tag[2:]:
                out[i] = "B-" + tag[2:]
    return out


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
            if not TAG.match(t):
                raise HvdftError(f"tag '{t}' is neither 'O' nor B-/I-/E-/S- prefixed", source, line)
        return {"words": words, "tags": to_iob2(tags), "line": line} if words else None

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
        with open(path, "w", encoding="utf-8") as f:
            for ex, pred in zip(examples, predictions, strict=True):
                f.writelines(f"{word} {p}\n" for word, p in zip(ex["words"], pred, strict=True))
                f.write("\n")

    def read_hub(self, dataset: Any, split: str, shard: Shard, name: str) -> Split:
        text_col, label_col = self.options.text_column, self.options.label_column
        require_columns(list(dataset.column_names), [(text_col, "--text-column"), (label_col, "--label-column")],
                        f"{name}[{split}]", None)
        feature = dataset.features[label_col]
        names = getattr(getattr(feature, "feature", None), "names", None)
        ids, examples = [], []
        for gid, row in hub_rows(dataset, shard):
            tags = [names[t] if names and isinstance(t, int) else str(t) for t in row[label_col]]
            ids.append(gid)
            examples.append({"words": list(row[text_col]), "tags": to_iob2(tags), "line": None})
        return Split(split, name, len(dataset), ids, examples)

    def labels_of_examples(self, examples: list[dict[str, Any]]) -> list[str]:
        return [t for ex in examples for t in ex["tags"]]

    def sort_labels(self, labels: set[str]) -> list[str]:
        # "O" first, then by entity type and B before I: readable id2label in the config.
        order = {"B": 0, "I": 1, "E": 2, "S": 3}
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
        enc = tokenizer(words_batch, is_split_into_words=True, add_special_tokens=False)
        for b, words in enumerate(words_batch):
            ids, word_ids = enc["input_ids"][b], enc.word_ids(b)
            present = set(word_ids)
            if len(present) < len(words):
                patched = [w if i in present else tokenizer.unk_token for i, w in enumerate(words)]
                one = tokenizer([patched], is_split_into_words=True, add_special_tokens=False)
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
        return tags

    def score(self, examples, predictions):
        from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

        gold = [ex["tags"] for ex in examples]
        kwargs = {"zero_division": 0}
        metrics = {
            "precision": precision_score(gold, predictions, **kwargs),
            "recall": recall_score(gold, predictions, **kwargs),
            "f1": f1_score(gold, predictions, **kwargs),
            "f1_macro": f1_score(gold, predictions, average="macro", **kwargs),
            "accuracy": _token_accuracy(gold, predictions),
            "sentences": float(len(gold)),
        }
        report = classification_report(gold, predictions, digits=4, **kwargs)
        return metrics, report

    def write_predictions(self, folder, prefix, examples, predictions):
        if prefix not in self.predictions_for:
            return
        with open(folder / f"{prefix}_predictions{self.predictions_suffix}", "w", encoding="utf-8") as f:
            for ex, pred in zip(examples, predictions, strict=True):
                for word, gold, p in zip(ex["words"], ex["tags"], pred, strict=True):
                    f.write(f"{word} {gold} {p}\n")
                f.write("\n")


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
        len(cols := COLUMNS.split(ln.strip(" \t\r"))) >= 2 and TAG.match(cols[-1]) for ln in content
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


def _token_accuracy(gold: list[list[str]], pred: list[list[str]]) -> float:
    total = sum(len(g) for g in gold)
    right = sum(a == b for g, p in zip(gold, pred, strict=True) for a, b in zip(g, p, strict=True))
    return right / total if total else 0.0
