"""The study folder: manifest, chunk files and their checksums, resume checks,
the failure policy of the records, and the labeled dataset.

Files in ``OUT/``::

    manifest.json      configuration (canonical, defaults filled in), its digest, its text, and the layout
    study.toml         a copy of the configuration file as given
    study.lock         while a run holds the folder: its pid, host and start time (:mod:`mdsens.study.lock`)
    chunks/chunk-00012.nc   one netCDF file per finished chunk
    checksums/chunk-00012.nc.json   the sha256 of that file and the configuration digest it was written for
    results.nc         the assembled dataset, written when every chunk is done (and checksums/results.nc.json)

Every file is written to a temporary name (``.tmp-*``) in the same folder and
moved into place with ``os.replace``, its checksum first, so a killed study
leaves whole files only; a run removes the temporary files of earlier ones.
The manifest is written before the first chunk; a rerun with the same
configuration resumes from the chunk files, a rerun with another configuration
is refused. On resume every chunk is checked against its checksum, the
configuration digest and the plan: a damaged or foreign one is computed again,
with a warning, never merged; a damaged ``results.nc`` is rebuilt from the
chunks. Needs numpy and xarray (h5netcdf engine).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import errno
import hashlib
import json
import os
import pathlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mdsens._results import Status
from mdsens.study import config as sc
from mdsens.study import schema
from mdsens.study.lock import LOCK, FolderLock, LockHeld
from mdsens.study.schema import Layout

FORMAT = 3
ENGINE = "h5netcdf"
MANIFEST, CONFIG_COPY, RESULTS, CHUNKS, CHECKSUMS = "manifest.json", "study.toml", "results.nc", "chunks", "checksums"
TEMP_PREFIX = ".tmp-"


class StudyError(RuntimeError):
    """A study cannot run as asked (output folder, resume); the message says why."""


class StudyResumeError(StudyError):
    """The output folder holds a study with a different configuration."""


def check_engine() -> None:
    """Fail before any computation if netCDF files cannot be written."""
    try:
        import h5netcdf  # noqa: F401
        import h5py  # noqa: F401
        import xarray  # noqa: F401
    except ImportError as error:
        raise StudyError(
            f"writing study results needs xarray, h5netcdf and h5py ({error}); "
            "install them with: pip install xarray 'h5netcdf[h5py]'"
        ) from None


def check_out(out: str | os.PathLike) -> pathlib.Path:
    """The output folder as a path; an empty name or one with control characters
    or surrounding blanks (a quoting slip, ``--out ""``) is refused."""
    text = os.fsdecode(out)
    if not text.strip():
        raise StudyError("output folder: the name is empty; name a folder, e.g. --out out/my_study.")
    if text != text.strip() or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise StudyError(
            f"output folder {text!r}: the name has control characters or blanks at its ends; check quoting."
        )
    return pathlib.Path(text)


def _sha256(path: pathlib.Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _write_failure(path: pathlib.Path, error: OSError) -> StudyError:
    full = error.errno in (errno.ENOSPC, errno.EDQUOT) or "errno = 28" in str(error) or "No space left" in str(error)
    why = "the disk is full (or over quota): free some space" if full else "fix that"
    return StudyError(
        f"cannot write {path}: {error.strerror or error}. Every finished chunk is kept: {why} and run the "
        "same command again to resume."
    )


def _atomic_write(
    path: pathlib.Path, write: Callable[[pathlib.Path], object], checksum: pathlib.Path | None = None, config: str = ""
) -> None:
    """``write(temp)``, fsync, then (with ``checksum``) record the temporary file's
    sha256 and the configuration digest ``config`` there, and ``os.replace(temp,
    path)``: a file in place always has its checksum. A failed write (disk full)
    becomes a :class:`StudyError` and leaves no temporary file."""
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        write(temp)
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        if checksum is not None:
            record = {"file": path.name, "sha256": _sha256(temp), "config_sha256": config}
            _atomic_write(checksum, lambda t: t.write_text(json.dumps(record)))
        os.replace(temp, path)
    except OSError as error:
        raise _write_failure(path, error) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    with contextlib.suppress(OSError):  # make the rename itself durable
        descriptor = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _write_text(path: pathlib.Path, text: str) -> None:
    _atomic_write(path, lambda temp: temp.write_text(text))


def manifest(config: sc.StudyConfig, layout: Layout) -> dict[str, Any]:
    """What a study folder records about its study (JSON)."""
    return {
        "mdsens_format": FORMAT,
        "config_sha256": config.digest(),
        "config": config.canonical(),
        "config_source": config.text or "",  # as given: not compared on resume
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "layout": layout.to_json(),
    }


#: What a failed relaxation keeps as computed: where it stopped (positions,
#: energy), why (the diagnostics), and what depends on the parameters alone.
KEPT_ON_FAILURE = (
    "positions",
    "energy",
    "number_density",
    "size_ratio",
    "enthalpy",
    "box",
    "volume",
    "packing_fraction",
)
KEPT_ON_FAILURE_PREFIXES = ("relax_", "solve_", schema.PARAM)


def failure_policy(record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A chunk's record with every value that was not computed from a converged
    state replaced by NaN (-1 for counts): for samples whose relaxation failed,
    all but :data:`KEPT_ON_FAILURE` (sensitivities, energy gradients, stress,
    contacts, zero modes...); for each failed linear solve, its position
    sensitivity (and box and packing fraction sensitivities); for failed
    moduli, the moduli."""
    record = {name: np.array(value) for name, value in record.items()}
    relax_failed = ~record["relax_converged"].astype(bool)
    for name, value in record.items():
        if name != "sample" and name not in KEPT_ON_FAILURE and not name.startswith(KEPT_ON_FAILURE_PREFIXES):
            value[relax_failed] = schema.fill_value(value.dtype)
    if "solve_converged" in record:
        for name in ("position_sensitivity", "box_sensitivity", "packing_fraction_sensitivity"):
            if name in record:
                record[name][~record["solve_converged"].astype(bool)] = np.nan
    if "moduli_converged" in record:
        for name in ("stiffness", "bulk_modulus", "shear_modulus"):
            record[name][~record["moduli_converged"].astype(bool)] = np.nan
    return record


