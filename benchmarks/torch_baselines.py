"""PyTorch baselines of the torch comparison (the `torch` group of the suite).

These are the forms a PyTorch user reaches for, each at its best on the CPU:

* FlexAttention (`torch.nn.attention.flex_attention`) compiled with `torch.compile`,
  with a causal block mask and the positional term as a `score_mod`: ALiBi
  (`score - slope[h] * |i - j|`) or a learned T5 bucket bias (`score + table[h,
  bucket(i - j)]`);
* scaled dot-product attention (SDPA) with the ALiBi or T5 bias and the causal mask
  materialized as one `[1, H, L, L]` additive tensor, built once (as a cached mask
  would be), and SDPA's own causal path without a bias;
* RoPE with Hugging Face's formula: `cos`/`sin` of `positions * inv_freq` duplicated to
  the head dimension, then `x * cos + rotate_half(x) * sin`, eager and compiled.

torch lays attention out as `[B, H, L, D]`; the inputs hold the same values as the JAX
cases' `[B, L, H, D]` arrays. This module imports torch: `benchmarks/cases.py` imports it
only when torch is installed (`pip install 'jax_posenc[bench]'`) and a torch case runs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

# Every (length, head_dim, score_mod, pass) compiles its own specialised kernels; the
# default limit of 8 graphs per function would fall back to eager FlexAttention.
_COMPILE_CACHE_SIZE = 256


def setup(threads: int) -> None:
    """Pins torch's intra-op threads, flushes denormals to zero as XLA's CPU backend does,
    and lets torch.compile keep every case's graph.

    Without the flush, SDPA's backward with an ALiBi bias runs 1.8x slower (L = 1k):
    the bias pushes many `exp` results below float32's normal range, and arithmetic on
    denormals is slow on x86. JAX computes on the CPU with denormals flushed.
    """
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch._dynamo.config.cache_size_limit = _COMPILE_CACHE_SIZE
    torch._dynamo.config.accumulated_cache_size_limit = _COMPILE_CACHE_SIZE


def heads_first(array: np.ndarray, requires_grad: bool = False) -> torch.Tensor:
    """float32 `[B, L, H, D]` host array -> torch `[B, H, L, D]` (contiguous)."""
    tensor = torch.tensor(np.swapaxes(array, 1, 2), dtype=torch.float32)
    return tensor.requires_grad_(requires_grad)


def _causal_mask(batch, head, q_index, kv_index):
    return q_index >= kv_index


def alibi_score_mod(slopes: np.ndarray) -> Callable:
    """`score - slope[h] * |i - j|` (symmetric ALiBi, as `jax_posenc.alibi_bias`)."""
    slopes = torch.tensor(slopes, dtype=torch.float32)

    def score_mod(score, batch, head, q_index, kv_index):
        return score - slopes[head] * (q_index - kv_index).abs()

    return score_mod


def t5_score_mod(table: np.ndarray, bucket_of_distance: np.ndarray) -> Callable:
    """`score + table[bucket(i - j), h]`, causal T5 buckets looked up by distance.

    Args:
      table: `[num_buckets, H]` learned bias.
      bucket_of_distance: bucket of every distance `0 .. max_distance` (the last one
        also holds every longer distance).
    """
    table = torch.tensor(table.T, dtype=torch.float32)
    buckets = torch.tensor(bucket_of_distance, dtype=torch.int64)
    longest = len(bucket_of_distance) - 1

    def score_mod(score, batch, head, q_index, kv_index):
        return score + table[head, buckets[(q_index - kv_index).clamp(0, longest)]]

    return score_mod


def flex(length: int, score_mod: Callable) -> Callable:
    """Compiled causal FlexAttention of `[1, H, length, D]` q, k, v with `score_mod`."""
    block_mask = create_block_mask(_causal_mask, None, None, length, length, device="cpu")
    compiled = torch.compile(flex_attention, dynamic=False)

    def attend(q, k, v):
        return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)

    return attend


def _distances(length: int) -> torch.Tensor:
    """`[L, L]` int64 `i - j` (query minus key)."""
    index = torch.arange(length)
    return index[:, None] - index[None, :]


def _causal_bias(bias: torch.Tensor) -> torch.Tensor:
    """`[H, L, L]` bias -> `[1, H, L, L]` with `-inf` for keys after the query."""
    return bias.masked_fill(_distances(bias.shape[-1]) < 0, float("-inf"))[None]


def alibi_causal_bias(slopes: np.ndarray, length: int) -> torch.Tensor:
    """`[1, H, L, L]` float32: `-slope * |i - j|` where `j <= i`, `-inf` after the query."""
    distance = _distances(length).abs().float()
    return _causal_bias(-torch.tensor(slopes, dtype=torch.float32)[:, None, None] * distance)


def t5_causal_bias(table: np.ndarray, bucket_of_distance: np.ndarray, length: int):
    """`[1, H, L, L]` float32: `table[bucket(i - j), h]` where `j <= i`, `-inf` after."""
    buckets = torch.tensor(bucket_of_distance, dtype=torch.int64)
    distance = _distances(length).clamp(0, len(bucket_of_distance) - 1)
    bias = torch.tensor(table, dtype=torch.float32)[buckets[distance]]  # [L, L, H]
    return _causal_bias(bias.permute(2, 0, 1))


def sdpa_with_bias(bias: torch.Tensor) -> Callable:
    """SDPA with a materialized additive bias (causality folded into it)."""

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    return attend


def sdpa_causal(q, k, v):
    """SDPA's causal path, no positional term."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def positions(array: np.ndarray) -> torch.Tensor:
    """Integer positions as a torch int64 tensor."""
    return torch.from_numpy(np.asarray(array, dtype=np.int64))


def hf_inv_freq(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """`base^(-2i/D)` as Hugging Face's rotary embedding computes it (float32)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`[x1, x2] -> [-x2, x1]` on the last axis (the GPT-NeoX / Llama pairing)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def hf_rope(q, k, positions, inv_freq):
    """RoPE of `[B, H, L, D]` q and k at `[B, L]` positions, Hugging Face's formula."""
    angles = positions[:, :, None].float() * inv_freq
    table = torch.cat((angles, angles), dim=-1)
    cos, sin = table.cos()[:, None], table.sin()[:, None]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def compiled(function: Callable) -> Callable:
    """`torch.compile` with shapes specialised per case (the fastest kernels)."""
    return torch.compile(function, dynamic=False)


def with_backward(forward: Callable) -> Callable:
    """`fn(*args) -> gradients of the summed outputs` for the arguments that need them."""

    def run(*args):
        outputs = forward(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        wanted = [arg for arg in args if isinstance(arg, torch.Tensor) and arg.requires_grad]
        return torch.autograd.grad(sum(out.sum() for out in outputs), wanted)

    return run
