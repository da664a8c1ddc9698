"""The optimizers (--optimizer), their parameter groups, the learning-rate rule and the schedule."""

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


OPTIMIZERS = ("adamw", "sgd", "nesterov", "adagrad", "rmsprop")
# --momentum where it applies, and its default when not given: torch's (and HF Trainer's)
# for SGD and RMSprop (0: plain SGD, plain RMSprop); Nesterov needs a momentum to look ahead with.
DEFAULT_MOMENTUM = {"sgd": 0.0, "nesterov": 0.9, "rmsprop": 0.0}


def check_momentum(name: str, momentum: float | None) -> None:
    """Raise HvdftError when --momentum is given for an optimizer without one, or when
    Nesterov's is 0 (torch refuses it: there is nothing to look ahead with)."""
    from hvdft.errors import HvdftError

    if momentum is not None and name not in DEFAULT_MOMENTUM:
        raise HvdftError(f"--momentum does not apply to --optimizer {name} "
                         f"(only to {', '.join(DEFAULT_MOMENTUM)})")
    if name == "nesterov" and momentum is not None and momentum <= 0:
        raise HvdftError(f"--optimizer nesterov needs a positive --momentum, got {momentum:g}")


def build_optimizer(name: str, model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device,
                    momentum: float | None = None) -> torch.optim.Optimizer:
    """The optimizer `name` (one of OPTIMIZERS) over `decay_groups(model, weight_decay)`.

    adamw: AdamW, decoupled weight decay (Loshchilov & Hutter, 2019). sgd / nesterov: SGD
    with (Nesterov) momentum (Sutskever et al., 2013). adagrad: Adagrad (Duchi et al.,
    2011). rmsprop: RMSprop (Hinton, 2012). For all but AdamW, torch applies weight decay as
    an L2 term added to the gradient. `momentum` None takes DEFAULT_MOMENTUM. Hyperparameters
    other than these are torch's defaults. The fused kernel where one exists, else foreach
    (on accelerators). The state each creates: AdamW, SGD-momentum and RMSprop on their
    first step; Adagrad at construction (its accumulators start at 0).
    """
    groups = decay_groups(model, weight_decay)
    if momentum is None:
        momentum = DEFAULT_MOMENTUM.get(name, 0.0)
    if name == "adamw":
        return _fast(torch.optim.AdamW, groups, device, lr=lr)
    if name in ("sgd", "nesterov"):
        return _fast(torch.optim.SGD, groups, device, lr=lr, momentum=momentum, nesterov=name == "nesterov")
    if name == "adagrad":
        return _fast(torch.optim.Adagrad, groups, device, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=momentum, foreach=device.type != "cpu")
    raise ValueError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")


def _fast(cls: type, groups: list[dict], device: torch.device, **kwargs: float | bool) -> torch.optim.Optimizer:
    """`cls` with its fused kernel where this torch has one for the device, else foreach."""
    try:
        return cls(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return cls(groups, foreach=device.type != "cpu", **kwargs)


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """The LambdaLR factor of linear warm-up over `warmup` steps, then linear decay to 0 at
    `total` (the schedule of BERT fine-tuning and HF's get_linear_schedule_with_warmup)."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor
