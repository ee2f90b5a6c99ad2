"""Relative position terms that read the content of the block in hand.

Both families follow `jax_posenc.RelativeTerms`: `query_bias_fn(q, q_positions,
k_positions) -> [B, H, bq, bk]` receives the query `[B, bq, H, D]` already multiplied by
the softmax scale `1/sqrt(D)`; `value_fn(weights, q_positions, k_positions)` is linear in
the (possibly unnormalised) softmax weights; `content_bias` `[H, D]` is Transformer-XL's
global content bias u. Neither ever builds a `[bq, bk, D]` tensor.

* Shaw et al. (2018): clipped relative distances index learned tables `[2K+1, D]` on
  the key side (added to the logits) and the value side (added to the outputs). The key
  term is an einsum of the query with the `2K+1` distinct rows followed by a gather; the
  value term sums the weights per distance bucket, then one einsum with the value table.
* Transformer-XL (Dai et al., 2019): `(q_i + v) . W_R R_{i-j}` with sinusoidal `R`. The
  sinusoid of a difference factors into the sinusoids of the two positions
  (`sin(w(i-j)) = sin(wi)cos(wj) - cos(wi)sin(wj)`, `cos(w(i-j)) = cos(wi)cos(wj) +
  sin(wi)sin(wj)`), so the term is a dot product between a per-query vector
  `[B, bq, H, F]` and the key sinusoids `[B, bk, F]`: exactly the relative-shift result,
  with O(L F) memory and valid for any positions (packed sequences, left padding, cache
  offsets), where the shift needs contiguous ones.

References:
  Shaw, Uszkoreit and Vaswani, 2018, Self-Attention with Relative Position
    Representations.
  Dai et al., 2019, Transformer-XL: Attentive Language Models Beyond a Fixed-Length
    Context (section 3.3).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_posenc import _checks
from jax_posenc._protocols import RelativeTerms
from jax_posenc.absolute import sinusoidal_encoding


def _check_query(q: jax.Array) -> jax.Array:
    q = _checks.check_floating_array("q", q)
    _checks.check_rank("q", q, 4)
    return q


def _positions_for_batch(
    batch: int, q_positions: jax.Array, k_positions: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Validated `[B or 1, S]` positions whose batch fits an activation batch of `batch`."""
    return (
        _checks.position_rows("q_positions", q_positions, batch=batch),
        _checks.position_rows("k_positions", k_positions, batch=batch),
    )


def _head_dim_scale(q: jax.Array) -> float:
    return float(q.shape[-1]) ** -0.5


