"""Tests for RopeSpec: whole published configs against float64 references of their formulas."""

import copy
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_configs import CONFIGS
from reference_rope import (
    dynamic_ntk_inv_freq,
    linear_inv_freq,
    llama3_inv_freq,
    longrope_attention_factor,
    longrope_inv_freq,
    mrope_band_axes,
    multi_axis_rope_reference,
    plain_inv_freq,
    proportional_inv_freq,
    rope_reference,
    yarn_attention_factor,
    yarn_inv_freq,
)

import jax_posenc as pe
from jax_posenc import nnx as pe_nnx
from jax_posenc import rope
from jax_posenc.rope_spec import RopeSpec

RNG = np.random.default_rng(0)
# Every position up to 8k, and a block around one million.
POSITIONS = np.concatenate([np.arange(8192), 1_000_000 + np.arange(-48, 48)]).astype(np.int32)


def _phi3_factors(name):
    scaling = CONFIGS[name]["rope_scaling"]
    return scaling["short_factor"], scaling["long_factor"]


def _longrope(name, rotary_dim, seq_len):
    short, long = _phi3_factors(name)
    factors = long if seq_len is not None and seq_len > 4096 else short
    return longrope_inv_freq(rotary_dim, 10000.0, factors)


# What each published config means, read off the file by hand and written with the
# references' formulas: (layer_type, head_dim, rotary_dim, layout, inv_freq(seq_len),
# cos/sin factor, attention_scale, mrope sections, interleaved).
EXPECTED = {
    ("llama-3.1-8b", None): (
        128, 128, "half", lambda n: llama3_inv_freq(128, 500000.0, 8.0, 1.0, 4.0, 8192), 1.0,
    ),
    ("llama-4-scout", None): (
        128, 128, "interleaved",
        lambda n: llama3_inv_freq(128, 500000.0, 8.0, 1.0, 4.0, 8192), 1.0,
    ),
    ("qwen2.5-7b-instruct-yarn", None): (
        128, 128, "half", lambda n: yarn_inv_freq(128, 1e6, 4.0, 32768), yarn_attention_factor(4.0),
    ),
    ("qwen3-8b-yarn", None): (
        128, 128, "half", lambda n: yarn_inv_freq(128, 1e6, 4.0, 32768), yarn_attention_factor(4.0),
    ),
    ("deepseek-v3", None): (
        64, 64, "interleaved", lambda n: yarn_inv_freq(64, 10000.0, 40.0, 4096, 32, 1),
        yarn_attention_factor(40.0, 1.0, 1.0),
    ),
    ("gpt-oss-20b", None): (
        64, 64, "half", lambda n: yarn_inv_freq(64, 150000.0, 32.0, 4096, truncate=False),
        yarn_attention_factor(32.0),
    ),
    ("phi-3-mini-128k-instruct", None): (
        96, 96, "half", lambda n: _longrope("phi-3-mini-128k-instruct", 96, n),
        longrope_attention_factor(131072 / 4096, 4096),
    ),
    ("phi-4-mini-instruct", None): (
        128, 96, "half", lambda n: _longrope("phi-4-mini-instruct", 96, n),
        longrope_attention_factor(131072 / 4096, 4096),
    ),
    ("gemma-3-4b-it", "sliding_attention"): (
        256, 256, "half", lambda n: plain_inv_freq(256, 10000.0), 1.0,
    ),
    ("gemma-3-4b-it", "full_attention"): (
        256, 256, "half", lambda n: linear_inv_freq(256, 1e6, 8.0), 1.0,
    ),
    ("gemma-3-4b-it-v4", "sliding_attention"): (
        256, 256, "half", lambda n: plain_inv_freq(256, 10000.0), 1.0,
    ),
    ("gemma-3-4b-it-v4", "full_attention"): (
        256, 256, "half", lambda n: linear_inv_freq(256, 1e6, 8.0), 1.0,
    ),
    ("gemma-4", "sliding_attention"): (
        256, 256, "half", lambda n: plain_inv_freq(256, 10000.0), 1.0,
    ),
    ("gemma-4", "full_attention"): (
        512, 512, "half", lambda n: proportional_inv_freq(512, 1e6, 0.25), 1.0,
    ),
    ("gpt-neox-20b", None): (96, 24, "half", lambda n: plain_inv_freq(24, 10000.0), 1.0),
    ("gpt-j-6b", None): (256, 64, "interleaved", lambda n: plain_inv_freq(64, 10000.0), 1.0),
    ("qwen2-vl-7b-instruct", None): (128, 128, "half", lambda n: plain_inv_freq(128, 1e6), 1.0),
    ("qwen2.5-vl-7b-instruct", None): (128, 128, "half", lambda n: plain_inv_freq(128, 1e6), 1.0),
    ("qwen3-vl-8b-instruct", None): (128, 128, "half", lambda n: plain_inv_freq(128, 5e6), 1.0),
    ("minimax-m2", None): (128, 64, "half", lambda n: plain_inv_freq(64, 5e6), 1.0),
    ("yarn-mistral-7b-128k", None): (
        128, 128, "half", lambda n: yarn_inv_freq(128, 10000.0, 16.0, 8192),
        yarn_attention_factor(16.0),
    ),
    ("llama-2-7b-dynamic", None): (
        128, 128, "half",
        lambda n: dynamic_ntk_inv_freq(128, 10000.0, 2.0, 4096, 4096 if n is None else n), 1.0,
    ),
}  # fmt: skip
CASES = list(EXPECTED)


