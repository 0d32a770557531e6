"""Pair potentials of the builders, written so that every derivative that the
implicit derivatives need is finite: a smooth (C^1) float64 cutoff, and
self pairs (``r = 0`` in all-pairs sums) that contribute exactly zero."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
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


def soft_sphere_pair(r: Array, sigma: Array, epsilon: Array, alpha: Array, **unused: Any) -> Array:
    r"""Soft spheres :math:`\frac{\epsilon}{\alpha}(1 - r/\sigma)^\alpha` for
    :math:`r < \sigma`, zero beyond: jax-md's ``soft_sphere`` with the power
    taken by :func:`overlap_power` (cheap for the common integer exponents, and
    exact in every derivative, ``alpha`` included)."""
    u = 1.0 - r / sigma
    overlap = u > 0
    # 1 where there is no overlap: every derivative stays finite there (log 1 = 0).
    return jnp.where(overlap, epsilon / alpha * overlap_power(jnp.where(overlap, u, 1.0), alpha), 0.0)


#: Exponents that :func:`overlap_power` takes by multiplication instead of ``pow``.
_INTEGER_EXPONENTS = (0.0, 1.0, 2.0, 3.0)


def _power_value(u: Array, a: Array) -> Array:
    if jnp.ndim(a) != 0:
        return u**a
    # One branch runs (a scalar predicate): the harmonic force evaluates no pow.
    branches = [lambda: jnp.ones_like(u), lambda: u, lambda: u * u, lambda: u * u * u, lambda: u**a]
    matches = a == jnp.asarray(_INTEGER_EXPONENTS)
    index = jnp.where(jnp.any(matches), jnp.argmax(matches), len(_INTEGER_EXPONENTS))
    return jax.lax.switch(index, branches)


@jax.custom_jvp
def overlap_power(u: Array, a: Array) -> Array:
    r""":math:`u^a` for ``u > 0``, by multiplication when ``a`` is a scalar in
    {0, 1, 2, 3}, else by ``pow``; the same value up to rounding. Its JVP,
    :math:`a u^{a-1} \dot u + u^a \log(u) \dot a`, is written with
    :func:`overlap_power` again, so derivatives of every order in ``u`` stay
    cheap, and the one in ``a`` (the log term) is computed only when ``a`` has a
    tangent."""
    return _power_value(u, a)


def _overlap_power_jvp(primals: tuple[Array, Array], tangents: tuple[Any, Any]) -> tuple[Array, Array]:
    u, a = primals
    du, da = tangents
    value = overlap_power(u, a)
    tangent = jnp.zeros_like(value)
    if not isinstance(du, SymbolicZero):
        tangent = tangent + a * overlap_power(u, a - 1.0) * du
    if not isinstance(da, SymbolicZero):
        tangent = tangent + value * jnp.log(u) * da
    return value, tangent


overlap_power.defjvp(_overlap_power_jvp, symbolic_zeros=True)


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
