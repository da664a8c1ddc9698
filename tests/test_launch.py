"""`hvdft launch`: the commands it builds (dry runs), its host parsers, and real runs."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import (
    BIN,
    ROOT,
    Job,
    job_env,
    load_tensors,
    make_tiny_model,
    max_abs_diff,
    run_job,
    sentences,
    write_conll,
)

from hvdft import hosts as hostlib
from hvdft import launch as launch_mod
from hvdft import outcome as outcome_mod
from hvdft.errors import HvdftError
from hvdft.hosts import expand_hostlist, expand_tasks_per_node, parse_hostfile, parse_hosts, slurm_hosts
from hvdft.launch import PREFIX, build_command, hvdft_program, launch

HVDFT = [str(BIN / "hvdft")] if (BIN / "hvdft").exists() else [sys.executable, "-m", "hvdft"]


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests may run inside a Slurm job; none of them should see it unless they ask."""
    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)


def dry_run(*args: str, env: dict[str, str] | None = None) -> list[str]:
    """The argv `hvdft launch --dry-run ARGS` prints; its one-line error as HvdftError."""
    result = CliRunner().invoke(launch, ["--dry-run", *args], env=env, catch_exceptions=False)
    errors = [line for line in result.output.splitlines() if line.startswith("hvdft: error: ")]
    if errors:
        assert result.exit_code == 2 and len(errors) == 1, result.output
        raise HvdftError(errors[0][len("hvdft: error: ") :])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith(PREFIX)]
    assert len(lines) == 1, result.output
    return shlex.split(lines[0][len(PREFIX) :])


def flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == flag]


def mca(argv: list[str]) -> dict[str, str]:
    return {argv[i + 1]: argv[i + 2] for i, word in enumerate(argv[:-2]) if word in ("-mca", "--mca")}


# ------------------------------------------------------------------ horovodrun


def test_default_is_horovodrun_gloo_with_the_venvs_hvdft() -> None:
    argv = dry_run("-np", "2", "--", "train", "ner", "--epochs", "1")
    assert Path(argv[0]).name == "horovodrun"
    assert argv[1:4] == ["-np", "2", "--gloo"]
    assert argv[4:] == [*hvdft_program(), "train", "ner", "--epochs", "1"]
    assert hvdft_program()[0].startswith(str(BIN))  # this venv, not whatever is on PATH


def test_horovodrun_hosts_interface_and_env_value() -> None:
    argv = dry_run("-H", "a:2,b:2", "--network-interface", "eth1", "--env", "FOO=bar", "--", "doctor")
    assert argv[0] == "FOO=bar"  # horovodrun hands its own environment to the ranks
    assert argv[2:5] == ["-np", "4", "--gloo"]
    assert flag_values(argv, "-H") == ["a:2,b:2"]
    assert flag_values(argv, "--network-interface") == ["eth1"]


def test_horovodrun_mpi_controller() -> None:
    argv = dry_run("--launcher", "horovodrun", "--mpi", "-np", "2", "--", "doctor")
    assert argv[1:4] == ["-np", "2", "--mpi"]


def test_exec_runs_the_words_as_given() -> None:
    argv = dry_run("-np", "2", "--exec", "--", "python", "x.py", "--flag")
    assert argv[-3:] == ["python", "x.py", "--flag"]
    assert "hvdft" not in " ".join(argv[4:])


# ------------------------------------------------------------------ mpirun


def test_mpirun_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch_mod, "local_core_count", lambda: 4)
    argv = dry_run("--mpi", "-np", "2", "--", "doctor")
    assert argv[:3] == ["mpirun", "-np", "2"]
    joined = " ".join(argv)
    assert "-bind-to none -map-by slot" in joined
    assert "--oversubscribe" not in argv
    assert mca(argv)["pml"] == "ob1"
    # Short: every failure waits twice this; the checkpoint on SIGTERM does not need it
    # (hvdft launch signals the ranks itself: test_interrupt_checkpoints below).
    assert mca(argv)["odls_base_sigkill_timeout"] == str(launch_mod.MPI_TERM_GRACE_S)
    assert "PATH" in flag_values(argv, "-x")
    assert argv[-len(hvdft_program()) - 1 :] == [*hvdft_program(), "doctor"]


@pytest.mark.parametrize("euid", [0, 1000])
def test_allow_run_as_root_only_for_root(monkeypatch: pytest.MonkeyPatch, euid: int) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    argv = dry_run("--mpi", "-np", "1", "--", "doctor")
    assert ("--allow-run-as-root" in argv) == (euid == 0)


def test_oversubscribe_only_beyond_local_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch_mod, "local_core_count", lambda: 2)
    assert "--oversubscribe" not in dry_run("--mpi", "-np", "2", "--", "doctor")
    assert "--oversubscribe" in dry_run("--mpi", "-np", "3", "--", "doctor")
    assert "--oversubscribe" in dry_run("--mpi", "-np", "3", "-H", "localhost:2", "--", "doctor")
    with pytest.raises(HvdftError, match="more than the 2 slots"):
        dry_run("--mpi", "-np", "3", "-H", "node1:2", "--", "doctor")


def test_mpirun_forwards_the_environment_it_needs() -> None:
    env = {
        "PATH": "/bin",
        "LD_LIBRARY_PATH": "/lib",
        "PYTHONPATH": "/src",
        "OMP_NUM_THREADS": "2",
        "HOROVOD_FUSION_THRESHOLD": "1",
        "NCCL_DEBUG": "INFO",
        "HF_HOME": "/hf",
        "TRANSFORMERS_OFFLINE": "1",
        "HOME": "/root",
        "SECRET_TOKEN": "x",
    }
    argv = build_command(
        ["hvdft", "doctor"],
        launcher="mpirun",
        controller="mpi",
        env=env,
        extra_env=["MY_VAR", "OTHER=1"],
    )
    forwarded = flag_values(argv, "-x")
    assert set(forwarded) == {
        "PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "OMP_NUM_THREADS", "HOROVOD_FUSION_THRESHOLD",
        "NCCL_DEBUG", "HF_HOME", "TRANSFORMERS_OFFLINE", "MY_VAR", "OTHER=1",
    }  # fmt: skip


