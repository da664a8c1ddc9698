"""`hvdft launch`: the commands it builds (dry runs), its host parsers, and real runs."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from hvdft import launch as launch_mod
from hvdft.errors import HvdftError
from hvdft.launch import (
    PREFIX,
    build_command,
    expand_hostlist,
    expand_tasks_per_node,
    hvdft_program,
    launch,
    parse_hostfile,
    parse_hosts,
    slurm_hosts,
)

BIN = Path(sys.executable).parent
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
    assert int(mca(argv)["odls_base_sigkill_timeout"]) >= 30  # room for a checkpoint
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


def _doctor_exists() -> bool:
    probe = subprocess.run([*HVDFT, "doctor", "--help"], capture_output=True, timeout=60)
    return probe.returncode == 0


REPO = Path(__file__).resolve().parent.parent


def test_repository_hostfiles() -> None:
    folder = REPO / "hostfiles"
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
    if not (BIN / "horovodrun").exists():
        pytest.skip("Horovod is not installed in this venv (run ./install.sh)")
    if not _doctor_exists():
        pytest.skip("`hvdft doctor` does not exist yet")
    hostfile = REPO / "hostfiles" / REAL_RUNS[controller]
    result = subprocess.run(
        [*HVDFT, "launch", controller, "--hostfile", str(hostfile), "--", "doctor"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert out.startswith(PREFIX) and str(hostfile) in out.splitlines()[0]
    for rank in (0, 1):
        assert f"rank {rank}/2" in out, out
    assert "allreduce" in out and "OK" in out, out
