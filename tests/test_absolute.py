"""Tests for sinusoidal and learned absolute position encodings."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given
from hypothesis import strategies as st
from jax.experimental import checkify
from reference import sinusoidal_reference

import jax_posenc as pe
from jax_posenc._angles import rotation_angles

LAYOUTS = ("interleaved", "concat")


def _wrapped_angle_error(angles, positions, inv_freq):
    exact = np.asarray(positions, np.float64)[..., None] * inv_freq
    return np.abs(np.angle(np.exp(1j * (np.asarray(angles, np.float64) - exact)))).max()


class SinusoidalVariantsTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(layout=LAYOUTS, dim=(2, 64, 130))
    def test_matches_float64_reference_for_first_4096_positions(self, layout, dim):
        positions = np.arange(4097, dtype=np.int32)
        encode = self.variant(lambda p: pe.sinusoidal_encoding(p, dim, layout=layout))
        got = encode(positions)
        chex.assert_shape(got, (4097, dim))
        chex.assert_type(got, jnp.float32)
        err = np.abs(
            np.asarray(got, np.float64) - sinusoidal_reference(positions, dim, layout=layout)
        )
        self.assertLess(err.max(), 2e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(layout=LAYOUTS, start=(10**6 - 512, 2**24 - 1024))
    def test_matches_float64_reference_at_long_positions(self, layout, start):
        positions = np.arange(start, start + 1024, dtype=np.int32)
        assert positions[-1] <= 2**24 - 1
        got = self.variant(lambda p: pe.sinusoidal_encoding(p, 128, layout=layout))(positions)
        err = np.abs(
            np.asarray(got, np.float64) - sinusoidal_reference(positions, 128, layout=layout)
        )
        self.assertLess(err.max(), 2e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_float_positions_match_reference(self):
        positions = np.linspace(-3.0, 5000.0, 777).astype(np.float32)
        got = self.variant(lambda p: pe.sinusoidal_encoding(p, 32))(positions)
        err = np.abs(np.asarray(got, np.float64) - sinusoidal_reference(positions, 32))
        self.assertLess(err.max(), 2e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_any_leading_shape_and_dtype(self):
        positions = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
        got = self.variant(lambda p: pe.sinusoidal_encoding(p, 8, dtype=jnp.bfloat16, base=100.0))(
            positions
        )
        chex.assert_shape(got, (2, 3, 4, 8))
        chex.assert_type(got, jnp.bfloat16)
        ref = sinusoidal_reference(positions, 8, base=100.0)
        np.testing.assert_allclose(np.asarray(got, np.float64), ref, atol=8e-3)


def test_sine_and_cosine_of_a_pair_share_one_frequency():
    positions = np.arange(1000, dtype=np.int32)
    enc = np.asarray(pe.sinusoidal_encoding(positions, 16), np.float64)
    # sin^2 + cos^2 = 1 per pair only if both use the same angle.
    np.testing.assert_allclose(enc[:, 0::2] ** 2 + enc[:, 1::2] ** 2, 1.0, atol=1e-6)
    concat = np.asarray(pe.sinusoidal_encoding(positions, 16, layout="concat"))
    np.testing.assert_array_equal(concat[:, :8], enc[:, 0::2])
    np.testing.assert_array_equal(concat[:, 8:], enc[:, 1::2])


def test_exact_angles_near_two_to_the_24_where_float32_product_fails():
    inv_freq = pe.sinusoidal_frequencies(128)
    positions = np.arange(2**24 - 4096, 2**24, dtype=np.int32)
    exact_err = _wrapped_angle_error(rotation_angles(positions, inv_freq), positions, inv_freq)
    plain = rotation_angles(positions, inv_freq, angle_precision="float32")
    plain_err = _wrapped_angle_error(plain, positions, inv_freq)
    assert exact_err < 1e-6
    assert plain_err > 0.1  # the float32 product really is that far off here


def test_float32_precision_reproduces_the_plain_product_bit_for_bit():
    positions = np.arange(0, 10**6, 997, dtype=np.int32)
    inv_freq = pe.sinusoidal_frequencies(64)
    plain = positions.astype(np.float32)[:, None] * inv_freq.astype(np.float32)
    got = rotation_angles(positions, inv_freq, angle_precision="float32")
    np.testing.assert_array_equal(np.asarray(got), plain)


@given(
    offset=st.integers(-(2**20), 2**20),
    first=st.integers(0, 2**20),
    second=st.integers(0, 2**20),
    layout=st.sampled_from(LAYOUTS),
)
def test_dot_product_depends_only_on_offset(offset, first, second, layout):
    # sum_i sin(a w)sin(b w) + cos(a w)cos(b w) = sum_i cos((a - b) w)
    positions = np.array([first, first + offset, second, second + offset], dtype=np.int32)
    enc = np.asarray(pe.sinusoidal_encoding(positions, 64, layout=layout), np.float64)
    np.testing.assert_allclose(enc[0] @ enc[1], enc[2] @ enc[3], atol=1e-4)
    expected = np.cos(offset * pe.sinusoidal_frequencies(64)).sum()
    np.testing.assert_allclose(enc[0] @ enc[1], expected, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dim": 7}, ValueError, "dim must be even"),
        ({"dim": 0}, ValueError, "dim must be a positive integer"),
        ({"dim": -4}, ValueError, "dim must be a positive integer"),
        ({"dim": 8.0}, TypeError, "dim must be an integer"),
        ({"dim": 8, "base": 0.0}, ValueError, "base must be a finite number > 0"),
        ({"dim": 8, "base": -10.0}, ValueError, "base must be a finite number > 0"),
        ({"dim": 8, "layout": "stacked"}, ValueError, "layout must be one of"),
        ({"dim": 8, "angle_precision": "bf16"}, ValueError, "angle_precision must be one of"),
    ],
)
def test_sinusoidal_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        pe.sinusoidal_encoding(jnp.arange(4), **kwargs)


def test_sinusoidal_rejects_non_numeric_positions():
    with pytest.raises(TypeError, match="positions must have an integer or floating dtype"):
        pe.sinusoidal_encoding(jnp.array([True, False]), 8)


# ---------------------------------------------------------------- learned embedding


def _linen_learned(num_positions=16, features=8, **kwargs):
    module = pe.LearnedEmbedding(num_positions, features, **kwargs)
    params = module.init(jax.random.key(0), jnp.arange(4))
    return module, params


def test_learned_embedding_returns_table_rows():
    module, params = _linen_learned()
    table = np.asarray(params["params"]["embedding"])
    positions = np.array([[3, 0, 15], [7, 7, 1]], dtype=np.int32)
    got = module.apply(params, positions)
    chex.assert_shape(got, (2, 3, 8))
    np.testing.assert_array_equal(np.asarray(got), table[positions])


@pytest.mark.parametrize(("bad", "values"), [([0, 16], "[0, 16]"), ([-1, 2], "[-1, 2]")])
@pytest.mark.parametrize("mode", ["clip", "error"])
def test_learned_embedding_rejects_concrete_positions_outside_table(bad, values, mode):
    module, params = _linen_learned(mode=mode)
    message = rf"positions must lie in \[0, num_positions=16\), got values in {re.escape(values)}"
    with pytest.raises(ValueError, match=message):
        module.apply(params, jnp.array(bad))


def test_learned_embedding_defaults_jit_init_and_apply():
    module = pe.LearnedEmbedding(16, 8)
    positions = jnp.arange(6).reshape(2, 3)
    params = jax.jit(module.init)(jax.random.key(0), positions)
    table = np.asarray(params["params"]["embedding"])
    got = jax.jit(module.apply)(params, positions)
    np.testing.assert_array_equal(np.asarray(got), table[np.asarray(positions)])
    # The documented policy for traced positions past the table: clamp, as nn.Embed.
    clamped = jax.jit(module.apply)(params, jnp.array([-3, 15, 40]))
    np.testing.assert_array_equal(np.asarray(clamped), table[[0, 15, 15]])


def test_learned_embedding_error_mode_under_jit_reports_through_checkify():
    module, params = _linen_learned(mode="error")
    checked = jax.jit(checkify.checkify(lambda positions: module.apply(params, positions)))
    err, _ = checked(jnp.array([1, 2, 3]))
    assert err.get() is None
    err, _ = checked(jnp.array([1, 2, 16]))
    assert "positions must lie in [0, num_positions=16)" in err.get()
    assert "got values in [1, 16]" in err.get()
    with pytest.raises(checkify.JaxRuntimeError):
        err.throw()


def test_learned_embedding_error_mode_under_plain_jit_refuses_to_run_unchecked():
    module, params = _linen_learned(mode="error")
    with pytest.raises(ValueError, match="checkify"):
        jax.jit(lambda p: module.apply(params, p))(jnp.array([1, 2]))


def test_learned_embedding_clip_mode_clamps_on_purpose():
    module, params = _linen_learned(mode="clip")
    table = np.asarray(params["params"]["embedding"])
    got = jax.jit(lambda p: module.apply(params, p))(jnp.array([-5, 3, 99]))
    np.testing.assert_array_equal(np.asarray(got), table[[0, 3, 15]])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_positions": 16.5}, TypeError, "num_positions must be an integer"),
        ({"num_positions": 0}, ValueError, "num_positions must be a positive integer"),
        ({"features": -1}, ValueError, "features must be a positive integer"),
        ({"mode": "wrap"}, ValueError, "mode must be one of"),
    ],
)
def test_learned_embedding_rejects_bad_configuration(kwargs, error, match):
    config = {"num_positions": 16, "features": 8, **kwargs}
    with pytest.raises(error, match=match):
        pe.LearnedEmbedding(**config).init(jax.random.key(0), jnp.arange(4))


def test_learned_embedding_rejects_float_positions():
    module, params = _linen_learned()
    with pytest.raises(TypeError, match="positions must have an integer dtype"):
        module.apply(params, jnp.array([1.0, 2.0]))


def test_modules_jit_and_vmap():
    module, params = _linen_learned(mode="clip")
    positions = jnp.arange(12).reshape(3, 4)
    batched = jax.jit(jax.vmap(lambda p: module.apply(params, p)))(positions)
    np.testing.assert_array_equal(batched, module.apply(params, positions))

    sinus = pe.SinusoidalEmbedding(16)
    batched = jax.jit(jax.vmap(lambda p: sinus.apply({}, p)))(positions)
    np.testing.assert_allclose(batched, sinus.apply({}, positions), atol=1e-7)
