r"""Figure: a vacancy in Stillinger-Weber silicon, its formation energy and the
sensitivities of the relaxed vacancy to every potential parameter.

In a cell of ``8 cells^3`` sites (:func:`mdsens.systems.stillinger_weber_silicon`),
:func:`mdsens.defects.vacancy_formation` relaxes the vacancy and computes
:math:`dE_f/d\theta` (envelope theorem), the gradient of the relaxation of the
vacancy's four neighbours (reverse mode: one solve for all ten parameters) and
the fields :math:`dx^*/d\theta_k` (forward mode, one solve each);
:func:`mdsens.defects.check` compares all three with central differences of
re-relaxed vacancies. The formation energy is also computed in the larger
cells ``sizes`` (relaxation only): it falls with the cell as 1/N (the elastic
interaction of periodic images), extrapolated from the two largest cells, and is
compared with the published value
(:data:`mdsens.systems.materials.SW_VACANCY_FORMATION_ENERGY`).

Writes ``vacancy.png`` and ``vacancy.xyz`` (the relaxed vacancy with its forces
and ``dx_d<parameter>`` fields, for OVITO or ASE).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from mdsens import defects, io, plotting, systems
from mdsens.systems.materials import SW_VACANCY_FORMATION_ENERGY
from mdsens.systems.stillinger_weber import SILICON

SIZES: dict[str, dict[str, Any]] = {"small": {"cells": 2, "sizes": ()}, "full": {"cells": 2, "sizes": (3, 4)}}


def _scalars(tree: dict[str, Any]) -> dict[str, float]:
    return {name: float(value) for name, value in tree.items() if np.ndim(value) == 0}


def compute(cells: int, sizes: Sequence[int], out: str | pathlib.Path, relative_step: float = 1e-5) -> dict[str, Any]:
    """The vacancy's sensitivities and their check in the ``cells`` cell, its
    formation energy in the ``sizes`` cells; the relaxed vacancy written to
    ``out/vacancy.xyz``."""
    perfect = systems.stillinger_weber_silicon(cells=cells)
    vacancy = systems.stillinger_weber_silicon(cells=cells, vacancy=True)
    formation = defects.vacancy_formation(perfect, vacancy)
    checks = defects.check(perfect, vacancy, formation, relative_step)
    energies = {vacancy.n: formation.energy}
    for size in sizes:
        larger = systems.stillinger_weber_silicon(cells=size, vacancy=True)
        energies[larger.n] = defects.relaxed_vacancy(systems.stillinger_weber_silicon(cells=size), larger)[0]
    atoms = sorted(energies)
    # E_f(N) = E_inf + c / N through the two largest cells.
    extrapolated = None
    if len(atoms) >= 2:
        (n1, e1), (n2, e2) = ((n, energies[n]) for n in atoms[-2:])
        extrapolated = (e2 * n2 - e1 * n1) / (n2 - n1)

    path = pathlib.Path(out) / "vacancy.xyz"
    fields = {f"dx_d{name}": field for name, field in formation.fields.items()}
    io.write_extxyz(path, vacancy, formation.result.positions, arrays=fields, symbols=("Si",))
    return {
        "cells": cells,
        "atoms": vacancy.n,
        "formation_energy": formation.energy,
        "unrelaxed_formation_energy": formation.unrelaxed_energy,
        "relaxation": formation.relaxation,
        "energy_gradient": _scalars(formation.energy_gradient),
        "relaxation_gradient": _scalars(formation.relaxation_gradient),
        "finite_differences": checks,
        "largest_error": max(max(v for k, v in c.items() if k.endswith("_error")) for c in checks.values()),
        "formation_energy_by_atoms": {str(n): energies[n] for n in atoms},
        "extrapolated_formation_energy": extrapolated,
        "published": SW_VACANCY_FORMATION_ENERGY,
        "extxyz": str(path),
    }


def _decade_ticks(ax: Any, values: Sequence[float], threshold: float) -> None:
    """Ticks at 0 and at +- the decades from ``threshold`` to the largest ``|value|``."""
    top = int(np.ceil(np.log10(max(np.max(np.abs(values)), threshold))))
    decades = [10.0**k for k in range(int(np.log10(threshold)), top + 1)]
    ax.set_xticks([-d for d in decades[::-1]] + [0.0] + decades)
    ax.set_xticklabels([f"{-d:g}" for d in decades[::-1]] + ["0"] + [f"{d:g}" for d in decades], fontsize=7)


@plotting.styled
def draw(result: dict[str, Any]) -> plt.Figure:
    """Left and middle: dE_f/dtheta and the relaxation's gradient, adjoint (bars)
    and finite differences (dots); right: E_f against 1/N with the published value."""
    names = list(result["energy_gradient"])
    checks = result["finite_differences"]
    figure, axes = plt.subplots(1, 3, figsize=(13, 4.2), constrained_layout=True)
    y = np.arange(len(names))
    for ax, key, label in (
        (axes[0], "energy", r"$dE_f/d\theta$ (eV per unit of $\theta$)"),
        (axes[1], "relaxation", r"$d\bar r_1/d\theta$ (Å per unit of $\theta$)"),
    ):
        values = [checks[name][key] for name in names]
        ax.barh(y, values, color=plotting.OKABE_ITO["sky blue"], label="implicit (adjoint)")
        ax.plot([checks[name][f"{key}_fd"] for name in names], y, "k.", label="re-relaxed finite differences")
        ax.set_yticks(y, names)
        ax.axvline(0.0, color="0.5", lw=0.5)
        ax.set_xscale("symlog", linthresh=1e-2)
        _decade_ticks(ax, values, 1e-2)
        ax.set_xlabel(label)
    axes[0].legend(loc="lower right", fontsize=8)
    axes[0].set_title(f"vacancy formation energy, $N = {result['atoms']}$")
    axes[1].set_title("mean distance of the 4 neighbours to the site")

    atoms = np.array([int(n) for n in result["formation_energy_by_atoms"]])
    energies = np.array(list(result["formation_energy_by_atoms"].values()))
    ax = axes[2]
    ax.plot(1.0 / atoms, energies, "o-", color=plotting.OKABE_ITO["blue"], label="relaxed (this work)")
    published = result["published"]
    scaled = published["energy"] * SILICON["epsilon"] / published["epsilon"]
    ax.axhline(
        scaled,
        color="k",
        ls=":",
        label=f"published {published['energy']} eV at ε = {published['epsilon']} eV,\n"
        f"scaled to ε = {SILICON['epsilon']} eV: {scaled:.3f} eV",
    )
    ticks, labels = [1.0 / n for n in atoms], [str(n) for n in atoms]
    if result["extrapolated_formation_energy"] is not None:
        ax.plot(
            [0.0],
            [result["extrapolated_formation_energy"]],
            "s",
            color=plotting.OKABE_ITO["blue"],
            mfc="white",
            label="1/N → 0",
        )
        ticks, labels = [0.0, *ticks], ["∞", *labels]
    ax.set_xticks(ticks, labels)
    ax.set_xlabel("N (on a 1/N axis)")
    ax.set_ylabel(r"$E_f$ (eV)")
    ax.set_xlim(-0.1 * max(ticks), 1.1 * max(ticks))
    ax.legend(fontsize=8, title=f"unrelaxed: 2ε = {result['unrelaxed_formation_energy']:.4f} eV", title_fontsize=8)
    ax.set_title("Stillinger-Weber silicon, constant volume")
    return figure


def run(size: str = "full", out: str | pathlib.Path = "out/figures") -> dict[str, Any]:
    """Compute, draw ``vacancy.png`` (and write ``vacancy.xyz``) into ``out`` and return the summary."""
    pathlib.Path(out).mkdir(parents=True, exist_ok=True)
    result = compute(**SIZES[size], out=out)
    return {**result, "figures": [plotting.save(draw(result), pathlib.Path(out) / "vacancy.png")]}
