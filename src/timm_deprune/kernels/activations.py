"""The activations the kernels fuse into their epilogue: one table, read by the op, the layers and the optimiser.

Each entry names the native kernels' epilogue code (``deprune::Activation`` in ``cpp/``), the PyTorch function and
module computing the same values (gelu is the exact erf form), and oneDNN's post-op for a fused 1x1 conv.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn.functional as F
from torch import nn

__all__ = ["Activation", "ACTIVATION_TABLE", "ACTIVATIONS", "activation_name"]


@dataclass(frozen=True)
class Activation:
    name: str
    code: int  # the native epilogue's code
    fn: Callable  # the same function in PyTorch
    module: type  # an nn.Module computing it
    onednn: tuple  # (post-op name, scalars, algorithm) of torch.ops.mkldnn._convolution_pointwise


ACTIVATION_TABLE = {a.name: a for a in (
    Activation("identity", 0, lambda y: y, nn.Identity, ("none", [], "")),
    Activation("relu", 1, F.relu, nn.ReLU, ("relu", [], "")),
    Activation("relu6", 2, F.relu6, nn.ReLU6, ("hardtanh", [0.0, 6.0], "")),
    Activation("silu", 3, F.silu, nn.SiLU, ("swish", [], "")),
    Activation("hardswish", 4, F.hardswish, nn.Hardswish, ("hardswish", [], "")),
    Activation("gelu", 5, F.gelu, nn.GELU, ("gelu", [], "none")),
)}
ACTIVATIONS = {name: a.code for name, a in ACTIVATION_TABLE.items()}  # name -> native code

# timm's own activation modules that compute exactly one of the table's functions
_TIMM_EQUIVALENTS = {"timm.layers.activations.Swish": "silu", "timm.layers.activations.HardSwish": "hardswish",
                     "timm.layers.activations.GELU": "gelu"}


def activation_name(m: nn.Module) -> Optional[str]:
    """The table's name for a module whose forward is exactly that activation (its exact type), else None."""
    if type(m) is nn.GELU:
        return "gelu" if m.approximate == "none" else None
    for a in ACTIVATION_TABLE.values():
        if type(m) is a.module:
            return a.name
    return _TIMM_EQUIVALENTS.get(f"{type(m).__module__}.{type(m).__qualname__}")
