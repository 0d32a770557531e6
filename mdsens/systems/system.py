"""A :class:`System`: everything that belongs to the physics, in one value."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mdsens._checks import as_float64, check_finite, check_params, check_positions, is_concrete, require_x64
from mdsens._values import positive_float
from mdsens.coarse_space import two_level
from mdsens.linear_solve import TwoLevel
from mdsens.systems.energy import Energy, EnergyFn, FunctionEnergy, as_energy
from mdsens.systems.space import check_min_image

Array = jax.Array

#: Positions of periodic systems must lie within this many boxes of the origin
#: (they are never wrapped; the minimum image rounds ``box^-1 x``).
MAX_BOX_IMAGES = 1e6
#: ``dt_max`` of :meth:`System.from_energy` when none is given: small enough for
#: stiff potentials in reduced units (FIRE then grows its step up to it).
DEFAULT_DT_MAX = 0.05


@dataclasses.dataclass(frozen=True, eq=False)
class System:
    """A particle system: its energy, parameters, space, species and a start.

    Pass it whole to :func:`mdsens.relax`, :func:`mdsens.equilibrium` and the
    observables; nothing that belongs to the system travels separately.

    Attributes:
        energy: ``energy(positions, params) -> scalar``, an
            :class:`~mdsens.systems.Energy` (a plain function wrapped in
            :class:`~mdsens.systems.FunctionEnergy`, or a neighbor-list energy).
        params: pytree of float64 arrays, the differentiable parameters. Calls
            that take other ``params`` require the same structure and shapes.
        positions: a starting configuration, float64, shape ``(N, dim)``.
            Positions are never wrapped into the box.
        box: the periodic box as a ``(dim, dim)`` matrix whose columns are the
            box vectors (``params["box"]`` for the builders' systems, read at
            call time), or None in free space.
        species: integer species of each particle, shape ``(N,)``.
        dt_max: the largest stable FIRE time step of this potential; minimisers
            without a ``dt_max`` of their own take it.
        positive: names of top-level parameters (keys of a dict ``params``)
            whose entries must be positive (sizes, energy scales): checked
            whenever concrete parameters are passed.
        interaction_range: ``params -> distance`` beyond which particles do
            not interact (None: unknown or unbounded). In a periodic box,
            concrete parameters whose range exceeds half the box's narrowest
            width are refused: the minimum image would miss pairs.
    """

    energy: Energy
    params: Any
    positions: Array
    box: Array | None
    species: Array
    dt_max: float
    positive: tuple[str, ...] = ()
    interaction_range: Callable[[Any], Any] | None = None

    @classmethod
    def from_energy(
        cls,
        energy: Energy | EnergyFn,
        params: Any,
        positions: Any,
        *,
        box: Any = None,
        species: Any = None,
        dt_max: float = DEFAULT_DT_MAX,
        positive: tuple[str, ...] = (),
        interaction_range: Callable[[Any], Any] | None = None,
    ) -> System:
        """A system from your own energy ``energy(positions, params) -> scalar``
        (any JAX function, e.g. built with jax-md), its parameters (a pytree of
        float arrays: every leaf is differentiable), a start ``(N, dim)``, the
        periodic ``box`` matrix (None: free space; informational, the energy
        handles periodicity), integer ``species`` (default all 0) and a stable
        time step ``dt_max`` (default :data:`DEFAULT_DT_MAX`); ``positive`` names
        parameters that must stay positive; ``interaction_range(params)``, if
        given, lets periodic systems refuse parameters whose range exceeds half
        the box."""
        require_x64("System.from_energy")
        positions = check_positions(positions)
        params = check_params(params)
        n, dim = positions.shape
        if box is not None:
            box = as_float64(box, "box")
            if box.shape != (dim, dim):
                raise ValueError(f"box must be a ({dim}, {dim}) matrix for {dim}D positions; got shape {box.shape}.")
            check_finite(box, "box")
        if species is None:
            species = jnp.zeros(n, jnp.int32)
        else:
            species = np.asarray(species)
            if species.shape != (n,) or not np.issubdtype(species.dtype, np.integer) or np.any(species < 0):
                raise ValueError(f"species must be {n} non-negative integers, one per particle; got {species!r}.")
            species = jnp.asarray(species, jnp.int32)
        dt_max = positive_float(dt_max, "dt_max", "System.from_energy")
        missing = [key for key in positive if not isinstance(params, dict) or key not in params]
        if missing:
            raise ValueError(f"System.from_energy: positive names {missing}, which are not keys of params.")
        system = cls(as_energy(energy), params, positions, box, species, dt_max, tuple(positive), interaction_range)
        system.check_params(params)
        return system

    @property
    def n(self) -> int:
        return int(self.positions.shape[0])

    @property
    def dim(self) -> int:
        return int(self.positions.shape[1])

    @property
    def neighbor_list(self) -> bool:
        """Whether the energy carries a neighbor list."""
        return not isinstance(self.energy, FunctionEnergy)

    def replace(self, **changes: Any) -> System:
        """A copy with some fields changed (e.g. ``positions`` or ``params``)."""
        return dataclasses.replace(self, **changes)

    def check_params(self, params: Any, name: str = "params", *, tangent: bool = False) -> Any:
        """``params`` as float64 arrays, checked against the system's parameters:
        the same pytree structure and, leaf by leaf, the same shape (a
        ``ValueError`` names the leaf); the :attr:`positive` ones positive,
        unless they are a ``tangent`` (a direction, of any sign)."""
        params = check_params(params, name)
        leaves, structure = jax.tree_util.tree_flatten_with_path(params)
        expected, expected_structure = jax.tree_util.tree_flatten_with_path(self.params)
        if structure != expected_structure:  # type: ignore[operator]  # PyTreeDef compares by value
            raise ValueError(
                f"{name} must have the structure of the system's parameters "
                f"{jax.tree_util.tree_structure(self.params)}; got {structure}."
            )
        for (path, leaf), (_, reference) in zip(leaves, expected, strict=True):
            if jnp.shape(leaf) != jnp.shape(reference):
                raise ValueError(
                    f"{name}{jax.tree_util.keystr(path)} must have shape {jnp.shape(reference)} "
                    f"(as the system's); got {jnp.shape(leaf)}."
                )
        for key in () if tangent else self.positive:
            if is_concrete(params[key]) and not np.all(np.asarray(params[key]) > 0):
                raise ValueError(f"{name}[{key!r}] must be positive; got {np.asarray(params[key]).tolist()}.")
        if not tangent:
            self._check_range(params, name)
        return params

    def box_at(self, params: Any) -> Array | None:
        """The periodic box at ``params``: ``params["box"]`` if they hold one (the
        builders' systems), else :attr:`box` (None in free space)."""
        return params["box"] if isinstance(params, dict) and "box" in params else self.box

    def _check_range(self, params: Any, name: str) -> None:
        """Concrete parameters must keep the interaction range within half the
        periodic box (``params["box"]`` for the builders' systems)."""
        if self.interaction_range is None or self.box is None:
            return
        box = self.box_at(params)
        reach = self.interaction_range(params)
        if is_concrete(box) and is_concrete(reach):
            box_name = f"{name}['box']" if isinstance(params, dict) and "box" in params else "box"
            check_min_image(box, float(reach), box_name, "use a larger box or parameters of shorter range")

    def check_positions(self, positions: Any, name: str = "positions") -> Array:
        """``positions`` as a finite float64 ``(N, dim)`` array of this system's
        shape; concrete ones must also have no two particles on one point (a
        maximum of every repulsive energy, where forces vanish by symmetry) and,
        in a periodic box, lie within :data:`MAX_BOX_IMAGES` boxes of it."""
        positions = check_positions(positions, name)
        if positions.shape != self.positions.shape:
            raise ValueError(f"{name} must have shape {self.positions.shape} (N, dim); got {positions.shape}.")
        if is_concrete(positions):
            values = np.asarray(positions)
            _, first, counts = np.unique(values, axis=0, return_index=True, return_counts=True)
            if np.any(counts > 1):
                i = int(first[np.argmax(counts > 1)])
                raise ValueError(
                    f"{name}: particles sit on one point ({values[i].tolist()}, {int(np.max(counts))} of them)."
                )
            if self.box is not None:
                fractional = np.linalg.solve(np.asarray(self.box), values.T)
                if np.max(np.abs(fractional)) > MAX_BOX_IMAGES:
                    raise ValueError(
                        f"{name} has coordinates {np.max(np.abs(fractional)):.3g} boxes away from the origin "
                        f"(more than {MAX_BOX_IMAGES:g}): the minimum image loses precision there."
                    )
        return positions

    def inputs(self, positions: Any = None, params: Any = None) -> tuple[Array, Any]:
        """Checked ``(positions, params)``, the system's own where None."""
        positions = self.positions if positions is None else self.check_positions(positions)
        params = self.params if params is None else self.check_params(params)
        return positions, params

    def hessian_diagonal(self, positions: Any = None, params: Any = None) -> Array:
        """Exact diagonal of the Hessian at ``positions``, shape ``(N, dim)``
        (for :class:`mdsens.linear_solve.Jacobi`); O(N) for neighbor lists."""
        positions, params = self.inputs(positions, params)
        return self.energy.hessian_diagonal(positions, params)

    def hessian_blocks(self, positions: Any = None, params: Any = None) -> Array:
        """Exact per-particle diagonal blocks of the Hessian at ``positions``,
        shape ``(N, dim, dim)`` (for :class:`mdsens.linear_solve.BlockJacobi`);
        O(N) for neighbor lists."""
        positions, params = self.inputs(positions, params)
        return self.energy.hessian_blocks(positions, params)

    def two_level_preconditioner(
        self, positions: Any = None, params: Any = None, *, cells: int | None = None
    ) -> TwoLevel:
        """A :class:`mdsens.linear_solve.TwoLevel` preconditioner of the Hessian at
        ``positions``: block Jacobi (:meth:`hessian_blocks`) plus the rigid
        translations of aggregates, the particles of each cell of a grid over
        the box (or, in free space, over the positions' bounding box). The grid
        has about ``1.5 sqrt(N)`` cells (or ``cells`` per axis), each at
        least twice :attr:`interaction_range` wide, which the system must
        therefore know. Costs the blocks plus ``3^dim dim`` Hessian-vector
        products; host only (concrete inputs). See :mod:`mdsens.coarse_space`."""
        positions, params = self.inputs(positions, params)
        return two_level(self, positions, params, cells)
