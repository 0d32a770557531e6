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
    """``pair_fn`` times a C^4 switch: 1 below ``r_onset``, 0 above ``r_cutoff``,
    and in between the smoothstep polynomial of degree 9 in
    ``u = (r - r_onset) / (r_cutoff - r_onset)``,

    .. math:: S(u) = 1 - u^5 (126 - 420 u + 540 u^2 - 315 u^3 + 70 u^4),

    whose first four derivatives vanish at both ends. Derivatives of x* of
    order k need the energy's derivative of order k + 1 to be continuous: a C^1
    switch (HOOMD's XPLOR) makes dx*/dtheta jump when a pair crosses the onset,
    and second derivatives of x* are then not the derivatives of the first."""
    width = r_cutoff - r_onset

    def cut_fn(r: Array, *args: Any, **kwargs: Any) -> Array:
        u = jnp.clip((r - r_onset) / width, 0.0, 1.0)
        switch = 1.0 - u**5 * (126.0 + u * (-420.0 + u * (540.0 + u * (-315.0 + u * 70.0))))
        return jnp.where(r < r_cutoff, switch * pair_fn(r, *args, **kwargs), 0.0)

    return cut_fn


def without_self_pairs(pair_fn: Callable[..., Array]) -> Callable[..., Array]:
    """``pair_fn`` that is 0 at ``r = 0``. ``smap.pair`` evaluates every ``i == j``
    pair at ``r = 0`` and masks the result afterwards, which leaves NaN in the
    derivative with respect to sigma and epsilon (``(sigma/r)^12`` at ``r = 0``)."""

    def safe_fn(r: Array, *args: Any, **kwargs: Any) -> Array:
        coincident = r == 0
        return jnp.where(coincident, 0.0, pair_fn(jnp.where(coincident, 1.0, r), *args, **kwargs))

    return safe_fn


