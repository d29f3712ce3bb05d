"""The sparse depth-wise conv kernels' Python side: loading ``timm_deprune._C``, the kernel plan, the custom op.

- :mod:`.backend`: loads the native extension once, with one clear error when it is missing.
- :mod:`.plan`: :class:`SparseDWPlan`, the kept taps in the layouts the kernels read, and :func:`build_plan`.
- :mod:`.geometry`: the strides, dilations, kernel sizes and padding the kernels accept.
- :mod:`.activations`: the activations the kernels fuse, one table.
- :mod:`.launch`: per-device native launches and the checks a direct call of the custom op gets.
- :mod:`.op`: ``deprune::sparse_dwconv2d`` (custom op, per-device kernels, fake) and :func:`sparse_dwconv2d`.
- :mod:`.block_op`: ``deprune::native_block``, a whole packed depth-wise separable block as one custom op.
"""
from .backend import backend_available, load_extension
from .op import sparse_dwconv2d, sparse_problem
from .plan import SparseDWPlan, build_plan

__all__ = ["backend_available", "load_extension", "sparse_dwconv2d", "sparse_problem", "SparseDWPlan", "build_plan"]
