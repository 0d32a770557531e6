"""Tests of mdsens.systems: the builders against independent numpy formulas;
parameters checked against the system's; your own energy through
System.from_energy, relaxed and differentiated, against the dense reference."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax_md import energy as jmd_energy
from jax_md import smap, space

import mdsens
from mdsens import System, systems
from mdsens.testing import dense_reference, relative_error

# ---------------------------------------------------------------- numpy references


@functools.cache
def _jit(fn):
    # One compilation per function: eager evaluation compiles every op for every shape.
    return jax.jit(fn)


def energy(system: System, x, params=None) -> float:
    return float(_jit(system.energy)(x, system.params if params is None else params))


def _pairs(x: np.ndarray, box: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distances of all pairs i < j, minimum image if periodic, and their indices."""
    i, j = np.triu_indices(len(x), 1)
    dr = x[i] - x[j]
    if box is not None:
        box = np.diag(box) if box.ndim == 2 else box  # the builders' boxes are cubic
        dr -= box * np.round(dr / box)
    return np.linalg.norm(dr, axis=1), i, j


def _smooth_cutoff(r: np.ndarray, r_on: float, r_c: float) -> np.ndarray:
    """The documented C^4 switch: 1 below r_on, 0 above r_c, in between the
    smoothstep of degree 9, 1 - u^5 (126 - 420 u + 540 u^2 - 315 u^3 + 70 u^4)
    with u = (r - r_on) / (r_c - r_on)."""
    u = np.clip((r - r_on) / (r_c - r_on), 0.0, 1.0)
    s = 1.0 - u**5 * (126.0 - 420.0 * u + 540.0 * u**2 - 315.0 * u**3 + 70.0 * u**4)
    return np.where(r < r_c, s, 0.0)


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
    system = systems.soft_sphere_packing(n, dim=2, phi=0.3, diameters=(1.0,) * len(fractions), fractions=fractions)
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
    params = {
        "diameters": jnp.asarray(diameters) * 1.05,
        "epsilon": jnp.asarray(3.0),
        "alpha": jnp.asarray(3.0),
        "box": system.box,
    }
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
        g_species = _jit(jax.grad(species_version.energy, argnums=1))(x, species_version.params)["diameters"]
        g_particle = _jit(jax.grad(per_particle.energy, argnums=1))(x, per_particle.params)["diameters"]
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
    assert energy(kob_andersen, x) == pytest.approx(_kob_andersen_reference(kob_andersen, x), rel=1e-12)
    params = {
        "sigma": jnp.asarray([[1.0, 0.9], [0.9, 0.85]]),
        "epsilon": jnp.asarray([[2.0, 1.0], [1.0, 0.7]]),
        "box": kob_andersen.box,
    }
    assert energy(kob_andersen, x, params) == pytest.approx(_kob_andersen_reference(kob_andersen, x, params), rel=1e-12)


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
    _, system = any_system
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
    grad = _jit(jax.grad(system.energy))
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
    (lambda: ss(16, diameters=(1.0, 0.0)), "diameters must be finite and positive"),
    (lambda: ss(16, diameters=(-1.0, 1.4)), "diameters must be finite and positive"),
    (lambda: ss(16, diameters=(float("nan"), 1.4)), "diameters contains NaN"),
    (lambda: ss(16, diameters=(1.0, float("inf"))), "diameters contains NaN or inf"),
    (lambda: ss(16, diameters=np.ones(2, np.float32)), "diameters has dtype float32"),
    (lambda: ss(16, epsilon=0.0), "epsilon must be finite and positive"),
    (lambda: ss(16, epsilon=-1.0), "epsilon must be finite and positive"),
    (lambda: ss(16, alpha=0.0), "alpha must be finite and positive"),
    (lambda: ss(16, phi=0.0), "phi must be finite and positive"),
    (lambda: ss(16, phi=-0.5), "phi must be finite and positive"),
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
    (lambda: systems.lennard_jones(64, density=0.3, sigma=0.0), "sigma must be finite and positive"),
    (lambda: systems.lennard_jones(64, density=0.3, epsilon=-1.0), "epsilon must be finite and positive"),
    (lambda: systems.lennard_jones(64, density=0.3, cutoff=0.0), "cutoff must be finite and positive"),
    (lambda: systems.lennard_jones(64, density=0.3, fractions=(0.5, 0.6)), "fractions must add up to 1"),
    (
        lambda: systems.lennard_jones(64, density=0.3, sigma=[[1.0, 0.8], [0.8, 0.9]]),
        "sigma must be a scalar or a 1 x 1",
    ),
    (
        lambda: systems.lennard_jones(64, density=0.3, sigma=[[1.0, 0.8], [0.7, 0.9]], fractions=(0.5, 0.5)),
        "sigma must be symmetric",
    ),
    (
        lambda: systems.lennard_jones(64, density=0.3, epsilon=[[1.0, np.nan], [np.nan, 1.0]], fractions=(0.5, 0.5)),
        "epsilon contains NaN",
    ),
    (lambda: systems.kob_andersen(100), "density"),
    (lambda: systems.morse(64, alpha=0.0), "alpha must be finite and positive"),
    (lambda: systems.lennard_jones_cluster(1), "n must"),
    (lambda: systems.lennard_jones_cluster(13, dim=4), "dim must"),
    (lambda: systems.lennard_jones_cluster(13, epsilon=0.0), "epsilon must be finite and positive"),
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


