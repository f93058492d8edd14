"""Every sparse-attention op backend against the reference: forward, row statistics, all gradients, score biases,
strided inputs, opcheck; half precision judged by the tolerance rule (tests/tolerance.py)."""

import pytest
import torch
from tolerance import assert_close_by_rule
from torch.utils._python_dispatch import TorchDispatchMode

import dsc_kernels.functional as DF
from dsc_kernels.ops import sparse_attention as sa
from dsc_kernels.reference.attention import (
    sparse_attention_fwd_ref,
    sparse_attention_ref,
    sparsemax_ref,
)

# Triton on CPU tensors is the interpreter: those cases run in the interpreter process (tests/conftest.py).
TRITON_INTERPRETED = pytest.param("triton", marks=pytest.mark.interpreter)
CPU_BACKENDS = ["reference", "cpp", TRITON_INTERPRETED]


def _prepare(backend):
    if backend != "reference" and (reason := DF.backend_unavailable_reason(backend, "cpu")) is not None:
        pytest.skip(reason)


def _dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


def _fused(backend, q, k, v, th, mode, causal, scale, bias=None):
    """The output of backend's forward op (differentiable through its backward op)."""
    return sa.op_pair(backend).forward(q, k, v, th, bias, mode, causal, scale)[0]


def _problem(n, m, d, dtype, *, b=1, h=2, dv=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, length, d, generator=gen, dtype=torch.float64) for length in (n, m))
    v = torch.randn(b, h, m, dv or d, generator=gen, dtype=torch.float64)
    th = torch.rand(h, generator=gen, dtype=torch.float64) * 0.3
    return [t.to(dtype).requires_grad_() for t in (q, k, v, th)]


def _check_against_reference(backend, mode, causal, n, m, d, dtype, atol, dv=None, bias=None, b=1, h=2):
    q, k, v, th = _problem(n, m, d, dtype, dv=dv, b=b, h=h)
    scale = d**-0.5
    kernel_bias = None if bias is None else bias.to(torch.float64 if dtype == torch.float64 else torch.float32)
    out = _fused(backend, q, k, v, th, mode, causal, scale, kernel_bias)
    q64, k64, v64, th64 = (t.detach().double().requires_grad_() for t in (q, k, v, th))
    want = sparse_attention_ref(
        q64,
        k64,
        v64,
        mode=mode,
        threshold=th64,
        causal=causal,
        scale=scale,
        bias=None if bias is None else bias.double(),
    )
    assert out.dtype == dtype and out.shape == want.shape
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=atol)
    g = torch.randn_like(want)
    got = torch.autograd.grad(out, (q, k, v, th), g.to(dtype))
    exp = torch.autograd.grad(want, (q64, k64, v64, th64), g, allow_unused=True)
    for name, a, e in zip("qkvt", got, exp):
        e = torch.zeros_like(a, dtype=torch.float64) if e is None else e
        assert a.shape == e.shape and a.dtype == dtype, name
        torch.testing.assert_close(a.double(), e, atol=atol * 10, rtol=atol * 10, msg=f"grad {name}")


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
@pytest.mark.parametrize(
    "causal,n,m,d", [(False, 5, 7, 16), (True, 37, 19, 24), (True, 17, 33, 64), (False, 20, 18, 24), (True, 6, 11, 128)]
)
def test_triton_matches_reference(mode, causal, n, m, d):
    _prepare("triton")
    _check_against_reference("triton", mode, causal, n, m, d, torch.float32, 2e-5)


@pytest.mark.interpreter
def test_triton_value_dim_differs():
    _prepare("triton")
    _check_against_reference("triton", "shrink", False, 9, 11, 16, torch.float32, 2e-5, dv=24)


