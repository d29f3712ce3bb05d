"""Balanced magnitude masks (BWT selection at a fixed keep ratio): used by benchmarks and tests of the kernels.

The pruning engine's full DCP / BWT / HSR selection builds on the same per-group ranking.
"""
from __future__ import annotations

import torch

from .sparse_plan import GROUP_SIZE


def balanced_magnitude_mask(weight: torch.Tensor, keep: float, group: int = GROUP_SIZE) -> torch.Tensor:
    """Tap mask ``[C, kh, kw]`` keeping, in every ``group``-channel group, the same number of largest-|w| taps.

    Each group keeps ``round(keep * group_channels * kh * kw)`` taps (a trailing partial group proportionally).

    Example:
        >>> m = balanced_magnitude_mask(torch.randn(64, 1, 3, 3), 0.29)
        >>> int(m[:32].sum()) == int(m[32:].sum()) == round(0.29 * 288)
        True
    """
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be in [0, 1], got {keep}")
    c, _, kh, kw = weight.shape
    mags = weight.detach().abs().reshape(c, kh * kw)
    mask = torch.zeros(c, kh * kw, dtype=torch.bool, device=weight.device)
    for g0 in range(0, c, group):
        block = mags[g0:g0 + group].reshape(-1)
        k = int(round(keep * block.numel()))
        if k:
            mask[g0:g0 + group].view(-1)[block.topk(k).indices] = True
    return mask.reshape(c, kh, kw)
