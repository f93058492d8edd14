"""What an adversarial fuzz of sparse attention found: infinite weights leaking NaN into a NaN row's gradient,
float32 scores whose overflow each backend resolved its own way, thresholds and masks silently rounded or
overflowed in the compute dtype, and layer inputs that failed inside torch instead of naming the argument. The
randomised differential test at the end (cpp against the reference, forward and every gradient, float64) is the
harness that found the first two, kept small."""

import random

import pytest
import torch

import dsc_kernels.functional as DF
from dsc_kernels.nn import SparseAttention
from dsc_kernels.reference.attention import sparse_attention_ref

INF, NAN = float("inf"), float("nan")
BACKENDS = ["reference", "cpp"]


def _prepare(backend):
    if backend != "reference" and (reason := DF.backend_unavailable_reason(backend, "cpu")) is not None:
        pytest.skip(reason)


# ------------------------------------------------------------------------------------------ non-finite rows
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_row_passes_no_gradient_even_where_its_weights_are_infinite(backend):
    """Shrink on a +inf score gives P = inf. The row also sees an inf value, so it is NaN and passes no gradient:
    the reference used to form P anyway and send inf * 0 = NaN into dv."""
    _prepare(backend)
    q = torch.ones(1, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    k = torch.ones(1, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    v = torch.tensor([INF, 2.0], dtype=torch.float64).view(1, 1, 1, 2).requires_grad_()
    mask = torch.full((1, 1), INF, dtype=torch.float64)
    out = DF.sparse_attention(q, k, v, mode="shrink", threshold=0.0, attn_mask=mask, backend=backend)
    assert torch.isnan(out).all()
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


# ------------------------------------------------------------------------------------------- overflow
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_scores_whose_gemm_overflows_are_exact_then_rounded(backend):
    """q . k_0 = 3e38 + 3e38 - 3e38 - 3e38 = 0 exactly, but a float32 GEMM's partial sums overflow: inf (the
    reference: key 0 took the whole row) or inf - inf = NaN (cpp, by its summation order). Computed in float64 and
    rounded, the scores are (0, 3) and the row picks key 1, on every backend; gradients stay finite."""
    _prepare(backend)
    q = torch.tensor([3e38, 3e38, -3e38, -3e38]).view(1, 1, 1, 4).requires_grad_()
    k = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1e-38, 0.0, 0.0, 0.0]]).view(1, 1, 2, 4).requires_grad_()
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2).requires_grad_()
    out = DF.sparse_attention(q, k, v, scale=1.0, backend=backend)
    assert torch.equal(out, v[:, :, 1:].detach())
    assert torch.equal(DF.sparse_attention_weights(q, k, scale=1.0), torch.tensor([0.0, 1.0]).view(1, 1, 1, 2))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[2][0, 0], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_scores_whose_gemm_overflows_are_not_nan(backend):
    """float64 has no wider dtype to take its scores to: with A = 2^520, q_0 . k_1 = A^2 - A^2 = 0 and q_0 . k_2 =
    2 A^2 - A^2 = 2^1040 (beyond the range: +inf, which takes the row), but the GEMM summed inf - inf and finite
    inputs gave NaN rows (float32's own case, above, was handled). Scores from exactly scaled-down q, k, scaled
    back: every score exact or an honest +-inf, on every backend; gradients finite."""
    _prepare(backend)
    a = 2.0**520
    q = torch.tensor([[a, -a], [1.0, 2.0]], dtype=torch.float64).view(1, 1, 2, 2).requires_grad_()
    k = torch.tensor([[a, a], [2 * a, a], [1.0, 1.0], [a, 2 * a]], dtype=torch.float64).view(1, 1, 4, 2)
    k.requires_grad_()
    v = torch.arange(8.0, dtype=torch.float64).view(1, 1, 4, 2).requires_grad_()
    scores = torch.tensor([[0.0, INF, 0.0, -INF], [3 * a, 4 * a, 3.0, 5 * a]], dtype=torch.float64)
    want = DF.sparsemax(scores).view(1, 1, 2, 4)
    torch.testing.assert_close(DF.sparse_attention_weights(q, k, scale=1.0), want, rtol=0, atol=0)
    out = DF.sparse_attention(q, k, v, scale=1.0, backend=backend)
    torch.testing.assert_close(out, want @ v.detach(), rtol=0, atol=0)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(grads[2], want.transpose(-1, -2) @ torch.ones(1, 1, 2, 2, dtype=torch.float64))
    shrink = DF.sparse_attention(
        q[:, :, :1], k[:, :, :3], v[:, :, :3], mode="shrink", threshold=-1.0, scale=1.0, backend=backend
    )
    assert torch.isinf(shrink).all()  # P = (1, inf, 1): the +inf score's weight, not NaN
    # q 2^515 . k 2^515 scaled by 2^-1034 is (q . k) 2^-4, exactly: the same output and (scaled) gradients, bit for
    # bit, with several keys on each row's support (the reference's derivatives were g 2^shift, which overflowed)
    q0, k0, v = (
        torch.randn(1, 2, n, 3, generator=torch.Generator().manual_seed(n), dtype=torch.float64) for n in (3, 5, 5)
    )
    for mode, threshold in (("sparsemax", None), ("shrink", 0.0)):
        big = [(t * 2.0**515).requires_grad_() for t in (q0, k0)]
        small = [t.clone().requires_grad_() for t in (q0, k0)]
        out = DF.sparse_attention(*big, v, mode=mode, threshold=threshold, scale=2.0**-1034, backend=backend)
        want = DF.sparse_attention(*small, v, mode=mode, threshold=threshold, scale=2.0**-4, backend=backend)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        assert int((want != 0).sum()) > 0
        grads, wants = torch.autograd.grad(out.sum(), big), torch.autograd.grad(want.sum(), small)
        for got, expected in zip(grads, wants):
            assert expected.abs().max() > 0
            torch.testing.assert_close(got * 2.0**515, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_scores_with_a_huge_scale(backend):
    """d max(scale, 1) overflows on its own at scale 1e308 (the overflow path's shift takes each factor's exponent
    apart; frexp of inf is unspecified in C++): every backend gives the exact scores' answer, +-inf where a score is
    beyond the range. (An infinite scale, which functional refuses, keeps the plain GEMM: test_fuzz_raw_ops.)"""
    scale = 1e308
    _prepare(backend)
    q = torch.tensor([[0.5, 0.0], [1.0, 1.0]], dtype=torch.float64).view(1, 1, 2, 2)
    k = torch.tensor([[1.0, 0.0], [0.25, 0.0], [-1.0, 2.0]], dtype=torch.float64).view(1, 1, 3, 2)
    v = torch.arange(6.0, dtype=torch.float64).view(1, 1, 3, 2)
    scores = scale * torch.tensor([[0.5, 0.125, -0.5], [1.0, 0.25, 1.0]], dtype=torch.float64)
    want = DF.sparsemax(scores).view(1, 1, 2, 3) @ v
    torch.testing.assert_close(DF.sparse_attention(q, k, v, scale=scale, backend=backend), want, equal_nan=True)


# ---------------------------------------------------------------------------------- thresholds and masks
def test_float_threshold_is_kept_in_the_compute_dtype_for_half_inputs():
    """A float threshold used to be stored in q's dtype: 0.1 became 0.09998 in float16 (P off by 25% here), and
    a threshold beyond float16's range raised torch's 'value cannot be converted' RuntimeError."""
    q = torch.ones(1, 1, 1, 1, dtype=torch.float16)
    k = torch.tensor(0.1001, dtype=torch.float16).view(1, 1, 1, 1)
    p = DF.sparse_attention_weights(q, k, mode="shrink", threshold=0.1, scale=1.0)
    want = k.float().item() - torch.tensor(0.1, dtype=torch.float32).item()
    assert abs(p.item() - want) < 1e-3 * want
    out = DF.sparse_attention(q, k, k, mode="shrink", threshold=1e5, backend="reference")
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("threshold", [1e39, torch.full((2,), -1e39, dtype=torch.float64)])
def test_threshold_beyond_the_compute_range_names_it(threshold):
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="threshold must fit in torch.float32"):
        DF.sparse_attention(q, q, q, mode="shrink", threshold=threshold)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [3.5e38, 1e300])
