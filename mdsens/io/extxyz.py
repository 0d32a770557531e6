"""Extended XYZ output (ASE's and OVITO's format), exact in float64.

Written here rather than by ``ase.io.write``, which prints floats with eight
decimals: a sensitivity field of 1e-9 would be written as zero. Every float
is written with the shortest decimal that reads back to the same float64
(``repr``), so ``ase.io.read`` (and :func:`mdsens.io.read_ase`) recover the
positions, the box and every array exactly. Needs no optional package.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mdsens.io.frame import frame_of
from mdsens.systems.system import System

#: Symbols of species 0, 1, ... when none are given: elements in order of atomic number.
DEFAULT_SYMBOLS = ("H", "He", "Li", "Be", "B", "C", "N", "O", "F", "Ne")


def _number(value: float) -> str:
    return repr(float(value))


def _lattice(box: np.ndarray, dim: int) -> str:
    vectors = np.zeros((3, 3))
    vectors[:dim, :dim] = box.T  # rows: the box vectors; a 2D system's third vector is zero
    return " ".join(_number(v) for v in vectors.reshape(-1))


def write_extxyz(
    path: str | Path,
    system: System,
    positions: Any = None,
    params: Any = None,
    *,
    arrays: dict[str, Any] | None = None,
    symbols: Sequence[str] | None = None,
    forces: bool = True,
    append: bool = False,
) -> None:
    """Write ``system`` at ``positions`` and ``params`` (default: the system's)
    as one extended-XYZ frame: the box (``Lattice``, ``pbc``), chemical symbols
    (``symbols[k]`` for species ``k``; default :data:`DEFAULT_SYMBOLS`),
    positions, per-particle ``diameter`` (parameters with ``"diameters"``),
    ``forces`` (``-grad E``), the energy, and every entry of ``arrays``
    (``(N,)`` or ``(N, k)``; e.g. ``{"dx_dsigma": dx}``) as a per-particle
    column that ASE reads into ``atoms.arrays`` and OVITO as a particle
    property. 2D systems are written in the xy plane. ``append`` adds a frame."""
    data = frame_of(system, positions, params, arrays=arrays, forces=forces)
    symbols = tuple(DEFAULT_SYMBOLS if symbols is None else symbols)
    if len(symbols) <= int(data.species.max()):
        raise ValueError(f"symbols: {len(symbols)} given for {int(data.species.max()) + 1} species.")
    if any(not s or not s.isalpha() for s in symbols):
        raise ValueError(f"symbols must be chemical symbols; got {symbols}.")
    columns = [("pos", data.positions)]
    if data.diameters is not None:
        columns.append(("diameter", data.diameters))
    columns += list(data.arrays.items())
    properties = "species:S:1:" + ":".join(
        f"{name}:R:{1 if values.ndim == 1 else values.shape[1]}" for name, values in columns
    )
    periodic = data.box is not None
    comment = " ".join(
        ([] if data.box is None else [f'Lattice="{_lattice(data.box, data.dim)}"'])
        + [
            f"Properties={properties}",
            f"energy={_number(data.energy)}",
            'pbc="{}"'.format(" ".join(["T" if periodic else "F"] * data.dim + ["F"] * (3 - data.dim))),
        ]
    )
    table = np.column_stack([values.reshape(len(values), -1) for _, values in columns])
    lines = [str(len(table)), comment]
    lines += [" ".join([symbols[s], *map(_number, row)]) for s, row in zip(data.species, table, strict=True)]
    with open(path, "a" if append else "w") as file:
        file.write("\n".join(lines) + "\n")
