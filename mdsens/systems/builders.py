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
from jax_md import energy as jmd_energy
from jax_md import smap, space

from mdsens import neighbors as nl
from mdsens._checks import as_float64, check_finite, check_params, check_positive, require_x64
from mdsens.systems.energy import FunctionEnergy
from mdsens.systems.pair_potentials import lennard_jones_pair, morse_pair, smooth_cutoff, without_self_pairs
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
Params = dict[str, Array]


def _check_size(n: int, dim: int) -> None:
    if not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n must be an integer >= 2; got {n!r}.")
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3; got {dim!r}.")


def _pair_matrix(species_matrix: Array, species: Array) -> Array:
    """Expand an S x S species matrix to the N x N matrix of particle pairs."""
    return species_matrix[species[:, None], species[None, :]]


def _species_matrix(values: Any, n_species: int, name: str) -> Array:
    """Accept a scalar or an S x S symmetric matrix, return the S x S matrix."""
    values = as_float64(values, name)
    if values.ndim == 0:
        values = jnp.full((n_species, n_species), values)
    if values.shape != (n_species, n_species):
        raise ValueError(
            f"{name} must be a scalar or a {n_species} x {n_species} matrix; got "
            f"shape {values.shape}."
        )
    check_finite(values, name)
    if not np.allclose(values, values.T):
        raise ValueError(f"{name} must be symmetric.")
    return values


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
    _check_size(n, dim)
    diameters = np.asarray(as_float64(diameters, "diameters"))
    if diameters.ndim != 1:
        raise ValueError(f"diameters must be a sequence, one per species; got {diameters}.")
    check_finite(diameters, "diameters")
    check_positive(diameters, "diameters")
    check_positive(epsilon, "epsilon")
    check_positive(alpha, "alpha")
    check_finite(np.asarray([phi, alpha, epsilon], dtype=np.float64), "phi, alpha and epsilon")
    if len(fractions) != len(diameters):
        raise ValueError(
            f"fractions ({len(fractions)} entries) and diameters ({len(diameters)}) "
            "must have one entry per species."
        )
    if not phi > 0:
        raise ValueError(f"phi must be positive; got {phi}.")
    counts = species_counts(n, fractions)
    species = species_array(counts)
    unit_volume = math.pi / 4.0 if dim == 2 else math.pi / 6.0
    particle_volume = float(np.sum(counts * unit_volume * diameters**dim))
    side = (particle_volume / phi) ** (1.0 / dim)
    check_min_image(side, float(diameters.max()), "phi")

    box, displacement_fn = periodic_space(side, dim)
    pair_energy = smap.pair(jmd_energy.soft_sphere, space.metric(displacement_fn))

    def energy_fn(positions: Array, params: Params) -> Array:
        d = params["diameters"]
        d = d if d.shape[0] == positions.shape[0] else d[species]
        sigma = 0.5 * (d[:, None] + d[None, :])
        return pair_energy(
            positions, box=params["box"], sigma=sigma, epsilon=params["epsilon"], alpha=params["alpha"]
        )

    species_diameters = jnp.asarray(diameters)
    params = check_params(
        {
            "diameters": species_diameters[species] if per_particle_diameters else species_diameters,
            "epsilon": epsilon,
            "alpha": alpha,
            "box": box,
        }
    )
    positions = random_positions(jax.random.PRNGKey(seed), n, box)
    energy = (
        _soft_sphere_neighbor_energy(species, positions, params)
        if nl.use_neighbor_list(n, neighbor_list)
        else FunctionEnergy(energy_fn)
    )
    return System(energy, params, positions, box, species, dt_max=0.4)


