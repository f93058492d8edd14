"""The sparse-attention oracle: sparsemax identities, gradchecks, masking, empty rows and the row statistics."""

import pytest
import torch

from dsc_kernels.reference.attention import (
    sparse_attention_bwd_ref,
    sparse_attention_fwd_ref,
    sparse_attention_ref,
    sparsemax_ref,
)


def sparsemax_bisect(x: torch.Tensor, n_iter: int = 200) -> torch.Tensor:
    """Sparsemax along the last dim by bisection on tau in [max - 1, max] (an independent implementation)."""
    hi = x.max(-1, keepdim=True).values
    lo = hi - 1
    for _ in range(n_iter):
        mid = (lo + hi) / 2
        above = torch.clamp(x - mid, min=0).sum(-1, keepdim=True) >= 1
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return torch.clamp(x - lo, min=0)


def sparsemax_by_sorting(x: torch.Tensor) -> torch.Tensor:
    """Textbook sort-based sparsemax (Martins & Astudillo 2016, Alg. 1), one row at a time."""
    out = torch.empty_like(x)
    for idx in range(x.shape[0]):
        z = x[idx]
        zs = torch.sort(z, descending=True).values
        k = max(j + 1 for j in range(len(zs)) if 1 + (j + 1) * zs[j] > zs[: j + 1].sum())
        out[idx] = torch.clamp(z - (zs[:k].sum() - 1) / k, min=0)
    return out


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_sparsemax_simplex_and_independent_implementations(scale):
    x = torch.randn(20, 33, dtype=torch.float64) * scale
    p = sparsemax_ref(x)
    assert torch.allclose(p.sum(-1), torch.ones(20, dtype=torch.float64))
    assert (p >= 0).all()
    torch.testing.assert_close(p, sparsemax_by_sorting(x))
    torch.testing.assert_close(p, sparsemax_bisect(x), atol=1e-12, rtol=0)
    if scale == 10.0:
        assert (p == 0).float().mean() > 0.5  # exactly sparse


def test_sparsemax_dim_argument():
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    torch.testing.assert_close(sparsemax_ref(x, dim=1), sparsemax_ref(x.transpose(1, 2)).transpose(1, 2))


def test_sparsemax_gradcheck():
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sparsemax_ref, (x,))


def test_sparsemax_masked_rows_are_zero_not_nan():
    x = torch.full((3, 5), float("-inf"), dtype=torch.float64)
    x[1, 2] = 0.3
    x[2, :3] = torch.tensor([0.1, 0.2, 0.9], dtype=torch.float64)
    x.requires_grad_()
    p = sparsemax_ref(x)
    assert torch.equal(p[0], torch.zeros(5, dtype=torch.float64))
    assert p[1, 2] == 1 and p[1].sum() == 1
    torch.testing.assert_close(p[2, :3], sparsemax_ref(x[2, :3].detach()))
    p.square().sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[0] == 0).all()


def _qkv(n, m, d, dtype=torch.float64, b=2, h=3, requires_grad=True):
    q, k, v = (torch.randn(b, h, length, d, dtype=dtype) for length in (n, m, m))
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
@pytest.mark.parametrize("causal,n,m", [(False, 4, 5), (True, 5, 3), (True, 3, 5)])
def test_sparse_attention_ref_gradcheck(mode, causal, n, m):
    q, k, v = _qkv(n, m, 3, b=1, h=2)
    th = (torch.rand(2, dtype=torch.float64) * 0.3).requires_grad_()

    def f(q, k, v, th):
        return sparse_attention_ref(q, k, v, mode=mode, threshold=th, causal=causal, scale=0.8)

    inputs = (q, k, v, th) if mode == "shrink" else (q, k, v)
    assert torch.autograd.gradcheck(lambda *a: f(*a, *((th,) if mode == "sparsemax" else ())), inputs)


@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
@pytest.mark.parametrize("causal", [False, True])
def test_hand_written_vjp_matches_autograd(mode, causal):
    q, k, v = _qkv(7, 5, 6)
    th = (torch.rand(3, dtype=torch.float64) * 0.3).requires_grad_()
    out = sparse_attention_ref(q, k, v, mode=mode, threshold=th, causal=causal, scale=0.5)
    g = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v, th), g, allow_unused=True)
    out2, stats = sparse_attention_fwd_ref(q, k, v, th, None, mode, causal, 0.5)
    got = sparse_attention_bwd_ref(g, q, k, v, th, None, stats, mode, causal, 0.5)
    torch.testing.assert_close(out2, out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b)
    assert stats.shape == (2, 3, 7, 2)


