"""Matplotlib helpers: packings drawn to scale with sensitivity arrows, comparisons
of derivative methods, convergence curves, optimisation histories and parameter
sweeps with seed spread.

Every figure of mdsens is drawn in one colour-blind-safe style (:data:`STYLE`,
applied by :func:`styled`): the Okabe-Ito colours (:data:`OKABE_ITO`) for
categories, the perceptually uniform ``cividis`` colour map for ordered values.
"""

from __future__ import annotations

import functools
import itertools
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

import matplotlib.pyplot as plt
import numpy as np
from cycler import cycler
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.collections import PatchCollection
from matplotlib.lines import Line2D
from matplotlib.patches import Circle, Rectangle
from matplotlib.typing import RcKeyType

#: Okabe and Ito's palette (*Color Universal Design*, 2008): told apart under the common colour-vision deficiencies.
OKABE_ITO = {
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "bluish green": "#009E73",
    "orange": "#E69F00",
    "reddish purple": "#CC79A7",
    "sky blue": "#56B4E9",
    "yellow": "#F0E442",
    "black": "#000000",
}
#: Fill colours of particle species: the light Okabe-Ito colours, under black arrows.
SPECIES_COLORS = tuple(OKABE_ITO[name] for name in ("sky blue", "orange", "bluish green", "reddish purple"))
#: Colour map of ordered values (a sweep's packing fractions): readable in grey and under colour-vision deficiencies.
SEQUENTIAL = "cividis"
#: The ``rcParams`` of every figure (:func:`styled`).
STYLE: dict[RcKeyType, Any] = {
    "axes.prop_cycle": cycler(
        color=[OKABE_ITO[name] for name in ("blue", "vermillion", "bluish green", "orange", "reddish purple", "black")]
    ),
    "image.cmap": SEQUENTIAL,
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "legend.fontsize": 8,
    "figure.titlesize": 12,
    "lines.markersize": 4,
}

_P = ParamSpec("_P")
_R = TypeVar("_R")


