"""DepruneConfig: what to prune and how (ratios, balance, alignment, importance), validated on construction."""
from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Union

import torch

__all__ = ["DepruneConfig", "RatioSpec", "ALIGN_MODES", "IMPORTANCE_NAMES", "CALIBRATED_IMPORTANCE", "resolve_ratios",
           "block_size"]

ALIGN_MODES = ("none", "under", "over", "nearest")
IMPORTANCE_NAMES = ("l1", "l2", "bn_scaled", "obs")
CALIBRATED_IMPORTANCE = ("obs",)  # need calibration data: prune(..., calibration=batches)

RatioSpec = Union[float, Mapping[str, float]]
# importance(kind, module_path, module) -> scores: [C, kh, kw] per tap for kind "dw", [C_out] per filter for "pw"
ImportanceFn = Callable[[str, str, torch.nn.Module], torch.Tensor]


def _check_ratio(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{where} must be in [0, 1), got {value}")
    return float(value)


def _freeze_ratio(spec, name: str) -> RatioSpec:
    if isinstance(spec, Mapping):
        out = {}
        for key, value in spec.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"{name} keys must be module paths or globs, got {key!r}")
            out[key] = _check_ratio(value, f"{name}[{key!r}]")
        return out
    return _check_ratio(spec, name)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def block_size(granularity: str) -> int:
    """Channels per shared tap pattern of a ``granularity`` string: "element" -> 1, "block:N" -> N."""
    if granularity == "element":
        return 1
    if isinstance(granularity, str) and granularity.startswith("block:"):
        n = granularity[len("block:"):]
        if n.isdigit() and int(n) >= 1:
            return int(n)
    raise ValueError(f"granularity must be 'element' or 'block:N' with N a positive int, got {granularity!r}")


