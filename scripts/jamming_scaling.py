#!/usr/bin/env python3
"""Jamming scaling of 2D harmonic bidisperse packings (O'Hern et al., PRE 68, 011306, 2003).

For each seed, the states of :func:`mdsens.figures.jamming_scaling.seed_rows`
(the packing decompressed to its jamming point phi_c, then compressed to
phi_c + delta_phi for delta_phi from 1e-4 to 1e-1: pressure, bulk and shear
moduli by implicit differentiation, contact number), one worker process per
seed at a time; then the exponents
(:func:`mdsens.figures.jamming_scaling.exponent`). Expected: p ~ 1, B ~ 0,
G ~ 0.5, z - z_iso ~ 0.5.

Outputs (format for readers, e.g. a notebook):

- ``data/jamming_scaling.csv``: one row per (n, seed, delta_phi) with columns
  n, seed, phi_c, delta_phi, phi, pressure, bulk_modulus, shear_modulus, z,
  z_iso (= 4 - 2/N', N' non-rattlers), excess_z (= z - z_iso), n_contacts,
  n_rattlers, converged, moduli_ok, n_steps, fmax, solve_residual, seconds
  (wall time of the seed).
- ``data/jamming_scaling.json``: ``settings``; ``exponents`` (per quantity:
  exponent, uncertainty, expected, within_tolerance, per_seed_mean/std, and
  local_exponents: slopes between successive delta_phi);
  ``means`` (per quantity: delta_phi and the seed means); ``phi_c`` per seed;
  ``seed_seconds`` (wall time of each seed's computation; ``runtime_seconds``
  is this run's, small when the seeds come from the cache);
  ``all_within_tolerance``, ``all_states_converged``, ``all_moduli_ok``.

Prints the JSON (without the means). Per-seed results are cached in
``out/jamming_scaling/`` so an interrupted run resumes. The figure, with its
record (:mod:`mdsens.figures.records`), is drawn from the CSV by
``scripts/figure_jamming.py``:

    python scripts/jamming_scaling.py --n 256 --seeds 6 --workers 2
    python scripts/figure_jamming.py --size full --out notebooks/figures
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)  # before mdsens creates any array (workers run this too)
import numpy as np  # noqa: E402

from mdsens.figures import jamming_scaling  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--delta-phi", type=float, nargs="+", default=[float(d) for d in np.logspace(-4, -1, 7)])
    parser.add_argument("--phi-start", type=float, default=0.86)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "data")
    parser.add_argument("--cache", type=Path, default=ROOT / "out" / "jamming_scaling")
    args = parser.parse_args(argv)
    if not 256 <= args.n <= 1024 or args.seeds < 1 or len(args.delta_phi) < 2:
        parser.error("need 256 <= N <= 1024, seeds >= 1 and at least two delta_phi")

    start = time.time()
    # One thread per worker process: the workers are the parallelism. Spawned, not
    # forked: this process has started JAX, which does not survive a fork.
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    seed_rows = functools.partial(
        jamming_scaling.seed_rows, args.n, delta_phis=args.delta_phi, phi_start=args.phi_start, cache=args.cache
    )
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=spawn) as pool:
        rows = [row for rows_of_seed in pool.map(seed_rows, range(args.seeds)) for row in rows_of_seed]

    args.out.mkdir(parents=True, exist_ok=True)
    jamming_scaling.write_rows(rows, args.out / "jamming_scaling.csv")
    fits = {q: jamming_scaling.exponent(rows, q) for q in jamming_scaling.EXPECTED}
    summary = {
        "settings": {
            "system": (
                "2D harmonic (alpha=2) 50:50 bidisperse discs, diameters 1 and 1.4, epsilon=1, square periodic box"
            ),
            "n": args.n,
            "seeds": args.seeds,
            "phi_start": args.phi_start,
            "delta_phi": sorted(args.delta_phi),
            "fmax": 1e-12,
            "tolerance": jamming_scaling.TOLERANCE,
        },
        "exponents": {q: {k: v for k, v in f.items() if k not in ("mean", "delta_phi")} for q, f in fits.items()},
        "all_within_tolerance": all(f["within_tolerance"] for f in fits.values()),
        "all_states_converged": all(r["converged"] for r in rows),
        "all_moduli_ok": all(r["moduli_ok"] for r in rows),
        "phi_c": {str(r["seed"]): r["phi_c"] for r in rows},
        "runtime_seconds": round(time.time() - start, 1),
        "seed_seconds": {str(r["seed"]): r["seconds"] for r in rows},
    }
    means = {q: {"delta_phi": f["delta_phi"], "mean": f["mean"]} for q, f in fits.items()}
    (args.out / "jamming_scaling.json").write_text(json.dumps({**summary, "means": means}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
