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
from jax_posenc import _checks, _files, data, plots, registry, train
from jax_posenc.model import (
    ATTENTION_IMPLEMENTATIONS,
    COMPUTE_DTYPES,
    Transformer,
    TransformerConfig,
)

DEFAULT_EVAL_TOKENS = 8192
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
        encodings = tuple(self.encodings) or registry.available_encodings()
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
        if self.task == "recall":
            for length in (train_len, *self.eval_lens):
                self.recall_batch(batch_size=1, seq_len=length, step=0, seed=0)
        self.train_config(self.seed)
        for encoding in encodings:
            self.model_config(encoding)

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
            max_positions=max(self.train_len, *self.eval_lens),
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
    changed = [k for k in current if k not in free and saved.get(k) != current[k]]
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
        model = Transformer(config.model_config(encoding))
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

    def __init__(self, config: StudyConfig, pending: int, *, enabled: bool, log, every=30.0):
        self.per_run = config.steps + sum(units for _, units in _eval_jobs(config))
        self.total = pending * self.per_run
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
    mesh = train.data_mesh()
    context = max(config.eval_lens)  # skipped bytes: the first sliding window's context
    losses: dict[str, dict[str, float]] = {mode: {} for mode in MODES}
    for (mode, length), units in _eval_jobs(config):
        progress.describe(f"{label}: evaluating {MODE_TITLES[mode]} of {length}")
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
        advanced = [0.0]

        def callback(done: int, total: int, units=units, advanced=advanced) -> None:
            progress.advance(units * done / total - advanced[0])
            advanced[0] = units * done / total

        losses[mode][str(length)] = train.evaluate(
            model,
            result.state.params,
            windows,
            batch_size=max(1, 8192 // length),
            mesh=mesh,
            token_weights=weights,
            callback=callback,
        )
    return {
        "encoding": encoding,
        "seed": seed,
        "loss": losses,
        "ppl": {m: {n: math.exp(v) for n, v in by_len.items()} for m, by_len in losses.items()},
        "final_train_loss": result.history[-1]["loss"] if result.history else None,
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - start - train_seconds,
        "num_params": sum(int(np.size(x)) for x in jax.tree.leaves(result.state.params)),
    }


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
                    runs[encoding][seed] = _read_run(path, corpus_info)
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
        results["encodings"] = {
            name: summarize_encoding([by_seed[s] for s in sorted(by_seed)], results["config"])
            for name, by_seed in runs.items()
            if by_seed
        }
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
    bar = _Progress(config, len(todo), enabled=progress, log=log, every=progress_every)
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
                bar.advance(bar.per_run - (bar.done - done_before))  # this model's rest
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
        help="comma-separated registry names, '+' combines (default: every registered one: "
        + ", ".join(registry.available_encodings())
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
