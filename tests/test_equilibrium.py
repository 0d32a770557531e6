"""Tests of the user API: equilibrium, equilibrium_with_info, equilibrium_jvp,
equilibrium_vjp, energy_sensitivity and hessian_diagonal.

Oracles, none of which uses mdsens' implicit-differentiation code:

- dense linear algebra on autodiff derivatives of the energy at the relaxed
  state: ``dx*/dtheta = -pinv(H) d_theta grad E``, the minimum-norm derivative
  (no component along translations, rotations or rattlers), and the second
  derivative from differentiating ``grad E(x*(theta), theta) = 0`` twice
  (third derivatives of the energy, pinv again);
- analytic cases: a harmonic dimer, a Lennard-Jones cluster's scaling with sigma;
- central finite differences of re-relaxed states;
- autodiff through an unrolled minimiser on a tiny system.

Compilation dominates the run time, so each system is relaxed once and each
transformation is compiled once: first derivatives are returned as the aux
output of the second-derivative computations.
"""

from __future__ import annotations

import dataclasses
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
from mdsens import linear_solve, systems  # noqa: E402
from mdsens import zero_modes as zm  # noqa: E402

FMAX = 1e-12
RTOL = 1e-8  # required agreement of every implicit derivative with the dense reference
RCOND = 1e-8  # pinv cut-off, relative to the largest eigenvalue of H


def rel_err(actual: Any, expected: Any) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.all(np.isfinite(actual))
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def free_shift(x: jax.Array, dx: jax.Array) -> jax.Array:
    return x + dx


def raises_with(match: str):
    """A failure detected inside a compiled computation reaches Python as the
    FloatingPointError itself or wrapped in a JaxRuntimeError."""
    return pytest.raises((FloatingPointError, jax.errors.JaxRuntimeError), match=match)


def random_like(tree: Any, seed: int) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, jnp.shape(v), jnp.float64) for k, v in zip(keys, leaves)]
    )


def pair_gaps(system: systems.System, x: Any, diameters: Any) -> np.ndarray:
    """Centre distance over contact distance for every pair (inf on the diagonal)."""
    x = jnp.asarray(x)
    dr = jax.vmap(lambda a: jax.vmap(lambda b: system.displacement_fn(a, b, box=system.params["box"]))(x))(x)
    d = np.asarray(diameters)
    gaps = np.linalg.norm(np.asarray(dr), axis=-1) / (0.5 * (d[:, None] + d[None, :]))
    np.fill_diagonal(gaps, np.inf)
    return gaps


# ---------------------------------------------------------------------------
# Systems, relaxed once, and their dense references
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
    """An energy ``E(x, theta)`` in the parameters ``theta`` that are
    differentiated, a start, and the state relaxed from it by mdsens.relax."""

    name: str
    energy_fn: Callable[[jax.Array, Any], jax.Array]
    start: jax.Array
    theta: dict[str, jax.Array]
    shift_fn: Callable[..., jax.Array]
    dt_max: float
    n_zero_modes: int
    x: np.ndarray

    @property
    def flat_theta(self) -> jax.Array:
        return ravel_pytree(self.theta)[0]

    def unravel(self, flat: jax.Array) -> dict[str, jax.Array]:
        return ravel_pytree(self.theta)[1](flat)

    def x_star(self, **options: Any) -> Callable[[jax.Array], jax.Array]:
        """``flat theta -> x*`` by mdsens.equilibrium, from the case's start."""

        def x_star(flat, start=None):
            start = self.start if start is None else start
            return mdsens.equilibrium(
                self.energy_fn, start, self.unravel(flat), shift_fn=self.shift_fn, dt_max=self.dt_max, **options
            )

        return x_star

    def relax(self, start: Any, theta: Any, **kwargs: Any) -> np.ndarray:
        result = mdsens.relax(self.energy_fn, start, theta, shift_fn=self.shift_fn, dt_max=self.dt_max, fmax=FMAX, **kwargs)
        assert bool(result.converged) and float(result.fmax) <= FMAX
        return np.asarray(result.positions)


