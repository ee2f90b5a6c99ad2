"""Rotation angles `position * inv_freq` to ~1e-6 rad for positions up to 2^24 and beyond.

A plain float32 product `position * inv_freq` rounds the *angle*, whose magnitude
grows with the position: at position 1e6 the float32 spacing is 0.06 rad, and near
2^24 it reaches 1 rad, which corrupts long-context models. Only the angle modulo one
turn matters for sin and cos, so we keep each (static) frequency as a 64-bit
fixed-point fraction of a turn, held in two uint32 words `hi` and `lo`
(turns = (hi + lo / 2^32) / 2^32, computed on the host in float64 and exact to
float64 precision). For an integer position `p`:

  * `p * hi` wraps modulo 2^32 in uint32 arithmetic, so it is the exact fractional
    turn contributed by the high word, in units of 2^-32 turn;
  * `p * lo / 2^64` is small (below `|p| / 2^32` turns) and float32 carries it with an
    absolute error far below 1e-9 turn.

The fractional turn is formed from these pieces, centred on zero, and converted to
radians once. No float64 arithmetic runs on the device, so results are identical on
every backend and need no `jax_enable_x64`. Non-integer positions are split into an
integer part (exact, as above) and a fraction in [0, 1) multiplied in float32.

`rotation_cos_sin` goes one step further for tables of cos and sin: it splits the
fixed-point turn into the nearest quarter turn (integer bits, exact) and a remainder of
at most 1/8 turn, and evaluates short polynomials on the remainder. This is as accurate
as float32 `cos`/`sin` of the reduced angle and, unlike XLA:CPU's scalar `cos`/`sin`,
vectorises: the whole table costs about as much as writing it.

`angle_precision="float32"` reproduces the plain float32 product bit for bit, for
checkpoints trained with it. Frequencies that are traced (learned, or derived from a
traced sequence length) cannot be decomposed on the host and use the float32 product.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_posenc import _checks

ANGLE_PRECISIONS = ("exact", "float32")


def default_frequencies(dim: int, base: float = 10000.0, *, name: str = "dim") -> np.ndarray:
    """Inverse frequencies `base^(-2i/dim)` for i in `[0, dim/2)`, float64 on the host.

    The frequencies of the sinusoidal encoding (Vaswani et al., 2017) and of plain RoPE
    (Su et al., 2021); every RoPE scaling starts from them.
    """
    dim = _checks.check_even_positive_int(name, dim)
    base = _checks.check_positive_float("base", base)
    return base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)


_TWO_PI = 2.0 * np.pi


def _turn_words(inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Splits radians-per-position into (hi uint32, residual turns float32, residual*2^32)."""
    turns = np.mod(np.asarray(inv_freq, dtype=np.float64) / _TWO_PI, 1.0)
    hi = np.floor(turns * 2.0**32)
    residual = turns - hi / 2.0**32  # in [0, 2^-32), exact in float64
    hi = np.minimum(hi, 2.0**32 - 1).astype(np.uint32)
    return hi, residual.astype(np.float32)


