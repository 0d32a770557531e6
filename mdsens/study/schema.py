"""What a study records, defined once: every variable's name, dims, description
and attributes, and the layout (sizes and labels) of one study.

A sample's record is built by :func:`sample_record` from the core's results
(:class:`mdsens.RelaxResult`, :class:`mdsens.SolveInfo`); chunk files and the
assembled dataset take their dims and descriptions from here. Dims are listed
after the leading ``sample`` of a chunk file or ``(point, seed)`` of the
dataset. Status codes are those of :class:`mdsens.Status`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from mdsens._results import Status
from mdsens.study import config as sc

SPATIAL = ("x", "y", "z")
#: Labels of the Voigt pairs (mdsens.observables.to_voigt), by dimension.
VOIGT = {2: ("xx", "yy", "xy"), 3: ("xx", "yy", "zz", "yz", "xz", "xy")}
ENERGY_GRAD, PARAM = "energy_grad_", "param_"  # prefixes of the per-parameter variables


@dataclasses.dataclass(frozen=True)
class Variable:
    """A recorded variable: its dims, its description and, for those copied from
    a result of the core, ``source`` = ``"relax.<field>"`` (a RelaxResult) or
    ``"solve.<field>"`` (a SolveInfo, one per named sensitivity)."""

    dims: tuple[str, ...]
    description: str
    source: str = ""
    units: str = ""  # in the system's units of length and energy ("1": dimensionless)


def _status(what: str) -> str:
    return f"why the {what} stopped, a mdsens.Status code: " + ", ".join(f"{s.value} {s.name}" for s in Status)


VARIABLES: dict[str, Variable] = {
    "positions": Variable(
        ("particle", "spatial"), "relaxed positions x* (not wrapped into the box)", "relax.positions"
    ),
    "energy": Variable((), "relaxed energy E(x*)", "relax.energy"),
    "relax_converged": Variable((), "relaxation reached fmax <= relax.fmax", "relax.converged"),
    "relax_fmax": Variable((), "largest per-particle force norm at x*", "relax.fmax"),
    "relax_n_steps": Variable((), "minimiser steps taken", "relax.n_steps"),
    "relax_status": Variable((), _status("relaxation"), "relax.status"),
    "relax_lowest_curvature": Variable(
        (), "lowest curvature of the Hessian at x*, zero modes projected out (Lanczos)", "relax.lowest_curvature"
    ),
    "n_zero_modes": Variable(
        (), "zero modes of the Hessian at x* projected out (rattler coordinates + rigid-body modes)"
    ),
    "position_sensitivity": Variable(
        ("sensitivity", "particle", "spatial"), "dx*/dtheta along each named tangent (minimum-norm)"
    ),
    "energy_sensitivity": Variable(("sensitivity",), "dE*/dtheta along each named tangent (envelope theorem)"),
    "solve_residual": Variable(("sensitivity",), "true relative residual of the linear solve", "solve.residual"),
    "solve_iterations": Variable(("sensitivity",), "iterations of the linear solve", "solve.iterations"),
    "solve_converged": Variable(("sensitivity",), "the linear solve met its tolerance", "solve.converged"),
    "solve_negative_curvature": Variable(
        ("sensitivity",), "CG met negative curvature (a saddle, not a minimum)", "solve.negative_curvature"
    ),
    "solve_singular": Variable(
        ("sensitivity",),
        "CG met a direction in the numerical null space that the zero modes do not cover",
        "solve.singular",
    ),
    "solve_lowest_curvature": Variable(
        ("sensitivity",),
        "CG: lowest Rayleigh quotient p^T H p / p^T p of its search directions (NaN: other solvers)",
        "solve.lowest_curvature",
    ),
    "solve_status": Variable(("sensitivity",), _status("linear solve"), "solve.status"),
    # Physics of the relaxed state (systems with a periodic box / with diameters);
    # NaN (-1 for counts) when the relaxation failed, as every value not computed
    # at a converged state (mdsens.study.store.failure_policy).
    "pressure": Variable((), "pressure -tr(stress)/dim at x* (positive: the packing pushes on the box)"),
    "stress": Variable(("spatial", "spatial_b"), "virial stress tensor (1/V) dE/d(strain) at x*"),
    "number_density": Variable((), "N / V, particles per volume (area in 2D) of the box"),
    "contact_number": Variable((), "mean contacts per particle z = 2 N_c / N' among non-rattlers"),
    "n_rattlers": Variable((), "particles with fewer than dim + 1 contacts, removed recursively"),
    "size_ratio": Variable((), "largest over smallest diameter"),
    # At fixed pressure ([cell]): the box relaxes with the particles (mdsens.cell.at_pressure).
    "enthalpy": Variable((), "relaxed enthalpy H* = E* + p V* at the target pressure p", units="energy"),
    "box": Variable(
        ("spatial", "spatial_b"),
        "relaxed box at the target pressure (columns are the box vectors); param_box is the reference box "
        "it started from",
        units="length",
    ),
    "volume": Variable((), "volume (area in 2D) of the relaxed box", units="length^dim"),
    "packing_fraction": Variable((), "packing fraction of the spheres in the relaxed box", units="1"),
    "relax_particle_fmax": Variable((), "largest per-particle force norm |dE/dx| at (x*, box*)", units="energy/length"),
    "relax_stress_residual": Variable(
        (),
        "stress residual: |p_virial - p| (cell mode isotropic) or max |stress + p I| (full); converged needs "
        "it <= cell.stress_tolerance",
        units="energy/length^dim",
    ),
    "box_sensitivity": Variable(
        ("sensitivity", "spatial", "spatial_b"),
        "d box*/dtheta along each named tangent: the relaxed box's response (columns: box vectors)",
        units="length per unit tangent",
    ),
    "packing_fraction_sensitivity": Variable(
        ("sensitivity",), "d phi*/dtheta of the packing fraction in the relaxed box along each named tangent"
    ),
    # [observables] moduli = true (mdsens.observables.elastic_response at the relaxed state).
    "stiffness": Variable(
        ("voigt", "voigt_b"),
        "stiffness tensor C = (1/V) d^2E*/d eps d eps (F = I + eps, non-affine relaxation included) in Voigt "
        "form; without the pre-stress terms (mdsens.observables.stress_strain_tensor adds them)",
        units="energy/length^dim",
    ),
    "bulk_modulus": Variable(
        (),
        "bulk modulus -V dp/dV, pre-stress terms included (mdsens.observables.isotropic_moduli)",
        units="energy/length^dim",
    ),
    "shear_modulus": Variable(
        (),
        "orientation-averaged shear modulus d sigma_xy/d gamma, pre-stress terms included",
        units="energy/length^dim",
    ),
    "moduli_converged": Variable((), "the moduli's relaxation and linear solves converged, with no negative curvature"),
}
#: Other descriptions at fixed pressure ([cell] mode isotropic or full).
AT_PRESSURE = {
    "positions": "relaxed positions x* in the relaxed box (not wrapped into it)",
    "energy": "energy E(x*, box*) of the relaxed state (the enthalpy is `enthalpy`)",
    "relax_converged": (
        "the joint relaxation of positions and box reached relax.fmax, and at (x*, box*) the particle forces are "
        "within relax.fmax and the stress residual within cell.stress_tolerance"
    ),
    "relax_fmax": "largest force norm of the joint coordinates (particle rows and cell rows, FIRE's fmax)",
    "relax_status": _status("relaxation")
    + "; not_converged: the joint relaxation converged, the particle forces or the stress residual did not",
    "relax_lowest_curvature": "lowest curvature of the enthalpy's Hessian in the joint coordinates, zero modes "
    "projected out (Lanczos)",
    "n_zero_modes": "zero modes projected out of the joint Hessian (rattler coordinates + translations)",
    "position_sensitivity": (
        "dx*/dtheta of the positions in the relaxed box (the box's affine motion included) along each named "
        "tangent; minimum-norm in the joint coordinates"
    ),
    "energy_sensitivity": "dH*/dtheta of the enthalpy H = E + p V along each named tangent (envelope theorem)",
}

STATUS_VARIABLES = ("relax_status", "solve_status")

# Variables of the assembled dataset that are not per sample (full dims).
LABELS: dict[str, Variable] = {
    "particle_species": Variable(("point", "particle"), "species of each particle (-1: padding)"),
    "n_particles": Variable(("point",), "N of each point"),
    "done": Variable(("point", "seed"), "this sample has been computed"),
    "chunk_index": Variable(("point", "seed"), "chunk file that holds this sample (-1: not done)"),
}


def sample_record(
    relax: Any,
    n_zero_modes: Any,
    energy_grads: Mapping[str, Any],
    params: Mapping[str, Any],
    solve: Any = None,
    position_sensitivity: Any = None,
    energy_sensitivity: Any = None,
    physics: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The record of one sample, named as in :data:`VARIABLES`: the fields of
    ``relax`` (a RelaxResult) and ``solve`` (a SolveInfo batched over the named
    sensitivities; None when there are none), the derived values, the
    ``physics`` of the relaxed state (see :func:`mdsens.study.kernels.physics`),
    and per parameter its value and the envelope-theorem gradient ``energy_grads``."""
    sources = {"relax": relax, "solve": solve}
    record = {}
    for name, variable in VARIABLES.items():
        if variable.source:
            result, field = variable.source.split(".")
            if sources[result] is not None:
                record[name] = getattr(sources[result], field)
    derived = {
        "n_zero_modes": n_zero_modes,
        "position_sensitivity": position_sensitivity,
        "energy_sensitivity": energy_sensitivity,
    }
    record.update((name, value) for name, value in derived.items() if value is not None)
    record.update(physics or {})
    for name, value in energy_grads.items():
        record[ENERGY_GRAD + name] = value
        record[PARAM + name] = params[name]
    return record


