"""Tests of the user API: equilibrium, equilibrium_with_info, equilibrium_jvp,
equilibrium_vjp, energy_sensitivity and System.hessian_diagonal.

Oracles, none of which uses mdsens' implicit-differentiation code:

- :func:`mdsens.testing.dense_reference`: dense linear algebra on autodiff
  derivatives of the energy at the relaxed state, ``dx*/dtheta = -pinv(H)
  d_theta grad E``, the minimum-norm derivative (no component along
  translations, rotations or rattlers), and the second derivative from
  differentiating ``grad E(x*(theta), theta) = 0`` twice (third derivatives of
  the energy, pinv again);
- analytic cases: a harmonic dimer, a Lennard-Jones cluster's scaling with sigma;
- central finite differences of re-relaxed states;
- autodiff through an unrolled minimiser on a tiny system.

Compilation dominates the run time, so each system is relaxed once and each
transformation is compiled once: first derivatives are returned as the aux
output of the second-derivative computations.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import mdsens  # noqa: E402
from mdsens import CG, FIRE, MINRES, FiniteDifference, Implicit, Jacobi, Status, System, Unrolled, systems  # noqa: E402
from mdsens import zero_modes as zm  # noqa: E402
from mdsens.testing import DenseReference, dense_reference  # noqa: E402

FMAX = 1e-12
RTOL = 1e-8  # required agreement of every implicit derivative with the dense reference
RCOND = 1e-8  # pinv cut-off, relative to the largest eigenvalue of H


def rel_err(actual: Any, expected: Any) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.all(np.isfinite(actual))
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def raises_with(match: str):
    """A failure detected inside a compiled computation reaches Python as the
    FloatingPointError itself or wrapped in a JaxRuntimeError."""
    return pytest.raises((FloatingPointError, jax.errors.JaxRuntimeError), match=match)


def random_like(tree: Any, seed: int) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, jnp.shape(v), jnp.float64) for k, v in zip(keys, leaves, strict=True)]
    )


def pair_gaps(box: Any, x: Any, diameters: Any) -> np.ndarray:
    """Centre distance (minimum image in the cubic ``box``) over contact distance
    for every pair (inf on the diagonal)."""
    x, side = np.asarray(x), np.diag(np.asarray(box))
    dr = x[:, None, :] - x[None, :, :]
    dr -= side * np.round(dr / side)
    d = np.asarray(diameters)
    gaps = np.linalg.norm(dr, axis=-1) / (0.5 * (d[:, None] + d[None, :]))
    np.fill_diagonal(gaps, np.inf)
    return gaps


# ---------------------------------------------------------------------------
# Systems, relaxed once, and their dense references
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
    """A system whose parameters ``theta`` are the ones differentiated and whose
    positions are the start, and the state relaxed from it by mdsens.relax."""

    name: str
    system: System
    n_zero_modes: int
    x: np.ndarray

    @property
    def theta(self) -> dict[str, jax.Array]:
        return self.system.params

    @property
    def start(self) -> jax.Array:
        return self.system.positions

    @property
    def flat_theta(self) -> jax.Array:
        return ravel_pytree(self.theta)[0]

    def unravel(self, flat: jax.Array) -> dict[str, jax.Array]:
        return ravel_pytree(self.theta)[1](flat)

    def x_star(self, **options: Any) -> Callable[[jax.Array], jax.Array]:
        """``flat theta -> x*`` by mdsens.equilibrium, from the case's start."""

        def x_star(flat, start=None):
            return mdsens.equilibrium(self.system, self.unravel(flat), positions=start, **options)

        return x_star

    def relax(self, start: Any, theta: Any) -> np.ndarray:
        result = mdsens.relax(self.system, start, theta, minimiser=FIRE(fmax=FMAX))
        assert bool(result.converged) and float(result.fmax) <= FMAX
        return np.asarray(result.positions)


def restricted(system: System, names: tuple[str, ...]):
    """The system's energy as a function of the parameters ``names`` only."""
    fixed = {k: v for k, v in system.params.items() if k not in names}

    def energy_fn(x, theta):
        return system.energy(x, {**fixed, **theta})

    return energy_fn, {k: system.params[k] for k in names}


def lj_pairs_energy(n: int) -> Callable[[jax.Array, Any], jax.Array]:
    """Lennard-Jones over the pairs i < j with one sigma per particle (arithmetic
    mean per pair) and one epsilon. With all sigmas equal it is the energy of
    ``systems.lennard_jones_cluster``; per-particle sigmas make the second
    derivatives of x* nonzero (with one sigma, x* only scales)."""
    i, j = np.triu_indices(n, 1)

    def energy_fn(x, theta):
        r = jnp.linalg.norm(x[i] - x[j], axis=-1)
        s6 = (0.5 * (theta["sigma"][i] + theta["sigma"][j]) / r) ** 6
        return jnp.sum(4.0 * theta["epsilon"] * (s6 * s6 - s6))

    return energy_fn


