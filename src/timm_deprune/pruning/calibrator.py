"""The layer-by-layer calibration runner: the pruned network on the calibration inputs against targets recorded
from the dense network (ARCHITECTURE.md §9).

:class:`Calibrator` first runs the dense network once over the calibration inputs (:meth:`Calibrator.record`):
point-wise filter saliencies and, at a fixed random sample of positions per image, the outputs every calibrated
layer should reproduce. Then, layer by layer in network order, it gives :func:`~.prune.prune` each depth-wise
conv's statistics (:meth:`Calibrator.dw_stats`) and refits each point-wise consumer (:meth:`Calibrator.refit`), every
layer on the inputs of the already pruned network (cached at block boundaries where the model is a chain of
blocks), and records the time and memory this took. :func:`collect_inputs` reads the calibration batches.
"""
from __future__ import annotations

import math
import time
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from .calib_util import collect_inputs, dw_dense_channels, input_energy, max_rss_mb, positions, take_rows
from .groups import ChannelGroup
from .obs import DWStats, can_refit, dw_patches, output_positions, refit_consumer

__all__ = ["collect_inputs", "Calibrator", "input_energy", "max_rss_mb", "take_rows", "dw_dense_channels",
           "PW_ROWS_PER_INPUT", "DW_SAMPLES"]

PW_ROWS_PER_INPUT = 16  # a 1x1 refit uses at most this many rows (positions) per weight column in all
DW_SAMPLES = 4096  # a depth-wise conv's statistics use at most this many patches per channel in all


