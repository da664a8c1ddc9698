"""The one module that talks to Horovod.

Everything else asks this module for rank, size and collectives, the way code built on
Accelerate asks its `Accelerator`. Keeping Horovod behind this seam means the training
loop reads like a single-process loop, and every collective has one place to be audited
for the classic Horovod hang: a rank skipping a collective that the others enter.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from hvdft.errors import HvdftError

T = TypeVar("T")

_hvd: Any = None  # horovod.torch, imported lazily: `hvdft --help` must not need it


def init(threads_per_rank: int | None = None, timeline: str | None = None) -> None:
    """Start Horovod (idempotent) and give each rank its share of the CPU cores; with
    `timeline`, record Horovod's timeline into that file (see `start_timeline`).

    When launched by mpirun/srun, mpi4py initialises MPI first and Horovod is handed
    MPI_COMM_WORLD, so Horovod and mpi4py share one communicator.
    """
    global _hvd
    if _hvd is not None:
        if timeline:
            start_timeline(timeline)
        return
    import horovod.torch as hvd

    if timeline:  # Horovod reads it once, as it starts: DYNAMIC lets start_timeline() open the file
        os.environ.setdefault("HOROVOD_TIMELINE", "DYNAMIC")
    if launched_by_mpi() and hvd.mpi_built():
        from mpi4py import MPI

        hvd.init(comm=MPI.COMM_WORLD)
    else:
        _refuse_crashing_gloo()
        hvd.init()
    # Before _hvd is set: the error counts as found before Horovod started, and the
    # launcher's numbering (SLURM_PROCID) decides which task prints it.
    _check_not_split_job(hvd.size())
    _hvd = hvd
    if threads_per_rank is None and "OMP_NUM_THREADS" not in os.environ:
        # Ranks on one host share its cores; oversubscribing threads halves throughput.
        threads_per_rank = max(1, (os.cpu_count() or 1) // hvd.local_size())
    if threads_per_rank:
        torch.set_num_threads(threads_per_rank)
    if torch.cuda.is_available():
        torch.cuda.set_device(hvd.local_rank() % torch.cuda.device_count())
    if timeline:
        start_timeline(timeline)


def _refuse_crashing_gloo() -> None:
    """One line on every rank instead of a segfault in hvd.init() (hvdft.gloo_host)."""
    if os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR"):  # horovodrun --gloo started us
        from hvdft.gloo_host import ADVICE, gloo_crash_reason

        reason = gloo_crash_reason()
        if reason is not None:
            raise HvdftError(f"{reason}; {ADVICE}")


_timeline: str | None = None  # the file the timeline is being recorded into


def start_timeline(path: str) -> None:
    """Collective: record Horovod's timeline into `path` from now on.

    Rank 0 writes it, for every rank: a Chrome trace-event JSON file (open it in
    chrome://tracing or https://ui.perfetto.dev) with one row per tensor: NEGOTIATE_ALLREDUCE
    (the ranks reporting ready: a late rank shows where the others wait), then the
    ALLREDUCE itself (queueing, memory copies, the MPI/Gloo/NCCL operation). Horovod must
    have started with HOROVOD_TIMELINE set, which `init(timeline=...)` does; horovodrun's
    --timeline-filename sets it too. The file is complete when Horovod shuts down.
    """
    global _timeline
    hvd = _require()
    if _timeline == path:
        return
    target = Path(path).resolve()

    def prepare() -> None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HvdftError(f"--horovod-timeline: cannot create the folder: {exc.strerror}", target.parent) from None

    main_only(prepare)
    try:
        hvd.start_timeline(str(target), mark_cycles=False)
    except ValueError:
        raise HvdftError("--horovod-timeline: Horovod started without a timeline (set HOROVOD_TIMELINE=DYNAMIC before "
                         "it starts)", everywhere=True) from None
    _timeline = path


_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def launched_by_mpi() -> bool:
    """True in a process started by mpirun or srun --mpi (MPI_COMM_WORLD holds the job)."""
    return any(k in os.environ for k in _MPI_RANK_VARS)


def launch_size() -> int:
    """How many ranks horovodrun or mpirun started, readable before Horovod starts; 1 when
    no launcher says (a single process, srun without --mpi)."""
    for key in ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return 1


def launch_rank() -> int:
    """This process's rank as its launcher numbered it, readable before Horovod starts
    (horovodrun, mpirun, srun); 0 when started alone. Used to print an error found before
    `init()` once per job rather than once per rank."""
    for key in ("HOROVOD_RANK", *_MPI_RANK_VARS, "SLURM_PROCID"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return 0


def _check_not_split_job(world: int) -> None:
    """`srun -n 4 hvdft train` without --mpi starts four one-rank jobs that all train
    alone and write into one folder. Refuse that before anything is written."""
    # srun sets SLURM_STEP_NUM_TASKS for the tasks of a step (not SLURM_NTASKS, which a
    # batch script also has while it runs as one process).
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS") or "1"
    if world == 1 and "SLURM_PROCID" in os.environ and tasks.isdigit() and int(tasks) > 1:
        raise HvdftError(
            f"Slurm started {tasks} tasks but Horovod sees 1 rank: srun ran {tasks} separate one-rank jobs. "
            "Use `srun --mpi=pmix` (or pmi2), or `hvdft launch` inside the allocation"
        )


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

_LOCAL = False  # inside local_collectives(): every collective returns this rank's own value


@contextlib.contextmanager
def local_collectives() -> Iterator[None]:
    """Collectives that return this rank's own value, for the setup of an elastic job.

    Horovod's elastic mode allows no collective before the training function: a worker
    that joins later would wait in a collective that the others never enter. Every rank
    therefore sets up from the same whole data, so that what a collective would agree on
    is what each rank already holds. Inside: `allgather_object` gives `[obj]`, broadcasts
    and allreduces give the value back, `agree` raises an HvdftError on every rank as found
    (all ranks find it), `main_only`/`on_main` still act on rank 0 alone or compute locally.

        with dist.local_collectives():
            run = setup(cfg)
    """
    global _LOCAL
    _LOCAL = True
    try:
        yield
    finally:
        _LOCAL = False



def allreduce(tensor: torch.Tensor, op: str = "sum", name: str | None = None) -> torch.Tensor:
    if _LOCAL:
        return tensor.clone()
    hvd = _require()
    return hvd.allreduce(tensor, op={"sum": hvd.Sum, "average": hvd.Average}[op], name=name)


def allgather_object(obj: T, name: str = "hvdft.gather") -> list[T]:
    """Every rank's object, in rank order, on every rank.

    The name is fixed: Horovod matches collectives across ranks by name, and its default
    (the object's type) differs when one rank sends None and another an error or a dict.
    """
    if _LOCAL:
        return [obj]
    return _require().allgather_object(obj, name=name)


def broadcast_object(obj: T, root: int = 0, name: str = "hvdft.bcast") -> T:
    """`obj` of rank `root` on every rank (the others pass anything, usually None)."""
    if _LOCAL:
        return obj
    return _require().broadcast_object(obj, root_rank=root, name=name)


def barrier() -> None:
    if not _LOCAL:
        _require().barrier()


def agree(step: Callable[[], T]) -> T:
    """Run `step` on every rank; if it raises HvdftError on any rank, raise it on all.

    Input errors are often found on one rank only (a bad line in its shard). Without
    this, that rank exits while the others wait forever in their next collective.
    """
    if _LOCAL:  # every rank runs `step` on the same whole data: each finds the same error
        try:
            return step()
        except HvdftError as exc:
            raise HvdftError(str(exc), everywhere=True) from None
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
            raise HvdftError(message + suffix, everywhere=True)  # rank 0 alone needs to print it
    return result  # type: ignore[return-value]


def on_main(compute: Callable[[], T]) -> T:
    """Rank 0 computes, every rank receives the result (errors agreed, as in `agree`).

        path = dist.on_main(lambda: resolve_resume(spec, output_dir))
        state = dist.on_main(lambda: read_checkpoint(path))
    """
    if _LOCAL:
        return agree(compute)
    return broadcast_object(agree(lambda: compute() if is_main() else None))


def main_only(action: Callable[[], Any]) -> None:
    """Rank 0 acts (writes a file, checks a folder); an HvdftError it raises stops every rank.

        dist.main_only(lambda: check_output_dir(output_dir))
        dist.main_only(lambda: save_model(folder, model))
    """
    agree(lambda: action() if is_main() else None)


def main_first(load: Callable[[], T]) -> T:
    """Rank 0 runs `load` first (it downloads or builds a cache), then the others run it
    and find the cache; an HvdftError on rank 0 stops every rank before they start.

        dataset = dist.main_first(lambda: datasets.load_dataset(name))
    """
    if is_main() or _LOCAL:
        result = agree(load)
        barrier()
        return result
    agree(lambda: None)
    barrier()
    return agree(load)


def gather_in_order(ids: Sequence[int], items: Sequence[T]) -> list[T] | None:
    """Collective: every rank's items, sorted by their global ids, on rank 0 (None elsewhere).

        ordered = dist.gather_in_order(split.ids, predictions)
        if ordered is not None: write(ordered)
    """
    parts = allgather_object(list(zip(ids, items, strict=True)))
    if not is_main():
        return None
    return [item for _, item in sorted((pair for part in parts for pair in part), key=lambda pair: pair[0])]


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
    wrapped = hvd.DistributedOptimizer(
        optimizer,
        named_parameters=list(named_parameters),
        compression=hvd.Compression.fp16 if fp16_allreduce else hvd.Compression.none,
        backward_passes_per_step=backward_passes_per_step,
        op={"average": hvd.Average, "adasum": hvd.Adasum, "sum": hvd.Sum}[op],
    )
    # On more than one rank Adasum is another optimizer class, whose step() reduces the
    # updates and whose skip_synchronize() raises (on one rank Horovod uses the plain one).
    wrapped.hvdft_adasum = op == "adasum" and hvd.size() > 1
    return wrapped


def optimizer_step(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, scaler: Any, max_grad_norm: float
) -> torch.Tensor:
    """One optimizer step of a wrapped optimizer: the whole Horovod step protocol.

    Waits for the background gradient allreduce (`synchronize`), unscales an fp16 loss
    scale, clips the averaged gradient to `max_grad_norm` (0: no clipping), then steps
    under `skip_synchronize` so Horovod does not reduce a second time, updates the loss
    scale and zeroes the gradients. Returns the global L2 norm of the averaged gradient
    before clipping (a 0-d tensor on the gradients' device: no host sync here).

    Adasum: Horovod's Adasum optimizer combines the ranks' *updates* inside `step()` and
    has no `skip_synchronize`; the gradients clipped here are then the local ones.

        grad_norm = dist.optimizer_step(optimizer, model, scaler, max_grad_norm=1.0)
        scheduler.step()
    """
    optimizer.synchronize()
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    if max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(optimizer, "skip_synchronize") and not getattr(optimizer, "hvdft_adasum", False):
        with optimizer.skip_synchronize():
            scaler.step(optimizer)
    else:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    return norm.detach()


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


# ---------------------------------------------------------------- elastic Horovod


def elastic() -> bool:
    """True in a worker of an elastic job (`horovodrun --min-np/--max-np/--host-discovery-script`):
    Horovod sets HOROVOD_ELASTIC=1 in every elastic worker, also in those that join later,
    and never under plain horovodrun or mpirun."""
    return os.environ.get("HOROVOD_ELASTIC") == "1"


def elastic_state(parts: Any, progress: Any, prepare_commit: Callable[[], None]) -> Any:
    """The state an elastic job commits, restores and syncs as one: `parts.model`,
    `.optimizer`, `.scheduler` and `.scaler` (read at every use: the engine may replace the
    scheduler) and the `progress` dataclass (restored in place: the loop holds it).
    `prepare_commit()` runs first at every commit (collective), to complete `progress`.

    Horovod's own TorchState is not used: it keeps plain objects by reference (a restore
    would roll the weights back but not the progress), pickles a scheduler or GradScaler
    into copies bound to copies of the optimizer (a joining worker's scheduler is never
    synced), and syncs the optimizer with broadcast_optimizer_state, whose dummy step on a
    fresh optimizer decays the broadcast weights. Each was seen to corrupt training here.

        state = dist.elastic_state(run, progress, prepare_commit=lambda: ...)
        dist.run(lambda: fine_tune(run, progress), state)
    """
    from horovod.common.elastic import State

    class _ElasticState(State):
        def __init__(self) -> None:
            super().__init__(bcast_object=broadcast_object, get_rank=rank)
            self.save()

        def commit(self) -> None:
            prepare_commit()
            super().commit()

        def save(self) -> None:
            self._saved = {
                "model": {k: v.detach().to("cpu", copy=True) for k, v in parts.model.state_dict().items()},
                "optimizer": copy.deepcopy(parts.optimizer.state_dict()),
                "scheduler": copy.deepcopy(parts.scheduler.state_dict()),
                "scaler": copy.deepcopy(parts.scaler.state_dict()),
                "progress": copy.deepcopy(dataclasses.asdict(progress)),
            }

        def restore(self) -> None:
            saved = self._saved
            parts.model.load_state_dict(saved["model"])
            parts.optimizer.load_state_dict(copy.deepcopy(saved["optimizer"]))  # also drops stale handles
            parts.scheduler.load_state_dict(saved["scheduler"])
            parts.scaler.load_state_dict(saved["scaler"])
            for key, value in copy.deepcopy(saved["progress"]).items():
                setattr(progress, key, value)
            for p in parts.model.parameters():  # the failed step's partial gradients
                p.grad = None

        def sync(self) -> None:
            # Rank 0's live state: after restore() its last commit, after a hosts update
            # the commit that raised it. Rank 0 is always a survivor of the previous world.
            broadcast_parameters(parts.model)
            live = {"optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
                    "scaler": parts.scaler.state_dict(), "progress": dataclasses.asdict(progress)}
            live = broadcast_object(live if is_main() else None, name="hvdft.elastic.sync")
            if not is_main():
                parts.optimizer.load_state_dict(live["optimizer"])
                parts.scheduler.load_state_dict(live["scheduler"])
                parts.scaler.load_state_dict(live["scaler"])
                for key, value in live["progress"].items():
                    setattr(progress, key, value)
            self.save()  # the synced state is every rank's restore point

    return _ElasticState()


def run(fn: Callable[[], T], state: Any = None, on_reset: Callable[[str, float], None] | None = None) -> T:
    """`fn()`; in an elastic job (`state` given) again after every reset, from the last commit.

    Horovod's elastic run loop (horovod.common.elastic.run_fn) with two changes: a reset is
    always followed by a sync (Horovod skips it after a host removal, which deadlocks when
    a host joins later: horovod#3494), and `on_reset(reason, seconds)` hears of each one.
    A collective failing because a peer died raises HorovodInternalError: the state rolls
    back to its last commit. A host list change raises HostsUpdatedInterrupt at a commit:
    nothing to roll back. Either way Horovod restarts with the ranks that remain.
    """
    if state is None:
        return fn()
    from horovod.common.elastic import notification_manager
    from horovod.common.exceptions import HorovodInternalError, HostsUpdatedInterrupt

    hvd = _require()
    notification_manager.init()
    notification_manager.register_listener(state)
    try:
        while True:
            state.sync()
            try:
                return fn()
            except HorovodInternalError as exc:
                reason = f"a rank failed ({(str(exc).splitlines() or [''])[0][:80]})"
                state.restore()
            except HostsUpdatedInterrupt as exc:
                reason = "hosts removed" if exc.skip_sync else "hosts added"
            started = time.monotonic()
            hvd.shutdown()
            hvd.init()
            state.on_reset()
            if on_reset is not None:
                on_reset(reason, time.monotonic() - started)
    finally:
        notification_manager.remove_listener(state)


def shutdown() -> None:
    """Clean exit: Horovod first, then MPI (mpirun treats a missing Finalize as a crash)."""
    global _hvd, _timeline
    if _hvd is not None:
        _hvd.shutdown()  # also completes a --timeline file
        _hvd, _timeline = None, None
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
