"""mdsens.study: batched, sharded, resumable studies.

Oracles: direct calls of mdsens.relax, mdsens.equilibrium_jvp and
mdsens.energy_sensitivity for each sample; bitwise equality with a run on one
device (this process) for runs of other widths and schedules, for runs
sharded over two and four devices or two processes (subprocesses), and for
resumed runs; xarray reading the files itself.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

import mdsens
from mdsens import study, systems
from mdsens.study import config as study_config
from mdsens.study import plan as study_plan
from mdsens.study import store
from mdsens.study.config import BUILDER_PARAMS, BUILDERS, parse_config

# 2 x 2 points x 4 seeds = 16 samples in 4 chunks of 4: one member per device
# on four devices, and a kill after the first chunk leaves three to resume.
CONFIG = """\
[study]
description = "test study"
seeds = 4
chunk_size = 4

[system]
builder = "soft_sphere_packing"
n = 16
diameters = [1.0, 1.4]

[grid]
phi = [0.85, 0.95]
diameters = [[1.0, 1.2], [1.0, 1.4]]

[sensitivities.small]
diameters = [1.0, 0.0]

[sensitivities.compress]
box = [[-1.0, 0.0], [0.0, -1.0]]
"""
N_CHUNKS = 4
N_SAMPLES = 16
ROOT = pathlib.Path(__file__).resolve().parent.parent


def assert_bitwise_equal(actual, expected) -> None:
    for name, variable in expected.data_vars.items():
        np.testing.assert_array_equal(actual[name].values, variable.values, err_msg=name)


# Computed from the relaxed state by a program that XLA compiles a little
# differently when it is partitioned over several devices: the last bit may
# differ (one ulp of one pressure in 16 was seen).
LAST_BIT = ("pressure", "stress", "contact_number")


def assert_equal_across_devices(actual, expected) -> None:
    """Bitwise equal but for :data:`LAST_BIT`, equal to rounding."""
    for name, variable in expected.data_vars.items():
        if name in LAST_BIT:
            np.testing.assert_allclose(actual[name].values, variable.values, rtol=1e-14, atol=0, err_msg=name)
        else:
            np.testing.assert_array_equal(actual[name].values, variable.values, err_msg=name)


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("config") / "study.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, config_path):
    """The study run in this process, on one device, into a folder."""
    out = tmp_path_factory.mktemp("reference") / "out"
    return out, study.run(config_path, out)


# -- configuration


@pytest.mark.multiprocess
def test_config_module_imports_no_jax():
    """mdsens.study.config reads and checks a configuration with the standard
    library alone: loaded from its file, outside the package (whose
    ``__init__`` imports JAX), it imports neither JAX, numpy nor mdsens."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('study_config', {study_config.__file__!r})\n"
        "module = sys.modules['study_config'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        f"config = module.load_config({str(ROOT / 'data' / 'study_example.toml')!r})\n"
        "print(len(config.point_args()), sorted(m for m in ('jax', 'numpy', 'mdsens') if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["32", "[]"]


def test_option_tables_match_the_config_choices():
    """Every [relax] method and [solve] solver name of the configuration has its value."""
    assert set(study_plan.MINIMISERS) == set(study_config.RELAX_METHODS)
    assert set(study_plan.SOLVERS) == set(study_config.SOLVERS)
    plan = study.Plan.from_config(
        SYSTEM + "[relax]\nmethod = 'gradient_descent'\nfmax = 1e-10\n"
        "[solve]\nsolver = 'dense'\nrcond = 1e-9\nzero_modes = 'none'\n"
    )
    assert plan.groups[0].minimiser == mdsens.GradientDescent(fmax=1e-10, dt_max=plan.groups[0].system.dt_max)
    assert plan.adjoint == mdsens.Implicit(solver=mdsens.Dense(rcond=1e-9), zero_modes=None)
    assert study.Plan.from_config(SYSTEM).adjoint == mdsens.Implicit()  # the defaults of both


