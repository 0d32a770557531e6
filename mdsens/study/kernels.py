"""Running chunks: the compiled, sharded kernels (``jax.shard_map`` over a 1-D
mesh of all devices), the compaction of unfinished relaxations, and the
transfers between host and devices for one process or several."""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mdsens.equilibrium import SOLVERS, _zero_modes_at, energy_sensitivity
from mdsens.implicit import root_jvp
from mdsens.relaxation import CONVERGED, MAX_STEPS, NONFINITE, _minimiser, max_force
from mdsens._study_config import StudyConfig
from mdsens._study_io import StudyError
from mdsens._study_plan import Chunk, Group, Plan, build_sample


BROADCAST_TIMEOUT_MS = 3_600_000
_BROADCASTS = itertools.count()


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _select(mask, new, old):
    """Per member of a batch: ``new`` where ``mask``, else ``old``."""
    return jax.tree.map(lambda n, o: jnp.where(mask.reshape(mask.shape + (1,) * (n.ndim - 1)), n, o), new, old)


class _Kernels:
    """The compiled, sharded functions that relax and differentiate one group's chunks.

    Per device (inside ``shard_map``), a chunk slice of ``b`` members is a
    buffer of minimiser states (those of :func:`mdsens.relax`). ``init``
    starts them; ``stage(size)(..., stop_at)`` gathers up to ``size``
    unfinished members, steps them in a vmapped while-loop until at most
    ``stop_at`` are unfinished, and scatters them back; ``post`` evaluates each relaxation as
    :func:`mdsens.relax` does and computes the sensitivities (the linear
    solves of :func:`mdsens.equilibrium_jvp`), energy gradients and zero modes."""

    def __init__(self, group: Group, config: StudyConfig, mesh: Mesh):
        self.config = config
        self.mesh = mesh
        self.shift_fn = group.system.shift_fn
        # One trace of the (jax-md) energy serves every transformation of it.
        self.energy_fn = jax.jit(group.system.energy_fn)
        solve_options = {k: v for k, v in config.solve.items() if k in ("rtol", "atol", "max_iter", "rcond")}
        self.solver = SOLVERS[config.solve["solver"]](**solve_options)
        self.zero_modes = "auto" if config.solve["zero_modes"] == "auto" else None
        self._stages: dict[int, Callable] = {}
        self.init = self._sharded(self._local_init, n_batched=3)
        self.post = self._sharded(self._local_post, n_batched=3)

    def _sharded(self, fn: Callable, n_batched: int, donate: tuple[int, ...] = ()) -> Callable:
        """jit(shard_map(fn)): the first ``n_batched`` arguments are split over
        the batch axis, the others (options, tangents) replicated; every output
        is split over the batch axis. No communication between devices."""

        def wrapped(*args):
            specs = (P("batch"),) * n_batched + (P(),) * (len(args) - n_batched)
            return jax.shard_map(fn, mesh=self.mesh, in_specs=specs, out_specs=P("batch"), check_vma=False)(*args)

        return jax.jit(wrapped, donate_argnums=donate)

    def stage(self, size: int) -> Callable:
        if size not in self._stages:
            local = functools.partial(self._local_stage, size=size)
            self._stages[size] = self._sharded(local, n_batched=3, donate=(0, 2))
        return self._stages[size]

    # -- per device
    def _minimiser(self, positions, params, options):
        return _minimiser(self.energy_fn, params, self.shift_fn, positions, self.config.relax["method"], options)

    @staticmethod
    def _keep_going(state, options):
        """The loop condition of :func:`mdsens.relax`."""
        finite = jnp.all(jnp.isfinite(state.force))
        return (max_force(state.force) > options["fmax"]) & finite & (state.step < options["max_steps"])

    def _local_init(self, positions, params, valid, options):
        state = jax.vmap(lambda x, p: self._minimiser(x, p, options)[0]())(positions, params)
        active = valid & jax.vmap(lambda s: self._keep_going(s, options))(state)
        return state, active, jnp.sum(active, dtype=jnp.int32)[None], jnp.zeros((1,), jnp.int32)

    def _local_stage(self, state, params, active, options, stop_at, *, size):
        b = active.shape[0]
        index = jnp.nonzero(active, size=size, fill_value=b)[0]
        taken = index < b
        gather = jnp.where(taken, index, 0)
        sub, sub_params = jax.tree.map(lambda a: a[gather], (state, params))
        step = jax.vmap(lambda s, p: self._minimiser(s.positions, p, options)[1](s))
        keep_going = jax.vmap(lambda s: self._keep_going(s, options))

        def body(carry):
            s, going, iterations = carry
            s = _select(going, step(s, sub_params), s)
            return s, going & keep_going(s), iterations + 1

        sub, going, iterations = jax.lax.while_loop(
            lambda carry: jnp.sum(carry[1]) > stop_at, body, (sub, taken, jnp.zeros((), jnp.int32))
        )
        state = jax.tree.map(lambda a, u: a.at[index].set(u, mode="drop"), state, sub)
        active = active.at[index].set(going, mode="drop")
        return state, active, jnp.sum(active, dtype=jnp.int32)[None], iterations[None]

    def _local_post(self, state, params, valid, tangents, options):
        energy_fn, gradient = self.energy_fn, jax.grad(self.energy_fn)
        n_tangents = len(self.config.sensitivities)

        def one(s, p, is_valid):
            x = s.positions
            e, g = jax.value_and_grad(energy_fn)(x, p)
            fmax = max_force(-g)
            converged = fmax <= options["fmax"]
            finite = jnp.isfinite(e) & jnp.all(jnp.isfinite(g))
            status = jnp.where(converged, CONVERGED, jnp.where(finite, MAX_STEPS, NONFINITE))
            record = {
                "positions": x, "energy": e, "relax_fmax": fmax, "relax_n_steps": s.step,
                "relax_converged": converged, "relax_status": status.astype(jnp.int32),
            }
            grads = energy_sensitivity(energy_fn, x, p)
            for name, value in grads.items():
                record[f"energy_grad_{name}"] = value
                record[f"param_{name}"] = p[name]
            modes = _zero_modes_at(energy_fn, self.zero_modes, None, x, p)
            record["n_zero_modes"] = modes.n_modes.astype(jnp.int32)
            if n_tangents:
                # Padding members get a zero right-hand side: their solves stop at once.
                scaled = jax.tree.map(lambda t: t * is_valid, tangents)
                dx, info = jax.vmap(lambda t: root_jvp(gradient, x, p, t, solve=self.solver, zero_modes=modes))(scaled)
                record["position_sensitivity"] = dx
                record["energy_sensitivity"] = sum(
                    jnp.tensordot(tangents[name], grads[name], axes=grads[name].ndim) for name in grads
                )
                record["solve_residual"] = info.residual
                record["solve_iterations"] = info.iterations
                record["solve_converged"] = info.converged
                record["solve_negative_curvature"] = info.negative_curvature
            return record

        return jax.vmap(one)(state, params, valid)


