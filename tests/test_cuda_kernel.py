"""The CUDA sparse depth-wise conv kernel against a float64 reference.

The host emulation (``_C.dwconv2d_cuda_emulate``) runs the kernels' block programs (NCHW and channels_last) block
by block on the CPU, so their index math is checked on every machine; tests marked ``gpu`` run the real kernel through ``sparse_dwconv2d``.
Every test draws fresh random data; the seed is printed on failure (set ``DEPRUNE_TEST_SEED`` to replay one).
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REFERENCE_ACTIVATIONS, assert_matches_reference, reference_dwconv
from timm_deprune import sparse_dwconv2d
from timm_deprune.kernels.backend import load_extension
from timm_deprune.kernels.activations import ACTIVATIONS
from timm_deprune.kernels.geometry import output_size, resolve_padding
from timm_deprune.kernels.launch import CUDA_DTYPE_CODES, launch
from timm_deprune.kernels.plan import GROUP_SIZE, build_plan

_C = load_extension()

KERNELS = [(1, 1), (3, 3), (5, 5), (7, 7), (1, 9), (9, 1), (11, 11), (2, 4)]
MASK_KINDS = ["random", "balanced", "hsr", "extremes", "dense", "empty"]


def _gpu_skip_reason() -> Optional[str]:
    if not torch.cuda.is_available():
        return "needs a CUDA device: torch.cuda.is_available() is False"
    if not _C.cuda_compiled():
        return "timm_deprune._C was built without CUDA kernels (rebuild with -C cmake.define.DEPRUNE_CUDA=ON)"
    return None


requires_gpu = pytest.mark.skipif(_gpu_skip_reason() is not None, reason=_gpu_skip_reason() or "")


@pytest.fixture
def seed() -> int:
    """A fresh seed per test; DEPRUNE_TEST_SEED replays a failure."""
    return int(os.environ.get("DEPRUNE_TEST_SEED", random.SystemRandom().getrandbits(31)))


def make_mask(gen: torch.Generator, weight: torch.Tensor, kind: str, keep: float = 0.5) -> torch.Tensor:
    """Tap mask ``[C, kh, kw]`` of one of MASK_KINDS (``keep`` is the kept fraction where it applies)."""
    C, _, kh, kw = weight.shape
    K = kh * kw
    if kind == "dense":
        return torch.ones(C, kh, kw, dtype=torch.bool)
    if kind == "empty":
        return torch.zeros(C, kh, kw, dtype=torch.bool)
    if kind in ("random", "extremes"):
        rate = torch.rand(C, 1, 1, generator=gen)  # per-channel keep rates: unbalanced groups
        mask = torch.rand(C, kh, kw, generator=gen) < rate
        if kind == "extremes":
            mask[0::3] = False  # all-pruned channels
            mask[1::3] = True  # all-kept channels
        return mask
    if kind in ("balanced", "hsr"):
        # BWT: rank |w| within each 32-channel group, every full group keeps the same count; 'hsr' rounds the
        # group's count to whole tiles of 32 taps.
        scores = weight.detach().abs().reshape(C, K)
        mask = torch.zeros(C, K, dtype=torch.bool)
        for g0 in range(0, C, GROUP_SIZE):
            block = scores[g0:g0 + GROUP_SIZE].reshape(-1)
            count = round(keep * block.numel())
            if kind == "hsr":
                count = min(round(count / 32) * 32, block.numel())
            kept = torch.zeros(block.numel(), dtype=torch.bool)
            kept[torch.topk(block, count).indices] = True
            mask[g0:g0 + GROUP_SIZE] = kept.reshape(-1, K)
        return mask.reshape(C, kh, kw)
    raise ValueError(f"unknown mask kind {kind!r}")


@dataclass
class Case:
    N: int = 2
    C: int = 33
    H: int = 9
    W: int = 11
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    padding: str | tuple[int, int, int, int] = "sym"  # 'sym', 'valid', 'same' or (top, bottom, left, right)
    mask: str = "random"
    keep: float = 0.5
    act: str = "identity"
    bias: bool = True
    channels_last: bool = False

    def pads(self) -> tuple[int, int, int, int]:
        (kh, kw), (dh, dw), (sh, sw) = self.kernel, self.dilation, self.stride
        if self.padding == "sym":
            return (dh * (kh - 1) // 2,) * 2 + (dw * (kw - 1) // 2,) * 2
        if self.padding == "valid":
            return 0, 0, 0, 0
        if self.padding == "same":  # TF SAME, asymmetric for even extents / stride 2
            return resolve_padding("same", self.kernel, self.stride, self.dilation, (self.H, self.W))
        return tuple(self.padding)

    def make(self, gen: torch.Generator):
        kh, kw = self.kernel
        x = torch.randn(self.N, self.C, self.H, self.W, generator=gen)
        weight = torch.randn(self.C, 1, kh, kw, generator=gen)
        mask = make_mask(gen, weight, self.mask, self.keep)
        bias = torch.randn(self.C, generator=gen) if self.bias else None
        return x, weight, mask, bias


def emulate(case: Case, x: torch.Tensor, plan, bias: Optional[torch.Tensor], dtype: torch.dtype,
            sms: int = 132, offset: int = 0) -> torch.Tensor:
    """The CUDA kernel's program run by ``_C.dwconv2d_cuda_emulate`` on ``x`` (NCHW, converted to ``dtype`` and
    ``case``'s layout); the output starts as NaN, so an element the kernel never writes stays NaN. ``sms`` stands for
    the GPU's multiprocessor count (it sets the channels_last geometry); ``offset`` > 0 places x and y that many
    elements into their buffers, so they are not 16-byte aligned (the channels_last kernel's scalar path)."""
    pads = case.pads()
    (kh, kw), (sh, sw), (dh, dw) = case.kernel, case.stride, case.dilation
    oh = output_size(case.H, kh, sh, dh, pads[0], pads[1])
    ow = output_size(case.W, kw, sw, dw, pads[2], pads[3])
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    x = _offset_copy(x.to(dtype).contiguous(memory_format=fmt), offset, fmt)
    y = _offset_copy(torch.full((case.N, case.C, oh, ow), float("nan"), dtype=dtype), offset, fmt)
    launch = _C.Launch(N=case.N, C=case.C, H=case.H, W=case.W, OH=oh, OW=ow, kh=kh, kw=kw, stride=(sh, sw),
                       dilation=(dh, dw), pad_top=pads[0], pad_left=pads[2], activation=ACTIVATIONS[case.act],
                       layout=int(case.channels_last))
    _C.dwconv2d_cuda_emulate(
        x.data_ptr(), y.data_ptr(), plan.offsets.data_ptr(), plan.taps.data_ptr(), plan.values.data_ptr(),
        plan.block_offsets.data_ptr(), plan.block_taps.data_ptr(), plan.block_values.data_ptr(),
        bias.data_ptr() if bias is not None else 0, launch, CUDA_DTYPE_CODES[dtype], sms,
    )
    assert y.is_contiguous(memory_format=fmt)
    return y


def _offset_copy(t: torch.Tensor, offset: int, fmt) -> torch.Tensor:
    """``t`` copied into a buffer at element ``offset`` (same layout): misaligned by ``offset`` elements."""
    if offset == 0:
        return t.contiguous(memory_format=fmt)
    n, c, h, w = t.shape
    strides = (c * h * w, 1, w * c, c) if fmt == torch.channels_last else (c * h * w, h * w, w, 1)
    buf = torch.full((t.numel() + offset,), float("nan"), dtype=t.dtype, device=t.device)
    view = buf.as_strided(t.shape, strides, offset)
    view.copy_(t)
    return view


# Unit roundoff of the IO types: a correctly rounded output is within u * |exact| of the exact value.
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def assert_matches_reference_rounded(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, info: str) -> None:
    """fp16 / bf16 outputs element by element: |y - ref| <= u·|ref| (the output's own rounding) + 1e-5·max|ref|
    (fp32 accumulation), so a dropped or extra tap shows even where it is small next to the layer's largest output."""
    assert y.shape == ref.shape and not torch.isnan(y).any(), f"NaN or wrong shape {info}"
    err = (y.double() - ref).abs()
    tol = UNIT_ROUNDOFF[dtype] * 1.001 * ref.abs() + 1e-5 * max(1.0, ref.abs().max().item())
    bad = err > tol
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} {dtype} outputs are off by more than their rounding,"
                           f" worst {float((err - tol).max()):.3g} over {info}")


