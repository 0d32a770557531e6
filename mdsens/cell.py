r"""Equilibria at fixed pressure or stress: the box relaxes with the particles, and both are differentiable.

:func:`at_pressure` turns a periodic :class:`~mdsens.System` into another
``System`` whose positions are *joint coordinates*: ``N`` rows of particle
positions ``q`` in the reference box (the system's ``params["box"]``), then
one or two *cell rows* that hold the strain. Its energy is the enthalpy

.. math:: H(q, \epsilon) = E\big(q F^T;\ \mathrm{box} = F\,\mathrm{box}_0\big) + p\,|\det(F\,\mathrm{box}_0)|,
          \qquad F = \exp(\epsilon),\ \epsilon = \epsilon^T,

and its parameters are the system's plus ``"pressure"``. Minimising ``H``
over ``(q, epsilon)`` relaxes the particles to zero force and the virial
stress to ``-p I`` (``mode="full"``: every symmetric strain, shear included)
or its trace to ``-p dim`` (``mode="isotropic"``: the volume only, the shape
of the reference box kept). Because the result is a ``System``,
:func:`mdsens.relax`, :func:`mdsens.equilibrium` (forward, reverse, second
order), ``equilibrium_jvp``/``vjp``, ``jit`` and ``vmap`` take it unchanged,
and derivatives with respect to the target pressure come with the others.

The strain is parametrised as in ASE's ``FrechetCellFilter``: a logarithmic
strain, so ``F`` stays positive definite, stored as ``scale * epsilon``
(``scale`` defaults to ``N``, ASE's ``exp_cell_factor``), so a cell "force"
``-dH/d(cell row) = -dH/d epsilon / scale`` is a virial residual per particle,
comparable with particle forces, and one ``fmax`` (FIRE's, over every row)
bounds both. ``F`` is symmetric: rigid rotations of the box are not degrees
of freedom (3 strain entries in 2D, 6 in 3D; 1 in isotropic mode). Cell rows
are ``dim`` wide: the strain entries fill them in order
(:math:`\epsilon_{xx}, \epsilon_{yy}[, \epsilon_{zz}]`, then the shears times
:math:`\sqrt 2`, so that the row norm is the Frobenius norm of ``epsilon``),
and the entries left over are unused (zero force, masked as zero modes). The
cell rows sit at fixed offsets outside the reference box, so no cell row ever
coincides with a particle.

**Zero modes.** Translations of the particle rows alone (and rattlers) are
the zero modes of the joint Hessian, with the unused cell entries. The
enthalpy declares them (:meth:`Enthalpy.zero_modes`, :class:`JointZeroModes`),
and ``zero_modes="auto"`` takes an energy's own declaration, so the default
:class:`mdsens.Implicit` and the relaxation's curvature certificate use the
right modes: ``mdsens.equilibrium(cell_system, params)`` as for any system.

**A target stress tensor.** :func:`at_stress` (full mode) adds to the
enthalpy the Parrinello--Rahman term ``-V_0 tau : (F^T F - I)/2`` of the
deviator ``tau`` of the target, a second Piola--Kirchhoff stress of the
reference box; the pressure part is held as above. Its parameters are the
system's plus ``"stress"``.

:func:`relaxed` reads a :class:`~mdsens.RelaxResult` of a cell system as a
:class:`CellResult`: positions, box and stress, the largest particle force and
the stress residual, each with its own tolerance. :func:`split`,
:func:`fixed_box`, :func:`volume` and :func:`packing_fraction` read joint
coordinates (all differentiable). :func:`elastic_moduli` gives the moduli of
the box-relaxed state with their pre-stress terms (the stress--strain
coefficients that stress control measures).

All-pairs energies only: a neighbor list needs an upper-triangular box, which
a symmetric ``F`` does not keep, and is valid only for the box it was built
in, which moves at every step (build with ``neighbor_list=False``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mdsens import observables
from mdsens import zero_modes as zm
from mdsens._checks import as_float64, check_finite, require_x64
from mdsens._values import positive_float
from mdsens.adjoints import Implicit
from mdsens.equilibria import equilibrium
from mdsens.minimisers import FIRE, Minimiser, max_force
from mdsens.observables.virial import check_deformable, strained_energy
from mdsens.relaxation import RelaxResult
from mdsens.systems.energy import Energy, FunctionEnergy
from mdsens.systems.system import System

Array = jax.Array

MODES = ("isotropic", "full")
#: Default tolerance of :func:`relaxed` on the stress residual (in the system's stress units).
STRESS_TOLERANCE = 1e-10
#: Default tolerance of :func:`relaxed` on the largest particle force.
FORCE_TOLERANCE = 1e-12
# exp(a) = T(a / 2^s)^(2^s) with the Taylor polynomial T of degree 12: below 1e-17
# relative for |a| <= 4 (strains far beyond any relaxation), a polynomial, so every
# derivative is exact; 4 squarings amplify rounding only 16-fold.
_SQUARINGS = 4
_TAYLOR_DEGREE = 12


def _expm(a: Array) -> Array:
    scaled = a / 2.0**_SQUARINGS
    identity = jnp.eye(a.shape[0], dtype=a.dtype)
    term, total = identity, identity
    for k in range(1, _TAYLOR_DEGREE + 1):
        term = term @ scaled / k
        total = total + term
    for _ in range(_SQUARINGS):
        total = total @ total
    return total


def strain_basis(mode: str, dim: int) -> np.ndarray:
    """The symmetric unit strains the cell entries multiply, ``(k, dim, dim)``:
    ``I`` (isotropic), or ``E_ii`` then ``(E_ij + E_ji)/sqrt 2`` (full), an
    orthonormal basis in the Frobenius product."""
    if mode == "isotropic":
        return np.eye(dim)[None]
    units = [np.diag(np.eye(dim)[i]) for i in range(dim)]
    for i, j in [(0, 1)] if dim == 2 else [(1, 2), (0, 2), (0, 1)]:
        shear = np.zeros((dim, dim))
        shear[i, j] = shear[j, i] = 1.0 / math.sqrt(2.0)
        units.append(shear)
    return np.stack(units)


@dataclasses.dataclass(frozen=True)
class Enthalpy:
    """The enthalpy of a cell system as a function of joint coordinates
    (module docstring): a hashable value, so equal cell systems share
    compiled programs.

    Attributes:
        energy: the fixed-box system's energy.
        n: number of particles (the first ``n`` rows).
        mode: ``"isotropic"`` or ``"full"``.
        scale: cell coordinates are ``scale * epsilon``.
        offsets: the fixed offsets of the cell rows (tuples, for hashing).
        target: the parameter that holds the load: ``"pressure"``
            (:func:`at_pressure`) or ``"stress"`` (:func:`at_stress`).
    """

    energy: Energy
    n: int
    mode: str
    scale: float
    offsets: tuple[tuple[float, ...], ...]
    target: str = "pressure"

    @property
    def dim(self) -> int:
        return len(self.offsets[0])

    @property
    def n_strains(self) -> int:
        return 1 if self.mode == "isotropic" else self.dim * (self.dim + 1) // 2

    def strain(self, joint: Array) -> Array:
        """``epsilon`` (symmetric ``dim x dim``) from the cell rows."""
        cell = (joint[self.n :] - jnp.asarray(self.offsets, joint.dtype)).reshape(-1)[: self.n_strains]
        return jnp.tensordot(cell, jnp.asarray(strain_basis(self.mode, self.dim), joint.dtype), axes=1) / self.scale

    def deformation(self, joint: Array) -> Array:
        """``F = exp(epsilon)``."""
        eps = self.strain(joint)
        if self.mode == "isotropic":  # epsilon = e I: the scalar exponential
            return jnp.exp(eps[0, 0]) * jnp.eye(self.dim, dtype=joint.dtype)
        return _expm(eps)

    def state(self, joint: Array, params: Mapping[str, Any]) -> tuple[Array, dict[str, Any]]:
        """Physical positions ``q F^T`` and the fixed-box system's params with ``box = F box_0``."""
        f = self.deformation(joint)
        fixed = {key: value for key, value in params.items() if key != self.target}
        return joint[: self.n] @ f.T, fixed | {"box": f @ params["box"]}

    def load(self, params: Mapping[str, Any]) -> tuple[Array, Array]:
        """``(p, tau)``: the pressure ``-tr(sigma_t)/dim`` and the deviator
        ``tau = sigma_t + p I`` of the target (``tau = 0`` for a pressure target)."""
        if self.target == "pressure":
            return params["pressure"], jnp.zeros((self.dim, self.dim), params["pressure"].dtype)
        target = params["stress"]
        p = -jnp.trace(target) / self.dim
        return p, target + p * jnp.eye(self.dim, dtype=target.dtype)

    def __call__(self, joint: Array, params: Mapping[str, Any]) -> Array:
        positions, fixed = self.state(joint, params)
        p, tau = self.load(params)
        enthalpy = self.energy(positions, fixed) + p * jnp.abs(jnp.linalg.det(fixed["box"]))
        if self.target == "pressure":
            return enthalpy
        f = self.deformation(joint)
        green = 0.5 * (f.T @ f - jnp.eye(self.dim, dtype=f.dtype))
        return enthalpy - jnp.abs(jnp.linalg.det(params["box"])) * jnp.sum(tau * green)

    def held_stress(self, joint: Array, params: Mapping[str, Any]) -> Array:
        """The Cauchy stress that stationarity of the enthalpy implies at the box of
        ``joint``: ``-p I + F tau F^T / det F`` (``-p I`` for a pressure target)."""
        f = self.deformation(joint)
        p, tau = self.load(params)
        return -p * jnp.eye(self.dim, dtype=f.dtype) + f @ tau @ f.T / jnp.linalg.det(f)

    def zero_modes(self, joint: Array, params: Any) -> zm.ZeroModes:
        """The joint zero modes (:class:`JointZeroModes`): what ``zero_modes="auto"``
        (:func:`mdsens.zero_modes.modes_at`) takes for this energy, in derivatives
        and in the relaxation's curvature certificate."""
        return JointZeroModes(self)(joint, params)

    def cell_mask(self, dtype: Any) -> Array:
        """1 on the cell entries that hold a strain, 0 on the unused ones, ``(rows, dim)``."""
        entries = np.arange(len(self.offsets) * self.dim) < self.n_strains
        return jnp.asarray(entries.reshape(-1, self.dim), dtype)


