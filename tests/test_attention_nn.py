"""SparseAttention and SparseCodingTransformerBlock: MHA compatibility (arguments, layouts, state_dict, masks),
backends, torch.compile."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import dsc_kernels.functional as DF
from dsc_kernels.nn.attention import SparseAttention, SparseCodingTransformerBlock
from dsc_kernels.reference.attention import sparse_attention_ref

F64 = dict(dtype=torch.float64)
BF = dict(batch_first=True)


def _skip_unless(backend):
    op = {"cpp": "cpp", "triton": "triton"}.get(backend)
    if op is not None and (reason := DF.backend_unavailable_reason(op, "cpu")) is not None:
        pytest.skip(reason)


def _manual(module: SparseAttention, x: torch.Tensor, y: torch.Tensor, causal: bool, bias=None) -> torch.Tensor:
    """The module's computation written out with the reference (batch-first x (B, N, E), y (B, M, E))."""
    e, h = module.embed_dim, module.num_heads
    w, b = module.in_proj_weight, module.in_proj_bias
    q, k, v = (
        torch.nn.functional.linear(t, w[i * e : (i + 1) * e], b[i * e : (i + 1) * e])
        .unflatten(-1, (h, e // h))
        .transpose(1, 2)
        for i, t in enumerate((x, y, y))
    )
    th = module.threshold if module.threshold is not None else 0.0
    o = sparse_attention_ref(q, k, v, mode=module.mode, threshold=th, causal=causal, bias=bias)
    return module.out_proj(o.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
def test_sparse_attention_matches_reference_math(backend, mode):
    _skip_unless(backend)
    m = SparseAttention(
        16, 4, mode=mode, backend=backend, **(dict(threshold=0.2) if mode == "shrink" else {}), **BF, **F64
    )
    x, y = torch.randn(2, 7, 16, **F64), torch.randn(2, 5, 16, **F64)
    out, weights = m(x, y, y, need_weights=False)
    assert weights is None and out.shape == (2, 7, 16)
    torch.testing.assert_close(out, _manual(m, x, y, False))
    out_c, _ = m(x, is_causal=True)
    torch.testing.assert_close(out_c, _manual(m, x, x, True))


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_fused_backends_match_reference_module(backend):
    _skip_unless(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    torch.manual_seed(1)
    m_ref = SparseAttention(32, 2, mode="shrink", threshold=0.1, backend="reference", dtype=dtype, **BF)
    m = SparseAttention(32, 2, mode="shrink", threshold=0.1, backend=backend, dtype=dtype, **BF)
    m.load_state_dict(m_ref.state_dict())
    x = torch.randn(2, 9, 32, dtype=dtype)
    outs, grads = [], []
    for mod in (m_ref, m):
        out, _ = mod(x, is_causal=True)
        out.square().sum().backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in mod.named_parameters()})
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(outs[1], outs[0], atol=tol, rtol=tol)
    assert grads[0].keys() == grads[1].keys() and "threshold" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=10 * tol, rtol=10 * tol, msg=name)


def test_loads_multihead_attention_weights():
    mha = nn.MultiheadAttention(16, 4, batch_first=True, **F64)
    m = SparseAttention(16, 4, backend="reference", **BF, **F64)
    m.load_state_dict(mha.state_dict())
    shrink = SparseAttention(16, 4, mode="shrink", backend="reference", **BF, **F64)
    missing, unexpected = shrink.load_state_dict(mha.state_dict(), strict=False)
    assert missing == ["threshold"] and unexpected == []
    x = torch.randn(2, 6, 16, **F64)
    assert m(x, x, x, need_weights=False)[0].shape == mha(x, x, x, need_weights=False)[0].shape


def test_masks_follow_multihead_attention_conventions():
    """attn_mask (N, M) or (B*H, N, M) and key_padding_mask (B, M): bool True ignores a key, float masks are added
    (-inf ignores); the causal mask equals is_causal; a query that sees no key gets 0 (out_proj's bias)."""
    m = SparseAttention(8, 2, backend="reference", **BF, **F64)
    x = torch.randn(3, 5, 8, **F64)
    want, _ = m(x, is_causal=True)
    float_mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    bool_mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
    for mask in (float_mask, bool_mask, bool_mask.repeat(6, 1, 1)):
        torch.testing.assert_close(m(x, x, x, attn_mask=mask)[0], want)
        torch.testing.assert_close(m(x, x, x, attn_mask=mask, is_causal=True)[0], want)
    general = torch.randn(5, 5, **F64)
    general[:, 0] = float("-inf")
    torch.testing.assert_close(m(x, attn_mask=general)[0], _manual(m, x, x, False, bias=general))
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[1, 3:] = True
    padding[2] = True  # a fully padded sequence
    out = m(x, key_padding_mask=padding)[0]
    bias = torch.zeros(3, 1, 1, 5, **F64).masked_fill(padding[:, None, None, :], float("-inf"))
    torch.testing.assert_close(out, _manual(m, x, x, False, bias=bias))
    torch.testing.assert_close(out[2], m.out_proj.bias.expand(5, 8))
    float_padding = torch.zeros(3, 5, **F64).masked_fill(padding, float("-inf"))
    torch.testing.assert_close(m(x, key_padding_mask=float_padding)[0], out)
    with pytest.raises(ValueError, match="B\\*num_heads"):
        m(x, attn_mask=bool_mask.repeat(2, 1, 1))
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        m(x, key_padding_mask=padding[:, :4])
    with pytest.raises(TypeError, match="bool or floating-point"):
        m(x, key_padding_mask=padding.int())


def test_constructor_validation():
    with pytest.raises(ValueError, match="mode"):
        SparseAttention(8, 2, mode="softmax")
    with pytest.raises(ValueError, match="divisible"):
        SparseAttention(10, 3)
    for heads in (0, -2):
        with pytest.raises(ValueError, match="num_heads must be >= 1"):
            SparseAttention(8, heads)
    with pytest.raises(TypeError, match="num_heads must be an int"):
        SparseAttention(8, 2.0)
    with pytest.raises(ValueError, match="embed_dim must be >= 1"):
        SparseAttention(0, 1)
    with pytest.raises(ValueError, match="dropout"):
        SparseAttention(8, 2, 1.5)
    with pytest.raises(ValueError, match="threshold must be a finite float"):
        SparseAttention(8, 2, mode="shrink", threshold=float("nan"))
    with pytest.raises(ValueError, match="threshold applies to mode='shrink' only"):  # it was silently ignored
        SparseAttention(8, 2, mode="sparsemax", threshold=5.0)
    with pytest.raises(ValueError, match="threshold applies to mode='shrink' only"):
        SparseCodingTransformerBlock(8, 2, threshold=5.0)
    assert float(SparseAttention(8, 2, mode="shrink").threshold[0]) == 0.5
    for name in ("add_bias_kv", "add_zero_attn"):
        with pytest.raises(TypeError, match=f"{name} must be True or False"):
            SparseAttention(8, 2, **{name: 1})


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_a_negative_shrink_threshold_is_a_relu_with_bias(backend):
    """A negative threshold has a meaning, documented: max(s - theta, 0) with theta < 0 lets keys scoring in
    (theta, 0] in (the learned parameter is not projected onto >= 0, so training may take it there), while keys a
    mask hides stay hidden. Against the map written out here: a padded key, a -inf attn_mask entry and a finite
    -3 entry that theta = -5 lets through."""
    _skip_unless(backend)
    m = SparseAttention(8, 2, mode="shrink", threshold=-5.0, backend=backend, **BF, **F64)
    assert float(m.threshold.min()) == -5.0
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, generator=gen, dtype=torch.float64)
    padding = torch.zeros(2, 4, dtype=torch.bool)
    padding[1, 2] = True
    attn = torch.zeros(4, 4, dtype=torch.float64)
    attn[0, 1], attn[2, 3] = float("-inf"), -3.0
    out, weights = m(x, key_padding_mask=padding, attn_mask=attn, average_attn_weights=False)
    e, h = 8, 2
    q, k, v = (
        torch.nn.functional.linear(x, m.in_proj_weight[i * e : (i + 1) * e], m.in_proj_bias[i * e : (i + 1) * e])
        .unflatten(-1, (h, e // h))
        .transpose(1, 2)
        for i in range(3)
    )
    s = q @ k.transpose(-1, -2) / 2.0 + attn
    s = s.masked_fill(padding[:, None, None, :], float("-inf"))
    p = (s - m.threshold.view(1, -1, 1, 1)).clamp(min=0.0)
    assert (s[:, :, 2, 3] < 0).all() and (p[:, :, 2, 3] > 0).all()  # the -3 entry is in
    assert (weights[:, :, 0, 1] == 0).all() and (weights[1, :, :, 2] == 0).all()  # hidden keys stay hidden
    torch.testing.assert_close(weights, p.detach())
    want = m.out_proj((p @ v).transpose(1, 2).flatten(2))
    torch.testing.assert_close(out, want)
    (g_out,) = torch.autograd.grad(out.sum(), m.threshold)
    (g_want,) = torch.autograd.grad(want.sum(), m.threshold)
    torch.testing.assert_close(g_out, g_want)


def test_batch_first_defaults_to_sequence_first_like_multihead_attention():
    """MHA's default layout is (L, B, E): a (5, 3, 8) input is 3 sequences of 5 tokens, not 5 of 3."""
    m = SparseAttention(8, 2, backend="reference", **F64)
    assert m.batch_first is False and nn.MultiheadAttention(8, 2).batch_first is False
    x = torch.randn(5, 3, 8, **F64)  # (N, B, E)
    out, w = m(x, need_weights=True, is_causal=True)
    assert out.shape == (5, 3, 8) and w.shape == (3, 5, 5)
    torch.testing.assert_close(out, _manual(m, x.transpose(0, 1), x.transpose(0, 1), True).transpose(0, 1))
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 5, **F64))
    assert (w.triu(1) == 0).all()
    m.batch_first = True
    torch.testing.assert_close(m(x.transpose(0, 1), is_causal=True)[0], out.transpose(0, 1))
    assert "mode='sparsemax'" in repr(m) and "batch_first=True" in repr(m)