@dataclass(frozen=True)
class DepruneConfig:
    """How to prune the depth-wise separable convs of a model (ARCHITECTURE.md §1).

    Args:
        dw_ratio: fraction of depth-wise taps to prune, one float for every DW conv or a mapping from module
            path or glob (``"blocks.1.*"``) to ratio; unmatched layers are not pruned.
        pw_ratio: fraction of block-internal channels to remove by point-wise filter pruning, float or mapping
            keyed by the path (or glob) of the point-wise conv that produces the channels.
        balance: BWT: prune the same number of taps in every ``group``-channel group (DEPrune-B).
        align: HSR: round each group's pruned-tap count to a multiple of ``tile`` while selecting: ``"under"``
            (prune fewer), ``"over"`` (prune more), ``"nearest"``, or ``"none"`` (DEPrune-BH uses alignment).
        tile: HSR tile size in taps (sub-GEMM columns).
        group: channels per diagonal-wise sub-GEMM (BWT group).
        pw_tile: kept point-wise channel counts are rounded to a multiple of this.
        importance: ``"l1"`` / ``"l2"`` (weight magnitude; the PW filter norm), ``"bn_scaled"`` (times the
            following BN's ``|gamma| / sqrt(var + eps)``), ``"obs"`` (calibration statistics: taps by the OBS
            saliency ``w² / [H⁻¹]_ii`` with the OBS update, filters by ``Σ W_consumer[:, j]² E[x_j²]``; needs
            ``prune(..., calibration=batches)``), or a callable ``(kind, path, module) -> scores`` returning
            ``[C, kh, kw]`` for ``kind == "dw"`` and ``[C_out]`` for ``"pw"``.
        ignore: module path globs left dense.
        min_keep: fewest taps a DW group keeps and fewest channels a PW layer keeps.
        remove_dead: remove DW channels whose taps are all pruned, folding their constant output into the
            next point-wise conv (exact; only where no squeeze-excite gate sits between them).
        granularity: ``"element"`` (the paper's DCP: every channel has its own tap pattern) or ``"block:N"`` (a tap
            is kept or pruned for N consecutive channels together, ranked by the block's summed score; BWT and
            HSR apply to blocks). Block patterns let a channels_last kernel vectorise across channels with no
            wasted lanes; N must divide ``group`` and ``tile``. A layer whose channel count is not a multiple of
            N ends in a partial block; its group's pruned count is then aligned in whole tiles of blocks.
        reconstruct: with calibration data, refit what is kept (kept DW taps by least squares where OBS has not,
            1x1 convs and Linears by ridge least squares against the dense network, layer by layer; BN statistics
            keep the dense values). ``False``: no refit, BN statistics re-estimated on the calibration data.
            ``None`` (default): on when ``prune`` gets calibration data. ``True`` without calibration is an error.

    Example:
        >>> cfg = DepruneConfig.deprune_bh(dw_ratio=0.71, pw_ratio=0.3)
        >>> cfg.balance, cfg.align
        (True, 'under')
    """

    dw_ratio: RatioSpec = 0.0
    pw_ratio: RatioSpec = 0.0
    balance: bool = False
    align: str = "none"
    tile: int = 32
    group: int = 32
    pw_tile: int = 32
    importance: Union[str, ImportanceFn] = "l2"
    ignore: tuple[str, ...] = ()
    min_keep: int = 1
    remove_dead: bool = True
    granularity: str = "element"
    reconstruct: Optional[bool] = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen dataclass
        set_("dw_ratio", _freeze_ratio(self.dw_ratio, "dw_ratio"))
        set_("pw_ratio", _freeze_ratio(self.pw_ratio, "pw_ratio"))
        if not isinstance(self.balance, bool):
            raise ValueError(f"balance must be True or False, got {self.balance!r}")
        if self.align not in ALIGN_MODES:
            raise ValueError(f"align must be one of {ALIGN_MODES}, got {self.align!r}")
        for name in ("tile", "group", "pw_tile", "min_keep"):
            _positive_int(getattr(self, name), name)
        if not callable(self.importance) and self.importance not in IMPORTANCE_NAMES:
            raise ValueError(f"importance must be one of {IMPORTANCE_NAMES} or a callable, got {self.importance!r}")
        if not isinstance(self.ignore, (str, list, tuple)):
            raise ValueError(f"ignore must be a module path glob or a list / tuple of them, got {self.ignore!r}")
        ignore = (self.ignore,) if isinstance(self.ignore, str) else tuple(self.ignore)
        if not all(isinstance(g, str) and g for g in ignore):
            raise ValueError(f"ignore must be module path globs (strings), got {self.ignore!r}")
        set_("ignore", ignore)
        if not isinstance(self.remove_dead, bool):
            raise ValueError(f"remove_dead must be True or False, got {self.remove_dead!r}")
        if self.reconstruct is not None and not isinstance(self.reconstruct, bool):
            raise ValueError(f"reconstruct must be True, False or None (on with calibration data), got"
                             f" {self.reconstruct!r}")
        n = block_size(self.granularity)
        if self.group % n or self.tile % n:
            raise ValueError(f"granularity {self.granularity!r}: the block size must divide group ({self.group}) and"
                             f" tile ({self.tile})")

    @property
    def block(self) -> int:
        """Channels that share one tap pattern (1 for element granularity)."""
        return block_size(self.granularity)

    # Presets named as in the paper (ARCHITECTURE.md §1): DEPrune = DCP + PW filter pruning, -B adds BWT, -BH adds HSR.
    @classmethod
    def deprune(cls, dw_ratio: RatioSpec, pw_ratio: RatioSpec = 0.0, **kwargs) -> "DepruneConfig":
        """DEPrune: DCP on depth-wise convs plus point-wise filter pruning."""
        return cls(dw_ratio=dw_ratio, pw_ratio=pw_ratio, balance=False, align="none", **kwargs)

    @classmethod
    def deprune_b(cls, dw_ratio: RatioSpec, pw_ratio: RatioSpec = 0.0, **kwargs) -> "DepruneConfig":
        """DEPrune-B: DEPrune with balanced workload tuning (equal pruning in every group)."""
        return cls(dw_ratio=dw_ratio, pw_ratio=pw_ratio, balance=True, align="none", **kwargs)

    @classmethod
    def deprune_bh(cls, dw_ratio: RatioSpec, pw_ratio: RatioSpec = 0.0, align: str = "under",
                   **kwargs) -> "DepruneConfig":
        """DEPrune-BH: DEPrune-B with hardware-aware alignment of pruned counts to the tile (default under)."""
        if align == "none":
            raise ValueError("DEPrune-BH aligns pruned counts: align must be 'under', 'over' or 'nearest', got 'none'")
        return cls(dw_ratio=dw_ratio, pw_ratio=pw_ratio, balance=True, align=align, **kwargs)

    @property
    def method(self) -> str:
        """The paper's name for this configuration."""
        if self.balance and self.align != "none":
            return "DEPrune-BH"
        return "DEPrune-B" if self.balance else "DEPrune"

    def to_dict(self) -> dict:
        """JSON-serialisable form (a callable importance is recorded by name only)."""
        out = asdict(self)
        out["ignore"] = list(self.ignore)
        if callable(self.importance):
            out["importance"] = getattr(self.importance, "__qualname__", "custom")
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> "DepruneConfig":
        """Inverse of :meth:`to_dict`; an unknown key raises."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DepruneConfig keys {unknown}; expected a subset of {sorted(known)}")
        data = dict(data)
        if "importance" in data and data["importance"] not in IMPORTANCE_NAMES:
            raise ValueError(f"importance {data['importance']!r} was a callable and cannot be restored from a dict")
        if "ignore" in data:
            data["ignore"] = tuple(data["ignore"])
        return cls(**data)

    def is_ignored(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, g) for g in self.ignore)


def resolve_ratios(spec: RatioSpec, paths: Iterable[str], name: str) -> dict[str, float]:
    """Ratio per module path: a float applies to all; a mapping matches exact paths first, then globs in order.

    A mapping key that matches none of ``paths`` raises (a typo must not silently prune nothing).
    """
    paths = list(paths)
    if not isinstance(spec, Mapping):
        return {p: float(spec) for p in paths}
    out: dict[str, float] = {}
    used: set[str] = set()
    for p in paths:
        if p in spec:
            out[p] = spec[p]
            used.add(p)
            continue
        for key, value in spec.items():
            if fnmatch.fnmatchcase(p, key):
                out[p] = value
                used.add(key)
                break
    unused = [k for k in spec if k not in used and not any(fnmatch.fnmatchcase(p, k) for p in paths)]
    if unused:
        sample = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
        raise ValueError(f"{name} key(s) {unused} match no prunable layer; layers are e.g. {sample}")
    return out
