"""Tests for dot_product_attention (xla and blockwise), its Flax adapter and the KV cache."""

import ast
import functools
import itertools
import pathlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st
from jax import lax
from reference_attention import attention_reference
from reference_bias import t5_bucket_reference

import jax_posenc as pe

# ---------------------------------------------------------------- test-local terms
# Positional terms written here from their papers' formulas, independent of the
# library's bias modules, so the attention core is tested on its own.


def _slopes(heads):
    return jnp.asarray(2.0 ** (-8.0 * np.arange(1, heads + 1) / heads), jnp.float32)


def alibi_like(heads):
    """Press et al. 2022: bias = -m_h |i - j|."""
    slopes = _slopes(heads)

    def bias_fn(q_pos, k_pos):
        distance = jnp.abs(q_pos[:, None, :, None] - k_pos[:, None, None, :]).astype(jnp.float32)
        return -slopes[None, :, None, None] * distance

    return bias_fn


def alibi_dense(heads, q_pos, k_pos):
    distance = np.abs(np.asarray(q_pos)[..., :, None] - np.asarray(k_pos)[..., None, :])
    slopes = np.asarray(_slopes(heads), np.float64)
    distance = distance.reshape(-1, 1, *distance.shape[-2:]).astype(np.float64)
    return -slopes[None, :, None, None] * distance


def table_bias(table, radius):
    """A learned scalar per head and clipped offset k - q (T5-like without buckets)."""

    def bias_fn(q_pos, k_pos):
        offset = jnp.clip(k_pos[:, None, :] - q_pos[:, :, None], -radius, radius) + radius
        return jnp.moveaxis(table[:, offset], 0, 1)  # [B or 1, H, bq, bk]

    return bias_fn


def table_dense(table, radius, q_pos, k_pos):
    q_pos, k_pos = np.atleast_2d(q_pos), np.atleast_2d(k_pos)
    offset = np.clip(k_pos[:, None, :] - q_pos[:, :, None], -radius, radius) + radius
    return np.moveaxis(np.asarray(table, np.float64)[:, offset], 0, 1)


def absolute_bias(weights):
    """Depends on the query position itself (like FIRE's 1/i normalisation)."""

    def bias_fn(q_pos, k_pos):
        q = q_pos[:, None, :, None].astype(jnp.float32)
        k = k_pos[:, None, None, :].astype(jnp.float32)
        return weights[None, :, None, None] * (k - q) / (q + 1.0)

    return bias_fn


def shaw_like(rel_keys, rel_values, radius, content_bias=None):
    """Shaw et al. 2018: a^K, a^V indexed by the clipped offset k - q, shared by heads."""

    def index(q_pos, k_pos, batch):
        offset = jnp.clip(k_pos[:, None, :] - q_pos[:, :, None], -radius, radius) + radius
        return jnp.broadcast_to(offset, (batch, *offset.shape[1:]))

    def query_bias_fn(q_scaled, q_pos, k_pos):
        rel = rel_keys[index(q_pos, k_pos, q_scaled.shape[0])]  # [B, bq, bk, D]
        return jnp.einsum("bqhd,bqkd->bhqk", q_scaled, rel)

    def value_fn(weights, q_pos, k_pos):
        rel = rel_values[index(q_pos, k_pos, weights.shape[0])]  # [B, bq, bk, Dv]
        return jnp.einsum("bhqk,bqkd->bqhd", weights, rel)

    return pe.RelativeTerms(query_bias_fn, value_fn, content_bias)


def shaw_dense(rel_keys, rel_values, radius, q_pos, k_pos, batch, heads):
    q_pos, k_pos = np.atleast_2d(q_pos), np.atleast_2d(k_pos)
    offset = np.clip(k_pos[:, None, :] - q_pos[:, :, None], -radius, radius) + radius
    offset = np.broadcast_to(offset, (batch, *offset.shape[1:]))

    def per_head(table):
        rel = np.asarray(table, np.float64)[offset]
        return np.broadcast_to(rel[:, :, :, None], (*rel.shape[:3], heads, rel.shape[-1]))

    return per_head(rel_keys), per_head(rel_values)


