"""`hvdft` exactly as the console script runs it, with per-step timing recorded from outside.

    python benchmarks/hvdft_profiled.py train ner ...            # same arguments as `hvdft`
    horovodrun -np 2 --gloo python benchmarks/hvdft_profiled.py train ner ...

Nothing in hvdft is edited. Before `hvdft.cli.main()` runs, a few module attributes that
the training loop looks up at call time are wrapped with timers:

- `hvdft.train.collate`       -> real tokens, padded slots and rows of every training batch
                                  (evaluation imports its own `collate`: not counted);
- `hvdft.dist.allreduce`      -> seconds blocked in the per-step "step" allreduce (a tiny
                                  tensor: this is the wait for the slowest rank) and the
                                  every-`--log-every` "log" allreduce;
- `hvdft.dist.wrap_optimizer` -> the returned DistributedOptimizer's `synchronize()` (the
                                  wait for the gradient allreduces still in flight when
                                  backward ends) and `zero_grad()` (the last call of a step:
                                  its return time stamps the end of the step);
- `hvdft.train.train`         -> after training, this rank's record goes to
                                  $HVDFT_BENCH_PROFILE/rank<N>.json with its peak RSS
                                  (getrusage ru_maxrss) and CUDA peak allocation.

Env: HVDFT_BENCH_PROFILE (folder, required for a record), HVDFT_BENCH_WARMUP (steps
excluded from the figures: on CUDA the device is synchronised at the end of that step and
of the last one, so the measured window holds all of its GPU work), HVDFT_BENCH_NO_CUDNN_SDPA=1
(torch.backends.cuda.enable_cudnn_sdp(False) before anything runs; hvdft's own
HVDFT_CUDNN_SDPA, when present, also keeps it off by default).
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path


def _install() -> None:
    import torch

    if os.environ.get("HVDFT_BENCH_NO_CUDNN_SDPA") == "1" and hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)

    out = os.environ.get("HVDFT_BENCH_PROFILE")
    if not out:
        return
    import hvdft.dist as dist
    import hvdft.train as train_mod

    clock = time.perf_counter
    cuda = torch.cuda.is_available()
    steps: list[dict] = []
    cur = {"tokens": 0, "slots": 0, "rows": 0, "collate_s": 0.0, "step_allreduce_s": 0.0,
           "log_allreduce_s": 0.0, "sync_s": 0.0}
    state = {"t_start": None, "sync_at": set()}

    def fresh() -> None:
        cur.update(tokens=0, slots=0, rows=0, collate_s=0.0, step_allreduce_s=0.0,
                   log_allreduce_s=0.0, sync_s=0.0)

    real_collate = train_mod.collate

    def collate(features, rows, *args, **kwargs):
        t = clock()
        if state["t_start"] is None:
            state["t_start"] = t  # the first step's t0 is a few microseconds before this
        batch = real_collate(features, rows, *args, **kwargs)
        cur["collate_s"] += clock() - t
        cur["tokens"] += batch.real_tokens
        cur["slots"] += int(batch.inputs["input_ids"].numel())
        cur["rows"] += len(rows)
        return batch

    train_mod.collate = collate

    real_allreduce = dist.allreduce

    def allreduce(tensor, op="sum", name=None):
        t = clock()
        result = real_allreduce(tensor, op=op, name=name)
        if name == "step":
            cur["step_allreduce_s"] += clock() - t
        elif name == "log":
            # Lands after zero_grad: counted in the next step's interval (as it runs).
            cur["log_allreduce_s"] += clock() - t
        return result

    dist.allreduce = allreduce

    real_wrap = dist.wrap_optimizer

    def wrap_optimizer(*args, **kwargs):
        opt = real_wrap(*args, **kwargs)
        real_sync, real_zero = opt.synchronize, opt.zero_grad

        def synchronize():
            t = clock()
            real_sync()
            cur["sync_s"] += clock() - t

        def zero_grad(*a, **k):
            real_zero(*a, **k)
            if cuda and len(steps) + 1 in state["sync_at"]:
                # Queued GPU work finished at the window's edges only: hvdft itself
                # never syncs the device per step, and neither does this record.
                torch.cuda.synchronize()
            steps.append({"t_end": clock(), **cur})
            fresh()

        opt.synchronize, opt.zero_grad = synchronize, zero_grad
        return opt

    dist.wrap_optimizer = wrap_optimizer

    real_train = train_mod.train

    def train(cfg):
        warmup = int(os.environ.get("HVDFT_BENCH_WARMUP", "0"))
        state["sync_at"] = {warmup, cfg.max_steps}
        results = real_train(cfg)
        record = {
            "rank": dist.rank(), "world": dist.size(), "threads": torch.get_num_threads(),
            "t_start": state["t_start"], "steps": steps,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "device": str(dist.device()), "results": results,
        }
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"rank{dist.rank()}.json").write_text(json.dumps(record, default=str))
        return results

    train_mod.train = train


if __name__ == "__main__":
    _install()
    from hvdft.cli import main

    main()
