"""``optimize_for_inference``: rewrite a (pruned) model for fast inference without changing its outputs: fold every
BatchNorm into the conv before it, fuse activations into the sparse depth-wise kernel's epilogue and into oneDNN
convs, run squeeze-excite's pooled 1x1 convs as matmuls, pick the memory format."""
from __future__ import annotations

import copy
import weakref
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import MixedConv2d
from timm.models._efficientnet_blocks import (DepthwiseSeparableConv, EdgeResidual, InvertedResidual, SqueezeExcite,
                                              UniversalInvertedResidual)

from .layers import MaskedConv2d, fold_batchnorm
from .pw import ChannelGroup, find_channel_groups, group_splits, prune_channels, slice_channels
from .sparse_plan import CHANNEL_BLOCK, block_channel_order, block_lanes

__all__ = ["optimize_for_inference", "fold_all_batchnorms", "fast_squeeze_excite", "fuse_conv_activations",
           "ConvAct2d", "prefers_channels_last", "reorder_dw_channels"]

# Module types whose forward is exactly one of the sparse kernel's fused activations (ops.ACTIVATIONS).
_FUSABLE = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.Identity: "identity"}


def _activation_name(m: nn.Module) -> Optional[str]:
    for cls, name in _FUSABLE.items():
        if type(m) is cls:
            return name
    if type(m) is nn.GELU and m.approximate == "none":
        return "gelu"
    qual = f"{type(m).__module__}.{type(m).__qualname__}"
    return {"timm.layers.activations.Swish": "silu", "timm.layers.activations.HardSwish": "hardswish",
            "timm.layers.activations.GELU": "gelu"}.get(qual)


def _conv_bn_pairs(model: nn.Module, input_size: Sequence[int]) -> list[tuple[str, str]]:
    """(conv path, BN path) where the BN's only module input is exactly that conv's output tensor."""
    return _conv_reader_pairs(model, input_size, lambda m: isinstance(m, nn.BatchNorm2d))


def _conv_reader_pairs(model: nn.Module, input_size: Sequence[int], wanted) -> list[tuple[str, str]]:
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
def fold_all_batchnorms(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> dict[str, int]:
    """Fold every BN that directly follows a conv into it (in place, eval semantics); fuse the activation of a
    BatchNormAct2d into a masked depth-wise conv when the sparse kernel has it. Returns counts."""
    folded = fused = 0
    for conv_path, bn_path in _conv_bn_pairs(model, input_size):
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
        name = _activation_name(act) if act is not None else "identity"
        targets = list(conv.values()) if isinstance(conv, MixedConv2d) else [conv]
        if all(isinstance(c, MaskedConv2d) and c.activation == "identity" for c in targets) and name is not None and (
                drop is None or isinstance(drop, nn.Identity)):
            for c in targets:
                c.activation = name
            fused += name != "identity"
            tail = []
        model.set_submodule(bn_path, nn.Sequential(*tail) if len(tail) > 1 else (tail[0] if tail else nn.Identity()))
    return {"folded": folded, "fused_activations": fused}


class _LinearSqueezeExcite(SqueezeExcite):
    """timm's efficientnet-family ``SqueezeExcite`` with its two 1x1 convs on the pooled ``[N, C, 1, 1]`` tensor run
    as matrix products: PyTorch's CPU conv path for a 1x1 spatial input is slow (tens of µs at batch 1, ms at
    batch 16); ``F.linear`` computes the same sums. Same parameters and state-dict keys as the original.

    With ``inplace_gate`` (set only where the block's forward reads the input of ``se`` nowhere else) inference
    multiplies the gate into the input tensor: a fresh output the size of the block's widest activation costs a
    page fault per 4 KiB at batch 16 (measured 46 ms vs 7 ms for a 77 MB tensor on the dev VM)."""

    inplace_gate: bool = False

    def forward(self, x):
        s = x.mean((2, 3))
        s = self.act1(F.linear(s, self.conv_reduce.weight.flatten(1), self.conv_reduce.bias))
        s = F.linear(s, self.conv_expand.weight.flatten(1), self.conv_expand.bias)
        gate = self.gate(s)[:, :, None, None]
        if self.inplace_gate and not torch.is_grad_enabled() and not self.training:
            return x.mul_(gate)
        return x * gate


# Blocks whose forward is ``x = self.se(x)`` on a tensor the block computed (never its input, never read again).
_SE_CONSUMING_BLOCKS = (DepthwiseSeparableConv, InvertedResidual, EdgeResidual, UniversalInvertedResidual)


def fast_squeeze_excite(model: nn.Module) -> int:
    """Swap (in place) every timm efficientnet-family squeeze-excite whose convs are plain 1x1 convs to
    :class:`_LinearSqueezeExcite`, gating in place where its block consumes its input; returns how many were
    swapped."""
    consumed = {id(b.se) for b in model.modules() if isinstance(b, _SE_CONSUMING_BLOCKS)
                and isinstance(getattr(b, "se", None), SqueezeExcite)}
    n = 0
    for m in model.modules():
        if type(m) is SqueezeExcite and all(
                type(c) is nn.Conv2d and c.kernel_size == (1, 1) and c.groups == 1 and c.padding == (0, 0)
                and c.stride == (1, 1) and c.dilation == (1, 1) for c in (m.conv_reduce, m.conv_expand)):
            m.__class__ = _LinearSqueezeExcite
            m.inplace_gate = id(m) in consumed
            n += 1
    return n


# Activation name -> (oneDNN post-op name, scalars, algorithm) of torch.ops.mkldnn._convolution_pointwise.
_ONEDNN_POST_OPS = {"identity": ("none", [], ""), "relu": ("relu", [], ""), "relu6": ("hardtanh", [0.0, 6.0], ""),
                    "silu": ("swish", [], ""), "hardswish": ("hardswish", [], ""), "gelu": ("gelu", [], "none")}
_ACT_FNS = {"identity": lambda v: v, "relu": F.relu, "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish,
            "gelu": F.gelu}


def _onednn_pointwise_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    except (AttributeError, RuntimeError):
        return False


# ConvAct2d -> ((weight version, weight pointer, input shape, channels_last), weight reordered for oneDNN). Kept
# outside the module so deep copies and state dicts never see oneDNN tensors; entries die with their module.
_PACKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


class ConvAct2d(nn.Conv2d):
    """A plain ``nn.Conv2d`` and the activation after it (``post_act``, possibly ``"identity"``) as one oneDNN call
    on CPU fp32 inference, with the weight reordered for oneDNN once per input shape instead of on every call: the
    output is written once instead of written, read and written again. Elsewhere (training, other devices and
    dtypes, while compiling or exporting) it runs the conv and the activation as two ordinary ops. State-dict keys
    are the conv's."""

    post_act: str = "identity"

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        key = (w._version, w.data_ptr(), tuple(x.shape), x.is_contiguous(memory_format=torch.channels_last))
        hit = _PACKED.get(self)
        if hit is None or hit[0] != key:
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                w.detach(), list(self.padding), list(self.stride), list(self.dilation), self.groups, list(x.shape))
            hit = _PACKED[self] = (key, packed)
        return hit[1]

    def forward(self, x):
        # torch.compile, torch.export and the dynamo ONNX exporter all report is_compiling(); the TorchScript ONNX
        # exporter traces (is_tracing): each gets the plain ops it can translate
        if (not self.training and x.device.type == "cpu" and x.dtype == torch.float32 and _ONEDNN_OK
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and not torch.jit.is_tracing()):
            attr, scalars, algorithm = _ONEDNN_POST_OPS[self.post_act]
            return torch.ops.mkldnn._convolution_pointwise(
                x, self._packed_weight(x), self.bias, list(self.padding), list(self.stride), list(self.dilation),
                self.groups, attr, scalars, algorithm)
        return _ACT_FNS[self.post_act](super().forward(x))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", post_act={self.post_act!r}"


