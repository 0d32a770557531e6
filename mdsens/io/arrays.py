"""A :class:`~mdsens.System` from arrays: the one place where configurations
(from files or from memory) are checked and meet their potential.

Boxes are ``(dim, dim)`` matrices whose columns are the box vectors. Neighbor
lists (and HOOMD, LAMMPS) need them upper triangular with a positive
diagonal; :func:`upper_triangular` rotates a general box, and the positions
with it, into that form (a reflection too, for a left-handed box): energies
and forces of isotropic potentials do not change.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from mdsens._checks import require_x64
from mdsens.systems.potentials import Potential
from mdsens.systems.system import System

Array = jax.Array


def upper_triangular(box: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(box', positions', Q)``: ``box = Q box'`` with ``box'`` upper triangular
    with a positive diagonal and ``Q`` orthogonal, ``positions' = positions Q``
    (row vectors). Rotate any other per-particle vector field ``v`` the same
    way, ``v Q``. A box already in that form is returned as it is (``Q = I``)."""
    box = np.asarray(box, np.float64)
    if not np.any(np.tril(box, -1)) and np.all(np.diag(box) > 0):
        return box, np.asarray(positions, np.float64), np.eye(box.shape[0])
    q, r = np.linalg.qr(box)
    signs = np.where(np.diag(r) < 0, -1.0, 1.0)
    q, r = q * signs, signs[:, None] * r
    return np.triu(r), np.asarray(positions, np.float64) @ q, q


def _field(source: str, name: str, values: Any, shape: tuple[int, ...], kind: str = "f") -> np.ndarray:
    """``values`` as a float64 (``kind="f"``) or integer (``"i"``) array of
    ``shape``, finite; ``ValueError`` naming ``source`` and the field."""
    array = np.asarray(values)
    if array.shape != shape:
        raise ValueError(f"{source}: {name}: expected shape {shape}; got {array.shape}.")
    if kind == "i":
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{source}: {name}: expected integers; got {array.dtype}.")
        return array.astype(np.int32)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{source}: {name}: expected real numbers; got {array.dtype}.")
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{source}: {name}: contains NaN or inf.")
    return array


def from_arrays(
    positions: Any,
    potential: Potential,
    *,
    box: Any = None,
    species: Any = None,
    diameters: Any = None,
    source: str = "arrays",
) -> System:
    """A :class:`~mdsens.System` of ``potential`` (e.g.
    :class:`mdsens.systems.SoftSpheres`) at ``positions`` ``(N, dim)``.

    Args:
        box: the periodic box, columns the box vectors (None: free space); a
            box that is not upper triangular is rotated (:func:`upper_triangular`),
            and the system's positions are then in the rotated frame.
        species: integers from 0, ``(N,)`` (default all 0).
        diameters: per-particle diameters ``(N,)`` (None: the format has none).
        source: names the configuration (a file) in error messages.

    ``ValueError`` (naming ``source`` and the field) for a wrong shape or
    dimension, NaN or inf, negative species, non-positive diameters or a box
    without volume, and for what the potential cannot use."""
    require_x64("mdsens.io")
    positions = np.asarray(positions)
    if positions.ndim != 2 or positions.shape[1] not in (2, 3):
        raise ValueError(f"{source}: positions: expected shape (N, 2) or (N, 3); got {positions.shape}.")
    n, dim = positions.shape
    positions = _field(source, "positions", positions, (n, dim))
    species = np.zeros(n, np.int32) if species is None else _field(source, "species", species, (n,), "i")
    if np.any(species < 0):
        raise ValueError(f"{source}: species: must be integers from 0; got {int(species.min())}.")
    if diameters is not None:
        diameters = _field(source, "diameter", diameters, (n,))
        if not np.all(diameters > 0):
            raise ValueError(f"{source}: diameter: must be positive; got {float(diameters.min())}.")
    if box is not None:
        box = _field(source, "box", box, (dim, dim))
        if abs(np.linalg.det(box)) <= 1e-12 * np.prod(np.linalg.norm(box, axis=0)):
            raise ValueError(f"{source}: box: its vectors span no volume: {box.tolist()}.")
        box, positions, _ = upper_triangular(box, positions)
    try:
        return potential.system(positions, box, species, diameters)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from error
