"""Metamorphic properties of the CPU ops (reference and cpp), which need no oracle: batch independence (across the
cpp gemm strategy's batch chunks too), positive homogeneity, sign symmetry, code-channel permutation, ISTA
continuation from z0, and sparse attention's key permutation, fully masked rows and sparsemax's shift invariance."""

import contextlib
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dsc_kernels.functional as DF

BACKENDS = ["reference", "cpp"]
FEW = settings(max_examples=25, deadline=None)
ML = settings(max_examples=10, deadline=None)  # the eager multi-layer reference is the slow one

problems = st.fixed_dictionaries(
    dict(
        rank=st.sampled_from([1, 2]),
        b=st.integers(1, 3),
        c_sig=st.integers(1, 3),
        c_code=st.integers(1, 4),
        h=st.integers(3, 9),
        w=st.integers(3, 11),
        k=st.integers(1, 4),
        stride=st.integers(1, 3),
        pad=st.integers(0, 3),
        n_iter=st.integers(1, 4),
        fista=st.booleans(),
        nonneg=st.booleans(),
        tied=st.booleans(),
        seed=st.integers(0, 2**16),
    )
)


def make(p):
    """x, weight, encoder (None when tied), per-channel lam and the geometry of a drawn problem, in float64."""
    gen = torch.Generator().manual_seed(p["seed"])
    k = min(p["k"], p["w"], p["h"])
    spatial = (p["w"],) if p["rank"] == 1 else (p["h"], p["w"])
    kernel = (k,) * p["rank"]
    x = torch.randn(p["b"], p["c_sig"], *spatial, generator=gen, dtype=torch.float64)
    w = torch.randn(p["c_code"], p["c_sig"], *kernel, generator=gen, dtype=torch.float64)
    w = w / w.flatten(1).norm(dim=1).view(-1, *[1] * (w.dim() - 1))
    enc = None if p["tied"] else w + 0.1 * torch.randn(w.shape, generator=gen, dtype=torch.float64)
    lam = 0.05 + 0.2 * torch.rand(p["c_code"], generator=gen, dtype=torch.float64)
    kw = dict(n_iter=p["n_iter"], stride=p["stride"], padding=min(p["pad"], k - 1), nonneg=p["nonneg"])
    return x, w, enc, lam, kw


def run(x, w, enc, lam, kw, backend, fista, step=0.1, z0=None, grad_out=None):
    """z, and with grad_out the gradients of <grad_out, z> for x, weight, encoder, lam (None where absent)."""
    leaves = [t.detach().requires_grad_(grad_out is not None) if t is not None else None for t in (x, w, enc, lam)]
    x, w, enc, lam = leaves
    z = DF.conv_ista(x, w, lam, step=step, encoder_weight=enc, z0=z0, fista=fista, backend=backend, **kw)
    if grad_out is None:
        return z.detach(), None
    inputs = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(z, inputs, grad_out))
    return z.detach(), [next(grads) if t is not None else None for t in leaves]


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@contextlib.contextmanager
def cpp_strategy(name):
    """Force the C++ conv-ISTA strategy (read from the environment at each call)."""
    old = os.environ.get("DSC_KERNELS_CPP_STRATEGY")
    os.environ["DSC_KERNELS_CPP_STRATEGY"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["DSC_KERNELS_CPP_STRATEGY"]
        else:
            os.environ["DSC_KERNELS_CPP_STRATEGY"] = old


def check_batch_independence(x, w, enc, lam, kw, backend, fista):
    g = torch.randn(run(x, w, enc, lam, kw, "reference", fista)[0].shape, dtype=torch.float64)
    z, grads = run(x, w, enc, lam, kw, backend, fista, grad_out=g)
    summed = [torch.zeros_like(t) if t is not None else None for t in grads[1:]]
    for i in range(x.shape[0]):
        zi, gi = run(x[i : i + 1], w, enc, lam, kw, backend, fista, grad_out=g[i : i + 1])
        close(z[i : i + 1], zi)
        close(grads[0][i : i + 1], gi[0])
        summed = [s + t if s is not None else None for s, t in zip(summed, gi[1:])]
    for total, parts in zip(grads[1:], summed):
        if total is not None:
            close(total, parts)


# ------------------------------------------------------------------------------------------------------ conv-ISTA
@pytest.mark.parametrize("backend", BACKENDS)
@FEW
@given(problems)
def test_conv_ista_batch_independence(backend, p):
    """Sample i's code and dL/dx_i do not depend on the other samples; dL/dW (and dL/dlam) is the per-sample sum."""
    x, w, enc, lam, kw = make(p)
    check_batch_independence(x, w, enc, lam, kw, backend, p["fista"])


@pytest.mark.parametrize("strategy", ["gemm", "direct"])
@pytest.mark.parametrize("shape", [(7, (1501,)), (5, (41, 43)), (9, (70,))])
@pytest.mark.parametrize("fista", [False, True])
def test_cpp_batch_independence_across_chunks(strategy, shape, fista):
    """The gemm strategy runs batches in chunks of ceil(4096 / code columns) items at most (strategy.cpp's
    gemm_chunk_items): 1501 columns gives chunks of 3 (7 = 3 + 3 + 1), 41 x 43 chunks of 3 over 5 items."""
    batch, spatial = shape
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 2, *spatial, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 2, *(3,) * len(spatial), generator=gen, dtype=torch.float64) / 3
    lam = torch.tensor([0.1, 0.2, 0.05], dtype=torch.float64)
    kw = dict(n_iter=3, stride=1, padding=1, nonneg=False)
    with cpp_strategy(strategy):
        check_batch_independence(x, w, w + 0.05, lam, kw, "cpp", fista)


