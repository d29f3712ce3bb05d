#!/usr/bin/env python
"""Cost of one-shot calibration (issue 17): ``prune(..., calibration=...)`` time and peak memory.

    /usr/bin/time -v python scripts/calibration_cost.py                      # efficientnet_b0, 512 images at 224
    python scripts/calibration_cost.py --model mobilenetv2_100 --images 256

Random-init weights and random images: the cost does not depend on what the weights or pixels are. The time of one
plain forward of the dense model over the same images (channels-last, as calibration runs them) is measured in the
same process first, so the calibration time can also be read as a number of forwards, which depends far less on
what else the machine is running than seconds do.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import timm
from timm_deprune import DepruneConfig, prune


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="efficientnet_b0")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dw-ratio", type=float, default=0.71)
    ap.add_argument("--pw-ratio", type=float, default=0.3)
    ap.add_argument("--no-reference", action="store_true", help="skip the plain-forward reference timing")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    batches = [torch.randn(min(args.batch, args.images - i), 3, args.size, args.size)
               for i in range(0, args.images, args.batch)]
    print(f"load average at start: {os.getloadavg()}, torch threads {torch.get_num_threads()}")
    forward = None
    if not args.no_reference:
        with torch.no_grad():
            model(batches[0].contiguous(memory_format=torch.channels_last))  # warm-up
            t0 = time.perf_counter()
            for x in batches:
                model(x.contiguous(memory_format=torch.channels_last))
            forward = time.perf_counter() - t0
        print(f"one plain dense forward over the {args.images} images: {forward:.1f} s")
    t0 = time.perf_counter()
    res = prune(model, DepruneConfig.deprune_bh(dw_ratio=args.dw_ratio, pw_ratio=args.pw_ratio, importance="obs"),
                calibration=batches)
    wall = time.perf_counter() - t0
    cal = res.calibration
    print(f"prune with calibration: {wall:.1f} s wall (calibration {cal['calibration_seconds']:.1f} s"
          + (f" = {cal['calibration_seconds'] / forward:.1f} plain forwards" if forward else "")
          + f", decide {res.report.decide_seconds:.1f} s), peak RSS {cal['peak_rss_mb']:.0f} MiB")
    print(f"load average at end: {os.getloadavg()}")
    print(res.report.summary())
    print(cal)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
