"""Flax NNX counterparts of the linen modules, calling the same pure functions.

Usage::

    from jax_posenc import nnx as pe_nnx
    emb = pe_nnx.LearnedEmbedding(512, 64, rngs=nnx.Rngs(0))

Each class holds the same parameters under the same names as its linen twin, so a
linen parameter tree can be copied in (`emb.embedding[...] = params["embedding"]`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import bridge

from jax_posenc import _checks, absolute, attention, bias, registry, relative, rope


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
        mode: str = "clip",
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


# ---- relative positions and attention biases (ALiBi, T5, KERPLE, FIRE, DPB, Shaw, XL)


def _mlp_parameters(module: nnx.Module, shapes, rngs: nnx.Rngs) -> None:
    """Sets `kernel_i` / `bias_i` parameters, named as in the linen modules."""
    for i, shape in enumerate(shapes):
        kernel = bias.mlp_kernel_init(rngs.params(), shape, jnp.float32)
        setattr(module, f"kernel_{i}", nnx.Param(kernel))
        setattr(module, f"bias_{i}", nnx.Param(bias.mlp_bias_init(None, (shape[1],))))


def _mlp_layers(module: nnx.Module, count: int) -> tuple[tuple[jax.Array, jax.Array], ...]:
    return tuple(
        (getattr(module, f"kernel_{i}")[...], getattr(module, f"bias_{i}")[...])
        for i in range(count)
    )


class AlibiBias(nnx.Module):
    """NNX twin of `jax_posenc.AlibiBias` (no parameters)."""

    def __init__(
        self,
        num_heads: int,
        *,
        slopes: tuple[float, ...] | None = None,
        form: str = "symmetric",
    ):
        self.slopes = tuple(float(s) for s in bias.alibi_module_slopes(num_heads, slopes))
        self.form = _checks.check_choice("form", form, bias.ALIBI_FORMS)

    def bias_fn(self):
        """Pure `bias_fn(q_positions, k_positions) -> [B or 1, H, bq, bk]`."""
        return functools.partial(bias.alibi_bias, slopes=self.slopes, form=self.form)

    def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
        return self.bias_fn()(q_positions, k_positions)


class T5RelativePositionBias(nnx.Module):
    """NNX twin of `jax_posenc.T5RelativePositionBias`; parameter `relative_attention_bias`."""

    def __init__(
        self,
        num_heads: int,
        *,
        rngs: nnx.Rngs,
        num_buckets: int = 32,
        max_distance: int = 128,
        bidirectional: bool = True,
        embedding_init: nnx.Initializer | None = None,
    ):
        num_heads = _checks.check_positive_int("num_heads", num_heads)
        bias.check_t5_bucket_settings(bidirectional, num_buckets, max_distance)
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        embedding_init = embedding_init or bias.t5_bias_init()
        self.relative_attention_bias = nnx.Param(
            embedding_init(rngs.params(), (num_buckets, num_heads), jnp.float32)
        )

    def bias_fn(self):
        """Pure `bias_fn(q_positions, k_positions)` closing over the table."""
        return functools.partial(
            bias.t5_bias,
            self.relative_attention_bias[...],
            bidirectional=self.bidirectional,
            max_distance=self.max_distance,
        )

    def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
        return self.bias_fn()(q_positions, k_positions)


class KerpleBias(nnx.Module):
    """NNX twin of `jax_posenc.KerpleBias`; parameters `r1_unconstrained`, `r2_unconstrained`.

    The initialisation is deterministic (see `bias.kerple_initial_parameters`), so no
    random keys are needed.
    """

    def __init__(self, num_heads: int, *, variant: str = "log"):
        r1, r2 = bias.kerple_initial_parameters(num_heads, variant)
        self.variant = variant
        self.r1_unconstrained = nnx.Param(jnp.asarray(r1, jnp.float32))
        self.r2_unconstrained = nnx.Param(jnp.asarray(r2, jnp.float32))

    def bias_fn(self):
        """Pure `bias_fn(q_positions, k_positions)` closing over the constrained parameters."""
        return bias.kerple_bias_fn(
            self.r1_unconstrained[...], self.r2_unconstrained[...], variant=self.variant
        )

    def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
        return self.bias_fn()(q_positions, k_positions)


class FireBias(nnx.Module):
    """NNX twin of `jax_posenc.FireBias`; `log_c`, `log_threshold`, `kernel_i`, `bias_i`."""

    def __init__(
        self,
        num_heads: int,
        *,
        rngs: nnx.Rngs,
        hidden_features: int = 32,
        num_hidden_layers: int = 1,
        init_c: float = 0.1,
        init_threshold: float = 512.0,
    ):
        shapes = bias.mlp_layer_shapes(hidden_features, num_hidden_layers, num_heads)
        log_c, log_threshold = bias.fire_initial_parameters(init_c, init_threshold)
        self.log_c = nnx.Param(jnp.asarray(log_c, jnp.float32))
        self.log_threshold = nnx.Param(jnp.asarray(log_threshold, jnp.float32))
        self.num_layers = len(shapes)
        _mlp_parameters(self, shapes, rngs)

    def bias_fn(self):
        """Pure `bias_fn(q_positions, k_positions)` closing over the parameters."""
        return bias.fire_bias_fn(
            _mlp_layers(self, self.num_layers), self.log_c[...], self.log_threshold[...]
        )

    def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
        return self.bias_fn()(q_positions, k_positions)


class DynamicPositionBias(nnx.Module):
    """NNX twin of `jax_posenc.DynamicPositionBias`; parameters `kernel_i`, `bias_i`."""

    def __init__(
        self,
        num_heads: int,
        *,
        rngs: nnx.Rngs,
        hidden_features: int = 64,
        num_hidden_layers: int = 2,
        log_distance: bool = True,
        absolute: bool = False,
    ):
        shapes = bias.mlp_layer_shapes(hidden_features, num_hidden_layers, num_heads)
        self.log_distance = log_distance
        self.absolute = absolute
        self.num_layers = len(shapes)
        _mlp_parameters(self, shapes, rngs)

    def bias_fn(self):
        """Pure `bias_fn(q_positions, k_positions)` closing over the MLP parameters."""
        return functools.partial(
            bias.dynamic_position_bias,
            layers=_mlp_layers(self, self.num_layers),
            log_distance=self.log_distance,
            absolute=self.absolute,
        )

    def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
        return self.bias_fn()(q_positions, k_positions)


class RelativePositionEmbedding(nnx.Module):
    """NNX twin of `jax_posenc.RelativePositionEmbedding`; `key_embedding`, `value_embedding`."""

    def __init__(
        self,
        head_dim: int,
        *,
        rngs: nnx.Rngs,
        max_relative_position: int = 16,
        value_dim: int | None = None,
        use_value_term: bool = True,
        embedding_init: nnx.Initializer | None = None,
    ):
        head_dim = _checks.check_positive_int("head_dim", head_dim)
        radius = _checks.check_positive_int("max_relative_position", max_relative_position)
        embedding_init = embedding_init or relative.shaw_embedding_init()
        rows = 2 * radius + 1
        self.key_embedding = nnx.Param(embedding_init(rngs.params(), (rows, head_dim)))
        self.use_value_term = use_value_term
        if use_value_term:
            value_dim = head_dim if value_dim is None else value_dim
            value_dim = _checks.check_positive_int("value_dim", value_dim)
            self.value_embedding = nnx.Param(embedding_init(rngs.params(), (rows, value_dim)))

    def terms(self):
        """`RelativeTerms` with the key term and (optionally) the value term."""
        value_table = self.value_embedding[...] if self.use_value_term else None
        return relative.shaw_terms(self.key_embedding[...], value_table)

    def __call__(
        self, q: jax.Array, k: jax.Array, q_positions: jax.Array, k_positions: jax.Array
    ) -> jax.Array:
        """Materialized logits `[B, H, q_len, k_len]`; see `relative.relative_logits`."""
        return relative.relative_logits(q, k, self.terms(), q_positions, k_positions)


class TransformerXLRelativePosition(nnx.Module):
    """NNX twin of `jax_posenc.TransformerXLRelativePosition`.

    Parameters `position_kernel` `[F, H, D]`, `content_bias` and `position_bias` `[H, D]`.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        *,
        rngs: nnx.Rngs,
        features: int | None = None,
        base: float = 10000.0,
        kernel_init: nnx.Initializer | None = None,
    ):
        heads = _checks.check_positive_int("num_heads", num_heads)
        head_dim = _checks.check_positive_int("head_dim", head_dim)
        features = heads * head_dim if features is None else features
        features = _checks.check_even_positive_int("features", features)
        self.base = _checks.check_positive_float("base", base)
        kernel_init = kernel_init or relative.transformer_xl_kernel_init()
        self.position_kernel = nnx.Param(
            kernel_init(rngs.params(), (features, heads, head_dim), jnp.float32)
        )
        self.content_bias = nnx.Param(jnp.zeros((heads, head_dim), jnp.float32))
        self.position_bias = nnx.Param(jnp.zeros((heads, head_dim), jnp.float32))

    def terms(self):
        """`RelativeTerms` with the position term and the content bias u."""
        return relative.transformer_xl_terms(
            self.position_kernel[...],
            self.content_bias[...],
            self.position_bias[...],
            base=self.base,
        )

    def __call__(
        self, q: jax.Array, k: jax.Array, q_positions: jax.Array, k_positions: jax.Array
    ) -> jax.Array:
        """Materialized logits `[B, H, q_len, k_len]`; see `relative.relative_logits`."""
        return relative.relative_logits(q, k, self.terms(), q_positions, k_positions)


