"""Kernel plan of a pruned depth-wise conv: the kept taps of every channel, built once and reused per call."""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Optional

import torch

__all__ = ["SparseDWPlan", "build_plan", "block_channel_order", "block_lanes", "check_plan_tensors", "CHANNEL_BLOCK",
           "GROUP_SIZE", "MAX_KERNEL", "PlanState", "source_key"]

GROUP_SIZE = 32  # channels per diagonal-wise sub-GEMM (ARCHITECTURE.md §1); CUDA thread blocks follow it
CHANNEL_BLOCK = 8  # channels per SIMD vector in the channels_last CPU kernel (deprune::kChannelBlock)
MAX_KERNEL = 11


@dataclass(frozen=True, eq=False)
class SparseDWPlan:
    """Kept taps of a depth-wise conv in CSR form, plus per-group statistics.

    Channel ``c`` owns entries ``offsets[c]:offsets[c+1]`` of ``taps`` (``ky * kw + kx``, int32) and ``values``
    (fp32 weights). ``block_*`` hold the same taps per block of ``CHANNEL_BLOCK`` channels for the
    channels_last kernel (the union of the block's kept taps, zero-filled weights).
    """

    channels: int
    kernel_size: tuple[int, int]
    offsets: torch.Tensor
    taps: torch.Tensor
    values: torch.Tensor
    block_offsets: torch.Tensor
    block_taps: torch.Tensor
    block_values: torch.Tensor
    group_nnz: tuple[int, ...]  # kept taps per GROUP_SIZE-channel group
    group_size: int = GROUP_SIZE
    weight_shape: tuple[int, ...] = ()
    _weight_ref: Optional[weakref.ref] = field(default=None, repr=False)
    _weight_version: int = field(default=-1, repr=False)

    def __post_init__(self) -> None:
        # Also runs for dataclasses.replace: an edited plan is checked before any kernel reads it.
        check_plan_tensors(self.channels, tuple(self.kernel_size), self.offsets, self.taps, self.values,
                           self.block_offsets, self.block_taps, self.block_values)
        groups = -(-self.channels // self.group_size) if self.group_size >= 1 else -1
        if len(self.group_nnz) != groups:
            raise ValueError(f"plan group_nnz must have {groups} entries (one per {self.group_size}-channel group),"
                             f" got {len(self.group_nnz)}")

    def __repr__(self) -> str:
        kh, kw = self.kernel_size
        return (f"SparseDWPlan(channels={self.channels}, kernel={kh}x{kw}, nnz={self.nnz}, keep={self.keep_ratio:.3f},"
                f" balanced={self.is_balanced}, device={self.device})")

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nnz(self) -> int:
        return int(self.taps.numel())

    @property
    def keep_ratio(self) -> float:
        kh, kw = self.kernel_size
        return self.nnz / float(self.channels * kh * kw)

    @property
    def is_balanced(self) -> bool:
        """True when every full group keeps the same number of taps (BWT); a trailing partial group may differ."""
        full = self.channels // self.group_size
        return len(set(self.group_nnz[:full])) <= 1

    def to(self, device: torch.device | str) -> "SparseDWPlan":
        """A copy of the plan with its tensors on ``device`` (the same plan when already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        move = {
            name: getattr(self, name).to(device)
            for name in ("offsets", "taps", "values", "block_offsets", "block_taps", "block_values")
        }
        return replace(self, **move)

    def check_weight(self) -> None:
        """Raise when the weight this plan was built from changed shape or was modified in place since."""
        if self._weight_ref is None:
            return
        weight = self._weight_ref()
        if weight is None:
            return
        if weight.shape != self.weight_shape:  # torch.Size compares equal to a tuple; no tuple() copy per call
            raise ValueError(
                f"SparseDWPlan was built for a depth-wise weight of shape {list(self.weight_shape)}, but that weight"
                f" now has shape {list(weight.shape)}; rebuild the plan with build_plan(weight, mask)"
            )
        if self._weight_version >= 0 and not weight.is_inference() and weight._version != self._weight_version:
            raise ValueError(
                "SparseDWPlan is stale: its weight was modified in place after the plan was built (version"
                f" {self._weight_version} -> {weight._version}); rebuild the plan with build_plan(weight, mask)"
            )


def _index_problem(name: str, offsets: torch.Tensor, indices: torch.Tensor, rows: int, limit: int) -> Optional[str]:
    """Why CSR ``offsets`` [rows + 1] over ``indices`` (each in [0, limit)) is malformed, or None."""
    if offsets.dim() != 1 or offsets.numel() != rows + 1:
        return f"{name}offsets must have {rows + 1} entries, got shape {list(offsets.shape)}"
    n = indices.numel()
    if int(offsets[0]) != 0 or int(offsets[-1]) != n:
        return (f"{name}offsets must run from 0 to {n} (the number of {name}taps), got"
                f" {int(offsets[0])}..{int(offsets[-1])}")
    if rows and bool((offsets[1:] < offsets[:-1]).any()):
        return f"{name}offsets must be non-decreasing"
    if n and (int(indices.min()) < 0 or int(indices.max()) >= limit):
        return (f"{name}taps must be tap indices in [0, {limit}) (ky * kw + kx), got values in"
                f" [{int(indices.min())}, {int(indices.max())}]")
    return None


def check_plan_tensors(channels: int, kernel_size: tuple[int, int], offsets: torch.Tensor, taps: torch.Tensor,
                       values: torch.Tensor, block_offsets: torch.Tensor, block_taps: torch.Tensor,
                       block_values: torch.Tensor) -> None:
    """Raise ``ValueError`` unless the tensors form a plan the native kernels can read without going out of bounds.

    The one definition of a well-formed plan: :class:`SparseDWPlan` checks itself with it on construction, and the
    ``deprune::sparse_dwconv2d`` custom op checks the tensors it is given (once per set of tensors).
    """
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"plan channels must be a positive int, got {channels!r}")
    kh, kw = kernel_size
    if not all(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= MAX_KERNEL for k in (kh, kw)):
        raise ValueError(f"plan kernel size must be two ints in [1, {MAX_KERNEL}], got {kernel_size!r}")
    tensors = {"offsets": offsets, "taps": taps, "values": values, "block_offsets": block_offsets,
               "block_taps": block_taps, "block_values": block_values}
    device = None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"plan {name} must be a tensor, got {type(t).__name__}")
        expected = torch.float32 if name.endswith("values") else torch.int32
        if t.dtype != expected:
            raise ValueError(f"plan {name} must be {expected}, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"plan {name} must be contiguous")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"plan tensors must share one device: {name} is on {t.device}, offsets on {device}")
    if taps.dim() != 1 or values.shape != taps.shape:
        raise ValueError(f"plan taps and values must be 1-D of one length, got {list(taps.shape)} and"
                         f" {list(values.shape)}")
    nblocks = -(-channels // CHANNEL_BLOCK)
    if block_taps.dim() != 1 or tuple(block_values.shape) != (block_taps.numel(), CHANNEL_BLOCK):
        raise ValueError(f"plan block_values must be [len(block_taps), {CHANNEL_BLOCK}] = [{block_taps.numel()},"
                         f" {CHANNEL_BLOCK}], got {list(block_values.shape)}")
    for prefix, offs, idx, rows in (("", offsets, taps, channels), ("block_", block_offsets, block_taps, nblocks)):
        problem = _index_problem(prefix, offs, idx, rows, kh * kw)
        if problem is not None:
            raise ValueError(f"malformed SparseDWPlan for {channels} channels, kernel {kh}x{kw}: {problem}")
    # The CUDA channels_last kernel stages kh * kw entries per channel block: a longer list (a repeated tap) is
    # malformed.
    longest = int((block_offsets[1:] - block_offsets[:-1]).max()) if nblocks else 0
    if longest > kh * kw:
        raise ValueError(f"malformed SparseDWPlan for {channels} channels, kernel {kh}x{kw}: a channel block lists"
                         f" {longest} taps, more than the kernel's {kh * kw} (a tap repeated)")


def build_plan(weight: torch.Tensor, mask: torch.Tensor, group_size: int = GROUP_SIZE) -> SparseDWPlan:
    """Build the kernel plan of a depth-wise conv from its weight ``[C, 1, kh, kw]`` and tap mask ``[C, kh, kw]``.

    ``mask`` must be boolean (True = tap kept). The plan lives on the weight's device; weights are stored in fp32.

    Example:
        >>> w = torch.randn(64, 1, 3, 3); m = torch.rand(64, 3, 3) > 0.7
        >>> plan = build_plan(w, m); plan.nnz == int(m.sum())
        True
    """
    if not isinstance(weight, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise TypeError(f"weight and mask must be tensors, got {type(weight).__name__} and {type(mask).__name__}")
    if weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(f"expected a depth-wise weight of shape [C, 1, kh, kw], got {list(weight.shape)}")
    channels, _, kh, kw = (int(s) for s in weight.shape)
    if channels < 1:
        raise ValueError(f"expected at least one channel, got weight shape {list(weight.shape)}")
    if not (1 <= kh <= MAX_KERNEL and 1 <= kw <= MAX_KERNEL):
        raise ValueError(f"kernel size must be between 1 and {MAX_KERNEL}, got {kh}x{kw}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a torch.bool tensor (True = tap kept), got dtype {mask.dtype}")
    if tuple(mask.shape) != (channels, kh, kw):
        raise ValueError(f"mask shape {list(mask.shape)} does not match the weight: expected {[channels, kh, kw]}")
    if mask.device != weight.device:
        raise ValueError(f"mask is on {mask.device} but the weight is on {weight.device}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")

    with torch.no_grad():
        w = weight.detach().reshape(channels, kh * kw).to(torch.float32)
        m = mask.reshape(channels, kh * kw)
        counts = m.sum(dim=1, dtype=torch.int32)
        offsets = torch.zeros(channels + 1, dtype=torch.int32, device=w.device)
        offsets[1:] = torch.cumsum(counts, 0)
        ch_idx, tap_idx = m.nonzero(as_tuple=True)  # row-major: channels ascending, taps ascending within one
        taps = tap_idx.to(torch.int32)
        values = w[ch_idx, tap_idx].contiguous()

        nblocks = -(-channels // CHANNEL_BLOCK)
        # Block lanes whose channel pruned the tap (or lies past C) hold -0.0, kept weights +0.0 for an exact zero:
        # the channels_last kernel skips -0.0 lanes, so a pruned tap never carries a NaN / Inf input (as 0 * x
        # would) and every sparse path has one semantics: only kept taps read the input.
        wm = torch.full((nblocks * CHANNEL_BLOCK, kh * kw), -0.0, dtype=w.dtype, device=w.device)
        wm[:channels] = torch.where(m, w + 0.0, torch.full((), -0.0, dtype=w.dtype, device=w.device))
        wb = wm.reshape(nblocks, CHANNEL_BLOCK, kh * kw)
        block_mask = _block_union(m, CHANNEL_BLOCK)  # [nblocks, K]
        b_idx, bt_idx = block_mask.nonzero(as_tuple=True)
        block_offsets = torch.zeros(nblocks + 1, dtype=torch.int32, device=w.device)
        block_offsets[1:] = torch.cumsum(block_mask.sum(dim=1, dtype=torch.int32), 0)
        block_taps = bt_idx.to(torch.int32)
        block_values = wb[b_idx, :, bt_idx].contiguous()  # [nnz_blocks, CHANNEL_BLOCK]

        group_nnz = tuple(int(v) for v in torch.stack([g.sum() for g in counts.split(group_size)]).cpu())

    return SparseDWPlan(
        channels=channels,
        kernel_size=(kh, kw),
        offsets=offsets,
        taps=taps,
        values=values,
        block_offsets=block_offsets,
        block_taps=block_taps,
        block_values=block_values,
        group_nnz=group_nnz,
        group_size=group_size,
        weight_shape=tuple(weight.shape),
        _weight_ref=weakref.ref(weight),
        # Inference tensors carry no version counter: only their shape can be checked.
        _weight_version=-1 if weight.is_inference() else weight._version,
    )


def block_lanes(mask: torch.Tensor, block: int = CHANNEL_BLOCK) -> int:
    """Multiply-add lanes the channels_last kernel runs per output pixel for tap mask ``[C, kh, kw]``.

    Each block of ``block`` consecutive channels runs the union of its channels' kept taps on every lane, so the
    count is ``sum over blocks of |union| * block``; the kept taps themselves (``mask.sum()``) are the minimum.
    """
    if mask.dim() != 3 or mask.dtype != torch.bool:
        raise ValueError(f"expected a boolean tap mask of shape [C, kh, kw], got {mask.dtype} {list(mask.shape)}")
    return int(_block_union(mask.reshape(mask.shape[0], -1), block).sum()) * block


def _pad_channels(rows: torch.Tensor, block: int) -> torch.Tensor:
    """``[C, K]`` rows padded with zero rows to a whole number of ``block``-channel blocks."""
    pad = -rows.shape[0] % block
    return torch.cat([rows, rows.new_zeros(pad, rows.shape[1])]) if pad else rows


def _block_union(rows: torch.Tensor, block: int) -> torch.Tensor:
    """Kept taps ``[ceil(C / block), K]`` of each block of ``block`` channels: the union of its rows of ``[C, K]``."""
    return _pad_channels(rows, block).reshape(-1, block, rows.shape[1]).any(dim=1)


def block_channel_order(mask: torch.Tensor, block: int = CHANNEL_BLOCK, splits=()) -> torch.Tensor:
    """A channel order that puts channels with similar tap patterns into the same ``block``-channel block.

    The channels_last kernel runs each block of ``block`` consecutive channels on the union of their kept taps
    (one SIMD vector per tap), so per-channel ("element", DCP) patterns in their natural order cost nearly the
    dense kernel: at 29% kept, 8 random 3x3 patterns cover 94% of the taps. Reordering is free inside a block of
    a network, where the channels are internal (see :func:`timm_deprune.inference.reorder.reorder_dw_channels`).

    Greedy: each block starts from the remaining channel with the fewest kept taps and adds, one at a time, the
    channel that grows the block's union least (ties: the most taps inside the union). ``O(C^2 kh kw / block)``.
    ``splits`` (channel counts of consecutive parts, e.g. a MixedConv2d's kernel groups) keeps every channel in
    its part; blocks are formed within each part.

    Returns:
        LongTensor ``order`` (a permutation of ``range(C)``): channel ``order[i]`` goes to position ``i``.

    Example:
        >>> m = torch.zeros(16, 3, 3, dtype=torch.bool); m[0::2, 0, 0] = True; m[1::2, 2, 2] = True
        >>> block_lanes(m[block_channel_order(m)]) < block_lanes(m)
        True
    """
    if mask.dim() != 3 or mask.dtype != torch.bool:
        raise ValueError(f"expected a boolean tap mask of shape [C, kh, kw], got {mask.dtype} {list(mask.shape)}")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    c = mask.shape[0]
    sizes = [int(s) for s in splits] if splits else [c]
    if sum(sizes) != c or any(s < 0 for s in sizes):
        raise ValueError(f"splits {sizes} must be non-negative channel counts summing to the mask's {c} channels")
    flat = mask.detach().reshape(c, -1).cpu()
    order, start = [], 0
    for size in sizes:
        order.append(start + _greedy_blocks(flat[start:start + size], block))
        start += size
    return torch.cat(order) if order else torch.zeros(0, dtype=torch.long)


def _greedy_blocks(flat: torch.Tensor, block: int) -> torch.Tensor:
    c = flat.shape[0]
    count = flat.sum(dim=1)
    left = torch.ones(c, dtype=torch.bool)
    order = []
    while len(order) < c:
        idx = left.nonzero().flatten()
        seed = int(idx[count[idx].argmin()])
        left[seed] = False
        order.append(seed)
        union = flat[seed].clone()
        for _ in range(block - 1):
            idx = left.nonzero().flatten()
            if idx.numel() == 0:
                break
            cand = flat[idx]
            growth = (cand & ~union).sum(dim=1)
            inside = (cand & union).sum(dim=1)
            pick = int(idx[(growth * (flat.shape[1] + 1) - inside).argmin()])
            left[pick] = False
            order.append(pick)
            union |= flat[pick]
    return torch.tensor(order, dtype=torch.long)


class PlanState(NamedTuple):
    """A plan and what it was built from: what a layer's eval forward needs from its cache, replaced as one object
    (never field by field), valid while :func:`source_key` of its sources is unchanged."""

    plan: SparseDWPlan
    bias: Optional[torch.Tensor]  # fp32 contiguous bias the kernel reads (may share storage with the parameter)
    src: tuple  # (weight, mask, bias) the plan was built from
    key: tuple  # their source_key when it was built


def _version(t: torch.Tensor) -> int:
    """The in-place version counter; -1 for inference tensors, which have none."""
    return -1 if t.is_inference() else t._version


def source_key(w: torch.Tensor, m: torch.Tensor, b: Optional[torch.Tensor]) -> tuple:
    """What a kernel plan depends on: version counters and data pointers of weight, mask and bias.

    A new data pointer also covers moves and casts (the new tensor is allocated while the old one still lives).
    """
    try:
        return w._version, w.data_ptr(), m._version, m.data_ptr(), None if b is None else (b._version, b.data_ptr())
    except RuntimeError:  # inference tensors have no version counter
        return (_version(w), w.data_ptr(), _version(m), m.data_ptr(),
                None if b is None else (_version(b), b.data_ptr()))
