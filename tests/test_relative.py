"""Tests for content-dependent relative terms: Shaw et al. (2018) and Transformer-XL."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given
from hypothesis import strategies as st
from reference_bias import shaw_reference, transformer_xl_reference

import jax_posenc as pe
from jax_posenc import relative

B, H, D = 2, 3, 8


def _normal(seed, shape, scale=1.0):
    """Test data from NumPy's generator (no per-shape compilation)."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _shaw_params(radius=3, seed=0):
    rows = 2 * radius + 1
    return {
        "key_embedding": _normal(seed, (rows, D)),
        "value_embedding": _normal(seed + 1, (rows, D)),
    }


def _xl_params(features=16, seed=0):
    return {
        "position_kernel": _normal(seed, (features, H, D), features**-0.5),
        "content_bias": _normal(seed + 1, (H, D)),
        "position_bias": _normal(seed + 2, (H, D)),
    }


# Packed / offset positions, distances beyond the clipping radius, both directions.
Q_POSITIONS = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 0, 1, 2, 3, 40, 41]], np.int32)
K_POSITIONS = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [5, 0, 1, 2, 3, 4, 5, 6, 39, 40, 41]])


class ShawVariantsTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_logits_and_value_term_match_the_naive_reference(self):
        q, k = _normal(1, (B, 9, H, D)), _normal(2, (B, 11, H, D))
        weights = jax.nn.softmax(_normal(3, (B, H, 9, 11)), axis=-1)
        params = _shaw_params()
        terms = relative.shaw_terms(params["key_embedding"], params["value_embedding"])

        def run(q, k, weights, q_positions, k_positions):
            logits = pe.relative_logits(q, k, terms, q_positions, k_positions)
            return logits, terms.value_fn(weights, q_positions, k_positions)

        logits, value_term = self.variant(run)(q, k, weights, Q_POSITIONS, K_POSITIONS)
        chex.assert_shape(logits, (B, H, 9, 11))
        chex.assert_shape(value_term, (B, 9, H, D))
        ref_logits, ref_value = shaw_reference(
            q, k, weights, Q_POSITIONS, K_POSITIONS, *params.values()
        )
        np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(np.asarray(value_term), ref_value, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["shaw", "transformer_xl"])
def test_compiled_memory_does_not_grow_like_length_squared_times_head_dim(name):
    length = 512

    def temp_bytes(head_dim):
        q = jax.ShapeDtypeStruct((1, length, 1, head_dim), jnp.float32)
        weights = jax.ShapeDtypeStruct((1, 1, length, length), jnp.float32)
        positions = jax.ShapeDtypeStruct((1, length), jnp.int32)
        if name == "shaw":
            table = jax.ShapeDtypeStruct((33, head_dim), jnp.float32)

            def terms_of(table):
                return relative.shaw_terms(table, table)
        else:
            table = jax.ShapeDtypeStruct((head_dim, 1, head_dim), jnp.float32)

            def terms_of(table):
                zeros = jnp.zeros(table.shape[1:])
                return relative.transformer_xl_terms(table, zeros, zeros)

        def terms_output(q, weights, positions, table):
            terms = terms_of(table)
            out = terms.query_bias_fn(q, positions, positions)
            if terms.value_fn is not None:
                out = out.sum() + terms.value_fn(weights, positions, positions).sum()
            return out

        compiled = jax.jit(terms_output).lower(q, weights, positions, table).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(16), temp_bytes(256)
    naive_growth = length**2 * (256 - 16) * 4  # one [L, L, D] float32 tensor more
    assert large - small < 0.02 * naive_growth, (small, large)
    assert large < 0.1 * length**2 * 256 * 4, large


