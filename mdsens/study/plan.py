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

from mdsens import cell
from mdsens.adjoints import Implicit
from mdsens.linear_solve import CG, MINRES, BiCGSTAB, Dense
from mdsens.minimisers import FIRE, GradientDescent, Minimiser
from mdsens.neighbors import NeighborListEnergy, Neighbors
from mdsens.relaxation import check_minimiser
from mdsens.study.config import StudyConfig, StudyConfigError, as_config
from mdsens.study.sources import build_system
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
    capacity: tuple[int, int] | None = None  # neighbor lists: pairs and particles per cell of every sample
    mode: str = "fixed"  # [cell] mode: "fixed", or the box relaxes ("isotropic", "full")

    @property
    def at_pressure(self) -> System | None:
        """The group's system with a relaxing box (:func:`mdsens.cell.at_pressure`,
        joint coordinates; params with ``"pressure"``), None at fixed box."""
        return None if self.mode == "fixed" else cell.at_pressure(self.system, 0.0, self.mode)

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
        modes = [c["mode"] for c in config.point_cells()]
        n_seeds = len(config.seeds)
        groups: list[Group] = []
        by_structure: dict[tuple, int] = {}
        point_group = np.zeros(len(point_args), dtype=np.int64)
        systems_built = {}
        for i, args in enumerate(point_args):
            key = _point_key(config, i, args)
            system = build_system(config, args, config.seeds[0], key)
            systems_built[i * n_seeds] = system
            _check_observables(config, key, system, modes[i])
            structure = (*_structure(config, args, system), modes[i])
            if structure not in by_structure:
                by_structure[structure] = len(groups)
                params = system.params if modes[i] == "fixed" else cell.at_pressure(system, 0.0, modes[i]).params
                shapes = {k: tuple(np.shape(v)) for k, v in params.items()}
                groups.append(
                    Group(
                        len(groups),
                        [],
                        system,
                        check_minimiser(relax_with, system),
                        shapes,
                        _tangents(config, params, key),
                        structure,
                        mode=modes[i],
                    )
                )
            group = groups[by_structure[structure]]
            group.points.append(i)
            point_group[i] = group.index

        for index, group in enumerate(groups):
            if group.system.neighbor_list:  # one list capacity, the largest of the points' lists
                lists = [_list_template(systems_built[p * n_seeds])[1] for p in group.points]
                capacity = max(t.capacity for t in lists), max(t.pairs.cell_list_capacity for t in lists)
                groups[index] = group = with_capacity(group, *capacity)

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
    values = config.point_values()[index]
    varied = ", ".join(f"{k}={values[k]!r}" for k in config.varied)
    return f"grid point {index} ({varied})" if varied else "system"


def _fail(config: StudyConfig, key: str, message: str) -> StudyConfigError:
    where = f"{config.source}: " if config.source else ""
    return StudyConfigError(f"{where}{key}: {message}")


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


def _check_observables(config: StudyConfig, key: str, system: System, mode: str) -> None:
    """A relaxing box needs an all-pairs energy and a periodic box (as
    :func:`mdsens.cell.at_pressure` says), the moduli a periodic box."""
    if mode != "fixed":
        try:
            cell.at_pressure(system, 0.0, mode)
        except ValueError as error:
            raise _fail(config, key, f"[cell] mode = {mode!r}: {error}") from None
    if config.observables["moduli"] and (system.box is None or "box" not in system.params):
        raise _fail(config, key, "[observables] moduli: the system has no periodic box; elastic moduli need one.")


def _structure(config: StudyConfig, args: Mapping[str, Any], system: Any) -> tuple:
    """What must agree for two points to share the compiled energy of the first.
    Everything else (box, diameters, epsilon...) is a parameter read at call time.
    The pair potentials of mdsens.systems fix their cutoff at build time to
    ``cutoff`` times the largest sigma, so those two are part of the structure."""
    shapes = tuple(sorted((k, tuple(np.shape(v))) for k, v in system.params.items()))
    extra: tuple = ()
    if config.builder in ("lennard_jones", "morse"):
        extra = (args.get("cutoff"), float(np.max(np.asarray(system.params["sigma"]))))
    if system.neighbor_list:  # a list is built for one box and cutoff
        template = _list_template(system)[1]
        extra += (template.box, template.cutoff)
    return (system.positions.shape, np.asarray(system.species).tobytes(), shapes, extra)


def _list_template(system: System) -> tuple[NeighborListEnergy, Neighbors]:
    """A neighbor-list system's energy and the list its calls build."""
    energy = system.energy
    if not isinstance(energy, NeighborListEnergy) or energy.template is None:
        raise StudyError(f"internal error: {energy!r} is not a neighbor-list energy")
    return energy, energy.template


def with_capacity(group: Group, pairs: int, cell: int) -> Group:
    """A group of neighbor-list systems whose samples all run with lists of
    ``pairs`` pairs and ``cell`` particles per cell. The capacity sets the
    order of the pairs, hence the rounding of every sum over them: it is
    chosen from the plan alone (the first seeds' lists) so that a sample's
    numbers do not depend on its batch. A sample that overflows it is run
    again, from its start, with a larger one (:mod:`mdsens.study.runtime`)."""
    energy, template = _list_template(group.system)
    template = dataclasses.replace(
        template, pairs=dataclasses.replace(template.pairs, cell_list_capacity=cell, max_occupancy=pairs)
    )
    system = group.system.replace(energy=dataclasses.replace(energy, template=template))
    structure = (*group.structure, pairs, cell)
    return dataclasses.replace(group, system=system, structure=structure, capacity=(pairs, cell))


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


def sample_inputs(plan: Plan, group: Group, samples: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Host arrays of the given samples of a group: positions and params,
    stacked. At fixed pressure, joint coordinates (the group's cell rows after
    the particles: zero strain) and params with the point's target ``"pressure"``."""
    positions, params = [], []
    joint = group.at_pressure
    cells = plan.config.point_cells() if joint is not None else []
    for sample in samples:
        system = build_sample(plan, int(sample))
        if system.positions.shape != group.system.positions.shape:
            raise StudyError(f"internal error: sample {sample} does not have its group's shape")
        x, p = np.asarray(system.positions), {k: np.asarray(v) for k, v in system.params.items()}
        if joint is not None:
            x = np.concatenate([x, np.asarray(joint.positions[group.n :])])
            p["pressure"] = np.asarray(cells[plan.sample(int(sample))[0]]["pressure"], np.float64)
        positions.append(x)
        params.append(p)
    return np.stack(positions), {k: np.stack([p[k] for p in params]) for k in params[0]}
