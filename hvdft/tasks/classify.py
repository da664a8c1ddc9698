"""Text classification: CSV/TSV/JSON-lines reading, one row per text (or pair), exact scoring."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hvdft.config import option
from hvdft.data.files import Shard, Split, file_format, hub_rows, iter_table_rows, require_columns
from hvdft.errors import HvdftError
from hvdft.tasks.base import Task

TEXT_COLUMNS = ("text", "sentence", "content", "review")  # the default text column: the first present
LABEL_COLUMN = "label"
INTEGER = re.compile(r"^[+-]?\d+$")


def label_string(value: Any) -> str | None:
    """A label as the string hvdft keeps: 1, 1.0 and "1" are the same label; None if missing."""
    if value is None or isinstance(value, bool):
        return None if value is None else str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        text = value.strip()
        return text or None
    raise ValueError(type(value).__name__)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(type(value).__name__)
    return str(value)


def escape(text: str) -> str:
    """One TSV field: backslash, tab, newline and carriage return as \\\\, \\t, \\n, \\r."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


@dataclass
class ClassifyOptions:
    text_column: str | None = option(None, f"Column with the text [default: the first of {', '.join(TEXT_COLUMNS)}].")
    text_pair_column: str | None = option(None, "Second text column, for sentence-pair tasks.")
    label_column: str = option(LABEL_COLUMN, "Column with the labels (strings or integers).")