def _normal(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _qkv(batch, q_len, k_len, heads, kv_heads, dim, seed=0, dtype=jnp.float32):
    return (
        _normal(seed, (batch, q_len, heads, dim), dtype),
        _normal(seed + 1, (batch, k_len, kv_heads, dim), dtype),
        _normal(seed + 2, (batch, k_len, kv_heads, dim), dtype),
    )


# ---------------------------------------------------------------- xla vs float64


class XlaMatchesFloat64ReferenceTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((False, 4), (True, 1))
    def test_alibi_like_bias(self, causal, kv_heads):
        q, k, v = _qkv(2, 19, 19, 4, kv_heads, 8)
        got = self.variant(
            lambda q, k, v: pe.dot_product_attention(q, k, v, bias_fn=alibi_like(4), causal=causal)
        )(q, k, v)
        chex.assert_shape(got, (2, 19, 4, 8))
        chex.assert_type(got, jnp.float32)
        positions = np.arange(19)
        allowed = positions[:, None] >= positions[None, :] if causal else None
        want = attention_reference(
            q, k, v, bias=alibi_dense(4, positions, positions), allowed=allowed
        )
        np.testing.assert_allclose(got, want, atol=2e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_learned_table_bias_with_mask_and_batched_positions(self):
        q, k, v = _qkv(2, 7, 11, 2, 2, 4, seed=3)
        table = _normal(9, (2, 9))
        q_pos = np.array([[4, 5, 6, 7, 8, 9, 10], [0, 2, 4, 6, 8, 10, 12]], np.int32)
        k_pos = np.arange(11, dtype=np.int32)
        mask = np.random.default_rng(4).random((2, 1, 7, 11)) > 0.3
        got = self.variant(
            lambda q, k, v: pe.dot_product_attention(
                q, k, v, bias_fn=table_bias(table, 4), q_positions=q_pos, k_positions=k_pos,
                mask=mask, scale=0.3,
            )
        )(q, k, v)  # fmt: skip
        want = attention_reference(
            q, k, v, scale=0.3, bias=table_dense(table, 4, q_pos, k_pos), allowed=mask
        )
        np.testing.assert_allclose(got, want, atol=2e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_shaw_like_relative_terms_with_content_bias(self):
        q, k, v = _qkv(2, 9, 9, 2, 2, 4, seed=5)
        rel_keys, rel_values, u = _normal(6, (7, 4)), _normal(7, (7, 4)), _normal(8, (2, 4))
        terms = shaw_like(rel_keys, rel_values, 3, u)
        got = self.variant(
            lambda q, k, v: pe.dot_product_attention(q, k, v, relative_terms=terms, causal=True)
        )(q, k, v)
        positions = np.arange(9)
        keys, values = shaw_dense(rel_keys, rel_values, 3, positions, positions, 2, 2)
        want = attention_reference(
            q, k, v, allowed=positions[:, None] >= positions[None, :],
            relative_keys=keys, relative_values=values, content_bias=u,
        )  # fmt: skip
        np.testing.assert_allclose(got, want, atol=2e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_segments_mask_across_documents(self):
        q, k, v = _qkv(2, 10, 10, 2, 1, 4, seed=11)
        segments = np.array([[0] * 4 + [1] * 6, [3] * 7 + [5] * 3], np.int32)
        got = self.variant(lambda q, k, v: pe.dot_product_attention(q, k, v, segment_ids=segments))(
            q, k, v
        )
        allowed = (segments[:, :, None] == segments[:, None, :])[:, None]
        np.testing.assert_allclose(got, attention_reference(q, k, v, allowed=allowed), atol=2e-6)


# ---------------------------------------------------------------- blockwise vs xla


def _loss_and_grads(implementation, block_size, q, k, v, params, build):
    """Output and gradients w.r.t. q, k, v and the positional-term parameters."""

    def loss(q, k, v, params):
        out = pe.dot_product_attention(
            q, k, v, implementation=implementation, block_size=block_size, **build(params)
        )
        cotangent = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        return (out * cotangent).sum(), out

    grads, out = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, params)
    return out, grads


def _blockwise_vs_xla(q, k, v, params, build, block_size):
    run = functools.partial(_loss_and_grads, q=q, k=k, v=v, params=params, build=build)
    xla = jax.jit(lambda: run("xla", None))()
    blockwise = jax.jit(lambda: run("blockwise", block_size))()
    return xla, blockwise


def _assert_same(xla, blockwise, atol=2e-5, rtol=0.0):
    (out_x, grads_x), (out_b, grads_b) = xla, blockwise
    if out_x is not None:
        assert np.all(np.isfinite(out_b))
        np.testing.assert_allclose(out_b, out_x, atol=atol, rtol=rtol)
    for gx, gb in zip(jax.tree.leaves(grads_x), jax.tree.leaves(grads_b), strict=True):
        assert np.all(np.isfinite(gb))
        np.testing.assert_allclose(gb, gx, atol=atol, rtol=rtol)


def _shuffled_blocks(length, block, seed=0):
    """Positions whose blocks come in a random order, shuffled inside each block too."""
    rng = np.random.default_rng(seed)
    chunks = np.arange(-(-length // block) * block).reshape(-1, block)
    chunks = rng.permuted(chunks[rng.permutation(len(chunks))], axis=1)
    return chunks.reshape(-1)[:length].astype(np.int32)


_SHUFFLED = _shuffled_blocks(23, 4)

_MASK_OFFSET_CAUSAL = {"mask": "random", "offset": 3, "causal": True}
BLOCKWISE_CASES = {
    # name: (batch, q_len, k_len, heads, kv_heads, block_size, term, extra kwargs)
    "alibi_causal_odd_length": (2, 37, 37, 4, 4, 8, "alibi", {"causal": True}),
    "table_gqa_mask_bidirectional": (2, 29, 29, 4, 2, (8, 16), "table", {"mask": "random"}),
    "shaw_segments_causal": (2, 24, 24, 2, 2, 8, "shaw", {"segments": True, "causal": True}),
    "table_decode_offset_queries": (1, 5, 30, 4, 1, 4, "table", {"offset": 25, "causal": True}),
    "alibi_cross_lengths_mask": (2, 13, 21, 2, 2, (4, 8), "alibi", {"mask": "random", "offset": 3}),
    "alibi_shuffled_positions_causal": (2, 23, 23, 2, 2, 4, "alibi", {"shuffled": True}),
    "no_term_single_block": (1, 6, 6, 2, 2, 64, None, {"causal": True}),
    # Query blocks of twice (or four times) the key block: half-row visits.
    "alibi_causal_half_rows_gqa": (2, 37, 37, 4, 2, (8, 4), "alibi", {"causal": True}),
    "shaw_segments_half_rows": (
        2,
        24,
        24,
        2,
        2,
        (8, 4),
        "shaw",
        {"segments": True, "causal": True},
    ),
    "table_mask_offset_half_rows": (2, 13, 21, 2, 2, (8, 2), "table", _MASK_OFFSET_CAUSAL),
}


class BlockwiseMatchesXlaTest(parameterized.TestCase):
    @parameterized.named_parameters(*[(name, *case) for name, case in BLOCKWISE_CASES.items()])
    def test_outputs_and_gradients_agree(
        self, batch, q_len, k_len, heads, kv_heads, block_size, term, extra
    ):
        q, k, v = _qkv(batch, q_len, k_len, heads, kv_heads, 8, seed=q_len)
        radius = 6
        params = {
            "alibi": {},
            "table": {"table": _normal(1, (heads, 2 * radius + 1))},
            "shaw": {
                "keys": _normal(2, (2 * radius + 1, 8)),
                "values": _normal(3, (2 * radius + 1, 8)),
                "u": _normal(4, (heads, 8)),
            },
            None: {},
        }[term]
        kwargs = {"causal": extra.get("causal", False)}
        if extra.get("mask") == "random":
            kwargs["mask"] = np.random.default_rng(0).random((batch, 1, q_len, k_len)) > 0.4
        if extra.get("segments"):
            kwargs["segment_ids"] = np.array([[0] * 9 + [1] * 15, [2] * 16 + [4] * 8], np.int32)
        if "offset" in extra:
            kwargs["q_positions"] = extra["offset"] + np.arange(q_len, dtype=np.int32)
        if extra.get("shuffled"):
            kwargs.update(q_positions=_SHUFFLED, k_positions=_SHUFFLED, causal=True)
            blocks = np.pad(_SHUFFLED, (0, 1), mode="edge").reshape(-1, 4)
            assert (blocks.max(1)[:, None] < blocks.min(1)[None, :]).any()  # some are skipped

        def build(params):
            if term == "alibi":
                return {**kwargs, "bias_fn": alibi_like(heads)}
            if term == "table":
                return {**kwargs, "bias_fn": table_bias(params["table"], radius)}
            if term == "shaw":
                terms = shaw_like(params["keys"], params["values"], radius, params["u"])
                return {**kwargs, "relative_terms": terms}
            return kwargs

        _assert_same(*_blockwise_vs_xla(q, k, v, params, build, block_size))


def test_blockwise_gradients_of_traced_bias_constants_only_where_asked():
    # The blockwise backward pass computes gradients only for hoisted constants that are
    # perturbed: slopes passed as a differentiated argument get theirs (== xla), slopes
    # traced but not differentiated (and closed-over ones) leave q, k, v unchanged.
    q, k, v = _qkv(2, 21, 21, 4, 2, 8, seed=5)
    weights = _normal(9, (2, 21, 4, 8))

    def loss(q, k, v, slopes, implementation):
        def bias_fn(q_pos, k_pos):
            distance = jnp.abs(q_pos[:, None, :, None] - k_pos[:, None, None, :])
            return -slopes[None, :, None, None] * distance.astype(jnp.float32)

        out = pe.dot_product_attention(
            q, k, v, bias_fn=bias_fn, causal=True, implementation=implementation, block_size=8
        )
        return jnp.sum(out * weights)

    slopes = jnp.asarray(_slopes(4), jnp.float32)
    for argnums in ((0, 1, 2, 3), (0, 1, 2)):
        grad = jax.jit(jax.grad(loss, argnums=argnums), static_argnums=4)
        xla, blockwise = (grad(q, k, v, slopes, name) for name in ("xla", "blockwise"))
        _assert_same((None, xla), (None, blockwise), rtol=1e-5)  # slope sums of ~10^3 terms
    # A slope gradient is the sum of the logit gradients times -|i - j|: nonzero here.
    d_slopes = jax.jit(jax.grad(loss, argnums=3), static_argnums=4)(q, k, v, slopes, "blockwise")
    assert np.all(np.abs(np.asarray(d_slopes)) > 0)


def test_causal_blockwise_skips_blocks_above_the_diagonal():
    calls = []

    def counting_bias(q_pos, k_pos):
        jax.debug.callback(
            lambda q0, k0: calls.append((int(q0), int(k0))), q_pos[0, 0], k_pos[0, 0]
        )
        return jnp.zeros((1, 1, q_pos.shape[1], k_pos.shape[1]))

    q, k, v = _qkv(1, 32, 32, 2, 2, 4)
    run = functools.partial(
        pe.dot_product_attention, bias_fn=counting_bias, implementation="blockwise", block_size=8
    )
    jax.block_until_ready(jax.jit(lambda q, k, v: run(q, k, v, causal=True))(q, k, v))
    # 4 x 4 block pairs, of which only the 10 on or below the diagonal are evaluated.
    below_diagonal = [(8 * i, 8 * j) for i in range(4) for j in range(i + 1)]
    assert sorted(calls) == below_diagonal

    calls.clear()
    grad = jax.jit(jax.grad(lambda q, k, v: run(q, k, v, causal=True).sum(), argnums=(0, 1, 2)))
    jax.block_until_ready(grad(q, k, v))
    # The backward pass recomputes the same 10 blocks, and only those.
    assert sorted(calls) == sorted(below_diagonal * 2)

    calls.clear()
    # A boolean causal mask (as Flax's `make_causal_mask` gives) skips the same blocks.
    lower = np.tril(np.ones((32, 32), bool))[None, None]
    jax.block_until_ready(jax.jit(lambda q, k, v: run(q, k, v, mask=lower))(q, k, v))
    assert sorted(calls) == below_diagonal

    calls.clear()
    segments = np.array([[0] * 16 + [1] * 16], np.int32)
    jax.block_until_ready(jax.jit(lambda q, k, v: run(q, k, v, segment_ids=segments))(q, k, v))
    # Two documents of two blocks each: the 8 pairs across documents are skipped.
    # (Positions restart per segment, so key block 2 starts at position 0 again.)
    assert len(calls) == 8


def _recording(calls: list, bias_fn=None):
    """A bias_fn that appends (first query position, first key position, query rows) of
    each block it is evaluated on to `calls`; its bias is `bias_fn`'s, or zeros."""

    def recording(q_pos, k_pos):
        jax.debug.callback(
            lambda q0, k0, rows=q_pos.shape[1]: calls.append((int(q0), int(k0), rows)),
            q_pos[0, 0],
            k_pos[0, 0],
        )
        if bias_fn is None:
            return jnp.zeros((1, 1, q_pos.shape[1], k_pos.shape[1]))
        return bias_fn(q_pos, k_pos)

    return recording


def test_causal_blockwise_visits_only_the_live_half_of_a_query_block():
    # Query blocks of 8 over key blocks of 4: in key block 2i + 1 (keys 8i + 4 ..) the
    # upper four queries of block i (8i .. 8i + 3) see nothing, so the pair is visited
    # with the lower four rows only: 8i + 4 .. 8i + 7.
    calls = []
    q, k, v = _qkv(1, 32, 32, 2, 2, 4)
    run = functools.partial(
        pe.dot_product_attention, bias_fn=_recording(calls), implementation="blockwise",
        block_size=(8, 4),
    )  # fmt: skip
    whole = [(8 * i, 4 * j, 8) for i in range(4) for j in range(2 * i + 1)]
    halves = [(8 * i + 4, 8 * i + 4, 4) for i in range(4)]
    jax.block_until_ready(jax.jit(lambda q, k, v: run(q, k, v, causal=True))(q, k, v))
    assert sorted(calls) == sorted(whole + halves)
    # 16 whole pairs of 8 x 4 logits and 4 halves of 4 x 4: 576 of the 1024 entries,
    # against 640 without half-row visits (528 on or below the diagonal).
    assert sum(rows * 4 for _, _, rows in calls) == 576

    calls.clear()
    grad = jax.jit(jax.grad(lambda q, k, v: run(q, k, v, causal=True).sum(), argnums=(0, 1, 2)))
    jax.block_until_ready(grad(q, k, v))
    assert sorted(calls) == sorted((whole + halves) * 2)

    calls.clear()
    lower = np.tril(np.ones((32, 32), bool))[None, None]
    jax.block_until_ready(jax.jit(lambda q, k, v: run(q, k, v, mask=lower))(q, k, v))
    assert sorted(calls) == sorted(whole + halves)


def test_blockwise_visits_the_upper_half_when_the_lower_one_sees_nothing():
    # Two documents, tokens 0..11 and 12..31, no causal mask, blocks (8, 4): query block
    # 1 holds rows of both, so each key block is visited with the four rows of its own
    # document only, the upper half (rows 8..11) for keys 0..11 and the lower half
    # (12..15) for keys 12..31. The result matches the xla path.
    calls = []

    def distance_bias(q_pos, k_pos):
        distance = (q_pos[:, None, :, None] - k_pos[:, None, None, :]).astype(jnp.float32)
        return -0.1 * jnp.abs(distance)

    counting_bias = _recording(calls, distance_bias)
    q, k, v = _qkv(1, 32, 32, 2, 2, 4)
    positions = np.arange(32, dtype=np.int32)
    segments = np.array([[0] * 12 + [1] * 20], np.int32)

    weights = np.cos(np.arange(q.size)).reshape(q.shape)

    def run(q, k, v, implementation):
        out = pe.dot_product_attention(
            q, k, v, bias_fn=counting_bias, segment_ids=segments, q_positions=positions,
            k_positions=positions, implementation=implementation, block_size=(8, 4),
        )  # fmt: skip
        return jnp.sum(out * weights), out

    def grads_and_out(implementation):
        grad = jax.grad(functools.partial(run, implementation=implementation), (0, 1, 2), True)
        grads, out = jax.block_until_ready(jax.jit(grad)(q, k, v))
        return out, grads

    xla = grads_and_out("xla")
    calls.clear()
    blockwise = jax.block_until_ready(jax.jit(lambda: run(q, k, v, "blockwise")[1])())
    first, second = range(3), range(3, 8)
    expected = (
        [(0, 4 * j, 8) for j in first]
        + [(8, 4 * j, 4) for j in first]
        + [(12, 4 * j, 4) for j in second]
        + [(start, 4 * j, 8) for start in (16, 24) for j in second]
    )
    assert sorted(calls) == sorted(expected)
    _assert_same(xla, grads_and_out("blockwise"))  # the backward pass visits them alike
    np.testing.assert_allclose(blockwise, xla[0], atol=2e-5)


def test_fully_masked_rows_give_zeros_and_finite_gradients_in_both_implementations():
    q, k, v = _qkv(1, 12, 12, 2, 2, 4)
    mask = np.ones((1, 1, 12, 12), bool)
    mask[..., [0, 5, 11], :] = False
    q_pos = np.arange(12, dtype=np.int32) - 3  # queries 0..2 precede every key
    for implementation in ("xla", "blockwise"):

        def loss(q, k, v, implementation=implementation):
            out = pe.dot_product_attention(
                q, k, v, bias_fn=alibi_like(2), mask=mask, causal=True, q_positions=q_pos,
                implementation=implementation, block_size=4,
            )  # fmt: skip
            return jnp.sum(out**2), out

        grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        dead = [0, 1, 2, 5, 11]
        np.testing.assert_array_equal(np.asarray(out)[:, dead], 0.0)
        assert np.all(np.isfinite(out))
        for grad in grads:
            assert np.all(np.isfinite(grad))
        np.testing.assert_array_equal(np.asarray(grads[0])[:, dead], 0.0)


_absolute_causal = functools.partial(
    pe.dot_product_attention, bias_fn=absolute_bias(jnp.array([0.7, -1.3])), causal=True
)
_alone = jax.jit(_absolute_causal)


@pytest.mark.parametrize("implementation", ["xla", "blockwise"])
def test_packed_documents_match_running_each_document_alone(implementation):
    # The bias depends on the absolute query position, so this also proves that
    # positions restart at each document.
    q, k, v = _qkv(2, 21, 21, 2, 2, 8, seed=21)
    segments = np.array([[1] * 6 + [2] * 9 + [3] * 6, [0] * 9 + [1] * 12], np.int32)
    packed = jax.jit(
        functools.partial(_absolute_causal, implementation=implementation, block_size=4)
    )(q, k, v, segment_ids=segments)
    for row, bounds in ((0, (0, 6, 15, 21)), (1, (0, 9, 21))):
        for start, stop in itertools.pairwise(bounds):
            piece = (slice(row, row + 1), slice(start, stop))
            alone = _alone(q[piece], k[piece], v[piece])
            np.testing.assert_allclose(packed[piece], alone, atol=2e-6)


_segment_positions = jax.jit(pe.segment_positions)


@given(st.lists(st.integers(0, 3), min_size=1, max_size=10))
def test_segment_positions_restart_at_each_change_of_id(ids):
    expected, count = [], 0
    for index, value in enumerate(ids):
        count = 0 if index == 0 or value != ids[index - 1] else count + 1
        expected.append(count)
    got = _segment_positions(jnp.array([ids, ids[::-1]], jnp.int32))
    np.testing.assert_array_equal(got[0], expected)
    assert got.dtype == jnp.int32


def test_bfloat16_inputs_keep_their_dtype_and_match_float32():
    q, k, v = _qkv(1, 40, 40, 4, 2, 16, seed=2)
    ref = attention_reference(q, k, v, bias=alibi_dense(4, np.arange(40), np.arange(40)))
    for implementation in ("xla", "blockwise"):
        got = jax.jit(
            functools.partial(
                pe.dot_product_attention, bias_fn=alibi_like(4),
                implementation=implementation, block_size=16,
            )
        )(*(x.astype(jnp.bfloat16) for x in (q, k, v)))  # fmt: skip
        chex.assert_type(got, jnp.bfloat16)
        np.testing.assert_allclose(np.asarray(got, np.float64), ref, atol=3e-2)


def test_positions_near_one_million_stay_finite_and_agree():
    q, k, v = _qkv(1, 24, 24, 2, 2, 8)
    positions = 10**6 + np.arange(24, dtype=np.int32)

    @functools.partial(jax.jit, static_argnames="implementation")
    def run(positions, implementation="xla"):
        return pe.dot_product_attention(
            q, k, v, bias_fn=alibi_like(2), causal=True, q_positions=positions,
            k_positions=positions, implementation=implementation, block_size=8,
        )  # fmt: skip

    xla = run(positions)
    assert np.all(np.isfinite(xla))
    np.testing.assert_allclose(run(positions, "blockwise"), xla, atol=2e-6)
    # Only the offsets matter: the same as positions starting at 0.
    np.testing.assert_allclose(xla, run(positions - 10**6), atol=2e-6)


def test_blockwise_memory_grows_linearly_with_length():
    def temp_bytes(implementation, length):
        shape = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)

        def loss(q, k, v):
            out = pe.dot_product_attention(
                q, k, v, bias_fn=alibi_like(2), causal=True,
                implementation=implementation, block_size=64,
            )  # fmt: skip
            return jnp.sum(out**2)

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.lower(shape, shape, shape).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes("blockwise", 512), temp_bytes("blockwise", 2048)
    assert large / small < 5.0  # 4x the length: linear growth (quadratic would be 16x)
    assert temp_bytes("xla", 2048) > 8 * large


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"q": np.zeros((2, 8, 4))}, ValueError, "q must have rank 4"),
        (
            {"k": np.zeros((2, 8, 3, 8), np.float32), "v": np.zeros((2, 8, 3, 8), np.float32)},
            ValueError,
            "multiple of the number of key",
        ),
        ({"k": np.zeros((2, 8, 4, 6), np.float32)}, ValueError, "same head_dim"),
        ({"v": np.zeros((2, 7, 4, 8), np.float32)}, ValueError, "same \\[B, Lk, Hkv\\]"),
        ({"q": np.zeros((2, 8, 4, 8), np.int32)}, TypeError, "q must have a floating dtype"),
        ({"implementation": "flash"}, ValueError, "implementation must be one of"),
        ({"block_size": 0}, ValueError, "block_size must be a positive integer"),
        ({"block_size": (8, 8, 8)}, ValueError, "block_size must be an int or a pair"),
        ({"mask": np.ones((2, 1, 8, 8), np.float32)}, TypeError, "mask must be a boolean"),
        ({"mask": np.ones((3, 1, 8, 8), bool)}, ValueError, "mask must be broadcastable"),
        ({"q_positions": np.arange(9)}, ValueError, "q_positions must have shape \\[8\\]"),
        ({"k_positions": np.arange(8.0)}, TypeError, "k_positions must have an integer"),
        ({"segment_ids": np.zeros((3, 8), np.int32)}, ValueError, "segment_ids must have shape"),
        ({"causal": 1}, TypeError, "causal must be a bool"),
        ({"bias_fn": "alibi"}, TypeError, "bias_fn must be callable"),
        ({"bias_fn": lambda qp, kp: jnp.zeros((4, 8, 8))}, ValueError, "bias_fn must return"),
        ({"relative_terms": (None, None)}, TypeError, "relative_terms must be a RelativeTerms"),
        (
            {"relative_terms": pe.RelativeTerms(content_bias=jnp.zeros((4, 7)))},
            ValueError,
            "content_bias must have shape",
        ),
        ({"scale": -1.0}, ValueError, "scale must be a finite number > 0"),
    ],
)
def test_rejects_bad_arguments(change, error, match):
    q, k, v = _qkv(2, 8, 8, 4, 4, 8)
    kwargs = {"q": q, "k": k, "v": v, **change}
    with pytest.raises(error, match=match):
        pe.dot_product_attention(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), **kwargs)


