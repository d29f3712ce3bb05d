#!/usr/bin/env python
"""Channel padding (``pad_channels=8``) of a pruned model, in ONNX Runtime and in our runtime.

DEPrune-BH (element masks, dead channels removed: the library default) leaves odd internal channel counts; padding
them back to multiples of 8 with exact-zero channels keeps ONNX Runtime on its blocked-channel kernels
(``export_onnx``) and our GEMMs and depth-wise kernels off their ragged-tail paths (``optimize_for_inference``).
All variants of one model run in one process, interleaved like ``benchmark.py model`` (a 50 ms pause and one
untimed call before each timed group), medians. The dense model's export is the ORT reference.

    python scripts/padding.py [--models mobilenetv2_100 efficientnet_b0] [--batch 1 16] [--repeats 7]
"""
from __future__ import annotations

import argparse
import datetime
import tempfile

import torch

from bench_kernels import interleaved  # the scripts' shared interleaved timer


def main() -> None:
    import timm

    from timm_deprune import DepruneConfig, optimize_for_inference, prune
    from timm_deprune.inference.export import export_checked, ort_session

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mobilenetv2_100", "mobilenetv3_large_100", "efficientnet_b0"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dw-ratio", type=float, default=0.71)
    parser.add_argument("--pw-ratio", type=float, default=0.3)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    print(f"# pruned model padded vs unpadded ({datetime.date.today()}, {threads} threads, DEPrune-BH DW"
          f" {args.dw_ratio:.0%} / PW {args.pw_ratio:.0%}, element masks, dead channels removed)\n")
    print("| model | batch | blocks padded | ORT dense ms | ORT unpadded ms | ORT padded ms | ORT padded vs unpadded |"
          " ours unpadded ms | ours padded ms | ours padded vs unpadded | ours padded vs ORT padded |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            dense = timm.create_model(name).eval()
            pruned = prune(dense, DepruneConfig.deprune_bh(dw_ratio=args.dw_ratio, pw_ratio=args.pw_ratio)).model
            padded: dict = {}
            paths = {
                "dense": export_checked(dense, f"{tmp}/{name}_dense.onnx", pad_channels=None)[0],
                "unpadded": export_checked(pruned, f"{tmp}/{name}_unpadded.onnx", pad_channels=None)[0],
                "padded": export_checked(pruned, f"{tmp}/{name}_padded.onnx", pad_channels=8, padded=padded)[0],
            }
            sessions = {k: ort_session(p, threads) for k, p in paths.items()}
            ours = {"ours_unpadded": optimize_for_inference(pruned, pad_channels=None),
                    "ours_padded": optimize_for_inference(pruned)}
            for batch in args.batch:
                x = torch.randn(batch, 3, 224, 224)
                x_np, x_cl = x.numpy(), x.contiguous(memory_format=torch.channels_last)
                fns = {k: (lambda s=s: s.run(None, {"input": x_np})) for k, s in sessions.items()}
                fns.update({k: (lambda m=m: m(x_cl)) for k, m in ours.items()})
                with torch.inference_mode():
                    t = interleaved(fns, args.repeats, 0.2)
                ms = {k: v * 1e3 for k, v in t.items()}
                print(f"| {name} | {batch} | {len(padded)} | {ms['dense']:.2f} | {ms['unpadded']:.2f} |"
                      f" {ms['padded']:.2f} | {ms['unpadded'] / ms['padded']:.2f}x | {ms['ours_unpadded']:.2f} |"
                      f" {ms['ours_padded']:.2f} | {ms['ours_unpadded'] / ms['ours_padded']:.2f}x |"
                      f" {ms['padded'] / ms['ours_padded']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