def make_case(name, energy_fn, theta, system, n_zero_modes, start=None) -> Case:
    start = system.positions if start is None else start
    own = System.from_energy(energy_fn, theta, start, box=system.box, dt_max=system.dt_max)
    case = Case(name, own, n_zero_modes, np.zeros(0))
    return dataclasses.replace(case, x=case.relax(case.start, case.theta))


RATTLER = 2  # the particle of the seed-1 packing that becomes a rattler


def rattler_case(system: System) -> Case:
    """A 2D packing with one rattler. Shrinking particle 2's diameter to 0.3 lets
    it escape its contacts (it ends touching, at zero overlap); shrinking it
    further to 0.15 then leaves it ~10% clear of every neighbour. The start is
    that state slightly perturbed, so the relaxation does some work."""
    energy_fn, theta = restricted(system, ("diameters", "epsilon"))
    probe = make_case("probe", energy_fn, theta, system, 0)
    shrink = lambda d: {**theta, "diameters": theta["diameters"].at[RATTLER].set(d)}  # noqa: E731
    escaped = probe.relax(probe.x, shrink(0.3))
    start = escaped + 1e-3 * np.asarray(jax.random.normal(jax.random.PRNGKey(3), escaped.shape))
    case = make_case("rattler2d", energy_fn, shrink(0.15), system, n_zero_modes=4, start=start)
    gaps = pair_gaps(system.box, case.x, case.theta["diameters"]).min(axis=1)
    assert gaps[RATTLER] > 1.05, "the construction no longer gives a rattler"
    assert np.all(np.delete(gaps, RATTLER) < 1.0), "another particle lost all contacts"
    return case


_CASES: dict[str, Case] = {}


def get_case(name: str, request: pytest.FixtureRequest) -> Case:
    if name not in _CASES:
        if name == "ss2d":  # species diameters and epsilon
            system = systems.soft_sphere_packing(16, dim=2, phi=0.9, seed=0)
            energy_fn, theta = restricted(system, ("diameters", "epsilon"))
            _CASES[name] = make_case(name, energy_fn, theta, system, n_zero_modes=2)
        elif name == "rattler2d":  # per-particle diameters, one rattler
            system = systems.soft_sphere_packing(16, dim=2, phi=0.9, seed=1, per_particle_diameters=True)
            _CASES[name] = rattler_case(system)
        elif name == "ss3d":
            system = request.getfixturevalue("soft_sphere_3d")
            energy_fn, theta = restricted(system, ("diameters", "epsilon"))
            _CASES[name] = make_case(name, energy_fn, theta, system, n_zero_modes=3)
        elif name == "lj13":  # free cluster: 3 translations and 3 rotations
            system = request.getfixturevalue("lj_cluster")
            theta = {"sigma": jnp.ones(system.n), "epsilon": jnp.asarray(1.0)}
            _CASES[name] = make_case(name, lj_pairs_energy(system.n), theta, system, n_zero_modes=6)
        else:
            raise KeyError(name)
    return _CASES[name]


_REFERENCES: dict[str, DenseReference] = {}


def reference(case: Case) -> DenseReference:
    """The dense first and second derivatives at the case's relaxed state (once)."""
    if case.name not in _REFERENCES:
        _REFERENCES[case.name] = dense_reference(case.system.energy, case.x, case.theta, rcond=RCOND, second_order=True)
    return _REFERENCES[case.name]


def case_fixture(names: tuple[str, ...]):
    @pytest.fixture(scope="module", params=names)
    def fixture(request: pytest.FixtureRequest) -> Case:
        return get_case(request.param, request)

    return fixture


case = case_fixture(("ss2d", "rattler2d", "ss3d", "lj13"))
case2 = case_fixture(("ss2d", "ss3d", "lj13"))  # the three required systems
packing2d = case_fixture(("ss2d", "rattler2d"))
ss2d = case_fixture(("ss2d",))
rattler = case_fixture(("rattler2d",))
lj13 = case_fixture(("lj13",))


def scalar_objective(x: jax.Array, weights: Any) -> jax.Array:
    """A nonlinear scalar function of the positions."""
    return jnp.sum(weights * x) + jnp.sum(jnp.sin(x))


def projection_outputs(case: Case) -> np.ndarray:
    """Four random linear functionals of x*: reverse-over-reverse of all of x*
    costs (N dim)^2 P batched linear solves, too many in 3D."""
    return np.asarray(jax.random.normal(jax.random.PRNGKey(4), (4, case.x.size)))


# ---------------------------------------------------------------------------
# The oracle and the relaxed states
# ---------------------------------------------------------------------------


