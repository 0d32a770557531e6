#!/usr/bin/env python3
"""Benchmark: relaxation and one full sensitivity at scale, with neighbor lists.

2D (or 3D) periodic 50:50 bidisperse soft-sphere packings (diameters 1.0 and
1.4, harmonic, per-particle diameters as parameters) at packing fraction
``--phi`` (default 0.9 in 2D, 0.7 in 3D), built by ``mdsens.systems`` (which
switches to a neighbor list above 2000 particles; ``--neighbor-list`` forces
it). For one size (``--n N --dim D``) it measures, in this order:

- ``build_s``: building the system (its neighbor list allocated at the start);
- ``relax_s``, ``relax_steps``: FIRE to fmax 1e-12 from the random start
  (``mdsens.relaxation.relax_on_host``, the loop of ``mdsens.relax``),
  compilation included; ``list_reallocations`` of the list on the way and its
  ``list_*`` diagnostics at the end (``energy.diagnostics``);
- ``sensitivity_s``: ``mdsens.equilibrium_jvp`` from the relaxed state, i.e.
  dx*/d(small diameter) for every particle: list allocation, zero-mode
  detection and one CG solve, compilation included; ``cg_iterations``,
  ``residual`` (true relative residual); ``sensitivity_warm_s``: the same call
  again (compiled), and per CG iteration (an upper bound of its cost);
- ``force_ms``, ``hvp_ms``: one force evaluation (gradient of the energy) and
  one Hessian-vector product with the list frozen at x* (jitted, compilation
  excluded, fastest of 15 rounds that take turns), and their ratio; also a
  force with the relaxation's list (``force_relax_list_ms``: skin and spare
  capacity) and one rebuild of that list (``rebuild_ms``);
- ``jacobi_*``: the same solve with Jacobi preconditioning, its diagonal
  from the O(N) exact Hessian diagonal (``System.hessian_diagonal``);
  ``block_jacobi_*``: with block-Jacobi preconditioning, its per-particle
  ``dim x dim`` blocks from ``mdsens.preconditioners.hessian_blocks`` (O(N));
- ``peak_rss_mb`` (the process's peak resident memory), ``total_s`` and the
  load average before and after (``os.getloadavg``): other jobs share the
  cores, so times are noisy.

Without ``--n`` it runs 2D N = 1e3, 1e4, 1e5 (``--sizes``; ``--dim3`` adds 3D
sizes), each in its own subprocess, and prints the list. ``--phis`` instead
measures CG iterations without preconditioning, with Jacobi and with block
Jacobi across packing fractions (the
approach to jamming, phi_J ~ 0.84 in 2D) at one size. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mdsens  # noqa: E402
from mdsens import systems  # noqa: E402
from mdsens.linear_solve import BlockJacobi  # noqa: E402
from mdsens.neighbors import lists  # noqa: E402
from mdsens.preconditioners import hessian_blocks  # noqa: E402
from mdsens.relaxation import check_minimiser, relax_on_host  # noqa: E402


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def best_ms(calls: dict, rounds: int = 15, budget_s: float = 30.0) -> dict:
    """Fastest run of each ``name: (fn, args)`` in ms, after a warm-up
    (compilation) run, over ``rounds`` rounds that call each once in turn:
    other jobs on the machine then slow all of them alike."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    best, start = dict.fromkeys(calls, np.inf), time.perf_counter()
    for _ in range(rounds):
        for name, (fn, args) in calls.items():
            begin = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[name] = min(best[name], time.perf_counter() - begin)
        if time.perf_counter() - start > budget_s:
            break
    return {name: round(1e3 * t, 3) for name, t in best.items()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def default_phi(dim: int) -> float:
    return 0.9 if dim == 2 else 0.7


def build(n: int, dim: int, phi: float, seed: int, neighbor_list: bool | None):
    return systems.soft_sphere_packing(
        n, dim=dim, phi=phi, per_particle_diameters=True, seed=seed, neighbor_list=neighbor_list
    )


def small_tangent(system):
    small = (np.asarray(system.species) == 0).astype(np.float64)
    return dict(jax.tree_util.tree_map(jnp.zeros_like, system.params), diameters=jnp.asarray(small))


def measure(n: int, dim: int, phi: float, seed: int, neighbor_list: bool | None, jacobi: bool, max_steps: int) -> dict:
    out: dict = {"n": n, "dim": dim, "phi": phi, "seed": seed, "load_before": load()}
    start_all = time.perf_counter()
    start = time.perf_counter()
    s = build(n, dim, phi, seed, neighbor_list)
    out["build_s"] = round(time.perf_counter() - start, 3)
    out["neighbor_list"] = s.neighbor_list
    if s.neighbor_list:
        out["capacity_start"] = s.energy.template.capacity
    minimiser = check_minimiser(mdsens.FIRE(max_steps=max_steps), s)

    start = time.perf_counter()
    result, aux, reallocations = relax_on_host(s.energy, minimiser, s.positions, s.params)
    jax.block_until_ready(result)
    out["relax_s"] = round(time.perf_counter() - start, 3)
    out["relax_steps"] = int(result.n_steps)
    out["relax_fmax"] = float(result.fmax)
    out["relax_reason"] = result.reason
    if s.neighbor_list:
        out["list_reallocations"] = reallocations
        out.update({f"list_{k}": v for k, v in s.energy.diagnostics(aux).items()})
    x_star = result.positions
    out["rss_after_relax_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(out), file=sys.stderr, flush=True)

    tangent = small_tangent(s)
    start = time.perf_counter()
    _, dx, info = mdsens.equilibrium_jvp(s, s.params, tangent, positions=x_star, minimiser=minimiser)
    jax.block_until_ready(dx)
    out["sensitivity_s"] = round(time.perf_counter() - start, 3)
    out["cg_iterations"] = int(info.solve.iterations)
    out["residual"] = float(info.solve.residual)
    out["solve_converged"] = bool(info.solve.converged)
    out["sensitivity_max_abs"] = float(jnp.max(jnp.abs(dx)))
    # The same again, compiled: (re)allocation, zero modes and the solve.
    start = time.perf_counter()
    again = mdsens.equilibrium_jvp(s, s.params, tangent, positions=x_star, minimiser=minimiser)
    jax.block_until_ready(again)
    out["sensitivity_warm_s"] = round(time.perf_counter() - start, 3)
    out["warm_ms_per_cg_iteration"] = round(1e3 * out["sensitivity_warm_s"] / max(out["cg_iterations"], 1), 3)

    # Per-evaluation costs with the list frozen at x* (for the neighbor list: the
    # tight list of pairs in range that the solves use; the relaxation's list, with
    # skin and spare capacity, is timed as force_relax_list_ms, and one rebuild of
    # it, from its cell list, as rebuild_ms).
    v = jax.random.normal(jax.random.PRNGKey(2), x_star.shape, x_star.dtype)
    calls = {}
    start = time.perf_counter()
    frozen = s.energy.freeze(x_star, s.params)
    energy = s.energy.bind(frozen)
    if s.neighbor_list:
        out["freeze_s"] = round(time.perf_counter() - start, 3)
        out["pairs_frozen"] = int(frozen.n_pairs)
        relax_list = s.energy.allocate(x_star, s.params)
        relax_energy = s.energy.bind(relax_list)
        calls["force_relax_list_ms"] = (jax.jit(lambda y, p: -jax.grad(relax_energy)(y, p)), (x_star, s.params))
        # Timed on its own: it sweeps through far more memory than the others.
        template = lists.static_template(relax_list)
        rebuild = jax.jit(lambda y, p: lists.build(template, y, s.energy.interaction_range(p), p["box"]).i)
        out.update(best_ms({"rebuild_ms": (rebuild, (x_star, s.params))}, rounds=5))
    calls["force_ms"] = (jax.jit(lambda y, p: -jax.grad(energy)(y, p)), (x_star, s.params))
    hvp = jax.jit(lambda y, p, v: jax.jvp(lambda z: jax.grad(energy)(z, p), (y,), (v,))[1])
    calls["hvp_ms"] = (hvp, (x_star, s.params, v))
    out.update(best_ms(calls))
    out["hvp_over_force"] = round(out["hvp_ms"] / out["force_ms"], 3)
    print(json.dumps(out), file=sys.stderr, flush=True)

    if jacobi:
        start = time.perf_counter()
        diagonal = jax.block_until_ready(s.hessian_diagonal(x_star))
        out["hessian_diagonal_s"] = round(time.perf_counter() - start, 3)
        start = time.perf_counter()
        _, dx_j, info_j = mdsens.equilibrium_jvp(
            s, s.params, tangent, positions=x_star, minimiser=minimiser, adjoint=jacobi_cg(diagonal)
        )
        jax.block_until_ready(dx_j)
        out["jacobi_sensitivity_s"] = round(time.perf_counter() - start, 3)
        out["jacobi_cg_iterations"] = int(info_j.solve.iterations)
        out["jacobi_residual"] = float(info_j.solve.residual)
        out["jacobi_vs_plain_max_rel_diff"] = float(jnp.max(jnp.abs(dx_j - dx)) / jnp.max(jnp.abs(dx)))
        start = time.perf_counter()
        blocks = jax.block_until_ready(hessian_blocks(s, x_star))
        out["hessian_blocks_s"] = round(time.perf_counter() - start, 3)
        start = time.perf_counter()
        _, dx_b, info_b = mdsens.equilibrium_jvp(
            s, s.params, tangent, positions=x_star, minimiser=minimiser, adjoint=block_jacobi_cg(blocks)
        )
        jax.block_until_ready(dx_b)
        out["block_jacobi_sensitivity_s"] = round(time.perf_counter() - start, 3)
        out["block_jacobi_cg_iterations"] = int(info_b.solve.iterations)
        out["block_jacobi_residual"] = float(info_b.solve.residual)
        out["block_jacobi_vs_plain_max_rel_diff"] = float(jnp.max(jnp.abs(dx_b - dx)) / jnp.max(jnp.abs(dx)))

    out["total_s"] = round(time.perf_counter() - start_all, 3)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out["load_after"] = load()
    out["cpus"] = os.cpu_count()
    out["jax"] = jax.__version__
    out["platform"] = platform.platform()
    return out


def jacobi_cg(diagonal: jax.Array) -> mdsens.Implicit:
    """Implicit differentiation with CG preconditioned by the Hessian's diagonal."""
    return mdsens.Implicit(solver=mdsens.CG(preconditioner=mdsens.Jacobi(diagonal)))


def block_jacobi_cg(blocks: jax.Array) -> mdsens.Implicit:
    """Implicit differentiation with CG preconditioned by the Hessian's per-particle blocks."""
    return mdsens.Implicit(solver=mdsens.CG(preconditioner=BlockJacobi(blocks)))


def jamming_sweep(
    n: int, dim: int, phis: list[float], seed: int, neighbor_list: bool | None, max_steps: int
) -> list[dict]:
    """CG iterations without preconditioning, with Jacobi and with block Jacobi as phi
    approaches jamming."""
    rows = []
    minimiser = mdsens.FIRE(max_steps=max_steps)
    for phi in phis:
        s = build(n, dim, phi, seed, neighbor_list)
        r = mdsens.relax(s, minimiser=minimiser)
        tangent = small_tangent(s)
        row = {"n": n, "dim": dim, "phi": phi, "relax_steps": int(r.n_steps), "relax_reason": r.reason, "load": load()}
        _, dx, info = mdsens.equilibrium_jvp(s, s.params, tangent, positions=r.positions, minimiser=minimiser)
        diagonal = s.hessian_diagonal(r.positions)
        d = np.asarray(diagonal)
        row["diagonal_spread"] = float(np.max(d) / np.min(d[d > 0]))
        _, dx_j, info_j = mdsens.equilibrium_jvp(
            s, s.params, tangent, positions=r.positions, minimiser=minimiser, adjoint=jacobi_cg(diagonal)
        )
        _, dx_b, info_b = mdsens.equilibrium_jvp(
            s,
            s.params,
            tangent,
            positions=r.positions,
            minimiser=minimiser,
            adjoint=block_jacobi_cg(hessian_blocks(s, r.positions)),
        )
        row.update(
            block_jacobi_cg_iterations=int(info_b.solve.iterations),
            block_jacobi_residual=float(info_b.solve.residual),
            block_max_rel_diff=float(jnp.max(jnp.abs(dx_b - dx)) / jnp.max(jnp.abs(dx))),
            cg_iterations=int(info.solve.iterations),
            jacobi_cg_iterations=int(info_j.solve.iterations),
            reduction=round(1.0 - int(info_j.solve.iterations) / max(int(info.solve.iterations), 1), 3),
            residual=float(info.solve.residual),
            jacobi_residual=float(info_j.solve.residual),
            max_rel_diff=float(jnp.max(jnp.abs(dx_j - dx)) / jnp.max(jnp.abs(dx))),
        )
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, help="one size: measure it in this process and print one JSON object")
    parser.add_argument("--dim", type=int, default=2)
    parser.add_argument("--phi", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--neighbor-list",
        choices=("auto", "on", "off"),
        default="on",
        help="neighbor list at every size (on, default), the builders' rule (auto) or all pairs (off)",
    )
    parser.add_argument("--no-jacobi", action="store_true", help="skip the preconditioned solve")
    parser.add_argument("--max-steps", type=int, default=200_000)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1_000, 10_000, 100_000])
    parser.add_argument("--dim3", type=int, nargs="*", default=[], help="3D sizes to add to the sweep")
    parser.add_argument("--phis", type=float, nargs="*", help="jamming sweep at --n (default 1000) instead")
    args = parser.parse_args()
    neighbor_list = {"auto": None, "on": True, "off": False}[args.neighbor_list]

    if args.phis:
        rows = jamming_sweep(args.n or 1000, args.dim, args.phis, args.seed, neighbor_list, args.max_steps)
        print(json.dumps(rows, indent=1))
        return
    if args.n is not None:
        phi = default_phi(args.dim) if args.phi is None else args.phi
        print(json.dumps(measure(args.n, args.dim, phi, args.seed, neighbor_list, not args.no_jacobi, args.max_steps)))
        return
    runs = [(n, 2) for n in args.sizes] + [(n, 3) for n in args.dim3]
    results = []
    for n, dim in runs:
        command = [
            sys.executable,
            __file__,
            "--n",
            str(n),
            "--dim",
            str(dim),
            "--seed",
            str(args.seed),
            "--neighbor-list",
            args.neighbor_list,
            "--max-steps",
            str(args.max_steps),
        ]
        if args.no_jacobi:
            command.append("--no-jacobi")
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            results.append({"n": n, "dim": dim, "error": done.stderr[-2000:]})
        else:
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
