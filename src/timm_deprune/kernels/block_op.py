"""``deprune::native_block``: a whole depth-wise separable block (``timm_deprune._C.NativeBlock``) as a custom op.

A packed block lives in a process-wide registry under an integer handle, so the op's arguments are one tensor and
a few ints: ``torch.compile(fullgraph=True)`` and ``torch.export`` keep it as one node (the fake kernel computes the
output shape from the depth-wise geometry alone). In eager mode :func:`native_block` calls the native block
directly. Input and output are NCHW-shaped fp32 CPU tensors in channels_last memory (an input in another memory
format is copied once). The packing of timm blocks is :mod:`timm_deprune.inference.native`.
"""
from __future__ import annotations

import itertools
from typing import Optional, Sequence

import torch

from .backend import load_extension

__all__ = ["register_block", "release_block", "registered_block", "is_registered", "block_out_shape", "native_block",
           "DW_GEOMETRY_FIELDS"]

# Per depth-wise stage in the op's ``dw_geometry``: kh, kw, stride_h, stride_w, top, bottom, left, right (the four
# pads -1 for TF "SAME", resolved per input size as timm's Conv2dSame does).
DW_GEOMETRY_FIELDS = 8

_BLOCKS: dict = {}  # handle -> _C.NativeBlock
_NEXT = itertools.count(1)
# Eager fast path: (handle, input shape, input strides) -> (block, output shape, output strides, N, H, W, C), filled
# after a fully checked call of that exact geometry. Bounded.
_EAGER: dict = {}


def register_block(block) -> int:
    """Keep a packed ``_C.NativeBlock`` and return its handle for :func:`native_block`."""
    if not isinstance(block, load_extension().NativeBlock):
        raise TypeError(f"expected a timm_deprune._C.NativeBlock, got {type(block).__name__}")
    handle = next(_NEXT)
    _BLOCKS[handle] = block
    return handle


def release_block(handle: int) -> None:
    """Drop a registered block (its weights and workspace); unknown handles are ignored."""
    if _BLOCKS.pop(handle, None) is not None:
        for key in [k for k in _EAGER if k[0] == handle]:
            del _EAGER[key]


def is_registered(handle: int) -> bool:
    """Whether a block is registered under ``handle``."""
    return handle in _BLOCKS


def registered_block(handle: int):
    """The block registered under ``handle``; ValueError when there is none."""
    block = _BLOCKS.get(handle)
    if block is None:
        raise ValueError(f"no native block is registered under handle {handle!r} (released, or from another"
                         " process); re-run optimize_for_inference")
    return block


def _same_out(size, k: int, s: int):
    return (size + s - 1) // s


def block_out_shape(shape: Sequence, out_channels: int, dw_geometry: Sequence[int]) -> list:
    """Output ``[N, out_channels, OH, OW]`` of a block for input ``shape`` ``[N, C, H, W]`` (sizes may be symbolic)."""
    if len(dw_geometry) % DW_GEOMETRY_FIELDS:
        raise ValueError(f"dw_geometry must hold {DW_GEOMETRY_FIELDS} ints per depth-wise stage, got"
                         f" {len(dw_geometry)}")
    n, _, h, w = shape
    for i in range(0, len(dw_geometry), DW_GEOMETRY_FIELDS):
        kh, kw, sh, sw, top, bottom, left, right = dw_geometry[i:i + DW_GEOMETRY_FIELDS]
        if top < 0:
            h, w = _same_out(h, kh, sh), _same_out(w, kw, sw)
        else:
            h, w = (h + top + bottom - kh) // sh + 1, (w + left + right - kw) // sw + 1
    return [n, out_channels, h, w]


def _check_input(x: torch.Tensor, block) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D input [N, C, H, W], got {x.dim()}-D input of shape {list(x.shape)}")
    if x.device.type != "cpu":
        raise ValueError(f"the native block runs on the CPU, got an input on {x.device}")
    if x.dtype != torch.float32:
        raise TypeError(f"the native block needs float32 input, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"expected a non-empty input (every size >= 1), got shape {list(x.shape)}")
    if x.shape[1] != block.in_channels:
        raise ValueError(f"input has {x.shape[1]} channels but the native block expects {block.in_channels}")
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("the native block is inference-only (no backward): run it under torch.no_grad() /"
                           " torch.inference_mode()")


def _run(x: torch.Tensor, handle: int, out_channels: int, dw_geometry: Sequence[int],
         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    block = registered_block(handle)
    _check_input(x, block)
    if not x.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    shape = list(block.out_shape(n, h, w, c))  # ValueError for an input the block cannot take
    shape = [shape[0], shape[3], shape[1], shape[2]]
    if shape[1] != out_channels or shape != block_out_shape(x.shape, out_channels, dw_geometry):
        raise ValueError(f"native block {handle} computes {shape} for input {list(x.shape)}, but the call describes"
                         f" {block_out_shape(x.shape, out_channels, dw_geometry)} (out_channels={out_channels},"
                         f" dw_geometry={list(dw_geometry)})")
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, memory_format=torch.channels_last)
    elif (list(out.shape) != shape or out.dtype != torch.float32 or out.device.type != "cpu"
          or not out.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"out must be a channels_last float32 CPU tensor of shape {shape}, got {out.dtype}"
                         f" {list(out.shape)} on {out.device}")
    block.run(x.data_ptr(), out.data_ptr(), n, h, w, c, torch.get_num_threads())
    return out


def _remember(x: torch.Tensor, handle: int, y: torch.Tensor) -> None:
    if len(_EAGER) >= 1024:
        _EAGER.clear()
    n, c, h, w = x.shape
    _EAGER[(handle, x.shape, x.stride())] = (_BLOCKS[handle], y.shape, y.stride(), n, h, w, c)


@torch.library.custom_op("deprune::native_block", mutates_args=())
def _native_block_op(x: torch.Tensor, handle: int, out_channels: int, dw_geometry: list[int]) -> torch.Tensor:
    raise ValueError(f"unsupported device {x.device}: the native block runs on the CPU")


_native_block_op.register_kernel("cpu")(_run)


@_native_block_op.register_fake
def _(x, handle, out_channels, dw_geometry):
    return torch.empty(block_out_shape(x.shape, out_channels, dw_geometry), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def native_block(x: torch.Tensor, handle: int, out_channels: int, dw_geometry: Sequence[int],
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run the registered block ``handle`` on ``x`` ``[N, C, H, W]`` (fp32, CPU); channels_last output.

    ``out_channels`` and ``dw_geometry`` (:data:`DW_GEOMETRY_FIELDS` ints per depth-wise stage) describe the
    output shape for the fake kernel and are checked against the block. ``out`` (eager only) receives the result.
    """
    if torch.compiler.is_compiling():
        return torch.ops.deprune.native_block(x, handle, out_channels, list(dw_geometry))
    if out is None and isinstance(x, torch.Tensor):
        hit = _EAGER.get((handle, x.shape, x.stride()))
        if hit is not None and x.dtype == torch.float32 and x.device.type == "cpu" and not (
                x.requires_grad and torch.is_grad_enabled()):
            block, shape, strides, n, h, w, c = hit  # this exact geometry passed every check before
            y = torch.empty_strided(shape, strides)
            block.run(x.data_ptr(), y.data_ptr(), n, h, w, c, torch.get_num_threads())
            return y
    y = _run(x, handle, out_channels, dw_geometry, out)
    if out is None and x.is_contiguous(memory_format=torch.channels_last):
        _remember(x, handle, y)
    return y
