"""NumPy float64 references for content-dependent positions, written from the papers.

Forgetting Transformer (Lin et al., 2025, eqs. 4-6): per head h and token t,
`f_t = sigmoid(w_h . x_t + b_h)`, and the logit of query i for key j <= i gets
`D_ij = sum_{l=j+1..i} log f_l`. The sum is formed term by term for every pair (no
cumulative sums), and only over tokens of the query's own document when sequences are
packed (attention never crosses documents).
"""

import numpy as np
from reference_attention import attention_reference


def log_sigmoid(u):
    """`log(1 / (1 + exp(-u)))` in float64, stable for either sign of u."""
    u = np.asarray(u, np.float64)
    return np.where(u >= 0, -np.log1p(np.exp(-u)), u - np.log1p(np.exp(u)))


def forget_gates_reference(x, w, b):
    """`log f` `[B, H, S]` from x `[B, S, F]`, w `[F, H]`, b `[H]`."""
    x, w, b = (np.asarray(a, np.float64) for a in (x, w, b))
    return log_sigmoid(np.einsum("bsf,fh->bhs", x, w) + b[None, :, None])


def forgetting_bias_reference(log_forget, segment_ids=None):
    """`D` `[B, H, S, S]`: the sum of `log f_l` over `j < l <= i`, for j <= i in the same
    document (0 elsewhere; those pairs are masked)."""
    log_forget = np.asarray(log_forget, np.float64)
    batch, heads, length = log_forget.shape
    ids = np.zeros((batch, length), int) if segment_ids is None else np.asarray(segment_ids)
    ids = np.broadcast_to(ids, (batch, length))
    bias = np.zeros((batch, heads, length, length))
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                for j in range(i + 1):
                    if ids[b, i] == ids[b, j]:
                        terms = [log_forget[b, h, t] for t in range(j + 1, i + 1)]
                        bias[b, h, i, j] = sum(terms)
    return bias


def causal_allowed(length, segment_ids=None):
    """`[B or 1, 1, S, S]` bool: key j <= query i, same document."""
    allowed = np.tril(np.ones((length, length), bool))[None, None]
    if segment_ids is not None:
        ids = np.asarray(segment_ids)
        allowed = allowed & (ids[:, None, :, None] == ids[:, None, None, :])
    return allowed


def fox_attention_reference(q, k, v, x, w, b, segment_ids=None):
    """Float64 causal FoX attention `[B, S, H, Dv]` with the gate reading x."""
    bias = forgetting_bias_reference(forget_gates_reference(x, w, b), segment_ids)
    allowed = causal_allowed(q.shape[1], segment_ids)
    return attention_reference(q, k, v, bias=bias, allowed=allowed)


def numerical_gradient(fn, value, step=1e-6):
    """Central differences of the scalar `fn` at `value`, in float64."""
    value = np.array(value, np.float64)
    grad = np.zeros_like(value)
    for index in np.ndindex(value.shape):
        shifted = value.copy()
        shifted[index] += step
        upper = fn(shifted)
        shifted[index] -= 2 * step
        grad[index] = (upper - fn(shifted)) / (2 * step)
    return grad
