"""Empty problems on the cpp conv-ISTA backend (issue 13): an empty batch, no signal or code channels, a zero-size
map inside the padding. Each gives the reference's result and gradients, never a crash; edge geometries (stride
larger than the kernel, 1 x 1 maps, many channels) likewise. Run under `make sanitize` for memory errors."""

from __future__ import annotations

import pytest
import torch

import dsc_kernels.functional as DF
from dsc_kernels import _ext
from dsc_kernels.ops import op_pair
from dsc_kernels.reference.conv_ista import conv_ista_ref

ops = _ext.load()
op_pair("conv_ista", "cpp")

# x shape, weight shape, padding: an empty batch or no channels flow through and give the reference's result
EMPTY = [
    pytest.param((0, 2, 9, 8), (3, 2, 3, 3), 1, id="batch-0"),
    pytest.param((2, 0, 9, 8), (3, 0, 3, 3), 1, id="signal-channels-0"),
    pytest.param((2, 2, 9, 8), (0, 2, 3, 3), 1, id="code-channels-0"),
]
# a zero-size map is rejected by name on every backend; the ops themselves still give the reference op's result
EMPTY_MAP = [
    pytest.param((2, 2, 4, 0), (3, 2, 3, 3), 2, id="width-0"),
    pytest.param((2, 2, 0, 0), (3, 2, 3, 3), 2, id="map-0x0"),
    pytest.param((2, 1, 1, 0), (3, 1, 1, 3), 2, id="1d-length-0"),
]
EDGES = [
    pytest.param((2, 2, 11, 14), (5, 2, 2, 3), 0, (4, 5), id="stride-gt-kernel"),
    pytest.param((3, 2, 1, 1), (4, 2, 1, 1), 0, 1, id="1x1-map"),
    pytest.param((2, 3, 3, 3), (4, 3, 3, 3), 1, 1, id="3x3-map-padded"),
    pytest.param((1, 1, 5, 5), (300, 1, 3, 3), 1, 1, id="300-code-channels"),
    pytest.param((2, 200, 4, 4), (3, 200, 3, 3), 1, 1, id="200-signal-channels"),
]


def _run(backend, x, w, lam, step, z0, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, lam, step)]
    z0l = None if z0 is None else z0.detach().clone().requires_grad_()
    z = DF.conv_ista(leaves[0], leaves[1], leaves[2], n_iter=3, step=leaves[3], z0=z0l, backend=backend, **kw)
    g = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=z.dtype)
    inputs = leaves + ([z0l] if z0l is not None else [])
    grads = torch.autograd.grad((z * g).sum(), inputs, allow_unused=True)
    return z.detach(), [torch.zeros_like(t) if gr is None else gr for t, gr in zip(inputs, grads)]