def restricted(system: systems.System, names: tuple[str, ...]):
    """The system's energy as a function of the parameters ``names`` only."""
    fixed = {k: v for k, v in system.params.items() if k not in names}

    def energy_fn(x, theta):
        return system.energy_fn(x, {**fixed, **theta})

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
    start = system.positions if start is None else jnp.asarray(start)
    case = Case(name, energy_fn, start, theta, system.shift_fn, system.dt_max, n_zero_modes, np.zeros(0))
    return dataclasses.replace(case, x=case.relax(start, theta))


RATTLER = 2  # the particle of the seed-1 packing that becomes a rattler


def rattler_case(system: systems.System) -> Case:
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
    gaps = pair_gaps(system, case.x, case.theta["diameters"]).min(axis=1)
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


@dataclasses.dataclass(frozen=True)
class Reference:
    """Dense derivatives of x* at the relaxed state, flattened: J (n, P), X2 (n, P, P)."""

    H: np.ndarray
    J: np.ndarray
    X2: np.ndarray
    eigenvalues: np.ndarray
    null_space: np.ndarray  # (n, k), orthonormal


_REFERENCES: dict[str, Reference] = {}


def dense_reference(case: Case) -> Reference:
    """Implicit function theorem with dense linear algebra. Differentiating
    ``g(x*(theta), theta) = 0`` (``g = grad_x E``) once and twice:

        H J = -g_t,    H X2_ab = -(T[J_a, J_b] + H_tb J_a + H_ta J_b + g_tatb),

    with ``T`` the third derivative of E in x and ``H_t`` the derivative of H in
    theta, solved with pinv(H) (minimum norm)."""
    if case.name in _REFERENCES:
        return _REFERENCES[case.name]
    shape = case.x.shape
    theta_flat, unravel = ravel_pytree(case.theta)

    def energy(x_flat, t_flat):
        return case.energy_fn(x_flat.reshape(shape), unravel(t_flat))

    @jax.jit
    def derivatives(x, t):
        grad_x = jax.grad(energy, 0)
        hessian_x = jax.jacfwd(grad_x, 0)
        return (
            hessian_x(x, t),
            jax.jacfwd(grad_x, 1)(x, t),
            jax.jacfwd(hessian_x, 0)(x, t),
            jax.jacfwd(hessian_x, 1)(x, t),
            jax.jacfwd(jax.jacfwd(grad_x, 1), 1)(x, t),
        )

    H, g_t, T, H_t, g_tt = map(np.asarray, derivatives(jnp.asarray(case.x.ravel()), theta_flat))
    H = 0.5 * (H + H.T)
    eigenvalues, vectors = np.linalg.eigh(H)
    pinv = np.linalg.pinv(H, rcond=RCOND, hermitian=True)
    J = -pinv @ g_t
    terms = (
        np.einsum("ijk,ja,kb->iab", T, J, J),
        np.einsum("ijb,ja->iab", H_t, J),
        np.einsum("ija,jb->iab", H_t, J),
        g_tt,
    )
    rhs = sum(terms)
    null_space = vectors[:, np.abs(eigenvalues) <= RCOND * np.max(np.abs(eigenvalues))]
    # The second-order system is consistent (for a cluster, because J is the
    # minimum-norm derivative): rhs has no component along the zero modes.
    scale = sum(np.linalg.norm(term) for term in terms)
    assert np.linalg.norm(np.einsum("ik,iab->kab", null_space, rhs)) <= 1e-9 * scale
    X2 = -np.einsum("ij,jab->iab", pinv, rhs)
    _REFERENCES[case.name] = Reference(H, J, X2, eigenvalues, null_space)
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
    ref = dense_reference(case)
    scale = np.max(np.abs(ref.eigenvalues))
    assert ref.null_space.shape[1] == case.n_zero_modes
    assert np.sort(np.abs(ref.eigenvalues))[case.n_zero_modes] > 1e-4 * scale
    hvp = lambda v: jax.jvp(lambda x: jax.grad(case.energy_fn)(x, case.theta), (case.x,), (v,))[1]  # noqa: E731
    modes = jax.jit(lambda x: zm.detect(hvp, x))(jnp.asarray(case.x))
    assert int(modes.n_modes) == case.n_zero_modes
    projector = np.asarray(jax.vmap(modes.project)(jnp.eye(case.x.size))).T
    expected = np.eye(case.x.size) - ref.null_space @ ref.null_space.T
    np.testing.assert_allclose(projector, expected, atol=1e-9)
    if case.name == "rattler2d":
        np.testing.assert_array_equal(np.asarray(modes.mask)[:, 0], np.arange(case.x.shape[0]) != RATTLER)


