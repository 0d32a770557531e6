#!/usr/bin/env python3
"""Benchmark mdsens.study (in-flight batching) against a Python loop of single
runs, on one device, on several CPU devices, and (``--device gpu``) on a GPU.

Workload: 64 packings (4 packing fractions x 16 seeds) of N = 128 bidisperse
soft discs (the demo's system), each relaxed to fmax 1e-12, with the
sensitivity of every position to the small particles' diameter and dE*/d(all
parameters). Methods:

- ``loop``: one ``mdsens.equilibrium_jvp`` (a single ``mdsens.relax`` and one
  sensitivity solve) and one jitted ``mdsens.energy_sensitivity`` per packing,
  reusing one compiled program (the packings share one energy structure).
- ``study_1dev``: ``mdsens.study.run`` on one device, ``--width`` slots.
- ``study_Ndev``: the same on ``--cpu-devices`` CPU devices, in a subprocess
  started with ``JAX_NUM_CPU_DEVICES`` (JAX fixes its device count at start).

For each: wall and CPU time (``time.process_time``, of the process that
computes) per sample, and for the study the fraction of slot steps doing work
(``member_steps / slot_steps``: a slot is occupied from the step its sample
enters to the end of the stage in which it finishes). Compilation is excluded
(each method is warmed up first on the same shapes) and reported separately.
The machine may be shared: the load average is printed with the numbers, and
CPU time depends less on the load than wall time. ``scaling`` is the
throughput (samples per wall second) of N devices over one device's.

    python scripts/bench_study.py [--cpu-devices 2] [--width 8] [--device cpu|gpu]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

PHIS = [0.86, 0.88, 0.90, 0.92]


def config_text(n: int, seeds: int, phis: list[float]) -> str:
    return f"""
