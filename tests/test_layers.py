"""Masked depth-wise conv layers: sparse == dense == float64 reference, training, plan cache, fuse, BN folding."""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.layers import BatchNormAct2d, Conv2dSame, StdConv2d, conv2d_same
from timm.models import reparameterize_model
from torch import nn

import timm_deprune.kernels.op as kernel_op
import timm_deprune.layers as layers
from conftest import assert_matches_reference
from timm_deprune.inference.fold import fold_batchnorm
from timm_deprune.kernels.backend import load_extension
from timm_deprune.layers import (
    MaskedConv2d,
    MaskedConv2dSame,
    masked_convs,
    set_execution,
    to_masked,
)

_C = load_extension()


# ----------------------------------------------------------------------------------------------------------- helpers
@dataclass(frozen=True)
class Case:
    same: bool = False  # timm Conv2dSame instead of nn.Conv2d
    c: int = 24
    kernel: tuple[int, int] = (3, 3)
    stride: int = 1
    dilation: int = 1
    padding: Union[int, tuple[int, int], str] = 1  # nn.Conv2d only
    hw: tuple[int, int] = (13, 11)
    n: int = 2
    channels_last: bool = False
    bias: bool = True


CASES = [
    Case(),
    Case(stride=2, hw=(15, 9), channels_last=True, bias=False),
    Case(kernel=(5, 5), padding=2, stride=2, hw=(17, 13)),
    Case(kernel=(5, 5), padding=4, dilation=2, hw=(16, 19), channels_last=True),
    Case(kernel=(3, 3), padding=(0, 1), stride=2, dilation=2, hw=(12, 7), n=1),
    Case(kernel=(7, 7), padding="same", hw=(9, 10), c=40),
    Case(kernel=(3, 5), padding=(1, 2), hw=(6, 21), c=9),
    Case(kernel=(3, 3), padding="valid", hw=(5, 5), n=3),
    Case(same=True, stride=2, hw=(15, 16)),
    Case(same=True, kernel=(5, 5), stride=2, hw=(17, 14), channels_last=True, bias=False),
    Case(same=True, kernel=(3, 3), dilation=2, hw=(11, 13), c=40),
    Case(same=True, kernel=(7, 7), stride=1, hw=(8, 9), channels_last=True),
]


def make_conv(case: Case, gen: torch.Generator) -> nn.Conv2d:
    c, (kh, kw) = case.c, case.kernel
    if case.same:
        conv = Conv2dSame(c, c, case.kernel, stride=case.stride, dilation=case.dilation, groups=c, bias=case.bias)
    else:
        conv = nn.Conv2d(c, c, case.kernel, stride=case.stride, padding=case.padding, dilation=case.dilation,
                         groups=c, bias=case.bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(c, 1, kh, kw, generator=gen))
        if conv.bias is not None:
            conv.bias.copy_(torch.randn(c, generator=gen))
    return conv


def make_mask(c: int, kh: int, kw: int, gen: torch.Generator, keep: float = 0.5) -> torch.Tensor:
    """Random mask with one all-pruned and one all-kept channel."""
    mask = torch.rand(c, kh, kw, generator=gen) < keep
    mask[0] = False
    mask[-1] = True
    return mask


