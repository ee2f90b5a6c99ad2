"""Tests for the fused Pallas attention kernels (`implementation="pallas"`).

Everything runs on CPU in Pallas interpret mode (the same kernels, interpreted), at
small sizes; the Triton lowering of the GPU kernels is checked by lowering for CUDA on
this machine (`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_attention import attention_reference

import jax_posenc as pe
from jax_posenc.attention import _pallas

BIASES = ("alibi", "t5", "kerple", "fire", "dpb")


def _normal(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _qkv(batch, q_len, k_len, heads, kv_heads, dim, seed=0, dtype=jnp.float32):
    return (
        _normal(seed, (batch, q_len, heads, dim), dtype),
        _normal(seed + 1, (batch, k_len, kv_heads, dim), dtype),
        _normal(seed + 2, (batch, k_len, kv_heads, dim), dtype),
    )


def _case(name):
    """Arrays and keyword arguments of one comparison (odd lengths: not whole blocks)."""
    if name == "causal_packed_gqa":
        q, k, v = _qkv(2, 40, 40, 4, 2, 16, seed=1)
        segments = np.array([[0] * 17 + [1] * 23, [3] * 40], np.int32)
        return q, k, v, {"causal": True, "segment_ids": segments}
    # Cross attention: queries after a cache (q_len != k_len), a mask with an empty row.
    q, k, v = _qkv(2, 24, 40, 4, 4, 16, seed=2)
    mask = np.random.default_rng(3).random((2, 1, 24, 40)) > 0.3
    mask[:, :, 5] = False
    q_positions = np.stack([16 + np.arange(24), 10 + np.arange(24)]).astype(np.int32)
    return q, k, v, {"mask": mask, "q_positions": q_positions}


def _bias_module(name, heads=4):
    spec = pe.EncodingSpec(d_model=64, num_heads=heads, head_dim=16, max_positions=64)
    module = pe.get_encoding(name).logit_bias(spec)
    positions = jnp.arange(8)[None]
    params = module.init(jax.random.key(0), positions, positions)
    leaves, tree = jax.tree.flatten(params)
    # Move every parameter off its (often zero or symmetric) initial value.
    params = jax.tree.unflatten(tree, [x + 0.1 * _normal(i, x.shape) for i, x in enumerate(leaves)])
    return module, params


def _outputs_and_grads(implementation, q, k, v, params, module, kwargs, block_size=16):
    return _grad_fn(implementation, module, kwargs, block_size)(q, k, v, params)


def _grad_fn(implementation, module, kwargs, block_size=16):
    """Jitted `(q, k, v, params) -> (out, (dq, dk, dv, d_params))` of a weighted sum."""

    def loss(q, k, v, params):
        bias_fn = None if module is None else module.apply(params, method=lambda m: m.bias_fn())
        out = pe.dot_product_attention(
            q, k, v, bias_fn=bias_fn, implementation=implementation, block_size=block_size,
            **kwargs,
        )  # fmt: skip
        weights = jnp.sin(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        return jnp.sum(out.astype(jnp.float32) * weights), out

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    return lambda *args: grad(*args)[::-1]


def _assert_close(actual, expected, atol=2e-5):
    """Equal to float32 rounding, relative to each array's largest entry (a parameter
    gradient sums the whole score gradient, so its entries reach ~10)."""
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        e = np.asarray(e, np.float32)
        scale = max(1.0, float(np.abs(e).max(initial=0.0)))
        np.testing.assert_allclose(np.asarray(a, np.float32), e, atol=atol * scale, rtol=0)


# ---------------------------------------------------------------- against the xla path


# Every bias on the causal case; the cross-attention case for two, the rest marked slow
# (each comparison compiles interpreted kernels for 2-5 s of CPU).
MATRIX = [(name, "causal_packed_gqa") for name in BIASES] + [
    ("alibi", "cross_masked"),
    ("t5", "cross_masked"),
    *(pytest.param(name, "cross_masked", marks=pytest.mark.slow) for name in BIASES[2:]),
]


@pytest.mark.parametrize(("name", "case"), MATRIX)
def test_every_registered_bias_matches_xla_with_parameter_gradients(name, case):
    q, k, v, kwargs = _case(case)
    module, params = _bias_module(name)
    expected = _outputs_and_grads("xla", q, k, v, params, module, kwargs)
    actual = _outputs_and_grads("pallas", q, k, v, params, module, kwargs)
    _assert_close(actual, expected)
    param_grads = jax.tree.leaves(actual[1][3])
    if param_grads:  # learned parameters really receive gradients
        assert max(float(jnp.abs(g).max()) for g in param_grads) > 1e-3


def test_alibi_matches_a_float64_reference():
    q, k, v = _qkv(1, 37, 37, 2, 1, 16, seed=4)
    slopes = 2.0 ** (-8.0 * np.arange(1, 3) / 2)
    positions = np.arange(37)
    out = pe.dot_product_attention(
        q, k, v, bias_fn=lambda qp, kp: pe.alibi_bias(qp, kp, slopes), causal=True,
        implementation="pallas", block_size=16,
    )  # fmt: skip
    bias = -slopes[:, None, None] * np.abs(positions[:, None] - positions[None, :])
    allowed = positions[:, None] >= positions[None, :]
    expected = attention_reference(q, k, v, bias=bias[None], allowed=allowed[None, None])
    np.testing.assert_allclose(out, expected, atol=2e-6)


def test_fully_masked_rows_give_zeros_and_zero_gradients():
    q, k, v = _qkv(1, 20, 20, 2, 2, 16, seed=5)
    mask = np.ones((1, 1, 20, 20), bool)
    mask[:, :, 3] = False  # row 3 attends to nothing
    kwargs = {"mask": mask, "causal": True, "q_positions": np.arange(20) - 2}  # rows 0, 1 too
    module, params = _bias_module("t5", heads=2)
    out, grads = _outputs_and_grads("pallas", q, k, v, params, module, kwargs)
    expected = _outputs_and_grads("xla", q, k, v, params, module, kwargs)
    for leaf in jax.tree.leaves((out, grads)):
        assert np.isfinite(np.asarray(leaf)).all()
    np.testing.assert_array_equal(out[0, [0, 1, 3]], 0.0)
    np.testing.assert_array_equal(grads[0][0, [0, 1, 3]], 0.0)
    _assert_close((out, grads), expected)


@pytest.mark.parametrize(
    ("term", "value"),
    [
        ("relative_terms", pe.RelativeTerms(content_bias=jnp.zeros((2, 16)))),
        ("token_bias", pe.TokenBias(jnp.zeros((1, 2, 8)), jnp.zeros((1, 2, 8)), lambda a, b: 0.0)),
        ("alternate", pe.AlternateLogits(*_qkv(1, 8, 8, 2, 2, 16)[:2], lambda a, b: True)),
    ],
)
def test_unsupported_terms_raise_naming_the_term_and_the_alternatives(term, value):
    q, k, v = _qkv(1, 8, 8, 2, 2, 16)
    with pytest.raises(ValueError, match=f"does not support {term}.*'xla' or 'blockwise'"):
        pe.dot_product_attention(q, k, v, implementation="pallas", **{term: value})


# ---------------------------------------------------------------- RoPE inside the kernel


def _rope_alibi_loss(implementation, inv_freq, positions, rope_in_kernel):
    slopes = pe.alibi_slopes(4)

    def loss(q, k, v):
        if not rope_in_kernel:
            q = pe.apply_rope(q, positions, inv_freq=inv_freq)
            k = pe.apply_rope(k, positions, inv_freq=inv_freq)
        out = pe.dot_product_attention(
            q, k, v, bias_fn=lambda qp, kp: pe.alibi_bias(qp, kp, slopes), causal=True,
            q_positions=positions, k_positions=positions, implementation=implementation,
            block_size=16, rope_frequencies=inv_freq if rope_in_kernel else None,
        )  # fmt: skip
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


@pytest.mark.parametrize("offset", [0, 1_000_000])
def test_rope_alibi_in_one_pass_matches_apply_rope_then_xla(offset):
    q, k, v = _qkv(2, 40, 40, 4, 2, 32, seed=6)
    # rotary_dim 24 of head_dim 32: the last 8 features pass through.
    inv_freq = 10000.0 ** (-np.arange(0, 24, 2) / 24)
    positions = offset + np.arange(40)
    (_, fused), fused_grads = _rope_alibi_loss("pallas", inv_freq, positions, True)(q, k, v)
    (_, want), want_grads = _rope_alibi_loss("xla", inv_freq, positions, False)(q, k, v)
    # Far positions too: the kernel's angles are the exact ones of apply_rope.
    _assert_close((fused, fused_grads), (want, want_grads), atol=3e-5)


# ---------------------------------------------------------------- lowering for CUDA


def _lowers_for_cuda(fn, *args):
    with _pallas.lowering_platform("cuda"):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "triton" in text.lower() or "__gpu$xla.gpu.triton" in text


def _t5_lookup(table):
    """T5 written as a table lookup (a gather) over `t5_relative_position_bucket` (a
    compare-sum over 7 bucket starts, a size the Triton lowering cannot hold whole)."""

    def bias_fn(q_positions, k_positions):
        buckets = pe.t5_relative_position_bucket(k_positions[:, None] - q_positions[:, :, None])
        return jnp.swapaxes(jnp.take(table.T, buckets, axis=1, mode="clip"), 0, 1)

    return bias_fn


@pytest.mark.parametrize("kind", ["alibi_causal", "rope_alibi_segments", "t5_lookup"])
def test_kernels_lower_to_triton_for_cuda_forward_and_backward(kind):
    q, k, v = _qkv(1, 128, 128, 4, 2, 64, dtype=jnp.bfloat16)
    slopes = pe.alibi_slopes(4)
    kwargs = {"causal": True, "block_size": 32}
    bias_fn = _t5_lookup(_normal(9, (32, 4))) if kind == "t5_lookup" else None
    if kind == "rope_alibi_segments":
        kwargs["segment_ids"] = np.array([[0] * 50 + [1] * 78], np.int32)
        kwargs["rope_frequencies"] = 10000.0 ** (-np.arange(0, 64, 2) / 64)

    def loss(q, k, v):
        out = pe.dot_product_attention(
            q, k, v, bias_fn=bias_fn or (lambda qp, kp: pe.alibi_bias(qp, kp, slopes)),
            implementation="pallas", **kwargs,
        )  # fmt: skip
        return out.astype(jnp.float32).sum()

    _lowers_for_cuda(loss, q, k, v)
    _lowers_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)


def _registered_bias_loss(name, block_size, implementation="pallas"):
    module, params = _bias_module(name)

    def loss(q, k, v, params):
        bias_fn = module.apply(params, method=lambda m: m.bias_fn())
        out = pe.dot_product_attention(
            q, k, v, bias_fn=bias_fn, causal=True, implementation=implementation,
            block_size=block_size,
        )  # fmt: skip
        return out.astype(jnp.float32).sum()

    return loss, params


@pytest.mark.parametrize(("name", "block"), [("t5", 32), ("kerple", 32), ("fire", 32), ("dpb", 16)])
def test_registered_biases_lower_to_triton_for_cuda(name, block):
    # The distance biases take per-block shortcuts (lax.cond, diagonal layouts built
    # with slices) that Triton cannot lower; traced for a kernel tile they step aside.
    loss, params = _registered_bias_loss(name, block)
    q, k, v = _qkv(1, 64, 64, 4, 4, 16, dtype=jnp.bfloat16)
    _lowers_for_cuda(loss, q, k, v, params)
    _lowers_for_cuda(jax.grad(loss, argnums=(0, 1, 2, 3)), q, k, v, params)


def test_a_bias_too_large_for_a_triton_tile_is_refused_and_auto_runs_blockwise(monkeypatch):
    # DPB's 64-wide hidden layer over a 32 x 32 tile: a 2^22-element product per tile.
    q, k, v = _qkv(1, 64, 64, 4, 4, 16)
    loss, params = _registered_bias_loss("dpb", 32)
    with pytest.raises(ValueError, match="more than the 1048576 a Triton tensor"):
        _lowers_for_cuda(loss, q, k, v, params)
    auto, _ = _registered_bias_loss("dpb", 32, implementation="auto")
    blockwise, _ = _registered_bias_loss("dpb", 32, implementation="blockwise")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # auto asks for pallas
    with _pallas.lowering_platform("cuda"):
        got = jax.grad(auto, argnums=(0, 1, 2, 3))(q, k, v, params)
    want = jax.grad(blockwise, argnums=(0, 1, 2, 3))(q, k, v, params)
    _assert_close(got, want)


# ---------------------------------------------------------------- dtypes, determinism


def test_bfloat16_inputs_keep_their_dtype_and_match_xla_in_float32():
    q, k, v = _qkv(1, 40, 40, 4, 4, 16, seed=7, dtype=jnp.bfloat16)
    module, params = _bias_module("alibi")
    kwargs = {"causal": True}
    out, grads = _outputs_and_grads("pallas", q, k, v, params, module, kwargs)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads[:3])
    as_f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want, want_grads = _outputs_and_grads("xla", *as_f32, params, module, kwargs)
    np.testing.assert_allclose(out.astype(jnp.float32), want, atol=2e-2)
    for grad, expected in zip(grads[:3], want_grads[:3], strict=True):
        np.testing.assert_allclose(grad.astype(jnp.float32), expected, atol=5e-2)


def test_gradients_are_bit_identical_across_runs():
    q, k, v, kwargs = _case("causal_packed_gqa")
    module, params = _bias_module("t5")
    run = _grad_fn("pallas", module, kwargs)
    first, second = run(q, k, v, params), run(q, k, v, params)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- transformations


def test_composes_with_jit_grad_jit_checkpoint_and_scan():
    q, k, v = _qkv(1, 32, 32, 2, 2, 16, seed=8)
    module, params = _bias_module("kerple", heads=2)

    def layers(implementation):
        @jax.jit
        def attend(x, params):
            bias_fn = module.apply(params, method=lambda m: m.bias_fn())
            return pe.dot_product_attention(
                x, k, v, bias_fn=bias_fn, causal=True, implementation=implementation,
                block_size=16,
            )  # fmt: skip

        def loss(x, params):
            def layer(x, _):
                return jax.checkpoint(attend)(x, params), None

            x, _ = jax.lax.scan(layer, x, None, length=2)
            return jnp.sum(x * jnp.sin(jnp.arange(x.size).reshape(x.shape)))

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(q, params)

    _assert_close(layers("pallas"), layers("xla"))


def test_auto_picks_pallas_only_on_gpu_and_only_for_supported_terms(monkeypatch):
    resolve = pe.attention.resolve_implementation
    assert resolve("auto", 4096, 4096, pallas_supported=True) == "blockwise"  # on CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve("auto", 4096, 4096, pallas_supported=True) == "pallas"
    assert resolve("auto", 4096, 4096, pallas_supported=False) == "blockwise"


# ---------------------------------------------------------------- the GPU benchmark script


def test_gpu_benchmark_refuses_without_a_gpu_and_builds_its_table(capsys):
    from benchmarks import gpu_attention

    assert gpu_attention.main(["--out", "unused"]) == 2
    assert "needs a GPU" in capsys.readouterr().err
    # Causal FLOPs: half of 4 * B * H * L^2 * D forward; forward + backward is 3.5x.
    assert gpu_attention.causal_flops(1, 8, 1024, 128, "fwd") == 2 * 8 * 1024**2 * 128
    assert gpu_attention.causal_flops(1, 8, 1024, 128, "fwd+bwd") == 7 * 8 * 1024**2 * 128
    rows = [
        {"length": 8, "mode": "fwd", "implementation": "cudnn", "term": "none", "seconds": 2.0},
        {"length": 8, "mode": "fwd", "implementation": "blockwise", "term": "t5", "seconds": 4.0},
        {"length": 8, "mode": "fwd", "implementation": "pallas", "term": "t5", "seconds": 1.0},
        {"length": 8, "mode": "fwd", "implementation": "cudnn", "term": "alibi", "error": "OOM"},
    ]
    for row in rows:
        row.update(
            {"tflops": 1.0, "temp_bytes": 2**20, "peak_bytes_in_use": None}
            if "seconds" in row
            else {}
        )
    rows = gpu_attention.add_ratios(rows, "cudnn")
    assert rows[2]["vs_reference"] == 0.5 and rows[2]["vs_blockwise"] == 0.25
    table = gpu_attention.markdown(rows, "test device", "cudnn")
    assert "| 8 | fwd | pallas | t5 | 1000.000 | 1.00 | 0.50 | 0.25 | 1.0 | - |" in table
    assert "OOM" in table


@pytest.mark.slow
def test_gpu_benchmark_dry_run_writes_its_reports(tmp_path):
    from benchmarks import gpu_attention

    assert gpu_attention.main(["--dry-run", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "gpu_attention.json").exists() and (tmp_path / "gpu_attention.md").exists()