def run_emulation(case: Case, gen: torch.Generator, seed: int, dtype: torch.dtype = torch.float32, sms: int = 132,
                  offset: int = 0) -> None:
    """Emulated kernel against the float64 reference (on the input rounded to ``dtype``)."""
    x, weight, mask, bias = case.make(gen)
    x = x.to(dtype).float()  # the reference sees the same rounded input
    plan = build_plan(weight, mask)
    ref = reference_dwconv(x, weight, mask, bias, case.stride, case.pads(), case.dilation, case.act)
    y = emulate(case, x, plan, bias, dtype, sms, offset)
    assert y.dtype == dtype
    if dtype == torch.float32:
        assert_matches_reference(y, ref, 1e-5, f"{case} seed={seed}")
    else:
        assert_matches_reference_rounded(y.float(), ref, dtype, f"{case} seed={seed}")


# --- emulation of the CUDA grid on the CPU (always run) -------------------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"{k[0]}x{k[1]}")
def test_emulation_kernel_sizes(kernel, stride, channels_last, seed):
    gen = torch.Generator().manual_seed(seed)
    run_emulation(Case(kernel=kernel, stride=(stride, stride), H=13, W=12, channels_last=channels_last), gen, seed)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("mask", MASK_KINDS)
@pytest.mark.parametrize("C", [1, 31, 32, 33, 70])
def test_emulation_channels_and_masks(C, mask, channels_last, seed):
    gen = torch.Generator().manual_seed(seed)
    run_emulation(Case(C=C, mask=mask, keep=0.29, channels_last=channels_last), gen, seed)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_emulation_activations(act, bias, channels_last, seed):
    gen = torch.Generator().manual_seed(seed)
    run_emulation(Case(act=act, bias=bias, mask="extremes", channels_last=channels_last), gen, seed)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize(
    "kernel,stride,dilation,padding",
    [
        ((3, 3), (1, 1), (2, 2), "sym"),
        ((5, 5), (2, 2), (2, 2), "sym"),
        ((3, 5), (2, 1), (1, 2), "sym"),
        ((3, 3), (2, 2), (1, 1), "same"),  # asymmetric: the extra row/column goes bottom/right
        ((5, 5), (2, 2), (1, 1), "same"),
        ((4, 4), (1, 1), (1, 1), "same"),
        ((3, 3), (1, 1), (1, 1), "valid"),
        ((5, 3), (1, 2), (1, 1), (0, 4, 2, 0)),
        ((7, 7), (2, 2), (2, 1), (12, 1, 0, 6)),
        ((3, 3), (1, 2), (1, 1), (2, 0, 1, 2)),
    ],
    ids=str,
)
def test_emulation_stride_dilation_padding(kernel, stride, dilation, padding, channels_last, seed):
    gen = torch.Generator().manual_seed(seed)
    case = Case(N=1, C=40, H=11, W=14, kernel=kernel, stride=stride, dilation=dilation, padding=padding,
                mask="balanced", channels_last=channels_last)
    run_emulation(case, gen, seed)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize(
    "N,H,W,kernel",
    [
        (1, 1, 1, (3, 3)),  # every tap but the centre reads padding
        (3, 1, 1, (1, 1)),
        (3, 1, 13, (3, 3)),
        (1, 7, 5, (5, 5)),
        (3, 19, 23, (3, 3)),  # several spatial tiles per block row, with a ragged last tile
        (1, 37, 3, (3, 3)),
    ],
    ids=str,
)
def test_emulation_spatial_sizes_and_batch(N, H, W, kernel, channels_last, seed):
    gen = torch.Generator().manual_seed(seed)
    run_emulation(Case(N=N, C=35, H=H, W=W, kernel=kernel, channels_last=channels_last), gen, seed)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("kernel", [(9, 9), (11, 11)], ids=lambda k: f"{k[0]}x{k[1]}")
