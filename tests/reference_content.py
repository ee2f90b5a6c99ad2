"""NumPy float64 references for content-dependent positions, written from the papers.

Forgetting Transformer (Lin et al., 2025, eqs. 4-6): per head h and token t,
`f_t = sigmoid(w_h . x_t + b_h)`, and the logit of query i for key j <= i gets
`D_ij = sum_{l=j+1..i} log f_l`. The sum is formed term by term for every pair (no
cumulative sums), and only over tokens of the query's own document when sequences are
packed (attention never crosses documents).

CoPE (Golovneva et al., 2024, sec. 3): query i gates key t with
`g_it = sigmoid(q_i . k_t / sqrt(D))`; key j sits at `p_ij = sum_{t=j..i} g_it` (the
allowed keys between them), clipped to `npos - 1`; the embedding at a fractional
position is the linear interpolation of the two integer neighbours,
`e(p) = (1 - w) e[floor p] + w e[ceil p]`, `w = p - floor p`, and the logit is
`(q_i . k_j + q_i . e(p_ij)) / sqrt(D)` (the reference code's default scaling). Formed
pair by pair, the interpolated vector first (no table of dot products).

SelfExtend (Jin et al., 2024): exact RoPE positions for keys within a neighbour window
of the query, grouped ones (floor division by the group size, the query shifted by
`window - window // G`) beyond, chosen pair by pair.
"""

import numpy as np
from reference_attention import attention_reference
from reference_rope import plain_inv_freq, rope_reference


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


def self_extend_logits_reference(q, k, q_positions, k_positions, *, group_size, window, base):
    """SelfExtend's content logits `[B, H, Lq, Lk]` in float64 (Jin et al., 2024, sec. 3):
    pair (i, j) with `q_pos - k_pos < window` takes RoPE at the exact positions, any
    other pair RoPE at `q_pos // G + window - window // G` and `k_pos // G`."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    inv_freq = plain_inv_freq(q.shape[-1], base)
    q_pos, k_pos = np.asarray(q_positions), np.asarray(k_positions)
    shift = window - window // group_size
    exact = rope_reference(q, q_pos, inv_freq), rope_reference(k, k_pos, inv_freq)
    grouped = (
        rope_reference(q, q_pos // group_size + shift, inv_freq),
        rope_reference(k, k_pos // group_size, inv_freq),
    )
    batch, q_len, heads, dim = q.shape
    group = heads // k.shape[2]
    logits = np.zeros((batch, heads, q_len, k.shape[1]))
    for b in range(batch):
        for h in range(heads):
            for i in range(q_len):
                for j in range(k.shape[1]):
                    near = q_pos[b, i] - k_pos[b, j] < window
                    q_rot, k_rot = exact if near else grouped
                    logits[b, h, i, j] = q_rot[b, i, h] @ k_rot[b, j, h // group] / np.sqrt(dim)
    return logits


def cope_positions_reference(gate_logits, allowed, num_positions):
    """`p` `[B, H, Lq, Lk]`: for each pair, the sum of the sigmoid gates of the allowed
    keys t >= j of the row (t <= i under a causal mask), clipped to `num_positions - 1`."""
    gate_logits = np.asarray(gate_logits, np.float64)
    allowed = np.broadcast_to(allowed, gate_logits.shape)
    gates = np.where(allowed, 1.0 / (1.0 + np.exp(-gate_logits)), 0.0)
    positions = np.zeros(gate_logits.shape)
    for index in np.ndindex(gate_logits.shape[:3]):
        for j in range(gate_logits.shape[3]):
            positions[(*index, j)] = sum(gates[(*index, t)] for t in range(j, gates.shape[3]))
    return np.minimum(positions, num_positions - 1)


def cope_bias_reference(q, k, embeddings, allowed):
    """CoPE's logit term `q_i . e(p_ij) / sqrt(D)` `[B, H, Lq, Lk]` in float64, for q
    `[B, Lq, H, D]`, k `[B, Lk, Hkv, D]`, embeddings `[H or 1, npos, D]`."""
    q, k, embeddings = (np.asarray(a, np.float64) for a in (q, k, embeddings))
    batch, q_len, heads, dim = q.shape
    group = heads // k.shape[2]
    scale = 1.0 / np.sqrt(dim)
    gate_logits = np.zeros((batch, heads, q_len, k.shape[1]))
    for b in range(batch):
        for h in range(heads):
            gate_logits[b, h] = scale * q[b, :, h] @ k[b, :, h // group].T
    positions = cope_positions_reference(gate_logits, allowed, embeddings.shape[1])
    bias = np.zeros(gate_logits.shape)
    for b, h, i, j in np.ndindex(bias.shape):
        table = embeddings[h if embeddings.shape[0] > 1 else 0]
        p = positions[b, h, i, j]
        lower, upper = int(np.floor(p)), int(np.ceil(p))
        weight = p - lower
        embedding = (1.0 - weight) * table[lower] + weight * table[upper]
        bias[b, h, i, j] = scale * q[b, i, h] @ embedding
    return bias


def cope_attention_reference(q, k, v, embeddings, allowed):
    """Float64 CoPE attention `[B, Lq, H, Dv]`; `allowed` broadcastable to
    `[B, H, Lq, Lk]` masks the gates and the softmax alike."""
    bias = cope_bias_reference(q, k, embeddings, allowed)
    return attention_reference(q, k, v, bias=bias, allowed=allowed)
