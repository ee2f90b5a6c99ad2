"""Tests for the training loop: learning, schedule, checkpoint resume, data parallelism."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_posenc as pe
from jax_posenc import data, train
from jax_posenc.model import Transformer, TransformerConfig


@pytest.fixture(scope="module")
def corpus():
    return data.load_corpus(train_bytes=100_000, heldout_bytes=10_000)


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats) of the byte frequencies: the best loss without any context."""
    p = np.bincount(tokens, minlength=256) / tokens.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@pytest.mark.parametrize("encoding", pe.available_encodings())
def test_tiny_model_learns_for_every_encoding(encoding, corpus):
    model = Transformer(
        TransformerConfig(
            encoding=encoding, d_model=32, num_layers=1, num_heads=2, max_positions=32
        )
    )
    config = train.TrainConfig(
        steps=40, batch_size=8, seq_len=32, learning_rate=1e-2, warmup_fraction=0.1, log_every=1
    )
    result = train.train(model, config, corpus.train, progress=False)
    losses = np.array([line["loss"] for line in result.history])
    assert len(losses) == 40 and np.isfinite(losses).all()
    # Starts near uniform over bytes (ln 256 = 5.55) and ends clearly below the best
    # context-free predictor, so the model uses the preceding bytes.
    assert losses[0] > math.log(256) - 0.5
    assert losses[-5:].mean() < losses[0] - 2.0
    assert losses[-5:].mean() < unigram_entropy(corpus.train) - 0.3


def test_schedule_warms_up_linearly_then_decays_by_cosine():
    config = train.TrainConfig(steps=100, learning_rate=1.0, warmup_fraction=0.1)
    schedule = train.learning_rate_schedule(config)
    for step in (0, 5, 10):
        np.testing.assert_allclose(schedule(step), step / 10, rtol=1e-6)
    for step in (10, 40, 75, 100):
        progress = (step - 10) / 90
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        np.testing.assert_allclose(schedule(step), expected, rtol=1e-5)


def test_weight_decay_applies_to_dense_kernels_only():
    model = Transformer(TransformerConfig(encoding="learned", d_model=16, num_heads=2))
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    mask = jax.tree_util.tree_flatten_with_path(train.decay_mask(params))[0]
    decayed = {jax.tree_util.keystr(path) for path, flag in mask if flag}
    assert decayed and all(path.endswith("['kernel']") for path in decayed)
    assert not any("embedding" in path for path in decayed)


