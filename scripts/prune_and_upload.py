#!/usr/bin/env python
"""Prune a timm model with DEPrune, save it as a timm model folder and optionally push it to the Hub.

The same as ``timm-deprune prune`` (see ``timm_deprune.cli``); every option is documented by ``--help``.

Example:
    python scripts/prune_and_upload.py mobilenetv2_100 --pretrained --output out/ --push-to-hub my-org/mnv2.deprune
    python scripts/prune_and_upload.py mobilenetv2_100 --random-init --output out/
"""
import sys

from timm_deprune.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["prune", *sys.argv[1:]]))