def _spec(name, layer_type):
    return RopeSpec.from_hf_config(CONFIGS[name], layer_type=layer_type)


def test_every_published_config_has_an_expectation():
    assert {name for name, _ in EXPECTED} == set(CONFIGS)
    assert len(CONFIGS) >= 12


@pytest.mark.parametrize(("name", "layer_type"), CASES)
def test_config_loads_as_published(name, layer_type):
    head_dim, rotary_dim, layout, inv_freq, factor = EXPECTED[name, layer_type]
    spec = _spec(name, layer_type)
    assert (spec.head_dim, spec.rotary_dim, spec.layout) == (head_dim, rotary_dim, layout)
    for seq_len in (None, 4096, 1_000_049):
        got, got_factor = spec.frequencies(seq_len)
        np.testing.assert_allclose(got, inv_freq(seq_len), rtol=1e-12, atol=0)
        np.testing.assert_allclose(got_factor, factor, rtol=1e-13)
    assert hash(spec) == hash(_spec(name, layer_type))


@pytest.mark.parametrize(("name", "layer_type"), CASES)
def test_rotation_matches_the_float64_reference(name, layer_type):
    head_dim, _, layout, inv_freq, factor = EXPECTED[name, layer_type]
    spec = _spec(name, layer_type)
    x = RNG.standard_normal((1, len(POSITIONS), 1, head_dim)).astype(np.float32)
    seq_len = int(POSITIONS.max()) + 1
    want = rope_reference(x, POSITIONS, inv_freq(seq_len), layout=layout, attention_factor=factor)
    got = np.asarray(spec.apply(x, POSITIONS), np.float64)
    # float32 rounding of |x| <~ 5 times the cos/sin factor, nothing more.
    np.testing.assert_allclose(got, want, rtol=0, atol=4e-6 * max(factor, 1.0))

    # Below the original context the length-dependent scalings use their short form.
    short = POSITIONS[:4096]
    want = rope_reference(
        x[:, :4096], short, inv_freq(4096), layout=layout, attention_factor=factor
    )
    np.testing.assert_allclose(spec.apply(x[:, :4096], short), want, rtol=0, atol=4e-6 * factor)


def test_apply_qk_rotates_queries_and_keys_at_their_own_positions():
    spec = _spec("deepseek-v3", None)
    q = RNG.standard_normal((2, 5, 4, 64)).astype(np.float32)
    k = RNG.standard_normal((2, 3, 1, 64)).astype(np.float32)
    q_positions, k_positions = np.arange(7, 12), np.arange(3)
    got_q, got_k = spec.apply_qk(q, k, q_positions, k_positions)
    inv_freq, factor = spec.frequencies()
    for got, x, positions in ((got_q, q, q_positions), (got_k, k, k_positions)):
        want = rope_reference(x, positions, inv_freq, layout="interleaved", attention_factor=factor)
        np.testing.assert_allclose(got, want, atol=2e-6)


def test_deepseek_attention_scale_is_mscale_squared():
    assert _spec("deepseek-v3", None).attention_scale == pytest.approx(
        (0.1 * math.log(40.0) + 1.0) ** 2, rel=1e-15
    )
    # gpt-oss's YaRN has no mscale_all_dim: its factor goes into cos and sin only.
    assert _spec("gpt-oss-20b", None).attention_scale == 1.0
    assert _spec("llama-3.1-8b", None).attention_scale == 1.0


# ---------------------------------------------------------------- multi-axis (M-RoPE)


def _vision_positions(text_before, grid, text_after):
    """Qwen2-VL position ids [3, 1, S]: text, one image (t, h, w grid), then text."""
    t, h, w = grid
    text = np.broadcast_to(np.arange(text_before), (3, text_before))
    image = pe.axial_positions(t, h, w) + text_before
    start = image.max() + 1
    after = np.broadcast_to(np.arange(start, start + text_after), (3, text_after))
    return np.concatenate([text, image, after], axis=1)[:, None, :].astype(np.int32)


