"""Per-block maths shared by both attention implementations.

One (query block, key block) pair: logits with every positional term, the mask, the
online-softmax update (Milakov & Gimelshein, 2018) and the weighted values. The xla
implementation runs it once over the whole matrix, the blockwise one per block pair.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jax_posenc._protocols import (
    BiasFn,
    ContextualBias,
    PairSelectFn,
    RelativeTerms,
    TokenBiasFn,
)

_F32 = jnp.float32


def check_broadcastable(name: str, value: jax.Array, target: tuple[int, ...]) -> None:
    shape = tuple(jnp.shape(value))
    if len(shape) != len(target) or any(
        s not in (1, t) for s, t in zip(shape, target, strict=True)
    ):
        raise ValueError(
            f"{name} must return an array broadcastable to {list(target)} "
            f"(same rank, each dimension 1 or equal), got shape {list(shape)}"
        )


class Terms(NamedTuple):
    """Static configuration of the logits, shared by every block."""

    scale: float
    causal: bool
    bias_fn: BiasFn | None
    relative_terms: RelativeTerms | None
    token_bias_fn: TokenBiasFn | None = None
    alternate_select: PairSelectFn | None = None
    contextual_bias: ContextualBias | None = None  # the xla path only: reads whole rows
    # Layouts of `Block.k` / `Block.v`: False `[B, Hkv, bk, D]`, True `[B, Hkv, D, bk]`.
    # The blockwise loops keep keys (and, in the backward pass, values) transposed: every
    # per-block product is then a plain matrix product whose cotangents XLA's CPU backend
    # computes without transposing the `[bq, bk]` block (see `_blockwise`).
    keys_transposed: bool = False
    values_transposed: bool = False


class PerToken(NamedTuple):
    """Per-token arrays the logits read besides q and k, along axis 2 like them (the
    blockwise path slices them per block and returns their gradients)."""

    token_values: Any = None  # TokenBias values, leaves [B or 1, H or 1, L, ...]
    alternate: jax.Array | None = None  # AlternateLogits q [B, H, L, D] or k [B, Hkv, L, D]


class Block(NamedTuple):
    """The arrays of one (query block, key block) pair; any of the last seven may be None."""

    q: jax.Array  # [B, H, bq, D] (head-major inside this module, see `heads_first`)
    k: jax.Array  # [B, Hkv, bk, D], or [B, Hkv, D, bk] (`Terms.keys_transposed`)
    v: jax.Array  # [B, Hkv, bk, Dv], or [B, Hkv, Dv, bk] (`Terms.values_transposed`)
    q_pos: jax.Array  # [B or 1, bq]
    k_pos: jax.Array  # [B or 1, bk]
    q_seg: jax.Array | None  # [B or 1, bq]
    k_seg: jax.Array | None  # [B or 1, bk]
    mask: jax.Array | None  # [B or 1, H or 1, bq or 1, bk or 1]
    k_valid: jax.Array | None  # [bk], False on padding
    q_extra: PerToken = PerToken()  # of the queries, bq along axis 2
    k_extra: PerToken = PerToken()  # of the keys, bk along axis 2


class Softmax(NamedTuple):
    """Online-softmax state for one query block."""

    row_max: jax.Array  # [B, H, bq]; -inf until an allowed key is seen
    row_sum: jax.Array  # [B, H, bq]
    numerator: jax.Array  # [B, H, bq, Dv], float32


def init_softmax(q: jax.Array, value_dim: int, anchor: jax.Array | float = 0.0) -> Softmax:
    """The empty state for queries `q` `[B, H, bq, D]`.

    Made with `zeros_like(q)`, so under sharding-in-types (explicit mesh axes) the state
    has the sharding of `q`, as the loop body's results do; see `_anchor` for
    `shard_map`.
    """
    zeros = jnp.zeros_like(q[..., 0], _F32) + anchor
    return Softmax(zeros - jnp.inf, zeros, zeros[..., None] + jnp.zeros((value_dim,), _F32))


def heads_first(x: jax.Array) -> jax.Array:
    """`[B, L, H, D] <-> [B, H, L, D]`. Blocks are head-major inside this module: batched
    matrix products over (B, H) then need no transposes (about 1.5x faster on CPU)."""
    return jnp.swapaxes(x, 1, 2)


def _group(x: jax.Array, kv_heads: int) -> jax.Array:
    """`[B, H, L, D] -> [B, Hkv, H / Hkv, L, D]`: query head h reads kv head h // (H / Hkv)."""
    return x.reshape(x.shape[0], kv_heads, x.shape[1] // kv_heads, *x.shape[2:])


def _content_logits(
    q: jax.Array, k: jax.Array, terms: Terms, k_transposed: bool = False
) -> jax.Array:
    """`scale * (q + u) . k`, float32 `[B, H, bq, bk]` (u: the content bias, if any);
    `k` is `[B, Hkv, bk, D]`, or `[B, Hkv, D, bk]` if `k_transposed`."""
    relative = terms.relative_terms
    content_bias = None if relative is None else relative.content_bias
    if content_bias is not None:
        q = q + content_bias[:, None, :].astype(q.dtype)
    batch, heads, q_len, _ = q.shape
    grouped = _group(q, k.shape[1])
    if k_transposed:
        logits = _grouped_logits(grouped, k)
    else:
        logits = jnp.einsum("bhgqd,bhkd->bhgqk", grouped, k, preferred_element_type=_F32)
    return logits.reshape(batch, heads, q_len, -1) * terms.scale


@jax.custom_vjp
def _grouped_logits(q: jax.Array, k: jax.Array) -> jax.Array:
    """`q k` for grouped queries `[B, Hkv, G, bq, D]` and transposed keys
    `[B, Hkv, D, bk]`, float32 `[B, Hkv, G, bq, bk]`.

    The same product as the einsum, with the cotangent of the keys written as
    `q^T g -> [.., D, bk]`: JAX's own transpose rule asks for `g^T q` and a transpose of
    the small result, which XLA's CPU backend turns into a transposed copy of the whole
    `[bq, bk]` cotangent (about 1 ms per 8 x 512 x 256 block).
    """
    return jnp.einsum("bhgqd,bhdk->bhgqk", q, k, preferred_element_type=_F32)


def _grouped_logits_fwd(q, k):
    return _grouped_logits(q, k), (q, k)


def _grouped_logits_bwd(residuals, g):
    q, k = residuals
    dq = jnp.einsum("bhgqk,bhdk->bhgqd", g, k, preferred_element_type=_F32)
    dk = jnp.einsum("bhgqd,bhgqk->bhdk", q, g, preferred_element_type=_F32)
    return dq.astype(q.dtype), dk.astype(k.dtype)


_grouped_logits.defvjp(_grouped_logits_fwd, _grouped_logits_bwd)


def _allowed(block: Block, terms: Terms) -> jax.Array | None:
    """Where attention is allowed, bool broadcastable to `[B, H, bq, bk]` (None: everywhere)."""
    allowed = None
    conditions = [block.mask]
    if block.k_valid is not None:
        conditions.append(block.k_valid[None, None, None, :])
    if terms.causal:
        conditions.append(block.q_pos[:, None, :, None] >= block.k_pos[:, None, None, :])
    if block.q_seg is not None:
        conditions.append(block.q_seg[:, None, :, None] == block.k_seg[:, None, None, :])
    for condition in conditions:
        if condition is not None:
            allowed = condition if allowed is None else allowed & condition
    return allowed


def _block_logits(block: Block, terms: Terms) -> tuple[jax.Array, jax.Array | None]:
    """Float32 logits `[B, H, bq, bk]` and where attention is allowed (None: everywhere)."""
    q, k = block.q, block.k
    batch, heads, q_len, _ = q.shape
    shape = (batch, heads, q_len, k.shape[3 if terms.keys_transposed else 2])
    relative = terms.relative_terms or RelativeTerms()
    allowed = _allowed(block, terms)
    logits = _content_logits(q, k, terms, terms.keys_transposed)
    if terms.alternate_select is not None:
        # Two content logits per block, one chosen per pair (SelfExtend's merge).
        select = terms.alternate_select(block.q_pos, block.k_pos)
        check_broadcastable("alternate.select", select, shape)
        alternate = _content_logits(block.q_extra.alternate, block.k_extra.alternate, terms)
        logits = jnp.where(select, alternate, logits)
    if terms.contextual_bias is not None:
        # The block holds every key of its rows (xla path): CoPE's gates read the content
        # logits of all of them.
        contextual = terms.contextual_bias
        scaled_q = heads_first(q * jnp.asarray(terms.scale, q.dtype))
        bias = contextual.fn(scaled_q, logits, allowed, contextual.params)
        check_broadcastable("contextual_bias.fn", bias, shape)
        logits = logits + bias.astype(_F32)
    if terms.bias_fn is not None:
        bias = terms.bias_fn(block.q_pos, block.k_pos)
        check_broadcastable("bias_fn", bias, shape)
        logits = logits + bias.astype(_F32)
    if terms.token_bias_fn is not None:
        bias = terms.token_bias_fn(block.q_extra.token_values, block.k_extra.token_values)
        check_broadcastable("token_bias.fn", bias, shape)
        logits = logits + bias.astype(_F32)
    if relative.query_bias_fn is not None:
        bias = relative.query_bias_fn(
            heads_first(q * jnp.asarray(terms.scale, q.dtype)), block.q_pos, block.k_pos
        )
        check_broadcastable("relative_terms.query_bias_fn", bias, shape)
        logits = logits + bias.astype(_F32)
    return logits, allowed


def masked_logits(block: Block, terms: Terms) -> jax.Array:
    """Logits with -inf where attention is not allowed.

    Masked logits become -inf *before* any exp, so neither exp nor its derivative ever
    sees a large masked value (no inf * 0 = NaN in a gradient).
    """
    logits, allowed = _block_logits(block, terms)
    return logits if allowed is None else jnp.where(allowed, logits, -jnp.inf)


def weighted_values(weights: jax.Array, block: Block, terms: Terms) -> jax.Array:
    """`sum_j w_ij v_j + value_fn(w)_i`, float32 `[B, H, bq, Dv]`, linear in `weights`."""
    kv_heads = block.v.shape[1]
    batch, heads, q_len, _ = weights.shape
    grouped = weights.reshape(batch, kv_heads, heads // kv_heads, q_len, -1)
    spec = "bhgqk,bhdk->bhgqd" if terms.values_transposed else "bhgqk,bhkd->bhgqd"
    values = jnp.einsum(
        spec, grouped.astype(block.v.dtype), block.v, preferred_element_type=_F32
    ).reshape(batch, heads, q_len, -1)
    value_fn = terms.relative_terms.value_fn if terms.relative_terms is not None else None
    if value_fn is not None:
        value_term = value_fn(weights, block.q_pos, block.k_pos)
        target = (batch, q_len, heads, values.shape[-1])
        check_broadcastable("relative_terms.value_fn", value_term, target)
        values = values + heads_first(jnp.broadcast_to(value_term, target)).astype(_F32)
    return values


def _shift(row_max: jax.Array) -> jax.Array:
    """The running maximum, or 0 for rows that have not seen an allowed key yet."""
    return jnp.where(jnp.isneginf(row_max), 0.0, row_max)


def accumulate(state: Softmax, block: Block, terms: Terms) -> Softmax:
    """Folds one key block into the online softmax of one query block."""
    logits = masked_logits(block, terms)
    # The softmax is invariant to the subtracted maximum, so no gradient flows through it.
    row_max = lax.stop_gradient(jnp.maximum(state.row_max, logits.max(axis=-1)))
    rescale = jnp.exp(state.row_max - _shift(row_max))
    weights = jnp.exp(logits - _shift(row_max)[..., None])
    return Softmax(
        row_max,
        rescale * state.row_sum + weights.sum(axis=-1),
        rescale[..., None] * state.numerator + weighted_values(weights, block, terms),
    )


def finalize(state: Softmax) -> jax.Array:
    """Normalised output `[B, H, bq, Dv]`; rows that saw no allowed key give zeros."""
    row_sum = state.row_sum[..., None]
    return state.numerator / jnp.where(row_sum > 0, row_sum, 1.0)


def log_normalizer(state: Softmax) -> jax.Array:
    """`log sum_j exp(logit_ij)` `[B, H, bq]`; +inf for empty rows, so exp(-inf - it) = 0."""
    row_sum = state.row_sum
    safe = jnp.where(row_sum > 0, row_sum, 1.0)
    return jnp.where(row_sum > 0, _shift(state.row_max) + jnp.log(safe), jnp.inf)
