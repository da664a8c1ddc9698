"""The CPU's own fast path: precision, torch.compile and 2-rank scaling, in one invocation.

    .venv/bin/python benchmarks/bench.py --suite cpu-fast-path [--json out.json]   # or:
    .venv/bin/python benchmarks/cpu_fast_path.py [--parts speed,f1,scaling] [--smoke] [--json out.json]

A kernel line and three tables, every figure measured in this run (bench.py's machinery: the unchanged hvdft
CLI under benchmarks/hvdft_profiled.py, and benchmarks/plain_loop.py as the baseline):

kernel   one BERT-base-sized matmul in fp32 and bf16 on one thread, in GFLOP per CPU-second
         (CPU time: what the CPU's units give bf16, whatever else the machine is running).
speed    hvdft on 1 rank and the plain PyTorch loop side by side, for fp32, bf16 (autocast,
         fp32 weights and optimizer state), --compile (torch.compile, dynamic shapes, on the
         length-grouped batches) and bf16 + compile; MiniLM-L6 and a random-initialised
         BERT-base. Real (non-pad) tokens/s over steps warmup+1..steps (the compile steps
         fall in the warm-up), median of the reps.
f1       dev F1 after one epoch of CoNLL-2003 train, MiniLM, hvdft on 1 rank, fp32 against
         bf16 (same seed, batch 32), with the epoch's real tokens/s (a long, steady window).
scaling  hvdft on 2 ranks against 1 rank (same global batch), MiniLM fp32: Gloo and MPI
         controllers, --fp16-allreduce, a larger fusion buffer and cycle time, --grad-accum
         4, and the best of these combined; each with its ratio to hvdft-1 and where a step's
         time goes (synchronize() wait, per-step allreduce wait). The ceiling of the box:
         two independent 1-thread hvdft runs of batch 16 at once (no communication at all).

Every run records the 1-minute load average at its start and the CPU cores other processes
kept busy while it ran; a row whose load was above --load-limit (3) is flagged "loaded".
`--smoke` runs every code path on the bundled WNUT-17 in a few minutes (tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

CONFIGS = {  # speed part: name -> (precision, compile)
    "fp32": ("fp32", False),
    "bf16": ("bf16", False),
    "compile": ("fp32", True),
    "bf16+compile": ("bf16", True),
}
FUSION_ENV = ["HOROVOD_FUSION_THRESHOLD=134217728", "HOROVOD_CYCLE_TIME=10"]


def base_args(a: argparse.Namespace, **over: Any) -> argparse.Namespace:
    """bench.py's options for one run."""
    ns = argparse.Namespace(
        batch=32, batch_2=16, naive_batch=16, precision="fp32", compile=False, controller="gloo",
        fp16_allreduce=False, grad_accum=1, hvdft_env=[], no_cudnn_sdpa=False, timeout=a.timeout,
        steps=a.steps, warmup=a.warmup)
    for k, v in over.items():
        setattr(ns, k, v)
    return ns


def log_run(part: str, label: str, s: dict[str, Any]) -> None:
    wait = f", wait {100 * s['comm_wait_fraction']:.0f}%" if s.get("comm_wait_fraction") is not None else ""
    print(f"  {part:8s} {label:34s} {s['tokens_per_second']:8,.0f} tokens/s{wait}  (wall {s['wall_s']:.0f}s, "
          f"load {s['load_before']:.2f}, others {s['other_cpu_cores'] or 0:.2f} cores)", flush=True)


def loaded(runs: list[dict[str, Any]], limit: float) -> str:
    """The worst 1-minute load average at a run's start, and the cores others kept busy during it."""
    worst = max(r["load_before"] for r in runs)
    others = [r["other_cpu_cores"] for r in runs if r.get("other_cpu_cores") is not None]
    busy = f"; others used {max(others):.1f} cores" if others else ""
    return f"{worst:.1f}{busy}" + (" (loaded)" if worst > limit else "")


# ----------------------------------------------------------------------------- kernel


