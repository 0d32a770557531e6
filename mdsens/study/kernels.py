"""The compiled, sharded functions that relax and differentiate one group's chunks.

Each is ``jit(shard_map(...))`` over a 1-D mesh ``("batch",)`` of all devices:
every device works on its slice of a chunk, with no communication. Per device,
a slice of ``b`` members is a buffer of minimiser states driven by the one
relaxation loop of :mod:`mdsens.relaxation` (``start``, ``iterate``,
``outcome``), so every member takes the steps of a single :func:`mdsens.relax`
and stops by the same rule:

- ``init`` starts every member;
- ``stage(size)`` gathers up to ``size`` unfinished members and iterates them,
  vmapped, in rounds of at most :data:`ROUND_STEPS` steps each until at most
  ``threshold`` of them are unfinished, then scatters them back;
- ``post`` ends every relaxation and computes the sensitivities
  (:func:`mdsens.sensitivity_at`), the relaxed-energy gradients
  (:func:`mdsens.energy_sensitivity`) and the zero modes, as the record of
  :mod:`mdsens.study.schema`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mdsens import observables
from mdsens.adjoints import Implicit
from mdsens.equilibria import energy_sensitivity, sensitivity_at
from mdsens.relaxation import iterate, outcome, start
from mdsens.study import schema
from mdsens.study.plan import Group, Plan
from mdsens.systems import FunctionEnergy, System

#: Steps between two counts of the unfinished members of a stage: a stage ends
#: at most this many steps after the count first allows it.
ROUND_STEPS = 8


class Kernels:
    """The compiled functions of one energy structure and adjoint."""

    def __init__(self, system: System, adjoint: Implicit, mesh: Mesh):
        # The plan batches plain energies only: one trace of the (jax-md)
        # energy, jitted, serves every transformation of it.
        self.system = system.replace(energy=FunctionEnergy(jax.jit(system.energy)))
        self.adjoint = adjoint
        self.mesh = mesh
        self._stages: dict[int, Callable] = {}
        self.init = self._sharded(self._local_init, n_batched=3)
        self.post = self._sharded(self._local_post, n_batched=3)

    def _sharded(self, fn: Callable, n_batched: int, donate: tuple[int, ...] = ()) -> Callable:
        """jit(shard_map(fn)): the first ``n_batched`` arguments are split over
        the batch axis, the others (minimiser, tangents) replicated; every output
        is split over the batch axis."""

        def wrapped(*args):
            specs = (P("batch"),) * n_batched + (P(),) * (len(args) - n_batched)
            return jax.shard_map(fn, mesh=self.mesh, in_specs=specs, out_specs=P("batch"), check_vma=False)(*args)

        return jax.jit(wrapped, donate_argnums=donate)

    def stage(self, size: int) -> Callable:
        """``(state, params, active, minimiser, threshold) -> (state, active,
        unfinished count, slot steps)`` for stages of ``size`` members."""
        if size not in self._stages:
            local = functools.partial(self._local_stage, size=size)
            self._stages[size] = self._sharded(local, n_batched=3, donate=(0, 2))
        return self._stages[size]

    # -- per device
    def _local_init(self, positions, params, valid, minimiser):
        energy = self.system.energy
        state = jax.vmap(lambda x, p: start(energy, minimiser, x, p, energy.build(x, p)))(positions, params)
        return state, valid, jnp.sum(valid, dtype=jnp.int32)[None]

    def _local_stage(self, state, params, active, minimiser, threshold, *, size):
        b = active.shape[0]
        index = jnp.nonzero(active, size=size, fill_value=b)[0]
        taken = index < b
        sub, sub_params = jax.tree.map(lambda a: a[jnp.where(taken, index, 0)], (state, params))
        relax = jax.vmap(lambda s, p, limit: iterate(self.system.energy, minimiser, p, s, stop_at=limit))

        def run_round(carry):
            s, going, slot_steps = carry
            limit = s.step + jnp.where(going, ROUND_STEPS, 0)
            new = relax(s, sub_params, limit)
            # A member that stopped short of its limit stopped by the loop's own rule.
            return new, going & (new.step == limit), slot_steps + jnp.max(new.step - s.step)

        sub, going, slot_steps = jax.lax.while_loop(
            lambda carry: jnp.sum(carry[1]) > threshold, run_round, (sub, taken, jnp.zeros((), jnp.int32))
        )
        state = jax.tree.map(lambda a, u: a.at[index].set(u, mode="drop"), state, sub)
        active = active.at[index].set(going, mode="drop")
        return state, active, jnp.sum(active, dtype=jnp.int32)[None], slot_steps[None]

    def _local_post(self, state, params, valid, minimiser, tangents):
        system, adjoint = self.system, self.adjoint
        n_tangents = jax.tree.leaves(tangents)[0].shape[0]

        def one(s, p, is_valid):
            result, aux = outcome(system.energy, minimiser, p, s)
            x = result.positions
            grads = energy_sensitivity(system, x, p)
            n_zero_modes = adjoint.modes(system.energy.bind(aux), x, p).n_modes
            state = physics(system, x, p)
            if not n_tangents:
                return schema.sample_record(result, n_zero_modes, grads, p, physics=state)
            # Padding members get a zero tangent: their solves stop at once.
            scaled = jax.tree.map(lambda t: t * is_valid, tangents)
            dx, info = jax.vmap(lambda t: sensitivity_at(system, x, p, t, adjoint=adjoint))(scaled)
            de = sum(jnp.tensordot(tangents[name], grads[name], axes=grads[name].ndim) for name in grads)
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

        return jax.vmap(one)(state, params, valid)


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
        contact_matrix = observables.contacts(system, x, params)
        values.update(
            contact_number=observables.contact_number(system, x, params),
            n_rattlers=jnp.sum(observables.rattlers(contact_matrix, system.dim)).astype(jnp.int32),
            size_ratio=jnp.max(params["diameters"]) / jnp.min(params["diameters"]),
        )
    return values


_KERNELS: dict[tuple, Kernels] = {}


def kernels(plan: Plan, group: Group, mesh: Mesh) -> Kernels:
    """The compiled kernels of a group, reused by later runs in this process
    (e.g. from a notebook) when the energy structure and adjoint agree: the
    energy of an earlier, structurally equal system computes the same. The
    minimiser is an argument, so other tolerances compile nothing new."""
    key = (plan.config.builder, group.structure, plan.adjoint, mesh)
    if key not in _KERNELS:
        while len(_KERNELS) >= 16:
            _KERNELS.pop(next(iter(_KERNELS)))
        _KERNELS[key] = Kernels(group.system, plan.adjoint, mesh)
    return _KERNELS[key]
