"""Tests for the NNX modules generated from the linen ones (`jax_posenc.nnx`).

The parity test runs over the whole registry: every module a registered encoding
builds (one per role), generated as NNX with the linen parameters loaded, has the linen parameter
paths and gives the linen outputs.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from flax.nnx import bridge
from flax.traverse_util import flatten_dict
from jax.experimental import checkify

import jax_posenc as pe
from jax_posenc import nnx as pe_nnx

B, H, D = 2, 4, 8
Q_POSITIONS = jnp.array([[2, 3, 4, 5, 6], [0, 1, 2, 3, 4]])
K_POSITIONS = jnp.array([[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6]])

# Small sizes for quick compiles; variants cover the options that change parameters.
SMALL = {
    "fire": {"hidden_features": 8, "init_threshold": 16.0},
    "dpb": {"hidden_features": 8},
    "shaw": {"max_relative_position": 3},
    "transformer_xl": {"features": 16},
}
VARIANTS = {
    "alibi": [{"form": "causal"}],
    "kerple": [{"variant": "power"}],
    "rope": [
        {"learnable_frequencies": True, "scaling": pe.YarnScaling(4.0, 64)},
        {"rotary_dim": 4, "layout": "interleaved", "base": 500.0},
    ],
    "shaw": [{"use_value_term": False}],
    "xpos": [{"rotary_dim": 4, "scale_base": 128.0}],
}


# Encodings whose module depends on `EncodingSpec.causal` (T5's one-sided buckets).
BOTH_DIRECTIONS = ("t5",)


def _cases():
    cases = []
    for name in pe.available_encodings():
        for role in pe.get_encoding(name).contributes:
            for index, options in enumerate([{}, *VARIANTS.get(name, [])]):
                for causal in [True, False] if name in BOTH_DIRECTIONS else [True]:
                    case_id = f"{name}-{role}-{index}-{'causal' if causal else 'bidirectional'}"
                    cases.append(pytest.param(name, role, options, causal, id=case_id))
    return cases


CASES = _cases()


def _spec(name, options, causal):
    return pe.EncodingSpec(
        d_model=16,
        num_heads=H,
        head_dim=D,
        max_positions=32,
        causal=causal,
        options={name: {**SMALL.get(name, {}), **options}},
    )


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# The inputs a module in each role is called with (see `jax_posenc.registry`).
INPUTS = {
    "input_embedding": lambda: (K_POSITIONS,),
    "qk_transform": lambda: (_normal(1, (B, 5, H, D)), _normal(2, (B, 5, H, D)), Q_POSITIONS),
    "logit_bias": lambda: (Q_POSITIONS[:1], K_POSITIONS[:1]),
    "relative_terms": lambda: (
        _normal(1, (B, 5, H, D)),
        _normal(2, (B, 7, H, D)),
        Q_POSITIONS,
        K_POSITIONS,
    ),
    # Per-token features of the key tokens, d_model (16) wide as in the model.
    "token_bias": lambda: (_normal(3, (B, 7, 16)),),
    "contextual_bias": lambda: (_normal(1, (B, 5, H, D)), _normal(2, (B, 5, H, D))),
}


def _linen(name, role, options, causal):
    """The registered linen module and its parameters, moved off their initial values."""
    module = getattr(pe.get_encoding(name), role)(_spec(name, options, causal))
    params = module.init(jax.random.key(0), *INPUTS[role]()).get("params", {})
    params = jax.tree.map(lambda p: p * 1.25 + 0.01, params)
    return module, params


def _generated(name, role, options, causal, rngs_seed=1):
    return pe_nnx.from_registry(name, role, _spec(name, options, causal), rngs=nnx.Rngs(rngs_seed))


def _shapes(params):
    return {path: (value.shape, value.dtype) for path, value in flatten_dict(params).items()}


def _method_outputs(module, role):
    """What the model reads from a module besides `__call__`: `bias_fn()` or `terms()`."""
    if role == "logit_bias":
        return module.bias_fn()(Q_POSITIONS[:1], K_POSITIONS[:1])
    if role == "relative_terms":
        q, k, q_positions, k_positions = INPUTS[role]()
        terms = module.terms()
        logits = pe.relative_logits(q, k, terms, q_positions, k_positions)
        if terms.value_fn is None:
            return (logits,)
        return logits, terms.value_fn(jax.nn.softmax(logits), q_positions, k_positions)
    if role == "contextual_bias":
        q, k = INPUTS[role]()
        terms = module.contextual_bias()
        content_logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        return (terms.fn(q, content_logits, None, terms.params),)
    return ()


def _assert_trees_equal(got, expected, rtol=0.0):
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for got_leaf, expected_leaf in zip(
        jax.tree.leaves(got), jax.tree.leaves(expected), strict=True
    ):
        np.testing.assert_allclose(np.asarray(got_leaf), np.asarray(expected_leaf), rtol=rtol)


@pytest.mark.parametrize(("name", "role", "options", "causal"), CASES)
def test_generated_module_loads_linen_parameters_and_gives_the_linen_outputs(
    name, role, options, causal
):
    module, params = _linen(name, role, options, causal)
    twin = _generated(name, role, options, causal)
    assert type(twin) is getattr(pe_nnx, type(module).__name__)
    assert _shapes(nnx.to_pure_dict(nnx.state(twin, nnx.Param))) == _shapes(params)
    assert not jax.tree.leaves(nnx.state(twin, nnx.Not(nnx.Param)))

    nnx.update(twin, params)
    variables = {"params": params}
    inputs = INPUTS[role]()
    _assert_trees_equal(twin(*inputs), module.apply(variables, *inputs))
    linen_methods = module.bind(variables)
    _assert_trees_equal(_method_outputs(twin, role), _method_outputs(linen_methods, role))


def _loss(module, role):
    inputs = INPUTS[role]()
    if role == "qk_transform":
        q, k = module(*inputs)
        return jnp.sum(q[:, :, :1] * k)
    if role == "relative_terms":
        values = _method_outputs(module, role)
        return sum(jnp.sum(jnp.sin(value)) for value in values)
    out = module(*inputs)
    # Uneven weights: FoX's bias c_i - c_j is antisymmetric, so a plain sum of sin cancels.
    return jnp.sum(
        jnp.sin(out) * jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    )


def _has_parameters(name, options):
    if name == "rope":
        return bool(options.get("learnable_frequencies"))
    return name not in ("sinusoidal", "alibi", "xpos", "selfextend")


LEARNED_CASES = [case for case in CASES if _has_parameters(case.values[0], case.values[2])]


@pytest.mark.parametrize(("name", "role", "options", "causal"), LEARNED_CASES)
def test_gradients_under_nnx_jit_reach_every_parameter(name, role, options, causal):
    twin = _generated(name, role, options, causal)
    grads = nnx.jit(nnx.grad(lambda model: _loss(model, role)))(twin)
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param))
    assert leaves
    for path, grad in leaves:
        assert np.all(np.isfinite(grad)) and np.any(np.asarray(grad) != 0), path


@pytest.mark.parametrize(("name", "role", "options", "causal"), CASES)
def test_modules_are_created_inside_nnx_jit_and_run_under_jit_and_vmap(name, role, options, causal):
    spec = _spec(name, options, causal)
    created = nnx.jit(lambda: pe_nnx.from_registry(name, role, spec, rngs=nnx.Rngs(1)))()
    eager = _generated(name, role, options, causal)
    _assert_trees_equal(nnx.state(created), nnx.state(eager), rtol=1e-6)
    inputs = INPUTS[role]()
    expected = eager(*inputs)
    jitted = nnx.jit(lambda model, *args: model(*args))(eager, *inputs)
    _assert_trees_equal(jitted, expected, rtol=1e-5)
    if role == "input_embedding":
        batched = nnx.jit(lambda model, positions: jax.vmap(model)(positions))
        _assert_trees_equal(batched(eager, *inputs), expected, rtol=1e-5)


PUBLIC = [
    "SinusoidalEmbedding",
    "LearnedEmbedding",
    "AlibiBias",
    "T5RelativePositionBias",
    "KerpleBias",
    "FireBias",
    "DynamicPositionBias",
    "RelativePositionEmbedding",
    "TransformerXLRelativePosition",
    "RotaryEmbedding",
    "XPosEmbedding",
    "SelfExtendRotaryEmbedding",
    "ForgettingGate",
    "ContextualPositionEmbedding",
]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_classes_are_generated_with_the_linen_fields_and_methods(name):
    cls, linen_class = getattr(pe_nnx, name), getattr(pe, name)
    assert issubclass(cls, bridge.ToNNX) and cls.linen_class is linen_class
    linen_parameters = list(inspect.signature(linen_class).parameters)[:-2]  # parent, name
    assert list(inspect.signature(cls).parameters)[: len(linen_parameters)] == linen_parameters
    assert "rngs" in inspect.signature(cls).parameters
    for method in ("bias_fn", "terms"):
        assert hasattr(cls, method) == hasattr(linen_class, method)
    assert cls.__call__.__doc__ == linen_class.__call__.__doc__


def test_every_registered_module_class_has_its_public_nnx_class():
    registered = set()
    for name, role, options, causal in (case.values for case in CASES):
        registered.add(type(getattr(pe.get_encoding(name), role)(_spec(name, options, causal))))
    assert {cls.__name__ for cls in registered} == set(PUBLIC)


@pytest.mark.parametrize(
    "make",
    [
        lambda rngs: pe_nnx.LearnedEmbedding(16, 8, rngs=rngs),
        lambda rngs: pe_nnx.T5RelativePositionBias(H, rngs=rngs),
        lambda rngs: pe_nnx.FireBias(H, hidden_features=8, rngs=rngs),
        lambda rngs: pe_nnx.DynamicPositionBias(H, hidden_features=8, rngs=rngs),
        lambda rngs: pe_nnx.RelativePositionEmbedding(D, rngs=rngs),
        lambda rngs: pe_nnx.TransformerXLRelativePosition(H, D, rngs=rngs),
    ],
)
def test_random_parameters_need_rngs(make):
    with pytest.raises(TypeError, match="starts from random parameters; pass rngs"):
        make(None)
    first, second = (
        jax.tree.leaves(nnx.state(make(nnx.Rngs(0)))),
        jax.tree.leaves(nnx.state(make(nnx.Rngs(1)))),
    )
    assert any(not np.array_equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize(
    ("make", "linen", "inputs"),
    [
        (
            lambda: pe_nnx.KerpleBias(H, variant="power"),
            pe.KerpleBias(H, variant="power"),
            INPUTS["logit_bias"],
        ),
        (
            lambda: pe_nnx.RotaryEmbedding(8, learnable_frequencies=True),
            pe.RotaryEmbedding(8, learnable_frequencies=True),
            INPUTS["qk_transform"],
        ),
    ],
)
def test_parameters_that_start_from_constants_need_no_rngs(make, linen, inputs):
    expected = linen.init(jax.random.key(0), *inputs())["params"]
    _assert_trees_equal(nnx.to_pure_dict(nnx.state(make(), nnx.Param)), expected)


def test_learnable_rotary_frequencies_take_their_size_from_head_dim_as_linen_does():
    q = _normal(1, (B, 5, H, 16))
    linen = pe.RotaryEmbedding(learnable_frequencies=True)
    params = linen.init(jax.random.key(0), q, q, Q_POSITIONS)["params"]
    twin = pe_nnx.RotaryEmbedding(learnable_frequencies=True, head_dim=16)
    _assert_trees_equal(nnx.to_pure_dict(nnx.state(twin, nnx.Param)), params)
    _assert_trees_equal(twin(q, q, Q_POSITIONS), linen.apply({"params": params}, q, q, Q_POSITIONS))
    with pytest.raises(ValueError, match=r"without a head size.*pass head_dim"):
        pe_nnx.RotaryEmbedding(learnable_frequencies=True)(q, q, Q_POSITIONS)
    with pytest.raises(ValueError, match="depends on the sequence"):
        pe_nnx.RotaryEmbedding(8, scaling=pe.DynamicNTKScaling(2.0, 8), learnable_frequencies=True)


def test_learned_embedding_error_mode_reports_through_checkify():
    twin = pe_nnx.LearnedEmbedding(16, 8, rngs=nnx.Rngs(0), mode="error")
    checked = jax.jit(checkify.checkify(lambda positions: twin(positions)))
    err, _ = checked(jnp.array([1, 2, 3]))
    assert err.get() is None
    err, _ = checked(jnp.array([1, 2, 16]))
    assert "positions must lie in [0, num_positions=16)" in err.get()
    with pytest.raises(ValueError, match=r"positions must lie in \[0, num_positions=16\)"):
        twin(jnp.array([0, 16]))


@pytest.mark.parametrize(
    ("make_nnx", "make_linen", "role", "match"),
    [
        (
            lambda: pe_nnx.SinusoidalEmbedding(5),
            lambda: pe.SinusoidalEmbedding(5),
            "input_embedding",
            "features must be even",
        ),
        (
            lambda: pe_nnx.LearnedEmbedding(0, 4, rngs=nnx.Rngs(0)),
            lambda: pe.LearnedEmbedding(0, 4),
            "input_embedding",
            "num_positions must be a positive integer",
        ),
        (
            lambda: pe_nnx.T5RelativePositionBias(0, rngs=nnx.Rngs(0)),
            lambda: pe.T5RelativePositionBias(0),
            "logit_bias",
            "num_heads must be a positive integer",
        ),
        (
            lambda: pe_nnx.KerpleBias(H, variant="exp"),
            lambda: pe.KerpleBias(H, variant="exp"),
            "logit_bias",
            "variant must be one of",
        ),
        (
            lambda: pe_nnx.FireBias(H, init_threshold=-5.0, rngs=nnx.Rngs(0)),
            lambda: pe.FireBias(H, init_threshold=-5.0),
            "logit_bias",
            "init_threshold must be a finite",
        ),
        (
            lambda: pe_nnx.TransformerXLRelativePosition(-1, D, rngs=nnx.Rngs(0)),
            lambda: pe.TransformerXLRelativePosition(-1, D),
            "relative_terms",
            "num_heads must be a positive integer",
        ),
        (
            lambda: pe_nnx.RotaryEmbedding(6, layout="spiral"),
            lambda: pe.RotaryEmbedding(6, layout="spiral"),
            "qk_transform",
            "layout must be one of",
        ),
    ],
)
def test_bad_configuration_raises_on_construction_as_linen_init_does(
    make_nnx, make_linen, role, match
):
    with pytest.raises(ValueError, match=match):
        make_linen().init(jax.random.key(0), *INPUTS[role]())
    with pytest.raises(ValueError, match=match):
        make_nnx()


def test_from_registry_names_the_roles_an_encoding_contributes():
    spec = _spec("alibi", {}, True)
    with pytest.raises(ValueError, match=r"contributes \['logit_bias'\], not 'qk_transform'"):
        pe_nnx.from_registry("alibi", "qk_transform", spec)
    with pytest.raises(ValueError, match="role must be one of"):
        pe_nnx.from_registry("alibi", "bias", spec)
    with pytest.raises(ValueError, match="unknown encoding"):
        pe_nnx.from_registry("alibi+t5", "logit_bias", spec)


class _ScaledDistance(nn.Module):
    """An encoding defined outside the library: a learned per-head slope of |q - k|."""

    num_heads: int

    @nn.compact
    def __call__(self, q_positions, k_positions):
        slopes = self.param("slopes", nn.initializers.normal(1.0), (self.num_heads,))
        distance = jnp.abs(q_positions[..., :, None] - k_positions[..., None, :])
        return -slopes[:, None, None] * distance[:, None].astype(jnp.float32)


def test_nnx_class_generates_modules_for_encodings_defined_elsewhere():
    cls = pe_nnx.nnx_class(_ScaledDistance, "logit_bias")
    assert pe_nnx.nnx_class(_ScaledDistance, "logit_bias") is cls
    module = cls(3, rngs=nnx.Rngs(0))
    linen = _ScaledDistance(3)
    params = {"slopes": jnp.array([0.5, 1.0, 2.0])}
    nnx.update(module, params)
    inputs = INPUTS["logit_bias"]()
    _assert_trees_equal(module(*inputs), linen.apply({"params": params}, *inputs))
