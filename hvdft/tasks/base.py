"""What a task supplies to the shared training engine, and nothing more.

The engine (`hvdft.train`) owns the loop, the sampler, batching, the Horovod seam, the
optimizer step, evaluation gathering, checkpoints and outputs. A task owns: reading its
files into examples, turning examples into model inputs, the model head, the loss,
decoding and scoring. A new task is one file in this package plus one line in
`hvdft.tasks.TASKS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from hvdft.data.files import Shard, Split, file_format, hub_rows, iter_table_rows, read_lines

if TYPE_CHECKING:
    import torch

    from hvdft.data.prepare import Batch


@dataclass
class NoOptions:
    """A task without options of its own."""


class Task(ABC):
    name: ClassVar[str]  # the CLI sub-command and `hvdft_task` in the model's config.json
    pipeline: ClassVar[str]  # the transformers.pipeline task that loads the output folder
    metric_names: ClassVar[tuple[str, ...]]  # selectable with --metric; higher is better
    default_metric: ClassVar[str]
    Options: ClassVar[type] = NoOptions  # the task's own options (fields made with hvdft.config.option)
    has_labels: ClassVar[bool] = True  # a label set (id2label) learnt from the training data
    model_inputs: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "token_type_ids")
    targets: ClassVar[dict[str, int]] = {"labels": -100}  # target column -> its padding value
    predictions_for: ClassVar[tuple[str, ...]] = ("test",)  # reports whose predictions are written
    default_max_length: ClassVar[int | None] = None  # --max-length default (None: the model's limit)
    default_metric_text: ClassVar[str | None] = None  # --metric's [default: ...] in --help when it depends on the data
    usage_code: ClassVar[str | None] = None  # the model card's "Use" code (None: transformers.pipeline(self.pipeline))
    needs_fast_tokenizer: ClassVar[bool] = True  # word alignment (word_ids, offsets) needs a fast tokenizer

    def __init__(self, options: Any = None, encoding: str = "utf-8") -> None:
        self.options = options if options is not None else self.Options()
        self.encoding = encoding

    # ------------------------------------------------------------------ reading
    @abstractmethod
    def read(self, source: str, split: str, shard: Shard) -> Split:
        """This rank's shard of one local file (the others' examples are counted, not parsed).

        Raises HvdftError with the file and line of the first bad record of the shard.
        """

    def read_hub(self, dataset: Any, split: str, shard: Shard, name: str) -> Split | None:
        """This rank's shard of one split of a loaded Hugging Face dataset; None when the
        whole split has no labels (GLUE's test splits), which the engine then leaves out.

        The default builds each example with `example_from_row`.
        """
        source = f"{name}[{split}]"
        ids, examples = [], []
        for gid, row in hub_rows(dataset, shard):
            example = self.example_from_row(row, source, None, gid)
            if example is not None:
                ids.append(gid)
                examples.append(example)
        return Split(split, source, len(dataset), ids, examples)

    def example_from_row(self, row: dict[str, Any], source: str, line: int | None, index: int) -> dict | None:
        """One example from one record of a table or Hub dataset (None: the record is empty)."""
        raise NotImplementedError(f"task '{self.name}' reads no table records")

    def read_table(self, source: str, split: str, shard: Shard) -> Split:
        """This rank's shard of a JSON-lines/CSV/TSV file, one example per record."""
        fmt = file_format(source)
        total, ids, examples = 0, [], []
        for line, row in iter_table_rows(source, fmt, self.encoding):
            if shard.owns(total):
                example = self.example_from_row(row, source, line, total)
                if example is not None:
                    ids.append(total)
                    examples.append(example)
            total += 1
        return Split(split, source, total, ids, examples)

    @abstractmethod
    def read_unlabelled(self, source: str, shard: Shard) -> Split:
        """This rank's shard of a file to predict (`hvdft predict`; labels, if present, ignored)."""

    def read_text_lines(self, source: str, shard: Shard, make: Any) -> Split:
        """Plain text, one example per non-blank line: `make(line_text, line_number)`."""
        total, ids, examples = 0, [], []
        for number, text in enumerate(read_lines(source, self.encoding), 1):
            if not text.strip():
                continue
            if shard.owns(total):
                ids.append(total)
                examples.append(make(text, number))
            total += 1
        return Split("predict", source, total, ids, examples)

    # ------------------------------------------------------------------ labels
    def labels_of_examples(self, examples: list[dict[str, Any]]) -> list[str]:
        """Every label occurrence in these examples (tasks with `has_labels`)."""
        return []

    def labels(self, split: Split) -> set[str]:
        """The label names used by this rank's examples of a split."""
        return set(self.labels_of_examples(split.examples))

    def sort_labels(self, labels: set[str]) -> list[str]:
        """A deterministic label order: the model's class ids."""
        return sorted(labels)

    def unseen_labels(self, split: Split, label2id: dict[str, int]) -> dict[str, int]:
        """Labels in this split that the model never saw in training, with their counts."""
        counts: dict[str, int] = {}
        for label in self.labels_of_examples(split.examples):
            if label not in label2id:
                counts[label] = counts.get(label, 0) + 1
        return counts

    # ------------------------------------------------------------------ model
    @abstractmethod
    def model_class(self) -> Any:
        """The transformers Auto class of this task's head."""

    def prepare(self, model_config: Any, tokenizer: Any, max_length: int) -> None:
        """Adapt the task to the model before any data is read: e.g. add entity-marker
        tokens to the tokenizer, or decide how a seq2seq model is assembled. Called in
        training, `hvdft eval` and `hvdft predict` alike. Raises HvdftError for a model
        the task cannot use."""
        return None

    def cache_key(self) -> str:
        """What else the features depend on (beyond the options, tokenizer, labels and
        code, which the cache key covers already), e.g. state set by `prepare`."""
        return ""

    def build_model(self, path: str, config: Any, tokenizer: Any, **load_kwargs: Any) -> Any:
        """The model to fine-tune: pretrained weights from `path` with this task's head."""
        return self.model_class().from_pretrained(path, config=config, **load_kwargs)

    def describe(self, model: Any) -> list[str]:
        """Extra lines for the run header (e.g. how the model was assembled)."""
        return []

    # ------------------------------------------------------------------ features
    @abstractmethod
    def featurize(
        self, batch: dict[str, list], tokenizer: Any, label2id: dict[str, int], max_length: int
    ) -> dict[str, list]:
        """Columnar examples -> columnar model inputs.

        One example may become several rows (windows over a long text); every row carries
        `example`, the local index of the example it came from, and `length`, its token
        count (for length grouping). Model inputs and target columns are named as in
        `model_inputs` and `targets`; any other column is kept for `predictions`.
        """

    def describe_missing(self, split: Split, count: int, example: dict[str, Any], max_length: int) -> str:
        """The warning for `count` examples of a split that featurizing left without a row
        (`example` is the first of them). Training leaves them out; evaluation scores them
        through `merge` with no pieces."""
        where = f"line {example['line']}" if example.get("line") else "e.g. the first"
        return (f"{split.source}: {count} of {split.total} examples produced no model input "
                f"at --max-length {max_length} ({where})")

    def count_features(self, features: dict[str, list]) -> dict[str, int]:
        """Counts of this rank's features worth reporting (e.g. truncated sources); the engine
        sums them over the ranks and passes the totals to `describe_counts`. Default: none."""
        return {}

    def describe_counts(self, split: Split, counts: dict[str, int], max_length: int) -> str:
        """The warning for a split's counts summed over all ranks, printed once ('' = nothing to say)."""
        return ""

    def target_count(self, batch: Batch) -> int:
        """Loss terms in this batch: the labels that are not padding (-100)."""
        return int((batch.targets["labels"] != -100).sum())

    def loss(self, model: Any, batch: Batch) -> tuple[torch.Tensor, Any]:
        """Forward pass and the loss SUMMED over the batch's targets, with the model outputs.

        The engine divides the sum by the step's global target count, so N ranks x batch b
        compute what 1 rank x batch N*b computes. Default: cross-entropy of `.logits`
        against `labels` (any shape, -100 ignored), in fp32.
        """
        import torch

        outputs = model(**batch.inputs)
        logits = outputs.logits.float()
        target = batch.targets["labels"]
        loss = torch.nn.functional.cross_entropy(
            logits.view(-1, logits.shape[-1]), target.view(-1), ignore_index=-100, reduction="sum"
        )
        return loss, outputs

    def forward(self, model: Any, batch: Batch) -> Any:
        """The model outputs `predictions` reads when no loss is computed (hvdft predict).
        Default: the forward pass on the inputs; a generating task returns None."""
        return model(**batch.inputs)

    # ------------------------------------------------------------------ evaluation
    @abstractmethod
    def predictions(self, rows: list[dict[str, Any]], outputs: Any, batch: Batch, model: Any) -> list[Any]:
        """Per-row predictions (small, picklable) for one evaluation batch."""

    @abstractmethod
    def merge(self, example: dict[str, Any], pieces: list[Any], id2label: dict[int, str]) -> Any:
        """One example's final prediction from the predictions of its rows."""

    @abstractmethod
    def score(self, examples: list[dict[str, Any]], predictions: list[Any]) -> tuple[dict[str, float], str]:
        """Metrics (unprefixed, e.g. {'f1': ...}) and a printable report."""

    @abstractmethod
    def write_predictions(self, folder: Path, prefix: str, examples: list[dict[str, Any]],
                          predictions: list[Any]) -> None:
        """The predictions file(s) of one report ('eval' or 'test'), in input order."""

    @abstractmethod
    def write_unlabelled_predictions(self, path: Path, examples: list[dict[str, Any]], predictions: list[Any]) -> None:
        """`hvdft predict` output, in input order."""