def make_input(case: Case, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(case.n, case.c, *case.hw, generator=gen)
    return x.contiguous(memory_format=torch.channels_last) if case.channels_last else x


def reference(conv: nn.Conv2d, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """float64 F.conv2d (or timm's TF-same conv2d) with the masked weight, for conv's geometry."""
    w = conv.weight.detach().double() * mask.unsqueeze(1).double()
    b = None if conv.bias is None else conv.bias.detach().double()
    if isinstance(conv, Conv2dSame):
        return conv2d_same(x.double(), w, b, conv.stride, (0, 0), conv.dilation, conv.groups)
    return F.conv2d(x.double(), w, b, conv.stride, conv.padding, conv.dilation, conv.groups)


def masked_layer(gen: torch.Generator, c: int = 16, same: bool = False, bias: bool = True,
                 keep: float = 0.5) -> tuple[MaskedConv2d, torch.Tensor]:
    case = Case(same=same, c=c, bias=bias)
    mask = make_mask(c, 3, 3, gen, keep)
    return to_masked(make_conv(case, gen), mask), mask


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def sparse_calls(monkeypatch):
    """Count the calls of the sparse op made by the layers."""
    calls = []
    real = layers.sparse_dwconv2d

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(layers, "sparse_dwconv2d", counting)
    return calls


# ---------------------------------------------------------------------------------------------- conversion + eval
@pytest.mark.parametrize("case", CASES, ids=str)
def test_sparse_equals_dense_equals_float64_reference(case, gen, sparse_calls):
    conv = make_conv(case, gen)
    keys = list(conv.state_dict())
    weight, bias = conv.weight, conv.bias
    mask = make_mask(case.c, *case.kernel, gen)
    x = make_input(case, gen)
    ref = reference(conv, mask, x)

    m = to_masked(conv, mask)
    assert type(m) is (MaskedConv2dSame if case.same else MaskedConv2d)
    assert isinstance(m, Conv2dSame) == case.same
    assert m.weight is weight and m.bias is bias, "the Parameter objects must be kept"
    assert list(m.state_dict()) == keys, "the mask must not appear in the state dict"
    assert m.mask.dtype == torch.bool and torch.equal(m.mask, mask)
    assert torch.all(m.weight[~mask.unsqueeze(1)] == 0), "pruned weights must be zeroed in place"

    m.eval()
    outputs = {}
    with torch.no_grad():
        for mode in ("sparse", "dense", "auto"):
            m.execution = mode
            outputs[mode] = m(x)
            assert_matches_reference(outputs[mode], ref, info=f"execution={mode}")
    assert len(sparse_calls) == 2, "'sparse' and 'auto' must run the sparse op, 'dense' must not"
    assert torch.equal(outputs["sparse"], outputs["auto"])
    if case.channels_last:
        assert outputs["sparse"].is_contiguous(memory_format=torch.channels_last)


@settings(max_examples=15, deadline=None)
@given(
    same=st.booleans(), c=st.integers(1, 20), kh=st.sampled_from([1, 3, 5]), kw=st.sampled_from([1, 3, 5]),
    stride=st.sampled_from([1, 2]), dilation=st.sampled_from([1, 2]), h=st.integers(1, 12), w=st.integers(1, 12),
    keep=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1),
)
def test_randomized_geometry_sparse_equals_reference(same, c, kh, kw, stride, dilation, h, w, keep, seed):
    gen = torch.Generator().manual_seed(seed)
    padding = (dilation * (kh - 1) // 2, dilation * (kw - 1) // 2)
    case = Case(same=same, c=c, kernel=(kh, kw), stride=stride, dilation=dilation, padding=padding, hw=(h, w))
    conv = make_conv(case, gen)
    mask = torch.rand(c, kh, kw, generator=gen) < keep
    x = make_input(case, gen)
    ref = reference(conv, mask, x)
    m = to_masked(conv, mask).eval()
    m.execution = "sparse"
    with torch.no_grad():
        assert_matches_reference(m(x), ref, info=str(case))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64, torch.bool])
def test_mask_dtypes_are_stored_as_bool_copies(dtype, gen):
    mask = make_mask(8, 3, 3, gen)
    given_mask = mask.clone().to(dtype)
    m = to_masked(nn.Conv2d(8, 8, 3, padding=1, groups=8), given_mask)
    assert m.mask.dtype == torch.bool and m.mask.device == m.weight.device
    assert torch.equal(m.mask, mask)
    given_mask.zero_()
    assert torch.equal(m.mask, mask), "the layer must hold its own copy of the mask"
    assert m.keep_ratio == pytest.approx(mask.float().mean().item())
    assert f"keep_ratio={m.keep_ratio:.3f}" in repr(m)


