"""key_padding_mask and attn_mask of functional.sparse_attention on every backend, against the masked dense math
written out here: nn.MultiheadAttention's conventions, exact sparsity on masked keys, padded rows."""

import pytest
import torch

import dsc_kernels.functional as DF

BACKENDS = ["reference", "cpp", pytest.param("triton", marks=pytest.mark.interpreter)]


def _prepare(backend):
    if backend != "reference" and (reason := DF.backend_unavailable_reason(backend, "cpu")) is not None:
        pytest.skip(reason)


def _masks(b, n, m):
    """A bool key padding mask (B, M) with a fully padded sequence and a float (N, M) mask with -inf entries."""
    gen = torch.Generator().manual_seed(1)
    padding = torch.zeros(b, m, dtype=torch.bool)
    padding[0, m - 3 :] = True
    padding[b - 1] = True
    attn = torch.randn(n, m, generator=gen, dtype=torch.float64) * 0.5
    attn[:, 1] = float("-inf")
    attn[3, :] = float("-inf")
    return padding, attn


def _dense(q, k, v, padding, attn, mode, th, causal, scale):
    """Masked dense attention written out: s = scale q k^T + attn_mask, -inf on padded and causally later keys."""
    s = scale * q @ k.transpose(-1, -2) + attn
    s = s.masked_fill(padding[:, None, None, :], float("-inf"))
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    if mode == "sparsemax":
        p = DF.sparsemax(s)
    else:
        t = th.view(1, -1, 1, 1)
        p = torch.where(s > t, s - t, torch.zeros_like(s))
    return p @ v, p


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
@pytest.mark.parametrize("causal", [False, True])
def test_masks_match_the_dense_math(backend, mode, causal):
    _prepare(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    b, h, n, m, d = 3, 2, 9, 11, 8
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, length, d, generator=gen, dtype=torch.float64) for length in (n, m, m))
    th = torch.rand(h, generator=gen, dtype=torch.float64) * 0.2
    padding, attn = _masks(b, n, m)
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v, th)]
    kwargs = dict(mode=mode, threshold=leaves[3] if mode == "shrink" else None, causal=causal, scale=0.4)
    out = DF.sparse_attention(
        *leaves[:3], key_padding_mask=padding, attn_mask=attn.to(dtype), backend=backend, **kwargs
    )
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    want, p = _dense(*ref_leaves[:3], padding, attn, mode, ref_leaves[3], causal, 0.4)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    assert torch.equal(out[b - 1], torch.zeros_like(out[b - 1]))  # the fully padded sequence
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))  # the row attn_mask hides entirely
    g = torch.randn_like(want)
    used = 4 if mode == "shrink" else 3
    got = torch.autograd.grad(out, leaves[:used], g.to(dtype))
    exp = torch.autograd.grad(want, ref_leaves[:used], g)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a.double(), e, atol=10 * tol, rtol=10 * tol)
    # Exactly sparse: the weights of masked keys are exactly 0.
    weights = DF.sparse_attention_weights(*leaves[:2], key_padding_mask=padding, attn_mask=attn.to(dtype), **kwargs)
    torch.testing.assert_close(weights.double(), p, atol=tol, rtol=tol)
    assert (weights[0, :, :, m - 3 :] == 0).all() and (weights[..., 1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bool_and_float_masks_are_the_same_mask(backend):
    """MHA's convention: bool True ignores a key, float masks are added (-inf ignores); a (B, H, N, M) mask
    broadcasts like SDPA's."""
    _prepare(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 6, 4, generator=gen).to(dtype) for _ in range(3))
    hide = torch.rand(2, 2, 6, 6, generator=gen) < 0.3
    as_float = torch.zeros(2, 2, 6, 6, dtype=dtype).masked_fill(hide, float("-inf"))
    a = DF.sparse_attention(q, k, v, attn_mask=hide, backend=backend)
    torch.testing.assert_close(DF.sparse_attention(q, k, v, attn_mask=as_float, backend=backend), a)
    kpm = hide[:, 0, 0]
    torch.testing.assert_close(
        DF.sparse_attention(q, k, v, key_padding_mask=kpm, backend=backend),
        DF.sparse_attention(q, k, v, attn_mask=kpm[:, None, None, :], backend=backend),
    )
