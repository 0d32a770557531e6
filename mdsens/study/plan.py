"""Planning a study: the option values, every point's system, the groups of
points that share one energy structure, and each group's samples in chunks.
Host only and deterministic, so every process of a multi-host run plans the same."""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from mdsens import systems
from mdsens.adjoints import Implicit
from mdsens.linear_solve import CG, MINRES, BiCGSTAB, Dense
from mdsens.minimisers import FIRE, GradientDescent, Minimiser
from mdsens.relaxation import check_minimiser
from mdsens.study.config import StudyConfig, StudyConfigError, as_config
from mdsens.study.store import StudyError
from mdsens.systems import System

# The values behind the [relax] method and [solve] solver names of the configuration.
MINIMISERS = {"fire": FIRE, "gradient_descent": GradientDescent}
SOLVERS = {"cg": CG, "minres": MINRES, "bicgstab": BiCGSTAB, "dense": Dense}


@dataclasses.dataclass
class Group:
    """Points whose systems share one energy structure, batched together."""

    index: int
    points: list[int]
    system: System  # the System of the first point (its energy serves the group)
    minimiser: Minimiser  # the study's, with the system's dt_max unless [relax] sets one
    param_shapes: dict[str, tuple[int, ...]]
    tangents: dict[str, np.ndarray]  # param name -> (K, *shape) tangents of the named sensitivities
    structure: tuple = ()

    @property
    def n(self) -> int:
        return int(self.system.positions.shape[0])

    @property
    def dim(self) -> int:
        return int(self.system.positions.shape[1])


@dataclasses.dataclass
class Chunk:
    index: int
    group: int
    samples: np.ndarray  # flat sample indices, point * n_seeds + seed position


@dataclasses.dataclass
class Plan:
    """What a study computes: built by :meth:`from_config`."""

    config: StudyConfig
    adjoint: Implicit  # how the sensitivities are solved
    point_args: list[dict[str, Any]]
    groups: list[Group]
    point_group: np.ndarray
    chunks: list[Chunk]
    systems: dict[int, System]  # sample index -> System built at planning time (first seed)

    @classmethod
    def from_config(cls, config: StudyConfig | str | pathlib.Path | Mapping[str, Any]) -> Plan:
        """Build the option values and every point's system (first seed), group
        the points by energy structure and split each group's samples into
        chunks. Raises :class:`StudyConfigError` naming the key or the point if
        an option or a builder rejects its arguments."""
        config = as_config(config)
        relax_with, solve_with = minimiser(config), adjoint(config)
        point_args = config.point_args()
        n_seeds = len(config.seeds)
        groups: list[Group] = []
        by_structure: dict[tuple, int] = {}
        point_group = np.zeros(len(point_args), dtype=np.int64)
        systems_built = {}
        for i, args in enumerate(point_args):
            key = _point_key(config, i, args)
            system = build_system(config, args, config.seeds[0], key)
            if system.neighbor_list:
                raise _fail(
                    config,
                    key,
                    "this system sums its energy over a neighbor list, which studies do not batch yet; "
                    "set neighbor_list = false in [system] (all pairs, O(N^2)) or use fewer particles.",
                )
            systems_built[i * n_seeds] = system
            structure = _structure(config, args, system)
            if structure not in by_structure:
                by_structure[structure] = len(groups)
                shapes = {k: tuple(np.shape(v)) for k, v in system.params.items()}
                groups.append(
                    Group(
                        len(groups),
                        [],
                        system,
                        check_minimiser(relax_with, system),
                        shapes,
                        _tangents(config, system.params, key),
                        structure,
                    )
                )
            group = groups[by_structure[structure]]
            group.points.append(i)
            point_group[i] = group.index

        # The sharing is checked, not assumed: the last point of each group must get
        # the same energy from the group's energy function as from its own.
        for group in groups:
            last = systems_built[group.points[-1] * n_seeds]
            mine = float(last.energy(last.positions, last.params))
            shared = float(group.system.energy(last.positions, last.params))
            if not math.isclose(mine, shared, rel_tol=1e-12, abs_tol=1e-300):
                raise StudyError(
                    f"internal error: points {group.points[0]} and {group.points[-1]} were grouped as one "
                    f"energy structure but their energies differ ({mine!r} vs {shared!r}); please report this."
                )

        chunks: list[Chunk] = []
        for group in groups:
            samples = np.array([p * n_seeds + s for p in group.points for s in range(n_seeds)], dtype=np.int64)
            for start in range(0, len(samples), config.chunk_size):
                chunks.append(Chunk(len(chunks), group.index, samples[start : start + config.chunk_size]))
        return cls(config, solve_with, point_args, groups, point_group, chunks, systems_built)

    @property
    def n_points(self) -> int:
        return len(self.point_args)

    @property
    def n_seeds(self) -> int:
        return len(self.config.seeds)

    def sample(self, index: int) -> tuple[int, int]:
        """(point, seed position) of a flat sample index."""
        return divmod(int(index), self.n_seeds)


