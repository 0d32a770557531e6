"""Observables and elastic moduli of relaxed packings, against independent oracles:
numpy sums over contacts, jax-md's ``athermal_moduli`` (a peer implementation),
finite differences of the stress of re-relaxed strained states, and finite
differences of re-relaxed states for the sensitivities.

Every test uses one 2D packing system (N=32), so the compiled relaxation and
moduli are shared; the unstable state is the same system with equal diameters
on a compressed honeycomb lattice (a saddle)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_md import elasticity as jax_md_elasticity

from mdsens import CG, FIRE, Implicit, System, relax, systems
from mdsens import observables as ob
from mdsens.observables import elasticity


@functools.cache
def packing() -> tuple[System, jax.Array]:
    """A jammed 2D bidisperse harmonic packing (N=32, phi=0.9), relaxed to fmax 1e-12."""
    s = systems.soft_sphere_packing(32, dim=2, phi=0.9, seed=3)
    r = relax(s)
    assert bool(r.converged)
    return s, r.positions


@functools.cache
def response() -> ob.ElasticModuli:
    s, x = packing()
    return ob.elastic_response(s, x, s.params)


# --- observables against numpy ---------------------------------------------------------


def numpy_contacts(x, box, d):
    """(i, j, dr, r, sigma) of every overlapping pair i < j under the minimum image."""
    x, box, d = map(np.asarray, (x, box, d))
    inverse, out = np.linalg.inv(box), []
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            f = inverse @ (x[i] - x[j])
            dr = box @ (f - np.round(f))
            r, sigma = np.linalg.norm(dr), 0.5 * (d[i] + d[j])
            if r < sigma:
                out.append((i, j, dr, r, sigma))
    return out


def numpy_rattlers(contact_matrix, dim):
    active = np.ones(len(contact_matrix), bool)
    while True:
        count = (contact_matrix & active[None, :]).sum(axis=1)
        new = active & (count >= dim + 1)
        if (new == active).all():
            return ~active
        active = new


def test_observables_match_numpy_sums_over_contacts():
    s, x = packing()
    p = s.params
    d = np.asarray(p["diameters"])[np.asarray(s.species)]
    eps, alpha, box = float(p["epsilon"]), float(p["alpha"]), np.asarray(p["box"])
    pairs = numpy_contacts(x, box, d)
    volume = abs(np.linalg.det(box))
    energy = sum(eps / alpha * (1 - r / sigma) ** alpha for _, _, _, r, sigma in pairs)
    # Virial: (1/V) sum phi'(r) dr dr^T / r with phi' = -eps/sigma (1 - r/sigma)^(alpha-1).
    stress = sum(-eps / sigma * (1 - r / sigma) ** (alpha - 1) * np.outer(dr, dr) / r for _, _, dr, r, sigma in pairs)
    stress = stress / volume
    assert float(ob.energy(s, x, p)) == pytest.approx(energy, rel=1e-12)
    np.testing.assert_allclose(ob.stress(s, x, p), stress, rtol=1e-10, atol=1e-14)
    assert float(ob.pressure(s, x, p)) == pytest.approx(-np.trace(stress) / 2, rel=1e-10)
    assert float(ob.pressure(s, x, p)) > 0
    assert float(ob.volume(p)) == pytest.approx(volume)

    contact = np.zeros((len(x), len(x)), bool)
    overlap = np.zeros((len(x), len(x)))
    for i, j, _, r, sigma in pairs:
        contact[i, j] = contact[j, i] = True
        overlap[i, j] = overlap[j, i] = 1 - r / sigma
    np.testing.assert_array_equal(ob.contacts(s, x, p), contact)
    np.testing.assert_allclose(ob.overlaps(s, x, p), overlap, atol=1e-14)
    rattler = numpy_rattlers(contact, 2)
    np.testing.assert_array_equal(ob.rattlers(contact, 2), rattler)
    keep = ~rattler
    assert float(ob.contact_number(s, x, p)) == pytest.approx(contact[np.ix_(keep, keep)].sum() / keep.sum())
    assert float(ob.contact_number(s, x, p, exclude_rattlers=False)) == pytest.approx(contact.sum() / len(x))
    # The response's stress is the same virial.
    np.testing.assert_allclose(response().stress, stress, rtol=1e-10, atol=1e-14)


def test_rattlers_are_removed_iteratively():
    # A triangle of mutual contacts (3 = dim + 1 each in 2D) with a chain hanging off it:
    # 3 -> 4 -> 5 leave one after another; an isolated particle 6 is a rattler too.
    c = np.zeros((7, 7), bool)
    for i, j in [(0, 1), (1, 2), (0, 2), (0, 3), (1, 3), (3, 4), (4, 5), (2, 4)]:
        c[i, j] = c[j, i] = True
    expected = numpy_rattlers(c, 2)
    np.testing.assert_array_equal(expected, [True] * 7)  # everything unravels in 2D
    np.testing.assert_array_equal(ob.rattlers(c, 2), expected)
    np.testing.assert_array_equal(ob.rattlers(c, 1), numpy_rattlers(c, 1))
    assert not bool(jnp.all(ob.rattlers(c, 1)))
    with pytest.raises(ValueError, match="square"):
        ob.rattlers(np.zeros((3, 2), bool), 2)


# --- moduli against jax-md and finite differences --------------------------------------


def athermal(system: System, positions: jax.Array, params) -> jax.Array:
    """jax-md's moduli: the energy in fractional coordinates, strain as ``perturbation``."""
    box0 = params["box"]

    def energy_fractional(s, perturbation=None, **unused):
        box = box0 if perturbation is None else perturbation @ box0
        return system.energy(s @ box.T, {**params, "box": box})

    fractional = positions @ jnp.linalg.inv(box0).T
    c, converged = jax_md_elasticity.athermal_moduli(
        energy_fractional, tether_strength=1e-12, cg_tol=1e-13, check_convergence=True
    )(fractional, box0)
    assert bool(converged)
    return c