@dataclasses.dataclass(frozen=True)
class JointZeroModes:
    """The zero modes of a cell system's Hessian, as :class:`mdsens.Implicit`
    takes them (``(joint, params) -> ZeroModes``): those of the particle block
    at fixed strain (translations and rattlers, by
    :func:`mdsens.zero_modes.detect`), extended by zeros on the cell rows,
    plus the unused cell entries."""

    enthalpy: Enthalpy

    def __call__(self, joint: Array, params: Any) -> zm.ZeroModes:
        n = self.enthalpy.n

        def particle_enthalpy(q: Array, p: Any) -> Array:
            return self.enthalpy(jnp.concatenate([q, joint[n:]]), p)

        particles = zm.detect(zm.hvp_of(particle_enthalpy, joint[:n], params), joint[:n])
        cells = joint[n:].shape
        mask = jnp.concatenate([particles.mask, self.enthalpy.cell_mask(joint.dtype)])
        basis = jnp.concatenate([particles.basis, jnp.zeros((particles.basis.shape[0], *cells), joint.dtype)], axis=1)
        return zm.ZeroModes(mask, basis)


def _enthalpy(cell_system: System, caller: str) -> Enthalpy:
    energy = cell_system.energy
    if not (isinstance(energy, FunctionEnergy) and isinstance(energy.fn, Enthalpy)):
        raise ValueError(
            f"{caller}: expected a cell system from mdsens.cell.at_pressure or at_stress; got {cell_system!r}."
        )
    return energy.fn


