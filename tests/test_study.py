"""Tests for the length-extrapolation study, its command line and the plot gallery."""

import json
import math

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
