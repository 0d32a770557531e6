"""Observables of the relaxed state ``x*(params)`` as differentiable functions of the parameters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from mdsens.equilibria import equilibrium
from mdsens.systems.system import System

Array = jax.Array


def relaxed_observable(
    system: System, observable: Callable[..., Array], positions: Array, **equilibrium_options: Any
) -> Callable[[Any], Array]:
    """``params -> observable(system, x*(params), params)`` with ``x*`` relaxed from
    ``positions`` by :func:`mdsens.equilibrium` (with ``equilibrium_options``:
    ``minimiser``, ``adjoint``, ``throw``), for ``jax.jvp`` / ``jax.grad``, e.g.
    ``jax.grad(relaxed_observable(s, pressure, x0))(params)["epsilon"]``."""

    def evaluate(params: Any) -> Array:
        x = equilibrium(system, params, positions=positions, **equilibrium_options)
        return observable(system, x, params)

    return evaluate
