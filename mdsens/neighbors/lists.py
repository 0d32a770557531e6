"""Neighbor lists: the :class:`Neighbors` value, its allocation on the host,
its traceable builds and skin-rule updates, and its validity flags.

Lists are jax-md ``OrderedSparse`` neighbor lists (each pair once) built here
from jax-md's cell list, in fractional coordinates wrapped into the unit
cell, with the same pairs in the same order as jax-md's own build but without
its running sum and scatter over every candidate (:func:`_compact`). Nothing
here knows the pair energy: functions take the positions, the box, the list
cutoff and the current interaction range as arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

#: The builders in :mod:`mdsens.systems` use a neighbor list when ``n`` exceeds this.
NEIGHBOR_LIST_THRESHOLD = 2000
#: Default skin, as a fraction of the largest interaction range.
DEFAULT_SKIN_FRACTION = 0.25
#: Default pair-capacity headroom of a fresh allocation, before rounding up
#: (:func:`_round_capacity`, up to 12.5% more). Small: a relaxation from a random start
#: holds more pairs at its start than later, every pair slot costs in every step, and an
#: overflow is still exact (reallocated on the host).
DEFAULT_CAPACITY_MULTIPLIER = 1.1
#: Cell-occupancy headroom of every allocation. Cells cost only in rebuilds, and their
#: capacity sets the order of the pairs, hence the rounding of every sum over them.
CELL_CAPACITY_MULTIPLIER = 1.5
#: Most host reallocations in one relaxation.
MAX_REALLOCATIONS = 10

# Flags of Neighbors.flags (sticky, OR-ed).
OVERFLOW, OUT_OF_RANGE, WRONG_BOX = 1, 2, 4
# Lists are built with a cutoff larger by this relative margin than the one they are
# trusted for (and cells are that much thicker): rounding cannot lose a pair.
_CUTOFF_MARGIN = 1e-5
_BOX_RTOL = 1e-12


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Neighbors:
    """An allocated neighbor list (a pytree; its capacity is static, so a new
    capacity recompiles the functions it is passed to).

    Attributes:
        pairs: the jax-md ``NeighborList`` (``OrderedSparse``: ``pairs.idx`` is
            ``(2, capacity)``, padded with ``N``; ``pairs.reference_position``
            holds the wrapped fractional positions of the last rebuild).
        i, j: the pairs as index arrays (``i`` ascending, ``j < i``), padding
            replaced by ``N - 1``; ``mask`` marks the real pairs.
        reference: the positions of the last rebuild, as given (not wrapped):
            the skin rule measures displacements from them.
        flags: int32 bit set, sticky: 1 capacity overflow, 2 interaction range
            reached the list cutoff, 4 call-time box differs from ``box``.
        rebuilds: how many times the list was rebuilt since allocation.
        cutoff: the list cutoff ``C`` (largest range at allocation plus skin).
        box: the box the list was built for, as nested tuples.
    """

    # Arrays, or None in a static template (static_template).
    pairs: Any
    i: Any
    j: Any
    mask: Any
    reference: Any
    flags: Any
    rebuilds: Any
    cutoff: float = dataclasses.field(metadata=dict(static=True))
    box: tuple = dataclasses.field(metadata=dict(static=True))

    @property
    def capacity(self) -> int:
        return int(self.pairs.max_occupancy)

    @property
    def valid(self) -> Array:
        return self.flags == 0

    @property
    def n_pairs(self) -> Array:
        return jnp.sum(self.mask)

    def replace_indices(self, n: int) -> Neighbors:
        """With ``i``, ``j``, ``mask`` recomputed from ``pairs`` (after a rebuild)."""
        i, j, mask = _pair_indices(self.pairs, n)
        return dataclasses.replace(self, i=i, j=j, mask=mask)


def _pair_indices(pairs: Any, n: int) -> tuple[Array, Array, Array]:
    mask = pairs.idx[0] < n
    return jnp.where(mask, pairs.idx[1], n - 1), jnp.where(mask, pairs.idx[0], n - 1), mask


# ---------------------------------------------------------------------- boxes


def as_box(box: Any, dim: int) -> np.ndarray:
    """``box`` as a checked ``(dim, dim)`` float64 host array (finite, positive
    volume, upper triangular); ``ValueError`` otherwise."""
    box = np.asarray(box, dtype=np.float64)
    if box.shape != (dim, dim):
        raise ValueError(f"params['box'] must be a ({dim}, {dim}) matrix for a neighbor list; got shape {box.shape}.")
    if not np.all(np.isfinite(box)) or np.linalg.det(box) <= 0:
        raise ValueError("params['box'] must be a finite box matrix with positive volume.")
    if np.any(np.tril(box, -1) != 0):
        raise ValueError("neighbor lists need an upper-triangular box matrix (jax-md's convention).")
    return box


def _box_key(box: np.ndarray) -> tuple:
    return tuple(tuple(float(v) for v in row) for row in box)


def matvec_rows(matrix: Array, rows: Array) -> list[Array]:
    """Components of ``rows @ matrix.T`` as elementwise sums: a (P, dim) x (dim, dim)
    product is slow as a matrix multiplication on CPU (library call per tiny dot)."""
    dim = rows.shape[-1]
    comps = [rows[..., k] for k in range(dim)]
    return [functools.reduce(operator.add, [comps[k] * matrix[a, k] for k in range(dim)]) for a in range(dim)]


def _fractional(box_inverse: Array, positions: Array) -> Array:
    s = jnp.stack(matvec_rows(box_inverse, positions), axis=-1)
    return s - jnp.floor(s)


# ------------------------------------------------------------- cell lists


def _round_capacity(capacity: int) -> int:
    """``capacity`` rounded up to ``m 2^k`` with ``8 <= m <= 16`` (at most 12.5%
    padding; exact up to 16): capacities are static, so lists allocated for
    similar states then share their compiled functions."""
    shift = max(int(capacity).bit_length() - 4, 0)
    return -(-int(capacity) >> shift) << shift


def _cells_per_side(box: np.ndarray, list_cutoff: float) -> int:
    """Cells per side of the fractional cell grid whose cells are at least
    ``list_cutoff`` thick in every direction (the distance between opposite
    faces of the box along axis ``k`` is ``1 / |row k of box^-1|``)."""
    widths = 1.0 / np.linalg.norm(np.linalg.inv(box), axis=1)
    cells = int(np.floor(np.min(widths) / (list_cutoff * (1.0 + _CUTOFF_MARGIN))))
    if cells < 3:
        raise ValueError(
            f"a neighbor list needs a box at least three list cutoffs ({list_cutoff:.4g}) wide; "
            f"this one is {np.min(widths):.4g} wide: use the all-pairs energy (neighbor_list=False)."
        )
    return cells


@functools.lru_cache(maxsize=32)
def _list_fns(box_key: tuple, list_cutoff: float, cells: int) -> tuple[Any, Callable]:
    """``(template, prepare)`` for one box, cutoff and cell grid, cached so that
    lists of the same box and cutoff share their static fields (no
    recompilation): a jax-md ``OrderedSparse`` list without arrays or
    capacities (its cell list, in fractional coordinates; mdsens builds it,
    :func:`_built`), and ``prepare(positions) -> (fractional positions,
    fullest cell's occupancy)``."""
    from jax_md import partition  # imported on first use: importing jax-md takes seconds

    box = np.asarray(box_key, dtype=np.float64)
    # A minimum cell size a little below 1 / cells, so that jax-md's floor gives `cells`.
    minimum = 1.0 / (cells + 0.5)
    template = partition.NeighborList(
        None,
        None,
        None,
        None,
        None,
        partition.OrderedSparse,
        1.0 / cells,
        partition.cell_list(1.0, minimum),
        None,
    )

    @jax.jit
    def prepare(positions):
        s = _fractional(jnp.asarray(np.linalg.inv(box)), positions)
        return s, jnp.max(partition.count_cell_filling(s, 1.0, minimum))

    return template, prepare


def _candidates(pairs: Any, s: Array, box: np.ndarray, list_cutoff: float) -> tuple[Array, Array, Array]:
    """Each particle's candidate partners at wrapped fractional positions ``s``:
    ``(ids, within, cell_overflow)``. ``ids`` is ``(N, 3^dim cell_capacity)``: the
    particles in the 3^dim cells around its own, in jax-md's order (its cell list,
    with the capacity of ``pairs``); ``within`` marks the partners ``j < i`` closer
    than ``list_cutoff`` (with the rounding margin)."""
    from jax_md import partition

    n, dim = s.shape
    capacity = pairs.cell_list_capacity
    cells = pairs.cell_list_fn.update(s, capacity)
    side = cells.id_buffer.shape[0]
    around = jnp.mod(cells.particle_cell_id[:, None, :] + partition._neighboring_cells_arr(dim)[None], side)
    cell = functools.reduce(operator.add, [around[..., k] * side**k for k in range(dim)]).reshape(-1)
    ids = cells.id_buffer.reshape(-1, capacity)[cell].reshape(n, -1)
    ds = s[:, None, :] - cells.position_buffer.reshape(-1, capacity, dim)[cell].reshape(n, -1, dim)
    dr = matvec_rows(jnp.asarray(box), ds - jnp.round(ds))
    distance_squared = functools.reduce(operator.add, [c * c for c in dr])
    within = (distance_squared < (list_cutoff * (1.0 + _CUTOFF_MARGIN)) ** 2) & (ids < jnp.arange(n)[:, None])
    return ids, within, cells.did_buffer_overflow


def _bit_words(within: Array) -> Array:
    """Each row of the boolean ``(N, K)`` array ``within`` as ``ceil(K / 32)`` uint32
    words (bit ``b`` of word ``w`` is column ``32 w + b``): one pass over the
    candidates; every later step works on these."""
    n, width = within.shape
    words = -(-width // 32)
    padded = jnp.pad(within, ((0, 0), (0, 32 * words - width))).reshape(n, words, 32).astype(jnp.uint32)
    return jnp.sum(padded << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def _compact(ids: Array, within: Array, capacity: int) -> tuple[Array, Array]:
    """The marked candidates as a ``(2, capacity)`` jax-md ``OrderedSparse`` index
    (partners, particles; padded with N), in row-major order, and how many there
    are. Each output slot finds its candidate from the rows' bit words: its row
    by the rows' running totals, its word by the word counts, its bit by
    bisection with population counts. No scatter or running sum over the
    ``N x K`` candidates (both are slow on CPU), only ``capacity``-sized gathers."""
    n, width = ids.shape
    bits = _bit_words(within)
    word_counts = jax.lax.population_count(bits).astype(jnp.int32)
    before_word = jnp.cumsum(word_counts, axis=1) - word_counts  # marked bits in the row's earlier words
    ends = jnp.cumsum(jnp.sum(word_counts, axis=1))
    slot = jnp.arange(capacity, dtype=jnp.int32)
    # row(slot) = number of rows ending at or before it (rows may be empty).
    row = jnp.cumsum(jnp.zeros(capacity + 1, jnp.int32).at[jnp.minimum(ends, capacity)].add(1))[:capacity]
    real = row < n
    row = jnp.minimum(row, n - 1)
    rank = slot - ends[row] + jnp.sum(word_counts[row], axis=1)  # the slot is its row's rank-th marked candidate
    word = jnp.sum(before_word[row] <= rank[:, None], axis=1) - 1
    rank = (rank - before_word[row, word]).astype(jnp.uint32)
    bits = bits[row, word]
    lo, hi = jnp.zeros_like(rank), jnp.full_like(rank, 31)
    for _ in range(5):  # lowest bit b with more than rank marked bits in 0..b
        mid = (lo + hi) // 2
        past = jax.lax.population_count(bits & (jnp.uint32(0xFFFFFFFF) >> (31 - mid))) > rank
        lo, hi = jnp.where(past, lo, mid + 1), jnp.where(past, mid, hi)
    partner = ids.reshape(-1)[row * width + 32 * word + lo.astype(jnp.int32)]
    return jnp.stack([jnp.where(real, partner, n), jnp.where(real, row, n)]).astype(jnp.int32), ends[-1]


def _built(pairs: Any, s: Array, box: np.ndarray, list_cutoff: float, error: Any) -> Any:
    """The jax-md list ``pairs`` (its static fields) rebuilt at ``s``, its overflow
    bits added to ``error`` (traceable)."""
    from jax_md.partition import PartitionErrorCode

    ids, within, cell_overflow = _candidates(pairs, s, box, list_cutoff)
    idx, count = _compact(ids, within, pairs.max_occupancy)
    error = error.update(PartitionErrorCode.CELL_LIST_OVERFLOW, cell_overflow)
    error = error.update(PartitionErrorCode.NEIGHBOR_LIST_OVERFLOW, count > pairs.max_occupancy)
    return dataclasses.replace(pairs, idx=idx, reference_position=s, error=error)


def _no_error() -> Any:
    from jax_md import partition

    return partition.PartitionError(jnp.zeros((), jnp.uint8))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _count(template: Any, s: Array, box_key: tuple, list_cutoff: float) -> Array:
    """How many pairs the positions ``s`` need."""
    return jnp.sum(_candidates(template, s, np.asarray(box_key), list_cutoff)[1])


@functools.partial(jax.jit, static_argnums=(2, 3))
def _first_build(template: Any, s: Array, box_key: tuple, list_cutoff: float) -> tuple[Any, Array, Array, Array]:
    pairs = _built(template, s, np.asarray(box_key), list_cutoff, _no_error())
    return (pairs, *_pair_indices(pairs, s.shape[0]))


# ------------------------------------------------------------ list life cycle


def allocate(
    positions: Array, box: np.ndarray, cutoff: float, capacity_multiplier: float, extra_capacity: int = 0
) -> Neighbors:
    """A list for ``positions`` (host only, concrete arrays) in the checked box
    ``box`` (:func:`as_box`) with list cutoff ``cutoff``: pair capacity
    ``capacity_multiplier`` times what the positions need (cell capacity
    ``CELL_CAPACITY_MULTIPLIER`` times), plus ``extra_capacity`` pairs per
    particle and particles per cell, rounded up (:func:`_round_capacity`)."""
    n = positions.shape[0]
    template, prepare = _list_fns(_box_key(box), cutoff, _cells_per_side(box, cutoff))
    # The cell capacity from the fullest cell, the pair capacity from the count of
    # pairs, then the list. (jax-md's own allocate runs op by op, and compiles each
    # op anew for every new size: seconds. These are three compiled calls.)
    s, fullest = prepare(jnp.asarray(positions))
    cell_capacity = _round_capacity(int(int(fullest) * CELL_CAPACITY_MULTIPLIER) + extra_capacity)
    template = dataclasses.replace(template, cell_list_capacity=cell_capacity)
    count = _count(template, s, _box_key(box), cutoff)
    capacity = _round_capacity(int(int(count) * capacity_multiplier) + n * extra_capacity)
    template = dataclasses.replace(template, max_occupancy=capacity)
    pairs, i, j, mask = _first_build(template, s, _box_key(box), cutoff)
    flags = jnp.asarray(OVERFLOW if bool(pairs.did_buffer_overflow) else 0, jnp.int32)
    return Neighbors(pairs, i, j, mask, jnp.asarray(positions), flags, jnp.zeros((), jnp.int32), cutoff, _box_key(box))


def trim(neighbors: Neighbors, capacity_multiplier: float) -> Neighbors:
    """``neighbors`` with pair capacity ``capacity_multiplier`` times the pairs it
    holds (rounded up, :func:`_round_capacity`), if that is smaller (host only).
    Its pairs fill the first slots (:func:`_compact`), so it keeps them, in
    their order, with their reference positions and cell list."""
    capacity = _round_capacity(int(int(jnp.sum(neighbors.mask)) * capacity_multiplier))
    if capacity >= neighbors.capacity:
        return neighbors
    pairs = dataclasses.replace(neighbors.pairs, idx=neighbors.pairs.idx[:, :capacity], max_occupancy=capacity)
    i, j, mask = (a[:capacity] for a in (neighbors.i, neighbors.j, neighbors.mask))
    return dataclasses.replace(neighbors, pairs=pairs, i=i, j=j, mask=mask)


def static_template(neighbors: Neighbors) -> Neighbors:
    """``neighbors`` with only its static parts (capacities, cell list, update
    function, cutoff, box): what :func:`build` needs, without array constants
    that would end up in compiled functions."""
    return Neighbors(
        dataclasses.replace(neighbors.pairs, idx=None, reference_position=None, error=None),
        None,
        None,
        None,
        None,
        None,
        None,
        neighbors.cutoff,
        neighbors.box,
    )


def build(template: Neighbors, positions: Array, reach: Array, box: Array) -> Neighbors:
    """A list built from scratch at ``positions`` with the capacities, cutoff
    and box of ``template`` (:func:`static_template`; traceable), flagged at
    interaction range ``reach`` and call-time box ``box``."""
    n = positions.shape[0]
    list_box = jnp.asarray(template.box, dtype=positions.dtype)
    s = _fractional(jnp.linalg.inv(list_box), positions)
    pairs = _built(template.pairs, s, np.asarray(template.box), template.cutoff, _no_error())
    indices = _pair_indices(pairs, n)
    neighbors = Neighbors(pairs, *indices, positions, None, jnp.zeros((), jnp.int32), template.cutoff, template.box)
    return dataclasses.replace(neighbors, flags=flags_at(neighbors, reach, box))


def update(neighbors: Neighbors, positions: Array, reach: Array, box: Array) -> Neighbors:
    """The list for ``positions`` at interaction range ``reach`` and call-time
    box ``box`` (traceable, fixed capacity): rebuilt if the skin rule
    ``reach + 2 max|x - x_ref| < cutoff`` fails, flagged if it cannot hold them."""
    n = positions.shape[0]
    # Displacements since the last rebuild as they are (positions are never
    # wrapped, so no minimum image: fewer operations in every step; a particle
    # moved by a box vector only causes an early rebuild).
    moved = jnp.max(jnp.sum((positions - neighbors.reference) ** 2, axis=-1))
    # R + 2 max|dx| < C, squared without the square root.
    stale = 4.0 * moved >= (neighbors.cutoff - reach) ** 2

    def rebuild(old: Neighbors) -> Neighbors:
        s = _fractional(jnp.asarray(np.linalg.inv(np.asarray(old.box))), positions)
        pairs = _built(old.pairs, s, np.asarray(old.box), old.cutoff, old.pairs.error)
        return dataclasses.replace(old, pairs=pairs, reference=positions, rebuilds=old.rebuilds + 1).replace_indices(n)

    neighbors = jax.lax.cond(stale, rebuild, lambda old: old, neighbors)
    return dataclasses.replace(neighbors, flags=flags_at(neighbors, reach, box))


def flags_at(neighbors: Neighbors, reach: Array, box: Array) -> Array:
    """The sticky flags of ``neighbors`` OR-ed with its state at interaction
    range ``reach`` and call-time box ``box`` (traceable)."""
    list_box = jnp.asarray(neighbors.box, dtype=jnp.asarray(reach).dtype)
    overflow = neighbors.pairs.did_buffer_overflow != 0
    wrong_box = jnp.max(jnp.abs(box - list_box)) > _BOX_RTOL * jnp.max(jnp.abs(list_box))
    flags = jnp.where(overflow, OVERFLOW, 0) | jnp.where(reach >= neighbors.cutoff, OUT_OF_RANGE, 0)
    flags = flags | jnp.where(wrong_box, WRONG_BOX, 0)
    base = 0 if neighbors.flags is None else neighbors.flags
    return (base | flags).astype(jnp.int32)


def describe(flags: int) -> str:
    """Human-readable reasons of a ``Neighbors.flags`` value."""
    reasons = []
    if flags & OVERFLOW:
        reasons.append("the neighbor list overflowed its capacity")
    if flags & OUT_OF_RANGE:
        reasons.append(
            "the interaction range reached the neighbor-list cutoff "
            "(parameters changed the range by more than the skin)"
        )
    if flags & WRONG_BOX:
        reasons.append("params['box'] is not the box the neighbor list was built for")
    return "; ".join(reasons) or "valid"


def use_neighbor_list(n: int, neighbor_list: bool | None) -> bool:
    """The builders' rule: a neighbor list if asked, or if ``n > NEIGHBOR_LIST_THRESHOLD``."""
    if neighbor_list is None:
        return n > NEIGHBOR_LIST_THRESHOLD
    if not isinstance(neighbor_list, (bool, np.bool_)):
        raise ValueError(f"neighbor_list must be True, False or None; got {neighbor_list!r}.")
    return bool(neighbor_list)
