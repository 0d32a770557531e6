"""Neighbor-list energies (mdsens.neighbors) against the all-pairs energies.

- Agreement to 1e-10 relative (maximum deviation over the largest entry) on
  2D bidisperse soft-sphere packings: energy, forces, Hessian-vector products
  and parameter derivatives, relaxed positions from a common start, and one
  forward sensitivity at N = 512; a gradient with respect to every particle's
  diameter through ``mdsens.equilibrium`` and the Hessian diagonal at N = 144
  (the all-pairs reference costs O(N^2) per Hessian-vector product; most of
  this module's time is compilation).
- Overflow: reallocated on the host with the all-pairs answer; flagged
  (``neighbor_overflow``) under ``jit``; NaN and a warning from standalone calls.
- The energy protocol (allocate, build, update, valid, bind, freeze,
  diagnostics) against the all-pairs energy; the O(N) Hessian diagonal, the
  builders' switch, bad input, and no N x N array anywhere on the
  neighbor-list path.
- Builds: the pairs of an allocation and of a traced rebuild are exactly the
  brute-force pairs within the cutoff (2D and 3D); a rebuild past the
  capacity is flagged.
"""

from __future__ import annotations

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
import pytest

import mdsens
from mdsens import CG, FIRE, Implicit, systems, zero_modes
from mdsens import neighbors as nl
from mdsens.relaxation import relax_on_host

RTOL = 1e-10
# Tight enough that the derivatives agree because the operators do, not because
# both solves took the same path.
SOLVER = CG(rtol=1e-12)


def rel_err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def packing(n: int, neighbor_list, **kwargs) -> systems.System:
    return systems.soft_sphere_packing(
        n, dim=2, phi=0.9, per_particle_diameters=True, neighbor_list=neighbor_list, **kwargs
    )


def reference_derivative(s: systems.System, x: jax.Array, direction, mode: str):
    """The all-pairs implicit derivative at a relaxed ``x``: what
    ``equilibrium_jvp`` / ``_vjp`` compute after their relaxation (zero modes
    from Hessian-vector products, then one solve), without compiling one."""
    gradient = jax.grad(s.energy)

    def run(x, p, direction):
        hvp = lambda v: jax.jvp(lambda y: gradient(y, p), (x,), (v,))[1]  # noqa: E731
        root = mdsens.root_jvp if mode == "jvp" else mdsens.root_vjp
        return root(gradient, x, p, direction, solve=SOLVER, zero_modes=zero_modes.detect(hvp, x))

    return jax.jit(run)(x, s.params, direction)


def random_tangent(params: dict, seed: int) -> dict:
    """Random per-particle diameters and a random (upper-triangular) box direction."""
    keys = jax.random.split(jax.random.PRNGKey(seed))
    tangent = jax.tree_util.tree_map(jnp.zeros_like, params)
    tangent["diameters"] = jax.random.normal(keys[0], params["diameters"].shape)
    tangent["box"] = jnp.triu(jax.random.normal(keys[1], params["box"].shape))
    return tangent


# ---------------------------------------------------------------------------
# N = 512: the same numbers as all pairs
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair512() -> tuple[systems.System, systems.System]:
    return packing(512, False), packing(512, True)


@pytest.fixture(scope="module")
def relaxed512(pair512) -> dict:
    """Both paths relaxed to fmax 1e-12 from one start (the neighbor-list path
    relaxed to fmax 1e-6 from the random start: most of the way, cheaply)."""
    a, b = pair512
    start = mdsens.relax(b, minimiser=FIRE(fmax=1e-6)).positions
    return {"all_pairs": mdsens.relax(a, start), "neighbor_list": mdsens.relax(b, start)}


@pytest.mark.slow
def test_energy_forces_and_derivatives_agree(pair512) -> None:
    a, b = pair512
    x, p = a.positions, a.params  # the random start: many overlaps
    v = jax.random.normal(jax.random.PRNGKey(1), x.shape)

    def derivatives(energy_fn):
        def all_of_them(x, p):
            e, (gx, gp) = jax.value_and_grad(energy_fn, argnums=(0, 1))(x, p)
            hvp = jax.jvp(lambda y: jax.grad(energy_fn)(y, p), (x,), (v,))[1]
            return e, gx, gp["diameters"], gp["box"], hvp

        return jax.jit(all_of_them)(x, p)

    for ours, theirs in zip(derivatives(b.energy), derivatives(a.energy), strict=True):
        assert rel_err(ours, theirs) <= RTOL


