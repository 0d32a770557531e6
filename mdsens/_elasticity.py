r"""Elastic moduli of relaxed states by implicit differentiation.

An affine strain ``eps`` (symmetric, deformation gradient ``F = I + eps``)
maps the box to ``F box`` and positions to ``x F^T``. With reference
coordinates ``u`` (``x = u F^T``) the strained energy is
``E(u, eps) = energy_fn(u F^T, params | {"box": F box})``, its minimum over
``u`` is the relaxed energy ``E*(eps)`` and

.. math:: C_{ijkl} = \frac{1}{V}\frac{d^2 E^*}{d\epsilon_{ij}\,d\epsilon_{kl}}
          = \frac{1}{V}\Big(\partial^2_{\epsilon\epsilon}E
            - \Xi^T H^{+}\,\Xi\Big),\qquad
          \Xi = \partial_\epsilon\nabla_u E,\ H = \nabla^2_{uu}E,

the affine (Born) term minus the non-affine relaxation. This is jax-md's
convention (``jax_md.elasticity.athermal_moduli``): the second-order
coefficient of ``E*/V`` in ``eps`` with ``F = I + eps``. Each column
``dx*/deps_kl`` is one :func:`mdsens.root_jvp` (a CG solve with the zero
modes of ``H`` projected out), so the moduli are exact to the solver
tolerance and differentiable again (with respect to diameters, epsilon...).

Under pressure, the coefficients that relate stress *increments* to strain
(``d sigma_ij / d eps_kl``, what a re-relaxed finite-strain experiment
measures) differ from ``C`` by terms linear in the stress (Wallace,
*Thermodynamics of Crystals*):
``B_ijkl = C_ijkl + (d_ik s_jl + d_il s_jk + s_ik d_jl + s_il d_jk)/4 - s_ij d_kl``
(:func:`stress_strain_tensor`). The bulk and shear moduli of
:func:`isotropic_moduli` are taken from ``B`` when the stress is given
(``B = -V dp/dV`` and the orientation-averaged ``d sigma_xy / d gamma``,
O'Hern et al. 2003), from ``C`` otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mdsens import zero_modes as zm
from mdsens._checks import check_params, check_positions, is_concrete, require_x64
from mdsens.equilibrium import _solver, equilibrium
from mdsens.implicit import enforce, root_jvp
from mdsens.linear_solve import cg
from mdsens.relaxation import relax

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ElasticModuli:
    """Elastic response of one relaxed state (arrays; see :func:`elastic_response`).

    Attributes:
        stiffness: ``C``, shape ``(dim, dim, dim, dim)``, including the non-affine term.
        born: the affine (Born) part of ``C``.
        stress: Cauchy stress ``(1/V) dE/deps``, shape ``(dim, dim)`` (tension positive).
        pressure: ``-tr(stress)/dim``.
        volume: box volume (area in 2D).
        positions: the relaxed positions the moduli belong to.
        fmax: largest force norm at ``positions``.
        relaxed: the relaxation reached its force tolerance.
        solve_residual: largest relative residual of the ``dim (dim+1)/2`` solves.
        solve_converged: every solve met its tolerance.
        negative_curvature: a solve met ``p^T H p <= 0`` (one of the strain
            columns, or a stability probe: a solve with a random right-hand
            side): the state is not a minimum (a saddle), and the moduli are
            meaningless.
    """

    stiffness: Array
    born: Array
    stress: Array
    pressure: Array
    volume: Array
    positions: Array
    fmax: Array
    relaxed: Array
    solve_residual: Array
    solve_converged: Array
    negative_curvature: Array

    @property
    def nonaffine(self) -> Array:
        """The non-affine relaxation ``Xi^T H^+ Xi / V`` (``born - stiffness``)."""
        return self.born - self.stiffness

    @property
    def ok(self) -> Array:
        """Relaxed, every solve converged and no negative curvature."""
        return self.relaxed & self.solve_converged & ~self.negative_curvature

    def voigt(self) -> Array:
        """``C`` in Voigt form (3x3 in 2D, 6x6 in 3D)."""
        return to_voigt(self.stiffness)

    def mandel(self) -> Array:
        """``C`` in Mandel form (orthonormal; eigenvalues are the moduli of the eigenstrains)."""
        return to_mandel(self.stiffness)

    @property
    def bulk_modulus(self) -> Array:
        """``-V dp/dV`` of the relaxed state (see :func:`isotropic_moduli`)."""
        return isotropic_moduli(self.stiffness, self.stress)[0]

    @property
    def shear_modulus(self) -> Array:
        """Orientation-averaged shear modulus ``d sigma_xy / d gamma`` (see :func:`isotropic_moduli`)."""
        return isotropic_moduli(self.stiffness, self.stress)[1]


def _voigt_pairs(dim: int) -> list[tuple[int, int]]:
    return [(0, 0), (1, 1), (0, 1)] if dim == 2 else [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]


def _check_tensor(c: Array) -> Array:
    c = jnp.asarray(c)
    if c.ndim != 4 or c.shape[0] not in (2, 3) or len(set(c.shape)) != 1:
        raise ValueError(f"expected a (dim, dim, dim, dim) stiffness tensor with dim 2 or 3; got shape {c.shape}.")
    return c


def to_voigt(c: Array) -> Array:
    """Voigt matrix ``C_IJ = C_ijkl`` (pairs 11, 22, 12 in 2D; 11, 22, 33, 23, 13, 12 in 3D).
    With engineering shear strains ``2 eps_ij`` it maps strain to stress."""
    c = _check_tensor(c)
    pairs = _voigt_pairs(c.shape[0])
    return jnp.stack([jnp.stack([c[i, j, k, l] for k, l in pairs]) for i, j in pairs])


def to_mandel(c: Array) -> Array:
    """Mandel matrix: Voigt with shear rows and columns scaled by sqrt(2) (an orthonormal basis)."""
    c = _check_tensor(c)
    pairs = _voigt_pairs(c.shape[0])
    w = jnp.asarray([1.0 if i == j else np.sqrt(2.0) for i, j in pairs])
    return to_voigt(c) * w[:, None] * w[None, :]


def from_voigt(m: Array) -> Array:
    """The (dim, dim, dim, dim) tensor with minor symmetries from a Voigt matrix."""
    m = jnp.asarray(m)
    dim = {3: 2, 6: 3}.get(m.shape[0])
    if m.shape != (m.shape[0], m.shape[0]) or dim is None:
        raise ValueError(f"a Voigt matrix is 3x3 (2D) or 6x6 (3D); got shape {m.shape}.")
    index = np.zeros((dim, dim), dtype=int)
    for n, (i, j) in enumerate(_voigt_pairs(dim)):
        index[i, j] = index[j, i] = n
    return m[index[:, :, None, None], index[None, None, :, :]]


def stress_strain_tensor(c: Array, stress: Array) -> Array:
    """``B_ijkl = d sigma_ij / d eps_kl`` (Cauchy stress increment per strain increment,
    positions re-relaxed) from ``C`` and the stress ``s`` of the state: ``B = C`` at zero stress."""
    c = _check_tensor(c)
    d = jnp.eye(c.shape[0], dtype=c.dtype)
    s = jnp.asarray(stress, dtype=c.dtype)
    extra = (
        jnp.einsum("ik,jl->ijkl", d, s) + jnp.einsum("il,jk->ijkl", d, s)
        + jnp.einsum("ik,jl->ijkl", s, d) + jnp.einsum("il,jk->ijkl", s, d)
    ) / 4.0
    return c + extra - jnp.einsum("ij,kl->ijkl", s, d)


def isotropic_moduli(c: Array, stress: Array | None = None) -> tuple[Array, Array]:
    """``(bulk, shear)`` moduli: the isotropic part of the tensor (exact for an
    isotropic tensor ``lambda d_ij d_kl + mu (d_ik d_jl + d_il d_jk)``; the
    orientation average otherwise). With the state's ``stress`` they come from
    :func:`stress_strain_tensor`: ``bulk = -V dp/dV`` and ``shear`` the averaged
    ``d sigma_xy / d gamma``, the quantities of O'Hern et al., PRE 68, 011306 (2003).
    Without it, from ``C`` (the energy's curvature)."""
    c = _check_tensor(c)
    if stress is not None:
        c = stress_strain_tensor(c, stress)
    dim = c.shape[0]
    a = jnp.einsum("iijj->", c)
    b = jnp.einsum("ijij->", c)
    return a / dim**2, (dim * b - a) / (dim * (dim - 1) * (dim + 2))


# ---------------------------------------------------------------------------
# The computation


def strain_energy(energy_fn):
    """``E(u, (params, a))``: energy after the affine strain ``eps = (a + a^T)/2``
    of box and positions, in reference coordinates ``u``."""
    return _strain_energy(energy_fn)


@functools.lru_cache(maxsize=64)
def _strain_energy(energy_fn):
    def strained(u, theta):
        params, a = theta
        f = jnp.eye(u.shape[1], dtype=u.dtype) + 0.5 * (a + a.T)
        return energy_fn(u @ f.T, {**params, "box": f @ params["box"]})

    return strained


def _strain_basis(dim: int) -> np.ndarray:
    """Symmetric unit strains ``(e_k e_l^T + e_l e_k^T)/2`` for k <= l (Voigt order)."""
    basis = np.zeros((len(_voigt_pairs(dim)), dim, dim))
    for n, (k, l) in enumerate(_voigt_pairs(dim)):
        basis[n, k, l] += 0.5
        basis[n, l, k] += 0.5
    return basis


def _assemble(columns: Array, dim: int) -> Array:
    """(m, dim, dim) columns ``C[:, :, k, l]`` in Voigt order -> (dim, dim, dim, dim)."""
    c = jnp.zeros((dim,) * 4, columns.dtype)
    for n, (k, l) in enumerate(_voigt_pairs(dim)):
        c = c.at[:, :, k, l].set(columns[n]).at[:, :, l, k].set(columns[n])
    return c


def _stiffness_at(energy_fn, x: Array, params: Any, solve, probe_solve) -> tuple[Array, Array, Array, Any]:
    """``(C, Born, stress, SolveInfo)`` at relaxed ``x``; differentiable in ``x`` and ``params``.
    The info has one entry per strain column and a last one for the stability probe."""
    dim = x.shape[1]
    strained = _strain_energy(energy_fn)
    a0 = jnp.zeros((dim, dim), x.dtype)
    theta0 = (params, a0)
    optimality = jax.grad(strained, argnums=0)

    def strain_gradient(u, a):  # dE/d eps, symmetric
        return jax.grad(lambda a_: strained(u, (params, a_)))(a)

    def hvp(v):
        return jax.jvp(lambda u: optimality(u, theta0), (x,), (v,))[1]

    modes = jax.lax.stop_gradient(zm.detect(hvp, jax.lax.stop_gradient(x)))
    zero_params = jax.tree_util.tree_map(jnp.zeros_like, params)
    volume = jnp.abs(jnp.linalg.det(params["box"]))

    def column(deps):
        du, info = root_jvp(optimality, x, theta0, (zero_params, deps), solve=solve, zero_modes=modes)
        born = jax.jvp(lambda a: strain_gradient(x, a), (a0,), (deps,))[1]
        relaxation = jax.jvp(lambda u: strain_gradient(u, a0), (x,), (du,))[1]
        return born + relaxation, born, info

    full, born, info = jax.vmap(column)(jnp.asarray(_strain_basis(dim), x.dtype))
    stress = strain_gradient(x, a0) / volume

    # Stability probe: the strain columns explore only the Krylov spaces of Xi, where a
    # saddle can look stable (a symmetric lattice). A right-hand side with a component
    # along every eigenvector cannot converge without CG meeting p^T H p <= 0 if H has
    # a negative eigenvalue (the Lanczos matrix must resolve it).
    fixed_x, fixed_theta = jax.lax.stop_gradient((x, theta0))

    def fixed_hvp(v):
        return jax.jvp(lambda u: optimality(u, fixed_theta), (fixed_x,), (v.reshape(x.shape),))[1].reshape(-1)

    probe = jax.random.normal(jax.random.PRNGKey(1), (x.size,), x.dtype)
    _, probe_info = probe_solve(fixed_hvp, modes.project(probe), modes.project)
    info = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, jnp.reshape(b, (1,))]), info, probe_info)
    return _assemble(full, dim) / volume, _assemble(born, dim) / volume, stress, info


