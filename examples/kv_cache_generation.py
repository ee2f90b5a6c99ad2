"""Token-by-token generation with a KV cache, RoPE and ALiBi.

Keys go into the cache already rotated at their own positions, with those positions,
so a bias reads where every cached token sits. Two ways to decode:

1. the library's functional cache (`init_cache`, `update_cache`, `cached_attention`),
   here in a one-layer toy language model that generates greedily under `jax.jit`;
2. Flax's own `decode=True` path with `make_attention_fn`: the layer keeps the cache and
   the query's position is read from the mask Flax passes.

Both are checked against one causal pass over the whole sequence.

Run: python examples/kv_cache_generation.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jax_posenc as pe

VOCAB, HEADS, HEAD_DIM, PROMPT, NEW_TOKENS = 32, 2, 8, 5, 11
FEATURES = HEADS * HEAD_DIM
MAX_LENGTH = PROMPT + NEW_TOKENS
SLOPES = pe.alibi_slopes(HEADS)


def init_params(key: jax.Array) -> dict[str, jax.Array]:
    names = ("embed", "query", "key", "value", "unembed")
    shapes = ((VOCAB, FEATURES), *[(FEATURES, FEATURES)] * 3, (FEATURES, VOCAB))
    keys = jax.random.split(key, len(names))
    return {
        name: jax.random.normal(k, shape) / np.sqrt(shape[0])
        for name, k, shape in zip(names, keys, shapes, strict=True)
    }


def project(params, tokens, positions):
    """Queries (rotated), keys (rotated) and values `[B, T, H, D]` of `tokens` `[B, T]`."""
    x = params["embed"][tokens]
    q, k, v = (
        (x @ params[name]).reshape(*tokens.shape, HEADS, HEAD_DIM)
        for name in ("query", "key", "value")
    )
    return pe.apply_rope(q, positions), pe.apply_rope(k, positions), v


def logits_of(params, attended):
    return attended.reshape(*attended.shape[:2], FEATURES) @ params["unembed"]


def alibi(q_positions, k_positions):
    return pe.alibi_bias(q_positions, k_positions, SLOPES)


@jax.jit
def prefill(params, tokens):
    """Fills an empty cache with the prompt; returns the logits and the cache."""
    positions = jnp.arange(tokens.shape[1])
    q, k, v = project(params, tokens, positions)
    cache = pe.init_cache(tokens.shape[0], MAX_LENGTH, HEADS, HEAD_DIM)
    cache = pe.update_cache(cache, k, v, positions)
    out = pe.cached_attention(q, cache, q_positions=positions, bias_fn=alibi)
    return logits_of(params, out), cache


@jax.jit
def decode_step(params, cache, token):
    """One new token `[B, 1]` at position `cache.length`: its logits and the cache."""
    position = cache.length[None]
    q, k, v = project(params, token, position)
    cache = pe.update_cache(cache, k, v, position)
    out = pe.cached_attention(q, cache, q_positions=position, bias_fn=alibi)
    return logits_of(params, out), cache


@jax.jit
def full_pass(params, tokens):
    positions = jnp.arange(tokens.shape[1])
    q, k, v = project(params, tokens, positions)
    return logits_of(params, pe.dot_product_attention(q, k, v, bias_fn=alibi, causal=True))


def generate_with_the_library_cache() -> None:
    params = init_params(jax.random.key(0))
    prompt = jax.random.randint(jax.random.key(1), (2, PROMPT), 0, VOCAB)
    logits, cache = prefill(params, prompt)
    tokens, step_logits = [prompt], [logits]
    for _ in range(NEW_TOKENS):
        next_token = jnp.argmax(step_logits[-1][:, -1:], axis=-1)
        tokens.append(next_token)
        logits, cache = decode_step(params, cache, next_token)
        step_logits.append(logits)
    sequence = jnp.concatenate(tokens, axis=1)
    print(f"greedy continuation of 2 prompts of {PROMPT} tokens: {np.asarray(sequence).tolist()}")
    print(
        f"cache: {int(cache.length)} of {MAX_LENGTH} slots filled, positions {cache.positions[0]}"
    )
    # The logits computed through the cache equal one causal pass over the sequence.
    decoded = jnp.concatenate(step_logits, axis=1)
    difference = float(jnp.max(jnp.abs(decoded - full_pass(params, sequence))))
    print(f"decoded logits vs one causal pass: max |diff| {difference:.1e}")
    assert difference < 1e-4


def decode_with_flax() -> None:
    def layer(decode: bool) -> nn.MultiHeadDotProductAttention:
        return nn.MultiHeadDotProductAttention(
            num_heads=HEADS,
            qkv_features=FEATURES,
            attention_fn=pe.make_attention_fn("rope+alibi"),
            decode=decode,
        )

    x = jax.random.normal(jax.random.key(2), (2, MAX_LENGTH, FEATURES))
    mask = nn.make_causal_mask(x[..., 0])
    params = layer(False).init(jax.random.key(3), x, mask=mask)["params"]
    full = layer(False).apply({"params": params}, x, mask=mask)

    decoder = layer(True)
    cache = decoder.init(jax.random.key(0), x)["cache"]  # sized by x: MAX_LENGTH slots

    @jax.jit
    def step(cache, x_t):
        out, variables = decoder.apply({"params": params, "cache": cache}, x_t, mutable=["cache"])
        return out, variables["cache"]

    outputs = []
    for t in range(MAX_LENGTH):
        out, cache = step(cache, x[:, t : t + 1])
        outputs.append(out)
    difference = float(jnp.max(jnp.abs(jnp.concatenate(outputs, axis=1) - full)))
    print(f"Flax decode=True, {MAX_LENGTH} steps vs the causal pass: max |diff| {difference:.1e}")
    assert difference < 1e-5


def main() -> None:
    generate_with_the_library_cache()
    decode_with_flax()


if __name__ == "__main__":
    main()
