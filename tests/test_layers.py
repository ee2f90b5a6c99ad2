"""The encodings inside Flax's own attention layers, with Flax's own masks and decode path.

`make_attention_fn` (linen and NNX for parameter-free encodings) and
`jax_posenc.nnx.AttentionFn` (NNX with learned encodings) plugged into
`flax.linen.MultiHeadDotProductAttention` / `flax.nnx.MultiHeadAttention`:

* a float mask from `nn.make_causal_mask` gives the same output as a boolean one;
* `decode=True`, one token at a time through Flax's cache, equals the full causal pass;
* decoding stays exact at positions far past any training length.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_posenc as pe
from jax_posenc import nnx as pe_nnx

BATCH, LENGTH, FEATURES, HEADS = 2, 8, 16, 2
ENCODINGS = ("rope", "alibi", "t5", "xpos")
_X = jax.random.normal(jax.random.key(1), (BATCH, LENGTH, FEATURES))
_FLOAT_MASK = nn.make_causal_mask(_X[..., 0])  # float32 [B, 1, L, L], as Flax makes it


def _perturbed(tree, seed=0):
    leaves, structure = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), max(1, len(leaves)))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=False)]
    return jax.tree.unflatten(structure, noisy)


def _linen_layer(encoding, decode=False, **kwargs):
    return nn.MultiHeadDotProductAttention(
        num_heads=HEADS,
        qkv_features=FEATURES,
        attention_fn=pe.make_attention_fn(encoding, **kwargs),
        decode=decode,
    )


def _linen_decode(layer, params, x):
    cache = layer.init(jax.random.key(0), x)["cache"]

    @jax.jit
    def step(cache, x_t):
        out, updated = layer.apply({"params": params, "cache": cache}, x_t, mutable=["cache"])
        return out, updated["cache"]

    outputs = []
    for t in range(x.shape[1]):
        out, cache = step(cache, x[:, t : t + 1])
        outputs.append(out)
    return jnp.concatenate(outputs, axis=1)


def _causal_reference(x, params, encoding, positions):
    """The same layer without Flax's cache: one causal pass at explicit positions."""
    layer = _linen_layer(encoding, q_positions=positions, k_positions=positions)
    return layer.apply({"params": params}, x, mask=_FLOAT_MASK)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_linen_float_and_boolean_masks_agree_and_decoding_equals_the_full_pass(encoding):
    layer = _linen_layer(encoding)
    params = _perturbed(jax.jit(layer.init)(jax.random.key(0), _X, mask=_FLOAT_MASK)["params"])
    full = jax.jit(layer.apply)({"params": params}, _X, mask=_FLOAT_MASK)
    boolean = jax.jit(layer.apply)({"params": params}, _X, mask=_FLOAT_MASK.astype(bool))
    np.testing.assert_array_equal(full, boolean)
    # Without a mask nothing is causal: the first token sees the future, so it differs.
    unmasked = jax.jit(layer.apply)({"params": params}, _X)
    assert float(jnp.abs(unmasked[:, 0] - full[:, 0]).max()) > 1e-3
    decoded = _linen_decode(_linen_layer(encoding, decode=True), params, _X)
    np.testing.assert_allclose(decoded, full, atol=2e-6)