def param_dims(name: str, ndim: int, per_particle: bool) -> list[str]:
    """Dims of a parameter of the builders' systems."""
    if name == "box":
        return ["spatial", "spatial_b"]
    if ndim == 0:
        return []
    if ndim == 1:
        return ["particle" if per_particle else "species"]
    if ndim == 2:
        return ["species", "species_b"]
    return [f"{name}_axis{k}" for k in range(ndim)]


def attributes(name: str, at_pressure: bool = False) -> dict[str, Any]:
    """Description, units if known (and status flags) of a record variable;
    ``at_pressure``: of a study whose boxes relax (:data:`AT_PRESSURE`)."""
    if name in VARIABLES:
        variable = VARIABLES[name]
        description = AT_PRESSURE.get(name, variable.description) if at_pressure else variable.description
        attrs: dict[str, Any] = {"description": description}
        if variable.units:
            attrs["units"] = variable.units
    elif name.startswith(ENERGY_GRAD):
        parameter = name[len(ENERGY_GRAD) :]
        if at_pressure:
            what = " (= V*)" if parameter == "pressure" else ""
            where = "(x*, box*), H = E + p V the enthalpy" + (", box the reference box" if parameter == "box" else "")
            attrs = {"description": f"dH*/d{parameter}{what} at {where} (envelope theorem), every entry"}
        else:
            attrs = {"description": f"dE*/d{parameter} at x* (envelope theorem), every entry of the parameter"}
    elif name == PARAM + "pressure" and at_pressure:
        attrs = {"description": "the target pressure p of the relaxing box (positive: compressive)"}
    elif name == PARAM + "box" and at_pressure:
        attrs = {"description": "the reference box the relaxation started from (the relaxed one is `box`)"}
    elif name.startswith(PARAM):
        attrs = {"description": f"value of the parameter {name[len(PARAM) :]!r} of the sample's system"}
    else:
        raise KeyError(name)
    if name in STATUS_VARIABLES:
        attrs.update(
            flag_values=np.array([s.value for s in Status], dtype=np.int32),
            flag_meanings=" ".join(s.name for s in Status),
        )
    return attrs


