"""The jax_posenc benchmark suite: cases (`cases.py`) and hand-written baselines (`tutorial.py`).

Run it with `jax-posenc bench` or `python benchmarks/run.py`; the runner is
`jax_posenc.benchmarking`.
"""
