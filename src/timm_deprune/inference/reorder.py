"""Each block's internal channels: reordered by depth-wise tap pattern, so the channels_last kernel's 8-channel
SIMD blocks run few lanes, and padded to a multiple of 8 with exact-zero channels; both go through PW pruning's
surgery, so block outputs are unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import MixedConv2d

from ..kernels.plan import CHANNEL_BLOCK, block_channel_order, block_lanes
from ..layers import MaskedConv2d
from ..pruning.groups import ChannelGroup, find_channel_groups, group_splits
from ..pruning.surgery import prune_channels

__all__ = ["reorder_dw_channels", "block_shared", "pad_block_channels"]


def _tap_patterns(model: nn.Module, group: ChannelGroup) -> Optional[torch.Tensor]:
    """Kept taps ``[C, T]`` of every masked depth-wise conv carrying ``group``'s channels, side by side along T
    (a MixedConv2d's kernels padded to its largest); None when no masked conv carries them."""
    parts = []
    for path in group.channelwise:
        m = model.get_submodule(path)
        convs = list(m.values()) if isinstance(m, MixedConv2d) else [m]
        if not any(isinstance(c, MaskedConv2d) for c in convs):
            continue
        taps = max(c.weight.shape[2] * c.weight.shape[3] for c in convs)
        rows = []
        for c in convs:
            k = c.weight.shape[2] * c.weight.shape[3]
            mask = c.mask if isinstance(c, MaskedConv2d) else torch.ones(c.weight.shape[0], k, dtype=torch.bool)
            rows.append(F.pad(mask.reshape(mask.shape[0], k).cpu(), (0, taps - k)))
        parts.append(torch.cat(rows))
    return torch.cat(parts, dim=1) if parts else None


@torch.no_grad()
def reorder_dw_channels(model: nn.Module, block: int = CHANNEL_BLOCK) -> int:
    """Reorder each block's internal channels so that channels with similar depth-wise tap patterns share a
    ``block``-channel SIMD block of the channels_last kernel (:func:`~timm_deprune.kernels.plan.block_channel_order`).

    The permutation is applied to everything that carries the channels, exactly like PW filter pruning's surgery:
    the expanding conv's filters, BNs, the depth-wise conv with its mask, squeeze-excite and the projecting conv's
    inputs; so the block's output is unchanged (up to the summation order of the projection). Only channels
    internal to a block move; a group is left alone unless the new order runs fewer SIMD lanes. Returns the
    number of blocks reordered.

    With per-channel ("element") masks at 29% kept, 8 channels in their natural order run the union of their taps,
    about 94% of a 3x3 window; after reordering 40-60% (BENCHMARKS.md).
    """
    n = 0
    for group in find_channel_groups(model):
        patterns = _tap_patterns(model, group)
        if patterns is None:
            continue
        channels = patterns.shape[0]
        cuts = {0, channels}
        for sizes in group_splits(model, group):  # every channel stays inside its part of each MixedConv2d
            cuts.update(int(c) for c in torch.tensor(sizes).cumsum(0))
        bounds = sorted(cuts)
        splits = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        flat = patterns.unsqueeze(1)
        order = block_channel_order(flat, block, splits)
        if block_lanes(flat[order], block) < block_lanes(flat, block):
            prune_channels(model, group, order)
            n += 1
    return n


def block_shared(mask: torch.Tensor, block: int = 8) -> bool:
    """Whether every ``block`` consecutive channels of a ``[C, kh, kw]`` tap mask share one pattern."""
    flat = mask.reshape(mask.shape[0], -1)
    starts = torch.arange(flat.shape[0]) // block * block
    return bool((flat == flat[starts]).all())


@torch.no_grad()
def pad_block_channels(model: nn.Module, multiple: int = 8) -> dict[str, tuple[int, int]]:
    """Round each block's internal channel count up to a multiple of ``multiple`` with exact-zero channels, in place.

    Pruning point-wise filters and removing dead depth-wise channels leaves counts such as 409 of 576, which push
    ONNX Runtime off its blocked-channel (NCHWc) conv kernels onto much slower ones, and leave a ragged last
    8-channel block in our own kernels (the GEMMs' column panels, the channels_last DW kernel's SIMD blocks, the
    CUDA kernel's 16-byte loads). A zero channel (zero expanding
    filter and bias, zero depth-wise weights, zero squeeze-excite and projection weights) outputs ``act(0)`` that
    only zero weights read: the block's output is unchanged. Blocks whose channels are split by a MixedConv2d are
    left alone.

    Returns:
        ``{block path: (channels before, channels after)}`` of the padded blocks.
    """
    padded = {}
    for group in find_channel_groups(model):
        if group_splits(model, group) or any(isinstance(model.get_submodule(p), MixedConv2d)
                                             for p in (group.producer, group.consumer)):
            continue
        producer = model.get_submodule(group.producer)
        channels = int(producer.weight.shape[0])
        extra = -channels % multiple
        if extra:
            index = torch.cat([torch.arange(channels), torch.full((extra,), -1, dtype=torch.long)])
            prune_channels(model, group, index)
            padded[group.block] = (channels, channels + extra)
    return padded