def _soft_sphere_neighbor_energy(species: Array, positions: Array, params: Params) -> nl.NeighborListEnergy:
    n = positions.shape[0]

    def pair_params(p: Params, i: Array, j: Array) -> Params:
        d = p["diameters"]
        if d.shape[0] != n:
            d_i, d_j = d[species[i]], d[species[j]]
        else:
            d_i, d_j = d[i], d[j]
        return {"sigma": 0.5 * (d_i + d_j), "epsilon": p["epsilon"], "alpha": p["alpha"]}

    def pair_energy(r: Array, pp: Params) -> Array:
        return jmd_energy.soft_sphere(r, pp["sigma"], pp["epsilon"], pp["alpha"])

    return nl.NeighborListEnergy.create(
        pair_energy, pair_params, lambda p: jnp.max(p["diameters"]), positions, params
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
    _check_size(n, dim)
    counts = species_counts(n, fractions)
    n_species = len(counts)
    species = species_array(counts)
    sigma = _species_matrix(sigma, n_species, "sigma")
    epsilon = _species_matrix(epsilon, n_species, "epsilon")
    check_positive(sigma, "sigma")
    check_positive(epsilon, "epsilon")
    check_finite(np.asarray(density, dtype=np.float64), "density")
    check_positive(density, "density")
    sigma_max = float(jnp.max(sigma))
    side = (n / density) ** (1.0 / dim)

    if cutoff is not None:
        r_cut = cutoff * sigma_max
        pair_fn = smooth_cutoff(pair_fn, 0.8 * r_cut, r_cut)
    if periodic:
        check_min_image(side, cutoff * sigma_max if cutoff is not None else math.inf)
        box, displacement_fn = periodic_space(side, dim)
        extra_params = {**extra_params, "box": box}
        # The lattice fills the box (somewhat compressed if n is not a perfect power).
        spacing = side / math.ceil(n ** (1.0 / dim) - 1e-9)
    else:
        displacement_fn, _ = space.free()
        box = None
        # The pair minimum of Lennard-Jones, 2^(1/6) sigma: a start near equilibrium.
        spacing = 2.0 ** (1.0 / 6.0) * sigma_max
    pair_energy = smap.pair(without_self_pairs(pair_fn), space.metric(displacement_fn))

    def energy_fn(positions: Array, params: Params) -> Array:
        pair_params = {
            name: _pair_matrix(params[name], species) if name in ("sigma", "epsilon") else value
            for name, value in params.items()
        }
        return pair_energy(positions, **pair_params)

    params = check_params({"sigma": sigma, "epsilon": epsilon, **extra_params})
    # A lattice, not random positions: random starts would overlap and the
    # r^-12 repulsion would blow up.
    positions = jittered_lattice(jax.random.PRNGKey(seed), n, dim, spacing, jitter=0.1)
    energy: nl.NeighborListEnergy | FunctionEnergy = FunctionEnergy(energy_fn)
    if nl.use_neighbor_list(n, neighbor_list):
        if not (periodic and cutoff is not None):
            if neighbor_list:
                raise ValueError("neighbor_list=True needs a periodic box and a finite cutoff.")
        else:
            energy = _pair_neighbor_energy(pair_fn, species, r_cut, positions, params)
    return System(energy, params, positions, box, species, dt_max=dt_max)


def _pair_neighbor_energy(
    pair_fn: Callable[..., Array], species: Array, r_cut: float, positions: Array, params: Params
) -> nl.NeighborListEnergy:
    """Species-matrix pair potential (already cut off at ``r_cut``) over a neighbor list."""
    extra = tuple(name for name in params if name not in ("sigma", "epsilon", "box"))

    def pair_params(p: Params, i: Array, j: Array) -> Params:
        # Both orders, as the all-pairs sum: the same values (symmetric matrices)
        # and the same derivatives with respect to each matrix entry.
        s_i, s_j = species[i], species[j]
        both = lambda m: 0.5 * (m[s_i, s_j] + m[s_j, s_i])  # noqa: E731
        return {"sigma": both(p["sigma"]), "epsilon": both(p["epsilon"]), **{name: p[name] for name in extra}}

    def pair_energy(r: Array, pp: Params) -> Array:
        return pair_fn(r, **pp)

    return nl.NeighborListEnergy.create(
        pair_energy, pair_params, lambda p: jnp.asarray(r_cut, jnp.float64), positions, params
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
        lennard_jones_pair, n, dim, density, sigma, epsilon, fractions, cutoff, seed, {}, dt_max=0.05,
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
        morse_pair, n, dim, density, sigma, epsilon, fractions, cutoff, seed, {"alpha": alpha}, dt_max=0.05,
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
        lennard_jones_pair, n, dim, 0.9, sigma, epsilon, (1.0,), None, seed, {}, dt_max=0.05,
        periodic=False, neighbor_list=neighbor_list,
    )