@pytest.mark.parametrize("batch_first", [False, True])
def test_matches_multihead_attention_call_conventions(batch_first):
    """Same arguments, state_dict, shapes and layouts as MHA: batched and unbatched inputs, kdim/vdim, need_weights
    per head, cross-attention."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, kdim=5, vdim=7, batch_first=batch_first, **F64)
    m = SparseAttention(12, 3, kdim=5, vdim=7, batch_first=batch_first, backend="reference", **F64)
    m.load_state_dict(mha.state_dict())
    lay = (lambda b, n, e: (b, n, e)) if batch_first else (lambda b, n, e: (n, b, e))
    q, k, v = torch.randn(lay(2, 4, 12), **F64), torch.randn(lay(2, 6, 5), **F64), torch.randn(lay(2, 6, 7), **F64)
    want_out, want_w = mha(q, k, v, need_weights=True, average_attn_weights=False)
    out, w = m(q, k, v, need_weights=True, average_attn_weights=False)
    assert out.shape == want_out.shape and w.shape == want_w.shape == (2, 3, 4, 6)
    first = (slice(None), 0) if not batch_first else (0,)
    out1, w1 = m(q[first], k[first], v[first], need_weights=True)
    torch.testing.assert_close(out1, out[first])
    torch.testing.assert_close(w1, w[0].mean(0))
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 4, **F64))
    assert "kdim=5, vdim=7" in repr(m)


@pytest.mark.parametrize("batch_first", [False, True])
def test_shape_errors_name_the_shapes_as_given(batch_first):
    """A batched key beside an unbatched query was refused for lacking "query's batch size 1", which a (M, 1, E)
    key did not fix either (MHA wants both unbatched); the messages now quote the shapes the caller passed, not the
    unsqueezed, batch-first ones."""
    m = SparseAttention(8, 2, kdim=6, batch_first=batch_first, backend="reference")
    for key in (torch.randn(4, 2, 6), torch.randn(4, 1, 6), torch.randn(1, 4, 6), torch.randn(4, 8)):
        with pytest.raises(
            ValueError,
            match=r"key must be unbatched \(M, 6\) like the unbatched query, got " + re.escape(str(tuple(key.shape))),
        ):
            m(torch.randn(5, 8), key, key)
    assert m(torch.randn(5, 8), torch.randn(4, 6), torch.randn(4, 8))[0].shape == (5, 8)
    with pytest.raises(ValueError, match=r"query must be .* or unbatched \(L, 8\), got \(5, 2, 7\)"):
        m(torch.randn(5, 2, 7), torch.randn(5, 2, 6), torch.randn(5, 2, 8))
    with pytest.raises(ValueError, match=r"key must be .* with query's batch size 2 .*, got \(4, 3, 6\)"):
        m(torch.randn(2, 2, 8), torch.randn(4, 3, 6), torch.randn(4, 3, 8))


def test_a_1d_key_or_value_beside_a_batched_query_is_a_value_error():
    """With batch_first=False the batched key and value were transposed before any check: a 1-D one raised
    IndexError (dimension out of range) instead of naming the argument."""
    m = SparseAttention(8, 2, batch_first=False, backend="reference")
    q, kv = torch.randn(5, 2, 8), torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match=r"key must be \(L, B, 8\) .*, got \(4,\)"):
        m(q, torch.randn(4), kv)
    with pytest.raises(ValueError, match=r"value must be \(L, B, 8\) .*, got \(8,\)"):
        m(q, kv, torch.randn(8))


@pytest.mark.parametrize("backend", ["auto", "cpp"])
def test_meta_device(backend):
    """Constructible on meta (deferred initialisation); auto runs shapes through on meta; to_empty + reset works."""
    _skip_unless(backend)
    m = SparseAttention(8, 2, mode="shrink", device="meta", backend=backend)
    assert all(p.device.type == "meta" for p in m.parameters())
    if backend == "auto":
        out, w = m(torch.empty(5, 3, 8, device="meta"), need_weights=True)
        assert out.shape == (5, 3, 8) and out.device.type == "meta" and w.shape == (3, 5, 5)
        block = SparseCodingTransformerBlock(8, 2, device="meta", backend="reference")
        assert block(torch.empty(2, 4, 8, device="meta")).shape == (2, 4, 8)
    m.to_empty(device="cpu")
    m.reset_parameters()
    assert torch.isfinite(m(torch.randn(5, 3, 8))[0]).all()


@pytest.mark.parametrize("add_bias_kv", [False, True])
def test_meta_construction_then_reset_is_direct_construction(add_bias_kv):
    """to_empty + reset_parameters gives what construction on the CPU gives from the same seed: every parameter,
    the shrink threshold's initial value included (it kept to_empty's garbage), and the block's dictionary and
    norms (it had no reset_parameters: uninitialised memory, non-finite outputs)."""
    kw = dict(mode="shrink", threshold=0.3, add_bias_kv=add_bias_kv, backend="reference")
    for make in (
        lambda **f: SparseAttention(8, 2, **kw, **f),
        lambda **f: SparseCodingTransformerBlock(8, 2, mode="shrink", threshold=0.3, backend="reference", **f),
    ):
        torch.manual_seed(0)
        direct = make()
        torch.manual_seed(0)
        deferred = make(device="meta").to_empty(device="cpu")
        with torch.no_grad():
            for p in deferred.parameters():
                p.fill_(float("nan"))  # what to_empty may leave
        deferred.reset_parameters()
        for (name, want), got in zip(direct.state_dict().items(), deferred.state_dict().values()):
            torch.testing.assert_close(got, want, msg=name)
    threshold = SparseAttention(8, 2, **kw).threshold
    torch.testing.assert_close(threshold, torch.full((2,), 0.3))


def test_help_documents_every_argument():
    doc = SparseAttention.__doc__ + SparseAttention.forward.__doc__
    for name in (
        "embed_dim",
        "num_heads",
        "dropout",
        "bias",
        "add_bias_kv",
        "kdim",
        "vdim",
        "batch_first",
        "device",
        "mode",
        "threshold",
        "backend",
        "key_padding_mask",
        "need_weights",
        "attn_mask",
        "average_attn_weights",
        "is_causal",
        "(L, B, E)",
        "(B, L, E)",
    ):
        assert name in doc, name


def test_dropout_only_in_training():
    m = SparseAttention(8, 2, dropout=0.5, backend="reference", **BF, **F64)
    x = torch.randn(2, 4, 8, **F64)
    m.eval()
    torch.testing.assert_close(m(x)[0], m(x)[0])
    m.train()
    assert not torch.allclose(m(x)[0], m(x)[0])


@pytest.mark.parametrize("env,backend", [("", "cuda"), ("", "triton"), ("cuda", "auto"), ("garbage", "auto")])
def test_dropout_training_still_refuses_a_backend_that_cannot_run(monkeypatch, env, backend):
    # a training forward with dropout forms the map densely and never called the backend: a layer built with
    # backend="cuda" (or "triton" on CPU tensors, or DSC_KERNELS_BACKEND naming one or garbage) trained silently,
    # and raised only in eval
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs triton on CPU tensors (a plain `pytest tests` without CUDA turns it on)")
    monkeypatch.setenv("DSC_KERNELS_BACKEND", env)
    m = SparseAttention(8, 2, dropout=0.5, backend=backend, **BF).train()
    x = torch.randn(2, 4, 8)
    error = ValueError if env == "garbage" else RuntimeError
    with pytest.raises(error, match="DSC_KERNELS_BACKEND" if env else f"backend='{backend}' cannot run"):
        m(x)
    m.eval()
    with pytest.raises(error, match="DSC_KERNELS_BACKEND" if env else f"backend='{backend}' cannot run"):
        m(x)


def _block_manual(block: SparseCodingTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    h = x + block.attn(block.norm1(x), is_causal=True)[0]
    u = block.norm2(h)
    w = block.dictionary[..., 0]  # (codes, features)
    z = u
    for _ in range(block.n_iter):
        r = u - z @ w  # D z maps codes to features
        z = torch.clamp(z + block.step * r @ w.T - block.step * block.lam, min=0)
    return z


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_transformer_block_is_attention_then_ista(backend):
    _skip_unless(backend)
    block = SparseCodingTransformerBlock(16, 4, mode="shrink", n_iter=2, lam=0.05, step=0.2, backend=backend, **F64)
    x = torch.randn(2, 7, 16, **F64)
    z = block(x, is_causal=True)
    assert z.shape == x.shape and (z >= 0).all() and (z == 0).any()
    torch.testing.assert_close(z, _block_manual(block, x))
    z.sum().backward()
    assert all(p.grad is not None for p in block.parameters())
    assert "n_iter=2" in repr(block)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_modules_compile_fullgraph(backend):
    _skip_unless(backend)
    torch._dynamo.reset()
    attn = SparseAttention(16, 2, mode="shrink", backend=backend, **BF)
    block = SparseCodingTransformerBlock(16, 2, mode="sparsemax", backend=backend)
    x = torch.randn(2, 6, 16, requires_grad=True)
    # aot_eager traces forward and backward through the ops' fakes and autograd registrations without
    # spending the test budget on inductor's C++ code generation.
    c_attn = torch.compile(attn, fullgraph=True, backend="aot_eager")
    c_block = torch.compile(block, fullgraph=True, backend="aot_eager")
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    masks = dict(key_padding_mask=padding, attn_mask=torch.randn(6, 6))
    for eager, compiled, kwargs in (
        (attn, c_attn, dict(is_causal=True)),
        (block, c_block, dict(is_causal=True)),
        (attn, c_attn, masks),
    ):
        want = eager(x, **kwargs)
        got = compiled(x, **kwargs)
        want, got = (want[0], got[0]) if isinstance(want, tuple) else (want, got)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        (gx,) = torch.autograd.grad(got.sum(), x)
        (wx,) = torch.autograd.grad(want.sum(), x)
        torch.testing.assert_close(gx, wx, atol=1e-4, rtol=1e-4)


_FIRST_CALL_COMPILED = """
import torch
from dsc_kernels.nn import SparseCodingTransformerBlock
torch.set_num_threads(1)
torch.manual_seed(0)
block = SparseCodingTransformerBlock(16, 2, backend={backend!r})
x = torch.randn(2, 6, 16)
got = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
torch.testing.assert_close(got, block(x))
dynamic = torch.compile(block, fullgraph=True, dynamic=True, backend="aot_eager")
for length in (9, 13):
    y = torch.randn(2, length, 16)
    torch.testing.assert_close(dynamic(y), block(y))
