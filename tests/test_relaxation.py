"""Tests of mdsens.relax: convergence, the fmax definition, batching and input checks."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdsens import FIRE, GradientDescent, RelaxResult, System, max_force, relax, systems

FMAX = 1e-12


@functools.cache
def _compiled(energy):
    # jit once per system: eager evaluation compiles every op for every shape.
    return jax.jit(energy), jax.jit(jax.grad(energy))


def forces_np(system: System, positions: jax.Array) -> np.ndarray:
    return -np.asarray(_compiled(system.energy)[1](positions, system.params))


def fmax_np(system: System, positions: jax.Array) -> float:
    """Largest per-particle force norm, from jax.grad of the energy and numpy norms."""
    return float(np.max(np.sqrt(np.sum(forces_np(system, positions) ** 2, axis=1))))


def energy(system: System, positions: jax.Array) -> float:
    return float(_compiled(system.energy)[0](positions, system.params))


def assert_relaxed(system: System, result: RelaxResult, max_steps: int) -> None:
    assert bool(result.converged) and result.reason == "converged" and int(result.status) == 0
    assert 0 < int(result.n_steps) < max_steps
    assert float(result.fmax) <= FMAX
    # Recomputed outside the loop, rounding moves fmax by ~0.1% (KA forces are large).
    assert fmax_np(system, result.positions) == pytest.approx(float(result.fmax), rel=1e-2)
    assert float(result.energy) == pytest.approx(energy(system, result.positions), rel=1e-12, abs=1e-14)
    assert float(result.energy) < energy(system, system.positions)
    assert result.positions.shape == system.positions.shape
    assert result.positions.dtype == jnp.float64


@pytest.fixture(scope="module")
def small_2d() -> System:
    # Small enough for gradient descent, vmap and the input checks to compile fast.
    return systems.soft_sphere_packing(16, dim=2, phi=0.9, seed=0)


def test_fire_converges(any_relaxed) -> None:
    assert_relaxed(any_relaxed.system, any_relaxed.result, 100_000)


@pytest.mark.parametrize("name", ["small_2d", "soft_sphere_3d", "lj7"])
def test_gradient_descent_converges(name: str, request: pytest.FixtureRequest) -> None:
    # Measured: 2.7k steps (small_2d), 4.7k (soft_sphere_3d), 0.5k (lj7). Gradient
    # descent fragments the N=4 and N=13 clusters instead (their lattice starts are
    # compressed and its step grows without bound), so only N=7 is used here.
    system = systems.lennard_jones_cluster(7) if name == "lj7" else request.getfixturevalue(name)
    result = relax(system, minimiser=GradientDescent(max_steps=50_000))
    assert_relaxed(system, result, 50_000)


def test_minimiser_takes_the_systems_dt_max(small_2d: System) -> None:
    """A minimiser without a dt_max runs with the system's: the same run, step for
    step, as one given it explicitly, and not the run of another time step."""
    default = relax(small_2d)
    explicit = relax(small_2d, minimiser=FIRE(dt_max=small_2d.dt_max))
    assert int(default.n_steps) == int(explicit.n_steps)
    np.testing.assert_array_equal(default.positions, explicit.positions)
    other = relax(small_2d, minimiser=FIRE(dt_max=0.1))
    assert small_2d.dt_max != 0.1 and int(other.n_steps) != int(default.n_steps)


def test_max_force_definition() -> None:
    forces = jnp.asarray([[3.0, 4.0], [0.0, 4.5], [-1.0, 2.0]])
    # Per-particle norms are 5, 4.5, sqrt 5; the largest component (4.5) and the
    # total norm (sqrt 45.25) differ from the answer.
    assert float(max_force(forces)) == 5.0


def test_fmax_is_largest_particle_force(soft_sphere_2d: System) -> None:
    # Stopped early, so that forces are large and rounding does not hide a wrong norm.
    with pytest.warns(RuntimeWarning, match="max_steps"):
        result = relax(soft_sphere_2d, minimiser=FIRE(max_steps=30))
    forces = forces_np(soft_sphere_2d, result.positions)
    norms = np.linalg.norm(forces, axis=1)
    assert float(result.fmax) == pytest.approx(norms.max(), rel=1e-12)
    # Sanity: the alternatives a wrong definition would give are distinguishable.
    assert np.abs(forces).max() < 0.999 * norms.max() < np.linalg.norm(forces)


def test_max_steps_exhausted(small_2d: System) -> None:
    with pytest.warns(RuntimeWarning, match="did not reach fmax"):
        result = relax(small_2d, minimiser=FIRE(max_steps=5))
    assert not bool(result.converged)
    assert result.reason == "max_steps" and int(result.status) == 1
    assert int(result.n_steps) == 5
    assert float(result.fmax) > FMAX
    assert float(result.fmax) == pytest.approx(fmax_np(small_2d, result.positions), rel=1e-12)


def test_nonfinite_stops() -> None:
    # sqrt(x) pushes every coordinate below zero, where energy and force are NaN.
    def energy_fn(x: jax.Array, params: dict) -> jax.Array:
        return params["k"] * jnp.sum(jnp.sqrt(x))

    system = System.from_energy(energy_fn, {"k": 1.0}, jnp.ones((4, 2)), dt_max=0.1)
    with pytest.warns(RuntimeWarning, match="nonfinite"):
        result = relax(system)
    assert result.reason == "nonfinite" and not bool(result.converged)


def test_vmap_matches_single_calls(small_2d: System) -> None:
    other = systems.soft_sphere_packing(16, dim=2, phi=0.9, seed=1)
    assert not np.allclose(other.positions, small_2d.positions)

    def run(x: jax.Array) -> RelaxResult:
        return relax(small_2d, x)

    batch = jax.vmap(run)(jnp.stack([small_2d.positions, other.positions]))
    singles = [run(small_2d.positions), run(other.positions)]
    # The two seeds take different numbers of steps, so one member finishes first
    # and must stay frozen while the other continues.
    assert int(singles[0].n_steps) != int(singles[1].n_steps)
    assert batch.reason.tolist() == ["converged", "converged"]
    for k, single in enumerate(singles):
        assert int(batch.n_steps[k]) == int(single.n_steps)
        np.testing.assert_allclose(batch.positions[k], single.positions, rtol=0, atol=1e-12)
        assert float(batch.fmax[k]) <= FMAX


# ---------------------------------------------------------------- bad inputs
# (Bad option values, e.g. FIRE(fmax=0.0), fail when they are built: tests/test_options.py.)


class _Traced(Exception):
    """Raised if the energy is ever called: validation must come before tracing."""


def _untraceable_energy(x: jax.Array, params: dict) -> jax.Array:
    raise _Traced


GOOD = jnp.zeros((8, 2)) + jnp.arange(16.0).reshape(8, 2)
nan_at = GOOD.at[3, 1]

BAD_RELAX_INPUTS = [
    (dict(positions=jnp.zeros(8)), "positions must have shape"),
    (dict(positions=jnp.zeros((8, 4))), "positions must have dim 2 or 3"),
    (dict(positions=jnp.zeros((8, 1))), "positions must have dim 2 or 3"),
    (dict(positions=jnp.zeros((1, 2))), "at least 2 particles"),
    (dict(positions=jnp.zeros((6, 2))), r"positions must have shape \(8, 2\)"),
    (dict(positions=nan_at.set(jnp.nan)), "positions contains NaN"),
    (dict(positions=nan_at.set(jnp.inf)), "positions contains NaN or inf"),
    (dict(positions=GOOD.astype(jnp.float32)), "positions has dtype float32"),
    (dict(params={"k": jnp.nan}), r"params\['k'\] contains NaN"),
    (dict(params={"k": 1.0, "m": [1.0, -jnp.inf]}), r"params\['m'\]\[1\] contains NaN or inf"),
    (dict(params={"k": jnp.ones(2, jnp.float32)}), "params.*float32"),
    (dict(params={"k": jnp.ones(2)}), r"params\['k'\] must have shape \(\)"),
    (dict(params={"m": 1.0}), "params must have the structure"),
    (dict(minimiser="newton"), "minimiser must be"),
    (dict(minimiser="FIRE"), "minimiser must be"),
    (dict(minimiser=FIRE), "minimiser must be"),  # the class, not a value
]


@pytest.mark.parametrize("kwargs, match", BAD_RELAX_INPUTS, ids=[m for _, m in BAD_RELAX_INPUTS])
def test_bad_relax_inputs_raise_before_tracing(kwargs: dict, match: str) -> None:
    system = System.from_energy(_untraceable_energy, {"k": 1.0}, GOOD)
    with pytest.raises(ValueError, match=match):
        relax(system, **kwargs)


def test_bad_relax_sentinel_is_live() -> None:
    # The valid baseline does reach the energy: the ValueErrors above are not a
    # side effect of the sentinel.
    with pytest.raises(_Traced):
        relax(System.from_energy(_untraceable_energy, {"k": 1.0}, GOOD))


@pytest.mark.multiprocess
def test_relax_requires_x64() -> None:
    # In a fresh interpreter: switching x64 off here would disturb the session.
    script = textwrap.dedent(
        """
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp
        from mdsens import System, relax
        system = System.from_energy(lambda x, p: jnp.sum(x**2), {}, jnp.ones((4, 2)))
        jax.config.update("jax_enable_x64", False)
        for call in (lambda: relax(system), lambda: System.from_energy(lambda x, p: 0.0, {}, jnp.ones((4, 2)))):
            try:
                call()
            except RuntimeError as error:
                print("RuntimeError:", error)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "RuntimeError: mdsens.relax needs float64" in out.stdout
    assert "RuntimeError: System.from_energy needs float64" in out.stdout
    assert "jax_enable_x64" in out.stdout
