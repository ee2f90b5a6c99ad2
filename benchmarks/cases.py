"""The benchmark cases of `python -m benchmarks`, built for a mode ("quick" or "full").

Every case names the same-run references it is reported against (see
`benchmarks.runner`): a jitted copy of the same tensor for the elementwise
encodings, the hand-written tutorial form from `benchmarks/tutorial.py`, and `xla`
attention for the blockwise one. With torch installed (the `bench` extra) and on the CPU
backend, the `torch` group compares the library with PyTorch's best forms
(`benchmarks/torch_baselines.py`) in the same run.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np

import jax_posenc as pe
from benchmarks import runner, tutorial
from benchmarks.runner import Case
from jax_posenc import study, train
from jax_posenc.model import Transformer

TABLE_DIM = 128
HEADS, HEAD_DIM = 8, 128
TRAIN_OVERRIDES = {"quick": {"batch_size": 8}, "full": {}}  # of the study's defaults
ROPE_SHAPES = {
    "quick": ((4, 2048, 16, 128),),
    "full": ((4, 2048, 16, 128), (1, 32768, 8, 128)),
}
# The shape of the issue's H100 reference figures (jitted copy 0.49 ms in bf16).
GPU_ROPE_SHAPE = (8, 8192, 32, 128)
BIAS_LENGTH = {"quick": 1024, "full": 2048}
LONG_ALIBI_LENGTH = 16384
BIAS_PASSES = {"quick": ("fwd",), "full": ("fwd", "fwd+bwd")}
TORCH_LENGTHS = {"quick": (1024,), "full": (1024, 2048, 4096, 8192)}
TORCH_HEAD_DIMS = (64, 128)
TORCH_PASSES = {"quick": ("fwd",), "full": ("fwd", "fwd+bwd")}
# SDPA's materialized [1, H, L, L] float32 bias is 2 GiB at L = 8k.
SDPA_BIAS_MAX_LENGTH = 4096
T5_BUCKETS, T5_MAX_DISTANCE = 32, 128
ATTENTION_LENGTHS = {
    "quick": {"fwd": (512, 1024, 2048), "fwd+bwd": (512, 1024)},
    "full": {"fwd": (1024, 2048, 4096, 8192, 16384), "fwd+bwd": (1024, 2048, 4096, 8192, 16384)},
}

GROUPS = {
    "sinusoidal": (
        "Sinusoidal table `[L, 128]` float32 from integer positions `[L]`. `÷ copy`: a jitted "
        "copy of a tensor of the table's shape; `÷ tutorial`: the Annotated-Transformer form."
    ),
    "rope": (
        "`apply_rope(x [B, S, H, D], positions [B, S])`: layouts `half` and `interleaved`, "
        "partial rotary (half the head dim), and each scaling (half layout). `÷ copy`: a "
        "jitted copy of x (the memory-bandwidth floor); `÷ tutorial`: sin/cos computed in "
        "the forward pass with concatenation and `rotate_half` (half, partial and the "
        "scalings, whose tutorial forms differ only in the host-side frequencies) or a "
        "complex multiply (interleaved). GB/s counts x, positions and the output once."
    ),
    "bias": (
        "Each registered additive bias in causal attention (shapes as in `attention`): "
        "`blockwise` evaluates `bias_fn` per block inside blockwise attention, `xla` "
        "materializes the `[1, H, L, L]` bias with the full logit matrix; `÷ tutorial` "
        "(ALiBi) is a hand-written `[H, L, L]` table added to plain softmax attention; "
        "`cudnn` (GPU only) `jax.nn.dot_product_attention` with the ALiBi table as `bias`. "
        "The full run adds ALiBi at L = 16k (the long-context point)."
    ),
    "train": (
        "One AdamW step (forward, backward, update) of the study's model and batch "
        "(`StudyConfig` defaults; batch 8 in quick mode) per encoding of the study (quick "
        "mode: `none` and one per kind of contribution), on random byte tokens; items/s = "
        "tokens per second."
    ),
    "attention": (
        f"Causal attention, batch 1, {HEADS} heads, head_dim {HEAD_DIM} (float32 on CPU, "
        "bfloat16 on GPU), forward (`fwd`) and forward + backward (`fwd+bwd`, gradients of "
        "the summed output for q, k, v). `blockwise` is `dot_product_attention("
        "implementation='blockwise')`, `xla` the same function with the full logit matrix, "
        "`cudnn` (GPU only) `jax.nn.dot_product_attention(implementation='cudnn')`. FLOP/s "
        "counts the useful causal FLOPs (half the square). Programs over the memory budget "
        "are compiled for their memory but not run."
    ),
    "torch": (
        f"The library against PyTorch on the CPU, float32, batch 1, {HEADS} heads, causal, "
        "forward (`fwd`) and forward + backward (`fwd+bwd`, gradients for q, k, v), torch "
        "pinned to as many threads as JAX's CPU client uses (OpenMP waiting passively) and "
        "flushing denormals to zero like XLA. "
        "Rows `torch/<term>/<pass>/D<head_dim>/<L>` are the library's default path: "
        "`dot_product_attention(q, k, v, bias_fn=..., causal=True)` (implementation "
        "'auto', default block sizes and positions) with the ALiBi or causal T5 (32 "
        "buckets, max distance 128) `bias_fn`, or without one (`causal`), and "
        "`apply_rope_qk` (`rope`, q and k `[1, L, H, D]`). `÷ flex`: compiled "
        "FlexAttention with a causal block mask and the term as `score_mod` (forward only: "
        "torch 2.x has no FlexAttention backward on the CPU); `÷ sdpa+bias`: SDPA with the "
        "ALiBi or T5 bias and the causal mask materialized once as `[1, H, L, L]` "
        f"(L <= {SDPA_BIAS_MAX_LENGTH}; the fwd+bwd baseline); `÷ no bias`: the library's "
        "own causal attention without a bias; "
        "`÷ sdpa`: SDPA's causal path; `÷ hf` / `÷ hf compiled`: Hugging Face's RoPE "
        "formula (cos/sin per call, `rotate_half`), eager and `torch.compile`d. Ratios "
        "below 1 mean the library is faster. The torch rows' compile time is their first "
        "call."
    ),
}


def _shape_name(shape: tuple[int, ...]) -> str:
    return "x".join(str(size) for size in shape)


def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


@functools.cache
def _host_normal(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _random(shape: tuple[int, ...], dtype, seed: int = 0) -> jax.Array:
    """Standard normal inputs; drawn once per (shape, seed) on the host, shared by the cases."""
    return jnp.asarray(_host_normal(shape, seed), dtype=dtype)


def copy_case(shape: tuple[int, ...], dtype) -> Case:
    """A jitted copy of a `shape` tensor: reads and writes every byte once."""
    return Case(
        name=f"copy/{_dtype_name(dtype)}/{_shape_name(shape)}",
        group="reference",
        fn=jnp.copy,
        make_args=lambda: (_random(shape, dtype),),
        memory_bound=True,
    )


def sinusoidal_cases(mode: str) -> list[Case]:
    """Table generation, library vs the tutorial form, at L = 2k and 32k."""
    cases = []
    for length in (2048, 32768):

        def make_args(length=length):
            return (jnp.arange(length, dtype=jnp.int32),)

        tutorial_case = Case(
            name=f"tutorial/sinusoidal/{length}x{TABLE_DIM}",
            group="reference",
            fn=lambda positions: tutorial.sinusoidal_table(positions, TABLE_DIM),
            make_args=make_args,
            memory_bound=True,
        )
        cases.append(
            Case(
                name=f"sinusoidal/{length}x{TABLE_DIM}",
                group="sinusoidal",
                fn=lambda positions: pe.sinusoidal_encoding(positions, TABLE_DIM),
                make_args=make_args,
                references=(
                    ("copy", copy_case((length, TABLE_DIM), jnp.float32)),
                    ("tutorial", tutorial_case),
                ),
                memory_bound=True,
            )
        )
    return cases


def _scalings(rotary_dim: int) -> dict[str, object]:
    """One spec per scaling family, with settings that make each of them active."""
    pairs = rotary_dim // 2
    return {
        "linear": pe.LinearScaling(4.0),
        "ntk": pe.NTKScaling(4.0),
        "dynamic_ntk": pe.DynamicNTKScaling(4.0, 1024),
        "yarn": pe.YarnScaling(4.0, 1024),
        "llama3": pe.Llama3Scaling(8.0, 1.0, 4.0, 1024),
        "longrope": pe.LongRopeScaling(
            tuple(1.0 + i / pairs for i in range(pairs)),
            tuple(1.0 + 8.0 * i / pairs for i in range(pairs)),
            1024,
        ),
    }


def _rope_inputs(shape: tuple[int, ...], dtype):
    def make_args():
        positions = jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape[:2])
        return _random(shape, dtype), positions

    return make_args


def _rope_variants(mode: str, dtype, shape: tuple[int, ...]):
    """(variant, apply_rope keywords, tutorial variant, tutorial form) for one dtype."""
    head_dim = shape[-1]
    partial_dim = head_dim // 2
    partial = functools.partial(tutorial.rope_partial, rotary_dim=partial_dim)
    variants = [
        ("half", {"layout": "half"}, "half", tutorial.rope_rotate_half),
        ("interleaved", {"layout": "interleaved"}, "interleaved", tutorial.rope_complex),
        (f"partial{partial_dim}", {"rotary_dim": partial_dim}, f"partial{partial_dim}", partial),
    ]
    if mode == "full" or dtype == jnp.float32:
        for name, spec in _scalings(head_dim).items():
            options = {"scaling": spec}
            if spec.depends_on_seq_len:  # a static length keeps the angles exact under jit
                options["seq_len"] = shape[1]
            variants.append((f"scaling={name}", options, "half", tutorial.rope_rotate_half))
    return variants


def rope_cases(mode: str) -> list[Case]:
    """`apply_rope`: layouts, partial rotary and every scaling, float32 and bfloat16."""
    shapes = list(ROPE_SHAPES[mode]) + ([GPU_ROPE_SHAPE] if _on_gpu() else [])
    cases = []
    for shape in shapes:
        for dtype in (jnp.float32, jnp.bfloat16):
            make_args = _rope_inputs(shape, dtype)
            suffix = f"{_dtype_name(dtype)}/{_shape_name(shape)}"
            for variant, options, tutorial_variant, form in _rope_variants(mode, dtype, shape):
                tutorial_case = Case(
                    name=f"tutorial/rope/{tutorial_variant}/{suffix}",
                    group="reference",
                    fn=form,
                    make_args=make_args,
                    memory_bound=True,
                )
                cases.append(
                    Case(
                        name=f"rope/{variant}/{suffix}",
                        group="rope",
                        fn=functools.partial(pe.apply_rope, **options),
                        make_args=make_args,
                        references=(
                            ("copy", copy_case(shape, dtype)),
                            ("tutorial", tutorial_case),
                        ),
                        memory_bound=True,
                    )
                )
    return cases


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def attention_dtype():
    """bfloat16 on GPU (what cuDNN runs), float32 on CPU (where bfloat16 is emulated)."""
    return jnp.bfloat16 if _on_gpu() else jnp.float32


def attention_inputs(length: int, dtype, batch: int = 1):
    """`make_args` for q, k, v of shape `[batch, length, HEADS, HEAD_DIM]`."""

    def make_args():
        shape = (batch, length, HEADS, HEAD_DIM)
        return tuple(_random(shape, dtype, seed) for seed in range(3))

    return make_args


def with_backward(forward, argnums: tuple[int, ...] | None = None):
    """`fn(*args) -> gradients of sum(forward(*args))` for `argnums` (default: all).

    Every output of `forward` (an array or a tuple of arrays) enters the sum.
    """

    def loss(*args):
        return sum(out.astype(jnp.float32).sum() for out in jax.tree.leaves(forward(*args)))

    def gradients(*args):
        wanted = tuple(range(len(args))) if argnums is None else argnums
        return jax.grad(loss, argnums=wanted)(*args)

    return gradients


PASSES = {"fwd": (lambda forward: forward, 1.0), "fwd+bwd": (with_backward, 3.5)}


def _causal_flops(length: int, batch: int = 1) -> float:
    """Useful FLOPs of causal attention forward: q.k and p.v over half the square."""
    return 2.0 * batch * HEADS * length * length * HEAD_DIM


def _timed_attention(
    name: str, group: str, forward, make_args, pass_name: str, length: int, series=None
) -> Case:
    """A causal attention case of one pass, counted in useful FLOPs."""
    transform, flop_factor = PASSES[pass_name]
    return Case(
        name=name,
        group=group,
        fn=transform(forward),
        make_args=make_args,
        flops=flop_factor * _causal_flops(length),
        series=series,
        size=length if series else None,
        listed=True,
    )


def _attention_case(pass_name: str, implementation: str, forward, length: int, dtype) -> Case:
    return _timed_attention(
        f"attention/{pass_name}/{implementation}/{length}",
        "attention",
        forward,
        attention_inputs(length, dtype),
        pass_name,
        length,
        series=f"attention/{pass_name}/{implementation}",
    )


def _xla_attention(q, k, v):
    return pe.dot_product_attention(q, k, v, causal=True)


def _blockwise_attention(q, k, v):
    return pe.dot_product_attention(q, k, v, causal=True, implementation="blockwise")


def _cudnn_attention(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def attention_cases(mode: str) -> list[Case]:
    """blockwise vs xla (and cuDNN on GPU), forward and forward + backward, over L."""
    dtype = attention_dtype()
    cases = []
    for pass_name in PASSES:
        for length in ATTENTION_LENGTHS[mode][pass_name]:
            references = [("xla", _attention_case(pass_name, "xla", _xla_attention, length, dtype))]
            if _on_gpu():
                cudnn = _attention_case(pass_name, "cudnn", _cudnn_attention, length, dtype)
                references.append(("cudnn", cudnn))
            blockwise = _attention_case(pass_name, "blockwise", _blockwise_attention, length, dtype)
            cases.append(dataclasses.replace(blockwise, references=tuple(references), listed=False))
    return cases


def _attend_with_bias(module, q, k, v, implementation: str):
    """Attention with `module.bias_fn()` (called inside `module.apply`)."""
    return pe.dot_product_attention(
        q, k, v, bias_fn=module.bias_fn(), causal=True, implementation=implementation
    )


def _bias_modules() -> dict[str, object]:
    """One linen module per registered encoding that contributes a logit bias."""
    spec = pe.EncodingSpec(
        d_model=HEADS * HEAD_DIM, num_heads=HEADS, head_dim=HEAD_DIM, max_positions=1 << 20
    )
    return {
        name: pe.get_encoding(name).logit_bias(spec)
        for name in pe.available_encodings()
        if pe.get_encoding(name).logit_bias is not None
    }


def _bias_case(name, module, implementation, pass_name, length, dtype) -> Case:
    make_qkv = attention_inputs(length, dtype)

    def make_args():
        positions = jnp.arange(8)[None]
        params = module.init(jax.random.key(2), positions, positions)
        return (params, *make_qkv())

    def forward(params, q, k, v):
        return module.apply(
            params, q, k, v, implementation=implementation, method=_attend_with_bias
        )

    name = f"bias/{name}/{pass_name}/{implementation}/{length}"
    return _timed_attention(name, "bias", forward, make_args, pass_name, length)


def _cudnn_alibi_attention(q, k, v):
    positions = jnp.arange(q.shape[1])[None]
    table = pe.alibi_bias(positions, positions, pe.alibi_slopes(q.shape[2])).astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=table, is_causal=True, implementation="cudnn")


def _bias_runs(mode: str) -> list[tuple[str, int, tuple[str, ...] | None]]:
    """(pass, L, encodings or None for all): L = 2k for every bias; ALiBi also at 16k."""
    runs = [(pass_name, BIAS_LENGTH[mode], None) for pass_name in BIAS_PASSES[mode]]
    if mode == "full":
        runs.append(("fwd", LONG_ALIBI_LENGTH, ("alibi",)))
    return runs


def bias_cases(mode: str) -> list[Case]:
    """Each registered additive bias, materialized (xla) vs evaluated per block."""
    dtype = attention_dtype()
    cases = []
    for pass_name, length, only in _bias_runs(mode):
        for name, module in _bias_modules().items():
            if only is not None and name not in only:
                continue
            references = [("xla", _bias_case(name, module, "xla", pass_name, length, dtype))]
            if name == "alibi":
                tutorial_case = Case(
                    name=f"tutorial/alibi/{pass_name}/{length}",
                    group="reference",
                    fn=PASSES[pass_name][0](tutorial.alibi_attention),
                    make_args=attention_inputs(length, dtype),
                )
                references.append(("tutorial", tutorial_case))
                if _on_gpu():
                    cudnn = _timed_attention(
                        f"bias/alibi/{pass_name}/cudnn/{length}",
                        "bias",
                        _cudnn_alibi_attention,
                        attention_inputs(length, dtype),
                        pass_name,
                        length,
                    )
                    references.append(("cudnn", cudnn))
            blockwise = _bias_case(name, module, "blockwise", pass_name, length, dtype)
            cases.append(dataclasses.replace(blockwise, references=tuple(references), listed=False))
    return cases


def torch_available() -> bool:
    """Whether torch is installed (found without importing it)."""
    return importlib.util.find_spec("torch") is not None


def _torch_threads() -> int:
    """torch's intra-op threads: as many as the cores JAX's CPU client uses."""
    return runner.environment()["cpu_cores"]


def _torch_baselines():
    """`benchmarks.torch_baselines`, imported on first use (the suite loads without torch).

    torch's OpenMP threads wait passively unless `OMP_WAIT_POLICY` says otherwise (it
    must be set before torch loads): spinning waits starve the other framework's
    threads in this interleaved run, and on a shared machine they made eager torch up
    to 50x slower.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from benchmarks import torch_baselines

    torch_baselines.setup(threads=_torch_threads())
    return torch_baselines


