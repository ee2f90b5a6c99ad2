"""Context-extension scalings of rotary embeddings: frozen specs and their frequency maths.

Every scaling changes only the inverse frequencies `theta_i` (radians per position, one
per rotated pair, `i` in `[0, rotary_dim/2)`) and possibly a multiplier of cos and sin
(`attention_factor`); the rotation itself is the same for all of them. Field names
follow the keys of the `rope_parameters` / `rope_scaling` dicts in model configs, so
`from_hf_rope_parameters` maps such a dict to a spec one to one.

The specs are frozen dataclasses (hashable, usable as static arguments and module
fields) and every method is a pure function of the spec, the rotary width, the base and,
for the two length-dependent scalings, the current sequence length `seq_len`: nothing
is cached between calls, so a long sequence never leaks its frequencies into a later
short one (the classic bug of a dynamic-NTK cache that is never reset).

Static frequencies are computed on the host in float64 and returned as NumPy arrays,
which keeps rotation angles on the exact path of `jax_posenc._angles`. Only a *traced*
`seq_len` (inside `jit`) makes `DynamicNTKScaling` and `LongRopeScaling` return a traced
float32 array; the angles then use the plain float32 product `position * theta`
(about 0.06 rad off at position 1e6). Pass `seq_len` as a Python int to keep exact angles.

References:
  Chen et al., 2023, Extending Context Window of Large Language Models via Positional
    Interpolation (linear scaling).
  bloc97, 2023, NTK-Aware Scaled RoPE (static NTK-aware base change), and its dynamic
    variant by emozilla; both written out in Peng et al., 2023, section 3.
  Peng et al., 2023, YaRN: Efficient Context Window Extension of Large Language Models.
  Meta, 2024, The Llama 3 Herd of Models (Llama 3 frequency scaling).
  Ding et al., 2024, LongRoPE: Extending LLM Context Window Beyond 2 Million Tokens.
  Gemma 4 (Google DeepMind), proportional RoPE ("p-RoPE"), as written in transformers'
    `_compute_proportional_rope_parameters`: a fraction of the bands rotate.

Where Hugging Face transformers' code (`modeling_rope_utils.py`) and its docstrings
disagree, the specs follow the code, which the checkpoints ran with; each such case is
named in the class docstring.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jax_posenc import _checks
from jax_posenc._angles import default_frequencies as _default_frequencies

SeqLen = int | jax.Array | None


def default_frequencies(rotary_dim: int, base: float) -> np.ndarray:
    """Su et al. (2021) inverse frequencies `base^(-2i/rotary_dim)`, float64, `[rotary_dim/2]`."""
    return _default_frequencies(rotary_dim, base, name="rotary_dim")


class RopeScaling(Protocol):
    """What a RoPE scaling is: an open protocol, so a user's own scaling works everywhere
    a built-in one does (`apply_rope`, `RotaryEmbedding`, the registry, the model).

    A scaling is a hashable (frozen) object, so it can be a static argument of `jit` and
    a module field, with:

    * `frequencies(rotary_dim, base, seq_len=None) -> (inv_freq, attention_factor)`:
      `inv_freq` `[rotary_dim / 2]` (a float64 NumPy array when static, which keeps the
      angles exact; a traced float32 array when it depends on a traced `seq_len`) and
      the multiplier of cos and sin;
    * `depends_on_seq_len`: whether `frequencies` reads `seq_len` (then RoPE derives it
      from the positions when it is not given).

    Built-in scalings also carry `rope_type`, the Hugging Face `rope_type` they read,
    and `hf_required`, the keys that config dicts must hold; `register_scaling` adds a
    user's class to the table `from_hf_rope_parameters` reads.
    """

    depends_on_seq_len: bool

    def frequencies(
        self, rotary_dim: int, base: float, seq_len: SeqLen = None
    ) -> tuple[np.ndarray | jax.Array, float]: ...


def check_scaling(scaling: object) -> None:
    """Raises TypeError unless `scaling` is None or follows the `RopeScaling` protocol."""
    if scaling is None:
        return
    problems = []
    if not callable(getattr(scaling, "frequencies", None)):
        problems.append("a frequencies(rotary_dim, base, seq_len) method")
    if not isinstance(getattr(scaling, "depends_on_seq_len", None), bool):
        problems.append("a bool depends_on_seq_len attribute")
    try:
        hash(scaling)
    except TypeError:
        problems.append("to be hashable (a frozen dataclass)")
    if problems:
        raise TypeError(
            f"scaling must be None or a RopeScaling, which needs {' and '.join(problems)}; "
            f"got {scaling!r} (convert a config dict with from_hf_rope_parameters)"
        )


def _check_optional_positive_float(name: str, value: object) -> float | None:
    return None if value is None else _checks.check_positive_float(name, value)


def _check_nonnegative_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _check_ntk_dim(rotary_dim: int, scaling: object) -> None:
    # The NTK exponent rotary_dim / (rotary_dim - 2) is undefined for a single pair.
    if rotary_dim <= 2:
        raise ValueError(
            f"{type(scaling).__name__} needs rotary_dim > 2 (its base exponent is "
            f"rotary_dim / (rotary_dim - 2)), got rotary_dim={rotary_dim}"
        )


def _set(spec: object, name: str, value: object) -> None:
    object.__setattr__(spec, name, value)


@dataclasses.dataclass(frozen=True)
class LinearScaling:
    """Position interpolation (Chen et al., 2023): `theta_i / factor` for every pair.

    Equivalent to dividing every position by `factor`.
    """

    factor: float

    rope_type: ClassVar[str | None] = "linear"
    hf_required: ClassVar[frozenset[str]] = frozenset({"factor"})
    depends_on_seq_len: ClassVar[bool] = False

    def __post_init__(self):
        _set(self, "factor", _checks.check_positive_float("factor", self.factor))

    def frequencies(self, rotary_dim: int, base: float, seq_len: SeqLen = None):
        """Returns `(inv_freq [rotary_dim/2] float64, attention_factor)`."""
        return default_frequencies(rotary_dim, base) / self.factor, 1.0


@dataclasses.dataclass(frozen=True)
class NTKScaling:
    """Static NTK-aware scaling (bloc97, 2023; Peng et al., 2023, eq. 16).

    The base is enlarged to `base * factor^(d / (d - 2))` with `d = rotary_dim`, so the
    lowest frequency is interpolated by `factor` while the highest is unchanged.
    """

    factor: float

    # No Hugging Face rope_type: the static NTK base change is not a config option there.
    rope_type: ClassVar[str | None] = None
    hf_required: ClassVar[frozenset[str]] = frozenset()
    depends_on_seq_len: ClassVar[bool] = False

    def __post_init__(self):
        _set(self, "factor", _checks.check_positive_float("factor", self.factor))

    def frequencies(self, rotary_dim: int, base: float, seq_len: SeqLen = None):
        """Returns `(inv_freq [rotary_dim/2] float64, attention_factor)`."""
        plain = default_frequencies(rotary_dim, base)
        _check_ntk_dim(rotary_dim, self)
        return plain * self.factor ** (-np.arange(0, rotary_dim, 2) / (rotary_dim - 2)), 1.0


@dataclasses.dataclass(frozen=True)
class DynamicNTKScaling:
    """Dynamic NTK-aware scaling: the NTK base change sized to the current length.

    With `L = max(seq_len, L0)` and `L0 = original_max_position_embeddings`, the base
    becomes `base * (factor * L / L0 - (factor - 1))^(d / (d - 2))`. At or below `L0`
    this is plain RoPE. The frequencies are recomputed from `seq_len` on every call;
    keys cached during decoding were rotated with the frequencies of *their* call, so a
    cache must be re-rotated whenever `seq_len` crosses `L0` or grows past it.

    From a config dict (`from_hf_rope_parameters`), `L0` is the config's
    `max_position_embeddings`, as in transformers' code, which ignores an
    `original_max_position_embeddings` key for this type although its docstring
    mentions one.
    """

    factor: float
    original_max_position_embeddings: int

    rope_type: ClassVar[str | None] = "dynamic"
    hf_required: ClassVar[frozenset[str]] = frozenset({"factor"})
    depends_on_seq_len: ClassVar[bool] = True

    def __post_init__(self):
        _set(self, "factor", _checks.check_positive_float("factor", self.factor))
        _set(
            self,
            "original_max_position_embeddings",
            _checks.check_positive_int(
                "original_max_position_embeddings", self.original_max_position_embeddings
            ),
        )

    def frequencies(self, rotary_dim: int, base: float, seq_len: SeqLen = None):
        """Returns `(inv_freq [rotary_dim/2], attention_factor)`; traced if `seq_len` is."""
        plain = default_frequencies(rotary_dim, base)
        _check_ntk_dim(rotary_dim, self)
        original = self.original_max_position_embeddings
        # base'^(-2i/d) = base^(-2i/d) * ratio^(-2i/(d-2)), ratio = factor*L/L0 - factor + 1.
        exponents = -np.arange(0, rotary_dim, 2) / (rotary_dim - 2)
        if seq_len is None or _checks.is_concrete(seq_len):
            # Exactly plain RoPE up to L0 (the formula's ratio is 1 only up to rounding).
            if seq_len is None or int(seq_len) <= original:
                return plain, 1.0
            ratio = self.factor * int(seq_len) / original - (self.factor - 1.0)
            return plain * ratio**exponents, 1.0
        length = jnp.asarray(seq_len, jnp.float32)
        ratio = jnp.where(
            length > original, self.factor * length / original - (self.factor - 1.0), 1.0
        )
        return jnp.asarray(plain, jnp.float32) * ratio ** jnp.asarray(exponents, jnp.float32), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """sqrt(1/t) = 0.1 * mscale * ln(s) + 1 for s > 1 (Peng et al., 2023, eq. 22)."""
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN (Peng et al., 2023): NTK-by-parts interpolation plus attention temperature.

    With `s = factor`, `L0 = original_max_position_embeddings` and `d = rotary_dim`,
    pair `i` makes `r_i = L0 * theta_i / (2 pi)` turns over the original context. Pairs
    turning more than `beta_fast` times keep `theta_i`, pairs turning fewer than
    `beta_slow` times are interpolated to `theta_i / s`, and a linear ramp over the pair
    index joins the two: the ramp runs between the (fractional) indices where
    `r_i = beta_fast` and `r_i = beta_slow`, rounded outwards (floor, ceil) when
    `truncate` is True, as in the authors' reference code.

    `attention_factor` multiplies cos and sin, so it scales both q and k and the logits
    by its square (the paper's `1/t`). It is used as given when set; otherwise it is
    `0.1 ln(s) + 1` (paper eq. 22), or, when both `mscale` and `mscale_all_dim` are set
    and non-zero, `mscale(s, mscale) / mscale(s, mscale_all_dim)` with
    `mscale(s, m) = 0.1 m ln(s) + 1` (the DeepSeek-V2 form; HF transformers uses the same
    rule, including ignoring a lone `mscale`). It is applied exactly once.

    DeepSeek-V2/V3 also multiply their softmax scale by `mscale(s, mscale_all_dim)^2`
    (`softmax_scale()`, read by `RopeSpec.attention_scale`); that factor is not part of
    cos and sin.

    Config dicts of Yarn-Mistral hold a `finetuned` flag; it only changes the authors'
    *dynamic* YaRN variant, so static YaRN accepts it and ignores it.
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    rope_type: ClassVar[str | None] = "yarn"
    hf_required: ClassVar[frozenset[str]] = frozenset({"factor"})
    hf_ignored: ClassVar[frozenset[str]] = frozenset({"finetuned"})
    depends_on_seq_len: ClassVar[bool] = False

    def __post_init__(self):
        _set(self, "factor", _checks.check_positive_float("factor", self.factor))
        _set(
            self,
            "original_max_position_embeddings",
            _checks.check_positive_int(
                "original_max_position_embeddings", self.original_max_position_embeddings
            ),
        )
        _set(self, "beta_fast", _checks.check_positive_float("beta_fast", self.beta_fast))
        _set(self, "beta_slow", _checks.check_positive_float("beta_slow", self.beta_slow))
        if self.beta_fast <= self.beta_slow:
            raise ValueError(
                f"beta_fast must be greater than beta_slow, got beta_fast={self.beta_fast} "
                f"and beta_slow={self.beta_slow}"
            )
        for name in ("mscale", "mscale_all_dim"):
            value = getattr(self, name)
            if value is not None:
                _set(self, name, _check_nonnegative_float(name, value))
        _set(
            self,
            "attention_factor",
            _check_optional_positive_float("attention_factor", self.attention_factor),
        )
        if not isinstance(self.truncate, bool):
            raise TypeError(f"truncate must be a bool, got {self.truncate!r}")

    def resolved_attention_factor(self) -> float:
        """The multiplier of cos and sin (see the class docstring)."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(
                self.factor, self.mscale_all_dim
            )
        return _yarn_mscale(self.factor)

    def softmax_scale(self) -> float:
        """DeepSeek-V2/V3's factor of the softmax scale: `mscale(s, mscale_all_dim)^2`
        when `mscale_all_dim` is set and non-zero, else 1.0."""
        if not self.mscale_all_dim:
            return 1.0
        return _yarn_mscale(self.factor, self.mscale_all_dim) ** 2

    def ramp_bounds(self, rotary_dim: int, base: float) -> tuple[float, float]:
        """Pair indices where the ramp from `theta_i` to `theta_i / factor` starts and ends."""
        if base <= 1.0:
            raise ValueError(f"YarnScaling needs base > 1, got base={base}")
        original = self.original_max_position_embeddings

        def index_of_turns(turns: float) -> float:
            # Solves L0 * base^(-2i/d) / (2 pi) = turns for i.
            return rotary_dim * math.log(original / (2.0 * math.pi * turns)) / (2 * math.log(base))

        low, high = index_of_turns(self.beta_fast), index_of_turns(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        return max(low, 0), min(high, rotary_dim - 1)

    def frequencies(self, rotary_dim: int, base: float, seq_len: SeqLen = None):
        """Returns `(inv_freq [rotary_dim/2] float64, attention_factor)`."""
        plain = default_frequencies(rotary_dim, base)
        low, high = self.ramp_bounds(rotary_dim, base)
        # The authors' code widens an empty ramp to 0.001 so it becomes a step.
        width = max(high - low, 1e-3)
        interpolated = np.clip((np.arange(rotary_dim // 2) - low) / width, 0.0, 1.0)
        inv_freq = plain * (1.0 - interpolated) + plain / self.factor * interpolated
        return inv_freq, self.resolved_attention_factor()


@dataclasses.dataclass(frozen=True)
class Llama3Scaling:
    """Llama 3.1 frequency scaling (Meta, 2024).

    With wavelength `lambda_i = 2 pi / theta_i` and `L0 = original_max_position_embeddings`:
    pairs with `lambda_i < L0 / high_freq_factor` keep `theta_i`, pairs with
    `lambda_i > L0 / low_freq_factor` get `theta_i / factor`, and in between
    `(1 - g) theta_i / factor + g theta_i` with
    `g = (L0 / lambda_i - low_freq_factor) / (high_freq_factor - low_freq_factor)`.
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    rope_type: ClassVar[str | None] = "llama3"
    hf_required: ClassVar[frozenset[str]] = frozenset(
        {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    )
    depends_on_seq_len: ClassVar[bool] = False

    def __post_init__(self):
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            _set(self, name, _checks.check_positive_float(name, getattr(self, name)))
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                "high_freq_factor must be greater than low_freq_factor, got "
                f"high_freq_factor={self.high_freq_factor} and "
                f"low_freq_factor={self.low_freq_factor}"
            )
        _set(
            self,
            "original_max_position_embeddings",
            _checks.check_positive_int(
                "original_max_position_embeddings", self.original_max_position_embeddings
            ),
        )

    def frequencies(self, rotary_dim: int, base: float, seq_len: SeqLen = None):
        """Returns `(inv_freq [rotary_dim/2] float64, attention_factor)`."""
        plain = default_frequencies(rotary_dim, base)
        turns_in_context = self.original_max_position_embeddings * plain / (2.0 * np.pi)
        blend = (turns_in_context - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        blend = np.clip(blend, 0.0, 1.0)
        return (1.0 - blend) * plain / self.factor + blend * plain, 1.0


def _factor_tuple(name: str, values: object) -> tuple[float, ...]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise TypeError(f"{name} must be a sequence of numbers, got {values!r}")
    result = tuple(_checks.check_positive_float(f"{name}[{i}]", v) for i, v in enumerate(values))
    if not result:
        raise ValueError(f"{name} must not be empty")
    return result


@dataclasses.dataclass(frozen=True)
class LongRopeScaling:
    """LongRoPE (Ding et al., 2024): searched per-pair rescale factors, short and long.

    `theta_i / short_factor[i]` while the sequence fits the original context and
    `theta_i / long_factor[i]` once `seq_len > original_max_position_embeddings`
    (strictly greater; `seq_len=None` means short). Both lists hold `rotary_dim / 2`
    factors (stored as tuples so the spec stays hashable).

    `attention_factor` multiplies cos and sin. When None it is derived from `factor`
    (the context extension ratio, e.g. `max_position_embeddings / L0`) as
    `sqrt(1 + ln(factor) / ln(L0))`, and 1.0 when `factor` is None or <= 1.
    Phi-3-small's configs give the multiplier per regime instead, as `short_mscale` and
    `long_mscale` (its model code scales cos and sin by the one of the current regime);
    either replaces the derived value in its regime.

    From a config dict (`from_hf_rope_parameters`), an explicit `factor` key is kept
    for the attention factor, as in transformers' code; only without one is `factor`
    `max_position_embeddings / L0` (its docstring says the ratio always wins).

    Switching from short to long factors changes every rotation: keys cached while the
    sequence was short were rotated with the short factors and must be re-rotated with
    the long ones when the switch happens (recompute the cache from the unrotated keys).
    """

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    attention_factor: float | None = None
    factor: float | None = None
    short_mscale: float | None = None
    long_mscale: float | None = None

    rope_type: ClassVar[str | None] = "longrope"
    hf_required: ClassVar[frozenset[str]] = frozenset({"short_factor", "long_factor"})
    depends_on_seq_len: ClassVar[bool] = True

    def __post_init__(self):
        _set(self, "short_factor", _factor_tuple("short_factor", self.short_factor))
        _set(self, "long_factor", _factor_tuple("long_factor", self.long_factor))
        if len(self.short_factor) != len(self.long_factor):
            raise ValueError(
                "short_factor and long_factor must have the same length, got "
                f"{len(self.short_factor)} and {len(self.long_factor)}"
            )
        _set(
            self,
            "original_max_position_embeddings",
            _checks.check_positive_int(
                "original_max_position_embeddings", self.original_max_position_embeddings
            ),
        )
        for name in ("attention_factor", "factor", "short_mscale", "long_mscale"):
            _set(self, name, _check_optional_positive_float(name, getattr(self, name)))
        per_regime = self.short_mscale is not None or self.long_mscale is not None
        if per_regime and self.attention_factor is not None:
            raise ValueError(
                "give either attention_factor or short_mscale / long_mscale, not both, got "
                f"attention_factor={self.attention_factor}, short_mscale={self.short_mscale}, "
                f"long_mscale={self.long_mscale}"
            )

    def resolved_attention_factor(self) -> float:
        """The multiplier of cos and sin derived from `attention_factor` / `factor` (see
        the class docstring); `short_mscale` / `long_mscale` replace it per regime."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.factor is None or self.factor <= 1.0:
            return 1.0
        original = self.original_max_position_embeddings
        return math.sqrt(1.0 + math.log(self.factor) / math.log(original))

    def regime_attention_factors(self) -> tuple[float, float]:
        """`(short, long)`: the multiplier of cos and sin in each regime."""
        derived = self.resolved_attention_factor()
        short = derived if self.short_mscale is None else self.short_mscale
        long = derived if self.long_mscale is None else self.long_mscale
        return short, long

    def frequencies(self, rotary_dim: int, base: float, seq_len: SeqLen = None):
        """Returns `(inv_freq [rotary_dim/2], attention_factor)`; traced if `seq_len` is."""
        plain = default_frequencies(rotary_dim, base)
        if len(self.short_factor) != rotary_dim // 2:
            raise ValueError(
                f"short_factor and long_factor must hold rotary_dim / 2 = {rotary_dim // 2} "
                f"factors, got {len(self.short_factor)}"
            )
        short = plain / np.asarray(self.short_factor)
        long = plain / np.asarray(self.long_factor)
        short_scale, long_scale = self.regime_attention_factors()
        original = self.original_max_position_embeddings
        if seq_len is None or _checks.is_concrete(seq_len):
            if seq_len is not None and int(seq_len) > original:
                return long, long_scale
            return short, short_scale
        is_long = jnp.asarray(seq_len) > original
        inv_freq = jnp.where(
            is_long, jnp.asarray(long, jnp.float32), jnp.asarray(short, jnp.float32)
        )
        if short_scale == long_scale:
            return inv_freq, short_scale
        return inv_freq, jnp.where(is_long, jnp.float32(long_scale), jnp.float32(short_scale))


@dataclasses.dataclass(frozen=True)
class ProportionalScaling:
    """Proportional RoPE (p-RoPE) of Gemma 4: only a fraction of the bands rotate.

    With `d = rotary_dim` (the whole head: cos and sin span every feature) and
    `k = floor(partial_rotary_factor * d / 2)`, pairs `i < k` get
    `base^(-2i/d) / factor` and the other `d/2 - k` pairs frequency 0, so they pass
    through unrotated. Unlike partial rotary (`rotary_dim < head_dim`), the exponent keeps
    the full width `d` and the "half" layout pairs feature `i` with `i + d/2`, so the
    unrotated features sit at the end of *each* half. `partial_rotary_factor=0` is NoPE.

    This follows transformers' `_compute_proportional_rope_parameters`.
    """

    partial_rotary_factor: float = 1.0
    factor: float = 1.0

    rope_type: ClassVar[str | None] = "proportional"
    hf_required: ClassVar[frozenset[str]] = frozenset()
    depends_on_seq_len: ClassVar[bool] = False

    def __post_init__(self):
        fraction = _check_nonnegative_float("partial_rotary_factor", self.partial_rotary_factor)
        if fraction > 1.0:
            raise ValueError(f"partial_rotary_factor must be <= 1, got {fraction}")
        _set(self, "partial_rotary_factor", fraction)
        _set(self, "factor", _checks.check_positive_float("factor", self.factor))

    def rotated_pairs(self, rotary_dim: int) -> int:
        """How many of the `rotary_dim / 2` pairs rotate."""
        return int(self.partial_rotary_factor * rotary_dim // 2)

    def frequencies(self, rotary_dim: int, base: float, seq_len: SeqLen = None):
        """Returns `(inv_freq [rotary_dim/2] float64, attention_factor)`."""
        inv_freq = default_frequencies(rotary_dim, base)
        inv_freq[self.rotated_pairs(rotary_dim) :] = 0.0
        return inv_freq / self.factor, 1.0


SCALING_TYPES = (
    LinearScaling,
    NTKScaling,
    DynamicNTKScaling,
    YarnScaling,
    Llama3Scaling,
    LongRopeScaling,
    ProportionalScaling,
)

# ------------------------------------------------------------------ HF config dicts

_COMMON_KEYS = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})
# rope_type -> scaling class; "default" is plain RoPE. The keys a dict may hold are the
# class's dataclass fields, of which `hf_required` must be present.
_HF_TYPES: dict[str, type | None] = {"default": None}


def register_scaling(cls: type) -> type:
    """Adds a scaling class to the table of `from_hf_rope_parameters` under its
    `rope_type`; its dataclass fields are the keys a config dict may hold and
    `hf_required` those it must. Usable as a class decorator."""
    rope_type = getattr(cls, "rope_type", None)
    if not isinstance(rope_type, str) or not dataclasses.is_dataclass(cls):
        raise TypeError(f"register_scaling needs a dataclass with a str rope_type, got {cls!r}")
    if rope_type in _HF_TYPES and _HF_TYPES[rope_type] is not cls:
        raise ValueError(f"rope_type {rope_type!r} is already registered")
    _HF_TYPES[rope_type] = cls
    return cls


def _hf_keys(cls: type | None) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(required, optional, ignored) config keys of a registered scaling class."""
    if cls is None:
        return frozenset(), frozenset(), frozenset()
    names = frozenset(field.name for field in dataclasses.fields(cls))
    return cls.hf_required, names - cls.hf_required, getattr(cls, "hf_ignored", frozenset())


for _cls in SCALING_TYPES:
    if _cls.rope_type is not None:
        register_scaling(_cls)
# Legacy names found in published configs.
_HF_ALIASES = {"su": "longrope"}


def hf_rope_type(params: Mapping[str, Any]) -> str:
    """The registered `rope_type` a config dict names (`rope_type`, or legacy `type`)."""
    given = {key: params[key] for key in ("rope_type", "type") if params.get(key) is not None}
    if not given:
        raise ValueError(f"rope parameters need a 'rope_type' (or legacy 'type') key, got {params}")
    if len(set(given.values())) > 1:
        raise ValueError(f"'rope_type' and 'type' disagree in rope parameters {params}")
    rope_type = next(iter(given.values()))
    rope_type = _HF_ALIASES.get(rope_type, rope_type)
    if rope_type not in _HF_TYPES:
        raise ValueError(
            f"unknown rope_type {rope_type!r}; supported: {', '.join(sorted(_HF_TYPES))} "
            "(multi-axis 'mrope' sections go to apply_multi_axis_rope or RopeSpec)"
        )
    return rope_type


def hf_accepted_keys(rope_type: str) -> frozenset[str]:
    """Every key a config dict of `rope_type` may hold (used or deliberately ignored)."""
    required, optional, ignored = _hf_keys(_HF_TYPES[rope_type])
    return required | optional | ignored | _COMMON_KEYS


def from_hf_rope_parameters(
    params: Mapping[str, Any],
    *,
    max_position_embeddings: int | None = None,
    original_max_position_embeddings: int | None = None,
) -> RopeScaling | None:
    """Maps a `rope_parameters` / `rope_scaling` dict of a model config to a scaling spec.

    Accepts the keys the config format defines for each `rope_type` (or legacy `type`;
    "su" is read as "longrope") and rejects any other key, so a misspelt or unsupported
    setting raises instead of being ignored. `rope_theta` and `partial_rotary_factor`
    may be present (newer configs put them in this dict); they are validated but are not
    part of the scaling (except for "proportional", whose fraction of rotating bands it
    is): pass them as `base=` and `rotary_dim=` yourself, or read the whole config with
    `RopeSpec.from_hf_config`. Keys a type ignores on purpose (YaRN's `finetuned`) are
    accepted and dropped.

    Where transformers' code and its docstrings disagree, this follows the code:

    * `original_max_position_embeddings` is read from the dict, else from the keyword of
      that name (older configs keep it at the top level, e.g. Phi-3), else it falls back
      to `max_position_embeddings`.
    * "dynamic": `max_position_embeddings`, when given, is the original length `L0`; an
      `original_max_position_embeddings` key or keyword is then not used.
    * "longrope": a `factor` key is kept; without one, `factor` is
      `max_position_embeddings / original_max_position_embeddings` (the Phi-3 rule).

    Args:
      params: the dict, e.g. `{"rope_type": "yarn", "factor": 4.0,
        "original_max_position_embeddings": 32768}`.
      max_position_embeddings: the config's top-level `max_position_embeddings`.
      original_max_position_embeddings: the config's top-level value of that name.

    Returns:
      A scaling spec, or None for `rope_type="default"` (plain RoPE).
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping (a config dict), got {params!r}")
    rope_type = hf_rope_type(params)
    spec_type = _HF_TYPES[rope_type]
    required, optional, _ = _hf_keys(spec_type)
    accepted = hf_accepted_keys(rope_type)
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(
            f"keys {unknown} are not understood for rope_type {rope_type!r}; it accepts "
            f"{sorted(accepted)}"
        )
    missing = sorted(key for key in required if params.get(key) is None)
    if missing:
        raise ValueError(f"rope_type {rope_type!r} needs keys {missing}, got {dict(params)}")
    if params.get("rope_theta") is not None:
        _checks.check_positive_float("rope_theta", params["rope_theta"])
    if params.get("partial_rotary_factor") is not None:
        fraction = _checks.check_positive_float(
            "partial_rotary_factor", params["partial_rotary_factor"]
        )
        if fraction > 1.0:
            raise ValueError(f"partial_rotary_factor must be <= 1, got {fraction}")
    if spec_type is None:
        return None

    fields = {key: params[key] for key in required | optional if params.get(key) is not None}
    if "original_max_position_embeddings" in optional:
        if spec_type is DynamicNTKScaling and max_position_embeddings is not None:
            original = max_position_embeddings
        else:
            original = fields.get(
                "original_max_position_embeddings",
                original_max_position_embeddings or max_position_embeddings,
            )
        if original is None:
            raise ValueError(
                f"rope_type {rope_type!r} needs original_max_position_embeddings: put it in "
                "the dict or pass original_max_position_embeddings= or max_position_embeddings="
            )
        fields["original_max_position_embeddings"] = original
    if (
        spec_type is LongRopeScaling
        and "factor" not in fields
        and max_position_embeddings is not None
    ):
        fields["factor"] = max_position_embeddings / fields["original_max_position_embeddings"]
    return spec_type(**fields)
