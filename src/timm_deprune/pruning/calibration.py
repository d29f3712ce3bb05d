"""One-shot pruning with calibration data: OBS tap selection and least-squares reconstruction (DESIGN.md §7).

- :func:`dw_hessian`: per depth-wise channel ``H_c = Σ patch·patchᵀ`` (``kh*kw`` square) of its input patches,
  accumulated in float64 batch by batch (no activations are kept).
- :func:`obs_select`: Optimal-Brain-Compression tap selection. The pruned count of every group comes from
  :func:`~.select.select_dw_taps` itself (BWT / HSR / ``min_keep`` / ``block:N``, so no rule is restated); which
  taps go is decided greedily by the saliency ``w_i² / [H⁻¹]_ii`` with the OBS update of the remaining taps.
- :func:`refit_kept_taps`: the same update for a mask chosen by another importance (least squares on the kept taps).
- :func:`refit_consumer`: ridge least squares of a point-wise consumer on the pruned network's inputs against the
  dense network's outputs; a ones column carries the removed channels' mean contribution into the bias.
- :class:`Calibrator`: runs the network layer by layer in network order, each layer on the inputs of the already
  pruned network (cached at block boundaries where the model is a chain of blocks), and records time and memory.
"""
from __future__ import annotations

import resource
import time
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import Conv2dSame, MixedConv2d, pad_same

from .groups import ChannelGroup
from .select import DWSelection, select_dw_taps

__all__ = ["DAMP", "collect_inputs", "dw_hessian", "dw_patches", "obs_select", "refit_kept_taps", "obs_prune",
           "group_counts", "refit_consumer", "can_refit", "Calibrator", "pw_saliency", "max_rss_mb"]

DAMP = 0.01  # dampening: this fraction of the mean Hessian diagonal is added to it (SparseGPT's percdamp)
_DW_POSITIONS = 4096  # output positions per image used for a DW Hessian (all when fewer)
_PW_POSITIONS = 512  # output positions per image used for a consumer refit


def collect_inputs(batches: Iterable, limit: Optional[int] = None) -> list[torch.Tensor]:
    """The input tensors of ``batches`` (tensors, ``(input, target)`` pairs or a DataLoader), on the CPU, at most
    ``limit`` samples in all. Raises ValueError when nothing is left."""
    from ..recalibrate import batch_inputs

    out: list[torch.Tensor] = []
    seen = 0
    for x in batch_inputs(batches, torch.device("cpu")):
        if x.dim() == 0:
            raise ValueError(f"calibration batch {len(out)} is a scalar tensor; expected [N, C, H, W] inputs")
        if limit is not None:
            x = x[: max(limit - seen, 0)]
        if len(x):
            out.append(x.detach())
            seen += len(x)
        if limit is not None and seen >= limit:
            break
    if not out:
        raise ValueError("calibration data is empty: give at least one batch of input tensors")
    return out


def _positions(n: int, cap: int, seed: int) -> Optional[torch.Tensor]:
    if n <= cap:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:cap].sort().values


