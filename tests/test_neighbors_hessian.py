"""The neighbor-list Hessian operators (mdsens.neighbors.pair_sum) against JAX's
autodiff of the all-pairs energy, to 1e-12 relative: the explicit pair
Hessian-vector product (forward-over-reverse through the frozen list), the
same product linearised once (``jax.linearize``: the pair geometry and radial
derivatives computed once, as the implicit solves' loops do), and the
per-particle Hessian blocks and diagonal of the energy protocol
(``System.hessian_blocks``, ``System.hessian_diagonal``) against the dense
Hessian. Two cases: 2D soft spheres with per-particle diameters in a square
box, and 3D Morse with two species (species matrices) in a triclinic box;
both off equilibrium (overlapping random positions)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mdsens import io, systems

RTOL = 1e-12
# Triclinic (columns are the box vectors), at least three Morse list cutoffs wide.
TILTED = 1.8 * np.array([[6.0, 1.2, -0.7], [0.0, 5.5, 0.9], [0.0, 0.0, 6.3]])


def rel_err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def soft_spheres_2d() -> tuple[systems.System, systems.System, jax.Array]:
    def build(neighbor_list: bool) -> systems.System:
        return systems.soft_sphere_packing(
            64, dim=2, phi=0.9, per_particle_diameters=True, seed=3, neighbor_list=neighbor_list
        )

    a, b = build(False), build(True)
    return a, b, a.positions


def morse_3d_triclinic() -> tuple[systems.System, systems.System, jax.Array]:
    rng = np.random.default_rng(4)
    x = rng.uniform(size=(100, 3)) @ TILTED.T
    species = np.arange(100) % 2

    def build(neighbor_list: bool) -> systems.System:
        potential = systems.Morse(sigma=[[1.0, 1.1], [1.1, 1.2]], neighbor_list=neighbor_list)
        return io.from_arrays(x, potential, box=TILTED, species=species)

    a, b = build(False), build(True)
    return a, b, a.positions


@pytest.fixture(scope="module", params=[soft_spheres_2d, morse_3d_triclinic], ids=["2d_soft_spheres", "3d_morse"])
def case(request) -> dict:
    all_pairs, listed, x = request.param()
    assert listed.neighbor_list and not all_pairs.neighbor_list
    params = listed.params
    n, dim = x.shape
    hessian = jax.jit(jax.hessian(all_pairs.energy))(x, params).reshape(n * dim, n * dim)
    return {"all_pairs": all_pairs, "listed": listed, "x": x, "H": np.asarray(hessian)}


def test_hessian_vector_products_are_jaxs(case) -> None:
    listed, x, params = case["listed"], case["x"], case["listed"].params
    assert float(listed.energy(x, params)) == pytest.approx(float(case["all_pairs"].energy(x, params)), rel=RTOL)
    gradient = jax.grad(listed.energy.bind(listed.energy.freeze(x, params)))
    v = jax.random.normal(jax.random.PRNGKey(0), x.shape)
    expected = (case["H"] @ np.asarray(v).ravel()).reshape(x.shape)
    reference = jax.jvp(lambda y: jax.grad(case["all_pairs"].energy)(y, params), (x,), (v,))[1]
    assert rel_err(reference, expected) <= RTOL
    hvp = jax.jit(lambda y, w: jax.jvp(lambda z: gradient(z, params), (y,), (w,))[1])(x, v)
    assert rel_err(hvp, reference) <= RTOL
    linearised = jax.linearize(lambda z: gradient(z, params), x)[1]
    assert rel_err(jax.jit(linearised)(v), reference) <= RTOL


def test_blocks_and_diagonal_are_the_dense_hessians(case) -> None:
    listed, x = case["listed"], case["x"]
    n, dim = x.shape
    dense = case["H"].reshape(n, dim, n, dim)
    expected = np.stack([dense[k, :, k, :] for k in range(n)])
    for system in (listed, case["all_pairs"]):
        blocks = system.hessian_blocks(x)
        assert blocks.shape == (n, dim, dim)
        assert rel_err(blocks, expected) <= RTOL
        assert rel_err(system.hessian_diagonal(x), np.diagonal(expected, axis1=1, axis2=2)) <= RTOL