@pytest.mark.slow
def test_relaxed_positions_agree(relaxed512) -> None:
    ours, theirs = relaxed512["neighbor_list"], relaxed512["all_pairs"]
    assert bool(ours.converged) and bool(theirs.converged)
    assert ours.reason == "converged"
    assert rel_err(ours.positions, theirs.positions) <= RTOL
    assert float(ours.energy) == pytest.approx(float(theirs.energy), rel=RTOL)


@pytest.mark.slow
def test_forward_sensitivity_agrees(pair512, relaxed512) -> None:
    a, b = pair512
    x = relaxed512["all_pairs"].positions
    tangent = random_tangent(a.params, 2)
    dx_a, info_a = reference_derivative(a, x, tangent, "jvp")
    _, dx_b, info_b = mdsens.equilibrium_jvp(b, b.params, tangent, positions=x, adjoint=Implicit(solver=SOLVER))
    assert bool(info_a.converged) and bool(info_b.solve.converged)
    assert bool(info_b.relax.converged)
    assert rel_err(dx_b, dx_a) <= RTOL


@pytest.mark.slow
def test_no_n_by_n_array_on_the_neighbor_list_path(pair512) -> None:
    """Every intermediate of a relaxation and a sensitivity (equilibrium_jvp
    traced: relaxation with the list built at the start, zero modes, solve),
    of reverse mode through mdsens.equilibrium, and of the Hessian diagonal and blocks:
    at most one axis of length >= N, fewer than N^2 entries (the all-pairs
    energy fails this)."""
    a, b = pair512
    n = b.n
    x, p, t = b.positions, b.params, random_tangent(b.params, 3)
    calls = [
        lambda x, p: mdsens.equilibrium_jvp(b, p, t, positions=x),
        jax.grad(lambda x, p: jnp.sum(mdsens.equilibrium(b, p, positions=x) ** 2), argnums=1),
        lambda x, p: b.hessian_diagonal(x, p),
        lambda x, p: b.hessian_blocks(x, p),
    ]

    def shapes(jaxpr):
        """Shapes of every intermediate, also in sub-jaxprs (loops, conds, solves)."""
        is_jaxpr = lambda leaf: isinstance(leaf, (jcore.Jaxpr, jcore.ClosedJaxpr))  # noqa: E731
        for eqn in jaxpr.eqns:
            yield from (v.aval.shape for v in eqn.outvars if hasattr(v.aval, "shape"))
            for sub in jax.tree_util.tree_leaves(list(eqn.params.values()), is_leaf=is_jaxpr):
                if is_jaxpr(sub):
                    yield from shapes(getattr(sub, "jaxpr", sub))

    def quadratic(shape) -> bool:
        return sum(d >= n for d in shape) > 1 or int(np.prod(shape)) >= n * n

    for call in calls:
        jaxpr = jax.make_jaxpr(call)(x, p).jaxpr
        assert not [s for s in shapes(jaxpr) if quadratic(s)]
    assert any(quadratic(s) for s in shapes(jax.make_jaxpr(a.energy)(x, p).jaxpr))


# ---------------------------------------------------------------------------
# Overflow: a list that holds exactly the start's pairs
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lattice() -> dict:
    """N = 144 with both energies; a start on a jittered square lattice (spacing
    1.14) relaxed with all pairs (the reference); and a list with cutoff 1.55 and
    no headroom allocated at the start: it holds the 4 nearest neighbours of each
    particle (capacity 288), the relaxed packing has more pairs within 1.55."""
    s, k = packing(144, True), 12
    spacing = float(s.box[0, 0]) / k
    rng = np.random.default_rng(0)
    grid = (np.stack(np.meshgrid(np.arange(k), np.arange(k), indexing="ij"), -1).reshape(-1, 2) + 0.5) * spacing
    x = jnp.asarray(grid[rng.permutation(k * k)] + rng.uniform(-0.01, 0.01, (k * k, 2)) * spacing)
    tight = s.energy.replace(x, s.params, skin=0.15, capacity_multiplier=1.0)
    assert tight.template.capacity == 2 * s.n
    all_pairs = packing(144, False)
    reference = mdsens.relax(all_pairs, x)
    assert bool(reference.converged)
    return {"system": s, "all_pairs": all_pairs, "x": x, "tight": tight, "reference": reference}


