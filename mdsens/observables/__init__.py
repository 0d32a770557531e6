r"""Observables of relaxed states: energy, stress, pressure, contacts, rattlers, elastic moduli.

Everything takes ``(system, positions, params)`` with a :class:`mdsens.System`
(periodic systems read the box from ``params["box"]``, columns are box
vectors) and options as values (``minimiser=FIRE(...)``,
``adjoint=Implicit(...)``).

- :mod:`~mdsens.observables.virial`: :func:`energy`, :func:`stress`,
  :func:`pressure`, :func:`volume`, differentiable in positions and params; the
  stress is the virial (Cauchy) stress ``(1/V) dE/deps`` of the affine strain
  ``F = I + eps`` of box and positions, tension positive, so a compressed
  packing has ``pressure = -tr(stress)/dim > 0``.
- :mod:`~mdsens.observables.contact_network`: :func:`overlaps` (differentiable),
  :func:`contacts`, :func:`rattlers`, :func:`contact_number`: the contact
  network of soft spheres (params with ``"diameters"``); rattlers are removed
  iteratively (fewer than ``dim + 1`` contacts among the remaining particles).
- :mod:`~mdsens.observables.elasticity`: :func:`elastic_moduli` (the stiffness
  tensor, differentiable), :func:`elastic_response` (with stress, Born term and
  diagnostics), Voigt and Mandel forms, :func:`isotropic_moduli`, all by
  implicit differentiation.
- :mod:`~mdsens.observables.strain`: :func:`strain_response`,
  :func:`finite_difference_moduli`: finite strains with re-relaxation, the
  independent check of the moduli, flagged when the response is not linear.

Sensitivities of any of these (``dp/d epsilon``, ``dG/d diameters``) are
``jax.jvp``/``jax.grad`` of a function that builds ``x* = mdsens.equilibrium(...)``
and evaluates the observable at ``x*`` (:func:`relaxed_observable`).
"""

from mdsens.observables.contact_network import contact_number as contact_number
from mdsens.observables.contact_network import contact_number_and_rattlers as contact_number_and_rattlers
from mdsens.observables.contact_network import contacts as contacts
from mdsens.observables.contact_network import overlaps as overlaps
from mdsens.observables.contact_network import rattlers as rattlers
from mdsens.observables.elasticity import ElasticModuli as ElasticModuli
from mdsens.observables.elasticity import elastic_moduli as elastic_moduli
from mdsens.observables.elasticity import elastic_response as elastic_response
from mdsens.observables.elasticity import from_voigt as from_voigt
from mdsens.observables.elasticity import isotropic_moduli as isotropic_moduli
from mdsens.observables.elasticity import stress_strain_tensor as stress_strain_tensor
from mdsens.observables.elasticity import to_mandel as to_mandel
from mdsens.observables.elasticity import to_voigt as to_voigt
from mdsens.observables.relaxed import relaxed_observable as relaxed_observable
from mdsens.observables.strain import StrainResponse as StrainResponse
from mdsens.observables.strain import finite_difference_moduli as finite_difference_moduli
from mdsens.observables.strain import strain_response as strain_response
from mdsens.observables.strain import strained_state as strained_state
from mdsens.observables.virial import energy as energy
from mdsens.observables.virial import pressure as pressure
from mdsens.observables.virial import stress as stress
from mdsens.observables.virial import volume as volume