def test_emulation_group_list_staged_in_chunks(kernel, channels_last, seed):
    # A dense 9x9 / 11x11 group holds 2592 / 3872 taps: more than one shared-memory chunk.
    gen = torch.Generator().manual_seed(seed)
    run_emulation(Case(N=1, C=64, H=12, W=10, kernel=kernel, mask="dense", channels_last=channels_last), gen, seed)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_emulation_random_shapes(data):
    kh, kw = data.draw(st.integers(1, 11), label="kh"), data.draw(st.integers(1, 11), label="kw")
    sh, sw = data.draw(st.sampled_from([1, 2]), label="sh"), data.draw(st.sampled_from([1, 2]), label="sw")
    dh, dw = data.draw(st.sampled_from([1, 2]), label="dh"), data.draw(st.sampled_from([1, 2]), label="dw")
    pads = tuple(data.draw(st.integers(0, e), label=name)
                 for name, e in (("top", dh * (kh - 1)), ("bottom", dh * (kh - 1)),
                                 ("left", dw * (kw - 1)), ("right", dw * (kw - 1))))
    # Inputs at least as large as the padded kernel extent, so the output is never empty.
    h_min = max(1, dh * (kh - 1) + 1 - pads[0] - pads[1])
    w_min = max(1, dw * (kw - 1) + 1 - pads[2] - pads[3])
    H, W = data.draw(st.integers(h_min, h_min + 12), label="H"), data.draw(st.integers(w_min, w_min + 12), label="W")
    case = Case(
        N=data.draw(st.integers(1, 3), label="N"), C=data.draw(st.integers(1, 70), label="C"), H=H, W=W,
        kernel=(kh, kw), stride=(sh, sw), dilation=(dh, dw), padding=pads,
        mask=data.draw(st.sampled_from(MASK_KINDS), label="mask"), keep=data.draw(st.floats(0.0, 1.0), label="keep"),
        act=data.draw(st.sampled_from(list(ACTIVATIONS)), label="act"), bias=data.draw(st.booleans(), label="bias"),
        channels_last=data.draw(st.booleans(), label="channels_last"),
    )
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    run_emulation(case, torch.Generator().manual_seed(seed), seed)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [
    Case(),
    Case(N=1, C=70, H=19, W=23, kernel=(5, 5), stride=(2, 2), mask="balanced", act="silu"),
    Case(N=1, C=64, H=12, W=10, kernel=(11, 11), mask="dense", act="relu6"),  # chunked group lists
], ids=lambda c: f"C{c.C}-{c.kernel[0]}x{c.kernel[1]}-{c.mask}-{c.act}")
def test_emulation_half_io(case, dtype, channels_last, seed):
    case = Case(**{**case.__dict__, "channels_last": channels_last})
    run_emulation(case, torch.Generator().manual_seed(seed), seed, dtype)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale", [1.0, 1e-6, 1e4], ids=["normal", "subnormal", "overflow"])
