"""timm integration: ``ARCH.deprune`` pretrained tags and DEPrune builds inside timm's own model factory.

timm has no public way to add a tag to an existing architecture or a build step to its factory, so this module
(ARCHITECTURE.md §2, verified on timm 1.0.31):

- registers ``ARCH.deprune`` pretrained cfgs in timm's registry dicts (appended: timm's default tags stay first);
- wraps every architecture entrypoint: a call that carries a DEPrune plan (``model_args.deprune`` of an
  ``hf-hub:`` / ``local-dir:`` config, passed back by timm as the ``deprune=`` kwarg) or the ``deprune`` tag is
  re-issued with ``pruned=True``;
- replaces ``timm.models._builder.adapt_model_from_file``, the step ``build_model_with_cfg`` runs for
  ``pruned=True`` after building and before loading weights and feature wrapping, with one that applies the plan
  (channel surgery + masks). So ``num_classes=``, ``in_chans=``, ``features_only=``, ``checkpoint_path=`` and
  strict weight loading behave as in timm. timm's own ``*_pruned`` models take the original path.
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from torch import nn

__all__ = ["TAG", "PAPER_ARCHS", "PUBLISHED_ARCHS", "ORG_ENV", "DEFAULT_ORG", "hub_org", "default_config",
           "register_tags", "install"]

TAG = "deprune"
ORG_ENV = "TIMM_DEPRUNE_HUB_ORG"
DEFAULT_ORG = "timm-deprune"
PAPER_ARCHS = ("mobilenetv2_100", "mobilenetv3_small_100", "mobilenetv3_large_100", "efficientnet_b0")
# Architectures with DEPrune weights published under the org besides the paper's (extend when uploading).
PUBLISHED_ARCHS: tuple[str, ...] = ()
TESTED_TIMM = ("1.0.31", "1.1")  # [min, max) this hook was verified against


def hub_org() -> str:
    """Hub org of the ``ARCH.deprune`` weights: ``$TIMM_DEPRUNE_HUB_ORG`` or ``timm-deprune``."""
    return os.environ.get(ORG_ENV, DEFAULT_ORG).strip("/") or DEFAULT_ORG


def default_config():
    """The config of the ``ARCH.deprune`` tags: DEPrune-BH, DW 71%, PW 30%.

    Dead-channel removal is off so the pruned *structure* depends only on the architecture (``pretrained=False``
    builds the same shapes as the published weights).
    """
    from ..config import DepruneConfig

    return DepruneConfig.deprune_bh(dw_ratio=0.71, pw_ratio=0.3, remove_dead=False)


@dataclass
class _Pending:
    """A DEPrune build in flight between the entrypoint wrapper and the adapt step."""

    arch: str
    plan: Optional[dict]  # from config.json model_args.deprune; None for a tag build
    pretrained: bool
    applied: bool = False


_PENDING: contextvars.ContextVar[Optional[_Pending]] = contextvars.ContextVar("deprune_pending", default=None)


def _internals():
    """timm's registry dicts and builder module; a clear ImportError when they moved."""
    try:
        from timm.models import _builder, _registry
        from timm.models._pretrained import DefaultCfg, PretrainedCfg

        needed = (_registry._model_entrypoints, _registry._model_pretrained_cfgs, _registry._model_with_tags,
                  _registry._model_has_pretrained, _registry._model_default_cfgs, _builder.adapt_model_from_file)
    except (ImportError, AttributeError) as e:
        import timm

        raise ImportError(
            f"timm_deprune hooks timm internals that moved in timm {timm.__version__} ({e}); it was tested with"
            f" timm >={TESTED_TIMM[0]},<{TESTED_TIMM[1]}: install a timm in that range") from e
    del needed
    return _registry, _builder, DefaultCfg, PretrainedCfg