def test_causal_is_top_left_like_sdpa():
    q, k, v = _qkv(3, 5, 4, requires_grad=False)
    out = sparse_attention_ref(q, k, v, mode="sparsemax", causal=True)
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])  # query 0 sees key 0 only
    s = q @ k.transpose(-1, -2) / 2
    p = sparsemax_ref(s.masked_fill(torch.ones(3, 5, dtype=torch.bool).triu(1), float("-inf")))
    torch.testing.assert_close(out, p @ v)


def test_no_active_key_gives_zero_not_nan():
    q, k, v = _qkv(5, 6, 4)
    out = sparse_attention_ref(q, k, v, mode="shrink", threshold=1e6, causal=True)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in (q, k, v))


def test_half_inputs_computed_in_float32():
    q, k, v = _qkv(5, 6, 8, dtype=torch.bfloat16, requires_grad=False)
    out = sparse_attention_ref(q, k, v, mode="sparsemax")
    assert out.dtype == torch.bfloat16
    want = sparse_attention_ref(q.double(), k.double(), v.double(), mode="sparsemax")
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
def test_hand_written_vjp_with_a_bias_and_special_rows(mode):
    """The split forward/backward agrees with autograd through the oracle on a float bias hiding keys, a fully
    hidden row, a NaN row and a row with +inf scores."""
    q, k, v = _qkv(6, 7, 4)
    th = (torch.rand(3, dtype=torch.float64) * 0.3).requires_grad_()
    bias = torch.randn(2, 1, 6, 7, dtype=torch.float64)
    bias[:, :, :, 2] = float("-inf")
    bias[0, :, 3] = float("-inf")  # row 3 of batch 0 sees no key
    bias[1, :, 1, 4] = float("nan")  # row 1 of batch 1 is NaN
    bias[1, :, 5, 0] = float("inf")  # row 5 of batch 1 has a +inf score
    bias = bias.expand(2, 3, 6, 7)
    out = sparse_attention_ref(q, k, v, mode=mode, threshold=th, scale=0.5, bias=bias)
    g = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v, th), g, allow_unused=True)
    out2, stats = sparse_attention_fwd_ref(q, k, v, th, bias, mode, False, 0.5)
    torch.testing.assert_close(out2, out, equal_nan=True)
    assert torch.isnan(out[1, :, 1]).all() and torch.isfinite(out[0]).all()
    assert torch.equal(out[0, :, 3], torch.zeros_like(out[0, :, 3]))
    got = sparse_attention_bwd_ref(g, q, k, v, th, bias, stats, mode, False, 0.5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b)
    if mode == "sparsemax":
        torch.testing.assert_close(out[1, :, 5], v[1, :, 0].detach())  # the +inf key takes the whole row
        assert torch.equal(stats[0, :, 3], torch.full_like(stats[0, :, 3], float("inf")))
        assert stats[1, 0, 5, 0] == float("inf") and stats[1, 0, 5, 1] == -1.0


def test_row_statistics_encode_the_threshold_relative_to_the_row_max():
    q, k, v = _qkv(5, 9, 4, requires_grad=False)
    _, stats = sparse_attention_fwd_ref(q, k, v, torch.zeros(3, dtype=torch.float64), None, "sparsemax", False, 0.7)
    s = 0.7 * q @ k.transpose(-1, -2)
    torch.testing.assert_close(stats[..., 0], s.amax(-1))
    assert (stats[..., 1] >= -1).all() and (stats[..., 1] < 0).all()
    p = torch.clamp(s - stats[..., :1] - stats[..., 1:], min=0)
    torch.testing.assert_close(p, sparsemax_ref(s))


def test_hand_written_vjp_passes_no_gradient_from_a_nan_row():
    # A NaN row's upstream gradient is often NaN itself (d/dO of O^2 at O = NaN): "such a row passes no gradient",
    # so dq, dk and dv are those of the other rows alone, computed here from the math (sparsemax by bisection, its
    # Jacobian diag(m) - m m^T / |S|), not from the reference.
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 3, dtype=torch.float64) for n in (4, 5, 5))
    q[0, 0, 0, 1] = float("nan")
    g = torch.randn(1, 1, 4, 3, dtype=torch.float64)
    g[0, 0, 0] = float("nan")
    scale = 3**-0.5
    out, stats = sparse_attention_fwd_ref(q, k, v, torch.zeros(1), None, "sparsemax", False, scale)
    assert torch.isnan(out[0, 0, 0]).all() and torch.isfinite(out[0, 0, 1:]).all()
    dq, dk, dv, _ = sparse_attention_bwd_ref(g, q, k, v, torch.zeros(1), None, stats, "sparsemax", False, scale)
    qs, ks, vs, gs = q[0, 0, 1:], k[0, 0], v[0, 0], g[0, 0, 1:]
    p = sparsemax_bisect(scale * qs @ ks.T)
    on = (p > 0).double()
    dp = (gs @ vs.T) * on
    ds = on * (dp - dp.sum(-1, keepdim=True) / on.sum(-1, keepdim=True))
    torch.testing.assert_close(dv[0, 0], p.T @ gs)
    torch.testing.assert_close(dk[0, 0], scale * ds.T @ qs)
    torch.testing.assert_close(dq[0, 0, 1:], scale * ds @ ks)
    assert torch.equal(dq[0, 0, 0], torch.zeros(3, dtype=torch.float64))


