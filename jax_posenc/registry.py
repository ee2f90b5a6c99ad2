"""Encodings by name, each declaring what it contributes to a transformer.

A model reads only this registry: it never special-cases an encoding. An `Encoding`
holds up to four factories, one per place a positional term can enter attention:

* `input_embedding(spec) -> linen Module`, called as `module(positions) -> [B, S, d_model]`
  and added to the token embeddings (sinusoidal, learned).
* `qk_transform(spec) -> linen Module`, called as
  `module(q, k, q_positions, k_positions) -> (q, k)` on `[B, S, H, D]` arrays (RoPE, xPos).
* `logit_bias(spec) -> linen Module` with a method `bias_fn()` that returns the pure
  callable `bias_fn(q_positions, k_positions) -> [B or 1, H, bq, bk]` (ALiBi, T5, KERPLE,
  FIRE, dynamic position bias). Calling the module itself materializes the full bias.
* `relative_terms(spec) -> linen Module` for terms that depend on content as well as
  positions (Shaw et al., Transformer-XL). Its `terms()` method returns a
  `jax_posenc.RelativeTerms` (`query_bias_fn`, `value_fn`).

Factories receive one `EncodingSpec` and are called once per attention layer (or once
per model for the input embedding). Combinations are written with "+", e.g.
"sinusoidal+alibi": the parts are resolved in order and their contributions stacked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from jax_posenc import _checks, absolute


@dataclasses.dataclass(frozen=True)
class EncodingSpec:
    """Everything a factory may need to build its module for one model.

    Attributes:
      d_model: width of the residual stream (for input embeddings).
      num_heads: number of query heads.
      head_dim: features per head.
      max_positions: largest number of positions the model will see (learned tables).
      causal: whether attention is causal (xPos refuses bidirectional use).
      options: encoding-specific settings keyed by encoding name, e.g.
        {"rope": {"base": 500000.0, "scaling": LinearScaling(4.0)}}; each factory reads
        its own entry through `take_options` and unknown keys raise.
    """

    d_model: int
    num_heads: int
    head_dim: int
    max_positions: int
    causal: bool = True
    options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("d_model", "num_heads", "head_dim", "max_positions"):
            _checks.check_positive_int(name, getattr(self, name))

    def take_options(self, encoding: str, allowed: Mapping[str, Any]) -> dict[str, Any]:
        """Returns `allowed` (the defaults) updated by `options[encoding]`; unknown keys raise."""
        given = self.options.get(encoding, {})
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            raise ValueError(
                f"options {unknown} are not understood by encoding {encoding!r}; "
                f"it accepts {sorted(allowed)}"
            )
        return {**allowed, **given}


Factory = Callable[[EncodingSpec], nn.Module]


@dataclasses.dataclass(frozen=True)
class Encoding:
    """A named positional encoding and the parts of attention it contributes to."""

    name: str
    description: str
    input_embedding: Factory | None = None
    qk_transform: Factory | None = None
    logit_bias: Factory | None = None
    relative_terms: Factory | None = None
    causal_only: bool = False

    @property
    def contributes(self) -> tuple[str, ...]:
        parts = ("input_embedding", "qk_transform", "logit_bias", "relative_terms")
        return tuple(part for part in parts if getattr(self, part) is not None)


_REGISTRY: dict[str, Encoding] = {}


def register(encoding: Encoding) -> Encoding:
    """Adds `encoding` under its name; names are unique and may not contain '+'."""
    if "+" in encoding.name or not encoding.name:
        raise ValueError(f"encoding name must be non-empty without '+', got {encoding.name!r}")
    if encoding.name in _REGISTRY:
        raise ValueError(f"encoding {encoding.name!r} is already registered")
    _REGISTRY[encoding.name] = encoding
    return encoding


def available_encodings() -> tuple[str, ...]:
    """Names of all registered encodings, sorted."""
    return tuple(sorted(_REGISTRY))


def get_encoding(name: str) -> Encoding:
    """The encoding registered as `name`; raises ValueError listing the known names."""
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown encoding {name!r}; known encodings: {', '.join(available_encodings())} "
            "(combine them with '+', e.g. 'sinusoidal+alibi')"
        )
    return _REGISTRY[name]


def resolve(name: str) -> tuple[Encoding, ...]:
    """Splits a combination such as "learned+t5" into its registered parts."""
    if not isinstance(name, str):
        raise TypeError(f"encoding name must be a string, got {name!r}")
    parts = tuple(get_encoding(part.strip()) for part in name.split("+"))
    names = [part.name for part in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"encoding {name!r} lists the same part twice")
    return parts


# ------------------------------------------------------------------ registrations
# One place for every encoding; each family appends its entries below.


register(
    Encoding(
        name="none",
        description="NoPE: no positional term at all (Kazemnejad et al., 2023 baseline).",
    )
)


def _sinusoidal(spec: EncodingSpec) -> nn.Module:
    options = spec.take_options("sinusoidal", {"base": 10000.0, "layout": "interleaved"})
    return absolute.SinusoidalEmbedding(spec.d_model, **options)


def _learned(spec: EncodingSpec) -> nn.Module:
    options = spec.take_options("learned", {"mode": "clip"})
    return absolute.LearnedEmbedding(spec.max_positions, spec.d_model, **options)


register(
    Encoding(
        name="sinusoidal",
        description="Fixed sinusoidal input embedding (Vaswani et al., 2017).",
        input_embedding=_sinusoidal,
    )
)
register(
    Encoding(
        name="learned",
        description="Learned absolute position table added to the input embedding.",
        input_embedding=_learned,
    )
)
