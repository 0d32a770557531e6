"""Studies at fixed pressure ([cell]) and with elastic moduli ([observables]).

Oracles: for each sample, a direct mdsens.cell.at_pressure + mdsens.relax +
mdsens.equilibrium_jvp on the same start, and mdsens.observables.elastic_response
at the relaxed state; the pressure measured by the virial stress against the
target; the bulk modulus against the volume's response to the target pressure
(-V dp/dV, a thermodynamic identity); ASE reading the exported box; bitwise
equality of resumed runs and of runs of other widths and schedules.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mdsens
from mdsens import cell, study, systems
from mdsens import observables as ob
from mdsens.study import config as study_config
from mdsens.study.config import parse_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
PRESSURES = (1e-3, 1e-2)
CELL_STUDY = """\
[study]
seeds = 2
chunk_size = 2

[system]
builder = "soft_sphere_packing"
n = 16
phi = 0.9
diameters = [1.0, 1.4]
neighbor_list = false

[cell]
mode = "isotropic"

[grid]
cell_pressure = [1e-3, 1e-2]

[observables]
moduli = true

[sensitivities.pressure]
pressure = 1.0

[sensitivities.small]
diameters = [1.0, 0.0]
"""


def assert_bitwise_equal(actual, expected) -> None:
    for name, variable in expected.data_vars.items():
        np.testing.assert_array_equal(actual[name].values, variable.values, err_msg=name)


@pytest.fixture(scope="module")
def cell_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("cell") / "out"
    return out, study.run(CELL_STUDY, out, progress=False)


def packing(seed: int) -> mdsens.System:
    return systems.soft_sphere_packing(16, phi=0.9, diameters=[1.0, 1.4], neighbor_list=False, seed=seed)


@functools.cache
def first_at_pressure() -> mdsens.System:
    """Seed 0 at the first pressure: its energy serves every sample (mdsens compiles per energy;
    the seeds differ in their starts only, the points in the target pressure)."""
    return cell.at_pressure(packing(0), PRESSURES[0], "isotropic")


def direct(seed: int, pressure: float):
    """The sample at its target pressure, relaxed by mdsens.relax from the sample's start."""
    own = packing(seed)
    at_p = first_at_pressure()
    at_p = at_p.replace(
        positions=jnp.concatenate([own.positions, at_p.positions[16:]]),
        params=at_p.params | {"pressure": jnp.asarray(pressure)},
    )
    return own, at_p, mdsens.relax(at_p)


# -- configuration


def test_cell_config_parses_and_round_trips():
    config = parse_config(CELL_STUDY)
    assert config.at_pressure and config.varied == ["cell_pressure"]
    assert config.point_args()[0] == {"n": 16, "phi": 0.9, "diameters": [1.0, 1.4], "neighbor_list": False}
    assert config.point_cells() == [{"mode": "isotropic", "pressure": p} for p in PRESSURES]
    assert parse_config(json.loads(config.canonical_json())) == config
    # The default stress tolerance is mdsens.cell's (config.py imports no mdsens).
    assert config.cell["stress_tolerance"] == cell.STRESS_TOLERANCE
    # Fixed-box studies keep their canonical form (and digest): no [cell], no [observables].
    fixed = parse_config("[system]\nbuilder = 'soft_sphere_packing'\nn = 8\n")
    assert "cell" not in fixed.canonical() and "observables" not in fixed.canonical()
    example = study.Plan.from_config(ROOT / "data" / "study_at_pressure.toml")
    assert example.n_points == 8 and [g.mode for g in example.groups] == ["isotropic", "full"]


