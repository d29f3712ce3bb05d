"""timm-deprune: DEPrune pruning of depth-wise separable convolutions for timm, run on sparse kernels."""
from importlib import metadata as _metadata

from ._backend import backend_available
from .ops import sparse_dwconv2d
from .sparse_plan import SparseDWPlan, build_plan

try:
    __version__ = _metadata.version("timm-deprune")  # one version source: pyproject.toml
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["SparseDWPlan", "build_plan", "sparse_dwconv2d", "backend_available", "__version__"]