def _spatial(t: torch.Tensor) -> int:
    return t[0, 0].numel() if t.dim() > 2 else 1


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
    """The pruned model on the calibration inputs, one block at a time, against targets from its dense twin.

    :meth:`record` runs the dense twin once (before the model changes). Inputs of the current block are then cached
    for the pruned network only; a block is advanced past only when the pruning is done with it, so every layer is
    calibrated on the inputs of the already pruned network. Layers after the chain (a head conv) run the network
    with the chain replaced by its cached output. Models that are not a chain of blocks (``model.blocks``) run from
    the network input each time, stopped at the layer needed. Masked depth-wise convs run their dense masked path
    during calibration (channels-last inputs); :meth:`close` restores their execution mode.
    """

    def __init__(self, model: nn.Module, dense: nn.Module, inputs: list[torch.Tensor]):
        self.model, self.dense, self.inputs = model, dense, inputs
        self.images = sum(len(x) for x in inputs)
        self.seconds = 0.0
        self.cache_bytes = 0
        self.record_bytes = 0
        self.rss_before = max_rss_mb()
        self._modes = [(m, m.training) for m in (model, dense)]
        self._exec: dict[nn.Module, str] = {}
        model.eval()
        dense.eval()
        units = _chain_units(model)
        self.units = units if units and self._chain_holds(units) else []
        names = [p for p, _ in model.named_modules()]
        self._order = {p: i for i, p in enumerate(names)}
        self._chain_end = max((self._order[p] for p in names if self.units and p.startswith("blocks.")), default=-1)
        self._bn_after: Optional[dict[str, str]] = None
        self._recorded: set[str] = set()  # layers record() was asked for (their outputs, where enough rows)
        self._pos: dict[str, list] = {}  # layer -> per batch [N, L] sampled positions (None: all)
        self._y: dict[str, list] = {}  # layer -> per batch dense outputs at those positions
        self.unit = -1  # index of the block whose inputs are cached; -1: none yet
        self.cache: list[torch.Tensor] = []

    def close(self) -> None:
        for m, mode in self._modes:
            m.train(mode)
        for m, mode in self._exec.items():
            m.execution = mode
        self._exec = {}
        self.cache, self._y = [], {}

    # ------------------------------------------------------------------------------------------------ the dense pass
    @torch.no_grad()
    def record(self, groups: Sequence[ChannelGroup] = (), refit: Iterable[str] = (),
               dw: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """One forward of the dense twin over the calibration inputs, before the pruned model changes.

        Records the outputs of the 1x1 / Linear layers ``refit`` (at most :data:`PW_ROWS_PER_INPUT` sampled rows per
        weight column in all; none where there are fewer than eight per column) and of the depth-wise convs ``dw``
        (at most :data:`DW_SAMPLES` positions per channel in all), and returns the calibration saliency of every
        internal channel of ``groups``: ``Σ_o W_consumer[o, j]² · E[x_j²]`` (the diagonal OBS saliency of removing
        input ``j`` of the consumer), keyed by producer path.
        """
        def run():
            sums: dict[str, torch.Tensor] = {}
            counts: dict[str, int] = {}
            batch = [0]
            hooks = []

            def energy(mod, args, key):
                x = args[0]
                dims = tuple(range(x.dim() - 1)) if isinstance(mod, nn.Linear) else (0,) + tuple(range(2, x.dim()))
                sums[key] = sums.get(key, 0) + x.float().square().sum(dims).double()
                counts[key] = counts.get(key, 0) + x.numel() // x.shape[-1 if isinstance(mod, nn.Linear) else 1]

            def outputs(mod, args, out, path, depthwise):
                count = _spatial(out) if depthwise or not isinstance(mod, nn.Linear) else out[0].numel() // out.shape[-1]
                if depthwise:
                    per_image = math.ceil(DW_SAMPLES / self.images)
                else:
                    cols = mod.weight.shape[1] + 1
                    if count * self.images < 8 * cols:
                        return
                    per_image = math.ceil(PW_ROWS_PER_INPUT * cols / self.images)
                idx = positions(count, len(out), per_image, self._seed(path, batch[0]))
                self._pos.setdefault(path, []).append(idx)
                y = (out.reshape(len(out), out.shape[1], -1) if idx is None else take_rows(mod, out, idx).reshape(
                    len(out), idx.shape[1], -1).transpose(1, 2)) if depthwise else take_rows(mod, out, idx)
                y = y.float().contiguous()
                self.record_bytes += y.numel() * 4
                self._y.setdefault(path, []).append(y)

            for g in groups:
                hooks.append(self.dense.get_submodule(g.consumer).register_forward_pre_hook(
                    lambda mod, args, key=g.producer: energy(mod, args, key)))
            for paths, depthwise in ((refit, False), (dw, True)):
                for p in paths:
                    if p in self._recorded:
                        continue
                    self._recorded.add(p)
                    hooks.append(self.dense.get_submodule(p).register_forward_hook(
                        lambda mod, args, out, p=p, d=depthwise: outputs(mod, args, out, p, d)))
            try:
                for i, x in enumerate(self.inputs):
                    batch[0] = i
                    self.dense(x)
            finally:
                for h in hooks:
                    h.remove()
            out = {}
            for g in groups:
                if g.producer not in sums:
                    raise RuntimeError(f"calibration forward never reached consumer {g.consumer!r}")
                cols = input_energy(self.dense.get_submodule(g.consumer))
                out[g.producer] = (cols * sums[g.producer] / counts[g.producer]).float()
            return out
        return self._timed(run)

    def _seed(self, path: str, batch: int) -> int:
        return 1_000_003 * self._order.get(path, 0) + batch

    # ------------------------------------------------------------------------------------------ the pruned network
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

    def _dense_execution(self) -> None:
        """Masked convs made since the last call run their masked dense conv until :meth:`close`."""
        for m in self.model.modules():
            if m not in self._exec and hasattr(m, "mask") and hasattr(m, "execution"):
                self._exec[m] = m.execution
                m.execution = "dense"

    @torch.no_grad()
    def _advance(self, target: int) -> None:
        """Cache the inputs of block ``target`` (blocks before it are final); ``len(units)``: the chain's output."""
        self._dense_execution()
        if self.unit < 0:
            first = self.units[0]
            self.cache = [self._run_to(self.model, self.model.get_submodule(first), x) for x in self.inputs]
            self.unit = 0
        while self.unit < target:
            blk = self.model.get_submodule(self.units[self.unit])
            for i, x in enumerate(self.cache):
                self.cache[i] = blk(x)
            self.unit += 1

    def _inputs_of(self, layer: nn.Module, path: str, output: bool = False):
        """Yield the pruned network's input (or output) of ``layer`` for every calibration batch, in order."""
        self._dense_execution()
        i = self._unit_of(path)
        if i >= 0:
            self._advance(i)
            root = self.model.get_submodule(self.units[i])
            for x in self.cache:
                yield self._run_to(root, layer, x, output)
        elif self.units and self._order.get(path, -1) > self._chain_end:
            self._advance(len(self.units))
            blocks = self.model.blocks
            for x, out in zip(self.inputs, self.cache):
                blocks.forward = lambda *a, out=out, **k: out  # the chain's cached output, not recomputed
                try:
                    yield self._run_to(self.model, layer, x, output)
                finally:
                    del blocks.forward
        else:
            for x in self.inputs:
                yield self._run_to(self.model, layer, x, output)

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
            self.cache_bytes = max(self.cache_bytes, sum(t.numel() * t.element_size() for t in self.cache))

    def stats(self) -> dict:
        """Calibration time, the largest activation cache, the recorded targets and the process's peak resident
        memory (and its rise)."""
        peak = max_rss_mb()
        return {"calibration_seconds": self.seconds, "calibration_cache_mb": self.cache_bytes / 2 ** 20,
                "calibration_record_mb": self.record_bytes / 2 ** 20, "peak_rss_mb": peak,
                "peak_rss_rise_mb": peak - self.rss_before}

    @torch.no_grad()
    def dw_stats(self, path: str, channels: Optional[torch.Tensor] = None) -> DWStats:
        """:class:`~.obs.DWStats` of depth-wise conv ``path`` on the pruned network's inputs, with the dense
        outputs as targets where :meth:`record` recorded them (``channels``: the dense channels it still has)."""
        def run():
            conv = self.model.get_submodule(path)
            k = conv.kernel_size[0] * conv.kernel_size[1]
            ys = self._y.get(path)
            st = DWStats.zeros(conv.in_channels, k, ys is not None)
            per_image = math.ceil(DW_SAMPLES / self.images)
            for i, x in enumerate(self._inputs_of(conv, path)):
                if ys is None:
                    idx = positions(output_positions(conv, x), len(x), per_image, self._seed(path, i))
                    y = None
                else:
                    idx, y = self._pos[path][i], ys[i]
                    if channels is not None:
                        y = y[:, channels]
                    if y.shape[1] != conv.out_channels:
                        raise RuntimeError(f"{path}: {y.shape[1]} recorded target channels for a conv with"
                                           f" {conv.out_channels}; its channel map after surgery is unknown")
                st.add(dw_patches(conv, x, idx), y)
            self._y.pop(path, None)  # used once: free it
            return st
        return self._timed(run)

    def hessian(self, path: str) -> torch.Tensor:
        """``[C, k, k]`` float64 Hessian ``Σ patch·patchᵀ`` of depth-wise conv ``path`` on the pruned network's
        inputs."""
        return self.dw_stats(path).h

    @torch.no_grad()
    def set_offset(self, path: str, offset: torch.Tensor) -> bool:
        """Add ``offset`` to the output of conv ``path``: into its bias, or into the running mean of the BN reading
        its output. Returns False (nothing changed) where neither exists."""
        layer = self.model.get_submodule(path)
        if getattr(layer, "bias", None) is not None:
            layer.bias.add_(offset.to(layer.bias))
            return True
        bn_path = self.bn_after().get(path)
        if bn_path is None:
            return False
        bn = self.model.get_submodule(bn_path)
        bn.running_mean.sub_(offset.to(bn.running_mean))
        return True

    def offset_home(self, path: str) -> bool:
        """Whether :meth:`set_offset` can place an offset for ``path``."""
        return getattr(self.model.get_submodule(path), "bias", None) is not None or path in self.bn_after()

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
        if path not in self._recorded:
            if self.dense is self.model:
                raise RuntimeError(f"no dense outputs recorded for {path!r}: call record() before the model changes")
            self.record(refit=[path])
        if path not in self._y:  # too few rows per weight column
            return False
        dense_layer = self.dense.get_submodule(path)
        outputs = dense_layer.weight.shape[0] if rows is None else len(rows)
        if outputs != layer.weight.shape[0]:  # outputs sliced in a way this call was not told (SE, dead channels)
            return False

        def run():
            dense_bias = getattr(dense_layer, "bias", None)
            dense_bias = None if dense_bias is None else (dense_bias if rows is None else dense_bias[rows]).double()
            xtx = ytx = None
            for i, xin in enumerate(self._inputs_of(layer, path)):
                xr = take_rows(layer, xin, self._pos[path][i])
                yr = self._y[path][i]
                if rows is not None:
                    yr = yr[:, rows]
                if dense_bias is not None:
                    yr = yr - dense_bias.to(yr)
                xa = torch.cat([xr, torch.ones(xr.shape[0], 1, dtype=xr.dtype)], 1)
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
            del self._y[path]  # used once: free it
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
