"""Finite strains with re-relaxation: the independent check of the elastic
moduli, and a flag for strains beyond linear response."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mdsens._checks import require_x64
from mdsens.adjoints import Implicit
from mdsens.minimisers import FIRE, Minimiser
from mdsens.observables.contact_network import contacts
from mdsens.observables.elasticity import ElasticModuli, elastic_response, stress_strain_tensor
from mdsens.observables.virial import check_deformable, stress
from mdsens.relaxation import RelaxResult, relax
from mdsens.systems.system import System

Array = jax.Array


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
    system: System, positions: Array, params: Any, strain: Any, *, minimiser: Minimiser = FIRE()
) -> tuple[RelaxResult, Any]:
    """Apply the affine strain ``F = I + strain`` to box and positions, re-relax
    with ``minimiser``: ``(RelaxResult, strained params)``."""
    check_deformable(system, "strained_state")
    positions, params = system.inputs(positions, params)
    f = jnp.eye(system.dim) + jnp.asarray(_check_strain(strain, system.dim))
    new_params = {**params, "box": f @ params["box"]}
    return relax(system, positions @ f.T, new_params, minimiser=minimiser), new_params


def finite_difference_moduli(
    system: System, positions: Array, params: Any, step: float = 1e-6, *, minimiser: Minimiser = FIRE()
) -> Array:
    """``B_ijkl = d sigma_ij / d eps_kl`` by central differences of the stress of
    states re-relaxed with ``minimiser`` under strains ``+-step`` (the oracle for
    ``stress_strain_tensor(elastic_moduli(...), stress)``). ``step`` above 1e-3
    is rejected as beyond linear response; an unconverged relaxation raises."""
    require_x64("mdsens.observables.finite_difference_moduli")
    check_deformable(system, "finite_difference_moduli")
    if not (np.isfinite(step) and 0 < step <= 1e-3):
        raise ValueError(f"step must be in (0, 1e-3] for linear response; got {step}.")
    dim = system.dim
    b = np.zeros((dim,) * 4)
    for k in range(dim):
        for l in range(k, dim):
            e = np.zeros((dim, dim))
            e[k, l] += 0.5 * step
            e[l, k] += 0.5 * step
            s = []
            for sign in (1.0, -1.0):
                result, p = strained_state(system, positions, params, sign * e, minimiser=minimiser)
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
    system: System,
    positions: Array,
    params: Any,
    strain: Any,
    *,
    rtol: float = 0.05,
    moduli: ElasticModuli | None = None,
    minimiser: Minimiser = FIRE(),
    adjoint: Implicit = Implicit(),
) -> StrainResponse:
    """Strain the relaxed state by ``strain`` (re-relaxed with ``minimiser``) and
    flag whether the stress change is linear response: ``.linear`` is False, with
    a ``RuntimeWarning``, if it differs from the prediction of the ``moduli``
    (default: :func:`elastic_response` with ``minimiser`` and ``adjoint``) by more
    than ``rtol`` or the contact network changed."""
    check_deformable(system, "strain_response")
    reference = (
        moduli
        if moduli is not None
        else elastic_response(system, positions, params, minimiser=minimiser, adjoint=adjoint)
    )
    x0 = reference.positions
    strain_np = _check_strain(strain, system.dim)
    result, new_params = strained_state(system, x0, params, strain_np, minimiser=minimiser)
    change = np.asarray(stress(system, result.positions, new_params) - reference.stress)
    b = stress_strain_tensor(reference.stiffness, reference.stress)
    predicted = np.asarray(jnp.einsum("ijkl,kl->ij", b, strain_np))
    error = float(np.linalg.norm(change - predicted) / max(float(np.linalg.norm(predicted)), 1e-300))
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
