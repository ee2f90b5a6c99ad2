"""`python -m benchmarks.gpu_attention [--out DIR] [--lengths ...] [--dry-run]`: the fused
Pallas attention kernel on a GPU, next to blockwise and cuDNN.

bf16, batch 1, 8 heads, head_dim 128, causal, L = 1k .. 32k; forward and forward +
backward; positional terms none, ALiBi, T5 and RoPE + ALiBi on `implementation="pallas"`
and `"blockwise"`, and `jax.nn.dot_product_attention(implementation="cudnn")` without a
bias and with a materialized `[1, H, L, L]` ALiBi bias where it fits (out-of-memory is
caught and reported). For each: the median time over repeats (`block_until_ready`),
achieved TFLOP/s (causal: `2 * 2 * B * H * L^2 * D / 2` forward, 2.5 times that for the
backward pass), the ratio to cuDNN without a bias and to blockwise with the same term,
the temporary memory XLA reports for the compiled function and the device's peak
(`memory_stats()["peak_bytes_in_use"]`, a running maximum over the process). Writes
`gpu_attention.json` and `gpu_attention.md` to `--out`.

Refuses (exit code 2) on a machine without a GPU; `--dry-run` instead runs the smallest
case on the default backend in Pallas interpret mode, with xla standing in for cuDNN, to
check the script end to end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jax_posenc as pe

LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
TERMS = ("none", "alibi", "t5", "rope+alibi")
IMPLEMENTATIONS = ("pallas", "blockwise")
MODES = ("fwd", "fwd+bwd")


def causal_flops(batch: int, heads: int, length: int, head_dim: int, mode: str) -> float:
    """FLOPs of causal attention: half of the `2 * 2 * B * H * L^2 * D` of full attention
    forward; the backward pass counts 2.5 times the forward."""
    forward = 2 * 2 * batch * heads * length * length * head_dim / 2
    return forward if mode == "fwd" else forward * 3.5


def _terms(term: str, heads: int, head_dim: int):
    """`(bias_fn, rope_frequencies)` of a positional term."""
    slopes = pe.alibi_slopes(heads)

    def alibi(q_positions, k_positions):
        return pe.alibi_bias(q_positions, k_positions, slopes)

    if term == "none":
        return None, None
    if term == "alibi":
        return alibi, None
    if term == "t5":
        table = jax.random.normal(jax.random.key(1), (32, heads)) * 0.1

        def t5(q_positions, k_positions):
            return pe.t5_bias(table, q_positions, k_positions, bidirectional=False)

        return t5, None
    if term == "rope+alibi":
        return alibi, 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)
    raise ValueError(f"unknown term {term!r}; expected one of {TERMS}")


def attention_fn(implementation: str, term: str, heads: int, head_dim: int, length: int):
    """`(q, k, v) -> out [B, L, H, D]` for one row of the table, or None if it does not apply."""
    bias_fn, rope_frequencies = _terms(term, heads, head_dim)
    if implementation in IMPLEMENTATIONS:
        return lambda q, k, v: pe.dot_product_attention(
            q, k, v, bias_fn=bias_fn, rope_frequencies=rope_frequencies, causal=True,
            implementation=implementation,
        )  # fmt: skip
    if term not in ("none", "alibi") or implementation not in ("cudnn", "xla"):
        return None
    cudnn = implementation if implementation == "cudnn" else None
    if term == "none":
        return lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation=cudnn
        )

    def materialized(q, k, v):
        positions = jnp.arange(length)
        bias = bias_fn(positions[None], positions[None]).astype(q.dtype)  # [1, H, L, L]
        return jax.nn.dot_product_attention(
            q, k, v, bias=bias, is_causal=True, implementation=cudnn
        )

    return materialized


def _with_backward(fn: Callable) -> Callable:
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


def time_case(fn: Callable, args, repeats: int, warmup: int) -> dict:
    """Median seconds of a jitted `fn(*args)`, with compile-time memory and device peak."""
    compiled = jax.jit(fn).lower(*args).compile()
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        samples.append(time.perf_counter() - start)
    memory = compiled.memory_analysis()
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "seconds": statistics.median(samples),
        "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
    }


def run(
    lengths: Sequence[int],
    *,
    batch: int = 1,
    heads: int = 8,
    head_dim: int = 128,
    repeats: int = 20,
    warmup: int = 3,
    reference: str = "cudnn",
    dtype=jnp.bfloat16,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Times every (length, mode, implementation, term) row; returns them with ratios."""
    rows = []
    for length in lengths:
        shape = (batch, length, heads, head_dim)
        keys = jax.random.split(jax.random.key(0), 3)
        args = tuple(jax.random.normal(key, shape, dtype) for key in keys)
        for mode in MODES:
            plan = [(impl, term) for impl in IMPLEMENTATIONS for term in TERMS]
            plan += [(reference, "none"), (reference, "alibi")]
            for implementation, term in plan:
                fn = attention_fn(implementation, term, heads, head_dim, length)
                row = {"length": length, "mode": mode, "implementation": implementation}
                row["term"] = (
                    term if implementation in IMPLEMENTATIONS else f"{term} (materialized)"
                )
                if term == "none" and implementation not in IMPLEMENTATIONS:
                    row["term"] = "none"
                try:
                    timed = time_case(
                        fn if mode == "fwd" else _with_backward(fn), args, repeats, warmup
                    )
                except Exception as error:  # OOM and lowering failures are results
                    row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                else:
                    row.update(timed)
                    flops = causal_flops(batch, heads, length, head_dim, mode)
                    row["tflops"] = flops / timed["seconds"] / 1e12
                log(_describe(row))
                rows.append(row)
    return add_ratios(rows, reference)


