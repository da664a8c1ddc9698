"""Named-entity recognition: CoNLL-style reading, sub-word alignment, seqeval scoring."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from hvdft.data.files import Split, file_format, iter_table_rows, owns, read_lines
from hvdft.errors import HvdftError
from hvdft.tasks.base import Task

TAG = re.compile(r"^(O|[BIES]-\S.*)$")
COLUMNS = re.compile(r"[ \t]+")  # not str.split(): U+00A0 or U+3000 can be a word


def parse_conll(
    lines: list[str], path: str | Path, rank: int = 0, world: int = 1
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
        if owns(total, rank, world):
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


class NerTask(Task):
    name = "ner"
    pipeline = "token-classification"
    metric_names = ("f1",)
    default_metric = "f1"
    predictions_suffix = ".conll"

    # ------------------------------------------------------------------ reading
    def read(self, source: str, split: str, rank: int, world: int, opts: dict[str, Any]) -> Split:
        fmt = file_format(source)
        if fmt == "conll":
            total, ids, examples = parse_conll(read_lines(source, opts.get("encoding", "utf-8")), source, rank, world)
        else:
            total, ids, examples = self._read_table(source, fmt, rank, world, opts)
        if total == 0:
            raise HvdftError("no sentences in file", source)
        return Split(split, source, total, ids, examples)

    def _read_table(self, source: str, fmt: str, rank: int, world: int, opts: dict[str, Any]):
        text_col = opts.get("text_column") or "tokens"
        label_col = opts.get("label_column") or "ner_tags"
        total, ids, examples = 0, [], []
        for line, row in iter_table_rows(source, fmt, opts.get("encoding", "utf-8")):
            if owns(total, rank, world):
                for col in (text_col, label_col):
                    if col not in row:
                        raise HvdftError(
                            f"no column '{col}' (columns: {', '.join(row)}); "
                            "use --text-column / --label-column",
                            source,
                            line,
                        )
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
                    raise HvdftError(
                        f"{len(words)} tokens but {len(tags)} tags", source, line
                    )
                for t in tags:
                    if not TAG.match(t):
                        raise HvdftError(
                            f"tag '{t}' is neither 'O' nor B-/I-/E-/S- prefixed", source, line
                        )
                if words:
                    ids.append(total)
                    examples.append({"words": words, "tags": to_iob2(tags), "line": line})
            total += 1
        return total, ids, examples

    def read_unlabelled(self, source: str, rank: int, world: int, opts: dict[str, Any]) -> Split:
        """A CoNLL file (tags ignored) or plain text, one whitespace-tokenized sentence per line."""
        lines = read_lines(source, opts.get("encoding", "utf-8"))
        if file_format(source) == "conll" and _looks_like_conll(lines):
            total, ids, examples = parse_conll(lines, source, rank, world)
        elif file_format(source) != "conll":
            total, ids, examples = self._read_table(source, file_format(source), rank, world, opts)
        else:
            total, ids, examples = 0, [], []
            for number, line in enumerate(lines, 1):
                words = line.split()
                if not words:
                    continue
                if owns(total, rank, world):
                    ids.append(total)
                    examples.append({"words": words, "tags": ["O"] * len(words), "line": number})
                total += 1
        if total == 0:
            raise HvdftError("nothing to predict: the file has no sentences", source)
        return Split("predict", source, total, ids, examples)

    def write_unlabelled_predictions(self, path, examples, predictions):
        with open(path, "w", encoding="utf-8") as f:
            for ex, pred in zip(examples, predictions, strict=True):
                f.writelines(f"{word} {p}\n" for word, p in zip(ex["words"], pred, strict=True))
                f.write("\n")

    def read_hub(self, dataset: Any, split: str, rank: int, world: int, opts: dict[str, Any]) -> Split:
        text_col = opts.get("text_column") or "tokens"
        label_col = opts.get("label_column") or "ner_tags"
        feature = dataset.features[label_col]
        names = getattr(getattr(feature, "feature", None), "names", None)
        shard = dataset.shard(num_shards=world, index=rank, contiguous=False)
        examples = []
        for row in shard:
            tags = [names[t] if names and isinstance(t, int) else str(t) for t in row[label_col]]
            examples.append({"words": list(row[text_col]), "tags": to_iob2(tags), "line": None})
        ids = list(range(rank, len(dataset), world))
        return Split(split, opts.get("dataset", "hub"), len(dataset), ids, examples)

    def labels(self, split: Split) -> set[str]:
        return set(self.labels_of_examples(split.examples))

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
    def featurize(self, batch, tokenizer, label2id, opts):
        """Sub-word alignment with windows: every word gets a first sub-word in some row.

        Words the tokenizer reduces to nothing (U+FE0F, control characters) are fed as
        the unknown token so they still get a prediction. Sentences longer than
        `max_length` are cut into consecutive windows at word boundaries.
        """
        max_length = opts["max_length"]
        label_all = opts.get("label_all_tokens", False)
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
    def predictions(self, rows, logits):
        best = logits.argmax(-1).cpu().tolist()
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

    def write_predictions(self, path, examples, predictions):
        with open(path, "w", encoding="utf-8") as f:
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
