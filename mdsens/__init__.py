"""mdsens: how mechanical equilibria of particle systems move when parameters change.

Build or bring a :class:`System`, relax it (:func:`relax`), then differentiate
the relaxed positions with respect to any parameter by implicit
differentiation (:func:`equilibrium`). Options are values: minimisers
(:class:`FIRE`, :class:`GradientDescent`), linear solvers (:class:`CG`,
:class:`MINRES`, :class:`BiCGSTAB`, :class:`Dense`) and derivative methods
(:class:`Implicit`, :class:`Unrolled`, :class:`FiniteDifference`).

Subpackages and modules: ``systems`` (builders, the energy protocol),
``neighbors``, ``observables``, ``jamming``, ``study``, ``linear_solve``,
``coarse_space``, ``zero_modes``, ``implicit``, ``curvature``, ``testing``, ``plotting``, ``figures``.
"""

from importlib.metadata import PackageNotFoundError, version

from mdsens._results import Status as Status
from mdsens.adjoints import FiniteDifference as FiniteDifference
from mdsens.adjoints import Implicit as Implicit
from mdsens.adjoints import Unrolled as Unrolled
from mdsens.equilibria import EquilibriumInfo as EquilibriumInfo
from mdsens.equilibria import energy_sensitivity as energy_sensitivity
from mdsens.equilibria import equilibrium as equilibrium
from mdsens.equilibria import equilibrium_jvp as equilibrium_jvp
from mdsens.equilibria import equilibrium_vjp as equilibrium_vjp
from mdsens.equilibria import equilibrium_with_info as equilibrium_with_info
from mdsens.equilibria import sensitivity_at as sensitivity_at
from mdsens.implicit import custom_fixed_point as custom_fixed_point
from mdsens.implicit import custom_root as custom_root
from mdsens.implicit import root_jvp as root_jvp
from mdsens.implicit import root_vjp as root_vjp
from mdsens.linear_solve import CG as CG
from mdsens.linear_solve import MINRES as MINRES
from mdsens.linear_solve import BiCGSTAB as BiCGSTAB
from mdsens.linear_solve import BlockJacobi as BlockJacobi
from mdsens.linear_solve import Dense as Dense
from mdsens.linear_solve import Jacobi as Jacobi
from mdsens.linear_solve import SolveInfo as SolveInfo
from mdsens.linear_solve import TwoLevel as TwoLevel
from mdsens.minimisers import FIRE as FIRE
from mdsens.minimisers import GradientDescent as GradientDescent
from mdsens.minimisers import max_force as max_force
from mdsens.relaxation import RelaxResult as RelaxResult
from mdsens.relaxation import relax as relax
from mdsens.systems import System as System
from mdsens.zero_modes import ZeroModes as ZeroModes

try:
    __version__ = version("mdsens")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
