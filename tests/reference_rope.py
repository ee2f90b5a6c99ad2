"""NumPy float64 references for the rotary family, written from the papers' formulas.

The rotation is written with complex numbers (Su et al., 2021, section 3.2: a pair
(a, b) is the complex number a + ib, multiplied by e^{i m theta}), a formulation the
package does not use, and every frequency rule is written per pair with plain Python
branches, independent of the package's vectorised code.
"""

import math

import numpy as np


def plain_inv_freq(rotary_dim, base=10000.0):
    """Su et al. (2021): theta_i = base^(-2i/d), i = 0 .. d/2 - 1."""
    return np.array([base ** (-2.0 * i / rotary_dim) for i in range(rotary_dim // 2)])


def pair_indices(rotary_dim, layout):
    """(first, second) feature indices of each pair."""
    n = rotary_dim // 2
    if layout == "half":
        return np.arange(n), np.arange(n) + n
    return np.arange(0, rotary_dim, 2), np.arange(1, rotary_dim, 2)


def rope_reference(x, positions, inv_freq, *, layout="half", attention_factor=1.0):
    """RoPE of x [B, S, H, D] (float64) at positions [S] or [B, S].

    inv_freq is [n] (shared) or [H, n] (per head); features from 2n on pass through.
    """
    x = np.asarray(x, np.float64)
    inv_freq = np.asarray(inv_freq, np.float64)
    positions = np.asarray(positions, np.float64)
    if positions.ndim == 1:
        positions = np.broadcast_to(positions, x.shape[:2])
    rotary_dim = 2 * inv_freq.shape[-1]
    first, second = pair_indices(rotary_dim, layout)
    z = x[..., first] + 1j * x[..., second]
    if inv_freq.ndim == 1:
        angle = positions[:, :, None, None] * inv_freq[None, None, None, :]
    else:
        angle = positions[:, :, None, None] * inv_freq[None, None, :, :]
    z = z * attention_factor * np.exp(1j * angle)
    out = x.copy()
    out[..., first] = z.real
    out[..., second] = z.imag
    return out


# ---------------------------------------------------------------- scalings


def linear_inv_freq(rotary_dim, base, factor):
    """Chen et al. (2023): positions divided by the factor, i.e. theta_i / factor."""
    return plain_inv_freq(rotary_dim, base) / factor


def ntk_inv_freq(rotary_dim, base, factor):
    """NTK-aware (bloc97 2023; Peng et al. 2023 eq. 16): b' = b * s^(d / (d - 2))."""
    new_base = base * factor ** (rotary_dim / (rotary_dim - 2))
    return plain_inv_freq(rotary_dim, new_base)


def dynamic_ntk_inv_freq(rotary_dim, base, factor, original, seq_len):
    """Dynamic NTK: the NTK base with s replaced by (s * L / L0 - (s - 1)), L >= L0."""
    length = max(seq_len, original)
    new_base = base * (factor * length / original - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
    return plain_inv_freq(rotary_dim, new_base)


def yarn_ramp_bounds(rotary_dim, base, original, beta_fast, beta_slow, truncate=True):
    """Pair indices where pair i makes beta_fast / beta_slow turns over L0 positions.

    A pair with wavelength lambda_i = 2 pi base^(2i/d) turns r_i = L0 / lambda_i times;
    r_i = beta  <=>  i = d * ln(L0 / (2 pi beta)) / (2 ln base).
    """
    low = rotary_dim * math.log(original / (2 * math.pi * beta_fast)) / (2 * math.log(base))
    high = rotary_dim * math.log(original / (2 * math.pi * beta_slow)) / (2 * math.log(base))
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, rotary_dim - 1)


def yarn_inv_freq(rotary_dim, base, factor, original, beta_fast=32, beta_slow=1, truncate=True):
    """Peng et al. (2023) NTK-by-parts: h(theta) = (1 - g) theta / s + g theta per pair.

    g = 1 (keep theta) for pairs that turn more than beta_fast times in the original
    context, g = 0 (interpolate) below beta_slow turns, linear in the pair index between
    (the authors' released code).
    """
    low, high = yarn_ramp_bounds(rotary_dim, base, original, beta_fast, beta_slow, truncate)
    if high == low:
        high = low + 0.001
    out = []
    for i, theta in enumerate(plain_inv_freq(rotary_dim, base)):
        interpolation = min(max((i - low) / (high - low), 0.0), 1.0)
        out.append((1 - interpolation) * theta + interpolation * theta / factor)
    return np.array(out)


def yarn_attention_factor(factor, mscale=None, mscale_all_dim=None, attention_factor=None):
    """sqrt(1/t) = 0.1 ln(s) + 1 (Peng et al. 2023, eq. 22); DeepSeek-V2's mscale ratio."""
    if attention_factor is not None:
        return attention_factor

    def m(scale, coefficient):
        return 1.0 if scale <= 1 else 0.1 * coefficient * math.log(scale) + 1.0

    if mscale and mscale_all_dim:
        return m(factor, mscale) / m(factor, mscale_all_dim)
    return m(factor, 1.0)


def llama3_inv_freq(rotary_dim, base, factor, low_freq_factor, high_freq_factor, original):
    """Llama 3.1: keep short wavelengths, divide long ones by factor, blend in between."""
    low_freq_wavelen = original / low_freq_factor
    high_freq_wavelen = original / high_freq_factor
    out = []
    for theta in plain_inv_freq(rotary_dim, base):
        wavelen = 2 * math.pi / theta
        if wavelen < high_freq_wavelen:
            out.append(theta)
        elif wavelen > low_freq_wavelen:
            out.append(theta / factor)
        else:
            smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * theta / factor + smooth * theta)
    return np.array(out)


def longrope_inv_freq(rotary_dim, base, factors):
    """Ding et al. (2024): theta_i / lambda_i with the searched rescale factors lambda_i."""
    return np.array([t / f for t, f in zip(plain_inv_freq(rotary_dim, base), factors, strict=True)])


def longrope_attention_factor(factor, original):
    """sqrt(1 + ln(s) / ln(L0)) for s > 1 (Phi-3 / LongRoPE), else 1."""
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))


