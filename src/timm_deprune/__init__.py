"""timm-deprune: DEPrune pruning of depth-wise separable convolutions for timm, run on sparse kernels."""
from importlib import metadata as _metadata

from ._backend import backend_available
from .config import DepruneConfig
from .export import export_onnx, ort_session
from .hub import from_pretrained, push_to_hub, save_pretrained
from .layers import MaskedConv2d, MaskedConv2dSame, fold_batchnorm, masked_convs, set_execution, to_masked
from .ops import sparse_dwconv2d
from .optimize import optimize_for_inference
from .plan import PrunePlan, apply_plan
from .prune import PruneResult, UnsupportedModelError, prune
from .recalibrate import RecalibrateConfig, create_loaders, evaluate, recalibrate, recalibrate_bn
from .report import PruneReport
from .sparse_plan import SparseDWPlan, build_plan

from . import timm_plugin as _timm_plugin

_timm_plugin.install()  # ARCH.deprune tags and the hf-hub: / local-dir: loaders

try:
    __version__ = _metadata.version("timm-deprune")  # one version source: pyproject.toml
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "prune", "DepruneConfig", "PruneResult", "PrunePlan", "PruneReport", "apply_plan", "UnsupportedModelError",
    "save_pretrained", "push_to_hub", "from_pretrained",
    "optimize_for_inference", "export_onnx", "ort_session",
    "recalibrate", "RecalibrateConfig", "recalibrate_bn", "evaluate", "create_loaders",
    "MaskedConv2d", "MaskedConv2dSame", "to_masked", "set_execution", "masked_convs", "fold_batchnorm",
    "SparseDWPlan", "build_plan", "sparse_dwconv2d", "backend_available", "__version__",
]