def test_different_lengths_need_query_positions_when_positions_matter():
    q, k, v = _qkv(1, 3, 10, 2, 2, 4)
    with pytest.raises(ValueError, match="q_positions must be given when Lq"):
        pe.dot_product_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="segment_ids as one array needs Lq == Lk"):
        pe.dot_product_attention(q, k, v, segment_ids=np.zeros((1, 3), np.int32))
    # Plain cross-attention does not read positions and needs none.
    want = attention_reference(q, k, v)
    np.testing.assert_allclose(pe.dot_product_attention(q, k, v), want, atol=2e-6)


# ---------------------------------------------------------------- every registered encoding


def _attention_parts(name):
    return set(pe.get_encoding(name).contributes) - {"input_embedding"}


# Every encoding with an attention part, for the blockwise = xla comparisons. CoPE is
# left out: attention runs it on the xla path only and refuses blockwise (its positions
# sum gates over whole rows; test_content.py checks it against its float64 reference).
ATTENTION_ENCODINGS = tuple(
    name
    for name in pe.available_encodings()
    if _attention_parts(name)
    and not pe.get_encoding(name).input_embedding
    and pe.get_encoding(name).contextual_bias is None
)


class _Encoded(nn.Module):
    """`make_attention_fn` inside a module, so learned encodings get parameters."""

    encoding: str
    spec: pe.EncodingSpec
    implementation: str = "xla"
    block_size: int | tuple[int, int] | None = None

    @nn.compact
    def __call__(self, q, k, v, mask=None, q_positions=None, segment_ids=None):
        attention_fn = pe.make_attention_fn(
            self.encoding, spec=self.spec, q_positions=q_positions, segment_ids=segment_ids,
            implementation=self.implementation, block_size=self.block_size,
        )  # fmt: skip
        return attention_fn(q, k, v, mask=mask, is_causal=self.spec.causal)