def test_scale_beyond_the_compute_range_names_it(backend, scale):
    """A scale beyond float32's range became inf in the kernels for float32 inputs: every score +-inf, and the
    gradients NaN on cpp (inf * 0 in its float32 dq, dk) where the reference's float64 products gave +-inf."""
    _prepare(backend)
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="scale must fit in torch.float32"):
        DF.sparse_attention(q, q, q, scale=scale, backend=backend)
    with pytest.raises(ValueError, match="scale must fit in torch.float32"):
        DF.sparse_attention_weights(q, q, scale=scale)
    out = DF.sparse_attention(q.double(), q.double(), q.double(), scale=scale, backend=backend)  # fits float64
    assert out.shape == (1, 2, 3, 4)


@pytest.mark.parametrize("name", ["attn_mask", "key_padding_mask"])
def test_float64_mask_beyond_float32_range_names_it(name):
    """A finite 1e300 in a float64 mask on float32 scores silently became +inf: the row's mass all went to that
    key. -inf stays the way to hide a key."""
    q = torch.randn(2, 1, 3, 4)
    big = torch.zeros(2, 3, dtype=torch.float64)
    big[0, 1] = 1e300
    with pytest.raises(ValueError, match=f"{name}'s finite entries must fit in torch.float32"):
        DF.sparse_attention(q, q, q, **{name: big if name == "key_padding_mask" else big[:, None, None]})
    hide = torch.zeros(2, 3, dtype=torch.float64).masked_fill(big > 0, -INF)
    out = DF.sparse_attention(q, q, q, key_padding_mask=hide)
    assert torch.allclose(out, DF.sparse_attention(q, q, q, key_padding_mask=big > 0))