def _problem(xs, ws, padding, stride, z0_given, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(xs, generator=g, dtype=torch.float64)
    w = torch.randn(ws, generator=g, dtype=torch.float64) / (2 * max(1, ws[0] * ws[1]) ** 0.5)  # step 0.3 < 2/L
    lam = 0.05 + 0.1 * torch.rand(3, ws[0], generator=g, dtype=torch.float64)
    step = torch.tensor([0.3, 0.2, 0.25], dtype=torch.float64)
    z0 = None
    if z0_given:
        rank = len(ws) - 2
        st = (stride,) * rank if isinstance(stride, int) else stride
        sz = [(s + 2 * padding - k) // t + 1 for s, k, t in zip(xs[2:], ws[2:], st)]
        z0 = torch.randn(xs[0], ws[0], *sz, generator=g, dtype=torch.float64)
    return x, w, lam, step, z0


@pytest.mark.parametrize("strategy", ["direct", "gemm"])
@pytest.mark.parametrize("fista,nonneg", [(False, False), (True, True)], ids=["ista", "fista-nonneg"])
@pytest.mark.parametrize("z0_given", [False, True], ids=["zeros", "z0"])
@pytest.mark.parametrize("xs,ws,padding", EMPTY)
def test_empty_problem_matches_reference(monkeypatch, xs, ws, padding, z0_given, fista, nonneg, strategy):
    monkeypatch.setenv("DSC_KERNELS_CPP_STRATEGY", strategy)
    x, w, lam, step, z0 = _problem(xs, ws, padding, 1, z0_given)
    kw = {"padding": padding, "fista": fista, "nonneg": nonneg}
    z_ref, g_ref = _run("reference", x, w, lam, step, z0, **kw)
    for recompute in (False, True):
        z, g = _run("cpp", x, w, lam, step, z0, recompute=recompute, **kw)
        assert z.shape == z_ref.shape
        torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
        for a, b in zip(g, g_ref):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("xs,ws,padding", EMPTY_MAP)
def test_empty_map_is_rejected_by_name_on_every_backend(xs, ws, padding):
    x, w, lam, step, _ = _problem(xs, ws, padding, 1, False)
    for backend in ("reference", "cpp"):
        with pytest.raises(ValueError, match="empty spatial size"):
            DF.conv_ista(x, w, lam, n_iter=3, step=step, padding=padding, backend=backend)


@pytest.mark.parametrize("strategy", ["direct", "gemm"])
@pytest.mark.parametrize("checkpoint", [0, 2])
@pytest.mark.parametrize("xs,ws,padding", EMPTY + EMPTY_MAP)
def test_empty_problem_ops_match_autograd_reference(monkeypatch, xs, ws, padding, checkpoint, strategy):
    """The op pair itself (what compiled graphs and other callers reach without functional's checks) against
    autograd through conv_ista_ref, z0 given, FISTA and nonneg."""
    monkeypatch.setenv("DSC_KERNELS_CPP_STRATEGY", strategy)
    pad = [0 if xs[2] == 1 else padding, padding]
    x, w, lam, step, _ = _problem(xs, ws, padding, 1, False)
    sz = [(s + 2 * p - k) + 1 for s, p, k in zip(xs[2:], pad, ws[2:])]
    z0 = torch.randn(xs[0], ws[0], *sz, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    leaves = [t.clone().requires_grad_() for t in (x, w, lam, step, z0)]
    z_ref = conv_ista_ref(
        leaves[0], leaves[1], leaves[2], leaves[3], z0=leaves[4], padding=pad, nonneg=True, fista=True
    )
    want = torch.autograd.grad(z_ref.sum(), leaves, allow_unused=True)
    geo = ([1, 1], pad, True, True)
    z, saved = ops.conv_ista_fwd_cpp(x, w, w, lam, step, z0, *geo, checkpoint)
    torch.testing.assert_close(z, z_ref.detach(), rtol=1e-12, atol=1e-12)
    grad_z = torch.ones((), dtype=z.dtype).expand_as(z)
    gx, gw, gwe, glam, gstep, gz0 = ops.conv_ista_bwd_cpp(
        grad_z, x, w, w, lam, step, z0, z if checkpoint else z.new_empty(0), saved, *geo, checkpoint
    )
    for a, b, inp in zip((gx, gw + gwe, glam, gstep, gz0), want, (x, w, lam, step, z0)):
        assert a.shape == inp.shape  # autograd needs each gradient in its input's shape
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy", ["direct", "gemm"])
@pytest.mark.parametrize("xs,ws,padding,stride", EDGES)
def test_edge_geometry_matches_reference(monkeypatch, xs, ws, padding, stride, strategy):
    monkeypatch.setenv("DSC_KERNELS_CPP_STRATEGY", strategy)
    x, w, lam, step, z0 = _problem(xs, ws, padding, stride, True)
    kw = {"padding": padding, "stride": stride, "fista": True}
    z_ref, g_ref = _run("reference", x, w, lam, step, z0, **kw)
    z, g = _run("cpp", x, w, lam, step, z0, **kw)
    torch.testing.assert_close(z, z_ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_kernel_larger_than_padded_signal_is_rejected_by_name():
    with pytest.raises(ValueError, match="too small for kernel"):
        DF.conv_ista(torch.randn(1, 1, 2, 2), torch.randn(2, 1, 3, 3), 0.1, n_iter=2, step=0.1, backend="cpp")
