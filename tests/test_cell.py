"""Equilibria at fixed pressure (mdsens.cell), against oracles that share no code with it:
a numpy lattice sum, ASE's FrechetCellFilter, dense pseudo-inverses, re-relaxed finite
differences and the thermodynamic bulk-modulus identity."""

from __future__ import annotations

import itertools
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


@pytest.fixture(scope="module")
def full_packing(packing):
    cs = cell.at_pressure(packing, PRESSURE, "full")
    return cs, mdsens.relax(cs)


@pytest.fixture(scope="module", params=["isotropic", "full"])
def relaxed_packing(request, packing):
    if request.param == "full":
        return request.getfixturevalue("full_packing")
    cs = cell.at_pressure(packing, PRESSURE, request.param)
    return cs, mdsens.relax(cs)


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


@pytest.mark.slow
def test_second_order_matches_finite_differences_of_the_first(relaxed_packing):
    """d2V*/dp2 by implicit differentiation to second order equals central differences
    (Richardson-extrapolated) of the implicit dV*/dp at re-relaxed neighbouring pressures."""
    cs, _ = relaxed_packing
    adjoint = mdsens.Implicit()

    def volume_at(pressure):
        params = cs.params | {"pressure": pressure}
        return cell.volume(cs, mdsens.equilibrium(cs, params, adjoint=adjoint), params)

    p = jnp.asarray(PRESSURE, jnp.float64)
    slope = jax.grad(volume_at)
    second = float(jax.jacfwd(slope)(p))

    def central(h):
        return (float(slope(p + h)) - float(slope(p - h))) / (2.0 * h)

    h = 1e-4 * PRESSURE
    expected = (4.0 * central(h) - central(2.0 * h)) / 3.0
    assert second == pytest.approx(expected, rel=1e-5)


# A target stress tensor: -p I plus a small deviator (2 % of p: the packing is soft in shear).
DEVIATOR = np.array([[-2e-4, 1e-4], [1e-4, 2e-4]])
TARGET = -PRESSURE * np.eye(2) + DEVIATOR


@pytest.fixture(scope="module")
def stressed(packing):
    cs = cell.at_stress(packing, TARGET)
    # Joint forces are particle forces times F: a little below 1e-12 keeps the particles' below it.
    return cs, mdsens.relax(cs, minimiser=mdsens.FIRE(fmax=5e-13))


@pytest.mark.slow
def test_hydrostatic_stress_is_at_pressure(packing, full_packing):
    at_p, result_p = full_packing
    at_s = cell.at_stress(packing, -PRESSURE * np.eye(2))

    def probe(cs, **load):  # enthalpy, its gradient and its derivative along the load
        tangent = _zero_tangent(cs.params, **load)
        return jax.jit(
            lambda j: (
                cs.energy(j, cs.params),
                jax.grad(cs.energy)(j, cs.params),
                jax.jvp(lambda p: cs.energy(j, p), (cs.params,), (tangent,))[1],
            )
        )

    probe_p, probe_s = probe(at_p, pressure=1.0), probe(at_s, stress=-np.eye(2))  # d/dsigma along -I is d/dp
    for key in jax.random.split(jax.random.PRNGKey(0), 3):
        joint = at_p.positions + 0.05 * jax.random.normal(key, at_p.positions.shape)
        (h_p, g_p, d_p), (h_s, g_s, d_s) = probe_p(joint), probe_s(joint)
        assert float(h_s) == float(h_p) and float(d_s) == pytest.approx(float(d_p), rel=1e-15)
        np.testing.assert_allclose(g_s, g_p, rtol=1e-15, atol=1e-15)
    result_s = mdsens.relax(at_s)
    np.testing.assert_allclose(
        cell.split(at_s, result_s.positions)[1], cell.split(at_p, result_p.positions)[1], atol=1e-12
    )


