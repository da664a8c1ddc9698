"""The machines of a job: host lists, hostfiles, Slurm allocations, and what can be
checked about them before any rank starts (names resolve, the network interface
exists, a host still answers).

Nothing here builds a launcher command; `hvdft.launch` does that from a `HostList`.
Parsing is pure (a function of its text), so it is tested without a cluster; the
checks touch the network only through `socket.getaddrinfo`, `psutil.net_if_addrs`
(the same view of interfaces horovodrun takes) and an `ssh HOST true` probe.
"""

from __future__ import annotations

import concurrent.futures
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hvdft.errors import HvdftError

Hosts = list[tuple[str, int]]

# horovodrun rejects anything else in -H (its own regex), and mpirun would try to resolve
# it; failing here names the entry instead of failing on some remote host later.
_HOST_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
LOCAL_NAMES = {"localhost", "127.0.0.1"}


@dataclass
class HostList:
    """Hosts in rank order with their slots, and where each was written.

    `where[name]` is what an error about that host should point at: `FILE:LINE`,
    `-H entry N` or `Slurm node list`. `path` is the hostfile, `colon` whether it used
    `host:N` lines and `strict` whether every line is `host slots=N` (what horovodrun's
    own reader accepts). `slurm` marks an allocation's nodes.
    """

    hosts: Hosts
    where: dict[str, str] = field(default_factory=dict)
    path: str | None = None
    colon: bool = False
    strict: bool = False
    slurm: bool = False  # a Slurm allocation: reach nodes with srun, not ssh

    @property
    def slots(self) -> int:
        return sum(slots for _, slots in self.hosts)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.hosts]

    def without(self, dropped: Sequence[str]) -> HostList:
        """The same list less `dropped`; no longer a file a launcher can read as it is."""
        kept = [(name, slots) for name, slots in self.hosts if name not in dropped]
        return HostList(kept, {n: w for n, w in self.where.items() if n not in dropped}, slurm=self.slurm)


# ------------------------------------------------------------------ host lists


def _check_host(name: str, where: str, path: str | Path | None, line: int | None) -> None:
    if not name or not _HOST_RE.match(name):
        raise HvdftError(
            f"{where}: '{name}' is not a host name or IPv4 address (letters, digits, '.', '-', '_')",
            path,
            line,
        )


def _slots_value(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"slots must be a positive integer, got '{text}'")
    return int(text)


def _add(found: HostList, name: str, slots: int, where: str, path: str | Path | None, line: int | None) -> None:
    # mpirun silently adds the slots of a repeated host while horovodrun keeps both
    # entries; neither is what someone who repeated a line by mistake wants.
    if name in found.where:
        raise HvdftError(f"{where}: host '{name}' is already listed ({found.where[name]})", path, line)
    found.where[name] = where
    found.hosts.append((name, slots))


def read_hosts(spec: str) -> HostList:
    """`host:slots,host:slots,...` (horovodrun's and mpirun's -H); a bare host is 1 slot."""
    found = HostList([])
    for i, raw in enumerate(spec.split(","), 1):
        entry = raw.strip()
        where = f"-H entry {i} '{entry}'"
        if not entry:
            raise HvdftError(f"-H entry {i} is empty (in '{spec}')")
        name, sep, count = entry.partition(":")
        _check_host(name, where, None, None)
        try:
            slots = _slots_value(count) if sep else 1
        except ValueError as exc:
            raise HvdftError(f"{where}: {exc}") from None
        _add(found, name, slots, where, None, None)
    return found


def parse_hosts(spec: str) -> Hosts:
    """(host, slots) of an -H value; see `read_hosts`."""
    return read_hosts(spec).hosts


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
    for item in fields[1:]:
        key, sep, value = item.partition("=")
        if not sep or key not in ("slots", "max_slots", "max-slots"):
            raise ValueError(f"'{item}': expected slots=N (or max_slots=N)")
        number = _slots_value(value)
        if key == "slots":
            slots = number
    return name, slots, False


def read_hostfile(path: str | Path) -> HostList:
    """Read a hostfile in either syntax, line by line: `host slots=N` or `host:N`.

    `host` alone is one slot, `#` starts a comment, `max_slots=` is accepted (mpirun's).
    Errors name the file and line. `strict` is set when horovodrun can read the file
    itself: its parser takes every line as `host slots=N`, so a comment breaks it.
    """
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise HvdftError(f"cannot read hostfile: {exc.strerror}", path) from exc
    found = HostList([], path=str(path), strict=True)
    for number, text in enumerate(lines, 1):
        try:
            parsed = _hostfile_line(text)
        except ValueError as exc:
            raise HvdftError(f"{exc}; expected 'host slots=N' or 'host:N'", path, number) from None
        if parsed is None:
            found.strict = False
            continue
        name, slots, is_colon = parsed
        _check_host(name, "host", path, number)
        _add(found, name, slots, f"{path}:{number}", path, number)
        found.colon |= is_colon
        found.strict &= bool(re.fullmatch(r"\S+ slots=\d+", text.strip()))
    if not found.hosts:
        raise HvdftError("hostfile lists no hosts", path)
    return found


