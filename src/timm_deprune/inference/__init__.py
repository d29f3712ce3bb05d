"""Inference: a pruned model rewritten to run fast with the same outputs, and exported for ONNX Runtime.

- :mod:`.optimize`: :func:`optimize_for_inference`, which applies the rewrites below and checks the result.
- :mod:`.fold`: BatchNorm folding (and the trace that finds which module reads each conv's output).
- :mod:`.modules`: faster equivalents of timm modules (linear squeeze-excite, conv + activation in one oneDNN call).
- :mod:`.reorder`: block-internal channels reordered by depth-wise tap pattern for the channels_last kernel.
- :mod:`.native`: timm DSConv blocks run as one native block call (point-wise GEMMs, sparse DW, squeeze-excite).
- :mod:`.export`: ONNX export checked in ONNX Runtime.
"""
from .export import export_onnx, ort_session
from .optimize import optimize_for_inference

__all__ = ["optimize_for_inference", "export_onnx", "ort_session"]
