"""Channel surgery: each function slices one module type along one channel dimension.

:func:`prune_channels` removes a :class:`~timm_deprune.pruning.groups.ChannelGroup`'s channels from every module
that carries them; :func:`fold_dead_channels` first folds the constant output of DW channels with every tap pruned
into what reads the consumer (ARCHITECTURE.md §1).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from timm.layers import MixedConv2d

from .groups import ChannelGroup, is_depthwise

__all__ = ["prune_channels", "fold_dead_channels", "slice_channels", "slice_in", "slice_out", "slice_se"]


def _take(t: torch.Tensor, index: torch.Tensor, dim: int, fill=0) -> torch.Tensor:
    """``t.index_select(dim, index)``, where an index of -1 selects a new slice filled with ``fill``."""
    index = index.to(t.device)
    if bool((index < 0).any()):
        shape = list(t.shape)
        shape[dim] = 1
        t = torch.cat([t, torch.full(shape, fill, dtype=t.dtype, device=t.device)], dim)
        index = torch.where(index < 0, t.shape[dim] - 1, index)
    return t.index_select(dim, index)


def _param(t: Optional[torch.Tensor], index: torch.Tensor, dim: int) -> Optional[nn.Parameter]:
    if t is None:
        return None
    return nn.Parameter(_take(t.detach(), index, dim).clone(), requires_grad=t.requires_grad)


def _local(index: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Split global channel indices into per-part local indices for consecutive parts of ``sizes``."""
    out, start = [], 0
    for size in sizes:
        sel = index[(index >= start) & (index < start + size)]
        out.append(sel - start)
        start += size
    return out


def slice_out(m: nn.Module, index: torch.Tensor) -> None:
    """Keep output channels ``index`` of a point-wise conv / Linear / MixedConv2d."""
    if isinstance(m, MixedConv2d):
        parts = _local(index, [c.out_channels for c in m.values()])
        for c, idx in zip(m.values(), parts):
            slice_out(c, idx)
        m.out_channels = int(index.numel())
        return
    m.weight = _param(m.weight, index, 0)
    if m.bias is not None:
        m.bias = _param(m.bias, index, 0)
    if isinstance(m, nn.Linear):
        m.out_features = int(index.numel())
    else:
        m.out_channels = int(index.numel())


def slice_in(m: nn.Module, index: torch.Tensor) -> None:
    """Keep input channels ``index`` of a point-wise conv / Linear / MixedConv2d."""
    if isinstance(m, MixedConv2d):
        parts = _local(index, m.splits)
        for c, idx in zip(m.values(), parts):
            slice_in(c, idx)
        m.splits = [int(p.numel()) for p in parts]
        m.in_channels = int(index.numel())
        return
    m.weight = _param(m.weight, index, 1)
    if isinstance(m, nn.Linear):
        m.in_features = int(index.numel())
    else:
        m.in_channels = int(index.numel())


def slice_channels(m: nn.Module, index: torch.Tensor) -> None:
    """Keep channels ``index`` of a channel-wise module (BN, depth-wise conv, GRN / norm with [C] params)."""
    n = int(index.numel())
    if isinstance(m, MixedConv2d):
        parts = _local(index, m.splits)
        for c, idx in zip(m.values(), parts):
            slice_channels(c, idx)
        m.splits = [int(p.numel()) for p in parts]
        m.in_channels = m.out_channels = n
    elif isinstance(m, nn.Conv2d):
        if not is_depthwise(m):
            raise TypeError(f"expected a depth-wise conv to slice channel-wise, got {m}")
        m.weight = _param(m.weight, index, 0)
        if m.bias is not None:
            m.bias = _param(m.bias, index, 0)
        m.in_channels = m.out_channels = m.groups = n
        if hasattr(m, "mask") and isinstance(getattr(m, "mask"), torch.Tensor):
            m.set_mask(_take(m.mask, index, 0, False))
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        for name in ("weight", "bias"):
            if getattr(m, name) is not None:
                setattr(m, name, _param(getattr(m, name), index, 0))
        for name, fill in (("running_mean", 0.0), ("running_var", 1.0)):
            if getattr(m, name) is not None:
                setattr(m, name, _take(getattr(m, name), index, 0, fill).clone())
        m.num_features = n
    elif isinstance(m, nn.LayerNorm):
        for name in ("weight", "bias"):
            if getattr(m, name) is not None:
                setattr(m, name, _param(getattr(m, name), index, 0))
        m.normalized_shape = (n,)
    elif hasattr(m, "weight") and isinstance(m.weight, torch.Tensor) and m.weight.dim() == 1:  # GRN-like
        m.weight = _param(m.weight, index, 0)
        if getattr(m, "bias", None) is not None:
            m.bias = _param(m.bias, index, 0)
    elif not isinstance(m, nn.Identity):
        raise TypeError(f"do not know how to remove channels from {type(m).__name__}")


