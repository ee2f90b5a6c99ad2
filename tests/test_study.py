"""Tests for the length-extrapolation study, its command line and the plot gallery."""

import json
import math
import shutil

import numpy as np
import pytest

from jax_posenc import cli, plots, study

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = [
    "--steps", "4", "--train-len", "8", "--eval-lens", "8,16", "--d-model", "16",
    "--layers", "1", "--heads", "2", "--batch-size", "4", "--train-bytes", "20000",
    "--heldout-bytes", "5000", "--eval-tokens", "64", "--no-progress",
]  # fmt: skip


def run_cli(*args: str) -> int:
    return cli.main(["study", *args])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    assert run_cli("--encodings", "none,t5", "--out", str(out), *TINY) == 0
    return out


def test_study_writes_results_table_and_plot(finished, capsys):
    results = json.loads((finished / "results.json").read_text())
    assert list(results["encodings"]) == ["none", "t5"]
    assert results["config"]["eval_lens"] == [8, 16]
    for entry in results["encodings"].values():
        assert set(entry["loss"]) == {"8", "16"}
        for length, loss in entry["loss"].items():
            assert 0 < loss < math.log(256) + 1
            np.testing.assert_allclose(entry["ppl"][length], math.exp(loss), rtol=1e-12)
    table = (finished / "results.md").read_text()
    assert table.startswith("| encoding | ppl@8 (1x) | ppl@16 (2x) | ppl@16 / ppl@8 |")
    assert (finished / "ppl_vs_length.png").read_bytes().startswith(PNG_MAGIC)
    assert (finished / "t5" / "metrics.jsonl").exists()


def test_study_refuses_to_overwrite_and_resumes_with_the_same_settings(finished, capsys):
    before = (finished / "results.json").read_text()
    assert run_cli("--encodings", "none,t5", "--out", str(finished), *TINY) == 2
    assert "already holds a study; pass --resume" in capsys.readouterr().err
    changed = [arg if arg != "4" else "5" for arg in TINY]
    assert run_cli("--encodings", "none", "--out", str(finished), "--resume", *changed) == 2
    assert "with different settings (steps: 4 -> 5" in capsys.readouterr().err
    # Resuming a finished study reads every encoding back.
    assert run_cli("--encodings", "none,t5", "--out", str(finished), "--resume", *TINY) == 0
    printed = capsys.readouterr().out
    assert "none: done earlier, read back" in printed and "ppl@16 / ppl@8" in printed
    for name in ("none", "t5"):
        assert (
            json.loads(before)["encodings"][name]
            == json.loads((finished / "results.json").read_text())["encodings"][name]
        )


def test_interrupted_study_resumes_where_it_stopped(tmp_path, monkeypatch, finished):
    # `finished` trained the same models already: their compiled steps are reused.
    trained = []
    real = study.run_encoding

    def interrupted(encoding, *args, **kwargs):
        if encoding == "t5" and "stop" not in trained:
            trained.append("stop")
            raise KeyboardInterrupt
        trained.append(encoding)
        return real(encoding, *args, **kwargs)

    monkeypatch.setattr(study, "run_encoding", interrupted)
    args = ("--encodings", "none,t5", "--out", str(tmp_path), *TINY)
    with pytest.raises(KeyboardInterrupt):
        run_cli(*args)
    assert run_cli(*args, "--resume") == 0
    assert trained == ["none", "stop", "t5"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["encodings"]) == ["none", "t5"]


def test_too_little_heldout_text_is_refused_before_training(tmp_path, capsys):
    args = [arg if arg != "64" else "8192" for arg in TINY]
    assert run_cli("--encodings", "none", "--out", str(tmp_path), *args) == 2
    assert "held-out text has 5000 bytes but eval_tokens=8192" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "0"], "steps must be a positive integer, got 0"),
        (["--d-model", "15"], "d_model=15 must be divisible by heads=2"),
        (["--lr", "-1"], "learning_rate must be a finite number > 0"),
        (["--batch-size", "0"], "batch_size must be a positive integer"),
        (["--seed", "-1"], "seed must be an integer >= 0"),
        (["--layers", "0"], "layers must be a positive integer"),
        (["--encodings", "none,rotary-ish"], "unknown encoding 'rotary-ish'"),
        (["--eval-lens", "8,0"], "eval_lens must be a positive integer"),
        (["--eval-tokens", "100"], "eval_tokens=100 must be a multiple"),
        (["--corpus", "/no/such/corpus"], "corpus path '/no/such/corpus'"),
        (["--heldout-bytes", "10"], "raise --heldout-bytes"),
        (["--train-bytes", "5"], "raise --train-bytes"),
        (["--d-model", "6", "--encodings", "rope"], "encoding 'rope' with these settings"),
    ],
)
def test_an_invalid_setting_leaves_no_folder_behind(tmp_path, capsys, flags, message):
    out = tmp_path / "study"
    # The last occurrence of a flag wins, so `flags` replace TINY's values.
    assert run_cli("--encodings", "none", "--out", str(out), *TINY, *flags) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("flags", [["--stpes", "4"], ["--steps", "four"], ["--dtype", "f16"]])
