r"""Figure: jamming by pressure, the scaling of :mod:`~mdsens.figures.jamming_scaling` against the target pressure.

Computation (:func:`seed_rows`, one seed): the 2D harmonic 50:50 discs of the
jamming figure (diameters 1 and 1.4, alpha = 2, epsilon = 1, all pairs), from
random positions at ``phi_start``, relaxed with an isotropically relaxing box
at each target pressure in falling order, each state from the previous one
(:func:`mdsens.jamming.at_pressures`, the enthalpy ``E + p V`` minimised over
positions and box): :data:`PRESSURES`, then :data:`JAMMING_PRESSURES`. The
seed's jamming point ``phi_J`` is the linear extrapolation of the last two
states (``p = 1e-6, 1e-7``) to ``p = 0``: its error, of order ``1e-7 / B``, is
far below the ``phi - phi_J`` of the lowest pressure of the figure (1e-5),
unless the packing rearranges on its way down (then the seed's ``phi - phi_J``
is off at the pressures above the rearrangement, and can be negative). At
each pressure of the figure (:func:`mdsens.jamming.observe`):
``excess_phi = phi - phi_J``, the bulk and shear moduli by implicit
differentiation, and ``excess_z = z - z_iso`` among non-rattlers.
:func:`compute` runs every seed and returns the rows with their settings and
CPU and wall time (``data/jamming_pressure.json``).

Exponents against ``p`` (:func:`mdsens.figures.jamming_scaling.exponent`,
slopes of log(seed mean) with the bootstrap spread over seeds). Expected for
harmonic spheres (:data:`EXPECTED`; O'Hern et al., PRE 68, 011306, 2003, with
``p ~ phi - phi_J``): ``phi - phi_J ~ p``, ``z - z_iso ~ p^1/2``,
``G ~ p^1/2``, ``B ~ p^0``. Small ``N`` and few seeds keep the computation to
a few CPU minutes: ``z - z_iso`` moves in steps of ``2/N'`` and small
packings can have ``G < 0`` at the lowest pressures (their box shape is held).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from mdsens import jamming, plotting, systems
from mdsens.figures import jamming_scaling

#: The target pressures of the figure, 1e-5 to 1e-2 (falling: the protocol decompresses).
PRESSURES = tuple(float(p) for p in np.logspace(-2, -5, 7))
#: Pressures after the figure's, whose states give ``phi_J`` by linear extrapolation to ``p = 0``.
JAMMING_PRESSURES = (1e-6, 1e-7)
EXPECTED = {"excess_phi": 1.0, "bulk_modulus": 0.0, "shear_modulus": 0.5, "excess_z": 0.5}
PANELS = (
    ("excess_phi", r"distance to jamming $\phi - \phi_J$"),
    ("bulk_modulus", "bulk modulus $B$"),
    ("shear_modulus", "shear modulus $G$"),
    ("excess_z", r"excess contacts $z - z_{\rm iso}$"),
)
PHI_START = 0.86
SIZES = {
    "small": {"n": 32, "seeds": 2, "n_boot": 200},
    "full": {"n": 128, "seeds": 8, "n_boot": 2000},
}


def seed_rows(
    n: int, seed: int, pressures: Sequence[float] = PRESSURES, phi_start: float = PHI_START
) -> list[dict[str, Any]]:
    """One row per target pressure of ``pressures`` for one seed: ``pressure``
    (the target), ``virial_pressure``, ``phi``, ``phi_J``, ``excess_phi`` and
    the numbers of :func:`mdsens.jamming.observe`, with ``excess_z``; each row
    has the seed's ``cpu_seconds`` and ``wall_seconds``."""
    pressures = sorted((float(p) for p in pressures), reverse=True)
    if pressures[-1] <= JAMMING_PRESSURES[0]:
        raise ValueError(f"the pressures must stay above {JAMMING_PRESSURES[0]:g}; got {pressures[-1]:g}.")
    cpu, wall = time.process_time(), time.perf_counter()
    system = systems.soft_sphere_packing(
        n, dim=2, phi=phi_start, diameters=(1.0, 1.4), alpha=2.0, seed=seed, neighbor_list=False
    )
    *states, low, lowest = jamming.at_pressures(system, [*pressures, *JAMMING_PRESSURES])
    phi_j = lowest.phi - lowest.pressure * (low.phi - lowest.phi) / (low.pressure - lowest.pressure)
    rows = []
    for p, state in zip(pressures, states, strict=True):
        row = {"n": n, "seed": seed, "phi_J": phi_j, **jamming.observe(system, state)}
        row.update(pressure=p, virial_pressure=state.pressure, excess_phi=state.phi - phi_j)
        row.update(excess_z=row["z"] - row["z_iso"], phi_J_converged=low.converged and lowest.converged)
        rows.append(row)
    seconds = {"cpu_seconds": round(time.process_time() - cpu, 1), "wall_seconds": round(time.perf_counter() - wall, 1)}
    print(f"n={n} seed={seed}: phi_J={phi_j:.6f} {seconds}", file=sys.stderr, flush=True)
    return [{**row, **seconds} for row in rows]


