"""The protocols through which positional terms enter attention, and the one place that
combines an encoding's parts.

Every additive positional term is a function of positions, so attention can evaluate
it one block at a time and never hold a `q_len x k_len` table it did not ask for.

* `BiasFn`: `bias_fn(q_positions, k_positions) -> [B or 1, H, bq, bk]` float32 logit
  bias (ALiBi, T5, KERPLE, FIRE, ...).
* `QkTransform`: `transform(q, k, q_positions, k_positions) -> (q, k)` on
  `[B, S, H, D]` activations (RoPE, xPos).
* `RelativeTerms`: terms that also read the content of the block in hand (Shaw,
  Transformer-XL).

An encoding's parts are modules that play one *role* each (`ROLES`): a qk transform, a
logit bias (`module.bias_fn()`) or relative terms (`module.terms()`). `terms_of` turns
one module into `PositionalTerms`; `combine` merges several, as `optax.chain` merges
transforms (qk transforms compose in order, biases and relative terms add up). The
model and `make_attention_fn` both go through these two functions, and attention reads
only the combined `PositionalTerms`: a new role touches this file and the attention
core only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import jax


class BiasFn(Protocol):
    """`bias_fn(q_positions [B or 1, bq], k_positions [B or 1, bk]) -> [B or 1, H, bq, bk]`.

    Positions are int32. The result is added to the logits (float32); attention calls it
    once per block, so it must be a pure function of the positions (and of arrays it
    closes over, such as a learned table, whose gradients attention returns).
    """

    def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array: ...


class QueryBiasFn(Protocol):
    """`query_bias_fn(q [B, bq, H, D], q_positions, k_positions) -> [B, H, bq, bk]`.

    `q` is the query already multiplied by the softmax scale; the result is added to the
    logits (Shaw et al. key term, Transformer-XL position term).
    """

    def __call__(
        self, q: jax.Array, q_positions: jax.Array, k_positions: jax.Array
    ) -> jax.Array: ...


class ValueFn(Protocol):
    """`value_fn(weights [B, H, bq, bk], q_positions, k_positions) -> [B, bq, H, Dv]`.

    Added to the attention output. `weights` are the (possibly unnormalised) softmax
    weights and `value_fn` must be linear in them and act on each query row separately,
    so the blockwise online softmax can rescale its partial sums (Shaw et al. value term).
    """

    def __call__(
        self, weights: jax.Array, q_positions: jax.Array, k_positions: jax.Array
    ) -> jax.Array: ...


class QkTransform(Protocol):
    """`transform(q [B, Sq, H, D], k [B, Sk, Hkv, D], q_positions, k_positions) -> (q, k)`."""

    def __call__(
        self, q: jax.Array, k: jax.Array, q_positions: jax.Array, k_positions: jax.Array
    ) -> tuple[jax.Array, jax.Array]: ...


class RelativeTerms(NamedTuple):
    """Content-dependent relative terms; any field may be None.

    Attributes:
      query_bias_fn: a `QueryBiasFn`.
      value_fn: a `ValueFn`.
      content_bias: `[H, D]` vector added to every query for the content logit `q . k`
        only (Transformer-XL's global content bias u, which makes the term `u . k_j`); it
        is not scaled by the softmax scale beforehand, exactly like q.
    """

    query_bias_fn: QueryBiasFn | None = None
    value_fn: ValueFn | None = None
    content_bias: jax.Array | None = None


class PositionalTerms(NamedTuple):
    """Everything an encoding contributes to one attention call; any field may be None.

    Attributes:
      qk_transform: applied to the projected queries and keys before attention.
      bias_fn: the logit bias, a `BiasFn`.
      relative_terms: content-dependent `RelativeTerms`.
    """

    qk_transform: QkTransform | None = None
    bias_fn: BiasFn | None = None
    relative_terms: RelativeTerms | None = None

    def transform(self, q, k, q_positions, k_positions) -> tuple[jax.Array, jax.Array]:
        """`(q, k)` after the qk transform (unchanged without one)."""
        if self.qk_transform is None:
            return q, k
        return self.qk_transform(q, k, q_positions, k_positions)


def sum_of(fns: Sequence[Callable | None]) -> Callable | None:
    """The pointwise sum of the given callables (None when there are none)."""
    fns = [fn for fn in fns if fn is not None]
    if len(fns) <= 1:
        return fns[0] if fns else None
    return lambda *args: sum(fn(*args) for fn in fns)


def _compose(transforms: Sequence[QkTransform | None]) -> QkTransform | None:
    transforms = [t for t in transforms if t is not None]
    if len(transforms) <= 1:
        return transforms[0] if transforms else None

    def composed(q, k, q_positions, k_positions):
        for transform in transforms:
            q, k = transform(q, k, q_positions, k_positions)
        return q, k

    return composed


def sum_relative_terms(terms: Sequence[RelativeTerms | None]) -> RelativeTerms | None:
    """One `RelativeTerms` adding up several: every field is linear in what it adds."""
    terms = [t for t in terms if t is not None]
    if len(terms) <= 1:
        return terms[0] if terms else None
    biases = [t.content_bias for t in terms if t.content_bias is not None]
    return RelativeTerms(
        query_bias_fn=sum_of([t.query_bias_fn for t in terms]),
        value_fn=sum_of([t.value_fn for t in terms]),
        content_bias=sum(biases) if biases else None,
    )


def combine(parts: Sequence[PositionalTerms]) -> PositionalTerms:
    """The terms of several parts together: qk transforms compose in the given order,
    logit biases and relative terms add up."""
    return PositionalTerms(
        qk_transform=_compose([part.qk_transform for part in parts]),
        bias_fn=sum_of([part.bias_fn for part in parts]),
        relative_terms=sum_relative_terms([part.relative_terms for part in parts]),
    )


# How a module playing each role contributes; the registry's `Encoding` has one factory
# field per role (plus `input_embedding`, which is not an attention term).
ROLES: dict[str, Callable[[Any], PositionalTerms]] = {
    "qk_transform": lambda module: PositionalTerms(qk_transform=module),
    "logit_bias": lambda module: PositionalTerms(bias_fn=module.bias_fn()),
    "relative_terms": lambda module: PositionalTerms(relative_terms=module.terms()),
}


def terms_of(role: str, module: Any) -> PositionalTerms:
    """What `module`, playing `role`, contributes to attention."""
    if role not in ROLES:
        raise ValueError(f"unknown positional role {role!r}; roles are {sorted(ROLES)}")
    return ROLES[role](module)
