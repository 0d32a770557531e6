"""No committed figure is older than the code that draws it.

Each figure script (``scripts/*.py`` over :func:`mdsens.figures.command_line.main`)
writes beside its PNG files a record (:mod:`mdsens.figures.records`): the numbers
it printed and the digest of the code that drew them. The committed records are
``notebooks/figures/<module>.json`` (full size, the committed figures) and
``notebooks/figures/small/<module>.json`` (the same script at ``--size small``).
Here: every committed PNG has a full-size record; every record's digest is the
current code's (change a figure module or :mod:`mdsens.plotting` and this fails
until the figures are drawn again); the cheap figures (jamming against
phi and against pressure: fits of committed data) are computed again at full
size and their numbers compared. The
other figures' numbers are computed again at small size by
``tests/test_notebooks.py``, which runs each notebook and compares its summary
with the small record.
"""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest

from mdsens.figures import jamming_pressure, jamming_scaling, records, sensitivity

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIGURES = ROOT / "notebooks" / "figures"
FULL = sorted(FIGURES.glob("*.json"))
SMALL = sorted((FIGURES / "small").glob("*.json"))


def script_of(module: str) -> str:
    """The script whose command line draws ``module``'s figures."""
    name = module.rsplit(".", 1)[-1]
    (script,) = (
        path
        for path in sorted((ROOT / "scripts").glob("*.py"))
        if re.search(rf"command_line\.main\(\s*{name}\b", path.read_text())
    )
    return script.relative_to(ROOT).as_posix()


def test_every_committed_figure_has_a_record() -> None:
    pngs = {path.name for path in FIGURES.glob("*.png")}
    recorded = {name for path in FULL for name in records.read(path)["summary"]["figures"]}
    assert pngs == recorded, (
        f"without a record: {sorted(pngs - recorded)}; recorded, missing: {sorted(recorded - pngs)}"
    )
    assert [records.read(path)["size"] for path in FULL] == ["full"] * len(FULL)
    assert [records.read(path)["size"] for path in SMALL] == ["small"] * len(SMALL)
    # Every figure but the cheap jamming ones (computed again here at full size) has a small record.
    cheap = {"jamming_scaling.json", "jamming_pressure.json"}
    assert {path.name for path in FULL} - {path.name for path in SMALL} == cheap


@pytest.mark.parametrize("path", FULL + SMALL, ids=lambda path: path.relative_to(FIGURES).as_posix())
def test_record_is_of_the_current_code(path: pathlib.Path) -> None:
    record = records.read(path)
    module = importlib.import_module(record["module"])
    folder = path.parent.relative_to(ROOT).as_posix()
    command = f"python {script_of(record['module'])} --size {record['size']} --out {folder}"
    if record["size"] == "small":  # only the record: the small figures are not committed
        command = (
            f"python {script_of(record['module'])} --size small --out out/figures-small --record {folder}/{path.name}"
        )
    sources = ", ".join(p.name for p in records.code_files(module))
    assert record["code_digest"] == records.code_digest(module), f"{path.name} predates {sources}: run {command}"


def test_jamming_figure_computed_again(tmp_path: pathlib.Path) -> None:
    summary = jamming_scaling.run("full", tmp_path, data=ROOT / "data" / "jamming_scaling.csv")
    assert records.differences(records.read(FIGURES / "jamming_scaling.json")["summary"], summary) == []


def test_jamming_pressure_figure_computed_again(tmp_path: pathlib.Path) -> None:
    summary = jamming_pressure.run("full", tmp_path, data=ROOT / "data" / "jamming_pressure.json")
    assert records.differences(records.read(FIGURES / "jamming_pressure.json")["summary"], summary) == []


@pytest.mark.slow
def test_jamming_pressure_small_computation(tmp_path: pathlib.Path) -> None:
    """The figure's protocol at small size (N = 32, 2 seeds) from scratch: every state at
    its target pressure, and the exponents that small packings resolve (phi - phi_J ~ p,
    B ~ const); z - z_iso and G need larger N (the committed figure)."""
    summary = jamming_pressure.run("small", tmp_path, data=tmp_path / "rows.json", compute_data=True)
    assert summary["all_states_converged"] and summary["all_moduli_ok"]
    assert summary["largest_pressure_residual"] <= 1e-10
    assert summary["exponents"]["excess_phi"]["exponent"] == pytest.approx(1.0, abs=0.1)
    assert summary["exponents"]["bulk_modulus"]["exponent"] == pytest.approx(0.0, abs=0.1)


def test_code_files_follow_imports() -> None:
    names = {path.name for path in records.code_files(sensitivity)}
    assert names == {"sensitivity.py", "packing.py", "plotting.py"}


def test_differences() -> None:
    recorded = {"a": [1.0, 2.0], "b": {"c": True, "n": 950}, "path": "x.png", "nan": float("nan"), "gone": 1}
    current = {"a": [1.0, 2.0 + 1e-5], "b": {"c": False, "n": 950}, "path": "y.png", "nan": float("nan"), "new": 2}
    found = records.differences(recorded, current)
    assert [line.split(":")[0] for line in found] == ["a[1]", "b.c", "gone"]
    assert re.fullmatch(r"a\[1\]: recorded 2, now 2\.00001", found[0])
    assert records.differences(recorded, recorded) == []
    assert records.differences({"a": [1.0]}, {"a": [1.0, 2.0]}) == ["a: recorded 1 entries, now [1.0, 2.0]"]
