"""Options as values: minimisers, linear solvers and derivative methods validate
themselves, compare and hash equal (so equal options share one compiled
program, counted here), and minimisers and solvers are pytrees whose numbers are
leaves (so relax compiles once for every tolerance). One status table: the
names that RelaxResult.reason and SolveInfo.reason report."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mdsens
from mdsens import (
    CG,
    FIRE,
    MINRES,
    BiCGSTAB,
    Dense,
    FiniteDifference,
    GradientDescent,
    Implicit,
    Jacobi,
    RelaxResult,
    Status,
    System,
    Unrolled,
    systems,
)
from mdsens import zero_modes as zm

# ---------------------------------------------------------------------------
# Validation: a ValueError naming the option and the field
# ---------------------------------------------------------------------------

BAD_VALUES: list[tuple[Callable[[], Any], str]] = [
    (lambda: FIRE(fmax=-1e-12), "FIRE: fmax"),
    (lambda: FIRE(fmax=0.0), "FIRE: fmax"),
    (lambda: FIRE(fmax=float("nan")), "FIRE: fmax"),
    (lambda: FIRE(fmax="a"), "FIRE: fmax"),
    (lambda: FIRE(max_steps=0), "FIRE: max_steps"),
    (lambda: FIRE(max_steps=-5), "FIRE: max_steps"),
    (lambda: FIRE(max_steps=10.0), "FIRE: max_steps"),
    (lambda: FIRE(max_steps=2.5), "FIRE: max_steps"),
    (lambda: FIRE(max_steps=True), "FIRE: max_steps"),
    (lambda: FIRE(max_steps=2**40), "FIRE: max_steps"),  # the loop counter is int32
    (lambda: FIRE(dt_max=0.0), "FIRE: dt_max"),
    (lambda: FIRE(dt_max=-0.1), "FIRE: dt_max"),
    (lambda: FIRE(dt_max=math.inf), "FIRE: dt_max"),
    (lambda: FIRE(n_delay=-1), "FIRE: n_delay"),
    (lambda: FIRE(f_dec=0.0), "FIRE: f_dec"),
    (lambda: GradientDescent(fmax=-1.0), "GradientDescent: fmax"),
    (lambda: GradientDescent(max_steps=2**40), "GradientDescent: max_steps"),
    (lambda: GradientDescent(dt_max=0.0), "GradientDescent: dt_max"),
    (lambda: GradientDescent(grow=0.0), "GradientDescent: grow"),
    (lambda: GradientDescent(shrink=-0.5), "GradientDescent: shrink"),
    (lambda: CG(rtol="a"), "CG: rtol"),
    (lambda: CG(rtol=0.0), "CG: rtol"),
    (lambda: CG(atol=-1.0), "CG: atol"),
    (lambda: CG(max_iter=0), "CG: max_iter"),
    (lambda: CG(max_iter=2**40), "CG: max_iter"),
    (lambda: CG(preconditioner=np.ones(3)), "CG: preconditioner"),  # an array, not a Jacobi
    (lambda: MINRES(rtol=-1e-8), "MINRES: rtol"),
    (lambda: MINRES(max_iter=1.5), "MINRES: max_iter"),
    (lambda: BiCGSTAB(atol=float("nan")), "BiCGSTAB: atol"),
    (lambda: Dense(rcond=0.0), "Dense: rcond"),
    (lambda: Dense(rtol="tight"), "Dense: rtol"),
    (lambda: Implicit(solver="gmres"), "Implicit: solver"),
    (lambda: Implicit(solver=3), "Implicit: solver"),
    (lambda: Implicit(solver=CG), "Implicit: solver"),  # the class, not a value
    (lambda: Implicit(zero_modes="rigid"), "Implicit: zero_modes"),
    (lambda: Implicit(zero_modes=zm.none(jnp.zeros((2, 2)))), "Implicit: zero_modes"),  # arrays: pass a callable
    (lambda: Unrolled(0), "Unrolled: n_steps"),
    (lambda: Unrolled(2.5), "Unrolled: n_steps"),
    (lambda: FiniteDifference(step=0.0), "FiniteDifference: step"),
    (lambda: FiniteDifference(zero_modes="rigid"), "FiniteDifference: zero_modes"),
]


@pytest.mark.parametrize("build, match", BAD_VALUES, ids=[f"{i}-{m}" for i, (_, m) in enumerate(BAD_VALUES)])
def test_bad_values_raise_naming_the_field(build: Callable[[], Any], match: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(match) + " "):
        build()


def test_dt_max_none_is_the_systems() -> None:
    """None (the default) is allowed: relax and equilibrium fill in the system's."""
    assert FIRE().dt_max is None and GradientDescent(dt_max=None).dt_max is None
    assert FIRE().for_system(0.4) == FIRE(dt_max=0.4)
    assert FIRE(dt_max=0.1).for_system(0.4) == FIRE(dt_max=0.1)


