"""Tests of mdsens.systems against independent numpy formulas."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdsens import systems
from mdsens.systems import System

# ---------------------------------------------------------------- numpy references


@functools.cache
def _jit(fn):
    # One compilation per function: eager evaluation compiles every op for every shape.
    return jax.jit(fn)


def energy(system: System, x, params=None) -> float:
    return float(_jit(system.energy_fn)(x, system.params if params is None else params))


def _pairs(x: np.ndarray, box: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distances of all pairs i < j, minimum image if periodic, and their indices."""
    i, j = np.triu_indices(len(x), 1)
    dr = x[i] - x[j]
    if box is not None:
        box = np.diag(box) if box.ndim == 2 else box  # the builders' boxes are cubic
        dr -= box * np.round(dr / box)
    return np.linalg.norm(dr, axis=1), i, j


def _smooth_cutoff(r: np.ndarray, r_on: float, r_c: float) -> np.ndarray:
    """HOOMD-blue's XPLOR switching function: 1 below r_on, 0 above r_c, C^1."""
    s = (r_c**2 - r**2) ** 2 * (r_c**2 + 2 * r**2 - 3 * r_on**2) / (r_c**2 - r_on**2) ** 3
    return np.where(r < r_on, 1.0, np.where(r < r_c, s, 0.0))


def soft_sphere_energy_np(x, box, d, epsilon, alpha) -> float:
    r, i, j = _pairs(np.asarray(x), np.asarray(box))
    sigma = 0.5 * (d[i] + d[j])
    overlap = np.clip(1.0 - r / sigma, 0.0, None)
    return float(np.sum(epsilon / alpha * overlap**alpha))


def lj_np(r, sigma, epsilon):
    return 4 * epsilon * ((sigma / r) ** 12 - (sigma / r) ** 6)


def morse_np(r, sigma, epsilon, alpha):
    return epsilon * ((1 - np.exp(-alpha * (r - sigma))) ** 2 - 1)


def pair_energy_np(x, box, species, sigma, epsilon, pair, cutoff, **extra) -> float:
    """Sum of ``pair`` over all pairs with species matrices, cut off smoothly between
    0.8 and 1.0 of ``cutoff * max(sigma)`` (no cutoff if None)."""
    r, i, j = _pairs(np.asarray(x), None if box is None else np.asarray(box))
    s = np.asarray(species)
    e = pair(r, np.asarray(sigma)[s[i], s[j]], np.asarray(epsilon)[s[i], s[j]], **extra)
    if cutoff is not None:
        r_c = cutoff * np.max(sigma)
        e = e * _smooth_cutoff(r, 0.8 * r_c, r_c)
    return float(np.sum(e))


def phi_np(system: System, species_diameters) -> float:
    d = np.asarray(species_diameters)[np.asarray(system.species)]
    unit = {2: math.pi / 4, 3: math.pi / 6}[system.dim]
    return float(np.sum(unit * d**system.dim) / np.linalg.det(np.asarray(system.box)))


# ---------------------------------------------------------------- geometry and species


@pytest.mark.parametrize(
    "n, dim, phi, diameters, fractions",
    [
        (128, 2, 0.9, (1.0, 1.4), (0.5, 0.5)),
        (31, 2, 0.84, (1.0, 1.4), (0.5, 0.5)),
        (40, 3, 0.64, (1.0, 1.4), (0.5, 0.5)),
        (30, 3, 0.5, (1.0, 1.2, 0.8), (0.2, 0.3, 0.5)),
        (20, 2, 0.7, (1.3,), (1.0,)),
    ],
)
def test_packing_fraction_and_box(n, dim, phi, diameters, fractions) -> None:
    system = systems.soft_sphere_packing(n, dim=dim, phi=phi, diameters=diameters, fractions=fractions)
    box = np.asarray(system.box)
    assert box.shape == (dim, dim) and box.dtype == np.float64
    np.testing.assert_array_equal(box, box[0, 0] * np.eye(dim))  # cubic
    np.testing.assert_array_equal(np.asarray(system.params["box"]), box)
    assert phi_np(system, diameters) == pytest.approx(phi, rel=1e-13)
    assert system.positions.shape == (n, dim) and system.positions.dtype == jnp.float64
    # Random start inside the box.
    assert np.all((np.asarray(system.positions) >= 0) & (np.asarray(system.positions) < box[0, 0]))


