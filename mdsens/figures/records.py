"""The record of a figure: the numbers its module printed when it drew its PNG
files, and the digest of the code that drew them, in a JSON file beside them
(``notebooks/figures/<module>.json``; :func:`mdsens.figures.command_line.main`
writes it).

A figure is current when its record's :func:`code_digest` is that of the code
now, and its numbers computed again do not differ (:func:`differences`) from
the recorded ones; ``tests/test_figures.py`` checks both, so a committed figure
cannot be older than the code that draws it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import json
import math
import pathlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

PACKAGE = pathlib.Path(__file__).resolve().parents[1]


def code_files(module: ModuleType) -> list[pathlib.Path]:
    """The sources that draw the figures of ``module`` (e.g. :mod:`mdsens.figures.sensitivity`):
    its file, those of the :mod:`mdsens.figures` modules it imports (recursively) and :mod:`mdsens.plotting`'s."""
    files, pending = {PACKAGE / "plotting.py"}, [module]
    while pending:
        file = getattr(pending.pop(), "__file__", None)  # None: a module made in memory (tests) has no source
        path = pathlib.Path(file) if file else None
        if path is None or path in files:
            continue
        files.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "mdsens.figures":
                pending.extend(importlib.import_module(f"mdsens.figures.{alias.name}") for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mdsens.figures."):
                pending.append(importlib.import_module(node.module or ""))
    return sorted(files)


def code_digest(module: ModuleType) -> str:
    """sha256 over the :func:`code_files` of ``module`` (their paths in the package and contents)."""
    digest = hashlib.sha256()
    for path in code_files(module):
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def write(path: str | pathlib.Path, module: ModuleType, size: str, summary: Mapping[str, Any]) -> str:
    """Write the record of ``module``'s figures drawn at ``size`` with ``summary``
    (the figures' paths as file names) to ``path``; return the path."""
    summary = {**summary, "figures": [pathlib.Path(figure).name for figure in summary.get("figures", [])]}
    record = {"module": module.__name__, "size": size, "code_digest": code_digest(module), "summary": summary}
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return str(path)


def read(path: str | pathlib.Path) -> dict[str, Any]:
    """A record written by :func:`write`."""
    return json.loads(pathlib.Path(path).read_text())


def differences(recorded: Any, current: Any, rtol: float = 1e-6, atol: float = 1e-9, where: str = "") -> list[str]:
    """Where the numbers of ``current`` differ from those ``recorded``: nested
    mappings are compared over the recorded keys, lists entry by entry, numbers
    (and flags) with ``|a - b| <= atol + rtol |b|`` (NaN equals NaN); strings,
    such as paths, are not compared.

    Returns:
        One line per difference, e.g. ``"max_abs_error.implicit: recorded 4.6e-10, now 2e-08"``.
    """
    if isinstance(recorded, Mapping):
        if not isinstance(current, Mapping):
            return [f"{where or 'summary'}: recorded a mapping, now {type(current).__name__}"]
        return [
            line
            for key, value in recorded.items()
            for line in (
                differences(value, current[key], rtol, atol, f"{where}.{key}" if where else str(key))
                if key in current
                else [f"{where}.{key}: missing now" if where else f"{key}: missing now"]
            )
        ]
    if isinstance(recorded, list):
        if not isinstance(current, list | tuple) or len(current) != len(recorded):
            return [f"{where}: recorded {len(recorded)} entries, now {current!r:.80}"]
        return [
            line
            for i, (a, b) in enumerate(zip(recorded, current, strict=True))
            for line in differences(a, b, rtol, atol, f"{where}[{i}]")
        ]
    if isinstance(recorded, bool | int | float) or recorded is None:
        if recorded is None or current is None:
            return [] if recorded is current else [f"{where}: recorded {recorded}, now {current}"]
        a, b = float(current), float(recorded)
        same = (math.isnan(a) and math.isnan(b)) or abs(a - b) <= atol + rtol * abs(b)
        return [] if same else [f"{where}: recorded {recorded:.8g}, now {current:.8g}"]
    return []
