"""The callables through which positional terms enter attention.

Every additive positional term is a function of positions, so attention can evaluate
it one block at a time and never hold a `q_len x k_len` table it did not ask for.

* `BiasFn`: `bias_fn(q_positions, k_positions) -> [B or 1, H, bq, bk]` float32 logit
  bias, with `q_positions` `[B or 1, bq]` and `k_positions` `[B or 1, bk]` integers.
* `RelativeTerms`: terms that also read the content of the block in hand.
  `query_bias_fn(q, q_positions, k_positions) -> [B, H, bq, bk]` is added to the logits,
  where `q` `[B, bq, H, D]` is the query already multiplied by the softmax scale
  (Shaw et al. key term, Transformer-XL position term). `value_fn(weights, q_positions,
  k_positions) -> [B, bq, H, Dv]` is added to the attention output; `weights`
  `[B, H, bq, bk]` are the (possibly unnormalised) softmax weights and `value_fn` must be
  linear in them, so the blockwise online softmax can rescale its partial sums
  (Shaw et al. value term). `content_bias` `[H, D]` is a vector added to every query
  for the content logit `q . k` only (Transformer-XL's global content bias u, which
  makes the term u . k_j); it is not scaled by the softmax scale beforehand, exactly
  like q.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax

BiasFn = Callable[[jax.Array, jax.Array], jax.Array]
QueryBiasFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
ValueFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class RelativeTerms(NamedTuple):
    """Content-dependent relative terms; any field may be None."""

    query_bias_fn: QueryBiasFn | None = None
    value_fn: ValueFn | None = None
    content_bias: jax.Array | None = None


def sum_of(fns: Sequence[Callable | None]) -> Callable | None:
    """The pointwise sum of the given callables (None when there are none)."""
    fns = [fn for fn in fns if fn is not None]
    if len(fns) <= 1:
        return fns[0] if fns else None
    return lambda *args: sum(fn(*args) for fn in fns)


def sum_relative_terms(terms: Sequence[RelativeTerms]) -> RelativeTerms | None:
    """One `RelativeTerms` adding up several: every field is linear in what it adds."""
    if len(terms) <= 1:
        return terms[0] if terms else None
    biases = [t.content_bias for t in terms if t.content_bias is not None]
    return RelativeTerms(
        query_bias_fn=sum_of([t.query_bias_fn for t in terms]),
        value_fn=sum_of([t.value_fn for t in terms]),
        content_bias=sum(biases) if biases else None,
    )
