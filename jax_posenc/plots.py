"""Matplotlib figures: the study's results and a gallery of the encodings.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas (no pyplot, no
display, no global state), so they work on headless machines and inside tests. Every
number plotted comes from the library's own functions. Fonts are at least 9 points
and tick labels are plain numbers, so the figures read when printed.

Study figures (`plot_study`): encodings are grouped by family (one colour per family:
absolute, rotary, bias, relative, none; one line style and marker per member), the
seed spread is a band (min to max over seeds) around the mean, and the training length
is marked. Language modelling: perplexity against evaluation length, one panel per
evaluation mode. Recall: accuracy against evaluation length and against distance.

Gallery (`gallery`, the `jax-posenc plot` command): one `<encoding>.png` per registered
encoding, drawn with one head count and model width throughout (those of the study
with `study_dir`, with its trained parameters; otherwise those of the default study,
with parameters at initialization), and `rope_scalings.png`:

* additive biases: the bias against the query-key distance, one curve per head, with
  the training length marked; a heat map `[query, key]` only where the bias is not a
  function of the distance alone (FIRE once its threshold is inside the window);
* relative terms (Shaw, Transformer-XL): the positional part of the logit of a fixed
  random query against the distance, one curve per head;
* input embeddings (sinusoidal, learned): the table `[position, feature]` and the
  cosine similarity of its rows;
* RoPE: the wavelength of each frequency band against the training length; xPos: its
  per-band decay against the distance; SelfExtend: the relative position its rotation
  uses against the true distance; NoPE: the only positional signal it has, the uniform
  causal attention weight `1 / (t + 1)`;
* biases computed from the tokens (FoX): the bias of one random input against the
  distance, one curve per head;
* `rope_scalings.png`: what each context-extension scaling does to each band
  (wavelength, and frequency ratio to plain RoPE), with the original context marked.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter, NullLocator

from jax_posenc import _files, content, registry, rope, rope_scaling, train

FAMILY_COLOURS = {
    "absolute": "#1f77b4",
    "rotary": "#d62728",
    "bias": "#2ca02c",
    "relative": "#9467bd",
    "content": "#ff7f0e",
    "none": "#222222",
    "combined": "#8c564b",
    "other": "#7f7f7f",
}
_ROLE_FAMILIES = {
    "input_embedding": "absolute",
    "qk_transform": "rotary",
    "logit_bias": "bias",
    "relative_terms": "relative",
    "token_bias": "content",
    "contextual_bias": "content",
}
_LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (8, 2)))
_MARKERS = ("o", "s", "^", "D", "v", "P")
_FONT = 10


def family(encoding: str) -> str:
    """The family of an encoding, from what its registry entry contributes; a study's
    evaluation-only row ("rope → linear PI (eval only)") has its trained encoding's."""
    parts = registry.resolve(encoding.split(" ")[0])
    if len(parts) > 1:
        return "combined"
    roles = parts[0].contributes
    return _ROLE_FAMILIES.get(roles[0], "other") if roles else "none"


def encoding_styles(encodings: list[str]) -> dict[str, dict[str, Any]]:
    """Plot styles: a colour per family, a line style and marker per member (sorted)."""
    styles: dict[str, dict[str, Any]] = {}
    members: dict[str, int] = {}
    for name in sorted(encodings, key=lambda n: (list(FAMILY_COLOURS).index(family(n)), n)):
        kind = family(name)
        index = members.get(kind, 0)
        members[kind] = index + 1
        styles[name] = {
            "color": FAMILY_COLOURS[kind],
            "linestyle": _LINE_STYLES[index % len(_LINE_STYLES)],
            "marker": _MARKERS[index % len(_MARKERS)],
        }
    return styles


def _figure(**kwargs) -> Figure:
    figure = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _plain_log_axis(axis, ticks) -> None:
    """Log axis with a plain label at each of `ticks` and no other labels."""
    axis.set_major_locator(FixedLocator(list(ticks)))
    axis.set_major_formatter(FixedFormatter([_plain(t) for t in ticks]))
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())


def _plain(value: float) -> str:
    """A tick label without exponents: 20000 as "20,000", 0.25 as "0.25"."""
    if value >= 1 and float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:.3g}"


def _nice_ticks(low: float, high: float) -> list[float]:
    """Round values for a log axis between `low` and `high`: the densest of the 1-2-5
    style sequences that gives at most 8 ticks."""
    sequences = ((1, 1.5, 2, 3, 4, 5, 6, 7, 8), (1, 2, 3, 5), (1, 2, 5), (1, 3), (1,))
    for mantissas in sequences:
        candidates = [m * 10.0**e for e in range(-4, 8) for m in mantissas]
        inside = [float(f"{c:.6g}") for c in candidates if low <= c <= high]
        if len(inside) <= 8:
            break
    if len(inside) >= 3:
        return inside
    return sorted({float(f"{v:.2g}") for v in np.geomspace(low, high, 5)[1:-1]})