def part_kernel(reps: int = 20) -> dict[str, Any]:
    """One BERT-base feed-forward matmul (1,280 tokens x 768 -> 3,072), fp32 against bf16, on one
    thread, timed in this process's CPU seconds: what the CPU's units give bf16, nearly
    independent of other processes' load (they change the wall time, not the work)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x, w = torch.randn(1280, 768), torch.randn(3072, 768)
    out: dict[str, Any] = {"mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}
    try:
        for dtype in (torch.float32, torch.bfloat16):
            a, b = x.to(dtype), w.to(dtype)
            for _ in range(3):
                torch.nn.functional.linear(a, b)
            t = time.process_time()
            for _ in range(reps):
                torch.nn.functional.linear(a, b)
            cpu = (time.process_time() - t) / reps
            flops = 2 * 1280 * 768 * 3072
            out[str(dtype).split(".")[1]] = {"cpu_ms": 1000 * cpu, "gflops_per_cpu_s": flops / cpu / 1e9}
    finally:
        torch.set_num_threads(threads)
    out["bf16_over_fp32"] = out["bfloat16"]["gflops_per_cpu_s"] / out["float32"]["gflops_per_cpu_s"]
    return out


def kernel_line(k: dict[str, Any]) -> str:
    return (f"Kernel: a BERT-base feed-forward matmul (1,280 x 768 -> 3,072) on one thread: fp32 "
            f"{k['float32']['gflops_per_cpu_s']:.1f} GFLOP per CPU-second, "
            f"bf16 {k['bfloat16']['gflops_per_cpu_s']:.1f} "
            f"({k['bf16_over_fp32']:.2f}x); oneDNN bf16 support on this CPU: {k['mkldnn_bf16_supported']}")


# ----------------------------------------------------------------------------- speed


def part_speed(a: argparse.Namespace, train_file: Path, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": []}
    for model_name in a.models:
        model = bench.resolve_model(model_name, workdir)
        big = model_name != "minilm"
        steps, warmup, reps = (a.bert_steps, a.bert_warmup, a.bert_reps) if big else (a.steps, a.warmup, a.reps)
        # bf16 without bf16 units is 20x slower per step than fp32: its rows get fewer steps
        bf16_steps, bf16_warmup = (a.bert_bf16_steps, 1) if big else (a.bf16_steps, 2)
        configs = [c for c in a.configs if not big or c in a.bert_configs]
        cells = [(c, r) for c in configs for r in ("hvdft-1", "plain")]
        for rep in range(reps):
            k = rep % len(cells)
            for config, row in cells[k:] + cells[:k]:  # rotate: no cell always first
                precision, comp = CONFIGS[config]
                n, w = (bf16_steps, min(warmup, bf16_warmup)) if precision == "bf16" and bf16_steps else (steps, warmup)
                ns = base_args(a, precision=precision, compile=comp, steps=n, warmup=w)
                s = bench.run_row(row, ns, model, train_file, 42 + rep, workdir, variant=f"{model_name}-{config}")
                s.update(part="speed", model=model_name, config=config, rep=rep, steps=n, warmup=w)
                out["runs"].append(s)
                log_run("speed", f"{model_name} {config} {row}", s)
    return out


def speed_table(runs: list[dict[str, Any]], a: argparse.Namespace) -> str:
    lines = ["| model | configuration | hvdft, 1 rank (tokens/s) | plain loop (tokens/s) | hvdft / plain | "
             "hvdft vs its fp32 | plain vs its fp32 | hvdft tokens per CPU-s (vs fp32) | "
             "plain tokens per CPU-s (vs fp32) | reps | load at start |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model in dict.fromkeys(r["model"] for r in runs):
        med: dict[tuple[str, str], float] = {}
        cpu: dict[tuple[str, str], float] = {}
        for config in a.configs:
            for row in ("hvdft-1", "plain"):
                mine = [r for r in runs if (r["model"], r["config"], r["row"]) == (model, config, row)]
                if mine:
                    med[config, row] = statistics.median(r["tokens_per_second"] for r in mine)
                vals = [r["tokens_per_cpu_second"] for r in mine if r.get("tokens_per_cpu_second")]
                if vals:
                    cpu[config, row] = statistics.median(vals)
        for config in a.configs:
            mine = [r for r in runs if (r["model"], r["config"]) == (model, config)]
            if not mine:
                continue
            h, p = med.get((config, "hvdft-1")), med.get((config, "plain"))
            hf, pf = med.get(("fp32", "hvdft-1")), med.get(("fp32", "plain"))

            def fmt(x: float | None) -> str:
                return f"{x:,.0f}" if x else "-"

            def rel(x: float | None, y: float | None) -> str:
                return f"{x / y:.2f}x" if x and y else "-"

            reps = len({r["rep"] for r in mine})
            hc, pc = cpu.get((config, "hvdft-1")), cpu.get((config, "plain"))
            hcf, pcf = cpu.get(("fp32", "hvdft-1")), cpu.get(("fp32", "plain"))
            lines.append(f"| {model} | {config} | {fmt(h)} | {fmt(p)} | {rel(h, p)} | {rel(h, hf)} | {rel(p, pf)} | "
                         f"{fmt(hc)} ({rel(hc, hcf)}) | {fmt(pc)} ({rel(pc, pcf)}) | "
                         f"{reps} | {loaded(mine, a.load_limit)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- f1


def part_f1(a: argparse.Namespace, train_file: Path, valid_file: Path, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": []}
    model = bench.resolve_model("minilm", workdir)
    if a.f1_eval_samples:  # a file of the first N: the final report evaluates the whole file it is given
        valid_file = first_sentences(valid_file, a.f1_eval_samples, workdir / f"valid-{a.f1_eval_samples}.txt")
    extra = ["--epochs", "1", "--validation-file", str(valid_file), "--lr", str(a.f1_lr)]
    if a.f1_train_samples:
        extra += ["--max-train-samples", str(a.f1_train_samples)]
    for precision in a.f1_precisions:
        ns = base_args(a, precision=precision, steps=0, warmup=a.warmup)
        s = bench.run_row("hvdft-1", ns, model, train_file, 42, workdir, variant=f"f1-{precision}", extra=extra)
        res = json.loads((workdir / "out" / f"f1-{precision}-hvdft-1-seed42" / "all_results.json").read_text())
        s.update(part="f1", precision=precision, rep=0, dev_f1=res.get("best_eval_metric"),
                 epoch=res.get("epoch"), train_steps=res.get("train_steps"))
        out["runs"].append(s)
        log_run("f1", f"minilm {precision} (dev F1 {100 * (s['dev_f1'] or 0):.2f})", s)
    return out


def first_sentences(path: Path, n: int, out: Path) -> Path:
    """The first n sentences of a CoNLL file (a sentence ends at a blank line), written to `out`."""
    kept, count = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        kept.append(line)
        count += not line.strip()
        if count == n:
            break
    out.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return out


def f1_table(runs: list[dict[str, Any]], a: argparse.Namespace) -> str:
    lines = ["| precision | dev F1 (1 epoch) | real tokens/s over the epoch | vs fp32 | tokens per CPU-s | vs fp32 | "
             "steps | load at start |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    ref = next((r for r in runs if r["precision"] == "fp32"), None)
    for r in runs:
        vs = f"{r['tokens_per_second'] / ref['tokens_per_second']:.2f}x" if ref else "-"
        tc, rc = r.get("tokens_per_cpu_second"), (ref or {}).get("tokens_per_cpu_second")
        vc = f"{tc / rc:.2f}x" if tc and rc else "-"
        f1 = f"{100 * r['dev_f1']:.2f}" if r.get("dev_f1") is not None else "-"
        lines.append(f"| {r['precision']} | {f1} | {r['tokens_per_second']:,.0f} | {vs} | "
                     f"{f'{tc:,.0f}' if tc else '-'} | {vc} | {r['train_steps']} | "
                     f"{loaded([r], a.load_limit)} |")
    return "\n".join(lines)


def bf16_verdict(speed: list[dict[str, Any]], f1: list[dict[str, Any]]) -> dict[str, Any]:
    """Is bf16 faster at equal F1 (within 0.5 points)? From this run's own figures."""
    def med(config: str, model: str) -> float | None:
        vals = [r["tokens_per_second"] for r in speed
                if (r["config"], r["row"], r["model"]) == (config, "hvdft-1", model)]
        return statistics.median(vals) if vals else None

    speedups = {m: med("bf16", m) / med("fp32", m) for m in dict.fromkeys(r["model"] for r in speed)
                if med("bf16", m) and med("fp32", m)}
    by = {r["precision"]: r for r in f1}
    f1_gap = (100 * (by["bf16"]["dev_f1"] - by["fp32"]["dev_f1"])
              if "bf16" in by and "fp32" in by and by["bf16"].get("dev_f1") is not None else None)
    epoch_speedup = (by["bf16"]["tokens_per_second"] / by["fp32"]["tokens_per_second"]
                     if "bf16" in by and "fp32" in by else None)
    faster = bool(speedups) and all(v > 1.0 for v in speedups.values()) and (epoch_speedup or 1.01) > 1.0
    equal = f1_gap is not None and abs(f1_gap) <= 0.5
    return {"hvdft_bf16_over_fp32": speedups, "epoch_bf16_over_fp32": epoch_speedup, "f1_gap_points": f1_gap,
            "faster": faster, "equal_f1": equal, "bf16_pays": faster and equal}


