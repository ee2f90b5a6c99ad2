"""Matplotlib figures: the study's perplexity curves and a gallery of the encodings.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas (no pyplot, no
display, no global state), so they work on headless machines and inside tests. Every
number plotted comes from the library's own functions.

Gallery (`gallery`, the `jax-posenc plot` command):

* `sinusoidal.png`: the sinusoidal table `[position, feature]` (Vaswani et al., 2017).
* `rope_similarity.png`: `<RoPE(q, m), RoPE(k, 0)> / D` for `q = k = 1` against the
  relative distance m (the long-term decay of Su et al., 2021, section 3.4.3), for plain
  RoPE and every context-extension scaling, each next to plain RoPE.
* `<name>_bias.png` for every registered encoding with a logit bias (ALiBi, T5, KERPLE,
  FIRE, dynamic position bias, ...): its `[query, key]` bias matrix per head under a
  causal mask. With `study_dir`, learned biases are read from the first layer of the
  study's trained models; otherwise they are shown at initialization.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from jax_posenc import _files, absolute, registry, rope, rope_scaling, train


def _figure(**kwargs) -> Figure:
    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_study(results: Mapping[str, Any], path: str | Path) -> Path:
    """Held-out perplexity against evaluation length, one line per encoding.

    Args:
      results: the dictionary `jax_posenc.study.run_study` returns.
      path: PNG file to write.
    """
    config = results["config"]
    lengths = config["eval_lens"]
    figure = _figure(figsize=(8.5, 4.8))
    axes = figure.subplots()
    curves = [(name, entry) for name, entry in results["encodings"].items() if "ppl" in entry]
    # tab20 has 20 distinct colours; markers and dashes tell neighbours apart in greyscale.
    colours = colormaps["tab20"](np.linspace(0, 1, 20))[:: max(1, 20 // max(1, len(curves)))]
    for index, (encoding, entry) in enumerate(curves):
        ppl = [entry["ppl"][str(n)] for n in lengths]
        axes.plot(
            lengths,
            ppl,
            color=colours[index % len(colours)],
            marker="os^vD<>"[index % 7],
            linestyle=("-", "--")[index % 2],
            label=encoding,
        )
    axes.axvline(config["train_len"], color="grey", linestyle="--", linewidth=1)
    axes.annotate(
        "training length",
        (config["train_len"], 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(4, -12),
        textcoords="offset points",
        color="grey",
        fontsize=8,
    )
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(ScalarFormatter())
    axes.yaxis.set_minor_formatter(ScalarFormatter())
    axes.set_xticks(lengths, [str(n) for n in lengths])
    axes.set_xlabel("evaluation length (tokens)")
    axes.set_ylabel("held-out perplexity (per byte, log scale)")
    axes.set_title(
        f"Length extrapolation: trained at {config['train_len']} tokens, "
        f"{config['steps']} steps, d_model={config['d_model']}, {config['layers']} layers"
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(figure, path)


def plot_sinusoidal(path: str | Path, *, num_positions: int = 256, dim: int = 128) -> Path:
    """Heatmap of `sinusoidal_encoding(arange(num_positions), dim)`."""
    table = np.asarray(absolute.sinusoidal_encoding(jnp.arange(num_positions), dim))
    figure = _figure(figsize=(7, 5))
    axes = figure.subplots()
    image = axes.imshow(
        table, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest"
    )
    figure.colorbar(image, ax=axes)
    axes.set_xlabel("feature (pairs: sin at 2i, cos at 2i + 1)")
    axes.set_ylabel("position")
    axes.set_title(f"Sinusoidal encoding, dim {dim}: wavelengths 2\u03c0 to 2\u03c0\u00b710000")
    return _save(figure, path)


def rope_scalings(
    rotary_dim: int, factor: float = 4.0, original: int = 2048
) -> dict[str, rope_scaling.RopeScaling]:
    """One example of every context-extension scaling, extending `original` by `factor`.

    LongRoPE's factors are searched per model; here they are illustrative (short: 1,
    long: rising geometrically from 1 for the fastest pair to `factor` for the slowest).
    """
    pairs = rotary_dim // 2
    return {
        f"linear (PI), factor {factor:g}": rope_scaling.LinearScaling(factor),
        f"NTK-aware, factor {factor:g}": rope_scaling.NTKScaling(factor),
        f"dynamic NTK, factor {factor:g}": rope_scaling.DynamicNTKScaling(factor, original),
        f"YaRN, factor {factor:g}": rope_scaling.YarnScaling(factor, original),
        f"Llama 3, factor {factor:g}": rope_scaling.Llama3Scaling(factor, 1.0, 4.0, original),
        "LongRoPE (illustrative factors)": rope_scaling.LongRopeScaling(
            short_factor=(1.0,) * pairs,
            long_factor=tuple(np.geomspace(1.0, factor, pairs)),
            original_max_position_embeddings=original,
            factor=factor,
        ),
    }


def rope_similarity(
    distances: int, head_dim: int, scaling: rope_scaling.RopeScaling | None
) -> np.ndarray:
    """`<RoPE(1, m), RoPE(1, 0)> / head_dim` for m in `[0, distances)`, via `apply_rope`."""
    ones = jnp.ones((1, distances, 1, head_dim), jnp.float32)
    rotated = rope.apply_rope(ones, jnp.arange(distances), scaling=scaling, seq_len=distances)[
        0, :, 0
    ]
    return np.asarray(rotated @ rotated[0]) / head_dim


def plot_rope_similarity(
    path: str | Path, *, head_dim: int = 128, distances: int = 8192, original: int = 2048
) -> Path:
    """Query-key similarity against relative distance: plain RoPE and every scaling."""
    plain = rope_similarity(distances, head_dim, None)
    scalings = rope_scalings(head_dim, original=original)
    columns = 2
    rows = math.ceil(len(scalings) / columns)
    figure = _figure(figsize=(11, 2.6 * rows))
    grid = figure.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)
    for axes, (name, scaling) in zip(grid.flat, scalings.items(), strict=False):
        axes.plot(plain, color="lightgrey", linewidth=1, label="plain RoPE")
        axes.plot(rope_similarity(distances, head_dim, scaling), linewidth=1, label=name)
        axes.axvline(original, color="grey", linestyle="--", linewidth=0.8)
        axes.legend(fontsize=7, loc="upper right")
        axes.grid(alpha=0.3)
    for axes in grid[-1]:
        axes.set_xlabel("relative distance m")
    for axes in grid[:, 0]:
        axes.set_ylabel("similarity")
    figure.suptitle(
        f"RoPE: <R(m) q, R(0) k> / D for q = k = 1, D = {head_dim}, base 10000; "
        f"dashed line: original context {original}"
    )
    return _save(figure, path)


def _bias_module(encoding: str, *, length: int, num_heads: int, head_dim: int):
    factory = registry.get_encoding(encoding).logit_bias
    if factory is None:
        raise ValueError(f"encoding {encoding!r} has no logit bias to plot")
    spec = registry.EncodingSpec(
        d_model=num_heads * head_dim,
        num_heads=num_heads,
        head_dim=head_dim,
        max_positions=length,
        causal=True,
    )
    return factory(spec)


def bias_matrix(
    encoding: str,
    *,
    length: int = 64,
    num_heads: int = 8,
    head_dim: int = 16,
    params: Any | None = None,
) -> np.ndarray:
    """The logit bias `[H, length, length]` of a registered bias encoding.

    The module comes from the registry factory (a causal model's spec); `params` are its
    variables (e.g. trained ones), or None for its initialization with key 0.
    """
    module = _bias_module(encoding, length=length, num_heads=num_heads, head_dim=head_dim)
    positions = jnp.arange(length)[None]
    if params is None:
        params = module.init(jax.random.key(0), positions, positions)
    return np.asarray(module.apply(params, positions, positions))[0]


def _has_parameters(encoding: str) -> bool:
    module = _bias_module(encoding, length=2, num_heads=8, head_dim=16)
    positions = jnp.arange(2)[None]
    shapes = jax.eval_shape(module.init, jax.random.key(0), positions, positions)
    return bool(jax.tree.leaves(shapes))


def plot_bias_matrices(
    encoding: str, path: str | Path, *, params: Any | None = None, note: str = "", **kwargs
) -> Path:
    """One heatmap per head of `bias_matrix(encoding, ...)`, keys after the query hidden."""
    bias = bias_matrix(encoding, params=params, **kwargs)
    heads, length, _ = bias.shape
    causal = np.tril(np.ones((length, length), bool))
    shown = np.where(causal, bias, np.nan)
    columns = min(heads, 4)
    rows = math.ceil(heads / columns)
    figure = _figure(figsize=(3 * columns, 2.9 * rows))
    grid = figure.subplots(rows, columns, squeeze=False)
    low, high = np.nanmin(shown), np.nanmax(shown)
    for head, axes in enumerate(grid.flat):
        if head >= heads:
            axes.axis("off")
            continue
        image = axes.imshow(shown[head], cmap="viridis", vmin=low, vmax=high)
        axes.set_title(f"head {head}", fontsize=9)
        axes.set_xlabel("key position", fontsize=8)
        axes.set_ylabel("query position", fontsize=8)
    figure.colorbar(image, ax=grid.ravel().tolist(), shrink=0.8, label="logit bias")
    figure.suptitle(f"{encoding}: {registry.get_encoding(encoding).description}\n{note}")
    return _save(figure, path)


_STUDY_KEYS = ("heads", "d_model", "eval_lens", "train_len")


def _study_record(study_dir: Path) -> dict[str, Any]:
    """The settings of the study in `study_dir`; ValueError unless it is a study folder."""
    if not study_dir.is_dir():
        raise ValueError(f"--study {str(study_dir)!r} is not a folder")
    path = study_dir / "config.json"
    if not path.is_file():
        raise ValueError(
            f"--study {str(study_dir)!r} is not a study folder (it has no config.json); "
            "pass the --out folder of `jax-posenc study`"
        )
    record = _files.read_json(path)
    missing = [key for key in _STUDY_KEYS if key not in record]
    if missing:
        raise ValueError(f"{str(path)!r} is not a study config.json: it lacks {missing}")
    return record


def _trained_bias_params(study_dir: Path, encoding: str, record: Mapping[str, Any]):
    """Layer-0 variables of `encoding`'s bias in a study's latest intact checkpoint, the
    sizes of that model and a caption; None when the study has no such checkpoint."""
    directory = study_dir / encoding / "checkpoints"
    if not directory.is_dir():
        return None
    manager = ocp.CheckpointManager(directory.absolute())
    try:
        restored = train.restore_latest(manager)
    finally:
        manager.close()
    if restored is None:
        return None
    step, state = restored
    params = state["params"]["params"]["layers_0"]["attention"].get(f"{encoding}_logit_bias")
    if params is None:
        return None
    sizes = dict(
        num_heads=record["heads"],
        head_dim=record["d_model"] // record["heads"],
        length=max(record["eval_lens"]),
    )
    note = (
        f"trained: layer 0 of the study's model after {step} steps at "
        f"{record['train_len']} tokens, shown up to {sizes['length']}"
    )
    return {"params": params}, sizes, note


def trained_biases(study_dir: str | Path) -> dict[str, tuple[Any, dict[str, int], str]]:
    """`{encoding: (variables, sizes, caption)}` for every bias encoding a study trained.

    Raises:
      ValueError: `study_dir` is missing, not a study folder, or holds no trained model
        with a logit bias.
    """
    study_dir = Path(study_dir)
    record = _study_record(study_dir)
    biases = [
        name
        for name in registry.available_encodings()
        if registry.get_encoding(name).logit_bias is not None
    ]
    trained = {}
    for encoding in biases:
        found = _trained_bias_params(study_dir, encoding, record)
        if found is not None:
            trained[encoding] = found
    if not trained:
        raise ValueError(
            f"--study {str(study_dir)!r} holds no trained model with a logit bias "
            f"(one of {', '.join(biases)}); train one with `jax-posenc study --encodings ...`"
        )
    return trained


def gallery(out_dir: str | Path, *, study_dir: str | Path | None = None) -> list[Path]:
    """Writes the gallery PNGs (see the module docstring) and returns their paths.

    With `study_dir`, the study is read (see `trained_biases`) before anything is written.
    """
    trained_by_encoding = {} if study_dir is None else trained_biases(study_dir)
    out_dir = Path(out_dir)
    paths = [plot_sinusoidal(out_dir / "sinusoidal.png")]
    paths.append(plot_rope_similarity(out_dir / "rope_similarity.png"))
    for encoding in registry.available_encodings():
        if registry.get_encoding(encoding).logit_bias is None:
            continue
        trained = trained_by_encoding.get(encoding)
        if trained is None:
            note = (
                "parameters at initialization (a study directory shows trained ones)"
                if _has_parameters(encoding)
                else "fixed: no learned parameters"
            )
            path = plot_bias_matrices(encoding, out_dir / f"{encoding}_bias.png", note=note)
        else:
            params, sizes, note = trained
            path = plot_bias_matrices(
                encoding, out_dir / f"{encoding}_bias.png", params=params, note=note, **sizes
            )
        paths.append(path)
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `plot` options to `parser`."""
    parser.add_argument("--out", default="plots", help="output folder (default plots)")
    parser.add_argument(
        "--study",
        metavar="DIR",
        help="a `jax-posenc study` output folder: plot its trained biases instead of "
        "biases at initialization",
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Writes the gallery as `args` ask and prints the paths; 2 on a bad `--study`."""
    try:
        paths = gallery(args.out, study_dir=args.study)
    except ValueError as error:
        print(f"jax-posenc plot: error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0
