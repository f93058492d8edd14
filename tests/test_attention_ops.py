"""Every sparse-attention op backend against the reference: forward, row statistics, all gradients, opcheck."""
import pytest
import torch

import dsc_kernels.functional as DF
from dsc_kernels.ops import sparse_attention as sa
from dsc_kernels.reference.attention import sparse_attention_fwd_ref, sparse_attention_ref


# Triton on CPU tensors is the interpreter: those cases run in the interpreter process (tests/conftest.py).
TRITON_INTERPRETED = pytest.param("triton", marks=pytest.mark.interpreter)


def _cpp_or_skip():
    reason = DF.backend_unavailable_reason("cpp", "cpu")
    if reason is not None:
        pytest.skip(reason)


def _triton_or_skip():
    reason = DF.backend_unavailable_reason("triton", "cpu")
    if reason is not None:
        pytest.skip(reason)


def _prepare(backend):
    {"cpp": _cpp_or_skip, "triton": _triton_or_skip}.get(backend, lambda: None)()


def _fused(backend, *args):
    """The output of backend's forward op (differentiable through its backward op)."""
    return sa.op_pair(backend).forward(*args)[0]


def _problem(n, m, d, dtype, *, b=1, h=2, dv=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, length, d, generator=gen, dtype=torch.float64) for length in (n, m))
    v = torch.randn(b, h, m, dv or d, generator=gen, dtype=torch.float64)
    th = torch.rand(h, generator=gen, dtype=torch.float64) * 0.3
    return [t.to(dtype).requires_grad_() for t in (q, k, v, th)]


def _check_against_reference(backend, mode, causal, n, m, d, dtype, atol, dv=None):
    q, k, v, th = _problem(n, m, d, dtype, dv=dv)
    scale = d ** -0.5
    out = _fused(backend, q, k, v, th, mode, causal, scale)
    q64, k64, v64, th64 = (t.detach().double().requires_grad_() for t in (q, k, v, th))
    want = sparse_attention_ref(q64, k64, v64, mode=mode, threshold=th64, causal=causal, scale=scale)
    assert out.dtype == dtype and out.shape == want.shape
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=atol)
    g = torch.randn_like(want)
    got = torch.autograd.grad(out, (q, k, v, th), g.to(dtype))
    exp = torch.autograd.grad(want, (q64, k64, v64, th64), g, allow_unused=True)
    for name, a, b in zip("qkvt", got, exp):
        b = torch.zeros_like(a, dtype=torch.float64) if b is None else b
        assert a.shape == b.shape and a.dtype == dtype, name
        torch.testing.assert_close(a.double(), b, atol=atol * 10, rtol=atol * 10, msg=f"grad {name}")


