"""Two real hosts on one machine: `hvdft launch` across two network namespaces.

Each "host" is a network namespace with its own address on one veth pair
(10.77.0.1 <-> 10.77.0.2, addresses that exist only inside these namespaces, so no
traffic can leave them), its own hostname (a UTS namespace) and an /etc/hosts that
names both. The launcher runs inside the first namespace and reaches the second the
way it reaches any remote host, through a remote shell: an `ssh` shim first in PATH
for horovodrun, and the same script as OpenMPI's `plm_rsh_agent` for mpirun. The shim
runs the command inside the target namespace instead of connecting anywhere.

Needs root, iproute2 and unshare; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support import BIN, job_env, make_tiny_model, sentences, write_conll

pytestmark = pytest.mark.slow

HVDFT = [str(BIN / "hvdft")] if (BIN / "hvdft").exists() else [sys.executable, "-m", "hvdft"]
IFACE = "hv0"  # the same name in both namespaces: Gloo and MPI are given one interface
HOSTS = {"hvdft-h1": "10.77.0.1", "hvdft-h2": "10.77.0.2"}

ENTER = """\
#!/bin/sh
# enter NS HOSTNAME CMD...: run CMD as if on that host: its network namespace, its own
# hostname and an /etc/hosts naming both hosts (private mount and UTS namespaces, so
# nothing outside changes).
ns=$1; name=$2; shift 2
exec ip netns exec "$ns" unshare --uts --mount sh -c \\
  'hostname "$1" && mount --bind "{hosts}" /etc/hosts && shift && exec "$@"' enter "$name" "$@"