def test_direct_construction_keeps_all_taps(gen):
    m = MaskedConv2d(8, 8, 3, padding=1, groups=8).eval()
    assert m.keep_ratio == 1.0
    x = torch.randn(1, 8, 7, 7, generator=gen)
    with torch.no_grad():
        assert_matches_reference(m(x), reference(m, m.mask, x))
    s = MaskedConv2dSame(8, 8, 3, stride=2, groups=8, mask=make_mask(8, 3, 3, gen)).eval()
    with torch.no_grad():
        assert_matches_reference(s(x), reference(s, s.mask, x))
    with pytest.raises(ValueError, match="groups=1, in_channels=8, out_channels=8"):
        MaskedConv2d(8, 8, 3)


def test_set_mask_and_remasking(gen):
    m = to_masked(make_conv(Case(c=16), gen), torch.ones(16, 3, 3, dtype=torch.uint8))
    assert torch.all(m.weight != 0) and m.keep_ratio == 1.0
    x = torch.randn(2, 16, 9, 9, generator=gen)
    m.eval()
    with torch.no_grad():
        m(x)  # caches a plan for the all-kept mask
        new = make_mask(16, 3, 3, gen, keep=0.3)
        m.set_mask(new.to(torch.uint8))
        assert torch.equal(m.mask, new)
        assert torch.all(m.weight[~new.unsqueeze(1)] == 0)
        assert_matches_reference(m(x), reference(m, new, x))
        again = make_mask(16, 3, 3, gen, keep=0.7)
        assert to_masked(m, again) is m, "to_masked on a masked conv replaces its mask"
        assert_matches_reference(m(x), reference(m, new & again, x))  # taps zeroed by the first mask stay zero


# ------------------------------------------------------------------------------------------------------- errors
class MyConv(nn.Conv2d):
    pass


@pytest.mark.parametrize(
    "make,mask_shape,exc,match",
    [
        (lambda: nn.Conv2d(8, 16, 3, groups=8), (16, 3, 3), ValueError,
         r"depth-wise.*groups=8, in_channels=8, out_channels=16"),
        (lambda: nn.Conv2d(8, 8, 3), (8, 3, 3), ValueError, r"groups=1, in_channels=8, out_channels=8"),
        (lambda: nn.Conv2d(8, 8, 3, groups=8), (8, 5, 5), ValueError,
         r"mask shape \[8, 5, 5\].*\[8, 1, 3, 3\].*expected \[8, 3, 3\]"),
        (lambda: nn.Conv2d(8, 8, 3, groups=8), (8, 1, 3, 3), ValueError, r"mask shape \[8, 1, 3, 3\]"),
        (lambda: StdConv2d(8, 8, 3, groups=8), (8, 3, 3), TypeError, r"got timm\.layers\.std_conv\.StdConv2d"),
        (lambda: MyConv(8, 8, 3, groups=8), (8, 3, 3), TypeError, r"nn.Conv2d and timm.layers.Conv2dSame.*MyConv"),
        (lambda: nn.Conv1d(8, 8, 3, groups=8), (8, 3), TypeError, r"Conv1d"),
    ],
)
def test_to_masked_rejects_bad_convs(make, mask_shape, exc, match):
    conv = make()
    with pytest.raises(exc, match=match):
        to_masked(conv, torch.ones(mask_shape, dtype=torch.bool))
    assert type(conv) in (nn.Conv2d, StdConv2d, MyConv, nn.Conv1d), "a refused conv must be left unchanged"