@pytest.mark.parametrize(
    ("name", "sections", "interleaved", "base"),
    [
        ("qwen2-vl-7b-instruct", (16, 24, 24), False, 1e6),
        ("qwen2.5-vl-7b-instruct", (16, 24, 24), False, 1e6),
        ("qwen3-vl-8b-instruct", (24, 20, 20), True, 5e6),
    ],
)
def test_mrope_matches_the_reference_on_text_and_image_positions(name, sections, interleaved, base):
    spec = _spec(name, None)
    assert spec.mrope_section == sections and spec.mrope_interleaved == interleaved
    positions = _vision_positions(5, (2, 6, 8), 7)
    positions[:, :, -3:] += 1_000_000  # far positions too
    x = RNG.standard_normal((1, positions.shape[-1], 2, 128)).astype(np.float32)
    want = multi_axis_rope_reference(
        x, positions, plain_inv_freq(128, base), mrope_band_axes(sections, interleaved)
    )
    np.testing.assert_allclose(spec.apply(x, positions), want, rtol=0, atol=4e-6)
    q, k = spec.apply_qk(x, x[:, :4], positions, positions[..., :4])
    np.testing.assert_allclose(q, want, rtol=0, atol=4e-6)
    np.testing.assert_allclose(k, want[:, :4], rtol=0, atol=4e-6)
    # Text positions [S]: every axis the same, i.e. ordinary RoPE.
    text = np.arange(x.shape[1])
    np.testing.assert_allclose(
        spec.apply(x, text), spec.apply(x, np.broadcast_to(text, (3, 1, len(text)))), atol=1e-6
    )


