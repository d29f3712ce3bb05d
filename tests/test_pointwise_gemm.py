"""The packed point-wise GEMM (`_C.PackedGemm`) against a float64 matmul, on every ISA this CPU supports."""
from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from timm_deprune.kernels.backend import load_extension

_C = load_extension()
if not hasattr(_C, "PackedGemm"):
    pytest.skip("the installed timm_deprune._C has no packed GEMM (PackedGemm): rebuild the extension",
                allow_module_level=True)

ACTIVATIONS = {
    "none": lambda y: y,
    "relu": lambda y: np.maximum(y, 0.0),
    "relu6": lambda y: np.clip(y, 0.0, 6.0),
    "silu": lambda y: y / (1.0 + np.exp(-y)),
    "hardswish": lambda y: y * np.clip(y + 3.0, 0.0, 6.0) / 6.0,
}



def reference(x, w, bias, activation, residual):
    """float64 ground truth of act(x @ w.T + bias) + residual; w is [N, K]."""
    y = x.astype(np.float64) @ w.astype(np.float64).T
    if bias is not None:
        y = y + bias.astype(np.float64)
    y = ACTIVATIONS[activation](y)
    return y if residual is None else y + residual.astype(np.float64)


def check(packed, x, w, bias, activation, residual, threads, rows=None):
    """Run into a NaN-poisoned output and compare; max error relative to the reference's magnitude (floor 1)."""
    rows = x.shape[0] if rows is None else rows
    y = np.full((rows, w.shape[0]), np.nan, np.float32)
    packed.run(x, y, activation, residual, threads)
    ref = reference(x.reshape(rows, -1), w, bias, activation, residual)
    assert not np.isnan(y).any(), "some output element was never written"
    err = np.abs(y - ref).max()
    scale = max(1.0, np.abs(ref).max())
    assert err <= 1e-5 * scale, f"max abs error {err:.3g} > 1e-5 * {scale:.3g}"


# Rows 1 / 7 / 49 / 784 / 3137 (edges of every register tile), channel counts off every vector width (409 = a
# dead-channel-folded 576), K across a reduction-block boundary (400 > 384 / 256 splits in two).
SHAPES = [(1, 16, 24), (7, 409, 33), (49, 400, 17), (784, 33, 409), (3137, 24, 49), (49, 1, 1)]


@pytest.mark.parametrize("M,K,N", SHAPES, ids=[f"M{m}-K{k}-N{n}" for m, k, n in SHAPES])
def test_matches_float64(isa, M, K, N):
    rng = np.random.default_rng()
    x = rng.standard_normal((M, K), dtype=np.float32)
    w = rng.standard_normal((N, K), dtype=np.float32)
    bias = rng.standard_normal(N, dtype=np.float32)
    packed = _C.PackedGemm(w, bias)
    assert (packed.N, packed.K) == (N, K)
    for activation, with_res, threads in itertools.product(ACTIVATIONS, (False, True), (1, 2)):
        residual = rng.standard_normal((M, N), dtype=np.float32) if with_res else None
        check(packed, x, w, bias, activation, residual, threads)


def test_layouts_strides_and_codes(isa):
    """[K, N] and [N, K, 1, 1] weights, no bias, strided input rows, NHWC 4-D input, integer activation codes."""
    rng = np.random.default_rng()
    n, h, wd, k, c = 2, 5, 7, 19, 37
    w = rng.standard_normal((c, k), dtype=np.float32)
    x4 = rng.standard_normal((n, h, wd, k), dtype=np.float32)
    for packed in (_C.PackedGemm(np.ascontiguousarray(w.T), None, "kn"), _C.PackedGemm(w[:, :, None, None])):
        check(packed, x4, w, None, "relu6", None, 2, rows=n * h * wd)
    wide = rng.standard_normal((70, 2 * k + 3), dtype=np.float32)
    x = wide[:, 3:3 + k]  # rows at a stride of 2k+3 floats
    packed = _C.PackedGemm(w)
    for code, name in enumerate(ACTIVATIONS):
        y = np.full((70, c), np.nan, np.float32)
        packed.run(x, y, code, None, 1)
        np.testing.assert_allclose(y, reference(x, w, None, name, None), rtol=1e-5, atol=1e-5)
    res_wide = rng.standard_normal((70, c + 5), dtype=np.float32)
    out_wide = np.full((70, c + 9), np.nan, np.float32)
    packed.run(x, out_wide[:, 4:4 + c], "silu", res_wide[:, :c], 2)
    np.testing.assert_allclose(out_wide[:, 4:4 + c], reference(x, w, None, "silu", res_wide[:, :c]), rtol=1e-5,
                               atol=1e-5)
    assert np.isnan(out_wide[:, :4]).all() and np.isnan(out_wide[:, 4 + c:]).all(), "wrote outside the output view"


