"""RoPE exactly as a checkpoint's config sets it up: `RopeSpec` and `from_hf_config`.

A model's rotary embedding is fixed by a handful of config fields spread over the whole
`config.json`: the base (`rope_theta`, GPT-NeoX's `rotary_emb_base`), the head size
(`head_dim`, or `hidden_size / num_attention_heads`, or DeepSeek's `qk_rope_head_dim`,
or Gemma 4's `global_head_dim` on full-attention layers), how much of each head rotates
(`partial_rotary_factor`, GPT-NeoX's `rotary_pct`, GPT-J's and MiniMax's `rotary_dim`),
the pairing of features (DeepSeek's `rope_interleave`, else the model's own code), the
context-extension scaling (`rope_scaling` in transformers v4 configs, `rope_parameters`
in v5, possibly one dict per layer type) and multi-axis sections (`mrope_section`,
interleaved in Qwen3-VL). `RopeSpec.from_hf_config` reads them all from the dict as it
is and returns one frozen, hashable `RopeSpec` that rotates queries and keys exactly as
the checkpoint was trained.

References:
  Su et al., 2021, RoFormer (RoPE); the scalings of `jax_posenc.rope_scaling`.
  Wang et al., 2024, Qwen2-VL (M-RoPE); Qwen Team, 2025, Qwen3-VL (interleaved M-RoPE).
  DeepSeek-AI, 2024, DeepSeek-V2 (YaRN with `mscale`, softmax scale `mscale^2`).
"""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jax_posenc import _checks, rope, rope_scaling
from jax_posenc.rope_scaling import RopeScaling, SeqLen