def relative_logits(
    q: jax.Array,
    k: jax.Array,
    terms: RelativeTerms,
    q_positions: jax.Array,
    k_positions: jax.Array,
) -> jax.Array:
    """Full (materialized) attention logits with relative terms, before masking.

    `logits = (q + u) . k / sqrt(D) + query_bias_fn(q / sqrt(D), ...)`, where u is
    `terms.content_bias` (zero when None). A reference path for tests and small inputs;
    `jax_posenc.dot_product_attention` evaluates the same terms block by block.

    Args:
      q: `[B, q_len, H, D]` queries (not scaled).
      k: `[B, k_len, H, D]` keys.
      terms: the `RelativeTerms` of an encoding.
      q_positions: integer `[B or 1, q_len]`.
      k_positions: integer `[B or 1, k_len]`.

    Returns:
      `[B, H, q_len, k_len]` float32.
    """
    q = _check_query(q)
    k = _checks.check_floating_array("k", k)
    _checks.check_rank("k", k, 4)
    if k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(
            f"k must have shape [B, k_len, H, D] matching q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    scale = _head_dim_scale(q)
    q32 = q.astype(jnp.float32)
    content_q = q32 if terms.content_bias is None else q32 + terms.content_bias
    logits = jnp.einsum("bqhd,bkhd->bhqk", content_q * scale, k.astype(jnp.float32))
    if terms.query_bias_fn is not None:
        logits = logits + terms.query_bias_fn(q32 * scale, q_positions, k_positions)
    return logits


# ------------------------------------------------------------------ Shaw et al. 2018


def clipped_relative_index(
    q_positions: jax.Array, k_positions: jax.Array, max_relative_position: int
) -> jax.Array:
    """Row index `clip(k_pos - q_pos, -K, K) + K` into a `[2K+1, ...]` table (Shaw et al.).

    Args:
      q_positions: integer `[B or 1, bq]`.
      k_positions: integer `[B or 1, bk]`.
      max_relative_position: K >= 1.

    Returns:
      int32 `[B or 1, bq, bk]` in `[0, 2K]`.
    """
    max_relative_position = _checks.check_positive_int(
        "max_relative_position", max_relative_position
    )
    q_positions, k_positions = _checks.check_position_pair(q_positions, k_positions)
    distance = k_positions.astype(jnp.int32)[:, None, :] - q_positions.astype(jnp.int32)[:, :, None]
    clipped = jnp.clip(distance, -max_relative_position, max_relative_position)
    return clipped + max_relative_position


def _table_radius(name: str, table: jax.Array) -> int:
    """K of a `[2K+1, D]` table."""
    table = _checks.check_floating_array(name, table)
    _checks.check_rank(name, table, 2)
    rows = table.shape[0]
    if rows < 3 or rows % 2 == 0:
        raise ValueError(
            f"{name} must have 2K+1 rows (K >= 1, one per clipped distance), got shape "
            f"{tuple(table.shape)}"
        )
    return (rows - 1) // 2


def shaw_query_bias(
    q: jax.Array, q_positions: jax.Array, k_positions: jax.Array, key_table: jax.Array
) -> jax.Array:
    """Shaw et al. key-side logit term `q_i . a^K_{clip(j - i)}` without a `[bq, bk, D]` tensor.

    Args:
      q: `[B, bq, H, D]` query, already multiplied by the softmax scale.
      q_positions: integer `[B or 1, bq]`.
      k_positions: integer `[B or 1, bk]`.
      key_table: `[2K+1, D]` key-side embeddings, row `d + K` for clipped distance d.

    Returns:
      `[B, H, bq, bk]` float32.
    """
    q = _check_query(q)
    radius = _table_radius("key_table", key_table)
    if key_table.shape[1] != q.shape[-1]:
        raise ValueError(
            f"key_table must have shape [2K+1, {q.shape[-1]}] to match q's head_dim, got "
            f"{tuple(key_table.shape)}"
        )
    q_positions, k_positions = _positions_for_batch(q.shape[0], q_positions, k_positions)
    per_distance = jnp.einsum("bqhd,rd->bhqr", q.astype(jnp.float32), key_table.astype(jnp.float32))
    index = clipped_relative_index(q_positions, k_positions, radius)[:, None]
    batch, heads = per_distance.shape[:2]
    index = jnp.broadcast_to(index, (batch, heads, *index.shape[2:]))
    return jnp.take_along_axis(per_distance, index, axis=-1)


def _sum_per_bucket(weights: jax.Array, index: jax.Array, num_buckets: int) -> jax.Array:
    """`out[b, h, i, r] = sum_j weights[b, h, i, j] [index[b, i, j] == r]`, no one-hot."""
    per_row = jax.vmap(functools.partial(jax.ops.segment_sum, num_segments=num_buckets))
    per_head = jax.vmap(per_row, in_axes=(0, None))
    per_batch = jax.vmap(per_head, in_axes=(0, 0 if index.shape[0] > 1 else None))
    return per_batch(weights, index if index.shape[0] > 1 else index[0])


def shaw_value_term(
    weights: jax.Array, q_positions: jax.Array, k_positions: jax.Array, value_table: jax.Array
) -> jax.Array:
    """Shaw et al. value-side term `sum_j weights_ij a^V_{clip(j - i)}`.

    The weights of each query row are first summed per clipped distance (2K+1 buckets),
    then multiplied by the value table, so no `[bq, bk, Dv]` tensor is formed. Linear in
    `weights`, which may be unnormalised.

    Args:
      weights: `[B, H, bq, bk]` attention weights.
      q_positions: integer `[B or 1, bq]`.
      k_positions: integer `[B or 1, bk]`.
      value_table: `[2K+1, Dv]` value-side embeddings.

    Returns:
      `[B, bq, H, Dv]` float32.
    """
    weights = _checks.check_floating_array("weights", weights)
    _checks.check_rank("weights", weights, 4)
    radius = _table_radius("value_table", value_table)
    q_positions, k_positions = _positions_for_batch(weights.shape[0], q_positions, k_positions)
    index = clipped_relative_index(q_positions, k_positions, radius)
    if index.shape[1:] != weights.shape[2:]:
        raise ValueError(
            f"weights must have shape [B, H, {index.shape[1]}, {index.shape[2]}] to match the "
            f"positions, got {tuple(weights.shape)}"
        )
    per_bucket = _sum_per_bucket(weights.astype(jnp.float32), index, 2 * radius + 1)
    return jnp.einsum("bhqr,rd->bqhd", per_bucket, value_table.astype(jnp.float32))


def shaw_terms(key_table: jax.Array, value_table: jax.Array | None = None) -> RelativeTerms:
    """`RelativeTerms` of Shaw et al.: key term, plus the value term when `value_table` is given."""
    value_fn = None
    if value_table is not None:
        value_fn = functools.partial(shaw_value_term, value_table=value_table)
    return RelativeTerms(
        query_bias_fn=functools.partial(shaw_query_bias, key_table=key_table), value_fn=value_fn
    )


def shaw_embedding_init() -> nn.initializers.Initializer:
    """Default initializer of the Shaw et al. tables (Glorot uniform)."""
    return nn.initializers.xavier_uniform()


class RelativePositionEmbedding(nn.Module):
    """Shaw et al. (2018) relative position representations, shared by all heads.

    Parameters: `key_embedding` `[2K+1, head_dim]` and, with `use_value_term`,
    `value_embedding` `[2K+1, value_dim]`, K = `max_relative_position`.

    Attributes:
      head_dim: features per head D.
      max_relative_position: clipping distance K (distances beyond share a row).
      value_dim: features per head of the values (None: head_dim).
      use_value_term: add the value-side term to the attention outputs.
      embedding_init: initializer of both tables.
    """

    head_dim: int
    max_relative_position: int = 16
    value_dim: int | None = None
    use_value_term: bool = True
    embedding_init: nn.initializers.Initializer = shaw_embedding_init()

    def setup(self):
        head_dim = _checks.check_positive_int("head_dim", self.head_dim)
        radius = _checks.check_positive_int("max_relative_position", self.max_relative_position)
        rows = 2 * radius + 1
        self.key_embedding = self.param("key_embedding", self.embedding_init, (rows, head_dim))
        if self.use_value_term:
            value_dim = head_dim if self.value_dim is None else self.value_dim
            value_dim = _checks.check_positive_int("value_dim", value_dim)
            self.value_embedding = self.param(
                "value_embedding", self.embedding_init, (rows, value_dim)
            )

    def terms(self) -> RelativeTerms:
        """`RelativeTerms` with the key term and (optionally) the value term."""
        return shaw_terms(self.key_embedding, self.value_embedding if self.use_value_term else None)

    def __call__(
        self, q: jax.Array, k: jax.Array, q_positions: jax.Array, k_positions: jax.Array
    ) -> jax.Array:
        """Materialized logits `[B, H, q_len, k_len]`; see `relative_logits`."""
        return relative_logits(q, k, self.terms(), q_positions, k_positions)


# ------------------------------------------------------------ Transformer-XL 2019


def transformer_xl_position_logits(
    q: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    position_kernel: jax.Array,
    position_bias: jax.Array,
    *,
    base: float = 10000.0,
) -> jax.Array:
    """Transformer-XL position term `(q_i + v) . W_R R_{i-j} / sqrt(D)`.

    `R_t` is the sinusoidal encoding of the signed distance `t = i - j` (query minus key)
    in the concat layout `[sin(w t), cos(w t)]` (Dai et al., 2019). Computed through the
    factorisation in the module docstring: memory O((bq + bk) F), no `[bq, bk, F]` tensor.

    Args:
      q: `[B, bq, H, D]` query, already multiplied by the softmax scale `1/sqrt(D)`.
      q_positions: integer `[B or 1, bq]`.
      k_positions: integer `[B or 1, bk]`.
      position_kernel: `[F, H, D]` W_R, F even.
      position_bias: `[H, D]` the global position bias v (not scaled).
      base: wavelength base of the sinusoids.

    Returns:
      `[B, H, bq, bk]` float32.
    """
    q = _check_query(q)
    batch, _, heads, head_dim = q.shape
    position_kernel = _checks.check_floating_array("position_kernel", position_kernel)
    _checks.check_rank("position_kernel", position_kernel, 3)
    features = position_kernel.shape[0]
    if position_kernel.shape[1:] != (heads, head_dim) or features % 2:
        raise ValueError(
            f"position_kernel must have shape [F, {heads}, {head_dim}] with F even, got "
            f"{tuple(position_kernel.shape)}"
        )
    if jnp.shape(position_bias) != (heads, head_dim):
        raise ValueError(
            f"position_bias must have shape ({heads}, {head_dim}), got {jnp.shape(position_bias)}"
        )
    q_positions, k_positions = _positions_for_batch(batch, q_positions, k_positions)
    query = q.astype(jnp.float32) + _head_dim_scale(q) * position_bias.astype(jnp.float32)
    coefficient = jnp.einsum("bqhd,fhd->bqhf", query, position_kernel.astype(jnp.float32))
    coef_sin, coef_cos = jnp.split(coefficient, 2, axis=-1)
    encode = functools.partial(sinusoidal_encoding, dim=features, base=base, layout="concat")
    sin_q, cos_q = jnp.split(encode(q_positions)[:, :, None], 2, axis=-1)
    # sum_f a_f sin(w(i-j)) + b_f cos(w(i-j)) = sum_f [a sin wi + b cos wi] cos wj
    #                                                 + [b sin wi - a cos wi] sin wj
    rotated = jnp.concatenate(
        [coef_cos * sin_q - coef_sin * cos_q, coef_sin * sin_q + coef_cos * cos_q], axis=-1
    )
    keys = jnp.broadcast_to(encode(k_positions), (batch, k_positions.shape[1], features))
    return jnp.einsum("bqhf,bkf->bhqk", rotated, keys)


def transformer_xl_terms(
    position_kernel: jax.Array,
    content_bias: jax.Array,
    position_bias: jax.Array,
    *,
    base: float = 10000.0,
) -> RelativeTerms:
    """`RelativeTerms` of Transformer-XL: the position term and the content bias u."""
    query_bias_fn = functools.partial(
        transformer_xl_position_logits,
        position_kernel=position_kernel,
        position_bias=position_bias,
        base=base,
    )
    return RelativeTerms(query_bias_fn=query_bias_fn, content_bias=content_bias)


def transformer_xl_kernel_init() -> nn.initializers.Initializer:
    """Default initializer of W_R `[F, H, D]` (LeCun normal over the F inputs)."""
    return nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))