def compute(n: int, seeds: int, pressures: Sequence[float] = PRESSURES, phi_start: float = PHI_START) -> dict:
    """The rows of seeds ``0 .. seeds - 1`` with the settings, the machine, the
    date and the total CPU and wall time: what ``data/jamming_pressure.json`` holds."""
    cpu, wall = time.process_time(), time.perf_counter()
    rows = [row for seed in range(seeds) for row in seed_rows(n, seed, pressures, phi_start)]
    return {
        "settings": {
            "system": "2D harmonic (alpha=2) 50:50 bidisperse discs, diameters 1 and 1.4, epsilon=1, all pairs",
            "protocol": "mdsens.jamming.at_pressures (isotropic box), falling pressures, each from the previous",
            "n": n,
            "seeds": seeds,
            "phi_start": phi_start,
            "pressures": sorted(float(p) for p in pressures),
            "jamming_pressures": list(JAMMING_PRESSURES),
            "fmax": jamming.MINIMISER.fmax,
        },
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "cpu_seconds": round(time.process_time() - cpu, 1),
        "wall_seconds": round(time.perf_counter() - wall, 1),
        "rows": rows,
    }


def title(n: int, seeds: int) -> str:
    """The figure's title."""
    return (
        f"2D harmonic bidisperse discs at fixed pressure: $N = {n}$, {seeds} seeds (kept small: a few CPU minutes)\n"
        "(exponent ± its bootstrap spread over seeds; cf. O'Hern et al., PRE 68, 011306, 2003)"
    )


def run(
    size: str = "full",
    out: str | pathlib.Path = "out/figures",
    data: str | pathlib.Path = "data/jamming_pressure.json",
    compute_data: bool = False,
) -> dict:
    """Fit the rows of the JSON ``data`` (with ``compute_data``: first computed at
    ``size`` by :func:`compute` and written there), draw ``jamming_pressure.png``
    into ``out`` and return the summary."""
    if compute_data:
        settings = SIZES[size]
        computed = compute(settings["n"], settings["seeds"])
        pathlib.Path(data).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(data).write_text(json.dumps(computed, indent=1) + "\n")
    recorded = json.loads(pathlib.Path(data).read_text())
    rows = recorded["rows"]
    fits = {
        q: jamming_scaling.exponent(rows, q, SIZES[size]["n_boot"], against="pressure", expected=e)
        for q, e in EXPECTED.items()
    }
    n, seeds = int(rows[0]["n"]), len({row["seed"] for row in rows})
    figure = jamming_scaling.scaling_panels(
        rows, fits, title(n, seeds), panels=PANELS, against="pressure", xlabel="pressure $p$"
    )
    return {
        "n": n,
        "seeds": seeds,
        "pressure": fits["excess_phi"]["pressure"],
        "phi_J": {str(row["seed"]): row["phi_J"] for row in rows},
        "seed_mean": {q: fitted["mean"] for q, fitted in fits.items()},
        "exponents": {
            q: {k: fitted[k] for k in ("exponent", "uncertainty", "expected", "within_tolerance")}
            for q, fitted in fits.items()
        },
        "all_states_converged": all(row["converged"] and row["phi_J_converged"] for row in rows),
        "all_moduli_ok": all(row["moduli_ok"] for row in rows),
        "largest_pressure_residual": max(abs(row["virial_pressure"] - row["pressure"]) for row in rows),
        "cpu_seconds": recorded["cpu_seconds"],
        "wall_seconds": recorded["wall_seconds"],
        "figures": [plotting.save(figure, pathlib.Path(out) / "jamming_pressure.png")],
    }
