#!/usr/bin/env python3
"""Set up (or reuse) the local virtual environment, then run the demo or the tests.

    python3 scripts/dev.py demo [demo options]   # the main job, writes out/demo/
    python3 scripts/dev.py test [pytest options] # the whole test suite

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


def ensure_environment() -> None:
    if sys.version_info < (3, 11):
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
    subprocess.run(pip + ["--upgrade", "pip>=25.1"], check=True)
    subprocess.run(pip + ["-e", str(ROOT), "--group", f"{ROOT / 'pyproject.toml'}:test"], check=True)
    STAMP.write_text(wanted)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test"):
        sys.exit(__doc__)
    ensure_environment()
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "demo":
        args = [str(PYTHON), "-m", "mdsens.demo", *rest]
    else:
        # Tests are compile-bound and single-threaded: one worker per core
        # (pytest-xdist), unless the caller chose otherwise.
        parallel = [] if any(a.startswith(("-n", "-p")) for a in rest) else ["-n", "auto"]
        args = [str(PYTHON), "-m", "pytest", *parallel, *rest]
    os.chdir(ROOT)
    sys.exit(subprocess.run(args).returncode)


if __name__ == "__main__":
    main()
