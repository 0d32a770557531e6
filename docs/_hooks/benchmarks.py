"""A MkDocs hook: the benchmark tables, generated at build time from the committed JSON.

A line ``<!-- benchmark: data/bench_x.json -->`` in a page becomes the table of
that file (a path from the repository's root), under a line that names the
file and the machine, date, load, CPU and wall time the JSON recorded, or says
that it recorded none. The benchmark scripts print different JSON; each
format has its renderer (:data:`RENDERERS`, chosen by :func:`kind`), which
reads it as it is. A JSON of no known format fails the build.

Configured in mkdocs.yml (``hooks:``); ``tests/test_benchmarks_page.py``
checks the built page's numbers against the JSON.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^<!-- benchmark: (\S+) -->$", re.MULTILINE)
NOT_RECORDED = "not recorded in the JSON"


def number(value: Any) -> str:
    """A JSON number as the tables show it: integers whole, floats to 4 significant digits."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(number(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def caption(path: str, **recorded: Any) -> str:
    """The line above a table: the file and what it recorded (None: not recorded)."""
    said = [f"{name}: {NOT_RECORDED if value is None else value}" for name, value in recorded.items()]
    return f"Generated from `{path}`: " + "; ".join(said) + "."


def loads(values: Any) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


#: The rows of :func:`sensitivity`: label, and the keys of the time, the count and the error (None: none).
SENSITIVITY_ROWS = (
    ("relaxation, FIRE (steps)", "relax_s", "relax_steps", None),
    ("implicit JVP dx*/d(small diameter) (CG iterations)", "implicit_jvp_s", "cg_iterations_jvp", "implicit_jvp_error"),
    (
        "implicit gradient, all N diameters (CG iterations)",
        "implicit_grad_s",
        "cg_iterations_grad",
        "implicit_grad_error",
    ),
    ("the same, Jacobi-preconditioned (CG iterations)", None, "cg_iterations_grad_jacobi", None),
    ("dense reference (compilation included)", "dense_s", None, None),
    ("unrolled: reverse mode through the relaxation", "unrolled_grad_s", None, "unrolled_grad_error"),
    ("finite differences, JVP (2 relaxations)", "fd_jvp_s", None, "fd_jvp_error"),
    (
        "finite differences, gradient (estimated; parameters timed)",
        "fd_grad_s_estimated",
        "fd_grad_timed_parameters",
        None,
    ),
    ("jaxopt custom_root, reverse mode", "jaxopt_grad_s", None, "jaxopt_grad_error"),
    ("jaxopt root_jvp, forward mode", "jaxopt_jvp_s", None, "jaxopt_jvp_error"),
)


def sensitivity(path: str, data: dict[str, Any]) -> str:
    """``scripts/bench_sensitivity.py``: the cost and accuracy of each derivative method, by N."""
    rows = []
    for result in data["results"]:
        for label, time, count, error in SENSITIVITY_ROWS:
            if (time or count) in result:
                cells = [result.get(key, "—") if key else "—" for key in (time, count, error)]
                rows.append([result["n"], label, *cells])
    jaxopt = {result["n"]: result["jaxopt"] for result in data["results"] if "jaxopt" in result}
    header = ["N", "method", "wall s", "count", "error vs dense"]
    return "\n\n".join(
        [
            caption(
                path,
                machine=data.get("machine"),
                date=data.get("date"),
                jax=data.get("jax"),
                **{
                    "load average at the end": loads(data["load_average_at_end"]),
                    "CPU time": None,
                    "wall time": "per method, in the table (the fastest of its runs after a warm-up)",
                },
            ),
            table(header, rows),
        ]
        + ([f"jaxopt: {jaxopt}."] if jaxopt else [])
    )


def relax_peers(path: str, data: dict[str, Any]) -> str:
    """``scripts/bench_relax_peers.py``: one row per size, seed and code."""
    rows = []
    for n, seeds in data["results"].items():
        for seed, runs in seeds.items():
            for code, run in runs.items():
                if code == "lammps_energy_check":
                    continue
                times = [run["cpu_s"], run["wall_s"], run["cpu_ms_per_step"]]
                ratio = run.get("cpu_per_step_ratio_to_mdsens", 1)
                rows.append([int(n), int(seed), code, run["steps"], *times, f"{run['fmax']:.1e}", ratio])
    header = ["N", "seed", "code", "steps", "CPU s", "wall s", "CPU ms/step", "final fmax", "CPU/step vs mdsens"]
    return "\n\n".join(
        [
            caption(
                path,
                machine=data.get("machine"),
                date=data.get("date"),
                device=data.get("device"),
                **{"CPUs the process could use": data.get("cpus")},
                **{"load average": loads(data["load_average"]) if "load_average" in data else None},
                system=data.get("system"),
                fmax=data.get("fmax"),
                # Runs before --lammps-styles ran both.
                **{"LAMMPS min_styles": ", ".join(data.get("lammps_styles", ["fire", "cg"]))},
                **{"CPU and wall time": "per run, in the table (time.process_time, perf_counter)"},
            ),
            table(header, rows),
        ]
    )


#: The preconditioners of ``scripts/bench_scale.py``, in its order: JSON key, column.
PRECONDITIONERS = [
    ("none", "CG: none"),
    ("jacobi", "Jacobi"),
    ("block_jacobi", "block Jacobi"),
    ("two_level", "two-level"),
]


