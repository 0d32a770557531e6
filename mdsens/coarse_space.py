r"""The coarse space of :class:`mdsens.linear_solve.TwoLevel`: particles grouped
into aggregates by a grid of cells, and the Galerkin coarse operator
``E = Z^T H Z`` of their rigid translations ``Z``.

CG's iterations on the Hessian of a packing grow with N: the slowest
directions are long-wavelength displacements, which a per-particle
preconditioner barely sees. Adding their coarse version, one translation per
aggregate, removes much of that growth (``scripts/bench_scale.py`` measures
it; see the benchmarks page of the documentation).

``E`` is assembled from ``3^dim dim`` Hessian-vector products, not one per
coarse unknown, by probing: the Hessian couples particles at most two
interaction ranges apart (a pair energy one range, a many-body energy through
a common neighbour two), so with cells at least that wide it couples only
aggregates in adjacent cells, and translating together every aggregate of one
"colour" (cell index modulo 3 along each axis) gives, in each aggregate,
the column of its one neighbour of that colour.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mdsens.linear_solve import BlockJacobi, TwoLevel
from mdsens.zero_modes import hvp_of

Array = jax.Array

#: Default number of aggregates, ``AGGREGATES_PER_ROOT_N sqrt(N)``: the dense coarse
#: inverse costs ``(aggregates dim)^2`` per iteration and a Hessian-vector product
#: ``N``, so the balance between fewer iterations and cheaper ones sits near
#: ``sqrt(N)`` (measured in 2D: 36, 144 and 441 to 576 aggregates were the
#: fastest at N = 1e3, 1e4 and 1e5).
AGGREGATES_PER_ROOT_N = 1.5


def _widths(positions: np.ndarray, box: np.ndarray | None) -> np.ndarray:
    """Per axis, the width of the box perpendicular to the other box vectors
    (``1 / |row d of box^-1|``), or of the positions' bounding box in free space."""
    if box is None:
        return np.ptp(positions, axis=0)
    return 1.0 / np.linalg.norm(np.linalg.inv(box), axis=1)


