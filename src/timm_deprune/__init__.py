"""timm-deprune: DEPrune pruning of depth-wise separable convolutions for timm, run on sparse kernels.

The package, in data-flow order (ARCHITECTURE.md §4): :mod:`.kernels` (the native sparse kernels' Python side),
:mod:`.layers` (masked depth-wise convs), :mod:`.pruning` (the pruning engine), :mod:`.recalibrate` (fine-tuning),
:mod:`.inference` (optimisation and ONNX export), :mod:`.hub` (folders, the Hub, timm's hooks), :mod:`.cli`.
"""
from ._version import __version__
from .config import DepruneConfig
from .hub import from_pretrained, push_to_hub, save_pretrained
from .inference import export_onnx, optimize_for_inference, ort_session
from .inference.fold import fold_batchnorm
from .kernels import SparseDWPlan, backend_available, build_plan, sparse_dwconv2d
from .layers import MaskedConv2d, MaskedConv2dSame, masked_convs, set_execution, to_masked
from .pruning import PrunePlan, PruneReport, PruneResult, UnsupportedModelError, apply_plan, prune
from .recalibrate import RecalibrateConfig, create_loaders, evaluate, recalibrate, recalibrate_bn

from .hub import timm_plugin as _timm_plugin

_timm_plugin.install()  # ARCH.deprune tags and the hf-hub: / local-dir: loaders

__all__ = [
    "prune", "DepruneConfig", "PruneResult", "PrunePlan", "PruneReport", "apply_plan", "UnsupportedModelError",
    "save_pretrained", "push_to_hub", "from_pretrained",
    "optimize_for_inference", "export_onnx", "ort_session",
    "recalibrate", "RecalibrateConfig", "recalibrate_bn", "evaluate", "create_loaders",
    "MaskedConv2d", "MaskedConv2dSame", "to_masked", "set_execution", "masked_convs", "fold_batchnorm",
    "SparseDWPlan", "build_plan", "sparse_dwconv2d", "backend_available", "__version__",
]
