"""Tests for the benchmark suite in `benchmarks/`: runner, report, cases, command line.

The runner is checked on tiny cases (a few milliseconds each): its statistics against
hand-computed values, the power-law fit on synthetic data, and the files it writes. The
tutorial forms in `benchmarks/tutorial.py` are checked against float64 formulas from
the papers, so a `÷ tutorial` ratio compares implementations of the same maths.
`benchmarks/` is a folder of the repository (pytest puts the root on `sys.path`), and
the package must never import it.
"""

import ast
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import sinusoidal_reference

from benchmarks import cases as suite
from benchmarks import report, runner, tutorial
from benchmarks.__main__ import main as bench_main
from benchmarks.runner import Case, Settings
from jax_posenc import attention as pe_attention
from jax_posenc import cli

ROOT = Path(__file__).resolve().parents[1]
FAST = Settings(warmup=1, repeats=3, min_repeats=3, min_sample_s=0.0, max_case_s=1.0)
SHAPE = (64, 128)


def _ones(shape=SHAPE, dtype=jnp.float32):
    return lambda: (jnp.ones(shape, dtype),)


def _copy_case(shape=SHAPE):
    return Case(
        name=f"copy/{shape}",
        group="reference",
        fn=jnp.copy,
        make_args=_ones(shape),
        memory_bound=True,
    )


def _double_case(**overrides):
    fields = dict(
        name="double",
        group="toy",
        fn=lambda x: 2.0 * x,
        make_args=_ones(),
        references=(("copy", _copy_case()),),
        memory_bound=True,
    )
    return Case(**{**fields, **overrides})


def test_measure_reports_time_memory_bandwidth_and_paired_ratio():
    record = runner.measure(_double_case(items=10, item_unit="rows", flops=8192), FAST)
    nbytes = math.prod(SHAPE) * 4
    timing = record["time"]
    assert timing["repeats"] == 3
    assert timing["min_s"] <= timing["q25_s"] <= timing["median_s"] <= timing["q75_s"]
    assert record["compile_s"] > 0
    assert record["memory"]["argument_bytes"] == nbytes
    assert record["memory"]["output_bytes"] == nbytes
    assert record["bytes_moved"] == 2 * nbytes
    assert record["bandwidth_bytes_per_s"] == pytest.approx(2 * nbytes / timing["median_s"])
    assert record["items_per_s"] == pytest.approx(10 / timing["median_s"])
    assert record["flops_per_s"] == pytest.approx(8192 / timing["median_s"])
    copy = record["references"]["copy"]
    assert copy["time"]["repeats"] == 3
    assert copy["ratio_q25"] <= copy["ratio"] <= copy["ratio_q75"]
    assert "error" not in record and "skipped" not in record


def test_summarize_matches_hand_computed_quartiles():
    stats = runner.summarize([4.0, 1.0, 100.0, 3.0, 2.0])
    assert (stats["min_s"], stats["q25_s"], stats["median_s"]) == (1.0, 2.0, 3.0)
    assert (stats["q75_s"], stats["max_s"], stats["repeats"]) == (4.0, 100.0, 5)


def test_paired_ratio_is_median_of_sample_by_sample_ratios():
    # ratios 2, 2, 3: the median of the pairs, not median(a) / median(b) = 4 / 2.
    ratio = runner.paired_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0])
    assert ratio["ratio"] == 2.0
    with pytest.raises(ValueError, match="same non-zero length"):
        runner.paired_ratio([1.0, 2.0], [1.0])


def test_io_bytes_counts_inputs_and_outputs():
    def fn(x, y):
        return x.sum(), jnp.concatenate([y, y])

    args = (jnp.ones((3, 5), jnp.float32), jnp.ones((7,), jnp.bfloat16))
    assert runner.io_bytes(fn, args) == 15 * 4 + 7 * 2 + 4 + 14 * 2


def test_fit_power_law_recovers_exponent_from_synthetic_data():
    sizes = 2.0 ** np.arange(10, 15)
    fit = runner.fit_power_law(sizes, 3.0 * sizes**1.5)
    assert fit["exponent"] == pytest.approx(1.5, abs=1e-12)
    assert fit["coefficient"] == pytest.approx(3.0, rel=1e-9)
    assert fit["max_relative_deviation"] < 1e-9
    noise = 1.0 + 0.05 * np.random.default_rng(0).uniform(-1, 1, sizes.size)
    noisy = runner.fit_power_law(sizes, 7.0 * sizes**2 * noise)
    assert noisy["exponent"] == pytest.approx(2.0, abs=0.05)
    assert noisy["max_relative_deviation"] < 0.1


