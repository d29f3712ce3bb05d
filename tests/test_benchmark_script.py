"""scripts/benchmark.py runs end to end on a small model (a smoke test: timings are not checked, only that every
variant ran, the ratios are consistent and the JSON / PNG outputs are written)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), *args], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_model_benchmark_writes_table_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = _run("model", "--models", "mobilenetv3_small_050", "--batch", "1", "--repeats", "1", "--skip",
               "dense_compile", "dense_compile_freeze", "ours_block_compile", "ours_block_compile_freeze", "dense_ort",
               "pruned_ort", "--json", str(tmp_path / "r.json"),
               "--plot", str(tmp_path / "r.png"))
    data = json.loads((tmp_path / "r.json").read_text())
    (row,) = data["rows"]
    assert row["model"] == "mobilenetv3_small_050" and row["batch"] == 1
    # tp_ort: Torch-Pruning at DEPrune-BH's MACs in ONNX Runtime (the test extra installs torch-pruning)
    tp = {"tp_ort"} if importlib.util.find_spec("torch_pruning") and importlib.util.find_spec("onnxruntime") else set()
    assert set(row["ms"]) == {"dense_nchw", "dense_cl", "masked_dense", "ours_element", "ours_block", "ours_native",
                              "ours_native_block"} | tp
    if tp:
        assert "| Torch-Pruning channel-pruned at DEPrune-BH's MACs, ONNX Runtime |" in out
    assert all(v > 0 for v in row["ms"].values())
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| DEPrune-BH optimised, element masks, native blocks (ours, default) |" in out


def test_dwconv_benchmark_with_block_masks(tmp_path):
    out = _run("dwconv", "--models", "mobilenetv3_small_050", "--batch", "1", "--keep", "0.29", "--repeats", "1",
               "--granularity", "block:8")
    assert "granularity block:8" in out and "| mobilenetv3_small_050 | 1 | 29% |" in out


def test_dwconv_benchmark_with_reordered_channels():
    out = _run("dwconv", "--models", "mobilenetv3_small_050", "--batch", "1", "--keep", "0.29", "--repeats", "1",
               "--reorder-channels")
    assert "channels reordered (block_channel_order)" in out and "| mobilenetv3_small_050 | 1 | 29% |" in out
    assert "| ours CL natural order ms | reordering gain |" in out


def test_kernels_benchmark_times_pointwise_shapes_and_blocks():
    out = _run("kernels", "--model", "mobilenetv3_small_050", "--batch", "1", "--repeats", "1")
    assert "peak = torch.mm 2048x2048" in out
    assert "| 1 | 56x56 | 16 | 8 | 3136 |" in out or "| 1 | 28x28 |" in out  # a point-wise row
    assert "| 1 | all blocks |" in out
