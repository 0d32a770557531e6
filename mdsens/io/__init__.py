"""Configurations in and out: readers that return a :class:`~mdsens.System`
(positions in float64, the box, species, per-particle diameters) with the
potential you attach (:mod:`mdsens.systems.potentials`), and writers of
relaxed states with their per-particle fields for OVITO and ASE::

    import mdsens
    from mdsens import io, systems
    system = io.read_gsd("packing.gsd", systems.SoftSpheres())
    x, dx, info = mdsens.equilibrium_jvp(system, system.params, tangent)
    io.write_extxyz("relaxed.xyz", system, x, arrays={"dx": dx})

ASE and GSD are optional (``pip install 'mdsens[io]'``); LAMMPS data files
and extended-XYZ output need neither.
"""

from mdsens.io.arrays import from_arrays as from_arrays
from mdsens.io.arrays import upper_triangular as upper_triangular
from mdsens.io.ase import from_ase as from_ase
from mdsens.io.ase import read_ase as read_ase
from mdsens.io.extxyz import write_extxyz as write_extxyz
from mdsens.io.gsd import read_gsd as read_gsd
from mdsens.io.gsd import write_gsd as write_gsd
from mdsens.io.lammps_data import read_lammps_data as read_lammps_data
