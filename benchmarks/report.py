"""Reports of a benchmark run: markdown tables, the README section and a figure.

Everything here reads the results document of `runner.run_suite` (a JSON-ready dict),
so a report can be redrawn from a saved `bench-<mode>.json` without running anything.
The figure follows `jax_posenc/plots.py`: a `matplotlib.figure.Figure` on the Agg canvas
(no pyplot state), constrained layout, fonts of at least 9 points and plain numbers on
log axes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator

_FONT = 10


def _ms(seconds: float) -> str:
    milliseconds = seconds * 1e3
    if milliseconds >= 100:
        return f"{milliseconds:.0f}"
    if milliseconds >= 1:
        return f"{milliseconds:.2f}"
    return f"{milliseconds:.3f}"


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f}"


def _si(value: float) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g} "


def one_line(record: Mapping[str, Any]) -> str:
    """A record in one line: the progress log of `runner.run_suite`."""
    text = record["name"]
    if "time" in record:
        text += f": {_ms(record['time']['median_s'])} ms"
    for label, ref in record.get("references", {}).items():
        if "ratio" in ref:
            text += f", {ref['ratio']:.2f}x {label}"
    for key in ("skipped", "error"):
        if key in record:
            text += f" [{record[key]}]"
    return text


def _columns(records: Sequence[Mapping[str, Any]], compact: bool) -> list[tuple[str, Callable]]:
    """The table columns that have a value for at least one record of a group."""

    def time_cell(r):
        if "time" not in r:
            return r.get("skipped") or r.get("error") or ""
        t = r["time"]
        if compact:
            return _ms(t["median_s"])
        return f"{_ms(t['median_s'])} ({_ms(t['q25_s'])}-{_ms(t['q75_s'])})"

    def memory_cell(r):
        memory = r.get("memory")
        return f"{_mib(memory['temp_bytes'])} / {_mib(memory['total_bytes'])}" if memory else ""

    def bandwidth_cell(r):
        if "bandwidth_bytes_per_s" not in r:
            return ""
        text = f"{r['bandwidth_bytes_per_s'] / 1e9:.1f}"
        if "fraction_of_peak" in r:
            text += f" ({100 * r['fraction_of_peak']:.0f}%)"
        return text

    columns: list[tuple[str, Callable]] = [("case", lambda r: f"`{r['name']}`")]
    columns.append(("median ms" if compact else "median ms (IQR)", time_cell))
    if not compact:
        columns.append(("compile s", lambda r: f"{r['compile_s']:.2f}" if "compile_s" in r else ""))
    if any(r.get("memory") for r in records):
        columns.append(("temp / total MiB", memory_cell))
    if any("bandwidth_bytes_per_s" in r for r in records):
        columns.append(("GB/s", bandwidth_cell))
    if any("flops_per_s" in r for r in records):
        columns.append(("FLOP/s", lambda r: _si(r["flops_per_s"]) if "flops_per_s" in r else ""))
    if any("items_per_s" in r for r in records):
        columns.append(
            (
                "items/s",
                lambda r: f"{r['items_per_s']:,.0f} {r['item_unit']}" if "items_per_s" in r else "",
            )
        )
    ref_labels = list(dict.fromkeys(label for r in records for label in r.get("references", {})))
    for label in ref_labels:

        def ratio_cell(r, label=label):
            ref = r.get("references", {}).get(label)
            if not ref or "ratio" not in ref:
                return ""
            if compact:
                return f"{ref['ratio']:.2f}"
            return f"{ref['ratio']:.2f} ({_ms(ref['time']['median_s'])} ms)"

        columns.append((f"÷ {label}", ratio_cell))
    return columns


def markdown_tables(document: Mapping[str, Any], *, compact: bool = False, level: int = 2) -> str:
    """One markdown table per group, followed by that group's power-law fits."""
    records = document["results"]
    groups = list(dict.fromkeys(r["group"] for r in records))
    hashes = "#" * level
    parts = []
    for group in groups:
        members = [r for r in records if r["group"] == group]
        columns = _columns(members, compact)
        lines = [f"{hashes} {group}", ""]
        if document.get("groups", {}).get(group):
            lines += [document["groups"][group], ""]
        lines.append("| " + " | ".join(title for title, _ in columns) + " |")
        lines.append("|" + "---|" * len(columns))
        for record in members:
            lines.append("| " + " | ".join(str(cell(record)) for _, cell in columns) + " |")
        fits = [fit for fit in document.get("fits", []) if fit["group"] == group]
        if fits:
            lines.append("")
            for fit in fits:
                sizes = ", ".join(str(size) for size in fit["sizes"])
                lines.append(
                    f"- `{fit['series']}`: {fit['quantity']} ~ size^{fit['exponent']:.2f} "
                    f"(sizes {sizes}; largest deviation from the fit "
                    f"{100 * fit['max_relative_deviation']:.0f}%)"
                )
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _provenance(document: Mapping[str, Any]) -> str:
    env = document["environment"]
    settings = document["settings"]
    return (
        f"Machine: {env['machine']}; JAX {env['jax']} (jaxlib {env['jaxlib']}), "
        f"{env['device_count']} device(s), {document['mode']} run of {document['created']}, "
        f"{document['wall_s']:.0f} s in all. Times are medians over up to "
        f"{settings['repeats']} samples after {settings['warmup']} warm-up call(s), with "
        "compilation excluded (reported as trace + compile seconds); `÷ ref` columns are "
        "paired same-run time ratios case / reference (lower is better); memory is the "
        "compiled program's temporaries / total (arguments + outputs + temporaries) from "
        "`memory_analysis()`; GB/s is input + output bytes over the median time."
    )