def grid_shape(
    n: int, positions: np.ndarray, box: np.ndarray | None, reach: float, cells: int | None = None
) -> tuple[int, ...]:
    """Cells per axis: about ``1.5 sqrt(n)`` cells in all (or ``cells`` per axis),
    each at least ``2 reach`` wide, and a multiple of 3 when more than 3 (so
    that three colours per axis tile a periodic grid)."""
    dim = positions.shape[1]
    wanted = cells if cells is not None else (AGGREGATES_PER_ROOT_N * math.sqrt(n)) ** (1.0 / dim)
    shape = []
    for width in _widths(positions, box):
        widest = int(width // (2.0 * reach)) if reach > 0 else math.inf
        m = min(wanted, widest)
        if m > 3:  # the nearest multiple of 3 that the width allows
            m = 3 * round(m / 3) if 3 * round(m / 3) <= widest else 3 * (int(m) // 3)
        shape.append(max(1, int(m)))
    return tuple(shape)


def _cells(positions: Array, box: Array | None, shape: tuple[int, ...]) -> Array:
    """The ``(N, dim)`` cell index of each particle: fractional coordinates
    (wrapped into the box) or, in free space, the position in the bounding box."""
    m = jnp.asarray(shape)
    if box is None:
        low, high = jnp.min(positions, axis=0), jnp.max(positions, axis=0)
        fraction = (positions - low) / jnp.where(high > low, high - low, 1.0)
    else:
        fraction = jnp.linalg.solve(box, positions.T).T
        fraction = fraction - jnp.floor(fraction)
    return jnp.clip(jnp.floor(fraction * m).astype(jnp.int32), 0, m - 1)


def _flat(index: Any, shape: tuple[int, ...]) -> Any:
    """Row-major flat index of ``(..., dim)`` integer indices (numpy or JAX)."""
    flat = index[..., 0]
    for d in range(1, len(shape)):
        flat = flat * shape[d] + index[..., d]
    return flat


def _colour(cell: Any, shape: tuple[int, ...]) -> Any:
    """Colour of each cell: its index modulo 3 along each axis (or the index
    itself along an axis of at most 3 cells), flattened."""
    colours = tuple(min(m, 3) for m in shape)
    return _flat(cell % np.asarray(colours), colours)


def _neighbour_table(shape: tuple[int, ...], periodic: bool) -> tuple[np.ndarray, int]:
    """``table[J, c]``: the one aggregate of colour ``c`` in or next to cell ``J``
    (``n_cells`` where there is none), and the number of colours."""
    n_cells = math.prod(shape)
    cells = np.array(list(itertools.product(*(range(m) for m in shape))))
    n_colours = math.prod(min(m, 3) for m in shape)
    table = np.full((n_cells, n_colours), n_cells)
    for offset in itertools.product((-1, 0, 1), repeat=len(shape)):
        other = cells + np.asarray(offset)
        inside = np.all((other >= 0) & (other < np.asarray(shape)), axis=1) | periodic
        other = other % np.asarray(shape)
        table[np.flatnonzero(inside), _colour(other, shape)[inside]] = _flat(other, shape)[inside]
    return table, n_colours


def coarse_operator(hvp: Any, cell: Array, shape: tuple[int, ...], periodic: bool) -> tuple[Array, Array]:
    """``(aggregates, E)``: each particle's aggregate (its flat cell index) and
    ``E = Z^T H Z``, shape ``(n dim, n dim)`` for ``n`` cells, from ``3^dim dim``
    products ``hvp(v)`` (``v`` of shape ``(N, dim)``)."""
    n_cells, dim = math.prod(shape), cell.shape[1]
    aggregates, colour = _flat(cell, shape), _colour(cell, shape)
    table, n_colours = _neighbour_table(shape, periodic)
    unit = jnp.eye(dim, dtype=jnp.float64)

    def probe(c: Array) -> Array:
        # (dim, n_cells, dim): [d, J, e] = sum over J's particles of (H v_cd)_e.
        def column(d: Array) -> Array:
            v = jnp.where((colour == c)[:, None], unit[d], 0.0)
            return jax.ops.segment_sum(hvp(v), aggregates, n_cells)

        return jax.lax.map(column, jnp.arange(dim))

    columns = jax.lax.map(probe, jnp.arange(n_colours))
    E = jnp.zeros((n_cells, dim, n_cells + 1, dim))  # the extra column takes the "none" entries
    for c in range(n_colours):
        E = E.at[np.arange(n_cells), :, table[:, c], :].set(jnp.transpose(columns[c], (1, 2, 0)))
    E = E[:, :, :n_cells, :].reshape(n_cells * dim, n_cells * dim)
    return aggregates, 0.5 * (E + E.T)


def pseudo_inverse(matrix: Array, rcond: float = 1e-10) -> Array:
    """``matrix^+`` of a symmetric positive semi-definite matrix, on its
    eigenvalues above ``rcond`` times the largest (the coarse operator's null
    space: rigid translations of the whole system, aggregates of rattlers)."""
    eigenvalues, vectors = jnp.linalg.eigh(matrix)
    keep = eigenvalues > rcond * jnp.max(eigenvalues)
    inverse = jnp.where(keep, 1.0 / jnp.where(keep, eigenvalues, 1.0), 0.0)
    return (vectors * inverse) @ vectors.T


def two_level(system: Any, positions: Array, params: Any, cells: int | None = None) -> TwoLevel:
    """The :class:`~mdsens.linear_solve.TwoLevel` preconditioner of ``system``'s
    Hessian at ``positions`` (see :meth:`mdsens.System.two_level_preconditioner`)."""
    if system.interaction_range is None:
        raise ValueError(
            "two_level_preconditioner needs the system's interaction_range (the coarse operator "
            "is probed cell by cell); give System.from_energy an interaction_range, or use BlockJacobi."
        )
    box = system.box_at(params)
    reach = float(system.interaction_range(params))
    host_box = None if box is None else np.asarray(box)
    shape = grid_shape(system.n, np.asarray(positions), host_box, reach, cells)
    blocks = system.hessian_blocks(positions, params)
    aux = system.energy.freeze(positions, params)
    aggregates, inverse = _assemble(system.energy, aux, positions, params, box, shape)
    return TwoLevel(BlockJacobi(blocks), aggregates, inverse)


@jax.jit(static_argnums=(0, 5))
def _assemble(energy: Any, aux: Any, positions: Array, params: Any, box: Array | None, shape: tuple[int, ...]):
    hvp = hvp_of(energy.bind(aux), positions, params)
    aggregates, E = coarse_operator(hvp, _cells(positions, box, shape), shape, box is not None)
    return aggregates, pseudo_inverse(E)
