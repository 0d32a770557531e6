"""Jamming scaling of 2D harmonic bidisperse packings (O'Hern et al., PRE 68, 011306, 2003).

For each seed: a 50:50 mixture of discs with diameters 1 and 1.4 (harmonic,
alpha = 2, epsilon = 1, all-pairs energy) is relaxed from random positions at
phi = 0.86, decompressed to its jamming point (``mdsens.jamming.find_jamming``:
pressure lowered about tenfold per step with re-relaxation to fmax 1e-12,
phi_c from the linear p(phi) of the last two states, p ~ 1e-7), then
compressed to phi_c + delta_phi for delta_phi from 1e-4 to 1e-1, each state
from the previous one (``mdsens.jamming.compress``). At each state
(``mdsens.jamming.observe``): pressure, bulk and shear moduli by implicit
differentiation (B = -V dp/dV and the orientation-averaged d sigma_xy / d gamma,
non-affine relaxation included) and the contact number z among non-rattlers.

The exponents are slopes of log(mean over seeds) against log(delta_phi);
``uncertainty`` is their standard deviation over bootstrap resamples of the
seeds. Expected (O'Hern et al.): p ~ 1, B ~ 0, G ~ 0.5, z - z_iso ~ 0.5.

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
- ``notebooks/figures/jamming_scaling.png``.

Prints the JSON (without the means). Per-seed results are cached in
``out/jamming_scaling/`` so an interrupted run resumes.

    python scripts/jamming_scaling.py --n 256 --seeds 6 --workers 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {"pressure": 1.0, "bulk_modulus": 0.0, "shear_modulus": 0.5, "excess_z": 0.5}
TOLERANCE = 0.1
COLUMNS = ["n", "seed", "phi_c", "delta_phi", "phi", "pressure", "bulk_modulus", "shear_modulus", "z", "z_iso",
           "excess_z", "n_contacts", "n_rattlers", "converged", "moduli_ok", "n_steps", "fmax", "solve_residual",
           "seconds"]


def run_seed(job: tuple[int, int, list[float], float, str]) -> list[dict]:
    """All states of one seed (in a worker process), cached as JSON."""
    n, seed, delta_phis, phi_start, cache = job
    path = Path(cache) / f"n{n}_seed{seed}.json"
    if path.exists():
        rows = json.loads(path.read_text())
        if [r["delta_phi"] for r in rows] == sorted(delta_phis):
            return rows
    import jax

    jax.config.update("jax_enable_x64", True)
    from mdsens import jamming, systems

    start = time.time()
    system = systems.soft_sphere_packing(n, dim=2, phi=phi_start, diameters=(1.0, 1.4), alpha=2.0, seed=seed)
    jam = jamming.find_jamming(system)
    log(f"n={n} seed={seed}: phi_c={jam.phi_c:.8f} after {len(jam.history)} states ({time.time() - start:.0f} s)")
    rows, state = [], jam.state
    for dphi in sorted(delta_phis):
        (state,) = jamming.compress(system, jamming.Jamming(jam.phi_c, jam.slope, state, []), [dphi])
        row = {"n": n, "seed": seed, "phi_c": jam.phi_c, "delta_phi": dphi, **jamming.observe(system, state)}
        row["excess_z"] = row["z"] - row["z_iso"]
        rows.append(row)
        log(f"n={n} seed={seed} dphi={dphi:.2e}: p={row['pressure']:.3e} B={row['bulk_modulus']:.4f} "
            f"G={row['shear_modulus']:.3e} z-z_iso={row['excess_z']:.4f} steps={row['n_steps']} "
            f"ok={row['converged'] and row['moduli_ok']} ({time.time() - start:.0f} s)")
    for row in rows:
        row["seconds"] = round(time.time() - start, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return rows


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fit(delta_phi: np.ndarray, values: np.ndarray) -> float:
    """Slope of log(values) against log(delta_phi) over the positive values (NaN if
    fewer than three: a fixed-box packing can have G < 0)."""
    ok = values > 0
    if ok.sum() < 3:
        return float("nan")
    return float(np.polyfit(np.log(delta_phi[ok]), np.log(values[ok]), 1)[0])


def exponent(rows: list[dict], quantity: str, n_boot: int = 2000) -> dict:
    seeds = sorted({r["seed"] for r in rows})
    dphis = np.array(sorted({r["delta_phi"] for r in rows}))
    value = {(r["seed"], r["delta_phi"]): r[quantity] for r in rows}
    table = np.array([[value[s, d] for d in dphis] for s in seeds])
    mean = table.mean(axis=0)
    rng = np.random.default_rng(0)
    boot = [fit(dphis, table[rng.integers(0, len(seeds), len(seeds))].mean(axis=0)) for _ in range(n_boot)]
    per_seed = [fit(dphis, row) for row in table]
    slope = fit(dphis, mean)
    with np.errstate(invalid="ignore"):
        local = np.diff(np.log(np.where(mean > 0, mean, np.nan))) / np.diff(np.log(dphis))
    return {
        "exponent": slope, "uncertainty": float(np.nanstd(boot)), "expected": EXPECTED[quantity],
        "within_tolerance": bool(abs(slope - EXPECTED[quantity]) <= TOLERANCE),
        "points_used": int(np.sum(mean > 0)), "seeds_with_negative_values": int(np.sum(np.any(table <= 0, axis=1))),
        "per_seed_mean": float(np.nanmean(per_seed)), "per_seed_std": float(np.nanstd(per_seed)),
        "local_exponents": [None if np.isnan(e) else round(float(e), 3) for e in local],
        "delta_phi": dphis.tolist(), "mean": mean.tolist(),
    }


def figure(rows: list[dict], fits: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("pressure", "pressure $p$"), ("bulk_modulus", "bulk modulus $B$"),
              ("shear_modulus", "shear modulus $G$"), ("excess_z", r"$z - z_{iso}$")]
    fig, axes = plt.subplots(2, 2, figsize=(8.5, 7.0))
    for ax, (key, label) in zip(axes.ravel(), panels):
        positive = [r for r in rows if r[key] > 0]  # log axes: a fixed-box G can be negative
        ax.plot([r["delta_phi"] for r in positive], [r[key] for r in positive], ".", color="C0", alpha=0.4,
                label=f"seeds ({len(rows) - len(positive)} values <= 0 not shown)" if len(positive) < len(rows) else "seeds")
        f = fits[key]
        d, m = np.array(f["delta_phi"]), np.array(f["mean"])
        ok = m > 0
        ax.plot(d[ok], m[ok], "o", color="k", label="seed mean")
        c = np.exp(np.mean(np.log(m[ok]) - f["exponent"] * np.log(d[ok])))
        ax.plot(d, c * d ** f["exponent"], "-", color="C3",
                label=f"fit: exponent {f['exponent']:.2f} ± {f['uncertainty']:.2f} (expected {f['expected']:g})")
        ax.set(xscale="log", yscale="log", xlabel=r"$\phi - \phi_c$", ylabel=label)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--delta-phi", type=float, nargs="+", default=[float(d) for d in np.logspace(-4, -1, 7)])
    parser.add_argument("--phi-start", type=float, default=0.86)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "data")
    parser.add_argument("--figure", type=Path, default=ROOT / "notebooks" / "figures" / "jamming_scaling.png")
    parser.add_argument("--cache", type=Path, default=ROOT / "out" / "jamming_scaling")
    args = parser.parse_args(argv)
    if not 256 <= args.n <= 1024 or args.seeds < 1 or len(args.delta_phi) < 2:
        parser.error("need 256 <= N <= 1024, seeds >= 1 and at least two delta_phi")

    start = time.time()
    # One thread per worker process: the workers are the parallelism.
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    jobs = [(args.n, s, args.delta_phi, args.phi_start, str(args.cache)) for s in range(args.seeds)]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        rows = [row for seed_rows in pool.map(run_seed, jobs) for row in seed_rows]

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "jamming_scaling.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    fits = {q: exponent(rows, q) for q in EXPECTED}
    summary = {
        "settings": {
            "system": "2D harmonic (alpha=2) 50:50 bidisperse discs, diameters 1 and 1.4, epsilon=1, square periodic box",
            "n": args.n, "seeds": args.seeds, "phi_start": args.phi_start,
            "delta_phi": sorted(args.delta_phi), "fmax": 1e-12, "tolerance": TOLERANCE,
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
    figure(rows, fits, args.figure,
           f"2D harmonic bidisperse discs, N={args.n}, {args.seeds} seeds (cf. O'Hern et al. 2003)")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
