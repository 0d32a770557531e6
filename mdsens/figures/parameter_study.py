r"""Figure: a parameter study of bidisperse soft-disc packings.

Opens a study result (:mod:`mdsens.study`; ``data/study_example.toml`` is
packing fraction phi x diameter ratio, two seeds) and plots, against phi and
against the diameter ratio, the seed mean with a +-1 standard-deviation band of:

- the pressure ``p = -dE*/dV = -(1/(dim V)) tr(B^T dE*/dB)`` from the recorded
  relaxed-energy gradient with respect to the box matrix B (envelope theorem);
- the relaxed energy per particle;
- the rms sensitivity ``sqrt(<|dx_i*/dd_small|^2>)`` of the positions to the
  small diameter (the study's ``small_diameter`` tangent);
- the number of zero modes of H beyond the dim rigid translations (dim per rattler).

Size ``small`` runs a tiny study (N=16, 2 x 2 points, 2 seeds) into a
temporary folder; ``full`` opens the study ``folder``, running the
configuration ``config`` there first if it holds no finished result (the run
resumes from finished chunks).

Writes ``study.png``.
"""

from __future__ import annotations

import pathlib
import tempfile
from typing import Any

import numpy as np

from mdsens import plotting, study

SIZES = ("small", "full")
# A tiny study for size "small" (the test suite): N=16, 2 x 2 points, 2 seeds in
# one chunk with one compiled vmapped loop, and the one tangent plotted.
SMALL = {
    "study": {"description": "tiny study", "seeds": 2, "chunk_size": 8, "schedule": "vmap"},
    "system": {
        "builder": "soft_sphere_packing",
        "n": 16,
        "dim": 2,
        "diameters": [1.0, 1.4],
        "fractions": [0.5, 0.5],
        "alpha": 2.0,
        "epsilon": 1.0,
    },
    "grid": {"phi": [0.88, 0.94], "diameters": [[1.0, 1.2], [1.0, 1.4]]},
    "relax": {"method": "fire", "fmax": 1e-12, "max_steps": 100_000},
    "solve": {"solver": "cg", "rtol": 1e-10, "zero_modes": "auto"},
    "sensitivities": {"small_diameter": {"diameters": [1.0, 0.0]}},
}


#: Axis labels of the coordinates and observables.
LABELS = {
    "phi": r"packing fraction $\phi$",
    "diameter ratio": r"diameter ratio $d_{\rm large}/d_{\rm small}$",
    "pressure": r"pressure $p$",
    "energy per particle": r"energy per particle $E^*/N$",
    "rms |dx*/d(small diameter)|": r"rms $|\partial x_i^*/\partial d_{\rm small}|$",
    "zero modes beyond translations": "zero modes beyond translations",
}


def open_study(size: str, folder: str | pathlib.Path, config: str | pathlib.Path) -> Any:
    """The study's Dataset: the tiny one run now, or ``config`` run in ``folder``
    (resumed, and returned at once when complete, its files checked)."""
    if size == "small":
        return study.run(SMALL, out=pathlib.Path(tempfile.mkdtemp()) / "study")
    return study.run(config, out=pathlib.Path(folder), progress=True)


def sample_observables(ds: Any) -> dict[str, np.ndarray]:
    """Per-sample observables, each ``(point, seed)``."""
    box = ds["param_box"].values  # (point, seed, dim, dim), columns are box vectors
    dim = box.shape[-1]
    volume = np.abs(np.linalg.det(box))
    # dE*/dV for a uniform dilation B -> (1 + eps) B: d/deps = tr(B^T dE/dB) = dim V dE/dV.
    dilation = np.einsum("psij,psij->ps", box, ds["energy_grad_box"].values)
    sensitivity = ds["position_sensitivity"].sel(sensitivity="small_diameter").values  # (point, seed, N, dim)
    n = ds["n_particles"].values[:, None]
    return {
        "pressure": -dilation / (dim * volume),
        "energy per particle": ds["energy"].values / n,
        "rms |dx*/d(small diameter)|": np.sqrt(np.mean(np.sum(sensitivity**2, axis=-1), axis=-1)),
        "zero modes beyond translations": ds["n_zero_modes"].values - dim,
    }


def run(
    size: str = "full",
    out: str | pathlib.Path = "out/figures",
    folder: str | pathlib.Path = "out/study_example",
    config: str | pathlib.Path = "data/study_example.toml",
) -> dict[str, Any]:
    """Open (or run) the study, draw ``study.png`` into ``out`` and return the summary."""
    ds = open_study(size, folder, config)
    diameters = ds["diameters"].values  # (point, species)
    coordinates = {"phi": ds["phi"].values, "diameter ratio": diameters[:, 1] / diameters[:, 0]}
    values = sample_observables(ds)
    n = int(ds["n_particles"].values[0])
    title = (
        f"Relaxed bidisperse harmonic discs in 2D, $N = {n}$: {len(np.unique(coordinates['phi']))} packing "
        f"fractions x {len(np.unique(coordinates['diameter ratio']))} diameter ratios, "
        f"{ds.sizes['seed']} random starts each"
    )
    figure = plotting.sweep_figure(
        {LABELS[name]: value for name, value in coordinates.items()},
        {LABELS[name]: value for name, value in values.items()},
        title=title,
    )
    return {
        "samples": int(ds["energy"].size),
        "all_relaxed": bool(ds["relax_converged"].values.all()),
        "all_solved": bool(ds["solve_converged"].values.all()),
        "coordinates": {name: value.tolist() for name, value in coordinates.items()},
        "seed_mean": {name: value.mean(axis=1).tolist() for name, value in values.items()},
        # One sample in full, for checks: point 0, seed 0.
        "first_sample": {
            "positions": ds["positions"].values[0, 0].tolist(),
            "diameters": diameters[0][ds["particle_species"].values[0]].tolist(),
            "box": ds["param_box"].values[0, 0].tolist(),
            "pressure": float(values["pressure"][0, 0]),
        },
        "figures": [plotting.save(figure, pathlib.Path(out) / "study.png")],
    }
