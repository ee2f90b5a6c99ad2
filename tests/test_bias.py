"""Tests for the additive attention biases: ALiBi, T5, KERPLE, FIRE, dynamic position bias."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given
from hypothesis import strategies as st
from reference_bias import (
    alibi_reference,
    alibi_slopes_reference,
    dpb_reference,
    fire_reference,
    kerple_reference,
    t5_bucket_reference,
)

import jax_posenc as pe
from jax_posenc import bias

H = 4
T5_SETTINGS = ((32, 128), (64, 256))


def _init(module, length=8):
    positions = jnp.arange(length)
    return module.init(jax.random.key(0), positions, positions)


def _perturbed(params, seed=0):
    """Moves every parameter off its initial value (a zero T5 table would hide errors)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), max(1, len(leaves)))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=False)]
    return jax.tree.unflatten(tree, noisy)


def _layers(params, count):
    return [(params[f"kernel_{i}"], params[f"bias_{i}"]) for i in range(count)]


def _normal(seed, shape, scale=1.0):
    """Test data from NumPy's generator (no per-shape compilation)."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _random_layers(seed, shapes):
    return tuple(
        (_normal(seed + 2 * i, shape), _normal(seed + 2 * i + 1, (shape[1],), 0.1))
        for i, shape in enumerate(shapes)
    )


# Bias functions with arbitrary (fixed) parameters, for properties shared by all of them.
_FIRE_LAYERS = _random_layers(10, bias.mlp_layer_shapes(16, 1, H))
_DPB_LAYERS = _random_layers(20, bias.mlp_layer_shapes(16, 2, H))
_T5_TABLE = _normal(3, (32, H))
_R1 = jnp.array([0.5, 1.0, 2.0, 3.0])
_R2 = jnp.array([0.1, 0.5, 1.0, 1.9])
TRANSLATION_INVARIANT = {
    "alibi": functools.partial(pe.alibi_bias, slopes=pe.alibi_slopes(H)),
    "alibi_causal_form": functools.partial(pe.alibi_bias, slopes=pe.alibi_slopes(H), form="causal"),
    "t5": functools.partial(pe.t5_bias, _T5_TABLE),
    "t5_causal": functools.partial(pe.t5_bias, _T5_TABLE, bidirectional=False),
    "kerple_log": functools.partial(pe.kerple_bias, r1=_R1, r2=_R2, variant="log"),
    "kerple_power": functools.partial(pe.kerple_bias, r1=_R1, r2=_R2, variant="power"),
    "dpb": functools.partial(pe.dynamic_position_bias, layers=_DPB_LAYERS),
    "dpb_linear": functools.partial(
        pe.dynamic_position_bias, layers=_DPB_LAYERS, log_distance=False
    ),
}
ALL_BIASES = {
    **TRANSLATION_INVARIANT,
    "fire": functools.partial(pe.fire_bias, layers=_FIRE_LAYERS, c=0.1, threshold=64.0),
}


_JITTED = {name: jax.jit(fn) for name, fn in ALL_BIASES.items()}


# ------------------------------------------------------------------------------ T5


class T5BucketVariantsTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(bidirectional=(True, False), setting=T5_SETTINGS)
    def test_buckets_match_reference_for_every_offset_in_300(self, bidirectional, setting):
        num_buckets, max_distance = setting
        relative = np.arange(-300, 301, dtype=np.int32)
        bucket = self.variant(
            lambda r: pe.t5_relative_position_bucket(
                r, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
            )
        )
        got = np.asarray(bucket(relative))
        chex.assert_type(got, jnp.int32)
        expected = t5_bucket_reference(
            relative,
            bidirectional=bidirectional,
            num_buckets=num_buckets,
            max_distance=max_distance,
        )
        mismatched = relative[got != expected]
        self.assertEqual(mismatched.tolist(), [])
        # every bucket is used, except "distance 0 after the query" in bidirectional mode
        unused = {num_buckets // 2} if bidirectional else set()
        self.assertEqual(set(got.tolist()), set(range(num_buckets)) - unused)

    @chex.variants(with_jit=True, without_jit=True)
    def test_bias_is_the_table_row_of_each_bucket(self):
        q_positions = np.array([[0, 5, 200], [7, 7, 90]], dtype=np.int32)
        k_positions = np.arange(0, 300, 37, dtype=np.int32)
        got = self.variant(lambda q, k: pe.t5_bias(_T5_TABLE, q, k, bidirectional=False))(
            q_positions, k_positions
        )
        chex.assert_shape(got, (2, H, 3, k_positions.size))
        buckets = t5_bucket_reference(
            k_positions[None, None, :] - q_positions[:, :, None],
            bidirectional=False,
            num_buckets=32,
            max_distance=128,
        )
        expected = np.moveaxis(np.asarray(_T5_TABLE)[buckets], -1, 1)
        np.testing.assert_array_equal(np.asarray(got), expected)


def test_t5_buckets_small_case_by_hand():
    # 8 buckets, bidirectional: 4 per direction; exact distances 0, 1; then
    # floor(2 log(n / 2) / log(20 / 2)) = 0 for n in [2, 6] and 1 from n = 7 (7^2 / 4 >= 10).
    relative = np.arange(-10, 11)
    got = pe.t5_relative_position_bucket(
        relative, bidirectional=True, num_buckets=8, max_distance=20
    )
    expected = [3, 3, 3, 3, 2, 2, 2, 2, 2, 1, 0, 5, 6, 6, 6, 6, 6, 7, 7, 7, 7]
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_t5_causal_mode_puts_future_keys_in_bucket_zero():
    got = pe.t5_relative_position_bucket(np.arange(0, 500), bidirectional=False)
    np.testing.assert_array_equal(np.asarray(got), 0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_buckets": 1}, ValueError, "num_buckets must be an integer >= 2"),
        ({"num_buckets": 2}, ValueError, "num_buckets must be >= 4 for bidirectional"),
        ({"num_buckets": 32.0}, TypeError, "num_buckets must be an integer"),
        ({"max_distance": 8}, ValueError, "max_distance must be greater than the 8"),
        (
            {"num_buckets": 32, "max_distance": 16, "bidirectional": False},
            ValueError,
            "max_distance must be greater than the 16",
        ),
    ],
)
def test_t5_bucket_rejects_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        pe.t5_relative_position_bucket(jnp.arange(4), **kwargs)


def test_t5_causal_mode_allows_two_buckets():
    got = pe.t5_relative_position_bucket(
        np.array([3, 0, -1, -5]), bidirectional=False, num_buckets=2, max_distance=4
    )
    np.testing.assert_array_equal(np.asarray(got), [0, 0, 1, 1])


# Blocks that take each path of `bias._distance_bias`: contiguous (Toeplitz), far apart
# (constant T5 bucket), and layouts that must fall back to the general path.
_BLOCK_LAYOUTS = {
    "contiguous": (np.arange(5, 17)[None], np.arange(0, 9)[None]),
    "contiguous_single_query": (np.array([[300]]), np.arange(280, 310)[None]),
    "contiguous_many_rows": (np.arange(100, 260)[None], np.arange(0, 96)[None]),
    "far_apart": (1000 + np.arange(6)[None], np.arange(10)[None]),
    "far_ahead": (np.arange(6)[None], 700 + np.arange(10)[None]),
    "straddles_max_distance": (np.arange(120, 140)[None], np.arange(0, 12)[None]),
    "gap_in_queries": (np.array([[3, 4, 9, 10]]), np.arange(12)[None]),
    "rows_with_other_offsets": (np.stack([np.arange(4), 50 + np.arange(4)]), np.arange(8)[None]),
    "rows_alike": (np.stack([np.arange(4), np.arange(4)]), np.arange(8)[None]),
    "near_int32_limits": (
        np.array([[2**31 - 3, 2**31 - 2, 2**31 - 1]]),
        np.array([[-(2**31), -(2**31) + 1]]),
    ),
}


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_bias_takes_the_table_row_of_each_bucket_on_every_block_layout(bidirectional):
    table = _normal(7, (32, H))
    bias_fn = jax.jit(functools.partial(pe.t5_bias, bidirectional=bidirectional))
    grad_fn = jax.jit(
        jax.grad(
            lambda table, q, k, w: jnp.sum(pe.t5_bias(table, q, k, bidirectional=bidirectional) * w)
        )
    )
    for name, (q_positions, k_positions) in _BLOCK_LAYOUTS.items():
        relative = k_positions.astype(np.int64)[:, None, :] - q_positions[:, :, None]
        buckets = t5_bucket_reference(
            np.clip(relative, -(2**31) + 1, 2**31 - 1),
            bidirectional=bidirectional,
            num_buckets=32,
            max_distance=128,
        )
        expected = np.moveaxis(np.asarray(table)[buckets], -1, 1)
        q, k = q_positions.astype(np.int32), k_positions.astype(np.int32)
        np.testing.assert_array_equal(np.asarray(bias_fn(table, q, k)), expected, err_msg=name)
        # the gradient of sum(bias * w) sums w over the entries of each bucket
        weights = _normal(8, expected.shape)
        expected_grad = np.zeros((32, H))
        for head in range(H):
            np.add.at(expected_grad[:, head], buckets, np.asarray(weights)[:, head])
        np.testing.assert_allclose(
            np.asarray(grad_fn(table, q, k, weights)),
            expected_grad,
            rtol=1e-5,  # float32 sums of up to ~10^5 weights per bucket
            atol=1e-5,
            err_msg=name,
        )


@pytest.mark.parametrize("shape", [(1, 4), (12, 9), (16, 16), (37, 300), (512, 256)])
def test_diagonal_sums_collect_every_entry_of_each_diagonal(shape):
    # The gradient of the Toeplitz layout: out[h, q - 1 - i + j] sums tile[h, i, j].
    q_len, k_len = shape
    tile = np.random.default_rng(q_len).standard_normal((2, q_len, k_len))
    expected = np.zeros((2, q_len + k_len - 1))
    for i in range(q_len):
        expected[:, q_len - 1 - i : q_len - 1 - i + k_len] += tile[:, i, :]
    got = jax.jit(bias._diagonal_sums)(jnp.asarray(tile, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


_DISTANCE_REFERENCES = {
    "kerple_log": lambda q, k: kerple_reference(q, k, _R1, _R2, variant="log"),
    "kerple_power": lambda q, k: kerple_reference(q, k, _R1, _R2, variant="power"),
    "dpb": lambda q, k: dpb_reference(q, k, _DPB_LAYERS, log_distance=True, absolute=False),
}


@pytest.mark.parametrize("name", sorted(_DISTANCE_REFERENCES))
def test_distance_biases_match_their_reference_on_every_block_layout(name):
    for layout, (q_positions, k_positions) in _BLOCK_LAYOUTS.items():
        if layout == "near_int32_limits":  # distances past 2^31 saturate (tested apart)
            continue
        q, k = q_positions.astype(np.int32), k_positions.astype(np.int32)
        expected = _DISTANCE_REFERENCES[name](q, k)
        got = np.asarray(_JITTED[name](q, k))
        chex.assert_shape(got, expected.shape)
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5, err_msg=layout)


# --------------------------------------------------------------------------- ALiBi


def test_alibi_slopes_match_the_closed_form_for_1_to_64_heads():
    for num_heads in range(1, 65):
        got = pe.alibi_slopes(num_heads)
        assert got.dtype == np.float64 and got.shape == (num_heads,)
        np.testing.assert_allclose(got, alibi_slopes_reference(num_heads), rtol=1e-15)
    # the published 8-head slopes: 1/2, 1/4, ..., 1/256
    np.testing.assert_array_equal(pe.alibi_slopes(8), 0.5 ** np.arange(1, 9))


class AlibiVariantsTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("symmetric", "causal")
    def test_matches_reference(self, form):
        q_positions = np.array([[3, 4, 10**6], [0, 1, 2]], dtype=np.int32)
        k_positions = np.array([[0, 4, 10**6 - 7, 10**6 + 3]], dtype=np.int32)
        slopes = pe.alibi_slopes(6)
        got = self.variant(lambda q, k: pe.alibi_bias(q, k, slopes, form=form))(
            q_positions, k_positions
        )
        chex.assert_shape(got, (2, 6, 3, 4))
        chex.assert_type(got, jnp.float32)
        expected = alibi_reference(
            q_positions, k_positions, slopes, bidirectional=form == "symmetric"
        )
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_causal_row_shift_form_gives_the_same_probabilities(self):
        # softmax is invariant to a per-row constant: -m (i - j) = m j - m i.
        length = 64
        positions = np.arange(length, dtype=np.int32)
        slopes = pe.alibi_slopes(H)
        logits = _normal(0, (1, H, length, length))
        causal = np.tril(np.ones((length, length), bool))

        def probabilities(bias):
            return jax.nn.softmax(jnp.where(causal, logits + bias, -jnp.inf), axis=-1)

        def both(q, k):
            paper = pe.alibi_bias(q, k, slopes)
            row_shift = jnp.asarray(slopes, jnp.float32)[:, None, None] * k.astype(jnp.float32)
            return probabilities(paper), probabilities(row_shift[None])

        paper, row_shift = self.variant(both)(positions, positions)
        np.testing.assert_allclose(np.asarray(paper), np.asarray(row_shift), atol=2e-6)


def test_tensor_parallel_shard_uses_its_slice_of_the_global_slopes():
    total, start, local = 12, 4, 4
    positions = jnp.arange(16)
    full = pe.AlibiBias(total).apply({}, positions, positions)
    shard_slopes = tuple(pe.alibi_slopes(total)[start : start + local])
    shard = pe.AlibiBias(local, slopes=shard_slopes).apply({}, positions, positions)
    np.testing.assert_array_equal(np.asarray(shard), np.asarray(full[:, start : start + local]))
    naive = pe.AlibiBias(local).apply({}, positions, positions)
    assert not np.allclose(np.asarray(naive), np.asarray(shard))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: pe.alibi_slopes(0), ValueError, "num_heads must be a positive integer"),
        (lambda: pe.alibi_slopes(-3), ValueError, "num_heads must be a positive integer"),
        (
            lambda: pe.AlibiBias(0).apply({}, jnp.arange(3), jnp.arange(3)),
            ValueError,
            "num_heads must be a positive integer",
        ),
        (
            lambda: pe.AlibiBias(3, slopes=(0.5, 0.25)).apply({}, jnp.arange(3), jnp.arange(3)),
            ValueError,
            r"slopes must have shape \(3,\)",
        ),
        (
            lambda: pe.alibi_bias(jnp.arange(3), jnp.arange(3), np.array([0.5, -1.0])),
            ValueError,
            "slopes must be finite and > 0",
        ),
        (
            lambda: pe.alibi_bias(jnp.arange(3), jnp.arange(3), np.ones((2, 2))),
            ValueError,
            "slopes must have rank 1",
        ),
    ],
)
def test_alibi_rejects_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


# -------------------------------------------------------------------------- KERPLE


class KerpleVariantsTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("log", "power")
    def test_matches_reference(self, variant):
        q_positions = np.array([[0, 9, 10**6]], dtype=np.int32)
        k_positions = np.array([[0, 1, 9, 10**6 - 300, 10**6]], dtype=np.int32)
        got = self.variant(lambda q, k: pe.kerple_bias(q, k, _R1, _R2, variant=variant))(
            q_positions, k_positions
        )
        chex.assert_shape(got, (1, H, 3, 5))
        expected = kerple_reference(q_positions, k_positions, _R1, _R2, variant=variant)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-6, atol=1e-5)


def test_kerple_initialisation_is_alibi_for_power_and_log_of_alibi_for_log():
    positions = jnp.arange(40)
    slopes = pe.alibi_slopes(H)
    for variant, expected in (
        ("power", alibi_reference(positions, positions, slopes, bidirectional=True)),
        (
            "log",
            kerple_reference(positions, positions, np.ones(H), slopes, variant="log"),
        ),
    ):
        module = pe.KerpleBias(H, variant=variant)
        got = module.apply(_init(module), positions, positions)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


@given(raw=st.floats(-60.0, 60.0), variant=st.sampled_from(bias.KERPLE_VARIANTS))
def test_kerple_constrain_keeps_parameters_in_the_papers_domain(raw, variant):
    r1, r2 = pe.kerple_constrain(jnp.full((2,), raw), jnp.full((2,), raw), variant=variant)
    assert np.all(np.asarray(r1) >= 0) and np.all(np.isfinite(r1))
    assert np.all(np.asarray(r2) >= 0) and np.all(np.isfinite(r2))
    if variant == "power":
        assert np.all(np.asarray(r2) <= 2.0)
    if raw > -20.0:  # away from float32 underflow, strictly positive
        assert np.all(np.asarray(r1) > 0) and np.all(np.asarray(r2) > 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r1": jnp.array([1.0, -1.0])}, "r1 must be finite and > 0"),
        ({"r2": jnp.array([1.0, 2.5]), "variant": "power"}, r"r2 must be in \(0, 2\]"),
        ({"r2": jnp.array([1.0, 0.5, 0.1])}, r"r2 must have shape \(2,\)"),
        ({"variant": "cubic"}, "variant must be one of"),
    ],
)
def test_kerple_rejects_bad_parameters(kwargs, match):
    arguments = {"r1": jnp.array([1.0, 1.0]), "r2": jnp.array([1.0, 1.0]), **kwargs}
    with pytest.raises(ValueError, match=match):
        pe.kerple_bias(jnp.arange(3), jnp.arange(3), **arguments)


# ---------------------------------------------------------------------------- FIRE


class FireVariantsTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_formula_with_query_normalisation(self):
        # queries below the threshold (normaliser psi(L)) and above it (psi(i)).
        q_positions = np.array([[0, 3, 20, 63, 64, 100, 5000, 10**6]], dtype=np.int32)
        k_positions = np.array([[0, 2, 19, 50, 99, 4000, 10**6 - 1]], dtype=np.int32)
        c, threshold = 0.3, 64.0
        got = self.variant(
            lambda q, k: pe.fire_bias(q, k, _FIRE_LAYERS, jnp.float32(c), jnp.float32(threshold))
        )(q_positions, k_positions)
        chex.assert_shape(got, (1, H, 8, 7))
        expected = fire_reference(q_positions, k_positions, _FIRE_LAYERS, c, threshold)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


def test_fire_depends_on_the_query_position_only_beyond_the_threshold():
    fire = _JITTED["fire"]  # threshold 64
    near = np.arange(0, 40)
    far = near + 1000
    # below the threshold the normaliser is fixed: shifting by 10 changes nothing
    np.testing.assert_allclose(fire(near, near), fire(near + 10, near + 10), atol=1e-6)
    # beyond it, the same offsets are compressed by psi(i): the bias changes
    assert not np.allclose(fire(far, far), fire(near, near), atol=1e-3)


def test_fire_module_parameters_are_positive_scale_and_threshold():
    module = pe.FireBias(H, init_c=0.5, init_threshold=100.0)
    params = _init(module)["params"]
    np.testing.assert_allclose(np.exp(params["log_c"]), 0.5, rtol=1e-6)
    np.testing.assert_allclose(np.exp(params["log_threshold"]), 100.0, rtol=1e-6)
    positions = np.arange(120)
    expected = fire_reference(positions, positions, _layers(params, 2), 0.5, 100.0)
    got = module.apply({"params": params}, positions, positions)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"c": -0.1}, "c must be finite and > 0"),
        ({"threshold": 0.0}, "threshold must be finite and > 0"),
        ({"c": jnp.ones(2)}, "c must be a scalar"),
        ({"layers": ()}, "layers must hold at least one"),
        ({"layers": ((jnp.ones((2, 4)), jnp.ones(4)),)}, r"layers\[0\] must be a kernel \[1, n\]"),
    ],
)
def test_fire_rejects_bad_parameters(kwargs, match):
    arguments = {"layers": _FIRE_LAYERS, "c": 0.1, "threshold": 10.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        pe.fire_bias(jnp.arange(3), jnp.arange(3), **arguments)


# --------------------------------------------------------- dynamic position bias


class DynamicPositionBiasVariantsTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(log_distance=(True, False), absolute=(True, False))
    def test_matches_reference(self, log_distance, absolute):
        q_positions = np.array([[0, 5, 31], [3, 3, 3]], dtype=np.int32)
        k_positions = np.arange(0, 40, 3, dtype=np.int32)
        got = self.variant(
            lambda q, k: pe.dynamic_position_bias(
                q, k, _DPB_LAYERS, log_distance=log_distance, absolute=absolute
            )
        )(q_positions, k_positions)
        chex.assert_shape(got, (2, H, 3, k_positions.size))
        expected = dpb_reference(
            q_positions, k_positions, _DPB_LAYERS, log_distance=log_distance, absolute=absolute
        )
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------ shared properties


@given(
    name=st.sampled_from(sorted(TRANSLATION_INVARIANT)),
    shift=st.integers(-(10**6), 10**6),
    start=st.integers(0, 10**6),
)
def test_biases_are_translation_invariant(name, shift, start):
    q_positions = np.array([start, start + 3, start + 40], dtype=np.int32)
    k_positions = np.array([start, start + 1, start + 3, start + 200, start + 41], np.int32)
    bias_fn = _JITTED[name]
    np.testing.assert_allclose(
        bias_fn(q_positions + shift, k_positions + shift),
        bias_fn(q_positions, k_positions),
        rtol=1e-6,
        atol=1e-5,
    )


@pytest.mark.parametrize("name", sorted(ALL_BIASES))
def test_decoding_rows_match_the_full_bias(name):
    length, cache = 48, 40
    positions = jnp.arange(length)
    full = _JITTED[name](positions, positions)
    step = _JITTED[name](positions[cache:][None], positions[None])
    # equal up to float32 rounding (the MLP biases fuse differently for other shapes)
    np.testing.assert_allclose(
        np.asarray(step), np.asarray(full[:, :, cache:]), rtol=1e-5, atol=5e-5
    )


@pytest.mark.parametrize("name", sorted(ALL_BIASES))
def test_biases_are_finite_float32_and_broadcast_the_batch(name):
    q_positions = jnp.array([[0, 1, 2], [10**6, 10**6 + 1, 2**24 - 1]])
    k_positions = jnp.array([0, 7, 10**6, 2**24 - 1])
    got = _JITTED[name](q_positions, k_positions)
    chex.assert_shape(got, (2, H, 3, 4))
    chex.assert_type(got, jnp.float32)
    assert np.all(np.isfinite(np.asarray(got)))
    per_row = _JITTED[name](q_positions[1], k_positions)
    # equal up to float32 rounding for the MLP biases (products of other shapes)
    tolerance = 1e-5 if name.startswith("dpb") else 0.0
    np.testing.assert_allclose(np.asarray(per_row[0]), np.asarray(got[1]), rtol=tolerance)


@pytest.mark.parametrize(
    ("q_positions", "k_positions", "error", "match"),
    [
        (jnp.zeros((2, 3), int), jnp.zeros((3, 3), int), ValueError, "same batch size"),
        (jnp.zeros((1, 2, 3), int), jnp.zeros(3, int), ValueError, "q_positions must have rank"),
        (jnp.zeros(3, int), jnp.zeros(3), TypeError, "k_positions must have an integer dtype"),
    ],
)
@pytest.mark.parametrize("name", ["alibi", "t5", "kerple_log", "dpb", "fire"])
def test_biases_reject_bad_positions(name, q_positions, k_positions, error, match):
    with pytest.raises(error, match=match):
        ALL_BIASES[name](q_positions, k_positions)


# -------------------------------------------------------------- modules, gradients


LEARNED_MODULES = {
    "t5": lambda: pe.T5RelativePositionBias(H, bidirectional=False),
    "kerple_log": lambda: pe.KerpleBias(H, variant="log"),
    "kerple_power": lambda: pe.KerpleBias(H, variant="power"),
    "fire": lambda: pe.FireBias(H, hidden_features=8, init_threshold=16.0),
    "dpb": lambda: pe.DynamicPositionBias(H, hidden_features=8),
}


class GradientVariantsTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_gradients_reach_every_parameter_through_the_closure_in_a_scan(self):
        modules = {name: make() for name, make in LEARNED_MODULES.items()}
        params = {name: _init(module) for name, module in modules.items()}
        positions = jnp.arange(16)
        weights = _normal(1, (H, 16, 16))

        def loss(params, name):
            # attention calls the closure block by block inside lax.scan
            bias_fn = modules[name].apply(params[name], method="bias_fn")

            def block(total, start):
                q_block = jax.lax.dynamic_slice(positions, (start,), (8,))
                w_block = jax.lax.dynamic_slice(weights, (0, start, 0), (H, 8, 16))
                return total + jnp.sum(bias_fn(q_block, positions)[0] * w_block), None

            return jax.lax.scan(block, 0.0, jnp.arange(0, 16, 8))[0]

        def total_loss(params):
            return sum(loss(params, name) for name in modules)

        grads = self.variant(jax.grad(total_loss))(params)
        for path, grad in jax.tree_util.tree_leaves_with_path(grads):
            grad = np.asarray(grad)
            assert np.all(np.isfinite(grad)), path
            assert np.any(grad != 0), path
        for name, module in modules.items():
            full = module.apply(params[name], positions, positions)
            np.testing.assert_allclose(
                float(loss(params, name)), float(jnp.sum(full[0] * weights)), rtol=1e-4
            )


@pytest.mark.parametrize("name", sorted(LEARNED_MODULES))
def test_bias_fn_on_any_block_is_that_block_of_the_whole_bias(name):
    # What blockwise attention relies on: evaluating the closure on a (query block, key
    # block) pair gives exactly that block of the bias over all positions, whatever
    # else the block's neighbours hold.
    module = LEARNED_MODULES[name]()
    params = _perturbed(_init(module))
    bias_fn = module.apply(params, method="bias_fn")
    q_positions = jnp.array([[0, 3, 7, 20, 21, 40], [2, 2, 9, 30, 31, 33]])
    k_positions = jnp.array([[1, 4, 5, 8, 19, 22, 39, 50]])
    whole = np.asarray(bias_fn(q_positions, k_positions))
    for q_block, k_block in ((slice(0, 2), slice(0, 3)), (slice(3, 6), slice(5, 8))):
        np.testing.assert_array_equal(
            np.asarray(bias_fn(q_positions[:, q_block], k_positions[:, k_block])),
            whole[:, :, q_block, k_block],
        )


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (lambda: pe.T5RelativePositionBias(0), "num_heads must be a positive integer"),
        (lambda: pe.T5RelativePositionBias(H, num_buckets=1), "num_buckets must be"),
        (lambda: pe.KerpleBias(-1), "num_heads must be a positive integer"),
        (lambda: pe.KerpleBias(H, variant="exp"), "variant must be one of"),
        (lambda: pe.FireBias(0), "num_heads must be a positive integer"),
        (lambda: pe.FireBias(H, init_threshold=-5.0), "init_threshold must be a finite"),
        (lambda: pe.DynamicPositionBias(H, hidden_features=0), "hidden_features must be"),
    ],
)
def test_modules_reject_bad_configuration(module, match):
    with pytest.raises(ValueError, match=match):
        _init(module())


# ------------------------------------------------------------------------ registry


def _spec(causal=True, **options):
    return pe.EncodingSpec(
        d_model=32, num_heads=H, head_dim=8, max_positions=64, causal=causal, options=options
    )


@pytest.mark.parametrize("name", ["alibi", "t5", "kerple", "fire", "dpb"])
def test_bias_encodings_build_a_module_whose_bias_fn_has_the_protocol_shape(name):
    encoding = pe.get_encoding(name)
    assert encoding.contributes == ("logit_bias",)
    module = encoding.logit_bias(_spec())
    params = module.init(jax.random.key(0), method="bias_fn")
    bias_fn = module.apply(params, method="bias_fn")
    got = bias_fn(jnp.arange(3)[None], jnp.arange(5)[None])
    chex.assert_shape(got, (1, H, 3, 5))


def test_registry_alibi_causal_form_by_name():
    positions = jnp.arange(6)
    alibi = pe.get_encoding("alibi").logit_bias(_spec(alibi={"form": "causal"}))
    expected = alibi_reference(positions, positions, pe.alibi_slopes(H), bidirectional=False)
    np.testing.assert_allclose(np.asarray(alibi.apply({}, positions, positions)), expected)
    assert float(expected[0, 0, 0, 5]) > 0  # the causal form rewards keys after the query


def test_registry_alibi_is_symmetric_by_default_and_t5_direction_follows_spec_causal():
    positions = jnp.arange(6)
    symmetric = alibi_reference(positions, positions, pe.alibi_slopes(H), bidirectional=True)
    for causal in (True, False):
        # Keys after the query are penalised even without a mask, whatever the spec says.
        alibi = pe.get_encoding("alibi").logit_bias(_spec(causal=causal))
        np.testing.assert_allclose(np.asarray(alibi.apply({}, positions, positions)), symmetric)
        t5 = pe.get_encoding("t5").logit_bias(_spec(causal=causal))
        assert t5.bidirectional is (not causal)


def test_registry_options_reach_the_modules():
    kerple = pe.get_encoding("kerple").logit_bias(_spec(kerple={"variant": "power"}))
    assert kerple.variant == "power"
    t5 = pe.get_encoding("t5").logit_bias(_spec(t5={"num_buckets": 16, "max_distance": 64}))
    params = _init(t5)
    assert params["params"]["relative_attention_bias"].shape == (16, H)
    alibi = pe.get_encoding("alibi").logit_bias(_spec(alibi={"slopes": [0.5, 0.25, 0.125, 0.1]}))
    assert alibi.slopes == (0.5, 0.25, 0.125, 0.1)
    fire = pe.get_encoding("fire").logit_bias(_spec(fire={"init_threshold": 32.0}))
    np.testing.assert_allclose(np.exp(_init(fire)["params"]["log_threshold"]), 32.0, rtol=1e-6)
    with pytest.raises(ValueError, match=r"options \['slope'\] are not understood"):
        pe.get_encoding("alibi").logit_bias(_spec(alibi={"slope": 1.0}))


def test_an_absolute_embedding_and_a_bias_combine_without_special_cases():
    parts = pe.resolve("learned+alibi")
    assert [part.contributes for part in parts] == [("input_embedding",), ("logit_bias",)]


# ------------------------------------------------------------------ extreme positions


def test_alibi_never_flips_sign_for_positions_more_than_2_31_apart():
    # int32 k - q wraps for these: 2^31 - 1 - (-2^31) would read as -1.
    q_positions = np.array([[2**31 - 1]], np.int32)
    k_positions = np.array([[-(2**31), 2**31 - 1]], np.int32)
    for form in ("symmetric", "causal"):
        got = np.asarray(pe.alibi_bias(q_positions, k_positions, np.array([0.5]), form=form))
        # The far key saturates at the largest int32 distance: strongly penalised.
        np.testing.assert_allclose(got[0, 0, 0], [-0.5 * (2**31 - 1), 0.0], rtol=1e-7)


def test_t5_bucket_of_the_most_negative_distance_is_the_last_bucket():
    for bidirectional, last in ((True, 15), (False, 31)):
        got = pe.t5_relative_position_bucket(
            jnp.array([-(2**31), -(2**31) + 1], jnp.int32), bidirectional=bidirectional
        )
        np.testing.assert_array_equal(got, [last, last])
    table = jnp.arange(32 * 2, dtype=jnp.float32).reshape(32, 2)
    bias_values = pe.t5_bias(table, np.array([[2**31 - 1]]), np.array([[-(2**31)]]))
    assert np.all(np.isfinite(bias_values))


def test_bias_positions_past_int32_raise_naming_the_argument():
    with pytest.raises(ValueError, match="k_positions must lie in"):
        pe.alibi_bias(np.arange(3), np.array([0, 2**32]), pe.alibi_slopes(2))
