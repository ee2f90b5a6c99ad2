"""Tests for rotary position embeddings, multi-axis RoPE and xPos."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given
from hypothesis import strategies as st
from reference_rope import (
    dynamic_ntk_inv_freq,
    longrope_attention_factor,
    longrope_inv_freq,
    plain_inv_freq,
    rope_reference,
    xpos_reference,
    yarn_attention_factor,
    yarn_inv_freq,
)

import jax_posenc as pe

LAYOUTS = ("half", "interleaved")
STATIC = ("base", "rotary_dim", "layout", "scaling", "seq_len", "angle_precision")
# Jitted once per static configuration: property tests call these many times.
rope = jax.jit(pe.apply_rope, static_argnames=STATIC)
rope_qk = jax.jit(pe.apply_rope_qk, static_argnames=STATIC)
xpos = jax.jit(
    pe.apply_xpos, static_argnames=("scale_base", "layout", "reference_position", "rotary_dim")
)


def _jit_at(fn, *positions):
    """jit of fn(*arrays) with the given positions baked in as concrete constants.

    Concrete positions keep default-length rules (max position + 1) on the host, as
    in eager use, while the computation compiles once instead of op by op. XLA folds
    the constant tables at compile time, so compare only with other `_jit_at` results
    when asking for bit equality.
    """
    return jax.jit(lambda *arrays: fn(*arrays, *positions))


def _plain(x, positions, **kwargs):
    return pe.apply_rope(x, positions, **kwargs)


def _normal(shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _relative_error(got, ref, x):
    """max |got - ref| divided by the norm of the head vector it belongs to."""
    norms = np.linalg.norm(np.asarray(x, np.float64), axis=-1, keepdims=True)
    return (np.abs(np.asarray(got, np.float64) - ref) / norms).max()


class RopeVariantsTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(layout=LAYOUTS, rotary_dim=(None, 16), start=(0, 10**6 - 64))
    def test_matches_float64_reference_up_to_position_1e6(self, layout, rotary_dim, start):
        x = _normal((2, 64, 3, 32))
        positions = np.stack([np.arange(start, start + 64), np.arange(64)[::-1] + start])
        positions = positions.astype(np.int32)
        rope = self.variant(
            lambda x, p: pe.apply_rope(x, p, layout=layout, rotary_dim=rotary_dim, base=500.0)
        )
        got = rope(x, positions)
        chex.assert_shape(got, x.shape)
        chex.assert_type(got, jnp.float32)
        ref = rope_reference(x, positions, plain_inv_freq(rotary_dim or 32, 500.0), layout=layout)
        self.assertLess(_relative_error(got, ref, x), 1e-6)  # the issue asks for 1e-5

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(dtype=(jnp.bfloat16, jnp.float16), layout=LAYOUTS)
    def test_low_precision_inputs_keep_dtype_and_round_once(self, dtype, layout):
        x = jnp.asarray(_normal((2, 32, 2, 16)), dtype)
        positions = np.arange(10**6, 10**6 + 32, dtype=np.int32)
        got = self.variant(lambda x, p: pe.apply_rope(x, p, layout=layout))(x, positions)
        chex.assert_type(got, dtype)
        ref = rope_reference(
            np.asarray(x, np.float64), positions, plain_inv_freq(16), layout=layout
        )
        # One rounding of the output to the dtype (half an ulp) plus float32 arithmetic.
        eps = float(jnp.finfo(dtype).eps)
        self.assertLess(_relative_error(got, ref, np.asarray(x, np.float64)), eps)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(
        (pe.LinearScaling(4.0), plain_inv_freq(32) / 4.0, 1.0),
        (
            pe.YarnScaling(8.0, 256),
            yarn_inv_freq(32, 10000.0, 8.0, 256),
            yarn_attention_factor(8.0),
        ),
        (
            pe.LongRopeScaling(
                tuple(np.linspace(1, 8, 16)), tuple(np.linspace(2, 30, 16)), 64, None, 16.0
            ),
            longrope_inv_freq(32, 10000.0, np.linspace(1, 8, 16)),
            longrope_attention_factor(16.0, 64),
        ),
    )
    def test_scalings_match_reference_at_long_positions(self, scaling, inv_freq, factor):
        x = _normal((1, 48, 2, 32), seed=3)
        positions = np.arange(48, dtype=np.int32) * 20000 + 7
        # Concrete positions past L0 pick LongRoPE's long factors; the reference is
        # given the short ones, so pin seq_len to the original length.
        rope = self.variant(lambda x, p: pe.apply_rope(x, p, scaling=scaling, seq_len=64))
        ref = rope_reference(x, positions, inv_freq, attention_factor=factor)
        self.assertLess(_relative_error(rope(x, positions), ref, x), 1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradient_matches_finite_differences(self):
        x = _normal((1, 5, 2, 8), np.float64)
        weights = _normal((1, 5, 2, 8), np.float64, seed=1)
        positions = np.array([0, 3, 17, 1000, 99999], np.int32)

        def loss(x):
            return jnp.sum(pe.apply_rope(x, positions, rotary_dim=6) * weights)

        grad = np.asarray(self.variant(jax.grad(loss))(jnp.asarray(x, jnp.float32)))
        # Central differences along every coordinate at once (one bumped copy per row).
        step = 1e-3
        bumps = step * np.eye(x.size).reshape(x.size, *x.shape)
        losses = jax.jit(jax.vmap(loss))
        numeric = (
            losses(jnp.asarray(x + bumps, jnp.float32))
            - losses(jnp.asarray(x - bumps, jnp.float32))
        ) / (2 * step)
        np.testing.assert_allclose(grad, np.asarray(numeric).reshape(x.shape), atol=2e-3)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*LAYOUTS)
    def test_gradients_for_inputs_and_learned_frequencies_match_the_textbook_formula(self, layout):
        x = _normal((2, 6, 3, 16))
        weights = _normal((2, 6, 3, 16), seed=1)
        positions = np.arange(6) * 3 + 1
        inv_freq = jnp.asarray(pe.rope_frequencies(12)[0], jnp.float32)  # rotates 12 of 16

        def textbook(x, inv_freq):
            angles = positions[:, None] * inv_freq
            cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]
            if layout == "half":
                a, b = x[..., :6], x[..., 6:12]
                rotated = jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
            else:
                a, b = x[..., 0:12:2], x[..., 1:12:2]
                rotated = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1)
                rotated = rotated.reshape(*x.shape[:-1], 12)
            return jnp.concatenate([rotated, x[..., 12:]], axis=-1)

        def library(x, inv_freq):
            return pe.apply_rope(x, positions, inv_freq=inv_freq, layout=layout)

        def gradients(rope):
            loss = lambda x, inv_freq: jnp.sum(rope(x, inv_freq) * weights)  # noqa: E731
            return self.variant(jax.grad(loss, argnums=(0, 1)))(x, inv_freq)

        got, want = gradients(library), gradients(textbook)
        np.testing.assert_allclose(got[0], want[0], atol=1e-5)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-4)

    @chex.variants(with_jit=True, without_jit=True)
    def test_vmap_over_batch_equals_batched_call(self):
        x = _normal((3, 10, 2, 8))
        positions = np.arange(30, dtype=np.int32).reshape(3, 10) * 7
        per_row = self.variant(jax.vmap(lambda x, p: pe.apply_rope(x[None], p)[0]))
        np.testing.assert_allclose(per_row(x, positions), pe.apply_rope(x, positions), atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_rows_of_positions_alike_or_not_rotate_each_row_by_its_own(self):
        # Alike rows share one row's cos/sin tables (a host check for concrete positions,
        # a cond under jit); rows that differ in a single entry must not.
        x = _normal((3, 10, 2, 8))
        alike = np.tile(np.arange(10, dtype=np.int32) + 1000, (3, 1))
        one_differs = alike.copy()
        one_differs[2, 9] = 5
        rope = self.variant(lambda x, p: pe.apply_rope(x, p, layout="interleaved"))
        for positions in (alike, one_differs, jnp.asarray(one_differs)):
            expected = [
                rope_reference(x[b : b + 1], np.asarray(positions)[b], plain_inv_freq(8),
                               layout="interleaved")
                for b in range(3)
            ]  # fmt: skip
            np.testing.assert_allclose(
                rope(x, positions), np.concatenate(expected), atol=2e-5, err_msg=str(positions)
            )

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradient_through_alike_or_differing_rows_is_the_rotation_back(self):
        # The rotation is orthogonal: the gradient of sum(w * rope(x, p)) for x is w
        # rotated by -p, row by row, whichever branch of the alike-rows cond runs.
        x, weights = _normal((3, 10, 2, 8)), _normal((3, 10, 2, 8), seed=1)
        alike = np.tile(np.arange(10, dtype=np.int32) + 1000, (3, 1))
        one_differs = alike.copy()
        one_differs[1, 4] = 17
        loss = lambda x, p: jnp.sum(pe.apply_rope(x, p) * weights)  # noqa: E731
        gradient = self.variant(jax.grad(loss))
        for positions in (alike, one_differs):
            want = rope_reference(weights, -positions.astype(np.float64), plain_inv_freq(8))
            np.testing.assert_allclose(
                gradient(x, jnp.asarray(positions)), want, atol=2e-5, err_msg=str(positions)
            )


# ---------------------------------------------------------------- properties


@given(
    layout=st.sampled_from(LAYOUTS),
    position=st.integers(0, 2**24 - 1),
    seed=st.integers(0, 2**16),
)
def test_rotation_preserves_every_pair_norm(layout, position, seed):
    x = _normal((1, 1, 2, 12), seed=seed)
    got = np.asarray(rope(x, np.array([position]), layout=layout), np.float64)
    if layout == "half":
        norms = np.hypot(got[..., :6], got[..., 6:]), np.hypot(x[..., :6], x[..., 6:])
    else:
        norms = np.hypot(got[..., 0::2], got[..., 1::2]), np.hypot(x[..., 0::2], x[..., 1::2])
    np.testing.assert_allclose(norms[0], norms[1], rtol=1e-6)


POSITION_INDEPENDENT_SCALINGS = (
    None,
    pe.LinearScaling(3.0),
    pe.NTKScaling(4.0),
    pe.YarnScaling(4.0, 128, mscale=0.7, mscale_all_dim=0.3),
    pe.Llama3Scaling(8.0, 1.0, 4.0, 256),
    pe.LongRopeScaling((1.0, 2.0, 3.0, 4.0, 5.0, 6.0), (2.0,) * 6, 512, 1.25),
)


@given(
    scaling=st.sampled_from(POSITION_INDEPENDENT_SCALINGS),
    layout=st.sampled_from(LAYOUTS),
    m=st.integers(0, 100_000),
    n=st.integers(0, 100_000),
    shift=st.integers(-50_000, 50_000),
)
def test_scores_depend_only_on_the_offset(scaling, layout, m, n, shift):
    q = _normal((1, 1, 1, 12), seed=m % 7)
    k = _normal((1, 1, 1, 12), seed=n % 5 + 10)
    shift = max(shift, -min(m, n))

    def score(qp, kp):
        kwargs = {"scaling": scaling, "layout": layout, "seq_len": 100}
        rq = rope(q, np.array([qp]), **kwargs)
        rk = rope(k, np.array([kp]), **kwargs)
        return float(jnp.sum(rq * rk))

    scale = np.abs(q).sum() * np.abs(k).sum()
    np.testing.assert_allclose(score(m, n), score(m + shift, n + shift), atol=1e-5 * scale)


@given(layout=st.sampled_from(LAYOUTS), rotary_dim=st.sampled_from([2, 4, 6, 10]))
def test_position_zero_is_the_identity(layout, rotary_dim):
    x = _normal((2, 3, 2, 10))
    got = rope(x, np.zeros((2, 3), np.int32), layout=layout, rotary_dim=rotary_dim)
    np.testing.assert_array_equal(np.asarray(got), x)


@given(
    layout=st.sampled_from(LAYOUTS),
    rotary_dim=st.sampled_from([2, 6, 8]),
    dtype=st.sampled_from([np.float32, jnp.bfloat16]),
)
def test_partial_rotary_leaves_the_tail_untouched(layout, rotary_dim, dtype):
    x = jnp.asarray(_normal((1, 4, 2, 16)), dtype)
    x = x.at[0, 1, 0, -1].set(jnp.nan).at[0, 2, 1, -2].set(jnp.inf)
    got = rope(x, np.arange(4) * 1000, layout=layout, rotary_dim=rotary_dim)
    np.testing.assert_array_equal(
        np.asarray(got[..., rotary_dim:], np.float32), np.asarray(x[..., rotary_dim:], np.float32)
    )
    assert np.isfinite(np.asarray(got[..., :rotary_dim], np.float32)).all()


@given(
    original=st.integers(1, 100_000),
    fraction=st.floats(0.0, 1.0),
    factor=st.floats(0.5, 64.0),
    rotary_dim=st.sampled_from([4, 16, 128]),
)
def test_dynamic_ntk_is_plain_rope_up_to_the_original_length(
    original, fraction, factor, rotary_dim
):
    seq_len = max(1, round(fraction * original))
    scaling = pe.DynamicNTKScaling(factor, original)
    got, attention_factor = pe.rope_frequencies(rotary_dim, scaling=scaling, seq_len=seq_len)
    np.testing.assert_array_equal(got, pe.rope_frequencies(rotary_dim)[0])
    assert attention_factor == 1.0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dynamic_ntk_rotation_is_plain_rope_at_the_original_length(layout):
    x = _normal((1, 8, 1, 16))
    scaling = pe.DynamicNTKScaling(4.0, 512)
    positions = np.arange(504, 512)
    got = rope(x, positions, scaling=scaling, layout=layout, seq_len=512)
    np.testing.assert_array_equal(got, rope(x, positions, layout=layout))


# ---------------------------------------------------------------- regressions


def test_dynamic_ntk_after_a_long_call_equals_a_fresh_short_call():
    scaling = pe.DynamicNTKScaling(2.0, 64)
    module = pe.RotaryEmbedding(scaling=scaling)

    def call(x, positions):
        return module.apply({}, x, x, positions)

    x, long_x = _normal((1, 16, 2, 8)), _normal((1, 256, 2, 8))
    short = np.arange(16)
    fresh = _jit_at(call, short)(x)
    long_q, _ = _jit_at(call, np.arange(256) + 1000)(long_x)
    again = _jit_at(call, short)(x)
    np.testing.assert_array_equal(fresh[0], again[0])
    np.testing.assert_array_equal(fresh[0], _jit_at(_plain, short)(x))
    # The long call really used other frequencies.
    assert not np.allclose(long_q, rope(long_x, np.arange(256) + 1000), atol=1e-3)


def test_dynamic_ntk_long_frequencies_follow_the_formula():
    inv_freq, _ = pe.rope_frequencies(16, scaling=pe.DynamicNTKScaling(4.0, 64), seq_len=300)
    np.testing.assert_allclose(
        inv_freq, dynamic_ntk_inv_freq(16, 10000.0, 4.0, 64, 300), rtol=1e-12
    )
    traced = jax.jit(
        lambda n: pe.rope_frequencies(16, scaling=pe.DynamicNTKScaling(4.0, 64), seq_len=n)[0]
    )(300)
    np.testing.assert_allclose(traced, inv_freq, rtol=2e-6)


def test_longrope_switches_to_long_factors_only_past_the_original_length():
    scaling = pe.LongRopeScaling((1.0, 1.0, 1.0, 1.0), (4.0, 4.0, 4.0, 4.0), 32)
    x = _normal((1, 4, 1, 8))
    at_boundary = np.arange(28, 32)  # max position 31 -> seq_len 32 = L0: short
    past_boundary = np.arange(29, 33)  # seq_len 33 > L0: long

    def scaled(x, positions):
        return pe.apply_rope(x, positions, scaling=scaling)

    np.testing.assert_array_equal(_jit_at(scaled, at_boundary)(x), _jit_at(_plain, at_boundary)(x))
    ref = rope_reference(x, past_boundary, plain_inv_freq(8) / 4.0)
    np.testing.assert_allclose(_jit_at(scaled, past_boundary)(x), ref, atol=1e-6)
    for seq_len, expected in ((32, 1.0), (33, 4.0)):
        inv_freq, _ = pe.rope_frequencies(8, scaling=scaling, seq_len=seq_len)
        np.testing.assert_allclose(inv_freq, plain_inv_freq(8) / expected)
        traced, _ = jax.jit(lambda n: pe.rope_frequencies(8, scaling=scaling, seq_len=n))(seq_len)
        np.testing.assert_allclose(traced, plain_inv_freq(8) / expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("mscale", "mscale_all_dim", "attention_factor"),
    [(None, None, None), (0.707, 0.707, None), (1.0, 0.5, None), (0.8, 0.0, None), (1.0, 1.0, 1.3)],
)
def test_yarn_attention_factor_is_applied_exactly_once(mscale, mscale_all_dim, attention_factor):
    scaling = pe.YarnScaling(
        16.0, 128, mscale=mscale, mscale_all_dim=mscale_all_dim, attention_factor=attention_factor
    )
    expected = yarn_attention_factor(16.0, mscale, mscale_all_dim, attention_factor)
    _, factor = pe.rope_frequencies(16, scaling=scaling)
    np.testing.assert_allclose(factor, expected, rtol=1e-12)
    q, k = _normal((1, 1, 1, 16)), _normal((1, 1, 1, 16), seed=1)
    rq, rk = rope_qk(q, k, np.array([0]), scaling=scaling)
    # At position 0 the rotation is the identity: only the factor remains, on q and on k.
    np.testing.assert_allclose(np.sum(rq * rk), expected**2 * np.sum(q * k), rtol=1e-5)


def test_yarn_and_llama3_frequencies_differ_from_plain_where_they_must():
    plain = plain_inv_freq(64, 500000.0)
    llama, _ = pe.rope_frequencies(64, base=500000.0, scaling=pe.Llama3Scaling(8.0, 1.0, 4.0, 8192))
    wavelength = 2 * np.pi / plain
    short, long = wavelength < 8192 / 4.0, wavelength > 8192 / 1.0
    medium = ~short & ~long
    assert short.any() and long.any() and medium.any()
    np.testing.assert_allclose(llama[short], plain[short], rtol=1e-15)
    np.testing.assert_allclose(llama[long], plain[long] / 8.0, rtol=1e-15)
    assert np.all((llama[medium] < plain[medium]) & (llama[medium] > plain[medium] / 8.0))

    yarn, _ = pe.rope_frequencies(64, scaling=pe.YarnScaling(8.0, 4096))
    plain = plain_inv_freq(64)
    turns = 4096 * plain / (2 * np.pi)
    fast, slow = turns > 32, turns < 1
    assert fast.any() and slow.any()
    np.testing.assert_allclose(yarn[fast], plain[fast], rtol=1e-15)
    np.testing.assert_allclose(yarn[slow], plain[slow] / 8.0, rtol=1e-15)
    between = ~fast & ~slow
    assert np.any((yarn[between] < plain[between]) & (yarn[between] > plain[between] / 8.0))


def test_static_frequencies_are_host_float64_so_angles_stay_exact():
    for scaling in POSITION_INDEPENDENT_SCALINGS:
        inv_freq, _ = pe.rope_frequencies(12, scaling=scaling)
        assert isinstance(inv_freq, np.ndarray) and inv_freq.dtype == np.float64


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_rotation_is_within_float32_rounding_up_to_position_2_to_the_24(layout):
    rng = np.random.default_rng(5)
    x = _normal((2, 256, 4, 128), seed=5)
    positions = np.stack([np.arange(2**24 - 256, 2**24), rng.integers(0, 2**24, 256)])
    positions = positions.astype(np.int32)
    inv_freq = plain_inv_freq(128)
    cos, sin = pe.rope_cos_sin(positions, inv_freq)
    angles = positions.astype(np.float64)[..., None] * inv_freq
    # cos and sin within about one float32 ulp of 1 (1.2e-7), the rotated heads within
    # the float32 rounding of the result (2^-24 = 6e-8 of the head norm).
    assert np.abs(np.asarray(cos, np.float64) - np.cos(angles)).max() < 1.5e-7
    assert np.abs(np.asarray(sin, np.float64) - np.sin(angles)).max() < 1.5e-7
    got = rope(x, positions, layout=layout)
    ref = rope_reference(x, positions, inv_freq, layout=layout)
    assert _relative_error(got, ref, x) < 8e-8


# ---------------------------------------------------------------- positions


def test_packed_documents_equal_each_document_alone():
    x = _normal((1, 10, 2, 8))
    positions = np.concatenate([np.arange(6), np.arange(4)])[None]
    packed = rope(x, positions)
    np.testing.assert_array_equal(packed[:, :6], rope(x[:, :6], np.arange(6)))
    np.testing.assert_array_equal(packed[:, 6:], rope(x[:, 6:], np.arange(4)))


def test_left_padded_row_equals_the_unpadded_row():
    tokens = _normal((1, 5, 2, 8))
    padded = np.concatenate([np.zeros((1, 3, 2, 8), np.float32), tokens], axis=1)
    positions = np.array([[0, 0, 0, 0, 1, 2, 3, 4]])
    got = rope(padded, positions)
    np.testing.assert_array_equal(got[:, 3:], rope(tokens, np.arange(5)))


@pytest.mark.parametrize("scaling", [None, pe.DynamicNTKScaling(4.0, 16)])
def test_kv_cache_decoding_matches_the_full_sequence(scaling):
    q, k = _normal((2, 24, 4, 16)), _normal((2, 24, 2, 16), seed=1)
    full_q, full_k = rope_qk(q, k, np.arange(24), scaling=scaling, seq_len=24)
    # Decode the last query against all keys: query positions offset by the cache length.
    step_q, step_k = rope_qk(
        q[:, -1:], k, np.array([23]), np.arange(24), scaling=scaling, seq_len=24
    )
    np.testing.assert_array_equal(step_q, full_q[:, -1:])
    np.testing.assert_array_equal(step_k, full_k)


def test_apply_rope_qk_uses_one_length_for_queries_and_keys():
    scaling = pe.DynamicNTKScaling(4.0, 8)
    q, k = _normal((1, 1, 1, 8)), _normal((1, 20, 1, 8), seed=1)

    def both(q, k, q_positions, k_positions):
        return pe.apply_rope_qk(q, k, q_positions, k_positions, scaling=scaling)

    got_q, got_k = _jit_at(both, np.array([19]), np.arange(20))(q, k)

    def fixed(x, positions):
        return pe.apply_rope(x, positions, scaling=scaling, seq_len=20)

    np.testing.assert_array_equal(got_q, _jit_at(fixed, np.array([19]))(q))
    np.testing.assert_array_equal(got_k, _jit_at(fixed, np.arange(20))(k))


# ---------------------------------------------------------------- frequencies and layouts


def test_explicit_per_head_frequencies():
    inv_freq = np.stack([plain_inv_freq(8, 100.0), plain_inv_freq(8, 1e6)])
    x = _normal((2, 6, 2, 12))
    positions = np.arange(12).reshape(2, 6) * 31
    got = pe.apply_rope(x, positions, inv_freq=inv_freq, layout="interleaved")
    ref = rope_reference(x, positions, inv_freq, layout="interleaved")
    np.testing.assert_allclose(got, ref, atol=2e-6)


def test_layout_conversion_keeps_attention_scores_identical():
    rng = np.random.default_rng(0)
    d_model, heads, head_dim, rotary_dim = 24, 3, 16, 12
    hidden = rng.standard_normal((2, 7, d_model)).astype(np.float32)
    w_q = rng.standard_normal((d_model, heads * head_dim)).astype(np.float32)
    w_k = rng.standard_normal((d_model, heads * head_dim)).astype(np.float32)
    positions = np.arange(7) + 40
    perm = pe.rope_layout_permutation(head_dim, rotary_dim=rotary_dim)

    def scores(w_q, w_k, layout):
        q = (hidden @ w_q).reshape(2, 7, heads, head_dim)
        k = (hidden @ w_k).reshape(2, 7, heads, head_dim)
        q, k = rope_qk(q, k, positions, layout=layout, rotary_dim=rotary_dim)
        return np.einsum("bqhd,bkhd->bhqk", q, k)

    def convert(w):
        return w.reshape(d_model, heads, head_dim)[..., perm].reshape(d_model, -1)

    original = scores(w_q, w_k, "interleaved")
    np.testing.assert_allclose(
        scores(convert(w_q), convert(w_k), "half"), original, rtol=1e-5, atol=1e-4
    )
    back = pe.rope_layout_permutation(
        head_dim, rotary_dim=rotary_dim, source="half", target="interleaved"
    )
    np.testing.assert_array_equal(perm[back], np.arange(head_dim))
    assert not np.allclose(scores(w_q, w_k, "half"), original, atol=1e-2)


# ---------------------------------------------------------------- multi-axis


def test_multi_axis_rope_with_equal_axes_is_ordinary_rope():
    x = _normal((2, 9, 2, 32))
    positions = np.arange(18).reshape(2, 9) * 5
    stacked = np.stack([positions] * 3)
    for layout in LAYOUTS:
        multi = jax.jit(
            lambda x, p, layout=layout: pe.apply_multi_axis_rope(x, p, (4, 6, 6), layout=layout)
        )
        np.testing.assert_array_equal(multi(x, stacked), rope(x, positions, layout=layout))


def test_multi_axis_rope_rotates_each_section_by_its_axis():
    x = _normal((1, 6, 1, 16))
    rows, cols = np.divmod(np.arange(6), 3)
    got = jax.jit(lambda x, p: pe.apply_multi_axis_rope(x, p, (3, 5)))(x, np.stack([rows, cols]))
    theta = plain_inv_freq(16)
    first, second = np.arange(8), np.arange(8) + 8
    angle = np.where(np.arange(8) < 3, rows[:, None], cols[:, None]) * theta
    z = (x[0, :, 0, first].T + 1j * x[0, :, 0, second].T) * np.exp(1j * angle)
    np.testing.assert_allclose(got[0, :, 0, :8], z.real, atol=1e-6)
    np.testing.assert_allclose(got[0, :, 0, 8:], z.imag, atol=1e-6)


# ---------------------------------------------------------------- xPos


@pytest.mark.parametrize("layout", LAYOUTS)
def test_xpos_scores_match_the_paper(layout):
    q, k = _normal((1, 12, 2, 16)), _normal((1, 12, 2, 16), seed=1)
    positions = np.arange(12) * 40 + 3
    got_q, got_k = xpos(q, k, positions, scale_base=64.0, layout=layout)
    ref_q = xpos_reference(q, positions, 16, scale_base=64.0, layout=layout)
    ref_k = xpos_reference(k, positions, 16, scale_base=64.0, key=True, layout=layout)
    scores = np.einsum("bqhd,bkhd->bhqk", got_q, got_k)
    ref = np.einsum("bqhd,bkhd->bhqk", ref_q, ref_k)
    causal = np.tril(np.ones((12, 12), bool))
    np.testing.assert_allclose(scores[..., causal], ref[..., causal], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_xpos_stays_finite_at_long_positions_in_half_precision(dtype):
    q = jnp.asarray(_normal((1, 64, 2, 16)), dtype)
    positions = np.arange(10**6, 10**6 + 64, dtype=np.int32)
    got_q, got_k = xpos(q, q, positions)
    chex.assert_type(got_q, dtype)
    assert np.isfinite(np.asarray(got_q, np.float32)).all()
    assert np.isfinite(np.asarray(got_k, np.float32)).all()
    # Same scores as the same tokens near position 0 (only the offset matters).
    near_q, near_k = xpos(q, q, positions - 10**6)
    np.testing.assert_allclose(
        np.einsum("bqhd,bkhd->bhqk", got_q.astype(np.float32), got_k.astype(np.float32)),
        np.einsum("bqhd,bkhd->bhqk", near_q.astype(np.float32), near_k.astype(np.float32)),
        rtol=0.05,
        atol=0.1,
    )


def test_xpos_decay_follows_zeta_and_a_fixed_reference_supports_decoding():
    q, k = _normal((1, 1, 1, 8)), _normal((1, 40, 1, 8), seed=1)
    _, keys = xpos(k, k, np.arange(40), reference_position=0, scale_base=16.0)
    step_q, step_k = xpos(
        q,
        k[:, -1:],
        np.array([39]),
        k_positions=np.array([39]),
        reference_position=0,
        scale_base=16.0,
    )
    # A key rotated alone during decoding equals the same key rotated with the prompt.
    np.testing.assert_allclose(step_k, keys[:, -1:], rtol=1e-6)

    def pair_norms(x):
        return np.hypot(x[..., :4], x[..., 4:])

    gain = (pair_norms(step_q) / pair_norms(q)) * (pair_norms(keys) / pair_norms(k))
    zeta = (np.arange(0, 8, 2) / 8 + 0.4) / 1.4
    distance = 39 - np.arange(40)
    expected = zeta[None, :] ** (distance[:, None] / 16.0)
    np.testing.assert_allclose(gain[0, :, 0], expected, rtol=1e-5)
    assert np.all(np.diff(expected, axis=0) > 0)  # farther keys weigh less


def test_xpos_refuses_bidirectional_attention():
    x = _normal((1, 4, 1, 8))
    with pytest.raises(ValueError, match="causal-only"):
        pe.apply_xpos(x, x, np.arange(4), causal=False)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rotary_dim": 7}, ValueError, "rotary_dim must be even"),
        ({"rotary_dim": 18}, ValueError, "rotary_dim must be <= head_dim"),
        ({"layout": "neox"}, ValueError, "layout must be one of"),
        ({"angle_precision": "bf16"}, ValueError, "angle_precision must be one of"),
        ({"base": -1.0}, ValueError, "base must be a finite number > 0"),
        ({"scaling": {"rope_type": "linear", "factor": 2.0}}, TypeError, "from_hf_rope_parameters"),
        ({"inv_freq": np.ones((3, 4))}, ValueError, "inv_freq must have shape"),
        ({"inv_freq": np.ones(4), "rotary_dim": 16}, ValueError, "does not match inv_freq"),
        ({"inv_freq": np.ones(4), "base": 100.0}, ValueError, "either inv_freq or base"),
        ({"attention_factor": 2.0}, ValueError, "only accepted together with inv_freq"),
        ({"scaling": pe.LongRopeScaling((1.0,) * 3, (1.0,) * 3, 8)}, ValueError, "rotary_dim / 2"),
    ],
)
def test_apply_rope_rejects_bad_arguments(kwargs, error, match):
    x = jnp.zeros((1, 4, 2, 16))
    with pytest.raises(error, match=match):
        pe.apply_rope(x, jnp.arange(4), **kwargs)


@pytest.mark.parametrize(
    ("x_shape", "positions", "error", "match"),
    [
        (
            (4, 2, 16),
            np.arange(4),
            ValueError,
            r"x must have shape \[batch, seq, heads, head_dim\]",
        ),
        ((1, 4, 2, 16), np.arange(5), ValueError, "positions must have shape"),
        ((2, 4, 2, 16), np.zeros((3, 4), np.int32), ValueError, "positions must have shape"),
        (
            (1, 4, 2, 16),
            np.zeros((1, 1, 4), np.int32),
            ValueError,
            "positions must have rank 1 or 2",
        ),
        ((1, 4, 2, 16), np.array([True] * 4), TypeError, "positions must have an integer"),
    ],
)
def test_apply_rope_rejects_mismatched_shapes(x_shape, positions, error, match):
    with pytest.raises(error, match=match):
        pe.apply_rope(jnp.zeros(x_shape), positions)


def test_apply_rope_rejects_integer_activations():
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        pe.apply_rope(jnp.zeros((1, 4, 2, 16), jnp.int32), jnp.arange(4))


def test_multi_axis_sections_must_sum_to_half_the_rotary_dim():
    x = jnp.zeros((1, 4, 1, 16))
    with pytest.raises(ValueError, match=r"sections must sum to rotary_dim / 2 = 8"):
        pe.apply_multi_axis_rope(x, jnp.zeros((3, 4), jnp.int32), (2, 2, 2))
    with pytest.raises(ValueError, match="has 2 entries but positions"):
        pe.apply_multi_axis_rope(x, jnp.zeros((3, 4), jnp.int32), (4, 4))


# ---------------------------------------------------------------- modules


def test_rotary_module_learns_frequencies():
    q, k = _normal((2, 5, 4, 16)), _normal((2, 5, 2, 16), seed=1)
    positions = np.arange(5) + 3
    scaling = pe.YarnScaling(4.0, 64)
    linen = pe.RotaryEmbedding(rotary_dim=8, scaling=scaling, learnable_frequencies=True)
    params = linen.init(jax.random.key(0), q, k, positions)
    np.testing.assert_allclose(
        params["params"]["inv_freq"], pe.rope_frequencies(8, scaling=scaling)[0], rtol=1e-7
    )
    learned = params["params"]["inv_freq"] * 1.5
    apply = jax.jit(
        lambda inv_freq, q, k, p: linen.apply({"params": {"inv_freq": inv_freq}}, q, k, p)
    )
    got_linen = apply(learned, q, k, positions)
    # The learned frequencies really rotate (attention factor of YaRN included).
    _, factor = pe.rope_frequencies(8, scaling=scaling)
    ref = rope_reference(q, positions, np.asarray(learned, np.float64), attention_factor=factor)
    np.testing.assert_allclose(got_linen[0], ref, atol=1e-5)

    def loss(inv_freq):
        rq, rk = apply(inv_freq, q, k, positions)
        return jnp.sum(rq[:, :, :2] * rk)

    grad = jax.jit(jax.grad(loss))(learned)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_static_modules_call_the_pure_functions():
    q, k = _normal((2, 5, 4, 16)), _normal((2, 5, 2, 16), seed=1)
    positions = np.arange(5) + 3
    config = {"base": 500.0, "layout": "interleaved"}
    linen = jax.jit(lambda q, k, p: pe.RotaryEmbedding(rotary_dim=8, **config).apply({}, q, k, p))(
        q, k, positions
    )
    np.testing.assert_array_equal(linen[0], rope(q, positions, rotary_dim=8, **config))
    np.testing.assert_array_equal(linen[1], rope(k, positions, rotary_dim=8, **config))

    linen = jax.jit(lambda q, p: pe.XPosEmbedding(scale_base=128.0).apply({}, q, q, p))(
        q, positions
    )
    expected = xpos(q, q, positions, scale_base=128.0)
    np.testing.assert_array_equal(linen[0], expected[0])
    np.testing.assert_array_equal(linen[1], expected[1])


def test_modules_jit_without_retracing_for_new_positions():
    module = pe.RotaryEmbedding(scaling=pe.LinearScaling(2.0))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def rotate(q, positions):
        return module.apply({}, q, q, positions)

    q = _normal((1, 4, 1, 8))
    rotate(q, jnp.arange(4))
    rotate(q, jnp.arange(4) + 100)  # a second trace would raise


# ---------------------------------------------------------------- registry


def _spec(causal=True, **options):
    return pe.EncodingSpec(
        d_model=32, num_heads=4, head_dim=8, max_positions=64, causal=causal, options=options
    )


def test_rope_factory_builds_a_qk_transform_with_options():
    encoding = pe.get_encoding("rope")
    assert encoding.contributes == ("qk_transform",)
    scaling = {"rope_type": "linear", "factor": 2.0}
    module = encoding.qk_transform(_spec(rope={"base": 500.0, "rotary_dim": 4, "scaling": scaling}))
    q, k = _normal((1, 5, 4, 8)), _normal((1, 7, 2, 8), seed=1)
    got_q, got_k = jax.jit(module.apply)({}, q, k, np.arange(5) + 2, np.arange(7))
    kwargs = {"base": 500.0, "rotary_dim": 4, "scaling": pe.LinearScaling(2.0)}
    np.testing.assert_array_equal(got_q, rope(q, np.arange(5) + 2, **kwargs))
    np.testing.assert_array_equal(got_k, rope(k, np.arange(7), **kwargs))
    with pytest.raises(ValueError, match=r"options \['theta'\] are not understood"):
        encoding.qk_transform(_spec(rope={"theta": 1.0}))


def test_xpos_factory_is_causal_only():
    encoding = pe.get_encoding("xpos")
    assert encoding.causal_only and encoding.contributes == ("qk_transform",)
    with pytest.raises(ValueError, match="causal-only"):
        encoding.qk_transform(_spec(causal=False))
    module = encoding.qk_transform(_spec(xpos={"scale_base": 64.0}))
    q = _normal((1, 5, 4, 8))
    got = jax.jit(module.apply)({}, q, q, np.arange(5), np.arange(5))
    expected = xpos(q, q, np.arange(5), scale_base=64.0)
    np.testing.assert_array_equal(got[0], expected[0])


# ---------------------------------------------------------------- performance structure


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA:CPU fusion decisions")
def test_sin_and_cos_are_computed_once_not_per_head():
    x = jnp.zeros((2, 64, 8, 32))
    hlo = jax.jit(lambda x, p: pe.apply_rope(x, p)).lower(x, jnp.arange(64)).compile().as_text()
    fusions = [c.strip() for c in hlo.split("\n\n") if c.strip().startswith("%fused")]
    # The fixed-point angle (uint32 products) and the cos/sin polynomials of its quarter
    # turn (rounding to the nearest quarter) form the [n]-sized table in its own fusion;
    # the loop over x only reads it.
    with_angles = [c for c in fusions if "u32[" in c and "round-nearest-even(" in c]
    assert with_angles
    assert not any("-> f32[2,64,8,32]" in c.splitlines()[0] for c in with_angles)


# ------------------------------------------------------------------ positions past int32


def test_rope_refuses_positions_that_would_wrap_past_int32():
    x = jnp.ones((1, 1, 1, 8))
    # 2^31 + 7 would silently become -2^31 + 7 in int32.
    for positions in (np.array([2**31 + 7], np.int64), np.array([2**31 + 7], np.uint32)):
        with pytest.raises(ValueError, match=r"positions must lie in \[-2\^31, 2\^31\)"):
            pe.apply_rope(x, positions)
    last = pe.apply_rope(x, np.array([2**31 - 1], np.int64))
    assert np.all(np.isfinite(last))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32])
def test_xpos_one_token_calls_are_plain_rope_at_any_position(dtype):
    # A decoding step transforms one query and one key at the same position: with the
    # default (per-call) reference both factors are exactly 1, at position 10^9 too.
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 1, 2, 16)), dtype)
    for position in (4600, 36_000, 10**9):
        q, k = pe.apply_xpos(x, x, np.array([position]))
        want = pe.apply_rope(x, np.array([position]))
        np.testing.assert_array_equal(q, want)
        np.testing.assert_array_equal(k, want)


def test_xpos_fixed_reference_past_the_finite_range_raises_naming_it():
    x = jnp.ones((1, 1, 1, 16), jnp.float16)
    with pytest.raises(ValueError, match=r"reference_position=0.*finite in float16 only within"):
        pe.apply_xpos(x, x, np.array([4600]), reference_position=0)
    # Traced positions cannot raise: factors are clamped to the finite range.
    q, k = jax.jit(lambda p: pe.apply_xpos(x, x, p, reference_position=0))(jnp.array([36_000]))
    assert np.all(np.isfinite(np.asarray(q, np.float32)))
    assert np.all(np.isfinite(np.asarray(k, np.float32)))


def test_empty_sequences_pass_through_rope_and_xpos():
    empty = jnp.zeros((2, 0, 4, 8))
    chex.assert_shape(pe.apply_rope(empty, jnp.arange(0)), (2, 0, 4, 8))
    q, k = pe.apply_xpos(empty, empty, jnp.arange(0))
    chex.assert_shape((q, k), (2, 0, 4, 8))
