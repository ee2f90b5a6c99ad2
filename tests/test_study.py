"""Tests for the length-extrapolation study (language model and recall) and its command line."""

import dataclasses
import json
import math
import platform
import shutil

import flax
import jax
import numpy as np
import pytest

from jax_posenc import cli, data, study, train
from jax_posenc.model import Transformer
from jax_posenc.rope_scaling import LinearScaling

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = [
    "--steps", "4", "--train-len", "8", "--eval-lens", "8,16", "--d-model", "16",
    "--layers", "1", "--heads", "2", "--batch-size", "4", "--train-bytes", "20000",
    "--heldout-bytes", "5000", "--eval-tokens", "64", "--no-progress",
]  # fmt: skip
TINY_RECALL = [
    "--task", "recall", "--steps", "3", "--train-len", "16", "--eval-lens", "16,32",
    "--d-model", "16", "--layers", "1", "--heads", "2", "--batch-size", "4",
    "--recall-probes", "2", "--recall-distractors", "2", "--recall-sequences", "2",
    "--no-progress",
]  # fmt: skip


def run_cli(*args: str) -> int:
    return cli.main(["study", *args])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    assert run_cli("--encodings", "none,t5", "--seeds", "2", "--out", str(out), *TINY) == 0
    return out


def test_results_json_holds_both_modes_seeds_and_versions(finished):
    results = json.loads((finished / "results.json").read_text())
    assert results["task"] == "lm" and results["complete"] is True
    assert results["config"]["seeds"] == 2 and results["config"]["eval_lens"] == [8, 16]
    environment = results["environment"]
    assert environment["python"] == platform.python_version()
    assert environment["jax"] == jax.__version__ and environment["flax"] == flax.__version__
    assert environment["jax_posenc"] == study.jax_posenc.__version__
    assert environment["device"].startswith(jax.devices()[0].platform)
    corpus = results["corpus"]
    assert len(corpus["sha256"]) == 64 and "another Python version" in corpus["note"]
    assert list(results["encodings"]) == ["none", "t5"]
    for entry in results["encodings"].values():
        assert entry["seeds"] == [0, 1] and [run["seed"] for run in entry["runs"]] == [0, 1]
        for mode in study.MODES:
            for length in ("8", "16"):
                values = [run["ppl"][mode][length] for run in entry["runs"]]
                for run in entry["runs"]:
                    loss = run["loss"][mode][length]
                    assert 0 < loss < math.log(256) + 1
                    np.testing.assert_allclose(run["ppl"][mode][length], math.exp(loss))
                stats = entry["ppl"][mode][length]
                assert stats["n"] == 2 and stats["min"] == min(values)
                np.testing.assert_allclose(stats["mean"], np.mean(values))
                np.testing.assert_allclose(stats["std"], np.std(values, ddof=1))
        # Two seeds are two different models.
        first, second = (run["ppl"]["sliding"]["16"] for run in entry["runs"])
        assert first != second
    assert [item["title"].split(",")[0] for item in results["summary"]] == [
        "non-overlapping windows",
        "sliding windows",
    ]
    table = (finished / "results.md").read_text()
    assert "non-overlapping windows (mean ± std over 2 seeds)" in table
    assert "sliding windows, stride 4 (mean ± std over 2 seeds)" in table
    assert (finished / "ppl_vs_length.png").read_bytes().startswith(PNG_MAGIC)
    assert (finished / "t5" / "seed1" / "metrics.jsonl").exists()


def test_sliding_evaluation_scores_the_last_stride_tokens_of_each_window(finished):
    config = study.StudyConfig(encodings=("none",), train_len=8, d_model=16, layers=1, heads=2)
    model = Transformer(config.model_config("none"))
    tokens = data.load_corpus(train_bytes=20000, heldout_bytes=5000).heldout
    windows, weights = data.sliding_windows(tokens, seq_len=16, stride=4, num_tokens=64, start=16)
    params = model.init(jax.random.key(0), windows[:1, :-1])
    got = train.evaluate(
        model, params, windows, batch_size=5, mesh=train.data_mesh(), token_weights=weights
    )
    losses = np.asarray(train.next_token_losses(model, params, windows))
    np.testing.assert_allclose(got, losses[:, -4:].mean(), rtol=1e-5)


