#!/usr/bin/env python3
"""Benchmark: the cost and accuracy of equilibrium sensitivities, by method.

On 2D periodic 50:50 bidisperse soft-sphere packings (1.0:1.4, phi 0.9) with
per-particle diameters as parameters, for each N:

- relaxation (FIRE to fmax 1e-12);
- implicit JVP: dx*/d(small diameter), one CG solve (``mdsens.equilibrium_jvp``
  from x*, so the relaxation takes no step);
- implicit gradient of f(x*) = g . x* with respect to all N diameters, one CG solve
  (``mdsens.equilibrium_vjp`` from x*; g random with nonzero mean, so translations matter);
- dense reference: :func:`mdsens.testing.dense_reference` (the full Hessian and its pseudo-inverse);
- unrolled: reverse-mode autodiff through as many FIRE steps as the relaxation took;
- finite differences: central, re-relaxing, step 1e-6; the JVP costs 2 relaxations,
  the gradient 2 per parameter, timed on a few parameters and scaled to N;
- jaxopt (the paper's reference implementation, if installed: `pip install -e .[bench]`):
  `custom_root` reverse mode and `root_jvp` forward mode with its CG solve.

Times exclude compilation (every function runs once before it is timed), except
the dense reference's (compiled anew on every call).
Errors are max-abs errors relative to the max-abs of the dense reference.
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import mdsens  # noqa: E402
from mdsens import systems, testing  # noqa: E402


def timed(fn, *args, repeat: int = 1):
    """(result, seconds) of the fastest of ``repeat`` runs after one warm-up run."""
    jax.block_until_ready(fn(*args))
    best = np.inf
    for _ in range(repeat):
        start = time.perf_counter()
        result = jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return result, best


def rel_error(value, reference) -> float:
    value, reference = np.asarray(value), np.asarray(reference)
    return float(np.max(np.abs(value - reference)) / np.max(np.abs(reference)))


def bench_size(n: int, fd_params: int, with_dense: bool, with_unrolled: bool) -> dict:
    system = systems.soft_sphere_packing(n, dim=2, phi=0.9, per_particle_diameters=True, seed=0)
    params = system.params
    small = (np.asarray(system.species) == 0).astype(np.float64)
    tangent = dict(jax.tree_util.tree_map(jnp.zeros_like, params), diameters=jnp.asarray(small))
    g = jax.random.normal(jax.random.PRNGKey(1), (n, 2)) + 0.5
    out: dict = {"n": n}

    relax = jax.jit(lambda x0, p: mdsens.relax(system, x0, p))
    result, out["relax_s"] = timed(relax, system.positions, params)
    out["relax_steps"] = int(result.n_steps)
    out["relax_fmax"] = float(result.fmax)
    x_star = result.positions

    def implicit_jvp(adjoint: mdsens.Implicit):
        return mdsens.equilibrium_jvp(system, params, tangent, positions=x_star, adjoint=adjoint)

    def implicit_grad(adjoint: mdsens.Implicit):
        return mdsens.equilibrium_vjp(system, params, g, positions=x_star, adjoint=adjoint)

    # From x*, these relax in zero steps: the time is the solve's (and its zero modes').
    (_, dx, jvp_info), out["implicit_jvp_s"] = timed(implicit_jvp, mdsens.Implicit(), repeat=3)
    (_, dparams, grad_info), out["implicit_grad_s"] = timed(implicit_grad, mdsens.Implicit(), repeat=3)
    out["cg_iterations_jvp"] = int(jvp_info.solve.iterations)
    out["cg_iterations_grad"] = int(grad_info.solve.iterations)
    out["cg_residual_grad"] = float(grad_info.solve.residual)
    out["implicit_jvp_over_relax"] = out["implicit_jvp_s"] / out["relax_s"]
    out["implicit_grad_over_relax"] = out["implicit_grad_s"] / out["relax_s"]

    dense = None
    if with_dense:
        # Jacobi preconditioning: iterations only (the exact diagonal costs N*dim products).
        jacobi = mdsens.Jacobi(system.hessian_diagonal(x_star, params))
        _, _, jacobi_info = implicit_grad(mdsens.Implicit(solver=mdsens.CG(preconditioner=jacobi)))
        out["cg_iterations_grad_jacobi"] = int(jacobi_info.solve.iterations)

        start = time.perf_counter()
        dense = testing.dense_reference(system.energy, x_star, params)
        out["dense_s"] = time.perf_counter() - start
        # J's columns are ravel_pytree(params) entries: the tangent and the gradient in that order.
        flat_tangent = ravel_pytree(tangent)[0]
        jvp_ref = dense.J @ np.asarray(flat_tangent)
        grad_ref = ravel_pytree(params)[1](dense.J.T @ np.asarray(g).reshape(-1))["diameters"]
        out["implicit_jvp_error"] = rel_error(dx.reshape(-1), jvp_ref)
        out["implicit_grad_error"] = rel_error(dparams["diameters"], grad_ref)

    if with_unrolled:
        steps = out["relax_steps"]

        @jax.jit
        def unrolled_grad(p):
            x = lambda q: mdsens.equilibrium(system, q, adjoint=mdsens.Unrolled(steps))  # noqa: E731
            return jax.grad(lambda q: jnp.vdot(g, x(q)))(p)

        try:
            unrolled, out["unrolled_grad_s"] = timed(unrolled_grad, params)
        except jax.errors.JaxRuntimeError as error:  # reverse mode stores every step's pair arrays
            out["unrolled_grad"] = str(error).splitlines()[0]
            unrolled = None
        if dense is not None and unrolled is not None:
            # Unrolled FIRE conserves the centre of mass, so it has no translation
            # component to remove; compare as is.
            out["unrolled_grad_error"] = rel_error(unrolled["diameters"], grad_ref)

    # Finite differences of states re-relaxed from x*.
    step = 1e-6
    testing.finite_difference_sensitivity(system, x_star, params, tangent, step=step)  # compile once
    start = time.perf_counter()
    fd_jvp = testing.finite_difference_sensitivity(system, x_star, params, tangent, step=step)
    out["fd_jvp_s"] = time.perf_counter() - start
    if dense is not None:
        # The minimum-norm convention: no component along the zero modes.
        out["fd_jvp_error"] = rel_error(testing.project(fd_jvp, dense.null_space).reshape(-1), jvp_ref)
    start = time.perf_counter()
    for k in range(fd_params):
        shifted = [dict(params, diameters=params["diameters"].at[k].add(sign * step)) for sign in (1.0, -1.0)]
        plus, minus = (mdsens.relax(system, x_star, p).positions for p in shifted)
        jax.block_until_ready(jnp.vdot(g, plus - minus))
    per_parameter = (time.perf_counter() - start) / fd_params
    out["fd_grad_s_estimated"] = per_parameter * n
    out["fd_grad_timed_parameters"] = fd_params
    out["grad_speedup_vs_fd"] = out["fd_grad_s_estimated"] / out["implicit_grad_s"]

    try:
        import jaxopt
    except ImportError:
        out["jaxopt"] = "not installed"
    else:
        optimality = jax.grad(system.energy)

        @jaxopt.implicit_diff.custom_root(optimality, solve=jaxopt.linear_solve.solve_cg)
        def jaxopt_solver(init, p):
            return jax.lax.stop_gradient(x_star)

        jaxopt_grad = jax.jit(lambda p: jax.grad(lambda q: jnp.vdot(g, jaxopt_solver(x_star, q)))(p))
        jaxopt_jvp = jax.jit(
            lambda p, t: jaxopt.implicit_diff.root_jvp(
                optimality, x_star, (p,), (t,), solve=jaxopt.linear_solve.solve_cg
            )
        )
        grad_jaxopt, out["jaxopt_grad_s"] = timed(jaxopt_grad, params, repeat=3)
        jvp_jaxopt, out["jaxopt_jvp_s"] = timed(jaxopt_jvp, params, tangent, repeat=3)
        if dense is not None:
            out["jaxopt_grad_error"] = rel_error(grad_jaxopt["diameters"], grad_ref)
            out["jaxopt_jvp_error"] = rel_error(testing.project(jvp_jaxopt, dense.null_space).reshape(-1), jvp_ref)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--fd-params", type=int, default=4, help="parameters timed for the FD gradient")
    parser.add_argument("--dense-max", type=int, default=2048, help="largest N with a dense reference")
    parser.add_argument("--unrolled-max", type=int, default=2048, help="largest N to unroll")
    args = parser.parse_args()
    results = [bench_size(n, args.fd_params, n <= args.dense_max, n <= args.unrolled_max) for n in args.sizes]
    print(
        json.dumps(
            {
                "benchmark": "sensitivity",
                "load_average_at_end": os.getloadavg(),
                "date": datetime.date.today().isoformat(),
                "machine": f"{platform.machine()}, {jax.device_count()} x {jax.devices()[0].platform}, "
                f"{os.cpu_count()} cores",
                "jax": jax.__version__,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
