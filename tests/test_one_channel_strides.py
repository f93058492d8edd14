"""Operands with one channel and channels-last strides, against float64 on plain tensors.

oneDNN's CPU convolution computes a strided convolution wrongly when a one-channel operand carries channels-last
strides (channel stride 1), which torch also counts as contiguous: a grey NHWC image permuted to (B, 1, H, W), or
the cpp gemm strategy's own channels-last views of a one-channel signal. The geometry that shows it here, a 3 x 4
kernel at stride (1, 5) on 9 x 8 signals (one code column, four signal columns no atom reads), gave float32 values
off by up to 1e37 before reference/conv.py's and csrc/cpu/aten_conv.h's plain_strides.
"""

from __future__ import annotations

import pytest
import torch

import dsc_kernels.functional as DF

STRIDE = (1, 5)
TOL = dict(rtol=1e-4, atol=1e-4)


def one_channel_view(t: torch.Tensor) -> torch.Tensor:
    """t (N, 1, H, W) as channels-last strides over its memory: what permuting a grey NHWC image gives."""
    n, c, h, w = t.shape
    assert c == 1
    return t.contiguous().view(-1).as_strided((n, 1, h, w), (h * w, 1, w, 1))


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 9, 8, generator=g)
    w = torch.randn(3, 1, 3, 4, generator=g) / 3
    return x, w


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


def _assert_matches_float64(out, inputs, want, inputs64, generator, **tol):
    """out and its gradients in inputs against the float64 computation want of inputs64, for one random grad_out."""
    tol = tol or TOL
    torch.testing.assert_close(out.double(), want, **tol)
    gout = torch.randn(want.shape, generator=generator, dtype=torch.float64)
    for got, ref in zip(_grads(out, inputs, gout.to(out.dtype)), _grads(want, inputs64, gout)):
        torch.testing.assert_close(got.double(), ref, **tol)


@pytest.mark.parametrize("view", ["signal", "dictionary", "both"])
def test_analysis_and_synthesis_of_one_channel_views(problem, view):
    x, w = problem
    xs = one_channel_view(x) if view in ("signal", "both") else x
    ws = one_channel_view(w) if view in ("dictionary", "both") else w
    xs, ws = xs.clone().requires_grad_(), ws.clone().requires_grad_()  # clone keeps the strides
    assert (xs.stride(1), ws.stride(1)) == ((1 if view != "dictionary" else 72), (1 if view != "signal" else 12))
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    got = DF.conv_analysis(xs, ws, stride=STRIDE)
    want = DF.conv_analysis(x64, w64, stride=STRIDE)
    torch.testing.assert_close(got.double(), want, **TOL)
    g = torch.randn_like(want)
    for a, b in zip(_grads(got, (xs, ws), g.float()), _grads(want, (x64, w64), g)):
        torch.testing.assert_close(a.double(), b, **TOL)
    z = torch.randn(2, 3, 7, 1)
    got = DF.conv_synthesis(z.requires_grad_(), ws, stride=STRIDE, signal_size=(9, 8))
    z64 = z.detach().double().requires_grad_()
    want = DF.conv_synthesis(z64, w64, stride=STRIDE, signal_size=(9, 8))
    torch.testing.assert_close(got.double(), want, **TOL)
    g = torch.randn_like(want)
    for a, b in zip(_grads(got, (z, ws), g.float()), _grads(want, (z64, w64), g)):
        torch.testing.assert_close(a.double(), b, **TOL)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("strategy", ["auto", "gemm"])
