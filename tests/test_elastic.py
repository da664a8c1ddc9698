"""Elastic training (issue 13): a worker SIGKILLed mid-epoch is survived, on real Horovod.

`horovodrun --min-np 1 --max-np 2 --host-discovery-script` with two host aliases on this
machine (`localhost:1`, `127.0.0.1:1`, as Horovod's own integration tests do: a failed
worker blacklists its host). Rank 1 kills itself at the start of step 5; the state was
last committed at step 3 (`--commit-every 3`), so step 4 is rolled back and done again by
the survivor, which re-partitions the rest of the epoch for 1 rank and finishes the run.
The debug hook's trace proves that over each epoch every example was trained on exactly
once in the lineage of the final model, with the rolled-back step accounted for.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import pytest
from support import BIN, debug_events, job_env, make_tiny_model, run_ok, sentences, write_conll

pytestmark = pytest.mark.slow

N, B, COMMIT, KILL = 48, 4, 3, 5


def kept_steps(debug: Path) -> tuple[list[dict], list[dict]]:
    """(steps in the final model's lineage, steps rolled back), from every rank's trace:
    a training (re)entry at step s supersedes every step after s logged before it."""
    events = sorted((e for f in debug.glob("rank*.jsonl") for e in debug_events(debug, int(f.stem[4:]))),
                    key=lambda e: e["time"])
    kept: list[dict] = []
    dropped: list[dict] = []
    for e in events:
        if e["event"] == "entered":
            dropped += [s for s in kept if s["step"] > e["step"]]
            kept = [s for s in kept if s["step"] <= e["step"]]
        elif e["event"] == "step":
            kept.append(e)
    return kept, dropped


def test_a_killed_worker_is_survived_and_every_example_used_once(tmp_path: Path) -> None:
    make_tiny_model(tmp_path / "tiny")
    write_conll(tmp_path / "train.txt", sentences(N, seed=21))
    write_conll(tmp_path / "valid.txt", sentences(16, seed=22))
    (tmp_path / "hosts.txt").write_text("localhost:1\n127.0.0.1:1\n")
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\ncat {tmp_path / 'hosts.txt'}\n")
    discover.chmod(0o755)
    debug, out = tmp_path / "debug", tmp_path / "out"
    cmd = [str(BIN / "horovodrun"), "--gloo", "-np", "2", "--min-np", "1", "--max-np", "2",
           "--host-discovery-script", str(discover), "--gloo-timeout-seconds", "60",
           str(BIN / "hvdft"), "train", "ner", "--model", str(tmp_path / "tiny"),
           "--train-file", str(tmp_path / "train.txt"), "--validation-file", str(tmp_path / "valid.txt"),
           "--epochs", "2", "--batch-size", str(B), "--max-length", "32", "--lr", "1e-3", "--log-every", "1",
           "--commit-every", str(COMMIT), "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out)]
    fault = f"rank=1,step={KILL},kind=kill,once={tmp_path / 'fired'}"
    started = time.time()
    result = run_ok(cmd, timeout=900, env=job_env(HVDFT_DEBUG_DIR=str(debug), HVDFT_FAULT=fault))
    assert "Process 1 exit with status code 137" in result.output, result.describe()
    assert "hvdft: elastic reset: a rank failed" in result.output and "1 rank(s) now" in result.output

    kept, dropped = kept_steps(debug)
    # rolled back: step 4 as both ranks ran it (after the commit at step 3, before the kill)
    assert sorted((e["step"], len(e["examples"][0])) for e in dropped) == [(COMMIT + 1, B)] * 2
    for epoch in (0, 1):
        used = Counter(g for e in kept if e["epoch"] == epoch for batch in e["examples"] for g in batch)
        assert used == Counter(range(N)), f"epoch {epoch}: {sorted(used.items())}"
    # the plan: 3 steps on 2 ranks, the epoch's other 24 rows on 1 rank, then a 1-rank epoch
    steps = COMMIT + math.ceil((N - COMMIT * 2 * B) / B) + N // B
    expected = list(range(1, COMMIT + 1)) * 2 + list(range(COMMIT + 1, steps + 1))
    assert sorted(e["step"] for e in kept) == sorted(expected)
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_steps"] == steps and results["world_size"] == 1
    assert (out / "model.safetensors").exists() and (out / "eval_report.txt").exists()
    # metrics.jsonl: one line per step of the lineage (the rolled-back step's line replaced)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, steps + 1))
    # the time to recover, for the README: the kill, then the first step after the reset
    killed = max(e["time"] for e in dropped)
    first_after = min(e["time"] for e in kept if e["step"] == COMMIT + 1)
    print(f"elastic recovery: {first_after - killed:.1f} s (whole run {time.time() - started:.0f} s)")
    assert first_after - killed < 120


def test_hvdft_launch_elastic_survives_a_killed_worker(tmp_path: Path) -> None:
    """The same through the front door: `hvdft launch --elastic -H a,b` writes the discovery
    script and horovodrun's elastic options; the job ends 0 with one summary, no traceback."""
    make_tiny_model(tmp_path / "tiny")
    write_conll(tmp_path / "train.txt", sentences(N, seed=23))
    out = tmp_path / "out"
    cmd = [str(BIN / "hvdft"), "launch", "--elastic", "-H", "localhost:1,127.0.0.1:1", "--min-np", "1",
           "--env", "HVDFT_FAULT", "--", "train", "ner", "--model", str(tmp_path / "tiny"),
           "--train-file", str(tmp_path / "train.txt"), "--epochs", "1", "--batch-size", str(B), "--max-length", "32",
           "--commit-every", str(COMMIT), "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out)]
    fault = f"rank=1,step={KILL},kind=kill,once={tmp_path / 'fired'}"
    result = run_ok(cmd, timeout=900, env=job_env(HVDFT_FAULT=fault))
    assert "--min-np 1 --max-np 2 --host-discovery-script" in result.output
    assert "hvdft: elastic reset: a rank failed" in result.output, result.describe()
    assert "Traceback" not in result.output
    results = json.loads((out / "all_results.json").read_text())
    assert results["world_size"] == 1 and results["train_steps"] == COMMIT + math.ceil((N - COMMIT * 2 * B) / B)
