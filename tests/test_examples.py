"""The documentation runs: every script in examples/, the docstring examples of the main
entry points, and the API reference build (docs/build.py)."""

import doctest
import importlib.util
import inspect
import runpy
import sys
from pathlib import Path

import pytest

import jax_posenc as pe

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))

# A line each example prints once its check against a reference has passed.
EXPECTED_OUTPUT = {
    "flax_linen_attention.py": "blockwise (block 8) equals xla",
    "hf_config.py": "inv_freq equals transformers'",
    "kv_cache_generation.py": "Flax decode=True",
    "nnx_attention.py": "equal to linen",
    "packed_sequences.py": "packed logits vs each document alone",
    "train_model.py": "held-out perplexity per byte at 128 tokens",
}


def test_every_example_is_run_by_this_file():
    assert sorted(path.name for path in EXAMPLES) == sorted(EXPECTED_OUTPUT)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.stem)
def test_example_runs_and_passes_its_own_checks(path, monkeypatch, capsys):
    # Each script asserts its results against a reference; run it as `python <path>`.
    monkeypatch.setattr(sys, "argv", [str(path)])
    runpy.run_path(str(path), run_name="__main__")
    assert EXPECTED_OUTPUT[path.name] in capsys.readouterr().out


# Every public name whose docstring has an example (`>>>`) runs it.
DOCUMENTED = [
    getattr(pe, name) for name in pe.__all__ if ">>>" in (inspect.getdoc(getattr(pe, name)) or "")
]


@pytest.mark.parametrize("function", DOCUMENTED, ids=lambda function: function.__name__)
def test_docstring_example_runs(function):
    tests = doctest.DocTestFinder(recurse=False).find(function, function.__name__)
    examples = [test for test in tests if test.examples]
    assert examples, f"{function.__name__} has no docstring example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in examples:
        runner.run(test)
    assert runner.failures == 0


@pytest.mark.skipif(importlib.util.find_spec("pdoc") is None, reason="pdoc (dev extra) missing")
def test_api_reference_builds(tmp_path):
    spec = importlib.util.spec_from_file_location("docs_build", ROOT / "docs" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    index = build.build(tmp_path)
    assert index.is_file()
    page = (tmp_path / "jax_posenc.html").read_text()
    for function in DOCUMENTED:
        assert f'id="{function.__name__}"' in page
    assert (tmp_path / "jax_posenc" / "nnx.html").is_file()