def test_lj_pairs_energy_is_the_cluster_energy(lj13: Case, lj_cluster: systems.System) -> None:
    energy_fn = lj_pairs_energy(lj_cluster.n)
    theta = {"sigma": jnp.ones(lj_cluster.n), "epsilon": jnp.asarray(1.0)}
    ours = jax.jit(jax.value_and_grad(energy_fn))
    theirs = jax.jit(jax.value_and_grad(lj_cluster.energy_fn))
    for positions in (lj_cluster.positions, jnp.asarray(lj13.x)):
        (e, g), (expected_e, expected_g) = ours(positions, theta), theirs(positions, lj_cluster.params)
        assert float(e) == pytest.approx(float(expected_e), rel=1e-12)
        np.testing.assert_allclose(g, expected_g, rtol=0, atol=1e-10 * float(jnp.max(jnp.abs(expected_g))) + 1e-12)


# ---------------------------------------------------------------------------
# First derivatives
# ---------------------------------------------------------------------------


def test_equilibrium_jvp(packing2d: Case) -> None:
    case = packing2d
    ref = dense_reference(case)
    tangent = random_like(case.theta, 1)
    x, dx, info = mdsens.equilibrium_jvp(
        case.energy_fn, case.start, case.theta, tangent, shift_fn=case.shift_fn, dt_max=case.dt_max
    )
    np.testing.assert_allclose(x, case.x, rtol=0, atol=1e-9)
    assert rel_err(dx.ravel(), ref.J @ ravel_pytree(tangent)[0]) <= RTOL
    if case.name == "rattler2d":  # the rattler does not move (minimum norm)
        np.testing.assert_array_equal(dx[RATTLER], 0.0)
    assert isinstance(info, mdsens.EquilibriumInfo)
    assert bool(info.relax.converged) and float(info.relax.fmax) <= FMAX
    assert bool(info.solve.converged) and not bool(info.solve.negative_curvature)
    assert int(info.solve.iterations) > 0 and float(info.solve.residual) <= 1e-10


def test_equilibrium_vjp_nonzero_mean_cotangent(case: Case) -> None:
    ref = dense_reference(case)
    # Mean 1 per coordinate: a large component along the translations.
    cotangent = jax.random.normal(jax.random.PRNGKey(2), case.x.shape) + 1.0
    x, theta_bar, info = mdsens.equilibrium_vjp(
        case.energy_fn, case.start, case.theta, cotangent, shift_fn=case.shift_fn, dt_max=case.dt_max
    )
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
    _, theta_bar, info = mdsens.equilibrium_vjp(
        ss2d.energy_fn, ss2d.start, ss2d.theta, cotangent, shift_fn=ss2d.shift_fn, dt_max=ss2d.dt_max
    )
    assert bool(info.solve.converged) and not bool(info.solve.negative_curvature)
    assert int(info.solve.iterations) == 0
    assert float(jnp.max(jnp.abs(ravel_pytree(theta_bar)[0]))) == 0.0


def test_jacrev_rattler(rattler: Case) -> None:
    """Every row of jacrev is a cotangent e_i, including e_i on the rattler."""
    ref = dense_reference(rattler)
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
    x_star = rattler.x_star(zero_modes=None)
    _, vjp = jax.vjp(x_star, rattler.flat_theta)
    with raises_with("did not converge"):
        jax.block_until_ready(vjp(rattler_cotangent(rattler)))
    # The same cotangent off the rattler is fine without zero modes: the failure
    # is the rattler's, not the translations'.
    off_rattler = rattler_cotangent(rattler).at[RATTLER].set(0.0).at[RATTLER + 1].add(jnp.asarray([1.0, -0.5]))
    (theta_bar,) = vjp(off_rattler)
    assert rel_err(theta_bar, np.asarray(off_rattler).ravel() @ dense_reference(rattler).J) <= 1e-6