def test_values_are_frozen() -> None:
    for value in (FIRE(), GradientDescent(), CG(), Dense(), Implicit(), Unrolled(), FiniteDifference()):
        with pytest.raises(dataclasses.FrozenInstanceError):
            value.max_steps = 3  # type: ignore[misc]


# ---------------------------------------------------------------------------
# Equality and hashing
# ---------------------------------------------------------------------------

EQUAL: list[tuple[Any, Any]] = [
    (FIRE(), FIRE()),
    (FIRE(fmax=1e-10, max_steps=500), FIRE(fmax=np.float64(1e-10), max_steps=np.int64(500))),
    (FIRE(dt_max=0.4), FIRE(dt_max=0.4)),
    (GradientDescent(fmax=1e-10, grow=1.5), GradientDescent(fmax=1e-10, grow=1.5)),
    (CG(rtol=1e-8), CG(rtol=1e-8)),
    (CG(rtol=1e-8, max_iter=50), CG(rtol=1e-8, max_iter=np.int64(50))),
    (MINRES(), MINRES()),
    (BiCGSTAB(rtol=1e-6), BiCGSTAB(rtol=1e-6)),
    (Dense(rcond=1e-12), Dense(rcond=1e-12)),
    (Implicit(), Implicit()),
    (Implicit(solver=CG(rtol=1e-8)), Implicit(solver=CG(rtol=1e-8))),
    (Implicit(solver=MINRES(), zero_modes=None), Implicit(solver=MINRES(), zero_modes=None)),
    (Unrolled(500), Unrolled(np.int64(500))),
    (FiniteDifference(1e-5), FiniteDifference(step=1e-5)),
]

UNEQUAL: list[tuple[Any, Any]] = [
    (FIRE(), GradientDescent()),
    (FIRE(fmax=1e-10), FIRE(fmax=1e-11)),
    (FIRE(), FIRE(dt_max=0.4)),
    (CG(), MINRES()),
    (CG(rtol=1e-8), CG(rtol=1e-9)),
    (Implicit(), Implicit(solver=MINRES())),
    (Implicit(solver=CG(rtol=1e-8)), Implicit(solver=CG(rtol=1e-9))),
    (Implicit(), Implicit(zero_modes=None)),
    (Unrolled(500), Unrolled(501)),
    (FiniteDifference(1e-5), FiniteDifference(1e-6)),
]


@pytest.mark.parametrize("a, b", EQUAL, ids=[repr(a) for a, _ in EQUAL])
def test_equal_values_compare_and_hash_equal(a: Any, b: Any) -> None:
    assert a is not b and a == b and hash(a) == hash(b)


@pytest.mark.parametrize("a, b", UNEQUAL, ids=[f"{a!r}-{b!r}" for a, b in UNEQUAL])
def test_different_values_compare_unequal(a: Any, b: Any) -> None:
    assert a != b


