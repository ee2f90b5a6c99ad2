"""Tests for the default corpus, local corpora and batching."""

import zlib

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from jax_posenc import data


@pytest.fixture(scope="module")
def stdlib_corpus():
    return data.load_corpus(train_bytes=60_000, heldout_bytes=20_000)


def test_stdlib_corpus_is_split_by_file_and_deterministic(stdlib_corpus):
    corpus = stdlib_corpus
    assert set(corpus.train_files).isdisjoint(corpus.heldout_files)
    assert all(zlib.crc32(name.encode()) % 10 == 0 for name in corpus.heldout_files)
    assert all(zlib.crc32(name.encode()) % 10 != 0 for name in corpus.train_files)
    assert all(name.endswith(".py") for name in corpus.train_files + corpus.heldout_files)
    again = data.load_corpus(train_bytes=60_000, heldout_bytes=20_000)
    np.testing.assert_array_equal(again.train, corpus.train)
    np.testing.assert_array_equal(again.heldout, corpus.heldout)


def test_stdlib_corpus_respects_budgets_and_holds_the_files_text(stdlib_corpus):
    corpus = stdlib_corpus
    assert corpus.train.dtype == np.uint8
    assert corpus.train.size == 60_000 and corpus.heldout.size == 20_000
    first = (data.stdlib_root() / corpus.train_files[0]).read_bytes()[:32_768]
    np.testing.assert_array_equal(corpus.train[: len(first)], np.frombuffer(first, np.uint8))


def test_local_directory_skips_hidden_and_binary_files(tmp_path):
    root = tmp_path / "texts"
    root.mkdir()
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(f"document {i}\n" * 5)
    (root / ".hidden.txt").write_text("secret")
    (root / "image.bin").write_bytes(b"\x89PNG\0\0\0")
    corpus = data.load_corpus([root], train_bytes=10_000, heldout_bytes=10_000)
    names = corpus.train_files + corpus.heldout_files
    assert len(names) == 40 and not any("hidden" in n or "image" in n for n in names)
    assert corpus.heldout_files and set(corpus.train_files).isdisjoint(corpus.heldout_files)
    text = bytes(corpus.train).decode() + bytes(corpus.heldout).decode()
    assert "secret" not in text and text.count("document") == 200


def test_single_file_is_split_inside_the_text(tmp_path):
    path = tmp_path / "one.txt"
    path.write_bytes(bytes(range(256)) * 4)
    corpus = data.load_corpus([path], heldout_every=4)
    np.testing.assert_array_equal(
        np.concatenate([corpus.train, corpus.heldout]), np.tile(np.arange(256), 4)
    )
    assert corpus.heldout.size == 256
    assert "split inside the text" in corpus.description


def test_missing_path_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"'.*nowhere' is neither a file nor a directory"):
        data.load_corpus([tmp_path / "nowhere"])


@given(step=st.integers(0, 10**6), seed=st.integers(0, 2**31), seq_len=st.integers(1, 50))
def test_train_batches_are_contiguous_windows_chosen_by_seed_and_step(step, seed, seq_len):
    tokens = np.arange(5000)
    batch = data.train_batch(tokens, step=step, batch_size=4, seq_len=seq_len, seed=seed)
    assert batch.shape == (4, seq_len + 1) and batch.dtype == np.int32
    np.testing.assert_array_equal(np.diff(batch, axis=1), 1)
    assert batch.min() >= 0 and batch.max() < 5000
    again = data.train_batch(tokens, step=step, batch_size=4, seq_len=seq_len, seed=seed)
    np.testing.assert_array_equal(batch, again)


