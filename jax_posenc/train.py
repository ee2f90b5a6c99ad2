"""Training loop: optax, orbax checkpoints and data parallelism over a device mesh.

* Optimizer: AdamW (Loshchilov & Hutter, 2019) after global-norm gradient clipping,
  with linear warmup and cosine decay. Weight decay applies to dense kernels only, not
  to embeddings, norms or positional parameters, so rows of a learned position table
  that training never reaches keep their initial values.
* Data parallelism with `jax.sharding`: a 1-D `Mesh` with axis `data`; each global
  batch is sharded along `data` and the train state is replicated. The same code runs on
  one device, on several local devices, and on several hosts after
  `jax.distributed.initialize()`: every process computes the same global batch (a pure
  function of the seed and the step, see `jax_posenc.data.train_batch`) and hands its
  own rows to `jax.make_array_from_process_local_data`.
* Checkpoints: `orbax.checkpoint.CheckpointManager` saves the train state every
  `checkpoint_every` steps and at the end; `train` resumes from the latest checkpoint
  in its directory, so a killed run restarted with the same command continues where it
  stopped and reproduces the uninterrupted run. A checkpoint that cannot be restored
  (a file cut short) is skipped with a warning for the one before it. The
  configuration is stored next to the checkpoints and a restart with a different one
  is refused.
* Run-time checks: the init, step and evaluation functions are jitted through
  `jax.experimental.checkify.checkify` (user checks), so a model whose learned table
  uses `mode="error"` trains, and a position past its table raises a ValueError on the
  host naming the step. Without such checks the error value has no leaves and reading
  it costs nothing; with them every step waits for its check before the next one.
* Randomized positions (Ruoss et al., 2023): with `randomized_positions=MAX` every
  training sequence gets its own sorted positions, a uniformly random subset of
  `[0, MAX)` without replacement (`jax_posenc.content.randomized_positions`), drawn
  inside the jitted step from the seed and the step (`training_positions`), so a
  resumed or multi-host run draws the same ones. The model must take positions
  (`model.apply(params, tokens, positions)`, as `jax_posenc.Transformer` does);
  evaluation passes positions explicitly (`evaluate(..., positions=...)`) or none.
* Metrics: JSON lines (`step`, `loss`, `grad_norm`, `learning_rate`, `tokens_per_s`),
  and a tqdm progress bar showing the loss and tokens/s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import math
import sys
import time
import types
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import checkify
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jax_posenc import _checks, _files, content, data, registry

DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of `train` (static and hashable).

    Attributes:
      steps: number of optimizer steps.
      batch_size: global batch size (sequences per step), divisible by the mesh size.
      seq_len: training sequence length.
      learning_rate: peak learning rate.
      warmup_fraction: fraction of `steps` with linear warmup from 0.
      final_lr_fraction: the cosine decay ends at `learning_rate * final_lr_fraction`.
      weight_decay: AdamW decoupled weight decay (dense kernels only).
      grad_clip: maximum global gradient norm.
      b1: Adam first-moment decay.
      b2: Adam second-moment decay.
      seed: seeds both the parameter initialization and the data order.
      checkpoint_every: steps between checkpoints (one is also written at the end).
      log_every: steps between metric lines and progress-bar updates.
      randomized_positions: 0 for the positions 0..seq_len-1; otherwise MAX, and each
        training sequence takes sorted distinct positions drawn uniformly from
        `[0, MAX)` (Ruoss et al., 2023; see `training_positions`). At least `seq_len`;
        a model with a position table needs `MAX` rows.
    """

    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 128
    learning_rate: float = 3e-3
    warmup_fraction: float = 0.05
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    randomized_positions: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "checkpoint_every", "log_every"):
            _checks.check_positive_int(name, getattr(self, name))
        _checks.check_min_int("randomized_positions", self.randomized_positions, 0)
        if 0 < self.randomized_positions < self.seq_len:
            raise ValueError(
                f"randomized_positions={self.randomized_positions} must be 0 (off) or at "
                f"least seq_len={self.seq_len}: each sequence draws seq_len distinct "
                "positions from [0, randomized_positions)"
            )
        _checks.check_min_int("seed", self.seed, 0)
        for name in ("learning_rate", "grad_clip"):
            _checks.check_positive_float(name, getattr(self, name))
        for name in ("warmup_fraction", "final_lr_fraction", "weight_decay", "b1", "b2"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds: `step` (int32 scalar), `params`, `opt_state`."""

    step: jax.Array
    params: Any
    opt_state: Any


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the final state and the metric lines of this run."""

    state: TrainState
    history: list[dict[str, float]]


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then cosine decay to the final fraction."""
    warmup = max(1, round(config.warmup_fraction * config.steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(config.steps, warmup + 1),
        end_value=config.learning_rate * config.final_lr_fraction,
    )


def decay_mask(params) -> Any:
    """True for the leaves AdamW decays: dense kernels (parameters named `kernel`)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping followed by AdamW on the warmup + cosine schedule."""
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(
            learning_rate_schedule(config),
            b1=config.b1,
            b2=config.b2,
            weight_decay=config.weight_decay,
            mask=decay_mask,
        ),
    )


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis `data` over `devices` (all devices of all processes if None)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def _check_divisible(batch_size: int, mesh: Mesh) -> None:
    if batch_size % mesh.size:
        raise ValueError(
            f"batch_size={batch_size} must be divisible by the number of devices in the "
            f"mesh ({mesh.size}) for data parallelism"
        )


def shard_batch(global_batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """Places a host-side global batch `[B, ...]` on `mesh`, rows sharded over `data`.

    Every process passes the same global batch and contributes only its own rows, so this
    is also correct with several hosts (after `jax.distributed.initialize()`).
    """
    _check_divisible(global_batch.shape[0], mesh)
    sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    rows = global_batch.shape[0] // jax.process_count()
    start = jax.process_index() * rows
    return jax.make_array_from_process_local_data(
        sharding, global_batch[start : start + rows], global_batch.shape
    )


def next_token_losses(
    model: nn.Module, params, windows: jax.Array, positions: jax.Array | None = None
) -> jax.Array:
    """Cross-entropy of each next-token prediction, float32 `[B, L]`.

    Args:
      model: a `Transformer` (anything mapping `[B, L]` tokens to `[B, L, V]` logits;
        with `positions`, called as `model.apply(params, tokens, positions)`).
      params: its variables.
      windows: integer `[B, L + 1]`; inputs are `[:, :-1]`, targets `[:, 1:]`.
      positions: optional integer `[B, L]` positions of the inputs; None for the
        model's default (0..L-1).
    """
    if positions is None:
        logits = model.apply(params, windows[:, :-1])
    else:
        logits = model.apply(params, windows[:, :-1], positions)
    return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:])


# Roles whose terms are functions of the positions (a token bias reads per-token values
# of the content instead, and an encoding without any role has no positions at all).
_POSITION_ROLES = ("input_embedding", "qk_transform", "logit_bias", "relative_terms")


def takes_positions(encoding: str) -> bool:
    """Whether the registry encoding `encoding` uses the token positions (RoPE,
    sinusoidal, learned, ALiBi, T5, ... and layer schedules do; NoPE `none` and FoX
    `fox` alone do not, so randomized positions cannot change them)."""
    return any(
        part.takes_layer is not None or any(getattr(part, r) is not None for r in _POSITION_ROLES)
        for part in registry.resolve(encoding)
    )


def check_randomized_model(model: nn.Module, config: TrainConfig) -> None:
    """Raises ValueError where `model` cannot train with `config.randomized_positions`:
    a `jax_posenc.Transformer` whose encoding takes no positions, or whose
    `max_positions` is below the range the positions are drawn from."""
    if not config.randomized_positions:
        return
    model_config = getattr(model, "config", None)
    encoding = getattr(model_config, "encoding", None)
    if isinstance(encoding, str) and not takes_positions(encoding):
        raise ValueError(
            f"randomized_positions={config.randomized_positions} needs a position-based "
            f"encoding, but {encoding!r} does not read positions (randomizing them would "
            "change nothing); use 0 or an encoding such as rope, sinusoidal, alibi or t5"
        )
    max_positions = getattr(model_config, "max_positions", None)
    if isinstance(max_positions, int) and max_positions < config.randomized_positions:
        raise ValueError(
            f"randomized_positions={config.randomized_positions} draws positions up to "
            f"{config.randomized_positions - 1}, but the model has max_positions="
            f"{max_positions}; raise max_positions to at least {config.randomized_positions}"
        )


# Stream of the position draws, apart from the parameter initialization's key(seed).
_POSITIONS_STREAM = 0x706F73


def training_positions(config: TrainConfig, step: jax.Array | int) -> jax.Array | None:
    """The positions of the training batch of `step`, int32 `[batch_size, seq_len]`, or
    None without `randomized_positions`.

    Each row is a sorted uniformly random `seq_len`-subset of
    `[0, randomized_positions)` (`jax_posenc.content.randomized_positions`), a pure
    function of `config.seed` and `step` (which may be traced), so every process and
    a resumed run draw the same positions.
    """
    if not config.randomized_positions:
        return None
    key = jax.random.fold_in(jax.random.key(config.seed), _POSITIONS_STREAM)
    return content.randomized_positions(
        jax.random.fold_in(key, step),
        config.batch_size,
        config.seq_len,
        config.randomized_positions,
    )


def _checked_jit(fn: Callable, mesh: Mesh, *, out_shardings, **jit_kwargs) -> Callable:
    """`jax.jit(checkify(fn))` for user checks: returns `(error, out)`.

    Functionalizing the checks `mode="error"` learned tables stage lets them run under
    jit. Where a function has no checks, checkify leaves its computation unchanged and
    the error has no leaves, so reading it on the host transfers nothing (measured on
    the study's model: the same compiled HLO and step time as plain `jax.jit`). With
    checks, reading the error waits for the step; the checks themselves add two
    reductions over the positions.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    checked = checkify.checkify(fn, errors=checkify.user_checks)
    return jax.jit(checked, out_shardings=(replicated, out_shardings), **jit_kwargs)


def _raise_failed_check(error: checkify.Error, where: str) -> None:
    """Raises ValueError naming `where` when a run-time check in `error` failed."""
    message = error.get()
    if message is not None:
        raise ValueError(f"{where}: {message}")


# Models, configs and meshes are hashable, so the jitted functions below are built once
# per combination and their compiled executables are reused by later `train` calls
# (a resumed run, or evaluation at a length already seen).
_jit_cache = functools.lru_cache(maxsize=64)


@_jit_cache
def _init_fn(model: nn.Module, config: TrainConfig, mesh: Mesh):
    optimizer = make_optimizer(config)

    def init():
        dummy = jnp.zeros((1, config.seq_len), jnp.int32)
        params = model.init(jax.random.key(config.seed), dummy)
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

    return _checked_jit(init, mesh, out_shardings=NamedSharding(mesh, PartitionSpec()))


def init_state(model: nn.Module, config: TrainConfig, mesh: Mesh) -> TrainState:
    """Initializes parameters (seeded by `config.seed`) and optimizer state, replicated."""
    error, state = _init_fn(model, config, mesh)()
    _raise_failed_check(error, "initializing the model")
    return state


@_jit_cache
def make_train_step(model: nn.Module, config: TrainConfig, mesh: Mesh):
    """A jitted `step(state, batch) -> (error, (state, metrics))`, batch sharded on `data`.

    `error` is the `checkify.Error` of the step's run-time checks (see `_checked_jit`).
    The loss is the mean over the global batch, so gradients (an all-reduce that XLA
    inserts from the shardings) equal those of single-device training.
    """
    optimizer = make_optimizer(config)
    schedule = learning_rate_schedule(config)

    def step(state: TrainState, batch: jax.Array):
        positions = training_positions(config, state.step)

        def loss_fn(params):
            return next_token_losses(model, params, batch, positions).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state.step),
        }
        return TrainState(state.step + 1, params, opt_state), metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return _checked_jit(
        step,
        mesh,
        in_shardings=(replicated, NamedSharding(mesh, PartitionSpec(DATA_AXIS))),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


@_jit_cache
def _total_loss_fn(model: nn.Module, mesh: Mesh, with_positions: bool = False):
    """Jitted `(params, windows, weights[, positions]) -> (error, sum of the weighted
    token losses)`."""
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec(DATA_AXIS))

    def total_loss(params, batch, weights, positions=None):
        return (next_token_losses(model, params, batch, positions) * weights).sum()

    shardings = (replicated, sharded, sharded) + ((sharded,) if with_positions else ())
    return _checked_jit(total_loss, mesh, in_shardings=shardings, out_shardings=replicated)


