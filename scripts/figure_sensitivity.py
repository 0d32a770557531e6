#!/usr/bin/env python3
r"""Figure: the sensitivity of a jammed packing (the paper's experiment).

A 2D periodic 50:50 bidisperse harmonic packing (diameters 1.0 and 1.4,
phi = 0.9) is relaxed by FIRE to fmax 1e-12, and ``dx*/dtheta`` with theta the
small particles' diameter is computed three ways: implicit differentiation
(one CG solve), unrolled forward mode through as many FIRE steps as the
relaxation took, and central finite differences of re-relaxed states. Each is
compared with a dense reference ``-pinv(H) d_theta grad E`` built from
``jax.hessian`` and ``numpy.linalg.pinv`` (no code shared with mdsens' solver).
Unrolled and finite-difference fields are projected onto the complement of the
zero modes first (the minimum-norm convention that implicit and dense share).

Writes ``sensitivity_methods.png`` to ``--out``; prints a JSON summary.

    python scripts/figure_sensitivity.py --size full --out notebooks/figures
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable, Sequence

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mdsens  # noqa: E402
from mdsens import systems  # noqa: E402
import _figure_cli as figure_cli  # noqa: E402

SIZES = {"small": {"n": 16}, "full": {"n": 128}}
PHI, DIAMETERS, SEED = 0.9, (1.0, 1.4), 0


@dataclasses.dataclass(frozen=True)
class Packing:
    """A packing whose energy takes one scalar parameter: the small diameter theta."""

    system: systems.System
    energy: Callable[[jax.Array, jax.Array], jax.Array]
    theta: jax.Array

    def relax(self, theta: jax.Array | None = None, **options) -> mdsens.RelaxResult:
        """FIRE from the start at ``theta`` (default: the unperturbed value)."""
        theta = self.theta if theta is None else theta
        return mdsens.relax(self.energy, self.system.positions, theta, shift_fn=self.system.shift_fn,
                            dt_max=self.system.dt_max, **options)

    def x_star(self, **options) -> Callable[[jax.Array], jax.Array]:
        """theta -> x*(theta) by :func:`mdsens.equilibrium` with these options."""
        s = self.system
        return lambda theta: mdsens.equilibrium(
            self.energy, s.positions, theta, shift_fn=s.shift_fn, dt_max=s.dt_max, **options
        )

    def drawing(self, positions: np.ndarray) -> dict:
        """Keyword arguments of the plotting helpers for these positions."""
        s = self.system
        return {
            "positions": np.asarray(positions),
            "diameters": np.asarray(s.params["diameters"])[np.asarray(s.species)],
            "species": np.asarray(s.species),
            "box": np.diag(np.asarray(s.box)),
        }


@functools.lru_cache(maxsize=4)
def packing(n: int, phi: float = PHI, seed: int = SEED) -> Packing:
    """The packing, built once per process: its energy is the key of compiled programs."""
    system = systems.soft_sphere_packing(n, dim=2, phi=phi, diameters=DIAMETERS, seed=seed)
    base = system.params

    def energy(x, theta):
        return system.energy_fn(x, {**base, "diameters": base["diameters"].at[0].set(theta)})

    return Packing(system, energy, jnp.asarray(DIAMETERS[0]))


def dense_reference(p: Packing, x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(dx*/dtheta, null basis)``: ``-pinv(H) b`` with ``H`` and ``b = d_theta grad E``
    from jax.hessian / jax.jacfwd and numpy's pseudo-inverse (rcond 1e-10, relative);
    the null basis holds the eigenvectors of ``H`` with ``|lambda| <= 1e-10 lambda_max``."""
    size = x.size
    H, b = jax.jit(lambda x, t: (jax.hessian(p.energy)(x, t), jax.jacfwd(jax.grad(p.energy), argnums=1)(x, t)))(
        x, p.theta
    )
    H, b = np.asarray(H).reshape(size, size), np.asarray(b).reshape(size)
    eigenvalues, eigenvectors = np.linalg.eigh(H)
    null = eigenvectors[:, np.abs(eigenvalues) <= 1e-10 * np.max(np.abs(eigenvalues))]
    return -(np.linalg.pinv(H, rcond=1e-10, hermitian=True) @ b).reshape(x.shape), null.T


def project(field: np.ndarray, null: np.ndarray) -> np.ndarray:
    """Remove the components along the rows of ``null`` (orthonormal)."""
    flat = np.asarray(field).reshape(-1)
    return (flat - null.T @ (null @ flat)).reshape(np.shape(field))


def compute(n: int) -> dict:
    """Relaxed positions, the three sensitivity fields (projected), the dense reference."""
    p = packing(n)
    relaxed = p.relax()
    one = jnp.ones_like(p.theta)
    raw = {
        "implicit": jax.jvp(p.x_star(), (p.theta,), (one,))[1],
        "unrolled": jax.jvp(
            p.x_star(method="unrolled", unroll_steps=int(relaxed.n_steps)), (p.theta,), (one,)
        )[1],
        "finite_difference": jax.jvp(p.x_star(method="finite_difference"), (p.theta,), (one,))[1],
    }
    reference, null = dense_reference(p, relaxed.positions)
    return {
        "packing": p,
        "relaxed": relaxed,
        "fields": {label: project(field, null) for label, field in raw.items()},
        "reference": reference,
        "n_zero_modes": null.shape[0],
    }


def run(size: str = "full", out: str = "out/figures") -> dict:
    """Compute, draw ``sensitivity_methods.png`` into ``out`` and return the summary."""
    import matplotlib.pyplot as plt

    from mdsens import plotting

    result = compute(**SIZES[size])
    p, relaxed, reference = result["packing"], result["relaxed"], result["reference"]
    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = {
        "implicit": "implicit",
        "unrolled": f"unrolled ({int(relaxed.n_steps)} FIRE steps)",
        "finite_difference": "finite difference",
    }
    fields = {labels[method]: field for method, field in result["fields"].items()}
    figure = plotting.sensitivity_comparison(
        **p.drawing(relaxed.positions), fields=fields, reference=reference,
        title=f"dx*/d(small diameter), N={p.system.n}, phi={PHI}",
    )
    figure.savefig(out_dir / "sensitivity_methods.png", dpi=120)
    plt.close(figure)
    return {
        "n": p.system.n,
        "phi": PHI,
        "relax": {"fmax": float(relaxed.fmax), "n_steps": int(relaxed.n_steps), "converged": bool(relaxed.converged)},
        "n_zero_modes": int(result["n_zero_modes"]),
        "reference_max_abs": float(np.max(np.abs(reference))),
        "max_abs_error": {
            method: float(np.max(np.abs(field - reference))) for method, field in result["fields"].items()
        },
        "figures": [str(out_dir / "sensitivity_methods.png")],
    }


def main(argv: Sequence[str] | None = None) -> None:
    figure_cli.main(__doc__, run, SIZES, argv)


if __name__ == "__main__":
    main()
