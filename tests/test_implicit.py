"""Tests of the implicit-differentiation core on problems with known answers:
root_jvp, root_vjp, custom_root, custom_fixed_point, the linear solvers (CG,
MINRES, BiCGSTAB, Dense, Jacobi) and the zero modes (detect, ZeroModes.project).

Oracles: closed-form solutions differentiated by ordinary autodiff
(``jnp.linalg.solve``), numpy's solve and pseudo-inverse of small matrices,
the dense reference of :mod:`mdsens.testing`, and the null space of the dense
Hessian from ``numpy.linalg.eigh``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mdsens import (  # noqa: E402
    CG,
    MINRES,
    BiCGSTAB,
    Dense,
    Jacobi,
    SolveInfo,
    custom_fixed_point,
    custom_root,
    root_jvp,
    root_vjp,
)
from mdsens import zero_modes as zm  # noqa: E402
from mdsens.testing import dense_reference  # noqa: E402

N = 12


def rel_err(actual: Any, expected: Any) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.all(np.isfinite(actual))
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def raises_with(match: str):
    """A failure detected inside a compiled computation reaches Python as the
    FloatingPointError itself or wrapped in a JaxRuntimeError."""
    return pytest.raises((FloatingPointError, jax.errors.JaxRuntimeError), match=match)


def random_matrix(seed: int, n: int = N) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, n))


def spd(seed: int, n: int = N, condition: float = 50.0) -> np.ndarray:
    q, _ = np.linalg.qr(random_matrix(seed, n))
    return q @ np.diag(np.geomspace(1.0, condition, n)) @ q.T


def true_residual(A: np.ndarray, x: Any, b: np.ndarray) -> float:
    return float(np.linalg.norm(b - A @ np.asarray(x)) / np.linalg.norm(b))


def matvec_of(A: np.ndarray):
    A = jnp.asarray(A)
    return lambda v: A @ v


def run(solver, A: np.ndarray, b: Any, project=None):
    """``solver(A @ ., b, project)``, compiled."""
    args = () if project is None else (project,)
    return jax.jit(lambda b: solver(matvec_of(A), b, *args))(jnp.asarray(b))


SOLVERS = {"cg": CG, "minres": MINRES, "bicgstab": BiCGSTAB, "dense": Dense}


# ---------------------------------------------------------------------------
# Linear solvers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SOLVERS))
def test_solver_spd(name: str) -> None:
    A, b = spd(0), np.random.default_rng(1).standard_normal(N)
    x, info = run(SOLVERS[name](), A, b)
    assert isinstance(info, SolveInfo)
    assert rel_err(x, np.linalg.solve(A, b)) <= 1e-8
    # The reported residual is the true one.
    assert float(info.residual) == pytest.approx(true_residual(A, x, b), rel=1e-3, abs=1e-15)
    assert bool(info.converged) and not bool(info.negative_curvature)
    assert float(info.residual) <= 1e-8
    assert int(info.iterations) == 0 if name == "dense" else int(info.iterations) > 0


@pytest.mark.parametrize("name", ["cg", "minres", "bicgstab"])
def test_solver_max_iter_too_small(name: str) -> None:
    A, b = spd(0), np.random.default_rng(1).standard_normal(N)
    x, info = run(SOLVERS[name](max_iter=2), A, b)
    assert not bool(info.converged)
    assert int(info.iterations) == 2
    assert float(info.residual) == pytest.approx(true_residual(A, x, b), rel=1e-6)
    assert float(info.residual) > 1e-3


def test_solver_loose_rtol_stops_early() -> None:
    A, b = spd(0, condition=1e3), np.random.default_rng(1).standard_normal(N)
    _, tight = run(CG(), A, b)
    x_loose, loose = run(CG(rtol=1e-3), A, b)
    assert bool(loose.converged) and float(loose.residual) <= 1e-3
    assert int(loose.iterations) < int(tight.iterations)
    assert true_residual(A, x_loose, b) > float(tight.residual)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_solver_zero_rhs(name: str) -> None:
    x, info = run(SOLVERS[name](), spd(0), jnp.zeros(N))
    np.testing.assert_array_equal(x, 0.0)
    assert bool(info.converged) and int(info.iterations) == 0 and float(info.residual) == 0.0


def test_minres_symmetric_indefinite() -> None:
    q, _ = np.linalg.qr(random_matrix(2))
    A = q @ np.diag(np.concatenate([-np.geomspace(1, 10, 4), np.geomspace(1, 30, N - 4)])) @ q.T
    b = np.random.default_rng(3).standard_normal(N)
    x, info = run(MINRES(), A, b)
    assert bool(info.converged) and rel_err(x, np.linalg.solve(A, b)) <= 1e-8
    # CG breaks down on it: with b along a negative eigenvector, the first step
    # already has negative curvature.
    _, info = run(CG(), A, q[:, 0])
    assert bool(info.negative_curvature) and not bool(info.converged)


def test_bicgstab_nonsymmetric() -> None:
    A = np.eye(N) * 4.0 + random_matrix(4) * 0.5
    assert np.abs(A - A.T).max() > 0.5
    b = np.random.default_rng(5).standard_normal(N)
    x, info = run(BiCGSTAB(), A, b)
    assert bool(info.converged) and rel_err(x, np.linalg.solve(A, b)) <= 1e-8


def singular_psd(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A PSD matrix with a 2-dimensional null space, and its orthonormal null basis."""
    q, _ = np.linalg.qr(random_matrix(seed))
    eigenvalues = np.concatenate([[0.0, 0.0], np.geomspace(1.0, 20.0, N - 2)])
    return q @ np.diag(eigenvalues) @ q.T, q[:, :2]