def markdown_report(document: Mapping[str, Any]) -> str:
    """The full results file in markdown: provenance, notes, every table."""
    lines = [f"# jax_posenc benchmarks ({document['mode']})", "", _provenance(document), ""]
    notes = [*document.get("notes", []), *_load_note(document)]
    if notes:
        lines += [*(f"- {note}" for note in notes), ""]
    return "\n".join(lines) + "\n" + markdown_tables(document)


def performance_section(document: Mapping[str, Any]) -> str:
    """The README's "Performance" section, generated from a results document."""
    env = document["environment"]
    command = "python -m benchmarks" + (" --quick" if document["mode"] == "quick" else "")
    lines = [
        "## Performance",
        "",
        f"Measured with `{command}` on {env['machine']}, JAX {env['jax']}, "
        f"{document['created'][:10]}. Regenerate this section with "
        "`python -m benchmarks --section` after a run; the full tables, with spreads and "
        "compile times, are in `bench_out/`.",
        "",
        "Times are medians after warm-up, compilation excluded. `÷ ref` columns are "
        "same-run time ratios case / reference measured in alternation (lower is "
        "better): `copy` is a jitted copy of the same tensor (the memory-bandwidth floor), "
        "`tutorial` the hand-written form from `benchmarks/tutorial.py`, `xla` plain "
        "XLA attention. Memory is the compiled program's temporaries / total in MiB.",
        "",
    ]
    notes = [*document.get("notes", []), *_load_note(document)]
    if notes:
        lines += [*(f"- {note}" for note in notes), ""]
    return "\n".join(lines) + "\n" + markdown_tables(document, compact=True, level=3)


def _load_note(document: Mapping[str, Any]) -> list[str]:
    """The range of the host's load average over the run, when recorded."""
    loads = [r["load_average"] for r in document["results"] if r.get("load_average") is not None]
    if not loads:
        return []
    return [f"Host 1-minute load average after each case: {min(loads):.1f}-{max(loads):.1f}."]


def _plain(value: float, _position: Any = None) -> str:
    """A tick label without exponents: 16384 as "16,384", 0.5 as "0.5"."""
    if value >= 1 and float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:.3g}"


def _plain_log_axis(axis: Any, ticks: Sequence[float] | None = None) -> None:
    """Labels a log axis with plain numbers: at `ticks`, else at 1-2-5 steps."""
    axis.set_major_locator(FixedLocator(list(ticks)) if ticks else LogLocator(subs=(1, 2, 5)))
    axis.set_major_formatter(FuncFormatter(_plain))
    axis.set_minor_locator(NullLocator())


def _ratio_panel(axes: Any, records: Sequence[Mapping[str, Any]]) -> None:
    """Paired time ratios of the memory-bound cases, one bar per case and reference."""
    bound = [r for r in records if "bandwidth_bytes_per_s" in r and r.get("references")]
    labels = list(dict.fromkeys(label for r in bound for label in r["references"]))
    height = 0.8 / max(1, len(labels))
    for index, label in enumerate(labels):
        ratios = [r["references"].get(label, {}).get("ratio", np.nan) for r in bound]
        axes.barh(np.arange(len(bound)) + index * height, ratios, height=height, label=f"÷ {label}")
    axes.set_yticks(np.arange(len(bound)) + 0.4 - height / 2)
    axes.set_yticklabels([r["name"] for r in bound])
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_xscale("log")
    _plain_log_axis(axes.xaxis)
    axes.invert_yaxis()
    axes.set_xlabel("time ratio case / reference (lower is better)", fontsize=_FONT)
    axes.set_title("memory-bound encodings", fontsize=_FONT + 1)
    if labels:
        axes.legend(fontsize=_FONT - 1)


