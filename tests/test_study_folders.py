"""Study folders that cannot be corrupted silently (issue 14): the lock, the
checksums, rebuilding results.nc, temporary files, the memory check before
anything is built, odd output folders, a full disk, and the failure policy.

Oracles: a reference study of the same plan (a resumed or repaired folder must
hold its numbers bit for bit), the holder's own pid and host, the samples'
statuses, and hand-built records for the NaN policy. Every study here has the
same energy structure, so the kernels compile once per width and session.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import xarray as xr

import mdsens
from mdsens import study
from mdsens.cli import EXIT_FAILED_SAMPLES, main
from mdsens.study import lock, runtime, store

# 2 points x 2 seeds of 8 discs, chunks of 2: two chunk files.
CONFIG = """\
[study]
seeds = 2
chunk_size = 2

[system]
builder = "soft_sphere_packing"
n = 8

[grid]
phi = [0.9, 1.0]

[sensitivities.small]
diameters = [1.0, 0.0]
"""
ROOT = pathlib.Path(__file__).resolve().parent.parent
CHUNK0 = pathlib.Path("chunks", "chunk-00000.nc")


def assert_same_numbers(actual: xr.Dataset, expected: xr.Dataset) -> None:
    assert set(actual.data_vars) == set(expected.data_vars)
    for name, variable in expected.data_vars.items():
        np.testing.assert_array_equal(actual[name].values, variable.values, err_msg=name)


def run_quietly(config: str, out: pathlib.Path | None, **kwargs) -> xr.Dataset:
    """study.run, failing the test on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return study.run(config, out, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[pathlib.Path, xr.Dataset]:
    out = tmp_path_factory.mktemp("reference") / "out"
    return out, run_quietly(CONFIG, out)


@pytest.fixture
def copy(reference, tmp_path) -> pathlib.Path:
    """A copy of the finished reference folder, to damage."""
    out = tmp_path / "copy"
    shutil.copytree(reference[0], out)
    return out


def test_reference_folder(reference):
    out, ds = reference
    assert ds.attrs["complete"] == 1 and ds.attrs["failed_samples"] == 0
    assert bool(ds.relax_converged.all()) and bool(ds.solve_converged.all())
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert names == [
        "checksums",
        "checksums/chunk-00000.nc.json",
        "checksums/chunk-00001.nc.json",
        "checksums/results.nc.json",
        "chunks",
        "chunks/chunk-00000.nc",
        "chunks/chunk-00001.nc",
        "manifest.json",
        "results.nc",
        "study.toml",
    ]  # no lock and no temporary file left
    digest = json.loads((out / "manifest.json").read_text())["config_sha256"]
    for name in ("chunks/chunk-00000.nc", "chunks/chunk-00001.nc", "results.nc"):
        recorded = json.loads((out / "checksums" / f"{pathlib.Path(name).name}.json").read_text())
        assert recorded["sha256"] == store._sha256(out / name) and recorded["config_sha256"] == digest


# -- 1. the lock

HOLDER = """
import importlib.util, pathlib, sys, time
spec = importlib.util.spec_from_file_location("lock", sys.argv[1])
module = sys.modules["lock"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
pathlib.Path(sys.argv[2]).mkdir()
module.FolderLock(sys.argv[2]).acquire()
print("locked", flush=True)
time.sleep(300)
"""


@pytest.mark.multiprocess
def test_a_second_run_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(reference, tmp_path, capsys):
    """A process (the lock module alone, no JAX) holds the folder: the CLI is
    refused with the holder's pid, host and start time. Once the holder is
    killed (SIGKILL: its lock file stays), the next run takes the stale lock
    over with a warning and computes the study."""
    out = tmp_path / "out"
    config = tmp_path / "study.toml"
    config.write_text(CONFIG)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, lock.__file__, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        args = ["study", str(config), "--out", str(out), "--no-cache", "--no-progress"]
        assert main(args) == 2
        err = capsys.readouterr().err
        started = json.loads((out / lock.LOCK).read_text())["started"]
        assert (
            f"mdsens study: error: output folder {out} is in use by pid {holder.pid} on host "
            f"{socket.gethostname()}, started {started}." in err
        )
        assert sorted(p.name for p in out.iterdir()) == ["checksums", "chunks", lock.LOCK]  # nothing written
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert (
        f"mdsens study: warning: {out / lock.LOCK}: taking over a stale lock of pid {holder.pid} on host "
        f"{socket.gethostname()}, started {started} (that process is no longer running)" in err
    )
    assert not (out / lock.LOCK).exists()
    assert_same_numbers(study.load(out), reference[1])


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, monkeypatch):
    first = lock.FolderLock(tmp_path).acquire()
    with pytest.raises(lock.LockHeld, match=f"in use by pid {os.getpid()} on host {socket.gethostname()}, started"):
        lock.FolderLock(tmp_path).acquire()  # another open file: flock refuses, even in this process
    first.release()
    assert not (tmp_path / lock.LOCK).exists()

    def record(pid: int, host: str) -> None:
        (tmp_path / lock.LOCK).write_text(
            json.dumps({"pid": pid, "host": host, "started": "2025-01-01T00:00:00+00:00"})
        )

    # A holder recorded on another host: this host cannot tell whether it runs.
    record(os.getpid(), "elsewhere.example")
    with pytest.raises(lock.LockHeld, match=r"pid \d+ on host elsewhere.example.*If it does not, delete that file"):
        lock.FolderLock(tmp_path).acquire()
    # Without flock (some NFS mounts) the pid decides: a running one holds the folder...
    monkeypatch.setattr(lock, "_flock", lambda descriptor: None)
    record(os.getppid(), socket.gethostname())
    with pytest.raises(lock.LockHeld, match=f"in use by pid {os.getppid()}"):
        lock.FolderLock(tmp_path).acquire()
    # ... and one that has exited does not.
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    record(child.pid, socket.gethostname())
    with pytest.warns(RuntimeWarning, match=f"stale lock of pid {child.pid} .*is no longer running"):
        taken = lock.FolderLock(tmp_path).acquire()
    assert json.loads((tmp_path / lock.LOCK).read_text())["pid"] == os.getpid()
    taken.release()


