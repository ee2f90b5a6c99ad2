"""jax_posenc: positional encodings for transformers in JAX and Flax.

The public API is re-exported here; import from `jax_posenc`, never from submodules.
NNX modules live in the `jax_posenc.nnx` namespace.
"""

from jax_posenc.absolute import (
    LearnedEmbedding,
    SinusoidalEmbedding,
    learned_embedding_lookup,
    sinusoidal_encoding,
    sinusoidal_frequencies,
)

__version__ = "0.1.0"

__all__ = [
    "LearnedEmbedding",
    "SinusoidalEmbedding",
    "learned_embedding_lookup",
    "sinusoidal_encoding",
    "sinusoidal_frequencies",
]