def test_paper_system_box(soft_sphere_2d: System) -> None:
    # 64 discs of diameter 1 and 64 of 1.4: L^2 = 64 pi (1 + 1.96) / 4 / 0.9.
    side = math.sqrt(64 * math.pi * (1 + 1.4**2) / 4 / 0.9)
    np.testing.assert_allclose(np.asarray(soft_sphere_2d.box), side * np.eye(2), rtol=1e-14)
    assert np.bincount(np.asarray(soft_sphere_2d.species)).tolist() == [64, 64]


@pytest.mark.parametrize(
    "n, fractions, expected",
    [
        (10, (0.2, 0.3, 0.5), [2, 3, 5]),
        (7, (0.1, 0.2, 0.7), [1, 1, 5]),  # largest remainders 0.9 and 0.7 get the spares
        (3, (1 / 3, 1 / 3, 1 / 3), [1, 1, 1]),
        (7, (0.5, 0.5), None),  # a tie: 4:3 either way
        (13, (0.25, 0.25, 0.5), None),
    ],
)
def test_species_counts(n: int, fractions: tuple[float, ...], expected: list[int] | None) -> None:
    system = systems.soft_sphere_packing(
        n, dim=2, phi=0.3, diameters=(1.0,) * len(fractions), fractions=fractions
    )
    counts = np.bincount(np.asarray(system.species), minlength=len(fractions))
    assert counts.sum() == n
    assert np.all(np.abs(counts - np.asarray(fractions) * n) < 1)
    if expected is not None:
        assert counts.tolist() == expected
    assert system.species.shape == (n,)


@pytest.mark.parametrize("n, expected", [(160, [128, 32]), (150, [120, 30]), (161, [129, 32])])
def test_kob_andersen_species(n: int, expected: list[int]) -> None:
    assert np.bincount(np.asarray(systems.kob_andersen(n).species)).tolist() == expected


def test_kob_andersen_parameters(kob_andersen: System) -> None:
    # The published values (Kob & Andersen, PRE 51, 4626, 1995).
    np.testing.assert_array_equal(kob_andersen.params["sigma"], [[1.0, 0.8], [0.8, 0.88]])
    np.testing.assert_array_equal(kob_andersen.params["epsilon"], [[1.0, 1.5], [1.5, 0.5]])
    np.testing.assert_allclose(np.diag(kob_andersen.box), [(160 / 1.2) ** (1 / 3)] * 3, rtol=1e-14)


def test_box_exactly_twice_the_cutoff_is_allowed() -> None:
    # 150 / 1.2 = 125: the box side is exactly 5 = 2 x 2.5 (the cube root rounds below).
    np.testing.assert_allclose(np.diag(systems.kob_andersen(150).box), [5.0] * 3, rtol=1e-14)
    np.testing.assert_allclose(np.diag(systems.morse(64).box), [4.0] * 3, rtol=1e-14)
    with pytest.raises(ValueError, match="density"):
        systems.kob_andersen(149)


# ---------------------------------------------------------------- energies


def _perturbed(system: System, scale: float, seed: int = 1) -> jax.Array:
    noise = jax.random.normal(jax.random.PRNGKey(seed), system.positions.shape, dtype=jnp.float64)
    return system.positions + scale * noise


@pytest.mark.parametrize(
    "n, dim, phi, diameters, fractions, alpha, epsilon",
    [
        (128, 2, 0.9, (1.0, 1.4), (0.5, 0.5), 2.0, 1.0),
        (32, 3, 0.7, (1.0, 1.4), (0.5, 0.5), 2.0, 1.0),
        (24, 2, 0.8, (1.0, 1.2, 1.4), (0.3, 0.3, 0.4), 2.5, 1.7),  # Hertzian-like, 3 species
    ],
)
def test_soft_sphere_energy_matches_numpy(n, dim, phi, diameters, fractions, alpha, epsilon) -> None:
    system = systems.soft_sphere_packing(
        n, dim=dim, phi=phi, diameters=diameters, fractions=fractions, alpha=alpha, epsilon=epsilon
    )
    d = np.asarray(diameters)[np.asarray(system.species)]
    # Positions pushed out of the box too, so the minimum image is exercised.
    for x in (system.positions, _perturbed(system, 1.5)):
        expected = soft_sphere_energy_np(x, system.box, d, epsilon, alpha)
        assert expected > 0  # random starts at these densities overlap
        assert energy(system, x) == pytest.approx(expected, rel=1e-12)
    # Parameters are read at call time, not frozen at build time.
    params = {"diameters": jnp.asarray(diameters) * 1.05, "epsilon": jnp.asarray(3.0), "alpha": jnp.asarray(3.0), "box": system.box}
    expected = soft_sphere_energy_np(system.positions, system.box, 1.05 * d, 3.0, 3.0)
    assert energy(system, system.positions, params) == pytest.approx(expected, rel=1e-12)