def test_schema_matches_the_builders():
    built = {
        "soft_sphere_packing": systems.soft_sphere_packing(8),
        "lennard_jones": systems.lennard_jones(8, density=0.05),
        "kob_andersen": systems.kob_andersen(8, density=0.05),
        "morse": systems.morse(8, density=0.1),
        "lennard_jones_cluster": systems.lennard_jones_cluster(8),
    }
    assert set(built) == set(BUILDERS)
    for name, kinds in BUILDERS.items():
        signature = set(inspect.signature(getattr(systems, name)).parameters) - {"seed"}
        # neighbor_list: passed on to the builders that take it.
        assert set(kinds) - {"neighbor_list"} == signature - {"neighbor_list"}, name
        assert set(BUILDER_PARAMS[name]) == set(built[name].params), name


SYSTEM = "[system]\nbuilder = 'soft_sphere_packing'\nn = 8\n"
BAD_CONFIGS = [
    ("[sytem]\nbuilder = 'soft_sphere_packing'\nn = 8\n", "sytem: unknown key (did you mean 'system'?)"),
    (SYSTEM + "phii = 0.9\n", "system.phii: unknown key (did you mean 'phi'?)"),
    (SYSTEM + "[relax]\nfmaxx = 1e-9\n", "relax.fmaxx: unknown key (did you mean 'fmax'?)"),
    (
        SYSTEM + "[sensitivities.d]\nsigma = 1.0\n",
        "sensitivities.d.sigma: soft_sphere_packing has no parameter 'sigma'",
    ),
    ("[system]\nbuilder = 'soft_sphere_packing'\nn = 'twelve'\n", "system.n: expected an integer, got a string"),
    ("[system]\nbuilder = 'soft_sphere_packing'\nn = 8.0\n", "system.n: expected an integer, got a number"),
    (SYSTEM + "[grid]\nphi = [0.9, 'high']\n", "grid.phi[1]: expected a number, got a string"),
    (SYSTEM + "[grid]\nphi = 0.9\n", "grid.phi: expected a list of values"),
    ("[study]\nseeds = 'many'\n" + SYSTEM, "study.seeds: expected a number of seeds"),
    ("[study]\nchunk_size = true\n" + SYSTEM, "study.chunk_size: expected an integer, got a boolean"),
    ("[study]\nchunk_size = 0\n" + SYSTEM, "study.chunk_size: must be an integer >= 1"),
    (SYSTEM + "[relax]\nfmax = -1e-9\n", "relax.fmax: must be positive"),
    (SYSTEM + "[solve]\nsolver = 'gmres'\n", "solve.solver: must be one of 'cg', 'minres', 'bicgstab', 'dense'"),
    (SYSTEM + "[sensitivities.d]\ndiameters = 'one'\n", "sensitivities.d.diameters: expected a number or an array"),
    (SYSTEM + "[grid]\nphi = []\n", "grid.phi: is an empty list"),
    (SYSTEM + "[grid]\n", "grid: is empty"),
    ("points = []\n" + SYSTEM, "points: is empty"),
    ("[study]\nseeds = []\n" + SYSTEM, "study.seeds: expected a number of seeds or a non-empty list"),
    (SYSTEM + "[grid]\nseed = [1, 2]\n", "grid.seed: seeds are set by study.seeds"),
    (SYSTEM + "[grid]\nphi = [0.9]\n[[points]]\nphi = 0.8\n", "grid: give either [grid] or [[points]]"),
    ("[system]\nbuilder = 'hard_spheres'\nn = 8\n", "system.builder: unknown builder 'hard_spheres'"),
    ("[system]\nbuilder = 'soft_sphere_packing'\n", "system.n: missing"),
    ("[system\nbuilder = 1\n", "not valid TOML"),
]


@pytest.mark.parametrize("text, message", BAD_CONFIGS)
def test_bad_configs_name_the_key(text, message):
    with pytest.raises(study.StudyConfigError) as error:
        parse_config(text, source="bad.toml")
    assert str(error.value).startswith("bad.toml: ")
    assert message in str(error.value)


def test_canonical_config_parses_back_to_an_equal_one():
    config = parse_config(CONFIG)
    again = parse_config(json.loads(config.canonical_json()))
    assert again == config and again.digest() == config.digest()
    assert len(config.point_args()) == 4 and config.seeds == (0, 1, 2, 3)
    assert config.point_args()[1] == {"n": 16, "diameters": [1.0, 1.4], "phi": 0.85}
    assert config.relax == {"method": "fire", "fmax": 1e-12, "max_steps": 100_000}  # defaults filled in


