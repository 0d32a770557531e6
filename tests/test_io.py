"""Readers and writers of mdsens.io against hand-built files: energies equal to
those of systems built directly (and to a numpy sum over periodic images),
triclinic and rotated boxes, exact round trips, bad files, missing extras."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdsens import io, systems

ase = pytest.importorskip("ase")
ase_io = pytest.importorskip("ase.io")
gsd_hoomd = pytest.importorskip("gsd.hoomd")

# A tilted box (columns are the box vectors), wide enough for a neighbor list of unit spheres.
TILTED = np.array([[6.0, 1.2, -0.7], [0.0, 5.5, 0.9], [0.0, 0.0, 6.3]])


def soft_sphere_np(x: np.ndarray, box: np.ndarray | None, d: np.ndarray, epsilon=1.0, alpha=2.0) -> float:
    """Harmonic soft spheres summed over the nearest of the 3^dim periodic images of each pair."""
    i, j = np.triu_indices(len(x), 1)
    dr = x[j] - x[i]
    if box is not None:
        fractional = np.linalg.solve(box, dr.T).T
        dr = (fractional - np.round(fractional)) @ box.T
        shifts = np.array(list(itertools.product((-1, 0, 1), repeat=x.shape[1]))) @ box.T
        r = np.min(np.linalg.norm(dr[:, None, :] + shifts[None], axis=-1), axis=1)
    else:
        r = np.linalg.norm(dr, axis=1)
    sigma = 0.5 * (d[i] + d[j])
    return float(np.sum(epsilon / alpha * np.clip(1.0 - r / sigma, 0.0, None) ** alpha))


def energy(system, positions=None, params=None) -> float:
    positions, params = system.inputs(positions, params)
    return float(system.energy(positions, params))


@pytest.fixture(scope="module")
def packing() -> dict[str, np.ndarray]:
    """40 soft spheres at random in the tilted box (overlapping: a nonzero energy)."""
    rng = np.random.default_rng(0)
    return {
        "x": rng.uniform(size=(40, 3)) @ TILTED.T,
        "d": rng.uniform(0.9, 1.3, 40),
        "species": rng.integers(0, 2, 40),
    }


def random_rotation(seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


# ---------------------------------------------------------------- arrays, boxes


def test_upper_triangular_rotates_consistently() -> None:
    box = random_rotation(1) @ TILTED
    x = np.random.default_rng(2).normal(size=(5, 3))
    ut, rotated, q = io.upper_triangular(box, x)
    assert np.all(np.tril(ut, -1) == 0) and np.all(np.diag(ut) > 0)
    np.testing.assert_allclose(q @ ut, box, atol=1e-13)
    np.testing.assert_allclose(q.T @ q, np.eye(3), atol=1e-14)
    np.testing.assert_allclose(rotated, x @ q, atol=0)
    same, unchanged, identity = io.upper_triangular(TILTED, x)
    np.testing.assert_array_equal(same, TILTED)
    np.testing.assert_array_equal(unchanged, x)
    np.testing.assert_array_equal(identity, np.eye(3))


@pytest.mark.parametrize("neighbor_list", [False, True])
def test_from_arrays_matches_numpy_in_a_tilted_box(packing, neighbor_list: bool) -> None:
    system = io.from_arrays(
        packing["x"], systems.SoftSpheres(neighbor_list=neighbor_list), box=TILTED, diameters=packing["d"]
    )
    assert system.neighbor_list == neighbor_list
    expected = soft_sphere_np(packing["x"], TILTED, packing["d"])
    assert expected > 0.1
    assert energy(system) == pytest.approx(expected, rel=1e-12)


def test_builder_energy_in_a_tilted_box_is_the_readers(packing) -> None:
    # The builder's energy reads params["box"] at call time: give it the tilted box.
    built = systems.soft_sphere_packing(40, dim=3, phi=0.5, per_particle_diameters=True)
    params = {**built.params, "diameters": jnp.asarray(packing["d"]), "box": jnp.asarray(TILTED)}
    read = io.from_arrays(packing["x"], systems.SoftSpheres(), box=TILTED, diameters=packing["d"])
    assert energy(read) == pytest.approx(energy(built, packing["x"], params), rel=1e-12)


# ---------------------------------------------------------------- ASE


@pytest.mark.parametrize("neighbor_list", [False, True])
def test_ase_rotated_cell_is_rotated_back(packing, neighbor_list: bool) -> None:
    # A general (not upper-triangular) cell: the same crystal turned by a rotation.
    q = random_rotation(3)
    atoms = ase.Atoms(
        numbers=np.where(packing["species"] == 0, 29, 14),  # Cu and Si: species by atomic number
        positions=packing["x"] @ q.T,
        cell=(q @ TILTED).T,
        pbc=True,
    )
    atoms.new_array("diameter", packing["d"])
    system = io.from_ase(atoms, systems.SoftSpheres(neighbor_list=neighbor_list))
    assert np.all(np.tril(np.asarray(system.box), -1) == 0)
    np.testing.assert_allclose(np.asarray(system.box), TILTED, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(system.species), np.where(packing["species"] == 0, 1, 0))
    assert energy(system) == pytest.approx(soft_sphere_np(packing["x"], TILTED, packing["d"]), rel=1e-11)
    # Forces rotate with the frame: |F| per particle is the same as in the tilted frame.
    direct = io.from_arrays(packing["x"], systems.SoftSpheres(), box=TILTED, diameters=packing["d"])
    force = jax.grad(system.energy)(system.positions, system.params)
    force_direct = jax.grad(direct.energy)(direct.positions, direct.params)
    np.testing.assert_allclose(np.linalg.norm(force, axis=1), np.linalg.norm(force_direct, axis=1), atol=1e-12)


def test_hand_written_extxyz_with_general_lattice(tmp_path: Path, packing) -> None:
    # Values on a 1/1024 grid are exact in decimal: the file states them exactly.
    q = random_rotation(4)
    cell = np.round((q @ TILTED).T * 1024) / 1024
    x = np.round(packing["x"] @ q.T * 1024) / 1024
    d = np.round(packing["d"] * 1024) / 1024
    lattice = " ".join(f"{v:.10f}" for v in cell.reshape(-1))
    rows = [f"Si {a:.10f} {b:.10f} {c:.10f} {e:.10f}" for (a, b, c), e in zip(x, d, strict=True)]
    path = tmp_path / "hand.xyz"
    path.write_text(
        f'{len(x)}\nLattice="{lattice}" Properties=species:S:1:pos:R:3:diameter:R:1 pbc="T T T"\n' + "\n".join(rows)
    )
    system = io.read_ase(path, systems.SoftSpheres())
    assert energy(system) == pytest.approx(soft_sphere_np(x, cell.T, d), rel=1e-11)


def test_extxyz_round_trip_is_exact(tmp_path: Path) -> None:
    system = systems.soft_sphere_packing(24, dim=3, phi=0.6, per_particle_diameters=True)
    x = system.positions + 3.0 * system.box[:, 0]  # unwrapped positions stay as they are
    rng = np.random.default_rng(5)
    field, scalar = rng.normal(size=(24, 3)) * 1e-9, rng.normal(size=24)
    path = tmp_path / "out.xyz"
    io.write_extxyz(path, system, x, arrays={"dx_ddiameter": field, "local": scalar}, symbols=("Ar", "Kr"))
    back = io.read_ase(path, systems.SoftSpheres())
    np.testing.assert_array_equal(np.asarray(back.positions), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(back.box), np.asarray(system.box))
    np.testing.assert_array_equal(np.asarray(back.species), np.asarray(system.species))
    np.testing.assert_array_equal(np.asarray(back.params["diameters"]), np.asarray(system.params["diameters"]))
    atoms = ase_io.read(path)
    np.testing.assert_array_equal(atoms.arrays["dx_ddiameter"], field)
    np.testing.assert_array_equal(atoms.arrays["local"], scalar)
    # The writer's forces and energy (compiled) agree with these to rounding.
    forces = -np.asarray(jax.grad(system.energy)(x, system.params))
    np.testing.assert_allclose(atoms.get_forces(), forces, rtol=1e-13, atol=1e-15)
    assert atoms.get_potential_energy() == pytest.approx(energy(system, x), rel=1e-14)
    assert atoms.get_chemical_symbols()[:1] == ["Ar"]


def test_extxyz_round_trip_2d(tmp_path: Path) -> None:
    system = systems.soft_sphere_packing(16, dim=2, phi=0.9)
    dx = np.random.default_rng(6).normal(size=(16, 2))
    path = tmp_path / "out2d.xyz"
    io.write_extxyz(path, system, arrays={"dx": dx})
    atoms = ase_io.read(path)
    assert atoms.get_pbc().tolist() == [True, True, False]
    np.testing.assert_array_equal(atoms.arrays["dx"][:, :2], dx)
    np.testing.assert_array_equal(atoms.arrays["dx"][:, 2], 0.0)
    back = io.read_ase(path, systems.SoftSpheres(diameters=(1.0, 1.4)), dim=2)
    np.testing.assert_array_equal(np.asarray(back.positions), np.asarray(system.positions))
    np.testing.assert_array_equal(np.asarray(back.box), np.asarray(system.box))
    assert energy(back) == energy(system)


# ---------------------------------------------------------------- GSD


def hoomd_matrix(lx, ly, lz, xy, xz, yz) -> np.ndarray:
    """HOOMD's box vectors (its documentation): a1 = (Lx, 0, 0), a2 = (xy Ly, Ly, 0), a3 = (xz Lz, yz Lz, Lz)."""
    return np.column_stack([[lx, 0, 0], [xy * ly, ly, 0], [xz * lz, yz * lz, lz]]).astype(np.float64)


