"""Hypothesis fuzz of the sparse op's two doors: the ``sparse_dwconv2d`` front over shapes, dtypes, layouts and
every argument (valid or not), and the registered ``torch.ops.deprune.sparse_dwconv2d`` over raw and edited plan
tensors. Every call either raises a one-line ValueError / TypeError / RuntimeError or returns the float64
reference's result; nothing crashes the process."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from timm.layers import pad_same

from conftest import assert_matches_reference, reference_dwconv
from timm_deprune import build_plan, sparse_dwconv2d
from timm_deprune.kernels.activations import ACTIVATIONS
from timm_deprune.kernels.backend import backend_available

pytestmark = pytest.mark.skipif(not backend_available(), reason="native backend not built")

ERRORS = (ValueError, TypeError, RuntimeError)
GOOD_ACTS = list(ACTIVATIONS)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _hand_pads(padding, kh, kw, stride, dilation, x):
    """(top, bottom, left, right) written out per accepted form, independent of the op's own resolver; "same"
    pads the input with timm's ``pad_same`` instead (returns the padded input and zero pads)."""
    if padding == "valid":
        return x, (0, 0, 0, 0)
    if padding == "same":
        return pad_same(x, (kh, kw), stride, dilation), (0, 0, 0, 0)
    if isinstance(padding, int):
        return x, (padding,) * 4
    if len(padding) == 2:
        return x, (padding[0], padding[0], padding[1], padding[1])
    left, right, top, bottom = padding
    return x, (top, bottom, left, right)


def _arg(data, good: list, bad: list, label: str):
    """A good value 7 times in 8, a bad one otherwise: most calls are valid, every argument is sometimes wrong."""
    return data.draw(st.sampled_from(bad if data.draw(st.integers(0, 7), label=f"{label} bad?") == 0 else good),
                     label=label)


def _one_line(e: BaseException) -> None:
    text = str(e)
    assert text and "\n" not in text.strip() and "Segmentation" not in text, repr(e)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@FUZZ
@given(data=st.data())
def test_front_takes_anything_and_either_refuses_it_or_matches_float64(data):
    c = data.draw(st.integers(1, 40), label="C")
    kh, kw = data.draw(st.sampled_from([1, 2, 3, 5])), data.draw(st.sampled_from([1, 3, 4, 5]))
    n, h, w = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 11)), data.draw(st.integers(1, 11))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    weight = torch.randn(c, 1, kh, kw, generator=gen)
    mask = torch.rand(c, kh, kw, generator=gen) < data.draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    plan = build_plan(weight, mask)
    x_channels = _arg(data, [c], [c + 1, max(c - 1, 1) if c > 1 else 2], "x channels")
    dtype = _arg(data, [torch.float32], [torch.float64, torch.float16, torch.bfloat16, torch.int32], "dtype")
    x = (torch.randn(n, x_channels, h, w + 1, generator=gen) * 3).to(dtype)
    layout = data.draw(st.sampled_from(["nchw", "cl", "strided"]), label="layout")
    x = x[..., :w].contiguous() if layout == "nchw" else (
        x[..., :w].contiguous(memory_format=torch.channels_last) if layout == "cl" else x[..., 1:])
    stride = _arg(data, [1, 2, (1, 2), (2, 1)], [0, 3, (2,), (True, 1), 1.0], "stride")
    dilation = _arg(data, [1, 2, (2, 1)], [0, (1, 1, 1), -1], "dilation")
    padding = _arg(data, [0, 1, "same", "valid", (1, 0), (0, 1, 1, 0), (1, 1, 0, 1)],
                   [-1, 99, "full", (True, 0), (1,), (0, 0, 0, 9)], "padding")
    activation = _arg(data, GOOD_ACTS, ["tanh", "RELU", ["relu"]], "activation")
    bias = _arg(data, [None, "ok", "f64"], ["short"], "bias")
    bias_t = {None: None, "ok": torch.randn(c, generator=gen), "short": torch.randn(c + 1, generator=gen),
              "f64": torch.randn(c, generator=gen, dtype=torch.float64)}[bias]
    y = None
    with torch.no_grad():
        try:
            y = sparse_dwconv2d(x, plan, bias_t, activation, stride, padding, dilation)
        except ERRORS as e:
            _one_line(e)
    event("accepted" if y is not None else "refused")
    if y is None:
        return
    # accepted: everything must have been valid, and the result exact
    assert dtype == torch.float32 and x_channels == c and activation in GOOD_ACTS, "a bad input was accepted"
    assert bias in (None, "ok", "f64"), "a bias of the wrong shape was accepted"
    s, d = _pair(stride), _pair(dilation)
    xr, pads = _hand_pads(padding, kh, kw, s, d, x)
    ref = reference_dwconv(xr, weight, mask, bias_t, s, pads, d, activation)
    assert_matches_reference(y, ref, info=f"{layout} pad={padding} s={stride} d={dilation} act={activation}")
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "cl" and not x.is_contiguous()
                           else torch.contiguous_format)


