"""The training loop, shared by every task: `train()` is its outline, read top to bottom.

Phases: start (Horovod, output folder) -> setup (this rank's data shard, tokenizer,
features, model, optimizer, schedule, sampler: one `Setup` record) -> resume or start
afresh (the loop state: one `Progress` record) -> the loop (step, log, evaluate, save) ->
interrupted (checkpoint, exit 130) or finish (best model, test set, outputs).

Horovod appears only through `hvdft.dist`; test hooks only through `hvdft.testhooks`.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from hvdft import dist, optim, outputs
from hvdft.checkpoint import (
    list_checkpoints,
    load_state,
    load_weights,
    plain,
    prune,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from hvdft.config import TrainConfig
from hvdft.data.files import Split
from hvdft.data.prepare import Batch, collate, read_splits, tokenize
from hvdft.data.sampler import DistributedBatchSampler
from hvdft.errors import HvdftError, Interrupted
from hvdft.evaluate import Evaluator, autocast
from hvdft.models import resolve_model
from hvdft.tasks import get_task
from hvdft.tasks.base import Task
from hvdft.testhooks import Hooks

log = logging.getLogger("hvdft")


@dataclass
class Progress:
    """The loop state: exactly what a checkpoint stores and a resume restores."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress
    batch_in_epoch: int = 0  # this epoch's batches each rank has trained on
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
    # A partial epoch: the rows (global example id, window number) already trained on when
    # the epoch's remainder started on another number of ranks; they are left out.
    epoch_excluded: list[list[int]] = field(default_factory=list)
    # At a mid-epoch checkpoint: every row of this epoch trained on so far, all ranks.
    seen: list[list[int]] = field(default_factory=list)
    # Per rank [loss sum, loss terms, tokens] not yet in a log line when the checkpoint was
    # written: each rank continues its own, so a resumed run logs what an uninterrupted one does.
    pending: list[list[float]] = field(default_factory=list)


