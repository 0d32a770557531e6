r"""The lowest curvature of an equilibrium: is it a minimum?

A vanishing force does not make a minimum: saddles and maxima have one too.
:func:`curvature_bounds` runs a few Lanczos iterations on the Hessian with the
zero modes projected out, ``P H P``, from Hessian-vector products, and
returns the lowest and largest Ritz values. Ritz values lie inside the
spectrum, so a lowest Ritz value below ``-SADDLE_RTOL`` times the largest
proves a direction of negative curvature (a saddle or maximum); the converse
is a strong indication, exact once the iterations span the space (small
systems).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mdsens.zero_modes import ZeroModes

Array = jax.Array

#: Lanczos iterations of the certificate (each one Hessian-vector product).
LANCZOS_ITERATIONS = 24
#: Curvatures above ``-SADDLE_RTOL * |H|`` count as zero (rattler-like floppiness).
SADDLE_RTOL = 1e-8


def curvature_bounds(
    hvp: Callable[[Array], Array], modes: ZeroModes, iterations: int = LANCZOS_ITERATIONS
) -> tuple[Array, Array]:
    """``(lowest, largest)`` Ritz values of ``P H P`` after ``iterations`` Lanczos
    steps with full reorthogonalisation, from a fixed random start (so results
    are reproducible). Branch-free: works under ``jit`` and ``vmap``."""
    shape = modes.mask.shape
    size = modes.mask.size
    steps = min(iterations, size)

    start = modes.project(jax.random.normal(jax.random.PRNGKey(1), shape, modes.mask.dtype)).reshape(-1)
    # Lanczos on (P H P) / s, s = max |H z|: squared norms of a tiny Hessian would underflow.
    unit = jnp.max(jnp.abs(hvp(start.reshape(shape))))
    unit = jnp.where(unit > 0, unit, 1.0)

    def operator(v: Array) -> Array:
        return modes.project(hvp(modes.project(v.reshape(shape))) / unit).reshape(-1)

    start_norm = jnp.linalg.norm(start)
    v = start / jnp.where(start_norm > 0, start_norm, 1.0)
    basis = jnp.zeros((steps, size), v.dtype)
    alphas = jnp.zeros(steps, v.dtype)
    betas = jnp.zeros(steps, v.dtype)

    def step(k, carry):
        basis, alphas, betas, v, beta = carry
        basis = basis.at[k].set(v)
        w = operator(v)
        alpha = jnp.vdot(v, w)
        # Full reorthogonalisation against every basis vector so far (rows past k are zero).
        w = w - basis.T @ (basis @ w)
        w = w - basis.T @ (basis @ w)
        beta = jnp.linalg.norm(w)
        # A breakdown (an invariant subspace found) leaves the remaining rows zero.
        v = jnp.where(beta > 1e-12 * jnp.abs(alpha), w / jnp.where(beta > 0, beta, 1.0), 0.0)
        return basis, alphas.at[k].set(alpha), betas.at[k].set(beta), v, beta

    _, alphas, betas, _, _ = jax.lax.fori_loop(0, steps, step, (basis, alphas, betas, v, jnp.zeros((), v.dtype)))
    tridiagonal = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    ritz = jnp.linalg.eigvalsh(tridiagonal) * unit
    return ritz[0], ritz[-1]


def is_saddle(lowest: Array, largest: Array) -> Array:
    """Whether the bounds prove negative curvature beyond rounding and floppiness."""
    return lowest < -SADDLE_RTOL * jnp.abs(largest)
