"""Checks against oracles that share no code with what they test: which taps and filters are kept (from the dense
weights), HSR ties, and padding (hand-written ``F.pad`` and timm's ``pad_same``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import timm
from timm.layers import pad_same
from timm_deprune import DepruneConfig, build_plan, prune, sparse_dwconv2d
from timm_deprune.kernels.backend import backend_available
from timm_deprune.pruning.select import aligned_count

needs_backend = pytest.mark.skipif(not backend_available(), reason="native backend not built")


def _dense_model():
    torch.manual_seed(0)
    return timm.create_model("mobilenetv2_050", num_classes=10)


@pytest.mark.parametrize("balance", [False, True])
def test_the_largest_depthwise_taps_are_kept(balance):
    dense = _dense_model()
    weights = {p: m.weight.detach().clone()[:, 0] for p, m in dense.named_modules()
               if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1}
    cfg = DepruneConfig(dw_ratio=0.6, balance=balance, remove_dead=False)
    result = prune(dense, cfg, input_size=(3, 32, 32))
    assert result.masks
    for path, mask in result.masks.items():
        mag = weights[path].abs()
        groups = [(0, mask.shape[0])] if not balance else [(g, min(g + 32, mask.shape[0]))
                                                           for g in range(0, mask.shape[0], 32)]
        for g0, g1 in groups:
            kept, pruned = mag[g0:g1][mask[g0:g1]], mag[g0:g1][~mask[g0:g1]]
            assert pruned.numel() and kept.numel()
            assert kept.min() >= pruned.max(), f"{path} group {g0}: a pruned tap outranks a kept one"


def test_the_highest_norm_pointwise_filters_are_kept():
    dense = _dense_model()
    norms = {p: m.weight.detach().flatten(1).norm(dim=1) for p, m in dense.named_modules()
             if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1}
    result = prune(dense, DepruneConfig.deprune(dw_ratio=0.0, pw_ratio=0.4, remove_dead=False),
                   input_size=(3, 32, 32))
    assert result.plan.pw
    for layer in result.plan.pw:
        n = norms[layer.producer]
        kept = torch.zeros(n.numel(), dtype=torch.bool)
        kept[list(layer.kept)] = True
        assert n[kept].min() >= n[~kept].max(), f"{layer.producer}: a removed filter has a larger norm"


def test_hsr_nearest_ties_round_to_the_smaller_count():
    assert aligned_count(1.5 * 32, 288, 32, "nearest", 1) == 32
    assert aligned_count(2.5 * 32, 288, 32, "nearest", 1) == 64
    assert aligned_count(2.51 * 32, 288, 32, "nearest", 1) == 96
    assert aligned_count(1.49 * 32, 288, 32, "nearest", 1) == 32


def _masked_ref(x, w, mask, stride=1, dilation=1):
    return F.conv2d(x.double(), (w * mask.unsqueeze(1)).double(), None, stride, 0, dilation, groups=x.shape[1])


@needs_backend
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("pads", [(0, 2, 1, 0), (2, 0, 0, 1), (1, 0, 2, 2)])  # F.pad order: left, right, top, bottom
def test_four_tuple_padding_is_read_in_f_pad_order(pads, layout):
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(16, 1, 3, 3, generator=gen)
    mask = torch.rand(16, 3, 3, generator=gen) > 0.3
    x = torch.randn(2, 16, 7, 9, generator=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = sparse_dwconv2d(x, build_plan(w, mask), padding=pads)
    ref = _masked_ref(F.pad(x, pads), w, mask)
    assert y.shape == ref.shape
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@needs_backend
@pytest.mark.parametrize("size, k, s, d", [((7, 8), 3, 2, 1), ((10, 9), 5, 2, 1), ((6, 6), 3, 1, 2), ((9, 4), 4, 2, 1)])
def test_same_padding_matches_timm_pad_same(size, k, s, d):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(8, 1, k, k, generator=gen)
    mask = torch.rand(8, k, k, generator=gen) > 0.3
    x = torch.randn(1, 8, *size, generator=gen)
    with torch.no_grad():
        y = sparse_dwconv2d(x, build_plan(w, mask), padding="same", stride=s, dilation=d)
    ref = _masked_ref(pad_same(x, (k, k), (s, s), (d, d)), w, mask, s, d)
    assert y.shape == ref.shape
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
