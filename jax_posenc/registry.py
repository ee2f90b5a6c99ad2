"""Encodings by name, each declaring what it contributes to a transformer.

A model reads only this registry: it never special-cases an encoding. An `Encoding`
holds up to six factories, one per place a positional term can enter attention:

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
* `token_bias(spec) -> linen Module` for terms computed from the tokens themselves
  (Forgetting Transformer). Its `token_bias(context)` method reads a
  `jax_posenc.TokenContext` (the layer's token features, positions, segment ids) and
  returns a `jax_posenc.TokenBias`.
* `contextual_bias(spec) -> linen Module` for terms read from whole rows of content
  logits (CoPE). Its `contextual_bias()` method returns a `jax_posenc.ContextualBias`,
  which attention evaluates on its xla path only.

Factories receive one `EncodingSpec` and are called once per attention layer (or once
per model for the input embedding). Combinations are written with "+", e.g.
"sinusoidal+alibi": the parts are resolved in order and their contributions stacked.

A *layer schedule* is a part with `takes_layer(layer, num_layers)`: on the layers it
takes, its own roles replace those of every other part; elsewhere it contributes
nothing. "rope+nope-every-4" is RoPE with every 4th layer positionless and its queries
scaled by a position-dependent temperature (Llama 4's iRoPE). Schedules are listed by
`available_schedules()`, apart from the encodings they modify.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from jax_posenc import _checks, _protocols, absolute, bias, content, relative, rope, rope_scaling


def freeze(value: Any) -> Any:
    """A hashable copy of an option value: mappings become `FrozenDict`s, lists, tuples
    and NumPy arrays tuples, recursively (an HF scaling dict, a list of ALiBi slopes)."""
    if isinstance(value, Mapping):
        return FrozenDict({key: freeze(item) for key, item in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(item) for item in value)
    if isinstance(value, np.ndarray):
        return freeze(value.tolist())
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            f"encoding option values must be hashable (or mappings, lists and arrays of "
            f"hashable values), got {type(value).__name__}: {value!r}"
        ) from None
    return value


def freeze_options(
    options: Mapping[str, Mapping[str, Any]] | None,
    encoding: str | None = None,
    *,
    name: str = "options",
) -> FrozenDict:
    """Per-encoding options as a hashable `FrozenDict` of `FrozenDict`s.

    With `encoding` (a name or "+" combination), an entry for an encoding that is not
    one of its parts raises, so a misspelt name is never silently ignored.
    """
    if options is None:
        return FrozenDict()
    if not isinstance(options, Mapping):
        raise TypeError(f"{name} must be a mapping of mappings, got {options!r}")
    for part, values in options.items():
        if not isinstance(values, Mapping):
            raise TypeError(f"{name}[{part!r}] must be a mapping, got {values!r}")
    if encoding is not None:
        parts = [part.name for part in resolve(encoding)]
        unknown = sorted(set(options) - set(parts))
        if unknown:
            raise ValueError(
                f"{name} for {unknown} do not belong to encoding {encoding!r}, whose parts "
                f"are {parts}"
            )
    return freeze(options)


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
      layer: index of the attention layer the modules are built for (0-based).
      num_layers: number of attention layers of the model.
    """

    d_model: int
    num_heads: int
    head_dim: int
    max_positions: int
    causal: bool = True
    options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    layer: int = 0
    num_layers: int = 1

    def __post_init__(self):
        for name in ("d_model", "num_heads", "head_dim", "max_positions", "num_layers"):
            _checks.check_positive_int(name, getattr(self, name))
        if not 0 <= _checks.check_int("layer", self.layer) < self.num_layers:
            raise ValueError(
                f"layer must be in [0, num_layers={self.num_layers}), got {self.layer}"
            )
        object.__setattr__(self, "options", freeze_options(self.options))

    def take_options(
        self, encoding: str, allowed: type | Mapping[str, Any], *, fixed: Collection[str] = ()
    ) -> dict[str, Any]:
        """The options given for `encoding`; unknown keys raise.

        `allowed` is the module class the factory builds: its dataclass fields are the
        option names, minus the `fixed` ones the factory sets from the spec, and only the
        options given are returned, so the module's own defaults stay the only ones. A
        mapping instead lists the names with defaults, and is returned updated.
        """
        if isinstance(allowed, Mapping):
            defaults, names = dict(allowed), set(allowed)
        else:
            defaults = {}
            names = {field.name for field in dataclasses.fields(allowed)}
            names -= {"parent", "name", *fixed}
        given = dict(self.options.get(encoding, {}))
        unknown = sorted(set(given) - names)
        if unknown:
            raise ValueError(
                f"options {unknown} are not understood by encoding {encoding!r}; "
                f"it accepts {sorted(names)}"
            )
        return {**defaults, **given}


