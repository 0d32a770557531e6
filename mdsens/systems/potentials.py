"""Potentials to attach to a configuration: what turns positions, a box,
species and diameters (read from a file by :mod:`mdsens.io`, or given as
arrays) into a :class:`~mdsens.System`.

A potential is a value with one method,
``system(positions, box, species, diameters) -> System``: ``positions``
float64 ``(N, dim)``; ``box`` the periodic box as a ``(dim, dim)`` matrix whose
columns are the box vectors (upper triangular, as the readers give it) or None
for free space; ``species`` integers ``(N,)`` from 0; ``diameters`` ``(N,)`` or
None. The box becomes ``params["box"]``, a differentiable parameter read at
call time, as in the builders.

- :class:`SoftSpheres`, :class:`LennardJones`, :class:`Morse`: the builders'
  pair potentials (:mod:`mdsens.systems.pair_energies`);
- :class:`StillingerWeber`: :mod:`mdsens.systems.stillinger_weber`;
- :class:`JaxMD`: any JAX-MD energy constructor with named parameters
  (:class:`~mdsens.systems.jax_md_energy.JaxMDEnergy`);
- :class:`CustomEnergy`: any ``energy(positions, params)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from mdsens._checks import as_float64, check_finite, check_positive
from mdsens.systems.jax_md_energy import JaxMDEnergy
from mdsens.systems.pair_energies import (
    fixed_range,
    largest_diameter,
    soft_sphere_energy,
    species_matrix,
    species_pair_energy,
)
from mdsens.systems.pair_potentials import lennard_jones_pair, morse_pair
from mdsens.systems.stillinger_weber import SILICON, StillingerWeberEnergy, stillinger_weber_range
from mdsens.systems.system import DEFAULT_DT_MAX, System

Array = jax.Array


class Potential(Protocol):
    def system(
        self, positions: np.ndarray, box: np.ndarray | None, species: np.ndarray, diameters: np.ndarray | None
    ) -> System: ...


def _with_box(params: Mapping[str, Any], box: np.ndarray | None) -> dict[str, Any]:
    return dict(params) if box is None else {**params, "box": box}


def _n_species(species: np.ndarray, values: Any, name: str) -> int:
    """The number of species: the size of a per-species ``values``, which must
    cover every species present (``ValueError`` naming ``name`` otherwise)."""
    values = np.asarray(values)
    n = int(np.max(species)) + 1
    size = values.shape[0] if values.ndim else n
    if size < n:
        raise ValueError(f"species: {name} has {size} species entries, but species {n - 1} is present.")
    return size


@dataclasses.dataclass(frozen=True)
class SoftSpheres:
    """Soft spheres (:func:`mdsens.systems.soft_sphere_packing`'s potential),
    ``params = {"diameters", "epsilon", "alpha", "box"}``: one diameter per
    particle (from the configuration), or, for configurations without
    diameters, ``diameters`` per species."""

    epsilon: float = 1.0
    alpha: float = 2.0
    diameters: tuple[float, ...] | None = None
    neighbor_list: bool | None = None

    def system(
        self, positions: np.ndarray, box: np.ndarray | None, species: np.ndarray, diameters: np.ndarray | None
    ) -> System:
        if diameters is not None:
            sizes = np.asarray(diameters, np.float64)
        elif self.diameters is not None:
            _n_species(species, self.diameters, "SoftSpheres.diameters")
            sizes = np.asarray(as_float64(self.diameters, "SoftSpheres.diameters"))
        else:
            raise ValueError(
                "diameter: soft spheres need per-particle diameters, and the configuration has none: "
                "pass SoftSpheres(diameters=(one per species)).",
            )
        for name, value in (("diameter", sizes), ("epsilon", self.epsilon), ("alpha", self.alpha)):
            check_finite(value, name)
            check_positive(value, name)
        params = _with_box({"diameters": sizes, "epsilon": self.epsilon, "alpha": self.alpha}, box)
        energy = soft_sphere_energy(species, positions, params, self.neighbor_list)
        return System.from_energy(
            energy, params, positions, box=box, species=species, dt_max=0.4, interaction_range=largest_diameter
        )


def _pair_system(
    pair_fn: Callable[..., Array],
    potential: LennardJones | Morse,
    extra: dict[str, float],
    positions: np.ndarray,
    box: np.ndarray | None,
    species: np.ndarray,
) -> System:
    n_species = max(_n_species(species, potential.sigma, "sigma"), _n_species(species, potential.epsilon, "epsilon"))
    sigma = species_matrix(potential.sigma, n_species, "sigma")
    epsilon = species_matrix(potential.epsilon, n_species, "epsilon")
    check_positive(sigma, "sigma")
    check_positive(epsilon, "epsilon")
    r_cut = None if potential.cutoff is None else potential.cutoff * float(jnp.max(sigma))
    if box is not None and r_cut is None:
        raise ValueError("cutoff: a periodic configuration needs a finite cutoff (the minimum image).")
    params = _with_box({"sigma": sigma, "epsilon": epsilon, **extra}, box)
    energy = species_pair_energy(pair_fn, species, positions, params, r_cut, potential.neighbor_list)
    reach = None if r_cut is None else fixed_range(r_cut)
    return System.from_energy(energy, params, positions, box=box, species=species, dt_max=0.05, interaction_range=reach)


@dataclasses.dataclass(frozen=True)
class LennardJones:
    """Lennard-Jones (:func:`mdsens.systems.lennard_jones`'s potential):
    ``sigma`` and ``epsilon`` scalars or ``S x S`` species matrices (nested
    tuples), cut off smoothly at ``cutoff`` times the largest sigma (None: no
    cutoff, free space only); ``params = {"sigma", "epsilon", "box"}``."""

    sigma: Any = 1.0
    epsilon: Any = 1.0
    cutoff: float | None = 2.5
    neighbor_list: bool | None = None

    def system(
        self, positions: np.ndarray, box: np.ndarray | None, species: np.ndarray, diameters: np.ndarray | None
    ) -> System:
        return _pair_system(lennard_jones_pair, self, {}, positions, box, species)


@dataclasses.dataclass(frozen=True)
class Morse:
    """Morse (:func:`mdsens.systems.morse`'s potential); ``params = {"sigma",
    "epsilon", "alpha", "box"}``; ``sigma``, ``epsilon`` and ``cutoff`` as in
    :class:`LennardJones`."""

    sigma: Any = 1.0
    epsilon: Any = 1.0
    alpha: float = 5.0
    cutoff: float | None = 2.0
    neighbor_list: bool | None = None

    def system(
        self, positions: np.ndarray, box: np.ndarray | None, species: np.ndarray, diameters: np.ndarray | None
    ) -> System:
        check_positive(self.alpha, "alpha")
        return _pair_system(morse_pair, self, {"alpha": self.alpha}, positions, box, species)


@dataclasses.dataclass(frozen=True)
class StillingerWeber:
    """Stillinger-Weber (:mod:`mdsens.systems.stillinger_weber`), by default
    silicon (eV, angstrom); ``params`` holds every parameter, and ``"box"``.
    One species."""

    params: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(SILICON))
    max_neighbors: int = 16
    dt_max: float = 0.2

    def system(
        self, positions: np.ndarray, box: np.ndarray | None, species: np.ndarray, diameters: np.ndarray | None
    ) -> System:
        missing = set(SILICON) - set(self.params)
        if missing:
            raise ValueError(f"StillingerWeber.params lacks {sorted(missing)}.")
        if np.any(species != 0):
            raise ValueError(
                f"species: Stillinger-Weber has one species here; the configuration has {np.unique(species)}."
            )
        return System.from_energy(
            StillingerWeberEnergy(self.max_neighbors),
            _with_box(self.params, box),
            positions,
            box=box,
            species=species,
            dt_max=self.dt_max,
            interaction_range=stillinger_weber_range,
        )


@dataclasses.dataclass(frozen=True)
class JaxMD:
    """Any JAX-MD energy constructor ``factory(displacement, **kwargs)`` (e.g.
    ``jax_md.energy.gupta_potential``) with ``params`` (its differentiable
    keyword arguments) and ``fixed`` (the others, ``(name, value)`` pairs);
    ``reach``, the interaction range, checks the box. See
    :class:`~mdsens.systems.jax_md_energy.JaxMDEnergy`."""

    factory: Callable[..., Callable[..., Array]]
    params: Mapping[str, Any]
    fixed: tuple[tuple[str, Any], ...] = ()
    reach: float = 0.0
    dt_max: float = DEFAULT_DT_MAX

    def system(
        self, positions: np.ndarray, box: np.ndarray | None, species: np.ndarray, diameters: np.ndarray | None
    ) -> System:
        return System.from_energy(
            JaxMDEnergy(self.factory, self.fixed),
            _with_box(self.params, box),
            positions,
            box=box,
            species=species,
            dt_max=self.dt_max,
            interaction_range=fixed_range(self.reach),
        )


@dataclasses.dataclass(frozen=True)
class CustomEnergy:
    """Your own ``energy(positions, params) -> scalar`` with a dict of
    ``params``, to which ``"box"`` is added for periodic configurations."""

    energy: Callable[[Array, Any], Array]
    params: Mapping[str, Any]
    dt_max: float = DEFAULT_DT_MAX

    def system(
        self, positions: np.ndarray, box: np.ndarray | None, species: np.ndarray, diameters: np.ndarray | None
    ) -> System:
        return System.from_energy(
            self.energy, _with_box(self.params, box), positions, box=box, species=species, dt_max=self.dt_max
        )