def write_hoomd_frame(path: Path, box: list[float], x: np.ndarray, image: np.ndarray, d, typeid, types, dim=3):
    frame = gsd_hoomd.Frame()
    frame.configuration.dimensions = dim
    frame.configuration.box = box
    frame.particles.N = len(x)
    frame.particles.position = x.astype(np.float32)
    frame.particles.image = image.astype(np.int32)
    frame.particles.diameter = np.asarray(d, np.float32)
    frame.particles.typeid = np.asarray(typeid, np.uint32)
    frame.particles.types = types
    with gsd_hoomd.open(str(path), "w") as f:
        f.append(frame)


def test_hand_written_gsd_with_tilts_and_images(tmp_path: Path, packing) -> None:
    hoomd_box = [6.0, 5.5, 6.3, 0.2, -0.1, 0.15]
    box = hoomd_matrix(*hoomd_box)
    rng = np.random.default_rng(7)
    # Centred, wrapped positions and image flags; the unwrapped positions are the configuration.
    wrapped = (rng.uniform(size=(40, 3)) - 0.5) @ box.T
    image = rng.integers(-2, 3, size=(40, 3))
    path = tmp_path / "hand.gsd"
    write_hoomd_frame(path, hoomd_box, wrapped, image, packing["d"], packing["species"], ["A", "B"])
    system = io.read_gsd(path, systems.SoftSpheres())
    box32 = hoomd_matrix(*np.asarray(hoomd_box, np.float32).astype(np.float64))
    unwrapped = wrapped.astype(np.float32).astype(np.float64) + image @ box32.T
    d32 = packing["d"].astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(np.asarray(system.positions), unwrapped, rtol=0, atol=1e-13)
    np.testing.assert_array_equal(np.asarray(system.species), packing["species"])
    assert energy(system) == pytest.approx(soft_sphere_np(unwrapped, box32, d32), rel=1e-11)
    named = io.read_gsd(path, systems.SoftSpheres(), species=("B", "A"))
    np.testing.assert_array_equal(np.asarray(named.species), 1 - packing["species"])