def _distance_axes(
    axes, ylabel: str, *, legend_size: int = _FONT - 1, ncol: int = 1, ticks: bool = True
) -> None:
    """Labels, legend and grid of a panel that plots something against distance."""
    axes.set_xlabel("query - key distance (tokens)", fontsize=_FONT)
    axes.set_ylabel(ylabel, fontsize=_FONT)
    axes.legend(fontsize=legend_size, ncol=ncol)
    axes.grid(alpha=0.3)
    if ticks:
        axes.tick_params(labelsize=_FONT)


def _mark_training_length(axes, train_len: int, text: str = "training length") -> None:
    axes.axvline(train_len, color="grey", linestyle="--", linewidth=1)
    axes.annotate(
        text,
        (train_len, 0.5),
        xycoords=("data", "axes fraction"),
        xytext=(3, 0),
        textcoords="offset points",
        rotation=90,
        ha="left",
        va="center",
        color="grey",
        fontsize=_FONT - 1,
    )


def _curves(axes, xs, entries, metric, group, styles) -> None:
    """Mean line and min..max band of `entries[name][metric][group][x]` per encoding."""
    for name in styles:
        stats = entries[name].get(metric, {}).get(group)
        if not stats:
            continue
        points = [(x, stats[str(x)]) for x in xs if str(x) in stats]
        x = [p for p, _ in points]
        style = styles[name]
        axes.plot(
            x, [s["mean"] for _, s in points], label=name, linewidth=1.6, markersize=5, **style
        )
        if any(s["n"] > 1 for _, s in points):
            axes.fill_between(
                x,
                [s["min"] for _, s in points],
                [s["max"] for _, s in points],
                color=style["color"],
                alpha=0.12,
                linewidth=0,
            )


def _legend(figure: Figure, axes, styles) -> None:
    handles, labels = axes.get_legend_handles_labels()
    order = [labels.index(name) for name in styles if name in labels]
    figure.legend(
        [handles[i] for i in order],
        [f"{labels[i]} ({family(labels[i])})" for i in order],
        loc="outside right center",
        fontsize=_FONT,
        frameon=False,
    )


def _study_title(config: Mapping[str, Any]) -> str:
    seeds = config.get("seeds", 1)
    spread = f"band: min..max over {seeds} seeds" if seeds > 1 else "one seed"
    return (
        f"trained at {config['train_len']} tokens, {config['steps']} steps, "
        f"d_model {config['d_model']}, {config['layers']} layers, {config['heads']} heads; "
        f"{spread}"
    )


def plot_study(results: Mapping[str, Any], path: str | Path) -> Path:
    """The study's figure: perplexity (language model) or accuracy (recall) curves.

    Args:
      results: the dictionary `jax_posenc.study.run_study` returns.
      path: PNG file to write.
    """
    if results["config"].get("task", "lm") == "recall":
        return _plot_recall(results, path)
    return _plot_perplexity(results, path)


def _plot_perplexity(results: Mapping[str, Any], path: str | Path) -> Path:
    config = results["config"]
    lengths = config["eval_lens"]
    entries = {n: e for n, e in results["encodings"].items() if "ppl" in e}
    styles = encoding_styles(list(entries))
    modes = ("nonoverlapping", "sliding")
    figure = _figure(figsize=(12, 5.2))
    panels = figure.subplots(1, 2, sharey=True)
    values = [
        s[k]
        for e in entries.values()
        for mode in modes
        for s in e["ppl"].get(mode, {}).values()
        for k in ("min", "max")
    ]
    for axes, mode in zip(panels, modes, strict=True):
        _curves(axes, lengths, entries, "ppl", mode, styles)
        _mark_training_length(axes, config["train_len"])
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        _plain_log_axis(axes.xaxis, lengths)
        if values:
            low, high = min(values) * 0.97, max(values) * 1.03
            axes.set_ylim(low, high)
            _plain_log_axis(axes.yaxis, _nice_ticks(low, high))
        axes.set_xlabel("evaluation length (tokens)", fontsize=_FONT)
        title = "non-overlapping windows"
        if mode == "sliding":
            title = f"sliding windows, stride {config.get('eval_stride', '?')}"
        axes.set_title(title, fontsize=_FONT + 1)
        axes.grid(True, which="major", alpha=0.3)
        axes.tick_params(labelsize=_FONT)
    panels[0].set_ylabel("held-out perplexity per byte (log scale)", fontsize=_FONT)
    figure.suptitle(
        f"Length extrapolation, byte-level language model: {_study_title(config)}",
        fontsize=_FONT + 1,
    )
    _legend(figure, panels[0], styles)
    return _save(figure, path)


