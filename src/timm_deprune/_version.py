"""The installed version of timm-deprune, read once from the package metadata (one version source: pyproject.toml)."""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("timm-deprune")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