@pytest.mark.parametrize("backend", BACKENDS)
@FEW
@given(problems, st.floats(0.01, 100.0))
def test_conv_ista_positive_homogeneity(backend, p, c):
    """x -> c x with every threshold -> c threshold gives z -> c z; dL/dx is unchanged, dL/dW scales by c."""
    x, w, enc, lam, kw = make(p)
    g = torch.randn(run(x, w, enc, lam, kw, "reference", p["fista"])[0].shape, dtype=torch.float64)
    z, grads = run(x, w, enc, lam, kw, backend, p["fista"], grad_out=g)
    zc, grads_c = run(c * x, w, enc, c * lam, kw, backend, p["fista"], grad_out=g)
    torch.testing.assert_close(zc, c * z, rtol=1e-8, atol=1e-9 * c)
    torch.testing.assert_close(grads_c[0], grads[0], rtol=1e-8, atol=1e-9)
    for gc, g0 in zip(grads_c[1:3], grads[1:3]):
        if g0 is not None:
            torch.testing.assert_close(gc, c * g0, rtol=1e-8, atol=1e-9 * c)


@pytest.mark.parametrize("backend", BACKENDS)
@FEW
@given(problems)
def test_conv_ista_sign_symmetry(backend, p):
    """Signed codes: x -> -x gives z -> -z (S_t is odd); dL/dx is unchanged and dL/dW changes sign."""
    x, w, enc, lam, kw = make(p)
    kw["nonneg"] = False
    g = torch.randn(run(x, w, enc, lam, kw, "reference", p["fista"])[0].shape, dtype=torch.float64)
    z, grads = run(x, w, enc, lam, kw, backend, p["fista"], grad_out=g)
    zn, grads_n = run(-x, w, enc, lam, kw, backend, p["fista"], grad_out=g)
    close(zn, -z)
    close(grads_n[0], grads[0])
    for gn, g0 in zip(grads_n[1:3], grads[1:3]):
        if g0 is not None:
            close(gn, -g0)


@pytest.mark.parametrize("backend", BACKENDS)
@FEW
@given(problems)
def test_conv_ista_code_channel_permutation(backend, p):
    """Permuting the atoms (encoder rows and per-channel lam with them) permutes the code channels."""
    x, w, enc, lam, kw = make(p)
    perm = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(p["seed"]))
    z, _ = run(x, w, enc, lam, kw, backend, p["fista"])
    zp, _ = run(x, w[perm], None if enc is None else enc[perm], lam[perm], kw, backend, p["fista"])
    close(zp, z[:, perm])


@pytest.mark.parametrize("backend", BACKENDS)
@FEW
@given(problems, st.integers(1, 3))
def test_conv_ista_continues_from_z0(backend, p, more):
    """ISTA's state is the code alone: n iterations, then `more` from z0 = that code, equals n + more iterations."""
    x, w, enc, lam, kw = make(p)
    first, _ = run(x, w, enc, lam, kw, backend, False)
    then, _ = run(x, w, enc, lam, dict(kw, n_iter=more), backend, False, z0=first)
    at_once, _ = run(x, w, enc, lam, dict(kw, n_iter=kw["n_iter"] + more), backend, False)
    close(then, at_once)


