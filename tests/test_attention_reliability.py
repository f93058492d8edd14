"""Sparsemax and sparse attention on the inputs that used to crash or silently go wrong, on every backend: empty
sizes on every axis, NaN / inf / huge values, ties at the threshold, near-flat rows, fully padded rows, double
backward, meta tensors and bad masks."""

import pytest
import torch

import dsc_kernels.functional as DF
from dsc_kernels.reference.attention import sparse_attention_ref

BACKENDS = ["reference", "cpp", pytest.param("triton", marks=pytest.mark.interpreter)]
INF, NAN = float("inf"), float("nan")


def _prepare(backend, device="cpu"):
    if backend != "reference" and (reason := DF.backend_unavailable_reason(backend, device)) is not None:
        pytest.skip(reason)


def _dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


def _qkv(b, h, n, m, d, dv, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
        for shape in ((b, h, n, d), (b, h, m, d), (b, h, m, dv))
    ]


def _mode_args(mode, h, dtype):
    return dict(mode=mode, threshold=torch.full((h,), 0.1, dtype=dtype) if mode == "shrink" else None)


# ------------------------------------------------------------------------------------------------ sparsemax
@pytest.mark.parametrize(
    "x,want",
    [
        ([1e7] * 4, [0.25] * 4),  # used to give [1, 1, 1, 1]
        ([1e8, 1e8 - 8, 3.0], [1.0, 0.0, 0.0]),  # finite fp32 near 1e8 used to crash
        ([INF, 1.0, INF, -INF], [0.5, 0.0, 0.5, 0.0]),  # +inf entries share the mass
        ([NAN, 1.0, 2.0], [NAN, NAN, NAN]),  # NaN propagates to the slice, as F.softmax
        ([-INF, -INF], [0.0, 0.0]),  # no finite entry: zeros, not NaN
        ([2.0, 2.0, 2.0, -5.0], [1 / 3, 1 / 3, 1 / 3, 0.0]),  # ties
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparsemax_extended_values(x, want, dtype):
    got = DF.sparsemax(torch.tensor(x, dtype=dtype))
    torch.testing.assert_close(got, torch.tensor(want, dtype=dtype), equal_nan=True)


@pytest.mark.parametrize("offset", [0.0, 1e4, 1e7, -1e9])
def test_sparsemax_is_shift_invariant_and_on_the_simplex(offset):
    x = torch.randn(64, 300, dtype=torch.float64)
    want = DF.sparsemax(x)
    got = DF.sparsemax((x + offset).float())
    torch.testing.assert_close(got.sum(-1), torch.ones(64), atol=1e-5, rtol=0)
    assert (got >= 0).all()
    # The input's own rounding (|offset| * 2^-24) bounds what any fp32 implementation can get right.
    torch.testing.assert_close(got.double(), want, atol=2e-6 + 4 * abs(offset) * 2**-24, rtol=0)


def test_sparsemax_of_a_0d_tensor_is_one_like_softmax():
    x = torch.tensor(3.0, requires_grad=True)
    for dim in (0, -1):
        y = DF.sparsemax(x, dim)
        assert y.shape == () and y.item() == 1.0 == torch.softmax(x, dim).item()
    (grad,) = torch.autograd.grad(y, x)
    assert grad.item() == 0.0
    with pytest.raises(ValueError, match=r"dim must be an int in \[-1, 1\)"):
        DF.sparsemax(x, 1)


def test_sparsemax_empty_dim_and_half_precision():
    assert DF.sparsemax(torch.empty(3, 0)).shape == (3, 0)
    assert DF.sparsemax(torch.empty(0, 4), dim=0).shape == (0, 4)
    x = torch.randn(5, 7)
    torch.testing.assert_close(DF.sparsemax(x.half()).float(), DF.sparsemax(x.half().float()), atol=1e-3, rtol=0)


@pytest.mark.parametrize("x", [[1.0, 0.0, 0.0], [3.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
def test_sparsemax_gradient_uses_the_strict_support(x):
    """Entries sitting exactly at tau get no gradient (integer logits, all-zero padding rows): the Jacobian is
    diag(m) - m m^T / |S| with m = [x > tau]."""
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    p = DF.sparsemax(xt)
    g = torch.arange(1.0, len(x) + 1, dtype=torch.float64)
    (grad,) = torch.autograd.grad(p, xt, g)
    support = (p > 0).double()
    want = support * (g - (support * g).sum() / support.sum())
    torch.testing.assert_close(grad, want)
    if x == [1.0, 0.0, 0.0]:
        assert torch.equal(grad, torch.zeros(3, dtype=torch.float64))  # it used to be [-5, 2, 3]


# ---------------------------------------------------------------------------------------------- empty sizes
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
@pytest.mark.parametrize("empty", ["B", "H", "N", "M", "dv"])
def test_zero_sizes_give_the_empty_or_zero_result(backend, mode, empty):
    """Any empty axis gives the reference's result (M = 0: every row sees no key, O = 0), gradients included."""
    _prepare(backend)
    dtype = _dtype(backend)
    sizes = dict(B=2, H=3, N=5, M=4, dv=6)
    sizes[empty] = 0
    q, k, v = _qkv(sizes["B"], sizes["H"], sizes["N"], sizes["M"], 8, sizes["dv"], dtype)
    kwargs = _mode_args(mode, sizes["H"], dtype)
    out = DF.sparse_attention(q, k, v, causal=True, backend=backend, **kwargs)
    assert out.shape == (sizes["B"], sizes["H"], sizes["N"], sizes["dv"]) and out.dtype == dtype
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(g.shape == t.shape and torch.equal(g, torch.zeros_like(g)) for g, t in zip(grads, (q, k, v)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_head_dim_is_one_clear_error(backend):
    _prepare(backend)
    q = torch.randn(1, 2, 4, 0, dtype=_dtype(backend))
    with pytest.raises(ValueError, match="head dim >= 1"):
        DF.sparse_attention(q, q, q, backend=backend)


# ----------------------------------------------------------------------------------------- non-finite input
def _nan_case(where, dtype):
    q, k, v = (t.detach() for t in _qkv(1, 2, 6, 6, 4, 3, dtype, seed=1))
    if where == "q":
        q[0, 0, 2, 1] = NAN  # row 2 of head 0
    elif where == "k":
        k[0, 1, 3, 0] = NAN  # key 3 of head 1: causal rows 3.. see it
    elif where == "v":
        v[0, 1, 3, 2] = INF  # inf in a value: the same rows
    elif where == "q-inf":
        q[0, 0, 4, 0] = -INF
    return [t.requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
@pytest.mark.parametrize("where", ["q", "k", "v", "q-inf"])
def test_non_finite_inputs_make_the_rows_that_read_them_nan(backend, mode, where):
    """Each backend gives the reference's NaN rows (exactly the rows that see the bad value; the others finite
    and equal), and the same gradients: NaN rows pass none, the rest are finite."""
    _prepare(backend)
    dtype = _dtype(backend)
    q, k, v = _nan_case(where, dtype)
    kwargs = _mode_args(mode, 2, dtype)
    out = DF.sparse_attention(q, k, v, causal=True, backend=backend, **kwargs)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = sparse_attention_ref(q64, k64, v64, causal=True, **{**kwargs, "threshold": 0.1 if mode == "shrink" else 0.0})
    rows = torch.isnan(want).any(-1)
    expected = {
        "q": [(0, 2)],
        "k": [(1, i) for i in range(3, 6)],
        "v": [(1, i) for i in range(3, 6)],
        "q-inf": [(0, 4)],
    }[where]
    assert sorted(map(tuple, rows[0].nonzero().tolist())) == expected
    assert torch.equal(torch.isnan(out), torch.isnan(want).expand_as(out) & rows[..., None])
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol, equal_nan=True)
    g = torch.randn_like(want)
    got = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    exp = torch.autograd.grad(want, (q64, k64, v64), g)
    for a, e in zip(got, exp):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), e, atol=10 * tol, rtol=10 * tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_hidden_key_never_reaches_a_row(backend):
    _prepare(backend)
    dtype = _dtype(backend)
    q, k, v = (t.detach() for t in _qkv(2, 1, 4, 5, 4, 3, dtype))
    k[0, 0, 4] = NAN
    v[1, 0, 0] = NAN
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[0, 4] = padding[1, 0] = True
    out = DF.sparse_attention(q, k, v, key_padding_mask=padding, backend=backend)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
def test_nan_in_a_float_mask_makes_its_row_nan(backend, mode):
    _prepare(backend)
    dtype = _dtype(backend)
    q, k, v = (t.detach() for t in _qkv(1, 2, 4, 5, 4, 3, dtype))
    mask = torch.zeros(4, 5, dtype=dtype)
    mask[2, 3] = NAN
    mask[1, 3] = float("-inf")
    out = DF.sparse_attention(q, k, v, attn_mask=mask, backend=backend, **_mode_args(mode, 2, dtype))
    assert torch.isnan(out[:, :, 2]).all() and torch.isfinite(out[:, :, [0, 1, 3]]).all()


# ------------------------------------------------------------------------------------ huge values and ties
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_scores_are_handled_relative_to_the_row_max(backend):
    _prepare(backend)
    q = torch.ones(1, 1, 1, 1)
    k = torch.tensor([3e7, 0.0]).view(1, 1, 2, 1)
    v = torch.tensor([1.0, 2.0]).view(1, 1, 2, 1)
    assert DF.sparse_attention(q, k, v, scale=1.0, backend=backend).item() == 1.0  # used to be inf on cpp
    if backend != "triton":
        k64 = torch.tensor([1e17, 1e17 - 64, 0.0], dtype=torch.float64).view(1, 1, 3, 1)
        v64 = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).view(1, 1, 3, 1)
        assert DF.sparse_attention(q.double(), k64, v64, scale=1.0, backend=backend).item() == 1.0


@pytest.mark.parametrize(
    "backend,device,threads",
    [
        *(("reference", "cpu", t) for t in (1, 3)),
        *(("cpp", "cpu", t) for t in (1, 3)),
        pytest.param("triton", "cpu", 1, marks=pytest.mark.interpreter),
        pytest.param("triton", "cuda", 1, marks=pytest.mark.gpu),
    ],
)
def test_backward_uses_the_forwards_p_on_peaked_rows(backend, device, threads, monkeypatch):
    """Scores ~1e6: every row's support is its top key (P = 1), so dk is exactly 0 and dv is the sum of g over the
    rows that picked the key. The backward must see the forward's scores bit for bit: recomputed with another GEMM
    they differed by an ulp of 1e6 (0.25 in float32), which moved P to 0.75 and dv by 10%. Three threads on one
    head split the C++ backward's query panels into groups with their own dk/dv sums. On a GPU, full float32 dots
    (TF32 would round the scores by ~1e3)."""
    _prepare(backend, device)
    if device == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    gen = torch.Generator().manual_seed(0)
    q64, k64, v64, g64 = (torch.randn(1, 1, 130, 33, generator=gen, dtype=torch.float64) for _ in range(4))
    q64, k64 = 1000 * q64, 1000 * k64
    q, k, v = (t.to(device, torch.float32).requires_grad_() for t in (q64, k64, v64))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = DF.sparse_attention(q, k, v, backend=backend)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), g64.to(device, torch.float32))
    finally:
        torch.set_num_threads(before)
    top = (q64 @ k64.transpose(-1, -2)).argmax(-1)[0, 0]  # each row's key (no near-ties at this scale)
    want_dv = torch.zeros(130, 33, dtype=torch.float64).index_add_(0, top, g64[0, 0])
    assert torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dq, torch.zeros_like(dq))
    torch.testing.assert_close(dv[0, 0].double().cpu(), want_dv, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_tied_keys(backend):
    """1,000 keys tied at a score of 1e5 share the row equally (used to give inf/NaN on cpp)."""
    _prepare(backend)
    m = 1000
    q = torch.ones(1, 1, 1, 1)
    k = torch.full((1, 1, m, 1), 1e5)
    v = torch.randn(1, 1, m, 3, generator=torch.Generator().manual_seed(0))
    out = DF.sparse_attention(q, k, v, scale=1.0, backend=backend)
    torch.testing.assert_close(out[0, 0, 0], v[0, 0].mean(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflowing_scores_share_the_mass_of_the_inf_keys(backend):
    """Finite inputs whose scores overflow to +inf: the +inf keys share the row (sparsemax's limit), as the
    reference does, with a zero score gradient."""
    _prepare(backend)
    q = torch.full((1, 1, 2, 2), 1e20).requires_grad_()
    k = torch.tensor([[1e20, 1e20], [1.0, 0.0], [1e20, 1e19], [-1e20, -1e20]]).view(1, 1, 4, 2).requires_grad_()
    v = torch.arange(8.0).view(1, 1, 4, 2).requires_grad_()
    out = DF.sparse_attention(q, k, v, scale=1.0, backend=backend)
    torch.testing.assert_close(out[0, 0], (v[0, 0, 0] + v[0, 0, 2]).detach().expand(2, 2) / 2)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dk, torch.zeros_like(dk))
    torch.testing.assert_close(dv[0, 0, :, 0], torch.tensor([1.0, 0.0, 1.0, 0.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_near_flat_long_row_keeps_fp32_accuracy(backend):
    """A 4,096-key fp32 row of scores 1 + 1e-4 noise: tau's sums are compensated / fp64 and taken relative to the
    row max. Before: cpp 2.4e-3 relative error, reference 1.3e-5; now ~1e-6 (the output's own rounding)."""
    _prepare(backend)
    m = 1024 if backend == "triton" else 4096  # the interpreter walks tiles one by one
    gen = torch.Generator().manual_seed(0)
    k = (1 + 1e-4 * torch.randn(m, generator=gen, dtype=torch.float64)).float().view(1, 1, m, 1)
    v = torch.randn(1, 1, m, 8, generator=gen)
    q = torch.ones(1, 1, 1, 1)
    want = sparse_attention_ref(q.double(), k.double(), v.double(), scale=1.0)
    got = DF.sparse_attention(q, k, v, scale=1.0, backend=backend)
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
def test_scores_exactly_at_the_threshold_get_no_gradient(backend, mode):
    """Integer-valued scores [1, 0, 0] (sparsemax tau = 0) and a shrink threshold equal to a score: the entries on
    the threshold are outside the support in every backend and in the reference's gradient."""
    _prepare(backend)
    dtype = _dtype(backend)
    q = torch.ones(1, 1, 1, 1, dtype=dtype, requires_grad=True)
    k = torch.tensor([1.0, 0.0, 0.0], dtype=dtype).view(1, 1, 3, 1).requires_grad_()
    v = torch.tensor([[1.0], [2.0], [3.0]], dtype=dtype).view(1, 1, 3, 1).requires_grad_()
    th = torch.tensor([0.0], dtype=dtype, requires_grad=True)
    kwargs = dict(mode=mode, threshold=th if mode == "shrink" else None, scale=1.0)
    out = DF.sparse_attention(q, k, v, backend=backend, **kwargs)
    assert out.item() == 1.0
    inputs = (q, k, v) + ((th,) if mode == "shrink" else ())
    got = torch.autograd.grad(out, inputs, torch.ones_like(out))
    # Support {key 0}: sparsemax's P_0 = 1 is locally constant; shrink's P_0 = s_0 - theta moves with q, k_0.
    if mode == "sparsemax":
        want = (torch.zeros(1), torch.zeros(3), torch.tensor([1.0, 0.0, 0.0]))
    else:
        want = (torch.ones(1), torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]), -torch.ones(1))
    for a, e in zip(got, want):
        torch.testing.assert_close(a.flatten().double(), e.double())


# ------------------------------------------------------------------------------------------- padding rows
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
@pytest.mark.parametrize("causal", [False, True])
def test_fully_padded_rows_give_zero_and_zero_gradients(backend, mode, causal):
    _prepare(backend)
    dtype = _dtype(backend)
    q, k, v = _qkv(3, 2, 5, 6, 4, 3, dtype)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[1] = True  # sequence 1 has no key at all
    padding[2, 0] = True  # causal: query 0 of sequence 2 sees no key
    out = DF.sparse_attention(
        q, k, v, causal=causal, key_padding_mask=padding, backend=backend, **_mode_args(mode, 2, dtype)
    )
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    if causal:
        assert torch.equal(out[2, :, 0], torch.zeros_like(out[2, :, 0]))
    dq, dk, dv = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert all(torch.equal(g[1], torch.zeros_like(g[1])) for g in (dq, dk, dv))
    assert torch.equal(dk[2, :, 0], torch.zeros_like(dk[2, :, 0])) and torch.isfinite(dq).all()


# -------------------------------------------------------------------------------- double backward, meta, masks
@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_double_backward_through_a_fused_backend_raises_naming_the_reference(backend):
    _prepare(backend)
    q, k, v = _qkv(1, 2, 5, 5, 4, 4, _dtype(backend))
    out = DF.sparse_attention(q, k, v, backend=backend)
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="backend='reference'"):
        gq.sum().backward()


def test_double_backward_through_the_reference():
    q, k, v = _qkv(1, 2, 4, 5, 3, 2, torch.float64)
    for mode in ("sparsemax", "shrink"):
        kwargs = _mode_args(mode, 2, torch.float64)
        assert torch.autograd.gradgradcheck(
            lambda q, k, v, kwargs=kwargs: DF.sparse_attention(q, k, v, backend="reference", **kwargs), (q, k, v)
        )


def test_meta_tensors():
    q = torch.empty(2, 3, 5, 8, device="meta")
    k = torch.empty(2, 3, 7, 8, device="meta")
    out = DF.sparse_attention(q, k, k[..., :4], key_padding_mask=torch.zeros(2, 7, dtype=torch.bool, device="meta"))
    assert out.shape == (2, 3, 5, 4) and out.device.type == "meta"
    assert DF.sparse_attention_weights(q, k).shape == (2, 3, 5, 7)
    assert DF.sparsemax(torch.empty(4, 9, device="meta")).shape == (4, 9)


def test_mask_errors_name_the_argument():
    q = torch.randn(2, 1, 3, 4)
    with pytest.raises(ValueError, match="key_padding_mask must be \\(B, M\\)"):
        DF.sparse_attention(q, q, q, key_padding_mask=torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool or floating-point"):
        DF.sparse_attention(q, q, q, key_padding_mask=torch.zeros(2, 3, dtype=torch.int64))
    # a learned score bias is differentiated by the reference only: a fused backend asked for it by name refuses
    with pytest.raises(ValueError, match="backend='cpp' cannot run mask_grad"):
        DF.sparse_attention(q, q, q, attn_mask=torch.zeros(3, 3, requires_grad=True), backend="cpp")
    with pytest.raises(ValueError, match="attn_mask must be broadcastable"):
        DF.sparse_attention(q, q, q, attn_mask=torch.zeros(4, 3))
    with pytest.raises(TypeError, match="attn_mask must be a torch.Tensor"):
        DF.sparse_attention(q, q, q, attn_mask=[[0.0]])
    for fn in (DF.sparse_attention, DF.sparse_attention_weights):  # used to be AttributeError: no .shape on a list
        with pytest.raises(TypeError, match="key_padding_mask must be a torch.Tensor"):
            fn(q, q, *(q,) * (fn is DF.sparse_attention), key_padding_mask=[[False, True, False]] * 2)
    with pytest.raises(ValueError, match="one device"):
        DF.sparse_attention(q, q, q, attn_mask=torch.zeros(3, 3, device="meta"))


def test_argument_shapes_and_values_outside_the_contract_are_named():
    """A 5-D attn_mask (its last four dims fit), a k of a smaller head dim than q's, a threshold of neither () nor
    (H,), and scale 0 (every score 0): each a ValueError naming the argument, before any backend runs."""
    q = torch.randn(2, 2, 3, 4)
    with pytest.raises(ValueError, match="attn_mask must be broadcastable"):
        DF.sparse_attention(q, q, q, attn_mask=torch.zeros(1, 2, 2, 3, 3))
    with pytest.raises(ValueError, match="k must have q's head dim 4, got 3"):
        DF.sparse_attention(q, q[..., :3], q)
    for shape in ((3,), (1,)):
        with pytest.raises(ValueError, match="threshold must be a float or a tensor of shape \\(H,\\)"):
            DF.sparse_attention(q, q, q, mode="shrink", threshold=torch.full(shape, 0.1))
    with pytest.raises(ValueError, match="scale must be > 0"):
        DF.sparse_attention(q, q, q, scale=0.0)


@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
def test_a_learned_score_bias_gets_its_gradient(mode):
    """A float attn_mask / key_padding_mask that requires grad is differentiated (as nn.MultiheadAttention does):
    ``auto`` runs such calls on the reference, whose gradient matches finite differences (gradcheck, float64), and
    the output is the one the fused path gives for the same mask without grad."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 4, 3, dtype=torch.float64) for _ in range(3))
    attn_mask = (0.5 * torch.randn(4, 4, dtype=torch.float64)).requires_grad_()
    padding = (0.5 * torch.randn(2, 4, dtype=torch.float64)).requires_grad_()
    kw = dict(mode=mode, threshold=0.1 if mode == "shrink" else None)

    def f(a, pad):
        return DF.sparse_attention(q, k, v, attn_mask=a, key_padding_mask=pad, **kw)

    assert torch.autograd.gradcheck(f, (attn_mask, padding))
    f(attn_mask, padding).sum().backward()
    assert attn_mask.grad is not None and attn_mask.grad.abs().sum() > 0 and padding.grad.abs().sum() > 0
    fused = DF.sparse_attention(q, k, v, attn_mask=attn_mask.detach(), key_padding_mask=padding.detach(), **kw)
    torch.testing.assert_close(f(attn_mask, padding), fused)