@pytest.mark.parametrize("c_code", [1, 3])
def test_conv_ista_with_a_one_channel_signal_and_code_column(problem, backend, strategy, c_code, monkeypatch):
    monkeypatch.setenv("DSC_KERNELS_CPP_STRATEGY", strategy)
    x, w = problem
    w = w[:c_code]
    xs = one_channel_view(x).requires_grad_()
    ws = w.clone().requires_grad_()
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    kw = dict(n_iter=4, step=0.2, stride=STRIDE, fista=True)
    want = DF.conv_ista(x64, w64, 0.05, backend="reference", **kw)
    with torch.no_grad():  # the inference forward (no residuals kept, whole-batch chunks)
        torch.testing.assert_close(DF.conv_ista(xs, ws, 0.05, backend=backend, **kw).double(), want, **TOL)
    got = DF.conv_ista(xs, ws, 0.05, backend=backend, **kw)
    torch.testing.assert_close(got.double(), want, **TOL)
    g = torch.randn_like(want)
    for a, b in zip(_grads(got, (xs, ws), g.float()), _grads(want, (x64, w64), g)):
        torch.testing.assert_close(a.double(), b, **TOL)


def test_an_infinite_item_leaves_the_others_right(problem):
    # The direct strategy runs a column-strided forward whose code is not finite again on gemm, whose channels-last
    # views of this one-channel signal gave the finite item garbage (zeros, or 1e34) before plain_strides.
    x, w = problem
    x = x.clone()
    x[1, 0, 5, 3] = float("inf")
    got = DF.conv_ista(x, w, 0.05, n_iter=3, step=0.2, stride=STRIDE, backend="cpp")
    want = DF.conv_ista(x.double(), w.double(), 0.05, n_iter=3, step=0.2, stride=STRIDE, backend="reference")
    torch.testing.assert_close(got[0].double(), want[0], **TOL)
    torch.testing.assert_close(got[1].isnan(), want[1].isnan())


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_ml_ista_on_a_permuted_grey_image(problem, backend):
    x, _ = problem
    weights = [torch.randn(4, 1, 3, 4, generator=torch.Generator().manual_seed(1)) / 3]
    xs = one_channel_view(x)
    kw = dict(n_iter=2, strides=[STRIDE])
    got = DF.ml_ista(xs, weights, [0.05], backend=backend, **kw)
    want = DF.ml_ista(x.double(), [w.double() for w in weights], [0.05], backend="reference", **kw)
    torch.testing.assert_close(got[-1].double(), want[-1], **TOL)


def test_lipschitz_constant_of_a_one_channel_dictionary_view(problem):
    _, w = problem
    ws = one_channel_view(w)
    got = DF.lipschitz_constant(ws, (9, 8), stride=STRIDE)
    want = DF.lipschitz_constant(w.double(), (9, 8), stride=STRIDE)
    assert got == pytest.approx(want, rel=1e-4)


def test_compiled_analysis_and_synthesis_of_a_permuted_grey_image(problem):
    # Under torch.compile a same-shape view is dropped (the compiled analysis returned NaN before plain_strides took
    # as_strided), and Inductor lays out the backward's convolutions itself: the compiled input gradient of the
    # synthesis was off by 1.3 (plain F.conv_transpose2d too) until the reference ran one-column axes at stride 1.
    x, w = problem
    xs = one_channel_view(x)
    analysis = torch.compile(lambda x, w: DF.conv_analysis(x, w, stride=STRIDE), fullgraph=True)
    torch.testing.assert_close(analysis(xs, w).double(), DF.conv_analysis(x.double(), w.double(), stride=STRIDE), **TOL)
    z = torch.randn(2, 3, 7, 1)
    synthesis = torch.compile(
        lambda z, w: DF.conv_synthesis(z, w, stride=STRIDE, signal_size=(9, 8)).sum(dim=(2, 3)), fullgraph=True
    )
    ws = one_channel_view(w).requires_grad_()
    out = synthesis(z.requires_grad_(), ws)
    (gz,) = torch.autograd.grad(out.sum(), z)
    z64 = z.detach().double().requires_grad_()
    want = DF.conv_synthesis(z64, w.double(), stride=STRIDE, signal_size=(9, 8)).sum(dim=(2, 3))
    (gz64,) = torch.autograd.grad(want.sum(), z64)
    torch.testing.assert_close(gz.double(), gz64, **TOL)


