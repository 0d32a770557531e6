"""Option values: frozen dataclasses that are also pytrees.

Minimisers, linear solvers, preconditioners and derivative methods are
values. Equal values compare and hash equal; as pytrees, their numbers are
leaves, so ``jit`` compiles once per kind of option and not once per number.
Unflattening (inside JAX transformations, where leaves are tracers) skips
validation, which runs only when a user builds a value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar, dataclass_transform

import jax
import numpy as np

T = TypeVar("T")


@dataclass_transform(frozen_default=True)
def option(static: tuple[str, ...] = ()) -> Callable[[type[T]], type[T]]:
    """Class decorator: a frozen dataclass registered as a pytree whose fields
    named in ``static`` are hashable metadata and the others children."""

    def wrap(cls: type[T]) -> type[T]:
        cls = dataclasses.dataclass(frozen=True)(cls)
        names = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        children = tuple(name for name in names if name not in static)

        def flatten(value: Any) -> tuple[list[Any], tuple[Any, ...]]:
            return [getattr(value, n) for n in children], tuple(getattr(value, n) for n in static)

        def unflatten(meta: tuple[Any, ...], leaves: list[Any]) -> Any:
            value = object.__new__(cls)
            for name, leaf in zip(children, leaves, strict=False):
                object.__setattr__(value, name, leaf)
            for name, item in zip(static, meta, strict=False):
                object.__setattr__(value, name, item)
            return value

        jax.tree_util.register_pytree_node(cls, flatten, unflatten)
        return cls

    return wrap


def set_field(value: Any, name: str, item: Any) -> None:
    """Normalise a field in ``__post_init__`` of a frozen option."""
    object.__setattr__(value, name, item)


def positive_float(value: Any, name: str, owner: str) -> float:
    """A finite positive Python float (numpy scalars are converted, so that equal
    options hash equal)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{owner}: {name} must be a number; got {value!r}.")
    value = float(value)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{owner}: {name} must be finite and positive; got {value!r}.")
    return value


def nonnegative_float(value: Any, name: str, owner: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{owner}: {name} must be a number; got {value!r}.")
    value = float(value)
    if not (np.isfinite(value) and value >= 0):
        raise ValueError(f"{owner}: {name} must be finite and non-negative; got {value!r}.")
    return value


def count(value: Any, name: str, owner: str, minimum: int = 1) -> int:
    """An integer in ``[minimum, 2**31 - 1]`` (loop counters are int32)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{owner}: {name} must be an integer; got {value!r}.")
    value = int(value)
    if not minimum <= value <= np.iinfo(np.int32).max:
        raise ValueError(f"{owner}: {name} must be an integer in [{minimum}, 2**31 - 1]; got {value}.")
    return value