# ---- rotary (RoPE, xPos)


class RotaryEmbedding(nnx.Module):
    """NNX twin of `jax_posenc.RotaryEmbedding`; parameter `inv_freq` when learnable.

    `__call__(q, k, positions, k_positions=None) -> (q_rot, k_rot)`. The parameter is
    created here, before any input is seen, so `learnable_frequencies=True` needs
    `rotary_dim`.
    """

    def __init__(
        self,
        rotary_dim: int | None = None,
        *,
        base: float = 10000.0,
        layout: str = "half",
        scaling: rope.RopeScaling | None = None,
        learnable_frequencies: bool = False,
        seq_len: int | None = None,
        angle_precision: str = "exact",
    ):
        self.rotary_dim = rotary_dim
        self.base = _checks.check_positive_float("base", base)
        self.layout = _checks.check_choice("layout", layout, rope.ROPE_LAYOUTS)
        self.scaling = scaling
        self.seq_len = seq_len
        self.angle_precision = angle_precision
        if learnable_frequencies and rotary_dim is None:
            raise ValueError("learnable_frequencies=True needs rotary_dim (the parameter size)")
        self.inv_freq = (
            nnx.Param(rope.initial_learned_frequencies(rotary_dim, base, scaling))
            if learnable_frequencies
            else None
        )

    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        positions: jax.Array,
        k_positions: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        return rope.apply_rope_qk(
            q,
            k,
            positions,
            k_positions,
            base=self.base,
            rotary_dim=self.rotary_dim,
            layout=self.layout,
            scaling=self.scaling,
            inv_freq=None if self.inv_freq is None else self.inv_freq[...],
            seq_len=self.seq_len,
            angle_precision=self.angle_precision,
        )


