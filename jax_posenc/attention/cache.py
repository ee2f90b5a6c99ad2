"""A small KV cache for token-by-token decoding with positional terms.

Keys are stored as attention reads them (already rotated by RoPE / scaled by xPos at
their own positions), with their positions, so biases and causality see where every
cached token sits.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jax_posenc import _checks
from jax_posenc._protocols import BiasFn, RelativeTerms
from jax_posenc.attention.core import batched_ids, dot_product_attention


class KVCache(NamedTuple):
    """Keys, values and key positions of the tokens decoded so far.

    Keys are stored as attention reads them, i.e. already rotated by RoPE / scaled by
    xPos at their own positions; positions are kept for biases and causality.

    Attributes:
      keys: `[B, max_length, Hkv, D]`.
      values: `[B, max_length, Hkv, Dv]`.
      positions: int32 `[B, max_length]`.
      length: int32 scalar, the number of filled slots (shared by the batch).
    """

    keys: jax.Array
    values: jax.Array
    positions: jax.Array
    length: jax.Array


def init_cache(
    batch_size: int,
    max_length: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    value_dim: int | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> KVCache:
    """An empty `KVCache` with room for `max_length` tokens per row."""
    batch_size = _checks.check_positive_int("batch_size", batch_size)
    max_length = _checks.check_positive_int("max_length", max_length)
    num_kv_heads = _checks.check_positive_int("num_kv_heads", num_kv_heads)
    head_dim = _checks.check_positive_int("head_dim", head_dim)
    value_dim = (
        head_dim if value_dim is None else _checks.check_positive_int("value_dim", value_dim)
    )
    return KVCache(
        jnp.zeros((batch_size, max_length, num_kv_heads, head_dim), dtype),
        jnp.zeros((batch_size, max_length, num_kv_heads, value_dim), dtype),
        jnp.zeros((batch_size, max_length), jnp.int32),
        jnp.zeros((), jnp.int32),
    )


def update_cache(
    cache: KVCache, keys: jax.Array, values: jax.Array, positions: jax.Array
) -> KVCache:
    """Appends `T` new tokens after the `cache.length` stored ones.

    Args:
      cache: the current cache.
      keys: `[B, T, Hkv, D]`, already transformed (RoPE / xPos) at `positions`.
      values: `[B, T, Hkv, Dv]`.
      positions: integer `[T]` or `[B, T]` positions of the new tokens.

    Returns:
      The cache with the new tokens in slots `[length, length + T)`. A concrete length
      that would overflow `max_length` raises; under jit the caller must keep
      `length + T <= max_length` (a write past the end would be clipped by
      `lax.dynamic_update_slice`).
    """
    batch, max_length = cache.positions.shape
    new = keys.shape[1]
    for name, x, cached in (("keys", keys, cache.keys), ("values", values, cache.values)):
        _checks.check_rank(name, x, 4)
        if x.shape[0] != batch or x.shape[2:] != cached.shape[2:]:
            raise ValueError(
                f"{name} must have shape [{batch}, T, {', '.join(map(str, cached.shape[2:]))}] "
                f"to fit the cache, got {tuple(x.shape)}"
            )
    if values.shape[1] != new:
        raise ValueError(f"keys and values must hold the same T, got {keys.shape}, {values.shape}")
    positions = jnp.broadcast_to(batched_ids("positions", positions, new, batch), (batch, new))
    if _checks.is_concrete(cache.length) and int(cache.length) + new > max_length:
        raise ValueError(
            f"the cache holds {int(cache.length)} of max_length={max_length} tokens and "
            f"cannot take {new} more"
        )
    start = cache.length
    return KVCache(
        lax.dynamic_update_slice(cache.keys, keys.astype(cache.keys.dtype), (0, start, 0, 0)),
        lax.dynamic_update_slice(cache.values, values.astype(cache.values.dtype), (0, start, 0, 0)),
        lax.dynamic_update_slice(cache.positions, positions, (0, start)),
        start + new,
    )


def cached_attention(
    q: jax.Array,
    cache: KVCache,
    *,
    q_positions: jax.Array,
    bias_fn: BiasFn | None = None,
    relative_terms: RelativeTerms | None = None,
    causal: bool = True,
    implementation: str = "auto",
    block_size: int | tuple[int, int] | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Attention of new queries over the filled slots of `cache`.

    Call `update_cache` with the new tokens' keys first, so they attend to themselves.
    Empty slots are masked with an O(max_length) mask; biases read `cache.positions`.

    Args:
      q: `[B, T, H, D]`, already transformed (RoPE / xPos) at `q_positions`.
      cache: a `KVCache`.
      q_positions: integer `[T]` or `[B, T]`.
      bias_fn, relative_terms, causal, implementation, block_size, scale: as in
        `dot_product_attention`.

    Returns:
      `[B, T, H, Dv]` in the dtype of `q`.
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    filled = jnp.arange(cache.positions.shape[1]) < cache.length
    return dot_product_attention(
        q,
        cache.keys,
        cache.values,
        bias_fn=bias_fn,
        relative_terms=relative_terms,
        q_positions=q_positions,
        k_positions=cache.positions,
        mask=filled[None, None, None, :],
        causal=causal,
        implementation=implementation,
        block_size=block_size,
        scale=scale,
    )