def test_study_refuses_to_overwrite_and_resumes_with_the_same_settings(finished, capsys):
    before = json.loads((finished / "results.json").read_text())
    args = ("--encodings", "none,t5", "--seeds", "2", "--out", str(finished))
    assert run_cli(*args, *TINY) == 2
    assert "already holds a study; pass --resume" in capsys.readouterr().err
    changed = [arg if arg != "4" else "5" for arg in TINY]
    assert run_cli(*args, "--resume", *changed) == 2
    assert "with different settings (steps: 4 -> 5" in capsys.readouterr().err
    # Resuming a finished study reads every model back and prints the tables and summary.
    assert run_cli(*args, "--resume", *TINY) == 0
    printed = capsys.readouterr().out
    assert "4 of 4 models done earlier, read back" in printed
    assert "non-overlapping windows, ppl at 16: best" in printed
    assert "sliding windows, ppl at 16: best" in printed and ", worst " in printed
    after = json.loads((finished / "results.json").read_text())
    assert after["encodings"] == before["encodings"]


def test_more_seeds_can_be_added_to_a_finished_study(tmp_path, finished, capsys):
    out = tmp_path / "study"
    shutil.copytree(finished, out)
    assert run_cli("--encodings", "none", "--seeds", "3", "--out", str(out), "--resume", *TINY) == 0
    printed = capsys.readouterr().out
    assert "2 of 3 models done earlier" in printed and "[3/3] none seed 2: done" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["encodings"]["none"]["seeds"] == [0, 1, 2]
    assert results["config"]["seeds"] == 3


def test_a_killed_study_keeps_every_model_it_finished(tmp_path, monkeypatch, finished):
    # `finished` trained the same models already: their compiled steps are reused.
    trained = []
    real = study.run_lm

    def killed(encoding, seed, *args, **kwargs):
        if (encoding, seed) == ("t5", 0) and "stop" not in trained:
            trained.append("stop")
            raise KeyboardInterrupt
        trained.append((encoding, seed))
        return real(encoding, seed, *args, **kwargs)

    monkeypatch.setattr(study, "run_lm", killed)
    args = ("--encodings", "none,t5", "--seeds", "2", "--out", str(tmp_path), *TINY)
    with pytest.raises(KeyboardInterrupt):
        run_cli(*args)
    partial = json.loads((tmp_path / "results.json").read_text())
    assert partial["complete"] is False and list(partial["encodings"]) == ["none"]
    assert partial["encodings"]["none"]["seeds"] == [0, 1]
    assert "none" in (tmp_path / "results.md").read_text()
    assert run_cli(*args, "--resume") == 0
    assert trained == [("none", 0), ("none", 1), "stop", ("t5", 0), ("t5", 1)]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["complete"] is True and list(results["encodings"]) == ["none", "t5"]


def test_progress_reports_an_overall_eta_through_training_and_evaluation(tmp_path, finished):
    config = study.StudyConfig(
        encodings=("none",), steps=4, train_len=8, eval_lens=(8, 16), d_model=16, layers=1,
        heads=2, batch_size=4, train_bytes=20000, heldout_bytes=5000, eval_tokens=64,
    )  # fmt: skip
    lines = []
    study.run_study(config, tmp_path, log=lines.append, progress_every=0)
    text = "\n".join(lines)
    assert "[1/1] none seed 0: training 4 steps" in text
    assert "none seed 0: evaluating sliding windows of 16; study" in text
    assert "[1/1] none seed 0: done in" in text and "study 100% done" in text
    assert "left" in text and "elapsed" in text


def test_recall_study_reports_accuracy_by_length_and_distance(tmp_path, capsys):
    out = tmp_path / "recall"
    assert run_cli("--encodings", "alibi", "--out", str(out), *TINY_RECALL) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "recall" and results["corpus"] is None
    distances = ["4", "8", "16", "24", "29"]  # train_len / 4 .. 32 + 1 - 2 * probes
    run = results["encodings"]["alibi"]["runs"][0]
    assert set(run["accuracy"]["by_length"]) == {"16", "32"}
    assert list(run["accuracy"]["by_distance"]) == distances
    for value in [*run["accuracy"]["by_length"].values(), *run["accuracy"]["by_distance"].values()]:
        assert 0.0 <= value <= 1.0
    assert (out / "recall_accuracy.png").read_bytes().startswith(PNG_MAGIC)
    assert (out / "alibi" / "seed0" / "checkpoints").is_dir()
    printed = capsys.readouterr().out
    assert "Recall accuracy by store-to-query distance at 32 tokens" in printed
    assert "accuracy at 32 tokens: best alibi" in printed


