"""`hvdft launch`: start N ranks of hvdft with horovodrun or mpirun, on one box or many,
and say in one summary how the job ended; optionally restart it when it fails.

The ranks find each other through whatever started them (Gloo rendezvous for
horovodrun, the MPI runtime for mpirun/srun), which is why `srun --mpi=pmix hvdft
train ...` works without this command at all: `dist.init()` sees OMPI_COMM_WORLD_RANK /
PMI_RANK / PMIX_RANK and uses MPI_COMM_WORLD.

The pieces: the click command builds one `LaunchRequest`; `plan` turns it and the
environment into a `Plan` (hosts from `hvdft.hosts`, the launcher's argv from
`build_command`, a pure function tested with dry runs); `check_plan` refuses what the
launcher would choke on before any rank starts; `run_plan` runs it with its output
read by `hvdft.outcome`; `supervise` restarts a failed job from its latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import click

from hvdft import hosts as hostlib
from hvdft.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, HvdftError
from hvdft.gloo_host import ADVICE as GLOO_ADVICE
from hvdft.gloo_host import gloo_crash_reason
from hvdft.hosts import HostList, Hosts, hosts_spec
from hvdft.outcome import Outcome, Watch, conclude, pump
from hvdft.testhooks import HOOK_VARIABLES

PREFIX = "[hvdft launch]"

# mpirun's odls_base_sigkill_timeout: when a job fails, Open MPI 4 sends the ranks left
# SIGCONT, sleeps this long, SIGTERM, sleeps again, SIGKILL (odls_base_default_fns.c),
# even when they have all exited: every failure costs twice this. The default 1 s
# leaves no room for a rank to exit on its own; the checkpoint on SIGTERM does not
# depend on it (hvdft launch signals the ranks itself, see _Forwarder).
MPI_TERM_GRACE_S = 10
# How long mpirun may go on after rank 0 announced an end every rank takes by itself.
MPI_VERDICT_WAIT_S = 3.0

# Variables whose absence on remote ranks breaks a run in confusing ways: the venv's
# PATH, the libraries torch/NCCL load, Horovod/NCCL tuning, offline HF settings, and
# hvdft's own settings (HVDFT_CACHE, ...).
_FORWARD_EXACT = {"PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "OMP_NUM_THREADS", "VIRTUAL_ENV"}
_FORWARD_PREFIXES = ("HOROVOD_", "NCCL_", "HF_", "TRANSFORMERS_", "HVDFT_")
# Test-only hooks the engine reads (fault injection, per-rank traces): a stray one in a
# user's shell would kill or slow a real job, so they reach the ranks only when named
# with --env.
TEST_HOOKS = HOOK_VARIABLES

RESTARTS_FILE = "restarts.jsonl"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_STATE_FILE = "trainer_state.pt"  # hvdft.checkpoint.STATE_FILE; not imported: it pulls in torch


@dataclass
class LaunchRequest:
    """What `hvdft launch` was asked to do, option by option (see the command's help)."""

    args: Sequence[str] = ()
    np: int | None = None
    hostfile: str | None = None
    hosts_text: str | None = None
    controller: str | None = None
    launcher: str = "auto"
    network_interface: str | None = None
    env_entries: Sequence[str] = ()
    launcher_args: Sequence[str] = ()
    exec_: bool = False
    dry_run: bool = False
    max_restarts: int = 0
    min_np: int = 1
    restart_backoff: float = 5.0
    output_dir: str | None = None
    elastic: bool = False
    max_np: int | None = None
    host_discovery_script: str | None = None
    gloo_timeout_seconds: int = 60


@dataclass
class Plan:
    """One attempt: which launcher runs what, where, with which environment.

    `hosts` is None for this machine alone; `hostfile` is set when the launcher reads
    the user's file as it is. `env` is the launcher's whole environment, `shown_env`
    the values printed before the command (what --env added for horovodrun).
    `runner` is this venv's hvdft (empty for --exec), `args` the words after `--`.
    """

    launcher: str
    controller: str
    np: int | None
    hosts: HostList | None
    hostfile: str | None
    runner: list[str]
    args: list[str]
    env: dict[str, str]
    shown_env: dict[str, str]
    extra_env: list[str]
    network_interface: str | None
    launcher_args: list[str]
    elastic_args: list[str] = field(default_factory=list)  # horovodrun's elastic options (hosts come from them)

    @property
    def program(self) -> list[str]:
        """What every rank runs."""
        return [*self.runner, *self.args]

    def argv(self) -> list[str]:
        """The launcher's command line."""
        return build_command(
            self.program,
            launcher=self.launcher,
            controller=self.controller,
            np=self.np,
            hosts=self.hosts.hosts if self.hosts and not self.elastic_args else None,
            hostfile=None if self.elastic_args else self.hostfile,
            env=self.env,
            extra_env=self.extra_env,
            network_interface=self.network_interface,
            launcher_args=[*self.elastic_args, *self.launcher_args],
            is_root=hasattr(os, "geteuid") and os.geteuid() == 0,
            local_slots=local_core_count(),
            executable=venv_tool("horovodrun") if self.launcher == "horovodrun" else None,
            tag_output=True,
        )

    def rank_hosts(self) -> list[str]:
        """The host of each rank: both launchers fill hosts in order, slot by slot."""
        if self.hosts is None:
            return [socket.gethostname()] * (self.np or 1)
        return [name for name, slots in self.hosts.hosts for _ in range(slots)]


# ------------------------------------------------------------------ the command


def forwarded_env_names(env: Mapping[str, str]) -> list[str]:
    """Variables mpirun forwards with -x (horovodrun forwards its whole environment)."""
    return sorted(
        name
        for name in env
        if (name in _FORWARD_EXACT or name.startswith(_FORWARD_PREFIXES)) and name not in TEST_HOOKS
    )


def venv_tool(name: str) -> str:
    """`name` from this interpreter's bin dir when it is there (horovodrun lives in the
    venv, which need not be activated), else the bare name for PATH to find."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def hvdft_program() -> list[str]:
    """This interpreter's hvdft: the same venv on every host, not whatever is on PATH."""
    if importlib.util.find_spec("hvdft.__main__") is not None:
        return [sys.executable, "-m", "hvdft"]
    # sys.executable is deliberately not resolved: the venv's python is a symlink and
    # resolving it would leave the venv.
    script = Path(sys.executable).parent / "hvdft"
    return [str(script)] if script.exists() else [sys.executable, "-m", "hvdft"]


def build_command(
    program: Sequence[str],
    *,
    launcher: str = "horovodrun",
    controller: str = "gloo",
    np: int | None = None,
    hosts: Hosts | None = None,
    hostfile: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    extra_env: Sequence[str] = (),
    network_interface: str | None = None,
    launcher_args: Sequence[str] = (),
    is_root: bool = False,
    local_slots: int = 1,
    hostname: str | None = None,
    executable: str | None = None,
    tag_output: bool = False,
) -> list[str]:
    """The horovodrun/mpirun argv that starts `program` on every rank.

    `hosts` is the host list (None: this machine only). `hostfile`, when given, is a
    file the launcher can read itself and that holds exactly `hosts`. `env` is the
    environment to forward (mpirun's -x); `extra_env` adds NAME or NAME=VALUE entries.
    `local_slots` is how many ranks mpirun allows on this machine without a host list.
    `executable` replaces the launcher's bare name (e.g. the venv's horovodrun).
    `tag_output` has mpirun tag each output fragment with its rank (horovodrun always
    does), which is how `hvdft.outcome` tells whose lines it reads.
    Raises HvdftError for combinations no launcher accepts (-np below 1, more ranks
    than remote slots, --gloo with mpirun).
    """
    if launcher not in ("horovodrun", "mpirun"):
        raise HvdftError(f"unknown launcher '{launcher}' (horovodrun or mpirun)")
    if controller not in ("gloo", "mpi"):
        raise HvdftError(f"unknown controller '{controller}' (gloo or mpi)")
    if launcher == "mpirun" and controller == "gloo":
        raise HvdftError("--gloo needs horovodrun; mpirun always runs the MPI controller")
    if hostfile is not None and hosts is None:
        raise HvdftError("build_command: a hostfile needs its parsed hosts", hostfile)
    if not program:
        raise HvdftError("nothing to run: give the hvdft command after '--'")

    total = sum(slots for _, slots in hosts) if hosts else None
    if np is None:
        np = total or 1
    if np < 1:
        raise HvdftError(f"-np must be at least 1, got {np}")
    local = hostlib.LOCAL_NAMES | {hostname or socket.gethostname()}
    all_local = hosts is None or all(name in local for name, _ in hosts)
    if total is not None and np > total and not (launcher == "mpirun" and all_local):
        raise HvdftError(f"-np {np} is more than the {total} slots in the host list")

    if launcher == "horovodrun":
        cmd = [executable or "horovodrun", "-np", str(np), f"--{controller}"]
        if hostfile is not None:
            cmd += ["--hostfile", str(hostfile)]
        elif hosts:
            cmd += ["-H", hosts_spec(hosts)]
        if network_interface:
            cmd += ["--network-interface", network_interface]
        return [*cmd, *launcher_args, *program]

    cmd = [executable or "mpirun", "-np", str(np)]
    if is_root:
        cmd.append("--allow-run-as-root")
    if np > (total if total is not None else local_slots):
        # Only reached for this machine alone: ranks beyond its cores just share them.
        cmd.append("--oversubscribe")
    if tag_output:
        cmd.append("--tag-output")
    if hostfile is not None:
        cmd += ["-hostfile", str(hostfile)]
    elif hosts:
        cmd += ["-H", hosts_spec(hosts)]
    # Horovod's documented mpirun flags: no core binding (each rank runs several
    # threads) and ranks filled host by host.
    cmd += ["-bind-to", "none", "-map-by", "slot"]
    for name, value in _mpi_mca_defaults(network_interface):
        if name not in _mca_names(launcher_args):  # the user's own -mca wins
            cmd += ["-mca", name, value]
    names = forwarded_env_names(env or {})
    for entry in extra_env:
        name = entry.partition("=")[0]
        if name in names:
            names.remove(name)
        names.append(entry)
    for name in names:
        cmd += ["-x", name]
    return [*cmd, *launcher_args, *program]


def _mpi_mca_defaults(network_interface: str | None) -> list[tuple[str, str]]:
    params = [
        # TCP and shared memory, not the openib BTL that only prints warnings on
        # modern fabrics (Horovod's documented setting).
        ("pml", "ob1"),
        ("btl", "^openib"),
        # How long mpirun waits between SIGCONT, SIGTERM and SIGKILL when it ends a job.
        ("odls_base_sigkill_timeout", str(MPI_TERM_GRACE_S)),
        # MPI itself has no timeouts: a rank whose peer's host vanished waits forever.
        # Keepalives on mpirun's links to its daemons turn a lost host into a job
        # abort after ~1 min instead of the default 8 (300 s + 9 x 20 s).
        ("oob_tcp_keepalive_time", "30"),
        ("oob_tcp_keepalive_intvl", "10"),
        ("oob_tcp_keepalive_probes", "3"),
    ]
    if network_interface:
        # Both MPI's data path and its out-of-band wire-up, or one still picks docker0.
        params += [
            ("btl_tcp_if_include", network_interface),
            ("oob_tcp_if_include", network_interface),
        ]
    return params


def _mca_names(args: Sequence[str]) -> set[str]:
    return {args[i + 1] for i in range(len(args) - 1) if args[i] in ("-mca", "--mca", "-gmca", "--gmca")}


def format_command(argv: Sequence[str], env_prefix: Mapping[str, str] | None = None) -> str:
    """The `[hvdft launch] ...` line: the command as a shell would take it."""
    words = [f"{k}={v}" for k, v in (env_prefix or {}).items()] + list(argv)
    return f"{PREFIX} {shlex.join(words)}"


def local_core_count() -> int:
    """Physical cores this process may use: mpirun's default slot count on one machine."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(
                (
                    (topology / "physical_package_id").read_text().strip(),
                    (topology / "core_id").read_text().strip(),
                )
            )
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def gloo_or_mpi(explicit: bool) -> str:
    """'gloo', or 'mpi' when this host's Gloo ranks would crash and MPI can stand in.

    Horovod 0.28.1 as released segfaults on a host whose name does not resolve (a
    container with --network none; hvdft.gloo_host says why). An explicit --gloo, or a
    Horovod without MPI, is refused with one line instead of switched.
    """
    reason = gloo_crash_reason()
    if reason is None:
        return "gloo"
    from hvdft.dist import build_info

    if explicit or not (build_info()["mpi"] and shutil.which("mpirun")):
        raise HvdftError(f"{reason}; {GLOO_ADVICE}")
    click.echo(f"{PREFIX} {reason}: using mpirun (--mpi) instead")
    return "mpi"


# ------------------------------------------------------------------ request -> plan


def _split_env(entries: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for entry in entries:
        name, sep, value = entry.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise HvdftError(f"--env '{entry}': expected NAME or NAME=VALUE")
        if sep:
            values[name] = value
        elif name not in environ:
            raise HvdftError(f"--env {name}: {name} is not set here, nothing to forward")
    return values


def _split_launcher_args(texts: Sequence[str]) -> list[str]:
    words: list[str] = []
    for text in texts:
        try:
            words += shlex.split(text)
        except ValueError as exc:
            raise HvdftError(f"--launcher-args {text!r}: {exc}") from None
    return words


def child_environment(environ: Mapping[str, str], env_entries: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """(the launcher's environment, test hooks left out of it).

    horovodrun hands its whole environment to the ranks and mpirun its own to the ranks
    on its machine, so a hook must be removed here, not only left out of -x. A hook
    named with --env (with or without a value) goes through.
    """
    named = {entry.partition("=")[0] for entry in env_entries}
    stripped = sorted(name for name in TEST_HOOKS if name in environ and name not in named)
    env = {k: v for k, v in environ.items() if k not in stripped}
    env.update(_split_env(env_entries, environ))
    return env, stripped


def plan(req: LaunchRequest, environ: Mapping[str, str]) -> tuple[Plan, list[str]]:
    """The first attempt's plan, and the test hooks left out of its environment."""
    if req.hostfile and req.hosts_text:
        raise HvdftError("give --hostfile or -H, not both")
    if int(environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1:
        raise HvdftError(
            "hvdft launch is running as one of several srun tasks; run it once per job "
            "(in the batch script), or use `srun --mpi=pmix hvdft ...` without launch"
        )
    slurm = hostlib.in_slurm(environ) and not (req.hostfile or req.hosts_text)
    controller = req.controller or ("mpi" if slurm or req.launcher == "mpirun" else "gloo")
    launcher = req.launcher if req.launcher != "auto" else ("mpirun" if controller == "mpi" else "horovodrun")

    np = req.np
    hosts: HostList | None = None
    passthrough: str | None = None
    if req.hostfile:
        hosts = hostlib.read_hostfile(req.hostfile)
        # A file the launcher reads as it is goes through unchanged, so the printed
        # command matches what the user wrote; otherwise the same hosts go as -H
        # (horovodrun's reader fails on comments; neither reads 'host:N' lines).
        if (launcher == "horovodrun" and hosts.strict) or (launcher == "mpirun" and not hosts.colon):
            passthrough = req.hostfile
    elif req.hosts_text:
        hosts = hostlib.read_hosts(req.hosts_text)
    elif slurm:
        hosts = hostlib.read_slurm(environ)
        if np is None and environ.get("SLURM_NTASKS"):
            np = int(environ["SLURM_NTASKS"])

    here = hostlib.LOCAL_NAMES | {socket.gethostname()}
    if controller == "gloo" and (hosts is None or any(name in here for name, _ in hosts.hosts)):
        # Horovod 0.28.1 as released segfaults there (hvdft.gloo_host): mpirun instead, or
        # one line. --elastic needs Gloo, so it is refused rather than switched.
        controller = gloo_or_mpi(explicit=req.controller is not None or req.elastic)
        if controller == "mpi" and req.launcher == "auto":
            launcher = "mpirun"

    env, stripped = child_environment(environ, req.env_entries)
    values = _split_env(req.env_entries, environ)
    found = Plan(
        launcher=launcher,
        controller=controller,
        np=np,
        hosts=hosts,
        hostfile=passthrough,
        runner=[] if req.exec_ else hvdft_program(),
        args=list(req.args),
        env=env,
        shown_env=values if launcher == "horovodrun" else {},
        extra_env=list(req.env_entries),
        network_interface=req.network_interface,
        launcher_args=_split_launcher_args(req.launcher_args),
    )
    if req.elastic:
        _make_elastic(found, req)
    found.argv()  # every combination error (-np, slots, controller) before anything else
    return found, stripped


# Hosts that failed come back after a cooldown (seconds, min and max) instead of never.
ELASTIC_COOLDOWN = ("10", "300")


def _make_elastic(p: Plan, req: LaunchRequest) -> None:
    """horovodrun's elastic mode: hosts from a discovery script (the user's, or one that
    re-reads --hostfile at every call, or lists -H), between --min-np and --max-np ranks.

    The Gloo timeout is also how long a rank waits in the re-rendezvous after a reset for
    a new peer to start; Horovod aborts the rank when it runs out (measured here: up to
    17 s for a new worker to reach it), hence 60 s rather than Horovod's 30.
    """
    if p.launcher != "horovodrun" or p.controller != "gloo":
        raise HvdftError("--elastic runs horovodrun's Gloo controller: it cannot be combined with --mpi")
    script = req.host_discovery_script
    if script is None and p.hosts is None:
        raise HvdftError("--elastic needs --host-discovery-script, --hostfile or -H (on one machine, two names "
                         "for it: -H localhost:1,127.0.0.1:1, since a failed worker takes its host name out)")
    if script is None:
        script = str(_discovery_script(req.hostfile, p.hosts))
    slots = sum(n for _, n in p.hosts.hosts) if p.hosts else None
    max_np = req.max_np or slots or p.np or req.min_np
    if req.min_np > max_np:
        raise HvdftError(f"--min-np {req.min_np} is more than --max-np {max_np}")
    p.np = p.np or max_np
    p.elastic_args = ["--min-np", str(req.min_np), "--max-np", str(max_np), "--host-discovery-script", script,
                      "--gloo-timeout-seconds", str(req.gloo_timeout_seconds),
                      "--blacklist-cooldown-range", *ELASTIC_COOLDOWN]


def _discovery_script(hostfile: str | None, hosts: HostList | None) -> Path:
    """A host discovery script: `host:slots` lines of the hostfile (read again at every
    call, so editing the file adds or removes hosts during the job), or of -H."""
    folder = Path(tempfile.mkdtemp(prefix="hvdft-elastic-"))
    script = folder / "discover-hosts.sh"
    if hostfile:
        body = ("awk '{sub(/#.*/, \"\"); if (NF == 0) next; h = $1; n = 1;"
                " if (h ~ /:/) { split(h, a, \":\"); h = a[1]; n = a[2] }"
                " for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { split($i, b, \"=\"); n = b[2] }"
                f" print h \":\" n }}' {shlex.quote(str(Path(hostfile).resolve()))}\n")
    else:
        assert hosts is not None
        body = "".join(f"echo {shlex.quote(f'{name}:{n}')}\n" for name, n in hosts.hosts)
    script.write_text("#!/bin/sh\n# written by hvdft launch --elastic\n" + body)
    script.chmod(0o755)
    return script


def check_plan(p: Plan, req: LaunchRequest) -> None:
    """Refuse, before any rank starts, what the launcher would choke on: a launcher or
    program not on PATH, host names that do not resolve, a network interface this
    machine does not have (checked when this machine runs ranks)."""
    path = p.env.get("PATH")
    argv = p.argv()
    if shutil.which(argv[0], path=path) is None:
        hint = "run ./install.sh" if p.launcher == "horovodrun" else "install Open MPI or load your MPI module"
        raise HvdftError(f"{p.launcher} is not installed: '{argv[0]}' is not on PATH ({hint})")
    if p.hosts is not None:
        hostlib.check_resolvable(p.hosts)
    addresses = hostlib.local_addresses()
    local = [p.hosts is None or hostlib.is_local(name, addresses) for name in (p.hosts.names if p.hosts else [""])]
    if req.exec_ and any(local) and shutil.which(p.program[0], path=path) is None:
        raise HvdftError(f"--exec: '{p.program[0]}' is not on PATH (nor a path to a program)")
    if p.launcher == "horovodrun" and not all(local) and shutil.which("ssh", path=path) is None:
        raise HvdftError("horovodrun reaches other hosts through ssh, which is not on PATH")
    script = p.elastic_args[p.elastic_args.index("--host-discovery-script") + 1] if p.elastic_args else None
    if script and not os.access(script, os.X_OK):
        raise HvdftError("--host-discovery-script: not an executable file", script)
    if p.network_interface and any(local):
        hostlib.check_interface(p.network_interface, loopback_only=p.launcher == "horovodrun" and all(local))


# ------------------------------------------------------------------ running


_RANK_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")


def local_ranks(launcher_pid: int) -> list[int]:
    """Process ids of the ranks the launcher started on this machine: its descendants
    that carry a rank variable their parent does not (not their own children)."""
    import psutil

    def rank_of(proc: psutil.Process) -> str | None:
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            return None
        return next((env[name] for name in _RANK_VARIABLES if name in env), None)

    try:
        descendants = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for proc in descendants:
        try:
            parent = proc.parent()
        except psutil.Error:
            continue
        if rank_of(proc) is not None and (parent is None or rank_of(parent) is None):
            found.append(proc.pid)
    return found


class _Forwarder:
    """SIGINT/SIGTERM sent to hvdft launch (Ctrl-C, a Slurm `--signal=B:TERM@120`)
    reach the job. `received` says one came.

    With `direct`, the first one goes straight to the ranks on this machine: hvdft's
    ranks agree on stopping through their per-step allreduce, so one signalled rank
    stops them all at the same step, and rank 0 writes a checkpoint with no launcher
    deadline (horovodrun SIGKILLs 5 s after it signals, mpirun after its
    odls_base_sigkill_timeout). A second signal, or a job with no rank here, goes to
    the launcher, which ends the job at once.
    """

    def __init__(self, direct: bool = False) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.direct = direct
        self.received = False

    def _forward(self, signum: int, _frame: FrameType | None) -> None:
        first, self.received = not self.received, True
        if self.child is None or self.child.poll() is not None:
            return
        ranks = local_ranks(self.child.pid) if first and self.direct else []
        for pid in ranks:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        if ranks:
            # os.write: a signal handler must not re-enter a buffered stream.
            os.write(2, f"{PREFIX} {signal.Signals(signum).name}: asked the ranks on this machine to stop at "
                        "the next step and checkpoint; signal again to end the job at once\n".encode())
        else:
            self.child.send_signal(signum)

    @contextmanager
    def installed(self) -> Iterator[_Forwarder]:
        previous = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _wait(child: subprocess.Popen[bytes], watch: Watch | None = None) -> int:
    """The launcher's exit status (128 + signal if it was killed, the shell's convention,
    so `$?` tells a killed launcher from a failed one).

    With a `watch` on mpirun: once mpirun is ending the job and rank 0 has announced an
    end that every rank takes by itself (`Watch.verdict`), mpirun has nothing left to do
    but its kill sequence, which sleeps twice odls_base_sigkill_timeout even when every
    rank has exited. After MPI_VERDICT_WAIT_S more it is ended here, and the status is
    the verdict.
    """
    since = None
    while True:
        try:
            code = child.wait(timeout=0.25)
            return 128 - code if code < 0 else code
        except subprocess.TimeoutExpired:
            pass
        verdict = watch.verdict() if watch is not None and watch.launcher == "mpirun" and watch.aborting else None
        if verdict is None:
            continue
        since = since or time.monotonic()
        if time.monotonic() - since > MPI_VERDICT_WAIT_S:
            # mpirun alone: its local ranks have exited; remote daemons end with their lifeline.
            child.kill()
            child.wait()
            return verdict


def run_forwarding_signals(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """Run the launcher with its output going straight to ours, forwarding signals."""
    with _Forwarder().installed() as forwarder:
        # A session of its own keeps a terminal's Ctrl-C from reaching the launcher twice
        # (once from the terminal, once from us): mpirun aborts on a second SIGINT.
        forwarder.child = subprocess.Popen(list(argv), env=dict(env), start_new_session=True)
        return _wait(forwarder.child)


def run_watched(argv: Sequence[str], env: Mapping[str, str], launcher: str, hosts: list[str],
                direct_signals: bool = False) -> Outcome:
    """Run the launcher, pass its ranks' output on as it comes, and conclude.
    `direct_signals`: the ranks are hvdft's (see `_Forwarder`)."""
    watch = Watch(launcher, sys.stdout, sys.stderr)
    with _Forwarder(direct_signals).installed() as forwarder:
        forwarder.child = subprocess.Popen(
            list(argv), env=dict(env), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert forwarder.child.stdout is not None and forwarder.child.stderr is not None
        readers = [
            threading.Thread(target=pump(forwarder.child.stdout.fileno(), "stdout", watch), daemon=True),
            threading.Thread(target=pump(forwarder.child.stderr.fileno(), "stderr", watch), daemon=True),
        ]
        for reader in readers:
            reader.start()
        code = _wait(forwarder.child, watch)
        for reader in readers:
            # Ranks the launcher left behind could hold the pipes open: do not wait forever.
            reader.join(timeout=30)
    watch.close()
    watch.end_line()
    return conclude(watch, code, forwarder.received, launcher, hosts)


def run_plan(p: Plan) -> Outcome:
    """Print the command, run it, and return how it ended."""
    argv = p.argv()
    click.echo(format_command(argv, p.shown_env))
    sys.stdout.flush()
    try:
        return run_watched(argv, p.env, p.launcher, p.rank_hosts(), direct_signals=bool(p.runner))
    except FileNotFoundError as exc:
        raise HvdftError(f"{argv[0]} not found: {exc.strerror} (is the venv activated?)") from exc


def report(outcome: Outcome, final: bool) -> None:
    """The failed rank's last lines, then the summary: `hvdft: error: ...` when it is the
    job's end, `[hvdft launch] attempt failed: ...` before a restart."""
    for line in outcome.details:
        click.echo(f"{PREFIX} {line}", err=True)
    if final:
        for line in outcome.summary:
            click.echo(line, err=True)
    else:
        click.echo(f"{PREFIX} attempt failed: {outcome.reason}", err=True)


# ------------------------------------------------------------------ restarts


def job_output_dir(req: LaunchRequest) -> Path | None:
    """The job's --output-dir: launch's own option, else the train arguments', else their
    --config file's, else TrainConfig's default. None for other commands."""
    args = list(req.args)
    given = _option_value(args, "--output-dir") if not req.exec_ else None
    if req.output_dir and given and Path(req.output_dir) != Path(given):
        raise HvdftError(f"--output-dir {req.output_dir} differs from the job's --output-dir {given}")
    if req.output_dir or given:
        return Path(req.output_dir or given or "")
    if req.exec_ or args[:1] != ["train"]:
        return None
    config = _option_value(args, "--config")
    if config:
        from hvdft.config import load_config_file

        value = load_config_file(config)[0].get("output_dir")
        if value:
            return Path(str(value))
    from hvdft.config import TrainConfig

    return Path(TrainConfig.output_dir)


def _option_value(args: Sequence[str], name: str) -> str | None:
    value = None
    for i, word in enumerate(args):
        if word == name and i + 1 < len(args):
            value = args[i + 1]
        elif word.startswith(name + "="):
            value = word.split("=", 1)[1]
    return value


def latest_checkpoint(output_dir: Path) -> tuple[Path, int] | None:
    """(folder, step) of the newest complete checkpoint in OUTPUT_DIR/checkpoints, as
    `--resume auto` will find it (when this machine sees rank 0's disk)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT.match(p.name))]
    complete = sorted((step, p) for step, p in found if (p / _STATE_FILE).exists())
    return (complete[-1][1], complete[-1][0]) if complete else None


def restart_args(args: Sequence[str], exec_: bool, checkpoint_seen: bool) -> list[str]:
    """The words after `--` for a restart: an hvdft train job continues with
    `--resume auto` (its latest checkpoint, or a fresh start if it wrote none) and never
    with --overwrite-output-dir (which would delete that checkpoint). A `--resume PATH`
    of the user's stays while no checkpoint of this job exists. Other programs rerun as given."""
    if exec_ or list(args[:1]) != ["train"]:
        return list(args)
    out: list[str] = []
    words = list(args)
    i = 0
    user_path = None
    while i < len(words):
        word = words[i]
        if word == "--overwrite-output-dir":
            i += 1
            continue
        if word == "--resume" or word.startswith("--resume="):
            has_value = word == "--resume" and i + 1 < len(words) and not words[i + 1].startswith("-")
            value = word.split("=", 1)[1] if "=" in word else (words[i + 1] if has_value else "latest")
            user_path = value if value not in ("latest", "auto") else None
            i += 2 if has_value else 1
            continue
        out.append(word)
        i += 1
    resume = user_path if user_path and not checkpoint_seen else "auto"
    return [*out, "--resume", resume]


def _shrink(p: Plan, req: LaunchRequest) -> tuple[Plan, dict[str, str]]:
    """The plan for a restart on the hosts that still answer (only a host list can lose
    hosts), and {host: why} for those dropped. Raises HvdftError below --min-np."""
    if p.hosts is None:
        return p, {}
    answers = hostlib.probe(p.hosts.names, p.env, slurm=p.hosts.slurm)
    dropped = {name: why for name, why in answers.items() if why}
    if not dropped:
        return p, {}
    kept = p.hosts.without(list(dropped))
    np = min(p.np or p.hosts.slots, kept.slots)
    if np < max(req.min_np, 1):
        lost = ", ".join(f"{name} ({why})" for name, why in dropped.items())
        raise HvdftError(f"cannot restart: {lost} stopped answering; {np} rank(s) left, below --min-np {req.min_np}")
    nic = p.network_interface
    addresses = hostlib.local_addresses()
    if p.launcher == "horovodrun" and all(hostlib.is_local(name, addresses) for name in kept.names):
        nic = None  # every rank here now: horovodrun talks over loopback (hosts.check_interface)
    return dataclasses.replace(p, hosts=kept, hostfile=None, np=np, network_interface=nic), dropped


def _record(output_dir: Path | None, record: dict[str, object]) -> None:
    if output_dir is None:
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / RESTARTS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _sleep(seconds: float) -> bool:
    """Sleep, but return False at once on SIGINT/SIGTERM (the user wants to stop)."""
    stop = threading.Event()
    handler: Callable[[int, FrameType | None], None] = lambda *_: stop.set()  # noqa: E731
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return not stop.wait(seconds)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def _prepare_restart(req: LaunchRequest, failed: Plan, outcome: Outcome, attempt: int,
                     output_dir: Path | None, started: str) -> tuple[Plan, float]:
    """The next attempt's plan and delay; prints the one restart line and records it.
    Raises HvdftError when too few hosts answer."""
    current, dropped = _shrink(failed, req)
    seen = latest_checkpoint(output_dir) if output_dir else None
    current = dataclasses.replace(current, args=restart_args(req.args, req.exec_, seen is not None))
    delay = min(req.restart_backoff * 2**attempt, 300.0)
    ranks = current.np or (current.hosts.slots if current.hosts else 1)
    if req.exec_ or list(req.args[:1]) != ["train"]:
        where = "the start (not an hvdft train job)"
    else:
        where = f"step {seen[1]} ({seen[0]})" if seen else "the start (no checkpoint yet)"
    lost = f"; dropped {', '.join(f'{h} ({why})' for h, why in dropped.items())}" if dropped else ""
    click.echo(f"{PREFIX} restart {attempt + 1}/{req.max_restarts} in {delay:g} s: {outcome.reason}; "
               f"{ranks} rank(s), resuming from {where}{lost}", err=True)
    _record(output_dir, {
        "event": "restart", "launch_started": started, "attempt": attempt + 1, "reason": outcome.reason,
        "kind": outcome.kind, "rank": outcome.rank, "exit_status": outcome.status, "ranks": ranks,
        "hosts": hosts_spec(current.hosts.hosts) if current.hosts else None, "dropped_hosts": dropped,
        "resume_step": seen[1] if seen else None, "resume_from": str(seen[0]) if seen else None, "time": _now(),
    })  # fmt: skip
    return current, delay


def supervise(req: LaunchRequest, first: Plan) -> int:
    """Run the job; after a crash, a killed rank or a lost host, run it again from its
    latest checkpoint, up to --max-restarts times. Input errors and interrupts end it.
    Returns hvdft launch's exit status."""
    output_dir = job_output_dir(req)
    started = _now()
    current, attempt = first, 0
    while True:
        outcome = run_plan(current)
        if not outcome.retryable or attempt == req.max_restarts:
            break
        report(outcome, final=False)
        try:
            current, delay = _prepare_restart(req, current, outcome, attempt, output_dir, started)
        except HvdftError as exc:  # too few hosts left: the job ends with its last failure
            click.echo(f"{PREFIX} {exc}", err=True)
            report(dataclasses.replace(outcome, details=[]), final=True)
            return outcome.code
        if not _sleep(delay):
            click.echo("hvdft: interrupted before the restart", err=True)
            return EXIT_INTERRUPTED
        attempt += 1
    if outcome.code == 0:
        if attempt:
            click.echo(f"{PREFIX} finished after {attempt} restart(s)", err=True)
        return 0
    if attempt and outcome.retryable:
        click.echo(f"{PREFIX} giving up after {attempt} restart(s)", err=True)
        _record(output_dir, {"event": "gave_up", "launch_started": started, "attempt": attempt,
                             "reason": outcome.reason, "time": _now()})
    report(outcome, final=True)
    return outcome.code


def run_request(req: LaunchRequest) -> int:
    """Everything `hvdft launch` does, given its options; the exit status."""
    if req.max_restarts < 0:
        raise HvdftError(f"--max-restarts must not be negative, got {req.max_restarts}")
    if req.max_restarts and job_output_dir(req) is None:
        raise HvdftError("--max-restarts records each restart in the job's output folder: "
                         "give --output-dir (the job is not an hvdft train command)")
    p, stripped = plan(req, os.environ)
    for name in stripped:
        click.echo(f"{PREFIX} not forwarding {name} (a test hook; name it with --env {name} to pass it on)",
                   err=True)
    if req.dry_run:
        click.echo(format_command(p.argv(), p.shown_env))
        return 0
    check_plan(p, req)
    return supervise(req, p)


# ------------------------------------------------------------------ CLI


@click.command(
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    short_help="Start N ranks with horovodrun or mpirun.",
)
@click.option(
    "-np",
    "--num-proc",
    "np",
    type=int,
    default=None,
    help="Number of ranks. Default: the slots of the host list, Slurm's task count, or 1.",
)
@click.option(
    "--hostfile",
    type=click.Path(dir_okay=False),
    default=None,
    help="Hosts, one a line: 'host slots=N' or 'host:N' ('#' comments).",
)
@click.option("-H", "--hosts", "hosts_text", default=None, help="host:slots,host:slots,...")
@click.option(
    "--mpi",
    "controller",
    flag_value="mpi",
    default=None,
    help="MPI controller (mpirun). Default inside Slurm.",
)
@click.option(
    "--gloo",
    "controller",
    flag_value="gloo",
    help="Gloo controller (horovodrun --gloo). Default elsewhere.",
)
@click.option(
    "--launcher",
    type=click.Choice(["auto", "horovodrun", "mpirun"]),
    default="auto",
    show_default=True,
    help="auto: mpirun for --mpi, horovodrun for --gloo.",
)
@click.option(
    "--network-interface",
    default=None,
    help="NIC the ranks talk over (e.g. eth0, ib0); sets MPI's/Gloo's interface.",
)
@click.option(
    "--env",
    "env_entries",
    multiple=True,
    metavar="NAME[=VALUE]",
    help="Forward another variable to every rank (repeatable).",
)
@click.option(
    "--launcher-args",
    multiple=True,
    metavar="'ARGS'",
    help="Extra words for horovodrun/mpirun, shell-split (repeatable).",
)
@click.option(
    "--exec",
    "exec_",
    is_flag=True,
    help="The words after '--' are a complete program, not hvdft arguments.",
)
@click.option(
    "--max-restarts",
    type=int,
    default=0,
    show_default=True,
    help="Run a failed job (crash, killed rank, lost host) again from its latest checkpoint, up to K times.",
)
@click.option(
    "--min-np",
    type=int,
    default=1,
    show_default=True,
    help="Fewest ranks a restart may continue on when hosts stop answering.",
)
@click.option(
    "--restart-backoff",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds before the first restart; doubled for each further one (at most 300).",
)
@click.option(
    "--elastic",
    is_flag=True,
    help="Elastic Horovod: ranks that fail or leave are survived, hosts that join are used "
    "(horovodrun --min-np/--max-np with a host discovery script; Gloo).",
)
@click.option("--max-np", type=int, default=None, help="--elastic: most ranks [default: the host list's slots].")
@click.option(
    "--host-discovery-script",
    type=click.Path(dir_okay=False),
    default=None,
    help="--elastic: a program printing 'host:slots' lines [default: one that re-reads --hostfile, or -H].",
)
@click.option(
    "--gloo-timeout-seconds",
    type=int,
    default=60,
    show_default=True,
    help="--elastic: how long a rank waits for a silent peer, and for new peers after a reset.",
)
@click.option(
    "--output-dir",
    default=None,
    help="The job's output folder, for restarts.jsonl [default: the train command's --output-dir or --config].",
)
@click.option("--dry-run", is_flag=True, help="Print the command and exit (hosts and interfaces are not checked).")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def launch(ctx: click.Context, **options: object) -> None:
    """Run `hvdft ARGS...` on N ranks through horovodrun or mpirun.

    \b
      hvdft launch -np 2 -- train ner --config ner.yaml
      hvdft launch --hostfile hostfiles/two-nodes.horovod -- train ner ...
      hvdft launch --mpi -H node1:4,node2:4 --max-restarts 3 -- train ner ...

    Inside a Slurm allocation the hosts and rank count come from Slurm. Under
    `srun --mpi=pmix` run `hvdft train ...` directly instead: ranks come from MPI.
    Exit status: 0 done, 2 an input error (one line), 130 interrupted, 1 anything else
    (the failed rank, its status or signal, and its last lines).
    """
    try:
        code = run_request(LaunchRequest(**options))  # type: ignore[arg-type]
    except HvdftError as exc:
        # One line, like every hvdft command: the message names the file/line or entry.
        click.echo(f"hvdft: error: {exc}", err=True)
        code = EXIT_USER_ERROR
    ctx.exit(code)
