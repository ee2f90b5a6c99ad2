"""Tests for the decoder-only transformer: causality, packing, implementations, registry use."""

import dataclasses
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_rope import llama4_query_temperature

import jax_posenc as pe
from jax_posenc import registry
from jax_posenc.model import SelfAttention, Transformer, TransformerConfig

ENCODINGS = pe.available_encodings()
# Combinations: an absolute part with two summed biases, and two summed relative terms.
COMBINATIONS = ("learned+alibi+t5", "shaw+transformer_xl")
IMPLEMENTATIONS = ("xla", "blockwise")
# Encodings attention runs on the xla path only (CoPE: positions summed over whole rows).
XLA_ONLY = tuple(name for name in ENCODINGS if pe.get_encoding(name).contextual_bias is not None)


def tiny_config(encoding: str, **overrides) -> TransformerConfig:
    settings = dict(
        encoding=encoding, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
        max_positions=64, block_size=8,
    )  # fmt: skip
    return TransformerConfig(**{**settings, **overrides})


def init(config: TransformerConfig, seed: int = 0):
    """The model and random parameters (any finite values will do for these properties).

    Shapes come from `jax.eval_shape`, values from NumPy, so no initializer is compiled
    and zero-initialized positional terms (e.g. a T5 table) are non-zero here.
    """
    model = Transformer(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(leaf.dtype)
        if path[-1].key == "scale":
            return 1.0 + 0.1 * noise
        return noise / np.sqrt(leaf.shape[0] if leaf.ndim else 4.0)

    return model, jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize("encoding", ENCODINGS + COMBINATIONS)
def test_no_logit_depends_on_a_later_token_and_implementations_agree(encoding):
    """Changing token t never changes logits before t, for both attention implementations.

    The same batch also checks that blockwise attention and bfloat16 compute give the
    logits of float32 XLA attention.
    """
    length = 16
    _, params = init(tiny_config(encoding))
    tokens = jax.random.randint(jax.random.key(2), (1, length), 0, 256)
    # Row 0 is the original; row t + 1 changes token t only. One batch, so every row
    # goes through exactly the same arithmetic.
    variants = jnp.tile(tokens, (length + 1, 1))
    variants = variants.at[jnp.arange(1, length + 1), jnp.arange(length)].add(1) % 256
    implementations = ("xla",) if encoding in XLA_ONLY else IMPLEMENTATIONS
    models = [Transformer(tiny_config(encoding, attention=i)) for i in implementations]
    models.append(Transformer(tiny_config(encoding, dtype="bfloat16")))
    *outputs, bf16 = map(
        np.asarray, jax.jit(lambda p, t: [m.apply(p, t) for m in models])(params, variants)
    )
    xla, blockwise = outputs[0], outputs[-1]
    for implementation, logits in zip(implementations, outputs, strict=True):
        base, changed = logits[0], logits[1:]
        for t in range(length):
            message = f"{implementation}: token {t}"
            np.testing.assert_array_equal(changed[t, :t], base[:t], err_msg=message)
            assert np.abs(changed[t, t] - base[t]).max() > 1e-4, f"{message} changed nothing"
    np.testing.assert_allclose(blockwise, xla, atol=2e-5)
    assert bf16.dtype == np.float32
    # bf16 keeps 8 bits of mantissa: relative error ~0.4% per operation.
    assert np.abs(bf16 - xla).max() < 0.05 * np.abs(xla).max()


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_packed_documents_get_the_logits_they_get_alone(encoding):
    config = tiny_config(encoding)
    _, params = init(config)
    doc_a, doc_b, junk = (
        jax.random.randint(jax.random.key(i), (n,), 0, 256) for i, n in ((3, 5), (4, 11), (5, 5))
    )
    # Row 0 packs A then B. Rows 1 and 2 start with B and A alone (what follows them
    # cannot matter: causality), so B's and A's logits must match row 0's.
    tokens = jnp.stack(
        [jnp.concatenate(p) for p in ((doc_a, doc_b), (doc_b, junk), (doc_a, doc_b))]
    )
    segment_ids = jnp.asarray([[0] * 5 + [1] * 11, [0] * 11 + [1] * 5, [0] * 16])
    model = Transformer(config)
    logits = jax.jit(model.apply)(params, tokens, segment_ids=segment_ids)
    np.testing.assert_allclose(logits[0, 5:], logits[1, :11], atol=2e-5)
    np.testing.assert_allclose(logits[0, :5], logits[2, :5], atol=2e-5)


def test_default_positions_are_arange():
    model, params = init(tiny_config("learned"))
    tokens = jax.random.randint(jax.random.key(6), (2, 10), 0, 256)
    positions = jnp.asarray([np.arange(10), np.arange(10) + 3])
    default, explicit = jax.jit(
        lambda p, t, positions: (model.apply(p, t), model.apply(p, t, positions))
    )(params, tokens, positions)
    np.testing.assert_allclose(default[0], explicit[0], atol=1e-6)
    assert np.abs(default[1] - explicit[1]).max() > 1e-4


class _SelfOnlyBias(nn.Module):
    """A toy logit bias: -1e9 unless the key is the query itself."""

    def bias_fn(self):
        def bias_fn(q_positions, k_positions):
            same = q_positions[:, None, :, None] == k_positions[:, None, None, :]
            return jnp.where(same, 0.0, -1e9)

        return bias_fn


def test_model_reads_positional_terms_only_from_the_registry(monkeypatch):
    toy = pe.Encoding(name="self_only", description="toy", logit_bias=lambda spec: _SelfOnlyBias())
    monkeypatch.setitem(registry._REGISTRY, "self_only", toy)
    model, params = init(tiny_config("self_only"))
    tokens = jax.random.randint(jax.random.key(7), (1, 12), 0, 256)
    tokens = jnp.concatenate([tokens, tokens.at[0, 4].add(1) % 256])
    a, b = np.asarray(jax.jit(model.apply)(params, tokens))
    # Each position attends only to itself, so only position 4 may change.
    np.testing.assert_array_equal(np.delete(a, 4, axis=0), np.delete(b, 4, axis=0))
    assert np.abs(a[4] - b[4]).max() > 1e-4


def test_combined_biases_add_up():
    """With a zero T5 table, "alibi+t5" is exactly "alibi"; a constant T5 table adds a
    softmax-invariant shift only, so still "alibi"; a varying one changes the logits."""
    combined, params = init(tiny_config("alibi+t5"))
    alone = Transformer(tiny_config("alibi"))
    tokens = jax.random.randint(jax.random.key(8), (2, 12), 0, 256)
    tables = {}
    for layer in ("layers_0", "layers_1"):
        table = params["params"][layer]["attention"].pop("t5_logit_bias")
        tables[layer] = jax.tree.map(jnp.zeros_like, table)
    alone_logits = alone.apply(params, tokens)

    def with_t5(value):
        tree = jax.tree.map(lambda x: x, params)
        for layer, table in tables.items():
            tree["params"][layer]["attention"]["t5_logit_bias"] = jax.tree.map(
                lambda x: x + value, table
            )
        return combined.apply(tree, tokens)

    np.testing.assert_array_equal(with_t5(0.0), alone_logits)
    np.testing.assert_allclose(with_t5(3.0), alone_logits, atol=2e-5)
    assert np.abs(with_t5(jnp.linspace(-3, 3, 32)[:, None]) - alone_logits).max() > 1e-3


def test_config_is_hashable_and_keeps_encoding_options():
    config = tiny_config("sinusoidal", encoding_options={"sinusoidal": {"base": 100.0}})
    assert hash(config) == hash(dataclasses.replace(config))
    assert config.options == {"sinusoidal": {"base": 100.0}}
    assert config.encoding_spec().options == {"sinusoidal": {"base": 100.0}}


def test_encoding_options_reach_the_factory():
    config = tiny_config("sinusoidal", encoding_options={"sinusoidal": {"base": 100.0}})
    model, params = init(config)
    default = Transformer(tiny_config("sinusoidal"))
    tokens = jnp.zeros((1, 6), jnp.int32)
    ours, theirs = jax.jit(lambda p: (model.apply(p, tokens), default.apply(p, tokens)))(params)
    assert np.abs(ours - theirs).max() > 1e-4
    with pytest.raises(ValueError, match="not understood by encoding 'sinusoidal'"):
        init(tiny_config("sinusoidal", encoding_options={"sinusoidal": {"bass": 1.0}}))


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"encoding": "rotary-ish"}, ValueError, "unknown encoding 'rotary-ish'"),
        ({"d_model": 30}, ValueError, "d_model=30 must be divisible by num_heads=4"),
        ({"num_kv_heads": 3}, ValueError, "num_heads=4 must be divisible by num_kv_heads=3"),
        ({"norm": "batchnorm"}, ValueError, "norm must be one of"),
        ({"dtype": "float16"}, ValueError, "dtype must be one of"),
        ({"num_layers": 0}, ValueError, "num_layers must be a positive integer"),
        ({"encoding_options": {"rope": 1}}, TypeError, r"encoding_options\['rope'\]"),
    ],
)
def test_config_rejects_bad_settings(overrides, error, match):
    with pytest.raises(error, match=match):
        tiny_config(**{"encoding": "none", **overrides})


