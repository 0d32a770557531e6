"""Packings near jamming (mdsens.jamming) on the small packing of test_elasticity
(the same system, so its compiled relaxation and moduli are reused)."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
from test_elasticity import numpy_rattlers, packing

from mdsens import FIRE, jamming, relax, systems
from mdsens import observables as ob


@functools.cache
def jammed() -> jamming.Jamming:
    s, x = packing()
    return jamming.find_jamming(s, x, s.params, p_target=1e-6)


def test_find_jamming_brackets_the_transition():
    s, _ = packing()
    jam = jammed()
    assert 0.80 < jam.phi_c < 0.88  # 2D bidisperse discs jam near 0.84
    assert 0 < jam.state.pressure <= 1e-6 and jam.state.converged
    pressures = [p for _, p in jam.history]
    assert all(a > b for a, b in itertools.pairwise(pressures))
    assert jam.state.phi == pytest.approx(jamming.packing_fraction(s, jam.state.params))
    # Just below phi_c the packing unjams: zero energy and pressure after relaxation.
    x, params = jamming.rescale(jam.state.positions, jam.state.params, jam.state.phi, jam.phi_c - 1e-4)
    r = relax(s, x, params, minimiser=FIRE(max_steps=200_000))
    assert float(ob.energy(s, r.positions, params)) < 1e-20
    assert abs(float(ob.pressure(s, r.positions, params))) < 1e-10


def test_compress_follows_linear_pressure_and_observe_counts_contacts():
    s, _ = packing()
    jam = jammed()
    states = jamming.compress(s, jam, [1e-2, 1e-3])  # sorted into increasing order
    assert [st.phi for st in states] == pytest.approx([jam.phi_c + 1e-3, jam.phi_c + 1e-2], rel=1e-12)
    assert all(st.converged for st in states)
    # Harmonic discs: p ~ (phi - phi_c)^1 near jamming.
    ratio = states[1].pressure / states[0].pressure
    assert 6 < ratio < 15
    row = jamming.observe(s, states[0])
    c = np.asarray(ob.contacts(s, states[0].positions, states[0].params))
    keep = ~numpy_rattlers(c, 2)
    assert row["n_rattlers"] == int(np.sum(~keep))
    assert row["n_contacts"] == int(c[np.ix_(keep, keep)].sum() // 2)
    assert row["z"] == pytest.approx(float(ob.contact_number(s, states[0].positions, states[0].params)))
    assert row["z_iso"] == pytest.approx(4 - 2 / keep.sum())
    assert row["z"] >= row["z_iso"]  # a jammed packing is at least isostatic
    assert row["moduli_ok"] and row["bulk_modulus"] > 0
    assert row["pressure"] == pytest.approx(states[0].pressure)


def test_bad_inputs():
    s, x = packing()
    x_dilute, dilute = jamming.rescale(x, s.params, 0.9, 0.5)
    with pytest.raises(ValueError, match="not jammed"):
        jamming.find_jamming(s, x_dilute, dilute)
    with pytest.raises(ValueError, match="positive"):
        jamming.compress(s, jammed(), [-1e-3])
    cluster = systems.lennard_jones_cluster(4, dim=2)
    with pytest.raises(ValueError, match="soft-sphere"):
        jamming.find_jamming(cluster)