@pytest.mark.parametrize("encoding", ["alibi", "t5"])
def test_linen_blockwise_with_flax_masks_and_half_row_visits_equals_xla(encoding):
    # Flax's causal mask combined with a padding mask (the second sequence has 5 tokens),
    # through blockwise query blocks of 4 over key blocks of 2: the schedule comes from
    # the mask array and visits the live half of diagonal pairs. Output and parameter
    # gradients equal the xla path.
    valid = np.arange(LENGTH)[None, :] < np.array([[LENGTH], [5]])
    mask = nn.combine_masks(_FLOAT_MASK, nn.make_attention_mask(valid, valid))
    layers = {
        name: _linen_layer(encoding, implementation=name, **extra)
        for name, extra in (("xla", {}), ("blockwise", {"block_size": (4, 2)}))
    }
    params = _perturbed(jax.jit(layers["xla"].init)(jax.random.key(0), _X, mask=mask)["params"])

    def run(name):
        def loss(params):
            out = layers[name].apply({"params": params}, _X, mask=mask)
            return jnp.sum(out * jnp.cos(jnp.arange(out.size)).reshape(out.shape)), out

        return jax.jit(jax.grad(loss, has_aux=True))(params)

    (grads_xla, out_xla), (grads_blockwise, out_blockwise) = run("xla"), run("blockwise")
    np.testing.assert_allclose(out_blockwise, out_xla, atol=2e-6)
    for got, want in zip(jax.tree.leaves(grads_blockwise), jax.tree.leaves(grads_xla), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("encoding", ["rope", "xpos", "alibi"])
def test_linen_decoding_far_from_zero_matches_the_full_pass_at_those_positions(encoding):
    # Keys at positions 10^9 .. 10^9 + L - 1: the query's position is read from the mask
    # Flax passes (the last key it may see), so decoding needs no position argument.
    positions = 10**9 + np.arange(LENGTH, dtype=np.int32)
    layer = _linen_layer(encoding, decode=True, k_positions=positions)
    params = _perturbed(
        jax.jit(_linen_layer(encoding).init)(jax.random.key(0), _X, mask=_FLOAT_MASK)["params"]
    )
    decoded = _linen_decode(layer, params, _X)
    assert np.all(np.isfinite(decoded))
    want = _causal_reference(_X, params, encoding, positions)
    np.testing.assert_allclose(decoded, want, atol=2e-6)
    # Translation invariance: the same scores as at positions 0 .. L - 1.
    np.testing.assert_allclose(
        decoded, _causal_reference(_X, params, encoding, np.arange(LENGTH)), atol=5e-5
    )


def _nnx_layer(encoding, seed=0):
    rngs = nnx.Rngs(seed)
    attention_fn = pe_nnx.AttentionFn(
        encoding, num_heads=HEADS, head_dim=FEATURES // HEADS, rngs=rngs
    )
    layer = nnx.MultiHeadAttention(
        num_heads=HEADS, in_features=FEATURES, qkv_features=FEATURES, decode=False,
        attention_fn=attention_fn, rngs=rngs,
    )  # fmt: skip
    return layer, attention_fn


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_nnx_float_and_boolean_masks_agree_and_decoding_equals_the_full_pass(encoding):
    layer, attention_fn = _nnx_layer(encoding)
    params = nnx.state(attention_fn, nnx.Param)
    nnx.update(attention_fn, _perturbed(params))
    full = nnx.jit(lambda layer, x: layer(x, mask=_FLOAT_MASK))(layer, _X)
    boolean = nnx.jit(lambda layer, x: layer(x, mask=_FLOAT_MASK.astype(bool)))(layer, _X)
    np.testing.assert_array_equal(full, boolean)
    layer.init_cache((BATCH, LENGTH, FEATURES))
    step = nnx.jit(lambda layer, x_t: layer(x_t, decode=True))
    decoded = jnp.concatenate([step(layer, _X[:, t : t + 1]) for t in range(LENGTH)], axis=1)
    np.testing.assert_allclose(decoded, full, atol=2e-6)


def test_nnx_learned_encoding_parameters_are_trained_with_the_layer():
    layer, _ = _nnx_layer("t5")

    def loss(layer):
        return (layer(_X, mask=_FLOAT_MASK) ** 2).sum()

    grads = nnx.grad(loss)(layer)
    (table_grad,) = jax.tree.leaves(nnx.state(grads.attention_fn, nnx.Param))
    assert table_grad.shape == (32, HEADS)
    assert float(jnp.abs(table_grad).max()) > 1e-4


def test_nnx_and_linen_learned_encoding_agree_on_the_same_table():
    # The NNX layer with T5 equals the linen layer given the same weights.
    nnx_layer, attention_fn = _nnx_layer("t5")
    table = 0.3 * jax.random.normal(jax.random.key(4), (32, HEADS))
    nnx.update(attention_fn, jax.tree.map(lambda _: table, nnx.state(attention_fn, nnx.Param)))
    got = nnx_layer(_X, mask=_FLOAT_MASK)
    linen = _linen_layer("t5")
    params = linen.init(jax.random.key(0), _X, mask=_FLOAT_MASK)["params"]
    for part in ("query", "key", "value", "out"):
        module = getattr(nnx_layer, part)
        shape = params[part]["kernel"].shape
        params[part] = {
            "kernel": module.kernel[...].reshape(shape),
            "bias": module.bias[...].reshape(params[part]["bias"].shape),
        }
    (bias_name,) = [name for name in params if name.startswith("T5")]
    params[bias_name] = {"relative_attention_bias": table}
    np.testing.assert_allclose(
        got, linen.apply({"params": params}, _X, mask=_FLOAT_MASK), atol=2e-6
    )
