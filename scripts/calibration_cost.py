#!/usr/bin/env python
"""Cost of one-shot calibration (issue 17): ``prune(..., calibration=...)`` time and peak memory.

    /usr/bin/time -v python scripts/calibration_cost.py                      # efficientnet_b0, 512 images at 224
    python scripts/calibration_cost.py --model mobilenetv2_100 --images 256

Random-init weights and random images: the cost does not depend on what the weights or pixels are.
"""
from __future__ import annotations

import argparse
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
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    batches = [torch.randn(min(args.batch, args.images - i), 3, args.size, args.size)
               for i in range(0, args.images, args.batch)]
    t0 = time.perf_counter()
    res = prune(model, DepruneConfig.deprune_bh(dw_ratio=args.dw_ratio, pw_ratio=args.pw_ratio, importance="obs"),
                calibration=batches)
    print(f"prune with calibration: {time.perf_counter() - t0:.1f} s wall")
    print(res.report.summary())
    print(res.calibration)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