def test_stress_target_relaxes_to_held_stress(stressed, packing):
    """The virial stress of mdsens.observables at the relaxed box satisfies the
    stationarity identity sigma = -p I + F tau F^T / det F (computed here with numpy),
    and so differs from the target only at first order in strain times deviator;
    relaxing again with the relaxed box as the reference converges to the target."""
    cs, result = stressed
    c = cell.relaxed(cs, result)
    assert bool(c.converged) and c.fmax <= 1e-12 and c.stress_residual <= 1e-10 and c.lowest_curvature > 0
    positions, params = cell.fixed_box(cs, result.positions)
    measured = np.asarray(ob.stress(packing, positions, params))
    np.testing.assert_allclose(c.stress, measured, atol=1e-15)
    f = np.asarray(c.box) @ np.linalg.inv(np.asarray(packing.params["box"]))
    np.testing.assert_allclose(f, f.T, atol=1e-14)  # a symmetric stretch: no rotation
    held = -PRESSURE * np.eye(2) + f @ DEVIATOR @ f.T / np.linalg.det(f)
    np.testing.assert_allclose(measured, held, atol=1e-10)
    strain = np.max(np.abs(f - np.eye(2)))
    assert 1e-3 < strain < 0.1  # the box did move
    mismatch = [np.max(np.abs(measured - TARGET))]
    assert mismatch[0] <= 4 * strain * np.max(np.abs(DEVIATOR))
    # The relaxed box as the new reference (same cell system, new params): sigma -> the target.
    for _ in range(2):
        params = cs.params | {"box": c.box}
        joint = jnp.concatenate([c.positions, cs.positions[packing.n :]])
        c = cell.relaxed(cs, mdsens.relax(cs, joint, params, minimiser=mdsens.FIRE(fmax=5e-13)), params)
        assert bool(c.converged)
        mismatch.append(np.max(np.abs(np.asarray(c.stress) - TARGET)))
    assert mismatch[1] < 1e-2 * mismatch[0] and mismatch[2] < 1e-10


@pytest.mark.slow
def test_stress_derivatives_match_dense_and_finite_differences(stressed):
    cs, result = stressed
    x = result.positions
    reference = testing.dense_reference(cs.energy, x, cs.params)
    d_stress = np.array([[0.3, 1.0], [1.0, -0.2]])  # shear, with a hydrostatic part
    for tangent in (_zero_tangent(cs.params, stress=d_stress), jax.tree_util.tree_map(jnp.ones_like, cs.params)):
        _, dx, info = mdsens.equilibrium_jvp(cs, cs.params, tangent)
        assert bool(info.solve.converged)
        expected = (reference.J @ ravel_pytree(tangent)[0]).reshape(x.shape)
        assert testing.relative_error(dx, expected) < 1e-9
    cotangent = jax.random.normal(jax.random.PRNGKey(3), x.shape)
    _, dparams, info = mdsens.equilibrium_vjp(cs, cs.params, cotangent)
    assert bool(info.solve.converged)
    assert testing.relative_error(ravel_pytree(dparams)[0], reference.J.T @ np.asarray(cotangent).reshape(-1)) < 1e-9

    tangent = _zero_tangent(cs.params, stress=d_stress, epsilon=0.5)
    _, (dx, dbox) = jax.jvp(lambda p: cell.split(cs, mdsens.equilibrium(cs, p), p), (cs.params,), (tangent,))
    fd = [testing.finite_difference_sensitivity(cs, x, cs.params, tangent, step=h) for h in (1e-5, 2e-5)]
    _, (fd_x, fd_box) = jax.jvp(lambda j: cell.split(cs, j), (x,), (jnp.asarray((4.0 * fd[0] - fd[1]) / 3.0),))
    assert testing.relative_error(dbox, fd_box) < 1e-6
    centred = lambda v: np.asarray(v) - np.mean(np.asarray(v), axis=0)  # noqa: E731
    assert testing.relative_error(centred(dx), centred(fd_x)) < 1e-6


@pytest.mark.slow
def test_fixed_pressure_moduli_are_the_inverse_stress_compliance(full_packing, packing):
    """B of cell.elastic_moduli (C plus pre-stress terms) against the implicit
    derivative of the box with respect to a target stress, at_stress taking the
    relaxed box as its reference (F = I): d epsilon / d sigma_t = B^-1 (Mandel form)."""
    at_p, result = full_packing
    b = cell.elastic_moduli(at_p, positions=result.positions)
    positions, params = cell.fixed_box(at_p, result.positions)
    at_s = cell.at_stress(packing.replace(positions=positions, params=params), -PRESSURE * np.eye(2))
    basis = jnp.asarray(cell.strain_basis("full", 2))
    box0 = params["box"]

    def strain(s):
        p = at_s.params | {"stress": at_s.params["stress"] + jnp.tensordot(s, basis, axes=1)}
        box = cell.split(at_s, mdsens.equilibrium(at_s, p), p)[1]
        return jnp.einsum("aij,ij->a", basis, box @ jnp.linalg.inv(box0))

    compliance = jax.jacfwd(strain)(jnp.zeros(3))
    mandel = np.einsum("aij,ijkl,bkl->ab", basis, b, basis)
    assert testing.relative_error(np.linalg.inv(compliance), mandel) < 1e-7
    # The pre-stress terms matter: C alone is off by O(p / B).
    c = ob.elastic_moduli(packing, positions, params)
    assert testing.relative_error(np.einsum("aij,ijkl,bkl->ab", basis, c, basis), mandel) > 1e-4


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


