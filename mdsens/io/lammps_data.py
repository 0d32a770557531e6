"""LAMMPS data files (``read_data``): atom styles ``atomic`` and ``sphere``,
orthogonal and triclinic boxes. No optional package needed.

The box ``xlo xhi``, ``ylo yhi``, ``zlo zhi`` and tilts ``xy xz yz`` is the
upper-triangular matrix with columns ``(xhi - xlo, 0, 0)``,
``(xy, yhi - ylo, 0)``, ``(xz, yz, zhi - zlo)``. Atoms are ordered by id,
unwrapped with their image flags when present; species are the atom types
minus one; ``sphere`` gives per-particle diameters. Everything but the header
and the ``Atoms`` section is ignored.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from mdsens.io.arrays import from_arrays
from mdsens.systems.potentials import Potential
from mdsens.systems.system import System

#: Columns of each supported atom style before the optional image flags.
STYLES = {
    "atomic": ("id", "type", "x", "y", "z"),
    "sphere": ("id", "type", "diameter", "density", "x", "y", "z"),
}
_HEADER = {
    "atoms": re.compile(r"^(\d+)\s+atoms$"),
    "atom types": re.compile(r"^(\d+)\s+atom\s+types$"),
    "xlo xhi": re.compile(r"^(\S+)\s+(\S+)\s+xlo\s+xhi$"),
    "ylo yhi": re.compile(r"^(\S+)\s+(\S+)\s+ylo\s+yhi$"),
    "zlo zhi": re.compile(r"^(\S+)\s+(\S+)\s+zlo\s+zhi$"),
    "xy xz yz": re.compile(r"^(\S+)\s+(\S+)\s+(\S+)\s+xy\s+xz\s+yz$"),
}


def _number(path: str | Path, field: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{path}: {field}: {text!r} is not a number.") from None


def read_lammps_data(path: str | Path, potential: Potential, *, atom_style: str | None = None, dim: int = 3) -> System:
    """A :class:`~mdsens.System` of ``potential`` at the configuration of the
    LAMMPS data file ``path``.

    Args:
        atom_style: ``"atomic"`` or ``"sphere"`` (default: the ``Atoms # style``
            comment of the file, else ``"atomic"``).
        dim: 3, or 2 (LAMMPS's 2D: no tilts ``xz``, ``yz``, all ``z`` equal).

    ``ValueError`` naming the file and the field (header line, ``Atoms`` row
    and column) for missing or malformed entries, unknown atom types, NaN and
    wrong dimensions."""
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3; got {dim!r}.")
    lines = Path(path).read_text().splitlines()
    header: dict[str, tuple[str, ...]] = {}
    rows: list[tuple[int, list[str]]] = []
    section = None
    for number, line in enumerate(lines[1:], start=2):  # the first line is a title
        text, _, comment = line.partition("#")
        text = text.strip()
        if not text:
            continue
        if text[0].isalpha():
            section = text
            if text == "Atoms" and atom_style is None and comment.strip():
                atom_style = comment.split()[0]
            continue
        if section is None:
            for key, pattern in _HEADER.items():
                match = pattern.match(" ".join(text.split()))
                if match:
                    header[key] = match.groups()
        elif section == "Atoms":
            rows.append((number, text.split()))
    atom_style = atom_style or "atomic"
    if atom_style not in STYLES:
        raise ValueError(f"{path}: atom_style: {atom_style!r} is not supported; use one of {sorted(STYLES)}.")
    for key in ("atoms", "atom types", "xlo xhi", "ylo yhi", "zlo zhi"):
        if key not in header:
            raise ValueError(f"{path}: header: no '{key}' line.")
    n, n_types = int(header["atoms"][0]), int(header["atom types"][0])
    if len(rows) != n:
        raise ValueError(f"{path}: Atoms: {len(rows)} rows for the {n} atoms of the header.")

    columns = STYLES[atom_style]
    names = (*columns, "ix", "iy", "iz")
    table = np.zeros((n, len(names)))  # image flags 0 unless given
    for k, (number, values) in enumerate(rows):
        if len(values) not in (len(columns), len(names)):
            raise ValueError(
                f"{path}: Atoms line {number}: atom_style {atom_style} has the columns {' '.join(columns)} "
                f"[ix iy iz]; got {len(values)} values."
            )
        for c, value in enumerate(values):
            table[k, c] = _number(path, f"Atoms line {number} column {names[c]}", value)
    table = table[np.argsort(table[:, 0], kind="stable")]
    types = table[:, 1]
    if np.any((types < 1) | (types > n_types) | (types != np.round(types))):
        bad = types[(types < 1) | (types > n_types) | (types != np.round(types))][0]
        raise ValueError(f"{path}: Atoms column type: {bad:g} is not one of the {n_types} atom types.")

    lx, ly, lz = (
        np.diff([_number(path, f"header '{key}'", value) for value in header[key]])[0]
        for key in ("xlo xhi", "ylo yhi", "zlo zhi")
    )
    xy, xz, yz = (_number(path, "header 'xy xz yz'", value) for value in header.get("xy xz yz", ("0", "0", "0")))
    box = np.array([[lx, xy, xz], [0.0, ly, yz], [0.0, 0.0, lz]])
    at = {name: c for c, name in enumerate(columns)}
    positions = table[:, [at["x"], at["y"], at["z"]]] + table[:, len(columns) :] @ box.T
    if dim == 2:
        if xz != 0 or yz != 0 or np.ptp(table[:, at["z"]]) > 0:
            raise ValueError(f"{path}: Atoms column z: a 2D configuration (dim=2) needs all z equal, no xz, yz tilt.")
        positions, box = positions[:, :2], box[:2, :2]
    return from_arrays(
        positions,
        potential,
        box=box,
        species=(types - 1).astype(np.int32),
        diameters=table[:, at["diameter"]] if "diameter" in at else None,
        source=str(path),
    )
