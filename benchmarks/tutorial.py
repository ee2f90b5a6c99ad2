"""Positional encodings written by hand the way tutorials write them, in plain JAX.

These are the baselines the library is compared against (`÷ tutorial` in the tables),
so the gain of the library shows as a ratio. They follow the forms users copy from
blog posts and reference code, not the library's:

* the sinusoidal table of "The Annotated Transformer" (exp/log frequencies, strided
  writes into a zero table);
* RoPE computing its frequencies, sin and cos inside the forward pass on every call,
  with the concatenated `[freqs, freqs]` table and `rotate_half` built by concatenation
  (the Llama / GPT-NeoX form; partial rotary slices and concatenates again), or with a
  complex multiply (RoFormer / the original Llama reference code) for the interleaved
  layout;
* ALiBi as an explicit `[H, L, L]` bias table added to full softmax attention.

They compute in the input's dtype where the tutorials do (cos and sin are cast to the
activations' dtype before the rotation), so in bf16 they are less accurate than the
library; the benchmark compares speed only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def sinusoidal_table(positions: jax.Array, dim: int, base: float = 10000.0) -> jax.Array:
    """`[L, dim]` interleaved sin/cos table for positions `[L]`, tutorial style."""
    position = positions.astype(jnp.float32)[:, None]
    div_term = jnp.exp(jnp.arange(0, dim, 2, dtype=jnp.float32) * (-math.log(base) / dim))
    table = jnp.zeros((positions.shape[0], dim), jnp.float32)
    table = table.at[:, 0::2].set(jnp.sin(position * div_term))
    return table.at[:, 1::2].set(jnp.cos(position * div_term))


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope_rotate_half(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """RoPE, half layout: x `[B, S, H, D]`, positions `[B, S]`; sin/cos built per call."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    return x * cos + _rotate_half(x) * sin


def rope_partial(
    x: jax.Array, positions: jax.Array, rotary_dim: int, base: float = 10000.0
) -> jax.Array:
    """Partial RoPE (GPT-NeoX `rotary_pct`): rotate the first `rotary_dim` features, concatenate."""
    rotated = rope_rotate_half(x[..., :rotary_dim], positions, base)
    return jnp.concatenate([rotated, x[..., rotary_dim:]], axis=-1)


def rope_complex(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """RoPE, interleaved layout, as a complex multiply: pairs (2i, 2i+1) are complex numbers."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    rotation = jnp.exp(1j * freqs)[:, :, None, :]
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], dim // 2, 2)
    rotated = jax.lax.complex(pairs[..., 0], pairs[..., 1]) * rotation
    return jnp.stack([rotated.real, rotated.imag], axis=-1).reshape(x.shape).astype(x.dtype)


def alibi_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True):
    """Causal softmax attention with an explicit `[H, L, L]` ALiBi table (power-of-2 heads).

    q, k, v: `[B, L, H, D]`; returns `[B, L, H, D]`.
    """
    length, heads, dim = q.shape[1], q.shape[2], q.shape[3]
    slopes = 2.0 ** (-8.0 * jnp.arange(1, heads + 1, dtype=jnp.float32) / heads)
    distance = jnp.arange(length)[None, :] - jnp.arange(length)[:, None]
    bias = -slopes[:, None, None] * jnp.abs(distance)[None].astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(dim)
    logits = logits + bias[None]
    if causal:
        logits = jnp.where(distance[None, None] > 0, -jnp.inf, logits)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
