"""Sharded evaluation: every rank predicts its shard, rank 0 scores the gathered whole."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from hvdft import dist
from hvdft.data.files import Split
from hvdft.data.prepare import collate
from hvdft.tasks.base import Task


@dataclass
class Evaluation:
    metrics: dict[str, float]  # identical on every rank (broadcast from rank 0)
    report: str = ""  # rank 0 only
    examples: list[dict[str, Any]] | None = None  # rank 0 only, global input order
    predictions: list[Any] | None = None  # rank 0 only


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict_shard(
    task: Task,
    model: torch.nn.Module,
    split: Split,
    features: dict[str, list],
    id2label: dict[int, str],
    batch_size: int,
    pad_id: int,
    precision: str = "fp32",
) -> tuple[list[Any], torch.Tensor]:
    """This rank's merged predictions (one per owned example) and [loss_sum, labelled]."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pieces: list[list[Any]] = [[] for _ in split.examples]
    totals = torch.zeros(2, dtype=torch.float64)
    rows_by_length = sorted(range(len(features["input_ids"])), key=lambda r: features["length"][r])
    keys = [k for k in features if k not in ("input_ids", "labels", "token_type_ids")]
    for start in range(0, len(rows_by_length), batch_size):
        rows = rows_by_length[start : start + batch_size]
        batch = collate(features, rows, pad_id)
        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.inputs.items()}
        with autocast(device, precision):
            logits = model(**inputs).logits.float()
        labels = batch.labels.to(device)
        loss = torch.nn.functional.cross_entropy(
            logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100, reduction="sum"
        )
        totals += torch.tensor([loss.item(), float((labels != -100).sum())], dtype=torch.float64)
        row_dicts = [{k: features[k][r] for k in keys} for r in rows]
        for row, pred in zip(row_dicts, task.predictions(row_dicts, logits), strict=True):
            pieces[row["example"]].append(pred)
    model.train(was_training)
    merged = [task.merge(ex, p, id2label) for ex, p in zip(split.examples, pieces, strict=True)]
    return merged, totals


def evaluate(
    task: Task,
    model: torch.nn.Module,
    split: Split,
    features: dict[str, list],
    id2label: dict[int, str],
    batch_size: int,
    pad_id: int,
    precision: str = "fp32",
) -> Evaluation:
    """Collective: every rank must call it, with its own shard of the same split."""
    merged, totals = predict_shard(task, model, split, features, id2label, batch_size, pad_id, precision)
    totals = dist.allreduce(totals, op="sum", name=f"eval_loss.{split.name}")
    local = [(gid, ex, pred) for gid, ex, pred in zip(split.ids, split.examples, merged, strict=True)]
    gathered = dist.allgather_object(local)
    result = Evaluation(metrics={})
    if dist.is_main():
        ordered = sorted((item for part in gathered for item in part), key=lambda item: item[0])
        result.examples = [ex for _, ex, _ in ordered]
        result.predictions = [pred for _, _, pred in ordered]
        metrics, result.report = task.score(result.examples, result.predictions)
        metrics["loss"] = float(totals[0] / max(totals[1], 1.0))
        result.metrics = metrics
    result.metrics = dist.broadcast_object(result.metrics)
    return result
