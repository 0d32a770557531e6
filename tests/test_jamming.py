"""Packings near jamming (mdsens.jamming) on the small packing of test_elasticity
(the same system, so its compiled relaxation and moduli are reused)."""

from __future__ import annotations

import functools
import itertools

import jax
import numpy as np
import pytest
from test_elasticity import numpy_rattlers, packing

from mdsens import FIRE, jamming, max_force, relax, systems
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


# --- jamming by pressure -----------------------------------------------------------------

PRESSURES = (1e-2, 1e-3, 1.001e-3, 0.999e-3, 1e-4, 1e-5, 1e-6, 1e-7)  # in this order, each from the previous


@functools.cache
def by_pressure() -> list[jamming.State]:
    s, x = packing()
    return jamming.at_pressures(s, PRESSURES, x, s.params)


def test_at_pressures_reaches_each_target_as_a_fixed_box_equilibrium():
    s, _ = packing()
    states = by_pressure()
    assert all(st.converged for st in states)
    # The virial pressure (observables, not the enthalpy) is the target, to the stress tolerance.
    assert [st.pressure for st in states] == pytest.approx(PRESSURES, rel=0, abs=1e-10)
    for st in states:
        assert st.phi == pytest.approx(jamming.packing_fraction(s, st.params), rel=1e-14)
        # In its relaxed box, the state is a fixed-box equilibrium.
        assert float(max_force(-jax.grad(s.energy)(st.positions, st.params))) <= 1e-12
    phis = {p: st.phi for p, st in zip(PRESSURES, states, strict=True)}
    assert sorted(phis, key=phis.get) == sorted(PRESSURES)  # phi rises with p


def test_at_pressures_bulk_modulus_is_phi_dp_dphi():
    """B = -V dp/dV of the implicit moduli against the protocol's own p(phi) (central difference)."""
    s, _ = packing()
    states = {p: st for p, st in zip(PRESSURES, by_pressure(), strict=True)}
    up, mid, down = states[1.001e-3], states[1e-3], states[0.999e-3]
    slope = mid.phi * (up.pressure - down.pressure) / (up.phi - down.phi)
    assert jamming.observe(s, mid)["bulk_modulus"] == pytest.approx(slope, rel=1e-4)


def test_at_pressures_scaling_near_jamming():
    """phi - phi_J ~ p for harmonic discs, phi_J extrapolated from p = 1e-6 and 1e-7."""
    states = {p: st for p, st in zip(PRESSURES, by_pressure(), strict=True)}
    low, lowest = states[1e-6], states[1e-7]
    phi_j = lowest.phi - lowest.pressure * (low.phi - lowest.phi) / (low.pressure - lowest.pressure)
    assert 0.80 < phi_j < 0.88
    p = np.array([1e-2, 1e-3, 1e-4, 1e-5])
    excess = np.array([states[q].phi - phi_j for q in p])
    assert np.polyfit(np.log(p), np.log(excess), 1)[0] == pytest.approx(1.0, abs=0.1)


def test_at_pressures_bad_inputs():
    with pytest.raises(ValueError, match="no pressures"):
        jamming.at_pressures(packing()[0], [])
    listed = systems.soft_sphere_packing(32, dim=2, phi=0.9, seed=3, neighbor_list=True)
    with pytest.raises(ValueError, match="neighbor"):
        jamming.at_pressures(listed, [1e-3])
