"""``prune(model, config)``: DEPrune on a timm model: PW filter pruning, then DCP / BWT / HSR on DW convs."""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from timm.layers import Conv2dSame, MixedConv2d

from ..config import CALIBRATED_IMPORTANCE, DepruneConfig, resolve_ratios
from ..data import model_input_size
from .calibrator import Calibrator, collect_inputs, dw_dense_channels, max_rss_mb
from .groups import find_channel_groups, group_splits, is_depthwise
from .importance import dw_scores, filter_scores, following_bn_scales
from .obs import can_refit, obs_select, refit_kept_taps
from .plan import DWLayerPlan, PrunePlan, PWLayerPlan, apply_pw
from .report import LayerReport, PruneReport, count_macs
from .select import kept_pw_count, select_dw_taps, select_pw_channels

__all__ = ["prune", "PruneResult", "UnsupportedModelError", "depthwise_convs", "SUPPORTED_CONV_TYPES"]

SUPPORTED_CONV_TYPES = (nn.Conv2d, Conv2dSame)  # exact types: other conv subclasses change the forward


class UnsupportedModelError(ValueError):
    """The model (family) cannot be pruned by timm_deprune; the message says why and what to do."""


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune` returns: the pruned model, every decision (the plan), the tap masks and a report."""

    model: nn.Module
    plan: PrunePlan
    masks: dict[str, torch.Tensor]
    report: PruneReport
    calibration: Optional[dict] = None  # how calibration data was used, its time and memory (None: not given)


def depthwise_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Every depth-wise conv (``groups == in == out``, kernel > 1x1) by module path, in module order."""
    return [(p, m) for p, m in model.named_modules() if is_depthwise(m)]


def _check_supported(model: nn.Module, dws: Sequence[tuple[str, nn.Module]]) -> None:
    name = type(model).__name__
    if not dws:
        raise UnsupportedModelError(f"{name} has no depth-wise conv (groups == in == out channels, kernel > 1x1):"
                                    " nothing for DEPrune to prune")
    dw_paths = [p for p, _ in dws]
    for path, m in model.named_modules():
        if not path or hasattr(m, "mask") or not any(hasattr(m, a) for a in _REPARAM_METHODS):
            continue
        inside = [p for p in dw_paths if p.startswith(path + ".")]
        if inside and sum(isinstance(c, nn.Conv2d) for c in m.modules()) > 1:
            raise UnsupportedModelError(
                f"{name} has re-parameterisable branches around depth-wise conv {inside[0]!r} ({type(m).__name__}):"
                " merging the branches would fill pruned taps. Call timm.models.reparameterize_model(model) first"
                " and prune the merged model")


_REPARAM_METHODS = ("reparameterize", "switch_to_deploy", "fuse")


def _params(model: nn.Module) -> int:
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        mask = getattr(m, "mask", None)
        if isinstance(mask, torch.Tensor) and isinstance(m, nn.Conv2d):
            total -= int((~mask).sum())
    return total


def prune(model: nn.Module, config: DepruneConfig, *, inplace: bool = False,
          input_size: Optional[Sequence[int]] = None, calibration: Optional[Iterable] = None,
          calibration_samples: Optional[int] = None) -> PruneResult:
    """Prune the depth-wise separable convs of ``model`` as ``config`` says (ARCHITECTURE.md §1).

    Point-wise filter pruning first (block-internal channels only, with channel surgery), then DCP / BWT / HSR on
    every depth-wise conv; DW channels left with no tap are removed and folded into the next point-wise conv
    where that is exact. Depth-wise convs become :class:`~timm_deprune.layers.MaskedConv2d`.

    Args:
        model: a timm model (or any module with depth-wise convs); copied unless ``inplace``.
        config: ratios and method.
        inplace: prune ``model`` itself.
        input_size: ``(C, H, W)`` for the FLOPs report; default the model's own (timm's data config).
        calibration: input tensors, ``(input, target)`` pairs or a DataLoader (labels ignored). Needed by
            ``importance="obs"``; with it (and ``reconstruct`` not False) kept weights are refit layer by layer
            against the dense network; with ``reconstruct=False`` BN statistics are re-estimated on it instead
            (ARCHITECTURE.md §9).
        calibration_samples: use at most this many calibration samples.

    Example:
        >>> import timm
        >>> res = prune(timm.create_model("efficientnet_b0"), DepruneConfig.deprune_bh(dw_ratio=0.71, pw_ratio=0.3))
        >>> print(res.report.summary())  # doctest: +SKIP
    """
    from ..layers import to_masked

    if not isinstance(config, DepruneConfig):
        raise TypeError(f"config must be a DepruneConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    dws = depthwise_convs(model)
    _check_supported(model, dws)
    if any(hasattr(m, "mask") for _, m in dws):
        raise ValueError("model is already pruned (it has masked depth-wise convs); prune the dense model")
    if calibration is None and config.importance in CALIBRATED_IMPORTANCE:
        raise ValueError(f"importance={config.importance!r} ranks with calibration statistics: pass"
                         " prune(model, config, calibration=batches) with input tensors, (input, target) pairs or a"
                         " DataLoader")
    if calibration is None and config.reconstruct:
        raise ValueError("reconstruct=True refits the kept weights on calibration data: pass calibration=batches"
                         " or leave reconstruct unset")
    if not inplace:
        model = copy.deepcopy(model)
    t_cal = time.perf_counter()
    inputs = collect_inputs(calibration, calibration_samples) if calibration is not None else None
    reconstruct = inputs is not None and config.reconstruct is not False
    obs = config.importance in CALIBRATED_IMPORTANCE
    dense = copy.deepcopy(model) if reconstruct else None
    cal_seconds = time.perf_counter() - t_cal
    size = model_input_size(model, input_size)
    before = count_macs(model, size)
    params_before = _params(model)
    dense_channels = {p: m.out_channels for p, m in dws}
    decide = 0.0

    # 1. point-wise filter pruning of block-internal channels
    groups = [g for g in find_channel_groups(model) if not config.is_ignored(g.producer)]
    pw_ratios = resolve_ratios(config.pw_ratio, [g.producer for g in groups], "pw_ratio")
    pw_kept: dict[str, torch.Tensor] = {}
    pw_dense: dict[str, int] = {}
    # calibration: one dense pass before anything changes (filter saliencies, the targets of every refit layer)
    calib = Calibrator(model, dense if dense is not None else model, inputs) if (obs or reconstruct) else None
    refit_at = ({p for p, m in model.named_modules() if can_refit(m) and not config.is_ignored(p)} if reconstruct
                else set())
    pw_obs = calib.record(groups if obs and any(pw_ratios.values()) else (), sorted(refit_at),
                          [p for p, _ in dws if reconstruct and not config.is_ignored(p)]) if calib else {}
    for g in groups:
        ratio = pw_ratios.get(g.producer, 0.0)
        producer = model.get_submodule(g.producer)
        channels = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
        t0 = time.perf_counter()
        keep = kept_pw_count(channels, ratio, config.pw_tile, config.min_keep)
        scores = pw_obs[g.producer] if obs and keep < channels else (
            filter_scores(model, g, config.importance) if keep < channels else None)
        kept = (select_pw_channels(scores, keep, group_splits(model, g)) if keep < channels
                else torch.arange(channels))
        decide += time.perf_counter() - t0
        pw_kept[g.producer] = kept
        pw_dense[g.producer] = channels
        apply_pw(model, g, PWLayerPlan(g.producer, g.consumer, g.block, channels, ratio, tuple(kept.tolist())))

    # 2. DCP / BWT / HSR on every depth-wise conv (groups are formed after the channel removal)
    dws = [(p, m) for p, m in depthwise_convs(model) if not config.is_ignored(p)]
    skipped = [f"{p}: {type(m).__name__} is not a plain Conv2d / Conv2dSame" for p, m in dws
               if type(m) not in SUPPORTED_CONV_TYPES]
    dws = [(p, m) for p, m in dws if type(m) in SUPPORTED_CONV_TYPES]
    dw_ratios = resolve_ratios(config.dw_ratio, [p for p, _ in dws], "dw_ratio")
    bn_of = following_bn_scales(model) if config.importance == "bn_scaled" else {}
    group_of_dw = {g.dw: g for g in groups if g.dw is not None}
    opts = dict(balance=config.balance, align=config.align, tile=config.tile, group=config.group,
                min_keep=config.min_keep, block=config.block)

    def select(path, conv, ratio, st):
        """The layer's selection and, with calibration data, its refit weight (None: weights unchanged). With
        reconstruction the taps fit the dense outputs, with a free offset where the conv has a home for it."""
        centered = st is not None and st.g is not None and calib.offset_home(path)
        h, g = (st.hessian(centered), st.target(centered)) if st is not None else (None, None)
        if obs:
            return obs_select(conv.weight, h, ratio, target=g, **opts)
        sel = select_dw_taps(dw_scores(path, conv, config.importance, bn_of), ratio, **opts)
        return sel, (refit_kept_taps(conv.weight, h, sel.mask, target=g) if reconstruct else None)

    # with reconstruct every 1x1 conv / Linear is refit in network order (outputs pruned: against the kept rows)
    rows_of = {g.producer: pw_kept[g.producer] for g in groups if len(pw_kept[g.producer]) < pw_dense[g.producer]}
    rows_of.update({f"{g.se}.{n}": pw_kept[g.producer] for g in groups if g.se and g.producer in rows_of
                    for n in ("conv_expand", "fc2")})
    index = {p: i for i, (p, _) in enumerate(model.named_modules())}
    events = sorted([(index[p], p) for p, _ in dws] + [(index[c], c) for c in refit_at])
    refit: list[str] = []
    masks: dict[str, torch.Tensor] = {}
    dw_plans: list[DWLayerPlan] = []
    pw_dead: dict[str, tuple[int, ...]] = {}
    dead_removed = dead_kept = 0
    dw_convs = dict(dws)
    for _, path in events:
        if path not in dw_convs:  # a consumer: refit it on the pruned network's inputs
            if calib.refit(path, rows_of.get(path)):
                refit.append(path)
            continue
        conv = model.get_submodule(path)
        ratio = dw_ratios.get(path, 0.0)
        if ratio <= 0.0:
            continue
        g = group_of_dw.get(path)
        st = calib.dw_stats(path, dw_dense_channels(calib.dense, groups, pw_kept, path)) if calib else None
        t0 = time.perf_counter()
        sel, weight = select(path, conv, ratio, st)
        decide += time.perf_counter() - t0
        dead = sel.dead_channels
        removed = 0
        if len(dead) and config.remove_dead and g is not None and g.can_fold_dead and len(dead) < conv.out_channels:
            # Remove the dead channels exactly, then select again on the rest at the same overall target.
            channels = conv.out_channels
            apply_pw(model, g, PWLayerPlan(g.producer, g.consumer, g.block, channels, 0.0,
                                           tuple(range(channels)), tuple(dead.tolist())))
            pw_dead[g.producer] = tuple(dead.tolist())
            removed = len(dead)
            conv = model.get_submodule(path)
            if bn_of:  # channels moved: the BN scales must follow
                bn_of = following_bn_scales(model)
            ratio2 = max((ratio * channels - removed) / (channels - removed), 0.0)
            if st is not None:
                alive = torch.ones(channels, dtype=torch.bool)
                alive[dead] = False
                st = st.take(alive)
            t0 = time.perf_counter()
            sel, weight = select(path, conv, ratio2, st)
            decide += time.perf_counter() - t0
        dead_removed += removed
        dead_kept += len(sel.dead_channels)
        k = conv.kernel_size[0] * conv.kernel_size[1]
        pruned = sum(sel.group_pruned) + removed * k
        masks[path] = sel.mask
        dw_plans.append(DWLayerPlan(
            path=path, channels=conv.out_channels, kernel_size=tuple(conv.kernel_size), target_ratio=ratio,
            achieved_ratio=pruned / ((conv.out_channels + removed) * k), min_group_ratio=sel.min_group_ratio,
            max_group_ratio=sel.max_group_ratio, aligned=sel.aligned, direction=sel.direction, group=config.group,
            tile=config.tile, balanced=config.balance, dead_removed=removed))
        if weight is not None:
            with torch.no_grad():
                conv.weight.copy_(weight.to(conv.weight))
            if st is not None and st.g is not None and calib.offset_home(path):
                calib.set_offset(path, st.offset(weight))
        model.set_submodule(path, to_masked(conv, sel.mask))

    calibration_info = None
    if inputs is not None:
        calibration_info = _finish_calibration(model, inputs, refit, calib, config, reconstruct)
        calibration_info["calibration_seconds"] += cal_seconds

    pw_plans = tuple(
        PWLayerPlan(g.producer, g.consumer, g.block, pw_dense[g.producer], pw_ratios.get(g.producer, 0.0),
                    tuple(pw_kept[g.producer].tolist()), pw_dead.get(g.producer, ()))
        for g in groups if len(pw_kept[g.producer]) < pw_dense[g.producer] or g.producer in pw_dead)
    cfg = getattr(model, "pretrained_cfg", None)
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    after = count_macs(model, size)
    stats = {"input_size": list(size), "macs_before": sum(v[0] for v in before.values()),
             "macs_after": sum(v[0] for v in after.values()), "params_before": params_before,
             "params_after": _params(model), "decide_seconds": decide}
    if calibration_info is not None:
        stats["calibration"] = calibration_info
    plan = PrunePlan(config=config.to_dict(), dw=tuple(dw_plans), pw=pw_plans, arch=arch, extra={"stats": stats})
    model.deprune_plan = plan  # save_pretrained / push_to_hub read it
    _warn_if_nothing_pruned(config, dw_plans, dw_ratios, pw_kept, pw_dense, pw_ratios)
    rows = [_dw_row(d, dense_channels, before, after) for d in dw_plans]
    rows += [_pw_row(p, before, after) for p in pw_plans]
    report = PruneReport(
        layers=tuple(rows), input_size=size,
        macs_before=stats["macs_before"], macs_after=stats["macs_after"], params_before=params_before,
        params_after=stats["params_after"], decide_seconds=decide,
        dead_channels_removed=dead_removed, dead_channels_kept=dead_kept, skipped=tuple(skipped),
        calibration_seconds=calibration_info["calibration_seconds"] if calibration_info else None,
        calibration_peak_mb=calibration_info["peak_rss_mb"] if calibration_info else None)
    return PruneResult(model=model, plan=plan, masks=masks, report=report, calibration=calibration_info)


def _finish_calibration(model, inputs, refit, calib, config, reconstruct) -> dict:
    """Without reconstruction, re-estimate BN statistics on the calibration data; say what calibration did and cost.

    With reconstruction every layer was fit to reproduce the dense network's activations under its BN statistics,
    so those stay: replacing them by the calibration set's (a few hundred images, batch statistics) undid most of
    what the refits gained on Lite0 (ARCHITECTURE.md §9).
    """
    from ..recalibrate import recalibrate_bn

    t0 = time.perf_counter()
    if calib is not None:
        calib.close()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not reconstruct:
        recalibrate_bn(model, inputs, num_batches=len(inputs))
    info = {"samples": sum(len(x) for x in inputs), "batches": len(inputs), "importance": str(config.importance),
            "reconstruct": reconstruct, "layers_refit": len(refit), "bn_reestimated": 0 if reconstruct else len(bns)}
    stats = calib.stats() if calib is not None else {"calibration_seconds": 0.0, "calibration_cache_mb": 0.0,
                                                      "peak_rss_mb": max_rss_mb(), "peak_rss_rise_mb": 0.0}
    info.update(stats)
    info["calibration_seconds"] += time.perf_counter() - t0
    return info


def _warn_if_nothing_pruned(config: DepruneConfig, dw_plans, dw_ratios, pw_kept, pw_dense, pw_ratios) -> None:
    """A config that asks for pruning but whose tiles or ``min_keep`` let no layer prune anything says so."""
    if any(r > 0 for r in dw_ratios.values()) and all(d.achieved_ratio == 0 for d in dw_plans):
        limit = f"tile={config.tile} taps per group (align={config.align!r})" if config.align != "none" else ""
        limit = " and ".join(x for x in (limit, f"min_keep={config.min_keep}") if x)
        warnings.warn(f"dw_ratio asks for pruning but no depth-wise tap was pruned: with {limit}, group={config.group}"
                      " no layer can prune a whole step; lower tile or min_keep", UserWarning, stacklevel=3)
    if any(r > 0 for r in pw_ratios.values()) and all(len(pw_kept[p]) == pw_dense[p] for p in pw_kept):
        warnings.warn(f"pw_ratio asks for pruning but no point-wise filter was pruned: with pw_tile={config.pw_tile}"
                      f" and min_keep={config.min_keep} every layer keeps all its channels; lower pw_tile or"
                      " min_keep", UserWarning, stacklevel=3)


def _dw_row(d: DWLayerPlan, dense_channels: dict, before: dict, after: dict) -> LayerReport:
    mb, pb = before.get(d.path, (0, 0))
    ma, pa = after.get(d.path, (0, 0))
    return LayerReport(d.path, "dw", dense_channels.get(d.path, d.channels), d.channels, d.target_ratio,
                       d.achieved_ratio, d.min_group_ratio, d.max_group_ratio, d.aligned, mb, ma, pb, pa)


def _pw_row(p: PWLayerPlan, before: dict, after: dict) -> LayerReport:
    # the producer and the consumer both shrink with the block's internal channels
    mb = sum(before.get(x, (0, 0))[0] for x in (p.producer, p.consumer))
    ma = sum(after.get(x, (0, 0))[0] for x in (p.producer, p.consumer))
    pb = sum(before.get(x, (0, 0))[1] for x in (p.producer, p.consumer))
    pa = sum(after.get(x, (0, 0))[1] for x in (p.producer, p.consumer))
    achieved = 1.0 - p.channels / p.channels_before
    return LayerReport(p.producer, "pw", p.channels_before, p.channels, p.target_ratio, achieved, None, None,
                       False, mb, ma, pb, pa)
