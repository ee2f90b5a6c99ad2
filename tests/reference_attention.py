"""NumPy float64 reference for softmax attention with positional terms.

Written from the definitions (Vaswani et al. 2017, eq. 1, with an additive logit term;
Shaw et al. 2018, eqs. 3-5, for the relative key and value terms), looping over
batch and heads so it shares no code or layout tricks with `jax_posenc.attention`.
"""

import numpy as np


def attention_reference(
    q,
    k,
    v,
    *,
    scale=None,
    bias=None,
    allowed=None,
    relative_keys=None,
    relative_values=None,
    content_bias=None,
):
    """Float64 attention output `[B, Lq, H, Dv]`.

    Args:
      q: `[B, Lq, H, D]`; k: `[B, Lk, Hkv, D]`; v: `[B, Lk, Hkv, Dv]`; query head h
        reads key/value head `h // (H // Hkv)`.
      scale: logit scale, `1 / sqrt(D)` when None.
      bias: additive logits broadcastable to `[B, H, Lq, Lk]`.
      allowed: boolean broadcastable to `[B, H, Lq, Lk]`; rows with no allowed key
        give zeros.
      relative_keys: `[B, Lq, Lk, H, D]` vectors a^K_ij; adds `scale * q_i . a^K_ij`.
      relative_values: `[B, Lq, Lk, H, Dv]` vectors a^V_ij; adds `sum_j w_ij a^V_ij`.
      content_bias: `[H, D]` vector u; the content logit becomes `scale * (q_i + u) . k_j`.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, q_len, heads, dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = 1.0 / np.sqrt(dim) if scale is None else scale
    shape = (batch, heads, q_len, k_len)
    bias = np.zeros(shape) if bias is None else np.broadcast_to(np.asarray(bias, np.float64), shape)
    allowed = np.ones(shape, bool) if allowed is None else np.broadcast_to(allowed, shape)
    u = np.zeros((heads, dim)) if content_bias is None else np.asarray(content_bias, np.float64)
    out = np.zeros((batch, q_len, heads, v.shape[-1]))
    for b in range(batch):
        for h in range(heads):
            kh = k[b, :, h // group]
            logits = scale * (q[b, :, h] + u[h]) @ kh.T + bias[b, h]
            if relative_keys is not None:
                rel = np.asarray(relative_keys[b, :, :, h], np.float64)
                logits = logits + scale * np.einsum("id,ijd->ij", q[b, :, h], rel)
            for i in range(q_len):
                keep = allowed[b, h, i]
                if not keep.any():
                    continue
                z = logits[i, keep]
                w = np.exp(z - z.max())
                w /= w.sum()
                out[b, i, h] = w @ v[b, keep, h // group]
                if relative_values is not None:
                    rel = np.asarray(relative_values[b, i, keep, h], np.float64)
                    out[b, i, h] += w @ rel
    return out
