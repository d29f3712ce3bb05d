"""``optimize_for_inference``: rewrite a (pruned) model for fast inference without changing its outputs: fold every
BatchNorm into the conv before it (:mod:`.fold`), fuse activations into the sparse depth-wise kernel's epilogue and
into oneDNN convs, run squeeze-excite's pooled 1x1 convs as matmuls (:mod:`.modules`), reorder channels by tap
pattern (:mod:`.reorder`), pick the memory format."""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from ..data import model_input_size
from ..layers import MaskedConv2d
from .fold import fold_all_batchnorms
from ..kernels.backend import backend_available
from .modules import ONEDNN_OK, ConvAct2d, fast_squeeze_excite, fuse_conv_activations, plain_conv
from .native import use_native_blocks
from .reorder import block_shared, pad_block_channels, reorder_dw_channels

__all__ = ["optimize_for_inference", "prefers_channels_last"]


def _tensors(y) -> list[torch.Tensor]:
    """The output tensors of a forward (one tensor, or the list / tuple / dict of a ``features_only`` model)."""
    if isinstance(y, torch.Tensor):
        return [y.float()]
    if isinstance(y, dict):
        y = list(y.values())
    if isinstance(y, (list, tuple)):
        return [t for item in y for t in _tensors(item)]
    raise TypeError(f"cannot compare a model output of type {type(y).__name__}; pass check=False")


@contextlib.contextmanager
def full_fp32_math() -> Iterator[None]:
    """Runs float32 convolutions and matmuls in full float32 (no TF32) for the output check, then restores the
    settings: an Ampere-or-newer GPU's TF32 alone moves outputs by ~1e-3, which would hide or fake a real change."""
    matmul = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=torch.backends.cudnn.benchmark,
                                        deterministic=torch.backends.cudnn.deterministic, allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(matmul)


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
    return all(block_shared(m.mask) for m in model.modules() if isinstance(m, MaskedConv2d))


def optimize_for_inference(model: nn.Module, *, inplace: bool = False, channels_last="auto",
                           reorder_channels="auto", compile: bool = False,
                           input_size: Optional[Sequence[int]] = None, check: bool = True,
                           fuse_activations: bool = True, native_blocks="auto",
                           pad_channels: Optional[int] = 8) -> nn.Module:
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
        input_size: ``(C, H, W)`` of the trace that finds conv -> BN pairs; default the model's own (timm's data config).
        check: compare the result with the original on a random input and raise if they differ (rel. > 1e-4).
        fuse_activations: run each plain conv and the activation after it as one oneDNN call with a reordered
            weight (:class:`ConvAct2d`); needs PyTorch built with oneDNN (mkldnn), skipped otherwise.
        native_blocks: run every supported depth-wise separable block (timm ``DepthwiseSeparableConv``,
            ``InvertedResidual``, ``UniversalInvertedResidual``) as one call of the native block kernel
            (:func:`~timm_deprune.inference.native.use_native_blocks`) in eval on CPU fp32 (True / False), or
            ``"auto"``: when the model is on the CPU and ``timm_deprune._C`` is available. Other blocks keep their
            forward; training, gradients and other devices run the PyTorch forward.
        pad_channels: round each block's internal channel count up to a multiple of this with exact-zero channels
            (:func:`~timm_deprune.inference.reorder.pad_block_channels`; ``None`` or 1 keeps the counts). Dead-channel
            removal leaves counts such as 63, whose ragged last 8-channel block slows the GEMMs and the depth-wise
            kernels: padded, whole optimised models ran 1.05-1.23x faster (mobilenetv2_100 / mobilenetv3_large_100,
            DW 71% / PW 30%, BENCHMARKS.md). Like reordering, it changes the state dict's shapes.
    """
    for name, value in (("channels_last", channels_last), ("reorder_channels", reorder_channels),
                        ("native_blocks", native_blocks)):
        if not (isinstance(value, bool) or value == "auto"):
            raise ValueError(f"{name} must be True, False or 'auto', got {value!r}")
    if pad_channels is not None and (isinstance(pad_channels, bool) or not isinstance(pad_channels, int)
                                     or pad_channels < 1):
        raise ValueError(f"pad_channels must be an int >= 1 or None, got {pad_channels!r}")
    original = model
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    size = model_input_size(model, input_size)
    reference = None
    if check:
        x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0)).to(next(model.parameters()).device)
        with torch.no_grad(), full_fp32_math():
            reference = _tensors((original if not inplace else model).eval()(x))
    if channels_last == "auto":
        channels_last = prefers_channels_last(model, reorder_channels is not False)
    if reorder_channels == "auto":
        reorder_channels = channels_last and _on_cpu(model)
    padded = pad_block_channels(model, pad_channels) if pad_channels and pad_channels > 1 else {}
    reordered = reorder_dw_channels(model) if reorder_channels else 0
    stats = fold_all_batchnorms(model, size)
    stats["padded_blocks"] = len(padded)
    stats["reordered_blocks"] = reordered
    stats["linear_squeeze_excite"] = fast_squeeze_excite(model)
    stats["conv_activations"] = stats["onednn_convs"] = 0
    if fuse_activations and ONEDNN_OK:
        stats["conv_activations"] = fuse_conv_activations(model, size)
        for m in model.modules():  # the other plain convs get the reordered-weight cache too
            if plain_conv(m) and m.groups == 1:
                m.__class__ = ConvAct2d
                m.post_act = "identity"
        stats["onednn_convs"] = sum(type(m) is ConvAct2d for m in model.modules())
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if native_blocks == "auto":
        native_blocks = _on_cpu(model) and backend_available()
    stats.update(use_native_blocks(model) if native_blocks else {"native_blocks": 0, "native_skipped": 0})
    if reference is not None:
        with torch.no_grad(), full_fp32_math():
            out = _tensors(model(x.to(memory_format=torch.channels_last) if channels_last else x))
        if len(out) != len(reference):
            raise RuntimeError(f"optimize_for_inference changed the model's outputs: {len(reference)} tensors before,"
                               f" {len(out)} after")
        err = max(float((o - r).norm() / r.norm().clamp_min(1e-12)) for o, r in zip(out, reference))
        tolerance = 1e-4 if reference[0].dtype in (torch.float32, torch.float64) else 2e-2
        if not err < tolerance:
            raise RuntimeError(f"optimize_for_inference changed the model's output (rel. error {err:.2e}); a conv"
                               " output is probably also read by a functional op. Please report the model.")
    stats["channels_last"] = channels_last
    model.deprune_inference_stats = stats
    if compile:
        model = torch.compile(model)
    return model