def _slot_paths_check(device, cap, monkeypatch, causal, n=80, m=100):
    """Rows of every score spread in one problem: flat rows (all keys in the support), near-flat ones (supports of
    tens of keys) and peaked ones (a few keys). With `cap` candidate slots per row the sparsemax forward finishes a
    row from its slots when its first set fits, after more passes when it does not at first, or with one more pass
    over the keys when the support itself exceeds the slots; each path must match the reference, forward, row
    statistics and every gradient."""
    from dsc_kernels.triton.sparse_attention import launchers as tsa

    monkeypatch.setattr(tsa, "_slots", lambda: cap)  # read by the forward's launcher
    d = 16
    q, k, v, _ = (t.detach().to(device) for t in _problem(n, m, d, torch.float32, h=2))
    spreads = torch.tensor([0.0, 0.02, 0.1, 0.3, 1.0, 3.0, 10.0], dtype=torch.float32, device=device)
    q = (q * spreads[torch.arange(n, device=device) % len(spreads)][:, None]).requires_grad_()
    k, v = k.requires_grad_(), v.requires_grad_()
    th = torch.zeros(2, device=device)
    scale = d**-0.5
    out, stats = tsa.sparse_attention_fwd(q.detach(), k.detach(), v.detach(), th, None, "sparsemax", causal, scale)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want, want_stats = sparse_attention_fwd_ref(q64, k64, v64, th.double(), None, "sparsemax", causal, scale)
    support = (sparsemax_ref(_scores_of(q64, k64, causal, scale)) > 0).sum(-1)
    assert (support <= min(cap, 4)).any() and (support > cap).any(), "the problem must reach both sides of cap"
    torch.testing.assert_close(stats.double(), want_stats, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    fused = _fused("triton", q, k, v, th, "sparsemax", causal, scale)
    g = torch.randn_like(fused)
    got = torch.autograd.grad(fused, (q, k, v), g)
    want = sparse_attention_ref(q64, k64, v64, mode="sparsemax", causal=causal, scale=scale)
    exp = torch.autograd.grad(want, (q64, k64, v64), g.double())
    for name, a, e in zip("qkv", got, exp):
        torch.testing.assert_close(a.double(), e, atol=2e-4, rtol=2e-4, msg=f"grad {name}")


def _scores_of(q, k, causal, scale):
    s = q @ k.transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s


@pytest.mark.interpreter
@pytest.mark.parametrize("cap", [1, 4, 32])
@pytest.mark.parametrize("causal", [False, True])
def test_triton_sparsemax_every_candidate_slot_path(cap, causal, monkeypatch):
    # Smaller than the GPU test's problem (3 by 3 of the interpreter's 16-wide blocks, not 5 by 7), the largest cap
    # still past one block: the same paths in a third of the time.
    _prepare("triton")
    _slot_paths_check("cpu", cap, monkeypatch, causal, n=40, m=48)


@pytest.mark.gpu
@pytest.mark.parametrize("cap", [1, 4, 64])
@pytest.mark.parametrize("causal", [False, True])
def test_triton_gpu_sparsemax_every_candidate_slot_path(cap, causal, monkeypatch):
    _slot_paths_check("cuda", cap, monkeypatch, causal)


@pytest.mark.interpreter
def test_triton_sparsemax_slots_in_batch_head_chunks(monkeypatch):
    """Past _SLOT_BUDGET the forward launches (batch, head) chunks, each from its own bh0 over shared slots: with a
    budget of two slices per launch, 6 slices take 3 launches and must give what one launch gives."""
    from dsc_kernels.triton.sparse_attention import launchers as tsa

    _prepare("triton")
    q, k, v, th = (t.detach() for t in _problem(20, 23, 16, torch.float32, b=2, h=3))
    whole = tsa.sparse_attention_fwd(q, k, v, th, None, "sparsemax", True, 0.25)
    monkeypatch.setattr(tsa, "_SLOT_BUDGET", 2 * 20 * tsa._slots())
    chunked = tsa.sparse_attention_fwd(q, k, v, th, None, "sparsemax", True, 0.25)
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)
    want, want_stats = sparse_attention_fwd_ref(
        q.double(), k.double(), v.double(), th.double(), None, "sparsemax", True, 0.25
    )
    torch.testing.assert_close(chunked[0].double(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(chunked[1].double(), want_stats, atol=2e-5, rtol=2e-5)


def _biases(b, h, n, m):
    """A key-padding bias (B, 1, 1, M) expanded, and a general float bias (N, M) broadcast over B and H."""
    gen = torch.Generator().manual_seed(3)
    padding = torch.zeros(b, 1, 1, m, dtype=torch.float64)
    padding[0, ..., m // 2 :] = float("-inf")
    padding[-1, ..., :2] = float("-inf")
    general = torch.randn(1, 1, n, m, generator=gen, dtype=torch.float64)
    general[..., 1] = float("-inf")
    general[..., 2, :] = float("-inf")  # query 2 sees no key
    return {"padding": padding.expand(b, h, n, m), "general": (padding + general).expand(b, h, n, m)}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["padding", "general"])
def test_score_bias_matches_reference(backend, mode, causal, kind):
    _prepare(backend)
    dtype = _dtype(backend)
    bias = _biases(2, 2, 19, 23)[kind]
    _check_against_reference(
        backend, mode, causal, 19, 23, 16, dtype, 1e-10 if dtype == torch.float64 else 2e-5, bias=bias, b=2
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_inputs_are_read_in_place(backend):
    """q, k, v as the packed (B, L, 3, H, d) projection of a self-attention layer, viewed (B, H, L, d): the kernels
    take the strides; no copy of q, k or v is made on the way to the op."""
    _prepare(backend)
    dtype = _dtype(backend)
    gen = torch.Generator().manual_seed(0)
    packed = torch.randn(2, 13, 3, 2, 16, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    q, k, v = (t.transpose(1, 2) for t in packed.unbind(2))
    assert not q.is_contiguous()
    copies = []
    storage = packed.untyped_storage().data_ptr()

    class Record(TorchDispatchMode):
        """Records every op that copies out of the packed projection's storage."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            reads = [a for a in args if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == storage]
            if reads and func in (
                torch.ops.aten.clone.default,
                torch.ops.aten._to_copy.default,
                torch.ops.aten.contiguous.default
                if hasattr(torch.ops.aten, "contiguous")
                else torch.ops.aten.clone.default,
            ):
                copies.append(func)
            return func(*args, **(kwargs or {}))

    with Record():
        out = DF.sparse_attention(q, k, v, causal=True, backend=backend)
    assert copies == []
    qc, kc, vc = (t.detach().double().contiguous().requires_grad_() for t in (q, k, v))
    want = sparse_attention_ref(qc, kc, vc, causal=True)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    g = torch.randn_like(want)
    (got,) = torch.autograd.grad(out, packed, g.to(dtype))
    exp = torch.stack(torch.autograd.grad(want, (qc, kc, vc), g), dim=0).transpose(2, 3).permute(1, 2, 0, 3, 4)
    torch.testing.assert_close(got.double(), exp, atol=10 * tol, rtol=10 * tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_row_statistics(backend):
    _prepare(backend)
    dtype = _dtype(backend)
    q, k, v, th = (t.detach() for t in _problem(18, 21, 16, dtype))
    for mode in ("sparsemax", "shrink"):
        _, stats = sa.op_pair(backend).forward(q, k, v, th, None, mode, True, 0.25)
        _, want = sparse_attention_fwd_ref(q.double(), k.double(), v.double(), th.double(), None, mode, True, 0.25)
        assert stats.shape == (1, 2, 18, 2)
        torch.testing.assert_close(stats.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
def test_no_active_key_rows_are_zero(backend, mode):
    _prepare(backend)
    q, k, v, th = _problem(6, 5, 16, _dtype(backend))
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


def _opcheck(ops, dtype, mode, causal, aot, device, with_bias):
    q, k, v, th = (t.to(device) for t in _op_args(dtype))
    bias = None
    if with_bias:
        bias = torch.zeros(1, 1, 1, 7, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
        bias[..., 3] = float("-inf")
        bias = bias.expand(1, 2, 9, 7)
    torch.library.opcheck(
        ops.forward,
        (q.requires_grad_(), k, v, th, bias, mode, causal, 0.3),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor", *aot),
    )
    out, stats = ops.forward(q.detach(), k, v, th, bias, mode, causal, 0.3)
    torch.library.opcheck(
        ops.backward,
        (torch.randn_like(out), q.detach(), k, v, th, bias, stats, mode, causal, 0.3),
        test_utils=("test_schema", "test_faketensor", *aot),
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode,causal,with_bias", [("sparsemax", True, False), ("shrink", False, True)])
def test_opcheck(backend, mode, causal, with_bias):
    _prepare(backend)
    # The Triton interpreter cannot run on the functional tensors of AOT dispatch; the GPU test covers that.
    aot = () if backend == "triton" else ("test_aot_dispatch_dynamic",)
    _opcheck(sa.op_pair(backend), _dtype(backend), mode, causal, aot, "cpu", with_bias)


@pytest.mark.gpu
@pytest.mark.parametrize("mode,causal,with_bias", [("sparsemax", True, False), ("shrink", False, True)])
def test_opcheck_triton_gpu(mode, causal, with_bias):
    _opcheck(sa.op_pair("triton"), torch.float32, mode, causal, ("test_aot_dispatch_dynamic",), "cuda", with_bias)


def test_available_backends_and_errors():
    assert "reference" in DF.available_backends("cpu")
    with pytest.raises(ValueError, match="no sparse_attention backend named 'nope'"):
        sa.op_pair("nope")
    with pytest.raises(ValueError, match="backend must be one of .* got 'nope'"):
        DF.backend_unavailable_reason("nope", "cpu")
    assert "cpu" in DF.backend_unavailable_reason("cpp", "meta").lower()


# ------------------------------------------------------------------------------------------- half precision
def eager_in_dtype(q, k, v, th, mode, causal, scale, bias=None):
    """PyTorch's own eager sparse attention in q's dtype, the yardstick of the tolerance rule: the two matmuls in
    that dtype, the threshold (sort and cumsum) on the scores upcast to float32 (plus a float32 score bias), as
    attention code does."""
    s = (torch.matmul(q, k.transpose(-1, -2)) * scale).float()
    if bias is not None:
        s = s + bias
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    if mode == "sparsemax":
        p = sparsemax_ref(s)
    else:
        t = th.float().view(1, -1, 1, 1)
        p = torch.where(s > t, s - t, torch.zeros_like(s))
    return torch.matmul(p.to(q.dtype), v)


def _check_by_rule(backend, dtype, mode, causal, n, m, d, device, b=1, h=2, dv=None, bias=None):
    """Forward and every gradient within 2x eager's error in dtype (plus one ulp), against float64 on the same
    rounded inputs. Gradients are compared in l2: a support flip near the kink moves single entries in either.
    bias: None or a float32 (B, H, N, M) score bias (masks), as the fused ops take it."""
    q, k, v, th = (t.detach().to(device).requires_grad_() for t in _problem(n, m, d, dtype, b=b, h=h, dv=dv))
    th_used = th if mode == "shrink" else th.detach()
    scale = d**-0.5
    bias = None if bias is None else bias.to(device)
    out = _fused(backend, q, k, v, th_used, mode, causal, scale, bias)
    q64, k64, v64, th64 = (t.detach().double().requires_grad_() for t in (q, k, v, th))
    bias64 = None if bias is None else bias.double()
    want = sparse_attention_ref(q64, k64, v64, mode=mode, threshold=th64, causal=causal, scale=scale, bias=bias64)
    qe, ke, ve, the = (t.detach().requires_grad_() for t in (q, k, v, th))
    eager = eager_in_dtype(qe, ke, ve, the, mode, causal, scale, bias)
    assert_close_by_rule(out, want, eager, name=f"{backend} {dtype} out")
    g = torch.randn_like(want)
    inputs = (q, k, v) + ((th,) if mode == "shrink" else ())
    got = torch.autograd.grad(out, inputs, g.to(dtype))
    exp = torch.autograd.grad(want, (q64, k64, v64, th64)[: len(inputs)], g)
    ref = torch.autograd.grad(eager, (qe, ke, ve, the)[: len(inputs)], g.to(dtype))
    for name, a, e, r in zip("qkvt", got, exp, ref):
        assert_close_by_rule(a, e, r, name=f"{backend} {dtype} grad {name}", norm="l2")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
def test_triton_low_precision_by_rule(dtype, mode):
    _prepare("triton")
    _check_by_rule("triton", dtype, mode, True, 19, 21, 16, "cpu")


def _score_biases(kind, b, h, n, m):
    """A float32 (B, H, N, M) score bias: key padding (-inf on ~30% of each item's keys, broadcast) or a dense
    float mask of N(0, 1) scores."""
    g = torch.Generator().manual_seed(3)
    if kind == "key_padding":
        hidden = torch.rand(b, m, generator=g) < 0.3
        return torch.where(hidden, float("-inf"), 0.0).view(b, 1, 1, m).expand(b, h, n, m)
    return torch.randn(n, m, generator=g).expand(b, h, n, m)


@pytest.mark.interpreter
@pytest.mark.parametrize("upcast", [True, False], ids=["interpreter-upcast", "compiled-casts"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
def test_triton_low_precision_with_masks_and_dv_by_rule(dtype, mode, upcast, monkeypatch):
    """The rule on what test_triton_low_precision_by_rule leaves out: no causal mask, score biases (masks), head
    dims under 16 and dv != d. The interpreter upcasts half operands right after loading (UPCAST: its numpy has
    no bf16 arithmetic), so it never runs the casts a GPU does (P and dS rounded to the input dtype before their
    dots); "compiled-casts" runs those branches, in float16, which numpy computes."""
    if not upcast and dtype == torch.bfloat16:
        pytest.skip("numpy has no bfloat16 arithmetic: the compiled casts run in float16 only under the interpreter")
    from dsc_kernels.triton.sparse_attention import launchers

    _prepare("triton")
    if not upcast:
        config = launchers._config
        monkeypatch.setattr(launchers, "_config", lambda *args: {**config(*args), "UPCAST": False})
    for causal, (n, m, d, dv), bias in [
        (False, (13, 17, 5, 24), "key_padding"),
        (True, (9, 33, 24, 3), "float"),
    ]:
        _check_by_rule("triton", dtype, mode, causal, n, m, d, "cpu", dv=dv, bias=_score_biases(bias, 1, 2, n, m))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
@pytest.mark.parametrize("causal,n,m,d", [(True, 300, 300, 64), (False, 129, 257, 128), (True, 77, 50, 24)])
def test_triton_gpu_matches_reference(dtype, mode, causal, n, m, d):
    # fp32 runs with IEEE dots (the kernels' fp32 setting), so the eager yardstick is IEEE too.
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _check_by_rule("triton", dtype, mode, causal, n, m, d, "cuda", b=2, h=3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.interpreter
def test_triton_refuses_head_dims_its_tiles_cannot_hold(monkeypatch):
    """Head dims above 512 need (rows, 1024)-column tiles, more shared memory than an H100/H200 block gets (fp16,
    d = 1024: 256-320 KiB, sm_90 AOT compile): the launch failed on the GPU. ``auto`` now runs such calls on the
    reference, an explicit backend='triton' raises a ValueError naming the variant before any kernel, and the op
    itself refuses them; 512 still runs on the kernels."""
    from dsc_kernels.triton import sparse_attention as tsa

    _prepare("triton")
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 3, 4, generator=g), torch.randn(1, 1, 5, 4, generator=g)
    wide = torch.randn(1, 1, 5, 513, generator=g)
    with pytest.raises(ValueError, match=r"backend='triton' cannot run wide_head \(a head dim d or d_v above 512\)"):
        DF.sparse_attention(q, k, wide, backend="triton")
    with pytest.raises(ValueError, match="backend='triton' cannot run wide_head"):
        DF.sparse_attention(torch.randn(1, 1, 3, 600), torch.randn(1, 1, 5, 600), k, backend="triton")
    with pytest.raises(RuntimeError, match="head dims"):
        tsa.sparse_attention_fwd(q, k, wide, torch.zeros(1), None, "sparsemax", False, 0.5)
    # auto as on a GPU, where it prefers the kernels: the wide call takes the reference, a narrow one the kernels
    from dsc_kernels.ops import selection, table

    monkeypatch.setitem(table.AUTO_PREFERENCE_BY_FAMILY, ("sparse_attention", "cpu"), ("triton", "reference"))
    assert selection.select("sparse_attention", "auto", q.device, q.dtype, ("wide_head",)).name == "reference"
    assert selection.select("sparse_attention", "auto", q.device, q.dtype).name == "triton"
    torch.testing.assert_close(
        DF.sparse_attention(q, k, wide, backend="auto"), DF.sparse_attention(q, k, wide, backend="reference")
    )
    v = wide[..., :512]
    torch.testing.assert_close(
        DF.sparse_attention(q, k, v, backend="triton"),
        DF.sparse_attention(q.double(), k.double(), v.double(), backend="reference").float(),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fakes_give_the_real_output_and_statistics(dtype):
    """The module docstring: out (B, H, N, dv) in q's dtype, stats (B, H, N, 2) in float32 for half inputs. The
    other tests' problems have d == dv and float32/float64 q, where a fake shaped by q's head dim or typed by q's
    dtype looked right; torch.compile and FakeTensor tracing read these fakes."""
    q, k, v, th = (t.detach() for t in _problem(9, 7, 16, torch.float32, dv=8))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    forward = sa.op_pair("reference").forward
    for device in ("cpu", "meta"):
        out, stats = forward(q.to(device), k.to(device), v.to(device), th.to(device), None, "sparsemax", False, 0.3)
        assert (out.shape, out.dtype) == ((1, 2, 9, 8), dtype), device
        assert (stats.shape, stats.dtype) == ((1, 2, 9, 2), torch.float32), device


def _shrink_or_sparsemax_grads(q, k, v, theta, mode, g):
    """O = P v and its gradients written from the math (float64 autograd, scale 1): P = relu(s - t), s = q k^T,
    t = theta (shrink) or sparsemax's tau = (sum_S s - 1) / |S| on S = {s > tau} (found by sorting); relu' = 0 at 0,
    so a score exactly at the threshold is outside the support."""
    q, k, v, theta = (t.detach().clone().requires_grad_() for t in (q, k, v, theta))
    s = q @ k.transpose(-1, -2)
    if mode == "shrink":
        t = theta.view(1, -1, 1, 1)
    else:
        srt = s.detach().sort(-1, descending=True).values
        r = torch.arange(1, s.shape[-1] + 1, dtype=s.dtype)
        size = ((1 + r * srt) > srt.cumsum(-1)).sum(-1, keepdim=True)
        support = s.detach() >= srt.gather(-1, size - 1)
        t = ((s * support).sum(-1, keepdim=True) - 1) / size
    out = torch.relu(s - t) @ v
    out.backward(g)
    return out.detach(), q.grad, k.grad, v.grad, theta.grad


@pytest.mark.parametrize("mode,keys,th", [("shrink", [0.5, 2.0, -1.0], 0.5), ("sparsemax", [1.0, 0.0, -5.0], 0.0)])
def test_cpp_score_exactly_at_the_threshold_is_outside_the_support(mode, keys, th):
    """Exact (dyadic) scores with one key at the threshold: P is 0 there, and the backward must leave it out of the
    support as the forward does (sparsemax's mean over S and every ds would change otherwise)."""
    _prepare("cpp")
    ops = torch.ops.dsc_kernels
    q = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    k = torch.tensor(keys, dtype=torch.float64).view(1, 1, 3, 1)
    v = torch.tensor([[[[1.0, -2.0], [3.0, 0.5], [-1.5, 2.5]]]], dtype=torch.float64)
    g = torch.tensor([[[[0.7, -1.3]]]], dtype=torch.float64)
    theta = torch.tensor([th], dtype=torch.float64)
    out, stats = ops.sparse_attention_fwd_cpp(q, k, v, theta, None, mode, False, 1.0)
    got = ops.sparse_attention_bwd_cpp(g, q, k, v, theta, None, stats, mode, False, 1.0)
    want = _shrink_or_sparsemax_grads(q, k, v, theta, mode, g)
    torch.testing.assert_close(out, want[0], rtol=0, atol=1e-15)
    want_theta = want[4] if mode == "shrink" else torch.zeros_like(theta)  # sparsemax has no threshold
    for what, a, b in zip(("q", "k", "v", "threshold"), got, (*want[1:4], want_theta)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14, msg=f"d{what}")


@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
@pytest.mark.parametrize("causal", [False, True])
def test_cpp_nan_bias_on_a_rows_last_visible_key_makes_the_row_nan(mode, causal):
    """A NaN score makes its row NaN (csrc/cpu/sparse_attention.cpp), the row's last visible key included (M - 1, or
    the diagonal when causal), and no other row."""
    _prepare("cpp")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    theta = torch.tensor([0.1], dtype=torch.float64)
    row, key = (2, 2) if causal else (1, 3)
    bias = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    bias[0, 0, row, key] = float("nan")
    out, _ = torch.ops.dsc_kernels.sparse_attention_fwd_cpp(q, k, v, theta, bias, mode, causal, 1.0)
    assert torch.isnan(out[0, 0]).all(-1).nonzero().flatten().tolist() == [row]
    assert torch.isfinite(out[0, 0, [r for r in range(4) if r != row]]).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_cpp_float32_threshold_gradient_over_many_keys_within_the_rule(seed):
    """dL/dtheta of shrink attention sums -(ds) over every active (query, key) pair of a head, about N * M terms. The
    C++ backward summed them in one float32 accumulator: at 2048 x 2048, seed 1, an error of 0.11 where eager
    float32's is 5.4e-4 (values of size 3.7e3; seed 0 stayed inside the rule's floor). q and k are dyadic, so every
    score is exact in float32 and no key crosses the threshold between float32 and float64: the error is summation
    alone."""
    n = m = 2048
    d = 16
    g = torch.Generator().manual_seed(seed)
    q64, k64 = (torch.randint(-3, 4, (1, 1, length, d), generator=g).double() / 4 for length in (n, m))
    v64 = torch.randn(1, 1, m, d, generator=g, dtype=torch.float64).float().double()
    grad_out = torch.randn(1, 1, n, d, generator=g, dtype=torch.float64).float().double()

    def threshold_grad(dtype, backend=None):
        q, k, v = (t.to(dtype) for t in (q64, k64, v64))
        th = torch.tensor([0.1], dtype=torch.float32).to(dtype).requires_grad_()
        if backend is None:  # plain PyTorch: relu(q k^T / sqrt(d) - theta) v
            out = torch.relu(d**-0.5 * q @ k.transpose(-1, -2) - th) @ v
        else:
            out = DF.sparse_attention(q, k, v, mode="shrink", threshold=th, backend=backend)
        (th_grad,) = torch.autograd.grad(out, th, grad_out.to(dtype))
        return th_grad

    want, eager = threshold_grad(torch.float64), threshold_grad(torch.float32)
    assert_close_by_rule(threshold_grad(torch.float32, "cpp"), want, eager, name=f"seed {seed} dL/dtheta")