def test_matches_jax_md_athermal_moduli_on_jammed_packing():
    s, x = packing()
    res = response()
    assert bool(res.ok) and float(res.pressure) > 1e-3  # jammed, a true minimum
    reference = athermal(s, x, s.params)
    scale = float(jnp.max(jnp.abs(reference)))
    assert float(jnp.max(jnp.abs(res.stiffness - reference))) <= 1e-6 * scale
    # The non-affine part matters here: the Born term alone is far off.
    assert float(jnp.max(jnp.abs(res.born - reference))) > 1e-2 * scale
    c = np.asarray(res.stiffness)  # symmetries C_ijkl = C_jikl = C_klij
    np.testing.assert_allclose(c, c.transpose(1, 0, 2, 3), atol=1e-12)
    np.testing.assert_allclose(c, c.transpose(2, 3, 0, 1), atol=1e-12)


def test_public_elastic_moduli_is_the_stiffness_tensor():
    s, x = packing()
    c = ob.elastic_moduli(s, x, s.params)
    assert c.shape == (2, 2, 2, 2)
    np.testing.assert_allclose(c, response().stiffness, rtol=0, atol=1e-12)
    # Options are values: equal ones written anew reuse the compiled moduli.
    compiled = elasticity._stiffness._cache_size()
    again = ob.elastic_moduli(s, x, s.params, minimiser=FIRE(fmax=1e-12), adjoint=Implicit(solver=CG(rtol=1e-10)))
    assert elasticity._stiffness._cache_size() == compiled
    np.testing.assert_array_equal(again, c)


def test_matches_finite_differences_of_stress_with_rerelaxation():
    s, x = packing()
    res = response()
    measured = ob.finite_difference_moduli(s, x, s.params, step=1e-6)
    predicted = ob.stress_strain_tensor(res.stiffness, res.stress)
    scale = float(jnp.max(jnp.abs(predicted)))
    assert float(jnp.max(jnp.abs(measured - predicted))) <= 1e-5 * scale
    # Without the pressure terms C itself does not match the stress increments.
    assert float(jnp.max(jnp.abs(measured - res.stiffness))) > 1e-3 * scale
    # Bulk modulus = -V dp/dV: the stress response to an isotropic strain.
    dp = -np.einsum("iikk->", np.asarray(measured)) / 4
    assert float(res.bulk_modulus) == pytest.approx(-dp, rel=1e-5)


# --- conversions ---------------------------------------------------------------------


