"""The scripts are thin command lines over package functions: no script imports
another, the figure command line passes its options on and prints JSON, and the
benchmarks asked for a GPU that is missing say what they would measure."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys
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


@pytest.mark.parametrize("script", ["bench_scale.py", "bench_relax_peers.py"])
def test_benchmarks_say_what_they_would_measure_on_a_missing_gpu(script: str) -> None:
    """``--device gpu`` without a GPU: the sizes it would run, and no measurement."""
    import jax

    if any(device.platform == "gpu" for device in jax.devices()):
        pytest.skip("a GPU is present: the benchmark would run")
    command = [sys.executable, str(SCRIPTS / script), "--device", "gpu", "--sizes", "1000", "100000"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no GPU found" in done.stdout and "100000" in done.stdout
