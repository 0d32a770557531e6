"""Particle systems: the :class:`System` value, the energy protocol, and
builders of soft-sphere, Lennard-Jones and Morse systems."""

from mdsens.systems.builders import kob_andersen as kob_andersen
from mdsens.systems.builders import lennard_jones as lennard_jones
from mdsens.systems.builders import lennard_jones_cluster as lennard_jones_cluster
from mdsens.systems.builders import morse as morse
from mdsens.systems.builders import soft_sphere_packing as soft_sphere_packing
from mdsens.systems.energy import Energy as Energy
from mdsens.systems.energy import FunctionEnergy as FunctionEnergy
from mdsens.systems.jax_md_energy import JaxMDEnergy as JaxMDEnergy
from mdsens.systems.materials import gupta_gold as gupta_gold
from mdsens.systems.materials import stillinger_weber_silicon as stillinger_weber_silicon
from mdsens.systems.potentials import CustomEnergy as CustomEnergy
from mdsens.systems.potentials import JaxMD as JaxMD
from mdsens.systems.potentials import LennardJones as LennardJones
from mdsens.systems.potentials import Morse as Morse
from mdsens.systems.potentials import SoftSpheres as SoftSpheres
from mdsens.systems.potentials import StillingerWeber as StillingerWeber
from mdsens.systems.stillinger_weber import StillingerWeberEnergy as StillingerWeberEnergy
from mdsens.systems.system import DEFAULT_DT_MAX as DEFAULT_DT_MAX
from mdsens.systems.system import System as System
