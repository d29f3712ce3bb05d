#!/usr/bin/env bash
# One command for a GPU machine: build timm_deprune with its CUDA kernels, run the GPU tests, benchmark vs cuDNN.
#
#   scripts/gpu_check.sh [gpu_bench.py options...]
#
# Python: $PYTHON if set, else `python3` when it already has torch (GPU images usually do, and may have no
# internet), else a new venv in .gpu-venv with torch installed from PyPI (needs internet).
# The build targets this machine's GPU unless DEPRUNE_CUDA_ARCHITECTURES is set (e.g. "80-real;90-real").
# Whole-model results go to gpu_model_bench.json, per-layer results to gpu_bench.json; the layer summary table is
# printed last.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n=== %s\n' "$*"; }
die() { printf 'gpu_check: %s\n' "$*" >&2; exit 1; }

# --- Python with torch ---------------------------------------------------------------------------------------
if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
  "$PY" -c 'import torch' 2>/dev/null || die "PYTHON=$PY cannot import torch"
elif command -v python3 >/dev/null && python3 -c 'import torch' 2>/dev/null; then
  PY="$(command -v python3)"
else
  say "no python with torch found: creating .gpu-venv and installing torch from PyPI (needs internet)"
  [[ -x .gpu-venv/bin/python ]] || python3 -m venv .gpu-venv || die "could not create .gpu-venv"
  PY=.gpu-venv/bin/python
  if ! "$PY" -c 'import torch' 2>/dev/null; then
    "$PY" -m pip install torch torchvision pytest hypothesis scikit-build-core pybind11 numpy timm ||
      die "pip could not install torch (no internet?): set PYTHON to an interpreter that has torch"
  fi
fi
PY="$(command -v "$PY")" || die "python not found: $PY"
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute, for the check run from /tmp below
say "python: $PY ($("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)'))"

"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' ||
  die "torch.cuda.is_available() is False for $PY: run this on a machine with an NVIDIA GPU and driver"
"$PY" -c 'import torch; print("gpu:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())'

for mod in scikit_build_core pybind11 pytest hypothesis; do
  "$PY" -c "import $mod" 2>/dev/null ||
    "$PY" -m pip install "${mod//_/-}" || die "$PY lacks $mod and pip could not install it (no internet?)"
done

# --- build with the CUDA kernels -----------------------------------------------------------------------------
if ! command -v nvcc >/dev/null; then
  for dir in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
    if [[ -x "$dir/nvcc" ]]; then export PATH="$dir:$PATH"; break; fi
  done
fi
command -v nvcc >/dev/null || die "nvcc not found: install the CUDA toolkit or put its bin/ on PATH"
export CUDACXX="${CUDACXX:-$(command -v nvcc)}"
if [[ -z "${DEPRUNE_CUDA_ARCHITECTURES:-}" ]]; then
  arch='import torch; major, minor = torch.cuda.get_device_capability(); print(f"{major}{minor}-real")'
  DEPRUNE_CUDA_ARCHITECTURES="$("$PY" -c "$arch")"
  export DEPRUNE_CUDA_ARCHITECTURES
fi
say "building with $("$CUDACXX" --version | tail -1) for CUDA architectures $DEPRUNE_CUDA_ARCHITECTURES"
# No build isolation: offline GPU machines cannot fetch the build requirements again.
DEPRUNE_CUDA=ON "$PY" -m pip install --no-build-isolation --no-deps . -C cmake.define.DEPRUNE_CUDA=ON ||
  die "build failed (see the CMake / nvcc output above)"
(cd /tmp && "$PY" -c '
import torch
from timm_deprune import _C
assert _C.cuda_compiled(), "the installed timm_deprune._C has no CUDA kernels"
n, t = _C.cuda_device_count(), torch.cuda.device_count()
assert n == t, f"_C sees {n} CUDA devices but torch sees {t}: driver older than the CUDA toolkit used to build?"
print("timm_deprune._C: CUDA kernels compiled,", n, "device(s)")
') || die "the installed extension cannot use the GPU"

# --- tests -----------------------------------------------------------------------------------------------------
say "GPU tests"
"$PY" -m pytest -p no:cacheprovider -m gpu tests || die "GPU tests failed"

# --- benchmark --------------------------------------------------------------------------------------------------
say "benchmark: whole models on the GPU, dense (cuDNN) vs DEPrune-BH optimised with our CUDA kernel"
"$PY" -c 'import timm' 2>/dev/null || "$PY" -m pip install timm || die "timm is needed for the model benchmark"
"$PY" scripts/benchmark.py model --device cuda --repeats 20 --json gpu_model_bench.json ||
  die "model benchmark failed"

say "benchmark: sparse kernel vs dense F.conv2d (cuDNN) on the depth-wise layers"
"$PY" scripts/gpu_bench.py --json gpu_bench.json "$@"
