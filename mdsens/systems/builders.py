"""Builders of particle systems from jax-md pair potentials.

Every builder returns a :class:`~mdsens.System`. Its ``energy(positions, params)``
takes the parameters at call time, so any leaf of ``params`` can be
differentiated. Pair parameters are stored per species (vectors of diameters,
``S x S`` matrices of sigma and epsilon) and expanded to the pairs inside the
energy, so derivatives flow back to the species entries.

Periodic systems of more than :data:`mdsens.neighbors.NEIGHBOR_LIST_THRESHOLD`
(2000) particles, or any periodic system built with ``neighbor_list=True``,
sum their pairs over a neighbor list
(:class:`mdsens.neighbors.NeighborListEnergy`: O(N) time and memory, still
called as ``energy(positions, params)``; interaction range: the largest
diameter of soft spheres, the cutoff of the other potentials; skin: a quarter
of the range). The others, and every system built with ``neighbor_list=False``,
are all-pairs sums with ``N x N`` pair matrices, O(N^2) in time and memory.
Both give the same energy and derivatives. Free clusters are always all pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mdsens._checks import as_float64, check_finite, check_params, check_positive, require_x64
from mdsens._values import count, positive_float
from mdsens.systems.pair_energies import (
    fixed_range,
    largest_diameter,
    soft_sphere_energy,
    species_matrix,
    species_pair_energy,
)
from mdsens.systems.pair_potentials import lennard_jones_pair, morse_pair
from mdsens.systems.space import (
    check_min_image,
    jittered_lattice,
    periodic_space,
    random_positions,
    species_array,
    species_counts,
)
from mdsens.systems.system import System

Array = jax.Array


def _check_size(n: Any, dim: Any, seed: Any, owner: str) -> None:
    count(n, "n", owner, minimum=2)
    count(seed, "seed", owner, minimum=0)
    if count(dim, "dim", owner, minimum=2) not in (2, 3):
        raise ValueError(f"{owner}: dim must be 2 or 3; got {dim!r}.")


def soft_sphere_packing(
    n: int,
    dim: int = 2,
    phi: float = 0.9,
    diameters: Sequence[float] = (1.0, 1.4),
    fractions: Sequence[float] = (0.5, 0.5),
    alpha: float = 2.0,
    epsilon: float = 1.0,
    seed: int = 0,
    per_particle_diameters: bool = False,
    neighbor_list: bool | None = None,
) -> System:
    r"""Soft spheres in a periodic box at packing fraction ``phi``.

    Pair energy :math:`\frac{\epsilon}{\alpha}(1 - r/\sigma_{ij})^\alpha` for
    :math:`r < \sigma_{ij} = (d_i + d_j)/2`, zero beyond (O'Hern et al. 2003;
    ``alpha=2`` is harmonic). The cubic box is sized so that the volume fraction
    of the spheres at the given diameters is exactly ``phi``.

    ``params = {"diameters", "epsilon", "alpha"}``; ``diameters`` has one entry
    per species, or one per particle if ``per_particle_diameters`` (the
    polydisperse variant, e.g. for gradients with respect to every diameter).

    ``neighbor_list``: sum over a neighbor list (True), all pairs (False), or
    a neighbor list if ``n > mdsens.neighbors.NEIGHBOR_LIST_THRESHOLD`` (None).
    The list's interaction range is the largest diameter (read from
    ``params`` at call time), its skin a quarter of it.
    """
    require_x64("soft_sphere_packing")
    _check_size(n, dim, seed, "soft_sphere_packing")
    sizes = np.asarray(as_float64(diameters, "diameters"))
    if sizes.ndim != 1:
        raise ValueError(f"diameters must be a sequence, one per species; got {sizes}.")
    check_finite(sizes, "diameters")
    check_positive(sizes, "diameters")
    check_positive(epsilon, "epsilon")
    check_positive(alpha, "alpha")
    phi = positive_float(phi, "phi", "soft_sphere_packing")
    if not isinstance(per_particle_diameters, (bool, np.bool_)):
        raise ValueError(f"per_particle_diameters must be True or False; got {per_particle_diameters!r}.")
    if len(fractions) != len(sizes):
        raise ValueError(
            f"fractions ({len(fractions)} entries) and diameters ({len(sizes)}) must have one entry per species."
        )
    counts = species_counts(n, fractions)
    species = species_array(counts)
    unit_volume = math.pi / 4.0 if dim == 2 else math.pi / 6.0
    particle_volume = float(np.sum(counts * unit_volume * sizes**dim))
    side = (particle_volume / phi) ** (1.0 / dim)
    box, _ = periodic_space(side, dim)
    check_min_image(box, float(sizes.max()), "phi", "use more particles or a lower phi")
    species_diameters = jnp.asarray(sizes)
    params = check_params(
        {
            "diameters": species_diameters[species] if per_particle_diameters else species_diameters,
            "epsilon": epsilon,
            "alpha": alpha,
            "box": box,
        }
    )
    positions = random_positions(jax.random.PRNGKey(seed), n, box)
    energy = soft_sphere_energy(species, positions, params, neighbor_list)
    return System(
        energy,
        params,
        positions,
        box,
        species,
        dt_max=0.4,
        positive=("diameters", "epsilon", "alpha"),
        interaction_range=largest_diameter,
    )


def _pair_system(
    pair_fn: Callable[..., Array],
    n: int,
    dim: int,
    density: float,
    sigma: Any,
    epsilon: Any,
    fractions: Sequence[float],
    cutoff: float | None,
    seed: int,
    extra_params: dict[str, Any],
    dt_max: float,
    periodic: bool = True,
    neighbor_list: bool | None = None,
) -> System:
    """A system of the pair potential ``pair_fn(r, sigma, epsilon, **extra)`` with
    species matrices of sigma and epsilon, smoothly cut off (C^1) between
    0.8 and 1.0 times ``cutoff`` (in units of the largest sigma), in a periodic
    box at number ``density``, or in free space if not ``periodic``. A neighbor
    list (range: the cutoff) needs a periodic box and a cutoff."""
    require_x64("mdsens.systems")
    _check_size(n, dim, seed, "mdsens.systems")
    counts = species_counts(n, fractions)
    n_species = len(counts)
    species = species_array(counts)
    sigma = species_matrix(sigma, n_species, "sigma")
    epsilon = species_matrix(epsilon, n_species, "epsilon")
    check_positive(sigma, "sigma")
    check_positive(epsilon, "epsilon")
    density = positive_float(density, "density", "mdsens.systems")
    sigma_max = float(jnp.max(sigma))
    side = (n / density) ** (1.0 / dim)

    r_cut = None if cutoff is None else cutoff * sigma_max
    if periodic:
        box, _ = periodic_space(side, dim)
        check_min_image(box, math.inf if r_cut is None else r_cut, "density", "use more particles or a lower density")
        extra_params = {**extra_params, "box": box}
        # The lattice fills the box (somewhat compressed if n is not a perfect power).
        spacing = side / math.ceil(n ** (1.0 / dim) - 1e-9)
    else:
        box = None
        # The pair minimum of Lennard-Jones, 2^(1/6) sigma: a start near equilibrium.
        spacing = 2.0 ** (1.0 / 6.0) * sigma_max
    params = check_params({"sigma": sigma, "epsilon": epsilon, **extra_params})
    # A lattice, not random positions: random starts would overlap and the
    # r^-12 repulsion would blow up.
    positions = jittered_lattice(jax.random.PRNGKey(seed), n, dim, spacing, jitter=0.1)
    energy = species_pair_energy(pair_fn, species, positions, params, r_cut, neighbor_list)
    positive = tuple(name for name in params if name != "box")  # sigma, epsilon (and Morse's alpha)
    interaction_range = None if box is None or r_cut is None else fixed_range(r_cut)
    return System(
        energy, params, positions, box, species, dt_max=dt_max, positive=positive, interaction_range=interaction_range
    )


def lennard_jones(
    n: int,
    dim: int = 3,
    density: float = 1.0,
    sigma: Any = 1.0,
    epsilon: Any = 1.0,
    fractions: Sequence[float] = (1.0,),
    cutoff: float = 2.5,
    seed: int = 0,
    neighbor_list: bool | None = None,
) -> System:
    r"""Lennard-Jones particles :math:`4\epsilon[(\sigma/r)^{12} - (\sigma/r)^6]`
    in a periodic box at number ``density``.

    ``sigma`` and ``epsilon`` are scalars or ``S x S`` species matrices;
    ``params = {"sigma", "epsilon"}`` holds the matrices. The cutoff range
    (``cutoff`` times the largest sigma at build time) is fixed and is not a
    parameter. ``neighbor_list`` as in :func:`soft_sphere_packing`.
    """
    check_positive(cutoff, "cutoff")
    return _pair_system(
        lennard_jones_pair,
        n,
        dim,
        density,
        sigma,
        epsilon,
        fractions,
        cutoff,
        seed,
        {},
        dt_max=0.05,
        neighbor_list=neighbor_list,
    )


def kob_andersen(n: int, density: float = 1.2, seed: int = 0, neighbor_list: bool | None = None) -> System:
    """The Kob-Andersen 80:20 binary Lennard-Jones mixture in 3D (PRE 51, 4626, 1995):
    sigma_AA=1, sigma_AB=0.8, sigma_BB=0.88, epsilon_AA=1, epsilon_AB=1.5,
    epsilon_BB=0.5, cut off at 2.5 sigma_AA, number density 1.2."""
    return lennard_jones(
        n,
        dim=3,
        density=density,
        sigma=[[1.0, 0.8], [0.8, 0.88]],
        epsilon=[[1.0, 1.5], [1.5, 0.5]],
        fractions=(0.8, 0.2),
        cutoff=2.5,
        seed=seed,
        neighbor_list=neighbor_list,
    )


def morse(
    n: int,
    dim: int = 3,
    density: float = 1.0,
    sigma: Any = 1.0,
    epsilon: Any = 1.0,
    alpha: float = 5.0,
    fractions: Sequence[float] = (1.0,),
    cutoff: float = 2.0,
    seed: int = 0,
    neighbor_list: bool | None = None,
) -> System:
    r"""Morse particles :math:`\epsilon[(1 - e^{-\alpha(r-\sigma)})^2 - 1]` in a
    periodic box at number ``density``; ``params = {"sigma", "epsilon", "alpha"}``."""
    check_positive(cutoff, "cutoff")
    check_positive(alpha, "alpha")
    return _pair_system(
        morse_pair,
        n,
        dim,
        density,
        sigma,
        epsilon,
        fractions,
        cutoff,
        seed,
        {"alpha": alpha},
        dt_max=0.05,
        neighbor_list=neighbor_list,
    )


def lennard_jones_cluster(
    n: int, dim: int = 3, sigma: float = 1.0, epsilon: float = 1.0, seed: int = 0, neighbor_list: bool | None = None
) -> System:
    """A free (non-periodic) Lennard-Jones cluster of ``n`` particles with no cutoff,
    started from a compact jittered lattice. Its energy is invariant under rigid
    translations and rotations. Always all pairs: ``neighbor_list=True`` raises
    ``ValueError`` (a neighbor list needs a periodic box and a cutoff)."""
    return _pair_system(
        lennard_jones_pair,
        n,
        dim,
        0.9,
        sigma,
        epsilon,
        (1.0,),
        None,
        seed,
        {},
        dt_max=0.05,
        periodic=False,
        neighbor_list=neighbor_list,
    )
