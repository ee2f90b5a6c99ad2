"""`python -m benchmarks.block_sizes [--out DIR] [--lengths ...] [--head-dims ...]`: the
sweep behind `jax_posenc.attention.CPU_BLOCK_TABLE`.

Times causal blockwise attention (`dot_product_attention(..., causal=True,
implementation="blockwise", block_size=...)`, no bias, float32, batch 1, 8 heads) for
every candidate `(q_block, k_block)` at every length and head size, forward and
forward + backward, and reports each as a ratio to the size the table chooses for that
length (below 1: a faster candidate). Candidates are interleaved within each repeat, so
every ratio is a same-run ratio. Writes `block_sizes.json` and `block_sizes.md` to
`--out` and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

import jax_posenc as pe
from benchmarks.gpu_attention import _with_backward

CANDIDATES = ((256, 256), (512, 256), (512, 512), (1024, 256), (256, 512), (1024, 512))
LENGTHS = (1024, 2048, 4096, 8192)
HEAD_DIMS = (64, 128)
MODES = ("fwd", "fwd+bwd")
HEADS = 8


def _attention(block_size: tuple[int, int], mode: str):
    def forward(q, k, v):
        return pe.dot_product_attention(
            q, k, v, causal=True, implementation="blockwise", block_size=block_size
        )

    return forward if mode == "fwd" else _with_backward(forward)


def sweep(
    lengths: Sequence[int],
    head_dims: Sequence[int],
    candidates: Sequence[tuple[int, int]],
    repeats: int,
    heads: int = HEADS,
) -> list[dict]:
    """One row per (head_dim, length, mode, candidate): median seconds and the ratio to
    the candidate `default_block_size` picks for that length on this platform."""
    rows = []
    for head_dim in head_dims:
        for length in lengths:
            keys = jax.random.split(jax.random.key(length + head_dim), 3)
            q, k, v = (jax.random.normal(key, (1, length, heads, head_dim)) for key in keys)
            chosen = pe.attention.default_block_size(length, length, head_dim)
            sizes = sorted({*(s for s in candidates if s[0] <= length), chosen})
            for mode in MODES:
                compiled = {}
                for size in sizes:
                    compiled[size] = jax.jit(_attention(size, mode)).lower(q, k, v).compile()
                    jax.block_until_ready(compiled[size](q, k, v))  # warm-up
                samples = {size: [] for size in sizes}
                for _ in range(repeats):  # interleaved: every candidate once per round
                    for size in sizes:
                        start = time.perf_counter()
                        jax.block_until_ready(compiled[size](q, k, v))
                        samples[size].append(time.perf_counter() - start)
                medians = {size: float(np.median(times)) for size, times in samples.items()}
                for size in sizes:
                    rows.append({
                        "head_dim": head_dim, "length": length, "mode": mode,
                        "block_size": list(size), "chosen": size == chosen,
                        "seconds": medians[size], "ratio": medians[size] / medians[chosen],
                    })  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    """A table per head size: one line per (length, mode), one column per candidate,
    each cell the ratio to the chosen size (`*` marks the table's choice)."""
    lines = []
    sizes = sorted({tuple(r["block_size"]) for r in rows})
    for head_dim in sorted({r["head_dim"] for r in rows}):
        header = " | ".join(f"{q}x{k}" for q, k in sizes)
        lines += [f"\nhead_dim {head_dim} (time / the table's choice, marked *)\n",
                  f"| L, pass | {header} |", "|---|" + "---|" * len(sizes)]  # fmt: skip
        for length in sorted({r["length"] for r in rows}):
            for mode in MODES:
                key = (head_dim, length, mode)
                cells = {
                    tuple(r["block_size"]): r
                    for r in rows
                    if (r["head_dim"], r["length"], r["mode"]) == key
                }
                if not cells:
                    continue
                text = [_cell(cells.get(size)) for size in sizes]
                lines.append(f"| {length}, {mode} | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    return f"{row['ratio']:.2f}" + ("*" if row["chosen"] else "")


def _size(text: str) -> tuple[int, int]:
    q_block, _, k_block = text.partition("x")
    return int(q_block), int(k_block or q_block)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.block_sizes", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument("--out", default="bench_out", help="output folder (default bench_out)")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    parser.add_argument(
        "--sizes", type=_size, nargs="+", default=list(CANDIDATES),
        help="candidates as QxK, e.g. 512x256",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows = sweep(args.lengths, args.head_dims, args.sizes, args.repeats)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0].device_kind
    (out / "block_sizes.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    text = f"Blockwise block sizes on {device}, float32, causal, {HEADS} heads{markdown(rows)}"
    (out / "block_sizes.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
