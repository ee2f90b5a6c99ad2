"""Flax NNX modules, generated from the linen ones.

Every encoding is defined once, as a linen module in its family file. The NNX classes
here are made from those by `nnx_class` (through `flax.nnx.bridge.ToNNX`) and
initialised on construction from tiny example inputs: no parameter's shape depends on
the sequence length. A class takes its linen module's fields as arguments, plus `rngs`
where parameters start random, and has the same methods (`__call__`, `bias_fn()` of the
biases, `terms()` of the relative terms). Parameters keep their linen names and paths,
so a linen parameter tree loads as it is::

    from jax_posenc import nnx as pe_nnx
    emb = pe_nnx.LearnedEmbedding(512, 64, rngs=nnx.Rngs(0))
    nnx.update(emb, linen_variables["params"])

`from_registry` builds the NNX module of one role of a registered encoding, and
`AttentionFn` is an `attention_fn` for `nnx.MultiHeadAttention` that owns an encoding's
parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import bridge

from jax_posenc import _checks, absolute, bias, content, layers, registry, relative, rope

__all__ = [
    "AlibiBias",
    "AttentionFn",
    "ContextualPositionEmbedding",
    "DynamicPositionBias",
    "FireBias",
    "KerpleBias",
    "LearnedEmbedding",
    "MultiAxisRotaryEmbedding",
    "RelativePositionEmbedding",
    "RotaryEmbedding",
    "SinusoidalEmbedding",
    "T5RelativePositionBias",
    "TransformerXLRelativePosition",
    "XPosEmbedding",
    "from_linen",
    "from_registry",
    "nnx_class",
]


def _positions() -> np.ndarray:
    return np.zeros((1, 1), np.int32)


def _activations(num_heads: int, head_dim: int) -> np.ndarray:
    return np.zeros((1, 1, num_heads, head_dim), np.float32)


# The arguments that initialise a module in each role (a registry factory field), from its
# number of heads and features per head. NumPy arrays stay concrete when construction is
# traced (inside `nnx.jit`), so checks on concrete positions (a table's range) still pass.
_EXAMPLE_INPUTS: dict[str, Callable[[int, int], tuple[np.ndarray, ...]]] = {
    "input_embedding": lambda num_heads, head_dim: (_positions(),),
    "qk_transform": lambda num_heads, head_dim: (
        _activations(num_heads, head_dim),
        _activations(num_heads, head_dim),
        _positions(),
    ),
    "logit_bias": lambda num_heads, head_dim: (_positions(), _positions()),
    "relative_terms": lambda num_heads, head_dim: (
        _activations(num_heads, head_dim),
        _activations(num_heads, head_dim),
        _positions(),
        _positions(),
    ),
    # A token-bias module (FoX) reads per-token features `[B, L, F]`; its example size
    # (`head_dim=` when generated) is the feature width F.
    "token_bias": lambda num_heads, width: (np.zeros((1, 1, width), np.float32),),
    "contextual_bias": lambda num_heads, head_dim: (
        _activations(num_heads, head_dim),
        _activations(num_heads, head_dim),
    ),
}
_ROLES_WITH_ACTIVATIONS = ("qk_transform", "relative_terms", "token_bias", "contextual_bias")
_NOT_FIELDS = ("parent", "name")


def _size(value: Any) -> int | None:
    """A usable example size; an invalid field value is left for the linen module to name."""
    if value is None:
        return None
    return value if isinstance(value, int) and value > 0 else 1


def _example_sizes(module: nn.Module, head_dim: int | None) -> tuple[int, int | None]:
    """Heads and features per head of the example activations: the module's own fields
    (`num_heads`, `head_dim`), else the `head_dim` given, else `rotary_dim` (enough to
    rotate); None where nothing fixes the head size."""
    num_heads = _size(getattr(module, "num_heads", 1))
    for value in (getattr(module, "head_dim", None), head_dim, getattr(module, "rotary_dim", None)):
        if value is not None:
            return num_heads, _size(value)
    return num_heads, None


class _Generated(bridge.ToNNX):
    """A `ToNNX` of one linen class, initialised on construction (see `nnx_class`)."""

    linen_class: ClassVar[type[nn.Module]]
    role: ClassVar[str]
    takes_head_dim: ClassVar[bool]

    def __init__(self, *args: Any, rngs: nnx.Rngs | jax.Array | None = None, **fields: Any):
        head_dim = fields.pop("head_dim", None) if self.takes_head_dim else None
        module = self.linen_class(*args, **fields)
        super().__init__(module, rngs=jax.random.key(0) if rngs is None else rngs)
        num_heads, head_dim = _example_sizes(module, head_dim)
        # Without a head size (a rotary module given neither rotary_dim nor head_dim) the
        # module is left uninitialised: it has no parameters unless they need that size.
        if head_dim is not None or self.role not in _ROLES_WITH_ACTIVATIONS:
            example = _EXAMPLE_INPUTS[self.role](num_heads, head_dim)
            # Eager even when construction is traced (`nnx.jit`), so the example
            # positions stay concrete and pass concrete-only checks.
            with jax.ensure_compile_time_eval():
                bridge.lazy_init(self, *example)
                if rngs is None:
                    self._check_deterministic(example)
        # Nothing is drawn after initialisation, so the state holds only the parameters.
        self.to_nnx__rngs = None

    def _check_deterministic(self, example: tuple[np.ndarray, ...]) -> None:
        """Without `rngs` a fixed key initialised the parameters, which is only right for
        parameters that start from constants (KERPLE, RoPE frequencies): a second key
        must give the same values."""
        params = jax.tree.leaves(nnx.state(self, nnx.Not(nnx.RngState)))
        if params:
            other = jax.tree.leaves(self.to_nnx__module.init(jax.random.key(1), *example))
            if not all(np.array_equal(a, b) for a, b in zip(params, other, strict=True)):
                raise TypeError(
                    f"{type(self).__name__} starts from random parameters; pass rngs=nnx.Rngs(...)"
                )


def _forward(name: str, linen_method: Callable) -> Callable:
    """A method that applies the linen method `name` to the module's variables."""

    @functools.wraps(linen_method)
    def method(self, *args, **kwargs):
        try:
            return bridge.ToNNX.__call__(self, *args, method=name, **kwargs)
        except (flax.errors.ScopeCollectionNotFound, flax.errors.ScopeParamNotFoundError) as error:
            if jax.tree.leaves(nnx.state(self)):
                raise
            raise ValueError(
                f"{type(self).__name__} was built without a head size, which its parameters "
                "need; pass head_dim=... (or rotary_dim=...) to the constructor"
            ) from error

    return method