def test_positions_outside_the_configured_range_are_refused():
    model, params = init(tiny_config("none"))
    with pytest.raises(ValueError, match="length 65 but the model was configured for"):
        model.apply(params, jnp.zeros((1, 65), jnp.int32))
    with pytest.raises(ValueError, match=r"got values in \[60, 69\]"):
        model.apply(params, jnp.zeros((1, 10), jnp.int32), jnp.arange(60, 70))
    with pytest.raises(ValueError, match=r"positions must have shape \[10\] or \[2 or 1, 10\]"):
        model.apply(params, jnp.zeros((2, 10), jnp.int32), jnp.arange(9))
    with pytest.raises(TypeError, match="tokens must have an integer dtype"):
        model.apply(params, jnp.zeros((1, 10)))


# ---------------------------------------------------------------- bad inputs and options


def test_tokens_outside_the_vocabulary_raise_naming_tokens():
    model, params = init(tiny_config("rope"))
    for tokens in (jnp.array([[1, 256]]), jnp.array([[-1, 3]])):
        with pytest.raises(ValueError, match=r"tokens must lie in \[0, vocab_size=256\)"):
            model.apply(params, tokens)


def test_positions_past_int32_raise_naming_positions():
    model, params = init(tiny_config("rope"))
    with pytest.raises(ValueError, match="positions must lie in"):
        model.apply(params, jnp.zeros((1, 2), jnp.int32), np.array([[0, 2**31 + 7]]))


