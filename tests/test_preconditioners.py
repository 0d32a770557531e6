"""Block-Jacobi and two-level preconditioning (System.hessian_blocks, BlockJacobi,
System.two_level_preconditioner, TwoLevel) against dense references: the blocks
are the dense Hessian's diagonal blocks (all pairs and neighbor lists, through the
energy protocol), the preconditioner is the blockwise pseudo-inverse, the probed
coarse operator is the Galerkin one Z^T H Z, and CG with either gives the dense
pseudo-inverse's sensitivity in fewer iterations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import mdsens
import mdsens.testing
from mdsens import coarse_space, systems
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


def cg_iterations_of_exact_solves(packing, preconditioners: dict) -> dict[str, int]:
    """CG's iterations for dx*/d(all diameters) with each preconditioner, after
    checking each answer against the dense pseudo-inverse's (1e-9)."""
    system, x, reference = packing
    tangent = jax.tree_util.tree_map(jnp.zeros_like, system.params)
    tangent["diameters"] = jnp.ones_like(system.params["diameters"])
    truth = reference.J @ ravel_pytree(tangent)[0]
    iterations = {}
    for name, preconditioner in preconditioners.items():
        adjoint = mdsens.Implicit(solver=mdsens.CG(preconditioner=preconditioner))
        dx, info = mdsens.sensitivity_at(system, x, system.params, tangent, adjoint=adjoint)
        assert bool(info.converged), info.reason
        assert mdsens.testing.relative_error(np.asarray(dx).ravel(), truth) <= 1e-9
        iterations[name] = int(info.iterations)
    return iterations


def test_cg_with_block_jacobi_is_exact_and_faster(packing) -> None:
    system, x, _ = packing
    iterations = cg_iterations_of_exact_solves(packing, {"none": None, "block": BlockJacobi(system.hessian_blocks(x))})
    assert iterations["block"] < iterations["none"]


def test_only_known_preconditioners_are_accepted() -> None:
    with pytest.raises(ValueError, match="BlockJacobi"):
        mdsens.CG(preconditioner=lambda r: r)


# ------------------------------------------------------------------ two-level


def translations_of_aggregates(aggregates: np.ndarray, dim: int) -> np.ndarray:
    """``Z``: column ``(a, d)`` translates aggregate ``a`` along axis ``d``."""
    n_aggregates = int(aggregates.max()) + 1
    Z = np.zeros((aggregates.size, dim, n_aggregates, dim))
    for d in range(dim):
        Z[np.arange(aggregates.size), d, aggregates, d] = 1.0
    return Z.reshape(aggregates.size * dim, n_aggregates * dim)


def positive_part_pseudo_inverse(matrix: np.ndarray, cutoff: float | None = None) -> np.ndarray:
    """The inverse on the eigenvalues above ``cutoff`` (default 1e-10 times the
    largest), zero on the others (negative ones included: a preconditioner must
    stay positive)."""
    eigenvalues, vectors = np.linalg.eigh(0.5 * (matrix + matrix.T))
    keep = eigenvalues > (1e-10 * np.max(eigenvalues) if cutoff is None else cutoff)
    return (vectors * np.where(keep, 1.0 / np.where(keep, eigenvalues, 1.0), 0.0)) @ vectors.T


def free_soft_discs(n: int = 200, side: float = 13.0) -> mdsens.System:
    """Harmonic unit discs squeezed into a square, in free space (no box)."""

    def energy(x, params):
        dr = x[:, None, :] - x[None, :, :]
        r = jnp.sqrt(jnp.sum(dr**2, axis=-1) + jnp.eye(x.shape[0]))
        overlap = jnp.where(r < params["sigma"], 1.0 - r / params["sigma"], 0.0) * (1.0 - jnp.eye(x.shape[0]))
        return 0.25 * jnp.sum(overlap**2)

    x = jax.random.uniform(jax.random.PRNGKey(3), (n, 2), jnp.float64, 0.0, side)
    return mdsens.System.from_energy(
        energy, {"sigma": jnp.asarray(1.0)}, x, interaction_range=lambda params: params["sigma"]
    )


@pytest.fixture(scope="module")
def big_packing():
    """A relaxed 2D packing wide enough for a 6 x 6 grid of cells, its dense reference."""
    system = systems.soft_sphere_packing(256, dim=2, phi=0.9, seed=2)
    x = mdsens.relax(system).positions
    return system, x, mdsens.testing.dense_reference(system.energy, x, system.params)


