"""The scripts are thin command lines over package functions: no script imports
another, and the figure command line passes its options on and prints JSON."""

from __future__ import annotations

import ast
import json
import pathlib
import types

import pytest

from mdsens.figures import command_line

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"


def imported_modules(path: pathlib.Path) -> set[str]:
    """Top-level names of every module that ``path`` imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted(SCRIPTS.glob("*.py")), ids=lambda p: p.name)
def test_no_script_imports_another(path: pathlib.Path) -> None:
    scripts = {other.stem for other in SCRIPTS.glob("*.py")}
    assert not imported_modules(path) & scripts


def test_figure_command_line(tmp_path, capsys) -> None:
    calls = []

    def run(size: str, out: str, data: str) -> dict:
        calls.append((size, out, data))
        return {"size": size, "data": data, "big": [0.0] * 3}

    figure = types.ModuleType("figure", "Figure: a test.\n\nDetails.")
    figure.SIZES = {"small": {}, "full": {}}
    figure.run = run
    options = {"--data": {"default": "default.csv"}}
    command_line.main(figure, options, not_printed=("big",), argv=["--size", "small", "--out", str(tmp_path)])
    assert calls == [("small", str(tmp_path), "default.csv")]
    assert json.loads(capsys.readouterr().out) == {"size": "small", "data": "default.csv"}
    with pytest.raises(SystemExit):
        command_line.main(figure, options, argv=["--size", "huge"])
