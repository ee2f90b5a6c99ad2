"""Every attention encoding under every JAX transformation a training stack applies.

The matrix: each registered encoding with an attention part (and two combinations) x
{xla, blockwise} x {jit(grad), grad(jit), jit(grad(jit)), grad(checkpoint),
grad(checkpoint(jit)), grad of a scan over three checkpointed layers, grad(vmap)}. Each
cell's output and every gradient (queries, keys, values and the encoding's own learned
parameters) must equal the xla implementation under plain `jax.grad`, the reference,
to float32 rounding. The blockwise path's custom VJP is where this used to break: it
closed over positions computed outside it.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jax_posenc as pe

BATCH, LENGTH, HEADS, DIM = 2, 12, 2, 8
# Query blocks span two key blocks: the causal blockwise schedule then has full, partial
# and half-row pairs, so every cell runs all three of its loops.
BLOCK = (4, 2)
LAYERS = 3
COMBINATIONS = ("rope+alibi", "rope+t5")
ENCODINGS = (
    tuple(
        name
        for name in pe.available_encodings()
        if set(pe.get_encoding(name).contributes) - {"input_embedding"}
        and pe.get_encoding(name).input_embedding is None
    )
    + COMBINATIONS
)
IMPLEMENTATIONS = ("xla", "blockwise")
# CoPE's positions sum gates over whole rows of keys: attention runs it on the xla path
# only and refuses blockwise (tested in test_content.py), so it has no blockwise cells.
CELLS = [
    (encoding, implementation)
    for encoding in ENCODINGS
    for implementation in IMPLEMENTATIONS
    if implementation == "xla" or pe.get_encoding(encoding.split("+")[0]).contextual_bias is None
]
# Options that make an encoding act at this length (SelfExtend groups beyond 4 tokens).
OPTIONS = {"selfextend": {"selfextend": {"group_size": 2, "window": 4}}}


class _Attention(nn.Module):
    encoding: str
    implementation: str

    @nn.compact
    def __call__(self, q, k, v):
        attention_fn = pe.make_attention_fn(
            self.encoding,
            implementation=self.implementation,
            block_size=BLOCK,
            **OPTIONS.get(self.encoding, {}),
        )
        return attention_fn(q, k, v, is_causal=True)


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@functools.cache
def _case(encoding):
    """Inputs, perturbed parameters and per-layer parameters of one encoding."""
    q, k, v = (_normal(seed, (BATCH, LENGTH, HEADS, DIM)) for seed in (1, 2, 3))
    params = jax.jit(_Attention(encoding, "xla").init)(jax.random.key(0), q, k, v)
    leaves, tree = jax.tree.flatten(params)

    def perturbed(seed):
        noisy = [x + 0.1 * _normal(seed + i, x.shape) for i, x in enumerate(leaves)]
        return jax.tree.unflatten(tree, noisy)

    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(perturbed(100 * n) for n in range(LAYERS)))
    return (q, k, v), perturbed(7), stacked


def _cotangent(shape):
    return jnp.sin(jnp.arange(np.prod(shape), dtype=jnp.float32)).reshape(shape)


def _loss(encoding, implementation):
    module = _Attention(encoding, implementation)

    def loss(q, k, v, params):
        out = module.apply(params, q, k, v)
        return (out * _cotangent(out.shape)).sum(), out

    return loss


def _scan_loss(encoding, implementation, checkpoint=True):
    """Three layers `h <- h + attention(h, h, h)` with per-layer parameters, scanned."""
    layer_loss = _loss(encoding, implementation)

    def layer(h, params):
        _, out = layer_loss(h, h, h, params)
        return h + out, None

    step = jax.checkpoint(layer) if checkpoint else layer

    def loss(q, k, v, stacked):
        # A sum of unit normals would make the softmax sharp and amplify rounding.
        h, _ = lax.scan(step, (q + k + v) / 3, stacked, length=LAYERS)
        return (h * _cotangent(h.shape)).sum(), h

    return loss


def _vmap_loss(encoding, implementation):
    """The loss over a leading axis, each slice a batch of one."""
    single = _loss(encoding, implementation)

    def loss(q, k, v, params):
        def one(q, k, v):
            return single(q[None], k[None], v[None], params)

        losses, outs = jax.vmap(one)(q, k, v)
        return losses.sum(), outs

    return loss


ARGNUMS = (0, 1, 2, 3)
TRANSFORMS = {
    "jit(grad)": lambda f: jax.jit(jax.grad(f, ARGNUMS, has_aux=True)),
    "grad(jit)": lambda f: jax.grad(jax.jit(f), ARGNUMS, has_aux=True),
    "jit(grad(jit))": lambda f: jax.jit(jax.grad(jax.jit(f), ARGNUMS, has_aux=True)),
    "grad(checkpoint)": lambda f: jax.grad(jax.checkpoint(f), ARGNUMS, has_aux=True),
    "grad(checkpoint(jit))": lambda f: jax.grad(jax.checkpoint(jax.jit(f)), ARGNUMS, has_aux=True),
    "grad(scan(checkpoint))": None,  # built from _scan_loss
    "grad(vmap)": None,  # built from _vmap_loss
}


@functools.cache
def _reference(encoding, kind):
    """Plain `jax.grad` of the xla implementation: `(gradients, output)`."""
    q, k, v = _case(encoding)[0]
    if kind == "scan":
        loss, params = _scan_loss(encoding, "xla", checkpoint=False), _case(encoding)[2]
    elif kind == "vmap":
        loss, params = _vmap_loss(encoding, "xla"), _case(encoding)[1]
    else:
        loss, params = _loss(encoding, "xla"), _case(encoding)[1]
    return jax.grad(loss, ARGNUMS, has_aux=True)(q, k, v, params)


def _assert_close(got, want, tolerance=2e-5):
    """Equal to float32 rounding, relative to each array's largest entry."""
    got_leaves, got_tree = jax.tree.flatten(got)
    want_leaves, want_tree = jax.tree.flatten(want)
    assert got_tree == want_tree
    for a, b in zip(got_leaves, want_leaves, strict=True):
        scale = max(1.0, float(np.abs(np.asarray(b)).max(initial=0.0)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tolerance * scale, rtol=0)


# Every cell runs the transformations that exercise the custom VJP's arguments (jit
# inside and outside grad, checkpoint, scan over layers). The other four run in the
# default suite for one encoding per kind of positional term (an additive bias with
# and without learned parameters, a query transform, relative terms, a token bias, an
# alternate q/k pair, a combination) and for the rest under `pytest -m slow`: each
# transformation is a separate compile, and the full matrix alone took half the suite.
CORE_TRANSFORMS = ("jit(grad(jit))", "grad(checkpoint)", "grad(scan(checkpoint))")
REPRESENTATIVES = {"alibi", "t5", "rope", "transformer_xl", "fox", "selfextend", "rope+t5"}
MATRIX = [
    pytest.param(encoding, implementation, group, id=f"{encoding}-{implementation}-{group}")
    for encoding, implementation in CELLS
    for group in ("core", "rest")
    if not (group == "rest" and encoding not in REPRESENTATIVES)
] + [
    pytest.param(
        encoding,
        implementation,
        "rest",
        marks=pytest.mark.slow,
        id=f"{encoding}-{implementation}-rest",
    )
    for encoding, implementation in CELLS
    if encoding not in REPRESENTATIVES
]


@pytest.mark.parametrize(("encoding", "implementation", "group"), MATRIX)
def test_outputs_and_all_gradients_equal_plain_grad_of_xla_under_every_transformation(
    encoding, implementation, group
):
    (q, k, v), params, stacked = _case(encoding)
    for name, transform in TRANSFORMS.items():
        if (name in CORE_TRANSFORMS) != (group == "core"):
            continue
        if name == "grad(scan(checkpoint))":
            got = jax.grad(_scan_loss(encoding, implementation), ARGNUMS, has_aux=True)(
                q, k, v, stacked
            )
            want = _reference(encoding, "scan")
        elif name == "grad(vmap)":
            got = jax.grad(_vmap_loss(encoding, implementation), ARGNUMS, has_aux=True)(
                q, k, v, params
            )
            want = _reference(encoding, "vmap")
        else:
            got = transform(_loss(encoding, implementation))(q, k, v, params)
            want = _reference(encoding, "plain")
        try:
            _assert_close(got, want)
        except AssertionError as error:
            raise AssertionError(f"{encoding} / {implementation} / {name}: {error}") from None
    parameter_grads = jax.tree.leaves(_reference(encoding, "plain")[0][3])
    if parameter_grads:  # learned parameters really receive gradients
        assert max(float(jnp.abs(g).max()) for g in parameter_grads) > 1e-3


def test_matrix_covers_every_attention_encoding_and_both_combinations():
    assert {
        "alibi", "t5", "kerple", "fire", "dpb", "shaw", "transformer_xl", "rope", "xpos", "fox",
        "selfextend", "cope",
    } <= set(ENCODINGS)  # fmt: skip
    assert set(COMBINATIONS) <= set(ENCODINGS)


@pytest.mark.parametrize("token_bias", [False, True], ids=["alibi", "alibi+fox"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_blockwise_under_shard_map_equals_unsharded(implementation, token_bias):
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((1,), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    q, k, v = (
        jax.device_put(_normal(seed, (BATCH, LENGTH, HEADS, DIM)), sharding) for seed in (1, 2, 3)
    )
    bias_fn = pe.AlibiBias(HEADS).bias_fn()
    # FoX gates read the (sharded) keys; their weights are replicated.
    gate = _normal(4, (HEADS * DIM, HEADS)) if token_bias else None

    def attend(q, k, v):
        forget = None
        if gate is not None:
            log_forget = pe.log_forget_gates(k.reshape(*k.shape[:2], -1), gate, jnp.ones(HEADS))
            forget = pe.forgetting_bias(log_forget)
        return pe.dot_product_attention(
            q, k, v, bias_fn=bias_fn, token_bias=forget, causal=True,
            implementation=implementation, block_size=4,
        )  # fmt: skip

    sharded = jax.shard_map(
        attend, mesh=mesh, in_specs=PartitionSpec("data"), out_specs=PartitionSpec("data")
    )

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) * _cotangent(q.shape)).sum()

    got = jax.jit(jax.grad(loss(sharded), (0, 1, 2)))(q, k, v)
    want = jax.grad(loss(attend), (0, 1, 2))(q, k, v)
    _assert_close(got, want)
