"""Packed sequences: several documents in one row, each seeing only itself.

Packing short documents into fixed-length rows wastes no compute on padding. With
`segment_ids`, attention stays inside each document and positions restart at 0 at every
document start (`segment_positions`), so a packed document gets exactly the outputs it
would get alone, whatever its encoding (RoPE, ALiBi, T5, a learned table, ...).

Run: python examples/packed_sequences.py
"""

import jax
import jax.numpy as jnp
import numpy as np

import jax_posenc as pe

DOCUMENTS = [b"def f(x):\n", b"return x + 1", b"# packed!"]


def pack(documents: list[bytes]) -> tuple[jax.Array, jax.Array]:
    """One row of byte tokens `[1, L]` and its segment ids (1, 2, 3, ...)."""
    tokens = np.concatenate([np.frombuffer(doc, np.uint8) for doc in documents])
    segment_ids = np.concatenate([np.full(len(doc), i + 1) for i, doc in enumerate(documents)])
    return jnp.asarray(tokens[None], jnp.int32), jnp.asarray(segment_ids[None], jnp.int32)


def one_per_row(documents: list[bytes]) -> jax.Array:
    """The documents unpacked, one per row `[N, longest]`, padded at the end (with causal
    attention, padding after a token does not change it)."""
    longest = max(map(len, documents))
    return jnp.asarray([list(doc.ljust(longest)) for doc in documents], jnp.int32)


def spans(documents: list[bytes]) -> list[slice]:
    """Where each document sits in the packed row."""
    ends = np.cumsum([len(doc) for doc in documents])
    return [slice(end - len(doc), end) for doc, end in zip(documents, ends, strict=True)]


def main() -> None:
    tokens, segment_ids = pack(DOCUMENTS)
    print(f"{len(DOCUMENTS)} documents packed into one row of {tokens.shape[1]} tokens")
    print(f"segment ids: {segment_ids[0].tolist()}")
    print(f"positions:   {pe.segment_positions(segment_ids)[0].tolist()}")

    # 1. dot_product_attention: segment_ids alone sets the mask and the positions.
    q, k, v = jax.random.normal(jax.random.key(0), (3, 1, tokens.shape[1], 2, 8))
    slopes = pe.alibi_slopes(2)

    def alibi(q_positions, k_positions):
        return pe.alibi_bias(q_positions, k_positions, slopes)

    @jax.jit
    def attention(q, k, v, segment_ids=None):
        return pe.dot_product_attention(
            q, k, v, bias_fn=alibi, causal=True, segment_ids=segment_ids
        )

    packed = attention(q, k, v, segment_ids)

    def alone(span: slice) -> jax.Array:
        return attention(q[:, span], k[:, span], v[:, span])

    worst = max(float(jnp.max(jnp.abs(packed[:, s] - alone(s)))) for s in spans(DOCUMENTS))
    print(f"alibi attention, packed vs per document: max |diff| {worst:.1e}")
    assert worst < 1e-5

    # 2. The model: every part of its encoding (here a learned table, RoPE and T5
    #    buckets) reads the same restarting positions, and attention the segment ids.
    encoding = "learned+rope+t5"
    model = pe.Transformer(
        pe.TransformerConfig(encoding=encoding, d_model=32, num_layers=1, num_heads=2)
    )
    params = jax.jit(model.init)(jax.random.key(1), tokens)
    apply = jax.jit(model.apply)
    logits = apply(params, tokens, segment_ids=segment_ids)
    alone = apply(params, one_per_row(DOCUMENTS))
    worst = max(
        float(jnp.max(jnp.abs(logits[0, span] - row[: span.stop - span.start])))
        for span, row in zip(spans(DOCUMENTS), alone, strict=True)
    )
    print(f"{encoding} model, packed logits vs each document alone: max |diff| {worst:.1e}")
    assert worst < 1e-4


if __name__ == "__main__":
    main()