def _perturbed(params, seed=0):
    """Moves every parameter off its (often zero or symmetric) initial value."""
    leaves, tree = jax.tree.flatten(params)
    noisy = [x + 0.1 * _normal(seed + i, x.shape) for i, x in enumerate(leaves)]
    return jax.tree.unflatten(tree, noisy)


def _encoding_case(name, causal):
    """Arrays and settings of one blockwise-vs-xla comparison for a registered encoding."""
    if causal:  # packed documents, GQA, odd length, square blocks
        q, k, v = _qkv(2, 23, 23, 4, 2, 8, seed=7)
        kwargs = {"segment_ids": np.array([[0] * 10 + [1] * 13, [5] * 23], np.int32)}
        return q, k, v, kwargs, 8
    # Queries offset after the keys' start (a cache), Lq != Lk, a mask with an empty row.
    q, k, v = _qkv(2, 11, 19, 4, 4, 8, seed=8)
    mask = np.random.default_rng(3).random((2, 1, 11, 19)) > 0.3
    mask[:, :, 3] = False
    q_positions = np.stack([5 + np.arange(11), 8 + np.arange(11)]).astype(np.int32)
    return q, k, v, {"mask": mask, "q_positions": q_positions}, (4, 8)


def _encoding_spec(causal):
    return pe.EncodingSpec(d_model=32, num_heads=4, head_dim=8, max_positions=64, causal=causal)


