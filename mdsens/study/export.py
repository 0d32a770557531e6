"""One sample of a study as a configuration file for OVITO, ASE or HOOMD::

    from mdsens import study
    study.export("out/study", point=3, seed=0, path="point3.extxyz")

writes the relaxed positions, the box, species, diameters, the forces at the
relaxed state and, per named sensitivity ``s``, the field ``dx*/ds`` as the
per-particle array ``dx_s`` (extended XYZ through :func:`mdsens.io.write_extxyz`,
exact in float64; GSD through :func:`mdsens.io.write_gsd`, positions in float32
and the fields in float64). The system is rebuilt from the study's
configuration (its builder, your builder, or its file and potential), so the
forces are computed with the study's energy and parameters. At fixed
pressure (``[cell]``) the box written is the relaxed one (``box``), and the
fields are the sensitivities of the positions in the relaxing box.
"""

from __future__ import annotations

import json
import pathlib
import re
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from mdsens.io import write_extxyz, write_gsd
from mdsens.study.config import StudyConfig, as_config, parse_config
from mdsens.study.sources import build_system

#: Writers by suffix of the output file.
WRITERS: dict[str, Callable[..., None]] = {".xyz": write_extxyz, ".extxyz": write_extxyz, ".gsd": write_gsd}


def field_name(sensitivity: str) -> str:
    """The per-particle array of the sensitivity field of ``sensitivity``: ``dx_<name>``
    (characters other than letters, digits and ``_`` become ``_``)."""
    return "dx_" + re.sub(r"\W", "_", sensitivity, flags=re.ASCII)


def _dataset(study: Any) -> Any:
    if isinstance(study, (str, pathlib.Path)):
        from mdsens.study.runtime import load

        return load(study)
    return study


def _config(dataset: Any, config: StudyConfig | str | pathlib.Path | None) -> StudyConfig:
    """The study's configuration: ``config`` if given, else the canonical form
    that the dataset records (files named relative to the working directory)."""
    if config is None:
        found = parse_config(json.loads(dataset.attrs["config"]), source="the study's recorded configuration")
    else:
        found = as_config(config)
    if found.digest() != dataset.attrs["config_sha256"]:
        raise ValueError(
            f"{found.source or 'config'}: not the configuration of this study (its sha256 differs: another "
            "configuration, or a configuration file that changed since); pass the study's own as config=."
        )
    return found


def export(
    study: Any,
    point: int,
    seed: int,
    path: str | pathlib.Path,
    *,
    config: StudyConfig | str | pathlib.Path | None = None,
    **options: Any,
) -> None:
    """Write sample ``(point, seed)`` of a study to ``path`` (``.xyz``/``.extxyz``
    or ``.gsd``).

    Args:
        study: a study folder, or its dataset (:func:`mdsens.study.run`, :func:`mdsens.study.load`).
        point: the index of the point (``point`` coordinate).
        seed: the seed (a value of the ``seed`` coordinate, not its position).
        config: the study's configuration (needed when it reads files named
            relative to a configuration file in another folder); default: the
            one the dataset records, files relative to the working directory.
        options: passed on to the writer (``symbols=`` for extended XYZ, ``types=`` for GSD).

    ``ValueError`` for an unknown suffix, point or seed, or a sample not
    computed yet; a ``RuntimeWarning`` if its relaxation or a linear solve
    failed (the fields are then NaN where nothing was computed)."""
    suffix = pathlib.PurePath(path).suffix.lower()
    if suffix not in WRITERS:
        raise ValueError(f"{path}: write .xyz, .extxyz or .gsd; got {suffix!r}.")
    data = _dataset(study)
    seeds = data["seed"].values.tolist()
    if not 0 <= point < data.sizes["point"]:
        raise ValueError(f"point: {point} is not a point of this study (0 to {data.sizes['point'] - 1}).")
    if seed not in seeds:
        raise ValueError(f"seed: {seed} is not a seed of this study ({seeds}).")
    sample = data.isel(point=point, seed=seeds.index(seed))
    if not bool(sample["done"]):
        raise ValueError(f"sample (point {point}, seed {seed}) is not computed yet; run the study to the end.")
    found = _config(data, config)
    n = int(sample["n_particles"])
    system = build_system(found, found.point_args()[point], seed, f"point {point}")
    arrays = {}
    if "position_sensitivity" in sample:
        for name, field in zip(data["sensitivity"].values.tolist(), sample["position_sensitivity"].values, strict=True):
            arrays[field_name(name)] = field[:n]
    if not bool(sample["relax_converged"]) or not bool(np.all(sample.get("solve_converged", True))):
        warnings.warn(
            f"sample (point {point}, seed {seed}) failed to relax or solve; its fields hold NaN where nothing was "
            "computed.",
            RuntimeWarning,
            stacklevel=2,
        )
    params = dict(system.params)
    if "box" in sample:  # at fixed pressure: the relaxed box, not the reference box of the start
        params["box"] = sample["box"].values
    WRITERS[suffix](path, system, sample["positions"].values[:n], params, arrays=arrays, **options)