"""

# horovodrun runs `ssh -o .. -o .. HOST [-p P] [-i F] [-o ..] COMMAND`; OpenMPI runs
# `AGENT [-x] HOST COMMAND...`. Options before and after the host are skipped.
SSH_SHIM = """\
#!/bin/sh
while [ $# -gt 0 ]; do case "$1" in -o|-p|-i|-l|-F) shift 2;; -*) shift;; *) break;; esac; done
host=$1; shift
while [ $# -gt 0 ]; do case "$1" in -o|-p|-i|-l|-F) shift 2;; -*) shift;; *) break;; esac; done
case "$host" in
{cases}
  *) echo "ssh shim: no namespace for host '$host'" >&2; exit 255;;
esac
# Like ssh, reaching another host needs the link: down, it fails the way ssh does.
if [ "$name" != "$(hostname)" ] && [ "$(cat /sys/class/net/{iface}/carrier 2>/dev/null)" != 1 ]; then
  echo "ssh: connect to host $host port 22: No route to host" >&2; exit 255
fi
exec "{enter}" "$ns" "$name" sh -c "$*"
"""


@dataclass
class TwoHosts:
    namespaces: dict[str, str]  # host name -> namespace
    enter: Path
    shim_dir: Path
    hostfile: Path
    workdir: Path
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        env = job_env()  # the suite's one job policy (support.py), with the ssh shim first
        env["PATH"] = f"{self.shim_dir}:{env['PATH']}"
        env.pop("OMPI_MCA_plm_rsh_agent", None)
        env.update(extra)
        return env

    def on_first_host(self, argv: list[str]) -> list[str]:
        return [str(self.enter), self.namespaces["hvdft-h1"], "hvdft-h1", *argv]

    def launch_argv(self, controller: str, launcher_args: str, args: list[str], *options: str) -> list[str]:
        argv = [*HVDFT, "launch", controller, "--hostfile", str(self.hostfile), *options]
        argv += ["--network-interface", IFACE]
        if controller == "--mpi":
            launcher_args = f"-mca plm_rsh_agent {self.shim_dir / 'ssh'} {launcher_args}"
        if launcher_args.strip():
            argv += ["--launcher-args", launcher_args]
        return self.on_first_host([*argv, "--", *args])

    def tx_bytes(self, host: str) -> int:
        out = _ip("-j", "-s", "-n", self.namespaces[host], "link", "show", IFACE)
        return int(json.loads(out.stdout)[0]["stats64"]["tx"]["bytes"])


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def _cleanup(namespaces: list[str]) -> None:
    """Kill what still runs in our namespaces (all of it started by this test), then
    delete them; the veth pair goes with them."""
    for _ in range(3):
        pids = []
        for ns in namespaces:
            found = _ip("netns", "pids", ns, check=False)
            pids += [int(p) for p in found.stdout.split() if p.isdigit()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    for ns in namespaces:
        _ip("netns", "del", ns, check=False)


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[TwoHosts]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    for tool in ("ip", "unshare", "hostname"):
        if shutil.which(tool) is None:
            pytest.skip(f"'{tool}' is not installed")

    tag = f"hvdft{os.getpid() % 100000}"
    namespaces = {"hvdft-h1": f"{tag}a", "hvdft-h2": f"{tag}b"}
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text("127.0.0.1 localhost\n" + "".join(f"{ip} {name}\n" for name, ip in HOSTS.items()))
    enter = tmp_path / "enter"
    enter.write_text(ENTER.format(hosts=hosts_file))
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir()
    cases = "\n".join(f"  {name}|{ip}) ns={namespaces[name]}; name={name};;" for name, ip in HOSTS.items())
    (shim_dir / "ssh").write_text(SSH_SHIM.format(cases=cases, enter=enter, iface=IFACE))
    for script in (enter, shim_dir / "ssh"):
        script.chmod(0o755)
    hostfile = tmp_path / "two-hosts"
    hostfile.write_text("".join(f"{name} slots=1\n" for name in HOSTS))
    workdir = tmp_path / "work"
    workdir.mkdir()

    created: list[str] = []
    hosts = TwoHosts(namespaces, enter, shim_dir, hostfile, workdir)
    try:
        for ns in namespaces.values():
            made = _ip("netns", "add", ns, check=False)
            if made.returncode != 0:
                pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
            created.append(ns)
        ns1, ns2 = namespaces["hvdft-h1"], namespaces["hvdft-h2"]
        # Both ends are created directly inside the namespaces: the pair never exists
        # in the machine's own namespace, and neither does a route to 10.77.0.0/24.
        steps = [
            ("link", "add", "name", IFACE, "netns", ns1, "type", "veth",
             "peer", "name", IFACE, "netns", ns2),
            ("-n", ns1, "addr", "add", f"{HOSTS['hvdft-h1']}/24", "dev", IFACE),
            ("-n", ns2, "addr", "add", f"{HOSTS['hvdft-h2']}/24", "dev", IFACE),
        ]  # fmt: skip
        for ns in (ns1, ns2):
            steps += [("-n", ns, "link", "set", "lo", "up"), ("-n", ns, "link", "set", IFACE, "up")]
        for step in steps:
            done = _ip(*step, check=False)
            if done.returncode != 0:
                pytest.skip(f"cannot build the veth pair (ip {' '.join(step)}): {done.stderr}")
        probe = subprocess.run(
            [str(enter), ns2, "hvdft-h2", "sh", "-c", "hostname; getent hosts hvdft-h1"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if probe.returncode != 0 or not probe.stdout.startswith("hvdft-h2"):
            pytest.skip(f"cannot enter the namespaces (unshare/mount): {probe.stderr.strip()}")
        yield hosts
    finally:
        for proc in hosts.procs:
            if proc.poll() is None:
                proc.kill()
        _cleanup(created)


def _run(hosts: TwoHosts, argv: list[str], timeout: float, **env: str) -> str:
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout,
            env=hosts.env(**env), cwd=hosts.workdir,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"no exit within {timeout}s:\n{exc.stdout}\n{exc.stderr}")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    return out


@pytest.mark.parametrize("controller", ["--gloo", "--mpi"])
def test_one_rank_per_host(two_hosts: TwoHosts, controller: str) -> None:
    before = two_hosts.tx_bytes("hvdft-h2")
    out = _run(two_hosts, two_hosts.launch_argv(controller, "", ["doctor"]), 300)
    assert "allreduce" in out and "OK" in out, out
    for rank, host in enumerate(HOSTS):
        assert f"rank {rank}/2" in out, out
        assert host in out, out  # each rank reports the host it ran on
    # hvdft-h2 has no interface but loopback and the veth: rank 1 talked over the veth.
    assert two_hosts.tx_bytes("hvdft-h2") - before > 1000


def _long_job(hosts: TwoHosts) -> tuple[list[str], Path]:
    """Words after `--` of a job that keeps allreducing, and the file rank 0 appends a
    line to per logged step."""
    out = hosts.workdir / "run"
    args = [
        "train", "ner", "--model", "minilm", "--dataset", "wnut17",
        "--output-dir", str(out), "--cache-dir", str(hosts.workdir / "cache"),
        "--batch-size", "4", "--max-length", "48", "--epochs", "1",
        "--log-every", "1", "--eval-every", "100000", "--save-every", "100000",
    ]  # fmt: skip
    return args, out / "metrics.jsonl"


# Gloo: every collective times out after HOROVOD_GLOO_TIMEOUT_SECONDS. MPI has no
# timeout of its own: mpirun's keepalives on its daemon links notice the lost host, and
# ranks stuck in MPI (or delaying for a checkpoint) are killed 5 s after SIGTERM.
LINK_DOWN = {
    "--gloo": ("", {"HOROVOD_GLOO_TIMEOUT_SECONDS": "20"}),
    "--mpi": (
        "-mca oob_tcp_keepalive_time 5 -mca oob_tcp_keepalive_intvl 2 "
        "-mca oob_tcp_keepalive_probes 3 -mca odls_base_sigkill_timeout 5",
        {},
    ),
}
EXIT_BOUND_S = 120  # observed: ~16 s (Gloo), ~22 s (MPI) on a loaded 2-core box


@pytest.mark.parametrize("controller", ["--gloo", "--mpi"])
def test_link_down_mid_job_exits_nonzero(two_hosts: TwoHosts, controller: str) -> None:
    args, progress = _long_job(two_hosts)
    launcher_args, env = LINK_DOWN[controller]
    log = two_hosts.workdir / "job.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            two_hosts.launch_argv(controller, launcher_args, args),
            stdout=sink, stderr=subprocess.STDOUT, text=True,
            env=two_hosts.env(**env), cwd=two_hosts.workdir,
        )  # fmt: skip
    two_hosts.procs.append(proc)

    def progressed() -> bool:
        return progress.exists() and len(progress.read_text().splitlines()) >= 2

    deadline = time.monotonic() + 400  # startup: torch, transformers, tokenizing, 2 cores
    while not progressed():
        if proc.poll() is not None:
            pytest.fail(f"the job ended before the link was cut:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"the job made no progress in 400 s:\n{log.read_text()}")
        time.sleep(1)

    cut = time.monotonic()
    _ip("-n", two_hosts.namespaces["hvdft-h2"], "link", "set", IFACE, "down")
    try:
        code = proc.wait(timeout=EXIT_BOUND_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {EXIT_BOUND_S} s after the link went down:\n{log.read_text()}")
    took = time.monotonic() - cut
    print(f"{controller}: exit status {code} {took:.0f} s after the link went down")
    assert code != 0, log.read_text()


def test_restart_drops_a_host_that_stopped_answering(two_hosts: TwoHosts, tmp_path: Path) -> None:
    """`hvdft launch --max-restarts 1` over two hosts; in epoch 2 the link to hvdft-h2
    goes down. Gloo times out, the job fails, the restart finds hvdft-h2 unreachable
    (ssh fails), drops it and resumes the end-of-epoch-1 checkpoint on the one rank left."""
    model = make_tiny_model(tmp_path / "model")
    train = write_conll(tmp_path / "train.txt", sentences(24, 1))
    out = two_hosts.workdir / "run"
    # Rank 1 (on hvdft-h2) parks at the start of step 8 (epoch 2) while rank 0 waits in
    # that step's allreduce: a fixed point at which to cut the link.
    fault = f"HVDFT_FAULT=rank=1,step=8,kind=wait,once={tmp_path / 'fired'}"
    args = ["train", "ner", "--model", str(model), "--train-file", str(train), "--output-dir", str(out),
            "--batch-size", "2", "--epochs", "2", "--log-every", "1", "--no-dropout"]  # fmt: skip
    options = ["--max-restarts", "1", "--restart-backoff", "1", "--min-np", "1", "--env", fault]
    log = two_hosts.workdir / "job.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            two_hosts.launch_argv("--gloo", "", args, *options), stdout=sink, stderr=subprocess.STDOUT,
            text=True, env=two_hosts.env(HOROVOD_GLOO_TIMEOUT_SECONDS="20"), cwd=two_hosts.workdir,
        )  # fmt: skip
    two_hosts.procs.append(proc)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 400
    while not (metrics.exists() and '"step": 7,' in metrics.read_text()):
        if proc.poll() is not None:
            pytest.fail(f"the job ended before step 7:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no step 7 in 400 s:\n{log.read_text()}")
        time.sleep(0.5)
    assert (out / "checkpoints" / "checkpoint-6").is_dir()  # end of epoch 1, written by 2 ranks
    cut = time.monotonic()
    _ip("-n", two_hosts.namespaces["hvdft-h2"], "link", "set", IFACE, "down")
    try:
        code = proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail(f"not done 600 s after the link went down:\n{log.read_text()}")
    text = log.read_text()
    print(f"finished {time.monotonic() - cut:.0f} s after the link went down")
    assert code == 0, text
    restarts = [line for line in text.splitlines() if line.startswith("[hvdft launch] restart ")]
    assert len(restarts) == 1, text
    assert "; 1 rank(s), resuming from step 6 (" in restarts[0], restarts
    assert "dropped hvdft-h2 (ssh: ssh: connect to host hvdft-h2 port 22: No route to host)" in restarts[0]
    assert "[hvdft launch] finished after 1 restart(s)" in text
    [record] = [json.loads(line) for line in (out / "restarts.jsonl").read_text().splitlines()]
    assert (record["ranks"], record["hosts"], list(record["dropped_hosts"])) == (1, "hvdft-h1:1", ["hvdft-h2"])
    results = json.loads((out / "all_results.json").read_text())
    assert results["world_size"] == 1
