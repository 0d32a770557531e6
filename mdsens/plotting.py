"""Matplotlib helpers: packings drawn to scale, with sensitivity arrows."""

from __future__ import annotations

import itertools

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import PatchCollection
from matplotlib.patches import Circle

SPECIES_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52")


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
        for x, d, s in zip(positions + shift, diameters, species):
            if box is None or np.all((x + d / 2 > 0) & (x - d / 2 < box)):
                patches.append(Circle(tuple(x), d / 2))
                colors.append(SPECIES_COLORS[int(s) % len(SPECIES_COLORS)])
    ax.add_collection(PatchCollection(patches, facecolor=colors, edgecolor="k", linewidth=0.4, alpha=0.75))
    if arrows is not None:
        arrows = np.asarray(arrows)
        if arrow_scale is None:
            longest = np.max(np.linalg.norm(arrows, axis=1))
            arrow_scale = np.mean(diameters) / longest if longest > 0 else 1.0
        ax.quiver(
            positions[:, 0], positions[:, 1], arrows[:, 0] * arrow_scale, arrows[:, 1] * arrow_scale,
            angles="xy", scale_units="xy", scale=1.0, width=0.004, color="k",
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