def test_builder_and_tangent_errors_name_the_point_and_key(tmp_path):
    bad_point = CONFIG.replace("phi = [0.85, 0.95]", "phi = [0.85, -0.5]")
    with pytest.raises(
        study.StudyConfigError,
        match=r"grid point 2 \(phi=-0.5, diameters=\[1.0, 1.2\]\).*phi must be finite and positive",
    ):
        study.run(bad_point, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing left behind
    bad_tangent = CONFIG.replace("diameters = [1.0, 0.0]", "diameters = [1.0, 0.0, 0.0]")
    with pytest.raises(study.StudyConfigError, match=r"sensitivities.small.diameters: shape \(3,\) does not fit"):
        study.Plan.from_config(bad_tangent)
    # Limits of the option values themselves, named by section.
    with pytest.raises(study.StudyConfigError, match=r"bad.toml: relax: FIRE: max_steps must be an integer in"):
        study.Plan.from_config(parse_config(SYSTEM + "[relax]\nmax_steps = 3000000000\n", source="bad.toml"))


def test_unusable_output_folders_are_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(study.StudyError, match=f"output folder {blocker / 'out'}: cannot write there"):
        study.run(CONFIG, blocker / "out")
    with pytest.raises(study.StudyError, match=f"output folder {blocker}: exists and is not a folder"):
        study.run(CONFIG, blocker)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(study.StudyError, match=f"output folder {locked / 'out'}: cannot write there"):
            study.run(CONFIG, locked / "out")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(study.StudyError, match=f"output folder {foreign}: not empty and holds no study"):
        study.run(CONFIG, foreign)


# -- results


@pytest.mark.slow
def test_samples_equal_single_calls(reference):
    """Every sample and sensitivity against mdsens.equilibrium_jvp (and the
    envelope theorem, mdsens.energy_sensitivity) on that sample's own system."""
    _, ds = reference
    config = parse_config(CONFIG)
    args = config.point_args()
    # One system's energy for all samples (mdsens compiles per energy); each
    # sample's own energy computes the same (checked below).
    first = systems.soft_sphere_packing(**args[0], seed=0)
    envelope = jax.jit(mdsens.energy_sensitivity, static_argnums=0)
    tangents = {"small": {"diameters": jnp.array([1.0, 0.0])}, "compress": {"box": -jnp.eye(2)}}
    for point in range(4):
        for seed_index, seed in enumerate(config.seeds):
            s = systems.soft_sphere_packing(**args[point], seed=seed)
            assert float(first.energy(s.positions, s.params)) == float(s.energy(s.positions, s.params))
            sample = ds.isel(point=point, seed=seed_index)
            grads = envelope(first, sample.positions.values, s.params)
            for name, value in grads.items():
                np.testing.assert_allclose(sample[f"energy_grad_{name}"].values, value, rtol=1e-8, atol=1e-14)
                np.testing.assert_array_equal(sample[f"param_{name}"].values, s.params[name])
            for name, entry in tangents.items():
                tangent = {**jax.tree.map(jnp.zeros_like, s.params), **entry}
                x, dx, info = mdsens.equilibrium_jvp(first, s.params, tangent, positions=s.positions)
                np.testing.assert_allclose(sample.positions.values, x, rtol=0, atol=1e-10)
                np.testing.assert_allclose(sample.energy.item(), float(info.relax.energy), rtol=1e-9, atol=1e-16)
                assert abs(sample.relax_n_steps.item() - int(info.relax.n_steps)) <= 0.1 * int(info.relax.n_steps)
                assert bool(sample.relax_converged) and sample.relax_status.item() == 0
                assert sample.relax_fmax.item() <= 1e-12
                got = sample.sel(sensitivity=name)
                np.testing.assert_allclose(got.position_sensitivity.values, dx, rtol=1e-6, atol=1e-8 * np.abs(dx).max())
                assert bool(got.solve_converged) and bool(info.solve.converged) and got.solve_status.item() == 0
                assert got.solve_residual.item() <= 1e-10
                assert abs(got.solve_iterations.item() - int(info.solve.iterations)) <= 3
                expected = sum(float(jnp.vdot(tangent[k], grads[k])) for k in grads)
                np.testing.assert_allclose(got.energy_sensitivity.item(), expected, rtol=1e-8)
                # Translations are projected out: the sensitivity has no mean.
                np.testing.assert_allclose(got.position_sensitivity.values.mean(axis=0), 0, atol=1e-9)
            # The two translations, and two per rattler.
            assert sample.n_zero_modes.item() >= 2 and sample.n_zero_modes.item() % 2 == 0


def test_physics_of_every_sample(reference):
    """Pressure from the virial stress against the envelope theorem's box
    gradient, ``p = -sum_ij (dE*/dB_ij) B_ij / (dim V)`` (the box scaled
    uniformly: an independent route); the number density and size ratio from
    the parameters; contact numbers of rattler-free packings at least isostatic;
    and "pressure against phi with seed spread" in one line of xarray."""
    _, ds = reference
    box, grad_box = ds.param_box.values, ds.energy_grad_box.values
    volume = np.linalg.det(box)
    envelope = -np.einsum("psij,psij->ps", grad_box, box) / (2 * volume)
    np.testing.assert_allclose(ds.pressure.values, envelope, rtol=1e-9)
    np.testing.assert_allclose(ds.pressure.values, -np.trace(ds.stress.values, axis1=-2, axis2=-1) / 2, rtol=1e-12)
    np.testing.assert_allclose(ds.number_density.values, 16 / volume, rtol=1e-12)
    d = ds.param_diameters.values
    np.testing.assert_allclose(ds.size_ratio.values, d.max(axis=-1) / d.min(axis=-1), rtol=1e-12)
    assert np.all(ds.pressure.values > 0)  # every grid point is above jamming at N = 16
    # Jammed (p > 0) periodic packings are at least isostatic: N_c >= dim (N' - 1) among the N' non-rattlers.
    assert np.all((ds.n_rattlers.values >= 0) & (ds.n_rattlers.values < 16))
    backbone = 16 - ds.n_rattlers.values
    assert np.all(ds.contact_number.values >= 2 * 2 * (backbone - 1) / backbone - 1e-12)
    spread = ds.pressure.groupby("phi").mean(...), ds.pressure.groupby("phi").std(...)
    assert spread[0].sizes["phi"] == 2 and np.all(spread[1].values >= 0)
    for name in ("pressure", "stress", "contact_number", "n_rattlers", "number_density", "size_ratio"):
        assert ds[name].attrs["description"]


@pytest.mark.slow
def test_results_file_is_a_labeled_dataset(reference):
    out, ds = reference
    with xr.open_dataset(out / "results.nc", engine="h5netcdf") as on_disk:
        on_disk = on_disk.load()
    assert dict(on_disk.sizes) == {
        "point": 4,
        "seed": 4,
        "particle": 16,
        "spatial": 2,
        "spatial_b": 2,
        "species": 2,
        "sensitivity": 2,
    }
    assert on_disk.positions.dims == ("point", "seed", "particle", "spatial")
    assert on_disk.position_sensitivity.dims == ("point", "seed", "sensitivity", "particle", "spatial")
    assert on_disk.energy_grad_box.dims == ("point", "seed", "spatial", "spatial_b")
    assert on_disk.solve_iterations.dims == ("point", "seed", "sensitivity")
    for name in (
        "relax_converged",
        "relax_fmax",
        "relax_n_steps",
        "relax_status",
        "solve_residual",
        "solve_iterations",
        "solve_converged",
        "solve_status",
        "energy",
        "energy_sensitivity",
        "n_zero_modes",
    ):
        assert name in on_disk and on_disk[name].attrs["description"], name
    # Status codes are named by mdsens.Status, every one of them.
    for name in ("relax_status", "solve_status"):
        assert on_disk[name].attrs["flag_meanings"].split() == [s.name for s in mdsens.Status]
        np.testing.assert_array_equal(on_disk[name].attrs["flag_values"], [s.value for s in mdsens.Status])
    assert list(on_disk.sensitivity.values) == ["small", "compress"] and list(on_disk.seed.values) == [0, 1, 2, 3]
    assert list(on_disk.spatial.values) == ["x", "y"]
    np.testing.assert_array_equal(on_disk.phi.values, [0.85, 0.85, 0.95, 0.95])
    np.testing.assert_array_equal(on_disk.diameters.values, [[1.0, 1.2], [1.0, 1.4]] * 2)
    # Selection by label: phi = 0.95 with the 1 : 1.4 mixture is point 3.
    np.testing.assert_array_equal(on_disk.where(on_disk.phi == 0.95, drop=True).point, [2, 3])
    assert on_disk.done.values.all() and on_disk.attrs["complete"] == 1
    assert parse_config(json.loads(on_disk.attrs["config"])) == parse_config(CONFIG)
    assert on_disk.attrs["config_source"] == CONFIG
    assert (out / "study.toml").read_text() == CONFIG
    assert_bitwise_equal(on_disk, ds)
    assert sorted(p.name for p in (out / "chunks").iterdir()) == [f"chunk-{i:05d}.nc" for i in range(N_CHUNKS)]


@pytest.mark.slow
def test_changed_config_refuses_to_resume(reference):
    out, _ = reference
    changed = CONFIG.replace("[study]", "[relax]\nfmax = 1e-10\n\n[study]").replace("seeds = 4", "seeds = 3")
    with pytest.raises(
        study.StudyResumeError,
        match=rf"output folder {out} holds a study with a different configuration "
        r"\(changed: relax.fmax, study.seeds\); refusing to resume",
    ):
        study.run(changed, out)
    # Comments and layout are not the configuration.
    assert study.run("# same study\n" + CONFIG, out).attrs["complete"] == 1


@pytest.mark.slow
def test_resume_recomputes_only_missing_chunks(reference, tmp_path):
    out, ds = reference
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "results.nc").unlink()
    (copy / "chunks" / "chunk-00002.nc").unlink()
    partial = study.load(copy)  # what a notebook sees meanwhile
    assert partial.done.values.sum() == N_SAMPLES - 4 and partial.attrs["complete"] == 0
    assert np.isnan(partial.energy.values[~partial.done.values]).all()
    resumed = study.run(CONFIG, copy)
    assert resumed.attrs["run_chunks_computed"] == 1
    assert_bitwise_equal(resumed, ds)
    stamp = (copy / "results.nc").stat().st_mtime_ns
    again = study.run(CONFIG, copy)  # finished: nothing is computed or rewritten
    assert (copy / "results.nc").stat().st_mtime_ns == stamp
    assert_bitwise_equal(again, resumed)


