"""Masked depth-wise conv layers: train with ``weight * mask``, run the sparse kernel at eval, fuse for export.

A pruned depth-wise conv keeps its timm class family: :class:`MaskedConv2d` subclasses ``nn.Conv2d`` and
:class:`MaskedConv2dSame` subclasses timm's ``Conv2dSame`` (dynamic TF "SAME" padding of ``tf_*`` models). The tap
mask ``[C, kh, kw]`` (True = kept) lives in a non-persistent bool buffer, so state-dict keys stay those of the dense
conv; masks travel separately (ARCHITECTURE.md §2).

- Training mode: ``conv(x, where(mask, weight, 0))``, so pruned taps get exactly zero gradients and, being zero,
  stay zero under SGD / momentum / weight decay / Adam / AdamW.
- Eval mode: ``execution`` picks the path. ``"auto"`` (default) runs ``deprune::sparse_dwconv2d`` with a cached
  kernel plan when the backend and the input allow it and no gradient is needed, else the masked dense conv;
  ``"sparse"`` always runs the sparse op (a clear error when it cannot); ``"dense"`` always the masked dense conv.
- :meth:`MaskedConv2d.fuse` returns the plain conv with the mask baked in (export,
  ``timm.models.reparameterize_model``).

Example:
    >>> conv = nn.Conv2d(32, 32, 3, padding=1, groups=32)
    >>> conv = to_masked(conv, torch.rand(32, 3, 3) > 0.7)  # same object, now a MaskedConv2d
    >>> with torch.no_grad():
    ...     y = conv.eval()(torch.randn(1, 32, 56, 56))  # sparse kernel
"""
from __future__ import annotations

import warnings
from typing import Iterator, Optional, Union

import torch
from torch import nn
from timm.layers import Conv2dSame, conv2d_same, register_notrace_module

from .kernels.activations import ACTIVATION_TABLE
from .kernels.backend import backend_available, load_extension
from .kernels.geometry import geometry_problem
from .kernels.op import NO_BACKEND, backend_problem, input_problem, sparse_dwconv2d
from .kernels.plan import PlanState, SparseDWPlan, build_plan, source_key

__all__ = [
    "EXECUTION_MODES",
    "MaskedConv2d",
    "MaskedConv2dSame",
    "to_masked",
    "set_execution",
    "masked_convs",
]

EXECUTION_MODES = ("auto", "sparse", "dense")

_warned_no_backend = False  # "auto" warns once per process when the native backend is missing



def _warn_no_backend() -> None:
    global _warned_no_backend
    if _warned_no_backend:
        return
    _warned_no_backend = True
    try:
        load_extension()
        cause = "backend_available() returned False"
    except ImportError as exc:
        cause = str(exc)
    warnings.warn(
        "timm_deprune: masked depth-wise convs with execution='auto' fall back to the masked dense conv (same results,"
        f" no sparse speed-up) because the native sparse kernels are not available ({cause}). Set execution='dense'"
        " with timm_deprune.layers.set_execution(model, 'dense') to silence this warning. Shown once per process.",
        UserWarning,
        stacklevel=5,  # _warn_no_backend <- forward <- Module._call_impl <- Module.__call__ <- caller
    )


def _type_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _prepare_mask(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Validate a tap mask against a depth-wise weight ``[C, 1, kh, kw]``; a contiguous bool copy on its device."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor of shape [C, kh, kw], got {type(mask).__name__}")
    channels, _, kh, kw = weight.shape
    expected = [int(channels), int(kh), int(kw)]
    if list(mask.shape) != expected:
        raise ValueError(
            f"mask shape {list(mask.shape)} does not match the depth-wise weight {list(weight.shape)}: expected"
            f" {expected} ([C, kh, kw])"
        )
    if mask.dtype == torch.bool:
        out = mask
    elif not mask.dtype.is_floating_point and not mask.dtype.is_complex:
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            raise ValueError(
                f"an integer mask must hold only 0 (pruned) and 1 (kept), got value {int(mask[bad][0])} ({mask.dtype})"
            )
        out = mask != 0
    else:
        raise TypeError(f"mask must be bool or an integer tensor of 0/1 (e.g. uint8), got dtype {mask.dtype}")
    return out.to(device=weight.device, dtype=torch.bool, copy=True).contiguous()


