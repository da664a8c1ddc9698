"""Resume on any number of ranks, mid-epoch (issue 13): real Horovod on the CPU.

A 2-rank run writes a mid-epoch checkpoint at step 3 and is killed at step 4. The same
checkpoint is resumed on 1 rank and on 3 ranks: the rows of the epoch not yet trained on
are re-partitioned over the new ranks, each used exactly once apart from the even-out
repeats that give every rank the same number of batches, and the plan's step count
follows the rule (steps done + the epoch's remainder at the new global batch + the
remaining whole epochs at the new steps per epoch).
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from support import (
    HVDFT,
    debug_events,
    horovodrun,
    job_env,
    load_tensors,
    make_tiny_model,
    run_job,
    run_ok,
    sentences,
    write_conll,
)

pytestmark = pytest.mark.slow

N = 48  # training sentences (one window each)
B = 4  # per-rank batch
DONE = 3  # steps in the checkpoint


def args(tmp: Path, out: Path, *extra: str) -> list[str]:
    return [HVDFT, "train", "ner", "--model", str(tmp / "tiny"), "--train-file", str(tmp / "train.txt"),
            "--epochs", "2", "--batch-size", str(B), "--max-length", "32", "--lr", "1e-3", "--log-every", "1",
            "--save-every", str(DONE), "--save-total-limit", "0", "--cache-dir", str(tmp / "cache"),
            "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("resize")
    make_tiny_model(tmp / "tiny")
    write_conll(tmp / "train.txt", sentences(N, seed=21))
    out, debug = tmp / "two", tmp / "two_debug"
    killed = run_job([*horovodrun(2), *args(tmp, out)], timeout=600,
                     env=job_env(HVDFT_DEBUG_DIR=str(debug), HVDFT_FAULT=f"rank=1,step={DONE + 1},kind=kill"))
    assert killed.returncode != 0, killed.describe()
    ck = out / "checkpoints" / f"checkpoint-{DONE}"
    progress = torch.load(ck / "trainer_state.pt", weights_only=True)["progress"]
    assert (progress["step"], progress["epoch"], progress["batch_in_epoch"]) == (DONE, 0, DONE)
    seen = [e for r in (0, 1) for e in debug_events(debug, r) if e["event"] == "step" and e["step"] <= DONE]
    used = [gid for e in seen for batch in e["examples"] for gid in batch]
    assert len(used) == DONE * 2 * B
    # the checkpoint records which rows the epoch trained on: all of them, as (id, window)
    assert sorted(tuple(k) for k in progress["seen"]) == sorted((gid, 0) for gid in set(used))
    return {"tmp": tmp, "ck": ck, "used": used}


@pytest.mark.parametrize("world", [1, 3])
def test_mid_epoch_checkpoint_resumes_on_another_world_size(checkpoint: dict, world: int) -> None:
    tmp, ck = checkpoint["tmp"], checkpoint["ck"]
    out, debug = tmp / f"on{world}", tmp / f"on{world}_debug"
    result = run_ok([*horovodrun(world), *args(tmp, out, "--resume", str(ck))], timeout=900,
                    env=job_env(HVDFT_DEBUG_DIR=str(debug)))
    assert f"written mid-epoch by 2 rank(s), resumed on {world}" in result.output, result.describe()
    steps = [e for r in range(world) for e in debug_events(debug, r) if e["event"] == "step"]
    epoch0 = [gid for e in steps if e["epoch"] == 0 for batch in e["examples"] for gid in batch]
    # every example of epoch 0 trained on: before the checkpoint or after it, never both
    before = Counter(checkpoint["used"])
    after = Counter(epoch0)
    assert set(before) | set(after) == set(range(N))
    assert not set(before) & set(after), "a row trained before the checkpoint came back after it"
    # the rest of the epoch, strided over `world` ranks and evened out to the largest share
    rest = sorted(set(range(N)) - set(before))
    per_rank = max(len([g for g in rest if g % world == r]) for r in range(world))
    assert sum(after.values()) == per_rank * world  # extra uses are the even-out repeats only
    segment_steps = math.ceil(per_rank / B)
    assert sorted({e["step"] for e in steps if e["epoch"] == 0}) == list(range(DONE + 1, DONE + segment_steps + 1))
    # then epoch 1 whole, at this world's steps per epoch
    steps_per_epoch = math.ceil(math.ceil(N / world) / B)
    epoch1 = [gid for e in steps if e["epoch"] == 1 for batch in e["examples"] for gid in batch]
    assert set(epoch1) == set(range(N))
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_steps"] == DONE + segment_steps + steps_per_epoch
    assert results["world_size"] == world and results["global_batch_size"] == B * world


def test_same_world_resume_of_a_resized_run_continues_its_plan(checkpoint: dict) -> None:
    """1 rank takes over at step 3 and checkpoints at step 6, inside the epoch's remainder;
    1 rank resumes that and ends exactly where the uninterrupted 1-rank run of the previous
    test ended: same plan, same rows, same weights. (One rank: a sum over 3 ranks is not
    associative in floating point, and Horovod's tensor fusion varies its order.)"""
    tmp, ck = checkpoint["tmp"], checkpoint["ck"]
    first = tmp / "resized_first"
    shutil.copytree(ck, first / "checkpoints" / ck.name)
    killed = run_job([*horovodrun(1), *args(tmp, first, "--resume")], timeout=900,
                     env=job_env(HVDFT_FAULT=f"rank=0,step={2 * DONE + 1},kind=kill"))
    assert killed.returncode != 0, killed.describe()
    mid = torch.load(first / "checkpoints" / f"checkpoint-{2 * DONE}" / "trainer_state.pt", weights_only=True)
    assert mid["progress"]["epoch"] == 0 and mid["progress"]["epoch_excluded"], "a checkpoint inside the remainder"
    resumed = run_ok([*horovodrun(1), *args(tmp, first, "--resume")], timeout=900)
    assert f"resumed from {first / 'checkpoints' / f'checkpoint-{2 * DONE}'}" in resumed.output
    reference = json.loads((tmp / "on1" / "all_results.json").read_text())
    results = json.loads((first / "all_results.json").read_text())
    assert results["train_steps"] == reference["train_steps"]
    a, b = load_tensors(tmp / "on1"), load_tensors(first)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run ended elsewhere"


def test_save_every_minutes_is_agreed_at_a_step(checkpoint: dict) -> None:
    """A time-based checkpoint is decided on rank 0's clock at the start of a step and
    travels in that step's allreduce: both ranks write it after the same step (a rank that
    did not would leave the other waiting in the checkpoint's gather). With a 0.6 ms
    interval and no --save-every, most steps are due (a step is due once 0.6 ms passed since
    the last checkpoint, counted from when that one was written)."""
    tmp = checkpoint["tmp"]
    out = tmp / "timed"
    run_ok([*horovodrun(2), *args(tmp, out, "--epochs", "1", "--save-every", "0",
                                  "--save-every-minutes", "0.00001")], timeout=900)
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir()
                   if p.name.startswith("checkpoint-"))
    assert len(steps) >= 3 and steps[-1] == N // (2 * B), steps  # more than the epoch's end alone
    for step in steps:
        state = torch.load(out / "checkpoints" / f"checkpoint-{step}" / "trainer_state.pt", weights_only=True)
        assert state["progress"]["step"] == step and len(state["rng"]) == 2  # both ranks took part