def test_evaluate_is_the_mean_loss_over_all_windows(corpus):
    model = Transformer(TransformerConfig(encoding="sinusoidal", d_model=16, num_heads=2))
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    windows = data.eval_windows(corpus.heldout, seq_len=8, num_tokens=8 * 11)  # 11 windows
    mesh = train.data_mesh()
    got = train.evaluate(model, params, windows, batch_size=4, mesh=mesh)
    # A batch larger than the number of windows is one padded batch.
    np.testing.assert_allclose(
        train.evaluate(model, params, windows, batch_size=64, mesh=mesh), got, rtol=1e-6
    )
    logits = np.asarray(jax.jit(model.apply)(params, windows[:, :-1]), np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.take_along_axis(log_probs, windows[:, 1:, None], -1).mean()
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_trains_a_learned_table_in_error_mode(corpus):
    model = Transformer(
        TransformerConfig(
            encoding="learned",
            d_model=16,
            num_layers=1,
            num_heads=2,
            max_positions=16,
            encoding_options={"learned": {"mode": "error"}},
        )
    )
    config = train.TrainConfig(steps=3, batch_size=4, seq_len=16, log_every=1)
    result = train.train(model, config, corpus.train, progress=False)
    assert [line["step"] for line in result.history] == [1, 2, 3]
    windows = data.eval_windows(corpus.heldout, seq_len=16, num_tokens=64)
    mesh = train.data_mesh()
    assert np.isfinite(train.evaluate(model, result.state.params, windows, batch_size=4, mesh=mesh))


class BytesAsPositions(nn.Module):
    """Looks bytes up in a learned table as if they were positions: text holds bytes past
    a short table, which only the jitted step sees."""

    num_positions: int

    @nn.compact
    def __call__(self, tokens):
        return pe.LearnedEmbedding(self.num_positions, 256, mode="error")(tokens)


def test_position_past_an_error_mode_table_raises_from_the_jitted_step(corpus):
    config = train.TrainConfig(steps=2, batch_size=4, seq_len=8, log_every=1)
    assert train.train(BytesAsPositions(256), config, corpus.train, progress=False).history
    with pytest.raises(
        ValueError,
        match=r"training step 1: positions must lie in \[0, num_positions=100\) of the "
        r"learned embedding table, got values in \[\d+, \d+\]",
    ):
        train.train(BytesAsPositions(100), config, corpus.train, progress=False)
    windows = data.eval_windows(corpus.heldout, seq_len=8, num_tokens=32)
    params = {"params": {"LearnedEmbedding_0": {"embedding": jnp.zeros((100, 256))}}}
    with pytest.raises(ValueError, match="evaluating windows of 8 tokens: positions must lie"):
        train.evaluate(BytesAsPositions(100), params, windows, batch_size=4, mesh=train.data_mesh())


class Killed(Exception):
    pass


# Shared by the checkpoint tests, so they compile the model once.
RESUME_MODEL = Transformer(
    TransformerConfig(encoding="learned", d_model=16, num_layers=1, num_heads=2, max_positions=16)
)
RESUME_CONFIG = train.TrainConfig(
    steps=12, batch_size=4, seq_len=16, checkpoint_every=4, log_every=1, learning_rate=1e-2
)


@pytest.fixture(scope="module")
def uninterrupted(corpus):
    return train.train(RESUME_MODEL, RESUME_CONFIG, corpus.train, progress=False)


def kill_after(last_step):
    def callback(step, metrics):
        if step == last_step:
            raise Killed

    return callback


def test_killed_run_resumes_and_ends_like_an_uninterrupted_run(tmp_path, corpus, uninterrupted):
    model, config = RESUME_MODEL, RESUME_CONFIG
    kill_after_step_7 = kill_after(7)

    run = dict(checkpoint_dir=tmp_path / "run", metrics_path=tmp_path / "run" / "metrics.jsonl")
    with pytest.raises(Killed):
        train.train(model, config, corpus.train, progress=False, callback=kill_after_step_7, **run)
    # Restarting the same command continues from the checkpoint of step 4.
    resumed = train.train(model, config, corpus.train, progress=False, **run)
    assert resumed.history[0]["step"] == 5
    np.testing.assert_allclose(
        [line["loss"] for line in resumed.history],
        [line["loss"] for line in uninterrupted.history[4:]],
        rtol=1e-5,
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        resumed.state.params,
        uninterrupted.state.params,
    )
    lines = [json.loads(line) for line in run["metrics_path"].read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 13))
    assert {"loss", "grad_norm", "learning_rate", "tokens_per_s"} <= set(lines[0])


def _largest_file(directory):
    return max(
        (path for path in directory.rglob("*") if path.is_file()), key=lambda p: p.stat().st_size
    )