@pytest.mark.parametrize("channels", [(3, 2), (1, 1)], ids=["3to2", "one_channel"])
def test_dynamic_compiled_synthesis_and_analysis(channels):
    # torch.compile(dynamic=True) of conv_synthesis failed where a code extent equals a kernel extent (3 here): z's
    # size, checked against the code size of a symbolic kernel size, made inductor fail ("Exponent must be
    # non-negative", plain torch too) until the kernel size was specialised; with it specialised, plain_strides'
    # stride check of contiguous()'s result failed Dynamo on one-channel operands ("Cannot construct
    # `ConstantVariable`"), and its as_strided on a copy failed inductor on the backward of a transposed one-channel
    # signal ("cannot determine truth value of Relational").
    c_code, c_sig = channels
    g = torch.Generator().manual_seed(1)
    w = torch.randn(c_code, c_sig, 3, 3, generator=g) / 3
    z = torch.randn(2, c_code, 3, 4, generator=g).requires_grad_()
    wr = w.clone().requires_grad_()
    synthesis = torch.compile(lambda z, w: DF.conv_synthesis(z, w, signal_size=(5, 6)), fullgraph=True, dynamic=True)
    out = synthesis(z, wr)
    z64, w64 = z.detach().double().requires_grad_(), w.double().requires_grad_()
    want = torch.nn.functional.conv_transpose2d(z64, w64)
    _assert_matches_float64(out, (z, wr), want, (z64, w64), g)
    x = torch.randn(3, c_sig, 8, 2, generator=g).transpose(2, 3).requires_grad_()  # (3, c_sig, 2, 8), transposed
    wa = torch.randn(c_code, c_sig, 2, 4, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    analysis = torch.compile(
        lambda x, w: DF.conv_analysis(x, w, stride=(1, 2), padding=(3, 2)), fullgraph=True, dynamic=True
    )
    out = analysis(x, wa)
    x64, wa64 = x.detach().double().contiguous().requires_grad_(), wa.detach().double().contiguous().requires_grad_()
    want = torch.nn.functional.conv2d(x64, wa64, stride=(1, 2), padding=(3, 2))
    _assert_matches_float64(out, (x, wa), want, (x64, wa64), g)


def test_dynamic_compiled_one_window_analysis_of_a_channels_last_signal():
    # A code axis of extent 1 under a stride above 1 runs the analysis on the one window cut out at stride 1. Cutting
    # it out of the padded signal (a constant size out of a symbolic one) made inductor fail the compiled backward of
    # a channels-last signal under dynamic=True ("cannot determine truth value of Relational", plain torch too).
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 5, 1, 2, generator=g).permute(0, 3, 1, 2).requires_grad_()  # (1, 2, 5, 1), NHWC
    w = (torch.randn(12, 2, 5, 1, generator=g) / 3).requires_grad_()
    analysis = torch.compile(
        lambda x, w: DF.conv_analysis(x, w, stride=(5, 2), padding=(2, 0)), fullgraph=True, dynamic=True
    )
    out = analysis(x, w)
    x64, w64 = x.detach().double().contiguous().requires_grad_(), w.detach().double().requires_grad_()
    want = torch.nn.functional.conv2d(x64, w64, stride=(5, 2), padding=(2, 0))
    _assert_matches_float64(out, (x, w), want, (x64, w64), g)


def test_dynamic_compiled_bfloat16_analysis_of_one_channel_operands():
    # conv_operand made bfloat16 operands contiguous() before plain_strides, whose stride check of that result failed
    # Dynamo under dynamic=True once the kernel size was specialised ("Cannot construct `ConstantVariable`").
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 6, 3, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(1, 1, 1, 4, generator=g) / 3).bfloat16().requires_grad_()
    analysis = torch.compile(
        lambda x, w: DF.conv_analysis(x, w, stride=(2, 5), padding=(0, 2)), fullgraph=True, dynamic=True
    )
    out = analysis(x, w)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = torch.nn.functional.conv2d(x64, w64, stride=(2, 5), padding=(0, 2))
    _assert_matches_float64(out, (x, w), want, (x64, w64), g, rtol=2e-2, atol=2e-2)
