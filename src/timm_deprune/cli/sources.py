"""Where the ``timm-deprune`` commands get their models, with one-line errors (:class:`CliError`): the dense model
to prune with the chosen weights (timm's pretrained, a local checkpoint loaded strictly, or random init), and a
saved pruned model (a folder, ``local-dir:`` or a Hub repo), telling an unreachable network or Hub from other
failures."""
from __future__ import annotations

import argparse
import difflib
import socket
import urllib.error
from pathlib import Path
from typing import Optional

import timm
import torch

__all__ = ["PROG", "CliError", "unknown_model", "load_dense", "load_checkpoint", "network_cause", "why_offline",
           "load_source", "resolve_folder"]

PROG = "timm-deprune"


class CliError(Exception):
    """A failure the user can act on, printed as one line; ``code`` 2 means wrong usage."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def unknown_model(name: str) -> str:
    close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    return f"unknown timm model {name!r}{hint}"


def load_dense(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """The dense model with the chosen weights, and the model-card facts about those weights."""
    kwargs = {k: getattr(args, k) for k in ("num_classes", "in_chans") if getattr(args, k) is not None}
    if args.random_init:
        return timm.create_model(args.model, **kwargs), {"base_weights": "random init"}
    if args.checkpoint is not None:
        model = timm.create_model(args.model, **kwargs)
        load_checkpoint(model, args.checkpoint, args.model)
        return model, {"base_weights": f"checkpoint: {args.checkpoint}"}
    try:
        cfg = timm.models.get_pretrained_cfg(args.model)
    except RuntimeError as e:  # a tag the architecture does not have
        tags = timm.list_pretrained(args.model.split(".")[0] + ".*")
        raise CliError(f"{e} Pretrained tags: {', '.join(tags)}") from e
    if cfg is None or not timm.models.is_model_pretrained(args.model) or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise CliError(f"timm has no pretrained weights for {args.model}; use --checkpoint PATH or --random-init")
    source = cfg.hf_hub_id or cfg.url or cfg.file
    try:
        model = timm.create_model(args.model, pretrained=True, **kwargs)
    except Exception as e:
        cause = network_cause(e)
        if cause is None:
            raise
        raise CliError(f"cannot download the pretrained weights of {args.model} ({source}): {why_offline(cause)};"
                       " use --checkpoint PATH with local weights, or --random-init") from e
    card = {"base_weights": f"timm pretrained: {source}"}
    if cfg.hf_hub_id:
        card["base_model"] = cfg.hf_hub_id
    return model, card


def load_checkpoint(model: torch.nn.Module, path: Path, name: str) -> None:
    """Load a dense state dict strictly, with one-line messages for every way it can fail to fit."""
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path), weights_only=True)  # .safetensors, or torch.load without code execution
    except Exception as e:
        raise CliError(f"cannot read checkpoint {path}: {' '.join(str(e).split()) or type(e).__name__} (a"
                       " .safetensors file or a torch state dict is expected; pickled objects are refused)") from e
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in own.items()
                  if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        parts = [f"{label} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatches", mismatched)) if keys]
        raise CliError(f"checkpoint {path} does not fit {name}: {'; '.join(parts)}. Pass --num-classes / --in-chans"
                       " to match the checkpoint, or check the model name")
    model.load_state_dict(state, strict=True)


def network_cause(exc: BaseException) -> Optional[BaseException]:
    """The exception in ``exc``'s chain saying the network or the Hub could not be reached, if there is one."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        name = type(e).__name__
        if (isinstance(e, (OfflineModeIsEnabled, socket.gaierror, socket.timeout, ConnectionError, TimeoutError))
                or (isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError))
                or "Connect" in name or "Timeout" in name):
            return e
        nxt = e.__cause__ or e.__context__
        if nxt is None and isinstance(e, LocalEntryNotFoundError):  # offline without a chained cause
            return e
        e = nxt
    return None


def why_offline(cause: BaseException) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(cause, OfflineModeIsEnabled) or constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set and the files are not in the local cache"
    return f"the network is unavailable ({type(cause).__name__}: {' '.join(str(cause).split())[:160]})"


def load_source(source: str) -> torch.nn.Module:
    """The model of a saved folder, ``local-dir:DIR``, ``hf-hub:ORG/NAME`` or ``ORG/NAME``, with one-line errors."""
    folder = None
    if source.startswith("hf-hub:"):
        name = source
    elif source.startswith("local-dir:"):
        folder = Path(source[len("local-dir:"):]).expanduser()
    elif Path(source).expanduser().is_dir():
        folder = Path(source).expanduser()
    elif source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise CliError(f"no model folder {source!r}, and it is not a Hub repo id (org/name, hf-hub:org/name)")
    else:
        name = f"hf-hub:{source}"
    if folder is not None:
        if not folder.is_dir():
            raise CliError(f"no model folder {str(folder)!r}")
        if not (folder / "config.json").is_file():
            raise CliError(f"{folder.absolute()} has no config.json: not a timm model folder")
        name = f"local-dir:{folder.absolute()}"
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as e:
        cause = network_cause(e) if folder is None else None
        if cause is None:
            raise
        raise CliError(f"cannot load {name}: {why_offline(cause)}") from e


def resolve_folder(source: str) -> tuple[Path, str]:
    """A local folder, or the cached snapshot folder of a Hub repo (downloading config.json if not cached).

    Takes the prefixes ``load_source`` takes: ``local-dir:DIR`` and ``hf-hub:ORG/NAME``.
    """
    if source.startswith("local-dir:"):
        folder = Path(source[len("local-dir:"):]).expanduser()
        if not folder.is_dir():
            raise CliError(f"no model folder {str(folder)!r}")
        return folder.absolute(), f"local-dir:{folder.absolute()}"
    if source.startswith("hf-hub:"):
        source = source[len("hf-hub:"):]
    path = Path(source).expanduser()
    if path.is_dir():
        return path.absolute(), f"local-dir:{path.absolute()}"
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise CliError(f"no model folder {source!r}, and it is not a Hub repo id (org/name)")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json")
    if not isinstance(cached, str):
        try:
            cached = hf_hub_download(source, "config.json")
        except Exception as e:
            cause = network_cause(e)
            if cause is None:
                raise CliError(f"cannot read config.json of Hub repo {source}: {' '.join(str(e).split())}") from e
            raise CliError(f"Hub repo {source} is not in the local cache and the Hub cannot be reached:"
                           f" {why_offline(cause)}") from e
    return Path(cached).parent, f"hf-hub:{source}"
