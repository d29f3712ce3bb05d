#!/usr/bin/env python
"""GPU benchmark: the sparse depth-wise conv kernel vs PyTorch's dense depth-wise conv (F.conv2d, groups=C).

Layers are the depth-wise convs of mobilenetv2_100 and efficientnet_b0 at 224x224 (read from timm with forward
hooks when it is installed, else the built-in list). Masks are BWT-balanced: every 32-channel group keeps the same
number of taps, ranked by |w| within the group; `--granularity` picks per-channel masks in the natural channel order
(element), the same with the channels reordered so that each 8-channel block shares most of its taps (reordered: what
optimize_for_inference does in channels_last), or one mask per 8-channel block (block:8). Every (layer, batch, dtype, layout) times dense and each keep ratio
interleaved, with CUDA events, taking the median over repeats; by default each sample replays a CUDA graph of
`--iters` calls, so the numbers are GPU time, not Python launch overhead (`--mode eager` times plain calls).

    python scripts/gpu_bench.py [--models mobilenetv2_100 efficientnet_b0] [--json results.json] [--markdown t.md]
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from timm_deprune import build_plan, sparse_dwconv2d
from timm_deprune.kernels.plan import block_channel_order
from timm_deprune.pruning.select import balanced_magnitude_mask, select_dw_taps
from timm_deprune.kernels.geometry import output_size, resolve_padding

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
GRANULARITIES = ("element", "reordered", "block:8")


def variant_key(variant) -> str:
    """The results key of one mask variant: a keep ratio (element masks) or (keep, granularity)."""
    keep, gran = variant if isinstance(variant, tuple) else (variant, "element")
    return f"{keep}" if gran == "element" else f"{keep} {gran}"


def variant_label(variant) -> str:
    keep, gran = variant if isinstance(variant, tuple) else (variant, "element")
    return f"{keep:.0%}" if gran == "element" else f"{keep:.0%} {gran}"


def make_mask(weight: torch.Tensor, keep: float, gran: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, mask) of one variant: reordered permutes the channels (equivalent to a reordered network)."""
    if gran == "block:8":
        c, _, kh, kw = weight.shape
        return weight, select_dw_taps(weight.abs().reshape(c, kh, kw), 1.0 - keep, balance=True, block=8).mask.to(weight.device)
    mask = balanced_magnitude_mask(weight, keep)
    if gran == "reordered":
        order = block_channel_order(mask.cpu()).to(weight.device)
        return weight[order].contiguous(), mask[order].contiguous()
    return weight, mask
LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


@dataclass(frozen=True)
class Layer:
    model: str
    index: int
    C: int
    H: int
    W: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[int, int, int, int]  # (top, bottom, left, right)


# (C, H, W, k, stride) of every depth-wise conv at 224x224, padding k//2, dilation 1 (timm 1.0.31).
BUILTIN = {
    "mobilenetv2_100": [
        (32, 112, 112, 3, 1), (96, 112, 112, 3, 2), (144, 56, 56, 3, 1), (144, 56, 56, 3, 2), (192, 28, 28, 3, 1),
        (192, 28, 28, 3, 1), (192, 28, 28, 3, 2), (384, 14, 14, 3, 1), (384, 14, 14, 3, 1), (384, 14, 14, 3, 1),
        (384, 14, 14, 3, 1), (576, 14, 14, 3, 1), (576, 14, 14, 3, 1), (576, 14, 14, 3, 2), (960, 7, 7, 3, 1),
        (960, 7, 7, 3, 1), (960, 7, 7, 3, 1),
    ],
    "efficientnet_b0": [
        (32, 112, 112, 3, 1), (96, 112, 112, 3, 2), (144, 56, 56, 3, 1), (144, 56, 56, 5, 2), (240, 28, 28, 5, 1),
        (240, 28, 28, 3, 2), (480, 14, 14, 3, 1), (480, 14, 14, 3, 1), (480, 14, 14, 5, 1), (672, 14, 14, 5, 1),
        (672, 14, 14, 5, 1), (672, 14, 14, 5, 2), (1152, 7, 7, 5, 1), (1152, 7, 7, 5, 1), (1152, 7, 7, 5, 1),
        (1152, 7, 7, 3, 1),
    ],
}