@dataclass
class Setup:
    """What setup built; the loop reads it, the checkpoint saves its stateful parts."""

    cfg: TrainConfig
    task: Task
    device: torch.device
    splits: dict[str, Split]
    features: dict[str, dict[str, list]]
    labels: list[str]
    tokenizer: Any
    pad_id: int
    model: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    sampler: DistributedBatchSampler
    evaluator: Evaluator
    lr: float  # the effective peak learning rate
    steps_per_epoch: int
    total_steps: int
    info: dict[str, Any]  # the run description saved beside every model (hvdft_run.json)
    hooks: Hooks
    row_keys: list[tuple[int, int]] = field(default_factory=list)  # train row -> (global example id, window)
    resumed_from: Path | None = None
    resumed_note: str = ""  # what a resume on another number of ranks changed
    best_weights: dict[str, torch.Tensor] | None = None  # this process's copy of the best model

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def metric(self) -> str:
        return self.cfg.metric or self.task.default_metric


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


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Fine-tune `cfg.model` on every rank of the job; rank 0 writes the outputs.

    Collective: every rank calls it with the same configuration. Returns the results
    (the all_results.json figures). Raises HvdftError for bad input (on every rank),
    Interrupted after a SIGTERM/SIGINT (a checkpoint has been written).
    """
    start(cfg)
    run = setup(cfg)
    progress, window = resume_or_start(run)
    show_header(run)
    display = outputs.Display(run.total_steps, progress.step)
    metrics = outputs.MetricsLog(run.output_dir / "metrics.jsonl", append=run.resumed_from is not None)
    try:
        with StopSignals() as stop:
            clock = time.perf_counter()
            for micro in step_batches(run, progress):
                run.hooks.before_step(progress.step + 1, stop)
                if not train_step(run, micro, window, stop):
                    interrupted(run, progress, window)
                epoch_done = advance(run, progress, micro)
                progress.train_time += time.perf_counter() - clock
                display.step()
                if progress.step % cfg.log_every == 0 or progress.step == run.total_steps:
                    log_step(run, progress, window, metrics, display)
                if "validation" in run.splits and (progress.step % cfg.eval_every == 0 if cfg.eval_every
                                                   else epoch_done):
                    evaluate_and_keep_best(run, progress, metrics, display)
                if (progress.step % cfg.save_every == 0 if cfg.save_every else epoch_done) or progress.stopped_early:
                    save(run, progress, window)
                if progress.stopped_early:
                    break
                clock = time.perf_counter()
    finally:
        display.close()
        metrics.close()
    return finish(run, progress, window)


# ----------------------------------------------------------------------------- start, setup


def start(cfg: TrainConfig) -> None:
    """Validate the options, start Horovod, check the output folder (rank 0)."""
    cfg.validate()
    dist.init()
    device = dist.device()
    if device.type == "cuda":
        _configure_cuda()
    dist.main_only(lambda: _check_output_dir(Path(cfg.output_dir), bool(cfg.resume), cfg.overwrite_output_dir))


def setup(cfg: TrainConfig) -> Setup:
    """This rank's data shard and features, the model, optimizer, schedule and sampler."""
    from transformers import AutoConfig, AutoTokenizer

    world, device = dist.size(), dist.device()
    task = get_task(cfg.task, cfg.task_options, cfg.encoding)
    splits = read_splits(task, cfg)
    labels = _label_set(task, splits)
    label2id = {label: i for i, label in enumerate(labels)}
    model_path = dist.agree(lambda: resolve_model(cfg.model))
    model_config = dist.agree(lambda: _load(AutoConfig.from_pretrained, model_path, cfg))
    tokenizer = dist.agree(lambda: _tokenizer(AutoTokenizer, model_path, model_config, cfg))
    task.prepare_tokenizer(tokenizer)
    max_length = dist.agree(lambda: _max_length(cfg, model_config, tokenizer, task.default_max_length))
    features = {name: tokenize(task, split, tokenizer, label2id, max_length, cfg.cache_dir)
                for name, split in splits.items()}
    for name, split in splits.items():
        _warn_examples_without_rows(task, split, features[name], max_length)

    torch.manual_seed(cfg.seed)
    _configure_model(model_config, task, labels, cfg.dropout)
    model = dist.agree(lambda: _load(task.build_model, model_path, cfg, config=model_config, tokenizer=tokenizer))
    model.to(device)
    model.train()

    sampler = _sampler(cfg, features["train"], splits["train"])
    steps_per_epoch = math.ceil(len(sampler) / cfg.grad_accum)
    total_steps = _cap(cfg, math.ceil(steps_per_epoch * cfg.epochs))
    lr = optim.effective_lr(cfg.lr, cfg.scale_lr, world, cfg.allreduce_op)
    optimizer = dist.wrap_optimizer(
        optim.adamw(model, lr, cfg.weight_decay, device), model.named_parameters(),
        backward_passes_per_step=cfg.grad_accum, fp16_allreduce=cfg.fp16_allreduce, op=cfg.allreduce_op,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    id2label = dict(enumerate(labels))
    evaluator = Evaluator(task, model, id2label, cfg.batch_size * 2, pad_id, cfg.precision)
    info = {"config": cfg.to_dict(), "labels": labels, "world_size": world, "model_path": model_path}
    run = Setup(cfg, task, device, splits, features, labels, tokenizer, pad_id, model, optimizer, None,
                scaler, sampler, evaluator, lr, steps_per_epoch, total_steps, info, Hooks.from_env(dist.rank()),
                row_keys=_row_keys(features["train"]["example"], splits["train"].ids))
    _schedule(run, total_steps)
    return run


def _cap(cfg: TrainConfig, steps: int) -> int:
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def _schedule(run: Setup, total_steps: int) -> None:
    """The linear warm-up/decay schedule over `total_steps`, on the wrapped optimizer
    (Horovod's wrapper is a new object: a scheduler bound to the inner one never steps)."""
    run.total_steps = total_steps
    warmup = int(run.cfg.warmup_ratio * total_steps)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, optim.linear_schedule(warmup, total_steps))


def _row_keys(examples: list[int], ids: list[int]) -> list[tuple[int, int]]:
    """Each training row's identity on any number of ranks: (global example id, its
    window number within the example)."""
    count: dict[int, int] = {}
    keys = []
    for local in examples:
        k = count.get(local, 0)
        count[local] = k + 1
        keys.append((ids[local], k))
    return keys


def _label_set(task: Task, splits: dict[str, Split]) -> list[str]:
    """The training data's labels over all ranks; unseen dev/test labels are warned about."""
    if not task.has_labels:
        return []
    labels = task.sort_labels(set().union(*dist.allgather_object(task.labels(splits["train"]))))
    label2id = {label: i for i, label in enumerate(labels)}
    for name in ("validation", "test"):
        if name in splits:
            _warn_unseen_labels(task, splits[name], label2id)
    return labels


