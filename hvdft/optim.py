"""The optimizer, its parameter groups, the learning-rate rule and the schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def effective_lr(lr: float, scale: str, world: int, allreduce_op: str) -> float:
    """The peak learning rate on `world` ranks.

    `scale`: "none" keeps the rate as given (what Hugging Face's Trainer and Accelerate
    do: fine-tuning recipes state the rate for their global batch); "linear" multiplies it
    by the number of ranks (Goyal et al., 2017, Horovod's convention for ImageNet SGD);
    "sqrt" by its square root (Krizhevsky, 2014; common for Adam). Adasum combines the
    ranks' updates so that the rate needs no scaling (Horovod's Adasum docs).
    """
    if allreduce_op == "adasum" or scale == "none":
        return lr
    return lr * (world if scale == "linear" else math.sqrt(world))


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups: weight decay on weight matrices only, never on biases and
    LayerNorm weights (as BERT's original optimizer and the HF Trainer)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over `decay_groups`; the fused kernel where it exists."""
    groups = decay_groups(model, weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, foreach=device.type != "cpu")


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """The LambdaLR factor of linear warm-up over `warmup` steps, then linear decay to 0 at
    `total` (the schedule of BERT fine-tuning and HF's get_linear_schedule_with_warmup)."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor
