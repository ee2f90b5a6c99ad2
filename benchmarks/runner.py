"""Benchmark runner: times jitted functions next to same-run baselines.

A `Case` is a pure function of arrays plus the inputs to call it with. The runner jits
it, reports trace + compile time separately from run time, reads the compiled memory
(`Compiled.memory_analysis()`), and times it with `block_until_ready` after warm-up:
each sample loops a fast function until the sample lasts `min_sample_s`, and the
median and quartiles over the repeats are reported.

Absolute times on a shared machine are noisy, so every case may name references
(a jitted copy of the same tensor for elementwise encodings, `xla` attention for the
blockwise one, the hand-written tutorial form). The runner times a case and its
references in alternation, sample by sample, and reports the median of the paired time
ratios `case / reference` (lower is better): slow drifts of the machine cancel out.

Memory-bound cases also report the achieved bandwidth, the bytes of their inputs and
outputs divided by the time (the least traffic any implementation needs), and on a GPU
whose peak is known, the fraction of that peak. Cases that share a `series` form a
curve over `size` (e.g. attention over sequence length L); the runner fits a power law
`value ~ size^exponent` to their compiled memory and run time.

`run_suite` returns the results document that `benchmarks.report` writes out; the cases
are in `benchmarks.cases` and the command line (`python -m benchmarks`) in
`benchmarks/__main__.py`.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from benchmarks import report
from jax_posenc import _checks

SCHEMA_VERSION = 1
MODES = ("quick", "full")
FRAMEWORKS = ("jax", "torch")

# Peak memory bandwidth (bytes/s) from the vendors' data sheets, matched against
# `device.device_kind` (the most specific key first). Others: pass `--peak-bandwidth`.
PEAK_BANDWIDTH = {
    "H100 80GB HBM3": 3.35e12,
    "H100 PCIe": 2.0e12,
    "H100 NVL": 3.9e12,
    "H200": 4.8e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100-SXM4-40GB": 1.555e12,
    "A100 80GB PCIe": 1.935e12,
    "A100-PCIE-40GB": 1.555e12,
    "L40S": 0.864e12,
    "L4": 0.3e12,
    "A10G": 0.6e12,
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One function to time.

    Attributes:
      name: unique name, "/"-separated, e.g. "rope/half/float32/4x2048x16x128".
      group: the table the case appears in ("rope", "attention", ...).
      fn: pure function of the arrays `make_args()` returns; the runner jits it.
      make_args: builds the inputs (called once, right before compiling).
      references: (label, Case) pairs timed in alternation with this case; the report
        gives the paired time ratio `case / reference` for each label.
      memory_bound: report achieved bandwidth (input + output bytes per second).
      items: work items per call (tokens for a train step), reported as items/s.
      item_unit: name of the items ("tokens").
      flops: floating-point operations per call, reported as FLOP/s.
      series: cases sharing a series form a curve over `size` (power-law fits).
      size: the x value of the curve (e.g. sequence length).
      listed: as a reference, also give this function its own row in its group's
        table, plots and fits (e.g. `xla` attention next to the blockwise rows).
      framework: "jax" (jitted, compiled memory read) or "torch" (a PyTorch baseline:
        called as is, its first call, which includes any `torch.compile` compilation,
        is reported as the compile time; no compiled memory).
    """

    name: str
    group: str
    fn: Callable[..., Any]
    make_args: Callable[[], tuple[Any, ...]]
    references: tuple[tuple[str, Case], ...] = ()
    memory_bound: bool = False
    items: int | None = None
    item_unit: str = ""
    flops: float | None = None
    series: str | None = None
    size: int | None = None
    listed: bool = False
    framework: str = "jax"

    def __post_init__(self):
        _checks.check_choice("framework", self.framework, FRAMEWORKS)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How hard the runner times.

    Attributes:
      warmup: calls after compilation before timing.
      repeats: timed samples per function (fewer when a case would exceed `max_case_s`,
        never fewer than `min_repeats`).
      min_repeats: floor on the samples of slow cases.
      min_sample_s: a sample loops a fast function until it lasts this long.
      max_case_s: time budget of one case with its references.
      memory_budget_bytes: cases whose compiled program needs more are compiled and
        reported (memory, compile time) but not run; None picks half the free memory of
        the device (host memory on CPU).
      peak_bandwidth: device peak in bytes/s for the "% of peak" column; None looks the
        device up in `PEAK_BANDWIDTH`.
    """

    warmup: int = 2
    repeats: int = 10
    min_repeats: int = 3
    min_sample_s: float = 0.005
    max_case_s: float = 30.0
    memory_budget_bytes: int | None = None
    peak_bandwidth: float | None = None

    def __post_init__(self):
        _checks.check_min_int("warmup", self.warmup, 0)
        _checks.check_min_int("min_repeats", self.min_repeats, 1)
        _checks.check_min_int("repeats", self.repeats, self.min_repeats)

    @classmethod
    def for_mode(cls, mode: str, **overrides: Any) -> Settings:
        """Defaults of `mode` ("quick": few repeats, small budgets), updated by `overrides`."""
        _checks.check_choice("mode", mode, MODES)
        quick = {"warmup": 1, "repeats": 5, "min_sample_s": 0.002, "max_case_s": 4.0}
        base = quick if mode == "quick" else {}
        given = {key: value for key, value in overrides.items() if value is not None}
        if "repeats" in given:  # asking for fewer repeats lowers the floor too
            _checks.check_positive_int("repeats", given["repeats"])
            given.setdefault("min_repeats", min(cls.min_repeats, given["repeats"]))
        return cls(**{**base, **given})


# ------------------------------------------------------------------ environment


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def peak_bandwidth(device_kind: str) -> float | None:
    """Peak memory bandwidth (bytes/s) of a device kind in `PEAK_BANDWIDTH`, else None."""
    for key in sorted(PEAK_BANDWIDTH, key=len, reverse=True):
        if key.lower() in device_kind.lower():
            return PEAK_BANDWIDTH[key]
    return None


def load_average() -> float | None:
    """The host's 1-minute load average after a case (None where the OS has none): on a
    shared machine it says how much the other processes competed for the cores."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def environment(settings: Settings | None = None) -> dict[str, Any]:
    """JAX, backend, device and host facts recorded with every results file."""
    device = jax.devices()[0]
    backend = jax.default_backend()
    cores = _cpu_count()
    cpu = _cpu_model()
    if backend == "cpu":
        machine = f"{cpu}, {cores} cores (CPU backend)"
    else:
        machine = f"{device.device_kind} ({backend} backend; host {cpu}, {cores} cores)"
    peak = settings.peak_bandwidth if settings else None
    return {
        "machine": machine,
        "backend": backend,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "peak_bandwidth_bytes_per_s": peak or peak_bandwidth(device.device_kind),
        "cpu": cpu,
        "cpu_cores": cores,
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "torch": _version("torch"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _free_memory_bytes() -> int | None:
    """Free memory of the device (host memory on CPU); None when unknown."""
    if jax.default_backend() != "cpu":
        stats = jax.devices()[0].memory_stats() or {}
        limit = stats.get("bytes_limit")
        return int(limit) - int(stats.get("bytes_in_use", 0)) if limit else None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ------------------------------------------------------------------ measurement


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    """Bytes the compiled program needs, from `memory_analysis()`; None if unavailable.

    `total_bytes` = arguments + outputs - aliased + temporaries: the device memory the
    program holds while it runs.
    """
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        return None
    if stats is None:
        return None
    memory = {
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
    }
    memory["total_bytes"] = (
        memory["argument_bytes"]
        + memory["output_bytes"]
        - memory["alias_bytes"]
        + memory["temp_bytes"]
    )
    return memory


def io_bytes(fn: Callable[..., Any], args: Sequence[Any]) -> int:
    """Bytes of the array inputs and outputs of `fn(*args)`: the least traffic it needs."""
    outputs = jax.eval_shape(fn, *args)
    leaves = [*jax.tree.leaves(args), *jax.tree.leaves(outputs)]
    return int(sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in leaves))


@dataclasses.dataclass
class _Prepared:
    """A compiled case with its inputs, ready to time."""

    case: Case
    compiled: Any
    args: tuple[Any, ...]
    compile_s: float
    memory: dict[str, int] | None
    number: int = 1
    samples: list[float] = dataclasses.field(default_factory=list)
    skipped: str | None = None


def _prepare(case: Case) -> _Prepared:
    args = tuple(case.make_args())
    if case.framework == "torch":  # compiles (torch.compile) or runs eagerly on first call
        start = time.perf_counter()
        case.fn(*args)
        return _Prepared(case, case.fn, args, time.perf_counter() - start, None)
    jax.block_until_ready(args)
    start = time.perf_counter()
    compiled = jax.jit(case.fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    return _Prepared(case, compiled, args, compile_s, compiled_memory(compiled))


def _sample(prepared: _Prepared, number: int) -> float:
    start = time.perf_counter()
    outputs = [prepared.compiled(*prepared.args) for _ in range(number)]
    jax.block_until_ready(outputs)
    return (time.perf_counter() - start) / number


def _time_interleaved(functions: Sequence[_Prepared], settings: Settings) -> None:
    """Warms up, calibrates loop counts, then records samples of all functions in turn.

    A memory-bound function makes one untimed call before each sample. Without it, the
    function that runs after a large one (the tutorial RoPE, which allocates several
    copies of x) pays for mapping fresh pages of its output, ~4-5 ms on a 32 MiB
    output on a 2-core CPU, while the next function reuses the pages just released:
    `apply_rope` / copy in bfloat16 read 1.75 in the order (rope, copy, tutorial) and 0.80
    in the order (copy, rope, tutorial). After the settling call every function is timed
    in its steady state, the state of a loop that calls it again and again.

    Warm-up stops after one call for a function that is slow anyway (a call longer than
    a tenth of the case budget); the last warm-up call calibrates the loop count.
    """
    cycle = 0.0
    for prepared in functions:
        for _ in range(max(1, settings.warmup)):
            seconds = _sample(prepared, 1)
            if seconds > settings.max_case_s / 10:
                break
        prepared.number = max(1, min(10_000, math.ceil(settings.min_sample_s / seconds)))
        cycle += seconds * prepared.number
    affordable = int(settings.max_case_s / max(cycle, 1e-9))
    repeats = max(settings.min_repeats, min(settings.repeats, affordable))
    for _ in range(repeats):
        for prepared in functions:
            if prepared.case.memory_bound:
                _sample(prepared, 1)  # settle the allocator (see the docstring)
            prepared.samples.append(_sample(prepared, prepared.number))


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and extremes of timing samples (seconds)."""
    values = np.asarray(samples, dtype=np.float64)
    q25, median, q75 = np.percentile(values, [25, 50, 75])
    return {
        "median_s": float(median),
        "q25_s": float(q25),
        "q75_s": float(q75),
        "min_s": float(values.min()),
        "max_s": float(values.max()),
        "repeats": len(values),
    }


def paired_ratio(samples: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
    """Median and quartiles of the sample-by-sample ratios `samples / reference`."""
    if len(samples) != len(reference) or not samples:
        raise ValueError(
            f"paired samples must have the same non-zero length, got {len(samples)} and "
            f"{len(reference)}"
        )
    ratios = np.asarray(samples, np.float64) / np.asarray(reference, np.float64)
    q25, median, q75 = np.percentile(ratios, [25, 50, 75])
    return {"ratio": float(median), "ratio_q25": float(q25), "ratio_q75": float(q75)}


def _throughput(case: Case, args: Sequence[Any], seconds: float, peak: float | None) -> dict:
    record: dict[str, Any] = {}
    if case.memory_bound:
        moved = io_bytes(case.fn, args)
        record["bytes_moved"] = moved
        record["bandwidth_bytes_per_s"] = moved / seconds
        if peak:
            record["fraction_of_peak"] = moved / seconds / peak
    if case.items:
        record["items"] = case.items
        record["item_unit"] = case.item_unit
        record["items_per_s"] = case.items / seconds
    if case.flops:
        record["flops"] = case.flops
        record["flops_per_s"] = case.flops / seconds
    return record


def _identity(case: Case) -> dict[str, Any]:
    return {
        "name": case.name,
        "group": case.group,
        "series": case.series,
        "size": case.size,
    }


def _record(prepared: _Prepared, peak: float | None) -> dict[str, Any]:
    record = _identity(prepared.case)
    record.update(compile_s=prepared.compile_s, memory=prepared.memory)
    if prepared.skipped:
        record["skipped"] = prepared.skipped
    if prepared.samples:
        record["time"] = summarize(prepared.samples)
        record["time"]["calls_per_sample"] = prepared.number
        seconds = record["time"]["median_s"]
        record.update(_throughput(prepared.case, prepared.args, seconds, peak))
    return record


def _memory_budget(settings: Settings) -> int | None:
    if settings.memory_budget_bytes is not None:
        return settings.memory_budget_bytes
    free = _free_memory_bytes()
    return free // 2 if free else None


def measure(case: Case, settings: Settings, *, peak: float | None = None) -> dict[str, Any]:
    """Compiles and times `case` with its references; returns one JSON-ready record.

    The record holds the case's compile time, compiled memory, time statistics and
    throughput, and under "references" the same for each reference plus the paired
    ratio `case / reference`. A function whose compiled program needs more than the
    memory budget (`Settings.memory_budget_bytes`) is compiled and reported but not run
    (`skipped`); the others are still timed. An exception becomes an `error` entry: of
    the whole record when the case itself fails, else of the one reference that failed
    to prepare (e.g. a baseline without a backward pass), the others still timed.
    """
    try:  # a broken case is reported and must not end the run
        prepared = [_prepare(case)]
    except Exception as error:
        return {**_identity(case), "error": _error_text(error), "references": {}}
    failed = {}
    for label, ref_case in case.references:
        try:
            prepared.append(_prepare(ref_case))
        except Exception as error:
            failed[label] = _error_text(error)
    budget = _memory_budget(settings)
    for function in prepared:
        if budget and function.memory and function.memory["total_bytes"] > budget:
            function.skipped = (
                f"not run: needs {function.memory['total_bytes'] / 2**30:.1f} GiB, over the "
                f"memory budget of {budget / 2**30:.1f} GiB"
            )
    error = None
    runnable = [function for function in prepared if not function.skipped]
    if runnable:
        try:
            _time_interleaved(runnable, settings)
        except Exception as caught:
            error = f"{type(caught).__name__}: {caught}"
    record = _record(prepared[0], peak)
    if error:
        record["error"] = error
    record["references"] = {}
    timed = iter(prepared[1:])
    for label, ref_case in case.references:
        if label in failed:
            entry = {**_identity(ref_case), "error": failed[label]}
        else:
            ref = next(timed)
            entry = _record(ref, peak)
            if prepared[0].samples and ref.samples:
                entry.update(paired_ratio(prepared[0].samples, ref.samples))
        record["references"][label] = {**entry, "listed": ref_case.listed}
    return record


def _error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def fit_power_law(sizes: Sequence[float], values: Sequence[float]) -> dict[str, float]:
    """Least-squares fit of `value = coefficient * size^exponent` in log-log space.

    Returns the exponent, the coefficient and the largest relative deviation of the
    points from the fitted curve (how well a single power law describes them).
    """
    sizes = np.asarray(sizes, np.float64)
    values = np.asarray(values, np.float64)
    if sizes.shape != values.shape or sizes.size < 2 or len(np.unique(sizes)) < 2:
        raise ValueError(
            f"fit_power_law needs at least two distinct sizes with one value each, got "
            f"sizes {sizes.tolist()} and values {values.tolist()}"
        )
    if np.any(sizes <= 0) or np.any(values <= 0):
        raise ValueError("fit_power_law needs positive sizes and values")
    exponent, log_coefficient = np.polyfit(np.log(sizes), np.log(values), 1)
    fitted = np.exp(log_coefficient) * sizes**exponent
    return {
        "exponent": float(exponent),
        "coefficient": float(np.exp(log_coefficient)),
        "max_relative_deviation": float(np.max(np.abs(values / fitted - 1.0))),
    }


def fit_series(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Power-law fits of compiled memory and median time over `size`, per series."""
    by_series: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        if record.get("series") and record.get("size"):
            by_series.setdefault(record["series"], []).append(record)
    fits = []
    for series, members in by_series.items():
        quantities = {
            "memory": [(r["size"], (r.get("memory") or {}).get("total_bytes")) for r in members],
            "time": [(r["size"], r.get("time", {}).get("median_s")) for r in members],
        }
        for quantity, points in quantities.items():
            points = [(size, value) for size, value in points if value]
            if len({size for size, _ in points}) < 2:
                continue
            sizes, values = zip(*sorted(points), strict=True)
            fit = fit_power_law(sizes, values)
            fits.append(
                {
                    "series": series,
                    "group": members[0]["group"],
                    "quantity": quantity,
                    "sizes": list(sizes),
                    **fit,
                }
            )
    return fits


def run_suite(
    cases: Sequence[Case],
    settings: Settings,
    *,
    mode: str,
    groups: Mapping[str, str] | None = None,
    notes: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measures every case; returns the results document (see `write_outputs`)."""
    names = [case.name for case in cases]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"case names must be unique, got duplicates {duplicates}")
    env = environment(settings)
    peak = env["peak_bandwidth_bytes_per_s"]
    log(f"benchmarks ({mode}): {len(cases)} cases on {env['machine']}, JAX {env['jax']}")
    start = time.perf_counter()
    records = []
    listed = set()
    for index, case in enumerate(cases, 1):
        record = measure(case, settings, peak=peak)
        record["load_average"] = load_average()
        elapsed = time.perf_counter() - start
        log(f"[{index}/{len(cases)}, {elapsed:.0f} s] {report.one_line(record)}")
        for entry in record["references"].values():
            if entry["listed"] and entry["name"] not in listed:
                listed.add(entry["name"])
                records.append(
                    {k: v for k, v in entry.items() if not k.startswith(("ratio", "listed"))}
                )
        records.append(record)
    return {
        "schema": SCHEMA_VERSION,
        "mode": mode,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - start,
        "environment": env,
        "settings": dataclasses.asdict(settings),
        "groups": dict(groups or {}),
        "notes": list(notes),
        "results": records,
        "fits": fit_series(records),
    }
