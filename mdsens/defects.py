r"""Vacancy formation energies and their sensitivities to every parameter.

For a perfect crystal of ``N`` atoms (energy :math:`E_N`, at its sites, which
are equilibria by symmetry) and the same crystal without one atom, relaxed to
:math:`x^*(\theta)` at fixed box,

.. math:: E_f(\theta) = E_{N-1}(x^*(\theta); \theta) - \frac{N-1}{N} E_N(\theta).

Its gradient needs no linear solve (envelope theorem:
:math:`dE/d\theta = \partial_\theta E` at a minimum). The relaxed structure's
sensitivities do: ``dx*/dtheta_k`` for each scalar parameter (forward mode, one
solve each), and the gradient of a scalar of the structure, the mean distance
of the vacancy's nearest neighbours to the vacant site, with respect to every
parameter at once (reverse mode, one solve).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mdsens.adjoints import Implicit
from mdsens.equilibria import equilibrium_jvp, equilibrium_vjp
from mdsens.minimisers import FIRE, Minimiser, max_force
from mdsens.relaxation import RelaxResult, relax
from mdsens.systems.energy import Energy
from mdsens.systems.system import System

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VacancyFormation:
    """A relaxed vacancy and its sensitivities (parameters as in ``params``).

    Attributes:
        energy: the relaxed formation energy :math:`E_f`.
        unrelaxed_energy: :math:`E_f` with the atoms at the perfect sites.
        energy_gradient: :math:`dE_f/d\\theta`, the structure of ``params``.
        relaxation: the mean distance of the vacancy's nearest neighbours to
            the vacant site in the relaxed structure.
        relaxation_gradient: its gradient (one adjoint solve).
        fields: ``dx*/dtheta_k`` ``(N-1, dim)`` for every scalar parameter ``k``
            (per-atom vectors, e.g. for :func:`mdsens.io.write_extxyz`).
        result: the vacancy's relaxation.
        site: the vacant site.
        neighbors: indices (in the vacancy system) of its nearest neighbours.
    """

    energy: float
    unrelaxed_energy: float
    energy_gradient: dict[str, Array]
    relaxation: float
    relaxation_gradient: dict[str, Array]
    fields: dict[str, Array]
    result: RelaxResult
    site: Array
    neighbors: np.ndarray


def _check_pair(perfect: System, vacancy: System, removed: int) -> None:
    if vacancy.n != perfect.n - 1 or vacancy.dim != perfect.dim:
        raise ValueError(f"vacancy must hold the {perfect.n} atoms of perfect but one; it holds {vacancy.n}.")
    if not 0 <= removed < perfect.n:
        raise ValueError(f"removed must index an atom of perfect (0 to {perfect.n - 1}); got {removed}.")
    vacancy.check_params(perfect.params, "perfect.params")  # the same parameters


def nearest_neighbors(perfect: System, removed: int) -> np.ndarray:
    """Indices, in the vacancy system (``perfect`` without atom ``removed``), of
    the perfect crystal's nearest neighbours of ``removed``."""
    r = np.array(_distances(perfect.positions, perfect.positions[removed], perfect.params))
    r[removed] = np.inf
    shell = np.flatnonzero(r < r.min() * (1.0 + 1e-6))
    return shell - (shell > removed)


def _distances(positions: Array, site: Array, params: Any) -> Array:
    d = positions - site
    box = params.get("box") if isinstance(params, dict) else None
    if box is not None:
        fractional = d @ jnp.linalg.inv(box).T
        d = (fractional - jnp.round(fractional)) @ box.T
    return jnp.sqrt(jnp.sum(d**2, axis=-1))


def _formation_energy(perfect: Energy, vacancy: Energy, perfect_positions: Array, positions: Array, params: Any):
    n = perfect_positions.shape[0]
    return vacancy(positions, params) - (n - 1) / n * perfect(perfect_positions, params)


# E_f and its gradient at fixed positions (the envelope theorem), compiled once per pair of energies.
_formation = jax.jit(jax.value_and_grad(_formation_energy, argnums=4), static_argnums=(0, 1))


@functools.partial(jax.jit, static_argnums=0)
def _largest_force(energy: Energy, positions: Array, params: Any) -> Array:
    return max_force(-jax.grad(energy)(positions, params))


def relaxed_vacancy(
    perfect: System, vacancy: System, removed: int = 0, params: Any = None, *, minimiser: Minimiser = FIRE()
) -> tuple[float, RelaxResult]:
    """``(E_f, relaxation)``: ``vacancy`` (``perfect`` without atom ``removed``,
    the others in order) relaxed from ``vacancy.positions`` at ``params``
    (default: the vacancy system's), and its formation energy.

    ``ValueError`` if the perfect crystal's sites are not an equilibrium
    (largest force above ``minimiser.fmax``); ``FloatingPointError`` if the
    relaxation fails."""
    _check_pair(perfect, vacancy, removed)
    params = vacancy.params if params is None else vacancy.check_params(params)
    force = float(_largest_force(perfect.energy, perfect.positions, params))
    if not force <= minimiser.fmax:
        raise ValueError(f"perfect: its sites are not an equilibrium (largest force {force:.3g} > fmax).")
    result = relax(vacancy, params=params, minimiser=minimiser)
    if not bool(result.converged):
        raise FloatingPointError(f"the vacancy's relaxation failed ({result.reason}).")
    energy, _ = _formation(perfect.energy, vacancy.energy, perfect.positions, result.positions, params)
    return float(energy), result


