"""What a run shows and leaves behind: the header, progress lines, metrics.jsonl, the model
folder, reports and results files. Rank 0 only; every function here is safe to call on the
other ranks (it does nothing there)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hvdft import dist
from hvdft.checkpoint import RUN_FILE, write_atomically
from hvdft.modelcard import write_model_card

log = logging.getLogger("hvdft")

if TYPE_CHECKING:
    from hvdft.evaluate import Evaluation
    from hvdft.tasks.base import Task
    from hvdft.tracking import Trackers

# A plain progress line (logs written to files) at most this often, in seconds.
PLAIN_LINE_MIN_INTERVAL_S = 30.0


def header(lines: list[str]) -> None:
    """The run header, printed once by rank 0."""
    if dist.is_main():
        print("\n".join(lines), flush=True)


class Display:
    """Rank 0's view of training: a tqdm bar on a terminal; in a log file (Slurm, `> run.log`)
    no carriage-return frames but a plain line at logging steps, at most every 30 s, with
    the same fields: step/total, epoch, loss, tokens/s, elapsed and ETA."""

    def __init__(self, total: int, initial: int, interactive: bool | None = None) -> None:
        self.enabled = dist.is_main()
        self.total, self.initial = total, initial
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.start = time.monotonic()
        self.last_line = float("-inf")  # the first logged step prints at once
        self.bar = None
        if self.enabled and self.interactive:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def logged(self, record: dict[str, Any]) -> None:
        """A training record of metrics.jsonl was written: show its figures."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_second']:,.0f}")
            return
        now = time.monotonic()
        last = record["step"] >= self.total
        if now - self.last_line < PLAIN_LINE_MIN_INTERVAL_S and not last:
            return
        self.last_line = now
        elapsed = now - self.start
        done = record["step"] - self.initial
        eta = elapsed / done * (self.total - record["step"]) if done > 0 else 0.0
        print(f"step {record['step']}/{self.total} epoch {record['epoch']:.2f} loss {record['loss']:.4f} "
              f"{record['tokens_per_second']:,.0f} tok/s elapsed {_clock(elapsed)} eta {_clock(eta)}",
              file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLog:
    """OUTPUT_DIR/metrics.jsonl: one JSON line per logging step and per evaluation; each
    record also goes to the --report-to trackers."""

    def __init__(self, path: Path, append: bool, trackers: Trackers | None = None) -> None:
        self.stream = open(path, "a" if append else "w", encoding="utf-8") if dist.is_main() else None
        self.trackers = trackers

    def write(self, record: dict[str, Any]) -> None:
        if self.stream is not None:
            self.stream.write(json.dumps(record) + "\n")
            self.stream.flush()
        if self.trackers is not None:
            self.trackers.log(record)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


def truncate_metrics_log(path: Path, step: int) -> None:
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


def unwrap(model: Any) -> Any:
    return getattr(model, "module", model)


def save_model(folder: Path, model: Any, tokenizer: Any, run: dict[str, Any]) -> None:
    """A complete model folder (weights, config, tokenizer, hvdft_run.json), written atomically."""

    def write(tmp: Path) -> None:
        unwrap(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / RUN_FILE).write_text(json.dumps(run, indent=2, sort_keys=True))

    write_atomically(folder, write)


def write_outputs(output_dir: Path, task: Task, model: Any, tokenizer: Any, results: dict[str, Any],
                  reports: dict[str, Evaluation], run: dict[str, Any]) -> None:
    """The final model, reports, predictions and results files (rank 0).

    config.json is written last: its presence marks a finished model folder, so a crash
    here never leaves one that looks complete. Results are written as all_results.json
    and, as the Hugging Face Trainer names them, train_results.json, eval_results.json and
    test_results.json.
    """
    staging = output_dir / "checkpoints" / "final"
    save_model(staging, model, tokenizer, run)
    try:
        write_model_card(staging, task, results, reports, run, output_dir.resolve().name)
    except Exception as exc:  # noqa: BLE001 - the card is for publishing; the model is what matters
        log.warning("model card (README.md) not written: %s: %s", type(exc).__name__, exc)
    for prefix, ev in reports.items():
        (output_dir / f"{prefix}_report.txt").write_text(report_text(prefix, ev))
        if ev.examples is not None:
            task.write_predictions(output_dir, prefix, ev.examples, ev.predictions or [])
    (output_dir / "all_results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    for prefix in ("train", "eval", "test"):
        part = {k: v for k, v in results.items() if k.startswith(prefix + "_") or k == "epoch"}
        if len(part) > 1:
            (output_dir / f"{prefix}_results.json").write_text(json.dumps(part, indent=2, sort_keys=True))
    names = sorted(p.name for p in staging.iterdir() if p.name != "config.json")
    for name in names + ["config.json"]:
        tmp = output_dir / f".{name}.tmp"
        shutil.copy2(staging / name, tmp)
        os.replace(tmp, output_dir / name)
    shutil.rmtree(staging, ignore_errors=True)
    write_run_plots(output_dir)
    for prefix, ev in reports.items():
        print(report_text(prefix, ev), flush=True)
    print(f"model, reports and predictions written to {output_dir}", flush=True)


def write_run_plots(output_dir: Path) -> None:
    """OUTPUT_DIR/plots/*.png from metrics.jsonl when matplotlib is installed. A failure
    is a warning: the trained model is what matters."""
    from hvdft import plots

    if not plots.matplotlib_available():
        log.info("no training curves: pip install 'hvdft[plot]' (or run `hvdft plot %s` where it is)", output_dir)
        return
    try:
        plots.write_plots(output_dir)
    except Exception as exc:  # noqa: BLE001 - any plotting failure
        log.warning("training curves not written: %s: %s", type(exc).__name__, exc)


def report_text(prefix: str, ev: Evaluation) -> str:
    name = {"eval": "validation", "test": "test"}[prefix]
    lines = [f"== {name} =="]
    lines += [f"{k}: {v:.4f}" for k, v in ev.metrics.items() if k != "sentences"]
    return "\n".join(lines) + "\n\n" + ev.report + "\n"
