"""The CPU sparse depth-wise conv against a float64 reference, over the whole parameter space of the op."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_matches_reference, forced_isa, random_mask, reference_dwconv, supported_isas
from timm_deprune.pruning.select import balanced_magnitude_mask
from timm_deprune import build_plan, sparse_dwconv2d
from timm_deprune.kernels.activations import ACTIVATIONS
from timm_deprune.kernels.geometry import output_size, resolve_padding
from timm_deprune.kernels.launch import launch as _launch




def run_case(gen, *, n=2, c=8, h=9, w=11, kernel=(3, 3), stride=1, padding=1, dilation=1, layout="nchw",
             activation="identity", with_bias=True, keep=0.5, mask=None, weight=None):
    """Run the op twice — through the public API and into a NaN-poisoned output — and check both."""
    kh, kw = kernel
    weight = torch.randn(c, 1, kh, kw, generator=gen) if weight is None else weight
    mask = random_mask(c, kh, kw, keep, gen) if mask is None else mask
    bias = torch.randn(c, generator=gen) if with_bias else None
    x = torch.randn(n, c, h, w, generator=gen)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    plan = build_plan(weight, mask)
    s = (stride, stride) if isinstance(stride, int) else stride
    d = (dilation, dilation) if isinstance(dilation, int) else dilation
    pads = resolve_padding(padding, kernel, s, d, (h, w))
    ref = reference_dwconv(x, weight, mask, bias, s, pads, d, activation)

    with torch.no_grad():
        y = sparse_dwconv2d(x, plan, bias, activation, stride, padding, dilation)
    assert_matches_reference(y, ref)
    if layout == "cl" and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last), "channels_last input must give channels_last output"
    else:
        assert y.is_contiguous()

    # The same launch into an output filled with NaN: every element must be written.
    fmt = torch.channels_last if (layout == "cl" and not x.is_contiguous()) else torch.contiguous_format
    poisoned = torch.full_like(ref, float("nan"), dtype=torch.float32).contiguous(memory_format=fmt)
    xin = x if fmt == torch.channels_last else x.contiguous()
    _launch(xin, poisoned, plan.offsets, plan.taps, plan.values, plan.block_offsets, plan.block_taps,
            plan.block_values, bias, kh, kw, list(s), list(pads), list(d), ACTIVATIONS[activation])
    assert_matches_reference(poisoned, ref)
    return y


KERNELS = [(1, 1), (3, 3), (5, 5), (7, 7), (1, 9), (9, 1), (3, 5), (11, 11)]


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"{k[0]}x{k[1]}")
@pytest.mark.parametrize("stride,dilation", list(itertools.product([1, 2], [1, 2])))
def test_kernels_strides_dilations(gen, isa, kernel, stride, dilation, layout):
    pad = (dilation * (kernel[0] - 1) // 2, dilation * (kernel[1] - 1) // 2)
    h, w = 2 * dilation * kernel[0] + 5, 2 * dilation * kernel[1] + 8  # interior and border columns/rows
    run_case(gen, c=11, h=h, w=w, kernel=kernel, stride=stride, dilation=dilation, padding=pad, layout=layout)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("padding", [0, 1, (2, 0), (0, 1, 2, 1), (2, 1, 0, 2), "same", "valid"],
                         ids=lambda p: str(p).replace(" ", ""))
@pytest.mark.parametrize("stride", [1, 2, (1, 2), (2, 1)], ids=str)
def test_padding_symmetric_asymmetric_same(gen, isa, padding, stride, layout):
    run_case(gen, c=16, h=13, w=14, kernel=(3, 3), stride=stride, padding=padding, layout=layout)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_fused_bias_and_activation(gen, isa, activation, layout):
    run_case(gen, c=24, h=40, w=45, activation=activation, layout=layout)  # wide rows: vector chunks + tails
    run_case(gen, c=5, h=6, w=7, activation=activation, layout=layout, with_bias=False)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("channels", [1, 7, 8, 9, 31, 33, 70])
def test_all_pruned_and_all_kept_channels(gen, isa, channels, layout):
    mask = random_mask(channels, 3, 3, 0.4, gen)
    mask[0::3] = False  # every third channel: all taps pruned -> act(bias)
    mask[1::3] = True  # every third channel: all taps kept
    y = run_case(gen, c=channels, h=10, w=12, mask=mask, activation="relu6", layout=layout)
    assert y.shape[1] == channels


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("keep", [1.0, 0.5, 0.29, 0.0])
def test_balanced_and_unbalanced_masks(gen, isa, keep, layout):
    weight = torch.randn(80, 1, 3, 3, generator=gen)
    bal = balanced_magnitude_mask(weight, keep)
    plan = build_plan(weight, bal)
    assert plan.is_balanced
    assert len(set(plan.group_nnz[:2])) == 1 and plan.group_nnz[0] == round(keep * 288)
    run_case(gen, c=80, h=15, w=15, weight=weight, mask=bal, layout=layout)
    unbalanced = random_mask(80, 3, 3, 0.5, gen)
    unbalanced[:32] = True
    unbalanced[32:64] = False
    assert not build_plan(weight, unbalanced).is_balanced
    run_case(gen, c=80, h=15, w=15, weight=weight, mask=unbalanced, layout=layout)


@pytest.mark.parametrize("n,h,w", [(1, 1, 1), (1, 1, 7), (3, 7, 1), (1, 2, 2), (4, 3, 5)])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_tiny_spatial_sizes_and_batches(gen, isa, n, h, w, layout):
    run_case(gen, n=n, c=9, h=h, w=w, padding="same", stride=2, layout=layout)
    run_case(gen, n=n, c=9, h=h, w=w, padding=1, layout=layout)


def test_model_sized_layers_multithreaded(gen, isa):
    """Shapes as in mobilenetv2 / efficientnet (large planes, many channels) with the default thread count."""
    run_case(gen, n=1, c=32, h=112, w=112, padding=1, activation="relu6")
    run_case(gen, n=2, c=96, h=56, w=56, stride=2, padding=(0, 1, 0, 1), kernel=(3, 3), activation="silu")
    run_case(gen, n=2, c=240, h=28, w=28, stride=1, padding=2, kernel=(5, 5), layout="cl", activation="silu")
    run_case(gen, n=3, c=672, h=14, w=14, stride=2, padding="same", kernel=(5, 5), layout="cl")
    # > 8 MB of output: both kernels stream it with non-temporal stores (channels_last: when C % 8 == 0)
    run_case(gen, n=5, c=160, h=57, w=57, padding=1, activation="hardswish", with_bias=True)
    run_case(gen, n=5, c=160, h=57, w=57, padding=1, activation="silu", with_bias=True, layout="cl")
    run_case(gen, n=3, c=96, h=114, w=113, stride=2, padding=(0, 1, 0, 1), layout="cl", activation="relu6")
    # channels_last inputs over 8 MB with C >= 64 read the window from a ring of input-row copies: a 9-row window
    # (5x5, dilation 2), channels beyond the last whole block of 8, several images per task
    run_case(gen, n=9, c=64, h=64, w=64, kernel=(5, 5), dilation=2, padding=4, layout="cl", activation="relu")
    run_case(gen, n=6, c=100, h=64, w=65, stride=2, padding=(1, 1, 0, 1), layout="cl", with_bias=True)
    # channels_last narrow layers (a quarter or more border pixels) run in the grouped order: streamed output,
    # channels beyond the last whole block of 8, 7x7 maps where no row has a full block of interior pixels
    run_case(gen, n=16, c=672, h=14, w=14, padding=2, kernel=(5, 5), layout="cl", activation="silu", with_bias=True)
    run_case(gen, n=2, c=1163, h=7, w=7, padding=2, kernel=(5, 5), layout="cl", activation="gelu", with_bias=True)
    run_case(gen, n=3, c=21, h=14, w=15, stride=2, padding=(1, 2, 0, 1), kernel=(3, 5), layout="cl")
    # ... and with a 5x5 window or larger and most taps kept, in the tiled order (a unit = an image and up to 8
    # channel blocks copied into zero-padded tiles): a last unit with fewer blocks and a partial block, TF-"same"
    # padding with dilation 2, 28x28 maps (two blocks per unit), an 11x11 window at stride 2
    run_case(gen, n=3, c=44, h=7, w=7, padding=2, kernel=(5, 5), layout="cl", keep=0.9, activation="relu6")
    run_case(gen, n=2, c=70, h=13, w=10, padding="same", kernel=(5, 5), dilation=2, layout="cl", keep=0.9)
    run_case(gen, n=4, c=100, h=28, w=28, padding=2, kernel=(5, 5), layout="cl", keep=1.0, activation="hardswish")
    run_case(gen, n=2, c=16, h=15, w=15, stride=2, padding=(5, 0, 5, 0), kernel=(11, 11), layout="cl", keep=1.0)


def test_non_contiguous_input_is_handled(gen, isa):
    x = torch.randn(2, 16, 12, 20, generator=gen)[:, :, :, ::2]
    weight = torch.randn(16, 1, 3, 3, generator=gen)
    mask = random_mask(16, 3, 3, 0.6, gen)
    with torch.no_grad():
        y = sparse_dwconv2d(x, build_plan(weight, mask), padding=1)
    assert_matches_reference(y, reference_dwconv(x, weight, mask, None, (1, 1), (1, 1, 1, 1), (1, 1), "identity"))


def test_thread_count_taken_at_call_time(gen, isa):
    weight = torch.randn(64, 1, 3, 3, generator=gen)
    plan = build_plan(weight, random_mask(64, 3, 3, 0.3, gen))
    x = torch.randn(4, 64, 56, 56, generator=gen)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with torch.no_grad():
                outs.append(sparse_dwconv2d(x, plan, padding=1))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3), c=st.integers(1, 40), h=st.integers(1, 24), w=st.integers(1, 24),
    kh=st.sampled_from([1, 3, 5, 7]), kw=st.sampled_from([1, 3, 5, 9]), stride=st.sampled_from([1, 2]),
    dilation=st.sampled_from([1, 2]), keep=st.floats(0.0, 1.0), layout=st.sampled_from(["nchw", "cl"]),
    activation=st.sampled_from(list(ACTIVATIONS)), same=st.booleans(), seed=st.integers(0, 2**31 - 1),
    isa=st.sampled_from(supported_isas()),
)
def test_random_shapes_hypothesis(n, c, h, w, kh, kw, stride, dilation, keep, layout, activation, same, seed, isa):
    with forced_isa(isa):  # drawn, not a fixture: hypothesis reruns the body, a function-scoped fixture would not
        _random_shape_case(n, c, h, w, kh, kw, stride, dilation, keep, layout, activation, same, seed)


def _random_shape_case(n, c, h, w, kh, kw, stride, dilation, keep, layout, activation, same, seed):
    gen = torch.Generator().manual_seed(seed)
    padding = "same" if same else (dilation * (kh // 2), dilation * (kw // 2))
    pads = resolve_padding(padding, (kh, kw), (stride,) * 2, (dilation,) * 2, (h, w))
    if output_size(h, kh, stride, dilation, pads[0], pads[1]) < 1 or output_size(w, kw, stride, dilation, *pads[2:]) < 1:
        return
    run_case(gen, n=n, c=c, h=h, w=w, kernel=(kh, kw), stride=stride, dilation=dilation, padding=padding,
             layout=layout, activation=activation, keep=keep)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_every_row_width_remainder(gen, isa, layout):
    """Row widths 1..70 cover every split into 32-output chunks, 1-4 trailing vectors and partial vectors."""
    for w in range(1, 71):
        run_case(gen, n=1, c=3, h=3, w=w, stride=1 + w % 2, padding=1, layout=layout, activation="relu")


def test_repeated_calls_reuse_the_validated_geometry(gen, isa):
    """The eager fast path (cached per input geometry) gives the same results as the first, validated call."""
    weight = torch.randn(24, 1, 5, 5, generator=gen)
    mask = random_mask(24, 5, 5, 0.4, gen)
    plan = build_plan(weight, mask)
    bias = torch.randn(24, generator=gen)
    for _ in range(3):
        for layout in ("nchw", "cl"):
            x = torch.randn(2, 24, 13, 17, generator=gen)
            if layout == "cl":
                x = x.contiguous(memory_format=torch.channels_last)
            for b in (bias, None, bias.double()):
                with torch.no_grad():
                    y = sparse_dwconv2d(x, plan, b, "silu", 2, "same")
                pads = resolve_padding("same", (5, 5), (2, 2), (1, 1), (13, 17))
                assert_matches_reference(y, reference_dwconv(x, weight, mask, b, (2, 2), pads, (1, 1), "silu"))
    with torch.no_grad(), pytest.raises(ValueError, match="channels"):
        sparse_dwconv2d(torch.randn(2, 23, 13, 17), plan, bias, "silu", 2, "same")
