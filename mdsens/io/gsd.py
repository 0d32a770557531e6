"""HOOMD's GSD files: configurations in, relaxed states and their fields out.
Needs the optional package ``gsd`` (``pip install 'mdsens[io]'``).

HOOMD's box ``[Lx, Ly, Lz, xy, xz, yz]`` is the upper-triangular matrix with
columns ``(Lx, 0, 0)``, ``(xy Ly, Ly, 0)``, ``(xz Lz, yz Lz, Lz)``; positions
lie in the box centred on the origin, with integer ``image`` flags that
unwrap them. Species are the ``typeid`` (numbered in the order of ``species``
when given), diameters ``particles/diameter``.

Precision: GSD stores positions, the box and diameters in float32. A round
trip gives the float32 values (relative error below 6e-8 of the box), in
float64. Per-particle arrays (forces, sensitivity fields) are written as
float64 ``log/particles/<name>`` chunks, exactly.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mdsens.io._optional import require
from mdsens.io.arrays import from_arrays
from mdsens.io.frame import frame_of
from mdsens.systems.potentials import Potential
from mdsens.systems.system import System


def hoomd_box(box: np.ndarray) -> list[float]:
    """``[Lx, Ly, Lz, xy, xz, yz]`` of an upper-triangular box matrix (2D: ``Lz = 0``)."""
    if box.shape == (2, 2):
        return [box[0, 0], box[1, 1], 0.0, box[0, 1] / box[1, 1], 0.0, 0.0]
    return [box[0, 0], box[1, 1], box[2, 2], box[0, 1] / box[1, 1], box[0, 2] / box[2, 2], box[1, 2] / box[2, 2]]


def box_matrix(hoomd: Sequence[float], dim: int) -> np.ndarray:
    """The box matrix (columns the box vectors) of a HOOMD box."""
    lx, ly, lz, xy, xz, yz = (float(v) for v in hoomd)
    if dim == 2:
        return np.array([[lx, xy * ly], [0.0, ly]])
    return np.array([[lx, xy * ly, xz * lz], [0.0, ly, yz * lz], [0.0, 0.0, lz]])


def read_gsd(
    path: str | Path,
    potential: Potential,
    *,
    frame: int = -1,
    species: Sequence[str] | None = None,
    dim: int | None = None,
) -> System:
    """A :class:`~mdsens.System` of ``potential`` at frame ``frame`` of the GSD
    file ``path`` (positions unwrapped with the image flags, in float64).

    Args:
        species: type names in the order of mdsens's species 0, 1, ...
            (default: the file's ``particles/types``); others raise.
        dim: expected dimension (default: ``configuration/dimensions``).

    GSD boxes are always periodic. ``ValueError`` naming the file and the field."""
    hoomd = require("gsd.hoomd", "mdsens.io.read_gsd")
    with hoomd.open(str(path), "r") as trajectory:
        if not -len(trajectory) <= frame < len(trajectory):
            raise ValueError(f"{path}: frame: {frame} out of range; the file has {len(trajectory)} frames.")
        snapshot = trajectory[frame]
    file_dim = int(snapshot.configuration.dimensions)
    if dim is not None and dim != file_dim:
        raise ValueError(f"{path}: configuration/dimensions: the file is {file_dim}D; expected {dim}D.")
    particles = snapshot.particles
    types = list(particles.types)
    typeid = np.asarray(particles.typeid, np.int64)
    if typeid.size and not 0 <= typeid.min() <= typeid.max() < len(types):
        raise ValueError(f"{path}: particles/typeid: values outside the {len(types)} particles/types {types}.")
    names = types if species is None else list(species)
    unknown = sorted({types[t] for t in typeid} - set(names))
    if unknown:
        raise ValueError(f"{path}: particles/types: {unknown} not among the species {names}.")
    index = np.asarray([names.index(t) if t in names else -1 for t in types], np.int32)
    box = box_matrix(np.asarray(snapshot.configuration.box, np.float64).tolist(), file_dim)
    position = np.asarray(particles.position, np.float64)
    if file_dim == 2 and np.any(position[:, 2] != 0):
        raise ValueError(f"{path}: particles/position: a 2D configuration must have z = 0.")
    image = np.asarray(particles.image, np.float64)[:, :file_dim]
    return from_arrays(
        position[:, :file_dim] + image @ box.T,
        potential,
        box=box,
        species=index[typeid],
        diameters=np.asarray(particles.diameter, np.float64),
        source=str(path),
    )


def write_gsd(
    path: str | Path,
    system: System,
    positions: Any = None,
    params: Any = None,
    *,
    arrays: dict[str, Any] | None = None,
    types: Sequence[str] | None = None,
    forces: bool = True,
    append: bool = False,
) -> None:
    """Write ``system`` at ``positions`` and ``params`` (default: the system's)
    as one GSD frame: the box, positions wrapped into the centred box with
    their image flags, ``typeid`` with type names ``types`` (default ``A``,
    ``B``, ...), ``diameter`` (parameters with ``"diameters"``; else 1),
    ``log/particles/forces`` and one ``log/particles/<name>`` chunk per entry
    of ``arrays`` (float64). The box must be upper triangular with a positive
    diagonal (HOOMD's form; :func:`mdsens.io.upper_triangular`); free systems
    cannot be written. ``append`` adds a frame."""
    hoomd = require("gsd.hoomd", "mdsens.io.write_gsd")
    data = frame_of(system, positions, params, arrays=arrays, forces=forces)
    if data.box is None:
        raise ValueError("write_gsd: GSD boxes are periodic; this system is in free space.")
    if np.any(np.tril(data.box, -1)) or np.any(np.diag(data.box) <= 0):
        raise ValueError("write_gsd: the box must be upper triangular with a positive diagonal (HOOMD's form).")
    types = tuple(string.ascii_uppercase if types is None else types)
    if len(types) <= int(data.species.max()):
        raise ValueError(f"types: {len(types)} given for {int(data.species.max()) + 1} species.")
    dim = data.dim
    fractional = np.linalg.solve(data.box, data.positions[:, :dim].T).T
    image = np.round(fractional)
    wrapped = np.zeros_like(data.positions)
    wrapped[:, :dim] = (fractional - image) @ data.box.T

    snapshot = hoomd.Frame()
    snapshot.configuration.step = 0
    snapshot.configuration.dimensions = dim
    snapshot.configuration.box = hoomd_box(data.box)
    snapshot.particles.N = len(wrapped)
    snapshot.particles.position = wrapped.astype(np.float32)
    snapshot.particles.image = np.pad(image, ((0, 0), (0, 3 - dim))).astype(np.int32)
    snapshot.particles.types = list(types[: int(data.species.max()) + 1])
    snapshot.particles.typeid = data.species.astype(np.uint32)
    if data.diameters is not None:
        snapshot.particles.diameter = data.diameters.astype(np.float32)
    snapshot.log = {f"particles/{name}": values for name, values in data.arrays.items()}
    with hoomd.open(str(path), "a" if append else "w") as trajectory:
        trajectory.append(snapshot)