@pytest.mark.parametrize("name", list(SOLVERS))
def test_projected_solve_is_minimum_norm(name: str) -> None:
    A, null = singular_psd(6)
    project = lambda v: v - null @ (null.T @ v)  # noqa: E731
    # b has a component along the null space: without the projection the system is inconsistent.
    b = np.random.default_rng(7).standard_normal(N) + 3.0 * null[:, 0]
    x, info = run(SOLVERS[name](), A, b, project)
    assert bool(info.converged)
    assert rel_err(x, np.linalg.pinv(A, rcond=1e-10) @ b) <= 1e-8


@pytest.mark.parametrize("name", list(SOLVERS))
def test_projected_rhs_along_zero_modes_only(name: str) -> None:
    """A right-hand side entirely along the zero modes has a zero solution
    (e.g. a cotangent that is a rigid translation). The projection leaves
    rounding noise along the zero modes, which must not be reported as a
    failure (CG used to flag zero curvature as negative curvature)."""
    A, null = singular_psd(6)
    project = lambda v: v - null @ (null.T @ v)  # noqa: E731
    b = jnp.asarray(10.0 * null[:, 0] - 7.0 * null[:, 1])
    x, info = run(SOLVERS[name](), A, b, project)
    assert bool(info.converged) and not bool(info.negative_curvature)
    np.testing.assert_allclose(x, 0.0, atol=1e-14)