Factory = Callable[[EncodingSpec], nn.Module]


@dataclasses.dataclass(frozen=True)
class Encoding:
    """A named positional encoding and the parts of attention it contributes to.

    `takes_layer(layer, num_layers) -> bool` makes it a layer schedule (see the module
    docstring): on the layers it takes, its roles replace those of the other parts.
    """

    name: str
    description: str
    input_embedding: Factory | None = None
    qk_transform: Factory | None = None
    logit_bias: Factory | None = None
    relative_terms: Factory | None = None
    token_bias: Factory | None = None
    contextual_bias: Factory | None = None
    causal_only: bool = False
    takes_layer: Callable[[int, int], bool] | None = None

    @property
    def contributes(self) -> tuple[str, ...]:
        parts = ("input_embedding", "qk_transform", "logit_bias", "relative_terms", "token_bias")
        parts += ("contextual_bias",)
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


def attention_modules(encoding: str, spec: EncodingSpec) -> list[tuple[str, str, nn.Module]]:
    """`(part name, role, module)` for every attention role of the parts of `encoding`
    that act on layer `spec.layer`.

    Roles are those of `jax_posenc._protocols.ROLES`, in the order of the parts; what a
    module contributes in its role is `_protocols.terms_of(role, module)`. Input
    embeddings are not attention terms and are left out. A layer schedule that takes
    this layer replaces the other parts; one that does not take it adds nothing.
    """
    parts = resolve(encoding)
    taking = [
        part
        for part in parts
        if part.takes_layer is not None and part.takes_layer(spec.layer, spec.num_layers)
    ]
    if len(taking) > 1:
        raise ValueError(
            f"layer {spec.layer} is taken by more than one schedule of {encoding!r}: "
            f"{[part.name for part in taking]}"
        )
    active = taking or [part for part in parts if part.takes_layer is None]
    modules = []
    for part in active:
        for role in _protocols.ROLES:
            factory = getattr(part, role)
            if factory is not None:
                modules.append((part.name, role, factory(spec)))
    return modules


def has_layer_schedule(encoding: str) -> bool:
    """Whether some part of `encoding` is a layer schedule (layers then differ)."""
    return any(part.takes_layer is not None for part in resolve(encoding))


def available_encodings() -> tuple[str, ...]:
    """Names of all registered encodings, sorted (layer schedules are listed apart)."""
    return tuple(sorted(name for name, part in _REGISTRY.items() if part.takes_layer is None))


def available_schedules() -> tuple[str, ...]:
    """Names of the registered layer schedules, sorted; combine them with an encoding,
    e.g. "rope+nope-every-4"."""
    return tuple(sorted(name for name, part in _REGISTRY.items() if part.takes_layer is not None))


def get_encoding(name: str) -> Encoding:
    """The encoding registered as `name`; raises ValueError listing the known names."""
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown encoding {name!r}; known encodings: {', '.join(available_encodings())}; "
            f"layer schedules: {', '.join(available_schedules())} (combine them with '+', "
            "e.g. 'sinusoidal+alibi', 'rope+nope-every-4')"
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
    options = spec.take_options("sinusoidal", absolute.SinusoidalEmbedding, fixed=("features",))
    return absolute.SinusoidalEmbedding(spec.d_model, **options)


def _learned(spec: EncodingSpec) -> nn.Module:
    fixed = ("num_positions", "features")
    options = spec.take_options("learned", absolute.LearnedEmbedding, fixed=fixed)
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


# ---- relative positions and attention biases (issue 5)
# Bias encodings return linen modules whose `bias_fn()` the model calls; Shaw and
# Transformer-XL return modules whose `terms()` the model calls.


def _alibi(spec: EncodingSpec) -> nn.Module:
    options = spec.take_options("alibi", bias.AlibiBias, fixed=("num_heads",))
    return bias.AlibiBias(spec.num_heads, **options)


