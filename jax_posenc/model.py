"""A small decoder-only Flax transformer whose positional encoding is chosen by name.

The model reads only the encoding registry (`jax_posenc.registry`): every part of the
encoding name (e.g. "sinusoidal+alibi") contributes through the protocol it declares,

* `input_embedding`: added to the token embeddings once, before the first layer;
* `qk_transform`: applied to queries and keys in every layer;
* `logit_bias`: its `bias_fn()` is handed to `dot_product_attention`;
* `relative_terms`: its `terms()` (a `RelativeTerms`) is handed to attention;

so nothing about positions is re-implemented here and a newly registered encoding works
without edits. Positions are explicit `[B, S]` arguments (default `arange(S)` per row),
so packed sequences (with `segment_ids`) and offset positions work.

Architecture: pre-norm residual blocks (RMSNorm or LayerNorm), multi-head attention
with optional grouped key/value heads, GELU or SwiGLU MLP, a final norm and (optionally
tied) output embedding. Token embeddings are multiplied by `sqrt(d_model)` (Vaswani et
al., 2017, section 3.4) so they have unit scale next to an additive position encoding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_posenc import _checks, _protocols, registry
from jax_posenc.attention import dot_product_attention, segment_positions

NORMS = ("rmsnorm", "layernorm")
MLPS = ("gelu", "swiglu")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "blockwise")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Static, hashable configuration of `Transformer`.

    Attributes:
      encoding: registry name of the positional encoding, parts joined by "+"
        (e.g. "rope", "none", "sinusoidal+alibi"); see `available_encodings()`. A layer
        schedule part (`available_schedules()`) makes layers differ, e.g.
        "rope+nope-every-4": RoPE, but every 4th layer without positions and with
        Llama 4's query temperature.
      vocab_size: number of token ids (256 for bytes).
      d_model: width of the residual stream.
      num_layers: number of transformer blocks.
      num_heads: query heads; `d_model` must be divisible by it.
      num_kv_heads: key/value heads (grouped-query attention); None for `num_heads`.
      mlp_dim: hidden width of the MLP; None for `4 * d_model`.
      max_positions: largest number of positions the model will see; sizes learned
        tables and bounds the default positions `arange(S)`.
      norm: "rmsnorm" or "layernorm".
      mlp: "gelu" or "swiglu".
      tie_embeddings: whether the output projection reuses the token embedding.
      attention: "auto", "xla" or "blockwise" (see `dot_product_attention`).
      block_size: block size of the blockwise implementation; None for the default
        table (`jax_posenc.attention.default_block_size`).
      dtype: compute dtype, "float32" or "bfloat16"; parameters stay float32 and the
        logits are returned in float32.
      encoding_options: per-encoding settings keyed by part name, e.g.
        `{"rope": {"base": 500000.0, "scaling": {"rope_type": "llama3", ...}}}`, passed
        to the factories through `EncodingSpec.options`. Frozen into a hashable
        `FrozenDict` (nested dicts, lists and arrays included) so the config can be a
        static argument of `jax.jit`; an entry for a name that is not a part of
        `encoding` raises.
      layer_types: one name per layer, e.g. `("sliding_attention",) * 5 +
        ("full_attention",)` as in Gemma 3's configs; None when all layers are alike.
      layer_encoding_options: per layer type, options that replace those of
        `encoding_options` on the layers of that type (a Gemma 3 local/global pair:
        `{"sliding_attention": {"rope": {"base": 10000.0}}, "full_attention": {"rope":
        {"base": 1e6, "scaling": {"rope_type": "linear", "factor": 8.0}}}}`).
      remat: recompute each block's activations in the backward pass (`nn.remat`),
        trading compute for memory in long-context training.
      scan_layers: run the blocks as one `nn.scan` over stacked parameters (one
        compiled block instead of `num_layers`; parameters gain a leading layer axis).
        Layers must then be alike: no layer schedule and no `layer_types`.
    """

    encoding: str = "rope"
    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    mlp_dim: int | None = None
    max_positions: int = 1024
    norm: str = "rmsnorm"
    mlp: str = "gelu"
    tie_embeddings: bool = True
    attention: str = "auto"
    block_size: int | None = None
    dtype: str = "float32"
    encoding_options: Any = None
    layer_types: tuple[str, ...] | None = None
    layer_encoding_options: Any = None
    remat: bool = False
    scan_layers: bool = False

    def __post_init__(self):
        registry.resolve(self.encoding)
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "max_positions"):
            _checks.check_positive_int(name, getattr(self, name))
        if self.block_size is not None:
            _checks.check_positive_int("block_size", self.block_size)
        if self.num_kv_heads is not None:
            _checks.check_positive_int("num_kv_heads", self.num_kv_heads)
        if self.mlp_dim is not None:
            _checks.check_positive_int("mlp_dim", self.mlp_dim)
        _checks.check_choice("norm", self.norm, NORMS)
        _checks.check_choice("mlp", self.mlp, MLPS)
        _checks.check_choice("attention", self.attention, ATTENTION_IMPLEMENTATIONS)
        _checks.check_choice("dtype", self.dtype, tuple(COMPUTE_DTYPES))
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}"
            )
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be divisible by num_kv_heads={self.kv_heads}"
            )
        for name in ("remat", "scan_layers", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        options = registry.freeze_options(
            self.encoding_options, self.encoding, name="encoding_options"
        )
        object.__setattr__(self, "encoding_options", options)
        self._check_layer_settings()

    def _check_layer_settings(self) -> None:
        """Validates and freezes `layer_types` and `layer_encoding_options`."""
        types, by_type = self.layer_types, self.layer_encoding_options
        if types is not None:
            if isinstance(types, str) or len(types) != self.num_layers:
                raise ValueError(
                    f"layer_types must name each of the num_layers={self.num_layers} layers, "
                    f"got {types!r}"
                )
            if not all(isinstance(name, str) and name for name in types):
                raise TypeError(f"layer_types must be non-empty strings, got {types!r}")
            object.__setattr__(self, "layer_types", tuple(types))
        if by_type is not None:
            if types is None:
                raise ValueError("layer_encoding_options needs layer_types")
            if not isinstance(by_type, Mapping):
                raise TypeError(f"layer_encoding_options must be a mapping, got {by_type!r}")
            unknown = sorted(set(by_type) - set(types))
            if unknown:
                raise ValueError(
                    f"layer_encoding_options for {unknown} name no layer type of "
                    f"layer_types {sorted(set(types))}"
                )
            frozen = {
                name: registry.freeze_options(
                    options, self.encoding, name=f"layer_encoding_options[{name!r}]"
                )
                for name, options in by_type.items()
            }
            object.__setattr__(self, "layer_encoding_options", registry.freeze(frozen))
        varies = types is not None or registry.has_layer_schedule(self.encoding)
        if self.scan_layers and varies:
            raise ValueError(
                "scan_layers=True runs one block for every layer, but layer_types or the layer "
                f"schedule of encoding {self.encoding!r} make layers differ; use "
                "scan_layers=False"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def hidden_dim(self) -> int:
        return 4 * self.d_model if self.mlp_dim is None else self.mlp_dim

    @property
    def compute_dtype(self) -> jnp.dtype:
        return COMPUTE_DTYPES[self.dtype]

    @property
    def options(self) -> dict[str, dict[str, Any]]:
        """`encoding_options` as a dict of (frozen) dicts."""
        return {name: values for name, values in self.encoding_options.items()}

    def layer_options(self, layer: int = 0) -> dict[str, dict[str, Any]]:
        """The encoding options of one layer: `encoding_options`, updated part by part
        by the `layer_encoding_options` of the layer's type."""
        options = {name: dict(values) for name, values in self.encoding_options.items()}
        if self.layer_types is not None and self.layer_encoding_options is not None:
            overrides = self.layer_encoding_options.get(self.layer_types[layer], {})
            for name, values in overrides.items():
                options[name] = {**options.get(name, {}), **values}
        return options

    def encoding_spec(self, layer: int = 0) -> registry.EncodingSpec:
        """The `EncodingSpec` the registry factories of layer `layer` receive."""
        return registry.EncodingSpec(
            d_model=self.d_model,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            max_positions=self.max_positions,
            causal=True,
            options=self.layer_options(layer),
            layer=layer,
            num_layers=self.num_layers,
        )


def _norm(config: TransformerConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dtype=config.compute_dtype)
    return nn.LayerNorm(dtype=config.compute_dtype)


class SelfAttention(nn.Module):
    """Causal self-attention whose positional terms come from the registry.

    Positional submodules are named `<encoding>_<role>`, e.g. `rope_qk_transform`,
    `t5_logit_bias`, `shaw_relative_terms`; `layer` picks the layer's settings.
    """

    config: TransformerConfig
    layer: int = 0

    def setup(self):
        config = self.config
        dense = dict(dtype=config.compute_dtype, use_bias=False)
        self.query = nn.DenseGeneral((config.num_heads, config.head_dim), **dense)
        self.key = nn.DenseGeneral((config.kv_heads, config.head_dim), **dense)
        self.value = nn.DenseGeneral((config.kv_heads, config.head_dim), **dense)
        self.out = nn.DenseGeneral(config.d_model, axis=(-2, -1), **dense)
        spec = config.encoding_spec(self.layer)
        roles = []
        for part_name, role, module in registry.attention_modules(config.encoding, spec):
            setattr(self, f"{part_name}_{role}", module)
            roles.append((role, f"{part_name}_{role}"))
        self.positional_roles = tuple(roles)

    def __call__(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """`x` `[B, S, d_model]`, `positions` `[B or 1, S]` -> `[B, S, d_model]`."""
        q, k, v = self.query(x), self.key(x), self.value(x)
        # A token bias (FoX's forget gates) reads the layer input x itself.
        context = _protocols.TokenContext(x, positions, positions, segment_ids)
        terms = _protocols.combine(
            [
                _protocols.terms_of(role, getattr(self, name), context)
                for role, name in self.positional_roles
            ]
        )
        q, k, arguments = terms.prepare(q, k, positions, positions)
        out = dot_product_attention(
            q,
            k,
            v,
            **arguments,
            q_positions=positions,
            k_positions=positions,
            causal=True,
            segment_ids=segment_ids,
            implementation=self.config.attention,
            block_size=self.config.block_size,
        )
        return self.out(out)


class MLP(nn.Module):
    """GELU MLP or SwiGLU (Shazeer, 2020, GLU Variants Improve Transformer)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        config = self.config
        dense = dict(dtype=config.compute_dtype, use_bias=False)
        hidden = nn.Dense(config.hidden_dim, name="up", **dense)(x)
        if config.mlp == "swiglu":
            hidden = nn.silu(nn.Dense(config.hidden_dim, name="gate", **dense)(x)) * hidden
        else:
            hidden = nn.gelu(hidden)
        return nn.Dense(config.d_model, name="down", **dense)(hidden)


class Block(nn.Module):
    """Pre-norm residual block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    config: TransformerConfig
    layer: int = 0

    @nn.compact
    def __call__(self, x, positions, segment_ids=None):
        x = x + SelfAttention(self.config, self.layer, name="attention")(
            _norm(self.config)(x), positions, segment_ids
        )
        return x + MLP(self.config, name="mlp")(_norm(self.config)(x))


class _Carried:
    """Adapts a block `(x, positions, segment_ids) -> x` to `nn.scan`'s carry form."""

    @staticmethod
    def wrap(block: type[nn.Module]) -> type[nn.Module]:
        class ScannedBlock(nn.Module):
            config: TransformerConfig

            @nn.compact
            def __call__(self, x, positions, segment_ids):
                return block(self.config, name="block")(x, positions, segment_ids), None

        return ScannedBlock


class Transformer(nn.Module):
    """Decoder-only language model; see the module docstring and `TransformerConfig`.

    Call as `model.apply(params, tokens, positions=None, segment_ids=None)`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jax_posenc as pe
      >>> config = pe.TransformerConfig("rope+alibi", d_model=32, num_layers=1, num_heads=2)
      >>> model = pe.Transformer(config)
      >>> tokens = jnp.zeros((2, 16), jnp.int32)
      >>> params = jax.jit(model.init)(jax.random.key(0), tokens)
      >>> apply = jax.jit(model.apply)
      >>> apply(params, tokens).shape  # next-token logits [B, S, vocab_size]
      (2, 16, 256)
      >>> segment_ids = jnp.array([[1] * 10 + [2] * 6] * 2)  # two packed documents per row
      >>> apply(params, tokens, segment_ids=segment_ids).shape
      (2, 16, 256)
    """

    config: TransformerConfig

    def setup(self):
        config = self.config
        self.token_embedding = nn.Embed(
            config.vocab_size, config.d_model, dtype=config.compute_dtype
        )
        spec = config.encoding_spec()
        names = []
        for part in registry.resolve(config.encoding):
            if part.input_embedding is not None:
                setattr(self, f"{part.name}_input_embedding", part.input_embedding(spec))
                names.append(f"{part.name}_input_embedding")
        self.input_embedding_names = tuple(names)
        block = nn.remat(Block) if config.remat else Block
        if config.scan_layers:
            self.layers = nn.scan(
                _Carried.wrap(block),
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=config.num_layers,
            )(config, name="layers")
        else:
            self.layers = [block(config, layer) for layer in range(config.num_layers)]
        self.final_norm = _norm(config)
        if not config.tie_embeddings:
            self.unembed = nn.Dense(config.vocab_size, dtype=config.compute_dtype, use_bias=False)

    def _positions(self, tokens, positions, segment_ids) -> jax.Array:
        """Positions as int32 `[B, S]`, or `[1, S]` when every row shares them.

        Shared positions stay `[1, S]` so positional terms (a bias MLP over every
        query-key pair, for instance) are computed once, not once per row.
        """
        batch, length = tokens.shape
        max_positions = self.config.max_positions
        if positions is None and segment_ids is not None:
            positions = segment_positions(segment_ids)
        if positions is None:
            if length > max_positions:
                raise ValueError(
                    f"tokens has length {length} but the model was configured for "
                    f"max_positions={max_positions}; raise max_positions"
                )
            return jnp.arange(length, dtype=jnp.int32)[None]
        positions = _checks.position_rows("positions", positions, length=length, batch=batch)
        _checks.check_index_range("positions", positions, max_positions, "max_positions")
        return positions

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Next-token logits.

        Args:
          tokens: `[B, S]` integer token ids.
          positions: `[B, S]`, `[1, S]` or `[S]` integer positions; None for `arange(S)`, or, with
            `segment_ids`, positions restarting at 0 at each segment start.
          segment_ids: optional `[B, S]` ids of packed sequences; tokens attend only
            within their segment.

        Returns:
          `[B, S, vocab_size]` float32 logits.
        """
        tokens = _checks.check_integer_array("tokens", tokens)
        _checks.check_rank("tokens", tokens, 2)
        _checks.check_index_range("tokens", tokens, self.config.vocab_size, "vocab_size")
        positions = self._positions(tokens, positions, segment_ids)
        x = self.token_embedding(tokens) * math.sqrt(self.config.d_model)
        for name in self.input_embedding_names:
            x = x + getattr(self, name)(positions).astype(x.dtype)
        if self.config.scan_layers:
            x, _ = self.layers(x, positions, segment_ids)
        else:
            for layer in self.layers:
                x = layer(x, positions, segment_ids)
        x = self.final_norm(x)
        tied = self.config.tie_embeddings
        logits = self.token_embedding.attend(x) if tied else self.unembed(x)
        expected = (*tokens.shape, self.config.vocab_size)
        if logits.shape != expected:
            raise AssertionError(f"logits have shape {logits.shape}, expected {expected}")
        return logits.astype(jnp.float32)