@pytest.mark.slow
def test_gradient_wrt_every_diameter_agrees(lattice) -> None:
    """Reverse mode through mdsens.equilibrium (its own relaxation, under jit)."""
    b, a, x = lattice["system"], lattice["all_pairs"], lattice["reference"].positions
    weights = jax.random.normal(jax.random.PRNGKey(4), x.shape)
    objective = lambda p: jnp.sum(weights * mdsens.equilibrium(b, p, positions=x, adjoint=Implicit(solver=SOLVER)))  # noqa: E731
    ours = jax.grad(objective)(b.params)
    theirs, info = reference_derivative(a, x, weights, "vjp")
    assert bool(info.converged)
    assert rel_err(ours["diameters"], theirs["diameters"]) <= RTOL
    assert rel_err(ours["box"], theirs["box"]) <= RTOL


def test_hessian_diagonal_is_the_dense_diagonal(lattice) -> None:
    b, a, x = lattice["system"], lattice["all_pairs"], lattice["x"]  # overlaps, off equilibrium
    dense = jax.jit(jax.hessian(a.energy))(x, a.params).reshape(x.size, x.size)
    diagonal = b.hessian_diagonal(x, b.params)
    assert diagonal.shape == x.shape
    assert rel_err(diagonal.ravel(), jnp.diag(dense)) <= RTOL


def test_overflow_is_reallocated_on_the_host(lattice) -> None:
    s, tight, reference = lattice["system"], lattice["tight"], lattice["reference"]
    result, neighbors, reallocations = relax_on_host(tight, FIRE(dt_max=s.dt_max), lattice["x"], s.params)
    assert reallocations >= 1
    assert bool(result.converged) and bool(tight.valid(neighbors))
    assert tight.diagnostics(neighbors)["reason"] == "valid"
    assert rel_err(result.positions, reference.positions) <= RTOL
    assert float(result.energy) == pytest.approx(float(reference.energy), rel=RTOL)
    # What mdsens.relax does with concrete arrays.
    public = mdsens.relax(s.replace(energy=tight), lattice["x"])
    np.testing.assert_array_equal(public.positions, result.positions)


def test_trimming_the_list_changes_no_bit_of_the_relaxation(monkeypatch) -> None:
    """relax_on_host trims a large list's spare capacity after SETTLE_STEPS steps: the
    trimmed list holds the same pairs in the same order (a prefix), so the
    relaxation is bitwise the one with the untrimmed list, in fewer slots."""
    s = packing(400, True, seed=3)
    monkeypatch.setattr(mdsens.relaxation, "TRIM_MIN_CAPACITY", 0)  # trimmed at this small size too
    minimiser = FIRE(dt_max=s.dt_max)
    trimmed, trimmed_list, _ = relax_on_host(s.energy, minimiser, s.positions, s.params)
    assert bool(trimmed.converged) and int(trimmed.n_steps) > mdsens.relaxation.SETTLE_STEPS
    monkeypatch.setattr(mdsens.relaxation, "SETTLE_STEPS", 10**9)  # trimmed only after the end
    untrimmed, _, _ = relax_on_host(s.energy, minimiser, s.positions, s.params)
    np.testing.assert_array_equal(trimmed.positions, untrimmed.positions)
    assert int(trimmed.n_steps) == int(untrimmed.n_steps)
    # The list a relaxation returns is the one at its positions (outcome takes it
    # without an update): updating it there changes nothing.
    updated = s.energy.update(trimmed_list, trimmed.positions, s.params)
    for name in ("i", "j", "mask", "reference", "flags", "rebuilds"):
        np.testing.assert_array_equal(getattr(updated, name), getattr(trimmed_list, name))
    start = s.energy.allocate(s.positions, s.params)
    assert trimmed_list.capacity < start.capacity
    # Trimming keeps a prefix: the pairs fill the first slots.
    cut = s.energy.trim(start)
    assert int(jnp.sum(cut.mask)) == int(jnp.sum(start.mask)) and cut.capacity <= start.capacity
    for name in ("i", "j", "mask"):
        np.testing.assert_array_equal(getattr(cut, name), getattr(start, name)[: cut.capacity])


def test_overflow_under_jit_is_flagged_not_wrong(lattice) -> None:
    s, x, tight = lattice["system"], lattice["x"], lattice["tight"]
    tight_system = s.replace(energy=tight)
    with pytest.warns(RuntimeWarning, match="neighbor_overflow"):
        result = jax.block_until_ready(jax.jit(lambda x, p: mdsens.relax(tight_system, x, p))(x, s.params))
    assert result.reason == "neighbor_overflow" and not bool(result.converged)
    assert np.isnan(float(result.energy))
    # The last state computed with a valid list: finite, not relaxed.
    assert int(result.n_steps) > 0 and np.all(np.isfinite(result.positions))
    assert np.isfinite(float(result.fmax)) and float(result.fmax) > 1e-12
    # No x* either, and no derivative from it.
    with pytest.warns(RuntimeWarning, match="did not reach the force tolerance: it stopped with neighbor_overflow"):
        x_star = mdsens.equilibrium(tight_system, s.params, positions=x, throw=False)
    assert np.all(np.isnan(x_star))


