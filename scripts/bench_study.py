#!/usr/bin/env python3
"""Benchmark mdsens.study: batched (vmapped, sharded) relaxations and
sensitivities against a Python loop of single runs, and the cost of the
spread of FIRE step counts in a vmapped while-loop.

Workload: 64 packings (4 packing fractions x 16 seeds) of N = 128 bidisperse
soft discs (the demo's system), each relaxed to fmax 1e-12 with the
sensitivity of every position to the small particles' diameter and dE*/d(all
parameters). Methods:

- ``loop``: one ``mdsens.equilibrium_jvp`` + (jitted) ``energy_sensitivity``
  per packing, reusing one compiled program (the systems share one energy
  structure, so one system's energy serves all: the best a loop can do).
- ``loop_naive``: the same with each packing's own System, as a plain script
  would write it; mdsens compiles per energy, so every packing recompiles.
  Timed on ``--naive-samples`` packings and extrapolated.
- ``study_vmap``: ``mdsens.study`` with ``schedule = "vmap"``: one vmapped
  while-loop per chunk, which runs until its slowest member converges.
- ``study_compact``: ``schedule = "compact"`` (the default): unfinished
  members are carried into batches of half the size.
- ``study_compact_1dev``: the default schedule on one device, as the loop:
  the gain of batching alone, without sharding.

The cost of the spread of step counts is ``1 - step_efficiency`` of
``study_vmap`` (``member_steps / slot_steps``: the fraction of vmapped slot
steps that do useful work); ``compact_vs_vmap`` is what the mitigation gains.

Compilation is excluded from the throughput (each method is warmed up first
on the same shapes) and reported separately. Prints JSON. The machine may be
shared with other processes: the load average is reported with the numbers,
and every method's process CPU time too (``cpu_per_sample``), which depends
less on the load: ``cpu_ratios`` compare work per sample, and a method on
``d`` devices of an idle machine has about ``d`` times its CPU throughput.

    python scripts/bench_study.py [--cpu-devices 2] [--chunk-size 16] [--naive-samples 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=16, help="seeds per packing fraction (4 fractions)")
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument(
        "--cpu-devices", type=int, default=os.cpu_count() or 1, help="CPU devices for the study (default: one per core)"
    )
    parser.add_argument("--naive-samples", type=int, default=2)
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["loop", "loop_naive", "study_vmap", "study_compact", "study_compact_1dev"],
    )
    args = parser.parse_args()

    import jax

    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np

    import mdsens
    from mdsens import study, systems

    phis = [0.86, 0.88, 0.90, 0.92]
    config_text = f"""
