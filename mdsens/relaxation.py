"""Energy minimisation to a mechanical equilibrium: FIRE 2.0 and gradient descent.

Both minimisers are branch-free state updates inside one ``lax.while_loop``,
so ``relax`` works under ``jit`` and ``vmap`` (a vmapped loop keeps finished
members frozen and stops when the last one is done).

FIRE is written here rather than taken from ``jax_md.minimize.fire_descent``:
that one stores dt and alpha in the smallest dtype that holds their initial
value (float16 on CPU) and adds 1e-6 to the force norm in the velocity mixing.
Measured by ``scripts/bench_relax.py``: it reaches fmax 1e-12 on the 2D
soft-sphere packing and on a free LJ cluster, but diverges from the
Kob-Andersen start where this FIRE 2.0 converges in about 1900 steps.

Neighbor-list energies (:class:`mdsens.neighbors.NeighborListEnergy`) carry
their list in the loop state: it is updated before every force evaluation
(rebuilt inside ``jit`` when the skin rule fails). A step whose list became
invalid (capacity overflow) is undone and the loop stops; :func:`relax`, called
with concrete arrays, then reallocates the list on the host and continues from
that last good state.
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

from mdsens._checks import (
    check_choice,
    check_params,
    check_positions,
    check_relax_options,
    is_concrete,
    require_x64,
)
from mdsens.neighbors import MAX_REALLOCATIONS, NeighborListEnergy, Neighbors, describe

Array = jax.Array

METHODS = ("fire", "gradient_descent")
# Status codes of a relaxation; ``RelaxResult.reason`` names them.
CONVERGED, MAX_STEPS, NONFINITE, NEIGHBOR_OVERFLOW = 0, 1, 2, 3
REASONS = ("converged", "max_steps", "nonfinite", "neighbor_overflow")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RelaxResult:
    """Outcome of :func:`relax`; every field is an array (batched under vmap).

    Attributes:
        positions: final positions, shape ``(N, dim)``.
        energy: energy at ``positions``.
        fmax: largest per-particle force norm at ``positions`` (ASE's ``fmax``).
        n_steps: number of minimiser steps taken.
        converged: whether ``fmax`` reached the requested tolerance.
        status: 0 converged, 1 ran out of steps, 2 energy or force not finite,
            3 the neighbor list became invalid and could not be reallocated
            (under ``jit``/``vmap``; ``positions`` is then the last state
            computed with a valid list and ``energy`` is NaN).
    """

    positions: Array
    energy: Array
    fmax: Array
    n_steps: Array
    converged: Array
    status: Array

    @property
    def reason(self) -> Any:
        """Why the relaxation stopped: "converged", "max_steps", "nonfinite" or
        "neighbor_overflow" (a numpy array of those strings for a batch)."""
        names = np.asarray(REASONS)[np.asarray(self.status)]
        return str(names) if names.ndim == 0 else names


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _FireState:
    positions: Array
    velocity: Array
    force: Array
    dt: Array
    alpha: Array
    n_positive: Array  # consecutive steps with power F.v > 0
    step: Array
    aux: Any = None  # the neighbor list of a NeighborListEnergy


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _DescentState:
    positions: Array
    energy: Array
    force: Array
    step_size: Array
    step: Array
    aux: Any = None  # the neighbor list of a NeighborListEnergy


def _safe_norm(v: Array) -> Array:
    """|v| with a zero (not NaN) derivative at v = 0, where an exactly converged
    FIRE run sits: unrolled reverse mode differentiates through it."""
    squared = jnp.vdot(v, v)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def max_force(forces: Array) -> Array:
    """Largest per-particle force norm, ``max_i |F_i|`` (ASE's ``fmax``)."""
    return jnp.max(jnp.sqrt(jnp.sum(forces**2, axis=-1)))


def _fire_minimiser(force_fn, shift_fn, positions, options, aux=None):
    """FIRE 2.0 with semi-implicit Euler integration and unit masses
    (Guénolé et al., Comput. Mater. Sci. 175, 109584, 2020, Algorithm 2).
    ``force_fn(x, aux, fresh) -> (force, aux)``; ``aux`` is carried in the
    state (``fresh``: the first evaluation, with ``aux`` as given)."""
    dt_max = options["dt_max"]
    dt_min = 0.02 * dt_max
    n_delay, f_inc, f_dec, alpha_start, f_alpha = 20, 1.1, 0.5, 0.1, 0.99

    def init():
        force, state_aux = force_fn(positions, aux, True)
        zero = jnp.zeros((), jnp.int32)
        return _FireState(
            positions, jnp.zeros_like(positions), force, 0.1 * dt_max, jnp.asarray(alpha_start), zero, zero, state_aux
        )

    def step(s: _FireState) -> _FireState:
        power = jnp.vdot(s.force, s.velocity)
        uphill = power <= 0.0
        n_positive = jnp.where(uphill, 0, s.n_positive + 1)
        accelerate = ~uphill & (n_positive > n_delay)
        # No slow-down during the first n_delay steps (FIRE 2.0's "initial delay").
        slow_down = uphill & (s.step >= n_delay)
        dt = jnp.where(accelerate, jnp.minimum(s.dt * f_inc, dt_max), s.dt)
        dt = jnp.where(slow_down, jnp.maximum(dt * f_dec, dt_min), dt)
        alpha = jnp.where(accelerate, s.alpha * f_alpha, s.alpha)
        alpha = jnp.where(slow_down, alpha_start, alpha)
        # Going uphill: step back half a step and stop.
        x = jnp.where(uphill, shift_fn(s.positions, -0.5 * dt * s.velocity), s.positions)
        v = jnp.where(uphill, 0.0, s.velocity)

        v = v + dt * s.force
        v_norm = _safe_norm(v)
        f_norm = _safe_norm(s.force)
        steer = jnp.where(f_norm > 0, v_norm / jnp.where(f_norm > 0, f_norm, 1.0), 0.0)
        v = (1.0 - alpha) * v + alpha * steer * s.force
        x = shift_fn(x, dt * v)
        force, state_aux = force_fn(x, s.aux)
        return _FireState(x, v, force, dt, alpha, n_positive, s.step + 1, state_aux)

    return init, step


def _descent_minimiser(energy_and_force_fn, shift_fn, positions, options, aux=None):
    """Gradient descent with an adaptive step: grow the step by 1.2 after an
    accepted move, halve it and retry after a rejected one. A move is accepted
    when the energy falls, or when the energy change is below rounding and the
    force norm falls (near the minimum, energy differences are lost to rounding
    long before fmax reaches 1e-12). The step is capped at ``10 dt_max`` so that
    loosely bound particles cannot be flung away.
    ``energy_and_force_fn(x, aux, fresh) -> (energy, force, aux)``; ``aux`` is carried
    in the state (a neighbor list: updated, and rebuilt if needed, before every
    evaluation, also of rejected moves)."""

    def init():
        e, f, state_aux = energy_and_force_fn(positions, aux, True)
        return _DescentState(positions, e, f, 0.1 * options["dt_max"], jnp.zeros((), jnp.int32), state_aux)

    def step(s: _DescentState) -> _DescentState:
        x_new = shift_fn(s.positions, s.step_size * s.force)
        e_new, f_new, state_aux = energy_and_force_fn(x_new, s.aux)
        rounding = 64 * jnp.finfo(s.energy.dtype).eps * jnp.maximum(jnp.abs(s.energy), 1e-300)
        lower_energy = e_new < s.energy - rounding
        flat_but_better = (jnp.abs(e_new - s.energy) <= rounding) & (
            jnp.vdot(f_new, f_new) < jnp.vdot(s.force, s.force)
        )
        accept = (lower_energy | flat_but_better) & jnp.isfinite(e_new)
        keep = lambda new, old: jnp.where(accept, new, old)  # noqa: E731
        return _DescentState(
            keep(x_new, s.positions),
            keep(e_new, s.energy),
            keep(f_new, s.force),
            jnp.where(accept, jnp.minimum(1.2 * s.step_size, 10.0 * options["dt_max"]), 0.5 * s.step_size),
            s.step + 1,
            state_aux,
        )

    return init, step


def _minimiser(energy_fn, params, shift_fn, positions, method, options, aux=None):
    """``(init, step, energy_and_force)`` of the chosen minimiser;
    ``energy_and_force(x, aux, fresh=False) -> (energy, force, aux)``. For a
    :class:`NeighborListEnergy`, ``aux`` is its neighbor list, updated at ``x``
    before every evaluation but the first (``fresh``: the list given for the
    start is built there, and an update would compile the list building once
    more); an invalid list gives NaN. Otherwise ``aux`` is None and unused."""

    if isinstance(energy_fn, NeighborListEnergy):

        def evaluate(x, neighbors, fresh, value):
            if not fresh:
                neighbors = energy_fn.update(neighbors, x, params)
            nan = jnp.where(neighbors.valid, 1.0, jnp.nan)
            if value:
                e, g = jax.value_and_grad(energy_fn.energy)(x, params, neighbors)
                return e * nan, -g * nan, neighbors
            return -jax.grad(energy_fn.energy)(x, params, neighbors) * nan, neighbors

        def energy_and_force(x, neighbors, fresh=False):
            return evaluate(x, neighbors, fresh, True)

        def force(x, neighbors, fresh=False):
            return evaluate(x, neighbors, fresh, False)

    else:

        def energy_and_force(x, unused_aux, fresh=False):
            e, g = jax.value_and_grad(energy_fn)(x, params)
            return e, -g, unused_aux

        def force(x, unused_aux, fresh=False):
            return energy_and_force(x, unused_aux)[1], unused_aux

    if method == "fire":
        init, step = _fire_minimiser(force, shift_fn, positions, options, aux)
    else:
        init, step = _descent_minimiser(energy_and_force, shift_fn, positions, options, aux)
    return init, step, energy_and_force


@functools.partial(jax.jit, static_argnames=("energy_fn", "shift_fn", "method"))
def _relax(energy_fn, shift_fn, method, positions, params, options) -> RelaxResult:
    if isinstance(energy_fn, NeighborListEnergy):
        # Traced: no reallocation possible; the list built at the start with the
        # capacity allocated at build time.
        neighbors = energy_fn.build_list(positions, params)
        return _relax_neighbors(energy_fn, shift_fn, method, positions, params, options, neighbors)[0]
    init, step, energy_and_force = _minimiser(energy_fn, params, shift_fn, positions, method, options)

    def keep_going(s):
        finite = jnp.all(jnp.isfinite(s.force))
        return (max_force(s.force) > options["fmax"]) & finite & (s.step < options["max_steps"])

    final = jax.lax.while_loop(keep_going, step, init())
    e, f, _ = energy_and_force(final.positions, None)
    fmax = max_force(f)
    converged = fmax <= options["fmax"]
    finite = jnp.isfinite(e) & jnp.all(jnp.isfinite(f))
    status = jnp.where(converged, CONVERGED, jnp.where(finite, MAX_STEPS, NONFINITE))
    jax.debug.callback(_warn_unconverged, status, options["fmax"])
    return RelaxResult(final.positions, e, fmax, final.step, converged, status)


# ---------------------------------------------------------------- neighbor lists


def _neighbor_loop(energy_fn, shift_fn, method, state, params, options):
    """Continue a minimiser ``state`` whose ``aux`` is a valid neighbor list until it
    converges, runs out of steps, goes non-finite, or a step invalidates the list:
    that step is undone (the state keeps its last good positions and forces, only
    the invalid list is kept, to report it)."""
    _, step, _ = _minimiser(energy_fn, params, shift_fn, state.positions, method, options, state.aux)

    def guarded_step(s):
        new = step(s)
        bad = new.aux.flags != 0
        kept = jax.tree_util.tree_map(
            lambda old, fresh: jnp.where(bad, old, fresh),
            dataclasses.replace(s, aux=None),
            dataclasses.replace(new, aux=None),
        )
        return dataclasses.replace(kept, aux=new.aux)

    def keep_going(s):
        finite = jnp.all(jnp.isfinite(s.force))
        go = (max_force(s.force) > options["fmax"]) & finite & (s.step < options["max_steps"])
        return go & (s.aux.flags == 0)

    return jax.lax.while_loop(keep_going, guarded_step, state)


def _neighbor_result(energy_fn, state, params, options) -> tuple[RelaxResult, Neighbors]:
    """The result of a stopped loop and its list at the final positions. The
    state's force (and gradient descent's energy) was computed there with a
    valid list; FIRE's energy is computed with its list, updated there by the
    last step. (Gradient descent's list may come from a rejected move: it is
    updated.) An invalid list gives no energy (NaN) and status
    ``neighbor_overflow``; the force, from the last valid list, gives ``fmax``."""
    if isinstance(state, _DescentState):
        neighbors = energy_fn.update(state.aux, state.positions, params)
        e = state.energy
    else:
        neighbors = state.aux
        e = energy_fn.energy(state.positions, params, neighbors)
    valid = neighbors.valid
    e = jnp.where(valid, e, jnp.nan)
    fmax = max_force(state.force)
    converged = (fmax <= options["fmax"]) & valid
    finite = jnp.isfinite(e) & jnp.all(jnp.isfinite(state.force))
    status = jnp.where(
        converged, CONVERGED, jnp.where(~valid, NEIGHBOR_OVERFLOW, jnp.where(finite, MAX_STEPS, NONFINITE))
    )
    return RelaxResult(state.positions, e, fmax, state.step, converged, status), neighbors


def _relax_neighbors(energy_fn, shift_fn, method, positions, params, options, neighbors):
    """Traced relaxation of a :class:`NeighborListEnergy` with a given list (no
    reallocation): ``(RelaxResult, list at the final positions)``."""
    init, _, _ = _minimiser(energy_fn, params, shift_fn, positions, method, options, neighbors)
    state = _neighbor_loop(energy_fn, shift_fn, method, init(), params, options)
    result, neighbors = _neighbor_result(energy_fn, state, params, options)
    jax.debug.callback(_warn_unconverged, result.status, options["fmax"])
    return result, neighbors


@functools.partial(jax.jit, static_argnames=("energy_fn", "shift_fn", "method"))
def _neighbor_start(energy_fn, shift_fn, method, positions, params, options, neighbors):
    return _minimiser(energy_fn, params, shift_fn, positions, method, options, neighbors)[0]()


@functools.partial(jax.jit, static_argnames=("energy_fn", "shift_fn", "method"))
def _neighbor_run(energy_fn, shift_fn, method, state, params, options):
    state = _neighbor_loop(energy_fn, shift_fn, method, state, params, options)
    return state, _neighbor_result(energy_fn, state, params, options)


def relax_with_neighbors(
    energy_fn: NeighborListEnergy,
    positions: Array,
    params: Any,
    *,
    shift_fn,
    method,
    options,
    diagnostics: dict | None = None,
) -> tuple[RelaxResult, Neighbors]:
    """Relax a :class:`NeighborListEnergy` on the host: allocate its list at the
    start, run the compiled loop, and whenever a step would have used an invalid
    list (capacity overflow), reallocate at the last good state with more room and
    continue from it. Returns the result and the relaxation's list updated at its
    positions (invalid only if :data:`~mdsens.neighbors.MAX_REALLOCATIONS` were
    not enough; the result then has ``reason="neighbor_overflow"``). Needs
    concrete (not traced) arguments. A dict passed as ``diagnostics`` receives
    the reallocations, rebuilds, capacity and cutoff of the relaxation's list."""
    neighbors = energy_fn.allocate(positions, params)
    state = _neighbor_start(energy_fn, shift_fn, method, positions, params, options, neighbors)
    rebuilds, reallocations = 0, 0
    for attempt in range(MAX_REALLOCATIONS + 1):
        state, (result, neighbors) = _neighbor_run(energy_fn, shift_fn, method, state, params, options)
        flags = int(neighbors.flags)
        if flags == 0 or attempt == MAX_REALLOCATIONS:
            break
        # More room than the list that overflowed: a pair and a cell slot more per
        # particle for every attempt so far.
        rebuilds += int(neighbors.rebuilds)
        reallocations += 1
        fresh = energy_fn.allocate(state.positions, params, extra_capacity=attempt + 1)
        state = dataclasses.replace(state, aux=fresh)
    if diagnostics is not None:
        diagnostics.update(
            reallocations=reallocations,
            rebuilds=rebuilds + int(neighbors.rebuilds),
            capacity=neighbors.capacity,
            cell_capacity=neighbors.pairs.cell_list_capacity,
            pairs=int(neighbors.n_pairs),
            cutoff=neighbors.cutoff,
        )
    if flags != 0:
        warnings.warn(
            f"mdsens.relax: {describe(flags)} after {MAX_REALLOCATIONS} reallocations.",
            RuntimeWarning,
            stacklevel=3,
        )
    _warn_unconverged(np.asarray(result.status), float(options["fmax"]))
    return result, neighbors


def _warn_unconverged(status, fmax_tol) -> None:
    status = np.atleast_1d(np.asarray(status))
    failed = status != CONVERGED
    if np.any(failed):
        codes = (MAX_STEPS, NONFINITE, NEIGHBOR_OVERFLOW)
        what = ", ".join(f"{np.sum(status == code)} {REASONS[code]}" for code in codes if np.any(status == code))
        warnings.warn(
            f"mdsens.relax: {np.sum(failed)} of {status.size} relaxation(s) did not reach "
            f"fmax <= {float(np.max(fmax_tol)):.3g} ({what}); see RelaxResult.converged.",
            RuntimeWarning,
            stacklevel=2,
        )


def relax(
    energy_fn: Callable[[Array, Any], Array],
    positions: Array,
    params: Any,
    *,
    shift_fn: Callable[..., Array],
    method: str = "fire",
    fmax: float = 1e-12,
    max_steps: int = 100_000,
    dt_max: float = 0.1,
) -> RelaxResult:
    """Minimise ``energy_fn(positions, params)`` until the largest per-particle
    force norm is at most ``fmax``.

    Args:
        energy_fn: total energy, ``energy_fn(positions, params) -> scalar``.
        positions: starting positions, float64, shape ``(N, dim)``.
        params: pytree of parameters, passed unchanged to ``energy_fn``.
        shift_fn: jax-md shift (``System.shift_fn``), applies displacements.
        method: ``"fire"`` (FIRE 2.0) or ``"gradient_descent"``.
        fmax: force tolerance, as in ASE: ``max_i |F_i| <= fmax``.
        max_steps: most minimiser steps. Running out is not an error: the
            result has ``converged=False``, ``reason="max_steps"``, and a
            ``RuntimeWarning`` is issued.
        dt_max: FIRE's largest time step, and the scale of gradient descent's
            first step (``System.dt_max`` is a stable value for each system).

    Returns:
        A :class:`RelaxResult`. Differentiating the returned positions goes
        through the minimiser loop (which reverse mode cannot do); use
        :func:`mdsens.equilibrium` for derivatives.

    A :class:`mdsens.neighbors.NeighborListEnergy` (what the system builders
    return for large systems) is relaxed with its neighbor list, reallocated on
    the host when it overflows if the arguments are concrete; under ``jit`` or
    ``vmap`` it uses the capacity allocated at build time and stops with
    ``reason="neighbor_overflow"`` if that is not enough.
    """
    require_x64("mdsens.relax")
    positions = check_positions(positions)
    params = check_params(params)
    check_choice(method, "method", METHODS)
    check_relax_options(fmax, max_steps, dt_max)
    options = {
        "fmax": jnp.asarray(fmax, jnp.float64),
        "max_steps": jnp.asarray(max_steps, jnp.int32),
        "dt_max": jnp.asarray(dt_max, jnp.float64),
    }
    if isinstance(energy_fn, NeighborListEnergy) and _all_concrete(positions, params):
        return relax_with_neighbors(energy_fn, positions, params, shift_fn=shift_fn, method=method, options=options)[0]
    return _relax(energy_fn, shift_fn, method, positions, params, options)


def _all_concrete(*trees: Any) -> bool:
    return all(is_concrete(leaf) for leaf in jax.tree_util.tree_leaves(trees))


def unrolled_relax(
    energy_fn: Callable[[Array, Any], Array],
    positions: Array,
    params: Any,
    *,
    shift_fn: Callable[..., Array],
    n_steps: int,
    method: str = "fire",
    dt_max: float = 0.1,
) -> Array:
    """Positions after exactly ``n_steps`` minimiser steps, as a ``lax.scan`` that
    autodiff can go through in both modes ("unrolled" differentiation, the
    baseline that implicit differentiation is compared with)."""
    check_choice(method, "method", METHODS)
    options = {"dt_max": jnp.asarray(dt_max, jnp.float64)}
    if not isinstance(energy_fn, NeighborListEnergy):
        init, step, _ = _minimiser(energy_fn, params, shift_fn, positions, method, options)
        return jax.lax.scan(lambda s, _: (step(s), None), init(), length=n_steps)[0].positions
    # The list built at the start (capacity from build time); its flags are sticky,
    # so positions that any step computed with an invalid list come out NaN.
    neighbors = energy_fn.build_list(positions, params)
    init, step, _ = _minimiser(energy_fn, params, shift_fn, positions, method, options, neighbors)
    final, _ = jax.lax.scan(lambda s, _: (step(s), None), init(), length=n_steps)
    return jnp.where(final.aux.valid, final.positions, jnp.nan)
