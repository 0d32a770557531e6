"""Independent oracles for tests, benchmarks and figures.

Nothing here shares code with mdsens's solvers: the references use dense
``jax.hessian`` / ``jax.jacfwd`` matrices and numpy's pseudo-inverse, or
re-relaxed finite differences.

- :func:`dense_reference`: ``dx*/dtheta = -pinv(H) d_theta grad E`` (and, on
  request, the second derivative from the third derivatives of the energy),
  the minimum-norm derivative, with the null space of ``H``.
- :func:`project`: remove components along a null space.
- :func:`finite_difference_sensitivity`: central differences of states
  re-relaxed from ``x*`` at ``params +- step * tangent``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from mdsens.minimisers import FIRE, Minimiser
from mdsens.relaxation import relax
from mdsens.systems.system import System

Array = jax.Array

#: The pseudo-inverse cut-off, relative to the largest eigenvalue of ``H``.
RCOND = 1e-8


@dataclasses.dataclass(frozen=True)
class DenseReference:
    """Dense derivatives of x* at a relaxed state, flattened over positions
    (``n = N dim``) and parameters (``P`` entries, in ``ravel_pytree`` order).

    Attributes:
        H: the Hessian ``(n, n)``, symmetrised.
        J: ``dx*/dtheta``, ``(n, P)``, minimum norm.
        X2: ``d2x*/dtheta2``, ``(n, P, P)`` (None unless asked for).
        eigenvalues: of ``H``, ascending.
        null_space: ``(n, k)`` orthonormal eigenvectors with
            ``|lambda| <= rcond * max|lambda|``.
    """

    H: np.ndarray
    J: np.ndarray
    X2: np.ndarray | None
    eigenvalues: np.ndarray
    null_space: np.ndarray


def dense_reference(
    energy_fn: Callable[[Array, Any], Array],
    positions: Array,
    params: Any,
    *,
    rcond: float = RCOND,
    second_order: bool = False,
) -> DenseReference:
    """The implicit function theorem with dense linear algebra. Differentiating
    ``g(x*(theta), theta) = 0`` (``g = grad_x E``) once and twice:

    .. math:: H J = -g_\\theta, \\qquad
              H X2_{ab} = -(T[J_a, J_b] + H_{\\theta_b} J_a + H_{\\theta_a} J_b + g_{\\theta_a\\theta_b}),

    with ``T`` the third derivative of E in x and ``H_theta`` the derivative of
    H in theta, solved with ``pinv(H)`` (minimum norm). The second-order system
    must be consistent (no right-hand side along the null space of ``H``, true
    at a relaxed state with the minimum-norm ``J``): ``ValueError`` otherwise."""
    H, g_t = (np.asarray(a) for a in _first_order(energy_fn, jnp.asarray(positions), params))
    H = 0.5 * (H + H.T)
    eigenvalues, vectors = np.linalg.eigh(H)
    pinv = np.linalg.pinv(H, rcond=rcond, hermitian=True)
    J = -pinv @ g_t
    null_space = vectors[:, np.abs(eigenvalues) <= rcond * np.max(np.abs(eigenvalues))]
    X2 = None
    if second_order:
        shape = positions.shape
        theta, unravel = ravel_pytree(params)

        def energy(x_flat: Array, t_flat: Array) -> Array:
            return energy_fn(x_flat.reshape(shape), unravel(t_flat))

        grad_x = jax.grad(energy, 0)
        hessian_x = jax.jacfwd(grad_x, 0)
        x = jnp.asarray(positions).reshape(-1)
        T, H_t, g_tt = (
            np.asarray(a)
            for a in jax.jit(
                lambda x, t: (
                    jax.jacfwd(hessian_x, 0)(x, t),
                    jax.jacfwd(hessian_x, 1)(x, t),
                    jax.jacfwd(jax.jacfwd(grad_x, 1), 1)(x, t),
                )
            )(x, theta)
        )
        terms = (
            np.einsum("ijk,ja,kb->iab", T, J, J),
            np.einsum("ijb,ja->iab", H_t, J),
            np.einsum("ija,jb->iab", H_t, J),
            g_tt,
        )
        rhs = sum(terms)
        inconsistency = np.linalg.norm(np.einsum("ik,iab->kab", null_space, rhs))
        if inconsistency > 1e-9 * sum(np.linalg.norm(term) for term in terms):
            raise ValueError(
                "dense_reference: the second-order system has a right-hand side along the null space "
                "of H, so no second derivative solves it (are the positions relaxed?)."
            )
        X2 = -np.einsum("ij,jab->iab", pinv, rhs)
    return DenseReference(H, J, X2, eigenvalues, null_space)


@jax.jit(static_argnums=0)
def _first_order(energy_fn: Callable[[Array, Any], Array], positions: Array, params: Any) -> tuple[Array, Array]:
    """``(H, d_theta grad_x E)`` as dense ``(n, n)`` and ``(n, P)`` matrices, built
    column by column from Hessian-vector products and mixed products in batches
    of 64 (memory O(64 n) beyond the result, also for all-pairs energies)."""
    size = positions.size
    theta, unravel = ravel_pytree(params)
    gradient = jax.grad(energy_fn)

    def hessian_column(e: Array) -> Array:
        return jax.jvp(lambda x: gradient(x, params), (positions,), (e.reshape(positions.shape),))[1].reshape(-1)

    def mixed_column(t: Array) -> Array:
        return jax.jvp(lambda q: gradient(positions, unravel(q)), (theta,), (t,))[1].reshape(-1)

    hessian = jax.lax.map(hessian_column, jnp.eye(size, dtype=positions.dtype), batch_size=64)
    mixed = jax.lax.map(mixed_column, jnp.eye(theta.size, dtype=theta.dtype), batch_size=64)
    return hessian.T, mixed.T


def project(field: Any, null_space: np.ndarray) -> np.ndarray:
    """``field`` without its components along the orthonormal columns of
    ``null_space`` (``(n, k)``); ``field`` has ``n`` entries in any shape."""
    flat = np.asarray(field).reshape(-1)
    return (flat - null_space @ (null_space.T @ flat)).reshape(np.shape(field))


def finite_difference_sensitivity(
    system: System,
    positions: Array,
    params: Any,
    tangent: Any,
    *,
    step: float = 1e-6,
    minimiser: Minimiser = FIRE(),
) -> np.ndarray:
    """``(x*(params + h t) - x*(params - h t)) / 2h``, both states re-relaxed from
    the relaxed ``positions`` with ``minimiser``; raises if either fails.
    Compare with a derivative after projecting out the zero modes."""

    def relaxed(sign: float) -> np.ndarray:
        shifted = jax.tree_util.tree_map(lambda p, t: p + sign * step * t, params, tangent)
        result = relax(system, positions, shifted, minimiser=minimiser)
        if not bool(result.converged):
            raise FloatingPointError(f"finite_difference_sensitivity: re-relaxation failed ({result.reason}).")
        return np.asarray(result.positions)

    return (relaxed(+1.0) - relaxed(-1.0)) / (2.0 * step)


def relative_error(actual: Any, expected: Any) -> float:
    """``|actual - expected| / |expected|`` (Frobenius norms)."""
    expected = np.asarray(expected)
    return float(np.linalg.norm(np.asarray(actual) - expected) / np.linalg.norm(expected))