def test_different_steps_give_different_batches():
    tokens = np.arange(100_000)
    a, b = (data.train_batch(tokens, step=s, batch_size=8, seq_len=16, seed=0) for s in (0, 1))
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("seq_len", [1, 8, 64, 512])
def test_eval_windows_predict_every_byte_exactly_once(seq_len):
    tokens = np.arange(3000) * 7 % 256
    windows = data.eval_windows(tokens, seq_len=seq_len, num_tokens=2048)
    assert windows.shape == (2048 // seq_len, seq_len + 1)
    np.testing.assert_array_equal(windows[:, 1:].reshape(-1), tokens[1:2049])
    np.testing.assert_array_equal(windows[:, :-1].reshape(-1), tokens[:2048])


def test_eval_windows_can_skip_a_prefix():
    tokens = np.arange(3000) * 7 % 256
    windows = data.eval_windows(tokens, seq_len=64, num_tokens=512, start=100)
    np.testing.assert_array_equal(windows[:, 1:].reshape(-1), tokens[101:613])


@pytest.mark.parametrize(("seq_len", "stride"), [(8, 8), (16, 4), (64, 32), (64, 1), (24, 8)])
def test_sliding_windows_score_every_byte_once_with_enough_context(seq_len, stride):
    tokens = np.arange(5000) * 13 % 251
    start, num_tokens = 64, 96
    windows, weights = data.sliding_windows(
        tokens, seq_len=seq_len, stride=stride, num_tokens=num_tokens, start=start
    )
    assert windows.shape == (num_tokens // stride, seq_len + 1)
    assert weights.shape == (num_tokens // stride, seq_len)
    # Every window is a contiguous slice of the stream, `stride` after the previous one.
    ends = start + stride * (np.arange(len(windows)) + 1)
    for window, end in zip(windows, ends, strict=True):
        np.testing.assert_array_equal(window, tokens[end - seq_len : end + 1])
    # The scored targets, in order, are exactly bytes start + 1 .. start + num_tokens ...
    scored = windows[:, 1:][weights == 1]
    np.testing.assert_array_equal(scored, tokens[start + 1 : start + num_tokens + 1])
    # ... each predicted from at least seq_len - stride bytes of context.
    assert (np.argmax(weights, axis=1) >= seq_len - stride).all()
    assert set(np.unique(weights)) <= {0.0, 1.0}


def test_sliding_windows_with_the_full_stride_are_the_non_overlapping_windows():
    tokens = np.arange(2000) % 256
    windows, weights = data.sliding_windows(tokens, seq_len=32, stride=32, num_tokens=256, start=0)
    np.testing.assert_array_equal(
        windows, data.eval_windows(tokens, seq_len=32, num_tokens=256, start=0)
    )
    assert (weights == 1).all()


def test_sliding_windows_reject_bad_sizes():
    tokens = np.arange(1000)
    with pytest.raises(ValueError, match="stride=40 must be at most seq_len=32"):
        data.sliding_windows(tokens, seq_len=32, stride=40, num_tokens=80, start=32)
    with pytest.raises(ValueError, match="stride=16 must divide num_tokens=40"):
        data.sliding_windows(tokens, seq_len=32, stride=16, num_tokens=40, start=32)
    with pytest.raises(ValueError, match="start=8 must be at least seq_len - stride = 16"):
        data.sliding_windows(tokens, seq_len=32, stride=16, num_tokens=64, start=8)
    with pytest.raises(ValueError, match="need more than start \\+ num_tokens=1024"):
        data.sliding_windows(tokens, seq_len=32, stride=16, num_tokens=992, start=32)


@given(
    seed=st.integers(0, 2**31),
    step=st.integers(0, 10**6),
    seq_len=st.integers(10, 80),
    probes=st.integers(1, 4),
    distractors=st.integers(1, 8),
)
def test_each_recall_answer_is_the_one_pair_stored_under_its_key(
    seed, step, seq_len, probes, distractors
):
    assume(data.recall_max_distance(seq_len, probes) >= probes)
    batch = data.recall_batch(
        batch_size=3, seq_len=seq_len, seed=seed, step=step, probes=probes,
        distractors=distractors,
    )  # fmt: skip
    assert batch.tokens.shape == (3, seq_len + 1) and batch.tokens.dtype == np.int32
    assert batch.tokens.min() >= 0 and batch.tokens.max() < 256
    pairs = data.RECALL_KEYS * data.RECALL_VALUES
    for row, positions, answers, distances in zip(
        batch.tokens, batch.query_positions, batch.answers, batch.distances, strict=True
    ):
        stored = row < pairs
        assert stored[: positions[0]].all()  # a run of pairs, then the questions
        for position, answer, distance in zip(positions, answers, distances, strict=True):
            key = row[position] - pairs
            assert 0 <= key < data.RECALL_KEYS and answer // data.RECALL_VALUES == key
            assert row[position + 1] == answer  # the answer follows its question
            earlier = np.flatnonzero(
                stored[:position] & (row[:position] // data.RECALL_VALUES == key)
            )
            assert list(earlier) == [position - distance]  # stored exactly once, that far back
            assert row[position - distance] == answer


@pytest.mark.parametrize("distance", [7, 20, 57])
def test_recall_batch_places_every_store_at_the_asked_distance(distance):
    batch = data.recall_batch(
        batch_size=4, seq_len=64, seed=3, step=0, probes=4, distance=distance, split="eval"
    )
    assert (batch.distances == distance).all()
    assert data.recall_min_distance(4) == 7 and data.recall_max_distance(64, 4) == 57
    rows = np.arange(4)[:, None]
    np.testing.assert_array_equal(
        batch.tokens[rows, batch.query_positions - distance], batch.answers
    )


def test_recall_batches_are_pure_functions_of_their_arguments():
    def make(**changes):
        settings = dict(batch_size=2, seq_len=32, seed=1, step=5) | changes
        return data.recall_batch(**settings).tokens

    np.testing.assert_array_equal(make(), make())
    for changes in ({"step": 6}, {"seed": 2}, {"split": "eval"}):
        assert not np.array_equal(make(), make(**changes))


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"distance": 6}, r"distance must be an integer in \[7, 57\]"),
        ({"distance": 58}, r"distance must be an integer in \[7, 57\]"),
        ({"probes": 12, "distractors": 5}, "exceeds the 16 keys"),
        ({"seq_len": 10}, "leaves 3 tokens before the questions for probes=4"),
        ({"split": "test"}, "split must be one of"),
    ],
)
def test_recall_batch_rejects_bad_settings(settings, match):
    arguments = dict(batch_size=1, seq_len=64, seed=0, step=0, probes=4) | settings
    with pytest.raises(ValueError, match=match):
        data.recall_batch(**arguments)


def test_batching_rejects_bad_sizes():
    with pytest.raises(ValueError, match="seq_len=3 must divide num_tokens=10"):
        data.eval_windows(np.arange(100), seq_len=3, num_tokens=10)
    with pytest.raises(ValueError, match="need more than start \\+ num_tokens=100"):
        data.eval_windows(np.arange(100), seq_len=10, num_tokens=100)
    with pytest.raises(ValueError, match="need more than seq_len=20"):
        data.train_batch(np.arange(20), step=0, batch_size=1, seq_len=20, seed=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        data.train_batch(np.arange(20), step=0, batch_size=0, seq_len=2, seed=0)