@pytest.mark.slow
def test_widths_and_schedules_are_bitwise_equal(reference):
    """Every sample runs by a program that does not see its batch neighbours:
    one slot, three slots in flight and whole batches of eight give the numbers
    of the reference (sixteen slots), bit for bit. Whole batches occupy more
    slot steps for the same member steps."""
    _, ds = reference
    vmap = CONFIG.replace("chunk_size = 4", 'chunk_size = 4\nschedule = "vmap"')
    runs = {(1, "inflight"): study.run(CONFIG, width=1), (3, "inflight"): study.run(CONFIG, width=3)}
    runs[8, "vmap"] = study.run(vmap, width=8)
    for (width, _), result in runs.items():
        assert result.attrs["run_width"] == width
        assert_bitwise_equal(result, ds)
        assert result.attrs["run_member_steps"] == ds.relax_n_steps.values.sum()
    occupied = {key: r.attrs["run_member_steps"] / r.attrs["run_slot_steps"] for key, r in runs.items()}
    assert occupied[3, "inflight"] > occupied[8, "vmap"]


def test_progress_counts_samples_as_they_finish(monkeypatch):
    """The bar starts before planning, says when it compiles, and counts every
    sample once, as it finishes (several updates within one chunk)."""
    import tqdm

    bars = []

    class Recorder:
        def __init__(self, total, **kwargs):
            self.total, self.updates, self.descriptions = total, [], [kwargs.get("desc")]
            bars.append(self)

        def update(self, n):
            self.updates.append(n)

        def set_description_str(self, text):
            self.descriptions.append(text)

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tqdm, "tqdm", Recorder)
    small = CONFIG.replace("seeds = 4", "seeds = 2").replace("phi = [0.85, 0.95]", "phi = [0.85]")
    study.run(small, width=1, progress=True)
    (bar,) = bars
    assert bar.total == 4 and sum(bar.updates) == 4
    assert [n for n in bar.updates if n] == [1, 1, 1, 1]  # one slot: one sample at a time
    assert bar.descriptions[0] == "study: planning"
    assert bar.descriptions[1].startswith("study: compiling for N = 16 (width 1 x 1 devices)")
    assert bar.descriptions[-1] == "study: running"