def test_interleaved_bands_alternate_over_the_spectrum():
    axes = rope.multi_axis_band_axes((24, 20, 20), interleaved=True)
    np.testing.assert_array_equal(axes, mrope_band_axes((24, 20, 20), True))
    np.testing.assert_array_equal(axes[:6], [0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(axes[60:], [0, 0, 0, 0])
    np.testing.assert_array_equal(rope.multi_axis_band_axes((2, 3)), [0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="do not fit"):
        rope.multi_axis_band_axes((1, 5), interleaved=True)


def test_axial_positions_enumerate_patches_row_major():
    positions = pe.axial_positions(2, 3)
    np.testing.assert_array_equal(positions, [[0, 0, 0, 1, 1, 1], [0, 1, 2, 0, 1, 2]])
    assert positions.dtype == np.int32
    assert pe.axial_positions(2, 3, 4).shape == (3, 24)
    with pytest.raises(ValueError, match="at least one"):
        pe.axial_positions()


def test_multi_axis_module_is_axial_rope_and_learns_mixed_frequencies():
    sections = (4, 4)
    q = RNG.standard_normal((2, 12, 4, 16)).astype(np.float32)
    k = RNG.standard_normal((2, 12, 2, 16)).astype(np.float32)
    grid = pe.axial_positions(3, 4)[:, None, :]
    fixed = pe.MultiAxisRotaryEmbedding(sections)
    want = pe.apply_multi_axis_rope(q, grid, sections)
    np.testing.assert_array_equal(fixed.apply({}, q, k, grid)[0], want)

    mixed = pe.MultiAxisRotaryEmbedding(sections, learnable_frequencies=True, num_heads=2)
    params = mixed.init(jax.random.key(0), q, k, grid)
    assert params["params"]["frequencies"].shape == (2, 2, 8)
    # Starts as axial RoPE (float32 angles instead of exact ones).
    got_q, got_k = mixed.apply(params, q, k, grid)
    np.testing.assert_allclose(got_q, want, atol=2e-5)
    np.testing.assert_allclose(got_k, pe.apply_multi_axis_rope(k, grid, sections), atol=2e-5)

    # A band that mixes both axes turns by p_row * f_row + p_col * f_col.
    frequencies = RNG.uniform(0.1, 1.0, (2, 2, 8)).astype(np.float32)
    got_q, _ = mixed.apply({"params": {"frequencies": frequencies}}, q, k, grid)
    for head in range(4):
        f = frequencies[:, head // 2]  # query heads share their key/value group's
        angle = grid[0, 0][:, None] * f[0] + grid[1, 0][:, None] * f[1]
        z = (q[:, :, head, :8] + 1j * q[:, :, head, 8:]) * np.exp(1j * angle)
        np.testing.assert_allclose(got_q[:, :, head, :8], z.real, atol=2e-5)

    def loss(frequencies):
        out = mixed.apply({"params": {"frequencies": frequencies}}, q, k, grid)
        return jnp.sum(out[0] * out[1][:, :, :1])

    assert np.all(np.isfinite(jax.grad(loss)(frequencies)))
    assert np.abs(jax.grad(loss)(frequencies)).sum() > 0


def test_multi_axis_module_in_nnx():
    sections = (4, 4)
    q = RNG.standard_normal((1, 6, 2, 16)).astype(np.float32)
    grid = pe.axial_positions(2, 3)[:, None, :]
    module = pe_nnx.MultiAxisRotaryEmbedding(
        sections, learnable_frequencies=True, num_heads=2, head_dim=16
    )
    assert np.shape(module.frequencies[...]) == (2, 2, 8)
    linen = pe.MultiAxisRotaryEmbedding(sections, learnable_frequencies=True, num_heads=2)
    want = linen.apply(linen.init(jax.random.key(0), q, q, grid), q, q, grid)
    np.testing.assert_allclose(module(q, q, grid)[0], want[0], atol=1e-6)
    assert isinstance(module, nnx.Module)
    assert isinstance(pe.MultiAxisRotaryEmbedding(sections), nn.Module)


# ---------------------------------------------------------------- per-layer configs


def test_gemma3_layer_types_give_two_specs():
    sliding = _spec("gemma-3-4b-it", "sliding_attention")
    full = _spec("gemma-3-4b-it", "full_attention")
    assert sliding != full
    assert (sliding.base, sliding.scaling) == (10000.0, None)
    assert (full.base, full.scaling) == (1e6, pe.LinearScaling(8.0))
    for layer_type in ("sliding_attention", "full_attention"):
        assert _spec("gemma-3-4b-it-v4", layer_type) == _spec("gemma-3-4b-it", layer_type)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        (
            "gemma-3-4b-it",
            r"one rope dict per layer type \['full_attention', 'sliding_attention'\]",
        ),
        ("gemma-4", r"one rope dict per layer type \['full_attention', 'sliding_attention'\]"),
        ("gemma-3-4b-it-v4", "rope_local_base_freq"),
    ],
)
def test_per_layer_configs_need_a_layer_type(name, match):
    with pytest.raises(ValueError, match=match):
        RopeSpec.from_hf_config(CONFIGS[name])
    with pytest.raises(ValueError, match="not one of"):
        RopeSpec.from_hf_config(CONFIGS[name], layer_type="chunked_attention")


def test_gemma4_full_layers_rotate_a_quarter_of_a_512_wide_head():
    spec = _spec("gemma-4", "full_attention")
    assert spec.scaling == pe.ProportionalScaling(partial_rotary_factor=0.25)
    inv_freq, _ = spec.frequencies()
    assert np.count_nonzero(inv_freq) == 64 and np.all(inv_freq[64:] == 0)
    # The bands that do not turn leave their features untouched, at the end of each half.
    x = RNG.standard_normal((1, 3, 1, 512)).astype(np.float32)
    out = np.asarray(spec.apply(x, np.array([5, 900, 10**6])))
    for still in (slice(64, 256), slice(320, 512)):
        np.testing.assert_array_equal(out[..., still], x[..., still])
    assert not np.allclose(out[..., :64], x[..., :64])


# ---------------------------------------------------------------- transformers' code


def test_dynamic_ntk_uses_max_position_embeddings_as_transformers_code_does():
    config = copy.deepcopy(CONFIGS["llama-2-7b-dynamic"])
    config["rope_scaling"]["original_max_position_embeddings"] = 1024
    spec = RopeSpec.from_hf_config(config)
    assert spec.scaling == pe.DynamicNTKScaling(2.0, 4096)


def test_longrope_keeps_an_explicit_factor_as_transformers_code_does():
    config = copy.deepcopy(CONFIGS["phi-4-mini-instruct"])
    config["rope_scaling"]["factor"] = 8.0
    spec = RopeSpec.from_hf_config(config)
    assert spec.frequencies()[1] == pytest.approx(longrope_attention_factor(8.0, 4096), rel=1e-15)
    assert _spec("phi-4-mini-instruct", None).scaling.factor == 32.0


def test_phi3_small_mscales_scale_each_regime():
    config = copy.deepcopy(CONFIGS["phi-3-mini-128k-instruct"])
    config["rope_scaling"].update(short_mscale=1.0, long_mscale=1.1902380714238083)
    spec = RopeSpec.from_hf_config(config)
    assert spec.frequencies(4096)[1] == 1.0
    assert spec.frequencies(4097)[1] == 1.1902380714238083
    # Traced lengths choose the factor on the device.
    traced = jax.jit(lambda n: spec.scaling.frequencies(96, 10000.0, n)[1])
    assert float(traced(4096)) == 1.0
    np.testing.assert_allclose(float(traced(5000)), 1.1902380714238083, rtol=1e-7)


def test_top_level_original_length_wins_as_in_transformers():
    config = copy.deepcopy(CONFIGS["qwen3-8b-yarn"])
    config["original_max_position_embeddings"] = 16384
    assert RopeSpec.from_hf_config(config).scaling.original_max_position_embeddings == 16384


# ---------------------------------------------------------------- errors


def _with(name, path, value):
    config = copy.deepcopy(CONFIGS[name])
    target = config
    for key in path[:-1]:
        target = target[key]
    if value is None:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return config


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (
            _with("llama-3.1-8b", ("rope_scaling", "rope_type"), "ntk-by-parts"),
            r"config\['rope_scaling'\]: unknown rope_type 'ntk-by-parts'",
        ),
        (
            _with("llama-3.1-8b", ("rope_scaling", "low_freq_factor"), None),
            r"config\['rope_scaling'\]: rope_type 'llama3' needs keys \['low_freq_factor'\]",
        ),
        (
            _with("qwen3-8b-yarn", ("rope_scaling", "low_freq_factor"), 1.0),
            r"config\['rope_scaling'\] keys \['low_freq_factor'\] are not understood",
        ),
        (
            _with("qwen2-vl-7b-instruct", ("rope_scaling", "mrope_section"), [16, 24, 16]),
            r"config\['rope_scaling'\]\['mrope_section'\] \[16, 24, 16\] sums to 56, but the "
            "rotary dim 128 has 64 bands",
        ),
        (
            _with("phi-4-mini-instruct", ("partial_rotary_factor",), 0.7),
            r"config\['partial_rotary_factor'\] gives a rotary dim of 89 for head_dim=128",
        ),
        (
            _with("gpt-neox-20b", ("rotary_dim",), 32),
            "the rotary width is given twice and disagrees",
        ),
        (
            _with("gemma-4", ("rope_parameters", "full_attention", "rope_type"), "pro"),
            r"config\['rope_parameters'\]\['full_attention'\]: unknown rope_type 'pro'",
        ),
        (_with("gpt-j-6b", ("n_head",), None), "'hidden_size' and 'num_attention_heads'"),
    ],
)
def test_errors_name_the_key_and_the_config_field(config, match):
    layer_type = "full_attention" if "layer_types" in config else None
    with pytest.raises(ValueError, match=match):
        RopeSpec.from_hf_config(config, layer_type=layer_type)


