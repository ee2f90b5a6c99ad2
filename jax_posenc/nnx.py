"""Flax NNX counterparts of the linen modules, calling the same pure functions.

Usage::

    from jax_posenc import nnx as pe_nnx
    emb = pe_nnx.LearnedEmbedding(512, 64, rngs=nnx.Rngs(0))

Each class holds the same parameters under the same names as its linen twin, so a
linen parameter tree can be copied in (`emb.embedding[...] = params["embedding"]`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_posenc import _checks, absolute


class SinusoidalEmbedding(nnx.Module):
    """NNX twin of `jax_posenc.SinusoidalEmbedding` (no parameters)."""

    def __init__(
        self,
        features: int,
        *,
        base: float = 10000.0,
        layout: str = "interleaved",
        dtype: jnp.dtype = jnp.float32,
        angle_precision: str = "exact",
    ):
        self.features = _checks.check_even_positive_int("features", features)
        self.base = _checks.check_positive_float("base", base)
        self.layout = _checks.check_choice("layout", layout, absolute.SINUSOIDAL_LAYOUTS)
        self.dtype = dtype
        self.angle_precision = angle_precision

    def __call__(self, positions: jax.Array) -> jax.Array:
        return absolute.sinusoidal_encoding(
            positions,
            self.features,
            base=self.base,
            layout=self.layout,
            dtype=self.dtype,
            angle_precision=self.angle_precision,
        )


class LearnedEmbedding(nnx.Module):
    """NNX twin of `jax_posenc.LearnedEmbedding`; parameter `embedding`."""

    def __init__(
        self,
        num_positions: int,
        features: int,
        *,
        rngs: nnx.Rngs,
        mode: str = "error",
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        embedding_init: nnx.Initializer | None = None,
    ):
        num_positions = _checks.check_positive_int("num_positions", num_positions)
        features = _checks.check_positive_int("features", features)
        self.mode = _checks.check_choice("mode", mode, absolute.LOOKUP_MODES)
        self.dtype = dtype
        embedding_init = embedding_init or absolute.learned_embedding_init()
        self.embedding = nnx.Param(
            embedding_init(rngs.params(), (num_positions, features), param_dtype)
        )

    def __call__(self, positions: jax.Array) -> jax.Array:
        table = self.embedding[...]
        return absolute.learned_embedding_lookup(table, positions, mode=self.mode).astype(
            self.dtype
        )
