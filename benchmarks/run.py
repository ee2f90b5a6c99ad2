"""Runs the benchmark suite as a plain script: `python benchmarks/run.py [--quick] ...`.

Same options as `jax-posenc bench`; see `jax_posenc/benchmarking.py`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jax_posenc import benchmarking

if __name__ == "__main__":
    sys.exit(benchmarking.main())
