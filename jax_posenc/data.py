"""The embedded default corpus and batching: bytes in, `[batch, seq + 1]` windows out.

The default corpus is the Python standard library's own source (`*.py` under
`sysconfig.get_paths()["stdlib"]`): present on every machine with Python, no download.
Any local text files or directories can be used instead. Text is modelled byte by byte
(vocabulary 256), so no tokenizer is involved.

Splits are by file and deterministic: a file is held out when the CRC-32 of its path
(relative to the root it was found under) is divisible by `heldout_every`, so adding or
removing other files never moves a file across the split. Each side is filled in CRC
order (a fixed pseudo-random order that mixes packages) up to its byte budget, taking
at most `max_file_bytes` from any one file. When the rule leaves one side empty (a
single file, or very few), the concatenated text is split instead: its last
`1 / heldout_every` is held out.

Batches are a pure function of `(seed, step)`, so a resumed run sees exactly the data
an uninterrupted run would have seen, with no iterator state to checkpoint.
"""

from __future__ import annotations

import dataclasses
import sysconfig
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jax_posenc import _checks

VOCAB_SIZE = 256
_BINARY_PROBE_BYTES = 8192


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Byte streams for training and held-out evaluation.

    Attributes:
      train: `[N]` uint8 training bytes (files concatenated).
      heldout: `[M]` uint8 held-out bytes, from files never used for training.
      train_files: the files (relative paths) the training bytes come from.
      heldout_files: the files the held-out bytes come from.
      description: where the text came from, for reports.
    """

    train: np.ndarray
    heldout: np.ndarray
    train_files: tuple[str, ...]
    heldout_files: tuple[str, ...]
    description: str


def stdlib_root() -> Path:
    """Directory of the running Python's standard library source."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_sources() -> list[tuple[str, Path]]:
    root = stdlib_root()
    files = sorted(path for path in root.rglob("*.py") if "site-packages" not in path.parts)
    return [(path.relative_to(root).as_posix(), path) for path in files]


def _looks_binary(path: Path) -> bool:
    with path.open("rb") as handle:
        return b"\0" in handle.read(_BINARY_PROBE_BYTES)


def _local_sources(paths: Sequence[str | Path]) -> list[tuple[str, Path]]:
    sources = []
    for given in paths:
        path = Path(given)
        if path.is_file():
            sources.append((path.as_posix(), path))
        elif path.is_dir():
            for child in sorted(path.rglob("*")):
                relative = child.relative_to(path)
                hidden = any(part.startswith(".") for part in relative.parts)
                if child.is_file() and not hidden and not _looks_binary(child):
                    sources.append(((Path(path.name) / relative).as_posix(), child))
        else:
            raise ValueError(f"corpus path {str(given)!r} is neither a file nor a directory")
    if not sources:
        raise ValueError(f"corpus paths {[str(p) for p in paths]} contain no text files")
    return sources


