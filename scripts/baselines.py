"""Baselines a user would pick instead of DEPrune, shared by the scripts: Torch-Pruning channel pruning at a MACs
budget (PyPI ``torch-pruning``: ``pip install torch-pruning`` or ``.[study]``)."""
from __future__ import annotations

import copy

import torch


def torch_pruned_at(model, macs_target: int, size: int):
    """Torch-Pruning group-magnitude channel pruning (uniform ratio, channels rounded to 8, classifier kept) whose
    MACs (counted as ours are) come closest to ``macs_target``; returns (model, MACs, params)."""
    x = torch.randn(1, 3, size, size)
    with torch.enable_grad():  # Torch-Pruning traces its dependency graph through autograd
        return _bisect(model, macs_target, size, x)


def _bisect(model, macs_target: int, size: int, x: torch.Tensor):
    import torch_pruning as tp
    from timm_deprune.pruning.report import count_macs

    lo, hi, best = 0.0, 0.9, None
    for _ in range(10):
        mid = (lo + hi) / 2
        m = copy.deepcopy(model).eval()
        tp.pruner.BasePruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=mid,
                             ignored_layers=[m.get_classifier()], round_to=8).step()
        counts = count_macs(m, (3, size, size))
        macs, params = sum(v[0] for v in counts.values()), sum(p.numel() for p in m.parameters())
        if best is None or abs(macs - macs_target) < abs(best[1] - macs_target):
            best = (m, macs, params)
        lo, hi = (mid, hi) if macs > macs_target else (lo, mid)
    return best