def register_tags(archs=None, org: Optional[str] = None) -> list[str]:
    """Register ``ARCH.deprune`` pretrained cfgs (weights at ``{org}/{ARCH}.deprune`` on the Hub).

    Returns the registered names. Re-registering (e.g. after changing ``$TIMM_DEPRUNE_HUB_ORG``) updates them.
    """
    registry, _, _, _ = _internals()
    org = org or hub_org()
    names = []
    for arch in archs or (PAPER_ARCHS + PUBLISHED_ARCHS):
        if arch not in registry._model_entrypoints:
            continue  # an older timm without this architecture
        base = registry._model_pretrained_cfgs.get(arch)
        name = f"{arch}.{TAG}"
        fields = dict(
            architecture=arch, tag=TAG, hf_hub_id=f"{org}/{name}", hf_hub_filename="model.safetensors", url="",
            file=None, state_dict=None, source=None, custom_load=False, license="apache-2.0",
            description=f"{arch} pruned with DEPrune-BH (DW 71%, PW 30%) by timm-deprune",
            paper_name="DEPrune: Depth-wise Separable Convolution Pruning for Maximizing GPU Parallelism",
            notes=("Sparse depth-wise layers run on timm-deprune kernels in eval mode.",))
        cfg = dataclasses.replace(base, **fields) if base is not None else None
        if cfg is None:
            continue
        registry._model_pretrained_cfgs[name] = cfg
        registry._model_has_pretrained.add(name)
        if name not in registry._model_with_tags[arch]:
            registry._model_with_tags[arch].append(name)
        default = registry._model_default_cfgs.get(arch)
        if default is not None:
            if TAG not in default.tags:
                default.tags.append(TAG)  # appended: timm's default tag stays the default
            default.cfgs[TAG] = cfg
        names.append(name)
    return names


def _tag_of(pretrained_cfg: Any) -> Optional[str]:
    if isinstance(pretrained_cfg, str):
        return pretrained_cfg
    if isinstance(pretrained_cfg, dict):
        return pretrained_cfg.get("tag")
    return getattr(pretrained_cfg, "tag", None)


def _wrap_entrypoint(arch: str, fn):
    if getattr(fn, "_deprune_wrapped", False):
        return fn

    @functools.wraps(fn)
    def entrypoint(pretrained: bool = False, **kwargs):
        plan = kwargs.pop(TAG, None)
        if plan is None and _tag_of(kwargs.get("pretrained_cfg")) != TAG:
            return fn(pretrained=pretrained, **kwargs)
        if kwargs.get("pruned"):
            raise ValueError(f"{arch}: a DEPrune build cannot also use timm's own pruned=True adaptation")
        pending = _Pending(arch=arch, plan=plan, pretrained=bool(pretrained))
        token = _PENDING.set(pending)
        try:
            model = fn(pretrained=pretrained, pruned=True, **kwargs)
        finally:
            _PENDING.reset(token)
        if not pending.applied:
            raise RuntimeError(f"{arch} does not build through timm's build_model_with_cfg(pruned=True) step, so"
                               " timm_deprune cannot build its DEPrune variant")
        return model

    entrypoint._deprune_wrapped = True
    return entrypoint


def _adapt(original):
    @functools.wraps(original)
    def adapt_model_from_file(parent_module: nn.Module, model_variant: str):
        pending = _PENDING.get()
        if pending is None:
            return original(parent_module, model_variant)
        _PENDING.set(None)  # nested builds (e.g. a teacher built inside) take the normal path
        pending.applied = True
        return _build(parent_module, pending)

    adapt_model_from_file._deprune_hook = True
    return adapt_model_from_file


