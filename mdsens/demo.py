"""The main job: the paper's molecular-mechanics experiment.

Relax a 2D periodic 50:50 bidisperse soft-sphere packing (diameters 1.0 and
1.4, phi 0.9, N=128) with FIRE to fmax 1e-12, compute the sensitivity of
every position to the small particles' diameter by implicit differentiation,
and write positions, sensitivity, diagnostics and the figure to ``--out``.
Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from collections.abc import Sequence


def run(n: int = 128, phi: float = 0.9, seed: int = 0, out: str = "out/demo") -> dict:
    """Run the demo and return its summary (also written to ``out/summary.json``)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np

    import mdsens
    from mdsens import plotting, systems
    from mdsens.figures import sensitivity as sensitivity_figure

    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    system = systems.soft_sphere_packing(n, dim=2, phi=phi, diameters=(1.0, 1.4), seed=seed)
    small_diameter = jax.tree_util.tree_map(jnp.zeros_like, system.params)
    small_diameter["diameters"] = jnp.array([1.0, 0.0])

    start = time.perf_counter()
    x_star, dx, info = mdsens.equilibrium_jvp(system, system.params, small_diameter)
    x_star.block_until_ready()
    seconds = time.perf_counter() - start

    positions, sensitivity = np.asarray(x_star), np.asarray(dx)
    np.save(out_dir / "positions.npy", positions)
    np.save(out_dir / "sensitivity.npy", sensitivity)
    # The README's first figure, drawn by the same code (scripts/figure_sensitivity.py).
    figure = sensitivity_figure.field_figure(plotting.packing_drawing(system, positions), sensitivity, phi)
    plotting.save(figure, out_dir / "sensitivity.png")

    summary = {
        "system": {"n": n, "dim": 2, "phi": phi, "diameters": [1.0, 1.4], "seed": seed},
        "relax": {
            "energy": float(info.relax.energy),
            "fmax": float(info.relax.fmax),
            "n_steps": int(info.relax.n_steps),
            "converged": bool(info.relax.converged),
            "reason": info.relax.reason,
        },
        "sensitivity": {
            "parameter": "diameter of the small species",
            "max_norm": float(np.max(np.linalg.norm(sensitivity, axis=1))),
            "solve_residual": float(info.solve.residual),
            "solve_iterations": int(info.solve.iterations),
            "solve_converged": bool(info.solve.converged),
        },
        "seconds_with_compilation": round(seconds, 2),
        "outputs": ["positions.npy", "sensitivity.npy", "sensitivity.png", "summary.json"],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mdsens-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=128, help="number of particles (default 128)")
    parser.add_argument("--phi", type=float, default=0.9, help="packing fraction (default 0.9)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random start (default 0)")
    parser.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.n, args.phi, args.seed, args.out), indent=2))


if __name__ == "__main__":
    main()
