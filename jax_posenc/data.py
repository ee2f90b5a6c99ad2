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


def eval_windows(tokens: np.ndarray, *, seq_len: int, num_tokens: int) -> np.ndarray:
    """Consecutive non-overlapping windows that predict the first `num_tokens` bytes.

    Window i holds bytes `[i * seq_len, (i + 1) * seq_len]` (inclusive), so every byte in
    `1..num_tokens` is predicted exactly once, whatever `seq_len` divides `num_tokens`:
    evaluations at different lengths score the same text.

    Args:
      tokens: `[N]` byte stream with `N > num_tokens`.
      seq_len: model input length; must divide `num_tokens`.
      num_tokens: number of predicted bytes.

    Returns:
      `[num_tokens // seq_len, seq_len + 1]` int32.
    """
    seq_len = _checks.check_positive_int("seq_len", seq_len)
    num_tokens = _checks.check_positive_int("num_tokens", num_tokens)
    if num_tokens % seq_len:
        raise ValueError(f"seq_len={seq_len} must divide num_tokens={num_tokens}")
    if tokens.size <= num_tokens:
        raise ValueError(
            f"held-out text has {tokens.size} bytes, need more than num_tokens={num_tokens}"
        )
    starts = np.arange(num_tokens // seq_len) * seq_len
    return tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
