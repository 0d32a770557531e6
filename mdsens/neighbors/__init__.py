r"""Neighbor-list pair energies: O(N) time and memory for large periodic systems.

A :class:`NeighborListEnergy` is a pair energy

.. math:: E(x; \theta) = \sum_{i<j} \phi_{ij}(|x_i - x_j|_{\mathrm{mic}}; \theta)

summed over the pairs of a neighbor list (jax-md ``partition.neighbor_list``
built from cell lists, ``OrderedSparse`` format: each pair once) instead of
over all N^2 pairs. It is what the :mod:`mdsens.systems` builders return as
``System.energy`` above :data:`NEIGHBOR_LIST_THRESHOLD` particles (or when
asked with ``neighbor_list=True``): an :class:`~mdsens.systems.Energy` whose
state is its list (a :class:`Neighbors`), so :func:`mdsens.relax`,
:func:`mdsens.equilibrium`, :func:`mdsens.equilibrium_jvp` and
:func:`mdsens.equilibrium_vjp` accept it unchanged. Nothing on this path holds
an ``N x N`` array: candidates come from a cell list (the box must be at least
three list cutoffs wide, else ``ValueError``), arrays have O(N) entries.

The skin rule
-------------
A list built at reference positions ``x_ref`` with list cutoff ``C`` holds every
pair closer than ``C`` at ``x_ref`` (``C = R + skin``, ``R`` the largest
interaction range at allocation, e.g. the largest diameter of soft spheres).
At positions ``x`` and parameters ``theta`` with largest range ``R(theta)`` it
holds every interacting pair as long as

.. math:: R(\theta) + 2 \max_i |x_i - x_{\mathrm{ref},i}| < C,

i.e. particles moved less than ``skin / 2`` and the parameters grew the range
by less than the skin (together: less than the skin). Every evaluation on the
neighbor-list path checks this (``update``) and rebuilds the list (inside
``jit``, at fixed capacity) when it fails. The pair set is then constant in a
neighbourhood of ``(x, theta)``: the energy there is the exact all-pairs
energy, so its derivatives of every order, with respect to positions and to
parameters (diameters, although the range depends on them; the box), are
exact. The implicit derivatives of ``x*`` are derivatives at the one point
``(x*, theta)`` and use one list frozen there, valid with a margin (the
relaxation's list inside :func:`mdsens.equilibrium`; the pairs within
``R(theta) (1 + 1e-6)``, ``freeze``, for :func:`mdsens.equilibrium_jvp` and
``_vjp``): they are exact too, and the linear solves never rebuild. (Under
``vmap`` the rebuild ``cond`` becomes a ``select``: every step rebuilds,
correct but slower.)

Overflow
--------
A list has a fixed capacity (pairs, and particles per cell), allocated on the
host outside ``jit`` (``allocate``). A rebuild that needs more, a range
``R(theta) >= C``, or a call-time box (``params["box"]``) that is not the box
the list was built for invalidate the list (``valid`` is False, the reason in
``diagnostics``), and no number computed with it is returned:

- :func:`mdsens.relax` (called with concrete arrays) stops the step that
  invalidated its list, reallocates on the host (larger capacity, or a cutoff
  from the current parameters, or the current box) and continues from the last
  good state; under ``jit``/``vmap`` it cannot reallocate and returns
  ``reason="neighbor_overflow"`` (``converged=False``).
- ``energy(positions, params)`` called on its own builds a list with the
  capacity allocated when the energy was made; if that list is invalid it
  returns NaN (and NaN derivatives) and issues a ``RuntimeWarning`` from the
  host. ``bind(aux)`` returns NaN likewise for an invalid ``aux``.
- Inside derivatives of :func:`mdsens.equilibrium`, an overflow is an
  unconverged relaxation: ``FloatingPointError`` (``throw=True``) or NaN.

Positions are never wrapped for the energy (it uses the minimum image with the
box read from ``params["box"]`` at call time); the list is built from
fractional coordinates wrapped into the unit cell. Boxes must be upper
triangular (jax-md's convention; the builders' boxes are diagonal).

Modules: :mod:`~mdsens.neighbors.lists` (the :class:`Neighbors` value and its
life cycle), :mod:`~mdsens.neighbors.pair_sum` (sums over a given list and
their derivatives), :mod:`~mdsens.neighbors.energy` (:class:`NeighborListEnergy`).
"""

from mdsens.neighbors.energy import NeighborListEnergy as NeighborListEnergy
from mdsens.neighbors.lists import DEFAULT_CAPACITY_MULTIPLIER as DEFAULT_CAPACITY_MULTIPLIER
from mdsens.neighbors.lists import DEFAULT_SKIN_FRACTION as DEFAULT_SKIN_FRACTION
from mdsens.neighbors.lists import MAX_REALLOCATIONS as MAX_REALLOCATIONS
from mdsens.neighbors.lists import NEIGHBOR_LIST_THRESHOLD as NEIGHBOR_LIST_THRESHOLD
from mdsens.neighbors.lists import Neighbors as Neighbors
from mdsens.neighbors.lists import describe as describe
from mdsens.neighbors.lists import use_neighbor_list as use_neighbor_list