def test_rattler_without_zero_modes_nan_when_not_throwing(rattler: Case) -> None:
    _, vjp = jax.vjp(rattler.x_star(zero_modes=None, throw=False), rattler.flat_theta)
    with pytest.warns(RuntimeWarning, match="did not converge"):
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


def test_jacfwd(case2: Case) -> None:
    _, first = forward_over_forward(case2)
    assert rel_err(first, dense_reference(case2).J) <= RTOL


def test_jacfwd_jacfwd(case2: Case) -> None:
    second, _ = forward_over_forward(case2)
    assert rel_err(second, dense_reference(case2).X2) <= RTOL


def test_jacrev(case2: Case) -> None:
    # Every row is a cotangent e_i (or a random functional): nonzero mean.
    _, first, C = reverse_over_reverse(case2)
    assert rel_err(first, C @ dense_reference(case2).J) <= RTOL


def test_jacrev_jacrev(case2: Case) -> None:
    second, _, C = reverse_over_reverse(case2)
    assert rel_err(second, np.einsum("ki,iab->kab", C, dense_reference(case2).X2)) <= RTOL


def test_hessian_of_scalar_objective(case2: Case) -> None:
    ref = dense_reference(case2)
    weights = np.asarray(jax.random.normal(jax.random.PRNGKey(3), case2.x.shape))
    x_star = case2.x_star()
    hessian = jax.hessian(lambda t: scalar_objective(x_star(t), weights))(case2.flat_theta)
    x = case2.x.ravel()
    expected = ref.J.T @ (-np.sin(x)[:, None] * ref.J) + np.einsum("i,iab->ab", weights.ravel() + np.cos(x), ref.X2)
    assert rel_err(hessian, expected) <= RTOL


def test_lj_cluster_scales_with_sigma(lj_cluster: systems.System) -> None:
    """systems.lennard_jones_cluster: x*(sigma) = sigma x*(1) about the fixed
    centroid, so dx*/dsigma = x* - centroid (minimum norm: a dilation has no
    translation or rotation component) and dx*/depsilon = 0."""
    result = mdsens.relax(lj_cluster.energy_fn, lj_cluster.positions, lj_cluster.params, shift_fn=lj_cluster.shift_fn, dt_max=lj_cluster.dt_max)
    centred = np.asarray(result.positions - jnp.mean(result.positions, axis=0))
    tangent = {"sigma": jnp.ones((1, 1)), "epsilon": jnp.full((1, 1), 0.3)}
    x, dx, info = mdsens.equilibrium_jvp(
        lj_cluster.energy_fn, lj_cluster.positions, lj_cluster.params, tangent,
        shift_fn=lj_cluster.shift_fn, dt_max=lj_cluster.dt_max,
    )
    assert bool(info.solve.converged)
    assert rel_err(dx, centred) <= 1e-9


def test_lj_cluster_reverse_mode_in_params(lj_cluster: systems.System) -> None:
    """Reverse mode in sigma and epsilon (the all-pairs sum also visits i == j at
    r = 0, which must not leak NaN), against scaling: a free LJ cluster's relaxed
    energy is epsilon times a number, independent of sigma."""
    params = lj_cluster.params
    r = mdsens.relax(lj_cluster.energy_fn, lj_cluster.positions, params, shift_fn=lj_cluster.shift_fn, dt_max=lj_cluster.dt_max)
    sensitivity = mdsens.energy_sensitivity(lj_cluster.energy_fn, r.positions, params)
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


def dimer_analytic(length: float) -> tuple[np.ndarray, np.ndarray]:
    """FIRE keeps the centroid and the bond direction of the dimer."""
    start = np.asarray(DIMER_START)
    centre, u = start.mean(axis=0), (start[1] - start[0]) / np.linalg.norm(start[1] - start[0])
    x = np.stack([centre - 0.5 * length * u, centre + 0.5 * length * u])
    d_length = np.stack([-0.5 * u, 0.5 * u])
    return x, d_length


