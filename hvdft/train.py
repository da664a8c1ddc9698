"""The training loop, shared by every task: `train()` is its outline, read top to bottom.

Phases: start (Horovod, output folder) -> setup (data shard, tokenizer, features, model,
optimizer, schedule, sampler: one `Setup` record, hvdft.setup) -> enter (afresh, from a
checkpoint, or after an elastic reset: one `Progress` record, hvdft.resume) -> the loop
(step, log, evaluate, save; commits in an elastic job) -> interrupted (checkpoint, exit
130) or finish (best model, test set, outputs).

Horovod appears only through `hvdft.dist`; test hooks only through `hvdft.testhooks`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch

from hvdft import dist, outputs, tracking
from hvdft.checkpoint import load_weights
from hvdft.config import TrainConfig
from hvdft.data.prepare import Batch, collate
from hvdft.errors import Interrupted
from hvdft.evaluate import autocast
from hvdft.progress import Progress, Window
from hvdft.resume import enter, prepare_commit, save
from hvdft.setup import Setup, during_training, setup, start

log = logging.getLogger("hvdft")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Fine-tune `cfg.model` on every rank of the job; rank 0 writes the outputs.

    Collective: every rank calls it with the same configuration. Returns the results
    (the all_results.json figures). Raises HvdftError for bad input (on every rank),
    Interrupted after a SIGTERM/SIGINT (a checkpoint has been written). Under elastic
    Horovod, training restarts from the last commit after every change of the ranks.
    """
    start(cfg)
    run = setup(cfg)
    progress = Progress()
    state = dist.elastic_state(run, progress, lambda: prepare_commit(run, progress)) if dist.elastic() else None
    return dist.run(lambda: fine_tune(run, progress, state), state, on_reset=lambda why, s: _note_reset(run, why, s))


def fine_tune(run: Setup, progress: Progress, state: Any) -> dict[str, Any]:
    """From where `progress` stands to the outputs: the loop, then finish."""
    cfg = run.cfg
    window = enter(run, progress)
    commit(state)
    show_header(run, progress)
    display = outputs.Display(run.total_steps, progress.step)
    resumed = progress.step > 0 or bool(run.resumed_from)
    if run.trackers is not None:  # an elastic re-entry: rank 0 may be another process now
        run.trackers.close()
    run.trackers = tracking.Trackers.start(cfg.report_to, run.output_dir, run.info, progress.step if resumed else None)
    metrics = outputs.MetricsLog(run.output_dir / "metrics.jsonl", append=resumed, trackers=run.trackers)
    try:
        with Requests(cfg.save_every_minutes) as requests:
            clock = time.perf_counter()
            for micro in step_batches(run, progress):
                run.hooks.before_step(progress.step + 1, requests)
                if not train_step(run, micro, window, requests):
                    interrupted(run, progress)
                epoch_done = advance(run, progress, micro)
                progress.train_time += time.perf_counter() - clock
                display.step()
                if progress.step % cfg.log_every == 0 or progress.step == run.total_steps:
                    log_step(run, progress, window, metrics, display)
                evaluate_now = "validation" in run.splits and _due(progress.step, cfg.eval_every, epoch_done)
                save_now = _due(progress.step, cfg.save_every, epoch_done) or requests.checkpoint
                if evaluate_now or save_now or epoch_done or progress.step % cfg.commit_every == 0:
                    commit(state)  # an elastic reset never goes back past an evaluation or checkpoint
                if evaluate_now:
                    evaluate_and_keep_best(run, progress, metrics, display)
                if save_now or progress.stopped_early:
                    save(run, progress)
                    requests.saved()
                if progress.stopped_early:
                    break
                clock = time.perf_counter()
    finally:
        display.close()
        metrics.close()
    commit(state)
    return finish(run, progress, window)


def epoch_position(run: Setup, progress: Progress) -> float:
    """Epochs done, fractional (the `epoch` of metrics.jsonl and the results): the rows of
    this epoch trained on, over its rows, counting those done before a resize."""
    before = min(len(progress.epoch_excluded), run.total_rows)
    done = before + (run.total_rows - before) * progress.batch_in_epoch / max(len(run.sampler), 1)
    return round(progress.epoch + done / max(run.total_rows, 1), 4)