SYSTEM = "[system]\nbuilder = 'soft_sphere_packing'\nn = 8\nneighbor_list = false\n"
BAD_CELL_CONFIGS = [
    (SYSTEM + "[cell]\npressure = 1e-3\n", "cell.pressure: applies to [cell] mode = 'isotropic' or 'full' only"),
    (SYSTEM + "[cell]\nmode = 'isotropic'\n", "cell.pressure: missing: the target pressure"),
    (SYSTEM + "[cell]\nmode = 'box'\npressure = 1.0\n", "cell.mode: must be one of 'fixed', 'isotropic', 'full'"),
    (SYSTEM + "[grid]\ncell_mode = ['fixed']\n", "grid.cell_mode[0]: must be one of 'isotropic', 'full'"),
    (SYSTEM + "[grid]\ncell_pressure = [1e-3]\n", "grid.cell_pressure: applies to [cell] mode"),
    (
        SYSTEM + "[[points]]\ncell_mode = 'full'\ncell_pressure = 1e-3\n[[points]]\nphi = 0.9\n",
        "cell.mode: every point relaxes its box or none",
    ),
    (SYSTEM + "cell_mode = 'full'\n", "system.cell_mode: set [cell] mode, or vary cell_mode"),
    (
        SYSTEM.replace("false", "true") + "[cell]\nmode = 'full'\npressure = 1e-3\n",
        "system.neighbor_list: a relaxing box needs an all-pairs energy",
    ),
    (
        "[system]\nbuilder = 'lennard_jones_cluster'\nn = 8\n[cell]\nmode = 'full'\npressure = 1e-3\n",
        "cell.mode: lennard_jones_cluster has no periodic box to relax",
    ),
    (
        "[system]\nbuilder = 'lennard_jones_cluster'\nn = 8\n[observables]\nmoduli = true\n",
        "observables.moduli: lennard_jones_cluster has no periodic box",
    ),
    (SYSTEM + "[sensitivities.p]\npressure = 1.0\n", "sensitivities.p.pressure: soft_sphere_packing has no parameter"),
]


@pytest.mark.parametrize("text, message", BAD_CELL_CONFIGS)
def test_bad_cell_configs_name_the_key(text, message):
    with pytest.raises(study.StudyConfigError, match=r"^bad\.toml: ") as error:
        parse_config(text, source="bad.toml")
    assert message in str(error.value)


def test_neighbor_lists_by_default_are_refused_at_planning():
    """Above 2000 particles the builder takes a neighbor list unless told: the
    plan says that mdsens.cell cannot relax such a box, naming the point."""
    text = "[system]\nbuilder = 'soft_sphere_packing'\nn = 2048\n[cell]\nmode = 'full'\npressure = 1e-3\n"
    with pytest.raises(study.StudyConfigError, match=r"system: \[cell\] mode = 'full': .*neighbor_list=False"):
        study.Plan.from_config(text)


def test_plan_groups_modes_and_shares_pressures():
    """Target pressures are parameters (one group); modes are structures (one group each)."""
    plan = study.Plan.from_config(CELL_STUDY)
    (group,) = plan.groups
    assert group.mode == "isotropic" and group.param_shapes["pressure"] == ()
    x, params = study.plan.sample_inputs(plan, group, [0, 3])
    assert x.shape == (2, 17, 2)  # 16 particles and one cell row
    np.testing.assert_array_equal(params["pressure"], PRESSURES)
    np.testing.assert_array_equal(x[:, 16], np.broadcast_to(group.at_pressure.positions[16], (2, 2)))
    both = study.Plan.from_config(CELL_STUDY.replace("[grid]", "[grid]\ncell_mode = ['isotropic', 'full']"))
    assert [g.mode for g in both.groups] == ["isotropic", "full"]


# -- results


