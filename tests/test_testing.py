"""The shared oracles of mdsens.testing against closed forms: the dense
reference (first and second derivatives, null space, the consistency check),
the projection, re-relaxed finite differences and the relative error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdsens import FIRE, System
from mdsens.testing import dense_reference, finite_difference_sensitivity, project, relative_error

# E(x, theta) = 1/2 x^T A(theta) x - (B theta)^T x, A(theta) = A0 + theta_0 A1 (SPD): x* = A^-1 B theta.
RNG = np.random.default_rng(0)
Q = np.linalg.qr(RNG.standard_normal((6, 6)))[0]
A0 = Q @ np.diag(np.geomspace(1.0, 20.0, 6)) @ Q.T
A1 = 0.1 * (lambda m: m @ m.T)(RNG.standard_normal((6, 6)))
B = RNG.standard_normal((6, 3))
THETA = jnp.asarray([0.7, -0.3, 1.1])


def quadratic(x: jax.Array, theta: jax.Array) -> jax.Array:
    A = jnp.asarray(A0) + theta[0] * jnp.asarray(A1)
    x = x.ravel()
    return 0.5 * x @ A @ x - (jnp.asarray(B) @ theta) @ x


def quadratic_solution(theta: jax.Array) -> jax.Array:
    A = jnp.asarray(A0) + theta[0] * jnp.asarray(A1)
    return jnp.linalg.solve(A, jnp.asarray(B) @ theta).reshape(3, 2)


def test_dense_reference_of_a_quadratic() -> None:
    """J and X2 are the autodiff derivatives of the closed form x* = A(theta)^-1 B theta."""
    ref = dense_reference(quadratic, quadratic_solution(THETA), THETA, second_order=True)
    A = A0 + float(THETA[0]) * A1
    np.testing.assert_allclose(ref.H, A, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref.eigenvalues, np.linalg.eigvalsh(A), rtol=1e-10)
    assert ref.null_space.shape == (6, 0)
    first = np.asarray(jax.jacfwd(quadratic_solution)(THETA)).reshape(6, 3)
    second = np.asarray(jax.jacfwd(jax.jacfwd(quadratic_solution))(THETA)).reshape(6, 3, 3)
    assert np.abs(second).max() > 1e-2  # x* is not linear in theta_0
    assert relative_error(ref.J, first) <= 1e-10
    assert relative_error(ref.X2, second) <= 1e-10
    assert dense_reference(quadratic, quadratic_solution(THETA), THETA).X2 is None


def dimer(x: jax.Array, theta: dict) -> jax.Array:
    return 0.5 * theta["k"] * (jnp.linalg.norm(x[1] - x[0]) - theta["length"]) ** 2


DIRECTION = np.asarray([0.6, 0.8])
DIMER_X = jnp.asarray(np.stack([-0.85 * DIRECTION, 0.85 * DIRECTION]))  # at rest: length 1.7
DIMER_THETA = {"k": jnp.asarray(2.0), "length": jnp.asarray(1.7)}


def test_dense_reference_is_minimum_norm() -> None:
    """A free dimer: two translations and the rotation are the null space; the
    derivative in the length moves the two ends apart along the bond, and
    nothing else (no translation, no rotation); flattening follows ravel_pytree
    (k, then length)."""
    ref = dense_reference(dimer, DIMER_X, DIMER_THETA, second_order=True)
    assert ref.null_space.shape == (4, 3)
    np.testing.assert_allclose(ref.null_space.T @ ref.null_space, np.eye(3), atol=1e-12)
    rotation = np.stack([[-DIRECTION[1], DIRECTION[0]], [DIRECTION[1], -DIRECTION[0]]]).ravel()
    for mode in (np.tile([1.0, 0.0], 2), np.tile([0.0, 1.0], 2), rotation):
        np.testing.assert_allclose(project(mode, ref.null_space), 0.0, atol=1e-12)
    np.testing.assert_allclose(ref.J[:, 0], 0.0, atol=1e-12)
    np.testing.assert_allclose(ref.J[:, 1], np.concatenate([-0.5 * DIRECTION, 0.5 * DIRECTION]), atol=1e-12)
    np.testing.assert_allclose(ref.X2, 0.0, atol=1e-10)  # x* is linear in the length


def test_inconsistent_second_order_system_raises() -> None:
    """A parameter that pulls the pair's centroid at second order (d2 grad E /
    dtheta2 along a translation) has no second derivative of x*: x* exists at
    theta = 0 only."""

    def pulled(x: jax.Array, theta: jax.Array) -> jax.Array:
        bond = x[1] - x[0] - jnp.asarray([1.0, 0.0])
        return 0.5 * jnp.sum(bond**2) - theta**2 * jnp.sum(x[:, 0])

    x = jnp.asarray([[0.0, 0.0], [1.0, 0.0]])
    theta = jnp.asarray(0.0)
    np.testing.assert_allclose(dense_reference(pulled, x, theta).J, 0.0, atol=1e-14)
    with pytest.raises(ValueError, match="second-order system"):
        dense_reference(pulled, x, theta, second_order=True)


def test_project_removes_the_null_space() -> None:
    null_space = np.linalg.qr(RNG.standard_normal((6, 2)))[0]
    field = RNG.standard_normal((3, 2))
    projected = project(field, null_space)
    assert projected.shape == (3, 2)
    np.testing.assert_allclose(null_space.T @ projected.ravel(), 0.0, atol=1e-14)
    np.testing.assert_allclose(project(projected, null_space), projected, atol=1e-14)
    removed = (field - projected).ravel()
    np.testing.assert_allclose(null_space @ (null_space.T @ removed), removed, atol=1e-14)


def test_finite_difference_sensitivity_of_the_dimer() -> None:
    system = System.from_energy(dimer, DIMER_THETA, DIMER_X, dt_max=0.1)
    tangent = {"k": jnp.asarray(0.0), "length": jnp.asarray(1.0)}
    fd = finite_difference_sensitivity(system, DIMER_X, DIMER_THETA, tangent, step=1e-4)
    np.testing.assert_allclose(fd, np.stack([-0.5 * DIRECTION, 0.5 * DIRECTION]), atol=1e-8)
    with pytest.raises(FloatingPointError, match="re-relaxation failed"), pytest.warns(RuntimeWarning):
        finite_difference_sensitivity(system, DIMER_X, DIMER_THETA, tangent, minimiser=FIRE(max_steps=1))


def test_relative_error() -> None:
    assert relative_error([3.0, 4.0], [0.0, 5.0]) == pytest.approx(np.sqrt(10.0) / 5.0, rel=1e-15)
    assert relative_error(np.ones((2, 2)), np.ones((2, 2))) == 0.0