# -- 2. checksums: damaged and foreign chunks are computed again, never merged


def flip_bytes(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))


def rewrite_valid(path: pathlib.Path) -> None:
    """Another valid netCDF file: the chunk with one energy changed."""
    with xr.open_dataset(path, engine="h5netcdf") as data:
        data = data.load()
    data["energy"][0] = 1.0
    path.unlink()
    data.to_netcdf(path, engine="h5netcdf")


@pytest.fixture(scope="module")
def other_fmax(tmp_path_factory) -> pathlib.Path:
    """A study of the same plan with another fmax: its chunks are valid files of another configuration."""
    out = tmp_path_factory.mktemp("other") / "out"
    run_quietly(CONFIG + "[relax]\nfmax = 1e-6\n", out)
    return out


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda out, other: flip_bytes(out / CHUNK0), "its bytes differ from its sha256 checksum"),
        (lambda out, other: rewrite_valid(out / CHUNK0), "its bytes differ from its sha256 checksum"),
        (lambda out, other: shutil.copy(other / CHUNK0, out / CHUNK0), "its bytes differ from its sha256 checksum"),
        (  # with its checksum file too
            lambda out, other: [shutil.copy(other / p, out / p) for p in (CHUNK0, "checksums/chunk-00000.nc.json")],
            "was written for another configuration",
        ),
        (  # chunk 1 and its checksum as chunk 0
            lambda out, other: [
                shutil.copy(out / "chunks/chunk-00001.nc", out / CHUNK0),
                shutil.copy(out / "checksums/chunk-00001.nc.json", out / "checksums/chunk-00000.nc.json"),
            ],
            "holds other samples than the plan gives this chunk",
        ),
        (lambda out, other: (out / "checksums/chunk-00000.nc.json").unlink(), "has no checksum"),
    ],
    ids=[
        "flipped-bytes",
        "another-valid-netcdf",
        "other-fmax",
        "other-fmax-with-checksum",
        "other-chunk",
        "no-checksum",
    ],
)
def test_damaged_or_foreign_chunk_is_computed_again(reference, other_fmax, copy, damage, problem):
    _, ds = reference
    foreign = study.load(other_fmax)
    assert not np.array_equal(foreign.relax_n_steps.values, ds.relax_n_steps.values)  # really another study
    (copy / "results.nc").unlink()
    damage(copy, other_fmax)
    where = re.escape(f"{copy / CHUNK0}: {problem}")
    with pytest.warns(RuntimeWarning, match=f"{where}.*; left out"):
        partial = study.load(copy)  # reading only: never merged
    np.testing.assert_array_equal(partial.done.values, [[False, False], [True, True]])
    with pytest.warns(RuntimeWarning, match=f"{where}.*; computing this chunk again"):
        again = study.run(CONFIG, copy)
    assert again.attrs["run_chunks_computed"] == 1
    assert_same_numbers(again, ds)
    assert_same_numbers(run_quietly(CONFIG, copy), ds)  # and now it is complete


