"""Checkpoints and --resume on real Horovod on the CPU (issue 4).

One reference run trains 2 epochs on 2 ranks without stopping. Three other runs of the
same configuration are stopped and resumed, and each must end exactly where the
reference ends (same final parameters and optimizer state, same metrics, same examples
at every step): dropout, shuffling and length grouping stay ON, so the RNG states and
the sampler position in the checkpoint are what makes that true.

- killed (SIGKILL, rank 1, horovodrun) after the epoch-1 checkpoint, resumed from it;
- crashed (exception, rank 1, mpirun) after a mid-epoch --save-every checkpoint;
- SIGTERM to horovodrun mid-epoch: the ranks stop at a step boundary, rank 0 writes a
  checkpoint, every rank exits 130, and --resume continues from there.

Two things make "ends exactly where the reference ends" strict:
- --log-every 4 divides none of the checkpoint steps the runs resume from (6 and 3):
  the loss summed since the last log line crosses the checkpoint, and the resumed run's
  line at step 8 (or 4) must still average over all four steps;
- the dev set (`fillers_as_entities`) is scored best by the EARLY model: the best of
  the six evaluations (every 2 steps) is the one at step 2, by far. Every resume starts
  after it, so the resumed run holds no best weights in memory and must reload them
  from checkpoints/best: its output equals the reference's only if it does.

A tiny random BERT (4 MB) stands in for minilm: only the engine is under test, and its
checkpoints are written well inside horovodrun's 5 s grace between SIGTERM and SIGKILL.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from support import (
    HVDFT,
    Job,
    debug_events,
    eval_records,
    fillers_as_entities,
    horovodrun,
    job_env,
    load_tensors,
    make_tiny_model,
    mpirun,
    run_job,
    run_ok,
    same_tensors,
    sentences,
    write_conll,
)

STEPS_PER_EPOCH = 6  # 48 sentences / 2 ranks / batch 4
TOTAL = 2 * STEPS_PER_EPOCH
LOG_EVERY = 4  # divides neither 6 (end of epoch 1) nor 3 (the SIGTERM step)
EVAL_EVERY = 2
BEST_STEP = 2  # the evaluation that wins on fillers_as_entities (the test checks it)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("resume")
    return {
        "tmp": tmp,
        "model": make_tiny_model(tmp / "tiny"),
        "train": write_conll(tmp / "train.txt", sentences(48, seed=5)),
        "valid": write_conll(tmp / "valid.txt", fillers_as_entities(sentences(16, seed=6))),
        "cache": tmp / "cache",
    }


def args(setup: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        HVDFT, "train", "ner", "--model", str(setup["model"]), "--train-file", str(setup["train"]),
        "--validation-file", str(setup["valid"]), "--epochs", "2", "--batch-size", "4", "--max-length", "32",
        "--lr", "1e-3", "--warmup-ratio", "0.2", "--log-every", str(LOG_EVERY), "--eval-every", str(EVAL_EVERY),
        "--cache-dir", str(setup["cache"]),
        "--output-dir", str(out), *extra,
    ]


def debug_env(folder: Path, **extra: str) -> dict[str, str]:
    return job_env(HVDFT_DEBUG_DIR=str(folder), **extra)


@pytest.fixture(scope="module")
def reference(setup: dict[str, Path]) -> dict[str, Path]:
    out, debug = setup["tmp"] / "reference", setup["tmp"] / "reference_debug"
    run_ok([*horovodrun(2), *args(setup, out)], timeout=600, env=debug_env(debug))
    return {"out": out, "debug": debug}


def steps_of(debug: Path, rank: int) -> dict[int, list]:
    """step -> the global example ids this rank trained on (a later run overrides)."""
    return {e["step"]: e["examples"] for e in debug_events(debug, rank) if e["event"] == "step"}


def metrics(out: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field: every other figure must match exactly."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        r.pop("tokens_per_second", None)  # wall-clock
    return records


def assert_same_run(reference: dict[str, Path], out: Path, debug: Path) -> None:
    ref_w, w = load_tensors(reference["out"]), load_tensors(out)
    assert sorted(ref_w) == sorted(w)
    different = [k for k in ref_w if not torch.equal(ref_w[k], w[k])]
    assert not different, f"final weights differ in {different[:5]}"
    ref_end = [e for e in debug_events(reference["debug"], 0) if e["event"] == "end"][-1]
    for rank in (0, 1):
        end = [e for e in debug_events(debug, rank) if e["event"] == "end"][-1]
        assert (end["params"], end["optimizer"]) == (ref_end["params"], ref_end["optimizer"]), rank
        assert steps_of(debug, rank) == steps_of(reference["debug"], rank), f"data order of rank {rank}"
    assert metrics(out) == metrics(reference["out"])
    ref_results = json.loads((reference["out"] / "all_results.json").read_text())
    results = json.loads((out / "all_results.json").read_text())
    for key in ref_results:
        if key.startswith(("eval_", "best_")) or key in ("train_steps", "train_samples", "stopped_early"):
            assert results[key] == ref_results[key], key


def assert_ranks_agree_after_resume_broadcast(debug: Path) -> None:
    """The resumed job's ranks hold one model and one (non-empty) optimizer state."""
    after = [[e for e in debug_events(debug, r) if e["event"] == "after_broadcast"][-1] for r in (0, 1)]
    assert after[0]["params"] == after[1]["params"]
    assert after[0]["optimizer"] == after[1]["optimizer"]


