"""Loading the native extension ``timm_deprune._C`` once, with one clear error when it is missing."""
from __future__ import annotations

import functools
from types import ModuleType

__all__ = ["load_extension", "backend_available"]


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ModuleType | None, str]:
    try:
        from .. import _C  # noqa: PLC0415
    except ImportError as exc:  # a broken or missing build: report it once, where it is needed
        return None, f"{type(exc).__name__}: {exc}"
    return _C, ""


def load_extension() -> ModuleType:
    """The compiled module; raises ImportError naming the cause when it could not be loaded."""
    module, error = _load()
    if module is None:
        raise ImportError(
            "timm_deprune._C (the native sparse kernels) could not be loaded: "
            f"{error}. Reinstall with `pip install .` from a source checkout (needs a C++ compiler)."
        )
    return module


def backend_available() -> bool:
    """True when the native kernels can be used."""
    return _load()[0] is not None