def test_zero_modes_match_dense_null_space(case: Case) -> None:
    """The zero modes of H are the expected ones (translations, rotations of the
    cluster, the rattler's coordinates), well separated from the rest of the
    spectrum; zero_modes.detect finds exactly that null space."""
    ref = reference(case)
    scale = np.max(np.abs(ref.eigenvalues))
    assert ref.null_space.shape[1] == case.n_zero_modes
    assert np.sort(np.abs(ref.eigenvalues))[case.n_zero_modes] > 1e-4 * scale
    hvp = lambda v: jax.jvp(lambda x: jax.grad(case.system.energy)(x, case.theta), (case.x,), (v,))[1]  # noqa: E731
    modes = jax.jit(lambda x: zm.detect(hvp, x))(jnp.asarray(case.x))
    assert int(modes.n_modes) == case.n_zero_modes
    projector = np.asarray(jax.vmap(modes.project)(jnp.eye(case.x.size))).T
    expected = np.eye(case.x.size) - ref.null_space @ ref.null_space.T
    np.testing.assert_allclose(projector, expected, atol=1e-9)
    if case.name == "rattler2d":
        np.testing.assert_array_equal(np.asarray(modes.mask)[:, 0], np.arange(case.x.shape[0]) != RATTLER)


def test_lj_pairs_energy_is_the_cluster_energy(lj13: Case, lj_cluster: System) -> None:
    energy_fn = lj_pairs_energy(lj_cluster.n)
    theta = {"sigma": jnp.ones(lj_cluster.n), "epsilon": jnp.asarray(1.0)}
    ours = jax.jit(jax.value_and_grad(energy_fn))
    theirs = jax.jit(jax.value_and_grad(lj_cluster.energy))
    for positions in (lj_cluster.positions, jnp.asarray(lj13.x)):
        (e, g), (expected_e, expected_g) = ours(positions, theta), theirs(positions, lj_cluster.params)
        assert float(e) == pytest.approx(float(expected_e), rel=1e-12)
        np.testing.assert_allclose(g, expected_g, rtol=0, atol=1e-10 * float(jnp.max(jnp.abs(expected_g))) + 1e-12)


# ---------------------------------------------------------------------------
# First derivatives
# ---------------------------------------------------------------------------


def test_equilibrium_jvp(packing2d: Case) -> None:
    case = packing2d
    ref = reference(case)
    tangent = random_like(case.theta, 1)
    x, dx, info = mdsens.equilibrium_jvp(case.system, case.theta, tangent)
    np.testing.assert_allclose(x, case.x, rtol=0, atol=1e-9)
    assert rel_err(dx.ravel(), ref.J @ ravel_pytree(tangent)[0]) <= RTOL
    if case.name == "rattler2d":  # the rattler does not move (minimum norm)
        np.testing.assert_array_equal(dx[RATTLER], 0.0)
    assert isinstance(info, mdsens.EquilibriumInfo)
    assert bool(info.relax.converged) and float(info.relax.fmax) <= FMAX
    assert bool(info.solve.converged) and not bool(info.solve.negative_curvature)
    assert int(info.solve.iterations) > 0 and float(info.solve.residual) <= 1e-10


def test_equilibrium_vjp_nonzero_mean_cotangent(case: Case) -> None:
    ref = reference(case)
    # Mean 1 per coordinate: a large component along the translations.
    cotangent = jax.random.normal(jax.random.PRNGKey(2), case.x.shape) + 1.0
    x, theta_bar, info = mdsens.equilibrium_vjp(case.system, case.theta, cotangent)
    np.testing.assert_allclose(x, case.x, rtol=0, atol=1e-9)
    assert jax.tree_util.tree_structure(theta_bar) == jax.tree_util.tree_structure(case.theta)
    assert rel_err(ravel_pytree(theta_bar)[0], np.asarray(cotangent).ravel() @ ref.J) <= RTOL
    assert bool(info.relax.converged) and float(info.relax.fmax) <= FMAX
    assert bool(info.solve.converged) and not bool(info.solve.negative_curvature)
    assert int(info.solve.iterations) > 0 and float(info.solve.residual) <= 1e-10


def test_translation_cotangent_has_zero_derivative(ss2d: Case) -> None:
    """A cotangent that is a rigid translation (the gradient of the centroid) has
    no component off the zero modes: the derivative is exactly zero, no solve."""
    cotangent = jnp.broadcast_to(jnp.asarray([1.0, -2.0]), ss2d.x.shape)
    _, theta_bar, info = mdsens.equilibrium_vjp(ss2d.system, ss2d.theta, cotangent)
    assert bool(info.solve.converged) and not bool(info.solve.negative_curvature)
    assert int(info.solve.iterations) == 0
    assert float(jnp.max(jnp.abs(ravel_pytree(theta_bar)[0]))) == 0.0


def test_jacrev_rattler(rattler: Case) -> None:
    """Every row of jacrev is a cotangent e_i, including e_i on the rattler."""
    ref = reference(rattler)
    reverse = jax.jacrev(rattler.x_star())(rattler.flat_theta).reshape(ref.J.shape)
    assert rel_err(reverse, ref.J) <= RTOL
    # The rattler does not move with any parameter (minimum norm), and its own
    # diameter (column RATTLER of the flat parameters) moves nothing.
    assert float(np.max(np.abs(reverse[2 * RATTLER : 2 * RATTLER + 2]))) <= 1e-12
    assert float(np.max(np.abs(reverse[:, RATTLER]))) <= 1e-12


