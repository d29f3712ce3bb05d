"""PrunePlan: every pruning decision, versioned and JSON-serialisable, enough to rebuild the pruned model.

The plan travels in ``config.json`` under ``model_args.deprune``; the tap masks travel separately in
``deprune_masks.safetensors`` (uint8 ``[C, kh, kw]`` per depth-wise layer, keyed by module path).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional

import torch
from torch import nn

from .groups import ChannelGroup, find_channel_groups, is_depthwise
from .surgery import fold_dead_channels, prune_channels

__all__ = ["PLAN_FORMAT_VERSION", "DWLayerPlan", "PWLayerPlan", "PrunePlan", "apply_plan"]

PLAN_FORMAT_VERSION = 1


@dataclass(frozen=True)
class DWLayerPlan:
    """Decision for one depth-wise conv. Ratios are pruned fractions of the layer's taps (after PW pruning)."""

    path: str
    channels: int  # channels of the pruned layer (after PW pruning and dead-channel removal)
    kernel_size: tuple[int, int]
    target_ratio: float
    achieved_ratio: float  # dead channels removed count as pruned taps
    min_group_ratio: float  # "Real DW": the least pruned group sets the layer's speed
    max_group_ratio: float
    aligned: bool
    direction: str
    group: int
    tile: int
    balanced: bool
    dead_removed: int = 0

    @classmethod
    def from_dict(cls, data: Mapping) -> "DWLayerPlan":
        data = dict(data)
        data["kernel_size"] = tuple(data["kernel_size"])
        return cls(**data)


@dataclass(frozen=True)
class PWLayerPlan:
    """Decision for the internal channels of one block: which producer filters survive."""

    producer: str
    consumer: str
    block: str
    channels_before: int
    target_ratio: float
    kept: tuple[int, ...]  # indices into the dense producer's output channels
    dead: tuple[int, ...] = ()  # indices into ``kept`` order removed as dead DW channels (folded)

    @property
    def channels(self) -> int:
        return len(self.kept) - len(self.dead)

    @classmethod
    def from_dict(cls, data: Mapping) -> "PWLayerPlan":
        data = dict(data)
        data["kept"] = tuple(int(i) for i in data["kept"])
        data["dead"] = tuple(int(i) for i in data.get("dead", ()))
        return cls(**data)


@dataclass(frozen=True)
class PrunePlan:
    """Every decision :func:`timm_deprune.prune` made; ``apply_plan`` replays it on a dense model.

    Example:
        >>> plan = PrunePlan.from_json(result.plan.to_json())  # doctest: +SKIP
    """

    config: dict
    dw: tuple[DWLayerPlan, ...] = ()
    pw: tuple[PWLayerPlan, ...] = ()
    arch: Optional[str] = None
    format_version: int = PLAN_FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "arch": self.arch,
            "config": self.config,
            "pw": [dict(asdict(p), kept=list(p.kept), dead=list(p.dead)) for p in self.pw],
            "dw": [dict(asdict(d), kernel_size=list(d.kernel_size)) for d in self.dw],
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "PrunePlan":
        if not isinstance(data, Mapping):
            raise ValueError(f"a prune plan must be a mapping, got {type(data).__name__}")
        version = data.get("format_version")
        if type(version) is not int or version != PLAN_FORMAT_VERSION:
            raise ValueError(f"unsupported prune plan format_version {version!r}; this timm_deprune reads"
                             f" version {PLAN_FORMAT_VERSION} (upgrade timm-deprune for newer plans)")
        for key in ("dw", "pw"):
            entries = data.get(key, ())
            if not isinstance(entries, (list, tuple)) or not all(isinstance(e, Mapping) for e in entries):
                raise ValueError(f"malformed prune plan: {key!r} must be a list of layer objects, got {entries!r:.80}")
        try:
            return cls(config=dict(data["config"]), arch=data.get("arch"),
                       pw=tuple(PWLayerPlan.from_dict(p) for p in data.get("pw", ())),
                       dw=tuple(DWLayerPlan.from_dict(d) for d in data.get("dw", ())),
                       extra=dict(data.get("extra", {})))
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed prune plan: {e}") from e

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "PrunePlan":
        return cls.from_dict(json.loads(text))

    def mask_shapes(self) -> dict[str, tuple[int, int, int]]:
        """Expected shape of every layer's tap mask."""
        return {d.path: (d.channels, *d.kernel_size) for d in self.dw}


