"""The study folder: manifest, chunk files, resume checks and the labeled dataset.

Layout of ``OUT/``::

    manifest.json      configuration (canonical, defaults filled in), its digest and the plan
    study.toml         a copy of the configuration file as given
    chunks/chunk-00012.nc   one netCDF file per finished chunk
    results.nc         the assembled dataset, written when every chunk is done

Every file is written to a temporary name in the same folder and moved into
place with ``os.replace``, so a killed study leaves either a whole file or
none. The manifest is written before the first chunk; a rerun with the same
configuration resumes from the chunk files, a rerun with another configuration
is refused. Needs numpy and xarray (h5netcdf engine), not JAX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mdsens import _study_config as sc

FORMAT = 1
ENGINE = "h5netcdf"
MANIFEST, CONFIG_COPY, RESULTS, CHUNKS = "manifest.json", "study.toml", "results.nc", "chunks"
TEMP_PREFIX = ".tmp-"
SPATIAL = ("x", "y", "z")
STATUS_MEANINGS = "converged max_steps nonfinite"


class StudyError(RuntimeError):
    """A study cannot run as asked (output folder, resume); the message says why."""


class StudyResumeError(StudyError):
    """The output folder holds a study with a different configuration."""


# Descriptions of the recorded variables: dims after the leading (point, seed).
VARIABLES: dict[str, tuple[tuple[str, ...], str]] = {
    "positions": (("particle", "spatial"), "relaxed positions x* (not wrapped into the box)"),
    "energy": ((), "relaxed energy E(x*)"),
    "relax_converged": ((), "relaxation reached fmax <= relax.fmax"),
    "relax_fmax": ((), "largest per-particle force norm at x*"),
    "relax_n_steps": ((), "minimiser steps taken"),
    "relax_status": ((), "why the relaxation stopped: 0 converged, 1 max_steps, 2 nonfinite"),
    "n_zero_modes": ((), "zero modes of the Hessian at x* projected out (rattler coordinates + rigid-body modes)"),
    "position_sensitivity": (("sensitivity", "particle", "spatial"), "dx*/dtheta along each named tangent (minimum-norm)"),
    "energy_sensitivity": (("sensitivity",), "dE*/dtheta along each named tangent (envelope theorem)"),
    "solve_residual": (("sensitivity",), "true relative residual of the linear solve"),
    "solve_iterations": (("sensitivity",), "iterations of the linear solve"),
    "solve_converged": (("sensitivity",), "the linear solve met its tolerance"),
    "solve_negative_curvature": (("sensitivity",), "CG met negative curvature (a saddle, not a minimum)"),
}


def _fill(dtype: np.dtype) -> Any:
    if dtype == np.bool_:
        return False
    if np.issubdtype(dtype, np.integer):
        return -1
    return np.nan


def _param_dims(name: str, ndim: int, per_particle: bool) -> list[str]:
    if name == "box":
        return ["spatial", "spatial_b"]
    if ndim == 0:
        return []
    if ndim == 1:
        return ["particle" if per_particle else "species"]
    if ndim == 2:
        return ["species", "species_b"]
    return [f"{name}_axis{k}" for k in range(ndim)]


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


def _atomic_write(path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> None:
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


@dataclasses.dataclass
class Meta:
    """Everything needed to label the results, JSON-serialisable (kept in the
    manifest, so a folder can be read without JAX or the system builders)."""

    config: dict[str, Any]
    config_source: str  # the TOML text as given (not compared on resume)
    config_sha256: str
    seeds: list[int]
    sensitivities: list[str]
    dim: int
    n_particles: list[int]
    species: list[list[int]]
    point_group: list[int]
    groups: list[dict[str, Any]]  # {"n", "param_dims": {name: dims}, "param_shapes": {name: shape}}
    chunks: list[dict[str, Any]]  # {"group", "samples"}
    coords: dict[str, dict[str, Any]]  # varied builder arguments: {"dims", "values"}
    sizes: dict[str, int]

    @classmethod
    def from_plan(cls, plan: Any) -> Meta:
        config = plan.config
        groups = []
        for group in plan.groups:
            args = plan.point_args[group.points[0]]
            per_particle = bool(args.get("per_particle_diameters", False))
            groups.append({
                "n": group.n,
                "param_shapes": {k: list(v) for k, v in group.param_shapes.items()},
                "param_dims": {k: _param_dims(k, len(v), per_particle) for k, v in group.param_shapes.items()},
            })
        n_particles = [plan.groups[g].n for g in plan.point_group]
        species = [np.asarray(plan.groups[g].system.species).tolist() for g in plan.point_group]
        n_species = max([1] + [max(s) + 1 for s in species])
        for group in groups:
            for name, dims in group["param_dims"].items():
                for dim_name, size in zip(dims, group["param_shapes"][name]):
                    if dim_name.startswith("species"):
                        n_species = max(n_species, size)
        coords = {}
        kinds = sc.BUILDERS[config.builder]
        for name in config.varied:
            values = [args.get(name) for args in plan.point_args]
            kind = kinds[name]
            if any(v is None for v in values):  # [[points]] that leave it at the builder's default
                coords[name] = {"dims": ["point"], "values": [json.dumps(v) for v in values]}
            elif kind == sc.FLOATS:
                n_species = max(n_species, max(len(v) for v in values if v is not None))
                coords[name] = {"dims": ["point", "species"], "values": values}
            elif kind == sc.FLOAT_OR_MATRIX and all(isinstance(v, list) for v in values):
                n_species = max(n_species, max(len(v) for v in values))
                coords[name] = {"dims": ["point", "species", "species_b"], "values": values}
            elif kind == sc.FLOAT_OR_MATRIX and any(isinstance(v, list) for v in values):
                coords[name] = {"dims": ["point"], "values": [json.dumps(v) for v in values]}
            else:
                coords[name] = {"dims": ["point"], "values": values}
        dim = plan.groups[0].dim
        sizes = {
            "point": plan.n_points, "seed": plan.n_seeds, "particle": max(n_particles), "spatial": dim,
            "spatial_b": dim, "species": n_species, "species_b": n_species, "sensitivity": len(config.sensitivities),
        }
        return cls(
            config=config.canonical(), config_source=config.text or "",
            config_sha256=config.digest(), seeds=list(config.seeds), sensitivities=list(config.sensitivities),
            dim=dim, n_particles=n_particles, species=species, point_group=plan.point_group.tolist(),
            groups=groups, chunks=[{"group": c.group, "samples": c.samples.tolist()} for c in plan.chunks],
            coords=coords, sizes=sizes,
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- per-chunk files
    def _dims(self, name: str, group: dict[str, Any]) -> tuple[str, ...]:
        if name in VARIABLES:
            return VARIABLES[name][0]
        for prefix in ("energy_grad_", "param_"):
            if name.startswith(prefix):
                return tuple(group["param_dims"][name[len(prefix):]])
        raise KeyError(name)

    def chunk_dataset(self, chunk_index: int, record: Mapping[str, np.ndarray], stats: Mapping[str, Any]) -> Any:
        """One chunk's samples as a Dataset over ``sample`` (group-local sizes)."""
        import xarray as xr

        chunk = self.chunks[chunk_index]
        group = self.groups[chunk["group"]]
        samples = np.asarray(record["sample"], dtype=np.int64)
        if samples.tolist() != chunk["samples"]:
            raise StudyError(f"internal error: chunk {chunk_index} holds other samples than planned")
        variables = {
            name: (("sample", *self._dims(name, group)), np.asarray(value))
            for name, value in record.items() if name != "sample"
        }
        attrs = {"chunk": chunk_index, "group": chunk["group"], "config_sha256": self.config_sha256,
                 **{k: v for k, v in stats.items() if isinstance(v, (int, float))}}
        return xr.Dataset(variables, coords={"sample": samples}, attrs=attrs)

    # -- the assembled dataset
    def dataset(self, chunks: Mapping[int, Any], run_info: Mapping[str, Any] | None = None) -> Any:
        """Place the chunks' samples on the (point, seed) grid, with labels,
        descriptions and the configuration as attributes. Samples of missing
        chunks are NaN / -1 / False and ``done`` is False there."""
        import xarray as xr

        n_points, n_seeds = self.sizes["point"], self.sizes["seed"]
        arrays: dict[str, np.ndarray] = {}
        dims_of: dict[str, tuple[str, ...]] = {}
        done = np.zeros((n_points, n_seeds), dtype=bool)
        chunk_of = np.full((n_points, n_seeds), -1, dtype=np.int64)
        for index, data in sorted(chunks.items()):
            group = self.groups[self.chunks[index]["group"]]
            samples = np.asarray(data["sample"].values, dtype=np.int64)
            points, seeds = np.divmod(samples, n_seeds)
            if done[points, seeds].any():
                raise StudyError(f"chunk {index} repeats samples that another chunk already holds")
            done[points, seeds] = True
            chunk_of[points, seeds] = index
            for name, variable in data.data_vars.items():
                value = np.asarray(variable.values)
                if name not in arrays:
                    dims = self._dims(name, group)
                    shape = (n_points, n_seeds, *(self.sizes[d] for d in dims))
                    arrays[name] = np.full(shape, _fill(value.dtype), dtype=value.dtype)
                    dims_of[name] = ("point", "seed", *dims)
                target = (points, seeds, *(slice(0, s) for s in value.shape[1:]))
                arrays[name][target] = value
        expected = sum(len(c["samples"]) for c in self.chunks)
        if n_points * n_seeds != expected:
            raise StudyError("internal error: the plan does not cover every sample once")

        data_vars = {}
        for name, array in arrays.items():
            attrs = {}
            if name in VARIABLES:
                attrs["description"] = VARIABLES[name][1]
            elif name.startswith("energy_grad_"):
                attrs["description"] = f"dE*/d{name[12:]} at x* (envelope theorem), every entry of the parameter"
            elif name.startswith("param_"):
                attrs["description"] = f"value of the parameter {name[6:]!r} of the sample's system"
            if name == "relax_status":
                attrs.update(flag_values=np.array([0, 1, 2], dtype=np.int32), flag_meanings=STATUS_MEANINGS)
            data_vars[name] = (dims_of[name], array, attrs)
        n_max = self.sizes["particle"]
        species = np.full((n_points, n_max), -1, dtype=np.int32)
        for i, s in enumerate(self.species):
            species[i, : len(s)] = s
        data_vars["particle_species"] = (("point", "particle"), species, {"description": "species of each particle (-1: padding)"})
        data_vars["n_particles"] = (("point",), np.asarray(self.n_particles, dtype=np.int32), {"description": "N of each point"})
        data_vars["done"] = (("point", "seed"), done, {"description": "this sample has been computed"})
        data_vars["chunk_index"] = (("point", "seed"), chunk_of, {"description": "chunk file that holds this sample (-1: not done)"})

        coords: dict[str, Any] = {
            "point": np.arange(n_points),
            "seed": np.asarray(self.seeds, dtype=np.int64),
            "particle": np.arange(n_max),
            "spatial": list(SPATIAL[: self.dim]),
            "spatial_b": list(SPATIAL[: self.dim]),
        }
        if self.sensitivities:
            coords["sensitivity"] = list(self.sensitivities)
        for name, coord in self.coords.items():
            values = coord["values"]
            if len(coord["dims"]) == 1:
                coords[name] = (("point",), np.asarray(values))
            else:
                shape = (n_points, *(self.sizes[d] for d in coord["dims"][1:]))
                array = np.full(shape, np.nan)
                for i, v in enumerate(values):
                    v = np.asarray(v, dtype=np.float64)
                    array[(i, *(slice(0, s) for s in v.shape))] = v
                coords[name] = (tuple(coord["dims"]), array)
        attrs = {
            "title": "mdsens study",
            "description": self.config["study"]["description"],
            "builder": self.config["system"]["builder"],
            "config": json.dumps(self.config, sort_keys=True),
            "config_source": self.config_source,
            "config_sha256": self.config_sha256,
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
            raise StudyError(
                f"output folder {self.path}: cannot write there ({error.strerror or error})."
            ) from None

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

    def check_before_plan(self, config: sc.StudyConfig) -> StudyFolder:
        """Refuse a folder that holds another study or other files; return self."""
        manifest = self._manifest()
        if manifest is None:
            # study.toml is written just before the manifest: a run killed between the two left it.
            ignored = (CHUNKS, CONFIG_COPY)
            entries = [p.name for p in self.path.iterdir() if not p.name.startswith(TEMP_PREFIX) and p.name not in ignored]
            entries += [p.name for p in self.chunk_dir.iterdir() if not p.name.startswith(TEMP_PREFIX)]
            if entries:
                raise StudyError(
                    f"output folder {self.path}: not empty and holds no study ({MANIFEST} is missing); "
                    "choose a new or empty folder."
                )
            return self
        if manifest.get("config_sha256") != config.digest():
            changed = sc.diff(manifest.get("config", {}), config.canonical())
            raise StudyResumeError(
                f"output folder {self.path} holds a study with a different configuration "
                f"(changed: {', '.join(changed) or 'format'}); refusing to resume into it. "
                "Use a new --out folder, or delete this one to start over."
            )
        return self

    def start(self, config: sc.StudyConfig, meta: Mapping[str, Any]) -> set[int]:
        """Write the manifest of a new study, or check it and list the chunks already done."""
        manifest = self._manifest()
        if manifest is None:
            if config.text is not None:
                _write_text(self.path / CONFIG_COPY, config.text)
            _write_text(self.manifest_path, json.dumps({
                "mdsens_format": FORMAT,
                "config_sha256": config.digest(),
                "config": config.canonical(),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "meta": meta,
            }, indent=1))
            return set()
        def plan_of(m: Mapping[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in json.loads(json.dumps(m)).items() if k != "config_source"}

        if plan_of(manifest.get("meta", {})) != plan_of(meta):
            raise StudyResumeError(
                f"output folder {self.path}: the study's plan (groups, chunks) differs from the one it was "
                "started with (a different mdsens version?); refusing to resume. Use a new --out folder."
            )
        for stale in self.chunk_dir.glob(f"{TEMP_PREFIX}*"):
            stale.unlink(missing_ok=True)
        done = set()
        for index, chunk in enumerate(meta["chunks"]):
            path = self.chunk_path(index)
            if not path.exists():
                continue
            try:
                samples = self._read(path)["sample"].values.tolist()
            except Exception as error:  # noqa: BLE001 - any unreadable file is redone
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

    def meta(self) -> Meta:
        manifest = self._manifest()
        if manifest is None:
            raise StudyError(f"{self.path}: not a study folder (no {MANIFEST}).")
        return Meta(**manifest["meta"])

    def chunks_done(self, meta: Meta) -> dict[int, Any]:
        return {i: self._read(self.chunk_path(i)) for i in range(len(meta.chunks)) if self.chunk_path(i).exists()}

    def finish(self, meta: Meta, run_info: Mapping[str, Any]) -> Any:
        """Assemble every chunk into ``results.nc`` (atomically) and return the dataset."""
        chunks = self.chunks_done(meta)
        missing = sorted(set(range(len(meta.chunks))) - set(chunks))
        if missing:
            raise StudyError(f"{self.path}: chunks {missing} are missing; run the study again to compute them.")
        dataset = meta.dataset(chunks, run_info)
        _atomic_write(self.results_path, lambda temp: dataset.to_netcdf(temp, engine=ENGINE))
        return dataset

    def load(self) -> Any:
        if self.results_path.exists():
            return self._read(self.results_path)
        meta = self.meta()
        return meta.dataset(self.chunks_done(meta))
