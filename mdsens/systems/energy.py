"""The energy protocol: how relaxations and derivatives talk to an energy.

An energy is called as ``energy(positions, params) -> scalar``. Energies that
carry state between evaluations (a neighbor list) expose it through five
methods, trivial for plain energies (:class:`FunctionEnergy`, whose state is
None):

- ``allocate(positions, params, extra_capacity=0) -> aux``: on the host, with
  concrete arrays (may size buffers);
- ``build(positions, params) -> aux``: traceable, with the capacity chosen
  when the energy was made (what code under ``jit`` uses);
- ``update(aux, positions, params) -> aux``: traceable, before every evaluation;
- ``valid(aux) -> bool array``: whether ``aux`` can be trusted;
- ``bind(aux) -> energy_fn(positions, params)``: the energy with ``aux``
  frozen (NaN, with NaN derivatives, when ``aux`` is invalid);

plus ``trim(aux) -> aux`` (on the host: ``aux`` without the spare capacity
its contents do not need, its terms in the same order), ``freeze(positions,
params) -> aux`` (on the host: the tightest ``aux`` exact for derivatives at
one state), ``hessian_blocks(positions, params)`` and
``hessian_diagonal(positions, params)`` (the Hessian's per-particle diagonal
blocks and its diagonal, for preconditioners) and ``diagnostics(aux) -> dict``.
No caller branches on the energy's type.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

Array = jax.Array
EnergyFn = Callable[[Array, Any], Array]


@runtime_checkable
class Energy(Protocol):
    def __call__(self, positions: Array, params: Any) -> Array: ...

    def allocate(self, positions: Array, params: Any, extra_capacity: int = 0) -> Any: ...

    def build(self, positions: Array, params: Any) -> Any: ...

    def update(self, aux: Any, positions: Array, params: Any) -> Any: ...

    def valid(self, aux: Any) -> Array: ...

    def bind(self, aux: Any) -> EnergyFn: ...

    def trim(self, aux: Any) -> Any: ...

    def freeze(self, positions: Array, params: Any) -> Any: ...

    def hessian_blocks(self, positions: Array, params: Any) -> Array: ...

    def hessian_diagonal(self, positions: Array, params: Any) -> Array: ...

    def diagnostics(self, aux: Any) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class FunctionEnergy:
    """A plain energy function ``fn(positions, params) -> scalar`` seen through
    the protocol: no state. Equal functions give equal energies (one
    compilation)."""

    fn: EnergyFn

    def __call__(self, positions: Array, params: Any) -> Array:
        return self.fn(positions, params)

    def allocate(self, positions: Array, params: Any, extra_capacity: int = 0) -> None:
        return None

    def build(self, positions: Array, params: Any) -> None:
        return None

    def update(self, aux: None, positions: Array, params: Any) -> None:
        return None

    def valid(self, aux: None) -> Array:
        return jnp.asarray(True)

    def bind(self, aux: None) -> EnergyFn:
        return self.fn

    def trim(self, aux: None) -> None:
        return None

    def freeze(self, positions: Array, params: Any) -> None:
        return None

    def hessian_blocks(self, positions: Array, params: Any, batch_size: int = 64) -> Array:
        r"""Exact per-particle diagonal blocks of the Hessian,
        :math:`\partial^2 E / \partial x_k \partial x_k^T`, shape ``(N, dim, dim)``,
        from ``N dim`` Hessian-vector products (``batch_size`` at a time): what
        forming the dense Hessian costs, for small systems."""
        return _hessian_blocks(self.fn, positions, params, max(1, batch_size // positions.shape[1]))

    def hessian_diagonal(self, positions: Array, params: Any, batch_size: int = 64) -> Array:
        """Exact diagonal of the Hessian, shape ``(N, dim)``: the diagonals of
        :meth:`hessian_blocks`."""
        return jnp.diagonal(self.hessian_blocks(positions, params, batch_size), axis1=-2, axis2=-1)

    def diagnostics(self, aux: None) -> dict[str, Any]:
        return {}


@jax.jit(static_argnums=(0, 3))
def _hessian_blocks(fn: EnergyFn, positions: Array, params: Any, batch_size: int) -> Array:
    gradient = jax.grad(fn)
    dim = positions.shape[1]

    def block(k: Array) -> Array:
        def column(a: int) -> Array:
            e = jnp.zeros_like(positions).at[k, a].set(1.0)
            return jax.jvp(lambda x: gradient(x, params), (positions,), (e,))[1][k]

        return jnp.stack([column(a) for a in range(dim)], axis=1)

    return jax.lax.map(block, jnp.arange(positions.shape[0]), batch_size=batch_size)


def as_energy(energy: Energy | EnergyFn) -> Energy:
    """An :class:`Energy` as it is, a plain function wrapped in :class:`FunctionEnergy`."""
    if isinstance(energy, Energy):
        return energy
    if not callable(energy):
        raise ValueError(f"energy must be a function energy(positions, params) or an Energy; got {energy!r}.")
    return FunctionEnergy(energy)