# Nearest-neighbour Lennard-Jones fcc (32 atoms; the cutoff 1.45 sigma switches on at
# 1.16, beyond the first shell, and ends before the second): every atom is an inversion
# centre, so strain is affine and the moduli are lattice sums.
NN_CUTOFF = 1.45
NN_SHELL = np.array([v for v in itertools.product((-0.5, 0, 0.5), repeat=3) if np.count_nonzero(v) == 2])


def _nn_fcc_stress(a, strain):
    """Virial stress (tension positive) of the nearest-neighbour fcc lattice of cube edge a
    under the affine deformation I + strain; numpy."""
    f = np.eye(3) + strain
    r = a * NN_SHELL @ f.T
    d = np.linalg.norm(r, axis=1)
    s6 = d**-6.0
    dphi = 4 * (-12 * s6 * s6 + 6 * s6) / d
    return 0.5 * np.einsum("n,ni,nj->ij", dphi / d, r, r) / (a**3 / 4 * np.linalg.det(f))


def _nn_fcc_stress_strain(a, h=1e-5):
    """B_ijkl = d sigma_ij / d eps_kl by Richardson-extrapolated central differences."""
    b = np.zeros((3,) * 4)
    for k, l in itertools.product(range(3), repeat=2):
        e = np.zeros((3, 3))
        e[k, l] += h / 2
        e[l, k] += h / 2
        central = [(_nn_fcc_stress(a, t * e) - _nn_fcc_stress(a, -t * e)) / (2 * t * h) for t in (1, 2)]
        b[:, :, k, l] = (4 * central[0] - central[1]) / 3
    return b


@pytest.mark.slow
def test_lennard_jones_fcc_moduli_at_fixed_pressure():
    """At zero pressure the nearest-neighbour fcc crystal has a = 2^(2/3) sigma and
    C11 = 72, C12 = C44 = 36 (epsilon / sigma^3), and B scales with epsilon (dB/d epsilon
    = B); under pressure the pre-stress terms break the Cauchy relation, checked against
    a numpy finite-difference stress-strain of the affinely strained lattice."""
    a0 = 1.55
    system = systems.lennard_jones(32, density=4 / a0**3, cutoff=NN_CUTOFF, neighbor_list=False)
    grid = np.stack(np.meshgrid(*[np.arange(2)] * 3, indexing="ij"), -1).reshape(-1, 1, 3)
    system = system.replace(positions=jnp.asarray((grid + FCC[None]).reshape(-1, 3) * a0))
    cs = cell.at_pressure(system, 0.0)
    cubic = np.zeros((6, 6))
    cubic[:3, :3], cubic[3:, 3:] = 36.0 * (np.ones((3, 3)) + np.eye(3)), 36.0 * np.eye(3)
    for pressure in (2.0, 0.0):
        params = cs.params | {"pressure": jnp.asarray(pressure)}
        result = mdsens.relax(cs, params=params)
        c = cell.relaxed(cs, result, params)
        assert bool(c.converged)
        b = cell.elastic_moduli(cs, params, positions=result.positions)
        a = float(c.box[0, 0]) / 2
        if pressure:
            np.testing.assert_allclose(b, _nn_fcc_stress_strain(a), atol=1e-9 * 72)
            assert float(b[0, 0, 1, 1] - b[0, 1, 0, 1]) == pytest.approx(
                2 * pressure, rel=1e-9
            )  # not Cauchy's C12 = C44
    assert a == pytest.approx(2 ** (2 / 3), rel=1e-13)
    np.testing.assert_allclose(ob.to_voigt(b), cubic, atol=1e-10 * 72)
    tangent = _zero_tangent(cs.params, epsilon=np.ones((1, 1)))
    _, db = jax.jvp(lambda p: cell.elastic_moduli(cs, p, positions=result.positions), (cs.params,), (tangent,))
    np.testing.assert_allclose(db, b, atol=1e-10 * 72)


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
    with pytest.raises(ValueError, match="symmetric"):
        cell.at_stress(packing, [[-0.1, 0.01], [0.0, -0.1]])
    with pytest.raises(ValueError, match="matrix"):
        cell.at_stress(packing, -0.1)
    with pytest.raises(ValueError, match="neighbor"):
        cell.at_stress(systems.soft_sphere_packing(16, dim=2, neighbor_list=True), -0.1 * np.eye(2))
    with pytest.raises(ValueError, match="cell system"):
        cell.elastic_moduli(packing)
