"""Every --optimizer on real Horovod on the CPU (issue 17 B): data parallelism is exact,
the state is broadcast at the start, and a resume from a checkpoint ends where an
uninterrupted run ends.

Two jobs run every training (tests/scripts/train_many.py: one process start per job,
not per training), on a tiny random BERT so that the engine, not the model, is timed:

- 1 rank: per optimizer, K steps at batch 2B (dropout, shuffling and grouping off);
- 2 ranks (horovodrun --gloo): per optimizer, the same K steps at batch B per rank
  (equivalence); an uninterrupted reference of TOTAL steps with dropout, shuffling and
  length grouping ON and a checkpoint every SAVE steps; and a run resumed from the
  reference's mid-epoch checkpoint-SAVE in another folder (exact resume).

SGD runs with --momentum 0.9 so that its state (the momentum buffers) matters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from support import (
    debug_events,
    horovodrun,
    job_env,
    load_tensors,
    make_tiny_model,
    max_abs_diff,
    run_ok,
    sentences,
    write_conll,
)

from hvdft.optim import OPTIMIZERS

pytestmark = pytest.mark.slow

B, K = 4, 3  # per-rank batch and steps of the equivalence runs
TOTAL, SAVE = 8, 3  # steps of the resume reference, checkpoint interval (6 steps per epoch)
# Rates that move a random 32-wide BERT visibly in K steps without diverging.
LR = {"adamw": 1e-3, "sgd": 0.05, "nesterov": 0.05, "adagrad": 1e-2, "rmsprop": 1e-3}
EXTRA = {"sgd": ["--momentum", "0.9"]}
SCRIPT = str(Path(__file__).parent / "scripts" / "train_many.py")


def common(setup: dict[str, Path], name: str, out: Path) -> list[str]:
    return ["--model", str(setup["model"]), "--train-file", str(setup["train"]), "--max-length", "32",
            "--cache-dir", str(setup["cache"]), "--output-dir", str(out), "--optimizer", name, "--lr", str(LR[name]),
            "--log-every", "1", "--no-scale-lr", *EXTRA.get(name, [])]


def equivalence_args(setup: dict[str, Path], name: str, out: Path, batch: int) -> list[str]:
    return [*common(setup, name, out), "--epochs", "1", "--max-steps", str(K), "--batch-size", str(batch),
            "--no-dropout", "--no-shuffle", "--no-group-by-length"]


def resume_args(setup: dict[str, Path], name: str, out: Path, *extra: str) -> list[str]:
    return [*common(setup, name, out), "--epochs", "2", "--max-steps", str(TOTAL), "--batch-size", str(B),
            "--save-every", str(SAVE), "--save-total-limit", "0", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("optimizers")
    setup = {"model": make_tiny_model(tmp / "tiny"), "train": write_conll(tmp / "train.txt", sentences(48, seed=5)),
             "cache": tmp / "cache"}
    one = [{"name": f"one_{o}", "args": equivalence_args(setup, o, tmp / f"one_{o}", 2 * B)} for o in OPTIMIZERS]
    two = []
    for o in OPTIMIZERS:
        ref = tmp / f"ref_{o}"
        checkpoint = str(ref / "checkpoints" / f"checkpoint-{SAVE}")
        two += [
            {"name": f"two_{o}", "args": equivalence_args(setup, o, tmp / f"two_{o}", B),
             "env": {"HVDFT_DEBUG_DIR": str(tmp / "debug" / f"two_{o}")}},
            {"name": f"ref_{o}", "args": resume_args(setup, o, ref),
             "env": {"HVDFT_DEBUG_DIR": str(tmp / "debug" / f"ref_{o}")}},
            {"name": f"resumed_{o}",
             "args": resume_args(setup, o, tmp / f"resumed_{o}", "--resume", checkpoint),
             "env": {"HVDFT_DEBUG_DIR": str(tmp / "debug" / f"resumed_{o}")}},
        ]
    for name, spec, launcher in (("one", one, []), ("two", two, horovodrun(2))):
        (tmp / f"{name}.json").write_text(json.dumps(spec))
        run_ok([*launcher, sys.executable, SCRIPT, str(tmp / f"{name}.json"), str(tmp / f"{name}_results")],
               timeout=1500, env=job_env())
        for rank_file in sorted((tmp / f"{name}_results").glob("rank*.json")):
            results = json.loads(rank_file.read_text())
            assert [r["name"] for r in results] == [c["name"] for c in spec]
            assert all(r["code"] == 0 for r in results), [r["stderr"][-3000:] for r in results if r["code"]]
    return tmp


def moved_and_off(ref: dict, other: dict, start: dict) -> tuple[float, float, str]:
    """Over the encoder and the head: (worst |difference| of one weight relative to the
    largest distance any weight moved, worst per-tensor difference relative to how far that
    tensor moved, its name). Attention key biases are left out: their true gradient is
    exactly 0 (softmax ignores a constant added to every key), so an adaptive optimizer
    turns rounding noise into a full-size step in both runs."""
    worst_rel, worst_name, largest_move = 0.0, "", 0.0
    for k in ref:
        if k.endswith("key.bias"):
            continue
        s = start.get(k.removeprefix("bert."), torch.zeros_like(ref[k]) if k.startswith("classifier") else None)
        if s is None:
            continue
        largest_move = max(largest_move, float((ref[k] - s).abs().max()))
        moved, off = float((ref[k] - s).norm()), float((ref[k] - other[k]).norm())
        rel = off / moved if moved else (0.0 if off == 0 else float("inf"))
        if rel > worst_rel:
            worst_rel, worst_name = rel, k
    keep = {k: v for k, v in ref.items() if not k.endswith("key.bias")}
    element = max_abs_diff(keep, {k: other[k] for k in keep})[0]
    assert largest_move > 0
    return element / largest_move, worst_rel, worst_name


# Stated tolerances (fp32; the same arithmetic up to summation order and padding width):
# every tensor within 0.1% of how far training moved it, no weight off by more than 1% of
# the largest distance any weight moved. Measured (all five): at most 5e-6 and 1e-5. A
# gradient that were not averaged over the ranks, or state that diverged, is off by O(1).
REL, ELEMENT = 1e-3, 1e-2


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_two_ranks_equal_one_rank_with_twice_the_batch(runs: Path, name: str) -> None:
    one, two = load_tensors(runs / f"one_{name}"), load_tensors(runs / f"two_{name}")
    start = load_tensors(runs / "tiny")
    element, rel, where = moved_and_off(one, two, start)
    assert rel <= REL, f"{where} is off by {rel:.3g} of its update"
    assert element <= ELEMENT, f"a weight is off by {element:.3g} of the largest step"
    assert any(not torch.equal(one[k], two[k]) for k in one)  # two real runs, not one file twice
    results = json.loads((runs / f"two_{name}" / "all_results.json").read_text())
    assert (results["world_size"], results["global_batch_size"], results["train_steps"]) == (2, 2 * B, K)
    # the optimizer state was broadcast and stayed identical on both ranks
    events = [{e["event"]: e for e in debug_events(runs / "debug" / f"two_{name}", r)} for r in (0, 1)]
    for moment in ("after_broadcast", "end"):
        assert events[0][moment]["optimizer"] == events[1][moment]["optimizer"], moment
        assert events[0][moment]["params"] == events[1][moment]["params"], moment


def metrics(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in records]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_from_a_mid_epoch_checkpoint_is_exact(runs: Path, name: str) -> None:
    ref, resumed = runs / f"ref_{name}", runs / f"resumed_{name}"
    state = torch.load(ref / "checkpoints" / f"checkpoint-{SAVE}" / "trainer_state.pt", weights_only=True)
    assert state["optimizer"]["state"], "the checkpoint holds no optimizer state"  # momentum, sums, moments
    assert state["progress"]["batch_in_epoch"] == SAVE  # mid-epoch: the sampler position matters
    ref_w, w = load_tensors(ref), load_tensors(resumed)
    assert [k for k in ref_w if not torch.equal(ref_w[k], w[k])] == []
    assert any(not torch.equal(ref_w[k], load_tensors(ref / "checkpoints" / f"checkpoint-{SAVE}")[k]) for k in ref_w)
    for rank in (0, 1):
        end = [e for e in debug_events(runs / "debug" / f"ref_{name}", rank) if e["event"] == "end"][-1]
        again = [e for e in debug_events(runs / "debug" / f"resumed_{name}", rank) if e["event"] == "end"][-1]
        assert (again["params"], again["optimizer"]) == (end["params"], end["optimizer"]), rank
        steps = {e["step"]: e["examples"] for e in debug_events(runs / "debug" / f"ref_{name}", rank)
                 if e["event"] == "step"}
        resumed_steps = {e["step"]: e["examples"] for e in debug_events(runs / "debug" / f"resumed_{name}", rank)
                         if e["event"] == "step"}
        assert resumed_steps == {s: v for s, v in steps.items() if s > SAVE}, f"data order of rank {rank}"
    assert metrics(resumed) == [r for r in metrics(ref) if r["step"] > SAVE]