def test_gsd_round_trip(tmp_path: Path) -> None:
    system = systems.soft_sphere_packing(24, dim=3, phi=0.6, per_particle_diameters=True)
    box = np.asarray(system.box)
    x = np.asarray(system.positions) + box @ np.array([2.0, -1.0, 0.0])  # outside the box: image flags
    field = np.random.default_rng(8).normal(size=(24, 3)) * 1e-9
    path = tmp_path / "out.gsd"
    io.write_gsd(path, system, x, arrays={"dx": field})
    back = io.read_gsd(path, systems.SoftSpheres())
    # float32 in the file: positions to float32 precision of the box, exactly the float32 box and diameters.
    np.testing.assert_allclose(np.asarray(back.positions), x, rtol=0, atol=4 * np.finfo(np.float32).eps * box.max())
    np.testing.assert_array_equal(np.asarray(back.box), box.astype(np.float32).astype(np.float64))
    d = np.asarray(system.params["diameters"])
    np.testing.assert_array_equal(np.asarray(back.params["diameters"]), d.astype(np.float32).astype(np.float64))
    with gsd_hoomd.open(str(path), "r") as f:
        log = f[0].log
    np.testing.assert_array_equal(log["particles/dx"], field)  # float64, exact
    forces = -np.asarray(jax.grad(system.energy)(x, system.params))
    np.testing.assert_allclose(log["particles/forces"], forces, rtol=1e-13, atol=1e-15)


