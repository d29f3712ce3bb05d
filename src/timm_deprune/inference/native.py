"""Whole timm depth-wise separable blocks on the native block kernel (``deprune::native_block``).

:func:`use_native_blocks` swaps (in place) every supported ``DepthwiseSeparableConv``, ``InvertedResidual`` and
``UniversalInvertedResidual`` of an optimised model (BatchNorms folded, activations fused) to a subclass whose eval
forward on CPU fp32 runs the block as one native call: point-wise expand (+ bias + act), sparse depth-wise
(+ bias + act), squeeze-excite, point-wise project (+ bias) (+ residual). Parameters, submodules and state-dict keys
stay the block's own; training, other devices and dtypes, and calls that need a gradient run the original forward.
The block's weights are packed once and packed again when a parameter changes (version or storage).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from timm.layers import Conv2dSame
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual, UniversalInvertedResidual

from ..kernels.activations import ACTIVATIONS, activation_name
from ..kernels.backend import backend_available, load_extension
from ..kernels.block_op import is_registered, native_block, register_block, release_block
from ..kernels.plan import build_plan
from ..layers import MaskedConv2d
from .modules import SQUEEZE_EXCITE_TYPES, ConvAct2d

__all__ = ["use_native_blocks", "native_block_problem", "NATIVE_BLOCK_TYPES"]

_GEMM_ACTS = ("identity", "relu", "relu6", "silu", "hardswish")  # the packed SGEMM's epilogues (cpp/cpu/gemm.h)
_GATES = {"torch.nn.modules.activation.Sigmoid": 0, "timm.layers.activations.Sigmoid": 0,
          "torch.nn.modules.activation.Hardsigmoid": 1, "timm.layers.activations.HardSigmoid": 1}


class _Unsupported(Exception):
    """Why a block cannot run natively (caught by :func:`native_block_problem`)."""


def _name(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _follower_act(m: Optional[nn.Module], where: str) -> str:
    """The activation a module after a conv computes: ``identity`` for nothing, else its table name."""
    if m is None or type(m) is nn.Identity:
        return "identity"
    if type(m) is nn.Sequential:
        acts = [_follower_act(c, where) for c in m]
        acts = [a for a in acts if a != "identity"]
        if len(acts) > 1:
            raise _Unsupported(f"{where}: more than one activation after the conv")
        return acts[0] if acts else "identity"
    name = activation_name(m)
    if name is None:
        raise _Unsupported(f"{where}: {_name(m)} after the conv is not an activation the kernel fuses"
                           " (BatchNorms must be folded first: optimize_for_inference)")
    return name


def _combine(first: str, second: str, where: str) -> str:
    if first != "identity" and second != "identity":
        raise _Unsupported(f"{where}: two activations in a row ({first}, {second})")
    return first if first != "identity" else second


def _pw_stage(conv: nn.Module, after: Optional[nn.Module], where: str) -> dict:
    if type(conv) not in (nn.Conv2d, ConvAct2d):
        raise _Unsupported(f"{where}: point-wise conv is a {_name(conv)}, not an nn.Conv2d")
    if (conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1 or conv.dilation != (1, 1)
            or conv.padding not in ((0, 0), "valid") or conv.padding_mode != "zeros"):
        raise _Unsupported(f"{where}: not a plain 1x1 conv (kernel {conv.kernel_size}, stride {conv.stride},"
                           f" groups {conv.groups}, padding {conv.padding})")
    act = _combine(getattr(conv, "post_act", "identity") if type(conv) is ConvAct2d else "identity",
                   _follower_act(after, where), where)
    if act not in _GEMM_ACTS:
        raise _Unsupported(f"{where}: activation {act!r} is not one of the GEMM epilogue's {_GEMM_ACTS}")
    return {"kind": "pw", "weight": conv.weight.detach().reshape(conv.out_channels, conv.in_channels),
            "bias": None if conv.bias is None else conv.bias.detach(), "act": act}


def _dw_stage(conv: nn.Module, after: Optional[nn.Module], where: str) -> dict:
    if not isinstance(conv, MaskedConv2d) and type(conv) not in (nn.Conv2d, Conv2dSame):
        raise _Unsupported(f"{where}: depth-wise conv is a {_name(conv)}")
    c = conv.in_channels
    if not (conv.groups == c == conv.out_channels and c > 0) or conv.kernel_size == (1, 1):
        raise _Unsupported(f"{where}: not a depth-wise conv (groups {conv.groups}, channels {c})")
    kh, kw = conv.kernel_size
    if kh > 11 or kw > 11 or any(s not in (1, 2) for s in conv.stride) or conv.dilation != (1, 1) \
            or conv.padding_mode != "zeros":
        raise _Unsupported(f"{where}: depth-wise geometry kernel {conv.kernel_size}, stride {conv.stride}, dilation"
                           f" {conv.dilation} is not supported natively")
    if isinstance(conv, Conv2dSame) or conv.padding == "same":
        pads = None
    elif conv.padding == "valid":
        pads = (0, 0, 0, 0)
    else:
        ph, pw = conv.padding
        pads = (ph, ph, pw, pw)
        if ph > kh - 1 or pw > kw - 1:
            raise _Unsupported(f"{where}: padding {conv.padding} is larger than kernel - 1")
    own = conv.activation if isinstance(conv, MaskedConv2d) else "identity"
    mask = conv.mask if isinstance(conv, MaskedConv2d) else torch.ones(c, kh, kw, dtype=torch.bool)
    return {"kind": "dw", "weight": conv.weight.detach(), "mask": mask,
            "bias": None if conv.bias is None else conv.bias.detach(), "kernel": (kh, kw),
            "stride": tuple(conv.stride), "pads": pads, "act": _combine(own, _follower_act(after, where), where)}


def _se_stage(se: nn.Module, where: str) -> Optional[dict]:
    if type(se) is nn.Identity:
        return None
    if type(se) not in SQUEEZE_EXCITE_TYPES:
        raise _Unsupported(f"{where}: squeeze-excite {_name(se)} is not timm's efficientnet SqueezeExcite")
    for conv in (se.conv_reduce, se.conv_expand):
        if (type(conv) not in (nn.Conv2d, ConvAct2d) or getattr(conv, "post_act", "identity") != "identity"
                or conv.kernel_size != (1, 1) or conv.groups != 1 or conv.bias is None):
            raise _Unsupported(f"{where}: squeeze-excite convs must be plain 1x1 convs with a bias")
    act = activation_name(se.act1)
    gate = _GATES.get(_name(se.gate))
    if act is None or gate is None:
        raise _Unsupported(f"{where}: squeeze-excite activation {_name(se.act1)} / gate {_name(se.gate)} not"
                           " supported (sigmoid or hard sigmoid gates)")
    return {"kind": "se", "w1": se.conv_reduce.weight.detach().flatten(1), "b1": se.conv_reduce.bias.detach(),
            "w2": se.conv_expand.weight.detach().flatten(1), "b2": se.conv_expand.bias.detach(), "act": act,
            "gate": gate}


def _conv_norm_act(m: nn.Module, stage, where: str) -> Optional[dict]:
    """A UIR sub-module: ``nn.Identity`` (absent) or timm's ConvNormAct (conv, folded norm, no anti-aliasing)."""
    if type(m) is nn.Identity:
        return None
    conv, bn, aa = getattr(m, "conv", None), getattr(m, "bn", None), getattr(m, "aa", None)
    if conv is None or (aa is not None and type(aa) is not nn.Identity):
        raise _Unsupported(f"{where}: {_name(m)} is not a ConvNormAct without anti-aliasing")
    return stage(conv, bn, where)


