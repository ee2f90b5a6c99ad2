"""Positional encodings with Flax NNX.

Every linen module of the library has an NNX class in `jax_posenc.nnx`, generated from
it (same fields, same parameter names), and `AttentionFn` plugs an encoding into
`flax.nnx.MultiHeadAttention` while owning the encoding's parameters, so a learned
bias trains with the layer.

Run: python examples/nnx_attention.py
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_posenc as pe
from jax_posenc import nnx as pe_nnx

BATCH, LENGTH, HEADS, HEAD_DIM = 2, 12, 4, 8
FEATURES = HEADS * HEAD_DIM


def main() -> None:
    positions = jnp.arange(LENGTH)

    # 1. A generated NNX module loads a linen parameter tree as it is.
    linen_bias = pe.T5RelativePositionBias(num_heads=HEADS)
    linen_variables = jax.jit(linen_bias.init)(jax.random.key(0), positions, positions)
    nnx_bias = pe_nnx.T5RelativePositionBias(num_heads=HEADS, rngs=nnx.Rngs(1))
    nnx.update(nnx_bias, linen_variables["params"])
    expected = linen_bias.apply(linen_variables, positions, positions)
    np.testing.assert_array_equal(nnx_bias(positions, positions), expected)
    print(f"NNX T5 bias with the linen parameters: {expected.shape}, equal to linen")

    # 2. RoPE + a learned T5 bias inside nnx.MultiHeadAttention.
    rngs = nnx.Rngs(0)
    attention_fn = pe_nnx.AttentionFn(
        "rope+t5", num_heads=HEADS, head_dim=HEAD_DIM, causal=True, rngs=rngs
    )
    layer = nnx.MultiHeadAttention(
        num_heads=HEADS,
        in_features=FEATURES,
        decode=False,
        attention_fn=attention_fn,
        rngs=rngs,
    )
    x = jax.random.normal(jax.random.key(2), (BATCH, LENGTH, FEATURES))
    mask = nnx.make_causal_mask(jnp.ones((BATCH, LENGTH)))
    out = nnx.jit(lambda layer, x: layer(x, mask=mask))(layer, x)
    print(f"nnx.MultiHeadAttention with AttentionFn('rope+t5'): output {out.shape}")

    # 3. One gradient step: the T5 table gets gradients like the projections do.
    target = jax.random.normal(jax.random.key(3), x.shape)

    def loss_fn(model: nnx.MultiHeadAttention) -> jax.Array:
        return jnp.mean((model(x, mask=mask) - target) ** 2)

    @nnx.jit
    def sgd_step(model: nnx.MultiHeadAttention, learning_rate: float = 0.1):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda p, g: p - learning_rate * g, params, grads))
        return loss, grads.attention_fn.encoded  # the gradient of the encoding's parameters

    losses = []
    for _ in range(5):
        loss, encoding_grads = sgd_step(layer)
        losses.append(float(loss))
    norms = {
        jax.tree_util.keystr(path): float(jnp.linalg.norm(grad))
        for path, grad in jax.tree_util.tree_flatten_with_path(encoding_grads)[0]
    }
    print(f"5 SGD steps: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    for path, norm in norms.items():
        print(f"  gradient of the encoding's parameter {path}: norm {norm:.4f}")
    assert losses[-1] < losses[0] and all(norm > 0 for norm in norms.values())


if __name__ == "__main__":
    main()
