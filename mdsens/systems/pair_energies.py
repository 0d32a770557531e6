"""Pair energies of species (soft spheres, and any pair potential with species
matrices of sigma and epsilon): the energy constructors that the builders
(:mod:`mdsens.systems.builders`) and the readers (:mod:`mdsens.io`) share.

Each returns an :class:`~mdsens.systems.Energy` called as
``energy(positions, params)``: a sum over all pairs with ``N x N`` pair
matrices, or, for periodic systems that ask for it, over a neighbor list
(:class:`mdsens.neighbors.NeighborListEnergy`). Periodic energies read the box
from ``params["box"]`` at call time (a ``(dim, dim)`` matrix whose columns are
the box vectors; upper triangular for neighbor lists); energies whose
``params`` hold no ``"box"`` are in free space.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from jax_md import smap, space

from mdsens import neighbors as nl
from mdsens._checks import as_float64, check_finite
from mdsens.systems.energy import Energy, FunctionEnergy
from mdsens.systems.pair_potentials import smooth_cutoff, soft_sphere_pair, without_self_pairs
from mdsens.systems.space import periodic_space

Array = jax.Array
Params = dict[str, Array]


def _displacement(params: Params, dim: int) -> Any:
    if "box" in params:
        return periodic_space(1.0, dim)[1]
    return space.free()[0]


def _pair_matrix(species_matrix: Array, species: Any) -> Array:
    """Expand an S x S species matrix to the N x N matrix of particle pairs."""
    return species_matrix[species[:, None], species[None, :]]


def species_matrix(values: Any, n_species: int, name: str) -> Array:
    """Accept a scalar or an S x S symmetric matrix, return the S x S matrix."""
    values = as_float64(values, name)
    if values.ndim == 0:
        values = jnp.full((n_species, n_species), values)
    if values.shape != (n_species, n_species):
        raise ValueError(f"{name} must be a scalar or a {n_species} x {n_species} matrix; got shape {values.shape}.")
    check_finite(values, name)
    if not np.allclose(values, values.T):
        raise ValueError(f"{name} must be symmetric.")
    return values


def soft_sphere_energy(
    species: ArrayLike, positions: ArrayLike, params: Params, neighbor_list: bool | None = None
) -> Energy:
    r"""Soft spheres :math:`\frac{\epsilon}{\alpha}(1 - r/\sigma_{ij})^\alpha`,
    :math:`\sigma_{ij} = (d_i + d_j)/2`, with ``params = {"diameters",
    "epsilon", "alpha"}`` (and ``"box"``). ``diameters`` has one entry per
    species or one per particle (told apart by its length at call time).

    ``neighbor_list`` as :func:`mdsens.neighbors.use_neighbor_list`; the list's
    interaction range is the largest diameter, its skin a quarter of it
    (``positions`` and ``params`` size it). A list needs a periodic box:
    ``neighbor_list=True`` without one raises ``ValueError``, None falls back
    to all pairs."""
    n, dim = np.shape(positions)
    if nl.use_neighbor_list(n, neighbor_list):
        if "box" in params:
            return _soft_sphere_neighbor_energy(species, positions, params)
        if neighbor_list:
            raise ValueError("neighbor_list=True needs a periodic box.")
    pair_energy = smap.pair(soft_sphere_pair, space.metric(_displacement(params, dim)))

    def energy_fn(positions: Array, params: Params) -> Array:
        d = params["diameters"]
        d = d if d.shape[0] == positions.shape[0] else d[species]
        sigma = 0.5 * (d[:, None] + d[None, :])
        box = {"box": params["box"]} if "box" in params else {}
        return pair_energy(positions, sigma=sigma, epsilon=params["epsilon"], alpha=params["alpha"], **box)

    return FunctionEnergy(energy_fn)


def largest_diameter(params: Params) -> Array:
    """The interaction range of soft spheres: the largest diameter."""
    return jnp.max(params["diameters"])


def fixed_range(r_cut: float) -> Callable[[Params], Array]:
    """The interaction range of a potential cut off at the distance ``r_cut``."""
    return lambda params: jnp.asarray(r_cut, jnp.float64)


def _soft_sphere_neighbor_energy(species: Any, positions: Any, params: Params) -> nl.NeighborListEnergy:
    n = positions.shape[0]

    def pair_params(p: Params, i: Array, j: Array) -> Params:
        d = p["diameters"]
        if d.shape[0] != n:
            d_i, d_j = d[species[i]], d[species[j]]
        else:
            d_i, d_j = d[i], d[j]
        return {"sigma": 0.5 * (d_i + d_j), "epsilon": p["epsilon"], "alpha": p["alpha"]}

    def pair_energy(r: Array, pp: Params) -> Array:
        return soft_sphere_pair(r, pp["sigma"], pp["epsilon"], pp["alpha"])

    return nl.NeighborListEnergy.create(pair_energy, pair_params, largest_diameter, positions, params)


def species_pair_energy(
    pair_fn: Callable[..., Array],
    species: ArrayLike,
    positions: ArrayLike,
    params: Params,
    r_cut: float | None,
    neighbor_list: bool | None = None,
) -> Energy:
    """The pair potential ``pair_fn(r, sigma, epsilon, **extra)`` with ``S x S``
    species matrices ``params["sigma"]`` and ``params["epsilon"]`` (every other
    entry of ``params`` but ``"box"`` is passed on as ``extra``), smoothly cut
    off (:func:`~mdsens.systems.pair_potentials.smooth_cutoff`) between 0.8 and
    1.0 times ``r_cut`` (a distance; None: no cutoff).

    ``neighbor_list`` as :func:`mdsens.neighbors.use_neighbor_list`; a list
    (range ``r_cut``) needs a periodic box and a cutoff: ``neighbor_list=True``
    without them raises ``ValueError``, None falls back to all pairs."""
    n, dim = np.shape(positions)
    if r_cut is not None:
        pair_fn = smooth_cutoff(pair_fn, 0.8 * r_cut, r_cut)
    if nl.use_neighbor_list(n, neighbor_list):
        if "box" in params and r_cut is not None:
            return _pair_neighbor_energy(pair_fn, species, r_cut, positions, params)
        if neighbor_list:
            raise ValueError("neighbor_list=True needs a periodic box and a finite cutoff.")
    pair_energy = smap.pair(without_self_pairs(pair_fn), space.metric(_displacement(params, dim)))

    def energy_fn(positions: Array, params: Params) -> Array:
        pair_params = {
            name: _pair_matrix(params[name], species) if name in ("sigma", "epsilon") else value
            for name, value in params.items()
        }
        return pair_energy(positions, **pair_params)

    return FunctionEnergy(energy_fn)


def _pair_neighbor_energy(
    pair_fn: Callable[..., Array], species: Any, r_cut: float, positions: Any, params: Params
) -> nl.NeighborListEnergy:
    """Species-matrix pair potential (already cut off at ``r_cut``) over a neighbor list."""
    extra = tuple(name for name in params if name not in ("sigma", "epsilon", "box"))
    species = jnp.asarray(species)  # indexed by traced pairs (lists built under jit)

    def pair_params(p: Params, i: Array, j: Array) -> Params:
        # Both orders, as the all-pairs sum: the same values (symmetric matrices)
        # and the same derivatives with respect to each matrix entry.
        s_i, s_j = species[i], species[j]
        both = lambda m: 0.5 * (m[s_i, s_j] + m[s_j, s_i])  # noqa: E731
        return {"sigma": both(p["sigma"]), "epsilon": both(p["epsilon"]), **{name: p[name] for name in extra}}

    def pair_energy(r: Array, pp: Params) -> Array:
        return pair_fn(r, **pp)

    return nl.NeighborListEnergy.create(pair_energy, pair_params, fixed_range(r_cut), positions, params)