def vacancy_formation(
    perfect: System,
    vacancy: System,
    removed: int = 0,
    params: Any = None,
    *,
    minimiser: Minimiser = FIRE(),
    adjoint: Implicit = Implicit(),
) -> VacancyFormation:
    """:func:`relaxed_vacancy` and its sensitivities (:class:`VacancyFormation`):
    ``FloatingPointError`` also if a linear solve fails."""
    params = vacancy.params if params is None else vacancy.check_params(params)
    _, result = relaxed_vacancy(perfect, vacancy, removed, params, minimiser=minimiser)
    x_star = result.positions
    neighbors = nearest_neighbors(perfect, removed)
    site = perfect.positions[removed]
    unrelaxed, _ = _formation(
        perfect.energy, vacancy.energy, perfect.positions, jnp.delete(perfect.positions, removed, axis=0), params
    )
    energy, gradient = _formation(perfect.energy, vacancy.energy, perfect.positions, x_star, params)

    def relaxation(x: Array, p: Any) -> Array:
        return jnp.mean(_distances(x[neighbors], site, p))

    # Reverse mode: the relaxation's gradient with respect to every parameter in one solve.
    cotangent, explicit = jax.grad(relaxation, argnums=(0, 1))(x_star, params)
    _, implicit, info = equilibrium_vjp(
        vacancy, params, cotangent, positions=x_star, minimiser=minimiser, adjoint=adjoint
    )
    _check_solve(info, "relaxation gradient")
    relaxation_gradient = jax.tree_util.tree_map(jnp.add, implicit, explicit)

    # Forward mode: the whole field dx*/dtheta_k, one solve per scalar parameter.
    fields = {}
    for name, tangent in _unit_tangents(params):
        _, dx, info = equilibrium_jvp(vacancy, params, tangent, positions=x_star, minimiser=minimiser, adjoint=adjoint)
        _check_solve(info, f"dx*/d{name}")
        fields[name] = dx
    return VacancyFormation(
        float(energy),
        float(unrelaxed),
        gradient,
        float(relaxation(x_star, params)),
        relaxation_gradient,
        fields,
        result,
        site,
        neighbors,
    )


def _check_solve(info: Any, what: str) -> None:
    if not bool(info.solve.converged):
        raise FloatingPointError(f"vacancy_formation: the linear solve for {what} failed ({info.solve.reason}).")


def _unit_tangents(params: dict[str, Array]) -> list[tuple[str, dict[str, Array]]]:
    """``(name, tangent)`` for every scalar entry of a dict of parameters."""
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return [(name, {**zeros, name: jnp.ones_like(value)}) for name, value in params.items() if jnp.ndim(value) == 0]


@dataclasses.dataclass(frozen=True)
class FiniteDifferences:
    """Central differences of re-relaxed vacancies for one scalar parameter:
    ``dE_f``, the relaxation's derivative and ``dx*`` (rigid translation
    removed: the adjoint's is the minimum-norm derivative)."""

    energy: float
    relaxation: float
    field: np.ndarray


def finite_differences(
    perfect: System,
    vacancy: System,
    formation: VacancyFormation,
    name: str,
    step: float,
    params: Any = None,
    *,
    minimiser: Minimiser = FIRE(),
) -> FiniteDifferences:
    """The independent check of :func:`vacancy_formation` for the scalar
    parameter ``name``: central differences with ``step``, the vacancy
    re-relaxed from ``formation``'s relaxed positions at ``params +- step``."""
    params = vacancy.params if params is None else vacancy.check_params(params)

    def at(sign: float) -> tuple[Array, Array, Array]:
        shifted = {**params, name: params[name] + sign * step}
        result = relax(vacancy, formation.result.positions, shifted, minimiser=minimiser)
        if not bool(result.converged):
            raise FloatingPointError(f"finite_differences: re-relaxation failed ({result.reason}).")
        x = result.positions
        relaxation = jnp.mean(_distances(x[formation.neighbors], formation.site, shifted))
        return _formation(perfect.energy, vacancy.energy, perfect.positions, x, shifted)[0], relaxation, x

    plus, minus = at(+1.0), at(-1.0)
    energy, relaxation, field = (
        (np.asarray(a) - np.asarray(b)) / (2.0 * step) for a, b in zip(plus, minus, strict=True)
    )
    return FiniteDifferences(float(energy), float(relaxation), field - field.mean(axis=0))


def _relative_error(actual: Any, expected: Any, floor: float) -> float:
    actual, expected = np.asarray(actual), np.asarray(expected)
    return float(np.linalg.norm(actual - expected)) / max(float(np.linalg.norm(expected)), floor)


def check(
    perfect: System,
    vacancy: System,
    formation: VacancyFormation,
    relative_step: float = 1e-5,
    params: Any = None,
    *,
    minimiser: Minimiser = FIRE(),
) -> dict[str, dict[str, float]]:
    """:func:`finite_differences` for every scalar parameter (step
    ``relative_step`` times ``max(1, |value|)``) against ``formation``:
    per parameter, the derivatives of ``E_f`` and of the relaxation by both
    methods and the relative errors of these and of ``dx*`` (absolute below
    ``1e-2``: ``dx*/d epsilon`` is zero, the energy scale moves no atom)."""
    params = vacancy.params if params is None else vacancy.check_params(params)
    report = {}
    for name in formation.fields:
        step = relative_step * max(1.0, abs(float(params[name])))
        fd = finite_differences(perfect, vacancy, formation, name, step, params, minimiser=minimiser)
        energy, relaxation = float(formation.energy_gradient[name]), float(formation.relaxation_gradient[name])
        report[name] = {
            "energy": energy,
            "energy_fd": fd.energy,
            "energy_error": _relative_error(energy, fd.energy, 1e-2),
            "relaxation": relaxation,
            "relaxation_fd": fd.relaxation,
            "relaxation_error": _relative_error(relaxation, fd.relaxation, 1e-2),
            "field_error": _relative_error(formation.fields[name], fd.field, 1e-2),
        }
    return report