def test_bad_mask_values_and_types():
    conv = nn.Conv2d(4, 4, 3, groups=4)
    with pytest.raises(TypeError, match="bool or an integer.*torch.float32"):
        to_masked(conv, torch.ones(4, 3, 3))
    bad = torch.ones(4, 3, 3, dtype=torch.uint8)
    bad[1, 1, 1] = 2
    with pytest.raises(ValueError, match="only 0.*and 1.*got value 2"):
        to_masked(conv, bad)
    with pytest.raises(TypeError, match="torch.Tensor.*list"):
        to_masked(conv, [[1]])
    assert type(conv) is nn.Conv2d


def test_bad_execution_mode(gen):
    m, _ = masked_layer(gen)
    with pytest.raises(ValueError, match=r"one of \['auto', 'sparse', 'dense'\], got 'fast'"):
        m.execution = "fast"
    with pytest.raises(ValueError, match=r"one of \['auto', 'sparse', 'dense'\], got 'Sparse'"):
        set_execution(nn.Sequential(m), "Sparse")
    assert m.execution == "auto"


@pytest.mark.parametrize(
    "setup,match",
    [
        (lambda m, x: (m.double(), x.double()), r"on the CPU the sparse kernel needs float32 input, got torch.float64"),
        (lambda m, x: (m, x.double()), r"float32 input, got torch.float64"),
        (lambda m, x: (m, x[0]), r"\[N, 16, H, W\].*\[16, 9, 9\]"),
        (lambda m, x: (m, x.to(torch.bfloat16)), r"float32 input, got torch.bfloat16"),
    ],
)
def test_sparse_mode_refuses_unsupported_inputs(setup, match, gen):
    m, _ = masked_layer(gen)
    m.eval().execution = "sparse"
    m, x = setup(m, torch.randn(2, 16, 9, 9, generator=gen))
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"execution='sparse' cannot run.*" + match):
        m(x)


