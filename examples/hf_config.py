"""Porting the RoPE settings of a Hugging Face config.json.

`from_hf_rope_parameters` maps a config's `rope_scaling` / `rope_parameters` dict to a
scaling spec and rejects keys it does not know. The base (`rope_theta`) and the rotated
width (`head_dim * partial_rotary_factor`) are read from the config by the caller, as
below, or all at once by `RopeSpec.from_hf_config` (see the README's "Porting a model").
The configs below are excerpts of published config.json files, inlined so nothing is
downloaded; each port is checked against a float64 NumPy transcription of what
transformers computes (`_compute_llama3_parameters`, `rotate_half`).

Run: python examples/hf_config.py
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

import jax_posenc as pe

LLAMA_3_1_8B = {  # meta-llama/Llama-3.1-8B
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}
PHI_2 = {  # microsoft/phi-2: RoPE on the first 40% of each head's features
    "hidden_size": 2560,
    "num_attention_heads": 32,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.4,
    "rope_scaling": None,
}


def rope_settings(config: dict) -> dict:
    """Keyword arguments of `apply_rope` for a config (head_dim = hidden / heads)."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rope_scaling = config.get("rope_scaling")
    scaling = None
    if rope_scaling is not None:
        scaling = pe.from_hf_rope_parameters(
            rope_scaling, max_position_embeddings=config["max_position_embeddings"]
        )
    return {
        "base": config["rope_theta"],
        "rotary_dim": int(head_dim * config.get("partial_rotary_factor", 1.0)),
        "scaling": scaling,
    }


def hf_llama3_inv_freq(dim: int, base: float, rope_scaling: dict) -> np.ndarray:
    """transformers' `_compute_llama3_parameters`, in float64 NumPy."""
    inv_freq = 1.0 / base ** (np.arange(0, dim, 2) / dim)
    factor = rope_scaling["factor"]
    low, high = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
    old_context = rope_scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = np.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= old_context / high) & (wavelength <= old_context / low)
    return np.where(medium, smoothed, scaled)


def hf_apply_rotary(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """transformers' `apply_rotary_pos_emb` with `rotate_half` and a partial rotary
    width, in float64 NumPy; x is `[B, S, H, D]`."""
    rotary_dim = 2 * inv_freq.size
    angles = positions[:, None] * inv_freq[None, :]
    cos = np.cos(np.concatenate([angles, angles], -1))[None, :, None, :]
    sin = np.sin(np.concatenate([angles, angles], -1))[None, :, None, :]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotate_half = np.concatenate([-rotated[..., half:], rotated[..., :half]], -1)
    return np.concatenate([rotated * cos + rotate_half * sin, passed], -1)


# Static settings (widths, base, the hashable scaling spec) are compiled into the function.
apply_rope = jax.jit(pe.apply_rope, static_argnames=("base", "rotary_dim", "scaling"))


def main() -> None:
    positions = np.array([0, 1, 7, 1000, 8191, 100_000])
    for name, config in (("Llama-3.1-8B", LLAMA_3_1_8B), ("phi-2", PHI_2)):
        settings = rope_settings(config)
        print(f"{name}: {settings}")
        inv_freq, attention_factor = pe.rope_frequencies(
            settings["rotary_dim"], base=settings["base"], scaling=settings["scaling"]
        )
        if config["rope_scaling"] is not None:
            expected = hf_llama3_inv_freq(
                settings["rotary_dim"], settings["base"], config["rope_scaling"]
            )
        else:
            expected = 1.0 / settings["base"] ** (
                np.arange(0, settings["rotary_dim"], 2) / settings["rotary_dim"]
            )
        np.testing.assert_allclose(inv_freq, expected, rtol=1e-12)
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        q = jax.random.normal(jax.random.key(0), (1, positions.size, 2, head_dim))
        got = apply_rope(q, jnp.asarray(positions), **settings)
        reference = hf_apply_rotary(np.asarray(q, np.float64), positions, expected)
        error = float(np.max(np.abs(np.asarray(got, np.float64) - reference)))
        print(
            f"  inv_freq equals transformers' ({inv_freq.size} pairs, attention factor "
            f"{attention_factor}); apply_rope vs float64 rotate_half up to position "
            f"{positions.max()}: max |diff| {error:.1e}"
        )
        assert error < 1e-5
        # RopeSpec.from_hf_config reads the whole config in one call, to the same settings.
        spec = pe.RopeSpec.from_hf_config(config)
        assert (spec.base, spec.rotary_dim, spec.scaling) == tuple(settings.values())
        print(f"  RopeSpec.from_hf_config agrees: {spec.layout} layout, head_dim {spec.head_dim}")

    # The same settings drive the Flax attention_fn and the model, as "rope" options.
    attention_fn = pe.make_attention_fn("rope", rope=rope_settings(LLAMA_3_1_8B))
    x = jax.random.normal(jax.random.key(1), (1, 8, 2, 128))
    out = jax.jit(attention_fn)(x, x, x)
    print(f"make_attention_fn('rope', rope=<Llama 3.1 settings>): output {out.shape}")


if __name__ == "__main__":
    main()
