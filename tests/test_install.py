"""install.sh: syntax, options, and that a rerun reuses what is there.

The two reruns work on the venv the suite runs from (CI: ./.venv, made by ./install.sh
--dev just before): a venv elsewhere would reinstall torch and the rest (minutes).
When the suite runs from another interpreter they skip, and conftest.py fails the run
for that skip: it is not one a machine explains.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from support import ROOT, job_env, run_job

INSTALL = ROOT / "install.sh"
VENV = ROOT / ".venv"
from_venv = pytest.mark.skipif(Path(sys.prefix).resolve() != VENV.resolve(), reason="tests not run from ./.venv")


def test_install_script_parses_and_documents_itself() -> None:
    subprocess.run(["bash", "-n", str(INSTALL)], check=True, timeout=30)
    out = subprocess.run(["bash", str(INSTALL), "--help"], capture_output=True, text=True, timeout=30, check=True)
    assert "--dev" in out.stdout and "--cuda" in out.stdout and "--show-torch" in out.stdout


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
    assert "torch 2.13.0+cpu (CPU build)" in out


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


def show_torch(*args: str, **env: str) -> tuple[int, str, str]:
    """`install.sh --show-torch ARGS`: where torch would come from; installs nothing. The
    pin and the CPU index are install.sh's defaults unless given (a caller's HVDFT_TORCH,
    such as benchmarks/cuda_build.sh's, does not leak in)."""
    base = {k: v for k, v in os.environ.items() if k not in ("HVDFT_TORCH", "HVDFT_TORCH_INDEX")}
    proc = subprocess.run(["bash", str(INSTALL), "--show-torch", *args], capture_output=True, text=True,
                          timeout=120, env={**base, **env})
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def cpu_index(tmp_path_factory: pytest.TempPathFactory):
    """A reachable stand-in for https://download.pytorch.org/whl/cpu (an index with a torch/ page)."""
    root = tmp_path_factory.mktemp("cpu-index")
    (root / "torch").mkdir()
    (root / "torch" / "index.html").write_text("<html></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()


def test_cpu_install_takes_torch_from_the_cpu_index(cpu_index: str, tmp_path: Path) -> None:
    code, out, err = show_torch(HVDFT_VENV=str(tmp_path / "none"), HVDFT_TORCH_INDEX=cpu_index)
    assert code == 0, err
    assert f"torch: install: pip install --index-url {cpu_index} torch==2.13.0" in out
    assert "because: no torch installed" in out and "WARNING" not in err


def test_cpu_install_says_so_when_the_cpu_index_is_unreachable(tmp_path: Path) -> None:
    code, out, err = show_torch(HVDFT_VENV=str(tmp_path / "none"), HVDFT_TORCH_INDEX="http://127.0.0.1:9/whl/cpu")
    assert code == 0, err
    assert "torch: install: pip install torch==2.13.0\n" in out and "configured package index" in out
    assert "PyTorch's CPU wheel index http://127.0.0.1:9/whl/cpu is unreachable" in err
    assert "On PyPI that is the CUDA build" in err


def test_cuda_takes_the_index_default_build_and_never_a_local_cpu_wheel(tmp_path: Path) -> None:
    # '===' excludes 2.13.0+cpu, which '==' accepts and pip prefers (a local version sorts higher).
    code, out, err = show_torch("--cuda", HVDFT_VENV=str(tmp_path / "none"))
    assert code == 0, err
    assert "torch: install: pip install torch===2.13.0\n" in out


def test_cuda_tag_takes_pytorchs_cuda_index(cpu_index: str, tmp_path: Path) -> None:
    code, out, err = show_torch("--cuda", "cu126", "--dev", HVDFT_VENV=str(tmp_path / "none"))
    assert code == 0
    # Unreachable here (no internet beyond the package index) or reachable elsewhere: both are said.
    assert ("--index-url https://download.pytorch.org/whl/cu126 torch==2.13.0" in out
            or "https://download.pytorch.org/whl/cu126 is unreachable" in err), out + err


def test_cuda_after_a_cpu_install_replaces_torch() -> None:
    if not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("no ./.venv (run ./install.sh first)")
    code, out, err = show_torch("--cuda", HVDFT_VENV=str(ROOT / ".venv"))
    assert code == 0, err
    assert "because: torch 2.13.0+cpu is a CPU build and --cuda asks for CUDA" in out


def test_rerunning_the_cpu_install_keeps_torch() -> None:
    if not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("no ./.venv (run ./install.sh first)")
    code, out, err = show_torch(HVDFT_VENV=str(ROOT / ".venv"))
    assert code == 0, err
    assert out.startswith("torch: keep: torch 2.13.0+cpu"), out


def test_bad_cuda_tag_is_refused() -> None:
    proc = subprocess.run(["bash", str(INSTALL), "--cuda", "12.6"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--cuda '12.6': expected a PyTorch CUDA tag" in proc.stderr


@pytest.mark.skipif(Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(), reason="tests not run from ./.venv")
def test_the_plain_install_is_cpu_only() -> None:
    """./install.sh without --cuda: a CPU torch and none of the NVIDIA wheels a CUDA torch pulls in."""
    import importlib.metadata

    import torch

    assert torch.version.cuda is None, torch.__version__
    nvidia = sorted(d.metadata["Name"] for d in importlib.metadata.distributions()
                    if d.metadata["Name"].lower().startswith("nvidia-"))
    assert nvidia == [], nvidia