def test_emulation_half_io_rounds_like_torch(scale, dtype, channels_last, seed):
    # The kernel accumulates in fp32 whatever the IO type, so its fp16 / bf16 output must be, bit for bit, its fp32
    # output of the same (rounded) input converted by torch (round to nearest even), subnormals and inf included.
    gen = torch.Generator().manual_seed(seed)
    case = Case(N=2, C=40, H=9, W=11, kernel=(3, 3), mask="random", channels_last=channels_last)
    x, weight, mask, bias = case.make(gen)
    x = (x.clamp(-6, 6) * scale).to(dtype).float()  # finite inputs (fp16 ends at 65504); sums of them may overflow
    plan = build_plan(weight, mask)
    bias = bias * scale
    y = emulate(case, x, plan, bias, dtype)
    expected = emulate(case, x, plan, bias, torch.float32).to(dtype)
    assert not torch.isnan(expected).any()
    if dtype == torch.float16 and scale != 1.0:  # the regime the case is named for is reached
        reached = torch.isinf(expected) if scale > 1 else (expected != 0) & (expected.abs() < 2.0**-14)
        assert reached.any(), f"no {'inf' if scale > 1 else 'subnormal'} output at scale {scale} (seed={seed})"
    same = y.view(torch.int16) == expected.view(torch.int16)
    assert same.all(), (
        f"{int((~same).sum())} of {same.numel()} {dtype} outputs differ from torch's rounding of the fp32 result,"
        f" e.g. {y[~same][:4].tolist()} vs {expected[~same][:4].tolist()} (scale={scale}, seed={seed})")