class ClassifyTask(Task):
    """Text classification (sentiment, topic, intent; single texts or pairs).

    Reads CSV/TSV with a header, JSON lines, a folder with train/validation/test files,
    or a Hub dataset. Writes the best model, eval/test reports (accuracy, macro and
    per-class P/R/F1, confusion matrix), test_predictions.tsv and all_results.json.
    """

    name = "classify"
    pipeline = "text-classification"
    metric_names = ("accuracy", "f1_macro")
    default_metric = "accuracy"
    Options = ClassifyOptions
    predictions_suffix = ".tsv"

    # ------------------------------------------------------------------ reading
    def read(self, source: str, split: str, shard: Shard) -> Split:
        total, ids, examples = self._read_table(source, shard, labelled=True)
        return Split(split, source, total, ids, examples)

    def read_unlabelled(self, source: str, shard: Shard) -> Split:
        """A CSV/TSV/JSON-lines file with the text column, or plain text: one text per line."""
        if file_format(source) != "conll":
            return Split("predict", source, *self._read_table(source, shard, labelled=False))
        result = self.read_text_lines(source, shard, lambda text, number: {
            "text": text, "text_pair": None, "label": None, "line": number})
        if result.total == 0:
            raise HvdftError("nothing to predict: the file has no text", source)
        return result

    def _read_table(self, source: str, shard: Shard, labelled: bool) -> tuple[int, list[int], list[dict[str, Any]]]:
        fmt = file_format(source)
        if fmt == "conll":
            raise HvdftError(
                "classification reads .csv, .tsv (with a header row) or .jsonl files", source
            )
        pair_col = self.options.text_pair_column
        label_col = self.options.label_column
        text_col: str | None = self.options.text_column
        total, ids, examples = 0, [], []
        for line, row in iter_table_rows(source, fmt, self.encoding):
            if text_col is None:  # decided on the file's first record: the same on every rank
                hint = " (the first row of a CSV/TSV file must name the columns)" if fmt != "jsonl" else ""
                text_col = self._default_text_column(list(row), source, line, hint)
            if shard.owns(total):
                ids.append(total)
                examples.append(self._example(row, line, source, text_col, pair_col, label_col, labelled))
            total += 1
        if total == 0:
            raise HvdftError("no rows in file" if labelled else "nothing to predict: the file has no rows", source)
        return total, ids, examples

    @staticmethod
    def _default_text_column(columns: list[str], source: Any, line: int | None, hint: str = "") -> str:
        for name in TEXT_COLUMNS:
            if name in columns:
                return name
        raise HvdftError(
            f"no text column: none of {', '.join(TEXT_COLUMNS)} among the columns "
            f"({', '.join(map(str, columns))}); use --text-column{hint}",
            source,
            line,
        )

    @staticmethod
    def _example(
        row: dict[str, Any], line: int | None, source: Any, text_col: str, pair_col: str | None,
        label_col: str, labelled: bool,
    ) -> dict[str, Any]:
        require_columns(list(row), [(text_col, "--text-column"), (pair_col, "--text-pair-column"),
                                    (label_col if labelled else None, "--label-column")], source, line)
        texts = []
        for col in [text_col] + ([pair_col] if pair_col else []):
            try:
                text = _text(row[col])
            except ValueError as exc:
                raise HvdftError(f"column '{col}' holds a {exc}, expected text", source, line) from None
            if text is None or not text.strip():
                raise HvdftError(f"empty text in column '{col}'", source, line)
            texts.append(text)
        label = None
        if labelled:
            try:
                label = label_string(row[label_col])
            except ValueError as exc:
                raise HvdftError(
                    f"column '{label_col}' holds a {exc}: a label must be one string or integer", source, line
                ) from None
            if label is None:
                raise HvdftError(f"missing label in column '{label_col}'", source, line)
        return {"text": texts[0], "text_pair": texts[1] if pair_col else None, "label": label, "line": line}

    def read_hub(self, dataset: Any, split: str, shard: Shard, name: str) -> Split | None:
        columns = list(dataset.column_names)
        source = f"{name}[{split}]"
        text_col = self.options.text_column or self._default_text_column(columns, source, None)
        pair_col = self.options.text_pair_column
        label_col = self.options.label_column
        require_columns(columns, [(text_col, "--text-column"), (pair_col, "--text-pair-column"),
                                  (label_col, "--label-column")], source, None)
        names = getattr(dataset.features[label_col], "names", None)  # a ClassLabel's names
        if names is not None and len(dataset) and all(v is None or v < 0 for v in dataset[label_col]):
            return None  # labels withheld (GLUE's test splits): the engine leaves the split out
        ids, examples = [], []
        for gid, row in hub_rows(dataset, shard):
            value = row[label_col]
            if names is not None and isinstance(value, int):
                value = names[value] if 0 <= value < len(names) else None  # -1: unlabelled (GLUE test)
            where = f"row {gid}"
            try:
                label = label_string(value)
            except ValueError as exc:
                raise HvdftError(f"{where}: column '{label_col}' holds a {exc}", source) from None
            if label is None:
                raise HvdftError(f"{where}: no label (an unlabelled split cannot be scored)", source)
            texts = [row[text_col]] + ([row[pair_col]] if pair_col else [])
            if any(not isinstance(t, str) or not t.strip() for t in texts):
                raise HvdftError(f"{where}: empty text", source)
            ids.append(gid)
            examples.append({"text": texts[0], "text_pair": texts[1] if pair_col else None,
                             "label": label, "line": None})
        return Split(split, source, len(dataset), ids, examples)

    def labels_of_examples(self, examples: list[dict[str, Any]]) -> list[str]:
        return [ex["label"] for ex in examples if ex["label"] is not None]

    def sort_labels(self, labels: set[str]) -> list[str]:
        """Numerically when every label is an integer ("2" < "10"), else alphabetically."""
        if labels and all(INTEGER.match(label) for label in labels):
            return sorted(labels, key=lambda label: (int(label), label))
        return sorted(labels)

    def model_class(self) -> Any:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    # ------------------------------------------------------------------ features
    def featurize(self, batch, tokenizer, label2id, max_length):
        texts = batch["text"]
        pairs = batch.get("text_pair")
        kwargs = {"truncation": True, "max_length": max_length}
        if pairs is not None and any(p is not None for p in pairs):
            enc = tokenizer(texts, [p if p is not None else "" for p in pairs], **kwargs)
        else:
            enc = tokenizer(texts, **kwargs)
        out: dict[str, list] = {
            "input_ids": enc["input_ids"],
            "labels": [label2id.get(label, -100) if label is not None else -100 for label in batch["label"]],
            "example": list(batch["example"]),
            "length": [len(ids) for ids in enc["input_ids"]],
        }
        if "token_type_ids" in enc:
            out["token_type_ids"] = enc["token_type_ids"]
        return out

    # ------------------------------------------------------------------ predictions
    def predictions(self, rows, outputs, batch, model):
        probs = torch.softmax(outputs.logits.float(), dim=-1)
        best, ids = probs.max(dim=-1)
        return list(zip(ids.cpu().tolist(), best.cpu().tolist(), strict=True))

    def merge(self, example, pieces, id2label):
        ((pred, prob),) = pieces  # one row per example
        return (id2label[pred], float(prob))

    def score(self, examples, predictions):
        gold = [ex["label"] for ex in examples]
        pred = [p[0] for p in predictions]
        metrics, per_class, classes, matrix = classification_scores(gold, pred, self.sort_labels)
        return metrics, format_report(metrics, per_class, classes, matrix, len(gold))

    def write_predictions(self, folder, prefix, examples, predictions):
        if prefix in self.predictions_for:
            _write_tsv(folder / f"{prefix}_predictions{self.predictions_suffix}", examples, predictions, with_gold=True)

    def write_unlabelled_predictions(self, path, examples, predictions):
        _write_tsv(path, examples, predictions, with_gold=False)