def iterations(solves: dict[str, Any]) -> list[Any]:
    """CG iterations of each preconditioner ("—" where the run did not measure it)."""
    return [solves[key]["cg_iterations"] if key in solves else "—" for key, _ in PRECONDITIONERS]


def preconditioners(path: str, data: dict[str, Any]) -> str:
    """``scripts/bench_scale.py --phis``: CG iterations per size and packing fraction."""
    rows = []
    for r in data["results"]:
        difference = f"{max(solve['max_rel_diff'] for solve in r['solves'].values()):.1e}"
        rows.append([r["n"], r["phi"], r["relax_steps"], *iterations(r["solves"]), difference, loads(r["load"])])
    header = ["N", "φ", "FIRE steps", *(name for _, name in PRECONDITIONERS)]
    header += ["largest rel. difference", "load average"]
    return "\n\n".join(
        [
            caption(
                path,
                machine=data.get("machine"),
                date=data.get("date"),
                **{"CPU and wall time": "not measured (iteration counts only)", "load average": "per row"},
            ),
            table(header, rows),
        ]
    )


def scale(path: str, data: dict[str, Any]) -> str:
    """``scripts/bench_scale.py``: relaxation and one sensitivity per size, CPU time
    (wall time in the JSON); the sensitivity with its fastest preconditioner."""
    rows = []
    for r in data["results"]:
        share = r["sensitivity_share"]
        best = r["solves"][share["preconditioner"]]
        relax = r.get("relax_warm", r["relax"])
        e = r["eval_ms"]
        costs = [e["force"]["cpu_ms"], e["hvp"]["cpu_ms"], e["hvp_linearized"]["cpu_ms"]]
        sensitivity = [share["preconditioner"], best["warm"]["cpu_s"], f"{100 * share['warm_over_relax_cpu']:.1f}%"]
        rows.append([r["n"], r["relax_steps"], relax["cpu_s"], *iterations(r["solves"]), *sensitivity, *costs])
        rows[-1] += [r["peak_rss_mb"], loads(r["load_before"])]
    header = ["N", "FIRE steps", "relax CPU s", *(name for _, name in PRECONDITIONERS), "fastest", "sensitivity CPU s"]
    header += ["share", "force CPU ms", "HVP CPU ms", "HVP linearised CPU ms", "peak MB", "load average"]
    return "\n\n".join(
        [
            caption(
                path,
                machine=data.get("machine"),
                date=data.get("date"),
                **{"CPUs the process could use": data.get("cpus")},
                **{"CPU and wall time": "CPU in the table, both in the JSON", "load average": "per row"},
            ),
            table(header, rows),
        ]
    )


def study(path: str, data: dict[str, Any]) -> str:
    """``scripts/bench_study.py``: the loop of single runs against the study on one and several devices."""
    methods = [("loop", "loop of equilibrium_jvp"), ("study_1dev", "study"), ("study_Ndev", "study")]
    rows = []
    for key, name in methods:
        if key not in data:
            continue
        m = data[key]
        devices = m.get("devices", 1)
        warm_up = m.get("warmup_with_compile", m.get("first_call_with_compile"))
        useful = m.get("useful_slot_steps", "—")
        method = f"{name}, {devices} device" + ("s" if devices > 1 else "")
        times = [m["seconds"], m["per_sample"], m["cpu_per_sample"], m["samples_per_second"], warm_up]
        rows.append([method, m.get("width", "—"), *times, useful])
    w = data["workload"]
    header = [
        "method",
        "slots",
        "wall s",
        "wall s/sample",
        "CPU s/sample",
        "samples/s",
        "warm-up s",
        "useful slot steps",
    ]
    ratios = ", ".join(f"{name} {number(value)}" for name, value in data.get("ratios", {}).items())
    return "\n\n".join(
        [
            caption(
                path,
                machine=data.get("machine"),
                date=data.get("date"),
                cores=data.get("cpu_count"),
                device=data.get("device"),
                **{
                    "load average before / after": (
                        f"{loads(data['load_average_before'])}, {loads(data['load_average_after'])}"
                    ),
                    "workload": f"{w['samples']} packings of N = {w['n']} ({w['dim']}D), φ in {w['phi']}",
                    "CPU and wall time": "per method, in the table (time.process_time, perf_counter)",
                },
            ),
            table(header, rows),
            f"Ratios: {ratios}.",
        ]
    )


RENDERERS: dict[str, Callable[[str, Any], str]] = {
    "sensitivity": sensitivity,
    "relax_peers": relax_peers,
    "preconditioners": preconditioners,
    "study": study,
    "scale": scale,
}


def kind(data: Any) -> str:
    """The format of a benchmark JSON: a key of :data:`RENDERERS`."""
    if isinstance(data, dict) and data.get("benchmark") in RENDERERS:
        return data["benchmark"]
    if isinstance(data, dict) and {"workload", "ratios"} <= data.keys():
        return "study"
    raise ValueError(f"no renderer for this benchmark JSON (keys: {list(data)[:8]})")


def render(path: str) -> str:
    """The markdown of the benchmark JSON at ``path`` (relative to the repository's root)."""
    data = json.loads((ROOT / path).read_text())
    try:
        return RENDERERS[kind(data)](path, data)
    except (KeyError, ValueError) as error:
        raise ValueError(f"{path}: {error!r}") from error


def on_page_markdown(markdown: str, **_: Any) -> str:
    """MkDocs event: replace every benchmark marker of a page by its table."""
    return MARKER.sub(lambda match: render(match[1]), markdown)
