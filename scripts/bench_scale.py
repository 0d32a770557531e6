#!/usr/bin/env python3
"""Benchmark: relaxation and one full sensitivity at scale, with neighbor lists.

2D (or 3D) periodic 50:50 bidisperse soft-sphere packings (diameters 1.0 and
1.4, harmonic, per-particle diameters as parameters) at packing fraction
``--phi`` (default 0.9 in 2D, 0.7 in 3D), built by ``mdsens.systems`` (which
switches to a neighbor list above 2000 particles; ``--neighbor-list`` forces
it). Every time is CPU time (``time.process_time``, all threads: other jobs
share the cores) next to wall time. For one size (``--n N --dim D``) it
measures, in this order:

- ``build``: building the system (its neighbor list allocated at the start);
- ``relax``, ``relax_steps``: FIRE to fmax 1e-12 from the random start
  (``mdsens.relaxation.relax_on_host``, the loop of ``mdsens.relax``),
  compilation included; ``list_reallocations`` of the list on the way and its
  ``list_*`` diagnostics at the end (``energy.diagnostics``);
- ``solves``: for each preconditioner (``--preconditioners``: none, Jacobi from
  ``System.hessian_diagonal``, block Jacobi from ``System.hessian_blocks``, both
  O(N), and two-level from ``System.two_level_preconditioner``: block Jacobi
  plus a coarse grid of aggregate translations, probed with 3^dim dim
  Hessian-vector products), ``mdsens.equilibrium_jvp`` from the relaxed state, i.e. dx*/d(small
  diameter) for every particle: the preconditioner's ``setup``, the call
  (list allocation, zero-mode detection and one CG solve, compilation
  included) and the same call again (``warm``, compiled), the CG iterations,
  the true relative residual, per CG iteration (an upper bound of its cost,
  from the warm call) and the largest deviation from the unpreconditioned
  answer;
- ``relax_warm`` (with ``--relax-twice``): the same relaxation again, compiled;
- ``sensitivity_share``: the fastest warm sensitivity over the relaxation in CPU
  time (over ``relax_warm`` if measured, else over ``relax``, compilation
  included), and the cold ones over ``relax``;
- ``eval_ms``: one force evaluation (gradient of the energy) and one
  Hessian-vector product with the list frozen at x* (jitted, compilation
  excluded, fastest of 15 rounds that take turns), each in CPU and wall ms.
  ``hvp`` is forward-over-reverse from scratch (pair geometry and radial
  derivatives included); ``hvp_linearized`` is what each CG iteration pays:
  the product with the pair geometry and radial derivatives computed once
  (``jax.linearize``; inside the solver's compiled loop XLA hoists them
  likewise); ``hvp_over_force`` is their CPU ratio to the force. Also a force
  with the relaxation's list (``force_relax_list``: skin and spare capacity)
  and one rebuild of that list (``rebuild``);
- ``peak_rss_mb`` (the process's peak resident memory), ``total`` and the
  load average before and after (``os.getloadavg``).

Without ``--n`` it runs 2D N = 1e3, 1e4, 1e5 (``--sizes``; ``--dim3`` adds 3D
sizes), each in its own subprocess, and prints the list with the date, the
machine and the load (``--output`` also writes it). ``--phis`` instead
measures the CG iterations of every preconditioner across packing fractions
(the approach to jamming, phi_J ~ 0.84 in 2D) at one size. ``--device gpu``
runs on the GPU (wall time is then what counts; without a GPU it says what it
would measure). Prints JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mdsens  # noqa: E402
from mdsens import systems  # noqa: E402
from mdsens.linear_solve import BlockJacobi  # noqa: E402
from mdsens.neighbors import lists  # noqa: E402
from mdsens.relaxation import check_minimiser, relax_on_host  # noqa: E402

#: name -> preconditioner of CG for ``(system, x*)`` (built once per state).
PRECONDITIONERS: dict[str, Callable[[mdsens.System, jax.Array], Any]] = {
    "none": lambda system, x: None,
    "jacobi": lambda system, x: mdsens.Jacobi(system.hessian_diagonal(x)),
    "block_jacobi": lambda system, x: BlockJacobi(system.hessian_blocks(x)),
    "two_level": lambda system, x: system.two_level_preconditioner(x),
}


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def machine() -> dict:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.system()}",
        "platform": platform.platform(),
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        # CPUs this process may run on (`taskset -c 0` pins it to one, as a one-process LAMMPS run).
        "cpus": len(os.sched_getaffinity(0)),
    }


def clocked(fn: Callable[..., Any], *args: Any) -> tuple[Any, dict]:
    """``fn(*args)`` (blocked until ready) and its ``{"cpu_s", "wall_s"}``."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = jax.block_until_ready(fn(*args))
    return result, {"cpu_s": round(time.process_time() - cpu, 6), "wall_s": round(time.perf_counter() - wall, 6)}


