"""Blockwise attention: tiling, the scans over blocks and a module-level custom VJP.

Queries are split into blocks and, for each, key blocks are streamed with an online
softmax, so no `Lq x Lk` array exists in the forward or the backward pass (the
backward pass recomputes each block from the stored log-normalizers, as in
FlashAttention). `_blockwise_attention` is a `jax.custom_vjp` defined once here, over
explicit arrays only, so it composes with jit at any depth, checkpoint, scan, vmap and
shard_map.

References:
  Rabe & Staats, 2021, Self-attention Does Not Need O(n^2) Memory.
  Dao et al., 2022, FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jax_posenc._protocols import RelativeTerms
from jax_posenc.attention._block import (
    Block,
    PerToken,
    Terms,
    accumulate,
    finalize,
    heads_first,
    init_softmax,
    log_normalizer,
    masked_logits,
    weighted_values,
)

_F32 = jnp.float32


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
        leaves = jax.tree.leaves(args)  # pytree arguments (token-bias values) enter flat
        return jax.tree.unflatten(out_tree, jax.core.eval_jaxpr(closed.jaxpr, consts, *leaves))

    return hoisted, tuple(closed.consts)


def _block_example(values, block: int):
    """Zeros shaped like one block of per-token values (leaves `[B or 1, H or 1, block, ...]`)."""
    return jax.tree.map(lambda x: jnp.zeros((*x.shape[:2], block, *x.shape[3:]), x.dtype), values)


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
    of `_blockwise_attention`. The five functions are hoisted (`_hoist`): they read
    their arrays from the `consts` argument, never from a closure."""

    scale: float
    causal: bool
    q_block: int
    k_block: int
    k_len: int  # keys at or after this index are padding
    bias_fn: Callable | None
    query_bias_fn: Callable | None
    value_fn: Callable | None
    token_bias_fn: Callable | None
    alternate_select: Callable | None
    # Half-row visits (see `_Schedule`): the row count, 0 when off, and the five
    # functions hoisted again for blocks of that many query rows.
    half_rows: int = 0
    half_functions: tuple = (None,) * 5


def _bind_terms(
    tiling: _Tiling, content_bias, consts, values_transposed=False, half=False
) -> Terms:
    """The per-block `Terms` of whole query blocks, or of half-row visits (`half`);
    `consts` is the pair (whole, half) of hoisted constants. Keys are always transposed
    (`[.., D, bk]`), values in the backward pass only (see `blockwise`)."""
    functions = tiling.half_functions if half else (
        tiling.bias_fn,
        tiling.query_bias_fn,
        tiling.value_fn,
        tiling.token_bias_fn,
        tiling.alternate_select,
    )  # fmt: skip
    bound = [
        None if fn is None else functools.partial(_call_with, fn, extra)
        for fn, extra in zip(functions, consts[1 if half else 0], strict=True)
    ]
    relative = RelativeTerms(bound[1], bound[2], content_bias)
    return Terms(
        tiling.scale, tiling.causal, bound[0], relative, bound[3], bound[4],
        keys_transposed=True, values_transposed=values_transposed,
    )  # fmt: skip


def _split_extra(extra: PerToken, block: int) -> PerToken:
    """Per-token arrays (axis 2 of length L) as `[n, ..., block, ...]` blocks."""
    return jax.tree.map(lambda x: _split_blocks(x, 2, block), extra)


def _bounds(blocks: jax.Array | None):
    """Per-block `(min, max)` over batch and block of `[n, B, block]` ids, or None."""
    return None if blocks is None else (blocks.min(axis=(1, 2)), blocks.max(axis=(1, 2)))


def _query_inputs(tiling: _Tiling, q, q_pos, q_seg, q_extra):
    """What the loops over query blocks read: index, a placeholder for the block (see
    `_with_query_block`), ids, per-token arrays."""
    pos, seg = _split_blocks(q_pos, 1, tiling.q_block), _split_blocks(q_seg, 1, tiling.q_block)
    num_q = q.shape[1] // tiling.q_block
    return (jnp.arange(num_q), None, pos, seg, _split_extra(q_extra, tiling.q_block))