@pytest.mark.slow
def test_samples_equal_direct_fixed_pressure_calls(cell_study):
    """A sample of each point and seed against mdsens.cell.at_pressure + relax + equilibrium_jvp on its
    own start: relaxed positions and box, enthalpy, both tolerances, the measured
    pressure equal to the target, and the sensitivities of positions, box and
    packing fraction to the target pressure and to a diameter."""
    _, ds = cell_study
    assert ds.attrs["failed_samples"] == 0
    np.testing.assert_array_equal(ds.cell_pressure.values, PRESSURES)
    assert ds.box_sensitivity.attrs["units"] == "length per unit tangent"
    assert "dH*/dtheta" in ds.energy_sensitivity.attrs["description"]
    for point, pressure in enumerate(PRESSURES):
        seed = point  # seeds 0 and 1, one at each target
        sample = ds.sel(point=point, seed=seed)
        own, at_p, result = direct(seed, pressure)
        relaxed = cell.relaxed(at_p, result)
        assert bool(relaxed.converged) and bool(sample.relax_converged)
        np.testing.assert_allclose(sample.positions.values, relaxed.positions, rtol=0, atol=1e-10)
        np.testing.assert_allclose(sample.box.values, relaxed.box, rtol=1e-11)
        assert abs(sample.relax_n_steps.item() - int(result.n_steps)) <= 0.1 * int(result.n_steps)
        assert sample.relax_stress_residual.item() <= 1e-10 and sample.relax_particle_fmax.item() <= 1e-12
        # The pressure measured from the virial stress is the target.
        positions, params = cell.fixed_box(at_p, result.positions)
        assert ob.pressure(own, positions, params) == pytest.approx(pressure, abs=1e-10)
        assert sample.pressure.item() == pytest.approx(pressure, abs=1e-10)
        volume = float(cell.volume(at_p, result.positions))
        assert sample.volume.item() == pytest.approx(volume, rel=1e-11)
        assert sample.enthalpy.item() == pytest.approx(sample.energy.item() + pressure * volume, rel=1e-12)
        assert sample.energy_grad_pressure.item() == pytest.approx(volume, rel=1e-10)  # dH*/dp = V*
        assert sample.param_pressure.item() == pressure
        assert sample.packing_fraction.item() == pytest.approx(float(cell.packing_fraction(at_p, result.positions)))
        for name, entry in (("pressure", {"pressure": 1.0}), ("small", {"diameters": jnp.array([1.0, 0.0])})):
            tangent = jax.tree.map(jnp.zeros_like, at_p.params) | entry
            joint, djoint, info = mdsens.equilibrium_jvp(at_p, at_p.params, tangent)
            assert bool(info.solve.converged)

            def state(j, q, at_p=at_p):
                return (*cell.split(at_p, j, q), cell.packing_fraction(at_p, j, q))

            _, (dx, dbox, dphi) = jax.jvp(state, (joint, at_p.params), (djoint, tangent))
            got = sample.sel(sensitivity=name)
            scale = float(np.abs(dx).max())
            np.testing.assert_allclose(got.position_sensitivity.values, dx, rtol=0, atol=1e-7 * scale)
            np.testing.assert_allclose(got.box_sensitivity.values, dbox, rtol=1e-7, atol=1e-9 * scale)
            assert got.packing_fraction_sensitivity.item() == pytest.approx(float(dphi), rel=1e-7)
            assert bool(got.solve_converged)


def test_measured_pressure_is_the_target(cell_study):
    """The virial pressure of every relaxed state is its point's target, within the
    stress tolerance; the box and packing fraction move with the target."""
    _, ds = cell_study
    assert ds.relax_converged.values.all() and (ds.relax_stress_residual.values <= 1e-10).all()
    np.testing.assert_allclose(ds.pressure.values, ds.param_pressure.values, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(ds.param_pressure.values, np.repeat(np.asarray(PRESSURES)[:, None], 2, axis=1))
    assert (ds.packing_fraction.values[1] > ds.packing_fraction.values[0]).all()
    assert (ds.packing_fraction_sensitivity.sel(sensitivity="pressure").values > 0).all()


def test_moduli_equal_a_direct_call_and_the_bulk_modulus_identity(cell_study):
    """The moduli of a sample against mdsens.observables.elastic_response at its
    relaxed state; and at fixed pressure (isotropic cell) the bulk modulus with
    its pre-stress terms is -V dp/dV, V's response to the target pressure
    (from the recorded box sensitivity: dV = V tr(box^-1 d box))."""
    _, ds = cell_study
    # tests/conftest.py keeps the compilation cache of study.run out of ~/.cache.
    assert jax.config.jax_compilation_cache_dir == os.environ["MDSENS_CACHE_DIR"]
    assert ds.moduli_converged.values.all()
    assert list(ds.voigt.values) == ["xx", "yy", "xy"]
    sample = ds.sel(point=1, seed=0)
    own, at_p, result = direct(0, PRESSURES[1])
    response = ob.elastic_response(own, *cell.fixed_box(at_p, result.positions))
    np.testing.assert_allclose(sample.stiffness.values, response.voigt(), rtol=1e-7, atol=1e-9)
    assert sample.bulk_modulus.item() == pytest.approx(float(response.bulk_modulus), rel=1e-7)
    assert sample.shear_modulus.item() == pytest.approx(float(response.shear_modulus), rel=1e-7)
    box, dbox = ds.box.values, ds.box_sensitivity.sel(sensitivity="pressure").values
    dlogv_dp = np.einsum("psij,psji->ps", np.linalg.inv(box), dbox)
    np.testing.assert_allclose(ds.bulk_modulus.values, -1.0 / dlogv_dp, rtol=1e-6)


@pytest.mark.slow
def test_resume_and_export_at_fixed_pressure(cell_study, tmp_path):
    """A study folder with a chunk missing resumes bit for bit; an exported sample
    carries the relaxed box (read back by ASE) and the relaxed positions."""
    import shutil

    import ase.io

    out, ds = cell_study
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "results.nc").unlink()
    (copy / "chunks" / "chunk-00001.nc").unlink()
    resumed = study.run(CELL_STUDY, copy, progress=False)
    assert resumed.attrs["run_chunks_computed"] == 1
    assert_bitwise_equal(resumed, ds)
    path = tmp_path / "sample.extxyz"
    study.export(copy, point=1, seed=1, path=path)
    atoms = ase.io.read(path)
    sample = ds.sel(point=1, seed=1)
    np.testing.assert_allclose(atoms.cell.array[:2, :2], sample.box.values.T, rtol=1e-14)
    np.testing.assert_allclose(atoms.positions[:, :2], sample.positions.values, rtol=1e-14)
    np.testing.assert_allclose(atoms.arrays["dx_pressure"][:, :2], sample.position_sensitivity.values[0], rtol=1e-14)