def _due(step: int, every: int, epoch_done: bool) -> bool:
    """Every `every` steps, or at the end of each epoch when `every` is 0."""
    return step % every == 0 if every else epoch_done


def commit(state: Any) -> None:
    """Collective in an elastic job: the restore point of a reset (nothing otherwise)."""
    if state is not None:
        state.commit()


def _note_reset(run: Setup, why: str, seconds: float) -> None:
    run.resumed_note = f"{why}, {seconds:.1f} s"
    if dist.is_main():
        print(f"hvdft: elastic reset: {why}; {dist.size()} rank(s) now ({seconds:.1f} s)", flush=True)


# ----------------------------------------------------------------------------- the loop


def step_batches(run: Setup, progress: Progress) -> Iterator[list[Batch]]:
    """The micro-batches of each optimizer step, from where `progress` stands to the last
    step; a new epoch starts when `advance` has moved `progress` into it."""
    while progress.step < run.total_steps:
        epoch = progress.epoch
        _select_epoch(run, progress)
        batches = iter(run.sampler)
        while progress.step < run.total_steps and progress.epoch == epoch:
            rows = list(islice(batches, run.cfg.grad_accum))
            if not rows:  # the sampler ran out before `advance` saw the epoch end
                progress.epoch, progress.batch_in_epoch = epoch + 1, 0
                break
            yield [collate(run.features["train"], r, run.pad_id, run.cfg.pad_to_multiple_of,
                           run.task.model_inputs, run.task.targets) for r in rows]


def _select_epoch(run: Setup, progress: Progress) -> None:
    """Point the sampler at the epoch in progress: all of it, or (after a resume on
    another number of ranks) the rows its earlier part did not train on."""
    if not progress.epoch_excluded:
        run.sampler.set_epoch(progress.epoch, progress.batch_in_epoch)
        return
    excluded = {tuple(key) for key in progress.epoch_excluded}
    keep = [r for r, key in enumerate(run.row_keys) if key not in excluded]
    per_rank = max(dist.allgather_object(len(keep)))
    run.sampler.set_epoch(progress.epoch, progress.batch_in_epoch, keep, max(per_rank, 1))


def train_step(run: Setup, micro: list[Batch], window: Window, requests: Requests) -> bool:
    """Forward and backward of each micro-batch, then one optimizer step on every rank.

    One tiny allreduce first carries the step's loss-term count, which normalises the
    summed loss exactly as one big batch would, and the requests: a stop signal that
    reached some rank, a timed checkpoint due on rank 0's clock. All ranks see them at the
    same step. Returns False (nothing done) when a stop was requested.
    """
    local = sum(run.task.target_count(b) for b in micro)
    flags = [float(local), float(requests.raised), float(requests.checkpoint_due())]
    agreed = dist.allreduce(torch.tensor(flags), name="step")
    if agreed[1] > 0:
        return False
    requests.checkpoint = bool(agreed[2] > 0)
    average = run.cfg.allreduce_op == "average"
    denom = max(float(agreed[0]) / dist.size() if average else float(local), 1.0)
    for batch in micro:
        batch = batch.to(run.device)
        with autocast(run.device, run.cfg.precision):
            loss_sum, _ = run.task.loss(run.model, batch)
        run.scaler.scale(loss_sum / denom).backward()
        window.loss += loss_sum.detach()
        window.tokens += batch.real_tokens
    window.targets += local
    window.grad_norm = dist.optimizer_step(run.optimizer, run.model, run.scaler, run.cfg.max_grad_norm)
    run.scheduler.step()
    return True


def advance(run: Setup, progress: Progress, micro: list[Batch]) -> bool:
    """Count a finished step; True when it ended the epoch (progress moves to the next)."""
    progress.step += 1
    progress.batch_in_epoch += len(micro)
    ids = run.splits["train"].ids
    examples = run.features["train"]["example"]
    run.hooks.after_step(progress.step, progress.epoch, lambda: [[ids[examples[r]] for r in b.rows] for b in micro],
                         lambda: [list(b.inputs["input_ids"].shape) for b in micro])
    if progress.batch_in_epoch < len(run.sampler):
        return False
    progress.epoch, progress.batch_in_epoch, progress.epoch_excluded = progress.epoch + 1, 0, []
    return True