def _token_block(tiling: _Tiling, x: jax.Array, index) -> jax.Array:
    """Query block `index` of a token-major `[B, L, H, D]` array, heads first:
    `[B, H, bq, D]`. Sliced and turned one block at a time inside the loop, where it
    stays in cache: splitting the whole array into blocks up front costs a strided
    copy of it (about 20% of the forward pass at 1k tokens on a 2-core CPU)."""
    return heads_first(lax.dynamic_slice_in_dim(x, index * tiling.q_block, tiling.q_block, 1))


def _with_query_block(tiling: _Tiling, q_inputs, q):
    index, _, *rest = q_inputs
    return (index, _token_block(tiling, q, index), *rest)


def _key_inputs(tiling: _Tiling, k, v, k_pos, k_seg, k_extra, values_transposed=False):
    """What the loops over key blocks read, all split `[nk, ...]`: keys `[nk, B, Hkv, D,
    bk]` and values `[nk, B, Hkv, bk, Dv]` (`[nk, B, Hkv, Dv, bk]` if
    `values_transposed`; see `_key_blocks`), ids, per-token arrays and padding flags."""
    k_block, k_pad = tiling.k_block, k.shape[1]
    pos, seg = _split_blocks(k_pos, 1, k_block), _split_blocks(k_seg, 1, k_block)
    valid = None
    if k_pad != tiling.k_len:
        valid = _split_blocks(jnp.arange(k_pad) < tiling.k_len, 0, k_block)
    k, v = _key_blocks(tiling, k, True), _key_blocks(tiling, v, values_transposed)
    return (k, v, pos, seg, _split_extra(k_extra, k_block), valid)


def _key_blocks(tiling: _Tiling, x: jax.Array, transposed: bool) -> jax.Array:
    """A token-major `[B, Lk, Hkv, D]` array as key blocks `[nk, B, Hkv, bk, D]`, or
    `[nk, B, Hkv, D, bk]` if `transposed`: turned once, up front. Every query block
    reads every key block it visits, so turning each block inside the loop (as the
    query blocks are, `_token_block`) repeats the work for each pair: at 2k tokens,
    20 pairs against 8 key blocks, ~0.1 ms per turn of a [256, 8, 64] block on a 2-core
    CPU, while one turn of the whole array runs at ~10 GB/s."""
    blocks = _split_blocks(x, 1, tiling.k_block)  # [nk, B, bk, Hkv, D]
    return jnp.transpose(blocks, (0, 1, 3, 4, 2) if transposed else (0, 1, 3, 2, 4))


def _from_key_blocks(blocks: jax.Array) -> jax.Array:
    """Inverse of `_key_blocks(..., transposed=True)` (the layout of the backward pass's
    dk/dv sums): `[nk, B, Hkv, D, bk] -> [B, Lk, Hkv, D]`."""
    return _merge_blocks(jnp.transpose(blocks, (0, 1, 4, 2, 3)), 1)


class _Schedule(NamedTuple):
    """Which key blocks each query block visits, and how (all `int32`).

    A pair of blocks is *empty* when it provably has no allowed entry, *full* when every
    entry is allowed (its logits then need no mask), *partial* otherwise. With half-row
    visits on (`_Tiling.half_rows`), a partial pair where one half of the query rows
    has no allowed entry is a *half* pair: only the other half is visited. Causal
    (512, 256) blocks give one per query block, the key block whose keys all come after
    the upper half's queries (at 1k tokens 2 of 6 pairs, a sixth of the logits).
    """

    order: jax.Array  # [nq, nk]: key blocks, full first, then partial, half, empty
    num_full: jax.Array  # [nq]
    num_partial: jax.Array  # [nq]
    num_half: jax.Array | None  # [nq]; None when half-row visits are off
    half_start: jax.Array | None  # [nq, nk]: first visited row of each half pair (0 or bq/2)