def test_env_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_SETTING", "1")
    argv = dry_run("--mpi", "--env", "MY_SETTING", "--env", "B=2", "--", "doctor")
    assert {"MY_SETTING", "B=2"} <= set(flag_values(argv, "-x"))
    monkeypatch.delenv("MY_SETTING")
    with pytest.raises(HvdftError, match="MY_SETTING is not set"):
        dry_run("--mpi", "--env", "MY_SETTING", "--", "doctor")


def test_user_mca_replaces_the_default() -> None:
    argv = dry_run("--mpi", "--launcher-args", "-mca btl tcp,self", "--", "doctor")
    assert flag_values(argv, "-mca").count("btl") == 1
    assert mca(argv)["btl"] == "tcp,self"


def test_network_interface_for_mpirun() -> None:
    argv = dry_run("--mpi", "--network-interface", "ib0", "--", "doctor")
    assert mca(argv)["btl_tcp_if_include"] == "ib0"
    assert mca(argv)["oob_tcp_if_include"] == "ib0"


def test_gloo_cannot_use_mpirun() -> None:
    with pytest.raises(HvdftError, match="--gloo needs horovodrun"):
        dry_run("--launcher", "mpirun", "--gloo", "--", "doctor")


def test_nothing_to_run() -> None:
    with pytest.raises(HvdftError, match="nothing to run"):
        build_command([], launcher="horovodrun")


# ------------------------------------------------------------------ hostfiles and -H


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_hostfile_slots_syntax(tmp_path: Path) -> None:
    strict = write(tmp_path, "hosts", "node1 slots=4\nnode2 slots=2\n")
    assert parse_hostfile(strict) == [("node1", 4), ("node2", 2)]
    # A file each launcher reads as it is passes through untouched.
    horovod = dry_run("--hostfile", str(strict), "--", "doctor")
    assert flag_values(horovod, "--hostfile") == [str(strict)]
    assert flag_values(horovod, "-np") == ["6"]
    mpi = dry_run("--mpi", "--hostfile", str(strict), "--", "doctor")
    assert flag_values(mpi, "-hostfile") == [str(strict)]


def test_hostfile_with_comments(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "hosts",
        """\
        # two nodes
        node1 slots=4   # the fast one

        node2 slots=2 max_slots=4
        node3
        """,
    )
    assert parse_hostfile(path) == [("node1", 4), ("node2", 2), ("node3", 1)]
    # horovodrun's reader fails on comments: the same hosts go as -H instead.
    horovod = dry_run("--hostfile", str(path), "--", "doctor")
    assert flag_values(horovod, "-H") == ["node1:4,node2:2,node3:1"]
    assert "--hostfile" not in horovod
    assert flag_values(dry_run("--mpi", "--hostfile", str(path), "--", "doctor"), "-hostfile") == [str(path)]


def test_hostfile_colon_syntax(tmp_path: Path) -> None:
    path = write(tmp_path, "hosts", "node1:4\n# comment\nnode2:2\n")
    assert parse_hostfile(path) == [("node1", 4), ("node2", 2)]
    for extra in ([], ["--mpi"]):
        argv = dry_run(*extra, "--hostfile", str(path), "--", "doctor")
        assert flag_values(argv, "-H") == ["node1:4,node2:2"]
        assert flag_values(argv, "-np") == ["6"]


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("node1 slots=2\nnode2 slots=two\n", 2, "slots must be a positive integer"),
        ("node1:2\n\nnode2:0\n", 3, "slots must be a positive integer"),
        ("node1 slots=2\nnode2 cpus=2\n", 2, "expected slots=N"),
        ("node1:2 slots=2\n", 1, "takes nothing after it"),
        ("# hosts\nno/de slots=1\n", 2, "not a host name"),
        ("node1 slots=1\nnode2 slots=1\nnode1 slots=2\n", 3, "already listed"),
    ],
)
def test_hostfile_errors_name_the_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = write(tmp_path, "hosts", text)
    with pytest.raises(HvdftError, match=message) as caught:
        parse_hostfile(path)
    assert str(caught.value).startswith(f"{path}:{line}: ")
    with pytest.raises(HvdftError, match=f":{line}: "):
        dry_run("--hostfile", str(path), "--", "doctor")


def test_hostfile_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(HvdftError, match="cannot read hostfile"):
        parse_hostfile(tmp_path / "nope")
    with pytest.raises(HvdftError, match="lists no hosts"):
        parse_hostfile(write(tmp_path, "hosts", "# nothing\n"))


def test_parse_hosts() -> None:
    assert parse_hosts("a:2,b.example.com:1,10.0.0.3") == [
        ("a", 2), ("b.example.com", 1), ("10.0.0.3", 1),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "spec, message",
    [
        ("a:2,,b:1", "-H entry 2 is empty"),
        ("a:2,b:x", "-H entry 2 'b:x': slots must be"),
        ("a:0", "-H entry 1 'a:0': slots must be"),
        ("a:1,b:1,a:2", "-H entry 3 'a:2': host 'a' is already listed"),
        ("a b:1", "-H entry 1 'a b:1': 'a b' is not a host name"),
    ],
)
def test_parse_hosts_errors(spec: str, message: str) -> None:
    with pytest.raises(HvdftError, match=message):
        parse_hosts(spec)


def test_hostfile_and_hosts_are_exclusive(tmp_path: Path) -> None:
    path = write(tmp_path, "hosts", "a slots=1\n")
    with pytest.raises(HvdftError, match="not both"):
        dry_run("--hostfile", str(path), "-H", "a:1", "--", "doctor")


# ------------------------------------------------------------------ Slurm


