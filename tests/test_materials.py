"""Materials potentials: Stillinger-Weber against jax-md's and against its
analytic crystal energies, Gupta gold against jax-md's own cluster function,
parameter derivatives against finite differences, and the vacancy example:
sensitivities of the relaxed vacancy against re-relaxed finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_md import energy as jmd_energy
from jax_md import space

from mdsens import defects, systems
from mdsens.systems.materials import GUPTA_CUTOFF, GUPTA_GOLD, SW_VACANCY_FORMATION_ENERGY
from mdsens.systems.stillinger_weber import SILICON


def perturbed(system: systems.System, scale: float, seed: int = 0) -> jax.Array:
    noise = np.random.default_rng(seed).normal(scale=scale, size=system.positions.shape)
    return system.positions + noise


def central_difference(fn, params: dict, name: str, step: float) -> float:
    up, down = ({**params, name: params[name] + s * step} for s in (1.0, -1.0))
    return float((fn(up) - fn(down)) / (2.0 * step))


@pytest.fixture(scope="module")
def silicon() -> systems.System:
    return systems.stillinger_weber_silicon(cells=2)


def test_stillinger_weber_matches_jax_md(silicon: systems.System) -> None:
    x = perturbed(silicon, 0.15)
    side = float(silicon.box[0, 0])
    displacement, _ = space.periodic(side)
    p = SILICON
    reference = jmd_energy.stillinger_weber(
        displacement, sigma=p["sigma"], A=p["A"], B=p["B"], lam=p["lambda"], gamma=p["gamma"],
        epsilon=p["epsilon"], cutoff=p["a"] * p["sigma"],
    )  # fmt: skip
    # jax-md adds 1e-7 to the distances in its cosines: agreement to ~1e-7, not to rounding.
    value, forces = jax.jit(jax.value_and_grad(silicon.energy))(x, silicon.params)
    value_reference, forces_reference = jax.jit(jax.value_and_grad(reference))(x)
    assert float(value) == pytest.approx(float(value_reference), rel=1e-6)
    np.testing.assert_allclose(forces, forces_reference, rtol=0, atol=1e-5 * float(jnp.abs(forces).max()))


def test_stillinger_weber_crystal_energies_are_analytic(silicon: systems.System) -> None:
    # Diamond at the pair minimum: no three-body energy, two bonds of depth epsilon per atom.
    epsilon = SILICON["epsilon"]
    fn = jax.jit(silicon.energy)  # any number of atoms: one function
    assert float(fn(silicon.positions, silicon.params)) / silicon.n == pytest.approx(-2 * epsilon, rel=1e-8)
    # Removing an atom breaks four bonds and leaves every angle tetrahedral: E_f = 2 epsilon unrelaxed.
    vacancy = systems.stillinger_weber_silicon(cells=2, vacancy=True, push=0.0)
    e_f = fn(vacancy.positions, vacancy.params) - (63 / 64) * fn(silicon.positions, silicon.params)
    assert float(e_f) == pytest.approx(2 * epsilon, rel=1e-8)


def test_stillinger_weber_parameter_derivatives(silicon: systems.System) -> None:
    # Every parameter, including a and sigma that move the cutoff (pairs near it in this configuration).
    x = perturbed(silicon, 0.3, seed=1)
    fn = jax.jit(lambda p: silicon.energy(x, p))
    gradient = jax.grad(fn)(silicon.params)
    for name in SILICON:
        expected = central_difference(fn, silicon.params, name, 1e-5)
        assert float(gradient[name]) == pytest.approx(expected, rel=1e-6, abs=1e-7), name


def test_stillinger_weber_too_many_neighbours_is_nan() -> None:
    # Squeezed to half the lattice constant, each atom has 16 atoms within the cutoff.
    squeezed = systems.stillinger_weber_silicon(cells=2, lattice_constant=2.7155 * 1.5)
    assert bool(jnp.isnan(jax.jit(squeezed.energy)(squeezed.positions, squeezed.params)))


def test_gupta_gold_matches_jax_md() -> None:
    gold = systems.gupta_gold(cells=4)
    x = perturbed(gold, 0.05)
    displacement, _ = space.periodic(float(gold.box[0, 0]))
    reference = jmd_energy.gupta_gold55(displacement, cutoff=GUPTA_CUTOFF)
    fn = jax.jit(lambda p: gold.energy(x, p))
    assert float(fn(gold.params)) == pytest.approx(float(jax.jit(reference)(x)), rel=1e-12)
    gradient = jax.grad(fn)(gold.params)
    for name in GUPTA_GOLD:
        expected = central_difference(fn, gold.params, name, 1e-6)
        assert float(gradient[name]) == pytest.approx(expected, rel=1e-6), name
    # The perfect crystal sits at the potential's zero-pressure lattice constant.
    scaled = jax.jit(
        jax.value_and_grad(lambda s: gold.energy(gold.positions * s, {**gold.params, "box": gold.box * s}))
    )
    value, pressure = scaled(1.0)
    assert abs(float(pressure)) < 1e-3 * abs(float(value))


@pytest.fixture(scope="module")
def vacancy() -> tuple[systems.System, systems.System, defects.VacancyFormation]:
    perfect = systems.stillinger_weber_silicon(cells=2)
    system = systems.stillinger_weber_silicon(cells=2, vacancy=True)
    return perfect, system, defects.vacancy_formation(perfect, system)


def test_vacancy_formation_energy(vacancy) -> None:
    _, _, formation = vacancy
    assert formation.unrelaxed_energy == pytest.approx(2 * SILICON["epsilon"], rel=1e-8)
    # The published relaxed value, scaled from its epsilon to this one (2.64 eV), is the
    # infinite-cell limit; this 64-site cell is above it by a finite-size error that
    # falls as 1/N (2.836 eV here; the script extrapolates 2.644 eV from 216 and 512 sites).
    published = SW_VACANCY_FORMATION_ENERGY["energy"] * SILICON["epsilon"] / SW_VACANCY_FORMATION_ENERGY["epsilon"]
    assert published < formation.energy < published + 0.25
    # The relaxed vacancy is tetrahedral: its four neighbours equally far from the site, pulled in.
    d = np.asarray(formation.result.positions)[formation.neighbors] - np.asarray(formation.site)
    side = 2 * 5.431
    distances = np.linalg.norm(d - side * np.round(d / side), axis=1)
    assert len(distances) == 4
    np.testing.assert_allclose(distances, formation.relaxation, rtol=1e-9)
    assert formation.relaxation < 0.8 * 5.431 * np.sqrt(3) / 4


def test_vacancy_sensitivities_match_finite_differences(vacancy) -> None:
    perfect, system, formation = vacancy
    assert set(formation.fields) == set(SILICON)
    for name in SILICON:
        step = 1e-5 * max(1.0, abs(SILICON[name]))
        fd = defects.finite_differences(perfect, system, formation, name, step)
        assert float(formation.energy_gradient[name]) == pytest.approx(fd.energy, rel=1e-6), name
        assert float(formation.relaxation_gradient[name]) == pytest.approx(fd.relaxation, rel=1e-6, abs=1e-9), name
        field = np.asarray(formation.fields[name])
        np.testing.assert_allclose(field, fd.field, rtol=0, atol=1e-6 * max(np.abs(fd.field).max(), 1e-2), err_msg=name)