def _mask_blocks(mask: jax.Array, q_block: int, k_block: int, shape: tuple[int, int]):
    """Whether any / every entry of each block pair of a boolean mask is True (over batch
    and heads too), both broadcast to `shape` = `(nq, nk)`."""

    def per_block(reduced, reduce):  # [Lq or 1, Lk or 1] -> [nq or 1, nk or 1]
        rows = reduced.shape[0] // q_block if reduced.shape[0] > 1 else 1
        cols = reduced.shape[1] // k_block if reduced.shape[1] > 1 else 1
        blocks = reduced.reshape(rows, reduced.shape[0] // rows, cols, reduced.shape[1] // cols)
        return jnp.broadcast_to(reduce(blocks, axis=(1, 3)), shape)

    return (
        per_block(mask.any(axis=(0, 1)), jnp.any),
        per_block(mask.all(axis=(0, 1)), jnp.all),
    )


def _schedule(tiling: _Tiling, q_pos, k_pos, q_seg, k_seg, mask) -> _Schedule | None:
    """The `_Schedule` of the block pairs; None when every pair is full (no causal mask,
    no segments, no mask array, no padded keys).

    From per-block bounds over the whole batch (per half block of queries with half-row
    visits on): rows are empty when causal and every query position among them is
    below every key position of the key block (max q_pos < min k_pos), when the ranges
    of segment ids are disjoint, or when the mask has no True entry in them; a pair is
    full when causal allows every entry (min q_pos >= max k_pos), both blocks hold one
    and the same segment, the mask is True throughout and no key is padding. This holds
    for arbitrary positions; for arange positions the empty pairs are exactly those
    above the diagonal and the partial ones those on it.
    """
    num_q = q_pos.shape[1] // tiling.q_block
    num_k = k_pos.shape[1] // tiling.k_block
    k_padded = num_k * tiling.k_block != tiling.k_len
    if not (tiling.causal or q_seg is not None or mask is not None or k_padded):
        return None
    rows = tiling.half_rows or tiling.q_block  # the query rows of one bound
    groups = tiling.q_block // rows
    q_pos_min, q_pos_max = _bounds(_split_blocks(q_pos, 1, rows))
    k_pos_min, k_pos_max = _bounds(_split_blocks(k_pos, 1, tiling.k_block))
    empty = jnp.zeros((num_q * groups, num_k), bool)
    full = jnp.ones((num_q * groups, num_k), bool)
    if tiling.causal:
        empty = empty | (q_pos_max[:, None] < k_pos_min[None, :])
        full = full & (q_pos_min[:, None] >= k_pos_max[None, :])
    if q_seg is not None:
        q_lo, q_hi = _bounds(_split_blocks(q_seg, 1, rows))
        k_lo, k_hi = _bounds(_split_blocks(k_seg, 1, tiling.k_block))
        empty = empty | (q_hi[:, None] < k_lo[None, :]) | (k_hi[None, :] < q_lo[:, None])
        one_segment = (q_lo == q_hi)[:, None] & (k_lo == k_hi)[None, :]
        full = full & one_segment & (q_lo[:, None] == k_lo[None, :])
    if mask is not None:
        anywhere, everywhere = _mask_blocks(mask, rows, tiling.k_block, empty.shape)
        empty, full = empty | ~anywhere, full & everywhere
    if k_padded:  # only the last key block holds padding
        full = full & (jnp.arange(num_k) < num_k - 1)[None, :]
    # [nq * groups, nk] -> [nq, groups, nk]: the pair is empty (full) when every group is.
    empty = empty.reshape(num_q, groups, num_k)
    full = full.reshape(num_q, groups, num_k)
    kind = jnp.where(empty.all(axis=1), 3, jnp.where(full.all(axis=1), 0, 1))
    num_half = half_start = None
    if groups == 2:
        half = (kind == 1) & (empty[:, 0] != empty[:, 1])
        kind = jnp.where(half, 2, kind)
        half_start = jnp.where(empty[:, 0], rows, 0).astype(jnp.int32)
    order = jnp.argsort(kind, axis=1, stable=True).astype(jnp.int32)
    count = lambda value: jnp.sum(kind == value, axis=1, dtype=jnp.int32)  # noqa: E731
    if groups == 2:
        num_half = count(2)
    return _Schedule(order, count(0), count(1), num_half, half_start)


def _rows(x, axis: int, start, size: int):
    """Rows `start:start + size` along `axis` of every leaf of `x` (leaves of size 1
    along it, broadcast over the rows, and None pass through)."""

    def one(leaf):
        if leaf is None or leaf.shape[axis] == 1:
            return leaf
        return lax.dynamic_slice_in_dim(leaf, start, size, axis)

    return jax.tree.map(one, x)


def _add_rows(total, part, axis: int, start):
    """`total` with `part` added to its rows `start:` along `axis` (every leaf)."""

    def one(x, y):
        rows = lax.dynamic_slice_in_dim(x, start, y.shape[axis], axis)
        return lax.dynamic_update_slice_in_dim(x, rows + y.astype(x.dtype), start, axis)

    return jax.tree.map(one, total, part)


def _loop_key_blocks(tiling: _Tiling, step, carry, q_inputs, k_inputs, mask, schedule):
    """`carry = step(carry, block, j, full, start)` over the non-empty key blocks `j` of
    one query block: first the full ones (`block` then carries no segment ids, mask or
    padding flags, and `full` is True: the logits need no mask), then the partial ones,
    then the half pairs (`block` holds `tiling.half_rows` query rows from row `start`;
    `start` is None for whole blocks).

    `schedule` is this query block's row of the `_Schedule`, or None (every pair full).
    The loops run exactly as many steps as there are such blocks: no step is spent on
    an empty pair, and no full pair evaluates a mask.
    """
    index, q_i, q_pos_i, q_seg_i, q_extra_i = q_inputs
    mask_i = _slice_mask(mask, 2, index, tiling.q_block)
    num_k = k_inputs[0].shape[0]

    def visit(carry, j, full, start=None):
        k_j, v_j, k_pos_j, k_seg_j, k_extra_j, valid_j = jax.tree.map(lambda x: x[j], k_inputs)
        if full:
            block = Block(q_i, k_j, v_j, q_pos_i, k_pos_j, None, None, None, None,
                          q_extra_i, k_extra_j)  # fmt: skip
        else:
            block = Block(
                q_i, k_j, v_j, q_pos_i, k_pos_j, q_seg_i, k_seg_j,
                _slice_mask(mask_i, 3, j, tiling.k_block), valid_j, q_extra_i, k_extra_j,
            )  # fmt: skip
        if start is not None:
            rows = functools.partial(_rows, start=start, size=tiling.half_rows)
            block = block._replace(
                q=rows(block.q, 2), q_pos=rows(block.q_pos, 1), q_seg=rows(block.q_seg, 1),
                mask=rows(block.mask, 2), q_extra=rows(block.q_extra, 2),
            )  # fmt: skip
        return step(carry, block, j, full, start)

    if schedule is None:
        return lax.fori_loop(0, num_k, lambda j, c: visit(c, j, True), carry)
    order, num_full, num_partial, num_half, half_start = schedule
    carry = lax.fori_loop(0, num_full, lambda t, c: visit(c, order[t], True), carry)
    end = num_full + num_partial
    carry = lax.fori_loop(num_full, end, lambda t, c: visit(c, order[t], False), carry)
    if num_half is None:
        return carry

    def visit_half(t, carry):
        j = order[t]
        return visit(carry, j, False, half_start[j])

    return lax.fori_loop(end, end + num_half, visit_half, carry)


def _full_terms(terms: Terms, full: bool) -> Terms:
    """The terms of a full pair of blocks: no causal comparison (every entry allowed)."""
    return terms._replace(causal=False) if full else terms


def _blockwise_forward(
    tiling, q, k, v, content_bias, q_extra, k_extra, q_pos, k_pos, q_seg, k_seg, mask, consts
):
    """Output blocks `[nq, B, bq, H, Dv]`, log-normalizers `[nq, B, H, bq]` and the
    `_Schedule` (kept for the backward pass, which visits the same blocks)."""
    terms = _bind_terms(tiling, content_bias, consts)
    k_inputs = _key_inputs(tiling, k, v, k_pos, k_seg, k_extra)
    schedule = _schedule(tiling, q_pos, k_pos, q_seg, k_seg, mask)
    anchor = _anchor(
        q, k, v, content_bias, q_extra, k_extra, q_pos, k_pos, q_seg, k_seg, mask, consts
    )

    half_terms = _bind_terms(tiling, content_bias, consts, half=True)

    def step(state, block, j, full, start):
        del j
        if start is None:
            return accumulate(state, block, _full_terms(terms, full))
        part = accumulate(_rows(state, 2, start, tiling.half_rows), block, half_terms)
        return jax.tree.map(
            lambda x, y: lax.dynamic_update_slice_in_dim(x, y, start, 2), state, part
        )

    def one_query_block(inputs):
        q_inputs, schedule_i = inputs
        q_inputs = _with_query_block(tiling, q_inputs, q)
        state = _loop_key_blocks(
            tiling,
            step,
            init_softmax(q_inputs[1], v.shape[-1], anchor),
            q_inputs,
            k_inputs,
            mask,
            schedule_i,
        )
        return heads_first(finalize(state)), log_normalizer(state)

    q_inputs = _query_inputs(tiling, q, q_pos, q_seg, q_extra)
    out, log_normalizers = lax.map(one_query_block, (q_inputs, schedule))
    return out, log_normalizers, schedule


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise_attention(
    tiling, q, k, v, content_bias, q_extra, k_extra, q_pos, k_pos, q_seg, k_seg, mask, consts
):
    """Online-softmax attention over (query block, key block) pairs; see the module doc.

    Every array it reads is an argument (q, k, v `[B, L, H or Hkv, D]` token-major (see
    `blockwise`), padded to whole blocks,
    their per-token arrays (`PerToken`: token-bias values, alternate q and k), positions
    and segment ids `[B or 1, L]`, the mask, the hoisted constants of the positional terms),
    so it composes with jit at any depth, checkpoint, scan and vmap.
    Returns `[B, Lq_padded, H, Dv]` float32.
    """
    out, _, _ = _blockwise_forward(
        tiling, q, k, v, content_bias, q_extra, k_extra, q_pos, k_pos, q_seg, k_seg, mask, consts
    )
    return _merge_blocks(out, 1)


def _is_primal(x) -> bool:
    return isinstance(x, jax.custom_derivatives.CustomVJPPrimal)


def _blockwise_attention_fwd(tiling, *wrapped):
    """With `symbolic_zeros`: every argument comes as a `CustomVJPPrimal`. Which hoisted
    constants of the positional terms need a gradient (`perturbed`: learned tables and
    weights do, ALiBi's fixed slopes or a frozen table do not) travels to the backward
    pass as the shapes of zero-size flags, `(0,)` yes and `(0, 0)` no, so it computes no
    gradient nobody asked for (one more pass over each block for ALiBi's slopes)."""
    args = jax.tree.map(lambda x: x.value, wrapped, is_leaf=_is_primal)
    wanted = jax.tree.map(
        lambda x: jnp.zeros((0,) if x.perturbed else (0, 0)), wrapped[-1], is_leaf=_is_primal
    )
    out, log_normalizer, schedule = _blockwise_forward(tiling, *args)
    out = _merge_blocks(out, 1)
    return out, (args, out, log_normalizer, schedule, wanted)


def _blockwise_attention_bwd(tiling, residuals, d_out):
    """FlashAttention's backward pass: recompute each block's weights from the stored
    log-normalizer and get every gradient (q, k, v, content bias, per-token arrays,
    constants of the positional terms) from `jax.vjp` of the same per-block functions
    as the forward. Per-token arrays get per-block gradients, accumulated like those of
    q (over key blocks) and k (over query blocks)."""
    args, out, log_normalizer, schedule, wanted = residuals
    q, k, v, content_bias, q_extra, k_extra, q_pos, k_pos, q_seg, k_seg, mask, consts = args
    if isinstance(d_out, jax.custom_derivatives.SymbolicZero):
        return (None,) * len(args)
    # Constants that need no gradient enter the per-block functions as fixed values.
    const_leaves, const_tree = jax.tree.flatten(consts)
    live = [flag.ndim == 1 for flag in jax.tree.leaves(wanted)]
    live_consts = [c for c, keep in zip(const_leaves, live, strict=True) if keep]

    def all_consts(live_values):
        values = iter(live_values)
        leaves = [next(values) if keep else c for c, keep in zip(const_leaves, live, strict=True)]
        return jax.tree.unflatten(const_tree, leaves)

    # sum_j p_ij dp_ij = d_out_i . out_i, since out_i is linear in row i of p.
    d_out_dot_out = jnp.sum(d_out.astype(_F32) * out, axis=-1)[..., None]  # [B, Lq, H, 1]
    # Values transposed too: the products d_out v^T and p^T d_out then need no
    # per-block transpose of the [bq, bk] blocks.
    k_inputs = _key_inputs(tiling, k, v, k_pos, k_seg, k_extra, values_transposed=True)
    k_blocks, v_blocks, _, _, k_extra_blocks, _ = k_inputs
    anchor = _anchor(args, d_out)

    def one_query_block(grads, inputs):
        q_inputs, schedule_i, log_normalizer_i = inputs
        q_inputs = _with_query_block(tiling, q_inputs, q)
        d_out_i = _token_block(tiling, d_out, q_inputs[0])  # [B, H, bq, Dv]
        d_out_dot_out_i = _token_block(tiling, d_out_dot_out, q_inputs[0])[..., 0]

        def step(grads, block, j, full, start):
            dq_i, d_q_extra_i, dk, dv, d_k_extra, d_content_bias, d_consts = grads
            half = start is not None
            rows = functools.partial(_rows, start=start, size=tiling.half_rows)
            q_side = (log_normalizer_i, d_out_i, d_out_dot_out_i)
            lse, d_out_ij, d_out_dot_out_ij = rows(q_side, 2) if half else q_side

            def logits_of(q_i, k_j, q_extra_i, k_extra_j, content_bias, live_consts):
                consts = all_consts(live_consts)
                terms = _bind_terms(tiling, content_bias, consts, True, half)
                replaced = block._replace(q=q_i, k=k_j, q_extra=q_extra_i, k_extra=k_extra_j)
                return masked_logits(replaced, _full_terms(terms, full))

            def values_of(weights, v_j, live_consts):
                consts = all_consts(live_consts)
                terms = _bind_terms(tiling, content_bias, consts, True, half)
                return weighted_values(weights, block._replace(v=v_j), terms)

            primals = (block.q, block.k, block.q_extra, block.k_extra, content_bias, live_consts)
            logits, logits_vjp = jax.vjp(logits_of, *primals)
            weights = jnp.exp(logits - lse[..., None])
            _, values_vjp = jax.vjp(values_of, weights, block.v, live_consts)
            d_weights, dv_j, d_consts_values = values_vjp(d_out_ij)
            d_logits = weights * (d_weights - d_out_dot_out_ij[..., None])
            dq_ij, dk_j, d_q_extra_ij, d_k_extra_j, d_content_bias_j, d_consts_logits = logits_vjp(
                d_logits
            )
            # Key-side gradients go straight into their block of the full-length sums.
            add_at_j = lambda total, x: total.at[j].add(x.astype(_F32))  # noqa: E731
            if half:
                dq_i = _add_rows(dq_i, dq_ij, 2, start)
                d_q_extra_i = _add_rows(d_q_extra_i, d_q_extra_ij, 2, start)
            else:
                dq_i = dq_i + dq_ij.astype(_F32)
                d_q_extra_i = _add_float32(d_q_extra_i, d_q_extra_ij)
            return (
                dq_i,
                d_q_extra_i,
                add_at_j(dk, dk_j),
                add_at_j(dv, dv_j),
                jax.tree.map(add_at_j, d_k_extra, d_k_extra_j),
                _add_float32(d_content_bias, d_content_bias_j),
                _add_float32(_add_float32(d_consts, d_consts_logits), d_consts_values),
            )

        q_i, q_extra_i = q_inputs[1], q_inputs[4]
        carry = (*_float32_zeros((q_i, q_extra_i), anchor), *grads)
        dq_i, d_q_extra_i, *grads = _loop_key_blocks(
            tiling, step, carry, q_inputs, k_inputs, mask, schedule_i
        )
        return tuple(grads), (heads_first(dq_i), d_q_extra_i)

    initial = _float32_zeros(
        (k_blocks, v_blocks, k_extra_blocks, content_bias, live_consts), anchor
    )
    q_inputs = _query_inputs(tiling, q, q_pos, q_seg, q_extra)
    inputs = (q_inputs, schedule, log_normalizer)
    (dk, dv, d_k_extra, d_content_bias, d_consts), (dq, d_q_extra) = lax.scan(
        one_query_block, initial, inputs
    )
    dq = _merge_blocks(dq, 1)
    dk, dv = _from_key_blocks(dk), _from_key_blocks(dv)
    d_q_extra, d_k_extra = jax.tree.map(lambda x: _merge_blocks(x, 2), (d_q_extra, d_k_extra))
    merged = (dq, dk, dv, d_q_extra, d_k_extra)
    q_grad, k_grad, v_grad, q_extra_grad, k_extra_grad, bias_grad = jax.tree.map(
        _cotangent, (*merged, d_content_bias), (q, k, v, q_extra, k_extra, content_bias)
    )
    d_consts = iter(d_consts)
    const_grads = jax.tree.unflatten(
        const_tree,
        [_cotangent(next(d_consts), c) if keep else None
         for c, keep in zip(const_leaves, live, strict=True)],
    )  # fmt: skip
    # Positions, segment ids and the mask are integer or boolean: zero cotangents.
    return (q_grad, k_grad, v_grad, bias_grad, q_extra_grad, k_extra_grad,
            None, None, None, None, None, const_grads)  # fmt: skip


_blockwise_attention.defvjp(_blockwise_attention_fwd, _blockwise_attention_bwd, symbolic_zeros=True)


def blockwise(
    q, k, v, q_pos, k_pos, q_seg, k_seg, mask, terms: Terms, block_size,
    extra: tuple[PerToken, PerToken],
):  # fmt: skip
    """Pads to whole blocks, hoists the positional terms and runs `_blockwise_attention`.

    `q` `[B, Lq, H, D]`, `k` and `v` `[B, Lk, Hkv, D]` are token-major, as the caller
    has them, and so is the result `[B, Lq, H, Dv]` float32: each query block is turned
    heads-first inside the loops, the keys and values once up front (`_key_blocks`;
    keys transposed, `[B, Hkv, D, bk]` per block, so the product q k^T is a plain
    matrix product and its cotangent for the keys needs no transposed copy of the
    [bq, bk] block). The per-token arrays `extra` `(of the queries, of the keys)` are
    heads-first."""
    batch, q_len, heads, dim = q.shape
    k_len = k.shape[1]
    q_block, k_block = min(block_size[0], q_len), min(block_size[1], k_len)
    q_pad, k_pad = -(-q_len // q_block) * q_block, -(-k_len // k_block) * k_block
    # Padded queries are dropped at the end; padded keys are masked out (`k_len`).
    # Positions and segment ids are padded with their last value, so per-block bounds
    # are bounds of real tokens.
    q_pos, q_seg = (_pad_axis(x, 1, q_pad, "edge") for x in (q_pos, q_seg))
    k_pos, k_seg = (_pad_axis(x, 1, k_pad, "edge") for x in (k_pos, k_seg))
    q = _pad_axis(q, 1, q_pad, "edge")
    k, v = (_pad_axis(x, 1, k_pad, "edge") for x in (k, v))
    mask = _pad_axis(_pad_axis(mask, 2, q_pad, "false"), 3, k_pad, "false")
    q_extra, k_extra = (
        jax.tree.map(lambda x, size=size: _pad_axis(x, 2, size, "edge"), tree)
        for tree, size in zip(extra, (q_pad, k_pad), strict=True)
    )

    relative = terms.relative_terms or RelativeTerms()

    def hoisted(rows: int):
        """The five positional functions hoisted for blocks of `rows` query rows, and
        their constants."""
        q_pos_block = jnp.zeros((q_pos.shape[0], rows), jnp.int32)
        k_pos_block = jnp.zeros((k_pos.shape[0], k_block), jnp.int32)
        return zip(
            _hoist(terms.bias_fn, q_pos_block, k_pos_block),
            _hoist(
                relative.query_bias_fn,
                jnp.zeros((batch, rows, heads, dim), q.dtype),  # the protocol's [B, bq, H, D]
                q_pos_block,
                k_pos_block,
            ),
            _hoist(
                relative.value_fn,
                jnp.zeros((batch, heads, rows, k_block), _F32),
                q_pos_block,
                k_pos_block,
            ),
            _hoist(
                terms.token_bias_fn,
                _block_example(q_extra.token_values, rows),
                _block_example(k_extra.token_values, k_block),
            ),
            _hoist(terms.alternate_select, q_pos_block, k_pos_block),
            strict=True,
        )

    functions, consts = hoisted(q_block)
    # Half-row visits pay where a query block spans two key blocks or more: causal
    # blocks on the diagonal then leave half the rows of a pair empty (`_Schedule`).
    # Without a schedule (no causal mask, segments, mask or padded keys) none exist.
    scheduled = terms.causal or q_seg is not None or mask is not None or k_pad != k_len
    spans = q_block % 2 == 0 and q_block >= 2 * k_block
    half_rows = q_block // 2 if scheduled and spans else 0
    half_functions, half_consts = hoisted(half_rows) if half_rows else ((None,) * 5, ((),) * 5)
    tiling = _Tiling(
        terms.scale, terms.causal, q_block, k_block, k_len, *functions, half_rows, half_functions
    )
    out = _blockwise_attention(
        tiling, q, k, v, relative.content_bias, q_extra, k_extra, q_pos, k_pos,
        q_seg, k_seg, mask, (consts, half_consts),
    )  # fmt: skip
    return out[:, :q_len]
