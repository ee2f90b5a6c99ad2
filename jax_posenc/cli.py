"""The `jax-posenc` console script.

Importing jax takes seconds, so `jax-posenc --help` and `--version` import nothing
beyond the standard library; a command imports its module (and jax) when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import jax_posenc

# name -> (module with `add_arguments` and `run_from_args`, one-line help)
COMMANDS = {
    "study": (
        "jax_posenc.study",
        "train one small model per encoding and measure length extrapolation",
    ),
    "plot": ("jax_posenc.plots", "write a gallery of PNGs that explain the encodings"),
}
# The benchmark suite ships with the source repository, not with the package.
BENCH_MOVED = (
    "the benchmark suite is not part of the installed package; from a source checkout "
    "run `python -m benchmarks [--quick] [--only REGEX]` in the repository root"
)

# Imports that the `study` extra brings (jax_posenc's core needs jax, flax and numpy only).
STUDY_EXTRA_MODULES = ("optax", "orbax", "tqdm", "matplotlib")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported to add its options."""
    parser = argparse.ArgumentParser(
        prog="jax-posenc",
        description="Positional encodings for JAX/Flax transformers: studies, plots, benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {jax_posenc.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = commands.add_parser(name, help=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            command_parser.set_defaults(run=module.run_from_args)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The command named in `argv`: the first argument that is not an option."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command(argv)
    if command == "bench":
        print(f"jax-posenc bench: error: {BENCH_MOVED}", file=sys.stderr)
        return 2
    try:
        parser = build_parser(command if command in COMMANDS else None)
    except ModuleNotFoundError as error:
        package = (error.name or "").split(".")[0]
        if package not in STUDY_EXTRA_MODULES:
            raise
        print(
            f"jax-posenc {command}: error: {package} is not installed; "
            "install the study extra: pip install 'jax_posenc[study]'",
            file=sys.stderr,
        )
        return 2
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
