"""What the writers write: one configuration of a :class:`~mdsens.System` with
its per-particle data, in three dimensions (2D systems get ``z = 0`` and a zero
z component on every ``(N, 2)`` vector array)."""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import numpy as np

from mdsens.systems.energy import Energy
from mdsens.systems.system import System

Array = jax.Array

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: Names the writers use themselves (and ASE's extended XYZ reserves).
RESERVED = frozenset({"species", "pos", "positions", "diameter", "forces", "Z", "numbers", "symbols", "move_mask"})


@dataclasses.dataclass(frozen=True)
class Frame:
    """Attributes:
    dim: the system's dimension.
    positions: ``(N, 3)`` float64, unwrapped.
    box: ``(dim, dim)`` box matrix (columns the box vectors) or None.
    species: ``(N,)`` integers.
    diameters: ``(N,)`` or None (parameters without ``"diameters"``).
    energy: the energy at ``positions``.
    arrays: name -> ``(N,)`` or ``(N, k)`` float64 per-particle arrays
        (``"forces"`` first, if asked for).
    """

    dim: int
    positions: np.ndarray
    box: np.ndarray | None
    species: np.ndarray
    diameters: np.ndarray | None
    energy: float
    arrays: dict[str, np.ndarray]


@functools.partial(jax.jit, static_argnums=0)
def _energy_and_forces(energy: Energy, positions: Array, params: Any) -> tuple[Array, Array]:
    value, gradient = jax.value_and_grad(energy)(positions, params)
    return value, -gradient


def _to_3d(array: np.ndarray, dim: int) -> np.ndarray:
    if dim == 2 and array.ndim == 2 and array.shape[1] == 2:
        return np.pad(array, ((0, 0), (0, 1)))
    return array


def frame_of(
    system: System,
    positions: Any = None,
    params: Any = None,
    *,
    arrays: dict[str, Any] | None = None,
    forces: bool = True,
) -> Frame:
    """The :class:`Frame` of ``system`` at ``positions`` and ``params`` (default:
    the system's), with ``arrays`` (e.g. a sensitivity field ``dx*``,
    ``(N, dim)``, or per-particle scalars ``(N,)``; names are identifiers not in
    :data:`RESERVED`) and, if ``forces``, the forces ``-grad E``."""
    positions, params = system.inputs(positions, params)
    n, dim = system.n, system.dim
    energy, force = _energy_and_forces(system.energy, positions, params)
    box = params.get("box", system.box) if isinstance(params, dict) else system.box
    diameters = params.get("diameters") if isinstance(params, dict) else None
    if diameters is not None:
        diameters = np.asarray(diameters if diameters.shape[0] == n else diameters[system.species], np.float64)
    extra = {"forces": np.asarray(force)} if forces else {}
    for name, values in (arrays or {}).items():
        values = np.asarray(values, np.float64)
        if not _NAME.match(name) or name in RESERVED:
            raise ValueError(f"arrays: {name!r} must be an identifier and not one of {sorted(RESERVED)}.")
        if values.ndim not in (1, 2) or values.shape[0] != n:
            raise ValueError(f"arrays[{name!r}] must have shape (N,) or (N, k) with N = {n}; got {values.shape}.")
        extra[name] = values
    return Frame(
        dim,
        _to_3d(np.asarray(positions, np.float64), dim),
        None if box is None else np.asarray(box, np.float64),
        np.asarray(system.species, np.int32),
        diameters,
        float(energy),
        {name: _to_3d(values, dim) for name, values in extra.items()},
    )