def test_jacobi_compares_by_identity() -> None:
    """A Jacobi preconditioner holds an array: equal by identity (built once per state)."""
    diagonal = jnp.arange(1.0, 5.0)
    jacobi = Jacobi(diagonal)
    assert jacobi == jacobi and Jacobi(diagonal) != jacobi
    assert CG(preconditioner=jacobi) == CG(preconditioner=jacobi)
    assert hash(CG(preconditioner=jacobi)) == hash(CG(preconditioner=jacobi))


# ---------------------------------------------------------------------------
# Pytrees: numbers are leaves
# ---------------------------------------------------------------------------

PYTREES: list[tuple[Any, str, float]] = [
    (FIRE(fmax=1e-10, dt_max=0.3), "fmax", 1e-10),
    (GradientDescent(max_steps=7), "max_steps", 7),
    (CG(rtol=1e-8, max_iter=30), "rtol", 1e-8),
    (MINRES(atol=1e-12), "atol", 1e-12),
    (BiCGSTAB(max_iter=9), "max_iter", 9),
    (Dense(rcond=1e-12), "rcond", 1e-12),
]


@pytest.mark.parametrize("value, field, number", PYTREES, ids=[type(v).__name__ for v, _, _ in PYTREES])
def test_minimisers_and_solvers_are_pytrees(value: Any, field: str, number: float) -> None:
    leaves, treedef = jax.tree_util.tree_flatten(value)
    assert number in leaves
    assert jax.tree_util.tree_unflatten(treedef, leaves) == value
    # Through jit the numbers are traced arguments, not constants of the program.
    doubled = jax.jit(lambda v: jax.tree_util.tree_map(lambda leaf: 2 * leaf, v))(value)
    assert type(doubled) is type(value) and float(getattr(doubled, field)) == 2 * number


def test_preconditioner_is_a_leaf_of_the_solver() -> None:
    diagonal = jnp.arange(1.0, 5.0)
    leaves = jax.tree_util.tree_leaves(CG(preconditioner=Jacobi(diagonal)))
    assert any(leaf is diagonal for leaf in leaves)


