"""The one module that talks to Horovod.

Everything else asks this module for rank, size and collectives, the way code built on
Accelerate asks its `Accelerator`. Keeping Horovod behind this seam means the training
loop reads like a single-process loop, and every collective has one place to be audited
for the classic Horovod hang: a rank skipping a collective that the others enter.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

from hvdft.errors import HvdftError

T = TypeVar("T")

_hvd: Any = None  # horovod.torch, imported lazily: `hvdft --help` must not need it


def init(threads_per_rank: int | None = None) -> None:
    """Start Horovod (idempotent) and give each rank its share of the CPU cores.

    When launched by mpirun/srun, mpi4py initialises MPI first and Horovod is handed
    MPI_COMM_WORLD, so Horovod and mpi4py share one communicator.
    """
    global _hvd
    if _hvd is not None:
        return
    import horovod.torch as hvd

    if _launched_by_mpi() and hvd.mpi_built():
        from mpi4py import MPI

        hvd.init(comm=MPI.COMM_WORLD)
    else:
        _refuse_crashing_gloo()
        hvd.init()
    _hvd = hvd
    if threads_per_rank is None and "OMP_NUM_THREADS" not in os.environ:
        # Ranks on one host share its cores; oversubscribing threads halves throughput.
        threads_per_rank = max(1, (os.cpu_count() or 1) // hvd.local_size())
    if threads_per_rank:
        torch.set_num_threads(threads_per_rank)
    if torch.cuda.is_available():
        torch.cuda.set_device(hvd.local_rank() % torch.cuda.device_count())


def _refuse_crashing_gloo() -> None:
    """One line on every rank instead of a segfault in hvd.init() (hvdft.gloo_host)."""
    if os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR"):  # horovodrun --gloo started us
        from hvdft.gloo_host import ADVICE, gloo_crash_reason

        reason = gloo_crash_reason()
        if reason is not None:
            raise HvdftError(f"{reason}; {ADVICE}")


def _launched_by_mpi() -> bool:
    return any(k in os.environ for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"))


def _require() -> Any:
    if _hvd is None:
        raise RuntimeError("hvdft.dist.init() must be called first")
    return _hvd


def rank() -> int:
    return _require().rank()


def size() -> int:
    return _require().size()


def local_rank() -> int:
    return _require().local_rank()


def local_size() -> int:
    return _require().local_size()


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def hostname() -> str:
    return socket.gethostname()


def build_info() -> dict[str, bool]:
    """Which controllers and GPU operations this Horovod was built with (no init needed)."""
    import horovod.torch as hvd

    return {
        "mpi": bool(hvd.mpi_built()),
        "gloo": bool(hvd.gloo_built()),
        "nccl": bool(hvd.nccl_built()),
        "cuda": bool(hvd.cuda_built()),
    }


def controller() -> str:
    hvd = _require()
    return "mpi" if hvd.mpi_enabled() else "gloo"


# ---------------------------------------------------------------- collectives


def allreduce(tensor: torch.Tensor, op: str = "sum", name: str | None = None) -> torch.Tensor:
    hvd = _require()
    return hvd.allreduce(tensor, op={"sum": hvd.Sum, "average": hvd.Average}[op], name=name)


def allgather_object(obj: T, name: str = "hvdft.gather") -> list[T]:
    """Every rank's object, in rank order, on every rank.

    The name is fixed: Horovod matches collectives across ranks by name, and its default
    (the object's type) differs when one rank sends None and another an error or a dict.
    """
    return _require().allgather_object(obj, name=name)


def broadcast_object(obj: T, root: int = 0, name: str = "hvdft.bcast") -> T:
    """`obj` of rank `root` on every rank (the others pass anything, usually None)."""
    return _require().broadcast_object(obj, root_rank=root, name=name)


def barrier() -> None:
    _require().barrier()


def agree(step: Callable[[], T]) -> T:
    """Run `step` on every rank; if it raises HvdftError on any rank, raise it on all.

    Input errors are often found on one rank only (a bad line in its shard). Without
    this, that rank exits while the others wait forever in their next collective.
    """
    result: T | None = None
    error: str | None = None
    try:
        result = step()
    except HvdftError as exc:
        error = str(exc)
    errors = allgather_object(error)
    for r, message in enumerate(errors):
        if message is not None:
            everywhere = all(m == message for m in errors)  # e.g. a missing file: no rank to name
            suffix = f" (found on rank {r})" if size() > 1 and not everywhere else ""
            agreed = HvdftError(message + suffix)
            agreed.agreed = True  # every rank raises it: rank 0 alone needs to print it
            raise agreed
    return result  # type: ignore[return-value]


# ---------------------------------------------------------------- optimizer and state


def wrap_optimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    *,
    backward_passes_per_step: int = 1,
    fp16_allreduce: bool = False,
    op: str = "average",
) -> torch.optim.Optimizer:
    """AdamW (or any optimizer) inside hvd.DistributedOptimizer.

    Gradients are allreduced in the background as backward produces them; `op="adasum"`
    selects Horovod's Adasum; `fp16_allreduce` halves the bytes on the wire.
    """
    hvd = _require()
    return hvd.DistributedOptimizer(
        optimizer,
        named_parameters=list(named_parameters),
        compression=hvd.Compression.fp16 if fp16_allreduce else hvd.Compression.none,
        backward_passes_per_step=backward_passes_per_step,
        op={"average": hvd.Average, "adasum": hvd.Adasum, "sum": hvd.Sum}[op],
    )


def broadcast_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Rank 0's parameters and optimizer state become every rank's.

    The optimizer state goes as one object rather than through
    hvd.broadcast_optimizer_state: for a fresh AdamW that helper takes a dummy step
    with zero gradients to create the state, which applies weight decay to the
    weights and advances Adam's step count before training starts.
    """
    broadcast_parameters(model)
    state = broadcast_object(optimizer.state_dict() if is_main() else None)
    if not is_main():
        optimizer.load_state_dict(state)


def broadcast_parameters(model: torch.nn.Module) -> None:
    _require().broadcast_parameters(model.state_dict(), root_rank=0)


def shutdown() -> None:
    """Clean exit: Horovod first, then MPI (mpirun treats a missing Finalize as a crash)."""
    global _hvd
    if _hvd is not None:
        _hvd.shutdown()
        _hvd = None
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