def at_pressure(system: System, pressure: Any, mode: str = "isotropic", *, scale: float | None = None) -> System:
    """The periodic ``system`` at target ``pressure`` (positive: compressive,
    mdsens's ``-tr(stress)/dim``) with a relaxing box: a :class:`~mdsens.System`
    over joint coordinates whose energy is the enthalpy (module docstring).

    Args:
        system: a periodic system whose energy reads ``params["box"]`` (the
            builders', :mod:`mdsens.io`'s), all pairs (no neighbor list).
        pressure: the target pressure, stored as ``params["pressure"]``
            (differentiable, any sign: negative is tension).
        mode: ``"isotropic"`` (volume only) or ``"full"`` (every symmetric strain).
        scale: cell coordinates are ``scale * epsilon``; default ``N``.

    The reference box is ``params["box"]`` (still a parameter); the start is
    the system's positions at zero strain.
    """
    caller = "mdsens.cell.at_pressure"
    if mode not in MODES:
        raise ValueError(f"{caller}: mode must be one of {MODES}; got {mode!r}.")
    pressure = as_float64(pressure, "pressure")
    if pressure.shape != ():
        raise ValueError(f"{caller}: pressure must be a scalar; got shape {pressure.shape}.")
    return _cell_system(system, "pressure", pressure, mode, scale, caller)