_KERNELS: dict[tuple, _Kernels] = {}


def kernels(group: Group, config: StudyConfig, mesh: Mesh) -> _Kernels:
    """The compiled kernels of a group, reused by later runs in this process
    (e.g. from a notebook) when the energy structure and options agree: the
    energy of an earlier, structurally equal system computes the same."""
    key = (config.builder, group.structure, config.relax["method"], tuple(sorted(config.solve.items())),
           len(config.sensitivities), mesh)
    if key not in _KERNELS:
        while len(_KERNELS) >= 16:
            _KERNELS.pop(next(iter(_KERNELS)))
        _KERNELS[key] = _Kernels(group, config, mesh)
    return _KERNELS[key]


class Runtime:
    """Devices, mesh and host transfers, for one process or several."""

    def __init__(self, devices: Any = None):
        devices = list(jax.devices() if devices is None else devices)
        self.mesh = Mesh(np.asarray(devices), ("batch",))
        self.n_devices = len(devices)
        self.process_index = jax.process_index()
        self.process_count = jax.process_count()

    def put(self, tree: Any, batched: bool) -> Any:
        """Host arrays (the same on every process) to global device arrays."""
        sharding = NamedSharding(self.mesh, P("batch") if batched else P())

        def one(a):
            a = np.asarray(a)
            return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

        return jax.tree.map(one, tree)

    def fetch(self, tree: Any) -> Any:
        """Global device arrays to host arrays, on every process."""
        if self.process_count == 1:
            return jax.device_get(tree)
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)

    def broadcast(self, value: np.ndarray) -> np.ndarray:
        """Process 0's value, on every process. Through the key-value store of
        ``jax.distributed`` rather than a device collective: process 0 may take
        long (reading a folder) where CPU collectives (gloo) give up after 30 s."""
        if self.process_count == 1:
            return value
        from jax._src import distributed

        key = f"mdsens_study_broadcast_{next(_BROADCASTS)}"  # the same sequence on every process
        client = distributed.global_state.client
        if self.process_index == 0:
            client.key_value_set_bytes(key, np.ascontiguousarray(value).tobytes())
            return value
        data = client.blocking_key_value_get_bytes(key, BROADCAST_TIMEOUT_MS)
        return np.frombuffer(data, dtype=value.dtype).reshape(value.shape).copy()

    def local_batch(self, chunk_size: int) -> int:
        """Members per device: a chunk is padded to a multiple of the device count."""
        return -(-chunk_size // self.n_devices)


def _stack_chunk(plan: Plan, chunk: Chunk, batch: int) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Host arrays of one chunk, padded to ``batch`` members with copies of the first."""
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


def run_chunk(plan: Plan, chunk: Chunk, runtime: Runtime) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Relax and differentiate one chunk: host arrays of its samples, and
    batching statistics (``slot_steps``: minimiser steps of all batch slots,
    padding and finished members included; ``member_steps``: steps the members
    needed)."""
    config = plan.config
    group = plan.groups[chunk.group]
    k = kernels(group, config, runtime.mesh)
    local_batch = runtime.local_batch(config.chunk_size)
    start = time.perf_counter()
    positions, params, valid = _stack_chunk(plan, chunk, local_batch * runtime.n_devices)
    options = {
        "fmax": np.float64(config.relax["fmax"]),
        "max_steps": np.int32(config.relax["max_steps"]),
        "dt_max": np.float64(config.relax.get("dt_max", group.system.dt_max)),
    }
    options = runtime.put(options, batched=False)
    positions, params, valid = runtime.put((positions, params, valid), batched=True)
    host_seconds = time.perf_counter() - start

    start = time.perf_counter()
    state, active, counts, _ = k.init(positions, params, valid, options)
    counts = np.asarray(runtime.fetch(counts))
    slot_steps = stages = 0
    while counts.max() > 0:
        if config.schedule == "vmap":
            size, stop_at = local_batch, 0
        else:  # halve the batch whenever half of its members are done
            size = min(local_batch, _next_power_of_two(counts.max()))
            stop_at = size // 2 if size > 1 else 0
        stop_at = runtime.put(np.int32(stop_at), batched=False)
        state, active, counts, iterations = k.stage(size)(state, params, active, options, stop_at)
        counts, iterations = (np.asarray(a) for a in runtime.fetch((counts, iterations)))
        slot_steps += int(size * iterations.max() * runtime.n_devices)
        stages += 1
    relax_seconds = time.perf_counter() - start

    start = time.perf_counter()
    record = runtime.fetch(k.post(state, params, valid, runtime.put(group.tangents, batched=False), options))
    record = {name: np.asarray(value)[: len(chunk.samples)] for name, value in record.items()}
    post_seconds = time.perf_counter() - start
    return record, {
        "slot_steps": slot_steps, "member_steps": int(record["relax_n_steps"].sum()), "stages": stages,
        "relax_seconds": relax_seconds, "post_seconds": post_seconds, "host_seconds": host_seconds,
    }