def failed_samples(data: Any) -> np.ndarray:
    """(point, seed) mask of the computed samples whose relaxation or a linear solve failed."""
    if "relax_converged" not in data:  # no chunk done yet
        return np.zeros(data["done"].shape, dtype=bool)
    ok = data["relax_converged"].values.astype(bool)
    if "solve_converged" in data:
        ok = ok & data["solve_converged"].values.astype(bool).all(axis=-1)
    return data["done"].values & ~ok


def failure_report(data: Any) -> str | None:
    """One line on the failed samples of a study's dataset (None if none failed):
    how many, and why, by :class:`mdsens.Status` name."""
    failed = failed_samples(data)
    if not failed.any():
        return None
    relax_failed = failed & ~data["relax_converged"].values.astype(bool)
    reasons = [("relaxation", Status.names(data["relax_status"].values[relax_failed]))]
    if "solve_converged" in data:
        solve_failed = ~data["solve_converged"].values.astype(bool) & (failed & ~relax_failed)[..., None]
        reasons.append(("linear solve", Status.names(data["solve_status"].values[solve_failed])))
    counted = []
    for what, names in reasons:
        if len(names):
            counts = collections.Counter(np.atleast_1d(names).tolist()).most_common()
            counted.append(f"{what}: " + ", ".join(f"{n} {name}" for name, n in counts))
    return (
        f"{int(failed.sum())} of {int(data['done'].values.sum())} samples failed ({'; '.join(counted)}); what "
        "needs a converged state is NaN there: sensitivities, energy gradients... (see relax_status, solve_status)"
    )


def chunk_dataset(
    layout: Layout, index: int, record: Mapping[str, np.ndarray], stats: Mapping[str, Any], config_sha256: str
) -> Any:
    """One chunk's samples as a Dataset over ``sample`` (group-local sizes)."""
    import xarray as xr

    chunk = layout.chunks[index]
    samples = np.asarray(record["sample"], dtype=np.int64)
    if samples.tolist() != chunk["samples"]:
        raise StudyError(f"internal error: chunk {index} holds other samples than planned")
    variables = {
        name: (("sample", *layout.dims(name, chunk["group"])), value)
        for name, value in failure_policy(record).items()
        if name != "sample"
    }
    attrs = {
        "chunk": index,
        "group": chunk["group"],
        "config_sha256": config_sha256,
        **{k: v for k, v in stats.items() if isinstance(v, (int, float))},
    }
    return xr.Dataset(variables, coords={"sample": samples}, attrs=attrs)


