"""hvdft throughput against a plain PyTorch loop and the naive recipe, in one invocation.

    .venv/bin/python benchmarks/bench.py [--smoke] [--data DIR] [--model minilm] [--reps 3]
                                         [--steps 60] [--json out.json]

Rows, all on the same model, training data and precision, with the same step count:
  hvdft-1   `hvdft train ner` on 1 rank, batch --batch (32)
  hvdft-2   `horovodrun -np 2 --gloo hvdft train ner`, batch --batch-2 (16) per rank, i.e. the
            same global batch; hvdft.dist.init gives each rank cores // 2 threads
  plain     benchmarks/plain_loop.py: the usual single-process loop (length-grouped batches,
            dynamic padding, fused AdamW, linear schedule), batch --batch, --threads = cores
  naive     benchmarks/plain_loop.py --naive: fp32, every row padded to 128, random batches,
            batch --naive-batch (16)

hvdft runs through benchmarks/hvdft_profiled.py: the unchanged hvdft CLI with timers
wrapped around the functions its loop calls (see that file). Every figure is taken over
steps warmup+1 .. steps (the first --warmup steps are excluded): real (non-pad) tokens/s
and sentences/s summed over ranks, padding fraction, peak RSS per process (getrusage
ru_maxrss; CUDA: torch.cuda.max_memory_allocated), and for Horovod runs the share of step
time blocked in collectives: optimizer.synchronize() (the gradient allreduce left when
backward ends) plus the per-step and logging allreduces of small tensors (the wait for the
slowest rank). Each rep runs every row (order rotated per rep, seed 42+rep for all rows);
the table shows medians over reps and the ratios are computed rep by rep, then the median.

Data: --data DIR (a folder with train.txt) or ../shared/data/conll2003 beside the checkout,
else the bundled WNUT-17. CoNLL-2003 is read in place, never copied.
Model: 'minilm' (the offline MiniLM-L6), a local folder, or 'bert-base-random': a
random-initialised BERT-base (12x768, 110M parameters, BertConfig() defaults) written once
to --workdir with MiniLM's uncased WordPiece tokenizer (same 30,522 vocabulary): no hub
access is needed, and speed does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED_CONLL = ROOT.parent / "shared" / "data" / "conll2003"
BUNDLED_WNUT = ROOT / "hvdft" / "resources" / "wnut17"
ROWS = ("hvdft-1", "hvdft-2", "plain", "naive")
TARGETS = {"hvdft-1 / plain": 0.95, "hvdft-1 / naive": 6.0, "hvdft-2 / hvdft-1": 0.85}


# ----------------------------------------------------------------------------- setup


def find_train_file(folder: Path) -> Path:
    for name in ("train.txt", "train.conll", "eng.train", "train.iob2"):
        if (folder / name).is_file():
            return folder / name
    hits = sorted(folder.glob("train*"))
    if not hits:
        raise SystemExit(f"bench: no train file in {folder}")
    return hits[0]


def resolve_data(arg: str | None, smoke: bool) -> tuple[Path, str]:
    if arg:
        return find_train_file(Path(arg)), Path(arg).name
    if not smoke and SHARED_CONLL.is_dir():
        return find_train_file(SHARED_CONLL), "CoNLL-2003"
    return find_train_file(BUNDLED_WNUT), "WNUT-17 (bundled)"


def resolve_model(name: str, workdir: Path) -> str:
    if name == "bert-base-random":
        folder = workdir / "bert-base-random"
        if not (folder / "config.json").exists():
            make_random_bert(folder)
        return str(folder)
    from hvdft.models import resolve_model as hvdft_resolve

    return hvdft_resolve(name)


def make_random_bert(folder: Path) -> None:
    """BERT-base shape (BertConfig() defaults), random weights, MiniLM's uncased tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from hvdft.models import resolve_model as hvdft_resolve

    torch.manual_seed(0)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    BertModel(BertConfig()).save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(hvdft_resolve("minilm")).save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def cpu_busy_seconds() -> float | None:
    """Seconds of CPU time all processes on this machine have used (from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# ----------------------------------------------------------------------------- runs


class RunFailed(RuntimeError):
    pass


def child_env(profile: Path, warmup: int, no_cudnn_sdpa: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # let hvdft.dist.init / torch choose, as a user's run would
    env.update(HVDFT_BENCH_PROFILE=str(profile), HVDFT_BENCH_WARMUP=str(warmup), PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    if no_cudnn_sdpa:
        env["HVDFT_BENCH_NO_CUDNN_SDPA"] = "1"
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def execute(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> None:
    with open(log, "w") as out:
        out.write(" ".join(cmd) + "\n\n")
        out.flush()
        try:
            proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            raise RunFailed(f"timed out after {timeout:.0f}s: {' '.join(cmd)} (log {log})") from None
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-25:])
        raise RunFailed(f"exit {proc.returncode}: {' '.join(cmd)}\n{tail}")


def run_row(row: str, a: argparse.Namespace, model: str, train_file: Path, seed: int, workdir: Path) -> dict[str, Any]:
    tag = f"{row}-seed{seed}"
    profile = workdir / "profiles" / tag
    shutil.rmtree(profile, ignore_errors=True)
    profile.mkdir(parents=True)
    env = child_env(profile, a.warmup, a.no_cudnn_sdpa)
    py = sys.executable
    if row.startswith("hvdft"):
        env.update(kv.split("=", 1) for kv in a.hvdft_env)
        ranks = int(row.split("-")[1])
        out = workdir / "out" / tag
        shutil.rmtree(out, ignore_errors=True)
        cmd = [py, str(HERE / "hvdft_profiled.py"), "train", "ner", "--model", model,
               "--train-file", str(train_file), "--output-dir", str(out),
               "--batch-size", str(a.batch if ranks == 1 else a.batch_2), "--max-steps", str(a.steps),
               "--precision", a.precision, "--seed", str(seed), "--cache-dir", str(workdir / "cache")]
        if ranks > 1:
            cmd = [str(Path(py).parent / "horovodrun"), "-np", str(ranks), "--gloo"] + cmd
    else:
        naive = row == "naive"
        cmd = [py, str(HERE / "plain_loop.py"), "--model", model, "--train-file", str(train_file),
               "--batch-size", str(a.naive_batch if naive else a.batch), "--steps", str(a.steps),
               "--precision", "fp32" if naive else a.precision, "--seed", str(seed),
               "--threads", str(os.cpu_count() or 1), "--warmup", str(a.warmup),
               "--profile", str(profile / "rank0.json")]
        if naive:
            cmd.append("--naive")
        if a.no_cudnn_sdpa:
            cmd.append("--no-cudnn-sdpa")
    load = load_average()
    busy0, mine0 = cpu_busy_seconds(), children_cpu_seconds()
    t = time.perf_counter()
    execute(cmd, env, workdir / "logs" / f"{tag}.log", a.timeout)
    wall = time.perf_counter() - t
    busy1, mine1 = cpu_busy_seconds(), children_cpu_seconds()
    # CPU cores that other processes (not this run) kept busy, on average, while it ran.
    others = max(0.0, (busy1 - busy0) - (mine1 - mine0)) / wall if busy0 is not None and busy1 is not None else None
    records = [json.loads(p.read_text()) for p in sorted(profile.glob("rank*.json"))]
    summary = summarize(records, a.warmup, a.steps)
    summary.update(row=row, seed=seed, command=cmd, wall_s=wall, load_before=load, other_cpu_cores=others)
    if row.startswith("hvdft"):
        results = json.loads((workdir / "out" / tag / "all_results.json").read_text())
        summary["hvdft_all_results"] = {k: results[k] for k in (
            "train_runtime", "train_tokens", "train_tokens_per_second", "train_steps", "world_size",
            "per_rank_batch_size", "global_batch_size", "precision") if k in results}
    return summary


def summarize(records: list[dict[str, Any]], warmup: int, steps: int) -> dict[str, Any]:
    """Figures over steps warmup+1 .. steps, summed over ranks, timed on rank 0's clock."""
    if not records:
        raise RunFailed("no profile record written")
    records.sort(key=lambda r: r["rank"])
    if len(records) != records[0]["world"]:
        raise RunFailed(f"{len(records)} profile records for {records[0]['world']} ranks")
    for r in records:
        if len(r["steps"]) != steps:
            raise RunFailed(f"rank {r['rank']} recorded {len(r['steps'])} steps, expected {steps}")
    s0 = records[0]["steps"]
    t0 = s0[warmup - 1]["t_end"] if warmup else records[0]["t_start"]
    elapsed = s0[-1]["t_end"] - t0

    def total(key: str) -> float:
        return float(sum(s.get(key, 0) for r in records for s in r["steps"][warmup:]))

    tokens, slots, rows = total("tokens"), total("slots"), total("rows")
    world = len(records)
    per_rank = []
    for r in records:
        w = r["steps"][warmup:]
        per_rank.append({k: sum(s.get(k, 0.0) for s in w) for k in
                         ("sync_s", "step_allreduce_s", "log_allreduce_s", "collate_s")})
    mean = {k: statistics.fmean(p[k] for p in per_rank) for k in per_rank[0]}
    comm = mean["sync_s"] + mean["step_allreduce_s"] + mean["log_allreduce_s"]
    n = steps - warmup
    imbalance = None
    if world > 1:  # per step: the share of the busiest rank's padded tokens the lightest lacks
        per_step = [[r["steps"][k]["slots"] for r in records] for k in range(warmup, steps)]
        imbalance = statistics.fmean((max(s) - min(s)) / max(s) for s in per_step)
    cuda = [r["cuda_max_allocated_mb"] for r in records if r.get("cuda_max_allocated_mb") is not None]
    return {
        "world": world,
        "threads_per_rank": [r["threads"] for r in records],
        "device": records[0].get("device"),
        "measured_steps": n,
        "elapsed_s": elapsed,
        "real_tokens": tokens,
        "padded_slots": slots,
        "sentences": rows,
        "tokens_per_second": tokens / elapsed,
        "sentences_per_second": rows / elapsed,
        "padding_fraction": 1.0 - tokens / slots if slots else 0.0,
        "tokens_per_sentence": tokens / rows if rows else 0.0,
        "peak_rss_mb": max(r["max_rss_mb"] for r in records),
        "peak_rss_mb_all_ranks": sum(r["max_rss_mb"] for r in records),
        "cuda_max_allocated_mb": max(cuda) if cuda else None,
        "step_ms": 1000 * elapsed / n,
        "collate_ms": 1000 * mean["collate_s"] / n,
        "sync_wait_ms": 1000 * mean["sync_s"] / n,
        "step_allreduce_wait_ms": 1000 * mean["step_allreduce_s"] / n,
        "log_allreduce_wait_ms": 1000 * mean["log_allreduce_s"] / n,
        "comm_wait_fraction": comm / elapsed if world > 1 else None,
        "rank_slot_imbalance": imbalance,
        "comm_wait_per_rank": per_rank if world > 1 else None,
    }