def test_gsd_round_trip_2d(tmp_path: Path) -> None:
    system = systems.soft_sphere_packing(16, dim=2, phi=0.9, per_particle_diameters=True)
    path = tmp_path / "out2d.gsd"
    io.write_gsd(path, system)
    back = io.read_gsd(path, systems.SoftSpheres(), dim=2)
    assert back.dim == 2
    np.testing.assert_allclose(np.asarray(back.positions), np.asarray(system.positions), atol=1e-5)
    with gsd_hoomd.open(str(path), "r") as f:
        assert f[0].configuration.dimensions == 2
        assert f[0].log["particles/forces"].shape == (16, 3)


# ---------------------------------------------------------------- LAMMPS


def lammps_data(x, box, types, n_types, style="atomic", d=None, image=None, order=None, dim=3) -> str:
    """A LAMMPS data file: header, tilts, Masses, and Atoms rows in the given order."""
    x3 = np.pad(x, ((0, 0), (0, 3 - x.shape[1]))).tolist()  # Python floats: repr is exact
    b = np.eye(3)
    b[:dim, :dim] = box
    b = b.tolist()
    d = None if d is None else np.asarray(d).tolist()
    lines = [
        "LAMMPS data file written by hand",
        "",
        f"{len(x)} atoms",
        f"{n_types} atom types",
        "",
        f"0.0 {b[0][0]!r} xlo xhi",
        f"0.0 {b[1][1]!r} ylo yhi",
        f"-0.5 {b[2][2] - 0.5!r} zlo zhi",
        f"{b[0][1]!r} {b[0][2]!r} {b[1][2]!r} xy xz yz",
        "",
        "Masses",
        "",
        *[f"{t + 1} 1.0" for t in range(n_types)],
        "",
        f"Atoms # {style}",
        "",
    ]
    for i in order if order is not None else range(len(x)):
        middle = f"{d[i]!r} 1.0 " if style == "sphere" else ""
        flags = " " + " ".join(str(v) for v in image[i]) if image is not None else ""
        lines.append(f"{i + 1} {types[i] + 1} {middle}{x3[i][0]!r} {x3[i][1]!r} {x3[i][2]!r}{flags}")
    lines += ["", "Velocities", "", *[f"{i + 1} 0.0 0.0 0.0" for i in range(len(x))]]
    return "\n".join(lines) + "\n"


def test_lammps_atomic_triclinic_with_images(tmp_path: Path, packing) -> None:
    rng = np.random.default_rng(9)
    image = rng.integers(-1, 2, size=(40, 3))
    path = tmp_path / "lj.data"
    species = packing["species"]
    path.write_text(lammps_data(packing["x"], TILTED, species, 2, image=image, order=rng.permutation(40)))
    lj = systems.LennardJones(sigma=((1.0, 0.9), (0.9, 0.8)), epsilon=((1.0, 1.5), (1.5, 0.5)), cutoff=2.0)
    system = io.read_lammps_data(path, lj)
    unwrapped = packing["x"] + image @ TILTED.T
    np.testing.assert_allclose(np.asarray(system.positions), unwrapped, atol=1e-12)
    direct = io.from_arrays(unwrapped, lj, box=TILTED, species=species)
    assert energy(system) == pytest.approx(energy(direct), rel=1e-12)
    assert energy(direct) == pytest.approx(energy(direct, packing["x"]), rel=1e-9)  # images change nothing


def test_lammps_sphere_style_matches_numpy(tmp_path: Path, packing) -> None:
    path = tmp_path / "spheres.data"
    path.write_text(lammps_data(packing["x"], TILTED, np.zeros(40, int), 1, style="sphere", d=packing["d"]))
    system = io.read_lammps_data(path, systems.SoftSpheres())
    np.testing.assert_array_equal(np.asarray(system.params["diameters"]), packing["d"])
    assert energy(system) == pytest.approx(soft_sphere_np(packing["x"], TILTED, packing["d"]), rel=1e-12)


def test_lammps_2d(tmp_path: Path) -> None:
    built = systems.soft_sphere_packing(16, dim=2, phi=0.9, per_particle_diameters=True)
    x, d = np.asarray(built.positions), np.asarray(built.params["diameters"])
    path = tmp_path / "2d.data"
    path.write_text(lammps_data(x, np.asarray(built.box), np.zeros(16, int), 1, style="sphere", d=d, dim=2))
    system = io.read_lammps_data(path, systems.SoftSpheres(), dim=2)
    assert energy(system) == energy(built)


# ---------------------------------------------------------------- any energy


