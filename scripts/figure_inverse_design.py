#!/usr/bin/env python3
r"""Figure: inverse design with implicit gradients (a bilevel problem).

Outer problem: choose the species diameters ``d = exp(theta)`` of a 2D
bidisperse harmonic packing (fixed box) so that its relaxed state has a target
pressure ``p_t``::

    min_theta  L(theta) = (log p(x*(theta), theta) - log p_t)^2,
    x*(theta) = argmin_x E(x; theta)       (inner problem: FIRE to fmax 1e-12)

``grad log p`` goes through ``mdsens.equilibrium`` by ``jax.grad`` (one
reverse-mode CG solve per step; it includes the response of the relaxed
positions, ``dp/dx . dx*/dtheta``). The outer step is damped Gauss-Newton,
``theta <- theta - damping * r J / |J|^2`` with the residual ``r = log p - log p_t``
and ``J = grad log p``; each relaxation starts from the previous x*.
The pressure is the virial ``p = -tr(sigma)/dim`` (``mdsens.observables.pressure``).

At the start the implicit gradient is checked against central finite
differences of re-relaxed pressures.

Writes ``inverse_design.png`` to ``--out``; prints a JSON summary.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mdsens  # noqa: E402
from mdsens import observables, systems  # noqa: E402
import _figure_cli as figure_cli  # noqa: E402

SIZES = {"small": {"n": 16, "steps": 12}, "full": {"n": 128, "steps": 25}}
PHI, DIAMETERS, TARGET_PRESSURE, DAMPING, FD_STEP = 0.9, (1.0, 1.4), 0.01, 0.5, 1e-5


def compute(n: int, steps: int) -> dict:
    """The optimisation history: loss, pressure, diameters; start and final structures."""
    system = systems.soft_sphere_packing(n, dim=2, phi=PHI, diameters=DIAMETERS, seed=0)

    def params_of(theta):
        return {**system.params, "diameters": jnp.exp(theta)}

    def log_pressure(theta, start):
        x = mdsens.equilibrium(system.energy_fn, start, params_of(theta), shift_fn=system.shift_fn,
                               dt_max=system.dt_max)
        return jnp.log(observables.pressure(system, x, params_of(theta))), x

    value_and_grad = jax.jit(jax.value_and_grad(log_pressure, has_aux=True))
    theta = jnp.log(jnp.asarray(DIAMETERS))
    start = mdsens.relax(system.energy_fn, system.positions, system.params, shift_fn=system.shift_fn,
                         dt_max=system.dt_max).positions
    initial = np.asarray(start)
    check = _gradient_check(value_and_grad, theta, start)
    history = []
    for _ in range(steps + 1):
        (log_p, start), jacobian = value_and_grad(theta, start)
        residual = log_p - np.log(TARGET_PRESSURE)
        history.append({"loss": float(residual**2), "pressure": float(jnp.exp(log_p)),
                        "diameters": np.exp(np.asarray(theta)).tolist()})
        theta = theta - DAMPING * residual * jacobian / jnp.vdot(jacobian, jacobian)
    return {
        "system": system,
        "history": history,
        "gradient_check": check,
        "initial": (initial, np.asarray(DIAMETERS)),
        "final": (np.asarray(start), np.asarray(history[-1]["diameters"])),
    }


def _gradient_check(value_and_grad, theta, start) -> dict:
    """Implicit ``grad log p`` against central differences of re-relaxed pressures
    (values of the same compiled function, relaxed from the same start)."""
    log_p = lambda t: value_and_grad(t, start)[0][0]  # noqa: E731
    columns = [
        float((log_p(theta + FD_STEP * e) - log_p(theta - FD_STEP * e)) / (2 * FD_STEP)) for e in np.eye(theta.size)
    ]
    return {"implicit": np.asarray(value_and_grad(theta, start)[1]).tolist(), "finite_difference": columns}


def run(size: str = "full", out: str = "out/figures") -> dict:
    """Optimise, draw ``inverse_design.png`` into ``out`` and return the summary."""
    import matplotlib.pyplot as plt

    from mdsens import plotting

    result = compute(**SIZES[size])
    system, history = result["system"], result["history"]
    species = np.asarray(system.species)
    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    figure = plotting.design_figure(
        loss=[h["loss"] for h in history],
        curves={f"diameter of species {i}": [h["diameters"][i] for h in history] for i in range(len(DIAMETERS))},
        structures={
            f"{label}: p = {h['pressure']:.3g}": (x, d[species])
            for label, (x, d), h in (("start", result["initial"], history[0]), ("final", result["final"], history[-1]))
        },
        species=species, box=np.diag(np.asarray(system.box)),
        title=f"target pressure {TARGET_PRESSURE}, N={system.n}",
    )
    figure.savefig(out_dir / "inverse_design.png", dpi=120)
    plt.close(figure)
    return {
        "n": system.n,
        "target_pressure": TARGET_PRESSURE,
        "history": history,
        "gradient_check": result["gradient_check"],
        "final_positions": result["final"][0].tolist(),
        "species": species.tolist(),
        "box_sides": np.diag(np.asarray(system.box)).tolist(),
        "figures": [str(out_dir / "inverse_design.png")],
    }


def main(argv: Sequence[str] | None = None) -> None:
    figure_cli.main(__doc__, run, SIZES, argv, not_printed=("final_positions",))


if __name__ == "__main__":
    main()
