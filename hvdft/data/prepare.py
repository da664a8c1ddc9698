"""From the user's data options to this rank's tokenized shard and its batches."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hvdft import dist
from hvdft.config import TrainConfig
from hvdft.data.files import Split, find_split_files, load_hub_dataset
from hvdft.errors import HvdftError
from hvdft.tasks.base import Task

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
BUNDLED_DATASETS = {"wnut17": RESOURCES / "wnut17"}


def data_sources(cfg: TrainConfig) -> dict[str, str | None]:
    """split -> local file, from --dataset (bundled name or folder) and the --*-file options."""
    files: dict[str, str | None] = {"train": None, "validation": None, "test": None}
    if cfg.dataset:
        folder = BUNDLED_DATASETS.get(cfg.dataset)
        if folder is None and Path(cfg.dataset).is_dir():
            folder = Path(cfg.dataset)
        if folder is not None:
            files.update({k: str(v) for k, v in find_split_files(folder).items()})
    for split, given in (("train", cfg.train_file), ("validation", cfg.validation_file), ("test", cfg.test_file)):
        if given:
            files[split] = given
    return files


def read_splits(task: Task, cfg: TrainConfig, splits: tuple[str, ...]) -> dict[str, Split]:
    """This rank's shard of each split that is given (files, bundled data or the Hub)."""
    rank, world = dist.rank(), dist.size()
    opts = {
        "text_column": cfg.text_column,
        "text_pair_column": cfg.text_pair_column,
        "label_column": cfg.label_column,
        "encoding": cfg.encoding,
        "dataset": cfg.dataset,
    }
    files = data_sources(cfg)
    hub = None
    if cfg.dataset and not any(files.values()):
        hub = load_hub_dataset(cfg.dataset, cfg.dataset_config)
        names = {"validation": ("validation", "valid", "dev"), "train": ("train",), "test": ("test",)}
        for split in splits:
            key = next((n for n in names[split] if n in hub), None)
            files[split] = key
    result: dict[str, Split] = {}

    def read_all() -> None:
        for split in splits:
            source = files.get(split)
            if not source:
                continue
            if hub is not None:
                part = task.read_hub(hub[source], split, rank, world, opts)
                if part is None and split != "train":  # labels withheld (GLUE's test split: -1)
                    if dist.is_main():
                        logging.getLogger("hvdft").warning("%s split '%s' has no labels: not evaluated",
                                                           cfg.dataset, source)
                    continue
                if part is None:
                    raise HvdftError(f"split '{source}' of {cfg.dataset} has no labels")
                result[split] = part
            else:
                result[split] = task.read(source, split, rank, world, opts)
            limit = cfg.max_train_samples if split == "train" else cfg.max_eval_samples
            if limit:
                _truncate(result[split], limit)
        if "train" in splits and "train" not in result:
            raise HvdftError("no training data: give --train-file or --dataset")

    dist.agree(read_all)
    train = result.get("train")

    def enough_for_every_rank() -> None:
        if train is not None and train.total < world:
            raise HvdftError(
                f"{train.total} training sentence(s) for {world} ranks: every rank needs at least one",
                train.source,
            )

    dist.agree(enough_for_every_rank)  # every rank finds it: agreed, the job says it once
    return result


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
    label_all_tokens: bool = False,
    cache_dir: str | None = None,
) -> dict[str, list]:
    """Model inputs for this rank's shard, with `datasets`' cache: a rerun skips tokenizing."""
    import datasets

    opts = {"max_length": max_length, "label_all_tokens": label_all_tokens}
    columns: dict[str, list] = {"example": list(range(len(split.examples)))}
    for key in split.examples[0] if split.examples else ():
        if key != "line":
            columns[key] = [ex[key] for ex in split.examples]
    if not split.examples:
        return {"input_ids": [], "labels": [], "example": [], "length": []}
    fingerprint = _fingerprint(task, columns, tokenizer, label2id, opts)
    cache = Path(cache_dir or os.environ.get("HVDFT_CACHE") or Path.home() / ".cache" / "hvdft" / "datasets")
    cache.mkdir(parents=True, exist_ok=True)
    data = datasets.Dataset.from_dict(columns)
    mapped = data.map(
        lambda batch: task.featurize(batch, tokenizer, label2id, opts),
        batched=True,
        remove_columns=data.column_names,
        cache_file_name=str(cache / f"{task.name}-{fingerprint}.arrow"),
        new_fingerprint=fingerprint,
        load_from_cache_file=True,
        desc=f"rank {dist.rank()} tokenizing {split.name}",
    )
    return mapped.to_dict()


def _fingerprint(task: Task, columns: dict[str, list], tokenizer: Any, label2id: dict[str, int], opts: dict) -> str:
    h = hashlib.sha256()
    h.update(pickle.dumps(columns, protocol=4))
    h.update(json.dumps([task.name, label2id, opts, type(tokenizer).__name__], sort_keys=True).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Without the truncation/padding state: each call of the tokenizer sets it, so it
        # differs after the previous split was featurized or read from the cache, and an
        # unchanged rerun missed the cache. What the features depend on is in `opts`.
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        h.update(json.dumps(state, sort_keys=True).encode())
    else:
        h.update(tokenizer.name_or_path.encode())
    from hvdft import __version__

    h.update(__version__.encode())
    for source in _task_sources(task):  # what produced the features: a changed featurize is a new key
        h.update(source)
    return h.hexdigest()[:32]


def _task_sources(task: Task) -> list[bytes]:
    """The source files of the modules defining the task's class and its bases (the task
    module, tasks/base.py): their bytes key the cache, so features made by older code
    are never reused. The package version alone misses edits made between releases."""
    import sys

    seen: list[str] = []
    for cls in type(task).__mro__:
        path = getattr(sys.modules.get(cls.__module__), "__file__", None)
        if path and path not in seen and cls.__module__ not in ("builtins", "abc"):
            seen.append(path)
    return [Path(p).read_bytes() for p in seen]


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]  # what the model's forward takes
    labels: torch.Tensor
    rows: list[int]  # row indices into the features
    real_tokens: int  # non-padding tokens


def collate(features: dict[str, list], rows: list[int], pad_id: int, multiple: int = 0) -> Batch:
    """Pad to the longest row of this batch (optionally up to a multiple of `multiple`)."""
    seqs = [features["input_ids"][r] for r in rows]
    longest = max(len(s) for s in seqs)
    if multiple:
        longest = math.ceil(longest / multiple) * multiple
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    inputs = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in features:
        tt = torch.zeros((len(seqs), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            t = features["token_type_ids"][r]
            tt[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        inputs["token_type_ids"] = tt
    first = features["labels"][rows[0]]
    if isinstance(first, list):  # token labels: pad with the ignore index
        labels = torch.full((len(seqs), longest), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            lab = features["labels"][r]
            labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    else:
        labels = torch.tensor([features["labels"][r] for r in rows], dtype=torch.long)
    return Batch(inputs, labels, rows, int(mask.sum()))
