"""Tests for RoPE scaling specs: frequencies against the published formulas, HF dicts."""

import dataclasses
import math
import typing

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_rope import (
    dynamic_ntk_inv_freq,
    linear_inv_freq,
    llama3_inv_freq,
    longrope_attention_factor,
    longrope_inv_freq,
    ntk_inv_freq,
    plain_inv_freq,
    proportional_inv_freq,
    yarn_attention_factor,
    yarn_inv_freq,
    yarn_ramp_bounds,
)

import jax_posenc as pe
from jax_posenc import rope_scaling

RNG = np.random.default_rng(0)
SHORT = tuple(1.0 + RNG.random(64))
LONG = tuple(1.0 + 40.0 * RNG.random(64))

# (spec, rotary_dim, base, seq_len, reference inv_freq, reference attention factor)
CASES = [
    (pe.LinearScaling(4.0), 128, 10000.0, None, linear_inv_freq(128, 10000.0, 4.0), 1.0),
    (pe.NTKScaling(8.0), 128, 10000.0, None, ntk_inv_freq(128, 10000.0, 8.0), 1.0),
    (
        pe.DynamicNTKScaling(4.0, 2048),
        64,
        10000.0,
        8192,
        dynamic_ntk_inv_freq(64, 10000.0, 4.0, 2048, 8192),
        1.0,
    ),
    (
        pe.YarnScaling(4.0, 32768),
        128,
        1e6,
        None,
        yarn_inv_freq(128, 1e6, 4.0, 32768),
        yarn_attention_factor(4.0),
    ),
    (
        pe.YarnScaling(32.0, 4096, truncate=False),
        64,
        150000.0,
        None,
        yarn_inv_freq(64, 150000.0, 32.0, 4096, truncate=False),
        yarn_attention_factor(32.0),
    ),
    (
        pe.YarnScaling(40.0, 4096, beta_fast=16.0, beta_slow=2.0, mscale=1.0, mscale_all_dim=0.8),
        64,
        10000.0,
        None,
        yarn_inv_freq(64, 10000.0, 40.0, 4096, 16.0, 2.0),
        yarn_attention_factor(40.0, 1.0, 0.8),
    ),
    (
        pe.Llama3Scaling(8.0, 1.0, 4.0, 8192),
        128,
        500000.0,
        None,
        llama3_inv_freq(128, 500000.0, 8.0, 1.0, 4.0, 8192),
        1.0,
    ),
    (
        pe.LongRopeScaling(SHORT, LONG, 4096, factor=32.0),
        128,
        10000.0,
        4096,
        longrope_inv_freq(128, 10000.0, SHORT),
        longrope_attention_factor(32.0, 4096),
    ),
    (
        pe.LongRopeScaling(SHORT, LONG, 4096, factor=32.0),
        128,
        10000.0,
        4097,
        longrope_inv_freq(128, 10000.0, LONG),
        longrope_attention_factor(32.0, 4096),
    ),
    (
        pe.ProportionalScaling(0.25),
        512,
        1e6,
        None,
        proportional_inv_freq(512, 1e6, 0.25),
        1.0,
    ),
    (
        pe.ProportionalScaling(0.3, factor=2.0),
        100,
        10000.0,
        None,
        proportional_inv_freq(100, 10000.0, 0.3, 2.0),
        1.0,
    ),
    (
        pe.LongRopeScaling(SHORT, LONG, 4096, short_mscale=1.0, long_mscale=1.19),
        128,
        10000.0,
        8192,
        longrope_inv_freq(128, 10000.0, LONG),
        1.19,
    ),
]


@pytest.mark.parametrize(("spec", "rotary_dim", "base", "seq_len", "inv_freq", "factor"), CASES)
def test_frequencies_match_the_published_formulas(
    spec, rotary_dim, base, seq_len, inv_freq, factor
):
    got, attention_factor = pe.rope_frequencies(
        rotary_dim, base=base, scaling=spec, seq_len=seq_len
    )
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    np.testing.assert_allclose(got, inv_freq, rtol=1e-13)
    np.testing.assert_allclose(attention_factor, factor, rtol=1e-13)


@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_keeps_fast_pairs_and_interpolates_slow_pairs(truncate):
    spec = pe.YarnScaling(16.0, 2048, truncate=truncate)
    got, _ = pe.rope_frequencies(96, scaling=spec)
    plain = plain_inv_freq(96)
    turns = 2048 * plain / (2 * math.pi)
    np.testing.assert_allclose(got[turns > 32], plain[turns > 32], rtol=1e-14)
    np.testing.assert_allclose(got[turns < 1], plain[turns < 1] / 16.0, rtol=1e-14)
    assert spec.ramp_bounds(96, 10000.0) == yarn_ramp_bounds(96, 10000.0, 2048, 32, 1, truncate)