def assemble(
    layout: Layout, chunks: Mapping[int, Any], study: Mapping[str, Any], run_info: Mapping[str, Any] | None = None
) -> Any:
    """Place the chunks' samples on the (point, seed) grid, with labels,
    descriptions and the configuration of the ``study`` manifest as attributes.
    Samples of missing chunks are NaN / -1 / False and ``done`` is False there."""
    import xarray as xr

    n_points, n_seeds = layout.sizes["point"], layout.sizes["seed"]
    arrays: dict[str, np.ndarray] = {}
    dims_of: dict[str, tuple[str, ...]] = {}
    done = np.zeros((n_points, n_seeds), dtype=bool)
    chunk_of = np.full((n_points, n_seeds), -1, dtype=np.int64)
    for index, data in sorted(chunks.items()):
        group = layout.chunks[index]["group"]
        samples = np.asarray(data["sample"].values, dtype=np.int64)
        points, seeds = np.divmod(samples, n_seeds)
        if done[points, seeds].any():
            raise StudyError(f"chunk {index} repeats samples that another chunk already holds")
        done[points, seeds] = True
        chunk_of[points, seeds] = index
        for name, variable in data.data_vars.items():
            value = np.asarray(variable.values)
            if name not in arrays:
                dims = layout.dims(name, group)
                shape = (n_points, n_seeds, *(layout.sizes[d] for d in dims))
                arrays[name] = np.full(shape, schema.fill_value(value.dtype), dtype=value.dtype)
                dims_of[name] = ("point", "seed", *dims)
            target: tuple[Any, ...] = (points, seeds, *(slice(0, s) for s in value.shape[1:]))
            arrays[name][target] = value
    if n_points * n_seeds != sum(len(c["samples"]) for c in layout.chunks):
        raise StudyError("internal error: the plan does not cover every sample once")

    data_vars = {
        name: (dims_of[name], array, schema.attributes(name, layout.at_pressure)) for name, array in arrays.items()
    }
    n_max = layout.sizes["particle"]
    species = np.full((n_points, n_max), -1, dtype=np.int32)
    for i, s in enumerate(layout.species):
        species[i, : len(s)] = s
    labels = {
        "particle_species": species,
        "n_particles": np.asarray(layout.n_particles, dtype=np.int32),
        "done": done,
        "chunk_index": chunk_of,
    }
    for name, value in labels.items():
        variable = schema.LABELS[name]
        data_vars[name] = (variable.dims, value, {"description": variable.description})

    spatial = list(schema.SPATIAL[: layout.dim])
    coords: dict[str, Any] = {
        "point": np.arange(n_points),
        "seed": np.asarray(layout.seeds, dtype=np.int64),
        "particle": np.arange(n_max),
        "spatial": spatial,
        "spatial_b": spatial,
    }
    if layout.sensitivities:
        coords["sensitivity"] = list(layout.sensitivities)
    if "voigt" in layout.sizes:
        coords["voigt"] = coords["voigt_b"] = list(schema.VOIGT[layout.dim])
    for name, coord in layout.coords.items():
        values = coord["values"]
        if len(coord["dims"]) == 1:
            coords[name] = (("point",), np.asarray(values))
        else:
            array = np.full((n_points, *(layout.sizes[d] for d in coord["dims"][1:])), np.nan)
            for i, v in enumerate(values):
                v = np.asarray(v, dtype=np.float64)
                entry: tuple[Any, ...] = (i, *(slice(0, s) for s in v.shape))
                array[entry] = v
            coords[name] = (tuple(coord["dims"]), array)
    attrs = {
        "title": "mdsens study",
        "description": study["config"]["study"]["description"],
        "builder": study["config"]["system"]["builder"],
        "config": json.dumps(study["config"], sort_keys=True),
        "config_source": study["config_source"],
        "config_sha256": study["config_sha256"],
        "complete": int(done.all()),
        "mdsens_format": FORMAT,
    }
    dataset = xr.Dataset(data_vars, coords=coords, attrs=attrs)
    dataset.attrs["failed_samples"] = int(failed_samples(dataset).sum())
    for key, value in (run_info or {}).items():
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            dataset.attrs[f"run_{key}"] = value
    return dataset