def _configure_model(model_config: Any, task: Task, labels: list[str], dropout: bool) -> None:
    model_config.hvdft_task = task.name
    if task.has_labels:
        model_config.num_labels = len(labels)
        model_config.id2label = dict(enumerate(labels))
        model_config.label2id = {label: i for i, label in enumerate(labels)}
    if not dropout:
        _no_dropout(model_config)


def _no_dropout(model_config: Any) -> None:
    """Every dropout probability of a config (and of its encoder/decoder parts) to 0."""
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "dropout",
                "attention_dropout", "activation_dropout", "dropout_rate"):
        if hasattr(model_config, key):
            setattr(model_config, key, 0.0)
    for part in ("encoder", "decoder"):
        if hasattr(model_config, part) and hasattr(getattr(model_config, part), "to_dict"):
            _no_dropout(getattr(model_config, part))


def _sampler(cfg: TrainConfig, features: dict[str, list], split: Split) -> DistributedBatchSampler:
    rows = dist.allgather_object(len(features["input_ids"]))
    if min(rows) == 0:  # e.g. the rows of a JSON file a rank owns are all empty
        raise HvdftError(f"rank {rows.index(0)} holds no training example: every rank needs one", split.source,
                         everywhere=True)
    return DistributedBatchSampler(
        features["length"], max(rows), dist.rank(), dist.size(), cfg.batch_size,
        shuffle=cfg.shuffle, group_by_length=cfg.group_by_length, seed=cfg.seed,
    )


# ----------------------------------------------------------------------------- resume


def resume_or_start(run: Setup) -> tuple[Progress, Window]:
    """The loop state from the checkpoint `--resume` names (rank 0 reads it, every rank
    receives it), or a fresh one; then rank 0's weights and optimizer state for all."""
    cfg, rank, world = run.cfg, dist.rank(), dist.size()
    progress = Progress(total_steps=run.total_steps)
    torch.manual_seed(cfg.seed + rank)  # dropout differs per rank, reproducibly
    path = dist.on_main(lambda: resolve_resume(cfg.resume, run.output_dir)) if cfg.resume else None
    if path is not None:
        state = dist.on_main(lambda: _read_checkpoint(path, run))
        known = {f.name for f in fields(Progress)}
        progress = Progress(**{k: v for k, v in state["progress"].items() if k in known})
        if state["world_size"] != world and (progress.batch_in_epoch or progress.epoch_excluded):
            _replan_for_new_world(run, progress, state["world_size"])
        elif progress.total_steps and progress.total_steps != run.total_steps:
            _schedule(run, progress.total_steps)  # the plan of an earlier resize
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
    return progress, Window(run.device, _own_pending(progress.pending, rank, world))


def _apply_lr(run: Setup, step: int) -> None:
    """The learning-rate rule of this job (its world size) at `step`, whatever the
    checkpoint's world size was: the schedule restarts from the effective rate."""
    run.scheduler.base_lrs = [run.lr for _ in run.optimizer.param_groups]
    for group, factor in zip(run.optimizer.param_groups, run.scheduler.lr_lambdas, strict=True):
        group["initial_lr"], group["lr"] = run.lr, run.lr * factor(step)


def _replan_for_new_world(run: Setup, progress: Progress, saved_world: int) -> None:
    """A mid-epoch checkpoint of `saved_world` ranks resumed on this job's: the rows of the
    epoch not yet trained on are re-partitioned over the ranks (strided by example, as
    always) and the plan's remaining steps are counted at this world size.

    Rule: the run still trains `--epochs` epochs of data. Steps done stay done; the rest of
    this epoch (its target share of rows, for a fractional last epoch) is trained at this
    job's global batch, then the remaining whole epochs; `--max-steps` still caps the total.
    """
    cfg, world = run.cfg, dist.size()
    progress.epoch_excluded, progress.batch_in_epoch = progress.seen, 0
    seen = {tuple(key) for key in progress.seen}
    keep = sum(key not in seen for key in run.row_keys)
    per_rank = max(dist.allgather_object(keep))
    total_rows = sum(dist.allgather_object(len(run.row_keys)))
    batches = math.ceil(max(per_rank, 1) / cfg.batch_size)  # the whole remainder, evened out
    share = cfg.epochs - progress.epoch
    if share < 1:  # the run ends inside this epoch: only its target share of rows
        target = max(0, math.ceil(share * total_rows) - len(seen))
        batches = min(batches, math.ceil(target / (cfg.batch_size * world)))
    later = math.ceil(run.steps_per_epoch * max(0.0, cfg.epochs - progress.epoch - 1))
    _schedule(run, _cap(cfg, progress.step + math.ceil(batches / cfg.grad_accum) + later))
    run.resumed_note = (f"written mid-epoch by {saved_world} rank(s), resumed on {world}: the {total_rows - len(seen)} "
                        f"rows of epoch {progress.epoch} not yet trained on re-partitioned; global batch "
                        f"{cfg.batch_size * saved_world * cfg.grad_accum} -> {cfg.batch_size * world * cfg.grad_accum},"
                        f" lr {run.lr:g}, {run.total_steps} steps in all")