def test_recall_training_finds_the_stored_pair():
    config = study.StudyConfig(
        encodings=("rope",), task="recall", steps=200, train_len=16, eval_lens=(16,),
        d_model=32, layers=1, heads=2, batch_size=16, learning_rate=1e-2, recall_probes=2,
        recall_distractors=4,
    )  # fmt: skip
    model = Transformer(config.model_config("rope"))
    train_config = config.train_config(0)
    mesh = train.data_mesh(jax.devices()[:1])
    state = train.init_state(model, train_config, mesh)
    step = study._recall_step(model, train_config)
    for index in range(config.steps):
        batch = config.recall_batch(batch_size=16, seq_len=16, seed=0, step=index)
        state, _ = step(state, batch.tokens, batch.query_positions)
    heldout = config.recall_batch(batch_size=64, seq_len=16, seed=0, step=0, split="eval")
    assert study.recall_accuracy(model, state.params, heldout) > 0.8  # chance: 1/15


def test_preset_gpu_sets_sizes_and_explicit_options_win():
    parser = cli.build_parser("study")
    config = study.config_from_args(
        parser.parse_args(["study", "--preset", "gpu", "--steps", "7", "--encodings", "rope"])
    )
    assert config.steps == 7 and config.train_len == 256 and config.d_model == 256
    assert config.eval_lens == (256, 512, 1024, 2048) and config.eval_stride == 128
    default = study.config_from_args(parser.parse_args(["study"]))
    assert default == study.StudyConfig()


def test_too_little_heldout_text_is_refused_before_training(tmp_path, capsys):
    args = [arg if arg != "64" else "8192" for arg in TINY]
    assert run_cli("--encodings", "none", "--out", str(tmp_path), *args) == 2
    assert "held-out text has 5000 bytes but 8208 are needed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "0"], "steps must be a positive integer, got 0"),
        (["--seeds", "0"], "seeds must be a positive integer, got 0"),
        (["--d-model", "15"], "d_model=15 must be divisible by heads=2"),
        (["--lr", "-1"], "learning_rate must be a finite number > 0"),
        (["--batch-size", "0"], "batch_size must be a positive integer"),
        (["--seed", "-1"], "seed must be an integer >= 0"),
        (["--layers", "0"], "layers must be a positive integer"),
        (["--encodings", "none,rotary-ish"], "unknown encoding 'rotary-ish'"),
        (["--eval-lens", "8,0"], "eval_lens must be a positive integer"),
        (["--eval-tokens", "100"], "eval_tokens=100 must be a multiple"),
        (["--eval-stride", "9"], "eval_stride=9 must be at most the shortest evaluation"),
        (["--corpus", "/no/such/corpus"], "corpus path '/no/such/corpus'"),
        (["--heldout-bytes", "10"], "raise --heldout-bytes"),
        (["--train-bytes", "5"], "raise --train-bytes"),
        (["--d-model", "6", "--encodings", "rope"], "encoding 'rope' with these settings"),
        (["--task", "recall", "--recall-probes", "4"], "leaves 1 tokens before the questions"),
    ],
)
def test_an_invalid_setting_leaves_no_folder_behind(tmp_path, capsys, flags, message):
    out = tmp_path / "study"
    # The last occurrence of a flag wins, so `flags` replace TINY's values.
    assert run_cli("--encodings", "none", "--out", str(out), *TINY, *flags) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "flags", [["--stpes", "4"], ["--steps", "four"], ["--dtype", "f16"], ["--task", "copy"]]
)
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


@pytest.mark.parametrize("name", ["config.json", "none/seed1/result.json"])
def test_a_corrupted_study_file_is_named_in_the_error(tmp_path, capsys, finished, name):
    out = tmp_path / "study"
    shutil.copytree(finished, out)
    path = out / name
    path.write_text(path.read_text()[:40])
    args = ("--encodings", "none,t5", "--seeds", "2", "--out", str(out), "--resume", *TINY)
    assert run_cli(*args) == 2
    assert f"cannot read {str(path)!r}: invalid JSON" in capsys.readouterr().err


def test_results_from_another_corpus_are_not_mixed_in(tmp_path, capsys, finished):
    out = tmp_path / "study"
    shutil.copytree(finished, out)
    path = out / "none" / "seed0" / "result.json"
    run = json.loads(path.read_text())
    path.write_text(json.dumps(run | {"corpus_sha256": "0" * 64}))
    args = ("--encodings", "none", "--seeds", "2", "--out", str(out), "--resume", *TINY)
    assert run_cli(*args) == 2
    assert "was computed on other text" in capsys.readouterr().err