def _groups_by_producer(model: nn.Module) -> dict[str, ChannelGroup]:
    return {g.producer: g for g in find_channel_groups(model)}


def apply_pw(model: nn.Module, group: ChannelGroup, layer: PWLayerPlan) -> None:
    """Channel surgery of one block: keep ``layer.kept``; then fold and remove ``layer.dead``."""
    producer = model.get_submodule(group.producer)
    out = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    if out != layer.channels_before:
        raise ValueError(f"prune plan expects {layer.channels_before} channels out of {group.producer!r}, the"
                         f" model has {out}: the plan was made for a different architecture")
    kept = layer.kept
    if list(kept) != sorted(set(kept)) or (kept and not 0 <= kept[0] <= kept[-1] < out):
        raise ValueError(f"prune plan for {group.producer!r}: kept must be sorted unique channel indices in [0, {out}),"
                         f" got {list(kept)[:8]}{'...' if len(kept) > 8 else ''}")
    if any(not 0 <= d < len(kept) for d in layer.dead) or len(set(layer.dead)) != len(layer.dead):
        raise ValueError(f"prune plan for {group.producer!r}: dead must be unique positions in [0, {len(kept)}) of"
                         f" the kept channels, got {list(layer.dead)[:8]}")
    if len(layer.kept) < out:
        prune_channels(model, group, torch.tensor(layer.kept, dtype=torch.long))
    if layer.dead:
        dead = torch.tensor(layer.dead, dtype=torch.long)
        fold_dead_channels(model, group, dead)
        alive = torch.ones(len(layer.kept), dtype=torch.bool)
        alive[dead] = False
        prune_channels(model, group, alive.nonzero().flatten())


def _describe(m: nn.Module) -> str:
    """A module in one short line: its type and, for a conv, its channels, kernel and groups."""
    if isinstance(m, nn.Conv2d):
        return (f"{type(m).__name__}({m.in_channels}, {m.out_channels}, kernel_size={tuple(m.kernel_size)},"
                f" groups={m.groups})")
    return type(m).__name__


def apply_plan(model: nn.Module, plan: PrunePlan, masks: Optional[Mapping[str, torch.Tensor]] = None) -> nn.Module:
    """Replay ``plan`` on a dense model in place: channel surgery, then masked depth-wise convs.

    ``masks`` maps DW module paths to ``[C, kh, kw]`` masks (bool or uint8); without them every tap is kept
    (the pruned *structure*, for loading a pruned state dict and masks afterwards).
    """
    from ..layers import to_masked

    groups = _groups_by_producer(model)
    for layer in plan.pw:
        if layer.producer not in groups:
            raise ValueError(f"prune plan names point-wise layer {layer.producer!r}, which this model does not have"
                             f" as a prunable block (known: {sorted(groups)[:5]}...)")
        apply_pw(model, groups[layer.producer], layer)
    if masks is not None:
        extra = sorted(set(masks) - {d.path for d in plan.dw})
        if extra:
            raise ValueError(f"masks given for layers the plan does not prune: {extra[:5]}")
    for layer in plan.dw:
        try:
            conv = model.get_submodule(layer.path)
        except AttributeError:
            raise ValueError(f"prune plan names depth-wise layer {layer.path!r}, which this model lacks") from None
        if not is_depthwise(conv):
            what = "the whole model" if not layer.path else _describe(conv)
            raise ValueError(f"prune plan layer {layer.path!r} is not a depth-wise conv in this model: it is {what}")
        shape = (conv.out_channels, *conv.kernel_size)
        if shape != (layer.channels, *layer.kernel_size):
            raise ValueError(f"depth-wise layer {layer.path!r} has shape {shape} after surgery, the plan expects"
                             f" {(layer.channels, *layer.kernel_size)}")
        if masks is None:
            mask = torch.ones(shape, dtype=torch.bool)
        else:
            if layer.path not in masks:
                raise ValueError(f"no mask for depth-wise layer {layer.path!r}")
            mask = masks[layer.path]
            if tuple(mask.shape) != shape:
                raise ValueError(f"mask of {layer.path!r} has shape {tuple(mask.shape)}, expected {shape}")
        model.set_submodule(layer.path, to_masked(conv, mask.to(torch.bool)))
    return model

