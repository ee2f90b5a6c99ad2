"""Fused attention kernels in Pallas (Triton backend), positional terms inside the kernel.

`implementation="pallas"` runs one forward kernel and two backward kernels in the
style of `jax/experimental/pallas/ops/gpu/attention.py` (FlashAttention-2 tiling): a
grid over (query block, batch * head), an inner `fori_loop` over key blocks with an
online softmax, and a module-level `jax.custom_vjp` whose every array is an argument.
What the kernels add to that reference:

* `bias_fn` is traced once to a jaxpr; its constants (ALiBi slopes, a T5 table, FIRE's
  MLP weights, KERPLE's parameters, integer tables) become kernel operands, and the
  jaxpr is evaluated *inside* the kernel for every tile, from the tile's positions
  (positions are kernel operands too, so packed sequences, caches and q_len != k_len
  work). A program handles one (batch, head) pair and evaluates its head only: each
  constant with a head axis is sliced per head by its `BlockSpec`, and the jaxpr is
  evaluated with that axis kept at size 1 (`_evaluate` checks each operation commutes
  with the slicing; when one does not, the kernel evaluates every head and selects its
  own with a one-hot sum, correct but H times the bias work). Gathers (T5's table
  lookup) become compare-and-select chains and small matrix products (FIRE's MLP)
  broadcast-multiply-sums, which the Triton lowering accepts.
* The backward kernel that computes dq pulls each tile's logit gradient back through
  the bias jaxpr (`jax.vjp` inside the kernel) and writes per-program partial sums of
  the constants' gradients, `[num_programs, *constant]`, summed afterwards: no atomics,
  bit-identical across runs, no `L x L` array.
* RoPE (`rope_frequencies`) is applied to q and k tiles as they are loaded, with cos/sin
  rows per position passed as `[B or 1, L, rotary_dim / 2]` operands (O(L) memory),
  computed by the exact-angle helper `jax_posenc._angles.rotation_cos_sin`: angles
  within ~1e-6 rad up to position 2^24. A float32 product `position * inv_freq`
  computed inside the kernel would be off by up to ~0.06 rad at position 1e6, which the
  library's precision rule forbids; the table costs 2 * rotary_dim / 2 floats per
  position, less than a key. The gradient is rotated back in the kernel.
* Causal and segment block skipping from positions: for every (query block, key block)
  pair, whether it provably has no allowed entry is decided outside the kernel from
  per-block position and segment bounds (O((L / block)^2) integers), and each program
  loops over the range from its first to its last non-empty block; with `arange`
  positions and causal masking that is exactly the blocks on and below the diagonal.
  Fully masked rows give zeros and zero gradients (masked logits are -inf and the
  running maximum is shifted to 0 while it is -inf, as in `_block.py`).

Supported terms: `bias_fn`, `q_positions`, `k_positions`, `mask`, `causal`,
`segment_ids`, `scale`, `rope_frequencies`, GQA (`H % Hkv == 0`), any lengths (padded
to whole blocks internally), float32 / bfloat16 / float16 inputs with float32
accumulation. Not supported (a ValueError names the term and points to "xla" and
"blockwise"): `relative_terms`, `token_bias`, `alternate` and any other term.

Without a GPU the same kernels run in Pallas interpret mode (`interpret=True`), slow
but exact: that is how the tests run on CPU. Whether to interpret is a static decision
made from the platform the computation is lowered for (`lowering_platform`, the
default backend unless a test sets it), so `jax.jit(f).trace(...).lower(
lowering_platforms=("cuda",))` on a CPU machine lowers the real Triton kernels.

References:
  Dao, 2023, FlashAttention-2: Faster Attention with Better Parallelism and Work
    Partitioning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.extend import core as jex_core

from jax_posenc import _angles, _checks
from jax_posenc._protocols import per_entry_evaluation
from jax_posenc.attention._blockwise import _cotangent, _pad_axis

_F32 = jnp.float32

UNSUPPORTED_TERMS = ("relative_terms", "token_bias", "alternate")


# ------------------------------------------------------------------ configuration


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the fused kernels (forward and both backward kernels).

    Attributes:
      q_block: queries per program (and per inner step of the dk/dv kernel).
      k_block: keys per inner step (and per program of the dk/dv kernel).
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining stages.
    """

    q_block: int
    k_block: int
    num_warps: int = 4
    num_stages: int = 2


def default_block_sizes(head_dim: int) -> BlockSizes:
    """The documented rule (not measured: no GPU was available when it was written).

    head_dim > 64: 64 x 64 tiles and 8 warps (the tiles of the reference Pallas GPU
    kernel for head_dim 128, whose register budget the per-tile bias also needs);
    head_dim <= 64: 128 x 128 tiles and 4 warps. The same rule applies in interpret mode.
    """
    if head_dim > 64:
        return BlockSizes(64, 64, num_warps=8)
    return BlockSizes(128, 128, num_warps=4)


_PLATFORM_OVERRIDE: list[str] = []


@contextlib.contextmanager
def lowering_platform(platform: str):
    """Traces `implementation="pallas"` for `platform` ("cuda"/"gpu": the Triton kernels;
    anything else: interpret mode) instead of the default backend.

    For cross-platform lowering on a machine without a GPU:
    `with lowering_platform("cuda"): jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))`.
    """
    _PLATFORM_OVERRIDE.append(platform)
    try:
        yield
    finally:
        _PLATFORM_OVERRIDE.pop()


def _interpret() -> bool:
    platform = _PLATFORM_OVERRIDE[-1] if _PLATFORM_OVERRIDE else jax.default_backend()
    return platform not in ("gpu", "cuda", "rocm")


def check_supported(**terms: Any) -> None:
    """Raises a ValueError naming the first given term the kernels do not evaluate."""
    for name, value in terms.items():
        if value is not None:
            raise ValueError(
                f"implementation='pallas' does not support {name}; use implementation='xla' "
                f"or 'blockwise' (the fused kernel evaluates bias_fn, causal, segment_ids, "
                f"mask, positions and rope_frequencies)"
            )


# ------------------------------------------------------------------ RoPE tables


def check_rope_frequencies(rope_frequencies, head_dim: int) -> int:
    """Validates `[n]` float inverse frequencies with `2n <= head_dim`; returns n."""
    _checks.check_floating_array("rope_frequencies", rope_frequencies)
    shape = tuple(jnp.shape(rope_frequencies))
    if len(shape) != 1 or not 1 <= shape[0] <= head_dim // 2:
        raise ValueError(
            f"rope_frequencies must have shape [rotary_dim / 2] with 2 <= rotary_dim <= "
            f"head_dim = {head_dim}, got shape {list(shape)}"
        )
    return shape[0]


def rope_tables(positions: jax.Array, rope_frequencies) -> tuple[jax.Array, jax.Array]:
    """cos and sin `[B or 1, L, n]` float32 of `positions [B or 1, L] * rope_frequencies`.

    Exact angles (`_angles.rotation_cos_sin`) for concrete frequencies; traced
    (learned) frequencies use the float32 product, as in `apply_rope`.
    """
    if not isinstance(rope_frequencies, jax.core.Tracer):
        rope_frequencies = np.asarray(rope_frequencies, np.float64)
    return _angles.rotation_cos_sin(positions, rope_frequencies)


