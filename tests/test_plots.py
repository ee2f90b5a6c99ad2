"""Tests for the study figures and the gallery (`jax-posenc plot`)."""

import json

import numpy as np
import pytest

from jax_posenc import cli, plots, registry, rope_scaling, study

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = [
    "--steps", "2", "--train-len", "8", "--eval-lens", "8,16", "--d-model", "16",
    "--layers", "1", "--heads", "2", "--batch-size", "4", "--train-bytes", "20000",
    "--heldout-bytes", "5000", "--eval-tokens", "64", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    assert cli.main(["study", "--encodings", "learned,t5,shaw", "--out", str(out), *TINY]) == 0
    return out


def test_gallery_draws_every_registered_encoding_with_the_studys_parameters(
    tmp_path, trained_study, monkeypatch
):
    def no_picture(encoding, *args):
        raise AssertionError(f"the gallery has no picture for {encoding!r}")

    monkeypatch.setattr(plots, "_plot_unknown", no_picture)
    paths = plots.gallery(tmp_path, study_dir=trained_study)
    names = {path.name for path in paths}
    assert names == {f"{name}.png" for name in registry.available_encodings()} | {
        "rope_scalings.png"
    }
    for path in paths:
        assert path.read_bytes().startswith(PNG_MAGIC)


def test_trained_parameters_are_the_studys_positional_variables(trained_study):
    trained = plots.trained_parameters(trained_study)
    assert set(trained) == {"learned", "t5", "shaw"}
    assert set(trained["t5"]["variables"]) == {"logit_bias"}
    assert set(trained["shaw"]["variables"]) == {"relative_terms"}
    table = trained["learned"]["variables"]["input_embedding"]["embedding"]
    assert np.shape(table) == (16, 16)  # max(eval_lens) rows, d_model features
    assert "after 2 steps at 8 tokens" in trained["t5"]["caption"]
    sizes = plots.study_sizes(json.loads((trained_study / "config.json").read_text()))
    assert sizes == plots.GallerySizes(heads=2, head_dim=8, train_len=8, length=16)
    # The trained bias differs from the bias at initialization.
    variables = {"params": trained["t5"]["variables"]["logit_bias"]}
    after = plots.bias_matrix("t5", length=16, num_heads=2, head_dim=8, params=variables)
    before = plots.bias_matrix("t5", length=16, num_heads=2, head_dim=8)
    assert not np.allclose(after, before)


@pytest.mark.parametrize("kind", ["missing", "empty", "not a study", "no trained model"])
def test_plot_refuses_a_folder_that_holds_no_trained_study(tmp_path, capsys, kind):
    study_dir = tmp_path / "study"
    if kind != "missing":
        study_dir.mkdir()
    if kind == "not a study":
        (study_dir / "notes.txt").write_text("hello")
    if kind == "no trained model":
        config = {"heads": 2, "d_model": 16, "eval_lens": [8], "train_len": 8}
        (study_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "plots"
    assert cli.main(["plot", "--study", str(study_dir), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"--study {str(study_dir)!r}" in error
    if kind == "no trained model":
        assert "holds no trained model" in error
    assert not out.exists()


def test_plot_names_a_corrupted_study_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"heads": 2, "d_model')
    assert cli.main(["plot", "--study", str(tmp_path), "--out", str(tmp_path / "plots")]) == 2
    assert f"cannot read {str(tmp_path / 'config.json')!r}" in capsys.readouterr().err


def test_alibi_bias_is_minus_slope_times_distance_and_drawn_as_curves():
    bias = plots.bias_matrix("alibi", length=16, num_heads=8)
    slopes = 2.0 ** -np.arange(1, 9)  # Press et al.: 2^(-8h/H) for h = 1..H
    distance = np.arange(16)[:, None] - np.arange(16)[None, :]
    causal = distance >= 0
    want = -slopes[:, None, None] * distance
    np.testing.assert_allclose(bias[:, causal], want[:, causal], rtol=1e-6)
    curves = plots.bias_by_distance(bias)
    np.testing.assert_allclose(curves, -slopes[:, None] * np.arange(16), rtol=1e-6)


def test_a_bias_that_depends_on_the_query_position_is_drawn_as_a_heat_map():
    queries = np.arange(8)[:, None] * np.ones(8)
    distance = np.arange(8)[:, None] - np.arange(8)[None, :]
    assert plots.bias_by_distance((distance / (queries + 1))[None]) is None
    assert plots.bias_by_distance((-0.5 * distance)[None]) is not None


def test_xpos_decay_is_zeta_to_the_distance_over_the_scale_base():
    head_dim, distances = 16, 300
    zeta = (np.arange(0, head_dim, 2) / head_dim + 0.4) / 1.4  # Sun et al., 2022, eq. 9
    want = zeta[:, None] ** (np.arange(distances)[None] / 512.0)
    np.testing.assert_allclose(plots.xpos_decay(head_dim, distances), want, rtol=2e-5)


def test_rope_wavelengths_per_band_and_what_a_scaling_does_to_them():
    head_dim = 16
    plain, factor = plots.rope_wavelengths(head_dim)
    np.testing.assert_allclose(plain, 2 * np.pi * 10000.0 ** (np.arange(0, 16, 2) / 16))
    assert factor == 1.0
    linear, _ = plots.rope_wavelengths(head_dim, rope_scaling.LinearScaling(4.0))
    np.testing.assert_allclose(linear, 4 * plain)
    yarn, attention = plots.rope_wavelengths(head_dim, rope_scaling.YarnScaling(4.0, 2048))
    assert yarn[0] == pytest.approx(plain[0]) and yarn[-1] == pytest.approx(4 * plain[-1])
    assert attention > 1.0


def test_each_family_has_one_colour_and_each_member_its_own_line():
    names = list(registry.available_encodings())
    styles = plots.encoding_styles(names)
    expected = {
        "none": "none", "sinusoidal": "absolute", "learned": "absolute", "rope": "rotary",
        "xpos": "rotary", "alibi": "bias", "t5": "bias", "kerple": "bias", "fire": "bias",
        "dpb": "bias", "shaw": "relative", "transformer_xl": "relative", "fox": "content",
        "selfextend": "rotary",
    }  # fmt: skip
    for name, kind in expected.items():
        assert plots.family(name) == kind
        assert styles[name]["color"] == plots.FAMILY_COLOURS[kind]
    assert plots.family("sinusoidal+alibi") == "combined"
    for kind in set(expected.values()):
        members = [n for n in names if plots.family(n) == kind]
        looks = {(str(styles[n]["linestyle"]), styles[n]["marker"]) for n in members}
        assert len(looks) == len(members)


def test_tick_labels_are_plain_numbers():
    assert [plots._plain(v) for v in (20000, 1000000, 0.25, 7.0, 1.5)] == [
        "20,000",
        "1,000,000",
        "0.25",
        "7",
        "1.5",
    ]
    assert plots._nice_ticks(6.3, 25) == [7.0, 8.0, 10.0, 15.0, 20.0]
    assert len(plots._nice_ticks(267, 396)) == 3


def _stats(*values):
    return study.spread(list(values))


@pytest.mark.parametrize("task", ["lm", "recall"])
def test_study_figure_with_seed_bands(tmp_path, task):
    config = {
        "task": task, "eval_lens": [8, 16, 32, 64], "train_len": 8, "eval_stride": 4,
        "seeds": 3, "steps": 10, "d_model": 16, "layers": 1, "heads": 2,
    }  # fmt: skip
    entries = {}
    for index, name in enumerate(["alibi", "rope", "none", "learned"]):
        if task == "lm":
            curve = {
                str(n): _stats(5 + index + n / 64, 5.2 + index, 5.4 + index)
                for n in [8, 16, 32, 64]
            }
            entries[name] = {"ppl": {mode: curve for mode in study.MODES}}
        else:
            by_length = {str(n): _stats(0.9, 1.0 - index / 10, 0.95) for n in [8, 16, 32, 64]}
            by_distance = {str(d): _stats(0.5, 0.6, 0.7) for d in [3, 8, 16, 61]}
            entries[name] = {"accuracy": {"by_length": by_length, "by_distance": by_distance}}
    path = plots.plot_study({"config": config, "encodings": entries}, tmp_path / "figure.png")
    assert path.read_bytes().startswith(PNG_MAGIC)