def best_ms(calls: dict, rounds: int = 15, budget_s: float = 30.0) -> dict:
    """Fastest run of each ``name: (fn, args)``, ``{"cpu_ms", "wall_ms"}`` (each the
    minimum over the rounds), after a warm-up (compilation) run, over ``rounds``
    rounds that call each once in turn: other jobs on the machine then slow all
    of them alike."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    cpu, wall = dict.fromkeys(calls, np.inf), dict.fromkeys(calls, np.inf)
    start = time.perf_counter()
    for _ in range(rounds):
        for name, (fn, args) in calls.items():
            _, t = clocked(fn, *args)
            cpu[name], wall[name] = min(cpu[name], t["cpu_s"]), min(wall[name], t["wall_s"])
        if time.perf_counter() - start > budget_s:
            break
    return {name: {"cpu_ms": round(1e3 * cpu[name], 3), "wall_ms": round(1e3 * wall[name], 3)} for name in calls}


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


def solves(system, x_star, minimiser, names: list[str], warm: bool) -> tuple[dict, dict]:
    """dx*/d(small diameter) with CG and each preconditioner in ``names``: times,
    iterations, residuals and deviations from the first answer. Returns the
    rows and the answers."""
    tangent = small_tangent(system)
    rows, answers = {}, {}
    for name in names:
        preconditioner, setup = clocked(PRECONDITIONERS[name], system, x_star)
        adjoint = mdsens.Implicit(solver=mdsens.CG(preconditioner=preconditioner))
        call = (system, system.params, tangent)
        options = dict(positions=x_star, minimiser=minimiser, adjoint=adjoint)
        (_, dx, info), cold = clocked(lambda: mdsens.equilibrium_jvp(*call, **options))  # noqa: B023
        iterations = int(info.solve.iterations)
        row = {"setup": setup, "sensitivity": cold, "cg_iterations": iterations}
        if warm:
            _, row["warm"] = clocked(lambda: mdsens.equilibrium_jvp(*call, **options))  # noqa: B023
            row["cpu_ms_per_cg_iteration"] = round(1e3 * row["warm"]["cpu_s"] / max(iterations, 1), 3)
        row.update(residual=float(info.solve.residual), converged=bool(info.solve.converged))
        answers[name] = dx
        first = answers[names[0]]
        row["max_rel_diff"] = float(jnp.max(jnp.abs(dx - first)) / jnp.max(jnp.abs(first)))
        rows[name] = row
    return rows, answers


def evaluation_costs(system, x_star) -> dict:
    """Force, Hessian-vector products (from scratch and linearised) with the list
    frozen at x*, and with the relaxation's list a force and one rebuild."""
    v = jax.random.normal(jax.random.PRNGKey(2), x_star.shape, x_star.dtype)
    params = system.params
    frozen = system.energy.freeze(x_star, params)
    gradient = jax.grad(system.energy.bind(frozen))
    calls = {
        "force": (jax.jit(lambda y, p: -gradient(y, p)), (x_star, params)),
        "hvp": (jax.jit(lambda y, p, w: jax.jvp(lambda z: gradient(z, p), (y,), (w,))[1]), (x_star, params, v)),
        "hvp_linearized": (jax.jit(jax.linearize(lambda z: gradient(z, params), x_star)[1]), (v,)),
    }
    out: dict = {}
    if system.neighbor_list:
        out["pairs_frozen"] = int(frozen.n_pairs)
        relax_list = system.energy.allocate(x_star, params)
        relax_gradient = jax.grad(system.energy.bind(relax_list))
        calls["force_relax_list"] = (jax.jit(lambda y, p: -relax_gradient(y, p)), (x_star, params))
        template = lists.static_template(relax_list)
        rebuild = jax.jit(lambda y, p: lists.build(template, y, system.energy.interaction_range(p), p["box"]).i)
        # Timed on its own: it sweeps through far more memory than the others.
        out.update(best_ms({"rebuild": (rebuild, (x_star, params))}, rounds=5))
    out.update(best_ms(calls))
    force = out["force"]["cpu_ms"]
    out["hvp_over_force"] = {name: round(out[name]["cpu_ms"] / force, 3) for name in ("hvp", "hvp_linearized")}
    return out


