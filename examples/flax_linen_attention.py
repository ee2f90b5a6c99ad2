"""Positional encodings inside Flax's own attention layer (linen).

`make_attention_fn(encoding)` returns an `attention_fn` for
`flax.linen.MultiHeadDotProductAttention`: the layer keeps its projections and we
supply what happens between them (RoPE on queries and keys, biases on the logits).

Run: python examples/flax_linen_attention.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jax_posenc as pe

BATCH, LENGTH, HEADS, HEAD_DIM = 2, 16, 4, 8


def main() -> None:
    # 1. The attention_fn on its own equals the same maths written out by hand.
    q, k, v = jax.random.normal(jax.random.key(0), (3, BATCH, LENGTH, HEADS, HEAD_DIM))
    positions = jnp.arange(LENGTH)
    attention_fn = pe.make_attention_fn("rope+alibi")
    causal_mask = nn.make_causal_mask(jnp.ones((BATCH, LENGTH)))  # Flax's float mask
    out = jax.jit(attention_fn)(q, k, v, mask=causal_mask)
    slopes = pe.alibi_slopes(HEADS)

    @jax.jit
    def by_hand(q, k, v):
        return pe.dot_product_attention(
            pe.apply_rope(q, positions),
            pe.apply_rope(k, positions),
            v,
            bias_fn=lambda q_pos, k_pos: pe.alibi_bias(q_pos, k_pos, slopes),
            causal=True,
        )

    reference = by_hand(q, k, v)
    difference = float(jnp.max(jnp.abs(out - reference)))
    print(
        f"rope+alibi attention_fn vs apply_rope + alibi_bias by hand: max |diff| {difference:.1e}"
    )
    assert difference < 1e-5

    # 2. Inside the layer. Learned encodings (T5's bias table) become parameters of
    #    the layer, created by init and trained with its projections.
    x = jax.random.normal(jax.random.key(1), (BATCH, LENGTH, HEADS * HEAD_DIM))
    layer = nn.MultiHeadDotProductAttention(
        num_heads=HEADS, qkv_features=HEADS * HEAD_DIM, attention_fn=pe.make_attention_fn("rope+t5")
    )
    params = jax.jit(layer.init)(jax.random.key(2), x, mask=causal_mask)["params"]
    apply = jax.jit(layer.apply)
    y = apply({"params": params}, x, mask=causal_mask)
    t5_table = params["T5RelativePositionBias_0"]["relative_attention_bias"]
    print(f"rope+t5 layer: output {y.shape}, parameters {sorted(params)}")
    print(f"  T5 bias table {t5_table.shape} (buckets x heads), trained with the layer")

    # 3. Causality comes from the mask: the output at token 5 ignores tokens 6.. .
    changed = x.at[:, 6:].set(0.0)
    y_changed = apply({"params": params}, changed, mask=causal_mask)
    prefix_difference = float(jnp.max(jnp.abs(y[:, :6] - y_changed[:, :6])))
    print(f"changing tokens 6.. moves outputs 0..5 by {prefix_difference:.1e} (causal mask)")
    assert prefix_difference < 1e-5

    # 4. Options per part, and the blockwise implementation (O(L) memory).
    blockwise = pe.make_attention_fn(
        "rope+alibi", implementation="blockwise", block_size=8, rope={"base": 500_000.0}
    )
    xla = pe.make_attention_fn("rope+alibi", rope={"base": 500_000.0})
    np.testing.assert_allclose(
        jax.jit(blockwise)(q, k, v, mask=causal_mask),
        jax.jit(xla)(q, k, v, mask=causal_mask),
        atol=1e-5,
    )
    print("blockwise (block 8) equals xla for rope(base=5e5)+alibi")


if __name__ == "__main__":
    main()