# -------------------------------------------------------------------------------------------- the layer
@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda m: m(torch.randn(8)), ValueError, "query must be"),  # was IndexError from transpose
        (lambda m: m(torch.ones(3, 2, 8, dtype=torch.long)), TypeError, "query must have a floating-point"),
        (lambda m: m(torch.randn(3, 2, 8, dtype=torch.float64)), TypeError, "query must have the layer's dtype"),
        (lambda m: m(torch.randn(3, 2, 8), attn_mask=[[0.0]]), TypeError, "attn_mask must be a torch.Tensor"),
        # were a RuntimeError inside F.linear, and "k on meta" after the projections
        (lambda m: m(torch.randn(3, 2, 8, device="meta")), ValueError, "query must be on the layer's device"),
        (lambda m: m(torch.randn(3, 2, 8), torch.randn(3, 2, 8, device="meta")), ValueError, "key must be on"),
        (
            lambda m: m(torch.randn(3, 2, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8, device="meta")),
            ValueError,
            "value must be on",
        ),
        (lambda m: m(torch.randn(3, 2, 8), is_causal="yes"), TypeError, "is_causal"),  # was on
        (lambda m: m(torch.randn(3, 2, 8), need_weights="no"), TypeError, "need_weights"),  # was on
        (lambda m: m(torch.randn(3, 2, 8), average_attn_weights=0), TypeError, "average_attn_weights"),
        (
            lambda m: m(torch.randn(3, 8), key_padding_mask=torch.zeros(1, 3, dtype=torch.bool)),
            ValueError,
            r"key_padding_mask must be \(M,\) for an unbatched query",
        ),
    ],
)
def test_layer_inputs_are_checked_by_name(call, error, match):
    with pytest.raises(error, match=match):
        call(SparseAttention(8, 2, backend="reference"))


def test_block_input_on_another_device_is_named():
    from dsc_kernels.nn import SparseCodingTransformerBlock

    with pytest.raises(ValueError, match="x must be on the block's device"):
        SparseCodingTransformerBlock(8, 2, backend="reference")(torch.randn(2, 3, 8, device="meta"))