"""


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_block_compiles_on_its_first_call_and_with_dynamic_shapes(backend):
    """In a fresh process the compiled block is the first call: its two op families (attention, then conv-ISTA) get
    registered while one graph is traced, which the warmed-up test above never sees. dynamic=True traces the
    ISTA step, a Python float, symbolically."""
    _skip_unless(backend)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", _FIRST_CALL_COMPILED.format(backend=backend)],
        env=dict(os.environ, PYTHONPATH=str(root)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
def test_modules_on_gpu_with_triton(mode):
    torch.manual_seed(0)
    ref = SparseCodingTransformerBlock(64, 4, mode=mode, backend="reference", device="cuda")
    fused = SparseCodingTransformerBlock(64, 4, mode=mode, backend="triton", device="cuda")
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 100, 64, device="cuda")
    torch.testing.assert_close(fused(x, is_causal=True), ref(x, is_causal=True), atol=1e-3, rtol=1e-3)
    compiled = torch.compile(fused, fullgraph=True)
    torch.testing.assert_close(compiled(x, is_causal=True), ref(x, is_causal=True), atol=1e-3, rtol=1e-3)


def test_block_refuses_an_input_of_another_dtype_by_name():
    """It failed inside LayerNorm with "mixed dtype (CPU)", naming no argument."""
    block = SparseCodingTransformerBlock(8, 2, backend="reference")
    for bad in (torch.randn(2, 5, 8, dtype=torch.float64), torch.ones(2, 5, 8, dtype=torch.int64)):
        with pytest.raises(TypeError, match="x must have the block's dtype torch.float32"):
            block(bad)


def test_block_keeps_a_tensor_lam_and_step_as_numbers():
    """A 0-dim tensor lam was kept as an attribute: in no state_dict, left behind by .to(), and differentiated into
    the caller's tensor. The block takes them as the numbers its signature says."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    block = SparseCodingTransformerBlock(8, 2, lam=torch.tensor(0.25), step=torch.tensor(0.0625), backend="reference")
    assert isinstance(block.lam, float) and isinstance(block.step, float)
    twin = SparseCodingTransformerBlock(8, 2, lam=0.25, step=0.0625, backend="reference")
    twin.load_state_dict(block.state_dict())
    torch.testing.assert_close(block.double()(x), twin.double()(x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpp", "auto"])
def test_autocast_runs_the_fused_backend_in_float32(backend):
    """Under CPU autocast the projections give bfloat16 q, k, v; the ops' autocast rule computes them in float32,
    so the cpp backend takes them (it raised: "supports float32, float64, got bfloat16")."""
    _skip_unless(backend)
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    attn = SparseAttention(8, 2, batch_first=True, backend=backend)
    block = SparseCodingTransformerBlock(8, 2, backend=backend)
    for module in (attn, block):
        want = module(x)
        want = want[0] if isinstance(want, tuple) else want
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = module(x)
        got = got[0] if isinstance(got, tuple) else got
        # bfloat16 projections: within a few bfloat16 roundings of the float32 result
        torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.05)


def test_block_takes_an_unbatched_sequence_as_a_batch_of_one():
    # nn.TransformerEncoderLayer takes (N, dim); the block raised "x must have shape (B, N, dim=8)"
    block = SparseCodingTransformerBlock(8, 2, n_iter=2, backend="reference", **F64).eval()
    x, padding = torch.randn(5, 8, **F64), torch.tensor([False, False, False, True, True])
    torch.testing.assert_close(block(x), block(x[None])[0], rtol=0, atol=0)
    masked = block(x, key_padding_mask=padding, is_causal=True)
    torch.testing.assert_close(masked, block(x[None], key_padding_mask=padding[None], is_causal=True)[0])
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(N,\) for an unbatched x"):
        block(x, key_padding_mask=padding[None])


def test_block_names_dim_when_heads_do_not_divide_it():
    with pytest.raises(ValueError, match=r"dim \(63\) must be divisible by num_heads \(4\)"):
        SparseCodingTransformerBlock(63, 4)


def test_float32_attention_runs_under_vmap_and_per_sample_gradients():
    """float32 scores are checked for overflow by reading q and k, which vmap refuses ("data-dependent control
    flow"): DF.sparse_attention, SparseAttention and the block failed under vmap in float32 (float64 has no check).
    Each vmapped sample must equal a call on that sample alone."""
    torch.manual_seed(0)
    q = torch.randn(3, 1, 2, 5, 4)
    batched = torch.func.vmap(lambda qi: DF.sparse_attention(qi, qi, qi))(q)
    torch.testing.assert_close(batched, torch.stack([DF.sparse_attention(qi, qi, qi) for qi in q]))
    layer = SparseAttention(8, 2, **BF).eval()
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(3, 5, 8)

    def loss(p, xi):
        return torch.func.functional_call(layer, p, (xi[None],) * 3, {"need_weights": False})[0].pow(2).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(len(x)):
        single = torch.func.grad(loss)(params, x[i])
        torch.testing.assert_close(per_sample["in_proj_weight"][i], single["in_proj_weight"], rtol=1e-5, atol=1e-6)


def test_float32_overflow_check_still_runs_under_grad_transforms():
    """The overflow check (float32 scores computed in float64 when they may overflow) was skipped under every
    torch.func transform; only vmap cannot read the values. Under vjp/jvp a score of 1e20 * 1e20 - 1e20 * 1e20 gave
    inf - inf = NaN where a plain call gives a finite row."""
    q = torch.tensor([[[[1e20, 1e20], [1.0, 0.0]]]])
    k = torch.tensor([[[[1e20, -1e20], [0.0, 1.0]]]])
    v = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))

    def f(q):
        return DF.sparse_attention(q, k, v, backend="reference")

    plain = f(q)
    assert torch.isfinite(plain).all()
    torch.testing.assert_close(torch.func.vjp(f, q)[0], plain)
    torch.testing.assert_close(torch.func.jvp(f, (q,), (torch.zeros_like(q),))[0], plain)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_dropout_training_keeps_rows_finite_past_a_hidden_nan_value(backend):
    # the training forward with dropout formed O = P v densely: 0 * NaN made every row NaN through a value it
    # cannot see (padded, or causally later), where eval leaves those rows finite (the documented rule)
    _skip_unless(backend)
    m = SparseAttention(4, 2, dropout=0.3, backend=backend, **BF, **F64)
    q, k, v = torch.randn(1, 3, 4, **F64), torch.randn(1, 4, 4, **F64), torch.randn(1, 4, 4, **F64)
    v[0, 3, 1] = float("nan")
    kpm = torch.tensor([[False, False, False, True]])
    for causal, mask in ((False, kpm), (True, None)):  # causal: queries 0-2 never see key 3
        for training in (True, False):
            m.train(training)
            assert torch.isfinite(m(q, k, v, key_padding_mask=mask, is_causal=causal)[0]).all()
    # a non-finite value a query sees still makes its row NaN, whatever weight it has after dropout
    m.train()
    v[0, 3, 1] = float("inf")
    assert torch.isnan(m(q, k, v)[0]).all()


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_dropout_training_gradients_stay_finite_past_a_nan_query(backend):
    # a NaN query makes its map row NaN; the dense training path's O = P v then gave dv = P^T g = 0 * NaN for every
    # key, so every key and value gradient was NaN, where the fused path passes such a row no gradient
    _skip_unless(backend)
    torch.manual_seed(0)
    m = SparseAttention(4, 2, backend=backend, **BF, **F64).train()
    q, k, v = (torch.randn(1, 3, 4, **F64, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        q[0, 1, 0] = float("nan")
    grads = []
    for dropout in (0.0, 1e-300):  # fused, then dense with nothing dropped
        m.dropout = dropout
        out = m(q, k, v, need_weights=False)[0]
        assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[0, [0, 2]]).all()
        grads.append(torch.autograd.grad(out[0, [0, 2]].sum(), (q, k, v)))
    for fused, dense in zip(*grads):
        assert torch.isfinite(fused).all()
        torch.testing.assert_close(dense, fused)


def test_dropout_training_refuses_a_grad_mask_on_an_explicit_fused_backend():
    # eval (and dropout 0) raise for a float mask that requires grad on backend="cpp"; the training forward with
    # dropout checked the backend from the device and dtype alone and ran, so the error came only at eval
    _skip_unless("cpp")
    m = SparseAttention(4, 2, dropout=0.3, backend="cpp", **BF, **F64)
    x = torch.randn(1, 3, 4, **F64)
    bias = torch.zeros(3, 3, **F64, requires_grad=True)
    for training in (False, True):
        m.train(training)
        with pytest.raises(ValueError, match="mask_grad"):
            m(x, x, x, attn_mask=bias)
    m(x, x, x, attn_mask=bias.detach())  # a constant float mask still runs


def test_block_takes_an_empty_sequence():
    # N = 0 raised conv_ista's "the signal has an empty spatial size (0,)", naming no argument of the block, while
    # its attention (as nn.MultiheadAttention and nn.TransformerEncoderLayer) returns an empty sequence
    block = SparseCodingTransformerBlock(6, 2, n_iter=2, **F64)
    for shape in ((2, 0, 6), (0, 6)):
        x = torch.randn(shape, **F64, requires_grad=True)
        z = block(x)
        assert z.shape == shape
        z.sum().backward()
        assert x.grad.shape == shape


def _own_sparsemax(s: torch.Tensor) -> torch.Tensor:
    """Sparsemax from its definition, row by row: the largest k with 1 + k z_(k) > sum_{l<=k} z_(l) (all -inf: 0)."""
    out = torch.zeros_like(s)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in s.shape[:-1]]).reshape(-1, s.dim() - 1).tolist():
        row = s[tuple(idx)]
        if torch.isinf(row).all():
            continue
        z = sorted(row.tolist(), reverse=True)
        k = max(j for j in range(1, len(z) + 1) if 1 + j * z[j - 1] > sum(z[:j]))
        tau = (sum(z[:k]) - 1) / k
        out[tuple(idx)] = (row - tau).clamp(min=0)
    return out


