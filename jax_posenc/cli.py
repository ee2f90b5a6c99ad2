"""The `jax-posenc` console script."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _not_yet(name: str, issue: str):
    def run(args: argparse.Namespace) -> int:
        print(f"jax-posenc {name}: arrives with {issue}; nothing to run yet.")
        return 0

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jax-posenc",
        description="Positional encodings for JAX/Flax transformers: studies, plots, benchmarks.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    study = commands.add_parser(
        "study", help="train one small model per encoding and measure length extrapolation"
    )
    study.set_defaults(run=_not_yet("study", "the model/study issue"))
    plot = commands.add_parser("plot", help="write a gallery of PNGs that explain the encodings")
    plot.set_defaults(run=_not_yet("plot", "the model/study issue"))
    bench = commands.add_parser("bench", help="run the benchmark suite")
    bench.set_defaults(run=_not_yet("bench", "the benchmark issue"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
