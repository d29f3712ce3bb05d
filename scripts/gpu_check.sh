#!/usr/bin/env bash
# One command for a fresh GPU machine: build timm_deprune with its CUDA kernels, run the GPU tests (plus
# compute-sanitizer memcheck / racecheck on a few kernel tests), benchmark our kernel against cuDNN on the
# depth-wise layers, then whole models. Quick mode (the default) fits a 10-minute run on an H100 / H200 (about 8
# minutes: every stage has its own time limit, and a stage that runs out is reported, not fatal to the rest).
#
#   scripts/gpu_check.sh [--full]            OUT=/some/dir scripts/gpu_check.sh
#
# Results go under ${OUT:-.}: gpu_check.md (every table, one file to paste into BENCHMARKS.md), gpu_bench.json /
# gpu_bench.md (per-layer and summed DW layers), gpu_model_bench.json (whole models), gpu_tests.log, sanitizer logs.
#
# Python: $PYTHON if set, else `python3` when it has torch with CUDA (any release: GPU images often ship another one,
# e.g. 2.11 for CUDA 13), else a venv in .gpu-venv with the pinned torch (needs PyPI). cmake / ninja / build
# requirements are installed when missing, timm kept inside the tested range. The build targets this machine's GPU
# unless DEPRUNE_CUDA_ARCHITECTURES is set.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
OUT="${OUT:-.}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
MODE=quick
[[ "${1:-}" == "--full" ]] && MODE=full
TORCH_PIN="torch==2.14.1 torchvision==0.29.1"
TIMM_RANGE="timm>=1.0.31,<1.1"
START=$SECONDS
REPORT="$OUT/gpu_check.md"

say() { printf '\n=== [%3ds] %s\n' "$((SECONDS - START))" "$*"; }
die() { printf 'gpu_check: %s\n' "$*" >&2; printf '\n**gpu_check stopped:** %s\n' "$*" >>"$REPORT"; exit 1; }
note() { printf '%s\n' "$*" >>"$REPORT"; }
# run_stage NAME SECONDS CMD...: runs with a time limit; a failure or time-out is written to the report.
run_stage() {
  local name=$1 limit=$2
  shift 2
  say "$name (limit ${limit}s)"
  timeout --signal=INT --kill-after=15 "$limit" "$@"
  local rc=$?
  if [[ $rc -eq 0 ]]; then note "- $name: passed ($((SECONDS - START)) s into the run)"
  elif [[ $rc -eq 124 || $rc -eq 130 ]]; then note "- $name: **ran out of its ${limit} s limit**"
  else note "- $name: **failed** (exit $rc)"; fi
  return $rc
}

printf '# gpu_check (%s mode), %s\n\n' "$MODE" "$(date -u '+%Y-%m-%d %H:%M UTC')" >"$REPORT"

# --- Python with torch and CUDA (before anything is installed: a machine without a GPU stops here) --------------
has_cuda_torch() { "$1" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
  "$PY" -c 'import torch' 2>/dev/null || die "PYTHON=$PY cannot import torch"
elif command -v python3 >/dev/null && python3 -c 'import torch' 2>/dev/null; then
  PY="$(command -v python3)"
else
  say "no python with torch: creating .gpu-venv with $TORCH_PIN (needs PyPI)"
  [[ -x .gpu-venv/bin/python ]] || python3 -m venv .gpu-venv || die "could not create .gpu-venv"
  PY=.gpu-venv/bin/python
  "$PY" -c 'import torch' 2>/dev/null || "$PY" -m pip install -q $TORCH_PIN ||
    die "pip could not install $TORCH_PIN: set PYTHON to an interpreter that has torch"
fi
PY="$(command -v "$PY")" || die "python not found: $PY"
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
has_cuda_torch "$PY" ||
  die "torch.cuda.is_available() is False for $PY: run this on a machine with an NVIDIA GPU and driver"
GPU="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(), "sm_%d%d" % torch.cuda.get_device_capability())')"
TORCH="$("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
say "python $PY, torch $TORCH, GPU $GPU"
note "GPU: $GPU; torch $TORCH; python $("$PY" -c 'import sys; print(sys.version.split()[0])')"

# --- build requirements ---------------------------------------------------------------------------------------------
pip_q() { "$PY" -m pip install -q "$@"; }
for mod in scikit_build_core pybind11 pytest hypothesis numpy safetensors huggingface_hub; do
  "$PY" -c "import $mod" 2>/dev/null || pip_q "${mod//_/-}" || die "$PY lacks $mod and pip could not install it"
done
command -v cmake >/dev/null || pip_q cmake || die "cmake missing and pip could not install it"
command -v ninja >/dev/null || pip_q ninja || die "ninja missing and pip could not install it"
"$PY" - <<'EOF' 2>/dev/null || pip_q "$TIMM_RANGE" || die "could not install $TIMM_RANGE"
import sys, timm
major, minor, patch = (int(p) for p in timm.__version__.split(".")[:3])
sys.exit(0 if (1, 0, 31) <= (major, minor, patch) < (1, 1, 0) else 1)
EOF
note "timm $("$PY" -c 'import timm; print(timm.__version__)')"

if ! command -v nvcc >/dev/null; then
  for dir in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
    if [[ -x "$dir/nvcc" ]]; then export PATH="$dir:$PATH"; break; fi
  done
fi
command -v nvcc >/dev/null || die "nvcc not found: install the CUDA toolkit or put its bin/ on PATH"
export CUDACXX="${CUDACXX:-$(command -v nvcc)}"
if [[ -z "${DEPRUNE_CUDA_ARCHITECTURES:-}" ]]; then
  DEPRUNE_CUDA_ARCHITECTURES="$("$PY" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}-real")')"
  export DEPRUNE_CUDA_ARCHITECTURES
