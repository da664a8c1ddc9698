"""Setup: from the options to everything the loop needs, in one `Setup` record.

Each rank reads and tokenizes its own shard of the data, builds the model, the wrapped
optimizer, the schedule and the sampler. In an elastic job no collective may run before
training, so every rank sets up from the whole data instead (collectives made local) and
takes its share at every (re)entry into training (`enter_world`).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hvdft import dist, optim, tracking
from hvdft.checkpoint import list_checkpoints
from hvdft.config import TrainConfig
from hvdft.continual import Prior
from hvdft.data.files import Shard, Split
from hvdft.data.prepare import read_splits, tokenize
from hvdft.data.sampler import DistributedBatchSampler
from hvdft.errors import HvdftError
from hvdft.evaluate import Evaluator
from hvdft.models import resolve_model
from hvdft.progress import Window
from hvdft.tasks import get_task
from hvdft.tasks.base import Task
from hvdft.testhooks import Hooks

log = logging.getLogger("hvdft")


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
    total_rows: int = 0  # training rows of all ranks (windows of long examples count apart)
    row_keys: list[tuple[int, int]] = field(default_factory=list)  # train row -> (global example id, window)
    resumed_from: Path | None = None
    resumed_note: str = ""  # what a resume on another number of ranks changed
    whole: tuple[dict[str, Split], dict[str, dict[str, list]]] | None = None  # elastic: every rank's data
    window: Window | None = None  # this rank's sums since the last log line (elastic commits save them)
    best_weights: dict[str, torch.Tensor] | None = None  # this process's copy of the best model
    trackers: tracking.Trackers | None = None  # --report-to (rank 0), opened at every entry into training

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def metric(self) -> str:
        return self.cfg.metric or self.task.default_metric


def start(cfg: TrainConfig) -> None:
    """Validate the options, start Horovod, check the output folder (rank 0)."""
    cfg.validate()
    dist.init(timeline=cfg.horovod_timeline)
    device = dist.device()
    if device.type == "cuda":
        _configure_cuda()
    output_dir, resuming = Path(cfg.output_dir), bool(cfg.resume)
    if dist.elastic():  # no collective before training: each rank checks (the folder must be shared)
        _check_output_dir(output_dir, resuming, cfg.overwrite_output_dir, act=dist.is_main())
    else:
        dist.main_only(lambda: _check_output_dir(output_dir, resuming, cfg.overwrite_output_dir))


def setup(cfg: TrainConfig) -> Setup:
    """This rank's data shard and features, the model, optimizer, schedule and sampler.

    Collective, except in an elastic job: there every rank reads the whole data with
    collectives made local (they would agree on what each rank holds anyway), and takes
    its shard in `enter_world`.
    """
    if not dist.elastic():
        return _setup(cfg, Shard(dist.rank(), dist.size()))
    with dist.local_collectives():
        run = _setup(cfg, Shard(0, 1), with_sampler=False)
    run.whole = (run.splits, run.features)
    return run


def _setup(cfg: TrainConfig, shard: Shard, with_sampler: bool = True) -> Setup:
    from transformers import AutoConfig, AutoTokenizer

    world, device = dist.size(), dist.device()
    task = get_task(cfg.task, cfg.task_options, cfg.encoding)
    prior = dist.agree(lambda: Prior.read(cfg.init_from, task)) if cfg.init_from else None  # --init-from
    model_path = prior.path if prior else dist.agree(lambda: resolve_model(cfg.model))
    model_config = dist.agree(lambda: _load(AutoConfig.from_pretrained, model_path, cfg))
    tokenizer = dist.agree(lambda: _tokenizer(AutoTokenizer, model_path, model_config, cfg, task.needs_fast_tokenizer))
    max_length = dist.agree(lambda: _max_length(cfg, model_config, tokenizer, task.default_max_length))
    dist.agree(lambda: task.prepare(model_config, tokenizer, max_length))
    splits = read_splits(task, cfg, shard)
    labels = _label_set(task, splits, prior)
    label2id = {label: i for i, label in enumerate(labels)}
    features = {name: tokenize(task, split, tokenizer, label2id, max_length, cfg.cache_dir)
                for name, split in splits.items()}
    for name, split in splits.items():
        _warn_examples_without_rows(task, split, features[name], max_length)
        report_counts(task, split, features[name], max_length)

    torch.manual_seed(cfg.seed)
    _configure_model(model_config, task, labels, cfg.dropout)
    build = prior.build if prior else task.build_model
    model = dist.agree(lambda: _load(build, model_path, cfg, config=model_config, tokenizer=tokenizer))
    model.to(device)
    model.train()
    if cfg.compile:  # in place: parameter names, checkpoints and the Horovod hooks stay as they are
        model.compile(dynamic=True)

    lr = optim.effective_lr(cfg.lr, cfg.scale_lr, world, cfg.allreduce_op)
    optimizer = dist.wrap_optimizer(
        optim.build_optimizer(cfg.optimizer, model, lr, cfg.weight_decay, device, cfg.momentum),
        model.named_parameters(),
        backward_passes_per_step=cfg.grad_accum, fp16_allreduce=cfg.fp16_allreduce, op=cfg.allreduce_op,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    evaluator = Evaluator(task, model, dict(enumerate(labels)), cfg.eval_batch_size or cfg.batch_size * 2, pad_id,
                          cfg.precision)
    info = {"config": cfg.to_dict(), "labels": labels, "world_size": world, "model_path": model_path}
    run = Setup(cfg, task, device, splits, features, labels, tokenizer, pad_id, model, optimizer, None,
                scaler, None, evaluator, lr, 0, 0, info, Hooks.from_env(dist.rank()))
    if with_sampler:
        _plan(run)
    else:  # an elastic job: the schedule exists from the start (its state is committed), planned at entry
        schedule(run, 1)
    return run


def _plan(run: Setup) -> None:
    """This rank's rows, the sampler over them and the run's step plan and schedule."""
    cfg = run.cfg
    run.row_keys = _row_keys(run.features["train"]["example"], run.splits["train"].ids)
    run.sampler, run.total_rows = _sampler(cfg, run.features["train"], run.splits["train"])
    run.steps_per_epoch = math.ceil(len(run.sampler) / cfg.grad_accum)
    schedule(run, cap(cfg, math.ceil(run.steps_per_epoch * cfg.epochs)))


def enter_world(run: Setup) -> None:
    """Collective (elastic jobs, at every entry into training): this rank's share of the
    whole data for the current ranks, its sampler, the learning-rate rule and the plan for
    a fresh run at this size (the caller replans a run in progress)."""
    assert run.whole is not None
    shard = Shard(dist.rank(), dist.size())
    splits, features = run.whole
    views = {name: shard_view(split, features[name], shard) for name, split in splits.items()}
    run.splits = {name: view[0] for name, view in views.items()}
    run.features = {name: view[1] for name, view in views.items()}
    run.lr = optim.effective_lr(run.cfg.lr, run.cfg.scale_lr, dist.size(), run.cfg.allreduce_op)
    run.info["world_size"] = dist.size()
    _plan(run)


def shard_view(split: Split, features: dict[str, list], shard: Shard) -> tuple[Split, dict[str, list]]:
    """The part of a whole split (and of its feature rows) that `shard` owns, numbered as
    if this rank had read only its shard."""
    return _view(split, features, shard.owns, split.total)


def during_training(run: Setup) -> tuple[Split, dict[str, list]]:
    """This rank's part of the validation set evaluated during training: the examples
    numbered below --max-eval-samples (all of them without it)."""
    split, features = run.splits["validation"], run.features["validation"]
    limit = run.cfg.max_eval_samples
    if not limit or limit >= split.total:
        return split, features
    return _view(split, features, lambda gid: gid < limit, limit)


def _view(split: Split, features: dict[str, list], keep: Callable[[int], bool],
          total: int) -> tuple[Split, dict[str, list]]:
    """The examples of `split` whose global number `keep` accepts, with their feature rows,
    renumbered in order (`total`: the whole view's size over all ranks)."""
    own = [i for i, gid in enumerate(split.ids) if keep(gid)]
    local = {old: new for new, old in enumerate(own)}
    part = Split(split.name, split.source, total, [split.ids[i] for i in own], [split.examples[i] for i in own])
    rows = [r for r, example in enumerate(features["example"]) if example in local]
    view = {key: [column[r] for r in rows] for key, column in features.items()}
    view["example"] = [local[features["example"][r]] for r in rows]
    return part, view


def cap(cfg: TrainConfig, steps: int) -> int:
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def schedule(run: Setup, total_steps: int) -> None:
    """The linear warm-up/decay schedule over `total_steps`, on the wrapped optimizer
    (Horovod's wrapper is a new object: a scheduler bound to the inner one never steps)."""
    run.total_steps = total_steps
    warmup = int(run.cfg.warmup_ratio * total_steps)
    previous = run.scheduler
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, optim.linear_schedule(warmup, total_steps))
    if previous is not None:  # a new plan, at the same position (the caller sets the rates)
        run.scheduler.load_state_dict(previous.state_dict())


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


