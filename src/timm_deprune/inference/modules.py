"""Inference modules that compute what timm's modules compute, faster: squeeze-excite on pooled vectors as
matrix products (:class:`_LinearSqueezeExcite`), and a plain conv with its activation as one oneDNN call
(:class:`ConvAct2d`). Each swap keeps the parameters and state-dict keys.
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from timm.models._efficientnet_blocks import (DepthwiseSeparableConv, EdgeResidual, InvertedResidual, SqueezeExcite,
                                              UniversalInvertedResidual)

from ..data import model_input_size
from ..kernels.activations import ACTIVATION_TABLE, activation_name
from .fold import conv_reader_pairs

__all__ = ["fast_squeeze_excite", "fuse_conv_activations", "ConvAct2d", "plain_conv", "ONEDNN_OK",
           "SQUEEZE_EXCITE_TYPES"]


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


# timm's efficientnet-family squeeze-excite and our equivalent: the same computation and attributes.
SQUEEZE_EXCITE_TYPES = (SqueezeExcite, _LinearSqueezeExcite)

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
        if (not self.training and x.device.type == "cpu" and x.dtype == torch.float32 and ONEDNN_OK
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and not torch.jit.is_tracing()):
            attr, scalars, algorithm = ACTIVATION_TABLE[self.post_act].onednn
            return torch.ops.mkldnn._convolution_pointwise(
                x, self._packed_weight(x), self.bias, list(self.padding), list(self.stride), list(self.dilation),
                self.groups, attr, scalars, algorithm)
        return ACTIVATION_TABLE[self.post_act].fn(super().forward(x))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", post_act={self.post_act!r}"


def plain_conv(conv: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` (exact type) with zero padding given as ints: what :class:`ConvAct2d` can run."""
    return type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


ONEDNN_OK = _onednn_pointwise_available()  # PyTorch has oneDNN's fused conv + post-op


def fuse_conv_activations(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> int:
    """Fuse (in place) every activation module that alone reads a plain ``nn.Conv2d``'s output into that conv
    (:class:`ConvAct2d`); the activation module becomes ``nn.Identity``. Returns how many were fused."""
    def wanted(m):
        return activation_name(m) is not None

    n = 0
    for conv_path, act_path in conv_reader_pairs(model, model_input_size(model, input_size), wanted):
        conv = model.get_submodule(conv_path)
        if not plain_conv(conv):
            continue
        conv.__class__ = ConvAct2d
        conv.post_act = activation_name(model.get_submodule(act_path))
        model.set_submodule(act_path, nn.Identity())
        n += 1
    return n