# Model types whose own code rotates adjacent pairs (2i, 2i + 1) although their configs
# have no key saying so (GPT-J's `rotate_every_two`, the complex-number rotation of
# DeepSeek-V2/V3 and Llama 4). Every other model pairs i with i + rotary_dim/2.
INTERLEAVED_MODEL_TYPES = frozenset({"gptj", "deepseek_v2", "deepseek_v3", "llama4", "llama4_text"})
# rope types whose original length transformers takes from the top level of a config when
# it is there (`standardize_rope_params`: "give priority to the top-level value").
_TOP_LEVEL_ORIGINAL = frozenset({"llama3", "yarn", "longrope"})
_MROPE_KEYS = ("mrope_section", "mrope_interleaved")
_GEMMA3_LAYER_TYPES = frozenset({"sliding_attention", "full_attention"})


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """Everything that fixes one layer's rotary embedding; frozen and hashable.

    Attributes:
      head_dim: features per head that the rotation acts on (for DeepSeek's MLA, the
        `qk_rope_head_dim` part of each head).
      base: wavelength base (`rope_theta`).
      rotary_dim: rotated features per head, even and `<= head_dim`; None means all
        (stored resolved). The features from `rotary_dim` on pass through unchanged.
      layout: "half" (feature i pairs with i + rotary_dim/2) or "interleaved" (2i, 2i + 1).
      scaling: a `jax_posenc.rope_scaling` spec (any `RopeScaling`), or None.
      mrope_section: bands per position axis for multi-axis RoPE (M-RoPE), summing to
        `rotary_dim / 2`; None for one position axis.
      mrope_interleaved: Qwen3-VL's interleaved assignment of bands to axes.
      angle_precision: "exact" or "float32" (see `jax_posenc.rope_cos_sin`).
    """

    head_dim: int
    base: float = 10000.0
    rotary_dim: int | None = None
    layout: str = "half"
    scaling: RopeScaling | None = None
    mrope_section: tuple[int, ...] | None = None
    mrope_interleaved: bool = False
    angle_precision: str = "exact"

    def __post_init__(self):
        head_dim = _checks.check_positive_int("head_dim", self.head_dim)
        object.__setattr__(self, "head_dim", head_dim)
        object.__setattr__(self, "base", _checks.check_positive_float("base", self.base))
        rotary_dim = head_dim if self.rotary_dim is None else self.rotary_dim
        rotary_dim = _checks.check_even_positive_int("rotary_dim", rotary_dim)
        if rotary_dim > head_dim:
            raise ValueError(
                f"rotary_dim must be <= head_dim, got rotary_dim={rotary_dim} and "
                f"head_dim={head_dim}"
            )
        object.__setattr__(self, "rotary_dim", rotary_dim)
        _checks.check_choice("layout", self.layout, rope.ROPE_LAYOUTS)
        rope_scaling.check_scaling(self.scaling)
        _checks.check_choice("angle_precision", self.angle_precision, ("exact", "float32"))
        if not isinstance(self.mrope_interleaved, bool):
            raise TypeError(f"mrope_interleaved must be a bool, got {self.mrope_interleaved!r}")
        if self.mrope_section is None:
            if self.mrope_interleaved:
                raise ValueError("mrope_interleaved=True needs an mrope_section")
            return
        section = tuple(self.mrope_section)
        rope.multi_axis_band_axes(section, interleaved=self.mrope_interleaved)
        if sum(section) != rotary_dim // 2:
            raise ValueError(
                f"mrope_section {section} must sum to rotary_dim / 2 = {rotary_dim // 2}, "
                f"got {sum(section)}"
            )
        object.__setattr__(self, "mrope_section", section)

    # ---------------------------------------------------------------- the rotation

    @property
    def attention_scale(self) -> float:
        """The factor that multiplies the model's softmax scale `1/sqrt(d)`.

        DeepSeek-V2/V3 with YaRN and a non-zero `mscale_all_dim` multiply it by
        `mscale(factor, mscale_all_dim)^2`, `mscale(s, m) = 0.1 m ln(s) + 1` (their
        `softmax_scale`; `d` is their full query-key head size, nope and rope parts);
        every other spec leaves it alone (1.0). A scaling contributes this factor
        through an optional `softmax_scale()` method (`YarnScaling` has one). It is
        separate from the scaling's attention factor, which multiplies cos and sin.
        """
        softmax_scale = getattr(self.scaling, "softmax_scale", None)
        return 1.0 if softmax_scale is None else float(softmax_scale())

    def frequencies(self, seq_len: SeqLen = None) -> tuple[np.ndarray | jax.Array, float]:
        """`(inv_freq [rotary_dim/2], attention_factor)`, as `jax_posenc.rope_frequencies`."""
        return rope.rope_frequencies(
            self.rotary_dim, base=self.base, scaling=self.scaling, seq_len=seq_len
        )

    def _multi_axis(self, name: str, positions: jax.Array) -> bool:
        if np.ndim(positions) != 3:
            return False
        if self.mrope_section is None:
            raise ValueError(
                f"{name} of shape {np.shape(positions)} has one row per position axis, but this "
                "RopeSpec has no mrope_section (pass [seq] or [batch, seq])"
            )
        return True

    def _common(self) -> dict[str, Any]:
        return dict(
            base=self.base,
            rotary_dim=self.rotary_dim,
            layout=self.layout,
            scaling=self.scaling,
            angle_precision=self.angle_precision,
        )

    def _check_head(self, name: str, x: jax.Array) -> None:
        if np.shape(x)[-1] != self.head_dim:
            raise ValueError(
                f"{name} has {np.shape(x)[-1]} features per head but the spec's head_dim is "
                f"{self.head_dim} (shape {np.shape(x)})"
            )

    def apply(self, x: jax.Array, positions: jax.Array, *, seq_len: SeqLen = None) -> jax.Array:
        """Rotates queries or keys `x` `[B, S, H, head_dim]`.

        Args:
          x: `[B, S, H, head_dim]`.
          positions: `[S]` or `[B, S]`; with `mrope_section`, also `[n_axes, B, S]` (one
            row per axis; a text token has the same position on every axis, which is
            what `[S]` / `[B, S]` mean).
          seq_len: current length for length-dependent scalings (see `apply_rope`).

        Returns:
          `[B, S, H, head_dim]` of `x.dtype`.
        """
        self._check_head("x", x)
        if self._multi_axis("positions", positions):
            return rope.apply_multi_axis_rope(
                x,
                positions,
                self.mrope_section,
                interleaved=self.mrope_interleaved,
                **self._common(),
            )
        return rope.apply_rope(x, positions, seq_len=seq_len, **self._common())

    def apply_qk(
        self,
        q: jax.Array,
        k: jax.Array,
        positions: jax.Array,
        k_positions: jax.Array | None = None,
        *,
        seq_len: SeqLen = None,
    ) -> tuple[jax.Array, jax.Array]:
        """`(q, k)` rotated with one set of frequencies (see `apply_rope_qk`).

        `k_positions` defaults to `positions`; both follow the shapes of `apply`.
        """
        self._check_head("q", q)
        self._check_head("k", k)
        k_positions = positions if k_positions is None else k_positions
        multi = [
            self._multi_axis(n, p)
            for n, p in (("positions", positions), ("k_positions", k_positions))
        ]
        if any(multi):
            return self.apply(q, positions), self.apply(k, k_positions)
        return rope.apply_rope_qk(q, k, positions, k_positions, seq_len=seq_len, **self._common())

    # ---------------------------------------------------------------- HF configs

    @classmethod
    def from_hf_config(
        cls,
        config: Mapping[str, Any],
        *,
        layer_type: str | None = None,
        strict: bool = True,
    ) -> RopeSpec:
        """The `RopeSpec` of a Hugging Face `config.json` dict, read as it is.

        Reads (a multimodal config's `text_config` when it has one):

        * base: `rope_theta` inside the rope dict, else at the top level, else
          `rotary_emb_base` (GPT-NeoX), else 10000; Gemma 3's v4 configs give sliding
          layers `rope_local_base_freq` and plain RoPE.
        * head size: `global_head_dim` for `layer_type="full_attention"` (Gemma 4),
          else `qk_rope_head_dim` (DeepSeek MLA), else `head_dim`, else
          `hidden_size / num_attention_heads` (GPT-J: `n_embd / n_head`).
        * rotated width: `rotary_dim` (GPT-J, MiniMax), `rotary_pct` (GPT-NeoX) or
          `partial_rotary_factor` (top level or in the rope dict) times the head size,
          which must agree where several are given and be even. A "proportional" rope
          (Gemma 4 p-RoPE) always spans the head and rotates that fraction of its bands.
        * scaling: `rope_parameters` (v5) or `rope_scaling` (v4), through
          `from_hf_rope_parameters` with `max_position_embeddings` (GPT-J:
          `n_positions`) and the top-level `original_max_position_embeddings`, which
          transformers prefers to the dict's for llama3, yarn and longrope. A v5 dict
          with one entry per layer type needs `layer_type`.
        * layout: `rope_interleave` (DeepSeek), else interleaved for the model types
          of `INTERLEAVED_MODEL_TYPES`, else "half".
        * multi-axis: `mrope_section` and `mrope_interleaved` of the rope dict (a legacy
          `"type": "mrope"` is plain RoPE with sections).

        Args:
          config: the parsed `config.json`.
          layer_type: the layer type to read, e.g. "sliding_attention" or
            "full_attention" (Gemma 3 / 4); needed when the config sets RoPE per layer
            type, checked against `layer_types` when the config lists them.
          strict: raise on keys of the rope dict that are not understood; with False,
            warn and ignore them, as transformers does.

        Returns:
          The spec.

        Raises:
          ValueError: naming the key and the config field, for an unknown rope type,
            missing or contradictory keys, an `mrope_section` that does not sum to half
            the rotary width, or a rotary width that is odd.
        """
        return _read_config(cls, config, layer_type=layer_type, strict=strict)


