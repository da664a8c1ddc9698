"""The training loop, top to bottom: data, model, optimizer, steps, evaluation, outputs.

Shared by every task. Horovod appears only through `hvdft.dist`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hvdft import dist
from hvdft.checkpoint import (
    RUN_FILE,
    list_checkpoints,
    load_state,
    load_weights,
    prune,
    resolve_resume,
    save_checkpoint,
    write_atomically,
)
from hvdft.config import RESUME_MUST_MATCH, TrainConfig
from hvdft.data.prepare import collate, read_splits, tokenize
from hvdft.data.sampler import DistributedBatchSampler
from hvdft.errors import HvdftError, Interrupted
from hvdft.evaluate import Evaluation, autocast, evaluate
from hvdft.models import resolve_model
from hvdft.tasks import get_task

log = logging.getLogger("hvdft")


def train(cfg: TrainConfig) -> dict[str, Any]:
    cfg.validate()
    dist.init()
    rank, world, device = dist.rank(), dist.size(), dist.device()
    task = get_task(cfg.task)
    output_dir = Path(cfg.output_dir)
    _configure_cuda(device)
    dist.agree(lambda: _check_output_dir(output_dir, bool(cfg.resume), cfg.overwrite_output_dir))
    stop = _StopFlag()

    # ---- data: each rank reads and tokenizes only its own shard --------------------------
    splits = read_splits(task, cfg, ("train", "validation", "test"))
    labels = task.sort_labels(set().union(*dist.allgather_object(task.labels(splits["train"]))))
    label2id = {label: i for i, label in enumerate(labels)}
    id2label = dict(enumerate(labels))
    for name in ("validation", "test"):
        if name in splits:
            _warn_unseen_labels(task, splits[name], label2id)

    from transformers import AutoConfig, AutoTokenizer

    model_path = dist.agree(lambda: resolve_model(cfg.model))
    model_config = dist.agree(lambda: _load(AutoConfig.from_pretrained, model_path, cfg))
    tokenizer = dist.agree(lambda: _tokenizer(AutoTokenizer, model_path, model_config, cfg))
    max_length = dist.agree(lambda: _max_length(cfg, model_config, tokenizer))
    features = {
        name: tokenize(task, split, tokenizer, label2id, max_length, cfg.label_all_tokens, cfg.cache_dir)
        for name, split in splits.items()
    }
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # ---- model, optimizer, schedule ---------------------------------------------------------
    torch.manual_seed(cfg.seed)
    model_config.num_labels = len(labels)
    model_config.id2label, model_config.label2id = id2label, label2id
    model_config.hvdft_task = task.name
    if not cfg.dropout:
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "dropout"):
            if hasattr(model_config, key):
                setattr(model_config, key, 0.0)
    model = dist.agree(lambda: _load(task.model_class().from_pretrained, model_path, cfg, config=model_config))
    model.to(device)
    model.train()

    rows = dist.allgather_object(len(features["train"]["input_ids"]))
    if min(rows) == 0:  # e.g. the rows of a JSON file a rank owns are all empty
        raise HvdftError(f"rank {rows.index(0)} holds no training sentence: every rank needs one",
                         splits["train"].source)
    per_rank = max(rows)
    sampler = DistributedBatchSampler(
        features["train"]["length"], per_rank, rank, world, cfg.batch_size,
        shuffle=cfg.shuffle, group_by_length=cfg.group_by_length, seed=cfg.seed,
    )
    steps_per_epoch = math.ceil(len(sampler) / cfg.grad_accum)
    total_steps = math.ceil(steps_per_epoch * cfg.epochs)
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    average = cfg.allreduce_op == "average"
    lr = cfg.effective_lr(world)  # as given unless --scale-lr linear|sqrt
    optimizer = _adamw(model, lr, cfg.weight_decay, device)
    optimizer = dist.wrap_optimizer(
        optimizer, model.named_parameters(), backward_passes_per_step=cfg.grad_accum,
        fp16_allreduce=cfg.fp16_allreduce, op=cfg.allreduce_op,
    )
    # On the wrapped optimizer: Horovod's wrapper is a new object, and a scheduler bound
    # to the inner one would never see a step.
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(warmup, total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    run = {"config": cfg.to_dict(), "labels": labels, "world_size": world, "model_path": model_path}

    # ---- resume: rank 0 reads the checkpoint, everything is broadcast -----------------------
    step, epoch, skip, best_metric, bad_evals = 0, 0, 0, None, 0
    history: list[dict[str, Any]] = []
    resumed_from: Path | None = None
    torch.manual_seed(cfg.seed + rank)  # dropout differs per rank, reproducibly
    if cfg.resume:
        resumed_from = dist.broadcast_object(
            dist.agree(lambda: resolve_resume(cfg.resume, output_dir) if dist.is_main() else None)
        )
        state = dist.agree(
            lambda: _read_checkpoint(resumed_from, cfg, labels, model, optimizer) if dist.is_main() else None
        )
        # The optimizer state travels once, in broadcast_training_state below.
        state = dist.broadcast_object({k: v for k, v in state.items() if k != "optimizer"} if state else None)
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        p = state["progress"]
        step, epoch, skip = p["step"], p["epoch"], p["batch_in_epoch"]
        best_metric, bad_evals, history = p["best_metric"], p["bad_evals"], p["history"]
        if len(state["rng"]) == world:
            _set_rng(state["rng"][rank])
        if dist.is_main():
            _truncate_metrics_log(output_dir / "metrics.jsonl", step)
    debug = _Debug(rank)
    debug.hashes("before_broadcast", model, optimizer)
    dist.broadcast_training_state(model, optimizer)
    debug.hashes("after_broadcast", model, optimizer)
    best: dict[str, torch.Tensor] | None = None  # best weights seen by this process

    metric_name = cfg.metric or task.default_metric
    _header(cfg, task.name, world, lr, steps_per_epoch, total_steps, splits, device, resumed_from)

    # ---- the loop ---------------------------------------------------------------------------
    progress = _progress(total_steps, step)
    metrics_log = open(output_dir / "metrics.jsonl", "a" if cfg.resume else "w", encoding="utf-8") \
        if dist.is_main() else None
    running_loss = torch.zeros((), device=device)  # summed on the device: no per-step sync
    running_count = 0
    if cfg.resume:  # the loss summed since the last log line before the checkpoint
        loss_sum, running_count = _my_log_sums(state["progress"].get("log_sums", []), rank, world)
        running_loss += loss_sum
    tokens = 0  # real (non-padding) tokens this rank trained on
    train_time = 0.0
    last_log, last_log_tokens = time.perf_counter(), 0.0
    stopped_early = interrupted = False
    batch_in_epoch = skip
    stop.install()
    try:
        while step < total_steps and not (stopped_early or interrupted):
            sampler.set_epoch(epoch, skip)
            batches = iter(sampler)
            batch_in_epoch, skip = skip, 0
            while step < total_steps:
                t0 = time.perf_counter()
                micro = [collate(features["train"], rows, pad_id, cfg.pad_to_multiple_of)
                         for _, rows in zip(range(cfg.grad_accum), batches, strict=False)]
                if not micro:
                    break
                _inject_fault(rank, step + 1, stop)  # test-only, inert unless HVDFT_FAULT is set
                # One tiny allreduce per step carries the labelled-target count, which
                # normalises the loss exactly as one big batch would, and the stop flag
                # (SIGTERM/SIGINT reached some rank): all ranks stop at the same step.
                local_count = sum(int((b.labels != -100).sum()) for b in micro)
                agreed = dist.allreduce(torch.tensor([float(local_count), float(stop.raised)]), name="step")
                if agreed[1] > 0:
                    interrupted = True
                    break
                batch_in_epoch += len(micro)
                denom = max(float(agreed[0]) / world if average else float(local_count), 1.0)
                for b in micro:
                    inputs = {k: v.to(device, non_blocking=True) for k, v in b.inputs.items()}
                    target = b.labels.to(device, non_blocking=True)
                    with autocast(device, cfg.precision):
                        logits = model(**inputs).logits
                    loss_sum = torch.nn.functional.cross_entropy(
                        logits.float().view(-1, logits.shape[-1]), target.view(-1),
                        ignore_index=-100, reduction="sum",
                    )
                    scaler.scale(loss_sum / denom).backward()
                    running_loss += loss_sum.detach()
                    tokens += b.real_tokens
                running_count += local_count
                # Clip the averaged gradients: wait for the allreduce, unscale, clip, step.
                # (Adasum reduces the updates inside step() instead: it clips local gradients.)
                optimizer.synchronize()
                scaler.unscale_(optimizer)
                # The pre-clip global L2 norm of the averaged gradient (under Adasum: of this
                # rank's local one). Logged, it shows the gradient's scale, which clipping and
                # AdamW hide from the weights: a world-size error doubles or halves it.
                if cfg.max_grad_norm > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                else:
                    grad_norm = torch.nn.utils.get_total_norm(
                        [p.grad for p in model.parameters() if p.grad is not None])
                if average:
                    with optimizer.skip_synchronize():
                        scaler.step(optimizer)
                else:  # Horovod's Adasum optimizer has no skip_synchronize()
                    scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad()
                step += 1
                train_time += time.perf_counter() - t0
                debug.step(step, epoch, [[splits["train"].ids[features["train"]["example"][r]] for r in b.rows]
                                         for b in micro], [list(b.inputs["input_ids"].shape) for b in micro])
                progress.update(1)
                end_of_epoch = batch_in_epoch >= len(sampler)

                if step % cfg.log_every == 0 or step == total_steps:
                    totals = dist.allreduce(
                        torch.tensor([running_loss.item(), running_count, tokens], dtype=torch.float64), name="log"
                    )
                    now = time.perf_counter()
                    rate = (float(totals[2]) - last_log_tokens) / max(now - last_log, 1e-9)
                    last_log, last_log_tokens = now, float(totals[2])
                    record = {
                        "step": step, "epoch": round(epoch + batch_in_epoch / len(sampler), 4),
                        "loss": float(totals[0] / max(float(totals[1]), 1.0)),
                        # of this step only (the loss is the mean since the last line); null
                        # when fp16 overflowed and the GradScaler skipped the step
                        "grad_norm": float(grad_norm) if math.isfinite(float(grad_norm)) else None,
                        "lr": scheduler.get_last_lr()[0], "tokens_per_second": rate,
                    }
                    running_loss.zero_()
                    running_count = 0
                    _log_record(metrics_log, record)
                    progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{rate:,.0f}")

                due = step % cfg.eval_every == 0 if cfg.eval_every else end_of_epoch
                if "validation" in splits and due:
                    evaluation = evaluate(task, model, splits["validation"], features["validation"],
                                          id2label, cfg.batch_size * 2, pad_id, cfg.precision)
                    score = evaluation.metrics[metric_name]
                    entry = {"step": step, **{f"eval_{k}": v for k, v in evaluation.metrics.items()}}
                    history.append(entry)
                    _log_record(metrics_log, entry)
                    if dist.is_main():
                        progress.write(f"step {step}: eval {metric_name} {score:.4f}, "
                                       f"loss {evaluation.metrics['loss']:.4f}")
                    if best_metric is None or score > best_metric:
                        best_metric, bad_evals = score, 0
                        best = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                        if dist.is_main():
                            _save_model(output_dir / "checkpoints" / "best", model, tokenizer, run)
                    else:
                        bad_evals += 1
                        if cfg.early_stopping_patience and bad_evals >= cfg.early_stopping_patience:
                            if dist.is_main():
                                progress.write(f"early stopping: no {metric_name} gain in {bad_evals} evaluations")
                            stopped_early = True

                if (step % cfg.save_every == 0 if cfg.save_every else end_of_epoch) or stopped_early:
                    position = (epoch + 1, 0) if end_of_epoch else (epoch, batch_in_epoch)
                    _checkpoint(output_dir, cfg, model, tokenizer, optimizer, scheduler, scaler, run,
                                step, position, best_metric, bad_evals, history,
                                log_sums=(float(running_loss), running_count))
                if stopped_early:
                    break
            if not interrupted:
                epoch += 1
    finally:
        if not interrupted:
            stop.restore()
        progress.close()
        if metrics_log:
            metrics_log.close()

    if interrupted:
        try:  # the handlers stay: a repeated SIGTERM must not kill the checkpoint's writer
            _checkpoint(output_dir, cfg, model, tokenizer, optimizer, scheduler, scaler, run,
                        step, (epoch, batch_in_epoch), best_metric, bad_evals, history,
                        log_sums=(float(running_loss), running_count))
            # Nobody exits before rank 0 has written it: a launcher that sees one rank
            # exit kills the others, rank 0 included (mpirun 1 s later, horovodrun 5 s).
            dist.barrier()
        finally:
            stop.restore()
        raise Interrupted(f"interrupted by a signal at step {step}; checkpoint written, continue with --resume")

    # ---- final: the best model, the test set, the outputs -----------------------------------
    debug.hashes("end", model, optimizer)
    if best is not None:
        model.load_state_dict(best)
    elif best_metric is not None and resumed_from is not None:
        # The best model predates the resume: rank 0 reloads it from disk for everyone.
        dist.agree(lambda: load_weights(model, output_dir / "checkpoints" / "best") if dist.is_main() else None)
        dist.broadcast_parameters(model)
    totals = dist.allreduce(torch.tensor([float(tokens)], dtype=torch.float64), name="final")
    results: dict[str, Any] = {
        "train_runtime": train_time,
        "train_samples": splits["train"].total,
        "train_steps": step,
        "train_tokens": float(totals[0]),
        "train_tokens_per_second": float(totals[0]) / max(train_time, 1e-9),
        "world_size": world,
        "per_rank_batch_size": cfg.batch_size,
        "global_batch_size": cfg.batch_size * world * cfg.grad_accum,
        "learning_rate": lr,
        "precision": cfg.precision,
        "best_eval_metric": best_metric,
        "stopped_early": stopped_early,
    }
    reports: dict[str, Evaluation] = {}
    for name, prefix in (("validation", "eval"), ("test", "test")):
        if name in splits:
            reports[prefix] = evaluate(task, model, splits[name], features[name], id2label,
                                       cfg.batch_size * 2, pad_id, cfg.precision)
            results.update({f"{prefix}_{k}": v for k, v in reports[prefix].metrics.items()})
    if dist.is_main():
        _write_outputs(output_dir, task, model, tokenizer, results, reports, run)
    dist.barrier()
    return results


# ----------------------------------------------------------------------------- helpers


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop stops at the next step boundary on all ranks."""

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

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _configure_cuda(device: torch.device) -> None:
    """cuDNN's attention backend builds a plan per new sequence length: with dynamic
    padding it ran 5x slower on an H200 than the flash/memory-efficient kernels. Off
    unless HVDFT_CUDNN_SDPA=1. TF32 matmuls for fp32 runs."""
    if device.type != "cuda":
        return
    if os.environ.get("HVDFT_CUDNN_SDPA", "0") != "1":
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def _check_output_dir(output_dir: Path, resuming: bool = False, overwrite: bool = False) -> None:
    if not dist.is_main():
        return
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise HvdftError(f"output directory is not writable: {exc.strerror}", output_dir) from None
    # A new run's checkpoints would mix with the old ones: pruning and --resume go by
    # step number and would pick the other run's.
    if overwrite and not resuming:
        shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    if not resuming and list_checkpoints(output_dir / "checkpoints"):
        raise HvdftError("holds checkpoints of an earlier run: continue it with --resume, "
                         "give another --output-dir, or --overwrite-output-dir", output_dir)