def _label_set(task: Task, splits: dict[str, Split], prior: Prior | None = None) -> list[str]:
    """The training data's labels over all ranks (after an --init-from model's own, which
    keep their ids); unseen dev/test labels are warned about."""
    if not task.has_labels:
        return []
    labels = task.sort_labels(set().union(*dist.allgather_object(task.labels(splits["train"]))))
    labels = dist.agree(lambda: prior.extend(labels)) if prior else labels
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


def _sampler(cfg: TrainConfig, features: dict[str, list], split: Split) -> tuple[DistributedBatchSampler, int]:
    """This rank's batch sampler, and the training rows of all ranks."""
    rows = dist.allgather_object(len(features["input_ids"]))
    if min(rows) == 0:  # e.g. the rows of a JSON file a rank owns are all empty
        raise HvdftError(f"rank {rows.index(0)} holds no training example: every rank needs one", split.source,
                         everywhere=True)
    sampler = DistributedBatchSampler(
        features["length"], max(rows), dist.rank(), dist.size(), cfg.batch_size,
        shuffle=cfg.shuffle, group_by_length=cfg.group_by_length, seed=cfg.seed,
    )
    return sampler, sum(rows)


def _configure_cuda() -> None:
    """cuDNN's attention backend builds a plan per new sequence length: with dynamic
    padding it ran 5x slower on an H200 than the flash/memory-efficient kernels. Off
    unless HVDFT_CUDNN_SDPA=1. TF32 matmuls for fp32 runs."""
    if os.environ.get("HVDFT_CUDNN_SDPA", "0") != "1":
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def _check_output_dir(output_dir: Path, resuming: bool = False, overwrite: bool = False, act: bool = True) -> None:
    """Rank 0: the folder is writable, and holds no other run's checkpoints (which pruning
    and --resume, going by step number, would mix with this run's). With `act=False` (the
    other ranks of an elastic job) the same checks, but nothing is deleted."""
    if act and not dist.is_main():
        return
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise HvdftError(f"output directory is not writable: {exc.strerror}", output_dir) from None
    if overwrite and not resuming and act:
        shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    # (Another rank of an elastic job skips this under --overwrite-output-dir: rank 0 deletes.)
    if not resuming and (act or not overwrite) and list_checkpoints(output_dir / "checkpoints"):
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


