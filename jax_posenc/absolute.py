"""Absolute position encodings: sinusoidal (Vaswani et al., 2017) and learned tables.

References:
  Vaswani et al., 2017, Attention Is All You Need (section 3.5).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jax_posenc import _checks
from jax_posenc._angles import ANGLE_PRECISIONS, default_frequencies, rotation_angles

SINUSOIDAL_LAYOUTS = ("interleaved", "concat")
LOOKUP_MODES = ("clip", "error")


def sinusoidal_frequencies(dim: int, *, base: float = 10000.0) -> np.ndarray:
    """Angular frequencies `base^(-2i/dim)` for i in [0, dim/2), float64 on the host."""
    return default_frequencies(dim, base)


def sinusoidal_encoding(
    positions: jax.Array,
    dim: int,
    *,
    base: float = 10000.0,
    layout: str = "interleaved",
    dtype: jnp.dtype = jnp.float32,
    angle_precision: str = "exact",
) -> jax.Array:
    """Sinusoidal position encoding of Vaswani et al. (2017).

    With `w_i = base^(-2i/dim)`, sine and cosine of pair i share the frequency `w_i`:

    * `layout="interleaved"`: `PE[p, 2i] = sin(p w_i)`, `PE[p, 2i+1] = cos(p w_i)`.
    * `layout="concat"`: all sines, then all cosines (the tensor2tensor layout),
      `PE[p, i] = sin(p w_i)`, `PE[p, dim/2 + i] = cos(p w_i)`.

    Args:
      positions: integer or float positions of any shape `[...]`.
      dim: even number of features.
      base: wavelength base, > 0.
      layout: "interleaved" or "concat".
      dtype: output dtype; angles are always computed in float32 (see `_angles`).
      angle_precision: "exact" (angles within ~1e-6 rad up to position 2^24) or
        "float32" (the plain float32 product, for compatibility).

    Returns:
      `[..., dim]` array of `dtype`.

    Example:
      >>> import jax.numpy as jnp
      >>> import jax_posenc as pe
      >>> table = pe.sinusoidal_encoding(jnp.arange(128), 64)
      >>> table.shape
      (128, 64)
      >>> [round(float(value), 4) for value in table[1, :4]]  # sin 1, cos 1, sin w1, cos w1
      [0.8415, 0.5403, 0.6816, 0.7318]
    """
    freqs = sinusoidal_frequencies(dim, base=base)
    _checks.check_choice("layout", layout, SINUSOIDAL_LAYOUTS)
    _checks.check_choice("angle_precision", angle_precision, ANGLE_PRECISIONS)
    positions = _checks.check_positions("positions", positions, allow_float=True)
    angles = rotation_angles(positions, freqs, angle_precision=angle_precision)
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    if layout == "interleaved":
        encoding = jnp.stack([sin, cos], axis=-1).reshape(*positions.shape, dim)
    else:
        encoding = jnp.concatenate([sin, cos], axis=-1)
    return encoding.astype(dtype)


def learned_embedding_lookup(table: jax.Array, positions: jax.Array, *, mode: str = "clip"):
    """Rows `table[positions]` with an explicit policy for positions outside the table.

    JAX gathers clamp out-of-range indices silently, so a position past the table would
    quietly reuse the last row. Here:

    * concrete positions (outside jit) outside `[0, num_positions)` raise ValueError in
      every mode;
    * traced positions (inside jit, grad, vmap, ...) follow `mode`:
      "clip" (the default) clamps into range on purpose, so the last row is reused
      (`flax.linen.Embed` returns NaN rows instead); it jits like any other gather.
      "error" adds a `checkify.check`: the caller wraps the jitted function with
      `jax.experimental.checkify.checkify` and calls `.throw()` on the returned error
      (JAX refuses to stage an unchecked check). `jax_posenc.train` does this for every
      step and evaluation, and raises on the host.

    Args:
      table: `[num_positions, features]`.
      positions: integer array `[...]`.
      mode: "clip" or "error".

    Returns:
      `[..., features]` rows of `table`.
    """
    _checks.check_choice("mode", mode, LOOKUP_MODES)
    _checks.check_rank("table", table, 2)
    positions = _checks.check_positions("positions", positions)
    num_positions = table.shape[0]
    if _checks.is_concrete(positions):
        _checks.check_index_range(
            "positions", positions, num_positions, "num_positions", "; enlarge num_positions"
        )
    elif mode == "error":
        in_range = jnp.all((positions >= 0) & (positions < num_positions))
        checkify.check(
            in_range,
            f"positions must lie in [0, num_positions={num_positions}) of the learned "
            "embedding table, got values in [{low}, {high}]",
            low=positions.min(),
            high=positions.max(),
        )
    return jnp.take(table, jnp.clip(positions, 0, num_positions - 1), axis=0)


class SinusoidalEmbedding(nn.Module):
    """Linen wrapper of `sinusoidal_encoding`; `__call__(positions) -> [..., features]`."""

    features: int
    base: float = 10000.0
    layout: str = "interleaved"
    dtype: jnp.dtype = jnp.float32
    angle_precision: str = "exact"

    @nn.compact
    def __call__(self, positions: jax.Array) -> jax.Array:
        return sinusoidal_encoding(
            positions,
            _checks.check_even_positive_int("features", self.features),
            base=self.base,
            layout=self.layout,
            dtype=self.dtype,
            angle_precision=self.angle_precision,
        )


def learned_embedding_init(stddev: float = 0.02) -> nn.initializers.Initializer:
    """Default initializer of learned position tables (normal, std 0.02 as in GPT-2)."""
    return nn.initializers.normal(stddev=stddev)


class LearnedEmbedding(nn.Module):
    """A learned table `[num_positions, features]` looked up by position.

    Concrete positions outside the table raise ValueError; traced ones are clamped
    (`mode="clip"`, the default) or checked through `jax.experimental.checkify`
    (`mode="error"`); see `learned_embedding_lookup`.
    """

    num_positions: int
    features: int
    mode: str = "clip"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    embedding_init: nn.initializers.Initializer = learned_embedding_init()

    @nn.compact
    def __call__(self, positions: jax.Array) -> jax.Array:
        num_positions = _checks.check_positive_int("num_positions", self.num_positions)
        features = _checks.check_positive_int("features", self.features)
        _checks.check_choice("mode", self.mode, LOOKUP_MODES)
        table = self.param(
            "embedding", self.embedding_init, (num_positions, features), self.param_dtype
        )
        return learned_embedding_lookup(table, positions, mode=self.mode).astype(self.dtype)