def test_packed_weights_are_a_copy():
    rng = np.random.default_rng()
    w = rng.standard_normal((9, 5), dtype=np.float32)
    bias = rng.standard_normal(9, dtype=np.float32)
    packed = _C.PackedGemm(w, bias)
    x = rng.standard_normal((3, 5), dtype=np.float32)
    expected = reference(x, w, bias, "none", None)
    w[:] = 0
    bias[:] = 0
    y = np.empty((3, 9), np.float32)
    packed.run(x, y)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def _bad_runs():
    f32 = np.float32
    ok_x, ok_y = np.zeros((4, 6), f32), np.zeros((4, 5), f32)
    return [
        (dict(input=np.zeros((4, 6), np.float64), output=ok_y), "input must be float32"),
        (dict(input=np.zeros((4, 7), f32), output=ok_y), "K=6"),
        (dict(input=np.zeros(6, f32), output=ok_y), "got shape (6,)"),
        (dict(input=np.zeros((6, 4), f32).T, output=ok_y), "contiguous along its last"),
        (dict(input=np.zeros((2, 2, 3, 6), f32).transpose(0, 2, 1, 3), output=np.zeros((12, 5), f32)), "C-contiguous"),
        (dict(input=ok_x, output=np.zeros((4, 6), f32)), "N=5"),
        (dict(input=ok_x, output=np.zeros((3, 5), f32)), "4 rows"),
        (dict(input=ok_x, output=np.zeros((4, 5), np.float16)), "output must be float32"),
        (dict(input=ok_x, output=ok_y, residual=np.zeros((4, 4), f32)), "residual must have"),
        (dict(input=ok_x, output=ok_y, residual=np.zeros((4, 5), np.int32)), "residual must be float32"),
        (dict(input=ok_x, output=ok_y, activation=5), "activation code must be 0-4"),
        (dict(input=ok_x, output=ok_y, activation="gelu"), "got 'gelu'"),
        (dict(input=ok_x, output=ok_y, activation=1.0), "got float"),
        (dict(input=ok_x, output=ok_y, threads=0), "threads must be >= 1, got 0"),
        (dict(input=ok_x, output=ok_y, residual=ok_y), "overlap the residual"),
    ]


@pytest.mark.parametrize("kwargs,message", _bad_runs())
def test_bad_run_arguments_raise(kwargs, message):
    packed = _C.PackedGemm(np.ones((5, 6), np.float32))
    with pytest.raises(ValueError, match=re.escape(message)):
        packed.run(**kwargs)


def test_overlap_and_readonly_rejected():
    packed = _C.PackedGemm(np.ones((6, 6), np.float32))
    buf = np.zeros((4, 6), np.float32)
    with pytest.raises(ValueError, match="overlap the input"):
        packed.run(buf, buf)
    out = np.zeros((4, 6), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        packed.run(np.zeros((4, 6), np.float32), out)


@pytest.mark.parametrize("args,message", [
    ((np.ones((5, 6), np.float64),), "weights must be float32"),
    ((np.ones((5, 6, 3), np.float32),), "got shape \\(5, 6, 3\\)"),
    ((np.ones((5, 6, 3, 3), np.float32),), "1x1 conv weight"),
    ((np.ones((0, 6), np.float32),), "non-empty"),
    ((np.ones((5, 6), np.float32), np.ones(6, np.float32)), "bias must have shape \\(5,\\)"),
    ((np.ones((5, 6), np.float32), np.ones(5, np.float64)), "bias must be float32"),
    ((np.ones((5, 6), np.float32), None, "nchw"), "layout must be 'nk'"),
    ((np.ones((5, 6, 1, 1), np.float32), None, "kn"), "is 'nk'"),
])
def test_bad_weights_raise(args, message):
    with pytest.raises(ValueError, match=message):
        _C.PackedGemm(*args)
