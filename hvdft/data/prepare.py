"""From the user's data options to this rank's tokenized shard and its batches."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import sys
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hvdft import dist
from hvdft.data.files import Shard, Split, find_split_files, load_hub_dataset
from hvdft.errors import HvdftError

if TYPE_CHECKING:
    from hvdft.config import TrainConfig
    from hvdft.tasks.base import Task

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
BUNDLED_DATASETS = {"wnut17": RESOURCES / "wnut17"}
SPLITS = ("train", "validation", "test")
HUB_SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "dev"), "test": ("test",)}

log = logging.getLogger("hvdft")


@dataclass
class Sources:
    """Where each split comes from: a local file, or a split of a Hub dataset."""

    files: dict[str, str]  # split -> local file
    hub: str | None = None  # Hub dataset id for the splits without a file


def data_sources(cfg: TrainConfig) -> Sources:
    """Each split's source: a --*-file option wins for its split; --dataset (bundled name,
    folder or Hub id) supplies the other splits."""
    files: dict[str, str] = {}
    hub = None
    if cfg.dataset:
        folder = BUNDLED_DATASETS.get(cfg.dataset)
        if folder is None and Path(cfg.dataset).is_dir():
            folder = Path(cfg.dataset)
        if folder is not None:
            files.update({k: str(v) for k, v in find_split_files(folder).items()})
        else:
            hub = cfg.dataset
    for split, given in (("train", cfg.train_file), ("validation", cfg.validation_file), ("test", cfg.test_file)):
        if given:
            files[split] = given
    return Sources(files, hub)


def read_splits(task: Task, cfg: TrainConfig, shard: Shard | None = None,
                splits: tuple[str, ...] = SPLITS) -> dict[str, Split]:
    """This rank's shard of each split that is given (files, bundled data or the Hub);
    `shard` defaults to this rank's of the job.

    Raises HvdftError on every rank when any rank finds a bad record in its shard, or when
    the training set has fewer examples than there are ranks.
    """
    shard = shard or Shard(dist.rank(), dist.size())
    sources = data_sources(cfg)
    hub = None
    if sources.hub and any(s not in sources.files for s in splits):
        hub = load_hub_dataset(sources.hub, cfg.dataset_config)
    result: dict[str, Split] = {}

    def read_all() -> None:
        for split in splits:
            part = _read_one(task, split, sources, hub, shard)
            if part is None:
                continue
            # Validation stays whole: --max-eval-samples picks its subset for the evaluations
            # during training only (setup.during_training), the final report covers it all.
            limit = {"train": cfg.max_train_samples, "test": cfg.max_test_samples}.get(split)
            if limit:
                _truncate(part, limit)
            result[split] = part
        if "train" in splits and "train" not in result:
            raise HvdftError("no training data: give --train-file or --dataset")
        train = result.get("train")
        if train is not None and train.total < shard.world:
            raise HvdftError(
                f"{train.total} training sentence(s) for {shard.world} ranks: every rank needs at least one",
                train.source,
            )

    dist.agree(read_all)
    return result


def _read_one(task: Task, split: str, sources: Sources, hub: Any, shard: Shard) -> Split | None:
    if split in sources.files:
        return task.read(sources.files[split], split, shard)
    if hub is None:
        return None
    key = next((n for n in HUB_SPLIT_NAMES[split] if n in hub), None)
    if key is None:
        return None
    part = task.read_hub(hub[key], split, shard, sources.hub or "hub")
    if part is None and split == "train":
        raise HvdftError(f"split '{key}' of {sources.hub} has no labels")
    if part is None and dist.is_main():  # labels withheld (GLUE's test split: -1)
        log.warning("%s split '%s' has no labels: not evaluated", sources.hub, key)
    return part


def _truncate(split: Split, limit: int) -> None:
    keep = [i for i, gid in enumerate(split.ids) if gid < limit]
    split.ids = [split.ids[i] for i in keep]
    split.examples = [split.examples[i] for i in keep]
    split.total = min(split.total, limit)


def tokenize(
    task: Task,
    split: Split,
    tokenizer: Any,
    label2id: dict[str, int],
    max_length: int,
    cache_dir: str | None = None,
) -> dict[str, list]:
    """Model inputs for this rank's shard, with `datasets`' cache: a rerun skips tokenizing."""
    import datasets

    if not split.examples:
        return {"input_ids": [], "example": [], "length": []}
    columns: dict[str, list] = {"example": list(range(len(split.examples)))}
    for key in split.examples[0]:
        if key != "line":
            columns[key] = [ex[key] for ex in split.examples]
    fingerprint = _fingerprint(task, columns, tokenizer, label2id, max_length)
    cache = Path(cache_dir or os.environ.get("HVDFT_CACHE") or Path.home() / ".cache" / "hvdft" / "datasets")
    cache.mkdir(parents=True, exist_ok=True)
    data = datasets.Dataset.from_dict(columns)
    mapped = data.map(
        lambda batch: task.featurize(batch, tokenizer, label2id, max_length),
        batched=True,
        remove_columns=data.column_names,
        cache_file_name=str(cache / f"{task.name}-{fingerprint}.arrow"),
        new_fingerprint=fingerprint,
        load_from_cache_file=True,
        desc=f"rank {dist.rank()} tokenizing {split.name}",
    )
    return mapped.to_dict()


def code_version(task: Task) -> str:
    """A hash of the code that featurizes: the task's module and the Task base class.

    Part of the cache key, so features made by other code are never reused.
    """
    h = hashlib.sha256()
    for module in (type(task).__module__, "hvdft.tasks.base"):
        h.update(Path(sys.modules[module].__file__ or "").read_bytes())
    return h.hexdigest()


def _fingerprint(task: Task, columns: dict[str, list], tokenizer: Any, label2id: dict[str, int],
                 max_length: int) -> str:
    h = hashlib.sha256()
    h.update(pickle.dumps(columns, protocol=4))
    options = asdict(task.options) if is_dataclass(task.options) else repr(task.options)
    h.update(json.dumps([task.name, label2id, max_length, options, type(tokenizer).__name__],
                        sort_keys=True, default=str).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Without the truncation/padding state: each call of the tokenizer sets it, so it
        # differs after the previous split was featurized or read from the cache, and an
        # unchanged rerun missed the cache. What the features depend on is in `options`
        # and `max_length`.
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        h.update(json.dumps(state, sort_keys=True).encode())
    else:
        h.update(tokenizer.name_or_path.encode())
    h.update(code_version(task).encode())
    h.update(task.cache_key().encode())
    from hvdft import __version__

    h.update(__version__.encode())
    return h.hexdigest()[:32]


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]  # what the model's forward takes
    targets: dict[str, torch.Tensor]  # what the loss compares against
    rows: list[int]  # row indices into the features
    real_tokens: int  # non-padding input tokens

    @property
    def labels(self) -> torch.Tensor:
        return self.targets["labels"]

    def to(self, device: torch.device) -> Batch:
        move = {k: v.to(device, non_blocking=True) for k, v in self.inputs.items()}
        targets = {k: v.to(device, non_blocking=True) for k, v in self.targets.items()}
        return Batch(move, targets, self.rows, self.real_tokens)


def _pad(rows: list[list[int]], value: int, width: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def collate(
    features: dict[str, list],
    rows: list[int],
    pad_id: int,
    multiple: int = 0,
    model_inputs: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids"),
    targets: dict[str, int] | None = None,
) -> Batch:
    """A batch of feature rows, right-padded to its longest row (rounded up to a multiple of
    `multiple` when given). Target columns of token lists are padded with their padding
    value: to the input width when they run alongside the inputs (token labels), else to
    their own longest (decoder targets); scalar targets become a vector."""
    targets = {"labels": -100} if targets is None else targets
    seqs = [features["input_ids"][r] for r in rows]
    longest = max(len(s) for s in seqs)
    if multiple:
        longest = math.ceil(longest / multiple) * multiple
    inputs = {"input_ids": _pad(seqs, pad_id, longest),
              "attention_mask": _pad([[1] * len(s) for s in seqs], 0, longest)}
    for name in model_inputs:
        if name not in inputs and name in features:
            inputs[name] = _pad([features[name][r] for r in rows], 0, longest)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in targets.items():
        if name not in features:
            continue
        column = [features[name][r] for r in rows]
        if isinstance(column[0], list):
            aligned = all(len(t) == len(s) for t, s in zip(column, seqs, strict=True))
            width = longest if aligned else max(len(t) for t in column)
            if multiple and not aligned:
                width = math.ceil(width / multiple) * multiple
            tensors[name] = _pad(column, value, width)
        else:
            tensors[name] = torch.tensor(column, dtype=torch.long)
    return Batch(inputs, tensors, rows, int(inputs["attention_mask"].sum()))