@functools.cache
def _encoding_params(name):
    """Perturbed parameters of an encoding; their shapes do not depend on the case."""
    q, k, v, kwargs, _ = _encoding_case(name, causal=True)
    module = _Encoded(name, _encoding_spec(causal=True))
    init = jax.jit(lambda q, k, v: module.init(jax.random.key(0), q, k, v, **kwargs))
    return _perturbed(init(q, k, v))


def _encoding_outputs_and_gradients(name, causal):
    causal = causal or pe.get_encoding(name).causal_only
    spec = _encoding_spec(causal)
    q, k, v, kwargs, block_size = _encoding_case(name, causal)
    params = _encoding_params(name)

    def run(implementation):
        module = _Encoded(name, spec, implementation, block_size)

        def loss(q, k, v, params):
            out = module.apply(params, q, k, v, **kwargs)
            cotangent = jnp.sin(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
            return (out * cotangent).sum(), out

        grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, params)
        return out, grads

    return run("xla"), run("blockwise")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", ATTENTION_ENCODINGS)
def test_every_encoding_blockwise_matches_xla_with_parameter_gradients(name, causal):
    xla, blockwise = _encoding_outputs_and_gradients(name, causal)
    _assert_same(xla, blockwise, atol=5e-5)
    param_grads = jax.tree.leaves(xla[1][3])
    if param_grads:  # learned parameters really receive gradients
        assert max(np.abs(grad).max() for grad in param_grads) > 1e-3