def test_standalone_calls_on_an_invalid_list_are_nan_and_warn(lattice) -> None:
    s, x, tight = lattice["system"], lattice["x"], lattice["tight"]
    p, relaxed = s.params, lattice["reference"].positions
    assert np.isfinite(float(tight(x, p)))
    with pytest.warns(RuntimeWarning, match="overflowed its capacity"):
        assert np.isnan(float(tight(relaxed, p)))
    with pytest.warns(RuntimeWarning, match="overflowed its capacity"):
        assert np.all(np.isnan(jax.grad(tight)(relaxed, p)))
    with pytest.warns(RuntimeWarning, match="not the box"):
        assert np.isnan(float(tight(x, {**p, "box": 1.01 * p["box"]})))
    with pytest.warns(RuntimeWarning, match="interaction range reached"):
        assert np.isnan(float(tight(x, {**p, "diameters": 1.2 * p["diameters"]})))


def test_energy_protocol_against_all_pairs(lattice) -> None:
    """allocate / build / update / valid / bind / freeze / diagnostics: every
    valid list gives the all-pairs energy and forces where it is used."""
    b, a, x, p = lattice["system"], lattice["all_pairs"], lattice["x"], lattice["system"].params
    relaxed = lattice["reference"].positions
    # Off equilibrium, so that the forces compared are not rounding noise.
    moved = relaxed + 0.02 * jax.random.normal(jax.random.PRNGKey(6), relaxed.shape)
    energy = b.energy
    exact = jax.jit(jax.value_and_grad(a.energy))

    def agrees(aux, positions) -> None:
        assert bool(energy.valid(aux))
        e, g = jax.jit(jax.value_and_grad(lambda y, q: energy.bind(aux)(y, q)))(positions, p)
        expected_e, expected_g = exact(positions, p)
        assert float(e) == pytest.approx(float(expected_e), rel=RTOL)
        assert rel_err(g, expected_g) <= RTOL

    allocated = energy.allocate(x, p)
    info = energy.diagnostics(allocated)
    assert info["valid"] and info["reason"] == "valid" and 0 < info["pairs"] <= info["capacity"]
    agrees(allocated, x)
    agrees(jax.jit(energy.build)(x, p), x)
    updated = jax.jit(energy.update)(allocated, moved, p)  # near the relaxed packing, far from x
    assert energy.diagnostics(updated)["rebuilds"] >= 1
    agrees(updated, moved)
    frozen = energy.freeze(moved, p)  # only the interacting pairs
    assert energy.diagnostics(frozen)["pairs"] < energy.diagnostics(updated)["pairs"]
    agrees(frozen, moved)
    # A list that cannot hold the relaxed packing's pairs is invalid and binds to NaN.
    tight = lattice["tight"]
    overflowed = jax.jit(tight.update)(tight.allocate(x, p), relaxed, p)
    assert not bool(tight.valid(overflowed)) and "overflowed" in tight.diagnostics(overflowed)["reason"]
    assert np.isnan(float(jax.jit(lambda y, q: tight.bind(overflowed)(y, q))(relaxed, p)))
    # The plain energy's protocol is trivial.
    assert a.energy.allocate(x, p) is None and bool(a.energy.valid(None)) and a.energy.diagnostics(None) == {}


# ---------------------------------------------------------------------------
# Builders and input checks
# ---------------------------------------------------------------------------


def test_builders_switch_above_the_threshold_or_on_request(monkeypatch) -> None:
    assert nl.NEIGHBOR_LIST_THRESHOLD == 2000  # as documented
    monkeypatch.setattr(nl.lists, "NEIGHBOR_LIST_THRESHOLD", 143)
    assert packing(144, None).neighbor_list
    assert not packing(144, False).neighbor_list
    assert not packing(143, None).neighbor_list


