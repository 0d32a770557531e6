r"""Figure: elastic moduli near jamming, with fitted exponents (O'Hern et al., PRE 68, 011306, 2003).

Computation (:func:`seed_rows`, one seed): a 50:50 mixture of 2D discs with
diameters 1 and 1.4 (harmonic, alpha = 2, epsilon = 1, all pairs) is relaxed
from random positions at ``phi_start``, decompressed to its jamming point
(:func:`mdsens.jamming.find_jamming`: phi_c from the linear p(phi) of the last
two states, p ~ 1e-7), then compressed to ``phi_c + delta_phi``, each state from
the previous one (:func:`mdsens.jamming.compress`). At each state
(:func:`mdsens.jamming.observe`): pressure, bulk and shear moduli by implicit
differentiation (non-affine relaxation included) and the contact number z
among non-rattlers. Rows have the :data:`COLUMNS` of ``data/jamming_scaling.csv``
(:func:`write_rows`, :func:`load_rows`).

Exponents (:func:`exponent`) are slopes of log(seed mean) against
log(delta_phi), with the standard deviation over bootstrap resamples of the
seeds as uncertainty. Expected (:data:`EXPECTED`): p ~ delta_phi, B ~ const,
G ~ delta_phi^0.5, z - z_iso ~ delta_phi^0.5.

The figure, :func:`scaling_panels` (every quantity with its fit, one panel
each), is drawn by :func:`run` from the CSV into ``jamming_scaling.png``.
"""

from __future__ import annotations

import csv
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from mdsens import jamming, plotting, systems

EXPECTED = {"pressure": 1.0, "bulk_modulus": 0.0, "shear_modulus": 0.5, "excess_z": 0.5}
TOLERANCE = 0.1  # on |exponent - expected|
COLUMNS = (
    "n", "seed", "phi_c", "delta_phi", "phi", "pressure", "bulk_modulus", "shear_modulus", "z", "z_iso", "excess_z",
    "n_contacts", "n_rattlers", "converged", "moduli_ok", "n_steps", "fmax", "solve_residual", "seconds",
)  # fmt: skip
SIZES = {"small": {"n_boot": 200}, "full": {"n_boot": 2000}}


