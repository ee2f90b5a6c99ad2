"""The length-extrapolation study: train short, evaluate long, one model per encoding.

Two tasks, each training a small decoder-only `Transformer` per encoding and seed at
`train_len` tokens and scoring it at every length in `eval_lens` (by default 1x, 2x,
4x and 8x `train_len`):

* `task="lm"` (the default): byte-level language modelling of text (the Python
  standard library's source unless `corpus` names local files). Held-out loss and
  perplexity are measured in two modes over the same held-out bytes:
  `nonoverlapping` windows (each byte scored once, early bytes of a window see little
  context) and `sliding` windows `eval_stride` apart that score only their last
  `eval_stride` bytes, so every byte sees at least `length - eval_stride` bytes of
  context (`jax_posenc.data.sliding_windows`). Press et al. (2022) show that the
  apparent gains from longer windows largely disappear under sliding evaluation, so
  both are reported.
* `task="recall"`: associative recall (`jax_posenc.data.recall_batch`): a key-value
  pair stored once must be found again from its key, `distance` tokens later. Trained
  on the answers only, at `train_len`; scored as accuracy by evaluation length (stores
  anywhere) and by distance at the longest length. Perplexity cannot tell a model that
  uses far context from one that ignores it; this can.

Evaluation-only variants (`extend`, on by default): every trained model whose encoding
has a `rope` part is also scored, with the same parameters and no further training, as

* `<encoding> → selfextend (eval only)`: SelfExtend (Jin et al., 2024): keys within a
  neighbour window `w = train_len // 2` of the query keep their exact positions,
  farther ones are seen at grouped positions (`pos // G`, see
  `jax_posenc.SelfExtendRotaryEmbedding`), with the smallest group `G` per evaluation
  length `n` for which every grouped distance stays inside the trained range:
  `(n - 1) // G + w - w // G <= train_len - 1` (this implies the paper's condition
  `w + (n - w) / G <= train_len`; `G = 1`, plain RoPE, up to `train_len`). With
  `train_len = 64`: `w = 32` and `G = 4, 8, 16` at 128, 256, 512 tokens.
* `<encoding> → linear PI (eval only)`: position interpolation (Chen et al., 2023):
  positions scaled by `train_len / n` at each evaluation length `n > train_len`
  (`jax_posenc.LinearScaling(n / train_len)`), so they span the trained range.

Both are rows of the tables, `results.json` and the figure, with the seed spread of the
trained models. The `selfextend` encoding itself is not in the default list: trained
with a window wider than every length it is RoPE (it stays available by name).

Randomized positions (`randomized_positions=MAX`, `--randomized-positions MAX`, Ruoss et
al., 2023): every model trains on sequences whose positions are sorted random subsets
of `[0, MAX)` (`jax_posenc.train.training_positions`); `MAX` must cover the longest
evaluation length. Evaluation follows the paper and its reference code, which draw the
test positions the same way (a sorted random `n`-subset of `[0, MAX)` per window, drawn
from the seed, so the numbers are reproducible; at `n = MAX` these are 0..MAX-1): that
is the encoding's row. The row `<encoding> (eval at 0..n-1)` scores the same model at
the consecutive positions 0..n-1. Only for position-based encodings and the language
model task; the evaluation-only extensions are off with it.

`seeds` models are trained per encoding (seeds `seed`, `seed + 1`, ...: initialization
and data order); tables give the mean and the spread over seeds. Every model is
configured with `max_positions = max(eval_lens)`, so a learned table has rows for every
evaluated position: the rows past `train_len` are never trained (and not
weight-decayed) and keep their initial values. Nothing is clipped.

Outputs under `out_dir`: `config.json`; per encoding and seed a folder
`<encoding>/seed<k>/` (`checkpoints/`, `result.json`; `metrics.jsonl` for the
language model); `results.json` (rewritten after every finished model, so a killed
run keeps what it finished; it records the library, Python, JAX and Flax versions, the
device and a hash of the corpus), `results.md` (the tables) and the figure
(`ppl_vs_length.png` or `recall_accuracy.png`). An interrupted study resumes with
`resume=True` (`--resume`): finished models are read back, a half-trained language
model continues from its checkpoint (a recall model, under a minute of training,
starts over). `overwrite=True` (`--overwrite`) replaces a study instead. Every setting
is checked before the first write, so an invalid call leaves no folder behind.

References:
  Press et al., 2022, Train Short, Test Long (the train-short / test-long protocol and
    sliding-window evaluation).
  Kazemnejad et al., 2023, The Impact of Positional Encoding on Length Generalization
    in Transformers (NoPE).
  Jin et al., 2024, LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning.
  Chen et al., 2023, Extending Context Window of Large Language Models via Positional
    Interpolation.
  Ruoss et al., 2023, Randomized Positional Encodings Boost Length Generalization of
    Transformers.
  Arora et al., 2023, Zoology: Measuring and Improving Recall in Efficient Language
    Models (associative recall).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

import jax_posenc
from jax_posenc import _checks, _files, content, data, plots, registry, train
from jax_posenc.model import (
    ATTENTION_IMPLEMENTATIONS,
    COMPUTE_DTYPES,
    Transformer,
    TransformerConfig,
)
from jax_posenc.rope_scaling import LinearScaling

DEFAULT_EVAL_TOKENS = 8192
# Registered encodings the default list leaves out: trained by the study, SelfExtend's
# window covers every length and it is RoPE; it is evaluated as RoPE's `extend` variant.
NOT_IN_DEFAULT = ("selfextend",)
# Evaluation-only variants of a trained model with a `rope` part (see the docstring).
EXTENSIONS = ("selfextend", "linear")
EXTENSION_ROWS = {
    "selfextend": "{} → selfextend (eval only)",
    "linear": "{} → linear PI (eval only)",
    "consecutive": "{} (eval at 0..n-1)",
}
TASKS = ("lm", "recall")
MODES = ("nonoverlapping", "sliding")
MODE_TITLES = {"nonoverlapping": "non-overlapping windows", "sliding": "sliding windows"}
FIGURES = {"lm": "ppl_vs_length.png", "recall": "recall_accuracy.png"}
# Store-to-query distances of the recall evaluation, in multiples of the training length.
RECALL_DISTANCE_MULTIPLES = (0.25, 0.5, 1, 1.5, 2, 3, 4, 8)
# Sizes `--preset gpu` sets (the defaults are the CPU preset): a wider, deeper model
# trained at 256 tokens and evaluated to 2048, sized for about 10 minutes on one H100.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {},
    "gpu": {
        "steps": 2000,
        "train_len": 256,
        "d_model": 256,
        "layers": 4,
        "heads": 8,
        "batch_size": 64,
        "learning_rate": 1e-3,
        "eval_tokens": 65_536,
        "train_bytes": 20_000_000,
        "heldout_bytes": 1_000_000,
        "max_file_bytes": 1_000_000,
    },
}


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Settings of one study; every field is recorded in `config.json`.

    Attributes:
      encodings: registry names (combinations with "+" allowed); empty for every
        registered encoding.
      task: "lm" (language modelling, perplexity) or "recall" (associative recall,
        accuracy).
      steps: training steps per model.
      train_len: training sequence length.
      eval_lens: evaluation lengths; empty for 1x, 2x, 4x, 8x `train_len`.
      eval_stride: stride of the sliding-window evaluation; 0 for half the shortest of
        `train_len` and the evaluation lengths.
      d_model: model width.
      layers: number of transformer blocks.
      heads: attention heads.
      batch_size: sequences per training step.
      learning_rate: peak AdamW learning rate.
      eval_tokens: held-out bytes scored at every length and mode; 0 for the smallest
        multiple of every evaluation length and the stride that is at least 8192.
      attention: "xla" or "blockwise".
      dtype: compute dtype, "float32" or "bfloat16".
      seed: the first seed; model k uses `seed + k` for initialization and data order.
      seeds: models per encoding.
      corpus: local text files or directories; empty for the Python stdlib source.
      train_bytes: training-text budget.
      heldout_bytes: held-out-text budget.
      max_file_bytes: at most this many bytes are read from any one file.
      recall_probes: recall questions per sequence.
      recall_distractors: keys of the filler pairs in a recall sequence.
      recall_eval_sequences: recall sequences per evaluated length and distance.
      extend: evaluation-only variants of every trained model with a `rope` part:
        a tuple of "selfextend" and "linear", or "auto" (both, none with
        `randomized_positions`) or "none".
      randomized_positions: 0, or MAX: train on sorted random positions from
        `[0, MAX)` and evaluate as Ruoss et al. (2023) do (see the module docstring);
        at least the longest evaluation length.
    """

    encodings: tuple[str, ...] = ()
    task: str = "lm"
    steps: int = 400
    train_len: int = 64
    eval_lens: tuple[int, ...] = ()
    eval_stride: int = 0
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    batch_size: int = 32
    learning_rate: float = 3e-3
    eval_tokens: int = 0
    attention: str = "xla"
    dtype: str = "float32"
    seed: int = 0
    seeds: int = 1
    corpus: tuple[str, ...] = ()
    train_bytes: int = 2_000_000
    heldout_bytes: int = 300_000
    max_file_bytes: int = 32_768
    recall_probes: int = 8
    recall_distractors: int = 8
    recall_eval_sequences: int = 32
    extend: tuple[str, ...] | str = "auto"
    randomized_positions: int = 0

    def __post_init__(self):
        _checks.check_choice("task", self.task, TASKS)
        positive = ("steps", "d_model", "layers", "heads", "batch_size", "seeds")
        positive += ("train_bytes", "heldout_bytes", "max_file_bytes")
        positive += ("recall_probes", "recall_distractors", "recall_eval_sequences")
        for name in positive:
            _checks.check_positive_int(name, getattr(self, name))
        _checks.check_min_int("eval_tokens", self.eval_tokens, 0)
        _checks.check_min_int("eval_stride", self.eval_stride, 0)
        _checks.check_min_int("seed", self.seed, 0)
        _checks.check_positive_float("learning_rate", self.learning_rate)
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by heads={self.heads}")
        encodings = tuple(self.encodings) or default_encodings(self.attention)
        for name in encodings:
            registry.resolve(name)
        if len(set(encodings)) != len(encodings):
            raise ValueError(f"encodings lists a name twice: {list(encodings)}")
        object.__setattr__(self, "encodings", encodings)
        train_len = _checks.check_positive_int("train_len", self.train_len)
        eval_lens = tuple(self.eval_lens) or tuple(train_len * m for m in (1, 2, 4, 8))
        for length in eval_lens:
            _checks.check_positive_int("eval_lens", length)
        object.__setattr__(self, "eval_lens", tuple(sorted(set(eval_lens))))
        shortest = min(train_len, *self.eval_lens)
        if not self.eval_stride:
            object.__setattr__(self, "eval_stride", max(1, shortest // 2))
        elif self.eval_stride > min(self.eval_lens):
            raise ValueError(
                f"eval_stride={self.eval_stride} must be at most the shortest evaluation "
                f"length {min(self.eval_lens)}"
            )
        if self.eval_tokens:
            for length in (*self.eval_lens, self.eval_stride):
                if self.eval_tokens % length:
                    raise ValueError(
                        f"eval_tokens={self.eval_tokens} must be a multiple of every "
                        f"evaluation length and of eval_stride, not of {length}"
                    )
        else:
            step = math.lcm(*self.eval_lens, self.eval_stride)
            object.__setattr__(self, "eval_tokens", step * max(1, -(-DEFAULT_EVAL_TOKENS // step)))
        object.__setattr__(self, "corpus", tuple(str(path) for path in self.corpus))
        self._check_positions_options(encodings)
        if self.task == "recall":
            for length in (train_len, *self.eval_lens):
                self.recall_batch(batch_size=1, seq_len=length, step=0, seed=0)
        self.train_config(self.seed)
        for encoding in encodings:
            self.model_config(encoding)

    def _check_positions_options(self, encodings: tuple[str, ...]) -> None:
        """Validates and resolves `extend` and `randomized_positions`."""
        randomized = _checks.check_min_int("randomized_positions", self.randomized_positions, 0)
        extend = self.extend
        if isinstance(extend, str):
            if extend not in ("auto", "none"):
                extend = tuple(item.strip() for item in extend.split(",") if item.strip())
            elif extend == "auto":
                extend = () if randomized else EXTENSIONS
            else:
                extend = ()
        extend = tuple(extend)
        unknown = [name for name in extend if name not in EXTENSIONS]
        if unknown or len(set(extend)) != len(extend):
            raise ValueError(
                f"extend must list each of {list(EXTENSIONS)} at most once (or be 'auto' or "
                f"'none'), got {self.extend!r}"
            )
        object.__setattr__(self, "extend", tuple(name for name in EXTENSIONS if name in extend))
        if not randomized:
            return
        longest = max(self.train_len, *self.eval_lens)
        if randomized < longest:
            raise ValueError(
                f"randomized_positions={randomized} must be at least the longest training or "
                f"evaluation length {longest}: positions are drawn from [0, "
                "randomized_positions) at every length"
            )
        if self.task != "lm":
            raise ValueError(
                f"randomized_positions={randomized} is supported for task='lm' only, got "
                f"task={self.task!r}"
            )
        if self.extend:
            raise ValueError(
                f"extend={self.extend!r} evaluates models trained at consecutive positions; "
                f"with randomized_positions={randomized} use extend='none' (or 'auto')"
            )
        fixed = [name for name in encodings if not train.takes_positions(name)]
        if fixed:
            raise ValueError(
                f"randomized_positions={randomized} needs position-based encodings, but "
                f"{fixed} read no positions; leave them out or use randomized_positions=0"
            )

    def variants(self, encoding: str) -> tuple[str, ...]:
        """The evaluation-only variants scored for a model of `encoding`."""
        if self.randomized_positions:
            return ("consecutive",) if self.task == "lm" else ()
        if self.task != "lm" or "rope" not in _part_names(encoding):
            return ()
        return self.extend

    def selfextend_settings(self, length: int) -> dict[str, int]:
        """SelfExtend's `window` and `group_size` at evaluation length `length`: the
        window is half the training length and the group the smallest for which every
        grouped distance stays below the training length (see the module docstring)."""
        train_len = self.train_len
        window = max(1, train_len // 2)
        for group in range(1, max(length, 1) + 1):
            farthest = (length - 1) // group + window - window // group
            if farthest <= train_len - 1 and window + (length - window) / group <= train_len:
                return {"window": window, "group_size": group}
        raise ValueError(
            f"no SelfExtend group size keeps length {length} within train_len={train_len} "
            f"with window {window}"
        )

    def variant_model(self, encoding: str, variant: str, length: int) -> Transformer:
        """The model that scores `variant` of a trained `encoding` at `length` tokens; it
        takes the trained parameters unchanged (RoPE and SelfExtend have none)."""
        base = self.model_config(encoding)
        if variant == "selfextend":
            parts = ["selfextend" if p == "rope" else p for p in _part_names(encoding)]
            options = {"selfextend": self.selfextend_settings(length)}
            base = dataclasses.replace(base, encoding="+".join(parts), encoding_options=options)
        elif variant == "linear" and length > self.train_len:
            scaling = LinearScaling(length / self.train_len)
            base = dataclasses.replace(base, encoding_options={"rope": {"scaling": scaling}})
        elif variant not in (*EXTENSIONS, "consecutive"):
            raise ValueError(f"unknown evaluation variant {variant!r}")
        return Transformer(base)

    def variant_settings(self, variant: str) -> dict[str, Any]:
        """What `variant` sets at each evaluation length (recorded in the results)."""
        settings: dict[str, Any] = {}
        for length in self.eval_lens:
            if variant == "selfextend":
                settings[str(length)] = self.selfextend_settings(length)
            elif variant == "linear":
                settings[str(length)] = {"factor": max(1.0, length / self.train_len)}
            else:
                settings[str(length)] = {"positions": f"0..{length - 1}"}
        return settings

    @property
    def seed_values(self) -> tuple[int, ...]:
        """The seeds of the models trained per encoding."""
        return tuple(range(self.seed, self.seed + self.seeds))

    def model_config(self, encoding: str) -> TransformerConfig:
        return TransformerConfig(
            encoding=encoding,
            d_model=self.d_model,
            num_layers=self.layers,
            num_heads=self.heads,
            max_positions=max(self.train_len, *self.eval_lens, self.randomized_positions),
            attention=self.attention,
            dtype=self.dtype,
        )

    def train_config(self, seed: int) -> train.TrainConfig:
        return train.TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            seq_len=self.train_len,
            learning_rate=self.learning_rate,
            seed=seed,
            checkpoint_every=max(1, self.steps // 4),
            log_every=max(1, min(10, self.steps // 10)),
            randomized_positions=self.randomized_positions,
        )

    def recall_batch(self, **kwargs) -> data.RecallBatch:
        """`data.recall_batch` with this study's probes and distractors."""
        return data.recall_batch(
            probes=self.recall_probes, distractors=self.recall_distractors, **kwargs
        )

    def recall_distances(self) -> tuple[int, ...]:
        """Store-to-query distances scored at the longest evaluation length."""
        low = data.recall_min_distance(self.recall_probes)
        high = data.recall_max_distance(max(self.eval_lens), self.recall_probes)
        wanted = (round(m * self.train_len) for m in RECALL_DISTANCE_MULTIPLES)
        return tuple(sorted({min(max(d, low), high) for d in wanted}))

    def record(self) -> dict[str, Any]:
        """The settings as JSON values."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def default_encodings(attention: str = "xla") -> tuple[str, ...]:
    """The encodings a study trains when none are named: every registered one except
    `NOT_IN_DEFAULT`, and, with `attention="blockwise"`, except those whose positions need
    whole rows of logits (CoPE: xla attention only)."""
    return tuple(
        name
        for name in registry.available_encodings()
        if name not in NOT_IN_DEFAULT
        and not (attention == "blockwise" and registry.get_encoding(name).contextual_bias)
    )


def _part_names(encoding: str) -> list[str]:
    return [part.name for part in registry.resolve(encoding)]


# ------------------------------------------------------------------ provenance


def environment() -> dict[str, Any]:
    """Versions and the device a study ran with (recorded in `results.json`)."""
    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "jax_posenc": jax_posenc.__version__,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
        "flax": flax.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": f"{device.platform}: {device.device_kind}",
        "device_count": jax.device_count(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
    }


def corpus_record(corpus: data.Corpus) -> dict[str, Any]:
    """Where the text came from, its sizes and a SHA-256 of the bytes used."""
    digest = hashlib.sha256()
    for part in (corpus.train, corpus.heldout):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part.tobytes())
    record = {
        "description": corpus.description,
        "train_bytes": int(corpus.train.size),
        "heldout_bytes": int(corpus.heldout.size),
        "train_files": len(corpus.train_files),
        "heldout_files": len(corpus.heldout_files),
        "sha256": digest.hexdigest(),
    }
    if corpus.description.startswith("Python standard library"):
        record["note"] = (
            f"the default corpus is the source of the running Python's standard library "
            f"(Python {platform.python_version()}): another Python version reads other "
            "bytes (the sha256 differs) and gives other numbers"
        )
    return record


# ------------------------------------------------------------------ folders


def _run_dir(out_dir: Path, encoding: str, seed: int) -> Path:
    return out_dir / encoding / f"seed{seed}"


# What a study writes into its folder; `--overwrite` removes these and nothing else.
_STUDY_FILES = ("config.json", "results.json", "results.md", *FIGURES.values())
_RUN_FILES = ("train_config.json", "checkpoints", "metrics.jsonl", "result.json")


def _is_encoding_dir(path: Path) -> bool:
    return path.is_dir() and any(
        run.is_dir() and run.name.startswith("seed") and any((run / n).exists() for n in _RUN_FILES)
        for run in path.iterdir()
    )


def is_study_dir(path: str | Path) -> bool:
    """True when `path` is a folder a study wrote (it holds `config.json`)."""
    return (Path(path) / "config.json").is_file()


def _check_study_dir(out_dir: Path, config: StudyConfig, *, resume: bool, overwrite: bool):
    """Refuses to mix studies, writing nothing: without `resume` or `overwrite` the
    folder must not hold a study, and a resumed study must have the same settings (it
    may list other encodings and another number of seeds)."""
    if resume and overwrite:
        raise ValueError(
            "--resume and --overwrite exclude each other (resume=True, overwrite=True)"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {str(out_dir)!r} is a file, not a folder")
    if not is_study_dir(out_dir) or overwrite:
        return
    if not resume:
        raise ValueError(
            f"{str(out_dir)!r} already holds a study; pass --resume (resume=True) to "
            "continue it, --overwrite (overwrite=True) to replace it, or choose another "
            "--out directory"
        )
    saved, current = _files.read_json(out_dir / "config.json"), config.record()
    free = ("encodings", "seeds")
    # A key the saved config lacks is a setting added since (its default then held).
    changed = [k for k in current if k not in free and k in saved and saved[k] != current[k]]
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise ValueError(
            f"cannot resume the study in {str(out_dir)!r} with different settings ({details}); "
            "pass --overwrite to replace it"
        )


def _check_models(config: StudyConfig) -> None:
    """Traces every encoding's model at the training length (shapes only, no compile),
    so an encoding that cannot be built with these sizes fails before anything is written."""
    tokens = jax.ShapeDtypeStruct((1, config.train_len), jnp.int32)
    for encoding in config.encodings:
        models = [Transformer(config.model_config(encoding))]
        models += [
            config.variant_model(encoding, variant, max(config.eval_lens))
            for variant in config.variants(encoding)
        ]
        for model in models:
            try:
                jax.eval_shape(model.init, jax.random.key(0), tokens)
            except (TypeError, ValueError) as error:
                raise ValueError(f"encoding {encoding!r} with these settings: {error}") from error


def _prepare_study_dir(out_dir: Path, config: StudyConfig, *, overwrite: bool) -> None:
    """The first write of a study: clears a replaced study's outputs, records the config."""
    if overwrite and is_study_dir(out_dir):
        for child in out_dir.iterdir():
            if child.name in _STUDY_FILES and child.is_file():
                child.unlink()
            elif _is_encoding_dir(child):
                shutil.rmtree(child)
    if overwrite or not is_study_dir(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config.record(), indent=1))


# ------------------------------------------------------------------ progress


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


class _Progress:
    """Progress over every pending model of the study, training and evaluation.

    Work is counted in training-step equivalents (see `_eval_jobs`), so the ETA covers
    evaluation too. On a terminal this is one tqdm bar (lines logged meanwhile go
    through `tqdm.write`); otherwise (a log file) a plain line every `every` seconds.
    """

    def __init__(self, config: StudyConfig, pending: list[str], *, enabled: bool, log, every=30.0):
        self.config = config
        self.total = sum(self.per_run(encoding) for encoding in pending)
        self.done = 0.0
        self.start = self.last_line = time.perf_counter()
        self.enabled, self.every, self.description = enabled, every, ""
        self.bar = tqdm(
            total=round(self.total),
            disable=not (enabled and sys.stderr.isatty()),
            unit="step",
            smoothing=0,
            dynamic_ncols=True,
            bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]",
        )
        self._log = log

    def per_run(self, encoding: str) -> float:
        """Work of one model of `encoding`: training, evaluation and its variants."""
        evaluation = sum(units for _, units in _eval_jobs(self.config))
        return self.config.steps + evaluation * (1 + len(self.config.variants(encoding)))

    def advance(self, units: float) -> None:
        before = round(self.done)
        self.done += units
        self.bar.update(round(self.done) - before)
        now = time.perf_counter()
        if self.enabled and self.bar.disable and now - self.last_line >= self.every:
            self.last_line = now
            self._log(f"  {self.description}; {self.eta_line()}")

    def describe(self, text: str) -> None:
        self.description = text
        self.bar.set_description_str(text, refresh=False)

    def eta_line(self) -> str:
        elapsed = time.perf_counter() - self.start
        fraction = min(1.0, self.done / self.total) if self.total else 1.0
        left = elapsed * (1 - fraction) / fraction if fraction > 0 else float("nan")
        eta = _duration(left) if math.isfinite(left) else "?"
        return f"study {100 * fraction:.0f}% done, {_duration(elapsed)} elapsed, ~{eta} left"

    def log(self, line: str) -> None:
        if self.bar.disable:
            self._log(line)
        else:
            self.bar.write(line)

    def close(self) -> None:
        self.bar.close()


def _eval_jobs(config: StudyConfig) -> list[tuple[tuple[str, int], float]]:
    """`((kind, length or distance), cost in training steps)` of every evaluation of a model.

    A forward pass costs about a third of a training step per token, and attention adds
    `length / (6 * d_model)` to the cost of a token's dense layers, so an evaluation
    that reads N tokens of `length` counts
    `N (1 + length / 6d) / (3 * batch_size * train_len * (1 + train_len / 6d))` steps.
    """

    def cost(length: int) -> float:
        return 1 + length / (6 * config.d_model)

    step_tokens = 3 * config.batch_size * config.train_len * cost(config.train_len)
    jobs = []  # (job, tokens read, length of each window)
    if config.task == "lm":
        for length in config.eval_lens:
            jobs.append((("nonoverlapping", length), config.eval_tokens, length))
        for length in config.eval_lens:
            windows = config.eval_tokens // config.eval_stride
            jobs.append((("sliding", length), windows * length, length))
    else:
        sequences, longest = config.recall_eval_sequences, max(config.eval_lens)
        for length in config.eval_lens:
            jobs.append((("by_length", length), sequences * length, length))
        for distance in config.recall_distances():
            jobs.append((("by_distance", distance), sequences * longest, longest))
    return [(job, tokens * cost(length) / step_tokens) for job, tokens, length in jobs]


# ------------------------------------------------------------------ one model


def _train_callback(progress: _Progress, label: str, steps: int) -> Callable[[int, Mapping], None]:
    progress.describe(f"{label}: training")

    def callback(step: int, metrics: Mapping[str, jax.Array]) -> None:
        if step % 25 == 0 and progress.enabled:
            loss = float(metrics["loss"])
            progress.describe(f"{label}: training step {step}/{steps}, loss {loss:.3f}")
        progress.advance(1)

    return callback


def run_lm(
    encoding: str,
    seed: int,
    config: StudyConfig,
    corpus: data.Corpus,
    run_dir: Path,
    progress: _Progress,
) -> dict[str, Any]:
    """Trains (or resumes) one language model and scores it in both modes at every length."""
    model = Transformer(config.model_config(encoding))
    label = f"{encoding} seed {seed}"
    start = time.perf_counter()
    result = train.train(
        model,
        config.train_config(seed),
        corpus.train,
        checkpoint_dir=run_dir,
        metrics_path=run_dir / "metrics.jsonl",
        progress=False,
        callback=_train_callback(progress, label, config.steps),
    )
    train_seconds = time.perf_counter() - start
    params = result.state.params

    def evaluate_all(variant: str | None) -> dict[str, dict[str, float]]:
        losses: dict[str, dict[str, float]] = {mode: {} for mode in MODES}
        what = "" if variant is None else f" ({EXTENSION_ROWS[variant].format('').strip()})"
        for (mode, length), units in _eval_jobs(config):
            progress.describe(f"{label}: evaluating {MODE_TITLES[mode]} of {length}{what}")
            if variant is None:
                eval_model = model
            else:
                eval_model = config.variant_model(encoding, variant, length)
            losses[mode][str(length)] = _evaluate_lm(
                eval_model, params, config, corpus, mode, length, seed, units, progress,
                randomized=bool(config.randomized_positions) and variant is None,
            )  # fmt: skip
        return losses

    losses = evaluate_all(None)
    variants = {}
    for variant in config.variants(encoding):
        by_mode = evaluate_all(variant)
        variants[variant] = {"loss": by_mode, "ppl": _perplexities(by_mode)}
    run = {
        "encoding": encoding,
        "seed": seed,
        "loss": losses,
        "ppl": _perplexities(losses),
        "final_train_loss": result.history[-1]["loss"] if result.history else None,
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - start - train_seconds,
        "num_params": sum(int(np.size(x)) for x in jax.tree.leaves(params)),
    }
    if variants:
        run["variants"] = variants
    return run


def _perplexities(losses: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    return {m: {n: math.exp(v) for n, v in by_len.items()} for m, by_len in losses.items()}


def eval_positions(config: StudyConfig, mode: str, length: int, count: int, seed: int):
    """The randomized evaluation positions of `count` windows of `length` tokens,
    int32 `[count, length]`: sorted random `length`-subsets of
    `[0, randomized_positions)` as in training (Ruoss et al., 2023), a pure function of
    the seed, the mode and the length."""
    key = jax.random.fold_in(jax.random.key(seed), MODES.index(mode))
    key = jax.random.fold_in(key, length)
    return np.asarray(content.randomized_positions(key, count, length, config.randomized_positions))


def _evaluate_lm(
    model: Transformer,
    params,
    config: StudyConfig,
    corpus: data.Corpus,
    mode: str,
    length: int,
    seed: int,
    units: float,
    progress: _Progress,
    *,
    randomized: bool,
) -> float:
    """Mean loss of `model` on the held-out text in `mode` at `length` tokens."""
    context = max(config.eval_lens)  # skipped bytes: the first sliding window's context
    if mode == "nonoverlapping":
        windows = data.eval_windows(
            corpus.heldout, seq_len=length, num_tokens=config.eval_tokens, start=context
        )
        weights = None
    else:
        windows, weights = data.sliding_windows(
            corpus.heldout,
            seq_len=length,
            stride=config.eval_stride,
            num_tokens=config.eval_tokens,
            start=context,
        )
    positions = None
    if randomized:
        positions = eval_positions(config, mode, length, len(windows), seed)
    advanced = [0.0]

    def callback(done: int, total: int) -> None:
        progress.advance(units * done / total - advanced[0])
        advanced[0] = units * done / total

    return train.evaluate(
        model,
        params,
        windows,
        batch_size=max(1, 8192 // length),
        mesh=train.data_mesh(),
        token_weights=weights,
        positions=positions,
        callback=callback,
    )


@functools.lru_cache(maxsize=32)
def _recall_step(model: Transformer, config: train.TrainConfig):
    """A jitted `step(state, tokens, query_positions) -> (state, loss)` on the answers only.

    The loss is the cross-entropy of the answers alone: with every token's loss, the
    one answer in eight tokens is drowned by the unpredictable filler and a small model
    does not find the lookup within the study's step budget (measured: chance accuracy
    after 500 steps, against 100% after 200 steps on the answers alone). Optimizer and
    schedule are the training loop's (`train.make_optimizer`).
    """
    optimizer = train.make_optimizer(config)

    def step(state: train.TrainState, tokens: jax.Array, query_positions: jax.Array):
        def loss_fn(params):
            losses = train.next_token_losses(model, params, tokens)
            return jnp.take_along_axis(losses, query_positions, axis=1).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return train.TrainState(state.step + 1, params, opt_state), {"loss": loss}

    return jax.jit(step, donate_argnums=0)


@functools.lru_cache(maxsize=32)
def _recall_predictions(model: Transformer):
    """Jitted `(params, tokens, query_positions) -> predicted tokens [B, P]`."""

    def predict(params, tokens, query_positions):
        logits = model.apply(params, tokens)
        return jnp.take_along_axis(jnp.argmax(logits, axis=-1), query_positions, axis=1)

    return jax.jit(predict)


def recall_accuracy(model: Transformer, params, batch: data.RecallBatch) -> float:
    """Fraction of `batch`'s answers that are the model's most likely next token."""
    predict = _recall_predictions(model)
    length = batch.tokens.shape[1] - 1
    chunk = max(1, 8192 // length)
    correct = 0
    for start in range(0, len(batch.tokens), chunk):
        rows = slice(start, start + chunk)
        predicted = predict(params, batch.tokens[rows, :-1], batch.query_positions[rows])
        correct += int(np.sum(np.asarray(predicted) == batch.answers[rows]))
    return correct / batch.answers.size


def run_recall(
    encoding: str, seed: int, config: StudyConfig, run_dir: Path, progress: _Progress
) -> dict[str, Any]:
    """Trains one recall model (answers-only loss) and scores it by length and distance."""
    model = Transformer(config.model_config(encoding))
    train_config = config.train_config(seed)
    label = f"{encoding} seed {seed}"
    start = time.perf_counter()
    mesh = train.data_mesh(jax.devices()[:1])
    state = train.init_state(model, train_config, mesh)
    step_fn = _recall_step(model, dataclasses.replace(train_config, seed=0))  # one compile
    callback = _train_callback(progress, label, config.steps)
    loss = None
    for step in range(config.steps):
        batch = config.recall_batch(
            batch_size=config.batch_size, seq_len=config.train_len, seed=seed, step=step
        )
        state, metrics = step_fn(state, batch.tokens, batch.query_positions)
        callback(step + 1, metrics)
        if (step + 1) % train_config.log_every == 0 or step + 1 == config.steps:
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step + 1}")
    with ocp.CheckpointManager((run_dir / "checkpoints").absolute()) as manager:
        manager.save(config.steps, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
    train_seconds = time.perf_counter() - start
    accuracy: dict[str, dict[str, float]] = {"by_length": {}, "by_distance": {}}
    for (kind, value), units in _eval_jobs(config):
        progress.describe(f"{label}: recall {kind.replace('_', ' ')} {value}")
        length = value if kind == "by_length" else max(config.eval_lens)
        batch = config.recall_batch(
            batch_size=config.recall_eval_sequences,
            seq_len=length,
            seed=config.seed,
            step=0,
            distance=None if kind == "by_length" else value,
            split="eval",
        )
        accuracy[kind][str(value)] = recall_accuracy(model, state.params, batch)
        progress.advance(units)
    return {
        "encoding": encoding,
        "seed": seed,
        "accuracy": accuracy,
        "final_train_loss": loss,
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - start - train_seconds,
        "num_params": sum(int(np.size(x)) for x in jax.tree.leaves(state.params)),
    }


# ------------------------------------------------------------------ aggregation


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min, max and count."""
    array = np.asarray(values, np.float64)
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if array.size > 1 else 0.0,
        "min": float(array.min()),
        "max": float(array.max()),
        "n": int(array.size),
    }


def _metric_paths(run: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """`(metric, group, key)` of every number a finished run reports."""
    return [
        (metric, group, key)
        for metric in ("ppl", "accuracy")
        for group, values in run.get(metric, {}).items()
        for key in values
    ]


def _keys(entries: Mapping[str, Any], metric: str, group: str) -> list[str]:
    """The lengths or distances any encoding reports for `metric`/`group`, ascending."""
    found = {key for entry in entries.values() for key in entry.get(metric, {}).get(group, {})}
    return sorted(found, key=int)


def summarize_encoding(runs: list[dict[str, Any]], config: Mapping[str, Any]) -> dict[str, Any]:
    """Mean and spread over the finished runs of one encoding (`runs` sorted by seed)."""
    finished = [run for run in runs if "error" not in run]
    entry: dict[str, Any] = {"seeds": [run["seed"] for run in finished], "runs": runs}
    failed = [{"seed": run["seed"], "error": run["error"]} for run in runs if "error" in run]
    if failed:
        entry["failed"] = failed
    if not finished:
        entry["error"] = "; ".join(f"seed {f['seed']}: {f['error']}" for f in failed)
        return entry
    for metric, group, key in _metric_paths(finished[0]):
        values = [run[metric][group][key] for run in finished]
        entry.setdefault(metric, {}).setdefault(group, {})[key] = spread(values)
    if config["task"] == "lm":
        first, last = (str(n) for n in (config["eval_lens"][0], config["eval_lens"][-1]))
        entry["ratio"] = {
            mode: spread([run["ppl"][mode][last] / run["ppl"][mode][first] for run in finished])
            for mode in MODES
        }
    return entry


def summarize_variant(
    runs: list[dict[str, Any]], variant: str, config: StudyConfig
) -> dict[str, Any]:
    """The row of an evaluation-only variant: `summarize_encoding` over the variant's
    numbers of each trained run, with `trained`, `variant` and its per-length `settings`."""
    rows = []
    for run in runs:
        if "error" in run or variant not in run.get("variants", {}):
            rows.append({"seed": run["seed"], "error": run.get("error", "not evaluated")})
        else:
            rows.append({"seed": run["seed"], **run["variants"][variant]})
    entry = summarize_encoding(rows, config.record())
    entry.update(
        trained=runs[0]["encoding"], variant=variant, settings=config.variant_settings(variant)
    )
    return entry


def _headline(results: Mapping[str, Any]) -> list[tuple[str, str, str, str, bool]]:
    """`(title, metric, group, key, higher_is_better)` of the numbers the summary ranks."""
    config = results["config"]
    longest = str(config["eval_lens"][-1])
    if config["task"] == "recall":
        distances = _keys(results["encodings"], "accuracy", "by_distance")
        farthest = distances[-1] if distances else "?"
        return [
            (f"accuracy at {longest} tokens", "accuracy", "by_length", longest, True),
            (f"accuracy at distance {farthest}", "accuracy", "by_distance", farthest, True),
        ]
    return [
        (f"{MODE_TITLES[mode]}, ppl at {longest}", "ppl", mode, longest, False) for mode in MODES
    ]


def summarize(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Best and worst encoding per headline number, and which encodings the seed spread
    cannot separate from the best (their min..max ranges over seeds overlap)."""
    summary = []
    for title, metric, group, key, higher in _headline(results):
        stats = {
            name: entry[metric][group][key]
            for name, entry in results["encodings"].items()
            if metric in entry
        }
        if not stats:
            continue
        order = sorted(stats, key=lambda n: stats[n]["mean"], reverse=higher)
        best, worst = order[0], order[-1]
        seeds = min(s["n"] for s in stats.values())
        equal_best = [n for n in order if stats[n]["mean"] == stats[best]["mean"]]
        tied = [
            name
            for name in order
            if seeds > 1
            and name not in equal_best
            and stats[name]["min"] <= stats[best]["max"]
            and stats[name]["max"] >= stats[best]["min"]
        ]
        summary.append(
            {
                "title": title,
                # Encodings with exactly the same numbers (e.g. SelfExtend with a window
                # wider than the longest length is RoPE) share a place, joined by " = ".
                "best": " = ".join(equal_best),
                "best_value": stats[best]["mean"],
                "worst": " = ".join(n for n in order if stats[n]["mean"] == stats[worst]["mean"]),
                "worst_value": stats[worst]["mean"],
                "within_spread_of_best": tied,
                "seeds": seeds,
            }
        )
    return summary


def summary_lines(results: Mapping[str, Any]) -> list[str]:
    """The summary as sentences."""
    lines = []
    for item in results.get("summary") or summarize(results):
        line = (
            f"{item['title']}: best {item['best']} ({item['best_value']:.3f}), worst "
            f"{item['worst']} ({item['worst_value']:.3f})"
        )
        if item["seeds"] < 2:
            line += "; one seed, so the spread is not measured (--seeds 3)"
        elif item["within_spread_of_best"]:
            line += (
                f"; within the seed spread of the best: {', '.join(item['within_spread_of_best'])}"
                "; every other difference from the best is beyond it"
            )
        else:
            line += "; every other encoding is beyond the seed spread of the best"
        lines.append(line)
    return lines


# ------------------------------------------------------------------ tables


def _cell(stats: Mapping[str, float] | None, digits: int) -> str:
    if stats is None:
        return "failed"
    if stats["n"] < 2:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _render(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.rjust(width) if i else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    )


def _length_label(prefix: str, length: int, train_len: int) -> str:
    if length % train_len == 0:
        return f"{prefix}@{length} ({length // train_len}x)"
    return f"{prefix}@{length}"


def variant_notes(results: Mapping[str, Any]) -> list[str]:
    """One line per evaluation-only row: what it is and its settings per length."""
    lines = []
    config = results["config"]
    for name, entry in results["encodings"].items():
        variant, settings = entry.get("variant"), entry.get("settings", {})
        if variant == "selfextend":
            groups = ", ".join(f"{values['group_size']} at {n}" for n, values in settings.items())
            window = next(iter(settings.values()))["window"] if settings else "?"
            lines.append(
                f"{name}: the trained {entry['trained']} parameters with SelfExtend (Jin et "
                f"al., 2024), neighbour window {window}, group size {groups}"
            )
        elif variant == "linear":
            factors = ", ".join(f"{values['factor']:g} at {n}" for n, values in settings.items())
            lines.append(
                f"{name}: the trained {entry['trained']} parameters with positions divided by "
                f"the factor (Chen et al., 2023) {factors}"
            )
        elif variant == "consecutive":
            lines.append(
                f"{name}: the model trained on randomized positions from [0, "
                f"{config['randomized_positions']}) scored at positions 0..n-1; its own row "
                "draws the evaluation positions like training (Ruoss et al., 2023)"
            )
    return lines


def format_tables(results: Mapping[str, Any], *, markdown: bool = False) -> str:
    """The study's tables (mean ± sample std over seeds), titled, with the summary.

    Language model: per evaluation mode, perplexity per encoding and length and the
    ratio last / first length. Recall: accuracy by length, and by distance at the
    longest length.
    """
    config = results["config"]
    lengths, train_len = config["eval_lens"], config["train_len"]
    entries = results["encodings"]
    seeds = config.get("seeds", 1)
    note = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
    sections = []
    if config["task"] == "recall":
        distances = _keys(entries, "accuracy", "by_distance")
        groups = [
            (
                f"Recall accuracy by length (stores anywhere in the sequence; {note})",
                "by_length",
                [_length_label("acc", n, train_len) for n in lengths],
                [str(n) for n in lengths],
            ),
            (
                f"Recall accuracy by store-to-query distance at {lengths[-1]} tokens ({note})",
                "by_distance",
                [f"d={d}" for d in distances],
                distances,
            ),
        ]
        for title, group, columns, keys in groups:
            rows = [
                [name] + [_cell(entry.get("accuracy", {}).get(group, {}).get(k), 2) for k in keys]
                for name, entry in entries.items()
            ]
            sections.append((title, _render(["encoding", *columns], rows, markdown)))
    else:
        ratio_title = f"ppl@{lengths[-1]} / ppl@{lengths[0]}"
        for mode in MODES:
            title = MODE_TITLES[mode]
            if mode == "sliding":
                title += f", stride {config['eval_stride']}"
            rows = []
            for name, entry in entries.items():
                cells = [_cell(entry.get("ppl", {}).get(mode, {}).get(str(n)), 3) for n in lengths]
                rows.append([name, *cells, _cell(entry.get("ratio", {}).get(mode), 2)])
            header = ["encoding", *(_length_label("ppl", n, train_len) for n in lengths)]
            sections.append(
                (
                    f"Perplexity per byte, {title} ({note})",
                    _render([*header, ratio_title], rows, markdown),
                )
            )
    text = "\n\n".join(
        (f"### {title}\n\n{table}" if markdown else f"{title}\n{table}")
        for title, table in sections
    )
    notes = variant_notes(results)
    if notes:
        text += "\n\n" + "\n".join(("- " if markdown else "") + line for line in notes)
    summary = summary_lines(results)
    if summary:
        text += "\n\n" + "\n".join(("- " if markdown else "") + line for line in summary)
    return text


# ------------------------------------------------------------------ the study


def _load_corpus(config: StudyConfig) -> data.Corpus | None:
    if config.task != "lm":
        return None
    corpus = data.load_corpus(
        config.corpus or None,
        train_bytes=config.train_bytes,
        heldout_bytes=config.heldout_bytes,
        max_file_bytes=config.max_file_bytes,
    )
    needed = max(config.eval_lens) + config.eval_tokens
    if corpus.heldout.size <= needed:
        raise ValueError(
            f"the held-out text has {corpus.heldout.size} bytes but {needed} are needed "
            f"(eval_tokens={config.eval_tokens} scored after {max(config.eval_lens)} bytes "
            "of context); raise --heldout-bytes or lower --eval-tokens"
        )
    if corpus.train.size <= config.train_len:
        raise ValueError(
            f"the training text has {corpus.train.size} bytes, fewer than train_len="
            f"{config.train_len} + 1; raise --train-bytes or give a larger --corpus"
        )
    return corpus


def _read_run(path: Path, corpus: Mapping[str, Any] | None) -> dict[str, Any]:
    run = _files.read_json(path)
    if corpus is not None and run.get("corpus_sha256") not in (None, corpus["sha256"]):
        raise ValueError(
            f"{str(path)!r} was computed on other text (corpus sha256 "
            f"{run['corpus_sha256'][:12]}..., now {corpus['sha256'][:12]}...; another "
            "Python version changes the default corpus); pass --overwrite to start over"
        )
    return run


def _write_outputs(out_dir: Path, results: dict[str, Any], *, figure: bool) -> None:
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    (out_dir / "results.md").write_text(format_tables(results, markdown=True) + "\n")
    if figure:
        plots.plot_study(results, out_dir / FIGURES[results["config"]["task"]])


def run_study(
    config: StudyConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    progress_every: float = 30.0,
) -> dict[str, Any]:
    """Runs the study; see the module docstring.

    Everything (settings, corpus, that every encoding's model can be built) is checked
    before the first write, so an invalid call leaves no folder behind.

    Args:
      config: the study settings.
      out_dir: output directory (created).
      resume: continue a study already in `out_dir` (same settings required; the
        encodings and the number of seeds may differ).
      overwrite: replace a study already in `out_dir` (its outputs are deleted).
      progress: show progress over the whole study with an ETA: a bar on a terminal,
        otherwise a line every `progress_every` seconds (a line per model either way).
      log: where progress lines go.
      progress_every: seconds between progress lines when not on a terminal.

    Returns:
      The results dictionary also written to `results.json`: `config`, `environment`,
      `corpus` (None for recall), `encodings` (per encoding: `runs`, one per seed, and
      the mean and spread of every number), `summary`, `complete` and `wall_seconds`
      (of this call).
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    # Everything is checked before the first write, so a typo leaves no folder behind.
    _check_study_dir(out_dir, config, resume=resume, overwrite=overwrite)
    corpus = _load_corpus(config)
    _check_models(config)
    corpus_info = None if corpus is None else corpus_record(corpus)
    runs: dict[str, dict[int, dict[str, Any]]] = {encoding: {} for encoding in config.encodings}
    if resume and not overwrite:
        for encoding in config.encodings:
            for seed in config.seed_values:
                path = _run_dir(out_dir, encoding, seed) / "result.json"
                if path.is_file():
                    run = _read_run(path, corpus_info)
                    # A run from before a variant was asked for is evaluated again (its
                    # training is done: the last checkpoint is read back).
                    missing = set(config.variants(encoding)) - set(run.get("variants", {}))
                    if "error" in run or not missing:
                        runs[encoding][seed] = run
    _prepare_study_dir(out_dir, config, overwrite=overwrite)
    env = environment()
    log(
        f"jax_posenc {env['jax_posenc']}, Python {env['python']}, JAX {env['jax']}, "
        f"Flax {env['flax']} on {env['device']} ({env['cpu']}, {env['cpu_count']} cores)"
    )
    if corpus is not None:
        log(
            f"corpus: {corpus.description}: {corpus.train.size} training bytes from "
            f"{len(corpus.train_files)} files, {corpus.heldout.size} held-out bytes from "
            f"{len(corpus.heldout_files)} files (sha256 {corpus_info['sha256'][:12]})"
        )
    results: dict[str, Any] = {
        "task": config.task,
        "config": config.record(),
        "environment": env,
        "corpus": corpus_info,
        "encodings": {},
        "summary": [],
        "complete": False,
        "wall_seconds": 0.0,
    }

    def refresh(*, figure: bool) -> None:
        results["encodings"] = {}
        for name, by_seed in runs.items():
            if by_seed:
                finished = [by_seed[s] for s in sorted(by_seed)]
                results["encodings"][name] = summarize_encoding(finished, results["config"])
                for variant in config.variants(name):
                    row = EXTENSION_ROWS[variant].format(name)
                    results["encodings"][row] = summarize_variant(finished, variant, config)
        results["summary"] = summarize(results)
        results["wall_seconds"] = time.perf_counter() - start
        _write_outputs(out_dir, results, figure=figure)

    todo = [
        (encoding, seed)
        for encoding in config.encodings
        for seed in config.seed_values
        if seed not in runs[encoding]
    ]
    total = len(config.encodings) * config.seeds
    bar = _Progress(
        config, [encoding for encoding, _ in todo], enabled=progress, log=log, every=progress_every
    )
    if total > len(todo):
        bar.log(f"{total - len(todo)} of {total} models done earlier, read back")
    try:
        for number, (encoding, seed) in enumerate(todo, total - len(todo) + 1):
            run_dir = _run_dir(out_dir, encoding, seed)
            done_before = bar.done
            bar.log(f"[{number}/{total}] {encoding} seed {seed}: training {config.steps} steps")
            try:
                if config.task == "lm":
                    run = run_lm(encoding, seed, config, corpus, run_dir, bar)
                    run["corpus_sha256"] = corpus_info["sha256"]
                else:
                    run = run_recall(encoding, seed, config, run_dir, bar)
            except FloatingPointError as error:
                run = {"encoding": encoding, "seed": seed, "error": str(error)}
                bar.advance(bar.per_run(encoding) - (bar.done - done_before))  # the rest
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "result.json").write_text(json.dumps(run, indent=1))
            runs[encoding][seed] = run
            last_seed = all(s in runs[encoding] for s in config.seed_values)
            refresh(figure=last_seed)
            took = run.get("train_seconds", 0) + run.get("eval_seconds", 0)
            outcome = (
                f"failed: {run['error']}"
                if "error" in run
                else f"done in {_duration(took)} (training {_duration(run['train_seconds'])})"
            )
            bar.log(f"[{number}/{total}] {encoding} seed {seed}: {outcome}; {bar.eta_line()}")
    finally:
        bar.close()
    results["complete"] = True
    refresh(figure=True)
    return results


# ------------------------------------------------------------------ command line


def _default(name: str):
    return StudyConfig.__dataclass_fields__[name].default


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from error


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `study` options to `parser`; defaults are `StudyConfig`'s (the CPU preset)."""
    parser.add_argument(
        "--task",
        choices=TASKS,
        default=_default("task"),
        help="lm: byte-level language modelling, perplexity in two evaluation modes; "
        "recall: associative recall, accuracy by length and distance (default lm)",
    )
    parser.add_argument(
        "--encodings",
        type=_name_list,
        default=(),
        metavar="A,B+C,...",
        help="comma-separated registry names, '+' combines (default: every registered one "
        "but "
        + ", ".join(NOT_IN_DEFAULT)
        + ", which --extend evaluates on rope models: "
        + ", ".join(default_encodings())
        + ")",
    )
    parser.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default="cpu",
        help="model and data sizes: cpu (the defaults below, ~10 min on 2 CPU cores) or gpu "
        "("
        + ", ".join(f"{k}={v}" for k, v in PRESETS["gpu"].items())
        + "; sized for ~10 min on one H100); explicit options override the preset",
    )
    options = (
        ("--seeds", "seeds", int, "models per encoding, seeds --seed, --seed + 1, ..."),
        ("--steps", "steps", int, "training steps per model"),
        ("--train-len", "train_len", int, "training sequence length"),
        ("--d-model", "d_model", int, "model width"),
        ("--layers", "layers", int, "transformer blocks"),
        ("--heads", "heads", int, "attention heads"),
        ("--batch-size", "batch_size", int, "sequences per training step"),
        ("--lr", "learning_rate", float, "peak learning rate"),
        (
            "--eval-stride",
            "eval_stride",
            int,
            "sliding-window stride (0: half the training length)",
        ),
        ("--eval-tokens", "eval_tokens", int, "held-out bytes per length (0: automatic)"),
        ("--seed", "seed", int, "first initialization and data seed"),
        ("--train-bytes", "train_bytes", int, "training text budget"),
        ("--heldout-bytes", "heldout_bytes", int, "held-out text budget"),
        ("--max-file-bytes", "max_file_bytes", int, "bytes read from any one file"),
        ("--recall-probes", "recall_probes", int, "recall questions per sequence"),
        ("--recall-distractors", "recall_distractors", int, "recall filler keys"),
        ("--recall-sequences", "recall_eval_sequences", int, "recall sequences per point"),
        (
            "--randomized-positions",
            "randomized_positions",
            int,
            "MAX: train every model on sorted random positions from [0, MAX) and evaluate "
            "with positions drawn the same way (Ruoss et al., 2023), plus a row at positions "
            "0..n-1; MAX >= the longest evaluation length; position-based encodings only; "
            "0: off",
        ),
    )
    for flag, field, kind, text in options:
        parser.add_argument(
            flag, dest=field, type=kind, default=None,
            help=f"{text} (default {_default(field)})",
        )  # fmt: skip
    parser.add_argument(
        "--eval-lens",
        type=_int_list,
        default=(),
        metavar="N,N,...",
        help="evaluation lengths (default: 1x, 2x, 4x, 8x the training length)",
    )
    parser.add_argument(
        "--extend",
        default=None,
        metavar="auto|none|selfextend,linear",
        help="evaluation-only rows for every trained model with a rope part, same parameters, "
        "no further training: selfextend (SelfExtend, Jin et al. 2024: window train_len/2, "
        "the smallest group size that keeps grouped distances below train_len at each "
        "length) and linear (position interpolation, Chen et al. 2023: positions times "
        "train_len/length); auto: both, none with --randomized-positions (default auto)",
    )
    parser.add_argument(
        "--attention",
        choices=ATTENTION_IMPLEMENTATIONS,
        default=_default("attention"),
        help="attention implementation (default xla)",
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(COMPUTE_DTYPES),
        default=_default("dtype"),
        help="compute dtype; parameters stay float32 (default float32)",
    )
    parser.add_argument(
        "--corpus",
        nargs="+",
        default=(),
        metavar="PATH",
        help="local text files or directories (default: the Python standard library source)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default study_out, or recall_out for --task recall)",
    )
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume", action="store_true", help="continue the study already in --out"
    )
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the study already in --out (deletes its results and checkpoints)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    """The `StudyConfig` of parsed `study` arguments: the preset, then explicit options."""
    settings = dict(PRESETS[args.preset])
    for field in dataclasses.fields(StudyConfig):
        value = getattr(args, field.name, None)
        if value is not None:
            settings[field.name] = value
    return StudyConfig(**settings)


def run_from_args(args: argparse.Namespace) -> int:
    """Runs the study as `args` ask, prints the tables, the summary and the outputs."""
    out = Path(args.out or ("recall_out" if args.task == "recall" else "study_out"))
    try:
        config = config_from_args(args)
        results = run_study(
            config, out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress
        )
    except ValueError as error:
        print(f"jax-posenc study: error: {error}", file=sys.stderr)
        return 2
    print()
    print(format_tables(results))
    print(f"\nwall time {_duration(results['wall_seconds'])}")
    for name in ("results.json", "results.md", FIGURES[config.task]):
        print(f"wrote {out / name}")
    return 0