def _own_pending(pending: list[list[float]], rank: int, world: int) -> list[float] | None:
    """This rank's unlogged sums from the checkpoint: its own when the world is the same
    size, else rank 0 takes them all (the next log line still counts every one)."""
    if not pending:
        return None
    if len(pending) == world:
        return pending[rank]
    return [sum(p[i] for p in pending) for i in range(3)] if rank == 0 else None


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


def epoch_rows_seen(run: Setup, progress: Progress) -> list[list[int]]:
    """Collective: every row of the current epoch trained on so far, over all ranks (the
    rows excluded at its start included), sorted."""
    local = {run.row_keys[r] for batch in run.sampler.batches(progress.epoch)[: progress.batch_in_epoch]
             for r in batch}
    seen = {tuple(key) for key in progress.epoch_excluded}
    for part in dist.allgather_object(sorted(local)):
        seen.update(part)
    return [list(key) for key in sorted(seen)]


def train_step(run: Setup, micro: list[Batch], window: Window, stop: StopSignals) -> bool:
    """Forward and backward of each micro-batch, then one optimizer step on every rank.

    One tiny allreduce first carries the step's loss-term count, which normalises the
    summed loss exactly as one big batch would, and the stop flag: all ranks stop at the
    same step. Returns False (nothing done) when a stop signal reached any rank.
    """
    local = sum(run.task.target_count(b) for b in micro)
    agreed = dist.allreduce(torch.tensor([float(local), float(stop.raised)]), name="step")
    if agreed[1] > 0:
        return False
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
    run.hooks.after_step(progress.step, progress.epoch, lambda: [[ids[examples[r]] for r in b.rows] for b in micro])
    if progress.batch_in_epoch < len(run.sampler):
        return False
    progress.epoch, progress.batch_in_epoch, progress.epoch_excluded = progress.epoch + 1, 0, []
    return True


def log_step(run: Setup, progress: Progress, window: Window, metrics: outputs.MetricsLog,
             display: outputs.Display) -> None:
    """Collective: one metrics.jsonl line with the mean loss over all ranks since the last."""
    now = time.perf_counter()
    totals = window.totals()
    elapsed, window.since = now - window.since, now
    record = {
        "step": progress.step,
        "epoch": round(progress.epoch + progress.batch_in_epoch / len(run.sampler), 4),
        "loss": float(totals[0] / max(float(totals[1]), 1.0)),
        "lr": run.scheduler.get_last_lr()[0],
        "grad_norm": float(window.grad_norm) if window.grad_norm is not None else None,
        "tokens_per_second": float(totals[2]) / max(elapsed, 1e-9),
    }
    progress.train_loss_sum += float(totals[0])
    progress.train_targets += float(totals[1])
    progress.tokens += float(totals[2])
    metrics.write(record)
    display.logged(record)


def evaluate_and_keep_best(run: Setup, progress: Progress, metrics: outputs.MetricsLog,
                           display: outputs.Display) -> None:
    """Collective: evaluate the validation set; keep the model if it is the best so far."""
    evaluation = run.evaluator(run.splits["validation"], run.features["validation"])
    score = evaluation.metrics[run.metric]
    entry = {"step": progress.step, **{f"eval_{k}": v for k, v in evaluation.metrics.items()}}
    progress.history.append(entry)
    metrics.write(entry)
    display.note(f"step {progress.step}: eval {run.metric} {score:.4f}, loss {evaluation.metrics['loss']:.4f}")
    if progress.best_metric is None or score > progress.best_metric:
        progress.best_metric, progress.best_step, progress.bad_evals = score, progress.step, 0
        run.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}
        if dist.is_main():
            outputs.save_model(run.output_dir / "checkpoints" / "best", run.model, run.tokenizer, run.info)
        return
    progress.bad_evals += 1
    patience = run.cfg.early_stopping_patience
    if patience and progress.bad_evals >= patience:
        display.note(f"early stopping: no {run.metric} gain in {progress.bad_evals} evaluations")
        progress.stopped_early = True


