"""Running a study: devices and processes, the schedule of each chunk's
stages, progress, and resuming from the chunks on disk.

- Each chunk is sharded over all devices (all hosts after
  ``jax.distributed.initialize``) with ``jax.shard_map`` over a 1-D ``Mesh``
  (:mod:`mdsens.study.kernels`).
- A vmapped loop runs until its slowest member is done, and FIRE step counts
  spread widely. With ``schedule = "compact"`` (default) a stage stops when
  half of a device's members are done; the unfinished ones are gathered into a
  batch of half the size (powers of two, so few programs compile) and carried
  on with their full minimiser state. ``schedule = "vmap"`` runs one stage per
  chunk (for comparison).
- Results are written chunk by chunk (:mod:`mdsens.study.store`); a killed
  study resumes from the chunks on disk. A chunk is computed by one program
  from its inputs alone, so a resumed study has the numbers of an
  uninterrupted one, bit for bit, on the same devices. Batches of another size
  (another number of devices, the other schedule, a single run) round
  differently and agree to about 1e-12.
"""

from __future__ import annotations

import itertools
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mdsens._checks import require_x64
from mdsens.study import store
from mdsens.study.config import StudyConfig, StudyConfigError, as_config
from mdsens.study.kernels import kernels
from mdsens.study.plan import Chunk, Plan, chunk_inputs
from mdsens.study.schema import Layout
from mdsens.study.store import StudyError, StudyFolder

