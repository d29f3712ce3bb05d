"""What pruning did: a per-layer table with ratios, FLOPs and params before/after, and the decision time."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["LayerReport", "PruneReport", "count_macs"]


@dataclass(frozen=True)
class LayerReport:
    """One row: a depth-wise layer (``kind == "dw"``) or a block's internal channels (``"pw"``)."""

    path: str
    kind: str
    channels_before: int
    channels_after: int
    target_ratio: float
    achieved_ratio: float
    min_group_ratio: Optional[float]
    max_group_ratio: Optional[float]
    aligned: bool
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int


@dataclass(frozen=True)
class PruneReport:
    """Per-layer rows plus whole-model totals. MACs are per image at ``input_size``; params count only
    weights that can be non-zero (pruned taps are not parameters any more)."""

    layers: tuple[LayerReport, ...]
    input_size: tuple[int, int, int]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    decide_seconds: float  # wall time to decide every mask and kept channel (not the surgery)
    dead_channels_removed: int
    dead_channels_kept: int  # all-pruned DW channels behind a gate (SE): kept, they output a constant
    skipped: tuple[str, ...] = field(default_factory=tuple)  # DW convs left dense, with the reason
    calibration_seconds: Optional[float] = None  # wall time spent on calibration data (None: none given)
    calibration_peak_mb: Optional[float] = None  # peak resident memory of the process while calibrating, MiB

    def table(self) -> str:
        """The per-layer table as fixed-width text."""
        head = (f"{'layer':<34} {'kind':<4} {'ch':>9} {'target':>6} {'achvd':>6} {'minG':>5} {'maxG':>5} {'al':>2}"
                f" {'MMACs':>13} {'params':>15}")
        rows = [head, "-" * len(head)]
        for r in self.layers:
            g = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
            rows.append(
                f"{r.path[-34:]:<34} {r.kind:<4} {f'{r.channels_before}>{r.channels_after}':>9} {r.target_ratio:>6.2f}"
                f" {r.achieved_ratio:>6.3f} {g(r.min_group_ratio):>5} {g(r.max_group_ratio):>5}"
                f" {'y' if r.aligned else 'n':>2} {f'{r.macs_before / 1e6:.2f}>{r.macs_after / 1e6:.2f}':>13}"
                f" {f'{r.params_before}>{r.params_after}':>15}")
        return "\n".join(rows)

    def summary(self) -> str:
        """Totals in one paragraph."""
        return (f"MACs {self.macs_before / 1e6:.1f}M -> {self.macs_after / 1e6:.1f}M"
                f" ({1 - self.macs_after / max(self.macs_before, 1):.1%} fewer), params {self.params_before / 1e6:.3f}M"
                f" -> {self.params_after / 1e6:.3f}M at input {list(self.input_size)}; masks decided in"
                f" {self.decide_seconds * 1e3:.1f} ms{self._calibration_text()}; dead DW channels removed"
                f" {self.dead_channels_removed}, kept behind a gate {self.dead_channels_kept}")

    def _calibration_text(self) -> str:
        if self.calibration_seconds is None:
            return ""
        return f", calibration {self.calibration_seconds:.1f} s (peak memory {self.calibration_peak_mb:.0f} MiB)"

    def __str__(self) -> str:
        return self.table() + "\n" + self.summary()


def _kernel_params(m: nn.Module) -> int:
    mask = getattr(m, "mask", None)
    weight = int(mask.sum()) if isinstance(mask, torch.Tensor) else m.weight.numel()
    return weight + (m.bias.numel() if getattr(m, "bias", None) is not None else 0)


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Sequence[int]) -> dict[str, tuple[int, int]]:
    """Multiply-accumulates and parameters of every conv and linear layer for one image, by module path.

    A masked depth-wise conv counts only its kept taps. Runs one forward pass on zeros of ``[1, *input_size]``.
    """
    stats: dict[str, tuple[int, int]] = {}
    hooks = []

    def hook(path):
        def fn(m, inputs, out):
            if isinstance(m, nn.Linear):
                macs = out.numel() // out.shape[-1] * m.in_features * m.out_features
            else:
                spatial = out.shape[-1] * out.shape[-2]
                mask = getattr(m, "mask", None)
                taps = int(mask.sum()) if isinstance(mask, torch.Tensor) else m.weight.numel()
                macs = spatial * taps
            prev = stats.get(path, (0, 0))
            stats[path] = (prev[0] + int(macs), _kernel_params(m))
        return fn

    for path, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook(path)))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        model(torch.zeros(1, *input_size, dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return stats
