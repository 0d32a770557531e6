"""Run the ```python blocks of a Markdown file as a reader would (the README, the docs' pages).

The blocks of one file run in order, in one namespace, in a fresh interpreter
that has not enabled float64 (each file does that itself, as a user would),
from a folder that holds the repository's ``data/`` (relative paths as in a
clone). Each block is compiled under the file's name and line numbers, so a
traceback points at the Markdown line that failed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)

RUNNER = """
import json, sys
name, blocks = json.load(sys.stdin)
namespace = {"__name__": "__main__"}
for index, (line, source) in enumerate(blocks):
    print(f"=== {name} block {index + 1}, line {line}", flush=True)
    exec(compile("\\n" * (line - 1) + source, name, "exec"), namespace)
"""


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number of the first line, source) of every ```python block of ``path``."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, match.start(1)) + 1, match.group(1)) for match in PYTHON_BLOCK.finditer(text)]


def undefined_names(path: Path) -> subprocess.CompletedProcess[str]:
    """A static check of the blocks as one script (pyflakes' undefined names,
    through ruff): it also covers lines that running them does not reach."""
    lines: list[str] = []
    for first, source in python_blocks(path):
        lines += [""] * (first - 1 - len(lines)) + source.splitlines()
    ruff = "ruff check --isolated --no-cache --select F821,F822,F823 --output-format concise"
    return subprocess.run(
        [sys.executable, "-m", *ruff.split(), "--stdin-filename", f"{path.name}.py", "-"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
    )


def run_blocks(path: Path, workdir: Path, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    """Run every ```python block of ``path`` in a fresh interpreter from ``workdir``
    (which gets a link to the repository's ``data/``), with matplotlib on Agg."""
    blocks = python_blocks(path)
    data = workdir / "data"
    if not data.exists():
        data.symlink_to(ROOT / "data")
    env = {key: value for key, value in os.environ.items() if key != "JAX_ENABLE_X64"}
    env["MPLBACKEND"] = "Agg"
    return subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps([path.name, blocks]),
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
