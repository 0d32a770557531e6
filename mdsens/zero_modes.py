"""Zero modes of the Hessian at an equilibrium, and the projector that removes them.

The Hessian ``H`` of a periodic system has ``dim`` zero eigenvalues (rigid
translations); a free cluster adds rotations; a rattler (a particle with no
interactions) adds ``dim`` more. ``H`` is then singular and the sensitivity
``dx*/dtheta = -H^+ dF/dtheta`` is defined by the minimum-norm convention:
no component along any zero mode. Reverse mode needs the same care, because a
cotangent with a component in the null space (e.g. a nonzero mean) makes the
adjoint system ``H u = g`` inconsistent.

:class:`ZeroModes` holds the null space in O(N) memory: a per-coordinate mask
that excludes rattlers, and a few orthonormal rigid-body modes supported on
the remaining particles. Its projector is exactly orthogonal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ZeroModes:
    """Null space of the Hessian, shape-compatible with positions ``(N, dim)``.

    Attributes:
        mask: ``(N, dim)``, 1.0 for coordinates of particles that interact, 0.0
            for rattlers (isolated particles).
        basis: ``(k, N, dim)``, orthonormal rigid-body modes restricted to the
            masked particles; rows of zeros stand for candidates that were not
            zero modes.
    """

    mask: Array
    basis: Array

    def project(self, v: Array) -> Array:
        """Orthogonal projection of ``v`` (flat or ``(N, dim)``) onto the
        complement of the zero modes."""
        shape = v.shape
        v = v.reshape(self.mask.shape) * self.mask
        v = v - jnp.tensordot(jnp.tensordot(self.basis, v, axes=2), self.basis, axes=1)
        return v.reshape(shape)

    @property
    def n_modes(self) -> Array:
        """Number of zero modes: rattler coordinates plus rigid-body modes."""
        rigid = jnp.sum(jnp.any(self.basis != 0, axis=(1, 2)))
        return jnp.sum(1.0 - self.mask).astype(jnp.int32) + rigid


def none(positions: Array) -> ZeroModes:
    """No zero modes: the projector is the identity."""
    return ZeroModes(jnp.ones_like(positions), jnp.zeros((0, *positions.shape), positions.dtype))


def rigid_body_candidates(positions: Array) -> Array:
    """Unit translations along each axis and infinitesimal rotations about the
    centroid (1 in 2D, 3 in 3D), shape ``(k, N, dim)``, not normalised."""
    n, dim = positions.shape
    translations = jnp.broadcast_to(jnp.eye(dim, dtype=positions.dtype)[:, None, :], (dim, n, dim))
    centred = positions - jnp.mean(positions, axis=0)
    planes = [(0, 1)] if dim == 2 else [(0, 1), (0, 2), (1, 2)]
    rotations = []
    for a, b in planes:
        mode = jnp.zeros_like(positions)
        mode = mode.at[:, a].set(-centred[:, b]).at[:, b].set(centred[:, a])
        rotations.append(mode)
    return jnp.concatenate([translations, jnp.stack(rotations)])


def _orthonormalise(candidates: Array, keep: Array) -> Array:
    """Modified Gram-Schmidt over the kept candidates; dropped or dependent
    candidates become rows of zeros (fixed shapes, so it jit-compiles and vmaps)."""
    basis = jnp.zeros_like(candidates)
    for i in range(candidates.shape[0]):
        v = candidates[i] * keep[i]
        v = v - jnp.tensordot(jnp.tensordot(basis, v, axes=2), basis, axes=1)
        norm = jnp.linalg.norm(v)
        scale = jnp.linalg.norm(candidates[i])
        usable = norm > 1e-8 * jnp.where(scale > 0, scale, 1.0)
        basis = basis.at[i].set(jnp.where(usable, v / jnp.where(usable, norm, 1.0), 0.0))
    return basis


def detect(hvp: Callable[[Array], Array], positions: Array, rtol: float = 1e-6) -> ZeroModes:
    """Find the zero modes of ``H`` at ``positions`` from Hessian-vector products.

    - Rattlers: particle ``i`` is isolated if its block of ``H z`` vanishes for a
      random ``z`` (generically it does only if the whole block row of ``H`` is
      zero); ``rtol`` is relative to the largest block.
    - Rigid-body modes: each translation and rotation candidate ``m`` (restricted
      to non-rattlers) is kept if ``|H m| <= rtol * scale * |m|``, where ``scale``
      estimates ``|H|`` from the random probe. Rotations of a periodic system
      fail this test; translations of any translation-invariant energy pass it.

    ``hvp(v)`` must return ``H v`` for ``v`` of the shape of ``positions``. Costs
    one product per candidate plus one (``dim + 2`` in 2D, ``dim + 4`` in 3D).
    """
    # Gaussian, not Rademacher: with +-1 entries a particle whose neighbours all
    # drew its own sign has a zero block of H z (rows of H sum to zero).
    probe = jax.random.normal(jax.random.PRNGKey(0), positions.shape, positions.dtype)
    # Norms of a tiny Hessian (entries ~1e-162) underflow when squared: work with
    # H / s, s = max |H z|, which has the same null space.
    response = hvp(probe)
    unit = jnp.max(jnp.abs(response))
    unit = jnp.where(unit > 0, unit, 1.0)
    response = response / unit
    block_norm = jnp.linalg.norm(response, axis=-1)
    interacting = block_norm > rtol * jnp.max(block_norm)
    mask = jnp.broadcast_to(interacting[:, None], positions.shape).astype(positions.dtype)
    scale = jnp.linalg.norm(response) / jnp.linalg.norm(probe)

    candidates = rigid_body_candidates(positions) * mask
    residuals = jax.vmap(lambda m: jnp.linalg.norm(hvp(m) / unit))(candidates)
    norms = jnp.linalg.norm(candidates.reshape(candidates.shape[0], -1), axis=1)
    keep = (residuals <= rtol * scale * norms) & (norms > 0)
    return ZeroModes(mask, _orthonormalise(candidates, keep))


def hvp_of(energy_fn: Callable[[Array, Any], Array], positions: Array, params: Any) -> Callable[[Array], Array]:
    """``v -> H v``, the Hessian of ``energy_fn`` at ``positions`` applied
    matrix-free (forward over reverse)."""
    gradient = jax.grad(energy_fn)
    return lambda v: jax.jvp(lambda x: gradient(x, params), (positions,), (v,))[1]


#: What derivative methods accept as ``zero_modes``: ``"auto"``, None, or a
#: callable ``(positions, params) -> ZeroModes`` (hashable, unlike arrays).
ZeroModesSpec = Any


def check_spec(zero_modes: ZeroModesSpec, owner: str) -> None:
    if isinstance(zero_modes, ZeroModes) or not (zero_modes in ("auto", None) or callable(zero_modes)):
        raise ValueError(
            f"{owner}: zero_modes must be 'auto', None, or a callable (positions, params) -> "
            f"ZeroModes (for fixed modes: lambda x, p: modes); got {zero_modes!r}."
        )


def modes_at(
    zero_modes: ZeroModesSpec, energy_fn: Callable[[Array, Any], Array], positions: Array, params: Any
) -> ZeroModes:
    """The zero modes at an equilibrium as ``zero_modes`` specifies them:
    detected (``"auto"``), none, or computed by a callable. ``"auto"`` takes
    the energy's own ``energy_fn.zero_modes(positions, params)`` if it declares
    them (energies over coordinates whose translations are not rigid, such as
    :mod:`mdsens.cell`'s joint coordinates)."""
    if isinstance(zero_modes, str):
        if hasattr(energy_fn, "zero_modes"):
            return energy_fn.zero_modes(positions, params)
        return detect(hvp_of(energy_fn, positions, params), positions)
    if zero_modes is None:
        return none(positions)
    return zero_modes(positions, params)
