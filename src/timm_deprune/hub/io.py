"""Save, push and load pruned models: timm's folder format plus the DEPrune masks and a model card.

A folder holds ``config.json`` (timm's format; the plan under ``model_args.deprune``), ``model.safetensors``
(pruned shapes), ``deprune_masks.safetensors`` (uint8 ``[C, kh, kw]`` per depth-wise layer, keyed by module path)
and ``README.md``. ``timm.create_model("local-dir:DIR")`` / ``("hf-hub:REPO")`` rebuild the exact model.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from ..layers import masked_convs
from ..pruning.plan import PrunePlan

__all__ = ["save_pretrained", "push_to_hub", "from_pretrained", "save_masks", "load_masks", "MASKS_FILE",
           "WEIGHTS_FILE", "SAVED_FILES", "model_plan", "check_masks", "check_weights", "check_files", "file_digest",
           "hub_file", "hub_plan", "read_config", "PREVIOUS_DIR", "resolve_saved_files"]

MASKS_FILE = "deprune_masks.safetensors"
WEIGHTS_FILE = "model.safetensors"
SAVED_FILES = (WEIGHTS_FILE, MASKS_FILE, "README.md", "config.json")  # what a save writes, in rename order
_TMP_PREFIX = ".deprune-save-"  # + pid + "-" + random: a save's temp folder inside the target
# While a save renames its files, the weights and masks config.json records (the previous complete save) are kept
# here as hard links: a folder whose config.json is still the old one then loads the old model from them.
PREVIOUS_DIR = ".deprune-previous"
_MASKS_FORMAT = "deprune-masks"
_MASKS_VERSION = "1"


def model_plan(model: nn.Module) -> PrunePlan:
    """The :class:`PrunePlan` a pruned model carries (set by ``prune`` and by the timm loaders)."""
    plan = getattr(model, "deprune_plan", None)
    if not isinstance(plan, PrunePlan):
        raise ValueError(f"{type(model).__name__} carries no DEPrune plan: prune it with timm_deprune.prune() or load"
                         " it with timm.create_model('ARCH.deprune' | 'hf-hub:...' | 'local-dir:...')")
    return plan


def save_masks(masks: Mapping[str, torch.Tensor], path: Union[str, Path]) -> None:
    """Write tap masks as uint8 tensors keyed by module path (safetensors, with a format header)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to(torch.uint8).cpu().contiguous() for k, v in masks.items()}
    save_file(tensors, str(path), metadata={"format": _MASKS_FORMAT, "format_version": _MASKS_VERSION})