def test_jax_md_wrapper_matches_soft_spheres(packing) -> None:
    from jax_md import energy as jmd_energy

    wrapped = systems.JaxMD(jmd_energy.soft_sphere_pair, {"sigma": 1.1, "epsilon": 1.0, "alpha": 2.0}, reach=1.1)
    system = io.from_arrays(packing["x"], wrapped, box=TILTED)
    d = np.full(40, 1.1)
    assert energy(system) == pytest.approx(soft_sphere_np(packing["x"], TILTED, d), rel=1e-12)
    # sigma is a named, differentiable parameter, in float64.
    grad = jax.grad(system.energy, argnums=1)(system.positions, system.params)
    h = 1e-6
    fd = (
        energy(system, params={**system.params, "sigma": system.params["sigma"] + h})
        - energy(system, params={**system.params, "sigma": system.params["sigma"] - h})
    ) / (2 * h)
    assert float(grad["sigma"]) == pytest.approx(fd, rel=1e-7)


def test_custom_energy_gets_the_box(tmp_path: Path, packing) -> None:
    def harmonic_to_origin(x, p):
        fractional = x @ jnp.linalg.inv(p["box"]).T
        return p["k"] * jnp.sum((fractional - jnp.round(fractional)) ** 2)

    path = tmp_path / "c.data"
    path.write_text(lammps_data(packing["x"], TILTED, np.zeros(40, int), 1))
    system = io.read_lammps_data(path, systems.CustomEnergy(harmonic_to_origin, {"k": 2.0}))
    np.testing.assert_array_equal(np.asarray(system.params["box"]), TILTED)
    assert energy(system) == pytest.approx(float(harmonic_to_origin(packing["x"], {"k": 2.0, "box": TILTED})))


# ---------------------------------------------------------------- bad files


def _atoms_rows(n: int, columns: int) -> str:
    return "\n".join(f"{i + 1} 1 " + " ".join(["1.5"] * (columns - 2)) for i in range(n))


HEADER = "title\n\n2 atoms\n1 atom types\n0 5 xlo xhi\n0 5 ylo yhi\n0 5 zlo zhi\n\nAtoms # atomic\n\n"

BAD_LAMMPS = [
    (HEADER + "1 1 1.0 1.0\n2 1 2.0 2.0 2.0\n", "Atoms line 11: atom_style atomic has the columns"),
    (HEADER + "1 1 1.0 nan 1.0\n2 1 2.0 2.0 2.0\n", "positions: contains NaN"),
    (HEADER + "1 1 1.0 1.0 1.0\n2 2 2.0 2.0 2.0\n", "Atoms column type: 2 is not one of the 1 atom types"),
    (HEADER + "1 1 1.0 1.0 1.0\n2 1 2.0 x 2.0\n", "Atoms line 12 column y: 'x' is not a number"),
    (HEADER.replace("0 5 zlo zhi\n", "") + "1 1 1 1 1\n2 1 2 2 2\n", "header: no 'zlo zhi' line"),
    (HEADER + "1 1 1.0 1.0 1.0\n", "Atoms: 1 rows for the 2 atoms"),
    (HEADER.replace("# atomic", "# full") + "1 1 1.0 1.0 1.0\n2 1 2.0 2.0 2.0\n", "atom_style: 'full'"),
]


@pytest.mark.parametrize(("text", "match"), BAD_LAMMPS)
def test_bad_lammps_files_name_file_and_field(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.data"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{path}: .*{match}"):
        io.read_lammps_data(path, systems.LennardJones(cutoff=2.0))


def test_lammps_wrong_dimension(tmp_path: Path) -> None:
    path = tmp_path / "3d.data"
    path.write_text(HEADER + "1 1 1.0 1.0 1.0\n2 1 2.0 2.0 2.0\n")
    with pytest.raises(ValueError, match=f"{path}: Atoms column z: a 2D configuration"):
        io.read_lammps_data(path, systems.LennardJones(cutoff=2.0), dim=2)


def _xyz(tmp_path: Path, rows: list[str], properties="species:S:1:pos:R:3") -> Path:
    path = tmp_path / "bad.xyz"
    lattice = 'Lattice="5 0 0 0 5 0 0 0 5" ' if rows else ""
    path.write_text(f'{len(rows)}\n{lattice}Properties={properties} pbc="T T T"\n' + "\n".join(rows) + "\n")
    return path