def test_default_evaluation_lengths_are_one_to_eight_times_the_training_length():
    config = study.StudyConfig(encodings=("none",), train_len=48)
    assert config.eval_lens == (48, 96, 192, 384) and config.eval_stride == 24
    assert config.eval_tokens % 384 == 0 and config.eval_tokens >= 8192
    assert config.model_config("learned").max_positions == 384
    everything = study.registry.available_encodings()
    assert study.StudyConfig().encodings == tuple(n for n in everything if n != "selfextend")
    assert study.StudyConfig().seed_values == (0,)
    assert study.StudyConfig(seed=3, seeds=3).seed_values == (3, 4, 5)


def test_recall_distances_run_from_short_to_the_longest_length():
    config = study.StudyConfig(encodings=("none",), task="recall")
    assert config.recall_distances() == (16, 32, 64, 96, 128, 192, 256, 497)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"encodings": ("none", "none")}, "lists a name twice"),
        ({"encodings": ("rotary-ish",)}, "unknown encoding 'rotary-ish'"),
        ({"eval_lens": (64, 100), "eval_tokens": 1000}, "multiple of every evaluation length"),
        ({"train_len": 0}, "train_len must be a positive integer"),
        ({"task": "copy"}, "task must be one of 'lm', 'recall'"),
    ],
)
def test_study_config_rejects_bad_settings(settings, match):
    with pytest.raises(ValueError, match=match):
        study.StudyConfig(**settings)


def _stats(*values):
    return study.spread(list(values))


def test_tables_give_mean_and_spread_per_mode_and_the_ratio():
    config = {"task": "lm", "eval_lens": [4, 8], "train_len": 4, "eval_stride": 2, "seeds": 3}
    ratio = _stats(1.5, 1.5, 1.5)
    results = {
        "config": config,
        "encodings": {
            "a": {
                "ppl": {mode: {"4": _stats(2, 2, 2), "8": _stats(2, 3, 4)} for mode in study.MODES},
                "ratio": {mode: ratio for mode in study.MODES},
            },
            "b": {"error": "seed 0: loss became nan at step 3"},
        },
    }
    lines = study.format_tables(results).splitlines()
    assert lines[0] == "Perplexity per byte, non-overlapping windows (mean ± std over 3 seeds)"
    assert lines[2].split() == [
        "a",
        "2.000",
        "±",
        "0.000",
        "3.000",
        "±",
        "1.000",
        "1.50",
        "±",
        "0.00",
    ]
    assert lines[3].split() == ["b", "failed", "failed", "failed"]
    assert "sliding windows, stride 2" in lines[5]


def test_summary_names_best_worst_and_what_the_seed_spread_cannot_separate():
    config = {"task": "lm", "eval_lens": [4, 8], "train_len": 4, "eval_stride": 2, "seeds": 3}
    by_value = {
        "a": (5.0, 5.1, 5.2),
        "b": (5.15, 5.3, 5.4),
        "c": (6.0, 6.1, 6.2),
        "d": (6.0, 6.1, 6.2),
    }
    results = {
        "config": config,
        "encodings": {
            name: {"ppl": {mode: {"8": _stats(*v)} for mode in study.MODES}}
            for name, v in by_value.items()
        },
    }
    summary = study.summarize(results)
    assert [item["best"] for item in summary] == ["a", "a"]
    assert [item["worst"] for item in summary] == ["c = d", "c = d"]  # the same numbers
    assert summary[0]["within_spread_of_best"] == ["b"]
    line = study.summary_lines(results)[0]
    assert line.startswith("non-overlapping windows, ppl at 8: best a (5.100), worst c = d (6.100)")
    assert "within the seed spread of the best: b" in line


# ---------------------------------------------------------------- evaluation-only variants


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    out = tmp_path_factory.mktemp("extend")
    assert run_cli("--encodings", "rope", "--seeds", "2", "--out", str(out), *TINY) == 0
    return out