# ------------------------------------------------------------------ reading a config


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _given(config: Mapping[str, Any], *keys: str) -> tuple[str, Any] | None:
    """The first of `keys` that the config sets (not null), with its value."""
    for key in keys:
        if config.get(key) is not None:
            return key, config[key]
    return None


def _not_understood(message: str, strict: bool) -> None:
    if strict:
        raise ValueError(f"{message} (pass strict=False to ignore them with a warning)")
    warnings.warn(message, UserWarning, stacklevel=4)


def _rope_dict(
    config: Mapping[str, Any], layer_type: str | None, strict: bool
) -> tuple[str, dict[str, Any]]:
    """`(where, params)`: the rope dict that applies to `layer_type`, copied."""
    fields = {key: config[key] for key in ("rope_parameters", "rope_scaling") if config.get(key)}
    for key, value in fields.items():
        if not isinstance(value, Mapping):
            raise TypeError(f"config[{key!r}] must be a dict, got {value!r}")
    if len(fields) == 2 and fields["rope_parameters"] != fields["rope_scaling"]:
        raise ValueError(
            "config has both 'rope_parameters' and 'rope_scaling' and they differ; "
            f"got {fields['rope_parameters']} and {fields['rope_scaling']}"
        )
    field = next(iter(fields), "rope_parameters")
    params = fields.get(field, {})
    layer_types = config.get("layer_types")
    listed = None if layer_types is None else sorted(set(layer_types))
    per_type = {key: value for key, value in params.items() if isinstance(value, Mapping)}
    if per_type:
        extra = sorted(
            key for key, value in params.items() if key not in per_type and value is not None
        )
        if extra:
            _not_understood(
                f"config[{field!r}] holds one dict per layer type and also keys {extra}, which "
                "are not used",
                strict,
            )
        if layer_type is None:
            raise ValueError(
                f"config[{field!r}] holds one rope dict per layer type {sorted(per_type)}; pass "
                "layer_type= one of them"
            )
        if layer_type not in per_type:
            raise ValueError(
                f"layer_type={layer_type!r} is not one of the layer types of config[{field!r}]: "
                f"{sorted(per_type)}"
            )
        return f"config[{field!r}][{layer_type!r}]", dict(per_type[layer_type])
    if layer_type is not None and listed is not None and layer_type not in listed:
        raise ValueError(f"layer_type={layer_type!r} is not one of config['layer_types']: {listed}")
    if config.get("rope_local_base_freq") is not None:
        # Gemma 3's v4 configs: sliding layers use plain RoPE with their own base.
        if layer_type is None:
            raise ValueError(
                "config sets 'rope_local_base_freq' for the sliding layers and 'rope_theta' / "
                f"config[{field!r}] for the others; pass layer_type='sliding_attention' or "
                "'full_attention'"
            )
        if layer_type not in _GEMMA3_LAYER_TYPES:
            raise ValueError(
                f"layer_type={layer_type!r} is not one of the layer types a config with "
                f"'rope_local_base_freq' sets: {sorted(_GEMMA3_LAYER_TYPES)}"
            )
        if layer_type == "sliding_attention":
            local = {"rope_type": "default", "rope_theta": config["rope_local_base_freq"]}
            return "config['rope_local_base_freq']", local
    return f"config[{field!r}]", dict(params)