def last_event_time(debug: Path) -> float:
    return max(e["time"] for r in (0, 1) for e in debug_events(debug, r))


def trainer_state(folder: Path) -> dict:
    return torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- the runs


@pytest.mark.slow
def test_reference_run_writes_complete_checkpoints(setup: dict[str, Path], reference: dict[str, Path]) -> None:
    out = reference["out"]
    root = out / "checkpoints"
    # per epoch, --save-total-limit 2 (the default) keeps both; "best" is the best model
    assert sorted(p.name for p in root.iterdir()) == sorted(["best", f"checkpoint-{STEPS_PER_EPOCH}",
                                                             f"checkpoint-{TOTAL}"])
    ck = root / f"checkpoint-{STEPS_PER_EPOCH}"
    names = {p.name for p in ck.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt", "hvdft_run.json"} <= names
    state = trainer_state(ck)
    assert set(state) == {"optimizer", "scheduler", "scaler", "rng", "progress"}
    assert state["optimizer"]["state"]  # AdamW moments
    assert state["scheduler"]["last_epoch"] == STEPS_PER_EPOCH
    assert len(state["rng"]) == 2 and set(state["rng"][0]) == {"torch", "cuda", "numpy", "python"}
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # each rank's own
    p = state["progress"]
    assert (p["step"], p["epoch"], p["batch_in_epoch"]) == (STEPS_PER_EPOCH, 1, 0)
    assert [h["step"] for h in p["history"]] == [2, 4, 6] and "eval_f1" in p["history"][0]
    run = json.loads((ck / "hvdft_run.json").read_text())
    assert run["world_size"] == 2 and run["config"]["batch_size"] == 4 and run["labels"][0] == "O"
    # the weights in the checkpoint are the ones trained up to that step, not later ones
    weights, last = load_tensors(ck), load_tensors(root / f"checkpoint-{TOTAL}")
    assert any(not torch.equal(weights[k], last[k]) for k in weights)
    # training lines at 4, 8, 12, each with the loss and the gradient norm of its step
    lines = metrics(out)
    assert [r["step"] for r in lines if "loss" in r and "eval_f1" not in r] == [4, 8, 12]
    assert all(r["grad_norm"] > 0 for r in lines if "grad_norm" in r)


@pytest.mark.slow
def test_the_best_evaluation_wins_not_the_last(setup: dict[str, Path], reference: dict[str, Path]) -> None:
    """Six evaluations whose scores differ: the output is the model of the best one (step
    2), not the last one, and every figure written about it is that model's."""
    out, root = reference["out"], reference["out"] / "checkpoints"
    evals = eval_records(out)
    f1 = {r["step"]: r["eval_f1"] for r in evals}
    assert sorted(f1) == [2, 4, 6, 8, 10, 12]
    best = max(f1, key=lambda s: (f1[s], -s))  # the first of the best (a later tie does not replace it)
    assert best == BEST_STEP and f1[best] > 0.2 and f1[best] > max(v for s, v in f1.items() if s != best) + 0.1, f1
    results = json.loads((out / "all_results.json").read_text())
    assert results["best_eval_metric"] == f1[best]
    # the final validation report is the output model evaluated again: the step-2 model,
    # whose dev loss no other evaluation had
    won = next(r for r in evals if r["step"] == best)
    assert results["eval_f1"] == won["eval_f1"] and results["eval_loss"] == won["eval_loss"]
    assert all(r["eval_loss"] != won["eval_loss"] for r in evals if r["step"] != best)
    final = load_tensors(out)
    assert same_tensors(final, load_tensors(root / "best"))
    for step in (STEPS_PER_EPOCH, TOTAL):  # the later checkpoints hold other weights
        assert not same_tensors(final, load_tensors(root / f"checkpoint-{step}")), step


@pytest.mark.slow
def test_killed_rank_then_resume_after_epoch_one(setup: dict[str, Path], reference: dict[str, Path]) -> None:
    out, debug = setup["tmp"] / "killed", setup["tmp"] / "killed_debug"
    step = STEPS_PER_EPOCH + 2  # rank 1 SIGKILLs itself as it starts step 8
    killed = run_job([*horovodrun(2), *args(setup, out)], timeout=600,
                     env=debug_env(debug, HVDFT_FAULT=f"rank=1,step={step},kind=kill"))
    assert killed.returncode != 0, killed.describe()
    assert "Process 1 exit with status code 137" in killed.output, killed.describe()
    assert time.time() - last_event_time(debug) < 60
    assert not (out / "model.safetensors").exists()
    assert max(steps_of(debug, 1)) == step - 1
    resumed = run_ok([*horovodrun(2), *args(setup, out, "--resume")], timeout=600, env=debug_env(debug))
    assert f"resumed from {out / 'checkpoints' / f'checkpoint-{STEPS_PER_EPOCH}'}" in resumed.output
    assert_ranks_agree_after_resume_broadcast(debug)
    assert_same_run(reference, out, debug)


@pytest.mark.slow
def test_crashed_rank_then_resume_mid_epoch_save_every(setup: dict[str, Path], reference: dict[str, Path]) -> None:
    out, debug = setup["tmp"] / "crashed", setup["tmp"] / "crashed_debug"
    crashed = run_job([*mpirun(2), *args(setup, out, "--save-every", "4")], timeout=600,
                      env=debug_env(debug, HVDFT_FAULT="rank=1,step=6,kind=raise"))
    assert crashed.returncode != 0, crashed.describe()
    assert time.time() - last_event_time(debug) < 60
    assert "[rank 1] crashed: RuntimeError: HVDFT_FAULT" in crashed.output, crashed.describe()
    assert re.search(r"Process name: \[\[\d+,\d+\],1\]\s+Exit code:\s+1", crashed.output), crashed.describe()
    ck = out / "checkpoints" / "checkpoint-4"
    p = trainer_state(ck)["progress"]
    assert (p["step"], p["epoch"], p["batch_in_epoch"]) == (4, 0, 4)  # mid-epoch: the sampler position
    resumed = run_ok([*mpirun(2), *args(setup, out, "--save-every", "4", "--resume", str(ck))], timeout=600,
                     env=debug_env(debug))
    assert f"resumed from {ck}" in resumed.output
    assert_ranks_agree_after_resume_broadcast(debug)
    assert_same_run(reference, out, debug)
    # every 4 steps, the last 2 kept (--save-total-limit 2): 8 and 12
    names = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-12", "checkpoint-8"]


def wait_for_step(debug: Path, rank: int, step: int, job: Job, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job.proc.poll() is not None:
            raise AssertionError(f"the job ended before step {step}: {job.wait(10).describe()}")
        path = debug / f"rank{rank}.jsonl"
        if path.exists() and step in steps_of(debug, rank):
            return
        time.sleep(0.2)
    job.kill_all()
    raise AssertionError(f"rank {rank} never reached step {step}")


@pytest.mark.slow
def test_sigterm_to_horovodrun_checkpoints_and_resumes(setup: dict[str, Path], reference: dict[str, Path]) -> None:
    """horovodrun forwards SIGTERM/SIGINT to every rank as SIGTERM and SIGKILLs them 5 s
    later; its own exit status is 1, each rank's (130) is in its "Process N exit" line."""
    out, debug = setup["tmp"] / "sigterm", setup["tmp"] / "sigterm_debug"
    # rank 1 waits at the start of step 4 until the signal comes: a fixed step boundary
    job = Job([*horovodrun(2), *args(setup, out)], env=debug_env(debug, HVDFT_FAULT="rank=1,step=4,kind=wait"))
    wait_for_step(debug, 1, 3, job)
    sent = time.time()
    job.signal(signal.SIGTERM)
    result = job.wait(120)
    assert time.time() - sent < 60
    assert result.returncode != 0, result.describe()
    # horovodrun reports the ranks' statuses while it is itself terminating them, and
    # may miss one; every status it reports must be 130, and it reports at least one.
    statuses = re.findall(r"Process \d exit with status code (\d+)", result.output)
    assert statuses and set(statuses) == {"130"}, result.describe()
    assert "interrupted by a signal at step 3; checkpoint written, continue with --resume" in result.output
    assert not (out / "model.safetensors").exists()
    p = trainer_state(out / "checkpoints" / "checkpoint-3")["progress"]
    assert (p["step"], p["epoch"], p["batch_in_epoch"]) == (3, 0, 3)
    run_ok([*horovodrun(2), *args(setup, out, "--resume")], timeout=600, env=debug_env(debug))
    assert_same_run(reference, out, debug)


@pytest.mark.slow
def test_sigterm_to_mpi_ranks_like_slurm(setup: dict[str, Path]) -> None:
    """Slurm signals the tasks themselves: each rank exits 130 and so does mpirun.
    (A SIGTERM to mpirun alone is forwarded as SIGTERM, and mpirun then exits 1.)"""
    import psutil

    out, debug = setup["tmp"] / "slurm", setup["tmp"] / "slurm_debug"
    job = Job([*mpirun(2), *args(setup, out)], env=debug_env(debug, HVDFT_FAULT="rank=1,step=9,kind=wait"))
    wait_for_step(debug, 1, 8, job)
    ranks = [p for p in psutil.Process(job.proc.pid).children(recursive=True) if "train" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    sent = time.time()
    for p in ranks:  # twice each, as when both Slurm and mpirun deliver one: still one checkpoint
        p.send_signal(signal.SIGTERM)
        p.send_signal(signal.SIGTERM)
    result = job.wait(120)
    assert time.time() - sent < 60
    assert result.returncode == 130, result.describe()
    assert "interrupted by a signal at step 8" in result.output
    p = trainer_state(out / "checkpoints" / "checkpoint-8")["progress"]
    assert (p["step"], p["epoch"], p["batch_in_epoch"]) == (8, 1, 2)
    assert not (out / "model.safetensors").exists()


@pytest.mark.slow
def test_ctrl_c_single_process(setup: dict[str, Path]) -> None:
    out, debug = setup["tmp"] / "sigint", setup["tmp"] / "sigint_debug"
    job = Job(args(setup, out), env=debug_env(debug, HVDFT_FAULT="rank=0,step=3,kind=wait"))
    deadline = time.monotonic() + 300
    while not ((debug / "rank0.jsonl").exists() and 2 in steps_of(debug, 0)):
        assert time.monotonic() < deadline and job.proc.poll() is None, "never reached step 2"
        time.sleep(0.2)
    job.signal(signal.SIGINT)
    result = job.wait(120)
    assert result.returncode == 130, result.describe()
    assert "interrupted by a signal at step 2" in result.stderr
    assert "Traceback" not in result.output
    assert trainer_state(out / "checkpoints" / "checkpoint-2")["progress"]["step"] == 2


@pytest.mark.slow
def test_ctrl_c_twice_exits_at_once_without_a_checkpoint(setup: dict[str, Path]) -> None:
    """Step 3 is a long step (HVDFT_FAULT kind=hold: 120 s, deaf to the stop flag). The
    first Ctrl-C asks for a checkpoint at the end of the step; the second means "now":
    the process dies of SIGINT at once, and writes no checkpoint."""
    out, debug = setup["tmp"] / "sigint2", setup["tmp"] / "sigint2_debug"
    job = Job(args(setup, out), env=debug_env(debug, HVDFT_FAULT="rank=0,step=3,kind=hold"))
    deadline = time.monotonic() + 300
    while not ((debug / "rank0.jsonl").exists() and 2 in steps_of(debug, 0)):
        assert time.monotonic() < deadline and job.proc.poll() is None, "never reached step 2"
        time.sleep(0.2)
    job.signal(signal.SIGINT)
    second = time.monotonic()
    # Two signals that arrive before Python runs its handler count as one: repeat the
    # second until the process is gone (it holds for 120 s unless a second one kills it).
    for _ in range(20):
        time.sleep(1)
        if job.proc.poll() is not None:
            break
        second = time.monotonic()
        job.signal(signal.SIGINT)
    result = job.wait(60)
    assert result.returncode == -signal.SIGINT, result.describe()
    assert time.monotonic() - second < 15, "the second Ctrl-C did not end the process at once"
    assert not list((out / "checkpoints").glob("checkpoint-*")), "a checkpoint was written"
    assert not (out / "model.safetensors").exists()


# ----------------------------------------------------------------------------- atomicity, safety

SLOW_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification
    from hvdft import checkpoint

    model_dir, root = Path(sys.argv[1]), Path(sys.argv[2])
    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=64, num_labels=3))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    state = {"progress": {"step": 1}, "optimizer": {"state": {}, "param_groups": []}}
    checkpoint.save_checkpoint(root / "checkpoint-1", model, tokenizer, state, {"labels": ["O"]})
    real_save = torch.save

    def slow_save(obj, path, *a, **k):  # half a file, then stall: the test kills us here
        real_save(obj, path, *a, **k)
        with open(path, "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
        print("WRITING", flush=True)
        time.sleep(120)

    checkpoint.torch.save = slow_save
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    checkpoint.save_checkpoint(root / "checkpoint-2", model, tokenizer, {"progress": {"step": 2}}, {})
    """
)


def test_killed_checkpoint_writer_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    from hvdft.checkpoint import list_checkpoints, load_state, resolve_resume
    from hvdft.models import resolve_model

    script = tmp_path / "writer.py"
    script.write_text(SLOW_WRITER)
    root = tmp_path / "out" / "checkpoints"
    proc = subprocess.Popen([sys.executable, str(script), resolve_model("minilm"), str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=job_env())
    try:
        line = ""
        deadline = time.monotonic() + 240
        while "WRITING" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            line = proc.stdout.readline() if proc.stdout else ""
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-1"]
    assert not (root / "checkpoint-2").exists()
    assert any(p.name.startswith(".tmp-checkpoint-2") for p in root.iterdir())  # the half-written one
    assert resolve_resume("latest", root.parent) == root / "checkpoint-1"
    state, run = load_state(root / "checkpoint-1")
    assert state["progress"]["step"] == 1 and run == {"labels": ["O"]}
    weights = load_tensors(root / "checkpoint-1")
    assert "classifier.weight" in weights and float(weights["classifier.weight"].abs().max()) < 1.0


def test_loading_a_checkpoint_never_runs_pickled_code(tmp_path: Path) -> None:
    import pickle

    from hvdft.checkpoint import load_state
    from hvdft.errors import HvdftError

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    (folder / "trainer_state.pt").write_bytes(pickle.dumps({"progress": Evil()}, protocol=2))
    (folder / "hvdft_run.json").write_text("{}")
    with pytest.raises(HvdftError, match="cannot read checkpoint"):
        load_state(folder)
    assert not marker.exists()


def test_remote_code_needs_trust_remote_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.dynamic_module_utils as dynamic
    from transformers import AutoConfig

    from hvdft.config import TrainConfig
    from hvdft.errors import HvdftError
    from hvdft.setup import _load

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # not ~/.cache
    marker = tmp_path / "ran"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(
        {"model_type": "evil-bert", "auto_map": {"AutoConfig": "evil.EvilConfig"}}))
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                   "from transformers import PretrainedConfig\n"
                                   "class EvilConfig(PretrainedConfig):\n    model_type = 'evil-bert'\n")
    with pytest.raises(HvdftError, match="cannot load model"):
        _load(AutoConfig.from_pretrained, str(model), TrainConfig(train_file="x", trust_remote_code=False))
    assert not marker.exists()
    config = _load(AutoConfig.from_pretrained, str(model), TrainConfig(train_file="x", trust_remote_code=True))
    assert type(config).__name__ == "EvilConfig" and marker.exists()  # the flag is what allows it


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_models_are_readable_as_the_umask_allows(tmp_path: Path, umask: int) -> None:
    """safetensors >= 0.8.1 writes model.safetensors 0o600 whatever the umask (safetensors#782):
    every file of a saved model folder gets the mode a new file gets, 0o666 less the umask."""
    from support import make_tiny_model
    from transformers import AutoModel, AutoTokenizer

    from hvdft.outputs import save_model

    src = make_tiny_model(tmp_path / "src")
    model, tokenizer = AutoModel.from_pretrained(src), AutoTokenizer.from_pretrained(src)
    old = os.umask(umask)
    try:
        save_model(tmp_path / "out", model, tokenizer, {"config": {}})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "hvdft_run.json"} <= set(modes)
    assert set(modes.values()) == {0o666 & ~umask}, {k: oct(v) for k, v in modes.items()}
