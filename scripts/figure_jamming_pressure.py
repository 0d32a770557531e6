#!/usr/bin/env python3
"""Figure: jamming by pressure (:mod:`mdsens.figures.jamming_pressure`): phi - phi_J,
z - z_iso, B and G against the target pressure of packings relaxed with their box,
from ``data/jamming_pressure.json`` (``--compute-data`` computes it first, at
``--size``: a few CPU minutes at full size). Writes ``jamming_pressure.png`` to
``--out`` and prints a JSON summary.

    python scripts/figure_jamming_pressure.py --size full --out notebooks/figures [--compute-data]
"""

import pathlib

import jax

jax.config.update("jax_enable_x64", True)  # before mdsens creates any array
from mdsens.figures import command_line, jamming_pressure  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    command_line.main(
        jamming_pressure,
        {
            "--data": {"default": ROOT / "data" / "jamming_pressure.json", "help": "the rows (JSON)"},
            "--compute-data": {"action": "store_true", "help": "compute the rows at --size and write them to --data"},
        },
    )