@pytest.mark.slow
def test_interrupted_run_resumes_bitwise(reference, tmp_path, monkeypatch):
    """Interrupted once its first chunk is written (samples of later chunks in
    flight), the run leaves that chunk, and a second run computes the others
    and equals the uninterrupted reference bit for bit."""
    _, ds = reference
    write = store.StudyFolder.write_chunk

    def write_then_stop(self, index, data):
        write(self, index, data)
        raise KeyboardInterrupt

    out = tmp_path / "out"
    monkeypatch.setattr(store.StudyFolder, "write_chunk", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        study.run(CONFIG, out, width=3)
    monkeypatch.setattr(store.StudyFolder, "write_chunk", write)
    assert [p.name for p in (out / "chunks").iterdir()] == ["chunk-00000.nc"]
    resumed = study.run(CONFIG, out, width=2)
    assert resumed.attrs["run_chunks_computed"] == N_CHUNKS - 1
    assert_bitwise_equal(resumed, ds)


NEIGHBOR_STUDY = """\
[study]
seeds = 3
chunk_size = 2

[system]
builder = "soft_sphere_packing"
n = 32
phi = 0.9
diameters = [1.0, 1.4]
neighbor_list = NEIGHBOR_LIST

[sensitivities.small]
diameters = [1.0, 0.0]
"""


@pytest.mark.slow
def test_neighbor_list_study_equals_all_pairs(tmp_path):
    """A study of neighbor-list systems (one shared list capacity, from the
    plan) against the same study summed over all pairs: the same minima and
    sensitivities up to the rounding of another order of the pair sums, the
    same step counts; and it resumes, bit for bit, from a chunk on disk."""
    listed = NEIGHBOR_STUDY.replace("NEIGHBOR_LIST", "true")
    plan = study.Plan.from_config(listed)
    (group,) = plan.groups
    assert group.system.neighbor_list and group.capacity == (
        group.system.energy.template.capacity,
        group.system.energy.template.pairs.cell_list_capacity,
    )
    out = tmp_path / "out"
    with_lists = study.run(listed, out, width=2)
    all_pairs = study.run(NEIGHBOR_STUDY.replace("NEIGHBOR_LIST", "false"), width=2)
    assert with_lists.attrs["failed_samples"] == 0 and with_lists.relax_converged.values.all()
    np.testing.assert_array_equal(with_lists.relax_n_steps, all_pairs.relax_n_steps)
    np.testing.assert_array_equal(with_lists.n_rattlers, all_pairs.n_rattlers)
    for name, atol in (("positions", 1e-11), ("energy", 1e-15), ("pressure", 1e-13), ("energy_grad_diameters", 1e-13)):
        np.testing.assert_allclose(with_lists[name], all_pairs[name], rtol=0, atol=atol, err_msg=name)
    scale = np.abs(all_pairs.position_sensitivity.values).max()
    np.testing.assert_allclose(with_lists.position_sensitivity, all_pairs.position_sensitivity, atol=1e-8 * scale)

    (out / "results.nc").unlink()
    (out / "chunks" / "chunk-00001.nc").unlink()
    resumed = study.run(listed, out, width=2)
    assert resumed.attrs["run_chunks_computed"] == 1
    assert_bitwise_equal(resumed, with_lists)


# -- several devices and SIGKILL (subprocesses: about 15 s of CPU each for importing jax-md and compiling)


def subprocess_env(cache: pathlib.Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", MDSENS_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT), **extra)
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mdsens.cli", *args]


# The CLI, pausing after it has written a chunk, so that the kill falls
# between two chunks whatever the load of the machine.
PAUSING_CLI = """
import sys, time
from mdsens.study import store
write = store.StudyFolder.write_chunk
def write_and_pause(self, index, data):
    write(self, index, data)
    time.sleep(120)
store.StudyFolder.write_chunk = write_and_pause
from mdsens.cli import main
sys.exit(main(sys.argv[1:]))
"""


def digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkill_and_resume_on_four_devices(reference, config_path, tmp_path):
    """The CLI on four CPU devices, killed with SIGKILL once its first chunk is
    on disk (a half-written chunk left beside it), then run again: it resumes,
    the chunk written before the kill is untouched, every sample is computed
    exactly once, the persistent compilation cache is used, and the results of
    the four devices equal those of one device (the reference): bit for bit but
    for the last bit of the physics (:data:`LAST_BIT`)."""
    _, ds = reference
    out, cache = tmp_path / "killed", tmp_path / "jax-cache"
    env = subprocess_env(cache, JAX_NUM_CPU_DEVICES="4")
    args = ["study", str(config_path), "--out", str(out), "--no-progress"]
    process = subprocess.Popen(
        [sys.executable, "-c", PAUSING_CLI, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    # Samples finish out of order: the first chunk complete may be any of them.
    while not (on_disk := sorted((out / "chunks").glob("chunk-*.nc")) if (out / "chunks").is_dir() else []):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no chunk was written"
        time.sleep(0.01)
    (first,) = on_disk
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (out / "chunks").iterdir()) == [first.name]
    assert not (out / "results.nc").exists()
    written = digest(first)
    half_written = out / "chunks" / ".tmp-chunk-00009.nc.99999"  # as a kill during a write leaves it
    half_written.write_bytes(b"CDF\x01 truncated")
    assert any(cache.iterdir()), "the persistent compilation cache was not written"

    rerun = subprocess.run(cli(*args), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming {out}: 1 of {N_CHUNKS} chunks (4 of {N_SAMPLES} samples) already done" in rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["chunks_computed"] == N_CHUNKS - 1 and summary["devices"] == 4
    assert summary["relax_converged"] == summary["samples"] == N_SAMPLES
    assert summary["solves_converged"] == summary["solves"] == 2 * N_SAMPLES
    assert digest(first) == written and not half_written.exists()
    resumed = study.load(out)
    assert resumed.attrs["run_devices"] == 4 and resumed.done.values.all()
    # Every sample once, from the chunk the plan assigns it to.
    np.testing.assert_array_equal(resumed.chunk_index.values.ravel(), np.arange(N_SAMPLES) // 4)
    assert_equal_across_devices(resumed, ds)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_devices_equal_one_bitwise(reference, config_path, tmp_path):
    """study.run from Python in a process of two CPU devices, three slots each:
    the samples land on other devices and slots than in the reference (one
    device, sixteen slots), and their relaxations and sensitivities are the
    same bit for bit."""
    _, ds = reference
    saved = tmp_path / "two_devices.nc"
    code = (
        "import jax\n"
        "jax.config.update('jax_enable_x64', True)\n"
        "from mdsens import study\n"
        f"ds = study.run({str(config_path)!r}, width=3, progress=False)\n"
        "assert ds.attrs['run_devices'] == 2, ds.attrs\n"
        f"ds.to_netcdf({str(saved)!r}, engine='h5netcdf')\n"
    )
    env = subprocess_env(tmp_path / "jax-cache", JAX_NUM_CPU_DEVICES="2")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    with xr.open_dataset(saved, engine="h5netcdf") as two:
        assert_equal_across_devices(two.load(), ds)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(
    os.environ.get("MDSENS_TEST_MULTIHOST") != "1",
    reason="two more JAX processes (about a minute of CPU); set MDSENS_TEST_MULTIHOST=1 to run",
)
def test_two_processes_equal_one(reference, config_path, tmp_path):
    """Two processes of two CPU devices each (jax.distributed over localhost),
    started as a user would start them on two hosts."""
    import socket

    _, ds = reference
    out = tmp_path / "multihost"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    common = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--no-progress"]
    env = subprocess_env(tmp_path / "jax-cache", JAX_NUM_CPU_DEVICES="2")
    processes = [
        subprocess.Popen(
            cli("study", str(config_path), "--out", str(out), *common, "--process-id", str(i)),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    result = study.load(out)
    assert result.attrs["run_processes"] == 2 and result.attrs["run_devices"] == 4
    assert_equal_across_devices(result, ds)
