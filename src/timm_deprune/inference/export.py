"""ONNX export of a pruned model: masks baked into dense depth-wise weights, BatchNorms folded, checked in ORT.

The exported graph is plain ONNX (``Conv`` nodes whose pruned taps are exact zeros): any ONNX runtime runs it, none
needs timm-deprune. It uses ``torch.onnx.export`` with torch's recommended exporter (``dynamo=True``, which needs
``onnx`` and ``onnxscript``); ``pip install "timm-deprune[onnx]"`` installs those and ONNX Runtime.

Example:
    >>> path = export_onnx(pruned_model, "mnv2.onnx")  # doctest: +SKIP
    >>> session = ort_session(path)  # doctest: +SKIP
    >>> logits = session.run(None, {"input": x.numpy()})[0]  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..data import model_input_size
from ..layers import MaskedConv2d, masked_convs
from .fold import fold_all_batchnorms
from .reorder import pad_block_channels

__all__ = ["export_onnx", "export_checked", "ort_session", "onnx_opset", "CHECK_RTOL", "MIN_OPSET",
           "PAD_METADATA_KEY"]

CHECK_RTOL = 1e-5  # ORT vs PyTorch, relative L2 error of the output (fp32)
MIN_OPSET = 18  # torch's dynamo exporter implements opset 18 and up; lower ones are a best-effort conversion
INPUT_NAME = "input"
_EXTRA = 'pip install "timm-deprune[onnx]"'  # onnx, onnxscript and onnxruntime
PAD_METADATA_KEY = "timm_deprune.padded_blocks"  # ONNX metadata: which blocks got zero channels, and how many


def _import_ort(hint: str = ""):
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"onnxruntime is not installed: pip install onnxruntime (or {_EXTRA}){hint}") from e
    return onnxruntime


def ort_session(path: Union[str, Path], threads: Optional[int] = None):
    """An ONNX Runtime CPU ``InferenceSession`` for ``path``, set up as the benchmarks compare it.

    Args:
        path: an ``.onnx`` file.
        threads: intra-op threads; default ``torch.get_num_threads()``, so ORT and PyTorch get the same cores.

    Returns:
        ``onnxruntime.InferenceSession`` with ``ORT_ENABLE_ALL`` graph optimisations on ``CPUExecutionProvider``.

    Example:
        >>> session = ort_session("mnv2.onnx", threads=1)  # doctest: +SKIP
        >>> y = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]  # doctest: +SKIP
    """
    ort = _import_ort()
    if threads is None:
        threads = torch.get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1 (or None for torch.get_num_threads()), got {threads!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT's optimiser notes go to stderr otherwise
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _positive_int(value, name: str, expected: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def _outputs(out) -> list[torch.Tensor]:
    outs = [out] if isinstance(out, torch.Tensor) else list(out) if isinstance(out, (tuple, list)) else None
    if outs is None or not all(isinstance(o, torch.Tensor) for o in outs):
        raise TypeError(f"export_onnx needs a model that returns a tensor or a tuple of tensors, got {type(out)}")
    return outs


def _to_deploy(model: nn.Module, size: tuple[int, int, int]) -> nn.Module:
    """In place on an eval-mode copy: fold BNs, then replace every masked conv by its dense ``fuse()``."""
    from timm.models import reparameterize_model

    # Fold first: folding may fuse a BatchNormAct2d's activation into a masked conv (its ``activation``), which
    # ``fuse()`` then returns as an explicit module after the dense conv.
    fold_all_batchnorms(model, size)
    if isinstance(model, MaskedConv2d):
        model = model.fuse()
    model = reparameterize_model(model, inplace=True)  # each child's fuse() (and timm's own reparameterize())
    left = [name for name, _ in masked_convs(model)]
    if left:
        raise RuntimeError(f"masked convs left after fuse(): {left[:3]}; please report the model")
    return model.eval()


def _rel_error(out, ref: torch.Tensor) -> float:
    ref = ref.detach().double()
    return float((torch.as_tensor(out).double() - ref).norm() / ref.norm().clamp_min(1e-12))


def export_checked(model: nn.Module, path: Union[str, Path], *, input_size: Optional[Sequence[int]] = None,
                   batch_size: int = 1, dynamic_batch: bool = True, opset: Optional[int] = None, check: bool = True,
                   overwrite: bool = False, pad_channels: Optional[int] = 8,
                   padded: Optional[dict] = None) -> tuple[Path, Optional[dict[int, float]]]:
    """:func:`export_onnx`, also returning the ORT check's relative error per batch size (None without a check);
    ``padded``, when given, receives :func:`pad_block_channels`' result."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    batch_size = _positive_int(batch_size, "batch_size", "an int >= 1")
    if pad_channels is not None:
        pad_channels = _positive_int(pad_channels, "pad_channels", "an int >= 1 or None")
    if next(model.parameters(), None) is None:
        raise ValueError(f"model {type(model).__name__} has no parameters: expected a (pruned) timm model")
    size = model_input_size(model, input_size)
    target = Path(path).expanduser().absolute()
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a folder; give the .onnx file to write, e.g. {target / 'model.onnx'}")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it, or choose another path")
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 6):
        raise RuntimeError(f"export_onnx uses torch's dynamo ONNX exporter, which needs torch >= 2.6; this is torch"
                           f" {torch.__version__}")
    if check:
        _import_ort(", or pass check=False to export without the ONNX Runtime check")  # before the slow export
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's dynamo exporter needs it, and onnx)
    except ImportError as e:
        raise ImportError(f"torch.onnx.export needs onnx and onnxscript: pip install onnx onnxscript (or {_EXTRA})"
                          ) from e
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int)
                              or not MIN_OPSET <= opset <= newest):
        raise ValueError(f"opset must be an int from {MIN_OPSET} (the lowest torch's exporter writes) to {newest}"
                         f" (onnx {onnx.__version__}'s newest), or None for torch's default; got {opset!r}")

    work = copy.deepcopy(model).cpu().eval()  # model is never changed
    gen = torch.Generator().manual_seed(0)
    batches = [batch_size] + ([batch_size + 1] if dynamic_batch and check else [])
    dtype = next(work.parameters()).dtype
    inputs = {b: torch.randn(b, *size, generator=gen).to(dtype) for b in batches}
    with torch.no_grad():  # the reference: the model as given (masked convs, BNs), in eval mode
        outputs = {b: _outputs(work(x)) for b, x in inputs.items()}
    n_out = len(outputs[batch_size])
    blocks = pad_block_channels(work, pad_channels) if pad_channels and pad_channels > 1 else {}
    if padded is not None:
        padded.update(blocks)
    deploy = _to_deploy(work, size)
    del work
    names = ["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)]
    kwargs = {}
    if dynamic_batch:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", suffix=".onnx", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the result gets a normal file's mode
        torch.onnx.export(deploy, (inputs[batch_size],), str(tmp), dynamo=True, external_data=False, verbose=False,
                          input_names=[INPUT_NAME], output_names=names, opset_version=opset, **kwargs)
        if blocks:
            _add_metadata(tmp, PAD_METADATA_KEY, "; ".join(f"{b}: {c0}->{c1}" for b, (c0, c1) in blocks.items()))
        if opset is not None:
            written = onnx_opset(tmp)
            if written != opset:  # torch keeps its own opset when it cannot convert, and only logs it
                raise ValueError(f"opset {opset}: torch {torch.__version__}'s ONNX exporter could not convert this"
                                 f" model to it (it wrote opset {written}); pass opset={written} or None")
        errors = None
        if check:
            session = ort_session(tmp)
            errors = {}
            for b, x in inputs.items():
                got = session.run(None, {INPUT_NAME: x.numpy()})
                errors[b] = max(_rel_error(g, r) for g, r in zip(got, outputs[b]))
                if not errors[b] <= CHECK_RTOL:
                    raise RuntimeError(
                        f"the exported ONNX model differs from the PyTorch model in ONNX Runtime: rel. error"
                        f" {errors[b]:.2e} > {CHECK_RTOL:.0e} at batch {b}, input {list(size)}; nothing was written"
                        f" to {target}")
            del session
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target, errors


def _add_metadata(path: Path, key: str, value: str) -> None:
    import onnx

    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = key, value
    onnx.save(model, str(path))


def onnx_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_onnx(model: nn.Module, path: Union[str, Path], *, input_size: Optional[Sequence[int]] = None,
                batch_size: int = 1, dynamic_batch: bool = True, opset: Optional[int] = None, check: bool = True,
                overwrite: bool = False, pad_channels: Optional[int] = 8) -> Path:
    """Export a (pruned) model to ONNX: masks baked into dense depth-wise weights, BatchNorms folded into convs.

    Works on an eval-mode CPU copy: ``model`` is not changed. Each :class:`MaskedConv2d` becomes the dense conv of
    its ``fuse()`` (pruned taps exact zeros, a fused activation as its own node), every BatchNorm that follows a
    conv is folded into it, and the graph is exported with ``torch.onnx.export(dynamo=True)`` to a temporary file
    next to ``path``, checked, then renamed into place: a failure leaves nothing behind.

    Args:
        model: the model to export, e.g. ``timm_deprune.prune(...).model`` or a ``timm.create_model("hf-hub:...")``
            load of a pruned model; any timm model works.
        path: the ``.onnx`` file to write (a single self-contained file; its folder is created).
        input_size: ``(C, H, W)`` of the example input; default the model's ``pretrained_cfg["input_size"]``.
        batch_size: batch of the example input (and of the graph's input when ``dynamic_batch`` is False).
        dynamic_batch: make the batch dimension symbolic (``"batch"``) so one file serves every batch size.
        opset: ai.onnx opset version; default torch's.
        check: run the file in ONNX Runtime on a random input (at ``batch_size``, and ``batch_size + 1`` with a
            dynamic batch) and compare with ``model``'s output; raise if the relative error exceeds 1e-5.
        overwrite: replace an existing file.
        pad_channels: round each block's internal channel count up to a multiple of this with exact-zero channels
            (:func:`pad_block_channels`): ONNX Runtime runs convs with channel counts that are multiples of 8 on its
            blocked kernels, and a pruned model's odd counts (e.g. 409) fell off them: mobilenetv2_100 DEPrune-BH
            ran 1.3-2x faster in ORT padded (BENCHMARKS.md). The padded blocks are listed in the file's metadata
            (``timm_deprune.padded_blocks``). ``None`` or 1 keeps the counts.

    Returns:
        The absolute path of the written file.

    Raises:
        ValueError: ``batch_size`` < 1, ``input_size`` not three positive ints, a bad ``opset`` or a model without
            parameters.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        IsADirectoryError: ``path`` is a folder.
        ImportError: ``onnx`` / ``onnxscript`` are missing, or ``onnxruntime`` is missing and ``check`` is True.
        RuntimeError: the ONNX Runtime output differs from PyTorch's (the check), or torch is older than 2.6.

    Example:
        >>> model = timm_deprune.prune(timm.create_model("mobilenetv2_100"), DepruneConfig.deprune_bh(0.7)).model
        >>> export_onnx(model, "mnv2.onnx")  # doctest: +SKIP
        PosixPath('/.../mnv2.onnx')
    """
    return export_checked(model, path, input_size=input_size, batch_size=batch_size, dynamic_batch=dynamic_batch,
                          opset=opset, check=check, overwrite=overwrite, pad_channels=pad_channels)[0]
