"""The neighbor-list energy: :class:`NeighborListEnergy`, the energy protocol
(:mod:`mdsens.systems.energy`) for a pair energy summed over a neighbor list.

Lists (allocation, builds, the skin rule, flags) are in
:mod:`mdsens.neighbors.lists`; sums over a given list and their derivatives in
:mod:`mdsens.neighbors.pair_sum`. This class holds the pair energy and the
capacities chosen when it was made, and delegates.
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

from mdsens.neighbors import lists, pair_sum
from mdsens.neighbors.lists import DEFAULT_CAPACITY_MULTIPLIER, DEFAULT_SKIN_FRACTION, Neighbors, describe

Array = jax.Array
Params = dict[str, Array]


@dataclasses.dataclass(frozen=True, eq=False)
class NeighborListEnergy:
    """A pair energy summed over a neighbor list; callable as
    ``energy(positions, params)`` like every mdsens energy, and an
    :class:`~mdsens.systems.Energy` whose state (``aux``) is a
    :class:`~mdsens.neighbors.Neighbors`.

    Hashable by identity (a static argument of ``jit``). Make one with a
    :mod:`mdsens.systems` builder (``neighbor_list=True``), or with
    :meth:`create`:

    Args:
        pair_energy: ``pair_energy(r, pair_params) -> e``, elementwise energies
            of pairs at distances ``r`` (shape ``(P,)``), zero at and beyond
            the interaction range, twice differentiable in ``r`` below it.
        pair_params: ``pair_params(params, i, j) -> dict`` of per-pair
            parameter arrays (or scalars) for index arrays ``i``, ``j``.
        interaction_range: ``interaction_range(params) -> scalar``, an upper
            bound of the range of every pair (traceable).
        positions, params: a configuration and parameters at which to allocate
            the list that standalone calls and :meth:`build` use (its capacity
            and cutoff).
        skin: list cutoff minus the largest range (default
            ``DEFAULT_SKIN_FRACTION`` times the range).
        capacity_multiplier: pair-capacity headroom of every allocation.

    Derivatives: the gradient is a custom JVP rule (pair forces summed with
    segment sums) and its own JVP is an explicit Hessian-vector product
    (``[phi'' r^ r^T + phi'/r (I - r^ r^T)] (v_i - v_j)`` per pair, ``phi'`` and
    ``phi''`` by forward-mode differentiation of ``pair_energy``); derivatives
    with respect to ``params`` and higher orders are ordinary autodiff of
    these. All are exact (:mod:`mdsens.neighbors.pair_sum`).
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
    def create(
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
        # The template keeps only the static parts (capacities, functions): no array
        # constants end up in compiled standalone calls.
        object.__setattr__(energy, "template", lists.static_template(energy.allocate(positions, params)))
        return energy

    def replace(self, positions: Array, params: Params, **changes: Any) -> NeighborListEnergy:
        """A copy with another ``skin`` or ``capacity_multiplier``, its standalone
        list allocated at ``positions`` and ``params``."""
        kwargs = dict(skin=self.skin, capacity_multiplier=self.capacity_multiplier)
        kwargs.update(changes)
        return NeighborListEnergy.create(
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
        pair capacity ``capacity_multiplier`` times what the positions need (cell
        capacity :data:`~mdsens.neighbors.lists.CELL_CAPACITY_MULTIPLIER` times),
        plus ``extra_capacity`` pairs per particle and particles per cell, rounded up."""
        box = lists.as_box(params["box"], self.dim)
        skin = self.skin if skin is None else skin
        multiplier = self.capacity_multiplier if capacity_multiplier is None else capacity_multiplier
        cutoff = float(self.interaction_range(params)) + skin
        return lists.allocate(positions, box, cutoff, multiplier, extra_capacity)

    def build(self, positions: Array, params: Params) -> Neighbors:
        """A list built from scratch at ``positions`` with the capacities and
        cutoff allocated by :meth:`create` (traceable): what standalone calls
        and relaxations under ``jit`` use."""
        assert self.template is not None, "NeighborListEnergy.create allocates the template"
        return lists.build(self.template, positions, self.interaction_range(params), params["box"])

    def update(self, aux: Neighbors, positions: Array, params: Params) -> Neighbors:
        """The list for ``positions`` and ``params`` (traceable, fixed capacity):
        rebuilt if the skin rule fails, flagged if it cannot hold them."""
        return lists.update(aux, positions, self.interaction_range(params), params["box"])

    def valid(self, aux: Neighbors) -> Array:
        """Whether ``aux`` holds every interacting pair (no flag set)."""
        return aux.flags == 0

    def trim(self, aux: Neighbors) -> Neighbors:
        """``aux`` with pair capacity ``capacity_multiplier`` times the pairs it
        holds, if that is smaller (host only): the same pairs in the same order,
        so forces do not change by a bit; later rebuilds keep the new capacity."""
        return lists.trim(aux, self.capacity_multiplier)

    def freeze(self, positions: Array, params: Params) -> Neighbors:
        """A list for one state that does not move (host only): no skin and no
        spare pair capacity (beyond rounding), just the pairs within the interaction
        range (plus a 1e-6 relative margin). Exact for the energy and all its
        derivatives at ``positions`` and ``params``: infinitesimal changes
        create no new pair. :func:`mdsens.equilibrium_jvp` and ``_vjp`` solve
        with this list at x*."""
        reach = float(self.interaction_range(params))
        return self.allocate(positions, params, skin=1e-6 * reach, capacity_multiplier=1.0)

    def diagnostics(self, aux: Neighbors) -> dict[str, Any]:
        """The list's state (host only, concrete ``aux``): rebuilds since
        allocation, pair capacity, cell capacity, pairs held, list cutoff,
        validity and its reason (:func:`~mdsens.neighbors.describe`)."""
        flags = int(aux.flags)
        return dict(
            rebuilds=int(aux.rebuilds),
            capacity=aux.capacity,
            cell_capacity=aux.pairs.cell_list_capacity,
            pairs=int(aux.n_pairs),
            cutoff=aux.cutoff,
            valid=flags == 0,
            reason=describe(flags),
        )

    # ------------------------------------------------------------------ energies

    def bind(self, aux: Neighbors) -> Callable[[Array, Params], Array]:
        """``energy(positions, params)`` with the list ``aux`` frozen (for
        derivatives at one state): NaN, with NaN derivatives, if it is invalid."""
        scale = jnp.where(self.valid(aux), 1.0, jnp.nan)

        def energy_fn(positions: Array, params: Params) -> Array:
            return pair_sum.energy(self.pair_energy, self.pair_params, positions, params, aux) * scale

        # O(P) pair blocks: implicit solves linearize the Hessian once (mdsens.Implicit).
        energy_fn.sparse_hessian = True  # type: ignore[attr-defined]
        return energy_fn

    def __call__(self, positions: Array, params: Params) -> Array:
        """The energy with a list built at ``positions`` (capacity from
        :meth:`create`). NaN, and a ``RuntimeWarning``, if that list cannot hold
        the pairs."""
        return _standalone(self, pair_sum.energy, positions, params)

    def hessian_blocks(self, positions: Array, params: Params) -> Array:
        """Exact per-particle diagonal blocks of the Hessian, shape ``(N, dim, dim)``,
        in O(N): the sum over the pairs of each particle of its pair blocks
        ``phi'' r^ r^T + phi'/r (I - r^ r^T)``. With a list built at
        ``positions`` (capacity from :meth:`create`); NaN and a
        ``RuntimeWarning`` if it cannot hold the pairs."""
        return _standalone(self, pair_sum.hessian_blocks, positions, params)

    def hessian_diagonal(self, positions: Array, params: Params) -> Array:
        """Exact diagonal of the Hessian, shape ``(N, dim)``, in O(N): the
        diagonals of :meth:`hessian_blocks`, summed directly."""
        return _standalone(self, pair_sum.hessian_diagonal, positions, params)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _standalone(model: NeighborListEnergy, method: Callable, positions: Array, params: Params) -> Array:
    """``method(pair_energy, pair_params, positions, params, list)`` with a list
    built at ``positions`` (compiled: called eagerly, building the list would
    run, and compile, op by op)."""
    neighbors = model.build(positions, params)
    jax.debug.callback(_warn_invalid, neighbors.flags)
    value = method(model.pair_energy, model.pair_params, positions, params, neighbors)
    return value * jnp.where(model.valid(neighbors), 1.0, jnp.nan)  # NaN derivatives too


def _warn_invalid(flags) -> None:
    flags = np.atleast_1d(np.asarray(flags))
    if np.any(flags != 0):
        warnings.warn(
            f"mdsens.neighbors: {describe(int(np.bitwise_or.reduce(flags)))}; returning NaN. "
            "mdsens.relax reallocates on the host; for standalone calls use "
            "energy.replace(positions, params) (a list allocated there, optionally with a "
            "larger capacity_multiplier or skin).",
            RuntimeWarning,
            stacklevel=2,
        )