def evaluate(
    model: nn.Module,
    params,
    windows: np.ndarray,
    *,
    batch_size: int,
    mesh: Mesh,
    token_weights: np.ndarray | None = None,
    positions: np.ndarray | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> float:
    """Mean next-token loss (nats per token) over all `windows` `[N, L + 1]`.

    Windows are processed `batch_size` at a time (at most all of them, rounded up to a
    multiple of the mesh size); the last batch is padded with zero-weight rows.

    Args:
      model, params: the model and its variables.
      windows: integer `[N, L + 1]`; inputs are `[:, :-1]`, targets `[:, 1:]`.
      batch_size: windows per forward pass.
      mesh: device mesh with a `data` axis.
      token_weights: `[N, L]` weight of each prediction, None for all ones; the result
        is the weighted mean (sliding windows score only their last predictions, see
        `jax_posenc.data.sliding_windows`).
      positions: `[N, L]` integer positions of each window's inputs (e.g. randomized
        positions, as Ruoss et al. evaluate); None for the model's default 0..L-1.
      callback: called as `callback(windows_done, N)` after every batch.
    """
    batch_size = min(_checks.check_positive_int("batch_size", batch_size), len(windows))
    batch_size = -(-batch_size // mesh.size) * mesh.size
    if token_weights is None:
        token_weights = np.ones((len(windows), windows.shape[1] - 1), np.float32)
    if token_weights.shape != (len(windows), windows.shape[1] - 1):
        raise ValueError(
            f"token_weights must have shape {(len(windows), windows.shape[1] - 1)} to match "
            f"windows {windows.shape}, got {token_weights.shape}"
        )
    if positions is not None:
        positions = np.asarray(positions)
        if positions.shape != token_weights.shape or not np.issubdtype(positions.dtype, np.integer):
            raise ValueError(
                f"positions must be integer with shape {token_weights.shape} to match "
                f"windows {windows.shape}, got {positions.dtype} {positions.shape}"
            )
    total_loss = _total_loss_fn(model, mesh, positions is not None)
    total = 0.0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        weights = np.zeros((batch_size, windows.shape[1] - 1), np.float32)
        weights[: len(chunk)] = token_weights[start : start + batch_size]
        padding = np.zeros((batch_size - len(chunk), windows.shape[1]), windows.dtype)
        chunk = np.concatenate([chunk, padding])
        arguments = [shard_batch(chunk, mesh), shard_batch(weights, mesh)]
        if positions is not None:
            # Padding rows (zero weight) take the positions 0..L-1.
            rows = np.broadcast_to(np.arange(windows.shape[1] - 1, dtype=np.int32), weights.shape)
            rows = rows.copy()
            given = positions[start : start + batch_size]
            rows[: len(given)] = given
            arguments.append(shard_batch(rows, mesh))
        error, loss = total_loss(params, *arguments)
        _raise_failed_check(error, f"evaluating windows of {windows.shape[1] - 1} tokens")
        total += float(loss)
        if callback is not None:
            callback(min(start + batch_size, len(windows)), len(windows))
    return total / float(np.sum(token_weights, dtype=np.float64))


def _config_record(model: nn.Module, config: TrainConfig) -> dict[str, Any]:
    return json.loads(
        json.dumps({"model": repr(model), "train": dataclasses.asdict(config)}, default=repr)
    )


def _check_same_config(directory: Path, record: dict[str, Any]) -> None:
    path = directory / "train_config.json"
    if path.exists():
        saved = _files.read_json(path)
        if isinstance(saved.get("train"), dict):
            # A field added since the run started held its default then.
            defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
            for key, value in record["train"].items():
                if key not in saved["train"] and value == defaults.get(key):
                    saved["train"][key] = value
        if saved != record:
            saved_train = saved.get("train")
            saved_train = saved_train if isinstance(saved_train, dict) else {}
            changed = [
                f"train.{key}"
                for key, value in record["train"].items()
                if saved_train.get(key) != value
            ]
            if saved.get("model") != record["model"]:
                changed.append("model")
            raise ValueError(
                f"checkpoint directory {str(directory)!r} holds a run with a different "
                f"configuration (differs in: {', '.join(changed)}); use another directory "
                "or the same configuration to resume"
            )
    elif jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keeps the metric lines up to `last_step`: a resumed run rewrites what follows."""
    if path.exists():
        records = _files.read_json_lines(path)
        for number, record in enumerate(records, 1):
            if not isinstance(record.get("step"), int):
                raise ValueError(f"cannot read {str(path)!r}: record {number} has no integer step")
        kept = [record for record in records if record["step"] <= last_step]
        path.write_text("".join(json.dumps(record) + "\n" for record in kept))


def _reason(error: BaseException) -> str:
    """The first line of an error message, at most 300 characters (TensorStore's run long)."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 300 else text[:297] + "..."


def _is_abandoned_read(unraisable) -> bool:
    """Orbax reads a checkpoint's arrays concurrently and closes its event loop at the
    first error; the other reads then report into the closed loop ("Event loop is
    closed") or are collected unawaited, each as a stderr traceback that names no file."""
    return isinstance(unraisable.object, types.CoroutineType) or (
        isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"
    )


@contextlib.contextmanager
def _quiet_abandoned_reads():
    """Drops the reports of reads a failed restore abandoned (see `_is_abandoned_read`)."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_abandoned_read(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
            yield
    finally:
        sys.unraisablehook = previous


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: Any = None
) -> tuple[int, Any] | None:
    """The newest checkpoint of `manager` that can be restored, as `(step, state)`.

    A checkpoint that fails to restore (a file cut short or lost) is skipped with a
    `UserWarning` naming its step, and the one before it is tried. Returns None when
    `manager` holds no checkpoint.

    Args:
      manager: an orbax `CheckpointManager`.
      abstract_state: the restored tree's structure, shapes and shardings (e.g.
        `jax.tree.map(ocp.utils.to_shape_dtype_struct, state)`); None restores the saved
        structure as NumPy/JAX arrays.

    Raises:
      ValueError: checkpoints exist but none of them can be restored.
    """
    failures = []
    with _quiet_abandoned_reads():
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
            except Exception as error:  # TensorStore, OCDBT and JSON errors differ by file.
                failures.append(f"step {step}: {_reason(error)}")
                warnings.warn(
                    f"checkpoint of step {step} in {str(manager.directory)!r} cannot be "
                    f"restored ({_reason(error)}); falling back to the previous checkpoint",
                    UserWarning,
                    stacklevel=3,
                )
                continue
            if failures:
                gc.collect()  # the abandoned reads, while their reports are dropped
            return step, state
        if failures:
            gc.collect()
    if failures:
        raise ValueError(
            f"no checkpoint in {str(manager.directory)!r} can be restored ("
            + "; ".join(failures)
            + "); delete the folder to start over"
        )
    return None


def train(
    model: nn.Module,
    config: TrainConfig,
    tokens: np.ndarray,
    *,
    mesh: Mesh | None = None,
    checkpoint_dir: str | Path | None = None,
    metrics_path: str | Path | None = None,
    progress: bool = True,
    description: str = "train",
    callback: Callable[[int, dict[str, jax.Array]], None] | None = None,
) -> TrainResult:
    """Trains `model` on random windows of `tokens`, resuming from `checkpoint_dir`.

    Args:
      model: a `Transformer` (or any linen module mapping tokens to logits).
      config: hyperparameters.
      tokens: `[N]` training byte stream (see `jax_posenc.data`).
      mesh: device mesh with a `data` axis; all devices when None.
      checkpoint_dir: where orbax checkpoints go; the latest intact one is restored
        first (see `restore_latest`). None disables checkpointing.
      metrics_path: JSON-lines file for metrics (rewritten from the resumed step on).
      progress: show a tqdm progress bar (process 0 only).
      description: progress-bar label.
      callback: called as `callback(step, metrics)` after every step (step counted
        from 1); an exception raised there stops training like a crash would.

    Returns:
      The final `TrainState` and the metric lines logged by this call.
    """
    mesh = data_mesh() if mesh is None else mesh
    _check_divisible(config.batch_size, mesh)
    check_randomized_model(model, config)
    if checkpoint_dir is not None:
        directory = Path(checkpoint_dir).absolute()
        _check_same_config(directory, _config_record(model, config))
    state = init_state(model, config, mesh)
    manager = None
    if checkpoint_dir is not None:
        manager = ocp.CheckpointManager(
            directory / "checkpoints", options=ocp.CheckpointManagerOptions(max_to_keep=2)
        )
        restored = restore_latest(manager, jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
        if restored is not None:
            step, state = restored
            # Later (corrupted) checkpoints are replaced by the rerun of their steps.
            for later in manager.all_steps():
                if later > step:
                    manager.delete(later)
    start = int(state.step)
    is_main = jax.process_index() == 0
    metrics_file = Path(metrics_path) if metrics_path is not None and is_main else None
    if metrics_file is not None:
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_file, start)

    train_step = make_train_step(model, config, mesh)
    history: list[dict[str, float]] = []
    bar = tqdm(
        total=config.steps,
        initial=start,
        desc=description,
        disable=not (progress and is_main),
        dynamic_ncols=True,
    )
    tick, tick_step = time.perf_counter(), start
    try:
        for step in range(start, config.steps):
            batch = data.train_batch(
                tokens,
                step=step,
                batch_size=config.batch_size,
                seq_len=config.seq_len,
                seed=config.seed,
            )
            error, (state, metrics) = train_step(state, shard_batch(batch, mesh))
            done = step + 1
            _raise_failed_check(error, f"training step {done}")
            if callback is not None:
                callback(done, metrics)
            if done % config.log_every == 0 or done == config.steps:
                line = {"step": done, **{k: float(v) for k, v in metrics.items()}}
                now = time.perf_counter()
                line["tokens_per_s"] = (
                    (done - tick_step) * config.batch_size * config.seq_len / (now - tick)
                )
                tick, tick_step = now, done
                history.append(line)
                if not math.isfinite(line["loss"]):
                    raise FloatingPointError(f"loss became {line['loss']} at step {done}")
                bar.set_postfix(loss=f"{line['loss']:.4f}", tok_s=f"{line['tokens_per_s']:.0f}")
                if metrics_file is not None:
                    with metrics_file.open("a") as handle:
                        handle.write(json.dumps(line) + "\n")
            bar.update(1)
            if manager is not None and (
                done % config.checkpoint_every == 0 or done == config.steps
            ):
                manager.save(done, args=ocp.args.StandardSave(state))
    finally:
        bar.close()
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
    return TrainResult(state, history)
