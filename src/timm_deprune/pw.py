"""Point-wise filter pruning: which block-internal channels to keep, and the channel surgery that removes them.

A :class:`ChannelGroup` is the set of channels internal to one block: made by a point-wise ``producer`` conv,
carried by channel-wise modules (BN, the depth-wise conv, squeeze-excite), read by a point-wise ``consumer``.
Removing a channel removes it from all of them at once, so the block's input and output (the residual path)
never change shape. Groups are found per block type (hand-written: the few block types timm's DSConv families
are built from are explicit about their order, which a traced dependency graph would have to rediscover).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from timm.layers import MixedConv2d
from timm.models._efficientnet_blocks import CondConvResidual, InvertedResidual, UniversalInvertedResidual

__all__ = ["ChannelGroup", "find_channel_groups", "select_pw_channels", "prune_channels", "is_depthwise",
           "fold_dead_channels", "kept_pw_count"]

_POINTWISE_ACTS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.Sigmoid, nn.Hardsigmoid, nn.Tanh,
                   nn.LeakyReLU, nn.PReLU, nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d)


def is_depthwise(m: nn.Module) -> bool:
    """A plain depth-wise conv: ``groups == in == out > 1``, kernel larger than 1x1."""
    return (isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels
            and m.kernel_size[0] * m.kernel_size[1] > 1)


def _is_dw_like(m: nn.Module) -> bool:
    return is_depthwise(m) or (isinstance(m, MixedConv2d) and all(is_depthwise(c) for c in m.values()))


def _is_pw_like(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, MixedConv2d):
        return all(_is_pw_like(c) for c in m.values())
    return type(m) in (nn.Conv2d,) and m.groups == 1 and m.kernel_size == (1, 1)


def _is_se(m: nn.Module) -> bool:
    return (hasattr(m, "conv_reduce") and hasattr(m, "conv_expand")) or (hasattr(m, "fc1") and hasattr(m, "fc2")
                                                                         and isinstance(m.fc1, nn.Conv2d))


@dataclass
class ChannelGroup:
    """The internal channels of one block and every module that carries them (module paths)."""

    block: str
    producer: str  # point-wise conv whose output filters are these channels; key of pw_ratio
    consumer: str  # point-wise conv reading them
    channelwise: list[str] = field(default_factory=list)  # BN / DW conv / GRN, sliced along the channel dim
    producer_bn: Optional[str] = None
    se: Optional[str] = None
    dw: Optional[str] = None  # the depth-wise conv carrying the channels, if any
    dw_chain: list[str] = field(default_factory=list)  # modules between ``dw`` and ``consumer``
    consumer_bn: Optional[str] = None  # BN reading the consumer's output directly (dead-channel folding)

    @property
    def can_fold_dead(self) -> bool:
        """Whether a channel with every DW tap pruned has a constant value at the consumer's input."""
        return self.dw is not None and self.se is None