@pytest.mark.parametrize(
    "conv,match",
    [
        (nn.Conv2d(8, 8, 3, stride=3, groups=8), r"stride \(3, 3\)"),
        (nn.Conv2d(8, 8, 3, dilation=3, groups=8), r"dilation \(3, 3\)"),
        (nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect", groups=8), r"padding_mode 'reflect'"),
        (nn.Conv2d(8, 8, 3, padding=3, groups=8), r"padding \(3, 3\) is outside"),
        (nn.Conv2d(8, 8, 13, padding=6, groups=8), r"kernel 13x13.*11x11"),
    ],
)
def test_unsupported_geometry_falls_back_in_auto_and_raises_in_sparse(conv, match, gen, sparse_calls):
    mask = make_mask(8, *conv.kernel_size, gen)
    m = to_masked(conv, mask).eval()
    x = torch.randn(2, 8, 15, 15, generator=gen)
    with torch.no_grad():
        assert_matches_reference(m(x), reference(m, mask, x) if conv.padding_mode == "zeros" else
                                 F.conv2d(F.pad(x.double(), [1] * 4, mode="reflect"),
                                          m.masked_weight().double(), m.bias.double(), groups=8))
        assert not sparse_calls
        m.execution = "sparse"
        with pytest.raises(RuntimeError, match=match):
            m(x)


def test_sparse_mode_refuses_gradients(gen):
    m, _ = masked_layer(gen)
    m.eval().execution = "sparse"
    with pytest.raises(RuntimeError, match="gradient is required.*inference-only.*no_grad"):
        m(torch.randn(1, 16, 8, 8, generator=gen))


def test_auto_mode_picks_sparse_only_when_it_can(gen, sparse_calls):
    m, mask = masked_layer(gen)
    x = torch.randn(2, 16, 9, 9, generator=gen)
    ref = reference(m, mask, x)
    m.eval()
    y = m(x)  # grad enabled and the weight requires grad: dense, differentiable
    assert y.requires_grad and not sparse_calls
    assert_matches_reference(y.detach(), ref)
    with torch.no_grad():
        assert_matches_reference(m(x), ref)
    assert len(sparse_calls) == 1
    with torch.inference_mode():
        assert_matches_reference(m(x), ref)
    assert len(sparse_calls) == 2
    m.requires_grad_(False)
    assert_matches_reference(m(x), ref)  # grad mode on, but nothing needs a gradient
    assert len(sparse_calls) == 3
    m.train()
    with torch.no_grad():
        assert_matches_reference(m(x), ref)
    assert len(sparse_calls) == 3, "training mode always runs the masked dense conv"


# ----------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("same", [False, True])
def test_training_forward_and_gradients(same, gen):
    m, mask = masked_layer(gen, same=same)
    x = torch.randn(2, 16, 10, 9, generator=gen)
    g = torch.randn_like(reference(m, mask, x), dtype=torch.float32)
    m.train()
    y = m(x)
    assert_matches_reference(y.detach(), reference(m, mask, x))
    (y * g).sum().backward()

    w64 = m.weight.detach().double().requires_grad_()
    b64 = m.bias.detach().double().requires_grad_()
    conv = conv2d_same if same else F.conv2d
    y64 = conv(x.double(), w64 * mask.unsqueeze(1).double(), b64, m.stride, m.padding, m.dilation, m.groups)
    (y64 * g.double()).sum().backward()
    pruned = ~mask.unsqueeze(1).expand_as(m.weight)
    assert torch.all(m.weight.grad[pruned] == 0), "pruned taps must get exactly zero gradient"
    assert_matches_reference(m.weight.grad, w64.grad * mask.unsqueeze(1))
    assert_matches_reference(m.bias.grad, b64.grad)
    assert m.weight.grad[~pruned].abs().sum() > 0


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2, foreach=False),
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2, amsgrad=True),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    ],
    ids=["sgd-nesterov", "sgd-loop", "adam-amsgrad", "adamw"],
)
def test_pruned_weights_stay_zero_under_optimizers(make_opt, gen):
    m, mask = masked_layer(gen)
    model = nn.Sequential(nn.Conv2d(4, 16, 1), m, nn.ReLU(), nn.Conv2d(16, 4, 1))
    opt = make_opt(model.parameters())
    before = m.weight.detach().clone()
    pruned = ~mask.unsqueeze(1).expand_as(m.weight)
    for _ in range(5):
        x = torch.randn(3, 4, 8, 8, generator=gen)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        assert torch.all(m.weight[pruned] == 0), "an optimizer step revived a pruned weight"
    assert not torch.equal(m.weight[~pruned], before[~pruned]), "kept weights must train"
    model.eval()
    x = torch.randn(2, 4, 8, 8, generator=gen)
    with torch.no_grad():
        hidden = model[0](x)
        assert_matches_reference(m(hidden), reference(m, mask, hidden))  # plan rebuilt after the steps


# --------------------------------------------------------------------------------------------------- plan cache
def test_plan_follows_weight_mask_and_bias_changes(gen):
    m, mask = masked_layer(gen)
    m.eval().execution = "sparse"
    x = torch.randn(2, 16, 9, 9, generator=gen)
    with torch.no_grad():
        m(x)
        plan = m.sparse_plan()
        assert m.sparse_plan() is plan, "an unchanged layer must reuse its plan"

        m.weight.mul_(2)
        assert_matches_reference(m(x), reference(m, mask, x))
        m.bias.add_(1)
        assert_matches_reference(m(x), reference(m, mask, x))
        m.mask[1:4] = False  # in-place mask edit
        assert_matches_reference(m(x), reference(m, m.mask, x))
        m.weight = nn.Parameter(torch.randn(16, 1, 3, 3, generator=gen))  # a new parameter object
        assert_matches_reference(m(x), reference(m, m.mask, x))
        m.bias = None
        assert_matches_reference(m(x), reference(m, m.mask, x))
        m.weight.data.add_(1)  # .data bypasses the version counter: needs invalidate_plan()
        m.invalidate_plan()
        assert_matches_reference(m(x), reference(m, m.mask, x))