def test_yarn_explicit_attention_factor_overrides_mscale():
    spec = pe.YarnScaling(8.0, 4096, mscale=0.7, mscale_all_dim=0.7, attention_factor=1.7)
    assert pe.rope_frequencies(16, scaling=spec)[1] == 1.7
    assert pe.rope_frequencies(16, scaling=pe.YarnScaling(0.5, 4096))[1] == 1.0


def test_longrope_attention_factor_defaults():
    assert pe.LongRopeScaling((1.0,), (2.0,), 4096).resolved_attention_factor() == 1.0
    assert pe.LongRopeScaling((1.0,), (2.0,), 4096, factor=0.5).resolved_attention_factor() == 1.0
    spec = pe.LongRopeScaling((1.0,), (2.0,), 4096, attention_factor=1.1, factor=32.0)
    assert spec.resolved_attention_factor() == 1.1


def test_specs_are_hashable_static_arguments():
    first = pe.LongRopeScaling([1.0, 2.0], np.array([3.0, 4.0]), 16)
    second = pe.LongRopeScaling((1.0, 2.0), (3.0, 4.0), 16)
    assert first == second and hash(first) == hash(second)
    assert isinstance(first.short_factor, tuple)

    @chex.assert_max_traces(n=2)
    def rotate(x, scaling):
        return pe.apply_rope(x, jnp.arange(3), scaling=scaling, seq_len=3)

    rotate = jax.jit(rotate, static_argnames="scaling")
    x = jnp.ones((1, 3, 1, 4))
    rotate(x, scaling=first)
    rotate(x, scaling=second)  # equal and equally hashed: no new trace
    rotate(x, scaling=pe.YarnScaling(2.0, 64))
    rotate(x, scaling=pe.YarnScaling(2.0, 64))  # a third trace would raise


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: pe.LinearScaling(0.0), ValueError, "factor must be a finite number > 0"),
        (lambda: pe.NTKScaling(-2.0), ValueError, "factor must be a finite number > 0"),
        (lambda: pe.DynamicNTKScaling(2.0, 0), ValueError, "original_max_position_embeddings"),
        (lambda: pe.YarnScaling(0.0, 64), ValueError, "factor must be a finite number > 0"),
        (lambda: pe.YarnScaling(2.0, 64, beta_fast=1.0), ValueError, "beta_fast must be greater"),
        (lambda: pe.YarnScaling(2.0, 64, mscale=-1.0), ValueError, "mscale must be a finite"),
        (lambda: pe.YarnScaling(2.0, 64, truncate="yes"), TypeError, "truncate must be a bool"),
        (lambda: pe.Llama3Scaling(8.0, 4.0, 1.0, 8192), ValueError, "high_freq_factor must be"),
        (lambda: pe.Llama3Scaling(8.0, 1.0, 4.0, 8192.5), TypeError, "must be an integer"),
        (lambda: pe.LongRopeScaling((1.0, 2.0), (1.0,), 8), ValueError, "same length"),
        (lambda: pe.LongRopeScaling((1.0, 0.0), (1.0, 1.0), 8), ValueError, r"short_factor\[1\]"),
        (lambda: pe.LongRopeScaling((), (), 8), ValueError, "must not be empty"),
        (lambda: pe.LongRopeScaling("1.0", (1.0,), 8), TypeError, "sequence of numbers"),
        (lambda: pe.LinearScaling(True), TypeError, "factor must be a real number"),
        (
            lambda: pe.LongRopeScaling((1.0,), (1.0,), 8, attention_factor=1.1, long_mscale=1.2),
            ValueError,
            "either attention_factor or short_mscale / long_mscale",
        ),
        (lambda: pe.ProportionalScaling(1.5), ValueError, "partial_rotary_factor must be <= 1"),
        (lambda: pe.ProportionalScaling(0.5, 0.0), ValueError, "factor must be a finite"),
    ],
)
def test_specs_reject_bad_values(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: pe.rope_frequencies(2, scaling=pe.NTKScaling(2.0)), "needs rotary_dim > 2"),
        (lambda: pe.rope_frequencies(8, base=1.0, scaling=pe.YarnScaling(2.0, 64)), "base > 1"),
        (lambda: pe.rope_frequencies(8, scaling=pe.LongRopeScaling((1.0,), (1.0,), 8)), "= 4"),
        (lambda: pe.rope_frequencies(7), "rotary_dim must be even"),
        (lambda: pe.rope_frequencies(8, seq_len=0), "seq_len must be a positive integer"),
    ],
)
def test_frequencies_reject_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- HF config dicts