def rattler_cotangent(case: Case) -> jax.Array:
    """Zero mean (no translation component), nonzero on the rattler."""
    cotangent = np.zeros(case.x.shape)
    cotangent[RATTLER] = [1.0, -0.5]
    cotangent[(RATTLER + 3) % case.x.shape[0]] = [-1.0, 0.5]
    return jnp.asarray(cotangent)


def test_rattler_without_zero_modes_fails_loudly(rattler: Case) -> None:
    x_star = rattler.x_star(adjoint=Implicit(zero_modes=None))
    _, vjp = jax.vjp(x_star, rattler.flat_theta)
    # CG meets the rattler's zero curvature, which no declared zero mode covers.
    with raises_with(re.escape(Status.singular.message)):
        jax.block_until_ready(vjp(rattler_cotangent(rattler)))
    # The same cotangent off the rattler is fine without zero modes: the failure
    # is the rattler's, not the translations'.
    off_rattler = rattler_cotangent(rattler).at[RATTLER].set(0.0).at[RATTLER + 1].add(jnp.asarray([1.0, -0.5]))
    (theta_bar,) = vjp(off_rattler)
    assert rel_err(theta_bar, np.asarray(off_rattler).ravel() @ reference(rattler).J) <= 1e-6


def test_rattler_without_zero_modes_nan_when_not_throwing(rattler: Case) -> None:
    _, vjp = jax.vjp(rattler.x_star(adjoint=Implicit(zero_modes=None), throw=False), rattler.flat_theta)
    with pytest.warns(RuntimeWarning, match=re.escape(Status.singular.message)):
        (theta_bar,) = vjp(rattler_cotangent(rattler))
        theta_bar = np.asarray(theta_bar)
    assert np.all(np.isnan(theta_bar))


# ---------------------------------------------------------------------------
# Second derivatives (and first, as their aux output)
# ---------------------------------------------------------------------------

_RESULTS: dict[tuple[str, str], Any] = {}


def forward_over_forward(case: Case) -> tuple[jax.Array, jax.Array]:
    """``(d2x*/dtheta2, dx*/dtheta)`` by jacfwd(jacfwd), the first derivative as aux."""
    key = (case.name, "ff")
    if key not in _RESULTS:
        jacobian = jax.jacfwd(case.x_star())
        n = case.x.size
        _RESULTS[key] = jax.jacfwd(lambda t: (lambda J: (J, J))(jacobian(t).reshape(n, -1)), has_aux=True)(
            case.flat_theta
        )
    return _RESULTS[key]


def reverse_over_reverse(case: Case) -> tuple[jax.Array, jax.Array, np.ndarray]:
    """jacrev(jacrev) of ``C x*`` (C: identity in 2D, random functionals otherwise)."""
    key = (case.name, "rr")
    if key not in _RESULTS:
        C = np.eye(case.x.size) if case.x.shape[1] == 2 else projection_outputs(case)
        outputs = lambda t: jnp.asarray(C) @ case.x_star()(t).ravel()  # noqa: E731
        jacobian = jax.jacrev(outputs)
        second, first = jax.jacrev(lambda t: (lambda J: (J, J))(jacobian(t)), has_aux=True)(case.flat_theta)
        _RESULTS[key] = (second, first, C)
    return _RESULTS[key]


@pytest.mark.slow
def test_jacfwd(case2: Case) -> None:
    _, first = forward_over_forward(case2)
    assert rel_err(first, reference(case2).J) <= RTOL


@pytest.mark.slow
def test_jacfwd_jacfwd(case2: Case) -> None:
    second, _ = forward_over_forward(case2)
    assert rel_err(second, reference(case2).X2) <= RTOL


@pytest.mark.slow
def test_jacrev(case2: Case) -> None:
    # Every row is a cotangent e_i (or a random functional): nonzero mean.
    _, first, C = reverse_over_reverse(case2)
    assert rel_err(first, C @ reference(case2).J) <= RTOL


@pytest.mark.slow
def test_jacrev_jacrev(case2: Case) -> None:
    second, _, C = reverse_over_reverse(case2)
    assert rel_err(second, np.einsum("ki,iab->kab", C, reference(case2).X2)) <= RTOL


@pytest.mark.slow
def test_hessian_of_scalar_objective(case2: Case) -> None:
    ref = reference(case2)
    weights = np.asarray(jax.random.normal(jax.random.PRNGKey(3), case2.x.shape))
    x_star = case2.x_star()
    hessian = jax.hessian(lambda t: scalar_objective(x_star(t), weights))(case2.flat_theta)
    x = case2.x.ravel()
    expected = ref.J.T @ (-np.sin(x)[:, None] * ref.J) + np.einsum("i,iab->ab", weights.ravel() + np.cos(x), ref.X2)
    assert rel_err(hessian, expected) <= RTOL


