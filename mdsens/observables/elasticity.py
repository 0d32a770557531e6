r"""Elastic moduli of relaxed states by implicit differentiation.

With reference coordinates ``u`` (``x = u F^T``, ``F = I + eps``) the strained
energy is ``E(u, eps)`` (:func:`~mdsens.observables.virial.strained_energy`),
its minimum over ``u`` is the relaxed energy ``E*(eps)`` and

.. math:: C_{ijkl} = \frac{1}{V}\frac{d^2 E^*}{d\epsilon_{ij}\,d\epsilon_{kl}}
          = \frac{1}{V}\Big(\partial^2_{\epsilon\epsilon}E
            - \Xi^T H^{+}\,\Xi\Big),\qquad
          \Xi = \partial_\epsilon\nabla_u E,\ H = \nabla^2_{uu}E,

the affine (Born) term minus the non-affine relaxation. This is jax-md's
convention (``jax_md.elasticity.athermal_moduli``): the second-order
coefficient of ``E*/V`` in ``eps`` with ``F = I + eps``. Each column
``dx*/deps_kl`` is one :func:`mdsens.root_jvp` with the adjoint's solver and
zero modes (:class:`mdsens.Implicit`), so the moduli are exact to the solver
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
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mdsens import zero_modes as zm
from mdsens._checks import require_x64
from mdsens.adjoints import Implicit
from mdsens.equilibria import check_adjoint, equilibrium
from mdsens.implicit import enforce, root_jvp
from mdsens.linear_solve import CG, SolveInfo
from mdsens.minimisers import FIRE, Minimiser
from mdsens.observables.virial import check_deformable, strained_energy, volume
from mdsens.relaxation import all_concrete, check_minimiser, relaxed_state
from mdsens.systems.energy import Energy
from mdsens.systems.system import System

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
            columns, or the stability probe: a solve with a random right-hand
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


# ---------------------------------------------------------------------------
# Forms of the stiffness tensor


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
        jnp.einsum("ik,jl->ijkl", d, s)
        + jnp.einsum("il,jk->ijkl", d, s)
        + jnp.einsum("ik,jl->ijkl", s, d)
        + jnp.einsum("il,jk->ijkl", s, d)
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


#: The stability probe's solver: only whether CG meets negative curvature counts.
PROBE_SOLVER = CG(rtol=1e-6)


def _probe(matvec, b: Array, project) -> tuple[Array, SolveInfo]:
    """:data:`PROBE_SOLVER`, failing only on negative curvature (a probe that does
    not converge is no failure)."""
    x, info = PROBE_SOLVER(matvec, b, project)
    return x, dataclasses.replace(info, converged=~info.negative_curvature, residual=jnp.zeros_like(info.residual))


@jax.jit(static_argnums=(0, 1, 2))
def _stiffness(
    energy: Energy, adjoint: Implicit, throw: bool | None, x: Array, params: Any, aux: Any
) -> tuple[Array, Array, Array, SolveInfo]:
    """``(C, Born, stress, SolveInfo)`` at the relaxed ``x``, differentiable in ``x``
    and ``params``; ``aux`` is the energy's state at ``x`` (None: built here). The
    info has one entry per strain column and a last one for the stability probe.
    With ``throw`` (True or False) every solve, and every solve of a derivative,
    has the failure policy of :func:`mdsens.equilibrium`; None only reports."""
    energy_fn = energy.bind(energy.build(x, params) if aux is None else aux)
    dim = x.shape[1]
    strained = strained_energy(energy_fn)
    a0 = jnp.zeros((dim, dim), x.dtype)
    theta0 = (params, a0)
    # H of the strained energy at eps = 0 is the system's, and so are its zero modes.
    modes = adjoint.modes(energy_fn, x, params)
    solve = adjoint.solver if throw is None else enforce(adjoint.solver, throw)
    zero_params = jax.tree_util.tree_map(jnp.zeros_like, params)

    def strain_gradient(u: Array, a: Array) -> Array:  # dE/d eps, symmetric
        return jax.grad(lambda a_: strained(u, (params, a_)))(a)

    def column(deps: Array) -> tuple[Array, Array, SolveInfo]:
        du, info = root_jvp(jax.grad(strained), x, theta0, (zero_params, deps), solve=solve, zero_modes=modes)
        born = jax.jvp(lambda a: strain_gradient(x, a), (a0,), (deps,))[1]
        relaxation = jax.jvp(lambda u: strain_gradient(u, a0), (x,), (du,))[1]
        return born + relaxation, born, info

    full, born, info = jax.vmap(column)(jnp.asarray(_strain_basis(dim), x.dtype))
    v = volume(params)

    # Stability probe: the strain columns explore only the Krylov spaces of Xi, where a
    # saddle can look stable (a symmetric lattice). A right-hand side with a component
    # along every eigenvector cannot converge without CG meeting p^T H p <= 0 if H has
    # a negative eigenvalue (the Lanczos matrix must resolve it).
    fixed_x, fixed_params = jax.lax.stop_gradient((x, params))
    hvp = zm.hvp_of(energy_fn, fixed_x, fixed_params)
    probe = jax.random.normal(jax.random.PRNGKey(1), (x.size,), x.dtype)
    probe_solve = _probe if throw is None else enforce(_probe, throw)
    _, probe_info = probe_solve(lambda v: hvp(v.reshape(x.shape)).reshape(-1), modes.project(probe), modes.project)
    info = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, jnp.reshape(b, (1,))]), info, probe_info)
    return _assemble(full, dim) / v, _assemble(born, dim) / v, strain_gradient(x, a0) / v, info


def elastic_response(
    system: System,
    positions: Array,
    params: Any,
    *,
    minimiser: Minimiser = FIRE(),
    adjoint: Implicit = Implicit(),
) -> ElasticModuli:
    """The full :class:`ElasticModuli` of the state relaxed from ``positions`` with
    ``minimiser`` (no steps if they are already relaxed to its ``fmax``), with
    diagnostics; the solves use ``adjoint``'s solver and zero modes.

    Never raises on failure: check ``.ok`` (``relaxed``, ``solve_converged``,
    ``negative_curvature``). Raises ``ValueError`` for a system without a
    periodic box. Not differentiable (use :func:`elastic_moduli`).
    """
    require_x64("mdsens.observables.elastic_response")
    check_deformable(system, "elastic_response")
    check_adjoint(adjoint, (Implicit,), "elastic_response")
    positions, params = system.inputs(positions, params)
    result, aux = relaxed_state(system.energy, check_minimiser(minimiser, system), positions, params)
    c, born, stress, info = _stiffness(system.energy, adjoint, None, result.positions, params, aux)
    return ElasticModuli(
        stiffness=c,
        born=born,
        stress=stress,
        pressure=-jnp.trace(stress) / system.dim,
        volume=volume(params),
        positions=result.positions,
        fmax=result.fmax,
        relaxed=result.converged,
        solve_residual=jnp.max(info.residual),
        solve_converged=jnp.all(info.converged),
        negative_curvature=jnp.any(info.negative_curvature),
    )


def elastic_moduli(
    system: System,
    positions: Array,
    params: Any,
    *,
    minimiser: Minimiser = FIRE(),
    adjoint: Implicit = Implicit(),
    throw: bool = True,
) -> Array:
    """Stiffness tensor ``C_ijkl`` (shape ``(dim, dim, dim, dim)``) of the relaxed state.

    ``positions`` are relaxed first with ``minimiser`` (a no-op if they already
    are, to its ``fmax``); under a JAX transformation through
    :func:`mdsens.equilibrium`, so the result is differentiable with respect to
    ``params`` in forward and reverse mode (e.g. ``jax.grad`` of a shear
    modulus with respect to the diameters).

    ``C = (1/V) d^2E*/deps deps`` with ``F = I + eps`` (jax-md's convention),
    Born term minus ``Xi^T H^+ Xi``, one solve per independent strain with
    ``adjoint``'s solver and zero modes.

    Failures raise ``FloatingPointError`` at run time (``throw=True``) or give
    NaN with a ``RuntimeWarning``: a relaxation that misses ``fmax``, a solve
    that misses its tolerance, or negative curvature (an unstable state, not a
    minimum). A system without a periodic box raises ``ValueError``.
    """
    require_x64("mdsens.observables.elastic_moduli")
    check_deformable(system, "elastic_moduli")
    check_adjoint(adjoint, (Implicit,), "elastic_moduli")
    if not isinstance(throw, bool):
        raise ValueError(f"throw must be True or False; got {throw!r}.")
    positions, params = system.inputs(positions, params)
    if not all_concrete(positions, params):
        x = equilibrium(system, params, positions=positions, minimiser=minimiser, adjoint=adjoint, throw=throw)
        return _stiffness(system.energy, adjoint, throw, x, params, None)[0]
    # Nothing to differentiate: the plain relaxation (shared with relax(), and exact
    # neighbor lists from the host) instead of equilibrium's implicit wrapper.
    minimiser = check_minimiser(minimiser, system)
    result, aux = relaxed_state(system.energy, minimiser, positions, params)
    x = result.positions
    if not bool(result.converged):
        message = (
            f"elastic_moduli: the relaxation did not reach fmax <= {minimiser.fmax:g} ({result.reason}, "
            f"fmax {float(result.fmax):.3g}), so the state is not an equilibrium"
        )
        if throw:
            raise FloatingPointError(message + ".")
        warnings.warn(message + "; the moduli are set to NaN.", RuntimeWarning, stacklevel=2)
        x = jnp.full_like(x, jnp.nan)
    return _stiffness(system.energy, adjoint, throw, x, params, aux)[0]
