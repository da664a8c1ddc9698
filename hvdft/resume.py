"""Where training starts: afresh, from a checkpoint (on any number of ranks), or in an
elastic job again after a reset; and what a checkpoint or an elastic commit records."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from hvdft import dist, outputs
from hvdft.checkpoint import (
    load_state,
    load_weights,
    plain,
    prune,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from hvdft.errors import HvdftError
from hvdft.progress import Progress, Window, own_pending
from hvdft.setup import Setup, cap, enter_world, schedule

log = logging.getLogger("hvdft")


def enter(run: Setup, progress: Progress) -> Window:
    """Collective: the state training (re)starts from, and this rank's log window.

    First entry: afresh or from the checkpoint `--resume` names. In an elastic job this is
    also called after every reset, with `progress` rolled back to the last commit and
    synced from rank 0: the ranks' shares, the learning-rate rule and the plan are redone
    for the ranks that are left (or joined)."""
    rank, world = dist.rank(), dist.size()
    if dist.elastic():
        enter_world(run)
    if not progress.started:
        resume_or_start(run, progress)
        progress.started = True
    else:
        _continue_after_reset(run, progress)
    if dist.elastic():  # this world's learning-rate rule, whichever way the state came
        _apply_lr(run, progress.step)
    run.hooks.entered(progress.step, progress.epoch, world)
    run.window = Window(run.device, own_pending(progress.pending, rank, world))
    return run.window


def resume_or_start(run: Setup, progress: Progress) -> None:
    """`progress` from the checkpoint `--resume` names (rank 0 reads it, every rank
    receives it), or fresh; then rank 0's weights and optimizer state for all."""
    cfg, rank, world = run.cfg, dist.rank(), dist.size()
    _assign(progress, Progress(total_steps=run.total_steps))
    torch.manual_seed(cfg.seed + rank)  # dropout differs per rank, reproducibly
    path = dist.on_main(lambda: resolve_resume(cfg.resume, run.output_dir)) if cfg.resume else None
    if path is not None:
        state = dist.on_main(lambda: _read_checkpoint(path, run))
        _assign(progress, Progress.from_dict(state["progress"]))
        if state["world_size"] != world and (progress.batch_in_epoch or progress.epoch_excluded):
            replan(run, progress, f"written mid-epoch by {state['world_size']} rank(s), resumed on {world}")
        elif progress.total_steps and progress.total_steps != run.total_steps:
            schedule(run, progress.total_steps)  # the plan of an earlier resize
        run.scheduler.load_state_dict(state["scheduler"])
        _apply_lr(run, progress.step)
        run.scaler.load_state_dict(state["scaler"])
        if len(state["rng"]) == world:
            set_rng_state(state["rng"][rank])
        run.resumed_from = path
        if dist.is_main():
            outputs.truncate_metrics_log(run.output_dir / "metrics.jsonl", progress.step)
    progress.total_steps = run.total_steps
    run.hooks.snapshot("before_broadcast", run.model, run.optimizer)
    dist.broadcast_training_state(run.model, run.optimizer)
    run.hooks.snapshot("after_broadcast", run.model, run.optimizer)


def _continue_after_reset(run: Setup, progress: Progress) -> None:
    """Elastic: continue the run rolled back to its last commit on the ranks there are now."""
    replan(run, progress, f"elastic reset ({run.resumed_note or 'the ranks changed'}): continuing on "
                          f"{dist.size()} rank(s) at step {progress.step}, the last commit")
    # Per-rank random streams cannot carry over to another number of ranks: reseed, the
    # same way at the same point of every attempt.
    torch.manual_seed(run.cfg.seed + 7919 * progress.step + dist.rank())
    if dist.is_main():  # steps after the commit were logged, and are done again
        outputs.truncate_metrics_log(run.output_dir / "metrics.jsonl", progress.step)


def _assign(progress: Progress, values: Progress) -> None:
    """Copy a record into `progress` in place (the elastic state holds `progress`)."""
    for f in fields(Progress):
        setattr(progress, f.name, getattr(values, f.name))


def _apply_lr(run: Setup, step: int) -> None:
    """The learning-rate rule of this job (its world size) at `step`, whatever the
    checkpoint's world size was: the schedule restarts from the effective rate."""
    run.scheduler.base_lrs = [run.lr for _ in run.optimizer.param_groups]
    for group, factor in zip(run.optimizer.param_groups, run.scheduler.lr_lambdas, strict=True):
        group["initial_lr"], group["lr"] = run.lr, run.lr * factor(step)