# ---------------------------------------------------------------- parameters checked against the system


@pytest.fixture(scope="module")
def two_species() -> System:
    return systems.soft_sphere_packing(16, dim=2, phi=0.9)


@pytest.fixture(scope="module")
def per_particle() -> System:
    return systems.soft_sphere_packing(16, dim=2, phi=0.9, per_particle_diameters=True)


# (system, changed leaves, error for the argument {name}): each would otherwise run, the
# first three silently (the energy takes one diameter per species or per particle by length).
PARAM_MISMATCHES = [
    ("two_species", {"diameters": jnp.ones(3)}, r"{name}\['diameters'\] must have shape \(2,\)"),  # 3 for 2 species
    ("two_species", {"diameters": jnp.ones(16)}, r"{name}\['diameters'\] must have shape \(2,\)"),  # per particle
    ("per_particle", {"diameters": jnp.ones(2)}, r"{name}\['diameters'\] must have shape \(16,\)"),  # per species
    ("two_species", {"box": jnp.eye(3)}, r"{name}\['box'\] must have shape \(2, 2\)"),
    ("two_species", {"extra": jnp.ones(2)}, "{name} must have the structure of the system's parameters"),
]


@pytest.mark.parametrize("name, changes, match", PARAM_MISMATCHES, ids=[str(i) for i in range(len(PARAM_MISMATCHES))])
def test_params_must_match_the_system(name: str, changes: dict, match: str, request: pytest.FixtureRequest) -> None:
    """A ValueError naming the leaf, from every entry point that takes parameters
    or tangents of parameters, before anything runs."""
    system = request.getfixturevalue(name)
    bad = {**system.params, **changes}
    calls = [
        ("params", lambda: system.check_params(bad)),
        ("params", lambda: mdsens.relax(system, params=bad)),
        ("params", lambda: mdsens.equilibrium(system, bad)),
        ("params", lambda: mdsens.equilibrium_with_info(system, bad)),
        ("params", lambda: mdsens.equilibrium_jvp(system, bad, system.params)),
        ("params", lambda: mdsens.equilibrium_vjp(system, bad, system.positions)),
        ("params", lambda: mdsens.energy_sensitivity(system, system.positions, bad)),
        ("params", lambda: system.hessian_diagonal(params=bad)),
        ("tangent", lambda: mdsens.equilibrium_jvp(system, system.params, bad)),
    ]
    for argument, call in calls:
        with pytest.raises(ValueError, match=match.format(name=argument)):
            call()