def test_per_particle_diameters() -> None:
    kwargs = dict(n=24, dim=2, phi=0.9, diameters=(1.0, 1.4), fractions=(0.5, 0.5), seed=3)
    species_version = systems.soft_sphere_packing(**kwargs)
    per_particle = systems.soft_sphere_packing(**kwargs, per_particle_diameters=True)
    expected = np.where(np.asarray(per_particle.species) == 0, 1.0, 1.4)
    d = per_particle.params["diameters"]
    assert d.shape == (24,) and d.dtype == jnp.float64
    np.testing.assert_array_equal(d, expected)
    np.testing.assert_array_equal(per_particle.positions, species_version.positions)
    for x in (species_version.positions, _perturbed(species_version, 0.3)):
        e_species = energy(species_version, x)
        assert e_species > 0
        assert energy(per_particle, x) == pytest.approx(e_species, rel=1e-14)
        # The species gradient is the per-particle gradient summed over each species.
        g_species = _jit(jax.grad(species_version.energy_fn, argnums=1))(x, species_version.params)["diameters"]
        g_particle = _jit(jax.grad(per_particle.energy_fn, argnums=1))(x, per_particle.params)["diameters"]
        summed = np.bincount(np.asarray(per_particle.species), weights=np.asarray(g_particle))
        np.testing.assert_allclose(g_species, summed, rtol=1e-12)


def _kob_andersen_reference(system: System, x, params=None) -> float:
    params = system.params if params is None else params
    return pair_energy_np(x, system.box, system.species, params["sigma"], params["epsilon"], lj_np, 2.5)


def test_kob_andersen_energy_matches_numpy(kob_andersen: System) -> None:
    x = _perturbed(kob_andersen, 0.05)
    r, _, _ = _pairs(np.asarray(x), np.asarray(kob_andersen.box))
    # The check covers the smoothing window and pairs beyond the cutoff.
    assert np.any((r > 2.0) & (r < 2.5)) and np.any(r > 2.5)
    assert energy(kob_andersen, x) == pytest.approx(
        _kob_andersen_reference(kob_andersen, x), rel=1e-12
    )
    params = {"sigma": jnp.asarray([[1.0, 0.9], [0.9, 0.85]]), "epsilon": jnp.asarray([[2.0, 1.0], [1.0, 0.7]]), "box": kob_andersen.box}
    assert energy(kob_andersen, x, params) == pytest.approx(
        _kob_andersen_reference(kob_andersen, x, params), rel=1e-12
    )


def test_plain_lennard_jones_matches_numpy() -> None:
    system = systems.lennard_jones(64, dim=3, density=0.5, sigma=1.1, epsilon=0.7, cutoff=2.0, seed=2)
    x = _perturbed(system, 0.05)
    r, _, _ = _pairs(np.asarray(x), np.asarray(system.box))
    inner = r < 0.8 * 2.0 * 1.1
    # Inside 0.8 cutoff the energy is the plain LJ, untouched by the switching function.
    e_inner = float(np.sum(lj_np(r[inner], 1.1, 0.7)))
    e_full = pair_energy_np(x, system.box, system.species, [[1.1]], [[0.7]], lj_np, 2.0)
    assert np.any(~inner)
    assert energy(system, x) == pytest.approx(e_full, rel=1e-12)
    # Pairs in the switching window contribute little but not nothing.
    assert e_full != pytest.approx(e_inner, rel=1e-12)
    np.testing.assert_array_equal(system.params["sigma"], [[1.1]])
    assert np.linalg.det(np.asarray(system.box)) == pytest.approx(64 / 0.5, rel=1e-14)


def test_morse_energy_matches_numpy(morse: System) -> None:
    x = _perturbed(morse, 0.05)
    expected = pair_energy_np(
        x, morse.box, morse.species, morse.params["sigma"], morse.params["epsilon"], morse_np, 2.0, alpha=5.0
    )
    assert energy(morse, x) == pytest.approx(expected, rel=1e-12)
    params = {**morse.params, "alpha": jnp.asarray(4.0)}
    expected = pair_energy_np(
        x, morse.box, morse.species, morse.params["sigma"], morse.params["epsilon"], morse_np, 2.0, alpha=4.0
    )
    assert energy(morse, x, params) == pytest.approx(expected, rel=1e-12)


