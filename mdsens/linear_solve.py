"""Matrix-free linear solvers that report how well they solved.

A solver here is a callable ``solve(matvec, b) -> (x, SolveInfo)`` on flat
float64 vectors. Build one with :func:`cg`, :func:`minres`, :func:`bicgstab`
or :func:`dense`. Each reports the true relative residual
``|b - A x| / |b|`` (one extra matrix-vector product, not the recurrence's
estimate), the iteration count, whether the tolerance was met, and, for CG,
whether it met negative curvature (``p^T A p <= 0``: the matrix is not
positive definite, e.g. the "minimum" is a saddle).

Solvers take an optional ``project`` (an orthogonal projector onto the
complement of the null space of ``A``, see :mod:`mdsens.zero_modes`), applied
to the right-hand side, to every product and to the result. For a symmetric
positive semi-definite ``A`` whose null space it removes, the result is the
minimum-norm solution ``A^+ b``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
MatVec = Callable[[Array], Array]
Projector = Callable[[Array], Array]
Solver = Callable[..., tuple[Array, "SolveInfo"]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SolveInfo:
    """Diagnostics of one linear solve (arrays, batched under vmap).

    Attributes:
        residual: true relative residual ``|b - A x| / |b|`` (0 when b = 0).
        iterations: iterations taken (0 for the dense solver).
        converged: ``residual <= rtol`` (or the absolute residual ``<= atol``).
        negative_curvature: CG found a direction with ``p^T A p <= 0``.
    """

    residual: Array
    iterations: Array
    converged: Array
    negative_curvature: Array


def _identity(v: Array) -> Array:
    return v


def _safe_div(a: Array, b: Array) -> Array:
    return jnp.where(b != 0, a / jnp.where(b != 0, b, 1.0), 0.0)


def _finish(matvec, b, x, iterations, negative_curvature, rtol, atol) -> tuple[Array, SolveInfo]:
    b_norm = jnp.linalg.norm(b)
    r_norm = jnp.linalg.norm(b - matvec(x))
    residual = _safe_div(r_norm, b_norm)
    converged = ((r_norm <= rtol * b_norm) | (r_norm <= atol)) & jnp.all(jnp.isfinite(x))
    converged = converged & ~negative_curvature
    return x, SolveInfo(residual, jnp.asarray(iterations, jnp.int32), converged, negative_curvature)


def _max_iter(max_iter: int | None, b: Array) -> int:
    return 10 * b.size if max_iter is None else max_iter


def _project_rhs(project: Projector, b: Array) -> Array:
    """``P b``, or exactly zero if ``b`` lies along the zero modes (e.g. a cotangent
    that is a rigid translation): its projection is then rounding noise, itself
    along the zero modes, on which no relative tolerance can be met (CG would
    report zero curvature as negative curvature)."""
    b_norm = jnp.linalg.norm(b)
    b = project(b)
    return jnp.where(jnp.linalg.norm(b) <= b.size * jnp.finfo(b.dtype).eps * b_norm, 0.0, b)


def _setup(matvec, b, project, preconditioner, rtol, atol):
    """The projected operator ``P A P``, the projected preconditioner, ``P b`` and
    the absolute residual tolerance."""
    A = lambda v: project(matvec(project(v)))  # noqa: E731
    M = _identity if preconditioner is None else preconditioner(A)
    b = _project_rhs(project, b)
    return A, lambda r: project(M(r)), b, jnp.maximum(rtol * jnp.linalg.norm(b), atol)


def cg(
    rtol: float = 1e-10,
    atol: float = 0.0,
    max_iter: int | None = None,
    preconditioner: Callable[[Array], MatVec] | None = None,
) -> Solver:
    """Conjugate gradients for symmetric positive (semi-)definite ``A``.

    Args:
        rtol, atol: stop when ``|r| <= max(rtol |b|, atol)``.
        max_iter: most iterations (default ``10 * len(b)``).
        preconditioner: ``preconditioner(matvec) -> M`` returning a symmetric
            positive definite approximation ``M ~ A^-1`` as a function, e.g.
            :func:`jacobi`.
    """

    def solve(matvec: MatVec, b: Array, project: Projector = _identity) -> tuple[Array, SolveInfo]:
        A, precondition, b, tol = _setup(matvec, b, project, preconditioner, rtol, atol)
        z = precondition(b)
        init = (jnp.zeros_like(b), b, z, jnp.vdot(b, z), 0, False)

        def keep_going(state):
            _, r, _, _, k, negative = state
            return (jnp.linalg.norm(r) > tol) & (k < _max_iter(max_iter, b)) & ~negative

        def step(state):
            x, r, p, rz, k, _ = state
            Ap = A(p)
            curvature = jnp.vdot(p, Ap)
            negative = curvature <= 0.0
            step_length = _safe_div(rz, curvature)
            x = x + step_length * p
            r = r - step_length * Ap
            z = precondition(r)
            rz_new = jnp.vdot(r, z)
            p = z + _safe_div(rz_new, rz) * p
            return x, r, p, rz_new, k + 1, negative

        x, _, _, _, k, negative = jax.lax.while_loop(keep_going, step, init)
        return _finish(A, b, project(x), k, negative, rtol, atol)

    return solve


def minres(
    rtol: float = 1e-10,
    atol: float = 0.0,
    max_iter: int | None = None,
    preconditioner: Callable[[Array], MatVec] | None = None,
) -> Solver:
    """MINRES (Paige and Saunders 1975) for symmetric, possibly indefinite ``A``.
    The preconditioner, if any, must be symmetric positive definite."""

    def solve(matvec: MatVec, b: Array, project: Projector = _identity) -> tuple[Array, SolveInfo]:
        A, precondition, b, tol = _setup(matvec, b, project, preconditioner, rtol, atol)
        y = precondition(b)
        beta1 = jnp.sqrt(jnp.maximum(jnp.vdot(b, y), 0.0))
        zeros = jnp.zeros_like(b)
        # (x, r1, r2, y, w, w2, beta, old_beta, dbar, epsilon, phibar, cs, sn, k)
        init = (zeros, b, b, y, zeros, zeros, beta1, jnp.zeros_like(beta1), 0.0 * beta1,
                0.0 * beta1, beta1, -1.0 + 0.0 * beta1, 0.0 * beta1, 0)

        def keep_going(s):
            # phibar estimates the preconditioned residual norm; the true one is checked at the end.
            return (s[10] > tol * _safe_div(beta1, jnp.linalg.norm(b))) & (s[13] < _max_iter(max_iter, b)) & (s[6] > 0)

        def step(s):
            x, r1, r2, y, w, w2, beta, old_beta, dbar, epsilon, phibar, cs, sn, k = s
            v = y / beta
            y = A(v)
            y = jnp.where(k > 0, y - _safe_div(beta, old_beta) * r1, y)
            alpha = jnp.vdot(v, y)
            y = y - (alpha / beta) * r2
            r1, r2 = r2, y
            y = precondition(r2)
            old_beta, beta = beta, jnp.sqrt(jnp.maximum(jnp.vdot(r2, y), 0.0))
            old_epsilon = epsilon
            delta = cs * dbar + sn * alpha
            gbar = sn * dbar - cs * alpha
            epsilon = sn * beta
            dbar = -cs * beta
            gamma = jnp.maximum(jnp.hypot(gbar, beta), jnp.finfo(b.dtype).tiny)
            cs, sn = gbar / gamma, beta / gamma
            phi = cs * phibar
            phibar = sn * phibar
            w1, w2 = w2, w
            w = (v - old_epsilon * w1 - delta * w2) / gamma
            x = x + phi * w
            return x, r1, r2, y, w, w2, beta, old_beta, dbar, epsilon, phibar, cs, sn, k + 1

        state = jax.lax.while_loop(keep_going, step, init)
        return _finish(A, b, project(state[0]), state[13], False, rtol, atol)

    return solve


def bicgstab(
    rtol: float = 1e-10,
    atol: float = 0.0,
    max_iter: int | None = None,
    preconditioner: Callable[[Array], MatVec] | None = None,
) -> Solver:
    """BiCGSTAB (van der Vorst 1992) for non-symmetric ``A``, e.g. optimality
    conditions that are not the gradient of an energy."""

    def solve(matvec: MatVec, b: Array, project: Projector = _identity) -> tuple[Array, SolveInfo]:
        A, precondition, b, tol = _setup(matvec, b, project, preconditioner, rtol, atol)
        zeros = jnp.zeros_like(b)
        one = jnp.ones((), b.dtype)
        init = (zeros, b, zeros, zeros, one, one, one, 0)

        def keep_going(s):
            return (jnp.linalg.norm(s[1]) > tol) & (s[7] < _max_iter(max_iter, b))

        def step(s):
            x, r, p, v, rho, alpha, omega, k = s
            rho_new = jnp.vdot(b, r)
            beta = _safe_div(rho_new, rho) * _safe_div(alpha, omega)
            p = r + beta * (p - omega * v)
            p_hat = precondition(p)
            v = A(p_hat)
            alpha = _safe_div(rho_new, jnp.vdot(b, v))
            s_vec = r - alpha * v
            s_hat = precondition(s_vec)
            t = A(s_hat)
            omega = _safe_div(jnp.vdot(t, s_vec), jnp.vdot(t, t))
            x = x + alpha * p_hat + omega * s_hat
            r = s_vec - omega * t
            return x, r, p, v, rho_new, alpha, omega, k + 1

        state = jax.lax.while_loop(keep_going, step, init)
        return _finish(A, b, project(state[0]), state[7], False, rtol, atol)

    return solve


def dense(rcond: float = 1e-10, rtol: float = 1e-8, atol: float = 0.0) -> Solver:
    """Dense pseudo-inverse: builds ``A`` column by column (``n`` products, ``n^2``
    memory) and applies ``pinv(A, rcond)``. For small systems and references;
    ``rtol``/``atol`` only decide the ``converged`` flag."""

    def solve(matvec: MatVec, b: Array, project: Projector = _identity) -> tuple[Array, SolveInfo]:
        A = lambda v: project(matvec(project(v)))  # noqa: E731
        b = _project_rhs(project, b)
        matrix = jax.vmap(A, out_axes=1)(jnp.eye(b.size, dtype=b.dtype))
        x = project(jnp.linalg.pinv(matrix, rtol=rcond, hermitian=False) @ b)
        return _finish(A, b, x, 0, False, rtol, atol)

    return solve


def jacobi(diagonal: Array) -> Callable[[MatVec], MatVec]:
    """Jacobi preconditioner ``M = diag(A)^-1`` from a given diagonal (entries that
    are not positive, e.g. of rattlers, are left unscaled). The diagonal may have
    the shape of the positions, as :func:`mdsens.hessian_diagonal` returns it; the
    solvers work on flat vectors."""
    diagonal = jnp.ravel(diagonal)
    inverse = jnp.where(diagonal > 0, 1.0 / jnp.where(diagonal > 0, diagonal, 1.0), 1.0)
    return lambda matvec: (lambda r: inverse * r)
