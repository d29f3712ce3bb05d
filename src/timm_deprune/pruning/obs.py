"""Second-order pruning of one layer from calibration statistics: Hessians, OBS tap selection, least-squares refits
(ARCHITECTURE.md §9).

- :func:`dw_hessian`: per depth-wise channel ``H_c = Σ patch·patchᵀ`` (``kh*kw`` square) of its input patches,
  accumulated in float64 batch by batch (no activations are kept).
- :func:`obs_select`: Optimal-Brain-Compression tap selection. The pruned count of every group comes from
  :func:`~.select.select_dw_taps` itself (BWT / HSR / ``min_keep`` / ``block:N``, so no rule is restated); which
  taps go is decided greedily by the saliency ``w_i² / [H⁻¹]_ii`` with the OBS update of the remaining taps.
- :func:`refit_kept_taps`: the same result for a mask chosen by another importance (least squares on kept taps).
- :func:`refit_consumer`: ridge least squares of a point-wise consumer from accumulated ``XXᵀ`` / ``YXᵀ``.

Everything here is a pure function of tensors; :mod:`.calibrator` runs the network to collect the statistics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import Conv2dSame, pad_same

from .select import DWSelection, select_dw_taps, selection_of

__all__ = ["DAMP", "DW_POSITIONS", "sample_positions", "dw_patches", "dw_hessian", "DWStats", "ridge_start", "damping", "damped_inverse",
           "spd_inverse", "output_positions", "obs_paths", "obs_prune", "group_counts", "obs_select",
           "refit_kept_taps", "activation_rows", "refit_consumer", "can_refit"]

DAMP = 0.01  # dampening: this fraction of the mean Hessian diagonal is added to it (SparseGPT's percdamp)
DW_POSITIONS = 256  # output positions per image used for a DW Hessian (all when fewer)


def sample_positions(n: int, cap: int, seed: int) -> Optional[torch.Tensor]:
    """Sorted indices of a fixed random subset of ``cap`` out of ``n`` positions; None (all) when ``n <= cap``."""
    if n <= cap:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:cap].sort().values


def dw_patches(conv: nn.Conv2d, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Input patches of a depth-wise conv: ``[N, C, kh*kw, L]``, padded as the conv pads.

    ``positions``: flat output positions to take, ``[L]`` (the same for every image) or ``[N, L]`` (per image); all
    ``Ho*Wo`` when None. Chosen positions are gathered from the padded input by index, so only they are copied.
    """
    kh, kw = conv.kernel_size
    if isinstance(conv, Conv2dSame):
        x = pad_same(x, conv.kernel_size, conv.stride, conv.dilation)
    elif isinstance(conv.padding, str):
        if conv.padding == "same":  # (stride 1): PyTorch puts the extra pixel on the right / bottom
            tot = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
            x = F.pad(x, [tot[1] // 2, tot[1] - tot[1] // 2, tot[0] // 2, tot[0] - tot[0] // 2])
    elif any(conv.padding):
        ph, pw = conv.padding
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, [pw, pw, ph, ph], mode=mode)
    (sh, sw), (dh, dw_) = conv.stride, conv.dilation
    n, c, hp, wp = x.shape
    ho = (hp - dh * (kh - 1) - 1) // sh + 1
    wo = (wp - dw_ * (kw - 1) - 1) // sw + 1
    if positions is None:
        taps = [x[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw_: j * dw_ + sw * (wo - 1) + 1: sw]
                .reshape(n, c, ho * wo) for i in range(kh) for j in range(kw)]
        return torch.stack(taps, 2)
    pos = positions.to(torch.long).reshape(-1 if positions.dim() == 2 else 1, positions.shape[-1]).expand(n, -1)
    corner = (pos // wo) * (sh * wp) + (pos % wo) * sw  # flat padded index of each window's top-left tap
    offsets = torch.tensor([i * dh * wp + j * dw_ for i in range(kh) for j in range(kw)], dtype=torch.long)
    index = (corner[:, None, :] + offsets[None, :, None]).reshape(n, 1, -1)  # [N, 1, k*L]
    flat = x.reshape(n, c, hp * wp)
    return flat.gather(2, index.expand(n, c, index.shape[-1])).reshape(n, c, kh * kw, -1)


def output_positions(conv: nn.Conv2d, x: torch.Tensor) -> int:
    """``Ho * Wo`` of depth-wise conv ``conv`` on input ``x`` (a zero-size probe: nothing is computed)."""
    return conv(x[:1, :, :, :].new_zeros(1, x.shape[1], x.shape[2], x.shape[3])[:0]).shape[-2:].numel()


def dw_hessian(conv: nn.Conv2d, x: torch.Tensor, out: Optional[torch.Tensor] = None,
               positions: int = DW_POSITIONS, seed: int = 0) -> torch.Tensor:
    """Add ``Σ patch·patchᵀ`` of every channel of the batch ``x`` to ``out`` (float64 ``[C, k, k]``); returns it.

    At most ``positions`` output positions per image are used (a fixed random subset), all when fewer.
    """
    c = conv.in_channels
    k = conv.kernel_size[0] * conv.kernel_size[1]
    if out is None:
        out = torch.zeros(c, k, k, dtype=torch.float64)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    idx = sample_positions(output_positions(conv, x), positions, seed)
    p = dw_patches(conv, x.detach().to(dtype), idx)  # [n, C, k, L]
    p = p.permute(1, 2, 0, 3).reshape(c, k, -1)  # [C, k, n*L]
    out += torch.bmm(p, p.transpose(1, 2)).double().cpu()
    return out


@dataclass
class DWStats:
    """Calibration statistics of one depth-wise conv, accumulated batch by batch (float64, per channel).

    ``h = Σ p·pᵀ`` ``[C, k, k]`` and ``sp = Σ p`` ``[C, k]`` over the sampled input patches ``p`` of the pruned network;
    with targets (outputs ``y`` of the dense network at the same positions) also ``g = Σ y·p`` ``[C, k]`` and
    ``sy = Σ y`` ``[C]``. ``n``: patches per channel.
    """

    h: torch.Tensor
    sp: torch.Tensor
    n: int = 0
    g: Optional[torch.Tensor] = None
    sy: Optional[torch.Tensor] = None

    @classmethod
    def zeros(cls, channels: int, k: int, targets: bool) -> "DWStats":
        z = dict(dtype=torch.float64)
        return cls(torch.zeros(channels, k, k, **z), torch.zeros(channels, k, **z), 0,
                   torch.zeros(channels, k, **z) if targets else None, torch.zeros(channels, **z) if targets else None)

    def add(self, patches: torch.Tensor, y: Optional[torch.Tensor] = None) -> None:
        """Add a batch: ``patches`` ``[N, C, k, L]`` (from :func:`dw_patches`), ``y`` ``[N, C, L]`` or None."""
        dtype = torch.float64 if patches.dtype == torch.float64 else torch.float32
        p = patches.to(dtype).permute(1, 2, 0, 3).reshape(patches.shape[1], patches.shape[2], -1)  # [C, k, n]
        self.h += torch.bmm(p, p.transpose(1, 2)).double()  # float32 products of one batch, float64 sums
        self.sp += p.sum(2).double()
        self.n += p.shape[2]
        if self.g is not None:
            if y is None:
                raise ValueError("these statistics hold targets: give the batch's outputs y")
            yy = y.to(dtype).permute(1, 0, 2).reshape(p.shape[0], -1, 1)  # [C, n, 1]
            self.g += torch.bmm(p, yy)[:, :, 0].double()
            self.sy += yy.sum((1, 2)).double()

    def take(self, channels: torch.Tensor) -> "DWStats":
        """The statistics of ``channels`` only (an index or a bool mask)."""
        return DWStats(self.h[channels], self.sp[channels], self.n, None if self.g is None else self.g[channels],
                       None if self.sy is None else self.sy[channels])

    def hessian(self, centered: bool = False) -> torch.Tensor:
        """``Σ p·pᵀ``; centered: ``Σ (p - p̄)(p - p̄)ᵀ`` (the Hessian of the fit with a free per-channel offset)."""
        if not centered or self.n == 0:
            return self.h
        mp = self.sp / self.n
        return self.h - self.n * mp[:, :, None] * mp[:, None, :]

    def target(self, centered: bool = False) -> Optional[torch.Tensor]:
        """``Σ y·p`` (centered: ``Σ (y - ȳ)(p - p̄)``), or None without targets."""
        if self.g is None or not centered or self.n == 0:
            return self.g
        return self.g - self.sy[:, None] * self.sp / self.n

    def offset(self, weight: torch.Tensor) -> torch.Tensor:
        """``ȳ - w·p̄`` per channel: the offset that, added to the conv's output, makes its mean the target's."""
        if self.sy is None or self.n == 0:
            raise ValueError("an offset needs statistics with targets")
        w = weight.detach().reshape(self.sp.shape).double().cpu()
        return (self.sy - (w * self.sp).sum(1)) / self.n


def damping(diag: torch.Tensor, damp: float) -> torch.Tensor:
    """Per channel ``damp`` times the mean of the Hessian diagonal ``diag`` ``[C, k]``; 1 for an all-zero Hessian
    (a channel that saw no input), so its inverse exists."""
    mean = diag.mean(-1)
    return torch.where(mean > 0, damp * mean, torch.ones_like(mean))


def damped_inverse(h: torch.Tensor, damp: float) -> torch.Tensor:
    """``(H + damp·mean(diag H)·I)⁻¹`` per channel; a channel with a zero Hessian gets the identity."""
    k = h.shape[-1]
    diag = h.diagonal(dim1=-2, dim2=-1)
    lam = damping(diag, damp)
    eye = torch.eye(k, dtype=torch.float64)
    return spd_inverse(h + lam[:, None, None] * eye)


def spd_inverse(a: torch.Tensor) -> torch.Tensor:
    """Inverse of a batch ``[B, k, k]`` of symmetric positive definite matrices by the sweep operator: ``k``
    vectorised rank-1 steps (a batched LAPACK inverse of a thousand 5x5-tap Hessians took ~0.7 s here).

    Example:
        >>> spd_inverse(2 * torch.eye(3, dtype=torch.float64)[None])[0].diagonal().tolist()
        [0.5, 0.5, 0.5]
    """
    a = a.clone()
    for i in range(a.shape[-1]):
        d = a[:, i, i].clone()
        col, row = a[:, :, i].clone(), a[:, i, :].clone()
        a.baddbmm_(col[:, :, None], (row / d[:, None])[:, None, :], alpha=-1.0)
        a[:, :, i] = col / d[:, None]
        a[:, i, :] = row / d[:, None]
        a[:, i, i] = -1.0 / d
    return a.neg_()


def obs_paths(weight: torch.Tensor, hinv: torch.Tensor, block: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Every block's greedy OBS removal path: the order its taps leave and the cost of each removal.

    Blocks of ``block`` channels share their tap pattern, so step ``s`` removes from every block the tap of least
    summed saliency ``Σ_c w_ci² / [H_c⁻¹]_ii`` and applies the OBS update
    ``w_c -= w_ci / [H_c⁻¹]_ii · H_c⁻¹[:, i]``
    (with the downdate of ``H_c⁻¹``) to each of its channels. Blocks never interact, so all run at once:
    ``kh*kw`` vectorised steps. ``weight`` ``[C, k]`` and ``hinv`` ``[C, k, k]`` (float64) are not changed.
    Returns ``order`` and ``cost``, both ``[blocks, k]``.
    """
    c, k = weight.shape
    nb = -(-c // block)
    block_of = torch.arange(c) // block
    rows, brows = torch.arange(c), torch.arange(nb)
    w, hi = weight.clone(), hinv.clone()
    alive = torch.ones(nb, k, dtype=torch.bool)
    order = torch.empty(nb, k, dtype=torch.long)
    cost = torch.empty(nb, k, dtype=torch.float64)
    for step in range(k):
        sal = w.square() / hi.diagonal(dim1=-2, dim2=-1).clamp_min(1e-300)
        if block > 1:  # pad to whole blocks (zero saliency) and add up each block's channels
            sal = torch.cat([sal, sal.new_zeros(nb * block - c, k)]).reshape(nb, block, k).sum(1)
        bsal = sal.masked_fill(~alive, float("inf"))
        tap = bsal.argmin(1)
        order[:, step], cost[:, step] = tap, bsal[brows, tap]
        tc = tap[block_of]
        col = hi[rows, :, tc]  # [C, k]
        dii = hi[rows, tc, tc].clamp_min(1e-300)
        w -= (w[rows, tc] / dii)[:, None] * col
        w[rows, tc] = 0.0
        hi.baddbmm_(col[:, :, None], (col / dii[:, None])[:, None, :], alpha=-1.0)
        alive[brows, tap] = False
    return order, cost


def obs_prune(weight: torch.Tensor, hinv: torch.Tensor, counts: Sequence[int], group_units: int,
              block: int = 1) -> torch.Tensor:
    """Greedy OBS removal: ``counts[g]`` block-taps leave group ``g`` (``group_units`` blocks of ``block`` channels).

    The group-wide greedy (each step removes the group's cheapest next removal, :func:`obs_paths`) only ever takes
    a block's path in order, and takes its step ``s`` once the level reaches the largest cost of the path up to
    ``s``: so the first ``counts[g]`` removals of group ``g`` are those of least running-maximum cost (earlier steps
    first on ties). Returns the keep mask ``[C, k]``; the kept weights are :func:`refit_kept_taps` of it.
    """
    c, k = weight.shape
    nb = -(-c // block)
    ng = -(-nb // group_units)
    need = torch.tensor(list(counts), dtype=torch.long)
    if len(need) != ng:
        raise ValueError(f"expected {ng} group counts, got {len(need)}")
    if bool((need > group_units * k).any()) or bool((need < 0).any()):
        raise ValueError(f"group counts {need.tolist()} must lie in [0, {group_units * k}]")
    order, cost = obs_paths(weight, hinv, block)
    level = torch.full((ng * group_units, k), float("inf"), dtype=torch.float64)
    level[:nb] = cost.cummax(1).values
    # step-major within a group, so a stable sort breaks ties by step first: each block loses a prefix of its path
    flat = level.reshape(ng, group_units, k).transpose(1, 2).reshape(ng, k * group_units)
    rank = torch.empty_like(flat, dtype=torch.long)
    rank.scatter_(1, torch.sort(flat, dim=1, stable=True).indices,
                  torch.arange(k * group_units).expand(ng, -1).contiguous())
    taken = (rank < need[:, None]).reshape(ng, k, group_units).transpose(1, 2).reshape(-1, k)[:nb]
    removed = taken.sum(1)  # a prefix of each block's path
    pruned = torch.zeros(nb, k, dtype=torch.bool)
    pruned.scatter_(1, order, torch.arange(k)[None, :] < removed[:, None])
    return ~pruned.repeat_interleave(block, dim=0)[:c]


def group_counts(sel: DWSelection, block: int, group: int, balance: bool, align: str) -> tuple[list[int], int]:
    """Block-taps to prune per group, read off a :func:`select_dw_taps` result, and the blocks per group.

    DCP without alignment fixes only the layer's total, so the whole layer is one group.
    """
    first = sel.mask[::block].flatten(1)  # one row per block: its shared pattern
    nb = first.shape[0]
    units = group // block
    if not balance and align == "none":
        return [int((~first).sum())], nb
    return [int((~first[g:g + units]).sum()) for g in range(0, nb, units)], units


def obs_select(weight: torch.Tensor, hessian: torch.Tensor, ratio: float, *, balance: bool, align: str = "none",
               tile: int = 32, group: int = 32, min_keep: int = 1, block: int = 1,
               damp: float = DAMP, target: Optional[torch.Tensor] = None) -> tuple[DWSelection, torch.Tensor]:
    """OBS tap selection of one depth-wise layer; returns the selection and the updated weight ``[C, 1, kh, kw]``.

    The pruned counts are exactly those :func:`select_dw_taps` gives for the same options (ranked there by the
    initial saliency, which only matters for DCP's per-group shares); OBS decides which taps meet them, and the
    kept taps end as the OBS updates leave them (:func:`refit_kept_taps`: the same least-squares optimum).

    Example:
        >>> w = torch.randn(32, 1, 3, 3); h = torch.eye(9).repeat(32, 1, 1)
        >>> sel, w2 = obs_select(w, h, 0.5, balance=True, align="under")
        >>> sel.group_pruned
        (128,)
    """
    c, _, kh, kw = weight.shape
    k = kh * kw
    if tuple(hessian.shape) != (c, k, k):
        raise ValueError(f"hessian must be [{c}, {k}, {k}] for a weight of shape {list(weight.shape)},"
                         f" got {list(hessian.shape)}")
    w = weight.detach().reshape(c, k).double().cpu().clone()
    hinv = damped_inverse(hessian.double(), damp)
    if target is not None:
        w = ridge_start(w, hessian.double(), target, damp, hinv)
    sal0 = (w.square() / hinv.diagonal(dim1=-2, dim2=-1)).reshape(c, kh, kw)
    ref = select_dw_taps(sal0, ratio, balance=balance, align=align, tile=tile, group=group, min_keep=min_keep,
                         block=block)
    counts, units = group_counts(ref, block, group, balance, align)
    keep = obs_prune(w, hinv, counts, units, block)
    w = refit_kept_taps(w, hessian, keep, damp)
    bounds = [(g0, min(g0 + group, c)) for g0 in range(0, c, group)]
    sel = selection_of(keep.reshape(c, kh, kw), ratio, bounds, k, ref.aligned, align)
    return sel, w.reshape(c, 1, kh, kw).to(weight.dtype)


def ridge_start(w: torch.Tensor, hessian: torch.Tensor, target: torch.Tensor, damp: float = DAMP,
                hinv: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(H + λI)⁻¹ (g + λ w)`` per channel (``w``, ``g`` ``[C, k]``; λ as in :func:`damped_inverse`, whose result
    ``hinv`` may be passed): the unpruned ridge least-squares fit of the taps to the outputs behind ``g``."""
    h = hessian.double().cpu()
    lam = damping(h.diagonal(dim1=-2, dim2=-1), damp)
    if hinv is None:
        hinv = damped_inverse(h, damp)
    g = target.reshape(w.shape).double().cpu()
    return (hinv @ (g + lam[:, None] * w)[:, :, None])[:, :, 0]


def refit_kept_taps(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor,
                    damp: float = DAMP, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Least-squares refit of the kept taps: per channel ``argmin (w - w')ᵀ H (w - w')`` with pruned ``w' = 0``.

    ``w'_K = w_K + H_KK⁻¹ H_KP w_P`` (K kept, P pruned; H damped as in :func:`obs_select`), the same result the OBS
    updates reach when they remove P. With ``target`` ``g = Σ y·patch`` (see :func:`obs_select`) the kept taps fit
    the outputs ``y`` instead: ``(H_KK + λI) w'_K = g_K + λ w_K``. Returns the new ``[C, 1, kh, kw]`` weight (pruned
    taps zero).
    """
    c = weight.shape[0]
    k = mask[0].numel()
    w = weight.detach().reshape(c, k).double().cpu()
    m = mask.reshape(c, k).cpu().to(torch.float64)
    h = hessian.double().cpu().clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    lam = damping(diag, damp)
    diag += lam[:, None]
    # one batched solve: H_KK on the kept taps, the identity on the pruned ones (their correction is 0)
    a = h * (m[:, :, None] * m[:, None, :]) + torch.diag_embed(1.0 - m)
    if target is None:
        rhs = (h @ (w * (1.0 - m))[:, :, None])[:, :, 0] * m
        out = (w + (spd_inverse(a) @ rhs[:, :, None])[:, :, 0]) * m
    else:  # (H_KK + λI) w'_K = g_K + λ w_K
        rhs = (target.reshape(c, k).double().cpu() + lam[:, None] * w) * m
        out = (spd_inverse(a) @ rhs[:, :, None])[:, :, 0] * m
    return out.reshape(weight.shape).to(weight.dtype)


def activation_rows(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """Activations as rows ``[samples, channels]``: NCHW for a conv, channels last for a Linear."""
    if isinstance(m, nn.Linear):
        return t.reshape(-1, t.shape[-1])
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def refit_consumer(consumer: nn.Module, xtx: torch.Tensor, ytx: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """Ridge least squares of a consumer toward its weights: ``[W b] = (YXᵀ + λ[W₀ 0]) (XXᵀ + λI)⁻¹``.

    ``xtx`` = ``XXᵀ`` and ``ytx`` = ``YXᵀ`` are accumulated with a ones row last in X (so the last column of the
    result is an offset: the removed channels' mean contribution and whatever else the inputs lost). The ridge
    pulls toward the consumer's own weights ``W₀`` (and a zero offset), not toward zero, so directions the
    calibration data does not excite keep their dense values. λ is ``damp`` times the mean diagonal of ``XXᵀ``.
    The weight is written into ``consumer`` (1x1 ``nn.Conv2d`` with ``groups == 1`` or ``nn.Linear``); the fitted
    offset is returned.
    """
    n = xtx.shape[0]
    w0 = consumer.weight.detach().reshape(consumer.weight.shape[0], -1).double().cpu()
    if w0.shape[1] != n - 1 or tuple(ytx.shape) != (w0.shape[0], n):
        raise ValueError(f"XXᵀ {list(xtx.shape)} / YXᵀ {list(ytx.shape)} do not fit a consumer weight of shape"
                         f" {list(consumer.weight.shape)} (plus a ones column)")
    lam = damp * xtx.diagonal()[:-1].mean().clamp_min(1e-12)
    prior = torch.cat([w0, w0.new_zeros(w0.shape[0], 1)], 1)
    a = xtx + lam * torch.eye(n, dtype=torch.float64)
    wb = torch.linalg.solve(a, (ytx + lam * prior).T).T  # a is symmetric
    w, b = wb[:, :-1], wb[:, -1]
    with torch.no_grad():
        consumer.weight.copy_(w.reshape(consumer.weight.shape).to(consumer.weight))
    return b


def can_refit(m: nn.Module) -> bool:
    """A consumer :func:`refit_consumer` handles: a 1x1 dense conv (zero padding, stride 1) or a Linear."""
    if isinstance(m, nn.Linear):
        return True
    return (type(m) is nn.Conv2d and m.groups == 1 and tuple(m.kernel_size) == (1, 1) and tuple(m.stride) == (1, 1)
            and not isinstance(m.padding, str) and not any(m.padding))