def _plot_recall(results: Mapping[str, Any], path: str | Path) -> Path:
    config = results["config"]
    lengths = config["eval_lens"]
    entries = {n: e for n, e in results["encodings"].items() if "accuracy" in e}
    styles = encoding_styles(list(entries))
    distances = sorted(
        {int(d) for e in entries.values() for d in e["accuracy"]["by_distance"]}
    ) or [config["train_len"]]
    figure = _figure(figsize=(12, 5.2))
    panels = figure.subplots(1, 2, sharey=True)
    panels_spec = (
        (panels[0], lengths, "by_length", "evaluation length (tokens; stores anywhere)"),
        (
            panels[1],
            distances,
            "by_distance",
            f"store-to-query distance (tokens) at length {lengths[-1]}",
        ),
    )
    for axes, xs, group, label in panels_spec:
        _curves(axes, xs, entries, "accuracy", group, styles)
        _mark_training_length(
            axes,
            config["train_len"],
            "training length" if group == "by_length" else "longest trained distance",
        )
        axes.axhline(1 / 15, color="grey", linestyle=":", linewidth=1)
        axes.annotate(
            "chance (1/15)",
            (xs[0], 1 / 15),
            xytext=(0, 3),
            textcoords="offset points",
            color="grey",
            fontsize=_FONT - 1,
        )
        axes.set_xscale("log", base=2)
        _plain_log_axis(axes.xaxis, xs)
        axes.set_ylim(0, 1.02)
        axes.set_xlabel(label, fontsize=_FONT)
        axes.grid(True, which="major", alpha=0.3)
        axes.tick_params(labelsize=_FONT)
    panels[0].set_title("accuracy by length", fontsize=_FONT + 1)
    panels[1].set_title("accuracy by distance", fontsize=_FONT + 1)
    panels[0].set_ylabel("recall accuracy", fontsize=_FONT)
    figure.suptitle(f"Associative recall: {_study_title(config)}", fontsize=_FONT + 1)
    _legend(figure, panels[0], styles)
    return _save(figure, path)


# ------------------------------------------------------------------ gallery


@dataclasses.dataclass(frozen=True)
class GallerySizes:
    """The sizes every gallery figure uses (the default study's unless a study is given).

    Attributes:
      heads: attention heads (the same in every figure).
      head_dim: features per head.
      train_len: the training length marked in the figures.
      length: the longest position shown (the longest evaluation length).
    """

    heads: int = 4
    head_dim: int = 16
    train_len: int = 64
    length: int = 512

    @property
    def d_model(self) -> int:
        return self.heads * self.head_dim


