"""Neighbor lists: the :class:`Neighbors` value, its allocation on the host,
its traceable builds and skin-rule updates, and its validity flags.

Lists come from jax-md cell lists (``partition.neighbor_list``,
``OrderedSparse``: each pair once) in fractional coordinates wrapped into the
unit cell. Nothing here knows the pair energy: functions take the positions,
the box, the list cutoff and the current interaction range as arguments.
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
    recompilation): a jax-md list without arrays or capacities (its update
    function and cell list, in fractional coordinates), and
    ``prepare(positions) -> (fractional positions, fullest cell's occupancy)``."""
    from jax_md import partition  # imported on first use: importing jax-md takes seconds

    box = np.asarray(box_key, dtype=np.float64)

    def displacement(sa, sb, **unused):
        ds = sa - sb
        return jnp.asarray(box) @ (ds - jnp.round(ds))

    # dr_threshold=0: update always rebuilds; mdsens decides when (the skin rule).
    fns = partition.neighbor_list(
        displacement,
        box,
        list_cutoff * (1.0 + _CUTOFF_MARGIN),
        dr_threshold=0.0,
        fractional_coordinates=True,
        format=partition.OrderedSparse,
    )
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
        fns.update,
    )

    @jax.jit
    def prepare(positions):
        s = _fractional(jnp.asarray(np.linalg.inv(box)), positions)
        return s, jnp.max(partition.count_cell_filling(s, 1.0, minimum))

    return template, prepare


def _blank_pairs(template: Any, positions: Array, n: int) -> Any:
    """A jax-md list with the static fields (capacities) of ``template`` holding
    no pairs; ``.update`` builds it (traceable)."""
    from jax_md import partition

    return dataclasses.replace(
        template,
        idx=jnp.full((2, template.max_occupancy), n, jnp.int32),
        reference_position=positions,
        error=partition.PartitionError(jnp.zeros((), jnp.uint8)),
    )


@jax.jit
def _all_pairs_within(template: Any, positions: Array) -> tuple[Any, Array]:
    """A list built at ``positions`` with room for every candidate (the static
    fields of ``template``), and how many pairs it holds (first, in order)."""
    n = positions.shape[0]
    pairs = _blank_pairs(template, positions, n).update(positions)
    return pairs, jnp.sum(pairs.idx[0] < n)


@functools.partial(jax.jit, static_argnums=1)
def _truncated(pairs: Any, capacity: int) -> tuple[Any, Array, Array, Array]:
    """``pairs`` cut (or padded) to ``capacity``, and its indices."""
    n = pairs.reference_position.shape[0]
    idx = jnp.pad(pairs.idx, ((0, 0), (0, max(capacity - pairs.max_occupancy, 0))), constant_values=n)
    pairs = dataclasses.replace(pairs, idx=idx[:, :capacity], max_occupancy=capacity)
    return (pairs, *_pair_indices(pairs, n))


# ------------------------------------------------------------ list life cycle


def allocate(
    positions: Array, box: np.ndarray, cutoff: float, capacity_multiplier: float, extra_capacity: int = 0
) -> Neighbors:
    """A list for ``positions`` (host only, concrete arrays) in the checked box
    ``box`` (:func:`as_box`) with list cutoff ``cutoff``: pair capacity
    ``capacity_multiplier`` times what the positions need (cell capacity
    ``CELL_CAPACITY_MULTIPLIER`` times), plus ``extra_capacity`` pairs per
    particle and particles per cell, rounded up (:func:`_round_capacity`)."""
    n, dim = positions.shape
    template, prepare = _list_fns(_box_key(box), cutoff, _cells_per_side(box, cutoff))
    # The cell capacity from the fullest cell; a list with room for every
    # candidate of the 3^dim neighbouring cells; the pair capacity from its count.
    # (jax-md's own allocate runs op by op, and compiles each op anew for every
    # new size: seconds. These are three compiled calls.)
    s, fullest = prepare(jnp.asarray(positions))
    cell_capacity = _round_capacity(int(int(fullest) * CELL_CAPACITY_MULTIPLIER) + extra_capacity)
    template = dataclasses.replace(template, cell_list_capacity=cell_capacity, max_occupancy=n * 3**dim * cell_capacity)
    pairs, count = _all_pairs_within(template, s)
    capacity = _round_capacity(int(int(count) * capacity_multiplier) + n * extra_capacity)
    pairs, i, j, mask = _truncated(pairs, capacity)
    flags = jnp.asarray(OVERFLOW if bool(pairs.did_buffer_overflow) else 0, jnp.int32)
    return Neighbors(pairs, i, j, mask, jnp.asarray(positions), flags, jnp.zeros((), jnp.int32), cutoff, _box_key(box))


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
    pairs = _blank_pairs(template.pairs, s, n).update(s)
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
        pairs = old.pairs.update(s)
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
