"""Relaxation to a mechanical equilibrium: the one loop that drives every minimiser.

:func:`relax` minimises a :class:`~mdsens.System`'s energy with a minimiser
value (:class:`~mdsens.FIRE`, :class:`~mdsens.GradientDescent`). The loop is
:func:`iterate`; :func:`start` and :func:`outcome` begin and end it. The
study runner drives the same three functions on batches.

Energies with state (neighbor lists, see :mod:`mdsens.systems.energy`) carry
it in the minimiser state: it is updated before every evaluation, and a step
that invalidates it (capacity overflow) is undone and stops the loop. Called
with concrete arrays, :func:`relax` then reallocates on the host and
continues from the last good state; under ``jit`` or ``vmap`` it cannot, and
the result says ``neighbor_overflow``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mdsens import zero_modes
from mdsens._checks import is_concrete, require_x64
from mdsens._results import Status
from mdsens.curvature import curvature_bounds, is_saddle
from mdsens.minimisers import FIRE, GradientDescent, Minimiser, max_force
from mdsens.neighbors import MAX_REALLOCATIONS
from mdsens.systems.energy import Energy
from mdsens.systems.system import System

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RelaxResult:
    """Outcome of :func:`relax`; every field is an array (batched under vmap).

    Attributes:
        positions: final positions, shape ``(N, dim)``.
        energy: energy at ``positions`` (NaN if the neighbor list was invalid).
        fmax: largest per-particle force norm at ``positions`` (ASE's ``fmax``).
        n_steps: number of minimiser steps taken.
        converged: whether ``fmax`` reached the minimiser's tolerance at a
            certified minimum.
        status: a :class:`mdsens.Status` code: converged, max_steps, nonfinite,
            saddle, or neighbor_overflow (``positions`` is then the last state
            computed with a valid list).
        lowest_curvature: the lowest curvature of the Hessian at ``positions``
            with the zero modes projected out (a Lanczos estimate from above,
            :mod:`mdsens.curvature`); below ``-SADDLE_RTOL`` times the largest
            curvature the state is a ``saddle``, never ``converged``.
    """

    positions: Array
    energy: Array
    fmax: Array
    n_steps: Array
    converged: Array
    status: Array
    lowest_curvature: Array

    @property
    def reason(self) -> Any:
        """The name of :attr:`status` (a numpy array of names for a batch)."""
        return Status.names(self.status)


@dataclasses.dataclass(frozen=True)
class _Evaluator:
    """The energy at fixed ``params`` as minimisers see it: every evaluation
    updates ``aux`` first, except on a ``fresh`` state (built at these
    positions: an update would compile the list building once more)."""

    energy: Energy
    params: Any
    fresh: bool = False

    def _bound(self, x: Array, aux: Any) -> tuple[Any, Any]:
        aux = aux if self.fresh else self.energy.update(aux, x, self.params)
        return self.energy.bind(aux), aux

    def force(self, x: Array, aux: Any) -> tuple[Array, Any]:
        energy_fn, aux = self._bound(x, aux)
        return -jax.grad(energy_fn)(x, self.params), aux

    def energy_and_force(self, x: Array, aux: Any) -> tuple[Array, Array, Any]:
        energy_fn, aux = self._bound(x, aux)
        e, g = jax.value_and_grad(energy_fn)(x, self.params)
        return e, -g, aux


def start(energy: Energy, minimiser: Minimiser, positions: Array, params: Any, aux: Any) -> Any:
    """The minimiser's first state at ``positions``, with ``aux`` built there."""
    return minimiser.init(_Evaluator(energy, params, fresh=True), positions, aux)


def iterate(energy: Energy, minimiser: Minimiser, params: Any, state: Any, stop_at: Any = None) -> Any:
    """Step ``state`` until the minimiser terminates, its ``aux`` becomes invalid
    (that step is undone, only the invalid ``aux`` is kept, to report it), or
    ``state.step`` reaches ``stop_at`` (if given)."""
    evaluator = _Evaluator(energy, params)

    def keep_going(s: Any) -> Array:
        go = ~minimiser.terminate(s) & energy.valid(s.aux)
        return go if stop_at is None else go & (s.step < stop_at)

    def guarded_step(s: Any) -> Any:
        new = minimiser.step(evaluator, s)
        ok = energy.valid(new.aux)
        kept = jax.tree_util.tree_map(
            lambda fresh, old: jnp.where(ok, fresh, old),
            dataclasses.replace(new, aux=None),
            dataclasses.replace(s, aux=None),
        )
        return dataclasses.replace(kept, aux=new.aux)

    return jax.lax.while_loop(keep_going, guarded_step, state)


def take_steps(energy: Energy, minimiser: Minimiser, params: Any, state: Any, n_steps: int) -> Any:
    """Exactly ``n_steps`` minimiser steps from ``state`` as a ``lax.scan``
    (differentiable in both modes: the unrolled baseline); no stopping rule."""
    evaluator = _Evaluator(energy, params)
    return jax.lax.scan(lambda s, _: (minimiser.step(evaluator, s), None), state, length=n_steps)[0]


def outcome(energy: Energy, minimiser: Minimiser, params: Any, state: Any) -> tuple[RelaxResult, Any]:
    """The :class:`RelaxResult` of a stopped loop, and ``aux`` at its positions.
    A state that reached the force tolerance is certified: its lowest curvature
    (zero modes projected out) must not be negative."""
    x = state.positions
    # Every state's aux is at its positions already (built there, or updated by the
    # step that reached them; an invalid one stays invalid): no update, which would
    # compile the list rebuild a second time.
    aux = state.aux
    valid = energy.valid(aux)
    energy_fn = energy.bind(aux)
    e = energy_fn(x, params)
    fmax = max_force(state.force)
    finite = jnp.isfinite(e) & jnp.all(jnp.isfinite(state.force))
    hvp = zero_modes.hvp_of(energy_fn, x, params)
    lowest, largest = curvature_bounds(hvp, zero_modes.modes_at("auto", energy_fn, x, params))
    saddle = is_saddle(lowest, largest) | ~jnp.isfinite(lowest)
    at_tolerance = (fmax <= minimiser.fmax) & valid & finite
    converged = at_tolerance & ~saddle
    failed = jnp.where(~valid, Status.neighbor_overflow, jnp.where(finite, Status.max_steps, Status.nonfinite))
    status = jnp.where(converged, Status.converged, jnp.where(at_tolerance, Status.saddle, failed)).astype(jnp.int32)
    return RelaxResult(x, e, fmax, state.step, converged, status, lowest), aux


@jax.jit(static_argnums=(0, 5))
def _relax_compiled(energy: Energy, minimiser: Minimiser, positions: Array, params: Any, aux: Any, build: bool):
    if build:
        aux = energy.build(positions, params)
    state = iterate(energy, minimiser, params, start(energy, minimiser, positions, params, aux))
    return outcome(energy, minimiser, params, state), state


#: Steps after which :func:`relax_on_host` trims the spare capacity of an
#: energy's state (``energy.trim``): a random start holds more close pairs
#: than a relaxed packing (N = 1e4 at phi = 0.9: 45056 pair slots allocated
#: for the start, 31559 pairs at the minimum), and every slot costs as much
#: as a pair in every force evaluation.
SETTLE_STEPS = 200
#: Only states of this capacity or more (``energy.diagnostics(aux)["capacity"]``,
#: the pair slots of a neighbor list) are trimmed: trimming compiles the loop a
#: second time, seconds that only long relaxations (N ~ 1e5) win back.
TRIM_MIN_CAPACITY = 2**17


@jax.jit(static_argnums=0)
def _settle(energy: Energy, minimiser: Minimiser, positions: Array, params: Any, aux: Any, steps: Any):
    return iterate(energy, minimiser, params, start(energy, minimiser, positions, params, aux), steps)


@jax.jit(static_argnums=0)
def _continue(energy: Energy, minimiser: Minimiser, params: Any, state: Any):
    state = iterate(energy, minimiser, params, state)
    return outcome(energy, minimiser, params, state), state


def relax_traced(energy: Energy, minimiser: Minimiser, positions: Array, params: Any) -> tuple[RelaxResult, Any]:
    """Relaxation that works on tracers (under ``jit``, ``vmap``, autodiff): ``aux``
    built with the capacity chosen when the energy was made, no reallocation.
    Returns the result and ``aux`` at its positions."""
    return _relax_compiled(energy, minimiser, positions, params, None, True)[0]


def relax_on_host(energy: Energy, minimiser: Minimiser, positions: Array, params: Any) -> tuple[RelaxResult, Any, int]:
    """Relaxation with concrete arrays: ``aux`` allocated on the host and, whenever
    a step would have used an invalid one (capacity overflow), reallocated at
    the last good state with more room, up to ``MAX_REALLOCATIONS`` times.
    After :data:`SETTLE_STEPS` steps, the spare capacity of an ``aux`` of at
    least :data:`TRIM_MIN_CAPACITY` pair slots is trimmed once.
    Returns the result, ``aux`` at its positions and the number of reallocations."""
    aux = energy.allocate(positions, params)
    if energy.diagnostics(aux).get("capacity", 0) < TRIM_MIN_CAPACITY:  # not worth a second compilation
        (result, aux), state = _relax_compiled(energy, minimiser, positions, params, aux, False)
    else:
        state = _settle(energy, minimiser, positions, params, aux, SETTLE_STEPS)
        if bool(energy.valid(state.aux)):
            state = dataclasses.replace(state, aux=energy.trim(state.aux))
        (result, aux), state = _continue(energy, minimiser, params, state)
    reallocations = 0
    while not bool(energy.valid(aux)) and reallocations < MAX_REALLOCATIONS:
        # More room than the list that overflowed: a pair and a cell slot more per
        # particle for every attempt so far.
        reallocations += 1
        state = dataclasses.replace(state, aux=energy.allocate(state.positions, params, extra_capacity=reallocations))
        (result, aux), state = _continue(energy, minimiser, params, state)
    return result, aux, reallocations


def relaxed_state(energy: Energy, minimiser: Minimiser, positions: Array, params: Any) -> tuple[RelaxResult, Any]:
    """The relaxation and the ``aux`` to differentiate with at its positions: with
    concrete arrays, relaxed on the host and ``aux`` frozen tight there (exact,
    and cheaper in every Hessian-vector product) unless it is invalid; with
    tracers, :func:`relax_traced`."""
    if not all_concrete(positions, params):
        return relax_traced(energy, minimiser, positions, params)
    result, aux, _ = relax_on_host(energy, minimiser, positions, params)
    if bool(energy.valid(aux)):
        aux = energy.freeze(result.positions, params)
    return result, aux


def all_concrete(*trees: Any) -> bool:
    return all(is_concrete(leaf) for leaf in jax.tree_util.tree_leaves(trees))


def check_minimiser(minimiser: Any, system: System) -> Minimiser:
    """``minimiser`` with the system's ``dt_max`` where it has none."""
    if not isinstance(minimiser, (FIRE, GradientDescent)):
        raise ValueError(f"minimiser must be mdsens.FIRE(...) or mdsens.GradientDescent(...); got {minimiser!r}.")
    return minimiser.for_system(system.dt_max)


def warn_unconverged(status: Any, fmax: Any) -> None:
    """One ``RuntimeWarning`` naming how many relaxations failed, and why."""
    status = np.atleast_1d(np.asarray(status))
    failed = status != Status.converged
    if np.any(failed):
        what = ", ".join(f"{np.sum(status == code)} {code.name}" for code in Status if np.any(status == code) and code)
        warnings.warn(
            f"mdsens.relax: {np.sum(failed)} of {status.size} relaxation(s) did not reach "
            f"fmax <= {float(np.max(fmax)):.3g} at a certified minimum ({what}); see RelaxResult.converged "
            "and .reason.",
            RuntimeWarning,
            stacklevel=3,
        )


def relax(system: System, positions: Any = None, params: Any = None, *, minimiser: Minimiser = FIRE()) -> RelaxResult:
    """Minimise the system's energy from ``positions`` (default: the system's
    start) at ``params`` (default: the system's) until the largest
    per-particle force norm is at most ``minimiser.fmax``.

    Running out of steps is not an error: the result has ``converged=False``,
    ``reason="max_steps"``, and a ``RuntimeWarning`` is issued. Differentiating
    the returned positions goes through the loop (which reverse mode cannot
    do); use :func:`mdsens.equilibrium` for derivatives.

    Works under ``jit`` and ``vmap``. With concrete arrays, a neighbor list
    that overflows is reallocated on the host; under transformations it keeps
    its build-time capacity, and an overflow stops with
    ``reason="neighbor_overflow"``.
    """
    require_x64("mdsens.relax")
    positions, params = system.inputs(positions, params)
    minimiser = check_minimiser(minimiser, system)
    if all_concrete(positions, params):
        result = relax_on_host(system.energy, minimiser, positions, params)[0]
        warn_unconverged(result.status, minimiser.fmax)
    else:
        result = relax_traced(system.energy, minimiser, positions, params)[0]
        jax.debug.callback(warn_unconverged, result.status, minimiser.fmax)
    return result
