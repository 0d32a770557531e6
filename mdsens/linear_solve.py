"""Matrix-free linear solvers that report how well they solved.

A solver is a value (:class:`CG`, :class:`MINRES`, :class:`BiCGSTAB`,
:class:`Dense`) and a callable ``solver(matvec, b, project) -> (x, SolveInfo)``
on flat float64 vectors. Each reports the true relative residual
``|b - A x| / |b|`` (one extra matrix-vector product, not the recurrence's
estimate), the iteration count, whether the tolerance was met and, for CG,
whether it met negative curvature (``p^T A p <= 0``: the matrix is not
positive definite, e.g. the "minimum" is a saddle).

``project`` is an orthogonal projector onto the complement of the null space
of ``A`` (see :mod:`mdsens.zero_modes`), applied to the right-hand side, to
every product, to every preconditioned residual and to the result. For a symmetric positive semi-definite ``A``
whose null space it removes, the result is the minimum-norm solution
``A^+ b``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mdsens._results import Status
from mdsens._values import count, nonnegative_float, option, positive_float, set_field

Array = jax.Array
MatVec = Callable[[Array], Array]
Projector = Callable[[Array], Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SolveInfo:
    """Diagnostics of one linear solve (arrays, batched under vmap).

    Attributes:
        residual: true relative residual ``|b - A x| / |b|`` (0 when b = 0).
        iterations: iterations taken (0 for the dense solver).
        converged: ``residual <= rtol`` (or the absolute residual ``<= atol``);
            for :class:`Dense`, also when the residual lies in the numerical
            null space (the pseudo-inverse answer of an inconsistent system).
        negative_curvature: CG met a direction with ``p^T A p < -null_rtol s |p|^2``
            (``s``: the largest Rayleigh quotient seen, an estimate of ``|A|``).
        singular: CG met a direction in the numerical null space,
            ``|p^T A p| <= null_rtol s |p|^2``, that the zero modes do not cover.
        lowest_curvature: CG: the lowest Rayleigh quotient ``p^T A p / p^T p``
            of its search directions (NaN for the other solvers).
    """

    residual: Array
    iterations: Array
    converged: Array
    negative_curvature: Array
    singular: Array
    lowest_curvature: Array

    @property
    def status(self) -> Array:
        """A :class:`mdsens.Status` code: converged, negative_curvature, singular,
        nonfinite or not_converged."""
        failed = jnp.where(jnp.isfinite(self.residual), Status.not_converged, Status.nonfinite)
        failed = jnp.where(self.singular, Status.singular, failed)
        failed = jnp.where(self.negative_curvature, Status.negative_curvature, failed)
        return jnp.where(self.converged, Status.converged, failed).astype(jnp.int32)

    @property
    def reason(self) -> Any:
        """The name of :attr:`status` (a numpy array of names for a batch)."""
        return Status.names(self.status)


def _identity(v: Array) -> Array:
    return v


def _safe_div(a: Array, b: Array) -> Array:
    return jnp.where(b != 0, a / jnp.where(b != 0, b, 1.0), 0.0)


def _finish(
    matvec,
    b,
    x,
    iterations,
    rtol,
    atol,
    negative_curvature=False,
    singular=False,
    lowest_curvature=jnp.nan,
    null_rtol=0.0,
    scale=0.0,
) -> tuple[Array, SolveInfo]:
    """Diagnostics from the true residual ``r = b - A x``. With ``null_rtol`` and
    ``scale`` (``|A|``), a residual in the numerical null space (``|A r| <=
    null_rtol scale |r|``) also counts as converged: for the pseudo-inverse
    ``x`` is then the least-squares solution."""
    b_norm = jnp.linalg.norm(b)
    r = b - matvec(x)
    r_norm = jnp.linalg.norm(r)
    residual = _safe_div(r_norm, b_norm)
    in_null_space = jnp.linalg.norm(matvec(r)) <= null_rtol * scale * r_norm if null_rtol else False
    converged = ((r_norm <= rtol * b_norm) | (r_norm <= atol) | in_null_space) & jnp.all(jnp.isfinite(x))
    converged = converged & ~negative_curvature & ~singular
    return x, SolveInfo(
        residual,
        jnp.asarray(iterations, jnp.int32),
        converged,
        jnp.asarray(negative_curvature),
        jnp.asarray(singular),
        jnp.asarray(lowest_curvature, b.dtype),
    )


def _project_rhs(project: Projector, b: Array) -> Array:
    """``P b``, or exactly zero if ``b`` lies along the zero modes (e.g. a cotangent
    that is a rigid translation): its projection is then rounding noise, itself
    along the zero modes, on which no relative tolerance can be met (CG would
    report zero curvature as negative curvature)."""
    b_norm = jnp.linalg.norm(b)
    b = project(b)
    return jnp.where(jnp.linalg.norm(b) <= b.size * jnp.finfo(b.dtype).eps * b_norm, 0.0, b)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class Jacobi:
    """Jacobi preconditioner ``M = diag(A)^-1`` from a given diagonal, e.g. the
    exact one of :meth:`mdsens.System.hessian_diagonal`. Entries that are not
    positive (rattlers) are left unscaled. The diagonal may have the shape of
    the positions; the solvers work on flat vectors. It holds an array, so it
    compares and hashes by identity: build it once per state."""

    diagonal: Any

    def __call__(self, r: Array) -> Array:
        diagonal = jnp.ravel(self.diagonal)
        inverse = jnp.where(diagonal > 0, 1.0 / jnp.where(diagonal > 0, diagonal, 1.0), 1.0)
        return inverse * r


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class BlockJacobi:
    """Block-Jacobi preconditioner ``M = blockdiag(A_kk)^+`` from the ``(N, dim, dim)``
    per-particle diagonal blocks of ``A`` (e.g. the exact ones of
    :meth:`mdsens.System.hessian_blocks`, O(N) for neighbor lists). Each block
    is inverted on its eigenvalues above ``rcond`` times the largest of all
    blocks; the others (a rattler's zero block, the null direction of a
    particle with one contact) map to zero, directions that are in the null
    space of a positive semi-definite ``A``, so the minimum-norm answer is kept.
    Unlike :class:`Jacobi` it also captures each particle's anisotropy (the
    ``r^ r^T`` terms of its contacts). It holds arrays, so it compares and
    hashes by identity: build it once per state."""

    blocks: Any
    rcond: float = dataclasses.field(default=1e-10, metadata=dict(static=True))

    def __call__(self, r: Array) -> Array:
        blocks = jnp.asarray(self.blocks)
        eigenvalues, vectors = jnp.linalg.eigh(0.5 * (blocks + jnp.swapaxes(blocks, -1, -2)))
        cutoff = self.rcond * jnp.max(jnp.abs(eigenvalues))
        inverse = jnp.where(eigenvalues > cutoff, 1.0 / jnp.where(eigenvalues > cutoff, eigenvalues, 1.0), 0.0)
        rows = r.reshape(blocks.shape[:2])
        projected = jnp.einsum("nji,nj->ni", vectors, rows) * inverse
        return jnp.einsum("nij,nj->ni", vectors, projected).reshape(r.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class TwoLevel:
    r"""Additive two-level preconditioner: block Jacobi plus a coarse correction,

    .. math:: M r = B^+ r + Z E^+ Z^T r, \qquad E = Z^T A Z,

    with ``B`` the per-particle diagonal blocks (:class:`BlockJacobi`, the
    ``smoother``) and ``Z`` the rigid translations of aggregates of particles
    (``aggregates[i]``: particle ``i``'s aggregate). Block Jacobi treats what
    varies from particle to particle; the coarse space carries the long
    wavelength displacements that make CG's iterations grow with N. ``E^+``
    (``coarse_inverse``, dense) drops ``E``'s null space (rigid translations of
    the whole system), which the solvers project out anyway. Build it with
    :meth:`mdsens.System.two_level_preconditioner` (see
    :mod:`mdsens.coarse_space`). It holds arrays, so it compares and hashes by
    identity: build it once per state."""

    smoother: BlockJacobi
    aggregates: Any
    coarse_inverse: Any

    def __call__(self, r: Array) -> Array:
        inverse = jnp.asarray(self.coarse_inverse)
        dim = jnp.shape(self.smoother.blocks)[-1]
        n_aggregates = inverse.shape[0] // dim
        coarse = jax.ops.segment_sum(r.reshape(-1, dim), self.aggregates, n_aggregates).reshape(-1)
        correction = (inverse @ coarse).reshape(n_aggregates, dim)[self.aggregates]
        return self.smoother(r) + correction.reshape(r.shape)


#: What the Krylov solvers accept as ``preconditioner``.
Preconditioner = Jacobi | BlockJacobi | TwoLevel


@dataclasses.dataclass(frozen=True)
class _Iterative:
    """Shared fields and checks of the Krylov solvers: stop when
    ``|r| <= max(rtol |b|, atol)`` or after ``max_iter`` iterations (default
    ``10 * len(b)``); an optional preconditioner."""

    rtol: float = 1e-10
    atol: float = 0.0
    max_iter: int | None = None
    preconditioner: Preconditioner | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        set_field(self, "rtol", positive_float(self.rtol, "rtol", owner))
        set_field(self, "atol", nonnegative_float(self.atol, "atol", owner))
        if self.max_iter is not None:
            set_field(self, "max_iter", count(self.max_iter, "max_iter", owner))
        if self.preconditioner is not None and not isinstance(self.preconditioner, (Jacobi, BlockJacobi, TwoLevel)):
            raise ValueError(
                f"{owner}: preconditioner must be None, a Jacobi, a BlockJacobi or a TwoLevel; "
                f"got {self.preconditioner!r}."
            )

    def _iterations(self, b: Array) -> int | Array:
        return 10 * b.size if self.max_iter is None else self.max_iter

    def _setup(self, matvec: MatVec, b: Array, project: Projector):
        """The projected operator ``P A P``, the projected preconditioner, ``P b``
        and the absolute residual tolerance. Every vector the solvers multiply
        by ``A`` is already projected (a preconditioned residual, a combination
        of those, or the projected answer), so ``P A P v = P A v`` there: one
        projection per product, not two (each reads the zero modes' basis,
        which at large N costs a quarter of a Hessian-vector product)."""
        A = lambda v: project(matvec(v))  # noqa: E731
        M = self.preconditioner
        # Residuals are combinations of P b and products P A v: projected already.
        precondition = _identity if M is None else lambda r: project(M(r))
        b = _project_rhs(project, b)
        return A, precondition, b, jnp.maximum(self.rtol * jnp.linalg.norm(b), self.atol)


@option()
class CG(_Iterative):
    """Conjugate gradients for symmetric positive (semi-)definite ``A``.

    Curvatures are judged relative to the largest Rayleigh quotient seen so
    far, ``s ~ |A|``: a search direction with ``p^T A p < -null_rtol s |p|^2``
    is negative curvature (a saddle, status ``negative_curvature``); one with
    ``|p^T A p| <= null_rtol s |p|^2`` lies in the numerical null space (e.g.
    the floppy modes of a packing below jamming, eigenvalues ~1e-12 |A|, that
    no zero-mode projection covers) and ends the solve as ``singular``: CG
    cannot give the minimum-norm answer there; :class:`Dense` can."""

    null_rtol: float = 1e-9

    def __post_init__(self) -> None:
        super().__post_init__()
        set_field(self, "null_rtol", nonnegative_float(self.null_rtol, "null_rtol", "CG"))

    def __call__(self, matvec: MatVec, b: Array, project: Projector = _identity) -> tuple[Array, SolveInfo]:
        A, precondition, b, tol = self._setup(matvec, b, project)
        z = precondition(b)
        zero = jnp.zeros((), b.dtype)
        # (x, r, p, rz, k, negative, singular, lowest, scale)
        init = (jnp.zeros_like(b), b, z, jnp.vdot(b, z), 0, False, False, zero + jnp.inf, zero)
        max_iter = self._iterations(b)

        def keep_going(state):
            _, r, _, _, k, negative, null, _, _ = state
            return (jnp.linalg.norm(r) > tol) & (k < max_iter) & ~negative & ~null

        def step(state):
            x, r, p, rz, k, _, _, lowest, scale = state
            Ap = A(p)
            curvature = jnp.vdot(p, Ap)
            quotient = _safe_div(curvature, jnp.vdot(p, p))
            scale = jnp.maximum(scale, jnp.abs(quotient))
            null = jnp.abs(quotient) <= self.null_rtol * scale
            negative = quotient < -self.null_rtol * scale
            step_length = jnp.where(null | negative, 0.0, _safe_div(rz, curvature))
            x = x + step_length * p
            r = r - step_length * Ap
            z = precondition(r)
            rz_new = jnp.vdot(r, z)
            p = z + _safe_div(rz_new, rz) * p
            return x, r, p, rz_new, k + 1, negative, null, jnp.minimum(lowest, quotient), scale

        x, _, _, _, k, negative, singular, lowest, _ = jax.lax.while_loop(keep_going, step, init)
        lowest = jnp.where(jnp.isinf(lowest), jnp.nan, lowest)
        return _finish(A, b, project(x), k, self.rtol, self.atol, negative, singular, lowest)


@option()
class MINRES(_Iterative):
    """MINRES (Paige and Saunders 1975) for symmetric, possibly indefinite ``A``.
    The preconditioner, if any, must be symmetric positive definite."""

    def __call__(self, matvec: MatVec, b: Array, project: Projector = _identity) -> tuple[Array, SolveInfo]:
        A, precondition, b, tol = self._setup(matvec, b, project)
        y = precondition(b)
        beta1 = jnp.sqrt(jnp.maximum(jnp.vdot(b, y), 0.0))
        zeros = jnp.zeros_like(b)
        zero = 0.0 * beta1
        # (x, r1, r2, y, w, w2, beta, old_beta, dbar, epsilon, phibar, cs, sn, k)
        init = (zeros, b, b, y, zeros, zeros, beta1, zero, zero, zero, beta1, zero - 1.0, zero, 0)
        max_iter = self._iterations(b)

        def keep_going(s):
            # phibar estimates the preconditioned residual norm; the true one is checked at the end.
            return (s[10] > tol * _safe_div(beta1, jnp.linalg.norm(b))) & (s[13] < max_iter) & (s[6] > 0)

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
        return _finish(A, b, project(state[0]), state[13], self.rtol, self.atol)


@option()
class BiCGSTAB(_Iterative):
    """BiCGSTAB (van der Vorst 1992) for non-symmetric ``A``, e.g. optimality
    conditions that are not the gradient of an energy."""

    def __call__(self, matvec: MatVec, b: Array, project: Projector = _identity) -> tuple[Array, SolveInfo]:
        A, precondition, b, tol = self._setup(matvec, b, project)
        zeros = jnp.zeros_like(b)
        one = jnp.ones((), b.dtype)
        init = (zeros, b, zeros, zeros, one, one, one, 0)
        max_iter = self._iterations(b)

        def keep_going(s):
            return (jnp.linalg.norm(s[1]) > tol) & (s[7] < max_iter)

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
        return _finish(A, b, project(state[0]), state[7], self.rtol, self.atol)


@option()
class Dense:
    """Dense pseudo-inverse: builds ``A`` column by column (``n`` products, ``n^2``
    memory) and applies ``pinv(A, rcond)``. For small systems and references;
    ``rtol``/``atol`` only decide the ``converged`` flag, which is also true
    when the residual lies in the numerical null space (``|A r| <= rcond |A|
    |r|``): the pseudo-inverse answer of an inconsistent system."""

    rcond: float = 1e-10
    rtol: float = 1e-8
    atol: float = 0.0

    def __post_init__(self) -> None:
        set_field(self, "rcond", positive_float(self.rcond, "rcond", "Dense"))
        set_field(self, "rtol", positive_float(self.rtol, "rtol", "Dense"))
        set_field(self, "atol", nonnegative_float(self.atol, "atol", "Dense"))

    def __call__(self, matvec: MatVec, b: Array, project: Projector = _identity) -> tuple[Array, SolveInfo]:
        A = lambda v: project(matvec(project(v)))  # noqa: E731
        b = _project_rhs(project, b)
        matrix = jax.vmap(A, out_axes=1)(jnp.eye(b.size, dtype=b.dtype))
        x = project(jnp.linalg.pinv(matrix, rtol=self.rcond, hermitian=False) @ b)
        norm = jnp.linalg.norm(matrix, 2)
        return _finish(A, b, x, 0, self.rtol, self.atol, null_rtol=self.rcond, scale=norm)


#: What derivative methods accept as ``solver``.
LinearSolver = CG | MINRES | BiCGSTAB | Dense
SOLVERS = (CG, MINRES, BiCGSTAB, Dense)
