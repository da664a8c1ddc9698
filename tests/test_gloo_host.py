"""Gloo on a host whose name does not resolve (a container with --network none).

Horovod 0.28.1 as released segfaults there (hvdft/gloo_host.py has the two bugs);
install.sh builds it with both fixed. Checked here: the detection, the launcher's and
dist.init()'s answers for a Horovod without the fix (switch to mpirun, or one line),
and a real 2-rank Gloo job in a network namespace whose host name resolves to nothing.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import ROOT

from hvdft import dist, gloo_host
from hvdft.errors import HvdftError
from hvdft.launch import PREFIX, launch

BIN = Path(sys.executable).parent
NOWHERE = "hvdft-no-such-host.invalid"  # RFC 2606: never resolves


def test_usable_host_name_is_no_problem() -> None:
    assert gloo_host.hostname_problem("localhost") is None


def test_unresolvable_host_name() -> None:
    problem = gloo_host.hostname_problem(NOWHERE)
    assert problem is not None and problem.startswith(f"this host's name '{NOWHERE}' does not resolve (")


def test_host_name_resolving_to_an_address_held_by_no_interface() -> None:
    # TEST-NET-2 (RFC 5737): no machine holds it, and a numeric name resolves to itself.
    assert gloo_host.hostname_problem("198.51.100.7") == (
        "this host's name '198.51.100.7' resolves to 198.51.100.7, which no interface here holds"
    )


def test_this_venv_has_the_fixed_horovod() -> None:
    """install.sh built Horovod with the Gloo fixes (a stale cached wheel would not have them)."""
    assert gloo_host.horovod_has_gloo_fix()
    assert gloo_host.gloo_crash_reason(NOWHERE) is None


@pytest.fixture
def unfixed_horovod_on_unnamed_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """This host as it looks with Horovod 0.28.1 from PyPI inside a --network none container."""
    monkeypatch.setattr(gloo_host, "horovod_has_gloo_fix", lambda: False)
    monkeypatch.setattr(gloo_host.socket, "gethostname", lambda: NOWHERE)


def _launch(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(launch, ["--dry-run", *args], catch_exceptions=False)
    return result.exit_code, result.output.splitlines()


@pytest.mark.usefixtures("unfixed_horovod_on_unnamed_host")
def test_launcher_switches_to_mpirun_when_gloo_would_crash() -> None:
    code, lines = _launch("-np", "2", "--", "doctor")
    assert code == 0, lines
    note, command = [line for line in lines if line.startswith(PREFIX)]
    assert "does not resolve" in note and note.endswith("using mpirun (--mpi) instead")
    assert shlex.split(command[len(PREFIX) :])[0] == "mpirun"


@pytest.mark.usefixtures("unfixed_horovod_on_unnamed_host")
def test_launcher_refuses_an_explicit_gloo_in_one_line() -> None:
    code, lines = _launch("--gloo", "-np", "2", "--", "doctor")
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("hvdft: error: this host's name"), lines
    assert "segmentation fault" in lines[0] and "--hostname localhost" in lines[0]


@pytest.mark.usefixtures("unfixed_horovod_on_unnamed_host")
def test_launcher_leaves_remote_only_gloo_jobs_alone() -> None:
    code, lines = _launch("-H", "node1:2,node2:2", "--", "doctor")
    assert code == 0 and "--gloo" in lines[-1], lines


@pytest.mark.usefixtures("unfixed_horovod_on_unnamed_host")
def test_ranks_refuse_instead_of_crashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank started by `horovodrun --gloo` directly (no hvdft launch) stops before hvd.init()."""
    monkeypatch.setenv("HOROVOD_GLOO_RENDEZVOUS_ADDR", "127.0.0.1")
    with pytest.raises(HvdftError, match="segmentation fault"):
        dist._refuse_crashing_gloo()


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-n", "-u", "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -n -u` (root or user namespaces)")
def test_two_gloo_ranks_on_a_host_with_no_network_and_no_name() -> None:
    """What `docker run --network none` gives: loopback only, a name nothing resolves.

    With Horovod 0.28.1 from PyPI both ranks die of SIGSEGV here (exit 139)."""
    script = (
        f"ip link set lo up && hostname {NOWHERE.split('.')[0]} && "
        f"{shlex.quote(str(BIN / 'hvdft'))} launch -np 2 -- doctor"
    )
    proc = subprocess.run(["unshare", "-n", "-u", "sh", "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    assert "--gloo" in proc.stdout and "using mpirun" not in proc.stdout, log