[study]
seeds = {args.seeds}
chunk_size = {args.chunk_size}
schedule = "SCHEDULE"
[system]
builder = "soft_sphere_packing"
n = {args.n}
dim = 2
diameters = [1.0, 1.4]
[grid]
phi = {phis}
[sensitivities.small_diameter]
diameters = [1.0, 0.0]
"""
    config = study.parse_config(config_text.replace("SCHEDULE", "compact"))
    samples = [(a, seed) for a in config.point_args() for seed in config.seeds]
    results: dict = {
        "workload": {
            "n": args.n,
            "dim": 2,
            "samples": len(samples),
            "phi": phis,
            "seeds": args.seeds,
            "fmax": 1e-12,
            "sensitivities": 1,
        },
        "devices": {"study": len(jax.devices()), "loop": 1, "cpu_count": os.cpu_count()},
        "chunk_size": args.chunk_size,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }

    built = [systems.soft_sphere_packing(**a, seed=seed) for a, seed in samples]
    first = built[0]

    energy_sensitivity = jax.jit(mdsens.energy_sensitivity, static_argnums=0)

    def single(system, energy_of, jit_envelope=True):
        """One packing, with the energy of the system ``energy_of`` (``first``: one compiled program for all)."""
        tangent = {**jax.tree.map(jnp.zeros_like, system.params), "diameters": jnp.array([1.0, 0.0])}
        x, dx, info = mdsens.equilibrium_jvp(energy_of, system.params, tangent, positions=system.positions)
        envelope = energy_sensitivity if jit_envelope else mdsens.energy_sensitivity
        grads = envelope(energy_of, x, system.params)
        jax.block_until_ready((dx, grads))
        return int(info.relax.n_steps), bool(info.relax.converged), np.asarray(x)

    if "loop" not in args.skip:
        start = time.perf_counter()
        single(built[0], first)
        compile_seconds = time.perf_counter() - start
        start, cpu = time.perf_counter(), time.process_time()
        steps = [single(s, first) for s in built]
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        loop_positions = np.stack([x for _, _, x in steps])
        results["loop"] = {
            "seconds": round(seconds, 2),
            "per_sample": round(seconds / len(built), 3),
            "cpu_per_sample": round(cpu / len(built), 3),
            "first_call_with_compile": round(compile_seconds, 2),
            "converged": sum(c for _, c, _ in steps),
            "fire_steps": [n for n, _, _ in steps],
        }

    if "loop_naive" not in args.skip:
        subset = built[1 : 1 + args.naive_samples]
        start = time.perf_counter()
        for s in subset:
            single(s, s, jit_envelope=False)
        seconds = time.perf_counter() - start
        results["loop_naive"] = {
            "samples_timed": len(subset),
            "per_sample": round(seconds / len(subset), 3),
            "extrapolated_seconds": round(seconds / len(subset) * len(built), 1),
        }

    variants = {
        "study_vmap": ("vmap", None),
        "study_compact": ("compact", None),
        "study_compact_1dev": ("compact", jax.devices()[:1]),
    }
    for name, (schedule, devices) in variants.items():
        if name in args.skip:
            continue
        text = config_text.replace("SCHEDULE", schedule)
        # Warm-up on the first chunk's samples (same shapes: compiles every program).
        warm_text = text.replace(f"seeds = {args.seeds}", f"seeds = {list(range(min(args.seeds, args.chunk_size)))}")
        warm_text = warm_text.replace(f"phi = {phis}", f"phi = {phis[:1]}")
        start = time.perf_counter()
        study.run(warm_text, devices=devices)
        compile_seconds = time.perf_counter() - start
        start, cpu = time.perf_counter(), time.process_time()
        ds = study.run(text, devices=devices)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        a = ds.attrs
        results[name] = {
            "devices": int(a["run_devices"]),
            "seconds": round(seconds, 2),
            "per_sample": round(seconds / len(samples), 3),
            "cpu_per_sample": round(cpu / len(samples), 3),
            "warmup_first_chunk_with_compile": round(compile_seconds, 2),
            "relax_seconds": round(a["run_relax_seconds"], 2),
            "post_seconds": round(a["run_post_seconds"], 2),
            "host_seconds": round(a["run_host_seconds"], 2),
            "member_steps": int(a["run_member_steps"]),
            "slot_steps": int(a["run_slot_steps"]),
            "step_efficiency": round(a["run_member_steps"] / a["run_slot_steps"], 3),
            "stages": int(a["run_stages"]),
            "relax_converged": int(ds.relax_converged.sum()),
            "solves_converged": int(ds.solve_converged.sum()),
            "solve_iterations_max": int(ds.solve_iterations.max()),
            "solve_iterations_mean": round(float(ds.solve_iterations.mean()), 1),
        }
        if "loop" in results:  # equal up to rounding (batches of another size round differently)
            loop_steps = np.asarray(results["loop"]["fire_steps"])
            results[name]["vs_loop"] = {
                "max_position_difference": float(
                    np.abs(ds.positions.values.reshape(len(samples), -1, 2) - loop_positions).max()
                ),
                "max_relative_step_difference": round(
                    float(np.max(np.abs(ds.relax_n_steps.values.ravel() - loop_steps) / loop_steps)), 4
                ),
            }

    steps = None
    if "loop" in results:
        steps = np.asarray(results["loop"]["fire_steps"])
        results["loop"]["fire_steps"] = {
            "min": int(steps.min()),
            "mean": round(float(steps.mean()), 1),
            "max": int(steps.max()),
            "sum": int(steps.sum()),
        }
    ratios = {}
    for name in variants:
        if name in results:
            for base in ("loop", "loop_naive"):
                if base in results:
                    ratios[f"{name}_vs_{base}"] = round(results[base]["per_sample"] / results[name]["per_sample"], 2)
    if "study_vmap" in results and "study_compact" in results:
        ratios["compact_vs_vmap"] = round(
            results["study_vmap"]["relax_seconds"] / results["study_compact"]["relax_seconds"], 2
        )
        ratios["compact_vs_vmap_total"] = round(
            results["study_vmap"]["seconds"] / results["study_compact"]["seconds"], 2
        )
    results["throughput_ratios"] = ratios
    if "loop" in results:
        results["cpu_ratios"] = {
            f"{name}_vs_loop": round(results["loop"]["cpu_per_sample"] / results[name]["cpu_per_sample"], 2)
            for name in variants
            if name in results
        }
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