def test_lj_cluster_is_free_and_uncut(lj_cluster: System) -> None:
    assert lj_cluster.box is None
    # Stretched to pair distances far beyond any cutoff: every pair still counts.
    x = 2.0 * lj_cluster.positions
    r, _, _ = _pairs(np.asarray(x), None)
    assert r.max() > 3.0
    expected = float(np.sum(lj_np(r, 1.0, 1.0)))
    assert energy(lj_cluster, x) == pytest.approx(expected, rel=1e-12)
    # Free space: a rigid translation and rotation change nothing (no wrapping).
    e = energy(lj_cluster, lj_cluster.positions)
    c, s = math.cos(0.7), math.sin(0.7)
    rotation = jnp.asarray([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    moved = lj_cluster.positions @ rotation.T + jnp.asarray([37.0, -11.0, 5.0])
    assert energy(lj_cluster, moved) == pytest.approx(e, rel=1e-10)


def test_relaxed_energies_match_numpy(any_relaxed) -> None:
    """The energies at the relaxed states, where many pairs sit near the cutoffs."""
    system, x = any_relaxed.system, any_relaxed.result.positions
    species, p = system.species, system.params
    if any_relaxed.name.startswith("soft_sphere"):
        d = np.asarray(p["diameters"])[np.asarray(species)]
        expected = soft_sphere_energy_np(x, system.box, d, 1.0, 2.0)
    elif any_relaxed.name == "kob_andersen":
        expected = _kob_andersen_reference(system, x)
    elif any_relaxed.name == "morse":
        expected = pair_energy_np(x, system.box, species, p["sigma"], p["epsilon"], morse_np, 2.0, alpha=5.0)
    else:
        expected = pair_energy_np(x, None, species, p["sigma"], p["epsilon"], lj_np, None)
    assert energy(system, x, p) == pytest.approx(expected, rel=1e-12)


def test_periodic_images_are_equivalent(any_system: tuple[str, System]) -> None:
    name, system = any_system
    if system.box is None:
        pytest.skip("free space")
    box = np.asarray(system.box)
    # Moving particles by whole box vectors changes nothing.
    shifts = np.zeros(system.positions.shape)
    shifts[::3, 0] = box[0, 0]
    shifts[1::3, -1] = -2 * box[-1, -1]
    e = energy(system, system.positions)
    e_shifted = energy(system, system.positions + shifts)
    assert e_shifted == pytest.approx(e, rel=1e-12)


def test_params_are_float64(any_system: tuple[str, System]) -> None:
    _, system = any_system
    leaves = jax.tree_util.tree_leaves(system.params)
    assert leaves and all(leaf.dtype == jnp.float64 for leaf in leaves)
    assert system.positions.dtype == jnp.float64
    assert system.box is None or system.box.dtype == jnp.float64
    assert jnp.issubdtype(system.species.dtype, jnp.integer)
    assert system.dt_max > 0


def test_cutoff_is_smooth() -> None:
    # A cutoff whose square is not a float32 (2.2**2): the switch must still take the
    # pair energy and force to zero continuously at r_c (jax-md's float32 switch
    # leaves a force jump of ~6e-8 here).
    system = systems.lennard_jones(2, density=2 / 125, sigma=1.1, epsilon=0.7, cutoff=2.0)
    grad = _jit(jax.grad(system.energy_fn))
    for gap, bound in ((1e-9, 1e-8), (1e-12, 1e-11)):
        x = jnp.asarray([[1.0, 1.0, 1.0], [1.0 + 2.2 - gap, 1.0, 1.0]])
        assert abs(energy(system, x)) < 1e-15
        assert np.abs(np.asarray(grad(x, system.params))).max() < bound
    x = jnp.asarray([[1.0, 1.0, 1.0], [1.0 + 2.2 - 1e-3, 1.0, 1.0]])
    expected = lj_np(2.2 - 1e-3, 1.1, 0.7) * _smooth_cutoff(np.asarray(2.2 - 1e-3), 1.76, 2.2)
    assert energy(system, x) == pytest.approx(float(expected), rel=1e-10)


# ---------------------------------------------------------------- bad inputs

ss = systems.soft_sphere_packing

BAD_INPUTS: list[tuple[Callable[[], System], str]] = [
    (lambda: ss(1), "n must"),
    (lambda: ss(0), "n must"),
    (lambda: ss(10.0), "n must"),
    (lambda: ss(16, dim=1), "dim must"),
    (lambda: ss(16, dim=4), "dim must"),
    (lambda: ss(16, diameters=(1.0, 0.0)), "diameters must be positive"),
    (lambda: ss(16, diameters=(-1.0, 1.4)), "diameters must be positive"),
    (lambda: ss(16, diameters=(float("nan"), 1.4)), "diameters contains NaN"),
    (lambda: ss(16, diameters=(1.0, float("inf"))), "diameters contains NaN or inf"),
    (lambda: ss(16, diameters=np.ones(2, np.float32)), "diameters has dtype float32"),
    (lambda: ss(16, epsilon=0.0), "epsilon must be positive"),
    (lambda: ss(16, epsilon=-1.0), "epsilon must be positive"),
    (lambda: ss(16, alpha=0.0), "alpha must be positive"),
    (lambda: ss(16, phi=0.0), "phi must be positive"),
    (lambda: ss(16, phi=-0.5), "phi must be positive"),
    (lambda: ss(16, phi=float("nan")), "phi"),
    (lambda: ss(16, phi=3.0), "phi"),  # box 2.5 < 2 x 1.4
    (lambda: ss(16, fractions=(0.5, 0.6)), "fractions must add up to 1"),
    (lambda: ss(16, fractions=(1.5, -0.5)), "fractions must be finite and non-negative"),
    (lambda: ss(16, fractions=(1.0,)), "fractions"),
    (lambda: ss(16, diameters=(1.0, 1.2, 1.4)), "fractions"),
    (lambda: systems.lennard_jones(1), "n must"),
    (lambda: systems.lennard_jones(64, dim=5, density=0.3), "dim must"),
    (lambda: systems.lennard_jones(64, density=0.0), "density"),
    (lambda: systems.lennard_jones(64, density=float("nan")), "density"),
    (lambda: systems.lennard_jones(64, density=2.0), "density"),  # box 3.2 < 2 x 2.5
    (lambda: systems.lennard_jones(64, density=0.3, sigma=0.0), "sigma must be positive"),
    (lambda: systems.lennard_jones(64, density=0.3, epsilon=-1.0), "epsilon must be positive"),
    (lambda: systems.lennard_jones(64, density=0.3, cutoff=0.0), "cutoff must be positive"),
    (lambda: systems.lennard_jones(64, density=0.3, fractions=(0.5, 0.6)), "fractions must add up to 1"),
    (lambda: systems.lennard_jones(64, density=0.3, sigma=[[1.0, 0.8], [0.8, 0.9]]), "sigma must be a scalar or a 1 x 1"),
    (lambda: systems.lennard_jones(64, density=0.3, sigma=[[1.0, 0.8], [0.7, 0.9]], fractions=(0.5, 0.5)), "sigma must be symmetric"),
    (lambda: systems.lennard_jones(64, density=0.3, epsilon=[[1.0, np.nan], [np.nan, 1.0]], fractions=(0.5, 0.5)), "epsilon contains NaN"),
    (lambda: systems.kob_andersen(100), "density"),
    (lambda: systems.morse(64, alpha=0.0), "alpha must be positive"),
    (lambda: systems.lennard_jones_cluster(1), "n must"),
    (lambda: systems.lennard_jones_cluster(13, dim=4), "dim must"),
    (lambda: systems.lennard_jones_cluster(13, epsilon=0.0), "epsilon must be positive"),
]


@pytest.mark.parametrize("build, match", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_inputs_raise(build: Callable[[], System], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_box_is_a_call_time_parameter(soft_sphere_2d: System) -> None:
    # Scaling the box and the positions together is the packing at another phi.
    scale = 1.1
    p = dict(soft_sphere_2d.params, box=scale * soft_sphere_2d.params["box"])
    x = scale * np.asarray(soft_sphere_2d.positions)
    d = np.asarray(soft_sphere_2d.params["diameters"])[np.asarray(soft_sphere_2d.species)]
    expected = soft_sphere_energy_np(x, scale * np.asarray(soft_sphere_2d.box), d, 1.0, 2.0)
    assert expected > 0
    assert energy(soft_sphere_2d, x, p) == pytest.approx(expected, rel=1e-12)
