#!/usr/bin/env bash
# build.sh — build an hvdft image with this machine's pip settings passed in the
# standard ways (build arguments for URLs, BuildKit secrets for the CA bundle), on
# machines without a registry too.
#
#   docker/build.sh [cpu|cuda] [options] [-- more docker build arguments]
#     -t, --tag NAME     image name (default hvdft:cpu / hvdft:cuda)
#     --base IMAGE       the Debian bookworm base (cpu; default debian:bookworm-slim when it
#                        is present or can be pulled, else one made by docker/make-base.sh)
#     --reuse-wheel      hand the Horovod wheels cached on this machine to the build
#                        (skips the compile when Python, torch and MPI match)
#
# What it passes: pip's effective index-url, extra-index-url, find-links and trusted-host
# (pip.conf files and PIP_* variables) as build arguments, HVDFT_TORCH_INDEX when set,
# and pip's CA bundle (cert / PIP_CERT) as the secret `pip_cert`. Local folders among
# those locations (file:// URLs, paths) are served read-only on 127.0.0.1 during the
# build, which runs with the host's network. pip's `constraint` is not passed: it names
# a file of this machine. Needs root or the docker group, and a BuildKit-capable client.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
KIND=cpu
TAG=""
BASE=""
REUSE=0
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    cpu|cuda) KIND=$1 ;;
    -t|--tag) TAG=${2:?$1 needs a name}; shift ;;
    --base) BASE=${2:?--base needs an image}; shift ;;
    --reuse-wheel) REUSE=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,/^set /p' "$0" | sed -n 's/^# \{0,1\}//p'; exit 0 ;;
    *) echo "build.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
TAG=${TAG:-hvdft:$KIND}
say() { printf '\033[1m[docker/build]\033[0m %s\n' "$*"; }
die() { echo "build.sh: $*" >&2; exit 1; }

# A client that builds with BuildKit (secrets, cache mounts): docker with buildx, or a
# client with the daemon's built-in BuildKit (DOCKER_BUILDKIT=1, Docker 20.10 - 22).
DOCKER=""
for client in ${DOCKER_CLIENT:-} $(which -a docker 2>/dev/null); do
  if "$client" buildx version >/dev/null 2>&1 \
     || DOCKER_BUILDKIT=1 "$client" build --help 2>/dev/null | grep -q -- '--secret'; then
    DOCKER=$client; break
  fi
done
[ -n "$DOCKER" ] || die "no docker client here builds with BuildKit: install buildx (docker-buildx-plugin)"
"$DOCKER" info >/dev/null 2>&1 || die "no Docker daemon answers ($DOCKER info failed)"
export DOCKER_BUILDKIT=1

ARGS=(--network host -f "$HERE/Dockerfile.$KIND" -t "$TAG")
if [ "$KIND" = cpu ]; then
  if [ -z "$BASE" ]; then
    if "$DOCKER" image inspect debian:bookworm-slim >/dev/null 2>&1 \
       || timeout 120 "$DOCKER" pull -q debian:bookworm-slim >/dev/null 2>&1; then
      BASE=debian:bookworm-slim
    else
      say "no registry: making the base image with debootstrap"
      "$HERE/make-base.sh" hvdft-base:bookworm
      BASE=hvdft-base:bookworm
    fi
  fi
  ARGS+=(--build-arg "BASE_IMAGE=$BASE")
fi

# pip's effective settings, from the same places pip reads them (PIP_* win over files).
SETTINGS=$(python3 - <<'PY'
import os
values = {}
try:
    from pip._internal.configuration import Configuration
    config = Configuration(isolated=False)
    config.load()
    for key, value in config.items():  # in pip's precedence order: later wins
        section, _, name = key.partition(".")
        if section in ("global", "install", ":env:"):
            values[name] = value
except Exception:  # pip's internals moved: the PIP_* variables still count
    pass
for name in ("index-url", "extra-index-url", "find-links", "trusted-host", "cert"):
    env = os.environ.get("PIP_" + name.upper().replace("-", "_"))
    if env:
        values[name] = env
for name in ("index-url", "extra-index-url", "find-links", "trusted-host", "cert"):
    print(f"{name}\t{' '.join(str(values.get(name, '')).split())}")
PY
)
setting() { printf '%s\n' "$SETTINGS" | awk -F'\t' -v k="$1" '$1 == k {print $2}'; }