def _check_system(system, caller: str) -> None:
    if getattr(system, "box", None) is None or "box" not in system.params:
        raise ValueError(
            f"{caller}: the system has no deformable periodic box (box=None, e.g. a free "
            "cluster), so strain, stress and elastic moduli are not defined for it."
        )


@functools.lru_cache(maxsize=16)
def _named_solver(name: str):
    return _solver(name)


def _default_solver(solver):
    """The solver callable (one object per name, so compiled functions are reused)."""
    if solver is None:
        return _named_solver("cg")
    if isinstance(solver, str):
        return _named_solver(solver)
    if not callable(solver):
        raise ValueError(f"solver must be a name ('cg', 'minres', 'dense'...) or a solver callable; got {solver!r}.")
    return solver


@functools.lru_cache(maxsize=32)
def _enforced(solve, throw: bool):
    return enforce(solve, throw)


@functools.lru_cache(maxsize=4)
def _probe_solver(throw: bool | None):
    """CG for the stability probe: only its negative curvature counts (a probe that
    does not converge is not a failure). Raises or warns on a saddle as
    :func:`mdsens.implicit.enforce` does unless ``throw`` is None."""
    base = cg(rtol=1e-6)

    def probe(matvec, b, project):
        x, info = base(matvec, b, project)
        return x, dataclasses.replace(info, converged=~info.negative_curvature, residual=jnp.zeros_like(info.residual))

    return probe if throw is None else enforce(probe, throw)