def test_hand_written_vjp_of_a_row_with_infinite_scores_moves_no_score():
    # A row holding +inf scores shares its mass equally among them whatever the finite scores are: its P is
    # constant, so it passes no score gradient (dq row 0, nothing to dk), while dv still gets P^T g. Expected
    # values from the math: P row 0 = (0, 1/2, 0, 1/2), the other rows sparsemax by bisection and its Jacobian.
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 1, n, 3, dtype=torch.float64) for n in (3, 4, 4))
    bias = torch.zeros(1, 1, 3, 4, dtype=torch.float64)
    bias[0, 0, 0, 1] = bias[0, 0, 0, 3] = float("inf")
    g = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    scale = 0.5
    out, stats = sparse_attention_fwd_ref(q, k, v, torch.zeros(1), bias, "sparsemax", False, scale)
    dq, dk, dv, _ = sparse_attention_bwd_ref(g, q, k, v, torch.zeros(1), bias, stats, "sparsemax", False, scale)
    qs, ks, vs, gs = q[0, 0], k[0, 0], v[0, 0], g[0, 0]
    p = sparsemax_bisect(scale * qs @ ks.T)
    p[0] = torch.tensor([0.0, 0.5, 0.0, 0.5], dtype=torch.float64)
    on = (p > 0).double()
    dp = (gs @ vs.T) * on
    ds = on * (dp - dp.sum(-1, keepdim=True) / on.sum(-1, keepdim=True))
    ds[0] = 0.0
    torch.testing.assert_close(out[0, 0], p @ vs)
    torch.testing.assert_close(dv[0, 0], p.T @ gs)
    torch.testing.assert_close(dq[0, 0], scale * ds @ ks)
    torch.testing.assert_close(dk[0, 0], scale * ds.T @ qs)


def test_float32_scores_whose_unscaled_product_overflows_keep_their_values():
    # scale q k^T with scale < 1: the scores (~4e37) fit float32, but q k^T itself (~4e38) does not, and a float32
    # GEMM made both scores inf (a +inf row: P = 1/2, 1/2). Expected from float64: scores 4e37 and 3.9e37, far
    # apart, so P = (1, 0) and O = v_0.
    q = torch.full((1, 1, 1, 4), 1e19)
    k = torch.full((1, 1, 2, 4), 1e19)
    k[0, 0, 1, 0] = 0.9e19
    v = torch.tensor([[[[1.0], [0.0]]]])
    s = 0.1 * q.double()[0, 0] @ k.double()[0, 0].T
    assert torch.isfinite(s.float()).all() and s[0, 0] - s[0, 1] > 1e35
    for mode in ("sparsemax", "shrink"):
        # sparsemax of two scores more than 1 apart is (1, 0) (bisection has no bits left at 4e37)
        want = torch.tensor([[1.0, 0.0]], dtype=torch.float64) if mode == "sparsemax" else s.clamp(min=0)
        got = sparse_attention_ref(q, k, v, mode=mode, scale=0.1)
        torch.testing.assert_close(got[0, 0], (want @ v.double()[0, 0]).float())


def test_sparsemax_gradient_of_a_nan_slice_is_zero_as_documented():
    """DF.sparsemax's docstring: a NaN slice gives NaN values and passes no gradient back; the other slices are
    unaffected (F.softmax's backward would give NaN for the NaN slice)."""
    import dsc_kernels.functional as DF

    x = torch.tensor([[1.0, float("nan"), 0.5], [1.0, 2.0, 0.2], [0.3, 0.1, 0.2]], dtype=torch.float64)
    x.requires_grad_(True)
    y = DF.sparsemax(x)
    g = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [1.0, 4.0, -2.0]], dtype=torch.float64)
    (grad,) = torch.autograd.grad(y, x, g)
    assert torch.isnan(y[0]).all() and torch.equal(grad[0], torch.zeros(3, dtype=torch.float64))
    # row 1: support {x_1} alone, so the Jacobian is 0; row 2: full support, J = I - 11^T/3
    assert torch.equal(grad[1], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(grad[2], g[2] - g[2].mean(), rtol=0, atol=1e-15)
