"""Minimisers as values: FIRE 2.0 and adaptive gradient descent.

A minimiser holds its tolerance and step budget and defines ``init``,
``step`` and ``terminate`` on a registered-dataclass state; one loop in
:mod:`mdsens.relaxation` drives any of them. Updates are branch-free, so
relaxations work under ``jit`` and ``vmap``.

Both minimisers move particles by plain addition: positions are never
wrapped into the box (every mdsens energy uses the minimum image, with the
box read from ``params["box"]`` at call time).

FIRE is written here rather than taken from ``jax_md.minimize.fire_descent``:
that one stores dt and alpha in the smallest dtype that holds their initial
value (float16 on CPU) and adds 1e-6 to the force norm in the velocity mixing.
Measured by ``scripts/bench_relax.py``: it reaches fmax 1e-12 on the 2D
soft-sphere packing and on a free LJ cluster, but diverges from the
Kob-Andersen start where this FIRE 2.0 converges in about 1900 steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from mdsens._values import count, option, positive_float, set_field

Array = jax.Array


class Evaluator(Protocol):
    """What a minimiser may ask of the energy at positions ``x``: each call
    first updates ``aux`` (a neighbor list; None for plain energies) at ``x``."""

    def force(self, x: Array, aux: Any) -> tuple[Array, Any]: ...

    def energy_and_force(self, x: Array, aux: Any) -> tuple[Array, Array, Any]: ...


def max_force(forces: Array) -> Array:
    """Largest per-particle force norm, ``max_i |F_i|`` (ASE's ``fmax``)."""
    return jnp.max(jnp.sqrt(jnp.sum(forces**2, axis=-1)))


def _safe_norm(v: Array) -> Array:
    """|v| with a zero (not NaN) derivative at v = 0, where an exactly converged
    FIRE run sits: unrolled reverse mode differentiates through it."""
    squared = jnp.vdot(v, v)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


@dataclasses.dataclass(frozen=True)
class _Minimiser:
    """Fields and termination shared by the minimisers: the force tolerance
    ``fmax`` (ASE's: stop when ``max_i |F_i| <= fmax``), the step budget
    ``max_steps`` (running out is not an error: the result says so), and the
    largest step ``dt_max`` (None: the system's stable one)."""

    fmax: float = 1e-12
    max_steps: int = 100_000
    dt_max: float | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        set_field(self, "fmax", positive_float(self.fmax, "fmax", owner))
        set_field(self, "max_steps", count(self.max_steps, "max_steps", owner))
        if self.dt_max is not None:
            set_field(self, "dt_max", positive_float(self.dt_max, "dt_max", owner))

    @property
    def step_scale(self) -> float:
        """``dt_max``, which :meth:`for_system` has filled in before any step."""
        if self.dt_max is None:
            raise ValueError(f"{type(self).__name__} has no dt_max: call for_system(system.dt_max) first.")
        return self.dt_max

    def for_system(self, dt_max: float) -> Any:
        """This minimiser with ``dt_max`` (the system's stable time step) if it has none."""
        return self if self.dt_max is not None else dataclasses.replace(self, dt_max=dt_max)

    def terminate(self, state: Any) -> Array:
        """Stop at ``fmax``, at a non-finite force, or after ``max_steps``."""
        force = state.force
        return (max_force(force) <= self.fmax) | ~jnp.all(jnp.isfinite(force)) | (state.step >= self.max_steps)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FireState:
    positions: Array
    velocity: Array
    force: Array
    dt: Array
    alpha: Array
    n_positive: Array  # consecutive steps with power F.v > 0
    step: Array
    aux: Any = None


@option()
class FIRE(_Minimiser):
    """FIRE 2.0 with semi-implicit Euler integration and unit masses
    (Guénolé et al., Comput. Mater. Sci. 175, 109584, 2020, Algorithm 2).

    Args (besides ``fmax``, ``max_steps``, ``dt_max``):
        dt_start, dt_min: first and smallest time step, as fractions of ``dt_max``.
        n_delay, f_inc, f_dec, alpha_start, f_alpha: FIRE 2.0's constants.
    """

    dt_start: float = 0.1
    dt_min: float = 0.02
    n_delay: int = 20
    f_inc: float = 1.1
    f_dec: float = 0.5
    alpha_start: float = 0.1
    f_alpha: float = 0.99

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("dt_start", "dt_min", "f_inc", "f_dec", "alpha_start", "f_alpha"):
            set_field(self, name, positive_float(getattr(self, name), name, "FIRE"))
        set_field(self, "n_delay", count(self.n_delay, "n_delay", "FIRE", minimum=0))

    def init(self, fn: Evaluator, positions: Array, aux: Any) -> FireState:
        force, aux = fn.force(positions, aux)
        zero = jnp.zeros((), jnp.int32)
        dt = jnp.asarray(self.dt_start * self.step_scale, positions.dtype)
        alpha = jnp.asarray(self.alpha_start, positions.dtype)
        return FireState(positions, jnp.zeros_like(positions), force, dt, alpha, zero, zero, aux)

    def step(self, fn: Evaluator, s: FireState) -> FireState:
        dt_max = self.step_scale
        power = jnp.vdot(s.force, s.velocity)
        uphill = power <= 0.0
        n_positive = jnp.where(uphill, 0, s.n_positive + 1)
        accelerate = ~uphill & (n_positive > self.n_delay)
        # No slow-down during the first n_delay steps (FIRE 2.0's "initial delay").
        slow_down = uphill & (s.step >= self.n_delay)
        dt = jnp.where(accelerate, jnp.minimum(s.dt * self.f_inc, dt_max), s.dt)
        dt = jnp.where(slow_down, jnp.maximum(dt * self.f_dec, self.dt_min * dt_max), dt)
        alpha = jnp.where(accelerate, s.alpha * self.f_alpha, s.alpha)
        alpha = jnp.where(slow_down, self.alpha_start, alpha)
        # Going uphill: step back half a step and stop.
        x = jnp.where(uphill, s.positions - 0.5 * dt * s.velocity, s.positions)
        v = jnp.where(uphill, 0.0, s.velocity)

        v = v + dt * s.force
        v_norm = _safe_norm(v)
        f_norm = _safe_norm(s.force)
        steer = jnp.where(f_norm > 0, v_norm / jnp.where(f_norm > 0, f_norm, 1.0), 0.0)
        v = (1.0 - alpha) * v + alpha * steer * s.force
        x = x + dt * v
        force, aux = fn.force(x, s.aux)
        return FireState(x, v, force, dt, alpha, n_positive, s.step + 1, aux)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DescentState:
    positions: Array
    energy: Array
    force: Array
    step_size: Array
    step: Array
    aux: Any = None


@option()
class GradientDescent(_Minimiser):
    """Gradient descent with an adaptive step: grow the step by ``grow`` after an
    accepted move, multiply it by ``shrink`` and retry after a rejected one. A
    move is accepted when the energy falls, or when the energy change is below
    rounding and the force norm falls (near the minimum, energy differences are
    lost to rounding long before fmax reaches 1e-12). The first step is
    ``0.1 dt_max`` and steps are capped at ``10 dt_max``, so that loosely bound
    particles cannot be flung away."""

    grow: float = 1.2
    shrink: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        set_field(self, "grow", positive_float(self.grow, "grow", "GradientDescent"))
        set_field(self, "shrink", positive_float(self.shrink, "shrink", "GradientDescent"))

    def init(self, fn: Evaluator, positions: Array, aux: Any) -> DescentState:
        e, f, aux = fn.energy_and_force(positions, aux)
        step_size = jnp.asarray(0.1 * self.step_scale, positions.dtype)
        return DescentState(positions, e, f, step_size, jnp.zeros((), jnp.int32), aux)

    def step(self, fn: Evaluator, s: DescentState) -> DescentState:
        x_new = s.positions + s.step_size * s.force
        e_new, f_new, aux = fn.energy_and_force(x_new, s.aux)
        rounding = 64 * jnp.finfo(s.energy.dtype).eps * jnp.maximum(jnp.abs(s.energy), 1e-300)
        lower_energy = e_new < s.energy - rounding
        flat_but_better = (jnp.abs(e_new - s.energy) <= rounding) & (
            jnp.vdot(f_new, f_new) < jnp.vdot(s.force, s.force)
        )
        accept = (lower_energy | flat_but_better) & jnp.isfinite(e_new)
        keep: Callable[[Array, Array], Array] = lambda new, old: jnp.where(accept, new, old)  # noqa: E731
        step_size = jnp.where(
            accept, jnp.minimum(self.grow * s.step_size, 10.0 * self.step_scale), self.shrink * s.step_size
        )
        return DescentState(
            keep(x_new, s.positions), keep(e_new, s.energy), keep(f_new, s.force), step_size, s.step + 1, aux
        )


Minimiser = FIRE | GradientDescent