# ---------------------------------------------------------------- xPos


def xpos_reference(x, positions, rotary_dim, *, scale_base=512.0, key=False, layout="half"):
    """Sun et al. (2022): RoPE, then pair i scaled by zeta_i^(+-n / scale_base).

    zeta_i = (2i/d + 0.4) / 1.4; queries use +n, keys -n (absolute positions, fine in
    float64 for the moderate positions of the tests).
    """
    inv_freq = plain_inv_freq(rotary_dim)
    rotated = rope_reference(x, positions, inv_freq, layout=layout)
    zeta = np.array([(2 * i / rotary_dim + 0.4) / 1.4 for i in range(rotary_dim // 2)])
    positions = np.asarray(positions, np.float64)
    if positions.ndim == 1:
        positions = np.broadcast_to(positions, x.shape[:2])
    sign = -1.0 if key else 1.0
    scale = zeta[None, None, None, :] ** (sign * positions[:, :, None, None] / scale_base)
    first, second = pair_indices(rotary_dim, layout)
    rotated[..., first] *= scale
    rotated[..., second] *= scale
    return rotated


# ---------------------------------------------------------------- whole-config RoPE


def proportional_inv_freq(head_dim, base, fraction, factor=1.0):
    """Gemma 4 p-RoPE: the first floor(fraction * head_dim / 2) pairs keep
    base^(-2i/head_dim) (exponent over the whole head), the others get 0; all / factor."""
    rotated = int(fraction * head_dim // 2)
    return np.array(
        [
            (base ** (-2.0 * i / head_dim) if i < rotated else 0.0) / factor
            for i in range(head_dim // 2)
        ]
    )


def mrope_band_axes(sections, interleaved):
    """Axis of each band. Contiguous (Qwen2-VL): runs of sections[a] bands. Interleaved
    (Qwen3-VL): every band starts on axis 0 (temporal); then for axis a >= 1 the bands
    a, a + n, a + 2n, ... below n * sections[a] move to axis a (n = number of axes)."""
    n = len(sections)
    if not interleaved:
        return [axis for axis, count in enumerate(sections) for _ in range(count)]
    axes = [0] * sum(sections)
    for axis in range(1, n):
        for band in range(axis, n * sections[axis], n):
            axes[band] = axis
    return axes


def multi_axis_rope_reference(x, positions, inv_freq, band_axes, *, layout="half", factor=1.0):
    """RoPE in which band i turns by positions[band_axes[i]] (positions [n_axes, B, S])."""
    x = np.asarray(x, np.float64)
    positions = np.asarray(positions, np.float64)
    rotary_dim = 2 * len(inv_freq)
    first, second = pair_indices(rotary_dim, layout)
    angle = np.stack(
        [positions[axis] * theta for axis, theta in zip(band_axes, inv_freq, strict=True)], -1
    )[:, :, None, :]
    z = (x[..., first] + 1j * x[..., second]) * factor * np.exp(1j * angle)
    out = x.copy()
    out[..., first] = z.real
    out[..., second] = z.imag
    return out


def llama4_query_temperature(position, floor_scale=8192.0, attn_scale=0.1):
    """Llama 4's NoPE-layer query scale: 1 + attn_scale * ln(floor((p + 1) / floor_scale) + 1)."""
    return 1.0 + attn_scale * math.log(math.floor((position + 1) / floor_scale) + 1.0)
