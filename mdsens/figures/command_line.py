"""The command line of a figure module: ``--size``, ``--out`` and the module's
own options, passed to its ``run(size, out, **options)``; prints the summary
as JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import matplotlib


def main(
    figure: ModuleType,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    not_printed: tuple[str, ...] = (),
    argv: Sequence[str] | None = None,
) -> None:
    """Parse ``argv`` for ``figure`` (a module of :mod:`mdsens.figures`), run it
    with files only (no display) and print its summary without the keys in
    ``not_printed``. The caller has switched JAX to float64 (before importing
    mdsens).

    Args:
        options: further flags, ``{"--flag": argparse settings}``, passed to
            ``run`` by their ``dest`` names.
    """
    parser = argparse.ArgumentParser(description=(figure.__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(figure.SIZES), default="full")
    parser.add_argument("--out", default="out/figures", help="folder of the figures (default out/figures)")
    for flag, settings in (options or {}).items():
        parser.add_argument(flag, **settings)
    arguments = vars(parser.parse_args(argv))
    matplotlib.use("Agg")  # files only, no display
    summary = figure.run(arguments.pop("size"), arguments.pop("out"), **arguments)
    print(json.dumps({key: value for key, value in summary.items() if key not in not_printed}, indent=2))
