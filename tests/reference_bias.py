"""Float64 NumPy references for the attention biases and relative terms, from the papers.

Each function follows the paper's formula literally (loops or naive tensors where that is
clearer), independent of the library code.
"""

import math

import numpy as np


def t5_bucket_reference(relative_position, *, bidirectional, num_buckets, max_distance):
    """T5 buckets as described by Raffel et al. (2020) and Mesh TensorFlow, in float64."""
    relative_position = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros(relative_position.shape, dtype=np.int64)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0) * num_buckets
        n = np.abs(relative_position)
    else:
        n = np.maximum(-relative_position, 0)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):
        scaled = (
            np.log(n.astype(np.float64) / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        )
    large = max_exact + np.floor(np.where(n < max_exact, 0.0, scaled)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(n < max_exact, n, large)


def alibi_slopes_reference(num_heads):
    """Closed form: 2^(-8h/n) for a power of two n; otherwise the lower power of two's
    slopes followed by the odd-indexed slopes 2^(-8(2j+1)/(2p)) of the next one."""
    lower = 2 ** math.floor(math.log2(num_heads))
    slopes = [2.0 ** (-8.0 * h / lower) for h in range(1, lower + 1)]
    slopes += [2.0 ** (-8.0 * (2 * j + 1) / (2 * lower)) for j in range(num_heads - lower)]
    return np.array(slopes)


def _as_batch(positions):
    positions = np.asarray(positions, dtype=np.int64)
    return positions[None] if positions.ndim == 1 else positions


def distance_grid(q_positions, k_positions):
    """k - q as int64 [B, bq, bk]."""
    q, k = _as_batch(q_positions), _as_batch(k_positions)
    return k[:, None, :] - q[:, :, None]


def alibi_reference(q_positions, k_positions, slopes, *, bidirectional):
    """-m (i - j) (causal) or -m |i - j| (bidirectional), [B, H, bq, bk]."""
    d = distance_grid(q_positions, k_positions).astype(np.float64)
    d = -np.abs(d) if bidirectional else d
    return d[:, None] * np.asarray(slopes, np.float64)[None, :, None, None]


def kerple_reference(q_positions, k_positions, r1, r2, *, variant):
    """-r1 log(1 + r2 |m - n|) or -r1 |m - n|^r2 (Chi et al., 2022), [B, H, bq, bk]."""
    d = np.abs(distance_grid(q_positions, k_positions)).astype(np.float64)[:, None]
    r1 = np.asarray(r1, np.float64)[None, :, None, None]
    r2 = np.asarray(r2, np.float64)[None, :, None, None]
    if variant == "log":
        return -r1 * np.log(1.0 + r2 * d)
    return -r1 * d**r2


def mlp_reference(x, layers, activation):
    """Scalar-input MLP: x [...] -> [..., H]; activation between layers."""
    hidden = np.asarray(x, np.float64)[..., None]
    for index, (kernel, bias) in enumerate(layers):
        if index:
            hidden = activation(hidden)
        hidden = hidden @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)
    return hidden


def relu(x):
    return np.maximum(x, 0.0)


def silu(x):
    return x / (1.0 + np.exp(-x))


def fire_reference(q_positions, k_positions, layers, c, threshold):
    """b(i, j) = f(psi(i - j) / psi(max(L, i))), psi(x) = log(c x + 1) (Li et al., 2023)."""
    q = _as_batch(q_positions).astype(np.float64)
    d = np.abs(distance_grid(q_positions, k_positions)).astype(np.float64)
    psi = lambda x: np.log(c * x + 1.0)  # noqa: E731
    ratio = psi(d) / psi(np.maximum(threshold, q))[:, :, None]
    return np.moveaxis(mlp_reference(ratio, layers, relu), -1, 1)


def dpb_reference(q_positions, k_positions, layers, *, log_distance, absolute):
    """MLP(SiLU) over the (signed or absolute, optionally log-scaled) distance."""
    d = distance_grid(q_positions, k_positions).astype(np.float64)
    if absolute:
        d = np.abs(d)
    if log_distance:
        d = np.sign(d) * np.log(1.0 + np.abs(d))
    return np.moveaxis(mlp_reference(d, layers, silu), -1, 1)


def shaw_reference(q, k, weights, q_positions, k_positions, key_table, value_table):
    """Naive Shaw et al. (2018), eqs. (3)-(5), with [B, bq, bk, D] relative tensors.

    Returns (logits [B, H, bq, bk] including the content term and the 1/sqrt(D) scale,
    value term [B, bq, H, Dv] = sum_j weights_ij a^V_ij).
    """
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    radius = (np.asarray(key_table).shape[0] - 1) // 2
    index = np.clip(distance_grid(q_positions, k_positions), -radius, radius) + radius
    a_key = np.asarray(key_table, np.float64)[index]  # [B or 1, bq, bk, D]
    a_value = np.asarray(value_table, np.float64)[index]
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) + np.einsum("bqhd,bqkd->bhqk", q, a_key)
    value_term = np.einsum("bhqk,bqkd->bqhd", np.asarray(weights, np.float64), a_value)
    return logits * scale, value_term


def sinusoid_concat(t, dim, base=10000.0):
    """[sin(t w_i), cos(t w_i)] with w_i = base^(-2i/dim), float64, for any (signed) t."""
    freqs = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = np.asarray(t, np.float64)[..., None] * freqs
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)


def transformer_xl_reference(q, k, q_positions, k_positions, kernel, u, v, base=10000.0):
    """Naive Transformer-XL logits (Dai et al., 2019, eq. in section 3.3), scaled by 1/sqrt(D):

    (a) q.k + (b) q.W_R R_{i-j} + (c) u.k + (d) v.W_R R_{i-j}, with an explicit
    [B, bq, bk, F] table R_{i-j} and [B, bq, bk, H, D] projected table.
    """
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    kernel = np.asarray(kernel, np.float64)
    relative = -distance_grid(q_positions, k_positions)  # i - j
    r = sinusoid_concat(relative, kernel.shape[0], base)  # [B, bq, bk, F]
    projected = np.einsum("bqkf,fhd->bqkhd", r, kernel)
    content = np.einsum("bqhd,bkhd->bhqk", q + np.asarray(u, np.float64), k)
    position = np.einsum("bqhd,bqkhd->bhqk", q + np.asarray(v, np.float64), projected)
    return (content + position) / math.sqrt(q.shape[-1])
