"""Dot-product attention with positional terms evaluated one block at a time.

Two implementations share every formula:

* `implementation="xla"` evaluates the whole `[B, H, Lq, Lk]` logit matrix at once
  (the reference, and the fastest choice for short sequences).
* `implementation="blockwise"` walks over query blocks and, for each, over key blocks,
  keeping a running maximum, a running sum and an unnormalised output per query
  (the online softmax of Milakov & Gimelshein 2018, used by Rabe & Staats 2021 and
  FlashAttention). Positional terms (`bias_fn`, `RelativeTerms`) are called for the
  block in hand only, so no `Lq x Lk` array ever exists. Its gradient is a custom VJP
  (FlashAttention's backward pass): it stores the output and one log-normalizer per
  query and recomputes each block, so the memory of forward and backward grows
  linearly with the sequence length. Being a custom VJP, it supports reverse-mode
  differentiation (`jax.grad`, `jax.vjp`) but not forward mode (`jax.jvp`).

Logits are `scale * (q + u) . k + bias_fn(q_pos, k_pos) + query_bias_fn(scale * q, ...)`
(u: the optional content bias of `RelativeTerms`); the softmax runs in float32 and the
output keeps the query's dtype. A query that may attend to nothing (fully masked row)
returns zeros, with zero gradients, in both implementations.

Also here: `make_attention_fn`, which plugs any registered encoding into
`flax.linen.MultiHeadDotProductAttention(attention_fn=...)`, and a small KV cache for
token-by-token decoding (`KVCache`, `init_cache`, `update_cache`, `cached_attention`).

References:
  Rabe & Staats, 2021, Self-attention Does Not Need O(n^2) Memory.
  Dao et al., 2022, FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness.
  Milakov & Gimelshein, 2018, Online normalizer calculation for softmax.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jax_posenc import _checks, _protocols, registry
from jax_posenc._protocols import BiasFn, RelativeTerms

IMPLEMENTATIONS = ("xla", "blockwise")
# Blockwise (q_block, k_block) when none is given: small blocks stay in the CPU caches
# ((256, 128) was among the fastest on a 2-core CPU at L = 2k, forward and backward),
# larger ones amortise the per-iteration launch cost of the loops on accelerators.
CPU_BLOCK_SIZE = (256, 128)
ACCELERATOR_BLOCK_SIZE = (512, 512)

_F32 = jnp.float32


# ------------------------------------------------------------------ validation


def _check_attention_inputs(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.check_floating_array(name, x)
        _checks.check_rank(name, x, 4)
    batch, _, heads, dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(
            f"q, k and v must share the batch size, got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k and v must have the same [B, Lk, Hkv] dimensions, got k {k.shape}, v {v.shape}"
        )
    if k.shape[3] != dim:
        raise ValueError(f"q and k must have the same head_dim, got q {q.shape}, k {k.shape}")
    if heads % k.shape[2]:
        raise ValueError(
            f"the number of query heads ({heads}) must be a multiple of the number of "
            f"key/value heads ({k.shape[2]}) for grouped-query attention"
        )


def _batched_ids(name: str, value, length: int, batch: int) -> jax.Array:
    """Integer `[L]` or `[B, L]` ids/positions as int32 `[B or 1, L]` (values must fit int32)."""
    value = _checks.check_positions(name, value)
    _checks.check_rank(name, value, (1, 2))
    value = jnp.atleast_2d(value)
    if value.shape[-1] != length or value.shape[0] not in (1, batch):
        raise ValueError(
            f"{name} must have shape [{length}] or [{batch} or 1, {length}], "
            f"got {tuple(value.shape)}"
        )
    return value.astype(jnp.int32)


def _check_broadcastable(name: str, value: jax.Array, target: tuple[int, ...]) -> None:
    shape = tuple(jnp.shape(value))
    if len(shape) != len(target) or any(
        s not in (1, t) for s, t in zip(shape, target, strict=True)
    ):
        raise ValueError(
            f"{name} must return an array broadcastable to {list(target)} "
            f"(same rank, each dimension 1 or equal), got shape {list(shape)}"
        )


def _mask_as_rank4(mask, target: tuple[int, int, int, int]) -> jax.Array:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be a boolean array, got dtype {mask.dtype}")
    if mask.ndim > 4:
        raise ValueError(f"mask must have rank <= 4, got shape {mask.shape}")
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if any(s not in (1, t) for s, t in zip(mask.shape, target, strict=True)):
        raise ValueError(
            f"mask must be broadcastable to [B, H, Lq, Lk] = {list(target)}, got {mask.shape}"
        )
    return mask


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions that restart at 0 wherever the segment id changes along the sequence.

    Args:
      segment_ids: integer `[..., L]` document ids of packed sequences.

    Returns:
      int32 `[..., L]`: the offset of each token from the start of its run of equal ids,
      e.g. `[7, 7, 7, 2, 2, 9] -> [0, 1, 2, 0, 1, 0]`.
    """
    segment_ids = _checks.check_integer_array("segment_ids", segment_ids)
    length = segment_ids.shape[-1]
    index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids.shape)
    first = jnp.ones((*segment_ids.shape[:-1], 1), bool)
    starts = jnp.concatenate([first, segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    return index - lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)


# ------------------------------------------------------------------ one block


class _Terms(NamedTuple):
    """Static configuration of the logits, shared by every block."""

    scale: float
    causal: bool
    bias_fn: BiasFn | None
    relative_terms: RelativeTerms | None


class _Block(NamedTuple):
    """The arrays of one (query block, key block) pair; any of the last five may be None."""

    q: jax.Array  # [B, H, bq, D] (head-major inside this module, see `_heads_first`)
    k: jax.Array  # [B, Hkv, bk, D]
    v: jax.Array  # [B, Hkv, bk, Dv]
    q_pos: jax.Array  # [B or 1, bq]
    k_pos: jax.Array  # [B or 1, bk]
    q_seg: jax.Array | None  # [B or 1, bq]
    k_seg: jax.Array | None  # [B or 1, bk]
    mask: jax.Array | None  # [B or 1, H or 1, bq or 1, bk or 1]
    k_valid: jax.Array | None  # [bk], False on padding


class _Softmax(NamedTuple):
    """Online-softmax state for one query block."""

    row_max: jax.Array  # [B, H, bq]; -inf until an allowed key is seen
    row_sum: jax.Array  # [B, H, bq]
    numerator: jax.Array  # [B, H, bq, Dv], float32


def _init_softmax(q: jax.Array, value_dim: int, anchor: jax.Array | float = 0.0) -> _Softmax:
    """The empty state for queries `q` `[B, H, bq, D]`.

    Made with `zeros_like(q)`, so under sharding-in-types (explicit mesh axes) the state
    has the sharding of `q`, as the loop body's results do; see `_anchor` for
    `shard_map`.
    """
    zeros = jnp.zeros_like(q[..., 0], _F32) + anchor
    return _Softmax(zeros - jnp.inf, zeros, zeros[..., None] + jnp.zeros((value_dim,), _F32))


def _heads_first(x: jax.Array) -> jax.Array:
    """`[B, L, H, D] <-> [B, H, L, D]`. Blocks are head-major inside this module: batched
    matrix products over (B, H) then need no transposes (about 1.5x faster on CPU)."""
    return jnp.swapaxes(x, 1, 2)


def _group(x: jax.Array, kv_heads: int) -> jax.Array:
    """`[B, H, L, D] -> [B, Hkv, H / Hkv, L, D]`: query head h reads kv head h // (H / Hkv)."""
    return x.reshape(x.shape[0], kv_heads, x.shape[1] // kv_heads, *x.shape[2:])


def _block_logits(block: _Block, terms: _Terms) -> tuple[jax.Array, jax.Array | None]:
    """Float32 logits `[B, H, bq, bk]` and where attention is allowed (None: everywhere)."""
    q, k = block.q, block.k
    batch, heads, q_len, _ = q.shape
    shape = (batch, heads, q_len, k.shape[2])
    relative = terms.relative_terms or RelativeTerms()
    content_q = q
    if relative.content_bias is not None:
        content_q = q + relative.content_bias[:, None, :].astype(q.dtype)
    logits = jnp.einsum(
        "bhgqd,bhkd->bhgqk", _group(content_q, k.shape[1]), k, preferred_element_type=_F32
    ).reshape(shape)
    logits = logits * terms.scale
    if terms.bias_fn is not None:
        bias = terms.bias_fn(block.q_pos, block.k_pos)
        _check_broadcastable("bias_fn", bias, shape)
        logits = logits + bias.astype(_F32)
    if relative.query_bias_fn is not None:
        bias = relative.query_bias_fn(
            _heads_first(q * jnp.asarray(terms.scale, q.dtype)), block.q_pos, block.k_pos
        )
        _check_broadcastable("relative_terms.query_bias_fn", bias, shape)
        logits = logits + bias.astype(_F32)

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
    return logits, allowed


def _masked_logits(block: _Block, terms: _Terms) -> jax.Array:
    """Logits with -inf where attention is not allowed.

    Masked logits become -inf *before* any exp, so neither exp nor its derivative ever
    sees a large masked value (no inf * 0 = NaN in a gradient).
    """
    logits, allowed = _block_logits(block, terms)
    return logits if allowed is None else jnp.where(allowed, logits, -jnp.inf)


def _weighted_values(weights: jax.Array, block: _Block, terms: _Terms) -> jax.Array:
    """`sum_j w_ij v_j + value_fn(w)_i`, float32 `[B, H, bq, Dv]`, linear in `weights`."""
    kv_heads = block.v.shape[1]
    batch, heads, q_len, _ = weights.shape
    grouped = weights.reshape(batch, kv_heads, heads // kv_heads, q_len, -1)
    values = jnp.einsum(
        "bhgqk,bhkd->bhgqd", grouped.astype(block.v.dtype), block.v, preferred_element_type=_F32
    ).reshape(batch, heads, q_len, block.v.shape[-1])
    value_fn = terms.relative_terms.value_fn if terms.relative_terms is not None else None
    if value_fn is not None:
        value_term = value_fn(weights, block.q_pos, block.k_pos)
        target = (batch, q_len, heads, block.v.shape[-1])
        _check_broadcastable("relative_terms.value_fn", value_term, target)
        values = values + _heads_first(jnp.broadcast_to(value_term, target)).astype(_F32)
    return values


def _shift(row_max: jax.Array) -> jax.Array:
    """The running maximum, or 0 for rows that have not seen an allowed key yet."""
    return jnp.where(jnp.isneginf(row_max), 0.0, row_max)


def _accumulate(state: _Softmax, block: _Block, terms: _Terms) -> _Softmax:
    """Folds one key block into the online softmax of one query block."""
    logits = _masked_logits(block, terms)
    # The softmax is invariant to the subtracted maximum, so no gradient flows through it.
    row_max = lax.stop_gradient(jnp.maximum(state.row_max, logits.max(axis=-1)))
    rescale = jnp.exp(state.row_max - _shift(row_max))
    weights = jnp.exp(logits - _shift(row_max)[..., None])
    return _Softmax(
        row_max,
        rescale * state.row_sum + weights.sum(axis=-1),
        rescale[..., None] * state.numerator + _weighted_values(weights, block, terms),
    )


def _finalize(state: _Softmax) -> jax.Array:
    """Normalised output `[B, H, bq, Dv]`; rows that saw no allowed key give zeros."""
    row_sum = state.row_sum[..., None]
    return state.numerator / jnp.where(row_sum > 0, row_sum, 1.0)


def _log_normalizer(state: _Softmax) -> jax.Array:
    """`log sum_j exp(logit_ij)` `[B, H, bq]`; +inf for empty rows, so exp(-inf - it) = 0."""
    row_sum = state.row_sum
    safe = jnp.where(row_sum > 0, row_sum, 1.0)
    return jnp.where(row_sum > 0, _shift(state.row_max) + jnp.log(safe), jnp.inf)


# ------------------------------------------------------------------ blockwise


def _pad_axis(x: jax.Array | None, axis: int, size: int, mode: str) -> jax.Array | None:
    """Pads `axis` to `size`; "edge" repeats the last entry, "false" appends False."""
    if x is None or x.shape[axis] in (1, size):
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    if mode == "edge":
        return jnp.pad(x, widths, mode="edge")
    return jnp.pad(x, widths)


def _split_blocks(x: jax.Array | None, axis: int, block: int) -> jax.Array | None:
    """`[..., n * block, ...] -> [n, ..., block, ...]` (blocks along `axis` moved to front)."""
    if x is None:
        return None
    shape = (*x.shape[:axis], x.shape[axis] // block, block, *x.shape[axis + 1 :])
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _merge_blocks(x: jax.Array, axis: int) -> jax.Array:
    """Inverse of `_split_blocks`: `[n, ..., block, ...] -> [..., n * block, ...]`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2 :])


def _slice_mask(mask: jax.Array | None, axis: int, index: jax.Array, size: int):
    if mask is None or mask.shape[axis] == 1:
        return mask
    return lax.dynamic_slice_in_dim(mask, index * size, size, axis=axis)


def _hoist(fn: Callable | None, *examples: jax.Array):
    """`(fn', consts)` with `fn'(*args, *consts) == fn(*args)` for block-shaped args.

    A positional term may close over arrays: learned tables and MLP weights, but also
    integer arrays or values traced by an enclosing `jit`, `scan` or `checkpoint`. The
    custom VJP below must receive every one of them as an explicit argument (a traced
    value it closed over would leak into its own trace), and it can only return
    gradients for arguments. `jax.closure_convert` hoists only the values that may carry
    a tangent, so this traces `fn` once to a jaxpr and hoists all of its constants.
    """
    if fn is None:
        return None, ()
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*examples)
    out_tree = jax.tree.structure(out_shape)
    num_args = len(examples)

    def hoisted(*args_and_consts):
        args, consts = args_and_consts[:num_args], args_and_consts[num_args:]
        return jax.tree.unflatten(out_tree, jax.core.eval_jaxpr(closed.jaxpr, consts, *args))

    return hoisted, tuple(closed.consts)


def _call_with(fn: Callable, consts: tuple, *args):
    return fn(*args, *consts)


def _anchor(*trees) -> jax.Array:
    """A float32 scalar 0 of the same manual-axes type as every leaf of `trees` together.

    Inside `shard_map`, a loop's initial carry must have the type of what its body
    returns, which varies over the mesh axes its inputs vary over; zeros made from
    scratch vary over none. Adding this anchor fixes that (and is a constant 0
    elsewhere).
    """
    zero = jnp.zeros((), _F32)
    for leaf in jax.tree.leaves(trees):
        zero = zero + jnp.zeros_like(leaf, _F32).sum()  # constant-folded by XLA
    return zero


def _float32_zeros(tree, anchor: jax.Array | float = 0.0):
    """Float32 zeros shaped (and sharded) like every leaf of `tree`."""
    return jax.tree.map(lambda x: jnp.zeros_like(x, _F32) + anchor, tree)


def _add_float32(total, tree):
    return jax.tree.map(lambda a, b: a + b.astype(_F32), total, tree)


def _varying_axes(x) -> frozenset:
    """The manual mesh axes (inside `shard_map`) over which `x` varies; empty elsewhere."""
    axis_type = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(getattr(axis_type, "varying", ()))


def _cotangent(gradient: jax.Array, primal) -> jax.Array | None:
    """`gradient` as the cotangent of `primal`; None (zero) for integer/bool primals.

    Inside `shard_map`, a primal that is the same on every device (e.g. a bias table)
    gets the sum of the per-device partial gradients, as JAX's own AD does.
    """
    if not jnp.issubdtype(jnp.result_type(primal), jnp.inexact):
        return None
    extra = _varying_axes(gradient) - _varying_axes(primal)
    if extra:
        gradient = lax.psum(gradient, tuple(sorted(extra)))
    return gradient.astype(jnp.result_type(primal))


class _Tiling(NamedTuple):
    """Static settings of the blockwise loops: the first, non-differentiable argument
    of `_blockwise_attention`. The three functions are hoisted (`_hoist`): they read
    their arrays from the `consts` argument, never from a closure."""

    scale: float
    causal: bool
    q_block: int
    k_block: int
    k_len: int  # keys at or after this index are padding
    bias_fn: Callable | None
    query_bias_fn: Callable | None
    value_fn: Callable | None


def _bind_terms(tiling: _Tiling, content_bias, consts) -> _Terms:
    bound = [
        None if fn is None else functools.partial(_call_with, fn, extra)
        for fn, extra in zip(
            (tiling.bias_fn, tiling.query_bias_fn, tiling.value_fn), consts, strict=True
        )
    ]
    return _Terms(
        tiling.scale, tiling.causal, bound[0], RelativeTerms(bound[1], bound[2], content_bias)
    )


def _bounds(blocks: jax.Array | None):
    """Per-block `(min, max)` over batch and block of `[n, B, block]` ids, or None."""
    return None if blocks is None else (blocks.min(axis=(1, 2)), blocks.max(axis=(1, 2)))


def _query_inputs(tiling: _Tiling, q, q_pos, q_seg):
    """What `lax.map`/`lax.scan` over query blocks reads: index, block, ids, bounds."""
    pos, seg = _split_blocks(q_pos, 1, tiling.q_block), _split_blocks(q_seg, 1, tiling.q_block)
    num_q = q.shape[2] // tiling.q_block
    return (jnp.arange(num_q), _split_blocks(q, 2, tiling.q_block), pos, seg,
            (_bounds(pos), _bounds(seg)))  # fmt: skip


def _key_inputs(tiling: _Tiling, k, v, k_pos, k_seg):
    """What the scan over key blocks reads: index, blocks, ids, padding flags, bounds."""
    k_block, k_pad = tiling.k_block, k.shape[2]
    pos, seg = _split_blocks(k_pos, 1, k_block), _split_blocks(k_seg, 1, k_block)
    valid = None
    if k_pad != tiling.k_len:
        valid = _split_blocks(jnp.arange(k_pad) < tiling.k_len, 0, k_block)
    blocks = (_split_blocks(k, 2, k_block), _split_blocks(v, 2, k_block))
    return (jnp.arange(k_pad // k_block), *blocks, pos, seg, valid, (_bounds(pos), _bounds(seg)))


def _is_empty(causal: bool, q_bound, k_bound) -> jax.Array:
    """Whether a block pair provably has no allowed entry.

    Causal and every query position of the block is below every key position of the
    other (max q_pos < min k_pos over the whole batch), or the ranges of segment ids of
    the two blocks are disjoint. This holds for arbitrary positions, and for arange
    positions it drops exactly the blocks above the diagonal.
    """
    (_, q_pos_max), q_seg_range = q_bound
    (k_pos_min, _), k_seg_range = k_bound
    empty = jnp.asarray(False)
    if causal:
        empty = empty | (q_pos_max < k_pos_min)
    if q_seg_range is not None:
        empty = empty | (q_seg_range[1] < k_seg_range[0]) | (k_seg_range[1] < q_seg_range[0])
    return empty


def _scan_key_blocks(tiling: _Tiling, step, carry, q_inputs, k_inputs, mask, skipped=None):
    """`carry, output_j = step(carry, block)` over the key blocks of one query block.

    Returns the final carry and the outputs stacked over key blocks; a skipped pair
    leaves the carry as it is and outputs `skipped`. Carries stay block-sized: a
    loop-carried full-length array would be copied through every `lax.cond`.
    """
    index, q_i, q_pos_i, q_seg_i, q_bound = q_inputs
    mask_i = _slice_mask(mask, 2, index, tiling.q_block)

    def body(carry, key_inputs):
        j, k_j, v_j, k_pos_j, k_seg_j, valid_j, k_bound = key_inputs
        block = _Block(
            q_i, k_j, v_j, q_pos_i, k_pos_j, q_seg_i, k_seg_j,
            _slice_mask(mask_i, 3, j, tiling.k_block), valid_j,
        )  # fmt: skip
        if not (tiling.causal or q_seg_i is not None):
            return step(carry, block)
        skip = _is_empty(tiling.causal, q_bound, k_bound)
        return lax.cond(skip, lambda c: (c, skipped), lambda c: step(c, block), carry)

    return lax.scan(body, carry, k_inputs)


def _blockwise_forward(tiling, q, k, v, content_bias, q_pos, k_pos, q_seg, k_seg, mask, consts):
    """Output blocks `[nq, B, H, bq, Dv]` and log-normalizers `[nq, B, H, bq]`."""
    terms = _bind_terms(tiling, content_bias, consts)
    k_inputs = _key_inputs(tiling, k, v, k_pos, k_seg)
    anchor = _anchor(q, k, v, content_bias, q_pos, k_pos, q_seg, k_seg, mask, consts)

    def one_query_block(q_inputs):
        state, _ = _scan_key_blocks(
            tiling,
            lambda state, block: (_accumulate(state, block, terms), None),
            _init_softmax(q_inputs[1], v.shape[-1], anchor),
            q_inputs,
            k_inputs,
            mask,
        )
        return _finalize(state), _log_normalizer(state)

    return lax.map(one_query_block, _query_inputs(tiling, q, q_pos, q_seg))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise_attention(tiling, q, k, v, content_bias, q_pos, k_pos, q_seg, k_seg, mask, consts):
    """Online-softmax attention over (query block, key block) pairs; see the module doc.

    Every array it reads is an argument (q, k, v `[B, H, L, D]` padded to whole blocks,
    positions and segment ids `[B or 1, L]`, the mask, the hoisted constants of the
    positional terms), so it composes with jit at any depth, checkpoint, scan and vmap.
    Returns `[B, H, Lq_padded, Dv]` float32.
    """
    out, _ = _blockwise_forward(
        tiling, q, k, v, content_bias, q_pos, k_pos, q_seg, k_seg, mask, consts
    )
    return _merge_blocks(out, 2)


def _blockwise_attention_fwd(tiling, *args):
    out, log_normalizer = _blockwise_forward(tiling, *args)
    return _merge_blocks(out, 2), (args, out, log_normalizer)


def _blockwise_attention_bwd(tiling, residuals, d_out):
    """FlashAttention's backward pass: recompute each block's weights from the stored
    log-normalizer and get every gradient (q, k, v, content bias, constants of the
    positional terms) from `jax.vjp` of the same per-block functions as the forward."""
    args, out, log_normalizer = residuals
    q, k, v, content_bias, q_pos, k_pos, q_seg, k_seg, mask, consts = args
    d_out = _split_blocks(d_out, 2, tiling.q_block)  # [nq, B, H, bq, Dv]
    # sum_j p_ij dp_ij = d_out_i . out_i, since out_i is linear in row i of p.
    d_out_dot_out = jnp.sum(d_out * out, axis=-1)  # [nq, B, H, bq]
    k_inputs = _key_inputs(tiling, k, v, k_pos, k_seg)
    k_blocks, v_blocks = k_inputs[1], k_inputs[2]
    anchor = _anchor(args, d_out)

    def one_query_block(grads, inputs):
        *q_inputs, d_out_i, log_normalizer_i, d_out_dot_out_i = inputs

        def step(grads, block):
            dq_i, d_content_bias, d_consts = grads

            def logits_of(q_i, k_j, content_bias, consts):
                terms = _bind_terms(tiling, content_bias, consts)
                return _masked_logits(block._replace(q=q_i, k=k_j), terms)

            def values_of(weights, v_j, consts):
                terms = _bind_terms(tiling, content_bias, consts)
                return _weighted_values(weights, block._replace(v=v_j), terms)

            logits, logits_vjp = jax.vjp(logits_of, block.q, block.k, content_bias, consts)
            weights = jnp.exp(logits - log_normalizer_i[..., None])
            _, values_vjp = jax.vjp(values_of, weights, block.v, consts)
            d_weights, dv_j, d_consts_values = values_vjp(d_out_i)
            d_logits = weights * (d_weights - d_out_dot_out_i[..., None])
            dq_ij, dk_j, d_content_bias_j, d_consts_logits = logits_vjp(d_logits)
            grads = (
                dq_i + dq_ij.astype(_F32),
                _add_float32(d_content_bias, d_content_bias_j),
                _add_float32(_add_float32(d_consts, d_consts_logits), d_consts_values),
            )
            return grads, (dk_j.astype(_F32), dv_j.astype(_F32))

        dk, dv, d_content_bias, d_consts = grads
        zeros = (_float32_zeros(k_blocks[0], anchor), _float32_zeros(v_blocks[0], anchor))
        (dq_i, d_content_bias, d_consts), (dk_i, dv_i) = _scan_key_blocks(
            tiling,
            step,
            (_float32_zeros(q_inputs[1], anchor), d_content_bias, d_consts),
            q_inputs,
            k_inputs,
            mask,
            zeros,
        )
        return (dk + dk_i, dv + dv_i, d_content_bias, d_consts), dq_i

    initial = _float32_zeros((k_blocks, v_blocks, content_bias, consts), anchor)
    inputs = (*_query_inputs(tiling, q, q_pos, q_seg), d_out, log_normalizer, d_out_dot_out)
    (dk, dv, d_content_bias, d_consts), dq = lax.scan(one_query_block, initial, inputs)
    grads = (_merge_blocks(dq, 2), _merge_blocks(dk, 2), _merge_blocks(dv, 2), d_content_bias)
    q_grad, k_grad, v_grad, bias_grad = jax.tree.map(_cotangent, grads, (q, k, v, content_bias))
    const_grads = jax.tree.map(_cotangent, d_consts, consts)
    # Positions, segment ids and the mask are integer or boolean: zero cotangents.
    return q_grad, k_grad, v_grad, bias_grad, None, None, None, None, None, const_grads


_blockwise_attention.defvjp(_blockwise_attention_fwd, _blockwise_attention_bwd)


def _blockwise(q, k, v, q_pos, k_pos, q_seg, k_seg, mask, terms: _Terms, block_size):
    """Pads to whole blocks, hoists the positional terms and runs `_blockwise_attention`."""
    batch, heads, q_len, dim = q.shape
    k_len = k.shape[2]
    q_block, k_block = min(block_size[0], q_len), min(block_size[1], k_len)
    q_pad, k_pad = -(-q_len // q_block) * q_block, -(-k_len // k_block) * k_block
    # Padded queries are dropped at the end; padded keys are masked out (`k_len`).
    # Positions and segment ids are padded with their last value, so per-block bounds
    # are bounds of real tokens.
    q_pos, q_seg = (_pad_axis(x, 1, q_pad, "edge") for x in (q_pos, q_seg))
    k_pos, k_seg = (_pad_axis(x, 1, k_pad, "edge") for x in (k_pos, k_seg))
    q = _pad_axis(q, 2, q_pad, "edge")
    k, v = (_pad_axis(x, 2, k_pad, "edge") for x in (k, v))
    mask = _pad_axis(_pad_axis(mask, 2, q_pad, "false"), 3, k_pad, "false")

    relative = terms.relative_terms or RelativeTerms()
    q_pos_block = jnp.zeros((q_pos.shape[0], q_block), jnp.int32)
    k_pos_block = jnp.zeros((k_pos.shape[0], k_block), jnp.int32)
    functions, consts = zip(
        _hoist(terms.bias_fn, q_pos_block, k_pos_block),
        _hoist(
            relative.query_bias_fn,
            jnp.zeros((batch, q_block, heads, dim), q.dtype),  # the protocol's [B, bq, H, D]
            q_pos_block,
            k_pos_block,
        ),
        _hoist(
            relative.value_fn,
            jnp.zeros((batch, heads, q_block, k_block), _F32),
            q_pos_block,
            k_pos_block,
        ),
        strict=True,
    )
    tiling = _Tiling(terms.scale, terms.causal, q_block, k_block, k_len, *functions)
    out = _blockwise_attention(
        tiling, q, k, v, relative.content_bias, q_pos, k_pos, q_seg, k_seg, mask, consts
    )
    return out[:, :, :q_len]


# ------------------------------------------------------------------ public function


def _block_sizes(block_size) -> tuple[int, int]:
    if block_size is None:
        return CPU_BLOCK_SIZE if jax.default_backend() == "cpu" else ACCELERATOR_BLOCK_SIZE
    if isinstance(block_size, tuple | list):
        if len(block_size) != 2:
            raise ValueError(
                f"block_size must be an int or a pair (q_block, k_block), got {block_size!r}"
            )
        return (
            _checks.check_positive_int("block_size[0]", block_size[0]),
            _checks.check_positive_int("block_size[1]", block_size[1]),
        )
    size = _checks.check_positive_int("block_size", block_size)
    return size, size


def _resolve_segments(segment_ids, q_len: int, k_len: int, batch: int):
    """(q_segment_ids, k_segment_ids, restart_positions) from one array or a pair."""
    if segment_ids is None:
        return None, None, False
    if isinstance(segment_ids, tuple | list):
        if len(segment_ids) != 2:
            raise ValueError("segment_ids must be one array or a pair (q_ids, k_ids)")
        return (
            _batched_ids("segment_ids[0]", segment_ids[0], q_len, batch),
            _batched_ids("segment_ids[1]", segment_ids[1], k_len, batch),
            False,
        )
    if q_len != k_len:
        raise ValueError(
            f"segment_ids as one array needs Lq == Lk, got Lq={q_len}, Lk={k_len}; "
            "pass a pair (q_segment_ids, k_segment_ids)"
        )
    ids = _batched_ids("segment_ids", segment_ids, q_len, batch)
    return ids, ids, True


def _resolve_positions(q_positions, k_positions, lengths, batch, restart_from, *, needed):
    """int32 `[B or 1, L]` query and key positions, with the documented defaults.

    Defaults are `arange(L)`, or positions restarting per segment when `restart_from`
    holds (q, k) segment ids. A missing `q_positions` with `Lq != Lk` raises when
    `needed`, since no default can know where the queries sit.
    """
    q_len, k_len = lengths
    if q_positions is None and q_len != k_len and needed:
        raise ValueError(
            f"q_positions must be given when Lq ({q_len}) != Lk ({k_len}) and attention "
            "depends on positions (causal or a positional term); e.g. for decoding after "
            "a cache of n tokens, q_positions = n + arange(Lq)"
        )
    defaults = [jnp.arange(q_len), jnp.arange(k_len)]
    if restart_from is not None:
        defaults = [segment_positions(ids) for ids in restart_from]
    q_positions = defaults[0] if q_positions is None else q_positions
    k_positions = defaults[1] if k_positions is None else k_positions
    return (
        _batched_ids("q_positions", q_positions, q_len, batch),
        _batched_ids("k_positions", k_positions, k_len, batch),
    )


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias_fn: BiasFn | None = None,
    relative_terms: RelativeTerms | None = None,
    q_positions: jax.Array | None = None,
    k_positions: jax.Array | None = None,
    mask: jax.Array | None = None,
    causal: bool = False,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    implementation: str = "xla",
    block_size: int | tuple[int, int] | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Softmax attention whose positional terms are functions of positions.

    `logits[b, h, i, j] = scale * (q[b, i, h] + u[h]) . k[b, j, h // G]
    + bias_fn(q_pos, k_pos)[b, h, i, j] + query_bias_fn(scale * q, q_pos, k_pos)[b, h, i, j]`
    where `G = H / Hkv` (grouped-query attention; `Hkv = H` is ordinary multi-head
    attention) and u is `relative_terms.content_bias` (zero when None). Positions where
    attention is not allowed are dropped from the softmax, and
    `out[b, i, h] = sum_j softmax_j(logits) v[b, j, h // G] + value_fn(softmax, ...)`.
    A query with no allowed key gets a zero output (and zero gradients), never NaN.

    Attention is allowed from query i to key j where all of these hold:
      * `mask[b, h, i, j]` (when given);
      * `causal`: `q_pos[i] >= k_pos[j]`, decided from positions, so queries that sit
        after a KV cache (q positions offset by the cache length) see the whole cache;
      * `segment_ids`: `q_segment[i] == k_segment[j]` (packed sequences).

    Positions: integer `[L]` or `[B, L]`. When omitted they are `arange(L)`, except that
    with `segment_ids` given as one `[B, L]` array they restart at 0 at every segment
    start (`segment_positions`), so each packed document sees the positions it would
    see alone. When `Lq != Lk` and positions matter (causal or a positional term),
    `q_positions` must be given: a default would silently misplace the queries.

    Memory: `xla` holds `[B, H, Lq, Lk]` logits. `blockwise` holds one
    `[B, H, bq, bk]` block at a time, forward and backward (a custom VJP recomputes
    the blocks), so its memory is linear in the sequence length, provided the masking
    itself is O(L): use `causal`, `segment_ids` and positions for that. A full `mask`
    is accepted (and sliced per block) but is an `Lq x Lk` array by itself.
    With `causal` or `segment_ids`, blockwise skips a (query block, key block) pair,
    without computing it, when it is provably empty: causal and the largest query
    position of the block is below the smallest key position of the other (over the
    batch), or the ranges of segment ids of the two blocks do not overlap. The rule
    holds for any positions; with `arange` positions it drops exactly the blocks above
    the diagonal, about half the work of causal attention.

    Args:
      q: queries `[B, Lq, H, D]`.
      k: keys `[B, Lk, Hkv, D]`, `H % Hkv == 0`.
      v: values `[B, Lk, Hkv, Dv]`.
      bias_fn: `bias_fn(q_positions [B or 1, bq], k_positions [B or 1, bk])
        -> [B or 1, H or 1, bq, bk]` additive logit bias (ALiBi, T5, KERPLE, FIRE, ...).
      relative_terms: content-dependent terms, see `jax_posenc.RelativeTerms`; its
        `value_fn` must be linear in the weights and act on each query row separately.
      q_positions: integer `[Lq]` or `[B, Lq]`.
      k_positions: integer `[Lk]` or `[B, Lk]`.
      mask: boolean, broadcastable to `[B, H, Lq, Lk]`; True where attention is allowed.
      causal: whether query i may only attend to keys with `k_pos <= q_pos`.
      segment_ids: integer `[B, L]` (self-attention, `Lq == Lk`) or a pair
        `(q_segment_ids [B, Lq], k_segment_ids [B, Lk])`.
      implementation: "xla" or "blockwise".
      block_size: blockwise only; an int or a pair `(q_block, k_block)`, clipped to the
        sequence lengths; lengths that are not multiples are padded internally. None:
        `CPU_BLOCK_SIZE` on CPU, `ACCELERATOR_BLOCK_SIZE` on GPU/TPU.
      scale: logit scale; `1 / sqrt(D)` when None.

    Returns:
      `[B, Lq, H, Dv]` in the dtype of `q`.
    """
    _check_attention_inputs(q, k, v)
    _checks.check_choice("implementation", implementation, IMPLEMENTATIONS)
    blocks = _block_sizes(block_size)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if bias_fn is not None and not callable(bias_fn):
        raise TypeError(f"bias_fn must be callable, got {bias_fn!r}")
    if relative_terms is not None and not isinstance(relative_terms, RelativeTerms):
        raise TypeError(f"relative_terms must be a RelativeTerms, got {relative_terms!r}")
    batch, q_len, heads, dim = q.shape
    k_len = k.shape[1]
    content_bias = None if relative_terms is None else relative_terms.content_bias
    if content_bias is not None and jnp.shape(content_bias) != (heads, dim):
        raise ValueError(
            f"relative_terms.content_bias must have shape [H, D] = [{heads}, {dim}], "
            f"got {list(jnp.shape(relative_terms.content_bias))}"
        )
    scale = 1.0 / math.sqrt(dim) if scale is None else _checks.check_positive_float("scale", scale)

    q_seg, k_seg, restart = _resolve_segments(segment_ids, q_len, k_len, batch)
    q_pos, k_pos = _resolve_positions(
        q_positions,
        k_positions,
        (q_len, k_len),
        batch,
        (q_seg, k_seg) if restart else None,
        needed=causal or bias_fn is not None or relative_terms is not None,
    )
    if mask is not None:
        mask = _mask_as_rank4(mask, (batch, heads, q_len, k_len))

    if 0 in (batch, q_len, k_len):
        # Nothing to attend to (or nobody asking): empty output, or the zeros of rows
        # that may attend to no key, as for any fully masked row.
        return jnp.zeros((batch, q_len, heads, v.shape[-1]), q.dtype)
    terms = _Terms(scale, causal, bias_fn, relative_terms)
    q, k, v = (_heads_first(x) for x in (q, k, v))
    if implementation == "xla":
        block = _Block(q, k, v, q_pos, k_pos, q_seg, k_seg, mask, None)
        out = _finalize(_accumulate(_init_softmax(q, v.shape[-1]), block, terms))
    else:
        out = _blockwise(q, k, v, q_pos, k_pos, q_seg, k_seg, mask, terms, blocks)
    return _heads_first(out).astype(q.dtype)


# ------------------------------------------------------------------ Flax adapter


def _evaluate(module: nn.Module, method: Callable, *args):
    """`method(module, *args)`, binding a module made outside any parent to no variables."""
    if module.scope is not None:
        return method(module, *args)
    try:
        return method(module.bind({}), *args)
    except (flax.errors.ScopeCollectionNotFound, flax.errors.ScopeParamNotFoundError) as error:
        raise ValueError(
            f"{type(module).__name__} has learned parameters, so the attention_fn must run "
            "inside a linen module (e.g. as MultiHeadDotProductAttention(attention_fn=...)), "
            "where they are created and trained with it"
        ) from error


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
    implementation: str = "xla",
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
    relative terms (Shaw, Transformer-XL) are added up, and `dot_product_attention` runs.

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
      implementation: "xla" or "blockwise".
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
    _block_sizes(block_size)
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
        _check_attention_inputs(query, key, value)
        batch, q_len, heads, head_dim = query.shape
        k_len = key.shape[1]
        causal_encodings = bool(is_causal) or any(part.causal_only for part in parts)
        part_spec = _direction_spec(
            spec, options, heads, head_dim, causal_encodings, (q_len, k_len)
        )
        mask = (
            None if mask is None else _mask_as_rank4(_flax_mask(mask), (batch, heads, q_len, k_len))
        )
        q_seg, k_seg, restart = _resolve_segments(segment_ids, q_len, k_len, batch)
        q_pos = q_positions
        if q_pos is None and q_len == k_len and k_positions is not None:
            q_pos = k_positions  # self-attention: the queries are the keys' tokens
        if q_pos is None and q_len != k_len and mask is not None:
            k_default = jnp.arange(k_len) if k_positions is None else k_positions
            q_pos = _positions_from_mask(
                mask, _batched_ids("k_positions", k_default, k_len, batch), q_len
            )
        q_pos, k_pos = _resolve_positions(
            q_pos,
            k_positions,
            (q_len, k_len),
            batch,
            (q_seg, k_seg) if restart else None,
            needed=is_causal or any(part.contributes for part in parts),
        )
        bias_fns, relative_terms = [], []
        for part in parts:
            if part.qk_transform is not None:
                query, key = _evaluate(
                    part.qk_transform(part_spec),
                    lambda m, *args: m(*args),
                    query,
                    key,
                    q_pos,
                    k_pos,
                )
            if part.logit_bias is not None:
                bias_fns.append(_evaluate(part.logit_bias(part_spec), lambda m: m.bias_fn()))
            if part.relative_terms is not None:
                relative_terms.append(
                    _evaluate(part.relative_terms(part_spec), lambda m: m.terms())
                )
        out = dot_product_attention(
            query,
            key,
            value,
            bias_fn=_protocols.sum_of(bias_fns),
            relative_terms=_protocols.sum_relative_terms(relative_terms),
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
      implementation: "xla" or "blockwise".
      block_size: blockwise block size.
    """

    encoding: str
    options: Any = None
    implementation: str = "xla"
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


# ------------------------------------------------------------------ KV cache


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
    positions = jnp.broadcast_to(_batched_ids("positions", positions, new, batch), (batch, new))
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
    implementation: str = "xla",
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
