"""The suite's own job policy (tests/support.py): what a timeout kills, what a job sees."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil
import pytest
from support import Job, job_env


def test_a_timeout_kills_the_launcher_and_its_ranks(tmp_path: Path) -> None:
    """A stand-in launcher starts two 'ranks' and waits; on timeout none may survive."""
    pids = tmp_path / "pids"
    script = f"sleep 300 & echo $! >> {pids}; sleep 300 & echo $! >> {pids}; wait"
    job = Job(["bash", "-c", script])
    deadline = time.monotonic() + 30
    while not (pids.exists() and len(pids.read_text().split()) == 2):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    start = time.monotonic()
    with pytest.raises(AssertionError, match="did not finish within 1s"):
        job.wait(1)
    # at once: a rank left running would also hold the output pipes open for 300 s
    assert time.monotonic() - start < 30
    ranks = [int(p) for p in pids.read_text().split()]
    time.sleep(0.5)
    alive = [p for p in ranks if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running: {alive}"


def test_jobs_are_offline_single_threaded_and_free_of_stray_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HVDFT_FAULT", "rank=0,step=1,kind=kill")
    monkeypatch.setenv("HVDFT_CACHE", "/tmp/somewhere")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    env = job_env()
    assert "HVDFT_FAULT" not in env and env["HVDFT_CACHE"] == "/tmp/somewhere"
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == "1"
    assert env["OMP_NUM_THREADS"] == "1" and env["TOKENIZERS_PARALLELISM"] == "false"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
