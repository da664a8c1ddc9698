"""Test-only hooks, read once from the environment; every method is a no-op when unset.

The failure, equivalence and checkpoint tests need to stop a rank at an exact step, or to
see what each rank holds, from inside a real multi-process job. Two variables do it:

- `HVDFT_FAULT="rank=1,step=3,kind=raise|kill|wait|hold[,once=PATH]"`: as that rank
  starts that optimizer step it raises, SIGKILLs itself, waits (up to 120 s) for a stop
  signal (a fixed step boundary for a test to send SIGTERM/SIGINT at), or holds for 120 s
  whatever comes (a long step, during which Ctrl-C is pressed twice). With `once=PATH`
  the fault fires only if PATH does not exist yet, and creates it: a relaunched job runs on.
- `HVDFT_DEBUG_DIR=DIR`: each rank appends JSON lines to DIR/rank<N>.jsonl: hashes of its
  parameters and optimizer state at named moments, and for every step the global example
  ids and padded [rows, tokens] shape of each micro-batch.
  With `HVDFT_DEBUG_TENSORS=MOMENT[,MOMENT]` it also saves its parameters at those moments
  (e.g. `after_broadcast`: the weights the first step starts from) as
  DIR/rank<N>-<MOMENT>.safetensors.

`hvdft launch` never forwards them unless asked (`--env HVDFT_FAULT`), and rank 0 warns when
one is set, so a stray variable in a shell cannot silently break a real job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

HOOK_VARIABLES = ("HVDFT_FAULT", "HVDFT_DEBUG_DIR", "HVDFT_DEBUG_TENSORS")


class Hooks:
    """The hooks of one rank. Build with `Hooks.from_env(rank)`."""

    def __init__(self, rank: int, fault: dict[str, str] | None, debug_dir: str | None,
                 tensors_at: tuple[str, ...] = ()) -> None:
        self.rank = rank
        self.fault = fault if fault and int(fault["rank"]) == rank else None
        self.trace = Path(debug_dir) / f"rank{rank}.jsonl" if debug_dir else None
        self.tensors_at = tensors_at

    @classmethod
    def from_env(cls, rank: int) -> Hooks:
        spec = os.environ.get("HVDFT_FAULT")
        fault = dict(item.split("=", 1) for item in spec.split(",")) if spec else None
        tensors_at = tuple(m for m in os.environ.get("HVDFT_DEBUG_TENSORS", "").split(",") if m)
        hooks = cls(rank, fault, os.environ.get("HVDFT_DEBUG_DIR") or None, tensors_at)
        if rank == 0:
            for name in HOOK_VARIABLES:
                if os.environ.get(name):
                    logging.getLogger("hvdft").warning("test hook %s=%s is set in this job's environment",
                                                       name, os.environ[name])
        return hooks

    def before_step(self, step: int, stop: Any) -> None:
        """Fault injection at the start of optimizer step `step` (1-based)."""
        if self.fault is None or int(self.fault["step"]) != step:
            return
        once = self.fault.get("once")
        if once:
            if Path(once).exists():
                return
            Path(once).touch()
        kind = self.fault["kind"]
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind in ("wait", "hold"):  # hold: deaf to the stop flag, like a long step
            deadline = time.monotonic() + 120
            while not (stop.raised and kind == "wait") and time.monotonic() < deadline:
                time.sleep(0.05)
            return
        raise RuntimeError(f"HVDFT_FAULT: injected failure at step {step}")

    def snapshot(self, event: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Hashes of the parameters and optimizer state at a named moment."""
        if self.trace is not None:
            self._write({"event": event, "params": digest(model.state_dict()),
                         "optimizer": digest(optimizer.state_dict())})
            if event in self.tensors_at:
                from safetensors.torch import save_file

                state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}  # no shared storage
                save_file(state, str(self.trace.with_name(f"rank{self.rank}-{event}.safetensors")))

    def entered(self, step: int, epoch: int, world: int) -> None:
        """Training (re)starts at `step` on `world` ranks: steps logged after a later one are
        superseded (an elastic reset rolls back to the last commit)."""
        if self.trace is not None:
            self._write({"event": "entered", "step": step, "epoch": epoch, "world": world})

    def after_step(self, step: int, epoch: int, example_ids: Callable[[], list[list[int]]],
                   shapes: Callable[[], list[list[int]]] | None = None) -> None:
        """The global ids of the examples of each micro-batch of a finished step, and each
        micro-batch's padded [rows, tokens] as the model saw it (computed only when tracing)."""
        if self.trace is not None:
            record: dict[str, Any] = {"event": "step", "step": step, "epoch": epoch, "examples": example_ids()}
            if shapes is not None:
                record["shapes"] = shapes()
            self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        assert self.trace is not None
        self.trace.parent.mkdir(parents=True, exist_ok=True)
        with open(self.trace, "a", encoding="utf-8") as f:
            f.write(json.dumps({**record, "time": time.time()}) + "\n")


def digest(obj: Any) -> str:
    """sha256 of nested dicts/lists of tensors and plain values, in a fixed order."""
    import torch  # here: `hvdft launch` imports this module for HOOK_VARIABLES, and must stay light

    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            h.update(str((x.dtype, tuple(x.shape))).encode())
            h.update(x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(repr(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                feed(v)
        else:
            h.update(repr(x).encode())

    feed(obj)
    return h.hexdigest()
