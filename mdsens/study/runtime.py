"""Batched parameter studies: relaxations and sensitivities over a grid of
parameters times seeds, on every device, resumable.

A study (a TOML file, see :mod:`mdsens._study_config` for the schema) names a
system builder of :mod:`mdsens.systems`, the arguments to vary (a ``[grid]``
or a list of ``[[points]]``), the seeds, and named forward-mode tangents. For
every sample (point x seed) it records the relaxed positions, the energy, the
sensitivity of every position to each named tangent, the relaxed-energy
gradient with respect to every parameter (envelope theorem), and every
diagnostic of the relaxation and the linear solves::

    from mdsens import study
    ds = study.run("data/study_example.toml", out="out/study")   # xarray.Dataset
    ds = study.load("out/study")                                 # later, or while it runs

How it runs:

- Points whose systems share one energy structure (same builder, N, dim,
  species and parameter shapes; the box and diameters are parameters, so a
  sweep over phi or size ratio is one group) are batched together: systems are
  built on the host, their positions and params stacked, and one compiled
  program relaxes a whole chunk with ``jax.vmap``.
- Each chunk is sharded over all devices (all hosts after
  ``jax.distributed.initialize``) with ``jax.shard_map`` over a 1-D ``Mesh``:
  every device relaxes its slice of the chunk with no communication.
- A vmapped while-loop runs until its slowest member converges, and FIRE step
  counts spread widely. With ``schedule = "compact"`` (default) the loop stops
  when half of a device's members are done; the unfinished ones are gathered
  into a batch of half the size (powers of two, so few programs compile) and
  carried on with their full minimiser state: each member takes the steps of
  a single :func:`mdsens.relax` and stops by the same rule. ``schedule =
  "vmap"`` runs one vmapped loop per chunk (for comparison).
- Results are written chunk by chunk (write to a temporary file, then
  ``os.replace``) into ``OUT/chunks/``; a killed study resumes from the
  chunks on disk, and ``OUT/results.nc`` is assembled at the end. A chunk is
  computed by one program from its inputs alone, so a resumed study has the
  numbers of an uninterrupted one, bit for bit, on the same devices. Batches
  of another size (another number of devices, the other schedule, a single
  run) round differently and agree to about 1e-12.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mdsens import _study_io as sio
from mdsens._study_batch import Runtime, run_chunk
from mdsens._study_config import StudyConfig, StudyConfigError, load_config, parse_config
from mdsens._study_plan import Plan, _as_config, plan

__all__ = [
    "Plan",
    "StudyConfig",
    "StudyConfigError",
    "StudyError",
    "StudyResumeError",
    "load",
    "load_config",
    "parse_config",
    "plan",
    "run",
]

StudyError = sio.StudyError
StudyResumeError = sio.StudyResumeError


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
    from mdsens._checks import require_x64

    require_x64("mdsens.study.run")
    config = _as_config(config)
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
        folder = on_writer(lambda: sio.StudyFolder(out).check_before_plan(config))
    try:
        study_plan = plan(config)
    except StudyConfigError:
        if folder is not None:
            folder.discard_if_new()
        raise
    meta = sio.Meta.from_plan(study_plan)
    done_mask = np.zeros(len(study_plan.chunks), dtype=bool)
    if out is not None:  # on every process: on_writer broadcasts
        done_mask[sorted(on_writer(lambda: folder.start(config, meta.to_json())) or ())] = True
    done_mask = runtime.broadcast(done_mask)
    pending = [c for c in study_plan.chunks if not done_mask[c.index]]
    if folder is not None and not pending and folder.results_path.exists():
        log(f"{out}: the study is already complete")
        return folder.load()

    n_samples = study_plan.n_points * study_plan.n_seeds
    samples_done = sum(len(c.samples) for c in study_plan.chunks if done_mask[c.index])
    if samples_done:
        log(f"resuming {out}: {int(done_mask.sum())} of {len(study_plan.chunks)} chunks "
            f"({samples_done} of {n_samples} samples) already done")
    bar = None
    if progress and is_writer:
        from tqdm import tqdm

        bar = tqdm(total=n_samples, initial=samples_done, unit="pt", desc="study", dynamic_ncols=True, smoothing=0.1)
    totals = dict.fromkeys(("slot_steps", "member_steps", "stages"), 0)
    totals.update(dict.fromkeys(("relax_seconds", "post_seconds", "host_seconds"), 0.0))
    records: dict[int, Any] = {}
    unconverged = 0
    start = time.perf_counter()
    try:
        for chunk in pending:
            record, stats = run_chunk(study_plan, chunk, runtime)
            record["sample"] = chunk.samples
            for key in totals:
                totals[key] += stats[key]
            if not is_writer:
                continue
            start_write = time.perf_counter()
            records[chunk.index] = meta.chunk_dataset(chunk.index, record, stats)
            if folder is not None:
                folder.write_chunk(chunk.index, records.pop(chunk.index))
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
        "seconds": round(time.perf_counter() - start, 3), "chunks_computed": len(pending),
        "devices": runtime.n_devices, "processes": runtime.process_count,
    }
    if folder is None:
        return meta.dataset(records, run_info)
    dataset = folder.finish(meta, run_info)
    log(f"wrote {folder.results_path}")
    return dataset


def load(out: str | pathlib.Path) -> Any:
    """The results of a study folder as an ``xarray.Dataset``: ``results.nc`` if
    the study finished, else whatever chunks are done (``done`` marks them)."""
    return sio.StudyFolder(out, create=False).load()