def at_stress(system: System, stress: Any, *, scale: float | None = None) -> System:
    r"""The periodic ``system`` at a target stress tensor ``stress`` (``sigma_t``,
    mdsens's sign: tension positive, so ``-p I`` is the pressure ``p``), every
    symmetric strain of the box relaxing (``mode="full"``), with the
    Parrinello--Rahman enthalpy

    .. math:: H = E + p\,V - V_0\,\tau : \tfrac12(F^TF - I),\qquad
              p = -\tfrac{1}{d}\,\mathrm{tr}\,\sigma_t,\quad \tau = \sigma_t + p I,

    ``V_0`` the volume of the reference box ``params["box"]`` and ``F`` the
    deformation from it (module docstring). The pressure enters as in
    :func:`at_pressure` (``sigma_t = -p I`` gives the same enthalpy), the
    deviator ``tau`` as a second Piola--Kirchhoff stress of the reference box,
    conjugate to the Green strain: a constant Cauchy deviator does no
    conservative work, so no enthalpy holds it at every box. At a stationary
    point the virial stress is

    .. math:: \sigma = -p I + F \tau F^T / \det F ,

    (:meth:`Enthalpy.held_stress`; :func:`relaxed` reports the residual of
    this identity): the target exactly when the relaxed box is the reference
    (``F = I``), and otherwise to first order in ``|strain| |tau|``. To hold
    ``sigma_t`` at the relaxed box, take that box as the reference (``params
    ["box"]``, same cell system) and relax again, as LAMMPS's ``fix box/relax
    nreset`` does: each repetition shrinks the mismatch by a factor of order
    ``|tau| / B``.

    Args:
        system: as for :func:`at_pressure`.
        stress: the symmetric ``(dim, dim)`` target, stored as
            ``params["stress"]`` (differentiable; a tangent on one
            off-diagonal entry moves half a shear, a symmetric one the shear).
        scale: cell coordinates are ``scale * epsilon``; default ``N``.
    """
    caller = "mdsens.cell.at_stress"
    stress = as_float64(stress, "stress")
    if stress.shape != (system.dim, system.dim):
        raise ValueError(f"{caller}: stress must be a ({system.dim}, {system.dim}) matrix; got shape {stress.shape}.")
    if not bool(jnp.all(stress == stress.T)):
        raise ValueError(f"{caller}: stress must be symmetric (a Cauchy stress); got {stress.tolist()}.")
    return _cell_system(system, "stress", stress, "full", scale, caller)


def _cell_system(system: System, target: str, load: Array, mode: str, scale: float | None, caller: str) -> System:
    require_x64(caller)
    check_deformable(system, caller)
    if system.neighbor_list:
        raise ValueError(
            f"{caller}: neighbor-list energies need an upper-triangular box, which the relaxing "
            "(symmetric) deformation does not keep, and a list is valid only in the box it was built "
            "for, which moves at every step; build the system with neighbor_list=False."
        )
    if target in system.params:
        raise ValueError(f"{caller}: the system already has a parameter named {target!r}.")
    check_finite(load, target)
    n = system.n
    scale = float(n) if scale is None else positive_float(scale, "scale", caller)
    rows = 1 if mode == "isotropic" else 2
    # Outside the reference box, one box diagonal apart: never on a particle of the start.
    diagonal = np.asarray(system.params["box"]).sum(axis=1)
    offsets = tuple(tuple(float(v) for v in -(row + 1.0) * diagonal) for row in range(rows))
    enthalpy = Enthalpy(system.energy, n, mode, scale, offsets, target)
    joint = jnp.concatenate([system.positions, jnp.asarray(offsets, jnp.float64)])
    species = jnp.concatenate([system.species, jnp.full(rows, jnp.max(system.species) + 1, jnp.int32)])
    params = {**system.params, target: load}
    return System(FunctionEnergy(enthalpy), params, joint, system.box, species, system.dt_max, system.positive)