def _stages(block: nn.Module) -> list[dict]:
    """The native stages of a timm block in order (weights as tensors), or :class:`_Unsupported`."""
    if getattr(block, "conv_s2d", None) is not None:
        raise _Unsupported("space-to-depth stem conv (conv_s2d)")
    if isinstance(block, InvertedResidual):
        if type(block.aa) is not nn.Identity:
            raise _Unsupported("anti-aliased depth-wise conv")
        stages = [_pw_stage(block.conv_pw, block.bn1, "conv_pw"), _dw_stage(block.conv_dw, block.bn2, "conv_dw"),
                  _se_stage(block.se, "se"), _pw_stage(block.conv_pwl, block.bn3, "conv_pwl")]
    elif isinstance(block, DepthwiseSeparableConv):
        if type(block.aa) is not nn.Identity:
            raise _Unsupported("anti-aliased depth-wise conv")
        stages = [_dw_stage(block.conv_dw, block.bn1, "conv_dw"), _se_stage(block.se, "se"),
                  _pw_stage(block.conv_pw, block.bn2, "conv_pw")]
    elif isinstance(block, UniversalInvertedResidual):
        stages = [_conv_norm_act(block.dw_start, _dw_stage, "dw_start"),
                  _conv_norm_act(block.pw_exp, _pw_stage, "pw_exp"),
                  _conv_norm_act(block.dw_mid, _dw_stage, "dw_mid"), _se_stage(block.se, "se"),
                  _conv_norm_act(block.pw_proj, _pw_stage, "pw_proj"),
                  _conv_norm_act(block.dw_end, _dw_stage, "dw_end")]
    else:
        raise _Unsupported(f"{_name(block)} is not a supported block type")
    stages = [s for s in stages if s is not None]
    scale = getattr(block, "layer_scale", None)
    if scale is not None and type(scale) is not nn.Identity:
        gamma = getattr(scale, "gamma", None)
        last = stages[-1]
        if gamma is None or last["act"] != "identity":
            raise _Unsupported(f"layer scale {_name(scale)} after an activation")
        g = gamma.detach().reshape(-1)  # linear after the last stage: folded into its weights and bias
        last["weight"] = last["weight"] * g.view(-1, *([1] * (last["weight"].dim() - 1)))
        last["bias"] = None if last["bias"] is None else last["bias"] * g
    if stages[0]["kind"] == "se" or stages[-1]["kind"] == "se":
        raise _Unsupported("squeeze-excite first or last")
    return stages