def report_counts(task: Task, split: Split, features: dict[str, list], max_length: int) -> None:
    """Collective: what the task counts in its features (e.g. truncated sources), summed over
    all ranks and described once by rank 0 (Task.count_features / describe_counts)."""
    if type(task).count_features is Task.count_features:  # the same on every rank: no collective
        return
    totals: dict[str, int] = {}
    for part in dist.allgather_object(task.count_features(features)):
        for key, n in part.items():
            totals[key] = totals.get(key, 0) + n
    line = task.describe_counts(split, totals, max_length) if dist.is_main() else ""
    if line:
        log.warning("%s", line)


def _load(loader: Any, path: str, cfg: TrainConfig, **kwargs: Any) -> Any:
    try:
        return loader(path, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        raise HvdftError(f"cannot load model '{path}': {exc}".splitlines()[0]) from None


def _tokenizer(auto: Any, path: str, model_config: Any, cfg: TrainConfig, fast: bool = True) -> Any:
    kwargs: dict[str, Any] = {"use_fast": True}
    if getattr(model_config, "model_type", "") in ("roberta", "gpt2", "longformer", "bart", "deberta"):
        kwargs["add_prefix_space"] = True  # needed for pre-split words
    tokenizer = _load(auto.from_pretrained, path, cfg, **kwargs)
    if fast and not getattr(tokenizer, "is_fast", False):
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
