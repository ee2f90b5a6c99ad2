"""The jax_posenc benchmark suite, run from the repository root: `python -m benchmarks`.

`runner.py` times and measures, `report.py` writes the markdown and the figure,
`cases.py` holds the cases with `tutorial.py` (hand-written baselines) and
`torch_baselines.py` (PyTorch's forms). This folder is not part of the installed
package and the package never imports it.
"""