def replan(run: Setup, progress: Progress, why: str) -> None:
    """Collective: training continues on this job's ranks from `progress`, which another
    number of ranks (or an earlier attempt) wrote: the rows of the current epoch not yet
    trained on (`progress.seen`) are re-partitioned over the ranks (strided by example, as
    always) and the plan's remaining steps are counted at this world size.

    Rule: the run still trains `--epochs` epochs of data. Steps done stay done; the rest of
    this epoch (its target share of rows, for a fractional last epoch) is trained at this
    job's global batch, then the remaining whole epochs; `--max-steps` still caps the total.
    """
    cfg, world = run.cfg, dist.size()
    if progress.batch_in_epoch or progress.epoch_excluded:
        progress.epoch_excluded, progress.batch_in_epoch = progress.seen, 0
    seen = {tuple(key) for key in progress.epoch_excluded}
    keep = sum(key not in seen for key in run.row_keys)
    per_rank = max(dist.allgather_object(keep))
    total_rows = sum(dist.allgather_object(len(run.row_keys)))
    batches = math.ceil(max(per_rank, 1) / cfg.batch_size)  # the whole remainder, evened out
    share = cfg.epochs - progress.epoch
    if share < 1:  # the run ends inside this epoch: only its target share of rows
        target = max(0, math.ceil(share * total_rows) - len(seen))
        batches = min(batches, math.ceil(target / (cfg.batch_size * world)))
    later = math.ceil(run.steps_per_epoch * max(0.0, cfg.epochs - progress.epoch - 1))
    schedule(run, cap(cfg, progress.step + math.ceil(batches / cfg.grad_accum) + later))
    progress.total_steps = run.total_steps
    run.resumed_note = (f"{why}: the {total_rows - len(seen)} rows of epoch {progress.epoch} not yet trained on "
                        f"shared out; global batch {cfg.batch_size * world * cfg.grad_accum}, lr {run.lr:g}, "
                        f"{run.total_steps} steps in all")


def _read_checkpoint(folder: Path, run: Setup) -> dict[str, Any]:
    """Rank 0: check the checkpoint belongs to this run, load its weights and optimizer
    state; returns the rest (the optimizer state travels in the initial broadcast)."""
    state, saved = load_state(folder)
    config = saved.get("config", {})
    for key in run.cfg.must_match():
        if config.get(key) != run.cfg.get(key):
            raise HvdftError(
                f"--resume: checkpoint was made with {key}={config.get(key)!r}, this run has {run.cfg.get(key)!r}",
                folder,
            )
    if saved.get("labels") != run.labels:
        raise HvdftError(f"--resume: checkpoint's labels {saved.get('labels')} differ from this data's {run.labels}",
                         folder)
    load_weights(run.model, folder)
    try:
        run.optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as exc:
        raise HvdftError(f"--resume: optimizer state does not fit this model: {exc}".splitlines()[0], folder) from None
    return {**{k: v for k, v in state.items() if k != "optimizer"}, "world_size": saved.get("world_size")}


def epoch_rows_seen(run: Setup, progress: Progress) -> list[list[int]]:
    """Collective: every row of the current epoch trained on so far, over all ranks (the
    rows excluded at its start included), sorted."""
    local = {run.row_keys[r] for batch in run.sampler.batches(progress.epoch)[: progress.batch_in_epoch]
             for r in batch}
    seen = {tuple(key) for key in progress.epoch_excluded}
    for part in dist.allgather_object(sorted(local)):
        seen.update(part)
    return [list(key) for key in sorted(seen)]


def prepare_commit(run: Setup, progress: Progress) -> None:
    """Collective, before a checkpoint or an elastic commit: the rows this epoch trained on
    and every rank's unlogged sums go into `progress`, so that it is complete on its own."""
    progress.seen = epoch_rows_seen(run, progress) if progress.batch_in_epoch or progress.epoch_excluded else []
    window = run.window
    progress.pending = dist.allgather_object(window.sums() if window is not None else [0.0, 0, 0])


def save(run: Setup, progress: Progress) -> None:
    """Collective (every rank's RNG state and unlogged sums are gathered); rank 0 writes
    checkpoints/checkpoint-<step> atomically and prunes old ones."""
    prepare_commit(run, progress)
    rngs = dist.allgather_object(rng_state())
    if not dist.is_main():
        return
    state = {
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": rngs,
        "progress": plain(asdict(progress)),
    }
    root = run.output_dir / "checkpoints"
    save_checkpoint(root / f"checkpoint-{progress.step}", outputs.unwrap(run.model), run.tokenizer, state, run.info)
    prune(root, run.cfg.save_total_limit)