def _write_tsv(path: Path, examples: list[dict[str, Any]], predictions: list[Any], with_gold: bool) -> None:
    """text [text_pair] [gold] predicted probability, one row per example in input order."""
    pairs = any(ex.get("text_pair") is not None for ex in examples)
    columns = ["text"] + ["text_pair"] * pairs + ["gold"] * with_gold + ["predicted", "probability"]
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\t".join(columns) + "\n")
        for ex, (label, prob) in zip(examples, predictions, strict=True):
            cells = [escape(ex["text"])]
            if pairs:
                cells.append(escape(ex.get("text_pair") or ""))
            if with_gold:
                cells.append(escape(ex["label"]))
            cells += [escape(label), f"{prob:.6f}"]
            f.write("\t".join(cells) + "\n")


# ----------------------------------------------------------------------------- scoring


def classification_scores(
    gold: list[str], pred: list[str], order: Any = sorted
) -> tuple[dict[str, float], dict[str, tuple[float, float, float, int]], list[str], list[list[int]]]:
    """Accuracy, macro P/R/F1, per-class (P, R, F1, support) and the confusion matrix.

    The classes are those in the gold or the predictions (scikit-learn's convention), so a
    gold label the model never saw in training counts as a class it always misses. A
    class with no predictions has precision 0 (and no gold: recall 0).
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    classes = list(order(set(gold) | set(pred)))
    index = {c: i for i, c in enumerate(classes)}
    matrix = [[0] * len(classes) for _ in classes]  # rows: gold, columns: predicted
    for g, p in zip(gold, pred, strict=True):
        matrix[index[g]][index[p]] += 1
    per_class: dict[str, tuple[float, float, float, int]] = {}
    for i, c in enumerate(classes):
        tp = matrix[i][i]
        support = sum(matrix[i])
        predicted = sum(row[i] for row in matrix)
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * tp / (support + predicted) if support + predicted else 0.0
        per_class[c] = (precision, recall, f1, support)
    n = len(classes)
    metrics = {
        "accuracy": sum(matrix[i][i] for i in range(n)) / len(gold) if gold else 0.0,
        "f1_macro": sum(v[2] for v in per_class.values()) / n if n else 0.0,
        "precision_macro": sum(v[0] for v in per_class.values()) / n if n else 0.0,
        "recall_macro": sum(v[1] for v in per_class.values()) / n if n else 0.0,
    }
    return metrics, per_class, classes, matrix


def format_report(
    metrics: dict[str, float], per_class: dict[str, tuple[float, float, float, int]], classes: list[str],
    matrix: list[list[int]], total: int,
) -> str:
    shown = [c.replace("\t", " ").replace("\n", " ") for c in classes]
    width = max([len(c) for c in shown] + [len("macro avg"), 8])
    lines = [f"{'':>{width}}  precision    recall  f1-score   support", ""]
    for c, name in zip(classes, shown, strict=True):
        p, r, f, s = per_class[c]
        lines.append(f"{name:>{width}}  {p:9.4f} {r:9.4f} {f:9.4f} {s:9d}")
    lines.append("")
    lines.append(f"{'accuracy':>{width}}  {'':9} {'':9} {metrics['accuracy']:9.4f} {total:9d}")
    lines.append(
        f"{'macro avg':>{width}}  {metrics['precision_macro']:9.4f} {metrics['recall_macro']:9.4f} "
        f"{metrics['f1_macro']:9.4f} {total:9d}"
    )
    lines += ["", "confusion matrix (rows: gold, columns: predicted)"]
    cell = max([len(c) for c in shown] + [len(str(v)) for row in matrix for v in row] + [1])
    lines.append(f"{'':>{width}}  " + " ".join(f"{c:>{cell}}" for c in shown))
    for name, row in zip(shown, matrix, strict=True):
        lines.append(f"{name:>{width}}  " + " ".join(f"{v:>{cell}}" for v in row))
    return "\n".join(lines) + "\n"
