"""Positions that depend on content or context: the token-bias protocol, FoX,
randomized positions, SelfExtend and CoPE."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.extend import core as jex_core
from reference_attention import attention_reference
from reference_content import (
    causal_allowed,
    cope_attention_reference,
    cope_bias_reference,
    cope_positions_reference,
    forget_gates_reference,
    forgetting_bias_reference,
    fox_attention_reference,
    numerical_gradient,
    self_extend_logits_reference,
)

import jax_posenc as pe
from jax_posenc import _protocols, content

IMPLEMENTATIONS = ("xla", "blockwise")


def _normal(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _cotangent(shape):
    return jnp.sin(jnp.arange(np.prod(shape), dtype=jnp.float32)).reshape(shape)


def _relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


# ---------------------------------------------------------------- the protocol


def _dot_bias(weights):
    """A token bias with pytree values, a feature axis and a closed-over parameter."""

    def fn(query_values, key_values):
        (q_features,), (k_features, k_scalar) = query_values, key_values
        dots = jnp.einsum("bhqf,bhkf->bhqk", q_features, k_features)
        return weights[None, :, None, None] * dots + k_scalar[..., None, :]

    return fn


@pytest.mark.parametrize(
    ("q_len", "k_len", "causal"), [(13, 13, True), (7, 11, False)], ids=["self", "cross"]
)
def test_token_bias_blockwise_matches_xla_with_every_gradient(q_len, k_len, causal):
    batch, heads, kv_heads, dim = 2, 4, 2, 8
    q = _normal(0, (batch, q_len, heads, dim))
    k, v = _normal(1, (batch, k_len, kv_heads, dim)), _normal(2, (batch, k_len, kv_heads, dim))
    q_features = _normal(3, (batch, heads, q_len, 3))
    k_features = _normal(4, (1, heads, k_len, 3))  # broadcast over the batch
    k_scalar = _normal(5, (batch, 1, k_len))  # broadcast over the heads
    weights = _normal(6, (heads,))
    kwargs = {"causal": causal}
    if not causal:
        kwargs["mask"] = np.random.default_rng(7).random((batch, 1, q_len, k_len)) > 0.3
        kwargs["q_positions"] = 3 + np.arange(q_len, dtype=np.int32)

    def loss(q, k, v, q_features, k_features, k_scalar, weights, implementation):
        bias = pe.TokenBias((q_features,), (k_features, k_scalar), _dot_bias(weights))
        out = pe.dot_product_attention(
            q, k, v, token_bias=bias, implementation=implementation, block_size=(4, 3), **kwargs
        )
        return (out * _cotangent(out.shape)).sum(), out

    args = (q, k, v, q_features, k_features, k_scalar, weights)
    grad = jax.grad(loss, argnums=tuple(range(7)), has_aux=True)
    want = grad(*args, "xla")
    got = jax.jit(grad, static_argnums=7)(*args, "blockwise")
    for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert got_leaf.shape == want_leaf.shape
        assert _relative_error(got_leaf, want_leaf) < 2e-5
    # Every value, broadcast or not, receives a gradient.
    assert all(float(jnp.abs(g).max()) > 1e-3 for g in want[0][3:])


def test_token_bias_gradients_are_the_row_and_column_sums_of_the_logit_gradients():
    q = k = v = _normal(0, (1, 16, 2, 4))
    c_q, c_k = _normal(1, (1, 2, 16)), _normal(2, (1, 2, 16))

    def attend(c_q, c_k, extra_bias, implementation):
        bias = pe.TokenBias(c_q, c_k, content.forgetting_logit_bias)
        out = pe.dot_product_attention(
            q, k, v, token_bias=bias, bias_fn=extra_bias, causal=True,
            implementation=implementation, block_size=4,
        )  # fmt: skip
        return (out * _cotangent(out.shape)).sum()

    d_c_q, d_c_k = jax.grad(attend, (0, 1))(c_q, c_k, None, "blockwise")
    # The materialized logit gradient, as the gradient of an added zero bias.
    d_logits = jax.grad(lambda z: attend(c_q, c_k, lambda qp, kp: z, "xla"))(
        jnp.zeros((1, 2, 16, 16))
    )
    np.testing.assert_allclose(d_c_q, d_logits.sum(-1), atol=1e-6)
    np.testing.assert_allclose(d_c_k, -d_logits.sum(-2), atol=1e-6)


def _largest_intermediate(jaxpr) -> int:
    """The size of the largest array any equation of `jaxpr` (or its sub-jaxprs) makes."""
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
        for sub in jex_core.jaxprs_in_params(eqn.params):
            largest = max(largest, _largest_intermediate(sub))
    return largest


def test_blockwise_token_bias_and_its_gradients_never_form_a_length_squared_array():
    length, block = 256, 16
    q = k = v = _normal(0, (1, length, 1, 4))
    x = _normal(1, (1, length, 4))

    def loss(q, k, v, kernel, bias):
        token_bias = pe.forgetting_bias(pe.log_forget_gates(x, kernel, bias))
        out = pe.dot_product_attention(
            q, k, v, token_bias=token_bias, causal=True, implementation="blockwise",
            block_size=block,
        )  # fmt: skip
        return out.sum()

    args = (q, k, v, _normal(2, (4, 1)), jnp.zeros((1,)))
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args)
    assert _largest_intermediate(jaxpr.jaxpr) < length * length // 8


def test_token_biases_add_up_when_combined():
    first = pe.TokenBias(
        jnp.ones((1, 1, 2)), 2 * jnp.ones((1, 1, 3)), content.forgetting_logit_bias
    )
    second = pe.TokenBias(
        jnp.zeros((1, 1, 2)), jnp.ones((1, 1, 3)), lambda qv, kv: qv[..., None] * kv[..., None, :]
    )
    terms = pe.combine(
        [pe.PositionalTerms(token_bias=first), pe.PositionalTerms(token_bias=second)]
    )
    combined = terms.token_bias
    bias = combined.fn(combined.query_values, combined.key_values)
    np.testing.assert_array_equal(bias, np.full((1, 1, 2, 3), -1.0))


def test_token_bias_arguments_are_checked():
    q = k = v = jnp.zeros((1, 5, 2, 4))
    good = jnp.zeros((1, 2, 5))
    with pytest.raises(TypeError, match="token_bias must be a TokenBias"):
        pe.dot_product_attention(q, k, v, token_bias=(good, good, lambda a, b: a))
    with pytest.raises(ValueError, match=r"token_bias.key_values arrays must have shape"):
        pe.dot_product_attention(q, k, v, token_bias=pe.TokenBias(good, good[..., :4], print))
    with pytest.raises(TypeError, match=r"token_bias\.query_values"):
        bad = pe.TokenBias(jnp.zeros((1, 2, 5), jnp.int32), good, print)
        pe.dot_product_attention(q, k, v, token_bias=bad)
    with pytest.raises(ValueError, match=r"token_bias\.fn must return an array broadcastable"):
        bias = pe.TokenBias(good, good, lambda qv, kv: qv)
        pe.dot_product_attention(q, k, v, token_bias=bias, implementation="xla")


def test_a_token_bias_module_needs_the_layers_tokens():
    gate = pe.ForgettingGate(2)
    with pytest.raises(ValueError, match="reads the layer's tokens: terms_of needs a TokenContext"):
        _protocols.terms_of("token_bias", gate)


# ---------------------------------------------------------------- FoX against float64


FOX_SEGMENTS = np.array([[0] * 5 + [1] * 8, [3] * 13], np.int32)


def _fox_case():
    batch, length, heads, kv_heads, dim, features = 2, 13, 4, 2, 8, 6
    q = _normal(10, (batch, length, heads, dim))
    k, v = _normal(11, (batch, length, kv_heads, dim)), _normal(12, (batch, length, kv_heads, dim))
    x = _normal(13, (batch, length, features))
    kernel, bias = _normal(14, (features, heads), 0.5), _normal(15, (heads,)) + 1.0
    return q, k, v, x, kernel, bias


def _fox_loss(implementation, segment_ids):
    def loss(q, k, v, x, kernel, bias):
        token_bias = pe.forgetting_bias(pe.log_forget_gates(x, kernel, bias), segment_ids)
        out = pe.dot_product_attention(
            q, k, v, token_bias=token_bias, causal=True, segment_ids=segment_ids,
            implementation=implementation, block_size=(4, 3),
        )  # fmt: skip
        return (out * _cotangent(out.shape)).sum(), out

    return loss


@pytest.mark.parametrize("packed", [False, True], ids=["one-document", "packed"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_fox_matches_the_float64_formula_with_gate_parameter_gradients(implementation, packed):
    q, k, v, x, kernel, bias = _fox_case()
    segment_ids = FOX_SEGMENTS if packed else None
    loss = _fox_loss(implementation, segment_ids)
    grads, out = jax.jit(jax.grad(loss, argnums=(3, 4, 5), has_aux=True))(q, k, v, x, kernel, bias)

    arrays = [np.asarray(a, np.float64) for a in (q, k, v, x, kernel, bias)]
    cotangent = np.asarray(_cotangent(out.shape), np.float64)

    def reference_loss(x, kernel, bias):
        want = fox_attention_reference(*arrays[:3], x, kernel, bias, segment_ids)
        return float((want * cotangent).sum())

    want_out = fox_attention_reference(*arrays, segment_ids)
    assert _relative_error(out, want_out) < 2e-6
    want_kernel = numerical_gradient(lambda w: reference_loss(arrays[3], w, arrays[5]), arrays[4])
    want_bias = numerical_gradient(lambda b: reference_loss(arrays[3], arrays[4], b), arrays[5])
    assert _relative_error(grads[1], want_kernel) < 2e-5
    assert _relative_error(grads[2], want_bias) < 2e-5
    # The gate's input gets its gradient too (checked on one token's features).
    want_x = numerical_gradient(
        lambda row: reference_loss(_with_row(arrays[3], (1, 7), row), arrays[4], arrays[5]),
        arrays[3][1, 7],
    )
    assert _relative_error(grads[0][1, 7], want_x) < 2e-5


def _with_row(x, index, row):
    x = x.copy()
    x[index] = row
    return x


def test_forget_cumsum_restarts_at_each_segment_and_gives_the_pairwise_sums():
    log_forget = jax.nn.log_sigmoid(_normal(20, (2, 3, 13)))
    want = forgetting_bias_reference(log_forget, FOX_SEGMENTS)
    cumsum = pe.forget_cumsum(log_forget, FOX_SEGMENTS)
    np.testing.assert_allclose(cumsum[0, :, 5], log_forget[0, :, 5], rtol=1e-6)  # restarted
    got = np.asarray(content.forgetting_logit_bias(cumsum, cumsum))
    allowed = np.broadcast_to(causal_allowed(13, FOX_SEGMENTS), want.shape)
    np.testing.assert_allclose(got[allowed], want[allowed], atol=2e-6)


def test_forgetting_gate_module_materializes_the_reference_bias():
    x = _normal(21, (2, 9, 5))
    gate = pe.ForgettingGate(3)
    params = gate.init(jax.random.key(0), x)["params"]
    assert {name: p.shape for name, p in params.items()} == {"kernel": (5, 3), "bias": (3,)}
    longer = pe.ForgettingGate(3, kernel_stddev=0.0, initial_bias=2.0).init(jax.random.key(0), x)
    np.testing.assert_array_equal(longer["params"]["bias"], [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(longer["params"]["kernel"], np.zeros((5, 3)))
    params = {"kernel": _normal(22, (5, 3)), "bias": _normal(23, (3,))}
    got = gate.apply({"params": params}, x)
    log_forget = forget_gates_reference(x, params["kernel"], params["bias"])
    want = forgetting_bias_reference(log_forget)
    allowed = np.broadcast_to(causal_allowed(9), want.shape)
    np.testing.assert_allclose(np.asarray(got)[allowed], want[allowed], atol=3e-6)


def test_a_query_after_its_keys_reads_the_cumsum_at_its_own_position():
    """Decoding: one query at position t over all keys gives row t of the full pass."""
    length = 11
    q, k, v = (_normal(seed, (1, length, 2, 4)) for seed in (30, 31, 32))
    log_forget = jax.nn.log_sigmoid(_normal(33, (1, 2, length)))
    positions = jnp.arange(length, dtype=jnp.int32)
    full = pe.dot_product_attention(
        q, k, v, token_bias=pe.forgetting_bias(log_forget), causal=True, implementation="xla"
    )
    for t in (0, 6, length - 1):
        bias = pe.forgetting_bias(
            log_forget, q_positions=positions[t : t + 1], k_positions=positions
        )
        for implementation in IMPLEMENTATIONS:
            one = pe.dot_product_attention(
                q[:, t : t + 1], k, v, token_bias=bias, causal=True,
                q_positions=positions[t : t + 1], implementation=implementation, block_size=4,
            )  # fmt: skip
            np.testing.assert_allclose(one[:, 0], full[:, t], atol=2e-6)
    before = pe.forgetting_bias(log_forget, q_positions=[-1], k_positions=positions)
    np.testing.assert_array_equal(before.query_values, 0.0)  # no key at or before it


# ---------------------------------------------------------------- registry, layers, model


def test_fox_is_registered_as_a_causal_only_token_bias():
    encoding = pe.get_encoding("fox")
    assert encoding.contributes == ("token_bias",) and encoding.causal_only
    spec = pe.EncodingSpec(d_model=16, num_heads=2, head_dim=8, max_positions=32, causal=False)
    with pytest.raises(ValueError, match="'fox' is causal-only"):
        pe.registry.attention_modules("fox", spec)
    roles = pe.registry.attention_modules("fox+rope", dataclasses.replace(spec, causal=True))
    assert [(name, role) for name, role, _ in roles] == [
        ("fox", "token_bias"),
        ("rope", "qk_transform"),
    ]


def test_fox_inside_flax_attention_reads_the_projected_keys():
    layer = nn.MultiHeadDotProductAttention(
        num_heads=4, qkv_features=32, attention_fn=pe.make_attention_fn("fox", block_size=4)
    )
    x = _normal(40, (2, 10, 16))
    mask = nn.make_causal_mask(x[..., 0])
    params = layer.init(jax.random.key(0), x, mask=mask)["params"]
    gate = params["ForgettingGate_0"]
    assert gate["kernel"].shape == (32, 4) and gate["bias"].shape == (4,)  # [Hkv * D, H]
    gate = {"kernel": _normal(41, (32, 4)), "bias": _normal(42, (4,))}
    params = {**params, "ForgettingGate_0": gate}
    got = layer.apply({"params": params}, x, mask=mask)

    def project(name, inputs):
        kernel = params[name]["kernel"]
        return jnp.einsum("bsf,fhd->bshd", inputs, kernel) + params[name]["bias"]

    q, k, v = (project(name, x) for name in ("query", "key", "value"))
    log_forget = pe.log_forget_gates(k.reshape(2, 10, 32), gate["kernel"], gate["bias"])
    out = pe.dot_product_attention(
        q, k, v, token_bias=pe.forgetting_bias(log_forget), causal=True, implementation="xla"
    )
    want = jnp.einsum("bshd,hdf->bsf", out, params["out"]["kernel"]) + params["out"]["bias"]
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("encoding", ["fox", "fox+rope"])
def test_a_tiny_model_with_fox_learns(encoding):
    config = pe.TransformerConfig(
        encoding=encoding, d_model=32, num_layers=1, num_heads=2, max_positions=32,
        attention="blockwise", block_size=8,
    )  # fmt: skip
    model = pe.Transformer(config)
    # A repeating pattern with packed documents: predictable only from the context.
    tokens = jnp.asarray(np.tile(np.arange(8), (4, 4))[:, :32] * 7 % 256, jnp.int32)
    segment_ids = jnp.asarray([[0] * 16 + [1] * 16] * 4, jnp.int32)
    params = model.init(jax.random.key(0), tokens)
    optimizer = optax.adam(1e-2)

    def loss_fn(params):
        logits = model.apply(params, tokens[:, :-1], segment_ids=segment_ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(params, updates), state, loss, grads

    state = optimizer.init(params)
    losses = []
    for _ in range(25):
        params, state, loss, grads = step(params, state)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]
    gate_grads = jax.tree.leaves(grads["params"]["layers_0"]["attention"]["fox_token_bias"])
    assert all(float(jnp.abs(g).max()) > 0 for g in gate_grads)


# ---------------------------------------------------------------- randomized positions


@settings(max_examples=15)
@given(
    batch=st.integers(1, 3),
    seq_len=st.integers(1, 12),
    extra=st.integers(0, 40),
    seed=st.integers(0, 2**16),
)
def test_randomized_positions_are_sorted_distinct_and_in_range(batch, seq_len, extra, seed):
    max_range = seq_len + extra
    positions = np.asarray(pe.randomized_positions(jax.random.key(seed), batch, seq_len, max_range))
    assert positions.shape == (batch, seq_len) and positions.dtype == np.int32
    assert np.all(np.diff(positions, axis=1) > 0)  # sorted and distinct
    assert positions.min() >= 0 and positions.max() < max_range
    if extra == 0:
        np.testing.assert_array_equal(
            positions, np.broadcast_to(np.arange(seq_len), positions.shape)
        )


def test_randomized_positions_are_a_uniform_subset():
    rows, seq_len, max_range = 4000, 4, 16
    positions = np.asarray(
        jax.jit(pe.randomized_positions, static_argnums=(1, 2, 3))(
            jax.random.key(0), rows, seq_len, max_range
        )
    )
    # Every value is in a uniform subset with probability S / N.
    counts = np.bincount(positions.ravel(), minlength=max_range)
    expected = rows * seq_len / max_range
    spread = np.sqrt(rows * (seq_len / max_range) * (1 - seq_len / max_range))
    assert np.abs(counts - expected).max() < 5 * spread
    # The k-th smallest of a uniform S-subset of [0, N) has mean (k + 1)(N + 1)/(S + 1) - 1.
    order_means = (np.arange(1, seq_len + 1) * (max_range + 1) / (seq_len + 1)) - 1
    np.testing.assert_allclose(positions.mean(0), order_means, atol=0.15)
    # Rows differ: all C(16, 4) = 1820 subsets are about equally likely.
    assert len({tuple(row) for row in positions}) > 1000


def test_randomized_positions_check_their_arguments():
    with pytest.raises(ValueError, match=r"max_range must be in \[seq_len, 2\^31\]"):
        pe.randomized_positions(jax.random.key(0), 1, 8, 4)
    with pytest.raises(ValueError, match="seq_len"):
        pe.randomized_positions(jax.random.key(0), 1, 0, 4)


@pytest.mark.parametrize("encoding", ["rope", "learned+alibi"])
def test_a_tiny_model_learns_with_randomized_positions(encoding):
    config = pe.TransformerConfig(
        encoding=encoding, d_model=32, num_layers=1, num_heads=2, max_positions=256
    )
    model = pe.Transformer(config)
    tokens = jnp.asarray(np.tile(np.arange(8), (4, 4))[:, :32] * 7 % 256, jnp.int32)
    params = model.init(jax.random.key(0), tokens)
    optimizer = optax.adam(1e-2)

    def loss_fn(params, positions):
        logits = model.apply(params, tokens[:, :-1], positions=positions)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(params, state, key):
        positions = pe.randomized_positions(key, 4, 31, 256)  # a new draw every step
        loss, grads = jax.value_and_grad(loss_fn)(params, positions)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    state = optimizer.init(params)
    losses = []
    for key in jax.random.split(jax.random.key(1), 25):
        params, state, loss = step(params, state, key)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and np.mean(losses[-3:]) < 0.5 * losses[0]


# ---------------------------------------------------------------- SelfExtend


def _self_extend_case(packed):
    batch, length, heads, kv_heads, dim = 2, 29, 4, 2, 8
    q = _normal(50, (batch, length, heads, dim))
    k, v = _normal(51, (batch, length, kv_heads, dim)), _normal(52, (batch, length, kv_heads, dim))
    segment_ids = np.array([[0] * 12 + [1] * 17, [4] * 29], np.int32) if packed else None
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
    if packed:
        positions = np.asarray(pe.segment_positions(segment_ids))
    return q, k, v, positions, segment_ids


def _self_extend_attention(implementation, positions, segment_ids, **options):
    module = content.SelfExtendRotaryEmbedding(**options).bind({})
    terms = _protocols.terms_of("qk_transform", module)

    def attend(q, k, v):
        alternate = terms.alternate(q, k, positions, positions)
        q, k = terms.transform(q, k, positions, positions)
        return pe.dot_product_attention(
            q, k, v, alternate=alternate, causal=True, q_positions=positions,
            k_positions=positions, segment_ids=segment_ids, implementation=implementation,
            block_size=(8, 5),
        )  # fmt: skip

    return attend


@pytest.mark.parametrize("packed", [False, True], ids=["one-document", "packed"])
def test_self_extend_matches_the_float64_formula_in_both_implementations(packed):
    q, k, v, positions, segment_ids = _self_extend_case(packed)
    options = {"group_size": 3, "window": 7, "base": 100.0}
    logits = self_extend_logits_reference(q, k, positions, positions, **options)
    allowed = causal_allowed(29, segment_ids)
    want = attention_reference(0 * q, k, v, bias=logits, allowed=allowed)

    def loss(implementation):
        attend = _self_extend_attention(implementation, positions, segment_ids, **options)

        def loss(q, k, v):
            out = attend(q, k, v)
            return (out * _cotangent(out.shape)).sum(), out

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (xla_grads, xla_out), (block_grads, block_out) = loss("xla"), loss("blockwise")
    assert _relative_error(xla_out, want) < 3e-6
    assert _relative_error(block_out, want) < 3e-6
    for got, expected in zip(block_grads, xla_grads, strict=True):
        assert _relative_error(got, expected) < 2e-5


def test_self_extend_is_rope_within_the_window_and_groups_beyond():
    q, k, v, positions, _ = _self_extend_case(packed=False)
    rope = pe.dot_product_attention(
        *pe.apply_rope_qk(q, k, positions), v, causal=True, implementation="xla"
    )
    wide = _self_extend_attention("blockwise", positions, None, window=29)(q, k, v)
    np.testing.assert_allclose(wide, rope, atol=2e-6)  # every key is a neighbour
    narrow = _self_extend_attention("blockwise", positions, None, group_size=2, window=4)
    assert float(jnp.abs(narrow(q, k, v)[:, 4:] - rope[:, 4:]).max()) > 1e-2
    np.testing.assert_allclose(narrow(q, k, v)[:, :4], rope[:, :4], atol=2e-6)


def test_self_extend_positions_join_at_the_window_edge():
    q_grouped, k_grouped = pe.self_extend_positions([20], [11, 12, 13], group_size=4, window=8)
    # Query 20 -> 20 // 4 + 8 - 8 // 4 = 11; key 12, 8 before it, -> 3: distance 8 again.
    np.testing.assert_array_equal(q_grouped, [[11]])
    np.testing.assert_array_equal(q_grouped - k_grouped, [[9, 8, 8]])
    select = pe.self_extend_select([20], [11, 12, 13], window=8)
    np.testing.assert_array_equal(select, [[[[True, True, False]]]])


def test_self_extend_decodes_through_flax_s_cache():
    """`decode=True`, one token at a time, equals the full causal pass beyond the window."""
    options = {"selfextend": {"group_size": 2, "window": 3}}
    x = _normal(60, (2, 11, 16))

    def layer(decode):
        return nn.MultiHeadDotProductAttention(
            num_heads=2, qkv_features=16, decode=decode,
            attention_fn=pe.make_attention_fn("selfextend", block_size=4, **options),
        )  # fmt: skip

    mask = nn.make_causal_mask(x[..., 0])
    params = layer(False).init(jax.random.key(0), x, mask=mask)["params"]
    full = layer(False).apply({"params": params}, x, mask=mask)
    cache = layer(True).init(jax.random.key(0), x)["cache"]
    outputs = []
    for t in range(11):
        out, updated = layer(True).apply(
            {"params": params, "cache": cache}, x[:, t : t + 1], mutable=["cache"]
        )
        cache = updated["cache"]
        outputs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, atol=2e-6)


def test_self_extend_is_registered_as_a_causal_rotary_encoding_and_trains():
    encoding = pe.get_encoding("selfextend")
    assert encoding.contributes == ("qk_transform",) and encoding.causal_only
    spec = pe.EncodingSpec(d_model=16, num_heads=2, head_dim=8, max_positions=32, causal=False)
    with pytest.raises(ValueError, match="'selfextend' is causal-only"):
        pe.registry.attention_modules("selfextend", spec)
    with pytest.raises(ValueError, match="at most one part may contribute an alternate"):
        alternate = pe.AlternateQk(lambda q, k, qp, kp: (q, k), lambda qp, kp: qp)
        pe.combine([pe.PositionalTerms(alternate_qk=alternate)] * 2)
    config = pe.TransformerConfig(
        encoding="selfextend+alibi", d_model=32, num_layers=1, num_heads=2, max_positions=64,
        encoding_options={"selfextend": {"group_size": 2, "window": 4}}, block_size=8,
        attention="blockwise",
    )  # fmt: skip
    model = pe.Transformer(config)
    tokens = jnp.asarray(np.tile(np.arange(8), (2, 4)) * 7 % 256, jnp.int32)
    params = model.init(jax.random.key(0), tokens)
    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(params, state):
        def loss_fn(params):
            logits = model.apply(params, tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    state, losses = optimizer.init(params), []
    for _ in range(20):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------- CoPE

COPE_SEGMENTS = np.array([[0] * 4 + [1] * 5, [0] * 9])


def _cope_case(num_positions=5, tables=1, dtype=jnp.float32):
    """Odd length 9, grouped-query heads (4 query, 2 kv), a table of `num_positions` rows
    (5 < 9: long rows are clipped)."""
    q = _normal(70, (2, 9, 4, 8), 1.5)
    k, v = _normal(71, (2, 9, 2, 8), 1.5), _normal(72, (2, 9, 2, 8))
    embeddings = _normal(73, (tables, num_positions, 8))
    return (*(a.astype(dtype) for a in (q, k, v)), embeddings)


def _cope_attention(q, k, v, embeddings, **kwargs):
    cope = pe.ContextualBias(embeddings, pe.cope_bias)
    return pe.dot_product_attention(q, k, v, contextual_bias=cope, **kwargs)


@pytest.mark.parametrize("tables", [1, 4], ids=["shared", "per-head"])
@pytest.mark.parametrize("packed", [False, True], ids=["one-document", "packed"])
def test_cope_matches_the_float64_formula_with_gradients(packed, tables):
    arrays = _cope_case(tables=tables)
    segment_ids = COPE_SEGMENTS if packed else None
    allowed = causal_allowed(9, segment_ids)

    def loss(*arrays):
        out = _cope_attention(*arrays, causal=True, segment_ids=segment_ids, implementation="xla")
        return (out * _cotangent(out.shape)).sum(), out

    grads, out = jax.jit(jax.grad(jax.jit(loss), argnums=(0, 1, 2, 3), has_aux=True))(*arrays)
    want = cope_attention_reference(*arrays, allowed)
    assert _relative_error(out, want) < 2e-6
    # Gradients of q, k (through the content logits and the gates), v and the table,
    # against central differences of the float64 loss along a random direction.
    cotangent = np.asarray(_cotangent(out.shape), np.float64)
    references = [np.asarray(a, np.float64) for a in arrays]
    rng = np.random.default_rng(74)
    for index, grad in enumerate(grads):
        direction = rng.normal(size=references[index].shape)

        def reference_loss(step, index=index, direction=direction):
            shifted = list(references)
            shifted[index] = references[index] + step * direction
            return float((cope_attention_reference(*shifted, allowed) * cotangent).sum())

        want_slope = (reference_loss(1e-6) - reference_loss(-1e-6)) / 2e-6
        got_slope = float(np.sum(np.asarray(grad, np.float64) * direction))
        assert abs(got_slope - want_slope) < 2e-4 * max(1.0, abs(want_slope)), index
        assert abs(want_slope) > 1e-2, index  # the argument really moves the loss


def test_cope_positions_count_the_gates_between_key_and_query():
    # Gates saturated at 0 or 1: key j sits at the number of open gates among j..i.
    opened = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1], bool)
    gate_logits = np.where(opened, 40.0, -40.0)[None, None, None, :].repeat(9, axis=2)
    allowed = causal_allowed(9)
    positions = pe.cope_positions(jnp.asarray(gate_logits), allowed, num_positions=100)
    counts = np.zeros((9, 9))
    for i in range(9):
        for j in range(i + 1):
            counts[i, j] = opened[j : i + 1].sum()
    np.testing.assert_allclose(np.where(allowed[0, 0], positions[0, 0], 0), counts, atol=1e-6)
    # Every gate open: the position is the relative position i - j + 1; clipped at npos - 1.
    ones = pe.cope_positions(jnp.full((1, 1, 9, 9), 40.0), allowed, num_positions=4)
    relative = np.arange(9)[:, None] - np.arange(9)[None, :] + 1
    np.testing.assert_allclose(ones[0, 0][allowed[0, 0]], np.minimum(relative, 3)[allowed[0, 0]])
    logits = _normal(75, (2, 3, 9, 9))
    np.testing.assert_allclose(
        pe.cope_positions(logits, allowed, num_positions=6),
        cope_positions_reference(logits, allowed, 6),
        atol=2e-6,
    )


def test_cope_interpolates_the_query_embedding_products_linearly_and_clips():
    q = _normal(76, (1, 1, 2, 8))
    embeddings = _normal(77, (2, 4, 8))
    products = np.einsum("hd,hnd->hn", np.asarray(q[0, 0], np.float64), embeddings)
    positions = jnp.asarray([0.0, 1.0, 1.25, 2.5, 3.0, 7.5, -1.0])[None, None, None, :]
    got = pe.cope_position_logits(q, positions, embeddings)[0, :, 0]
    want = np.stack(
        [products[:, 0], products[:, 1], 0.75 * products[:, 1] + 0.25 * products[:, 2],
         0.5 * products[:, 2] + 0.5 * products[:, 3], products[:, 3], products[:, 3],
         products[:, 0]], axis=-1
    )  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_cope_fully_masked_rows_and_bfloat16_stay_finite():
    q, k, v, embeddings = _cope_case()
    mask = jnp.ones((2, 1, 9, 9), bool).at[:, :, 3].set(False)  # query 3 sees nothing

    def loss(q, k, v, embeddings):
        out = _cope_attention(q, k, v, embeddings, mask=mask, causal=True)
        return (out.astype(jnp.float32) ** 2).sum(), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, embeddings)
    assert np.all(np.asarray(out[:, 3]) == 0) and np.all(np.asarray(grads[0][:, 3]) == 0)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    half = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    got = jax.jit(functools.partial(_cope_attention, mask=mask, causal=True))(*half, embeddings)
    assert got.dtype == jnp.bfloat16 and np.isfinite(np.asarray(got, np.float32)).all()
    want = np.asarray(out, np.float32)
    assert np.abs(np.asarray(got, np.float32) - want).max() < 0.05 * np.abs(want).max()


def test_cope_runs_on_the_xla_path_only_and_says_why():
    q, k, v, embeddings = _cope_case()
    with pytest.raises(ValueError, match=r"xla path only.*implementation='blockwise'"):
        _cope_attention(q, k, v, embeddings, causal=True, implementation="blockwise")
    with pytest.raises(TypeError, match="contextual_bias must be a ContextualBias"):
        pe.dot_product_attention(q, k, v, contextual_bias=embeddings)
    # "auto" means xla whatever the length (here past the blockwise threshold).
    long = _normal(78, (1, 260, 1, 4))
    table = _normal(79, (1, 3, 4))
    out = _cope_attention(long, long, long, table, causal=True, implementation="auto")
    want = _cope_attention(long, long, long, table, causal=True, implementation="xla")
    np.testing.assert_array_equal(out, want)
    with pytest.raises(ValueError, match="at most one part may contribute a contextual bias"):
        pe.combine([pe.PositionalTerms(contextual_bias=pe.ContextualBias(table, pe.cope_bias))] * 2)
    config = pe.TransformerConfig(encoding="cope", d_model=16, num_heads=2, attention="blockwise")
    with pytest.raises(ValueError, match="xla path only"):
        pe.Transformer(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def test_cope_module_materializes_the_reference_term_and_is_registered():
    q, k, _, embeddings = _cope_case(tables=4)
    module = content.ContextualPositionEmbedding(4, 8, 5, shared_across_heads=False)
    params = module.init(jax.random.key(0), q, k)["params"]
    assert params["embeddings"].shape == (4, 5, 8) and not np.any(params["embeddings"])
    got = module.apply({"params": {"embeddings": embeddings}}, q, k)
    want = cope_bias_reference(q, k, embeddings, causal_allowed(9))
    assert (
        _relative_error(np.where(causal_allowed(9), got, 0), np.where(causal_allowed(9), want, 0))
        < 2e-6
    )
    encoding = pe.get_encoding("cope")
    assert encoding.contributes == ("contextual_bias",)
    spec = pe.EncodingSpec(d_model=16, num_heads=2, head_dim=8, max_positions=32)
    ((_, role, built),) = pe.registry.attention_modules("cope", spec)
    assert role == "contextual_bias" and built.num_positions == 64 and built.shared_across_heads


def test_cope_decodes_through_flax_s_cache():
    """`decode=True`, one token at a time (gates masked to the filled cache slots),
    equals the full causal pass, and the learned table changes the output."""
    x = _normal(80, (2, 9, 16))

    def layer(decode):
        return nn.MultiHeadDotProductAttention(
            num_heads=2, qkv_features=16, decode=decode,
            attention_fn=pe.make_attention_fn("cope", cope={"embedding_stddev": 1.0}),
        )  # fmt: skip

    mask = nn.make_causal_mask(x[..., 0])
    params = layer(False).init(jax.random.key(0), x, mask=mask)["params"]
    full_pass = jax.jit(lambda params: layer(False).apply({"params": params}, x, mask=mask))
    full = full_pass(params)
    cache = layer(True).init(jax.random.key(0), x)["cache"]

    @jax.jit
    def step(cache, token):
        out, updated = layer(True).apply(
            {"params": params, "cache": cache}, token, mutable=["cache"]
        )
        return updated["cache"], out

    outputs = []
    for t in range(9):
        cache, out = step(cache, x[:, t : t + 1])
        outputs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, atol=2e-6)
    without = jax.tree_util.tree_map_with_path(
        lambda path, p: 0 * p if "embeddings" in jax.tree_util.keystr(path) else p, params
    )
    assert float(jnp.abs(full_pass(without) - full).max()) > 1e-3


def test_cope_arguments_are_checked():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(
        ValueError, match=r"embeddings must have shape \[H or 1, num_positions, D\]"
    ):
        pe.cope_position_logits(q, jnp.zeros((1, 2, 4, 4)), jnp.zeros((3, 5, 8)))
    with pytest.raises(ValueError, match="num_positions must be a positive integer"):
        pe.cope_positions(jnp.zeros((1, 2, 4, 4)), num_positions=0)
    big = jax.ShapeDtypeStruct((64, 1024, 32, 8), jnp.float32)
    positions = jax.ShapeDtypeStruct((64, 32, 1024, 4), jnp.float32)
    table = jax.ShapeDtypeStruct((1, 1025, 8), jnp.float32)
    with pytest.raises(ValueError, match="fewer than 2\\^31 entries"):
        jax.eval_shape(pe.cope_position_logits, big, positions, table)
