r"""Packings at a chosen distance from jamming.

:func:`find_jamming` relaxes a soft-sphere packing above jamming and then
decompresses it (box and positions scaled together, re-relaxed to ``fmax`` at
every step) along a falling sequence of pressures: each step aims, with the
linear relation ``p = k (phi - phi_c)`` of the last two jammed states, at a
pressure ``factor`` times lower; an overshoot into the unjammed phase (or a
pressure that did not fall) is rejected and the next step aims less far. It
stops at ``p <= p_target`` and extrapolates the last two states to ``p = 0``,
so ``phi_c`` is known to much better than ``p_target / k``.

:func:`compress` then prepares the packings at ``phi_c + delta_phi``
(increasing, each compressed from the previous one) and :func:`observe` gives
their pressure, contact number among non-rattlers (the finite-size isostatic
value ``z_iso = 2 dim - 2 (dim - 1) / N'``, Goodrich, Liu and Nagel, PRL 109,
095704, 2012, for ``N'`` non-rattlers), and bulk and shear moduli
(:func:`mdsens.observables.elastic_response`).

:func:`at_pressures` instead prepares packings at target pressures: the box
relaxes isotropically with the particles (:func:`mdsens.cell.at_pressure`,
the enthalpy ``E + p V`` minimised over both), each state from the previous
one, so a falling sequence decompresses towards jamming and a rising one
compresses. Its states are those :func:`observe` takes.

Every relaxation uses one minimiser value (default :data:`MINIMISER`: FIRE
to ``fmax`` 1e-12 in at most 200 000 steps, with the system's ``dt_max``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mdsens import cell
from mdsens import observables as ob
from mdsens.adjoints import Implicit
from mdsens.minimisers import FIRE, Minimiser
from mdsens.relaxation import relax
from mdsens.systems import System

Array = jax.Array

__all__ = [
    "MINIMISER",
    "Jamming",
    "State",
    "at_pressures",
    "compress",
    "find_jamming",
    "observe",
    "packing_fraction",
    "rescale",
]

#: Near jamming, relaxations are slow (the energy landscape flattens): a larger step budget.
MINIMISER = FIRE(max_steps=200_000)


def _check_soft_spheres(system: System, caller: str) -> None:
    if system.box is None or "diameters" not in system.params:
        raise ValueError(f"{caller} needs a periodic soft-sphere system (mdsens.systems.soft_sphere_packing).")


def _diameters(system: System, params: Any) -> np.ndarray:
    d = np.asarray(params["diameters"])
    return d if d.shape[0] == system.n else d[np.asarray(system.species)]


def packing_fraction(system: System, params: Any) -> float:
    """Volume fraction of the spheres with diameters ``params["diameters"]`` in ``params["box"]``."""
    unit = math.pi / 4.0 if system.dim == 2 else math.pi / 6.0
    volume = abs(np.linalg.det(np.asarray(params["box"])))
    return float(np.sum(unit * _diameters(system, params) ** system.dim) / volume)


def rescale(positions: Array, params: Any, phi_from: float, phi_to: float) -> tuple[Array, Any]:
    """Scale box and positions together from packing fraction ``phi_from`` to ``phi_to``."""
    factor = (phi_from / phi_to) ** (1.0 / positions.shape[1])
    return positions * factor, {**params, "box": params["box"] * factor}


@dataclasses.dataclass
class State:
    """A relaxed packing: ``phi``, ``pressure``, ``positions``, ``params`` (with
    its box), whether the relaxation ``converged`` and its ``n_steps``."""

    phi: float
    pressure: float
    positions: Array
    params: Any
    converged: bool
    n_steps: int


def _relaxed(system: System, positions: Array, params: Any, minimiser: Minimiser) -> State:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # reported in State.converged
        r = relax(system, positions, params, minimiser=minimiser)
    p = float(ob.pressure(system, r.positions, params))
    return State(packing_fraction(system, params), p, r.positions, params, bool(r.converged), int(r.n_steps))


def _move(system: System, state: State, phi: float, minimiser: Minimiser) -> State:
    x, params = rescale(state.positions, state.params, state.phi, phi)
    return _relaxed(system, x, params, minimiser)


@dataclasses.dataclass
class Jamming:
    """Result of :func:`find_jamming`: ``phi_c``, the slope ``k = dp/dphi`` near
    jamming, the last (nearly critical) ``state``, and the ``history`` of
    accepted ``(phi, pressure)``."""

    phi_c: float
    slope: float
    state: State
    history: list[tuple[float, float]]


def find_jamming(
    system: System,
    positions: Array | None = None,
    params: Any = None,
    *,
    p_target: float = 1e-7,
    factor: float = 10.0,
    max_tries: int = 60,
    minimiser: Minimiser = MINIMISER,
) -> Jamming:
    """Jamming packing fraction of the packing relaxed from ``positions`` (default
    the system's random start) at the packing fraction of ``params`` (default
    the system's), which must be above jamming. Pressure is lowered by about
    ``factor`` per accepted step down to ``p_target``; ``phi_c`` is the linear
    extrapolation of the last two states to zero pressure. Every state is
    relaxed with ``minimiser``. Raises
    ``ValueError`` if the start is not jammed, ``RuntimeError`` if ``p_target``
    is not reached in ``max_tries`` steps."""
    _check_soft_spheres(system, "find_jamming")
    if not (p_target > 0 and factor > 1):
        raise ValueError(f"need p_target > 0 and factor > 1; got {p_target}, {factor}.")
    positions, params = system.inputs(positions, params)
    state = _relaxed(system, positions, params, minimiser)
    if not (state.converged and state.pressure > 0):
        raise ValueError(
            f"find_jamming: the start at phi={state.phi:.4f} is not jammed (p={state.pressure:.3g}, "
            f"relaxation converged: {state.converged}); start at higher phi."
        )
    previous = _move(system, state, state.phi * (1.0 - 1e-3), minimiser)
    if not (previous.converged and previous.pressure > 0):
        raise ValueError("find_jamming: a 0.1% decompression unjams the start; start at higher phi.")
    state, previous = previous, state
    history = [(previous.phi, previous.pressure), (state.phi, state.pressure)]
    for _ in range(max_tries):
        if state.pressure <= p_target:
            break
        slope = (previous.pressure - state.pressure) / (previous.phi - state.phi)
        slope = slope if slope > 0 else state.pressure / (0.01 * state.phi)
        goal = max(state.pressure / factor, 0.5 * p_target)
        trial = _move(system, state, state.phi - (state.pressure - goal) / slope, minimiser)
        # Accept a converged jammed state whose pressure fell without overshooting into the unjammed phase.
        if trial.converged and goal * 1e-2 < trial.pressure < state.pressure:
            state, previous = trial, state
            history.append((state.phi, state.pressure))
        else:
            factor = max(math.sqrt(factor), 1.5)
    else:
        raise RuntimeError(f"find_jamming: p={state.pressure:.3g} after {max_tries} steps (target {p_target:.3g}).")
    slope = (previous.pressure - state.pressure) / (previous.phi - state.phi)
    return Jamming(state.phi - state.pressure / slope, slope, state, history)


def compress(
    system: System,
    jamming: Jamming,
    delta_phis,
    *,
    minimiser: Minimiser = MINIMISER,
) -> list[State]:
    """Packings at ``phi_c + delta_phi`` relaxed with ``minimiser``, for the
    ``delta_phis`` in increasing order, each compressed from the previous one (the
    first from ``jamming.state``)."""
    delta_phis = sorted(float(d) for d in delta_phis)
    if not delta_phis or delta_phis[0] <= 0:
        raise ValueError(f"delta_phis must be positive; got {delta_phis}.")
    states, state = [], jamming.state
    for dphi in delta_phis:
        state = _move(system, state, jamming.phi_c + dphi, minimiser)
        states.append(state)
    return states


def at_pressures(
    system: System,
    pressures,
    positions: Array | None = None,
    params: Any = None,
    *,
    minimiser: Minimiser = MINIMISER,
) -> list[State]:
    """Packings relaxed at each target pressure of ``pressures``, in the order
    given, each from the previous one (the first from ``positions``, default the
    system's start, in the box of ``params``, default the system's): positions
    and an isotropically scaled box minimise ``E + p V``
    (:func:`mdsens.cell.at_pressure`) with ``minimiser``.

    A state's ``pressure`` is the virial pressure of its relaxed box
    (:func:`mdsens.observables.pressure`), which equals the target to the
    stress tolerance of :func:`mdsens.cell.relaxed`; ``converged`` holds the
    particle forces and the stress residual to their tolerances, and
    ``params`` has the relaxed box. The system must use all pairs
    (``neighbor_list=False``)."""
    _check_soft_spheres(system, "at_pressures")
    pressures = [float(p) for p in pressures]
    if not pressures:
        raise ValueError("at_pressures: no pressures given.")
    positions, params = system.inputs(positions, params)
    at_p = cell.at_pressure(system, pressures[0])
    zero_strain = at_p.positions[system.n :]  # cell rows: the reference box is the start's
    states = []
    for p in pressures:
        joint = jnp.concatenate([positions, zero_strain])
        joint_params = {**params, "pressure": jnp.float64(p)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # reported in State.converged
            r = cell.relaxed(at_p, relax(at_p, joint, joint_params, minimiser=minimiser), joint_params)
        positions, params = cell.fixed_box(at_p, r.relax.positions, joint_params)
        pressure = float(ob.pressure(system, positions, params))
        phi = packing_fraction(system, params)
        states.append(State(phi, pressure, positions, params, bool(r.converged), int(r.relax.n_steps)))
    return states


def observe(
    system: System, state: State, *, minimiser: Minimiser = MINIMISER, adjoint: Implicit = Implicit()
) -> dict[str, Any]:
    """Plain numbers of a packing relaxed with ``minimiser``: ``phi``, ``pressure``, ``n_rattlers``,
    ``n_contacts`` (among non-rattlers), ``z`` (``2 n_contacts / N'``),
    ``z_iso`` (``2 dim - 2 (dim - 1) / N'``), ``bulk_modulus`` and
    ``shear_modulus`` (:func:`mdsens.observables.isotropic_moduli` with the
    stress: ``-V dp/dV`` and the averaged ``d sigma_xy / d gamma``),
    ``moduli_ok``, ``fmax``, ``solve_residual``, ``converged`` and ``n_steps``.
    The moduli's solves use ``adjoint``'s solver."""
    _check_soft_spheres(system, "observe")
    dim = system.dim
    c = np.asarray(ob.contacts(system, state.positions, state.params))
    keep = ~np.asarray(ob.rattlers(c, dim))
    n_contacts = int(np.sum(c[np.ix_(keep, keep)]) // 2)
    n_kept = max(int(np.sum(keep)), 1)
    moduli = ob.elastic_response(system, state.positions, state.params, minimiser=minimiser, adjoint=adjoint)
    return {
        "phi": state.phi,
        "pressure": state.pressure,
        "n_rattlers": int(np.sum(~keep)),
        "n_contacts": n_contacts,
        "z": 2.0 * n_contacts / n_kept,
        "z_iso": 2.0 * dim - 2.0 * (dim - 1) / n_kept,
        "bulk_modulus": float(moduli.bulk_modulus),
        "shear_modulus": float(moduli.shear_modulus),
        "moduli_ok": bool(moduli.ok),
        "fmax": float(moduli.fmax),
        "solve_residual": float(moduli.solve_residual),
        "converged": state.converged,
        "n_steps": state.n_steps,
    }
