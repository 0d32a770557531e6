"""Matplotlib helpers: packings drawn to scale with sensitivity arrows, comparisons
of derivative methods, convergence curves, optimisation histories, parameter
sweeps with seed spread, and power laws with fitted exponents."""

from __future__ import annotations

import itertools
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import PatchCollection
from matplotlib.patches import Circle

SPECIES_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52")


def packing_drawing(system: Any, positions: Any = None, diameters: Any = None) -> dict[str, Any]:
    """The ``positions``, per-particle ``diameters``, ``species`` and ``box`` side
    lengths of a :class:`~mdsens.System` with diameters (e.g. soft spheres), as
    the keyword arguments of :func:`draw_packing` and :func:`sensitivity_figure`.

    Args:
        system: its species, box (diagonal, or None) and ``params["diameters"]``.
        positions: ``(N, 2)`` (default: the system's start).
        diameters: per species or per particle (default: the system's).
    """
    species = np.asarray(system.species)
    diameters = np.asarray(system.params["diameters"] if diameters is None else diameters)
    return {
        "positions": np.asarray(system.positions if positions is None else positions),
        "diameters": diameters if diameters.shape == species.shape else diameters[species],
        "species": species,
        "box": None if system.box is None else np.diag(np.asarray(system.box)),
    }


