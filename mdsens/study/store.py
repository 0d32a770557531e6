"""The study folder: manifest, chunk files, resume checks, and the labeled dataset.

Files in ``OUT/``::

    manifest.json      configuration (canonical, defaults filled in), its digest, its text, and the layout
    study.toml         a copy of the configuration file as given
    chunks/chunk-00012.nc   one netCDF file per finished chunk
    results.nc         the assembled dataset, written when every chunk is done

Every file is written to a temporary name in the same folder and moved into
place with ``os.replace``, so a killed study leaves either a whole file or
none. The manifest is written before the first chunk; a rerun with the same
configuration resumes from the chunk files, a rerun with another configuration
is refused. Needs numpy and xarray (h5netcdf engine).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mdsens.study import config as sc
from mdsens.study import schema
from mdsens.study.schema import Layout

FORMAT = 2
ENGINE = "h5netcdf"
MANIFEST, CONFIG_COPY, RESULTS, CHUNKS = "manifest.json", "study.toml", "results.nc", "chunks"
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


def _atomic_write(path: pathlib.Path, write: Callable[[pathlib.Path], object]) -> None:
    """``write(temp)`` then fsync and ``os.replace(temp, path)``."""
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        write(temp)
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
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
        name: (("sample", *layout.dims(name, chunk["group"])), np.asarray(value))
        for name, value in record.items()
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

    data_vars = {name: (dims_of[name], array, schema.attributes(name)) for name, array in arrays.items()}
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
    for key, value in (run_info or {}).items():
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            attrs[f"run_{key}"] = value
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


class StudyFolder:
    """The output folder of one study."""

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = pathlib.Path(path)
        self.manifest_path = self.path / MANIFEST
        self.results_path = self.path / RESULTS
        self.chunk_dir = self.path / CHUNKS
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
            probe = self.path / f"{TEMP_PREFIX}probe.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise StudyError(f"output folder {self.path}: cannot write there ({error.strerror or error}).") from None

    def discard_if_new(self) -> None:
        """Remove the folder again if this run created it and wrote nothing."""
        if getattr(self, "_created", False) and not self.manifest_path.exists():
            with contextlib.suppress(OSError):
                self.chunk_dir.rmdir()
                self.path.rmdir()

    def chunk_path(self, index: int) -> pathlib.Path:
        return self.chunk_dir / f"chunk-{index:05d}.nc"

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

    def check_before_plan(self, config: sc.StudyConfig) -> StudyFolder:
        """Refuse a folder that holds another study or other files; return self."""
        study = self._manifest()
        if study is None:
            # study.toml is written just before the manifest: a run killed between the two left it.
            ignored = (CHUNKS, CONFIG_COPY)
            entries = [
                p.name for p in self.path.iterdir() if not p.name.startswith(TEMP_PREFIX) and p.name not in ignored
            ]
            entries += [p.name for p in self.chunk_dir.iterdir() if not p.name.startswith(TEMP_PREFIX)]
            if entries:
                raise StudyError(
                    f"output folder {self.path}: not empty and holds no study ({MANIFEST} is missing); "
                    "choose a new or empty folder."
                )
            return self
        if study.get("config_sha256") != config.digest():
            changed = sc.diff(study.get("config", {}), config.canonical())
            raise StudyResumeError(
                f"output folder {self.path} holds a study with a different configuration "
                f"(changed: {', '.join(changed) or 'format'}); refusing to resume into it. "
                "Use a new --out folder, or delete this one to start over."
            )
        return self

    def start(self, study: Mapping[str, Any]) -> set[int]:
        """Write the manifest of a new study, or check the one there and list the chunks already done."""
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
        for stale in self.chunk_dir.glob(f"{TEMP_PREFIX}*"):
            stale.unlink(missing_ok=True)
        done = set()
        for index, chunk in enumerate(study["layout"]["chunks"]):
            path = self.chunk_path(index)
            if not path.exists():
                continue
            try:
                samples = self._read(path)["sample"].values.tolist()
            except Exception as error:  # any unreadable file is redone
                warnings.warn(f"{path}: unreadable ({error}); computing this chunk again", RuntimeWarning, stacklevel=2)
                path.unlink()
                continue
            if samples != chunk["samples"]:
                raise StudyError(f"{path}: holds other samples than the plan says; delete the folder to start over.")
            done.add(index)
        return done

    @staticmethod
    def _read(path: pathlib.Path) -> Any:
        import xarray as xr

        with xr.open_dataset(path, engine=ENGINE) as data:
            return data.load()

    def write_chunk(self, index: int, data: Any) -> None:
        _atomic_write(self.chunk_path(index), lambda temp: data.to_netcdf(temp, engine=ENGINE))

    def _chunks_done(self, layout: Layout) -> dict[int, Any]:
        return {i: self._read(self.chunk_path(i)) for i in range(len(layout.chunks)) if self.chunk_path(i).exists()}

    def finish(self, run_info: Mapping[str, Any]) -> Any:
        """Assemble every chunk into ``results.nc`` (atomically) and return the dataset."""
        study, layout = self._study()
        chunks = self._chunks_done(layout)
        missing = sorted(set(range(len(layout.chunks))) - set(chunks))
        if missing:
            raise StudyError(f"{self.path}: chunks {missing} are missing; run the study again to compute them.")
        dataset = assemble(layout, chunks, study, run_info)
        _atomic_write(self.results_path, lambda temp: dataset.to_netcdf(temp, engine=ENGINE))
        return dataset

    def load(self) -> Any:
        """``results.nc`` if the study finished, else the chunks done so far."""
        if self.results_path.exists():
            return self._read(self.results_path)
        study, layout = self._study()
        return assemble(layout, self._chunks_done(layout), study)