def _split_top(words: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint32 fraction of a turn -> (top 24 bits, bottom 8 bits) as exact float32 turns."""
    top = (words >> 8).astype(jnp.float32) * np.float32(2.0**-24)
    bottom = (words & 0xFF).astype(jnp.float32) * np.float32(2.0**-32)
    return top, bottom


def _turn_parts(
    positions: jax.Array, hi: np.ndarray, residual: np.ndarray
) -> tuple[jax.Array, jax.Array]:
    """`p * freq` in turns for integer positions `p`, as `word / 2^32 + small`.

    `word` (uint32) is `p * hi` modulo 2^32, exact; `small` (float32) is `p * residual`,
    below `|p| / 2^32` turns.
    """
    signed = positions.astype(jnp.int32)[..., None]
    wrapped = jax.lax.bitcast_convert_type(signed, jnp.uint32)
    return wrapped * jnp.asarray(hi), signed.astype(jnp.float32) * jnp.asarray(residual)


def _exact_integer_turns(positions: jax.Array, hi: np.ndarray, residual: np.ndarray) -> jax.Array:
    """Fractional turns of integer `positions[..., None] * freq`, centred in [-0.5, 0.5]."""
    word, small = _turn_parts(positions, hi, residual)
    top, bottom = _split_top(word)
    total = top + (bottom + small)
    return total - jnp.round(total)


def rotation_angles(
    positions: jax.Array,
    inv_freq: np.ndarray | jax.Array,
    *,
    angle_precision: str = "exact",
) -> jax.Array:
    """Angles `positions[..., None] * inv_freq` in float32 radians.

    Args:
      positions: integer or float array of any shape `[...]`.
      inv_freq: `[n]` angular frequencies in radians per position. A NumPy array (or
        anything not traced) takes the exact path; a traced array the float32 product.
      angle_precision: "exact" (default) or "float32" (plain float32 product, bit for
        bit the naive formula).

    Returns:
      `[..., n]` float32 angles. On the exact path they are reduced to [-pi, pi]; sin
      and cos are unaffected by the reduction.
    """
    _checks.check_choice("angle_precision", angle_precision, ANGLE_PRECISIONS)
    positions = _checks.check_real_array("positions", positions)
    traced = isinstance(inv_freq, jax.core.Tracer)
    if angle_precision == "float32" or traced:
        freq = jnp.asarray(inv_freq, jnp.float32)
        return positions.astype(jnp.float32)[..., None] * freq

    freq64 = np.asarray(inv_freq, dtype=np.float64)
    hi, residual = _turn_words(freq64)
    if jnp.issubdtype(positions.dtype, jnp.integer):
        turns = _exact_integer_turns(positions, hi, residual)
    else:
        positions = positions.astype(jnp.float32)
        whole = jnp.floor(positions)
        fraction = positions - whole
        turns = _exact_integer_turns(whole.astype(jnp.int32), hi, residual)
        turns = turns + fraction[..., None] * jnp.asarray(freq64 / _TWO_PI, jnp.float32)
    return turns * np.float32(_TWO_PI)


# Minimax polynomials of sin and cos on [-pi/4, pi/4] (Cephes `sinf` / `cosf`), within
# about one float32 ulp there.
_SIN_COEFFICIENTS = (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)
_COS_COEFFICIENTS = (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2)


def _quarter_turns(positions: jax.Array, inv_freq64: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """`positions[..., None] * inv_freq` as (nearest quarter turn, remainder in turns).

    Returns the int32 number of quarter turns `q` (only `q mod 4` matters) and the
    float32 remainder `r` in [-1/8, 1/8] turns, with `p * freq = (q / 4 + r)` turns
    modulo whole turns. The quarter turn comes from the integer bits of the fixed-point
    turn, so it is exact; the remainder carries an absolute error far below 1e-8 turn.
    """
    hi, residual = _turn_words(inv_freq64)
    if jnp.issubdtype(positions.dtype, jnp.integer):
        word, small = _turn_parts(positions, hi, residual)
    else:
        positions = positions.astype(jnp.float32)
        whole = jnp.floor(positions)
        word, small = _turn_parts(whole.astype(jnp.int32), hi, residual)
        fraction = (positions - whole)[..., None]
        small = small + fraction * jnp.asarray(inv_freq64 / _TWO_PI, jnp.float32)
    quarters = (word + np.uint32(1 << 29)) >> 30  # round(word / 2^30), in 0..4
    below = jax.lax.bitcast_convert_type(word - (quarters << 30), jnp.int32)  # |.| <= 2^29
    remainder = below.astype(jnp.float32) * np.float32(2.0**-32) + small
    # `small` (and a fractional position) can carry the remainder past 1/8 turn.
    extra = jnp.round(remainder * 4.0)
    remainder = remainder - extra * 0.25  # exact: both terms are multiples of its ulp
    return quarters.astype(jnp.int32) + extra.astype(jnp.int32), remainder


def _cos_sin_of_quarters(quarters: jax.Array, remainder: jax.Array):
    """cos and sin of `(quarters / 4 + remainder)` turns, `|remainder| <= 1/8`."""
    angle = remainder * np.float32(_TWO_PI)
    square = angle * angle
    sin_poly, cos_poly = (np.float32(c) for c in (_SIN_COEFFICIENTS[0], _COS_COEFFICIENTS[0]))
    for sin_c, cos_c in zip(_SIN_COEFFICIENTS[1:], _COS_COEFFICIENTS[1:], strict=True):
        sin_poly = sin_poly * square + np.float32(sin_c)
        cos_poly = cos_poly * square + np.float32(cos_c)
    sin = angle + angle * square * sin_poly
    cos = 1.0 - 0.5 * square + square * square * cos_poly
    # Rotating by q quarter turns maps (cos, sin) to (-sin, cos), (-cos, -sin), (sin, -cos).
    odd = (quarters & 1) == 1
    cos, sin = jnp.where(odd, sin, cos), jnp.where(odd, cos, sin)
    cos = jnp.where(((quarters + 1) & 2) == 2, -cos, cos)
    sin = jnp.where((quarters & 2) == 2, -sin, sin)
    return cos, sin


def rotation_cos_sin(
    positions: jax.Array,
    inv_freq: np.ndarray | jax.Array,
    *,
    angle_precision: str = "exact",
) -> tuple[jax.Array, jax.Array]:
    """`cos` and `sin` of the angles `positions[..., None] * inv_freq`, float32.

    Args and precision as in `rotation_angles`. On the exact path the angle is reduced
    to a quarter turn plus at most 1/8 turn in fixed point and cos/sin are polynomials
    of the remainder (vectorised arithmetic only); otherwise `jnp.cos` / `jnp.sin` of the
    float32 product.

    Returns:
      `(cos, sin)`, each `[..., n]` float32.
    """
    _checks.check_choice("angle_precision", angle_precision, ANGLE_PRECISIONS)
    positions = _checks.check_real_array("positions", positions)
    if angle_precision == "float32" or isinstance(inv_freq, jax.core.Tracer):
        angles = rotation_angles(positions, inv_freq, angle_precision=angle_precision)
        return jnp.cos(angles), jnp.sin(angles)
    quarters, remainder = _quarter_turns(positions, np.asarray(inv_freq, dtype=np.float64))
    return _cos_sin_of_quarters(quarters, remainder)
