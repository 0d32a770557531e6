#!/usr/bin/env python3
"""Figure: a parameter study of bidisperse soft-disc packings
(:mod:`mdsens.figures.parameter_study`). ``--size small`` runs a tiny study;
``--size full`` opens ``--study`` (default ``out/study_example``), running
``--config`` (default ``data/study_example.toml``) there first if it holds no
finished result. Writes ``study.png`` to ``--out`` and prints a JSON summary.

    python scripts/figure_study.py --size full --out notebooks/figures
"""

import pathlib

import jax

jax.config.update("jax_enable_x64", True)  # before mdsens creates any array
from mdsens.figures import command_line, parameter_study  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    command_line.main(
        parameter_study,
        {
            "--study": {"dest": "folder", "default": ROOT / "out" / "study_example", "help": "study folder"},
            "--config": {"default": ROOT / "data" / "study_example.toml", "help": "study configuration (TOML)"},
        },
    )
