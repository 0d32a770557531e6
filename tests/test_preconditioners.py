"""Block-Jacobi preconditioning (System.hessian_blocks, mdsens.linear_solve.BlockJacobi)
against dense references: the blocks are the dense Hessian's diagonal blocks (all
pairs and neighbor lists, through the energy protocol), the preconditioner is the
blockwise pseudo-inverse, and CG with it gives the dense pseudo-inverse's
sensitivity in fewer iterations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import mdsens
import mdsens.testing
from mdsens import systems
from mdsens.linear_solve import BlockJacobi

N = 64


@pytest.fixture(scope="module")
def packing():
    """A relaxed 2D packing (with rattlers' zero blocks possible) and its dense Hessian."""
    system = systems.soft_sphere_packing(N, dim=2, phi=0.9, seed=0)
    x = mdsens.relax(system).positions
    reference = mdsens.testing.dense_reference(system.energy, x, system.params)
    return system, x, reference


def diagonal_blocks(hessian: np.ndarray, dim: int) -> np.ndarray:
    n = hessian.shape[0] // dim
    return np.stack([hessian[k * dim : (k + 1) * dim, k * dim : (k + 1) * dim] for k in range(n)])


@pytest.mark.parametrize("neighbor_list", [False, True])
def test_blocks_are_the_dense_diagonal_blocks(packing, neighbor_list) -> None:
    system, x, reference = packing
    if neighbor_list:
        system = systems.soft_sphere_packing(N, dim=2, phi=0.9, seed=0, neighbor_list=True)
    assert system.neighbor_list == neighbor_list
    blocks = system.hessian_blocks(x)
    expected = diagonal_blocks(reference.H, 2)
    assert blocks.shape == (N, 2, 2)
    np.testing.assert_allclose(blocks, expected, rtol=0, atol=1e-12 * np.max(np.abs(expected)))
    # The diagonal (Jacobi's) is the blocks' diagonal, by either path.
    np.testing.assert_allclose(
        system.hessian_diagonal(x), np.diagonal(expected, axis1=1, axis2=2), rtol=0, atol=1e-12 * np.max(expected)
    )


def test_blocks_off_equilibrium_in_3d() -> None:
    system = systems.soft_sphere_packing(27, dim=3, phi=0.7, seed=1)
    x = system.positions  # random start: overlapping, indefinite blocks possible
    hessian = jax.hessian(lambda y: system.energy(y, system.params))(x).reshape(81, 81)
    np.testing.assert_allclose(system.hessian_blocks(x), diagonal_blocks(np.asarray(hessian), 3), atol=1e-12)


def test_preconditioner_is_the_blockwise_pseudo_inverse() -> None:
    rotation = np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    blocks = np.stack([rotation @ np.diag([2.0, 0.5]) @ rotation.T, np.zeros((2, 2)), np.diag([4.0, 0.0])])
    r = jnp.arange(1.0, 7.0)
    expected = np.concatenate(
        [
            np.linalg.pinv(b, rcond=1e-10, hermitian=True) @ np.asarray(r[2 * k : 2 * k + 2])
            for k, b in enumerate(blocks)
        ]
    )
    np.testing.assert_allclose(BlockJacobi(jnp.asarray(blocks))(r), expected, rtol=1e-14, atol=1e-14)


def test_cg_with_block_jacobi_is_exact_and_faster(packing) -> None:
    system, x, reference = packing
    tangent = jax.tree_util.tree_map(jnp.zeros_like, system.params)
    tangent["diameters"] = jnp.ones_like(system.params["diameters"])
    truth = reference.J @ ravel_pytree(tangent)[0]
    iterations = {}
    for name, preconditioner in [("none", None), ("block", BlockJacobi(system.hessian_blocks(x)))]:
        adjoint = mdsens.Implicit(solver=mdsens.CG(preconditioner=preconditioner))
        dx, info = mdsens.sensitivity_at(system, x, system.params, tangent, adjoint=adjoint)
        assert bool(info.converged), info.reason
        assert mdsens.testing.relative_error(np.asarray(dx).ravel(), truth) <= 1e-9
        iterations[name] = int(info.iterations)
    assert iterations["block"] < iterations["none"]


def test_only_known_preconditioners_are_accepted() -> None:
    with pytest.raises(ValueError, match="BlockJacobi"):
        mdsens.CG(preconditioner=lambda r: r)