def _own_layer(m: SparseAttention, x, y, kpm=None, mask=None, causal=False):
    """SparseAttention written out independently (batch-first x (B, N, E), y (B, M, E), float64, eval): MHA's packed
    projection, bias_k/bias_v then a zero key appended and always visible, top-left causal, masks True = ignore,
    a per-head shrink threshold. Returns (out, per-head weights (B, H, N, M'))."""
    e, h = m.embed_dim, m.num_heads
    d = e // h
    w, b = m.in_proj_weight, m.in_proj_bias
    q, k, v = (t @ w[i * e : (i + 1) * e].T + b[i * e : (i + 1) * e] for i, t in enumerate((x, y, y)))
    bsz, n, mm = x.shape[0], x.shape[1], y.shape[1]
    extra_k, extra_v = [], []
    if m.bias_k is not None:
        extra_k.append(m.bias_k.reshape(1, 1, e).expand(bsz, 1, e))
        extra_v.append(m.bias_v.reshape(1, 1, e).expand(bsz, 1, e))
    if m.add_zero_attn:
        extra_k.append(torch.zeros(bsz, 1, e, dtype=x.dtype))
        extra_v.append(torch.zeros(bsz, 1, e, dtype=x.dtype))
    k, v = torch.cat([k, *extra_k], 1), torch.cat([v, *extra_v], 1)
    total = k.shape[1]
    hidden = torch.zeros(bsz, h, n, total, dtype=torch.bool)
    add = torch.zeros(bsz, h, n, total, dtype=x.dtype)
    for i in range(n):
        for j in range(mm):
            if causal and j > i:
                hidden[:, :, i, j] = True
    if kpm is not None:
        hidden[..., :mm] |= kpm[:, None, None, :]
    if mask is not None:
        add[..., :mm] += mask
    out_heads, maps = [], []
    for hh in range(h):
        sl = slice(hh * d, (hh + 1) * d)
        s = q[..., sl] @ k[..., sl].transpose(1, 2) / d**0.5 + add[:, hh]
        s = s.masked_fill(hidden[:, hh], -float("inf"))
        if m.mode == "sparsemax":
            p = _own_sparsemax(s)
        else:
            p = (s - m.threshold[hh]).clamp(min=0)
        maps.append(p)
        out_heads.append(p @ v[..., sl])
    return m.out_proj(torch.cat(out_heads, -1)), torch.stack(maps, 1)


