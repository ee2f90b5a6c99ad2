"""Rotary position embeddings (RoPE), multi-axis RoPE and xPos.

RoPE (Su et al., 2021) rotates each pair of query/key features by an angle
`position * theta_i`, so the dot product of a rotated query and key depends on their
positions only through `q_pos - k_pos`. Pair `i` uses `theta_i = base^(-2i/rotary_dim)`
unless a scaling spec (`jax_posenc.rope_scaling`) or explicit `inv_freq` says otherwise.

Layouts (which features form a pair; the weights of a checkpoint fix the layout):

* `"half"` (GPT-NeoX, Llama, HF `rotate_half`): feature `i` pairs with `i + rotary_dim/2`.
* `"interleaved"` (GPT-J, RoFormer, Mesh-TF): feature `2i` pairs with `2i + 1`.

`rope_layout_permutation` converts q/k projection weights between the two.

Partial rotary (`rotary_dim < head_dim`, GPT-NeoX, Phi, ChatGLM) rotates the first
`rotary_dim` features of each head and passes the others through unchanged.

Positions are explicit integer (or float) arrays `[S]` or `[B, S]`: KV-cache decoding
(query positions offset by the cache length), left padding and packed sequences are all
expressed through them. Angles, cos and sin are float32 whatever the input dtype (exact
to ~1e-6 rad up to position 2^24, see `jax_posenc._angles`), the rotation runs in
float32 (float64 for float64 inputs) and the output has the input dtype.

References:
  Su et al., 2021, RoFormer: Enhanced Transformer with Rotary Position Embedding.
  Black et al., 2022, GPT-NeoX-20B (partial rotary, the "half" layout).
  Wang et al., 2024, Qwen2-VL (multimodal rotary position embedding, M-RoPE).
  Qwen Team, 2025, Qwen3-VL (interleaved M-RoPE).
  Heo et al., 2024, Rotary Position Embedding for Vision Transformer (2-D axial RoPE,
    RoPE-Mixed).
  Sun et al., 2022, A Length-Extrapolatable Transformer (xPos).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_posenc import _checks
from jax_posenc._angles import ANGLE_PRECISIONS, rotation_cos_sin
from jax_posenc.rope_scaling import RopeScaling, SeqLen, check_scaling, default_frequencies

ROPE_LAYOUTS = ("half", "interleaved")
XPOS_GAMMA = 0.4  # Sun et al. (2022), section 3.2: zeta_i = (2i/d + gamma) / (1 + gamma).


# ------------------------------------------------------------------ frequencies and tables


def _check_scaling(scaling: object) -> None:
    check_scaling(scaling)


def _check_seq_len(seq_len: SeqLen) -> SeqLen:
    if seq_len is None or not _checks.is_concrete(seq_len):
        return seq_len
    if isinstance(seq_len, jax.Array | np.ndarray):
        _checks.check_rank("seq_len", seq_len, 0)
        _checks.check_integer_array("seq_len", seq_len)
        seq_len = int(seq_len)
    return _checks.check_positive_int("seq_len", seq_len)


def rope_frequencies(
    rotary_dim: int,
    *,
    base: float = 10000.0,
    scaling: RopeScaling | None = None,
    seq_len: SeqLen = None,
) -> tuple[np.ndarray | jax.Array, float]:
    """Inverse frequencies `theta_i` (radians per position) and the cos/sin multiplier.

    Args:
      rotary_dim: number of rotated features per head (even).
      base: wavelength base, > 0 (`rope_theta` in model configs).
      scaling: a spec from `jax_posenc.rope_scaling`, or None for plain RoPE.
      seq_len: current sequence length, read only by `DynamicNTKScaling` and
        `LongRopeScaling`. A Python int keeps the frequencies static; a traced value
        makes them traced (and the angles then use the float32 product).

    Returns:
      `(inv_freq, attention_factor)`: `inv_freq` `[rotary_dim/2]` is a float64 NumPy
      array when static (a float32 jax array when traced); `attention_factor` multiplies
      cos and sin (1.0 except for YaRN and LongRoPE).
    """
    rotary_dim = _checks.check_even_positive_int("rotary_dim", rotary_dim)
    base = _checks.check_positive_float("base", base)
    _check_scaling(scaling)
    seq_len = _check_seq_len(seq_len)
    if scaling is None:
        return default_frequencies(rotary_dim, base), 1.0
    return scaling.frequencies(rotary_dim, base, seq_len)


def _own_buffer(table: jax.Array) -> jax.Array:
    """Returns `table` unchanged, computed once into its own buffer.

    XLA fuses cheap elementwise producers into their consumers, and every operation of
    the table (the fixed-point angle, the cos/sin polynomials) is cheap: left alone, the
    whole table would be fused into the rotation loop and recomputed for every batch row
    and head. A gather is never fused into a consumer that reuses its elements, so an
    identity gather keeps the `[..., n]` table separate (`mode="clip"`: the default fill
    mode would put a NaN select for out-of-range indices into the rotation loop).
    """
    return jnp.take(table, np.arange(table.shape[0]), axis=0, mode="clip")


def rope_cos_sin(
    positions: jax.Array,
    inv_freq: np.ndarray | jax.Array,
    *,
    attention_factor: float | jax.Array = 1.0,
    dtype: jnp.dtype = jnp.float32,
    angle_precision: str = "exact",
) -> tuple[jax.Array, jax.Array]:
    """`attention_factor * cos(position * theta_i)` and the same with sin.

    Args:
      positions: integer (or float) positions of any shape `[...]`.
      inv_freq: `[n]` frequencies shared by all heads, or `[H, n]` per head. A NumPy
        array (as `rope_frequencies` returns for static settings) gives exact angles; a
        traced array (learned frequencies) the float32 product.
      attention_factor: multiplier of cos and sin (YaRN / LongRoPE).
      dtype: output dtype; angles and the multiplication are float32.
      angle_precision: "exact" (default) or "float32" (the plain float32 product, bit
        for bit, for checkpoints trained with it).

    Returns:
      `(cos, sin)`, each `[..., n]` (or `[..., H, n]` for per-head frequencies).
    """
    _checks.check_choice("angle_precision", angle_precision, ANGLE_PRECISIONS)
    positions = _checks.check_positions("positions", positions, allow_float=True)
    if _checks.is_concrete(inv_freq):
        inv_freq = np.asarray(inv_freq, dtype=np.float64)
    _checks.check_rank("inv_freq", inv_freq, (1, 2))
    if inv_freq.ndim == 2:
        positions = positions[..., None]
    if isinstance(attention_factor, int | float):
        attention_factor = _checks.check_positive_float("attention_factor", attention_factor)
    table = jnp.stack(rotation_cos_sin(positions, inv_freq, angle_precision=angle_precision))
    if not (isinstance(attention_factor, float) and attention_factor == 1.0):
        table = table * attention_factor
    table = _own_buffer(table).astype(dtype)
    return table[0], table[1]


# ------------------------------------------------------------------ rotation


def _check_layout(layout: str) -> str:
    return _checks.check_choice("layout", layout, ROPE_LAYOUTS)


def _resolve_rotary_dim(rotary_dim: int | None, head_dim: int) -> int:
    if rotary_dim is None:
        rotary_dim = head_dim
    rotary_dim = _checks.check_even_positive_int("rotary_dim", rotary_dim)
    if rotary_dim > head_dim:
        raise ValueError(
            f"rotary_dim must be <= head_dim, got rotary_dim={rotary_dim} and head_dim={head_dim}"
        )
    return rotary_dim


def _check_activations(name: str, x: jax.Array) -> jax.Array:
    x = _checks.check_floating_array(name, x)
    if x.ndim != 4:
        raise ValueError(
            f"{name} must have shape [batch, seq, heads, head_dim], got shape {x.shape}"
        )
    return x


def _position_rows(name: str, positions: jax.Array, x: jax.Array) -> jax.Array:
    """`positions` `[S]` or `[B or 1, S]` for `x` `[B, S, H, D]`, as 2-D rows.

    Integer positions must fit int32 (`_checks.position_rows`); fractional positions
    are accepted as floats.
    """
    batch, seq = x.shape[:2]
    return _checks.position_rows(name, positions, length=seq, batch=batch, allow_float=True)


def _rotate_pairs(x: jax.Array, cos: jax.Array, sin: jax.Array, layout: str) -> jax.Array:
    """Rotates the first `2n` features of `x` `[..., D]` by cos/sin `[..., n]`, in blocks.

    The head is viewed as blocks of `g` features, `g` the largest size that keeps every
    pair within one block (half: pair `i` with `i + n`, so `g = gcd(n, D)` and block `k`
    pairs with block `k + n/g`; interleaved: `g = gcd(2n, D)`, pairs inside each block).
    The rotated blocks and the untouched ones are joined along the block axis: XLA:CPU
    then runs the block kinds as branches outside an innermost loop over `g` contiguous
    features, which it vectorises. Joined along the features instead, the branch or a
    gather lands inside that loop (and a concatenation on the last axis costs a copy).

    Returns:
      `[..., D/g, g]` (half) or `[..., D/g, g/2, 2]` (interleaved); reshaping to
      `[..., D]` gives the rotated head.
    """
    head_dim, n = x.shape[-1], cos.shape[-1]
    if layout == "half":
        size = math.gcd(n, head_dim)
        blocks = x.reshape(*x.shape[:-1], head_dim // size, size)
        count = n // size
        cos = cos.reshape(*cos.shape[:-1], count, size)
        sin = sin.reshape(*sin.shape[:-1], count, size)
        first, second = blocks[..., :count, :], blocks[..., count : 2 * count, :]
        parts = [first * cos - second * sin, second * cos + first * sin]
        tail, block_axis = blocks[..., 2 * count :, :], -2
    else:
        size = math.gcd(2 * n, head_dim)
        blocks = x.reshape(*x.shape[:-1], head_dim // size, size // 2, 2)
        count = 2 * n // size
        cos = cos.reshape(*cos.shape[:-1], count, size // 2)
        sin = sin.reshape(*sin.shape[:-1], count, size // 2)
        first, second = blocks[..., :count, :, 0], blocks[..., :count, :, 1]
        parts = [jnp.stack([first * cos - second * sin, second * cos + first * sin], axis=-1)]
        tail, block_axis = blocks[..., count:, :, :], -3
    if tail.shape[block_axis]:
        parts.append(tail)
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=block_axis)


def _split_axis(shape: tuple[int, ...]) -> int | None:
    """The axis (seq, else batch, else heads) along which `_rotate` halves its work."""
    for axis in (1, 0, 2):
        if shape[axis] > 1:
            return axis
    return None


def _rotation(x: jax.Array, cos: jax.Array, sin: jax.Array, layout: str) -> jax.Array:
    """The forward pass of `_rotate`.

    The work is split in two halves along the sequence (else batch, else heads) and
    joined with a concatenation on that axis. The join costs nothing, but it makes
    XLA:CPU emit the loops over each half's `[..., blocks, features]` shape (see
    `_rotate_pairs`), which it vectorises in one pass over `x`: the plain form loops
    over `[..., D]`, where the blocks become a branch that either stays scalar or is
    split into one pass per block kind, each reading all of `x` again (1.3-1.7x the time
    of a copy instead of ~1x).
    """
    compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
    values = x.astype(compute_dtype)
    cos = cos.astype(compute_dtype)
    sin = sin.astype(compute_dtype)
    axis = _split_axis(x.shape)
    if axis is None:
        out = _rotate_pairs(values, cos, sin, layout)
    else:
        middle = x.shape[axis] // 2
        halves = []
        for part in (slice(None, middle), slice(middle, None)):
            index = (slice(None),) * axis + (part,)
            tables = [t if t.shape[axis] == 1 else t[index] for t in (cos, sin)]
            halves.append(_rotate_pairs(values[index], *tables, layout))
        out = jnp.concatenate(halves, axis=axis)
    return out.astype(x.dtype).reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array, layout: str) -> jax.Array:
    """Rotates the first `2n` features of `x` `[B, S, H, D]` by cos/sin `[B|1, S, H|1, n]`.

    The arithmetic runs in float32 (float64 for float64 inputs) with one cast back to
    `x.dtype`; the features past `2n` pass through unchanged (float32 holds every
    bfloat16/float16 value exactly). The gradient for `x` is the rotation back (the
    transpose of a rotation, scaled by the attention factor, is the rotation by `-angle`
    with the same factor), one vectorised pass like the forward; autodiff's transpose
    of the forward takes 1.1-2.7x the time of a copy on CPU instead.
    """
    return _rotation(x, cos, sin, layout)


def _rotate_forward(x, cos, sin, layout: str):
    # `symbolic_zeros`: keep `x` for the tables' gradient only when they need one
    # (learned frequencies), so layers that never train them save no extra activation.
    tables_perturbed = cos.perturbed or sin.perturbed
    x, cos, sin = x.value, cos.value, sin.value
    return _rotation(x, cos, sin, layout), (cos, sin, x if tables_perturbed else None)


def _rotate_backward(layout: str, residuals, cotangent):
    cos, sin, x = residuals
    if isinstance(cotangent, jax.custom_derivatives.SymbolicZero):
        return None, None, None
    x_cotangent = _rotation(cotangent, cos, -sin, layout)
    if x is None:
        return x_cotangent, None, None
    _, table_vjp = jax.vjp(lambda cos, sin: _rotation(x, cos, sin, layout), cos, sin)
    return (x_cotangent, *table_vjp(cotangent))


_rotate.defvjp(_rotate_forward, _rotate_backward, symbolic_zeros=True)


def _inv_freq_rotary_dim(inv_freq, rotary_dim: int | None, x: jax.Array) -> int:
    shape = jnp.shape(inv_freq)
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[0] not in (1, x.shape[2])):
        raise ValueError(
            f"inv_freq must have shape [rotary_dim/2] or [heads, rotary_dim/2] with heads = "
            f"{x.shape[2]}, got shape {shape}"
        )
    implied = 2 * shape[-1]
    if rotary_dim is not None and rotary_dim != implied:
        raise ValueError(
            f"rotary_dim={rotary_dim} does not match inv_freq of shape {shape} (which "
            f"rotates 2 * {shape[-1]} = {implied} features)"
        )
    return _resolve_rotary_dim(implied, x.shape[-1])


def _tables(
    positions: jax.Array,
    inv_freq,
    attention_factor,
    angle_precision: str,
    use: Callable[[jax.Array, jax.Array], Any] | None = None,
):
    """cos/sin `[B|1, S, H|1, n]` for positions `[B|1, S]`, or `use(cos, sin)`.

    Rows of `[B, S]` positions that are all the same (an arange broadcast over the
    batch, as models pass them) get one row's tables, shared by the batch: the exact
    angles are costly (bfloat16 [4, 2048, 16, 128] on a 2-core CPU: 1.21x the time of a
    copy with a table per row, 1.12x with one). Concrete positions are compared on the
    host, traced ones by a `lax.cond`. Given `use` (which must accept tables of batch 1
    or B), the cond returns `use(cos, sin)` from each branch, so the shared branch never
    materialises its table for every row (`apply_rope` in bfloat16 at the shape above:
    1.25x -> 1.13x a copy); without it, the shared branch broadcasts its tables.
    """

    def tables(rows):
        cos, sin = rope_cos_sin(
            rows, inv_freq, attention_factor=attention_factor, angle_precision=angle_precision
        )
        if jnp.ndim(inv_freq) == 1:
            cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        return cos, sin

    def finish(rows):
        return tables(rows) if use is None else use(*tables(rows))

    batch = positions.shape[0]
    if batch == 1 or positions.shape[1] == 0:
        return finish(positions)
    if _checks.is_concrete(positions):
        rows = np.asarray(positions)
        return finish(positions[:1] if (rows == rows[:1]).all() else positions)

    def shared(rows):
        if use is not None:
            return finish(rows[:1])
        return jax.tree.map(lambda t: jnp.broadcast_to(t, (batch, *t.shape[1:])), tables(rows[:1]))

    return lax.cond(jnp.all(positions == positions[:1]), shared, finish, positions)


def _default_seq_len(*positions: jax.Array) -> SeqLen:
    """`max(position) + 1` over all given positions (HF's rule for length-dependent RoPE).

    A Python int when every positions array is concrete (NumPy arrays stay concrete even
    inside jit), else a traced int32 scalar.
    """
    nonempty = [p for p in positions if np.size(p)]
    if not nonempty:
        return None
    if all(_checks.is_concrete(p) for p in nonempty):
        return max(int(np.floor(np.max(np.asarray(p)))) for p in nonempty) + 1
    return jnp.max(jnp.stack([jnp.max(p) for p in nonempty])).astype(jnp.int32) + 1


def _frequencies_for(
    rotary_dim: int | None,
    head_dim: int,
    base: float,
    scaling: RopeScaling | None,
    seq_len: SeqLen,
    positions: Sequence[jax.Array],
):
    """Resolves rotary_dim and `rope_frequencies`, deriving `seq_len` when it matters."""
    rotary_dim = _resolve_rotary_dim(rotary_dim, head_dim)
    _check_scaling(scaling)
    if seq_len is None and scaling is not None and scaling.depends_on_seq_len:
        seq_len = _default_seq_len(*positions)
    inv_freq, attention_factor = rope_frequencies(
        rotary_dim, base=base, scaling=scaling, seq_len=seq_len
    )
    return rotary_dim, inv_freq, attention_factor


def apply_rope(
    x: jax.Array,
    positions: jax.Array,
    *,
    base: float = 10000.0,
    rotary_dim: int | None = None,
    layout: str = "half",
    scaling: RopeScaling | None = None,
    inv_freq: np.ndarray | jax.Array | None = None,
    attention_factor: float | None = None,
    seq_len: SeqLen = None,
    angle_precision: str = "exact",
) -> jax.Array:
    """Rotary position embedding (Su et al., 2021) of queries or keys.

    Pair `(a, b)` of features at position `p` becomes
    `(a cos(p theta_i) - b sin(p theta_i), b cos(p theta_i) + a sin(p theta_i))`, times
    the scaling's attention factor.

    Args:
      x: `[B, S, H, D]` queries or keys, any float dtype.
      positions: `[S]` or `[B, S]` integer (or float) positions of the tokens of `x`.
      base: wavelength base (`rope_theta`).
      rotary_dim: number of rotated features per head (even, <= D); None rotates all.
        The features from `rotary_dim` on are passed through unchanged.
      layout: "half" (feature i pairs with i + rotary_dim/2) or "interleaved" (2i with
        2i + 1).
      scaling: a context-extension spec from `jax_posenc.rope_scaling`, or None.
      inv_freq: explicit frequencies `[rotary_dim/2]` or per head `[H, rotary_dim/2]`
        (custom bands, learned frequencies); replaces `base` and `scaling`.
      attention_factor: multiplier of cos and sin, only together with `inv_freq`
        (otherwise it comes from `scaling`, so it can never be applied twice).
      seq_len: current length for `DynamicNTKScaling` / `LongRopeScaling`; by default
        `max(positions) + 1` (a Python int when positions are concrete, traced under
        jit, where a traced length makes the angles use the float32 product: pass a
        Python int to keep them exact).
      angle_precision: "exact" or "float32" (see `rope_cos_sin`).

    Returns:
      `[B, S, H, D]` array of `x.dtype`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jax_posenc as pe
      >>> q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 64))  # [B, S, H, D] each
      >>> def score(q_position, k_position):
      ...     q_rot = pe.apply_rope(q, jnp.array([q_position]))
      ...     return jnp.sum(q_rot * pe.apply_rope(k, jnp.array([k_position])))
      >>> bool(jnp.isclose(score(7, 3), score(1007, 1003), atol=1e-4))  # only q - k matters
      True
      >>> x = jnp.ones((2, 16, 4, 64))
      >>> pe.apply_rope(x, jnp.arange(16), rotary_dim=32, scaling=pe.LinearScaling(4.0)).shape
      (2, 16, 4, 64)
    """
    x = _check_activations("x", x)
    _check_layout(layout)
    rows = _position_rows("positions", positions, x)
    if inv_freq is None:
        if attention_factor is not None:
            raise ValueError(
                "attention_factor is only accepted together with inv_freq; with base/scaling "
                "it comes from the scaling spec"
            )
        _, inv_freq, attention_factor = _frequencies_for(
            rotary_dim, x.shape[-1], base, scaling, seq_len, [positions]
        )
    else:
        if scaling is not None or base != 10000.0:
            raise ValueError("pass either inv_freq or base/scaling, not both")
        _inv_freq_rotary_dim(inv_freq, rotary_dim, x)
        attention_factor = 1.0 if attention_factor is None else attention_factor

    def rotate(cos, sin):
        return _rotate(x, cos, sin, layout)

    return _tables(rows, inv_freq, attention_factor, angle_precision, use=rotate)


def apply_rope_qk(
    q: jax.Array,
    k: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array | None = None,
    *,
    base: float = 10000.0,
    rotary_dim: int | None = None,
    layout: str = "half",
    scaling: RopeScaling | None = None,
    inv_freq: np.ndarray | jax.Array | None = None,
    seq_len: SeqLen = None,
    angle_precision: str = "exact",
) -> tuple[jax.Array, jax.Array]:
    """`apply_rope` of queries and keys with one set of frequencies.

    Length-dependent scalings read one `seq_len` for both (by default
    `max(q_positions, k_positions) + 1`), so q and k never rotate with different
    frequencies. `k_positions` defaults to `q_positions`; pass it when they differ
    (KV-cache decoding, cross attention). `inv_freq` (learned frequencies) replaces
    `base`, while `scaling` still supplies the attention factor.

    Args:
      q: `[B, Sq, Hq, D]` queries.
      k: `[B, Sk, Hk, D]` keys (Hk may differ from Hq, as in grouped-query attention).
      q_positions: `[Sq]` or `[B, Sq]`.
      k_positions: `[Sk]` or `[B, Sk]`, default `q_positions`.
      base, rotary_dim, layout, scaling, seq_len, angle_precision: as in `apply_rope`.
      inv_freq: optional explicit `[rotary_dim/2]` frequencies.

    Returns:
      `(q_rot, k_rot)` with the shapes and dtypes of `q` and `k`.
    """
    q = _check_activations("q", q)
    k = _check_activations("k", k)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share head_dim, got shapes {q.shape} and {k.shape}")
    k_positions = q_positions if k_positions is None else k_positions
    _position_rows("q_positions", q_positions, q)
    _position_rows("k_positions", k_positions, k)
    rotary_dim, static_freq, attention_factor = _frequencies_for(
        rotary_dim, q.shape[-1], base, scaling, seq_len, [q_positions, k_positions]
    )
    inv_freq = static_freq if inv_freq is None else inv_freq
    common = {"layout": layout, "angle_precision": angle_precision}
    common.update(inv_freq=inv_freq, rotary_dim=rotary_dim, attention_factor=attention_factor)
    return apply_rope(q, q_positions, **common), apply_rope(k, k_positions, **common)


def rope_layout_permutation(
    head_dim: int,
    *,
    rotary_dim: int | None = None,
    source: str = "interleaved",
    target: str = "half",
) -> np.ndarray:
    """Feature permutation that converts q/k weights from one RoPE layout to another.

    With `perm = rope_layout_permutation(D, source="interleaved", target="half")`,
    `apply_rope(x[..., perm], p, layout="half") == apply_rope(x, p,
    layout="interleaved")[..., perm]`. Permuting the output features of both the query
    and the key projection of every head therefore leaves every attention score
    unchanged, so a checkpoint trained with one layout runs with the other:

    * Dense kernel `[d_model, H * D]`:
      `w.reshape(d_model, H, D)[..., perm].reshape(d_model, H * D)`.
    * DenseGeneral kernel `[d_model, H, D]`: `w[..., perm]`; biases `[H, D]`: `b[..., perm]`.

    Values and the output projection are untouched. Features past `rotary_dim` stay in
    place.

    Args:
      head_dim: features per head.
      rotary_dim: rotated features per head (default: all).
      source: layout of the existing weights.
      target: layout to convert to.

    Returns:
      `[head_dim]` int array of source feature indices.
    """
    head_dim = _checks.check_positive_int("head_dim", head_dim)
    rotary_dim = _resolve_rotary_dim(rotary_dim, head_dim)
    _checks.check_choice("source", source, ROPE_LAYOUTS)
    _checks.check_choice("target", target, ROPE_LAYOUTS)
    perm = np.arange(head_dim)
    if source == target:
        return perm
    half_to_interleaved = np.arange(rotary_dim).reshape(2, rotary_dim // 2).T.reshape(-1)
    interleaved_to_half = np.argsort(half_to_interleaved)
    perm[:rotary_dim] = interleaved_to_half if target == "half" else half_to_interleaved
    return perm


# ------------------------------------------------------------------ multi-axis RoPE


def multi_axis_band_axes(sections: Sequence[int], *, interleaved: bool = False) -> np.ndarray:
    """The position axis each frequency band rotates by, `[sum(sections)]` ints.

    Contiguous (Qwen2-VL, Qwen2.5-VL M-RoPE; 2-D axial RoPE): band `j` belongs to axis
    `a` for `j` in the `a`-th run of `sections[a]` bands. Interleaved (Qwen3-VL M-RoPE):
    with `n = len(sections)` axes, band `j` belongs to axis `a = j mod n` when `a > 0`
    and `j < n * sections[a]`, and to axis 0 otherwise, so the axes alternate over the
    whole spectrum instead of splitting it into low and high frequencies.

    Args:
      sections: bands per axis.
      interleaved: the interleaved assignment.

    Returns:
      `[sum(sections)]` int array of axis indices.
    """
    if isinstance(sections, str) or not isinstance(sections, Sequence):
        raise TypeError(f"sections must be a sequence of ints, got {sections!r}")
    sections = tuple(_checks.check_positive_int("sections", s) for s in sections)
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {interleaved!r}")
    if not interleaved:
        return np.repeat(np.arange(len(sections)), sections)
    bands = np.arange(sum(sections))
    axes = np.zeros_like(bands)
    for axis in range(1, len(sections)):
        axes[(bands % len(sections) == axis) & (bands < len(sections) * sections[axis])] = axis
    counts = tuple(int(np.sum(axes == axis)) for axis in range(len(sections)))
    if counts != sections:
        raise ValueError(
            f"interleaved sections {sections} do not fit {sum(sections)} bands: axis a > 0 takes "
            f"every {len(sections)}-th band below {len(sections)} * sections[a], which gives "
            f"{counts}"
        )
    return axes


def axial_positions(*grid: int) -> np.ndarray:
    """Positions of the cells of a grid, row-major: `[len(grid), prod(grid)]` int32.

    `axial_positions(height, width)` gives the (row, column) of each of the
    `height * width` patches of an image in the order a ViT flattens them, the
    `positions` of `apply_multi_axis_rope` / `MultiAxisRotaryEmbedding` for 2-D axial
    RoPE (Heo et al., 2024); `axial_positions(frames, height, width)` those of a video.
    Add a batch axis with `positions[:, None]`, an offset by adding to a row.
    """
    if not grid:
        raise ValueError("axial_positions needs at least one grid size")
    sizes = [_checks.check_positive_int("grid size", size) for size in grid]
    mesh = np.meshgrid(*[np.arange(size) for size in sizes], indexing="ij")
    return np.stack([axis.reshape(-1) for axis in mesh]).astype(np.int32)


def apply_multi_axis_rope(
    x: jax.Array,
    positions: jax.Array,
    sections: Sequence[int],
    *,
    base: float = 10000.0,
    rotary_dim: int | None = None,
    layout: str = "half",
    scaling: RopeScaling | None = None,
    inv_freq: np.ndarray | None = None,
    interleaved: bool = False,
    angle_precision: str = "exact",
) -> jax.Array:
    """RoPE over several position axes: 2-D image RoPE, Qwen2-VL / Qwen3-VL M-RoPE.

    The `rotary_dim/2` frequency bands are assigned to `len(sections)` axes, `sections[a]`
    bands to axis `a` (`multi_axis_band_axes`: in order, or interleaved as in Qwen3-VL);
    a band rotates by the positions of its axis. Qwen2-VL uses axes (temporal, height,
    width) with `sections=(16, 24, 24)` for head_dim 128, Qwen3-VL `(24, 20, 20)`
    interleaved; for text tokens all axes carry the token index and the result is
    ordinary RoPE. For axial 2-D RoPE in which each axis sees the full range of
    frequencies, pass `inv_freq=np.concatenate([f, f])` with
    `f = rope_frequencies(rotary_dim // 2)[0]` and `sections=(n/2, n/2)`, and positions
    from `axial_positions(height, width)`.

    Args:
      x: `[B, S, H, D]`.
      positions: `[n_axes, S]` or `[n_axes, B, S]`.
      sections: bands per axis, summing to `rotary_dim / 2`.
      base, rotary_dim, layout, angle_precision: as in `apply_rope`.
      scaling: a spec whose frequencies do not depend on the sequence length.
      inv_freq: explicit static `[rotary_dim/2]` frequencies (replaces base/scaling).
      interleaved: assign bands to axes in turn (Qwen3-VL) instead of in runs.

    Returns:
      `[B, S, H, D]` array of `x.dtype`.
    """
    x = _check_activations("x", x)
    _check_layout(layout)
    positions = _checks.check_positions("positions", positions, allow_float=True)
    _checks.check_rank("positions", positions, (2, 3))
    band_axes = multi_axis_band_axes(sections, interleaved=interleaved)
    sections = tuple(sections)
    if len(sections) != positions.shape[0]:
        raise ValueError(
            f"sections {sections} has {len(sections)} entries but positions of shape "
            f"{positions.shape} has {positions.shape[0]} axes"
        )
    if inv_freq is None:
        _check_scaling(scaling)
        if scaling is not None and scaling.depends_on_seq_len:
            raise ValueError(
                f"apply_multi_axis_rope needs a scaling independent of the sequence length, "
                f"got {type(scaling).__name__}"
            )
        rotary_dim, inv_freq, attention_factor = _frequencies_for(
            rotary_dim, x.shape[-1], base, scaling, None, []
        )
    else:
        if scaling is not None or base != 10000.0:
            raise ValueError("pass either inv_freq or base/scaling, not both")
        inv_freq = np.asarray(inv_freq, dtype=np.float64)
        _checks.check_rank("inv_freq", inv_freq, 1)
        rotary_dim = _inv_freq_rotary_dim(inv_freq, rotary_dim, x)
        attention_factor = 1.0
    if sum(sections) != rotary_dim // 2:
        raise ValueError(
            f"sections must sum to rotary_dim / 2 = {rotary_dim // 2}, got {sections} "
            f"(sum {sum(sections)})"
        )
    bands = [np.flatnonzero(band_axes == axis) for axis in range(len(sections))]
    tables = [
        _tables(
            _position_rows("positions[axis]", positions[axis], x),
            inv_freq[bands[axis]],
            attention_factor,
            angle_precision,
        )
        for axis in range(len(sections))
    ]
    cos = jnp.concatenate([cos for cos, _ in tables], axis=-1)
    sin = jnp.concatenate([sin for _, sin in tables], axis=-1)
    order = np.concatenate(bands)
    if interleaved:
        # The tables are tiny ([B, S, 1, n]); putting the bands back in place costs nothing.
        cos, sin = cos[..., np.argsort(order)], sin[..., np.argsort(order)]
    return _rotate(x, cos, sin, layout)


def apply_mixed_rope(
    x: jax.Array,
    positions: jax.Array,
    frequencies: jax.Array,
    *,
    attention_factor: float = 1.0,
    layout: str = "half",
) -> jax.Array:
    """RoPE-Mixed (Heo et al., 2024): each band turns with a mix of every position axis.

    Pair `i` of head `h` at a token with positions `p_a` (one per axis) is rotated by
    `sum_a p_a * frequencies[a, h, i]`. Axial multi-axis RoPE is the special case in
    which each band has one non-zero frequency; learned `frequencies` let a band follow
    any direction of the grid (the paper's diagonal directions). The angle is the float32
    product (learned frequencies cannot take the exact path).

    Args:
      x: `[B, S, H, D]`.
      positions: `[n_axes, S]` or `[n_axes, B, S]`.
      frequencies: `[n_axes, H or 1, rotary_dim/2]` radians per position per axis.
      attention_factor: multiplier of cos and sin.
      layout: "half" or "interleaved".

    Returns:
      `[B, S, H, D]` array of `x.dtype`.
    """
    x = _check_activations("x", x)
    _check_layout(layout)
    positions = _checks.check_positions("positions", positions, allow_float=True)
    _checks.check_rank("positions", positions, (2, 3))
    _checks.check_rank("frequencies", frequencies, 3)
    n_axes, heads, pairs = jnp.shape(frequencies)
    if n_axes != positions.shape[0] or heads not in (1, x.shape[2]):
        raise ValueError(
            f"frequencies must have shape [n_axes, heads or 1, rotary_dim/2] with n_axes = "
            f"{positions.shape[0]} (positions {positions.shape}) and heads = {x.shape[2]}, "
            f"got {jnp.shape(frequencies)}"
        )
    _resolve_rotary_dim(2 * pairs, x.shape[-1])
    rows = jnp.stack(
        [_position_rows("positions[axis]", positions[axis], x) for axis in range(n_axes)]
    ).astype(jnp.float32)
    frequencies = jnp.asarray(frequencies, jnp.float32)
    angle = jnp.einsum("abs,ahi->bshi", rows, frequencies)
    cos, sin = jnp.cos(angle) * attention_factor, jnp.sin(angle) * attention_factor
    return _rotate(x, cos, sin, layout)


class MultiAxisRotaryEmbedding(nn.Module):
    """Linen RoPE over several position axes: `__call__(q, k, positions, k_positions=None)`.

    Positions are `[n_axes, B or 1, S]` (rank 3: one row of positions per axis, e.g.
    `axial_positions(h, w)[:, None]` for image patches, or Qwen2-VL's temporal, height
    and width indices), or `[S]` / `[B, S]` for tokens whose axes all carry the same
    position (text), which is ordinary RoPE.

    By default the bands follow `sections` (`apply_multi_axis_rope`, contiguous or
    `interleaved`). With `learnable_frequencies=True` the frequencies become a float32
    parameter `frequencies` `[n_axes, num_heads or 1, rotary_dim/2]` applied as
    RoPE-Mixed (`apply_mixed_rope`, Heo et al., 2024): every band may turn with every
    axis. It starts at the axial frequencies (so the module starts as axial RoPE,
    deterministically; the paper starts from random per-head directions instead) and
    `num_heads` (the key/value heads; query heads share their group's frequencies) makes
    them per head, None shared by all heads.

    Attributes:
      sections: bands per axis, summing to `rotary_dim / 2`.
      rotary_dim: rotated features per head (None: all of head_dim).
      base: wavelength base.
      layout: "half" or "interleaved".
      scaling: a spec independent of the sequence length, or None.
      interleaved: Qwen3-VL's interleaved assignment of bands to axes.
      learnable_frequencies: learn mixed frequencies (RoPE-Mixed).
      num_heads: key/value heads of the learned frequencies (None: shared).
      angle_precision: "exact" or "float32" (fixed frequencies only).
    """

    sections: tuple[int, ...]
    rotary_dim: int | None = None
    base: float = 10000.0
    layout: str = "half"
    scaling: RopeScaling | None = None
    interleaved: bool = False
    learnable_frequencies: bool = False
    num_heads: int | None = None
    angle_precision: str = "exact"

    def _axis_positions(self, name: str, positions: jax.Array) -> jax.Array:
        positions = _checks.check_positions(name, positions, allow_float=True)
        if positions.ndim == 3:
            return positions
        if positions.ndim not in (1, 2):
            raise ValueError(
                f"{name} must be [n_axes, batch, seq] (multi-axis) or [seq] / [batch, seq] "
                f"(the same position on every axis), got shape {positions.shape}"
            )
        rows = positions if positions.ndim == 2 else positions[None]
        return jnp.broadcast_to(rows, (len(self.sections), *rows.shape))

    def _initial_frequencies(self, head_dim: int) -> jax.Array:
        rotary_dim, inv_freq, _ = _frequencies_for(
            self.rotary_dim, head_dim, self.base, self.scaling, None, []
        )
        band_axes = multi_axis_band_axes(self.sections, interleaved=self.interleaved)
        if len(band_axes) != rotary_dim // 2:
            raise ValueError(
                f"sections must sum to rotary_dim / 2 = {rotary_dim // 2}, got {self.sections}"
            )
        axial = np.stack(
            [np.where(band_axes == a, inv_freq, 0.0) for a in range(len(self.sections))]
        )
        heads = 1 if self.num_heads is None else self.num_heads
        return jnp.asarray(np.repeat(axial[:, None, :], heads, axis=1), jnp.float32)

    @nn.compact
    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        positions: jax.Array,
        k_positions: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        q_axes = self._axis_positions("positions", positions)
        k_axes = q_axes if k_positions is None else self._axis_positions("k_positions", k_positions)
        if not self.learnable_frequencies:
            common = dict(
                base=self.base,
                rotary_dim=self.rotary_dim,
                layout=self.layout,
                scaling=self.scaling,
                interleaved=self.interleaved,
                angle_precision=self.angle_precision,
            )
            return (
                apply_multi_axis_rope(q, q_axes, self.sections, **common),
                apply_multi_axis_rope(k, k_axes, self.sections, **common),
            )
        q = _check_activations("q", q)
        k = _check_activations("k", k)
        if self.scaling is not None and self.scaling.depends_on_seq_len:
            raise ValueError(
                "learnable frequencies cannot start from a scaling that depends on the sequence "
                f"length, got {type(self.scaling).__name__}"
            )
        if self.num_heads is not None and k.shape[2] != self.num_heads:
            raise ValueError(f"k has {k.shape[2]} heads but num_heads={self.num_heads}")
        if q.shape[2] % k.shape[2]:
            raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of k heads ({k.shape[2]})")
        frequencies = self.param(
            "frequencies", lambda _: self._initial_frequencies(jnp.shape(q)[-1])
        )
        _, _, attention_factor = _frequencies_for(
            self.rotary_dim, q.shape[-1], self.base, self.scaling, None, []
        )
        shared = frequencies.shape[1] == 1
        groups = q.shape[2] // k.shape[2]
        q_frequencies = frequencies if shared else jnp.repeat(frequencies, groups, axis=1)
        common = dict(attention_factor=attention_factor, layout=self.layout)
        return (
            apply_mixed_rope(q, q_axes, q_frequencies, **common),
            apply_mixed_rope(k, k_axes, frequencies, **common),
        )


# ------------------------------------------------------------------ xPos


def _xpos_log_zeta(rotary_dim: int) -> np.ndarray:
    """ln zeta_i, zeta_i = (2i/d + gamma) / (1 + gamma) (Sun et al., 2022, eq. 9)."""
    pair = np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim
    return np.log((pair + XPOS_GAMMA) / (1.0 + XPOS_GAMMA))


def apply_xpos(
    q: jax.Array,
    k: jax.Array,
    positions: jax.Array,
    *,
    k_positions: jax.Array | None = None,
    scale_base: float = 512.0,
    causal: bool = True,
    base: float = 10000.0,
    rotary_dim: int | None = None,
    layout: str = "half",
    reference_position: int | None = None,
    angle_precision: str = "exact",
) -> tuple[jax.Array, jax.Array]:
    """xPos (Sun et al., 2022): RoPE with an exponential decay in the distance.

    Query pair `i` at position `n` is rotated as in RoPE and scaled by
    `zeta_i^((n - c) / scale_base)`, key pair `i` at position `m` by
    `zeta_i^(-(m - c) / scale_base)`, with `zeta_i = (2i/d + 0.4) / 1.4 < 1`. Their
    product `zeta_i^((n - m) / scale_base)` depends only on `n - m` and decays with the
    distance when `n >= m`, i.e. under a causal mask; for `n < m` it grows without
    bound, so xPos is causal-only and `causal=False` raises.

    The reference position `c` cancels in every score but keeps each factor finite: it
    is computed in float32 from the exact integer offset `n - c` (never from `n` alone,
    whose factor over- or underflows at long positions). By default `c` is the midpoint
    of all query and key positions of each batch row, so the factors depend only on how
    far apart the positions of one call are, not on where they sit: a call at positions
    around 10^9 is as exact as one around 0. Decoding therefore works at any position
    when each step transforms the whole cache of raw keys with the new query (what
    `make_attention_fn` does under Flax's `decode=True`). A fixed `reference_position`
    (for caches that store transformed keys, `jax_posenc.KVCache`) keeps the cached keys'
    scale across steps, but only within the finite range around it.

    Finite range: factors stay finite while every offset `|n - c|` is at most about
    `(ln(dtype max) - ln 100) * scale_base / |ln zeta_0|`, i.e. ~34k for float32/bf16
    and ~2.6k for float16 outputs with `scale_base=512`. Concrete positions beyond it
    raise a ValueError; traced ones are clamped to it (the affected far-apart pairs get
    a decay that is too weak, never inf or NaN).

    Args:
      q: `[B, Sq, Hq, D]` queries.
      k: `[B, Sk, Hk, D]` keys.
      positions: query positions `[Sq]` or `[B, Sq]` (integers).
      k_positions: key positions `[Sk]` or `[B, Sk]`, default `positions`.
      scale_base: the paper's B (512).
      causal: must be True (see above).
      base, rotary_dim, layout, angle_precision: as in `apply_rope`.
      reference_position: fixed `c` (an int), or None for the per-row midpoint.

    Returns:
      `(q_scaled, k_scaled)` with the shapes and dtypes of `q` and `k`.
    """
    if not causal:
        raise ValueError(
            "xPos is causal-only: its key scale zeta^(-m/scale_base) grows without bound for "
            "keys after the query, so bidirectional attention (causal=False) is refused"
        )
    q = _check_activations("q", q)
    k = _check_activations("k", k)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share head_dim, got shapes {q.shape} and {k.shape}")
    _check_layout(layout)
    scale_base = _checks.check_positive_float("scale_base", scale_base)
    k_positions = positions if k_positions is None else k_positions
    # Integer positions only: the factors are computed from exact integer offsets.
    q_rows = _checks.position_rows("positions", positions, length=q.shape[1], batch=q.shape[0])
    k_rows = _checks.position_rows("k_positions", k_positions, length=k.shape[1], batch=k.shape[0])
    rotary_dim, inv_freq, _ = _frequencies_for(rotary_dim, q.shape[-1], base, None, None, [])

    if q.shape[1] == 0 or k.shape[1] == 0:
        return q, k
    log_zeta = _xpos_log_zeta(rotary_dim) / scale_base
    # Largest |position - reference| whose factor zeta^(+-offset) stays finite (with a
    # margin for |x| up to ~100) in the narrower of the two output dtypes.
    narrowest = min(jnp.finfo(q.dtype).max, jnp.finfo(k.dtype).max)
    limit = float(np.floor((np.log(narrowest) - np.log(100.0)) / -log_zeta.min()))
    if reference_position is None:
        lowest = jnp.minimum(q_rows.min(axis=1), k_rows.min(axis=1))
        span = _checks.saturating_difference(
            jnp.maximum(q_rows.max(axis=1), k_rows.max(axis=1)), lowest
        )
        reference = (lowest + span // 2)[:, None]
        reference_name = "the midpoint of the positions of each row"
    else:
        reference = jnp.int32(_checks.check_int("reference_position", reference_position))
        reference_name = f"reference_position={reference_position}"
    offsets = [_checks.saturating_difference(rows, reference) for rows in (q_rows, k_rows)]
    if all(_checks.is_concrete(x) for x in (q_rows, k_rows, reference)):
        farthest = max(int(np.abs(np.asarray(x)).max()) for x in offsets)
        if farthest > limit:
            raise ValueError(
                f"xPos positions lie up to {farthest} from {reference_name}, but the factors "
                f"zeta^(+-offset/scale_base) stay finite in {jnp.dtype(q.dtype).name} only "
                f"within {int(limit)}: decode with the default per-call reference (apply xPos "
                "to the whole cache each step, as make_attention_fn does under Flax's "
                "decode=True) or keep the positions of one call closer together"
            )
    log_zeta = jnp.asarray(log_zeta, jnp.float32)

    def scaled_tables(rows: jax.Array, offset: jax.Array, sign: float):
        # Traced offsets past the finite range are clamped (documented above).
        offset = jnp.clip(offset, -limit, limit).astype(jnp.float32)
        scale = jnp.exp(sign * offset[:, :, None, None] * log_zeta)
        cos, sin = _tables(rows, inv_freq, 1.0, angle_precision)
        return cos * scale, sin * scale

    q_out = _rotate(q, *scaled_tables(q_rows, offsets[0], 1.0), layout)
    k_out = _rotate(k, *scaled_tables(k_rows, offsets[1], -1.0), layout)
    return q_out, k_out


# ------------------------------------------------------------------ linen modules


class RotaryEmbedding(nn.Module):
    """Linen wrapper of `apply_rope_qk`: `__call__(q, k, positions, k_positions=None)`.

    Per-layer settings (e.g. a larger `base` for global than for local layers) are just
    different field values. With `learnable_frequencies=True` the frequencies become a
    float32 parameter `inv_freq` `[rotary_dim/2]` initialised from `base`/`scaling`; the
    scaling's attention factor stays fixed, and angles use the float32 product.

    Attributes:
      rotary_dim: rotated features per head (None: all of head_dim).
      base: wavelength base.
      layout: "half" or "interleaved".
      scaling: spec from `jax_posenc.rope_scaling`, or None.
      learnable_frequencies: make `inv_freq` a parameter.
      seq_len: static length for length-dependent scalings (None: from the positions).
      angle_precision: "exact" or "float32".
    """

    rotary_dim: int | None = None
    base: float = 10000.0
    layout: str = "half"
    scaling: RopeScaling | None = None
    learnable_frequencies: bool = False
    seq_len: int | None = None
    angle_precision: str = "exact"

    @nn.compact
    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        positions: jax.Array,
        k_positions: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        inv_freq = None
        if self.learnable_frequencies:
            rotary_dim = _resolve_rotary_dim(self.rotary_dim, jnp.shape(q)[-1])
            inv_freq = self.param(
                "inv_freq",
                lambda _: initial_learned_frequencies(rotary_dim, self.base, self.scaling),
            )
        return apply_rope_qk(
            q,
            k,
            positions,
            k_positions,
            base=self.base,
            rotary_dim=self.rotary_dim,
            layout=self.layout,
            scaling=self.scaling,
            inv_freq=inv_freq,
            seq_len=self.seq_len,
            angle_precision=self.angle_precision,
        )


def initial_learned_frequencies(
    rotary_dim: int, base: float = 10000.0, scaling: RopeScaling | None = None
) -> jax.Array:
    """float32 `[rotary_dim/2]` starting value of learnable frequencies."""
    _check_scaling(scaling)
    if scaling is not None and scaling.depends_on_seq_len:
        raise ValueError(
            "learnable frequencies cannot start from a scaling that depends on the sequence "
            f"length, got {type(scaling).__name__}"
        )
    inv_freq, _ = rope_frequencies(rotary_dim, base=base, scaling=scaling)
    return jnp.asarray(inv_freq, jnp.float32)


class XPosEmbedding(nn.Module):
    """Linen wrapper of `apply_xpos`: `__call__(q, k, positions, k_positions=None)`."""

    scale_base: float = 512.0
    rotary_dim: int | None = None
    base: float = 10000.0
    layout: str = "half"
    reference_position: int | None = None
    angle_precision: str = "exact"

    @nn.compact
    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        positions: jax.Array,
        k_positions: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        return apply_xpos(
            q,
            k,
            positions,
            k_positions=k_positions,
            scale_base=self.scale_base,
            base=self.base,
            rotary_dim=self.rotary_dim,
            layout=self.layout,
            reference_position=self.reference_position,
            angle_precision=self.angle_precision,
        )