def _point_key(config: StudyConfig, index: int, args: Mapping[str, Any]) -> str:
    if config.points:
        return f"points[{index}]"
    varied = ", ".join(f"{k}={args[k]!r}" for k in config.varied)
    return f"grid point {index} ({varied})" if varied else "system"


def _fail(config: StudyConfig, key: str, message: str) -> StudyConfigError:
    where = f"{config.source}: " if config.source else ""
    return StudyConfigError(f"{where}{key}: {message}")


def build_system(config: StudyConfig, args: Mapping[str, Any], seed: int, key: str = "system") -> System:
    """The System of one sample; a builder's ValueError becomes a StudyConfigError naming the point."""
    try:
        return getattr(systems, config.builder)(**args, seed=seed)
    except (ValueError, TypeError) as error:
        raise _fail(config, key, f"{config.builder} rejected its arguments: {error}") from None


def minimiser(config: StudyConfig) -> Minimiser:
    """The minimiser of ``[relax]`` (``dt_max`` None: each system's own)."""
    options = dict(config.relax)
    try:
        return MINIMISERS[options.pop("method")](**options)
    except ValueError as error:
        raise _fail(config, "relax", str(error)) from None


def adjoint(config: StudyConfig) -> Implicit:
    """The implicit adjoint of ``[solve]``: its linear solver and zero modes."""
    options = dict(config.solve)
    solver, zero_modes = SOLVERS[options.pop("solver")], options.pop("zero_modes")
    try:
        return Implicit(solver=solver(**options), zero_modes="auto" if zero_modes == "auto" else None)
    except ValueError as error:
        raise _fail(config, "solve", str(error)) from None


def _structure(config: StudyConfig, args: Mapping[str, Any], system: Any) -> tuple:
    """What must agree for two points to share the compiled energy of the first.
    Everything else (box, diameters, epsilon...) is a parameter read at call time.
    The pair potentials of mdsens.systems fix their cutoff at build time to
    ``cutoff`` times the largest sigma, so those two are part of the structure."""
    shapes = tuple(sorted((k, tuple(np.shape(v))) for k, v in system.params.items()))
    extra: tuple = ()
    if config.builder in ("lennard_jones", "morse"):
        extra = (args.get("cutoff"), float(np.max(np.asarray(system.params["sigma"]))))
    return (system.positions.shape, np.asarray(system.species).tobytes(), shapes, extra)


def _tangents(config: StudyConfig, group_params: Mapping[str, Any], key_of_group: str) -> dict[str, np.ndarray]:
    names = list(config.sensitivities)
    tangents = {}
    for param, value in group_params.items():
        shape = np.shape(value)
        stacked = np.zeros((len(names), *shape))
        for k, name in enumerate(names):
            if param in config.sensitivities[name]:
                entry = np.asarray(config.sensitivities[name][param], dtype=np.float64)
                try:
                    stacked[k] = np.broadcast_to(entry, shape)
                except ValueError:
                    raise _fail(
                        config,
                        f"sensitivities.{name}.{param}",
                        f"shape {entry.shape} does not fit the parameter {param!r} of shape {shape} "
                        f"({key_of_group}); give a number or an array of shape {shape}.",
                    ) from None
        tangents[param] = stacked
    return tangents


def build_sample(plan: Plan, sample: int) -> System:
    """The System of one sample (the first seed's was built while planning)."""
    if sample in plan.systems:
        return plan.systems[sample]
    config = plan.config
    point, seed_position = plan.sample(sample)
    args = plan.point_args[point]
    return build_system(config, args, config.seeds[seed_position], _point_key(config, point, args))


def chunk_inputs(plan: Plan, chunk: Chunk, batch: int) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Host arrays of one chunk: positions, params and which members are samples,
    padded to ``batch`` members with copies of the first."""
    group = plan.groups[chunk.group]
    positions, params = [], []
    for sample in chunk.samples:
        system = build_sample(plan, int(sample))
        if system.positions.shape != group.system.positions.shape:
            raise StudyError(f"internal error: sample {sample} does not have its group's shape")
        positions.append(np.asarray(system.positions))
        params.append({k: np.asarray(v) for k, v in system.params.items()})
    valid = np.arange(batch) < len(positions)
    positions += [positions[0]] * (batch - len(positions))
    params += [params[0]] * (batch - len(params))
    return np.stack(positions), {k: np.stack([p[k] for p in params]) for k in params[0]}, valid
