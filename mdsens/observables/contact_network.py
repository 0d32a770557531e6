"""The contact network of soft spheres (params with ``"diameters"``): overlaps,
contacts, rattlers and the contact number.

:func:`overlaps` and :func:`contacts` are ``N x N`` matrices. The contact
number and the rattlers are counted from the contacting pairs instead
(:func:`contact_number_and_rattlers`): for a neighbor-list system the pairs of
its list, O(N x neighbours) memory (at N = 5000 the matrices' pair vectors
alone take 400 MB in 2D); for an all-pairs system the pairs of the contact
matrix. Both give the same counts.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from mdsens._values import count
from mdsens.neighbors import NeighborListEnergy
from mdsens.systems.system import System

Array = jax.Array


def _diameters(system: System, positions: Array, params: Any) -> Array:
    if "diameters" not in params:
        raise ValueError(
            "contacts are defined for soft spheres (params with 'diameters', "
            "mdsens.systems.soft_sphere_packing); this system has none."
        )
    d = params["diameters"]
    return d if d.shape[0] == positions.shape[0] else d[system.species]


def _squared_distances(dr: Array, box: Array | None) -> Array:
    """Squared lengths of the displacements ``dr`` (rows) under the minimum image of ``box`` (None: free space)."""
    if box is not None:
        fractional = dr @ jnp.linalg.inv(box).T
        dr = (fractional - jnp.round(fractional)) @ box.T
    return jnp.sum(dr**2, axis=-1)


def _distances(positions: Array, box: Array | None) -> Array:
    """All pair distances under the minimum image of ``box`` (None: free space); diagonal 0."""
    r2 = _squared_distances(positions[:, None, :] - positions[None, :, :], box)
    eye = jnp.eye(positions.shape[0], dtype=bool)
    # sqrt at 0 has an infinite derivative: keep the diagonal out of it.
    return jnp.where(eye, 0.0, jnp.sqrt(jnp.where(eye, 1.0, r2)))


def overlaps(system: System, positions: Array, params: Any) -> Array:
    """``(N, N)`` dimensionless overlaps ``max(0, 1 - r_ij / sigma_ij)``, ``sigma_ij = (d_i + d_j)/2``;
    zero on the diagonal. Differentiable in positions, diameters and box."""
    positions, params = system.inputs(positions, params)
    d = _diameters(system, positions, params)
    r = _distances(positions, params.get("box"))
    sigma = 0.5 * (d[:, None] + d[None, :])
    eye = jnp.eye(positions.shape[0], dtype=bool)
    return jnp.where(eye | (r >= sigma), 0.0, 1.0 - r / sigma)


def contacts(system: System, positions: Array, params: Any, threshold: float = 0.0) -> Array:
    """``(N, N)`` boolean contact matrix: pairs with overlap ``> threshold``."""
    return overlaps(system, positions, params) > threshold


@jax.jit
def _rattlers(contact_matrix: Array, min_contacts: int) -> Array:
    def remove(state):
        active, _ = state
        count = jnp.sum(contact_matrix & active[None, :], axis=1)
        new = active & (count >= min_contacts)
        return new, jnp.any(new != active)

    active, _ = jax.lax.while_loop(lambda s: s[1], remove, (jnp.ones(contact_matrix.shape[0], bool), jnp.asarray(True)))
    return ~active


def rattlers(contact_matrix: ArrayLike, dim: int) -> Array:
    """Boolean mask of rattlers: repeatedly remove particles with fewer than
    ``dim + 1`` contacts among the particles not yet removed (O'Hern et al. 2003)."""
    contact_matrix = jnp.asarray(contact_matrix, bool)
    if contact_matrix.ndim != 2 or contact_matrix.shape[0] != contact_matrix.shape[1]:
        raise ValueError(f"contact_matrix must be square (N, N); got shape {contact_matrix.shape}.")
    return _rattlers(contact_matrix, count(dim, "dim", "rattlers") + 1)


def _contact_pairs(
    system: System, positions: Array, params: Any, threshold: float
) -> tuple[Array, Array, Array, Array]:
    """``(i, j, in_contact, valid)``: every pair once and whether it overlaps by more
    than ``threshold``. Neighbor-list systems: the pairs of a list built at
    ``positions`` (the energy's capacity; ``valid`` False if it cannot hold them),
    with the overlap of :func:`overlaps` per pair; else the contact matrix's pairs."""
    energy = system.energy
    if not isinstance(energy, NeighborListEnergy):
        c = contacts(system, positions, params, threshold)
        i, j = jnp.triu_indices(positions.shape[0], 1)
        return i, j, c[i, j], jnp.asarray(True)
    positions, params = system.inputs(positions, params)
    d = _diameters(system, positions, params)
    pairs = energy.build(positions, params)
    r = jnp.sqrt(jnp.where(pairs.mask, _squared_distances(positions[pairs.i] - positions[pairs.j], params["box"]), 1.0))
    sigma = 0.5 * (d[pairs.i] + d[pairs.j])
    overlap = jnp.where(pairs.mask & (r < sigma), 1.0 - r / sigma, 0.0)
    return pairs.i, pairs.j, overlap > threshold, energy.valid(pairs)


@jax.jit(static_argnums=(3, 4))
def _pair_rattlers(i: Array, j: Array, contact: Array, n: int, min_contacts: int) -> Array:
    """:func:`rattlers` from the contacting pairs (each once) by segment sums."""

    def remove(state):
        active, _ = state
        into_i, into_j = (contact & active[j]).astype(jnp.int32), (contact & active[i]).astype(jnp.int32)
        counts = jax.ops.segment_sum(into_i, i, n) + jax.ops.segment_sum(into_j, j, n)
        new = active & (counts >= min_contacts)
        return new, jnp.any(new != active)

    active, _ = jax.lax.while_loop(lambda s: s[1], remove, (jnp.ones(n, bool), jnp.asarray(True)))
    return ~active


def contact_number_and_rattlers(
    system: System, positions: Array, params: Any, *, threshold: float = 0.0
) -> tuple[Array, Array]:
    """``(z, rattlers)``: the contact number ``z = 2 N_c / N'`` among the ``N'``
    non-rattlers and the rattler mask (as :func:`rattlers` of :func:`contacts`),
    counted from the contacting pairs: O(N x neighbours) memory for a
    neighbor-list system (``z`` is NaN if the list built at ``positions`` with
    the energy's capacity cannot hold every pair)."""
    n = positions.shape[0]
    i, j, contact, valid = _contact_pairs(system, positions, params, threshold)
    lost = _pair_rattlers(i, j, contact, n, count(system.dim, "dim", "rattlers") + 1)
    backbone = contact & ~lost[i] & ~lost[j]
    z = 2 * jnp.sum(backbone) / jnp.maximum(jnp.sum(~lost), 1)
    return jnp.where(valid, z, jnp.nan), lost


def contact_number(
    system: System, positions: Array, params: Any, *, exclude_rattlers: bool = True, threshold: float = 0.0
) -> Array:
    """Mean number of contacts per particle ``z = 2 N_c / N'``, counted among
    the ``N'`` non-rattlers (``exclude_rattlers``) or all particles.
    (At isostaticity ``z = 2 dim`` for large N.) O(N x neighbours) memory for
    a neighbor-list system (:func:`contact_number_and_rattlers`)."""
    if exclude_rattlers:
        return contact_number_and_rattlers(system, positions, params, threshold=threshold)[0]
    _, _, contact, valid = _contact_pairs(system, positions, params, threshold)
    return jnp.where(valid, 2 * jnp.sum(contact) / positions.shape[0], jnp.nan)
