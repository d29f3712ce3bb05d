"""``deprune::sparse_dwconv2d``: the sparse depth-wise conv as a PyTorch custom op, and its Python front.

The op is registered with ``torch.library``: one kernel per device type (:data:`.launch.LAUNCHERS`, registered
with ``register_kernel``), a default kernel that names the unsupported device, and a fake kernel, so
``torch.compile(fullgraph=True)`` and ``torch.export`` accept modules that call it. In eager mode
:func:`sparse_dwconv2d` calls a cached native launch directly, skipping the dispatcher (see BENCHMARKS.md for the
measured per-call difference). :func:`sparse_problem` says whether the op can run an input, and why not.
"""
from __future__ import annotations

import functools
import weakref
from typing import Optional, Sequence, Union

import torch

from .activations import ACTIVATIONS
from .backend import backend_available, load_extension
from .geometry import DILATIONS, STRIDES, PaddingArg, geometry_problem, layout, out_shape, output_size, pair, \
    resolve_padding
from .launch import LAUNCHERS, check_dtype, check_op_args, dtype_problem, run
from .plan import SparseDWPlan

__all__ = ["sparse_dwconv2d", "sparse_problem", "input_problem", "backend_problem", "NO_BACKEND"]

NO_BACKEND = "the native backend timm_deprune._C is not available"

# Eager fast path: plan -> {input geometry: validated native launch}. Outside the frozen plan, so a copy or an
# edited plan (dataclasses.replace) never inherits launches bound to another plan's tensors.
_LAUNCHES: "weakref.WeakKeyDictionary[SparseDWPlan, dict]" = weakref.WeakKeyDictionary()
_cuda_compiled: Optional[bool] = None  # whether timm_deprune._C has CUDA kernels (constant per process)


@torch.library.custom_op("deprune::sparse_dwconv2d", mutates_args=())
def _sparse_dwconv2d_op(
    x: torch.Tensor, offsets: torch.Tensor, taps: torch.Tensor, values: torch.Tensor,
    block_offsets: torch.Tensor, block_taps: torch.Tensor, block_values: torch.Tensor,
    bias: Optional[torch.Tensor], kh: int, kw: int, stride: list[int], padding: list[int], dilation: list[int],
    activation: int,
) -> torch.Tensor:
    # Devices without a registered kernel land here: the same checks, which name the device.
    check_op_args(x, (offsets, taps, values, block_offsets, block_taps, block_values), bias, kh, kw, stride,
                  padding, dilation, activation)
    raise ValueError(f"unsupported device {x.device}: expected {' or '.join(LAUNCHERS)}")


for _device, _factory in LAUNCHERS.items():
    _sparse_dwconv2d_op.register_kernel(_device)(functools.partial(run, _factory))


@_sparse_dwconv2d_op.register_fake
def _(x, offsets, taps, values, block_offsets, block_taps, block_values, bias, kh, kw, stride, padding, dilation,
      activation):
    fmt = torch.channels_last if layout(x) else torch.contiguous_format
    return torch.empty(out_shape(x, kh, kw, stride, padding, dilation), dtype=x.dtype, device=x.device,
                       memory_format=fmt)


def _has_cuda_kernels() -> bool:
    global _cuda_compiled
    if _cuda_compiled is None:
        _cuda_compiled = bool(load_extension().cuda_compiled())
    return _cuda_compiled


def input_problem(x: torch.Tensor, channels: int, device: torch.device) -> Optional[str]:
    """Why :func:`sparse_dwconv2d` cannot take ``x`` for a plan of ``channels`` on ``device``, or None (geometry
    and backend aside: :func:`~.geometry.geometry_problem`, :func:`backend_problem`)."""
    if x.dim() != 4 or x.shape[1] != channels or x.numel() == 0:
        return f"expected a non-empty [N, {channels}, H, W] input, got shape {list(x.shape)}"
    if x.device != device:
        return f"the input is on {x.device} but the weight is on {device}"
    return dtype_problem(x.device, x.dtype)


def backend_problem(device: torch.device) -> Optional[str]:
    """Why no native kernel can run on ``device`` in this process (extension missing, or built without CUDA)."""
    if not backend_available():
        return NO_BACKEND
    if device.type == "cuda" and not _has_cuda_kernels():
        return "timm_deprune._C was built without CUDA kernels"
    return None


def sparse_problem(x: torch.Tensor, channels: int, device: torch.device, kernel_size: Sequence[int],
                   stride: Sequence[int], dilation: Sequence[int], padding: Union[str, Sequence[int]],
                   padding_mode: str = "zeros") -> Optional[str]:
    """Why :func:`sparse_dwconv2d` cannot run ``x`` with a plan of ``channels`` on ``device`` and a conv of this
    geometry, or None when it can: the three checks above, in that order."""
    return (geometry_problem(kernel_size, stride, dilation, padding, padding_mode)
            or input_problem(x, channels, device) or backend_problem(x.device))