# ------------------------------------------------------------------------------------------------------- ML-ISTA
def ml_problem(p):
    gen = torch.Generator().manual_seed(p["seed"])
    spatial = (p["w"] + 4,) if p["rank"] == 1 else (p["h"] + 4, p["w"] + 4)
    x = torch.randn(p["b"], p["c_sig"], *spatial, generator=gen, dtype=torch.float64)
    k = (3,) * p["rank"]
    ws = [torch.randn(p["c_code"], p["c_sig"], *k, generator=gen, dtype=torch.float64) / 3]
    ws.append(torch.randn(2, p["c_code"], *k, generator=gen, dtype=torch.float64) / 3)
    thresholds = [0.05 + 0.1 * torch.rand(w.shape[0], generator=gen, dtype=torch.float64) for w in ws]
    kw = dict(strides=[min(p["stride"], 2), 1], paddings=[min(p["pad"], 2), 1], nonneg=p["nonneg"])
    return x, ws, thresholds, kw


def ml_run(x, ws, ts, kw, p, backend, **extra):
    return DF.ml_ista(x, ws, ts, n_iter=p["n_iter"] - 1, fista=p["fista"], backend=backend, **kw, **extra)


@pytest.mark.parametrize("backend", BACKENDS)
@ML
@given(problems, st.floats(0.01, 100.0))
def test_ml_ista_positive_homogeneity(backend, p, c):
    """x -> c x with every layer's threshold -> c threshold scales every layer's code by c."""
    x, ws, ts, kw = ml_problem(p)
    codes = ml_run(x, ws, ts, kw, p, backend)
    for a, b in zip(ml_run(c * x, ws, [c * t for t in ts], kw, p, backend), codes):
        torch.testing.assert_close(a, c * b, rtol=1e-8, atol=1e-9 * c)


@pytest.mark.parametrize("backend", BACKENDS)
@ML
@given(problems)
def test_ml_ista_batch_independence(backend, p):
    x, ws, ts, kw = ml_problem(p)
    codes = ml_run(x, ws, ts, kw, p, backend)
    for i in range(x.shape[0]):
        for a, b in zip(ml_run(x[i : i + 1], ws, ts, kw, p, backend), codes):
            close(a, b[i : i + 1])


@pytest.mark.parametrize("backend", BACKENDS)
@ML
@given(problems)
def test_ml_ista_sign_symmetry(backend, p):
    """Signed codes: x -> -x negates every layer's code."""
    x, ws, ts, kw = ml_problem(p)
    kw["nonneg"] = False
    for a, b in zip(ml_run(-x, ws, ts, kw, p, backend), ml_run(x, ws, ts, kw, p, backend)):
        close(a, -b)


@pytest.mark.parametrize("backend", BACKENDS)
@ML
@given(problems, st.integers(0, 2))
def test_ml_ista_continues_from_z0(backend, p, more):
    """ml_ista runs n_iter + 1 steps (the first, from zero, is the initial encoding) and its state is the deepest
    code: n_iter = n, then n_iter = more from z0 = G_L, equals n_iter = n + more + 1."""
    x, ws, ts, kw = ml_problem(p)
    n = p["n_iter"] - 1
    first = DF.ml_ista(x, ws, ts, n_iter=n, backend=backend, **kw)
    then = DF.ml_ista(x, ws, ts, n_iter=more, z0=first[-1], backend=backend, **kw)
    at_once = DF.ml_ista(x, ws, ts, n_iter=n + more + 1, backend=backend, **kw)
    for a, b in zip(then, at_once):
        close(a, b)