def test_bad_extxyz_files_name_file_and_field(tmp_path: Path) -> None:
    path = _xyz(tmp_path, ["Si 1 1 1", "Si 2 2 2"])
    with pytest.raises(ValueError, match=f"{path}: diameter: soft spheres need per-particle diameters"):
        io.read_ase(path, systems.SoftSpheres())
    path = _xyz(tmp_path, ["Si 1 1 1", "Ge 2 2 2"])
    with pytest.raises(ValueError, match=rf"{path}: species: \['Ge'\] not among the species \['Si'\]"):
        io.read_ase(path, systems.LennardJones(cutoff=2.0), species=("Si",))
    path = _xyz(tmp_path, ["Si 1 1 1", "Si 2 nan 2"])
    with pytest.raises(ValueError, match=f"{path}: positions: contains NaN"):
        io.read_ase(path, systems.LennardJones(cutoff=2.0))
    path = _xyz(tmp_path, ["Si 1 1 1", "Si 2 2 2"])
    with pytest.raises(ValueError, match=f"{path}: positions: z varies"):
        io.read_ase(path, systems.LennardJones(cutoff=2.0), dim=2)
    path = _xyz(tmp_path, ["Si 1 1 1 0.5", "Si 2 2 2 -1.0"], "species:S:1:pos:R:3:diameter:R:1")
    with pytest.raises(ValueError, match=f"{path}: diameter: must be positive"):
        io.read_ase(path, systems.SoftSpheres())
    path = _xyz(tmp_path, ["Si 1 1", "Si 2 2"])
    with pytest.raises(ValueError, match=f"{path}: ASE could not read it"):
        io.read_ase(path, systems.SoftSpheres())


def test_box_smaller_than_twice_the_range_is_refused(tmp_path: Path) -> None:
    path = _xyz(tmp_path, ["Si 1 1 1", "Si 2 2 2"])
    with pytest.raises(ValueError, match=f"{path}: params\\['box'\\]: .*narrower than twice the interaction range"):
        io.read_ase(path, systems.LennardJones(cutoff=2.5, sigma=1.2))


def test_bad_gsd_files_name_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.gsd"
    x = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    write_hoomd_frame(path, [5, 5, 5, 0, 0, 0], x, np.zeros((2, 3)), [1, 1], [0, 1], ["A", "C"])
    with pytest.raises(ValueError, match=rf"{path}: particles/types: \['C'\] not among the species \['A', 'B'\]"):
        io.read_gsd(path, systems.SoftSpheres(), species=("A", "B"))
    with pytest.raises(ValueError, match=f"{path}: configuration/dimensions: the file is 3D; expected 2D"):
        io.read_gsd(path, systems.SoftSpheres(), dim=2)
    with pytest.raises(ValueError, match=f"{path}: frame: 3 out of range"):
        io.read_gsd(path, systems.SoftSpheres(), frame=3)
    write_hoomd_frame(path, [5, 5, 5, 0, 0, 0], x, np.zeros((2, 3)), [1, 0], [0, 0], ["A"])
    with pytest.raises(ValueError, match=f"{path}: diameter: must be positive"):
        io.read_gsd(path, systems.SoftSpheres())


def test_bad_writer_arguments(tmp_path: Path) -> None:
    system = systems.soft_sphere_packing(16, dim=2, phi=0.9)
    with pytest.raises(ValueError, match="arrays: 'forces' must be an identifier and not one of"):
        io.write_extxyz(tmp_path / "a.xyz", system, arrays={"forces": np.zeros(16)})
    with pytest.raises(ValueError, match=r"arrays\['dx'\] must have shape \(N,\) or \(N, k\) with N = 16"):
        io.write_gsd(tmp_path / "a.gsd", system, arrays={"dx": np.zeros(15)})
    with pytest.raises(ValueError, match="symbols: 1 given for 2 species"):
        io.write_extxyz(tmp_path / "a.xyz", system, symbols=("Si",))
    cluster = systems.lennard_jones_cluster(4)
    with pytest.raises(ValueError, match="GSD boxes are periodic"):
        io.write_gsd(tmp_path / "a.gsd", cluster)


# ---------------------------------------------------------------- optional dependencies


@pytest.mark.parametrize(
    ("module", "call"),
    [
        ("gsd", lambda p: io.read_gsd(p, systems.SoftSpheres())),
        ("gsd", lambda p: io.write_gsd(p, systems.soft_sphere_packing(8, dim=2))),
        ("ase", lambda p: io.read_ase(p, systems.SoftSpheres())),
    ],
)
def test_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, module: str, call) -> None:
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r"needs the optional package '(gsd|ase)': pip install 'mdsens\[io\]'"):
        call(tmp_path / "x")
