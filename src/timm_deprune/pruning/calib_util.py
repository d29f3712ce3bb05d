"""Helpers of one-shot calibration (ARCHITECTURE.md §9): reading the calibration batches, sampling positions,
activations as rows, channel maps after surgery, the consumers' input energy."""
from __future__ import annotations

import resource
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from timm.layers import MixedConv2d

from .groups import ChannelGroup

__all__ = ["collect_inputs", "max_rss_mb", "positions", "take_rows", "dw_dense_channels", "input_energy"]


def collect_inputs(batches: Iterable, limit: Optional[int] = None) -> list[torch.Tensor]:
    """The input tensors of ``batches`` (tensors, ``(input, target)`` pairs or a DataLoader), on the CPU, at most
    ``limit`` samples in all; images (4-D) in channels-last memory format, which PyTorch's CPU convolutions run
    about twice as fast. Raises ValueError when nothing is left."""
    from ..recalibrate import batch_inputs

    out: list[torch.Tensor] = []
    seen = 0
    for x in batch_inputs(batches, torch.device("cpu")):
        if x.dim() == 0:
            raise ValueError(f"calibration batch {len(out)} is a scalar tensor; expected [N, C, H, W] inputs")
        if limit is not None:
            x = x[: max(limit - seen, 0)]
        if len(x):
            x = x.detach()
            out.append(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)
            seen += len(x)
        if limit is not None and seen >= limit:
            break
    if not out:
        raise ValueError("calibration data is empty: give at least one batch of input tensors")
    return out


def max_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def positions(count: int, n: int, per_image: int, seed: int) -> Optional[torch.Tensor]:
    """``[n, per_image]`` random flat positions out of ``count`` (each image its own, drawn with replacement from a
    generator seeded by ``seed``); None (all) when ``per_image >= count``."""
    if per_image >= count:
        return None
    return torch.randint(count, (n, per_image), generator=torch.Generator().manual_seed(seed))


def take_rows(layer: nn.Module, t: torch.Tensor, idx: Optional[torch.Tensor]) -> torch.Tensor:
    """Activation ``t`` of ``layer`` as float32 rows ``[samples, channels]`` at the positions ``idx`` ``[N, L]`` of
    each image (all when None): ``[N, C, ...]`` for a conv, channels last ``[N, ..., C]`` for a Linear."""
    n = t.shape[0]
    if isinstance(layer, nn.Linear):
        flat = t.reshape(n, -1, t.shape[-1])
        if idx is not None:
            flat = flat.gather(1, idx[:, :, None].expand(n, idx.shape[1], flat.shape[-1]))
        return flat.reshape(-1, flat.shape[-1]).float()
    flat = t.reshape(n, t.shape[1], -1)
    if idx is not None:
        flat = flat.gather(2, idx[:, None, :].expand(n, flat.shape[1], idx.shape[1]))
    return flat.transpose(1, 2).reshape(-1, flat.shape[1]).float()


def dw_dense_channels(dense: nn.Module, groups: Sequence[ChannelGroup], kept: dict[str, torch.Tensor],
                      path: str) -> Optional[torch.Tensor]:
    """The dense channels a depth-wise conv ``path`` still has after point-wise surgery (``kept``: the kept internal
    channels per group producer): the group's kept channels, or their share of a MixedConv2d's split when ``path``
    is one of its convs; None when its channels were not touched by any group."""
    for g in groups:
        if g.producer not in kept:
            continue
        if g.dw == path:
            return kept[g.producer]
        parent, _, name = path.rpartition(".")
        if parent in g.channelwise and isinstance(dense.get_submodule(parent), MixedConv2d):
            mixed = dense.get_submodule(parent)
            names = [n for n, _ in mixed.named_children()]
            if name not in names:
                return None
            j = names.index(name)
            sizes = [c.out_channels for c in mixed.values()]
            lo = sum(sizes[:j])
            ch = kept[g.producer]
            return ch[(ch >= lo) & (ch < lo + sizes[j])] - lo
    return None


def input_energy(m: nn.Module) -> torch.Tensor:
    """``Σ`` of squared weights reading each input channel of a consumer (Linear, conv of any groups, MixedConv2d)."""
    if isinstance(m, MixedConv2d):
        return torch.cat([input_energy(c) for c in m.values()])
    w = m.weight.detach().double()
    if isinstance(m, nn.Linear):
        return w.square().sum(0)
    groups = m.groups
    per = w.square().sum((2, 3))  # [out, in / groups]
    out_per = per.shape[0] // groups
    return torch.cat([per[i * out_per:(i + 1) * out_per].sum(0) for i in range(groups)])
