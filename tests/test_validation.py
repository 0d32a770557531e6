"""Bad inputs give a ``ValueError`` naming the argument and the leaf, or a flagged
result, never a crash deep inside JAX or a plausible wrong number (issue 14).

One regression test per input the issue lists. Every check runs on the host
before compiling, so each case is fast; relaxations that might run anyway get a
budget of a few steps. Cases whose check is missing in a module this file does
not test in isolation are ``xfail(strict=True)`` with the defect as reason.

The rule for numbers (:mod:`mdsens._checks`): float64 passes; integers are
converted to float64, exactly (beyond ``2**53`` they are refused); lower
precision floats, bools, complex numbers, strings and None are refused.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mdsens
from mdsens import FIRE, GradientDescent, Status, observables, systems
from mdsens.testing import dense_reference

# A relaxation that runs although a check is missing stops after a few steps.
FEW_STEPS = FIRE(max_steps=10)


@dataclasses.dataclass(frozen=True)
class Systems:
    packing: mdsens.System  # 16 bidisperse soft discs, diameters per species
    polydisperse: mdsens.System  # the same with one diameter per particle
    lj: mdsens.System  # 2D Lennard-Jones, 25 particles
    morse: mdsens.System  # 2D Morse, 25 particles
    cluster: mdsens.System  # free 2D Lennard-Jones trimer


@pytest.fixture(scope="module")
def built() -> Systems:
    return Systems(
        systems.soft_sphere_packing(16, dim=2, phi=0.9),
        systems.soft_sphere_packing(16, dim=2, phi=0.9, per_particle_diameters=True),
        systems.lennard_jones(25, dim=2),
        systems.morse(25, dim=2),
        systems.lennard_jones_cluster(3, dim=2),
    )


def distinct(n: int, dim: int) -> np.ndarray:
    """Float64 positions with no two particles on one point."""
    return 0.1 * np.arange(n * dim, dtype=np.float64).reshape(n, dim)


def nan_at_first(x: Any) -> jax.Array:
    return jnp.asarray(x).at[0].set(jnp.nan)


def own_energy(x: jax.Array, p: Any) -> jax.Array:
    return jnp.sum(x**2)


Call = Callable[[Systems], Any]


def relax_from(positions: Any, system: str = "packing") -> Call:
    """``relax`` from ``positions`` (a callable of the system's start gives them)."""

    def call(s: Systems) -> Any:
        chosen = getattr(s, system)
        start = positions(chosen.positions) if callable(positions) else positions
        return mdsens.relax(chosen, start, minimiser=FEW_STEPS)

    return call


def relax_with(system: str = "packing", **leaves: Any) -> Call:
    """``relax`` at the system's params with ``leaves`` replaced (a callable of the
    system's params gives the new leaf)."""

    def call(s: Systems) -> Any:
        chosen = getattr(s, system)
        return mdsens.relax(chosen, params=replaced(chosen.params, leaves), minimiser=FEW_STEPS)

    return call


def check_params_with(system: str, **leaves: Any) -> Call:
    """What ``relax`` calls first: ``System.check_params`` (no compilation)."""
    return lambda s: getattr(s, system).check_params(replaced(getattr(s, system).params, leaves))


def replaced(params: dict[str, Any], leaves: dict[str, Any]) -> dict[str, Any]:
    return {**params, **{k: v(params[k]) if callable(v) else v for k, v in leaves.items()}}


def jvp_with(**leaves: Any) -> Call:
    """``equilibrium_jvp`` with a zero tangent but ``leaves``."""

    def call(s: Systems) -> Any:
        zero = jax.tree_util.tree_map(jnp.zeros_like, s.packing.params)
        return mdsens.equilibrium_jvp(s.packing, s.packing.params, replaced(zero, leaves))

    return call


def observe(name: str, positions: Any = None, **leaves: Any) -> Call:
    """The observable ``name`` of the packing at ``positions`` (a callable of the
    start, default the start) and its params with ``leaves`` replaced."""

    def call(s: Systems) -> Any:
        x = s.packing.positions if positions is None else positions
        x = x(s.packing.positions) if callable(x) else x
        return getattr(observables, name)(s.packing, x, replaced(s.packing.params, leaves))

    return call


def own(positions: Any = None, params: Any = None, **options: Any) -> Call:
    """``System.from_energy`` with an own energy."""
    positions = distinct(4, 2) if positions is None else positions
    return lambda s: mdsens.System.from_energy(own_energy, {} if params is None else params, positions, **options)


def case(name: str, call: Call, match: str, defect: str | None = None) -> Any:
    """A bad input: ``call`` must raise ``ValueError`` matching ``match`` (the
    argument's name); ``defect``: the check is missing, the case is a strict xfail."""
    marks = () if defect is None else (pytest.mark.xfail(strict=True, reason=defect),)
    return pytest.param(call, match, id=name, marks=marks)


MIN_IMAGE = r"params\['box'\].*narrower than twice the interaction range"
DIAMETERS, EPSILON, ALPHA, BOX = (rf"params\['{k}'\]" for k in ("diameters", "epsilon", "alpha", "box"))
NEGATE = jnp.negative

CASES = [
    # Positions: the system's shape (N, dim), real numbers, finite, distinct, near the box.
    case("positions_3d_for_2d", relax_from(distinct(16, 3)), r"positions.*\(16, 2\)"),
    case("positions_15_for_16", relax_from(distinct(15, 2)), r"positions.*\(16, 2\)"),
    case("positions_flat", relax_from(np.arange(32.0)), r"positions.*\(N, dim\)"),
    case("positions_float32", relax_from(distinct(16, 2).astype(np.float32)), "positions.*float32"),
    case("positions_bool", relax_from(np.ones((16, 2), bool)), "positions.*bool"),
    case("positions_complex", relax_from(distinct(16, 2) + 0j), "positions.*complex"),
    case("positions_string", relax_from("positions"), "positions"),
    case("positions_ragged", relax_from([[0.0, 1.0], [2.0]]), "positions"),
    case("positions_none_entries", relax_from([[None, 1.0]] * 16), "positions.*object"),
    case("positions_beyond_2_53", relax_from(2**60 + np.arange(32).reshape(16, 2)), r"positions.*2\*\*53"),
    case("positions_nan", relax_from(nan_at_first), "positions.*NaN"),
    case("positions_inf", relax_from(lambda x: x.at[3, 1].set(jnp.inf)), "positions.*inf"),
    case("positions_1e300", relax_from(lambda x: x.at[0, 0].set(1e300)), "positions.*boxes away"),
    case("positions_one_point", relax_from(np.zeros((16, 2))), "positions.*one point"),
    case("positions_two_on_one_point", relax_from([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]], "cluster"), "one point"),
    case("own_start_float32", own(distinct(4, 2).astype(np.float32)), "positions.*float32"),
    # The box: a finite (dim, dim) matrix.
    case("box_3x3_for_2d", relax_with(box=4.5 * jnp.eye(3)), BOX + r".*\(2, 2\)"),
    case("box_vector_for_2d", relax_with(box=jnp.ones(2)), BOX + r".*\(2, 2\)"),
    case("own_box_3x3", own(box=np.eye(3)), r"box.*\(2, 2\)"),
    case("own_box_vector", own(box=np.ones(2)), r"box.*\(2, 2\)"),
    case("own_box_nan", own(box=np.full((2, 2), np.nan)), "box.*NaN"),
    # Parameters: the system's structure and shapes, real finite numbers, positive sizes.
    case("params_scalar", lambda s: mdsens.relax(s.packing, params=1.0), "params.*structure"),
    case("params_string", lambda s: mdsens.relax(s.packing, params="diameters"), "params"),
    case("own_params_string", own(params="a"), "params"),
    case("params_missing_leaf", relax_with(alpha=None), "params.*structure"),
    case("params_leaf_string", relax_with(epsilon="1"), EPSILON),
    case("params_leaf_bool", relax_with(epsilon=True), EPSILON + ".*bool"),
    case("params_leaf_complex", relax_with(epsilon=1 + 0j), EPSILON + ".*complex"),
    case("params_leaf_float32", relax_with(epsilon=np.float32(1)), EPSILON + ".*float32"),
    case("params_leaf_nan", relax_with(alpha=np.nan), ALPHA + ".*NaN"),
    case("diameters_1_for_2_species", relax_with(diameters=jnp.ones(1)), DIAMETERS + r".*\(2,\)"),
    case("diameters_15_for_2_species", relax_with(diameters=jnp.ones(15)), DIAMETERS + r".*\(2,\)"),
    case("diameters_15_for_16", relax_with("polydisperse", diameters=jnp.ones(15)), DIAMETERS + r".*\(16,\)"),
    case("diameters_2_for_16", relax_with("polydisperse", diameters=jnp.ones(2)), DIAMETERS + r".*\(16,\)"),
    case("negative_diameters", relax_with(diameters=NEGATE), DIAMETERS + ".*positive"),
    case("negative_epsilon", relax_with(epsilon=-1.0), EPSILON + ".*positive"),
    case("zero_epsilon", relax_with(epsilon=0.0), EPSILON + ".*positive"),
    case("zero_alpha", relax_with(alpha=0.0), ALPHA + ".*positive"),
    case("lj_zero_epsilon", check_params_with("lj", epsilon=jnp.zeros((1, 1))), EPSILON + ".*positive"),
    case("lj_negative_sigma", check_params_with("lj", sigma=NEGATE), r"params\['sigma'\].*positive"),
    case("morse_negative_alpha", check_params_with("morse", alpha=NEGATE), ALPHA + ".*positive"),
    case("diameters_beyond_half_box", relax_with(diameters=jnp.array([1.0, 3.0])), MIN_IMAGE),
    case("box_below_twice_the_range", relax_with(box=lambda box: 0.5 * box), MIN_IMAGE),
    case("lj_box_below_twice_the_cutoff", check_params_with("lj", box=lambda box: 0.4 * box), MIN_IMAGE),
    case("own_positive_not_a_param", own(params={"a": 1.0}, positive=("b",)), "positive.*'b'"),
    # Options are values, checked when built.
    case("fmax_string", lambda s: FIRE(fmax="a"), "fmax"),
    case("fmax_none", lambda s: FIRE(fmax=None), "fmax"),
    case("fmax_nan", lambda s: GradientDescent(fmax=float("nan")), "fmax"),
    case("fmax_bool", lambda s: FIRE(fmax=True), "fmax"),
    case("dt_max_string", lambda s: FIRE(dt_max="a"), "dt_max"),
    case("descent_dt_max_string", lambda s: GradientDescent(dt_max="a"), "dt_max"),
    case("dt_max_negative", lambda s: FIRE(dt_max=-0.1), "dt_max"),
    case("max_steps_2_40", lambda s: FIRE(max_steps=2**40), "max_steps"),
    case("descent_max_steps_2_40", lambda s: GradientDescent(max_steps=2**40), "max_steps"),
    case("max_steps_float", lambda s: FIRE(max_steps=10.0), "max_steps"),
    case("minimiser_string", lambda s: mdsens.relax(s.packing, minimiser="FIRE"), "minimiser"),
    case("adjoint_string", lambda s: mdsens.equilibrium(s.packing, adjoint="implicit"), "adjoint"),
    case("throw_string", lambda s: mdsens.equilibrium(s.packing, throw="no"), "throw"),
    case("own_dt_max_string", own(dt_max="a"), "dt_max"),
    case("own_species_float", own(species=np.ones(4)), "species"),
    # Builders' arguments.
    case("dim_float", lambda s: systems.soft_sphere_packing(16, dim=2.0), "dim"),
    case("lj_dim_float", lambda s: systems.lennard_jones(25, dim=2.0), "dim"),
    case("dim_4", lambda s: systems.soft_sphere_packing(16, dim=4), "dim"),
    case("n_float", lambda s: systems.soft_sphere_packing(16.0), "n"),
    case("n_bool", lambda s: systems.lennard_jones_cluster(True), "n"),
    case("n_1", lambda s: systems.lennard_jones_cluster(1), "n"),
    case("phi_string", lambda s: systems.soft_sphere_packing(16, phi="0.9"), "phi"),
    case("phi_nan", lambda s: systems.soft_sphere_packing(16, phi=float("nan")), "phi"),
    case("phi_negative", lambda s: systems.soft_sphere_packing(16, phi=-0.9), "phi"),
    case("phi_too_dense_for_the_box", lambda s: systems.soft_sphere_packing(16, phi=5.0), "phi"),
    case("seed_string", lambda s: systems.soft_sphere_packing(16, seed="a"), "seed"),
    case("seed_float", lambda s: systems.lennard_jones(25, dim=2, seed=1.5), "seed"),
    case("density_string", lambda s: systems.lennard_jones(25, dim=2, density="1"), "density"),
    case("alpha_string", lambda s: systems.soft_sphere_packing(16, alpha="2"), "alpha"),
    case("cutoff_string", lambda s: systems.lennard_jones(25, dim=2, cutoff="2.5"), "cutoff"),
    case("neighbor_list_string", lambda s: systems.soft_sphere_packing(16, neighbor_list="yes"), "neighbor_list"),
    case("builder_negative_diameters", lambda s: systems.soft_sphere_packing(16, diameters=(-1.0, 1.4)), "diameters"),
    case("builder_negative_epsilon", lambda s: systems.soft_sphere_packing(16, epsilon=-1.0), "epsilon.*positive"),
    case("builder_zero_epsilon", lambda s: systems.soft_sphere_packing(16, epsilon=0.0), "epsilon.*positive"),
    case("builder_lj_zero_epsilon", lambda s: systems.lennard_jones(25, dim=2, epsilon=0.0), "epsilon.*positive"),
    case("builder_inf_sigma", lambda s: systems.morse(25, dim=2, sigma=np.inf), "sigma"),
    case("builder_diameters_1_for_2_species", lambda s: systems.soft_sphere_packing(16, diameters=(1.0,)), "diameters"),
    case(
        "builder_diameters_15_for_2_species", lambda s: systems.soft_sphere_packing(16, diameters=(1.0,) * 15), "diam"
    ),
    case(
        "builder_asymmetric_sigma",
        lambda s: systems.lennard_jones(25, dim=2, sigma=[[1.0, 0.8], [0.9, 1.0]], fractions=(0.5, 0.5)),
        "sigma.*symmetric",
    ),
    # Tangents and cotangents: the structure and shapes of params and positions.
    case("tangent_missing_leaf", lambda s: mdsens.equilibrium_jvp(s.packing, None, {"epsilon": 1.0}), "tangent"),
    case("tangent_list", lambda s: mdsens.equilibrium_jvp(s.packing, None, [1.0]), "tangent.*structure"),
    case("tangent_wrong_shape", jvp_with(diameters=jnp.ones(3)), r"tangent\['diameters'\].*\(2,\)"),
    case("tangent_nan", jvp_with(epsilon=jnp.nan), r"tangent\['epsilon'\].*NaN"),
    case("tangent_float32", jvp_with(epsilon=np.float32(1)), r"tangent\['epsilon'\].*float32"),
    case("cotangent_wrong_shape", lambda s: mdsens.equilibrium_vjp(s.packing, None, jnp.ones((15, 2))), "cotangent"),
    case("cotangent_nan", lambda s: mdsens.equilibrium_vjp(s.packing, None, nan_at_first(jnp.ones((16, 2)))), "cotan"),
    case(
        "sensitivity_at_tangent_structure",
        lambda s: mdsens.sensitivity_at(s.packing, s.packing.positions, s.packing.params, {"epsilon": 1.0}),
        "tangent",
    ),
    case(
        "sensitivity_at_nan_positions",
        lambda s: mdsens.sensitivity_at(
            s.packing, nan_at_first(s.packing.positions), s.packing.params, s.packing.params
        ),
        "positions.*NaN",
    ),
    case(
        "energy_sensitivity_nan",
        lambda s: mdsens.energy_sensitivity(s.packing, nan_at_first(s.packing.positions)),
        "NaN",
    ),
    case("hessian_diagonal_3d", lambda s: s.packing.hessian_diagonal(distinct(16, 3)), r"positions.*\(16, 2\)"),
    # Observables check their inputs as relax does.
    case("contact_number_nan_positions", observe("contact_number", nan_at_first), "positions.*NaN"),
    case("contact_number_nan_diameters", observe("contact_number", diameters=nan_at_first), DIAMETERS),
    case("contact_number_float32", observe("contact_number", lambda x: x.astype(jnp.float32)), "float32"),
    case("contact_number_3d_positions", observe("contact_number", distinct(16, 3)), r"\(16, 2\)"),
    case("contacts_nan_positions", observe("contacts", nan_at_first), "positions.*NaN"),
    case("overlaps_diameters_15", observe("overlaps", diameters=jnp.ones(15)), DIAMETERS),
    case("energy_nan_positions", observe("energy", nan_at_first), "positions.*NaN"),
    case("stress_nan_positions", observe("stress", nan_at_first), "positions.*NaN"),
    case("pressure_nan_epsilon", observe("pressure", epsilon=jnp.nan), EPSILON + ".*NaN"),
    case("stress_params_structure", observe("stress", box=None), "params.*structure"),
    case("rattlers_dim_fraction", lambda s: observables.rattlers(np.ones((4, 4), bool), 2.5), "dim"),
]


