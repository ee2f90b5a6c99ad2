"""Additive attention biases as pure functions of query and key positions.

Every bias here follows the `jax_posenc.BiasFn` protocol: given `q_positions`
`[B or 1, bq]` and `k_positions` `[B or 1, bk]` (integers; `[S]` is read as `[1, S]`) it
returns a float32 logit bias `[B or 1, H, bq, bk]`, so attention can evaluate it one block
at a time. The relative distance is `k_pos - q_pos` (memory minus query). Distances are
formed in int32 before any float conversion, so positions near 1e6 lose nothing.

The biases that depend on the distance alone and cost more per entry than a copy (T5's
table lookup, KERPLE's logarithm, the dynamic position bias's MLP) check each block at
run time: a block of contiguous positions (arange plus an offset, the usual case) takes
only `bq + bk - 1` distinct distances, which are evaluated once and laid out along the
block's diagonals, and a T5 block whose distances all share one bucket is that bucket's
value; other blocks are evaluated entry by entry. Every path computes the same function
of the same int32 distances, so the values do not depend on the path. (Under `jax.vmap`
the per-block choice becomes a select, which evaluates every path.)

Each learned bias is a linen module whose `setup()` defines the parameters and which has
two methods: `__call__(q_positions, k_positions)` materializes the bias, and `bias_fn()`
returns a pure closure over the parameter arrays (what attention calls inside
`lax.scan`; gradients flow through it to the parameters).

References:
  Press et al., 2022, Train Short, Test Long: Attention with Linear Biases (ALiBi).
  Raffel et al., 2020, Exploring the Limits of Transfer Learning with a Unified
    Text-to-Text Transformer (T5 relative position buckets).
  Chi et al., 2022, KERPLE: Kernelized Relative Positional Embedding for Length
    Extrapolation.
  Li et al., 2023, Functional Interpolation for Relative Positions Improves Long Context
    Transformers (FIRE).
  Wang et al., 2021, CrossFormer (dynamic position bias: an MLP over the distance).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_posenc import _checks
from jax_posenc._protocols import BiasFn, per_entry_only

KERPLE_VARIANTS = ("log", "power")
ALIBI_FORMS = ("symmetric", "causal")

MlpLayers = Sequence[tuple[jax.Array, jax.Array]]


def _distances(q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
    """`k_pos - q_pos` as int32 `[B or 1, bq, bk]` after validating both position arrays.

    Exact for every pair of int32 positions less than 2^31 apart; farther pairs get the
    largest int32 distance with the right sign instead of wrapping around.
    """
    q_positions, k_positions = _checks.check_position_pair(q_positions, k_positions)
    return _checks.saturating_difference(k_positions[:, None, :], q_positions[:, :, None])


def _check_positive_if_concrete(name: str, value: jax.Array, upper: float | None = None):
    """Raises ValueError for known (not traced) values outside (0, upper]."""
    if not _checks.is_concrete(value):
        return
    values = np.asarray(value, dtype=np.float64)
    bad = ~np.isfinite(values) | (values <= 0)
    if upper is not None:
        bad |= values > upper
    if bad.any():
        expected = f"in (0, {upper:g}]" if upper is not None else "finite and > 0"
        raise ValueError(f"{name} must be {expected}, got {values.tolist()}")


def _check_head_vector(name: str, value: jax.Array, num_heads: int | None = None) -> jax.Array:
    if isinstance(value, list | tuple):
        value = np.asarray(value)
    value = _checks.check_real_array(name, value)
    _checks.check_rank(name, value, 1)
    if num_heads is not None and value.shape[0] != num_heads:
        raise ValueError(f"{name} must have shape ({num_heads},), got {tuple(value.shape)}")
    return value.astype(jnp.float32)


def _constant_init(value: np.ndarray) -> nn.initializers.Initializer:
    """An initializer returning `value` (deterministic parameters such as KERPLE's)."""

    def init(key, shape, dtype=jnp.float32):
        del key
        if tuple(shape) != value.shape:
            raise ValueError(f"constant initializer has shape {value.shape}, asked for {shape}")
        return jnp.asarray(value, dtype)

    return init


def _inverse_softplus(value: np.ndarray) -> np.ndarray:
    """x such that softplus(x) = value > 0, in float64."""
    value = np.asarray(value, dtype=np.float64)
    return value + np.log(-np.expm1(-value))


# Distances up to this size from one block to another keep `offset + index` in int32.
_TOEPLITZ_MAX_OFFSET = 1 << 30


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _toeplitz(diagonals: jax.Array, q_len: int, k_len: int) -> jax.Array:
    """`[H, q_len + k_len - 1]` values per diagonal -> `[H, q_len, k_len]` tile with
    `tile[h, i, j] = diagonals[h, q_len - 1 - i + j]`.

    Rows of `q_len` copies of the diagonals, flattened and read back with a row stride
    one shorter, shift by one entry per row: reshapes and slices, no gather. The
    gradient is the sum along each diagonal (`_diagonal_sums`).
    """
    heads, width = diagonals.shape
    if q_len == 1:
        return diagonals[:, None, :]
    rows = jnp.broadcast_to(diagonals[:, None, :], (heads, q_len, width))
    flat = rows.reshape(heads, q_len * width)[:, q_len - 1 : q_len - 1 + q_len * (width - 1)]
    return flat.reshape(heads, q_len, width - 1)[:, :, :k_len]


def _toeplitz_forward(diagonals, q_len, k_len):
    return _toeplitz(diagonals, q_len, k_len), None


def _toeplitz_backward(q_len, k_len, _, tile_cotangent):
    return (_diagonal_sums(tile_cotangent),)


_toeplitz.defvjp(_toeplitz_forward, _toeplitz_backward)


def _shifted_row_sums(x: jax.Array, axis: int) -> jax.Array:
    """`out[..., w, ...] = sum_r x[..., r, w - r, ...]` over rows `r` (axis `axis`) of
    `x` `[..., R, W, ...]`: `[..., W + R - 1, ...]`. Each row padded with `R` zeros and
    read back with a row stride one shorter shifts by one entry per row."""
    rows, width = x.shape[axis], x.shape[axis + 1]
    lead, rest = x.shape[:axis], x.shape[axis + 2 :]
    padding = [(0, 0)] * x.ndim
    padding[axis + 1] = (0, rows)
    flat = jnp.pad(x, padding).reshape(*lead, rows * (width + rows), *rest)
    flat = lax.slice_in_dim(flat, 0, rows * (width + rows - 1), axis=axis)
    return flat.reshape(*lead, rows, width + rows - 1, *rest).sum(axis)


_DIAGONAL_CHUNK = 16


def _diagonal_sums(tile: jax.Array) -> jax.Array:
    """`[H, q, k] -> [H, q + k - 1]` sums along the diagonals, `out[h, q - 1 - i + j]`
    collecting `tile[h, i, j]` (the transpose of `_toeplitz`).

    In two levels, so no intermediate is much larger than `tile`: the rows of each
    chunk of 16 are shifted into place against each other (padding each row by 16),
    then the chunks' partial sums are shifted by whole chunks. The one-level version
    (what autodiff makes of `_toeplitz`) pads every row by `q`, three times the tile's
    size for 512 x 256 blocks, and took ~4 ms per block on a 2-core CPU.
    """
    heads, q_len, k_len = tile.shape
    chunk = min(_DIAGONAL_CHUNK, q_len)
    rows = -(-q_len // chunk) * chunk
    # Zero rows in front keep every diagonal's index (row i - p, diagonal unchanged).
    tile = jnp.pad(tile, ((0, 0), (rows - q_len, 0), (0, 0)))
    count = rows // chunk
    # Row a of a chunk lands at s = chunk - 1 - a + j: reversed rows shift by their index.
    partial = _shifted_row_sums(tile.reshape(heads, count, chunk, k_len)[:, :, ::-1], 2)
    # Chunk r's partial sums start (count - 1 - r) chunks later: the same, per whole chunk.
    groups = -(-partial.shape[-1] // chunk)
    partial = jnp.pad(partial, ((0, 0), (0, 0), (0, groups * chunk - partial.shape[-1])))
    total = _shifted_row_sums(partial[:, ::-1].reshape(heads, count, groups, chunk), 1)
    return total.reshape(heads, -1)[:, : q_len + k_len - 1]


def _distance_bias(
    of_distance: Callable[[jax.Array], jax.Array],
    num_heads: int,
    q_positions: jax.Array,
    k_positions: jax.Array,
    constant_key: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """A bias that depends only on `k_pos - q_pos`, with shortcuts that stay exact.

    `of_distance` maps int32 distances `[...]` to float32 `[H, ...]`. The block is
    evaluated, whichever is the cheapest that applies (a `lax.switch` per call, so per
    block inside blockwise attention):

    * constant: `constant_key(d)` (monotone in `d` on each side of 0, e.g. T5's
      bucket) is the same at the smallest and the largest distance of the block, so
      the whole block has the bias of one distance (T5 blocks beyond `max_distance`);
    * Toeplitz: every row of both position arrays is the same contiguous run (arange
      plus an offset, the usual case), so the block takes `bq + bk - 1` distinct
      distances: `of_distance` on those and `_toeplitz` lays them out;
    * general: `of_distance` on every entry (explicit positions, packed segments that
      restart positions, any other layout).

    All three compute `of_distance` on the same int32 distances, so they agree exactly.
    """
    q_positions, k_positions = _checks.check_position_pair(q_positions, k_positions)
    batch = max(q_positions.shape[0], k_positions.shape[0])
    q_len, k_len = q_positions.shape[1], k_positions.shape[1]
    shape = (batch, num_heads, q_len, k_len)

    def general():
        values = of_distance(_distances(q_positions, k_positions))  # [H, B, bq, bk]
        return jnp.broadcast_to(jnp.swapaxes(values, 0, 1), shape)

    if q_len == 0 or k_len == 0 or per_entry_only():  # see per_entry_evaluation
        return general()
    q_first, k_first = q_positions[0, 0], k_positions[0, 0]
    offset = _checks.saturating_difference(k_first, q_first)
    contiguous = (
        jnp.all(q_positions == q_first + jnp.arange(q_len, dtype=jnp.int32))
        & jnp.all(k_positions == k_first + jnp.arange(k_len, dtype=jnp.int32))
        & (jnp.abs(offset) < _TOEPLITZ_MAX_OFFSET)
    )

    def toeplitz():
        diagonals = offset - (q_len - 1) + jnp.arange(q_len + k_len - 1, dtype=jnp.int32)
        tile = _toeplitz(of_distance(diagonals), q_len, k_len)
        return jnp.broadcast_to(tile[None], shape)

    if constant_key is None:
        return lax.cond(contiguous, toeplitz, general)
    nearest = _checks.saturating_difference(k_positions.min(), q_positions.max())
    farthest = _checks.saturating_difference(k_positions.max(), q_positions.min())

    def constant():
        return jnp.broadcast_to(of_distance(nearest)[None, :, None, None], shape)

    same = constant_key(nearest) == constant_key(farthest)
    branch = jnp.where(same, 0, jnp.where(contiguous, 1, 2))
    return lax.switch(branch, (constant, toeplitz, general))


# --------------------------------------------------------------------------- ALiBi


def alibi_slopes(num_heads: int) -> np.ndarray:
    """Per-head ALiBi slopes of Press et al. (2022), float64 on the host.

    For a power of two `n`, head `h = 1..n` gets `2^(-8h/n)` (a geometric sequence that
    starts at `2^(-8/n)`). For other counts, the heads take the slopes of the closest lower
    power of two `p`, followed by every other slope of `2p` (its 1st, 3rd, 5th, ...) until
    there are `num_heads`.

    A tensor-parallel shard holding heads `[s, s + n)` of `H` must use
    `alibi_slopes(H)[s:s + n]` (pass them as explicit `slopes`), not `alibi_slopes(n)`.

    Args:
      num_heads: number of heads, > 0.

    Returns:
      `[num_heads]` float64 slopes in (0, 1).
    """
    num_heads = _checks.check_positive_int("num_heads", num_heads)
    lower = 1 << (num_heads.bit_length() - 1)

    def geometric(n: int) -> np.ndarray:
        return 2.0 ** (-8.0 * np.arange(1, n + 1, dtype=np.float64) / n)

    extra = geometric(2 * lower)[0::2][: num_heads - lower]
    return np.concatenate([geometric(lower), extra])


def alibi_bias(
    q_positions: jax.Array,
    k_positions: jax.Array,
    slopes: jax.Array | np.ndarray,
    *,
    form: str = "symmetric",
) -> jax.Array:
    """ALiBi logit bias (Press et al., 2022).

    * `form="symmetric"` (default): `-slope * |q_pos - k_pos|`, the convention of
      flash-attn, x-transformers and MPT. It penalises keys in both directions, so it is
      safe without a causal mask, and equals the paper's form wherever a causal mask
      allows attention.
    * `form="causal"`: `-slope * (q_pos - k_pos)`, the paper's literal form; it is
      positive for keys after the query, so use it only under a causal mask.

    Args:
      q_positions: integer `[B or 1, bq]` (or `[bq]`).
      k_positions: integer `[B or 1, bk]` (or `[bk]`).
      slopes: `[H]` per-head slopes (e.g. `alibi_slopes(H)` or a shard's slice of them).
      form: "symmetric" or "causal" (see above).

    Returns:
      `[B or 1, H, bq, bk]` float32.

    Example:
      >>> import jax.numpy as jnp
      >>> import jax_posenc as pe
      >>> slopes = pe.alibi_slopes(2)  # 2^-4, 2^-8
      >>> bias = pe.alibi_bias(jnp.arange(3), jnp.arange(3), slopes)  # [1, H, Lq, Lk]
      >>> bias.shape
      (1, 2, 3, 3)
      >>> bias[0, 0].tolist()  # -slope * |q - k|
      [[0.0, -0.0625, -0.125], [-0.0625, 0.0, -0.0625], [-0.125, -0.0625, 0.0]]
    """
    _checks.check_choice("form", form, ALIBI_FORMS)
    slopes = _check_head_vector("slopes", slopes)
    _check_positive_if_concrete("slopes", slopes)
    distance = _distances(q_positions, k_positions)
    if form == "symmetric":
        distance = -jnp.abs(distance)
    return distance.astype(jnp.float32)[:, None] * slopes[None, :, None, None]


def alibi_module_slopes(num_heads: int, slopes: Sequence[float] | None) -> np.ndarray:
    """The slopes an ALiBi module uses: `slopes` when given (checked), else the paper's."""
    num_heads = _checks.check_positive_int("num_heads", num_heads)
    if slopes is None:
        return alibi_slopes(num_heads)
    slopes = np.asarray(slopes, dtype=np.float64)
    _check_head_vector("slopes", slopes, num_heads)
    _check_positive_if_concrete("slopes", slopes)
    return slopes


class AlibiBias(nn.Module):
    """ALiBi as a module (no parameters); see `alibi_bias`.

    Attributes:
      num_heads: number of heads H.
      slopes: explicit `[H]` slopes as a tuple (a tensor-parallel shard passes its slice of
        the global slopes); None uses `alibi_slopes(num_heads)`.
      form: "symmetric" (default, `-slope * |q - k|`) or "causal" (`-slope * (q - k)`,
        only under a causal mask); see `alibi_bias`.
    """

    num_heads: int
    slopes: tuple[float, ...] | None = None
    form: str = "symmetric"

    def bias_fn(self) -> BiasFn:
        """Pure `bias_fn(q_positions, k_positions) -> [B or 1, H, bq, bk]`."""
        return functools.partial(
            alibi_bias,
            slopes=alibi_module_slopes(self.num_heads, self.slopes),
            form=_checks.check_choice("form", self.form, ALIBI_FORMS),
        )

    def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
        return self.bias_fn()(q_positions, k_positions)


# ------------------------------------------------------------------------------ T5


def check_t5_bucket_settings(
    bidirectional: bool, num_buckets: int, max_distance: int
) -> tuple[int, int]:
    """Validates the T5 bucket settings; returns (buckets per direction, max_exact)."""
    num_buckets = _checks.check_min_int("num_buckets", num_buckets, 2)
    if bidirectional and num_buckets < 4:
        raise ValueError(
            f"num_buckets must be >= 4 for bidirectional buckets (half per direction, "
            f"each with at least one exact bucket), got {num_buckets}"
        )
    per_direction = num_buckets // 2 if bidirectional else num_buckets
    max_exact = per_direction // 2
    max_distance = _checks.check_int("max_distance", max_distance)
    if max_distance <= max_exact:
        raise ValueError(
            f"max_distance must be greater than the {max_exact} exactly bucketed distances "
            f"(num_buckets={num_buckets}, bidirectional={bidirectional}), got {max_distance}; "
            "the logarithmic buckets need log(max_distance / max_exact) > 0"
        )
    return per_direction, max_exact


@functools.lru_cache(maxsize=64)
def _t5_log_bucket_starts(max_exact: int, num_log: int, max_distance: int) -> np.ndarray:
    """First distance of each logarithmic bucket after the first one, in exact arithmetic.

    A distance `n >= max_exact` goes to bucket
    `max_exact + min(floor(num_log * log(n / max_exact) / log(max_distance / max_exact)),
    num_log - 1)`. The offset is >= k exactly when
    `n^num_log * max_exact^k >= max_distance^k * max_exact^num_log`, an integer comparison,
    so the boundaries carry no floating-point rounding.
    """
    starts = []
    for k in range(1, num_log):
        target = max_distance**k * max_exact**num_log

        def reaches(n: int, k: int = k, target: int = target) -> bool:
            return n**num_log * max_exact**k >= target

        n = max(max_exact, math.ceil(max_exact * (max_distance / max_exact) ** (k / num_log)))
        while n > max_exact and reaches(n - 1):
            n -= 1
        while not reaches(n):
            n += 1
        starts.append(n)
    return np.asarray(starts, dtype=np.int32)


def t5_relative_position_bucket(
    relative_position: jax.Array,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> jax.Array:
    """T5 relative position buckets (Raffel et al., 2020; Mesh TensorFlow's rule).

    With `n` the distance (`|r|` when bidirectional, `max(-r, 0)` when causal, so keys after
    the query share bucket 0): half of the buckets of a direction hold the exact distances
    `0 .. max_exact - 1`, the other half cover `[max_exact, max_distance)` with
    logarithmically growing widths, and every distance `>= max_distance` lands in the last
    bucket. Bidirectional mode gives each direction `num_buckets // 2` buckets, keys after
    the query (`r > 0`) using the upper half. Boundaries are exact (see
    `_t5_log_bucket_starts`), never off by one from float rounding.

    Args:
      relative_position: integer array `k_pos - q_pos` of any shape.
      bidirectional: whether attention looks both ways.
      num_buckets: number of buckets, >= 2 (>= 4 when bidirectional).
      max_distance: distance from which everything shares the last bucket, > max_exact.

    Returns:
      int32 buckets in `[0, num_buckets)`, same shape as `relative_position`.
    """
    per_direction, max_exact = check_t5_bucket_settings(bidirectional, num_buckets, max_distance)
    relative_position = _checks.check_positions("relative_position", relative_position)
    # -(-2^31) wraps to itself in int32; one less is as far in every bucket.
    relative_position = jnp.maximum(relative_position, -_checks.INT32_MAX)
    if bidirectional:
        offset = jnp.where(relative_position > 0, per_direction, 0)
        distance = jnp.abs(relative_position)
    else:
        offset = 0
        distance = jnp.maximum(-relative_position, 0)
    starts = _t5_log_bucket_starts(max_exact, per_direction - max_exact, max_distance)
    if len(starts) <= 64:
        # Counting the starts at or below each distance vectorises on CPU, where a
        # binary search per entry does not; the same result as searchsorted(side="right").
        log_bucket = max_exact + jnp.sum(distance[..., None] >= starts, axis=-1)
    else:
        log_bucket = max_exact + jnp.searchsorted(jnp.asarray(starts), distance, side="right")
    bucket = jnp.where(distance < max_exact, distance, log_bucket.astype(jnp.int32))
    return (offset + bucket).astype(jnp.int32)


def t5_bias(
    table: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    *,
    bidirectional: bool = True,
    max_distance: int = 128,
) -> jax.Array:
    """T5 relative attention bias: `table[bucket(k_pos - q_pos)]` per head.

    Args:
      table: `[num_buckets, H]` learned bias per bucket and head.
      q_positions: integer `[B or 1, bq]`.
      k_positions: integer `[B or 1, bk]`.
      bidirectional, max_distance: see `t5_relative_position_bucket`.

    Returns:
      `[B or 1, H, bq, bk]` float32.

    Example:
      >>> import jax.numpy as jnp
      >>> import jax_posenc as pe
      >>> table = jnp.arange(32 * 2, dtype=jnp.float32).reshape(32, 2)  # [num_buckets, H]
      >>> bias = pe.t5_bias(table, jnp.arange(4), jnp.arange(4))  # [1, H, Lq, Lk]
      >>> bias[0, 0, 0].tolist()  # head 0, query 0: buckets 0, 17, 18, 19 for k - q = 0..3
      [0.0, 34.0, 36.0, 38.0]
    """
    table = _checks.check_floating_array("table", table)
    _checks.check_rank("table", table, 2)
    bucket = functools.partial(
        t5_relative_position_bucket,
        bidirectional=bidirectional,
        num_buckets=table.shape[0],
        max_distance=max_distance,
    )
    per_head = table.astype(jnp.float32).T  # [H, num_buckets]

    def of_distance(distance):
        # Gather from the [H, num_buckets] table straight into heads-first layout; buckets
        # are in range by construction, so "clip" skips the out-of-bounds fill.
        return jnp.take(per_head, bucket(distance), axis=1, mode="clip")

    # The bucket is monotone in the distance on each side of 0 and the two sides never
    # share one, so equal buckets at both ends of a block make the whole block constant.
    return _distance_bias(of_distance, table.shape[1], q_positions, k_positions, bucket)


def t5_bias_init(stddev: float = 0.02) -> nn.initializers.Initializer:
    """Default initializer of the T5 bias table (normal, small, so training starts near NoPE)."""
    return nn.initializers.normal(stddev=stddev)


class T5RelativePositionBias(nn.Module):
    """Learned T5 bias table `relative_attention_bias` `[num_buckets, num_heads]`.

    Attributes:
      num_heads: number of heads H.
      num_buckets, max_distance, bidirectional: see `t5_relative_position_bucket`.
      embedding_init: initializer of the table.
    """

    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = True
    embedding_init: nn.initializers.Initializer = t5_bias_init()

    def setup(self):
        num_heads = _checks.check_positive_int("num_heads", self.num_heads)
        check_t5_bucket_settings(self.bidirectional, self.num_buckets, self.max_distance)
        self.relative_attention_bias = self.param(
            "relative_attention_bias", self.embedding_init, (self.num_buckets, num_heads)
        )

    def bias_fn(self) -> BiasFn:
        """Pure `bias_fn(q_positions, k_positions)` closing over the table."""
        return functools.partial(
            t5_bias,
            self.relative_attention_bias,
            bidirectional=self.bidirectional,
            max_distance=self.max_distance,
        )

    def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
        return self.bias_fn()(q_positions, k_positions)


# -------------------------------------------------------------------------- KERPLE


def kerple_bias(
    q_positions: jax.Array,
    k_positions: jax.Array,
    r1: jax.Array,
    r2: jax.Array,
    *,
    variant: str = "log",
) -> jax.Array:
    """KERPLE logit bias (Chi et al., 2022) with distance `d = |k_pos - q_pos|`.

    * `variant="log"`: `-r1 * log(1 + r2 * d)`, r1, r2 > 0.
    * `variant="power"`: `-r1 * d^r2`, r1 > 0, 0 < r2 <= 2 (r2 = 1 is ALiBi).

    Args:
      q_positions: integer `[B or 1, bq]`.
      k_positions: integer `[B or 1, bk]`.
      r1, r2: `[H]` positive kernel parameters (see `kerple_constrain`).
      variant: "log" or "power".

    Returns:
      `[B or 1, H, bq, bk]` float32.
    """
    _checks.check_choice("variant", variant, KERPLE_VARIANTS)
    r1 = _check_head_vector("r1", r1)
    r2 = _check_head_vector("r2", r2, r1.shape[0])
    _check_positive_if_concrete("r1", r1)
    _check_positive_if_concrete("r2", r2, 2.0 if variant == "power" else None)

    def of_distance(distance):
        distance = jnp.abs(distance).astype(jnp.float32)
        per_head = (-1, *[1] * distance.ndim)
        scale, exponent = r1.reshape(per_head), r2.reshape(per_head)
        if variant == "log":
            return -scale * jnp.log1p(exponent * distance)
        # d^r2 = exp(r2 log d) with a safe log at d = 0, where d^r2 = 0 and its gradient too.
        power = jnp.exp(exponent * jnp.log(jnp.maximum(distance, 1.0)))
        return -scale * jnp.where(distance > 0, power, 0.0)

    # A log (and an exp) per entry and head cost more than laying out bq + bk - 1 values.
    return _distance_bias(of_distance, r1.shape[0], q_positions, k_positions)


def kerple_constrain(
    r1_unconstrained: jax.Array, r2_unconstrained: jax.Array, *, variant: str
) -> tuple[jax.Array, jax.Array]:
    """Maps unconstrained parameters to KERPLE's domain, positive by construction.

    `r1 = softplus(r1_unconstrained)`; `r2 = softplus(r2_unconstrained)` for "log" and
    `r2 = 2 * sigmoid(r2_unconstrained)` (in (0, 2)) for "power". Unlike clamping, this
    keeps a gradient everywhere.
    """
    _checks.check_choice("variant", variant, KERPLE_VARIANTS)
    r1 = jax.nn.softplus(r1_unconstrained)
    if variant == "log":
        return r1, jax.nn.softplus(r2_unconstrained)
    return r1, 2.0 * jax.nn.sigmoid(r2_unconstrained)


def kerple_initial_parameters(num_heads: int, variant: str) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic, head-diverse initial (r1_unconstrained, r2_unconstrained), float64.

    Random initialisation of KERPLE's parameters is known to train badly, so the
    initial bias is a known-good one:

    * "power": r1 = ALiBi slopes, r2 = 1, i.e. exactly ALiBi at initialisation;
    * "log": r1 = 1, r2 = ALiBi slopes, i.e. `-log(1 + m_h d)`, ALiBi-like (slope m_h)
      at short distances and logarithmic beyond `1 / m_h`.
    """
    num_heads = _checks.check_positive_int("num_heads", num_heads)
    _checks.check_choice("variant", variant, KERPLE_VARIANTS)
    slopes = alibi_slopes(num_heads)
    if variant == "power":
        return _inverse_softplus(slopes), np.zeros(num_heads)  # 2 * sigmoid(0) = 1
    return _inverse_softplus(np.ones(num_heads)), _inverse_softplus(slopes)


def kerple_bias_fn(
    r1_unconstrained: jax.Array, r2_unconstrained: jax.Array, *, variant: str
) -> BiasFn:
    """`kerple_bias` bound to the parameters mapped through `kerple_constrain`."""
    r1, r2 = kerple_constrain(r1_unconstrained, r2_unconstrained, variant=variant)
    return functools.partial(kerple_bias, r1=r1, r2=r2, variant=variant)


class KerpleBias(nn.Module):
    """KERPLE bias with parameters `r1_unconstrained`, `r2_unconstrained` `[num_heads]`.

    See `kerple_bias`, `kerple_constrain` and `kerple_initial_parameters`.

    Attributes:
      num_heads: number of heads H.
      variant: "log" or "power".
    """

    num_heads: int
    variant: str = "log"

    def setup(self):
        r1, r2 = kerple_initial_parameters(self.num_heads, self.variant)
        self.r1_unconstrained = self.param("r1_unconstrained", _constant_init(r1), r1.shape)
        self.r2_unconstrained = self.param("r2_unconstrained", _constant_init(r2), r2.shape)

    def bias_fn(self) -> BiasFn:
        """Pure `bias_fn(q_positions, k_positions)` closing over the constrained parameters."""
        return kerple_bias_fn(self.r1_unconstrained, self.r2_unconstrained, variant=self.variant)

    def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
        return self.bias_fn()(q_positions, k_positions)


# ---------------------------------------------------------------- MLP-based biases


def mlp_layer_shapes(
    hidden_features: int, num_hidden_layers: int, num_heads: int
) -> tuple[tuple[int, int], ...]:
    """Kernel shapes of the scalar-to-heads MLP `1 -> hidden x num_hidden_layers -> H`."""
    hidden_features = _checks.check_positive_int("hidden_features", hidden_features)
    num_hidden_layers = _checks.check_positive_int("num_hidden_layers", num_hidden_layers)
    num_heads = _checks.check_positive_int("num_heads", num_heads)
    sizes = (1, *([hidden_features] * num_hidden_layers), num_heads)
    return tuple(itertools.pairwise(sizes))


mlp_kernel_init = nn.initializers.lecun_normal()
mlp_bias_init = nn.initializers.zeros_init()


def _mlp(
    features: jax.Array, layers: MlpLayers, activation: Callable, *, heads_first: bool = False
) -> jax.Array:
    """Applies `(kernel_i, bias_i)` layers to scalar `features` `[...]`.

    Returns `[..., H]`, or `[H, ...]` with `heads_first`: the last product then comes out
    heads first (the layout of attention's logits) with no transpose of the result.
    """
    hidden = features[..., None]
    for index, (kernel, bias) in enumerate(layers[:-1]):
        if index:
            hidden = activation(hidden)
        hidden = hidden @ kernel.astype(jnp.float32) + bias.astype(jnp.float32)
    if len(layers) > 1:
        hidden = activation(hidden)
    kernel, bias = (x.astype(jnp.float32) for x in layers[-1])
    if not heads_first:
        return hidden @ kernel + bias
    return jnp.einsum("kh,...k->h...", kernel, hidden) + bias.reshape(-1, *[1] * features.ndim)


def _check_mlp_layers(layers: MlpLayers) -> tuple[tuple[jax.Array, jax.Array], ...]:
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers must hold at least one (kernel, bias) pair, got none")
    fan_in = 1
    for index, (kernel, bias) in enumerate(layers):
        if (
            jnp.ndim(kernel) != 2
            or kernel.shape[0] != fan_in
            or jnp.shape(bias) != (kernel.shape[1],)
        ):
            raise ValueError(
                f"layers[{index}] must be a kernel [{fan_in}, n] and a bias [n], got shapes "
                f"{jnp.shape(kernel)} and {jnp.shape(bias)}"
            )
        fan_in = kernel.shape[1]
    return layers


def _mlp_params(module: nn.Module, shapes) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """Declares `kernel_i` / `bias_i` parameters on a linen module (inside `setup`)."""
    return tuple(
        (
            module.param(f"kernel_{i}", mlp_kernel_init, shape),
            module.param(f"bias_{i}", mlp_bias_init, (shape[1],)),
        )
        for i, shape in enumerate(shapes)
    )


def fire_bias(
    q_positions: jax.Array,
    k_positions: jax.Array,
    layers: MlpLayers,
    c: jax.Array,
    threshold: jax.Array,
) -> jax.Array:
    """FIRE logit bias (Li et al., 2023).

    `b(i, j) = f( psi(|i - j|) / psi(max(L, i)) )` with `psi(x) = log(c x + 1)`, `i` the
    query and `j` the key position, `L` the learnable threshold and `f` an MLP (ReLU) from
    a scalar to one value per head. The normalisation by the query position ("progressive
    interpolation") maps every distance a query at `i >= L` can see into [0, 1]; queries
    before the threshold share the fixed scale `psi(L)`. The paper's causal
    distance `i - j` is used as `|i - j|`, identical for visible keys and finite for
    masked ones.

    Args:
      q_positions: integer `[B or 1, bq]`, >= 0.
      k_positions: integer `[B or 1, bk]`.
      layers: MLP `(kernel [n_in, n_out], bias [n_out])` pairs, from 1 input to H outputs.
      c: positive scalar log-transform scale.
      threshold: positive scalar L.

    Returns:
      `[B or 1, H, bq, bk]` float32.
    """
    layers = _check_mlp_layers(layers)
    for name, value in (("c", c), ("threshold", threshold)):
        if jnp.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}")
        _check_positive_if_concrete(name, value)
    q_positions, k_positions = _checks.check_position_pair(q_positions, k_positions)
    distance = jnp.abs(_distances(q_positions, k_positions)).astype(jnp.float32)
    c = jnp.asarray(c, jnp.float32)
    query = q_positions.astype(jnp.float32)[:, :, None]
    normaliser = jnp.log1p(c * jnp.maximum(jnp.asarray(threshold, jnp.float32), query))
    return jnp.moveaxis(_mlp(jnp.log1p(c * distance) / normaliser, layers, jax.nn.relu), -1, 1)


def fire_initial_parameters(init_c: float, init_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Initial `(log_c, log_threshold)` (float64 scalars) for positive `c` and `L`."""
    init_c = _checks.check_positive_float("init_c", init_c)
    init_threshold = _checks.check_positive_float("init_threshold", init_threshold)
    return np.array(np.log(init_c)), np.array(np.log(init_threshold))


def fire_bias_fn(layers: MlpLayers, log_c: jax.Array, log_threshold: jax.Array) -> BiasFn:
    """`fire_bias` bound to the MLP and to `c = exp(log_c)`, `L = exp(log_threshold)`."""
    return functools.partial(
        fire_bias, layers=tuple(layers), c=jnp.exp(log_c), threshold=jnp.exp(log_threshold)
    )


class FireBias(nn.Module):
    """FIRE with parameters `log_c`, `log_threshold` (scalars) and MLP `kernel_i`/`bias_i`.

    `c = exp(log_c)` and `L = exp(log_threshold)` are positive by construction; working in
    log space also gives `L` (hundreds of positions) and `c` updates of a comparable scale.

    Attributes:
      num_heads: number of heads H.
      hidden_features: MLP width (32 in the paper).
      num_hidden_layers: MLP hidden layers (1 in the paper).
      init_c: initial c.
      init_threshold: initial L (a position; 512 in public re-implementations).
    """

    num_heads: int
    hidden_features: int = 32
    num_hidden_layers: int = 1
    init_c: float = 0.1
    init_threshold: float = 512.0

    def setup(self):
        shapes = mlp_layer_shapes(self.hidden_features, self.num_hidden_layers, self.num_heads)
        log_c, log_threshold = fire_initial_parameters(self.init_c, self.init_threshold)
        self.log_c = self.param("log_c", _constant_init(log_c), ())
        self.log_threshold = self.param("log_threshold", _constant_init(log_threshold), ())
        self.layers = _mlp_params(self, shapes)

    def bias_fn(self) -> BiasFn:
        """Pure `bias_fn(q_positions, k_positions)` closing over the parameters."""
        return fire_bias_fn(self.layers, self.log_c, self.log_threshold)

    def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
        return self.bias_fn()(q_positions, k_positions)


def dynamic_position_bias(
    q_positions: jax.Array,
    k_positions: jax.Array,
    layers: MlpLayers,
    *,
    log_distance: bool = True,
    absolute: bool = False,
) -> jax.Array:
    """Dynamic position bias: an MLP (SiLU) from the relative distance to one bias per head.

    The input is the signed distance `r = k_pos - q_pos` (or `|r|` with `absolute`),
    optionally compressed as `sign(r) * log(1 + |r|)` (`log_distance`, the default, keeps
    the MLP's input small at long distances). A learned-bias baseline next to FIRE
    (Wang et al., 2021; the `DynamicPositionBias` of x-transformers).

    Args:
      q_positions: integer `[B or 1, bq]`.
      k_positions: integer `[B or 1, bk]`.
      layers: MLP `(kernel, bias)` pairs from 1 input to H outputs.
      log_distance: feed `sign(r) log(1 + |r|)` instead of `r`.
      absolute: feed `|r|` (a symmetric bias).

    Returns:
      `[B or 1, H, bq, bk]` float32.
    """
    layers = _check_mlp_layers(layers)

    def of_distance(distance):
        if absolute:
            distance = jnp.abs(distance)
        features = distance.astype(jnp.float32)
        if log_distance:
            features = jnp.sign(features) * jnp.log1p(jnp.abs(features))
        return _mlp(features, layers, jax.nn.silu, heads_first=True)

    # An MLP per entry costs far more than laying out bq + bk - 1 values per block.
    return _distance_bias(of_distance, layers[-1][0].shape[1], q_positions, k_positions)


class DynamicPositionBias(nn.Module):
    """Dynamic position bias with MLP parameters `kernel_i` / `bias_i`.

    Attributes:
      num_heads: number of heads H.
      hidden_features: MLP width.
      num_hidden_layers: MLP hidden layers.
      log_distance, absolute: see `dynamic_position_bias`.
    """

    num_heads: int
    hidden_features: int = 64
    num_hidden_layers: int = 2
    log_distance: bool = True
    absolute: bool = False

    def setup(self):
        shapes = mlp_layer_shapes(self.hidden_features, self.num_hidden_layers, self.num_heads)
        self.layers = _mlp_params(self, shapes)

    def bias_fn(self) -> BiasFn:
        """Pure `bias_fn(q_positions, k_positions)` closing over the MLP parameters."""
        return functools.partial(
            dynamic_position_bias,
            layers=self.layers,
            log_distance=self.log_distance,
            absolute=self.absolute,
        )

    def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
        return self.bias_fn()(q_positions, k_positions)
