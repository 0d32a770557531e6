"""mdsens: how mechanical equilibria of particle systems move when parameters change.

Relax a system (:func:`relax`), then differentiate the relaxed positions with
respect to any parameter by implicit differentiation (:func:`equilibrium`).
``mdsens.systems`` (which imports jax-md) is loaded on first use.
"""

import importlib
from typing import Any

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

__all__ = [
    "EquilibriumInfo",
    "RelaxResult",
    "SolveInfo",
    "ZeroModes",
    "custom_fixed_point",
    "custom_root",
    "energy_sensitivity",
    "equilibrium",
    "equilibrium_jvp",
    "equilibrium_vjp",
    "equilibrium_with_info",
    "hessian_diagonal",
    "max_force",
    "relax",
    "root_jvp",
    "root_vjp",
    "unrolled_relax",
]

_LAZY_SUBMODULES = ("systems", "plotting", "demo")


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"mdsens.{name}")
    raise AttributeError(f"module 'mdsens' has no attribute {name!r}")
