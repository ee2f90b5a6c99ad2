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


INT32_MAX = int(np.iinfo(np.int32).max)
INT32_MIN = int(np.iinfo(np.int32).min)
# Integer dtypes whose every value fits int32; others are checked value by value.
_INT32_SAFE = tuple(np.dtype(t) for t in (np.int8, np.int16, np.int32, np.uint8, np.uint16))


def check_positions(name: str, value: object, *, allow_float: bool = False) -> jax.Array:
    """The one rule for positions, used by every encoding, the attention and the model.

    Positions are integers that fit int32, returned as an int32 array. Arrays of a wider
    integer dtype (int64, uint32, uint64) are accepted when their values are known (not
    traced) and fit; traced ones cannot be checked and raise a TypeError asking for an
    explicit int32 cast. A value outside `[-2^31, 2^31)` raises a ValueError naming
    `name` and the offending range: a silent int32 wrap would turn position `2^31 + 7`
    into `-2^31 + 7`. With `allow_float` (documented per function, e.g. RoPE's fractional
    positions), floating arrays pass through unchanged when finite and within the same
    range (checked when concrete).
    """
    if not isinstance(value, jax.Array | np.ndarray):
        value = np.asarray(value)  # Python ints past int32 must not overflow on the way
    dtype = jnp.result_type(value)
    is_float = jnp.issubdtype(dtype, jnp.floating)
    if not (jnp.issubdtype(dtype, jnp.integer) or (allow_float and is_float)):
        expected = "an integer or floating" if allow_float else "an integer"
        raise TypeError(f"{name} must have {expected} dtype, got {_describe(jnp.asarray(value))}")
    if is_concrete(value):
        values = np.asarray(value)
        if values.size:
            low, high = values.min(), values.max()
            if not (np.isfinite(low) and np.isfinite(high)) or low < INT32_MIN or high > INT32_MAX:
                raise ValueError(
                    f"{name} must lie in [-2^31, 2^31) (int32), got values in [{low}, {high}]; "
                    "positions past int32 would wrap around silently"
                )
    elif not is_float and np.dtype(dtype) not in _INT32_SAFE:
        raise TypeError(
            f"{name} is a traced {np.dtype(dtype).name} array whose values cannot be checked "
            "to fit int32; cast it to int32 explicitly"
        )
    array = jnp.asarray(value) if is_float else jnp.asarray(value).astype(jnp.int32)
    return array


def check_index_range(name: str, value: jax.Array, size: int, size_name: str, hint: str = ""):
    """Raises ValueError when known (not traced) integer `value` leaves `[0, size)`.

    A gather past the end of a table clamps silently (or gives NaN), so indices that
    are known on the host are checked there. Traced values pass unchecked.
    """
    if not is_concrete(value) or not np.size(value):
        return
    # NumPy, not jnp: inside jit, jnp reductions of a concrete array are traced.
    values = np.asarray(value)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= size:
        raise ValueError(
            f"{name} must lie in [0, {size_name}={size}), got values in [{low}, {high}]{hint}"
        )


def saturating_difference(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a - b` for int32 arrays, exact unless it leaves `(-2^31, 2^31)`, then clamped to
    `+-(2^31 - 1)` (an infinitely far distance) instead of wrapping around."""
    a, b = a.astype(jnp.int32), b.astype(jnp.int32)
    difference = a - b
    # Overflow iff a and -b share a sign that the wrapped result does not.
    overflow = ((a >= 0) != (b >= 0)) & ((difference >= 0) != (a >= 0))
    saturated = jnp.where(a >= 0, INT32_MAX, -INT32_MAX).astype(jnp.int32)
    return jnp.maximum(jnp.where(overflow, saturated, difference), -INT32_MAX)


def position_rows(
    name: str,
    value: object,
    *,
    length: int | None = None,
    batch: int | None = None,
    allow_float: bool = False,
) -> jax.Array:
    """The one position normaliser: `[S]` or `[B or 1, S]` positions as `[B or 1, S]`.

    Values follow `check_positions` (int32 integers; floats only with `allow_float`).
    With `length`, the last axis must have it; with `batch`, the first axis must be 1 or
    `batch` (it broadcasts over the activations' batch). Every family, the attention
    and the model read their positions through this function.
    """
    value = check_positions(name, value, allow_float=allow_float)
    check_rank(name, value, (1, 2))
    rows = value[None] if value.ndim == 1 else value
    bad_length = length is not None and rows.shape[-1] != length
    bad_batch = batch is not None and rows.shape[0] not in (1, batch)
    if bad_length or bad_batch:
        size = "S" if length is None else str(length)
        rows_text = "B or 1" if batch is None else f"{batch} or 1"
        raise ValueError(
            f"{name} must have shape [{size}] or [{rows_text}, {size}], got shape "
            f"{tuple(value.shape)}"
        )
    return rows


def check_position_pair(
    q_positions: jax.Array, k_positions: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Query and key positions as int32 arrays `[B or 1, S]` with compatible batch sizes.

    Positions given as `[S]` are read as `[1, S]`; values follow `check_positions`. The
    two batch sizes must be equal, or one of them 1 (it broadcasts).
    """
    q_positions = position_rows("q_positions", q_positions)
    k_positions = position_rows("k_positions", k_positions)
    q_batch, k_batch = q_positions.shape[0], k_positions.shape[0]
    if q_batch != k_batch and 1 not in (q_batch, k_batch):
        raise ValueError(
            "q_positions and k_positions must have the same batch size (or batch size 1), "
            f"got shapes {tuple(q_positions.shape)} and {tuple(k_positions.shape)}"
        )
    return q_positions, k_positions