# ------------------------------------------------------------------------------------------------ soft threshold
@FEW
@given(st.integers(1, 40), st.floats(0.01, 100.0), st.booleans(), st.integers(0, 2**16))
def test_soft_threshold_homogeneous_and_odd(n, c, nonneg, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    t = torch.rand(3, generator=gen, dtype=torch.float64)
    close(DF.soft_threshold(c * x, c * t, nonneg=nonneg), c * DF.soft_threshold(x, t, nonneg=nonneg))
    close(DF.soft_threshold(-x, t), -DF.soft_threshold(x, t))


# --------------------------------------------------------------------------------------------- sparse attention
attention_problems = st.fixed_dictionaries(
    dict(
        b=st.integers(1, 2),
        h=st.integers(1, 3),
        n=st.integers(1, 9),
        m=st.integers(1, 9),
        d=st.integers(1, 8),
        dv=st.integers(1, 5),
        mode=st.sampled_from(["sparsemax", "shrink"]),
        seed=st.integers(0, 2**16),
    )
)


def attention(p, masked=0.3):
    gen = torch.Generator().manual_seed(p["seed"])
    q = torch.randn(p["b"], p["h"], p["n"], p["d"], generator=gen, dtype=torch.float64)
    k = torch.randn(p["b"], p["h"], p["m"], p["d"], generator=gen, dtype=torch.float64)
    v = torch.randn(p["b"], p["h"], p["m"], p["dv"], generator=gen, dtype=torch.float64)
    padding = torch.rand(p["b"], p["m"], generator=gen) < masked
    bias = torch.randn(p["b"], p["h"], p["n"], p["m"], generator=gen, dtype=torch.float64)
    threshold = 0.1 if p["mode"] == "shrink" else None
    return q, k, v, padding, bias, threshold


def attend(q, k, v, padding, bias, threshold, p, backend, grad_out=None):
    leaves = [t.detach().requires_grad_(grad_out is not None) for t in (q, k, v)]
    out = DF.sparse_attention(
        *leaves, mode=p["mode"], threshold=threshold, key_padding_mask=padding, attn_mask=bias, backend=backend
    )
    if grad_out is None:
        return out.detach(), None
    return out.detach(), torch.autograd.grad(out, leaves, grad_out)


@pytest.mark.parametrize("backend", BACKENDS)
@FEW
@given(attention_problems)
def test_attention_key_permutation(backend, p):
    """Permuting the keys with their values and masks permutes dL/dk, dL/dv and leaves O and dL/dq unchanged."""
    q, k, v, padding, bias, threshold = attention(p)
    perm = torch.randperm(p["m"], generator=torch.Generator().manual_seed(p["seed"]))
    g = torch.randn(p["b"], p["h"], p["n"], p["dv"], dtype=torch.float64)
    out, grads = attend(q, k, v, padding, bias, threshold, p, backend, g)
    out_p, grads_p = attend(
        q, k[:, :, perm], v[:, :, perm], padding[:, perm], bias[..., perm], threshold, p, backend, g
    )
    close(out_p, out)
    close(grads_p[0], grads[0])
    close(grads_p[1], grads[1][:, :, perm])
    close(grads_p[2], grads[2][:, :, perm])


@pytest.mark.parametrize("backend", BACKENDS)
@FEW
@given(attention_problems)
def test_attention_fully_masked_rows_give_zero(backend, p):
    """A batch item whose keys are all padded, and a query row whose bias is -inf everywhere, give O = 0 and zero
    gradients there, no NaN; the other rows are what they are without that row's mask."""
    q, k, v, padding, bias, threshold = attention(p)
    padding[0] = True
    bias[..., 0, :] = -torch.inf
    g = torch.randn(p["b"], p["h"], p["n"], p["dv"], dtype=torch.float64)
    out, (gq, gk, gv) = attend(q, k, v, padding, bias, threshold, p, backend, g)
    for t in (out, gq, gk, gv):
        assert not t.isnan().any()
    assert (out[0] == 0).all() and (out[..., 0, :] == 0).all()
    assert (gq[0] == 0).all() and (gk[0] == 0).all() and (gv[0] == 0).all()
    assert (gq[..., 0, :] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@FEW
@given(attention_problems, st.floats(-50.0, 50.0))
def test_sparsemax_attention_is_shift_invariant(backend, p, shift):
    """sparsemax(s + c) = sparsemax(s): a float mask adding a constant to every score of a row changes nothing."""
    p = dict(p, mode="sparsemax")
    q, k, v, padding, bias, threshold = attention(p)
    row_shift = shift * torch.randn(p["b"], p["h"], p["n"], 1, dtype=torch.float64)
    g = torch.randn(p["b"], p["h"], p["n"], p["dv"], dtype=torch.float64)
    out, grads = attend(q, k, v, padding, bias, threshold, p, backend, g)
    out_s, grads_s = attend(q, k, v, padding, bias + row_shift, threshold, p, backend, g)
    torch.testing.assert_close(out_s, out, rtol=1e-7, atol=1e-9)
    for a, b in zip(grads_s, grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@FEW
@given(attention_problems, st.floats(0.01, 100.0))
def test_shrink_attention_homogeneity(backend, p, c):
    """Shrink: q -> c q with the threshold -> c threshold (and the bias -> c bias) gives O -> c O."""
    p = dict(p, mode="shrink")
    q, k, v, padding, bias, threshold = attention(p)
    out, _ = attend(q, k, v, padding, bias, threshold, p, backend)
    out_c, _ = attend(c * q, k, v, padding, c * bias, c * threshold, p, backend)
    torch.testing.assert_close(out_c, c * out, rtol=1e-8, atol=1e-9 * c)