# -- 3. a damaged results.nc is rebuilt from the chunks


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_results_are_rebuilt_from_the_chunks(reference, copy, damage):
    _, ds = reference
    results = copy / "results.nc"
    if damage == "truncate":
        results.write_bytes(results.read_bytes()[:1000])
    else:
        flip_bytes(results)
    message = re.escape(f"{results}: its bytes differ from its sha256 checksum")
    with pytest.warns(RuntimeWarning, match=f"{message}.*; assembling the chunks"):
        assert_same_numbers(study.load(copy), ds)
    with pytest.warns(RuntimeWarning, match=f"{message}.*; rebuilding it from the chunks"):
        rebuilt = study.run(CONFIG, copy)
    assert rebuilt.attrs["run_chunks_computed"] == 0
    assert_same_numbers(rebuilt, ds)
    assert_same_numbers(run_quietly(CONFIG, copy), ds)  # "already complete", and it is


# -- 4. temporary files


def test_stray_temporary_files_are_removed(reference, copy):
    stray = [copy / ".tmp-results.nc.99999", copy / "chunks/.tmp-chunk-00001.nc.99999", copy / "checksums/.tmp-x.1"]
    for path in stray:
        path.write_bytes(b"CDF\x01 half written")
    assert_same_numbers(run_quietly(CONFIG, copy), reference[1])
    assert not any(path.exists() for path in stray)


# -- 5. width and memory


def test_width_is_capped_at_the_samples(reference, tmp_path):
    """chunk_size = 2**63 - 1 for 2 samples: one chunk, two slots (the default
    width is at most the samples per device), the numbers of the reference."""
    config = CONFIG.replace("chunk_size = 2", f"chunk_size = {2**63 - 1}").replace("phi = [0.9, 1.0]", "phi = [0.9]")
    ds = run_quietly(config, tmp_path / "out")
    assert ds.attrs["run_width"] == 2
    for name, variable in ds.data_vars.items():
        np.testing.assert_array_equal(variable.values[0], reference[1][name].values[0], err_msg=name)


