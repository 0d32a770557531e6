"""The compiled, sharded functions of in-flight batching: a batch of fixed
width runs the minimiser, finished members leave and queued samples enter.

Each is ``jit(shard_map(...))`` over a 1-D mesh ``("batch",)`` of all devices:
every device works on its own ``width`` slots, with no communication. A slot
holds one sample's minimiser state, driven by the one relaxation loop of
:mod:`mdsens.relaxation` (``start``, ``iterate``, ``outcome``), so every
sample takes the steps of a single :func:`mdsens.relax` and stops by the same
rule:

- ``advance(steps)`` iterates every running slot for at most ``steps`` steps
  and says which still run;
- ``refill`` starts queued samples in the slots the host marks (a masked merge
  of freshly started states);
- ``post`` ends the relaxations of the slots the host lists, in a batch of
  their own, and computes the sensitivities (:func:`mdsens.sensitivity_at`),
  the relaxed-energy gradients (:func:`mdsens.energy_sensitivity`), the zero
  modes and the physics, as the record of :mod:`mdsens.study.schema`.

At fixed pressure (``[cell]``) the slots hold joint coordinates of
:func:`mdsens.cell.at_pressure` (particles and strain, the enthalpy
``H = E + p V`` minimised over both); ``post`` reads them as the relaxed
positions and box (:func:`mdsens.cell.relaxed`, :func:`mdsens.cell.fixed_box`)
and maps the joint sensitivities to those of the positions, the box and the
packing fraction (:func:`at_pressure_record`).

The slots of a device run one after another (``lax.map``, an empty slot costs
nothing), and so do a sample's sensitivity solves, not vectorised: XLA's
vectorised reductions round differently depending on a member's position in
the batch, the batch size and the number of devices, while one member's
program is the same whatever its neighbours. So every sample's numbers are
the same bit for bit whatever the width and the order in which samples
finish. (Partitioned over several devices, XLA compiles the programs a little
differently: the relaxations and sensitivities were still the same bit for
bit in the tests, the physics to the last bit.) Every width compiles each
function once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mdsens import cell, observables
from mdsens._results import Status
from mdsens.adjoints import Implicit
from mdsens.equilibria import energy_sensitivity, sensitivity_at
from mdsens.minimisers import Minimiser
from mdsens.relaxation import RelaxResult, iterate, outcome, start
from mdsens.study import schema
from mdsens.study.plan import Group, Plan
from mdsens.systems import FunctionEnergy, System


class Kernels:
    """The compiled functions of one energy structure and adjoint.

    ``mode`` other than ``"fixed"``: the box relaxes at the samples' target
    pressure, and a sample converges when also its particle forces are within
    ``fmax`` and its stress residual within ``stress_tolerance``
    (:func:`mdsens.cell.relaxed`). ``moduli``: record the elastic moduli."""

    def __init__(
        self,
        system: System,
        adjoint: Implicit,
        mesh: Mesh,
        *,
        mode: str = "fixed",
        fmax: float = cell.FORCE_TOLERANCE,
        stress_tolerance: float = cell.STRESS_TOLERANCE,
        moduli: bool = False,
    ):
        if not system.neighbor_list:
            # One trace of the (jax-md) all-pairs energy, jitted, serves every
            # transformation of it. A neighbor-list energy is used as it is:
            # its list is the minimiser state's aux.
            system = system.replace(energy=FunctionEnergy(jax.jit(system.energy)))
        self.fixed = system  # at fixed box: what the observables take
        self.system = system if mode == "fixed" else cell.at_pressure(system, 0.0, mode)  # what relaxes
        self.cell = None if mode == "fixed" else (fmax, stress_tolerance)
        self.moduli = moduli
        self.adjoint = adjoint
        self.mesh = mesh
        self.advance = self._sharded(self._local_advance, n_batched=3, donate=(0,))
        self.refill = self._sharded(self._local_refill, n_batched=6, donate=(0,))
        self.post = self._sharded(self._local_post, n_batched=4)

    def _sharded(self, fn: Callable, n_batched: int, donate: tuple[int, ...] = ()) -> Callable:
        """jit(shard_map(fn)): the first ``n_batched`` arguments are split over
        the batch axis, the others (minimiser, steps, tangents) replicated; every
        output is split over the batch axis."""

        def wrapped(*args):
            specs = (P("batch"),) * n_batched + (P(),) * (len(args) - n_batched)
            return jax.shard_map(fn, mesh=self.mesh, in_specs=specs, out_specs=P("batch"), check_vma=False)(*args)

        return jax.jit(wrapped, donate_argnums=donate)

    # -- per device: ``width`` slots, one after another
    def _local_advance(self, state, params, running, minimiser, steps):
        energy = self.system.energy

        def one(slot):
            s, p, go = slot
            new = iterate(energy, minimiser, p, s, stop_at=jnp.where(go, s.step + steps, s.step))
            still = go & ~minimiser.terminate(new) & energy.valid(new.aux)
            return new, still

        state, running = jax.lax.map(one, (state, params, running))
        return state, running

    def _local_refill(self, state, params, running, positions, fresh_params, take, minimiser):
        energy = self.system.energy

        def one(slot):
            s, x, p, enter = slot
            fresh = lambda: start(energy, minimiser, x, p, energy.build(x, p))  # noqa: E731
            return jax.lax.cond(enter, fresh, lambda: s)

        state = jax.lax.map(one, (state, positions, fresh_params, take))
        params = jax.tree.map(lambda new, old: jnp.where(_rows(take, new), new, old), fresh_params, params)
        return state, params, running | take

    def _local_post(self, state, params, index, valid, minimiser, tangents):
        system, adjoint = self.system, self.adjoint
        n_tangents = jax.tree.leaves(tangents)[0].shape[0]

        def record(s, p):
            result, aux = outcome(system.energy, minimiser, p, s)
            x = result.positions
            grads = energy_sensitivity(system, x, p)  # at fixed pressure: dH*/dtheta
            n_zero_modes = adjoint.modes(system.energy.bind(aux), x, p).n_modes
            extra: dict[str, jax.Array] = {}
            if self.cell is not None:
                result, extra = at_pressure_record(self.fixed, system, result, p, *self.cell)
                # The unused entries of the cell rows are zero modes of the joint Hessian, but not of the packing.
                n_zero_modes = n_zero_modes - (x.shape[0] - self.fixed.n) * self.fixed.dim + system.energy.fn.n_strains
            fixed_x, fixed_p = (x, p) if self.cell is None else cell.fixed_box(system, x, p)
            state = physics(self.fixed, fixed_x, fixed_p) | extra
            if self.moduli:
                state |= moduli(self.fixed, fixed_x, fixed_p, minimiser, adjoint)
            if not n_tangents:
                return schema.sample_record(result, n_zero_modes, grads, p, physics=state)
            dx, info = jax.lax.map(lambda t: sensitivity_at(system, x, p, t, adjoint=adjoint), tangents)
            de = sum(jnp.tensordot(tangents[name], grads[name], axes=grads[name].ndim) for name in grads)
            if self.cell is not None:
                moved = jax.lax.map(lambda a: at_pressure_sensitivity(system, x, p, *a), (dx, tangents))
                dx = moved.pop("position_sensitivity")
                state |= moved
            return schema.sample_record(
                result,
                n_zero_modes,
                grads,
                p,
                solve=info,
                position_sensitivity=dx,
                energy_sensitivity=de,
                physics=state,
            )

        gathered = jax.tree.map(lambda a: a[index], (state, params))
        shapes = jax.eval_shape(record, *jax.tree.map(lambda a: a[0], gathered))
        empty = lambda: jax.tree.map(lambda shape: jnp.zeros(shape.shape, shape.dtype), shapes)  # noqa: E731

        def one(member):
            (s, p), take = member
            return jax.lax.cond(take, lambda: record(s, p), empty)

        return jax.lax.map(one, (gathered, valid))


def _rows(mask: jax.Array, like: jax.Array) -> jax.Array:
    """``mask`` (one entry per slot) broadcast against a batched array."""
    return mask.reshape(mask.shape + (1,) * (like.ndim - 1))


def physics(system: System, x: jax.Array, params: dict) -> dict[str, jax.Array]:
    """What a physicist looks at first, for every sample: with a periodic box the
    stress, pressure and number density; with diameters the contact number,
    the rattler count and the size ratio."""
    values: dict[str, jax.Array] = {}
    if "box" in params:
        stress = observables.stress(system, x, params)
        values.update(
            stress=stress,
            pressure=-jnp.trace(stress) / system.dim,
            number_density=system.n / observables.volume(params),
        )
    if "diameters" in params:
        z, rattlers = observables.contact_number_and_rattlers(system, x, params)  # no N x N array
        values.update(
            contact_number=z,
            n_rattlers=jnp.sum(rattlers).astype(jnp.int32),
            size_ratio=jnp.max(params["diameters"]) / jnp.min(params["diameters"]),
        )
    return values


def at_pressure_record(
    fixed: System, cell_system: System, result: RelaxResult, params: dict, fmax: float, stress_tolerance: float
) -> tuple[RelaxResult, dict[str, jax.Array]]:
    """A relaxation of joint coordinates read as the record of a fixed-box one
    (positions in the relaxed box, the energy E; converged only within both
    tolerances of :func:`mdsens.cell.relaxed`, else ``Status.not_converged``
    if the joint relaxation itself converged), and what only it has: the
    enthalpy, the relaxed box, volume and packing fraction, the particle
    forces and the stress residual."""
    relaxed = cell.relaxed(cell_system, result, params, fmax=fmax, stress_tolerance=stress_tolerance)
    x, fixed_params = cell.fixed_box(cell_system, result.positions, params)
    status = jnp.where(result.converged & ~relaxed.converged, Status.not_converged, result.status)
    summary = dataclasses.replace(
        result,
        positions=x,
        energy=fixed.energy(x, fixed_params),
        converged=relaxed.converged,
        status=status.astype(result.status.dtype),
    )
    values = {
        "enthalpy": result.energy,
        "box": relaxed.box,
        "volume": cell.volume(cell_system, result.positions, params),
        "relax_particle_fmax": relaxed.fmax,
        "relax_stress_residual": relaxed.stress_residual,
    }
    if "diameters" in params:
        values["packing_fraction"] = cell.packing_fraction(cell_system, result.positions, params)
    return summary, values


def at_pressure_sensitivity(cell_system: System, joint: jax.Array, params: dict, djoint: jax.Array, tangent: dict):
    """A joint sensitivity ``(dq*, d eps*)`` along ``tangent`` as those of the
    positions in the relaxed box, the box and the packing fraction (the
    derivative of :func:`mdsens.cell.split` and :func:`mdsens.cell.packing_fraction`)."""

    def state(j: jax.Array, q: dict) -> dict[str, jax.Array]:
        x, box = cell.split(cell_system, j, q)
        values = {"position_sensitivity": x, "box_sensitivity": box}
        if "diameters" in q:
            values["packing_fraction_sensitivity"] = cell.packing_fraction(cell_system, j, q)
        return values

    return jax.jvp(state, (joint, params), (djoint, tangent))[1]


def moduli(system: System, x: jax.Array, params: dict, minimiser: Minimiser, adjoint: Implicit) -> dict:
    """The elastic moduli of the relaxed state (:func:`mdsens.observables.elastic_response`):
    the stiffness ``C`` in Voigt form, the bulk and shear moduli with the
    pre-stress terms (:func:`mdsens.observables.isotropic_moduli` with the stress)."""
    response = observables.elastic_response(system, x, params, minimiser=minimiser, adjoint=adjoint)
    return {
        "stiffness": response.voigt(),
        "bulk_modulus": response.bulk_modulus,
        "shear_modulus": response.shear_modulus,
        "moduli_converged": response.ok,
    }


_KERNELS: dict[tuple, Kernels] = {}


def kernels(plan: Plan, group: Group, mesh: Mesh) -> Kernels:
    """The compiled kernels of a group, reused by later runs in this process
    (e.g. from a notebook) when the energy structure and adjoint agree: the
    energy of an earlier, structurally equal system computes the same. The
    minimiser is an argument, so other tolerances compile nothing new."""
    options: dict[str, Any] = {"moduli": plan.config.observables["moduli"]}
    if group.mode != "fixed":
        # The tolerances are static in mdsens.cell.relaxed, and the cell rows sit where the first box puts them.
        options.update(
            mode=group.mode, fmax=group.minimiser.fmax, stress_tolerance=plan.config.cell["stress_tolerance"]
        )
    box = np.asarray(group.system.params["box"]).tobytes() if group.mode != "fixed" else None
    key: tuple[Any, ...] = (plan.config.builder, group.structure, plan.adjoint, mesh, box, *sorted(options.items()))
    if key not in _KERNELS:
        while len(_KERNELS) >= 16:
            _KERNELS.pop(next(iter(_KERNELS)))
        _KERNELS[key] = Kernels(group.system, plan.adjoint, mesh, **options)
    return _KERNELS[key]
