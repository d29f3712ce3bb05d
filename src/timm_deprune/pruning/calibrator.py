"""The layer-by-layer calibration runner: the pruned network and its dense twin on the calibration inputs
(ARCHITECTURE.md §9).

:class:`Calibrator` gives :func:`~.prune.prune` each depth-wise conv's Hessian and refits each point-wise consumer,
every layer on the inputs of the already pruned network (cached at block boundaries where the model is a chain of
blocks), and records the time and memory this took. :func:`pw_saliency` ranks point-wise filters with calibration
statistics; :func:`collect_inputs` reads the calibration batches.
"""
from __future__ import annotations

import resource
import time
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from timm.layers import MixedConv2d

from .groups import ChannelGroup
from .obs import activation_rows, can_refit, dw_hessian, refit_consumer, sample_positions

__all__ = ["collect_inputs", "Calibrator", "pw_saliency", "input_energy", "max_rss_mb", "PW_ROWS_PER_INPUT"]

PW_ROWS_PER_INPUT = 32  # a 1x1 refit uses at most this many rows (positions) per weight column in all


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

    def __init__(self, model: nn.Module, dense: nn.Module, inputs: list[torch.Tensor]):
        self.model, self.dense, self.inputs = model, dense, inputs
        self.seconds = 0.0
        self.cache_bytes = 0
        self.rss_before = max_rss_mb()
        self._modes = [(m, m.training) for m in (model, dense)]
        model.eval()
        dense.eval()
        units = _chain_units(model)
        self.units = units if units and self._chain_holds(units) else []
        self._bn_after: Optional[dict[str, str]] = None
        self._rows_per_image: dict[str, int] = {}  # refittable layers: input rows per image (set by bn_after)
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
    def refit(self, path: str, rows: Optional[torch.Tensor] = None) -> bool:
        """Refit the 1x1 conv or Linear ``path`` so its output on the pruned inputs matches the dense network's.

        ``rows``: the dense output channels it still has (its outputs were pruned). The fitted offset goes into
        its bias, or into the running mean of the BN reading its output (:meth:`bn_after`). Returns False, and
        changes nothing, where that has no home or the data has fewer than eight samples per input (a layer after
        global pooling): a fit there would follow the few calibration images, not the data.
        """
        layer = self.model.get_submodule(path)
        bn_path = self.bn_after().get(path)
        if not can_refit(layer) or (getattr(layer, "bias", None) is None and bn_path is None):
            return False
        images = sum(len(x) for x in self.inputs)
        columns = layer.weight.shape[1] + 1
        if self._rows_per_image.get(path, 0) * images < 8 * columns:
            return False
        per_image = -(-PW_ROWS_PER_INPUT * columns // images)  # positions per image within the row budget

        dense_layer = self.dense.get_submodule(path)
        outputs = dense_layer.weight.shape[0] if rows is None else len(rows)
        if outputs != layer.weight.shape[0]:  # outputs sliced in a way this call was not told (SE, dead channels)
            return False

        def run():
            xs, dxs, root, droot = self._sources(path)
            dense_bias = getattr(dense_layer, "bias", None)
            dense_bias = None if dense_bias is None else (dense_bias if rows is None else dense_bias[rows]).double()
            xtx = ytx = None
            for i, (x, dx) in enumerate(zip(xs, dxs)):
                xin = self._run_to(root, layer, x)
                yd = self._run_to(droot, dense_layer, dx, output=True)
                idx = sample_positions(self._rows_per_image[path], per_image, i)
                xin, yr = (activation_rows(layer, _take(layer, t, idx)) for t in (xin, yd))
                if rows is not None:
                    yr = yr[:, rows]
                if dense_bias is not None:
                    yr = yr - dense_bias.to(yr)
                xa = torch.cat([xin, torch.ones(xin.shape[0], 1, dtype=xin.dtype)], 1)
                a, cy = (xa.T @ xa).double(), (yr.T @ xa).double()  # float32 products, float64 sums
                xtx = a if xtx is None else xtx + a
                ytx = cy if ytx is None else ytx + cy
            b = refit_consumer(layer, xtx, ytx)
            if dense_bias is not None:
                b = b + dense_bias
            if getattr(layer, "bias", None) is not None:
                layer.bias.copy_(b.to(layer.bias))
            else:  # bn(y + b) == bn with its running mean lowered by b (from the dense one: b has any folded offset)
                dense_mean = self.dense.get_submodule(bn_path).running_mean.double()
                if rows is not None:
                    dense_mean = dense_mean[rows]
                bn = self.model.get_submodule(bn_path)
                bn.running_mean.copy_((dense_mean - b).to(bn.running_mean))
            return True
        return self._timed(run)

    @torch.no_grad()
    def bn_after(self) -> dict[str, str]:
        """Path of the BatchNorm (with running statistics) that reads each module's output, traced once on the dense
        twin with one image; modules whose output goes anywhere else first are absent."""
        if self._bn_after is None:
            made: dict[int, str] = {}
            found: dict[str, str] = {}
            alive: list[torch.Tensor] = []  # outputs stay referenced, so no id is reused during the trace
            hooks = []

            def reads(mod, args, p):
                if args and id(args[0]) in made:
                    found.setdefault(made[id(args[0])], p)

            def writes(mod, args, out, p):
                if isinstance(out, torch.Tensor):
                    made[id(out)] = p
                    alive.append(out)
                if args and isinstance(args[0], torch.Tensor) and can_refit(mod):
                    self._rows_per_image[p] = args[0].numel() // max(mod.weight.shape[1], 1)

            for p, m in self.dense.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                    hooks.append(m.register_forward_pre_hook(lambda mod, a, p=p: reads(mod, a, p)))
                elif p and not list(m.children()):
                    hooks.append(m.register_forward_hook(lambda mod, a, out, p=p: writes(mod, a, out, p)))
            try:
                self.dense(self.inputs[0][:1])
            finally:
                for h in hooks:
                    h.remove()
            self._bn_after = found
        return self._bn_after


def _take(layer: nn.Module, t: torch.Tensor, idx: Optional[torch.Tensor]) -> torch.Tensor:
    """The positions ``idx`` (flat, per image) of activation ``t``, before any layout copy: ``[N, C, P]`` for a
    conv, ``[N, P, C]`` for a Linear; ``t`` itself when ``idx`` is None."""
    if idx is None:
        return t
    if isinstance(layer, nn.Linear):
        return t.reshape(t.shape[0], -1, t.shape[-1])[:, idx]
    return t.reshape(t.shape[0], t.shape[1], -1)[:, :, idx].unsqueeze(-1)


@torch.no_grad()
def pw_saliency(model: nn.Module, groups: Sequence[ChannelGroup],
                inputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Calibration importance of every internal channel: ``Σ_o W_consumer[o, j]² · E[x_j²]`` (the diagonal OBS
    saliency of removing input ``j`` of the consumer), keyed by producer path; one forward over ``inputs``."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for g in groups:
        m = model.get_submodule(g.consumer)

        def hook(mod, args, key=g.producer):
            r = activation_rows(mod, args[0]).double()
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
        if g.producer not in sums:
            raise RuntimeError(f"calibration forward never reached consumer {g.consumer!r}")
        cols = input_energy(model.get_submodule(g.consumer))
        out[g.producer] = (cols * sums[g.producer] / counts[g.producer]).float()
    return out


def input_energy(m: nn.Module) -> torch.Tensor:
    """``Σ`` of squared weights reading each input channel of a consumer (Linear, conv of any groups, MixedConv2d)."""
    if isinstance(m, MixedConv2d):
        return torch.cat([input_energy(c) for c in m.values()])
    w = m.weight.detach().double()
    if isinstance(m, nn.Linear):
        return w.square().sum(0)
    groups = m.groups
    per = w.square().sum((2, 3))  # [out, in / groups]
    out_per = per.shape[0] // groups
    return torch.cat([per[i * out_per:(i + 1) * out_per].sum(0) for i in range(groups)])