def test_dtype_and_device_moves(gen, sparse_calls):
    m, mask = masked_layer(gen)
    m.eval()
    x = torch.randn(2, 16, 9, 9, generator=gen)
    with torch.no_grad():
        m(x)
        m.double()
        assert m.mask.dtype == torch.bool
        assert_matches_reference(m(x.double()), reference(m, mask, x))  # float64: the dense fallback
        assert len(sparse_calls) == 1
        m.half()
        assert m.mask.dtype == torch.bool and m.weight.dtype == torch.float16
        m.float()
        assert_matches_reference(m(x), reference(m, mask, x))  # back to fp32: a fresh plan from the new tensors
        assert len(sparse_calls) == 2
        m.to(memory_format=torch.channels_last)
        assert_matches_reference(m(x), reference(m, mask, x))


def test_state_dict_round_trip_and_dense_checkpoints(gen):
    m, mask = masked_layer(gen)
    dense = nn.Conv2d(16, 16, 3, padding=1, groups=16)
    m.load_state_dict(dense.state_dict())
    assert torch.all(m.weight[~mask.unsqueeze(1)] == 0), "loading a dense checkpoint must keep pruned taps at zero"
    assert torch.equal(m.weight[mask.unsqueeze(1)], dense.weight[mask.unsqueeze(1)])
    other, _ = masked_layer(gen)
    other.set_mask(mask)
    other.load_state_dict(m.state_dict())
    x = torch.randn(1, 16, 7, 7, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x), m.eval()(x), rtol=0, atol=0)


def test_deepcopy_keeps_the_mask_and_its_own_plan(gen):
    m, mask = masked_layer(gen)
    m.eval()
    x = torch.randn(2, 16, 9, 9, generator=gen)
    with torch.no_grad():
        y = m(x)  # caches a plan
        m2 = copy.deepcopy(m)
        assert torch.equal(m2.mask, mask) and m2.mask.data_ptr() != m.mask.data_ptr()
        assert m2.weight is not m.weight and list(m2.state_dict()) == ["weight", "bias"]
        del m
        torch.testing.assert_close(m2(x), y, rtol=0, atol=0)
        m2.weight.mul_(3)
        assert_matches_reference(m2(x), reference(m2, mask, x))


# ---------------------------------------------------------------------------------------------------------- fuse
@pytest.mark.parametrize("same", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_fuse_bakes_the_mask_into_a_plain_conv(same, training, gen):
    m, mask = masked_layer(gen, same=same)
    m.weight.data[~mask.unsqueeze(1).expand_as(m.weight)] = 5.0  # stray pruned values: must not survive fusing
    m.train(training)
    fused = m.fuse()
    assert type(fused) is (Conv2dSame if same else nn.Conv2d)
    assert fused.training is training
    assert fused.weight.dtype == m.weight.dtype and fused.weight.device == m.weight.device
    assert fused.weight is not m.weight and fused.weight.requires_grad
    assert torch.all(fused.weight[~mask.unsqueeze(1)] == 0)
    assert (fused.stride, fused.padding, fused.dilation, fused.groups) == (m.stride, m.padding, m.dilation, m.groups)
    assert list(fused.state_dict()) == list(m.state_dict())
    x = torch.randn(2, 16, 11, 10, generator=gen)
    with torch.no_grad():
        ref = reference(m, mask, x)
        assert_matches_reference(fused(x), ref)
        assert_matches_reference(m.eval()(x), ref)


def test_reparameterize_model_removes_masked_convs(gen):
    a, _ = masked_layer(gen)
    b, _ = masked_layer(gen, same=True, bias=False)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), a, nn.BatchNorm2d(16), nn.ReLU(), b, nn.Conv2d(16, 4, 1)).eval()
    x = torch.randn(2, 3, 12, 12, generator=gen)
    with torch.no_grad():
        expected = model(x)
        fused = reparameterize_model(model)
        assert not list(masked_convs(fused))
        assert [type(fused[i]) for i in (1, 4)] == [nn.Conv2d, Conv2dSame]
        assert not fused.training and not fused[1].training
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
    assert len(list(masked_convs(model))) == 2, "the original model must be left as it was"