def test_jacobi_preconditioner() -> None:
    """Badly scaled SPD matrix: Jacobi gives the same solution in fewer iterations."""
    rng = np.random.default_rng(8)
    scale = np.geomspace(1.0, 1e4, N)
    A = np.sqrt(scale)[:, None] * spd(9, condition=5.0) * np.sqrt(scale)[None, :]
    b = rng.standard_normal(N)
    x_plain, plain = run(CG(), A, b)
    preconditioner = Jacobi(jnp.asarray(np.diag(A)))
    x_jacobi, jacobi = run(CG(preconditioner=preconditioner), A, b)
    assert bool(plain.converged) and bool(jacobi.converged)
    assert rel_err(x_jacobi, np.linalg.solve(A, b)) <= 1e-8
    assert rel_err(x_plain, np.linalg.solve(A, b)) <= 1e-6
    assert int(jacobi.iterations) < int(plain.iterations)
    # The diagonal may come shaped like positions (N, dim), as hessian_diagonal returns it.
    shaped = Jacobi(jnp.asarray(np.diag(A)).reshape(N // 2, 2))
    x_shaped, info = run(CG(preconditioner=shaped), A, b)
    assert bool(info.converged) and int(info.iterations) == int(jacobi.iterations)
    np.testing.assert_allclose(x_shaped, x_jacobi, rtol=1e-12)
    # Non-positive entries (rattlers) are left unscaled.
    r = jnp.arange(1.0, 5.0)
    np.testing.assert_array_equal(Jacobi(jnp.asarray([2.0, 0.0, -1.0, 4.0]))(r), [0.5, 2.0, 3.0, 1.0])


@pytest.mark.parametrize("name", ["cg", "minres", "dense"])
def test_preconditioned_solvers_under_vmap(name: str) -> None:
    A = spd(10, condition=1e3)
    B = np.random.default_rng(11).standard_normal((3, N))
    solve = SOLVERS[name]() if name == "dense" else SOLVERS[name](preconditioner=Jacobi(jnp.asarray(np.diag(A))))
    xs, infos = jax.jit(jax.vmap(lambda b: solve(matvec_of(A), b)))(jnp.asarray(B))
    assert infos.converged.shape == (3,) and bool(jnp.all(infos.converged))
    for i in range(3):
        assert rel_err(xs[i], np.linalg.solve(A, B[i])) <= 1e-8
        x, info = run(solve, A, B[i])
        np.testing.assert_allclose(xs[i], x, rtol=1e-10)
        # Batched reductions round differently: the stopping test may flip one iteration.
        assert abs(int(infos.iterations[i]) - int(info.iterations)) <= 1


# ---------------------------------------------------------------------------
# root_jvp, root_vjp and custom_root on a quadratic energy
# ---------------------------------------------------------------------------
#
# E(x, theta) = 1/2 x^T A(theta) x - b(theta)^T x with A(theta) = A0 + theta_0 A1
# (SPD) and b(theta) = B theta, so x*(theta) = A(theta)^-1 b(theta). x has the
# shape of positions, (N/2, 2).

A0 = spd(12, condition=20.0)
A1 = 0.2 * spd(13, condition=3.0)
B = np.random.default_rng(14).standard_normal((N, 3))
THETA = jnp.asarray([0.7, -0.3, 1.1])


def quadratic_energy(x: jax.Array, theta: jax.Array) -> jax.Array:
    A = jnp.asarray(A0) + theta[0] * jnp.asarray(A1)
    x = x.ravel()
    return 0.5 * x @ A @ x - (jnp.asarray(B) @ theta) @ x


def quadratic_solution(theta: jax.Array) -> jax.Array:
    """The closed form, differentiated by ordinary autodiff: the oracle."""
    A = jnp.asarray(A0) + theta[0] * jnp.asarray(A1)
    return jnp.linalg.solve(A, jnp.asarray(B) @ theta).reshape(N // 2, 2)


def descent_solver(init: jax.Array, theta: jax.Array) -> jax.Array:
    """Gradient descent in a while_loop: reverse mode cannot go through it."""
    step = 1.0 / 30.0

    def keep_going(state):
        x, k = state
        return (jnp.max(jnp.abs(jax.grad(quadratic_energy)(x, theta))) > 1e-13) & (k < 100_000)

    def body(state):
        x, k = state
        return x - step * jax.grad(quadratic_energy)(x, theta), k + 1

    return jax.lax.while_loop(keep_going, body, (init, 0))[0]


optimality = jax.grad(quadratic_energy)
INIT = jnp.zeros((N // 2, 2))


@pytest.mark.parametrize("linearize", [False, True])
@pytest.mark.parametrize("name", ["cg", "minres", "bicgstab", "dense"])
def test_root_jvp_and_vjp_quadratic(name: str, linearize: bool) -> None:
    x_star = quadratic_solution(THETA)
    jacobian = jax.jacfwd(quadratic_solution)(THETA)  # (N/2, 2, 3)
    tangent = jnp.asarray([0.3, -1.0, 0.5])
    solve = SOLVERS[name]()
    root_jvp_ = functools.partial(root_jvp, linearize=linearize)
    root_vjp_ = functools.partial(root_vjp, linearize=linearize)
    dx, info = jax.jit(lambda x, t, v: root_jvp_(optimality, x, t, v, solve=solve))(x_star, THETA, tangent)
    assert dx.shape == x_star.shape
    assert rel_err(dx, jnp.tensordot(jacobian, tangent, 1)) <= 1e-8
    assert bool(info.converged)
    cotangent = jax.random.normal(jax.random.PRNGKey(0), x_star.shape)
    theta_bar, info = jax.jit(lambda x, t, g: root_vjp_(optimality, x, t, g, solve=solve))(x_star, THETA, cotangent)
    assert rel_err(theta_bar, jnp.tensordot(cotangent, jacobian, 2)) <= 1e-8
    assert bool(info.converged)


@pytest.mark.parametrize("linearize", [False, True])
def test_root_jvp_differentiated_again(linearize: bool) -> None:
    """d/dtheta of the tangent dx*[v] (A depends on theta) against the closed form's."""
    tangent = jnp.asarray([0.3, -1.0, 0.5])

    def implicit(theta):
        return root_jvp(optimality, quadratic_solution(theta), theta, tangent, linearize=linearize)[0]

    expected = jax.jacfwd(lambda t: jax.jvp(quadratic_solution, (t,), (tangent,))[1])(THETA)
    assert rel_err(jax.jit(jax.jacfwd(implicit))(THETA), expected) <= 1e-8
    assert rel_err(jax.jit(jax.jacrev(implicit))(THETA), expected) <= 1e-8


def test_root_jvp_pytree_params() -> None:
    """Parameters as a dict, tangent with the same structure."""

    def energy(x, p):
        return quadratic_energy(x, jnp.stack([p["a"], p["b"][0], p["b"][1]]))

    params = {"a": THETA[0], "b": THETA[1:]}
    tangent = {"a": jnp.asarray(0.3), "b": jnp.asarray([-1.0, 0.5])}
    x_star = quadratic_solution(THETA)
    dx, _ = jax.jit(lambda p, v: root_jvp(jax.grad(energy), x_star, p, v))(params, tangent)
    expected = jax.jvp(quadratic_solution, (THETA,), (jnp.asarray([0.3, -1.0, 0.5]),))[1]
    assert rel_err(dx, expected) <= 1e-8
    cotangent = jax.random.normal(jax.random.PRNGKey(0), x_star.shape)
    theta_bar, _ = jax.jit(lambda p, g: root_vjp(jax.grad(energy), x_star, p, g))(params, cotangent)
    assert jax.tree_util.tree_structure(theta_bar) == jax.tree_util.tree_structure(params)
    expected = jax.vjp(quadratic_solution, THETA)[1](cotangent)[0]
    assert rel_err(jnp.concatenate([theta_bar["a"][None], theta_bar["b"]]), expected) <= 1e-8


def test_custom_root_all_modes() -> None:
    solved = custom_root(optimality)(descent_solver)
    x_star = lambda t: solved(INIT, t)  # noqa: E731
    np.testing.assert_allclose(jax.jit(x_star)(THETA), quadratic_solution(THETA), atol=1e-11)
    first = jax.jacfwd(quadratic_solution)(THETA)
    assert rel_err(jax.jit(jax.jacfwd(x_star))(THETA), first) <= 1e-8
    assert rel_err(jax.jit(jax.jacrev(x_star))(THETA), first) <= 1e-8
    # The start gets a zero derivative.
    np.testing.assert_array_equal(jax.jit(jax.jacfwd(solved))(INIT, THETA), 0.0)
    # Second derivatives: x* = A(theta)^-1 B theta is not linear in theta_0.
    expected = jax.hessian(lambda t: jnp.sum(jnp.sin(quadratic_solution(t))))(THETA)
    assert np.abs(expected).max() > 0.1
    hessian = jax.jit(jax.hessian(lambda t: jnp.sum(jnp.sin(x_star(t)))))(THETA)
    assert rel_err(hessian, expected) <= 1e-8
    second = jax.jacfwd(jax.jacfwd(quadratic_solution))(THETA)
    assert rel_err(jax.jit(jax.jacfwd(jax.jacfwd(x_star)))(THETA), second) <= 1e-8
    assert rel_err(jax.jit(jax.jacrev(jax.jacrev(x_star)))(THETA), second) <= 1e-8


def test_custom_root_jit_vmap_and_aux() -> None:
    def solver_with_aux(init, theta):
        x = descent_solver(init, theta)
        return x, {"residual": jnp.max(jnp.abs(optimality(x, theta))), "theta": theta}

    solved = custom_root(optimality, has_aux=True)(solver_with_aux)
    thetas = jnp.stack([THETA, 2.0 * THETA])
    tangent = jnp.asarray([1.0, 0.2, -0.4])
    jvp = lambda t: jax.jvp(lambda t: solved(INIT, t), (t,), (tangent,))  # noqa: E731
    (xs, aux), (dxs, daux) = jax.jit(jax.vmap(jvp))(thetas)
    assert aux["theta"].shape == (2, 3)
    assert float(jnp.max(aux["residual"])) <= 1e-13
    # The aux output has a zero derivative, even where it depends on theta.
    np.testing.assert_array_equal(daux["theta"], 0.0)
    for i in range(2):
        expected_x, expected_dx = jax.jvp(quadratic_solution, (thetas[i],), (tangent,))
        np.testing.assert_allclose(xs[i], expected_x, atol=1e-11)
        assert rel_err(dxs[i], expected_dx) <= 1e-8
        (x, _), (dx, _) = jax.jit(jvp)(thetas[i])  # a single call
        np.testing.assert_allclose(xs[i], x, rtol=1e-12)
        np.testing.assert_allclose(dxs[i], dx, rtol=1e-10)


# ---------------------------------------------------------------------------
# Zero modes through custom_root: a spring network with a translation and a rattler
# ---------------------------------------------------------------------------
#
# E(x, theta) = 1/2 sum_bonds |x_i - x_j - theta_ij|^2: vector springs whose
# rest vectors are the parameters. H is the graph Laplacian (x) I: translations
# of the connected particles and every coordinate of the isolated particle are
# zero modes. x* is defined up to them; the reference is
# mdsens.testing.dense_reference (pinv of the dense Hessian).

BONDS = np.asarray([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [3, 4]])  # particle 5 is isolated
N_PARTICLES = 6
REST = jnp.asarray(np.random.default_rng(15).standard_normal((len(BONDS), 2)))


def spring_energy(x: jax.Array, rest: jax.Array) -> jax.Array:
    d = x[BONDS[:, 0]] - x[BONDS[:, 1]] - rest
    return 0.5 * jnp.sum(d * d)


def spring_modes() -> zm.ZeroModes:
    mask = jnp.ones((N_PARTICLES, 2)).at[5].set(0.0)
    translations = jnp.stack([mask * jnp.asarray([1.0, 0.0]), mask * jnp.asarray([0.0, 1.0])]) / jnp.sqrt(5.0)
    return zm.ZeroModes(mask, translations)


def spring_solver(init, rest):
    # Exact minimiser (one of many): least squares over the bonds.
    D = np.zeros((len(BONDS), N_PARTICLES))
    D[np.arange(len(BONDS)), BONDS[:, 0]] = 1.0
    D[np.arange(len(BONDS)), BONDS[:, 1]] = -1.0
    return jax.lax.stop_gradient(jnp.asarray(np.linalg.pinv(D)) @ rest + init)


@pytest.mark.parametrize("modes", ["given", "detected"])
def test_custom_root_zero_modes(modes: str) -> None:
    # H does not depend on x (quadratic energy): the reference at any x.
    J = dense_reference(spring_energy, jnp.zeros((N_PARTICLES, 2)), REST, rcond=1e-10).J
    if modes == "given":
        zero_modes_fn = lambda x, rest: spring_modes()  # noqa: E731
    else:
        zero_modes_fn = lambda x, rest: zm.detect(  # noqa: E731
            lambda v: jax.jvp(lambda y: jax.grad(spring_energy)(y, rest), (x,), (v,))[1], x
        )
    solved = custom_root(jax.grad(spring_energy), zero_modes=zero_modes_fn)(spring_solver)
    x_star = lambda rest: solved(jnp.zeros((N_PARTICLES, 2)), rest)  # noqa: E731
    forward = jax.jit(jax.jacfwd(x_star))(REST).reshape(J.shape)
    reverse = jax.jit(jax.jacrev(x_star))(REST).reshape(J.shape)
    assert rel_err(forward, J) <= 1e-9 and rel_err(reverse, J) <= 1e-9
    # The isolated particle does not move, and the connected ones do not translate.
    np.testing.assert_allclose(forward.reshape(N_PARTICLES, 2, -1)[5], 0.0, atol=1e-14)
    np.testing.assert_allclose(forward.reshape(N_PARTICLES, 2, -1).sum(axis=0), 0.0, atol=1e-12)
    # A cotangent with nonzero mean and a component on the isolated particle.
    cotangent = jax.random.normal(jax.random.PRNGKey(1), (N_PARTICLES, 2)) + jnp.asarray([2.0, -1.0])
    (rest_bar,) = jax.jit(lambda g: jax.vjp(x_star, REST)[1](g))(cotangent)
    assert rel_err(rest_bar.ravel(), np.asarray(cotangent).ravel() @ J) <= 1e-9


def test_custom_root_without_zero_modes_fails_on_inconsistent_cotangent() -> None:
    init = jnp.zeros((N_PARTICLES, 2))
    # Zero mean (no translation), partly on the isolated particle.
    cotangent = jnp.zeros((N_PARTICLES, 2)).at[5].set(jnp.asarray([1.0, 0.0])).at[1].set(jnp.asarray([-1.0, 0.0]))

    def vjp(throw):
        solved = custom_root(jax.grad(spring_energy), throw=throw)(spring_solver)
        return jax.jit(lambda g: jax.vjp(lambda r: solved(init, r), REST)[1](g)[0])(cotangent)

    with raises_with("linear solve"):
        jax.block_until_ready(vjp(True))
    with pytest.warns(RuntimeWarning, match="linear solve"):
        result = np.asarray(vjp(False))
    assert np.all(np.isnan(result))


# ---------------------------------------------------------------------------
# Saddle points
# ---------------------------------------------------------------------------

INDEFINITE = np.diag([2.0, 1.0, -1.0, 3.0])


def saddle_energy(x: jax.Array, theta: jax.Array) -> jax.Array:
    return 0.5 * x @ jnp.asarray(INDEFINITE) @ x - theta @ x


def saddle_solver(init, theta):
    return jnp.linalg.solve(jnp.asarray(INDEFINITE), theta)


SADDLE_THETA = jnp.asarray([1.0, 2.0, 3.0, 4.0])
SADDLE_TANGENT = jnp.asarray([0.0, 0.0, 1.0, 0.0])  # along the negative eigenvector


def test_root_jvp_reports_negative_curvature() -> None:
    x = saddle_solver(None, SADDLE_THETA)
    jvp = lambda solve: jax.jit(lambda v: root_jvp(jax.grad(saddle_energy), x, SADDLE_THETA, v, solve=solve))  # noqa: E731
    _, info = jvp(CG())(SADDLE_TANGENT)
    assert bool(info.negative_curvature) and not bool(info.converged)
    dx, info = jvp(MINRES())(SADDLE_TANGENT)
    assert bool(info.converged) and not bool(info.negative_curvature)
    np.testing.assert_allclose(dx, np.linalg.solve(INDEFINITE, SADDLE_TANGENT), atol=1e-12)


def test_custom_root_saddle_raises_or_nan() -> None:
    def x_star(throw):
        solved = custom_root(jax.grad(saddle_energy), throw=throw)(saddle_solver)
        return lambda t: solved(jnp.zeros(4), t)

    jvp = lambda throw: jax.jit(lambda v: jax.jvp(x_star(throw), (SADDLE_THETA,), (v,))[1])  # noqa: E731
    with raises_with("negative curvature"):
        jax.block_until_ready(jvp(True)(SADDLE_TANGENT))
    with pytest.warns(RuntimeWarning, match="negative curvature"):
        dx = np.asarray(jvp(False)(SADDLE_TANGENT))
    assert np.all(np.isnan(dx))
    # Reverse mode goes through the same check (the transposed solve).
    with raises_with("negative curvature"):
        jax.block_until_ready(jax.jit(jax.grad(lambda t: x_star(True)(t)[2]))(SADDLE_THETA))


def test_failure_check_under_vmap_reports_once() -> None:
    """Under vmap the failure check runs once for the whole batch and sees
    the worst member (one converged tangent, one not)."""
    init = jnp.zeros(4)
    solved = custom_root(jax.grad(saddle_energy), throw=False)(saddle_solver)
    tangents = jnp.stack([jnp.asarray([1.0, 0.0, 0.0, 0.0]), SADDLE_TANGENT])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, dxs = jax.jit(jax.vmap(lambda v: jax.jvp(lambda t: solved(init, t), (SADDLE_THETA,), (v,))))(tangents)
        dxs = np.asarray(dxs)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "negative curvature" in messages[0]
    np.testing.assert_allclose(dxs[0], [0.5, 0.0, 0.0, 0.0], atol=1e-12)
    assert np.all(np.isnan(dxs[1]))


# ---------------------------------------------------------------------------
# custom_fixed_point: a non-symmetric contraction
# ---------------------------------------------------------------------------

M = 0.6 * random_matrix(16, 8) / np.sqrt(8.0)
M = M / max(1.0, np.max(np.abs(np.linalg.eigvals(M))) / 0.8)  # spectral radius <= 0.8


def contraction(x: jax.Array, theta: jax.Array) -> jax.Array:
    return jnp.asarray(M) @ x + theta


def iterate(init: jax.Array, theta: jax.Array) -> jax.Array:
    def keep_going(state):
        x, k = state
        return (jnp.max(jnp.abs(contraction(x, theta) - x)) > 1e-14) & (k < 10_000)

    return jax.lax.while_loop(keep_going, lambda s: (contraction(s[0], theta), s[1] + 1), (init, 0))[0]


def test_custom_fixed_point_bicgstab() -> None:
    assert np.abs(M - M.T).max() > 0.1 and np.max(np.abs(np.linalg.eigvals(M))) < 1.0
    theta = jnp.asarray(np.random.default_rng(17).standard_normal(8))
    expected = np.linalg.inv(np.eye(8) - M)  # x* = (I - M)^-1 theta
    solved = custom_fixed_point(contraction, solve=BiCGSTAB(), symmetric=False)(iterate)
    x_star = lambda t: solved(jnp.zeros(8), t)  # noqa: E731
    np.testing.assert_allclose(jax.jit(x_star)(theta), expected @ theta, atol=1e-12)
    assert rel_err(jax.jit(jax.jacfwd(x_star))(theta), expected) <= 1e-9
    assert rel_err(jax.jit(jax.jacrev(x_star))(theta), expected) <= 1e-9
    # root_vjp on the same non-symmetric optimality function.
    g = jnp.asarray(np.random.default_rng(18).standard_normal(8))
    theta_bar, info = root_vjp(
        lambda x, t: contraction(x, t) - x, expected @ theta, theta, g, solve=BiCGSTAB(), symmetric=False
    )
    assert bool(info.converged) and rel_err(theta_bar, np.asarray(g) @ expected) <= 1e-9
    # Declaring the Jacobian symmetric when it is not gives the wrong reverse mode.
    wrong, _ = root_vjp(
        lambda x, t: contraction(x, t) - x, expected @ theta, theta, g, solve=BiCGSTAB(), symmetric=True
    )
    assert rel_err(wrong, np.asarray(g) @ expected) > 1e-3


# ---------------------------------------------------------------------------
# zero_modes: ZeroModes.project and detect
# ---------------------------------------------------------------------------


def test_project_is_an_orthogonal_projector() -> None:
    positions = jnp.asarray(np.random.default_rng(19).standard_normal((5, 3)))
    mask = jnp.ones((5, 3)).at[1].set(0.0)
    candidates = zm.rigid_body_candidates(positions) * mask
    assert candidates.shape == (6, 5, 3)
    basis = np.linalg.qr(np.asarray(candidates).reshape(6, 15).T)[0].T.reshape(6, 5, 3)
    modes = zm.ZeroModes(mask, jnp.asarray(basis))
    P = np.asarray(jax.vmap(modes.project)(jnp.eye(15))).T
    np.testing.assert_allclose(P @ P, P, atol=1e-13)
    np.testing.assert_allclose(P, P.T, atol=1e-13)
    assert int(modes.n_modes) == 3 + 6
    assert np.linalg.matrix_rank(P) == 15 - 9
    # It removes every candidate and the masked particle, keeps the rest.
    for m in candidates:
        np.testing.assert_allclose(modes.project(m), 0.0, atol=1e-13)
    np.testing.assert_allclose(modes.project(jnp.ones((5, 3)))[1], 0.0, atol=1e-15)
    v = jnp.asarray(np.random.default_rng(20).standard_normal((5, 3)))
    np.testing.assert_allclose(modes.project(modes.project(v)), modes.project(v), atol=1e-13)
    assert modes.project(v.ravel()).shape == (15,)
    # zero_modes.none projects nothing.
    np.testing.assert_array_equal(zm.none(positions).project(v), v)


def bonded_energy(bonds: np.ndarray):
    """Central springs at rest at the given positions: a stationary point whose
    Hessian's null space is known (rigid motions of each rigid component)."""

    def make(positions: jax.Array):
        rest = jnp.linalg.norm(positions[bonds[:, 0]] - positions[bonds[:, 1]], axis=-1)

        def energy(x):
            r = jnp.linalg.norm(x[bonds[:, 0]] - x[bonds[:, 1]], axis=-1)
            return 0.5 * jnp.sum((r - rest) ** 2)

        return energy

    return make


def vector_springs(bonds: np.ndarray):
    """Linear vector springs: translation-invariant but not rotation-invariant (like a periodic system)."""

    def make(positions: jax.Array):
        rest = positions[bonds[:, 0]] - positions[bonds[:, 1]] + 0.1

        def energy(x):
            d = x[bonds[:, 0]] - x[bonds[:, 1]] - rest
            return 0.5 * jnp.sum(d * d)

        return energy

    return make


TRIANGLES_2D = np.asarray([[0, 1], [1, 2], [2, 0], [1, 3], [2, 3]])
TETRAHEDRON = np.asarray([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
DETECT_CASES = {
    # name: (dim, particles, energy builder, expected zero modes, rattlers)
    "2d_rigid_cluster": (2, 4, bonded_energy(TRIANGLES_2D), 3, []),
    "2d_cluster_with_rattler": (2, 5, bonded_energy(TRIANGLES_2D), 3 + 2, [4]),
    "3d_rigid_cluster": (3, 4, bonded_energy(TETRAHEDRON), 6, []),
    "3d_cluster_with_rattler": (3, 5, bonded_energy(TETRAHEDRON), 6 + 3, [4]),
    "translations_only": (3, 4, vector_springs(TETRAHEDRON), 3, []),
}


@pytest.mark.parametrize("name", list(DETECT_CASES))
def test_detect_matches_dense_null_space(name: str) -> None:
    dim, n, build, expected_modes, rattlers = DETECT_CASES[name]
    positions = jnp.asarray(np.random.default_rng(21).standard_normal((n, dim)))
    energy = build(positions)
    H = np.asarray(jax.hessian(energy)(positions)).reshape(n * dim, n * dim)
    eigenvalues, vectors = np.linalg.eigh(H)
    null = vectors[:, np.abs(eigenvalues) <= 1e-9 * np.max(eigenvalues)]
    assert null.shape[1] == expected_modes  # the oracle
    hvp = lambda v: jax.jvp(jax.grad(energy), (positions,), (v,))[1]  # noqa: E731
    modes = jax.jit(lambda x: zm.detect(hvp, x))(positions)
    assert int(modes.n_modes) == expected_modes
    np.testing.assert_array_equal(np.asarray(modes.mask)[:, 0], [i not in rattlers for i in range(n)])
    P = np.asarray(jax.vmap(modes.project)(jnp.eye(n * dim))).T
    np.testing.assert_allclose(P, np.eye(n * dim) - null @ null.T, atol=1e-9)


def test_detect_is_scale_free() -> None:
    """The tests are relative: a very stiff or very soft network gives the same modes."""
    positions = jnp.asarray(np.random.default_rng(22).standard_normal((5, 2)))
    energy = bonded_energy(TRIANGLES_2D)(positions)
    detect = jax.jit(
        lambda scale: zm.detect(lambda v: scale * jax.jvp(jax.grad(energy), (positions,), (v,))[1], positions)
    )
    for scale in (1e-6, 1e6):
        assert int(detect(scale).n_modes) == 5