class XPosEmbedding(nnx.Module):
    """NNX twin of `jax_posenc.XPosEmbedding` (no parameters)."""

    def __init__(
        self,
        *,
        scale_base: float = 512.0,
        rotary_dim: int | None = None,
        base: float = 10000.0,
        layout: str = "half",
        reference_position: int | None = None,
        angle_precision: str = "exact",
    ):
        self.scale_base = _checks.check_positive_float("scale_base", scale_base)
        self.rotary_dim = rotary_dim
        self.base = _checks.check_positive_float("base", base)
        self.layout = _checks.check_choice("layout", layout, rope.ROPE_LAYOUTS)
        self.reference_position = reference_position
        self.angle_precision = angle_precision

    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        positions: jax.Array,
        k_positions: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        return rope.apply_xpos(
            q,
            k,
            positions,
            k_positions=k_positions,
            scale_base=self.scale_base,
            base=self.base,
            rotary_dim=self.rotary_dim,
            layout=self.layout,
            reference_position=self.reference_position,
            angle_precision=self.angle_precision,
        )


class AttentionFn(nnx.Module):
    """An `attention_fn` for `flax.nnx.MultiHeadAttention` that owns a registered
    encoding's parameters, so learned encodings (T5, KERPLE, FIRE, Shaw, ...) train with
    the layer. Parameter-free encodings can also use `jax_posenc.make_attention_fn`
    directly.

    Its parameters do not depend on the sequence length, so they are created at
    construction from `num_heads` and `head_dim` (the projected query's heads and
    features per head). Masks, causality and decoding follow `make_attention_fn`.

    Example::

        attention_fn = pe_nnx.AttentionFn("t5", num_heads=4, head_dim=16, rngs=rngs)
        layer = nnx.MultiHeadAttention(num_heads=4, in_features=64, decode=False,
                                       attention_fn=attention_fn, rngs=rngs)

    Args:
      encoding: a registered name or "+" combination.
      num_heads: query heads H.
      head_dim: features per head D.
      num_kv_heads: key/value heads (grouped-query attention); None for `num_heads`.
      implementation: "xla" or "blockwise".
      block_size: blockwise block size.
      causal: whether direction-aware encodings are built for causal use (T5's
        one-sided buckets), as `is_causal=True` does for `make_attention_fn`.
      rngs: initialises the parameters.
      **options: per-part options keyed by part name, e.g. `t5={"num_buckets": 64}`.
    """

    def __init__(
        self,
        encoding: str,
        *,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int | None = None,
        implementation: str = "xla",
        block_size: int | tuple[int, int] | None = None,
        causal: bool = False,
        rngs: nnx.Rngs,
        **options: Any,
    ):
        num_heads = _checks.check_positive_int("num_heads", num_heads)
        head_dim = _checks.check_positive_int("head_dim", head_dim)
        kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        kv_heads = _checks.check_positive_int("num_kv_heads", kv_heads)
        self.causal = bool(causal)
        module = attention.EncodedAttention(
            encoding, registry.freeze_options(options, encoding), implementation, block_size
        )
        example = jnp.zeros((1, 1, num_heads, head_dim), jnp.float32)
        kv_example = jnp.zeros((1, 1, kv_heads, head_dim), jnp.float32)
        self.encoded = bridge.ToNNX(module, rngs=rngs)
        bridge.lazy_init(self.encoded, example, kv_example, kv_example, is_causal=self.causal)

    def __call__(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        mask: jax.Array | None = None,
        *,
        is_causal: bool = False,
        **kwargs: Any,
    ) -> jax.Array:
        return self.encoded(query, key, value, mask, is_causal=is_causal or self.causal, **kwargs)
