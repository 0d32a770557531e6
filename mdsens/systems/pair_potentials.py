"""Pair potentials of the builders, written so that every derivative that the
implicit derivatives need is finite: a smooth (C^1) float64 cutoff, and
self pairs (``r = 0`` in all-pairs sums) that contribute exactly zero."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax_md import energy as jmd_energy

Array = jax.Array


def lennard_jones_pair(r: Array, sigma: Array, epsilon: Array, **unused: Any) -> Array:
    return jmd_energy.lennard_jones(r, sigma, epsilon)


def morse_pair(r: Array, sigma: Array, epsilon: Array, alpha: Array, **unused: Any) -> Array:
    """jax-md's Morse energy with the square written as a product: its
    ``(...) ** 2.0`` has a NaN third derivative where the base is 0 (at
    ``r = sigma``, where self pairs are evaluated), and the mask then turns
    0 * NaN into NaN in every second derivative of x*."""
    base = 1.0 - jnp.exp(-alpha * (r - sigma))
    return epsilon * (base * base - 1.0)


def smooth_cutoff(pair_fn: Callable[..., Array], r_onset: float, r_cutoff: float) -> Callable[..., Array]:
    """``pair_fn`` times HOOMD-blue's C^1 switching function, 1 below ``r_onset`` and 0
    above ``r_cutoff``, in float64. jax-md's ``multiplicative_isotropic_cutoff`` squares
    the radii in float32: when the square of the cutoff is not a float32 (2.2**2), its
    switch does not reach 0 at ``r_cutoff`` and the pair force jumps there."""
    r_o2, r_c2 = r_onset**2, r_cutoff**2

    def cut_fn(r: Array, *args: Any, **kwargs: Any) -> Array:
        r2 = r**2
        switch = (r_c2 - r2) ** 2 * (r_c2 + 2 * r2 - 3 * r_o2) / (r_c2 - r_o2) ** 3
        switch = jnp.where(r < r_onset, 1.0, jnp.where(r < r_cutoff, switch, 0.0))
        return switch * pair_fn(r, *args, **kwargs)

    return cut_fn


def without_self_pairs(pair_fn: Callable[..., Array]) -> Callable[..., Array]:
    """``pair_fn`` that is 0 at ``r = 0``. ``smap.pair`` evaluates every ``i == j``
    pair at ``r = 0`` and masks the result afterwards, which leaves NaN in the
    derivative with respect to sigma and epsilon (``(sigma/r)^12`` at ``r = 0``)."""

    def safe_fn(r: Array, *args: Any, **kwargs: Any) -> Array:
        coincident = r == 0
        return jnp.where(coincident, 0.0, pair_fn(jnp.where(coincident, 1.0, r), *args, **kwargs))

    return safe_fn