def seed_rows(
    n: int, seed: int, delta_phis: Sequence[float], phi_start: float, cache: str | pathlib.Path | None = None
) -> list[dict[str, Any]]:
    """One row per ``delta_phi`` (increasing) for one seed; ``seconds`` is the
    seed's wall time. With a ``cache`` folder, rows are read from and written to
    ``n{n}_seed{seed}.json`` there, so an interrupted run resumes. Progress goes
    to stderr."""
    path = None if cache is None else pathlib.Path(cache) / f"n{n}_seed{seed}.json"
    if path is not None and path.exists():
        rows = json.loads(path.read_text())
        if [row["delta_phi"] for row in rows] == sorted(delta_phis):
            return rows
    start = time.time()
    system = systems.soft_sphere_packing(n, dim=2, phi=phi_start, diameters=(1.0, 1.4), alpha=2.0, seed=seed)
    jam = jamming.find_jamming(system)
    _log(f"n={n} seed={seed}: phi_c={jam.phi_c:.8f} after {len(jam.history)} states ({time.time() - start:.0f} s)")
    rows, state = [], jam.state
    for dphi in sorted(delta_phis):
        (state,) = jamming.compress(system, jamming.Jamming(jam.phi_c, jam.slope, state, []), [dphi])
        row = {"n": n, "seed": seed, "phi_c": jam.phi_c, "delta_phi": dphi, **jamming.observe(system, state)}
        row["excess_z"] = row["z"] - row["z_iso"]
        rows.append(row)
        _log(
            f"n={n} seed={seed} dphi={dphi:.2e}: p={row['pressure']:.3e} B={row['bulk_modulus']:.4f} "
            f"G={row['shear_modulus']:.3e} z-z_iso={row['excess_z']:.4f} steps={row['n_steps']} "
            f"ok={row['converged'] and row['moduli_ok']} ({time.time() - start:.0f} s)"
        )
    for row in rows:
        row["seconds"] = round(time.time() - start, 1)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows))
    return rows


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_rows(rows: Sequence[dict[str, Any]], path: str | pathlib.Path) -> None:
    """The rows as CSV with the :data:`COLUMNS` (other keys left out)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def load_rows(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """The CSV rows with numbers as floats and flags as bools."""

    def value(text: str) -> float | bool:
        return text == "True" if text in ("True", "False") else float(text)

    with open(path, newline="") as f:
        return [{key: value(text) for key, text in row.items()} for row in csv.DictReader(f)]


def fit(x: np.ndarray, values: np.ndarray) -> float:
    """Slope of log(values) against log(x) over the positive values (NaN if
    fewer than three: a fixed-box packing can have G < 0)."""
    ok = values > 0
    if ok.sum() < 3:
        return float("nan")
    return float(np.polyfit(np.log(x[ok]), np.log(values[ok]), 1)[0])


def exponent(
    rows: Sequence[dict[str, Any]],
    quantity: str,
    n_boot: int = 2000,
    *,
    against: str = "delta_phi",
    expected: float | None = None,
) -> dict[str, Any]:
    """The exponent of ``quantity`` against ``against`` (keys of the rows; the
    values of ``against`` shared by all seeds) fitted to the seed means, its
    bootstrap ``uncertainty``, whether it is within :data:`TOLERANCE` of the
    ``expected`` one (default from :data:`EXPECTED`), per-seed fits, local
    exponents (slopes between successive points), and the ``against`` values and
    seed ``mean`` fitted."""
    expected = EXPECTED[quantity] if expected is None else expected
    seeds = sorted({r["seed"] for r in rows})
    xs = np.array(sorted({r[against] for r in rows}))
    value = {(r["seed"], r[against]): r[quantity] for r in rows}
    table = np.array([[value[s, x] for x in xs] for s in seeds])
    mean = table.mean(axis=0)
    rng = np.random.default_rng(0)
    boot = [fit(xs, table[rng.integers(0, len(seeds), len(seeds))].mean(axis=0)) for _ in range(n_boot)]
    per_seed = [fit(xs, row) for row in table]
    slope = fit(xs, mean)
    with np.errstate(invalid="ignore"):
        local = np.diff(np.log(np.where(mean > 0, mean, np.nan))) / np.diff(np.log(xs))
    return {
        "exponent": slope,
        "uncertainty": float(np.nanstd(boot)),
        "expected": expected,
        "within_tolerance": bool(abs(slope - expected) <= TOLERANCE),
        "points_used": int(np.sum(mean > 0)),
        "seeds_with_negative_values": int(np.sum(np.any(table <= 0, axis=1))),
        "per_seed_mean": float(np.nanmean(per_seed)),
        "per_seed_std": float(np.nanstd(per_seed)),
        "local_exponents": [None if np.isnan(e) else round(float(e), 3) for e in local],
        against: xs.tolist(),
        "mean": mean.tolist(),
    }


#: The panels of :func:`scaling_panels`: (quantity, axis label).
PANELS = (
    ("pressure", "pressure $p$"),
    ("bulk_modulus", "bulk modulus $B$"),
    ("shear_modulus", "shear modulus $G$"),
    ("excess_z", r"excess contacts $z - z_{\rm iso}$"),
)


@plotting.styled
def scaling_panels(
    rows: Sequence[dict[str, Any]],
    fits: dict[str, dict[str, Any]],
    title: str,
    *,
    panels: Sequence[tuple[str, str]] = PANELS,
    against: str = "delta_phi",
    xlabel: str = r"distance to jamming $\phi - \phi_c$",
) -> plt.Figure:
    """One log-log panel per ``(quantity, label)`` of ``panels`` against
    ``against``: seeds as dots (values <= 0 left out), seed means as circles,
    the fitted power law (``fits``: the results of :func:`exponent`)."""
    fig, axes = plt.subplots(2, 2, figsize=(9.0, 7.6), layout="constrained")
    for ax, (key, label) in zip(axes.ravel(), panels, strict=True):
        positive = [r for r in rows if r[key] > 0]  # log axes: a fixed-box G can be negative
        hidden = len(rows) - len(positive)
        ax.plot(
            [r[against] for r in positive],
            [r[key] for r in positive],
            ".",
            color=plotting.OKABE_ITO["sky blue"],
            label=f"seeds ({hidden} values <= 0 not shown)" if hidden else "seeds",
        )
        f = fits[key]
        d, m = np.array(f[against]), np.array(f["mean"])
        ok = m > 0
        ax.plot(d[ok], m[ok], "o", color="k", ms=5, label="seed mean")
        c = np.exp(np.mean(np.log(m[ok]) - f["exponent"] * np.log(d[ok])))
        ax.plot(
            d,
            c * d ** f["exponent"],
            "-",
            color=plotting.OKABE_ITO["vermillion"],
            label=(
                f"fit: exponent {plotting.with_uncertainty(f['exponent'], f['uncertainty'])} "
                f"(expected {f['expected']:g})"
            ),
        )
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=label)
        ax.legend()
    fig.suptitle(title)
    return fig


def title(n: int, seeds: int) -> str:
    """The figure's title."""
    return (
        f"2D harmonic bidisperse discs above jamming: $N = {n}$, {seeds} seeds\n"
        "(exponent ± its bootstrap spread over seeds; cf. O'Hern et al., PRE 68, 011306, 2003)"
    )


def run(
    size: str = "full", out: str | pathlib.Path = "out/figures", data: str | pathlib.Path = "data/jamming_scaling.csv"
) -> dict:
    """Fit the rows of the CSV ``data``, draw ``jamming_scaling.png`` into ``out``
    and return the summary."""
    rows = load_rows(data)
    fits = {quantity: exponent(rows, quantity, SIZES[size]["n_boot"]) for quantity in EXPECTED}
    seeds = sorted({row["seed"] for row in rows})
    figure = scaling_panels(rows, fits, title(int(rows[0]["n"]), len(seeds)))
    return {
        "n": int(rows[0]["n"]),
        "seeds": len(seeds),
        "delta_phi": fits["pressure"]["delta_phi"],
        "seed_mean": {q: fitted["mean"] for q, fitted in fits.items()},
        "exponents": {
            q: {k: fitted[k] for k in ("exponent", "uncertainty", "expected", "within_tolerance")}
            for q, fitted in fits.items()
        },
        "all_states_converged": all(row["converged"] for row in rows),
        "figures": [plotting.save(figure, pathlib.Path(out) / "jamming_scaling.png")],
    }