@pytest.mark.parametrize("add_bias_kv,add_zero_attn", [(True, False), (False, True), (True, True)])
def test_causal_cross_attention_with_appended_keys_is_top_left(add_bias_kv, add_zero_attn):
    # is_causal with appended keys is spelled out as an explicit (N, M) mask; with N != M it must stay top-left
    # (query i sees keys j <= i) and leave the appended keys visible
    torch.manual_seed(0)
    m = SparseAttention(
        8, 2, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, backend="reference", **BF, **F64
    ).eval()
    for n, mm in ((3, 5), (5, 3)):
        x, y = torch.randn(2, n, 8, **F64) * 3, torch.randn(2, mm, 8, **F64) * 3
        out, p = m(x, y, y, is_causal=True, average_attn_weights=False)
        want, want_p = _own_layer(m, x, y, causal=True)
        torch.testing.assert_close(p, want_p)
        torch.testing.assert_close(out, want)


def test_a_spectral_normed_out_proj_takes_one_power_iteration_per_training_forward_as_in_mha():
    """The input checks read out_proj.weight once per query, key and value: with spectral_norm on it each read ran
    the power iteration in training mode, so u and v moved four times per forward where MHA's move once."""
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    layer, mha = SparseAttention(8, 2), nn.MultiheadAttention(8, 2)
    for module in (layer, mha):
        spectral_norm(module.out_proj, name="weight")
    with torch.no_grad():
        ours, theirs = layer.out_proj.parametrizations.weight, mha.out_proj.parametrizations.weight
        theirs.original.copy_(ours.original)
        theirs[0]._u.copy_(ours[0]._u)
        theirs[0]._v.copy_(ours[0]._v)
    q = torch.randn(5, 2, 8)
    layer(q, q, q)
    mha(q, q, q)
    torch.testing.assert_close(ours[0]._u, theirs[0]._u, rtol=0, atol=0)
    torch.testing.assert_close(ours[0]._v, theirs[0]._v, rtol=0, atol=0)


def test_a_spectral_normed_block_dictionary_takes_one_power_iteration_per_training_forward():
    """The block's input check read its dictionary besides the sparse-coding step: two power iterations of
    spectral_norm per training forward, one of them on a weight the forward never used."""
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    block = spectral_norm(SparseCodingTransformerBlock(8, 2), name="dictionary")
    normed = block.parametrizations.dictionary
    u, v = normed[0]._u.clone(), normed[0]._v.clone()
    block(torch.randn(2, 5, 8))
    # one iteration from (u, v), as torch's spectral_norm takes it
    matrix = normed.original.detach().flatten(1)
    u = nn.functional.normalize(matrix @ v, dim=0, eps=normed[0].eps)
    v = nn.functional.normalize(matrix.T @ u, dim=0, eps=normed[0].eps)
    torch.testing.assert_close(normed[0]._u, u)
    torch.testing.assert_close(normed[0]._v, v)
