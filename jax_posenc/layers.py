"""Flax glue: the encodings inside Flax's own attention layers.

`make_attention_fn` returns an `attention_fn` for `flax.linen.MultiHeadDotProductAttention`
and `flax.nnx.MultiHeadAttention` that applies a registered encoding; `EncodedAttention`
is the same as a linen module that owns the encoding's parameters (what
`jax_posenc.nnx.AttentionFn` wraps). This is the layer above the attention kernel: it
reads the registry, the kernel (`jax_posenc.attention`) never does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jax_posenc import _checks, _protocols, registry
from jax_posenc.attention.core import (
    IMPLEMENTATIONS,
    batched_ids,
    block_sizes,
    check_attention_inputs,
    dot_product_attention,
    mask_as_rank4,
    resolve_positions,
    resolve_segments,
)


def _bound(module: nn.Module) -> nn.Module:
    """The module itself inside a linen parent; outside any, bound to no variables."""
    return module if module.scope is not None else module.bind({})


_NO_PARAMETERS = (flax.errors.ScopeCollectionNotFound, flax.errors.ScopeParamNotFoundError)


def _flax_mask(mask) -> jax.Array:
    """A Flax attention mask (bool or numeric, nonzero = attend) as a bool array."""
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        mask = mask != 0
    return mask


def _positions_from_mask(mask: jax.Array, k_pos: jax.Array, q_len: int) -> jax.Array:
    """The position of the last key each query may attend to, `[B or 1, Lq]`.

    In causal self-attention over a cache this is the query's own position: Flax's
    `decode=True` step passes one query, the whole cache and the mask
    `arange(max_length) <= cache_index`, so the query sits at `k_pos[cache_index]`. A
    row that may attend to nothing gets the first key's position (its output is zero).
    """
    allowed = jnp.any(mask, axis=1)  # [B or 1, Lq or 1, Lk]
    index = jnp.arange(allowed.shape[-1], dtype=jnp.int32)
    last = jnp.max(jnp.where(allowed, index, 0), axis=-1)  # [B or 1, Lq or 1]
    batch = max(last.shape[0], k_pos.shape[0])
    last = jnp.broadcast_to(last, (batch, q_len))
    return jnp.take_along_axis(jnp.broadcast_to(k_pos, (batch, k_pos.shape[1])), last, axis=1)


def _direction_spec(spec, options, heads: int, head_dim: int, causal: bool, lengths):
    """The `EncodingSpec` for the factories: the given one (checked against the shapes),
    or one built from the projected query's heads and head_dim."""
    if spec is None:
        return registry.EncodingSpec(
            d_model=heads * head_dim,
            num_heads=heads,
            head_dim=head_dim,
            max_positions=max(*lengths, 1),
            causal=causal,
            options=options,
        )
    if (heads, head_dim) != (spec.num_heads, spec.head_dim):
        raise ValueError(
            f"query heads and head_dim ({heads}, {head_dim}) do not match the spec "
            f"(num_heads={spec.num_heads}, head_dim={spec.head_dim})"
        )
    return spec


