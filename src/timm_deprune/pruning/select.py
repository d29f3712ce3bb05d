"""Selection: which depth-wise taps (DCP / BWT / HSR) and which point-wise filters to keep (ARCHITECTURE.md §1).

One function, :func:`select_dw_taps`, decides a layer's tap mask from per-tap scores. Alignment (HSR) is part of
the selection: each group's pruned count is chosen aligned to the tile before ranking, so no second pass exists.
Every per-group ranking goes through one helper (``_prune_lowest``), also for :func:`balanced_magnitude_mask`.
:func:`kept_pw_count` and :func:`select_pw_channels` do the same for a block's point-wise filters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..config import ALIGN_MODES
from ..kernels.plan import GROUP_SIZE

__all__ = ["DWSelection", "select_dw_taps", "selection_of", "aligned_count", "balanced_magnitude_mask", "kept_pw_count",
           "select_pw_channels"]


@dataclass(frozen=True)
class DWSelection:
    """A layer's tap mask and the statistics the report needs.

    ``group_ratios`` are the pruned fractions of every ``group``-channel sub-GEMM; their minimum is the paper's
    "Real DW" ratio (a layer runs as slow as its least pruned group).
    """

    mask: torch.Tensor  # bool [C, kh, kw], True = kept
    target_ratio: float
    achieved_ratio: float
    group_ratios: tuple[float, ...]
    group_pruned: tuple[int, ...]
    aligned: bool
    direction: str

    @property
    def min_group_ratio(self) -> float:
        return min(self.group_ratios) if self.group_ratios else 0.0

    @property
    def max_group_ratio(self) -> float:
        return max(self.group_ratios) if self.group_ratios else 0.0

    @property
    def dead_channels(self) -> torch.Tensor:
        """Indices of channels with every tap pruned."""
        return (~self.mask.flatten(1).any(1)).nonzero().flatten()


def aligned_count(target: float, columns: int, tile: int, align: str, min_keep: int) -> int:
    """Pruned-column count of one group: ``target`` rounded as ``align`` says, at most ``columns - min_keep``.

    Example:
        >>> aligned_count(0.71 * 288, 288, 32, "under", 1), aligned_count(0.71 * 288, 288, 32, "over", 1)
        (192, 224)
    """
    most = max(columns - min_keep, 0)
    if align == "none":
        return min(int(round(target)), most)
    steps = target / tile
    if align == "under":
        n = math.floor(steps + 1e-9)
    elif align == "over":
        n = math.ceil(steps - 1e-9)
    else:  # nearest; a tie goes to the safer (smaller) count
        n = math.ceil(steps - 0.5 - 1e-9)
    count = n * tile
    while count > most:  # never prune a group below min_keep: step back a whole tile
        count -= tile
    return max(count, 0)


def _prune_lowest(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of ``scores`` [G, n]; prune the ``counts[g]`` lowest of row g (ties by position). Returns keep mask."""
    order = torch.sort(scores, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return rank >= counts[:, None]


def select_dw_taps(scores: torch.Tensor, ratio: float, *, balance: bool, align: str = "none", tile: int = 32,
                   group: int = 32, min_keep: int = 1, block: int = 1) -> DWSelection:
    """Tap mask of one depth-wise layer from per-tap scores ``[C, kh, kw]`` (higher = more important).

    - DCP (``balance=False``): rank all ``C*kh*kw`` taps of the layer and prune the lowest ``ratio``; with
      ``align`` each group's share of that global ranking is rounded to the tile.
    - BWT (``balance=True``): rank within every ``group``-channel group and prune the same count in each full
      group; a trailing partial group prunes the same fraction.
    - HSR (``align != "none"``): each group's pruned count is a multiple of ``tile`` columns, chosen here.
    - ``block > 1`` ("block:N" granularity): a tap is kept or pruned for ``block`` consecutive channels together,
      ranked by the block's summed score; the rules above then apply to blocks (a block tap is ``block``
      columns). ``block`` must divide ``group`` and ``tile``; a trailing partial block is ranked by its mean.

    Example:
        >>> sel = select_dw_taps(torch.rand(64, 3, 3), 0.71, balance=True, align="under")
        >>> sel.group_pruned, round(sel.achieved_ratio, 3)
        ((192, 192), 0.667)
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must be [C, kh, kw], got shape {list(scores.shape)}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if align not in ALIGN_MODES:
        raise ValueError(f"align must be one of {ALIGN_MODES}, got {align!r}")
    c, kh, kw = scores.shape
    k = kh * kw
    flat = scores.detach().reshape(c, k).to(torch.float64)
    if not torch.isfinite(flat).all():
        raise ValueError("importance scores contain NaN or inf")
    if block != 1:
        return _select_blocks(flat, (c, kh, kw), ratio, balance, align, tile, group, min_keep, block)
    bounds = [(g0, min(g0 + group, c)) for g0 in range(0, c, group)]
    columns = [(g1 - g0) * k for g0, g1 in bounds]

    if balance:
        targets = [ratio * n for n in columns]
    else:
        # DCP: one threshold for the whole layer; a group's target is what that ranking prunes in it.
        # Never the whole layer: at least min_keep taps stay (0.97 of one 3x3 channel rounds to all 9).
        total = min(int(round(ratio * c * k)), max(0, c * k - min_keep))
        pruned = ~_prune_lowest(flat.reshape(1, -1), torch.tensor([total]))[0].reshape(c, k)
        if align == "none":
            mask = ~pruned
            return selection_of(mask.reshape(c, kh, kw), ratio, bounds, k, False, align)
        targets = [float(pruned[g0:g1].sum()) for g0, g1 in bounds]
    counts = [aligned_count(t, n, tile, align, min_keep) for t, n in zip(targets, columns)]

    mask = torch.ones(c, k, dtype=torch.bool, device=scores.device)
    full = c // group
    if full:
        counts_full = torch.tensor(counts[:full], device=scores.device)
        mask[:full * group] = _prune_lowest(flat[:full * group].reshape(full, group * k), counts_full).reshape(-1, k)
    if full < len(bounds):
        g0, g1 = bounds[-1]
        part = flat[g0:g1].reshape(1, -1)
        mask[g0:g1] = _prune_lowest(part, torch.tensor([counts[-1]], device=scores.device)).reshape(-1, k)
    return selection_of(mask.reshape(c, kh, kw), ratio, bounds, k, align != "none", align)


def _select_blocks(flat: torch.Tensor, shape, ratio: float, balance: bool, align: str, tile: int, group: int,
                   min_keep: int, block: int) -> DWSelection:
    """Block granularity: select on per-block scores, then give every channel its block's mask."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if group % block or tile % block:
        raise ValueError(f"block size {block} must divide group ({group}) and tile ({tile})")
    c, kh, kw = shape
    nb = -(-c // block)
    sizes = torch.full((nb,), float(block), dtype=flat.dtype, device=flat.device)
    sizes[-1] = c - (nb - 1) * block
    block_scores = torch.zeros(nb, flat.shape[1], dtype=flat.dtype, device=flat.device)
    block_scores.index_add_(0, torch.arange(c, device=flat.device) // block, flat)
    block_scores /= sizes[:, None]  # mean, so a trailing partial block is not ranked lower for being short
    sel = select_dw_taps(block_scores.reshape(nb, kh, kw), ratio, balance=balance, align=align, tile=tile // block,
                         group=group // block, min_keep=-(-min_keep // block), block=1)
    mask = sel.mask.to(flat.device).repeat_interleave(block, dim=0)[:c]
    bounds = [(g0, min(g0 + group, c)) for g0 in range(0, c, group)]
    return selection_of(mask, ratio, bounds, kh * kw, sel.aligned, align)


def selection_of(mask: torch.Tensor, ratio: float, bounds, k: int, aligned: bool, align: str) -> DWSelection:
    """The :class:`DWSelection` of ``mask`` ``[C, kh, kw]`` with groups ``bounds`` (``(first, end)`` channels)."""
    per_channel_pruned = k - mask.reshape(mask.shape[0], k).sum(1)
    group_pruned = tuple(int(per_channel_pruned[g0:g1].sum()) for g0, g1 in bounds)
    group_ratios = tuple(p / ((g1 - g0) * k) for p, (g0, g1) in zip(group_pruned, bounds))
    achieved = sum(group_pruned) / float(mask.numel())
    return DWSelection(mask=mask.to(torch.bool).cpu(), target_ratio=float(ratio), achieved_ratio=achieved,
                       group_ratios=group_ratios, group_pruned=group_pruned, aligned=aligned, direction=align)


def balanced_magnitude_mask(weight: torch.Tensor, keep: float, group: int = GROUP_SIZE) -> torch.Tensor:
    """Tap mask ``[C, kh, kw]`` keeping, in every ``group``-channel group, the same number of largest-|w| taps.

    BWT at a fixed keep ratio without tiles or ``min_keep`` (benchmarks and kernel tests use it): each group keeps
    ``round(keep * group_channels * kh * kw)`` taps (a trailing partial group proportionally).

    Example:
        >>> m = balanced_magnitude_mask(torch.randn(64, 1, 3, 3), 0.29)
        >>> int(m[:32].sum()) == int(m[32:].sum()) == round(0.29 * 288)
        True
    """
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be in [0, 1], got {keep}")
    c, _, kh, kw = weight.shape
    mags = weight.detach().abs().reshape(c, kh * kw).to(torch.float64)
    mask = torch.ones(c, kh * kw, dtype=torch.bool, device=weight.device)
    for g0 in range(0, c, group):
        block = mags[g0:g0 + group].reshape(1, -1)
        pruned = block.shape[1] - int(round(keep * block.shape[1]))
        mask[g0:g0 + group] = _prune_lowest(block, torch.tensor([pruned], device=weight.device)).reshape(-1, kh * kw)
    return mask.reshape(c, kh, kw)


def kept_pw_count(channels: int, ratio: float, tile: int, min_keep: int) -> int:
    """Channels a point-wise layer keeps: ``channels * (1 - ratio)`` rounded to a multiple of ``tile``.

    Example:
        >>> kept_pw_count(144, 0.3, 32, 1), kept_pw_count(32, 0.3, 32, 1), kept_pw_count(96, 0.0, 32, 1)
        (96, 32, 96)
    """
    if ratio <= 0.0:
        return channels
    keep = int(round(channels * (1.0 - ratio) / tile)) * tile
    keep = max(keep, tile, min_keep)
    return min(keep, channels)


def select_pw_channels(scores: torch.Tensor, keep: int, splits: Sequence[Sequence[int]] = ()) -> torch.Tensor:
    """Sorted indices of the ``keep`` highest-scored channels (ties by position).

    ``splits`` are channel partitions (MixedConv2d) that must each keep at least one channel: the lowest kept
    channel outside a starved split is traded for that split's best channel.
    """
    order = torch.sort(-scores.detach().double(), stable=True).indices
    kept = set(order[:keep].tolist())
    ranked = order.tolist()
    for split in splits:
        start = 0
        for size in split:
            part = range(start, start + size)
            if size and not any(i in kept for i in part):
                best = max(part, key=lambda i: (scores[i].item(), -i))
                victim = next(i for i in reversed(ranked) if i in kept and _split_size_kept(kept, split, i) > 1)
                kept.discard(victim)
                kept.add(best)
            start += size
    return torch.tensor(sorted(kept), dtype=torch.long)


def _split_size_kept(kept: set, split: Sequence[int], index: int) -> int:
    start = 0
    for size in split:
        if start <= index < start + size:
            return sum(1 for i in range(start, start + size) if i in kept)
        start += size
    return 0
