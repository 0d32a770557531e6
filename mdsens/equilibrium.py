r"""Relaxed positions ``x*(params)`` as a differentiable function.

``x*`` minimises ``E(x; theta)``, so ``grad_x E(x*, theta) = 0`` and

.. math:: \frac{\partial x^*}{\partial\theta} = -H^{+}\,\partial_\theta \nabla_x E,
          \qquad H = \nabla^2_{xx} E(x^*, \theta),

the minimum-norm solution: no component along zero modes of ``H`` (rigid
translations, rotations of free clusters, rattlers). The starting positions
get a zero derivative.

Failure policy. Functions that return diagnostics (``equilibrium_jvp``,
``equilibrium_vjp``, ``equilibrium_with_info``'s relaxation part) never raise
on a failed relaxation or solve: the diagnostics report it. Inside
derivatives of ``equilibrium``, where no diagnostics can be returned, a failed
relaxation or linear solve raises at run time (``throw=True``, the default)
or yields NaN with a ``RuntimeWarning`` (``throw=False``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from mdsens import linear_solve, zero_modes as zm
from mdsens._checks import (
    check_choice,
    check_params,
    check_positions,
    check_positive,
    check_relax_options,
    require_x64,
)
from mdsens.implicit import custom_root, root_jvp, root_vjp
from mdsens.linear_solve import SolveInfo, Solver
from mdsens.neighbors import NeighborListEnergy
from mdsens.relaxation import METHODS as RELAX_METHODS
from mdsens.relaxation import (
    RelaxResult,
    _all_concrete,
    _relax,
    _relax_neighbors,
    relax_with_neighbors,
    unrolled_relax,
)

Array = jax.Array
EnergyFn = Callable[[Array, Any], Array]

DIFFERENTIATION_METHODS = ("implicit", "unrolled", "finite_difference")
SOLVERS = {"cg": linear_solve.cg, "minres": linear_solve.minres, "bicgstab": linear_solve.bicgstab, "dense": linear_solve.dense}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EquilibriumInfo:
    """Diagnostics of one sensitivity: the relaxation and the linear solve."""

    relax: RelaxResult
    solve: SolveInfo


@dataclasses.dataclass(frozen=True)
class _Options:
    """Hashable options: one compiled function per distinct set."""

    shift_fn: Callable[..., Array]
    relax_method: str
    fmax: float
    max_steps: int
    dt_max: float
    solver: Any
    zero_modes: Any
    throw: bool


def _solver(solver: str | Solver) -> Solver:
    if isinstance(solver, str):
        check_choice(solver, "solver", tuple(SOLVERS))
        return SOLVERS[solver]()
    if not callable(solver):
        raise ValueError(f"solver must be one of {tuple(SOLVERS)} or a solver callable; got {solver!r}.")
    return solver


def _check_zero_modes(zero_modes: Any) -> None:
    if not (zero_modes in ("auto", None) or isinstance(zero_modes, zm.ZeroModes) or callable(zero_modes)):
        raise ValueError(
            f"zero_modes must be 'auto', None, a ZeroModes or a callable; got {zero_modes!r}."
        )


def _options(shift_fn, relax_method, fmax, max_steps, dt_max, solver, zero_modes, throw) -> _Options:
    check_choice(relax_method, "relax_method", RELAX_METHODS)
    check_relax_options(fmax, max_steps, dt_max)
    _check_zero_modes(zero_modes)
    zero_modes_key = zero_modes if not isinstance(zero_modes, zm.ZeroModes) else "given"
    return _Options(shift_fn, relax_method, float(fmax), int(max_steps), float(dt_max), solver, zero_modes_key, throw)


def _optimality(energy_fn: EnergyFn) -> Callable[[Array, Any], Array]:
    return jax.grad(energy_fn)


def _hvp(energy_fn: EnergyFn, positions: Array, params: Any) -> Callable[[Array], Array]:
    gradient = _optimality(energy_fn)
    return lambda v: jax.jvp(lambda x: gradient(x, params), (positions,), (v,))[1]


def _zero_modes_at(energy_fn, zero_modes, given, positions, params) -> zm.ZeroModes:
    if zero_modes == "auto":
        return zm.detect(_hvp(energy_fn, positions, params), positions)
    if zero_modes is None:
        return zm.none(positions)
    if zero_modes == "given":
        return given
    return zero_modes(positions, params)


def _relax_options(o: _Options) -> dict[str, Array]:
    return {
        "fmax": jnp.asarray(o.fmax, jnp.float64),
        "max_steps": jnp.asarray(o.max_steps, jnp.int32),
        "dt_max": jnp.asarray(o.dt_max, jnp.float64),
    }


def _check_relaxed(result: RelaxResult, throw: bool) -> Array:
    """Relaxed positions, or an error / NaN if the relaxation failed."""

    def report(converged):
        if not np.all(converged):
            message = (
                "mdsens.equilibrium: the relaxation did not reach the force tolerance, "
                "so x* and its derivatives would be wrong (raise max_steps, or use "
                "equilibrium_with_info to inspect it)."
            )
            if throw:
                raise FloatingPointError(message)
            import warnings

            warnings.warn(message + " Returning NaN.", RuntimeWarning, stacklevel=2)

    jax.debug.callback(report, result.converged)
    return result.positions if throw else jnp.where(result.converged, result.positions, jnp.nan)


@functools.lru_cache(maxsize=64)
def _implicit_equilibrium(energy_fn: EnergyFn, o: _Options):
    """Compiled ``(positions, params, given_modes) -> (x*, RelaxResult)``, differentiable in params."""

    def solve_relax(init, args):
        params, given = args
        result = _relax(energy_fn, o.shift_fn, o.relax_method, init, params, _relax_options(o))
        return _check_relaxed(result, o.throw), result

    def optimality(x, args):
        return _optimality(energy_fn)(x, args[0])

    def modes(x, args):
        return _zero_modes_at(energy_fn, o.zero_modes, args[1], x, args[0])

    solved = custom_root(optimality, solve=_solver(o.solver), zero_modes=modes, throw=o.throw, has_aux=True)(
        solve_relax
    )
    return jax.jit(lambda positions, params, given: solved(positions, (params, given)))


@functools.lru_cache(maxsize=64)
def _implicit_equilibrium_neighbors(energy_fn: NeighborListEnergy, o: _Options):
    """:func:`_implicit_equilibrium` for a neighbor-list energy. The relaxation
    carries its list (traced: the capacity allocated at build time, no
    reallocation; an overflow is a failed relaxation) and returns the list valid
    at x*; the optimality condition and zero modes use that list, frozen, so
    every derivative is exact. x* and the list are computed at fixed parameters
    and passed to ``custom_root`` as its start and arguments."""

    def optimality(x, args):
        return _optimality(energy_fn.bind(args[2]))(x, args[0])

    def modes(x, args):
        return _zero_modes_at(energy_fn.bind(args[2]), o.zero_modes, args[1], x, args[0])

    solved = custom_root(optimality, solve=_solver(o.solver), zero_modes=modes, throw=o.throw, has_aux=True)(
        lambda x_star, args: (x_star, args[3])
    )

    def run(positions, params, given):
        fixed = jax.lax.stop_gradient(params)
        neighbors = energy_fn.build_list(positions, fixed)
        result, neighbors = _relax_neighbors(
            energy_fn, o.shift_fn, o.relax_method, positions, fixed, _relax_options(o), neighbors
        )
        return solved(_check_relaxed(result, o.throw), (params, given, neighbors, result))

    return jax.jit(run)


@functools.lru_cache(maxsize=64)
def _unrolled_equilibrium(energy_fn: EnergyFn, shift_fn, relax_method: str, n_steps: int, dt_max: float):
    return jax.jit(
        lambda positions, params: unrolled_relax(
            energy_fn, positions, params, shift_fn=shift_fn, n_steps=n_steps, method=relax_method, dt_max=dt_max
        )
    )


@functools.lru_cache(maxsize=64)
def _finite_difference_equilibrium(energy_fn: EnergyFn, o: _Options, step: float):
    """``x*(params)`` whose derivative is the central finite-difference Jacobian:
    for every parameter entry, two relaxations started from ``x*`` at
    ``params +- step * e_k``. They run in displacement space ``u`` (positions
    ``shift_fn(x*, u)``) so periodic wrapping never corrupts the difference."""
    relax_options = _relax_options(o)

    def relaxed(init, params):
        return _check_relaxed(_relax(energy_fn, o.shift_fn, o.relax_method, init, params, relax_options), o.throw)

    @jax.custom_jvp
    def solution(init, params, given):
        return relaxed(init, params)

    @solution.defjvp
    def solution_jvp(primals, tangents):
        init, params, given = primals
        x_star = solution(init, params, given)
        flat, unravel = ravel_pytree(params)

        def energy_of_u(u, p):
            return energy_fn(o.shift_fn(x_star, u), p)

        def displacement(p_flat):
            add = lambda u, du: u + du  # noqa: E731
            result = _relax(energy_of_u, add, o.relax_method, jnp.zeros_like(x_star), unravel(p_flat), relax_options)
            return _check_relaxed(result, o.throw)

        def column(e):
            return (displacement(flat + step * e) - displacement(flat - step * e)) / (2.0 * step)

        jacobian = jax.lax.map(column, jnp.eye(flat.size, dtype=flat.dtype))  # (P, N, dim)
        modes = jax.lax.stop_gradient(_zero_modes_at(energy_fn, o.zero_modes, given, x_star, params))
        jacobian = jax.vmap(modes.project)(jacobian)
        tangent = jnp.tensordot(ravel_pytree(tangents[1])[0], jacobian, axes=1)
        return x_star, tangent

    return jax.jit(solution)


def equilibrium(
    energy_fn: EnergyFn,
    positions: Array,
    params: Any,
    *,
    shift_fn: Callable[..., Array],
    method: str = "implicit",
    solver: str | Solver = "cg",
    zero_modes: Any = "auto",
    throw: bool = True,
    relax_method: str = "fire",
    fmax: float = 1e-12,
    max_steps: int = 100_000,
    dt_max: float = 0.1,
    unroll_steps: int = 1000,
    fd_step: float = 1e-6,
) -> Array:
    """Relaxed positions ``x*(params)``, differentiable with respect to ``params``.

    Works with ``jax.jvp``, ``jax.vjp``, ``jax.grad``, ``jax.jacfwd``,
    ``jax.jacrev``, ``jax.hessian``, ``jax.jit`` and ``jax.vmap``.

    Args:
        energy_fn: ``energy_fn(positions, params) -> scalar``.
        positions: starting positions ``(N, dim)``; their derivative is zero.
        params: any pytree of float64 arrays (diameters, epsilon, sigma
            matrices, box...), passed to ``energy_fn``.
        shift_fn: jax-md shift of the space (``System.shift_fn``).
        method: how derivatives are computed. ``"implicit"``: implicit function
            theorem, one linear solve per tangent or cotangent. ``"unrolled"``:
            autodiff through exactly ``unroll_steps`` FIRE steps (no convergence
            check; for comparison). ``"finite_difference"``: central differences
            of re-relaxed states with step ``fd_step``, two relaxations per
            parameter entry (for checking).
        solver: ``"cg"`` (default; H is positive semi-definite at a minimum),
            ``"minres"`` (symmetric indefinite), ``"bicgstab"``, ``"dense"``
            (pseudo-inverse of the full Hessian, small systems), or a solver
            from :mod:`mdsens.linear_solve` with custom tolerances or a
            preconditioner.
        zero_modes: ``"auto"`` detects translations, rotations and rattlers
            (:func:`mdsens.zero_modes.detect`); ``None`` projects nothing; a
            :class:`~mdsens.zero_modes.ZeroModes` or a callable
            ``(x*, params) -> ZeroModes`` declares them.
        throw: on a failed relaxation or linear solve, raise
            ``FloatingPointError`` at run time (True) or return NaN and warn.
        relax_method, fmax, max_steps, dt_max: passed to :func:`mdsens.relax`.

    A neighbor-list energy (:mod:`mdsens.neighbors`) relaxes here with the list
    capacity allocated when it was built (under ``jit`` and autodiff there is
    no host to reallocate): an overflow is a failed relaxation.
    """
    return _equilibrium_with_info(**locals())[0]


def equilibrium_with_info(
    energy_fn: EnergyFn, positions: Array, params: Any, **options: Any
) -> tuple[Array, RelaxResult | None]:
    """:func:`equilibrium` (same keyword arguments) that also returns the
    :class:`RelaxResult` of the relaxation (None for ``method="unrolled"``,
    which runs a fixed number of steps, and for ``"finite_difference"``)."""
    bound = inspect.signature(equilibrium).bind(energy_fn, positions, params, **options)
    bound.apply_defaults()
    return _equilibrium_with_info(**bound.arguments)


def _equilibrium_with_info(
    energy_fn, positions, params, shift_fn, method, solver, zero_modes, throw, relax_method, fmax,
    max_steps, dt_max, unroll_steps, fd_step,
) -> tuple[Array, RelaxResult | None]:
    require_x64("mdsens.equilibrium")
    positions = check_positions(positions)
    params = check_params(params)
    check_choice(method, "method", DIFFERENTIATION_METHODS)
    o = _options(shift_fn, relax_method, fmax, max_steps, dt_max, solver, zero_modes, throw)
    if method == "unrolled":
        if not isinstance(unroll_steps, (int, np.integer)) or unroll_steps < 1:
            raise ValueError(f"unroll_steps must be an integer >= 1; got {unroll_steps!r}.")
        return _unrolled_equilibrium(energy_fn, shift_fn, relax_method, int(unroll_steps), float(dt_max))(positions, params), None
    given = zero_modes if isinstance(zero_modes, zm.ZeroModes) else None
    if method == "finite_difference":
        check_positive(fd_step, "fd_step")
        return _finite_difference_equilibrium(energy_fn, o, float(fd_step))(positions, params, given), None
    _solver(solver)
    if isinstance(energy_fn, NeighborListEnergy):
        return _implicit_equilibrium_neighbors(energy_fn, o)(positions, params, given)
    return _implicit_equilibrium(energy_fn, o)(positions, params, given)


def _checked_with_info_inputs(caller, positions, params, shift_fn, solver, zero_modes, relax_method, fmax, max_steps, dt_max):
    """Validated ``(positions, params, options, given zero modes)`` of the ``*_jvp``/``*_vjp`` functions."""
    require_x64(caller)
    positions, params = check_positions(positions), check_params(params)
    o = _options(shift_fn, relax_method, fmax, max_steps, dt_max, solver, zero_modes, True)
    _solver(solver)
    return positions, params, o, zero_modes if isinstance(zero_modes, zm.ZeroModes) else None


def _relax_and_modes(energy_fn, positions, params, o: _Options, given, relaxed=None):
    """The relaxation, the zero modes and the energy to differentiate at x*: for a
    neighbor-list energy, with its list frozen at x* (``relaxed``, the
    ``(RelaxResult, list)`` of a host relaxation, or relaxed here if None)."""
    if not isinstance(energy_fn, NeighborListEnergy):
        result = _relax(energy_fn, o.shift_fn, o.relax_method, positions, params, _relax_options(o))
    else:
        if relaxed is None:
            neighbors = energy_fn.build_list(positions, params)
            relaxed = _relax_neighbors(
                energy_fn, o.shift_fn, o.relax_method, positions, params, _relax_options(o), neighbors
            )
        result, energy_fn = relaxed[0], energy_fn.bind(relaxed[1])
    modes = _zero_modes_at(energy_fn, o.zero_modes, given, result.positions, params)
    return result, modes, energy_fn


def _relax_on_host(energy_fn, positions, params, o: _Options):
    """A neighbor-list energy with concrete arguments is relaxed on the host, where
    its list can be reallocated: ``(RelaxResult, list at x*)``; otherwise None.
    The relaxation's list has a skin and spare capacity that derivatives at x* do
    not need: they get the tight list of the pairs in range (exact, and cheaper
    in every Hessian-vector product), unless the relaxation's list is invalid
    (then it is kept, and the derivatives come out NaN)."""
    if not (isinstance(energy_fn, NeighborListEnergy) and _all_concrete(positions, params)):
        return None
    result, neighbors = relax_with_neighbors(
        energy_fn, positions, params, shift_fn=o.shift_fn, method=o.relax_method, options=_relax_options(o)
    )
    if bool(neighbors.valid):
        neighbors = energy_fn.freeze(result.positions, params)
    return result, neighbors


@functools.partial(jax.jit, static_argnames=("energy_fn", "o"))
def _jvp_with_info(energy_fn, o, positions, params, params_tangent, given, relaxed=None):
    result, modes, energy_fn = _relax_and_modes(energy_fn, positions, params, o, given, relaxed)
    tangent, info = root_jvp(
        _optimality(energy_fn), result.positions, params, params_tangent, solve=_solver(o.solver), zero_modes=modes
    )
    return result.positions, tangent, EquilibriumInfo(result, info)


@functools.partial(jax.jit, static_argnames=("energy_fn", "o"))
def _vjp_with_info(energy_fn, o, positions, params, cotangent, given, relaxed=None):
    result, modes, energy_fn = _relax_and_modes(energy_fn, positions, params, o, given, relaxed)
    params_cotangent, info = root_vjp(
        _optimality(energy_fn), result.positions, params, cotangent, solve=_solver(o.solver), zero_modes=modes
    )
    return result.positions, params_cotangent, EquilibriumInfo(result, info)


def equilibrium_jvp(
    energy_fn: EnergyFn,
    positions: Array,
    params: Any,
    params_tangent: Any,
    *,
    shift_fn: Callable[..., Array],
    solver: str | Solver = "cg",
    zero_modes: Any = "auto",
    relax_method: str = "fire",
    fmax: float = 1e-12,
    max_steps: int = 100_000,
    dt_max: float = 0.1,
) -> tuple[Array, Array, EquilibriumInfo]:
    """Forward mode with diagnostics: ``(x*, dx*[params_tangent], info)``.

    One relaxation and one linear solve. Never raises on failure: check
    ``info.relax.converged`` and ``info.solve.converged``. A neighbor-list
    energy called with concrete arrays relaxes on the host (reallocating its
    list if needed) and solves with a list frozen at x*.
    """
    positions, params, o, given = _checked_with_info_inputs(
        "mdsens.equilibrium_jvp", positions, params, shift_fn, solver, zero_modes, relax_method, fmax, max_steps, dt_max
    )
    params_tangent = check_params(params_tangent, "params_tangent")
    relaxed = _relax_on_host(energy_fn, positions, params, o)
    return _jvp_with_info(energy_fn, o, positions, params, params_tangent, given, relaxed)


def equilibrium_vjp(
    energy_fn: EnergyFn,
    positions: Array,
    params: Any,
    cotangent: Array,
    *,
    shift_fn: Callable[..., Array],
    solver: str | Solver = "cg",
    zero_modes: Any = "auto",
    relax_method: str = "fire",
    fmax: float = 1e-12,
    max_steps: int = 100_000,
    dt_max: float = 0.1,
) -> tuple[Array, Any, EquilibriumInfo]:
    """Reverse mode with diagnostics: ``(x*, cotangent^T dx*/dparams, info)``.

    ``cotangent`` has the shape of the positions (e.g. ``grad`` of a scalar
    objective at ``x*``); the result has the structure of ``params``, so one
    solve gives the derivative with respect to every parameter (e.g. all N
    per-particle diameters). Never raises on failure: check ``info``.
    """
    positions, params, o, given = _checked_with_info_inputs(
        "mdsens.equilibrium_vjp", positions, params, shift_fn, solver, zero_modes, relax_method, fmax, max_steps, dt_max
    )
    cotangent = check_positions(cotangent, "cotangent")
    if cotangent.shape != positions.shape:
        raise ValueError(f"cotangent must have the shape of positions {positions.shape}; got {cotangent.shape}.")
    relaxed = _relax_on_host(energy_fn, positions, params, o)
    return _vjp_with_info(energy_fn, o, positions, params, cotangent, given, relaxed)


def energy_sensitivity(energy_fn: EnergyFn, positions: Array, params: Any) -> Any:
    r"""Derivative of the relaxed energy ``E*(theta) = E(x*(theta), theta)`` by the
    envelope theorem: ``dE*/dtheta = dE/dtheta`` at fixed ``x*``, because
    ``grad_x E(x*) = 0``. No linear solve. ``positions`` must be relaxed; the
    error is of the order of ``fmax`` times ``|dx*/dtheta|``."""
    require_x64("mdsens.energy_sensitivity")
    positions, params = check_positions(positions), check_params(params)
    return jax.grad(energy_fn, argnums=1)(jax.lax.stop_gradient(positions), params)


def hessian_diagonal(energy_fn: EnergyFn, positions: Array, params: Any, batch_size: int = 64) -> Array:
    """Exact diagonal of the Hessian at ``positions``, shape ``(N, dim)``, from
    ``N * dim`` Hessian-vector products (batched). For Jacobi preconditioning
    (:func:`mdsens.linear_solve.jacobi`) of repeated solves at one state. For a
    neighbor-list energy: in O(N), from the pair Hessian blocks
    (:meth:`mdsens.neighbors.NeighborListEnergy.hessian_diagonal`)."""
    if isinstance(energy_fn, NeighborListEnergy):
        return energy_fn.hessian_diagonal(positions, params)
    hvp = _hvp(energy_fn, positions, params)
    n = positions.size

    def entry(i):
        e = jnp.zeros(n, positions.dtype).at[i].set(1.0).reshape(positions.shape)
        return jnp.vdot(e, hvp(e))

    return jax.lax.map(entry, jnp.arange(n), batch_size=batch_size).reshape(positions.shape)