def _head_dim(config: Mapping[str, Any], layer_type: str | None) -> int:
    keys = ("qk_rope_head_dim", "head_dim")
    if layer_type == "full_attention":
        keys = ("global_head_dim", *keys)
    found = _given(config, *keys)
    if found is not None:
        key, value = found
        return _checks.check_positive_int(f"config[{key!r}]", value)
    hidden = _given(config, "hidden_size", "n_embd", "d_model")
    heads = _given(config, "num_attention_heads", "n_head", "num_heads")
    if hidden is None or heads is None:
        raise ValueError(
            "config needs 'head_dim' or 'hidden_size' and 'num_attention_heads' (GPT-J: "
            "'n_embd' and 'n_head') to size the heads"
        )
    hidden_value = _checks.check_positive_int(f"config[{hidden[0]!r}]", hidden[1])
    heads_value = _checks.check_positive_int(f"config[{heads[0]!r}]", heads[1])
    if hidden_value % heads_value:
        raise ValueError(
            f"config[{hidden[0]!r}]={hidden_value} is not divisible by "
            f"config[{heads[0]!r}]={heads_value}"
        )
    return hidden_value // heads_value


def _partial_fraction(config: Mapping[str, Any], params: dict[str, Any], where: str):
    """`(source, fraction)` of `partial_rotary_factor`, or None; removed from `params`."""
    inner = params.pop("partial_rotary_factor", None)
    outer = config.get("partial_rotary_factor")
    if inner is not None and outer is not None and inner != outer:
        raise ValueError(
            f"config['partial_rotary_factor']={outer} and {where}"
            f"['partial_rotary_factor']={inner} disagree"
        )
    if inner is not None:
        return f"{where}['partial_rotary_factor']", inner
    if outer is not None:
        return "config['partial_rotary_factor']", outer
    return None


