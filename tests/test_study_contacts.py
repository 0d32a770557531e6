"""Contact numbers and rattlers from pairs (what studies record), against the
``N x N`` contact matrix: the same counts, and for neighbor-list systems
memory that grows as N, not N^2 (XLA's memory analysis of the compiled program)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import mdsens
from mdsens import observables as ob
from mdsens import systems


@pytest.fixture(scope="module")
def relaxed_pair():
    """One packing with a neighbor list and summed over all pairs, relaxed (with a
    loose fmax: the counts are compared, not the physics) from the same start."""
    listed = systems.soft_sphere_packing(64, phi=0.86, diameters=[1.0, 1.4], neighbor_list=True, seed=3)
    dense = systems.soft_sphere_packing(64, phi=0.86, diameters=[1.0, 1.4], neighbor_list=False, seed=3)
    x = mdsens.relax(dense, minimiser=mdsens.FIRE(fmax=1e-8)).positions
    return listed, dense, x


def test_pairs_count_what_the_matrix_counts(relaxed_pair):
    listed, dense, x = relaxed_pair
    matrix = ob.contacts(dense, x, dense.params)
    rattlers = np.asarray(ob.rattlers(matrix, 2))
    keep = ~rattlers
    expected = np.sum(np.asarray(matrix) & keep[:, None] & keep[None, :]) / max(keep.sum(), 1)
    assert 0 < rattlers.sum() < 64  # the comparison covers rattlers and contacts
    for system in (listed, dense):
        z, lost = ob.contact_number_and_rattlers(system, x, system.params)
        np.testing.assert_array_equal(lost, rattlers)
        assert float(z) == expected
        assert float(ob.contact_number(system, x, system.params)) == expected
        everyone = ob.contact_number(system, x, system.params, exclude_rattlers=False)
        assert float(everyone) == np.sum(np.asarray(matrix)) / 64
        for threshold in (1e-3, 1e-2):
            np.testing.assert_array_equal(
                ob.contact_number_and_rattlers(system, x, system.params, threshold=threshold)[1],
                ob.rattlers(ob.contacts(dense, x, dense.params, threshold), 2),
            )


def test_neighbor_list_contacts_need_no_square_array():
    """At N = 5000 the contact matrix's distances alone would take 400 MB (N^2
    dim float64); counting from the list's pairs takes a few MB."""
    n = 5000
    system = systems.soft_sphere_packing(n, phi=0.9, diameters=[1.0, 1.4], seed=0)
    assert system.neighbor_list
    compiled = (
        jax.jit(lambda x, p: ob.contact_number_and_rattlers(system, x, p))
        .lower(system.positions, system.params)
        .compile()
    )
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    assert analysis.temp_size_in_bytes < 0.05 * 8 * n * n * 2
