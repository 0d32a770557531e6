#!/usr/bin/env python3
"""Figure: elastic moduli near jamming with fitted exponents, from the CSV that
``scripts/jamming_scaling.py`` writes (:mod:`mdsens.figures.jamming_scaling`).
Writes ``elastic_moduli.png`` to ``--out`` and prints a JSON summary.

    python scripts/figure_jamming.py --size full --out notebooks/figures
"""

import pathlib

import jax

jax.config.update("jax_enable_x64", True)  # before mdsens creates any array
from mdsens.figures import command_line, jamming_scaling  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    command_line.main(
        jamming_scaling,
        {"--data": {"default": ROOT / "data" / "jamming_scaling.csv", "help": "CSV of scripts/jamming_scaling.py"}},
    )