def _rotary_dim(config: Mapping[str, Any], head_dim: int, partial) -> int:
    """The rotated width from `rotary_dim`, `rotary_pct` and `partial_rotary_factor`."""
    widths = {}
    if config.get("rotary_dim") is not None:
        widths["config['rotary_dim']"] = _checks.check_positive_int(
            "config['rotary_dim']", config["rotary_dim"]
        )
    fractions = []
    if config.get("rotary_pct") is not None:
        fractions.append(("config['rotary_pct']", config["rotary_pct"]))
    if partial is not None:
        fractions.append(partial)
    for source, fraction in fractions:
        if not _is_number(fraction) or not 0.0 < fraction <= 1.0:
            raise ValueError(f"{source} must be a number in (0, 1], got {fraction!r}")
        # transformers: dim = int(head_dim * partial_rotary_factor).
        widths[source] = int(head_dim * fraction)
    if len(set(widths.values())) > 1:
        raise ValueError(f"the rotary width is given twice and disagrees: {widths}")
    if not widths:
        return head_dim
    source, width = next(iter(widths.items()))
    if width % 2 or width == 0:
        raise ValueError(
            f"{source} gives a rotary dim of {width} for head_dim={head_dim}, which is odd or "
            "zero; RoPE rotates pairs of features"
        )
    return width


def _layout(config: Mapping[str, Any]) -> str:
    interleave = config.get("rope_interleave")
    if interleave is not None:
        if not isinstance(interleave, bool):
            raise TypeError(f"config['rope_interleave'] must be a bool, got {interleave!r}")
        return "interleaved" if interleave else "half"
    return "interleaved" if config.get("model_type") in INTERLEAVED_MODEL_TYPES else "half"


def _read_config(
    cls: type[RopeSpec], config: Mapping[str, Any], *, layer_type: str | None, strict: bool
) -> RopeSpec:
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping (a parsed config.json), got {config!r}")
    if layer_type is not None and not isinstance(layer_type, str):
        raise TypeError(f"layer_type must be a string or None, got {layer_type!r}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {strict!r}")
    if isinstance(config.get("text_config"), Mapping):
        config = config["text_config"]

    where, params = _rope_dict(config, layer_type, strict)
    mrope = {key: params.pop(key) for key in _MROPE_KEYS if key in params}
    if params.get("type") == "mrope":  # Qwen2-VL's v4 configs: plain RoPE with sections.
        params["type"] = "default"
    if params.get("rope_type") is None and params.get("type") is None:
        params["rope_type"] = "default"
    try:
        rope_type = rope_scaling.hf_rope_type(params)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None

    theta = params.pop("rope_theta", None)
    if theta is None:
        found = _given(config, "rope_theta", "rotary_emb_base")
        theta = 10000.0 if found is None else found[1]
    base = _checks.check_positive_float(f"rope_theta of {where}", theta)

    head_dim = _head_dim(config, layer_type)
    partial = _partial_fraction(config, params, where)
    if rope_type == "proportional":
        rotary_dim = head_dim
        if partial is not None:
            params["partial_rotary_factor"] = partial[1]
    else:
        rotary_dim = _rotary_dim(config, head_dim, partial)

    unknown = sorted(set(params) - rope_scaling.hf_accepted_keys(rope_type))
    if unknown:
        _not_understood(
            f"{where} keys {unknown} are not understood for rope_type {rope_type!r}",
            strict,
        )
        for key in unknown:
            del params[key]
    top_original = config.get("original_max_position_embeddings")
    if rope_type in _TOP_LEVEL_ORIGINAL and top_original is not None:
        params["original_max_position_embeddings"] = top_original
    max_positions = _given(config, "max_position_embeddings", "n_positions")
    try:
        scaling = rope_scaling.from_hf_rope_parameters(
            params,
            max_position_embeddings=None if max_positions is None else max_positions[1],
            original_max_position_embeddings=top_original,
        )
    except (ValueError, TypeError) as error:
        raise type(error)(f"{where}: {error}") from None

    section = mrope.get("mrope_section")
    interleaved = mrope.get("mrope_interleaved") or False
    if section is not None:
        if isinstance(section, str) or not isinstance(section, Sequence):
            raise TypeError(f"{where}['mrope_section'] must be a list, got {section!r}")
        if sum(section) != rotary_dim // 2:
            raise ValueError(
                f"{where}['mrope_section'] {list(section)} sums to {sum(section)}, "
                f"but the rotary dim {rotary_dim} has {rotary_dim // 2} bands"
            )
    elif interleaved:
        raise ValueError(f"{where} sets 'mrope_interleaved' without 'mrope_section'")
    return cls(
        head_dim=head_dim,
        base=base,
        rotary_dim=rotary_dim,
        layout=_layout(config),
        scaling=scaling,
        mrope_section=None if section is None else tuple(section),
        mrope_interleaved=bool(interleaved),
    )