def measure(
    n: int,
    dim: int,
    phi: float,
    seed: int,
    neighbor_list: bool | None,
    names: list[str],
    max_steps: int,
    relax_twice: bool,
) -> dict:
    out: dict = {"n": n, "dim": dim, "phi": phi, "seed": seed, "load_before": load()}
    start = time.process_time(), time.perf_counter()
    s, out["build"] = clocked(build, n, dim, phi, seed, neighbor_list)
    out["neighbor_list"] = s.neighbor_list
    if s.neighbor_list:
        out["capacity_start"] = s.energy.template.capacity
    minimiser = check_minimiser(mdsens.FIRE(max_steps=max_steps), s)

    (result, aux, reallocations), out["relax"] = clocked(relax_on_host, s.energy, minimiser, s.positions, s.params)
    if relax_twice:
        _, out["relax_warm"] = clocked(relax_on_host, s.energy, minimiser, s.positions, s.params)
    out.update(relax_steps=int(result.n_steps), relax_fmax=float(result.fmax), relax_reason=result.reason)
    if s.neighbor_list:
        out["list_reallocations"] = reallocations
        out.update({f"list_{k}": v for k, v in s.energy.diagnostics(aux).items()})
    x_star = result.positions
    out["rss_after_relax_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(out), file=sys.stderr, flush=True)

    out["solves"], answers = solves(s, x_star, minimiser, names, warm=True)
    fastest = min(names, key=lambda name: out["solves"][name]["warm"]["cpu_s"])
    relax = out.get("relax_warm", out["relax"])
    out["sensitivity_share"] = {
        "preconditioner": fastest,
        "warm_over_relax_cpu": round(out["solves"][fastest]["warm"]["cpu_s"] / relax["cpu_s"], 4),
        "cold_over_relax_cpu": round(out["solves"][fastest]["sensitivity"]["cpu_s"] / out["relax"]["cpu_s"], 4),
    }
    out["sensitivity_max_abs"] = float(jnp.max(jnp.abs(answers[fastest])))
    print(json.dumps(out), file=sys.stderr, flush=True)
    out["eval_ms"] = evaluation_costs(s, x_star)

    out["total"] = {
        "cpu_s": round(time.process_time() - start[0], 3),
        "wall_s": round(time.perf_counter() - start[1], 3),
    }
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out["load_after"] = load()
    return out


def jamming_sweep(
    n: int, dim: int, phis: list[float], seed: int, neighbor_list: bool | None, names: list[str], max_steps: int
) -> list[dict]:
    """CG iterations of every preconditioner as phi approaches jamming."""
    rows = []
    minimiser = mdsens.FIRE(max_steps=max_steps)
    for phi in phis:
        s = build(n, dim, phi, seed, neighbor_list)
        r = mdsens.relax(s, minimiser=minimiser)
        row = {"n": n, "dim": dim, "phi": phi, "relax_steps": int(r.n_steps), "relax_reason": r.reason, "load": load()}
        d = np.asarray(s.hessian_diagonal(r.positions))
        row["diagonal_spread"] = float(np.max(d) / np.min(d[d > 0]))
        row["solves"], _ = solves(s, r.positions, minimiser, names, warm=False)
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
    parser.add_argument(
        "--preconditioners",
        nargs="+",
        choices=list(PRECONDITIONERS),
        default=list(PRECONDITIONERS),
        help="the solves to measure; deviations are relative to the first",
    )
    parser.add_argument("--max-steps", type=int, default=200_000)
    parser.add_argument("--relax-twice", action="store_true", help="also time the relaxation compiled")
    parser.add_argument("--sizes", type=int, nargs="*", default=[1_000, 10_000, 100_000])
    parser.add_argument("--dim3", type=int, nargs="*", default=[], help="3D sizes to add to the sweep")
    parser.add_argument("--phis", type=float, nargs="*", help="jamming sweep at --n (default 1000) instead")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()
    neighbor_list = {"auto": None, "on": True, "off": False}[args.neighbor_list]
    names = args.preconditioners
    if args.device == "gpu":
        try:
            jax.config.update("jax_default_device", jax.devices("gpu")[0])
        except RuntimeError:
            sizes = (
                [(n, 2) for n in args.sizes] + [(n, 3) for n in args.dim3] if args.n is None else [(args.n, args.dim)]
            )
            print(
                f"bench_scale: no GPU found. With one, it would relax and differentiate (N, dim) = {sizes} "
                f"on the GPU with preconditioners {names} (wall time, block_until_ready; CPU time then "
                "measures the host only)."
            )
            return

    report: Any
    if args.phis:
        rows = jamming_sweep(args.n or 1000, args.dim, args.phis, args.seed, neighbor_list, names, args.max_steps)
        report = {**machine(), "benchmark": "preconditioners", "results": rows}
    elif args.n is not None:
        phi = default_phi(args.dim) if args.phi is None else args.phi
        options = (neighbor_list, names, args.max_steps, args.relax_twice)
        report = {**machine(), **measure(args.n, args.dim, phi, args.seed, *options)}
    else:
        runs = [(n, 2) for n in args.sizes] + [(n, 3) for n in args.dim3]
        results = []
        for n, dim in runs:
            command = [sys.executable, __file__, "--n", str(n), "--dim", str(dim), "--seed", str(args.seed)]
            command += ["--neighbor-list", args.neighbor_list, "--max-steps", str(args.max_steps)]
            command += ["--preconditioners", *names, "--device", args.device]
            command += ["--relax-twice"] if args.relax_twice else []
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                results.append({"n": n, "dim": dim, "error": done.stderr[-2000:]})
            else:
                results.append(json.loads(done.stdout))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        report = {**machine(), "benchmark": "scale", "results": results}
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