def _sub(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def _identity(m: Optional[nn.Module]) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _pointwise_chain(mods: Sequence[nn.Module]) -> bool:
    """Every module applies an element-wise function per channel in eval mode (BN, activation, identity)."""
    for m in mods:
        if isinstance(m, nn.BatchNorm2d):
            if any(not isinstance(c, _POINTWISE_ACTS) and not _has_only_pointwise(c) for c in m.children()):
                return False
        elif not isinstance(m, _POINTWISE_ACTS) and not _has_only_pointwise(m):
            return False
    return True


def _has_only_pointwise(m: nn.Module) -> bool:
    kids = list(m.children())
    if isinstance(m, nn.Sequential):
        return all(isinstance(c, (_POINTWISE_ACTS, nn.BatchNorm2d)) or _has_only_pointwise(c) for c in kids)
    # timm activation modules (HardSwish, GELU variants, ...) are leaf modules from timm.layers.activations
    return not kids and type(m).__module__.startswith("timm.layers.activations")


def _inverted_residual(model: nn.Module, path: str, m: InvertedResidual) -> Optional[ChannelGroup]:
    if not (_is_pw_like(m.conv_pw) and _is_pw_like(m.conv_pwl) and _is_dw_like(m.conv_dw)):
        return None
    se = None if _identity(m.se) else _sub(path, "se")
    if se is not None and not _is_se(m.se):
        return None  # an attention module we do not know how to slice
    chain = [_sub(path, "bn2"), _sub(path, "aa")] + ([] if se is None else [se])
    group = ChannelGroup(
        block=path, producer=_sub(path, "conv_pw"), consumer=_sub(path, "conv_pwl"), producer_bn=_sub(path, "bn1"),
        channelwise=[_sub(path, "bn1"), _sub(path, "conv_dw"), _sub(path, "bn2")], se=se,
        dw=_sub(path, "conv_dw") if is_depthwise(m.conv_dw) else None, dw_chain=chain,
        consumer_bn=_sub(path, "bn3"),
    )
    if not _identity(m.aa) or (group.dw is not None and not _pointwise_chain([m.bn2, m.aa])):
        group.dw = None  # blur-pool or unknown module between DW and consumer: dead channels are not constant
    return group


def _universal_inverted_residual(model: nn.Module, path: str, m: UniversalInvertedResidual) -> Optional[ChannelGroup]:
    if _identity(m.pw_exp) or not _is_pw_like(m.pw_exp.conv) or not _is_pw_like(m.pw_proj.conv):
        return None
    se = None if _identity(m.se) else _sub(path, "se")
    if se is not None and not _is_se(m.se):
        return None
    channelwise = [_sub(path, "pw_exp.bn")]
    dw = None
    chain: list[str] = []
    if not _identity(m.dw_mid):
        if not _is_dw_like(m.dw_mid.conv) or not _identity(getattr(m.dw_mid, "aa", None)):
            return None
        channelwise += [_sub(path, "dw_mid.conv"), _sub(path, "dw_mid.bn")]
        if is_depthwise(m.dw_mid.conv) and _pointwise_chain([m.dw_mid.bn]):
            dw, chain = _sub(path, "dw_mid.conv"), [_sub(path, "dw_mid.bn")]
    if not _identity(getattr(m.pw_exp, "aa", None)):
        return None
    return ChannelGroup(
        block=path, producer=_sub(path, "pw_exp.conv"), consumer=_sub(path, "pw_proj.conv"),
        producer_bn=_sub(path, "pw_exp.bn"), channelwise=channelwise, se=se, dw=dw, dw_chain=chain,
        consumer_bn=_sub(path, "pw_proj.bn"),
    )


def _mlp(model: nn.Module, path: str, mlp: nn.Module) -> Optional[ChannelGroup]:
    """A ConvNeXt-style MLP: fc1 -> act -> (norm | GRN) -> fc2; its hidden dim is block-internal."""
    if not (_is_pw_like(mlp.fc1) and _is_pw_like(mlp.fc2)):
        return None
    channelwise = []
    for name in ("norm", "grn"):
        sub = getattr(mlp, name, None)
        if sub is not None and not isinstance(sub, nn.Identity):
            if not hasattr(sub, "weight") or sub.weight is None or sub.weight.dim() != 1:
                return None
            channelwise.append(_sub(path, name))
    return ChannelGroup(block=path, producer=_sub(path, "fc1"), consumer=_sub(path, "fc2"), channelwise=channelwise)


def find_channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """Channel groups of every block whose internal channels can be pruned, in module order."""
    groups = []
    for path, m in model.named_modules():
        group = None
        if isinstance(m, InvertedResidual) and not isinstance(m, CondConvResidual):
            group = _inverted_residual(model, path, m)
        elif isinstance(m, UniversalInvertedResidual):
            group = _universal_inverted_residual(model, path, m)
        elif type(m).__name__ == "ConvNeXtBlock" and hasattr(m, "mlp"):
            group = _mlp(model, _sub(path, "mlp"), m.mlp)
        if group is not None:
            groups.append(group)
    return groups


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


def _out_filters(m: nn.Module) -> torch.Tensor:
    """Weights of every output filter as rows ``[C_out, fan_in]``."""
    if isinstance(m, MixedConv2d):
        return torch.cat([_out_filters(c) for c in m.values()], 0)
    return m.weight.detach().flatten(1)


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


def group_splits(model: nn.Module, group: ChannelGroup) -> list[list[int]]:
    """Channel partitions imposed by MixedConv2d modules in the group."""
    out = []
    for path in [group.producer, group.consumer] + group.channelwise:
        m = _get(model, path)
        if isinstance(m, MixedConv2d):
            sizes = [c.out_channels for c in m.values()] if path == group.producer else list(m.splits)
            out.append(sizes)
    return out


def filter_scores(model: nn.Module, group: ChannelGroup, importance) -> torch.Tensor:
    """Importance of every internal channel: the l2 (or l1) norm of its producer filter, optionally BN-scaled."""
    scores = _filter_scores(model, group, importance)
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"point-wise importance of {group.producer!r} contains NaN or inf (check its weights and"
                         " BatchNorm statistics)")
    return scores