def save(run: Setup, progress: Progress, window: Window) -> None:
    """Collective (every rank's RNG state and unlogged sums are gathered); rank 0 writes
    checkpoints/checkpoint-<step> atomically and prunes old ones."""
    gathered = dist.allgather_object((rng_state(), window.sums()))
    progress.seen = epoch_rows_seen(run, progress) if progress.batch_in_epoch else []
    if not dist.is_main():
        return
    progress.pending = [sums for _, sums in gathered]
    state = {
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": [rng for rng, _ in gathered],
        "progress": plain(asdict(progress)),
    }
    root = run.output_dir / "checkpoints"
    save_checkpoint(root / f"checkpoint-{progress.step}", outputs.unwrap(run.model), run.tokenizer, state, run.info)
    prune(root, run.cfg.save_total_limit)


def interrupted(run: Setup, progress: Progress, window: Window) -> None:
    """A stop signal reached some rank: checkpoint where the loop stands, then stop."""
    save(run, progress, window)
    # Nobody exits before rank 0 has written it: a launcher that sees one rank exit kills
    # the others, rank 0 included (mpirun 1 s later, horovodrun 5 s).
    dist.barrier()
    raise Interrupted(f"interrupted by a signal at step {progress.step}; checkpoint written, continue with --resume")


# ----------------------------------------------------------------------------- finish


def finish(run: Setup, progress: Progress, window: Window) -> dict[str, Any]:
    """Collective: the best model back in place, the validation and test reports, and
    rank 0's outputs. Returns the results."""
    totals = window.totals()  # what no log line counted (early stopping)
    progress.train_loss_sum += float(totals[0])
    progress.train_targets += float(totals[1])
    progress.tokens += float(totals[2])
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
    dist.barrier()
    return results


def _restore_best(run: Setup, progress: Progress) -> None:
    if run.best_weights is not None:
        run.model.load_state_dict(run.best_weights)
    elif progress.best_metric is not None and run.resumed_from is not None:
        # The best model predates the resume: rank 0 reloads it from disk for everyone.
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
        "epoch": round(progress.epoch + progress.batch_in_epoch / len(run.sampler), 4),
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


def show_header(run: Setup) -> None:
    cfg, world = run.cfg, dist.size()
    sizes = ", ".join(f"{k} {v.total}" for k, v in run.splits.items())
    if run.lr == cfg.lr:
        rate = "as given" if cfg.allreduce_op == "average" else "not scaled: adasum"
    else:
        rate = f"{cfg.lr:g} scaled {cfg.scale_lr} for {world} ranks"
    lines = [
        f"hvdft train {run.task.name}: {cfg.model} on {world} rank(s) [{dist.controller()}], device {run.device.type}",
        f"  data: {sizes} (examples; each rank reads and tokenizes its own shard)",
        f"  batch: {cfg.batch_size} per rank x {world} ranks x {cfg.grad_accum} accumulation "
        f"= {cfg.batch_size * world * cfg.grad_accum} global",
        f"  lr {run.lr:g} ({rate}), {run.steps_per_epoch} steps/epoch, {run.total_steps} steps, "
        f"precision {cfg.precision}, allreduce {cfg.allreduce_op}{' fp16' if cfg.fp16_allreduce else ''}",
        *(f"  {line}" for line in run.task.describe(run.model)),
    ]
    if run.resumed_from:
        lines.append(f"  resumed from {run.resumed_from}")
    if run.resumed_note:
        lines.append(f"  {run.resumed_note}")
    outputs.header(lines)