def fill_value(dtype: np.dtype) -> Any:
    """What samples not (yet) computed hold."""
    if dtype == np.bool_:
        return False
    if np.issubdtype(dtype, np.integer):
        return -1
    return np.nan


@dataclasses.dataclass
class Layout:
    """Sizes and labels of one study, JSON-serialisable (kept in the manifest, so
    a folder can be read without the system builders)."""

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
    at_pressure: bool = False  # the boxes relax ([cell]); in the JSON only if True

    @classmethod
    def from_plan(cls, plan: Any) -> Layout:
        config = plan.config
        groups = []
        for group in plan.groups:
            args = plan.point_args[group.points[0]]
            # One diameter per particle: per_particle_diameters of mdsens's builders; a file's, or your builder's, if N.
            per_particle = bool(args.get("per_particle_diameters", False)) or (
                config.origin != "builder" and np.shape(group.system.params.get("diameters", ()))[:1] == (group.n,)
            )
            groups.append(
                {
                    "n": group.n,
                    "param_shapes": {k: list(v) for k, v in group.param_shapes.items()},
                    "param_dims": {k: param_dims(k, len(v), per_particle) for k, v in group.param_shapes.items()},
                }
            )
        n_particles = [plan.groups[g].n for g in plan.point_group]
        species = [np.asarray(plan.groups[g].system.species).tolist() for g in plan.point_group]
        n_species = max([1] + [max(s) + 1 for s in species])
        for group in groups:
            for name, dims in group["param_dims"].items():
                for dim_name, size in zip(dims, group["param_shapes"][name], strict=True):
                    if dim_name.startswith("species"):
                        n_species = max(n_species, size)
        coords = {}
        kinds = config.kinds
        point_values = config.point_values()
        for name in config.varied:
            values = [args.get(name) for args in point_values]
            kind = kinds[name]
            if any(v is None for v in values):  # [[points]] that leave it at the builder's default
                coords[name] = {"dims": ["point"], "values": [json.dumps(v) for v in values]}
            elif kind == sc.FLOATS:
                n_species = max(n_species, max(len(v) for v in values))
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
            "point": plan.n_points,
            "seed": plan.n_seeds,
            "particle": max(n_particles),
            "spatial": dim,
            "spatial_b": dim,
            "species": n_species,
            "species_b": n_species,
            "sensitivity": len(config.sensitivities),
        }
        if config.observables["moduli"]:
            sizes["voigt"] = sizes["voigt_b"] = len(VOIGT[dim])
        return cls(
            seeds=list(config.seeds),
            sensitivities=list(config.sensitivities),
            dim=dim,
            n_particles=n_particles,
            species=species,
            point_group=plan.point_group.tolist(),
            groups=groups,
            chunks=[{"group": c.group, "samples": c.samples.tolist()} for c in plan.chunks],
            coords=coords,
            sizes=sizes,
            at_pressure=config.at_pressure,
        )

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not self.at_pressure:  # the manifests of fixed-box studies stay as they were
            del data["at_pressure"]
        return data

    def dims(self, name: str, group: int) -> tuple[str, ...]:
        """Dims of a record variable of the given group's samples."""
        if name in VARIABLES:
            return VARIABLES[name].dims
        for prefix in (ENERGY_GRAD, PARAM):
            if name.startswith(prefix):
                return tuple(self.groups[group]["param_dims"][name[len(prefix) :]])
        raise KeyError(name)