def run_pointwise_emulation(case: Case, seed: int) -> None:
    """A 1x1 kernel on 1x1 images: the float64 reference is x * kept weight + bias, without a grouped conv (which
    takes seconds at 2M channels)."""
    assert case.kernel == (1, 1) and case.H == case.W == 1 and case.bias
    x, weight, mask, bias = case.make(torch.Generator().manual_seed(seed))
    plan = build_plan(weight, mask)
    kept = (weight.double() * mask.unsqueeze(1).double()).view(1, case.C, 1, 1)
    ref = REFERENCE_ACTIVATIONS[case.act](x.double() * kept + bias.double().view(1, -1, 1, 1))
    y = emulate(case, x, plan, bias, torch.float32)
    assert_matches_reference(y, ref, 1e-5, f"{case} seed={seed}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_emulation_splits_more_than_65535_images(channels_last, seed):
    # NCHW: grid z holds at most 65535 images, so N = 65537 takes two launches, the second starting at n_base =
    # 65535. channels_last: the images are strips of grid x (65537 strips).
    case = Case(N=65537, C=3, H=1, W=1, kernel=(1, 1), mask="random", keep=0.7, act="relu6",
                channels_last=channels_last)
    run_pointwise_emulation(case, seed)


def test_emulation_splits_more_than_65535_groups(seed):
    # NCHW grid y holds at most 65535 groups of 32 channels: 65537 groups take two launches (group_base = 65535); the
    # last group is ragged (5 channels).
    case = Case(N=1, C=65536 * 32 + 5, H=1, W=1, kernel=(1, 1), mask="random", keep=0.7, act="hardswish")
    run_pointwise_emulation(case, seed)


def test_emulation_splits_more_than_65535_channel_tiles(seed):
    # channels_last grid y holds at most 65535 tiles of 32 channel blocks (256 channels): 65537 tiles take two
    # launches (ctile_base = 65535); the last tile is ragged (one channel block of 5 channels: the scalar path).
    case = Case(N=1, C=65536 * 256 + 5, H=1, W=1, kernel=(1, 1), mask="random", keep=0.7, act="relu",
                channels_last=True)
    run_pointwise_emulation(case, seed)


def test_emulation_rejects_a_bad_dtype_code():
    with pytest.raises(ValueError, match="dtype code must be 0, 1 or 2, got 3"):
        _C.dwconv2d_cuda_emulate(0, 0, 0, 0, 0, 0, 0, 0, 0, _ONE_PIXEL, 3)


_ONE_PIXEL = _C.Launch(N=1, C=1, H=3, W=3, OH=1, OW=1, kh=3, kw=3, stride=(1, 1), dilation=(1, 1), pad_top=0,
                       pad_left=0, activation=0, layout=0)


@pytest.mark.parametrize("field, value, says", [
    ("C", 0, "sizes must be >= 1, got N=1 C=0"), ("kh", 0, "kernel/stride/dilation must be >= 1"),
    ("pad_top", -1, "padding >= 0"), ("activation", 9, "activation code must be in"), ("layout", 2, "layout must be"),
])
def test_launch_struct_checks_its_fields(field, value, says):
    fields = dict(N=1, C=1, H=3, W=3, OH=1, OW=1, kh=3, kw=3, stride=(1, 1), dilation=(1, 1), pad_top=0, pad_left=0,
                  activation=0, layout=0)
    with pytest.raises(ValueError, match=re.escape(says)):
        _C.Launch(**{**fields, field: value})
    assert _C.Launch(**fields).shape == (1, 1, 3, 3, 1, 1)


def test_emulation_rejects_null_pointers():
    with pytest.raises(ValueError, match="null"):
        _C.dwconv2d_cuda_emulate(0, 0, 0, 0, 0, 0, 0, 0, 0, _ONE_PIXEL)


@pytest.mark.skipif(_C.cuda_device_count() > 0, reason="a CUDA device is visible: the GPU tests cover the launch")
def test_cuda_entry_point_raises_without_a_device():
    # Without CUDA kernels (or with them but no usable device) the call raises; it must never crash.
    x = torch.zeros(1, 1, 3, 3)
    plan = build_plan(torch.ones(1, 1, 3, 3), torch.ones(1, 3, 3, dtype=torch.bool))
    expected = r"cuda(Get|Set)Device.*failed" if _C.cuda_compiled() else "built without CUDA kernels"
    with pytest.raises(RuntimeError, match=expected):
        _C.dwconv2d_cuda(x.data_ptr(), x.data_ptr(), plan.offsets.data_ptr(), plan.taps.data_ptr(),
                         plan.values.data_ptr(), plan.block_offsets.data_ptr(), plan.block_taps.data_ptr(),
                         plan.block_values.data_ptr(), 0, _ONE_PIXEL, 0, 0, 0)


# --- the kernel on a GPU ---------------------------------------------------------------------------------------

GPU_CASES = [
    Case(),
    Case(N=1, C=1, H=1, W=1, kernel=(3, 3)),
    Case(N=3, C=70, H=19, W=23, kernel=(5, 5), stride=(2, 2), mask="balanced"),
    Case(C=31, kernel=(7, 7), dilation=(2, 2), H=15, W=16, mask="extremes", act="relu6"),
    Case(C=64, kernel=(11, 11), mask="dense", H=12, W=13, act="silu"),  # chunked group lists
    Case(C=96, H=56, W=56, kernel=(3, 3), stride=(2, 2), padding="same", mask="hsr", act="hardswish"),
    Case(C=48, kernel=(1, 9), padding=(0, 0, 4, 4), mask="random", act="gelu", bias=False),
    Case(C=40, kernel=(9, 1), stride=(1, 2), padding=(3, 5, 0, 0), mask="empty", act="relu"),
]


def run_gpu(case: Case, dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, weight, mask, bias = case.make(gen)
    x = x.to(dtype)  # the reference sees the same rounded input
    pads = case.pads()
    ref = reference_dwconv(x, weight, mask, bias, case.stride, pads, case.dilation, case.act)
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    plan = build_plan(weight.cuda(), mask.cuda())
    bias = bias.cuda() if bias is not None else None
    top, bottom, left, right = pads
    y = sparse_dwconv2d(x.cuda().contiguous(memory_format=fmt), plan, bias, case.act, case.stride,
                        (left, right, top, bottom), case.dilation)
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=fmt)
    # The same launch into an output filled with NaN: an element the kernel never writes stays NaN and fails below.
    poisoned = torch.full(y.shape, float("nan"), dtype=dtype, device="cuda").contiguous(memory_format=fmt)
    xin = x.cuda().contiguous(memory_format=fmt)
    launch(xin, poisoned, plan.offsets, plan.taps, plan.values, plan.block_offsets, plan.block_taps,
           plan.block_values, bias, *case.kernel, list(case.stride), list(pads), list(case.dilation),
           ACTIVATIONS[case.act])
    for out in (y, poisoned):
        if dtype == torch.float32:
            assert_matches_reference(out.cpu(), ref, 1e-5, f"{case} seed={seed}")
        else:
            assert_matches_reference_rounded(out.cpu().float(), ref, dtype, f"{case} seed={seed}")


@pytest.mark.gpu
@requires_gpu
def test_gpu_extension_sees_torch_devices():
    assert _C.cuda_device_count() == torch.cuda.device_count(), (
        f"_C sees {_C.cuda_device_count()} CUDA devices, torch sees {torch.cuda.device_count()}: is the driver"
        " older than the CUDA toolkit the extension was built with?"
    )


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"C{c.C}-{c.kernel[0]}x{c.kernel[1]}-s{c.stride[0]}"
                         f"-d{c.dilation[0]}-{c.mask}-{c.act}")
