r"""Figure: precision of the derivative against the number of minimiser iterations.

The packing of :mod:`mdsens.figures.packing`. After k FIRE steps from the same
start:

- implicit: the implicit derivative ``-H^+ d_theta grad E`` evaluated at the
  unconverged state x_k (:func:`mdsens.sensitivity_at` with MINRES, since H
  need not be positive there; zero modes detected at x_k);
- unrolled: forward mode through the k FIRE steps (``jax.jvp`` through
  :func:`mdsens.relax` with ``FIRE(max_steps=k)``, the derivative that
  ``mdsens.Unrolled(k)`` computes; ``max_steps`` is a leaf of the minimiser,
  so one compilation serves every k).

Both are projected onto the complement of the zero modes of the converged
Hessian and compared with the dense reference at x*
(:func:`mdsens.testing.dense_reference`). Blondel et al. (Theorem 1) bound the
implicit error linearly by ``|x_k - x*|``; the unrolled derivative converges
only as the tangent dynamics of FIRE does.

Writes ``precision.png``.
"""

from __future__ import annotations

import pathlib
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import mdsens
from mdsens import plotting, testing
from mdsens.figures.packing import packing

SIZES = {"small": {"n": 16, "n_points": 6}, "full": {"n": 128, "n_points": 16}}


def compute(n: int, n_points: int) -> dict[str, Any]:
    """Errors of both derivatives after k steps, for k log-spaced up to convergence."""
    p = packing(n)
    converged = mdsens.relax(p.system)
    dense = testing.dense_reference(p.system.energy, converged.positions, p.theta)
    reference = dense.J[:, 0].reshape(converged.positions.shape)

    def error(field: Any) -> float:
        return float(np.max(np.abs(testing.project(field, dense.null_space) - reference)))

    implicit_at = jax.jit(
        lambda x: mdsens.sensitivity_at(
            p.system, x, p.theta, jnp.ones_like(p.theta), adjoint=mdsens.Implicit(solver=mdsens.MINRES())
        )
    )

    def after(steps: int, theta: jax.Array) -> tuple[jax.Array, mdsens.RelaxResult]:
        relaxed = mdsens.relax(p.system, params=theta, minimiser=mdsens.FIRE(max_steps=steps))
        return relaxed.positions, relaxed

    # Log-spaced, plus the last third linearly: FIRE converges late and fast.
    last = int(converged.n_steps)
    ks = np.geomspace(10, last, n_points), np.linspace(0.65 * last, last, n_points)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # relax warns that k steps did not converge
        for k in np.unique(np.concatenate(ks).astype(int)):
            _, unrolled, x_k = jax.jvp(
                lambda theta, k=int(k): after(k, theta), (p.theta,), (jnp.ones_like(p.theta),), has_aux=True
            )
            implicit, info = implicit_at(x_k.positions)
            distance = testing.project(x_k.positions - converged.positions, dense.null_space)
            rows.append(
                {
                    "steps": int(k),
                    "fmax": float(x_k.fmax),
                    "distance": float(np.max(np.abs(distance))),
                    "implicit": error(implicit),
                    "unrolled": error(unrolled),
                    "solve_converged": bool(info.converged),
                }
            )
    return {"n": n, "converged_steps": last, "rows": rows}


def run(size: str = "full", out: str | pathlib.Path = "out/figures") -> dict[str, Any]:
    """Compute, draw ``precision.png`` into ``out`` and return the summary."""
    result = compute(**SIZES[size])
    column = {name: np.array([row[name] for row in result["rows"]]) for name in result["rows"][0]}
    figure = plotting.precision_figure(
        column["steps"],
        # Far from x*, H(x_k) can be indefinite and MINRES may miss its tolerance: those points are left out.
        {
            "implicit at $x_k$": np.where(column["solve_converged"], column["implicit"], np.nan),
            "unrolled through $k$ steps": column["unrolled"],
        },
        fmax=column["fmax"],
        distance=column["distance"],
        title=(
            r"$\partial x^*/\partial d_{\rm small}$ after $k$ FIRE steps, "
            f"$N = {result['n']}$ discs: error against the dense pseudo-inverse at $x^*$"
        ),
    )
    return {**result, "figures": [plotting.save(figure, pathlib.Path(out) / "precision.png")]}
