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


def _exact_integer_turns(positions: jax.Array, hi: np.ndarray, residual: np.ndarray) -> jax.Array:
    """Fractional turns of integer `positions[..., None] * freq`, centred in [-0.5, 0.5]."""
    signed = positions.astype(jnp.int32)[..., None]
    wrapped = jax.lax.bitcast_convert_type(signed, jnp.uint32)
    top, bottom = _split_top(wrapped * jnp.asarray(hi))
    small = bottom + signed.astype(jnp.float32) * jnp.asarray(residual)
    total = top + small
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