def test_memory_is_estimated_before_anything_is_built(tmp_path, monkeypatch):
    huge = "[system]\nbuilder = 'soft_sphere_packing'\nn = 200000\nneighbor_list = false\n"
    with pytest.raises(study.StudyError, match=r"N = 200000 particles summed over all pairs .*neighbor_list = true"):
        study.run(huge, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before the folder, let alone the manifest
    # A sample of the test study needs 8 N^2 dim (20 + 4 K) bytes = 24576.
    member = 8 * 8**2 * 2 * (20 + 4 * 1)
    monkeypatch.setattr(runtime.Runtime, "memory", lambda self: (0.9 * member, 1))
    with pytest.raises(study.StudyError, match=r"N = 8 particles .* more than the 2.06e-05 GiB allowed"):
        study.run(CONFIG, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(runtime.Runtime, "memory", lambda self: (1.0 * member, 1))
    runtime.check_memory(study.parse_config(CONFIG), runtime.Runtime())  # fits exactly
    # The width: as many slots of 100 bytes as fit, at most one per sample and MAX_WIDTH.
    monkeypatch.setattr(runtime.Runtime, "memory", lambda self: (350.0, 1))
    assert runtime.choose_width(None, 100, 64, runtime.Runtime()) == 3
    assert runtime.choose_width(None, 100, 2, runtime.Runtime()) == 2
    assert runtime.choose_width(5, 100, 64, runtime.Runtime()) == 5
    monkeypatch.setattr(runtime.Runtime, "memory", lambda self: None)
    assert runtime.choose_width(None, 100, 64, runtime.Runtime()) == runtime.MAX_WIDTH


# -- 6. odd --out values and a full disk


@pytest.mark.parametrize("out", ["", "  ", "out\n", " out", "a\x00b"])
def test_odd_out_values_are_refused(out, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(study.StudyError, match="output folder"):
        study.run(CONFIG, out)
    (tmp_path / "study.toml").write_text(CONFIG)
    assert main(["study", "study.toml", "--out", out, "--no-cache", "--no-progress"]) == 2
    assert "mdsens study: error: output folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["study.toml"]  # nothing written here


def test_existing_file_as_out_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(study.StudyError, match="exists and is not a folder"):
        study.run(CONFIG, tmp_path / "file")


def test_disk_full_keeps_every_finished_chunk(reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    write = xr.Dataset.to_netcdf

    def full_after_one(self, path, **kwargs):
        if pathlib.Path(path).name.startswith(".tmp-chunk-00001"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write(self, path, **kwargs)

    monkeypatch.setattr(xr.Dataset, "to_netcdf", full_after_one)
    with pytest.raises(
        study.StudyError,
        match=r"cannot write .*chunk-00001.nc: No space left on device\. Every finished chunk is kept: "
        r"the disk is full \(or over quota\)",
    ):
        study.run(CONFIG, out)
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "chunks").iterdir()) == ["chunk-00000.nc"]
    assert not list(out.rglob(".tmp-*")) and not (out / lock.LOCK).exists()
    logged = []
    resumed = run_quietly(CONFIG, out, log=logged.append)
    assert f"resuming {out}: 1 of 2 chunks (2 of 4 samples) already done" in logged
    assert_same_numbers(resumed, reference[1])


# -- 7. failure policy


def test_failed_relaxations_store_nan_and_exit_3(reference, tmp_path, capsys):
    """FIRE stopped after 5 steps: every sample failed; its sensitivities and
    energy gradients are NaN, its positions and diagnostics are what was computed."""
    config = tmp_path / "study.toml"
    config.write_text(CONFIG + "[relax]\nmax_steps = 5\n")
    out = tmp_path / "out"
    assert main(["study", str(config), "--out", str(out), "--no-cache", "--no-progress"]) == EXIT_FAILED_SAMPLES
    captured = capsys.readouterr()
    expected = (
        "4 of 4 samples failed (relaxation: 4 max_steps); what needs a converged state is NaN there: "
        "sensitivities, energy gradients... (see relax_status, solve_status)"
    )
    assert captured.err.splitlines()[-1] == expected
    assert json.loads(captured.out)["failed_samples"] == 4
    ds = study.load(out)
    assert ds.attrs["failed_samples"] == 4
    assert (ds.relax_status.values == mdsens.Status.max_steps).all() and (ds.relax_n_steps.values == 5).all()
    for name in ("position_sensitivity", "energy_sensitivity", "energy_grad_diameters", "energy_grad_box", "pressure"):
        assert np.isnan(ds[name].values).all(), name
    assert (ds.n_zero_modes.values == -1).all() and (ds.n_rattlers.values == -1).all()
    for name in ("positions", "energy", "relax_fmax", "number_density", "param_box"):
        assert np.isfinite(ds[name].values).all(), name
    # Resumed or not, the same count and exit status.
    assert main(["study", str(config), "--out", str(out), "--no-cache", "--no-progress"]) == EXIT_FAILED_SAMPLES
    assert capsys.readouterr().err.splitlines()[-1] == expected
    # study.run without a log warns.
    with pytest.warns(RuntimeWarning, match="4 of 4 samples failed"):
        study.run(config, out)
    # A study whose samples converged exits 0.
    config.write_text(CONFIG)
    assert main(["study", str(config), "--out", str(tmp_path / "ok"), "--no-cache", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["failed_samples"] == 0


def test_failure_policy_of_a_record():
    """Nothing computed from an unconverged state survives: for a failed
    relaxation everything but where it stopped (positions, energy), why (the
    diagnostics) and what the parameters alone give; for a failed linear solve
    its position sensitivity."""
    b, k, n = 3, 2, 4
    record = {
        "sample": np.arange(b),
        "relax_converged": np.array([True, False, True]),
        "relax_status": np.array([0, 1, 0], dtype=np.int32),
        "solve_converged": np.array([[True, True], [True, True], [True, False]]),
        "solve_residual": np.ones((b, k)),
        "positions": np.ones((b, n, 2)),
        "energy": np.ones(b),
        "position_sensitivity": np.ones((b, k, n, 2)),
        "energy_sensitivity": np.ones((b, k)),
        "energy_grad_box": np.ones((b, 2, 2)),
        "param_box": np.ones((b, 2, 2)),
        "stress": np.ones((b, 2, 2)),
        "pressure": np.ones(b),
        "contact_number": np.ones(b),
        "n_rattlers": np.ones(b, dtype=np.int32),
        "n_zero_modes": np.ones(b, dtype=np.int32),
        "number_density": np.ones(b),
        "size_ratio": np.ones(b),
    }
    masked = store.failure_policy(record)
    relax_failed = [False, True, False]
    failed = {
        "position_sensitivity": [[False, False], [True, True], [False, True]],
        **{
            name: relax_failed
            for name in (
                "energy_sensitivity",
                "energy_grad_box",
                "stress",
                "pressure",
                "contact_number",
                "n_rattlers",
                "n_zero_modes",
            )
        },
    }
    for name, value in masked.items():
        expected = np.zeros(value.shape, dtype=bool)
        if name in failed:
            expected[np.asarray(failed[name])] = True
        lost = value == -1 if value.dtype.kind == "i" else np.isnan(value)
        np.testing.assert_array_equal(lost, expected, err_msg=name)
    assert record["position_sensitivity"].sum() == b * k * n * 2  # the input is not changed
