#!/usr/bin/env python3
r"""Figure: elastic moduli near jamming, with fitted exponents.

Reads ``data/jamming_scaling.csv`` (one row per state, written by
``scripts/jamming_scaling.py``: 2D harmonic bidisperse discs compressed to
``phi_c + delta_phi``; pressure, bulk and shear moduli by implicit
differentiation, contact number) and plots against ``delta_phi``: the pressure
and the moduli in one panel, the excess contact number ``z - z_iso`` in the
other. Exponents are slopes of log(seed mean) against log(delta_phi), with the
standard deviation over bootstrap resamples of the seeds
(``jamming_scaling.exponent``). Expected (O'Hern et al., PRE 68, 011306,
2003): p ~ delta_phi, B ~ const, G ~ delta_phi^0.5, z - z_iso ~ delta_phi^0.5.

Writes ``elastic_moduli.png`` to ``--out``; prints a JSON summary.
"""

from __future__ import annotations

import csv
import pathlib
from collections.abc import Sequence

import jamming_scaling as js
import numpy as np
import _figure_cli as figure_cli

DATA = js.ROOT / "data" / "jamming_scaling.csv"
SIZES = {"small": {"n_boot": 200}, "full": {"n_boot": 2000}}
LABELS = {"pressure": "p", "bulk_modulus": "B", "shear_modulus": "G", "excess_z": "z - z_iso"}


def load_rows(path: str | pathlib.Path) -> list[dict]:
    """The CSV rows with numbers as floats and flags as bools."""
    def value(text: str):
        return text == "True" if text in ("True", "False") else float(text)

    with open(path, newline="") as f:
        return [{key: value(text) for key, text in row.items()} for row in csv.DictReader(f)]


def run(size: str = "full", out: str = "out/figures", data: str | pathlib.Path = DATA) -> dict:
    """Fit the data, draw ``elastic_moduli.png`` into ``out`` and return the summary."""
    import matplotlib.pyplot as plt

    from mdsens import plotting

    rows = load_rows(data)
    fits = {quantity: js.exponent(rows, quantity, **SIZES[size]) for quantity in LABELS}
    seeds = sorted({row["seed"] for row in rows})
    delta_phi = np.array(sorted({row["delta_phi"] for row in rows}))
    value = {(row["seed"], row["delta_phi"], q): row[q] for row in rows for q in LABELS}

    def samples(quantity):
        return np.array([[value[s, d, quantity] for d in delta_phi] for s in seeds])

    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    figure = plotting.scaling_figure(
        delta_phi,
        [{LABELS[q]: samples(q) for q in ("pressure", "bulk_modulus", "shear_modulus")},
         {LABELS["excess_z"]: samples("excess_z")}],
        exponents={LABELS[q]: (fit["exponent"], fit["uncertainty"]) for q, fit in fits.items()},
        xlabel=r"$\phi - \phi_c$",
        title=f"2D harmonic bidisperse discs, N={int(rows[0]['n'])}, {len(seeds)} seeds (cf. O'Hern et al. 2003)",
    )
    figure.savefig(out_dir / "elastic_moduli.png", dpi=120)
    plt.close(figure)
    return {
        "n": int(rows[0]["n"]),
        "seeds": len(seeds),
        "delta_phi": delta_phi.tolist(),
        "seed_mean": {q: samples(q).mean(axis=0).tolist() for q in LABELS},
        "exponents": {q: {k: fit[k] for k in ("exponent", "uncertainty", "expected", "within_tolerance")}
                      for q, fit in fits.items()},
        "all_states_converged": all(row["converged"] for row in rows),
        "figures": [str(out_dir / "elastic_moduli.png")],
    }


def main(argv: Sequence[str] | None = None) -> None:
    figure_cli.main(__doc__, run, SIZES, argv, {"--data": {"default": str(DATA), "help": "CSV of scripts/jamming_scaling.py"}})


if __name__ == "__main__":
    main()
