"""Input validation shared by the public entry points.

Every check runs on the host before anything is traced or compiled, and names
the offending argument. Values that are already tracers (the caller is inside
``jit`` or ``vmap``) can only have their shapes and dtypes checked.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def require_x64(caller: str) -> None:
    """Raise if JAX would compute in float32."""
    if not jax.config.jax_enable_x64:
        raise RuntimeError(
            f"{caller} needs float64: call jax.config.update('jax_enable_x64', True) "
            "at the start of your program, before creating any arrays. mdsens does "
            "not switch it on for you, because it changes every JAX computation in "
            "the process."
        )


def is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def as_float64(x: Any, name: str) -> jax.Array:
    """Convert a scalar, list or array to float64 without silent downcasts."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and dtype != jnp.float64:
        raise ValueError(
            f"{name} has dtype {dtype}; mdsens computes in float64 and does not "
            "cast silently. Pass float64 arrays."
        )
    if dtype is not None and not (
        jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
    ):
        raise ValueError(f"{name} has dtype {dtype}; expected a real number array.")
    return jnp.asarray(x, dtype=jnp.float64)


def check_finite(x: Any, name: str) -> None:
    if is_concrete(x) and not np.all(np.isfinite(np.asarray(x))):
        raise ValueError(f"{name} contains NaN or inf.")


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


def check_positive(value: Any, name: str) -> None:
    if is_concrete(value) and not np.all(np.asarray(value) > 0):
        raise ValueError(f"{name} must be positive; got {np.asarray(value)}.")


def check_choice(value: str, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}.")


def check_relax_options(fmax: float, max_steps: int, dt_max: float) -> None:
    """The relaxation's tolerance, step budget and time step."""
    for name, value in (("fmax", fmax), ("dt_max", dt_max)):
        if not np.isfinite(value):
            raise ValueError(f"{name} must be finite; got {value}.")
        check_positive(value, name)
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ValueError(f"max_steps must be an integer >= 1; got {max_steps!r}.")
