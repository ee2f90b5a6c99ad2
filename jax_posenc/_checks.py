"""Shared argument validation: every public function reports bad input the same way.

Each helper raises a `ValueError` or `TypeError` whose message names the argument,
the value received and what was expected, so errors read like documentation.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _describe(value: object) -> str:
    if isinstance(value, jax.Array | np.ndarray):
        return f"array of shape {tuple(value.shape)} and dtype {value.dtype}"
    return repr(value)


def check_int(name: str, value: object) -> int:
    """Returns `value` as an int; raises TypeError unless it is a true integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {_describe(value)}")
    return int(value)


def check_positive_int(name: str, value: object) -> int:
    """Returns `value` as an int; raises unless it is an integer > 0."""
    value = check_int(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return value


def check_even_positive_int(name: str, value: object) -> int:
    """Returns `value` as an int; raises unless it is an even integer > 0."""
    value = check_positive_int(name, value)
    if value % 2:
        raise ValueError(f"{name} must be even (features come in sin/cos pairs), got {value}")
    return value


def check_min_int(name: str, value: object, minimum: int) -> int:
    """Returns `value` as an int; raises unless it is an integer >= `minimum`."""
    value = check_int(name, value)
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def check_positive_float(name: str, value: object) -> float:
    """Returns `value` as a float; raises unless it is a finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_describe(value)}")
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_choice(name: str, value: object, choices: Collection[str]) -> str:
    """Returns `value`; raises ValueError unless it is one of `choices`."""
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value  # type: ignore[return-value]


def check_integer_array(name: str, value: jax.Array) -> jax.Array:
    """Raises TypeError unless `value` is an array (or array-like) of integer dtype."""
    dtype = jnp.result_type(value)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {_describe(jnp.asarray(value))}")
    return jnp.asarray(value)


def check_real_array(name: str, value: jax.Array) -> jax.Array:
    """Raises TypeError unless `value` has an integer or floating dtype."""
    dtype = jnp.result_type(value)
    if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        raise TypeError(
            f"{name} must have an integer or floating dtype, got {_describe(jnp.asarray(value))}"
        )
    return jnp.asarray(value)


def check_floating_array(name: str, value: jax.Array) -> jax.Array:
    """Raises TypeError unless `value` has a floating dtype."""
    dtype = jnp.result_type(value)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {_describe(jnp.asarray(value))}")
    return jnp.asarray(value)


def check_rank(name: str, value: jax.Array, ranks: int | Sequence[int]) -> None:
    """Raises ValueError unless `value.ndim` is one of `ranks`."""
    allowed = (ranks,) if isinstance(ranks, int) else tuple(ranks)
    if jnp.ndim(value) not in allowed:
        expected = " or ".join(str(r) for r in allowed)
        raise ValueError(
            f"{name} must have rank {expected}, got {_describe(jnp.asarray(value))} "
            f"(rank {jnp.ndim(value)})"
        )


def is_concrete(value: object) -> bool:
    """True when `value` holds known numbers (not a tracer inside jit/vmap/grad)."""
    return not isinstance(value, jax.core.Tracer)


def check_position_pair(
    q_positions: jax.Array, k_positions: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Query and key positions as integer arrays `[B or 1, S]` with compatible batch sizes.

    Positions given as `[S]` are read as `[1, S]`. The two batch sizes must be equal, or
    one of them 1 (it broadcasts).
    """
    pair = []
    for name, value in (("q_positions", q_positions), ("k_positions", k_positions)):
        value = check_integer_array(name, value)
        check_rank(name, value, (1, 2))
        pair.append(value[None] if value.ndim == 1 else value)
    q_positions, k_positions = pair
    q_batch, k_batch = q_positions.shape[0], k_positions.shape[0]
    if q_batch != k_batch and 1 not in (q_batch, k_batch):
        raise ValueError(
            "q_positions and k_positions must have the same batch size (or batch size 1), "
            f"got shapes {tuple(q_positions.shape)} and {tuple(k_positions.shape)}"
        )
    return q_positions, k_positions
