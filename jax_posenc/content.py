"""Positions that depend on content or context.

The Forgetting Transformer (FoX) replaces position encodings by a data-dependent decay:
each head computes a forget gate per token, `f_t = sigmoid(w_h . x_t + b_h)`, and
attention logits get `D_ij = sum_{l=j+1..i} log f_l` for `j <= i`. With the cumulative
sum `c = cumsum(log f)` this is `c_i - c_j`: a `jax_posenc.TokenBias` whose per-token
values are `c`, so attention evaluates it block by block and returns the gradients of
`c` (hence of the gate parameters) without an `L x L` array.

Packed documents: with segment ids the cumulative sum restarts at every segment start.
Attention never crosses segments, so the logits are the same either way, but the
restart keeps `c` small, and `c_i - c_j` of two large float32 numbers loses digits:
after `n` tokens `|c|` is up to `n * max|log f|`, and the bias carries an absolute error
of about `|c| * 6e-8` (0.005 for `|c| = 8e4`), as in the reference implementation.

SelfExtend positions depend on the context: a key within `window` tokens of the query
keeps its exact RoPE position, a farther one is seen at grouped positions (`pos // G`,
the query shifted so both joins meet at the window edge), so a model trained on short
sequences reads long ones with relative distances it knows. Both positionings are
computed per block and merged per pair (`jax_posenc.AlternateQk`).

Randomized positions depend on the context of training instead: `randomized_positions`
draws each training sequence's positions as a sorted random subset of a range larger
than the sequence, so every position the model will meet at longer test lengths has
been seen in training, and any position-based encoding (RoPE, ALiBi, T5, learned, ...)
can use them through the model's `positions=` argument.

CoPE counts positions with the content: query i gives each key t a gate
`g_it = sigmoid(scale * q_i . k_t)`, and key j sits at the contextual position
`p_ij = sum_{t=j..i} g_it` (the gates of the allowed keys from j up to the query), a
fractional number a head may use to count words, sentences or any unit its gates pick.
Positions are clipped to `num_positions - 1` and read from learned embeddings `e[n]` by
linear interpolation, adding `scale * q_i . e(p_ij)` to the logits. A position is a sum
over every key between key and query, so the term is evaluated on whole rows
(`jax_posenc.ContextualBias`, attention's xla path, memory `O(L^2)`).

References:
  Lin et al., 2025, Forgetting Transformer: Softmax Attention with a Forget Gate (ICLR).
  Jin et al., 2024, LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning
    (ICML).
  Ruoss et al., 2023, Randomized Positional Encodings Boost Length Generalization of
    Transformers (ACL).
  Golovneva et al., 2024, Contextual Position Encoding: Learning to Count What's
    Important (arXiv 2405.18719).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jax_posenc import _checks, rope
from jax_posenc._protocols import AlternateQk, ContextualBias, TokenBias, TokenContext
from jax_posenc.rope_scaling import RopeScaling

_F32 = jnp.float32


def log_forget_gates(inputs: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """`log f = log_sigmoid(x . w_h + b_h)` per head, float32 `[B, H, S]`.

    Args:
      inputs: `[B, S, F]` token features x.
      kernel: `[F, H]` gate weights w (one column per head).
      bias: `[H]` gate biases b.
    """
    _checks.check_rank("inputs", inputs, 3)
    _checks.check_rank("kernel", kernel, 2)
    if kernel.shape[0] != inputs.shape[-1] or jnp.shape(bias) != (kernel.shape[1],):
        raise ValueError(
            f"kernel must be [F, H] and bias [H] for inputs [B, S, F]; got inputs "
            f"{inputs.shape}, kernel {kernel.shape}, bias {jnp.shape(bias)}"
        )
    logits = jnp.einsum("bsf,fh->bhs", inputs.astype(_F32), kernel.astype(_F32))
    return jax.nn.log_sigmoid(logits + bias.astype(_F32)[:, None])


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """Bool `[B or 1, S]`: True at the first token of every run of equal ids."""
    ids = _checks.position_rows("segment_ids", segment_ids)
    first = jnp.ones((ids.shape[0], 1), bool)
    return jnp.concatenate([first, ids[:, 1:] != ids[:, :-1]], axis=1)


def forget_cumsum(log_forget: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """`c_t = sum of log f_l over l <= t` in t's segment, float32 `[B, H, S]`.

    Args:
      log_forget: `[B, H, S]` log forget gates.
      segment_ids: optional integer `[S]` or `[B or 1, S]` document ids; the sum restarts
        at 0 at every segment start (a segmented scan, not a difference of cumulative
        sums, so nothing cancels).
    """
    log_forget = _checks.check_floating_array("log_forget", log_forget).astype(_F32)
    _checks.check_rank("log_forget", log_forget, 3)
    if segment_ids is None:
        return jnp.cumsum(log_forget, axis=-1)
    starts = segment_starts(segment_ids)
    if starts.shape[-1] != log_forget.shape[-1]:
        raise ValueError(
            f"segment_ids must have the length of log_forget ({log_forget.shape[-1]}), "
            f"got {starts.shape}"
        )
    starts = jnp.broadcast_to(starts[:, None, :], log_forget.shape)

    def add_within_segments(left, right):
        (left_sum, left_start), (right_sum, right_start) = left, right
        return jnp.where(right_start, right_sum, left_sum + right_sum), left_start | right_start

    cumsum, _ = lax.associative_scan(add_within_segments, (log_forget, starts), axis=2)
    return cumsum


def forgetting_logit_bias(query_cumsum: jax.Array, key_cumsum: jax.Array) -> jax.Array:
    """`D_ij = c_i - c_j`, `[B, H, Lq, Lk]` from `[B, H, Lq]` and `[B, H, Lk]`.

    A `jax_posenc.TokenBiasFn`: attention calls it per block, and its gradient is the
    row sum (for the queries) and minus the column sum (for the keys) of the block's
    logit gradients. Meaningful under a causal mask only (for `j > i` it is a reward).
    """
    return query_cumsum[..., :, None] - key_cumsum[..., None, :]


def cumsum_at_positions(
    key_cumsum: jax.Array, k_positions: jax.Array, q_positions: jax.Array
) -> jax.Array:
    """The key cumulative sums read at the query positions, `[B, H, Lq]`.

    For queries that are not the key tokens (a query after a KV cache, `Lq != Lk`):
    query i takes `c` of the last key with `k_pos <= q_pos[i]`, which is its own token
    in self-attention over a cache, and 0 when there is none. Key positions must be
    ascending along each row.
    """
    q_positions, k_positions = _checks.check_position_pair(q_positions, k_positions)
    batch = max(key_cumsum.shape[0], q_positions.shape[0], k_positions.shape[0])
    q_rows = jnp.broadcast_to(q_positions, (batch, q_positions.shape[1]))
    k_rows = jnp.broadcast_to(k_positions, (batch, k_positions.shape[1]))
    last = jax.vmap(lambda k, q: jnp.searchsorted(k, q, side="right"))(k_rows, q_rows) - 1
    rows = jnp.broadcast_to(key_cumsum, (batch, *key_cumsum.shape[1:]))
    index = jnp.broadcast_to(jnp.maximum(last, 0)[:, None, :], (*rows.shape[:2], last.shape[1]))
    return jnp.where(last[:, None, :] >= 0, jnp.take_along_axis(rows, index, axis=2), 0.0)


def forgetting_bias(
    log_forget: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    q_positions: jax.Array | None = None,
    k_positions: jax.Array | None = None,
) -> TokenBias:
    """FoX's `TokenBias` from the keys' log forget gates, for `dot_product_attention`.

    Args:
      log_forget: `[B, H, Lk]` log forget gates of the key tokens (`log_forget_gates`).
      segment_ids: optional `[B or 1, Lk]` document ids (the cumulative sum restarts).
      q_positions, k_positions: only when the queries are not the key tokens
        (`Lq != Lk`, e.g. decoding after a cache): see `cumsum_at_positions`.

    Returns:
      `TokenBias(c_q, c_k, forgetting_logit_bias)`; use it with `causal=True`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jax_posenc as pe
      >>> x = jax.random.normal(jax.random.key(0), (1, 64, 32))  # layer input [B, S, F]
      >>> q = k = v = jax.random.normal(jax.random.key(1), (1, 64, 4, 8))
      >>> log_f = pe.log_forget_gates(x, 0.1 * jnp.ones((32, 4)), jnp.full((4,), 2.0))
      >>> out = pe.dot_product_attention(
      ...     q, k, v, token_bias=pe.forgetting_bias(log_f), causal=True, block_size=16
      ... )
      >>> out.shape
      (1, 64, 4, 8)
    """
    key_cumsum = forget_cumsum(log_forget, segment_ids)
    query_cumsum = key_cumsum
    if q_positions is not None or k_positions is not None:
        if q_positions is None or k_positions is None:
            raise ValueError("give both q_positions and k_positions, or neither")
        query_cumsum = cumsum_at_positions(key_cumsum, k_positions, q_positions)
    return TokenBias(query_cumsum, key_cumsum, forgetting_logit_bias)


class ForgettingGate(nn.Module):
    """FoX's per-head forget gate: parameters `kernel` `[F, H]` and `bias` `[H]`.

    The gate reads the features of each token (`TokenContext.inputs`): the attention
    layer's input `x` `[B, S, d_model]` in `jax_posenc.Transformer`, as in the paper.
    Inside Flax's attention layers (`make_attention_fn`) the input is not visible, so the
    gate reads the token's projected keys `[B, S, Hkv * D]` instead: still a linear
    function of `x` (through the key projection), with `F = Hkv * D` gate weights.

    Initialisation follows the reference implementation: weights normal(0.02), biases
    zero (every gate starts near `sigmoid(0) = 1/2`); a positive `initial_bias` starts
    with longer memories (`f = sigmoid(b)`).

    Attributes:
      num_heads: number of query heads H.
      kernel_stddev: standard deviation of the normal initial `[F, H]` weights.
      initial_bias: initial value of the `[H]` biases.
    """

    num_heads: int
    kernel_stddev: float = 0.02
    initial_bias: float = 0.0

    @nn.compact
    def token_bias(self, context: TokenContext) -> TokenBias:
        """The `TokenBias` of one attention call (the `token_bias` role)."""
        num_heads = _checks.check_positive_int("num_heads", self.num_heads)
        inputs = _checks.check_floating_array("inputs", context.inputs)
        _checks.check_rank("inputs", inputs, 3)
        kernel_init = nn.initializers.normal(self.kernel_stddev)
        bias_init = nn.initializers.constant(self.initial_bias)
        kernel = self.param("kernel", kernel_init, (inputs.shape[-1], num_heads), _F32)
        bias = self.param("bias", bias_init, (num_heads,), _F32)
        log_forget = log_forget_gates(inputs, kernel, bias)
        q_len = jnp.shape(context.q_positions)[-1]
        if q_len == inputs.shape[1]:  # self-attention: the queries are the key tokens
            return forgetting_bias(log_forget, context.segment_ids)
        return forgetting_bias(
            log_forget,
            context.segment_ids,
            q_positions=context.q_positions,
            k_positions=context.k_positions,
        )

    def __call__(
        self,
        inputs: jax.Array,
        q_positions: jax.Array | None = None,
        k_positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """The materialized bias `[B, H, Lq, Lk]` for key tokens `inputs` `[B, Lk, F]`
        (positions default to `arange(Lk)`, queries being the key tokens)."""
        default = jnp.arange(inputs.shape[1], dtype=jnp.int32)[None]
        k_positions = default if k_positions is None else k_positions
        q_positions = k_positions if q_positions is None else q_positions
        context = TokenContext(inputs, q_positions, k_positions, segment_ids)
        terms = self.token_bias(context)
        return terms.fn(terms.query_values, terms.key_values)


def randomized_positions(
    key: jax.Array, batch_size: int, seq_len: int, max_range: int
) -> jax.Array:
    """Sorted, distinct positions drawn uniformly from `[0, max_range)`, int32 `[B, S]`.

    Each row is an independent uniformly random `seq_len`-subset of the range, sorted
    (Ruoss et al., 2023): training on these, a model meets every position up to
    `max_range` while training on short sequences. `max_range` should be at least the
    longest length the model will be evaluated at; evaluate with positions drawn the
    same way (in training the model never saw consecutive positions only). With a
    learned table, `max_positions` must be at least `max_range`.

    Args:
      key: a PRNG key.
      batch_size: rows B.
      seq_len: positions per row S.
      max_range: size of the range to draw from, `>= seq_len` and at most 2^31; each
        row draws a permutation of it, so time and memory grow as `B * max_range`.

    Example:
      >>> import jax
      >>> import jax_posenc as pe
      >>> pe.randomized_positions(jax.random.key(0), 2, 4, 100).shape
      (2, 4)
    """
    batch_size = _checks.check_positive_int("batch_size", batch_size)
    seq_len = _checks.check_positive_int("seq_len", seq_len)
    max_range = _checks.check_positive_int("max_range", max_range)
    if not seq_len <= max_range <= 2**31:
        raise ValueError(
            f"max_range must be in [seq_len, 2^31] = [{seq_len}, {2**31}], got {max_range}"
        )

    def row(row_key):
        subset = jax.random.choice(row_key, max_range, (seq_len,), replace=False)
        return jnp.sort(subset.astype(jnp.int32))

    return jax.vmap(row)(jax.random.split(key, batch_size))


# ------------------------------------------------------------------------- SelfExtend


def _check_self_extend(group_size: int, window: int) -> tuple[int, int]:
    group_size = _checks.check_positive_int("group_size", group_size)
    window = _checks.check_positive_int("window", window)
    return group_size, window


def self_extend_positions(
    q_positions: jax.Array, k_positions: jax.Array, *, group_size: int, window: int
) -> tuple[jax.Array, jax.Array]:
    """SelfExtend's grouped positions, int32 `[B or 1, Lq]` and `[B or 1, Lk]`.

    Keys move to `k // G`, queries to `q // G + window - window // G`: the shift makes a
    key just beyond the window sit about `window` positions before the query, where
    the last neighbour key sits, so the two positionings join (Jin et al., 2024, eq. 3;
    `G = group_size`).
    """
    group_size, window = _check_self_extend(group_size, window)
    q_positions, k_positions = _checks.check_position_pair(q_positions, k_positions)
    shift = window - window // group_size
    return q_positions // group_size + shift, k_positions // group_size


def self_extend_select(q_positions: jax.Array, k_positions: jax.Array, *, window: int) -> jax.Array:
    """Bool `[B or 1, 1, Lq, Lk]`: True where SelfExtend uses grouped positions, i.e. the
    key lies `window` or more positions before the query (`q_pos - k_pos >= window`)."""
    window = _checks.check_positive_int("window", window)
    q_positions, k_positions = _checks.check_position_pair(q_positions, k_positions)
    distance = _checks.saturating_difference(q_positions[:, :, None], k_positions[:, None, :])
    return (distance >= window)[:, None]


class SelfExtendRotaryEmbedding(nn.Module):
    """RoPE with SelfExtend (Jin et al., 2024): exact positions for keys within `window`
    of the query, grouped positions (`self_extend_positions`) beyond.

    A qk transform: `__call__(q, k, q_positions, k_positions=None)` is plain RoPE at the
    exact positions; `alternate()` gives the `AlternateQk` (RoPE at the grouped
    positions, and `self_extend_select`), which attention merges per pair inside its
    block loop. No parameters: it applies to a model trained with the same RoPE
    settings, extending its context about `group_size` times without tuning. Causal
    only (the grouping looks back from the query). Through `make_attention_fn` it
    decodes with Flax's cache (keys are rotated each step); `jax_posenc.KVCache` stores
    keys rotated at one positioning and is not supported.

    Attributes:
      group_size: G, the number of positions that share one grouped position.
      window: neighbour window w_n: keys with `q_pos - k_pos < window` keep their
        exact positions.
      rotary_dim, base, layout, scaling, seq_len, angle_precision: as in
        `jax_posenc.RotaryEmbedding`.
    """

    group_size: int = 8
    window: int = 512
    rotary_dim: int | None = None
    base: float = 10000.0
    layout: str = "half"
    scaling: RopeScaling | None = None
    seq_len: int | None = None
    angle_precision: str = "exact"

    def _rope(self, q, k, q_positions, k_positions):
        return rope.apply_rope_qk(
            q,
            k,
            q_positions,
            k_positions,
            base=self.base,
            rotary_dim=self.rotary_dim,
            layout=self.layout,
            scaling=self.scaling,
            seq_len=self.seq_len,
            angle_precision=self.angle_precision,
        )

    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        q_positions: jax.Array,
        k_positions: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        _check_self_extend(self.group_size, self.window)
        k_positions = q_positions if k_positions is None else k_positions
        return self._rope(q, k, q_positions, k_positions)

    def alternate(self) -> AlternateQk:
        """RoPE at the grouped positions, used where `self_extend_select` holds."""
        group_size, window = _check_self_extend(self.group_size, self.window)

        def grouped(q, k, q_positions, k_positions=None):
            k_positions = q_positions if k_positions is None else k_positions
            q_rows = _checks.position_rows("q_positions", q_positions, length=q.shape[1])
            k_rows = _checks.position_rows("k_positions", k_positions, length=k.shape[1])
            positions = self_extend_positions(q_rows, k_rows, group_size=group_size, window=window)
            return self._rope(q, k, *positions)

        return AlternateQk(grouped, functools.partial(self_extend_select, window=window))


# ------------------------------------------------------------------------------- CoPE


def cope_positions(
    gate_logits: jax.Array, allowed: jax.Array | None = None, *, num_positions: int
) -> jax.Array:
    """CoPE's contextual positions, float32 `[B, H, Lq, Lk]`.

    `p_ij = min(sum_{t >= j, allowed_it} sigmoid(gate_logits_it), num_positions - 1)`:
    the gates of the allowed keys from key j to the end of query i's row, which under a
    causal mask is `sum_{t=j..i} g_it` (Golovneva et al., 2024, sec. 3). Keys that
    may not be attended to (mask, causality, other documents) add nothing. The sum runs
    in the order the keys are stored (reverse cumulative sum, nothing cancels).

    Args:
      gate_logits: `[B, H, Lq, Lk]` logits of the gates; attention passes its content
        logits `scale * q . k`, as the reference implementation does.
      allowed: bool broadcastable to `[B, H, Lq, Lk]`, or None for every pair.
      num_positions: size of the embedding table; positions are clipped to
        `num_positions - 1` (`npos` of the reference code).
    """
    num_positions = _checks.check_positive_int("num_positions", num_positions)
    gate_logits = _checks.check_floating_array("gate_logits", gate_logits)
    _checks.check_rank("gate_logits", gate_logits, 4)
    gates = jax.nn.sigmoid(gate_logits.astype(_F32))
    if allowed is not None:
        gates = jnp.where(allowed, gates, 0.0)
    positions = lax.cumsum(gates, axis=3, reverse=True)
    return jnp.minimum(positions, float(num_positions - 1))


def cope_position_logits(q: jax.Array, positions: jax.Array, embeddings: jax.Array) -> jax.Array:
    """`q_i . e(p_ij)` with `e` interpolated between integer positions, float32
    `[B, H, Lq, Lk]`.

    With `z_i[n] = q_i . e[n]`, the term is `(1 - w) z_i[floor p] + w z_i[ceil p]`,
    `w = p - floor p` (Golovneva et al., 2024, sec. 3): one `[Lq, num_positions]` product
    per head instead of an embedding per pair. The gradient reaches the positions (hence
    the gates) through `w`.

    Args:
      q: `[B, Lq, H, D]` queries (attention passes them times the softmax scale).
      positions: `[B or 1, H or 1, Lq, Lk]` contextual positions (`cope_positions`);
        values outside `[0, num_positions - 1]` are clipped to it.
      embeddings: `[H or 1, num_positions, D]` position embeddings, one table per head or
        one shared by all heads.
    """
    _checks.check_floating_array("q", q)
    _checks.check_rank("q", q, 4)
    _checks.check_rank("positions", positions, 4)
    embeddings = _checks.check_floating_array("embeddings", embeddings)
    _checks.check_rank("embeddings", embeddings, 3)
    batch, q_len, heads, dim = q.shape
    if embeddings.shape[0] not in (1, heads) or embeddings.shape[2] != dim:
        raise ValueError(
            f"embeddings must have shape [H or 1, num_positions, D] = [{heads} or 1, n, {dim}] "
            f"for q {list(q.shape)}, got {list(embeddings.shape)}"
        )
    if batch * heads * q_len * embeddings.shape[1] >= 2**31:
        raise ValueError(
            f"CoPE's products q . e[n] [B, H, Lq, num_positions] = "
            f"[{batch}, {heads}, {q_len}, {embeddings.shape[1]}] must have fewer than 2^31 "
            "entries (they are indexed with int32); use fewer positions or a smaller batch"
        )
    table = jnp.broadcast_to(embeddings, (heads, *embeddings.shape[1:])).astype(q.dtype)
    fixed = jnp.einsum("bqhd,hnd->bhqn", q, table, preferred_element_type=_F32)
    shape = (batch, heads, q_len, positions.shape[3])
    # Clipped again so that no position reads another row of the flattened products.
    positions = jnp.clip(jnp.broadcast_to(positions.astype(_F32), shape), 0.0, fixed.shape[3] - 1)
    floor = jnp.floor(positions)
    weight = positions - floor
    # Gathers from the flattened products: their gradient (a scatter-add) is about 8x
    # faster on CPU than that of a 4-D `take_along_axis`.
    rows = jnp.arange(batch * heads * q_len, dtype=jnp.int32).reshape(batch, heads, q_len, 1)
    flat = fixed.reshape(-1)
    offsets = rows * fixed.shape[3]
    lower = flat[offsets + floor.astype(jnp.int32)]
    upper = flat[offsets + jnp.ceil(positions).astype(jnp.int32)]
    return (1.0 - weight) * lower + weight * upper


def cope_bias(
    q: jax.Array, content_logits: jax.Array, allowed: jax.Array | None, embeddings: jax.Array
) -> jax.Array:
    """CoPE's logit term, a `jax_posenc.ContextualBiasFn`, float32 `[B, H, Lq, Lk]`.

    `cope_position_logits(q, cope_positions(content_logits, allowed), embeddings)` with
    `num_positions = embeddings.shape[1]`. Attention calls it with the queries times
    the softmax scale and its content logits `scale * q . k`, so the logits become
    `scale * (q_i . k_j + q_i . e(p_ij))` with gates `sigmoid(scale * q_i . k_t)`: the
    reference implementation's default (both terms divided by `sqrt(D)`).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jax_posenc as pe
      >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 32, 4, 8))  # [B, L, H, D]
      >>> table = 0.1 * jax.random.normal(jax.random.key(1), (1, 33, 8))  # [1, npos, D]
      >>> out = pe.dot_product_attention(
      ...     q, k, v, contextual_bias=pe.ContextualBias(table, pe.cope_bias), causal=True
      ... )
      >>> out.shape
      (1, 32, 4, 8)
    """
    embeddings = _checks.check_floating_array("embeddings", embeddings)
    _checks.check_rank("embeddings", embeddings, 3)
    positions = cope_positions(content_logits, allowed, num_positions=embeddings.shape[1])
    return cope_position_logits(q, positions, embeddings)


class ContextualPositionEmbedding(nn.Module):
    """CoPE (Golovneva et al., 2024): learned embeddings of contextual positions.

    Parameter `embeddings` `[1, num_positions, head_dim]` (one table shared by the heads
    of the layer, as in the reference code) or `[num_heads, num_positions, head_dim]`
    with `shared_across_heads=False`; zeros at initialization, as in the reference code
    (the term starts at 0 and the table learns from the first step). The gates are
    those of the attention it is used in, so `contextual_bias()` gives a
    `jax_posenc.ContextualBias` (`cope_bias` with this table) that attention evaluates
    from its own content logits and mask: on the xla path only (`implementation="auto"`
    picks it at every length; "blockwise" raises), memory `O(Lq * Lk)`.

    Combined with a qk transform ("cope+rope") the gates and the term read the queries
    and keys as attention does, i.e. rotated; with a logit bias ("cope+alibi") the gates
    read the content logits without the bias.

    Attributes:
      num_heads: query heads H.
      head_dim: features per head D.
      num_positions: table size; contextual positions are clipped to
        `num_positions - 1`. The reference code uses the training length + 1 and the
        paper notes that a small maximum works; the default does not depend on the
        sequence length, so the same parameters serve every length (in
        `make_attention_fn` and `jax_posenc.nnx.AttentionFn` too).
      shared_across_heads: one table for all heads (the reference) or one per head.
      embedding_stddev: standard deviation of normal initial embeddings; 0 for zeros.
    """

    num_heads: int
    head_dim: int
    num_positions: int = 64
    shared_across_heads: bool = True
    embedding_stddev: float = 0.0

    @nn.compact
    def contextual_bias(self) -> ContextualBias:
        """The `ContextualBias` of one attention call (the `contextual_bias` role)."""
        num_heads = _checks.check_positive_int("num_heads", self.num_heads)
        head_dim = _checks.check_positive_int("head_dim", self.head_dim)
        num_positions = _checks.check_positive_int("num_positions", self.num_positions)
        if not self.embedding_stddev >= 0.0:
            raise ValueError(f"embedding_stddev must be >= 0, got {self.embedding_stddev}")
        init = (
            nn.initializers.normal(self.embedding_stddev)
            if self.embedding_stddev
            else nn.initializers.zeros
        )
        tables = 1 if self.shared_across_heads else num_heads
        embeddings = self.param("embeddings", init, (tables, num_positions, head_dim), _F32)
        return ContextualBias(embeddings, cope_bias)

    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        q_positions: jax.Array | None = None,
        k_positions: jax.Array | None = None,
        *,
        causal: bool = True,
    ) -> jax.Array:
        """The materialized term `scale * q_i . e(p_ij)` `[B, H, Lq, Lk]` for q
        `[B, Lq, H, D]` and k `[B, Lk, Hkv, D]`, `scale = 1 / sqrt(D)`, gates over the
        keys with `k_pos <= q_pos` (all keys when `causal=False`); positions default to
        `arange(Lk)`, queries being the key tokens."""
        _checks.check_rank("q", q, 4)
        _checks.check_rank("k", k, 4)
        k_positions = jnp.arange(k.shape[1]) if k_positions is None else k_positions
        q_positions = k_positions if q_positions is None else q_positions
        q_rows, k_rows = _checks.check_position_pair(q_positions, k_positions)
        scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], _F32))
        keys = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
        content_logits = scale * jnp.einsum("bqhd,bkhd->bhqk", q, keys, preferred_element_type=_F32)
        allowed = (q_rows[:, None, :, None] >= k_rows[:, None, None, :]) if causal else None
        terms = self.contextual_bias()
        return terms.fn((q * scale).astype(q.dtype), content_logits, allowed, terms.params)
