"""Planning a study: build every point's system, group points that share one
energy structure, split each group's samples into chunks. Host only and
deterministic, so every process of a multi-host run plans the same."""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from mdsens._study_config import StudyConfig, StudyConfigError, load_config, parse_config
from mdsens._study_io import StudyError


@dataclasses.dataclass
class Group:
    """Points whose systems share one energy structure, batched together."""

    index: int
    points: list[int]
    system: Any  # the System of the first point (its energy_fn and shift_fn serve the group)
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
    config: StudyConfig
    point_args: list[dict[str, Any]]
    groups: list[Group]
    point_group: np.ndarray
    chunks: list[Chunk]
    systems: dict[int, Any]  # sample index -> System built at planning time (first seed)

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


def build_system(config: StudyConfig, args: Mapping[str, Any], seed: int, key: str = "system") -> Any:
    """The System of one sample; a builder's ValueError becomes a StudyConfigError naming the point."""
    from mdsens import systems

    builder = getattr(systems, config.builder)
    try:
        return builder(**args, seed=seed)
    except (ValueError, TypeError) as error:
        where = f"{config.source}: " if config.source else ""
        raise StudyConfigError(f"{where}{key}: {config.builder} rejected its arguments: {error}") from None


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
                    where = f"{config.source}: " if config.source else ""
                    raise StudyConfigError(
                        f"{where}sensitivities.{name}.{param}: shape {entry.shape} does not fit the "
                        f"parameter {param!r} of shape {shape} ({key_of_group}); give a number or an array "
                        f"of shape {shape}."
                    ) from None
        tangents[param] = stacked
    return tangents


def plan(config: StudyConfig | str | pathlib.Path | Mapping[str, Any]) -> Plan:
    """Build every point's system (first seed), group the points by energy
    structure and split each group's samples into chunks. Raises
    :class:`StudyConfigError` naming the point if a builder rejects its arguments."""
    config = _as_config(config)
    point_args = config.point_args()
    n_seeds = len(config.seeds)
    groups: list[Group] = []
    by_structure: dict[tuple, int] = {}
    point_group = np.zeros(len(point_args), dtype=np.int64)
    systems_built = {}
    for i, args in enumerate(point_args):
        key = _point_key(config, i, args)
        system = build_system(config, args, config.seeds[0], key)
        if getattr(system, "neighbor_list", False):
            where = f"{config.source}: " if config.source else ""
            raise StudyConfigError(
                f"{where}{key}: this system sums its energy over a neighbor list, which studies do not "
                "batch yet; set neighbor_list = false in [system] (all pairs, O(N^2)) or use fewer particles."
            )
        systems_built[i * n_seeds] = system
        structure = _structure(config, args, system)
        if structure not in by_structure:
            by_structure[structure] = len(groups)
            shapes = {k: tuple(np.shape(v)) for k, v in system.params.items()}
            groups.append(Group(len(groups), [], system, shapes, _tangents(config, system.params, key), structure))
        group = groups[by_structure[structure]]
        group.points.append(i)
        point_group[i] = group.index

    # The sharing is checked, not assumed: the last point of each group must get
    # the same energy from the group's energy function as from its own.
    for group in groups:
        last = systems_built[group.points[-1] * n_seeds]
        mine = float(last.energy_fn(last.positions, last.params))
        shared = float(group.system.energy_fn(last.positions, last.params))
        if not math.isclose(mine, shared, rel_tol=1e-12, abs_tol=1e-300):
            raise StudyError(
                f"internal error: points {group.points[0]} and {group.points[-1]} were grouped as one "
                f"energy structure but their energies differ ({mine!r} vs {shared!r}); please report this."
            )

    chunks = []
    for group in groups:
        samples = np.array([p * n_seeds + s for p in group.points for s in range(n_seeds)], dtype=np.int64)
        for start in range(0, len(samples), config.chunk_size):
            chunks.append(Chunk(len(chunks), group.index, samples[start : start + config.chunk_size]))
    return Plan(config, point_args, groups, point_group, chunks, systems_built)


def build_sample(plan: Plan, sample: int) -> Any:
    """The System of one sample (the first seed's was built while planning)."""
    if sample in plan.systems:
        return plan.systems[sample]
    config = plan.config
    point, seed_position = plan.sample(sample)
    args = plan.point_args[point]
    return build_system(config, args, config.seeds[seed_position], _point_key(config, point, args))


def _as_config(config: StudyConfig | str | pathlib.Path | Mapping[str, Any]) -> StudyConfig:
    if isinstance(config, StudyConfig):
        return config
    if isinstance(config, pathlib.Path) or (
        isinstance(config, str) and "\n" not in config and (config.endswith(".toml") or pathlib.Path(config).is_file())
    ):
        return load_config(config)
    if isinstance(config, str):
        return parse_config(config, source="<string>")
    return parse_config(config, source="<dict>")