def _t5(spec: EncodingSpec) -> nn.Module:
    fixed = ("num_heads", "bidirectional")
    options = spec.take_options("t5", bias.T5RelativePositionBias, fixed=fixed)
    return bias.T5RelativePositionBias(spec.num_heads, bidirectional=not spec.causal, **options)


def _kerple(spec: EncodingSpec) -> nn.Module:
    options = spec.take_options("kerple", bias.KerpleBias, fixed=("num_heads",))
    return bias.KerpleBias(spec.num_heads, **options)


def _fire(spec: EncodingSpec) -> nn.Module:
    options = spec.take_options("fire", bias.FireBias, fixed=("num_heads",))
    return bias.FireBias(spec.num_heads, **options)


def _dpb(spec: EncodingSpec) -> nn.Module:
    options = spec.take_options("dpb", bias.DynamicPositionBias, fixed=("num_heads",))
    return bias.DynamicPositionBias(spec.num_heads, **options)


def _shaw(spec: EncodingSpec) -> nn.Module:
    fixed = ("head_dim",)
    options = spec.take_options("shaw", relative.RelativePositionEmbedding, fixed=fixed)
    return relative.RelativePositionEmbedding(spec.head_dim, **options)


def _transformer_xl(spec: EncodingSpec) -> nn.Module:
    module = relative.TransformerXLRelativePosition
    options = spec.take_options("transformer_xl", module, fixed=("num_heads", "head_dim"))
    return module(spec.num_heads, spec.head_dim, **options)


register(
    Encoding(
        name="alibi",
        description="ALiBi linear distance bias, per-head geometric slopes (Press et al., 2022).",
        logit_bias=_alibi,
    )
)
register(
    Encoding(
        name="t5",
        description="T5 learned bias per log-spaced distance bucket (Raffel et al., 2020).",
        logit_bias=_t5,
    )
)
register(
    Encoding(
        name="kerple",
        description="KERPLE log or power kernel bias (Chi et al., 2022); option 'variant'.",
        logit_bias=_kerple,
    )
)
register(
    Encoding(
        name="fire",
        description="FIRE: MLP over progressively interpolated log distance (Li et al., 2023).",
        logit_bias=_fire,
    )
)
register(
    Encoding(
        name="dpb",
        description="Dynamic position bias: an MLP over the relative distance (CrossFormer).",
        logit_bias=_dpb,
    )
)
register(
    Encoding(
        name="shaw",
        description="Clipped relative key/value embeddings (Shaw et al., 2018).",
        relative_terms=_shaw,
    )
)
register(
    Encoding(
        name="transformer_xl",
        description="Transformer-XL sinusoidal relative logits, biases u, v (Dai et al., 2019).",
        relative_terms=_transformer_xl,
    )
)


# ---- rotary (RoPE, xPos)


def _rope_options(spec: EncodingSpec, name: str, module: type) -> dict[str, Any]:
    """The options of a RoPE module; an HF `rope_parameters` dict becomes a scaling spec."""
    options = spec.take_options(name, module)
    if isinstance(options.get("scaling"), Mapping):
        options["scaling"] = rope_scaling.from_hf_rope_parameters(options["scaling"])
    return options


def _rope(spec: EncodingSpec) -> nn.Module:
    return rope.RotaryEmbedding(**_rope_options(spec, "rope", rope.RotaryEmbedding))


def _xpos(spec: EncodingSpec) -> nn.Module:
    if not spec.causal:
        raise ValueError(
            "encoding 'xpos' is causal-only (its key scale grows without bound for keys after "
            "the query); got an EncodingSpec with causal=False"
        )
    return rope.XPosEmbedding(**spec.take_options("xpos", rope.XPosEmbedding))


register(
    Encoding(
        name="rope",
        description="Rotary position embedding of q and k (Su et al., 2021), with scalings.",
        qk_transform=_rope,
    )
)
register(
    Encoding(
        name="xpos",
        description="xPos: rotary embedding with exponential distance decay (Sun et al., 2022).",
        qk_transform=_xpos,
        causal_only=True,
    )
)


# ---- layer schedules (iRoPE)


