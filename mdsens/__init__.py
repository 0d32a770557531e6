"""mdsens: how mechanical equilibria of particle systems move when parameters change.

Relax a system (:func:`relax`), then differentiate the relaxed positions with
respect to any parameter by implicit differentiation (:func:`equilibrium`).

Everything is loaded on first use, so that ``import mdsens.cli`` (the
``mdsens`` command) answers ``--help`` without importing JAX or jax-md.
Submodules: ``systems``, ``observables``, ``neighbors``, ``jamming``,
``study``, ``linear_solve``, ``zero_modes``, ``plotting``, ``demo``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

# Public name -> the module that defines it.
_EXPORTS = {
    "EquilibriumInfo": "mdsens.equilibrium",
    "energy_sensitivity": "mdsens.equilibrium",
    "equilibrium": "mdsens.equilibrium",
    "equilibrium_jvp": "mdsens.equilibrium",
    "equilibrium_vjp": "mdsens.equilibrium",
    "equilibrium_with_info": "mdsens.equilibrium",
    "hessian_diagonal": "mdsens.equilibrium",
    "custom_fixed_point": "mdsens.implicit",
    "custom_root": "mdsens.implicit",
    "root_jvp": "mdsens.implicit",
    "root_vjp": "mdsens.implicit",
    "SolveInfo": "mdsens.linear_solve",
    "RelaxResult": "mdsens.relaxation",
    "max_force": "mdsens.relaxation",
    "relax": "mdsens.relaxation",
    "unrolled_relax": "mdsens.relaxation",
    "ZeroModes": "mdsens.zero_modes",
}
_SUBMODULES = (
    "systems",
    "observables",
    "neighbors",
    "jamming",
    "study",
    "linear_solve",
    "zero_modes",
    "plotting",
    "demo",
)

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from mdsens.equilibrium import (
        EquilibriumInfo,
        energy_sensitivity,
        equilibrium,
        equilibrium_jvp,
        equilibrium_vjp,
        equilibrium_with_info,
        hessian_diagonal,
    )
    from mdsens.implicit import custom_fixed_point, custom_root, root_jvp, root_vjp
    from mdsens.linear_solve import SolveInfo
    from mdsens.relaxation import RelaxResult, max_force, relax, unrolled_relax
    from mdsens.zero_modes import ZeroModes


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # The import system binds every imported submodule as an attribute of
        # its package: without this, importing the module mdsens.equilibrium
        # (as other modules do) would shadow the function mdsens.equilibrium.
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"mdsens.{name}")
    raise AttributeError(f"module 'mdsens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})
