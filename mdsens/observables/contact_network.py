"""The contact network of soft spheres (params with ``"diameters"``): overlaps,
contacts, rattlers and the contact number."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from mdsens._values import count
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


def _distances(positions: Array, box: Array | None) -> Array:
    """All pair distances under the minimum image of ``box`` (None: free space); diagonal 0."""
    dr = positions[:, None, :] - positions[None, :, :]
    if box is not None:
        fractional = dr @ jnp.linalg.inv(box).T
        dr = (fractional - jnp.round(fractional)) @ box.T
    r2 = jnp.sum(dr**2, axis=-1)
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


def contact_number(
    system: System, positions: Array, params: Any, *, exclude_rattlers: bool = True, threshold: float = 0.0
) -> Array:
    """Mean number of contacts per particle ``z = 2 N_c / N'``, counted among
    the ``N'`` non-rattlers (``exclude_rattlers``) or all particles.
    (At isostaticity ``z = 2 dim`` for large N.)"""
    c = contacts(system, positions, params, threshold)
    if not exclude_rattlers:
        return jnp.sum(c) / positions.shape[0]
    keep = ~rattlers(c, positions.shape[1])
    return jnp.sum(c & keep[:, None] & keep[None, :]) / jnp.maximum(jnp.sum(keep), 1)