def _plain_conv(conv: nn.Module) -> bool:
    return type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


_ONEDNN_OK = _onednn_pointwise_available()


def fuse_conv_activations(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> int:
    """Fuse (in place) every activation module that alone reads a plain ``nn.Conv2d``'s output into that conv
    (:class:`ConvAct2d`); the activation module becomes ``nn.Identity``. Returns how many were fused."""
    def wanted(m):
        return _activation_name(m) in _ONEDNN_POST_OPS

    n = 0
    for conv_path, act_path in _conv_reader_pairs(model, input_size, wanted):
        conv = model.get_submodule(conv_path)
        if not _plain_conv(conv):
            continue
        conv.__class__ = ConvAct2d
        conv.post_act = _activation_name(model.get_submodule(act_path))
        model.set_submodule(act_path, nn.Identity())
        n += 1
    return n


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
    ``block``-channel SIMD block of the channels_last kernel (:func:`~timm_deprune.sparse_plan.block_channel_order`).

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


def _block_shared(mask: torch.Tensor, block: int = 8) -> bool:
    """Whether every ``block`` consecutive channels of a ``[C, kh, kw]`` tap mask share one pattern."""
    flat = mask.reshape(mask.shape[0], -1)
    starts = torch.arange(flat.shape[0]) // block * block
    return bool((flat == flat[starts]).all())


def _tensors(y) -> list[torch.Tensor]:
    """The output tensors of a forward (one tensor, or the list / tuple / dict of a ``features_only`` model)."""
    if isinstance(y, torch.Tensor):
        return [y.float()]
    if isinstance(y, dict):
        y = list(y.values())
    if isinstance(y, (list, tuple)):
        return [t for item in y for t in _tensors(item)]
    raise TypeError(f"cannot compare a model output of type {type(y).__name__}; pass check=False")


def _on_cpu(model: nn.Module) -> bool:
    return all(p.device.type == "cpu" for p in model.parameters())


def prefers_channels_last(model: nn.Module, reorder_channels: bool = True) -> bool:
    """The layout ``optimize_for_inference(channels_last="auto")`` picks.

    On CPU with ``reorder_channels``: channels_last, where PyTorch's dense convs and our kernel are fastest. With
    per-channel ("element") tap patterns the kernel runs each 8-channel block on the union of its taps, which
    :func:`reorder_dw_channels` keeps small; whole optimised models measured channels_last + reordering
    1.00-1.03x against NCHW (efficientnet_b0 and mobilenetv2_100 at batch 1 and 16, BENCHMARKS.md).

    Otherwise channels_last only when every masked depth-wise conv has block-shared tap patterns: in their natural
    order, element patterns made the layouts a wash (0.98-1.06x), so NCHW, timm's default, stays.
    """
    if reorder_channels and _on_cpu(model):
        return True
    return all(_block_shared(m.mask) for m in model.modules() if isinstance(m, MaskedConv2d))


def optimize_for_inference(model: nn.Module, *, inplace: bool = False, channels_last="auto",
                           reorder_channels="auto", compile: bool = False,
                           input_size: Optional[Sequence[int]] = None, check: bool = True,
                           fuse_activations: bool = True) -> nn.Module:
    """An eval-mode copy of ``model`` with BatchNorms folded into convs, activations fused into the sparse
    depth-wise kernel's epilogue and into the other convs (oneDNN post-ops on CPU), and squeeze-excite's 1x1 convs
    on pooled vectors run as matrix products, and, for channels_last on CPU, each block's internal channels
    reordered by tap pattern (all exact up to fp32 rounding). ``deprune_inference_stats`` on the result counts each
    rewrite.

    Args:
        model: a pruned (or dense) model.
        inplace: modify ``model`` itself.
        channels_last: convert to channels_last memory format (True / False), or ``"auto"``: see
            :func:`prefers_channels_last` (channels_last on CPU). Feed the result inputs in the same memory format.
        reorder_channels: apply :func:`reorder_dw_channels` (True / False), or ``"auto"``: when the result runs
            channels_last on CPU, where the kernel's 8-channel blocks gain from it. The reordered model's parameters
            are permuted inside each block (its outputs are not), so its state dict no longer matches the
            original's; ``"auto"`` leaves CUDA models alone, whose kernel relies on BWT's balanced 32-channel
            groups.
        compile: wrap in ``torch.compile`` (the sparse op is a registered custom op, so it stays in the graph).
        input_size: ``(C, H, W)`` of the trace that finds conv -> BN pairs; default the model's pretrained_cfg.
        check: compare the result with the original on a random input and raise if they differ (rel. > 1e-4).
        fuse_activations: run each plain conv and the activation after it as one oneDNN call with a reordered
            weight (:class:`ConvAct2d`); needs PyTorch built with oneDNN (mkldnn), skipped otherwise.
    """
    for name, value in (("channels_last", channels_last), ("reorder_channels", reorder_channels)):
        if not (isinstance(value, bool) or value == "auto"):
            raise ValueError(f"{name} must be True, False or 'auto', got {value!r}")
    original = model
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(input_size or cfg.get("input_size") or (3, 224, 224))
    reference = None
    if check:
        x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0)).to(next(model.parameters()).device)
        with torch.no_grad():
            reference = _tensors((original if not inplace else model).eval()(x))
    if channels_last == "auto":
        channels_last = prefers_channels_last(model, reorder_channels is not False)
    if reorder_channels == "auto":
        reorder_channels = channels_last and _on_cpu(model)
    reordered = reorder_dw_channels(model) if reorder_channels else 0
    stats = fold_all_batchnorms(model, size)
    stats["reordered_blocks"] = reordered
    stats["linear_squeeze_excite"] = fast_squeeze_excite(model)
    stats["conv_activations"] = stats["onednn_convs"] = 0
    if fuse_activations and _ONEDNN_OK:
        stats["conv_activations"] = fuse_conv_activations(model, size)
        for m in model.modules():  # the other plain convs get the reordered-weight cache too
            if _plain_conv(m) and m.groups == 1:
                m.__class__ = ConvAct2d
                m.post_act = "identity"
        stats["onednn_convs"] = sum(type(m) is ConvAct2d for m in model.modules())
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if reference is not None:
        with torch.no_grad():
            out = _tensors(model(x.to(memory_format=torch.channels_last) if channels_last else x))
        if len(out) != len(reference):
            raise RuntimeError(f"optimize_for_inference changed the model's outputs: {len(reference)} tensors before,"
                               f" {len(out)} after")
        err = max(float((o - r).norm() / r.norm().clamp_min(1e-12)) for o, r in zip(out, reference))
        if not err < 1e-4:
            raise RuntimeError(f"optimize_for_inference changed the model's output (rel. error {err:.2e}); a conv"
                               " output is probably also read by a functional op. Please report the model.")
    stats["channels_last"] = channels_last
    model.deprune_inference_stats = stats
    if compile:
        model = torch.compile(model)
    return model
