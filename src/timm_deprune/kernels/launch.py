"""Native launches of the sparse depth-wise conv: the checks a direct call of the custom op gets, and one launch
factory per device (``timm_deprune._C``'s ``dwconv2d_cpu`` / ``dwconv2d_cuda``).

A factory turns one validated input geometry into ``call(x, bias, out=None)`` with everything but the data
pointers precomputed; :mod:`.op` registers a factory per device with ``torch.library`` and caches calls for eager use.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .activations import ACTIVATIONS
from .backend import load_extension
from .geometry import DILATIONS, STRIDES, ints, layout, out_shape, padding_limits, pair
from .plan import MAX_KERNEL, check_plan_tensors

__all__ = ["DTYPES", "CUDA_DTYPE_CODES", "LAUNCHERS", "check_op_args", "check_dtype", "dtype_problem", "run",
           "launch", "cpu_call", "cuda_call"]

CUDA_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # deprune::DType in cpp/
DTYPES = {"cpu": (torch.float32,), "cuda": tuple(CUDA_DTYPE_CODES)}  # input dtypes per device type
_DEVICE_NAMES = {"cpu": "the CPU", "cuda": "CUDA"}
# Plan tensors the custom op has checked: (data pointer, version, numel) of each -> True. Bounded.
_CHECKED_PLANS: dict = {}


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


def check_op_args(x: torch.Tensor, plan_tensors: Sequence[torch.Tensor], bias: Optional[torch.Tensor], kh: int,
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
    check_dtype(x)
    stride2 = pair(list(stride), "stride", STRIDES)
    dilation2 = pair(list(dilation), "dilation", DILATIONS)
    if len(padding) != 4 or not ints(padding):
        raise ValueError(f"padding must be 4 ints (top, bottom, left, right), got {list(padding)}")
    limits = padding_limits(kh, kw, dilation2)
    if any(p < 0 or p > lim for p, lim in zip(padding, limits)):
        raise ValueError(f"padding (top, bottom, left, right)={list(padding)} out of range: each must be in [0,"
                         f" dilation * (kernel - 1)] = {list(limits)}")
    if activation not in ACTIVATIONS.values():
        raise ValueError(f"activation code must be one of {sorted(ACTIVATIONS.values())} ({ACTIVATIONS}), got"
                         f" {activation!r}")
    oh, ow = out_shape(x, kh, kw, stride2, padding, dilation2)[2:]
    if oh < 1 or ow < 1:
        raise ValueError(f"input of spatial size {list(x.shape[2:])} is too small for kernel {kh}x{kw} with padding"
                         f" {list(padding)}, dilation {list(dilation2)}: output would be {oh}x{ow}")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != channels or bias.dtype != torch.float32:
            raise ValueError(f"bias must be a float32 tensor of shape [{channels}], got {bias.dtype}"
                             f" {list(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but the input is on {x.device}")


def dtype_problem(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the kernels cannot take ``dtype`` input on ``device``, or None (the one statement of that rule)."""
    if device.type not in DTYPES:
        return f"unsupported device {device}: expected {' or '.join(DTYPES)}"
    if dtype not in DTYPES[device.type]:
        names = [str(d).replace("torch.", "") for d in DTYPES[device.type]]
        names = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
        return f"on {_DEVICE_NAMES[device.type]} the sparse kernel needs {names} input, got {dtype}"
    return None


def check_dtype(x: torch.Tensor) -> None:
    """TypeError for a dtype the kernels lack on ``x``'s device, ValueError for a device without kernels."""
    reason = dtype_problem(x.device, x.dtype)
    if reason is not None:
        raise (TypeError if x.device.type in DTYPES else ValueError)(reason)


def _geometry(x: torch.Tensor, kh: int, kw: int, stride: Sequence[int], pads: Sequence[int],
              dilation: Sequence[int], act: int):
    """Output shape and strides (in ``x``'s layout) and the native ``_C.Launch`` every launch of it takes."""
    lay = layout(x)
    fmt = torch.channels_last if lay else torch.contiguous_format
    shape = out_shape(x, kh, kw, stride, pads, dilation)
    # torch.empty_strided with the strides torch.empty(..., memory_format=fmt) gives: 1.9 vs 3.6 µs per call
    strides = torch.empty(shape, device="meta", memory_format=fmt).stride()
    n, c, h, w = x.shape
    geometry = load_extension().Launch(
        N=n, C=c, H=h, W=w, OH=shape[2], OW=shape[3], kh=kh, kw=kw, stride=(stride[0], stride[1]),
        dilation=(dilation[0], dilation[1]), pad_top=pads[0], pad_left=pads[2], activation=act, layout=lay)
    return shape, strides, geometry