def test_lj_cluster_scales_with_sigma(lj_cluster: System) -> None:
    """systems.lennard_jones_cluster: x*(sigma) = sigma x*(1) about the fixed
    centroid, so dx*/dsigma = x* - centroid (minimum norm: a dilation has no
    translation or rotation component) and dx*/depsilon = 0."""
    result = mdsens.relax(lj_cluster)
    centred = np.asarray(result.positions - jnp.mean(result.positions, axis=0))
    tangent = {"sigma": jnp.ones((1, 1)), "epsilon": jnp.full((1, 1), 0.3)}
    _, dx, info = mdsens.equilibrium_jvp(lj_cluster, lj_cluster.params, tangent)
    assert bool(info.solve.converged)
    assert rel_err(dx, centred) <= 1e-9


def test_lj_cluster_reverse_mode_in_params(lj_cluster: System) -> None:
    """Reverse mode in sigma and epsilon (the all-pairs sum also visits i == j at
    r = 0, which must not leak NaN), against scaling: a free LJ cluster's relaxed
    energy is epsilon times a number, independent of sigma."""
    params = lj_cluster.params
    r = mdsens.relax(lj_cluster)
    sensitivity = mdsens.energy_sensitivity(lj_cluster, r.positions, params)
    epsilon = float(jnp.sum(params["epsilon"]))
    assert float(jnp.sum(sensitivity["epsilon"])) == pytest.approx(float(r.energy) / epsilon, rel=1e-10)
    assert abs(float(jnp.sum(sensitivity["sigma"]))) <= 1e-9 * abs(float(r.energy))


# ---------------------------------------------------------------------------
# Analytic: a harmonic dimer
# ---------------------------------------------------------------------------


def dimer_energy(x: jax.Array, theta: dict[str, jax.Array]) -> jax.Array:
    r = jnp.linalg.norm(x[1] - x[0])
    return 0.5 * theta["k"] * (r - theta["length"]) ** 2


DIMER_START = jnp.asarray([[0.0, 0.0], [1.0, 0.5]])
DIMER_THETA = {"length": jnp.asarray(1.7), "k": jnp.asarray(2.0)}
DIMER = System.from_energy(dimer_energy, DIMER_THETA, DIMER_START, dt_max=0.1)


def dimer_analytic(length: float) -> tuple[np.ndarray, np.ndarray]:
    """FIRE keeps the centroid and the bond direction of the dimer."""
    start = np.asarray(DIMER_START)
    centre, u = start.mean(axis=0), (start[1] - start[0]) / np.linalg.norm(start[1] - start[0])
    x = np.stack([centre - 0.5 * length * u, centre + 0.5 * length * u])
    d_length = np.stack([-0.5 * u, 0.5 * u])
    return x, d_length


def dimer_x_star(**options: Any) -> Callable[[jax.Array], jax.Array]:
    unravel = ravel_pytree(DIMER_THETA)[1]
    return lambda flat: mdsens.equilibrium(DIMER, unravel(flat), **options)


def test_dimer_analytic_first_and_second_derivatives() -> None:
    """Translations and the rotation are zero modes; the minimum-norm derivative
    moves the two particles apart along the bond."""
    flat = ravel_pytree(DIMER_THETA)[0]  # (k, length)
    x_analytic, d_length = dimer_analytic(1.7)
    x_star = dimer_x_star()
    np.testing.assert_allclose(x_star(flat), x_analytic, atol=1e-11)
    # x* is linear in the length and independent of k: zero second derivative.
    second, first = jax.jit(jax.jacfwd(lambda t: (lambda J: (J, J))(jax.jacrev(x_star)(t)), has_aux=True))(flat)
    np.testing.assert_allclose(first[..., 1], d_length, atol=1e-10)
    np.testing.assert_allclose(first[..., 0], 0.0, atol=1e-10)
    np.testing.assert_allclose(second, 0.0, atol=1e-9)


def test_unrolled_matches_analytic_on_dimer() -> None:
    jacobian = np.stack([np.zeros((2, 2)), dimer_analytic(1.7)[1]], axis=-1)
    flat = ravel_pytree(DIMER_THETA)[0]
    # 1000 FIRE steps drive force and velocity to exactly zero: reverse mode must
    # stay finite there (the derivative of |v| at v = 0).
    unrolled = dimer_x_star(adjoint=Unrolled(1000))
    np.testing.assert_allclose(jax.jit(jax.jacfwd(unrolled))(flat), jacobian, atol=1e-9)
    np.testing.assert_allclose(jax.jit(jax.jacrev(unrolled))(flat), jacobian, atol=1e-9)
    # Far from converged, the unrolled derivative is not the implicit one.
    short = dimer_x_star(adjoint=Unrolled(5))
    assert float(jnp.max(jnp.abs(jax.jit(jax.jacfwd(short))(flat) - jacobian))) > 1e-3


def test_unrolled_matches_implicit_on_packing(ss2d: Case) -> None:
    # FIRE keeps the centroid of a periodic packing fixed, so the unrolled
    # derivative converges to the minimum-norm one.
    ref = reference(ss2d)
    tangent = random_like(ss2d.flat_theta, 5)
    _, unrolled = jax.jvp(ss2d.x_star(adjoint=Unrolled(3000)), (ss2d.flat_theta,), (tangent,))
    assert rel_err(unrolled.ravel(), ref.J @ tangent) <= 1e-6