def test_from_hf_follows_transformers_code_where_its_docstrings_differ():
    # Dynamic NTK: the original length is max_position_embeddings, whatever the dict says.
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 1024}
    spec = pe.from_hf_rope_parameters(dynamic, max_position_embeddings=4096)
    assert spec.original_max_position_embeddings == 4096
    # LongRoPE: an explicit factor is kept for the attention factor.
    longrope = {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0], "factor": 8.0}
    spec = pe.from_hf_rope_parameters(
        longrope, max_position_embeddings=131072, original_max_position_embeddings=4096
    )
    assert spec.factor == 8.0
    np.testing.assert_allclose(
        spec.resolved_attention_factor(), longrope_attention_factor(8.0, 4096), rtol=1e-15
    )


def test_from_hf_reads_published_config_dicts():
    llama = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    }
    assert pe.from_hf_rope_parameters(llama) == pe.Llama3Scaling(8.0, 1.0, 4.0, 8192)

    qwen = {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}
    assert pe.from_hf_rope_parameters(qwen) == pe.YarnScaling(4.0, 32768)

    deepseek = {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    }
    spec = pe.from_hf_rope_parameters(deepseek)
    assert spec == pe.YarnScaling(40.0, 4096, mscale=1.0, mscale_all_dim=1.0)
    assert spec.resolved_attention_factor() == 1.0

    gpt_oss = {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    }
    assert not pe.from_hf_rope_parameters(gpt_oss).truncate

    phi3 = {"type": "longrope", "short_factor": list(SHORT[:48]), "long_factor": list(LONG[:48])}
    spec = pe.from_hf_rope_parameters(
        phi3, max_position_embeddings=131072, original_max_position_embeddings=4096
    )
    assert spec.original_max_position_embeddings == 4096 and spec.factor == 32.0
    np.testing.assert_allclose(
        spec.resolved_attention_factor(), longrope_attention_factor(32.0, 4096), rtol=1e-15
    )

    newer = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    assert pe.from_hf_rope_parameters(newer) is None
    assert pe.from_hf_rope_parameters({"type": "linear", "factor": 2.0}) == pe.LinearScaling(2.0)
    dynamic = pe.from_hf_rope_parameters(
        {"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=2048
    )
    assert dynamic == pe.DynamicNTKScaling(2.0, 2048)
    legacy = pe.from_hf_rope_parameters(
        {"type": "su", "short_factor": [1.0], "long_factor": [2.0]}, max_position_embeddings=64
    )
    assert isinstance(legacy, pe.LongRopeScaling)
    yarn_mistral = {
        "factor": 16.0,
        "finetuned": True,
        "original_max_position_embeddings": 8192,
        "type": "yarn",
    }
    assert pe.from_hf_rope_parameters(yarn_mistral) == pe.YarnScaling(16.0, 8192)
    phi3_small = {
        "type": "su",
        "short_factor": [1.0],
        "long_factor": [2.0],
        "short_mscale": 1.0,
        "long_mscale": 1.19,
        "original_max_position_embeddings": 8192,
    }
    spec = pe.from_hf_rope_parameters(phi3_small, max_position_embeddings=131072)
    assert spec.regime_attention_factors() == (1.0, 1.19)
    gemma4 = {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}
    assert pe.from_hf_rope_parameters(gemma4) == pe.ProportionalScaling(0.25)
    with_nulls = {"rope_type": "yarn", "factor": 2.0, "attention_factor": None, "mscale": None}
    assert pe.from_hf_rope_parameters(with_nulls, max_position_embeddings=512) == pe.YarnScaling(
        2.0, 512
    )


@pytest.mark.parametrize(
    ("params", "kwargs", "error", "match"),
    [
        ({"rope_type": "linear", "factor": 2.0, "mscale": 1.0}, {}, ValueError, r"\['mscale'\]"),
        (
            {"rope_type": "yarn", "factor": 2.0, "low_freq_factor": 1.0},
            {"max_position_embeddings": 64},
            ValueError,
            "not understood for rope_type 'yarn'",
        ),
        (
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0},
            {},
            ValueError,
            r"needs keys \['high_freq_factor', 'original_max_position_embeddings'\]",
        ),
        (
            {"rope_type": "mrope", "mrope_section": [16, 24, 24]},
            {},
            ValueError,
            "unknown rope_type",
        ),
        ({"rope_type": "ntk-by-parts", "factor": 2.0}, {}, ValueError, "unknown rope_type"),
        ({"factor": 2.0}, {}, ValueError, "need a 'rope_type'"),
        ({"rope_type": "linear", "type": "yarn", "factor": 2.0}, {}, ValueError, "disagree"),
        ({"rope_type": "yarn", "factor": 2.0}, {}, ValueError, "needs original_max_position"),
        ({"rope_type": "linear", "factor": 0.0}, {}, ValueError, "factor must be a finite"),
        (
            {"rope_type": "default", "partial_rotary_factor": 1.5},
            {},
            ValueError,
            "partial_rotary_factor must be <= 1",
        ),
        ({"rope_type": "default", "rope_theta": -1.0}, {}, ValueError, "rope_theta must be"),
        ([("rope_type", "linear")], {}, TypeError, "params must be a mapping"),
    ],
)
def test_from_hf_rejects_what_it_does_not_understand(params, kwargs, error, match):
    with pytest.raises(error, match=match):
        pe.from_hf_rope_parameters(params, **kwargs)