def test_gpu_matches_reference(case, dtype, channels_last, seed):
    case = Case(**{**case.__dict__, "channels_last": channels_last})
    run_gpu(case, dtype, seed)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_gpu_activations(act, seed):
    run_gpu(Case(act=act, mask="extremes"), torch.float32, seed)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gpu_runs_on_the_current_stream(channels_last, seed):
    # The side stream sleeps, then overwrites x: only a kernel queued behind the copy on that stream sees the new x.
    gen = torch.Generator().manual_seed(seed)
    case = Case(N=4, C=64, H=28, W=28, mask="balanced", channels_last=channels_last)
    old, weight, mask, bias = case.make(gen)
    new = torch.randn(old.shape, generator=gen)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xd = old.cuda().contiguous(memory_format=fmt)
    new_d = new.cuda().contiguous(memory_format=fmt)
    plan, bias_d = build_plan(weight.cuda(), mask.cuda()), bias.cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(100_000_000)
        xd.copy_(new_d)
        y = sparse_dwconv2d(xd, plan, bias_d, padding=1)
    torch.cuda.synchronize()
    ref = reference_dwconv(new, weight, mask, bias, (1, 1), case.pads(), (1, 1), "identity")
    assert_matches_reference(y.cpu(), ref, 1e-5, f"{case} seed={seed}")