def _signature(linen_class: type[nn.Module], takes_head_dim: bool) -> inspect.Signature:
    keyword = inspect.Parameter.KEYWORD_ONLY
    parameters = [
        parameter
        for parameter in inspect.signature(linen_class).parameters.values()
        if parameter.name not in _NOT_FIELDS
    ]
    parameters.append(inspect.Parameter("rngs", keyword, default=None, annotation="nnx.Rngs"))
    if takes_head_dim:
        parameters.append(inspect.Parameter("head_dim", keyword, default=None, annotation="int"))
    return inspect.Signature(parameters)


@functools.cache
def nnx_class(linen_class: type[nn.Module], role: str) -> type[nnx.Module]:
    """The NNX class generated from a linen module class playing `role`.

    Instances take the linen fields as arguments (positional ones in field order) plus
    the keyword `rngs`, needed where parameters start random. They are initialised on
    construction by calling the linen module on example inputs of the role
    ("input_embedding": positions `[1, 1]`; "logit_bias": two of them; "qk_transform"
    and "relative_terms": q and k `[1, 1, H, D]` and positions, "contextual_bias": q and
    k alone, with H and D from the
    fields `num_heads` and `head_dim`, a "qk_transform" taking D from an extra keyword
    `head_dim` or else `rotary_dim`). The linen module's public methods and `__call__`
    are methods of the class; its parameters are attributes under their linen names.

    Args:
      linen_class: a linen module class whose parameter shapes do not depend on the
        sequence length.
      role: the registry factory field it is built by, one of "input_embedding",
        "qk_transform", "logit_bias", "relative_terms", "token_bias", "contextual_bias".

    Returns:
      A subclass of `flax.nnx.bridge.ToNNX`; one class per `(linen_class, role)`.
    """
    _checks.check_choice("role", role, tuple(_EXAMPLE_INPUTS))
    fields = {field.name for field in dataclasses.fields(linen_class)}
    takes_head_dim = role in _ROLES_WITH_ACTIVATIONS and "head_dim" not in fields
    methods = {
        name: _forward(name, value)
        for name, value in vars(linen_class).items()
        if callable(value)
        and name not in fields
        and name != "setup"
        and (name == "__call__" or not name.startswith("_"))
    }
    linen_name = f"{linen_class.__module__}.{linen_class.__qualname__}"
    extra = ", `head_dim` (the size of the example heads)" if takes_head_dim else ""
    doc = (
        f"NNX `{linen_class.__name__}` generated from `{linen_name}` (see `nnx_class`).\n\n"
        f"Arguments: the linen fields, `rngs`{extra}.\n\n{inspect.getdoc(linen_class) or ''}"
    )
    namespace = {
        "__module__": __name__,
        "__qualname__": linen_class.__qualname__,
        "__doc__": doc,
        "__signature__": _signature(linen_class, takes_head_dim),
        "linen_class": linen_class,
        "role": role,
        "takes_head_dim": takes_head_dim,
        **methods,
    }
    return type(_Generated)(linen_class.__name__, (_Generated,), namespace)