@functools.lru_cache(maxsize=64)
def _stiffness_jit(energy_fn, solve, probe_solve):
    return jax.jit(lambda x, params: _stiffness_at(energy_fn, x, params, solve, probe_solve))


def elastic_response(
    system, positions: Array, params: Any, *, solver: Any = None, fmax: float = 1e-12,
    max_steps: int = 100_000,
) -> ElasticModuli:
    """The full :class:`ElasticModuli` of the state relaxed from ``positions``
    (no FIRE steps if they are already relaxed to ``fmax``), with diagnostics.

    Never raises on failure: check ``.ok`` (``relaxed``, ``solve_converged``,
    ``negative_curvature``). Raises ``ValueError`` for a system without a
    periodic box. Not differentiable (use :func:`elastic_moduli`).
    """
    require_x64("mdsens.observables.elastic_response")
    _check_system(system, "elastic_response")
    positions, params = check_positions(positions), check_params(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # reported in the result instead
        result = relax(system.energy_fn, positions, params, shift_fn=system.shift_fn, dt_max=system.dt_max,
                       fmax=fmax, max_steps=max_steps)
    stiffness = _stiffness_jit(system.energy_fn, _default_solver(solver), _probe_solver(None))
    c, born, stress, info = stiffness(result.positions, params)
    return ElasticModuli(
        stiffness=c, born=born, stress=stress, pressure=-jnp.trace(stress) / positions.shape[1],
        volume=jnp.abs(jnp.linalg.det(params["box"])), positions=result.positions,
        fmax=result.fmax, relaxed=result.converged, solve_residual=jnp.max(info.residual),
        solve_converged=jnp.all(info.converged), negative_curvature=jnp.any(info.negative_curvature),
    )


def elastic_moduli(
    system, positions: Array, params: Any, *, solver: Any = None, throw: bool = True,
    fmax: float = 1e-12, max_steps: int = 100_000,
) -> Array:
    """Stiffness tensor ``C_ijkl`` (shape ``(dim, dim, dim, dim)``) of the relaxed state.

    ``positions`` are relaxed first with FIRE (a no-op if they already are, to
    ``fmax``); under a JAX transformation through :func:`mdsens.equilibrium`,
    so the result is differentiable with respect to ``params`` in forward and
    reverse mode (e.g. ``jax.grad`` of a shear modulus with respect to the
    diameters).

    ``C = (1/V) d^2E*/deps deps`` with ``F = I + eps`` (jax-md's convention),
    Born term minus ``Xi^T H^+ Xi``, one CG solve per independent strain.

    Failures raise ``FloatingPointError`` at run time (``throw=True``) or give
    NaN with a ``RuntimeWarning``: a relaxation that misses ``fmax``, a solve
    that misses its tolerance, or negative curvature (an unstable state, not a
    minimum). A system without a periodic box raises ``ValueError``.
    """
    require_x64("mdsens.observables.elastic_moduli")
    _check_system(system, "elastic_moduli")
    positions, params = check_positions(positions), check_params(params)
    if all(is_concrete(leaf) for leaf in jax.tree_util.tree_leaves((positions, params))):
        # Nothing to differentiate: the plain relaxation (compiled once per energy and
        # shared with relax()) instead of compiling equilibrium's implicit wrapper.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            result = relax(system.energy_fn, positions, params, shift_fn=system.shift_fn, dt_max=system.dt_max,
                           fmax=fmax, max_steps=max_steps)
        x = result.positions
        if not bool(result.converged):
            message = (f"elastic_moduli: the relaxation did not reach fmax <= {fmax:g} ({result.reason}, "
                       f"fmax {float(result.fmax):.3g}), so the state is not an equilibrium")
            if throw:
                raise FloatingPointError(message + ".")
            warnings.warn(message + "; the moduli are set to NaN.", RuntimeWarning, stacklevel=2)
            x = jnp.full_like(x, jnp.nan)
    else:
        x = equilibrium(
            system.energy_fn, positions, params, shift_fn=system.shift_fn, dt_max=system.dt_max,
            fmax=fmax, max_steps=max_steps, throw=throw,
        )
    solve = _enforced(_default_solver(solver), bool(throw))
    return _stiffness_jit(system.energy_fn, solve, _probe_solver(bool(throw)))(x, params)[0]
