"""A stand-in multi-rank job for the launcher tests: allreduces through hvdft.dist.

Prints one line per rank (rank, size, host, controller), checks that an allreduce of
ones sums to the world size, then keeps allreducing for --seconds (0: until killed) so
a test can cut the network under a job that is really exchanging data.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time

import torch

from hvdft import dist


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=0.0)
    parser.add_argument("--interval", type=float, default=0.05)
    args = parser.parse_args()

    dist.init(threads_per_rank=1)
    rank, size = dist.rank(), dist.size()
    print(
        f"rank {rank}/{size} host={socket.gethostname()} controller={dist.controller()}",
        flush=True,
    )
    total = dist.allreduce(torch.ones(4), name="check")
    ok = bool(torch.all(total == size))
    print(f"rank {rank} allreduce sum={total[0].item():g} expected={size} ok={ok}", flush=True)
    if not ok:
        return 1

    start = time.monotonic()
    step = 0
    while args.seconds == 0 or time.monotonic() - start < args.seconds:
        dist.allreduce(torch.full((1024,), float(step)), name="loop")
        step += 1
        if step % 100 == 0:
            print(f"rank {rank} step {step}", flush=True)
        time.sleep(args.interval)
    print(f"rank {rank} done after {step} steps", flush=True)
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
