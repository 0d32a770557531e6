"""Crystals of two materials potentials with their published parameters as
differentiable ``params``: Stillinger-Weber silicon (diamond) and Gupta gold
(fcc, through ``jax_md.energy.gupta_potential``), perfect or with a vacancy.

``dx*/d(parameter)`` and ``dE*/d(parameter)`` of a relaxed defect work as for
the soft spheres: every entry of ``params`` (and the box, ``params["box"]``) is
a parameter of :func:`mdsens.equilibrium` and its derivatives. Units: eV and
angstrom (FIRE's unit mass: time steps are in angstrom / sqrt(eV)).
"""

from __future__ import annotations

import jax
import numpy as np
from jax_md import energy as jmd_energy

from mdsens._checks import require_x64
from mdsens.systems.potentials import JaxMD, Potential, StillingerWeber
from mdsens.systems.stillinger_weber import SILICON
from mdsens.systems.system import System

Array = jax.Array

#: Fractional sites of the conventional cubic cells.
DIAMOND_SITES = np.array(
    [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0],
     [0.25, 0.25, 0.25], [0.25, 0.75, 0.75], [0.75, 0.25, 0.75], [0.75, 0.75, 0.25]]
)  # fmt: skip
FCC_SITES = DIAMOND_SITES[:4]

#: The published relaxed vacancy formation energy of Stillinger-Weber silicon
#: (eV, at constant volume), for comparison with :func:`mdsens.defects.vacancy_formation`,
#: and the ``epsilon`` it was computed with: Balamane et al. rescaled epsilon to
#: 2.315 eV (silicon's cohesive energy), :data:`~mdsens.systems.stillinger_weber.SILICON`
#: keeps the original 2.1683 eV, and every SW energy is proportional to epsilon.
#: The unrelaxed value is exactly ``2 epsilon`` in any cell.
SW_VACANCY_FORMATION_ENERGY = {
    "energy": 2.82,
    "epsilon": 2.315,
    "reference": "H. Balamane, T. Halicioglu and W. A. Tiller, Phys. Rev. B 46, 2250 (1992)",
}

#: Gupta gold (eV, angstrom) as ``jax_md.energy.GUPTA_GOLD55_DICT``: Garzon and
#: Posada-Amarillas, Phys. Rev. B 54, 11796 (1996), after Jellinek (1996),
#: with ``E = U_n/2 sum_i [A sum_j e^{-p(r_ij/r_0n - 1)} - (sum_j e^{-2q(r_ij/r_0n - 1)})^{1/2}]``.
GUPTA_GOLD = {"p": 10.15, "q": 4.13, "r_0n": 2.96, "U_n": 3.454, "A": 0.118428}
#: The Gupta cutoff of ``jax_md.energy.gupta_gold55`` (angstrom; between the
#: seventh and eighth neighbour shells of fcc gold).
GUPTA_CUTOFF = 8.0


def crystal(sites: np.ndarray, cells: int, lattice_constant: float) -> tuple[np.ndarray, np.ndarray]:
    """``(positions, box)`` of ``cells^3`` conventional cubic cells with the
    fractional ``sites``: ``(cells^3 len(sites), 3)`` positions (cell by cell)
    and the diagonal box matrix."""
    if not isinstance(cells, (int, np.integer)) or cells < 1:
        raise ValueError(f"cells must be a positive integer; got {cells!r}.")
    if not lattice_constant > 0:
        raise ValueError(f"lattice_constant must be positive; got {lattice_constant!r}.")
    grid = np.stack(np.meshgrid(*[np.arange(cells)] * 3, indexing="ij"), axis=-1).reshape(-1, 1, 3)
    positions = ((grid + sites[None]) * lattice_constant).reshape(-1, 3)
    return positions, np.eye(3) * lattice_constant * cells


def vacancy_start(positions: np.ndarray, box: np.ndarray, site: int, push: float) -> np.ndarray:
    """``positions`` without ``site``, its nearest neighbours moved towards the
    vacant site by ``push`` times their distance to it (a start for the
    relaxation; 0: the unrelaxed vacancy)."""
    kept = np.delete(positions, site, axis=0)
    d = kept - positions[site]
    fractional = d @ np.linalg.inv(box).T
    d = (fractional - np.round(fractional)) @ box.T
    r = np.linalg.norm(d, axis=1)
    nearest = r < r.min() * (1.0 + 1e-6)
    kept[nearest] -= push * d[nearest]
    return kept


def _crystal_system(
    potential: Potential, sites: np.ndarray, cells: int, lattice_constant: float, vacancy: bool, push: float
) -> System:
    require_x64("mdsens.systems.materials")
    positions, box = crystal(sites, cells, lattice_constant)
    if vacancy:
        positions = vacancy_start(positions, box, 0, push)
    return potential.system(positions, box, np.zeros(len(positions), np.int32), None)


def stillinger_weber_silicon(
    cells: int = 2, lattice_constant: float = 5.431, vacancy: bool = False, push: float = 0.2, **changes: float
) -> System:
    """Diamond-cubic silicon, ``8 cells^3`` atoms (``cells >= 2``: the box
    must hold twice the 3.77 angstrom range) with Stillinger-Weber's
    parameters (:data:`~mdsens.systems.stillinger_weber.SILICON`, some of them
    changed by ``changes``); ``lattice_constant`` 5.431 angstrom (experiment;
    the potential's zero-pressure value is 5.43095).

    ``vacancy``: without the atom at the origin; its four neighbours start
    ``push`` (a fraction of the bond) towards the vacant site. The unrelaxed
    vacancy (``push=0``) is itself a local minimum of Stillinger-Weber: the
    neighbours are 3.84 angstrom apart, beyond the cutoff ``a sigma = 3.77``,
    and feel no force; 0.2 starts the relaxation in the basin of the relaxed
    (inward, tetrahedral) vacancy."""
    unknown = set(changes) - set(SILICON)
    if unknown:
        raise ValueError(f"unknown Stillinger-Weber parameters {sorted(unknown)}; known: {sorted(SILICON)}.")
    potential = StillingerWeber({**SILICON, **changes})
    return _crystal_system(potential, DIAMOND_SITES, cells, lattice_constant, vacancy, push)


def gupta_gold(cells: int = 4, lattice_constant: float = 4.186, vacancy: bool = False, push: float = 0.0) -> System:
    """Fcc gold, ``4 cells^3`` atoms (``cells >= 4``: the box must hold twice
    the 8 angstrom cutoff) at ``lattice_constant`` 4.186 angstrom, the
    zero-pressure value of these parameters (fitted to Au55 clusters; the
    experimental bulk value is 4.08), with the Gupta potential of
    ``jax_md.energy.gupta_potential`` and :data:`GUPTA_GOLD` as ``params``
    (wrapped by :class:`~mdsens.systems.potentials.JaxMD`: the example of any
    JAX-MD energy with named parameters). ``vacancy`` and ``push`` as in
    :func:`stillinger_weber_silicon`."""
    potential = JaxMD(
        jmd_energy.gupta_potential, GUPTA_GOLD, fixed=(("cutoff", GUPTA_CUTOFF),), reach=GUPTA_CUTOFF, dt_max=0.2
    )
    return _crystal_system(potential, FCC_SITES, cells, lattice_constant, vacancy, push)