def test_empty_token_batches_give_empty_logits():
    model, params = init(tiny_config("rope"))
    assert model.apply(params, jnp.zeros((1, 0), jnp.int32)).shape == (1, 0, 256)
    assert model.apply(params, jnp.zeros((0, 4), jnp.int32)).shape == (0, 4, 256)


def test_encoding_options_are_frozen_hashable_and_checked_by_name():
    options = {
        "rope": {"scaling": {"rope_type": "linear", "factor": 2.0}},
        "alibi": {"slopes": [0.5, 0.25, 0.125, 0.0625]},
    }
    config = tiny_config("rope+alibi", encoding_options=options)
    assert hash(config) == hash(tiny_config("rope+alibi", encoding_options=options))
    assert config.options["alibi"]["slopes"] == (0.5, 0.25, 0.125, 0.0625)
    jax.jit(lambda tokens: init(config)[0].apply(init(config)[1], tokens))(jnp.ones((1, 4), int))
    with pytest.raises(ValueError, match=r"encoding_options for \['rpoe'\] do not belong"):
        tiny_config("rope", encoding_options={"rpoe": {"base": 5e5}})


def _stacked_layers(params, num_layers):
    """Per-layer parameters `layers_i` as the one scanned `layers/block` tree."""
    inner = dict(params["params"])
    layers = [inner.pop(f"layers_{i}") for i in range(num_layers)]
    inner["layers"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    return {"params": inner}


@pytest.mark.parametrize("encoding", ["t5", "rope+alibi", "shaw"])
def test_remat_and_scanned_layers_compute_the_same_logits_and_gradients(encoding):
    base = tiny_config(encoding, attention="blockwise")
    _, params = init(base)
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 256)

    def loss_and_grads(config, params):
        def loss(params):
            return (Transformer(config).apply(params, tokens) ** 2).mean()

        return jax.jit(jax.value_and_grad(loss))(params)

    want_loss, want_grads = loss_and_grads(base, params)
    got_loss, got_grads = loss_and_grads(dataclasses.replace(base, remat=True), params)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got_grads, want_grads)
    stacked = _stacked_layers(params, base.num_layers)
    for flags in ({"scan_layers": True}, {"scan_layers": True, "remat": True}):
        got_loss, got_grads = loss_and_grads(dataclasses.replace(base, **flags), stacked)
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
        want_stacked = _stacked_layers(want_grads, base.num_layers)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got_grads, want_stacked
        )


# ---------------------------------------------------------------- per-layer schedules


def _positional_roles(config, params):
    """`(role, submodule)` of each layer's attention, bound to the model's parameters."""
    layers = []
    for layer in range(config.num_layers):
        variables = {"params": params["params"][f"layers_{layer}"]["attention"]}
        attention = SelfAttention(config, layer).bind(variables)
        layers.append(
            [(role, getattr(attention, name)) for role, name in attention.positional_roles]
        )
    return layers