# ------------------------------------------------------------------------------------------------- fold_batchnorm
def random_bn(bn: nn.BatchNorm2d, gen: torch.Generator) -> nn.BatchNorm2d:
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        bn.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.1)
        if bn.affine:
            bn.weight.copy_(torch.randn(c, generator=gen))
            bn.bias.copy_(torch.randn(c, generator=gen))
    return bn.eval()


def bn_reference(bn: nn.BatchNorm2d, y: torch.Tensor) -> torch.Tensor:
    """float64 eval-mode batch norm (no activation)."""
    shape = (1, -1, 1, 1)
    out = (y - bn.running_mean.double().view(shape)) / torch.sqrt(bn.running_var.double().view(shape) + bn.eps)
    if bn.affine:
        out = out * bn.weight.double().view(shape) + bn.bias.double().view(shape)
    return out


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_fold_batchnorm_matches_conv_then_bn(masked, bias, affine, gen):
    case = Case(c=16, bias=bias)
    conv = make_conv(case, gen)
    mask = make_mask(16, 3, 3, gen) if masked else torch.ones(16, 3, 3, dtype=torch.bool)
    if masked:
        conv = to_masked(conv, mask)
        conv.eval().execution = "sparse"
    bn = random_bn(nn.BatchNorm2d(16, affine=affine), gen)
    x = torch.randn(2, 16, 9, 8, generator=gen)
    with torch.no_grad():
        if masked:
            conv(x)  # a cached plan that the fold must invalidate
        expected = bn_reference(bn, reference(conv, mask, x))
        bn_state = {k: v.clone() for k, v in bn.state_dict().items()}
        weight = conv.weight
        fold_batchnorm(conv, bn)
        assert conv.weight is weight
        assert isinstance(conv.bias, nn.Parameter)
        assert_matches_reference(conv(x), expected)
        for k, v in bn.state_dict().items():
            assert torch.equal(v, bn_state[k]), f"bn itself must be left unchanged ({k})"
    if masked:
        assert torch.equal(conv.mask, mask) and torch.all(conv.weight[~mask.unsqueeze(1)] == 0)


def test_fold_batchnorm_act_folds_only_the_norm(gen):
    m, mask = masked_layer(gen)
    m.eval()
    bn = random_bn(BatchNormAct2d(16, act_layer=nn.ReLU6), gen)
    x = torch.randn(2, 16, 9, 9, generator=gen)
    with torch.no_grad():
        expected = bn(m(x))
        ref = F.relu6(bn_reference(bn, reference(m, mask, x)))
        fold_batchnorm(m, bn)
        m.execution = "sparse"
        got = bn.act(bn.drop(m(x)))
    assert_matches_reference(got, ref)
    assert_matches_reference(expected, ref)


def test_fold_batchnorm_errors():
    conv = nn.Conv2d(8, 8, 3, groups=8)
    with pytest.raises(ValueError, match="bn has 16 features but the conv has 8 output channels"):
        fold_batchnorm(conv, nn.BatchNorm2d(16))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fold_batchnorm(conv, nn.BatchNorm2d(8, track_running_stats=False))
    with pytest.raises(TypeError, match="BatchNorm2d.*LayerNorm"):
        fold_batchnorm(conv, nn.LayerNorm(8))
    with pytest.raises(TypeError, match="nn.Conv2d.*Linear"):
        fold_batchnorm(nn.Linear(8, 8), nn.BatchNorm2d(8))


