"""The ``mdsens`` command: ``mdsens study CONFIG --out DIR``, ``mdsens export DIR``
and ``mdsens demo``.

Importing mdsens imports JAX and jax-md, and importing jax-md starts JAX's
backend, after which the number of CPU devices is fixed and
``jax.distributed.initialize`` refuses to run. When the command needs either,
it re-runs itself through a bootstrap that applies them before importing mdsens.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import warnings
from collections.abc import Sequence

import jax

from mdsens import study
from mdsens.study import runtime, store

STUDY_HELP = """\
Run a batched parameter study described in a TOML file: relax every point of a
grid (or list) of system parameters times seeds, compute the named
sensitivities and every diagnostic, and write a labeled xarray dataset to
DIR/results.nc. Chunks are written to DIR/chunks/ as they finish: run the same
command again after an interruption (even SIGKILL) to resume. A different
configuration is refused in an existing folder.

Every device keeps --width samples in flight (finished ones leave, queued
ones take their slots); the numbers do not depend on the width. A CPU counts
as one device per core (--cpu-devices N or $JAX_NUM_CPU_DEVICES to choose
another number). On several hosts, start one process per host with
--distributed (Slurm, Open MPI: detected) or with --coordinator,
--num-processes and --process-id.

One run at a time holds DIR (DIR/study.lock names it); a second is refused.
On resume every chunk is checked against its sha256 checksum and the
configuration: a damaged or foreign chunk is computed again, with a warning.

Exit status: 0 when every sample converged; 3 when some relaxation or linear
solve failed (the last line on stderr counts them by reason; what needs a
converged state, such as their sensitivities, is NaN in the results); 2 for an error
(configuration, output folder, disk full: finished chunks are kept); 130 when
interrupted.

Example configuration: data/study_example.toml. Open the results with
xarray.open_dataset("DIR/results.nc") or mdsens.study.load("DIR")."""

#: Exit status of ``mdsens study`` when some samples failed (see STUDY_HELP).
EXIT_FAILED_SAMPLES = 3


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("mdsens")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mdsens",
        description="Sensitivities of mechanical equilibria of particle systems by implicit differentiation.",
        epilog="Run 'mdsens COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"mdsens {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    study = commands.add_parser(
        "study",
        help="run a batched, resumable parameter study from a TOML file",
        description=STUDY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    study.add_argument("config", metavar="CONFIG", help="the study's TOML file")
    study.add_argument(
        "--out", metavar="DIR", required=True, help="output folder (created; resumed if it holds this study)"
    )
    study.add_argument(
        "--dry-run", action="store_true", help="check the configuration, build every system, print the plan and stop"
    )
    study.add_argument("--no-progress", action="store_true", help="no progress bar")
    study.add_argument(
        "--cache-dir",
        metavar="DIR",
        default=None,
        help="JAX persistent compilation cache (default $MDSENS_CACHE_DIR or ~/.cache/mdsens/jax-cache)",
    )
    study.add_argument("--no-cache", action="store_true", help="do not use the persistent compilation cache")
    study.add_argument(
        "--width",
        metavar="W",
        type=int,
        default=None,
        help="slots per device of the in-flight batch (default: from the device's memory; results do not depend on it)",
    )
    study.add_argument(
        "--cpu-devices",
        metavar="N",
        type=int,
        default=None,
        help="run on N CPU devices (default: $JAX_NUM_CPU_DEVICES, else one per core)",
    )
    hosts = study.add_argument_group("several processes (multi-host)")
    hosts.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() (auto-detects Slurm, Open MPI, ...)",
    )
    hosts.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0 (implies --distributed)")
    hosts.add_argument("--num-processes", metavar="N", type=int, help="number of processes")
    hosts.add_argument("--process-id", metavar="I", type=int, help="this process's index, 0..N-1")

    export = commands.add_parser(
        "export",
        help="write one sample of a study (relaxed positions, box, species, sensitivity fields) as extxyz or GSD",
    )
    export.add_argument("out", metavar="DIR", help="the study's output folder")
    export.add_argument("--point", type=int, required=True, help="the point's index")
    export.add_argument("--seed", type=int, required=True, help="the seed (a value of the study's seeds)")
    export.add_argument("--to", metavar="FILE", required=True, help="the file to write: .xyz, .extxyz or .gsd")
    export.add_argument(
        "--config", metavar="CONFIG", help="the study's TOML file, if it reads files named relative to it"
    )

    commands.add_parser(
        "demo",
        help="the paper's experiment: relax a 2D packing, sensitivity to the small diameter (see 'mdsens demo --help')",
        add_help=False,
    )
    return parser


# Settings that JAX reads only when its backend starts. Importing mdsens (jax-md)
# starts it, so the command is re-run through this bootstrap, which applies
# them before importing mdsens.
_EARLY = "MDSENS_JAX_EARLY"
_BOOTSTRAP = """
import json, os, sys
import jax
early = json.loads(os.environ["MDSENS_JAX_EARLY"])
os.environ["MDSENS_JAX_EARLY"] = "done"
if early["cpu_devices"] is not None:
    jax.config.update("jax_num_cpu_devices", early["cpu_devices"])
if early["distributed"] is not None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**early["distributed"])
from mdsens.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: assume the worst
        return True