@pytest.mark.gpu
@requires_gpu
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_gpu_random_shapes(data):
    kh, kw = data.draw(st.integers(1, 11), label="kh"), data.draw(st.integers(1, 11), label="kw")
    sh, sw = data.draw(st.sampled_from([1, 2]), label="sh"), data.draw(st.sampled_from([1, 2]), label="sw")
    dh, dw = data.draw(st.sampled_from([1, 2]), label="dh"), data.draw(st.sampled_from([1, 2]), label="dw")
    pads = tuple(data.draw(st.integers(0, e)) for e in (dh * (kh - 1), dh * (kh - 1), dw * (kw - 1), dw * (kw - 1)))
    h_min = max(1, dh * (kh - 1) + 1 - pads[0] - pads[1])
    w_min = max(1, dw * (kw - 1) + 1 - pads[2] - pads[3])
    H, W = data.draw(st.integers(h_min, h_min + 40), label="H"), data.draw(st.integers(w_min, w_min + 40), label="W")
    case = Case(
        N=data.draw(st.integers(1, 4), label="N"), C=data.draw(st.integers(1, 200), label="C"), H=H, W=W,
        kernel=(kh, kw), stride=(sh, sw), dilation=(dh, dw), padding=pads,
        mask=data.draw(st.sampled_from(MASK_KINDS), label="mask"), keep=data.draw(st.floats(0.0, 1.0), label="keep"),
        act=data.draw(st.sampled_from(list(ACTIVATIONS)), label="act"), bias=data.draw(st.booleans(), label="bias"),
        channels_last=data.draw(st.booleans(), label="channels_last"),
    )
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), label="dtype")
    run_gpu(case, dtype, data.draw(st.integers(0, 2**31 - 1), label="seed"))