def dw_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Input patches of a depth-wise conv: ``[N, C, kh*kw, L]`` (L output positions), padded as the conv pads."""
    kh, kw = conv.kernel_size
    if isinstance(conv, Conv2dSame):
        x = pad_same(x, conv.kernel_size, conv.stride, conv.dilation)
        padding = (0, 0)
    elif isinstance(conv.padding, str):
        if conv.padding == "valid":
            padding = (0, 0)
        else:  # "same" (stride 1): PyTorch puts the extra pixel on the right / bottom
            tot = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
            x = F.pad(x, [tot[1] // 2, tot[1] - tot[1] // 2, tot[0] // 2, tot[0] - tot[0] // 2])
            padding = (0, 0)
    else:
        padding = conv.padding
    if conv.padding_mode != "zeros" and any(padding):
        ph, pw = padding
        x = F.pad(x, [pw, pw, ph, ph], mode=conv.padding_mode)
        padding = (0, 0)
    cols = F.unfold(x, (kh, kw), dilation=conv.dilation, padding=padding, stride=conv.stride)
    return cols.reshape(x.shape[0], x.shape[1], kh * kw, -1)


def dw_hessian(conv: nn.Conv2d, x: torch.Tensor, out: Optional[torch.Tensor] = None,
               positions: int = _DW_POSITIONS, seed: int = 0) -> torch.Tensor:
    """Add ``Σ patch·patchᵀ`` of every channel of the batch ``x`` to ``out`` (float64 ``[C, k, k]``); returns it.

    At most ``positions`` output positions per image are used (a fixed random subset), all when fewer.
    """
    c = conv.in_channels
    k = conv.kernel_size[0] * conv.kernel_size[1]
    if out is None:
        out = torch.zeros(c, k, k, dtype=torch.float64)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    step = max(1, int(2e7 // max(c * k * x.shape[-1] * x.shape[-2], 1)))  # bound the unfold's memory
    for i in range(0, x.shape[0], step):
        p = dw_patches(conv, x[i:i + step].to(dtype))  # [n, C, k, L]
        idx = _positions(p.shape[-1], positions, seed)
        if idx is not None:
            p = p[..., idx]
        p = p.permute(1, 2, 0, 3).reshape(c, k, -1)  # [C, k, n*L]
        out += torch.bmm(p, p.transpose(1, 2)).double().cpu()
    return out


def _damped_inverse(h: torch.Tensor, damp: float) -> torch.Tensor:
    """``(H + damp·mean(diag H)·I)⁻¹`` per channel; a channel with a zero Hessian gets the identity."""
    k = h.shape[-1]
    diag = h.diagonal(dim1=-2, dim2=-1)
    lam = damp * diag.mean(-1)
    lam = torch.where(lam > 0, lam, torch.ones_like(lam))
    eye = torch.eye(k, dtype=torch.float64)
    return torch.linalg.inv(h + lam[:, None, None] * eye)


def obs_prune(weight: torch.Tensor, hinv: torch.Tensor, counts: Sequence[int], group_units: int, block: int = 1):
    """Greedy OBS removal: ``counts[g]`` block-taps leave group ``g`` (``group_units`` blocks of ``block`` channels).

    ``weight`` ``[C, k]`` and ``hinv`` ``[C, k, k]`` (float64, inverse of the damped Hessian) are updated in place:
    each step removes, in every group still short of its count, the block-tap of least summed saliency
    ``Σ_c w_ci² / [H_c⁻¹]_ii`` and applies the OBS update ``w_c -= w_ci / [H_c⁻¹]_ii · H_c⁻¹[:, i]`` to each of its
    channels. Returns the keep mask ``[C, k]``.
    """
    c, k = weight.shape
    nb = -(-c // block)
    ng = -(-nb // group_units)
    alive = torch.ones(c, k, dtype=torch.bool)
    need = torch.tensor(list(counts), dtype=torch.long)
    if len(need) != ng:
        raise ValueError(f"expected {ng} group counts, got {len(need)}")
    block_of = torch.arange(c) // block
    pad = ng * group_units
    for _ in range(int(need.max()) if len(need) else 0):
        active = need > 0
        if not bool(active.any()):
            break
        d = hinv.diagonal(dim1=-2, dim2=-1)
        sal = torch.where(alive, weight.square() / d.clamp_min(1e-300), torch.full_like(weight, float("inf")))
        bsal = torch.zeros(pad, k, dtype=torch.float64).index_add_(0, block_of, sal)
        bsal[nb:] = float("inf")
        flat = bsal.reshape(ng, group_units * k)
        best = flat.argmin(1)
        g_idx = active.nonzero().flatten()
        b = g_idx * group_units + best[g_idx] // k
        tap = best[g_idx] % k
        chan = (b[:, None] * block + torch.arange(block)[None, :]).flatten()
        tap_c = tap[:, None].expand(-1, block).flatten()
        ok = chan < c
        chan, tap_c = chan[ok], tap_c[ok]
        col = hinv[chan, :, tap_c]  # [m, k]
        dii = hinv[chan, tap_c, tap_c].clamp_min(1e-300)
        weight[chan] -= (weight[chan, tap_c] / dii)[:, None] * col
        weight[chan, tap_c] = 0.0
        hinv[chan] -= col[:, :, None] * col[:, None, :] / dii[:, None, None]
        alive[chan, tap_c] = False
        need[g_idx] -= 1
    weight[~alive] = 0.0  # the updates after a removal leave rounding residue on removed taps
    return alive


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


def _selection_of(mask: torch.Tensor, ratio: float, group: int, aligned: bool, align: str) -> DWSelection:
    c = mask.shape[0]
    k = mask[0].numel()
    pruned = k - mask.reshape(c, k).sum(1)
    bounds = [(g0, min(g0 + group, c)) for g0 in range(0, c, group)]
    gp = tuple(int(pruned[a:b].sum()) for a, b in bounds)
    return DWSelection(mask=mask.bool(), target_ratio=float(ratio), achieved_ratio=sum(gp) / float(mask.numel()),
                       group_ratios=tuple(p / ((b - a) * k) for p, (a, b) in zip(gp, bounds)), group_pruned=gp,
                       aligned=aligned, direction=align)


def obs_select(weight: torch.Tensor, hessian: torch.Tensor, ratio: float, *, balance: bool, align: str = "none",
               tile: int = 32, group: int = 32, min_keep: int = 1, block: int = 1,
               damp: float = DAMP) -> tuple[DWSelection, torch.Tensor]:
    """OBS tap selection of one depth-wise layer; returns the selection and the updated weight ``[C, 1, kh, kw]``.

    The pruned counts are exactly those :func:`select_dw_taps` gives for the same options (ranked there by the
    initial saliency, which only matters for DCP's per-group shares); OBS decides which taps meet them.

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
    hinv = _damped_inverse(hessian.double(), damp)
    sal0 = (w.square() / hinv.diagonal(dim1=-2, dim2=-1)).reshape(c, kh, kw)
    ref = select_dw_taps(sal0, ratio, balance=balance, align=align, tile=tile, group=group, min_keep=min_keep,
                         block=block)
    counts, units = group_counts(ref, block, group, balance, align)
    keep = obs_prune(w, hinv, counts, units, block)
    sel = _selection_of(keep.reshape(c, kh, kw), ratio, group, ref.aligned, align)
    return sel, w.reshape(c, 1, kh, kw).to(weight.dtype)


def refit_kept_taps(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor,
                    damp: float = DAMP) -> torch.Tensor:
    """Least-squares refit of the kept taps: per channel ``argmin (w - w')ᵀ H (w - w')`` with pruned ``w' = 0``.

    ``w'_K = w_K + H_KK⁻¹ H_KP w_P`` (K kept, P pruned; H damped as in :func:`obs_select`), the same result the OBS
    updates reach when they remove P. Returns the new ``[C, 1, kh, kw]`` weight (pruned taps zero).
    """
    c = weight.shape[0]
    k = mask[0].numel()
    w = weight.detach().reshape(c, k).double().cpu()
    h = hessian.double().clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    lam = damp * diag.mean(-1)
    diag += torch.where(lam > 0, lam, torch.ones_like(lam))[:, None]
    m = mask.reshape(c, k).cpu().bool()
    out = torch.zeros_like(w)
    for ch in range(c):
        kept, pruned = m[ch], ~m[ch]
        if not bool(kept.any()):
            continue
        wk = w[ch, kept]
        if bool(pruned.any()):
            rhs = h[ch][kept][:, pruned] @ w[ch, pruned]
            wk = wk + torch.linalg.solve(h[ch][kept][:, kept], rhs)
        out[ch, kept] = wk
    return out.reshape(weight.shape).to(weight.dtype)


def _rows(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """Activations as rows ``[samples, channels]``: NCHW for a conv, channels last for a Linear."""
    if isinstance(m, nn.Linear):
        return t.reshape(-1, t.shape[-1])
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def refit_consumer(consumer: nn.Module, xtx: torch.Tensor, ytx: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """Ridge least squares ``[W b] = YXᵀ (XXᵀ + λI)⁻¹`` from the accumulated ``XXᵀ`` / ``YXᵀ`` (X with a ones row).

    Returns the fitted bias (the removed channels' mean contribution and the rest of the offset); the weight is
    written into ``consumer`` (1x1 ``nn.Conv2d`` with ``groups == 1`` or ``nn.Linear``).
    """
    n = xtx.shape[0]
    lam = damp * xtx.diagonal()[:-1].mean().clamp_min(1e-12)
    a = xtx + lam * torch.eye(n, dtype=torch.float64)
    wb = torch.linalg.solve(a, ytx.T).T  # a is symmetric
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


def max_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Stop(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward is skipped."""


def _chain_units(model: nn.Module) -> list[str]:
    """Paths of the model's blocks when it is one chain ``model.blocks`` (each block reads the last one's output)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        return []
    units = []
    for name, stage in blocks.named_children():
        if isinstance(stage, nn.Sequential):
            units += [f"blocks.{name}.{n}" for n, _ in stage.named_children()]
        else:
            units.append(f"blocks.{name}")
    return units


class Calibrator:
    """The pruned model and its dense twin, run on the calibration inputs one block at a time.

    Inputs of the current block are cached for both networks; a block is advanced past only when the pruning is
    done with it, so every layer is calibrated on the inputs of the already pruned network. Models that are not a
    chain of blocks (``model.blocks``) run from the network input each time, stopped at the layer needed.
    """

    def __init__(self, model: nn.Module, dense: nn.Module, inputs: list[torch.Tensor], progress: bool = False):
        self.model, self.dense, self.inputs = model, dense, inputs
        self.progress = progress
        self.seconds = 0.0
        self.cache_bytes = 0
        self.rss_before = max_rss_mb()
        self._modes = [(m, m.training) for m in (model, dense)]
        model.eval()
        dense.eval()
        units = _chain_units(model)
        self.units = units if units and self._chain_holds(units) else []
        self.unit = -1  # index of the block whose inputs are cached; -1: none yet
        self.cache: list[torch.Tensor] = []
        self.dense_cache: list[torch.Tensor] = []

    def close(self) -> None:
        for m, mode in self._modes:
            m.train(mode)
        self.cache, self.dense_cache = [], []

    @torch.no_grad()
    def _chain_holds(self, units: list[str]) -> bool:
        """One image through the model with hooks: does each block's output equal the next block's input?"""
        x = self.inputs[0][:1]
        seen: dict[str, torch.Tensor] = {}
        hooks = [self.model.get_submodule(u).register_forward_pre_hook(
            lambda m, a, u=u: seen.setdefault(u, a[0])) for u in units]
        try:
            self.model(x)
        finally:
            for h in hooks:
                h.remove()
        if len(seen) != len(units):
            return False
        for a, b in zip(units, units[1:]):
            y = self.model.get_submodule(a)(seen[a])
            if not isinstance(y, torch.Tensor) or y.shape != seen[b].shape or not torch.allclose(y, seen[b]):
                return False
        return True

    def _unit_of(self, path: str) -> int:
        for i, u in enumerate(self.units):
            if path.startswith(u + "."):
                return i
        return -1

    @torch.no_grad()
    def _advance(self, target: int) -> None:
        """Cache the inputs of block ``target`` (blocks before it are final)."""
        if self.unit < 0:
            first = self.units[0]
            self.cache = [self._capture_input(self.model, first, x) for x in self.inputs]
            self.dense_cache = (self.cache if self.dense is self.model
                                else [self._capture_input(self.dense, first, x) for x in self.inputs])
            self.unit = 0
        while self.unit < target:
            blk = self.model.get_submodule(self.units[self.unit])
            dblk = self.dense.get_submodule(self.units[self.unit])
            self.cache = [blk(x) for x in self.cache]
            self.dense_cache = self.cache if self.dense is self.model else [dblk(x) for x in self.dense_cache]
            self.unit += 1

    @staticmethod
    def _capture_input(model: nn.Module, path: str, x: torch.Tensor) -> torch.Tensor:
        got = []

        def hook(m, args):
            got.append(args[0])
            raise _Stop

        h = model.get_submodule(path).register_forward_pre_hook(hook)
        try:
            model(x)
        except _Stop:
            pass
        finally:
            h.remove()
        return got[0]

    def _sources(self, path: str):
        """(pruned inputs, dense inputs, module to run, dense module to run) for reaching ``path``."""
        i = self._unit_of(path)
        if i < 0:
            return self.inputs, self.inputs, self.model, self.dense
        self._advance(i)
        return self.cache, self.dense_cache, self.model.get_submodule(self.units[i]), self.dense.get_submodule(
            self.units[i])

    @staticmethod
    def _run_to(root: nn.Module, module: nn.Module, x: torch.Tensor, output: bool = False) -> torch.Tensor:
        got = []

        def pre(m, args):
            got.append(args[0])
            raise _Stop

        def post(m, args, out):
            got.append(out)
            raise _Stop

        h = module.register_forward_hook(post) if output else module.register_forward_pre_hook(pre)
        try:
            root(x)
        except _Stop:
            pass
        finally:
            h.remove()
        if not got:
            raise RuntimeError(f"the forward never reached {type(module).__name__}; cannot calibrate it")
        return got[0]

    def _timed(self, fn):
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds += time.perf_counter() - t0
            both = self.cache + ([] if self.dense_cache is self.cache else self.dense_cache)
            cached = sum(t.numel() * t.element_size() for t in both)
            self.cache_bytes = max(self.cache_bytes, cached)

    def stats(self) -> dict:
        """Calibration time, the largest activation cache and the process's peak resident memory (and its rise)."""
        peak = max_rss_mb()
        return {"calibration_seconds": self.seconds, "calibration_cache_mb": self.cache_bytes / 2 ** 20,
                "peak_rss_mb": peak, "peak_rss_rise_mb": peak - self.rss_before}

    @torch.no_grad()
    def hessian(self, path: str) -> torch.Tensor:
        """``[C, k, k]`` float64 Hessian of depth-wise conv ``path`` on the pruned network's inputs."""
        def run():
            xs, _, root, _ = self._sources(path)
            conv = self.model.get_submodule(path)
            h = None
            for i, x in enumerate(xs):
                h = dw_hessian(conv, self._run_to(root, conv, x), h, seed=i)
            return h
        return self._timed(run)

    @torch.no_grad()
    def refit(self, group: ChannelGroup) -> bool:
        """Refit ``group``'s consumer so its output on the pruned inputs matches the dense network's (ridge LS).

        The fitted bias goes into the consumer's bias, or into the running mean of the BN reading it. Returns
        False (and changes nothing) where the consumer or its bias has no such home.
        """
        consumer = self.model.get_submodule(group.consumer)
        bn = self.model.get_submodule(group.consumer_bn) if group.consumer_bn else None
        has_bn = isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None
        if not can_refit(consumer) or (getattr(consumer, "bias", None) is None and not has_bn):
            return False

        def run():
            xs, dxs, root, droot = self._sources(group.consumer)
            dense_consumer = self.dense.get_submodule(group.consumer)
            xtx = ytx = None
            for i, (x, dx) in enumerate(zip(xs, dxs)):
                xin = _rows(consumer, self._run_to(root, consumer, x))
                y = self._run_to(droot, dense_consumer, dx, output=True)
                if getattr(dense_consumer, "bias", None) is not None:
                    y = y - (dense_consumer.bias if isinstance(dense_consumer, nn.Linear)
                             else dense_consumer.bias.view(1, -1, 1, 1))
                yr = _rows(consumer, y)
                per = xin.shape[0] // x.shape[0]
                idx = _positions(per, _PW_POSITIONS, i)
                if idx is not None:
                    sel = (torch.arange(x.shape[0])[:, None] * per + idx[None, :]).flatten()
                    xin, yr = xin[sel], yr[sel]
                xa = torch.cat([xin, torch.ones(xin.shape[0], 1, dtype=xin.dtype)], 1)
                a = (xa.T @ xa).double()
                c = (yr.T @ xa).double()
                xtx = a if xtx is None else xtx + a
                ytx = c if ytx is None else ytx + c
            b = refit_consumer(consumer, xtx, ytx)
            if getattr(dense_consumer, "bias", None) is not None:
                b = b + dense_consumer.bias.double()
            if getattr(consumer, "bias", None) is not None:
                consumer.bias.copy_(b.to(consumer.bias))
            else:  # bn(y + b) == bn with its running mean lowered by b
                bn.running_mean.sub_(b.to(bn.running_mean))
            return True
        return self._timed(run)


@torch.no_grad()
def pw_saliency(model: nn.Module, groups: Sequence[ChannelGroup], inputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Calibration importance of every internal channel: ``Σ_o W_consumer[o, j]² · E[x_j²]`` (the diagonal OBS
    saliency of removing input ``j`` of the consumer), keyed by producer path; one forward over ``inputs``."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for g in groups:
        m = model.get_submodule(g.consumer)

        def hook(mod, args, key=g.producer):
            r = _rows(mod if not isinstance(mod, MixedConv2d) else nn.Identity(), args[0]).double()
            sums[key] = sums.get(key, 0) + r.square().sum(0)
            counts[key] = counts.get(key, 0) + r.shape[0]
        hooks.append(m.register_forward_pre_hook(hook))
    modes = model.training
    model.eval()
    try:
        for x in inputs:
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(modes)
    out = {}
    for g in groups:
        m = model.get_submodule(g.consumer)
        if isinstance(m, MixedConv2d):
            cols = torch.cat([c.weight.detach().flatten(1).square().sum(0) for c in m.values()])
        else:
            cols = m.weight.detach().flatten(1).square().sum(0)
        if g.producer not in sums:
            raise RuntimeError(f"calibration forward never reached consumer {g.consumer!r}")
        out[g.producer] = (cols.double() * sums[g.producer] / counts[g.producer]).float()
    return out

