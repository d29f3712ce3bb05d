"""The GPU scripts on a machine without a GPU: gpu_check.sh stops at once with a clear reason (before it installs
anything) and writes that into its report; gpu_bench.py's summary and markdown tables from synthetic timings."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run for real")
def test_gpu_check_stops_without_a_gpu_and_says_why(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "torch.cuda.is_available() is False" in proc.stderr
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert report.startswith("# gpu_check (quick mode)") and "**gpu_check stopped:**" in report


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "scripts" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_bench", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _result(model, index, batch, dense_nchw, dense_cl, ours):
    ms = {"dense/nchw/dense": dense_nchw, "dense/cl/dense": dense_cl}
    for keep, (nchw, cl) in ours.items():
        ms[f"ours/nchw/{keep}"], ms[f"ours/cl/{keep}"] = nchw, cl
    return {"layer": {"model": model, "index": index}, "batch": batch, "dtype": "float16", "io_bytes": 10**6, "ms": ms}


def test_gpu_bench_sums_layers_and_compares_per_layout():
    gb = _gpu_bench()
    results = [_result("m", 0, 64, 2.0, 1.0, {0.29: (1.0, 0.5)}),
               _result("m", 1, 64, 4.0, 3.0, {0.29: (3.0, 1.5)})]
    header, row = gb.summary_rows(results, [0.29])
    cell = dict(zip(header, row))
    assert cell["dense nchw"] == "6.0000" and cell["dense cl"] == "4.0000" and cell["dense best"] == "4.0000"
    assert cell["ours nchw"] == "4.0000" and cell["ours cl"] == "2.0000" and cell["ours best"] == "2.0000"
    assert cell["nchw vs cuDNN nchw"] == "1.50x" and cell["cl vs cuDNN cl"] == "2.00x"
    assert cell["best vs best"] == "2.00x" and cell["keep"] == "29%"
    md = gb.markdown(results, [0.29], "title")
    lines = md.splitlines()
    assert lines[0] == "title" and lines[2].startswith("| model | dtype |") and len(lines) == 5
    assert lines[4].count("|") == len(header) + 1


def test_gpu_bench_mask_granularities():
    gb = _gpu_bench()
    from timm_deprune.kernels.plan import block_lanes

    weight = torch.randn(64, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    lanes = {}
    for gran in gb.GRANULARITIES:
        w, mask = gb.make_mask(weight, 0.29, gran)
        assert abs(float(mask.float().mean()) - 0.29) < 0.02, gran
        lanes[gran] = block_lanes(mask)
        if gran == "reordered":  # the same per-channel masks, channels permuted together with their weights
            assert sorted(w.flatten().tolist()) == sorted(weight.flatten().tolist()) and not torch.equal(w, weight)
    # per 8-channel block: block:8 masks run only kept taps, reordering shrinks the element masks' unions
    assert lanes["block:8"] < lanes["reordered"] < lanes["element"]
    results = [_result("m", 0, 64, 2.0, 1.0, {"0.29 block:8": (1.0, 0.25)})]
    header, row = gb.summary_rows(results, [(0.29, "block:8")])
    cell = dict(zip(header, row))
    assert cell["keep"] == "29% block:8" and cell["cl vs cuDNN cl"] == "4.00x"
