"""Which channels belong together: the internal channels of one block and every module that carries them.

A :class:`ChannelGroup` is the set of channels internal to one block: made by a point-wise ``producer`` conv,
carried by channel-wise modules (BN, the depth-wise conv, squeeze-excite), read by a point-wise ``consumer``.
Removing a channel removes it from all of them at once, so the block's input and output (the residual path)
never change shape. Groups are found per block type (hand-written: the few block types timm's DSConv families
are built from are explicit about their order, which a traced dependency graph would have to rediscover).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from torch import nn

from timm.layers import MixedConv2d
from timm.models._efficientnet_blocks import CondConvResidual, InvertedResidual, UniversalInvertedResidual

__all__ = ["ChannelGroup", "find_channel_groups", "group_splits", "is_depthwise"]

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


def group_splits(model: nn.Module, group: ChannelGroup) -> list[list[int]]:
    """Channel partitions imposed by MixedConv2d modules in the group."""
    out = []
    for path in [group.producer, group.consumer] + group.channelwise:
        m = model.get_submodule(path)
        if isinstance(m, MixedConv2d):
            sizes = [c.out_channels for c in m.values()] if path == group.producer else list(m.splits)
            out.append(sizes)
    return out