def log_step(run: Setup, progress: Progress, window: Window, metrics: outputs.MetricsLog,
             display: outputs.Display) -> None:
    """Collective: one metrics.jsonl line with the mean loss over all ranks since the last."""
    now = time.perf_counter()
    totals = window.fold_into(progress)
    elapsed, window.since = now - window.since, now
    record = {
        "step": progress.step,
        "epoch": epoch_position(run, progress),
        "loss": float(totals[0] / max(float(totals[1]), 1.0)),
        "lr": run.scheduler.get_last_lr()[0],
        "grad_norm": float(window.grad_norm) if window.grad_norm is not None else None,
        "tokens_per_second": float(totals[2]) / max(elapsed, 1e-9),
    }
    metrics.write(record)
    display.logged(record)


def evaluate_and_keep_best(run: Setup, progress: Progress, metrics: outputs.MetricsLog,
                           display: outputs.Display) -> None:
    """Collective: evaluate the validation set; keep the model if it is the best so far."""
    evaluation = run.evaluator(*during_training(run))
    score = evaluation.metrics[run.metric]
    entry = {"step": progress.step, **{f"eval_{k}": v for k, v in evaluation.metrics.items()}}
    progress.history.append(entry)
    metrics.write(entry)
    display.note(f"step {progress.step}: eval {run.metric} {score:.4f}, loss {evaluation.metrics['loss']:.4f}")
    if progress.best_metric is None or score > progress.best_metric:
        progress.best_metric, progress.best_step, progress.bad_evals = score, progress.step, 0
        if not dist.elastic():  # elastic: rank 0 may change, the copy on disk is the one all share
            run.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}
        if dist.is_main():
            outputs.save_model(run.output_dir / "checkpoints" / "best", run.model, run.tokenizer, run.info)
        return
    progress.bad_evals += 1
    patience = run.cfg.early_stopping_patience
    if patience and progress.bad_evals >= patience:
        display.note(f"early stopping: no {run.metric} gain in {progress.bad_evals} evaluations")
        progress.stopped_early = True


def interrupted(run: Setup, progress: Progress) -> None:
    """A stop signal reached some rank: checkpoint where the loop stands, then stop."""
    save(run, progress)
    # Nobody exits before rank 0 has written it: a launcher that sees one rank exit kills
    # the others, rank 0 included (mpirun 1 s later, horovodrun 5 s).
    dist.barrier()
    raise Interrupted(f"interrupted by a signal at step {progress.step}; checkpoint written, continue with --resume")


# ----------------------------------------------------------------------------- finish


def finish(run: Setup, progress: Progress, window: Window) -> dict[str, Any]:
    """Collective: the best model back in place, the validation and test reports, and
    rank 0's outputs. Returns the results."""
    window.fold_into(progress)  # what no log line counted (early stopping)
    run.hooks.snapshot("end", run.model, run.optimizer)
    _restore_best(run, progress)
    results = _results(run, progress)
    reports = {}
    for name, prefix in (("validation", "eval"), ("test", "test")):
        if name in run.splits:
            reports[prefix] = run.evaluator(run.splits[name], run.features[name])
            results.update({f"{prefix}_{k}": v for k, v in reports[prefix].metrics.items()})
    if dist.is_main():
        outputs.write_outputs(run.output_dir, run.task, run.model, run.tokenizer, results, reports, run.info)
        run.trackers.finish(results, progress.step)
    dist.barrier()
    return results


def _restore_best(run: Setup, progress: Progress) -> None:
    if run.best_weights is not None:
        run.model.load_state_dict(run.best_weights)
    elif progress.best_metric is not None and (run.resumed_from is not None or dist.elastic()):
        # The best model predates the resume (or lives on disk only, elastic): rank 0
        # reloads it from disk for everyone.
        dist.main_only(lambda: load_weights(run.model, run.output_dir / "checkpoints" / "best"))
        dist.broadcast_parameters(run.model)


