"""The TOML configuration of a study: parsing, validation, canonical form.

Standard library only (``tomllib``), no JAX or numpy: a bad configuration is
reported before anything heavy runs, and this module can be read on its own.
Every error is a :class:`StudyConfigError` whose message names the offending
key (``grid.phi[2]``, ``relax.fmax``...). The ``[relax]`` and ``[solve]``
tables are the TOML surface of option values: :mod:`mdsens.study.plan` turns
them into a minimiser (:class:`mdsens.FIRE`, :class:`mdsens.GradientDescent`)
and an :class:`mdsens.Implicit` adjoint with its linear solver, once.

Schema (every section but ``[system]`` is optional)::

    [study]
    description = "free text"
    seeds = 4                 # 4 -> seeds 0, 1, 2, 3; or a list [0, 7, 11]
    chunk_size = 32           # samples (point x seed) per chunk file (resume unit)
    schedule = "inflight"     # or "vmap" (refill a batch only once all its samples are done)

    [system]                  # a builder of mdsens.systems and its arguments
    builder = "soft_sphere_packing"
    n = 32
    diameters = [1.0, 1.4]

    # or your own builder, "package.module:function", called as
    # function(**arguments, seed=seed) and returning an mdsens.System:
    # builder = "my_package.systems:packing"   # runs your code, as a script would

    # or a configuration file and the potential to attach (mdsens.io readers):
    # file = "packing.gsd"      # relative to this file; "packing-{seed}.gsd": one per seed
    # potential = "soft_spheres"  # soft_spheres, lennard_jones, morse, stillinger_weber
    # epsilon = 1.0             # the potential's options (see POTENTIALS)
    # format = "gsd"            # default from the suffix: .gsd, .data/.lmp (LAMMPS), else ASE's guess

    [grid]                    # Cartesian product, first key varies slowest
    phi = [0.84, 0.88]
    diameters = [[1.0, 1.2], [1.0, 1.4]]

    # or, instead of [grid], an explicit list of points:
    # [[points]]
    # phi = 0.84

    [relax]                   # the minimiser
    method = "fire"           # mdsens.FIRE, or "gradient_descent" (mdsens.GradientDescent)
    fmax = 1e-12
    max_steps = 100000
    # dt_max = 0.4            # default: the system's own

    [solve]                   # mdsens.Implicit: linear solves of the sensitivities
    solver = "cg"             # cg, minres, bicgstab, dense: mdsens.CG, MINRES, BiCGSTAB, Dense
    rtol = 1e-10
    zero_modes = "auto"       # or "none"

    [sensitivities.small_diameter]   # a named forward-mode tangent of params
    diameters = [1.0, 0.0]           # scalar (broadcast) or array per param

    [cell]                    # relax the box too, at a target pressure (mdsens.cell.at_pressure)
    mode = "isotropic"        # "fixed" (default: the builder's box), "isotropic" (volume), "full" (every strain)
    pressure = 1e-3           # the target pressure (positive: compressive); a tangent may name "pressure"
    stress_tolerance = 1e-10  # converged: also |stress + pressure| below this (mdsens.cell.relaxed)
    # grid or point keys cell_mode and cell_pressure vary the mode and the target per point

    [observables]
    moduli = true             # per sample: stiffness (Voigt), bulk and shear moduli (mdsens.observables)
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import importlib.util
import itertools
import json
import math
import pathlib
import re
import tomllib
from collections.abc import Mapping
from typing import Any

# Argument kinds of the builders.
INT, FLOAT, BOOL, FLOATS, FLOAT_OR_MATRIX = "int", "float", "bool", "floats", "float_or_matrix"

# Arguments of each builder in mdsens.systems (except ``seed``, which comes from
# study.seeds) and the names of its params. tests/test_study.py checks this
# table against the builders' signatures. ``neighbor_list`` is passed on to
# builders that take it (the study itself batches all-pairs energies only).
BUILDERS: dict[str, dict[str, str]] = {
    "soft_sphere_packing": {
        "n": INT,
        "dim": INT,
        "phi": FLOAT,
        "diameters": FLOATS,
        "fractions": FLOATS,
        "alpha": FLOAT,
        "epsilon": FLOAT,
        "per_particle_diameters": BOOL,
        "neighbor_list": BOOL,
    },
    "lennard_jones": {
        "n": INT,
        "dim": INT,
        "density": FLOAT,
        "sigma": FLOAT_OR_MATRIX,
        "epsilon": FLOAT_OR_MATRIX,
        "fractions": FLOATS,
        "cutoff": FLOAT,
        "neighbor_list": BOOL,
    },
    "kob_andersen": {"n": INT, "density": FLOAT, "neighbor_list": BOOL},
    "morse": {
        "n": INT,
        "dim": INT,
        "density": FLOAT,
        "sigma": FLOAT_OR_MATRIX,
        "epsilon": FLOAT_OR_MATRIX,
        "alpha": FLOAT,
        "fractions": FLOATS,
        "cutoff": FLOAT,
        "neighbor_list": BOOL,
    },
    "lennard_jones_cluster": {"n": INT, "dim": INT, "sigma": FLOAT, "epsilon": FLOAT},
}
BUILDER_PARAMS: dict[str, tuple[str, ...]] = {
    "soft_sphere_packing": ("diameters", "epsilon", "alpha", "box"),
    "lennard_jones": ("sigma", "epsilon", "box"),
    "kob_andersen": ("sigma", "epsilon", "box"),
    "morse": ("sigma", "epsilon", "alpha", "box"),
    "lennard_jones_cluster": ("sigma", "epsilon"),
}
# Defaults the study needs to know without calling the builder.
DEFAULT_DIM = {"kob_andersen": 3, "soft_sphere_packing": 2}

# Potentials that a [system] file can be given (mdsens.systems.potentials): their
# options and the names of their params. tests/test_study_sources.py checks this
# table against the potentials.
SILICON_PARAMS = ("epsilon", "sigma", "a", "lambda", "gamma", "cos_theta0", "A", "B", "p", "q")
POTENTIALS: dict[str, dict[str, str]] = {
    "soft_spheres": {"epsilon": FLOAT, "alpha": FLOAT, "diameters": FLOATS, "neighbor_list": BOOL},
    "lennard_jones": {"sigma": FLOAT_OR_MATRIX, "epsilon": FLOAT_OR_MATRIX, "cutoff": FLOAT, "neighbor_list": BOOL},
    "morse": {
        "sigma": FLOAT_OR_MATRIX,
        "epsilon": FLOAT_OR_MATRIX,
        "alpha": FLOAT,
        "cutoff": FLOAT,
        "neighbor_list": BOOL,
    },
    "stillinger_weber": dict.fromkeys(SILICON_PARAMS, FLOAT),
}
POTENTIAL_PARAMS: dict[str, tuple[str, ...]] = {
    "soft_spheres": ("diameters", "epsilon", "alpha", "box"),
    "lennard_jones": ("sigma", "epsilon", "box"),
    "morse": ("sigma", "epsilon", "alpha", "box"),
    "stillinger_weber": (*SILICON_PARAMS, "box"),
}
# How a [system] file is read; only `file` and `frame` may vary between points.
STR, STRS = "str", "strs"
LAMMPS_DATA = "lammps-data"
FILE_KEYS: dict[str, Any] = {
    "file": STR,
    "format": STR,  # "gsd", "lammps-data", or a format name of ASE
    "frame": INT,
    "species": STRS,
    "dim": INT,
    "atom_style": ("atomic", "sphere"),
}
FORMAT_OF_SUFFIX = {".gsd": "gsd", ".data": LAMMPS_DATA, ".lmp": LAMMPS_DATA, ".lammps": LAMMPS_DATA}

SCHEDULES = ("inflight", "vmap")
RELAX_METHODS = ("fire", "gradient_descent")
SOLVERS = ("cg", "minres", "bicgstab", "dense")
ZERO_MODES = ("auto", "none")

SECTIONS = ("study", "system", "grid", "points", "relax", "solve", "sensitivities", "cell", "observables")
STUDY_KEYS = {"description": "str", "seeds": "seeds", "chunk_size": "positive_int", "schedule": SCHEDULES}
RELAX_KEYS = {"method": RELAX_METHODS, "fmax": "positive", "max_steps": "positive_int", "dt_max": "positive"}
SOLVE_KEYS = {
    "solver": SOLVERS,
    "rtol": "positive",
    "atol": "non_negative",
    "max_iter": "positive_int",
    "rcond": "positive",
    "zero_modes": ZERO_MODES,
}
# [cell]: fixed-pressure equilibria (mdsens.cell). "fixed" keeps each system's box.
CELL_MODES = ("fixed", "isotropic", "full")
CELL_KEYS = {"mode": CELL_MODES, "pressure": FLOAT, "stress_tolerance": "positive"}
#: Grid and point keys that vary ``[cell]`` per point (not builder arguments).
CELL_POINT_KEYS: dict[str, Any] = {"cell_mode": CELL_MODES[1:], "cell_pressure": FLOAT}
OBSERVABLES_KEYS = {"moduli": BOOL}
DEFAULTS: dict[str, dict[str, Any]] = {
    "study": {"description": "", "seeds": [0], "chunk_size": 32, "schedule": "inflight"},
    "relax": {"method": "fire", "fmax": 1e-12, "max_steps": 100_000},
    # Tolerances left out here take the defaults of the solver values (mdsens.CG...).
    "solve": {"solver": "cg", "zero_modes": "auto"},
    # mdsens.cell.STRESS_TOLERANCE (tests/test_study_cell.py checks it).
    "cell": {"mode": "fixed", "stress_tolerance": 1e-10},
    "observables": {"moduli": False},
}


class StudyConfigError(ValueError):
    """A study configuration is invalid; the message names the key."""


def _fail(source: str, key: str, message: str) -> StudyConfigError:
    where = f"{source}: " if source else ""
    return StudyConfigError(f"{where}{key}: {message}")


def _unknown(source: str, key: str, allowed: Any) -> StudyConfigError:
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, list(allowed), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return _fail(source, key, f"unknown key{hint}; allowed: {', '.join(sorted(allowed))}.")


def _type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_number(source: str, key: str, value: Any) -> float:
    if not _is_number(value):
        raise _fail(source, key, f"expected a number, got {_type_name(value)} ({value!r}).")
    if not math.isfinite(value):
        raise _fail(source, key, f"must be finite, got {value!r}.")
    return float(value)


def _check_value(source: str, key: str, kind: Any, value: Any) -> Any:
    """Validate one option value of a known kind; return it normalised."""
    if isinstance(kind, tuple):  # a choice
        if value not in kind:
            raise _fail(source, key, f"must be one of {', '.join(map(repr, kind))}; got {value!r}.")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise _fail(source, key, f"expected a string, got {_type_name(value)}.")
        return value
    if kind in (INT, "positive_int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(source, key, f"expected an integer, got {_type_name(value)} ({value!r}).")
        if kind == "positive_int" and value < 1:
            raise _fail(source, key, f"must be an integer >= 1; got {value}.")
        return value
    if kind == BOOL:
        if not isinstance(value, bool):
            raise _fail(source, key, f"expected true or false, got {_type_name(value)} ({value!r}).")
        return value
    if kind in (FLOAT, "positive", "non_negative"):
        value = _check_number(source, key, value)
        if kind == "positive" and not value > 0:
            raise _fail(source, key, f"must be positive; got {value}.")
        if kind == "non_negative" and value < 0:
            raise _fail(source, key, f"must be >= 0; got {value}.")
        return value
    if kind == FLOATS:
        if not isinstance(value, list) or not value:
            raise _fail(source, key, f"expected a non-empty list of numbers, got {_type_name(value)} ({value!r}).")
        return [_check_number(source, f"{key}[{i}]", v) for i, v in enumerate(value)]
    if kind == FLOAT_OR_MATRIX:
        if _is_number(value):
            return _check_number(source, key, value)
        if not isinstance(value, list) or not value or not all(isinstance(row, list) for row in value):
            raise _fail(source, key, f"expected a number or a square matrix (list of lists), got {value!r}.")
        if any(len(row) != len(value) for row in value):
            raise _fail(source, key, f"must be a square matrix; got rows of lengths {[len(r) for r in value]}.")
        return [
            [_check_number(source, f"{key}[{i}][{j}]", v) for j, v in enumerate(row)] for i, row in enumerate(value)
        ]
    if kind == "seeds":
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise _fail(source, key, f"a number of seeds must be >= 1; got {value}.")
            return list(range(value))
        if not isinstance(value, list) or not value:
            raise _fail(source, key, f"expected a number of seeds or a non-empty list of integers, got {value!r}.")
        for i, seed in enumerate(value):
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise _fail(source, f"{key}[{i}]", f"seeds must be integers >= 0; got {seed!r}.")
        if len(set(value)) != len(value):
            raise _fail(source, key, f"seeds must be distinct; got {value}.")
        return list(value)
    if kind == STRS:
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise _fail(source, key, f"expected a non-empty list of names (strings), got {value!r}.")
        return list(value)
    raise AssertionError(kind)


def _check_table(source: str, key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(source, key, f"expected a table ([{key}]), got {_type_name(value)}.")
    return value


def _options(source: str, section: str, table: Any, kinds: dict[str, Any]) -> dict[str, Any]:
    table = _check_table(source, section, table)
    result = dict(DEFAULTS.get(section, {}))
    for name, value in table.items():
        if name not in kinds:
            raise _unknown(source, f"{section}.{name}", kinds)
        result[name] = _check_value(source, f"{section}.{name}", kinds[name], value)
    return result


def _tangent_value(source: str, key: str, value: Any) -> Any:
    """A tangent entry: a number or a (nested) rectangular list of numbers."""
    if _is_number(value):
        return _check_number(source, key, value)
    if isinstance(value, list) and value:
        entries = [_tangent_value(source, f"{key}[{i}]", v) for i, v in enumerate(value)]
        shapes = {json.dumps(_shape(e)) for e in entries}
        if len(shapes) != 1:
            raise _fail(source, key, "must be a rectangular array (rows of equal length).")
        return entries
    raise _fail(source, key, f"expected a number or an array of numbers, got {_type_name(value)} ({value!r}).")


def _shape(value: Any) -> list[int]:
    return [len(value), *_shape(value[0])] if isinstance(value, list) else []


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """A validated study configuration (see the module docstring for the schema).

    Attributes:
        builder: name of the system builder in :mod:`mdsens.systems`, your
            builder's ``"package.module:function"``, or, for a ``[system]``
            file, the name of its potential (a key of :data:`POTENTIALS`).
        system: the builder arguments shared by all points (for a file: its
            reader options and the potential's).
        grid: argument -> list of values (Cartesian product), or None.
        points: explicit list of argument overrides, or None.
        seeds, chunk_size, schedule, description: from ``[study]``.
        relax, solve: options with defaults filled in.
        sensitivities: tangent name -> {param name: number or nested list}.
        cell: ``[cell]`` with defaults: ``mode``, ``stress_tolerance`` and the target ``pressure`` if given.
        observables: ``[observables]`` with defaults (``moduli``).
        source: where it was read from (for messages).
        text: the TOML text it was parsed from, if any.
        origin: where the systems come from: ``"builder"`` (:mod:`mdsens.systems`),
            ``"python"`` (your builder) or ``"file"``.
        digests: sha256 of every configuration file (by its name, seeds filled
            in) or of your builder's module (by its name); part of the
            canonical form, so that a changed file is detected on resume.
        kinds: the kind of each argument (:data:`BUILDERS`; inferred from the
            values for your builder's).
        root: the folder that relative file names are read from (the
            configuration file's, else the working directory at parsing).
    """

    builder: str
    system: dict[str, Any]
    grid: dict[str, list[Any]] | None
    points: list[dict[str, Any]] | None
    seeds: tuple[int, ...]
    chunk_size: int
    schedule: str
    description: str
    relax: dict[str, Any]
    solve: dict[str, Any]
    sensitivities: dict[str, dict[str, Any]]
    cell: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(DEFAULTS["cell"]))
    observables: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(DEFAULTS["observables"]))
    source: str = dataclasses.field(default="", compare=False)
    text: str | None = dataclasses.field(default=None, compare=False)
    origin: str = "builder"
    digests: dict[str, str] = dataclasses.field(default_factory=dict)
    kinds: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)
    root: pathlib.Path = dataclasses.field(default_factory=pathlib.Path.cwd, compare=False)

    def point_args(self) -> list[dict[str, Any]]:
        """Builder arguments of every point (``[system]`` overlaid with the grid
        combination or the listed point), in study order."""
        return [{k: v for k, v in values.items() if k not in CELL_POINT_KEYS} for values in self.point_values()]

    def point_cells(self) -> list[dict[str, Any]]:
        """``{"mode", "pressure"}`` of every point: ``[cell]`` overlaid with the
        point's ``cell_mode`` and ``cell_pressure`` (pressure None: not given)."""
        return [
            {
                "mode": v.get("cell_mode", self.cell["mode"]),
                "pressure": v.get("cell_pressure", self.cell.get("pressure")),
            }
            for v in self.point_values()
        ]

    @functools.cached_property
    def at_pressure(self) -> bool:
        """The boxes relax at a target pressure (``[cell]`` mode other than ``"fixed"``)."""
        return any(c["mode"] != "fixed" for c in self.point_cells())

    def point_values(self) -> list[dict[str, Any]]:
        """Every point's values: its builder arguments and its ``cell_*`` keys
        (computed once: do not change them)."""
        return self._point_values

    @functools.cached_property
    def _point_values(self) -> list[dict[str, Any]]:
        if self.grid:
            names = list(self.grid)
            combos = itertools.product(*(self.grid[name] for name in names))
            return [{**self.system, **dict(zip(names, combo, strict=True))} for combo in combos]
        if self.points:
            return [{**self.system, **point} for point in self.points]
        return [dict(self.system)]

    @property
    def varied(self) -> list[str]:
        """Arguments that change between points (the coordinates of ``point``)."""
        if self.grid:
            return list(self.grid)
        if self.points:
            return list(dict.fromkeys(name for point in self.points for name in point))
        return []

    @property
    def dim(self) -> int:
        """The spatial dimension of every point (the builder's default if not
        given; 3 for a file or your builder that does not say)."""
        return self.point_args()[0].get("dim", DEFAULT_DIM.get(self.builder, 3))

    def canonical(self) -> dict[str, Any]:
        """Plain dict of everything that determines the results (defaults filled in)."""
        data: dict[str, Any] = {
            "study": {
                "description": self.description,
                "seeds": list(self.seeds),
                "chunk_size": self.chunk_size,
                "schedule": self.schedule,
            },
            "system": {"builder": self.builder, **self.system},
            "relax": dict(self.relax),
            "solve": dict(self.solve),
        }
        if self.origin == "file":
            data["system"]["potential"] = self.builder
        if self.digests:
            data["system"]["sha256"] = dict(self.digests)
        if self.grid:
            data["grid"] = {k: list(v) for k, v in self.grid.items()}
        if self.points:
            data["points"] = [dict(p) for p in self.points]
        if self.sensitivities:
            data["sensitivities"] = {k: dict(v) for k, v in self.sensitivities.items()}
        # Only when used: the digests of studies without them stay as they were.
        if self.at_pressure:
            data["cell"] = dict(self.cell)
        if self.observables != DEFAULTS["observables"]:
            data["observables"] = dict(self.observables)
        return data

    def canonical_json(self) -> str:
        return json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def file_path(self, name: str, seed: int) -> pathlib.Path:
        """The configuration file ``name`` (a point's ``file``) of one seed:
        ``{seed}`` replaced by the seed, relative to :attr:`root`."""
        return self.root / name.format(seed=seed)

    def file_format(self, name: str) -> str:
        """How the file ``name`` is read: ``[system] format``, else from its
        suffix (``"gsd"``, ``"lammps-data"``), else ``""`` (ASE guesses)."""
        return file_format(name, self.system.get("format", ""))


def file_format(name: str, given: str = "") -> str:
    """``given``, else the format of the file ``name`` by its suffix (``""``: ASE guesses)."""
    return given or FORMAT_OF_SUFFIX.get(pathlib.PurePath(name).suffix.lower(), "")


def sha256_of(path: str | pathlib.Path) -> str:
    """The sha256 of a file's bytes (hex)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _check_point_name(source: str, key: str, name: str, kinds: dict[str, Any] | None) -> None:
    """``kinds``: the arguments that may vary (None: any, your builder's)."""
    if name == "seed":
        raise _fail(source, key, "seeds are set by study.seeds, not per point.")
    if name in ("builder", "potential"):
        raise _fail(source, key, f"the {name} cannot vary within a study; run one study per {name}.")
    if kinds is not None and name not in kinds and name not in CELL_POINT_KEYS:
        raise _unknown(source, key, [*kinds, *CELL_POINT_KEYS])


def _kind_of(source: str, key: str, value: Any) -> str:
    """The kind of an argument of your builder, from its value."""
    if isinstance(value, bool):
        return BOOL
    kind = {int: INT, float: FLOAT, str: STR}.get(type(value))
    if kind:
        return kind
    if isinstance(value, list) and value and all(isinstance(row, list) for row in value):
        return FLOAT_OR_MATRIX
    if isinstance(value, list):
        return FLOATS
    raise _fail(
        source,
        key,
        "the arguments of a Python builder are numbers, booleans, strings, lists of numbers or square "
        f"matrices; got {_type_name(value)} ({value!r}).",
    )


def _argument(source: str, key: str, value: Any, kind: Any) -> Any:
    """An argument validated as of ``kind`` (None: of the kind of its value)."""
    return _check_value(source, key, _kind_of(source, key, value) if kind is None else kind, value)


def _point_override(source: str, key: str, name: str, value: Any, kinds: dict[str, Any] | None) -> Any:
    if name in CELL_POINT_KEYS:
        return _check_value(source, key, CELL_POINT_KEYS[name], value)
    _check_point_name(source, key, name, kinds)
    return _argument(source, key, value, None if kinds is None else kinds[name])


_BUILDER_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*\Z")


def _system_origin(source: str, system: dict[str, Any]) -> tuple[str, str, dict[str, Any] | None]:
    """``(builder, origin, kinds)`` of a ``[system]`` table (``builder`` and
    ``potential`` taken out of it); ``kinds``: its arguments' (None: your builder's)."""
    if "file" in system or "potential" in system:
        potential = system.pop("potential", None)
        # The canonical form names the potential as the builder too.
        if "builder" in system and system.pop("builder") != potential:
            raise _fail(source, "system.builder", "give a builder, or a file and its potential, not both.")
        if potential not in POTENTIALS:
            what = "missing" if potential is None else f"unknown potential {potential!r}"
            raise _fail(source, "system.potential", f"{what}: the potential to attach; one of {', '.join(POTENTIALS)}.")
        return potential, "file", {**FILE_KEYS, **POTENTIALS[potential]}
    builders = f"one of {', '.join(BUILDERS)}, or your own as 'package.module:function'"
    if "builder" not in system:
        raise _fail(source, "system.builder", f"missing; {builders} (or give a file and its potential).")
    builder = system.pop("builder")
    if isinstance(builder, str) and ":" in builder:
        if not _BUILDER_PATH.match(builder):
            raise _fail(source, "system.builder", f"{builder!r} is not of the form 'package.module:function'.")
        return builder, "python", None
    if builder not in BUILDERS:
        raise _fail(source, "system.builder", f"unknown builder {builder!r}; {builders}.")
    return builder, "builder", BUILDERS[builder]


def _module_digest(source: str, builder: str) -> dict[str, str]:
    """``{module: sha256 of its file}`` of your builder ``"module:function"``.
    Finding the module imports its parent packages (your code runs)."""
    module = builder.partition(":")[0]
    key = "system.builder"
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError as error:
        raise _fail(source, key, f"cannot find module {module!r} ({error}); is it on the Python path?") from None
    except Exception as error:  # a parent package's own code failed
        raise _fail(
            source, key, f"importing the packages of {module!r} failed: {type(error).__name__}: {error}"
        ) from error
    if spec is None:
        raise _fail(source, key, f"no module {module!r} on the Python path (sys.path, PYTHONPATH).")
    if not spec.origin or not pathlib.Path(spec.origin).is_file():
        raise _fail(source, key, f"module {module!r} has no file ({spec.origin}) whose sha256 could be recorded.")
    return {module: sha256_of(spec.origin)}


def _file_digests(source: str, root: pathlib.Path, files: list[tuple[str, str]], seeds: list[int]) -> dict[str, str]:
    """``{file name: sha256}`` of every (key, file name) for every seed."""
    digests = {}
    for key, name in files:
        if "{seed}" not in name and len(seeds) > 1:
            raise _fail(
                source,
                "study.seeds",
                f"the file {name!r} is one configuration, which every seed would repeat: give one seed, or "
                "one file per seed with {seed} in its name (e.g. 'packing-{seed}.gsd').",
            )
        for seed in seeds:
            try:
                seeded = name.format(seed=seed)
            except (KeyError, IndexError, ValueError):
                raise _fail(source, key, f"{name!r}: only {{seed}} may appear in braces.") from None
            path = root / seeded
            try:
                digests[seeded] = sha256_of(path)
            except OSError as error:
                raise _fail(source, key, f"cannot read the configuration file {path} ({error.strerror}).") from None
    return digests


def _check_recorded(source: str, recorded: Any, digests: Mapping[str, str]) -> None:
    """``[system] sha256`` (as the canonical form records it), if given, must
    name the files (or module) of the study and match their bytes."""
    recorded = _check_table(source, "system.sha256", recorded)
    for name in sorted(set(recorded) | set(digests)):
        key = f"system.sha256.{name}"
        if name not in digests:
            raise _fail(source, key, f"names no file (or module) of this study; its files: {', '.join(digests)}.")
        if name not in recorded:
            raise _fail(source, "system.sha256", f"records no sha256 of {name!r}.")
        if recorded[name] != digests[name]:
            raise _fail(
                source, key, f"{name} changed: its sha256 is {digests[name]}, not the recorded {recorded[name]}."
            )


def _check_file_options(source: str, system: Mapping[str, Any], files: list[tuple[str, str]]) -> None:
    """Reader options that the files' formats take."""
    formats = {file_format(name, system.get("format", "")) for _, name in files}
    if "atom_style" in system and formats != {LAMMPS_DATA}:
        raise _fail(source, "system.atom_style", "applies to LAMMPS data files only.")
    for name in ("frame", "species"):
        if name in system and LAMMPS_DATA in formats:
            raise _fail(source, f"system.{name}", "does not apply to LAMMPS data files (one frame, types 1, 2...).")
    if "dim" in system and system["dim"] not in (2, 3):
        raise _fail(source, "system.dim", f"must be 2 or 3; got {system['dim']}.")


def parse_config(
    data: str | Mapping[str, Any], source: str = "", root: str | pathlib.Path | None = None
) -> StudyConfig:
    """Validate a study configuration given as TOML text or as a dict; a
    ``[system]`` file is read from ``root`` (default: the working directory)
    to record its sha256."""
    text = None
    if isinstance(data, str):
        text = data
        try:
            data = tomllib.loads(data)
        except tomllib.TOMLDecodeError as error:
            raise StudyConfigError(f"{source or 'config'}: not valid TOML: {error}") from None
    data = dict(data)
    for section in data:
        if section not in SECTIONS:
            raise _unknown(source, section, SECTIONS)

    system = dict(_check_table(source, "system", data.get("system", {})))
    recorded = system.pop("sha256", None)
    builder, origin, kinds = _system_origin(source, system)
    for name, value in list(system.items()):
        if name == "seed":
            raise _fail(source, "system.seed", "seeds are set by study.seeds.")
        if name in CELL_POINT_KEYS:
            raise _fail(source, f"system.{name}", f"set [cell] {name[5:]}, or vary {name} in [grid] or [[points]].")
        if kinds is not None and name not in kinds:
            raise _unknown(source, f"system.{name}", kinds)
        system[name] = _argument(source, f"system.{name}", value, None if kinds is None else kinds[name])
    # What may vary between points: a file's name and frame and its potential's options.
    varying = {"file": STR, "frame": INT, **POTENTIALS[builder]} if origin == "file" else kinds

    grid = points = None
    if "grid" in data and "points" in data:
        raise _fail(source, "grid", "give either [grid] or [[points]], not both.")
    if "grid" in data:
        table = _check_table(source, "grid", data["grid"])
        if not table:
            raise _fail(source, "grid", "is empty: give at least one argument with a list of values.")
        grid = {}
        for name, values in table.items():
            key = f"grid.{name}"
            _check_point_name(source, key, name, varying)
            if not isinstance(values, list):
                raise _fail(source, key, f"expected a list of values, got {_type_name(values)} ({values!r}).")
            if not values:
                raise _fail(source, key, "is an empty list: the grid would have no points.")
            grid[name] = [_point_override(source, f"{key}[{i}]", name, v, varying) for i, v in enumerate(values)]
    if "points" in data:
        listed = data["points"]
        if not isinstance(listed, list):
            raise _fail(source, "points", "expected an array of tables ([[points]]).")
        if not listed:
            raise _fail(source, "points", "is empty: give at least one point.")
        points = []
        for i, point in enumerate(listed):
            point = _check_table(source, f"points[{i}]", point)
            points.append(
                {
                    name: _point_override(source, f"points[{i}].{name}", name, value, varying)
                    for name, value in point.items()
                }
            )

    if grid:
        varied = {name: (f"grid.{name}", values) for name, values in grid.items()}
    else:
        varied = {}
        for i, point in enumerate(points or []):
            for name, value in point.items():
                varied.setdefault(name, (f"points[{i}].{name}", []))[1].append(value)
    if origin == "builder" and "n" not in system and "n" not in varied:
        raise _fail(source, "system.n", f"missing: {builder} needs the number of particles n.")
    if origin == "builder" and points and "n" not in system and any("n" not in p for p in points):
        i = next(i for i, p in enumerate(points) if "n" not in p)
        raise _fail(source, f"points[{i}].n", "missing (and no n in [system]).")
    if origin == "file" and "file" not in system and not (grid and "file" in grid):
        missing = [f"points[{i}].file" for i, p in enumerate(points or []) if "file" not in p]
        if missing or not points:
            raise _fail(source, (missing or ["system.file"])[0], "missing: the configuration file to read.")
    if origin == "python":
        kinds = _python_kinds(source, system, {k: v for k, v in varied.items() if k not in CELL_POINT_KEYS})
    kinds = {**(kinds or {}), **{name: kind for name, kind in CELL_POINT_KEYS.items() if name in varied}}
    base_dim = system.get("dim", DEFAULT_DIM.get(builder, 3))
    dims = set(grid["dim"]) if grid and "dim" in grid else {p.get("dim", base_dim) for p in points or [{}]}
    if len(dims) > 1:
        raise _fail(source, varied["dim"][0], "the spatial dimension must be the same for all points of a study.")

    study = _options(source, "study", data.get("study", {}), STUDY_KEYS)
    relax = _options(source, "relax", data.get("relax", {}), RELAX_KEYS)
    solve = _options(source, "solve", data.get("solve", {}), SOLVE_KEYS)
    if "rcond" in solve and solve["solver"] != "dense":
        raise _fail(source, "solve.rcond", "applies to solver = 'dense' only.")
    if "max_iter" in solve and solve["solver"] == "dense":
        raise _fail(source, "solve.max_iter", "does not apply to solver = 'dense'.")
    cell = _options(source, "cell", data.get("cell", {}), CELL_KEYS)
    observables = _options(source, "observables", data.get("observables", {}), OBSERVABLES_KEYS)
    if grid:
        modes = set(grid.get("cell_mode", [cell["mode"]]))
    else:
        modes = {p.get("cell_mode", cell["mode"]) for p in points or [{}]}
    at_pressure = modes != {"fixed"}

    digests = {}
    root = pathlib.Path.cwd() if root is None else pathlib.Path(root)
    if origin == "file":
        files = [("system.file", system["file"])] if "file" in system else []
        files += [(f"grid.file[{i}]", name) for i, name in enumerate((grid or {}).get("file", []))]
        files += [(f"points[{i}].file", p["file"]) for i, p in enumerate(points or []) if "file" in p]
        _check_file_options(source, system, files)
        digests = _file_digests(source, root, files, study["seeds"])
    if origin == "python":
        digests = _module_digest(source, builder)
    if recorded is not None:
        _check_recorded(source, recorded, digests)

    sensitivities = {}
    table = _check_table(source, "sensitivities", data.get("sensitivities", {}))
    # Your builder's params are known once it has built a system (mdsens.study.sources checks them then).
    allowed = {"builder": BUILDER_PARAMS, "file": POTENTIAL_PARAMS}.get(origin, {}).get(builder)
    if allowed is not None and at_pressure:
        allowed = (*allowed, "pressure")
    for name, tangent in table.items():
        key = f"sensitivities.{name}"
        tangent = _check_table(source, key, tangent)
        if not tangent:
            raise _fail(
                source, key, f"is empty: give the tangent of at least one of {', '.join(allowed or ['its params'])}."
            )
        entries = {}
        for param, value in tangent.items():
            if allowed is not None and param not in allowed:
                raise _fail(
                    source,
                    f"{key}.{param}",
                    f"{builder} has no parameter {param!r}; its params are {', '.join(allowed or [])}.",
                )
            entries[param] = _tangent_value(source, f"{key}.{param}", value)
        sensitivities[name] = entries

    config = StudyConfig(
        builder=builder,
        system=system,
        grid=grid,
        points=points,
        seeds=tuple(study["seeds"]),
        chunk_size=study["chunk_size"],
        schedule=study["schedule"],
        description=study["description"],
        relax=relax,
        solve=solve,
        sensitivities=sensitivities,
        source=source,
        text=text,
        origin=origin,
        digests=digests,
        kinds=kinds,
        root=root,
        cell=cell,
        observables=observables,
    )
    _check_cell(config, data.get("cell", {}), modes)
    if observables["moduli"] and origin == "builder" and "box" not in BUILDER_PARAMS[builder]:
        raise _fail(source, "observables.moduli", f"{builder} has no periodic box: elastic moduli need one.")
    return config


def _check_cell(config: StudyConfig, given: Mapping[str, Any], modes: set[str]) -> None:
    """A study relaxes the box of every point or of none, at a target pressure
    given for every point, with an all-pairs energy and a periodic box."""
    source = config.source
    varied = config.varied
    if "fixed" in modes:
        if len(modes) > 1:
            where = "grid.cell_mode" if "cell_mode" in (config.grid or {}) else "cell.mode"
            raise _fail(source, where, "every point relaxes its box or none: give cell_mode for every point.")
        for name in ("pressure", "stress_tolerance"):
            if name in given or f"cell_{name}" in varied:
                key = f"cell.{name}" if name in given else _varied_key(config, f"cell_{name}")
                raise _fail(source, key, "applies to [cell] mode = 'isotropic' or 'full' only.")
        return
    missing = [i for i, c in enumerate(config.point_cells()) if c["pressure"] is None]
    if missing:
        where = f"points[{missing[0]}].cell_pressure" if config.points else "cell.pressure"
        raise _fail(source, where, "missing: the target pressure of a relaxing box (positive: compressive).")
    if config.origin == "builder" and "box" not in BUILDER_PARAMS[config.builder]:
        raise _fail(source, "cell.mode", f"{config.builder} has no periodic box to relax.")
    for args in config.point_args():
        if args.get("neighbor_list"):
            key = "system.neighbor_list" if "neighbor_list" in config.system else _varied_key(config, "neighbor_list")
            raise _fail(
                source,
                key,
                "a relaxing box needs an all-pairs energy (mdsens.cell.at_pressure: a neighbor list needs an "
                "upper-triangular box, which the relaxing box does not keep); set neighbor_list = false.",
            )


def _varied_key(config: StudyConfig, name: str) -> str:
    if config.grid:
        return f"grid.{name}"
    index = next(i for i, p in enumerate(config.points or []) if name in p)
    return f"points[{index}].{name}"


def _python_kinds(
    source: str, system: Mapping[str, Any], varied: Mapping[str, tuple[str, list[Any]]]
) -> dict[str, Any]:
    """The kinds of your builder's arguments, one per argument: integers and
    numbers make numbers, other kinds may not mix."""
    kinds = {name: _kind_of(source, f"system.{name}", value) for name, value in system.items()}
    for name, (key, values) in varied.items():
        found = {_kind_of(source, key, value) for value in values} | ({kinds[name]} if name in kinds else set())
        if found == {INT, FLOAT}:
            found = {FLOAT}
        if len(found) > 1:
            raise _fail(source, key, f"the values of one argument must be of one kind; got {sorted(found)}.")
        kinds[name] = found.pop()
    return kinds


def load_config(path: str | pathlib.Path) -> StudyConfig:
    """Read and validate a study configuration file (TOML)."""
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise StudyConfigError(f"{path}: cannot read the configuration ({error.strerror}).") from None
    return parse_config(text, source=str(path), root=path.absolute().parent)


def diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two canonical configurations."""
    changed = []
    for key in sorted(set(old) | set(new), key=str):
        name = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += diff(a, b, name + ".")
        elif a != b:
            changed.append(name)
    return changed


def as_config(config: StudyConfig | str | pathlib.Path | Mapping[str, Any]) -> StudyConfig:
    """A :class:`StudyConfig` from itself, the path of a TOML file, TOML text or a dict."""
    if isinstance(config, StudyConfig):
        return config
    if isinstance(config, pathlib.Path) or (
        isinstance(config, str) and "\n" not in config and (config.endswith(".toml") or pathlib.Path(config).is_file())
    ):
        return load_config(config)
    if isinstance(config, str):
        return parse_config(config, source="<string>")
    return parse_config(config, source="<dict>")