@pytest.mark.parametrize("dim", [2, 3])
def test_voigt_and_mandel_forms(dim):
    rng = np.random.default_rng(dim)
    m = rng.normal(size=(3 if dim == 2 else 6,) * 2)
    m = m + m.T
    c = ob.from_voigt(m)
    # The energy density eps:C:eps equals e.M.e with engineering shear strains (Voigt)
    # and sqrt(2)-scaled shear strains (Mandel).
    eps = rng.normal(size=(dim, dim))
    eps = eps + eps.T
    pairs = [(0, 0), (1, 1), (0, 1)] if dim == 2 else [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]
    voigt_strain = np.array([eps[i, j] * (1 if i == j else 2) for i, j in pairs])
    mandel_strain = np.array([eps[i, j] * (1 if i == j else math.sqrt(2)) for i, j in pairs])
    w = float(np.einsum("ij,ijkl,kl->", eps, np.asarray(c), eps))
    assert w == pytest.approx(voigt_strain @ np.asarray(ob.to_voigt(c)) @ voigt_strain)
    assert w == pytest.approx(mandel_strain @ np.asarray(ob.to_mandel(c)) @ mandel_strain)
    np.testing.assert_allclose(ob.to_voigt(c), m)
    with pytest.raises(ValueError, match="Voigt"):
        ob.from_voigt(np.zeros((4, 4)))


def test_isotropic_moduli_of_isotropic_tensor_3d():
    lam, mu, d = 0.7, 0.3, np.eye(3)
    c = lam * np.einsum("ij,kl->ijkl", d, d) + mu * (np.einsum("ik,jl->ijkl", d, d) + np.einsum("il,jk->ijkl", d, d))
    bulk, shear = ob.isotropic_moduli(jnp.asarray(c))
    assert float(bulk) == pytest.approx(lam + 2 * mu / 3)
    assert float(shear) == pytest.approx(mu)


# --- sensitivities of observables ------------------------------------------------------


def central_difference(f, params, tangent, h):
    plus = jax.tree_util.tree_map(lambda p, t: p + h * t, params, tangent)
    minus = jax.tree_util.tree_map(lambda p, t: p - h * t, params, tangent)
    return (f(plus) - f(minus)) / (2 * h)


def test_pressure_and_shear_modulus_sensitivities_against_rerelaxed_finite_differences():
    # p and G (O'Hern et al.'s: with the pressure terms) of x*(params), as functions of
    # the diameters and epsilon: forward mode for both, reverse mode for p (reverse mode
    # of G costs another ~60 s of compilation). This small fixed-box packing has G < 0:
    # stable to particle motions, not to shear of the box (Dagois-Bohy et al., PRL 109,
    # 095703, 2012).
    s, x = packing()
    pressure = ob.relaxed_observable(s, ob.pressure, x)

    def observables(params):
        stress = ob.relaxed_observable(s, ob.stress, x)(params)
        return jnp.stack([-jnp.trace(stress) / 2, ob.isotropic_moduli(ob.elastic_moduli(s, x, params), stress)[1]])

    tangent = jax.tree_util.tree_map(jnp.zeros_like, s.params)
    tangent["diameters"] = jnp.array([0.3, 1.0])
    tangent["epsilon"] = jnp.asarray(0.7)
    value, forward = jax.jvp(observables, (s.params,), (tangent,))
    gradient = jax.grad(pressure)(s.params)
    reverse = sum(float(jnp.vdot(gradient[k], tangent[k])) for k in ("diameters", "epsilon"))

    def rerelaxed(params):
        res = ob.elastic_response(s, x, params)
        assert bool(res.ok)
        return np.array([float(res.pressure), float(res.shear_modulus)])

    fd = central_difference(rerelaxed, s.params, tangent, 1e-5)
    assert np.all(np.abs(forward) > 1e-2)
    assert float(forward[0]) == pytest.approx(fd[0], rel=1e-6)
    # FD steps from 1e-4 to 1e-6 scatter by ~1e-4 relative for G (the relaxations' fmax).
    assert float(forward[1]) == pytest.approx(fd[1], rel=2e-4)
    assert reverse == pytest.approx(float(forward[0]), rel=1e-10)
    # Harmonic spheres: x* does not depend on epsilon, so p is proportional to it.
    assert float(gradient["epsilon"]) == pytest.approx(float(value[0] / s.params["epsilon"]), rel=1e-10)