def styled(draw: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorate a function that draws a figure: it draws in :data:`STYLE` (the
    global ``rcParams`` are left as they were)."""

    @functools.wraps(draw)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with plt.rc_context(STYLE):
            return draw(*args, **kwargs)

    return wrapper


def with_uncertainty(value: float, uncertainty: float) -> str:
    """``value ± uncertainty`` with the uncertainty to two significant digits and the
    value to the same decimal place: ``with_uncertainty(1.05046, 0.00357)`` is
    ``"1.0505 ± 0.0036"``, never ``"± 0.00"``."""
    if not (math.isfinite(uncertainty) and uncertainty > 0):
        return f"{value:.3g} ± {uncertainty:.2g}"
    decimals = max(0, 1 - math.floor(math.log10(uncertainty)))
    return f"{value:.{decimals}f} ± {uncertainty:.{decimals}f}"


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


def arrow_scale_for(field: np.ndarray, diameters: np.ndarray) -> float:
    """Arrow length per unit of ``field`` that draws its longest vector one mean diameter long."""
    longest = np.max(np.linalg.norm(np.asarray(field), axis=1))
    return float(np.mean(diameters) / longest) if longest > 0 else 1.0


def key_length(longest: float) -> float:
    """The arrow key's length: the largest of 1, 2 or 5 times a power of ten not above ``longest``."""
    if not (math.isfinite(longest) and longest > 0):
        return 1.0
    decade = 10.0 ** math.floor(math.log10(longest))
    return max(m * decade for m in (1.0, 2.0, 5.0) if m * decade <= longest * (1 + 1e-12))


def draw_packing(
    ax: Axes,
    positions: np.ndarray,
    diameters: np.ndarray,
    species: np.ndarray,
    box: np.ndarray | None = None,
    arrows: np.ndarray | None = None,
    arrow_scale: float | None = None,
    arrow_label: str = "",
    legend: bool = True,
) -> Axes:
    """Draw 2D discs to scale, coloured by species, with optional arrows.

    Below the drawing: a legend of the species (with their diameters) and the
    box, and with ``arrows`` a key, an arrow of a round length (1, 2 or 5
    times a power of ten) labelled ``arrow_label = value``.

    Args:
        positions: ``(N, 2)``.
        diameters: ``(N,)`` per-particle diameters.
        species: ``(N,)`` integer species (colour).
        box: periodic box side lengths ``(2,)``, drawn as a rectangle; discs that
            cross an edge are also drawn at their periodic images, cut at the box.
        arrows: ``(N, 2)`` vectors drawn from each centre (e.g. ``dx*/dtheta``).
        arrow_scale: arrow length per unit of ``arrows`` (default: the longest
            arrow is one mean diameter long).
        arrow_label: the arrows' quantity, for the key (mathtext, e.g. ``r"$\\partial x^*/\\partial\\theta$"``).
        legend: draw the legend and the key.
    """
    positions, diameters = np.asarray(positions), np.asarray(diameters)
    species = np.asarray(species)
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise ValueError(f"draw_packing draws 2D packings; got positions of shape {positions.shape}.")
    shifts = [np.zeros(2)]
    outline = None
    if box is not None:
        box = np.asarray(box)
        positions = np.mod(positions, box)
        shifts = [np.array(s) * box for s in itertools.product((-1, 0, 1), repeat=2)]
        outline = Rectangle((0.0, 0.0), box[0], box[1], fill=False, edgecolor="k", linewidth=1.2, zorder=3)
        ax.add_patch(outline)
    patches, colors = [], []
    for shift in shifts:
        for x, d, s in zip(positions + shift, diameters, species, strict=True):
            if box is None or np.all((x + d / 2 > 0) & (x - d / 2 < box)):
                patches.append(Circle(tuple(x), d / 2))
                colors.append(SPECIES_COLORS[int(s) % len(SPECIES_COLORS)])
    discs = PatchCollection(patches, facecolor=colors, edgecolor="k", linewidth=0.4)
    ax.add_collection(discs)
    if outline is not None:
        discs.set_clip_path(outline)
    handles: list[Artist] = [
        Line2D([], [], ls="", marker="o", ms=9, mfc=SPECIES_COLORS[int(s) % len(SPECIES_COLORS)], mec="k", mew=0.4)
        for s in np.unique(species)
    ]
    labels = [f"$d = {np.mean(diameters[species == s]):.4g}$" for s in np.unique(species)]
    if box is not None:
        handles.append(Rectangle((0, 0), 1, 1, fill=False, edgecolor="k", linewidth=1.2))
        labels.append(f"periodic box ${box[0]:.3g} \\times {box[1]:.3g}$")
    if arrows is not None:
        arrows = np.asarray(arrows)
        if arrow_scale is None:
            arrow_scale = arrow_scale_for(arrows, diameters)
        quiver = ax.quiver(
            positions[:, 0],
            positions[:, 1],
            arrows[:, 0] * arrow_scale,
            arrows[:, 1] * arrow_scale,
            angles="xy",
            scale_units="xy",
            scale=1.0,
            width=0.004,
            color="k",
            zorder=4,
        )
        if legend:
            key = key_length(float(np.max(np.linalg.norm(arrows, axis=1))))
            # The key's arrow starts at X and ends at the box's right edge (free space: near the right).
            start = 0.8 if box is None else 0.98 - key * arrow_scale / float(box[0] + 0.04 * np.max(box))
            ax.quiverkey(
                quiver, start, -0.04, key * arrow_scale, f"{arrow_label} = {key:g}", labelpos="W", coordinates="axes"
            )
    if legend:
        ax.legend(
            handles, labels, loc="upper left", bbox_to_anchor=(0.0, 0.0), ncol=len(handles), handlelength=1.2,
            columnspacing=1.0, borderaxespad=0.2, frameon=False,
        )  # fmt: skip
    if box is not None:
        margin = 0.02 * np.max(box)
        ax.set_xlim(-margin, box[0] + margin)
        ax.set_ylim(-margin, box[1] + margin)
    else:
        ax.autoscale_view()
    ax.set_aspect("equal")
    ax.set_axis_off()
    return ax


@styled
def sensitivity_figure(
    positions: np.ndarray,
    diameters: np.ndarray,
    species: np.ndarray,
    box: np.ndarray | None,
    sensitivity: np.ndarray,
    title: str,
    arrow_label: str = "",
) -> plt.Figure:
    """One-panel figure of a packing with its sensitivity field as arrows (and their key)."""
    fig, ax = plt.subplots(figsize=(7.0, 7.6), layout="constrained")
    draw_packing(ax, positions, diameters, species, box=box, arrows=sensitivity, arrow_label=arrow_label)
    ax.set_title(title)
    return fig


@styled
def sensitivity_comparison(
    positions: np.ndarray,
    diameters: np.ndarray,
    species: np.ndarray,
    box: np.ndarray | None,
    fields: Mapping[str, np.ndarray],
    reference: np.ndarray,
    title: str,
    arrow_label: str = "",
) -> plt.Figure:
    """A 2 x 2 grid: a packing panel per sensitivity field (up to three), all arrows
    on the scale of ``reference``, each titled with its max-abs error against
    ``reference``; the last panel shows the per-particle error norms
    ``|d_i - d_ref,i|`` (log scale, sorted) of every field."""
    if len(fields) > 3:
        raise ValueError(f"sensitivity_comparison draws up to three fields; got {len(fields)}.")
    fig, axes = plt.subplots(2, 2, figsize=(11.0, 11.6), layout="constrained")
    scale = arrow_scale_for(reference, diameters)
    packing_axes = axes.ravel()[:-1]
    for ax, (label, field) in zip(packing_axes, fields.items(), strict=False):
        draw_packing(ax, positions, diameters, species, box, field, arrow_scale=scale, arrow_label=arrow_label)
        ax.set_title(f"{label}\nmax error {np.max(np.abs(field - reference)):.1e}")
    for ax in packing_axes[len(fields) :]:
        ax.set_axis_off()
    ax = axes[1, 1]
    tiny = np.finfo(np.float64).tiny
    for label, field in fields.items():
        error = np.sort(np.linalg.norm(np.asarray(field) - reference, axis=1))[::-1]
        ax.semilogy(np.arange(1, error.size + 1), np.maximum(error, tiny), ".-", label=label)
    ax.set_xlabel("particles $i$, by decreasing error")
    ax.set_ylabel(r"$|\partial_\theta x_i - \partial_\theta x_i^{\rm dense}|$")
    ax.legend()
    ax.set_title("error against the dense pseudo-inverse")
    fig.suptitle(title)
    return fig


@styled
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
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
    for label, error in errors.items():
        left.semilogy(steps, error, "o-", label=label)
        right.loglog(distance, error, "o", label=label)
    left.semilogy(steps, fmax, "k--", lw=1, label=r"residual force $f_{\max}$ of $x_k$")
    left.set_xlabel("FIRE steps $k$")
    left.set_ylabel(r"max error of $\partial x/\partial\theta$ (against the dense $\partial x^*/\partial\theta$)")
    left.legend()
    first = np.asarray(next(iter(errors.values())))
    usable = (np.asarray(distance) > 0) & np.isfinite(first)
    if np.any(usable):
        d, e = np.asarray(distance)[usable], first[usable]
        nearest = np.argmin(d)
        right.loglog(np.sort(d), e[nearest] / d[nearest] * np.sort(d), "k:", lw=1, label="slope 1 (Theorem 1)")
    right.set_xlabel(r"distance to the minimum, ${\rm max}_i\,|x_{k,i} - x_i^*|$")
    right.set_ylabel(r"max error of $\partial x/\partial\theta$")
    right.legend()
    fig.suptitle(title)
    return fig


@styled
def design_figure(
    loss: Sequence[float],
    curves: Mapping[str, Sequence[float]],
    structures: Mapping[str, tuple[np.ndarray, np.ndarray]],
    species: np.ndarray,
    box: np.ndarray | None,
    title: str,
    loss_label: str = "loss",
    curves_label: str = "",
) -> plt.Figure:
    """An optimisation history: the loss (log scale, y label ``loss_label``), the
    parameter ``curves`` (y label ``curves_label``) against the step, and packings
    drawn to scale (``structures``: title -> (positions, per-particle diameters))."""
    fig, axes = plt.subplots(1, 2 + len(structures), figsize=(4.4 * (2 + len(structures)), 5.0), layout="constrained")
    axes[0].semilogy(loss, "o-")
    axes[0].set_xlabel("outer step")
    axes[0].set_ylabel(loss_label)
    for label, values in curves.items():
        axes[1].plot(values, "o-", label=label)
    axes[1].set_xlabel("outer step")
    axes[1].set_ylabel(curves_label)
    axes[1].legend()
    for ax, (label, (positions, diameters)) in zip(axes[2:], structures.items(), strict=True):
        draw_packing(ax, positions, diameters, species, box=box)
        ax.set_title(label)
    fig.suptitle(title)
    return fig


def seed_band(ax: Axes, x: np.ndarray, samples: np.ndarray, label: str, color: Any = None) -> None:
    """Seed mean of ``samples`` ``(len(x), n_seeds)`` against ``x``, with a +-1 std band."""
    mean, spread = np.mean(samples, axis=1), np.std(samples, axis=1)
    (line,) = ax.plot(x, mean, "o-", label=label, color=color)
    ax.fill_between(x, mean - spread, mean + spread, color=line.get_color(), alpha=0.2, lw=0)


@styled
def sweep_figure(
    coordinates: Mapping[str, np.ndarray], observables: Mapping[str, np.ndarray], title: str
) -> plt.Figure:
    """Observables of a two-parameter sweep: one row per coordinate (the x axis),
    one line per value of the other coordinate (coloured along :data:`SEQUENTIAL`,
    legend right of the row), one column per observable.

    Args:
        coordinates: two 1-D arrays over the sweep's points, keyed by their axis labels.
        observables: arrays ``(point, seed)`` keyed by their axis labels; seed mean +-1 std is drawn.
    """
    names = list(coordinates)
    if len(names) != 2:
        raise ValueError(f"sweep_figure needs two coordinates; got {names}.")
    fig, axes = plt.subplots(
        2, len(observables), figsize=(3.6 * len(observables) + 1.6, 6.8), squeeze=False, layout="constrained"
    )
    colormap = plt.get_cmap(SEQUENTIAL)
    for row, (x_name, group_name) in enumerate((names, names[::-1])):
        x, group = np.asarray(coordinates[x_name]), np.asarray(coordinates[group_name])
        values = np.unique(group)
        for ax, (label, samples) in zip(axes[row], observables.items(), strict=True):
            for i, value in enumerate(values):
                members = np.flatnonzero(group == value)
                members = members[np.argsort(x[members])]
                color = colormap(0.75 * i / max(len(values) - 1, 1))  # not the pale top of the map
                seed_band(ax, x[members], np.asarray(samples)[members], f"{value:.3g}", color=color)
            ax.set_xlabel(x_name)
            ax.set_ylabel(label)
        axes[row, -1].legend(title=group_name, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"{title}\n(lines: mean over seeds; bands: ± one standard deviation)")
    return fig
