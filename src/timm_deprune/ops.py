"""``deprune::sparse_dwconv2d``: the sparse depth-wise conv as a PyTorch custom op over ``timm_deprune._C``.

The op is registered with ``torch.library`` (with a fake kernel), so ``torch.compile(fullgraph=True)`` and
``torch.export`` accept modules that call it. In eager mode :func:`sparse_dwconv2d` calls the native kernel
directly, skipping the dispatcher (see BENCHMARKS.md for the measured per-call difference).
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence, Union

import torch

from ._backend import load_extension
from .sparse_plan import MAX_KERNEL, SparseDWPlan, check_plan_tensors

__all__ = ["sparse_dwconv2d", "ACTIVATIONS", "resolve_padding", "output_size"]

# Activation name -> code of deprune::Activation (cpp/include/deprune/dwconv.h).
ACTIVATIONS = {"identity": 0, "relu": 1, "relu6": 2, "silu": 3, "hardswish": 4, "gelu": 5}
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

PaddingArg = Union[int, str, Sequence[int]]

# Eager fast path: plan -> {input geometry: validated native launch}. Outside the frozen plan, so a copy or an
# edited plan (dataclasses.replace) never inherits launches bound to another plan's tensors.
_LAUNCHES: "weakref.WeakKeyDictionary[SparseDWPlan, dict]" = weakref.WeakKeyDictionary()
# Plan tensors the custom op has checked: (data pointer, version, numel) of each -> True. Bounded.
_CHECKED_PLANS: dict = {}


def _pair(value: Union[int, Sequence[int]], name: str, allowed: tuple[int, ...]) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and _ints(value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    for v in pair:
        if v not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)} in each dimension, got {value!r}")
    return pair


def _same_pad(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    # TensorFlow "SAME": output = ceil(size / s); the extra pixel goes after (bottom/right), as timm's Conv2dSame.
    total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def resolve_padding(
    padding: PaddingArg, kernel_size: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
    input_hw: tuple[int, int],
) -> tuple[int, int, int, int]:
    """Padding as ``(top, bottom, left, right)``.

    Accepts an int, ``(pad_h, pad_w)``, a 4-tuple in ``F.pad`` order ``(left, right, top, bottom)``, ``"valid"``
    or ``"same"`` (TensorFlow SAME, asymmetric when needed: the padding timm's ``Conv2dSame`` applies).
    """
    kh, kw = kernel_size
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding == "same":
            top, bottom = _same_pad(input_hw[0], kh, stride[0], dilation[0])
            left, right = _same_pad(input_hw[1], kw, stride[1], dilation[1])
            return top, bottom, left, right
        raise ValueError(f"padding string must be 'same' or 'valid', got {padding!r}")
    if isinstance(padding, int) and not isinstance(padding, bool):
        pads = (padding,) * 4
    elif isinstance(padding, (tuple, list)) and _ints(padding) and len(padding) == 2:
        pads = (padding[0], padding[0], padding[1], padding[1])
    elif isinstance(padding, (tuple, list)) and _ints(padding) and len(padding) == 4:
        left, right, top, bottom = padding
        pads = (top, bottom, left, right)
    else:
        raise ValueError(
            "padding must be an int, (pad_h, pad_w), (left, right, top, bottom), 'same' or 'valid', got"
            f" {padding!r}"
        )
    limits = _padding_limits(kh, kw, dilation)
    for p, limit in zip(pads, limits):
        if p < 0 or p > limit:
            raise ValueError(
                f"padding {padding!r} out of range: (top, bottom) must be in [0, {limits[0]}] and (left, right) in"
                f" [0, {limits[2]}] (dilation * (kernel - 1)) for kernel {kh}x{kw}, dilation {dilation}"
            )
    return pads


def _padding_limits(kh: int, kw: int, dilation: Sequence[int]) -> tuple[int, int, int, int]:
    """Largest (top, bottom, left, right) padding the kernels accept: ``dilation * (kernel - 1)``."""
    return (dilation[0] * (kh - 1),) * 2 + (dilation[1] * (kw - 1),) * 2


def _ints(values) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def output_size(size: int, k: int, s: int, d: int, p0: int, p1: int) -> int:
    return (size + p0 + p1 - d * (k - 1) - 1) // s + 1


def _layout(x: torch.Tensor) -> int:
    """0 = NCHW, 1 = channels_last. An input contiguous in both formats counts as NCHW."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return 1
    return 0


def _out_shape(x: torch.Tensor, kh: int, kw: int, stride: Sequence[int], padding: Sequence[int],
               dilation: Sequence[int]) -> list[int]:
    n, c, h, w = x.shape
    oh = output_size(h, kh, stride[0], dilation[0], padding[0], padding[1])
    ow = output_size(w, kw, stride[1], dilation[1], padding[2], padding[3])
    return [n, c, oh, ow]


def _check_plan_once(plan_tensors: Sequence[torch.Tensor], kh: int, kw: int) -> None:
    """:func:`check_plan_tensors` on raw plan tensors, skipped when these exact tensors passed before."""
    try:
        key = (kh, kw) + tuple((t.data_ptr(), t._version, t.numel(), t.dtype) for t in plan_tensors)
    except (AttributeError, RuntimeError):  # not tensors, or inference tensors (no version): check every call
        key = None
    if key is not None and key in _CHECKED_PLANS:
        return
    offsets = plan_tensors[0]
    channels = offsets.numel() - 1 if isinstance(offsets, torch.Tensor) else -1
    check_plan_tensors(channels, (kh, kw), *plan_tensors)
    if key is not None:
        if len(_CHECKED_PLANS) >= 256:
            _CHECKED_PLANS.clear()
        _CHECKED_PLANS[key] = True


def _check_op_args(x: torch.Tensor, plan_tensors: Sequence[torch.Tensor], bias: Optional[torch.Tensor], kh: int,
                   kw: int, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                   activation: int) -> None:
    """Everything the native launch dereferences or trusts, checked for a direct call of the custom op.

    ``padding`` is ``(top, bottom, left, right)``. :func:`sparse_dwconv2d` checks the same before calling; this
    guards ``torch.ops.deprune.sparse_dwconv2d`` called by hand or from a graph.
    """
    if not (isinstance(kh, int) and isinstance(kw, int) and 1 <= kh <= MAX_KERNEL and 1 <= kw <= MAX_KERNEL):
        raise ValueError(f"kernel size must be two ints in [1, {MAX_KERNEL}], got {kh}x{kw}")
    _check_plan_once(plan_tensors, kh, kw)
    channels = plan_tensors[0].numel() - 1
    if x.dim() != 4 or x.numel() == 0:
        raise ValueError(f"expected a non-empty 4-D input [N, C, H, W], got shape {list(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"input has {x.shape[1]} channels but the plan was built for {channels}")
    if x.device != plan_tensors[0].device:
        raise ValueError(f"input is on {x.device} but the plan tensors are on {plan_tensors[0].device}")
    _check_dtype(x)
    stride2 = _pair(list(stride), "stride", (1, 2))
    dilation2 = _pair(list(dilation), "dilation", (1, 2))
    if len(padding) != 4 or not _ints(padding):
        raise ValueError(f"padding must be 4 ints (top, bottom, left, right), got {list(padding)}")
    limits = _padding_limits(kh, kw, dilation2)
    if any(p < 0 or p > lim for p, lim in zip(padding, limits)):
        raise ValueError(f"padding (top, bottom, left, right)={list(padding)} out of range: each must be in [0,"
                         f" dilation * (kernel - 1)] = {list(limits)}")
    if activation not in ACTIVATIONS.values():
        raise ValueError(f"activation code must be one of {sorted(ACTIVATIONS.values())} ({ACTIVATIONS}), got"
                         f" {activation!r}")
    oh, ow = _out_shape(x, kh, kw, stride2, padding, dilation2)[2:]
    if oh < 1 or ow < 1:
        raise ValueError(f"input of spatial size {list(x.shape[2:])} is too small for kernel {kh}x{kw} with padding"
                         f" {list(padding)}, dilation {list(dilation2)}: output would be {oh}x{ow}")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != channels or bias.dtype != torch.float32:
            raise ValueError(f"bias must be a float32 tensor of shape [{channels}], got {bias.dtype}"
                             f" {list(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but the input is on {x.device}")


def _check_dtype(x: torch.Tensor) -> None:
    if x.device.type == "cpu":
        if x.dtype != torch.float32:
            raise TypeError(f"on the CPU the input must be torch.float32, got {x.dtype}")
    elif x.device.type == "cuda":
        if x.dtype not in _DTYPE_CODES:
            raise TypeError(f"on CUDA the input must be float32, float16 or bfloat16, got {x.dtype}")
    else:
        raise ValueError(f"unsupported device {x.device}: expected cpu or cuda")


def _run(x: torch.Tensor, offsets: torch.Tensor, taps: torch.Tensor, values: torch.Tensor,
         block_offsets: torch.Tensor, block_taps: torch.Tensor, block_values: torch.Tensor,
         bias: Optional[torch.Tensor], kh: int, kw: int, stride: Sequence[int], padding: Sequence[int],
         dilation: Sequence[int], activation: int) -> torch.Tensor:
    plan_tensors = (offsets, taps, values, block_offsets, block_taps, block_values)
    _check_op_args(x, plan_tensors, bias, kh, kw, stride, padding, dilation, activation)
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    if _layout(x) == 0 and not x.is_contiguous():
        x = x.contiguous()
    call = _make_call(x, (offsets, taps, values, block_offsets, block_taps, block_values), kh, kw, stride, padding,
                      dilation, activation)
    return call(x, bias)


def _launch(x: torch.Tensor, y: torch.Tensor, offsets: torch.Tensor, taps: torch.Tensor, values: torch.Tensor,
            block_offsets: torch.Tensor, block_taps: torch.Tensor, block_values: torch.Tensor,
            bias: Optional[torch.Tensor], kh: int, kw: int, stride: Sequence[int], padding: Sequence[int],
            dilation: Sequence[int], activation: int) -> None:
    """Run the native kernel writing into ``y`` (same layout as ``x``, both contiguous in it)."""
    plan_tensors = (offsets, taps, values, block_offsets, block_taps, block_values)
    _check_op_args(x, plan_tensors, bias, kh, kw, stride, padding, dilation, activation)
    shape = _out_shape(x, kh, kw, stride, padding, dilation)
    layout = _layout(x)
    fmt = torch.channels_last if layout else torch.contiguous_format
    if (list(y.shape) != shape or y.dtype != x.dtype or y.device != x.device or not y.is_contiguous(memory_format=fmt)
            or not (x.is_contiguous(memory_format=fmt))):
        raise ValueError(f"out must be a {x.dtype} tensor of shape {shape} on {x.device}, contiguous in the input's"
                         f" layout, got {y.dtype} {list(y.shape)}")
    call = _make_call(x, (offsets, taps, values, block_offsets, block_taps, block_values), kh, kw, stride, padding,
                      dilation, activation)
    call(x, bias, y)


@torch.library.custom_op("deprune::sparse_dwconv2d", mutates_args=())
def _sparse_dwconv2d_op(
    x: torch.Tensor, offsets: torch.Tensor, taps: torch.Tensor, values: torch.Tensor,
    block_offsets: torch.Tensor, block_taps: torch.Tensor, block_values: torch.Tensor,
    bias: Optional[torch.Tensor], kh: int, kw: int, stride: list[int], padding: list[int], dilation: list[int],
    activation: int,
) -> torch.Tensor:
    return _run(x, offsets, taps, values, block_offsets, block_taps, block_values, bias, kh, kw, stride, padding,
                dilation, activation)


@_sparse_dwconv2d_op.register_fake
def _(x, offsets, taps, values, block_offsets, block_taps, block_values, bias, kh, kw, stride, padding, dilation,
      activation):
    fmt = torch.channels_last if _layout(x) else torch.contiguous_format
    return torch.empty(_out_shape(x, kh, kw, stride, padding, dilation), dtype=x.dtype, device=x.device,
                       memory_format=fmt)


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
    _check_dtype(x)
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
        plan: kept taps from :func:`~timm_deprune.sparse_plan.build_plan`, on ``x``'s device.
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
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    stride2 = _pair(stride, "stride", (1, 2))
    dilation2 = _pair(dilation, "dilation", (1, 2))
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
        calls[key] = call = _make_call(x, tensors, kh, kw, stride2, pads, dilation2, ACTIVATIONS[activation])
        return call(x, bias)
    return _run(*args)


def _key(value):
    return tuple(value) if isinstance(value, list) else value


def _bias_ready(bias: Optional[torch.Tensor], x: torch.Tensor) -> bool:
    return bias is None or (
        isinstance(bias, torch.Tensor) and bias.dtype == torch.float32 and bias.device == x.device
        and bias.dim() == 1 and bias.shape[0] == x.shape[1] and bias.is_contiguous()
    )


def _make_call(x: torch.Tensor, plan_tensors: Sequence[torch.Tensor], kh: int, kw: int, stride: Sequence[int],
               pads: Sequence[int], dilation: Sequence[int], act: int):
    """The native launch for one validated input geometry, everything but the data pointers precomputed.

    ``plan_tensors`` = (offsets, taps, values, block_offsets, block_taps, block_values). The returned
    ``call(x, bias, out=None)`` writes into ``out`` (same layout as ``x``) or a new tensor, and returns it.
    """
    ext = load_extension()
    layout = _layout(x)
    fmt = torch.channels_last if layout else torch.contiguous_format
    shape = _out_shape(x, kh, kw, stride, pads, dilation)
    # torch.empty_strided with the strides torch.empty(..., memory_format=fmt) gives: 1.9 vs 3.6 µs per call
    strides = torch.empty(shape, device="meta", memory_format=fmt).stride()
    geom = (*x.shape, shape[2], shape[3], kh, kw, stride[0], stride[1], dilation[0], dilation[1], pads[0], pads[2],
            act)
    if x.device.type == "cpu":
        head = tuple(t.data_ptr() for t in plan_tensors)
        fn, tail = ext.dwconv2d_cpu, geom + (layout,)

        def call(x: torch.Tensor, bias: Optional[torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
            y = torch.empty_strided(shape, strides, dtype=x.dtype, device=x.device) if out is None else out
            fn(x.data_ptr(), y.data_ptr(), *head, bias.data_ptr() if bias is not None else 0, *tail,
               torch.get_num_threads())
            return y
    else:
        head = tuple(t.data_ptr() for t in plan_tensors[:3])  # the CUDA kernel reads the per-channel CSR only
        fn, tail = ext.dwconv2d_cuda, geom + (_DTYPE_CODES[x.dtype], layout, x.device.index or 0)

        def call(x: torch.Tensor, bias: Optional[torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
            y = torch.empty_strided(shape, strides, dtype=x.dtype, device=x.device) if out is None else out
            fn(x.data_ptr(), y.data_ptr(), *head, bias.data_ptr() if bias is not None else 0, *tail,
               torch.cuda.current_stream(x.device).cuda_stream)
            return y

    return call
