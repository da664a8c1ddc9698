"""The loop state: one record that checkpoints store, resumes restore and elastic commits
roll back whole; and each rank's sums since the last log line."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from hvdft import dist


@dataclass
class Progress:
    """The loop state: exactly what a checkpoint stores and a resume restores."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress
    batch_in_epoch: int = 0  # this epoch's batches each rank has trained on (since its remainder began)
    best_metric: float | None = None
    best_step: int | None = None  # the step of the evaluation that gave best_metric
    bad_evals: int = 0  # evaluations since the last improvement
    history: list[dict[str, Any]] = field(default_factory=list)  # every evaluation
    stopped_early: bool = False
    train_loss_sum: float = 0.0  # summed over all ranks and logged steps
    train_targets: float = 0.0  # the loss terms of train_loss_sum
    tokens: float = 0.0  # real (non-padding) tokens of the logged steps, all ranks
    train_time: float = 0.0  # seconds spent in training steps
    total_steps: int = 0  # the plan: optimizer steps of the whole run (replanned on a resize)
    started: bool = False  # the run has begun (an elastic worker that joins later continues it)
    # A partial epoch: the rows (global example id, window number) already trained on when
    # the epoch's remainder started on another number of ranks; they are left out.
    epoch_excluded: list[list[int]] = field(default_factory=list)
    # At a mid-epoch checkpoint or commit: every row of this epoch trained on so far, all ranks.
    seen: list[list[int]] = field(default_factory=list)
    # Per rank [loss sum, loss terms, tokens] not yet in a log line at the checkpoint: each
    # rank continues its own, so a resumed run logs what an uninterrupted one does.
    pending: list[list[float]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Progress:
        """A record from a checkpoint's dict (fields it lacks keep their defaults)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class Window:
    """This rank's sums since the last log line: loss (on the device: no per-step host
    sync), loss terms, real tokens, and the last step's gradient norm."""

    def __init__(self, device: torch.device, sums: list[float] | None = None) -> None:
        loss, targets, tokens = sums or (0.0, 0, 0)
        self.loss = torch.tensor(loss, dtype=torch.float32, device=device)
        self.targets, self.tokens = int(targets), int(tokens)
        self.grad_norm: torch.Tensor | None = None
        self.since = time.perf_counter()  # when the last log line was written

    def sums(self) -> list[float]:
        return [float(self.loss), self.targets, self.tokens]

    def totals(self) -> torch.Tensor:
        """Collective: [loss, loss terms, tokens] over all ranks; this rank's sums reset."""
        out = dist.allreduce(torch.tensor(self.sums(), dtype=torch.float64), name="log")
        self.loss.zero_()
        self.targets = self.tokens = 0
        return out

    def fold_into(self, progress: Progress) -> torch.Tensor:
        """Collective: the totals since the last log line, added to the run's."""
        totals = self.totals()
        progress.train_loss_sum += float(totals[0])
        progress.train_targets += float(totals[1])
        progress.tokens += float(totals[2])
        return totals


def own_pending(pending: list[list[float]], rank: int, world: int) -> list[float] | None:
    """This rank's unlogged sums from a checkpoint: its own when the world is the same
    size, else rank 0 takes them all (the next log line still counts every one)."""
    if not pending:
        return None
    if len(pending) == world:
        return pending[rank]
    return [sum(p[i] for p in pending) for i in range(3)] if rank == 0 else None
