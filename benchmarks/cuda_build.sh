#!/usr/bin/env bash
# cuda_build.sh — check install.sh's CUDA path on a machine with the CUDA toolkit (nvcc);
# no GPU is needed. Slow (a CUDA torch of several GB, Horovod compiled with NCCL and CUDA
# kernels): not part of `pytest` or CI. Measured on the 2-core development machine
# (CUDA 13.0, torch 2.14.1): see the README's Install section.
#
#   benchmarks/cuda_build.sh [--tests] [--remove] [-- install.sh options, e.g. cu126]
#     --tests    then run the fast test suite ("not slow") on that install (torch sees no GPU)
#     --remove   delete the venv afterwards (it takes about 6 GB)
#
# HVDFT_CUDA_VENV: the venv (default $TMPDIR/hvdft-cuda-venv, apart from ./.venv);
# HVDFT_TORCH: the pin (default install.sh's). Exit 0: NCCL built; 1: failed;
# 77: skipped (no nvcc here).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${HVDFT_CUDA_VENV:-${TMPDIR:-/tmp}/hvdft-cuda-venv}
TESTS=0
REMOVE=0
CUDA_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tests) TESTS=1 ;;
    --remove) REMOVE=1 ;;
    --) shift; CUDA_ARGS=("$@"); break ;;
    *) echo "cuda_build.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
  shift
done
if ! command -v nvcc >/dev/null 2>&1 && [ ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
  echo "cuda_build.sh: skipped: no nvcc (CUDA toolkit) on this machine"
  exit 77
fi
[ "$REMOVE" = 0 ] || trap 'rm -rf "$VENV"' EXIT

start=$(date +%s)
HVDFT_VENV=$VENV "$ROOT/install.sh" --dev --cuda "${CUDA_ARGS[@]}"
took=$(( $(date +%s) - start ))

CHECK=$("$VENV/bin/horovodrun" --check-build)
echo "$CHECK"
echo "$CHECK" | grep -q '\[X\] NCCL' || { echo "cuda_build.sh: FAILED: check-build does not list NCCL" >&2; exit 1; }
"$VENV/bin/python" - <<'PY'
import horovod.torch as hvd
import torch

assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"
assert hvd.nccl_built() and hvd.cuda_built(), "Horovod was built without NCCL/CUDA"
print(f"cuda_build.sh: torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"Horovod NCCL {hvd.nccl_built()}, GPUs visible: {torch.cuda.device_count()}")
PY
echo "cuda_build.sh: install.sh --cuda took $((took / 60)) min $((took % 60)) s; venv $(du -sh "$VENV" | cut -f1)"

if [ "$TESTS" = 1 ]; then
  start=$(date +%s)
  (cd "$ROOT" && "$VENV/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider)
  echo "cuda_build.sh: fast test suite on the CUDA install: $(( $(date +%s) - start )) s"
fi
