"""Fixtures, and the rule on skips: a skip must be one this kind of machine explains.

Helpers live in `support.py` (one policy for every job a test starts). Every skip is
listed (`-rs`); a skip whose reason is not expected on this machine fails the session,
so a test that stops running (a tool missing from the install, a fixture that skips
when the code under test breaks) cannot hide as a green run.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from support import SHARED_DATA


def _capability(bit: int) -> bool:
    """Whether this process holds a Linux capability (CAP_SYS_ADMIN is 21, CAP_NET_ADMIN 12)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    found = re.search(r"^CapEff:\s*([0-9a-f]+)$", status, re.M)
    return bool(found and int(found.group(1), 16) >> bit & 1)


def _can_make_namespaces() -> bool:
    return os.geteuid() == 0 and _capability(21) and _capability(12)


# Skip reasons that facts of the machine explain, not the install (which CI controls:
# Horovod, hadolint, the venv are never a reason to skip there). Each maps to the
# condition under which it is expected.
def _absent_shared(reason: str) -> bool:
    """'PATH is absent ...' for a PATH in the shared corpora folder that is indeed absent."""
    found = re.match(r"(\S+) is absent", reason.removeprefix("Skipped: "))
    if not found:
        return False
    path = Path(found.group(1))
    return path.is_relative_to(SHARED_DATA) and not path.exists()


EXPECTED_SKIPS: list[tuple[str, Callable[[str], bool]]] = [
    # licence-restricted corpora are not in the repository: absent on every clean clone
    # (HVDFT_SHARED_DATA names a folder that holds them)
    (r" is absent", _absent_shared),
    # the SemEval-2010 Task 8 scorer is a Perl script
    (r"perl is not installed", lambda _: shutil.which("perl") is None),
    # test_two_hosts: network namespaces need root and these capabilities (not in every container)
    (r"network namespaces need root", lambda _: os.geteuid() != 0),
    (r"cannot (create a network namespace|build the veth pair|enter the namespaces)",
     lambda _: not _can_make_namespaces()),
    (r"'(ip|unshare|hostname)' is not installed", lambda _: True),  # system tools; install.sh adds none
]


def _expected(reason: str) -> bool:
    return any(re.search(pattern, reason) and when(reason) for pattern, when in EXPECTED_SKIPS)


_unexpected: list[tuple[str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not _expected(reason):
            _unexpected.append((report.nodeid, reason))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _unexpected and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _unexpected:
        terminalreporter.section("unexpected skips (they fail the run; see EXPECTED_SKIPS in tests/conftest.py)",
                                 red=True)
        for nodeid, reason in _unexpected:
            terminalreporter.line(f"{nodeid}: {reason}")


@pytest.fixture(scope="module")
def tokenizer():
    """The offline MiniLM's fast WordPiece tokenizer."""
    from transformers import AutoTokenizer

    from hvdft.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("minilm"), use_fast=True)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (real corpora, licence-restricted, not in the repository)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (real corpora for tests live there)")
    return SHARED_DATA