def _crc(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def _fill(sources: list[tuple[str, Path]], budget: int, max_file_bytes: int):
    chunks, names, total = [], [], 0
    for name, path in sorted(sources, key=lambda item: (_crc(item[0]), item[0])):
        if total >= budget:
            break
        with path.open("rb") as handle:
            data = handle.read(min(max_file_bytes, budget - total))
        if data:
            chunks.append(data)
            names.append(name)
            total += len(data)
    return np.frombuffer(b"".join(chunks), dtype=np.uint8), tuple(names)


def load_corpus(
    paths: Sequence[str | Path] | None = None,
    *,
    train_bytes: int = 2_000_000,
    heldout_bytes: int = 300_000,
    heldout_every: int = 10,
    max_file_bytes: int = 32_768,
) -> Corpus:
    """Loads the default corpus (Python stdlib source) or local files, split by file.

    Args:
      paths: files or directories to read (directories recursively, skipping hidden
        and binary files); None for the Python standard library's `*.py` files.
      train_bytes: byte budget of the training stream.
      heldout_bytes: byte budget of the held-out stream.
      heldout_every: about one file in `heldout_every` is held out (by path CRC-32).
      max_file_bytes: at most this many bytes are taken from any one file.

    Returns:
      A `Corpus`; both streams are non-empty.
    """
    train_bytes = _checks.check_positive_int("train_bytes", train_bytes)
    heldout_bytes = _checks.check_positive_int("heldout_bytes", heldout_bytes)
    heldout_every = _checks.check_min_int("heldout_every", heldout_every, 2)
    max_file_bytes = _checks.check_positive_int("max_file_bytes", max_file_bytes)
    if paths is None:
        sources = _stdlib_sources()
        description = f"Python standard library source ({stdlib_root()})"
    else:
        sources = _local_sources(paths)
        description = "local files: " + ", ".join(str(p) for p in paths)
    heldout_sources = [s for s in sources if _crc(s[0]) % heldout_every == 0]
    train_sources = [s for s in sources if _crc(s[0]) % heldout_every != 0]
    if heldout_sources and train_sources:
        train, train_files = _fill(train_sources, train_bytes, max_file_bytes)
        heldout, heldout_files = _fill(heldout_sources, heldout_bytes, max_file_bytes)
    else:
        text, files = _fill(sources, train_bytes + heldout_bytes, max_file_bytes)
        cut = len(text) - max(1, len(text) // heldout_every)
        train, heldout = text[:cut], text[cut:]
        train_files = heldout_files = files
        description += " (split inside the text: too few files to split by file)"
    if train.size < 2 or heldout.size < 2:
        raise ValueError(
            f"corpus is too small: {train.size} training and {heldout.size} held-out bytes"
        )
    return Corpus(train, heldout, train_files, heldout_files, description)


def train_batch(
    tokens: np.ndarray, *, step: int, batch_size: int, seq_len: int, seed: int
) -> np.ndarray:
    """Random windows of `seq_len + 1` bytes, a pure function of `(seed, step)`.

    Args:
      tokens: `[N]` byte stream, `N > seq_len`.
      step: training step (selects the batch).
      batch_size: number of windows.
      seq_len: model input length; each window also holds the next-byte target.
      seed: data seed.

    Returns:
      `[batch_size, seq_len + 1]` int32; inputs are `[:, :-1]`, targets `[:, 1:]`.
    """
    batch_size = _checks.check_positive_int("batch_size", batch_size)
    seq_len = _checks.check_positive_int("seq_len", seq_len)
    step = _checks.check_min_int("step", step, 0)
    if tokens.size <= seq_len:
        raise ValueError(f"tokens has {tokens.size} bytes, need more than seq_len={seq_len}")
    rng = np.random.default_rng([_checks.check_min_int("seed", seed, 0), step])
    starts = rng.integers(0, tokens.size - seq_len, size=batch_size)
    return tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def eval_windows(
    tokens: np.ndarray, *, seq_len: int, num_tokens: int, start: int = 0
) -> np.ndarray:
    """Consecutive non-overlapping windows that predict bytes `start + 1 .. start + num_tokens`.

    Window i holds bytes `[start + i * seq_len, start + (i + 1) * seq_len]` (inclusive),
    so every one of those bytes is predicted exactly once, whatever `seq_len` divides
    `num_tokens`: evaluations at different lengths score the same text. Tokens early in
    a window see little context (the "early token curse" of Press et al., 2022).

    Args:
      tokens: `[N]` byte stream with `N > start + num_tokens`.
      seq_len: model input length; must divide `num_tokens`.
      num_tokens: number of predicted bytes.
      start: bytes before the first predicted one that are skipped.

    Returns:
      `[num_tokens // seq_len, seq_len + 1]` int32.
    """
    seq_len = _checks.check_positive_int("seq_len", seq_len)
    num_tokens = _checks.check_positive_int("num_tokens", num_tokens)
    start = _checks.check_min_int("start", start, 0)
    if num_tokens % seq_len:
        raise ValueError(f"seq_len={seq_len} must divide num_tokens={num_tokens}")
    _check_heldout_size(tokens, start + num_tokens)
    starts = start + np.arange(num_tokens // seq_len) * seq_len
    return tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def _check_heldout_size(tokens: np.ndarray, last: int) -> None:
    if tokens.size <= last:
        raise ValueError(
            f"held-out text has {tokens.size} bytes, need more than start + num_tokens={last}"
        )


def sliding_windows(
    tokens: np.ndarray, *, seq_len: int, stride: int, num_tokens: int, start: int
) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping windows, `stride` apart, each scoring only its last `stride` predictions.

    Window i holds bytes `[e - seq_len, e]` with `e = start + (i + 1) * stride` and scores
    the predictions of bytes `e - stride + 1 .. e`, so bytes `start + 1 .. start +
    num_tokens` are each scored exactly once (the same bytes as `eval_windows` with the
    same `start`), every one with at least `seq_len - stride` bytes of context. This is
    the sliding-window evaluation of Press et al. (2022), which removes the early-token
    curse of non-overlapping windows; it costs `seq_len / stride` times as much.

    Args:
      tokens: `[N]` byte stream with `N > start + num_tokens`.
      seq_len: model input length.
      stride: bytes between windows, `1 <= stride <= seq_len`; must divide `num_tokens`.
      num_tokens: number of scored bytes.
      start: bytes before the first scored one, at least `seq_len - stride` (the first
        window's context).

    Returns:
      `(windows, weights)`: `[num_tokens // stride, seq_len + 1]` int32 windows and
      `[num_tokens // stride, seq_len]` float32 weights, 1 for the scored predictions
      (the last `stride` of each window) and 0 elsewhere.
    """
    seq_len = _checks.check_positive_int("seq_len", seq_len)
    stride = _checks.check_positive_int("stride", stride)
    num_tokens = _checks.check_positive_int("num_tokens", num_tokens)
    start = _checks.check_min_int("start", start, 0)
    if stride > seq_len:
        raise ValueError(f"stride={stride} must be at most seq_len={seq_len}")
    if num_tokens % stride:
        raise ValueError(f"stride={stride} must divide num_tokens={num_tokens}")
    if start < seq_len - stride:
        raise ValueError(
            f"start={start} must be at least seq_len - stride = {seq_len - stride}, the "
            "first window's context"
        )
    _check_heldout_size(tokens, start + num_tokens)
    ends = start + (np.arange(num_tokens // stride) + 1) * stride
    windows = tokens[(ends - seq_len)[:, None] + np.arange(seq_len + 1)].astype(np.int32)
    weights = np.zeros((len(ends), seq_len), np.float32)
    weights[:, seq_len - stride :] = 1.0
    return windows, weights


# ------------------------------------------------------------------ associative recall

RECALL_KEYS = 16
RECALL_VALUES = 15
RECALL_START = RECALL_KEYS * RECALL_VALUES + RECALL_KEYS  # 256 tokens in all
_RECALL_SPLITS = {"train": 0, "eval": 1}


def recall_pair_token(key: np.ndarray, value: np.ndarray) -> np.ndarray:
    """The token that stores `value` under `key`: `key * RECALL_VALUES + value` (0..239)."""
    return key * RECALL_VALUES + value


def recall_query_token(key: np.ndarray) -> np.ndarray:
    """The token that asks for `key`'s value: `240 + key` (240..255)."""
    return RECALL_KEYS * RECALL_VALUES + key


@dataclasses.dataclass(frozen=True)
class RecallBatch:
    """Associative-recall sequences and where their answers are.

    Attributes:
      tokens: `[B, L + 1]` int32; inputs are `[:, :-1]`, targets `[:, 1:]`.
      query_positions: `[B, P]` input positions of the query tokens: the model's
        prediction there is scored against `answers`.
      answers: `[B, P]` the pair token stored under each queried key.
      distances: `[B, P]` positions from that pair token to its query.
    """

    tokens: np.ndarray
    query_positions: np.ndarray
    answers: np.ndarray
    distances: np.ndarray


def recall_max_distance(seq_len: int, probes: int) -> int:
    """The largest distance `recall_batch(distance=...)` can place in `seq_len` tokens."""
    return seq_len + 1 - 2 * probes


def recall_min_distance(probes: int) -> int:
    """The smallest distance `recall_batch(distance=...)` accepts: every store must lie
    before the first question."""
    return 2 * probes - 1


def recall_batch(
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
    step: int,
    probes: int = 8,
    distractors: int = 8,
    distance: int | None = None,
    split: str = "train",
) -> RecallBatch:
    """Associative recall over random symbols, a pure function of its arguments.

    Every token below 240 stores a value (one of 15) under a key (one of 16); tokens
    240..255 ask for a key. A sequence of `seq_len + 1` tokens is a run of stored pairs
    followed by `probes` questions, each a query token and its answer (the pair token
    stored under that key). `distractors` keys fill the run with random values; each of
    the `probes` keys is stored exactly once, `distance` tokens before its query (or,
    without `distance`, anywhere in the run: distances from 1 to about `seq_len`). The
    answer is one token, far back, found by its key: a model that ignores far context
    guesses among the 15 values (accuracy 1/15 at best). Scoring the answers only
    (`query_positions`) gives accuracy by distance, as in the associative-recall tasks
    of Arora et al. (2023, Zoology), with each pair in one token so a single attention
    hop suffices.

    Args:
      batch_size: sequences.
      seq_len: model input length, at least `2 * probes`.
      seed: data seed.
      step: batch index (training step).
      probes: questions per sequence.
      distractors: keys of the filler pairs; `probes + distractors <= 16`.
      distance: fixed store-to-query distance, from `recall_min_distance(probes)` to
        `recall_max_distance(seq_len, probes)`.
      split: "train" or "eval" (independent random streams).

    Returns:
      A `RecallBatch`.
    """
    batch_size = _checks.check_positive_int("batch_size", batch_size)
    seq_len = _checks.check_positive_int("seq_len", seq_len)
    probes = _checks.check_positive_int("probes", probes)
    distractors = _checks.check_positive_int("distractors", distractors)
    _checks.check_choice("split", split, tuple(_RECALL_SPLITS))
    run = recall_max_distance(seq_len, probes)
    if run < probes:
        raise ValueError(
            f"seq_len={seq_len} leaves {max(run, 0)} tokens before the questions for "
            f"probes={probes} stored pairs; raise seq_len or lower probes"
        )
    if probes + distractors > RECALL_KEYS:
        raise ValueError(
            f"probes + distractors = {probes + distractors} exceeds the {RECALL_KEYS} keys"
        )
    queries = run + 2 * np.arange(probes)
    if distance is not None:
        shortest = recall_min_distance(probes)
        if not (isinstance(distance, int | np.integer) and shortest <= distance <= run):
            raise ValueError(
                f"distance must be an integer in [{shortest}, {run}] for seq_len={seq_len} "
                f"and probes={probes}, got {distance!r}"
            )
    entropy = [_RECALL_SPLITS[split], _checks.check_min_int("seed", seed, 0)]
    entropy += [_checks.check_min_int("step", step, 0), seq_len, int(distance or 0)]
    rng = np.random.default_rng(entropy)
    tokens = np.empty((batch_size, seq_len + 1), np.int32)
    answers = np.empty((batch_size, probes), np.int32)
    distances = np.empty((batch_size, probes), np.int32)
    for row in range(batch_size):
        keys = rng.choice(RECALL_KEYS, probes + distractors, replace=False)
        stored = recall_pair_token(keys[:probes], rng.integers(0, RECALL_VALUES, probes))
        filler_keys = rng.choice(keys[probes:], run)
        tokens[row, :run] = recall_pair_token(filler_keys, rng.integers(0, RECALL_VALUES, run))
        if distance is None:
            stores = rng.choice(run, probes, replace=False)
        else:
            stores = queries - int(distance)
        tokens[row, stores] = stored
        tokens[row, queries] = recall_query_token(keys[:probes])
        tokens[row, queries + 1] = stored
        answers[row] = stored
        distances[row] = queries - stores
    query_positions = np.broadcast_to(queries, (batch_size, probes)).astype(np.int32)
    return RecallBatch(tokens, query_positions, answers, distances)
