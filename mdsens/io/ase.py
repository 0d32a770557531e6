"""Configurations from ASE: an ``ase.Atoms``, or any file ASE reads (extended
XYZ among them). Needs the optional package ``ase`` (``pip install 'mdsens[io]'``).

ASE's cell has the box vectors as rows; the system's box has them as columns
and upper triangular (:func:`mdsens.io.upper_triangular`): a general cell is
rotated, positions with it. Species are the chemical symbols, numbered in the
order of ``species`` (default: by atomic number); per-particle diameters come
from a ``diameter`` array (a column of extended XYZ) when there is one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mdsens.io._optional import require
from mdsens.io.arrays import from_arrays
from mdsens.systems.potentials import Potential
from mdsens.systems.system import System


def from_ase(
    atoms: Any,
    potential: Potential,
    *,
    species: Sequence[str] | None = None,
    dim: int = 3,
    source: str = "Atoms",
) -> System:
    """A :class:`~mdsens.System` of ``potential`` at the configuration of the
    ``ase.Atoms`` ``atoms``.

    Args:
        species: chemical symbols in the order of mdsens's species 0, 1, ...
            (default: the symbols present, by atomic number); others raise.
        dim: 3, or 2 for a configuration in the xy plane (all z equal, the
            first two cell vectors in the plane, periodic in x and y or not at all).
        source: names the configuration in error messages.

    Periodic in every direction (``pbc``) or in none (free space): ``ValueError``
    otherwise, as for every field :func:`mdsens.io.from_arrays` rejects."""
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3; got {dim!r}.")
    positions = np.asarray(atoms.get_positions(), np.float64)
    cell = np.asarray(atoms.get_cell()[:], np.float64)
    pbc = np.asarray(atoms.get_pbc())[:dim]
    if dim == 2:
        if len(positions) and np.ptp(positions[:, 2]) > 0:
            raise ValueError(f"{source}: positions: z varies, so this is not a 2D configuration (dim=2).")
        if pbc.any() and np.any(cell[:2, 2] != 0):
            raise ValueError(f"{source}: cell: the first two cell vectors must lie in the xy plane for dim=2.")
        positions, cell = positions[:, :2], cell[:2, :2]
    if pbc.any() and not pbc.all():
        raise ValueError(f"{source}: pbc: {atoms.get_pbc().tolist()}; mdsens needs every direction periodic or none.")
    symbols = atoms.get_chemical_symbols()
    names = sorted(set(symbols), key=lambda s: atoms.numbers[symbols.index(s)]) if species is None else list(species)
    unknown = sorted(set(symbols) - set(names))
    if unknown:
        raise ValueError(f"{source}: species: {unknown} not among the species {names}.")
    index = {name: k for k, name in enumerate(names)}
    diameters = atoms.arrays.get("diameter")
    return from_arrays(
        positions,
        potential,
        box=cell.T if pbc.all() else None,
        species=np.asarray([index[s] for s in symbols], np.int32),
        diameters=diameters,
        source=source,
    )


def read_ase(
    path: str | Path,
    potential: Potential,
    *,
    index: int = -1,
    format: str | None = None,
    species: Sequence[str] | None = None,
    dim: int = 3,
) -> System:
    """:func:`from_ase` of frame ``index`` of any file ASE reads (``format``:
    ASE's name for it, default guessed from the file), e.g. the extended XYZ
    that :func:`mdsens.io.write_extxyz` writes. ``ValueError`` naming the file
    if ASE cannot read it."""
    ase_io = require("ase.io", "mdsens.io.read_ase")
    try:
        atoms = ase_io.read(path, index=index, format=format)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, IndexError) as error:
        raise ValueError(f"{path}: ASE could not read it: {error}") from error
    return from_ase(atoms, potential, species=species, dim=dim, source=str(path))