def test_cotangent_and_positions_must_match_the_system(two_species: System) -> None:
    wrong = jnp.ones((15, 2))
    with pytest.raises(ValueError, match=r"cotangent must have the shape of the positions \(16, 2\)"):
        mdsens.equilibrium_vjp(two_species, two_species.params, wrong)
    with pytest.raises(ValueError, match=r"positions must have shape \(16, 2\)"):
        mdsens.relax(two_species, wrong)
    with pytest.raises(ValueError, match=r"positions must have shape \(16, 2\)"):
        mdsens.equilibrium(two_species, positions=wrong)


# ---------------------------------------------------------------- your own energy: System.from_energy

RTOL = 1e-8  # agreement of implicit derivatives with the dense reference, as in tests/test_equilibrium.py

# A hexagon of springs around a centre: 7 particles, 12 bonds, rigid (2N - 3 = 11)
# with one redundant bond, so random rest lengths leave it stressed (frustrated).
HEXAGON = np.concatenate(
    [[[0.0, 0.0]], np.stack([np.cos(np.arange(6) * np.pi / 3), np.sin(np.arange(6) * np.pi / 3)], 1)]
)
SPOKES_AND_RIM = np.asarray([[0, k] for k in range(1, 7)] + [[k, k % 6 + 1] for k in range(1, 7)])


def spring_network(x: jax.Array, params: dict) -> jax.Array:
    """Central harmonic springs, ``sum_b k_b (|x_i - x_j| - rest_b)^2 / 2``: free
    space, so translations and the rotation are zero modes."""
    r = jnp.linalg.norm(x[SPOKES_AND_RIM[:, 0]] - x[SPOKES_AND_RIM[:, 1]], axis=-1)
    return 0.5 * jnp.sum(params["k"] * (r - params["rest"]) ** 2)


def jax_md_soft_spheres(n: int, phi: float, seed: int) -> System:
    """Bidisperse soft discs written directly with jax-md (``space.periodic``,
    ``smap.pair``), with per-particle diameters read at call time."""
    diameters = jnp.where(jnp.arange(n) % 2 == 0, 1.0, 1.4)
    side = float(jnp.sqrt(jnp.sum(np.pi / 4 * diameters**2) / phi))
    displacement, _ = space.periodic(side)
    pair = smap.pair(jmd_energy.soft_sphere, space.metric(displacement))

    def energy_fn(x: jax.Array, params: dict) -> jax.Array:
        d = params["diameters"]
        return pair(x, sigma=0.5 * (d[:, None] + d[None, :]), epsilon=params["epsilon"])

    start = side * jax.random.uniform(jax.random.PRNGKey(seed), (n, 2), jnp.float64)
    params = {"diameters": diameters, "epsilon": jnp.asarray(1.0)}
    return System.from_energy(energy_fn, params, start, box=side * jnp.eye(2))


def _own_systems() -> dict[str, tuple[System, int]]:
    """(system, number of zero modes of its relaxed Hessian)."""
    rng = np.random.default_rng(0)
    springs = System.from_energy(
        spring_network,
        {"k": jnp.asarray(rng.uniform(0.5, 2.0, 12)), "rest": jnp.asarray(rng.uniform(0.9, 1.1, 12))},
        jnp.asarray(HEXAGON + 0.05 * rng.standard_normal(HEXAGON.shape)),
    )
    return {"spring_network": (springs, 3), "jax_md_soft_spheres": (jax_md_soft_spheres(16, 0.9, 2), None)}