def split(cell_system: System, joint: Array, params: Any = None) -> tuple[Array, Array]:
    """``(positions, box)`` of joint coordinates: ``q F^T`` and ``F box_0``
    (``box_0 = params["box"]``, default the cell system's); differentiable."""
    positions, fixed = fixed_box(cell_system, joint, params)
    return positions, fixed["box"]


def fixed_box(cell_system: System, joint: Array, params: Any = None) -> tuple[Array, dict[str, Any]]:
    """``(positions, params)`` of the fixed-box system at joint coordinates: its
    parameters with ``"box"`` the relaxed box and no ``"pressure"``, what
    :mod:`mdsens.observables` take (e.g. ``elastic_response`` of the original system)."""
    enthalpy = _enthalpy(cell_system, "mdsens.cell.fixed_box")
    return enthalpy.state(joint, cell_system.params if params is None else params)


def volume(cell_system: System, joint: Array, params: Any = None) -> Array:
    """Volume (area in 2D) of the box at joint coordinates."""
    return jnp.abs(jnp.linalg.det(split(cell_system, joint, params)[1]))


def packing_fraction(cell_system: System, joint: Array, params: Any = None) -> Array:
    """Volume fraction of soft spheres (``params["diameters"]``, per species or
    per particle) in the box at joint coordinates; differentiable in both."""
    params = cell_system.params if params is None else params
    enthalpy = _enthalpy(cell_system, "mdsens.cell.packing_fraction")
    if "diameters" not in params:
        raise ValueError("mdsens.cell.packing_fraction needs soft spheres (params['diameters']).")
    d = params["diameters"]
    d = d if d.shape[0] == enthalpy.n else d[cell_system.species[: enthalpy.n]]
    unit = math.pi / 4.0 if enthalpy.dim == 2 else math.pi / 6.0
    return unit * jnp.sum(d**enthalpy.dim) / volume(cell_system, joint, params)


