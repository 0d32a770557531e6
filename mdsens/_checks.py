"""Input validation shared by the public entry points.

Every check runs on the host before anything is traced or compiled, and
raises ``ValueError`` naming the offending argument (and leaf). Values that
are already tracers (the caller is inside ``jit`` or ``vmap``) can only have
their shapes and dtypes checked.

The rule for numbers (positions, parameters, tangents, sizes): float64 passes
as it is; integers (Python ints, integer arrays) are converted to float64,
which is exact up to ``2**53`` (larger ones are refused); everything else is
refused rather than cast: lower-precision floats (float32 positions would
carry float32 rounding into a force tolerance of 1e-12), bools (a flag is not
a size), complex numbers, strings, None and other objects.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: Integers up to this size convert to float64 exactly.
EXACT_INTEGER = 2**53


def require_x64(caller: str) -> None:
    """Raise if JAX would compute in float32."""
    if not jax.config.read("jax_enable_x64"):
        raise RuntimeError(
            f"{caller} needs float64: call jax.config.update('jax_enable_x64', True) "
            "at the start of your program, before creating any arrays. mdsens does "
            "not switch it on for you, because it changes every JAX computation in "
            "the process."
        )


def is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_dtype(dtype: Any, name: str) -> None:
    if dtype == np.float64 or np.issubdtype(dtype, np.integer):  # numpy's bool is no integer
        return
    if np.issubdtype(dtype, np.floating):
        raise ValueError(
            f"{name} has dtype {dtype}; mdsens computes in float64 and does not cast silently. Pass float64 arrays."
        )
    raise ValueError(f"{name} has dtype {dtype}; expected real numbers (float64, or integers converted exactly).")


def as_float64(x: Any, name: str) -> jax.Array:
    """``x`` (a number, nested sequence or array) as a float64 array, by the
    rule of this module; ``ValueError`` naming ``name`` otherwise."""
    values: Any = x
    if isinstance(x, jax.Array):  # also tracers: only the dtype can be checked
        _check_dtype(x.dtype, name)
    else:
        if x is None or isinstance(x, (str, bytes)):
            raise ValueError(f"{name} must be a number or an array of numbers; got {x!r}.")
        try:
            values = np.asarray(x)
        except (TypeError, ValueError) as error:  # ragged nesting
            raise ValueError(f"{name} must be a number or a rectangular array of numbers ({error}).") from None
        _check_dtype(values.dtype, name)
    if values.dtype == jnp.float64:
        return jnp.asarray(values)
    if is_concrete(values) and np.any(np.abs(np.asarray(values, dtype=np.float64)) > EXACT_INTEGER):
        raise ValueError(f"{name} holds integers beyond 2**53, which float64 cannot represent exactly.")
    return jnp.asarray(values, dtype=jnp.float64)


def check_finite(x: Any, name: str) -> None:
    if is_concrete(x) and not np.all(np.isfinite(np.asarray(x))):
        raise ValueError(f"{name} contains NaN or inf.")


def check_positive(value: Any, name: str) -> None:
    """``value`` (a number or array, by the rule of this module) is finite and
    positive in every entry: sizes and energy scales."""
    values = as_float64(value, name)
    if is_concrete(values) and not np.all(np.isfinite(values) & (np.asarray(values) > 0)):
        raise ValueError(f"{name} must be finite and positive; got {np.asarray(values).tolist()}.")


def check_positions(positions: Any, name: str = "positions") -> jax.Array:
    """Positions must be a finite float64 array of shape (N, dim), N >= 2, dim in {2, 3}."""
    positions = as_float64(positions, name)
    if positions.ndim != 2:
        raise ValueError(f"{name} must have shape (N, dim); got shape {positions.shape}.")
    n, dim = positions.shape
    if dim not in (2, 3):
        raise ValueError(f"{name} must have dim 2 or 3 (shape (N, dim)); got dim={dim}.")
    if n < 2:
        raise ValueError(f"{name} must hold at least 2 particles; got N={n}.")
    check_finite(positions, name)
    return positions


def check_params(params: Any, name: str = "params") -> Any:
    """Convert every leaf of a parameter pytree to float64 and check it is finite."""
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    converted = []
    for path, leaf in leaves_with_paths:
        leaf_name = name + jax.tree_util.keystr(path)
        leaf = as_float64(leaf, leaf_name)
        check_finite(leaf, leaf_name)
        converted.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, converted)