def save(figure: plt.Figure, path: str | pathlib.Path, dpi: int = 120) -> str:
    """Write ``figure`` to ``path`` (folders created), close it, return the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return str(path)


def draw_packing(
    ax: Axes,
    positions: np.ndarray,
    diameters: np.ndarray,
    species: np.ndarray,
    box: np.ndarray | None = None,
    arrows: np.ndarray | None = None,
    arrow_scale: float | None = None,
) -> Axes:
    """Draw 2D discs to scale, coloured by species, with optional arrows.

    Args:
        positions: ``(N, 2)``.
        diameters: ``(N,)`` per-particle diameters.
        species: ``(N,)`` integer species (colour).
        box: periodic box side lengths ``(2,)``; discs that cross an edge are
            also drawn at their periodic images, and the view is the box.
        arrows: ``(N, 2)`` vectors drawn from each centre (e.g. ``dx*/dtheta``).
        arrow_scale: arrow length per unit of ``arrows`` (default: the longest
            arrow is one mean diameter long).
    """
    positions, diameters = np.asarray(positions), np.asarray(diameters)
    species = np.asarray(species)
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise ValueError(f"draw_packing draws 2D packings; got positions of shape {positions.shape}.")
    shifts = [np.zeros(2)]
    if box is not None:
        box = np.asarray(box)
        positions = np.mod(positions, box)
        shifts = [np.array(s) * box for s in itertools.product((-1, 0, 1), repeat=2)]
    patches, colors = [], []
    for shift in shifts:
        for x, d, s in zip(positions + shift, diameters, species, strict=True):
            if box is None or np.all((x + d / 2 > 0) & (x - d / 2 < box)):
                patches.append(Circle(tuple(x), d / 2))
                colors.append(SPECIES_COLORS[int(s) % len(SPECIES_COLORS)])
    ax.add_collection(PatchCollection(patches, facecolor=colors, edgecolor="k", linewidth=0.4, alpha=0.75))
    if arrows is not None:
        arrows = np.asarray(arrows)
        if arrow_scale is None:
            arrow_scale = arrow_scale_for(arrows, diameters)
        ax.quiver(
            positions[:, 0],
            positions[:, 1],
            arrows[:, 0] * arrow_scale,
            arrows[:, 1] * arrow_scale,
            angles="xy",
            scale_units="xy",
            scale=1.0,
            width=0.004,
            color="k",
        )
    if box is not None:
        ax.set_xlim(0, box[0])
        ax.set_ylim(0, box[1])
    else:
        ax.autoscale_view()
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def sensitivity_figure(
    positions: np.ndarray,
    diameters: np.ndarray,
    species: np.ndarray,
    box: np.ndarray | None,
    sensitivity: np.ndarray,
    title: str,
) -> plt.Figure:
    """One-panel figure of a packing with its sensitivity field as arrows."""
    fig, ax = plt.subplots(figsize=(6, 6))
    draw_packing(ax, positions, diameters, species, box=box, arrows=sensitivity)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def arrow_scale_for(field: np.ndarray, diameters: np.ndarray) -> float:
    """Arrow length per unit of ``field`` that draws its longest vector one mean diameter long."""
    longest = np.max(np.linalg.norm(np.asarray(field), axis=1))
    return float(np.mean(diameters) / longest) if longest > 0 else 1.0


def sensitivity_comparison(
    positions: np.ndarray,
    diameters: np.ndarray,
    species: np.ndarray,
    box: np.ndarray | None,
    fields: Mapping[str, np.ndarray],
    reference: np.ndarray,
    title: str,
) -> plt.Figure:
    """One packing panel per sensitivity field, all arrows on the scale of
    ``reference``, each titled with its max-abs error against ``reference``;
    a last panel shows the per-particle error norms ``|d_i - d_ref,i|``
    (log scale, sorted) of every field."""
    fig, axes = plt.subplots(1, len(fields) + 1, figsize=(4.4 * (len(fields) + 1), 4.6))
    scale = arrow_scale_for(reference, diameters)
    # strict=False: the last axes are the error panel.
    for ax, (label, field) in zip(axes, fields.items(), strict=False):
        draw_packing(ax, positions, diameters, species, box=box, arrows=field, arrow_scale=scale)
        ax.set_title(f"{label}\nmax error {np.max(np.abs(field - reference)):.1e}", fontsize=10)
    ax = axes[-1]
    tiny = np.finfo(np.float64).tiny
    for label, field in fields.items():
        error = np.sort(np.linalg.norm(np.asarray(field) - reference, axis=1))[::-1]
        ax.semilogy(np.arange(1, error.size + 1), np.maximum(error, tiny), ".-", label=label)
    ax.set_xlabel("particles, by decreasing error")
    ax.set_ylabel(r"$|\partial_\theta x_i - \partial_\theta x_i^{\rm dense}|$")
    ax.legend(fontsize=8)
    ax.set_title("error against the dense pseudo-inverse", fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def precision_figure(
    steps: np.ndarray,
    errors: Mapping[str, np.ndarray],
    fmax: np.ndarray,
    distance: np.ndarray,
    title: str,
) -> plt.Figure:
    """Derivative errors after k minimiser steps: against k (with the residual
    force ``fmax`` of x_k, dashed) and against the distance ``|x_k - x*|``
    (with a slope-1 guide through the point nearest x*: the linear bound of
    Blondel et al., Theorem 1). NaN errors are left out."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    for label, error in errors.items():
        left.semilogy(steps, error, "o-", label=label)
        right.loglog(distance, error, "o", label=label)
    left.semilogy(steps, fmax, "k--", lw=1, label=r"$f_{\max}$ of $x_k$")
    left.set_xlabel("minimiser steps k")
    left.set_ylabel("max-abs error of dx*/dθ")
    left.legend(fontsize=8)
    first = np.asarray(next(iter(errors.values())))
    usable = (np.asarray(distance) > 0) & np.isfinite(first)
    if np.any(usable):
        d, e = np.asarray(distance)[usable], first[usable]
        nearest = np.argmin(d)
        right.loglog(np.sort(d), e[nearest] / d[nearest] * np.sort(d), "k:", lw=1, label="slope 1")
    right.set_xlabel(r"$\max |x_k - x^*|$")
    right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def design_figure(
    loss: Sequence[float],
    curves: Mapping[str, Sequence[float]],
    structures: Mapping[str, tuple[np.ndarray, np.ndarray]],
    species: np.ndarray,
    box: np.ndarray | None,
    title: str,
) -> plt.Figure:
    """An optimisation history: the loss (log scale), parameter ``curves`` against
    the step, and packings drawn to scale (``structures``: title -> (positions,
    per-particle diameters))."""
    fig, axes = plt.subplots(1, 2 + len(structures), figsize=(4.2 * (2 + len(structures)), 4.2))
    axes[0].semilogy(loss, "o-")
    axes[0].set_xlabel("outer step")
    axes[0].set_ylabel("loss")
    for label, values in curves.items():
        axes[1].plot(values, "o-", label=label)
    axes[1].set_xlabel("outer step")
    axes[1].legend(fontsize=8)
    for ax, (label, (positions, diameters)) in zip(axes[2:], structures.items(), strict=True):
        draw_packing(ax, positions, diameters, species, box=box)
        ax.set_title(label, fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def seed_band(ax: Axes, x: np.ndarray, samples: np.ndarray, label: str, color: str | None = None) -> None:
    """Seed mean of ``samples`` ``(len(x), n_seeds)`` against ``x``, with a +-1 std band."""
    mean, spread = np.mean(samples, axis=1), np.std(samples, axis=1)
    (line,) = ax.plot(x, mean, "o-", label=label, color=color, ms=3)
    ax.fill_between(x, mean - spread, mean + spread, color=line.get_color(), alpha=0.25, lw=0)


def sweep_figure(
    coordinates: Mapping[str, np.ndarray], observables: Mapping[str, np.ndarray], title: str
) -> plt.Figure:
    """Observables of a two-parameter sweep: one row per coordinate (the x axis),
    one line per value of the other coordinate, one column per observable.

    Args:
        coordinates: two 1-D arrays over the sweep's points (e.g. phi and a ratio).
        observables: arrays ``(point, seed)``; seed mean +-1 std is drawn.
    """
    names = list(coordinates)
    if len(names) != 2:
        raise ValueError(f"sweep_figure needs two coordinates; got {names}.")
    fig, axes = plt.subplots(2, len(observables), figsize=(3.8 * len(observables), 6.6), squeeze=False)
    for row, (x_name, group_name) in enumerate((names, names[::-1])):
        x, group = np.asarray(coordinates[x_name]), np.asarray(coordinates[group_name])
        for ax, (label, samples) in zip(axes[row], observables.items(), strict=True):
            for value in np.unique(group):
                members = np.flatnonzero(group == value)
                members = members[np.argsort(x[members])]
                seed_band(ax, x[members], np.asarray(samples)[members], f"{group_name} {value:.3g}")
            ax.set_xlabel(x_name)
            ax.set_ylabel(label)
        axes[row, 0].legend(fontsize=7)
    fig.suptitle(f"{title}\n(seed mean ± std)", fontsize=10)
    fig.tight_layout()
    return fig


def scaling_figure(
    x: np.ndarray,
    panels: Sequence[Mapping[str, np.ndarray]],
    exponents: Mapping[str, tuple[float, float]],
    xlabel: str,
    title: str,
) -> plt.Figure:
    """Power laws on log-log axes: one panel per mapping ``label -> samples
    (n_seeds, len(x))``; seeds as dots, the seed mean as circles, and the line
    ``c x^a`` with ``(a, uncertainty) = exponents[label]`` through the means."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    x = np.asarray(x)
    for ax, panel in zip(axes[0], panels, strict=True):
        for i, (label, samples) in enumerate(panel.items()):
            color = f"C{i}"
            samples = np.asarray(samples)
            mean = samples.mean(axis=0)
            ax.loglog(np.broadcast_to(x, samples.shape).ravel(), samples.ravel(), ".", color=color, alpha=0.3)
            ax.loglog(x, mean, "o", color=color)
            a, error = exponents[label]
            c = np.exp(np.mean(np.log(mean) - a * np.log(x)))
            ax.loglog(x, c * x**a, "-", color=color, label=f"{label}: exponent {a:.3f} ± {error:.3f}")
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
