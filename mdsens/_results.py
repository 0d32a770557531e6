"""One status enumeration for relaxations, linear solves and studies.

Every diagnostic in mdsens stores an integer ``status``; :class:`Status` gives
its name (``Status(code).name``, the ``reason`` strings of results) and a
message for users.
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np


class Status(enum.IntEnum):
    """Why a relaxation or a linear solve stopped."""

    converged = 0
    max_steps = 1
    nonfinite = 2
    neighbor_overflow = 3
    not_converged = 4
    negative_curvature = 5
    singular = 6
    saddle = 7

    @property
    def message(self) -> str:
        return _MESSAGES[self]

    @classmethod
    def names(cls, codes: Any) -> Any:
        """The names of an integer code or array of codes (a str, or a numpy
        array of str for a batch)."""
        names = np.asarray([member.name for member in cls])[np.asarray(codes)]
        return str(names) if names.ndim == 0 else names


_MESSAGES = {
    Status.converged: "converged to its tolerance",
    Status.max_steps: "ran out of steps before reaching the force tolerance (raise max_steps)",
    Status.nonfinite: "the energy or the forces became NaN or infinite",
    Status.neighbor_overflow: (
        "the neighbor list could not hold every interacting pair and could not be "
        "reallocated (under jit or vmap there is no host to reallocate)"
    ),
    Status.not_converged: (
        "the linear solve did not reach its tolerance (raise max_iter, loosen rtol, or check for undeclared zero modes)"
    ),
    Status.negative_curvature: (
        "the linear solve met negative curvature: the Hessian is not positive "
        "semi-definite, so the state is a saddle, not a minimum (relax to a tighter "
        "fmax, or use MINRES to differentiate a saddle on purpose)"
    ),
    Status.singular: (
        "the linear solve met a direction in the numerical null space of the Hessian "
        "that the zero modes do not cover (e.g. floppy modes of a packing below "
        "jamming): CG cannot give the minimum-norm derivative there; use "
        "Implicit(solver=Dense()) for small systems, or declare the zero modes"
    ),
    Status.saddle: (
        "the forces vanish but the Hessian has negative curvature beyond the zero modes: "
        "the state is a saddle or a maximum, not a minimum (perturb the start and relax again)"
    ),
}