def slice_se(m: nn.Module, index: torch.Tensor) -> None:
    """A squeeze-excite module reads and gates the channels: its reduce conv's inputs, its expand conv's outputs."""
    reduce, expand = (m.conv_reduce, m.conv_expand) if hasattr(m, "conv_reduce") else (m.fc1, m.fc2)
    slice_in(reduce, index)
    slice_out(expand, index)


def prune_channels(model: nn.Module, group: ChannelGroup, index: torch.Tensor) -> None:
    """Keep only channels ``index`` of ``group``, in that order, in every module that carries them.

    An index of -1 inserts an exact-zero channel (zero filter, weights, bias and BN affine, BN variance 1, pruned
    taps): it outputs ``act(0)``, which only zero weights read, so the block's output is unchanged. Not for groups
    with a MixedConv2d (its parts take non-negative indices).
    """
    index = index.to(torch.long).cpu()
    slice_out(model.get_submodule(group.producer), index)
    for path in group.channelwise:
        slice_channels(model.get_submodule(path), index)
    if group.se is not None:
        slice_se(model.get_submodule(group.se), index)
    slice_in(model.get_submodule(group.consumer), index)


@torch.no_grad()
def fold_dead_channels(model: nn.Module, group: ChannelGroup, dead: torch.Tensor) -> None:
    """Fold the constant output of DW channels ``dead`` (all taps pruned) into what reads the consumer conv.

    Such a channel outputs ``chain(dw_bias)`` whatever the input; its contribution ``W[:, j] * const`` to the
    consumer is added to the consumer's bias, or subtracted from the running mean of the BN right after it.
    The caller removes the channels afterwards with :func:`prune_channels`.
    """
    if not group.can_fold_dead:
        raise ValueError(f"block {group.block!r} has a gate between its DW conv and consumer; cannot fold")
    dw = model.get_submodule(group.dw)
    consumer = model.get_submodule(group.consumer)
    x = torch.zeros(1, dw.out_channels, 1, 1, dtype=dw.weight.dtype, device=dw.weight.device)
    if dw.bias is not None:
        x += dw.bias.view(1, -1, 1, 1)
    chain = [model.get_submodule(p) for p in group.dw_chain]
    modes = [m.training for m in chain]
    for m in chain:
        m.eval()
    try:
        for m in chain:
            x = m(x)
    finally:
        for m, mode in zip(chain, modes):
            m.train(mode)
    const = x.flatten()[dead.to(x.device)]
    w = _out_filters_in(consumer)[:, dead.to(x.device)]
    delta = (w.to(const.dtype) @ const).to(w.dtype)
    bn = model.get_submodule(group.consumer_bn) if group.consumer_bn else None
    if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None:
        bn.running_mean.sub_(delta.to(bn.running_mean.dtype))
    elif isinstance(consumer, nn.Conv2d):
        if consumer.bias is None:
            consumer.bias = nn.Parameter(torch.zeros(consumer.out_channels, dtype=w.dtype, device=w.device))
        consumer.bias.add_(delta)
    else:
        raise ValueError(f"cannot fold dead channels into {group.consumer!r} ({type(consumer).__name__})")


def _out_filters_in(m: nn.Module) -> torch.Tensor:
    """Consumer weight as ``[C_out, C_in]`` (dense over all inputs, also for a grouped MixedConv2d)."""
    if isinstance(m, MixedConv2d):
        outs = [c.out_channels for c in m.values()]
        full = torch.zeros(sum(outs), m.in_channels, dtype=next(iter(m.values())).weight.dtype,
                           device=next(iter(m.values())).weight.device)
        r = c0 = 0
        for conv, cin in zip(m.values(), m.splits):
            full[r:r + conv.out_channels, c0:c0 + cin] = conv.weight.detach().flatten(1)
            r += conv.out_channels
            c0 += cin
        return full
    return m.weight.detach().flatten(1)