@pytest.mark.slow
def test_widths_schedules_and_modes(cell_study):
    """One slot in flight and whole batches give the reference's numbers bit for
    bit; with the mode as a grid key, the full cell's samples have the stress
    tensor -p I and the isotropic ones are those of the reference."""
    _, ds = cell_study
    vmap = CELL_STUDY.replace("chunk_size = 2", 'chunk_size = 2\nschedule = "vmap"')
    for result in (study.run(CELL_STUDY, width=1, progress=False), study.run(vmap, width=3, progress=False)):
        assert_bitwise_equal(result, ds)
    modes = CELL_STUDY.replace("[grid]", "[grid]\ncell_mode = ['isotropic', 'full']").replace(
        "[observables]\nmoduli = true\n", ""
    )
    both = study.run(modes, progress=False)
    assert both.attrs["failed_samples"] == 0
    full = both.where(both.cell_mode == "full", drop=True)
    stress, target = full.stress.values, full.cell_pressure.values[:, None, None, None]
    np.testing.assert_allclose(stress, np.broadcast_to(-target * np.eye(2), stress.shape), rtol=0, atol=1e-10)
    isotropic = both.where(both.cell_mode == "isotropic", drop=True)
    np.testing.assert_array_equal(isotropic.box.values, ds.box.values)


@pytest.mark.slow
def test_moduli_of_a_fixed_box_study():
    """[observables] moduli = true at fixed box, against a direct call."""
    text = (
        "[system]\nbuilder = 'soft_sphere_packing'\nn = 16\nphi = 0.9\ndiameters = [1.0, 1.4]\n"
        "[observables]\nmoduli = true\n"
    )
    ds = study.run(text, progress=False)
    fixed = systems.soft_sphere_packing(16, phi=0.9, diameters=[1.0, 1.4], seed=0)
    response = ob.elastic_response(fixed, ds.positions.values[0, 0], fixed.params)
    np.testing.assert_allclose(ds.stiffness.values[0, 0], response.voigt(), rtol=1e-7, atol=1e-9)
    assert ds.bulk_modulus.values[0, 0] == pytest.approx(float(response.bulk_modulus), rel=1e-7)
    assert ds.shear_modulus.values[0, 0] == pytest.approx(float(response.shear_modulus), rel=1e-7)
    assert "box" not in ds and study_config.DEFAULTS["observables"] == {"moduli": False}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_devices_equal_one(cell_study, tmp_path):
    """The fixed-pressure study sharded over two CPU devices (a subprocess), one
    slot each: the same relaxations bit for bit, the rest to rounding."""
    import subprocess
    import sys

    import xarray as xr

    _, ds = cell_study
    saved = tmp_path / "two_devices.nc"
    code = (
        "import jax\n"
        "jax.config.update('jax_enable_x64', True)\n"
        "from mdsens import study\n"
        f"ds = study.run({CELL_STUDY!r}, width=1, progress=False)\n"
        "assert ds.attrs['run_devices'] == 2, ds.attrs\n"
        f"ds.to_netcdf({str(saved)!r}, engine='h5netcdf')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    with xr.open_dataset(saved, engine="h5netcdf") as two:
        two = two.load()
    for name, variable in ds.data_vars.items():
        if name == "positions" or not np.issubdtype(variable.dtype, np.floating):
            np.testing.assert_array_equal(two[name].values, variable.values, err_msg=name)
        else:
            np.testing.assert_allclose(two[name].values, variable.values, rtol=1e-10, atol=1e-14, err_msg=name)
