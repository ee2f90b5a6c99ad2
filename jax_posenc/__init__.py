"""jax_posenc: positional encodings for transformers in JAX and Flax.

The public API is re-exported here; import from `jax_posenc`, never from submodules.
NNX modules live in the `jax_posenc.nnx` namespace.
"""

from jax_posenc._protocols import BiasFn, RelativeTerms
from jax_posenc.absolute import (
    LearnedEmbedding,
    SinusoidalEmbedding,
    learned_embedding_lookup,
    sinusoidal_encoding,
    sinusoidal_frequencies,
)
from jax_posenc.registry import (
    Encoding,
    EncodingSpec,
    available_encodings,
    get_encoding,
    register,
    resolve,
)

__version__ = "0.1.0"

__all__ = [
    "BiasFn",
    "Encoding",
    "EncodingSpec",
    "LearnedEmbedding",
    "RelativeTerms",
    "SinusoidalEmbedding",
    "available_encodings",
    "get_encoding",
    "learned_embedding_lookup",
    "register",
    "resolve",
    "sinusoidal_encoding",
    "sinusoidal_frequencies",
]
