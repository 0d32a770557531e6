#!/usr/bin/env python3
"""Figure: the precision of implicit and unrolled derivatives against the number of
minimiser iterations (:mod:`mdsens.figures.precision`). Writes ``precision.png``
to ``--out`` and prints a JSON summary.

    python scripts/figure_precision.py --size full --out notebooks/figures
"""

import jax

jax.config.update("jax_enable_x64", True)  # before mdsens creates any array
from mdsens.figures import command_line, precision  # noqa: E402

if __name__ == "__main__":
    command_line.main(precision)
