"""timm-deprune: DEPrune pruning of depth-wise separable convolutions for timm, run on sparse kernels."""
from ._backend import backend_available
from .ops import sparse_dwconv2d
from .sparse_plan import SparseDWPlan, build_plan

__version__ = "0.1.0"

__all__ = ["SparseDWPlan", "build_plan", "sparse_dwconv2d", "backend_available", "__version__"]