# ----------------------------------------------------------------------------- preprocessing

PROBE = r"""
import json, sys, time
from hvdft import dist
from hvdft.data.files import Shard
from hvdft.data.prepare import tokenize
from hvdft.tasks import get_task
from transformers import AutoConfig, AutoTokenizer
dist.init()
train_file, model, cache = sys.argv[1:4]
task = get_task("ner")
t = time.perf_counter()
split = task.read(train_file, "train", Shard())
read_s = time.perf_counter() - t
labels = task.sort_labels(task.labels(split))
tok = AutoTokenizer.from_pretrained(model, use_fast=True)
cfg = AutoConfig.from_pretrained(model)
max_length = min(cfg.max_position_embeddings, tok.model_max_length or 10**6)
t = time.perf_counter()
features = tokenize(task, split, tok, {l: i for i, l in enumerate(labels)}, max_length, cache)
tok_s = time.perf_counter() - t
print("PROBE " + json.dumps({"read_s": read_s, "tokenize_s": tok_s, "sentences": len(split.examples),
                             "rows": len(features["input_ids"]), "tokens": sum(features["length"])}))
"""


def preprocessing(train_file: Path, model: str, workdir: Path, timeout: float) -> dict[str, Any]:
    """hvdft.data.prepare.tokenize on the whole training file: a fresh cache, then a rerun."""
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=workdir))
    env = child_env(workdir / "unused", 0, False)
    env.pop("HVDFT_BENCH_PROFILE")
    out = {}
    for phase in ("cold", "warm"):
        proc = subprocess.run([sys.executable, "-c", PROBE, str(train_file), model, str(cache)], env=env,
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")), None)
        if proc.returncode != 0 or line is None:
            raise RunFailed(f"tokenize probe failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        out[phase] = json.loads(line[6:])
    shutil.rmtree(cache, ignore_errors=True)
    cold, warm = out["cold"], out["warm"]
    return {"file": str(train_file), "sentences": cold["sentences"], "rows": cold["rows"],
            "tokens": cold["tokens"], "read_s": cold["read_s"], "cold_s": cold["tokenize_s"],
            "warm_s": warm["tokenize_s"], "cold_sentences_per_second": cold["sentences"] / cold["tokenize_s"],
            "speedup": cold["tokenize_s"] / warm["tokenize_s"]}


# ----------------------------------------------------------------------------- report


def median_rows(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    keys = ("tokens_per_second", "sentences_per_second", "padding_fraction", "peak_rss_mb",
            "peak_rss_mb_all_ranks", "cuda_max_allocated_mb", "comm_wait_fraction", "step_ms", "collate_ms",
            "sync_wait_ms", "step_allreduce_wait_ms", "log_allreduce_wait_ms", "tokens_per_sentence",
            "rank_slot_imbalance")
    out = {}
    for row in ROWS:
        mine = [r for r in runs if r["row"] == row]
        if not mine:
            continue
        med = {"reps": len(mine), "world": mine[0]["world"], "threads_per_rank": mine[0]["threads_per_rank"]}
        for k in keys:
            vals = [r[k] for r in mine if r.get(k) is not None]
            med[k] = statistics.median(vals) if vals else None
        out[row] = med
    return out


def ratios(runs: list[dict[str, Any]], reps: int) -> dict[str, dict[str, Any]]:
    out = {}
    for name, target in TARGETS.items():
        num, den = (s.strip() for s in name.split("/"))
        per_rep = []
        for rep in range(reps):
            a = [r for r in runs if r["row"] == num and r["rep"] == rep]
            b = [r for r in runs if r["row"] == den and r["rep"] == rep]
            if a and b:
                per_rep.append(a[0]["tokens_per_second"] / b[0]["tokens_per_second"])
        if per_rep:
            med = statistics.median(per_rep)
            out[name] = {"per_rep": per_rep, "median": med, "target": target, "met": med >= target}
    return out


def fmt_mem(m: dict[str, Any]) -> str:
    if m.get("cuda_max_allocated_mb") is not None:
        return f"{m['cuda_max_allocated_mb'] / 1024:.1f} GiB (CUDA)"
    if m["world"] > 1:
        return f"{m['peak_rss_mb']:,.0f} MiB/rank"
    return f"{m['peak_rss_mb']:,.0f} MiB"


def table(report: dict[str, Any]) -> str:
    meta, med = report["meta"], report["median"]
    label = {"hvdft-1": "hvdft, 1 rank", "hvdft-2": "hvdft, 2 ranks (Gloo)", "plain": "plain PyTorch loop",
             "naive": "naive recipe (pad 128)"}
    batch = {"hvdft-1": f"{meta['batch']}", "hvdft-2": f"2 x {meta['batch_2']}", "plain": f"{meta['batch']}",
             "naive": f"{meta['naive_batch']}"}
    prec = {r: ("fp32" if r == "naive" else meta["precision"]) for r in ROWS}
    lines = [
        f"{meta['model_label']} on {meta['data_label']}, {meta['steps']} steps ({meta['warmup']} warm-up "
        f"steps excluded), median of {meta['reps']} rep(s); {meta['device_label']}",
        "",
        "| run | batch | precision | real tokens/s | sentences/s | padding | peak memory | allreduce wait |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in ROWS:
        if row not in med:
            continue
        m = med[row]
        wait = f"{100 * m['comm_wait_fraction']:.0f}% of step" if m.get("comm_wait_fraction") is not None else "-"
        lines.append(f"| {label[row]} | {batch[row]} | {prec[row]} | {m['tokens_per_second']:,.0f} | "
                     f"{m['sentences_per_second']:,.1f} | {100 * m['padding_fraction']:.1f}% | {fmt_mem(m)} | {wait} |")
    lines.append("")
    for name, r in report["ratios"].items():
        reps = ", ".join(f"{v:.2f}" for v in r["per_rep"])
        lines.append(f"{name}: {r['median']:.2f}x (reps: {reps}; target >= {r['target']:g}x: "
                     f"{'met' if r['met'] else 'NOT met'})")
    hv = [r for r in ("hvdft-1", "hvdft-2") if r in med]
    if hv:
        lines += ["", "where a step's time goes (ms per step, mean over ranks, median over reps):",
                  "| run | step | collate | per-step allreduce wait | synchronize() wait | log allreduce | "
                  "forward+backward+update (rest) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for row in hv + [r for r in ("plain", "naive") if r in med]:
            m = med[row]
            rest = m["step_ms"] - m["collate_ms"] - (m["sync_wait_ms"] or 0) - (m["step_allreduce_wait_ms"] or 0) \
                - (m["log_allreduce_wait_ms"] or 0)
            lines.append(f"| {row} | {m['step_ms']:.0f} | {m['collate_ms']:.1f} | {m['step_allreduce_wait_ms']:.1f} | "
                         f"{m['sync_wait_ms']:.1f} | {m['log_allreduce_wait_ms']:.1f} | {rest:.0f} |")
        if med.get("hvdft-2", {}).get("rank_slot_imbalance") is not None:
            gap = 100 * med["hvdft-2"]["rank_slot_imbalance"]
            lines.append(f"hvdft-2: per step, the lighter rank's batch has {gap:.0f}% "
                         "fewer padded tokens than the heavier one's (it waits in synchronize() for the other)")
    pre = report.get("preprocessing")
    if pre:
        lines += ["", f"preprocessing ({Path(pre['file']).parent.name}/{Path(pre['file']).name}, "
                      f"{pre['sentences']:,} sentences, hvdft.data.prepare.tokenize): first run "
                      f"{pre['cold_s']:.2f}s ({pre['cold_sentences_per_second']:,.0f} sentences/s), "
                      f"from the cache {pre['warm_s']:.2f}s ({pre['speedup']:.1f}x faster); "
                      f"reading the file {pre['read_s']:.2f}s"]
    others = [r["other_cpu_cores"] for r in report["runs"] if r.get("other_cpu_cores") is not None]
    lines += ["", f"load average: {meta['load_start']:.2f} at start, {meta['load_end']:.2f} at end "
                  f"({meta['cpu_count']} CPUs)" + (
                      f"; other processes kept {statistics.fmean(others):.2f} cores busy on average during the "
                      f"runs (worst run {max(others):.2f})" if others else "")]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="Tiny run: bundled WNUT-17, minilm, 6 steps, 1 rep.")
    p.add_argument("--data", help="Folder with train.txt [default: ../shared/data/conll2003, else bundled WNUT-17].")
    p.add_argument("--model", default="minilm", help="'minilm', 'bert-base-random' or a local model folder.")
    p.add_argument("--reps", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup", type=int, help="Steps excluded from the figures [default 2].")
    p.add_argument("--batch", type=int, default=32, help="hvdft-1 and plain batch.")
    p.add_argument("--batch-2", type=int, default=16, help="Per-rank batch of hvdft-2.")
    p.add_argument("--naive-batch", type=int, default=16)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="hvdft and plain (the naive recipe is always fp32).")
    p.add_argument("--rows", default=",".join(ROWS), help=f"Comma-separated subset of {','.join(ROWS)}.")
    p.add_argument("--no-cudnn-sdpa", action="store_true", help="Disable the cuDNN attention backend in every run.")
    p.add_argument("--hvdft-env", action="append", default=[], metavar="KEY=VALUE",
                   help="Extra environment for the hvdft runs (repeatable), e.g. HOROVOD_FUSION_THRESHOLD=67108864.")
    p.add_argument("--no-preprocessing", action="store_true", help="Skip the tokenization timing.")
    p.add_argument("--workdir", help="Runs, logs, cache [default: a temporary folder, removed at the end].")
    p.add_argument("--timeout", type=float, default=1800, help="Seconds per run.")
    p.add_argument("--json", help="Write the full report here.")
    a = p.parse_args(argv)
    a.reps = a.reps or (1 if a.smoke else 3)
    a.steps = a.steps or (6 if a.smoke else 60)
    a.warmup = 2 if a.warmup is None else a.warmup
    a.rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    bad = [r for r in a.rows if r not in ROWS]
    if bad or not a.rows:
        p.error(f"--rows: unknown {bad}; choose from {ROWS}")
    if not 0 <= a.warmup < a.steps:
        p.error("--warmup must be below --steps")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    train_file, data_label = resolve_data(a.data, a.smoke)
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="hvdft-bench-"))
    for sub in ("logs", "profiles", "out", "cache"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    model = resolve_model(a.model, workdir)
    import torch

    cuda = torch.cuda.is_available()
    device_label = (f"{torch.cuda.get_device_name(0)}" if cuda else
                    f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})")
    meta = {
        "argv": sys.argv, "model": model, "model_label": a.model, "data": str(train_file),
        "data_label": data_label, "steps": a.steps, "warmup": a.warmup, "reps": a.reps, "batch": a.batch,
        "batch_2": a.batch_2, "naive_batch": a.naive_batch, "precision": a.precision, "rows": a.rows,
        "no_cudnn_sdpa": a.no_cudnn_sdpa, "hvdft_env": a.hvdft_env, "cpu_count": os.cpu_count(),
        "device_label": device_label,
        "python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
        "load_start": load_average(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    print(f"bench: {a.model} on {data_label} ({train_file}), {a.steps} steps x {a.reps} rep(s), "
          f"rows {','.join(a.rows)}; workdir {workdir}", flush=True)
    runs: list[dict[str, Any]] = []
    try:
        for rep in range(a.reps):
            order = a.rows[rep % len(a.rows):] + a.rows[:rep % len(a.rows)]  # rotate: no row always first
            for row in order:
                s = run_row(row, a, model, train_file, 42 + rep, workdir)
                s["rep"] = rep
                runs.append(s)
                wait = f", wait {100 * s['comm_wait_fraction']:.0f}%" if s["comm_wait_fraction"] is not None else ""
                print(f"  rep {rep} {row:8s} {s['tokens_per_second']:9,.0f} tokens/s  "
                      f"{s['sentences_per_second']:7,.1f} sent/s  pad {100 * s['padding_fraction']:4.1f}%{wait}  "
                      f"(wall {s['wall_s']:.0f}s, load {s['load_before']:.2f}, "
                      f"others {s['other_cpu_cores'] or 0:.2f} cores)", flush=True)
        pre = None if a.no_preprocessing else preprocessing(train_file, model, workdir, a.timeout)
    except RunFailed as exc:
        print(f"bench: a run failed: {exc}\n(workdir kept: {workdir})", file=sys.stderr)
        return 1
    meta["load_end"] = load_average()
    report = {"meta": meta, "runs": runs, "median": median_rows(runs), "ratios": ratios(runs, a.reps),
              "preprocessing": pre}
    report["table"] = table(report)
    print("\n" + report["table"], flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2, default=str))
        print(f"\nbench: report written to {a.json}")
    if not a.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
