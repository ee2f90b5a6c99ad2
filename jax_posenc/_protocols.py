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
* `TokenBias`: a logit bias computed from per-token values of the query and key blocks
  (`[B, H, L]` arrays such as the cumulative log forget gates of FoX), which attention
  slices per block and differentiates like q and k, so the values may depend on content
  and context.
* `AlternateQk`: a second positioning of q and k whose content logits replace the usual
  ones on the pairs a position rule selects (SelfExtend: grouped positions for distant
  keys). A qk-transform module offers it through an `alternate()` method.
* `ContextualBias`: a logit term that reads whole rows of content logits and the mask
  (CoPE: positions counted by gates `sigmoid(q_i . k_t)` over the keys between key and
  query). It needs every key of a row at once, so attention evaluates it on the xla
  path only.

An encoding's parts are modules that play one *role* each (`ROLES`): a qk transform, a
logit bias (`module.bias_fn()`), relative terms (`module.terms()`), a token bias
(`module.token_bias(context)`, reading the layer's tokens from a `TokenContext`) or a
contextual bias (`module.contextual_bias()`).
`terms_of` turns one module into `PositionalTerms`; `combine` merges several, as
`optax.chain` merges transforms (qk transforms compose in order, biases, relative terms
and token biases add up; at most one part gives a contextual bias). The model and
`make_attention_fn` both go through these two functions, and attention reads only the
combined `PositionalTerms`: a new role touches this file and the attention core only.
"""

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import jax

_PER_ENTRY = contextvars.ContextVar("jax_posenc_per_entry", default=False)


@contextlib.contextmanager
def per_entry_evaluation() -> Iterator[None]:
    """While active, positional functions being traced compute every entry of a tile the
    same way, without branching on the values of the positions.

    A `BiasFn` may take shortcuts that depend on the block it is given (the distance
    biases of `jax_posenc.bias` check at run time whether a block's positions are
    contiguous and then lay out `bq + bk - 1` values along the diagonals, a `lax.cond`
    with reshapes and slices). A fused kernel traces the function once per tile and
    needs plain elementwise arithmetic it can lower (Pallas's Triton backend has no
    `slice`); it traces inside this context, and the shortcuts step aside. Read at trace
    time, so jitted functions are unaffected.
    """
    token = _PER_ENTRY.set(True)
    try:
        yield
    finally:
        _PER_ENTRY.reset(token)


def per_entry_only() -> bool:
    """Whether `per_entry_evaluation` is active (see there)."""
    return _PER_ENTRY.get()


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


class TokenBiasFn(Protocol):
    """`fn(query_values, key_values) -> [B or 1, H or 1, bq, bk]` float32 logit bias.

    The arguments are the blocks of `TokenBias.query_values` and `key_values` (same
    pytree structure, each leaf `[B or 1, H or 1, bq or bk, ...]`). Attention calls it
    once per block pair and differentiates it, so its gradient with respect to the
    values is whatever `jax.vjp` of `fn` gives: for `q[..., :, None] - k[..., None, :]`
    the row and column sums of the block's logit gradients.
    """

    def __call__(self, query_values: Any, key_values: Any) -> jax.Array: ...


class TokenBias(NamedTuple):
    """A logit bias that reads per-token values of the queries and keys.

    `bias[b, h, i, j] = fn(query_values[..., i, ...], key_values[..., j, ...])`, evaluated
    one block at a time. The values are ordinary (differentiable) arrays: attention
    returns their gradients without forming a `Lq x Lk` array in the blockwise path, so
    they may be computed from the content (FoX's cumulative log forget gates).

    Attributes:
      query_values: a pytree of float arrays `[B or 1, H or 1, Lq, ...]`, one entry per
        query along axis 2.
      key_values: a pytree of float arrays `[B or 1, H or 1, Lk, ...]`.
      fn: a `TokenBiasFn`; it may close over arrays (their gradients are returned too).
    """

    query_values: Any
    key_values: Any
    fn: TokenBiasFn


class TokenContext(NamedTuple):
    """What a module in the `token_bias` role reads: the tokens and where they sit.

    Attributes:
      inputs: `[B, Lk, F]` features of each key token: the attention layer's input `x`
        `[B, S, d_model]` in `jax_posenc.Transformer`; the projected keys flattened over
        heads `[B, Lk, Hkv * D]` in `make_attention_fn`, which never sees `x`.
      q_positions: int32 `[B or 1, Lq]`.
      k_positions: int32 `[B or 1, Lk]`.
      segment_ids: int32 `[B or 1, Lk]` document ids of the keys (packed sequences), or
        None. When `Lq == Lk` the queries are the key tokens (self-attention).
    """

    inputs: jax.Array
    q_positions: jax.Array
    k_positions: jax.Array
    segment_ids: jax.Array | None = None


class PairSelectFn(Protocol):
    """`select(q_positions [B or 1, bq], k_positions [B or 1, bk]) -> bool [B or 1, 1, bq, bk]`."""

    def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array: ...


class AlternateQk(NamedTuple):
    """A second positioning of the queries and keys, used where `select` holds.

    On the pairs `select(q_pos, k_pos)` picks, the content logit `scale * q . k` becomes
    `scale * q2 . k2` with `(q2, k2) = transform(q, k, q_positions, k_positions)` of the
    same projections (SelfExtend: RoPE at grouped positions beyond a neighbour window).

    Attributes:
      transform: a `QkTransform` giving the alternate `(q2, k2)`.
      select: a `PairSelectFn`.
    """

    transform: QkTransform
    select: PairSelectFn


class AlternateLogits(NamedTuple):
    """What attention reads of an `AlternateQk`: the transformed arrays and the rule.

    Attributes:
      q: `[B, Lq, H, D]` alternate queries.
      k: `[B, Lk, Hkv, D]` alternate keys.
      select: a `PairSelectFn`; True where `scale * q . k` of these arrays is used.
    """

    q: jax.Array
    k: jax.Array
    select: PairSelectFn


class ContextualBiasFn(Protocol):
    """`fn(q, content_logits, allowed, params) -> [B or 1, H or 1, Lq, Lk]` float32.

    Arguments: `q` `[B, Lq, H, D]`, the queries attention uses (after any qk transform)
    already multiplied by the softmax scale; `content_logits` float32 `[B, H, Lq, Lk]`,
    the content logits `scale * q . k` of those queries and keys (with an
    `AlternateLogits`, after its merge); `allowed` a bool array broadcastable to
    `[B, H, Lq, Lk]`, True where the query may attend to the key (mask, causality,
    segments), or None where every pair is allowed; `params` the `ContextualBias.params`.
    Called once per attention call with every key of each row; its gradients (to q, k
    through the content logits, and to `params`) are those of ordinary autodiff.
    """

    def __call__(
        self, q: jax.Array, content_logits: jax.Array, allowed: jax.Array | None, params: Any
    ) -> jax.Array: ...


class ContextualBias(NamedTuple):
    """A logit term computed from whole rows of content logits (CoPE).

    `bias = fn(scale * q, content_logits, allowed, params)`, added to the logits. Unlike
    the other terms it is not evaluated one block at a time: a contextual position is a
    sum over every allowed key from the key to the query, so attention takes it on the
    xla path only (memory `O(Lq * Lk)`) and refuses blockwise implementations.

    Attributes:
      params: a pytree of arrays `fn` reads (CoPE's position embeddings); their
        gradients are returned like those of q and k.
      fn: a `ContextualBiasFn`.
    """

    params: Any
    fn: ContextualBiasFn


class PositionalTerms(NamedTuple):
    """Everything an encoding contributes to one attention call; any field may be None.

    Attributes:
      qk_transform: applied to the projected queries and keys before attention.
      bias_fn: the logit bias, a `BiasFn`.
      relative_terms: content-dependent `RelativeTerms`.
      token_bias: a `TokenBias` over per-token values of queries and keys.
      alternate_qk: an `AlternateQk` applied to the same projections as `qk_transform`.
      contextual_bias: a `ContextualBias` reading whole rows of content logits (CoPE).
    """

    qk_transform: QkTransform | None = None
    bias_fn: BiasFn | None = None
    relative_terms: RelativeTerms | None = None
    token_bias: TokenBias | None = None
    alternate_qk: AlternateQk | None = None
    contextual_bias: ContextualBias | None = None

    def transform(self, q, k, q_positions, k_positions) -> tuple[jax.Array, jax.Array]:
        """`(q, k)` after the qk transform (unchanged without one)."""
        if self.qk_transform is None:
            return q, k
        return self.qk_transform(q, k, q_positions, k_positions)

    def alternate(self, q, k, q_positions, k_positions) -> AlternateLogits | None:
        """The `AlternateLogits` of the projections `q`, `k` (None without one); call it
        with the same arrays as `transform`."""
        if self.alternate_qk is None:
            return None
        q, k = self.alternate_qk.transform(q, k, q_positions, k_positions)
        return AlternateLogits(q, k, self.alternate_qk.select)

    def prepare(self, q, k, q_positions, k_positions) -> tuple[jax.Array, jax.Array, dict]:
        """`(q, k, attention_arguments)`: the transformed queries and keys, and every
        other term as the keyword arguments of `dot_product_attention` (`bias_fn`,
        `relative_terms`, `token_bias`, `alternate`, `contextual_bias`). The model and
        `make_attention_fn` both call attention this way, so a new term touches this
        class and the attention core only."""
        alternate = self.alternate(q, k, q_positions, k_positions)
        q, k = self.transform(q, k, q_positions, k_positions)
        arguments = {
            "bias_fn": self.bias_fn,
            "relative_terms": self.relative_terms,
            "token_bias": self.token_bias,
            "alternate": alternate,
            "contextual_bias": self.contextual_bias,
        }
        return q, k, arguments


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


def sum_token_biases(biases: Sequence[TokenBias | None]) -> TokenBias | None:
    """One `TokenBias` adding up several: their values side by side in a tuple."""
    biases = [b for b in biases if b is not None]
    if len(biases) <= 1:
        return biases[0] if biases else None
    fns = tuple(b.fn for b in biases)

    def fn(query_values, key_values):
        return sum(f(qv, kv) for f, qv, kv in zip(fns, query_values, key_values, strict=True))

    return TokenBias(tuple(b.query_values for b in biases), tuple(b.key_values for b in biases), fn)


def _alternate(parts: Sequence[PositionalTerms]) -> AlternateQk | None:
    """The one part's `AlternateQk`, its transform composed in that part's place with
    the qk transforms of the others (which then act on both positionings)."""
    owners = [part for part in parts if part.alternate_qk is not None]
    if not owners:
        return None
    if len(owners) > 1:
        raise ValueError("at most one part may contribute an alternate qk positioning")
    transforms = [
        part.qk_transform if part.alternate_qk is None else part.alternate_qk.transform
        for part in parts
    ]
    return AlternateQk(_compose(transforms), owners[0].alternate_qk.select)


def _contextual_bias(parts: Sequence[PositionalTerms]) -> ContextualBias | None:
    biases = [part.contextual_bias for part in parts if part.contextual_bias is not None]
    if len(biases) > 1:
        raise ValueError("at most one part may contribute a contextual bias")
    return biases[0] if biases else None


def combine(parts: Sequence[PositionalTerms]) -> PositionalTerms:
    """The terms of several parts together: qk transforms compose in the given order,
    logit biases, relative terms and token biases add up; an alternate positioning
    (at most one) composes with the other parts' qk transforms in the same order; a
    contextual bias (at most one) is kept as it is."""
    return PositionalTerms(
        qk_transform=_compose([part.qk_transform for part in parts]),
        bias_fn=sum_of([part.bias_fn for part in parts]),
        relative_terms=sum_relative_terms([part.relative_terms for part in parts]),
        token_bias=sum_token_biases([part.token_bias for part in parts]),
        alternate_qk=_alternate(parts),
        contextual_bias=_contextual_bias(parts),
    )


def _token_bias(module: Any, context: TokenContext | None) -> PositionalTerms:
    if not isinstance(context, TokenContext):
        raise ValueError(
            f"{type(module).__name__} plays the 'token_bias' role and reads the layer's "
            f"tokens: terms_of needs a TokenContext, got {context!r}"
        )
    return PositionalTerms(token_bias=module.token_bias(context))


def _qk_transform(module: Any, context: TokenContext | None) -> PositionalTerms:
    alternate = getattr(module, "alternate", None)
    alternate_qk = None if alternate is None else alternate()
    return PositionalTerms(qk_transform=module, alternate_qk=alternate_qk)


# How a module playing each role contributes, given the layer's `TokenContext` (read by
# the token bias only); the registry's `Encoding` has one factory field per role (plus
# `input_embedding`, which is not an attention term). A qk transform with an
# `alternate()` method (SelfExtend) also contributes that `AlternateQk`.
ROLES: dict[str, Callable[[Any, TokenContext | None], PositionalTerms]] = {
    "qk_transform": _qk_transform,
    "logit_bias": lambda module, context: PositionalTerms(bias_fn=module.bias_fn()),
    "relative_terms": lambda module, context: PositionalTerms(relative_terms=module.terms()),
    "token_bias": _token_bias,
    "contextual_bias": lambda module, context: PositionalTerms(
        contextual_bias=module.contextual_bias()
    ),
}


def terms_of(role: str, module: Any, context: TokenContext | None = None) -> PositionalTerms:
    """What `module`, playing `role`, contributes to attention; `context` holds the
    tokens a `token_bias` module reads (the other roles ignore it)."""
    if role not in ROLES:
        raise ValueError(f"unknown positional role {role!r}; roles are {sorted(ROLES)}")
    return ROLES[role](module, context)