def test_registry_lists_the_encodings_this_file_covers():
    assert {"alibi", "t5", "kerple", "fire", "dpb", "shaw", "transformer_xl"} <= set(
        ATTENTION_ENCODINGS
    )


# ---------------------------------------------------------------- KV-cache decoding


def _decoding_parts(name, spec, q, k, positions):
    """(qk transform, bias_fn) of a registered encoding, parameters initialised and perturbed."""
    encoding = pe.get_encoding(name)
    transform, bias_fn = (lambda q, k, pos: (q, k)), None
    if encoding.qk_transform is not None:
        module = encoding.qk_transform(spec)
        variables = jax.jit(module.init)(jax.random.key(0), q, k, positions, positions)

        def transform(q, k, pos):
            return module.apply(variables, q, k, pos, pos)

    if encoding.logit_bias is not None:
        module = encoding.logit_bias(spec)
        variables = jax.jit(module.init)(jax.random.key(0), positions[None], positions[None])
        bias_fn = module.apply(_perturbed(variables), method=lambda m: m.bias_fn())
    return transform, bias_fn


@pytest.mark.parametrize(
    ("name", "implementation"),
    [("rope", "xla"), ("alibi", "blockwise"), ("t5", "xla"), ("xpos", "xla")],
)
def test_decoding_token_by_token_through_the_cache_equals_the_full_forward_pass(
    name, implementation
):
    # xPos keys keep their scale in the cache only with a fixed reference position.
    options = {"xpos": {"reference_position": 32}} if name == "xpos" else {}
    spec = pe.EncodingSpec(16, 4, 8, max_positions=64, causal=True, options=options)
    q, k, v = _qkv(2, 64, 64, 4, 2, 8, seed=64)
    positions = jnp.arange(64, dtype=jnp.int32)
    transform, bias_fn = _decoding_parts(name, spec, q, k, positions)

    full = jax.jit(
        lambda q, k, v: pe.dot_product_attention(
            *transform(q, k, positions), v, bias_fn=bias_fn, causal=True
        )
    )(q, k, v)

    @jax.jit
    def step(cache, t):
        q_t, k_t, v_t = (lax.dynamic_slice_in_dim(x, t, 1, axis=1) for x in (q, k, v))
        position = t[None]
        q_t, k_t = transform(q_t, k_t, position)
        cache = pe.update_cache(cache, k_t, v_t, position)
        out = pe.cached_attention(
            q_t, cache, q_positions=position, bias_fn=bias_fn,
            implementation=implementation, block_size=16,
        )  # fmt: skip
        return out, cache

    cache = pe.init_cache(2, 64, 2, 8)
    outputs = []
    for t in range(64):
        out, cache = step(cache, jnp.int32(t))
        outputs.append(out)
    assert int(cache.length) == 64
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, atol=3e-6)


def test_cache_prefill_then_decode_and_overflow():
    q, k, v = _qkv(1, 12, 12, 2, 1, 4)
    bias_fn = alibi_like(2)
    full = jax.jit(functools.partial(pe.dot_product_attention, bias_fn=bias_fn, causal=True))
    attend = jax.jit(functools.partial(pe.cached_attention, bias_fn=bias_fn))
    cache = pe.update_cache(pe.init_cache(1, 12, 1, 4), k[:, :9], v[:, :9], jnp.arange(9))
    prefill = attend(q[:, :9], cache, q_positions=jnp.arange(9))
    cache = pe.update_cache(cache, k[:, 9:], v[:, 9:], jnp.arange(9, 12))
    rest = attend(q[:, 9:], cache, q_positions=jnp.arange(9, 12))
    np.testing.assert_allclose(jnp.concatenate([prefill, rest], axis=1), full(q, k, v), atol=2e-6)
    chex.assert_shape(cache.keys, (1, 12, 1, 4))
    with pytest.raises(ValueError, match="cannot take 1 more"):
        pe.update_cache(cache, k[:, :1], v[:, :1], jnp.arange(1))
    with pytest.raises(ValueError, match="keys must have shape"):
        pe.update_cache(pe.init_cache(1, 12, 1, 4), k[:, :2, :, :3], v[:, :2], jnp.arange(2))