fi
say "building with $("$CUDACXX" --version | tail -1) for $DEPRUNE_CUDA_ARCHITECTURES"
# No build isolation (an offline GPU machine cannot fetch build requirements) and no dependency resolution (it must
# not replace the machine's torch).
DEPRUNE_CUDA=ON "$PY" -m pip install -q --no-build-isolation --no-deps . -C cmake.define.DEPRUNE_CUDA=ON ||
  die "build failed (see the CMake / nvcc output above)"
(cd /tmp && "$PY" -c '
import torch
from timm_deprune import _C
assert _C.cuda_compiled(), "the installed timm_deprune._C has no CUDA kernels"
n, t = _C.cuda_device_count(), torch.cuda.device_count()
assert n == t, f"_C sees {n} CUDA devices but torch sees {t}: driver older than the CUDA toolkit used to build?"
print("timm_deprune._C: CUDA kernels compiled,", n, "device(s)")
') || die "the installed extension cannot use the GPU"
note "build: $DEPRUNE_CUDA_ARCHITECTURES, $("$CUDACXX" --version | tail -1) ($((SECONDS - START)) s into the run)"
note ""
note "## Stages"

# --- tests (a newer library's deprecation warnings must not fail the suite's filterwarnings = error) ----------------
PYTEST=("$PY" -m pytest -p no:cacheprovider -q -W ignore::DeprecationWarning -W ignore::FutureWarning
        -W ignore::PendingDeprecationWarning)
run_stage "GPU tests" 150 "${PYTEST[@]}" -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log"
tail -3 "$OUT/gpu_tests.log" | sed 's/^/    /' >>"$REPORT"

SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
if [[ -n "$SANITIZER" ]]; then
  for tool in memcheck racecheck; do
    run_stage "compute-sanitizer $tool" 75 "$SANITIZER" --tool "$tool" --error-exitcode 99 --target-processes all \
      "${PYTEST[@]}" -m gpu tests/test_cuda_kernel.py -k "test_gpu_activations or test_gpu_runs_on_the_current_stream or vector_and_scalar" \
      >"$OUT/sanitizer_$tool.log" 2>&1
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/sanitizer_$tool.log" | tail -2 | sed 's/^/    /' \
      >>"$REPORT"
  done
else
  note "- compute-sanitizer: not on this machine, skipped"
fi

# --- benchmarks -------------------------------------------------------------------------------------------------------
if [[ $MODE == quick ]]; then LAYER_ARGS=(--repeats 7 --iters 10); MODEL_ARGS=(--repeats 5); LB=200; MB=110
else LAYER_ARGS=(--repeats 15 --iters 20); MODEL_ARGS=(--repeats 15); LB=1200; MB=1200; fi
run_stage "layer benchmark: our kernel vs cuDNN, DW layers of efficientnet_b0 and mobilenetv2_100" "$LB" \
  "$PY" scripts/gpu_bench.py --models efficientnet_b0 mobilenetv2_100 --batches 1 64 --dtypes fp16 fp32 \
  --keeps 1.0 0.29 --granularity element reordered block:8 "${LAYER_ARGS[@]}" --json "$OUT/gpu_bench.json" --markdown "$OUT/gpu_bench.md"
run_stage "model benchmark: whole models, cuDNN dense vs DEPrune-BH on our kernel" "$MB" \
  "$PY" scripts/benchmark.py model --device cuda --models mobilenetv2_100 efficientnet_b0 --batch 1 64 \
  "${MODEL_ARGS[@]}" --skip dense_compile dense_compile_freeze ours_block_compile ours_block_compile_freeze \
  --json "$OUT/gpu_model_bench.json" 2>&1 | tee "$OUT/gpu_model_bench.log"

note ""
if [[ -s "$OUT/gpu_bench.md" ]]; then note "## Depth-wise layers, summed"; note ""; cat "$OUT/gpu_bench.md" >>"$REPORT"; fi
if grep -q '^|' "$OUT/gpu_model_bench.log" 2>/dev/null; then
  note ""; note "## Whole models"; note ""; grep '^[|#]' "$OUT/gpu_model_bench.log" >>"$REPORT"
fi
say "done in $((SECONDS - START)) s; report: $REPORT"
cat "$REPORT"
