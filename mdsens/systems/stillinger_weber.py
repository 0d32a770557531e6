r"""The Stillinger-Weber potential with every parameter differentiable.

.. math::
    E = \sum_{i<j} \phi_2(r_{ij}) + \sum_i \sum_{j<k} \phi_3(r_{ij}, r_{ik}, \theta_{jik}),

    \phi_2(r) = \epsilon A \left[B (\sigma/r)^p - (\sigma/r)^q\right] e^{\sigma/(r - a\sigma)},

    \phi_3 = \epsilon \lambda\, e^{\gamma\sigma/(r_{ij} - a\sigma) + \gamma\sigma/(r_{ik} - a\sigma)}
             (\cos\theta_{jik} - \cos\theta_0)^2,

both zero beyond ``r = a sigma`` (Stillinger and Weber, Phys. Rev. B 31, 5262,
1985; LAMMPS ``pair_style sw`` with the names of its parameter file, without
its ``tol``). Every derivative of every order vanishes at the cutoff, so the
derivatives with respect to ``a`` and ``sigma`` (which move it) are exact.

Not ``jax_md.energy.stillinger_weber``: it evaluates ``B (r/sigma)^-4`` at the
self pairs (``r = 0``) before masking them, which makes its derivatives with
respect to ``B`` and ``sigma`` NaN, and it sums over all ``N^3`` triples. Here
the neighbours of each atom are its ``max_neighbors`` nearest atoms (chosen at
every call, without gradient: the choice is locally constant), and the energy
equals the full sum, with all its derivatives, as long as every atom has fewer
than ``max_neighbors`` atoms within ``a sigma``; otherwise it is NaN (a
relaxation then stops with ``reason="nonfinite"``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array

#: Stillinger and Weber's silicon (Phys. Rev. B 31, 5262, 1985) in eV and
#: angstrom, as in LAMMPS's ``Si.sw``; ``epsilon`` is their 50 kcal/mol.
SILICON: dict[str, float] = {
    "epsilon": 2.1683,
    "sigma": 2.0951,
    "a": 1.80,
    "lambda": 21.0,
    "gamma": 1.20,
    "cos_theta0": -1.0 / 3.0,
    "A": 7.049556277,
    "B": 0.6022245584,
    "p": 4.0,
    "q": 0.0,
}


def stillinger_weber_range(params: dict[str, Array]) -> Array:
    """The interaction range ``a sigma``."""
    return params["a"] * params["sigma"]


def minimum_image(box: Array | None, d: Array) -> Array:
    """Displacements ``d`` (``(..., dim)``) mapped to their nearest periodic image
    in the box whose columns are the box vectors (None: free space)."""
    if box is None:
        return d
    s = d @ jnp.linalg.inv(box).T
    return (s - jnp.round(s)) @ box.T


@dataclasses.dataclass(frozen=True)
class StillingerWeberEnergy:
    """``energy(positions, params)`` of :data:`SILICON`-like ``params`` (and a
    periodic ``params["box"]``, or none for free space). Equal instances are
    equal functions (one compilation)."""

    max_neighbors: int = 16

    def __call__(self, positions: Array, params: dict[str, Array]) -> Array:
        box = params.get("box")
        n = positions.shape[0]
        k = min(self.max_neighbors, n - 1)
        r_cut = stillinger_weber_range(params)
        # The k nearest atoms of each atom, without gradient (a locally constant choice).
        fixed = jax.lax.stop_gradient((positions, box))
        r2_all = jnp.sum(minimum_image(fixed[1], fixed[0][None, :, :] - fixed[0][:, None, :]) ** 2, axis=-1)
        farthest, neighbors = jax.lax.top_k(-(r2_all + jnp.where(jnp.eye(n, dtype=bool), jnp.inf, 0.0)), k)
        # Complete if the farthest candidate is beyond the cutoff (or all atoms are candidates).
        complete = jnp.all(-farthest[:, -1] >= r_cut**2) | (k == n - 1)

        d = minimum_image(box, positions[neighbors] - positions[:, None, :])  # (N, k, dim), x_j - x_i
        r = jnp.sqrt(jnp.sum(d**2, axis=-1))
        inside = r < r_cut
        # Outside the cutoff, evaluate at a harmless distance and mask: no inf * 0 in derivatives.
        r_safe = jnp.where(inside, r, 0.5 * r_cut)
        sigma, epsilon = params["sigma"], params["epsilon"]
        radial = params["A"] * (params["B"] * (sigma / r_safe) ** params["p"] - (sigma / r_safe) ** params["q"])
        two_body = 0.5 * jnp.sum(jnp.where(inside, radial * jnp.exp(sigma / (r_safe - r_cut)), 0.0))

        decay = jnp.where(inside, jnp.exp(params["gamma"] * sigma / (r_safe - r_cut)), 0.0)
        unit = d / r_safe[..., None]
        cosines = jnp.einsum("nja,nka->njk", unit, unit)
        angular = decay[:, :, None] * decay[:, None, :] * (cosines - params["cos_theta0"]) ** 2
        # Ordered pairs j != k count every triple twice.
        three_body = 0.5 * params["lambda"] * jnp.sum(jnp.where(jnp.eye(k, dtype=bool), 0.0, angular))
        return jnp.where(complete, epsilon * (two_body + three_body), jnp.nan)