def test_finite_difference_method_matches_implicit(ss2d: Case) -> None:
    ref = reference(ss2d)
    tangent = random_like(ss2d.flat_theta, 6)
    x, fd = jax.jvp(ss2d.x_star(adjoint=FiniteDifference(1e-6)), (ss2d.flat_theta,), (tangent,))
    np.testing.assert_allclose(x, ss2d.x, atol=1e-9)
    assert rel_err(fd.ravel(), ref.J @ tangent) <= 1e-5


def test_equilibrium_with_info(ss2d: Case) -> None:
    x, result = mdsens.equilibrium_with_info(ss2d.system)
    np.testing.assert_allclose(x, ss2d.x, atol=1e-9)
    np.testing.assert_array_equal(x, result.positions)
    assert bool(result.converged) and float(result.fmax) <= FMAX and int(result.n_steps) > 0
    x, result = mdsens.equilibrium_with_info(DIMER, adjoint=Unrolled(10))
    assert result is None and x.shape == DIMER_START.shape


# ---------------------------------------------------------------------------
# jit and vmap
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_jit_vmap_match_single_calls(ss2d: Case) -> None:
    """jit(vmap(jvp of x*)) over two starts and two parameter values equals one call each."""
    other_start = systems.soft_sphere_packing(16, dim=2, phi=0.9, seed=5).positions
    starts = jnp.stack([ss2d.start, other_start])
    thetas = jnp.stack([ss2d.flat_theta, ss2d.flat_theta * jnp.asarray([1.0, 1.02, 0.7])])
    tangent = random_like(ss2d.flat_theta, 7)
    x_star = ss2d.x_star()

    def jvp(start, theta):
        return jax.jvp(lambda t: x_star(t, start), (theta,), (tangent,))

    batched_x, batched_dx = jax.jit(jax.vmap(jvp))(starts, thetas)
    assert float(jnp.max(jnp.abs(batched_x[0] - batched_x[1]))) > 0.1  # two different states
    for i in range(2):
        x, dx = jvp(starts[i], thetas[i])
        np.testing.assert_allclose(batched_x[i], x, atol=1e-9)
        np.testing.assert_allclose(batched_dx[i], dx, rtol=1e-8, atol=1e-9 * float(jnp.max(jnp.abs(dx))))
    np.testing.assert_allclose(
        batched_dx[0].ravel(), reference(ss2d).J @ tangent, rtol=0, atol=1e-8 * float(jnp.max(jnp.abs(batched_dx[0])))
    )


# ---------------------------------------------------------------------------
# Failure policy
# ---------------------------------------------------------------------------


# Two particles at distinct points, so that the state is not refused as coincident.
SADDLE_START = jnp.asarray([[0.0, 0.0], [3.0, 3.0]])
SADDLE_THETA = jnp.zeros((2, 2))


def double_well(x: jax.Array, theta: jax.Array) -> jax.Array:
    """Stationary at x = SADDLE_START for theta = 0, where the Hessian is -I: a maximum."""
    y = x - SADDLE_START
    return jnp.sum(0.25 * (y**2 - 1.0) ** 2 - theta * y)


SADDLE = System.from_energy(double_well, SADDLE_THETA, SADDLE_START, dt_max=0.1)
ONES = jnp.ones((2, 2))


def test_saddle_reports_negative_curvature() -> None:
    """The relaxation stays at the maximum it starts from and says so; the
    solve meets the negative curvature."""
    x, _, info = mdsens.equilibrium_jvp(SADDLE, SADDLE_THETA, ONES)
    np.testing.assert_array_equal(x, SADDLE_START)  # the relaxation starts at a stationary point
    assert info.relax.reason == Status.saddle.name and not bool(info.relax.converged)
    assert float(info.relax.lowest_curvature) == pytest.approx(-1.0, rel=1e-9)
    assert bool(info.solve.negative_curvature) and not bool(info.solve.converged)
    assert info.solve.reason == Status.negative_curvature.name


def test_saddle_raises_through_equilibrium() -> None:
    """Inside derivatives of equilibrium a saddle is a failed relaxation: an error,
    or NaN and a warning, naming it. At the state itself (sensitivity_at, no
    relaxation) CG reports the negative curvature and MINRES differentiates
    the saddle on purpose."""
    x_star = lambda t, **kw: mdsens.equilibrium(SADDLE, t, **kw)  # noqa: E731
    with raises_with(Status.saddle.name):
        jax.block_until_ready(jax.jvp(x_star, (SADDLE_THETA,), (ONES,)))
    with pytest.warns(RuntimeWarning, match=Status.saddle.name):
        _, dx = jax.jvp(lambda t: x_star(t, throw=False), (SADDLE_THETA,), (ONES,))
        dx = np.asarray(dx)
    assert np.all(np.isnan(dx))
    _, info = mdsens.sensitivity_at(SADDLE, SADDLE_START, SADDLE_THETA, ONES)
    assert bool(info.negative_curvature) and not bool(info.converged)
    # dx = -H^-1 d_theta(grad) = -(-I)^-1 (-1) = -1.
    dx, info = mdsens.sensitivity_at(SADDLE, SADDLE_START, SADDLE_THETA, ONES, adjoint=Implicit(solver=MINRES()))
    assert bool(info.converged)
    np.testing.assert_allclose(dx, -1.0, atol=1e-12)


