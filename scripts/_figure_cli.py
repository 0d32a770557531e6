"""The command line of the figure scripts: ``--size``, ``--out`` and a script's
own options, passed on to its ``run(size, out, *options)``; prints the summary
as JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any


def main(
    doc: str,
    run: Callable[..., dict],
    sizes: Iterable[str],
    argv: Sequence[str] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    not_printed: tuple[str, ...] = (),
) -> None:
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(sizes), default="full")
    parser.add_argument("--out", default="out/figures")
    for flag, settings in (options or {}).items():
        parser.add_argument(flag, **settings)
    args = vars(parser.parse_args(argv))
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    summary = run(args.pop("size"), args.pop("out"), *args.values())
    print(json.dumps({key: value for key, value in summary.items() if key not in not_printed}, indent=2))
