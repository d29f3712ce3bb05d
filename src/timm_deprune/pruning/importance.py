"""How important each prunable unit is: per-tap scores of depth-wise convs, per-filter scores of point-wise convs.

One dispatch (:func:`unit_scores`) serves both kinds: a user's callable, or a weight magnitude (``"l1"``, ``"l2"``,
``"bn_scaled"``: the magnitude times the following BatchNorm's ``|gamma| / sqrt(var + eps)``). A depth-wise tap is
one weight, so its ``"l2"`` score is ``w²`` (block granularity sums it into the block's squared norm); a point-wise
filter is a row, scored by its norm. Selection (:mod:`.select`) ranks these scores.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from timm.layers import MixedConv2d

from .groups import ChannelGroup, is_depthwise

__all__ = ["dw_scores", "filter_scores", "following_bn_scales", "bn_scale", "unit_scores"]

_KINDS = {"dw": "depth-wise layer", "pw": "point-wise layer"}
_NOT_FINITE = {"dw": "importance of depth-wise layer {path!r} contains NaN or inf",
               "pw": "point-wise importance of {path!r} contains NaN or inf"}


def bn_scale(bn: nn.Module) -> torch.Tensor:
    """``|gamma| / sqrt(running_var + eps)`` of a BatchNorm (ones where a part is missing)."""
    scale = torch.ones(bn.num_features)
    if getattr(bn, "running_var", None) is not None:
        scale = scale / torch.sqrt(bn.running_var.detach().float().cpu() + bn.eps)
    if getattr(bn, "weight", None) is not None:
        scale = scale * bn.weight.detach().float().abs().cpu()
    return scale


def unit_scores(kind: str, path: str, module: nn.Module, importance, weights: torch.Tensor,
                scale: Optional[torch.Tensor]) -> torch.Tensor:
    """Scores of a layer's prunable units (higher = more important): ``[C, kh, kw]`` taps or ``[C]`` filters.

    ``weights`` holds one unit per element (``kind == "dw"``) or one filter per row (``"pw"``); ``scale`` is the
    following BatchNorm's per-channel scale, needed only by ``"bn_scaled"``. A callable ``importance`` is called
    as ``importance(kind, path, module)`` and must return the same shape.
    """
    where = f"{_KINDS[kind]} {path!r}"
    shape = tuple(weights.shape) if kind == "dw" else (weights.shape[0],)
    if callable(importance):
        scores = importance(kind, path, module)
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != shape:
            raise ValueError(f"importance callable must return a {list(shape)} tensor for {where},"
                             f" got {getattr(scores, 'shape', type(scores))}")
        scores = scores.detach().float().cpu()
        if not bool(torch.isfinite(scores).all()):
            raise ValueError(_NOT_FINITE[kind].format(path=path))
        return scores
    w = weights.detach().float().cpu()
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{where} has NaN or inf weights: cannot rank its {'taps' if kind == 'dw' else 'filters'}")
    if importance == "l1":
        scores = w.abs() if kind == "dw" else w.abs().sum(1)
    elif importance == "l2":
        scores = w.square() if kind == "dw" else w.norm(dim=1)
    elif importance != "bn_scaled":
        raise ValueError(f"importance {importance!r} ranks {where} with calibration statistics: it needs"
                         " prune(model, config, calibration=batches)")
    else:
        if scale is None:
            raise ValueError(f"importance 'bn_scaled' needs a BatchNorm after {where}; none found")
        scores = w.abs() * scale[:, None, None] if kind == "dw" else w.norm(dim=1) * scale
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(_NOT_FINITE[kind].format(path=path) + " (check its weights and BatchNorm statistics)")
    return scores


def dw_scores(path: str, conv: nn.Conv2d, importance, bn_of: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-tap scores ``[C, kh, kw]`` of depth-wise conv ``conv`` at ``path``; ``bn_of`` from :func:`following_bn_scales`."""
    return unit_scores("dw", path, conv, importance, conv.weight[:, 0], bn_of.get(path))


def _out_filters(m: nn.Module) -> torch.Tensor:
    """Weights of every output filter as rows ``[C_out, fan_in]``."""
    if isinstance(m, MixedConv2d):
        return torch.cat([_out_filters(c) for c in m.values()], 0)
    return m.weight.detach().flatten(1)


def filter_scores(model: nn.Module, group: ChannelGroup, importance) -> torch.Tensor:
    """Importance of every internal channel of ``group``: the norm of its producer filter, optionally BN-scaled."""
    producer = model.get_submodule(group.producer)
    scale = bn_scale(model.get_submodule(group.producer_bn)) if importance == "bn_scaled" and group.producer_bn else None
    return unit_scores("pw", group.producer, producer, importance, _out_filters(producer), scale)


def following_bn_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """``|gamma| / sqrt(var + eps)`` of the BatchNorm that directly follows each depth-wise conv, per channel.

    The sub-convs of a MixedConv2d share the BN after it: each gets its slice.
    """
    out: dict[str, torch.Tensor] = {}
    pending: list[tuple[str, int, int]] = []  # (path, first channel, channels) awaiting their BN
    inside_mixed = ""
    for path, m in model.named_modules():
        if isinstance(m, MixedConv2d) and all(is_depthwise(c) for c in m.values()):
            start, pending, inside_mixed = 0, [], path + "."
            for name, c in m.items():
                pending.append((f"{path}.{name}", start, c.out_channels))
                start += c.out_channels
        elif is_depthwise(m):
            if not (inside_mixed and path.startswith(inside_mixed)):
                pending, inside_mixed = [(path, 0, m.out_channels)], ""
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and pending:
            if m.num_features == sum(n for _, _, n in pending):
                scale = bn_scale(m)
                out.update({p: scale[s:s + n] for p, s, n in pending})
            pending, inside_mixed = [], ""
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            pending, inside_mixed = [], ""
    return out