def test_layer_still_takes_autocast_inputs():
    m = SparseAttention(8, 2, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = m(torch.randn(3, 2, 8, dtype=torch.bfloat16))
    assert out.shape == (3, 2, 8) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------ differential fuzz
def _case(rng: random.Random, seed: int, lengths: tuple[int, ...] = (1, 2, 5, 66)) -> dict:
    gen = torch.Generator().manual_seed(seed)
    b, h, n, m = rng.choice([1, 2]), rng.choice([1, 2]), rng.choice(lengths), rng.choice([1, 3, 7])
    d, dv = rng.choice([1, 3]), rng.choice([1, 2])
    q, k, v = (torch.randn(b, h, r, c, generator=gen, dtype=torch.float64) for r, c in ((n, d), (m, d), (m, dv)))
    for t in (q, k, v):
        if rng.random() < 0.25:
            t[tuple(rng.randrange(s) for s in t.shape)] = rng.choice([NAN, INF, -INF])
    if rng.random() < 0.3:  # non-contiguous layouts: the kernels read strides
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        k = k.mT.contiguous().mT
    mode = rng.choice(["sparsemax", "shrink"])
    threshold = torch.rand(h, generator=gen, dtype=torch.float64) * 0.4 if mode == "shrink" else None
    masks = {}
    if rng.random() < 0.4:
        masks["key_padding_mask"] = torch.rand(b, m, generator=gen) < rng.choice([0.3, 1.0])
    if rng.random() < 0.4:
        shape = rng.choice([(n, m), (h, n, m), (b, 1, 1, m)])
        mask = torch.randn(shape, generator=gen, dtype=torch.float64)
        masks["attn_mask"] = mask.masked_fill(torch.rand(shape, generator=gen) < 0.3, -INF)
    return dict(q=q, k=k, v=v, mode=mode, threshold=threshold, causal=rng.random() < 0.4, **masks)


def _run(case: dict, backend: str, seed: int):
    q, k, v = (case[n].detach().clone().requires_grad_() for n in "qkv")
    th = case["threshold"]
    th = None if th is None else th.detach().clone().requires_grad_()
    options = {n: case[n] for n in ("mode", "causal", "key_padding_mask", "attn_mask") if n in case}
    out = DF.sparse_attention(q, k, v, threshold=th, backend=backend, **options)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return out, torch.autograd.grad(out, (q, k, v) + ((th,) if th is not None else ()), grad)


def test_cpp_matches_the_reference_on_random_edge_cases():
    """Shapes across the 64-row panels, N != M, masks of both kinds and shapes, causal, strided inputs, NaN and
    inf in q, k, v: forward and every gradient (threshold's included) agree to float64 rounding, NaN for NaN."""
    _prepare("cpp")
    rng = random.Random(0)
    for seed in range(40):
        case = _case(rng, seed)
        out, grads = _run(case, "reference", seed)
        got, got_grads = _run(case, "cpp", seed)
        torch.testing.assert_close(got, out, rtol=1e-10, atol=1e-10, equal_nan=True, msg=f"seed {seed}")
        for want, have in zip(grads, got_grads):
            assert torch.isfinite(have).all(), f"seed {seed}: NaN rows must pass no gradient"
            torch.testing.assert_close(have, want, rtol=1e-10, atol=1e-10, msg=f"seed {seed}")


def test_reference_gradcheck_on_random_masked_cases():
    rng = random.Random(1)
    for seed in range(6):
        case = _case(rng, seed, lengths=(1, 2, 5))
        case["q"], case["k"], case["v"] = (torch.nan_to_num(case[n], 0.3, 0.3, -0.3) for n in "qkv")
        th = case.pop("threshold")
        ins = [case.pop(n).requires_grad_() for n in "qkv"] + ([th.requires_grad_()] if th is not None else [])

        def f(q, k, v, th=None, case=case):
            return DF.sparse_attention(q, k, v, threshold=th, backend="reference", **case)

        assert torch.autograd.gradcheck(f, ins), f"seed {seed}"


def test_half_precision_within_twice_eager_error():
    """float16 / bfloat16 against float64: at most twice the error of the same math in eager PyTorch in that
    dtype (scores and products in the low dtype, sparsemax's threshold exact)."""
    gen = torch.Generator().manual_seed(0)
    q64, k64, v64 = (2 * torch.randn(2, 2, 17, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = (t.to(dtype) for t in (q64, k64, v64))
        for mode, th in (("sparsemax", None), ("shrink", 0.1)):
            exact = sparse_attention_ref(q.double(), k.double(), v.double(), mode=mode, threshold=th or 0.0)
            s = (q @ k.mT) * 8**-0.5
            p = DF.sparsemax(s.double()).to(dtype) if mode == "sparsemax" else torch.relu(s - th)
            eager_error = ((p @ v).double() - exact).abs().mean()
            got = DF.sparse_attention(q, k, v, mode=mode, threshold=th, backend="reference")
            assert (got.double() - exact).abs().mean() <= 2 * eager_error, (dtype, mode)


@pytest.mark.parametrize(
    "name,value",
    # threshold=None is shrink's default threshold
    [
        (n, v)
        for n in ("dropout", "threshold")
        for v in ("0.1", None, True, torch.tensor(0.1))
        if (n, v) != ("threshold", None)
    ],
    ids=repr,
)
def test_layer_float_options_of_a_wrong_type_are_a_type_error(name, value):
    with pytest.raises(TypeError, match=f"{name} must be a float"):  # were ValueErrors
        SparseAttention(8, 2, mode="shrink", **{name: value})