def _check_depthwise(conv: nn.Conv2d) -> None:
    if not (conv.groups == conv.in_channels == conv.out_channels):
        raise ValueError(
            "expected a depth-wise conv (groups == in_channels == out_channels), got groups="
            f"{conv.groups}, in_channels={conv.in_channels}, out_channels={conv.out_channels}"
        )


class MaskedConv2d(nn.Conv2d):
    """Depth-wise ``nn.Conv2d`` with a tap mask: masked dense conv in training, sparse kernel in eval.

    Usually made from an existing conv with :func:`to_masked`; constructing one directly takes the ``nn.Conv2d``
    arguments (``groups`` must equal ``in_channels`` and ``out_channels``) plus an optional ``mask`` (all taps kept
    when omitted).

    Attributes:
        mask: non-persistent bool buffer ``[C, kh, kw]``, True = tap kept. Replace it with :meth:`set_mask`.
        execution: eval path, one of ``"auto"``, ``"sparse"``, ``"dense"`` (see the module docstring).

    Note:
        The kernel plan is rebuilt when the weight, mask or bias is replaced, moved, cast or modified in place
        (their version counters). Edits through ``.data`` bypass version counters: call :meth:`invalidate_plan`
        after them. Under ``torch.compile`` the plan cached by the last eager call (or :meth:`sparse_plan`) is used;
        without one the compiled graph runs the masked dense conv in ``"auto"`` mode.
    """

    mask: torch.Tensor

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, tuple[int, int]],
        stride: Union[int, tuple[int, int]] = 1,
        padding: Union[int, tuple[int, int], str] = 0,
        dilation: Union[int, tuple[int, int]] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> None:
        nn.Conv2d.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )
        self._init_masked(mask)

    def _init_masked(self, mask: Optional[torch.Tensor]) -> None:
        """Set up the masked state on a depth-wise conv (after ``__init__`` or a class swap in :func:`to_masked`)."""
        _check_depthwise(self)
        if mask is None:
            mask = torch.ones(self.weight.shape[0], *self.weight.shape[2:], dtype=torch.bool, device=self.weight.device)
        self.register_buffer("mask", _prepare_mask(mask, self.weight), persistent=False)
        self._execution = "auto"
        self._activation = "identity"
        self.invalidate_plan()
        self._zero_pruned()

    # ----------------------------------------------------------------------------------------------- mask and mode
    @property
    def execution(self) -> str:
        """Eval path: ``"auto"``, ``"sparse"`` or ``"dense"``."""
        return self._execution

    @execution.setter
    def execution(self, mode: str) -> None:
        if mode not in EXECUTION_MODES:
            raise ValueError(f"execution must be one of {list(EXECUTION_MODES)}, got {mode!r}")
        self._execution = mode

    @property
    def activation(self) -> str:
        """Activation fused after the conv (and its bias): applied in every path, in the sparse kernel's epilogue."""
        return getattr(self, "_activation", "identity")

    @activation.setter
    def activation(self, name: str) -> None:
        if name not in ACTIVATION_TABLE:
            raise ValueError(f"activation must be one of {sorted(ACTIVATION_TABLE)}, got {name!r}")
        self._activation = name

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        y = self._dense_forward(x, self.masked_weight())
        act = self.activation
        return y if act == "identity" else ACTIVATION_TABLE[act].fn(y)

    @property
    def keep_ratio(self) -> float:
        """Fraction of taps kept by the mask."""
        return float(self.mask.sum()) / max(self.mask.numel(), 1)

    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the tap mask (bool, or integer 0/1, shape ``[C, kh, kw]``); zeroes the newly pruned weights.

        Raises:
            ValueError: the shape differs from ``[C, kh, kw]`` or an integer mask holds values other than 0/1.
            TypeError: the mask is not a tensor, or is floating point.
        """
        self.mask = _prepare_mask(mask, self.weight)
        self.invalidate_plan()
        self._zero_pruned()

    def _zero_pruned(self) -> None:
        with torch.no_grad():
            self.weight.masked_fill_(~self.mask.unsqueeze(1), 0)

    def masked_weight(self) -> torch.Tensor:
        """``weight`` with pruned taps set to zero (differentiable; pruned taps get zero gradient)."""
        return torch.where(self.mask.unsqueeze(1), self.weight, 0.0)

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, keep_ratio={self.keep_ratio:.3f}"
        if self._execution != "auto":
            text += f", execution={self._execution!r}"
        if self.activation != "identity":
            text += f", activation={self.activation!r}"
        return text

    # --------------------------------------------------------------------------------------------------- the plan
    def invalidate_plan(self) -> None:
        """Drop the cached kernel plan; the next sparse call rebuilds it."""
        self._plan_state: Optional[PlanState] = None

    def _current_state(self) -> Optional["PlanState"]:
        """The cached plan state when it still matches the weight, mask and bias, else None (one read: threads
        that rebuild it concurrently each replace the whole state, never a part of it)."""
        state = self._plan_state
        if state is None:
            return None
        w, m, b = self.weight, self.mask, self.bias
        src = state.src
        if src[0] is w and src[1] is m and src[2] is b and state.key == source_key(w, m, b):
            return state
        return None

    def sparse_plan(self) -> SparseDWPlan:
        """The kernel plan for the current weight and mask, rebuilt when stale.

        Eval forwards call it; call it yourself before ``torch.compile`` (the compiled graph uses the plan cached
        when it was traced).

        Raises:
            RuntimeError: the native backend is not available (or lacks CUDA kernels for a CUDA weight).
        """
        return self._plan_state_now().plan

    def _plan_state_now(self) -> "PlanState":
        state = self._current_state()
        if state is not None:
            return state
        w, m, b = self.weight, self.mask, self.bias
        if not backend_available():
            raise RuntimeError(f"cannot build a sparse kernel plan: {NO_BACKEND}")
        if w.device.type == "cuda" and not load_extension().cuda_compiled():
            raise RuntimeError("cannot build a sparse kernel plan for a CUDA weight: timm_deprune._C was built"
                               " without CUDA kernels")
        with torch.no_grad():
            plan = build_plan(w.detach().float(), m)
            if b is None:
                bias = None
            elif b.dtype == torch.float32 and b.is_contiguous():
                bias = b.detach()  # shares storage: the kernel reads the current values
            else:
                bias = b.detach().float().contiguous()
        state = PlanState(plan, bias, (w, m, b), source_key(w, m, b))
        self._plan_state = state  # one assignment: a concurrent reader sees the old state or the new one
        return state

    def _apply(self, fn, recurse: bool = True):  # .to() / .cuda() / .half(): drop the plan of the old tensors now
        self.invalidate_plan()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        # The plan holds launch closures over raw data pointers (and refs to the tensors it was built from): never
        # copy or pickle it; a copy rebuilds its own on first use.
        state = self.__dict__.copy()
        state.update(_plan_state=None, _static=None)
        return state

    # ---------------------------------------------------------------------------------------------------- forward
    def _dense_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, weight, self.bias)

    def _sparse_padding(self) -> Union[str, tuple[int, int]]:
        return self.padding

    def _static_blocker(self) -> Optional[str]:
        """Why the sparse kernel cannot run this conv's geometry, or None (the kernels' rule, cached per geometry)."""
        config = (self.kernel_size, self.stride, self.dilation, self.padding, self.padding_mode)
        cached = self.__dict__.get("_static")
        if cached is not None and cached[0] == config:
            return cached[1]
        reason = geometry_problem(self.kernel_size, self.stride, self.dilation, self._sparse_padding(),
                                  self.padding_mode)
        self._static = (config, reason)
        return reason

    def _sparse_blocker(self, x: torch.Tensor, backend: bool = True) -> Optional[str]:
        """Why the sparse kernel cannot run on ``x`` now, or None when it can (eval mode assumed).

        The kernels say what they accept (:func:`~timm_deprune.kernels.geometry.geometry_problem`,
        :func:`~timm_deprune.kernels.op.input_problem`); the layer adds what only it knows: gradients, autocast
        and its weight's dtype. ``backend=False`` (while tracing) skips loading the extension.
        """
        w, b = self.weight, self.bias
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
            return ("a gradient is required and the sparse kernel is inference-only: run under torch.no_grad() /"
                    " torch.inference_mode()")
        reason = self._static_blocker() or input_problem(x, w.shape[0], w.device)
        if reason is not None:
            return reason
        kind, dtype = x.device.type, x.dtype
        if torch.is_autocast_enabled(kind):
            expected = torch.get_autocast_dtype(kind)
            if dtype != expected:
                return f"under autocast to {expected} the input must be {expected}, got {dtype}"
        elif dtype != w.dtype:
            return f"the input dtype {dtype} differs from the weight dtype {w.dtype}"
        return backend_problem(x.device) if backend else None

    def _sparse_forward(self, x: torch.Tensor, state: "PlanState") -> torch.Tensor:
        return sparse_dwconv2d(x, state.plan, state.bias, self.activation, self.stride, self._sparse_padding(),
                               self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Masked dense conv in training mode or ``execution="dense"``; otherwise the sparse kernel when possible."""
        if self.training or self._execution == "dense":
            return self._dense(x)
        if torch.compiler.is_compiling():
            return self._compiled_forward(x)
        reason = self._sparse_blocker(x)
        if reason is None:
            return self._sparse_forward(x, self._plan_state_now())
        if self._execution == "sparse":
            raise RuntimeError(f"execution='sparse' cannot run the sparse kernel: {reason}. Use execution='auto'"
                               " (falls back to the masked dense conv) or 'dense'")
        if reason is NO_BACKEND:
            _warn_no_backend()
        return self._dense(x)

    def _compiled_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Traced by torch.compile: no version counters, data pointers or backend probing here. A cached plan
        # (built by an eager call or sparse_plan(), which check the backend) is used as it is.
        state = self._plan_state
        if state is not None and state.plan.device == x.device and self._sparse_blocker(x, backend=False) is None:
            return self._sparse_forward(x, state)
        if self._execution == "sparse":
            raise RuntimeError(
                "execution='sparse' under torch.compile needs a cached kernel plan for this input: call"
                " module.sparse_plan() (or run one eager forward under torch.no_grad()) before compiling"
            )
        return self._dense(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if tuple(self.weight.shape[:1] + self.weight.shape[2:]) == tuple(self.mask.shape):
            if getattr(self, "_mask_from_weights", False):
                # a structure-only build (ARCH.deprune, pretrained=False): the checkpoint's zero taps are its mask
                self._mask_from_weights = False
                self.set_mask(self.weight.detach()[:, 0] != 0)
            else:
                self._zero_pruned()  # a dense checkpoint loaded into a pruned layer: keep pruned taps at zero

    # ------------------------------------------------------------------------------------------------------- fuse
    def _plain_conv(self) -> nn.Conv2d:
        return nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            self.groups, self.bias is not None, self.padding_mode, device="meta",
        )

    def fuse(self) -> nn.Conv2d:
        """A plain conv of the base class (``nn.Conv2d`` / ``Conv2dSame``) with the mask baked into its weight.

        The new conv has its own parameters (copies, same device, dtype and ``requires_grad``) and this module's
        ``.training`` flag. Used by ``timm.models.reparameterize_model`` and for export.
        """
        conv = self._plain_conv()
        with torch.no_grad():
            conv.weight = nn.Parameter(self.masked_weight().detach().clone(),
                                       requires_grad=self.weight.requires_grad)
            if self.bias is not None:
                conv.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        conv.train(self.training)
        if self.activation != "identity":  # the fused activation comes back as its own module
            return nn.Sequential(conv, ACTIVATION_TABLE[self.activation].module()).train(self.training)
        return conv


