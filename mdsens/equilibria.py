r"""Relaxed positions ``x*(params)`` as a differentiable function.

``x*`` minimises ``E(x; theta)``, so ``grad_x E(x*, theta) = 0`` and

.. math:: \frac{\partial x^*}{\partial\theta} = -H^{+}\,\partial_\theta \nabla_x E,
          \qquad H = \nabla^2_{xx} E(x^*, \theta),

the minimum-norm solution: no component along zero modes of ``H`` (rigid
translations, rotations of free clusters, rattlers). The starting positions
get a zero derivative.

Failure policy. Functions that return diagnostics (:func:`equilibrium_jvp`,
:func:`equilibrium_vjp`, the relaxation part of :func:`equilibrium_with_info`)
never raise on a failed relaxation or solve: the diagnostics report it.
Inside derivatives of :func:`equilibrium`, where no diagnostics can be
returned, a failed relaxation or linear solve raises at run time
(``throw=True``, the default) or yields NaN with a ``RuntimeWarning``
(``throw=False``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from mdsens._checks import check_positions, require_x64
from mdsens.adjoints import ADJOINTS, Adjoint, Implicit
from mdsens.linear_solve import SolveInfo
from mdsens.minimisers import FIRE, Minimiser
from mdsens.relaxation import RelaxResult, check_minimiser, relaxed_state
from mdsens.systems.energy import Energy
from mdsens.systems.system import System

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EquilibriumInfo:
    """Diagnostics of one sensitivity: the relaxation and the linear solve."""

    relax: RelaxResult
    solve: SolveInfo


def check_adjoint(adjoint: Any, allowed: tuple[type, ...] = ADJOINTS, caller: str = "mdsens") -> None:
    """``ValueError`` unless ``adjoint`` is a value of one of the ``allowed`` methods."""
    if not isinstance(adjoint, allowed):
        names = ", ".join(f"mdsens.{cls.__name__}(...)" for cls in allowed)
        raise ValueError(f"{caller}: adjoint must be one of {names}; got {adjoint!r}.")


@jax.jit(static_argnums=(0, 1, 2, 3))
def _equilibrium(energy: Energy, adjoint: Adjoint, minimiser: Minimiser, throw: bool, positions: Array, params: Any):
    return adjoint.equilibrium(energy, minimiser, positions, params, throw)


def equilibrium_with_info(
    system: System,
    params: Any = None,
    *,
    positions: Any = None,
    minimiser: Minimiser = FIRE(),
    adjoint: Adjoint = Implicit(),
    throw: bool = True,
) -> tuple[Array, RelaxResult | None]:
    """:func:`equilibrium` that also returns the :class:`RelaxResult` of the
    relaxation (None for :class:`~mdsens.Unrolled`, which runs a fixed number
    of steps)."""
    require_x64("mdsens.equilibrium")
    positions, params = system.inputs(positions, params)
    check_adjoint(adjoint, caller="mdsens.equilibrium")
    if not isinstance(throw, bool):
        raise ValueError(f"throw must be True or False; got {throw!r}.")
    return _equilibrium(system.energy, adjoint, check_minimiser(minimiser, system), throw, positions, params)


def equilibrium(
    system: System,
    params: Any = None,
    *,
    positions: Any = None,
    minimiser: Minimiser = FIRE(),
    adjoint: Adjoint = Implicit(),
    throw: bool = True,
) -> Array:
    """Relaxed positions ``x*(params)``, differentiable with respect to ``params``.

    Works with ``jax.jvp``, ``jax.vjp``, ``jax.grad``, ``jax.jacfwd``,
    ``jax.jacrev``, ``jax.hessian``, ``jax.jit`` and ``jax.vmap``.

    Args:
        system: the :class:`~mdsens.System` (energy, space, stable time step).
        params: parameters with the structure and shapes of ``system.params``
            (default: the system's own).
        positions: the start ``(N, dim)`` (default: the system's); its
            derivative is zero.
        minimiser: :class:`~mdsens.FIRE` (default) or
            :class:`~mdsens.GradientDescent`, with their tolerance and budget.
        adjoint: how derivatives are computed: :class:`~mdsens.Implicit`
            (default; a linear solver and the zero modes),
            :class:`~mdsens.Unrolled` or :class:`~mdsens.FiniteDifference`.
        throw: on a failed relaxation or linear solve, raise
            ``FloatingPointError`` at run time (True) or return NaN and warn.

    A neighbor-list energy relaxes here with the capacity allocated when it
    was built (under ``jit`` and autodiff there is no host to reallocate): an
    overflow is a failed relaxation.
    """
    return equilibrium_with_info(
        system, params, positions=positions, minimiser=minimiser, adjoint=adjoint, throw=throw
    )[0]


@jax.jit(static_argnums=(0, 1))
def _jvp_at(energy: Energy, adjoint: Implicit, result: RelaxResult, aux: Any, params: Any, tangent: Any):
    dx, info = adjoint.jvp(energy.bind(aux), result.positions, params, tangent)
    return result.positions, dx, EquilibriumInfo(result, info)


@jax.jit(static_argnums=(0, 1))
def _vjp_at(energy: Energy, adjoint: Implicit, result: RelaxResult, aux: Any, params: Any, cotangent: Array):
    dparams, info = adjoint.vjp(energy.bind(aux), result.positions, params, cotangent)
    return result.positions, dparams, EquilibriumInfo(result, info)


def _relaxed_for_derivative(
    caller: str, system: System, params: Any, positions: Any, minimiser: Any, adjoint: Any
) -> tuple[Any, RelaxResult, Any]:
    """Checked ``params``, the relaxation and the ``aux`` to differentiate with."""
    require_x64(caller)
    positions, params = system.inputs(positions, params)
    check_adjoint(adjoint, (Implicit,), caller)
    result, aux = relaxed_state(system.energy, check_minimiser(minimiser, system), positions, params)
    return params, result, aux


def equilibrium_jvp(
    system: System,
    params: Any,
    tangent: Any,
    *,
    positions: Any = None,
    minimiser: Minimiser = FIRE(),
    adjoint: Implicit = Implicit(),
) -> tuple[Array, Array, EquilibriumInfo]:
    """Forward mode with diagnostics: ``(x*, dx*[tangent], info)``.

    One relaxation and one linear solve. Never raises on failure: check
    ``info.relax.converged`` and ``info.solve.converged``. With concrete
    arrays, a neighbor-list energy relaxes on the host (reallocating its list
    if needed) and solves with a list frozen at x*.
    """
    tangent = system.check_params(tangent, "tangent", tangent=True)
    params, result, aux = _relaxed_for_derivative(
        "mdsens.equilibrium_jvp", system, params, positions, minimiser, adjoint
    )
    return _jvp_at(system.energy, adjoint, result, aux, params, tangent)


def equilibrium_vjp(
    system: System,
    params: Any,
    cotangent: Any,
    *,
    positions: Any = None,
    minimiser: Minimiser = FIRE(),
    adjoint: Implicit = Implicit(),
) -> tuple[Array, Any, EquilibriumInfo]:
    """Reverse mode with diagnostics: ``(x*, cotangent^T dx*/dparams, info)``.

    ``cotangent`` has the shape of the positions (e.g. ``grad`` of a scalar
    objective at ``x*``); the result has the structure of ``params``, so one
    solve gives the derivative with respect to every parameter (e.g. all N
    per-particle diameters). Never raises on failure: check ``info``.
    """
    cotangent = check_positions(cotangent, "cotangent")
    if cotangent.shape != system.positions.shape:
        raise ValueError(
            f"cotangent must have the shape of the positions {system.positions.shape}; got {cotangent.shape}."
        )
    params, result, aux = _relaxed_for_derivative(
        "mdsens.equilibrium_vjp", system, params, positions, minimiser, adjoint
    )
    return _vjp_at(system.energy, adjoint, result, aux, params, cotangent)


def sensitivity_at(
    system: System, positions: Any, params: Any, tangent: Any, *, adjoint: Implicit = Implicit()
) -> tuple[Array, SolveInfo]:
    """``dx*[tangent]`` at an already relaxed state ``positions`` (no
    relaxation), and the solve's diagnostics; traceable (a neighbor list is
    built there with the energy's build-time capacity)."""
    check_adjoint(adjoint, (Implicit,), "mdsens.sensitivity_at")
    positions, params = system.inputs(positions, params)
    tangent = system.check_params(tangent, "tangent", tangent=True)
    energy_fn = system.energy.bind(system.energy.build(positions, params))
    return adjoint.jvp(energy_fn, positions, params, tangent)


def energy_sensitivity(system: System, positions: Any, params: Any = None) -> Any:
    r"""Derivative of the relaxed energy ``E*(theta) = E(x*(theta), theta)`` by the
    envelope theorem: ``dE*/dtheta = dE/dtheta`` at fixed ``x*``, because
    ``grad_x E(x*) = 0``. No linear solve. ``positions`` must be relaxed; the
    error is of the order of ``fmax`` times ``|dx*/dtheta|``."""
    require_x64("mdsens.energy_sensitivity")
    positions, params = system.inputs(positions, params)
    return jax.grad(system.energy, argnums=1)(jax.lax.stop_gradient(positions), params)