SHAPES = [(5, 7, 16), (37, 19, 24), (17, 33, 64)]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,m,d", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_backends_match_reference(backend, mode, causal, n, m, d, dtype):
    _prepare(backend)
    _check_against_reference(backend, mode, causal, n, m, d, dtype, 1e-10 if dtype == torch.float64 else 2e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
@pytest.mark.parametrize("causal,n,m,d", [(False, 5, 7, 16), (True, 37, 19, 24), (True, 17, 33, 64),
                                          (False, 20, 18, 24), (True, 6, 11, 128)])
def test_triton_matches_reference(mode, causal, n, m, d):
    _prepare("triton")
    _check_against_reference("triton", mode, causal, n, m, d, torch.float32, 2e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(dtype):
    _prepare("triton")
    # Half inputs round the scores, which can move a key across the threshold: compare loosely.
    _check_against_reference("triton", "sparsemax", True, 19, 21, 16, dtype, 5e-2)


@pytest.mark.interpreter
def test_triton_value_dim_differs():
    _prepare("triton")
    _check_against_reference("triton", "shrink", False, 9, 11, 16, torch.float32, 2e-5, dv=24)


@pytest.mark.parametrize("backend", ["reference", "cpp", TRITON_INTERPRETED])
def test_row_statistics(backend):
    _prepare(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v, th = (t.detach() for t in _problem(18, 21, 16, dtype))
    for mode in ("sparsemax", "shrink"):
        _, stats = sa.op_pair(backend).forward(q, k, v, th, mode, True, 0.25)
        _, want = sparse_attention_fwd_ref(q.double(), k.double(), v.double(), th.double(), mode, True, 0.25)
        assert stats.shape == (1, 2, 18, 2)
        torch.testing.assert_close(stats.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpp", TRITON_INTERPRETED])
@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
def test_no_active_key_rows_are_zero(backend, mode):
    _prepare(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v, th = _problem(6, 5, 16, dtype)
    big = torch.full_like(th, 1e4).detach().requires_grad_()
    # shrink: every score is below the threshold. sparsemax: key 0 takes all of row 0 (the only visible key).
    out = _fused(backend, q, k, v, big, mode, True, 0.25)
    assert torch.isfinite(out).all()
    if mode == "shrink":
        assert torch.equal(out, torch.zeros_like(out))
    else:
        torch.testing.assert_close(out[:, :, 0], v[:, :, 0].detach())
    grads = torch.autograd.grad(out.sum(), (q, k, v, big))
    assert all(torch.isfinite(g).all() for g in grads)


def _op_args(dtype):
    q, k, v, th = (t.detach() for t in _problem(9, 7, 16, dtype))
    return q, k, v, th


@pytest.mark.parametrize("backend", ["reference", "cpp", TRITON_INTERPRETED])
@pytest.mark.parametrize("mode,causal", [("sparsemax", True), ("shrink", False)])
def test_opcheck(backend, mode, causal):
    _prepare(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    # The Triton interpreter cannot run on the functional tensors of AOT dispatch; the GPU test covers that.
    aot = () if backend == "triton" else ("test_aot_dispatch_dynamic",)
    _opcheck(sa.op_pair(backend), dtype, mode, causal, aot, "cpu")


def _opcheck(ops, dtype, mode, causal, aot, device):
    q, k, v, th = (t.to(device) for t in _op_args(dtype))
    torch.library.opcheck(ops.forward, (q.requires_grad_(), k, v, th, mode, causal, 0.3),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor", *aot))
    out, stats = ops.forward(q.detach(), k, v, th, mode, causal, 0.3)
    torch.library.opcheck(ops.backward, (torch.randn_like(out), q.detach(), k, v, th, stats, mode, causal, 0.3),
                          test_utils=("test_schema", "test_faketensor", *aot))


@pytest.mark.gpu
@pytest.mark.parametrize("mode,causal", [("sparsemax", True), ("shrink", False)])
def test_opcheck_triton_gpu(mode, causal):
    _opcheck(sa.op_pair("triton"), torch.float32, mode, causal, ("test_aot_dispatch_dynamic",), "cuda")


def test_available_backends_and_errors():
    assert "reference" in DF.available_backends("cpu")
    with pytest.raises(ValueError, match="no sparse_attention backend named 'nope'"):
        sa.op_pair("nope")
    with pytest.raises(ValueError, match="no conv_ista backend named 'nope'"):
        DF.backend_unavailable_reason("nope", "cpu")
    assert "cpu" in DF.backend_unavailable_reason("cpp", "meta").lower()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
@pytest.mark.parametrize("causal,n,m,d", [(True, 300, 300, 64), (False, 129, 257, 128), (True, 77, 50, 24)])
def test_triton_gpu_matches_reference(dtype, mode, causal, n, m, d):
    q, k, v, th = (t.detach().cuda().requires_grad_() for t in _problem(n, m, d, dtype, b=2, h=3))
    scale = d ** -0.5
    out = _fused("triton", q, k, v, th, mode, causal, scale)
    q64, k64, v64, th64 = (t.detach().double().requires_grad_() for t in (q, k, v, th))
    want = sparse_attention_ref(q64, k64, v64, mode=mode, threshold=th64, causal=causal, scale=scale)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    g = torch.randn_like(want)
    got = torch.autograd.grad(out, (q, k, v, th), g.to(dtype))
    exp = torch.autograd.grad(want, (q64, k64, v64, th64), g, allow_unused=True)
    for a, b in zip(got, exp):
        b = torch.zeros_like(a, dtype=torch.float64) if b is None else b
        # Support flips near the kink in half precision move single entries: compare in relative norm.
        assert (a.double() - b).norm() <= 10 * tol * (b.norm() + 1)