# ---------------------------------------------------------------- Flax adapter


def _rotate_half_reference(x, positions, base=10000.0):
    """RoPE (Su et al. 2021) in float64, pairing feature i with i + D/2 (GPT-NeoX layout)."""
    half = x.shape[-1] // 2
    theta = base ** (-np.arange(half, dtype=np.float64) * 2 / x.shape[-1])
    angle = np.asarray(positions, np.float64)[:, None] * theta  # [L, D/2]
    cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
    first, second = x[..., :half], x[..., half:]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def _hand_written_attention(name, params, x, positions):
    """Projections, encoding and causal attention in float64, from the papers' formulas."""
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    q, k, v = (
        np.einsum("bld,dhk->blhk", np.asarray(x, np.float64), params[part]["kernel"])
        + params[part]["bias"]
        for part in ("query", "key", "value")
    )
    offsets = positions[:, None] - positions[None, :]  # i - j
    bias = np.zeros((1, 2, len(positions), len(positions)))
    if name == "rope":
        q, k = _rotate_half_reference(q, positions), _rotate_half_reference(k, positions)
    if name == "alibi":  # slopes 2^(-8h/H), Press et al. 2022
        bias = -np.array([2.0**-4, 2.0**-8])[None, :, None, None] * offsets
    if name == "t5":
        (table,) = [
            p["relative_attention_bias"] for p in params.values() if "relative_attention_bias" in p
        ]
        buckets = t5_bucket_reference(
            -offsets, bidirectional=False, num_buckets=32, max_distance=128
        )
        bias = np.moveaxis(table[buckets], -1, 0)[None]
    out = attention_reference(q, k, v, bias=bias, allowed=offsets >= 0)
    return np.einsum("blhk,hkd->bld", out, params["out"]["kernel"]) + params["out"]["bias"]


_ADAPTER_SPEC = pe.EncodingSpec(d_model=16, num_heads=2, head_dim=8, max_positions=64)
_ADAPTER_POSITIONS = 3 + np.arange(10, dtype=np.int32)


def _adapter(name):
    return pe.make_attention_fn(
        name, spec=_ADAPTER_SPEC, q_positions=_ADAPTER_POSITIONS, k_positions=_ADAPTER_POSITIONS
    )


_CAUSAL_MASK = nn.make_causal_mask(np.zeros((2, 10)))  # float32, as Flax makes it


@pytest.mark.parametrize("name", ["rope", "alibi", "t5"])
def test_flax_attention_layer_with_encoding_matches_hand_written_attention(name):
    layer = nn.MultiHeadDotProductAttention(
        num_heads=2, qkv_features=16, attention_fn=_adapter(name)
    )
    x = _normal(5, (2, 10, 16))
    variables = _perturbed(jax.jit(layer.init)(jax.random.key(0), x, mask=_CAUSAL_MASK))
    got = jax.jit(layer.apply)(variables, x, mask=_CAUSAL_MASK)
    want = _hand_written_attention(name, variables["params"], x, _ADAPTER_POSITIONS)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_nnx_attention_layer_with_a_parameter_free_encoding_matches_hand_written_attention():
    layer = nnx.MultiHeadAttention(
        num_heads=2, in_features=16, qkv_features=16, decode=False,
        attention_fn=_adapter("rope"), rngs=nnx.Rngs(0),
    )  # fmt: skip
    x = _normal(6, (2, 10, 16))
    params = {
        part: {"kernel": getattr(layer, part).kernel[...], "bias": getattr(layer, part).bias[...]}
        for part in ("query", "key", "value", "out")
    }
    want = _hand_written_attention("rope", params, x, _ADAPTER_POSITIONS)
    got = nnx.jit(lambda layer, x: layer(x, mask=_CAUSAL_MASK))(layer, x)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_attention_fn_outside_a_module_works_for_parameter_free_encodings_only():
    q, k, v = _qkv(1, 6, 6, 2, 2, 8)
    # No spec and no mask: heads come from q, and nothing is causal by default.
    got = jax.jit(pe.make_attention_fn("alibi"))(q, k, v)
    distance = np.abs(np.arange(6)[:, None] - np.arange(6)[None, :])
    bias = -np.array([2.0**-4, 2.0**-8])[None, :, None, None] * distance
    np.testing.assert_allclose(got, attention_reference(q, k, v, bias=bias), atol=2e-6)
    with pytest.raises(ValueError, match="must run inside a linen module"):
        pe.make_attention_fn("t5")(q, k, v)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda spec: pe.make_attention_fn("sinusoidal"), "contributes an input embedding"),
        (lambda spec: pe.make_attention_fn("alibi", spec={"num_heads": 2}), "spec must be an"),
        (lambda spec: pe.make_attention_fn("alibi", implementation="x"), "implementation"),
        (lambda spec: pe.make_attention_fn("nope"), "unknown encoding"),
        (lambda spec: pe.make_attention_fn("rope", rpoe={"base": 5e5}), "do not belong"),
        (
            lambda spec: pe.make_attention_fn("rope", rope={"bsae": 5e5})(*_qkv(1, 4, 4, 2, 2, 8)),
            "not understood",
        ),
        (lambda spec: pe.make_attention_fn("rope", spec=spec, rope={}), "not both"),
    ],
)
def test_make_attention_fn_rejects_bad_configuration(call, match):
    spec = pe.EncodingSpec(d_model=16, num_heads=2, head_dim=8, max_positions=64)
    with pytest.raises((ValueError, TypeError), match=match):
        call(spec)


