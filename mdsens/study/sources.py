"""Where a study's systems come from (``[system]`` of :mod:`mdsens.study.config`):

- a builder of :mod:`mdsens.systems` (the default, a fixed list);
- your own builder ``"package.module:function"``, imported and called as
  ``function(**arguments, seed=seed)``: it runs your code, as a script would;
- a configuration file read by :mod:`mdsens.io` (extended XYZ and every format
  ASE reads, GSD, LAMMPS data) with a potential of
  :mod:`mdsens.systems.potentials` attached, one file per seed if its name
  holds ``{seed}``. Its sha256, recorded when the configuration was parsed, is
  checked at every read.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from mdsens import systems
from mdsens.io import read_ase, read_gsd, read_lammps_data
from mdsens.study.config import LAMMPS_DATA, POTENTIALS, StudyConfig, _fail, sha256_of
from mdsens.systems import System
from mdsens.systems.potentials import LennardJones, Morse, Potential, SoftSpheres, StillingerWeber
from mdsens.systems.stillinger_weber import SILICON


def build_system(config: StudyConfig, args: Mapping[str, Any], seed: int, key: str = "system") -> System:
    """The System of one sample (``key`` names its point in messages): a
    builder's ``ValueError``, a file that cannot be read or a system without a
    parameter that ``[sensitivities]`` names becomes a StudyConfigError."""
    if config.origin == "builder":
        try:
            return getattr(systems, config.builder)(**args, seed=seed)
        except (ValueError, TypeError) as error:
            raise _fail(config.source, key, f"{config.builder} rejected its arguments: {error}") from None
    system = read_file(config, args, seed, key) if config.origin == "file" else _call_builder(config, args, seed, key)
    if not isinstance(system.params, Mapping):
        raise _fail(config.source, key, f"studies need params as a dict of arrays; got {type(system.params).__name__}.")
    for name, tangent in config.sensitivities.items():
        for param in tangent:
            if param not in system.params and not (param == "pressure" and config.at_pressure):
                raise _fail(
                    config.source,
                    f"sensitivities.{name}.{param}",
                    f"the system ({key}) has no parameter {param!r}; its params are {', '.join(system.params)}.",
                )
    return system


def potential(config: StudyConfig, args: Mapping[str, Any]) -> Potential:
    """The potential that a ``[system]`` file is given, with the point's options."""
    options = {name: value for name, value in args.items() if name in POTENTIALS[config.builder]}
    for name in ("sigma", "epsilon", "diameters"):  # lists to tuples: potentials are hashable values
        if isinstance(options.get(name), list):
            options[name] = tuple(tuple(v) if isinstance(v, list) else v for v in options[name])
    if config.builder == "soft_spheres":
        return SoftSpheres(**options)
    if config.builder == "lennard_jones":
        return LennardJones(**options)
    if config.builder == "morse":
        return Morse(**options)
    return StillingerWeber(params={**SILICON, **options})


def read_file(config: StudyConfig, args: Mapping[str, Any], seed: int, key: str = "system") -> System:
    """The System of a ``[system]`` file (the point's ``file``, ``{seed}``
    filled in) with :func:`potential` attached; a file that differs from the
    one whose sha256 was recorded, or that the reader rejects, raises a
    StudyConfigError that names the file."""
    name = args["file"].format(seed=seed)
    path = config.file_path(args["file"], seed)
    try:
        changed = sha256_of(path) != config.digests[name]
    except OSError as error:
        raise _fail(config.source, key, f"cannot read the configuration file {path} ({error.strerror}).") from None
    if changed:
        raise _fail(
            config.source, key, f"{path} changed after the configuration was read; parse the configuration again."
        )
    attach = potential(config, args)
    file_format, frame = config.file_format(args["file"]), args.get("frame", -1)
    species, dim = args.get("species"), args.get("dim")
    try:
        if file_format == "gsd":
            return read_gsd(path, attach, frame=frame, species=species, dim=dim)
        if file_format == LAMMPS_DATA:
            return read_lammps_data(path, attach, atom_style=args.get("atom_style"), dim=dim or 3)
        return read_ase(path, attach, index=frame, format=file_format or None, species=species, dim=dim or 3)
    except ValueError as error:  # the readers name the file and the field
        raise _fail(config.source, key, str(error)) from error


def builder_function(config: StudyConfig) -> Callable[..., Any]:
    """Your builder ``"package.module:function"``, imported (its module runs)."""
    module_name, _, function_name = config.builder.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise _fail(config.source, "system.builder", f"cannot import {module_name!r}: {error}") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise _fail(config.source, "system.builder", f"module {module_name!r} has no function {function_name!r}.")
    parameters = inspect.signature(function).parameters.values()
    if not any(p.name == "seed" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        raise _fail(
            config.source, "system.builder", f"{config.builder} must take the keyword argument seed (study.seeds)."
        )
    return function


def _call_builder(config: StudyConfig, args: Mapping[str, Any], seed: int, key: str) -> System:
    try:
        system = builder_function(config)(**args, seed=seed)
    except (ValueError, TypeError) as error:
        raise _fail(config.source, key, f"{config.builder} rejected its arguments: {error}") from error
    if not isinstance(system, System):
        raise _fail(
            config.source,
            "system.builder",
            f"{config.builder} returned {type(system).__name__}, not an mdsens.System ({key}).",
        )
    return system
