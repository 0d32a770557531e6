r"""Observables of relaxed states: energy, stress, pressure, contacts, rattlers, elastic moduli.

Everything takes ``(system, positions, params)`` with a :class:`mdsens.systems.System`
(periodic systems read the box from ``params["box"]``, columns are box vectors).

- :func:`energy`, :func:`stress`, :func:`pressure`: differentiable in positions
  and params; the stress is the virial (Cauchy) stress ``(1/V) dE/deps`` of the
  affine strain ``F = I + eps`` of box and positions, tension positive, so a
  compressed packing has ``pressure = -tr(stress)/dim > 0``.
- :func:`overlaps` (differentiable), :func:`contacts`, :func:`rattlers`,
  :func:`contact_number`: the contact network of soft spheres (params with
  ``"diameters"``); rattlers are removed iteratively (fewer than ``dim + 1``
  contacts among the remaining particles).
- :func:`elastic_moduli` (the stiffness tensor, differentiable),
  :func:`elastic_response` (with stress, Born term and diagnostics), Voigt and
  Mandel forms, :func:`isotropic_moduli`, all by implicit differentiation
  (see ``mdsens._elasticity``).
- :func:`strain_response`, :func:`finite_difference_moduli`: finite strains
  with re-relaxation, the independent check of the moduli, flagged when the
  response is not linear.

Sensitivities of any of these (``dp/d epsilon``, ``dG/d diameters``) are
``jax.jvp``/``jax.grad`` of a function that builds ``x* = mdsens.equilibrium(...)``
and evaluates the observable at ``x*`` (:func:`relaxed_observable`).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mdsens._checks import check_params, check_positions, require_x64
from mdsens._elasticity import (
    ElasticModuli,
    _check_system,
    elastic_moduli,
    elastic_response,
    from_voigt,
    isotropic_moduli,
    strain_energy,
    stress_strain_tensor,
    to_mandel,
    to_voigt,
)
from mdsens.equilibrium import equilibrium
from mdsens.relaxation import RelaxResult, relax

Array = jax.Array

__all__ = [
    "ElasticModuli", "StrainResponse", "contact_number", "contacts", "elastic_moduli", "elastic_response",
    "energy", "finite_difference_moduli", "from_voigt", "isotropic_moduli", "overlaps", "pressure",
    "rattlers", "relaxed_observable", "strain_response", "strained_state", "stress", "stress_strain_tensor",
    "to_mandel", "to_voigt", "volume",
]


def energy(system, positions: Array, params: Any) -> Array:
    """Total energy ``system.energy_fn(positions, params)``."""
    return system.energy_fn(positions, params)


def volume(params: Any) -> Array:
    """Volume (area in 2D) of the periodic box ``params["box"]``."""
    return jnp.abs(jnp.linalg.det(params["box"]))


def stress(system, positions: Array, params: Any) -> Array:
    """Virial stress tensor ``(1/V) dE/deps`` (``dim x dim``, symmetric, tension positive).

    For pair potentials this is ``(1/V) sum_pairs phi'(r) r_a r_b / r``.
    Raises ``ValueError`` for a system without a periodic box."""
    _check_system(system, "stress")
    return _stress_fn(system.energy_fn)(positions, params)


@functools.lru_cache(maxsize=64)
def _stress_fn(energy_fn):
    strained = strain_energy(energy_fn)

    @jax.jit
    def stress_of(positions, params):
        a0 = jnp.zeros((positions.shape[1],) * 2, positions.dtype)
        return jax.grad(lambda a: strained(positions, (params, a)))(a0) / volume(params)

    return stress_of


def pressure(system, positions: Array, params: Any) -> Array:
    """``-tr(stress)/dim``: positive when the packing pushes on the box."""
    return -jnp.trace(stress(system, positions, params)) / positions.shape[1]


# ---------------------------------------------------------------------------
# Contact network of soft spheres


def _diameters(system, positions: Array, params: Any) -> Array:
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
    return jnp.where(eye, 0.0, jnp.sqrt(jnp.where(eye, 1.0, r2)))


def overlaps(system, positions: Array, params: Any) -> Array:
    """``(N, N)`` dimensionless overlaps ``max(0, 1 - r_ij / sigma_ij)``, ``sigma_ij = (d_i + d_j)/2``;
    zero on the diagonal. Differentiable in positions, diameters and box."""
    d = _diameters(system, positions, params)
    r = _distances(positions, params.get("box"))
    sigma = 0.5 * (d[:, None] + d[None, :])
    eye = jnp.eye(positions.shape[0], dtype=bool)
    return jnp.where(eye | (r >= sigma), 0.0, 1.0 - r / sigma)


def contacts(system, positions: Array, params: Any, threshold: float = 0.0) -> Array:
    """``(N, N)`` boolean contact matrix: pairs with overlap ``> threshold``."""
    return overlaps(system, positions, params) > threshold


@jax.jit
def _rattlers(contact_matrix: Array, min_contacts: int) -> Array:
    def remove(state):
        active, _ = state
        count = jnp.sum(contact_matrix & active[None, :], axis=1)
        new = active & (count >= min_contacts)
        return new, jnp.any(new != active)

    active, _ = jax.lax.while_loop(
        lambda s: s[1], remove, (jnp.ones(contact_matrix.shape[0], bool), jnp.asarray(True))
    )
    return ~active


def rattlers(contact_matrix: Array, dim: int) -> Array:
    """Boolean mask of rattlers: repeatedly remove particles with fewer than
    ``dim + 1`` contacts among the particles not yet removed (O'Hern et al. 2003)."""
    contact_matrix = jnp.asarray(contact_matrix, bool)
    if contact_matrix.ndim != 2 or contact_matrix.shape[0] != contact_matrix.shape[1]:
        raise ValueError(f"contact_matrix must be square (N, N); got shape {contact_matrix.shape}.")
    return _rattlers(contact_matrix, int(dim) + 1)


def contact_number(
    system, positions: Array, params: Any, *, exclude_rattlers: bool = True, threshold: float = 0.0
) -> Array:
    """Mean number of contacts per particle ``z = 2 N_c / N'``, counted among
    the ``N'`` non-rattlers (``exclude_rattlers``) or all particles.
    (At isostaticity ``z = 2 dim`` for large N.)"""
    c = contacts(system, positions, params, threshold)
    if exclude_rattlers:
        keep = ~rattlers(c, positions.shape[1])
        c = c & keep[:, None] & keep[None, :]
        n = jnp.sum(keep)
    else:
        n = positions.shape[0]
    return jnp.sum(c) / jnp.maximum(n, 1)


# ---------------------------------------------------------------------------
# Sensitivities of observables at x*


def relaxed_observable(
    system, observable: Callable[..., Array], positions: Array, **equilibrium_options: Any
) -> Callable[[Any], Array]:
    """``params -> observable(system, x*(params), params)`` with ``x*`` from
    :func:`mdsens.equilibrium`, for ``jax.jvp`` / ``jax.grad`` (e.g.
    ``jax.grad(relaxed_observable(s, pressure, x0))(params)["epsilon"]``)."""
    options = {"shift_fn": system.shift_fn, "dt_max": system.dt_max, **equilibrium_options}

    def evaluate(params):
        x = equilibrium(system.energy_fn, positions, params, **options)
        return observable(system, x, params)

    return evaluate


# ---------------------------------------------------------------------------
# Finite strains with re-relaxation


def _check_strain(strain: Any, dim: int) -> np.ndarray:
    strain = np.asarray(strain, dtype=np.float64)
    if strain.shape != (dim, dim) or not np.all(np.isfinite(strain)):
        raise ValueError(f"strain must be a finite ({dim}, {dim}) matrix; got {strain!r}.")
    if not np.allclose(strain, strain.T, rtol=0, atol=1e-15):
        raise ValueError("strain must be symmetric (eps = (grad u + grad u^T)/2).")
    if np.max(np.abs(np.linalg.eigvalsh(strain))) >= 0.5:
        raise ValueError(f"strain {strain.tolist()} is far beyond linear response (|eigenvalue| >= 0.5).")
    return strain


def strained_state(
    system, positions: Array, params: Any, strain: Any, *, fmax: float = 1e-12, max_steps: int = 100_000
) -> tuple[RelaxResult, Any]:
    """Apply the affine strain ``F = I + strain`` to box and positions, re-relax:
    ``(RelaxResult, strained params)``."""
    _check_system(system, "strained_state")
    positions, params = check_positions(positions), check_params(params)
    f = jnp.eye(positions.shape[1]) + jnp.asarray(_check_strain(strain, positions.shape[1]))
    new_params = {**params, "box": f @ params["box"]}
    result = relax(
        system.energy_fn, positions @ f.T, new_params, shift_fn=system.shift_fn, dt_max=system.dt_max,
        fmax=fmax, max_steps=max_steps,
    )
    return result, new_params


def finite_difference_moduli(
    system, positions: Array, params: Any, step: float = 1e-6, *, fmax: float = 1e-12, max_steps: int = 100_000
) -> Array:
    """``B_ijkl = d sigma_ij / d eps_kl`` by central differences of the stress of
    re-relaxed states under strains ``+-step`` (the oracle for
    ``stress_strain_tensor(elastic_moduli(...), stress)``). ``step`` above 1e-3
    is rejected as beyond linear response; an unconverged relaxation raises."""
    require_x64("mdsens.observables.finite_difference_moduli")
    _check_system(system, "finite_difference_moduli")
    if not (np.isfinite(step) and 0 < step <= 1e-3):
        raise ValueError(f"step must be in (0, 1e-3] for linear response; got {step}.")
    positions = check_positions(positions)
    dim = positions.shape[1]
    b = np.zeros((dim,) * 4)
    for k in range(dim):
        for l in range(k, dim):
            e = np.zeros((dim, dim))
            e[k, l] += 0.5 * step
            e[l, k] += 0.5 * step
            s = []
            for sign in (1.0, -1.0):
                result, p = strained_state(system, positions, params, sign * e, fmax=fmax, max_steps=max_steps)
                if not bool(result.converged):
                    raise FloatingPointError(
                        f"finite_difference_moduli: relaxation under strain {(sign * e).tolist()} failed."
                    )
                s.append(np.asarray(stress(system, result.positions, p)))
            b[:, :, k, l] = b[:, :, l, k] = (s[0] - s[1]) / (2 * step)
    return jnp.asarray(b)


@dataclasses.dataclass(frozen=True)
class StrainResponse:
    """A finite strain with re-relaxation, compared with linear response.

    ``stress_change`` (measured) and ``predicted_change`` (``B : strain``),
    ``relative_error`` between them, ``contacts_changed`` (soft spheres: pairs
    that made or broke contact; -1 otherwise), ``linear`` (``relative_error <=
    rtol`` and no contact change), the strained ``result`` and ``params``."""

    strain: np.ndarray
    stress_change: np.ndarray
    predicted_change: np.ndarray
    relative_error: float
    contacts_changed: int
    linear: bool
    result: RelaxResult
    params: Any


def strain_response(
    system, positions: Array, params: Any, strain: Any, *, rtol: float = 0.05,
    moduli: ElasticModuli | None = None, fmax: float = 1e-12, max_steps: int = 100_000,
) -> StrainResponse:
    """Strain the relaxed state by ``strain`` (re-relaxed) and flag whether the
    stress change is linear response: ``.linear`` is False, with a
    ``RuntimeWarning``, if it differs from the prediction of the moduli by more
    than ``rtol`` or the contact network changed."""
    reference = moduli if moduli is not None else elastic_response(system, positions, params, fmax=fmax)
    x0 = reference.positions
    strain_np = _check_strain(strain, x0.shape[1])
    result, new_params = strained_state(system, x0, params, strain_np, fmax=fmax, max_steps=max_steps)
    change = np.asarray(stress(system, result.positions, new_params) - reference.stress)
    b = stress_strain_tensor(reference.stiffness, reference.stress)
    predicted = np.asarray(jnp.einsum("ijkl,kl->ij", b, strain_np))
    error = float(np.linalg.norm(change - predicted) / max(np.linalg.norm(predicted), 1e-300))
    changed = -1
    if "diameters" in params:
        before = np.asarray(contacts(system, x0, params))
        after = np.asarray(contacts(system, result.positions, new_params))
        changed = int(np.sum(before != after) // 2)
    linear = bool(result.converged) and error <= rtol and changed <= 0
    if not linear:
        warnings.warn(
            f"strain_response: strain {strain_np.tolist()} is beyond linear response (stress "
            f"differs from C:eps by {error:.3g} relative, {max(changed, 0)} contacts changed, "
            f"relaxation {result.reason}).",
            RuntimeWarning,
            stacklevel=2,
        )
    return StrainResponse(strain_np, change, predicted, error, changed, linear, result, new_params)
