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

# Feature columns that only the model reads; the rest describe a row for `Task.predictions`.
_MODEL_ONLY = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class Evaluation:
    metrics: dict[str, float]  # identical on every rank (broadcast from rank 0)
    report: str = ""  # rank 0 only
    examples: list[dict[str, Any]] | None = None  # rank 0 only, global input order
    predictions: list[Any] | None = None  # rank 0 only


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on `device`, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Evaluator:
    """Predicts and scores with one model; built once per run, called once per split."""

    task: Task
    model: torch.nn.Module
    id2label: dict[int, str]
    batch_size: int  # per rank
    pad_id: int
    precision: str = "fp32"

    @torch.no_grad()
    def predict_shard(self, split: Split, features: dict[str, list],
                      with_loss: bool = True) -> tuple[list[Any], torch.Tensor]:
        """This rank's merged predictions (one per owned example, in shard order) and
        [loss sum, target count] (float64) over its rows."""
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        pieces: list[list[Any]] = [[] for _ in split.examples]
        totals = torch.zeros(2, dtype=torch.float64)
        by_length = sorted(range(len(features["input_ids"])), key=lambda r: features["length"][r])
        keys = [k for k in features if k not in _MODEL_ONLY]
        for start in range(0, len(by_length), self.batch_size):
            rows = by_length[start : start + self.batch_size]
            batch = collate(features, rows, self.pad_id, model_inputs=self.task.model_inputs,
                            targets=self.task.targets).to(device)
            with autocast(device, self.precision):
                if with_loss:
                    loss, outputs = self.task.loss(self.model, batch)
                    totals += torch.tensor([float(loss), float(self.task.target_count(batch))], dtype=torch.float64)
                else:
                    outputs = self.task.forward(self.model, batch)
            row_dicts = [{k: features[k][r] for k in keys} for r in rows]
            for row, pred in zip(row_dicts, self.task.predictions(row_dicts, outputs, batch, self.model), strict=True):
                pieces[row["example"]].append(pred)
        self.model.train(was_training)
        merged = [self.task.merge(ex, p, self.id2label) for ex, p in zip(split.examples, pieces, strict=True)]
        return merged, totals

    def __call__(self, split: Split, features: dict[str, list]) -> Evaluation:
        """Collective: every rank calls it with its own shard of the same split."""
        merged, totals = self.predict_shard(split, features)
        totals = dist.allreduce(totals, op="sum", name=f"eval_loss.{split.name}")
        ordered = dist.gather_in_order(split.ids, list(zip(split.examples, merged, strict=True)))
        result = Evaluation(metrics={})
        if ordered is not None:
            result.examples = [ex for ex, _ in ordered]
            result.predictions = [pred for _, pred in ordered]
            metrics, result.report = self.task.score(result.examples, result.predictions)
            metrics["loss"] = float(totals[0] / max(totals[1], 1.0))
            result.metrics = metrics
        result.metrics = dist.broadcast_object(result.metrics)
        return result
