"""The package as a user installs it: an sdist built from the files git tracks and
a wheel built from that sdist (``python -m build``, isolated: the backend comes
from pyproject.toml's build-system; building the wheel from the sdist is what
``pip install mdsens-*.tar.gz`` does), with every module, ``py.typed`` and the
version, installed without dependencies into a fresh folder (the dependencies
are this environment's) and imported from outside the repository, with the
``mdsens`` command."""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import mdsens

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "mdsens").rglob("*.py"))

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist, from a copy of the files git tracks (or would: untracked files
    that are not ignored) as a clean clone has them, and the wheel built from it."""
    pytest.importorskip("build", reason="python -m build: the test dependency group's build")
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git repository: the sdist is built from the files git tracks")
    folder = tmp_path_factory.mktemp("packaging")
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.split("\0")  # fmt: skip
    source = folder / "source"
    for name in filter(None, files):
        if (ROOT / name).is_file():  # a tracked file deleted in the working tree is not part of the build
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(folder / "dist"), str(source)], check=True, capture_output=True
    )
    (sdist,) = (folder / "dist").glob("mdsens-*.tar.gz")
    (wheel,) = (folder / "dist").glob("mdsens-*.whl")
    return {"sdist": sdist, "wheel": wheel, "folder": folder}


def test_wheel_contents(dist: dict[str, Path]) -> None:
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = set(wheel.namelist())
        (metadata_name,) = (name for name in names if name.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(wheel.read(metadata_name).decode())
        (entry_points_name,) = (name for name in names if name.endswith(".dist-info/entry_points.txt"))
        entry_points = wheel.read(entry_points_name).decode()
    assert set(MODULES) <= names, f"modules missing from the wheel: {sorted(set(MODULES) - names)}"
    assert "mdsens/py.typed" in names
    assert not [name for name in names if name.split("/")[0] in ("tests", "notebooks", "scripts", "data", "docs")]
    assert metadata["Name"] == "mdsens" and metadata["Version"] == mdsens.__version__
    assert "mdsens = mdsens.cli:main" in entry_points


def test_sdist_contents(dist: dict[str, Path]) -> None:
    with tarfile.open(dist["sdist"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
        (pkg_info,) = (
            member for member in sdist.getmembers() if member.name.count("/") == 1 and "PKG-INFO" in member.name
        )
        metadata = email.parser.Parser().parsestr(sdist.extractfile(pkg_info).read().decode())  # type: ignore[union-attr]
    assert set(MODULES) | {"mdsens/py.typed", "pyproject.toml", "README.md"} <= names
    assert metadata["Version"] == mdsens.__version__


def test_installs_and_runs(dist: dict[str, Path]) -> None:
    """pip installs the wheel alone into a fresh folder; from outside the
    repository, Python imports that copy (not the working tree's) and the
    ``mdsens`` command it installed answers ``--help`` and ``--version``."""
    target = dist["folder"] / "installed"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "--target", str(target), str(dist["wheel"])], check=True, capture_output=True)
    elsewhere = dist["folder"] / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    # The dependencies come from this environment (its site-packages); mdsens from the target only.
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONNOUSERSITE": "1"}
    code = "import mdsens, mdsens.figures, mdsens.study; print(mdsens.__file__); print(mdsens.__version__)"
    printed = subprocess.run(
        [sys.executable, "-c", code], cwd=elsewhere, env=env, check=True, capture_output=True, text=True
    ).stdout.split()
    assert Path(printed[0]).resolve().is_relative_to(target.resolve()) and printed[1] == mdsens.__version__
    command = str(target / "bin" / "mdsens")
    helped = subprocess.run([command, "--help"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: mdsens") and "study" in helped.stdout and "demo" in helped.stdout
    version = subprocess.run([command, "--version"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert version.returncode == 0 and mdsens.__version__ in version.stdout, version.stderr