# ------------------------------------------------------------------------------------------- model-level helpers
def test_masked_convs_and_set_execution(gen):
    a, _ = masked_layer(gen)
    b, _ = masked_layer(gen, same=True)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.Sequential(a, nn.ReLU()), b, nn.Conv2d(16, 16, 3, groups=16))
    assert [(name, type(mod)) for name, mod in masked_convs(model)] == [
        ("1.0", MaskedConv2d), ("2", MaskedConv2dSame)]
    assert set_execution(model, "dense") is model
    assert a.execution == b.execution == "dense"
    assert "execution='dense'" in repr(a)
    set_execution(model, "sparse")
    assert a.execution == b.execution == "sparse"
    assert list(masked_convs(a)) == [("", a)]


# ------------------------------------------------------------------------------------------- backend unavailable
def test_missing_backend_warns_once_and_falls_back(monkeypatch, gen, sparse_calls):
    monkeypatch.setattr(layers, "backend_available", lambda: False)
    monkeypatch.setattr(kernel_op, "backend_available", lambda: False)  # the kernels' "can the op run this?"
    monkeypatch.setattr(layers, "_warned_no_backend", False)
    m, mask = masked_layer(gen)
    other, other_mask = masked_layer(gen, same=True)
    x = torch.randn(2, 16, 9, 9, generator=gen)
    with torch.no_grad():
        m.train()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            m(x)  # training never needs the backend: no warning
        m.eval()
        with pytest.warns(UserWarning) as record:
            y = m(x)
        assert len(record) == 1
        message = str(record[0].message)
        assert "fall back to the masked dense conv" in message and "not available" in message
        assert record[0].filename == __file__, "the warning must point at the caller"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y2 = m(x)
            y3 = other.eval()(x)  # once per process, not per layer
        m.execution = "sparse"
        with pytest.raises(RuntimeError, match="execution='sparse'.*not available"):
            m(x)
        with pytest.raises(RuntimeError, match="cannot build a sparse kernel plan.*not available"):
            m.sparse_plan()
    assert not sparse_calls
    assert_matches_reference(y, reference(m, mask, x))
    assert torch.equal(y, y2)
    assert_matches_reference(y3, reference(other, other_mask, x))


# ---------------------------------------------------------------------------------------------------- compile
def test_torch_compile_fullgraph_uses_the_sparse_op(gen):
    from torch._inductor.compile_fx import compile_fx

    torch._dynamo.reset()
    m, _ = masked_layer(gen, c=24)
    model = nn.Sequential(nn.Conv2d(8, 24, 1), m, nn.ReLU6(), nn.Conv2d(24, 8, 1)).eval()
    x = torch.randn(2, 8, 11, 13, generator=gen)
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return compile_fx(gm, example_inputs)

    with torch.no_grad():
        expected = model(x)  # eager call: builds the plan
        got = torch.compile(model, fullgraph=True, backend=backend)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert any("deprune.sparse_dwconv2d" in t for t in targets), targets


# -------------------------------------------------------------------------------------------------------- GPU
def _gpu_skip_reason() -> Optional[str]:
    if not torch.cuda.is_available():
        return "needs a CUDA device: torch.cuda.is_available() is False"
    if not _C.cuda_compiled():
        return "timm_deprune._C was built without CUDA kernels"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_skip_reason() is not None, reason=_gpu_skip_reason() or "")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [CASES[1], CASES[9]], ids=str)
def test_gpu_sparse_equals_dense(case, dtype, gen, sparse_calls):
    conv = make_conv(case, gen)
    mask = make_mask(case.c, *case.kernel, gen)
    x = make_input(case, gen)
    ref = reference(conv, mask, x)
    m = to_masked(conv, mask).eval().to("cuda", dtype)
    assert m.mask.device.type == "cuda" and m.mask.dtype == torch.bool
    with torch.no_grad():
        y = m(x.to("cuda", dtype))
        m.execution = "dense"
        yd = m(x.to("cuda", dtype))
    assert len(sparse_calls) == 1
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert_matches_reference(y.cpu(), ref, rtol=tol)
    assert_matches_reference(yd.cpu(), ref, rtol=tol)