@pytest.mark.gpu
@requires_gpu
def test_gpu_device_mismatch_is_an_error():
    weight = torch.randn(8, 1, 3, 3)
    plan = build_plan(weight, torch.ones(8, 3, 3, dtype=torch.bool))
    x = torch.randn(1, 8, 5, 5, device="cuda")
    with pytest.raises(ValueError, match="input is on cuda:0 but the plan is on cpu"):
        sparse_dwconv2d(x, plan)
    with pytest.raises(ValueError, match="bias is on cpu but the input is on cuda"):
        sparse_dwconv2d(x, plan.to(x.device), bias=torch.zeros(8))
    with pytest.raises(ValueError, match="but the plan is on cuda"):
        sparse_dwconv2d(x.cpu(), plan.to(x.device))


# --- channels_last geometry: every strip / threads / strips-per-thread choice of make_cl_params ---------------------

@pytest.mark.parametrize("sms", [1, 132, 1 << 20], ids=["few-sms", "h100", "many-sms"])
@pytest.mark.parametrize("C, kernel, stride, N, H, W", [
    (64, (3, 3), (1, 1), 2, 9, 11),      # vector path, several strips per row and a partial last strip
    (96, (5, 5), (2, 2), 3, 17, 6),      # stride 2, OW = 3: one strip per row
    (8, (3, 3), (1, 1), 5, 30, 30),      # one channel block: many slots, several strips per thread
    (33, (3, 3), (1, 1), 2, 9, 11),      # ragged last block: the scalar path
    (264, (7, 7), (1, 1), 1, 7, 7),      # 7x7: 20 channel blocks per tile, two tiles (the second ragged)
    (72, (11, 11), (1, 1), 1, 12, 13),   # 11x11: 8 channel blocks per tile (shared memory)
])
def test_emulation_channels_last_geometry(sms, C, kernel, stride, N, H, W, seed):
    gen = torch.Generator().manual_seed(seed)
    case = Case(N=N, C=C, H=H, W=W, kernel=kernel, stride=stride, mask="random", act="silu", channels_last=True)
    run_emulation(case, gen, seed, sms=sms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_emulation_channels_last_unaligned_buffers(dtype, seed):
    # x and y one element into their buffers: not 16-byte aligned, so the kernel takes its per-lane path even though
    # C is a multiple of 8.
    case = Case(N=2, C=48, H=10, W=9, kernel=(3, 3), mask="balanced", keep=0.29, channels_last=True)
    run_emulation(case, torch.Generator().manual_seed(seed), seed, dtype, offset=1)


def test_emulation_rejects_a_bad_sms():
    with pytest.raises(ValueError, match="sms must be >= 1, got 0"):
        _C.dwconv2d_cuda_emulate(0, 0, 0, 0, 0, 0, 0, 0, 0, _ONE_PIXEL, 0, 0)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_gpu_channels_last_vector_and_scalar_paths(dtype, offset, seed):
    # C = 64 with 16-byte aligned buffers runs the vector loads; one element off, the per-lane path. Both must match.
    case = Case(N=3, C=64, H=20, W=17, kernel=(5, 5), stride=(2, 2), mask="balanced", keep=0.29, act="hardswish",
                channels_last=True)
    gen = torch.Generator().manual_seed(seed)
    x, weight, mask, bias = case.make(gen)
    x = x.to(dtype)
    pads = case.pads()
    ref = reference_dwconv(x, weight, mask, bias, case.stride, pads, case.dilation, case.act)
    plan = build_plan(weight.cuda(), mask.cuda())
    xin = _offset_copy(x.cuda().contiguous(memory_format=torch.channels_last), offset, torch.channels_last)
    out = _offset_copy(torch.full(ref.shape, float("nan"), dtype=dtype, device="cuda"), offset, torch.channels_last)
    assert (xin.data_ptr() % 16 == 0) == (offset == 0)
    launch(xin, out, plan.offsets, plan.taps, plan.values, plan.block_offsets, plan.block_taps, plan.block_values,
           bias.cuda(), *case.kernel, list(case.stride), list(pads), list(case.dilation), ACTIVATIONS[case.act])
    if dtype == torch.float32:
        assert_matches_reference(out.cpu(), ref, 1e-5, f"{case} offset={offset} seed={seed}")
    else:
        assert_matches_reference_rounded(out.cpu().float(), ref, dtype, f"{case} offset={offset} seed={seed}")
