#!/usr/bin/env python3
"""Set up (or reuse) the local virtual environment, then run the demo, the linters or the tests.

    python3 scripts/dev.py demo [demo options]   # the main job, writes out/demo/
    python3 scripts/dev.py lint                  # ruff check, ruff format --check, mypy
    python3 scripts/dev.py test [pytest options] # lint, then the whole test suite (what CI runs)

The fast subset for the edit-test loop:

    python3 scripts/dev.py test -m "not slow and not notebook and not multiprocess"

Needs only Python >= 3.11 with pip and venv. The environment lives in .venv/
and is reinstalled when pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".mdsens-installed"

# Each runs over the whole project (ruff: every Python file and notebook that
# git does not ignore; mypy: the package, as configured in pyproject.toml).
LINTERS = {
    "ruff check": ["-m", "ruff", "check"],
    "ruff format --check": ["-m", "ruff", "format", "--check"],
    "mypy": ["-m", "mypy"],
    # No --quiet: it hides the warnings that --strict turns into failures.
    "mkdocs build --strict": ["-m", "mkdocs", "build", "--strict"],
}


os.environ.setdefault("NO_MKDOCS_2_WARNING", "1")  # Material's banner about MkDocs 2.0


def ensure_environment() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 -- this runs under whatever python3 the user has
        sys.exit(f"mdsens needs Python >= 3.11; this is {sys.version.split()[0]}.")
    if not PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    print("installing mdsens and its test tools into .venv", flush=True)
    pip = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    # pip >= 25.1 reads PEP 735 dependency groups (--group).
    subprocess.run([*pip, "--upgrade", "pip>=25.1"], check=True)
    groups = ["--group", f"{ROOT / 'pyproject.toml'}:test", "--group", f"{ROOT / 'pyproject.toml'}:docs"]
    subprocess.run([*pip, "-e", f"{ROOT}[io]", *groups], check=True)
    STAMP.write_text(wanted)


def lint() -> list[str]:
    """Run every linter (all of them, so one run shows every problem); the names of those that failed."""
    failed = []
    for name, args in LINTERS.items():
        print(f"== {name}", flush=True)
        if subprocess.run([str(PYTHON), *args]).returncode != 0:
            failed.append(name)
    return failed


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "lint", "test"):
        sys.exit(__doc__)
    ensure_environment()
    os.chdir(ROOT)
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "demo":
        sys.exit(subprocess.run([str(PYTHON), "-m", "mdsens.demo", *rest]).returncode)
    failed = lint()
    if command == "lint":
        sys.exit(1 if failed else 0)
    # Tests are compile-bound and single-threaded: one worker per core
    # (pytest-xdist), unless the caller chose otherwise. The tests run even
    # after a lint failure, so one run reports both.
    parallel = [] if any(a.startswith(("-n", "-p")) for a in rest) else ["-n", "auto"]
    print("== pytest", flush=True)
    code = subprocess.run([str(PYTHON), "-m", "pytest", *parallel, *rest]).returncode
    if failed:
        print(f"lint failed: {', '.join(failed)} (python3 scripts/dev.py lint)", flush=True)
    # pytest's own code (1 failures, 5 no tests collected, ...) comes first.
    sys.exit(code or (1 if failed else 0))


if __name__ == "__main__":
    main()
