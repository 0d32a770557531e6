"""The README's Python examples run as written, so the README cannot drift from the code.

Every ```python block, in order, in one namespace, in a fresh interpreter that
has not enabled float64 (the README does that itself, as a user would), from a
folder that holds the repository's ``data/`` (relative paths as in a clone).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)

# Each block is compiled under the README's name and line numbers, so a
# traceback points at the README line that failed.
RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
for index, (line, source) in enumerate(json.load(sys.stdin)):
    print(f"=== README.md block {index + 1}, line {line}", flush=True)
    exec(compile("\\n" * (line - 1) + source, "README.md", "exec"), namespace)
"""


def python_blocks() -> list[tuple[int, str]]:
    """(line number of the first line, source) of every ```python block of the README."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, match.start(1)) + 1, match.group(1)) for match in PYTHON_BLOCK.finditer(text)]


def test_readme_has_no_undefined_names() -> None:
    """A static check of the blocks as one script (pyflakes' undefined names,
    through ruff): it also covers lines that running them does not reach."""
    lines: list[str] = []
    for first, source in python_blocks():
        lines += [""] * (first - 1 - len(lines)) + source.splitlines()
    ruff = (
        "ruff check --isolated --no-cache --select F821,F822,F823 --output-format concise --stdin-filename README.py -"
    )
    check = subprocess.run(
        [sys.executable, "-m", *ruff.split()],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.slow
@pytest.mark.notebook
def test_readme_python_blocks_run(tmp_path: Path) -> None:
    blocks = python_blocks()
    assert blocks, "no python blocks found in the README"
    for name in ("data", "README.md"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {key: value for key, value in os.environ.items() if key != "JAX_ENABLE_X64"}
    env["MPLBACKEND"] = "Agg"
    run = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps(blocks),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert run.returncode == 0, f"{run.stdout[-4000:]}\n{run.stderr[-8000:]}"