def parse_hostfile(path: str | Path) -> Hosts:
    """(host, slots) of a hostfile; see `read_hostfile`."""
    return read_hostfile(path).hosts


def hosts_spec(hosts: Hosts) -> str:
    """The -H value both launchers read: `host:slots,...`."""
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
    """Whether this process runs inside a Slurm allocation (sbatch/salloc)."""
    return bool(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST"))


def slurm_hosts(env: Mapping[str, str]) -> Hosts:
    """(node, tasks) of the current Slurm allocation, from the variables sbatch/salloc set."""
    return read_slurm(env).hosts


def read_slurm(env: Mapping[str, str]) -> HostList:
    """The current Slurm allocation as a `HostList`; see `slurm_hosts`."""
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
    where = {node: f"Slurm node list '{nodelist}'" for node in nodes}
    return HostList(list(zip(nodes, counts, strict=True)), where, slurm=True)


# ------------------------------------------------------------------ checks before launching


def interfaces() -> dict[str, list[str]]:
    """This machine's network interfaces and their IPv4 addresses, as horovodrun sees
    them (psutil, which Horovod's runner itself uses)."""
    import psutil

    return {
        name: [a.address for a in addrs if a.family == socket.AF_INET]
        for name, addrs in sorted(psutil.net_if_addrs().items())
    }


def local_addresses() -> set[str]:
    """Every IPv4 address of this machine."""
    return {address for addrs in interfaces().values() for address in addrs}


def is_local(name: str, addresses: set[str] | None = None) -> bool:
    """Whether `name` is this machine: its hostname, localhost, or a name resolving to
    one of its addresses (horovodrun's own test, which decides ssh or not)."""
    if name in LOCAL_NAMES or name == socket.gethostname():
        return True
    try:
        address = socket.gethostbyname(name)
    except OSError:
        return False
    return address in (addresses if addresses is not None else local_addresses())


def check_interface(nic: str, loopback_only: bool) -> None:
    """Fail (naming the interfaces that do exist) unless `nic` exists here.

    `loopback_only`: horovodrun with every rank on this machine talks over the
    interface that holds 127.0.0.1 and refuses any other with
    `ValueError: No interface is found for address 127.0.0.1.`
    """
    found = interfaces()
    listing = ", ".join(f"{name} ({', '.join(addrs) or 'no IPv4 address'})" for name, addrs in found.items())
    if nic not in found:
        raise HvdftError(f"--network-interface {nic}: no such interface on this machine; it has {listing}")
    if loopback_only and "127.0.0.1" not in found[nic]:
        loopback = [name for name, addrs in found.items() if "127.0.0.1" in addrs]
        raise HvdftError(
            f"--network-interface {nic}: every rank runs on this machine, where horovodrun only talks over "
            f"the loopback interface ({', '.join(loopback) or 'none found'}); drop the option, "
            f"name {loopback[0] if loopback else 'lo'}, or use --mpi"
        )


def check_resolvable(hosts: HostList, timeout_s: float = 20.0) -> None:
    """Fail on the first host (in list order) whose name does not resolve, naming where
    it was written. Lookups run in parallel, bounded by `timeout_s` in all."""
    names = hosts.names
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(names) or 1)) as pool:
        futures = {name: pool.submit(_resolve, name) for name in names}
        done, _ = concurrent.futures.wait(futures.values(), timeout=timeout_s)
        for name in names:
            future = futures[name]
            problem = future.result() if future in done else f"no answer from the resolver in {timeout_s:g} s"
            if problem:
                raise HvdftError(f"{hosts.where.get(name, 'host')}: host '{name}' does not resolve ({problem})")


def _resolve(name: str) -> str | None:
    try:
        socket.getaddrinfo(name, None)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def probe(names: Sequence[str], env: Mapping[str, str], timeout_s: float = 20.0,
          slurm: bool = False) -> dict[str, str | None]:
    """Which hosts still answer: name -> None when it does, else why not.

    This machine always answers. Others must run `true` within `timeout_s` through the
    remote shell their launcher uses: `ssh -o BatchMode=yes` (from PATH), or for the
    nodes of a Slurm allocation (`slurm`) a one-task `srun --overlap` step, as mpirun
    starts its daemons there (the srun probe is untested: no Slurm where this was written).
    """
    addresses = local_addresses()
    tool = shutil.which("srun" if slurm else "ssh", path=env.get("PATH"))

    def one(name: str) -> str | None:
        if is_local(name, addresses):
            return None
        if tool is None:
            return f"{'srun' if slurm else 'ssh'} is not on PATH"
        if slurm:
            argv = [tool, "--nodes=1", "--ntasks=1", f"--nodelist={name}", "--overlap", "--time=1", "true"]
        else:
            argv = [tool, "-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(timeout_s)}", name, "true"]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s + 5, env=dict(env))
        except subprocess.TimeoutExpired:
            return f"no answer in {timeout_s:g} s"
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            return f"{Path(tool).name}: {last}"
        return None

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(names) or 1)) as pool:
        return dict(zip(names, pool.map(one, names), strict=True))