def dimer_x_star(**options: Any) -> Callable[[jax.Array], jax.Array]:
    unravel = ravel_pytree(DIMER_THETA)[1]
    return lambda flat: mdsens.equilibrium(dimer_energy, DIMER_START, unravel(flat), shift_fn=free_shift, dt_max=0.1, **options)


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
    unrolled = dimer_x_star(method="unrolled", unroll_steps=1000)
    np.testing.assert_allclose(jax.jit(jax.jacfwd(unrolled))(flat), jacobian, atol=1e-9)
    np.testing.assert_allclose(jax.jit(jax.jacrev(unrolled))(flat), jacobian, atol=1e-9)
    # Far from converged, the unrolled derivative is not the implicit one.
    short = dimer_x_star(method="unrolled", unroll_steps=5)
    assert float(jnp.max(jnp.abs(jax.jit(jax.jacfwd(short))(flat) - jacobian))) > 1e-3


def test_unrolled_matches_implicit_on_packing(ss2d: Case) -> None:
    # FIRE keeps the centroid of a periodic packing fixed, so the unrolled
    # derivative converges to the minimum-norm one.
    ref = dense_reference(ss2d)
    tangent = random_like(ss2d.flat_theta, 5)
    _, unrolled = jax.jvp(ss2d.x_star(method="unrolled", unroll_steps=3000), (ss2d.flat_theta,), (tangent,))
    assert rel_err(unrolled.ravel(), ref.J @ tangent) <= 1e-6


def test_finite_difference_method_matches_implicit(ss2d: Case) -> None:
    ref = dense_reference(ss2d)
    tangent = random_like(ss2d.flat_theta, 6)
    x, fd = jax.jvp(ss2d.x_star(method="finite_difference"), (ss2d.flat_theta,), (tangent,))
    np.testing.assert_allclose(x, ss2d.x, atol=1e-9)
    assert rel_err(fd.ravel(), ref.J @ tangent) <= 1e-5


def test_equilibrium_with_info(ss2d: Case) -> None:
    x, result = mdsens.equilibrium_with_info(ss2d.energy_fn, ss2d.start, ss2d.theta, shift_fn=ss2d.shift_fn, dt_max=ss2d.dt_max)
    np.testing.assert_allclose(x, ss2d.x, atol=1e-9)
    np.testing.assert_array_equal(x, result.positions)
    assert bool(result.converged) and float(result.fmax) <= FMAX and int(result.n_steps) > 0
    x, result = mdsens.equilibrium_with_info(dimer_energy, DIMER_START, DIMER_THETA, shift_fn=free_shift, method="unrolled", unroll_steps=10)
    assert result is None and x.shape == DIMER_START.shape


# ---------------------------------------------------------------------------
# jit and vmap
# ---------------------------------------------------------------------------


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
    np.testing.assert_allclose(batched_dx[0].ravel(), dense_reference(ss2d).J @ tangent, rtol=0, atol=1e-8 * float(jnp.max(jnp.abs(batched_dx[0]))))


# ---------------------------------------------------------------------------
# Failure policy
# ---------------------------------------------------------------------------


def double_well(x: jax.Array, theta: jax.Array) -> jax.Array:
    """Stationary at x = 0 for theta = 0, where the Hessian is -I: a maximum."""
    return jnp.sum(0.25 * (x**2 - 1.0) ** 2 - theta * x)


SADDLE_START = jnp.zeros((2, 2))
SADDLE_THETA = jnp.zeros((2, 2))


def test_saddle_reports_negative_curvature() -> None:
    tangent = jnp.ones((2, 2))
    x, dx, info = mdsens.equilibrium_jvp(double_well, SADDLE_START, SADDLE_THETA, tangent, shift_fn=free_shift)
    np.testing.assert_array_equal(x, 0.0)  # the relaxation starts at a stationary point
    assert bool(info.relax.converged)
    assert bool(info.solve.negative_curvature) and not bool(info.solve.converged)


