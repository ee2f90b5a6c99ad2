"""Tests for the default corpus, local corpora and batching."""

import zlib

import numpy as np
import pytest
from hypothesis import given
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


def test_batching_rejects_bad_sizes():
    with pytest.raises(ValueError, match="seq_len=3 must divide num_tokens=10"):
        data.eval_windows(np.arange(100), seq_len=3, num_tokens=10)
    with pytest.raises(ValueError, match="need more than num_tokens=100"):
        data.eval_windows(np.arange(100), seq_len=10, num_tokens=100)
    with pytest.raises(ValueError, match="need more than seq_len=20"):
        data.train_batch(np.arange(20), step=0, batch_size=1, seq_len=20, seed=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        data.train_batch(np.arange(20), step=0, batch_size=0, seq_len=2, seed=0)
