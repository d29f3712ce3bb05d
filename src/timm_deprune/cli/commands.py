"""The ``timm-deprune`` subcommands: ``prune``, ``info``, ``push``, ``export`` and ``bench``, one function each.

Each takes the parsed arguments (:mod:`.app` builds the parser) and raises :class:`~.sources.CliError` for what the
user must change.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import timm
import torch

import timm_deprune
from ..config import ALIGN_MODES, IMPORTANCE_NAMES, DepruneConfig
from ..data import model_input_size
from ..hub.io import MASKS_FILE, SAVED_FILES, from_pretrained, load_masks, read_config, save_pretrained
from ..hub.model_card import config_summary, method_name
from .calibration_data import calibration_batches
from .sources import (PROG, CliError, load_dense, load_source, network_cause, resolve_folder, unknown_model,
                           why_offline)
from ..pruning.plan import PrunePlan
from ..recalibrate import RecalibrateConfig, create_loaders, evaluate, recalibrate

__all__ = ["METHODS", "FOLDER_FILES", "cmd_prune", "cmd_info", "cmd_push", "cmd_export", "cmd_bench"]

METHODS = {"deprune": DepruneConfig.deprune, "deprune-b": DepruneConfig.deprune_b,
           "deprune-bh": DepruneConfig.deprune_bh}
FOLDER_FILES = SAVED_FILES  # what a saved folder holds (and is pushed)


def _make_api(token: Optional[str]):
    """The Hub client (a seam: tests replace it with a fake)."""
    from huggingface_hub import HfApi

    return HfApi(token=token, library_name="timm-deprune", library_version=timm_deprune.__version__)


# ---------------------------------------------------------------------------------------------------- prune


def _config(args: argparse.Namespace) -> DepruneConfig:
    kwargs = {k: getattr(args, k) for k in ("tile", "group", "pw_tile", "importance", "granularity")
              if getattr(args, k) is not None}
    kwargs.update(ignore=tuple(args.ignore), remove_dead=args.remove_dead)
    if args.reconstruct is False:
        kwargs["reconstruct"] = False
    if args.align is not None:
        if args.method != "deprune-bh" and args.align != "none":
            raise CliError(f"--align {args.align} needs --method deprune-bh ({args.method} does not align)", 2)
        if args.method == "deprune-bh":
            kwargs["align"] = args.align
    try:
        return METHODS[args.method](dw_ratio=args.dw_ratio, pw_ratio=args.pw_ratio, **kwargs)
    except ValueError as e:
        raise CliError(f"invalid pruning options: {e}", 2) from e


def _check_numbers(args: argparse.Namespace, **lows: int) -> None:
    """One-line usage errors (exit 2) for numeric flags below their minimum, and for a non-positive --input-size."""
    for flag, low in lows.items():
        value = getattr(args, flag)
        if value is not None and value < low:
            raise CliError(f"--{flag.replace('_', '-')} must be >= {low}, got {value}", 2)
    size = getattr(args, "input_size", None)
    if size is not None and min(size) < 1:
        raise CliError(f"--input-size must be three positive ints C H W, got {size}", 2)


def _check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before loading the model, so a mistake costs no download."""
    if not (args.pretrained or args.checkpoint or args.random_init):
        raise CliError("choose the weights to prune: --pretrained (timm's weights), --checkpoint PATH (local"
                       " weights) or --random-init (untrained)", 2)
    if (args.private or args.token) and not args.push_to_hub:
        raise CliError("--private / --token only apply with --push-to-hub REPO", 2)
    if (args.epochs is not None or args.distill or args.device) and args.data_dir is None:
        raise CliError("--epochs / --distill / --device are recalibration options: they need --data-dir DIR", 2)
    _check_numbers(args, epochs=1, batch_size=1, workers=0, calibration_samples=1)
    if args.calibration_dir is None and (args.importance == "obs" or args.calibration_samples is not None
                                         or args.reconstruct is False):
        raise CliError("--importance obs / --calibration-samples / --no-reconstruct need --calibration-dir DIR", 2)
    if args.calibration_dir is not None and not args.calibration_dir.is_dir():
        raise CliError(f"--calibration-dir {args.calibration_dir} is not a folder")
    if args.data_dir is not None:
        if not args.data_dir.is_dir():
            raise CliError(f"--data-dir {args.data_dir} is not a folder")
    for flag in ("num_classes", "in_chans"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "num_classes" else 1):
            raise CliError(f"--{flag.replace('_', '-')} must be {'>= 0' if flag == 'num_classes' else '>= 1'},"
                           f" got {value}", 2)
    if not timm.is_model(args.model):
        raise CliError(unknown_model(args.model))
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise CliError(f"--checkpoint {args.checkpoint} is not a file")
    out = args.output
    if out.exists() and not out.is_dir():
        raise CliError(f"--output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise CliError(f"output folder {out} is not empty; pass --overwrite to replace the files a save writes (others"
                       " are kept), or choose another --output")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise CliError(f"--output {out}: {parent} is a file, so the folder cannot be created")


def _dw_sparsity(plan: PrunePlan) -> tuple[int, int]:
    """(pruned, total) depth-wise taps over the pruned layers; removed dead channels count as pruned."""
    pruned = total = 0
    for d in plan.dw:
        taps = (d.channels + d.dead_removed) * d.kernel_size[0] * d.kernel_size[1]
        total += taps
        pruned += round(d.achieved_ratio * taps)
    return pruned, total


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _files(folder: Path) -> list[str]:
    return [f"  {p.name:<28} {_size(p.stat().st_size):>9}" for p in sorted(folder.iterdir()) if p.is_file()]


def _load_line(folder: Path) -> str:
    return f'import timm, timm_deprune; model = timm.create_model("local-dir:{folder}", pretrained=True)'


def cmd_prune(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    start = time.perf_counter()
    if args.output is None:
        args.output = Path(f"{args.model.replace(':', '_').split('/')[-1]}.deprune")
    args.output = args.output.expanduser().absolute()
    _check_args(args)
    config = _config(args)
    recalibrate = args.data_dir is not None
    steps = ["load", "prune"] + (["recalibrate"] if recalibrate else []) + ["save"]
    steps += ["push"] if args.push_to_hub else []
    # a step bar on a terminal only (disable=None), erased when done so an error stays the one line printed
    with tqdm(total=len(steps), file=sys.stderr, disable=None, leave=False, dynamic_ncols=True,
              bar_format="{desc}{bar:20} {n_fmt}/{total_fmt} [{elapsed}]") as bar:
        bar.set_description(f"load {args.model}")
        dense, card = load_dense(args)
        bar.update()
        bar.set_description(f"prune ({config.method})")
        size = _input_size(dense, args)
        stem = next((m for m in dense.modules() if isinstance(m, torch.nn.Conv2d)), None)
        if stem is not None and size[0] != stem.in_channels:
            raise CliError(f"--input-size has {size[0]} channels but {args.model} takes {stem.in_channels} (pass"
                           " --in-chans to change the model's input channels)", 2)
        calibration = None
        if args.calibration_dir is not None:
            bar.set_description(f"read calibration images from {args.calibration_dir}")
            calibration = calibration_batches(dense, args.calibration_dir, args.calibration_samples,
                                              args.batch_size, args.workers)
            bar.set_description(f"prune ({config.method}, calibrated)")
        result = timm_deprune.prune(dense, config, input_size=size, calibration=calibration)
        bar.update()
        model = result.model
        recal = None
        if recalibrate:
            bar.set_description(f"recalibrate on {args.data_dir}")
            recal = _recalibrate(model, dense, args, card)
            bar.update()
        bar.set_description(f"save {args.output.name}")
        folder = save_pretrained(model, args.output, overwrite=args.overwrite, card=card)
        bar.update()
        url = None
        if args.push_to_hub:
            bar.set_description(f"push {args.push_to_hub}")
            url = _upload(folder, args.push_to_hub, private=args.private, token=args.token, after_save=True)
            bar.update()
        bar.set_description("done")

    report = result.report
    pruned, total = _dw_sparsity(result.plan)
    print(report.table())
    print()
    print(f"{result.plan.arch or args.model} pruned with {config.method} ({card['base_weights']})")
    print(f"  DW sparsity  {pruned / max(total, 1):.1%} of depth-wise taps pruned ({pruned}/{total},"
          f" {len(result.plan.dw)} layers; target {args.dw_ratio})")
    print(f"  PW channels  {len(result.plan.pw)} block-internal layers pruned (target {args.pw_ratio})")
    print(f"  MACs         {report.macs_before / 1e6:.2f}M -> {report.macs_after / 1e6:.2f}M"
          f" ({1 - report.macs_after / max(report.macs_before, 1):.1%} fewer) at input {list(report.input_size)}")
    print(f"  params       {report.params_before / 1e6:.3f}M -> {report.params_after / 1e6:.3f}M"
          f" ({1 - report.params_after / max(report.params_before, 1):.1%} fewer, non-zero)")
    print(f"  masks        decided in {report.decide_seconds * 1e3:.1f} ms; dead DW channels removed"
          f" {report.dead_channels_removed}, kept behind a gate {report.dead_channels_kept}")
    if result.calibration:
        cal = result.calibration
        print(f"  calibration  {cal['samples']} images, importance {cal['importance']}, reconstruct"
              f" {cal['reconstruct']} ({cal['layers_refit']} layers refit), {cal['calibration_seconds']:.1f} s,"
              f" peak memory {cal['peak_rss_mb']:.0f} MiB")
    for s in report.skipped:
        print(f"  left dense   {s}")
    if recal:
        print(f"  recalibrated {recal}")
    print(f"wrote {folder}:")
    print("\n".join(_files(folder)))
    if url:
        print(f"pushed to {args.push_to_hub}: {url}")
    print(f"load it with:  {_load_line(folder)}")
    print(f"done in {time.perf_counter() - start:.1f} s")


def _recalibrate(model: torch.nn.Module, dense: torch.nn.Module, args: argparse.Namespace, card: dict) -> str:
    """Fine-tune ``model`` in place with its masks held; adds the measured accuracy to ``card``; a summary line."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    train, val = create_loaders(str(args.data_dir), model, batch_size=args.batch_size, num_workers=args.workers)
    progress = sys.stderr.isatty()
    result = recalibrate(model, train, RecalibrateConfig(epochs=args.epochs or 1, progress=progress),
                         teacher=dense if args.distill else None)
    line = (f"{result.steps} steps on {args.data_dir} ({device})" + (", distilled from the dense model"
            if args.distill else "") + (f", last epoch loss {result.losses[-1]:.4f}" if result.losses else ""))
    if val is not None:
        acc = evaluate(model, val, progress=progress)
        card["accuracy"] = {"top1": round(acc["top1"], 2), "top5": round(acc["top5"], 2),
                            "evaluated on": f"{args.data_dir} validation split ({acc['samples']} images)"}
        line += f"; validation top-1 {acc['top1']:.2f}%, top-5 {acc['top5']:.2f}%"
    model.cpu()
    if args.distill:
        dense.cpu()
    return line


def _input_size(model: torch.nn.Module, args: argparse.Namespace) -> tuple[int, int, int]:
    if args.input_size is not None:
        return model_input_size(model, args.input_size)
    c, h, w = model_input_size(model)
    return (args.in_chans or c, h, w)


# ---------------------------------------------------------------------------------------------------- push


def _upload(folder: Path, repo: str, *, private: bool, token: Optional[str], after_save: bool = False) -> str:
    """Upload a saved folder's files in ONE commit; the folder is uploaded as saved (its model card included)."""
    api = _make_api(token)
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                                 allow_patterns=list(FOLDER_FILES),
                                 commit_message=f"Add DEPrune pruned model ({folder.name})")
    except Exception as e:
        cause = network_cause(e)
        if cause is None:
            raise
        later = f"; the model is saved in {folder}: push it later with `{PROG} push {folder} {repo}`"
        raise CliError(f"cannot reach the Hugging Face Hub to push {repo}: {why_offline(cause)}"
                       + (later if after_save else "")) from e
    return str(getattr(info, "commit_url", info))


def cmd_push(args: argparse.Namespace) -> None:
    folder = args.folder.expanduser().absolute()
    if not folder.is_dir():
        raise CliError(f"{folder} is not a folder")
    missing = [f for f in FOLDER_FILES if not (folder / f).is_file()]
    if missing:
        raise CliError(f"{folder} is not a timm-deprune model folder: missing {', '.join(missing)}")
    from_pretrained(folder)  # strict load: never publish a folder that does not rebuild the model
    url = _upload(folder, args.repo, private=args.private, token=args.token)
    print(f"pushed {folder} to {args.repo}: {url}")
    print(f'load it with:  import timm, timm_deprune; model = timm.create_model("hf-hub:{args.repo}",'
          " pretrained=True)")


# ---------------------------------------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> None:
    from ..inference.export import MIN_OPSET, export_checked, onnx_opset

    start = time.perf_counter()
    _check_numbers(args, batch_size=1, opset=MIN_OPSET, pad_channels=1)
    output = args.output.expanduser().absolute()
    if output.is_dir():
        raise CliError(f"--output {output} is a folder; give the .onnx file to write")
    if output.exists() and not args.overwrite:
        raise CliError(f"{output} exists; pass --overwrite to replace it, or choose another --output")
    model = load_source(args.source)
    padded: dict = {}
    path, errors = export_checked(model, output, input_size=args.input_size, batch_size=args.batch_size,
                                  dynamic_batch=not args.static_batch, opset=args.opset, check=args.check,
                                  overwrite=args.overwrite, pad_channels=args.pad_channels, padded=padded)
    size = args.input_size or (getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224)
    batch = "N (dynamic)" if not args.static_batch else str(args.batch_size)
    print(f"wrote {path} ({_size(path.stat().st_size)}; input [{batch}, {', '.join(map(str, size))}],"
          f" opset {onnx_opset(path)})")
    if padded:
        grown = sum(c1 - c0 for c0, c1 in padded.values())
        print(f"padding      {len(padded)} blocks' internal channels rounded up to multiples of {args.pad_channels}"
              f" with {grown} exact-zero channels, for ONNX Runtime's blocked kernels (outputs unchanged;"
              " --pad-channels 1 keeps the counts)")
    if errors is None:
        print("ORT check    skipped (--no-check)")
    else:
        import onnxruntime

        worst = max(errors.values())
        print(f"ORT check    ok: max rel. error {worst:.1e} vs PyTorch at batch"
              f" {' and '.join(map(str, errors))} (onnxruntime {onnxruntime.__version__})")
    print(f'run it with:  import onnxruntime as ort; sess = ort.InferenceSession("{path}");'
          ' y = sess.run(None, {"input": x})[0]')
    print(f"done in {time.perf_counter() - start:.1f} s")


# ---------------------------------------------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> None:
    _check_numbers(args, batch_size=1, repeats=1, threads=1)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        _bench(args)
    finally:
        torch.set_num_threads(threads)


def _bench(args: argparse.Namespace) -> None:
    import copy
    import statistics

    from ..inference.optimize import optimize_for_inference

    pruned = load_source(args.source).eval()
    cfg = getattr(pruned, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if not arch:
        raise CliError(f"{args.source}: its pretrained_cfg names no architecture to compare with")
    size = tuple(args.input_size or cfg.get("input_size") or (3, 224, 224))
    dense = timm.create_model(arch, num_classes=getattr(pruned, "num_classes", 1000), in_chans=size[0]).eval()
    cl = {"memory_format": torch.channels_last}
    layout = {"auto": "auto", "on": True, "off": False}[args.channels_last]
    optimized = optimize_for_inference(pruned, channels_last=layout, input_size=size)
    torch_ops = optimize_for_inference(pruned, channels_last=layout, input_size=size, native_blocks=False, check=False)
    use_cl = optimized.deprune_inference_stats["channels_last"]
    native = optimized.deprune_inference_stats["native_blocks"]
    layout_name = "channels_last" if use_cl else "NCHW"
    if optimized.deprune_inference_stats["reordered_blocks"]:
        layout_name += ", channels reordered"
    x = torch.randn(args.batch_size, *size)
    x_cl = x.contiguous(**cl)
    variants = {
        f"dense {arch}, eager NCHW": (dense, x),
        f"dense {arch}, eager channels_last": (copy.deepcopy(dense).to(**cl), x_cl),
        "pruned, as loaded (masked dense)": (timm_deprune.set_execution(copy.deepcopy(pruned), "dense"), x),
        f"pruned, optimised ({layout_name}, sparse DW, PyTorch 1x1 convs)": (torch_ops, x_cl if use_cl else x),
        f"pruned, optimised ({layout_name}, {native} native blocks)": (optimized, x_cl if use_cl else x),
    }
    if args.compile:
        variants["pruned, optimised + torch.compile"] = (torch.compile(optimized), x_cl if use_cl else x)
    samples: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for model, inp in variants.values():  # warm up (and compile)
            model(inp)
        for _ in range(args.repeats):
            for k, (model, inp) in variants.items():
                time.sleep(0.05)  # the previous variant's worker threads stop spinning; one untimed call warms this one
                model(inp)
                t0 = time.perf_counter()
                model(inp)
                samples[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    best = min(list(med.values())[:2])
    print(f"batch {args.batch_size}, input {list(size)}, {torch.get_num_threads()} threads, median of"
          f" {args.repeats} rounds (timm-deprune {timm_deprune.__version__}, torch {torch.__version__})")
    width = max(map(len, med))
    for k, v in med.items():
        print(f"  {k:{width}s} {v:9.2f} ms   {best / v:5.2f}x vs best dense eager")


# ---------------------------------------------------------------------------------------------------- info


def cmd_info(args: argparse.Namespace) -> None:
    folder, name = resolve_folder(args.source)
    if not (folder / "config.json").is_file():
        raise CliError(f"{folder} has no config.json: not a timm model folder")
    config = read_config(folder)
    plan_dict = (config.get("model_args") or {}).get("deprune")
    if plan_dict is None:
        raise CliError(f"{folder}/config.json has no DEPrune plan (model_args.deprune): not a timm-deprune model")
    plan = PrunePlan.from_dict(plan_dict)
    args_ = config.get("model_args") or {}
    arch = config.get("architecture") or plan.arch
    print(f"source        {name}")
    print(f"architecture  {arch} (num_classes {config.get('num_classes')}, in_chans {args_.get('in_chans', 3)})")
    print(f"method        {method_name(plan.config)}: {config_summary(plan.config)}")
    pruned, total = _dw_sparsity(plan)
    print(f"plan          format version {plan.format_version}; {len(plan.dw)} depth-wise layers pruned"
          f" ({pruned / max(total, 1):.1%} of their taps), {len(plan.pw)} point-wise layers with channels removed")
    stats = plan.extra.get("stats") or {}
    if stats:
        print(f"cost          MACs {stats['macs_before'] / 1e6:.2f}M -> {stats['macs_after'] / 1e6:.2f}M, params"
              f" {stats['params_before'] / 1e6:.3f}M -> {stats['params_after'] / 1e6:.3f}M at input"
              f" {stats.get('input_size')}; masks decided in {stats.get('decide_seconds', 0) * 1e3:.1f} ms")
    masks_path = folder / MASKS_FILE
    if masks_path.is_file():
        masks = load_masks(masks_path)
        kept = sum(int(m.sum()) for m in masks.values())
        print(f"masks         {len(masks)} layers, {kept}/{sum(m.numel() for m in masks.values())} taps kept")
    print()
    head = (f"{'depth-wise layer':<34} {'kernel':>6} {'ch':>5} {'dead':>4} {'target':>6} {'achvd':>6}"
            f" {'minG':>5} {'maxG':>5} {'al':>2}")
    print(head)
    print("-" * len(head))
    for d in plan.dw:
        print(f"{d.path[-34:]:<34} {f'{d.kernel_size[0]}x{d.kernel_size[1]}':>6} {d.channels:>5} {d.dead_removed:>4}"
              f" {d.target_ratio:>6.2f} {d.achieved_ratio:>6.3f} {d.min_group_ratio:>5.2f} {d.max_group_ratio:>5.2f}"
              f" {'y' if d.aligned else 'n':>2}")
    if plan.pw:
        print()
        head = f"{'point-wise producer':<34} {'consumer':<28} {'channels':>10}"
        print(head)
        print("-" * len(head))
        for p in plan.pw:
            print(f"{p.producer[-34:]:<34} {p.consumer[-28:]:<28} {f'{p.channels_before}>{p.channels}':>10}")
    print()
    print(f"files in {folder}:")
    print("\n".join(_files(folder)))
    missing = [f for f in FOLDER_FILES if not (folder / f).is_file()]
    if missing:
        print(f"  missing: {', '.join(missing)}" + (" (not in the local cache)" if name.startswith("hf-hub:") else ""))
    print(f'load it with:  import timm, timm_deprune; model = timm.create_model("{name}", pretrained=True)')

