r"""Per-particle Hessian blocks for :class:`mdsens.linear_solve.BlockJacobi`.

The block of particle ``k`` is :math:`H_{kk} = \partial^2 E / \partial x_k \partial x_k^T`
(``dim x dim``). For a neighbor-list energy it is summed pair by pair in O(N)
(:func:`mdsens.neighbors.pair_sum.hessian_blocks`, with a list built at the
positions); for any other energy it is read from ``N dim`` Hessian-vector
products (as :meth:`mdsens.System.hessian_diagonal`), which costs what
forming the dense Hessian costs: for small systems.

.. code-block:: python

    from mdsens.preconditioners import hessian_blocks

    solver = mdsens.CG(preconditioner=mdsens.linear_solve.BlockJacobi(hessian_blocks(system, x)))
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mdsens.neighbors import pair_sum
from mdsens.neighbors.energy import NeighborListEnergy, _standalone
from mdsens.systems import System

Array = jax.Array


def hessian_blocks(system: System, positions: Any = None, params: Any = None) -> Array:
    """Exact per-particle diagonal blocks of the Hessian at ``positions`` (default
    the system's) and ``params``, shape ``(N, dim, dim)``; O(N) for neighbor
    lists (NaN and a ``RuntimeWarning`` if the list built there cannot hold the
    pairs)."""
    positions, params = system.inputs(positions, params)
    energy = system.energy
    if isinstance(energy, NeighborListEnergy):
        return _standalone(energy, pair_sum.hessian_blocks, positions, params)
    return _blocks_from_products(energy, positions, params)


@jax.jit(static_argnums=0)
def _blocks_from_products(energy_fn: Any, positions: Array, params: Any) -> Array:
    n, dim = positions.shape
    gradient = jax.grad(energy_fn)

    def block(k: Array) -> Array:
        def column(a: int) -> Array:
            e = jnp.zeros_like(positions).at[k, a].set(1.0)
            return jax.jvp(lambda x: gradient(x, params), (positions,), (e,))[1][k]

        return jnp.stack([column(a) for a in range(dim)], axis=1)

    return jax.lax.map(block, jnp.arange(n), batch_size=min(n, 64))
