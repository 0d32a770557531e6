"""The paper's packing as a system of one parameter: the small particles' diameter.

A 2D periodic 50:50 bidisperse harmonic packing (diameters 1.0 and 1.4,
phi = 0.9), whose energy takes the small diameter theta as its only
parameter, so that derivatives and dense references are with respect to theta.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from mdsens import systems
from mdsens.systems import System

PHI, DIAMETERS, SEED = 0.9, (1.0, 1.4), 0


@dataclasses.dataclass(frozen=True)
class Packing:
    """``system``: energy ``E(x; theta)``, parameters ``theta``; ``base``: the
    builder's system it was made from (species diameters, for drawing)."""

    system: System
    base: System

    @property
    def theta(self) -> jax.Array:
        return self.system.params


@functools.lru_cache(maxsize=4)
def packing(n: int, phi: float = PHI, seed: int = SEED) -> Packing:
    """The packing of ``n`` discs, built once per process: its energy is the key of
    compiled programs."""
    base = systems.soft_sphere_packing(n, dim=2, phi=phi, diameters=DIAMETERS, seed=seed)

    def energy(x: jax.Array, theta: jax.Array) -> jax.Array:
        return base.energy(x, {**base.params, "diameters": base.params["diameters"].at[0].set(theta)})

    system = System.from_energy(
        energy, jnp.asarray(DIAMETERS[0]), base.positions, box=base.box, species=base.species, dt_max=base.dt_max
    )
    return Packing(system, base)
