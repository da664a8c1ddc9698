"""The CLI surface and `hvdft doctor` on 1 rank and on 2 real Horovod ranks."""

from __future__ import annotations

import json
import os

import pytest
from support import HVDFT, horovodrun, job_env, mpirun, run

from hvdft import __version__

COMMANDS = [[], ["doctor"], ["train"], ["train", "ner"], ["train", "classify"], ["predict"], ["eval"], ["launch"],
            ["plot"]]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "main")
def test_every_command_has_help(args: list[str]) -> None:
    out = run([HVDFT, *args, "--help"], timeout=60).stdout
    assert out.startswith("Usage: hvdft")
    assert "--help" in out


def test_no_train_option_is_taken_by_horovodrun() -> None:
    """`horovodrun -np 2 hvdft train ner --OPTION`: horovodrun's argparse reads every word
    for its own options first and stops with "ambiguous option" on a prefix of two of them
    (as --timeline was: --timeline-filename, --timeline-mark-cycles)."""
    import re

    from hvdft import cli

    help_text = run([horovodrun()[0], "--help"], timeout=120).stdout
    theirs = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", help_text))
    assert "--timeline-filename" in theirs and len(theirs) > 30
    ours = {o for cmd in cli.train.commands.values() for p in cmd.params for o in p.opts + p.secondary_opts
            if o.startswith("--")}
    clashes = {o: sorted(t for t in theirs if t.startswith(o)) for o in ours if o not in theirs}
    assert {o: t for o, t in clashes.items() if len(t) > 1} == {}


def test_version() -> None:
    assert run([HVDFT, "--version"], timeout=60).stdout.strip() == f"hvdft, version {__version__}"


def _doctor_json(stdout: str) -> dict:
    start = stdout.index("{")
    return json.loads(stdout[start:])


def test_doctor_single_rank() -> None:
    report = _doctor_json(run([HVDFT, "doctor", "--json"], timeout=120).stdout)
    assert report["problems"] == []
    assert report["versions"]["horovod"] == "0.28.1"
    assert "mpi" in report["versions"]["horovod.built"] and "gloo" in report["versions"]["horovod.built"]
    assert report["versions"]["mpi"].startswith("Open MPI")
    assert [r["rank"] for r in report["ranks"]] == [0]
    assert report["allreduce"]["ok"] and report["allreduce"]["sum"] == 1.0


def _check_two_ranks(stdout: str, controller: str) -> None:
    # Rank 0 alone prints the gathered report; horovodrun prefixes lines with [0]<stdout>:
    lines = [line.split(":", 1)[1] if line.startswith("[0]<stdout>") else line for line in stdout.splitlines()]
    report = _doctor_json("\n".join(lines))
    ranks = report["ranks"]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert {r["size"] for r in ranks} == {2}
    assert sorted(r["local_rank"] for r in ranks) == [0, 1]
    assert len({r["pid"] for r in ranks}) == 2, "two distinct processes"
    assert all(r["host"] for r in ranks)
    assert {r["controller"] for r in ranks} == {controller}
    reduce = report["allreduce"]
    assert reduce["sum"] == 3.0 and reduce["mean"] == 0.5 and reduce["ok"]
    assert stdout.count('"allreduce"') == 1, "only rank 0 prints the report"


@pytest.mark.slow
def test_doctor_under_horovodrun_gloo() -> None:
    _check_two_ranks(run([*horovodrun(), HVDFT, "doctor", "--json"], timeout=180).stdout, "gloo")


@pytest.mark.slow
def test_doctor_under_mpirun() -> None:
    _check_two_ranks(run([*mpirun(), HVDFT, "doctor", "--json"], timeout=180).stdout, "mpi")


def test_doctor_exits_1_when_horovod_does_not_import(tmp_path) -> None:
    """The commonest broken install: Horovod's torch extension built against another
    torch fails to import (undefined symbol). A `horovod` package placed first on
    PYTHONPATH whose `horovod.torch` raises ImportError stands in for that build; the
    real Horovod stays installed, so the version check still passes."""
    fake = tmp_path / "site" / "horovod" / "torch"
    fake.mkdir(parents=True)
    (fake.parent / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("raise ImportError('undefined symbol: _ZN3c10 (built against another torch)')\n")
    env = job_env(PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    result = run([HVDFT, "doctor"], timeout=120, check=False, env=env)
    assert result.returncode == 1, result.describe()
    assert "PROBLEM: horovod.torch does not import: undefined symbol" in result.stdout, result.stdout
    assert "all checks passed" not in result.stdout and "Traceback" not in result.output
    report = _doctor_json(run([HVDFT, "doctor", "--json"], timeout=120, check=False, env=env).stdout)
    assert report["problems"] == ["horovod.torch does not import: undefined symbol: _ZN3c10 (built against "
                                  "another torch)"]
