r"""Neighbor-list pair energies: O(N) time and memory for large periodic systems.

A :class:`NeighborListEnergy` is a pair energy

.. math:: E(x; \theta) = \sum_{i<j} \phi_{ij}(|x_i - x_j|_{\mathrm{mic}}; \theta)

summed over the pairs of a neighbor list (jax-md ``partition.neighbor_list``
built from cell lists, ``OrderedSparse`` format: each pair once) instead of
over all N^2 pairs. It is what the :mod:`mdsens.systems` builders return as
``System.energy_fn`` above :data:`NEIGHBOR_LIST_THRESHOLD` particles (or when
asked with ``neighbor_list=True``), and :func:`mdsens.relax`,
:func:`mdsens.equilibrium`, :func:`mdsens.equilibrium_jvp` and
:func:`mdsens.equilibrium_vjp` accept it unchanged. Nothing on this path holds
an ``N x N`` array: candidates come from a cell list (the box must be at least
three list cutoffs wide, else ``ValueError``), arrays have O(N) entries.

The skin rule
-------------
A list built at reference positions ``x_ref`` with list cutoff ``C`` holds every
pair closer than ``C`` at ``x_ref`` (``C = R + skin``, ``R`` the largest
interaction range at allocation, e.g. the largest diameter of soft spheres).
At positions ``x`` and parameters ``theta`` with largest range ``R(theta)`` it
holds every interacting pair as long as

.. math:: R(\theta) + 2 \max_i |x_i - x_{\mathrm{ref},i}| < C,

i.e. particles moved less than ``skin / 2`` and the parameters grew the range
by less than the skin (together: less than the skin). Every evaluation on the
neighbor-list path checks this and rebuilds the list (inside ``jit``, at fixed
capacity) when it fails. The pair set is then constant in a neighbourhood of
``(x, theta)``: the energy there is the exact all-pairs energy, so its
derivatives of every order, with respect to positions and to parameters
(diameters, although the range depends on them; the box), are exact. The
implicit derivatives of ``x*`` are derivatives at the one point ``(x*, theta)``
and use one list frozen there, valid with a margin (the relaxation's list
inside :func:`mdsens.equilibrium`; the pairs within ``R(theta) (1 + 1e-6)``
for :func:`mdsens.equilibrium_jvp` and ``_vjp``): they are exact too, and the
linear solves never rebuild. (Under ``vmap`` the rebuild ``cond`` becomes a
``select``: every step rebuilds, correct but slower.)

Overflow
--------
A list has a fixed capacity (pairs, and particles per cell), allocated on the
host outside ``jit``. A rebuild that needs more, a range ``R(theta) >= C``, or a
call-time box (``params["box"]``) that is not the box the list was built for
invalidate the list, and no number computed with it is returned:

- :func:`mdsens.relax` (called with concrete arrays) stops the step that
  invalidated its list, reallocates on the host (larger capacity, or a cutoff
  from the current parameters, or the current box) and continues from the last
  good state; under ``jit``/``vmap`` it cannot reallocate and returns
  ``reason="neighbor_overflow"`` (``converged=False``).
- ``energy_fn(positions, params)`` called on its own rebuilds a list with the
  capacity allocated at build time; if that list is invalid it returns NaN
  (and NaN derivatives) and issues a ``RuntimeWarning`` from the host.
- Inside derivatives of :func:`mdsens.equilibrium`, an overflow is an
  unconverged relaxation: ``FloatingPointError`` (``throw=True``) or NaN.

Positions are never wrapped for the energy (it uses the minimum image with the
box read from ``params["box"]`` at call time); the list is built from
fractional coordinates wrapped into the unit cell. Boxes must be upper
triangular (jax-md's convention; the builders' boxes are diagonal).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

Array = jax.Array
Params = dict[str, Array]

#: The builders in :mod:`mdsens.systems` use a neighbor list when ``n`` exceeds this.
NEIGHBOR_LIST_THRESHOLD = 2000
#: Default skin, as a fraction of the largest interaction range.
DEFAULT_SKIN_FRACTION = 0.25
#: Default capacity headroom of a fresh allocation (pairs and cell occupancy).
DEFAULT_CAPACITY_MULTIPLIER = 1.5
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
        flags: int32 bit set, sticky: 1 capacity overflow, 2 interaction range
            reached the list cutoff, 4 call-time box differs from ``box``.
        rebuilds: how many times the list was rebuilt since allocation.
        cutoff: the list cutoff ``C`` (largest range at allocation plus skin).
        box: the box the list was built for, as nested tuples.
    """

    pairs: Any
    i: Array
    j: Array
    mask: Array
    flags: Array
    rebuilds: Array
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


