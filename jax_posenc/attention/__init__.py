"""Softmax attention with positional terms evaluated per block (O(L) memory).

`core.py` holds the public function and its argument handling, `_block.py` the
per-block maths both implementations share, `_blockwise.py` the tiling, scans and
custom VJP, and `cache.py` the KV cache. This package never imports the registry, the
encoding families, the model or training: the Flax glue that does lives in
`jax_posenc.layers`.
"""

from jax_posenc.attention.cache import KVCache, cached_attention, init_cache, update_cache
from jax_posenc.attention.core import (
    ACCELERATOR_BLOCK_SIZE,
    AUTO_XLA_MAX_LOGITS,
    CPU_BLOCK_TABLE,
    IMPLEMENTATIONS,
    default_block_size,
    dot_product_attention,
    resolve_implementation,
    segment_positions,
)

__all__ = [
    "ACCELERATOR_BLOCK_SIZE",
    "AUTO_XLA_MAX_LOGITS",
    "CPU_BLOCK_TABLE",
    "IMPLEMENTATIONS",
    "KVCache",
    "cached_attention",
    "default_block_size",
    "dot_product_attention",
    "init_cache",
    "resolve_implementation",
    "segment_positions",
    "update_cache",
]
