"""The length-extrapolation study: train short, evaluate long, one model per encoding.

For each encoding, a small decoder-only `Transformer` is trained on byte-level text at
`train_len` tokens, then its held-out loss and perplexity are measured at every length
in `eval_lens` (by default 1x, 2x, 4x and 8x `train_len`). All lengths score the same
held-out bytes, cut into non-overlapping windows (`jax_posenc.data.eval_windows`), so a
number that grows with the length means the model gets worse when it sees positions
(and distances) it was not trained on.

Every model is configured with `max_positions = max(eval_lens)`, so an encoding with a
learned table has rows for every evaluated position: the rows past `train_len` are
never trained (and not weight-decayed) and keep their initial values. Nothing is
clipped; the learned model's numbers past 1x measure exactly that.

Outputs under `out_dir`: `config.json`, one directory per encoding (`checkpoints/`,
`metrics.jsonl`, `result.json`), `results.json`, `results.md` (the table) and
`ppl_vs_length.png`. An interrupted study resumes with `resume=True` (`--resume`):
finished encodings are read back, a half-trained one continues from its checkpoint.
`overwrite=True` (`--overwrite`) replaces a study instead. Every setting is checked
before the first write, so an invalid call leaves no folder behind.

References:
  Press et al., 2022, Train Short, Test Long (the train-short / test-long protocol).
  Kazemnejad et al., 2023, The Impact of Positional Encoding on Length Generalization
    in Transformers (NoPE).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_posenc import _checks, _files, data, plots, registry, train
from jax_posenc.model import (
    ATTENTION_IMPLEMENTATIONS,
    COMPUTE_DTYPES,
    Transformer,
    TransformerConfig,
)

DEFAULT_EVAL_TOKENS = 16_384


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Settings of one study; every field is recorded in `config.json`.

    Attributes:
      encodings: registry names (combinations with "+" allowed); empty for every
        registered encoding.
      steps: training steps per encoding.
      train_len: training sequence length.
      eval_lens: evaluation lengths; empty for 1x, 2x, 4x, 8x `train_len`.
      d_model: model width.
      layers: number of transformer blocks.
      heads: attention heads.
      batch_size: sequences per training step.
      learning_rate: peak AdamW learning rate.
      eval_tokens: held-out bytes scored at every length; 0 for the smallest multiple
        of every evaluation length that is at least 16384.
      attention: "xla" or "blockwise".
      dtype: compute dtype, "float32" or "bfloat16".
      seed: seeds initialization and data order (the same for every encoding).
      corpus: local text files or directories; empty for the Python stdlib source.
      train_bytes: training-text budget.
      heldout_bytes: held-out-text budget.
    """

    encodings: tuple[str, ...] = ()
    steps: int = 500
    train_len: int = 64
    eval_lens: tuple[int, ...] = ()
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    batch_size: int = 32
    learning_rate: float = 3e-3
    eval_tokens: int = 0
    attention: str = "xla"
    dtype: str = "float32"
    seed: int = 0
    corpus: tuple[str, ...] = ()
    train_bytes: int = 2_000_000
    heldout_bytes: int = 300_000

    def __post_init__(self):
        for name in ("steps", "d_model", "layers", "heads", "batch_size"):
            _checks.check_positive_int(name, getattr(self, name))
        for name in ("train_bytes", "heldout_bytes"):
            _checks.check_positive_int(name, getattr(self, name))
        _checks.check_min_int("eval_tokens", self.eval_tokens, 0)
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
        if self.eval_tokens:
            for length in self.eval_lens:
                if self.eval_tokens % length:
                    raise ValueError(
                        f"eval_tokens={self.eval_tokens} must be a multiple of every "
                        f"evaluation length, not of {length}"
                    )
        else:
            step = math.lcm(*self.eval_lens)
            object.__setattr__(self, "eval_tokens", step * max(1, -(-DEFAULT_EVAL_TOKENS // step)))
        object.__setattr__(self, "corpus", tuple(str(path) for path in self.corpus))
        self.train_config()
        for encoding in encodings:
            self.model_config(encoding)

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

    def train_config(self) -> train.TrainConfig:
        return train.TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            seq_len=self.train_len,
            learning_rate=self.learning_rate,
            seed=self.seed,
            checkpoint_every=max(1, self.steps // 4),
            log_every=max(1, min(10, self.steps // 10)),
        )

    def record(self) -> dict[str, Any]:
        """The settings as JSON values."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _encoding_dir(out_dir: Path, encoding: str) -> Path:
    return out_dir / encoding


# What a study writes into its folder; `--overwrite` removes these and nothing else.
_STUDY_FILES = ("config.json", "results.json", "results.md", "ppl_vs_length.png")
_ENCODING_FILES = ("train_config.json", "checkpoints", "metrics.jsonl", "result.json")


def is_study_dir(path: str | Path) -> bool:
    """True when `path` is a folder a study wrote (it holds `config.json`)."""
    return (Path(path) / "config.json").is_file()


def _check_study_dir(out_dir: Path, config: StudyConfig, *, resume: bool, overwrite: bool):
    """Refuses to mix studies, writing nothing: without `resume` or `overwrite` the
    folder must not hold a study, and a resumed study must have the same settings (it
    may list other encodings)."""
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
    changed = [k for k in current if k != "encodings" and saved.get(k) != current[k]]
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
            study_output = child.name in _STUDY_FILES or (
                child.is_dir() and any((child / name).exists() for name in _ENCODING_FILES)
            )
            if study_output and child.is_dir():
                shutil.rmtree(child)
            elif study_output:
                child.unlink()
    if not is_study_dir(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config.record(), indent=1))


def run_encoding(
    encoding: str,
    config: StudyConfig,
    corpus: data.Corpus,
    out_dir: Path,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains (or resumes) one encoding's model and evaluates it at every length."""
    directory = _encoding_dir(out_dir, encoding)
    model = Transformer(config.model_config(encoding))
    start = time.perf_counter()
    result = train.train(
        model,
        config.train_config(),
        corpus.train,
        checkpoint_dir=directory,
        metrics_path=directory / "metrics.jsonl",
        progress=progress,
        description=encoding,
    )
    train_seconds = time.perf_counter() - start
    mesh = train.data_mesh()
    losses = {}
    for length in config.eval_lens:
        windows = data.eval_windows(corpus.heldout, seq_len=length, num_tokens=config.eval_tokens)
        batch_size = max(1, 8192 // length)
        losses[length] = train.evaluate(
            model, result.state.params, windows, batch_size=batch_size, mesh=mesh
        )
    final = result.history[-1]["loss"] if result.history else None
    num_params = sum(int(np.size(x)) for x in jax.tree.leaves(result.state.params))
    return {
        "encoding": encoding,
        "loss": {str(length): loss for length, loss in losses.items()},
        "ppl": {str(length): math.exp(loss) for length, loss in losses.items()},
        "final_train_loss": final,
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - start - train_seconds,
        "num_params": num_params,
    }


def format_table(results: dict[str, Any], *, markdown: bool = False) -> str:
    """Perplexity per encoding and evaluation length, plus the ratio last / first."""
    lengths = results["config"]["eval_lens"]
    train_len = results["config"]["train_len"]
    header = ["encoding"] + [
        f"ppl@{n} ({n // train_len}x)" if n % train_len == 0 else f"ppl@{n}" for n in lengths
    ]
    header.append(f"ppl@{lengths[-1]} / ppl@{lengths[0]}")
    rows = []
    for encoding, entry in results["encodings"].items():
        if "error" in entry:
            rows.append([encoding] + ["failed"] * (len(lengths) + 1))
            continue
        ppl = [entry["ppl"][str(n)] for n in lengths]
        rows.append([encoding] + [f"{p:.3f}" for p in ppl] + [f"{ppl[-1] / ppl[0]:.2f}"])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.rjust(width) if i else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    )


def run_study(
    config: StudyConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs the study; see the module docstring.

    Everything (settings, corpus, that every encoding's model can be built) is checked
    before the first write, so an invalid call leaves no folder behind.

    Args:
      config: the study settings.
      out_dir: output directory (created).
      resume: continue a study already in `out_dir` (same settings required).
      overwrite: replace a study already in `out_dir` (its outputs are deleted).
      progress: show tqdm progress bars while training.
      log: where progress lines go.

    Returns:
      The results dictionary also written to `results.json`: `config`, `corpus`,
      `encodings` (per encoding: `loss` and `ppl` keyed by length, training time, ...),
      `wall_seconds` (of this call).
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    # Everything is checked before the first write, so a typo leaves no folder behind.
    _check_study_dir(out_dir, config, resume=resume, overwrite=overwrite)
    corpus = data.load_corpus(
        config.corpus or None, train_bytes=config.train_bytes, heldout_bytes=config.heldout_bytes
    )
    if corpus.heldout.size <= config.eval_tokens:
        raise ValueError(
            f"the held-out text has {corpus.heldout.size} bytes but eval_tokens="
            f"{config.eval_tokens} are scored at every length; raise --heldout-bytes or "
            "lower --eval-tokens"
        )
    if corpus.train.size <= config.train_len:
        raise ValueError(
            f"the training text has {corpus.train.size} bytes, fewer than train_len="
            f"{config.train_len} + 1; raise --train-bytes or give a larger --corpus"
        )
    _check_models(config)
    _prepare_study_dir(out_dir, config, overwrite=overwrite)
    log(
        f"corpus: {corpus.description}: {corpus.train.size} training bytes from "
        f"{len(corpus.train_files)} files, {corpus.heldout.size} held-out bytes from "
        f"{len(corpus.heldout_files)} files"
    )
    entries = {}
    for index, encoding in enumerate(config.encodings, 1):
        path = _encoding_dir(out_dir, encoding) / "result.json"
        if path.exists():
            entries[encoding] = _files.read_json(path)
            log(f"[{index}/{len(config.encodings)}] {encoding}: done earlier, read back")
            continue
        log(f"[{index}/{len(config.encodings)}] {encoding}: training {config.steps} steps")
        try:
            entries[encoding] = run_encoding(encoding, config, corpus, out_dir, progress=progress)
        except FloatingPointError as error:
            entries[encoding] = {"encoding": encoding, "error": str(error)}
        path.write_text(json.dumps(entries[encoding], indent=1))
    results = {
        "config": config.record(),
        "corpus": {
            "description": corpus.description,
            "train_bytes": int(corpus.train.size),
            "heldout_bytes": int(corpus.heldout.size),
            "train_files": len(corpus.train_files),
            "heldout_files": len(corpus.heldout_files),
        },
        "encodings": entries,
        "wall_seconds": time.perf_counter() - start,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    (out_dir / "results.md").write_text(format_table(results, markdown=True) + "\n")
    plots.plot_study(results, out_dir / "ppl_vs_length.png")
    return results


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
    """Adds the `study` options to `parser`; defaults are `StudyConfig`'s."""
    parser.add_argument(
        "--encodings",
        type=_name_list,
        default=(),
        metavar="A,B+C,...",
        help="comma-separated registry names, '+' combines (default: every registered one: "
        + ", ".join(registry.available_encodings())
        + ")",
    )
    options = (
        ("--steps", "steps", int, "training steps per encoding"),
        ("--train-len", "train_len", int, "training sequence length"),
        ("--d-model", "d_model", int, "model width"),
        ("--layers", "layers", int, "transformer blocks"),
        ("--heads", "heads", int, "attention heads"),
        ("--batch-size", "batch_size", int, "sequences per training step"),
        ("--lr", "learning_rate", float, "peak learning rate"),
        ("--eval-tokens", "eval_tokens", int, "held-out bytes per length (0: automatic)"),
        ("--seed", "seed", int, "initialization and data seed"),
        ("--train-bytes", "train_bytes", int, "training text budget"),
        ("--heldout-bytes", "heldout_bytes", int, "held-out text budget"),
    )
    for flag, field, kind, text in options:
        parser.add_argument(
            flag, dest=field, type=kind, default=_default(field),
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
    parser.add_argument("--out", default="study_out", help="output folder (default study_out)")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume", action="store_true", help="continue the study already in --out"
    )
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the study already in --out (deletes its results and checkpoints)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_from_args(args: argparse.Namespace) -> int:
    """Runs the study as `args` ask, prints the table and where the outputs went."""
    fields = [f.name for f in dataclasses.fields(StudyConfig)]
    try:
        config = StudyConfig(**{name: getattr(args, name) for name in fields})
        results = run_study(
            config,
            args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except ValueError as error:
        print(f"jax-posenc study: error: {error}", file=sys.stderr)
        return 2
    print()
    print(format_table(results))
    print(f"\nwall time {results['wall_seconds']:.0f} s")
    out = Path(args.out)
    for name in ("results.json", "results.md", "ppl_vs_length.png"):
        print(f"wrote {out / name}")
    return 0
