r"""Energy, virial stress and pressure of a state, and the affine strain they are defined by.

An affine strain ``eps`` (symmetric, deformation gradient ``F = I + eps``) maps
the box to ``F box`` and positions to ``x F^T``. The virial (Cauchy) stress is
``(1/V) dE/deps`` at ``eps = 0``, tension positive, so a compressed packing has
``pressure = -tr(stress)/dim > 0``. For pair potentials it is
``(1/V) sum_pairs phi'(r) r_a r_b / r``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mdsens.systems.energy import Energy, EnergyFn
from mdsens.systems.system import System

Array = jax.Array


def check_deformable(system: System, caller: str) -> None:
    """Strain, stress and moduli need a periodic box in ``params["box"]``."""
    if system.box is None or not isinstance(system.params, Mapping) or "box" not in system.params:
        raise ValueError(
            f"{caller}: the system has no deformable periodic box (box=None, e.g. a free "
            "cluster), so strain, stress and elastic moduli are not defined for it."
        )


def strained_energy(energy_fn: EnergyFn) -> Callable[[Array, tuple[Any, Array]], Array]:
    """``E(u, (params, a))``: the energy after the affine strain ``eps = (a + a^T)/2``
    of box and positions, in reference coordinates ``u`` (``x = u F^T``)."""

    def strained(u: Array, theta: tuple[Any, Array]) -> Array:
        params, a = theta
        f = jnp.eye(u.shape[1], dtype=u.dtype) + 0.5 * (a + a.T)
        return energy_fn(u @ f.T, {**params, "box": f @ params["box"]})

    return strained


def energy(system: System, positions: Array, params: Any) -> Array:
    """Total energy ``system.energy(positions, params)``."""
    positions, params = system.inputs(positions, params)
    return system.energy(positions, params)


def volume(params: Any) -> Array:
    """Volume (area in 2D) of the periodic box ``params["box"]``."""
    return jnp.abs(jnp.linalg.det(params["box"]))


def stress(system: System, positions: Array, params: Any) -> Array:
    """Virial stress tensor ``(1/V) dE/deps`` (``dim x dim``, symmetric, tension
    positive); differentiable in positions and params. Raises ``ValueError`` for a
    system without a periodic box."""
    check_deformable(system, "stress")
    positions, params = system.inputs(positions, params)
    return _stress(system.energy, positions, params)


@jax.jit(static_argnums=0)
def _stress(energy: Energy, positions: Array, params: Any) -> Array:
    strained = strained_energy(energy)
    a0 = jnp.zeros((positions.shape[1],) * 2, positions.dtype)
    return jax.grad(lambda a: strained(positions, (params, a)))(a0) / volume(params)


def pressure(system: System, positions: Array, params: Any) -> Array:
    """``-tr(stress)/dim``: positive when the packing pushes on the box."""
    return -jnp.trace(stress(system, positions, params)) / positions.shape[1]