def load_masks(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Read a masks file; a missing, corrupted or foreign file raises ``ValueError`` naming it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DEPrune masks file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            masks = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header or a truncated file
        raise ValueError(f"cannot read DEPrune masks file {path}: {e}") from e
    if meta.get("format") != _MASKS_FORMAT:
        raise ValueError(f"{path} is not a DEPrune masks file (format {meta.get('format')!r})")
    if meta.get("format_version") != _MASKS_VERSION:
        raise ValueError(f"{path} has masks format_version {meta.get('format_version')!r}; this timm_deprune reads"
                         f" {_MASKS_VERSION!r} (upgrade timm-deprune for newer files)")
    for key, m in masks.items():
        if m.dtype != torch.uint8 or m.dim() != 3 or bool(((m != 0) & (m != 1)).any()):
            raise ValueError(f"mask {key!r} in {path} must be a 0/1 uint8 [C, kh, kw] tensor, got {m.dtype}"
                             f" {list(m.shape)}")
    return {k: m.bool() for k, m in masks.items()}


def check_masks(plan: PrunePlan, masks: Mapping[str, torch.Tensor], where: str) -> None:
    """Masks must cover exactly the plan's depth-wise layers with the plan's shapes."""
    shapes = plan.mask_shapes()
    missing, extra = sorted(set(shapes) - set(masks)), sorted(set(masks) - set(shapes))
    if missing or extra:
        raise ValueError(f"masks in {where} do not match the prune plan: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, shape in shapes.items():
        if tuple(masks[key].shape) != shape:
            raise ValueError(f"mask {key!r} in {where} has shape {list(masks[key].shape)}, the plan expects"
                             f" {list(shape)}")


def _model_masks(model: nn.Module, plan: PrunePlan) -> dict[str, torch.Tensor]:
    masks = {path: m.mask for path, m in masked_convs(model)}
    check_masks(plan, masks, "the model")
    return masks


def save_pretrained(model: nn.Module, save_directory: Union[str, Path], *, overwrite: bool = False,
                    card: Optional[Mapping[str, Any]] = None) -> Path:
    """Write a pruned model as a folder that ``timm.create_model("local-dir:...")`` and the Hub can load.

    Every file is written to a hidden temp folder inside the target, then renamed over its old copy (each file
    atomically), ``config.json`` last; files of the folder that the save does not write are never touched or
    deleted. Until ``config.json`` is renamed, the old weights and masks stay reachable (hard links in
    ``PREVIOUS_DIR``), so a save killed at any point leaves a folder that loads the old model or the new one. A temp
    folder left by a killed save is removed by the next save into the same folder.

    Args:
        model: a pruned model (from :func:`timm_deprune.prune` or a DEPrune load).
        save_directory: target folder; must not exist or be empty unless ``overwrite``.
        overwrite: save into a non-empty folder, replacing the files a save writes (``SAVED_FILES``).
        card: extra model-card facts, e.g. ``{"accuracy": {"top1": 71.2, "dataset": "..."},
            "latency": {"batch1_ms": 5.1, "device": "..."}, "base_weights": "timm pretrained"}``.

    Returns:
        The folder path.
    """
    from timm.models import save_for_hf

    from .model_card import model_card

    if hasattr(getattr(model, "_orig_mod", model), "deprune_inference_stats"):
        raise ValueError("save_pretrained got a model returned by optimize_for_inference: its BatchNorms are folded"
                         " and its blocks' channels may be reordered, so its state dict does not load into the"
                         " architecture; save the pruned model (before optimize_for_inference) instead")
    plan = model_plan(model)
    masks = _model_masks(model, plan)
    target = Path(save_directory).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    created = not target.exists()
    if not created:
        _remove_stale_temps(target)
        if any(target.iterdir()) and not overwrite:
            raise FileExistsError(f"{target} is not empty; pass overwrite=True to replace the files a save writes"
                                  f" ({', '.join(SAVED_FILES)}; other files are kept)")
    target.mkdir(parents=True, exist_ok=True)  # modes follow the umask
    tmp = target / f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        save_for_hf(model, str(tmp), model_args={"deprune": plan.to_dict()}, safe_serialization=True,
                    model_config={"pretrained_cfg": {"hf_hub_filename": WEIGHTS_FILE}})
        save_masks(masks, tmp / MASKS_FILE)
        _record_files(tmp)
        (tmp / "README.md").write_text(model_card(model, plan, dict(card or {})))
        written = sorted(p.name for p in tmp.iterdir())
        unexpected = sorted(set(written) - set(SAVED_FILES))
        if unexpected:  # a timm release that writes more files: refuse rather than leave them unreplaced
            raise RuntimeError(f"save wrote unexpected files {unexpected}; timm-deprune saves {list(SAVED_FILES)}")
        mode = tmp.stat().st_mode & 0o666  # the umask's file mode (mkdir applied it); some writers use 0600
        for name in written:
            os.chmod(tmp / name, mode)
        _keep_previous(target)
        for name in SAVED_FILES:  # config.json last: it is what makes the folder a model
            if (tmp / name).exists():
                os.replace(tmp / name, target / name)  # each file atomically; nothing else in the folder is touched
        tmp.rmdir()
        shutil.rmtree(target / PREVIOUS_DIR, ignore_errors=True)  # config.json is the new one: the new model loads
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        raise
    return target


def file_digest(path: Union[str, Path]) -> str:
    """SHA-256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _record_files(tmp: Path) -> None:
    """Write the weights' and masks' digests into the plan in ``config.json``, the file a save renames last: a
    folder whose files come from two saves (a save killed between its renames) is then refused at load."""
    path = tmp / "config.json"
    config = json.loads(path.read_text())
    config["model_args"]["deprune"]["files"] = {name: file_digest(tmp / name) for name in (WEIGHTS_FILE, MASKS_FILE)}
    path.write_text(json.dumps(config, indent=2))


def _recorded(folder: Path) -> dict:
    """The file digests ``folder/config.json`` records ({} when it has none or cannot be read)."""
    try:
        return dict(json.loads((folder / "config.json").read_text())["model_args"]["deprune"].get("files") or {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _keep_previous(target: Path) -> None:
    """Hard-link the weights and masks that ``target/config.json`` records into ``PREVIOUS_DIR`` before a save
    replaces them. Where a killed save already replaced one, the copy kept by that save (digest checked) stays."""
    prev = target / PREVIOUS_DIR
    recorded = _recorded(target)
    if not recorded:
        shutil.rmtree(prev, ignore_errors=True)
        return
    prev.mkdir(exist_ok=True)
    for name, digest in recorded.items():
        kept = prev / name
        if kept.is_file() and file_digest(kept) == digest:
            continue
        current = target / name
        if not (current.is_file() and file_digest(current) == digest):
            kept.unlink(missing_ok=True)  # nothing of that save left to keep
            continue
        link = prev / f"{name}.tmp"
        link.unlink(missing_ok=True)
        try:
            os.link(current, link)
        except OSError:  # a file system without hard links
            shutil.copy2(current, link)
        os.replace(link, kept)


def resolve_saved_files(folder: Union[str, Path], names) -> tuple[dict[str, Path], bool]:
    """Where to read each of ``names`` in a saved folder: the folder's own copy, or, when a save was killed before
    it renamed ``config.json`` (the folder's copy is the new save's, the config the old one's), the old save's copy
    in ``PREVIOUS_DIR`` whose digest ``config.json`` records. Returns the paths and whether any is a kept copy."""
    folder = Path(folder)
    recorded = _recorded(folder)
    paths, previous = {}, False
    for name in names:
        path = folder / name
        digest = recorded.get(name)
        kept = folder / PREVIOUS_DIR / name
        if (digest is not None and kept.is_file() and not (path.is_file() and file_digest(path) == digest)
                and file_digest(kept) == digest):
            path, previous = kept, True
        paths[name] = path
    return paths, previous


def check_files(plan: Mapping[str, Any], paths: Mapping[str, Union[str, Path]], where: str,
                cause: str = "") -> None:
    """The files in ``paths`` (name -> path) must be the ones the plan's save wrote (``plan["files"]`` digests).

    A folder from before digests were recorded has none and passes. Raises ``ValueError`` naming the file (and
    ``cause``, what disagreed, when given).
    """
    recorded = plan.get("files") or {}
    for name, path in paths.items():
        digest = recorded.get(name)
        if digest is not None and file_digest(path) != digest:
            raise ValueError(f"{where}: {name} was not written by the save that wrote its config.json (a save"
                             " interrupted between its file renames, or a file copied in by hand); save the model"
                             " again with save_pretrained" + (f"; {cause}" if cause else ""))


def _remove_stale_temps(folder: Path) -> None:
    """Remove the temp folders of saves into ``folder`` whose process is gone (a killed save leaves one)."""
    for entry in folder.iterdir():
        if not (entry.name.startswith(_TMP_PREFIX) and entry.is_dir()):
            continue
        pid = entry.name[len(_TMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def check_weights(path) -> None:
    """A truncated or corrupted weights file raises ``ValueError`` naming it (before timm tries to load it)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error types for a bad header or a truncated file
        raise ValueError(f"cannot read DEPrune weights file {path}: {e}") from e


def hub_file(repo: str, filename: str) -> str:
    """Path of ``filename`` of Hub repo ``repo`` (``org/name[@revision]``) in the local cache, downloaded if needed."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    from timm.models._hub import hf_split

    repo_id, revision = hf_split(repo)
    try:
        return hf_hub_download(repo_id=repo_id, filename=filename, revision=revision)
    except (FileNotFoundError, EntryNotFoundError) as e:  # huggingface_hub's own errors name neither
        raise FileNotFoundError(f"cannot get {filename} of Hub repo {repo}: {' '.join(str(e).split())}") from e


def hub_plan(repo: str) -> dict:
    """The DEPrune plan (``model_args.deprune``) in a Hub repo's ``config.json``."""
    with open(hub_file(repo, "config.json")) as f:
        config = json.load(f)
    plan = config.get("model_args", {}).get("deprune")
    if plan is None:
        raise ValueError(f"{repo}/config.json has no model_args.deprune: not a timm-deprune model")
    return plan


def push_to_hub(model: nn.Module, repo_id: str, *, private: bool = False, token: Optional[str] = None,
                revision: Optional[str] = None, commit_message: str = "Add DEPrune pruned model",
                card: Optional[Mapping[str, Any]] = None, api=None) -> str:
    """Push a pruned model to the Hugging Face Hub in ONE commit (``upload_folder`` of a saved temp folder).

    Returns the commit URL. ``api`` defaults to ``huggingface_hub.HfApi(token=token)``.
    The folder is written before the Hub is touched: a model that cannot be saved creates no repo.
    """
    with tempfile.TemporaryDirectory(prefix="deprune-push-") as tmp:
        folder = save_pretrained(model, Path(tmp) / "model", card=card)
        if api is None:
            from huggingface_hub import HfApi

            from .._version import __version__

            api = HfApi(token=token, library_name="timm-deprune", library_version=__version__)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                 revision=revision, repo_type="model")
    return str(getattr(info, "commit_url", info))


def from_pretrained(repo_id_or_dir: Union[str, Path], **kwargs) -> nn.Module:
    """Load a pruned model from a local folder or a Hub repo (``timm.create_model`` with ``pretrained=True``).

    Example:
        >>> model = from_pretrained("my-org/mobilenetv2_100.deprune")  # doctest: +SKIP
    """
    import timm

    path = Path(repo_id_or_dir).expanduser()
    if path.is_dir():
        name = f"local-dir:{path.absolute()}"
    elif str(repo_id_or_dir).startswith((".", "/", "~")) or str(repo_id_or_dir).count("/") != 1:
        raise FileNotFoundError(f"no model folder {str(repo_id_or_dir)!r}, and it is not a Hub repo id (org/name)")
    else:
        name = f"hf-hub:{repo_id_or_dir}"
    kwargs.setdefault("pretrained", True)
    return timm.create_model(name, **kwargs)


def read_config(folder: Union[str, Path]) -> dict:
    """``config.json`` of a saved folder (for ``timm-deprune info``)."""
    return json.loads((Path(folder) / "config.json").read_text())