# --- bad input -----------------------------------------------------------------------


def test_free_cluster_has_no_deformable_box():
    s = systems.lennard_jones_cluster(4, dim=2)
    for fn in (ob.elastic_moduli, ob.elastic_response, ob.stress, ob.pressure, ob.finite_difference_moduli):
        with pytest.raises(ValueError, match="no deformable periodic box"):
            fn(s, s.positions, s.params)
    with pytest.raises(ValueError, match="no deformable periodic box"):
        ob.strain_response(s, s.positions, s.params, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="diameters"):
        ob.contacts(s, s.positions, s.params)


def honeycomb(bond: float, cells: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """Positions and box of a honeycomb lattice (4-site rectangular cells)."""
    w, h = math.sqrt(3) * bond, 3 * bond
    basis = np.array([(0, 0), (w / 2, bond / 2), (w / 2, 1.5 * bond), (0, 2 * bond)])
    x = [basis + np.array([i * w, j * h]) for i in range(cells[0]) for j in range(cells[1])]
    return jnp.asarray(np.concatenate(x) + 0.1), jnp.diag(jnp.asarray([cells[0] * w, cells[1] * h]))


def test_unstable_configuration_is_flagged_and_raises():
    # Equal discs on a honeycomb lattice with bonds compressed to 0.9 sigma: every
    # force vanishes by symmetry, but the lattice is a saddle (z = 3 < 4 floppy modes,
    # softened further by the compressed contacts).
    s, _ = packing()
    x, box = honeycomb(0.9, (4, 2))
    params = {**s.params, "diameters": jnp.array([1.0, 1.0]), "box": box}
    assert float(jnp.max(jnp.abs(jax.grad(s.energy)(x, params)))) < 1e-13
    hessian = jax.jit(jax.hessian(s.energy))(x, params).reshape(x.size, x.size)
    lowest = float(jnp.linalg.eigvalsh(hessian)[0])
    assert lowest < -1e-3  # the oracle: not a minimum
    # The relaxation's certificate finds it (a Lanczos estimate from above of the lowest eigenvalue).
    with pytest.warns(RuntimeWarning, match="saddle"):
        result = relax(s, x, params)
    assert result.reason == "saddle" and lowest - 1e-9 <= float(result.lowest_curvature) < -1e-3
    res = ob.elastic_response(s, x, params)  # flagged, never raising
    assert not bool(res.relaxed) and not bool(res.ok)
    with pytest.raises(FloatingPointError, match="saddle"):
        ob.elastic_moduli(s, x, params)
    # Not an equilibrium at all: a relaxation cut short is flagged, or raises.
    short = ob.elastic_response(s, s.positions, s.params, minimiser=FIRE(max_steps=1))
    assert not bool(short.relaxed) and not bool(short.ok)
    with pytest.raises(FloatingPointError, match="did not reach fmax"):
        ob.elastic_moduli(s, s.positions, s.params, minimiser=FIRE(max_steps=1))


def test_strain_beyond_linear_response_is_flagged():
    s, x = packing()
    res = response()
    small = ob.strain_response(s, x, s.params, np.array([[0.0, 1e-7], [1e-7, 0.0]]), moduli=res)
    assert small.linear and small.relative_error < 1e-3 and small.contacts_changed == 0
    with pytest.warns(RuntimeWarning, match="beyond linear response"):
        large = ob.strain_response(s, x, s.params, np.array([[0.0, 0.05], [0.05, 0.0]]), moduli=res)
    assert not large.linear and large.contacts_changed > 0
    with pytest.raises(ValueError, match="linear response"):
        ob.finite_difference_moduli(s, x, s.params, step=1e-2)
    with pytest.raises(ValueError, match="beyond linear response"):
        ob.strain_response(s, x, s.params, np.diag([0.6, 0.0]), moduli=res)
    with pytest.raises(ValueError, match="symmetric"):
        ob.strain_response(s, x, s.params, np.array([[0.0, 1e-3], [0.0, 0.0]]), moduli=res)