@pytest.mark.parametrize("damaged", ["array data", "_METADATA"])
def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(
    tmp_path, corpus, uninterrupted, damaged
):
    run = dict(checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(Killed):
        train.train(RESUME_MODEL, RESUME_CONFIG, corpus.train, callback=kill_after(10), **run)
    newest = tmp_path / "checkpoints" / "8"
    assert sorted(int(p.name) for p in newest.parent.iterdir() if p.name.isdigit()) == [4, 8]
    path = _largest_file(newest) if damaged == "array data" else newest / "default" / "_METADATA"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with pytest.warns(
        UserWarning, match=r"checkpoint of step 8 in .* cannot be restored"
    ) as caught:
        resumed = train.train(RESUME_MODEL, RESUME_CONFIG, corpus.train, **run)
    assert "falling back to the previous checkpoint" in str(caught[0].message)
    assert resumed.history[0]["step"] == 5
    np.testing.assert_allclose(
        resumed.history[-1]["loss"], uninterrupted.history[-1]["loss"], rtol=1e-5
    )
    # The damaged checkpoint was replaced by the rerun of its steps.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = train.train(RESUME_MODEL, RESUME_CONFIG, corpus.train, **run)
    assert again.history == [] and int(again.state.step) == 12


def test_no_intact_checkpoint_is_a_clear_error(tmp_path, corpus):
    run = dict(checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(Killed):
        train.train(RESUME_MODEL, RESUME_CONFIG, corpus.train, callback=kill_after(5), **run)
    metadata = tmp_path / "checkpoints" / "4" / "default" / "_METADATA"
    metadata.write_text(metadata.read_text()[:100])
    with (
        pytest.warns(UserWarning, match="step 4"),
        pytest.raises(
            ValueError, match=r"no checkpoint in .*checkpoints' can be restored \(step 4"
        ),
    ):
        train.train(RESUME_MODEL, RESUME_CONFIG, corpus.train, **run)


@pytest.mark.parametrize("name", ["train_config.json", "metrics.jsonl"])
def test_corrupted_run_files_are_named_in_the_error(tmp_path, corpus, name):
    config = dataclasses.replace(RESUME_CONFIG, steps=2)
    run = dict(checkpoint_dir=tmp_path, metrics_path=tmp_path / "metrics.jsonl", progress=False)
    train.train(RESUME_MODEL, config, corpus.train, **run)
    path = tmp_path / name
    path.write_text(path.read_text()[:-20])
    with pytest.raises(ValueError, match=rf"cannot read '{re.escape(str(path))}': .*(JSON|line)"):
        train.train(RESUME_MODEL, config, corpus.train, **run)


def test_resuming_with_another_configuration_is_refused(tmp_path, corpus):
    train.train(RESUME_MODEL, RESUME_CONFIG, corpus.train, progress=False, checkpoint_dir=tmp_path)
    other = dataclasses.replace(RESUME_CONFIG, learning_rate=1.0)
    with pytest.raises(ValueError, match=r"differs in: train.learning_rate"):
        train.train(RESUME_MODEL, other, corpus.train, progress=False, checkpoint_dir=tmp_path)
    bigger = Transformer(dataclasses.replace(RESUME_MODEL.config, d_model=32))
    with pytest.raises(ValueError, match=r"differs in: model"):
        train.train(bigger, RESUME_CONFIG, corpus.train, progress=False, checkpoint_dir=tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("steps", 0, "steps must be a positive integer"),
        ("warmup_fraction", 1.5, r"warmup_fraction must lie in \[0, 1\]"),
        ("learning_rate", -1.0, "learning_rate must be a finite number > 0"),
    ],
)
def test_train_config_rejects_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        train.TrainConfig(**{field: value})


_DATA_PARALLEL_SCRIPT = textwrap.dedent(
    """
    import json
    import jax
    import numpy as np
    from jax_posenc import train
    from jax_posenc.model import Transformer, TransformerConfig

    assert jax.device_count() == 8, jax.devices()
    tokens = np.frombuffer(b"def f(x):\\n    return x * 2 + 1\\n" * 300, np.uint8)
    model = Transformer(
        TransformerConfig(encoding="alibi", d_model=16, num_layers=1, num_heads=2)
    )
    config = train.TrainConfig(steps=6, batch_size=8, seq_len=16, log_every=1,
                               learning_rate=1e-2)
    out = {}
    for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
        mesh = train.data_mesh(devices)
        result = train.train(model, config, tokens, mesh=mesh, progress=False)
        out[name] = [line["loss"] for line in result.history]
        out[name + "_params"] = [
            np.asarray(x).ravel().tolist() for x in jax.tree.leaves(result.state.params)
        ]
    batch = train.shard_batch(np.zeros((8, 17), np.int32), train.data_mesh())
    out["rows_per_device"] = sorted(s.data.shape[0] for s in batch.addressable_shards)
    out["state_replicated"] = result.state.params["params"]["final_norm"][
        "scale"].sharding.is_fully_replicated
    try:
        train.shard_batch(np.zeros((12, 17), np.int32), train.data_mesh())
    except ValueError as error:
        out["indivisible"] = str(error)
    print(json.dumps(out))
    """
)


def test_eight_way_data_parallel_training_matches_one_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    completed = subprocess.run(
        [sys.executable, "-c", _DATA_PARALLEL_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = json.loads(completed.stdout.strip().splitlines()[-1])
    assert out["rows_per_device"] == [1] * 8
    assert out["state_replicated"]
    assert (
        "batch_size=12 must be divisible by the number of devices in the mesh (8)"
        in (out["indivisible"])
    )
    assert len(out["one"]) == 6
    np.testing.assert_allclose(out["eight"], out["one"], rtol=1e-5)
    for eight, one in zip(out["eight_params"], out["one_params"], strict=True):
        np.testing.assert_allclose(eight, one, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "flags", [{"remat": True}, {"scan_layers": True}], ids=["remat", "scan_layers"]
)
def test_blockwise_model_trains_under_remat_and_scanned_layers_with_dict_options(corpus, flags):
    # An HF scaling dict and a list of slopes: options a JSON config would hold.
    options = {
        "rope": {"scaling": {"rope_type": "linear", "factor": 2.0}},
        "alibi": {"slopes": [0.5, 0.25]},
    }
    model = Transformer(
        TransformerConfig(
            encoding="rope+alibi",
            d_model=32,
            num_layers=2,
            num_heads=2,
            max_positions=32,
            attention="blockwise",
            block_size=8,
            encoding_options=options,
            **flags,
        )
    )
    config = train.TrainConfig(
        steps=30, batch_size=8, seq_len=32, learning_rate=1e-2, warmup_fraction=0.1, log_every=1
    )
    losses = [line["loss"] for line in train.train(model, config, corpus.train).history]
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < losses[0] - 1.5


# ---------------------------------------------------------------- randomized positions


_SEEN: list[np.ndarray] = []


class _PositionProbe(nn.Module):
    """Records the positions each call receives in `_SEEN` (-1 rows for none) and
    predicts the next byte from the current one."""

    @nn.compact
    def __call__(self, tokens, positions=None):
        shown = jnp.full(tokens.shape, -1, jnp.int32) if positions is None else positions
        jax.debug.callback(lambda p: _SEEN.append(np.asarray(p)), shown)
        return nn.Dense(256)(nn.Embed(256, 8)(tokens))


def test_randomized_training_feeds_sorted_positions_from_the_range(corpus):
    seen = _SEEN
    seen.clear()
    model = _PositionProbe()
    config = train.TrainConfig(
        steps=6, batch_size=4, seq_len=8, log_every=1, randomized_positions=40
    )
    train.train(model, config, corpus.train, progress=False)
    steps = [p for p in seen if (p >= 0).all()]
    assert len(steps) == 6
    for step, positions in enumerate(steps):
        assert positions.shape == (4, 8) and positions.dtype == np.int32
        assert (np.diff(positions, axis=1) > 0).all()  # sorted and distinct
        assert positions.min() >= 0 and positions.max() < 40
        np.testing.assert_array_equal(positions, train.training_positions(config, step))
    drawn = np.stack(steps)
    assert drawn.max() >= 8  # not 0..7: the range beyond the sequence is used
    assert len({p.tobytes() for p in drawn.reshape(-1, 8)}) == 24  # a new draw per row
    # Evaluation without positions leaves the model's default (0..L-1 for a Transformer).
    seen.clear()
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    windows = data.eval_windows(corpus.heldout, seq_len=8, num_tokens=32)
    train.evaluate(model, params, windows, batch_size=4, mesh=train.data_mesh())
    assert seen and all((p == -1).all() for p in seen)
    given = np.tile(np.arange(0, 24, 3, dtype=np.int32), (4, 1))
    seen.clear()
    train.evaluate(model, params, windows, batch_size=4, mesh=train.data_mesh(), positions=given)
    np.testing.assert_array_equal(seen[-1], given)


def test_transformer_eval_default_is_consecutive_positions(corpus):
    model = Transformer(TransformerConfig(encoding="rope", d_model=16, num_heads=2))
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    windows = data.eval_windows(corpus.heldout, seq_len=8, num_tokens=16)
    mesh = train.data_mesh()
    consecutive = np.tile(np.arange(8, dtype=np.int32), (2, 1))
    default = train.evaluate(model, params, windows, batch_size=2, mesh=mesh)
    given = train.evaluate(model, params, windows, batch_size=2, mesh=mesh, positions=consecutive)
    spread = train.evaluate(
        model, params, windows, batch_size=2, mesh=mesh, positions=3 * consecutive
    )
    assert default == given and abs(spread - default) > 1e-4


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"randomized_positions": -3}, "randomized_positions must be an integer >= 0"),
        ({"randomized_positions": 5, "seq_len": 8}, "randomized_positions=5 must be 0"),
    ],
)
def test_randomized_positions_rejects_bad_values(settings, match):
    with pytest.raises(ValueError, match=match):
        train.TrainConfig(**settings)


def test_randomized_positions_needs_a_position_based_model_with_room(corpus):
    config = train.TrainConfig(steps=1, batch_size=2, seq_len=8, randomized_positions=64)
    for encoding in ("none", "fox"):
        assert not train.takes_positions(encoding)
        model = Transformer(TransformerConfig(encoding=encoding, d_model=16, num_heads=2))
        with pytest.raises(ValueError, match=f"but '{encoding}' does not read positions"):
            train.train(model, config, corpus.train, progress=False)
    for encoding in ("rope", "sinusoidal", "learned", "alibi", "t5", "fox+rope"):
        assert train.takes_positions(encoding)
    small = Transformer(
        TransformerConfig(encoding="learned", d_model=16, num_heads=2, max_positions=32)
    )
    with pytest.raises(ValueError, match=r"randomized_positions=64 .* max_positions=32"):
        train.train(small, config, corpus.train, progress=False)