class StudyFolder:
    """The output folder of one study. A run holds it from :meth:`open` to
    :meth:`close`; :meth:`load` only reads."""

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = check_out(path)
        self.manifest_path = self.path / MANIFEST
        self.results_path = self.path / RESULTS
        self.chunk_dir = self.path / CHUNKS
        self.checksum_dir = self.path / CHECKSUMS
        self._lock = FolderLock(self.path)
        check_engine()
        if not create:
            if not self.manifest_path.is_file():
                raise StudyError(f"{self.path}: not a study folder (no {MANIFEST}).")
            return
        if self.path.exists() and not self.path.is_dir():
            raise StudyError(f"output folder {self.path}: exists and is not a folder.")
        self._created = not self.path.exists()
        try:
            self.chunk_dir.mkdir(parents=True, exist_ok=True)
            self.checksum_dir.mkdir(exist_ok=True)
            probe = self.path / f"{TEMP_PREFIX}probe.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink(missing_ok=True)
        except OSError as error:
            raise StudyError(f"output folder {self.path}: cannot write there ({error.strerror or error}).") from None

    def open(self, config: sc.StudyConfig) -> StudyFolder:
        """Lock the folder, remove the temporary files of earlier runs, and refuse
        a folder that holds another study or other files; return self."""
        try:
            self._lock.acquire()
        except LockHeld as error:
            raise StudyError(str(error)) from None
        except OSError as error:
            raise StudyError(f"output folder {self.path}: cannot lock it ({error.strerror or error}).") from None
        try:
            for folder in (self.path, self.chunk_dir, self.checksum_dir):
                for stale in folder.glob(f"{TEMP_PREFIX}*"):
                    stale.unlink(missing_ok=True)
            self._check_contents(config)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Let go of the folder; remove it again if this run created it and wrote no
        manifest (its subfolders while still holding the lock, so no other run's)."""
        discard = self._lock.held and getattr(self, "_created", False) and not self.manifest_path.exists()
        with contextlib.suppress(OSError):
            if discard:
                self.chunk_dir.rmdir()
                self.checksum_dir.rmdir()
        self._lock.release()
        with contextlib.suppress(OSError):
            if discard:
                self.path.rmdir()

    def chunk_path(self, index: int) -> pathlib.Path:
        return self.chunk_dir / f"chunk-{index:05d}.nc"

    def checksum_path(self, path: pathlib.Path) -> pathlib.Path:
        return self.checksum_dir / f"{path.name}.json"

    def _manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.is_file():
            return None
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, ValueError) as error:
            raise StudyError(f"{self.manifest_path}: unreadable ({error}); delete the folder to start over.") from None

    def _study(self) -> tuple[dict[str, Any], Layout]:
        study = self._manifest()
        if study is None:
            raise StudyError(f"{self.path}: not a study folder (no {MANIFEST}).")
        if study.get("mdsens_format") != FORMAT:
            raise StudyError(
                f"{self.path}: written by another version of mdsens (format {study.get('mdsens_format')}, "
                f"this one reads {FORMAT})."
            )
        return study, Layout(**study["layout"])

    def _check_contents(self, config: sc.StudyConfig) -> None:
        study = self._manifest()
        if study is None:
            # study.toml is written just before the manifest: a run killed between the two left it.
            ignored = (CHUNKS, CHECKSUMS, CONFIG_COPY, LOCK)
            entries = [
                p.name for p in self.path.iterdir() if not p.name.startswith(TEMP_PREFIX) and p.name not in ignored
            ]
            entries += [p.name for d in (self.chunk_dir, self.checksum_dir) if d.is_dir() for p in d.iterdir()]
            if entries:
                raise StudyError(
                    f"output folder {self.path}: not empty and holds no study ({MANIFEST} is missing); "
                    "choose a new or empty folder."
                )
            return
        if study.get("config_sha256") != config.digest():
            changed = sc.diff(study.get("config", {}), config.canonical())
            raise StudyResumeError(
                f"output folder {self.path} holds a study with a different configuration "
                f"(changed: {', '.join(changed) or 'format'}); refusing to resume into it. "
                "Use a new --out folder, or delete this one to start over."
            )

    def start(self, study: Mapping[str, Any]) -> set[int]:
        """Write the manifest of a new study, or check the one there and list the
        chunks already done. A chunk that fails its checks is deleted, with a
        warning, to be computed again."""
        existing = self._manifest()
        if existing is None:
            if study["config_source"]:
                _write_text(self.path / CONFIG_COPY, study["config_source"])
            _write_text(self.manifest_path, json.dumps(study, indent=1))
            return set()
        if existing.get("mdsens_format") != FORMAT or existing.get("layout") != json.loads(json.dumps(study["layout"])):
            raise StudyResumeError(
                f"output folder {self.path}: the study's plan (groups, chunks) differs from the one it was "
                "started with (a different mdsens version?); refusing to resume. Use a new --out folder."
            )
        done = set()
        for index in range(len(study["layout"]["chunks"])):
            path = self.chunk_path(index)
            if not path.exists():
                continue
            _, problem = self._chunk(index, study)
            if problem:
                warnings.warn(f"{path}: {problem}; computing this chunk again", RuntimeWarning, stacklevel=2)
                path.unlink()
                continue
            done.add(index)
        return done

    @staticmethod
    def _read(path: pathlib.Path) -> Any:
        import xarray as xr

        with xr.open_dataset(path, engine=ENGINE) as data:
            return data.load()

    def _trusted(self, path: pathlib.Path, study: Mapping[str, Any]) -> tuple[Any, str | None]:
        """The dataset in ``path`` and None, or None and what is wrong with it:
        no checksum, bytes that differ from it, another configuration's digest
        (in the checksum or the file), or unreadable."""
        digest = study["config_sha256"]
        sums = self.checksum_path(path)
        try:
            recorded = json.loads(sums.read_text())
        except FileNotFoundError:
            return None, f"has no checksum ({sums} is missing)"
        except (OSError, ValueError) as error:
            return None, f"its checksum {sums} is unreadable ({error})"
        if not isinstance(recorded, dict) or recorded.get("config_sha256") != digest:
            return None, f"was written for another configuration (according to {sums})"
        if recorded.get("sha256") != _sha256(path):
            return None, "its bytes differ from its sha256 checksum (damaged or replaced)"
        try:
            data = self._read(path)
        except Exception as error:  # a file that matches its checksum but cannot be read
            return None, f"unreadable ({error})"
        if data.attrs.get("config_sha256") != digest:
            return None, "belongs to a study with another configuration (its config_sha256 differs)"
        return data, None

    def _chunk(self, index: int, study: Mapping[str, Any]) -> tuple[Any, str | None]:
        """A chunk file checked by :meth:`_trusted` and against the plan."""
        data, problem = self._trusted(self.chunk_path(index), study)
        if problem is None and (
            int(data.attrs.get("chunk", -1)) != index
            or data["sample"].values.tolist() != study["layout"]["chunks"][index]["samples"]
        ):
            return None, "holds other samples than the plan gives this chunk"
        return data, problem

    def write_chunk(self, index: int, data: Any) -> None:
        """Write a chunk (:func:`chunk_dataset`) and its checksum."""
        path, digest = self.chunk_path(index), data.attrs["config_sha256"]
        _atomic_write(path, lambda temp: data.to_netcdf(temp, engine=ENGINE), self.checksum_path(path), digest)

    def complete(self) -> bool:
        """Whether ``results.nc`` is there and passes its checks; warns if it is there and does not."""
        if not self.results_path.exists():
            return False
        study, _ = self._study()
        _, problem = self._trusted(self.results_path, study)
        if problem:
            warnings.warn(
                f"{self.results_path}: {problem}; rebuilding it from the chunks", RuntimeWarning, stacklevel=2
            )
        return problem is None

    def finish(self, run_info: Mapping[str, Any]) -> Any:
        """Assemble every chunk into ``results.nc`` (atomically) and return the dataset."""
        study, layout = self._study()
        chunks = {}
        for index in range(len(layout.chunks)):
            path = self.chunk_path(index)
            if not path.exists():
                raise StudyError(f"{path} is missing; run the study again to compute it.")
            chunks[index], problem = self._chunk(index, study)
            if problem:
                raise StudyError(f"{path}: {problem}; run the study again to compute it again.")
        dataset = assemble(layout, chunks, study, run_info)
        path = self.results_path
        write = lambda temp: dataset.to_netcdf(temp, engine=ENGINE)  # noqa: E731
        _atomic_write(path, write, self.checksum_path(path), study["config_sha256"])
        return dataset

    def load(self) -> Any:
        """``results.nc`` if the study finished, else the chunks done so far (read
        only: a file that fails its checks is left out, with a warning)."""
        study, layout = self._study()
        if self.results_path.exists():
            data, problem = self._trusted(self.results_path, study)
            if problem is None:
                return data
            warnings.warn(f"{self.results_path}: {problem}; assembling the chunks", RuntimeWarning, stacklevel=2)
        chunks = {}
        for index in range(len(layout.chunks)):
            if self.chunk_path(index).exists():
                data, problem = self._chunk(index, study)
                if problem:
                    warnings.warn(f"{self.chunk_path(index)}: {problem}; left out", RuntimeWarning, stacklevel=2)
                else:
                    chunks[index] = data
        return assemble(layout, chunks, study)