@pytest.mark.parametrize(("call", "match"), CASES)
def test_bad_input_raises_value_error_naming_it(built: Systems, call: Callable[[Systems], Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(built)


def test_integer_inputs_are_converted_exactly(built: Systems) -> None:
    """Integers (Python ints, integer arrays) become the same float64 values."""
    s = built.packing
    integers = np.arange(32).reshape(16, 2)
    positions = s.check_positions(integers)
    assert positions.dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(positions), integers)
    params = s.check_params(replaced(s.params, {"epsilon": 3, "diameters": np.array([1, 2], dtype=np.int32)}))
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree_util.tree_leaves(params))
    assert float(params["epsilon"]) == 3.0
    np.testing.assert_array_equal(np.asarray(params["diameters"]), [1.0, 2.0])
    # 2**53 itself is exact; options take integers as floats too.
    assert float(s.check_params(replaced(s.params, {"epsilon": 2**53}))["epsilon"]) == 2.0**53
    assert FIRE(fmax=1).fmax == 1.0


def test_float64_inputs_are_not_copied_or_changed(built: Systems) -> None:
    s = built.packing
    assert s.check_positions(s.positions) is s.positions
    assert all(
        a is b
        for a, b in zip(
            jax.tree_util.tree_leaves(s.check_params(s.params)), jax.tree_util.tree_leaves(s.params), strict=True
        )
    )