def _edit(tensors: list, which: int, how: str, kk: int) -> list:
    t = [v.clone() for v in tensors]
    v = t[which]
    if how == "dtype":
        t[which] = v.to(torch.int64) if v.dtype == torch.int32 else v.to(torch.float64)
    elif how == "shorter" and v.numel() > 0:
        t[which] = v.reshape(-1)[:-1] if v.dim() == 1 else v[:-1]
    elif how == "bump" and v.numel() > 0:
        flat = v.view(-1)
        flat[flat.numel() // 2] += kk if v.dtype == torch.int32 else 1.0
    elif how == "negative" and v.numel() > 0:
        v.view(-1)[0] = -1
    elif how == "2d":  # a 1-D tensor made 2-D, the 2-D block_values made 1-D
        t[which] = v.reshape(1, -1) if v.dim() == 1 else v.reshape(-1)
    return t


@FUZZ
@given(data=st.data())
def test_registered_op_checks_raw_and_edited_plan_tensors(data):
    c = data.draw(st.integers(1, 20), label="C")
    kh = kw = data.draw(st.sampled_from([1, 3, 5]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    weight = torch.randn(c, 1, kh, kw, generator=gen)
    mask = torch.rand(c, kh, kw, generator=gen) < 0.5
    plan = build_plan(weight, mask)
    tensors = [plan.offsets, plan.taps, plan.values, plan.block_offsets, plan.block_taps, plan.block_values]
    which = data.draw(st.integers(0, 5), label="tensor")
    how = _arg(data, ["none"], ["dtype", "shorter", "bump", "negative", "2d"], "edit")
    # a bumped tap index lands past the taps of both kernels the call may name: (kh, kw) and the valid (kh + 2, kw)
    edited = _edit(tensors, which, how, (kh + 2) * kw if which in (1, 4) else kh * kw) if how != "none" else tensors
    if all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) for a, b in zip(edited, tensors)):
        how = "none"  # an edit of an empty tensor (no kept tap) leaves the plan as it was
    x = torch.randn(data.draw(st.integers(1, 2)), _arg(data, [c], [c + 3], "x channels"), 6, 7, generator=gen)
    if data.draw(st.booleans(), label="channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    k = _arg(data, [(kh, kw)], [(kh + 2, kw), (0, kw), (13, 13)], "kernel arg")
    pads = _arg(data, [[0, 0, 0, 0], [kh // 2] * 4, [kh - 1, 0, 0, kw - 1]], [[-1, 0, 0, 0], [0, 0], [kh, 0, 0, 0]],
                "padding")
    act = _arg(data, list(ACTIVATIONS.values()), [6, -1], "activation code")
    stride = _arg(data, [[1, 1], [2, 2], [1, 2]], [[3, 1], [0, 1]], "stride")
    y = None
    with torch.no_grad():
        try:
            y = torch.ops.deprune.sparse_dwconv2d(x, *edited, None, k[0], k[1], stride, pads, [1, 1], act)
        except ERRORS as e:
            _one_line(e)
    event(f"{'accepted' if y is not None else 'refused'} edit={how}")
    if y is None:
        return
    kh2 = k[0]  # (kh + 2, kw) is a valid call: the same taps in a taller kernel whose extra rows are all pruned
    valid_args = (x.shape[1] == c and k in ((kh, kw), (kh + 2, kw)) and act in ACTIVATIONS.values()
                  and len(pads) == 4 and min(pads) >= 0 and max(pads[:2]) <= kh2 - 1 and max(pads[2:]) <= kw - 1
                  and all(v in (1, 2) for v in stride))
    assert valid_args, "the op accepted invalid arguments"
    assert how == "none" or (how in ("bump", "negative") and which in (2, 5)), \
        f"the op accepted edit {how!r} of plan tensor {which} (only a weight value may change)"
    if how == "none":
        name = next(n for n, code in ACTIVATIONS.items() if code == act)
        w2, m2 = torch.zeros(c, 1, kh2, kw), torch.zeros(c, kh2, kw, dtype=torch.bool)
        w2[:, :, :kh], m2[:, :kh] = weight, mask
        assert_matches_reference(y, reference_dwconv(x, w2, m2, None, stride, pads, (1, 1), name))
    else:  # a value edit that keeps every index in range may run; it must still write every output
        assert not torch.isnan(y).any()