def nope_temperature(
    positions: jax.Array, *, floor_scale: float = 8192.0, attn_scale: float = 0.1
) -> jax.Array:
    """Llama 4's query temperature on its NoPE layers, float32, shaped like `positions`:
    `1 + attn_scale * ln(floor((p + 1) / floor_scale) + 1)`.

    It is 1 for the first `floor_scale - 1` positions and grows with the log of the
    position in steps of `floor_scale`, sharpening attention over long contexts where
    no position signal tells the keys apart.

    References:
      Meta, 2025, Llama 4 (`attn_temperature_tuning`, `floor_scale`, `attn_scale` in the
        Llama 4 configs; the formula as in transformers' `Llama4TextAttention`).
    """
    floor_scale = _checks.check_positive_float("floor_scale", floor_scale)
    if attn_scale < 0:
        raise ValueError(f"attn_scale must be >= 0, got {attn_scale}")
    steps = jnp.floor((jnp.asarray(positions, jnp.float32) + 1.0) / floor_scale)
    return 1.0 + attn_scale * jnp.log1p(steps)


class NopeTemperature(nn.Module):
    """qk transform of a NoPE layer: queries times `nope_temperature(q_positions)`, keys
    unchanged; `__call__(q, k, q_positions, k_positions=None)`. `attn_scale=0` is
    plain NoPE."""

    floor_scale: float = 8192.0
    attn_scale: float = 0.1

    def __call__(self, q, k, q_positions, k_positions=None):
        rows = _checks.position_rows(
            "q_positions", q_positions, length=q.shape[1], batch=q.shape[0]
        )
        scale = nope_temperature(rows, floor_scale=self.floor_scale, attn_scale=self.attn_scale)
        scaled = q.astype(jnp.promote_types(q.dtype, jnp.float32)) * scale[:, :, None, None]
        return scaled.astype(q.dtype), k


def _nope_every(interval: int) -> Encoding:
    name = f"nope-every-{interval}"

    def temperature(spec: EncodingSpec) -> nn.Module:
        return NopeTemperature(**spec.take_options(name, NopeTemperature))

    return Encoding(
        name=name,
        description=(
            f"Layer schedule (Llama 4 iRoPE): every {interval}th layer has no positional "
            "terms and scales its queries by 1 + attn_scale * ln(floor((p+1) / floor_scale) "
            "+ 1)."
        ),
        qk_transform=temperature,
        takes_layer=lambda layer, num_layers: (layer + 1) % interval == 0,
    )


register(_nope_every(4))


# ---- content-dependent positions (issue 16)


def _fox(spec: EncodingSpec) -> nn.Module:
    if not spec.causal:
        raise ValueError(
            "encoding 'fox' is causal-only (its bias c_i - c_j rewards keys after the "
            "query); got an EncodingSpec with causal=False"
        )
    options = spec.take_options("fox", content.ForgettingGate, fixed=("num_heads",))
    return content.ForgettingGate(spec.num_heads, **options)


register(
    Encoding(
        name="fox",
        description=(
            "Forgetting Transformer: per-head data-dependent forget gates, logit bias "
            "sum_{j<l<=i} log f_l (Lin et al., 2025)."
        ),
        token_bias=_fox,
        causal_only=True,
    )
)


def _selfextend(spec: EncodingSpec) -> nn.Module:
    if not spec.causal:
        raise ValueError(
            "encoding 'selfextend' is causal-only (its grouping looks back from the query); "
            "got an EncodingSpec with causal=False"
        )
    module = content.SelfExtendRotaryEmbedding
    return module(**_rope_options(spec, "selfextend", module))


register(
    Encoding(
        name="selfextend",
        description=(
            "SelfExtend: RoPE at exact positions within a neighbour window, grouped "
            "positions beyond, merged per pair (Jin et al., 2024)."
        ),
        qk_transform=_selfextend,
        causal_only=True,
    )
)


def _cope(spec: EncodingSpec) -> nn.Module:
    module = content.ContextualPositionEmbedding
    options = spec.take_options("cope", module, fixed=("num_heads", "head_dim"))
    return module(spec.num_heads, spec.head_dim, **options)


register(
    Encoding(
        name="cope",
        description=(
            "CoPE: positions counted by gates sigmoid(q.k) from the key to the query, "
            "interpolated learned embeddings (Golovneva et al., 2024); xla attention only."
        ),
        contextual_bias=_cope,
    )
)