@pytest.mark.parametrize("name", ["spring_network", "jax_md_soft_spheres"])
def test_own_energy_relaxes_and_differentiates(name: str) -> None:
    """relax, equilibrium (jacfwd), equilibrium_jvp and equilibrium_vjp of a system
    from one System.from_energy call (default dt_max), against the dense reference."""
    system, n_zero_modes = _own_systems()[name]
    assert system.dt_max == systems.DEFAULT_DT_MAX and not system.neighbor_list
    result = mdsens.relax(system)
    assert bool(result.converged) and float(result.fmax) <= 1e-12
    x = result.positions
    ref = dense_reference(system.energy, x, system.params)
    if n_zero_modes is not None:
        assert ref.null_space.shape[1] == n_zero_modes
    flat, unravel = ravel_pytree(system.params)
    assert np.linalg.norm(ref.J) > 0

    jacobian = jax.jacfwd(lambda f: mdsens.equilibrium(system, unravel(f)))(flat)
    assert relative_error(jacobian.reshape(ref.J.shape), ref.J) <= RTOL

    tangent = jax.tree_util.tree_map(lambda leaf: jnp.linspace(-1.0, 1.0, leaf.size).reshape(leaf.shape), system.params)
    x_jvp, dx, info = mdsens.equilibrium_jvp(system, system.params, tangent)
    np.testing.assert_allclose(x_jvp, x, rtol=0, atol=1e-12)
    assert bool(info.relax.converged) and bool(info.solve.converged)
    assert relative_error(dx.ravel(), ref.J @ ravel_pytree(tangent)[0]) <= RTOL

    cotangent = jnp.cos(jnp.arange(x.size, dtype=jnp.float64)).reshape(x.shape) + 1.0  # nonzero mean
    _, dparams, info = mdsens.equilibrium_vjp(system, system.params, cotangent)
    assert bool(info.solve.converged)
    assert relative_error(ravel_pytree(dparams)[0], np.asarray(cotangent).ravel() @ ref.J) <= RTOL


BAD_OWN_SYSTEMS = [
    (dict(energy="E"), "energy must be a function"),
    (dict(positions=jnp.zeros(6)), "positions must have shape"),
    (dict(positions=jnp.zeros((3, 2), jnp.float32)), "positions has dtype float32"),
    (dict(params={"k": jnp.nan}), r"params\['k'\] contains NaN"),
    (dict(box=jnp.eye(3)), r"box must be a \(2, 2\) matrix"),
    (dict(box=jnp.full((2, 2), jnp.inf)), "box contains NaN or inf"),
    (dict(species=[0, 1]), "species must be 3 non-negative integers"),
    (dict(species=[0.0, 1.0, 1.0]), "species must be 3 non-negative integers"),
    (dict(species=[0, -1, 1]), "species must be 3 non-negative integers"),
    (dict(dt_max=0.0), "dt_max must be finite and positive"),
    (dict(dt_max=None), "dt_max must be a number"),
]


@pytest.mark.parametrize("changes, match", BAD_OWN_SYSTEMS, ids=[m for _, m in BAD_OWN_SYSTEMS])
def test_bad_own_system_raises(changes: dict, match: str) -> None:
    arguments = dict(energy=lambda x, p: p["k"] * jnp.sum(x**2), params={"k": 1.0}, positions=jnp.ones((3, 2)))
    arguments.update(changes)
    energy, params, positions = arguments.pop("energy"), arguments.pop("params"), arguments.pop("positions")
    with pytest.raises(ValueError, match=match):
        System.from_energy(energy, params, positions, **arguments)


def test_own_system_defaults() -> None:
    system = System.from_energy(lambda x, p: p["k"] * jnp.sum(x**2), {"k": 1}, jnp.ones((3, 2)), species=[0, 2, 1])
    assert system.box is None and system.dt_max == systems.DEFAULT_DT_MAX
    assert system.params["k"].dtype == jnp.float64  # integers become float64 parameters
    np.testing.assert_array_equal(system.species, [0, 2, 1])
    # A builder's energy (an Energy already) is taken as it is.
    built = systems.soft_sphere_packing(16, dim=2, phi=0.9)
    assert System.from_energy(built.energy, built.params, built.positions).energy is built.energy
