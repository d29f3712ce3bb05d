"""DCP / BWT / HSR tap selection and DepruneConfig validation (no model needed)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from timm_deprune import DepruneConfig
from timm_deprune.config import resolve_ratios
from timm_deprune.pruning.select import aligned_count, select_dw_taps


def _threshold_holds(scores: torch.Tensor, mask: torch.Tensor) -> bool:
    """Every kept score is >= every pruned score (magnitude ranking)."""
    kept, pruned = scores[mask], scores[~mask]
    return kept.numel() == 0 or pruned.numel() == 0 or bool(kept.min() >= pruned.max())


def _group_pruned(mask: torch.Tensor, group: int) -> list[int]:
    return [int((~mask[g:g + group]).sum()) for g in range(0, mask.shape[0], group)]


@pytest.mark.parametrize("shape", [(64, 3, 3), (100, 5, 5), (7, 3, 3), (40, 1, 9)])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.71, 0.95])
def test_dcp_prunes_the_smallest_fraction_of_the_layer(gen, shape, ratio):
    scores = torch.rand(shape, generator=gen)
    sel = select_dw_taps(scores, ratio, balance=False)
    total = math.prod(shape)
    assert int((~sel.mask).sum()) == round(ratio * total)
    assert _threshold_holds(scores, sel.mask)
    assert sel.achieved_ratio == pytest.approx(round(ratio * total) / total)
    assert not sel.aligned and sel.direction == "none"


@pytest.mark.parametrize("shape", [(64, 3, 3), (96, 5, 5), (70, 3, 3)])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.71])
def test_bwt_prunes_equally_in_every_full_group_and_ranks_within_it(gen, shape, ratio):
    scores = torch.rand(shape, generator=gen)
    sel = select_dw_taps(scores, ratio, balance=True, group=32)
    k = shape[1] * shape[2]
    pruned = _group_pruned(sel.mask, 32)
    full = shape[0] // 32
    assert pruned[:full] == [round(ratio * 32 * k)] * full
    if shape[0] % 32:  # trailing partial group prunes the same fraction
        assert pruned[-1] == round(ratio * (shape[0] % 32) * k)
    for g in range(0, shape[0], 32):
        assert _threshold_holds(scores[g:g + 32], sel.mask[g:g + 32])
    assert sel.group_pruned == tuple(pruned)
    assert sel.min_group_ratio == pytest.approx(min(p / (min(32, shape[0] - i * 32) * k) for i, p in enumerate(pruned)))


def test_bwt_balances_what_dcp_leaves_unbalanced(gen):
    scores = torch.rand(64, 3, 3, generator=gen)
    scores[:32] *= 0.5  # group 0 has smaller weights: DCP prunes it more than group 1
    dcp = select_dw_taps(scores, 0.5, balance=False)
    bwt = select_dw_taps(scores, 0.5, balance=True)
    assert dcp.group_pruned[0] > dcp.group_pruned[1]
    assert bwt.group_pruned[0] == bwt.group_pruned[1] == 144
    assert bwt.min_group_ratio == bwt.max_group_ratio == 0.5 < dcp.max_group_ratio


@pytest.mark.parametrize("align", ["under", "over", "nearest"])
@pytest.mark.parametrize("balance", [True, False])
@pytest.mark.parametrize("shape", [(64, 3, 3), (96, 5, 5), (50, 3, 3), (33, 7, 7)])
@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.71, 0.9])
def test_hsr_counts_are_tile_multiples_within_one_tile_of_target(gen, align, balance, shape, ratio):
    scores = torch.rand(shape, generator=gen)
    sel = select_dw_taps(scores, ratio, balance=balance, align=align, tile=32, group=32)
    k = shape[1] * shape[2]
    ref = select_dw_taps(scores, ratio, balance=balance)  # the unaligned targets
    assert sel.aligned and sel.direction == align
    for i, (p, target) in enumerate(zip(sel.group_pruned, ref.group_pruned)):
        cols = min(32, shape[0] - 32 * i) * k
        t = ratio * cols if balance else target
        assert p % 32 == 0
        assert abs(p - t) < 32
        if align == "under":
            assert p <= t + 1e-9
        elif align == "over" and t + 32 <= cols - 1:
            assert p >= t - 1e-9
        else:
            assert abs(p - t) <= 16 + 1e-9 or align == "over"
        assert _threshold_holds(scores[32 * i:32 * (i + 1)], sel.mask[32 * i:32 * (i + 1)])
    if balance:
        full = shape[0] // 32
        assert len(set(sel.group_pruned[:full])) <= 1


def test_hsr_steps_of_one_ninth_for_3x3():
    assert [aligned_count(0.71 * 288, 288, 32, a, 1) for a in ("under", "over", "nearest")] == [192, 224, 192]
    assert aligned_count(0.75 * 288, 288, 32, "nearest", 1) == 224  # 216 -> 6.75 tiles -> 7
    assert aligned_count(0.999 * 288, 288, 32, "over", 1) == 256  # never all 288: min_keep


def test_dcp_never_prunes_a_whole_layer():
    # Found by hypothesis: one 3x3 channel at ratio 0.96875 rounded to 9 of 9 taps pruned.
    sel = select_dw_taps(torch.rand(1, 3, 3, generator=torch.Generator().manual_seed(0)), 0.96875, balance=False)
    assert int(sel.mask.sum()) == 1 and sel.achieved_ratio < 1.0
    sel = select_dw_taps(torch.rand(2, 3, 3), 0.99, balance=False, min_keep=3)
    assert int(sel.mask.sum()) == 3


@settings(max_examples=60, deadline=None)
@given(c=st.integers(1, 130), k=st.sampled_from([(3, 3), (5, 5), (1, 9), (7, 7)]),
       ratio=st.floats(0.0, 0.99), balance=st.booleans(), align=st.sampled_from(["none", "under", "over", "nearest"]),
       min_keep=st.integers(1, 5), seed=st.integers(0, 2 ** 31 - 1))
def test_selection_properties_hold_for_random_layers(c, k, ratio, balance, align, min_keep, seed):
    scores = torch.rand(c, *k, generator=torch.Generator().manual_seed(seed))
    sel = select_dw_taps(scores, ratio, balance=balance, align=align, min_keep=min_keep)
    assert sel.mask.shape == scores.shape and sel.mask.dtype == torch.bool
    assert sum(sel.group_pruned) == int((~sel.mask).sum())
    assert 0.0 <= sel.achieved_ratio < 1.0
    if balance or align != "none":
        for g, p in zip(range(0, c, 32), sel.group_pruned):
            cols = min(32, c - g) * k[0] * k[1]
            assert cols - p >= min(min_keep, cols)
            assert _threshold_holds(scores[g:g + 32], sel.mask[g:g + 32])
            if align != "none":
                assert p % 32 == 0


@settings(max_examples=60, deadline=None)
@given(c=st.integers(1, 130), k=st.sampled_from([(3, 3), (5, 5), (1, 9)]), block=st.sampled_from([2, 4, 8, 16, 32]),
       ratio=st.floats(0.0, 0.95), balance=st.booleans(), align=st.sampled_from(["none", "under", "over"]),
       seed=st.integers(0, 2 ** 31 - 1))
def test_block_granularity_shares_taps_per_block_and_keeps_bwt_hsr(c, k, block, ratio, balance, align, seed):
    scores = torch.rand(c, *k, generator=torch.Generator().manual_seed(seed))
    sel = select_dw_taps(scores, ratio, balance=balance, align=align, block=block)
    flat = sel.mask.reshape(c, -1)
    for b0 in range(0, c, block):  # one pattern per block of consecutive channels
        assert (flat[b0:b0 + block] == flat[b0]).all()
    nb = -(-c // block)
    block_scores = torch.stack([scores[b0:b0 + block].reshape(-1, k[0] * k[1]).mean(0) for b0 in range(0, c, block)])
    block_mask = flat[::block]
    assert sum(sel.group_pruned) == int((~sel.mask).sum())
    full_groups = c // 32
    for g in range(-(-c // 32)):
        rows = slice(g * 32 // block, min((g + 1) * 32 // block, nb))
        if balance or align != "none":  # ranking within the group, on block scores
            assert _threshold_holds(block_scores[rows], block_mask[rows])
        if align != "none" and (g < full_groups or c % block == 0):
            assert sel.group_pruned[g] % 32 == 0, sel.group_pruned  # HSR: whole tiles of columns
    if not balance and align == "none":
        assert _threshold_holds(block_scores, block_mask)
    if balance:
        assert len(set(sel.group_pruned[:full_groups])) <= 1


def test_block_one_is_element_granularity(gen):
    scores = torch.rand(70, 3, 3, generator=gen)
    for balance, align in [(False, "none"), (True, "none"), (True, "under")]:
        a = select_dw_taps(scores, 0.71, balance=balance, align=align)
        b = select_dw_taps(scores, 0.71, balance=balance, align=align, block=1)
        assert torch.equal(a.mask, b.mask)


def test_block_granularity_rejects_blocks_that_split_groups():
    with pytest.raises(ValueError, match=r"block size 12 must divide group \(32\) and tile \(32\)"):
        select_dw_taps(torch.rand(64, 3, 3), 0.5, balance=True, block=12)


@pytest.mark.parametrize("kwargs, match", [
    ({"ratio": 1.0}, r"ratio must be in \[0, 1\), got 1.0"),
    ({"ratio": -0.1}, r"got -0.1"),
    ({"ratio": 0.5, "align": "up"}, r"align must be one of .* got 'up'"),
])
def test_selection_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_dw_taps(torch.rand(8, 3, 3), balance=True, **kwargs)


def test_selection_rejects_bad_scores():
    with pytest.raises(ValueError, match=r"\[C, kh, kw\], got shape \[8, 9\]"):
        select_dw_taps(torch.rand(8, 9), 0.5, balance=False)
    with pytest.raises(ValueError, match="NaN"):
        select_dw_taps(torch.full((8, 3, 3), float("nan")), 0.5, balance=False)


def test_presets_name_the_paper_methods():
    assert DepruneConfig.deprune(0.5).method == "DEPrune"
    b = DepruneConfig.deprune_b(0.5, 0.3)
    assert (b.method, b.balance, b.align, b.pw_ratio) == ("DEPrune-B", True, "none", 0.3)
    bh = DepruneConfig.deprune_bh(dw_ratio=0.71, pw_ratio=0.3, align="over")
    assert (bh.method, bh.align) == ("DEPrune-BH", "over")
    with pytest.raises(ValueError, match="got 'none'"):
        DepruneConfig.deprune_bh(0.5, align="none")


@pytest.mark.parametrize("kwargs, match", [
    ({"dw_ratio": 1.0}, r"dw_ratio must be in \[0, 1\), got 1.0"),
    ({"pw_ratio": -0.2}, r"pw_ratio must be in \[0, 1\), got -0.2"),
    ({"dw_ratio": {"blocks.*": 1.5}}, r"dw_ratio\['blocks.\*'\] must be in \[0, 1\), got 1.5"),
    ({"dw_ratio": "0.5"}, r"dw_ratio must be a number in \[0, 1\), got '0.5'"),
    ({"tile": 0}, r"tile must be a positive int, got 0"),
    ({"group": -32}, r"group must be a positive int, got -32"),
    ({"pw_tile": 2.5}, r"pw_tile must be a positive int, got 2.5"),
    ({"align": "down"}, r"align must be one of .* got 'down'"),
    ({"importance": "taylor"}, r"importance must be one of .* got 'taylor'"),
    ({"min_keep": 0}, r"min_keep must be a positive int, got 0"),
    ({"ignore": [3]}, r"ignore must be module path globs"),
    ({"granularity": "channel"}, r"granularity must be 'element' or 'block:N' .* got 'channel'"),
    ({"granularity": "block:0"}, r"got 'block:0'"),
    ({"granularity": "block:12"}, r"granularity 'block:12': the block size must divide group \(32\) and tile"),
])
def test_config_rejects_bad_values_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DepruneConfig(**kwargs)


def test_config_round_trips_through_dict():
    cfg = DepruneConfig.deprune_bh(dw_ratio={"blocks.1.*": 0.5, "*": 0.71}, pw_ratio=0.3, ignore=("conv_stem",),
                                   granularity="block:8")
    again = DepruneConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ValueError, match=r"unknown DepruneConfig keys \['ratio'\]"):
        DepruneConfig.from_dict({"ratio": 0.5})


def test_ratio_mapping_exact_path_beats_glob_and_unknown_keys_raise():
    paths = ["blocks.0.0.conv_dw", "blocks.1.0.conv_dw", "blocks.1.1.conv_dw"]
    got = resolve_ratios({"blocks.1.*": 0.5, "blocks.1.1.conv_dw": 0.7}, paths, "dw_ratio")
    assert got == {"blocks.1.0.conv_dw": 0.5, "blocks.1.1.conv_dw": 0.7}
    assert resolve_ratios(0.3, paths, "dw_ratio") == dict.fromkeys(paths, 0.3)
    with pytest.raises(ValueError, match=r"dw_ratio key\(s\) \['blocks.9.conv_dw'\] match no prunable layer"):
        resolve_ratios({"blocks.9.conv_dw": 0.5}, paths, "dw_ratio")