@pytest.mark.parametrize("case", ["periodic", "neighbor_list", "free_space"])
def test_two_level_is_block_jacobi_plus_the_galerkin_coarse_correction(big_packing, case) -> None:
    """M r = B^+ r + Z (Z^T H Z)^+ Z^T r, against the dense Hessian: the probed coarse
    operator is the Galerkin one, for a periodic grid (6 x 6: three colours per
    axis, wrapping) and a free-space grid."""
    if case == "free_space":
        system = free_soft_discs()
        x = system.positions  # squeezed, off equilibrium: the Hessian is all that matters
        hessian = np.asarray(jax.hessian(lambda y: system.energy(y, system.params))(x)).reshape(x.size, x.size)
    else:
        system, x, reference = big_packing
        hessian = reference.H
        if case == "neighbor_list":
            system = systems.soft_sphere_packing(256, dim=2, phi=0.9, seed=2, neighbor_list=True)
    preconditioner = system.two_level_preconditioner(x, cells=6)
    assert isinstance(preconditioner, mdsens.TwoLevel)
    aggregates = np.asarray(preconditioner.aggregates)
    assert np.unique(aggregates).size > 9  # more than one colour's worth of cells holds particles
    Z = translations_of_aggregates(aggregates, 2)
    coarse = Z.T @ hessian @ Z
    expected_inverse = positive_part_pseudo_inverse(coarse)
    n_cells = preconditioner.coarse_inverse.shape[0] // 2
    assert n_cells == 36
    used = slice(0, Z.shape[1])  # cells past the highest occupied one hold no particle
    np.testing.assert_allclose(
        preconditioner.coarse_inverse[used, used], expected_inverse, atol=1e-10 * np.max(np.abs(expected_inverse))
    )
    r = jax.random.normal(jax.random.PRNGKey(0), (x.size,), jnp.float64)
    blocks = diagonal_blocks(hessian, 2)
    # Blocks are cut off relative to the largest eigenvalue of all of them.
    cutoff = 1e-10 * np.max(np.abs(np.linalg.eigvalsh(blocks)))
    smoothed = np.concatenate(
        [positive_part_pseudo_inverse(b, cutoff) @ r[2 * k : 2 * k + 2] for k, b in enumerate(blocks)]
    )
    expected = smoothed + Z @ expected_inverse @ Z.T @ np.asarray(r)
    np.testing.assert_allclose(preconditioner(r), expected, atol=1e-10 * np.max(np.abs(expected)))


def test_aggregates_are_the_cells_of_the_grid(big_packing) -> None:
    system, x, _ = big_packing
    aggregates = np.asarray(system.two_level_preconditioner(x, cells=6).aggregates)
    fraction = np.linalg.solve(np.asarray(system.params["box"]), np.asarray(x).T).T % 1.0
    cell = np.floor(fraction * 6).astype(int)
    np.testing.assert_array_equal(aggregates, cell[:, 0] * 6 + cell[:, 1])


def test_cg_with_two_level_is_exact_and_faster_than_block_jacobi(big_packing) -> None:
    system, x, _ = big_packing
    preconditioners = {
        "block": BlockJacobi(system.hessian_blocks(x)),
        "two_level": system.two_level_preconditioner(x, cells=6),
    }
    iterations = cg_iterations_of_exact_solves(big_packing, preconditioners)
    assert iterations["two_level"] < iterations["block"]


def test_grid_cells_are_wide_enough_and_tile_in_threes() -> None:
    box = np.diag([20.0, 9.0])
    positions = np.zeros((10_000, 2))
    # Default: 1.5 sqrt(10000) = 150 cells, 12.2 per axis; at most 20 / 2 = 10 -> 9 and 9 / 2 = 4 -> 3.
    assert coarse_space.grid_shape(10_000, positions, box, 1.0) == (9, 3)
    assert coarse_space.grid_shape(10_000, positions, box, 1.0, cells=2) == (2, 2)
    assert coarse_space.grid_shape(10, positions, box, 1.0) == (2, 2)  # 1.5 sqrt(10) = 4.7 cells
    assert coarse_space.grid_shape(10_000, positions, box, 5.0) == (2, 1)  # 20 / 10 and 9 / 10 cells
    # A sheared box (columns (20, 0) and (7, 9)): widths 180 / |(7, 9)| = 15.8 and 9.
    assert coarse_space.grid_shape(10_000, positions, np.array([[20.0, 7.0], [0.0, 9.0]]), 1.0) == (6, 3)
    # Free space: the positions' extent.
    spread = np.array([[0.0, 0.0], [40.0, 3.0]])
    assert coarse_space.grid_shape(10_000, spread, None, 1.0, cells=30) == (18, 1)


def test_two_level_needs_the_interaction_range() -> None:
    system = systems.lennard_jones_cluster(8, dim=2)
    with pytest.raises(ValueError, match="interaction_range"):
        system.two_level_preconditioner()