class MaskedConv2dSame(MaskedConv2d, Conv2dSame):
    """Masked depth-wise timm ``Conv2dSame``: dynamic TF "SAME" padding (``tf_*`` models), sparse at eval.

    See :class:`MaskedConv2d`; the sparse kernel gets ``padding="same"``, which pads exactly as ``Conv2dSame``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, tuple[int, int]],
        stride: Union[int, tuple[int, int]] = 1,
        padding: Union[int, tuple[int, int], str] = 0,
        dilation: Union[int, tuple[int, int]] = 1,
        groups: int = 1,
        bias: bool = True,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> None:
        Conv2dSame.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, device=device,
            dtype=dtype,
        )
        self._init_masked(mask)

    def _dense_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return conv2d_same(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _sparse_padding(self) -> str:
        return "same"

    def _plain_conv(self) -> Conv2dSame:
        return Conv2dSame(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, 0, self.dilation, self.groups,
            self.bias is not None, device="meta",
        )

    def fuse(self) -> Conv2dSame:
        """A plain timm ``Conv2dSame`` with the mask baked in; see :meth:`MaskedConv2d.fuse`."""
        return super().fuse()


register_notrace_module(MaskedConv2d)  # FX feature extraction treats them as leaves (data-dependent control flow)
register_notrace_module(MaskedConv2dSame)

_MASKED_CLASS = {nn.Conv2d: MaskedConv2d, Conv2dSame: MaskedConv2dSame}


def to_masked(conv: nn.Conv2d, mask: torch.Tensor) -> MaskedConv2d:
    """Turn a depth-wise ``nn.Conv2d`` or timm ``Conv2dSame`` into its masked class, in place.

    The module object, its parameters (same ``nn.Parameter`` objects), hooks and state-dict keys are kept: its class
    is swapped to :class:`MaskedConv2d` / :class:`MaskedConv2dSame` and a non-persistent ``mask`` buffer is added.
    Pruned weights are zeroed in place. A module that is already masked gets its mask replaced (:meth:`set_mask`).

    Args:
        conv: depth-wise conv (``groups == in_channels == out_channels``), exactly ``nn.Conv2d`` or ``Conv2dSame``.
        mask: ``[C, kh, kw]`` tap mask, bool or integer 0/1 (True / 1 = kept); stored as bool on the weight's device.

    Returns:
        ``conv`` itself, now masked (put it back in its parent when you hold the parent's reference elsewhere).

    Raises:
        TypeError: ``conv`` is another class (e.g. a ``Conv2d`` subclass such as ``StdConv2d``), or the mask dtype is
            floating point.
        ValueError: ``conv`` is not depth-wise, or the mask shape is not ``[C, kh, kw]``.
    """
    if isinstance(conv, MaskedConv2d):
        conv.set_mask(mask)
        return conv
    cls = _MASKED_CLASS.get(type(conv))
    if cls is None:
        raise TypeError(
            "to_masked supports exactly torch.nn.Conv2d and timm.layers.Conv2dSame (subclasses may change forward),"
            f" got {_type_name(conv)}"
        )
    _check_depthwise(conv)
    mask = _prepare_mask(mask, conv.weight)  # validate before touching the module
    conv.__class__ = cls
    conv._init_masked(mask)
    return conv


def set_execution(model: nn.Module, mode: str) -> nn.Module:
    """Set ``execution`` (``"auto"``, ``"sparse"`` or ``"dense"``) on every masked conv of ``model``; returns it."""
    if mode not in EXECUTION_MODES:
        raise ValueError(f"execution must be one of {list(EXECUTION_MODES)}, got {mode!r}")
    for _, module in masked_convs(model):
        module.execution = mode
    return model


def masked_convs(model: nn.Module) -> Iterator[tuple[str, MaskedConv2d]]:
    """Yield ``(module path, module)`` for every :class:`MaskedConv2d` (and ``MaskedConv2dSame``) in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, MaskedConv2d):
            yield name, module
