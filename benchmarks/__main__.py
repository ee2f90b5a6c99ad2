"""`python -m benchmarks [--quick] [--only REGEX] [--list] ...`, from the repository root.

Runs the cases of `benchmarks.cases` with `benchmarks.runner` and writes the reports of
`benchmarks.report` to `--out` (default `bench_out/`): `bench-<mode>.json`,
`bench-<mode>.md` and `bench-<mode>.png`. `--section` turns the latest results file into
the README's "Performance" section instead of running anything.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks import cases as suite
from benchmarks import report, runner
from jax_posenc import _files

PROG = "python -m benchmarks"
DESCRIPTION = (
    "Times jax_posenc next to same-run baselines; writes JSON, markdown and a plot to --out."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the runner's options to `parser`."""
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and few repeats (minutes on a CPU)"
    )
    parser.add_argument("--out", default="bench_out", help="output folder (default bench_out)")
    parser.add_argument("--only", metavar="REGEX", help="run only cases whose name matches")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--repeats", type=int, help="timed samples per function")
    parser.add_argument(
        "--min-repeats",
        type=int,
        help="samples kept even when a case runs past its time budget (default 3)",
    )
    parser.add_argument("--warmup", type=int, help="warm-up calls after compiling")
    parser.add_argument(
        "--peak-bandwidth", type=float, metavar="GB_PER_S", help="device peak for '%% of peak'"
    )
    parser.add_argument(
        "--section",
        nargs="*",
        metavar="RESULTS_JSON",
        help="print the README 'Performance' section from results files (default: the "
        "latest in --out; several runs are merged in order) and write it to "
        "<out>/performance.md; runs nothing",
    )


def _refuse(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def merge_results(documents: Sequence[dict]) -> dict:
    """Several results documents as one: the results of each in order, their notes and
    group descriptions once, the power-law fits refitted over all of them. The
    environment, settings and date are the last run's."""
    if not documents:
        raise ValueError("merge_results needs at least one results document")
    merged = dict(documents[-1])
    merged["results"] = [record for document in documents for record in document["results"]]
    merged["notes"] = list(dict.fromkeys(n for d in documents for n in d.get("notes", [])))
    merged["groups"] = {k: v for d in documents for k, v in d.get("groups", {}).items()}
    merged["wall_s"] = sum(document["wall_s"] for document in documents)
    modes = {document["mode"] for document in documents}
    merged["mode"] = modes.pop() if len(modes) == 1 else "full"
    merged["fits"] = runner.fit_series(merged["results"])
    return merged


def _section(args: argparse.Namespace) -> int:
    try:
        paths = [Path(path) for path in args.section] or [report.latest_results(args.out)]
        section = report.performance_section(merge_results([_files.read_json(p) for p in paths]))
    except (FileNotFoundError, ValueError) as error:
        return _refuse(str(error))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "performance.md").write_text(section)
    print(section)
    return 0


def run_from_args(args: argparse.Namespace) -> int:
    """Runs the suite (or prints the Performance section) as `args` ask.

    Returns 2, writing nothing, when the arguments select nothing to run or read.
    """
    if args.section is not None:
        return _section(args)
    mode = "quick" if args.quick else "full"
    try:
        settings = runner.Settings.for_mode(
            mode,
            repeats=args.repeats,
            min_repeats=args.min_repeats,
            warmup=args.warmup,
            peak_bandwidth=args.peak_bandwidth * 1e9 if args.peak_bandwidth else None,
        )
        pattern = re.compile(args.only) if args.only else None
    except re.error as error:
        return _refuse(f"--only {args.only!r} is not a regular expression: {error}")
    except (TypeError, ValueError) as error:
        return _refuse(str(error))
    cases = suite.build_cases(mode)
    if pattern is not None:
        matched = [case for case in cases if pattern.search(case.name)]
        if not matched:
            quick = " --quick" if args.quick else ""
            return _refuse(
                f"--only {args.only!r} matches none of the {len(cases)} {mode} cases; "
                f"`{PROG}{quick} --list` lists them"
            )
        cases = matched
    if args.list:
        for case in cases:
            refs = ", ".join(label for label, _ in case.references)
            print(case.name + (f"  (÷ {refs})" if refs else ""))
        return 0
    document = runner.run_suite(
        cases, settings, mode=mode, groups=suite.GROUPS, notes=suite.notes()
    )
    paths = report.write_outputs(document, args.out)
    print(report.markdown_report(document))
    print("wrote " + ", ".join(str(path) for path in paths.values()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
