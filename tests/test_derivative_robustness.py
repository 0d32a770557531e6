"""No NaN in any derivative of a relaxed state, to third order (issue 17).

For every builder at its default parameters, the first three derivatives of
a nonlinear objective of x*(theta + t v) along a random direction v are
finite and agree with central finite differences of the derivative one order
lower (each evaluated at re-relaxed states), and ``jax.hessian`` with respect
to every parameter leaf is finite. (The default Morse sigma = 1 used to give
an all-NaN Hessian: the self pair sits at r = sigma, where jax-md's
``(...) ** 2.0`` has a NaN third derivative.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mdsens
import mdsens.testing
from mdsens import systems

BUILDERS = {
    "soft_sphere": lambda: systems.soft_sphere_packing(24, dim=2),
    "lennard_jones": lambda: systems.lennard_jones(36, dim=2),
    "morse": lambda: systems.morse(25, dim=2),
    "lennard_jones_cluster": lambda: systems.lennard_jones_cluster(7),
}
STEP = 1e-4


def directional(system: mdsens.System, x0: jax.Array, weights: jax.Array, direction):
    """``f(t) = objective(x*(params + t direction))``; for the free cluster the
    objective is rotation- and translation-invariant (its second order is
    gauge-free), elsewhere it is not."""
    free = system.box is None

    def f(t):
        params = jax.tree_util.tree_map(lambda p, d: p + t * d, system.params, direction)
        x = mdsens.equilibrium(system, params, positions=x0)
        if free:
            centred = x - jnp.mean(x, axis=0)
            return jnp.sum(weights[:, 0] * jnp.sum(centred**2, axis=1))
        return jnp.sum(weights * x) + jnp.sum(jnp.sin(x))

    return f


def derivatives(f, t: float):
    d1 = lambda s: jax.jvp(f, (s,), (1.0,))[1]  # noqa: E731
    d2 = lambda s: jax.jvp(d1, (s,), (1.0,))[1]  # noqa: E731
    d3 = lambda s: jax.jvp(d2, (s,), (1.0,))[1]  # noqa: E731
    return float(d1(t)), float(d2(t)), float(d3(t)), d1, d2


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_third_order_is_finite_and_matches_finite_differences(name: str) -> None:
    system = BUILDERS[name]()
    x0 = mdsens.relax(system).positions
    key_w, key_d = jax.random.split(jax.random.PRNGKey(7))
    weights = jax.random.normal(key_w, x0.shape)
    # A direction in every leaf but the box (a box change would need a new start).
    leaves, treedef = jax.tree_util.tree_flatten_with_path(system.params)
    keys = jax.random.split(key_d, len(leaves))
    direction = jax.tree_util.tree_unflatten(
        treedef,
        [
            jnp.zeros_like(p) if "box" in jax.tree_util.keystr(path) else 0.1 * jax.random.normal(k, jnp.shape(p))
            for (path, p), k in zip(leaves, keys, strict=False)
        ],
    )
    f = jax.jit(directional(system, x0, weights, direction))
    d1, d2, d3, first, second = derivatives(f, 0.0)
    assert np.all(np.isfinite([d1, d2, d3])), (d1, d2, d3)
    fd2 = (float(first(STEP)) - float(first(-STEP))) / (2 * STEP)
    fd3 = (float(second(STEP)) - float(second(-STEP))) / (2 * STEP)
    assert abs(fd2 - d2) <= 1e-4 * max(abs(d2), abs(d1)), (d2, fd2)
    assert abs(fd3 - d3) <= 1e-3 * max(abs(d3), abs(d2)), (d3, fd3)


@pytest.mark.slow
def test_hessian_at_default_morse_sigma_is_finite() -> None:
    """The case of the issue: jax.hessian of an objective of x* with respect to
    every Morse parameter (sigma = 1, the default)."""
    system = systems.morse(25, dim=2)
    x0 = mdsens.relax(system).positions
    weights = jax.random.normal(jax.random.PRNGKey(3), x0.shape)
    params = {k: v for k, v in system.params.items() if k != "box"}

    def objective(p):
        return jnp.sum(weights * mdsens.equilibrium(system, {**p, "box": system.params["box"]}, positions=x0))

    hessian = jax.hessian(objective)(params)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(hessian))


# ---------------------------------------------------------------------------
# Below jamming: floppy modes that no zero-mode projection covers
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unjammed():
    """A 2D packing just below jamming: contacts with overlaps ~1e-12, and about a
    hundred Hessian eigenvalues within 1e-12 of zero, some negative."""
    system = systems.soft_sphere_packing(64, dim=2, phi=0.838, seed=5)
    x = mdsens.relax(system).positions
    reference = mdsens.testing.dense_reference(system.energy, x, system.params)
    return system, x, reference


@pytest.mark.slow
def test_below_jamming_forward_mode_is_the_pseudo_inverse(unjammed) -> None:
    system, x, ref = unjammed
    scale = np.max(np.abs(ref.eigenvalues))
    assert np.sum(np.abs(ref.eigenvalues) <= 1e-9 * scale) > 2 * system.dim  # floppy, not just translations
    tangent = jax.tree_util.tree_map(jnp.zeros_like, system.params)
    tangent["diameters"] = jnp.array([1.0, 0.0])
    _, dx, info = mdsens.equilibrium_jvp(system, system.params, tangent, positions=x)
    assert bool(info.solve.converged)
    flat = np.asarray(jax.flatten_util.ravel_pytree(tangent)[0])
    assert mdsens.testing.relative_error(np.asarray(dx).ravel(), ref.J @ flat) <= 1e-8


@pytest.mark.slow
def test_below_jamming_reverse_mode_is_refused_by_cg_and_exact_with_dense(unjammed) -> None:
    """A random cotangent has components along the floppy modes: CG cannot give
    the minimum-norm answer and says so (``singular``, never ``converged`` with
    a wrong number, nor a false ``negative_curvature``); the dense solver gives
    the pseudo-inverse and reports convergence."""
    system, x, ref = unjammed
    cotangent = jax.random.normal(jax.random.PRNGKey(11), x.shape)
    truth = ref.J.T @ mdsens.testing.project(np.asarray(cotangent).ravel(), ref.null_space)
    _, _, info = mdsens.equilibrium_vjp(system, system.params, cotangent, positions=x)
    assert info.solve.reason == "singular"
    assert not bool(info.solve.negative_curvature)
    assert abs(float(info.solve.lowest_curvature)) <= 1e-9 * np.max(ref.eigenvalues)
    dense = mdsens.Implicit(solver=mdsens.Dense())
    _, grad, info = mdsens.equilibrium_vjp(system, system.params, cotangent, positions=x, adjoint=dense)
    assert bool(info.solve.converged)
    assert mdsens.testing.relative_error(jax.flatten_util.ravel_pytree(grad)[0], truth) <= 1e-8
    # Inside jax.grad, the refusal is an error with the reason.
    objective = lambda p: jnp.sum(cotangent * mdsens.equilibrium(system, p, positions=x))  # noqa: E731
    with pytest.raises(Exception, match="numerical null space"):
        jax.block_until_ready(jax.grad(objective)(system.params))


# ---------------------------------------------------------------------------
# Second order of free clusters: the gauge
# ---------------------------------------------------------------------------


def _polydisperse_cluster(dim: int) -> mdsens.System:
    """A free 7-particle Lennard-Jones cluster whose particle sizes 1 and 4 move
    with ``params["theta"]`` (two parameters that change its shape)."""
    base = systems.lennard_jones_cluster(7, dim=dim)
    n = base.n

    def energy(x, p):
        size = (1.0 + 0.1 * jnp.arange(n) / n).at[1].add(p["theta"][0]).at[4].add(p["theta"][1])
        sigma2 = (0.5 * (size[:, None] + size[None, :])) ** 2
        r2 = jnp.sum((x[:, None, :] - x[None, :, :]) ** 2, axis=-1) + jnp.eye(n)
        inverse6 = (sigma2 / r2) ** 3
        return jnp.sum(jnp.where(jnp.eye(n) > 0, 0.0, 2.0 * (inverse6 * inverse6 - inverse6)))

    return mdsens.System.from_energy(energy, {"theta": jnp.zeros(2)}, base.positions)


@pytest.mark.slow
@pytest.mark.parametrize("dim", [2, 3])
def test_free_cluster_second_order_is_the_symmetric_minimum_norm_one(dim: int) -> None:
    """For an objective that rotations change, ``f(theta) = obj(x*(theta))``
    depends on the orientation x* is given. mdsens's gradient is the one along
    the minimum-norm derivative; its finite-difference Jacobian is not symmetric
    (the antisymmetric part is the holonomy of that gauge, an infinitesimal
    rotation, and the same for re-relaxed states aligned to x* by Kabsch).
    ``jax.hessian`` returns the minimum-norm second-order coefficient, which is
    the symmetric part. For a rotation-invariant objective the two agree and the
    Jacobian is symmetric."""
    system = _polydisperse_cluster(dim)
    x0 = mdsens.relax(system).positions
    weights = jax.random.normal(jax.random.PRNGKey(2), x0.shape)
    objectives = {
        "not invariant": lambda x: jnp.sum(weights * x) + jnp.sum(jnp.sin(x)),
        "invariant": lambda x: jnp.sum(weights[:, 0] * jnp.sum((x - jnp.mean(x, axis=0)) ** 2, axis=1)),
    }
    theta = jnp.zeros(2)
    for name, objective in objectives.items():
        f = lambda t, objective=objective: objective(mdsens.equilibrium(system, {"theta": t}, positions=x0))  # noqa: E731
        hessian = np.asarray(jax.jit(jax.hessian(f))(theta))
        gradient = jax.jit(jax.grad(f))
        h = 1e-5
        columns = [
            (np.asarray(gradient(theta + h * e)) - np.asarray(gradient(theta - h * e))) / (2 * h) for e in np.eye(2)
        ]
        jacobian = np.stack(columns, axis=1)
        symmetric = 0.5 * (jacobian + jacobian.T)
        assert np.allclose(hessian, hessian.T, rtol=0, atol=1e-10 * np.abs(hessian).max()), name
        assert np.linalg.norm(hessian - symmetric) <= 1e-6 * np.linalg.norm(hessian), name
        asymmetry = np.linalg.norm(jacobian - jacobian.T) / np.linalg.norm(jacobian)
        if name == "invariant":
            assert asymmetry <= 1e-6
        else:
            assert asymmetry >= 1e-3  # the gauge's holonomy: real, and not a derivative


# A user's energy whose mixed derivative d_theta grad_x E is infinite at x*
# (d sqrt(b)/db at b = 0) while E, its forces and its Hessian are finite: the
# reverse-mode derivative forms that term after the linear solve.


def _singular_mixed_derivative_system() -> mdsens.System:
    centre = jnp.asarray([[0.5, -0.25], [1.5, 0.75]])

    def energy(x, params):
        return 0.5 * jnp.sum((x - params["c"] * centre) ** 2) + jnp.sqrt(params["b"]) * 0.5 * jnp.sum(x**2)

    params = {"c": jnp.asarray(1.0), "b": jnp.asarray(0.0)}
    return mdsens.System.from_energy(energy, params, centre + 0.1, dt_max=0.1)


def test_nonfinite_mixed_derivative_in_reverse_mode_is_an_error_or_flagged() -> None:
    system = _singular_mixed_derivative_system()
    objective = lambda p: jnp.sum(mdsens.equilibrium(system, p) ** 2)  # noqa: E731
    with pytest.raises(jax.errors.JaxRuntimeError, match="mixed derivative"):
        jax.block_until_ready(jax.grad(objective)(system.params))

    lenient = lambda p: jnp.sum(mdsens.equilibrium(system, p, throw=False) ** 2)  # noqa: E731
    with pytest.warns(RuntimeWarning, match="mixed derivative"):
        grad = jax.block_until_ready(jax.grad(lenient)(system.params))
    assert not np.isfinite(float(grad["b"]))
    # The finite entry is still the right one: x* = c * centre, d(sum x*^2)/dc = 2 c |centre|^2.
    centre = system.positions - 0.1
    np.testing.assert_allclose(float(grad["c"]), 2.0 * float(jnp.sum(centre**2)), rtol=1e-9)

    _, _, info = mdsens.equilibrium_vjp(system, system.params, 2.0 * mdsens.relax(system).positions)
    assert info.relax.converged
    assert str(info.solve.reason) == "nonfinite"


def test_reverse_mode_through_one_parameter_leaf() -> None:
    """``jax.grad`` with respect to one leaf (the others constant, so their
    tangents are constant zeros) goes through the cotangent check, and equals
    the reverse mode of ``equilibrium_vjp`` (root_vjp, no custom_root)."""
    system = systems.soft_sphere_packing(16, dim=2, phi=0.9)
    weights = jnp.arange(32.0).reshape(16, 2) / 32.0

    def objective(diameters):
        return jnp.sum(weights * mdsens.equilibrium(system, {**system.params, "diameters": diameters}))

    grad = jax.jit(jax.grad(objective))(system.params["diameters"])
    _, dparams, info = mdsens.equilibrium_vjp(system, system.params, weights)
    assert info.solve.converged
    np.testing.assert_allclose(grad, dparams["diameters"], rtol=1e-8)