def test_nope_every_4_layers_get_no_rotation_and_the_llama4_temperature():
    config = tiny_config("rope+nope-every-4", num_layers=8)
    _, params = init(config)
    layers = _positional_roles(config, params)
    for index, roles in enumerate(layers):
        ((role, module),) = roles
        assert role == "qk_transform"
        nope = index in (3, 7)  # layers (i + 1) % 4 == 0, as Llama 4's no_rope_layers
        assert isinstance(module, registry.NopeTemperature if nope else pe.RotaryEmbedding)

    # On a NoPE layer keys are not rotated and queries are only scaled by the temperature.
    positions = np.array([[0, 1, 8190, 8191, 16382, 16383, 10**6, 2**24]])
    q = np.random.default_rng(0).standard_normal((1, 8, 4, 8)).astype(np.float32)
    k = np.random.default_rng(1).standard_normal((1, 8, 2, 8)).astype(np.float32)
    got_q, got_k = layers[3][0][1](q, k, positions, positions)
    np.testing.assert_array_equal(got_k, k)
    want = np.array([llama4_query_temperature(p) for p in positions[0]])
    np.testing.assert_allclose(got_q, q * want[None, :, None, None], rtol=1e-6)
    assert want[2] == 1.0 and want[3] > 1.0  # the first step at p + 1 = floor_scale
    # Options reach the schedule's layers only.
    options = {"nope-every-4": {"floor_scale": 4.0, "attn_scale": 0.5}}
    config = tiny_config("rope+nope-every-4", num_layers=4, encoding_options=options)
    module = _positional_roles(config, init(config)[1])[3][0][1]
    got_q, _ = module(q, k, positions, positions)
    want = [llama4_query_temperature(p, floor_scale=4.0, attn_scale=0.5) for p in positions[0]]
    np.testing.assert_allclose(got_q, q * np.array(want)[None, :, None, None], rtol=1e-6)


def test_schedules_are_listed_apart_and_refuse_scanned_layers():
    assert "nope-every-4" in registry.available_schedules()
    assert "nope-every-4" not in pe.available_encodings()
    with pytest.raises(ValueError, match="scan_layers=True runs one block"):
        tiny_config("rope+nope-every-4", scan_layers=True)
    with pytest.raises(ValueError, match=r"layer must be in \[0, num_layers=2\)"):
        pe.EncodingSpec(d_model=8, num_heads=2, head_dim=4, max_positions=8, layer=2, num_layers=2)


def test_layer_types_give_gemma3_local_and_global_rope():
    types = ("sliding_attention",) * 2 + ("full_attention",)
    by_type = {
        "sliding_attention": {"rope": {"base": 10000.0}},
        "full_attention": {
            "rope": {"base": 1e6, "scaling": {"rope_type": "linear", "factor": 8.0}}
        },
    }
    config = tiny_config("rope", num_layers=3, layer_types=types, layer_encoding_options=by_type)
    assert hash(config) == hash(
        tiny_config("rope", num_layers=3, layer_types=types, layer_encoding_options=by_type)
    )
    _, params = init(config)
    rotations = [roles[0][1] for roles in _positional_roles(config, params)]
    assert [r.base for r in rotations] == [10000.0, 10000.0, 1e6]
    assert [r.scaling for r in rotations] == [None, None, pe.LinearScaling(8.0)]
    # RopeSpec.from_hf_config gives the same pair from a real Gemma 3 config.
    from hf_configs import CONFIGS

    for layer_type, rotation in (
        ("sliding_attention", rotations[0]),
        ("full_attention", rotations[2]),
    ):
        spec = pe.RopeSpec.from_hf_config(CONFIGS["gemma-3-4b-it"], layer_type=layer_type)
        assert (spec.base, spec.scaling) == (rotation.base, rotation.scaling)
    tokens = jnp.ones((1, 6), jnp.int32)
    assert np.all(np.isfinite(Transformer(config).apply(params, tokens)))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"layer_types": ("full_attention",)}, "must name each of the num_layers=2 layers"),
        ({"layer_encoding_options": {"full_attention": {}}}, "needs layer_types"),
        (
            {"layer_types": ("a", "b"), "layer_encoding_options": {"c": {"rope": {}}}},
            r"layer_encoding_options for \['c'\] name no layer type",
        ),
        (
            {"layer_types": ("a", "b"), "layer_encoding_options": {"a": {"alibi": {}}}},
            r"layer_encoding_options\['a'\] for \['alibi'\] do not belong",
        ),
        ({"layer_types": ("a", "b"), "scan_layers": True}, "scan_layers=True runs one block"),
    ],
)
def test_layer_settings_are_checked(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config("rope", **overrides)


def test_a_scheduled_encoding_trains_and_runs_in_the_study(tmp_path):
    from jax_posenc import cli

    tiny = [
        "--steps", "3", "--train-len", "8", "--eval-lens", "8,16", "--d-model", "16",
        "--layers", "4", "--heads", "2", "--batch-size", "4", "--train-bytes", "20000",
        "--heldout-bytes", "5000", "--eval-tokens", "64", "--no-progress",
    ]  # fmt: skip
    out = tmp_path / "study"
    assert cli.main(["study", "--encodings", "rope+nope-every-4", "--out", str(out), *tiny]) == 0
    results = json.loads((out / "results.json").read_text())
    (run,) = results["encodings"]["rope+nope-every-4"]["runs"]
    for losses in run["loss"].values():
        assert all(0 < loss < math.log(256) + 1 for loss in losses.values())