def elastic_moduli(
    cell_system: System,
    params: Any = None,
    *,
    positions: Any = None,
    minimiser: Minimiser = FIRE(),
    adjoint: Implicit = Implicit(),
    throw: bool = True,
) -> Array:
    r"""The stress--strain coefficients of the box-relaxed state, the elastic
    moduli at fixed pressure or stress (shape ``(dim, dim, dim, dim)``):

    .. math:: B_{ijkl} = \frac{d\sigma_{ij}}{d\epsilon_{kl}} = C_{ijkl}
              + \tfrac14(\delta_{ik}\sigma_{jl} + \delta_{il}\sigma_{jk}
              + \sigma_{ik}\delta_{jl} + \sigma_{il}\delta_{jk}) - \sigma_{ij}\delta_{kl},

    Wallace's coefficients: ``C`` of :func:`mdsens.observables.elastic_moduli`
    (affine minus non-affine, positions re-relaxed) plus the pre-stress terms of
    the relaxed stress ``sigma``
    (:func:`mdsens.observables.stress_strain_tensor`). ``B`` is what stress
    control measures: at a state relaxed at its own box (``F = I``) the
    compliance ``d epsilon / d sigma_t`` of :func:`at_stress` is ``B^{-1}``, and
    ``B_iijj / dim^2 = -V dp/dV``.

    ``x* = mdsens.equilibrium(cell_system, params, positions=positions, ...)``
    first (``positions``: joint coordinates to start from, default the cell
    system's), so ``B`` is differentiable with respect to every parameter and
    the target, in forward and reverse mode. Failures follow ``throw`` as in
    :func:`mdsens.observables.elastic_moduli`.
    """
    enthalpy = _enthalpy(cell_system, "mdsens.cell.elastic_moduli")
    params = cell_system.params if params is None else params
    joint = equilibrium(cell_system, params, positions=positions, minimiser=minimiser, adjoint=adjoint, throw=throw)
    x, fixed = enthalpy.state(joint, params)
    n = enthalpy.n
    system = System(enthalpy.energy, fixed, x, cell_system.box, cell_system.species[:n], cell_system.dt_max)
    c = observables.elastic_moduli(system, x, fixed, minimiser=minimiser, adjoint=adjoint, throw=throw)
    return observables.stress_strain_tensor(c, observables.stress(system, x, fixed))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CellResult:
    """A relaxation at fixed pressure or stress, read by :func:`relaxed` (arrays).

    Attributes:
        positions: particle positions ``(N, dim)`` in the relaxed box.
        box: the relaxed box (columns are box vectors).
        fmax: largest particle force norm ``max_i |dE/dx_i|``.
        stress: the virial stress of the relaxed state (tension positive).
        stress_residual: ``|p_virial - p|`` (isotropic) or ``max |sigma -
            held|`` (full), ``held`` the stress the target implies at the
            relaxed box (:meth:`Enthalpy.held_stress`: ``-p I`` for a
            pressure, ``-p I + F tau F^T / det F`` for a stress).
        lowest_curvature: lowest curvature of the joint Hessian with its zero
            modes (:class:`JointZeroModes`) projected out (Lanczos, from above).
        converged: the relaxation converged, ``fmax`` and ``stress_residual``
            are within their tolerances, and the state is no saddle.
        relax: the :class:`~mdsens.RelaxResult` of the joint relaxation.
    """

    positions: Array
    box: Array
    fmax: Array
    stress: Array
    stress_residual: Array
    lowest_curvature: Array
    converged: Array
    relax: RelaxResult


def relaxed(
    cell_system: System,
    result: RelaxResult,
    params: Any = None,
    *,
    fmax: float = FORCE_TOLERANCE,
    stress_tolerance: float = STRESS_TOLERANCE,
) -> CellResult:
    """The :class:`CellResult` of ``result`` (``mdsens.relax(cell_system, ...)``
    at ``params``, default the cell system's): the particle forces and the
    stress residual under their own tolerances."""
    fmax = positive_float(fmax, "fmax", "mdsens.cell.relaxed")
    stress_tolerance = positive_float(stress_tolerance, "stress_tolerance", "mdsens.cell.relaxed")
    enthalpy = _enthalpy(cell_system, "mdsens.cell.relaxed")
    params = cell_system.params if params is None else cell_system.check_params(params)
    return _relaxed(enthalpy, result, params, fmax, stress_tolerance)


@jax.jit(static_argnums=(0, 3, 4))
def _relaxed(enthalpy: Enthalpy, result: RelaxResult, params: Any, fmax: float, stress_tolerance: float):
    joint = result.positions
    positions, fixed = enthalpy.state(joint, params)
    forces = -jax.grad(enthalpy.energy)(positions, fixed)
    dim = enthalpy.dim
    # The virial stress (1/V) dE/d eta of the symmetric strain I + eta applied to the current state.
    strained = strained_energy(enthalpy.energy)
    eta = jnp.zeros((dim, dim), joint.dtype)
    stress = jax.grad(lambda a: strained(positions, (fixed, a)))(eta) / jnp.abs(jnp.linalg.det(fixed["box"]))
    if enthalpy.mode == "isotropic":
        residual = jnp.abs(-jnp.trace(stress) / dim - params["pressure"])
    else:
        residual = jnp.max(jnp.abs(stress - enthalpy.held_stress(joint, params)))
    particle_fmax = max_force(forces)
    # result.converged includes the curvature certificate, with the joint zero modes.
    converged = result.converged & (particle_fmax <= fmax) & (residual <= stress_tolerance)
    return CellResult(
        positions, fixed["box"], particle_fmax, stress, residual, result.lowest_curvature, converged, result
    )
