#!/usr/bin/env python3
"""Figure: the sensitivity of a jammed packing by three methods against the dense
reference (:mod:`mdsens.figures.sensitivity`). Writes ``sensitivity_methods.png``
to ``--out`` and prints a JSON summary.

    python scripts/figure_sensitivity.py --size full --out notebooks/figures
"""

import jax

jax.config.update("jax_enable_x64", True)  # before mdsens creates any array
from mdsens.figures import command_line, sensitivity  # noqa: E402

if __name__ == "__main__":
    command_line.main(sensitivity)
