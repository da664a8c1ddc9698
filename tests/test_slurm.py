"""hostfiles/slurm.sbatch, run as Slurm would run it, on this machine.

No Slurm here. What is real: the batch script itself (bash), `hvdft launch` reading the
allocation from the SLURM_* variables sbatch sets, mpirun and 2 training ranks, SIGTERM
to the batch shell (what `--signal=B:TERM@120` sends before the time limit), the
checkpoint, and the requeued run that resumes. What is faked: `scontrol` (it records its
arguments: the script calls `scontrol requeue JOBID`) and `srun` (it records its
arguments and runs nothing: the srun starter is checked for the command line it builds,
not for what Slurm would make of it). The allocation is this host with 2 tasks.

Rank 1 waits at the start of step 5 for the stop signal (HVDFT_FAULT kind=wait): the
signal finds the job at a known step however fast the machine is. `hvdft launch` forwards
a test hook only when named (`--env HVDFT_FAULT`), so the interrupted run uses a copy of
the template whose launch line adds exactly that, and nothing else; the requeued run uses
the template itself.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support import ROOT, Job, job_env, make_tiny_model, metrics_records, run_job, sentences, write_conll

SBATCH = ROOT / "hostfiles" / "slurm.sbatch"
RECORDER = """#!/bin/sh
printf '%s\\n' "$(basename "$0") $*" >> "$FAKE_SLURM_LOG"
"""


def test_template_is_valid_bash_and_asks_for_the_warning_signal_and_requeue() -> None:
    subprocess.run(["bash", "-n", str(SBATCH)], check=True, timeout=30)
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", SBATCH.read_text(), re.M))
    assert directives["signal"] == "B:TERM@120"  # to the batch shell, which forwards it
    assert "requeue" in directives and directives["open-mode"] == "append"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("slurm")
    fake = tmp / "bin"
    fake.mkdir()
    for name in ("scontrol", "srun"):
        (fake / name).write_text(RECORDER)
        (fake / name).chmod(0o755)
    data = {"train": write_conll(tmp / "train.txt", sentences(48, seed=31)),
            "valid": write_conll(tmp / "valid.txt", sentences(8, seed=32)),
            "test": write_conll(tmp / "test.txt", sentences(8, seed=33))}
    host = socket.gethostname()
    env = job_env(
        PATH=f"{fake}:{job_env()['PATH']}", FAKE_SLURM_LOG=str(tmp / "calls.log"),
        SLURM_SUBMIT_DIR=str(tmp), SLURM_JOB_ID="4242", SLURM_JOBID="4242", SLURM_JOB_NAME="hvdft-test",
        SLURM_JOB_NODELIST=host, SLURM_NODELIST=host, SLURM_TASKS_PER_NODE="2", SLURM_NTASKS="2",
        SLURM_CPUS_PER_TASK="1", HVDFT_VENV=str(Path(sys.executable).parent.parent),
    )
    # extra arguments go to `train ner` after the template's own: the last one given wins
    extra = ["--model", str(make_tiny_model(tmp / "tiny")), "--train-file", str(data["train"]),
             "--validation-file", str(data["valid"]), "--test-file", str(data["test"]), "--batch-size", "4",
             "--max-length", "32", "--epochs", "20", "--max-steps", "40", "--save-every", "20", "--log-every", "1",
             "--cache-dir", str(tmp / "cache")]
    return {"tmp": tmp, "env": env, "extra": extra, "calls": tmp / "calls.log"}


def with_the_hook_forwarded(tmp: Path) -> Path:
    """The template, its `hvdft launch` line naming HVDFT_FAULT (hooks are not forwarded
    unless named); every other line as it is."""
    launch = "hvdft launch --max-restarts 2 -- "
    text = SBATCH.read_text()
    assert text.count(launch) == 1, "the template's launch line changed: update this test"
    copy = tmp / "slurm-hooked.sbatch"
    copy.write_text(text.replace(launch, "hvdft launch --env HVDFT_FAULT --max-restarts 2 -- "))
    return copy


def steps_logged(out: Path) -> list[int]:
    """The training steps in metrics.jsonl so far (a line being written is skipped)."""
    path = out / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            pass
    return steps


def calls(slurm: dict) -> list[str]:
    return slurm["calls"].read_text().splitlines() if slurm["calls"].exists() else []


@pytest.mark.slow
def test_time_limit_signal_checkpoints_requeues_and_the_requeued_job_resumes(slurm: dict) -> None:
    out = slurm["tmp"] / "runs" / "hvdft-test"  # runs/$SLURM_JOB_NAME, relative to the submit dir
    env = {**slurm["env"], "HVDFT_FAULT": "rank=1,step=5,kind=wait"}
    job = Job(["bash", str(with_the_hook_forwarded(slurm["tmp"])), *slurm["extra"]], env=env, cwd=slurm["tmp"])
    deadline = time.monotonic() + 600  # the launcher, 2 ranks importing torch, tokenizing: minutes when loaded
    while max(steps_logged(out), default=0) < 4:
        assert time.monotonic() < deadline and job.proc.poll() is None, job.wait(30).describe()
        time.sleep(0.2)
    job.proc.send_signal(signal.SIGTERM)  # the batch shell only, as --signal=B:TERM does
    first = job.wait(300)
    assert first.returncode == 0, first.describe()  # a time limit is not a failure
    assert "SIGTERM before the time limit" in first.stderr
    # (the ranks' "interrupted by a signal at step 4" line does not reach the log: mpirun
    # stops forwarding their output once it is aborting the job)
    assert calls(slurm) == ["scontrol requeue 4242"]
    stopped_at = 4
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"checkpoint-{stopped_at}"]
    state = torch.load(out / "checkpoints" / f"checkpoint-{stopped_at}" / "trainer_state.pt", weights_only=True)
    assert state["progress"]["step"] == stopped_at
    assert not (out / "model.safetensors").exists()
    assert re.search(r"\[hvdft launch\] mpirun -np 2 .*-H \S+:2 ", first.stdout), first.stdout[:2000]

    # the requeued job: same script, same variables; it finds the checkpoint and resumes
    second = run_job(["bash", str(SBATCH), *slurm["extra"]], timeout=600, env=slurm["env"], cwd=slurm["tmp"])
    assert second.returncode == 0, second.describe()
    assert " --resume" in second.stdout.splitlines()[0]  # the launch line
    # --output-dir is the template's relative runs/$SLURM_JOB_NAME
    assert re.search(rf"resumed from \S*runs/hvdft-test/checkpoints/checkpoint-{stopped_at}\n", second.stdout), \
        second.stdout[:3000]
    assert calls(slurm) == ["scontrol requeue 4242"]  # not requeued again
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_steps"] == 40 and results["world_size"] == 2
    assert [r["step"] for r in metrics_records(out) if "loss" in r and "eval_f1" not in r] == list(range(1, 41))


def test_srun_starter_command_line(slurm: dict) -> None:
    out = slurm["tmp"] / "srun-out"
    env = {**slurm["env"], "HVDFT_STARTER": "srun", "HVDFT_OUT": str(out)}
    log = slurm["tmp"] / "srun-calls.log"
    env["FAKE_SLURM_LOG"] = str(log)
    fresh = run_job(["bash", str(SBATCH), "--epochs", "2"], timeout=60, env=env, cwd=slurm["tmp"])
    assert fresh.returncode == 0, fresh.describe()
    (out / "checkpoints" / "checkpoint-7").mkdir(parents=True)
    again = run_job(["bash", str(SBATCH), "--epochs", "2"], timeout=60, env=env, cwd=slurm["tmp"])
    assert again.returncode == 0, again.describe()
    first, second = log.read_text().splitlines()
    expected = (f"srun --mpi=pmix --kill-on-bad-exit=1 hvdft train ner --model minilm --dataset wnut17 "
                f"--output-dir {out} --save-every 500 --resume auto")
    # the same line with or without a checkpoint: --resume auto lets hvdft decide (a fresh
    # start when there is none: test_engine_parts.py::test_resume_auto_starts_afresh_without_a_checkpoint)
    assert first == second == f"{expected} --epochs 2"