def _build(model: nn.Module, pending: _Pending) -> nn.Module:
    """Turn the freshly built dense model into the DEPrune variant, before timm loads any weights."""
    from .io import (MASKS_FILE, WEIGHTS_FILE, check_files, check_masks, check_weights, hub_file, hub_plan, load_masks,
                     resolve_saved_files)
    from ..pruning.plan import PrunePlan, apply_plan
    from ..pruning.prune import prune

    cfg = getattr(model, "pretrained_cfg", None) or {}
    source = cfg.get("source")
    if pending.plan is None and not pending.pretrained:
        # ARCH.deprune without weights: the tag's config on the random init gives the pruned structure.
        result = prune(model, default_config(), inplace=True)  # the model's own input size
        for m in result.model.modules():
            if hasattr(m, "mask"):
                # masks of a random init mean nothing: a checkpoint loaded next (checkpoint_path=) brings its own,
                # read from its zero taps, instead of having its kept taps zeroed by these
                m._mask_from_weights = True
        return result.model
    if pending.plan is None:
        # ARCH.deprune with weights: the plan is in the published config.json
        plan_dict = hub_plan(cfg.get("hf_hub_id"))
    else:
        plan_dict = pending.plan
    plan = PrunePlan.from_dict(plan_dict)
    if source == "local-dir":
        folder = Path(cfg["file"])
        where = str(folder)
        paths, previous = resolve_saved_files(folder, (WEIGHTS_FILE, MASKS_FILE))
        if previous:  # a save was killed before it renamed config.json: the old model's files are still there
            warnings.warn(f"{folder}: a save into this folder was interrupted before it finished; loading the"
                          " model its config.json describes from the copies that save kept", stacklevel=2)
        masks_file = paths[MASKS_FILE]
        if pending.pretrained and not paths[WEIGHTS_FILE].is_file():
            raise FileNotFoundError(f"{folder} has no {WEIGHTS_FILE}: DEPrune models load safetensors weights only")
        weights_file = paths[WEIGHTS_FILE] if pending.pretrained else None
        if weights_file is not None and weights_file.parent != folder:
            cfg["file"] = str(weights_file.parent)  # the dict timm loads the weights by, next
        weights_name = WEIGHTS_FILE
    else:
        repo = cfg.get("hf_hub_id")
        if not repo:
            raise ValueError(f"{pending.arch}: a DEPrune plan without a source (local-dir or hf-hub) to read masks from")
        masks_file, where = hub_file(repo, MASKS_FILE), repo
        weights_name = cfg.get("hf_hub_filename") or WEIGHTS_FILE
        if pending.pretrained and not weights_name.endswith(".safetensors"):
            raise ValueError(f"{repo}: DEPrune models load safetensors weights only, the config names"
                             f" {weights_name!r}")
        weights_file = hub_file(repo, weights_name) if pending.pretrained else None
    if weights_file is not None:
        check_weights(weights_file)  # timm's own error for a truncated file names neither the file nor the model
    masks = load_masks(masks_file)
    files = {MASKS_FILE: masks_file}
    if weights_file is not None and weights_name == WEIGHTS_FILE:
        files[WEIGHTS_FILE] = weights_file
    try:
        check_masks(plan, masks, where)
    except ValueError as e:  # when the masks are another save's, say that first
        check_files(plan_dict, files, where, cause=str(e))
        raise
    check_files(plan_dict, files, where)  # well-formed, but of another save than this config.json: refused
    apply_plan(model, plan, masks)
    model.deprune_plan = plan
    return model


def install() -> None:
    """Register the tags and install the hooks (idempotent; runs on ``import timm_deprune``)."""
    registry, builder, _, _ = _internals()
    if not getattr(builder.adapt_model_from_file, "_deprune_hook", False):
        builder.adapt_model_from_file = _adapt(builder.adapt_model_from_file)
    if not isinstance(registry._model_entrypoints, _WrappingEntrypoints):
        # timm's registry functions read this module global at call time: architectures registered after this
        # import (a user's @register_model) are wrapped as they are stored, the existing ones now
        registry._model_entrypoints = _WrappingEntrypoints(registry._model_entrypoints)
    register_tags()


class _WrappingEntrypoints(dict):
    """timm's architecture -> entrypoint dict, storing every entrypoint wrapped for DEPrune builds."""

    def __init__(self, entries) -> None:
        super().__init__((arch, _wrap_entrypoint(arch, fn)) for arch, fn in dict(entries).items())

    def __setitem__(self, arch, fn) -> None:
        super().__setitem__(arch, _wrap_entrypoint(arch, fn))