def make_attention_fn(
    encoding: str,
    *,
    implementation: str = "auto",
    block_size: int | tuple[int, int] | None = None,
    q_positions: jax.Array | None = None,
    k_positions: jax.Array | None = None,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    spec: registry.EncodingSpec | None = None,
    **options: Mapping[str, Any],
) -> Callable[..., jax.Array]:
    """An `attention_fn` for Flax attention layers that applies a registered encoding.

    Plug it into `flax.linen.MultiHeadDotProductAttention(attention_fn=...)` or
    `flax.nnx.MultiHeadAttention(attention_fn=...)`. In the order of the parts of
    `encoding` ("rope", "alibi", "rope+t5", ...), qk transforms (RoPE, xPos) rotate the
    projected queries and keys, logit biases (ALiBi, T5, KERPLE, FIRE, ...) are summed,
    relative terms (Shaw, Transformer-XL) are added up, token biases (FoX) are computed
    from the tokens, and `dot_product_attention` runs. Flax hands the attention_fn only
    the projections, so a token bias reads each key token's projected keys flattened
    over heads (`TokenContext.inputs` `[B, Lk, Hkv * D]`; FoX's gate is then a linear
    function of the layer input through the key projection, not of the input itself as
    in `jax_posenc.Transformer`). With `Lq != Lk` (decoding) the queries are placed by
    their positions among the keys.

    Shapes: heads and head_dim come from the projected query at call time; an
    `EncodingSpec` is only needed to pin them (it is checked against the query).

    Masks and causality, as Flax has them: `mask` is bool or numeric (nonzero = attend,
    as `nn.make_causal_mask` / `nn.make_attention_mask` return float32), and attention is
    causal only if the mask says so or the caller passes `is_causal=True` (NNX does).
    Nothing is causal by default. Direction-aware encodings are built for causal use
    when `is_causal` is set or `spec.causal` is True (T5's one-sided buckets); otherwise
    T5 uses its bidirectional buckets, which under a causal mask is still valid. xPos is
    causal-only: it always needs a causal mask.

    Decoding: under Flax's `decode=True` the layer passes one query, the whole cache of
    raw keys and a mask that allows the filled slots. The query's position is then read
    from the mask: it is the position of the last key it may attend to (the cache
    index). Keys are transformed at their own positions on every step, so RoPE and xPos
    stay exact at any position. This rule applies whenever `Lq != Lk`, a mask is given
    and `q_positions` is not. When `Lq == Lk` and only `k_positions` is given, the
    queries take the same positions (self-attention).

    Parameters: the encoding's modules are built by the registry factories when the
    callable runs. Inside a linen module (the usual case: the attention layer calls it
    from its compact `__call__`) they become submodules of that layer, so learned
    biases (T5, KERPLE, FIRE, ...) are created by `init` and trained with the layer's
    other parameters. Called outside any linen module (plain functions, or
    `flax.nnx.MultiHeadAttention`), only parameter-free encodings work (RoPE, xPos,
    ALiBi, ...); a learned one raises a ValueError.

    Args:
      encoding: a registered name or "+" combination whose parts contribute a qk
        transform, a logit bias or relative terms (input embeddings are rejected:
        they belong to the token embedding, not to attention).
      implementation: "auto", "xla" or "blockwise" (see `dot_product_attention`).
      block_size: blockwise block size, as in `dot_product_attention`.
      q_positions: optional integer positions of the queries `[Lq]` or `[B, Lq]`.
      k_positions: optional integer positions of the keys; default `arange(Lk)`.
      segment_ids: optional segment ids, as in `dot_product_attention`.
      spec: optional `EncodingSpec`; its `options` are used when given.
      **options: per-part options keyed by part name, e.g. `rope={"base": 5e5}` or
        `alibi={"form": "causal"}`; a name that is not a part of `encoding` raises.

    Returns:
      `attention_fn(query, key, value, mask=None, ..., is_causal=False) -> [B, Lq, H, D]`,
      accepting the keywords Flax passes. Attention dropout, a matmul `precision` and
      sowing the weights are not implemented: a nonzero `dropout_rate` with
      `deterministic=False`, a `precision` or a `module` (`sow_weights=True`) raises.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> import jax_posenc as pe
      >>> layer = nn.MultiHeadDotProductAttention(
      ...     num_heads=4, qkv_features=64, attention_fn=pe.make_attention_fn("rope+alibi"))
      >>> x = jnp.ones((2, 16, 64))
      >>> params = layer.init(jax.random.key(0), x, mask=nn.make_causal_mask(x[..., 0]))
    """
    if spec is not None and not isinstance(spec, registry.EncodingSpec):
        raise TypeError(f"spec must be an EncodingSpec or None, got {spec!r}")
    _checks.check_choice("implementation", implementation, IMPLEMENTATIONS)
    block_sizes(block_size)
    parts = registry.resolve(encoding)
    options = registry.freeze_options(options, encoding)
    if spec is not None and options:
        raise ValueError("give encoding options either in spec.options or as keywords, not both")
    for part in parts:
        if part.input_embedding is not None:
            raise ValueError(
                f"encoding {part.name!r} contributes an input embedding, which is added to "
                "the token embeddings, not applied inside attention; use it in the model "
                "and pass only its attention parts to make_attention_fn"
            )

    def attention_fn(
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        mask: jax.Array | None = None,
        dropout_rate: float = 0.0,
        deterministic: bool = True,
        dtype: jnp.dtype | None = None,
        dropout_rng: jax.Array | None = None,
        broadcast_dropout: bool = True,
        precision: lax.PrecisionLike = None,
        module: object | None = None,
        is_causal: bool = False,
    ) -> jax.Array:
        del dropout_rng, broadcast_dropout  # only meaningful with dropout, refused below
        if dropout_rate > 0.0 and not deterministic:
            raise ValueError(
                f"attention dropout is not implemented by make_attention_fn, got "
                f"dropout_rate={dropout_rate} with deterministic=False"
            )
        if precision is not None:
            raise ValueError(f"precision is not supported by make_attention_fn, got {precision}")
        if module is not None:
            raise ValueError(
                "make_attention_fn cannot sow attention weights (sow_weights=True): "
                "blockwise attention never forms them"
            )
        check_attention_inputs(query, key, value)
        batch, q_len, heads, head_dim = query.shape
        k_len = key.shape[1]
        causal_encodings = bool(is_causal) or any(part.causal_only for part in parts)
        part_spec = _direction_spec(
            spec, options, heads, head_dim, causal_encodings, (q_len, k_len)
        )
        mask = (
            None if mask is None else mask_as_rank4(_flax_mask(mask), (batch, heads, q_len, k_len))
        )
        q_seg, k_seg, restart = resolve_segments(segment_ids, q_len, k_len, batch)
        q_pos = q_positions
        if q_pos is None and q_len == k_len and k_positions is not None:
            q_pos = k_positions  # self-attention: the queries are the keys' tokens
        if q_pos is None and q_len != k_len and mask is not None:
            k_default = jnp.arange(k_len) if k_positions is None else k_positions
            q_pos = _positions_from_mask(
                mask, batched_ids("k_positions", k_default, k_len, batch), q_len
            )
        q_pos, k_pos = resolve_positions(
            q_pos,
            k_positions,
            (q_len, k_len),
            batch,
            (q_seg, k_seg) if restart else None,
            needed=is_causal or any(part.contributes for part in parts),
        )
        modules = registry.attention_modules(encoding, part_spec)
        # A token bias (FoX) reads token features; Flax hands over only the projections,
        # so it reads each key token's projected keys, flattened over heads.
        context = _protocols.TokenContext(key.reshape(batch, k_len, -1), q_pos, k_pos, k_seg)
        try:
            terms = _protocols.combine(
                [_protocols.terms_of(role, _bound(m), context) for _, role, m in modules]
            )
            query, key, arguments = terms.prepare(query, key, q_pos, k_pos)
        except _NO_PARAMETERS as error:
            raise ValueError(
                f"encoding {encoding!r} has learned parameters, so the attention_fn must run "
                "inside a linen module (e.g. as MultiHeadDotProductAttention(attention_fn=...)), "
                "where they are created and trained with it; in NNX use "
                "jax_posenc.nnx.AttentionFn"
            ) from error
        out = dot_product_attention(
            query,
            key,
            value,
            **arguments,
            q_positions=q_pos,
            k_positions=k_pos,
            mask=mask,
            causal=bool(is_causal),
            segment_ids=segment_ids,
            implementation=implementation,
            block_size=block_size,
        )
        return out if dtype is None else out.astype(dtype)

    return attention_fn


class EncodedAttention(nn.Module):
    """`make_attention_fn` as a linen module that owns the encoding's parameters.

    Called with the `attention_fn` signature (`query, key, value, mask=None, ...,
    is_causal=False`). Linen layers do not need it (`make_attention_fn` already creates
    parameters inside the calling layer); it is what `jax_posenc.nnx.AttentionFn` wraps
    so that NNX layers can train learned encodings.

    Attributes:
      encoding: a registered name or "+" combination.
      options: per-part options, as the keywords of `make_attention_fn`.
      implementation: "auto", "xla" or "blockwise" (see `dot_product_attention`).
      block_size: blockwise block size.
    """

    encoding: str
    options: Any = None
    implementation: str = "auto"
    block_size: int | tuple[int, int] | None = None

    @nn.compact
    def __call__(self, query, key, value, mask=None, is_causal: bool = False, **kwargs):
        attention_fn = make_attention_fn(
            self.encoding,
            implementation=self.implementation,
            block_size=self.block_size,
            **dict(self.options or {}),
        )
        return attention_fn(query, key, value, mask, is_causal=is_causal, **kwargs)