def _call(function, *args):
    """Calls a prepared torch function (the first of the arguments `make_args` returns)."""
    return function(*args)


def _torch_case(name: str, prepare, arrays, backward: bool, size: int, **fields) -> Case:
    """A torch reference; `prepare(torch_baselines)` returns the forward pass.

    `arrays()` gives the float host inputs `[B, L, H, D]` (passed heads-first, with
    gradients when `backward`), followed by any other inputs `prepare` needs.
    """

    def make_args():
        baselines = _torch_baselines()
        forward, *extra = prepare(baselines)
        function = baselines.with_backward(forward) if backward else forward
        tensors = [baselines.heads_first(a, requires_grad=backward) for a in arrays()]
        return (function, *tensors, *extra)

    return Case(
        name=name,
        group="torch",
        fn=_call,
        make_args=make_args,
        size=size,
        listed=True,
        framework="torch",
        **fields,
    )


def _t5_settings(head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A random `[buckets, H]` T5 table and the causal bucket of each distance 0..128."""
    table = 0.5 * _host_normal((T5_BUCKETS, HEADS), 100 + head_dim)
    buckets = pe.t5_relative_position_bucket(
        -np.arange(T5_MAX_DISTANCE + 1, dtype=np.int32),
        bidirectional=False,
        num_buckets=T5_BUCKETS,
        max_distance=T5_MAX_DISTANCE,
    )
    return table, np.asarray(buckets)


def _default_with(bias_fn):
    """Causal `dot_product_attention` as a user calls it: implementation "auto", default
    block sizes, default positions."""

    def attend(q, k, v):
        return pe.dot_product_attention(q, k, v, bias_fn=bias_fn, causal=True)

    return attend


def _torch_attention_cases(pass_name: str, head_dim: int, length: int) -> list[Case]:
    """ALiBi, T5 and no term: blockwise attention against FlexAttention / SDPA."""
    backward = pass_name == "fwd+bwd"
    flops = PASSES[pass_name][1] * 2.0 * HEADS * length * length * head_dim
    suffix = f"{pass_name}/D{head_dim}/{length}"
    slopes = pe.alibi_slopes(HEADS)
    table, buckets = _t5_settings(head_dim)

    def qkv():
        return tuple(_host_normal((1, length, HEADS, head_dim), seed) for seed in range(3))

    def library(term, forward, references, table=None):
        def make_args():
            return tuple(jnp.asarray(a) for a in (*qkv(), *([] if table is None else [table])))

        return Case(
            name=f"torch/{term}/{suffix}",
            group="torch",
            fn=with_backward(forward, argnums=(0, 1, 2)) if backward else forward,
            make_args=make_args,
            references=tuple(references),
            flops=flops,
            series=f"torch/{term}/{pass_name}/D{head_dim}/jax",
            size=length,
        )

    def baseline(term, label, prepare):
        series = f"torch/{term}/{pass_name}/D{head_dim}/{label}"
        name = f"torch/{term}/{suffix}/{label}"
        return label, _torch_case(name, prepare, qkv, backward, length, flops=flops, series=series)

    def t5(q, k, v, table):
        bias_fn = functools.partial(
            pe.t5_bias, table, bidirectional=False, max_distance=T5_MAX_DISTANCE
        )
        return _default_with(bias_fn)(q, k, v)

    def no_bias():
        """The library's own causal attention without a bias, timed alongside."""
        forward = _default_with(None)

        def make_args():
            return tuple(jnp.asarray(a) for a in qkv())

        return "no bias", Case(
            name=f"torch/causal/{suffix}/no-bias",
            group="torch",
            fn=with_backward(forward, argnums=(0, 1, 2)) if backward else forward,
            make_args=make_args,
        )

    def references(term, score_mod, causal_bias):
        """FlexAttention (forward only: it has no CPU backward), SDPA + bias, and the
        library without the bias."""
        refs = []
        if not backward:
            refs.append(baseline(term, "flex", lambda b: [b.flex(length, score_mod(b))]))
        if length <= SDPA_BIAS_MAX_LENGTH:
            refs.append(baseline(term, "sdpa+bias", lambda b: [b.sdpa_with_bias(causal_bias(b))]))
        refs.append(no_bias())
        return refs

    alibi_refs = references(
        "alibi",
        lambda b: b.alibi_score_mod(slopes),
        lambda b: b.alibi_causal_bias(slopes, length),
    )
    t5_refs = references(
        "t5",
        lambda b: b.t5_score_mod(table, buckets),
        lambda b: b.t5_causal_bias(table, buckets, length),
    )
    sdpa = [baseline("causal", "sdpa", lambda b: [b.sdpa_causal])]
    alibi = _default_with(functools.partial(pe.alibi_bias, slopes=slopes))
    return [
        library("alibi", alibi, alibi_refs),
        library("t5", t5, t5_refs, table=table),
        library("causal", _default_with(None), sdpa),
    ]


def _torch_rope_case(pass_name: str, head_dim: int, length: int) -> Case:
    """`apply_rope_qk` against Hugging Face's formula, eager and compiled."""
    backward = pass_name == "fwd+bwd"
    suffix = f"{pass_name}/D{head_dim}/{length}"
    positions = np.arange(length, dtype=np.int32)[None]

    def qk():
        return tuple(_host_normal((1, length, HEADS, head_dim), seed) for seed in range(2))

    def make_args():
        return (*(jnp.asarray(a) for a in qk()), jnp.asarray(positions))

    def hf(label, compiled):
        def prepare(b):
            rope = b.compiled(b.hf_rope) if compiled else b.hf_rope
            return [rope, b.positions(positions), b.hf_inv_freq(head_dim)]

        tag = label.replace(" ", "-")
        name = f"torch/rope/{suffix}/{tag}"
        series = f"torch/rope/{pass_name}/D{head_dim}/{tag}"
        return label, _torch_case(name, prepare, qk, backward, length, series=series)

    forward = pe.apply_rope_qk
    return Case(
        name=f"torch/rope/{suffix}",
        group="torch",
        fn=with_backward(forward, argnums=(0, 1)) if backward else forward,
        make_args=make_args,
        references=(hf("hf", False), hf("hf compiled", True)),
        series=f"torch/rope/{pass_name}/D{head_dim}/jax",
        size=length,
    )


def torch_cases(mode: str) -> list[Case]:
    """The torch comparison (CPU backend, torch installed; otherwise none, see `notes`)."""
    if _on_gpu() or not torch_available():
        return []
    cases = []
    for pass_name in TORCH_PASSES[mode]:
        for head_dim in TORCH_HEAD_DIMS:
            for length in TORCH_LENGTHS[mode]:
                cases += _torch_attention_cases(pass_name, head_dim, length)
                cases.append(_torch_rope_case(pass_name, head_dim, length))
    return cases


def _train_encodings(mode: str, encodings: tuple[str, ...]) -> list[str]:
    """The study's encodings; in quick mode "none" and the first of each contribution."""
    if mode == "full":
        return list(encodings)
    chosen = {"none"}
    for part in ("input_embedding", "qk_transform", "logit_bias", "relative_terms"):
        chosen.update([name for name in encodings if part in pe.get_encoding(name).contributes][:1])
    return [name for name in encodings if name in chosen]


def train_cases(mode: str) -> list[Case]:
    """One optimizer step of the study's model per encoding of the study (tokens/s)."""
    settings = study.StudyConfig(**TRAIN_OVERRIDES[mode])
    config = settings.train_config(settings.seed)
    mesh = train.data_mesh()
    cases = []
    for name in _train_encodings(mode, settings.encodings):
        model = Transformer(settings.model_config(name))
        step = train.make_train_step(model, config, mesh)

        def make_args(model=model):
            state = train.init_state(model, config, mesh)
            shape = (config.batch_size, config.seq_len + 1)
            return state, jax.random.randint(jax.random.key(3), shape, 0, 256)

        cases.append(
            Case(
                name=f"train/{name}",
                group="train",
                fn=step,
                make_args=make_args,
                items=config.batch_size * config.seq_len,
                item_unit="tokens",
            )
        )
    return cases


def build_cases(mode: str) -> list[Case]:
    """All cases of `mode` ("quick": the small sizes, minutes on a CPU; "full")."""
    if mode not in runner.MODES:
        raise ValueError(f"mode must be one of {runner.MODES}, got {mode!r}")
    return [
        *sinusoidal_cases(mode),
        *rope_cases(mode),
        *bias_cases(mode),
        *attention_cases(mode),
        *train_cases(mode),
        *torch_cases(mode),
    ]


def notes() -> list[str]:
    """Remarks recorded with the results (which comparisons this backend could run)."""
    if _on_gpu():
        return ["The torch comparison runs on the CPU backend only; it was not run."]
    notes = ["No GPU: the cuDNN attention comparison and '% of peak' bandwidth were not run."]
    if not torch_available():
        notes.append(
            "torch is not installed: the torch comparison (group `torch`) was skipped; "
            "`pip install 'jax_posenc[bench]'` adds it."
        )
    else:
        notes.append(
            f"torch {importlib.metadata.version('torch')}: {_torch_threads()} threads, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}, denormals "
            "flushed to zero (as XLA's CPU backend does)."
        )
    return notes
