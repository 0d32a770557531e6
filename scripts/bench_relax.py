#!/usr/bin/env python3
"""Benchmark: can the minimiser reach fmax 1e-12 in float64?

Compares ``jax_md.minimize.fire_descent`` (which stores dt and alpha in the
smallest dtype that holds their initial values and adds 1e-6 to the force norm
in its velocity mixing) with mdsens' FIRE 2.0 on the
paper's packing (2D, N=128, 50:50 diameters 1.0/1.4, phi 0.9), the 3D
Kob-Andersen mixture (N=160) and a free LJ cluster (N=13). Prints JSON: final
fmax, steps and seconds (compiled) for each.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import jax

jax.config.update("jax_enable_x64", True)
from jax_md import minimize, space  # noqa: E402

import mdsens  # noqa: E402
from mdsens import systems  # noqa: E402


def jax_md_fire(system: systems.System, fmax: float, max_steps: int) -> dict:
    """jax-md's FIRE, run in a while-loop with the same fmax criterion as mdsens."""
    energy = lambda x: system.energy(x, system.params)  # noqa: E731
    # Moves by addition, as mdsens does (its energies take the minimum image).
    _, shift = space.free()
    init, apply = minimize.fire_descent(energy, shift, dt_start=0.1 * system.dt_max, dt_max=system.dt_max)

    @jax.jit
    def run(x0):
        def keep_going(carry):
            state, step = carry
            return (mdsens.max_force(state.force) > fmax) & (step < max_steps)

        state, steps = jax.lax.while_loop(keep_going, lambda c: (apply(c[0]), c[1] + 1), (init(x0), 0))
        return mdsens.max_force(-jax.grad(energy)(state.position)), steps, state.dt

    run(system.positions)
    start = time.perf_counter()
    final_fmax, steps, dt = jax.block_until_ready(run(system.positions))
    return {
        "fmax": float(final_fmax),
        "steps": int(steps),
        "seconds": time.perf_counter() - start,
        "dt_dtype": str(dt.dtype),
        "reached": bool(final_fmax <= fmax),
    }


def mdsens_relax(system: systems.System, minimiser: mdsens.FIRE) -> dict:
    run = lambda: mdsens.relax(system, minimiser=minimiser)  # noqa: E731
    jax.block_until_ready(run())
    start = time.perf_counter()
    result = jax.block_until_ready(run())
    return {
        "fmax": float(result.fmax),
        "steps": int(result.n_steps),
        "seconds": time.perf_counter() - start,
        "reached": bool(result.converged),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fmax", type=float, default=1e-12)
    parser.add_argument("--max-steps", type=int, default=100_000)
    args = parser.parse_args()
    cases = {
        "soft_spheres_2d_n128_phi0.9": systems.soft_sphere_packing(128, dim=2, phi=0.9),
        "kob_andersen_3d_n160": systems.kob_andersen(160),
        "lj_cluster_n13": systems.lennard_jones_cluster(13),
    }
    results = {}
    for name, system in cases.items():
        results[name] = {
            "jax_md_fire_descent": jax_md_fire(system, args.fmax, args.max_steps),
            "mdsens_fire": mdsens_relax(system, mdsens.FIRE(fmax=args.fmax, max_steps=args.max_steps)),
        }
    print(
        json.dumps(
            {
                "benchmark": "relax",
                "date": datetime.date.today().isoformat(),
                "machine": f"{platform.machine()}, {jax.devices()[0].platform}",
                "fmax": args.fmax,
                "max_steps": args.max_steps,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