def test_observables_take_python_numbers(built: Systems) -> None:
    """Parameters as Python numbers (valid input: converted as relax converts
    them) give the same observables as float64 arrays."""
    s = built.packing
    as_numbers = {**s.params, "epsilon": 1, "alpha": 2.0}  # alpha as a float: AttributeError in jax-md
    assert float(observables.energy(s, s.positions, as_numbers)) == float(observables.energy(s, s.positions, s.params))


def test_linear_trimer_is_a_saddle_not_converged(built: Systems) -> None:
    """The linear Lennard-Jones trimer has zero forces by symmetry and a negative
    Hessian eigenvalue (-0.222): flagged as a saddle, its curvature that of the
    dense Hessian."""
    r = 2.0 ** (1.0 / 6.0)
    with pytest.warns(RuntimeWarning, match=Status.saddle.name):
        result = mdsens.relax(built.cluster, [[0.0, 0.0], [r, 0.0], [2.0 * r, 0.0]])
    assert result.reason == Status.saddle.name and not bool(result.converged)
    lowest = dense_reference(built.cluster.energy, result.positions, built.cluster.params).eigenvalues[0]
    assert lowest < 0
    assert float(result.lowest_curvature) == pytest.approx(lowest, rel=1e-8)


def test_cluster_flung_apart_is_not_converged(built: Systems) -> None:
    """Two particles 1/64 apart fling each other 3.6e20 away in one step: every
    force is below 1e-140, but the three particles apart are no minimum (their
    dense Hessian has curvature -|H| along the line), so not converged. Now the
    rattler test of detect() squares entries of H z of order 1e-162 to zero,
    takes every particle for a rattler and certifies the state."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = mdsens.relax(built.cluster, [[0.0, 0.0], [1.0, 0.0], [1.0 / 64.0, 0.0]])
    reference = dense_reference(built.cluster.energy, result.positions, built.cluster.params)
    assert reference.eigenvalues[0] < -0.5 * np.max(np.abs(reference.eigenvalues))  # the oracle: a saddle
    assert not bool(result.converged)


def test_traced_nan_positions_are_flagged_nonfinite(built: Systems) -> None:
    """Under jit the values cannot be checked before compiling: the result says so."""
    positions = nan_at_first(built.packing.positions)
    with pytest.warns(RuntimeWarning, match=Status.nonfinite.name):
        result = jax.jit(lambda x: mdsens.relax(built.packing, x, minimiser=FEW_STEPS))(positions)
        # Dispatch is asynchronous: wait for the warning's callback inside the block.
        jax.effects_barrier()
    assert result.reason == Status.nonfinite.name and not bool(result.converged)
