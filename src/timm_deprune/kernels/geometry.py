"""What convolution geometry the sparse kernels accept: strides, dilations, kernel sizes and padding.

The one statement of these rules: the public front (:func:`~timm_deprune.kernels.op.sparse_dwconv2d`), the custom
op's own checks (:mod:`.launch`) and the masked layer's "can the sparse op run this?" (:func:`geometry_problem`)
all read them from here.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .plan import MAX_KERNEL

__all__ = ["STRIDES", "DILATIONS", "PaddingArg", "pair", "ints", "resolve_padding", "padding_limits", "output_size",
           "out_shape", "layout", "geometry_problem"]

STRIDES = (1, 2)
DILATIONS = (1, 2)
PaddingArg = Union[int, str, Sequence[int]]


def pair(value: Union[int, Sequence[int]], name: str, allowed: tuple[int, ...]) -> tuple[int, int]:
    """``value`` (an int or two ints) as a pair, each in ``allowed``; ValueError naming ``name`` otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        both = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and ints(value):
        both = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    for v in both:
        if v not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)} in each dimension, got {value!r}")
    return both


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
    elif isinstance(padding, (tuple, list)) and ints(padding) and len(padding) == 2:
        pads = (padding[0], padding[0], padding[1], padding[1])
    elif isinstance(padding, (tuple, list)) and ints(padding) and len(padding) == 4:
        left, right, top, bottom = padding
        pads = (top, bottom, left, right)
    else:
        raise ValueError(
            "padding must be an int, (pad_h, pad_w), (left, right, top, bottom), 'same' or 'valid', got"
            f" {padding!r}"
        )
    limits = padding_limits(kh, kw, dilation)
    for p, limit in zip(pads, limits):
        if p < 0 or p > limit:
            raise ValueError(
                f"padding {padding!r} out of range: (top, bottom) must be in [0, {limits[0]}] and (left, right) in"
                f" [0, {limits[2]}] (dilation * (kernel - 1)) for kernel {kh}x{kw}, dilation {dilation}"
            )
    return pads


def padding_limits(kh: int, kw: int, dilation: Sequence[int]) -> tuple[int, int, int, int]:
    """Largest (top, bottom, left, right) padding the kernels accept: ``dilation * (kernel - 1)``."""
    return (dilation[0] * (kh - 1),) * 2 + (dilation[1] * (kw - 1),) * 2


def ints(values) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def output_size(size: int, k: int, s: int, d: int, p0: int, p1: int) -> int:
    """Output length of one spatial dimension (PyTorch's conv formula)."""
    return (size + p0 + p1 - d * (k - 1) - 1) // s + 1


def layout(x: torch.Tensor) -> int:
    """0 = NCHW, 1 = channels_last. An input contiguous in both formats counts as NCHW."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return 1
    return 0


def out_shape(x: torch.Tensor, kh: int, kw: int, stride: Sequence[int], padding: Sequence[int],
               dilation: Sequence[int]) -> list[int]:
    n, c, h, w = x.shape
    oh = output_size(h, kh, stride[0], dilation[0], padding[0], padding[1])
    ow = output_size(w, kw, stride[1], dilation[1], padding[2], padding[3])
    return [n, c, oh, ow]


def geometry_problem(kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
                     padding: Union[str, Sequence[int]], padding_mode: str = "zeros") -> Optional[str]:
    """Why the sparse kernels cannot run a conv of this geometry, or None when they can.

    ``padding`` is a conv module's: a string (``"same"`` / ``"valid"``, resolved per input) or ``(pad_h, pad_w)``.
    """
    kh, kw = kernel_size
    if not (kh <= MAX_KERNEL and kw <= MAX_KERNEL):
        return f"kernel {kh}x{kw} is larger than the sparse kernel's maximum {MAX_KERNEL}x{MAX_KERNEL}"
    if any(s not in STRIDES for s in stride):
        return f"stride {tuple(stride)} is not {' or '.join(map(str, STRIDES))} in each dimension"
    if any(d not in DILATIONS for d in dilation):
        return f"dilation {tuple(dilation)} is not {' or '.join(map(str, DILATIONS))} in each dimension"
    if padding_mode != "zeros":
        return f"padding_mode {padding_mode!r} is not 'zeros'"
    if not isinstance(padding, str):
        limits = padding_limits(kh, kw, dilation)[::2]
        if any(p < 0 or p > lim for p, lim in zip(padding, limits)):
            return f"padding {tuple(padding)} is outside [0, dilation * (kernel - 1)] = {limits}"
    return None
