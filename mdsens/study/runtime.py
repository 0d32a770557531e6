"""Running a study: devices and processes, in-flight batching, progress, and
resuming from the chunks on disk.

- Every device holds a batch of ``width`` slots (:mod:`mdsens.study.kernels`,
  ``jax.shard_map`` over a 1-D ``Mesh`` of all devices of all hosts after
  ``jax.distributed.initialize``). A stage runs the minimiser for at most
  :data:`STAGE_STEPS` steps in every occupied slot; the samples that finished
  are post-processed (sensitivities, physics) in a batch of their own, and
  queued samples enter the freed slots. FIRE's step counts spread widely (800
  to 3300 steps at N = 128), so a batch that waited for its slowest member
  would idle; in flight, slots stay full until the queue is empty.
  ``schedule = "vmap"`` refills only once every slot is free (whole batches,
  for comparison: ``run_slot_steps`` counts what it occupies).
- The width is given (``width``) or chosen from the memory of the device
  (:func:`choose_width`). Before anything is built or compiled, the memory of
  one sample's all-pairs energy is estimated (:func:`check_memory`); a study
  that would not fit is refused.
- Every sample runs by a program that does not depend on its neighbours in
  the batch, so the numbers are the same, bit for bit, whatever the width
  and for a resumed study; on another number of devices or processes to the
  last bit (:mod:`mdsens.study.kernels`).
- Results are written chunk by chunk (:mod:`mdsens.study.store`) into a locked
  folder: finished samples are kept until every sample of their chunk is
  done, and a killed study resumes from the chunks on disk.
- Samples whose relaxation or a linear solve failed are counted and reported
  (the dataset's ``failed_samples``), and hold NaN where nothing was computed
  from a converged state (:func:`mdsens.study.store.failure_policy`).
"""

from __future__ import annotations

import collections
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
from mdsens._results import Status
from mdsens._values import count
from mdsens.neighbors import MAX_REALLOCATIONS, use_neighbor_list
from mdsens.relaxation import start
from mdsens.study import store
from mdsens.study.config import StudyConfig, StudyConfigError, as_config
from mdsens.study.kernels import kernels
from mdsens.study.plan import Group, Plan, sample_inputs, with_capacity
from mdsens.study.schema import Layout
from mdsens.study.store import StudyError, StudyFolder

BROADCAST_TIMEOUT_MS = 3_600_000
_BROADCASTS = itertools.count()