BROADCAST_TIMEOUT_MS = 3_600_000
_BROADCASTS = itertools.count()


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


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
        client: Any = distributed.global_state.client
        if self.process_index == 0:
            client.key_value_set_bytes(key, np.ascontiguousarray(value).tobytes())
            return value
        data = client.blocking_key_value_get_bytes(key, BROADCAST_TIMEOUT_MS)
        return np.frombuffer(data, dtype=value.dtype).reshape(value.shape).copy()

    def local_batch(self, chunk_size: int) -> int:
        """Members per device: a chunk is padded to a multiple of the device count."""
        return -(-chunk_size // self.n_devices)


def run_chunk(plan: Plan, chunk: Chunk, runtime: Runtime) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Relax and differentiate one chunk: host arrays of its samples, and
    batching statistics (``slot_steps``: minimiser steps of all batch slots,
    padding and finished members included; ``member_steps``: steps the members
    needed)."""
    config = plan.config
    group = plan.groups[chunk.group]
    k = kernels(plan, group, runtime.mesh)
    local_batch = runtime.local_batch(config.chunk_size)
    start = time.perf_counter()
    positions, params, valid = chunk_inputs(plan, chunk, local_batch * runtime.n_devices)
    minimiser = runtime.put(group.minimiser, batched=False)
    positions, params, valid = runtime.put((positions, params, valid), batched=True)
    host_seconds = time.perf_counter() - start

    start = time.perf_counter()
    state, active, counts = k.init(positions, params, valid, minimiser)
    counts = np.asarray(runtime.fetch(counts))
    slot_steps = stages = 0
    while counts.max() > 0:
        if config.schedule == "vmap":
            size, threshold = local_batch, 0
        else:  # halve the batch whenever half of its members are done
            size = min(local_batch, _next_power_of_two(counts.max()))
            threshold = size // 2 if size > 1 else 0
        threshold = runtime.put(np.int32(threshold), batched=False)
        state, active, counts, steps = k.stage(size)(state, params, active, minimiser, threshold)
        counts, steps = (np.asarray(a) for a in runtime.fetch((counts, steps)))
        slot_steps += int(size * steps.max() * runtime.n_devices)
        stages += 1
    relax_seconds = time.perf_counter() - start

    start = time.perf_counter()
    record = runtime.fetch(k.post(state, params, valid, minimiser, runtime.put(group.tangents, batched=False)))
    record = {name: np.asarray(value)[: len(chunk.samples)] for name, value in record.items()}
    post_seconds = time.perf_counter() - start
    return record, {
        "slot_steps": slot_steps,
        "member_steps": int(record["relax_n_steps"].sum()),
        "stages": stages,
        "relax_seconds": relax_seconds,
        "post_seconds": post_seconds,
        "host_seconds": host_seconds,
    }


def run(
    config: StudyConfig | str | pathlib.Path | Mapping[str, Any],
    out: str | pathlib.Path | None = None,
    *,
    progress: bool = False,
    devices: Any = None,
    log: Callable[[str], None] | None = None,
) -> Any:
    """Run a study and return its results as an ``xarray.Dataset``.

    Args:
        config: a :class:`StudyConfig`, the path of a TOML file, TOML text or a dict.
        out: output folder. Chunks are written to ``out/chunks/`` as they finish
            and the dataset to ``out/results.nc``; if the folder holds an
            unfinished run of the same configuration it is resumed, if it holds
            a different configuration a :class:`StudyError` is raised. None:
            compute in memory only.
        progress: show a progress bar (tqdm) over chunks.
        devices: the devices to shard over (default all devices of all processes).
        log: called with one-line messages (resume state, where results went).

    Needs ``jax.config.update("jax_enable_x64", True)``. With several processes
    (``jax.distributed.initialize``), every process calls ``run`` with the same
    arguments; process 0 writes the files and returns the dataset, the others
    return None.
    """
    require_x64("mdsens.study.run")
    config = as_config(config)
    log = log or (lambda message: None)
    runtime = Runtime(devices)
    is_writer = runtime.process_index == 0

    def on_writer(action: Callable[[], Any]) -> Any:
        """Run a folder action on process 0; every process raises if it failed."""
        result, failure = None, None
        if is_writer:
            try:
                result = action()
            except (StudyError, StudyConfigError) as error:
                failure = error
        if runtime.broadcast(np.asarray([failure is not None]))[0]:
            raise failure or StudyError("process 0 could not use the output folder; see its error message.")
        return result

    # The folder is checked before anything is built or computed.
    folder = None
    if out is not None:
        folder = on_writer(lambda: StudyFolder(out).check_before_plan(config))
    try:
        plan = Plan.from_config(config)
    except StudyConfigError:
        if folder is not None:
            folder.discard_if_new()
        raise
    layout = Layout.from_plan(plan)
    study = store.manifest(config, layout)
    done_mask = np.zeros(len(plan.chunks), dtype=bool)
    if out is not None:  # on every process: on_writer broadcasts (folder is None on the others)
        done = on_writer(lambda: folder.start(study) if folder else set()) or set()
        done_mask[sorted(done)] = True
    done_mask = runtime.broadcast(done_mask)
    pending = [c for c in plan.chunks if not done_mask[c.index]]
    if folder is not None and not pending and folder.results_path.exists():
        log(f"{out}: the study is already complete")
        return folder.load()

    n_samples = plan.n_points * plan.n_seeds
    samples_done = sum(len(c.samples) for c in plan.chunks if done_mask[c.index])
    if samples_done:
        log(
            f"resuming {out}: {int(done_mask.sum())} of {len(plan.chunks)} chunks "
            f"({samples_done} of {n_samples} samples) already done"
        )
    bar = None
    if progress and is_writer:
        from tqdm import tqdm

        bar = tqdm(total=n_samples, initial=samples_done, unit="pt", desc="study", dynamic_ncols=True, smoothing=0.1)
    totals: dict[str, float] = dict.fromkeys(("slot_steps", "member_steps", "stages"), 0)
    totals.update(dict.fromkeys(("relax_seconds", "post_seconds", "host_seconds"), 0.0))
    chunks: dict[int, Any] = {}
    unconverged = 0
    start = time.perf_counter()
    try:
        for chunk in pending:
            record, stats = run_chunk(plan, chunk, runtime)
            record["sample"] = chunk.samples
            for key in totals:
                totals[key] += stats[key]
            if not is_writer:
                continue
            start_write = time.perf_counter()
            data = store.chunk_dataset(layout, chunk.index, record, stats, study["config_sha256"])
            if folder is None:
                chunks[chunk.index] = data
            else:
                folder.write_chunk(chunk.index, data)
            totals["host_seconds"] += time.perf_counter() - start_write
            unconverged += int(np.sum(~record["relax_converged"]))
            if bar is not None:
                if unconverged:
                    bar.set_postfix(unconverged=unconverged, refresh=False)
                bar.update(len(chunk.samples))
    finally:
        if bar is not None:
            bar.close()
    if not is_writer:
        return None
    run_info = {
        **{k: round(v, 3) if isinstance(v, float) else v for k, v in totals.items()},
        "seconds": round(time.perf_counter() - start, 3),
        "chunks_computed": len(pending),
        "devices": runtime.n_devices,
        "processes": runtime.process_count,
    }
    if folder is None:
        return store.assemble(layout, chunks, study, run_info)
    dataset = folder.finish(run_info)
    log(f"wrote {folder.results_path}")
    return dataset


def load(out: str | pathlib.Path) -> Any:
    """The results of a study folder as an ``xarray.Dataset``: ``results.nc`` if
    the study finished, else whatever chunks are done (``done`` marks them)."""
    return StudyFolder(out, create=False).load()
