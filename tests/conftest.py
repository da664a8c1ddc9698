"""Shared test helpers: real subprocesses, real Horovod, bounded by timeouts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# HVDFT_SHARED_DATA: for a checkout elsewhere than beside ../shared
SHARED_DATA = Path(os.environ.get("HVDFT_SHARED_DATA") or ROOT.parent / "shared" / "data")
HVDFT = str(BIN / "hvdft")
MPIRUN = ["mpirun", "--oversubscribe", "-np", "2"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
HOROVODRUN = [str(BIN / "horovodrun"), "-np", "2", "--gloo"]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e.setdefault("TOKENIZERS_PARALLELISM", "false")
    e.update(extra)
    return e


def run(cmd: list[str], timeout: float = 300, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command with a hard timeout; on failure show its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=kwargs.pop("env", env()), **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    """A test input file with exactly these bytes (str is written as UTF-8)."""
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return p


@pytest.fixture(scope="module")
def tokenizer():
    """The offline MiniLM's fast WordPiece tokenizer."""
    from transformers import AutoTokenizer

    from hvdft.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("minilm"), use_fast=True)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (real corpora for tests live there)")
    return SHARED_DATA