def test_pair_potentials_over_a_neighbor_list_agree() -> None:
    """Morse with two species (species matrices, an extra parameter): energy,
    forces and parameter derivatives as all pairs."""
    options = dict(dim=2, density=0.8, sigma=[[1.0, 1.1], [1.1, 1.2]], fractions=(0.5, 0.5))
    a, b = systems.morse(144, neighbor_list=False, **options), systems.morse(144, neighbor_list=True, **options)
    assert b.neighbor_list and not a.neighbor_list
    x = a.positions + 0.05 * jax.random.normal(jax.random.PRNGKey(5), a.positions.shape)

    def derivatives(energy_fn):
        return jax.jit(jax.value_and_grad(energy_fn, argnums=(0, 1)))(x, a.params)

    (e_b, (gx_b, gp_b)), (e_a, (gx_a, gp_a)) = derivatives(b.energy), derivatives(a.energy)
    assert float(e_b) == pytest.approx(float(e_a), rel=RTOL)
    assert rel_err(gx_b, gx_a) <= RTOL
    for name in ("sigma", "epsilon", "alpha", "box"):
        assert rel_err(gp_b[name], gp_a[name]) <= RTOL, name


def test_bad_input_raises(lattice) -> None:
    b = lattice["system"]
    for bad in ({"skin": 0.0}, {"capacity_multiplier": 0.5}):
        with pytest.raises(ValueError, match="must be"):
            b.energy.replace(b.positions, b.params, **bad)
    with pytest.raises(ValueError, match="three list cutoffs"):  # a box too small for cells
        b.energy.replace(b.positions, b.params, skin=5.0)
    with pytest.raises(ValueError, match="periodic box"):
        systems.lennard_jones_cluster(144, dim=2, neighbor_list=True)
    with pytest.raises(ValueError, match="neighbor_list must be"):
        packing(144, "yes")


# ---------------------------------------------------------------------------
# Builds: the pairs of a list against brute force
# ---------------------------------------------------------------------------


def brute_force_pairs(x: np.ndarray, box: np.ndarray, cutoff: float) -> list[tuple[int, int]]:
    """Every (i, j), j < i, closer than ``cutoff`` (minimum image), ascending in i then j."""
    ds = np.linalg.solve(box, (x[:, None, :] - x[None, :, :]).reshape(-1, x.shape[1]).T).T
    dr = (ds - np.round(ds)) @ box.T
    d = np.linalg.norm(dr, axis=-1).reshape(len(x), len(x))
    return [(i, j) for i in range(len(x)) for j in range(i) if d[i, j] < cutoff]


@pytest.mark.parametrize("dim", [2, 3])
def test_built_pairs_are_every_pair_within_the_cutoff(dim) -> None:
    """Allocation and a traced rebuild at moved positions (the compaction from the
    cell list's candidates) hold exactly the brute-force pairs, each once, sorted by
    particle; a capacity below the pairs needed is flagged."""
    from mdsens.neighbors import lists

    s = systems.soft_sphere_packing(150 if dim == 2 else 200, dim=dim, phi=0.9 if dim == 2 else 0.6, neighbor_list=True)
    box = np.asarray(s.params["box"])
    cutoff = 1.75
    x = np.asarray(s.positions)
    moved = x + 0.2 * np.asarray(jax.random.normal(jax.random.PRNGKey(5), x.shape))
    allocated = lists.allocate(jnp.asarray(x), box, cutoff, 1.1)
    rebuilt = jax.jit(lambda nb, y: lists.update(nb, y, jnp.asarray(1.0), s.params["box"]))(
        allocated, jnp.asarray(moved)
    )
    assert int(rebuilt.rebuilds) == 1
    for neighbors, y in [(allocated, x), (rebuilt, moved)]:
        mask = np.asarray(neighbors.mask)
        ours = list(zip(np.asarray(neighbors.i)[mask].tolist(), np.asarray(neighbors.j)[mask].tolist(), strict=True))
        expected = brute_force_pairs(y, box, cutoff)
        assert sorted(ours) == expected and len(ours) == len(expected)
        assert np.all(np.diff(np.asarray(neighbors.i)[mask]) >= 0)
        assert not np.any(mask[mask.argmin() :]) or mask.all()  # real pairs first, then padding
        assert int(neighbors.flags) & ~lists.OUT_OF_RANGE == 0
    tight = lists.static_template(lists.allocate(jnp.asarray(x), box, cutoff, 1.0))
    crowded = x * 0.5  # into a corner of the box: more pairs (and fuller cells) than allocated
    flags = lists.build(tight, jnp.asarray(crowded), jnp.asarray(1.0), s.params["box"]).flags
    assert int(flags) & lists.OVERFLOW