def test_fit_power_law_rejects_unusable_points():
    with pytest.raises(ValueError, match="two distinct sizes"):
        runner.fit_power_law([1024, 1024], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        runner.fit_power_law([1024, 2048], [1.0, 0.0])


def test_fit_series_fits_memory_and_time_per_series():
    def record(series, size, memory, seconds):
        time_stats = {"median_s": seconds} if seconds else {}
        return {
            "group": "toy",
            "series": series,
            "size": size,
            "memory": {"total_bytes": memory},
            **({"time": time_stats} if time_stats else {}),
        }

    sizes = (1024, 2048, 4096)
    records = [record("linear", s, 10 * s, 1e-9 * s * s) for s in sizes]
    records += [record("quadratic", s, s * s, None) for s in sizes]
    fits = {(f["series"], f["quantity"]): f for f in runner.fit_series(records)}
    assert fits["linear", "memory"]["exponent"] == pytest.approx(1.0)
    assert fits["linear", "time"]["exponent"] == pytest.approx(2.0)
    assert fits["quadratic", "memory"]["exponent"] == pytest.approx(2.0)
    assert ("quadratic", "time") not in fits  # never timed: no points to fit


def test_program_over_memory_budget_is_compiled_but_not_run():
    settings = Settings(warmup=1, repeats=3, min_sample_s=0.0, memory_budget_bytes=1)
    record = runner.measure(_double_case(), settings)
    assert "time" not in record and "not run" in record["skipped"]
    assert record["memory"]["total_bytes"] > 1
    assert "ratio" not in record["references"]["copy"]


def test_broken_case_is_reported_not_raised():
    def broken(x):
        raise TypeError("wrong argument")

    record = runner.measure(_double_case(fn=broken), FAST)
    assert record["error"] == "TypeError: wrong argument"


def test_broken_reference_is_reported_and_the_others_still_timed():
    def broken(x):
        raise NotImplementedError("no backward here")

    refs = (("broken", _double_case(name="broken", fn=broken)), ("copy", _copy_case()))
    record = runner.measure(_double_case(references=refs), FAST)
    assert "error" not in record and record["time"]["repeats"] == 3
    assert record["references"]["broken"]["error"] == "NotImplementedError: no backward here"
    assert "ratio" in record["references"]["copy"]


def test_listed_reference_gets_its_own_row_once():
    listed = Case(name="listed", group="toy", fn=jnp.negative, make_args=_ones(), listed=True)
    cases = [_double_case(name=f"double{i}", references=(("listed", listed),)) for i in range(2)]
    document = runner.run_suite(cases, FAST, mode="quick", log=lambda _: None)
    assert [r["name"] for r in document["results"]] == ["listed", "double0", "double1"]
    assert "ratio" not in document["results"][0]
    with pytest.raises(ValueError, match="unique"):
        runner.run_suite(cases[:1] * 2, FAST, mode="quick", log=lambda _: None)


def _toy_document():
    cases = [_double_case()]
    for size in (64, 128):
        cases.append(
            Case(
                name=f"square/{size}",
                group="curve",
                fn=lambda x: x @ x,
                make_args=_ones((size, size)),
                series="square",
                size=size,
            )
        )
    return runner.run_suite(
        cases, FAST, mode="quick", groups={"toy": "A toy group."}, log=lambda _: None
    )


def test_outputs_are_json_markdown_and_plot(tmp_path):
    document = _toy_document()
    paths = report.write_outputs(document, tmp_path)
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(document))
    markdown = paths["md"].read_text()
    env = document["environment"]
    assert env["machine"] in markdown and env["jax"] == jax.__version__
    assert "A toy group." in markdown
    assert "| `double` |" in markdown and "÷ copy" in markdown
    assert "`square`: memory ~ size^" in markdown
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    section = report.performance_section(document)
    assert section.startswith("## Performance") and env["machine"] in section
    loads = [record["load_average"] for record in document["results"]]
    low, high = min(loads), max(loads)  # recorded after every case (Linux has getloadavg)
    assert f"load average after each case: {low:.1f}-{high:.1f}" in section
    assert report.latest_results(tmp_path) == paths["json"]
    (tmp_path / "bench-full.json").write_text(paths["json"].read_text())
    assert report.latest_results(tmp_path).name == "bench-full.json"