@pytest.mark.parametrize(
    "nodelist, expected",
    [
        ("gpu5", ["gpu5"]),
        ("node[1-3]", ["node1", "node2", "node3"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("a,b[1,3],c-[9-10]", ["a", "b1", "b3", "c-9", "c-10"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("cn[0007]", ["cn0007"]),
    ],
)
def test_expand_hostlist(nodelist: str, expected: list[str]) -> None:
    assert expand_hostlist(nodelist) == expected


@pytest.mark.parametrize(
    "nodelist, message",
    [
        ("node[3-1]", "runs backwards"),
        ("node[01-03", "unbalanced '\\['"),
        ("node01]", "unbalanced '\\]'"),
        ("node[a-b]", "bad range"),
        ("node1,,node2", "empty entry"),
    ],
)
def test_expand_hostlist_errors(nodelist: str, message: str) -> None:
    with pytest.raises(HvdftError, match=message):
        expand_hostlist(nodelist)


def test_expand_tasks_per_node() -> None:
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    assert expand_tasks_per_node("1,2(x2)") == [1, 2, 2]
    with pytest.raises(HvdftError, match="cannot read"):
        expand_tasks_per_node("2(3)")


@pytest.mark.parametrize(
    "env, expected",
    [
        (
            {"SLURM_JOB_NODELIST": "node[01-03],gpu5", "SLURM_TASKS_PER_NODE": "2(x3),1"},
            [("node01", 2), ("node02", 2), ("node03", 2), ("gpu5", 1)],
        ),
        (
            {"SLURM_JOB_NODELIST": "gpu[1-2]", "SLURM_NTASKS_PER_NODE": "8"},
            [("gpu1", 8), ("gpu2", 8)],
        ),
        ({"SLURM_NODELIST": "c[7,9]", "SLURM_NTASKS": "4"}, [("c7", 2), ("c9", 2)]),
        ({"SLURM_JOB_NODELIST": "solo"}, [("solo", 1)]),
    ],
)
def test_slurm_hosts(env: dict[str, str], expected: list[tuple[str, int]]) -> None:
    assert slurm_hosts(env) == expected


def test_slurm_hosts_errors() -> None:
    with pytest.raises(HvdftError, match="3 nodes .* describes 2"):
        slurm_hosts({"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_TASKS_PER_NODE": "2,1"})
    with pytest.raises(HvdftError, match="does not divide"):
        slurm_hosts({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NTASKS": "3"})
    with pytest.raises(HvdftError, match="not inside a Slurm allocation"):
        slurm_hosts({})


def test_inside_slurm_uses_mpirun_and_the_allocation() -> None:
    env = {
        "SLURM_JOB_NODELIST": "node[01-02,07]",
        "SLURM_TASKS_PER_NODE": "4(x2),2",
        "SLURM_NTASKS": "10",
    }
    argv = dry_run("--", "train", "ner", "--resume", env=env)
    assert argv[:3] == ["mpirun", "-np", "10"]
    assert flag_values(argv, "-H") == ["node01:4,node02:4,node07:2"]
    assert argv[-3:] == ["train", "ner", "--resume"]
    # --gloo inside Slurm: horovodrun over the same hosts.
    gloo = dry_run("--gloo", "--", "doctor", env=env)
    assert gloo[1:4] == ["-np", "10", "--gloo"]
    assert flag_values(gloo, "-H") == ["node01:4,node02:4,node07:2"]
    # An explicit host list wins over the allocation.
    assert flag_values(dry_run("-H", "x:1", "--", "doctor", env=env), "-H") == ["x:1"]


def test_refuses_to_run_once_per_srun_task() -> None:
    env = {"SLURM_JOB_NODELIST": "n1", "SLURM_STEP_NUM_TASKS": "4"}
    with pytest.raises(HvdftError, match="srun --mpi=pmix"):
        dry_run("--", "doctor", env=env)


# ------------------------------------------------------------------ running


def _wrapper(child: str) -> list[str]:
    """A process that runs `child` through run_forwarding_signals, as `hvdft launch` does."""
    code = (
        "import os, sys\n"
        "from hvdft.launch import run_forwarding_signals\n"
        f"sys.exit(run_forwarding_signals([sys.executable, '-c', {child!r}], dict(os.environ)))\n"
    )
    return [sys.executable, "-c", code]


def test_signals_reach_the_launcher() -> None:
    child = (
        "import signal, sys, time\n"
        "def stop(signum, frame):\n"
        "    print('child got', signum, flush=True); sys.exit(42)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(_wrapper(child), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        # The child runs in a session of its own: only forwarding can deliver this.
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert f"child got {int(signal.SIGTERM)}" in out
    assert proc.returncode == 42


def test_killed_launcher_status_is_128_plus_signal() -> None:
    child = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    assert subprocess.run(_wrapper(child), timeout=30).returncode == 128 + signal.SIGKILL




def test_repository_hostfiles() -> None:
    folder = ROOT / "hostfiles"
    assert parse_hostfile(folder / "localhost.horovod") == [("localhost", 2)]
    assert parse_hostfile(folder / "localhost.mpi") == [("localhost", 2)]
    assert parse_hostfile(folder / "two-nodes.horovod") == parse_hostfile(folder / "two-nodes.mpi")
    # Each file is in the syntax its launcher reads as it is, so it passes through.
    for name, extra, flag in [("two-nodes.horovod", [], "--hostfile"), ("two-nodes.mpi", ["--mpi"], "-hostfile")]:
        argv = dry_run(*extra, "--hostfile", str(folder / name), "--", "doctor")
        assert flag_values(argv, flag) == [str(folder / name)]
        assert flag_values(argv, "-np") == ["8"]


# Each launcher reads the repository's hostfile for it as it is (horovodrun's own reader
# fails on comments, so localhost.horovod has none).
REAL_RUNS = {"--gloo": "localhost.horovod", "--mpi": "localhost.mpi"}


@pytest.mark.slow
@pytest.mark.parametrize("controller", list(REAL_RUNS))
def test_doctor_on_two_ranks(controller: str, tmp_path: Path) -> None:
    # No skip: Horovod and `hvdft doctor` are part of every install; without them this fails.
    hostfile = ROOT / "hostfiles" / REAL_RUNS[controller]
    result = run_job([*HVDFT, "launch", controller, "--hostfile", str(hostfile), "--", "doctor"], timeout=300,
                     cwd=tmp_path)
    out = result.output
    assert result.returncode == 0, out
    assert out.startswith(PREFIX) and str(hostfile) in out.splitlines()[0]
    for rank in (0, 1):
        assert f"rank {rank}/2" in out, out
    assert "allreduce" in out and "OK" in out, out


# ------------------------------------------------------------------ the environment the ranks get


def test_test_hooks_are_not_forwarded_unless_named() -> None:
    env = {"PATH": "/bin", "HVDFT_CACHE": "/c", "HVDFT_FAULT": "rank=1,step=1,kind=kill", "HVDFT_DEBUG_DIR": "/d"}
    # mpirun: -x lists the real settings, never a hook...
    argv = build_command(["hvdft", "doctor"], launcher="mpirun", controller="mpi", env=env)
    assert set(flag_values(argv, "-x")) == {"PATH", "HVDFT_CACHE"}
    # ...and the launcher's own environment (which horovodrun hands to every rank, and
    # mpirun to the ranks on its machine) loses them too.
    child, stripped = launch_mod.child_environment(env, [])
    assert stripped == ["HVDFT_DEBUG_DIR", "HVDFT_FAULT"]
    assert "HVDFT_FAULT" not in child and "HVDFT_DEBUG_DIR" not in child and child["HVDFT_CACHE"] == "/c"
    # Named with --env (from the shell, or with a value) they go through.
    child, stripped = launch_mod.child_environment(env, ["HVDFT_FAULT", "HVDFT_DEBUG_DIR=/e"])
    assert stripped == [] and child["HVDFT_FAULT"] == env["HVDFT_FAULT"] and child["HVDFT_DEBUG_DIR"] == "/e"
    argv = build_command(["hvdft"], launcher="mpirun", controller="mpi", env=env, extra_env=["HVDFT_FAULT"])
    assert "HVDFT_FAULT" in flag_values(argv, "-x")


def test_a_stray_hook_is_announced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HVDFT_FAULT", "rank=0,step=1,kind=kill")
    result = CliRunner().invoke(launch, ["--dry-run", "--mpi", "--", "doctor"], catch_exceptions=False)
    assert "not forwarding HVDFT_FAULT" in result.output
    assert "HVDFT_FAULT" not in next(line for line in result.output.splitlines() if line.startswith(PREFIX + " mpirun"))


# ------------------------------------------------------------------ checks before any rank starts


def run_launch(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """`hvdft launch ARGS` in this process (a check that fails starts nothing)."""
    result = CliRunner().invoke(launch, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.output


def one_error(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("hvdft: error: ")]
    assert len(errors) == 1 and "Traceback" not in output, output
    return errors[0]


@pytest.mark.parametrize("controller", ["--gloo", "--mpi"])
@pytest.mark.parametrize("nic", ["nosuch0", "eth99", "ib0:1", "lo0"])
def test_unknown_network_interface(controller: str, nic: str) -> None:
    if nic in hostlib.interfaces():
        pytest.skip(f"this machine has an interface named {nic}")
    code, out = run_launch(controller, "-np", "2", "--network-interface", nic, "--", "doctor")
    assert code == 2
    line = one_error(out)
    assert f"--network-interface {nic}: no such interface" in line
    for name in hostlib.interfaces():  # the ones that do exist are listed
        assert name in line
    assert PREFIX not in out  # nothing was started


def test_horovodrun_on_one_machine_needs_the_loopback_interface() -> None:
    others = [name for name, addrs in hostlib.interfaces().items() if "127.0.0.1" not in addrs]
    if not others:
        pytest.skip("this machine has no interface besides loopback")
    code, out = run_launch("-np", "2", "--network-interface", others[0], "--", "doctor")
    assert code == 2
    assert f"--network-interface {others[0]}: every rank runs on this machine" in one_error(out)
    # What horovodrun does accept passes the check (the plan is not run here).
    loopback = next(name for name, addrs in hostlib.interfaces().items() if "127.0.0.1" in addrs)
    for args in (["--network-interface", loopback], ["--mpi", "--network-interface", others[0]]):
        req = launch_mod.LaunchRequest(args=["doctor"], np=2, controller="mpi" if "--mpi" in args else None,
                                       network_interface=args[-1])
        launch_mod.check_plan(launch_mod.plan(req, os.environ)[0], req)


@pytest.mark.parametrize("np_value", ["0", "-1", "-7"])
@pytest.mark.parametrize("controller", ["--gloo", "--mpi"])
def test_np_below_one(np_value: str, controller: str) -> None:
    code, out = run_launch(controller, "-np", np_value, "--", "doctor")
    assert code == 2
    assert f"-np must be at least 1, got {np_value}" in one_error(out)


def test_hosts_that_do_not_resolve(tmp_path: Path) -> None:
    code, out = run_launch("-H", "localhost:1,nosuchhost.invalid:1", "--", "doctor")
    assert code == 2
    assert "-H entry 2 'nosuchhost.invalid:1': host 'nosuchhost.invalid' does not resolve" in one_error(out)
    hostfile = write(tmp_path, "hosts", "# lab\nlocalhost slots=1\nnode-7.invalid slots=1\n")
    for extra in ([], ["--mpi"]):
        code, out = run_launch(*extra, "--hostfile", str(hostfile), "--", "doctor")
        assert code == 2
        assert one_error(out).startswith(f"hvdft: error: {hostfile}:3: host 'node-7.invalid' does not resolve")


def test_missing_executables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out = run_launch("-np", "2", "--exec", "--", "no-such-program-x", "--flag")
    assert code == 2 and "--exec: 'no-such-program-x' is not on PATH" in one_error(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out = run_launch("--mpi", "-np", "2", "--", "doctor", env={"PATH": str(empty)})
    assert code == 2 and "mpirun is not installed: 'mpirun' is not on PATH" in one_error(out)
    monkeypatch.setattr(launch_mod, "venv_tool", lambda name: name)  # as if the venv had no horovodrun
    code, out = run_launch("-np", "2", "--", "doctor", env={"PATH": str(empty)})
    assert code == 2 and "horovodrun is not installed: 'horovodrun' is not on PATH" in one_error(out)


# ------------------------------------------------------------------ reading the launchers' output

OUTPUTS = Path(__file__).resolve().parent / "launcher_output"
# Recorded with tests/scripts/launch_probe.py --progress --fail KIND on 2 ranks (horovodrun
# --gloo, and mpirun --tag-output with hvdft launch's flags), stdout and stderr apart.
EXPECTED = {
    "kill": (1, "killed", 1, "rank 1 on node1 was killed by signal 9 (SIGKILL)"),
    "crash": (1, "crash", 1, "rank 1 on node1 exited with status 1: RuntimeError: probe: a bug"),
    "exit3": (1, "crash", 1, "rank 1 on node1 exited with status 3"),
    "agreed": (2, "input", None, "probe.txt:3: a line every rank rejects (found on rank 1)"),
    "input": (2, "input", 1, "[rank 1] probe.txt:7: a line only this rank reads"),
}
# The launchers' own epilogue (a crashed rank's own traceback, labelled [rank N], stays).
EPILOGUES = ["horovod/runner/", "RuntimeError: Horovod detected", "-" * 30, "Primary job", "Process 1 exit",
             "mpirun detected", "mpirun noticed", "Terminating remaining workers"]


def no_epilogue(output: str) -> None:
    for text in EPILOGUES:
        assert text not in output, f"{text!r} in:\n{output}"
    for line in output.splitlines():
        assert "Traceback" not in line or "[rank " in line, line


REPORT = re.compile(
    r"^(?:Process \d+ exit with status code -?\d+|Terminating remaining workers after failure of Process \d+)\.\n",
    re.M,
)


def glued(text: str) -> str:
    """horovodrun's exit reports as its threads sometimes write them: `print` writes the
    text and its newline apart, so reports share a line and the newlines follow."""
    reports = REPORT.findall(text)
    if not reports:
        return text
    start = text.index(reports[0])
    return text[:start] + "".join(r[:-1] for r in reports) + "\n" * len(reports) + REPORT.sub("", text[start:])


SHAPES = {"as recorded": lambda text: text, "glued reports": glued,
          "no reports": lambda text: REPORT.sub("", text)}  # only the exception names the first


def replay(launcher: str, kind: str, chunk: int,
           shape: Callable[[str], str] = SHAPES["as recorded"]) -> tuple[str, str, outcome_mod.Outcome]:
    out, err = io.StringIO(), io.StringIO()
    watch = outcome_mod.Watch(launcher, out, err)
    for stream in ("stdout", "stderr"):
        text = (OUTPUTS / f"{launcher}_{kind}.{stream}").read_bytes().decode()  # keep the \\r of progress frames
        text = shape(text) if stream == "stdout" else text
        for i in range(0, len(text), chunk):
            watch.feed(stream, text[i : i + chunk])
    watch.close()
    code = int((OUTPUTS / f"{launcher}_{kind}.status").read_text())
    return out.getvalue(), err.getvalue(), outcome_mod.conclude(watch, code, False, launcher, ["node0", "node1"])


@pytest.mark.parametrize("chunk", [1, 7, 65536])  # reads may split tags, lines and characters
@pytest.mark.parametrize("kind", list(EXPECTED))
@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_outcome_from_recorded_output(launcher: str, kind: str, chunk: int) -> None:
    out, err, found = replay(launcher, kind, chunk)
    code, what, rank, reason = EXPECTED[kind]
    assert (found.code, found.kind, found.reason) == (code, what, reason)
    if rank is not None:
        assert found.rank == rank
    assert found.summary == ([f"hvdft: error: {reason}"] if code == 2 else [f"hvdft: error: {reason}"])
    shown = out + err
    for text in EPILOGUES:
        assert text not in shown, text
    assert "hvdft: error:" not in shown  # held back for the summary
    # The ranks' own lines go on as plain mpirun / horovodrun show them.
    first = "[0]<stdout>:rank 0 step 1\n" if launcher == "horovodrun" else "\nrank 0 step 1\n"
    assert first in "\n" + out
    assert "<stdout>:" not in out if launcher == "mpirun" else True
    assert "\r" in err and "2/3" in err  # rank 0's progress frames, carriage returns and all
    if kind in ("kill", "crash", "exit3"):
        assert found.details[0].startswith("rank 1 on node1 ")
        assert "  rank 1 about to fail: " + kind in found.details


@pytest.mark.parametrize("chunk", [1, 65536])
@pytest.mark.parametrize("kind", list(EXPECTED))
@pytest.mark.parametrize("shape", ["glued reports", "no reports"])
def test_outcome_when_horovodrun_garbles_its_exit_reports(shape: str, kind: str, chunk: int) -> None:
    """The same verdict, and the same lines shown, however horovodrun's report threads
    interleave (seen in CI: 'Process 0 exit with status code 2.Process 1 exit with ...')."""
    out, err, found = replay("horovodrun", kind, chunk, SHAPES[shape])
    code, what, rank, reason = EXPECTED[kind]
    assert (found.code, found.kind, found.reason) == (code, what, reason)
    if rank is not None:
        assert found.rank == rank
    plain_out, plain_err, _ = replay("horovodrun", kind, chunk)
    assert (out, err) == (plain_out, plain_err)
    assert "exit with status code" not in out + err


def test_describe_status() -> None:
    assert outcome_mod.describe_status(1) == "exited with status 1"
    assert outcome_mod.describe_status(137) == "was killed by signal 9 (SIGKILL)"
    assert outcome_mod.describe_status(143) == "was killed by signal 15 (SIGTERM)"
    assert outcome_mod.describe_status(137, (9, "Killed")) == "was killed by signal 9 (SIGKILL)"


def test_launcher_that_fails_alone() -> None:
    """No rank reported anything: the launcher's own exception, in one line, no traceback."""
    watch = outcome_mod.Watch("horovodrun", io.StringIO(), io.StringIO())
    watch.feed("stderr", 'Traceback (most recent call last):\n  File "x", line 1\n')
    watch.feed("stderr", "ValueError: No interface is found.\n")
    watch.close()
    found = outcome_mod.conclude(watch, 1, False, "horovodrun", [])
    assert found.kind == "launcher" and found.retryable
    assert found.summary == ["hvdft: error: horovodrun exited with status 1 without naming a failed rank: "
                             "ValueError: No interface is found."]


# ------------------------------------------------------------------ restarts: what runs next


@pytest.mark.parametrize(
    "args, seen, expected",
    [
        (["train", "ner", "--epochs", "2"], True, ["train", "ner", "--epochs", "2", "--resume", "auto"]),
        (["train", "ner", "--overwrite-output-dir", "--lr", "1"], False,
         ["train", "ner", "--lr", "1", "--resume", "auto"]),
        (["train", "ner", "--resume", "--lr", "1"], True, ["train", "ner", "--lr", "1", "--resume", "auto"]),
        (["train", "ner", "--resume"], True, ["train", "ner", "--resume", "auto"]),
        (["train", "ner", "--resume=latest"], True, ["train", "ner", "--resume", "auto"]),
        # The user's checkpoint stays until this job has written one of its own.
        (["train", "ner", "--resume", "old/ck-5"], False, ["train", "ner", "--resume", "old/ck-5"]),
        (["train", "ner", "--resume", "old/ck-5"], True, ["train", "ner", "--resume", "auto"]),
        (["doctor"], True, ["doctor"]),
    ],
)
def test_restart_args(args: list[str], seen: bool, expected: list[str]) -> None:
    assert launch_mod.restart_args(args, exec_=False, checkpoint_seen=seen) == expected
    assert launch_mod.restart_args(args, exec_=True, checkpoint_seen=seen) == args


def test_job_output_dir(tmp_path: Path) -> None:
    def found(*args: str, **kw: object) -> Path | None:
        return launch_mod.job_output_dir(launch_mod.LaunchRequest(args=list(args), **kw))  # type: ignore[arg-type]

    assert found("train", "ner", "--output-dir", "runs/a") == Path("runs/a")
    assert found("train", "ner", "--output-dir=runs/b") == Path("runs/b")
    config = write(tmp_path, "c.yaml", "output-dir: runs/from-config\nepochs: 1\n")
    assert found("train", "ner", "--config", str(config)) == Path("runs/from-config")
    assert found("train", "ner", "--config", str(config), "--output-dir", "x") == Path("x")  # as the CLI
    from hvdft.config import TrainConfig

    assert found("train", "ner") == Path(TrainConfig.output_dir)
    assert found("doctor") is None
    assert found("python", "x.py", exec_=True) is None
    assert found("python", "x.py", exec_=True, output_dir="o") == Path("o")
    with pytest.raises(HvdftError, match="differs"):
        found("train", "ner", "--output-dir", "a", output_dir="b")
    code, out = run_launch("--max-restarts", "1", "--exec", "--", "python", "x.py")
    assert code == 2 and "--max-restarts records each restart" in one_error(out)


def test_latest_checkpoint(tmp_path: Path) -> None:
    assert launch_mod.latest_checkpoint(tmp_path) is None
    for step, complete in ((4, True), (8, True), (12, False)):
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        if complete:
            (folder / "trainer_state.pt").write_bytes(b"")
    (tmp_path / "checkpoints" / "best").mkdir()
    assert launch_mod.latest_checkpoint(tmp_path) == (tmp_path / "checkpoints" / "checkpoint-8", 8)


def test_hosts_that_stop_answering_are_dropped(tmp_path: Path) -> None:
    """The probe runs `ssh HOST true` (a stand-in ssh here, first on PATH: one host is
    down); this machine itself is never probed."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "ssh").write_text('#!/bin/sh\n'
                              'case "$5" in down*) echo "ssh: connect to host $5 port 22: No route to host" >&2;'
                              ' exit 255;; esac\nexit 0\n')
    (shim / "ssh").chmod(0o755)
    env = {"PATH": f"{shim}:{os.environ['PATH']}"}
    answers = hostlib.probe(["localhost", "down1", "up1"], env)
    assert answers == {"localhost": None, "down1": "ssh: ssh: connect to host down1 port 22: No route to host",
                       "up1": None}
    listed = hostlib.HostList([("localhost", 2), ("down1", 2), ("up1", 1)], {}, strict=True)
    p = launch_mod.Plan("horovodrun", "gloo", 5, listed, "hosts", [], ["doctor"], env, {}, [], None, [])
    req = launch_mod.LaunchRequest(min_np=3)
    shrunk, dropped = launch_mod._shrink(p, req)
    assert list(dropped) == ["down1"]
    assert (shrunk.np, shrunk.hosts.hosts, shrunk.hostfile) == (3, [("localhost", 2), ("up1", 1)], None)
    with pytest.raises(HvdftError, match="down1 .* 3 rank\\(s\\) left, below --min-np 4"):
        launch_mod._shrink(p, launch_mod.LaunchRequest(min_np=4))


# ------------------------------------------------------------------ real 2-rank jobs through hvdft launch


PROBE = ROOT / "tests" / "scripts" / "launch_probe.py"
CONTROLLERS = ["--gloo", "--mpi"]
HOST = socket.gethostname()


def errors_of(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("hvdft: error:")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random BERT and 24 training / 8 test sentences: 6 steps an epoch on 2 ranks x 2."""
    folder = tmp_path_factory.mktemp("tiny")
    return {
        "model": make_tiny_model(folder / "model"),
        "train": write_conll(folder / "train.txt", sentences(24, 1)),
        "test": write_conll(folder / "test.txt", sentences(8, 2)),
    }


def train_args(tiny: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["train", "ner", "--model", str(tiny["model"]), "--train-file", str(tiny["train"]),
            "--test-file", str(tiny["test"]), "--output-dir", str(out), "--batch-size", "2",
            "--epochs", "2", "--log-every", "1", "--no-dropout", *extra]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(EXPECTED))
@pytest.mark.parametrize("controller", CONTROLLERS)
def test_how_a_real_job_ends(controller: str, kind: str, tmp_path: Path) -> None:
    """Crashed, killed and failing ranks, and input errors one rank or all found: one
    summary with the right exit status, the rank and its last lines, no launcher epilogue."""
    cmd = [*HVDFT, "launch", controller, "-np", "2", "--exec", "--",
           sys.executable, str(PROBE), "--fail", kind, "--progress"]  # fmt: skip
    result = Job(cmd, cwd=tmp_path).wait(300)
    code, what, rank, reason = EXPECTED[kind]
    reason = reason.replace("node1", HOST)
    assert result.returncode == code, result.describe()
    no_epilogue(result.output)
    assert errors_of(result.output) == [f"hvdft: error: {reason}"], result.describe()
    assert result.stderr.rstrip().splitlines()[-1] == f"hvdft: error: {reason}"
    assert "rank 0 step 1" in result.stdout  # the ranks' output streamed through
    if what in ("crash", "killed"):
        assert f"{PREFIX} rank 1 on {HOST} " in result.stderr
        assert f"{PREFIX}   rank 1 about to fail: {kind}" in result.stderr  # its last lines
    print(f"{controller} {kind}: exit {result.returncode} after {result.seconds:.0f} s")


@pytest.mark.slow
@pytest.mark.parametrize("controller", CONTROLLERS)
def test_a_bad_training_file_is_one_line_and_never_retried(controller: str, tmp_path: Path,
                                                           tiny: dict[str, Path]) -> None:
    """The issue's case: an input error every rank agrees on, under a real launcher."""
    bad = tmp_path / "notag.txt"
    bad.write_text("Alice\tB-PER\nwent\tO\nnotag\n\nBob\tB-PER\n\n")
    cmd = [*HVDFT, "launch", controller, "-np", "2", "--max-restarts", "2", "--",
           *train_args(tiny, tmp_path / "out")]  # fmt: skip
    cmd[cmd.index(str(tiny["train"]))] = str(bad)
    result = Job(cmd, cwd=tmp_path).wait(300)
    assert result.returncode == 2, result.describe()
    no_epilogue(result.output)
    assert errors_of(result.output) == [
        f"hvdft: error: {bad}:3: expected 'word ... tag' (2 or more columns), found 1 column: 'notag' (found on rank 0)"
    ], result.describe()
    assert f"{PREFIX} restart" not in result.output
    print(f"{controller}: exit 2 after {result.seconds:.0f} s")
    assert result.seconds < 60, result.describe()  # the bound, startup of 2 ranks included


@pytest.mark.slow
@pytest.mark.parametrize("controller", CONTROLLERS)
def test_errors_every_rank_prints_are_shown_once(controller: str, tmp_path: Path, tiny: dict[str, Path]) -> None:
    """Options are checked before Horovod starts: each rank prints the same line."""
    cmd = [*HVDFT, "launch", controller, "-np", "2", "--", *train_args(tiny, tmp_path / "out", "--batch-size", "0")]
    result = Job(cmd, cwd=tmp_path).wait(300)
    assert result.returncode == 2, result.describe()
    no_epilogue(result.output)
    assert errors_of(result.output) == ["hvdft: error: --batch-size must be at least 1, got 0"]


@pytest.mark.slow
@pytest.mark.parametrize("controller", CONTROLLERS)
def test_stray_test_hooks_do_not_reach_the_ranks(controller: str, tmp_path: Path) -> None:
    env = job_env(HVDFT_FAULT="rank=1,step=2,kind=kill", HVDFT_DEBUG_DIR=str(tmp_path / "trace"),
                  HVDFT_CACHE=str(tmp_path / "cache"))
    cmd = [*HVDFT, "launch", controller, "-np", "2", "--exec", "--", sys.executable, str(PROBE)]
    result = Job(cmd, env=env, cwd=tmp_path).wait(300)
    assert result.returncode == 0, result.describe()
    for rank in (0, 1):
        assert f"rank {rank} start HVDFT_FAULT=- HVDFT_DEBUG_DIR=- HVDFT_CACHE={tmp_path / 'cache'}" in result.stdout
    assert f"{PREFIX} not forwarding HVDFT_FAULT" in result.stderr
    assert f"{PREFIX} not forwarding HVDFT_DEBUG_DIR" in result.stderr
    at = cmd.index("--exec")
    named = Job([*cmd[:at], "--env", "HVDFT_FAULT", *cmd[at:]], env=env, cwd=tmp_path).wait(300)
    assert named.returncode == 0, named.describe()
    assert "rank 1 start HVDFT_FAULT=rank=1,step=2,kind=kill HVDFT_DEBUG_DIR=-" in named.stdout


def _wait_for_step(job: Job, metrics: Path, step: int, limit: float = 400) -> None:
    deadline = time.monotonic() + limit
    while not (metrics.exists() and f'"step": {step},' in metrics.read_text()):
        if job.proc.poll() is not None:
            raise AssertionError(f"the job ended before step {step}:\n{job.wait(10).describe()}")
        if time.monotonic() > deadline:
            job.kill_all()
            raise AssertionError(f"no step {step} in {limit} s")
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("controller", CONTROLLERS)
def test_interrupt_checkpoints_and_is_not_restarted(controller: str, tmp_path: Path, tiny: dict[str, Path]) -> None:
    """Ctrl-C on hvdft launch: the ranks here get it directly, agree to stop, rank 0 writes
    a checkpoint (no launcher deadline), exit 130, and --max-restarts does not restart."""
    out = tmp_path / "out"
    cmd = [*HVDFT, "launch", controller, "-np", "2", "--max-restarts", "1",
           "--env", "HVDFT_FAULT=rank=0,step=3,kind=wait", "--", *train_args(tiny, out, "--save-every", "100")]
    job = Job(cmd, cwd=tmp_path)
    _wait_for_step(job, out / "metrics.jsonl", 2)  # rank 0 now waits at the start of step 3
    job.signal(signal.SIGINT)
    result = job.wait(240)
    assert result.returncode == 130, result.describe()
    no_epilogue(result.output)
    said = [line for line in result.output.splitlines() if "interrupted by a signal" in line]
    assert said == ["hvdft: interrupted by a signal at step 2; checkpoint written, continue with --resume"], said
    assert f"{PREFIX} SIGINT: asked the ranks on this machine to stop" in result.stderr
    assert (out / "checkpoints" / "checkpoint-2" / "trainer_state.pt").exists()
    assert f"{PREFIX} restart" not in result.output


@pytest.mark.slow
def test_restart_after_a_killed_rank_equals_resuming_by_hand(tmp_path: Path, tiny: dict[str, Path]) -> None:
    """Rank 1 is SIGKILLed at step 6 (mid-epoch 1; checkpoints every 4 steps). hvdft launch
    restarts the job once from checkpoint-4 and it finishes; a job resumed by hand from that
    same checkpoint ends with the same weights, metrics and test results."""
    auto, by_hand = tmp_path / "auto", tmp_path / "by_hand"
    extra = ("--save-every", "4", "--save-total-limit", "0")
    fault = f"HVDFT_FAULT=rank=1,step=6,kind=kill,once={tmp_path / 'fired'}"  # fires in the first attempt only
    cmd = [*HVDFT, "launch", "-np", "2", "--max-restarts", "1", "--restart-backoff", "1", "--env", fault,
           "--", *train_args(tiny, auto, *extra)]  # fmt: skip
    result = Job(cmd, cwd=tmp_path).wait(600)
    done = time.time()
    assert result.returncode == 0, result.describe()
    killed = (tmp_path / "fired").stat().st_mtime  # the hook touches it just before the SIGKILL
    print(f"restart: job done {done - killed:.0f} s after the kill ({result.seconds:.0f} s in all)")
    restarts = [line for line in result.stderr.splitlines() if line.startswith(f"{PREFIX} restart ")]
    assert restarts == [
        f"{PREFIX} restart 1/1 in 1 s: rank 1 on {HOST} was killed by signal 9 (SIGKILL); 2 rank(s), "
        f"resuming from step 4 ({auto / 'checkpoints' / 'checkpoint-4'})"
    ], result.describe()
    assert f"{PREFIX} finished after 1 restart(s)" in result.stderr
    assert result.stdout.count("--resume auto") == 1  # the second attempt's command line
    records = [json.loads(line) for line in (auto / "restarts.jsonl").read_text().splitlines()]
    assert [(r["event"], r["attempt"], r["kind"], r["rank"], r["ranks"], r["resume_step"]) for r in records] == [
        ("restart", 1, "killed", 1, 2, 4)
    ]

    resume = [*HVDFT, "launch", "-np", "2", "--",
              *train_args(tiny, by_hand, *extra, "--resume", str(auto / "checkpoints" / "checkpoint-4"))]
    assert Job(resume, cwd=tmp_path).wait(600).returncode == 0
    diff, where = max_abs_diff(load_tensors(auto), load_tensors(by_hand))
    assert diff == 0.0, where
    results = [json.loads((d / "all_results.json").read_text()) for d in (auto, by_hand)]
    for key in ("train_steps", "test_f1", "test_loss", "test_accuracy"):
        assert results[0][key] == results[1][key], key
    logged = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (auto, by_hand)]
    after = [{k: r[k] for k in ("step", "loss", "lr")} for r in logged[0] if r["step"] > 4]
    assert after == [{k: r[k] for k in ("step", "loss", "lr")} for r in logged[1]]
    assert [r["step"] for r in logged[0]] == list(range(1, 13))  # attempt 1's steps 5 and 6 were cut back


@pytest.mark.slow
@pytest.mark.parametrize("controller", CONTROLLERS)
def test_a_job_that_keeps_failing_stops_after_k_restarts(controller: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [*HVDFT, "launch", controller, "-np", "2", "--max-restarts", "2", "--restart-backoff", "0.5",
           "--output-dir", str(out), "--exec", "--", sys.executable, str(PROBE), "--fail", "kill"]  # fmt: skip
    result = Job(cmd, cwd=tmp_path).wait(600)
    reason = f"rank 1 on {HOST} was killed by signal 9 (SIGKILL)"
    assert result.returncode == 1, result.describe()
    no_epilogue(result.output)
    restarts = [line for line in result.stderr.splitlines() if line.startswith(f"{PREFIX} restart ")]
    assert restarts == [
        f"{PREFIX} restart 1/2 in 0.5 s: {reason}; 2 rank(s), resuming from the start (not an hvdft train job)",
        f"{PREFIX} restart 2/2 in 1 s: {reason}; 2 rank(s), resuming from the start (not an hvdft train job)",
    ], result.describe()
    assert result.stdout.count(f"{PREFIX} ") == 3  # three attempts, three command lines
    assert f"{PREFIX} giving up after 2 restart(s)" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == f"hvdft: error: {reason}"
    events = [json.loads(line)["event"] for line in (out / "restarts.jsonl").read_text().splitlines()]
    assert events == ["restart", "restart", "gave_up"]