class StopSignals:
    """SIGTERM/SIGINT set a flag; the loop stops at the next step boundary on all ranks.

    A context manager: the handlers stay installed until the block ends, so a repeated
    SIGTERM cannot kill a rank while it writes the interrupt checkpoint.
    """

    def __init__(self) -> None:
        self.raised = False
        self.first: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        # Repeated SIGTERMs are one request: Slurm signals every process of the step and
        # mpirun forwards its own, so a rank often gets two. Ctrl-C twice means "now".
        if self.raised and signum == signal.SIGINT and self.first == signal.SIGINT:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        if not self.raised:
            self.raised, self.first = True, signum

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _configure_cuda() -> None:
    """cuDNN's attention backend builds a plan per new sequence length: with dynamic
    padding it ran 5x slower on an H200 than the flash/memory-efficient kernels. Off
    unless HVDFT_CUDNN_SDPA=1. TF32 matmuls for fp32 runs."""
    if os.environ.get("HVDFT_CUDNN_SDPA", "0") != "1":
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def _check_output_dir(output_dir: Path, resuming: bool = False, overwrite: bool = False) -> None:
    """Rank 0: the folder is writable, and holds no other run's checkpoints (which pruning
    and --resume, going by step number, would mix with this run's)."""
    if not dist.is_main():
        return
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise HvdftError(f"output directory is not writable: {exc.strerror}", output_dir) from None
    if overwrite and not resuming:
        shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    if not resuming and list_checkpoints(output_dir / "checkpoints"):
        raise HvdftError("holds checkpoints of an earlier run: continue it with --resume, "
                         "give another --output-dir, or --overwrite-output-dir", output_dir)


def _warn_unseen_labels(task: Task, split: Split, label2id: dict[str, int]) -> None:
    counts: dict[str, int] = {}
    for part in dist.allgather_object(task.unseen_labels(split, label2id)):
        for label, n in part.items():
            counts[label] = counts.get(label, 0) + n
    if counts and dist.is_main():
        listed = ", ".join(f"{k} ({v}x)" for k, v in sorted(counts.items()))
        log.warning(
            "%s: labels never seen in training: %s. They stay in the gold standard and are "
            "scored (the model cannot predict them), so they lower recall.", split.source, listed,
        )


def _warn_examples_without_rows(task: Task, split: Split, features: dict[str, list], max_length: int) -> None:
    """Collective: examples that featurizing turned into no model input (a task may drop
    what cannot fit, e.g. relation arguments further apart than --max-length) are counted
    over all ranks and named once, never dropped silently."""
    present = set(features["example"])
    missing = [i for i in range(len(split.examples)) if i not in present]
    first = (split.ids[missing[0]], split.examples[missing[0]]) if missing else None
    parts = dist.allgather_object((len(missing), first))
    count = sum(n for n, _ in parts)
    if count and dist.is_main():
        example = min((f for _, f in parts if f is not None), key=lambda f: f[0])[1]
        log.warning("%s", task.describe_missing(split, count, example, max_length))


def _load(loader: Any, path: str, cfg: TrainConfig, **kwargs: Any) -> Any:
    try:
        return loader(path, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        raise HvdftError(f"cannot load model '{path}': {exc}".splitlines()[0]) from None


def _tokenizer(auto: Any, path: str, model_config: Any, cfg: TrainConfig) -> Any:
    kwargs: dict[str, Any] = {"use_fast": True}
    if getattr(model_config, "model_type", "") in ("roberta", "gpt2", "longformer", "bart", "deberta"):
        kwargs["add_prefix_space"] = True  # needed for pre-split words
    tokenizer = _load(auto.from_pretrained, path, cfg, **kwargs)
    if not getattr(tokenizer, "is_fast", False):
        raise HvdftError(f"model '{cfg.model}' has no fast tokenizer: word alignment needs one")
    return tokenizer


def _max_length(cfg: TrainConfig, model_config: Any, tokenizer: Any, task_default: int | None = None) -> int:
    """--max-length, checked against the model's limit; by default the task's own length
    (e.g. 384 for QA windows) or the model's limit, whichever is smaller."""
    limit = getattr(model_config, "max_position_embeddings", None) or 512
    if getattr(model_config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limit -= 2  # position ids start after the padding index
    tok_limit = getattr(tokenizer, "model_max_length", limit)
    if tok_limit and tok_limit < 100_000:
        limit = min(limit, tok_limit)
    if cfg.max_length is None:
        return min(limit, task_default) if task_default else limit
    if cfg.max_length > limit:
        raise HvdftError(f"--max-length {cfg.max_length} is over the model's limit of {limit} tokens")
    return cfg.max_length
