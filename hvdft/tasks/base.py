"""What a task supplies to the shared training engine, and nothing more.

The engine (hvdft.train) owns the loop, sampler, Horovod seam, evaluation gathering,
checkpointing and outputs. A task owns: reading its files into examples, turning
examples into model inputs, the model head, and scoring.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from hvdft.data.files import Split


class Task(ABC):
    name: str  # "ner", "classify": the CLI sub-command and the tag in the model config
    pipeline: str  # transformers.pipeline task name that loads the output folder
    metric_names: tuple[str, ...]  # metrics the user may select for early stopping
    default_metric: str
    predictions_suffix: str  # test_predictions<suffix>

    @abstractmethod
    def read(self, source: str, split: str, rank: int, world: int, opts: dict[str, Any]) -> Split:
        """This rank's shard of one local file (never the others': they are not parsed)."""

    @abstractmethod
    def read_hub(self, dataset: Any, split: str, rank: int, world: int, opts: dict[str, Any]) -> Split | None:
        """This rank's shard of one split of a loaded Hugging Face dataset; None when the
        whole split has no labels (GLUE's test splits: -1), which is then left out."""

    @abstractmethod
    def labels(self, split: Split) -> set[str]:
        """Label names used by these examples."""

    @abstractmethod
    def sort_labels(self, labels: set[str]) -> list[str]:
        """A deterministic label order (the model's class ids)."""

    @abstractmethod
    def model_class(self) -> Any:
        """The transformers Auto class for this task's head."""

    @abstractmethod
    def featurize(
        self, batch: dict[str, list], tokenizer: Any, label2id: dict[str, int], opts: dict[str, Any]
    ) -> dict[str, list]:
        """Columnar examples -> columnar model inputs (`input_ids`, `labels`, `example`, ...).

        One example may become several rows (NER windows over long sentences); every row
        carries `example`, the local index of the example it came from.
        """

    @abstractmethod
    def predictions(self, rows: list[dict[str, Any]], logits: torch.Tensor) -> list[Any]:
        """Per-row predictions (picklable, small) from one evaluation batch's logits."""

    @abstractmethod
    def merge(self, example: dict[str, Any], pieces: list[Any], id2label: dict[int, str]) -> Any:
        """One example's final prediction from the predictions of its rows."""

    @abstractmethod
    def score(self, examples: list[dict[str, Any]], predictions: list[Any]) -> tuple[dict[str, float], str]:
        """Metrics (unprefixed, e.g. {'f1': ...}) and a printable report."""

    @abstractmethod
    def write_predictions(self, path: Path, examples: list[dict[str, Any]], predictions: list[Any]) -> None:
        """The predictions file, in input order."""

    @abstractmethod
    def read_unlabelled(self, source: str, rank: int, world: int, opts: dict[str, Any]) -> Split:
        """This rank's shard of a file to predict (labels, if present, are ignored)."""

    @abstractmethod
    def write_unlabelled_predictions(self, path: Path, examples: list[dict[str, Any]], predictions: list[Any]) -> None:
        """`hvdft predict` output, in input order."""

    def unseen_labels(self, split: Split, label2id: dict[str, int]) -> dict[str, int]:
        """Labels in this split the model never saw in training, with their counts."""
        counts: dict[str, int] = {}
        for label in self.labels_of_examples(split.examples):
            if label not in label2id:
                counts[label] = counts.get(label, 0) + 1
        return counts

    def labels_of_examples(self, examples: list[dict[str, Any]]) -> list[str]:
        raise NotImplementedError