class TransformerXLRelativePosition(nn.Module):
    """Transformer-XL relative logits (Dai et al., 2019).

    Parameters: `position_kernel` W_R `[features, num_heads, head_dim]`, `content_bias`
    u and `position_bias` v, both `[num_heads, head_dim]` and initialised to zero (the
    model starts from the plain content term plus the W_R position term).

    Attributes:
      num_heads: number of heads H.
      head_dim: features per head D.
      features: width F of the sinusoidal relative encoding R (even; None: H * D, the
        model width as in the paper).
      base: wavelength base of R.
      kernel_init: initializer of W_R.
    """

    num_heads: int
    head_dim: int
    features: int | None = None
    base: float = 10000.0
    kernel_init: nn.initializers.Initializer = transformer_xl_kernel_init()

    def setup(self):
        heads = _checks.check_positive_int("num_heads", self.num_heads)
        head_dim = _checks.check_positive_int("head_dim", self.head_dim)
        features = heads * head_dim if self.features is None else self.features
        features = _checks.check_even_positive_int("features", features)
        _checks.check_positive_float("base", self.base)
        self.position_kernel = self.param(
            "position_kernel", self.kernel_init, (features, heads, head_dim)
        )
        self.content_bias = self.param("content_bias", nn.initializers.zeros, (heads, head_dim))
        self.position_bias = self.param("position_bias", nn.initializers.zeros, (heads, head_dim))

    def terms(self) -> RelativeTerms:
        """`RelativeTerms` with the position term and the content bias u."""
        return transformer_xl_terms(
            self.position_kernel, self.content_bias, self.position_bias, base=self.base
        )

    def __call__(
        self, q: jax.Array, k: jax.Array, q_positions: jax.Array, k_positions: jax.Array
    ) -> jax.Array:
        """Materialized logits `[B, H, q_len, k_len]`; see `relative_logits`."""
        return relative_logits(q, k, self.terms(), q_positions, k_positions)
