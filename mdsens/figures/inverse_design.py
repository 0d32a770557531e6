r"""Figure: inverse design with implicit gradients (a bilevel problem).

Outer problem: choose the species diameters ``d = exp(theta)`` of a 2D
bidisperse harmonic packing (fixed box) so that its relaxed state has a target
pressure ``p_t``::

    min_theta  L(theta) = (log p(x*(theta), theta) - log p_t)^2,
    x*(theta) = argmin_x E(x; theta)       (inner problem: FIRE to fmax 1e-12)

``grad log p`` goes through :func:`mdsens.equilibrium` by ``jax.grad`` (one
reverse-mode CG solve per step; it includes the response of the relaxed
positions, ``dp/dx . dx*/dtheta``). The outer step is damped Gauss-Newton,
``theta <- theta - damping * r J / |J|^2`` with the residual ``r = log p - log p_t``
and ``J = grad log p``; each relaxation starts from the previous x*.
The pressure is the virial ``p = -tr(sigma)/dim`` (:func:`mdsens.observables.pressure`).

At the start the implicit gradient is checked against central finite
differences of re-relaxed pressures.

Writes ``inverse_design.png``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import mdsens
from mdsens import observables, plotting, systems

SIZES = {"small": {"n": 16, "steps": 12}, "full": {"n": 128, "steps": 25}}
PHI, DIAMETERS, TARGET_PRESSURE, DAMPING, FD_STEP = 0.9, (1.0, 1.4), 0.01, 0.5, 1e-5


def compute(n: int, steps: int) -> dict[str, Any]:
    """The optimisation history (loss, pressure, diameters), the gradient check,
    and the relaxed positions at the start and at the end."""
    system = systems.soft_sphere_packing(n, dim=2, phi=PHI, diameters=DIAMETERS, seed=0)

    def log_pressure(theta: jax.Array, start: jax.Array) -> tuple[jax.Array, jax.Array]:
        params = {**system.params, "diameters": jnp.exp(theta)}
        x = mdsens.equilibrium(system, params, positions=start)
        return jnp.log(observables.pressure(system, x, params)), x

    value_and_grad = jax.jit(jax.value_and_grad(log_pressure, has_aux=True))
    theta = jnp.log(jnp.asarray(DIAMETERS))
    start = mdsens.relax(system).positions
    initial = np.asarray(start)
    check = _gradient_check(value_and_grad, theta, start)
    history = []
    for _ in range(steps + 1):
        (log_p, start), jacobian = value_and_grad(theta, start)
        residual = log_p - np.log(TARGET_PRESSURE)
        history.append(
            {
                "loss": float(residual**2),
                "pressure": float(jnp.exp(log_p)),
                "diameters": np.exp(np.asarray(theta)).tolist(),
            }
        )
        theta = theta - DAMPING * residual * jacobian / jnp.vdot(jacobian, jacobian)
    return {
        "system": system,
        "history": history,
        "gradient_check": check,
        "initial_positions": initial,
        "final_positions": np.asarray(start),
    }


def _gradient_check(value_and_grad: Callable, theta: jax.Array, start: jax.Array) -> dict[str, list[float]]:
    """Implicit ``grad log p`` against central differences of re-relaxed pressures
    (values of the same compiled function, relaxed from the same start)."""
    log_p = lambda t: value_and_grad(t, start)[0][0]  # noqa: E731
    columns = [
        float((log_p(theta + FD_STEP * e) - log_p(theta - FD_STEP * e)) / (2 * FD_STEP)) for e in np.eye(theta.size)
    ]
    return {"implicit": np.asarray(value_and_grad(theta, start)[1]).tolist(), "finite_difference": columns}


def run(size: str = "full", out: str | pathlib.Path = "out/figures") -> dict[str, Any]:
    """Optimise, draw ``inverse_design.png`` into ``out`` and return the summary
    (with the final positions, species and box sides, for independent checks)."""
    result = compute(**SIZES[size])
    system, history = result["system"], result["history"]
    start = plotting.packing_drawing(system, result["initial_positions"], history[0]["diameters"])
    final = plotting.packing_drawing(system, result["final_positions"], history[-1]["diameters"])
    figure = plotting.design_figure(
        loss=[h["loss"] for h in history],
        curves={f"$d_{i}$ (species {i})": [h["diameters"][i] for h in history] for i in range(len(DIAMETERS))},
        structures={
            f"relaxed start: $p = {history[0]['pressure']:.3g}$": (start["positions"], start["diameters"]),
            f"relaxed final: $p = {history[-1]['pressure']:.3g}$": (final["positions"], final["diameters"]),
        },
        species=final["species"],
        box=final["box"],
        title=(
            f"Species diameters $d_0, d_1$ tuned so that the relaxed packing's pressure is $p_t = {TARGET_PRESSURE}$ "
            f"($N = {system.n}$ discs, fixed box, damped Gauss-Newton with implicit gradients)"
        ),
        loss_label=r"loss $L = (\ln p - \ln p_t)^2$",
        curves_label="species diameter $d_s$",
    )
    return {
        "n": system.n,
        "target_pressure": TARGET_PRESSURE,
        "history": history,
        "gradient_check": result["gradient_check"],
        "final_positions": final["positions"].tolist(),
        "species": final["species"].tolist(),
        "box_sides": final["box"].tolist(),
        "figures": [plotting.save(figure, pathlib.Path(out) / "inverse_design.png")],
    }