def _curve_panel(axes: Any, document: Mapping[str, Any], quantity: str) -> None:
    """Compiled memory (MiB) or median time (ms) over size, one line per series."""
    records = document["results"]
    fits = {(f["series"], f["quantity"]): f for f in document.get("fits", [])}
    sizes = set()
    for name in dict.fromkeys(r["series"] for r in records if r.get("series")):
        members = sorted((r for r in records if r.get("series") == name), key=lambda r: r["size"])
        if quantity == "memory":
            points = [
                (r["size"], r["memory"]["total_bytes"] / 2**20) for r in members if r.get("memory")
            ]
        else:
            points = [(r["size"], r["time"]["median_s"] * 1e3) for r in members if "time" in r]
        if not points:
            continue
        sizes.update(size for size, _ in points)
        fit = fits.get((name, quantity))
        label = name + (f" (~size^{fit['exponent']:.2f})" if fit else "")
        axes.loglog(*zip(*points, strict=True), marker="o", label=label)
    if sizes:
        _plain_log_axis(axes.xaxis, sorted(sizes))
        _plain_log_axis(axes.yaxis)
        axes.legend(fontsize=_FONT - 1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes.set_xlabel("size (sequence length)", fontsize=_FONT)
    axes.set_ylabel(
        "compiled memory (MiB)" if quantity == "memory" else "median time (ms)", fontsize=_FONT
    )
    axes.set_title(f"{quantity} over size", fontsize=_FONT + 1)


def _throughput_panel(axes: Any, records: Sequence[Mapping[str, Any]]) -> None:
    with_items = [r for r in records if "items_per_s" in r]
    axes.barh([r["name"] for r in with_items], [r["items_per_s"] for r in with_items])
    axes.invert_yaxis()
    axes.xaxis.set_major_formatter(FuncFormatter(_plain))
    unit = with_items[0]["item_unit"] if with_items else "items"
    axes.set_xlabel(f"{unit} / s", fontsize=_FONT)
    axes.set_title("throughput", fontsize=_FONT + 1)


def plot(document: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Draws the run into one PNG: ratios of the memory-bound cases (left), compiled
    memory and time over size per series (right), throughput (bottom)."""
    records = document["results"]
    bars = sum(1 for r in records if "bandwidth_bytes_per_s" in r and r.get("references"))
    items = sum(1 for r in records if "items_per_s" in r)
    upper = max(4.0, 0.25 * bars)  # each of the two upper rows, inches
    lower = max(2.0, 0.3 * items + 1.0)
    figure = Figure(layout="constrained", figsize=(16, 2 * upper + lower))
    FigureCanvasAgg(figure)
    panels = figure.subplot_mosaic(
        [["ratio", "memory"], ["ratio", "time"], ["items", "items"]],
        height_ratios=[upper, upper, lower],
    )
    _ratio_panel(panels["ratio"], records)
    _curve_panel(panels["memory"], document, "memory")
    _curve_panel(panels["time"], document, "time")
    _throughput_panel(panels["items"], records)
    for axes in panels.values():
        axes.tick_params(labelsize=_FONT)
    panels["ratio"].tick_params(axis="y", labelsize=_FONT - 1)
    env = document["environment"]
    figure.suptitle(
        f"jax_posenc benchmarks ({document['mode']}): {env['machine']}, JAX {env['jax']}",
        fontsize=_FONT + 1,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def write_outputs(document: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes `bench-<mode>.json`, `.md` and `.png` into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"bench-{document['mode']}"
    paths = {suffix: stem.with_suffix(f".{suffix}") for suffix in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(document, indent=1) + "\n")
    paths["md"].write_text(markdown_report(document))
    plot(document, paths["png"])
    return paths


def latest_results(out_dir: str | os.PathLike) -> Path:
    """The results file `--section` reads: the full run if there is one, else the quick one."""
    for mode in ("full", "quick"):
        path = Path(out_dir) / f"bench-{mode}.json"
        if path.exists():
            return path
    raise FileNotFoundError(
        f"no bench-full.json or bench-quick.json in {out_dir}; run `python -m benchmarks` first"
    )
