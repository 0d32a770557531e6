r"""A pair energy summed over a given neighbor list, and its exact derivatives.

.. math:: E(x; \theta) = \sum_{p} \phi_p(|x_{i_p} - x_{j_p}|_{\mathrm{mic}}; \theta)

over the pairs ``p`` of a :class:`~mdsens.neighbors.lists.Neighbors` (no
validity check here: the list is taken as it is). The pair energy is given by
two functions: ``pair_energy(r, pair_params) -> e``, elementwise energies of
pairs at distances ``r`` (zero at and beyond the interaction range, twice
differentiable in ``r`` below it), and ``pair_params(params, i, j) -> dict`` of
per-pair parameters for index arrays ``i``, ``j``.

Derivatives: the gradient is a custom JVP rule (pair forces summed with
segment sums) and its own JVP is an explicit Hessian-vector product
(``[phi'' r^ r^T + phi'/r (I - r^ r^T)] (v_i - v_j)`` per pair, ``phi'`` and
``phi''`` by forward-mode differentiation of ``pair_energy``); derivatives with
respect to ``params`` and higher orders are ordinary autodiff of these. All are
exact.

Distances use the minimum image in the box read from ``params["box"]`` at call
time; positions are never wrapped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from mdsens.neighbors.lists import Neighbors, matvec_rows

Array = jax.Array
Params = dict[str, Array]
PairEnergy = Callable[[Array, Params], Array]
PairParams = Callable[[Params, Array, Array], Params]


def _take(a: Array, k: Array) -> Array:
    return a.at[k].get(mode="promise_in_bounds")


def _min_image(box: Array, inverse: Array, dr: Array) -> Array:
    """Minimum-image displacement (rows of ``dr``) in the box whose columns are box
    vectors: ``dr - box @ k`` with the integer image shift ``k = round(box^-1 dr)``.
    ``k`` is piecewise constant, so it is held out of differentiation: the
    derivatives are exact and cost nothing with respect to ``dr`` (identity) and
    little with respect to the box (``-k``)."""
    shift = jax.lax.stop_gradient(jnp.stack([jnp.round(c) for c in matvec_rows(inverse, dr)], axis=-1))
    return dr - jnp.stack(matvec_rows(box, shift), axis=-1)


def _geometry(positions: Array, params: Params, neighbors: Neighbors) -> tuple[Array, Array]:
    """Minimum-image pair vectors ``x_i - x_j`` and distances (1 for padding)."""
    box = params["box"]
    dr = _min_image(box, jnp.linalg.inv(box), _take(positions, neighbors.i) - _take(positions, neighbors.j))
    r = jnp.sqrt(jnp.where(neighbors.mask, jnp.sum(dr * dr, axis=-1), 1.0))
    return dr, r


def _radial(
    pair_energy: PairEnergy, pair_params: PairParams, r: Array, params: Params, neighbors: Neighbors, order: int
) -> tuple[Array, ...]:
    """``phi(r)`` and its first ``order`` derivatives, pair by pair."""
    pp = pair_params(params, neighbors.i, neighbors.j)
    phi = lambda rr: pair_energy(rr, pp)  # noqa: E731
    ones = jnp.ones_like(r)
    if order == 0:
        return (phi(r),)
    if order == 1:
        return jax.jvp(phi, (r,), (ones,))
    first = lambda rr: jax.jvp(phi, (rr,), (ones,))  # noqa: E731
    (e, d1), (_, d2) = jax.jvp(first, (r,), (ones,))
    return e, d1, d2


def _segment_sum(per_pair: Array, neighbors: Neighbors, n: int) -> Array:
    """``sum_{p: i_p = k} per_pair_p - sum_{p: j_p = k} per_pair_p`` for every particle k."""
    return jax.ops.segment_sum(per_pair, neighbors.i, n, indices_are_sorted=True) - jax.ops.segment_sum(
        per_pair, neighbors.j, n
    )


def _pair_blocks(
    pair_energy: PairEnergy, pair_params: PairParams, positions: Array, params: Params, neighbors: Neighbors
) -> tuple[Array, Array, Array]:
    """``(dr, a, b)``: the Hessian block of pair ``p`` is ``a_p dr_p dr_p^T + b_p I``
    (``a = (phi'' - phi'/r) / r^2``, ``b = phi'/r``; zero for padding)."""
    dr, r = _geometry(positions, params, neighbors)
    _, d1, d2 = _radial(pair_energy, pair_params, r, params, neighbors, 2)
    b = jnp.where(neighbors.mask, d1 / r, 0.0)
    a = jnp.where(neighbors.mask, (d2 - b) / (r * r), 0.0)
    return dr, a, b


# ------------------------------------------------------------------ values


def _energy_value(
    pair_energy: PairEnergy, pair_params: PairParams, positions: Array, params: Params, neighbors: Neighbors
) -> Array:
    _, r = _geometry(positions, params, neighbors)
    (e,) = _radial(pair_energy, pair_params, r, params, neighbors, 0)
    return jnp.sum(jnp.where(neighbors.mask, e, 0.0))


def _gradient_value(
    pair_energy: PairEnergy, pair_params: PairParams, positions: Array, params: Params, neighbors: Neighbors
) -> Array:
    dr, r = _geometry(positions, params, neighbors)
    _, d1 = _radial(pair_energy, pair_params, r, params, neighbors, 1)
    c = jnp.where(neighbors.mask, d1 / r, 0.0)
    return _segment_sum(c[:, None] * dr, neighbors, positions.shape[0])


def _hvp_value(
    pair_energy: PairEnergy,
    pair_params: PairParams,
    positions: Array,
    params: Params,
    neighbors: Neighbors,
    v: Array,
) -> Array:
    dr, a, b = _pair_blocks(pair_energy, pair_params, positions, params, neighbors)
    dv = _take(v, neighbors.i) - _take(v, neighbors.j)
    h = (a * jnp.sum(dr * dv, axis=-1))[:, None] * dr + b[:, None] * dv
    return _segment_sum(h, neighbors, positions.shape[0])


def hessian_diagonal(
    pair_energy: PairEnergy, pair_params: PairParams, positions: Array, params: Params, neighbors: Neighbors
) -> Array:
    """Exact diagonal of the Hessian of the energy over ``neighbors``, shape
    ``(N, dim)``, in O(N): the sum over the pairs of each particle of the
    diagonal of its pair blocks ``phi'' r^ r^T + phi'/r (I - r^ r^T)``."""
    n = positions.shape[0]
    dr, a, b = _pair_blocks(pair_energy, pair_params, positions, params, neighbors)
    diag = a[:, None] * dr * dr + b[:, None]
    return jax.ops.segment_sum(diag, neighbors.i, n, indices_are_sorted=True) + jax.ops.segment_sum(
        diag, neighbors.j, n
    )


def hessian_blocks(
    pair_energy: PairEnergy, pair_params: PairParams, positions: Array, params: Params, neighbors: Neighbors
) -> Array:
    """Exact diagonal blocks of the Hessian, shape ``(N, dim, dim)``, in O(N): block
    ``k`` is the sum over the pairs of particle ``k`` of their pair blocks
    ``phi'' r^ r^T + phi'/r (I - r^ r^T)``."""
    n, dim = positions.shape
    dr, a, b = _pair_blocks(pair_energy, pair_params, positions, params, neighbors)
    block = a[:, None, None] * dr[:, :, None] * dr[:, None, :] + b[:, None, None] * jnp.eye(dim, dtype=dr.dtype)
    return jax.ops.segment_sum(block, neighbors.i, n, indices_are_sorted=True) + jax.ops.segment_sum(
        block, neighbors.j, n
    )


# ------------------------------------------------------- differentiable sums


def _is_zero(tangent: Any) -> bool:
    leaves = jax.tree_util.tree_leaves(tangent, is_leaf=lambda t: isinstance(t, SymbolicZero))
    return all(isinstance(t, SymbolicZero) for t in leaves)


def _instantiate(tangent: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda t: jnp.zeros(t.aval.shape, t.aval.dtype) if isinstance(t, SymbolicZero) else t,  # type: ignore[attr-defined]
        tangent,
        is_leaf=lambda t: isinstance(t, SymbolicZero),
    )


def _jvp_rule(value_fn: Callable, position_tangent_fn: Callable) -> Callable:
    """A JVP rule: tangents along the parameters by autodiff of ``value_fn``
    (skipped when they are symbolic zeros, as for forces), along the positions
    by ``position_tangent_fn``; the list (integers) has none."""

    def rule(pair_energy, pair_params, primals, tangents):
        positions, params, neighbors = primals
        dx, dparams, _ = tangents
        if _is_zero(dparams):
            value = value_fn(pair_energy, pair_params, positions, params, neighbors)
            tangent = jnp.zeros_like(value)
        else:
            value, tangent = jax.jvp(
                lambda p: value_fn(pair_energy, pair_params, positions, p, neighbors),
                (params,),
                (_instantiate(dparams),),
            )
        if not _is_zero(dx):
            tangent = tangent + position_tangent_fn(pair_energy, pair_params, positions, params, neighbors, dx)
        return value, tangent

    return rule


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def energy(
    pair_energy: PairEnergy, pair_params: PairParams, positions: Array, params: Params, neighbors: Neighbors
) -> Array:
    """The pair energy summed over ``neighbors`` (differentiable to every order
    in ``positions`` and ``params``; the list is held fixed)."""
    return _energy_value(pair_energy, pair_params, positions, params, neighbors)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def gradient(
    pair_energy: PairEnergy, pair_params: PairParams, positions: Array, params: Params, neighbors: Neighbors
) -> Array:
    """The gradient of :func:`energy` with respect to ``positions``; its JVP
    along positions is the explicit Hessian-vector product."""
    return _gradient_value(pair_energy, pair_params, positions, params, neighbors)


def _energy_position_tangent(pair_energy, pair_params, positions, params, neighbors, dx):
    return jnp.vdot(gradient(pair_energy, pair_params, positions, params, neighbors), dx)


energy.defjvp(_jvp_rule(_energy_value, _energy_position_tangent), symbolic_zeros=True)
gradient.defjvp(_jvp_rule(_gradient_value, _hvp_value), symbolic_zeros=True)