def test_saddle_raises_through_equilibrium() -> None:
    x_star = lambda t, **kw: mdsens.equilibrium(double_well, SADDLE_START, t, shift_fn=free_shift, **kw)  # noqa: E731
    with raises_with("negative curvature"):
        jax.block_until_ready(jax.jvp(x_star, (SADDLE_THETA,), (jnp.ones((2, 2)),)))
    with pytest.warns(RuntimeWarning, match="negative curvature"):
        _, dx = jax.jvp(lambda t: x_star(t, throw=False), (SADDLE_THETA,), (jnp.ones((2, 2)),))
        dx = np.asarray(dx)
    assert np.all(np.isnan(dx))
    # minres differentiates the saddle on purpose: dx = -H^-1 d_theta(grad) = -(-I)^-1 (-1) = -1.
    _, dx = jax.jvp(lambda t: x_star(t, solver="minres"), (SADDLE_THETA,), (jnp.ones((2, 2)),))
    np.testing.assert_allclose(dx, -1.0, atol=1e-12)


def test_linear_solve_out_of_iterations(ss2d: Case) -> None:
    # Raising through equilibrium on an unconverged solve: test_rattler_without_zero_modes_fails_loudly.
    tangent = random_like(ss2d.theta, 8)
    _, _, info = mdsens.equilibrium_jvp(
        ss2d.energy_fn, ss2d.start, ss2d.theta, tangent, shift_fn=ss2d.shift_fn, dt_max=ss2d.dt_max,
        solver=linear_solve.cg(max_iter=2),
    )
    assert bool(info.relax.converged)
    assert not bool(info.solve.converged) and not bool(info.solve.negative_curvature)
    assert int(info.solve.iterations) == 2 and float(info.solve.residual) > 1e-3