def _warn_unseen_labels(task: Any, split: Any, label2id: dict[str, int]) -> None:
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


def _load(loader: Any, path: str, cfg: TrainConfig, **kwargs: Any) -> Any:
    try:
        return loader(path, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except OSError as exc:
        raise HvdftError(f"cannot load model '{path}': {exc}".splitlines()[0]) from None
    except ValueError as exc:
        raise HvdftError(f"cannot load model '{path}': {exc}".splitlines()[0]) from None


def _tokenizer(auto: Any, path: str, model_config: Any, cfg: TrainConfig) -> Any:
    kwargs: dict[str, Any] = {"use_fast": True}
    if getattr(model_config, "model_type", "") in ("roberta", "gpt2", "longformer", "bart", "deberta"):
        kwargs["add_prefix_space"] = True  # needed for pre-split words
    tokenizer = _load(auto.from_pretrained, path, cfg, **kwargs)
    if not getattr(tokenizer, "is_fast", False):
        raise HvdftError(f"model '{cfg.model}' has no fast tokenizer: word alignment needs one")
    return tokenizer


def _max_length(cfg: TrainConfig, model_config: Any, tokenizer: Any) -> int:
    limit = getattr(model_config, "max_position_embeddings", None) or 512
    if getattr(model_config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limit -= 2  # position ids start after the padding index
    tok_limit = getattr(tokenizer, "model_max_length", limit)
    if tok_limit and tok_limit < 100_000:
        limit = min(limit, tok_limit)
    if cfg.max_length is None:
        return limit
    if cfg.max_length > limit:
        raise HvdftError(f"--max-length {cfg.max_length} is over the model's limit of {limit} tokens")
    return cfg.max_length


def _adamw(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW without decay on biases and LayerNorm weights; the fused kernel where it exists."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, foreach=device.type != "cpu")


def _linear_schedule(warmup: int, total: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()[1]),
    }


def _set_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    random.setstate((3, tuple(state["python"]), None))


def _checkpoint(output_dir: Path, cfg: TrainConfig, model: Any, tokenizer: Any, optimizer: Any,
                scheduler: Any, scaler: Any, run: dict[str, Any], step: int, position: tuple[int, int],
                best_metric: float | None, bad_evals: int, history: list[dict[str, Any]],
                log_sums: tuple[float, int] = (0.0, 0)) -> None:
    """Collective (RNG states and unlogged loss sums of all ranks are gathered); rank 0 writes."""
    gathered = dist.allgather_object((_rng_state(), log_sums))
    if not dist.is_main():
        return
    rng = [g[0] for g in gathered]
    # Per rank, as each rank summed it (float32 on its device): a resumed rank continues
    # its own sum, so the next log line is the uninterrupted run's to the last bit.
    per_rank = [[float(g[1][0]), int(g[1][1])] for g in gathered]
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng,
        # Plain Python numbers: metrics arrive as numpy scalars, which
        # torch.load(weights_only=True) refuses, so --resume would fail.
        "progress": _plain({"step": step, "epoch": position[0], "batch_in_epoch": position[1],
                            "best_metric": best_metric, "bad_evals": bad_evals, "history": history,
                            "log_sums": per_rank}),
    }
    root = output_dir / "checkpoints"
    save_checkpoint(root / f"checkpoint-{step}", _unwrap(model), tokenizer, state, run)
    prune(root, cfg.save_total_limit)


def _my_log_sums(saved: list, rank: int, world: int) -> tuple[float, int]:
    """This rank's (loss sum, target count) not yet logged when the checkpoint was written.
    Saved per rank; on another number of ranks (an end-of-epoch checkpoint) rank 0 takes
    the total. An older checkpoint holds the total alone ([sum, count])."""
    if saved and not isinstance(saved[0], list):
        saved = [saved]
    if len(saved) == world:
        return float(saved[rank][0]), int(saved[rank][1])
    if rank == 0:
        return sum(float(s[0]) for s in saved), sum(int(s[1]) for s in saved)
    return 0.0, 0


def _plain(obj: Any) -> Any:
    """numpy scalars -> Python numbers, through dicts and lists."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _read_checkpoint(folder: Path, cfg: TrainConfig, labels: list[str], model: Any, optimizer: Any) -> dict[str, Any]:
    state, run = load_state(folder)
    saved = run.get("config", {})
    for key in RESUME_MUST_MATCH:
        if saved.get(key) != getattr(cfg, key):
            raise HvdftError(
                f"--resume: checkpoint was made with {key}={saved.get(key)!r}, this run has {getattr(cfg, key)!r}",
                folder,
            )
    if run.get("labels") != labels:
        raise HvdftError(f"--resume: checkpoint's labels {run.get('labels')} differ from this data's {labels}", folder)
    if state["progress"]["batch_in_epoch"] and run.get("world_size") != dist.size():
        # The sampler position counts this rank's batches: it means other examples on N ranks.
        raise HvdftError(
            f"--resume: checkpoint was written mid-epoch by {run.get('world_size')} rank(s), this job has "
            f"{dist.size()}; resume on {run.get('world_size')} or from an end-of-epoch checkpoint",
            folder,
        )
    load_weights(model, folder)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as exc:
        raise HvdftError(f"--resume: optimizer state does not fit this model: {exc}".splitlines()[0], folder) from None
    return state


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)


def _save_model(folder: Path, model: Any, tokenizer: Any, run: dict[str, Any]) -> None:
    def write(tmp: Path) -> None:
        _unwrap(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / RUN_FILE).write_text(json.dumps(run, indent=2, sort_keys=True))

    write_atomically(folder, write)


def _write_outputs(output_dir: Path, task: Any, model: Any, tokenizer: Any, results: dict[str, Any],
                   reports: dict[str, Evaluation], run: dict[str, Any]) -> None:
    """The final model and reports. config.json is written last: its presence marks a
    finished model folder, so a crash here never leaves one that looks complete."""
    staging = output_dir / "checkpoints" / "final"
    _save_model(staging, model, tokenizer, run)
    for prefix, ev in reports.items():
        (output_dir / f"{prefix}_report.txt").write_text(_report_text(prefix, ev))
    if "test" in reports and reports["test"].examples is not None:
        task.write_predictions(output_dir / f"test_predictions{task.predictions_suffix}",
                               reports["test"].examples, reports["test"].predictions)
    (output_dir / "all_results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    names = sorted(p.name for p in staging.iterdir() if p.name != "config.json")
    for name in names + ["config.json"]:
        tmp = output_dir / f".{name}.tmp"
        shutil.copy2(staging / name, tmp)
        os.replace(tmp, output_dir / name)
    shutil.rmtree(staging, ignore_errors=True)
    for prefix, ev in reports.items():
        print(_report_text(prefix, ev), flush=True)
    print(f"model, reports and predictions written to {output_dir}", flush=True)


def _report_text(prefix: str, ev: Evaluation) -> str:
    name = {"eval": "validation", "test": "test"}[prefix]
    lines = [f"== {name} =="]
    lines += [f"{k}: {v:.4f}" for k, v in ev.metrics.items() if k != "sentences"]
    return "\n".join(lines) + "\n\n" + ev.report + "\n"


def _log_record(stream: Any, record: dict[str, Any]) -> None:
    if stream is not None:
        stream.write(json.dumps(record) + "\n")
        stream.flush()


def _progress(total: int, initial: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not dist.is_main(), unit="step",
                dynamic_ncols=True, mininterval=1.0)


def _header(cfg: TrainConfig, task: str, world: int, lr: float, steps_per_epoch: int,
            total_steps: int, splits: dict[str, Any], device: torch.device, resumed: Path | None) -> None:
    if not dist.is_main():
        return
    sizes = ", ".join(f"{k} {v.total}" for k, v in splits.items())
    lines = [
        f"hvdft train {task}: {cfg.model} on {world} rank(s) [{dist.controller()}], device {device.type}",
        f"  data: {sizes} (examples; each rank reads and tokenizes its own shard)",
        f"  batch: {cfg.batch_size} per rank x {world} ranks x {cfg.grad_accum} accumulation "
        f"= {cfg.batch_size * world * cfg.grad_accum} global",
        f"  lr {lr:g} effective (--lr {cfg.lr:g}, --scale-lr {cfg.scale_lr}), "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps, precision {cfg.precision}, "
        f"allreduce {cfg.allreduce_op}{' fp16' if cfg.fp16_allreduce else ''}",
    ]
    if resumed:
        lines.append(f"  resumed from {resumed}")
    print("\n".join(lines), flush=True)


def _truncate_metrics_log(path: Path, step: int) -> None:
    """On resume: drop records past the checkpoint's step, which the run now replays."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line + "\n")
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- test hooks
# Test-only and inert unless their variable is set; tests/test_failures.py and
# tests/test_equivalence.py use them to prove the failure behaviour and the equivalence.


def _inject_fault(rank: int, step: int, stop: _StopFlag) -> None:
    """HVDFT_FAULT="rank=1,step=3,kind=raise|kill|wait|hold": as that rank starts that step,
    it raises, SIGKILLs itself, waits (up to 120 s) for a stop signal: a fixed step for
    a test to send SIGTERM/SIGINT at (the other ranks wait in the step's allreduce), or
    holds for 120 s whatever comes: a long step, during which Ctrl-C is pressed twice."""
    spec = os.environ.get("HVDFT_FAULT")
    if not spec:
        return
    fault = dict(item.split("=", 1) for item in spec.split(","))
    if int(fault["rank"]) != rank or int(fault["step"]) != step:
        return
    if fault["kind"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault["kind"] in ("wait", "hold"):
        deadline = time.monotonic() + 120
        while not (stop.raised and fault["kind"] == "wait") and time.monotonic() < deadline:
            time.sleep(0.05)
        return
    raise RuntimeError(f"HVDFT_FAULT: injected failure at step {step}")


class _Debug:
    """HVDFT_DEBUG_DIR=dir: each rank appends JSON lines to dir/rank<N>.jsonl: hashes of
    its parameters and optimizer state (before/after the initial broadcast, at the end)
    and, for every step, the global example ids and padded shape of each micro-batch."""

    def __init__(self, rank: int) -> None:
        folder = os.environ.get("HVDFT_DEBUG_DIR")
        self.path = Path(folder) / f"rank{rank}.jsonl" if folder else None

    def _write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({**record, "time": time.time()}) + "\n")

    def hashes(self, event: str, model: Any, optimizer: Any) -> None:
        if self.path is not None:
            self._write({"event": event, "params": _digest(model.state_dict()),
                         "optimizer": _digest(optimizer.state_dict())})

    def step(self, step: int, epoch: int, examples: list[list[int]], shapes: list[list[int]]) -> None:
        """examples: the global example ids of each micro-batch; shapes: each micro-batch's
        padded [rows, tokens] as the model saw it."""
        if self.path is not None:
            self._write({"event": "step", "step": step, "epoch": epoch, "examples": examples, "shapes": shapes})


def _digest(obj: Any) -> str:
    """sha256 of nested dicts/lists of tensors and plain values, in a fixed order."""
    import hashlib

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
