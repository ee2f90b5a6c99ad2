"""jax_posenc: positional encodings for transformers in JAX and Flax.

The public API is re-exported here; import from `jax_posenc`, never from submodules.
NNX modules live in the `jax_posenc.nnx` namespace.
"""

from jax_posenc._protocols import (
    BiasFn,
    PositionalTerms,
    QkTransform,
    RelativeTerms,
    combine,
)
from jax_posenc.absolute import (
    LearnedEmbedding,
    SinusoidalEmbedding,
    learned_embedding_lookup,
    sinusoidal_encoding,
    sinusoidal_frequencies,
)
from jax_posenc.attention import (
    KVCache,
    cached_attention,
    dot_product_attention,
    init_cache,
    segment_positions,
    update_cache,
)
from jax_posenc.bias import (
    AlibiBias,
    DynamicPositionBias,
    FireBias,
    KerpleBias,
    T5RelativePositionBias,
    alibi_bias,
    alibi_slopes,
    dynamic_position_bias,
    fire_bias,
    kerple_bias,
    kerple_constrain,
    t5_bias,
    t5_relative_position_bucket,
)
from jax_posenc.layers import EncodedAttention, make_attention_fn
from jax_posenc.model import Transformer, TransformerConfig
from jax_posenc.registry import (
    Encoding,
    EncodingSpec,
    available_encodings,
    get_encoding,
    register,
    resolve,
)
from jax_posenc.relative import (
    RelativePositionEmbedding,
    TransformerXLRelativePosition,
    clipped_relative_index,
    relative_logits,
    shaw_query_bias,
    shaw_value_term,
    transformer_xl_position_logits,
)
from jax_posenc.rope import (
    RotaryEmbedding,
    XPosEmbedding,
    apply_multi_axis_rope,
    apply_rope,
    apply_rope_qk,
    apply_xpos,
    rope_cos_sin,
    rope_frequencies,
    rope_layout_permutation,
)
from jax_posenc.rope_scaling import (
    DynamicNTKScaling,
    LinearScaling,
    Llama3Scaling,
    LongRopeScaling,
    NTKScaling,
    YarnScaling,
    from_hf_rope_parameters,
)

__version__ = "0.1.0"

__all__ = [
    "AlibiBias",
    "BiasFn",
    "DynamicNTKScaling",
    "DynamicPositionBias",
    "EncodedAttention",
    "Encoding",
    "EncodingSpec",
    "FireBias",
    "KVCache",
    "KerpleBias",
    "LearnedEmbedding",
    "LinearScaling",
    "Llama3Scaling",
    "LongRopeScaling",
    "NTKScaling",
    "PositionalTerms",
    "QkTransform",
    "RelativePositionEmbedding",
    "RelativeTerms",
    "RotaryEmbedding",
    "SinusoidalEmbedding",
    "T5RelativePositionBias",
    "Transformer",
    "TransformerConfig",
    "TransformerXLRelativePosition",
    "XPosEmbedding",
    "YarnScaling",
    "alibi_bias",
    "alibi_slopes",
    "apply_multi_axis_rope",
    "apply_rope",
    "apply_rope_qk",
    "apply_xpos",
    "available_encodings",
    "cached_attention",
    "clipped_relative_index",
    "combine",
    "dot_product_attention",
    "dynamic_position_bias",
    "fire_bias",
    "from_hf_rope_parameters",
    "get_encoding",
    "init_cache",
    "kerple_bias",
    "kerple_constrain",
    "learned_embedding_lookup",
    "make_attention_fn",
    "register",
    "relative_logits",
    "resolve",
    "rope_cos_sin",
    "rope_frequencies",
    "rope_layout_permutation",
    "segment_positions",
    "shaw_query_bias",
    "shaw_value_term",
    "sinusoidal_encoding",
    "sinusoidal_frequencies",
    "t5_bias",
    "t5_relative_position_bucket",
    "transformer_xl_position_logits",
    "update_cache",
]
