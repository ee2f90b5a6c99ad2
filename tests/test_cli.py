"""Tests for the console script and the light core install: lazy imports, extras."""

import importlib.metadata
import importlib.resources
import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import jax_posenc
from jax_posenc import cli

ROOT = Path(__file__).resolve().parents[1]
# Flax itself requires optax and orbax-checkpoint, so the core install has them too.
NOT_CORE = ("tqdm", "matplotlib", "chex", "torch", "jax_posenc.train", "jax_posenc.study")
HEAVY_MODULES = ("jax", "flax", "numpy", *NOT_CORE)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )


@pytest.mark.parametrize("argv", [["--help"], ["--version"], []])
def test_help_and_version_import_no_jax(argv):
    result = run_python(
        f"""
        import contextlib, io, json, sys
        from jax_posenc import cli
        with contextlib.redirect_stdout(io.StringIO()) as out:
            try:
                code = cli.main({argv!r})
            except SystemExit as exit:
                code = exit.code
        heavy = sorted(name for name in {HEAVY_MODULES!r} if name in sys.modules)
        print(json.dumps([code, heavy, out.getvalue()]))
        """
    )
    code, heavy, out = json.loads(result.stdout or "null") or (None, None, result.stderr)
    assert (code, heavy) == (0, []), out
    assert out.startswith("jax-posenc 0" if argv == ["--version"] else "usage: jax-posenc")


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"jax-posenc {jax_posenc.__version__}\n"
    assert jax_posenc.__version__ == importlib.metadata.version("jax_posenc")


def test_help_lists_every_command(capsys):
    assert cli.main([]) == 0
    usage = capsys.readouterr().out
    assert all(name in usage for name in cli.COMMANDS)


def test_command_help_shows_its_own_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["study", "--help"])
    assert "--encodings" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["plot", "--help"])
    assert "--study" in capsys.readouterr().out


def test_bench_points_to_the_suite_in_the_repository(capsys):
    assert cli.main(["bench", "--quick"]) == 2
    assert "python -m benchmarks" in capsys.readouterr().err


def test_command_without_the_study_extra_says_what_to_install():
    result = run_python(
        """
        import sys
        sys.modules["tqdm"] = None  # as if the study extra were not installed
        from jax_posenc import cli
        sys.exit(cli.main(["study", "--steps", "1"]))
        """
    )
    assert result.returncode == 2, result.stderr
    assert "tqdm is not installed" in result.stderr
    assert "pip install 'jax_posenc[study]'" in result.stderr


def test_importing_the_package_imports_no_jax_until_a_name_is_used():
    result = run_python(
        """
        import sys
        import jax_posenc
        from jax_posenc import _checks  # a private submodule does not load the API
        before = "jax_posenc.rope" in sys.modules
        jax_posenc.apply_rope
        print(before, "jax_posenc.rope" in sys.modules)
        """
    )
    assert result.stdout.split() == ["False", "True"], result.stderr


def test_every_public_name_resolves_and_unknown_names_raise():
    assert len(set(jax_posenc.__all__)) == len(jax_posenc.__all__)
    for name in jax_posenc.__all__:
        assert getattr(jax_posenc, name) is not None
    assert set(jax_posenc.__all__) <= set(dir(jax_posenc))
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        jax_posenc.not_a_name  # noqa: B018


def test_library_core_needs_only_jax_flax_and_numpy():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {dependency.split(">")[0].split("=")[0].split("<")[0] for dependency in dependencies}
    assert names == {"jax", "jaxlib", "flax", "numpy"}
    result = run_python(
        f"""
        import sys
        import jax.numpy as jnp
        from flax import nnx
        import jax_posenc as pe
        from jax_posenc import nnx as pe_nnx
        x = jnp.ones((1, 8, 2, 4))
        pe.dot_product_attention(pe.apply_rope(x, jnp.arange(8)), x, x, causal=True)
        pe.Transformer(pe.TransformerConfig(encoding="rope+alibi", d_model=8, num_heads=2))
        bias = pe_nnx.T5RelativePositionBias(num_heads=2, rngs=nnx.Rngs(0))
        pe_nnx.RotaryEmbedding()(x, x, jnp.arange(8)), bias(jnp.arange(8), jnp.arange(8))
        print(sorted(name for name in {NOT_CORE!r} if name in sys.modules))
        """
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_py_typed_marks_the_package_as_typed():
    assert (importlib.resources.files("jax_posenc") / "py.typed").is_file()
