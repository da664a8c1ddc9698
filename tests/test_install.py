"""install.sh: syntax, options, and that a rerun reuses what is there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

INSTALL = ROOT / "install.sh"


def test_install_script_parses_and_documents_itself() -> None:
    subprocess.run(["bash", "-n", str(INSTALL)], check=True, timeout=30)
    out = subprocess.run(["bash", str(INSTALL), "--help"], capture_output=True, text=True, timeout=30, check=True)
    assert "--dev" in out.stdout and "--cuda" in out.stdout


def test_unknown_option_is_refused() -> None:
    proc = subprocess.run(["bash", str(INSTALL), "--bogus"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unknown option '--bogus'" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(), reason="tests not run from ./.venv")
def test_rerun_is_idempotent_and_reuses_horovod() -> None:
    proc = subprocess.run(["bash", str(INSTALL), "--dev"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CI": os.environ.get("CI", "")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Horovod 0.28.1 already installed for this torch" in proc.stdout
    assert "building Horovod" not in proc.stdout
    assert "hvdft already installed" in proc.stdout
    assert "horovodrun --check-build: PyTorch, MPI, Gloo" in proc.stdout