def test_command_lists_cases_and_regenerates_the_section(tmp_path, capsys):
    assert bench_main(["--quick", "--list", "--only", "^sinusoidal/"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed and all(line.startswith("sinusoidal/") for line in listed)
    results = report.write_outputs(_toy_document(), tmp_path)["json"]
    assert bench_main(["--section", str(results), "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("## Performance")
    assert (tmp_path / "performance.md").read_text().startswith("## Performance")


def test_section_merges_several_runs_in_order(tmp_path, capsys):
    first, second = _toy_document(), _toy_document()
    second["results"] = [dict(r, name=r["name"] + "-again") for r in second["results"]]
    paths = []
    for index, document in enumerate((first, second)):
        paths.append(report.write_outputs(document, tmp_path / str(index))["json"])
    assert bench_main(["--section", *map(str, paths), "--out", str(tmp_path)]) == 0
    section = capsys.readouterr().out
    assert section.index("| `double` |") < section.index("| `double-again` |")
    assert section.count("A toy group.") == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--only", "^no-such-case/"], "--only '^no-such-case/' matches none of the"),
        (["--only", "(rope"], "--only '(rope' is not a regular expression"),
        (["--list", "--only", "^no-such-case/"], "matches none of the"),
        (["--repeats", "0"], "repeats must be a positive integer"),
        (["--repeats", "5", "--min-repeats", "7"], "repeats must be an integer >= 7"),
    ],
)
def test_command_refuses_to_run_nothing_and_writes_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "bench"
    assert bench_main(["--quick", "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("content", ['{"mode": "quick", "environ', "[1, 2]"])
def test_command_names_a_results_file_that_does_not_parse(tmp_path, capsys, content):
    results = tmp_path / "bench-quick.json"
    results.write_text(content)
    assert bench_main(["--section", str(results), "--out", str(tmp_path / "out")]) == 2
    assert f"cannot read {str(results)!r}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_python_m_benchmarks_runs_from_the_repository_root():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--list", "--only", "^rope/half/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    listed = result.stdout.splitlines()
    assert listed and all(line.startswith("rope/half/") for line in listed)


def test_jax_posenc_bench_points_to_python_m_benchmarks(capsys):
    assert cli.main(["bench", "--quick"]) == 2
    assert "python -m benchmarks" in capsys.readouterr().err


def _repository_references(path):
    """Imports of `benchmarks`, string module names under it, and `sys.path` edits in `path`."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value] if re.fullmatch(r"[\w.]+", node.value) else []
        elif isinstance(node, ast.Attribute) and node.attr == "path":
            names = ["sys.path"] if getattr(node.value, "id", None) == "sys" else []
        else:
            continue
        yield from (
            name for name in names if name == "sys.path" or name.split(".")[0] == "benchmarks"
        )


def test_the_package_never_imports_the_benchmarks():
    modules = sorted((ROOT / "jax_posenc").rglob("*.py"))
    assert ROOT / "jax_posenc" / "cli.py" in modules
    found = {
        str(path.relative_to(ROOT)): references
        for path in modules
        if (references := list(_repository_references(path)))
    }
    assert not found


def test_repository_reference_scan_catches_each_form(tmp_path):
    module = tmp_path / "module.py"
    module.write_text(
        "import benchmarks.cases\n"
        "from benchmarks import runner\n"
        "import importlib, sys\n"
        "sys.path.insert(0, '..')\n"
        "importlib.import_module('benchmarks.report')\n"
        "text = 'run python -m benchmarks'\n"
    )
    assert sorted(_repository_references(module)) == [
        "benchmarks",
        "benchmarks.cases",
        "benchmarks.report",
        "sys.path",
    ]


def test_settings_for_mode_and_validation():
    assert Settings.for_mode("quick").repeats < Settings.for_mode("full").repeats
    assert Settings.for_mode("full", repeats=4, warmup=None).repeats == 4
    assert Settings.for_mode("full", repeats=7, min_repeats=7).min_repeats == 7
    with pytest.raises(ValueError, match="mode"):
        Settings.for_mode("slow")
    with pytest.raises(ValueError, match="repeats"):
        Settings(repeats=2, min_repeats=3)


def test_peak_bandwidth_lookup():
    assert runner.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert runner.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert runner.peak_bandwidth("cpu") is None


def _suite_functions(cases):
    """Every JAX case and reference once, by name (the torch baselines are not traced)."""
    functions = {}
    for case in cases:
        for function in (case, *(ref for _, ref in case.references)):
            if function.framework == "jax":
                functions.setdefault(function.name, function)
    return functions.values()


def test_every_quick_case_traces_against_the_current_api():
    for case in _suite_functions(suite.build_cases("quick")):
        args = jax.eval_shape(lambda case=case: tuple(case.make_args()))
        jax.eval_shape(case.fn, *args)


def test_torch_comparison_is_skipped_with_a_note_without_torch(monkeypatch):
    monkeypatch.setattr(suite, "torch_available", lambda: False)
    assert not suite.torch_cases("quick")
    assert any("torch is not installed" in note for note in suite.notes())


def test_torch_cases_pair_each_library_path_with_torch_without_importing_torch(monkeypatch):
    monkeypatch.setattr(suite, "torch_available", lambda: True)
    imported = "torch" in sys.modules
    cases = {case.name: case for case in suite.torch_cases("quick")}
    assert ("torch" in sys.modules) == imported  # building the cases never imports torch
    labels = {name: [label for label, _ in case.references] for name, case in cases.items()}
    assert labels["torch/alibi/fwd/D64/1024"] == ["flex", "sdpa+bias", "no bias"]
    assert labels["torch/t5/fwd/D128/1024"] == ["flex", "sdpa+bias", "no bias"]
    assert labels["torch/causal/fwd/D64/1024"] == ["sdpa"]
    assert labels["torch/rope/fwd/D64/1024"] == ["hf", "hf compiled"]
    # FlexAttention has no backward on the CPU; SDPA's bias is 2 GiB from L = 8k.
    full = {
        case.name: [label for label, _ in case.references] for case in suite.torch_cases("full")
    }
    assert full["torch/t5/fwd+bwd/D64/2048"] == ["sdpa+bias", "no bias"]
    assert full["torch/alibi/fwd/D128/8192"] == ["flex", "no bias"]
    for case in cases.values():
        assert case.framework == "jax" and case.group == "torch"
        for label, ref in case.references:
            # torch's forms are rows of their own; the library's no-bias run is only a ratio
            assert (ref.framework == "torch") == ref.listed == (label != "no bias")


def test_non_jax_case_is_called_as_is_and_its_first_call_is_the_compile_time():
    calls = []

    def numpy_double(x):
        calls.append(1)
        return 2.0 * x

    case = Case(
        name="numpy-double",
        group="toy",
        fn=numpy_double,
        make_args=lambda: (np.ones(SHAPE, np.float32),),
        framework="torch",
    )
    record = runner.measure(case, FAST)
    assert record["compile_s"] > 0 and record["memory"] is None
    assert record["time"]["repeats"] == 3 and len(calls) > 3


def test_gpu_cases_add_cudnn_references(monkeypatch):
    monkeypatch.setattr(suite, "_on_gpu", lambda: True)
    cases = suite.build_cases("quick")
    attention = [case for case in cases if case.group == "attention"]
    assert attention and all(
        [label for label, _ in case.references] == ["xla", "cudnn"] for case in attention
    )
    alibi = [case for case in cases if case.name.startswith("bias/alibi/")]
    assert alibi and all("cudnn" in dict(case.references) for case in alibi)
    assert suite.attention_dtype() == jnp.bfloat16
    # Only the torch group is left out on a GPU, and the notes say so.
    assert suite.notes() == ["The torch comparison runs on the CPU backend only; it was not run."]
    assert not suite.torch_cases("quick")


# ------------------------------------------------------------------ tutorial baselines


def _rope_reference(x, positions, pairs, base=10000.0):
    """float64 RoPE (Su et al. 2021, eq. 34): rotate feature pairs by angle p * base^(-2i/D)."""
    x = np.asarray(x, np.float64)
    dim = x.shape[-1]
    theta = base ** (-np.arange(dim // 2) * 2.0 / dim)
    angles = np.asarray(positions, np.float64)[:, :, None, None] * theta
    first, second = pairs(dim)
    a, b = x[..., first], x[..., second]
    out = np.empty_like(x)
    out[..., first] = a * np.cos(angles) - b * np.sin(angles)
    out[..., second] = a * np.sin(angles) + b * np.cos(angles)
    return out


def _half_pairs(dim):
    return np.arange(dim // 2), np.arange(dim // 2) + dim // 2


def _interleaved_pairs(dim):
    return np.arange(0, dim, 2), np.arange(1, dim, 2)


@pytest.mark.parametrize(
    ("form", "pairs"),
    [(tutorial.rope_rotate_half, _half_pairs), (tutorial.rope_complex, _interleaved_pairs)],
)
def test_tutorial_rope_forms_match_the_paper(form, pairs):
    x = jax.random.normal(jax.random.key(0), (2, 50, 3, 16))
    positions = jnp.stack([jnp.arange(50), jnp.arange(50) + 7])
    got = jax.jit(form)(x, positions)
    np.testing.assert_allclose(got, _rope_reference(x, positions, pairs), atol=2e-4)


def test_tutorial_partial_rope_rotates_only_the_first_features():
    x = jax.random.normal(jax.random.key(1), (1, 30, 2, 16))
    positions = jnp.arange(30)[None]
    got = jax.jit(tutorial.rope_partial, static_argnums=2)(x, positions, 8)
    np.testing.assert_allclose(
        got[..., :8], _rope_reference(x[..., :8], positions, _half_pairs), atol=2e-4
    )
    np.testing.assert_array_equal(got[..., 8:], x[..., 8:])


def test_tutorial_sinusoidal_table_matches_reference():
    positions = np.arange(512)
    got = jax.jit(tutorial.sinusoidal_table, static_argnums=1)(jnp.asarray(positions), 64)
    np.testing.assert_allclose(got, sinusoidal_reference(positions, 64), atol=1e-4)


def test_tutorial_alibi_attention_matches_float64_attention():
    length, heads, dim = 20, 4, 8
    q, k, v = (
        np.asarray(jax.random.normal(jax.random.key(i), (1, length, heads, dim))) for i in range(3)
    )
    slopes = 2.0 ** (-8.0 * np.arange(1, heads + 1) / heads)  # Press et al. 2022, H = 4
    distance = np.arange(length)[None, :] - np.arange(length)[:, None]
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dim)
    logits = logits - slopes[:, None, None] * np.abs(distance)
    logits = np.where(distance > 0, -np.inf, logits)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bhqk,bkhd->bqhd", weights, v.astype(np.float64))
    got = jax.jit(tutorial.alibi_attention)(q, k, v)
    np.testing.assert_allclose(got, expected, atol=1e-5)


# ------------------------------------------------------------------ block-size sweep


def test_block_size_sweep_times_every_candidate_against_the_tables_choice(tmp_path, capsys):
    from benchmarks import block_sizes

    argv = ["--out", str(tmp_path), "--lengths", "64", "--head-dims", "8", "--repeats", "3"]
    assert block_sizes.main([*argv, "--sizes", "16x16", "32x16", "128x128"]) == 0
    record = json.loads((tmp_path / "block_sizes.json").read_text())
    rows = record["rows"]
    chosen = tuple(pe_attention.default_block_size(64, 64, 8))
    # 128x128 exceeds the length and is dropped; the table's choice always runs.
    sizes = {(16, 16), (32, 16), chosen}
    assert {(tuple(r["block_size"]), r["mode"]) for r in rows} == {
        (size, mode) for size in sizes for mode in ("fwd", "fwd+bwd")
    }
    for row in rows:
        same_case = [r for r in rows if r["mode"] == row["mode"]]
        reference = next(r for r in same_case if r["chosen"])
        assert row["ratio"] == pytest.approx(row["seconds"] / reference["seconds"])
        assert row["seconds"] > 0 and row["chosen"] == (tuple(row["block_size"]) == chosen)
    markdown = (tmp_path / "block_sizes.md").read_text()
    assert "| 64, fwd |" in markdown and "| 64, fwd+bwd |" in markdown
    assert markdown in capsys.readouterr().out
    assert block_sizes.parse_args(["--sizes", "512x256", "64"]).sizes == [(512, 256), (64, 64)]
