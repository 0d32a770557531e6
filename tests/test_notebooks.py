"""Every notebook runs top to bottom at small size (MDSENS_NOTEBOOK_SMALL=1) and
produces the numbers its figure claims. Each notebook's last cell prints its
summary as JSON; the checks below are on those numbers, which must also be
those recorded by the figure's script at small size
(``notebooks/figures/small/<module>.json``, see tests/test_figures.py).

The notebooks share one kernel (cwd: notebooks/), so that JAX, jax-md and
mdsens are imported once; each notebook starts from an empty namespace
(``%reset -f``), so it cannot use names another one defined."""

from __future__ import annotations

import json
import os
import pathlib

import nbformat
import numpy as np
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from mdsens.figures import records

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def kernel():
    manager = KernelManager(kernel_name="python3")
    manager.start_kernel(cwd=str(NOTEBOOKS), env={**os.environ, "MDSENS_NOTEBOOK_SMALL": "1"})
    yield manager
    manager.shutdown_kernel(now=True)


def execute(name: str, out: pathlib.Path, kernel: KernelManager, module: str | None = None) -> dict:
    """Run a notebook in the shared kernel, figures to ``out``; return its printed
    summary, checked against the small record of the figure ``module`` if given."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    isolate = f"%reset -f\nimport os\nos.environ['MDSENS_NOTEBOOK_OUT'] = {str(out)!r}"
    notebook.cells.insert(0, nbformat.v4.new_code_cell(isolate))
    NotebookClient(notebook, km=kernel, timeout=600).execute()
    printed = "".join(o.get("text", "") for o in notebook.cells[-1].outputs if o.output_type == "stream")
    summary = json.loads(printed)
    for figure in summary["figures"]:
        assert pathlib.Path(figure).parent == out and pathlib.Path(figure).stat().st_size > 10_000
    if module is not None:
        record = NOTEBOOKS / "figures" / "small" / f"{module}.json"
        assert records.differences(records.read(record)["summary"], summary) == [], f"{name}: numbers not as recorded"
    return summary


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_stored_without_outputs(path: pathlib.Path) -> None:
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear outputs before committing"


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_imports_the_package(path: pathlib.Path) -> None:
    code = "\n".join(cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code")
    assert "sys.path" not in code and "from mdsens.figures import" in code


@pytest.mark.notebook
def test_sensitivity_notebook(tmp_path, kernel) -> None:
    s = execute("01_sensitivity.ipynb", tmp_path, kernel, "sensitivity")
    assert s["relax"]["converged"] and s["relax"]["fmax"] <= 1e-12
    assert s["reference_max_abs"] > 0.1  # a field worth drawing
    error = s["max_abs_error"]
    # Implicit matches the dense pseudo-inverse to CG's tolerance; finite
    # differences to their O(h^2) + rounding; unrolled is far worse than implicit.
    assert error["implicit"] <= 1e-8
    assert error["finite_difference"] <= 1e-4
    assert error["unrolled"] >= 100 * error["implicit"]


@pytest.mark.notebook
def test_precision_notebook(tmp_path, kernel) -> None:
    s = execute("02_jacobian_precision.ipynb", tmp_path, kernel, "precision")
    rows = s["rows"]
    assert rows[-1]["steps"] == s["converged_steps"] and rows[-1]["implicit"] <= 1e-8
    near = [row for row in rows if row["distance"] < 1e-4]
    assert len(near) >= 3
    for row in near:
        # Theorem 1 of Blondel et al.: the implicit error is linear in |x_k - x*|,
        # and here far below the unrolled error at the same k.
        assert row["implicit"] <= 1e3 * row["distance"] + 1e-8
        assert row["implicit"] <= row["unrolled"] / 10


def harmonic_pressure(positions: np.ndarray, diameters: np.ndarray, box_sides: np.ndarray) -> float:
    """Virial pressure of harmonic discs in numpy: p = (1/(2V)) sum_pairs (1 - r/s) r / s, s = (d_i + d_j)/2."""
    dr = positions[:, None, :] - positions[None, :, :]
    dr -= box_sides * np.round(dr / box_sides)
    r = np.linalg.norm(dr, axis=-1)
    s = 0.5 * (diameters[:, None] + diameters[None, :])
    pair = np.triu(np.where(r < s, (1.0 - r / s) * r / s, 0.0), k=1)
    return float(pair.sum() / (2.0 * np.prod(box_sides)))


@pytest.mark.notebook
def test_inverse_design_notebook(tmp_path, kernel) -> None:
    s = execute("04_inverse_design.ipynb", tmp_path, kernel, "inverse_design")
    loss = [step["loss"] for step in s["history"]]
    assert loss[-1] <= 1e-3 * loss[0]
    check = s["gradient_check"]
    np.testing.assert_allclose(check["implicit"], check["finite_difference"], rtol=1e-6)
    # The final structure, checked independently: its virial pressure is the target.
    diameters = np.asarray(s["history"][-1]["diameters"])[np.asarray(s["species"])]
    pressure = harmonic_pressure(np.asarray(s["final_positions"]), diameters, np.asarray(s["box_sides"]))
    assert abs(pressure / s["target_pressure"] - 1.0) <= 1e-3


@pytest.mark.notebook
def test_parameter_study_notebook(tmp_path, kernel) -> None:
    s = execute("03_parameter_study.ipynb", tmp_path, kernel, "parameter_study")
    assert s["samples"] == 8 and s["all_relaxed"] and s["all_solved"]
    # The pressure from the study's dE*/dB (envelope theorem) against the numpy
    # virial at the stored relaxed positions.
    sample = s["first_sample"]
    box = np.asarray(sample["box"])
    assert np.allclose(box, np.diag(np.diag(box)))
    expected = harmonic_pressure(np.asarray(sample["positions"]), np.asarray(sample["diameters"]), np.diag(box))
    assert abs(sample["pressure"] / expected - 1.0) <= 1e-8
    # Compressed packings push harder: at every diameter ratio, p rises with phi.
    phi, ratio = (np.asarray(s["coordinates"][name]) for name in ("phi", "diameter ratio"))
    pressure = np.asarray(s["seed_mean"]["pressure"])
    for value in np.unique(ratio):
        members = np.flatnonzero(ratio == value)
        assert np.all(np.diff(pressure[members[np.argsort(phi[members])]]) > 0)


@pytest.mark.notebook
def test_jamming_notebook(tmp_path, kernel) -> None:
    s = execute("05_jamming_moduli.ipynb", tmp_path, kernel)
    assert s["all_states_converged"]
    # Exponents against a numpy fit of the seed means read here from the CSV.
    table = np.genfromtxt(NOTEBOOKS.parent / "data" / "jamming_scaling.csv", delimiter=",", names=True)
    delta_phi = np.unique(table["delta_phi"])
    np.testing.assert_allclose(s["delta_phi"], delta_phi)
    for quantity in ("pressure", "bulk_modulus", "shear_modulus", "excess_z"):
        means = [table[quantity][table["delta_phi"] == d].mean() for d in delta_phi]
        slope = np.polyfit(np.log(delta_phi), np.log(means), 1)[0]
        assert abs(s["exponents"][quantity]["exponent"] - slope) <= 1e-9
    # Pressure is linear in the distance to jamming (O'Hern et al. 2003).
    assert abs(s["exponents"]["pressure"]["exponent"] - 1.0) <= 0.1


@pytest.mark.notebook
def test_vacancy_notebook(tmp_path, kernel) -> None:
    """The unrelaxed Stillinger-Weber vacancy costs exactly 2 epsilon (removing an
    atom breaks four bonds of -epsilon, and the reference (N-1)/N E_perfect
    takes back the atom's share, -2 epsilon); the relaxed one's parameter
    sensitivities match re-relaxed finite differences; the written extxyz reads
    back the sensitivity field exactly."""
    s = execute("06_vacancy.ipynb", tmp_path, kernel, "vacancy")
    assert abs(s["unrelaxed_formation_energy"] / (2 * 2.1683) - 1) < 1e-8
    assert s["largest_error"] <= 1e-5 and s["readback_error"] <= 1e-12