def builtin_layers(model: str) -> list[Layer]:
    return [Layer(model, i, C, H, W, (k, k), (s, s), (1, 1), (k // 2,) * 4)
            for i, (C, H, W, k, s) in enumerate(BUILTIN[model])]


def timm_layers(model: str, size: int = 224) -> list[Layer]:
    """Every depth-wise conv (groups == in == out > 1) of a timm model, with the input size it sees."""
    import timm  # noqa: PLC0415 - optional dependency

    net = timm.create_model(model, pretrained=False).eval()
    found: list[Layer] = []

    def hook(conv, inputs, _output):
        _, C, H, W = inputs[0].shape
        k, s, d = tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation)
        if type(conv).__name__ == "Conv2dSame":  # timm's dynamic TF "SAME" padding
            pads = resolve_padding("same", k, s, d, (H, W))
        elif isinstance(conv.padding, str):
            pads = resolve_padding(conv.padding, k, s, d, (H, W))
        else:
            pads = (conv.padding[0], conv.padding[0], conv.padding[1], conv.padding[1])
        found.append(Layer(model, len(found), C, H, W, k, s, d, pads))

    handles = [m.register_forward_hook(hook) for m in net.modules()
               if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels == m.out_channels > 1]
    with torch.no_grad():
        net(torch.randn(1, 3, size, size))
    for h in handles:
        h.remove()
    return found


def as_runner(fn: Callable[[], object], iters: int, mode: str) -> Callable[[], None]:
    """A callable that runs `fn` `iters` times: a CUDA graph replay, or a plain loop in eager mode."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture: cuDNN algorithm search, lazy initialisation
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    if mode == "eager":
        def loop() -> None:
            for _ in range(iters):
                fn()
        return loop
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    return graph.replay


def measure(runners: list[Callable[[], None]], iters: int, repeats: int) -> list[float]:
    """Median ms per call of each runner; runners are interleaved and their order rotates every repeat."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples: list[list[float]] = [[] for _ in runners]
    n = len(runners)
    for r in range(repeats):
        for i in [(r + j) % n for j in range(n)]:
            start.record()
            runners[i]()
            end.record()
            end.synchronize()
            samples[i].append(start.elapsed_time(end) / iters)
    return [statistics.median(s) for s in samples]


def check(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, layer: Layer) -> None:
    """Our output against a float64 masked conv of the same (rounded) input; aborts the benchmark when off."""
    top, bottom, left, right = layer.pads
    ref = F.conv2d(F.pad(x.double(), (left, right, top, bottom)), weight.double() * mask[:, None].double(), None,
                   layer.stride, 0, layer.dilation, groups=layer.C)
    err = (y.double() - ref).abs().max().item()
    tol = (1e-4 if y.dtype == torch.float32 else 2e-2) * max(1.0, ref.abs().max().item())
    if not err <= tol:
        sys.exit(f"gpu_bench: WRONG RESULT on {layer} dtype={y.dtype} (max error {err:.3g} > {tol:.3g})")


def bench_layer(layer: Layer, batch: int, dtype: torch.dtype, variants: list, args) -> dict:
    """Times dense (both layouts) and ours (both layouts, every mask variant) on one layer; ms per call."""
    kh, kw = layer.kernel
    weight = torch.randn(layer.C, 1, kh, kw, device="cuda")
    x32 = torch.randn(batch, layer.C, layer.H, layer.W, device="cuda")
    top, bottom, left, right = layer.pads
    plans = {}
    for v in variants:
        w_v, m_v = make_mask(weight, *v)
        plans[variant_key(v)] = (build_plan(w_v, m_v), m_v, w_v)
    names, fns = [], []
    for lname, fmt in LAYOUTS.items():
        x = x32.to(dtype).contiguous(memory_format=fmt)
        w = weight.to(dtype).contiguous(memory_format=fmt)
        names.append(("dense", lname, None))
        if top == bottom and left == right:  # the usual case: padding inside the conv, as the model runs it
            fns.append(lambda x=x, w=w: F.conv2d(x, w, None, layer.stride, (top, left), layer.dilation, layer.C))
        else:  # asymmetric padding needs an explicit pad, timed with the conv as timm's Conv2dSame runs it
            fns.append(lambda x=x, w=w: F.conv2d(F.pad(x, (left, right, top, bottom)), w, None, layer.stride, 0,
                                                  layer.dilation, layer.C))
        for keep, (plan, mask, w_v) in plans.items():
            check(sparse_dwconv2d(x, plan, None, "identity", layer.stride, (left, right, top, bottom),
                                  layer.dilation), x, w_v, mask, layer)
            names.append(("ours", lname, keep))
            fns.append(lambda x=x, plan=plan: sparse_dwconv2d(x, plan, None, "identity", layer.stride,
                                                              (left, right, top, bottom), layer.dilation))
    runners = [as_runner(fn, args.iters, args.mode) for fn in fns]
    times = measure(runners, args.iters, args.repeats)
    oh = output_size(layer.H, kh, layer.stride[0], layer.dilation[0], top, bottom)
    ow = output_size(layer.W, kw, layer.stride[1], layer.dilation[1], left, right)
    io_bytes = batch * layer.C * (layer.H * layer.W + oh * ow) * torch.finfo(dtype).bits // 8
    return {"layer": asdict(layer), "batch": batch, "dtype": str(dtype).replace("torch.", ""), "io_bytes": io_bytes,
            "ms": {f"{kind}/{lname}/{'dense' if keep is None else keep}": t
                   for (kind, lname, keep), t in zip(names, times)}}


def summary_rows(results: list[dict], keeps: list[float]) -> list[tuple[str, ...]]:
    """One row per (model, dtype, batch, keep): sums over the model's layers of the per-layer times (ms), and our
    speed-up against cuDNN in the same layout and against cuDNN's better layout."""
    header = ("model", "dtype", "batch", "keep", "dense nchw", "dense cl", "dense best", "ours nchw", "ours cl",
              "ours best", "nchw vs cuDNN nchw", "cl vs cuDNN cl", "best vs best", "ours GB/s")
    rows = [header]
    keys = sorted({(r["layer"]["model"], r["dtype"], r["batch"]) for r in results},
                  key=lambda k: (k[0], k[1], k[2]))
    for model, dtype, batch in keys:
        rs = [r for r in results if (r["layer"]["model"], r["dtype"], r["batch"]) == (model, dtype, batch)]
        for variant in keeps:
            keep = variant_key(variant)
            dn = sum(r["ms"]["dense/nchw/dense"] for r in rs)
            dc = sum(r["ms"]["dense/cl/dense"] for r in rs)
            db = sum(min(r["ms"]["dense/nchw/dense"], r["ms"]["dense/cl/dense"]) for r in rs)
            on = sum(r["ms"][f"ours/nchw/{keep}"] for r in rs)
            oc = sum(r["ms"][f"ours/cl/{keep}"] for r in rs)
            ob = sum(min(r["ms"][f"ours/nchw/{keep}"], r["ms"][f"ours/cl/{keep}"]) for r in rs)
            gbs = sum(r["io_bytes"] for r in rs) / (ob * 1e-3) / 1e9
            rows.append((model, dtype, str(batch), variant_label(variant), f"{dn:.4f}", f"{dc:.4f}", f"{db:.4f}", f"{on:.4f}",
                         f"{oc:.4f}", f"{ob:.4f}", f"{dn / on:.2f}x", f"{dc / oc:.2f}x", f"{db / ob:.2f}x",
                         f"{gbs:.0f}"))
    return rows


def summarize(results: list[dict], keeps: list[float]) -> str:
    """The summary rows as aligned text."""
    rows = summary_rows(results, keeps)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(results: list[dict], keeps: list[float], title: str) -> str:
    """The summary rows as a markdown table under ``title``."""
    rows = summary_rows(results, keeps)
    out = [title, "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(BUILTIN), help="timm model names")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--keeps", nargs="+", type=float, default=[1.0, 0.5, 0.29], help="kept fraction of taps")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--granularity", nargs="+", choices=GRANULARITIES, default=["element"],
                        help="mask variants timed at every keep ratio (see above)")
    parser.add_argument("--iters", type=int, default=20, help="calls per timed sample")
    parser.add_argument("--repeats", type=int, default=15, help="timed samples per measurement (median taken)")
    parser.add_argument("--mode", choices=["graph", "eager"], default="graph")
    parser.add_argument("--shapes", choices=["timm", "builtin"], default="timm",
                        help="read layer shapes from timm (falls back to builtin when timm is missing)")
    parser.add_argument("--json", help="write the per-layer results here")
    parser.add_argument("--markdown", help="write the summary table here as markdown")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_bench: needs a CUDA device (torch.cuda.is_available() is False)")
    torch.backends.cudnn.benchmark = True  # let cuDNN pick its fastest algorithm: the dense baseline at its best

    layers: list[Layer] = []
    for model in args.models:
        if args.shapes == "timm":
            try:
                layers += timm_layers(model)
                continue
            except ImportError:
                print("gpu_bench: timm not installed, using the built-in layer shapes", file=sys.stderr)
        if model not in BUILTIN:
            sys.exit(f"gpu_bench: no built-in shapes for {model!r}; install timm or pick from {sorted(BUILTIN)}")
        layers += builtin_layers(model)

    title = (f"# {datetime.datetime.now():%Y-%m-%d %H:%M}  {torch.cuda.get_device_name()}  torch {torch.__version__}"
             f"  mode={args.mode} iters={args.iters} repeats={args.repeats}  (ms per call, sums over each model's"
             " depth-wise layers; dense = F.conv2d groups=C (cuDNN); best = faster layout per layer)")
    print(title, flush=True)
    variants = [(keep, gran) for gran in args.granularity for keep in args.keeps]
    results = []
    with torch.no_grad():  # not inference_mode: build_plan reads weight._version, which inference tensors lack
        for layer in layers:
            for batch in args.batches:
                for dname in args.dtypes:
                    results.append(bench_layer(layer, batch, DTYPES[dname], variants, args))
            print(f"  {layer.model}[{layer.index}] C={layer.C} {layer.H}x{layer.W} k={layer.kernel} s={layer.stride}"
                  " done", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "mode": args.mode,
                       "results": results}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(results, variants, title.lstrip("# ")))
    print(summarize(results, variants))


if __name__ == "__main__":
    main()