def _filter_scores(model: nn.Module, group: ChannelGroup, importance) -> torch.Tensor:
    producer = _get(model, group.producer)
    if callable(importance):
        scores = importance("pw", group.producer, producer)
        channels = _out_filters(producer).shape[0]
        if not isinstance(scores, torch.Tensor) or scores.shape != (channels,):
            raise ValueError(f"importance callable must return a [{channels}] tensor for point-wise layer"
                             f" {group.producer!r}, got {getattr(scores, 'shape', type(scores))}")
        return scores.detach().float().cpu()
    rows = _out_filters(producer).float()
    scores = rows.abs().sum(1) if importance == "l1" else rows.norm(dim=1)
    if importance == "bn_scaled":
        if group.producer_bn is None:
            raise ValueError(f"importance 'bn_scaled' needs a BatchNorm after {group.producer!r}; none found")
        scores = scores * bn_scale(_get(model, group.producer_bn))
    return scores.cpu()


def bn_scale(bn: nn.Module) -> torch.Tensor:
    """``|gamma| / sqrt(running_var + eps)`` of a BatchNorm (ones where a part is missing)."""
    scale = torch.ones(bn.num_features)
    if getattr(bn, "running_var", None) is not None:
        scale = scale / torch.sqrt(bn.running_var.detach().float().cpu() + bn.eps)
    if getattr(bn, "weight", None) is not None:
        scale = scale * bn.weight.detach().float().abs().cpu()
    return scale


# ---- surgery: each function slices one module type along one channel dimension ----

def _param(t: Optional[torch.Tensor], index: torch.Tensor, dim: int) -> Optional[nn.Parameter]:
    if t is None:
        return None
    return nn.Parameter(t.detach().index_select(dim, index.to(t.device)).clone(), requires_grad=t.requires_grad)


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
            m.set_mask(m.mask.index_select(0, index.to(m.mask.device)))
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        for name in ("weight", "bias"):
            if getattr(m, name) is not None:
                setattr(m, name, _param(getattr(m, name), index, 0))
        for name in ("running_mean", "running_var"):
            if getattr(m, name) is not None:
                setattr(m, name, getattr(m, name).index_select(0, index.to(getattr(m, name).device)).clone())
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
    """Keep only channels ``index`` (sorted) of ``group`` in every module that carries them."""
    index = index.to(torch.long).cpu()
    slice_out(_get(model, group.producer), index)
    for path in group.channelwise:
        slice_channels(_get(model, path), index)
    if group.se is not None:
        slice_se(_get(model, group.se), index)
    slice_in(_get(model, group.consumer), index)


@torch.no_grad()
def fold_dead_channels(model: nn.Module, group: ChannelGroup, dead: torch.Tensor) -> None:
    """Fold the constant output of DW channels ``dead`` (all taps pruned) into what reads the consumer conv.

    Such a channel outputs ``chain(dw_bias)`` whatever the input; its contribution ``W[:, j] * const`` to the
    consumer is added to the consumer's bias, or subtracted from the running mean of the BN right after it.
    The caller removes the channels afterwards with :func:`prune_channels`.
    """
    if not group.can_fold_dead:
        raise ValueError(f"block {group.block!r} has a gate between its DW conv and consumer; cannot fold")
    dw = _get(model, group.dw)
    consumer = _get(model, group.consumer)
    x = torch.zeros(1, dw.out_channels, 1, 1, dtype=dw.weight.dtype, device=dw.weight.device)
    if dw.bias is not None:
        x += dw.bias.view(1, -1, 1, 1)
    chain = [_get(model, p) for p in group.dw_chain]
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
    bn = _get(model, group.consumer_bn) if group.consumer_bn else None
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