#: float64 values per particle pair and spatial dimension that one sample of an
#: all-pairs energy needs: ``PAIR_VALUES + PAIR_VALUES_PER_SENSITIVITY * K`` for K
#: named sensitivities. Measured (XLA's memory analysis on CPU) for the largest
#: program, the one that computes the sensitivities: 44 N^2 values per sample in
#: 2D and 72 in 3D with one sensitivity, 67 in 2D with four.
PAIR_VALUES, PAIR_VALUES_PER_SENSITIVITY = 20, 4
#: Fraction of the memory that a study may take: the host's (or its cgroup's)
#: for CPU devices, which share it, or each accelerator's own.
MEMORY_FRACTION = 0.5
#: Most slots per device when the width is not given: the states of the
#: slots are all a batch holds (its samples run one after another), so the
#: memory rarely limits it; more slots only mean fewer, longer stages.
MAX_WIDTH = 16
#: Minimiser steps per slot between two harvests of the finished samples.
STAGE_STEPS = 64


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

    def memory(self) -> tuple[float, int] | None:
        """Bytes a study may take, and how many of this process's devices
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


def check_memory(config: StudyConfig, runtime: Runtime) -> None:
    """Refuse, before anything is built, a study whose all-pairs energies would
    not fit in memory: the post-processing of one sample (the largest program)
    needs about ``8 * N^2 * dim * (PAIR_VALUES + PAIR_VALUES_PER_SENSITIVITY * K)``
    bytes, and every device of a host runs one sample at a time. Neighbor-list
    systems need O(N) and are not checked."""
    budget = runtime.memory()
    if budget is None:
        return
    available, sharing = budget
    values = PAIR_VALUES + PAIR_VALUES_PER_SENSITIVITY * len(config.sensitivities)
    # Systems from files or your own builders have no "n" argument: not checked here.
    all_pairs = {
        args["n"]
        for args in config.point_args()
        if "n" in args and not use_neighbor_list(args["n"], args.get("neighbor_list"))
    }
    for n in sorted(all_pairs, reverse=True):
        need = sharing * 8 * n * n * config.dim * values
        if need <= available:
            continue
        gib = 2.0**30
        raise StudyError(
            f"{config.source or 'study'}: a system of N = {n} particles summed over all pairs needs about "
            f"{need / gib:.3g} GiB on {sharing} device(s), more than the {available / gib:.3g} GiB allowed "
            f"({MEMORY_FRACTION:.0%} of their memory); set neighbor_list = true in [system] (memory grows as N, "
            "not N^2)."
        )


def choose_width(width: int | None, slot_bytes: int, samples: int, runtime: Runtime) -> int:
    """Slots per device: ``width`` if given, else as many as :data:`MAX_WIDTH`, the
    memory (``slot_bytes`` per slot, :meth:`Runtime.memory`) and the samples
    allow (a slot for each sample at most)."""
    if width is not None:
        return width
    fits = MAX_WIDTH
    budget = runtime.memory()
    if budget is not None:
        available, sharing = budget
        fits = min(fits, max(1, int(available // (sharing * slot_bytes))))
    return max(1, min(fits, -(-samples // runtime.n_devices)))


def _tree_bytes(tree: Any) -> int:
    return sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


Emit = Callable[[np.ndarray, dict[str, np.ndarray]], None]


def run_group(
    plan: Plan,
    group: Group,
    samples: np.ndarray,
    runtime: Runtime,
    width: int | None,
    emit: Emit,
    show: Callable,
    overflowed: list[int] | None = None,
) -> dict[str, Any]:
    """Relax and differentiate ``samples`` (of ``group``) in flight: ``width``
    slots per device, refilled from the queue as samples finish, each finished
    sample passed to ``emit(samples, records)`` as soon as its post-processing
    is done, except, if ``overflowed`` is a list, those whose neighbor list
    overflowed: they are appended to it instead. Returns the batching statistics."""
    k = kernels(plan, group, runtime.mesh)
    energy, minimiser = k.system.energy, group.minimiser
    x0, p0 = sample_inputs(plan, group, samples[:1])
    one = jax.eval_shape(
        lambda x, p: start(energy, minimiser, x, p, energy.build(x, p)), x0[0], {n: v[0] for n, v in p0.items()}
    )
    width = choose_width(width, _tree_bytes(one) + _tree_bytes(p0) + x0.nbytes, len(samples), runtime)
    n_slots = width * runtime.n_devices
    # Fill order: the first slot of every device, then the second...: devices share the work evenly.
    fill_order = np.arange(n_slots).reshape(runtime.n_devices, width).T.ravel()
    blank = jax.tree.map(lambda leaf: np.zeros((n_slots, *leaf.shape), leaf.dtype), one)
    state = runtime.put(blank, batched=True)
    params = runtime.put({n: np.repeat(v, n_slots, axis=0) for n, v in p0.items()}, batched=True)
    running = runtime.put(np.zeros(n_slots, dtype=bool), batched=True)
    on_device = runtime.put((minimiser, group.tangents), batched=False)
    steps = runtime.put(np.int32(STAGE_STEPS), batched=False)

    queue = collections.deque(int(s) for s in samples)
    slot_sample = np.full(n_slots, -1, dtype=np.int64)
    stats = {"width": width, "stages": 0, "slot_steps": 0, "member_steps": 0}
    seconds = dict.fromkeys(("relax_seconds", "post_seconds", "host_seconds"), 0.0)
    show(f"compiling for N = {group.n} (width {width} x {runtime.n_devices} devices)")
    while True:
        clock = time.perf_counter()
        free = fill_order[slot_sample[fill_order] < 0]
        if plan.config.schedule == "vmap" and len(free) < n_slots:
            free = free[:0]  # whole batches: refill only once every slot is free
        entering = free[: len(queue)]
        if len(entering):
            new = np.asarray([queue.popleft() for _ in entering])
            x_new, p_new = sample_inputs(plan, group, new)
            positions = np.repeat(x0, n_slots, axis=0)
            fresh = {n: np.repeat(v, n_slots, axis=0) for n, v in p0.items()}
            positions[entering] = x_new
            for n in fresh:
                fresh[n][entering] = p_new[n]
            take = np.zeros(n_slots, dtype=bool)
            take[entering] = True
            slot_sample[entering] = new
            seconds["host_seconds"] += time.perf_counter() - clock
            inputs = runtime.put((positions, fresh, take), batched=True)
            state, params, running = k.refill(state, params, running, *inputs, on_device[0])
        if (slot_sample < 0).all():
            break

        clock = time.perf_counter()
        state, running = k.advance(state, params, running, on_device[0], steps)
        still = np.asarray(runtime.fetch(running))
        seconds["relax_seconds"] += time.perf_counter() - clock
        stats["stages"] += 1
        stats["slot_steps"] += n_slots * STAGE_STEPS
        finished = (slot_sample >= 0) & ~still
        if not finished.any():
            continue

        clock = time.perf_counter()
        # Each device's finished slots, first in its batch of ``width``.
        index = np.zeros(n_slots, dtype=np.int32)
        valid = np.zeros(n_slots, dtype=bool)
        for device in range(runtime.n_devices):
            mine = np.flatnonzero(finished[device * width : (device + 1) * width])
            index[device * width : device * width + len(mine)] = mine
            valid[device * width : device * width + len(mine)] = True
        slots = (index + np.repeat(np.arange(runtime.n_devices) * width, width))[valid]
        records = k.post(state, params, *runtime.put((index, valid), batched=True), *on_device)
        records = {name: np.asarray(value)[valid] for name, value in runtime.fetch(records).items()}
        seconds["post_seconds"] += time.perf_counter() - clock
        stats["member_steps"] += int(records["relax_n_steps"].sum())
        done = slot_sample[slots]
        slot_sample[slots] = -1
        if overflowed is not None:
            again = records["relax_status"] == Status.neighbor_overflow
            overflowed.extend(int(s) for s in done[again])
            done, records = done[~again], {name: value[~again] for name, value in records.items()}
        if len(done):
            emit(done, records)
    return {**stats, **seconds}


def use_compilation_cache(cache: bool | str | os.PathLike) -> None:
    """Turn on JAX's persistent compilation cache for every program (a second run
    of the same study shape compiles nothing): ``True`` in
    :func:`default_cache_dir` unless JAX already has a cache folder, a path for
    that folder, ``False`` to leave JAX's configuration alone."""
    if cache is False or (cache is True and getattr(jax.config, "jax_compilation_cache_dir", None)):
        return
    jax.config.update("jax_compilation_cache_dir", os.fspath(default_cache_dir() if cache is True else cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _quiet_cache_loads()


def _quiet_cache_loads() -> None:
    """XLA logs two C++ "errors" for every program loaded from the persistent
    cache ("Target machine feature +prefer-no-gather is not supported on the
    host machine"), which are harmless: show XLA's C++ log from level 3 (fatal)
    only, unless TF_CPP_MIN_LOG_LEVEL is set to another level than JAX's
    default (1). Errors still raise. Starting the backend resets the level, so
    this starts it first."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "1") != "1":
        return
    try:
        from jax._src.lib import utils

        jax.devices()

        utils.absl_set_min_log_level(3)
    except (ImportError, AttributeError):  # private API moved: keep the noise
        pass


def default_cache_dir() -> str:
    """``$MDSENS_CACHE_DIR``, else ``$XDG_CACHE_HOME/mdsens/jax-cache`` (``~/.cache`` by default)."""
    if os.environ.get("MDSENS_CACHE_DIR"):
        return os.environ["MDSENS_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mdsens", "jax-cache")


def run(
    config: StudyConfig | str | pathlib.Path | Mapping[str, Any],
    out: str | pathlib.Path | None = None,
    *,
    progress: bool = True,
    devices: Any = None,
    width: int | None = None,
    cache: bool | str | os.PathLike = True,
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
        progress: show a progress bar (tqdm) that counts samples as they finish
            and says what it does meanwhile (planning, compiling).
        devices: the devices to shard over (default all devices of all processes).
        width: slots per device (default: from the memory of the device, at most
            :data:`MAX_WIDTH`). The results do not depend on it.
        cache: JAX's persistent compilation cache (:func:`use_compilation_cache`):
            True (default, as the ``mdsens study`` command), a folder, or False.
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
    if width is not None:
        width = count(width, "width", "mdsens.study.run")
    use_compilation_cache(cache)
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
    bar = None
    if progress and is_writer:
        from tqdm import tqdm

        total = len(config.point_args()) * len(config.seeds)
        bar = tqdm(total=total, unit="sample", desc="study: planning", dynamic_ncols=True, smoothing=0.1)
    try:
        dataset = _run(config, out, folder, runtime, width, on_writer, bar, log or (lambda message: None))
    finally:
        if bar is not None:
            bar.close()
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
    width: int | None,
    on_writer: Callable[[Callable[[], Any]], Any],
    bar: Any,
    log: Callable[[str], None],
) -> Any:
    """The body of :func:`run`, with the folder open (``folder`` None: in memory,
    or not process 0) and the progress bar shown (``bar`` None: none)."""
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

    def show(what: str) -> None:
        if bar is not None:
            bar.set_description_str(f"study: {what}")

    if bar is not None:
        bar.update(samples_done)
    totals: dict[str, Any] = dict.fromkeys(("slot_steps", "member_steps", "stages"), 0)
    totals.update(dict.fromkeys(("relax_seconds", "post_seconds", "host_seconds"), 0.0))
    widths = []
    chunks: dict[int, Any] = {}
    chunk_of = {int(s): c for c in pending for s in c.samples}
    finished: dict[int, dict[int, dict[str, np.ndarray]]] = {c.index: {} for c in pending}
    unconverged = 0

    def emit(samples: np.ndarray, records: dict[str, np.ndarray]) -> None:
        """Keep finished samples until their chunk is complete, then write it
        (its samples in plan order: the file does not depend on the order in
        which they finished)."""
        nonlocal unconverged
        show("running")
        if not is_writer:
            return
        clock = time.perf_counter()
        for row, sample in enumerate(samples):
            chunk = chunk_of[int(sample)]
            finished[chunk.index][int(sample)] = {name: value[row] for name, value in records.items()}
            if len(finished[chunk.index]) < len(chunk.samples):
                continue
            done_rows = finished.pop(chunk.index)
            rows = [done_rows[int(s)] for s in chunk.samples]
            record = {name: np.stack([r[name] for r in rows]) for name in rows[0]}
            record["sample"] = chunk.samples
            data = store.chunk_dataset(layout, chunk.index, record, {}, study["config_sha256"])
            if folder is None:
                chunks[chunk.index] = data
            else:
                folder.write_chunk(chunk.index, data)
        totals["host_seconds"] += time.perf_counter() - clock
        unconverged += int(np.sum(~records["relax_converged"]))
        if bar is not None:
            if unconverged:
                bar.set_postfix(unconverged=unconverged, refresh=False)
            bar.update(len(samples))

    start = time.perf_counter()
    for group in plan.groups:
        samples = np.concatenate([c.samples for c in pending if c.group == group.index] or [np.zeros(0, np.int64)])
        if not len(samples):
            continue
        for attempt in range(MAX_REALLOCATIONS + 1):
            # Neighbor lists: a sample that overflowed its group's list runs again, from its
            # start, with more room (a pair and a particle per cell more, per particle and attempt).
            overflowed: list[int] | None = [] if group.capacity and attempt < MAX_REALLOCATIONS else None
            stats = run_group(plan, group, samples, runtime, width, emit, show, overflowed)
            widths.append(stats.pop("width"))
            for key in totals:
                totals[key] += stats[key]
            if not overflowed or group.capacity is None:
                break
            pairs, cell = group.capacity
            group, samples = with_capacity(group, pairs + group.n, cell + 1), np.asarray(sorted(overflowed))
            log(f"{len(samples)} sample(s) overflowed their neighbor list; running them again with more room")
    if not is_writer:
        return None
    run_info = {
        **{k: round(v, 3) if isinstance(v, float) else v for k, v in totals.items()},
        "seconds": round(time.perf_counter() - start, 3),
        "chunks_computed": len(pending),
        "width": max(widths, default=0),
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