# ----------------------------------------------------------------------------- scaling


def scaling_variants(best: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    base = {"row": "hvdft-2"}
    plain = [
        ("hvdft-1 (batch 32)", {"row": "hvdft-1"}),
        ("2 x 16, Gloo", dict(base)),
        ("2 x 16, MPI (mpirun)", dict(base, controller="mpi")),
        ("2 x 16, Gloo, --fp16-allreduce", dict(base, fp16_allreduce=True)),
        ("2 x 16, Gloo, fusion 128 MiB, cycle 10 ms", dict(base, hvdft_env=FUSION_ENV)),
        ("2 x 16 x accum 4, Gloo", dict(base, grad_accum=4)),
    ]
    if best is None:
        return plain
    return [("best combined: " + best["label"], dict(best["over"]))]


def part_scaling(a: argparse.Namespace, train_file: Path, workdir: Path) -> dict[str, Any]:
    model = bench.resolve_model("minilm", workdir)
    runs: list[dict[str, Any]] = []

    def one(label: str, over: dict[str, Any], rep: int) -> dict[str, Any]:
        over = dict(over)
        row = over.pop("row")
        accum = over.get("grad_accum", 1)
        steps, warmup = max(2, a.scaling_steps // accum), max(1, a.warmup // accum)
        ns = base_args(a, steps=steps, warmup=warmup, **over)
        s = bench.run_row(row, ns, model, train_file, 42 + rep, workdir, variant=f"scale{len(runs)}")
        s.update(part="scaling", label=label, rep=rep, options=over,
                 global_batch=32 if row == "hvdft-1" else 32 * accum)
        runs.append(s)
        log_run("scaling", label, s)
        return s

    for rep in range(a.scaling_reps):
        for label, over in scaling_variants(None):
            one(label, over, rep)
        # The ceiling of this box: two independent 1-thread runs of batch 16, at the same time.
        ns = base_args(a, steps=a.scaling_steps, warmup=a.warmup, batch=16, hvdft_env=["OMP_NUM_THREADS=1"])
        pair: list[dict[str, Any]] = []

        def solo(i: int, rep: int = rep, ns: argparse.Namespace = ns, pair: list = pair) -> None:
            pair.append(bench.run_row("hvdft-1", ns, model, train_file, 42 + rep, workdir, variant=f"ceiling{i}"))

        threads = [threading.Thread(target=solo, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if len(pair) != 2:
            raise bench.RunFailed("a ceiling run failed (see the logs in the workdir)")
        cpu_s = [p["cpu_seconds"] for p in pair if p.get("cpu_seconds")]
        s = dict(pair[0], tokens_per_second=sum(p["tokens_per_second"] for p in pair),
                 tokens_per_cpu_second=sum(p["real_tokens"] for p in pair) / sum(cpu_s) if len(cpu_s) == 2 else None,
                 load_before=max(p["load_before"] for p in pair), part="scaling", rep=rep, global_batch=32,
                 other_cpu_cores=None,  # each run counts its twin as "others": not meaningful here
                 label="ceiling: 2 independent 1-thread runs of 16, no communication", options={"ceiling": True})
        runs.append(s)
        log_run("scaling", "ceiling (2 x 1 thread, no allreduce)", s)
    ratio = scaling_ratios(runs)
    candidates = {k: v for k, v in ratio.items() if k.startswith("2 x 16")}
    # Combine what helped: the better controller, and each option that beat plain Gloo.
    gloo = candidates.get("2 x 16, Gloo", 0.0)
    over: dict[str, Any] = {"row": "hvdft-2", "grad_accum": 4}
    parts = ["2 x 16 x accum 4"]
    if candidates.get("2 x 16, MPI (mpirun)", 0.0) > gloo:
        over["controller"], _ = "mpi", parts.append("MPI")
    else:
        parts.append("Gloo")
    if candidates.get("2 x 16, Gloo, --fp16-allreduce", 0.0) > gloo:
        over["fp16_allreduce"], _ = True, parts.append("--fp16-allreduce")
    if candidates.get("2 x 16, Gloo, fusion 128 MiB, cycle 10 ms", 0.0) > gloo:
        over["hvdft_env"], _ = FUSION_ENV, parts.append("fusion 128 MiB, cycle 10 ms")
    best = {"label": ", ".join(parts), "over": over}
    if len(over) > 2:  # something beyond accumulation helped: measure the combination
        for rep in range(a.scaling_reps):
            for label, o in scaling_variants(best):
                one(label, o, rep)
    return {"runs": runs, "ratios": scaling_ratios(runs), "cpu_ratios": scaling_ratios(runs, "tokens_per_cpu_second")}


def scaling_ratios(runs: list[dict[str, Any]], key: str = "tokens_per_second") -> dict[str, float]:
    """Median over reps of (variant `key`) / (hvdft-1 `key` of the same rep)."""
    out: dict[str, float] = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        per = []
        for r in (r for r in runs if r["label"] == label):
            ref = next((x for x in runs if x["label"] == "hvdft-1 (batch 32)" and x["rep"] == r["rep"]), None)
            if ref and r.get(key) and ref.get(key):
                per.append(r[key] / ref[key])
        if per:
            out[label] = statistics.median(per)
    return out


def scaling_table(res: dict[str, Any], a: argparse.Namespace) -> str:
    runs, ratio, cratio = res["runs"], res["ratios"], res.get("cpu_ratios", {})
    lines = ["| configuration | global batch | real tokens/s | ratio to hvdft-1 | tokens per CPU-s | "
             "ratio to hvdft-1 (CPU) | step (ms) | synchronize() wait (ms) | per-step allreduce wait (ms) | "
             "comm wait | load at start |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label in dict.fromkeys(r["label"] for r in runs):
        mine = [r for r in runs if r["label"] == label]

        def m(key: str, mine: list[dict[str, Any]] = mine) -> float | None:
            vals = [r[key] for r in mine if r.get(key) is not None]
            return statistics.median(vals) if vals else None

        comm = m("comm_wait_fraction")
        ceiling = mine[0]["options"].get("ceiling")
        tc = m("tokens_per_cpu_second")
        lines.append(
            f"| {label} | {mine[0]['global_batch']} | {m('tokens_per_second'):,.0f} | {ratio.get(label, 0):.2f}x | "
            f"{f'{tc:,.0f}' if tc else '-'} | {f'{cratio[label]:.2f}x' if label in cratio else '-'} | "
            f"{'-' if ceiling else format(m('step_ms'), '.0f')} | "
            f"{'-' if comm is None else format(m('sync_wait_ms'), '.0f')} | "
            f"{'-' if comm is None else format(m('step_allreduce_wait_ms'), '.0f')} | "
            f"{'-' if comm is None else format(100 * comm, '.0f') + '%'} | "
            f"{loaded(mine, a.load_limit)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="Every code path, tiny: bundled WNUT-17, 4 steps, 1 rep.")
    p.add_argument("--parts", default="speed,f1,scaling", help="Comma-separated subset of speed,f1,scaling.")
    p.add_argument("--data", help="Folder with train.txt and valid.txt [default: ../shared/data/conll2003].")
    p.add_argument("--models", default="minilm,bert-base-random", help="Speed part's models.")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"Speed part's subset of {','.join(CONFIGS)}.")
    p.add_argument("--steps", type=int, default=40, help="MiniLM speed runs [40].")
    p.add_argument("--warmup", type=int, default=4, help="Steps left out of every figure (compile happens there).")
    p.add_argument("--reps", type=int, default=2, help="MiniLM speed reps [2].")
    p.add_argument("--bert-steps", type=int, default=12)
    p.add_argument("--bert-warmup", type=int, default=3)
    p.add_argument("--bert-reps", type=int, default=1)
    p.add_argument("--bert-configs", default=",".join(CONFIGS), help="BERT-base's subset of --configs.")
    p.add_argument("--bf16-steps", type=int, default=8,
                   help="MiniLM bf16 rows' steps (2 warm-up) [8; 0: --steps]: bf16 without bf16 units is slow.")
    p.add_argument("--bert-bf16-steps", type=int, default=3, help="BERT-base bf16 rows' steps (1 warm-up) [3].")
    p.add_argument("--f1-precisions", default="fp32,bf16")
    p.add_argument("--f1-train-samples", type=int, default=0,
                   help="Train on the first N sentences only (one epoch of those) [0: the whole file].")
    p.add_argument("--f1-lr", type=float, default=5e-5,
                   help="The F1 runs' learning rate [5e-5, hvdft's default; a subset's few steps need more].")
    p.add_argument("--f1-eval-samples", type=int, default=0,
                   help="Score on the first N validation sentences only [0: the whole file].")
    p.add_argument("--scaling-steps", type=int, default=40)
    p.add_argument("--scaling-reps", type=int, default=1)
    p.add_argument("--load-limit", type=float, default=3.0, help="Flag rows whose load at start was above this.")
    p.add_argument("--workdir", help="Runs, logs, cache [default: a temporary folder, removed at the end].")
    p.add_argument("--timeout", type=float, default=3600, help="Seconds per run.")
    p.add_argument("--json", help="Write the full report here.")
    a = p.parse_args(argv)
    a.parts = [x for x in a.parts.split(",") if x]
    a.models = [x for x in a.models.split(",") if x]
    a.configs = [x for x in a.configs.split(",") if x]
    a.bert_configs = [x for x in a.bert_configs.split(",") if x]
    a.f1_precisions = [x for x in a.f1_precisions.split(",") if x]
    if a.smoke:
        a.models, a.steps, a.warmup, a.reps, a.scaling_steps, a.scaling_reps = ["minilm"], 3, 1, 1, 3, 1
        # compile is the costly path: fp32 only (bf16 runs in the F1 part)
        a.configs, a.f1_train_samples, a.f1_eval_samples = ["fp32", "compile"], 64, 64
    bad = [c for c in a.configs + a.bert_configs if c not in CONFIGS]
    bad += [x for x in a.parts if x not in ("speed", "f1", "scaling")]
    if bad:
        p.error(f"unknown {bad}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    train_file, data_label = bench.resolve_data(a.data, a.smoke)
    valid_file = next((train_file.parent / n for n in ("valid.txt", "dev.txt", "validation.txt")
                       if (train_file.parent / n).is_file()), None)
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="hvdft-cpu-fast-path-"))
    for sub in ("logs", "profiles", "out", "cache"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    import platform

    import torch

    cpu_flags = ""
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split()
        cpu_flags = " ".join(f for f in flags if f.startswith(("avx512", "amx")) or f == "avx2")
    except (OSError, StopIteration):
        pass
    meta = {"argv": sys.argv, "data": str(train_file), "data_label": data_label, "cpu_count": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "cpu_flags": cpu_flags,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "load_start": bench.load_average(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "steps": a.steps, "warmup": a.warmup, "reps": a.reps, "bert_steps": a.bert_steps,
            "bert_warmup": a.bert_warmup, "bert_reps": a.bert_reps, "scaling_steps": a.scaling_steps,
            "scaling_reps": a.scaling_reps, "load_limit": a.load_limit}
    try:
        model_line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name"))
        meta["cpu"] = model_line.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        pass
    print(f"cpu-fast-path: {data_label} ({train_file}); parts {','.join(a.parts)}; workdir {workdir}; "
          f"{meta['cpu']}, {os.cpu_count()} cores, torch CPU capability {meta['torch_cpu_capability']}, "
          f"flags [{cpu_flags}]; load {meta['load_start']:.2f}", flush=True)
    report: dict[str, Any] = {"meta": meta}
    tables: list[str] = []

    def emit(text: str) -> None:  # each table as soon as its part is done, and the JSON so far
        tables.append(text)
        print("\n" + text + "\n", flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(dict(report, table="\n\n".join(tables)), indent=2, default=str))
    try:
        report["kernel"] = part_kernel()
        emit(kernel_line(report["kernel"]))
        if "speed" in a.parts:
            report["speed"] = part_speed(a, train_file, workdir)
            bert = (f", BERT-base-random {a.bert_steps} steps ({a.bert_warmup} excluded) x {a.bert_reps}"
                    if any(m != "minilm" for m in a.models) else "")
            bf16 = (f"; bf16 rows {a.bf16_steps} steps (2 excluded), BERT-base {a.bert_bf16_steps} (1 excluded)"
                    if a.bf16_steps and any(CONFIGS[c][0] == "bf16" for c in a.configs) else "")
            emit(f"Speed: hvdft on 1 rank and the plain loop; MiniLM {a.steps} steps ({a.warmup} warm-up "
                 f"excluded) x {a.reps} rep(s){bert}{bf16}; batch 32\n\n" + speed_table(report["speed"]["runs"], a))
        if "f1" in a.parts:
            if valid_file is None:
                raise bench.RunFailed(f"no valid.txt beside {train_file}")
            report["f1"] = part_f1(a, train_file, valid_file, workdir)
            subset = f" (its first {a.f1_train_samples:,} sentences)" if a.f1_train_samples else ""
            scored = f"its first {a.f1_eval_samples:,} sentences" if a.f1_eval_samples else "all of it"
            emit(f"Accuracy cost: MiniLM, hvdft 1 rank, batch 32, lr {a.f1_lr:g}, one epoch of {data_label} "
                 f"train{subset}, F1 on {valid_file.name} ({scored})\n\n" + f1_table(report["f1"]["runs"], a))
        if "speed" in a.parts and "f1" in a.parts:
            v = report["bf16_verdict"] = bf16_verdict(report["speed"]["runs"], report["f1"]["runs"])
            sp = ", ".join(f"{k} {x:.2f}x" for k, x in v["hvdft_bf16_over_fp32"].items())
            ep = f"{v['epoch_bf16_over_fp32']:.2f}x" if v["epoch_bf16_over_fp32"] else "-"
            gap = f"{v['f1_gap_points']:+.2f}" if v["f1_gap_points"] is not None else "-"
            emit(f"bf16 / fp32 (hvdft): {sp}; over the F1 epoch {ep}; F1 gap {gap} points -> "
                          f"{'bf16 pays' if v['bf16_pays'] else 'bf16 does not pay'} on this CPU")
        if "scaling" in a.parts:
            report["scaling"] = part_scaling(a, train_file, workdir)
            emit(f"Scaling: 2 ranks against 1, MiniLM fp32, {a.scaling_steps} optimizer steps "
                          f"({a.warmup} warm-up excluded; accumulation rows: steps / 4), {a.scaling_reps} rep(s)\n\n"
                          + scaling_table(report["scaling"], a))
    except bench.RunFailed as exc:
        print(f"cpu-fast-path: a run failed: {exc}\n(workdir kept: {workdir})", file=sys.stderr)
        return 1
    meta["load_end"] = bench.load_average()
    tables.append(f"{meta['cpu']}, {os.cpu_count()} cores, torch {torch.__version__} (CPU capability "
                  f"{meta['torch_cpu_capability']}); load average {meta['load_start']:.2f} at start, "
                  f"{meta['load_end']:.2f} at end; rows marked (loaded) started above {a.load_limit:g}")
    report["table"] = "\n\n".join(tables)
    print("\n" + report["table"], flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2, default=str))
        print(f"\ncpu-fast-path: report written to {a.json}")
    if not a.workdir:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
