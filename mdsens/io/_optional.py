"""Optional dependencies of :mod:`mdsens.io`, imported on first use."""

from __future__ import annotations

import importlib
from types import ModuleType

#: The extra that installs them.
EXTRA = "mdsens[io]"


def require(module: str, caller: str) -> ModuleType:
    """``import module``, or an ``ImportError`` that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.split(".")[0]
        raise ImportError(
            f"{caller} needs the optional package {package!r}: pip install '{EXTRA}' (or pip install {package})."
        ) from error