# ---------------------------------------------------------------------------
# Compilations: equal options compile once, relax once for every tolerance
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def compilations() -> Iterator[list[str]]:
    """Every XLA compilation in the block (JAX's backend-compile event)."""
    events: list[str] = []

    def listen(event: str, duration: float, **kwargs: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


@pytest.fixture(scope="module")
def small() -> System:
    # A system of this module only: every program below is compiled here first.
    return systems.soft_sphere_packing(16, dim=2, phi=0.9, seed=3)


def diameter_tangent(system: System) -> dict:
    tangent = jax.tree_util.tree_map(jnp.zeros_like, system.params)
    tangent["diameters"] = jnp.asarray([1.0, -0.5])
    return tangent


CALLS: dict[str, tuple[Callable[[System], Any], Any]] = {
    # name: (a call with options written inline, the jitted function it compiles)
    "equilibrium_jvp": (
        lambda s: mdsens.equilibrium_jvp(s, s.params, diameter_tangent(s), adjoint=Implicit(solver=CG(rtol=1e-8))),
        mdsens.equilibria._jvp_at,
    ),
    "equilibrium_vjp": (
        lambda s: mdsens.equilibrium_vjp(s, s.params, jnp.ones((s.n, 2)), adjoint=Implicit(solver=MINRES(rtol=1e-8))),
        mdsens.equilibria._vjp_at,
    ),
    "equilibrium": (
        lambda s: mdsens.equilibrium(s, minimiser=FIRE(fmax=1e-11), adjoint=Implicit(solver=CG(rtol=1e-8))),
        mdsens.equilibria._equilibrium,
    ),
    "relax": (lambda s: mdsens.relax(s, minimiser=GradientDescent(fmax=1e-10)), mdsens.relaxation._relax_compiled),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_equal_options_written_inline_compile_once(name: str, small: System) -> None:
    call, jitted = CALLS[name]
    before = jitted._cache_size()
    with compilations() as first:
        expected = call(small)
    assert first, "the counter is live: the first call compiles"
    assert jitted._cache_size() == before + 1
    with compilations() as second:
        again = call(small)
    assert second == [] and jitted._cache_size() == before + 1
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)


def test_relax_compiles_once_for_every_tolerance(small: System) -> None:
    """The minimiser's numbers are arguments of the compiled loop: other
    tolerances, budgets and time steps reuse it."""
    mdsens.relax(small, minimiser=FIRE(fmax=1e-8))
    size = mdsens.relaxation._relax_compiled._cache_size()
    with compilations() as events:
        for fmax in (1e-9, 1e-10, 1e-12):
            result = mdsens.relax(small, minimiser=FIRE(fmax=fmax, max_steps=50_000))
            assert bool(result.converged) and float(result.fmax) <= fmax
        assert bool(mdsens.relax(small, minimiser=FIRE(dt_max=0.2)).converged)
    assert events == [] and mdsens.relaxation._relax_compiled._cache_size() == size


# ---------------------------------------------------------------------------
# One status table
# ---------------------------------------------------------------------------


def test_status_table() -> None:
    codes = [int(status) for status in Status]
    assert codes == list(range(len(codes))) and Status.converged == 0
    assert all(isinstance(status.message, str) and status.message for status in Status)
    assert Status.names(int(Status.neighbor_overflow)) == "neighbor_overflow"
    np.testing.assert_array_equal(
        Status.names(np.asarray([Status.max_steps, Status.converged])), [Status.max_steps.name, Status.converged.name]
    )


def test_relax_reason_is_the_status_name() -> None:
    system = System.from_energy(lambda x, p: p["k"] * jnp.sum(jnp.sqrt(x)), {"k": 1.0}, jnp.ones((4, 2)), dt_max=0.1)
    quadratic = System.from_energy(lambda x, p: p["k"] * jnp.sum(x**2), {"k": 1.0}, jnp.ones((4, 2)), dt_max=0.1)
    with pytest.warns(RuntimeWarning) as warned:
        results = {
            Status.converged: mdsens.relax(quadratic),
            Status.max_steps: mdsens.relax(quadratic, minimiser=FIRE(max_steps=3)),
            Status.nonfinite: mdsens.relax(system),  # sqrt of negative coordinates
        }
    messages = " ".join(str(w.message) for w in warned)
    for status, result in results.items():
        assert int(result.status) == status and result.reason == status.name
        assert status == Status.converged or status.name in messages
    batch = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *results.values())
    assert isinstance(batch, RelaxResult)
    assert batch.reason.tolist() == [status.name for status in results]


def _solve(solver: Any, A: np.ndarray, b: np.ndarray):
    return jax.jit(lambda b: solver(lambda v: jnp.asarray(A) @ v, b))(jnp.asarray(b))[1]


def test_solve_reason_is_the_status_name() -> None:
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    spd = q @ np.diag(np.geomspace(1.0, 50.0, 6)) @ q.T
    indefinite = q @ np.diag([-1.0, 1.0, 2.0, 3.0, 4.0, 5.0]) @ q.T
    singular = q @ np.diag([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]) @ q.T
    b = rng.standard_normal(6)
    infos = {
        Status.converged: _solve(CG(), spd, b),
        Status.not_converged: _solve(CG(max_iter=2), spd, b),
        Status.negative_curvature: _solve(CG(), indefinite, q[:, 0]),
        Status.singular: _solve(CG(), singular, q[:, 0] + q[:, 1]),  # inconsistent: along the null space
        Status.nonfinite: _solve(CG(), np.full((6, 6), np.nan), b),
    }
    for status, info in infos.items():
        assert int(info.status) == status and info.reason == status.name, (status, info)
    batch = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *infos.values())
    assert batch.reason.tolist() == [status.name for status in infos]