def _rotate(first, second, cos, sin):
    """The half-split ("rotate_half") rotation of feature pairs `(first, second)`."""
    return first * cos - second * sin, second * cos + first * sin


def apply_rope_tables(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates `x` `[B, H, L, D]` (heads first) by cos/sin `[B or 1, L, n]`, half layout.

    Feature i pairs with i + n for i < n; features from 2n on pass through. Float32
    arithmetic, one cast back to `x.dtype`: the up-front form of the kernels' rotation.
    """
    n = cos.shape[-1]
    values = x.astype(_F32)
    cos, sin = cos[:, None], sin[:, None]
    rotated = _rotate(values[..., :n], values[..., n : 2 * n], cos, sin)
    return jnp.concatenate([*rotated, values[..., 2 * n :]], axis=-1).astype(x.dtype)


# ------------------------------------------------------------------ bias evaluation


class _NotSeparable(Exception):
    """An operation of the bias does not commute with slicing out one head."""


# Operations that act elementwise (with size-1 broadcasting): a head axis kept at
# size 1 stays where it is.
_ELEMENTWISE_NAMES = (
    "abs add and atan2 cbrt ceil clamp convert_element_type copy copy_p cos cosh div eq "
    "erf erf_inv exp exp2 expm1 floor ge gt integer_pow is_finite le log log1p logistic "
    "lt max min mul ne neg nextafter not or pow reduce_precision rem round rsqrt "
    "select_n sign sin sinh sqrt square stop_gradient sub tan tanh xor"
)
_ELEMENTWISE = frozenset(_ELEMENTWISE_NAMES.split())
_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call"})
_REDUCTIONS = {"reduce_sum": jnp.sum, "reduce_max": jnp.max, "reduce_min": jnp.min}


def _inner_jaxpr(eqn):
    inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(inner, jex_core.ClosedJaxpr):
        return inner.jaxpr, inner.consts
    return inner, ()


def _needs_rewrite(jaxpr) -> bool:
    """Whether a jaxpr (or one it calls) holds a gather or a matrix product."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("gather", "dot_general"):
            return True
        inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        if inner is not None and _needs_rewrite(getattr(inner, "jaxpr", inner)):
            return True
    return False


def _bind(eqn, values, params=None):
    bind_params = eqn.primitive.get_bind_params(params or eqn.params)
    out = eqn.primitive.bind(*values, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


# The Triton lowering refuses tensors of more elements than this.
TRITON_MAX_ELEMENTS = 1 << 20


class PallasUnsupported(ValueError):
    """The fused GPU kernels cannot be built for these shapes or this bias function
    (`implementation="auto"` then runs blockwise instead)."""


def _dot_as_sum(lhs, rhs, dimension_numbers, preferred_element_type):
    """`dot_general` without batch dimensions as a broadcast product and a sum over the
    contracted axis (the Triton lowering only takes 2-D products of >= 16 x 16 tiles;
    the products inside a positional term are small: an MLP over a scalar)."""
    (lhs_contract, rhs_contract), _ = dimension_numbers
    lhs_free = [d for d in range(lhs.ndim) if d not in lhs_contract]
    rhs_free = [d for d in range(rhs.ndim) if d not in rhs_contract]
    lhs = lax.transpose(lhs, (*lhs_free, *lhs_contract)) if lhs_contract[0] != lhs.ndim - 1 else lhs
    rhs = lax.transpose(rhs, (*rhs_free, *rhs_contract))
    n_lhs, n_rhs = len(lhs_free), len(rhs_free)
    shape = (*lhs.shape[:n_lhs], *rhs.shape[:n_rhs], lhs.shape[-1])
    if not _interpret() and math.prod(shape) > TRITON_MAX_ELEMENTS:
        raise PallasUnsupported(
            f"implementation='pallas' on GPU: a matrix product inside bias_fn needs a "
            f"{list(shape)} intermediate per tile ({math.prod(shape)} elements), more than "
            f"the {TRITON_MAX_ELEMENTS} a Triton tensor may hold; use a smaller block_size "
            "or implementation='blockwise'"
        )
    out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
    product = lax.broadcast_in_dim(lhs, shape, (*range(n_lhs), n_lhs + n_rhs)).astype(out_dtype)
    product = product * lax.broadcast_in_dim(
        rhs, shape, (*range(n_lhs, n_lhs + n_rhs), n_lhs + n_rhs)
    ).astype(out_dtype)
    return jnp.sum(product, axis=-1)


def _is_take(params, operand, indices) -> bool:
    numbers = params["dimension_numbers"]
    return (
        len(numbers.start_index_map) == 1
        and tuple(numbers.collapsed_slice_dims) == tuple(numbers.start_index_map)
        and not numbers.operand_batching_dims
        and indices.shape[-1] == 1
        and all(
            size == (1 if axis == numbers.start_index_map[0] else operand.shape[axis])
            for axis, size in enumerate(params["slice_sizes"])
        )
    )


def _gather_as_select(params, operand, indices):
    """A `take` along one axis as a chain of compare-and-select over the table's rows.

    Exact (each output is one table entry, selected, never summed); the Triton lowering
    has no gather.
    """
    numbers = params["dimension_numbers"]
    (axis,) = numbers.start_index_map
    size = operand.shape[axis]
    index = indices.reshape(indices.shape[:-1])
    mode = params["mode"]
    in_range = (index >= 0) & (index < size)
    if mode != lax.GatherScatterMode.FILL_OR_DROP:
        index = jnp.clip(index, 0, size - 1)
    out_rank = index.ndim + operand.ndim - 1
    offset_dims = tuple(numbers.offset_dims)
    batch_dims = tuple(d for d in range(out_rank) if d not in offset_dims)
    slab_shape = tuple(s for d, s in enumerate(operand.shape) if d != axis)
    shape = [0] * out_rank
    for d, s in zip(offset_dims, slab_shape, strict=True):
        shape[d] = s
    for d, s in zip(batch_dims, index.shape, strict=True):
        shape[d] = s
    shape = tuple(shape)
    rows = lax.broadcasted_iota(jnp.int32, operand.shape, axis)
    zero = jnp.zeros((), operand.dtype)
    out = jnp.zeros(shape, operand.dtype)
    for row in range(size):
        slab = jnp.sum(jnp.where(rows == row, operand, zero), axis=axis)
        hit = lax.broadcast_in_dim(index == row, shape, batch_dims)
        out = jnp.where(hit, lax.broadcast_in_dim(slab, shape, offset_dims), out)
    if mode == lax.GatherScatterMode.FILL_OR_DROP:
        fill = params.get("fill_value")
        if fill is None:
            fill = jnp.nan if jnp.issubdtype(operand.dtype, jnp.inexact) else 0
        out = jnp.where(lax.broadcast_in_dim(in_range, shape, batch_dims), out, fill)
    return out


def _common_axis(eqn, values, axes) -> int:
    """The sliced axis of an elementwise operation; raises unless slicing commutes."""
    sliced = {a for a in axes if a is not None}
    if len(sliced) != 1:
        raise _NotSeparable(eqn.primitive.name)
    (axis,) = sliced
    for value, value_axis in zip(values, axes, strict=True):
        if value_axis is None and jnp.ndim(value) and jnp.shape(value)[axis] != 1:
            raise _NotSeparable(f"{eqn.primitive.name} mixes a head-sliced value with heads")
    return axis


def _apply_sliced(eqn, values, axes):
    """Evaluates one equation whose inputs carry a head axis kept at size 1."""
    name, params = eqn.primitive.name, dict(eqn.params)
    (axis,) = [a for a in axes if a is not None][:1] or [None]
    if name in _ELEMENTWISE:
        return _bind(eqn, values), [_common_axis(eqn, values, axes)] * len(eqn.outvars)
    if name == "broadcast_in_dim":
        out_axis = params["broadcast_dimensions"][axis]
        shape = list(params["shape"])
        shape[out_axis] = 1
        params["shape"] = tuple(shape)
        return _bind(eqn, values[:1], params), [out_axis]
    if name == "transpose":
        return _bind(eqn, values), [tuple(params["permutation"]).index(axis)]
    if name == "squeeze":
        dims = params["dimensions"]
        if axis in dims:
            raise _NotSeparable(name)
        return _bind(eqn, values), [axis - sum(d < axis for d in dims)]
    if name in _REDUCTIONS:
        dims = params["axes"]
        if axis in dims:
            raise _NotSeparable(f"{name} over heads")
        return _bind(eqn, values), [axis - sum(d < axis for d in dims)]
    if name == "reshape" and params.get("dimensions") is None:
        old = eqn.invars[0].aval.shape
        new = list(params["new_sizes"])
        before = math.prod(old[:axis])
        for out_axis in range(len(new)):
            if math.prod(new[:out_axis]) == before and new[out_axis] == old[axis]:
                new[out_axis] = 1
                params["new_sizes"] = tuple(new)
                return _bind(eqn, values, params), [out_axis]
        raise _NotSeparable(name)
    if name == "dot_general":
        (lhs_contract, rhs_contract), batch = params["dimension_numbers"]
        if any(batch) or len(lhs_contract) != 1:
            raise _NotSeparable(name)
        lhs_axis, rhs_axis = axes
        if lhs_axis in lhs_contract or rhs_axis in rhs_contract:
            raise _NotSeparable(f"{name} contracts over heads")
        lhs_free = [d for d in range(jnp.ndim(values[0])) if d not in lhs_contract]
        rhs_free = [d for d in range(jnp.ndim(values[1])) if d not in rhs_contract]
        if lhs_axis is not None and rhs_axis is not None:
            raise _NotSeparable(name)
        out_axis = (
            lhs_free.index(lhs_axis)
            if lhs_axis is not None
            else len(lhs_free) + rhs_free.index(rhs_axis)
        )
        out = _dot_as_sum(*values, params["dimension_numbers"], params["preferred_element_type"])
        return [out], [out_axis]
    if name == "gather":
        operand, indices = values
        numbers = params["dimension_numbers"]
        if axes[1] is not None or axes[0] in numbers.collapsed_slice_dims:
            raise _NotSeparable(name)
        sizes = list(params["slice_sizes"])
        sizes[axis] = 1
        params["slice_sizes"] = tuple(sizes)
        if not _is_take(params, operand, indices):
            raise _NotSeparable(name)
        kept = [d for d in range(operand.ndim) if d not in numbers.collapsed_slice_dims]
        out_axis = numbers.offset_dims[kept.index(axis)]
        return [_gather_as_select(params, operand, indices)], [out_axis]
    if name in _CALLS or name == "custom_jvp_call":
        inner, consts = _inner_jaxpr(eqn)
        return _evaluate(inner, consts, [None] * len(consts), values, axes)
    raise _NotSeparable(name)


def _apply(eqn, values):
    """Evaluates one equation on whole values, rewriting what Triton cannot lower."""
    name, params = eqn.primitive.name, eqn.params
    if name == "gather" and _is_take(params, *values):
        return [_gather_as_select(params, *values)]
    if name == "dot_general":
        (lhs_contract, _), batch = params["dimension_numbers"]
        if not any(batch) and len(lhs_contract) == 1:
            return [
                _dot_as_sum(*values, params["dimension_numbers"], params["preferred_element_type"])
            ]
    if name in _CALLS or (name == "custom_jvp_call" and _needs_rewrite(_inner_jaxpr(eqn)[0])):
        inner, consts = _inner_jaxpr(eqn)
        outs, _ = _evaluate(inner, consts, [None] * len(consts), values, [None] * len(values))
        return outs
    return _bind(eqn, values)


class _Split:
    """An integer array held as pieces of size 1 along `axis`.

    The Triton lowering only takes arrays whose sizes are powers of two; an integer
    table of another size (T5's 7 bucket boundaries) is loaded piece by piece and every
    operation on it runs per piece until a reduction over that axis merges them.
    """

    def __init__(self, axis: int, pieces: Sequence[jax.Array]):
        self.axis, self.pieces = axis, list(pieces)

    @property
    def dtype(self):
        return self.pieces[0].dtype

    def merged(self) -> jax.Array:
        """The whole array (a concatenation: interpret mode only, Triton has none)."""
        return jnp.concatenate(self.pieces, axis=self.axis)


_COMBINE = {"reduce_sum": jnp.add, "reduce_max": jnp.maximum, "reduce_min": jnp.minimum}


def _piece_of(value, axis: int, index: int, count: int):
    """Piece `index` of an operand next to split ones (broadcast along `axis` or split)."""
    if isinstance(value, _Split):
        return value.pieces[index]
    if jnp.ndim(value) == 0 or jnp.shape(value)[axis] == 1:
        return value
    if jnp.shape(value)[axis] == count and not isinstance(value, jax.core.Tracer):
        return lax.slice_in_dim(jnp.asarray(value), index, index + 1, axis=axis)
    raise _NotSeparable("a split operand next to a whole one")


def _apply_split(eqn, values):
    """Evaluates one equation with split operands; returns outputs (split or whole)."""
    name, params = eqn.primitive.name, dict(eqn.params)
    split = next(v for v in values if isinstance(v, _Split))
    axis, count = split.axis, len(split.pieces)
    if name in _ELEMENTWISE:
        pieces = [
            _bind(eqn, [_piece_of(v, axis, i, count) for v in values])[0] for i in range(count)
        ]
        return [_Split(axis, pieces)]
    if name == "broadcast_in_dim" and isinstance(values[0], _Split):
        out_axis = params["broadcast_dimensions"][axis]
        shape = list(params["shape"])
        shape[out_axis] = 1
        params["shape"] = tuple(shape)
        return [_Split(out_axis, [_bind(eqn, [p], params)[0] for p in split.pieces])]
    if name == "transpose":
        pieces = [_bind(eqn, [p])[0] for p in split.pieces]
        return [_Split(tuple(params["permutation"]).index(axis), pieces)]
    if name in _COMBINE:
        reduced = [_bind(eqn, [p])[0] for p in split.pieces]
        if axis in params["axes"]:
            return [functools.reduce(_COMBINE[name], reduced)]
        return [_Split(axis - sum(d < axis for d in params["axes"]), reduced)]
    merged = [v.merged() if isinstance(v, _Split) else v for v in values]
    return _apply(eqn, merged)


def _split_load(ref, shape: tuple[int, ...]):
    """Loads an integer constant whole, or piece by piece along its one axis whose size
    is not a power of two (see `_Split`)."""
    odd = [axis for axis, size in enumerate(shape) if size & (size - 1)]
    if len(odd) != 1 or not jnp.issubdtype(ref.dtype, jnp.integer):
        return ref[...].reshape(shape)
    (axis,) = odd
    pieces = []
    for index in range(shape[axis]):
        at = tuple(pl.ds(index, 1) if d == axis else slice(None) for d in range(len(shape)))
        pieces.append(ref[at])
    return _Split(axis, pieces)


def _evaluate(jaxpr, consts, const_axes, args, arg_axes):
    """Evaluates `jaxpr`; values with an axis in `*_axes` hold one head at size 1 there.

    Returns the outputs and their head axes. Raises `_NotSeparable` when an operation
    would need the other heads.
    """
    env = {}

    def read(var):
        if isinstance(var, jex_core.Literal):
            return var.val, None
        return env[var]

    for var, value, axis in zip(jaxpr.constvars, consts, const_axes, strict=True):
        env[var] = (value, axis)
    for var, value, axis in zip(jaxpr.invars, args, arg_axes, strict=True):
        env[var] = (value, axis)
    for eqn in jaxpr.eqns:
        values, axes = zip(*map(read, eqn.invars), strict=True) if eqn.invars else ((), ())
        if any(isinstance(v, _Split) for v in values):
            if all(a is None for a in axes):
                outs = _apply_split(eqn, list(values))
                for var, value in zip(eqn.outvars, outs, strict=True):
                    env[var] = (value, None)
                continue
            values = tuple(v.merged() if isinstance(v, _Split) else v for v in values)
        if any(a is not None for a in axes):
            outs, out_axes = _apply_sliced(eqn, list(values), list(axes))
        else:
            outs = _apply(eqn, list(values))
            out_axes = [None] * len(outs)
        for var, value, axis in zip(eqn.outvars, outs, out_axes, strict=True):
            env[var] = (value, axis)
    outs = [read(var) for var in jaxpr.outvars]
    values = [value.merged() if isinstance(value, _Split) else value for value, _ in outs]
    return values, [axis for _, axis in outs]


class _Bias(NamedTuple):
    """A traced `bias_fn` and how the kernel reads its constants (static, hashable)."""

    jaxpr: Any  # jax.extend.core.Jaxpr; constvars are the kernel's constant operands
    const_shapes: tuple[tuple[int, ...], ...]  # original shapes
    head_axes: tuple[int | None, ...]  # axis sliced per head by the BlockSpec, or None
    heads: int  # heads of the bias output (1: shared by every head)
    select_head: bool  # evaluate every head and select one (operations mixed heads)


def _head_axis(shape: tuple[int, ...], heads: int) -> int | None:
    matches = [axis for axis, size in enumerate(shape) if size == heads]
    return matches[-1] if matches else None


def _keep_one(shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
    return shape if axis is None else (*shape[:axis], 1, *shape[axis + 1 :])


def trace_bias(bias_fn: Callable, heads: int, q_block: int, k_block: int):
    """`(_Bias, consts)`: `bias_fn` traced on `[1, q_block]`/`[1, k_block]` positions with
    all its constants hoisted (as `_blockwise._hoist` does), and the per-head plan."""
    examples = (jnp.zeros((1, q_block), jnp.int32), jnp.zeros((1, k_block), jnp.int32))
    with per_entry_evaluation():  # no per-block shortcuts inside a tile
        closed = jax.make_jaxpr(bias_fn)(*examples)
    (out,) = closed.out_avals
    target = (1, heads, q_block, k_block)
    if len(out.shape) != 4 or any(s not in (1, t) for s, t in zip(out.shape, target, strict=True)):
        raise ValueError(
            f"bias_fn must return an array broadcastable to {list(target)} for one batch row "
            f"of positions, got shape {list(out.shape)}"
        )
    consts = tuple(jnp.asarray(c) for c in closed.consts)
    shapes = tuple(c.shape for c in consts)
    out_heads = out.shape[1]
    head_axes = tuple(_head_axis(s, heads) if out_heads > 1 and heads > 1 else None for s in shapes)
    select = False
    if any(a is not None for a in head_axes):
        sliced = [
            jax.ShapeDtypeStruct(_keep_one(s, a), c.dtype)
            for s, a, c in zip(shapes, head_axes, consts, strict=True)
        ]
        try:
            out_axes = _probe(closed.jaxpr, sliced, head_axes, examples)
            select = out_axes != [1]
        except (_NotSeparable, TypeError, ValueError):
            select = True
        if select:
            head_axes = (None,) * len(consts)
    elif out_heads > 1:
        select = True
    return _Bias(closed.jaxpr, shapes, head_axes, out_heads, select), consts


def _probe(jaxpr, sliced, head_axes, examples):
    """Abstract evaluation of the per-head plan; returns the output's head axes."""
    found = []

    def run(*consts):
        outs, axes = _evaluate(jaxpr, consts, head_axes, examples, [None, None])
        found.extend(axes)
        return outs

    jax.eval_shape(run, *sliced)
    return found


def _tile_bias(bias: _Bias, consts: Sequence[jax.Array], q_pos, k_pos, head) -> jax.Array:
    """The bias of one tile for the program's head, float32 `[bq, bk]`."""
    (out,), _ = _evaluate(
        bias.jaxpr, consts, bias.head_axes, (q_pos[None, :], k_pos[None, :]), [None, None]
    )
    out = out.astype(_F32)
    if bias.select_head:
        heads = lax.broadcasted_iota(jnp.int32, out.shape, 1)
        out = jnp.sum(jnp.where(heads == head, out, 0.0), axis=1, keepdims=True)
    return jnp.broadcast_to(out, (1, 1, q_pos.shape[0], k_pos.shape[0])).reshape(
        q_pos.shape[0], k_pos.shape[0]
    )


def _arrange_consts(bias: _Bias, consts):
    """Constants as the kernels read them: per-head ones as `[H, *shape with 1 at the
    head axis]` (the BlockSpec picks the program's head), the others at least 1-D."""
    arranged = []
    for const, axis in zip(consts, bias.head_axes, strict=True):
        if axis is None:
            arranged.append(const.reshape(const.shape or (1,)))
        else:
            arranged.append(jnp.expand_dims(jnp.moveaxis(const, axis, 0), axis + 1))
    return tuple(arranged)


def _kernel_shape(bias: _Bias, index: int) -> tuple[int, ...]:
    shape, axis = bias.const_shapes[index], bias.head_axes[index]
    return _keep_one(shape, axis) if axis is not None else (shape or (1,))


def _load_consts(bias: _Bias | None, refs) -> list[jax.Array]:
    if bias is None:
        return []
    return [
        _split_load(ref, shape) if axis is None else ref[...]
        for ref, shape, axis in zip(refs, bias.const_shapes, bias.head_axes, strict=True)
    ]


# ------------------------------------------------------------------ the kernels


class _Config(NamedTuple):
    """Static settings of the kernels: the non-differentiable argument of the VJP."""

    scale: float
    causal: bool
    q_block: int
    k_block: int
    q_len: int  # queries at or after this index are padding
    k_len: int  # keys at or after this index are padding (masked)
    heads: int
    kv_heads: int
    bias: _Bias | None
    rotary: int  # rotated feature pairs (rotary_dim / 2); 0 without RoPE
    rope_grads: bool  # whether the cos/sin tables need gradients (traced frequencies)
    interpret: bool
    num_warps: int
    num_stages: int


class _Operands(NamedTuple):
    """The arrays every kernel reads (None where a term is absent)."""

    q: jax.Array  # [B, H, Lq, D], padded to whole blocks
    k: jax.Array  # [B, Hkv, Lk, D]
    v: jax.Array  # [B, Hkv, Lk, Dv]
    q_pos: jax.Array  # int32 [B, Lq]
    k_pos: jax.Array  # int32 [B, Lk]
    q_seg: jax.Array | None  # int32 [B, Lq]
    k_seg: jax.Array | None  # int32 [B, Lk]
    mask: jax.Array | None  # int8 [B or 1, H or 1, Lq or 1, Lk or 1]
    q_rope: tuple[jax.Array, jax.Array] | None  # cos, sin float32 [B or 1, Lq, n]
    k_rope: tuple[jax.Array, jax.Array] | None  # cos, sin float32 [B or 1, Lk, n]
    q_bounds: tuple[jax.Array, jax.Array]  # first, end key block per query block [B, nq]
    k_bounds: tuple[jax.Array, jax.Array]  # first, end query block per key block [B, nk]
    consts: tuple[jax.Array, ...]  # the bias constants, arranged (`_arrange_consts`)


def _precision(x: jax.Array):
    return lax.Precision.HIGHEST if x.dtype == _F32 else None


def _dot(a, b, contract_a: int, contract_b: int) -> jax.Array:
    """Float32-accumulated product of two 2-D tiles over the given axes."""
    numbers = (((contract_a,), (contract_b,)), ((), ()))
    return lax.dot_general(a, b, numbers, precision=_precision(a), preferred_element_type=_F32)


def _features(ref, rows, rope, rotary: int):
    """A tile of q or k as feature parts, rotated on load with RoPE.

    Returns the parts in the ref's dtype (`[x]`, or the two rotated halves and the
    features past them) and, with RoPE, the float32 halves and cos/sin (for gradients).
    """
    if not rotary:
        return [ref[rows, :]], None
    first = ref[rows, pl.ds(0, rotary)].astype(_F32)
    second = ref[rows, pl.ds(rotary, rotary)].astype(_F32)
    cos, sin = rope[0][rows, :], rope[1][rows, :]
    parts = [x.astype(ref.dtype) for x in _rotate(first, second, cos, sin)]
    rest = ref.shape[-1] - 2 * rotary
    if rest:
        parts.append(ref[rows, pl.ds(2 * rotary, rest)])
    return parts, (first, second, cos, sin)


def _store_features(ref, parts, raw, rotary: int, table_refs):
    """Stores the gradient of a rotated tile, rotated back; with `table_refs`, also the
    gradients of the tile's cos and sin rows."""
    if not rotary:
        ref[...] = parts[0].astype(ref.dtype)
        return
    first, second, cos, sin = raw
    d_first, d_second = parts[0], parts[1]
    ref[:, pl.ds(0, rotary)] = (d_first * cos + d_second * sin).astype(ref.dtype)
    ref[:, pl.ds(rotary, rotary)] = (d_second * cos - d_first * sin).astype(ref.dtype)
    if len(parts) > 2:
        ref[:, pl.ds(2 * rotary, ref.shape[-1] - 2 * rotary)] = parts[2].astype(ref.dtype)
    if table_refs:
        table_refs[0][...] = d_first * first + d_second * second
        table_refs[1][...] = d_second * first - d_first * second


class _Side(NamedTuple):
    """One tile's queries or keys: feature parts, positions, segment ids, first row."""

    parts: list
    pos: jax.Array
    seg: jax.Array | None
    start: jax.Array


def _side(ops: _Operands, cfg: _Config, is_query: bool, start, size: int) -> tuple[_Side, Any]:
    rows = pl.ds(start, size)
    ref, rope, pos, seg = (
        (ops.q, ops.q_rope, ops.q_pos, ops.q_seg)
        if is_query
        else (ops.k, ops.k_rope, ops.k_pos, ops.k_seg)
    )
    parts, raw = _features(ref, rows, rope, cfg.rotary)
    return _Side(parts, pos[rows], None if seg is None else seg[rows], start), raw


def _content(cfg: _Config, ops: _Operands, q: _Side, k: _Side):
    """Scaled content logits `[bq, bk]` and where attention is allowed (None: everywhere)."""
    logits = sum(_dot(a, b, 1, 1) for a, b in zip(q.parts, k.parts, strict=True)) * cfg.scale
    conditions = []
    if ops.mask is not None:
        rows = pl.ds(q.start, cfg.q_block) if ops.mask.shape[0] > 1 else pl.ds(0, 1)
        cols = pl.ds(k.start, cfg.k_block) if ops.mask.shape[1] > 1 else pl.ds(0, 1)
        conditions.append(ops.mask[rows, cols] != 0)
    if cfg.k_len % cfg.k_block:
        index = k.start + lax.broadcasted_iota(jnp.int32, (1, cfg.k_block), 1)
        conditions.append(index < cfg.k_len)
    if cfg.causal:
        conditions.append(q.pos[:, None] >= k.pos[None, :])
    if q.seg is not None:
        conditions.append(q.seg[:, None] == k.seg[None, :])
    allowed = None
    for condition in conditions:
        allowed = condition if allowed is None else allowed & condition
    return logits, allowed


def _masked(logits, allowed):
    return logits if allowed is None else jnp.where(allowed, logits, -jnp.inf)


def _bias(cfg: _Config, consts, q: _Side, k: _Side, head):
    return _tile_bias(cfg.bias, consts, q.pos, k.pos, head)


def _shift(row_max):
    return jnp.where(row_max == -jnp.inf, 0.0, row_max)


def _forward_kernel(ops: _Operands, out_ref, lse_ref, *, cfg: _Config):
    block, bh = pl.program_id(0), pl.program_id(1)
    head = lax.rem(bh, cfg.heads)
    q, _ = _side(ops, cfg, True, block * cfg.q_block, cfg.q_block)
    consts = _load_consts(cfg.bias, ops.consts)

    def body(j, carry):
        acc, row_max, row_sum = carry
        k, _ = _side(ops, cfg, False, j * cfg.k_block, cfg.k_block)
        logits, allowed = _content(cfg, ops, q, k)
        if cfg.bias is not None:
            logits = logits + _bias(cfg, consts, q, k, head)
        logits = _masked(logits, allowed)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
        shift = _shift(new_max)
        rescale = jnp.exp(row_max - shift)
        weights = jnp.exp(logits - shift[:, None])
        v = ops.v[pl.ds(j * cfg.k_block, cfg.k_block), :]
        acc = rescale[:, None] * acc + _dot(weights.astype(v.dtype), v, 1, 0)
        return acc, new_max, rescale * row_sum + jnp.sum(weights, axis=1)

    init = (
        jnp.zeros((cfg.q_block, out_ref.shape[-1]), _F32),
        jnp.full((cfg.q_block,), -jnp.inf, _F32),
        jnp.zeros((cfg.q_block,), _F32),
    )
    first, end = ops.q_bounds[0][block], ops.q_bounds[1][block]
    acc, row_max, row_sum = lax.fori_loop(first, end, body, init)
    nonempty = row_sum > 0
    safe = jnp.where(nonempty, row_sum, 1.0)
    out_ref[...] = (acc / safe[:, None]).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(nonempty, _shift(row_max) + jnp.log(safe), jnp.inf)


def _dq_kernel(ops: _Operands, d_out_ref, lse_ref, delta_ref, dq_ref, *grad_refs, cfg: _Config):
    """dq for one query block and head, the cos/sin gradients of its rows (with traced
    RoPE frequencies) and the partial gradients of the bias constants."""
    block, bh = pl.program_id(0), pl.program_id(1)
    head = lax.rem(bh, cfg.heads)
    q, q_raw = _side(ops, cfg, True, block * cfg.q_block, cfg.q_block)
    consts = _load_consts(cfg.bias, ops.consts)
    trainable = [n for n, c in enumerate(consts) if jnp.issubdtype(c.dtype, jnp.inexact)]
    d_out, lse, delta = d_out_ref[...], lse_ref[...], delta_ref[...]

    def body(j, carry):
        dq_parts, d_consts = carry
        k, _ = _side(ops, cfg, False, j * cfg.k_block, cfg.k_block)
        logits, allowed = _content(cfg, ops, q, k)
        bias_vjp = None
        if cfg.bias is not None:

            def bias_of(*values):
                full = list(consts)
                for n, value in zip(trainable, values, strict=True):
                    full[n] = value
                return _bias(cfg, full, q, k, head)

            bias, bias_vjp = jax.vjp(bias_of, *(consts[n] for n in trainable))
            logits = logits + bias
        weights = jnp.exp(_masked(logits, allowed) - lse[:, None])
        v = ops.v[pl.ds(j * cfg.k_block, cfg.k_block), :]
        d_logits = weights * (_dot(d_out, v, 1, 1) - delta[:, None])
        if bias_vjp is not None:
            d_consts = [
                a + b.astype(_F32) for a, b in zip(d_consts, bias_vjp(d_logits), strict=True)
            ]
        d_scores = (d_logits * cfg.scale).astype(k.parts[0].dtype)
        dq_parts = [
            acc + _dot(d_scores, part, 1, 0) for acc, part in zip(dq_parts, k.parts, strict=True)
        ]
        return dq_parts, d_consts

    init = (
        [jnp.zeros(part.shape, _F32) for part in q.parts],
        [jnp.zeros(consts[n].shape, _F32) for n in trainable],
    )
    first, end = ops.q_bounds[0][block], ops.q_bounds[1][block]
    dq_parts, d_consts = lax.fori_loop(first, end, body, init)
    table_refs = grad_refs[:2] if cfg.rope_grads else ()
    _store_features(dq_ref, dq_parts, q_raw, cfg.rotary, table_refs)
    for ref, grad in zip(grad_refs[len(table_refs) :], d_consts, strict=True):
        ref[...] = grad.reshape(ref.shape)


def _dkv_kernel(ops: _Operands, d_out_ref, lse_ref, delta_ref, dk_ref, dv_ref, *table_refs, cfg):
    """dk and dv of one key block from the queries of one query head (summed over the
    heads of a group afterwards), and the cos/sin gradients of its rows."""
    block, bh = pl.program_id(0), pl.program_id(1)
    head = lax.rem(bh, cfg.heads)
    k, k_raw = _side(ops, cfg, False, block * cfg.k_block, cfg.k_block)
    v = ops.v[pl.ds(block * cfg.k_block, cfg.k_block), :]
    consts = _load_consts(cfg.bias, ops.consts)

    def body(i, carry):
        dk_parts, dv = carry
        q, _ = _side(ops, cfg, True, i * cfg.q_block, cfg.q_block)
        logits, allowed = _content(cfg, ops, q, k)
        if cfg.bias is not None:
            logits = logits + _bias(cfg, consts, q, k, head)
        rows = pl.ds(i * cfg.q_block, cfg.q_block)
        d_out, lse, delta = d_out_ref[rows, :], lse_ref[rows], delta_ref[rows]
        weights = jnp.exp(_masked(logits, allowed) - lse[:, None])
        dv = dv + _dot(weights.astype(d_out.dtype), d_out, 0, 0)
        d_logits = weights * (_dot(d_out, v, 1, 1) - delta[:, None])
        d_scores = (d_logits * cfg.scale).astype(q.parts[0].dtype)
        dk_parts = [
            acc + _dot(d_scores, part, 0, 0) for acc, part in zip(dk_parts, q.parts, strict=True)
        ]
        return dk_parts, dv

    init = ([jnp.zeros(part.shape, _F32) for part in k.parts], jnp.zeros(v.shape, _F32))
    first, end = ops.k_bounds[0][block], ops.k_bounds[1][block]
    dk_parts, dv = lax.fori_loop(first, end, body, init)
    _store_features(dk_ref, dk_parts, k_raw, cfg.rotary, table_refs if cfg.rope_grads else ())
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------ pallas_call plumbing


def _operand_specs(cfg: _Config, ops: _Operands) -> _Operands:
    """BlockSpecs over the grid `(block, batch * head)`: whole sequences per (batch,
    head), sliced inside the kernels; constants per head where the bias allows it."""
    heads, group = cfg.heads, cfg.heads // cfg.kv_heads

    def sequence(x, per_query_head: bool):
        def index(_, bh):
            head = lax.rem(bh, heads)
            return (bh // heads, head if per_query_head else head // group, 0, 0)

        return pl.BlockSpec((None, None, *x.shape[2:]), index)

    def rows(x):
        return (
            None if x is None else pl.BlockSpec((None, x.shape[1]), lambda _, bh: (bh // heads, 0))
        )

    def table(x):
        batched = x.shape[0] > 1
        return pl.BlockSpec(
            (None, *x.shape[1:]), lambda _, bh: (bh // heads if batched else 0, 0, 0)
        )

    mask = None
    if ops.mask is not None:
        batched, per_head = ops.mask.shape[0] > 1, ops.mask.shape[1] > 1

        def mask_index(_, bh):
            return (bh // heads if batched else 0, lax.rem(bh, heads) if per_head else 0, 0, 0)

        mask = pl.BlockSpec((None, None, *ops.mask.shape[2:]), mask_index)
    consts = []
    if cfg.bias is not None:
        for const, axis in zip(ops.consts, cfg.bias.head_axes, strict=True):
            zeros = (0,) * (const.ndim - (axis is not None))
            if axis is None:
                consts.append(pl.BlockSpec(const.shape, lambda _, bh, z=zeros: z))
            else:
                consts.append(
                    pl.BlockSpec(
                        (None, *const.shape[1:]),
                        lambda _, bh, z=zeros: (lax.rem(bh, heads), *z),
                    )
                )
    rope = [None if r is None else (table(r[0]), table(r[1])) for r in (ops.q_rope, ops.k_rope)]
    return _Operands(
        sequence(ops.q, True), sequence(ops.k, False), sequence(ops.v, False),
        rows(ops.q_pos), rows(ops.k_pos), rows(ops.q_seg), rows(ops.k_seg), mask, *rope,
        (rows(ops.q_bounds[0]), rows(ops.q_bounds[1])),
        (rows(ops.k_bounds[0]), rows(ops.k_bounds[1])),
        tuple(consts),
    )  # fmt: skip


def _params(cfg: _Config):
    return {
        "compiler_params": plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        "interpret": cfg.interpret,
    }


def _per_block(shape_tail: tuple[int, ...], block: int, heads: int):
    """A BlockSpec for `[B, H, L, *tail]` arrays written block by block."""
    return pl.BlockSpec(
        (None, None, block, *shape_tail),
        lambda i, bh: (bh // heads, lax.rem(bh, heads), i, *(0,) * len(shape_tail)),
    )


def _forward(cfg: _Config, ops: _Operands):
    batch, heads, q_pad, _ = ops.q.shape
    value_dim = ops.v.shape[-1]
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        grid=(q_pad // cfg.q_block, batch * heads),
        in_specs=[_operand_specs(cfg, ops)],
        out_specs=[
            _per_block((value_dim,), cfg.q_block, heads),
            _per_block((), cfg.q_block, heads),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, heads, q_pad, value_dim), ops.q.dtype),
            jax.ShapeDtypeStruct((batch, heads, q_pad), _F32),
        ],
        name="posenc_attention_forward",
        **_params(cfg),
    )(ops)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_attention(cfg: _Config, ops: _Operands) -> jax.Array:
    """Fused attention over padded operands; returns `[B, H, Lq_padded, Dv]` in q's dtype.

    A module-level custom VJP over explicit arrays (`ops`) and a static, hashable
    `cfg`, so it composes with jit at any depth, checkpoint, scan and vmap.
    """
    return _forward(cfg, ops)[0]


def _fused_attention_fwd(cfg: _Config, ops: _Operands):
    out, lse = _forward(cfg, ops)
    return out, (ops, out, lse)


def _fused_attention_bwd(cfg: _Config, residuals, d_out):
    ops, out, lse = residuals
    batch, heads, q_pad, dim = ops.q.shape
    k_pad, value_dim = ops.k.shape[2], ops.v.shape[-1]
    num_q, num_k = q_pad // cfg.q_block, k_pad // cfg.k_block
    d_out = d_out.astype(ops.q.dtype)
    # sum_j p_ij dp_ij = d_out_i . out_i (FlashAttention-2's D).
    delta = jnp.sum(d_out.astype(_F32) * out.astype(_F32), axis=-1)
    specs = _operand_specs(cfg, ops)
    whole = [
        pl.BlockSpec(
            (None, None, q_pad, value_dim), lambda _, bh: (bh // heads, lax.rem(bh, heads), 0, 0)
        ),
        pl.BlockSpec((None, None, q_pad), lambda _, bh: (bh // heads, lax.rem(bh, heads), 0)),
        pl.BlockSpec((None, None, q_pad), lambda _, bh: (bh // heads, lax.rem(bh, heads), 0)),
    ]
    trainable = []
    if cfg.bias is not None:
        trainable = [n for n, c in enumerate(ops.consts) if jnp.issubdtype(c.dtype, jnp.inexact)]
    programs = num_q * batch * heads
    dq_shapes = [jax.ShapeDtypeStruct(ops.q.shape, ops.q.dtype)]
    dq_specs = [_per_block((dim,), cfg.q_block, heads)]
    if cfg.rope_grads:
        dq_shapes += [jax.ShapeDtypeStruct((batch, heads, q_pad, cfg.rotary), _F32)] * 2
        dq_specs += [_per_block((cfg.rotary,), cfg.q_block, heads)] * 2
    for n in trainable:
        shape = _kernel_shape(cfg.bias, n)
        zeros = (0,) * len(shape)
        dq_shapes.append(jax.ShapeDtypeStruct((programs, *shape), _F32))
        dq_specs.append(
            pl.BlockSpec((None, *shape), lambda i, bh, z=zeros: (i * (batch * heads) + bh, *z))
        )
    dq, *dq_extra = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(num_q, batch * heads),
        in_specs=[specs, _per_block((value_dim,), cfg.q_block, heads),
                  _per_block((), cfg.q_block, heads), _per_block((), cfg.q_block, heads)],
        out_specs=dq_specs,
        out_shape=dq_shapes,
        name="posenc_attention_dq",
        **_params(cfg),
    )(ops, d_out, lse, delta)  # fmt: skip

    group = heads // cfg.kv_heads
    grad_dtype = ops.k.dtype if group == 1 else _F32
    dkv_shapes = [
        jax.ShapeDtypeStruct((batch, heads, k_pad, dim), grad_dtype),
        jax.ShapeDtypeStruct((batch, heads, k_pad, value_dim), grad_dtype),
    ]
    dkv_specs = [
        _per_block((dim,), cfg.k_block, heads),
        _per_block((value_dim,), cfg.k_block, heads),
    ]
    if cfg.rope_grads:
        dkv_shapes += [jax.ShapeDtypeStruct((batch, heads, k_pad, cfg.rotary), _F32)] * 2
        dkv_specs += [_per_block((cfg.rotary,), cfg.k_block, heads)] * 2
    dk, dv, *k_tables = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(num_k, batch * heads),
        in_specs=[specs, *whole],
        out_specs=dkv_specs,
        out_shape=dkv_shapes,
        name="posenc_attention_dkv",
        **_params(cfg),
    )(ops, d_out, lse, delta)

    def per_kv_head(x):
        if group == 1:
            return x
        return x.reshape(batch, cfg.kv_heads, group, *x.shape[2:]).sum(axis=2)

    dk, dv = per_kv_head(dk), per_kv_head(dv)
    q_tables, d_consts = dq_extra[: 2 * cfg.rope_grads], dq_extra[2 * cfg.rope_grads :]

    def table_grads(grads, rope):
        if not grads:
            return None
        return tuple(
            jnp.sum(g, axis=(0, 1) if r.shape[0] == 1 else 1, keepdims=False).reshape(r.shape)
            for g, r in zip(grads, rope, strict=True)
        )

    # Per-program partial sums [programs, *kernel shape] -> the arranged constants'
    # shapes: per-head ones [H, ...] (summed over blocks and batch), shared ones summed
    # over heads too. Autodiff maps them back through `_arrange_consts`.
    const_grads = [None] * len(ops.consts)
    for n, grad in zip(trainable, d_consts, strict=True):
        per_head = grad.reshape(num_q, batch, heads, *grad.shape[1:]).sum(axis=(0, 1))
        if cfg.bias.head_axes[n] is None:
            per_head = per_head.sum(axis=0)
        const_grads[n] = _cotangent(per_head.reshape(ops.consts[n].shape), ops.consts[n])
    grads = _Operands(
        _cotangent(dq, ops.q), _cotangent(dk, ops.k), _cotangent(dv, ops.v),
        None, None, None, None, None,
        table_grads(q_tables, ops.q_rope), table_grads(k_tables, ops.k_rope),
        (None, None), (None, None), tuple(const_grads),
    )  # fmt: skip
    return (grads,)


_fused_attention.defvjp(_fused_attention_fwd, _fused_attention_bwd)


# ------------------------------------------------------------------ entry point


def _block_ranges(
    causal: bool, q_pos, k_pos, q_seg, k_seg, q_block: int, k_block: int
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """Per batch row, the range `[first, end)` of key blocks each query block visits and
    of query blocks each key block visits.

    A pair of blocks is skipped when it provably has no allowed entry (the rule of
    `_blockwise._is_empty`, per batch row): causal and the largest query position below
    the smallest key position, or disjoint ranges of segment ids. Positions and ids are
    padded with their last value, so the bounds are those of real tokens. O((L/block)^2)
    integers, no `L x L` array.
    """

    def bounds(x, block):
        x = x.reshape(x.shape[0], -1, block)
        return x.min(axis=2), x.max(axis=2)

    (_, q_max), (k_min, _) = bounds(q_pos, q_block), bounds(k_pos, k_block)
    visit = jnp.ones((q_pos.shape[0], q_max.shape[1], k_min.shape[1]), bool)
    if causal:
        visit &= q_max[:, :, None] >= k_min[:, None, :]
    if q_seg is not None:
        (q_lo, q_hi), (k_lo, k_hi) = bounds(q_seg, q_block), bounds(k_seg, k_block)
        visit &= (q_hi[:, :, None] >= k_lo[:, None, :]) & (k_hi[:, None, :] >= q_lo[:, :, None])

    def ranges(visit, axis):
        count = visit.shape[axis]
        any_visit = visit.any(axis=axis)
        first = jnp.argmax(visit, axis=axis)
        end = count - jnp.argmax(jnp.flip(visit, axis=axis), axis=axis)
        return (
            jnp.where(any_visit, first, 0).astype(jnp.int32),
            jnp.where(any_visit, end, 0).astype(jnp.int32),
        )

    return ranges(visit, 2), ranges(visit, 1)


def _power_of_two(value: int) -> bool:
    return value >= 16 and value & (value - 1) == 0


def _check_triton_shapes(q_block, k_block, dim, value_dim, rotary) -> None:
    """The Triton lowering needs power-of-two tiles of at least 16 in every product."""
    sizes = {"q_block": q_block, "k_block": k_block, "head_dim": dim, "value head_dim": value_dim}
    if rotary:
        sizes["rotary_dim / 2"] = rotary
        if dim - 2 * rotary:
            sizes["head_dim - rotary_dim"] = dim - 2 * rotary
    bad = {name: size for name, size in sizes.items() if not _power_of_two(size)}
    if bad:
        raise PallasUnsupported(
            f"implementation='pallas' on GPU needs powers of two >= 16 for {sorted(bad)}, got "
            f"{bad}; pick another block_size, or use implementation='blockwise'"
        )


def _next_power_of_two(value: int) -> int:
    return max(16, 1 << (value - 1).bit_length())


def builds_on_gpu(q, k, v, q_pos, k_pos, q_seg, k_seg, mask, **options) -> bool:
    """Whether `pallas_attention(q, ..., **options)` and its gradient can be built for a
    GPU (traced abstractly, kernels included; nothing runs). `implementation="auto"`
    asks before choosing the fused kernels."""

    def loss(q, k, v):
        out = pallas_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, mask, **options)
        return out.astype(jnp.float32).sum()

    try:
        jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    except PallasUnsupported:
        return False
    return True


def pallas_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    q_seg: jax.Array | None,
    k_seg: jax.Array | None,
    mask: jax.Array | None,
    *,
    scale: float,
    causal: bool,
    bias_fn: Callable | None,
    block_size: tuple[int, int] | None,
    rope_frequencies=None,
) -> jax.Array:
    """Fused attention on heads-first arrays (`q [B, H, Lq, D]`, `k, v [B, Hkv, Lk, .]`,
    positions and segment ids int32 `[B or 1, L]`, mask bool `[B or 1, H or 1, Lq or 1,
    Lk or 1]`); returns float32-accumulated `[B, H, Lq, Dv]` in q's dtype."""
    batch, heads, q_len, dim = q.shape
    kv_heads, k_len, value_dim = k.shape[1], k.shape[2], v.shape[-1]
    interpret = _interpret()
    sizes = default_block_sizes(dim)
    if block_size is not None:
        sizes = dataclasses.replace(sizes, q_block=block_size[0], k_block=block_size[1])
    q_block = min(sizes.q_block, _next_power_of_two(q_len))
    k_block = min(sizes.k_block, _next_power_of_two(k_len))
    rotary = 0 if rope_frequencies is None else check_rope_frequencies(rope_frequencies, dim)
    if not interpret:
        _check_triton_shapes(q_block, k_block, dim, value_dim, rotary)
    q_pad, k_pad = -(-q_len // q_block) * q_block, -(-k_len // k_block) * k_block

    q_pos, q_seg = (_pad_axis(x, 1, q_pad, "edge") for x in (q_pos, q_seg))
    k_pos, k_seg = (_pad_axis(x, 1, k_pad, "edge") for x in (k_pos, k_seg))
    q_rope = k_rope = None
    if rotary:
        q_rope, k_rope = rope_tables(q_pos, rope_frequencies), rope_tables(k_pos, rope_frequencies)
    q_pos, k_pos, q_seg, k_seg = (
        None if x is None else jnp.broadcast_to(x, (batch, x.shape[1])).astype(jnp.int32)
        for x in (q_pos, k_pos, q_seg, k_seg)
    )
    q = _pad_axis(q, 2, q_pad, "edge")
    k, v = (_pad_axis(x, 2, k_pad, "edge") for x in (k, v))
    if mask is not None:
        mask = _pad_axis(_pad_axis(mask, 2, q_pad, "false"), 3, k_pad, "false").astype(jnp.int8)
    bias, consts = None, ()
    if bias_fn is not None:
        bias, consts = trace_bias(bias_fn, heads, q_block, k_block)
        consts = _arrange_consts(bias, consts)
    q_bounds, k_bounds = _block_ranges(causal, q_pos, k_pos, q_seg, k_seg, q_block, k_block)
    cfg = _Config(
        scale=scale,
        causal=causal,
        q_block=q_block,
        k_block=k_block,
        q_len=q_len,
        k_len=k_len,
        heads=heads,
        kv_heads=kv_heads,
        bias=bias,
        rotary=rotary,
        rope_grads=rotary > 0 and isinstance(rope_frequencies, jax.core.Tracer),
        interpret=interpret,
        num_warps=sizes.num_warps,
        num_stages=sizes.num_stages,
    )
    ops = _Operands(
        q, k, v, q_pos, k_pos, q_seg, k_seg, mask, q_rope, k_rope, q_bounds, k_bounds, consts
    )
    return _fused_attention(cfg, ops)[:, :, :q_len]
