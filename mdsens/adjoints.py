r"""How derivatives of an equilibrium are computed: values passed as ``adjoint``.

- :class:`Implicit` (the default): the implicit function theorem,
  ``dx*/dtheta = -H^+ d_theta grad_x E``, one linear solve per tangent or
  cotangent, in every mode and to any order.
- :class:`Unrolled`: autodiff through a fixed number of minimiser steps (the
  baseline that implicit differentiation is compared with).
- :class:`FiniteDifference`: central differences of re-relaxed states, two
  relaxations per parameter entry (for checking).

Each is a hashable value (compiled programs are shared by equal values) with
``equilibrium(energy, minimiser, positions, params, throw) -> (x*,
RelaxResult | None)``, differentiable in ``params``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from mdsens import zero_modes as zm
from mdsens._results import Status
from mdsens._values import count, positive_float, set_field
from mdsens.implicit import custom_root, root_jvp, root_vjp
from mdsens.linear_solve import CG, SOLVERS, LinearSolver, SolveInfo
from mdsens.minimisers import Minimiser
from mdsens.relaxation import RelaxResult, relax_traced, start, take_steps
from mdsens.systems.energy import Energy, EnergyFn

Array = jax.Array


def check_relaxed(result: RelaxResult, throw: bool, x: Array | None = None) -> Array:
    """``x`` (default: the relaxed positions), or an error (``throw``) / NaN and a
    warning naming why the relaxation failed: inside derivatives no diagnostics
    can be returned. The NaN multiplies ``x``, so that every derivative of it is
    NaN too (a NaN state would instead mask pair terms and give zeros)."""

    def report(status: Any) -> None:
        status = np.atleast_1d(np.asarray(status))
        if np.all(status == Status.converged):
            return
        worst = Status(int(status[status != Status.converged][0]))
        message = (
            f"mdsens.equilibrium: the relaxation did not reach the force tolerance: it stopped with "
            f"{worst.name} ({worst.message}), so x* and "
            "its derivatives would be wrong (use equilibrium_with_info to inspect it)."
        )
        if throw:
            raise FloatingPointError(message)
        warnings.warn(message + " Returning NaN.", RuntimeWarning, stacklevel=2)

    jax.debug.callback(report, result.status)
    x = result.positions if x is None else x
    return x if throw else x * jax.lax.stop_gradient(jnp.where(result.converged, 1.0, jnp.nan))


def _sparse(energy_fn: EnergyFn) -> bool:
    """Whether the bound energy declares a sparse Hessian (``energy_fn.sparse_hessian``,
    set by neighbor-list energies): its Hessian-vector products are then
    linearized once per solve, see :func:`mdsens.implicit.root_jvp`."""
    return bool(getattr(energy_fn, "sparse_hessian", False))


@dataclasses.dataclass(frozen=True)
class Implicit:
    """Implicit differentiation with a linear ``solver`` (default :class:`CG`)
    and ``zero_modes``: ``"auto"`` detects translations, rotations and rattlers
    (:func:`mdsens.zero_modes.detect`); None projects nothing; a callable
    ``(x*, params) -> ZeroModes`` declares them. Derivatives are minimum-norm: no component
    along any zero mode."""

    solver: LinearSolver = CG()
    zero_modes: Any = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.solver, SOLVERS):
            raise ValueError(f"Implicit: solver must be one of CG, MINRES, BiCGSTAB, Dense; got {self.solver!r}.")
        zm.check_spec(self.zero_modes, "Implicit")

    def modes(self, energy_fn: EnergyFn, positions: Array, params: Any) -> zm.ZeroModes:
        return jax.lax.stop_gradient(zm.modes_at(self.zero_modes, energy_fn, positions, params))

    def jvp(self, energy_fn: EnergyFn, positions: Array, params: Any, tangent: Any) -> tuple[Array, SolveInfo]:
        """``(dx*[tangent], SolveInfo)`` at the equilibrium ``positions``."""
        modes = self.modes(energy_fn, positions, params)
        return root_jvp(
            jax.grad(energy_fn),
            positions,
            params,
            tangent,
            solve=self.solver,
            zero_modes=modes,
            linearize=_sparse(energy_fn),
        )

    def vjp(self, energy_fn: EnergyFn, positions: Array, params: Any, cotangent: Array) -> tuple[Any, SolveInfo]:
        """``(cotangent^T dx*/dparams, SolveInfo)`` at the equilibrium ``positions``."""
        modes = self.modes(energy_fn, positions, params)
        return root_vjp(
            jax.grad(energy_fn),
            positions,
            params,
            cotangent,
            solve=self.solver,
            zero_modes=modes,
            linearize=_sparse(energy_fn),
        )

    def equilibrium(
        self, energy: Energy, minimiser: Minimiser, positions: Array, params: Any, throw: bool
    ) -> tuple[Array, RelaxResult]:
        # Relaxed at fixed parameters; the implicit rule, with aux (a neighbor
        # list) frozen at x*, gives every derivative.
        # aux travels with the parameters: a custom_jvp rule cannot close over tracers.
        result, aux = relax_traced(energy, minimiser, positions, jax.lax.stop_gradient(params))

        def optimality(x: Array, args: Any) -> Array:
            return jax.grad(energy.bind(args[1]))(x, args[0])

        def modes(x: Array, args: Any) -> zm.ZeroModes:
            return self.modes(energy.bind(args[1]), x, args[0])

        implicit_rule = custom_root(
            optimality, solve=self.solver, zero_modes=modes, throw=throw, linearize=_sparse(energy.bind(aux))
        )
        solved = implicit_rule(lambda x_star, args: x_star)
        return check_relaxed(result, throw, solved(result.positions, (params, aux))), result


@dataclasses.dataclass(frozen=True)
class Unrolled:
    """Autodiff through exactly ``n_steps`` minimiser steps, as a ``lax.scan``
    (no convergence check; memory grows with ``n_steps`` in reverse mode)."""

    n_steps: int = 1000

    def __post_init__(self) -> None:
        set_field(self, "n_steps", count(self.n_steps, "n_steps", "Unrolled"))

    def equilibrium(
        self, energy: Energy, minimiser: Minimiser, positions: Array, params: Any, throw: bool
    ) -> tuple[Array, None]:
        state = start(energy, minimiser, positions, params, energy.build(positions, params))
        final = take_steps(energy, minimiser, params, state, self.n_steps)
        # Positions that any step computed with an invalid neighbor list come out NaN.
        return jnp.where(energy.valid(final.aux), final.positions, jnp.nan), None


@dataclasses.dataclass(frozen=True)
class FiniteDifference:
    """Central finite differences of states re-relaxed from x* at
    ``params +- step e_k``, for every parameter entry, projected like
    :class:`Implicit` (``zero_modes``)."""

    step: float = 1e-6
    zero_modes: Any = "auto"

    def __post_init__(self) -> None:
        set_field(self, "step", positive_float(self.step, "step", "FiniteDifference"))
        zm.check_spec(self.zero_modes, "FiniteDifference")

    def equilibrium(
        self, energy: Energy, minimiser: Minimiser, positions: Array, params: Any, throw: bool
    ) -> tuple[Array, RelaxResult]:
        def relaxed(init: Array, p: Any) -> Array:
            return check_relaxed(relax_traced(energy, minimiser, init, p)[0], throw)

        @jax.custom_jvp
        def solution(x_star: Array, p: Any) -> Array:
            return x_star

        @solution.defjvp
        def solution_jvp(primals: Any, tangents: Any) -> tuple[Array, Array]:
            (x_star, p), (_, dp) = primals, tangents
            flat, unravel = ravel_pytree(p)

            def column(e: Array) -> Array:
                plus = relaxed(x_star, unravel(flat + self.step * e))
                return (plus - relaxed(x_star, unravel(flat - self.step * e))) / (2.0 * self.step)

            jacobian = jax.lax.map(column, jnp.eye(flat.size, dtype=flat.dtype))  # (P, N, dim)
            energy_fn = energy.bind(energy.build(x_star, p))
            modes = jax.lax.stop_gradient(zm.modes_at(self.zero_modes, energy_fn, x_star, p))
            return x_star, jnp.tensordot(ravel_pytree(dp)[0], jax.vmap(modes.project)(jacobian), axes=1)

        result = relax_traced(energy, minimiser, positions, jax.lax.stop_gradient(params))[0]
        return check_relaxed(result, throw, solution(result.positions, params)), result


ADJOINTS = (Implicit, Unrolled, FiniteDifference)
Adjoint = Implicit | Unrolled | FiniteDifference
