"""Would Horovod's Gloo controller crash on this host? (A check, not a workaround.)

Horovod 0.28.1 as released crashes every Gloo rank with SIGSEGV (exit 139) on a host
whose own name does not resolve, such as a Docker container started with
`--network none` (its name is the container id, absent from /etc/hosts, and no DNS
server is reachable). Two bugs meet there (Horovod 0.28.1 source):

- `GlooContext::InitializeForProcessSet` (horovod/common/gloo/gloo_context.cc) builds
  the global process set's TCP device from `gloo_iface_`, which only the global
  context was given: `HOROVOD_GLOO_IFACE` (horovodrun's `--network-interface`, or the
  `lo` it picks for a local job) is ignored and Gloo falls back to resolving
  `gethostname()`;
- the bundled Gloo's `lookupAddrForHostname` (third_party/gloo/gloo/transport/tcp/
  device.cc) checks `getaddrinfo()` only against -1, and on any other failure
  (EAI_AGAIN = -3 here, EAI_NONAME = -2) walks its uninitialised result list.

`install.sh` builds Horovod with both fixed and marks the build with
`horovod.hvdft_patches`; this module lets hvdft refuse (or, in the launcher, avoid)
the crash where another Horovod build is installed. Standard library only.
"""

from __future__ import annotations

import importlib.util
import re
import socket
from pathlib import Path

# The install.sh patch that makes the host name irrelevant to a Gloo job.
_FIX = "gloo-process-set-iface"


def horovod_has_gloo_fix() -> bool:
    """True when the installed Horovod was built by install.sh with the Gloo fixes.

    install.sh appends `hvdft_patches = (...)` to horovod/__init__.py; that file is read,
    not imported (Horovod is imported in hvdft.dist alone, and the launcher stays light).
    """
    try:
        spec = importlib.util.find_spec("horovod")
    except (ImportError, ValueError):
        return False
    if spec is None or spec.origin is None:
        return False
    try:
        text = Path(spec.origin).read_text()
    except OSError:
        return False
    marker = re.search(r"^hvdft_patches = \((.*)\)$", text, re.M)
    return marker is not None and repr(_FIX) in marker.group(1)


def hostname_problem(hostname: str | None = None) -> str | None:
    """Why Gloo cannot build its device from this host's name, or None when it can.

    Gloo takes the addresses getaddrinfo() gives for the name, in order, and uses the
    first one it can bind a TCP socket to; that is repeated here (port 0, closed at once).
    """
    name = hostname or socket.gethostname()
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"this host's name '{name}' does not resolve ({exc.strerror})"
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.bind((sockaddr[0], 0, *sockaddr[2:]))
            return None
        except OSError:
            continue
    addresses = ", ".join(sorted({info[4][0] for info in infos}))
    return f"this host's name '{name}' resolves to {addresses}, which no interface here holds"


# What to do instead, for the one-line refusal.
ADVICE = (
    "use --mpi, give the host a resolvable name (docker run --hostname localhost, or an /etc/hosts line), "
    "or rebuild Horovod with ./install.sh, which fixes the crash"
)


def gloo_crash_reason(hostname: str | None = None) -> str | None:
    """Why Horovod's Gloo ranks would crash on this host (one line), or None.

    None when the installed Horovod carries install.sh's fix (then Gloo uses the
    interface horovodrun names, loopback included) or when the host name is usable.
    """
    if horovod_has_gloo_fix():
        return None
    problem = hostname_problem(hostname)
    if problem is None:
        return None
    return f"{problem}: this Horovod build's Gloo controller crashes (segmentation fault) on such a host"
