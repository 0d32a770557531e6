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

from mdsens import RelaxResult, max_force, relax, systems
from mdsens.systems import System

FMAX = 1e-12


def relax_system(system: System, **kwargs) -> RelaxResult:
    return relax(
        system.energy_fn,
        system.positions,
        system.params,
        shift_fn=system.shift_fn,
        dt_max=system.dt_max,
        **kwargs,
    )


@functools.cache
def _compiled(energy_fn):
    # jit once per system: eager evaluation compiles every op for every shape.
    return jax.jit(energy_fn), jax.jit(jax.grad(energy_fn))


def forces_np(system: System, positions: jax.Array) -> np.ndarray:
    return -np.asarray(_compiled(system.energy_fn)[1](positions, system.params))


def fmax_np(system: System, positions: jax.Array) -> float:
    """Largest per-particle force norm, from jax.grad of the energy and numpy norms."""
    return float(np.max(np.sqrt(np.sum(forces_np(system, positions) ** 2, axis=1))))


def energy(system: System, positions: jax.Array) -> float:
    return float(_compiled(system.energy_fn)[0](positions, system.params))


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
    result = relax_system(system, method="gradient_descent", max_steps=50_000)
    assert_relaxed(system, result, 50_000)


def test_max_force_definition() -> None:
    forces = jnp.asarray([[3.0, 4.0], [0.0, 4.5], [-1.0, 2.0]])
    # Per-particle norms are 5, 4.5, sqrt 5; the largest component (4.5) and the
    # total norm (sqrt 45.25) differ from the answer.
    assert float(max_force(forces)) == 5.0


def test_fmax_is_largest_particle_force(soft_sphere_2d: System) -> None:
    # Stopped early, so that forces are large and rounding does not hide a wrong norm.
    with pytest.warns(RuntimeWarning, match="max_steps"):
        result = relax_system(soft_sphere_2d, max_steps=30)
    forces = forces_np(soft_sphere_2d, result.positions)
    norms = np.linalg.norm(forces, axis=1)
    assert float(result.fmax) == pytest.approx(norms.max(), rel=1e-12)
    # Sanity: the alternatives a wrong definition would give are distinguishable.
    assert np.abs(forces).max() < 0.999 * norms.max() < np.linalg.norm(forces)


def test_max_steps_exhausted(small_2d: System) -> None:
    with pytest.warns(RuntimeWarning, match="did not reach fmax"):
        result = relax_system(small_2d, max_steps=5)
    assert not bool(result.converged)
    assert result.reason == "max_steps" and int(result.status) == 1
    assert int(result.n_steps) == 5
    assert float(result.fmax) > FMAX
    assert float(result.fmax) == pytest.approx(fmax_np(small_2d, result.positions), rel=1e-12)


def test_nonfinite_stops() -> None:
    # sqrt(x) pushes every coordinate below zero, where energy and force are NaN.
    def energy_fn(x: jax.Array, params: dict) -> jax.Array:
        return params["k"] * jnp.sum(jnp.sqrt(x))

    with pytest.warns(RuntimeWarning, match="nonfinite"):
        result = relax(energy_fn, jnp.ones((4, 2)), {"k": 1.0}, shift_fn=lambda x, dx: x + dx)
    assert result.reason == "nonfinite" and not bool(result.converged)


def test_vmap_matches_single_calls(small_2d: System) -> None:
    other = systems.soft_sphere_packing(16, dim=2, phi=0.9, seed=1)
    assert not np.allclose(other.positions, small_2d.positions)

    def run(x: jax.Array) -> RelaxResult:
        return relax(small_2d.energy_fn, x, small_2d.params, shift_fn=small_2d.shift_fn, dt_max=small_2d.dt_max)

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
    (dict(positions=nan_at.set(jnp.nan)), "positions contains NaN"),
    (dict(positions=nan_at.set(jnp.inf)), "positions contains NaN or inf"),
    (dict(positions=GOOD.astype(jnp.float32)), "positions has dtype float32"),
    (dict(params={"k": jnp.nan}), r"params\['k'\] contains NaN"),
    (dict(params={"k": 1.0, "m": [1.0, -jnp.inf]}), r"params\['m'\]\[1\] contains NaN or inf"),
    (dict(params={"k": jnp.ones(2, jnp.float32)}), "params.*float32"),
    (dict(method="newton"), "method must be one of"),
    (dict(method="FIRE"), "method must be one of"),
    (dict(fmax=0.0), "fmax must be positive"),
    (dict(fmax=-1e-12), "fmax must be positive"),
    (dict(fmax=np.nan), "fmax must be finite"),
    (dict(max_steps=0), "max_steps must be an integer >= 1"),
    (dict(max_steps=-5), "max_steps must be an integer >= 1"),
    (dict(max_steps=10.0), "max_steps must be an integer >= 1"),
    (dict(dt_max=0.0), "dt_max must be positive"),
]


@pytest.mark.parametrize("kwargs, match", BAD_RELAX_INPUTS, ids=[m for _, m in BAD_RELAX_INPUTS])
def test_bad_relax_inputs_raise_before_tracing(kwargs: dict, match: str) -> None:
    args = {"positions": GOOD, "params": {"k": 1.0}, **kwargs}
    with pytest.raises(ValueError, match=match):
        relax(_untraceable_energy, shift_fn=lambda x, dx: x + dx, **args)


def test_bad_relax_sentinel_is_live() -> None:
    # The valid baseline does reach the energy: the ValueErrors above are not a
    # side effect of the sentinel.
    with pytest.raises(_Traced):
        relax(_untraceable_energy, GOOD, {"k": 1.0}, shift_fn=lambda x, dx: x + dx)


def test_relax_requires_x64() -> None:
    # In a fresh interpreter: switching x64 off here would disturb the session.
    script = textwrap.dedent(
        """
        import jax
        jax.config.update("jax_enable_x64", False)
        import jax.numpy as jnp
        from mdsens import relax
        try:
            relax(lambda x, p: jnp.sum(x**2), jnp.ones((4, 2)), {}, shift_fn=lambda x, dx: x + dx)
        except RuntimeError as error:
            print("RuntimeError:", error)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    assert "RuntimeError: mdsens.relax needs float64" in out.stdout
    assert "jax_enable_x64" in out.stdout
