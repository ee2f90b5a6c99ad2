"""Training the library's small decoder-only Transformer and testing it past its
training length (needs the study extra: pip install 'jax_posenc[study]').

The corpus is the Python standard library's own source, read from this machine, so
nothing is downloaded. `train` runs AdamW with warmup and cosine decay, writes orbax
checkpoints and resumes from the latest one when called again with the same directory.

Run: python examples/train_model.py [--steps 300] [--encoding rope]
"""

import argparse
import math
import tempfile

import numpy as np

import jax_posenc as pe
from jax_posenc import data, train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--encoding", default="alibi")
    args = parser.parse_args(argv)

    corpus = data.load_corpus(train_bytes=200_000, heldout_bytes=20_000)
    print(f"corpus: {corpus.train.size} training and {corpus.heldout.size} held-out bytes")
    model = pe.Transformer(
        pe.TransformerConfig(
            encoding=args.encoding, d_model=32, num_layers=1, num_heads=2, max_positions=128
        )
    )
    config = train.TrainConfig(
        steps=args.steps, batch_size=16, seq_len=32, learning_rate=1e-2, log_every=1
    )
    with tempfile.TemporaryDirectory() as checkpoint_dir:
        result = train.train(
            model, config, corpus.train, checkpoint_dir=checkpoint_dir, progress=False
        )
        losses = [line["loss"] for line in result.history]
        print(
            f"{args.encoding}: {args.steps} steps of {config.batch_size} x {config.seq_len} bytes, "
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f} nats/byte (uniform: {math.log(256):.3f})"
        )
        # Called again with the same directory, train restores the last checkpoint and
        # has nothing left to do.
        again = train.train(
            model, config, corpus.train, checkpoint_dir=checkpoint_dir, progress=False
        )
        print(f"resumed at step {int(again.state.step)}: {len(again.history)} new metric lines")
        assert int(again.state.step) == args.steps and not again.history
    frequencies = np.bincount(corpus.train, minlength=256) / corpus.train.size
    unigram = float(-np.sum(frequencies * np.log(np.where(frequencies > 0, frequencies, 1))))
    print(f"best loss without context (byte frequencies): {unigram:.3f}")
    assert losses[-1] < unigram  # the model uses the preceding bytes

    mesh = train.data_mesh()
    for length in (32, 64, 128):  # 1x, 2x and 4x the training length
        windows = data.eval_windows(corpus.heldout, seq_len=length, num_tokens=4096)
        loss = train.evaluate(model, result.state.params, windows, batch_size=32, mesh=mesh)
        print(f"held-out perplexity per byte at {length:3d} tokens: {math.exp(loss):.2f}")
        assert np.isfinite(loss)


if __name__ == "__main__":
    main()