def test_unconverged_relaxation(ss2d: Case) -> None:
    with raises_with("did not reach the force tolerance"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mdsens.relax's own warning
        jax.block_until_ready(ss2d.x_star(max_steps=3)(ss2d.flat_theta))
    with pytest.warns(RuntimeWarning, match="did not reach the force tolerance"):
        x = np.asarray(ss2d.x_star(max_steps=3, throw=False)(ss2d.flat_theta))
    assert np.all(np.isnan(x))


# ---------------------------------------------------------------------------
# energy_sensitivity and hessian_diagonal
# ---------------------------------------------------------------------------


def test_energy_sensitivity_matches_finite_differences(ss2d: Case) -> None:
    sensitivity = jax.jit(lambda x, t: ravel_pytree(mdsens.energy_sensitivity(ss2d.energy_fn, x, t))[0])(
        jnp.asarray(ss2d.x), ss2d.theta
    )
    h = 1e-5  # the error is ~ h^2 E'''; E* is stiff in the diameters (7e-7 relative at h = 1e-4)
    energy = jax.jit(ss2d.energy_fn)
    relaxed_energy = lambda flat: float(energy(jnp.asarray(ss2d.relax(ss2d.x, ss2d.unravel(flat))), ss2d.unravel(flat)))  # noqa: E731
    expected = []
    for k in range(ss2d.flat_theta.size):
        e = jnp.zeros_like(ss2d.flat_theta).at[k].set(h)
        expected.append((relaxed_energy(ss2d.flat_theta + e) - relaxed_energy(ss2d.flat_theta - e)) / (2 * h))
    assert rel_err(sensitivity, np.asarray(expected)) <= 1e-7


def test_hessian_diagonal(ss2d: Case) -> None:
    diagonal = jax.jit(lambda x, t: mdsens.hessian_diagonal(ss2d.energy_fn, x, t, batch_size=8))(jnp.asarray(ss2d.x), ss2d.theta)
    assert diagonal.shape == ss2d.x.shape
    np.testing.assert_allclose(np.asarray(diagonal).ravel(), np.diag(dense_reference(ss2d).H), rtol=1e-12, atol=1e-14)


def test_jacobi_preconditioned_solve(rattler: Case) -> None:
    diagonal = jax.jit(lambda x, t: mdsens.hessian_diagonal(rattler.energy_fn, x, t))(jnp.asarray(rattler.x), rattler.theta)
    assert float(jnp.max(jnp.abs(diagonal[RATTLER]))) == 0.0  # left unscaled by jacobi
    tangent = random_like(rattler.theta, 9)
    results = {}
    for name, solver in (("plain", "cg"), ("jacobi", linear_solve.cg(preconditioner=linear_solve.jacobi(diagonal)))):
        results[name] = mdsens.equilibrium_jvp(
            rattler.energy_fn, rattler.start, rattler.theta, tangent, shift_fn=rattler.shift_fn, dt_max=rattler.dt_max, solver=solver
        )
    (_, plain, plain_info), (_, jacobi, jacobi_info) = results["plain"], results["jacobi"]
    assert bool(plain_info.solve.converged) and bool(jacobi_info.solve.converged)
    assert rel_err(jacobi, plain) <= 1e-9
    assert rel_err(jacobi.ravel(), dense_reference(rattler).J @ ravel_pytree(tangent)[0]) <= RTOL
    assert 0 < int(jacobi_info.solve.iterations) <= int(plain_info.solve.iterations)


# ---------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------


def call_equilibrium(**overrides: Any):
    kwargs = {"shift_fn": free_shift, **overrides}
    positions = kwargs.pop("positions", DIMER_START)
    params = kwargs.pop("params", DIMER_THETA)
    return mdsens.equilibrium(dimer_energy, positions, params, **kwargs)


BAD_OPTIONS = [
    ({"method": "adjoint"}, "method"),
    ({"solver": "gmres"}, "solver"),
    ({"solver": 3}, "solver"),
    ({"relax_method": "lbfgs"}, "relax_method"),
    ({"fmax": 0.0}, "fmax"),
    ({"fmax": -1e-12}, "fmax"),
    ({"fmax": float("nan")}, "fmax"),
    ({"max_steps": 0}, "max_steps"),
    ({"max_steps": 2.5}, "max_steps"),
    ({"zero_modes": "rigid"}, "zero_modes"),
    ({"positions": jnp.zeros(4)}, "positions"),
    ({"positions": jnp.zeros((2, 4))}, "positions"),
    ({"positions": jnp.asarray([[0.0, 0.0], [jnp.nan, 1.0]])}, "positions"),
    ({"params": {"length": jnp.asarray(jnp.nan), "k": jnp.asarray(2.0)}}, "params"),
    ({"params": {"length": jnp.asarray(1.7, jnp.float32), "k": jnp.asarray(2.0)}}, "params"),
    ({"method": "finite_difference", "fd_step": 0.0}, "fd_step"),
    ({"method": "unrolled", "unroll_steps": 0}, "unroll_steps"),
]


@pytest.mark.parametrize(("overrides", "name"), BAD_OPTIONS, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD_OPTIONS)])
def test_bad_input_raises(overrides: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        call_equilibrium(**overrides)
    if "method" not in overrides and "fd_step" not in overrides:
        kwargs = {"shift_fn": free_shift, **overrides}
        positions, params = kwargs.pop("positions", DIMER_START), kwargs.pop("params", DIMER_THETA)
        kwargs.pop("unroll_steps", None)
        with pytest.raises(ValueError, match=name):
            mdsens.equilibrium_with_info(dimer_energy, positions, params, **kwargs)
        kwargs.pop("throw", None)
        with pytest.raises(ValueError, match=name):
            mdsens.equilibrium_jvp(dimer_energy, positions, params, params, **kwargs)
        with pytest.raises(ValueError, match=name):
            mdsens.equilibrium_vjp(dimer_energy, positions, params, jnp.ones_like(DIMER_START), **kwargs)


def test_bad_tangent_and_cotangent_raise() -> None:
    with pytest.raises(ValueError, match="cotangent"):
        mdsens.equilibrium_vjp(dimer_energy, DIMER_START, DIMER_THETA, jnp.ones((3, 2)), shift_fn=free_shift)
    with pytest.raises(ValueError, match="cotangent"):
        mdsens.equilibrium_vjp(dimer_energy, DIMER_START, DIMER_THETA, jnp.full((2, 2), jnp.nan), shift_fn=free_shift)
    with pytest.raises(ValueError, match="params_tangent"):
        bad = {"length": jnp.asarray(jnp.inf), "k": jnp.asarray(0.0)}
        mdsens.equilibrium_jvp(dimer_energy, DIMER_START, DIMER_THETA, bad, shift_fn=free_shift)