[study]
seeds = {seeds}
chunk_size = 16
[system]
builder = "soft_sphere_packing"
n = {n}
dim = 2
diameters = [1.0, 1.4]
[grid]
phi = {phis}
[sensitivities.small_diameter]
diameters = [1.0, 0.0]
"""


def measure_study(args: argparse.Namespace, devices: list) -> dict:
    """Warm up on the first packing fraction's first seeds, then time the study."""
    from mdsens import study

    text = config_text(args.n, args.seeds, PHIS)
    warm = config_text(args.n, min(args.seeds, args.width * len(devices)), PHIS[:1])
    start = time.perf_counter()
    study.run(warm, devices=devices, width=args.width, progress=False, cache=False)
    compile_seconds = time.perf_counter() - start
    start, cpu = time.perf_counter(), time.process_time()
    ds = study.run(text, devices=devices, width=args.width, progress=False, cache=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    a, samples = ds.attrs, ds.relax_converged.size
    return {
        "devices": int(a["run_devices"]),
        "width": int(a["run_width"]),
        "seconds": round(seconds, 2),
        "per_sample": round(seconds / samples, 3),
        "cpu_per_sample": round(cpu / samples, 3),
        "samples_per_second": round(samples / seconds, 3),
        "warmup_with_compile": round(compile_seconds, 2),
        "relax_seconds": round(a["run_relax_seconds"], 2),
        "post_seconds": round(a["run_post_seconds"], 2),
        "host_seconds": round(a["run_host_seconds"], 2),
        "member_steps": int(a["run_member_steps"]),
        "slot_steps": int(a["run_slot_steps"]),
        "useful_slot_steps": round(a["run_member_steps"] / a["run_slot_steps"], 3),
        "stages": int(a["run_stages"]),
        "relax_converged": int(ds.relax_converged.sum()),
        "solves_converged": int(ds.solve_converged.sum()),
    }


def measure_loop(args: argparse.Namespace, device) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import mdsens
    from mdsens import systems

    built = [
        systems.soft_sphere_packing(args.n, dim=2, phi=phi, diameters=[1.0, 1.4], seed=seed)
        for phi in PHIS
        for seed in range(args.seeds)
    ]
    first = built[0]
    energy_sensitivity = jax.jit(mdsens.energy_sensitivity, static_argnums=0)

    def single(system):
        tangent = {**jax.tree.map(jnp.zeros_like, system.params), "diameters": jnp.array([1.0, 0.0])}
        x, dx, info = mdsens.equilibrium_jvp(first, system.params, tangent, positions=system.positions)
        grads = energy_sensitivity(first, x, system.params)
        jax.block_until_ready((dx, grads))
        return int(info.relax.n_steps), bool(info.relax.converged)

    with jax.default_device(device):
        start = time.perf_counter()
        single(first)
        compile_seconds = time.perf_counter() - start
        start, cpu = time.perf_counter(), time.process_time()
        steps = [single(s) for s in built]
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    fire = np.asarray([n for n, _ in steps])
    return {
        "seconds": round(seconds, 2),
        "per_sample": round(seconds / len(built), 3),
        "cpu_per_sample": round(cpu / len(built), 3),
        "samples_per_second": round(len(built) / seconds, 3),
        "first_call_with_compile": round(compile_seconds, 2),
        "converged": sum(c for _, c in steps),
        "fire_steps": {"min": int(fire.min()), "mean": round(float(fire.mean()), 1), "max": int(fire.max())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=16, help="seeds per packing fraction (4 fractions)")
    parser.add_argument("--width", type=int, default=8, help="slots per device")
    parser.add_argument("--cpu-devices", type=int, default=os.cpu_count() or 1, help="CPU devices of study_Ndev")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--skip", nargs="*", default=[], choices=["loop", "study_1dev", "study_Ndev"])
    parser.add_argument("--study-only", action="store_true", help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args()

    import jax

    jax.config.update("jax_enable_x64", True)
    if args.study_only:  # the subprocess of study_Ndev: every device of this process
        print(json.dumps(measure_study(args, jax.devices())))
        return
    workload = {"n": args.n, "dim": 2, "samples": 4 * args.seeds, "phi": PHIS, "fmax": 1e-12, "sensitivities": 1}
    results: dict = {
        "workload": workload,
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "cpu_count": os.cpu_count(),
        "device": args.device,
    }
    if args.device == "gpu":
        try:
            devices = jax.devices("gpu")
        except RuntimeError:
            devices = []
        if not devices:
            print(
                json.dumps(
                    {
                        "device": "gpu",
                        "available": False,
                        "would_measure": "on the first GPU: the loop (equilibrium_jvp + energy_sensitivity per "
                        "packing) and study.run with --width slots, warmed up first; wall time per sample (the "
                        "host CPU time is not the GPU's work), useful slot steps, and study_Ndev on every GPU",
                        "workload": workload,
                    },
                    indent=2,
                )
            )
            return
    else:
        devices = jax.devices("cpu")
    results["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
    if "loop" not in args.skip:
        results["loop"] = measure_loop(args, devices[0])
    if "study_1dev" not in args.skip:
        results["study_1dev"] = measure_study(args, devices[:1])
    if "study_Ndev" not in args.skip:
        if args.device == "gpu":
            results["study_Ndev"] = measure_study(args, devices)
        else:
            env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(args.cpu_devices), "JAX_PLATFORMS": "cpu"}
            command = [sys.executable, __file__, "--study-only", "--n", str(args.n), "--seeds", str(args.seeds)]
            command += ["--width", str(args.width)]
            run = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            results["study_Ndev"] = json.loads(run.stdout.strip().splitlines()[-1])
    ratios = {}
    if "loop" in results:
        for name in ("study_1dev", "study_Ndev"):
            if name in results:
                ratios[f"{name}_cpu_vs_loop"] = round(
                    results[name]["cpu_per_sample"] / results["loop"]["cpu_per_sample"], 2
                )
    if "study_1dev" in results and "study_Ndev" in results:
        one, many = results["study_1dev"], results["study_Ndev"]
        ratios["scaling"] = round(many["samples_per_second"] / one["samples_per_second"], 2)
        ratios["scaling_goal"] = round(0.8 * many["devices"], 2)
    results["ratios"] = ratios
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