def test_a_flag_argparse_rejects_leaves_no_folder_behind(tmp_path, capsys, flags):
    out = tmp_path / "study"
    with pytest.raises(SystemExit) as exit_info:
        run_cli("--encodings", "none", "--out", str(out), *TINY, *flags)
    assert exit_info.value.code == 2
    assert flags[0] in capsys.readouterr().err
    assert not out.exists()


def test_overwrite_replaces_a_study_folder(tmp_path, capsys, finished):
    out = tmp_path / "study"
    shutil.copytree(finished, out)
    (out / "notes.txt").write_text("mine")
    changed = [*TINY, "--steps", "3"]
    assert run_cli("--encodings", "none", "--out", str(out), *changed) == 2
    assert "--overwrite (overwrite=True) to replace it" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli("--encodings", "none", "--out", str(out), "--resume", "--overwrite", *changed)
    assert "not allowed with argument" in capsys.readouterr().err
    assert run_cli("--encodings", "none", "--out", str(out), "--overwrite", *changed) == 0
    assert json.loads((out / "config.json").read_text())["steps"] == 3
    assert list(json.loads((out / "results.json").read_text())["encodings"]) == ["none"]
    assert not (out / "t5").exists()
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["config.json", "none/result.json"])
def test_a_corrupted_study_file_is_named_in_the_error(tmp_path, capsys, finished, name):
    out = tmp_path / "study"
    shutil.copytree(finished, out)
    path = out / name
    path.write_text(path.read_text()[:40])
    assert run_cli("--encodings", "none,t5", "--out", str(out), "--resume", *TINY) == 2
    assert f"cannot read {str(path)!r}: invalid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["missing", "empty", "not a study", "no bias model"])
def test_plot_refuses_a_folder_that_holds_no_trained_study(tmp_path, capsys, kind):
    study_dir = tmp_path / "study"
    if kind != "missing":
        study_dir.mkdir()
    if kind == "not a study":
        (study_dir / "notes.txt").write_text("hello")
    if kind == "no bias model":
        config = {"heads": 2, "d_model": 16, "eval_lens": [8], "train_len": 8}
        (study_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "plots"
    assert cli.main(["plot", "--study", str(study_dir), "--out", str(out)]) == 2
    assert f"--study {str(study_dir)!r}" in capsys.readouterr().err
    assert not out.exists()


def test_plot_names_a_corrupted_study_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"heads": 2, "d_model')
    assert cli.main(["plot", "--study", str(tmp_path), "--out", str(tmp_path / "plots")]) == 2
    assert f"cannot read {str(tmp_path / 'config.json')!r}" in capsys.readouterr().err


def test_default_evaluation_lengths_are_one_to_eight_times_the_training_length():
    config = study.StudyConfig(encodings=("none",), train_len=48)
    assert config.eval_lens == (48, 96, 192, 384)
    assert config.eval_tokens % 384 == 0 and config.eval_tokens >= 16_384
    assert config.model_config("learned").max_positions == 384
    assert study.StudyConfig().encodings == study.registry.available_encodings()


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"encodings": ("none", "none")}, "lists a name twice"),
        ({"encodings": ("rotary-ish",)}, "unknown encoding 'rotary-ish'"),
        ({"eval_lens": (64, 100), "eval_tokens": 1000}, "multiple of every evaluation length"),
        ({"train_len": 0}, "train_len must be a positive integer"),
    ],
)
def test_study_config_rejects_bad_settings(settings, match):
    with pytest.raises(ValueError, match=match):
        study.StudyConfig(**settings)


def test_table_lists_perplexities_and_the_ratio():
    results = {
        "config": {"eval_lens": [4, 8], "train_len": 4},
        "encodings": {
            "a": {"ppl": {"4": 2.0, "8": 3.0}},
            "b": {"error": "loss became nan at step 3"},
        },
    }
    lines = study.format_table(results).splitlines()
    assert lines[1].split() == ["a", "2.000", "3.000", "1.50"]
    assert lines[2].split() == ["b", "failed", "failed", "failed"]


def test_rope_similarity_is_the_mean_cosine_of_the_pair_angles():
    head_dim, distances = 64, 3000
    theta = 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)
    want = np.cos(np.arange(distances)[:, None] * theta).mean(axis=1)
    got = plots.rope_similarity(distances, head_dim, None)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_alibi_bias_matrix_is_minus_slope_times_distance():
    bias = plots.bias_matrix("alibi", length=16, num_heads=8)
    slopes = 2.0 ** -np.arange(1, 9)  # Press et al.: 2^(-8h/H) for h = 1..H
    distance = np.arange(16)[:, None] - np.arange(16)[None, :]
    causal = distance >= 0
    want = -slopes[:, None, None] * distance
    np.testing.assert_allclose(bias[:, causal], want[:, causal], rtol=1e-6)


def test_gallery_writes_every_figure(tmp_path, finished):
    paths = plots.gallery(tmp_path, study_dir=finished)
    names = {path.name for path in paths}
    bias_encodings = [
        name
        for name in study.registry.available_encodings()
        if study.registry.get_encoding(name).logit_bias is not None
    ]
    assert {"sinusoidal.png", "rope_similarity.png"} <= names
    assert {f"{name}_bias.png" for name in bias_encodings} <= names
    for path in paths:
        assert path.read_bytes().startswith(PNG_MAGIC)