def _as_box(box: Any, dim: int) -> np.ndarray:
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


def _matvec_rows(matrix: Array, rows: Array) -> list[Array]:
    """Components of ``rows @ matrix.T`` as elementwise sums: a (P, dim) x (dim, dim)
    product is slow as a matrix multiplication on CPU (library call per tiny dot)."""
    dim = rows.shape[-1]
    comps = [rows[..., k] for k in range(dim)]
    return [sum(comps[k] * matrix[a, k] for k in range(dim)) for a in range(dim)]


def _min_image(box: Array, inverse: Array, dr: Array) -> Array:
    """Minimum-image displacement (rows of ``dr``) in the box whose columns are box
    vectors: ``dr - box @ k`` with the integer image shift ``k = round(box^-1 dr)``.
    ``k`` is piecewise constant, so it is held out of differentiation: the
    derivatives are exact and cost nothing with respect to ``dr`` (identity) and
    little with respect to the box (``-k``)."""
    shift = jax.lax.stop_gradient(jnp.stack([jnp.round(c) for c in _matvec_rows(inverse, dr)], axis=-1))
    return dr - jnp.stack(_matvec_rows(box, shift), axis=-1)


def _fractional(box_inverse: Array, positions: Array) -> Array:
    s = jnp.stack(_matvec_rows(box_inverse, positions), axis=-1)
    return s - jnp.floor(s)


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
        displacement, box, list_cutoff * (1.0 + _CUTOFF_MARGIN), dr_threshold=0.0,
        fractional_coordinates=True, format=partition.OrderedSparse,
    )
    # A minimum cell size a little below 1 / cells, so that jax-md's floor gives `cells`.
    minimum = 1.0 / (cells + 0.5)
    template = partition.NeighborList(
        None, None, None, None, None, partition.OrderedSparse, 1.0 / cells, partition.cell_list(1.0, minimum),
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


@dataclasses.dataclass(frozen=True, eq=False)
class NeighborListEnergy:
    """A pair energy summed over a neighbor list; callable as
    ``energy_fn(positions, params)`` like every mdsens energy.

    Hashable by identity (a static argument of ``jit``). Build one with a
    :mod:`mdsens.systems` builder (``neighbor_list=True``), or with
    :meth:`build`:

    Args:
        pair_energy: ``pair_energy(r, pair_params) -> e``, elementwise energies
            of pairs at distances ``r`` (shape ``(P,)``), zero at and beyond
            the interaction range, twice differentiable in ``r`` below it.
        pair_params: ``pair_params(params, i, j) -> dict`` of per-pair
            parameter arrays (or scalars) for index arrays ``i``, ``j``.
        interaction_range: ``interaction_range(params) -> scalar``, an upper
            bound of the range of every pair (traceable).
        positions, params: a configuration and parameters at which to allocate
            the list that standalone calls use (its capacity and cutoff).
        skin: list cutoff minus the largest range (default
            ``DEFAULT_SKIN_FRACTION`` times the range).
        capacity_multiplier: headroom of every allocation.

    Derivatives: the gradient is a custom JVP rule (pair forces summed with
    segment sums) and its own JVP is an explicit Hessian-vector product
    (``[phi'' r^ r^T + phi'/r (I - r^ r^T)] (v_i - v_j)`` per pair, ``phi'`` and
    ``phi''`` by forward-mode differentiation of ``pair_energy``); derivatives
    with respect to ``params`` and higher orders are ordinary autodiff of
    these. All are exact.
    """

    pair_energy: Callable[[Array, Params], Array]
    pair_params: Callable[[Params, Array, Array], Params]
    interaction_range: Callable[[Params], Array]
    n: int
    dim: int
    skin: float
    capacity_multiplier: float
    template: Neighbors | None

    @classmethod
    def build(
        cls,
        pair_energy: Callable[[Array, Params], Array],
        pair_params: Callable[[Params, Array, Array], Params],
        interaction_range: Callable[[Params], Array],
        positions: Array,
        params: Params,
        skin: float | None = None,
        capacity_multiplier: float = DEFAULT_CAPACITY_MULTIPLIER,
    ) -> NeighborListEnergy:
        n, dim = positions.shape
        reach = float(interaction_range(params))
        skin = DEFAULT_SKIN_FRACTION * reach if skin is None else float(skin)
        if not skin > 0:
            raise ValueError(f"skin must be positive; got {skin}.")
        if not capacity_multiplier >= 1:
            raise ValueError(f"capacity_multiplier must be >= 1; got {capacity_multiplier}.")
        energy = cls(
            pair_energy, pair_params, interaction_range, int(n), int(dim), skin, float(capacity_multiplier), None
        )
        template = energy.allocate(positions, params)
        # The template keeps only the static parts (capacities, functions): no array
        # constants end up in compiled standalone calls.
        template = Neighbors(
            dataclasses.replace(template.pairs, idx=None, reference_position=None, error=None),
            None, None, None, None, None, template.cutoff, template.box,
        )
        object.__setattr__(energy, "template", template)
        return energy

    def replace(self, positions: Array, params: Params, **changes: Any) -> NeighborListEnergy:
        """A copy with another ``skin`` or ``capacity_multiplier``, its standalone
        list allocated at ``positions`` and ``params``."""
        kwargs = dict(skin=self.skin, capacity_multiplier=self.capacity_multiplier)
        kwargs.update(changes)
        return NeighborListEnergy.build(
            self.pair_energy, self.pair_params, self.interaction_range, positions, params, **kwargs
        )

    # ------------------------------------------------------------------ lists

    def allocate(
        self,
        positions: Array,
        params: Params,
        extra_capacity: int = 0,
        *,
        skin: float | None = None,
        capacity_multiplier: float | None = None,
    ) -> Neighbors:
        """A list for ``positions`` and ``params`` (host only, concrete arrays):
        cutoff ``interaction_range(params) + skin``, box ``params["box"]``,
        capacity ``capacity_multiplier`` times what the positions need, plus
        ``extra_capacity`` pairs per particle and particles per cell, rounded up
        (:func:`_round_capacity`)."""
        box = _as_box(params["box"], self.dim)
        skin = self.skin if skin is None else skin
        multiplier = self.capacity_multiplier if capacity_multiplier is None else capacity_multiplier
        cutoff = float(self.interaction_range(params)) + skin
        template, prepare = _list_fns(_box_key(box), cutoff, _cells_per_side(box, cutoff))
        # The cell capacity from the fullest cell; a list with room for every
        # candidate of the 3^dim neighbouring cells; the pair capacity from its count.
        # (jax-md's own allocate runs op by op, and compiles each op anew for every
        # new size: seconds. These are three compiled calls.)
        s, fullest = prepare(jnp.asarray(positions))
        cell_capacity = _round_capacity(int(int(fullest) * multiplier) + extra_capacity)
        template = dataclasses.replace(
            template, cell_list_capacity=cell_capacity, max_occupancy=self.n * 3**self.dim * cell_capacity
        )
        pairs, count = _all_pairs_within(template, s)
        capacity = _round_capacity(int(int(count) * multiplier) + self.n * extra_capacity)
        pairs, i, j, mask = _truncated(pairs, capacity)
        flags = jnp.asarray(OVERFLOW if bool(pairs.did_buffer_overflow) else 0, jnp.int32)
        return Neighbors(pairs, i, j, mask, flags, jnp.zeros((), jnp.int32), cutoff, _box_key(box))

    def freeze(self, positions: Array, params: Params) -> Neighbors:
        """A list for one state that does not move (host only): no skin and no
        spare capacity (beyond rounding), just the pairs within the interaction
        range (plus a 1e-6 relative margin). Exact for the energy and all its
        derivatives at ``positions`` and ``params``: infinitesimal changes
        create no new pair. :func:`mdsens.equilibrium_jvp` and ``_vjp`` solve
        with this list at x*."""
        reach = float(self.interaction_range(params))
        return self.allocate(positions, params, skin=1e-6 * reach, capacity_multiplier=1.0)

    def update(self, neighbors: Neighbors, positions: Array, params: Params) -> Neighbors:
        """The list for ``positions`` and ``params`` (traceable, fixed capacity):
        rebuilt if the skin rule fails, flagged if it cannot hold them."""
        box = jnp.asarray(neighbors.box, dtype=positions.dtype)
        s = _fractional(jnp.linalg.inv(box), positions)
        reach = self.interaction_range(params)
        ds = s - neighbors.pairs.reference_position
        moved = jnp.max(jnp.sum(jnp.stack(_matvec_rows(box, ds - jnp.round(ds)), axis=-1) ** 2, axis=-1))
        # R + 2 max|dx| < C, squared without the square root.
        stale = 4.0 * moved >= (neighbors.cutoff - reach) ** 2

        def rebuild(old: Neighbors) -> Neighbors:
            pairs = old.pairs.update(s)
            return dataclasses.replace(old, pairs=pairs, rebuilds=old.rebuilds + 1).replace_indices(self.n)

        neighbors = jax.lax.cond(stale, rebuild, lambda old: old, neighbors)
        return dataclasses.replace(neighbors, flags=self._flags(neighbors, reach, params))

    def _flags(self, neighbors: Neighbors, reach: Array, params: Params) -> Array:
        """The sticky flags of ``neighbors`` OR-ed with its state at ``params``."""
        box = jnp.asarray(neighbors.box, dtype=jnp.asarray(reach).dtype)
        overflow = neighbors.pairs.did_buffer_overflow != 0
        wrong_box = jnp.max(jnp.abs(params["box"] - box)) > _BOX_RTOL * jnp.max(jnp.abs(box))
        flags = jnp.where(overflow, OVERFLOW, 0) | jnp.where(reach >= neighbors.cutoff, OUT_OF_RANGE, 0)
        flags = flags | jnp.where(wrong_box, WRONG_BOX, 0)
        base = 0 if neighbors.flags is None else neighbors.flags
        return (base | flags).astype(jnp.int32)

    def build_list(self, positions: Array, params: Params) -> Neighbors:
        """A list built from scratch at ``positions`` with the capacities and
        cutoff allocated at build time (traceable): what standalone calls and
        relaxations under ``jit`` use."""
        template = self.template
        box = jnp.asarray(template.box, dtype=positions.dtype)
        s = _fractional(jnp.linalg.inv(box), positions)
        pairs = _blank_pairs(template.pairs, s, self.n).update(s)
        neighbors = Neighbors(
            pairs, *_pair_indices(pairs, self.n), None, jnp.zeros((), jnp.int32), template.cutoff, template.box
        )
        return dataclasses.replace(neighbors, flags=self._flags(neighbors, self.interaction_range(params), params))

    # ------------------------------------------------------------------ energies

    def _geometry(self, positions: Array, params: Params, neighbors: Neighbors) -> tuple[Array, Array]:
        """Minimum-image pair vectors ``x_i - x_j`` and distances (1 for padding)."""
        box = params["box"]
        take = lambda a, k: a.at[k].get(mode="promise_in_bounds")  # noqa: E731
        dr = _min_image(box, jnp.linalg.inv(box), take(positions, neighbors.i) - take(positions, neighbors.j))
        r = jnp.sqrt(jnp.where(neighbors.mask, jnp.sum(dr * dr, axis=-1), 1.0))
        return dr, r

    def _radial(self, r: Array, params: Params, neighbors: Neighbors, order: int) -> tuple[Array, ...]:
        """``phi(r)`` and its first ``order`` derivatives, pair by pair."""
        pp = self.pair_params(params, neighbors.i, neighbors.j)
        phi = lambda rr: self.pair_energy(rr, pp)  # noqa: E731
        ones = jnp.ones_like(r)
        if order == 0:
            return (phi(r),)
        if order == 1:
            return jax.jvp(phi, (r,), (ones,))
        first = lambda rr: jax.jvp(phi, (rr,), (ones,))  # noqa: E731
        (e, d1), (_, d2) = jax.jvp(first, (r,), (ones,))
        return e, d1, d2

    def _segment_sum(self, per_pair: Array, neighbors: Neighbors) -> Array:
        """``sum_{p: i_p = k} per_pair_p - sum_{p: j_p = k} per_pair_p`` for every particle k."""
        return jax.ops.segment_sum(per_pair, neighbors.i, self.n, indices_are_sorted=True) - jax.ops.segment_sum(
            per_pair, neighbors.j, self.n
        )

    def _energy_value(self, positions: Array, params: Params, neighbors: Neighbors) -> Array:
        _, r = self._geometry(positions, params, neighbors)
        (e,) = self._radial(r, params, neighbors, 0)
        return jnp.sum(jnp.where(neighbors.mask, e, 0.0))

    def _gradient_value(self, positions: Array, params: Params, neighbors: Neighbors) -> Array:
        dr, r = self._geometry(positions, params, neighbors)
        _, d1 = self._radial(r, params, neighbors, 1)
        c = jnp.where(neighbors.mask, d1 / r, 0.0)
        return self._segment_sum(c[:, None] * dr, neighbors)

    def _pair_blocks(self, positions: Array, params: Params, neighbors: Neighbors) -> tuple[Array, Array, Array]:
        """``(dr, a, b)``: the Hessian block of pair ``p`` is ``a_p dr_p dr_p^T + b_p I``
        (``a = (phi'' - phi'/r) / r^2``, ``b = phi'/r``; zero for padding)."""
        dr, r = self._geometry(positions, params, neighbors)
        _, d1, d2 = self._radial(r, params, neighbors, 2)
        b = jnp.where(neighbors.mask, d1 / r, 0.0)
        a = jnp.where(neighbors.mask, (d2 - b) / (r * r), 0.0)
        return dr, a, b

    def _hvp_value(self, positions: Array, params: Params, neighbors: Neighbors, v: Array) -> Array:
        dr, a, b = self._pair_blocks(positions, params, neighbors)
        take = lambda x, k: x.at[k].get(mode="promise_in_bounds")  # noqa: E731
        dv = take(v, neighbors.i) - take(v, neighbors.j)
        h = (a * jnp.sum(dr * dv, axis=-1))[:, None] * dr + b[:, None] * dv
        return self._segment_sum(h, neighbors)

    def energy(self, positions: Array, params: Params, neighbors: Neighbors) -> Array:
        """The energy with a given list (no validity check: use :meth:`update` first)."""
        return _energy(self, positions, params, neighbors)

    def bind(self, neighbors: Neighbors) -> Callable[[Array, Params], Array]:
        """``energy_fn(positions, params)`` with the list frozen (for derivatives at
        one state): NaN, with NaN derivatives, if the list is invalid."""
        scale = jnp.where(neighbors.valid, 1.0, jnp.nan)
        return lambda positions, params: self.energy(positions, params, neighbors) * scale

    def __call__(self, positions: Array, params: Params) -> Array:
        """The energy with a list built at ``positions`` (capacity from build
        time). NaN, and a ``RuntimeWarning``, if that list cannot hold the pairs."""
        return _standalone(self, NeighborListEnergy.energy, positions, params)

    def hessian_diagonal(self, positions: Array, params: Params) -> Array:
        """Exact diagonal of the Hessian, shape ``(N, dim)``, in O(N): the sum over
        the pairs of each particle of the diagonal of its pair blocks
        ``phi'' r^ r^T + phi'/r (I - r^ r^T)``. With a list built at
        ``positions`` (capacity from build time); NaN and a ``RuntimeWarning`` if
        it cannot hold the pairs."""
        return _standalone(self, NeighborListEnergy._hessian_diagonal_value, positions, params)

    def _hessian_diagonal_value(self, positions: Array, params: Params, neighbors: Neighbors) -> Array:
        dr, a, b = self._pair_blocks(positions, params, neighbors)
        diag = a[:, None] * dr * dr + b[:, None]
        return jax.ops.segment_sum(diag, neighbors.i, self.n, indices_are_sorted=True) + jax.ops.segment_sum(
            diag, neighbors.j, self.n
        )


@functools.partial(jax.jit, static_argnums=(0, 1))
def _standalone(model: NeighborListEnergy, method: Callable, positions: Array, params: Params) -> Array:
    """``method(model, positions, params, list)`` with a list built at ``positions``
    (compiled: called eagerly, building the list would run, and compile, op by op)."""
    neighbors = model.build_list(positions, params)
    jax.debug.callback(_warn_invalid, neighbors.flags)
    value = method(model, positions, params, neighbors)
    return value * jnp.where(neighbors.valid, 1.0, jnp.nan)  # NaN derivatives too


def _is_zero(tangent: Any) -> bool:
    leaves = jax.tree_util.tree_leaves(tangent, is_leaf=lambda t: isinstance(t, SymbolicZero))
    return all(isinstance(t, SymbolicZero) for t in leaves)


def _instantiate(tangent: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda t: jnp.zeros(t.aval.shape, t.aval.dtype) if isinstance(t, SymbolicZero) else t,
        tangent,
        is_leaf=lambda t: isinstance(t, SymbolicZero),
    )


def _jvp_rule(value_fn: Callable, position_tangent_fn: Callable) -> Callable:
    """A JVP rule: tangents along the parameters by autodiff of ``value_fn``
    (skipped when they are symbolic zeros, as for forces), along the positions
    by ``position_tangent_fn``; the list (integers) has none."""

    def rule(model, primals, tangents):
        positions, params, neighbors = primals
        dx, dparams, _ = tangents
        if _is_zero(dparams):
            value = value_fn(model, positions, params, neighbors)
            tangent = jnp.zeros_like(value)
        else:
            value, tangent = jax.jvp(
                lambda p: value_fn(model, positions, p, neighbors), (params,), (_instantiate(dparams),)
            )
        if not _is_zero(dx):
            tangent = tangent + position_tangent_fn(model, positions, params, neighbors, dx)
        return value, tangent

    return rule


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _energy(model: NeighborListEnergy, positions: Array, params: Params, neighbors: Neighbors) -> Array:
    return model._energy_value(positions, params, neighbors)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _gradient(model: NeighborListEnergy, positions: Array, params: Params, neighbors: Neighbors) -> Array:
    return model._gradient_value(positions, params, neighbors)


_energy.defjvp(
    _jvp_rule(NeighborListEnergy._energy_value, lambda m, x, p, nb, dx: jnp.vdot(_gradient(m, x, p, nb), dx)),
    symbolic_zeros=True,
)
_gradient.defjvp(_jvp_rule(NeighborListEnergy._gradient_value, NeighborListEnergy._hvp_value), symbolic_zeros=True)


def _warn_invalid(flags) -> None:
    flags = np.atleast_1d(np.asarray(flags))
    if np.any(flags != 0):
        warnings.warn(
            f"mdsens.neighbors: {describe(int(np.bitwise_or.reduce(flags)))}; returning NaN. "
            "mdsens.relax reallocates on the host; for standalone calls use "
            "energy_fn.replace(positions, params) (a list allocated there, optionally with a "
            "larger capacity_multiplier or skin).",
            RuntimeWarning,
            stacklevel=2,
        )


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