# ------------------------------------------------------------------ the open protocol


@dataclasses.dataclass(frozen=True)
class _HalvedHighFrequencies:
    """A user's own scaling: every other band at half speed (not a built-in class)."""

    depends_on_seq_len: typing.ClassVar[bool] = False

    def frequencies(self, rotary_dim, base, seq_len=None):
        plain = base ** (-np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
        return plain * np.where(np.arange(rotary_dim // 2) % 2, 0.5, 1.0), 1.0


def test_a_users_own_scaling_works_wherever_a_built_in_one_does():
    x = np.random.default_rng(0).standard_normal((1, 5, 2, 8)).astype(np.float32)
    positions = np.arange(5)
    inv_freq, _ = _HalvedHighFrequencies().frequencies(8, 10000.0)
    want = pe.apply_rope(x, positions, inv_freq=inv_freq)
    np.testing.assert_array_equal(
        pe.apply_rope(x, positions, scaling=_HalvedHighFrequencies()), want
    )
    module = pe.RotaryEmbedding(scaling=_HalvedHighFrequencies())
    q, _ = module.apply({}, x, x, positions)
    np.testing.assert_array_equal(q, want)


def test_objects_that_are_not_scalings_are_refused_naming_what_is_missing():
    with pytest.raises(TypeError, match="needs a frequencies"):
        pe.apply_rope(np.ones((1, 2, 1, 4)), np.arange(2), scaling=object())
    with pytest.raises(TypeError, match="from_hf_rope_parameters"):
        pe.apply_rope(np.ones((1, 2, 1, 4)), np.arange(2), scaling={"rope_type": "linear"})


def test_the_hf_table_is_derived_from_the_classes():
    for cls in rope_scaling.SCALING_TYPES:
        if cls.rope_type is None:
            continue
        fields = {field.name for field in dataclasses.fields(cls)}
        assert cls.hf_required <= fields
        required = {key: 2.0 for key in cls.hf_required}
        for key in ("short_factor", "long_factor"):
            if key in required:
                required[key] = [1.0, 2.0]
        if "original_max_position_embeddings" in required:
            required["original_max_position_embeddings"] = 64
        if cls is rope_scaling.Llama3Scaling:
            required.update(low_freq_factor=1.0, high_freq_factor=4.0)
        spec = pe.from_hf_rope_parameters(
            {"rope_type": cls.rope_type, **required}, max_position_embeddings=64
        )
        assert type(spec) is cls


def test_register_scaling_adds_a_users_rope_type():
    @dataclasses.dataclass(frozen=True)
    class Stretched:
        factor: float
        rope_type: typing.ClassVar[str] = "test-stretched"
        hf_required: typing.ClassVar[frozenset] = frozenset({"factor"})
        depends_on_seq_len: typing.ClassVar[bool] = False

        def frequencies(self, rotary_dim, base, seq_len=None):
            return rope_scaling.default_frequencies(rotary_dim, base) / self.factor, 1.0

    rope_scaling.register_scaling(Stretched)
    try:
        spec = pe.from_hf_rope_parameters({"rope_type": "test-stretched", "factor": 3.0})
        assert spec == Stretched(3.0)
        with pytest.raises(ValueError, match="not understood"):
            pe.from_hf_rope_parameters({"rope_type": "test-stretched", "factor": 3.0, "x": 1})
    finally:
        del rope_scaling._HF_TYPES["test-stretched"]
