"""The main job runs end to end at a small size and writes what it promises."""

import json

import jax
import numpy as np

from mdsens import demo, systems


def test_demo_writes_outputs(tmp_path) -> None:
    summary = demo.run(n=16, phi=0.9, seed=2, out=str(tmp_path))
    for name in summary["outputs"]:
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["relax"]["converged"] and summary["relax"]["fmax"] <= 1e-12
    assert summary["sensitivity"]["solve_converged"]
    positions = np.load(tmp_path / "positions.npy")
    sensitivity = np.load(tmp_path / "sensitivity.npy")
    assert positions.shape == sensitivity.shape == (16, 2)
    # Independent check of the relaxed state: the forces vanish there.
    system = systems.soft_sphere_packing(16, phi=0.9, seed=2)
    forces = -jax.grad(system.energy)(positions, system.params)
    assert np.max(np.linalg.norm(forces, axis=1)) <= 1e-12
    # Minimum-norm convention: no net translation in the sensitivity.
    np.testing.assert_allclose(sensitivity.mean(axis=0), 0.0, atol=1e-10)
