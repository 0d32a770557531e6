#!/usr/bin/env python3
r"""Figure: precision of the derivative against the number of minimiser iterations.

The packing of ``figure_sensitivity.py``. After k FIRE steps from the same start:

- implicit: the implicit derivative ``-H^+ d_theta grad E`` evaluated at the
  unconverged state x_k (MINRES, since H need not be positive there; zero
  modes detected at x_k);
- unrolled: forward mode through the k FIRE steps (``jax.jvp`` through
  :func:`mdsens.relax` stopped at ``max_steps=k``, the derivative that
  ``mdsens.equilibrium(method="unrolled", unroll_steps=k)`` computes, with one
  compilation for every k).

Both are projected onto the complement of the zero modes of the converged
Hessian and compared with the dense reference at x*. Blondel et al. (Theorem 1)
bound the implicit error linearly by ``|x_k - x*|``; the unrolled derivative
converges only as the tangent dynamics of FIRE does.

Writes ``precision.png`` to ``--out``; prints a JSON summary.
"""

from __future__ import annotations

import pathlib
import warnings
from collections.abc import Sequence

import figure_sensitivity as fs
import jax
import jax.numpy as jnp
import numpy as np

import mdsens
from mdsens import linear_solve, zero_modes
import _figure_cli as figure_cli

SIZES = {"small": {"n": 16, "n_points": 6}, "full": {"n": 128, "n_points": 16}}


def _implicit_at(p: fs.Packing):
    """Compiled ``x -> (dx/dtheta, SolveInfo)`` by the implicit function theorem at ``x``."""
    gradient = jax.grad(p.energy)

    @jax.jit
    def tangent(x):
        hvp = lambda v: jax.jvp(lambda y: gradient(y, p.theta), (x,), (v,))[1]  # noqa: E731
        return mdsens.root_jvp(gradient, x, p.theta, jnp.ones_like(p.theta), solve=linear_solve.minres(),
                               zero_modes=zero_modes.detect(hvp, x))

    return tangent


def compute(n: int, n_points: int) -> dict:
    """Errors of both derivatives after k steps, for k log-spaced up to convergence."""
    p = fs.packing(n)
    converged = p.relax()
    reference, null = fs.dense_reference(p, converged.positions)
    # Log-spaced, plus the last third linearly: FIRE converges late and fast.
    last = int(converged.n_steps)
    steps = np.unique(np.concatenate([np.geomspace(10, last, n_points), np.linspace(0.65 * last, last, n_points)]).astype(int))
    implicit_at = _implicit_at(p)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # relax warns that k steps did not converge
        for k in steps:
            def after_k_steps(theta, k=int(k)):
                relaxed = p.relax(theta, max_steps=k)
                return relaxed.positions, relaxed

            _, unrolled, x_k = jax.jvp(after_k_steps, (p.theta,), (jnp.ones_like(p.theta),), has_aux=True)
            implicit, info = implicit_at(x_k.positions)
            rows.append({
                "steps": int(k),
                "fmax": float(x_k.fmax),
                "distance": float(np.max(np.abs(fs.project(x_k.positions - converged.positions, null)))),
                "implicit": float(np.max(np.abs(fs.project(implicit, null) - reference))),
                "unrolled": float(np.max(np.abs(fs.project(unrolled, null) - reference))),
                "solve_converged": bool(info.converged),
            })
    return {"n": n, "converged_steps": int(converged.n_steps), "rows": rows}


def run(size: str = "full", out: str = "out/figures") -> dict:
    """Compute, draw ``precision.png`` into ``out`` and return the summary."""
    import matplotlib.pyplot as plt

    from mdsens import plotting

    result = compute(**SIZES[size])
    rows = result["rows"]
    column = lambda name: np.array([row[name] for row in rows])  # noqa: E731
    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    figure = plotting.precision_figure(
        column("steps"),
        # Far from x*, H(x_k) can be indefinite and MINRES may miss its tolerance: those points are left out.
        {"implicit at x_k": np.where(column("solve_converged"), column("implicit"), np.nan),
         "unrolled through k steps": column("unrolled")},
        fmax=column("fmax"), distance=column("distance"),
        title=f"dx*/d(small diameter), N={result['n']}: error against the dense reference",
    )
    figure.savefig(out_dir / "precision.png", dpi=120)
    plt.close(figure)
    return {**result, "figures": [str(out_dir / "precision.png")]}


def main(argv: Sequence[str] | None = None) -> None:
    figure_cli.main(__doc__, run, SIZES, argv)


if __name__ == "__main__":
    main()