def from_linen(
    module: nn.Module,
    role: str,
    *,
    rngs: nnx.Rngs | jax.Array | None = None,
    head_dim: int | None = None,
) -> nnx.Module:
    """An NNX module with the fields of the linen `module` (fresh parameters).

    Args:
      module: an unbound linen module, e.g. the one a registry factory returns.
      role: the role it plays (see `nnx_class`).
      rngs: initialises random parameters.
      head_dim: features per head of a "qk_transform"'s example inputs where no field
        fixes them (learnable RoPE frequencies with `rotary_dim=None`).
    """
    cls = nnx_class(type(module), role)
    fields = {
        field.name: getattr(module, field.name)
        for field in dataclasses.fields(module)
        if field.init and field.name not in _NOT_FIELDS
    }
    if cls.takes_head_dim:
        fields["head_dim"] = head_dim
    return cls(**fields, rngs=rngs)


def from_registry(
    encoding: str,
    role: str,
    spec: registry.EncodingSpec,
    *,
    rngs: nnx.Rngs | jax.Array | None = None,
) -> nnx.Module:
    """The NNX module of one role of a registered encoding, as its factory builds it.

    Args:
      encoding: a registered name (not a "+" combination).
      role: "input_embedding", "qk_transform", "logit_bias", "relative_terms",
        "token_bias" or "contextual_bias".
      spec: the model's sizes and options, passed to the factory.
      rngs: initialises random parameters.
    """
    _checks.check_choice("role", role, tuple(_EXAMPLE_INPUTS))
    registered = registry.get_encoding(encoding)
    factory = getattr(registered, role)
    if factory is None:
        raise ValueError(
            f"encoding {encoding!r} contributes {list(registered.contributes)}, not {role!r}"
        )
    # A token-bias module reads the model layer's input x: d_model features per token.
    width = spec.d_model if role == "token_bias" else spec.head_dim
    return from_linen(factory(spec), role, rngs=rngs, head_dim=width)