def cpu_call(x: torch.Tensor, plan_tensors: Sequence[torch.Tensor], kh: int, kw: int, stride: Sequence[int],
             pads: Sequence[int], dilation: Sequence[int], act: int):
    """The CPU launch for one validated input geometry, everything but the data pointers precomputed.

    ``plan_tensors`` = (offsets, taps, values, block_offsets, block_taps, block_values). The returned
    ``call(x, bias, out=None)`` writes into ``out`` (same layout as ``x``) or a new tensor, and returns it.
    """
    fn = load_extension().dwconv2d_cpu
    shape, strides, geometry = _geometry(x, kh, kw, stride, pads, dilation, act)
    head = tuple(t.data_ptr() for t in plan_tensors)

    def call(x: torch.Tensor, bias: Optional[torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = torch.empty_strided(shape, strides, dtype=x.dtype, device=x.device) if out is None else out
        fn(x.data_ptr(), y.data_ptr(), *head, bias.data_ptr() if bias is not None else 0, geometry,
           torch.get_num_threads())
        return y

    return call


def cuda_call(x: torch.Tensor, plan_tensors: Sequence[torch.Tensor], kh: int, kw: int, stride: Sequence[int],
              pads: Sequence[int], dilation: Sequence[int], act: int):
    """As :func:`cpu_call`, on CUDA: launched on the current stream of ``x``'s device."""
    fn = load_extension().dwconv2d_cuda
    shape, strides, geometry = _geometry(x, kh, kw, stride, pads, dilation, act)
    head = tuple(t.data_ptr() for t in plan_tensors)  # NCHW reads the per-channel taps, channels_last the blocks
    dtype, device = CUDA_DTYPE_CODES[x.dtype], x.device.index or 0

    def call(x: torch.Tensor, bias: Optional[torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = torch.empty_strided(shape, strides, dtype=x.dtype, device=x.device) if out is None else out
        fn(x.data_ptr(), y.data_ptr(), *head, bias.data_ptr() if bias is not None else 0, geometry, dtype, device,
           torch.cuda.current_stream(x.device).cuda_stream)
        return y

    return call


# Device type -> launch factory: the custom op registers one kernel per entry, the eager front picks by x.device.
LAUNCHERS = {"cpu": cpu_call, "cuda": cuda_call}


def run(factory, x: torch.Tensor, offsets: torch.Tensor, taps: torch.Tensor, values: torch.Tensor,
        block_offsets: torch.Tensor, block_taps: torch.Tensor, block_values: torch.Tensor,
        bias: Optional[torch.Tensor], kh: int, kw: int, stride: Sequence[int], padding: Sequence[int],
        dilation: Sequence[int], activation: int) -> torch.Tensor:
    """The custom op's kernel for one device: every argument checked, then ``factory``'s launch (a new output)."""
    plan_tensors = (offsets, taps, values, block_offsets, block_taps, block_values)
    check_op_args(x, plan_tensors, bias, kh, kw, stride, padding, dilation, activation)
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    if layout(x) == 0 and not x.is_contiguous():
        x = x.contiguous()
    return factory(x, plan_tensors, kh, kw, stride, padding, dilation, activation)(x, bias)


def launch(x: torch.Tensor, y: torch.Tensor, offsets: torch.Tensor, taps: torch.Tensor, values: torch.Tensor,
            block_offsets: torch.Tensor, block_taps: torch.Tensor, block_values: torch.Tensor,
            bias: Optional[torch.Tensor], kh: int, kw: int, stride: Sequence[int], padding: Sequence[int],
            dilation: Sequence[int], activation: int) -> None:
    """Run the native kernel writing into ``y`` (same layout as ``x``, both contiguous in it); for tests."""
    plan_tensors = (offsets, taps, values, block_offsets, block_taps, block_values)
    check_op_args(x, plan_tensors, bias, kh, kw, stride, padding, dilation, activation)
    shape = out_shape(x, kh, kw, stride, padding, dilation)
    fmt = torch.channels_last if layout(x) else torch.contiguous_format
    if (list(y.shape) != shape or y.dtype != x.dtype or y.device != x.device or not y.is_contiguous(memory_format=fmt)
            or not (x.is_contiguous(memory_format=fmt))):
        raise ValueError(f"out must be a {x.dtype} tensor of shape {shape} on {x.device}, contiguous in the input's"
                         f" layout, got {y.dtype} {list(y.shape)}")
    call = LAUNCHERS[x.device.type](x, plan_tensors, kh, kw, stride, padding, dilation, activation)
    call(x, bias, y)


