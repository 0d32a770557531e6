r"""Implicit differentiation of roots (Blondel et al., arXiv 2105.15183).

A solver returns ``x*(theta)`` with ``F(x*, theta) = 0``. By the implicit
function theorem

.. math:: \partial_1 F \; \dot x = -\partial_2 F \; \dot\theta,

so tangents (``root_jvp``) and cotangents (``root_vjp``) of ``x*`` cost one
linear solve with the Jacobian ``A = \partial_1 F`` applied matrix-free (for
``F = \nabla_x E`` that is a Hessian-vector product, forward-over-reverse).

:func:`custom_root` makes any solver differentiable this way. It is a
``jax.custom_jvp`` whose tangent is a ``jax.lax.custom_linear_solve``; JAX
transposes that for reverse mode and differentiates it again for higher
orders, so one rule gives ``jvp``, ``grad``, ``jacfwd``, ``jacrev`` and
``hessian``. (jaxopt's ``custom_root`` is a ``custom_vjp``, reverse mode only.)

Zero modes of ``A`` (see :mod:`mdsens.zero_modes`) are projected out of the
right-hand side, the cotangent and the result: the derivative is the
minimum-norm one, ``-A^+ \partial_2 F \dot\theta``. The projection assumes the
left and right null spaces of ``A`` coincide, as they do for symmetric ``A``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from mdsens._results import Status
from mdsens.linear_solve import CG, SolveInfo
from mdsens.zero_modes import ZeroModes

Array = jax.Array
OptimalityFn = Callable[[Any, Any], Any]
# A solver value (mdsens.CG(), ...) or any callable (matvec, b, project) -> (x, SolveInfo).
Solve = Callable[..., tuple[Array, SolveInfo]]
# zero_modes(solution, params) -> ZeroModes | None
ZeroModesFn = Callable[[Any, Any], ZeroModes | None]


def _linearise(optimality_fn: OptimalityFn, solution: Any, params: Any):
    """Flat views of ``x -> F(x, params)`` and ``theta -> F(solution, theta)``."""
    x_flat, unravel = ravel_pytree(solution)

    def f_of_x(x):
        return ravel_pytree(optimality_fn(unravel(x), params))[0]

    def f_of_params(p):
        return ravel_pytree(optimality_fn(solution, p))[0]

    return x_flat, unravel, f_of_x, f_of_params


def _projector(zero_modes: ZeroModes | None) -> Callable[[Array], Array]:
    if zero_modes is None:
        return lambda v: v
    zero_modes = jax.lax.stop_gradient(zero_modes)
    return zero_modes.project


def _jacobian_product(f_of_x: Callable[[Array], Array], x_flat: Array, linearize: bool) -> Callable[[Array], Array]:
    """``v -> dF/dx v``: by ``jax.jvp`` at every product, or, with ``linearize``,
    by ``jax.linearize`` once (what is known at x, e.g. the pair blocks of a
    neighbor-list Hessian, is then computed once instead of in every
    iteration; it costs the memory of those intermediates, O(N^2) for an
    all-pairs energy, so energies ask for it, see :class:`mdsens.Implicit`)."""
    if linearize:
        return jax.linearize(f_of_x, x_flat)[1]
    return lambda v: jax.jvp(f_of_x, (x_flat,), (v,))[1]


def root_jvp(
    optimality_fn: OptimalityFn,
    solution: Any,
    params: Any,
    params_tangent: Any,
    *,
    solve: Solve | None = None,
    symmetric: bool = True,
    zero_modes: ZeroModes | None = None,
    linearize: bool = False,
) -> tuple[Any, SolveInfo]:
    """Tangent of the root: solve ``A x_dot = -d_2F(theta_dot)``.

    Returns ``(solution_tangent, info)``; differentiable again (by JAX's rules
    for ``custom_linear_solve``). With ``linearize``, ``dF/dx`` is linearized
    once per solve instead of differentiated in every product (for sparse
    Hessians, e.g. neighbor-list energies).
    """
    solve = CG() if solve is None else solve
    project = _projector(zero_modes)
    x_flat, unravel, f_of_x, f_of_params = _linearise(optimality_fn, solution, params)
    matvec = _jacobian_product(f_of_x, x_flat, linearize)
    rhs = -jax.jvp(f_of_params, (params,), (params_tangent,))[1]
    projected_solve = lambda mv, b: solve(mv, b, project)  # noqa: E731
    tangent, info = jax.lax.custom_linear_solve(
        matvec, rhs, projected_solve, projected_solve, symmetric=symmetric, has_aux=True
    )
    return unravel(tangent), info


def root_vjp(
    optimality_fn: OptimalityFn,
    solution: Any,
    params: Any,
    cotangent: Any,
    *,
    solve: Solve | None = None,
    symmetric: bool = True,
    zero_modes: ZeroModes | None = None,
    linearize: bool = False,
) -> tuple[Any, SolveInfo]:
    """Cotangent of the parameters: solve ``A^T u = P g`` (``P`` removes zero
    modes), then ``theta_bar = -d_2F^T u``. Returns ``(params_cotangent, info)``."""
    solve = CG() if solve is None else solve
    project = _projector(zero_modes)
    x_flat, _, f_of_x, f_of_params = _linearise(optimality_fn, solution, params)
    g = ravel_pytree(cotangent)[0]
    if symmetric:
        matvec = _jacobian_product(f_of_x, x_flat, linearize)
    else:
        f_vjp = jax.vjp(f_of_x, x_flat)[1]
        matvec = lambda v: f_vjp(v)[0]  # noqa: E731
    projected_solve = lambda mv, b: solve(mv, b, project)  # noqa: E731
    u, info = jax.lax.custom_linear_solve(
        matvec, g, projected_solve, projected_solve, symmetric=symmetric, has_aux=True
    )
    (params_cotangent,) = jax.vjp(f_of_params, params)[1](-u)
    return params_cotangent, _flag_nonfinite(info, params_cotangent)


def _all_finite(tree: Any) -> Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)]))


def _flag_nonfinite(info: SolveInfo, derivative: Any) -> SolveInfo:
    """``info`` marked failed (status ``nonfinite``) when ``derivative`` is not
    finite although the solve converged (a NaN in ``d_theta F``)."""
    finite = _all_finite(derivative)
    return dataclasses.replace(
        info, converged=info.converged & finite, residual=jnp.where(finite, info.residual, jnp.nan)
    )


def _zero_tangent(x: Any) -> Any:
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


def _raise_if_failed(converged, negative_curvature, singular, residual, iterations) -> None:
    if np.all(np.asarray(converged)):
        return
    if np.any(np.asarray(negative_curvature)):
        raise FloatingPointError(f"mdsens: {Status.negative_curvature.message}.")
    if np.any(np.asarray(singular)):
        raise FloatingPointError(f"mdsens: {Status.singular.message}.")
    raise FloatingPointError(
        f"mdsens: {Status.not_converged.message} (relative residual "
        f"{np.max(residual):.3g} after {np.max(iterations)} iterations)."
    )


def _warn_if_failed(converged, negative_curvature, singular, residual, iterations) -> None:
    try:
        _raise_if_failed(converged, negative_curvature, singular, residual, iterations)
    except FloatingPointError as error:
        import warnings

        warnings.warn(f"{error} The derivative is set to NaN.", RuntimeWarning, stacklevel=2)


def batched_callback(callback: Callable[..., None], reductions: tuple[Callable[..., Array], ...]):
    """``jax.debug.callback(callback, *args)`` that runs once per call site, also
    under ``vmap``: batched arguments are first reduced over the batch axis,
    argument ``i`` with ``reductions[i]`` (e.g. ``jnp.all``, ``jnp.max``).
    (``jax.debug.callback`` itself is unrolled once per batch member, so under
    ``jacrev`` of ``x*`` or nested ``vmap`` the number of callbacks, and the
    compile time, grows with the product of the batch sizes.)"""

    @jax.custom_batching.custom_vmap
    def report(*args):
        jax.debug.callback(callback, *args)
        return args[0]

    @report.def_vmap
    def report_batch(axis_size, in_batched, *args):
        del axis_size
        report(*(reduce(a, axis=0) if b else a for reduce, a, b in zip(reductions, args, in_batched, strict=False)))
        return args[0], in_batched[0]

    return report


_REPORT_REDUCTIONS = (jnp.all, jnp.any, jnp.any, jnp.max, jnp.max)


def _raise_if_nonfinite(finite) -> None:
    if not np.all(np.asarray(finite)):
        raise FloatingPointError(
            "mdsens: the derivative with respect to the parameters is NaN or infinite: the linear solve "
            "failed (reported separately) or the mixed derivative d_theta grad_x E of the energy is not "
            "finite at the solution."
        )


def _warn_if_nonfinite(finite) -> None:
    try:
        _raise_if_nonfinite(finite)
    except FloatingPointError as error:
        import warnings

        warnings.warn(f"{error} The derivative is NaN.", RuntimeWarning, stacklevel=2)


def checked_parameter_tangent(tangent: Any, throw: bool) -> Any:
    """The identity on a parameter tangent, whose transpose checks that the
    parameter cotangent is finite. In reverse mode the mixed derivative
    ``-(d_theta F)^T u`` is formed after the transposed solve, where the solve's
    own check cannot see it: this makes a NaN there an error (``throw``) or a
    warning, as for a failed solve. (A ``custom_linear_solve`` with the identity
    operator, so that JAX calls the check on the transposed, cotangent side.)"""
    report = batched_callback(_raise_if_nonfinite if throw else _warn_if_nonfinite, (jnp.all,))

    def check(matvec: Any, b: Array) -> Array:
        report(jnp.all(jnp.isfinite(b)))
        return b

    # One flat array: leaves that are not differentiated arrive as constant zeros,
    # and custom_linear_solve can only transpose an operand that is linear throughout.
    # Integer leaves (a neighbor list travelling with the parameters) have float0
    # tangents and pass unchanged.
    leaves, structure = jax.tree_util.tree_flatten(tangent)
    inexact = [i for i, leaf in enumerate(leaves) if getattr(leaf, "dtype", None) != jax.dtypes.float0]
    if not inexact:
        return tangent
    flat, unravel = ravel_pytree([leaves[i] for i in inexact])
    checked = unravel(jax.lax.custom_linear_solve(lambda v: v, flat, check, check, symmetric=True))
    for i, leaf in zip(inexact, checked, strict=True):
        leaves[i] = leaf
    return jax.tree_util.tree_unflatten(structure, leaves)


def enforce(solve: Solve, throw: bool) -> Solve:
    """Wrap a solver with the failure policy used inside derivatives: when a
    solve fails, raise (``throw=True``) or return NaN and warn (``throw=False``).
    The check runs where the solve runs, so it applies in forward mode, in
    reverse mode (the transposed solve) and at higher orders."""
    report = batched_callback(_raise_if_failed if throw else _warn_if_failed, _REPORT_REDUCTIONS)

    def checked(matvec, b, project):
        x, info = solve(matvec, b, project)
        report(info.converged, info.negative_curvature, info.singular, info.residual, info.iterations)
        if not throw:
            x = jnp.where(info.converged, x, jnp.nan)
        return x, info

    return checked


def custom_root(
    optimality_fn: OptimalityFn,
    *,
    solve: Solve | None = None,
    symmetric: bool = True,
    zero_modes: ZeroModesFn | None = None,
    throw: bool = True,
    has_aux: bool = False,
    linearize: bool = False,
) -> Callable[[Callable[[Any, Any], Any]], Callable[[Any, Any], Any]]:
    """Decorator: make ``solver(init, params) -> x*`` differentiable in ``params``
    by implicit differentiation of ``optimality_fn(x*, params) = 0``.

    The decorated function has the same signature; ``init`` gets a zero
    derivative. Forward, reverse and higher-order derivatives all go through
    linear solves with ``solve`` (default :class:`mdsens.CG`;
    ``symmetric=False`` for an optimality function whose Jacobian is not
    symmetric, with e.g. :class:`mdsens.BiCGSTAB`). ``zero_modes(x*, params)`` returns the
    null space to project out, or None. A failed solve raises
    ``FloatingPointError`` at run time (``throw=True``) or gives NaN and a
    ``RuntimeWarning`` (``throw=False``). With ``has_aux``, the solver returns
    ``(x*, aux)`` and ``aux`` (e.g. diagnostics) gets a zero derivative.
    ``linearize``: see :func:`root_jvp`.
    """
    checked_solve = enforce(CG() if solve is None else solve, throw)

    def decorator(solver):
        @jax.custom_jvp
        def solved(init, params):
            return solver(init, params)

        @solved.defjvp
        def solved_jvp(primals, tangents):
            init, params = primals
            # Calling the decorated function (not `solver`) keeps higher orders implicit too.
            output = solved(init, params)
            solution = output[0] if has_aux else output
            modes = None if zero_modes is None else zero_modes(solution, params)
            tangent, _ = root_jvp(
                optimality_fn,
                solution,
                params,
                checked_parameter_tangent(tangents[1], throw),
                solve=checked_solve,
                symmetric=symmetric,
                zero_modes=modes,
                linearize=linearize,
            )
            if has_aux:
                return output, (tangent, jax.tree_util.tree_map(_zero_tangent, output[1]))
            return solution, tangent

        return solved

    return decorator


def custom_fixed_point(
    fixed_point_fn: Callable[[Any, Any], Any], **kwargs: Any
) -> Callable[[Callable[[Any, Any], Any]], Callable[[Any, Any], Any]]:
    """:func:`custom_root` for solvers of ``x = T(x, params)``: the optimality
    function is ``T(x, params) - x``. Its Jacobian ``dT/dx - I`` is not symmetric
    in general: pass ``symmetric=False`` and a non-symmetric solver such as
    :class:`mdsens.BiCGSTAB`. (For a gradient step ``T = x - eta grad E``
    it is symmetric negative semi-definite: ``symmetric=True`` with :class:`mdsens.MINRES`.)"""

    def optimality_fn(x, params):
        return jax.tree_util.tree_map(jnp.subtract, fixed_point_fn(x, params), x)

    return custom_root(optimality_fn, **kwargs)
