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
- Before anything is built or compiled, the memory of a chunk's batch of
  all-pairs energies is estimated (:func:`check_memory`); a study that would
  not fit is refused with the ``chunk_size`` that fits.
- A chunk's batch holds at most as many members as its group has samples, so
  a large ``chunk_size`` pads nothing.
- Results are written chunk by chunk (:mod:`mdsens.study.store`) into a locked
  folder; a killed study resumes from the chunks on disk. A chunk is computed
  by one program from its inputs alone, so a resumed study has the numbers of
  an uninterrupted one, bit for bit, on the same devices. Batches of another size
  (another number of devices, the other schedule, a single run) round
  differently and agree to about 1e-12.
- Samples whose relaxation or a linear solve failed are counted and reported
  (the dataset's ``failed_samples``), and hold NaN where nothing was computed
  from a converged state (:func:`mdsens.study.store.failure_policy`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pathlib
import time
import warnings
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
from mdsens.study.plan import Chunk, Group, Plan, chunk_inputs
from mdsens.study.schema import Layout
from mdsens.study.store import StudyError, StudyFolder

BROADCAST_TIMEOUT_MS = 3_600_000
_BROADCASTS = itertools.count()

#: float64 values per particle pair and spatial dimension that one batch member
#: of an all-pairs energy needs: ``PAIR_VALUES + PAIR_VALUES_PER_SENSITIVITY * K``
#: for K named sensitivities. Measured (XLA's memory analysis on CPU) for the
#: largest program of a chunk, the one that computes the sensitivities: 44 N^2
#: values per member in 2D and 72 in 3D with one sensitivity, 67 in 2D with four.
PAIR_VALUES, PAIR_VALUES_PER_SENSITIVITY = 20, 4
#: Fraction of the memory that a chunk's batch may take: the host's (or its
#: cgroup's) for CPU devices, which share it, or each accelerator's own.
MEMORY_FRACTION = 0.5


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

    def memory(self) -> tuple[float, int] | None:
        """Bytes a chunk's batch may take, and how many of this process's devices
        share them (None: unknown)."""
        local = [d for d in self.mesh.devices.flat if d.process_index == self.process_index]
        if local[0].platform == "cpu":
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            with contextlib.suppress(OSError):  # a container's or a Slurm job's limit ("max": none)
                cgroup = pathlib.Path("/sys/fs/cgroup/memory.max").read_text().strip()
                total = min(total, int(cgroup)) if cgroup.isdigit() else total
            return MEMORY_FRACTION * total, len(local)
        limit = (local[0].memory_stats() or {}).get("bytes_limit")
        return (MEMORY_FRACTION * limit, 1) if limit else None


def batch_size(plan: Plan, group: Group) -> int:
    """Members of each chunk's batch: the chunk size, or the group's number of samples if smaller."""
    return min(plan.config.chunk_size, len(group.points) * plan.n_seeds)


def check_memory(config: StudyConfig, runtime: Runtime) -> None:
    """Refuse, before anything is built, a study whose batches of all-pairs
    energies would not fit in memory: a member needs about ``8 * N^2 * dim *
    (PAIR_VALUES + PAIR_VALUES_PER_SENSITIVITY * K)`` bytes, a batch
    ``min(chunk_size, samples)`` members."""
    budget = runtime.memory()
    if budget is None:
        return
    available, sharing = budget
    samples: dict[int, int] = {}
    for args in config.point_args():
        samples[args["n"]] = samples.get(args["n"], 0) + len(config.seeds)
    values = PAIR_VALUES + PAIR_VALUES_PER_SENSITIVITY * len(config.sensitivities)
    for n, count in sorted(samples.items(), reverse=True):
        member = 8 * n * n * config.dim * values
        members = min(config.chunk_size, count)
        need = runtime.local_batch(members) * sharing * member
        if need <= available:
            continue
        fits = int(available // (member * sharing)) * runtime.n_devices
        gib = 2.0**30
        systems = f"{members} system{'s' * (members > 1)} of N = {n} particles"
        where = f"a batch of {systems} needs about {need / gib:.3g} GiB"
        if fits >= 1:
            advice = f"set study.chunk_size to at most {fits}"
        else:
            advice = (
                "even one system does not fit: studies sum all pairs (memory grows as N^2); for this N use a "
                "system built with neighbor_list=True and mdsens.relax / mdsens.equilibrium_jvp directly"
            )
        raise StudyError(
            f"{config.source or 'study'}: {where} (all pairs), more than the {available / gib:.3g} GiB allowed "
            f"({MEMORY_FRACTION:.0%} of the memory of {sharing} device(s)); {advice}."
        )


def run_chunk(plan: Plan, chunk: Chunk, runtime: Runtime) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Relax and differentiate one chunk: host arrays of its samples, and
    batching statistics (``slot_steps``: minimiser steps of all batch slots,
    padding and finished members included; ``member_steps``: steps the members
    needed)."""
    config = plan.config
    group = plan.groups[chunk.group]
    k = kernels(plan, group, runtime.mesh)
    local_batch = runtime.local_batch(batch_size(plan, group))
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
            a different configuration, or another run holds it, a
            :class:`StudyError` is raised. None: compute in memory only.
        progress: show a progress bar (tqdm) over chunks.
        devices: the devices to shard over (default all devices of all processes).
        log: called with one-line messages (resume state, where results went,
            failed samples); None: failed samples are reported by a ``RuntimeWarning``.

    The dataset's ``attrs["failed_samples"]`` counts the samples whose
    relaxation or a linear solve failed; they hold NaN sensitivities and energy
    gradients (:func:`mdsens.study.store.failure_policy`).

    Needs ``jax.config.update("jax_enable_x64", True)``. With several processes
    (``jax.distributed.initialize``), every process calls ``run`` with the same
    arguments; process 0 writes the files and returns the dataset, the others
    return None.
    """
    require_x64("mdsens.study.run")
    config = as_config(config)
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

    # Memory and folder are checked before anything is built or computed.
    on_writer(lambda: check_memory(config, runtime))
    folder = on_writer(lambda: StudyFolder(out).open(config)) if out is not None else None
    try:
        dataset = _run(config, out, folder, runtime, on_writer, progress, log or (lambda message: None))
    finally:
        if folder is not None:
            folder.close()
    report = store.failure_report(dataset) if dataset is not None else None
    if report and log:
        log(report)
    elif report:
        warnings.warn(report, RuntimeWarning, stacklevel=2)
    return dataset


def _run(
    config: StudyConfig,
    out: str | pathlib.Path | None,
    folder: StudyFolder | None,
    runtime: Runtime,
    on_writer: Callable[[Callable[[], Any]], Any],
    progress: bool,
    log: Callable[[str], None],
) -> Any:
    """The body of :func:`run`, with the folder open (``folder`` None: in memory,
    or not process 0)."""
    is_writer = runtime.process_index == 0
    plan = Plan.from_config(config)
    layout = Layout.from_plan(plan)
    study = store.manifest(config, layout)
    done_mask = np.zeros(len(plan.chunks), dtype=bool)
    if out is not None:  # on every process: on_writer broadcasts (folder is None on the others)
        done = on_writer(lambda: folder.start(study) if folder else set()) or set()
        done_mask[sorted(done)] = True
    done_mask = runtime.broadcast(done_mask)
    pending = [c for c in plan.chunks if not done_mask[c.index]]
    if folder is not None and not pending and folder.complete():
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