def _cores() -> int:
    """Cores this process may run on (a Slurm or taskset allocation, not the whole host)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _setup_jax(
    cache_dir: str | None,
    cpu_devices: int | None = None,
    distributed: dict | None = None,
    argv: Sequence[str] = (),
    own_process: bool = False,
):
    """Configure JAX: float64, the persistent compilation cache, the CPU devices
    (asked for; else one per core, unless JAX_NUM_CPU_DEVICES is set or the
    process is not the command's own: main() called by a program whose JAX
    already runs) and the distributed runtime. The last two apply only before
    the backend starts: if it has, the command is re-run in a fresh interpreter."""
    if os.environ.get(_EARLY) != "done":  # not yet applied by the re-run
        started = _backend_started()
        if cpu_devices is None and "JAX_NUM_CPU_DEVICES" not in os.environ and (own_process or not started):
            cpu_devices = _cores()
        if started and (distributed is not None or cpu_devices not in (None, len(jax.devices("cpu")))):
            os.environ[_EARLY] = json.dumps({"cpu_devices": cpu_devices, "distributed": distributed})
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(sys.executable, [sys.executable, "-c", _BOOTSTRAP, *argv])
        if not started and cpu_devices is not None:
            jax.config.update("jax_num_cpu_devices", cpu_devices)
        if not started and distributed is not None:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(**distributed)
    jax.config.update("jax_enable_x64", True)
    if cache_dir:
        runtime.use_compilation_cache(cache_dir)


def _fail(command: str, message: str, code: int = 2) -> int:
    print(f"mdsens {command}: error: {message}", file=sys.stderr)
    return code


def _study(args: argparse.Namespace, argv: Sequence[str], own_process: bool) -> int:
    try:
        config = study.load_config(args.config)
    except study.StudyConfigError as error:
        return _fail("study", str(error))
    for flag, value in (("--cpu-devices", args.cpu_devices), ("--width", args.width)):
        if value is not None and value < 1:
            return _fail("study", f"{flag} must be >= 1; got {value}.")
    try:
        store.check_out(args.out)
    except study.StudyError as error:
        return _fail("study", str(error))

    distributed = None
    explicit = {
        "coordinator_address": args.coordinator,
        "num_processes": args.num_processes,
        "process_id": args.process_id,
    }
    if args.distributed or any(v is not None for v in explicit.values()):
        distributed = {k: v for k, v in explicit.items() if v is not None}
        if 0 < len(distributed) < 3 and args.coordinator is not None:
            return _fail("study", "--coordinator needs --num-processes and --process-id too.")
    cache_dir = None if args.no_cache else (args.cache_dir or runtime.default_cache_dir())
    _setup_jax(cache_dir, args.cpu_devices, distributed, argv, own_process)

    def log(message: str) -> None:
        if jax.process_index() == 0:
            print(message, file=sys.stderr, flush=True)

    try:
        if args.dry_run:
            print(json.dumps(_plan_summary(study.Plan.from_config(config)), indent=2))
            return 0
        with warnings.catch_warnings():
            # mdsens's warnings (a stale lock taken over, a chunk computed again) as one line each.
            warnings.showwarning = lambda message, *_, **__: log(f"mdsens study: warning: {message}")
            dataset = study.run(config, args.out, progress=not args.no_progress, width=args.width, cache=False, log=log)
    except (study.StudyConfigError, study.StudyError) as error:
        return _fail("study", str(error))
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume.", file=sys.stderr)
        return 130
    if dataset is None:  # not process 0
        return 0
    summary = {
        "results": str(pathlib.Path(args.out) / "results.nc"),
        "points": int(dataset.sizes["point"]),
        "seeds": int(dataset.sizes["seed"]),
        "relax_converged": int(dataset.relax_converged.sum()),
        "samples": int(dataset.relax_converged.size),
        "chunks_computed": int(dataset.attrs.get("run_chunks_computed", 0)),
        "devices": int(dataset.attrs.get("run_devices", 0)),
        "seconds": float(dataset.attrs.get("run_seconds", 0.0)),
    }
    if "solve_converged" in dataset:
        summary["solves_converged"] = int(dataset.solve_converged.sum())
        summary["solves"] = int(dataset.solve_converged.size)
    summary["failed_samples"] = int(dataset.attrs["failed_samples"])
    print(json.dumps(summary, indent=2))
    # study.run logged the failed samples as the last line of stderr.
    return EXIT_FAILED_SAMPLES if summary["failed_samples"] else 0


def _plan_summary(plan: study.Plan) -> dict:
    return {
        "points": plan.n_points,
        "seeds": list(plan.config.seeds),
        "samples": plan.n_points * plan.n_seeds,
        "groups": [{"points": len(g.points), "n": g.n, "dim": g.dim} for g in plan.groups],
        "chunks": len(plan.chunks),
        "chunk_size": plan.config.chunk_size,
        "schedule": plan.config.schedule,
        "devices": len(jax.devices()),
        "sensitivities": list(plan.config.sensitivities),
    }


def _export(args: argparse.Namespace) -> int:
    jax.config.update("jax_enable_x64", True)
    try:
        study.export(args.out, args.point, args.seed, args.to, config=args.config)
    except (study.StudyConfigError, study.StudyError, ValueError, OSError) as error:
        return _fail("export", str(error))
    print(f"wrote {args.to}")
    return 0


def _demo(argv: Sequence[str]) -> int:
    if not {"-h", "--help"} & set(argv):
        _setup_jax(runtime.default_cache_dir())  # the demo runs on one device: no re-run for more
    from mdsens import demo  # imports matplotlib: only for this command

    demo.main(list(argv))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command; ``argv`` None: the process's own arguments (the console
    script, ``python -m mdsens.cli``), and the process is the command's own."""
    own_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "demo":
        # The demo's own parser (mdsens.demo.main) reads its options and --help.
        return _demo(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "study":
        return _study(args, argv, own_process)
    if args.command == "export":
        return _export(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