def test_non_strict_reading_warns_about_keys_it_does_not_use():
    config = _with("qwen3-8b-yarn", ("rope_scaling", "low_freq_factor"), 1.0)
    with pytest.warns(UserWarning, match=r"\['low_freq_factor'\] are not understood"):
        spec = RopeSpec.from_hf_config(config, strict=False)
    assert spec == _spec("qwen3-8b-yarn", None)


def test_specs_reject_inconsistent_settings():
    with pytest.raises(ValueError, match="rotary_dim must be <= head_dim"):
        RopeSpec(head_dim=64, rotary_dim=128)
    with pytest.raises(ValueError, match="must sum to rotary_dim / 2 = 32"):
        RopeSpec(head_dim=64, mrope_section=(8, 8))
    with pytest.raises(ValueError, match="needs an mrope_section"):
        RopeSpec(head_dim=64, mrope_interleaved=True)
    with pytest.raises(ValueError, match="has no mrope_section"):
        RopeSpec(head_dim=8).apply(np.ones((1, 2, 1, 8), np.float32), np.zeros((2, 1, 2)))
    with pytest.raises(ValueError, match="head_dim is 8"):
        RopeSpec(head_dim=8).apply(np.ones((1, 2, 1, 16), np.float32), np.arange(2))
    assert RopeSpec(head_dim=64) == RopeSpec(head_dim=64, rotary_dim=64)


def test_spec_is_a_static_argument():
    spec = _spec("qwen3-8b-yarn", None)
    rotate = jax.jit(lambda x, spec: spec.apply(x, np.arange(4)), static_argnames="spec")
    x = np.ones((1, 4, 1, 128), np.float32)
    # Jit may contract x * cos + y * sin into fused multiply-adds: equal to a few ulp.
    np.testing.assert_allclose(
        rotate(x, spec=spec), spec.apply(x, np.arange(4)), rtol=1e-6, atol=1e-7
    )
