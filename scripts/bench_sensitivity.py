#!/usr/bin/env python3
"""Benchmark: the cost and accuracy of equilibrium sensitivities, by method.

On 2D periodic 50:50 bidisperse soft-sphere packings (1.0:1.4, phi 0.9) with
per-particle diameters as parameters, for each N:

- relaxation (FIRE to fmax 1e-12);
- implicit JVP: dx*/d(small diameter), one CG solve;
- implicit gradient of f(x*) = g . x* with respect to all N diameters, one CG solve
  (g random with nonzero mean, so translations matter);
- dense reference: full Hessian from N*dim Hessian-vector products and its pseudo-inverse;
- unrolled: reverse-mode autodiff through as many FIRE steps as the relaxation took;
- finite differences: central, re-relaxing, step 1e-6; the JVP costs 2 relaxations,
  the gradient 2 per parameter, timed on a few parameters and scaled to N;
- jaxopt (the paper's reference implementation, if installed: `pip install -e .[bench]`):
  `custom_root` reverse mode and `root_jvp` forward mode with its CG solve.

Times exclude compilation (every function runs once before it is timed).
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

import mdsens  # noqa: E402
from mdsens import linear_solve, systems, zero_modes  # noqa: E402


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
    energy_fn, params, shift_fn = system.energy_fn, system.params, system.shift_fn
    gradient = jax.grad(energy_fn)
    small = (np.asarray(system.species) == 0).astype(np.float64)
    tangent = dict(jax.tree_util.tree_map(jnp.zeros_like, params), diameters=jnp.asarray(small))
    g = jax.random.normal(jax.random.PRNGKey(1), (n, 2)) + 0.5
    out: dict = {"n": n}

    relax = jax.jit(lambda x0, p: mdsens.relax(energy_fn, x0, p, shift_fn=shift_fn, dt_max=system.dt_max))
    result, out["relax_s"] = timed(relax, system.positions, params)
    out["relax_steps"] = int(result.n_steps)
    out["relax_fmax"] = float(result.fmax)
    x_star = result.positions

    def hvp(x, p):
        return lambda v: jax.jvp(lambda y: gradient(y, p), (x,), (v,))[1]

    @jax.jit
    def implicit_jvp(x, p, t):
        modes = zero_modes.detect(hvp(x, p), x)
        return mdsens.root_jvp(gradient, x, p, t, zero_modes=modes)

    @jax.jit
    def implicit_grad(x, p, cotangent):
        modes = zero_modes.detect(hvp(x, p), x)
        return mdsens.root_vjp(gradient, x, p, cotangent, zero_modes=modes)

    (dx, jvp_info), out["implicit_jvp_s"] = timed(implicit_jvp, x_star, params, tangent, repeat=3)
    (dparams, grad_info), out["implicit_grad_s"] = timed(implicit_grad, x_star, params, g, repeat=3)
    out["cg_iterations_jvp"] = int(jvp_info.iterations)
    out["cg_iterations_grad"] = int(grad_info.iterations)
    out["cg_residual_grad"] = float(grad_info.residual)
    out["implicit_jvp_over_relax"] = out["implicit_jvp_s"] / out["relax_s"]
    out["implicit_grad_over_relax"] = out["implicit_grad_s"] / out["relax_s"]

    if with_dense:
        # Jacobi preconditioning: iterations only (the exact diagonal costs N*dim products).
        diagonal = mdsens.hessian_diagonal(energy_fn, x_star, params, batch_size=8)
        jacobi_cg = linear_solve.cg(preconditioner=linear_solve.jacobi(diagonal.reshape(-1)))
        modes = zero_modes.detect(hvp(x_star, params), x_star)
        _, jacobi_info = mdsens.root_vjp(gradient, x_star, params, g, solve=jacobi_cg, zero_modes=modes)
        out["cg_iterations_grad_jacobi"] = int(jacobi_info.iterations)

        @jax.jit
        def dense_reference(x, p):
            matvec = hvp(x, p)
            columns = jax.lax.map(lambda e: matvec(e.reshape(x.shape)).reshape(-1), jnp.eye(x.size), batch_size=64)
            hessian_pinv = jnp.linalg.pinv(columns.T, rtol=1e-10, hermitian=True)
            mixed = jax.jacfwd(lambda q: gradient(x, q))(p)["diameters"]
            mixed = mixed.reshape(x.size, -1)
            return -(hessian_pinv @ (mixed @ small)), -(mixed.T @ (hessian_pinv @ g.reshape(-1)))

        (jvp_ref, grad_ref), out["dense_s"] = timed(dense_reference, x_star, params)
        out["implicit_jvp_error"] = rel_error(dx.reshape(-1), jvp_ref)
        out["implicit_grad_error"] = rel_error(dparams["diameters"], grad_ref)
    else:
        jvp_ref = grad_ref = None

    if with_unrolled:
        steps = out["relax_steps"]

        @jax.jit
        def unrolled_grad(x0, p):
            objective = lambda q: jnp.vdot(g, mdsens.unrolled_relax(  # noqa: E731
                energy_fn, x0, q, shift_fn=shift_fn, n_steps=steps, dt_max=system.dt_max))
            return jax.grad(objective)(p)

        try:
            unrolled, out["unrolled_grad_s"] = timed(unrolled_grad, system.positions, params)
        except jax.errors.JaxRuntimeError as error:  # reverse mode stores every step's pair arrays
            out["unrolled_grad"] = str(error).splitlines()[0]
            unrolled = None
        if grad_ref is not None and unrolled is not None:
            # Unrolled FIRE conserves the centre of mass, so it has no translation
            # component to remove; compare as is.
            out["unrolled_grad_error"] = rel_error(unrolled["diameters"], grad_ref)

    # Finite differences of re-relaxed states (displacement space: no wrapping issues).
    def energy_of_displacement(u, q):
        return energy_fn(shift_fn(x_star, u), q)

    def add(u, du):
        return u + du

    def relaxed_displacement(p):
        r = mdsens.relax(energy_of_displacement, jnp.zeros_like(x_star), p, shift_fn=add, dt_max=system.dt_max)
        return r.positions

    relaxed_displacement(params)  # compile once

    step = 1e-6
    shifted = lambda s: dict(params, diameters=params["diameters"] + s * jnp.asarray(small))  # noqa: E731
    start = time.perf_counter()
    fd_jvp = (relaxed_displacement(shifted(step)) - relaxed_displacement(shifted(-step))) / (2 * step)
    fd_jvp = jax.block_until_ready(fd_jvp)
    out["fd_jvp_s"] = time.perf_counter() - start
    fd_jvp = fd_jvp - fd_jvp.mean(axis=0)  # the minimum-norm convention: no net translation
    if jvp_ref is not None:
        out["fd_jvp_error"] = rel_error(fd_jvp.reshape(-1), jvp_ref)
    start = time.perf_counter()
    for k in range(fd_params):
        e = jnp.zeros(n).at[k].set(step)
        plus = relaxed_displacement(dict(params, diameters=params["diameters"] + e))
        minus = relaxed_displacement(dict(params, diameters=params["diameters"] - e))
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
        optimality = lambda x, p: gradient(x, p)  # noqa: E731

        @jaxopt.implicit_diff.custom_root(optimality, solve=jaxopt.linear_solve.solve_cg)
        def jaxopt_solver(init, p):
            return jax.lax.stop_gradient(x_star)

        jaxopt_grad = jax.jit(lambda p: jax.grad(lambda q: jnp.vdot(g, jaxopt_solver(x_star, q)))(p))
        jaxopt_jvp = jax.jit(lambda p, t: jaxopt.implicit_diff.root_jvp(
            optimality, x_star, (p,), (t,), solve=jaxopt.linear_solve.solve_cg))
        grad_jaxopt, out["jaxopt_grad_s"] = timed(jaxopt_grad, params, repeat=3)
        jvp_jaxopt, out["jaxopt_jvp_s"] = timed(jaxopt_jvp, params, tangent, repeat=3)
        if grad_ref is not None:
            out["jaxopt_grad_error"] = rel_error(grad_jaxopt["diameters"], grad_ref)
            jvp_jaxopt = np.asarray(jvp_jaxopt)
            out["jaxopt_jvp_error"] = rel_error((jvp_jaxopt - jvp_jaxopt.mean(axis=0)).reshape(-1), jvp_ref)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--fd-params", type=int, default=4, help="parameters timed for the FD gradient")
    parser.add_argument("--dense-max", type=int, default=2048, help="largest N with a dense reference")
    parser.add_argument("--unrolled-max", type=int, default=2048, help="largest N to unroll")
    args = parser.parse_args()
    results = [
        bench_size(n, args.fd_params, n <= args.dense_max, n <= args.unrolled_max) for n in args.sizes
    ]
    print(json.dumps({
        "benchmark": "sensitivity",
        "load_average_at_end": os.getloadavg(),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {jax.device_count()} x {jax.devices()[0].platform}, "
                   f"{os.cpu_count()} cores",
        "jax": jax.__version__,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
