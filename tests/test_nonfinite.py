"""NaN and Inf inputs: every sparse path gives one answer (issue 15 item 4, ARCHITECTURE.md §5).

A pruned tap does not exist, so a NaN or Inf pixel reaches exactly the outputs whose *kept* taps read it: the CPU
NCHW kernel, the CPU channels_last kernel (which runs 8-channel blocks on the union of their kept taps and must skip
the lanes whose channel pruned the tap, every ISA) and the CUDA kernel's program (emulated) all agree with a
float64 reference that sums kept taps only. The masked dense conv (``set_execution(model, "dense")``, training,
export) multiplies pruned taps by an exact zero instead, and 0 * NaN is NaN there: documented, and checked here so
the difference stays the one documented.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from timm_deprune import build_plan, sparse_dwconv2d
from timm_deprune.kernels.activations import ACTIVATIONS
from timm_deprune.kernels.backend import load_extension
from timm_deprune.kernels.geometry import output_size
from timm_deprune.kernels.launch import CUDA_DTYPE_CODES

_C = load_extension()



def kept_taps_reference(x, weight, mask, bias, stride, pad):
    """float64: Σ over kept taps only (``torch.where`` drops a pruned tap's product, NaN or not), plus bias."""
    n, c, h, w = x.shape
    kh, kw = mask.shape[1:]
    cols = F.unfold(x.double(), (kh, kw), padding=pad, stride=stride).reshape(n, c, kh * kw, -1)
    prod = weight.double().reshape(1, c, kh * kw, 1) * cols
    prod = torch.where(mask.reshape(1, c, kh * kw, 1), prod, torch.zeros((), dtype=torch.float64))
    oh = output_size(h, kh, stride, 1, pad, pad)
    ow = output_size(w, kw, stride, 1, pad, pad)
    return (prod.sum(2) + bias.double().view(1, c, 1)).reshape(n, c, oh, ow)


def assert_same_nonfinite(y: torch.Tensor, ref: torch.Tensor, info: str) -> None:
    """Same NaN positions, same ±Inf positions, finite elements within fp32 rounding."""
    y = y.double()
    assert torch.equal(y.isnan(), ref.isnan()), (
        f"{info}: {int(y.isnan().sum())} NaN outputs, the kept taps give {int(ref.isnan().sum())}")
    assert torch.equal(y.isposinf(), ref.isposinf()) and torch.equal(y.isneginf(), ref.isneginf()), (
        f"{info}: Inf outputs differ from the kept-tap reference")
    fin = ref.isfinite()
    assert fin.any(), "the case must leave finite outputs to compare"
    err = (y[fin] - ref[fin]).abs().max().item()
    assert err <= 1e-5 * max(1.0, ref[fin].abs().max().item()), f"{info}: max error {err:.3g} on finite outputs"


def make_case(gen, c: int, block_masks: bool, special: float):
    """16x16 input with a few non-finite pixels spread over channels and borders; ~50% of the taps kept."""
    weight = torch.randn(c, 1, 3, 3, generator=gen)
    if block_masks:  # granularity="block:8": 8 consecutive channels share one pattern
        mask = (torch.rand(-(-c // 8), 3, 3, generator=gen) < 0.5).repeat_interleave(8, 0)[:c]
    else:
        mask = torch.rand(c, 3, 3, generator=gen) < 0.5
    bias = torch.randn(c, generator=gen)
    x = torch.randn(2, c, 16, 16, generator=gen)
    for i in range(6):
        n, ch = i % 2, int(torch.randint(c, (1,), generator=gen))
        yy, xx = int(torch.randint(16, (1,), generator=gen)), int(torch.randint(16, (1,), generator=gen))
        x[n, ch, yy, xx] = special if i % 3 else -special
    x[0, 0, 0, 0] = special  # a corner: read only by border outputs
    return x, weight, mask, bias


SPECIALS = [float("nan"), float("inf")]


@pytest.mark.parametrize("special", SPECIALS, ids=["nan", "inf"])
@pytest.mark.parametrize("block_masks", [False, True], ids=["element", "block8"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("stride", [1, 2])
def test_cpu_paths_skip_pruned_taps(gen, isa, layout, block_masks, special, stride):
    x, weight, mask, bias = make_case(gen, 21, block_masks, special)  # 21: a partial 8-channel block
    ref = kept_taps_reference(x, weight, mask, bias, stride, 1)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = sparse_dwconv2d(x, build_plan(weight, mask), bias, "identity", stride, 1)
    assert_same_nonfinite(y, ref, f"{layout} {isa}")


@pytest.mark.parametrize("special", SPECIALS, ids=["nan", "inf"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_program_skips_pruned_taps(gen, channels_last, special):
    x, weight, mask, bias = make_case(gen, 40, False, special)
    ref = kept_taps_reference(x, weight, mask, bias, 1, 1)
    plan = build_plan(weight, mask)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    y = torch.full(ref.shape, 1234.5, dtype=torch.float32).contiguous(memory_format=fmt)
    launch = _C.Launch(N=2, C=40, H=16, W=16, OH=16, OW=16, kh=3, kw=3, stride=(1, 1), dilation=(1, 1), pad_top=1,
                       pad_left=1, activation=ACTIVATIONS["identity"], layout=int(channels_last))
    _C.dwconv2d_cuda_emulate(x.data_ptr(), y.data_ptr(), plan.offsets.data_ptr(), plan.taps.data_ptr(),
                             plan.values.data_ptr(), plan.block_offsets.data_ptr(), plan.block_taps.data_ptr(),
                             plan.block_values.data_ptr(), bias.data_ptr(), launch, CUDA_DTYPE_CODES[torch.float32])
    assert_same_nonfinite(y, ref, "CUDA program (emulated)")


def test_sparse_layouts_agree_and_masked_dense_differs_as_documented(gen):
    x, weight, mask, bias = make_case(gen, 16, False, float("nan"))
    plan = build_plan(weight, mask)
    with torch.no_grad():
        nchw = sparse_dwconv2d(x, plan, bias, "identity", 1, 1)
        cl = sparse_dwconv2d(x.contiguous(memory_format=torch.channels_last), plan, bias, "identity", 1, 1)
        dense = F.conv2d(x, weight * mask.unsqueeze(1), bias, 1, 1, 1, 16)
    assert torch.equal(nchw.isnan(), cl.isnan())
    # The masked dense conv spreads NaN through zero weights: a superset of the sparse paths' NaN, and larger here.
    assert bool((dense.isnan() | ~nchw.isnan()).all())
    assert int(dense.isnan().sum()) > int(nchw.isnan().sum())


def test_plan_marks_pruned_block_lanes_with_negative_zero():
    """The channels_last plan's block weights: -0.0 on pruned (and padding) lanes, kept zero weights +0.0."""
    w = torch.zeros(10, 1, 1, 2)
    w[:, 0, 0, 1] = torch.arange(1.0, 11.0)
    mask = torch.zeros(10, 1, 2, dtype=torch.bool)
    mask[:5, 0, 0] = True   # kept taps whose weight is exactly zero (also -0.0 given)
    mask[:, 0, 1] = True
    w[:5, 0, 0, 0] = -0.0
    plan = build_plan(w, mask)
    vals = plan.block_values.reshape(-1, 8)  # one row per (block, tap) entry, 8 lanes
    signs = torch.signbit(vals) & (vals == 0)
    taps = plan.block_taps.tolist()
    first_tap_rows = [i for i, t in enumerate(taps) if t == 0]
    assert first_tap_rows, "tap 0 is kept by channels 0-4: the plan must hold it"
    row0 = vals[first_tap_rows[0]]
    assert not torch.signbit(row0[:5]).any(), "kept zero weights must be +0.0 (they read the input)"
    assert signs[first_tap_rows[0], 5:].all(), "channels 5-7 pruned tap 0: their lanes must be -0.0"
    last = vals[-1]  # block 1, tap 1: channels 8 and 9 keep it, lanes 2-7 lie past the 10 channels
    assert torch.equal(last[:2], torch.tensor([9.0, 10.0])) and signs[-1, 2:].all()
