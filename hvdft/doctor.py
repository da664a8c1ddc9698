"""`hvdft doctor`: versions, Horovod's build, MPI, and a live check of every rank."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
from typing import Any


def versions() -> tuple[dict[str, str], list[str]]:
    """(name -> version or detail, problems)."""
    info: dict[str, str] = {"python": platform.python_version(), "platform": platform.platform()}
    problems: list[str] = []
    torch_has_cuda = False
    for name in ("torch", "transformers", "datasets", "tokenizers", "horovod", "mpi4py", "seqeval"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = "MISSING"
            problems.append(f"{name} is not installed (run ./install.sh)")
    try:
        import torch

        torch_has_cuda = bool(torch.version.cuda)
        info["torch.cuda"] = torch.version.cuda or "none (CPU build)"
        if torch.cuda.is_available():
            info["gpus"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
            info["torch.nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except ImportError as exc:
        problems.append(f"torch does not import: {exc}")
    try:
        from hvdft import dist

        built = dist.build_info()
        info["horovod.built"] = ", ".join(k for k, v in built.items() if v) or "nothing"
        for need in ("mpi", "gloo"):
            if not built[need]:
                problems.append(f"Horovod was built without {need.upper()} (rerun ./install.sh)")
        if torch_has_cuda and not built["nccl"]:
            problems.append("torch has CUDA but Horovod was built without NCCL (./install.sh --cuda ...)")
    except ImportError as exc:
        problems.append(f"horovod.torch does not import: {exc}")
    info["mpi"] = mpi_library()
    return info, problems


def mpi_library() -> str:
    """The MPI library mpi4py is linked against (without initialising MPI)."""
    try:
        import mpi4py

        from hvdft.dist import launched_by_mpi

        if not launched_by_mpi():
            mpi4py.rc.initialize = False  # only MPI-launched processes initialise MPI
        from mpi4py import MPI

        return MPI.Get_library_version().strip().splitlines()[0]
    except Exception as exc:  # noqa: BLE001 - report whatever broke
        return f"unavailable ({exc})"


def rank_check() -> dict[str, Any]:
    """Collective: every rank reports itself; a known allreduce verifies the transport."""
    import torch

    from hvdft import dist

    dist.init()
    me = {
        "rank": dist.rank(),
        "size": dist.size(),
        "local_rank": dist.local_rank(),
        "local_size": dist.local_size(),
        "host": dist.hostname(),
        "pid": os.getpid(),
        "controller": dist.controller(),
        "device": str(dist.device()),
    }
    ranks = dist.allgather_object(me)
    size = dist.size()
    total = dist.allreduce(torch.tensor([float(dist.rank() + 1)], dtype=torch.float64), op="sum", name="doctor.sum")
    mean = dist.allreduce(torch.full((1024,), float(dist.rank()), dtype=torch.float32), op="average", name="doctor.avg")
    expected_sum = size * (size + 1) / 2
    expected_mean = (size - 1) / 2
    ok = abs(float(total[0]) - expected_sum) < 1e-9 and bool(torch.allclose(mean, torch.full_like(mean, expected_mean)))
    return {
        "ranks": ranks,
        "allreduce": {"sum": float(total[0]), "expected_sum": expected_sum,
                      "mean": float(mean[0]), "expected_mean": expected_mean, "ok": ok},
    }


def format_report(info: dict[str, str], problems: list[str], check: dict[str, Any] | None) -> str:
    width = max(len(k) for k in info) + 2
    lines = ["hvdft doctor", ""]
    lines += [f"  {k + ':':<{width}} {v}" for k, v in info.items()]
    if check:
        lines += ["", f"  ranks ({len(check['ranks'])}):"]
        for r in check["ranks"]:
            lines.append(
                f"    rank {r['rank']}/{r['size']}  local {r['local_rank']}/{r['local_size']}  "
                f"host {r['host']}  pid {r['pid']}  {r['controller']}  {r['device']}"
            )
        a = check["allreduce"]
        verdict = "OK" if a["ok"] else "WRONG"
        lines.append(
            f"  allreduce: sum {a['sum']:g} (expected {a['expected_sum']:g}), "
            f"average {a['mean']:g} (expected {a['expected_mean']:g}): {verdict}"
        )
    lines.append("")
    lines += [f"  PROBLEM: {p}" for p in problems] or ["  all checks passed"]
    return "\n".join(lines)


def exit_code(problems: list[str], check: dict[str, Any] | None) -> int:
    if problems or (check is not None and not check["allreduce"]["ok"]):
        return 1
    return 0