def _independent_loss(model, params, windows, positions=None) -> float:
    """Mean next-token NLL in float64 NumPy from the model's logits."""
    if positions is None:
        logits = model.apply(params, windows[:, :-1])
    else:
        logits = model.apply(params, windows[:, :-1], positions)
    logits = np.asarray(logits, np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    targets = windows[:, 1:]
    return float(-np.take_along_axis(log_p, targets[..., None], axis=-1).mean())


def _trained_rope(out, seed):
    config = study.StudyConfig(
        encodings=("rope",), steps=4, train_len=8, eval_lens=(8, 16), d_model=16, layers=1,
        heads=2, batch_size=4, train_bytes=20000, heldout_bytes=5000, eval_tokens=64,
    )  # fmt: skip
    corpus = data.load_corpus(train_bytes=20000, heldout_bytes=5000)
    model = Transformer(config.model_config("rope"))
    run_dir = out / "rope" / f"seed{seed}"
    # The run is finished: train() restores its last checkpoint and trains no step.
    state = train.train(
        model, config.train_config(seed), corpus.train, checkpoint_dir=run_dir, progress=False
    ).state
    return config, corpus, state.params


def test_rope_models_get_selfextend_and_linear_rows_in_both_modes(extended):
    results = json.loads((extended / "results.json").read_text())
    names = list(results["encodings"])
    assert names == [
        "rope",
        "rope → selfextend (eval only)",
        "rope → linear PI (eval only)",
    ]
    assert results["config"]["extend"] == ["selfextend", "linear"]
    for name in names[1:]:
        entry = results["encodings"][name]
        assert entry["trained"] == "rope" and entry["seeds"] == [0, 1]
        for mode in study.MODES:
            for length in ("8", "16"):
                values = [run["ppl"][mode][length] for run in entry["runs"]]
                stats = entry["ppl"][mode][length]
                assert stats["n"] == 2 and stats["min"] == min(values)
            assert entry["ratio"][mode]["n"] == 2
        # At the training length both are plain RoPE (group 1, factor 1).
        for mode in study.MODES:
            assert entry["ppl"][mode]["8"] == results["encodings"]["rope"]["ppl"][mode]["8"]
    # Hand-computed: train_len 8, window 4; at 16 tokens group 3 would reach
    # 15 // 3 + 4 - 1 = 8 > 7, group 4 reaches 15 // 4 + 4 - 1 = 6.
    settings = results["encodings"]["rope → selfextend (eval only)"]["settings"]
    assert settings == {
        "8": {"window": 4, "group_size": 1},
        "16": {"window": 4, "group_size": 4},
    }
    assert results["encodings"]["rope → linear PI (eval only)"]["settings"]["16"] == {"factor": 2.0}
    table = (extended / "results.md").read_text()
    assert "| rope → selfextend (eval only) |" in table and "group size 1 at 8, 4 at 16" in table
    runs = results["encodings"]["rope"]["runs"]
    assert all(set(run["variants"]) == {"selfextend", "linear"} for run in runs)


def test_selfextend_row_is_the_selfextend_encoding_on_the_trained_rope_params(extended):
    config, corpus, params = _trained_rope(extended, 1)
    model = Transformer(
        dataclasses.replace(
            config.model_config("rope"),
            encoding="selfextend",
            encoding_options={"selfextend": {"window": 4, "group_size": 4}},
        )
    )
    windows = data.eval_windows(corpus.heldout, seq_len=16, num_tokens=64, start=16)
    expected = _independent_loss(model, params, windows)
    run = json.loads((extended / "rope" / "seed1" / "result.json").read_text())
    got = run["variants"]["selfextend"]["loss"]["nonoverlapping"]["16"]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Grouping is active: it is not plain RoPE at 16 tokens.
    assert abs(run["loss"]["nonoverlapping"]["16"] - got) > 1e-4


def test_linear_row_is_rope_at_positions_divided_by_the_factor(extended):
    config, corpus, params = _trained_rope(extended, 0)
    base = config.model_config("rope")
    rope = Transformer(base)
    scaled = Transformer(
        dataclasses.replace(base, encoding_options={"rope": {"scaling": LinearScaling(2.0)}})
    )
    windows = data.eval_windows(corpus.heldout, seq_len=16, num_tokens=64, start=16)
    run = json.loads((extended / "rope" / "seed0" / "result.json").read_text())
    got = run["variants"]["linear"]["loss"]["nonoverlapping"]["16"]
    np.testing.assert_allclose(got, _independent_loss(scaled, params, windows), rtol=1e-5)
    # Closed form: with every frequency divided by 2, position 2p is RoPE's position p.
    tokens = windows[:2, :8]
    p = np.arange(8)[None]
    np.testing.assert_allclose(
        scaled.apply(params, tokens, 2 * p), rope.apply(params, tokens, p), atol=2e-5
    )


def test_resume_evaluates_variants_a_finished_run_lacks(tmp_path, extended, capsys):
    out = tmp_path / "study"
    shutil.copytree(extended, out)
    path = out / "rope" / "seed0" / "result.json"
    run = json.loads(path.read_text())
    del run["variants"]
    path.write_text(json.dumps(run))
    assert run_cli("--encodings", "rope", "--seeds", "2", "--out", str(out), "--resume", *TINY) == 0
    assert "1 of 2 models done earlier" in capsys.readouterr().out
    again = json.loads(path.read_text())
    before = json.loads((extended / "rope" / "seed0" / "result.json").read_text())
    np.testing.assert_allclose(
        again["variants"]["selfextend"]["loss"]["sliding"]["16"],
        before["variants"]["selfextend"]["loss"]["sliding"]["16"],
        rtol=1e-6,
    )


def test_default_list_leaves_out_selfextend_and_extend_settles():
    assert "selfextend" not in study.default_encodings() and "rope" in study.default_encodings()
    config = study.StudyConfig(encodings=("rope", "t5"), train_len=64)
    assert config.extend == ("selfextend", "linear")
    assert config.variants("rope") == ("selfextend", "linear") and config.variants("t5") == ()
    # Window 32; the smallest groups that keep (n - 1) // G + 32 - 32 // G below 64.
    groups = [config.selfextend_settings(n)["group_size"] for n in (64, 128, 256, 512)]
    assert groups == [1, 4, 8, 16]
    for n, group in zip((128, 256, 512), groups[1:], strict=True):
        assert 32 + (n - 32) / group <= 64  # the paper's condition
        assert (n - 1) // (group - 1) + 32 - 32 // (group - 1) > 63  # smallest
    assert study.StudyConfig(encodings=("rope",), extend="none").variants("rope") == ()
    assert study.StudyConfig(encodings=("rope",), extend="linear").extend == ("linear",)


def test_blockwise_study_leaves_out_xla_only_encodings_and_refuses_them_by_name():
    assert "cope" in study.default_encodings()
    blockwise = study.StudyConfig(attention="blockwise")
    assert "cope" not in blockwise.encodings and "rope" in blockwise.encodings
    named = study.StudyConfig(encodings=("cope",), attention="blockwise", train_len=8)
    with pytest.raises(ValueError, match=r"'cope'.*xla"):
        study._check_models(named)


# ---------------------------------------------------------------- randomized positions


def test_randomized_study_rows_and_evaluation_positions(tmp_path):
    args = ("--encodings", "rope", "--randomized-positions", "32", "--out", str(tmp_path))
    assert run_cli(*args, *TINY, "--eval-lens", "16") == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["randomized_positions"] == 32 and results["config"]["extend"] == []
    assert list(results["encodings"]) == ["rope", "rope (eval at 0..n-1)"]
    run = results["encodings"]["rope"]["runs"][0]
    assert set(run["variants"]) == {"consecutive"}
    for mode in study.MODES:  # sampled positions are not 0..15: other numbers
        assert run["loss"][mode]["16"] != run["variants"]["consecutive"]["loss"][mode]["16"]
    config = study.StudyConfig(
        encodings=("rope",), train_len=8, eval_lens=(8, 16), randomized_positions=32
    )
    assert config.model_config("rope").max_positions == 32
    # Evaluation positions are drawn like training ones: sorted, distinct, in range,
    # reproducible; at length == MAX they are all the positions.
    positions = study.eval_positions(config, "sliding", 16, 50, seed=0)
    assert positions.shape == (50, 16)
    assert (np.diff(positions, axis=1) > 0).all() and positions.min() >= 0
    assert positions.max() < 32 and positions.max() > 16
    np.testing.assert_array_equal(positions, study.eval_positions(config, "sliding", 16, 50, 0))
    np.testing.assert_array_equal(
        study.eval_positions(config, "nonoverlapping", 32, 3, 0), np.tile(np.arange(32), (3, 1))
    )


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"randomized_positions": -1}, "randomized_positions must be an integer >= 0"),
        ({"randomized_positions": 12}, "randomized_positions=12 must be at least the longest"),
        ({"randomized_positions": 32, "encodings": ("rope", "none")}, r"\['none'\] read no"),
        ({"randomized_positions": 32, "extend": "linear"}, "use extend='none'"),
        ({"randomized_positions": 32, "task": "recall"}, "task='lm' only"),
        ({"extend": "selfextend,yarn"}, "extend must list each of"),
    ],
)
def test_study_rejects_bad_position_options(settings, match):
    base = {"encodings": ("rope",), "train_len": 8, "eval_lens": (8, 16)}
    with pytest.raises(ValueError, match=match):
        study.StudyConfig(**{**base, **settings})