def _results(run: Setup, progress: Progress) -> dict[str, Any]:
    cfg, world = run.cfg, dist.size()
    return {
        "train_runtime": progress.train_time,
        "train_samples": run.splits["train"].total,
        "train_steps": progress.step,
        "train_loss": progress.train_loss_sum / max(progress.train_targets, 1.0),
        "train_tokens": progress.tokens,
        "train_tokens_per_second": progress.tokens / max(progress.train_time, 1e-9),
        "epoch": epoch_position(run, progress),
        "world_size": world,
        "per_rank_batch_size": cfg.batch_size,
        "global_batch_size": cfg.batch_size * world * cfg.grad_accum,
        "learning_rate": run.lr,
        "precision": cfg.precision,
        "best_eval_metric": progress.best_metric,
        "best_step": progress.best_step,
        "stopped_early": progress.stopped_early,
    }


# ----------------------------------------------------------------------------- helpers


def show_header(run: Setup, progress: Progress) -> None:
    cfg, world = run.cfg, dist.size()
    sizes = ", ".join(f"{k} {v.total}" for k, v in run.splits.items())
    if run.lr == cfg.lr:
        rate = "as given" if cfg.allreduce_op == "average" else "not scaled: adasum"
    else:
        rate = f"{cfg.lr:g} scaled {cfg.scale_lr} for {world} ranks"
    lines = [
        f"hvdft train {run.task.name}: {cfg.model} on {world} rank(s) [{dist.controller()}], device {run.device.type}",
        f"  data: {sizes} (examples; " + ("every rank holds all, elastic)" if dist.elastic()
                                         else "each rank reads and tokenizes its own shard)"),
        f"  batch: {cfg.batch_size} per rank x {world} ranks x {cfg.grad_accum} accumulation "
        f"= {cfg.batch_size * world * cfg.grad_accum} global",
        f"  lr {run.lr:g} ({rate}), {run.steps_per_epoch} steps/epoch, {run.total_steps} steps, "
        f"precision {cfg.precision}, allreduce {cfg.allreduce_op}{' fp16' if cfg.fp16_allreduce else ''}",
        *(f"  {line}" for line in run.task.describe(run.model)),
    ]
    validation = run.splits.get("validation")
    if validation is not None and cfg.max_eval_samples and cfg.max_eval_samples < validation.total:
        lines.append(f"  evaluation during training: the first {cfg.max_eval_samples} of {validation.total} "
                     "validation examples (--max-eval-samples); the best model's final report: all of them")
    if run.resumed_from:
        lines.append(f"  resumed from {run.resumed_from}")
    if run.resumed_note:
        lines.append(f"  {run.resumed_note}")
    outputs.header(lines)


class Requests:
    """What the outside asks of the loop, answered at the next step boundary on all ranks:
    stop (SIGTERM/SIGINT set a flag), or write a checkpoint (--save-every-minutes, on
    rank 0's clock). Both travel in the step's allreduce.

    A context manager for the signal handlers: they stay installed until the block ends,
    so a repeated SIGTERM cannot kill a rank while it writes the interrupt checkpoint.
    """

    def __init__(self, save_every_minutes: float = 0.0) -> None:
        self.raised = False
        self.first: int | None = None
        self.checkpoint = False  # agreed for the current step
        self._interval = save_every_minutes * 60
        self._last_save = time.monotonic()
        self._previous: dict[int, Any] = {}

    def checkpoint_due(self) -> bool:
        return bool(self._interval) and dist.is_main() and time.monotonic() - self._last_save >= self._interval

    def saved(self) -> None:
        self._last_save, self.checkpoint = time.monotonic(), False

    def _handle(self, signum: int, frame: Any) -> None:
        # Repeated SIGTERMs are one request: Slurm signals every process of the step and
        # mpirun forwards its own, so a rank often gets two. Ctrl-C twice means "now".
        if self.raised and signum == signal.SIGINT and self.first == signal.SIGINT:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        if not self.raised:
            self.raised, self.first = True, signum

    def __enter__(self) -> Requests:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


