"""``timm-deprune``: prune a timm model with DEPrune, save it in timm's folder format, inspect it, push it to the Hub,
export it to ONNX.

Example:
    timm-deprune prune mobilenetv2_100 --pretrained --output mnv2.deprune
    timm-deprune info mnv2.deprune
    timm-deprune push mnv2.deprune my-org/mobilenetv2_100.deprune
    timm-deprune export mnv2.deprune --output mnv2.onnx

An error prints one line (``timm-deprune: error: ...``) on stderr and exits non-zero (2 for wrong usage);
``--verbose`` prints the traceback too. ``python -m timm_deprune.cli`` and ``scripts/prune_and_upload.py``
(= ``timm-deprune prune``) run the same code.
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import timm_deprune
from ..config import ALIGN_MODES, IMPORTANCE_NAMES
from .commands import METHODS, cmd_bench, cmd_export, cmd_info, cmd_prune, cmd_push
from .sources import PROG, CliError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The ``timm-deprune`` argument parser (subcommands ``prune``, ``info``, ``push``, ``export``)."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's default must not overwrite a --verbose given before the subcommand
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="on error, print the full traceback")
    parser = argparse.ArgumentParser(
        prog=PROG, parents=[common], description="DEPrune pruning of depth-wise separable convs in timm models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {timm_deprune.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("prune", parents=[common], help="prune a timm model and save it as a timm model folder",
                       description="Prune the depth-wise separable convs of a timm model and save a folder that"
                       " timm.create_model('local-dir:DIR', pretrained=True) loads.")
    p.add_argument("model", metavar="MODEL", help="timm model name, e.g. mobilenetv2_100 or efficientnet_b0.ra_in1k")
    w = p.add_argument_group("weights (pick exactly one)").add_mutually_exclusive_group()
    w.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (downloaded)")
    w.add_argument("--checkpoint", metavar="PATH", type=Path,
                   help="dense weights: .safetensors or a torch state dict (loaded with weights_only=True, strictly)")
    w.add_argument("--random-init", action="store_true", help="untrained weights (tests, benchmarks)")
    m = p.add_argument_group("pruning")
    m.add_argument("--method", choices=tuple(METHODS), default="deprune-bh",
                   help="DEPrune (DCP + PW filters), -B (+ balanced groups), -BH (+ tile alignment);"
                   " default %(default)s")
    m.add_argument("--dw-ratio", type=float, default=0.71, metavar="R",
                   help="fraction of depth-wise taps to prune (default %(default)s)")
    m.add_argument("--pw-ratio", type=float, default=0.3, metavar="R",
                   help="fraction of block-internal point-wise channels to remove (default %(default)s)")
    m.add_argument("--align", choices=ALIGN_MODES, help="HSR rounding of pruned counts (deprune-bh; default under)")
    m.add_argument("--tile", type=int, help="HSR tile in taps (default 32)")
    m.add_argument("--group", type=int, help="channels per balanced group (default 32)")
    m.add_argument("--pw-tile", type=int, help="kept point-wise channels are a multiple of this (default 32)")
    m.add_argument("--importance", choices=IMPORTANCE_NAMES, help="weight importance score (default l2)")
    m.add_argument("--granularity", metavar="G",
                   help="'element' (the paper's DCP, default) or 'block:N': N consecutive channels share one tap"
                   " pattern, which the channels_last CPU kernel runs without wasted lanes (e.g. block:8)")
    m.add_argument("--ignore", action="append", default=[], metavar="GLOB",
                   help="module path glob to leave dense (repeatable)")
    m.add_argument("--no-remove-dead", dest="remove_dead", action="store_false",
                   help="keep depth-wise channels whose taps are all pruned")
    c = p.add_argument_group("one-shot calibration (no training)")
    c.add_argument("--calibration-dir", type=Path, metavar="DIR",
                   help="images (any folder timm's create_dataset reads; labels not needed): --importance obs ranks"
                   " with them, kept weights are refit layer by layer against the dense model")
    c.add_argument("--calibration-samples", type=int, metavar="N",
                   help="use at most N calibration images (default: all in the folder)")
    c.add_argument("--no-reconstruct", dest="reconstruct", action="store_false", default=None,
                   help="with --calibration-dir, do not refit the kept weights (BN statistics are re-estimated)")
    b = p.add_argument_group("model")
    b.add_argument("--num-classes", type=int, help="classifier size (timm's num_classes)")
    b.add_argument("--in-chans", type=int, help="input channels (timm's in_chans)")
    b.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="input size for the MACs report (default: the model's pretrained_cfg)")
    o = p.add_argument_group("output")
    o.add_argument("--output", type=_path_arg, metavar="DIR", help="model folder (default ./MODEL.deprune)")
    o.add_argument("--overwrite", action="store_true",
                   help="save into a non-empty folder: replaces the files a save writes, keeps the others")
    o.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this Hub repo (one commit)")
    o.add_argument("--private", action="store_true", help="create the Hub repo private")
    o.add_argument("--token", help="Hub token (default: HF_TOKEN / the saved login)")
    r = p.add_argument_group("recalibration (fine-tune with masks held)")
    r.add_argument("--data-dir", type=Path, metavar="DIR",
                   help="image folder with train/ (and validation/ or val/ for the accuracy in the model card)")
    r.add_argument("--epochs", type=int, help="recalibration epochs (default 1)")
    r.add_argument("--distill", action="store_true", help="distil from the dense model while recalibrating")
    r.add_argument("--batch-size", type=int, default=64, help="recalibration batch size (default %(default)s)")
    r.add_argument("--workers", type=int, default=2, help="data loader processes (default %(default)s)")
    r.add_argument("--device", help="recalibration device (default: cuda when available, else cpu)")
    p.set_defaults(func=cmd_prune)

    i = sub.add_parser("info", parents=[common], help="show what a pruned model folder or Hub repo holds",
                       description="Show the architecture, pruning config, per-layer plan and files of a pruned"
                       " model folder, or of a Hub repo in the local cache.")
    i.add_argument("source", metavar="PATH_OR_REPO", help="model folder, or Hub repo id (org/name)")
    i.set_defaults(func=cmd_info)

    u = sub.add_parser("push", parents=[common], help="upload a saved model folder to the Hub",
                       description="Check that a saved folder loads (strictly), then upload it in one commit.")
    u.add_argument("folder", metavar="DIR", type=Path, help="folder written by `timm-deprune prune`")
    u.add_argument("repo", metavar="REPO", help="Hub repo id (org/name)")
    u.add_argument("--private", action="store_true", help="create the Hub repo private")
    u.add_argument("--token", help="Hub token (default: HF_TOKEN / the saved login)")
    u.set_defaults(func=cmd_push)

    e = sub.add_parser("export", parents=[common], help="export a pruned model to ONNX",
                       description="Export a pruned model to one .onnx file: masks baked into dense depth-wise"
                       " weights, BatchNorms folded; checked in ONNX Runtime against the PyTorch model.")
    e.add_argument("source", metavar="SOURCE",
                   help="model folder (from `timm-deprune prune`), local-dir:DIR, hf-hub:ORG/NAME or ORG/NAME")
    e.add_argument("--output", type=Path, metavar="FILE", required=True, help="the .onnx file to write")
    e.add_argument("--batch-size", type=int, default=1, metavar="N",
                   help="batch of the example input (the fixed batch with --static-batch; default %(default)s)")
    e.add_argument("--static-batch", action="store_true",
                   help="fix the batch dimension to --batch-size (default: dynamic)")
    e.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="input size (default: the model's pretrained_cfg)")
    e.add_argument("--opset", type=int, metavar="N", help="ai.onnx opset version (default: torch's)")
    e.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the ONNX Runtime comparison with the PyTorch model")
    e.add_argument("--pad-channels", type=int, default=8, metavar="N",
                   help="round each block's internal channel count up to a multiple of N with exact-zero channels,"
                   " which keeps ONNX Runtime on its blocked kernels (default %(default)s; 1 keeps the counts)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    e.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", parents=[common], help="time a pruned model against its dense architecture",
                       description="Time, side by side on this machine: the dense architecture the model was pruned"
                       " from (eager, NCHW and channels_last; random weights, the speed does not depend on them),"
                       " the pruned model as loaded (masked dense), and the pruned model after"
                       " optimize_for_inference with the sparse kernels (optionally torch.compile'd). Medians of"
                       " interleaved rounds.")
    b.add_argument("source", metavar="SOURCE",
                   help="model folder (from `timm-deprune prune`), local-dir:DIR, hf-hub:ORG/NAME or ORG/NAME")
    b.add_argument("--batch-size", type=int, default=1, metavar="N", help="batch size (default %(default)s)")
    b.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="input size (default: the model's pretrained_cfg)")
    b.add_argument("--repeats", type=int, default=10, metavar="N", help="timed rounds (default %(default)s)")
    b.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="layout of the optimised model (default auto: channels_last on CPU, with each block's"
                   " channels reordered by tap pattern; on CUDA unless the masks are per-channel)")
    b.add_argument("--compile", action="store_true", help="also time the optimised model under torch.compile")
    b.add_argument("--threads", type=int, metavar="N", help="torch threads (default: torch's)")
    b.set_defaults(func=cmd_bench)
    return parser


def _path_arg(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r}")
    return Path(text)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``timm-deprune`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    try:
        with _quiet_loggers(verbose):
            args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user; the traceback with --verbose
        if verbose:
            traceback.print_exc()
        message = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, (CliError, ValueError, FileNotFoundError, FileExistsError)):
            message = f"{type(e).__name__}: {message}"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return e.code if isinstance(e, CliError) else 1
    return 0


@contextmanager
def _quiet_loggers(verbose: bool) -> Iterator[None]:
    """Without --verbose, library warnings (e.g. the Hub client's retry messages) stay off the console."""
    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "timm")]
    levels = [lg.level for lg in loggers]
    if not verbose:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