def _check_inputs(x: torch.Tensor, plan: SparseDWPlan, bias: Optional[torch.Tensor]) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(plan, SparseDWPlan):
        raise TypeError(f"plan must be a SparseDWPlan (see build_plan), got {type(plan).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D input [N, C, H, W], got {x.dim()}-D input of shape {list(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"expected a non-empty input (every size >= 1), got shape {list(x.shape)}")
    if x.shape[1] != plan.channels:
        raise ValueError(f"input has {x.shape[1]} channels but the plan was built for {plan.channels}")
    if x.device != plan.device:
        raise ValueError(f"input is on {x.device} but the plan is on {plan.device}; move one with plan.to(x.device)")
    check_dtype(x)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (plan.channels,):
            got = list(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must be a tensor of shape [{plan.channels}], got {got}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but the input is on {x.device}")
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        raise RuntimeError(
            "sparse_dwconv2d is an inference op without a backward; run it under torch.no_grad() /"
            " torch.inference_mode(), or train with the masked dense conv"
        )


def sparse_dwconv2d(
    x: torch.Tensor,
    plan: SparseDWPlan,
    bias: Optional[torch.Tensor] = None,
    activation: str = "identity",
    stride: Union[int, Sequence[int]] = 1,
    padding: PaddingArg = 0,
    dilation: Union[int, Sequence[int]] = 1,
) -> torch.Tensor:
    """Depth-wise conv of ``x`` with the kept taps of ``plan``, then ``activation(out + bias)`` fused.

    Args:
        x: ``[N, C, H, W]`` input, NCHW or channels_last (the output keeps that memory format); fp32 on the CPU,
            fp32 / fp16 / bf16 on CUDA.
        plan: kept taps from :func:`~timm_deprune.kernels.plan.build_plan`, on ``x``'s device.
        bias: optional per-channel bias ``[C]`` added before the activation.
        activation: ``identity``, ``relu``, ``relu6``, ``silu``, ``hardswish`` or ``gelu`` (exact erf form).
        stride: 1 or 2 (int or per dimension).
        padding: int, ``(pad_h, pad_w)``, ``(left, right, top, bottom)`` as ``F.pad``, ``"valid"`` or ``"same"``
            (TF SAME, asymmetric like timm's ``Conv2dSame``).
        dilation: 1 or 2 (int or per dimension).

    Example:
        >>> w = torch.randn(32, 1, 3, 3); plan = build_plan(w, torch.rand(32, 3, 3) > 0.71)
        >>> y = sparse_dwconv2d(torch.randn(1, 32, 56, 56), plan, activation="relu6", padding=1)
    """
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    compiling = torch.compiler.is_compiling()
    if not compiling and isinstance(x, torch.Tensor) and isinstance(plan, SparseDWPlan):
        key = (x.shape, x.stride(), x.dtype, x.device, _key(stride), _key(padding), _key(dilation), activation)
        call = _LAUNCHES.get(plan, {}).get(key)
        if call is not None and _bias_ready(bias, x) and not (
            torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
        ):
            plan.check_weight()
            return call(x, bias)  # validated before for this exact input geometry

    _check_inputs(x, plan, bias)
    stride2 = pair(stride, "stride", STRIDES)
    dilation2 = pair(dilation, "dilation", DILATIONS)
    kh, kw = plan.kernel_size
    pads = resolve_padding(padding, (kh, kw), stride2, dilation2, (x.shape[2], x.shape[3]))
    oh = output_size(x.shape[2], kh, stride2[0], dilation2[0], pads[0], pads[1])
    ow = output_size(x.shape[3], kw, stride2[1], dilation2[1], pads[2], pads[3])
    if oh < 1 or ow < 1:
        raise ValueError(
            f"input of spatial size {list(x.shape[2:])} is too small for kernel {kh}x{kw} with padding"
            f" (top, bottom, left, right)={pads}, dilation {dilation2}: output would be {oh}x{ow}"
        )
    if bias is not None:
        bias = bias.detach().to(torch.float32).contiguous()
    args = (x, plan.offsets, plan.taps, plan.values, plan.block_offsets, plan.block_taps, plan.block_values, bias,
            kh, kw, list(stride2), list(pads), list(dilation2), ACTIVATIONS[activation])
    if compiling:
        return torch.ops.deprune.sparse_dwconv2d(*args)
    plan.check_weight()
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        calls = _LAUNCHES.setdefault(plan, {})
        if len(calls) >= 64:  # bounded: a plan sees a handful of input sizes in practice
            calls.clear()
        tensors = (plan.offsets, plan.taps, plan.values, plan.block_offsets, plan.block_taps, plan.block_values)
        calls[key] = call = LAUNCHERS[x.device.type](x, tensors, kh, kw, stride2, pads, dilation2,
                                                     ACTIVATIONS[activation])
        return call(x, bias)
    return run(LAUNCHERS[x.device.type], *args)


def _key(value):
    return tuple(value) if isinstance(value, list) else value


def _bias_ready(bias: Optional[torch.Tensor], x: torch.Tensor) -> bool:
    return bias is None or (
        isinstance(bias, torch.Tensor) and bias.dtype == torch.float32 and bias.device == x.device
        and bias.dim() == 1 and bias.shape[0] == x.shape[1] and bias.is_contiguous()
    )


