"""`hvdft launch`: start N ranks of hvdft with horovodrun or mpirun, on one box or many.

The launcher only builds a command line; the ranks find each other through whatever
started them (Gloo rendezvous for horovodrun, the MPI runtime for mpirun/srun), which is
why `srun --mpi=pmix hvdft train ...` works without this command at all: `dist.init()`
sees OMPI_COMM_WORLD_RANK / PMI_RANK / PMIX_RANK and uses MPI_COMM_WORLD.

Everything that decides *what* to run is a pure function of its arguments
(`build_command`, `parse_hosts`, `parse_hostfile`, `slurm_hosts`) so that it can be
tested without starting anything.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

import click

from hvdft.errors import EXIT_USER_ERROR, HvdftError
from hvdft.gloo_host import ADVICE as GLOO_ADVICE
from hvdft.gloo_host import gloo_crash_reason

Hosts = list[tuple[str, int]]

PREFIX = "[hvdft launch]"

# Seconds between SIGTERM and SIGKILL for MPI ranks (horovodrun's is fixed at 5 s).
MPI_TERM_GRACE_S = 60

# horovodrun rejects anything else in -H (its own regex), and mpirun would try to resolve
# it; failing here names the entry instead of failing on some remote host later.
_HOST_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_LOCAL_NAMES = {"localhost", "127.0.0.1"}

# Variables whose absence on remote ranks breaks a run in confusing ways: the venv's
# PATH, the libraries torch/NCCL load, Horovod/NCCL tuning, and offline HF settings.
_FORWARD_EXACT = {"PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "OMP_NUM_THREADS", "VIRTUAL_ENV"}
_FORWARD_PREFIXES = ("HOROVOD_", "NCCL_", "HF_", "TRANSFORMERS_", "HVDFT_")


# ------------------------------------------------------------------ host lists


def _check_host(name: str, where: str, path: str | Path | None, line: int | None) -> None:
    if not name or not _HOST_RE.match(name):
        raise HvdftError(
            f"{where}: '{name}' is not a host name or IPv4 address (letters, digits, '.', '-', '_')",
            path,
            line,
        )


def _slots(text: str, where: str) -> int:
    try:
        return _slots_value(text)
    except ValueError as exc:
        raise HvdftError(f"{where}: {exc}") from None


def _add(
    hosts: Hosts,
    seen: dict[str, str],
    name: str,
    slots: int,
    where: str,
    path: str | Path | None,
    line: int | None,
) -> None:
    # mpirun silently adds the slots of a repeated host while horovodrun keeps both
    # entries; neither is what someone who repeated a line by mistake wants.
    if name in seen:
        raise HvdftError(f"{where}: host '{name}' is already listed ({seen[name]})", path, line)
    seen[name] = where
    hosts.append((name, slots))


def parse_hosts(spec: str) -> Hosts:
    """`host:slots,host:slots,...` (horovodrun's and mpirun's -H); a bare host is 1 slot."""
    hosts: Hosts = []
    seen: dict[str, str] = {}
    entries = spec.split(",")
    for i, raw in enumerate(entries, 1):
        entry = raw.strip()
        where = f"-H entry {i} '{entry}'"
        if not entry:
            raise HvdftError(f"-H entry {i} is empty (in '{spec}')")
        name, sep, count = entry.partition(":")
        _check_host(name, where, None, None)
        slots = _slots(count, where) if sep else 1
        _add(hosts, seen, name, slots, where, None, None)
    return hosts


def _hostfile_line(text: str) -> tuple[str, int, bool] | None:
    """(host, slots, colon_syntax) of one hostfile line, None for blank/comment lines."""
    body = text.split("#", 1)[0].strip()
    if not body:
        return None
    fields = body.split()
    if ":" in fields[0]:
        if len(fields) != 1:
            raise ValueError(f"'{body}': 'host:slots' takes nothing after it")
        name, _, count = fields[0].partition(":")
        return name, _slots_value(count), True
    name, slots = fields[0], 1
    for field in fields[1:]:
        key, sep, value = field.partition("=")
        if not sep or key not in ("slots", "max_slots", "max-slots"):
            raise ValueError(f"'{field}': expected slots=N (or max_slots=N)")
        number = _slots_value(value)
        if key == "slots":
            slots = number
    return name, slots, False


def _slots_value(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"slots must be a positive integer, got '{text}'")
    return int(text)


def parse_hostfile(path: str | Path) -> Hosts:
    """Read a hostfile in either syntax, line by line: `host slots=N` or `host:N`.

    `host` alone is one slot, `#` starts a comment, `max_slots=` is accepted (mpirun's).
    """
    return _read_hostfile(path)[0]


def _read_hostfile(path: str | Path) -> tuple[Hosts, bool, bool]:
    """(hosts, uses_colon_syntax, strict) where strict means horovodrun can read the file
    itself: its parser takes every line as `host slots=N`, so a comment breaks it."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise HvdftError(f"cannot read hostfile: {exc.strerror}", path) from exc
    hosts: Hosts = []
    seen: dict[str, str] = {}
    colon = False
    strict = True
    for number, text in enumerate(lines, 1):
        try:
            parsed = _hostfile_line(text)
        except ValueError as exc:
            raise HvdftError(f"{exc}; expected 'host slots=N' or 'host:N'", path, number) from None
        if parsed is None:
            strict = False
            continue
        name, slots, is_colon = parsed
        _check_host(name, "host", path, number)
        _add(hosts, seen, name, slots, f"line {number}", path, number)
        colon |= is_colon
        strict &= bool(re.fullmatch(r"\S+ slots=\d+", text.strip()))
    if not hosts:
        raise HvdftError("hostfile lists no hosts", path)
    return hosts, colon, strict


def hosts_spec(hosts: Hosts) -> str:
    return ",".join(f"{name}:{slots}" for name, slots in hosts)


# ------------------------------------------------------------------ Slurm


def expand_hostlist(nodelist: str) -> list[str]:
    """Slurm's compressed host list, e.g. `node[01-03,07],gpu5` -> node01..node03, node07, gpu5.

    Several bracket groups in one name (`r[1-2]n[1-2]`) expand as a product, as in Slurm.
    Zero padding follows the lower bound's width, as `scontrol show hostnames` does.
    """
    names: list[str] = []
    for item in _split_top_level(nodelist):
        names.extend(_expand_item(item, nodelist))
    return names


def _split_top_level(text: str) -> list[str]:
    items: list[str] = []
    depth = 0
    current = ""
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise HvdftError(f"Slurm node list '{text}': unbalanced ']'")
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    if depth != 0:
        raise HvdftError(f"Slurm node list '{text}': unbalanced '['")
    items.append(current)
    for item in items:
        if not item.strip():
            raise HvdftError(f"Slurm node list '{text}': empty entry")
    return [item.strip() for item in items]


def _expand_item(item: str, whole: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if match is None:
        _check_host(item, f"Slurm node list '{whole}'", None, None)
        return [item]
    head, tail = item[: match.start()], item[match.end() :]
    expanded: list[str] = []
    for part in match.group(1).split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise HvdftError(f"Slurm node list '{whole}': bad range '{part}' in '{item}'")
        if not dash:
            hi = lo
        if int(hi) < int(lo):
            raise HvdftError(f"Slurm node list '{whole}': range '{part}' runs backwards")
        width = len(lo)
        for value in range(int(lo), int(hi) + 1):
            expanded.extend(_expand_item(f"{head}{value:0{width}d}{tail}", whole))
    return expanded


def expand_tasks_per_node(spec: str) -> list[int]:
    """Slurm's `2(x3),1` -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", part)
        if match is None or int(match.group(1)) < 1:
            raise HvdftError(f"Slurm tasks per node '{spec}': cannot read '{part}'")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def in_slurm(env: Mapping[str, str]) -> bool:
    return bool(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST"))


def slurm_hosts(env: Mapping[str, str]) -> Hosts:
    """(node, tasks) of the current Slurm allocation, from the variables sbatch/salloc set."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise HvdftError("not inside a Slurm allocation (SLURM_JOB_NODELIST is not set)")
    nodes = expand_hostlist(nodelist)
    # SLURM_TASKS_PER_NODE is always set by sbatch/salloc and is the allocation's truth;
    # SLURM_NTASKS_PER_NODE only exists when --ntasks-per-node was given.
    spec = env.get("SLURM_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE")
    if spec:
        counts = expand_tasks_per_node(spec)
        if len(counts) == 1:
            counts = counts * len(nodes)
    elif env.get("SLURM_NTASKS"):
        total = int(env["SLURM_NTASKS"])
        if total % len(nodes):
            raise HvdftError(
                f"SLURM_NTASKS={total} does not divide over {len(nodes)} nodes and SLURM_TASKS_PER_NODE is not set"
            )
        counts = [total // len(nodes)] * len(nodes)
    else:
        counts = [1] * len(nodes)
    if len(counts) != len(nodes):
        raise HvdftError(
            f"Slurm lists {len(nodes)} nodes ({nodelist}) but tasks per node '{spec}' describes {len(counts)}"
        )
    return list(zip(nodes, counts, strict=True))


# ------------------------------------------------------------------ command


def forwarded_env_names(env: Mapping[str, str]) -> list[str]:
    return sorted(name for name in env if name in _FORWARD_EXACT or name.startswith(_FORWARD_PREFIXES))


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
) -> list[str]:
    """The horovodrun/mpirun argv that starts `program` on every rank.

    `hosts` is the host list (None: this machine only). `hostfile`, when given, is a
    file the launcher can read itself and that holds exactly `hosts`. `env` is the
    environment to forward (mpirun's -x); `extra_env` adds NAME or NAME=VALUE entries.
    `local_slots` is how many ranks mpirun allows on this machine without a host list.
    `executable` replaces the launcher's bare name (e.g. the venv's horovodrun).
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
    local = _LOCAL_NAMES | {hostname or socket.gethostname()}
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
        # On SIGTERM mpirun signals the ranks and SIGKILLs them 1 s later by default:
        # too short for the checkpoint hvdft writes when Slurm warns of the time limit.
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


def run_forwarding_signals(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """Run the launcher; SIGINT/SIGTERM sent to us go to it, once each, so ranks can
    checkpoint (a Slurm `--signal=B:TERM@120` arrives at this process)."""
    # A session of its own keeps a terminal's Ctrl-C from reaching the launcher twice
    # (once from the terminal, once from us): mpirun aborts on a second SIGINT.
    child = subprocess.Popen(list(argv), env=dict(env), start_new_session=True)

    def forward(signum: int, _frame: FrameType | None) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                code = child.wait()
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # The shell's convention, so `$?` tells a killed launcher from a failed one.
    return 128 - code if code < 0 else code


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


# ------------------------------------------------------------------ CLI


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
@click.option("--dry-run", is_flag=True, help="Print the command and exit.")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def launch(
    ctx: click.Context,
    np: int | None,
    hostfile: str | None,
    hosts_text: str | None,
    controller: str | None,
    launcher: str,
    network_interface: str | None,
    env_entries: tuple[str, ...],
    launcher_args: tuple[str, ...],
    exec_: bool,
    dry_run: bool,
    args: tuple[str, ...],
) -> None:
    """Run `hvdft ARGS...` on N ranks through horovodrun or mpirun.

    \b
      hvdft launch -np 2 -- train ner --config ner.yaml
      hvdft launch --hostfile hostfiles/two-nodes.horovod -- train ner ...
      hvdft launch --mpi -H node1:4,node2:4 -- train ner ...

    Inside a Slurm allocation the hosts and rank count come from Slurm. Under
    `srun --mpi=pmix` run `hvdft train ...` directly instead: ranks come from MPI.
    """
    try:
        code = _launch(
            np, hostfile, hosts_text, controller, launcher, network_interface,
            env_entries, launcher_args, exec_, dry_run, args,
        )  # fmt: skip
    except HvdftError as exc:
        # One line, like every hvdft command: the message names the file/line or entry.
        click.echo(f"hvdft: error: {exc}", err=True)
        code = EXIT_USER_ERROR
    ctx.exit(code)


def _launch(
    np: int | None,
    hostfile: str | None,
    hosts_text: str | None,
    controller: str | None,
    launcher: str,
    network_interface: str | None,
    env_entries: tuple[str, ...],
    launcher_args: tuple[str, ...],
    exec_: bool,
    dry_run: bool,
    args: tuple[str, ...],
) -> int:
    environ = dict(os.environ)
    if hostfile and hosts_text:
        raise HvdftError("give --hostfile or -H, not both")
    if int(environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1:
        raise HvdftError(
            "hvdft launch is running as one of several srun tasks; run it once per job "
            "(in the batch script), or use `srun --mpi=pmix hvdft ...` without launch"
        )

    slurm = in_slurm(environ) and not (hostfile or hosts_text)
    explicit_controller, auto_launcher = controller is not None, launcher == "auto"
    controller = controller or ("mpi" if slurm or launcher == "mpirun" else "gloo")
    if launcher == "auto":
        launcher = "mpirun" if controller == "mpi" else "horovodrun"

    hosts: Hosts | None = None
    launcher_hostfile: str | None = None
    if hostfile:
        hosts, colon, strict = _read_hostfile(hostfile)
        # A file the launcher reads as it is goes through unchanged, so the printed
        # command matches what the user wrote; otherwise the same hosts go as -H
        # (horovodrun's reader fails on comments; neither reads 'host:N' lines).
        if (launcher == "horovodrun" and strict) or (launcher == "mpirun" and not colon):
            launcher_hostfile = hostfile
    elif hosts_text:
        hosts = parse_hosts(hosts_text)
    elif slurm:
        hosts = slurm_hosts(environ)
        if np is None and environ.get("SLURM_NTASKS"):
            np = int(environ["SLURM_NTASKS"])

    here = _LOCAL_NAMES | {socket.gethostname()}
    if controller == "gloo" and (hosts is None or any(name in here for name, _ in hosts)):
        controller = gloo_or_mpi(explicit_controller)
        if controller == "mpi" and auto_launcher:
            launcher = "mpirun"

    extra_values = _split_env(env_entries, environ)
    program = list(args) if exec_ else [*hvdft_program(), *args]
    argv = build_command(
        program,
        launcher=launcher,
        controller=controller,
        np=np,
        hosts=hosts,
        hostfile=launcher_hostfile,
        env=environ,
        extra_env=env_entries,
        network_interface=network_interface,
        launcher_args=_split_launcher_args(launcher_args),
        is_root=hasattr(os, "geteuid") and os.geteuid() == 0,
        local_slots=local_core_count(),
        executable=venv_tool("horovodrun") if launcher == "horovodrun" else None,
    )
    # horovodrun hands its whole environment to the ranks (and sets the Gloo/NCCL
    # interface itself); mpirun got -x NAME=VALUE from build_command.
    child_env = {**environ, **extra_values}
    click.echo(format_command(argv, extra_values if launcher == "horovodrun" else None))
    if dry_run:
        return 0
    sys.stdout.flush()
    try:
        return run_forwarding_signals(argv, child_env)
    except FileNotFoundError as exc:
        raise HvdftError(f"{argv[0]} not found: {exc.strerror} (is the venv activated?)") from exc
