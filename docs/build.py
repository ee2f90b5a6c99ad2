"""Builds the API reference from the docstrings with pdoc (part of the dev extra).

    python docs/build.py                 # writes docs/api/index.html
    python docs/build.py --out site/api  # anywhere else

The reference covers what users import: `jax_posenc` (the flat public API),
`jax_posenc.nnx`, the scaling protocol in `jax_posenc.rope_scaling`, and the training
helpers `jax_posenc.train` and `jax_posenc.data`. The output is not committed.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

MODULES = (
    "jax_posenc",
    "jax_posenc.nnx",
    "jax_posenc.rope_scaling",
    "jax_posenc.train",
    "jax_posenc.data",
)
DEFAULT_OUT = Path(__file__).resolve().parent / "api"


def build(out: str | Path = DEFAULT_OUT) -> Path:
    """Writes the HTML reference into `out`; returns the path of its index page."""
    import pdoc
    import pdoc.render

    import jax_posenc

    pdoc.render.configure(
        docformat="google",
        footer_text=f"jax_posenc {jax_posenc.__version__}",
        show_source=True,
    )
    pdoc.pdoc(*MODULES, output_directory=Path(out))
    return Path(out) / "index.html"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the jax_posenc API reference (pdoc).")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    print(f"wrote {build(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
