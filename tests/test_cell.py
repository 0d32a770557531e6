"""Equilibria at fixed pressure (mdsens.cell), against oracles that share no code with it:
a numpy lattice sum, ASE's FrechetCellFilter, dense pseudo-inverses, re-relaxed finite
differences and the thermodynamic bulk-modulus identity."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import mdsens
from mdsens import cell, systems, testing
from mdsens import observables as ob

PRESSURE = 0.01


def _zero_tangent(params, **entries):
    return jax.tree_util.tree_map(jnp.zeros_like, params) | {k: jnp.asarray(v, jnp.float64) for k, v in entries.items()}


@pytest.fixture(scope="module")
def packing():
    return systems.soft_sphere_packing(16, dim=2, phi=0.9, neighbor_list=False)


@pytest.fixture(scope="module", params=["isotropic", "full"])
def relaxed_packing(request, packing):
    cs = cell.at_pressure(packing, PRESSURE, request.param)
    result = mdsens.relax(cs)
    return cs, result


def test_relaxes_to_both_tolerances(relaxed_packing, packing):
    cs, result = relaxed_packing
    c = cell.relaxed(cs, result)
    assert bool(c.converged) and c.fmax <= 1e-12 and c.stress_residual <= 1e-10
    assert c.lowest_curvature > 0
    # The pressure of the relaxed state, by mdsens's fixed-box observable, is the target.
    positions, params = cell.fixed_box(cs, result.positions)
    assert ob.pressure(packing, positions, params) == pytest.approx(PRESSURE, abs=1e-10)
    if cs.energy.fn.mode == "full":
        np.testing.assert_allclose(ob.stress(packing, positions, params), -PRESSURE * np.eye(2), atol=1e-10)


def test_forward_and_reverse_match_dense_pseudo_inverse(relaxed_packing):
    cs, result = relaxed_packing
    adjoint = mdsens.Implicit()  # the joint zero modes come from the enthalpy (zero_modes='auto')
    x = result.positions
    reference = testing.dense_reference(cs.energy, x, cs.params)
    for tangent in (_zero_tangent(cs.params, pressure=1.0), jax.tree_util.tree_map(jnp.ones_like, cs.params)):
        _, dx, info = mdsens.equilibrium_jvp(cs, cs.params, tangent, adjoint=adjoint)
        assert bool(info.solve.converged)
        expected = (reference.J @ ravel_pytree(tangent)[0]).reshape(x.shape)
        assert testing.relative_error(dx, expected) < 1e-9
    cotangent = jax.random.normal(jax.random.PRNGKey(3), x.shape)  # nonzero mean: translations matter
    _, dparams, info = mdsens.equilibrium_vjp(cs, cs.params, cotangent, adjoint=adjoint)
    assert bool(info.solve.converged)
    expected = reference.J.T @ np.asarray(cotangent).reshape(-1)
    assert testing.relative_error(ravel_pytree(dparams)[0], expected) < 1e-9


def test_box_and_positions_match_re_relaxed_finite_differences(relaxed_packing):
    cs, result = relaxed_packing
    adjoint = mdsens.Implicit()  # the joint zero modes come from the enthalpy (zero_modes='auto')
    tangent = _zero_tangent(cs.params, pressure=1.0, epsilon=0.5)

    def state(params):
        return cell.split(cs, mdsens.equilibrium(cs, params, adjoint=adjoint), params)

    _, (dx, dbox) = jax.jvp(state, (cs.params,), (tangent,))
    # Richardson-extrapolated central differences: the response is strongly nonlinear near jamming.
    fd = [testing.finite_difference_sensitivity(cs, result.positions, cs.params, tangent, step=h) for h in (1e-5, 2e-5)]
    fd_joint = (4.0 * fd[0] - fd[1]) / 3.0
    _, (fd_x, fd_box) = jax.jvp(lambda j: cell.split(cs, j), (result.positions,), (jnp.asarray(fd_joint),))
    # The box is gauge-free; positions are compared up to a rigid translation.
    assert testing.relative_error(dbox, fd_box) < 1e-6
    centred = lambda v: np.asarray(v) - np.mean(np.asarray(v), axis=0)  # noqa: E731
    assert testing.relative_error(centred(dx), centred(fd_x)) < 1e-6


def test_bulk_modulus_is_inverse_volume_sensitivity(relaxed_packing, packing):
    """B = -V dp/dV at fixed pressure, against the fixed-box moduli of mdsens.observables
    with their pre-stress terms: isotropic strain (isotropic mode) or hydrostatic stress
    (full mode, the inverse compliance)."""
    cs, result = relaxed_packing
    adjoint = mdsens.Implicit()  # the joint zero modes come from the enthalpy (zero_modes='auto')

    def volume(params):
        return cell.volume(cs, mdsens.equilibrium(cs, params, adjoint=adjoint), params)

    v, dv = jax.jvp(volume, (cs.params,), (_zero_tangent(cs.params, pressure=1.0),))
    bulk = -v / dv
    positions, params = cell.fixed_box(cs, result.positions)
    moduli = ob.elastic_response(packing, positions, params)
    assert bool(moduli.ok)
    tensor = np.asarray(ob.stress_strain_tensor(moduli.stiffness, moduli.stress))  # d sigma / d eps
    if cs.energy.fn.mode == "isotropic":
        expected = moduli.bulk_modulus
    else:
        basis = cell.strain_basis("full", 2)
        matrix = np.einsum("aij,ijkl,bkl->ab", basis, tensor, basis)
        identity = np.einsum("aii->a", basis)
        expected = 1.0 / (identity @ np.linalg.solve(matrix, identity))
    assert float(bulk) == pytest.approx(float(expected), rel=1e-7)
    assert float(cell.packing_fraction(cs, result.positions)) == pytest.approx(
        float(cell.packing_fraction(cs, cs.positions)) * float(cell.volume(cs, cs.positions)) / float(v), rel=1e-12
    )


# Lennard-Jones fcc at zero pressure: mdsens's cut-off pair energy summed by hand.
CUTOFF = 2.0
FCC = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])


def _lj_force_numpy(r, sigma):
    """d/dr of 4 (s^12 - s^6) S(u), S the degree-9 smoothstep between 0.8 and 1 times the cutoff."""
    s6 = (sigma / r) ** 6
    phi, dphi = 4 * (s6 * s6 - s6), 4 * (-12 * s6 * s6 + 6 * s6) / r
    onset, width = 0.8 * CUTOFF, 0.2 * CUTOFF
    u = np.clip((r - onset) / width, 0, 1)
    switch = 1 - u**5 * (126 - 420 * u + 540 * u**2 - 315 * u**3 + 70 * u**4)
    dswitch = -630 * u**4 * (1 - u) ** 4 / width
    return np.where(r < CUTOFF, dphi * switch + phi * dswitch, 0.0)


def _fcc_lattice_constant(sigma):
    from scipy.optimize import brentq

    cells = np.stack(np.meshgrid(*[np.arange(-4, 5)] * 3, indexing="ij"), -1).reshape(-1, 1, 3)
    shells = np.linalg.norm((cells + FCC[None]).reshape(-1, 3), axis=1)
    shells = shells[shells > 0]
    # Zero pressure: d(energy per atom)/da = sum_R |R| phi'(a |R|) / 2 = 0.
    return brentq(lambda a: np.sum(shells * _lj_force_numpy(a * shells, sigma)), 1.3, 1.8, xtol=1e-15)


@pytest.mark.slow
def test_lennard_jones_fcc_zero_pressure_lattice_constant():
    a0, cells = 1.6, 3
    system = systems.lennard_jones(108, density=4 / a0**3, cutoff=CUTOFF, neighbor_list=False)
    grid = np.stack(np.meshgrid(*[np.arange(cells)] * 3, indexing="ij"), -1).reshape(-1, 1, 3)
    system = system.replace(positions=jnp.asarray((grid + FCC[None]).reshape(-1, 3) * a0))
    cs = cell.at_pressure(system, 0.0)
    c = cell.relaxed(cs, mdsens.relax(cs))
    assert bool(c.converged)
    expected = _fcc_lattice_constant(1.0)
    assert float(c.box[0, 0]) / cells == pytest.approx(expected, rel=1e-13)
    np.testing.assert_allclose(c.box, np.eye(3) * expected * cells, atol=1e-12)

    adjoint = mdsens.Implicit()  # the joint zero modes come from the enthalpy (zero_modes='auto')

    def lattice_constant(params):
        return cell.split(cs, mdsens.equilibrium(cs, params, adjoint=adjoint), params)[1][0, 0] / cells

    _, da_dsigma = jax.jvp(lattice_constant, (cs.params,), (_zero_tangent(cs.params, sigma=np.ones((1, 1))),))
    _, da_depsilon = jax.jvp(lattice_constant, (cs.params,), (_zero_tangent(cs.params, epsilon=np.ones((1, 1))),))
    h = 1e-4  # Richardson-extrapolated central differences of the numpy root
    central = lambda h: (_fcc_lattice_constant(1 + h) - _fcc_lattice_constant(1 - h)) / (2 * h)  # noqa: E731
    assert float(da_dsigma) == pytest.approx((4 * central(h / 2) - central(h)) / 3, rel=1e-8)
    assert abs(float(da_depsilon)) < 1e-12  # zero pressure is invariant under scaling the energy


# ASE's Lennard-Jones calculator (smooth=True), reproduced exactly as a JAX energy.
ASE_RC, ASE_RO = 1.8, 1.4


def _ase_lennard_jones(x, p):
    box = p["box"]
    d = x[:, None, :] - x[None, :, :]
    fractional = d @ jnp.linalg.inv(box).T
    d = (fractional - jnp.round(fractional)) @ box.T
    i, j = np.triu_indices(x.shape[0], 1)
    r2 = jnp.sum(d[i, j] ** 2, axis=-1)
    c6 = (p["sigma"] ** 2 / r2) ** 3
    rc2, ro2 = ASE_RC**2, ASE_RO**2
    inner = jnp.clip(r2, ro2, rc2)
    switch = (rc2 - inner) ** 2 * (rc2 + 2 * inner - 3 * ro2) / (rc2 - ro2) ** 3
    return jnp.sum(4 * p["epsilon"] * (c6 * c6 - c6) * jnp.where(r2 < ro2, 1.0, jnp.where(r2 < rc2, switch, 0.0)))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["isotropic", "full"])
def test_matches_ase_frechet_cell_filter(mode):
    ase = pytest.importorskip("ase")
    from ase.calculators.lj import LennardJones
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS

    start = systems.lennard_jones(64, density=1.0, cutoff=ASE_RC, neighbor_list=False, seed=1).positions
    box = jnp.array([[4.0, 0.3, 0.0], [0.0, 4.1, 0.2], [0.0, 0.0, 3.9]])  # a sheared, disordered cell
    system = mdsens.System.from_energy(_ase_lennard_jones, {"sigma": 1.0, "epsilon": 1.0, "box": box}, start, box=box)
    fixed = mdsens.relax(system, minimiser=mdsens.FIRE(fmax=1e-6))  # a common start in one basin
    atoms = ase.Atoms("Ar64", positions=np.asarray(fixed.positions), cell=np.asarray(box).T, pbc=True)
    atoms.calc = LennardJones(sigma=1.0, epsilon=1.0, rc=ASE_RC, ro=ASE_RO, smooth=True)
    assert atoms.get_potential_energy() == pytest.approx(
        float(system.energy(fixed.positions, system.params)), rel=1e-14
    )

    pressure = 0.5
    cs = cell.at_pressure(system, pressure, mode)
    cs = cs.replace(positions=cs.positions.at[:64].set(fixed.positions))
    result = mdsens.relax(cs)
    c = cell.relaxed(cs, result)
    assert bool(c.converged)

    filtered = FrechetCellFilter(atoms, scalar_pressure=pressure, hydrostatic_strain=mode == "isotropic")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's logm accuracy notes inside the filter
        assert BFGS(filtered, logfile=None).run(fmax=1e-8, steps=2000)
    assert filtered.get_potential_energy() == pytest.approx(float(result.energy), rel=1e-12)  # the enthalpy
    # ASE's cell may come out rigidly rotated: compare the metric and fractional positions.
    cell_rows, box_star = np.asarray(atoms.cell[:]), np.asarray(c.box)
    np.testing.assert_allclose(cell_rows @ cell_rows.T, box_star.T @ box_star, atol=1e-9)
    shift = atoms.get_scaled_positions(wrap=False) - np.linalg.solve(box_star, np.asarray(c.positions).T).T
    shift -= np.round(shift)
    assert np.max(np.abs(shift - shift.mean(axis=0))) < 1e-9


def test_bad_inputs(packing):
    with pytest.raises(ValueError, match="mode"):
        cell.at_pressure(packing, 0.1, "shear")
    with pytest.raises(ValueError, match="scalar"):
        cell.at_pressure(packing, [0.1, 0.2])
    with pytest.raises(ValueError, match="neighbor"):
        cell.at_pressure(systems.soft_sphere_packing(16, dim=2, neighbor_list=True), 0.1)
    with pytest.raises(ValueError, match="periodic"):
        cell.at_pressure(systems.lennard_jones_cluster(4), 0.1)
    with pytest.raises(ValueError, match="cell system"):
        cell.split(packing, packing.positions)
