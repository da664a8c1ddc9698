"""A small hvdft program for the `hvdft launch` tests: ranks start through hvdft.dist and
end through hvdft.cli.guarded, exactly as `hvdft train` does, without a model or data
(a job takes seconds instead of a minute on a busy 2-core machine).

    probe.py [--fail input|agreed|crash|kill|exit3] [--on RANK] [--steps N] [--progress]

Every rank prints `rank R start NAME=<value or -> ...` for HVDFT_FAULT, HVDFT_DEBUG_DIR and
HVDFT_CACHE (what the launcher let through to it),
allreduces once per step and prints `rank R step S`; at step 2 rank --on fails as asked:
`input` raises an HvdftError on that rank only (a one-rank input error), `agreed` one
every rank agrees on through dist.agree, `crash` a RuntimeError, `kill` SIGKILLs itself,
`exit3` exits with status 3. `--progress` has rank 0 draw a tqdm bar on stderr.
"""

from __future__ import annotations

import os
import signal
import sys

import click
import torch

from hvdft import dist
from hvdft.cli import guarded
from hvdft.errors import HvdftError


@click.command()
@click.option("--fail", type=click.Choice(["none", "input", "agreed", "crash", "kill", "exit3"]), default="none")
@click.option("--on", "culprit", type=int, default=1)
@click.option("--steps", type=int, default=3)
@click.option("--progress", is_flag=True)
@guarded
def main(fail: str, culprit: int, steps: int, progress: bool) -> int:
    dist.init()
    rank = dist.rank()
    seen = " ".join(f"{name}={os.environ.get(name, '-')}" for name in ("HVDFT_FAULT", "HVDFT_DEBUG_DIR", "HVDFT_CACHE"))
    print(f"rank {rank} start {seen}", flush=True)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=steps, file=sys.stderr, mininterval=0)
    for step in range(1, steps + 1):
        dist.allreduce(torch.ones(1), name=f"probe.{step}")
        print(f"rank {rank} step {step}", flush=True)
        if bar is not None:
            bar.update(1)
        if step == 2:
            _fail(fail, culprit, rank)
    if bar is not None:
        bar.close()
    return 0


def _fail(fail: str, culprit: int, rank: int) -> None:
    if fail == "agreed":
        dist.agree(lambda: _raise(HvdftError("probe.txt:3: a line every rank rejects")) if rank == culprit else None)
    if rank != culprit:
        return
    print(f"rank {rank} about to fail: {fail}", flush=True)
    if fail == "input":
        raise HvdftError("probe.txt:7: a line only this rank reads")
    if fail == "crash":
        raise RuntimeError("probe: a bug")
    if fail == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fail == "exit3":
        sys.stdout.flush()
        os._exit(3)


def _raise(exc: Exception) -> None:
    raise exc


if __name__ == "__main__":
    main()