def add_ratios(rows: list[dict], reference: str) -> list[dict]:
    """`vs_reference`: time over the reference without a bias (same length and mode);
    `vs_blockwise`: time over blockwise with the same term."""

    def seconds(**match):
        for row in rows:
            if all(row.get(k) == v for k, v in match.items()) and "seconds" in row:
                return row["seconds"]
        return None

    for row in rows:
        if "seconds" not in row:
            continue
        key = {"length": row["length"], "mode": row["mode"]}
        base = seconds(**key, implementation=reference, term="none")
        block = seconds(**key, implementation="blockwise", term=row["term"])
        row["vs_reference"] = None if base is None else row["seconds"] / base
        row["vs_blockwise"] = None if block is None else row["seconds"] / block
    return rows


def _describe(row: dict) -> str:
    head = f"L={row['length']:>6} {row['mode']:<8} {row['implementation']:<10} {row['term']:<24}"
    if "error" in row:
        return f"{head} {row['error']}"
    return f"{head} {row['seconds'] * 1e3:9.3f} ms {row['tflops']:7.2f} TFLOP/s"


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(rows: list[dict], device: str, reference: str, dtype: str = "bfloat16") -> str:
    """The rows as a markdown table."""
    lines = [
        f"Device: {device}. {dtype}, causal; ratios: time over {reference} without a bias, and "
        "over blockwise with the same term (lower is better). temp: XLA's temporary "
        "buffers of the compiled function; peak: the device's running peak.",
        "",
        "| L | mode | implementation | term | ms | TFLOP/s | vs "
        f"{reference} | vs blockwise | temp MiB | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    mib = 1 / 2**20
    for row in rows:
        if "error" in row:
            cells = [row["error"], "", "", "", "", ""]
        else:
            cells = [
                _cell(row["seconds"] * 1e3, ".3f"),
                _cell(row["tflops"], ".2f"),
                _cell(row.get("vs_reference"), ".2f"),
                _cell(row.get("vs_blockwise"), ".2f"),
                _cell(row["temp_bytes"] and row["temp_bytes"] * mib, ".1f"),
                _cell(row["peak_bytes_in_use"] and row["peak_bytes_in_use"] * mib, ".1f"),
            ]
        lines.append(
            f"| {row['length']} | {row['mode']} | {row['implementation']} | {row['term']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_attention", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", default="bench_out", help="output folder (default bench_out)")
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=list(LENGTHS), help="sequence lengths"
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls after compiling")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="no GPU needed: the smallest case in interpret mode, xla in place of cuDNN",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        settings = {"heads": 2, "head_dim": 16, "repeats": 1, "warmup": 0, "reference": "xla"}
        settings["dtype"] = jnp.float32
        lengths = [64]
    else:
        if jax.default_backend() != "gpu":
            print(
                f"benchmarks.gpu_attention needs a GPU; the default backend is "
                f"{jax.default_backend()!r}. Use --dry-run to check the script on this machine.",
                file=sys.stderr,
            )
            return 2
        settings = {"repeats": args.repeats, "warmup": args.warmup}
        lengths = args.lengths
    device = str(jax.devices()[0].device_kind)
    rows = run(lengths, **settings)
    reference = settings.get("reference", "cudnn")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "dry_run": args.dry_run, "jax": jax.__version__, **settings}
    meta["dtype"] = str(jnp.dtype(settings.get("dtype", jnp.bfloat16)))
    (out / "gpu_attention.json").write_text(json.dumps({"settings": meta, "rows": rows}, indent=1))
    (out / "gpu_attention.md").write_text(markdown(rows, device, reference, meta["dtype"]))
    print(f"wrote {out / 'gpu_attention.json'} and {out / 'gpu_attention.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
