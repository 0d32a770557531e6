"""The command line of a figure module: ``--size``, ``--out``, ``--record`` and the
module's own options, passed to its ``run(size, out, **options)``; prints the
summary as JSON and writes it, with the digest of the code that drew the
figures, as their record (:mod:`mdsens.figures.records`)."""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import matplotlib

from mdsens.figures import records


def main(
    figure: ModuleType,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    not_printed: tuple[str, ...] = (),
    argv: Sequence[str] | None = None,
) -> None:
    """Parse ``argv`` for ``figure`` (a module of :mod:`mdsens.figures`), run it
    with files only (no display), print its summary without the keys in
    ``not_printed`` and write that as the record of the figures (by default
    ``<out>/<module>.json``). The caller has switched JAX to float64 (before
    importing mdsens).

    Args:
        options: further flags, ``{"--flag": argparse settings}``, passed to
            ``run`` by their ``dest`` names.
    """
    name = figure.__name__.rsplit(".", 1)[-1]
    parser = argparse.ArgumentParser(description=(figure.__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(figure.SIZES), default="full")
    parser.add_argument("--out", default="out/figures", help="folder of the figures (default out/figures)")
    parser.add_argument("--record", help=f"the figures' record (JSON; default <out>/{name}.json)")
    for flag, settings in (options or {}).items():
        parser.add_argument(flag, **settings)
    arguments = vars(parser.parse_args(argv))
    size, out, record = arguments.pop("size"), arguments.pop("out"), arguments.pop("record")
    matplotlib.use("Agg")  # files only, no display
    summary = figure.run(size, out, **arguments)
    printed = {key: value for key, value in summary.items() if key not in not_printed}
    records.write(record or pathlib.Path(out) / f"{name}.json", figure, size, printed)
    print(json.dumps(printed, indent=2))
