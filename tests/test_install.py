"""install.sh: syntax, options, and that a rerun reuses what is there.

The two reruns work on the venv the suite runs from (CI: ./.venv, made by ./install.sh
--dev just before): a venv elsewhere would reinstall torch and the rest (minutes).
When the suite runs from another interpreter they skip, and conftest.py fails the run
for that skip: it is not one a machine explains.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, job_env, run_job

INSTALL = ROOT / "install.sh"
VENV = ROOT / ".venv"
from_venv = pytest.mark.skipif(Path(sys.prefix).resolve() != VENV.resolve(), reason="tests not run from ./.venv")


def test_install_script_parses_and_documents_itself() -> None:
    subprocess.run(["bash", "-n", str(INSTALL)], check=True, timeout=30)
    out = subprocess.run(["bash", str(INSTALL), "--help"], capture_output=True, text=True, timeout=30, check=True)
    assert "--dev" in out.stdout and "--cuda" in out.stdout


def test_unknown_option_is_refused() -> None:
    proc = subprocess.run(["bash", str(INSTALL), "--bogus"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unknown option '--bogus'" in proc.stderr


def install(timeout: float = 900) -> str:
    result = run_job(["bash", str(INSTALL), "--dev"], timeout=timeout, env=job_env())
    assert result.returncode == 0, result.describe()
    return result.stdout


@pytest.mark.slow
@from_venv
def test_rerun_is_idempotent() -> None:
    out = install()
    assert "Horovod 0.28.1 already installed for this torch" in out
    assert "building Horovod" not in out and "reusing cached Horovod wheel" not in out
    assert "hvdft already installed" in out
    assert "horovodrun --check-build: PyTorch, MPI, Gloo" in out


@pytest.mark.slow
@from_venv
def test_a_venv_without_horovod_gets_the_cached_wheel_not_a_build() -> None:
    """The venv's marker says which Horovod build it holds; without it install.sh treats
    the venv as new (as a second checkout's venv is) and must install the wheel cached by
    the first build, not compile Horovod again (a build takes 10+ minutes on 2 cores)."""
    marker = VENV / ".hvdft-horovod-key"
    key = marker.read_text().strip()
    marker.unlink()
    out = install()
    reused = re.search(r"reusing cached Horovod wheel: (\S+\.whl)", out)
    assert reused, out
    assert "building Horovod" not in out
    wheel = Path(reused.group(1))
    assert wheel.is_file() and wheel.parent.name == key  # the cache entry of this torch/Python/MPI
    assert marker.read_text().strip() == key
    assert "horovodrun --check-build: PyTorch, MPI, Gloo" in out
    check = run_job([sys.executable, "-c", "import horovod, horovod.torch; print(horovod.__version__)"], timeout=120)
    assert check.returncode == 0 and check.stdout.strip() == "0.28.1", check.describe()
