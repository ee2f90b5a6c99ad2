"""Dot-product attention with positional terms evaluated one block at a time.

Two implementations share every formula (`_block.py`):

* `implementation="xla"` evaluates the whole `[B, H, Lq, Lk]` logit matrix at once
  (the reference, and the fastest choice for short sequences).
* `implementation="blockwise"` (`_blockwise.py`) walks over query blocks and, for each,
  over key blocks, keeping a running maximum, a running sum and an unnormalised output
  per query (the online softmax of Milakov & Gimelshein 2018, used by Rabe & Staats
  2021 and FlashAttention). Positional terms (`bias_fn`, `RelativeTerms`) are called
  for the block in hand only, so no `Lq x Lk` array ever exists. Its gradient is a
  custom VJP (FlashAttention's backward pass): it stores the output and one
  log-normalizer per query and recomputes each block, so the memory of forward and
  backward grows linearly with the sequence length. Being a custom VJP, it supports
  reverse-mode differentiation (`jax.grad`, `jax.vjp`) but not forward mode (`jax.jvp`).

Logits are `scale * (q + u) . k + bias_fn(q_pos, k_pos) + query_bias_fn(scale * q, ...)
+ token_bias.fn(query_values, key_values)` (u: the optional content bias of
`RelativeTerms`; the token bias reads per-token values, sliced per block like q and k,
and returns their gradients like those of q and k; an `AlternateLogits` replaces the
content logit by `scale * (q2 + u) . k2` on the pairs it selects; a `ContextualBias`
(CoPE) reads whole rows of content logits, so it is evaluated on the xla path only);
the softmax runs in float32 and the
output keeps the query's dtype. A query that may attend to nothing (fully masked row)
returns zeros, with zero gradients, in both implementations.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jax_posenc import _checks
from jax_posenc._protocols import (
    AlternateLogits,
    BiasFn,
    ContextualBias,
    RelativeTerms,
    TokenBias,
)
from jax_posenc.attention._block import (
    Block,
    PerToken,
    Terms,
    accumulate,
    finalize,
    heads_first,
    init_softmax,
)
from jax_posenc.attention._blockwise import blockwise
from jax_posenc.attention._pallas import (
    apply_rope_tables,
    builds_on_gpu,
    check_rope_frequencies,
    check_supported,
    pallas_attention,
    rope_tables,
)

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "pallas")
# Blockwise (q_block, k_block) when none is given, by key length: `(up to k_len, size)`
# rows, the last for every longer sequence. Measured on the 2-core x86 CPU these tests
# run on (float32, batch 1, 8 heads, causal, no bias, head_dim 64 and 128, L 1k-8k,
# forward and forward+backward; `python -m benchmarks.block_sizes` repeats the sweep):
# (512, 256) was the fastest or within noise of it up to 4k keys, for both head sizes;
# beyond, (1024, 512), whose query blocks span two key blocks (half-row visits on the
# diagonal, see `_blockwise._Schedule`), against (512, 512): head_dim 64 forward 0.89-0.91x
# and forward+backward 0.95x at 8k and 16k, head_dim 128 0.96-1.01x (within noise), for
# 5-18 MiB more temporaries. Dtype did not change the choice.
CPU_BLOCK_TABLE = ((4096, (512, 256)), (None, (1024, 512)))
# GPU/TPU, until the Pallas kernel picks its own: 512 x 512 amortises the per-iteration
# cost of the loops; halved along the keys for head_dim > 128 to bound the working set.
# A documented rule, not measured here (no accelerator was lent).
ACCELERATOR_BLOCK_SIZE = (512, 512)
# `implementation="auto"` runs the materialized xla path up to 384 x 384 logits and
# blockwise beyond. Measured as the table above (causal, no bias): at L = 384 xla takes
# 0.6-0.8x the blockwise time (forward and forward+backward, head_dim 64 and 128), at
# 512 the forward passes tie and blockwise's forward+backward is 0.6-0.7x xla's.
AUTO_XLA_MAX_LOGITS = 384 * 384


# ------------------------------------------------------------------ validation


def check_attention_inputs(q, k, v):
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


def batched_ids(name: str, value, length: int, batch: int) -> jax.Array:
    """Integer `[L]` or `[B, L]` ids/positions as int32 `[B or 1, L]` (values must fit int32)."""
    return _checks.position_rows(name, value, length=length, batch=batch)


def mask_as_rank4(mask, target: tuple[int, int, int, int]) -> jax.Array:
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


def check_token_bias(token_bias, batch: int, heads: int, q_len: int, k_len: int) -> None:
    """Raises unless `token_bias` is a `TokenBias` whose values fit the shapes."""
    if not isinstance(token_bias, TokenBias):
        raise TypeError(f"token_bias must be a TokenBias, got {token_bias!r}")
    if not callable(token_bias.fn):
        raise TypeError(f"token_bias.fn must be callable, got {token_bias.fn!r}")
    for name, values, length in (
        ("query_values", token_bias.query_values, q_len),
        ("key_values", token_bias.key_values, k_len),
    ):
        leaves = jax.tree.leaves(values)
        if not leaves:
            raise ValueError(f"token_bias.{name} holds no array")
        for leaf in leaves:
            _checks.check_floating_array(f"token_bias.{name}", leaf)
            shape = jnp.shape(leaf)
            if (
                len(shape) < 3
                or shape[0] not in (1, batch)
                or shape[1] not in (1, heads)
                or shape[2] != length
            ):
                raise ValueError(
                    f"token_bias.{name} arrays must have shape [B or 1, H or 1, L, ...] = "
                    f"[{batch} or 1, {heads} or 1, {length}, ...], got {list(shape)}"
                )


def check_alternate(alternate, q: jax.Array, k: jax.Array) -> None:
    """Raises unless `alternate` is an `AlternateLogits` with arrays shaped like q and k."""
    if not isinstance(alternate, AlternateLogits):
        raise TypeError(f"alternate must be an AlternateLogits, got {alternate!r}")
    if not callable(alternate.select):
        raise TypeError(f"alternate.select must be callable, got {alternate.select!r}")
    for name, value, like in (("q", alternate.q, q), ("k", alternate.k, k)):
        _checks.check_floating_array(f"alternate.{name}", value)
        if jnp.shape(value) != like.shape:
            raise ValueError(
                f"alternate.{name} must have the shape of {name} {list(like.shape)}, "
                f"got {list(jnp.shape(value))}"
            )


def check_contextual_bias(contextual_bias, implementation: str) -> str:
    """The implementation for a `ContextualBias`: "xla" ("auto" picks it at any length);
    raises for a blockwise one or an argument that is not a `ContextualBias`."""
    if not isinstance(contextual_bias, ContextualBias):
        raise TypeError(f"contextual_bias must be a ContextualBias, got {contextual_bias!r}")
    if not callable(contextual_bias.fn):
        raise TypeError(f"contextual_bias.fn must be callable, got {contextual_bias.fn!r}")
    _checks.check_choice("implementation", implementation, IMPLEMENTATIONS)
    if implementation not in ("auto", "xla"):
        raise ValueError(
            f"a contextual_bias (CoPE) runs on the xla path only, got "
            f"implementation={implementation!r}: its positions are sums of gates over every "
            "key from the key to the query, so a key block would need the gates of all "
            "later key blocks (a reverse carry, and a second pass for the gradient); use "
            "implementation='xla' or 'auto' (memory O(Lq * Lk))"
        )
    return "xla"


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


# ------------------------------------------------------------------ public function


def default_block_size(
    q_len: int, k_len: int, head_dim: int, *, platform: str | None = None
) -> tuple[int, int]:
    """The blockwise `(q_block, k_block)` used when none is given (see `CPU_BLOCK_TABLE`
    and `ACCELERATOR_BLOCK_SIZE`); `platform` defaults to JAX's default backend."""
    del q_len  # the table is indexed by the key length, which sets the loop's length
    platform = jax.default_backend() if platform is None else platform
    if platform != "cpu":
        q_block, k_block = ACCELERATOR_BLOCK_SIZE
        return (q_block, k_block // 2) if head_dim > 128 else (q_block, k_block)
    for longest, size in CPU_BLOCK_TABLE:
        if longest is None or k_len <= longest:
            return size
    raise AssertionError("CPU_BLOCK_TABLE ends with a row for every length")


def resolve_implementation(
    implementation: str, q_len: int, k_len: int, *, pallas_supported: bool = False
) -> str:
    """`implementation` itself, or what "auto" picks: "pallas" on a GPU backend when the
    fused kernel supports the terms (`pallas_supported`), else "xla" or "blockwise" by
    the shapes."""
    _checks.check_choice("implementation", implementation, IMPLEMENTATIONS)
    if implementation != "auto":
        return implementation
    if pallas_supported and jax.default_backend() == "gpu":
        return "pallas"
    return "xla" if q_len * k_len <= AUTO_XLA_MAX_LOGITS else "blockwise"


def block_sizes(block_size) -> tuple[int, int] | None:
    """A validated `(q_block, k_block)`, or None for the default."""
    if block_size is None:
        return None
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


def resolve_segments(segment_ids, q_len: int, k_len: int, batch: int):
    """(q_segment_ids, k_segment_ids, restart_positions) from one array or a pair."""
    if segment_ids is None:
        return None, None, False
    if isinstance(segment_ids, tuple | list):
        if len(segment_ids) != 2:
            raise ValueError("segment_ids must be one array or a pair (q_ids, k_ids)")
        return (
            batched_ids("segment_ids[0]", segment_ids[0], q_len, batch),
            batched_ids("segment_ids[1]", segment_ids[1], k_len, batch),
            False,
        )
    if q_len != k_len:
        raise ValueError(
            f"segment_ids as one array needs Lq == Lk, got Lq={q_len}, Lk={k_len}; "
            "pass a pair (q_segment_ids, k_segment_ids)"
        )
    ids = batched_ids("segment_ids", segment_ids, q_len, batch)
    return ids, ids, True


def resolve_positions(q_positions, k_positions, lengths, batch, restart_from, *, needed):
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
        batched_ids("q_positions", q_positions, q_len, batch),
        batched_ids("k_positions", k_positions, k_len, batch),
    )


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias_fn: BiasFn | None = None,
    relative_terms: RelativeTerms | None = None,
    token_bias: TokenBias | None = None,
    alternate: AlternateLogits | None = None,
    contextual_bias: ContextualBias | None = None,
    q_positions: jax.Array | None = None,
    k_positions: jax.Array | None = None,
    mask: jax.Array | None = None,
    causal: bool = False,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    implementation: str = "auto",
    block_size: int | tuple[int, int] | None = None,
    scale: float | None = None,
    rope_frequencies: jax.Array | None = None,
) -> jax.Array:
    """Softmax attention whose positional terms are functions of positions.

    `logits[b, h, i, j] = scale * (q[b, i, h] + u[h]) . k[b, j, h // G]
    + bias_fn(q_pos, k_pos)[b, h, i, j] + query_bias_fn(scale * q, q_pos, k_pos)[b, h, i, j]
    + token_bias.fn(query_values, key_values)[b, h, i, j]`
    where `G = H / Hkv` (grouped-query attention; `Hkv = H` is ordinary multi-head
    attention) and u is `relative_terms.content_bias` (zero when None); with
    `alternate`, the pairs `alternate.select(q_pos, k_pos)` picks use
    `scale * (alternate.q[b, i, h] + u[h]) . alternate.k[b, j, h // G]` as their first
    term instead (SelfExtend: RoPE at grouped positions for distant keys). With
    `contextual_bias`, `contextual_bias.fn(scale * q, content_logits, allowed, params)` is
    added too (CoPE), computed from the whole rows of content logits. Positions where
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
      token_bias: a `jax_posenc.TokenBias`: per-token query values `[B or 1, H or 1,
        Lq, ...]`, key values `[B or 1, H or 1, Lk, ...]` and `fn` of a block of each
        (Forgetting Transformer's `c_i - c_j`). Blockwise slices the values per block and
        accumulates their gradients per block (for a difference: row and column sums of
        the block's logit gradients), so no `Lq x Lk` array is formed.
      alternate: a `jax_posenc.AlternateLogits`: queries `[B, Lq, H, D]` and keys
        `[B, Lk, Hkv, D]` positioned differently, and `select(q_pos, k_pos) -> bool
        [B or 1, 1, bq, bk]`; each block computes both content logits and keeps one per
        pair. Blockwise slices both pairs per block and returns all four gradients.
      contextual_bias: a `jax_posenc.ContextualBias` (CoPE, `jax_posenc.cope_bias`): a
        term of whole rows of content logits and of the mask. xla only: "auto" then
        means "xla" at every length, and "blockwise" raises a ValueError, since a
        contextual position sums gates over all keys from the key up to the query
        (memory `O(Lq * Lk)`).
      q_positions: integer `[Lq]` or `[B, Lq]`.
      k_positions: integer `[Lk]` or `[B, Lk]`.
      mask: boolean, broadcastable to `[B, H, Lq, Lk]`; True where attention is allowed.
      causal: whether query i may only attend to keys with `k_pos <= q_pos`.
      segment_ids: integer `[B, L]` (self-attention, `Lq == Lk`) or a pair
        `(q_segment_ids [B, Lq], k_segment_ids [B, Lk])`.
      implementation: "auto" (default: pallas on a GPU backend when the terms are ones it
        supports; elsewhere xla up to `AUTO_XLA_MAX_LOGITS` logits, blockwise beyond;
        `resolve_implementation`), "xla", "blockwise" or "pallas" (the fused kernels of
        `_pallas.py`: bias_fn, causal, segment_ids, mask, positions, GQA and
        rope_frequencies evaluated inside them; relative_terms, token_bias and
        alternate raise a ValueError; without a GPU they run in Pallas interpret mode,
        slow, for tests).
      block_size: blockwise and pallas; an int or a pair `(q_block, k_block)`, clipped to
        the sequence lengths; lengths that are not multiples are padded internally. None:
        `default_block_size` for blockwise (a table measured on CPU, a rule on GPU/TPU),
        `_pallas.default_block_sizes` for pallas (64 x 64 for head_dim > 64, else 128 x 128).
      scale: logit scale; `1 / sqrt(D)` when None.
      rope_frequencies: float `[rotary_dim / 2]` RoPE inverse frequencies (radians per
        position): q and k are rotated by their positions before the product, half-split
        ("rotate_half") layout, the features past rotary_dim passed through; angles are
        exact (`jax_posenc._angles.rotation_cos_sin`) for concrete frequencies. xla and
        blockwise rotate q and k up front; pallas rotates each tile as it loads it.

    Returns:
      `[B, Lq, H, Dv]` in the dtype of `q`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jax_posenc as pe
      >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 256, 4, 32))  # [B, L, H, D]
      >>> slopes = pe.alibi_slopes(4)
      >>> def alibi(q_positions, k_positions):  # called per block: no L x L array
      ...     return pe.alibi_bias(q_positions, k_positions, slopes)
      >>> out = pe.dot_product_attention(
      ...     q, k, v, bias_fn=alibi, causal=True, implementation="blockwise", block_size=64
      ... )
      >>> reference = pe.dot_product_attention(
      ...     q, k, v, bias_fn=alibi, causal=True, implementation="xla"
      ... )
      >>> out.shape, bool(jnp.allclose(out, reference, atol=1e-5))
      ((1, 256, 4, 32), True)
    """
    check_attention_inputs(q, k, v)
    if contextual_bias is not None:
        implementation = check_contextual_bias(contextual_bias, implementation)
    requested = implementation
    implementation = resolve_implementation(
        implementation,
        q.shape[1],
        k.shape[1],
        pallas_supported=all(x is None for x in (relative_terms, token_bias, alternate)),
    )
    blocks = block_sizes(block_size) or default_block_size(q.shape[1], k.shape[1], q.shape[3])
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if bias_fn is not None and not callable(bias_fn):
        raise TypeError(f"bias_fn must be callable, got {bias_fn!r}")
    if relative_terms is not None and not isinstance(relative_terms, RelativeTerms):
        raise TypeError(f"relative_terms must be a RelativeTerms, got {relative_terms!r}")
    batch, q_len, heads, dim = q.shape
    k_len = k.shape[1]
    if token_bias is not None:
        check_token_bias(token_bias, batch, heads, q_len, k_len)
    if alternate is not None:
        check_alternate(alternate, q, k)
    content_bias = None if relative_terms is None else relative_terms.content_bias
    if content_bias is not None and jnp.shape(content_bias) != (heads, dim):
        raise ValueError(
            f"relative_terms.content_bias must have shape [H, D] = [{heads}, {dim}], "
            f"got {list(jnp.shape(relative_terms.content_bias))}"
        )
    scale = 1.0 / math.sqrt(dim) if scale is None else _checks.check_positive_float("scale", scale)
    if rope_frequencies is not None:
        check_rope_frequencies(rope_frequencies, dim)
    if implementation == "pallas":
        check_supported(relative_terms=relative_terms, token_bias=token_bias, alternate=alternate)

    q_seg, k_seg, restart = resolve_segments(segment_ids, q_len, k_len, batch)
    q_pos, k_pos = resolve_positions(
        q_positions,
        k_positions,
        (q_len, k_len),
        batch,
        (q_seg, k_seg) if restart else None,
        needed=causal
        or any(x is not None for x in (bias_fn, relative_terms, alternate, rope_frequencies)),
    )
    if mask is not None:
        mask = mask_as_rank4(mask, (batch, heads, q_len, k_len))

    if 0 in (batch, q_len, k_len):
        # Nothing to attend to (or nobody asking): empty output, or the zeros of rows
        # that may attend to no key, as for any fully masked row.
        return jnp.zeros((batch, q_len, heads, v.shape[-1]), q.dtype)
    values = (None, None) if token_bias is None else token_bias[:2]
    alternates = (None, None) if alternate is None else map(heads_first, alternate[:2])
    extra = tuple(map(PerToken, values, alternates))
    terms = Terms(
        scale,
        causal,
        bias_fn,
        relative_terms,
        None if token_bias is None else token_bias.fn,
        None if alternate is None else alternate.select,
        contextual_bias,
    )
    q, k, v = (heads_first(x) for x in (q, k, v))
    pallas_options = {
        "scale": scale, "causal": causal, "bias_fn": bias_fn,
        "block_size": block_sizes(block_size), "rope_frequencies": rope_frequencies,
    }  # fmt: skip
    if implementation == "pallas" and requested == "auto":
        # A bias whose per-tile products do not fit a Triton tensor, or tiles that are
        # not powers of two: the fused kernels cannot be built, blockwise can.
        arrays = (q, k, v, q_pos, k_pos, q_seg, k_seg, mask)
        if not builds_on_gpu(*arrays, **pallas_options):
            implementation = "blockwise"
    if rope_frequencies is not None and implementation != "pallas":
        q = apply_rope_tables(q, *rope_tables(q_pos, rope_frequencies))
        k = apply_rope_tables(k, *rope_tables(k_pos, rope_frequencies))
    if implementation == "pallas":
        out = pallas_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, mask, **pallas_options)
    elif implementation == "xla":
        block = Block(q, k, v, q_pos, k_pos, q_seg, k_seg, mask, None, *extra)
        out = finalize(accumulate(init_softmax(q, v.shape[-1]), block, terms))
    else:
        # q, k, v and the output token-major (see `blockwise`); XLA cancels the turns.
        q, k, v = (heads_first(x) for x in (q, k, v))
        out = blockwise(q, k, v, q_pos, k_pos, q_seg, k_seg, mask, terms, blocks, extra)
        return out.astype(q.dtype)
    return heads_first(out).astype(q.dtype)
