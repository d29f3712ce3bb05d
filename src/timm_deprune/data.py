"""What a model expects as input: its ``(C, H, W)`` from timm's data config, or a size the caller gives, checked.

One rule for every place that traces or reports a model (pruning's MAC counts, BN folding, ONNX export, the CLI):
an explicit size wins; otherwise :func:`timm.data.resolve_model_data_config` reads the model's ``pretrained_cfg``
(``(3, 224, 224)`` when it has none).
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

import timm.data

__all__ = ["model_input_size"]


def model_input_size(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> tuple[int, int, int]:
    """``input_size`` checked as three positive ints, or the model's own input size when it is None.

    Example:
        >>> import timm
        >>> model_input_size(timm.create_model("mobilenetv2_050")), model_input_size(nn.Identity(), (1, 28, 28))
        ((3, 224, 224), (1, 28, 28))
    """
    if input_size is None:
        input_size = timm.data.resolve_model_data_config(model)["input_size"]
    size = tuple(input_size)
    if len(size) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"input_size must be three positive ints (C, H, W) without the batch, got {input_size!r}")
    return size
