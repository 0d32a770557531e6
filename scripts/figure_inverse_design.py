#!/usr/bin/env python3
"""Figure: inverse design of a relaxed packing's pressure with implicit gradients
(:mod:`mdsens.figures.inverse_design`). Writes ``inverse_design.png`` to
``--out`` and prints a JSON summary (without the final positions).

    python scripts/figure_inverse_design.py --size full --out notebooks/figures
"""

import jax

jax.config.update("jax_enable_x64", True)  # before mdsens creates any array
from mdsens.figures import command_line, inverse_design  # noqa: E402

if __name__ == "__main__":
    command_line.main(inverse_design, not_printed=("final_positions",))