def _f32(t: torch.Tensor):
    return t.detach().to(torch.float32).contiguous().cpu().numpy()


def _pack(block: nn.Module):
    """A ``_C.NativeBlock`` holding the block's weights, and its ``(out_channels, dw_geometry)``."""
    native = load_extension().NativeBlock()
    geometry: list[int] = []
    out_channels = None
    for s in _stages(block):
        if s["kind"] == "pw":
            n, k = s["weight"].shape
            native.add_pw(_f32(s["weight"]), n, k, None if s["bias"] is None else _f32(s["bias"]), ACTIVATIONS[s["act"]])
            out_channels = n
        elif s["kind"] == "dw":
            plan = build_plan(s["weight"].to(torch.float32), s["mask"].to(s["weight"].device))
            native.add_dw(plan.channels, *(t.contiguous().cpu().numpy() for t in (
                plan.offsets, plan.taps, plan.values, plan.block_offsets, plan.block_taps, plan.block_values)),
                None if s["bias"] is None else _f32(s["bias"]), s["kernel"], s["stride"],
                None if s["pads"] is None else list(s["pads"]), ACTIVATIONS[s["act"]])
            kh, kw = s["kernel"]
            geometry += [kh, kw, *s["stride"], *(s["pads"] if s["pads"] is not None else (-1,) * 4)]
            out_channels = plan.channels
        else:
            r, c = s["w1"].shape
            native.add_se(c, r, _f32(s["w1"]), _f32(s["b1"]), _f32(s["w2"]), _f32(s["b2"]), ACTIVATIONS[s["act"]],
                          s["gate"])
    native.residual = bool(getattr(block, "has_skip", False))
    return native, out_channels, geometry


def native_block_problem(block: nn.Module) -> Optional[str]:
    """Why :func:`use_native_blocks` leaves ``block`` on its PyTorch forward, or None when it runs natively."""
    try:
        _stages(block)
    except _Unsupported as e:
        return str(e)
    return None


