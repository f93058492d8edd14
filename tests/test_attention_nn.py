"""SparseAttention and SparseCodingTransformerBlock: MHA compatibility, masks, backends, torch.compile."""
import pytest
import torch
from torch import nn

from dsc_kernels.nn.attention import SparseAttention, SparseCodingTransformerBlock
import dsc_kernels.functional as DF
from dsc_kernels.reference.attention import sparse_attention_ref

F64 = dict(dtype=torch.float64)


def _skip_unless(backend):
    op = {"cpp": "cpp", "triton": "triton"}.get(backend)
    if op is not None and (reason := DF.backend_unavailable_reason(op, "cpu")) is not None:
        pytest.skip(reason)


def _manual(module: SparseAttention, x: torch.Tensor, y: torch.Tensor, causal: bool) -> torch.Tensor:
    """The module's computation written out with the reference."""
    e, h = module.embed_dim, module.num_heads
    w, b = module.in_proj_weight, module.in_proj_bias
    q, k, v = (torch.nn.functional.linear(t, w[i * e:(i + 1) * e], b[i * e:(i + 1) * e])
               .unflatten(-1, (h, e // h)).transpose(1, 2) for i, t in enumerate((x, y, y)))
    th = module.threshold if module.threshold is not None else 0.0
    o = sparse_attention_ref(q, k, v, mode=module.mode, threshold=th, causal=causal)
    return module.out_proj(o.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
def test_sparse_attention_matches_reference_math(backend, mode):
    _skip_unless(backend)
    m = SparseAttention(16, 4, mode=mode, threshold=0.2, backend=backend, **F64)
    x, y = torch.randn(2, 7, 16, **F64), torch.randn(2, 5, 16, **F64)
    out, weights = m(x, y, y)
    assert weights is None and out.shape == (2, 7, 16)
    torch.testing.assert_close(out, _manual(m, x, y, False))
    out_c, _ = m(x, is_causal=True)
    torch.testing.assert_close(out_c, _manual(m, x, x, True))


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_fused_backends_match_reference_module(backend):
    _skip_unless(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    torch.manual_seed(1)
    m_ref = SparseAttention(32, 2, mode="shrink", threshold=0.1, backend="reference", dtype=dtype)
    m = SparseAttention(32, 2, mode="shrink", threshold=0.1, backend=backend, dtype=dtype)
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
    m = SparseAttention(16, 4, backend="reference", **F64)
    m.load_state_dict(mha.state_dict())
    shrink = SparseAttention(16, 4, mode="shrink", backend="reference", **F64)
    missing, unexpected = shrink.load_state_dict(mha.state_dict(), strict=False)
    assert missing == ["threshold"] and unexpected == []
    x = torch.randn(2, 6, 16, **F64)
    assert m(x, x, x, need_weights=False)[0].shape == mha(x, x, x, need_weights=False)[0].shape


def test_causal_masks_and_rejected_masks():
    m = SparseAttention(8, 2, backend="reference", **F64)
    x = torch.randn(3, 5, 8, **F64)
    want, _ = m(x, is_causal=True)
    float_mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    bool_mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
    for mask in (float_mask, bool_mask):
        torch.testing.assert_close(m(x, x, x, attn_mask=mask)[0], want)
        torch.testing.assert_close(m(x, x, x, attn_mask=mask, is_causal=True)[0], want)
    with pytest.raises(ValueError, match="causal"):
        m(x, attn_mask=torch.zeros(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal"):
        m(x, attn_mask=bool_mask.T.contiguous())
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, key_padding_mask=torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mode"):
        SparseAttention(8, 2, mode="softmax")
    with pytest.raises(ValueError, match="divisible"):
        SparseAttention(10, 3)


def test_need_weights_and_sequence_first():
    m = SparseAttention(8, 2, backend="reference", batch_first=False, **F64)
    x = torch.randn(5, 3, 8, **F64)  # (N, B, E)
    out, w = m(x, need_weights=True, is_causal=True)
    assert out.shape == (5, 3, 8) and w.shape == (3, 5, 5)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 5, **F64))
    assert (w.triu(1) == 0).all()
    m.batch_first = True
    torch.testing.assert_close(m(x.transpose(0, 1), is_causal=True)[0], out.transpose(0, 1))
    assert "mode='sparsemax'" in repr(m)


def test_dropout_only_in_training():
    m = SparseAttention(8, 2, dropout=0.5, backend="reference", **F64)
    x = torch.randn(2, 4, 8, **F64)
    m.eval()
    torch.testing.assert_close(m(x)[0], m(x)[0])
    m.train()
    assert not torch.allclose(m(x)[0], m(x)[0])


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
    attn = SparseAttention(16, 2, mode="shrink", backend=backend)
    block = SparseCodingTransformerBlock(16, 2, mode="sparsemax", backend=backend)
    x = torch.randn(2, 6, 16, requires_grad=True)
    # aot_eager traces forward and backward through the ops' fakes and autograd registrations without
    # spending the test budget on inductor's C++ code generation.
    c_attn = torch.compile(attn, fullgraph=True, backend="aot_eager")
    c_block = torch.compile(block, fullgraph=True, backend="aot_eager")
    for eager, compiled, kwargs in ((attn, c_attn, dict(is_causal=True)), (block, c_block, dict(is_causal=True))):
        want = eager(x, **kwargs)
        got = compiled(x, **kwargs)
        want, got = (want[0], got[0]) if isinstance(want, tuple) else (want, got)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        (gx,) = torch.autograd.grad(got.sum(), x)
        (wx,) = torch.autograd.grad(want.sum(), x)
        torch.testing.assert_close(gx, wx, atol=1e-4, rtol=1e-4)


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