def _module(encoding: str, role: str, sizes: GallerySizes):
    factory = getattr(registry.get_encoding(encoding), role)
    spec = registry.EncodingSpec(
        d_model=sizes.d_model,
        num_heads=sizes.heads,
        head_dim=sizes.head_dim,
        max_positions=sizes.length,
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
    if registry.get_encoding(encoding).logit_bias is None:
        raise ValueError(f"encoding {encoding!r} has no logit bias to plot")
    sizes = GallerySizes(heads=num_heads, head_dim=head_dim, length=length)
    module = _module(encoding, "logit_bias", sizes)
    positions = jnp.arange(length)[None]
    if params is None:
        params = module.init(jax.random.key(0), positions, positions)
    return np.asarray(module.apply(params, positions, positions))[0]


def bias_by_distance(bias: np.ndarray) -> np.ndarray | None:
    """`[H, L]` bias of the last query against distance 0..L-1 when the causal part of
    `bias` `[H, L, L]` depends on the distance alone (to float32 rounding), else None."""
    length = bias.shape[1]
    curves = bias[:, -1, ::-1]  # distance d = (L - 1) - key
    rows, cols = np.tril_indices(length)
    expected = curves[:, rows - cols]
    scale = max(float(np.abs(bias[:, rows, cols]).max()), 1e-30)
    if np.abs(bias[:, rows, cols] - expected).max() <= 1e-5 * scale:
        return curves
    return None


def _head_colours(heads: int):
    return colormaps["viridis"](np.linspace(0.0, 0.9, heads))


def _caption(trained: Mapping[str, Any] | None, has_parameters: bool) -> str:
    if trained is not None:
        return trained["caption"]
    if has_parameters:
        return "parameters at initialization (`plot --study DIR` shows trained ones)"
    return "fixed: no learned parameters"


def _variables(module, trained, role, *args):
    if trained is not None and role in trained["variables"]:
        return {"params": trained["variables"][role]}
    return module.init(jax.random.key(0), *args)


def _plot_bias(encoding, path, sizes, trained) -> Path:
    module = _module(encoding, "logit_bias", sizes)
    positions = jnp.arange(sizes.length)[None]
    variables = _variables(module, trained, "logit_bias", positions, positions)
    bias = np.asarray(module.apply(variables, positions, positions))[0]
    caption = _caption(trained, bool(jax.tree.leaves(variables)))
    curves = bias_by_distance(bias)
    if curves is not None:
        figure = _figure(figsize=(7.5, 4.6))
        axes = figure.subplots()
        for head, colour in enumerate(_head_colours(sizes.heads)):
            axes.plot(np.arange(sizes.length), curves[head], color=colour, label=f"head {head}")
        _mark_training_length(axes, sizes.train_len)
        _distance_axes(axes, "logit bias")
    else:
        columns = min(sizes.heads, 4)
        rows = math.ceil(sizes.heads / columns)
        figure = _figure(figsize=(3.2 * columns, 3.1 * rows + 0.6))
        grid = figure.subplots(rows, columns, squeeze=False)
        causal = np.tril(np.ones((sizes.length, sizes.length), bool))
        shown = np.where(causal, bias, np.nan)
        low, high = np.nanmin(shown), np.nanmax(shown)
        for head, axes in enumerate(grid.flat):
            if head >= sizes.heads:
                axes.axis("off")
                continue
            image = axes.imshow(shown[head], cmap="viridis", vmin=low, vmax=high)
            axes.axhline(sizes.train_len, color="white", linestyle="--", linewidth=0.8)
            axes.set_title(f"head {head}", fontsize=_FONT)
            axes.set_xlabel("key position", fontsize=_FONT - 1)
            axes.set_ylabel("query position", fontsize=_FONT - 1)
        figure.colorbar(image, ax=grid.ravel().tolist(), shrink=0.8, label="logit bias")
        caption += (
            f"; the bias depends on the query position as well as the distance, so it is "
            f"shown [query, key]; dashed: query = training length {sizes.train_len}"
        )
    description = registry.get_encoding(encoding).description
    figure.suptitle(f"{encoding}: {description}\n{caption}", fontsize=_FONT)
    return _save(figure, path)


def _plot_relative(encoding, path, sizes, trained) -> Path:
    module = _module(encoding, "relative_terms", sizes)
    length, heads, head_dim = sizes.length, sizes.heads, sizes.head_dim
    query = jax.random.normal(jax.random.key(1), (1, 1, heads, head_dim))
    keys = jnp.zeros((1, length, heads, head_dim))
    q_positions, k_positions = jnp.array([[length - 1]]), jnp.arange(length)[None]
    variables = _variables(module, trained, "relative_terms", query, keys, q_positions, k_positions)
    # Zero keys remove the content term: what is left is the positional part of the logit.
    logits = np.asarray(module.apply(variables, query, keys, q_positions, k_positions))
    curves = logits[0, :, 0, ::-1]
    figure = _figure(figsize=(7.5, 4.6))
    axes = figure.subplots()
    for head, colour in enumerate(_head_colours(heads)):
        axes.plot(np.arange(length), curves[head], color=colour, label=f"head {head}")
    _mark_training_length(axes, sizes.train_len)
    clip = getattr(module, "max_relative_position", None)
    if clip is not None:
        axes.axvline(clip, color="black", linestyle=":", linewidth=1)
        axes.annotate(
            f"clipping distance {clip}",
            (clip, 0.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, 4),
            textcoords="offset points",
            fontsize=_FONT - 1,
        )
    _distance_axes(axes, "positional part of the logit")
    caption = _caption(trained, True)
    figure.suptitle(
        f"{encoding}: {registry.get_encoding(encoding).description}\n"
        f"one fixed random query (N(0, 1) features) against keys at every distance; {caption}",
        fontsize=_FONT,
    )
    return _save(figure, path)


def _plot_input_embedding(encoding, path, sizes, trained) -> Path:
    module = _module(encoding, "input_embedding", sizes)
    positions = jnp.arange(sizes.length)
    variables = _variables(module, trained, "input_embedding", positions)
    table = np.asarray(module.apply(variables, positions))
    unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
    figure = _figure(figsize=(11, 4.8))
    left, right = figure.subplots(1, 2)
    limit = float(np.abs(table).max())
    image = left.imshow(
        table, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest"
    )
    figure.colorbar(image, ax=left)
    left.set_xlabel("feature", fontsize=_FONT)
    left.set_ylabel("position", fontsize=_FONT)
    left.set_title("the table [position, feature]", fontsize=_FONT)
    image = right.imshow(unit @ unit.T, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    figure.colorbar(image, ax=right)
    right.set_xlabel("position", fontsize=_FONT)
    right.set_ylabel("position", fontsize=_FONT)
    right.set_title("cosine similarity of two positions' rows", fontsize=_FONT)
    for axes in (left, right):
        axes.axhline(sizes.train_len, color="black", linestyle="--", linewidth=1)
        axes.tick_params(labelsize=_FONT)
    right.axvline(sizes.train_len, color="black", linestyle="--", linewidth=1)
    caption = _caption(trained, bool(jax.tree.leaves(variables)))
    figure.suptitle(
        f"{encoding}: {registry.get_encoding(encoding).description}\n{caption}; "
        f"dashed: training length {sizes.train_len}",
        fontsize=_FONT,
    )
    return _save(figure, path)


def rope_wavelengths(
    head_dim: int, scaling: rope_scaling.RopeScaling | None = None, *, seq_len: int | None = None
) -> tuple[np.ndarray, float]:
    """`(2 pi / theta_i per band, attention factor)` from `rope.rope_frequencies`."""
    inv_freq, factor = rope.rope_frequencies(head_dim, scaling=scaling, seq_len=seq_len)
    return 2 * np.pi / np.asarray(inv_freq, np.float64), float(factor)


def _plot_rope(encoding, path, sizes, trained) -> Path:
    wavelengths, _ = rope_wavelengths(sizes.head_dim)
    bands = np.arange(wavelengths.size)
    figure = _figure(figsize=(7.5, 4.6))
    axes = figure.subplots()
    axes.plot(bands, wavelengths, "o-", color=FAMILY_COLOURS["rotary"], label="wavelength")
    for length, text, style in (
        (sizes.train_len, "training length", "--"),
        (sizes.length, "longest evaluation", ":"),
    ):
        axes.axhline(length, color="grey", linestyle=style, linewidth=1)
        axes.annotate(
            f"{text} {length}",
            (0, length),
            xytext=(2, 3),
            textcoords="offset points",
            color="grey",
            fontsize=_FONT - 1,
        )
    axes.set_yscale("log")
    _plain_log_axis(axes.yaxis, _nice_ticks(wavelengths.min() * 0.9, wavelengths.max() * 1.1))
    axes.set_xticks(bands)
    axes.set_xlabel("frequency band i (feature pair)", fontsize=_FONT)
    axes.set_ylabel("wavelength 2\u03c0 / \u03b8_i (positions, log scale)", fontsize=_FONT)
    axes.grid(alpha=0.3)
    axes.tick_params(labelsize=_FONT)
    figure.suptitle(
        f"{encoding}: {registry.get_encoding(encoding).description}\n"
        f"head_dim {sizes.head_dim}, base 10000: bands above the training length never turn "
        "a full circle in training,\nso longer inputs show them angles they never saw; "
        f"{_caption(trained, False)}",
        fontsize=_FONT,
    )
    return _save(figure, path)


def xpos_decay(head_dim: int, distances: int, *, scale_base: float = 512.0) -> np.ndarray:
    """`[head_dim / 2, distances]` size of each band's query-key product against the
    distance for unit vectors, via `rope.apply_xpos`: xPos's decay `zeta_i^(d / scale_base)`."""
    pairs = head_dim // 2
    unit = jnp.concatenate([jnp.ones(pairs), jnp.zeros(pairs)])
    q = jnp.broadcast_to(unit, (1, distances, 1, head_dim))
    k = jnp.stack([unit, jnp.roll(unit, pairs)])[None, :, None]  # cos and sin partners
    products = []
    for index in range(2):
        q_out, k_out = rope.apply_xpos(
            q,
            k[:, index : index + 1],
            jnp.arange(distances),
            k_positions=jnp.zeros(1, jnp.int32),
            scale_base=scale_base,
        )
        per_feature = np.asarray(q_out[0, :, 0] * k_out[0, 0, 0])
        products.append(per_feature[:, :pairs] + per_feature[:, pairs:])
    return np.hypot(*products).T


def _plot_xpos(encoding, path, sizes, trained) -> Path:
    decay = xpos_decay(sizes.head_dim, sizes.length)
    figure = _figure(figsize=(7.5, 4.6))
    axes = figure.subplots()
    colours = colormaps["plasma"](np.linspace(0.0, 0.85, decay.shape[0]))
    for band, colour in enumerate(colours):
        axes.plot(np.arange(sizes.length), decay[band], color=colour, label=f"band {band}")
    _mark_training_length(axes, sizes.train_len)
    _distance_axes(axes, "scale of the band's q\u00b7k product", legend_size=_FONT - 2, ncol=2)
    figure.suptitle(
        f"{encoding}: {registry.get_encoding(encoding).description}\n"
        f"each band rotates as in RoPE and decays as \u03b6_i^(d/512); head_dim "
        f"{sizes.head_dim}; {_caption(trained, False)}",
        fontsize=_FONT,
    )
    return _save(figure, path)


def _plot_nope(encoding, path, sizes, trained) -> Path:
    visible = np.arange(1, sizes.length + 1)  # keys a query at position t sees: t + 1
    figure = _figure(figsize=(7.5, 4.6))
    axes = figure.subplots()
    axes.plot(visible, 1.0 / visible, color=FAMILY_COLOURS["none"], linewidth=2)
    _mark_training_length(axes, sizes.train_len)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    _plain_log_axis(axes.xaxis, [2**e for e in range(int(math.log2(sizes.length)) + 1)])
    _plain_log_axis(axes.yaxis, _nice_ticks(1.0 / sizes.length, 1.0))
    axes.set_xlabel("keys visible to the query, t + 1 (query position t)", fontsize=_FONT)
    axes.set_ylabel("weight per key, 1 / (t + 1)", fontsize=_FONT)
    axes.grid(alpha=0.3)
    axes.tick_params(labelsize=_FONT)
    figure.suptitle(
        f"{encoding}: {registry.get_encoding(encoding).description}\n"
        "no positional term; under the causal mask, uniform attention gives each key\n"
        "weight 1 / (t + 1): the signal of position a NoPE model can learn to read",
        fontsize=_FONT,
    )
    return _save(figure, path)


def _plot_qk_transform(encoding, path, sizes, trained) -> Path:
    """Any query/key transform: `<T(1) at d, T(1) at 0> / head_dim` against d, per head."""
    module = _module(encoding, "qk_transform", sizes)
    shape = (1, sizes.length, sizes.heads, sizes.head_dim)
    ones, positions = jnp.ones(shape), jnp.arange(sizes.length)[None]
    variables = _variables(module, trained, "qk_transform", ones, ones, positions, positions)
    q, k = module.apply(variables, ones, ones, positions, positions)
    curves = np.asarray(jnp.einsum("lhd,hd->hl", q[0], k[0, 0])) / sizes.head_dim
    figure = _figure(figsize=(7.5, 4.6))
    axes = figure.subplots()
    for head, colour in enumerate(_head_colours(sizes.heads)):
        axes.plot(np.arange(sizes.length), curves[head], color=colour, label=f"head {head}")
    _mark_training_length(axes, sizes.train_len)
    _distance_axes(axes, "q\u00b7k / head_dim for q = k = 1", ticks=False)
    caption = _caption(trained, bool(jax.tree.leaves(variables)))
    figure.suptitle(
        f"{encoding}: {registry.get_encoding(encoding).description}\n{caption}", fontsize=_FONT
    )
    return _save(figure, path)


def _plot_token_bias(encoding, path, sizes, trained) -> Path:
    """A bias computed from the tokens (FoX): for one random layer input, per head."""
    module = _module(encoding, "token_bias", sizes)
    inputs = jax.random.normal(jax.random.key(1), (1, sizes.length, sizes.d_model))
    variables = _variables(module, trained, "token_bias", inputs)
    curves = np.asarray(module.apply(variables, inputs))[0, :, -1, ::-1]
    figure = _figure(figsize=(7.5, 4.6))
    axes = figure.subplots()
    for head, colour in enumerate(_head_colours(sizes.heads)):
        axes.plot(np.arange(sizes.length), curves[head], color=colour, label=f"head {head}")
    _mark_training_length(axes, sizes.train_len)
    _distance_axes(axes, "logit bias")
    figure.suptitle(
        f"{encoding}: {registry.get_encoding(encoding).description}\n"
        "the bias depends on the tokens in between: shown for one random layer input "
        f"(N(0, 1) features); {_caption(trained, True)}",
        fontsize=_FONT,
    )
    return _save(figure, path)


def _plot_contextual(encoding, path, sizes, trained) -> Path:
    """CoPE: contextual positions and the logit term against distance, for one random
    query and its keys, per head."""
    module = _module(encoding, "contextual_bias", sizes)
    shape = (1, sizes.length, sizes.heads, sizes.head_dim)
    q = jax.random.normal(jax.random.key(1), shape)
    k = jax.random.normal(jax.random.key(2), shape)
    variables = _variables(module, trained, "contextual_bias", q, k)
    scale = 1.0 / math.sqrt(sizes.head_dim)
    gate_logits = scale * jnp.einsum("bqhd,bkhd->bhqk", q, k)
    causal = jnp.tril(jnp.ones((sizes.length, sizes.length), bool))
    positions = content.cope_positions(gate_logits, causal, num_positions=module.num_positions)
    term = module.apply(variables, q, k)
    # The last query's row, nearest key first.
    seen = np.asarray(positions)[0, :, -1, ::-1]
    added = np.asarray(term)[0, :, -1, ::-1]
    distance = np.arange(sizes.length)
    figure = _figure(figsize=(11.0, 4.6))
    left, right = figure.subplots(1, 2)
    clipped = np.minimum(distance + 1, module.num_positions - 1)
    left.plot(distance, clipped, color="lightgrey", linewidth=2, label="every gate open")
    for head, colour in enumerate(_head_colours(sizes.heads)):
        left.plot(distance, seen[head], color=colour, label=f"head {head}")
        right.plot(distance, added[head], color=colour, label=f"head {head}")
    for axes, label in (
        (left, "contextual position p (sum of gates)"),
        (right, "logit term scale * q . e(p)"),
    ):
        _mark_training_length(axes, sizes.train_len)
        _distance_axes(axes, label)
    figure.suptitle(
        f"{encoding}: {registry.get_encoding(encoding).description}\n"
        f"one random query and keys (N(0, 1) features), gates sigmoid(q . k / sqrt(D)); "
        f"table of {module.num_positions} positions; "
        f"{_caption(trained, bool(jax.tree.leaves(variables)))}",
        fontsize=_FONT,
    )
    return _save(figure, path)


def _plot_unknown(encoding, path, sizes, trained) -> Path:
    """An encoding whose role the gallery has no picture for: its description."""
    entry = registry.get_encoding(encoding)
    figure = _figure(figsize=(7.5, 2.0))
    figure.text(
        0.5,
        0.5,
        f"{encoding}: {entry.description}\nroles {', '.join(entry.contributes)}: "
        "the gallery has no picture for them yet",
        ha="center",
        va="center",
        fontsize=_FONT,
    )
    return _save(figure, path)


def _plot_selfextend(encoding, path, sizes, trained) -> Path:
    """SelfExtend: the relative position RoPE sees against the true distance."""
    module = _module(encoding, "qk_transform", sizes)
    group, window = module.group_size, module.window
    span = max(sizes.length, 4 * window)
    query, keys = jnp.array([[span - 1]]), jnp.arange(span)[None]
    grouped_q, grouped_k = content.self_extend_positions(
        query, keys, group_size=group, window=window
    )
    distance = np.arange(span)[::-1]
    seen = np.where(distance < window, distance, np.asarray(grouped_q[0, 0] - grouped_k[0]))
    figure = _figure(figsize=(7.5, 4.6))
    axes = figure.subplots()
    axes.plot(distance, distance, color="lightgrey", linewidth=2, label="plain RoPE")
    axes.plot(distance, seen, color=FAMILY_COLOURS["rotary"], label=encoding)
    _mark_training_length(axes, sizes.train_len)
    axes.axvline(window, color="black", linestyle=":", linewidth=1)
    axes.annotate(
        f"neighbour window {window}",
        (window, 0.02),
        xycoords=("data", "axes fraction"),
        xytext=(3, 0),
        textcoords="offset points",
        fontsize=_FONT - 1,
    )
    _distance_axes(axes, "relative position the rotation uses")
    figure.suptitle(
        f"{encoding}: {registry.get_encoding(encoding).description}\n"
        f"group size {group}, window {window} (its defaults): within the window it is plain "
        f"RoPE; {_caption(trained, False)}",
        fontsize=_FONT,
    )
    return _save(figure, path)


_SPECIAL = {
    "none": _plot_nope,
    "rope": _plot_rope,
    "xpos": _plot_xpos,
    "selfextend": _plot_selfextend,
}
_BY_ROLE = {
    "qk_transform": _plot_qk_transform,
    "logit_bias": _plot_bias,
    "relative_terms": _plot_relative,
    "input_embedding": _plot_input_embedding,
    "token_bias": _plot_token_bias,
    "contextual_bias": _plot_contextual,
}


def plot_encoding(
    encoding: str,
    path: str | Path,
    *,
    sizes: GallerySizes = GallerySizes(),
    trained: Mapping[str, Any] | None = None,
) -> Path:
    """The gallery figure of one registered encoding (see the module docstring).

    Args:
      encoding: a registered name.
      path: PNG file to write.
      sizes: heads, widths and lengths.
      trained: `{"variables": {role: params}, "caption": str}` of a trained model (see
        `trained_parameters`), or None for parameters at initialization.
    """
    if encoding in _SPECIAL:
        return _SPECIAL[encoding](encoding, path, sizes, trained)
    roles = registry.get_encoding(encoding).contributes
    plot = _BY_ROLE.get(roles[0], _plot_unknown) if roles else _plot_nope
    return plot(encoding, path, sizes, trained)


def rope_scalings(
    rotary_dim: int, factor: float = 4.0, original: int = 2048
) -> dict[str, rope_scaling.RopeScaling]:
    """One example of every context-extension scaling, extending `original` by `factor`.

    LongRoPE's factors are searched per model; here they are illustrative (short: 1,
    long: rising quadratically from 1 for the fastest pair to `factor` for the slowest).
    """
    pairs = rotary_dim // 2
    ramp = np.linspace(0.0, 1.0, pairs) ** 2
    return {
        f"linear (PI), factor {factor:g}": rope_scaling.LinearScaling(factor),
        f"NTK-aware, factor {factor:g}": rope_scaling.NTKScaling(factor),
        f"dynamic NTK at {int(factor * original)} tokens": rope_scaling.DynamicNTKScaling(
            factor, original
        ),
        f"YaRN, factor {factor:g}": rope_scaling.YarnScaling(factor, original),
        f"Llama 3, factor {factor:g}": rope_scaling.Llama3Scaling(factor, 1.0, 4.0, original),
        "LongRoPE (illustrative factors)": rope_scaling.LongRopeScaling(
            short_factor=(1.0,) * pairs,
            long_factor=tuple(1.0 + (factor - 1.0) * ramp),
            original_max_position_embeddings=original,
            factor=factor,
        ),
    }


def plot_rope_scalings(
    path: str | Path, *, head_dim: int = 128, factor: float = 4.0, original: int = 2048
) -> Path:
    """What each RoPE scaling does to each frequency band: the wavelength per band (with
    the original and extended contexts marked) and the frequency ratio to plain RoPE."""
    extended = int(factor * original)
    plain, _ = rope_wavelengths(head_dim)
    bands = np.arange(plain.size)
    figure = _figure(figsize=(12, 5.0))
    left, right = figure.subplots(1, 2)
    left.plot(bands, plain, color="black", linewidth=2.2, label="plain RoPE")
    colours = colormaps["tab10"](np.arange(10))
    lowest_ratio = [1.0]
    for index, (name, scaling) in enumerate(rope_scalings(head_dim, factor, original).items()):
        wavelengths, attention = rope_wavelengths(head_dim, scaling, seq_len=extended)
        label = name if attention == 1.0 else f"{name} (cos/sin x{attention:.3f})"
        style = dict(color=colours[index], linestyle=_LINE_STYLES[index % 4], linewidth=1.5)
        left.plot(bands, wavelengths, label=label, **style)
        right.plot(bands, plain / wavelengths, **style)
        lowest_ratio.append(float((plain / wavelengths).min()))
    for length, text in ((original, "original context"), (extended, "extended context")):
        left.axhline(length, color="grey", linestyle="--", linewidth=1)
        left.annotate(
            f"{text} {length}",
            (0, length),
            xytext=(2, 3),
            textcoords="offset points",
            color="grey",
            fontsize=_FONT - 1,
        )
    left.set_yscale("log")
    _plain_log_axis(left.yaxis, [10**e for e in range(0, 7)])
    left.set_ylabel("wavelength 2\u03c0 / \u03b8_i (positions, log scale)", fontsize=_FONT)
    right.set_yscale("log")
    _plain_log_axis(right.yaxis, _nice_ticks(min(lowest_ratio) * 0.95, 1.05))
    right.set_ylabel("frequency / plain RoPE frequency (log scale)", fontsize=_FONT)
    for axes in (left, right):
        axes.set_xlabel(f"frequency band i (of {plain.size}, fastest first)", fontsize=_FONT)
        axes.grid(alpha=0.3)
        axes.tick_params(labelsize=_FONT)
    figure.legend(loc="outside right center", fontsize=_FONT, frameon=False)
    figure.suptitle(
        f"RoPE context extension, head_dim {head_dim}, base 10000, original context "
        f"{original}, factor {factor:g}:\nhigh-frequency bands are kept, low-frequency bands "
        "are slowed down so their wavelengths cover the extended context",
        fontsize=_FONT + 1,
    )
    return _save(figure, path)


# ------------------------------------------------------------------ trained parameters


_STUDY_KEYS = ("heads", "d_model", "eval_lens", "train_len")


def _role_params(params: Mapping[str, Any], encoding: str, role: str):
    """The variables of `encoding`'s `role` module in a `Transformer`'s params (layer 0
    for the attention roles), or None."""
    if role == "input_embedding":
        return params.get(f"{encoding}_input_embedding")
    return params.get("layers_0", {}).get("attention", {}).get(f"{encoding}_{role}")


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


def study_sizes(record: Mapping[str, Any]) -> GallerySizes:
    """The gallery sizes of a study's `config.json` record."""
    return GallerySizes(
        heads=record["heads"],
        head_dim=record["d_model"] // record["heads"],
        train_len=record["train_len"],
        length=max(record["eval_lens"]),
    )


def _restore(directory: Path):
    manager = ocp.CheckpointManager(directory.absolute())
    try:
        return train.restore_latest(manager)
    finally:
        manager.close()


def _trained(study_dir: Path, encoding: str, record: Mapping[str, Any]):
    """The trained positional variables of `encoding`'s first seed in a study, or None."""
    folder = study_dir / encoding
    runs = sorted(
        (run for run in folder.glob("seed*") if (run / "checkpoints").is_dir()),
        key=lambda run: int(run.name[4:]) if run.name[4:].isdigit() else 0,
    )
    for run in runs:
        restored = _restore(run / "checkpoints")
        if restored is None:
            continue
        step, state = restored
        params = state["params"]["params"]
        variables = {}
        for role in registry.get_encoding(encoding).contributes:
            found = _role_params(params, encoding, role)
            if found:
                variables[role] = found
        caption = (
            f"trained: the study's {run.name} model after {step} steps at "
            f"{record['train_len']} tokens (layer 0), shown up to {max(record['eval_lens'])}"
        )
        return {"variables": variables, "caption": caption}
    return None


def trained_parameters(study_dir: str | Path) -> dict[str, dict[str, Any]]:
    """`{encoding: {"variables": {role: params}, "caption": str}}` for every registered
    encoding the study in `study_dir` trained (its lowest seed, layer 0).

    Raises:
      ValueError: `study_dir` is missing, not a study folder, or holds no trained model.
    """
    study_dir = Path(study_dir)
    record = _study_record(study_dir)
    trained = {}
    for encoding in registry.available_encodings():
        found = _trained(study_dir, encoding, record)
        if found is not None:
            trained[encoding] = found
    if not trained:
        raise ValueError(
            f"--study {str(study_dir)!r} holds no trained model (no <encoding>/seed*/"
            "checkpoints); train one with `jax-posenc study --encodings ...`"
        )
    return trained


def gallery(out_dir: str | Path, *, study_dir: str | Path | None = None) -> list[Path]:
    """Writes the gallery PNGs (see the module docstring) and returns their paths.

    With `study_dir`, the study is read (see `trained_parameters`) before anything is
    written, and its sizes are used for every figure.
    """
    if study_dir is None:
        sizes, trained = GallerySizes(), {}
    else:
        sizes = study_sizes(_study_record(Path(study_dir)))
        trained = trained_parameters(study_dir)
    out_dir = Path(out_dir)
    paths = [
        plot_encoding(
            encoding, out_dir / f"{encoding}.png", sizes=sizes, trained=trained.get(encoding)
        )
        for encoding in registry.available_encodings()
    ]
    paths.append(plot_rope_scalings(out_dir / "rope_scalings.png"))
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `plot` options to `parser`."""
    parser.add_argument("--out", default="plots", help="output folder (default plots)")
    parser.add_argument(
        "--study",
        metavar="DIR",
        help="a `jax-posenc study` output folder: draw every figure with its sizes and its "
        "trained parameters instead of parameters at initialization",
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