SERVE=$(mktemp -d)
SERVER_PID=""
# A fixed port: the URLs are build arguments, part of the install step's cache key, so a
# port that changed at every build would rebuild that step every time.
free_port() { python3 -c 'import socket, sys; s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); print(s.getsockname()[1])' "$1" 2>/dev/null; }
PORT=$(free_port "${HVDFT_BUILD_PORT:-38471}") || {
  PORT=$(free_port 0)
  say "port ${HVDFT_BUILD_PORT:-38471} is taken: serving on $PORT (the install step's cache will not be reused)"
}
cleanup() {
  [ -z "$SERVER_PID" ] || kill "$SERVER_PID" 2>/dev/null || true
  rm -rf "$SERVE" "$HERE/.wheelhouse"
}
trap cleanup EXIT
# A local folder (file:// URL or path) as an http:// URL on the loopback server (a link
# in $SERVE). An index folder (.../simple) goes with its parent: its file links are relative.
to_url() {
  local loc=$1 path n
  case "$loc" in
    http://*|https://*) echo "$loc"; return ;;
    file://*) path=${loc#file://} ;;
    *) path=$loc ;;
  esac
  path=${path%/}
  [ -e "$path" ] || { say "skipping $loc (not there)" >&2; return; }
  n=$(find "$SERVE" -mindepth 1 -maxdepth 1 | wc -l)
  if [ "$(basename "$path")" = simple ]; then
    ln -s "$(dirname "$path")" "$SERVE/$n"; echo "http://127.0.0.1:$PORT/$n/simple/"
  else
    ln -s "$path" "$SERVE/$n"; echo "http://127.0.0.1:$PORT/$n/"
  fi
}
urls() { local out=() u; for loc in $1; do u=$(to_url "$loc"); [ -z "$u" ] || out+=("$u"); done; echo "${out[*]}"; }

index=$(urls "$(setting index-url)")
extra=$(urls "$(setting extra-index-url)")
links=$(urls "$(setting find-links)")
trusted=$(setting trusted-host)
[ -z "$index" ] || ARGS+=(--build-arg "PIP_INDEX_URL=$index")
[ -z "$extra" ] || ARGS+=(--build-arg "PIP_EXTRA_INDEX_URL=$extra")
[ -z "$links" ] || ARGS+=(--build-arg "PIP_FIND_LINKS=$links")
[ -z "$trusted" ] || ARGS+=(--build-arg "PIP_TRUSTED_HOST=$trusted")
[ -z "${HVDFT_TORCH_INDEX:-}" ] || ARGS+=(--build-arg "HVDFT_TORCH_INDEX=$HVDFT_TORCH_INDEX")
cert=$(setting cert)
[ -z "$cert" ] || ARGS+=(--secret "id=pip_cert,src=$cert")
if [ -n "$(ls -A "$SERVE")" ]; then
  say "serving local package folders on 127.0.0.1:$PORT for the build"
  python3 -m http.server --bind 127.0.0.1 --directory "$SERVE" "$PORT" >/dev/null 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 50); do python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/', timeout=1)" 2>/dev/null && break; sleep 0.2; done
fi

if [ "$REUSE" = 1 ]; then
  WHEELHOUSE=${HVDFT_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvdft/wheelhouse}
  if [ -d "$WHEELHOUSE" ]; then
    rm -rf "$HERE/.wheelhouse"
    cp -rl "$WHEELHOUSE" "$HERE/.wheelhouse" 2>/dev/null || cp -r "$WHEELHOUSE" "$HERE/.wheelhouse"
    say "handing in the cached Horovod wheels of $WHEELHOUSE"
  fi
fi

say "$DOCKER build ${ARGS[*]} ${EXTRA[*]} $ROOT"
start=$(date +%s)
"$DOCKER" build "${ARGS[@]}" "${EXTRA[@]}" "$ROOT"
took=$(( $(date +%s) - start ))
size=$("$DOCKER" image inspect -f '{{.Size}}' "$TAG")
say "built $TAG in $((took / 60)) min $((took % 60)) s; image size $((size / 1000000)) MB"