def _tensors(module: nn.Module) -> list:
    return list(module.parameters()) + list(module.buffers())


def _versions(tensors: list) -> tuple:
    """In-place version counters (-1 for inference tensors, which have none)."""
    try:
        return tuple(t._version for t in tensors)
    except RuntimeError:
        return tuple(-1 if t.is_inference() else t._version for t in tensors)


class _NativeBlockMixin:
    """The eval forward of a block packed for ``deprune::native_block`` (state in plain attributes)."""

    _native_handle: int = 0
    _native_out: int = 0
    _native_geometry: tuple = ()
    _native_key: tuple = ()
    _native_sources: tuple = ()

    def _native_repack(self) -> None:
        native, out_channels, geometry = _pack(self)
        release_block(self._native_handle)
        self._native_handle = register_block(native)
        self._native_out, self._native_geometry = out_channels, list(geometry)
        # the tensors packed and their versions: an in-place edit (load_state_dict, mul_) packs again on the next
        # eager call; a parameter object replaced by assignment is not seen (call _native_repack)
        self._native_sources = tuple(_tensors(self))
        self._native_key = _versions(self._native_sources)

    def _native_ready(self, x: torch.Tensor) -> bool:
        if self.training or not isinstance(x, torch.Tensor) or x.device.type != "cpu" or x.dtype != torch.float32:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in self._native_sources)):
            return False
        return x.dim() == 4

    def fuse(self) -> nn.Module:
        """This block as its plain timm class again (the packed copy released): what timm's
        ``reparameterize_model`` and :func:`~timm_deprune.inference.export.export_onnx` call before exporting."""
        release_block(self._native_handle)
        self._native_handle = 0
        self.__class__ = _PLAIN_TYPES[type(self)]
        return self

    def forward(self, x):
        if not self._native_ready(x):
            return super().forward(x)
        if not torch.compiler.is_compiling() and (_versions(self._native_sources) != self._native_key
                                                  or not is_registered(self._native_handle)):
            with torch.no_grad():
                self._native_repack()
        return native_block(x, self._native_handle, self._native_out, self._native_geometry)


class NativeDepthwiseSeparableConv(_NativeBlockMixin, DepthwiseSeparableConv):
    """timm's ``DepthwiseSeparableConv`` run by the native block kernel in eval (see :mod:`.native`)."""


class NativeInvertedResidual(_NativeBlockMixin, InvertedResidual):
    """timm's ``InvertedResidual`` run by the native block kernel in eval (see :mod:`.native`)."""


class NativeUniversalInvertedResidual(_NativeBlockMixin, UniversalInvertedResidual):
    """timm's ``UniversalInvertedResidual`` run by the native block kernel in eval (see :mod:`.native`)."""


NATIVE_BLOCK_TYPES = {DepthwiseSeparableConv: NativeDepthwiseSeparableConv,
                      InvertedResidual: NativeInvertedResidual,
                      UniversalInvertedResidual: NativeUniversalInvertedResidual}
_PLAIN_TYPES = {native: plain for plain, native in NATIVE_BLOCK_TYPES.items()}


@torch.no_grad()
def use_native_blocks(model: nn.Module) -> dict[str, int]:
    """Swap (in place) every supported block of ``model`` to its native-block subclass and pack its weights.

    Call on an optimised model (BatchNorms folded, activations fused: :func:`optimize_for_inference` does). Blocks
    of exactly the types in :data:`NATIVE_BLOCK_TYPES` whose stages the kernel has are swapped; the others keep
    their forward. Returns ``{"native_blocks": swapped, "native_skipped": supported types left alone}``.
    """
    if not backend_available():
        load_extension()  # raises ImportError with the cause
    swapped = skipped = 0
    for m in model.modules():
        cls = NATIVE_BLOCK_TYPES.get(type(m))
        if cls is None:
            continue
        if native_block_problem(m) is not None or any(p.device.type != "cpu" for p in m.parameters()):
            skipped += 1
            continue
        m.__class__ = cls
        m._native_repack()
        swapped += 1
    return {"native_blocks": swapped, "native_skipped": skipped}
