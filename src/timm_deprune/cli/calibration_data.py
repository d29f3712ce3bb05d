"""Calibration images for ``timm-deprune prune --calibration-dir DIR`` (ARCHITECTURE.md §9).

Any folder timm's ``create_dataset`` reads (images in it or in class sub-folders; labels are not used), transformed
with timm's eval transforms from the model's data config, read once into batches with a progress bar.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn

import timm.data

from .sources import CliError

__all__ = ["calibration_batches"]


def calibration_batches(model: nn.Module, directory: Path, samples: Optional[int], batch_size: int,
                        workers: int = 0) -> list[torch.Tensor]:
    """At most ``samples`` images of ``directory`` as ``[N, C, H, W]`` batches (``samples`` None: all of them).

    Raises:
        CliError: the folder holds no image timm can read.
    """
    from tqdm import tqdm

    config = timm.data.resolve_data_config({}, model=model)
    try:
        dataset = timm.data.create_dataset("", root=str(directory), split="", is_training=False)
    except Exception as e:  # timm raises RuntimeError / FileNotFoundError for an empty or unreadable folder
        raise CliError(f"--calibration-dir {directory}: timm cannot read images there ({e})") from e
    if len(dataset) == 0:
        raise CliError(f"--calibration-dir {directory} holds no image timm can read")
    dataset.transform = timm.data.create_transform(**config, is_training=False)
    count = len(dataset) if samples is None else min(samples, len(dataset))
    subset = torch.utils.data.Subset(dataset, range(count))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers)
    batches = []
    with tqdm(total=count, desc="calibration images", unit="img", file=sys.stderr, disable=None,
              leave=False, dynamic_ncols=True) as bar:
        for x, _ in loader:
            batches.append(x)
            bar.update(len(x))
    return batches
