"""Folding BatchNorms into the convs before them, found by tracing which module reads each conv's output.

:func:`conv_reader_pairs` is the trace (tensor identity, not module order, decides); :func:`fold_all_batchnorms`
folds every BN that alone reads a conv and fuses a BatchNormAct2d's activation into a masked depth-wise conv's
epilogue; :mod:`.modules` uses the same trace to fuse activations into plain convs.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from timm.layers import MixedConv2d

from ..data import model_input_size
from ..kernels.activations import activation_name
from ..layers import MaskedConv2d
from ..pruning.surgery import slice_channels

__all__ = ["fold_batchnorm", "fold_all_batchnorms", "conv_reader_pairs"]


def _conv_bn_pairs(model: nn.Module, input_size: Sequence[int]) -> list[tuple[str, str]]:
    """(conv path, BN path) where the BN's only module input is exactly that conv's output tensor."""
    return conv_reader_pairs(model, input_size, lambda m: isinstance(m, nn.BatchNorm2d))


def conv_reader_pairs(model: nn.Module, input_size: Sequence[int], wanted) -> list[tuple[str, str]]:
    """(conv path, reader path) where the module ``wanted(module)`` selects is the only module reading exactly that
    conv's output tensor.

    Found by tracing one forward pass: tensor identity, not module order, decides (outputs are kept alive so ids are
    not reused). A conv output that a second module also reads is not folded. A module that returns its input
    object (an in-place activation) ends that tensor's readers: later reads see its result, not the conv's.
    """
    outputs: dict[int, str] = {}
    readers: dict[int, list[str]] = {}
    cut: dict[int, int] = {}
    keep: list[torch.Tensor] = []
    hooks = []

    def conv_hook(path):
        def fn(m, inputs, out):
            if isinstance(out, torch.Tensor):
                outputs[id(out)] = path
                keep.append(out)
        return fn

    def reader_hook(path):
        def fn(m, inputs):
            for t in inputs:
                if isinstance(t, torch.Tensor):
                    readers.setdefault(id(t), []).append(path)
                    keep.append(t)  # alive until the end, so its id is never reused by a conv output
        return fn

    def inplace_hook(m, inputs, out):
        if isinstance(out, torch.Tensor) and any(t is out for t in inputs) and id(out) not in cut:
            cut[id(out)] = len(readers.get(id(out), []))

    for path, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, MixedConv2d)):
            hooks.append(m.register_forward_hook(conv_hook(path)))
        if path:
            hooks.append(m.register_forward_pre_hook(reader_hook(path)))
            hooks.append(m.register_forward_hook(inplace_hook))
    try:
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, *input_size, dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
    pairs = []
    for tid, conv_path in outputs.items():
        rd = readers.get(tid, [])[:cut.get(tid)]
        # the BN may be read through containers that only pass the tensor on; require exactly one BN reader
        bns = [r for r in rd if wanted(model.get_submodule(r))]
        others = [r for r in rd if r not in bns and not any(b.startswith(r + ".") for b in bns)]
        if len(bns) == 1 and not others:
            pairs.append((conv_path, bns[0]))
    return pairs


@torch.no_grad()
def fold_all_batchnorms(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> dict[str, int]:
    """Fold every BN that directly follows a conv into it (in place, eval semantics); fuse the activation of a
    BatchNormAct2d into a masked depth-wise conv when the sparse kernel has it. Returns counts. ``input_size``
    ``(C, H, W)`` of the tracing forward: default the model's own."""
    folded = fused = 0
    for conv_path, bn_path in _conv_bn_pairs(model, model_input_size(model, input_size)):
        conv, bn = model.get_submodule(conv_path), model.get_submodule(bn_path)
        if bn.running_mean is None:
            continue
        if isinstance(conv, MixedConv2d):  # its sub-convs' outputs are concatenated: each folds its BN slice
            start, convs = 0, list(conv.values())
            for sub in convs:
                part = copy.deepcopy(bn)
                slice_channels(part, torch.arange(start, start + sub.out_channels))
                fold_batchnorm(sub, part)
                start += sub.out_channels
        else:
            fold_batchnorm(conv, bn)
        folded += 1
        act = getattr(bn, "act", None)
        drop = getattr(bn, "drop", None)
        tail: list[nn.Module] = [m for m in (drop, act) if m is not None and not isinstance(m, nn.Identity)]
        name = activation_name(act) if act is not None else "identity"
        targets = list(conv.values()) if isinstance(conv, MixedConv2d) else [conv]
        if all(isinstance(c, MaskedConv2d) and c.activation == "identity" for c in targets) and name is not None and (
                drop is None or isinstance(drop, nn.Identity)):
            for c in targets:
                c.activation = name
            fused += name != "identity"
            tail = []
        model.set_submodule(bn_path, nn.Sequential(*tail) if len(tail) > 1 else (tail[0] if tail else nn.Identity()))
    return {"folded": folded, "fused_activations": fused}


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode BatchNorm into the conv before it, in place: ``conv'(x) == bn(conv(x))`` in eval mode.

    Uses ``bn``'s running statistics (and affine parameters when present), computed in float64 and rounded once to
    the conv's dtype. The weight is scaled per output channel in place (same ``nn.Parameter``); the bias is updated,
    or created as a new ``nn.Parameter`` when the conv had none. For a :class:`MaskedConv2d` the mask is kept and
    pruned taps stay exactly zero. For timm's ``BatchNormAct2d`` only the normalization is folded: the caller keeps
    its activation (and drop) and removes or replaces ``bn``.

    Args:
        conv: any ``nn.Conv2d`` (masked or not).
        bn: ``nn.BatchNorm2d`` or subclass with running statistics, ``num_features == conv.out_channels``.

    Raises:
        TypeError: ``conv`` or ``bn`` has the wrong type.
        ValueError: channel counts differ or ``bn`` has no running statistics.
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__module__}.{type(conv).__qualname__}")
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"bn must be an nn.BatchNorm2d (or subclass such as BatchNormAct2d), got {type(bn).__module__}.{type(bn).__qualname__}")
    if bn.num_features != conv.out_channels:
        raise ValueError(
            f"bn has {bn.num_features} features but the conv has {conv.out_channels} output channels; they must match"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn has no running statistics (track_running_stats=False): nothing to fold in eval mode")
    weight = conv.weight
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var.to(device=weight.device, dtype=torch.float64) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(device=weight.device, dtype=torch.float64)
        shift = -bn.running_mean.to(device=weight.device, dtype=torch.float64) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(device=weight.device, dtype=torch.float64)
        if conv.bias is not None:
            shift = shift + conv.bias.to(torch.float64) * scale
        new_weight = weight.to(torch.float64) * scale.view(-1, *([1] * (weight.dim() - 1)))
        weight.copy_(new_weight)
        if conv.bias is None:
            conv.bias = nn.Parameter(shift.to(weight.dtype), requires_grad=weight.requires_grad)
        else:
            conv.bias.copy_(shift)
    if isinstance(conv, MaskedConv2d):
        conv.set_mask(conv.mask)  # scale can be inf/nan for a degenerate BN: pruned taps back to exactly zero
