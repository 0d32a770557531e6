r"""Figure: the sensitivity of a jammed packing (the paper's experiment).

The packing of :mod:`mdsens.figures.packing` is relaxed by FIRE to fmax 1e-12,
and ``dx*/dtheta`` with theta the small particles' diameter is computed three
ways: implicit differentiation (one CG solve), unrolled forward mode through as
many FIRE steps as the relaxation took, and central finite differences of
re-relaxed states. Each is compared with the dense reference
``-pinv(H) d_theta grad E`` of :func:`mdsens.testing.dense_reference` (no code
shared with mdsens' solvers). Unrolled and finite-difference fields are
projected onto the complement of the zero modes first (the minimum-norm
convention that implicit and dense share).

Writes ``sensitivity.png`` (the implicit field alone, :func:`field_figure`:
the figure :mod:`mdsens.demo` draws) and ``sensitivity_methods.png``.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import mdsens
from mdsens import plotting, testing
from mdsens.adjoints import Adjoint
from mdsens.figures.packing import PHI, packing

SIZES = {"small": {"n": 16}, "full": {"n": 128}}
#: The arrows' quantity: theta is the small particles' diameter.
ARROW_LABEL = r"$|\partial x_i^*/\partial d_{\rm small}|$"


def field_figure(drawing: dict[str, Any], field: np.ndarray, phi: float) -> plt.Figure:
    """The relaxed packing (``drawing``: :func:`mdsens.plotting.packing_drawing`) with
    its sensitivity ``field`` to the small diameter as arrows."""
    return plotting.sensitivity_figure(
        **drawing,
        sensitivity=field,
        title=(
            r"$\partial x_i^*/\partial d_{\rm small}$ of a relaxed packing: "
            f"$N = {len(field)}$ discs, $\\phi = {phi:g}$, $f_{{\\max}} \\leq 10^{{-12}}$"
        ),
        arrow_label=ARROW_LABEL,
    )


def compute(n: int) -> dict[str, Any]:
    """The packing, its relaxation, the three sensitivity fields (projected) and
    the dense reference with its zero modes."""
    p = packing(n)
    relaxed = mdsens.relax(p.system)

    def derivative(adjoint: Adjoint) -> jax.Array:
        x_star = lambda theta: mdsens.equilibrium(p.system, theta, adjoint=adjoint)  # noqa: E731
        return jax.jvp(x_star, (p.theta,), (jnp.ones_like(p.theta),))[1]

    raw = {
        "implicit": derivative(mdsens.Implicit()),
        "unrolled": derivative(mdsens.Unrolled(int(relaxed.n_steps))),
        "finite_difference": derivative(mdsens.FiniteDifference()),
    }
    dense = testing.dense_reference(p.system.energy, relaxed.positions, p.theta)
    return {
        "packing": p,
        "relaxed": relaxed,
        "fields": {method: testing.project(field, dense.null_space) for method, field in raw.items()},
        "reference": dense.J[:, 0].reshape(relaxed.positions.shape),
        "n_zero_modes": dense.null_space.shape[1],
    }


def run(size: str = "full", out: str | pathlib.Path = "out/figures") -> dict[str, Any]:
    """Compute, draw ``sensitivity.png`` and ``sensitivity_methods.png`` into ``out`` and return the summary."""
    result = compute(**SIZES[size])
    p, relaxed, reference = result["packing"], result["relaxed"], result["reference"]
    labels = {
        "implicit": "implicit",
        "unrolled": f"unrolled ({int(relaxed.n_steps)} FIRE steps)",
        "finite_difference": "finite difference",
    }
    drawing, implicit = plotting.packing_drawing(p.base, relaxed.positions), result["fields"]["implicit"]
    comparison = plotting.sensitivity_comparison(
        **drawing,
        fields={labels[method]: field for method, field in result["fields"].items()},
        reference=reference,
        title=(
            r"$\partial x_i^*/\partial d_{\rm small}$ by three methods against the dense pseudo-inverse: "
            f"$N = {p.system.n}$ discs, $\\phi = {PHI:g}$"
        ),
        arrow_label=ARROW_LABEL,
    )
    out = pathlib.Path(out)
    return {
        "n": p.system.n,
        "phi": PHI,
        "relax": {"fmax": float(relaxed.fmax), "n_steps": int(relaxed.n_steps), "converged": bool(relaxed.converged)},
        "n_zero_modes": int(result["n_zero_modes"]),
        "reference_max_abs": float(np.max(np.abs(reference))),
        "max_abs_error": {
            method: float(np.max(np.abs(field - reference))) for method, field in result["fields"].items()
        },
        "figures": [
            plotting.save(field_figure(drawing, np.asarray(implicit), PHI), out / "sensitivity.png"),
            plotting.save(comparison, out / "sensitivity_methods.png"),
        ],
    }
