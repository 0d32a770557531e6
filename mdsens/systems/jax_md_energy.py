"""Any JAX-MD energy as an mdsens energy with named, differentiable parameters.

JAX-MD builds energies in two steps: a constructor takes a displacement
function and the potential's parameters, and returns ``energy_fn(R)``
(``jax_md.energy.gupta_potential``, ``soft_sphere_pair``, ``morse_pair``,
``tersoff``, ...). :class:`JaxMDEnergy` calls the constructor inside every
evaluation with the entries of ``params`` as its keyword arguments, so each
entry is differentiable like any mdsens parameter::

    from jax_md import energy
    fn = JaxMDEnergy(energy.gupta_potential, fixed=(("cutoff", 8.0),))
    system = mdsens.System.from_energy(fn, {"p": 10.15, ..., "box": box}, positions, box=box)
    mdsens.equilibrium_jvp(system, system.params, tangent)     # d x* / d p, ...

``params["box"]`` (if present) is the periodic box, read at call time: a
``(dim, dim)`` matrix whose columns are the box vectors (minimum image; no
``"box"``: free space). Constructors that run Python control flow on a
parameter's value cannot take it as a traced parameter: pass it in ``fixed``.

Precision: JAX-MD casts Python floats to float32 (``jax_md.util.maybe_downcast``)
but keeps float64 arrays. ``params`` are float64 arrays (``System.from_energy``
converts them) and :class:`JaxMDEnergy` converts the floats in ``fixed``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax_md import space

from mdsens.systems.space import periodic_space

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class JaxMDEnergy:
    """``energy(positions, params) = factory(displacement, **params, **fixed)(positions)``
    with ``params["box"]`` (if any) in the displacement instead of the keywords.

    Attributes:
        factory: a JAX-MD energy constructor ``factory(displacement, **kwargs) -> energy_fn``.
        fixed: ``(name, value)`` pairs of keyword arguments that are not
            parameters (a cutoff, a flag); hashable values. Floats are passed
            as float64 arrays.

    Equal instances are equal functions (one compilation per constructor and
    ``fixed``)."""

    factory: Callable[..., Callable[..., Array]]
    fixed: tuple[tuple[str, Any], ...] = ()

    def __call__(self, positions: Array, params: dict[str, Array]) -> Array:
        params = dict(params)
        box = params.pop("box", None)
        if box is None:
            displacement = space.free()[0]
        else:
            displacement = functools.partial(periodic_space(1.0, positions.shape[1])[1], box=box)
        fixed = {
            name: jnp.asarray(value, jnp.float64) if isinstance(value, float) else value for name, value in self.fixed
        }
        return self.factory(displacement, **params, **fixed)(positions)
