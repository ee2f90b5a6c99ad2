"""The `jax-posenc` console script."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jax-posenc",
        description="Positional encodings for JAX/Flax transformers: studies, plots, benchmarks.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    from jax_posenc import plots, study

    study_parser = commands.add_parser(
        "study", help="train one small model per encoding and measure length extrapolation"
    )
    study.add_arguments(study_parser)
    study_parser.set_defaults(run=study.run_from_args)
    plot_parser = commands.add_parser(
        "plot", help="write a gallery of PNGs that explain the encodings"
    )
    plots.add_arguments(plot_parser)
    plot_parser.set_defaults(run=plots.run_from_args)
    from jax_posenc import benchmarking

    bench = commands.add_parser(
        "bench", help="run the benchmark suite of benchmarks/ (JSON, markdown and a plot)"
    )
    benchmarking.add_arguments(bench)
    bench.set_defaults(run=benchmarking.run_from_args)
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