def test_attention_fn_checks_heads_and_refuses_what_it_cannot_do():
    spec = pe.EncodingSpec(d_model=16, num_heads=2, head_dim=8, max_positions=64)
    attention_fn = pe.make_attention_fn("alibi", spec=spec)
    q, k, v = _qkv(1, 4, 4, 4, 4, 8)
    with pytest.raises(ValueError, match="do not match the spec"):
        attention_fn(q, k, v)
    q, k, v = q[:, :, :2], k[:, :, :2], v[:, :, :2]
    with pytest.raises(ValueError, match="dropout is not implemented"):
        attention_fn(q, k, v, dropout_rate=0.1, deterministic=False)
    with pytest.raises(ValueError, match="precision is not supported"):
        attention_fn(q, k, v, precision="highest")
    with pytest.raises(ValueError, match="cannot sow attention weights"):
        attention_fn(q, k, v, module=object())


def test_attention_fn_is_causal_keyword_adds_causality():
    q, k, v = _qkv(1, 5, 5, 2, 2, 8)
    got = jax.jit(functools.partial(pe.make_attention_fn("none"), is_causal=True))(q, k, v)
    positions = np.arange(5)
    want = attention_reference(q, k, v, allowed=positions[:, None] >= positions[None, :])
    np.testing.assert_allclose(got, want, atol=2e-6)


# ---------------------------------------------------------------- empty inputs


@pytest.mark.parametrize("implementation", ["xla", "blockwise"])
@pytest.mark.parametrize(("batch", "q_len", "k_len"), [(2, 0, 5), (2, 5, 0), (0, 5, 5), (2, 0, 0)])
def test_empty_inputs_give_empty_or_zero_outputs_and_gradients(implementation, batch, q_len, k_len):
    q, k, v = _qkv(batch, q_len, k_len, 2, 2, 4)
    kwargs = {"bias_fn": alibi_like(2), "causal": True, "implementation": implementation}
    kwargs["q_positions"] = jnp.arange(q_len) + k_len

    def loss(q, k, v):
        return pe.dot_product_attention(q, k, v, **kwargs).sum()

    out = pe.dot_product_attention(q, k, v, **kwargs)
    chex.assert_shape(out, (batch, q_len, 2, 4))
    assert not np.any(out)  # no key: a zero output, as for any fully masked row
    grads = jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)
    assert all(not np.any(g) for g in grads)


def test_numeric_masks_are_refused_naming_the_argument():
    q, k, v = _qkv(1, 3, 3, 1, 1, 4)
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        pe.dot_product_attention(q, k, v, mask=jnp.ones((3, 3)))


def test_the_attention_package_imports_no_registry_family_model_or_training_module():
    # The kernel sits below the encodings: read every import of its modules.
    package = pathlib.Path(pe.__file__).parent / "attention"
    forbidden = {"registry", "absolute", "rope", "rope_scaling", "bias", "relative", "nnx",
                 "layers", "model", "train", "study", "data", "plots", "cli"}  # fmt: skip
    modules = sorted(package.glob("*.py"))
    assert {path.name for path in modules} >= {"core.py", "_block.py", "_blockwise.py", "cache.py"}
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "jax_posenc" and len(parts) > 1:
                    assert parts[1] not in forbidden, f"{path.name} imports {name}"


# ---------------------------------------------------------------- defaults: auto, block table


def test_auto_runs_xla_for_short_sequences_and_blockwise_beyond():
    assert pe.attention.resolve_implementation("auto", 384, 384) == "xla"
    assert pe.attention.resolve_implementation("auto", 385, 384) == "blockwise"
    assert pe.attention.resolve_implementation("xla", 4096, 4096) == "xla"
    with pytest.raises(ValueError, match="implementation must be one of"):
        pe.attention.resolve_implementation("fast", 8, 8)

    def uses_the_blockwise_vjp(length):
        q = jnp.zeros((1, length, 1, 4))
        jaxpr = jax.make_jaxpr(lambda q: pe.dot_product_attention(q, q, q, causal=True))(q)
        return "custom_vjp_call" in str(jaxpr)

    assert not uses_the_blockwise_vjp(384)
    assert uses_the_blockwise_vjp(400)


def test_default_block_sizes_follow_the_table_and_the_accelerator_rule():
    table = dict(pe.attention.CPU_BLOCK_TABLE)
    assert pe.attention.default_block_size(8, 4096, 64, platform="cpu") == table[4096]
    assert pe.attention.default_block_size(8, 4097, 128, platform="cpu") == table[None]
    assert pe.attention.default_block_size(8, 9000, 64, platform="gpu") == (512, 512)
    assert pe.attention.default_block_size(8, 9000, 256, platform="gpu") == (512, 256)


TABLE_BLOCK_SIZES = sorted({size for _, size in pe.attention.CPU_BLOCK_TABLE})


@pytest.mark.parametrize("block_size", TABLE_BLOCK_SIZES, ids=str)
@pytest.mark.parametrize("name", ATTENTION_ENCODINGS)
def test_every_encoding_agrees_with_xla_at_every_block_size_the_table_chooses(name, block_size):
    # Long enough for several blocks of every size in the table (odd, so padded), causal.
    spec = pe.EncodingSpec(d_model=16, num_heads=2, head_dim=8, max_positions=600, causal=True)
    q, k, v = _qkv(1, 599, 599, 2, 2, 8, seed=11)
    module = _Encoded(name, spec)
    params = _perturbed(jax.jit(module.init)(jax.random.key(0), q[:, :8], k[:, :8], v[:, :8]))

    def run(implementation, block):
        encoded = _Encoded(name, spec, implementation, block)

        def loss(q, k, v, params):
            out = encoded.apply(params, q, k, v)
            return (out * jnp.cos(jnp.arange(out.size) * 0.1).reshape(out.shape)).sum(), out

        grads, out = jax.jit(jax.grad(loss, (0, 1, 2, 3), has_aux=True))(q, k, v, params)
        return out, grads

    # Parameter gradients sum ~10^6 terms here: float32 rounding is relative. FoX's gate
    # bias gradient weights every logit gradient by its distance (up to 600 here), which
    # scales its rounding: xla and blockwise are each ~5e-5 from float64 there.
    rtol = 1e-4 if name == "fox" else 2e-5
    _assert_same(run("xla", None), run("blockwise", block_size), atol=5e-5, rtol=rtol)