SinusoidalEmbedding = nnx_class(absolute.SinusoidalEmbedding, "input_embedding")
LearnedEmbedding = nnx_class(absolute.LearnedEmbedding, "input_embedding")
AlibiBias = nnx_class(bias.AlibiBias, "logit_bias")
T5RelativePositionBias = nnx_class(bias.T5RelativePositionBias, "logit_bias")
KerpleBias = nnx_class(bias.KerpleBias, "logit_bias")
FireBias = nnx_class(bias.FireBias, "logit_bias")
DynamicPositionBias = nnx_class(bias.DynamicPositionBias, "logit_bias")
RelativePositionEmbedding = nnx_class(relative.RelativePositionEmbedding, "relative_terms")
TransformerXLRelativePosition = nnx_class(relative.TransformerXLRelativePosition, "relative_terms")
RotaryEmbedding = nnx_class(rope.RotaryEmbedding, "qk_transform")
XPosEmbedding = nnx_class(rope.XPosEmbedding, "qk_transform")
MultiAxisRotaryEmbedding = nnx_class(rope.MultiAxisRotaryEmbedding, "qk_transform")
SelfExtendRotaryEmbedding = nnx_class(content.SelfExtendRotaryEmbedding, "qk_transform")
ForgettingGate = nnx_class(content.ForgettingGate, "token_bias")
ContextualPositionEmbedding = nnx_class(content.ContextualPositionEmbedding, "contextual_bias")


class AttentionFn(nnx.Module):
    """An `attention_fn` for `flax.nnx.MultiHeadAttention` that owns a registered
    encoding's parameters, so learned encodings (T5, KERPLE, FIRE, Shaw, ...) train with
    the layer. Parameter-free encodings can also use `jax_posenc.make_attention_fn`
    directly.

    Its parameters do not depend on the sequence length, so they are created at
    construction from `num_heads` and `head_dim` (the projected query's heads and
    features per head). Masks, causality and decoding follow `make_attention_fn`.

    Example::

        attention_fn = pe_nnx.AttentionFn("t5", num_heads=4, head_dim=16, rngs=rngs)
        layer = nnx.MultiHeadAttention(num_heads=4, in_features=64, decode=False,
                                       attention_fn=attention_fn, rngs=rngs)

    Args:
      encoding: a registered name or "+" combination.
      num_heads: query heads H.
      head_dim: features per head D.
      num_kv_heads: key/value heads (grouped-query attention); None for `num_heads`.
      implementation: "auto", "xla" or "blockwise" (see `dot_product_attention`).
      block_size: blockwise block size.
      causal: whether direction-aware encodings are built for causal use (T5's
        one-sided buckets), as `is_causal=True` does for `make_attention_fn`.
      rngs: initialises the parameters.
      **options: per-part options keyed by part name, e.g. `t5={"num_buckets": 64}`.
    """

    def __init__(
        self,
        encoding: str,
        *,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int | None = None,
        implementation: str = "auto",
        block_size: int | tuple[int, int] | None = None,
        causal: bool = False,
        rngs: nnx.Rngs,
        **options: Any,
    ):
        num_heads = _checks.check_positive_int("num_heads", num_heads)
        head_dim = _checks.check_positive_int("head_dim", head_dim)
        kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        kv_heads = _checks.check_positive_int("num_kv_heads", kv_heads)
        self.causal = bool(causal)
        module = layers.EncodedAttention(
            encoding, registry.freeze_options(options, encoding), implementation, block_size
        )
        example = jnp.zeros((1, 1, num_heads, head_dim), jnp.float32)
        kv_example = jnp.zeros((1, 1, kv_heads, head_dim), jnp.float32)
        self.encoded = bridge.ToNNX(module, rngs=rngs)
        bridge.lazy_init(self.encoded, example, kv_example, kv_example, is_causal=self.causal)

    def __call__(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        mask: jax.Array | None = None,
        *,
        is_causal: bool = False,
        **kwargs: Any,
    ) -> jax.Array:
        return self.encoded(query, key, value, mask, is_causal=is_causal or self.causal, **kwargs)
