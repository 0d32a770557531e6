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

from mdsens._checks import check_choice, check_params, check_positions, check_relax_options, require_x64

Array = jax.Array

METHODS = ("fire", "gradient_descent")
# Status codes of a relaxation; ``RelaxResult.reason`` names them.
CONVERGED, MAX_STEPS, NONFINITE = 0, 1, 2
REASONS = ("converged", "max_steps", "nonfinite")


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
        status: 0 converged, 1 ran out of steps, 2 energy or force not finite.
    """

    positions: Array
    energy: Array
    fmax: Array
    n_steps: Array
    converged: Array
    status: Array

    @property
    def reason(self) -> Any:
        """Why the relaxation stopped: "converged", "max_steps" or "nonfinite"
        (a numpy array of those strings for a batch)."""
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _DescentState:
    positions: Array
    energy: Array
    force: Array
    step_size: Array
    step: Array


def _safe_norm(v: Array) -> Array:
    """|v| with a zero (not NaN) derivative at v = 0, where an exactly converged
    FIRE run sits: unrolled reverse mode differentiates through it."""
    squared = jnp.vdot(v, v)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def max_force(forces: Array) -> Array:
    """Largest per-particle force norm, ``max_i |F_i|`` (ASE's ``fmax``)."""
    return jnp.max(jnp.sqrt(jnp.sum(forces**2, axis=-1)))


def _fire_minimiser(force_fn, shift_fn, positions, options):
    """FIRE 2.0 with semi-implicit Euler integration and unit masses
    (Guénolé et al., Comput. Mater. Sci. 175, 109584, 2020, Algorithm 2)."""
    dt_max = options["dt_max"]
    dt_min = 0.02 * dt_max
    n_delay, f_inc, f_dec, alpha_start, f_alpha = 20, 1.1, 0.5, 0.1, 0.99

    def init():
        force = force_fn(positions)
        zero = jnp.zeros((), jnp.int32)
        return _FireState(
            positions, jnp.zeros_like(positions), force, 0.1 * dt_max, jnp.asarray(alpha_start), zero, zero
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
        return _FireState(x, v, force_fn(x), dt, alpha, n_positive, s.step + 1)

    return init, step


def _descent_minimiser(energy_and_force_fn, shift_fn, positions, options):
    """Gradient descent with an adaptive step: grow the step by 1.2 after an
    accepted move, halve it and retry after a rejected one. A move is accepted
    when the energy falls, or when the energy change is below rounding and the
    force norm falls (near the minimum, energy differences are lost to rounding
    long before fmax reaches 1e-12). The step is capped at ``10 dt_max`` so that
    loosely bound particles cannot be flung away."""

    def init():
        e, f = energy_and_force_fn(positions)
        return _DescentState(positions, e, f, 0.1 * options["dt_max"], jnp.zeros((), jnp.int32))

    def step(s: _DescentState) -> _DescentState:
        x_new = shift_fn(s.positions, s.step_size * s.force)
        e_new, f_new = energy_and_force_fn(x_new)
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
        )

    return init, step


def _minimiser(energy_fn, params, shift_fn, positions, method, options):
    """``(init, step, energy_and_force)`` of the chosen minimiser."""

    def energy_and_force(x):
        e, g = jax.value_and_grad(energy_fn)(x, params)
        return e, -g

    if method == "fire":
        init, step = _fire_minimiser(lambda x: energy_and_force(x)[1], shift_fn, positions, options)
    else:
        init, step = _descent_minimiser(energy_and_force, shift_fn, positions, options)
    return init, step, energy_and_force


@functools.partial(jax.jit, static_argnames=("energy_fn", "shift_fn", "method"))
def _relax(energy_fn, shift_fn, method, positions, params, options) -> RelaxResult:
    init, step, energy_and_force = _minimiser(energy_fn, params, shift_fn, positions, method, options)

    def keep_going(s):
        finite = jnp.all(jnp.isfinite(s.force))
        return (max_force(s.force) > options["fmax"]) & finite & (s.step < options["max_steps"])

    final = jax.lax.while_loop(keep_going, step, init())
    e, f = energy_and_force(final.positions)
    fmax = max_force(f)
    converged = fmax <= options["fmax"]
    finite = jnp.isfinite(e) & jnp.all(jnp.isfinite(f))
    status = jnp.where(converged, CONVERGED, jnp.where(finite, MAX_STEPS, NONFINITE))
    jax.debug.callback(_warn_unconverged, status, options["fmax"])
    return RelaxResult(final.positions, e, fmax, final.step, converged, status)


def _warn_unconverged(status, fmax_tol) -> None:
    status = np.atleast_1d(np.asarray(status))
    failed = status != CONVERGED
    if np.any(failed):
        what = ", ".join(f"{np.sum(status == code)} {REASONS[code]}" for code in (MAX_STEPS, NONFINITE) if np.any(status == code))
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
    return _relax(energy_fn, shift_fn, method, positions, params, options)


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
    init, step, _ = _minimiser(energy_fn, params, shift_fn, positions, method, options)
    final, _ = jax.lax.scan(lambda s, _: (step(s), None), init(), length=n_steps)
    return final.positions