def test_shaw_decoding_rows_match_the_full_terms():
    length, cache = 24, 20
    positions = jnp.arange(length)[None]
    params = _shaw_params(radius=4)
    terms = relative.shaw_terms(params["key_embedding"], params["value_embedding"])
    q = _normal(1, (1, length, H, D))
    weights = _normal(2, (1, H, length, length))
    full_bias = terms.query_bias_fn(q, positions, positions)
    full_value = terms.value_fn(weights, positions, positions)
    rows = positions[:, cache:]
    step_bias = jax.jit(terms.query_bias_fn)(q[:, cache:], rows, positions)
    step_value = jax.jit(terms.value_fn)(weights[:, :, cache:], rows, positions)
    np.testing.assert_allclose(step_bias, full_bias[:, :, cache:], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(step_value, full_value[:, cache:], rtol=1e-6, atol=1e-6)


_SHAW_TERMS = relative.shaw_terms(*_shaw_params().values())
_SHAW_QUERY = jax.jit(_SHAW_TERMS.query_bias_fn)
_SHAW_VALUE = jax.jit(_SHAW_TERMS.value_fn)
_XL_QUERY = jax.jit(relative.transformer_xl_terms(*_xl_params().values()).query_bias_fn)


@given(shift=st.integers(-(10**6), 10**6), start=st.integers(0, 10**6))
def test_shaw_and_transformer_xl_terms_are_translation_invariant(shift, start):
    q_positions = start + np.array([[0, 3, 9]], np.int32)
    k_positions = start + np.array([[0, 1, 2, 9, 30]], np.int32)
    q = _normal(0, (1, 3, H, D))
    weights = _normal(1, (1, H, 3, 5))
    for fn, arg in ((_SHAW_QUERY, q), (_SHAW_VALUE, weights), (_XL_QUERY, q)):
        np.testing.assert_allclose(
            fn(arg, q_positions + shift, k_positions + shift),
            fn(arg, q_positions, k_positions),
            rtol=1e-4,
            atol=1e-4,
        )


@given(a=st.floats(-3.0, 3.0), b=st.floats(-3.0, 3.0))
def test_shaw_value_term_is_linear_in_the_weights(a, b):
    value_fn = _SHAW_VALUE
    w1, w2 = _normal(1, (B, H, 9, 11)), _normal(2, (B, H, 9, 11))
    combined = value_fn(a * w1 + b * w2, Q_POSITIONS, K_POSITIONS)
    separate = a * value_fn(w1, Q_POSITIONS, K_POSITIONS) + b * value_fn(
        w2, Q_POSITIONS, K_POSITIONS
    )
    np.testing.assert_allclose(combined, separate, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ Transformer-XL


class TransformerXLVariantsTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(0, 10**6)
    def test_logits_match_the_naive_reference(self, offset):
        q, k = _normal(1, (B, 9, H, D)), _normal(2, (B, 11, H, D))
        params = _xl_params()
        terms = relative.transformer_xl_terms(
            params["position_kernel"], params["content_bias"], params["position_bias"]
        )
        q_positions, k_positions = Q_POSITIONS + offset, K_POSITIONS + offset
        got = self.variant(lambda *args: pe.relative_logits(*args[:2], terms, *args[2:]))(
            q, k, q_positions, k_positions
        )
        chex.assert_shape(got, (B, H, 9, 11))
        chex.assert_type(got, jnp.float32)
        expected = transformer_xl_reference(
            q,
            k,
            q_positions,
            k_positions,
            params["position_kernel"],
            params["content_bias"],
            params["position_bias"],
        )
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


def test_transformer_xl_decoding_rows_match_the_full_logits():
    length, cache = 24, 21
    positions = jnp.arange(length)[None]
    query_bias_fn = relative.transformer_xl_terms(*_xl_params().values()).query_bias_fn
    q = _normal(1, (1, length, H, D))
    full = query_bias_fn(q, positions, positions)
    step = jax.jit(query_bias_fn)(q[:, cache:], positions[:, cache:], positions)
    np.testing.assert_allclose(step, full[:, :, cache:], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ modules


LINEN = {
    "shaw": lambda: pe.RelativePositionEmbedding(D, max_relative_position=3),
    "transformer_xl": lambda: pe.TransformerXLRelativePosition(H, D, features=16),
}
PARAMS = {"shaw": _shaw_params, "transformer_xl": _xl_params}


class GradientVariantsTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("shaw", "transformer_xl")
    def test_gradients_reach_every_parameter(self, name):
        module = LINEN[name]()
        params = {"params": PARAMS[name]()}
        q, k = _normal(1, (B, 9, H, D)), _normal(2, (B, 11, H, D))
        target = _normal(3, (B, 9, H, D))

        def loss(params):
            terms = module.apply(params, method="terms")
            logits = pe.relative_logits(q, k, terms, Q_POSITIONS, K_POSITIONS)
            weights = jax.nn.softmax(logits, axis=-1)
            out = jnp.einsum("bhqk,bkhd->bqhd", weights, k)
            if terms.value_fn is not None:
                out = out + terms.value_fn(weights, Q_POSITIONS, K_POSITIONS)
            return jnp.sum((out - target) ** 2)

        grads = self.variant(jax.grad(loss))(params)
        assert set(grads["params"]) == set(params["params"])
        for path, grad in jax.tree_util.tree_leaves_with_path(grads):
            assert np.all(np.isfinite(grad)) and np.any(np.asarray(grad) != 0), path


def test_shaw_without_value_term_has_only_the_key_table():
    module = pe.RelativePositionEmbedding(D, max_relative_position=2, use_value_term=False)
    params = module.init(jax.random.key(0), method="terms")["params"]
    assert set(params) == {"key_embedding"} and params["key_embedding"].shape == (5, D)
    assert module.apply({"params": params}, method="terms").value_fn is None


def test_half_precision_queries_stay_finite_and_close():
    terms = relative.transformer_xl_terms(*_xl_params().values())
    q, k = _normal(1, (B, 9, H, D)), _normal(2, (B, 11, H, D))
    full = pe.relative_logits(q, k, terms, Q_POSITIONS + 10**6, K_POSITIONS + 10**6)
    half = pe.relative_logits(
        q.astype(jnp.bfloat16),
        k.astype(jnp.bfloat16),
        terms,
        Q_POSITIONS + 10**6,
        K_POSITIONS + 10**6,
    )
    chex.assert_type(half, jnp.float32)
    assert np.all(np.isfinite(np.asarray(half)))
    np.testing.assert_allclose(half, full, atol=0.1)


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: pe.shaw_query_bias(
                _normal(0, (1, 4, H, D)), jnp.arange(4), jnp.arange(4), jnp.ones((4, D))
            ),
            ValueError,
            "key_table must have 2K\\+1 rows",
        ),
        (
            lambda: pe.shaw_query_bias(
                _normal(0, (1, 4, H, D)), jnp.arange(4), jnp.arange(4), jnp.ones((5, D + 1))
            ),
            ValueError,
            "key_table must have shape \\[2K\\+1, 8\\]",
        ),
        (
            lambda: pe.shaw_query_bias(
                _normal(0, (2, 4, H, D)), jnp.zeros((3, 4), int), jnp.arange(4), jnp.ones((5, D))
            ),
            ValueError,
            r"q_positions must have shape \[S\] or \[2 or 1, S\]",
        ),
        (
            lambda: pe.shaw_query_bias(
                _normal(0, (4, H, D)), jnp.arange(4), jnp.arange(4), jnp.ones((5, D))
            ),
            ValueError,
            "q must have rank 4",
        ),
        (
            lambda: pe.shaw_value_term(
                jnp.ones((1, H, 4, 5)), jnp.arange(4), jnp.arange(4), jnp.ones((5, D))
            ),
            ValueError,
            "weights must have shape \\[B, H, 4, 4\\]",
        ),
        (
            lambda: pe.shaw_query_bias(
                _normal(0, (1, 4, H, D)), jnp.arange(4.0), jnp.arange(4), jnp.ones((5, D))
            ),
            TypeError,
            "q_positions must have an integer dtype",
        ),
        (
            lambda: pe.clipped_relative_index(jnp.arange(3), jnp.arange(3), 0),
            ValueError,
            "max_relative_position must be a positive integer",
        ),
        (
            lambda: pe.transformer_xl_position_logits(
                _normal(0, (1, 4, H, D)),
                jnp.arange(4),
                jnp.arange(4),
                jnp.ones((15, H, D)),
                jnp.ones((H, D)),
            ),
            ValueError,
            "position_kernel must have shape \\[F, 3, 8\\] with F even",
        ),
        (
            lambda: pe.RelativePositionEmbedding(D, max_relative_position=0).init(
                jax.random.key(0), method="terms"
            ),
            ValueError,
            "max_relative_position must be a positive integer",
        ),
        (
            lambda: pe.TransformerXLRelativePosition(H, D, features=7).init(
                jax.random.key(0), method="terms"
            ),
            ValueError,
            "features must be even",
        ),
    ],
)
def test_relative_terms_reject_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------- registry


@pytest.mark.parametrize(
    ("name", "options", "shapes"),
    [
        (
            "shaw",
            {"max_relative_position": 4},
            {"key_embedding": (9, D), "value_embedding": (9, D)},
        ),
        (
            "transformer_xl",
            {},
            {"position_kernel": (H * D, H, D), "content_bias": (H, D), "position_bias": (H, D)},
        ),
    ],
)
def test_relative_encodings_build_modules_with_terms(name, options, shapes):
    encoding = pe.get_encoding(name)
    assert encoding.contributes == ("relative_terms",)
    spec = pe.EncodingSpec(
        d_model=H * D, num_heads=H, head_dim=D, max_positions=64, options={name: options}
    )
    module = encoding.relative_terms(spec)
    params = module.init(jax.random.key(0), method="terms")
    assert jax.tree.map(jnp.shape, params["params"]) == shapes
    terms = module.apply(params, method="terms")
    assert isinstance(terms, pe.RelativeTerms) and terms.query_bias_fn is not None
    q = _normal(0, (1, 5, H, D))
    chex.assert_shape(terms.query_bias_fn(q, jnp.arange(5), jnp.arange(7)), (1, H, 5, 7))