def test_linear_solve_out_of_iterations(ss2d: Case) -> None:
    # Raising through equilibrium on an unconverged solve: test_rattler_without_zero_modes_fails_loudly.
    tangent = random_like(ss2d.theta, 8)
    _, _, info = mdsens.equilibrium_jvp(ss2d.system, ss2d.theta, tangent, adjoint=Implicit(solver=CG(max_iter=2)))
    assert bool(info.relax.converged)
    assert not bool(info.solve.converged) and not bool(info.solve.negative_curvature)
    assert int(info.solve.iterations) == 2 and float(info.solve.residual) > 1e-3


def test_unconverged_relaxation(ss2d: Case) -> None:
    with raises_with("did not reach the force tolerance"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mdsens.relax's own warning
        jax.block_until_ready(ss2d.x_star(minimiser=FIRE(max_steps=3))(ss2d.flat_theta))
    with pytest.warns(RuntimeWarning, match="did not reach the force tolerance"):
        x = np.asarray(ss2d.x_star(minimiser=FIRE(max_steps=3), throw=False)(ss2d.flat_theta))
    assert np.all(np.isnan(x))


# ---------------------------------------------------------------------------
# energy_sensitivity and System.hessian_diagonal
# ---------------------------------------------------------------------------


def test_energy_sensitivity_matches_finite_differences(ss2d: Case) -> None:
    sensitivity = jax.jit(lambda x, t: ravel_pytree(mdsens.energy_sensitivity(ss2d.system, x, t))[0])(
        jnp.asarray(ss2d.x), ss2d.theta
    )
    h = 1e-5  # the error is ~ h^2 E'''; E* is stiff in the diameters (7e-7 relative at h = 1e-4)
    energy = jax.jit(ss2d.system.energy)
    relaxed_energy = lambda flat: float(energy(jnp.asarray(ss2d.relax(ss2d.x, ss2d.unravel(flat))), ss2d.unravel(flat)))  # noqa: E731
    expected = []
    for k in range(ss2d.flat_theta.size):
        e = jnp.zeros_like(ss2d.flat_theta).at[k].set(h)
        expected.append((relaxed_energy(ss2d.flat_theta + e) - relaxed_energy(ss2d.flat_theta - e)) / (2 * h))
    assert rel_err(sensitivity, np.asarray(expected)) <= 1e-7


def test_hessian_diagonal(ss2d: Case) -> None:
    diagonal = jax.jit(lambda x, t: ss2d.system.hessian_diagonal(x, t))(jnp.asarray(ss2d.x), ss2d.theta)
    assert diagonal.shape == ss2d.x.shape
    np.testing.assert_allclose(np.asarray(diagonal).ravel(), np.diag(reference(ss2d).H), rtol=1e-12, atol=1e-14)


def test_jacobi_preconditioned_solve(rattler: Case) -> None:
    diagonal = jax.jit(lambda x, t: rattler.system.hessian_diagonal(x, t))(jnp.asarray(rattler.x), rattler.theta)
    assert float(jnp.max(jnp.abs(diagonal[RATTLER]))) == 0.0  # left unscaled by Jacobi
    tangent = random_like(rattler.theta, 9)
    results = {}
    for name, solver in (("plain", CG()), ("jacobi", CG(preconditioner=Jacobi(diagonal)))):
        results[name] = mdsens.equilibrium_jvp(rattler.system, rattler.theta, tangent, adjoint=Implicit(solver=solver))
    (_, plain, plain_info), (_, jacobi, jacobi_info) = results["plain"], results["jacobi"]
    assert bool(plain_info.solve.converged) and bool(jacobi_info.solve.converged)
    assert rel_err(jacobi, plain) <= 1e-9
    assert rel_err(jacobi.ravel(), reference(rattler).J @ ravel_pytree(tangent)[0]) <= RTOL
    assert 0 < int(jacobi_info.solve.iterations) <= int(plain_info.solve.iterations)


# ---------------------------------------------------------------------------
# The system's own time step (the README's diagnostic example, issue 10)
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_jvp_with_diagnostics_is_jvp_of_x_star() -> None:
    """equilibrium_jvp(s, s.params, t) relaxes with the system's dt_max, as
    equilibrium does: the same minimum and the same derivative as jax.jvp of x*.
    (It used to take FIRE's default 0.1 instead of this system's 0.4 unless told,
    reach another minimum and differ by a factor 12.7, without a warning.)"""
    s = systems.soft_sphere_packing(128, dim=2, phi=0.9, diameters=(1.0, 1.4), per_particle_diameters=True)
    tangent = jax.tree_util.tree_map(jnp.zeros_like, s.params)
    tangent["diameters"] = jax.random.normal(jax.random.PRNGKey(12), (s.n,))
    x, dx, info = mdsens.equilibrium_jvp(s, s.params, tangent)
    x_ref, dx_ref = jax.jvp(lambda p: mdsens.equilibrium(s, p), (s.params,), (tangent,))
    assert bool(info.relax.converged) and bool(info.solve.converged)
    np.testing.assert_allclose(x, x_ref, rtol=0, atol=1e-9)
    assert rel_err(dx, dx_ref) <= 1e-9
    relaxed = mdsens.relax(s)
    assert float(info.relax.energy) == float(relaxed.energy)
    assert int(info.relax.n_steps) == int(relaxed.n_steps)
    # The check is live: another time step reaches another minimum here.
    other = mdsens.relax(s, minimiser=FIRE(dt_max=0.1))
    assert bool(other.converged) and abs(float(other.energy) / float(relaxed.energy) - 1.0) > 1e-3


# ---------------------------------------------------------------------------
# Input validation (option values that refuse to be built: tests/test_options.py)
# ---------------------------------------------------------------------------


def call_equilibrium(function: Callable[..., Any] = mdsens.equilibrium, **overrides: Any):
    positions = overrides.pop("positions", DIMER_START)
    params = overrides.pop("params", DIMER_THETA)
    if function is mdsens.equilibrium_jvp:
        return function(DIMER, params, DIMER_THETA, positions=positions, **overrides)
    if function is mdsens.equilibrium_vjp:
        return function(DIMER, params, jnp.ones_like(DIMER_START), positions=positions, **overrides)
    return function(DIMER, params, positions=positions, **overrides)


WITH_DIAGNOSTICS = (mdsens.equilibrium_jvp, mdsens.equilibrium_vjp)
ALL = (mdsens.equilibrium, mdsens.equilibrium_with_info, *WITH_DIAGNOSTICS)

BAD_INPUTS = [
    ({"adjoint": "adjoint"}, "adjoint", ALL),
    ({"adjoint": Implicit}, "adjoint", ALL),  # the class, not a value
    ({"adjoint": Unrolled(10)}, r"adjoint must be one of mdsens.Implicit\(...\)", WITH_DIAGNOSTICS),
    ({"adjoint": FiniteDifference()}, r"adjoint must be one of mdsens.Implicit\(...\)", WITH_DIAGNOSTICS),
    ({"minimiser": "lbfgs"}, "minimiser", ALL),
    ({"minimiser": Implicit()}, "minimiser", ALL),
    ({"throw": "yes"}, "throw", (mdsens.equilibrium, mdsens.equilibrium_with_info)),
    ({"positions": jnp.zeros(4)}, "positions", ALL),
    ({"positions": jnp.zeros((2, 4))}, "positions", ALL),
    ({"positions": jnp.zeros((3, 2))}, "positions", ALL),
    ({"positions": jnp.asarray([[0.0, 0.0], [jnp.nan, 1.0]])}, "positions", ALL),
    ({"params": {"length": jnp.asarray(jnp.nan), "k": jnp.asarray(2.0)}}, "params", ALL),
    ({"params": {"length": jnp.asarray(1.7, jnp.float32), "k": jnp.asarray(2.0)}}, "params", ALL),
    ({"params": {"length": jnp.ones(2), "k": jnp.asarray(2.0)}}, r"params\['length'\]", ALL),
]


@pytest.mark.parametrize(
    ("overrides", "name", "functions"), BAD_INPUTS, ids=[f"{n}-{i}" for i, (_, n, _) in enumerate(BAD_INPUTS)]
)
def test_bad_input_raises(overrides: dict, name: str, functions: tuple) -> None:
    for function in functions:
        with pytest.raises(ValueError, match=name):
            call_equilibrium(function, **overrides)


def test_bad_tangent_and_cotangent_raise() -> None:
    with pytest.raises(ValueError, match=r"cotangent must have the shape of the positions \(2, 2\)"):
        mdsens.equilibrium_vjp(DIMER, DIMER_THETA, jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="cotangent contains NaN"):
        mdsens.equilibrium_vjp(DIMER, DIMER_THETA, jnp.full((2, 2), jnp.nan))
    with pytest.raises(ValueError, match=r"tangent\['length'\] contains NaN or inf"):
        bad = {"length": jnp.asarray(jnp.inf), "k": jnp.asarray(0.0)}
        mdsens.equilibrium_jvp(DIMER, DIMER_THETA, bad)
    with pytest.raises(ValueError, match=r"tangent\['k'\] must have shape \(\)"):
        mdsens.equilibrium_jvp(DIMER, DIMER_THETA, {"length": jnp.asarray(1.0), "k": jnp.ones(2)})
    with pytest.raises(ValueError, match="tangent must have the structure"):
        mdsens.equilibrium_jvp(DIMER, DIMER_THETA, {"length": jnp.asarray(1.0)})
