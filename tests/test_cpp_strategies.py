"""Each strategy of the cpp conv-ISTA backend (direct, gemm; csrc/cpu/conv_ista/strategies.h) against the reference
op pair, forward and all six gradients, and the per-shape choice between them.

DSC_KERNELS_CPP_STRATEGY forces a strategy; it is read on every call, so monkeypatch.setenv switches it per test.
"""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import fista_through_an_infinite_code
from hypothesis import given, settings
from hypothesis import strategies as st

import dsc_kernels.functional as DF
from dsc_kernels import _ext
from dsc_kernels.ops import op_pair
from dsc_kernels.reference.conv_ista import (
    KEEP_RESIDUALS,
    NO_BACKWARD,
    conv_ista_bwd_ref,
    conv_ista_fwd_ref,
    conv_ista_ref,
)

ops = _ext.load()
op_pair("conv_ista", "cpp")

STRATEGIES = ("direct", "gemm")

# name, x shape, weight shape, stride, padding: odd sizes, strides that do not divide the kernel or exceed it, a
# height-1 map (how functional runs 1-D problems), more code than signal channels and the reverse, a kernel that
# covers the whole map (the gemm strategy's matrix-product case), weights larger than the gemm strategy's chunk of
# codes (its weight-gradient sums are then the op's channels-first gradients)
GEOMETRIES = [
    ("odd", (3, 2, 9, 10), (5, 2, 3, 4), [1, 1], [1, 2]),
    ("stride2x3", (2, 3, 11, 13), (4, 3, 4, 3), [2, 3], [1, 0]),
    ("stride-gt-kernel", (2, 2, 11, 14), (5, 2, 2, 3), [3, 4], [1, 0]),
    ("1d", (3, 2, 1, 23), (6, 2, 1, 5), [1, 2], [0, 2]),
    ("full-map", (4, 3, 4, 5), (7, 3, 4, 5), [1, 1], [0, 0]),
    ("many-channel", (5, 9, 6, 7), (12, 9, 3, 3), [1, 1], [1, 1]),
    ("big-weights", (2, 16, 3, 3), (24, 16, 3, 3), [1, 1], [1, 1]),
    # one signal channel, a tall kernel and a row stride: D's tiles compute blocks of output rows per row phase,
    # with a partial block at each phase's end
    ("gray-row-blocks", (2, 1, 13, 37), (5, 1, 7, 5), [2, 1], [3, 2]),
    # code rows of whole vectors and whole channel blocks: the direct backward's weight gradients read the code
    # iterates and gradients in place instead of copying them
    ("aligned-code", (2, 1, 5, 16), (8, 1, 3, 3), [1, 1], [1, 1]),
    # a narrow code map (11 of 16 lanes) and 37 channels: the direct backward's weight gradients run vectorised along
    # code channels, in blocks of channel vectors with a partial last block and padded channels
    ("channel-vector-grads", (2, 2, 9, 11), (37, 2, 3, 5), [2, 1], [1, 2]),
]


def _tensors(xs, ws, n_iter, *, untied, z0, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(xs, generator=g, dtype=dtype)
    w = torch.randn(ws, generator=g, dtype=dtype)
    w = w / w.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    we = w + 0.3 * torch.randn(ws, generator=g, dtype=dtype) if untied else w
    lam = 0.02 + 0.1 * torch.rand(n_iter, ws[0], generator=g, dtype=dtype)  # per iteration and channel
    step = 0.15 + 0.2 * torch.rand(n_iter, generator=g, dtype=dtype)  # per iteration
    return x, w, we, lam, step


def _z0(x, w, stride, padding, given, dtype):
    if not given:
        return x.new_empty(0)
    sz = [(s + 2 * p - k) // t + 1 for s, p, k, t in zip(x.shape[2:], padding, w.shape[2:], stride)]
    return 0.3 * torch.randn(x.shape[0], w.shape[0], *sz, generator=torch.Generator().manual_seed(7), dtype=dtype)


def _forwards(inputs, geo, checkpoint, ref_checkpoint=None):
    """(z, saved) of the cpp op and of the reference op pair (with ref_checkpoint, default checkpoint); the two z
    agree in fp64."""
    out = ops.conv_ista_fwd_cpp(*inputs, *geo, checkpoint)
    out_ref = conv_ista_fwd_ref(*inputs, *geo, checkpoint if ref_checkpoint is None else ref_checkpoint)
    torch.testing.assert_close(out[0], out_ref[0], rtol=1e-11, atol=1e-11)
    return out, out_ref


def _check_gradients(grad_z, inputs, out, out_ref, geo, checkpoint):
    """The cpp backward's six gradients against the reference op pair's (fp64), each from its own forward's
    (z, saved); recompute mode (checkpoint 0) hands the backward an empty z, as the autograd wrapper does."""
    (z, saved), (z_ref, saved_ref) = out, out_ref
    got = ops.conv_ista_bwd_cpp(grad_z, *inputs, z if checkpoint else z.new_empty(0), saved, *geo, checkpoint)
    want = conv_ista_bwd_ref(grad_z, *inputs, z_ref, saved_ref, *geo, checkpoint)
    for what, a, b in zip(("x", "weight", "encoder_weight", "lam", "step", "z0"), got, want):
        assert a.shape == b.shape, what
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=what)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("checkpoint", [0, 1, 2, 3, 2 | KEEP_RESIDUALS, 3 | KEEP_RESIDUALS])
@pytest.mark.parametrize(
    "fista,nonneg,untied,z0_given",
    [(False, False, False, False), (True, False, True, True), (False, True, True, True), (True, True, False, False)],
    ids=["ista", "fista-untied-z0", "nonneg-untied-z0", "fista-nonneg"],
)
@pytest.mark.parametrize("name,xs,ws,stride,padding", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_op_pair_matches_reference_fp64(
    monkeypatch, strategy, checkpoint, fista, nonneg, untied, z0_given, name, xs, ws, stride, padding
):
    """Forward (z and the saved checkpoints) and the six gradients equal the reference op pair's in fp64, for
    every checkpoint interval (0: recompute mode), with and without kept residuals, grad_z an expanded scalar as
    sum() gives it."""
    monkeypatch.setenv("DSC_KERNELS_CPP_STRATEGY", strategy)
    dtype = torch.float64
    x, w, we, lam, step = _tensors(xs, ws, 7, untied=untied, z0=z0_given, dtype=dtype)
    z0 = _z0(x, w, stride, padding, z0_given, dtype)
    geo = (stride, padding, nonneg, fista)
    inputs = (x, w, we, lam, step, z0)
    out, out_ref = _forwards(inputs, geo, checkpoint)
    torch.testing.assert_close(out[1], out_ref[1], rtol=1e-11, atol=1e-11)
    grad_z = torch.randn(out[0].shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    if checkpoint == 0:
        grad_z = torch.ones((), dtype=dtype).expand_as(out[0])
    _check_gradients(grad_z, inputs, out, out_ref, geo, checkpoint)


# Random geometries beyond the fixed ones above: channel counts on both sides of a vector's lanes and of the tiles'
# channel blocks (the weight gradients' channel-vector path needs >= 2 vectors of code channels on a narrow map), maps
# from a single row to several vectors wide, kernels and strides up to 8 x 9 and 4, 1-D rows, every option and
# checkpoint mode. The step is scaled by 1/L so the iterations converge: on divergent ones (|z| ~ 1e6) fp64 rounding
# differences between two correct summation orders grow past any fixed tolerance.
random_problem = st.fixed_dictionaries(
    dict(
        b=st.integers(1, 3),
        c_sig=st.sampled_from([1, 2, 3, 4, 8, 17, 33]),
        c_code=st.sampled_from([1, 2, 5, 8, 16, 17, 31, 32, 33, 48]),
        one_d=st.booleans(),
        kh=st.integers(1, 8),
        kw=st.integers(1, 9),
        sh=st.integers(1, 4),
        sw=st.integers(1, 4),
        pad=st.tuples(st.floats(0, 0.99), st.floats(0, 0.99)),
        extra=st.tuples(st.integers(0, 20), st.integers(0, 36)),
        n_iter=st.integers(1, 6),
        fista=st.booleans(),
        nonneg=st.booleans(),
        untied=st.booleans(),
        z0_given=st.booleans(),
        checkpoint=st.sampled_from([0, 1, 2, 3, 1 | KEEP_RESIDUALS, 2 | KEEP_RESIDUALS, 3 | KEEP_RESIDUALS]),
        strategy=st.sampled_from(["direct", "gemm", "auto"]),
        seed=st.integers(0, 2**16),
    )
)


@settings(max_examples=60, deadline=None)
@given(random_problem)
def test_random_geometries_match_reference_fp64(r):
    """Forward and the six gradients equal the reference op pair's in fp64 (the strategy is set per example: a
    function-scoped monkeypatch would span all of hypothesis's examples)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSC_KERNELS_CPP_STRATEGY", r["strategy"])
        _check_random_problem(r)


def _check_random_problem(r):
    kh, sh = (1, 1) if r["one_d"] else (r["kh"], r["sh"])
    ph, pw = int(r["pad"][0] * kh), int(r["pad"][1] * r["kw"])
    h = 1 if r["one_d"] else max(1, kh - 2 * ph) + r["extra"][0]
    w = max(1, r["kw"] - 2 * pw) + r["extra"][1]
    xs, ws, stride, padding = (
        (r["b"], r["c_sig"], h, w),
        (r["c_code"], r["c_sig"], kh, r["kw"]),
        [sh, r["sw"]],
        [ph, pw],
    )
    dtype = torch.float64
    x, wt, we, lam, step = _tensors(
        xs, ws, r["n_iter"], untied=r["untied"], z0=r["z0_given"], dtype=dtype, seed=r["seed"]
    )
    step = step / (0.35 * max(DF.lipschitz_constant(wt, xs[2:], stride=stride, padding=padding, n_iter=50), 1e-3))
    z0 = _z0(x, wt, stride, padding, r["z0_given"], dtype)
    geo = (stride, padding, r["nonneg"], r["fista"])
    inputs = (x, wt, we, lam, step, z0)
    out, out_ref = _forwards(inputs, geo, r["checkpoint"])
    grad_z = torch.randn(out[0].shape, generator=torch.Generator().manual_seed(r["seed"]), dtype=dtype)
    _check_gradients(grad_z, inputs, out, out_ref, geo, r["checkpoint"])


@pytest.mark.parametrize("checkpoint", [NO_BACKWARD, 0, 2, 2 | KEEP_RESIDUALS])
@pytest.mark.parametrize("batch,size", [(5, 48), (13, 32)])
def test_gemm_chunks_of_unequal_size_fp64(monkeypatch, checkpoint, batch, size):
    """A 48 x 48 map is 2304 code columns per item, so the gemm strategy's chunks of ~4096 columns split a batch of
    5 into 2 + 2 + 1 items (strategy.cpp); on 32 x 32 (1024 columns, chunks of up to 4) a batch of 13 runs as
    4 + 3 + 3 + 3 (the split is even). Every chunk boundary, the short chunks included, against the reference,
    forward and the six gradients."""
    monkeypatch.setenv("DSC_KERNELS_CPP_STRATEGY", "gemm")
    dtype = torch.float64
    xs, ws, stride, padding = (batch, 2, size, size), (3, 2, 3, 3), [1, 1], [1, 1]
    x, w, we, lam, step = _tensors(xs, ws, 4, untied=True, z0=True, dtype=dtype)
    z0 = _z0(x, w, stride, padding, True, dtype)
    geo = (stride, padding, False, True)
    inputs = (x, w, we, lam, step, z0)
    out, out_ref = _forwards(inputs, geo, checkpoint, ref_checkpoint=max(checkpoint, 0))
    if checkpoint == NO_BACKWARD:
        return
    grad_z = torch.randn(out[0].shape, generator=torch.Generator().manual_seed(6), dtype=dtype)
    _check_gradients(grad_z, inputs, out, out_ref, geo, checkpoint)


@pytest.mark.parametrize("checkpoint", [0, 1, 2, 3, 2 | KEEP_RESIDUALS])
@pytest.mark.parametrize("fista", [False, True], ids=["ista", "fista"])
def test_direct_forward_feeds_gemm_backward_fp64(monkeypatch, checkpoint, fista):
    """The rule picks per pass: one signal channel on an 8 x 8 code map runs its forward direct and its backward gemm
    (strategy.cpp). The gemm backward replays from the direct forward's checkpoints: the same z and gradients as the
    reference op pair."""
    monkeypatch.delenv("DSC_KERNELS_CPP_STRATEGY", raising=False)
    xs, ws, stride, padding = (5, 1, 8, 8), (6, 1, 3, 3), [1, 1], [1, 1]
    assert (_strategy(xs, ws, backward=False), _strategy(xs, ws)) == (0, 1)
    dtype = torch.float64
    x, w, we, lam, step = _tensors(xs, ws, 6, untied=True, z0=True, dtype=dtype)
    z0 = _z0(x, w, stride, padding, True, dtype)
    geo = (stride, padding, False, fista)
    inputs = (x, w, we, lam, step, z0)
    out, out_ref = _forwards(inputs, geo, checkpoint)
    grad_z = torch.randn(out[0].shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
    _check_gradients(grad_z, inputs, out, out_ref, geo, checkpoint)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("fista", [False, True], ids=["ista", "fista"])
@pytest.mark.parametrize("name,xs,ws,stride,padding", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_forward_without_backward_matches_reference_fp64(monkeypatch, strategy, fista, name, xs, ws, stride, padding):
    """checkpoint NO_BACKWARD (a forward no backward follows; the gemm strategy then chunks the batch for speed
    alone): the same z as the reference, nothing saved, on a batch of 40 so chunk sizes differ from save mode's."""
    monkeypatch.setenv("DSC_KERNELS_CPP_STRATEGY", strategy)
    xs = (40, *xs[1:])
    x, w, we, lam, step = _tensors(xs, ws, 5, untied=True, z0=False, dtype=torch.float64)
    z0 = _z0(x, w, stride, padding, True, torch.float64)
    geo = (stride, padding, False, fista)
    z, saved = ops.conv_ista_fwd_cpp(x, w, we, lam, step, z0, *geo, NO_BACKWARD)
    z_ref, _ = conv_ista_fwd_ref(x, w, we, lam, step, z0, *geo, 0)
    assert saved.numel() == 0
    torch.testing.assert_close(z, z_ref, rtol=1e-11, atol=1e-11)
    with pytest.raises(RuntimeError, match="checkpoint"):
        ops.conv_ista_bwd_cpp(torch.ones_like(z), x, w, we, lam, step, z0, z.new_empty(0), saved, *geo, NO_BACKWARD)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name,xs,ws,stride,padding", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_functional_fp32_matches_autograd_reference(monkeypatch, strategy, name, xs, ws, stride, padding, seed):
    """Through functional and autograd in fp32 (save mode, FISTA, untied): z and the gradients of every input
    against conv_ista_ref's autograd, comparing values where the supports agree; three draws each, since one draw's
    error ratio moves by 2x between seeds on these small problems."""
    monkeypatch.setenv("DSC_KERNELS_CPP_STRATEGY", strategy)
    x, w, we, lam, step = _tensors(xs, ws, 4, untied=True, z0=False, dtype=torch.float32, seed=seed)
    leaves = [t.clone().requires_grad_() for t in (x, w, we, lam, step)]
    outs = []
    for backend in ("reference", "cpp"):
        xl, wl, wel, laml, stepl = (t.detach().clone().requires_grad_() for t in leaves)
        if backend == "reference":
            z = conv_ista_ref(xl, wl, laml, stepl, encoder_weight=wel, stride=stride, padding=padding, fista=True)
        else:
            z = DF.conv_ista(
                xl,
                wl,
                laml,
                n_iter=4,
                step=stepl,
                encoder_weight=wel,
                stride=stride,
                padding=padding,
                fista=True,
                backend="cpp",
            )
        g = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
        outs.append((z.detach(), torch.autograd.grad((z * g).sum(), [xl, wl, wel, laml, stepl])))
    (z_ref, g_ref), (z, g) = outs
    flips = (z != 0) != (z_ref != 0)
    assert flips.float().mean() <= 0.01
    # z against float64 where the supports agree, by the project's rule: typical (mean) error at most 2x the float32
    # reference's own; the largest within 4x of the reference's largest (plus 1e-5): an entry that crossed its
    # threshold at an earlier iteration carries an amplified error, and which of two float32 runs it hits is chance
    z64 = conv_ista_ref(
        *(t.double() for t in (x, w, lam, step)), encoder_weight=we.double(), stride=stride, padding=padding, fista=True
    )
    same = ~flips & ((z64 != 0) == (z_ref != 0))
    own, ours = (z_ref.double() - z64)[same].abs(), (z.double() - z64)[same].abs()
    assert ours.mean().item() <= 2 * own.mean().item() + 1e-7
    assert ours.max().item() <= 4 * own.max().item() + 1e-5
    for a, b in zip(g, g_ref):
        scale = max(1.0, b.abs().max().item())
        assert (a - b).abs().max().item() / scale <= 2e-3 * (1 + 100 * flips.float().mean().item())


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("checkpoint", [0, 2])
def test_gradcheck_fp64(monkeypatch, strategy, checkpoint):
    monkeypatch.setenv("DSC_KERNELS_CPP_STRATEGY", strategy)
    x, w, we, lam, step = _tensors((2, 3, 5, 6), (4, 3, 3, 2), 3, untied=True, z0=True, dtype=torch.float64, seed=4)
    z0 = _z0(x, w, [2, 1], [1, 0], True, torch.float64)
    inputs = [t.requires_grad_() for t in (x, w, we, lam, step, z0)]

    def f(x, w, we, lam, step, z0):
        return ops.conv_ista_fwd_cpp(x, w, we, lam, step, z0, [2, 1], [1, 0], False, True, checkpoint)[0]

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def _strategy(xs, ws, stride=(1, 1), padding=(1, 1), backward=True):
    return ops.conv_ista_strategy_cpp(torch.empty(xs), torch.empty(ws), list(stride), list(padding), backward)


def test_automatic_choice_covers_both_strategies(monkeypatch):
    """The automatic choice picks direct where the convolutions do not dominate (one signal channel, a large map)
    and gemm where they do (many channels), per pass, the same answer every time, and the environment variable
    overrides it for both passes; empty problems run neither."""
    monkeypatch.delenv("DSC_KERNELS_CPP_STRATEGY", raising=False)
    few, many = ((4, 1, 64, 64), (32, 1, 7, 7)), ((64, 32, 8, 8), (32, 32, 3, 3))
    # every branch of choose_strategy (strategy.cpp), in its order
    assert _strategy((8, 64, 4, 4), (128, 64, 4, 4), padding=(0, 0)) == 1  # the kernel covers the map
    assert _strategy(*many) == 1  # >= 32 signal channels
    assert _strategy((8, 64, 1, 64), (64, 64, 1, 3), padding=(0, 1)) == 1  # ... in 1-D too
    # >= 16 signal channels and >= 16384 multiply-adds per code position, both passes, on a large map
    big = ((16, 16, 24, 24), (48, 16, 5, 5))
    assert (_strategy(*big, padding=(2, 2), backward=False), _strategy(*big, padding=(2, 2))) == (1, 1)
    # the backward from 4096 with >= 8 signal channels, 1-D too; the 1-D forward stays direct
    one_d = ((32, 16, 1, 128), (64, 16, 1, 7))
    assert (_strategy(*one_d, padding=(0, 3), backward=False), _strategy(*one_d, padding=(0, 3))) == (0, 1)
    assert _strategy((8, 8, 1, 64), (64, 8, 1, 3), padding=(0, 1)) == 0  # 1-D, fewer channels and multiply-adds
    assert _strategy((8, 3, 16, 16), (96, 3, 3, 3), stride=(3, 3), padding=(0, 0)) == 1  # a 5 x 5 code map
    # 16 x 16 with 8 signal channels: gemm with >= 16 code channels, direct with fewer
    assert _strategy((8, 8, 16, 16), (16, 8, 3, 3)) == 1
    assert _strategy((8, 8, 16, 16), (8, 8, 3, 3)) == 0
    assert _strategy((8, 3, 16, 16), (64, 3, 5, 5), padding=(2, 2)) == 0  # ... with 3
    assert _strategy((8, 16, 64, 64), (16, 16, 3, 3)) == 0  # few multiply-adds on a large map
    assert _strategy(*few, padding=(3, 3)) == 0
    # the forward's own rule: few signal channels on a small map run direct there, gemm in the backward
    small_few = ((64, 1, 8, 8), (32, 1, 3, 3))
    assert (_strategy(*small_few, backward=False), _strategy(*small_few)) == (0, 1)
    assert _strategy((64, 8, 8, 8), (32, 8, 3, 3), backward=False) == 1
    assert _strategy(*many, backward=False) == 1
    assert len({_strategy(*many) for _ in range(5)}) == 1
    for value, want in (("direct", 0), ("GEMM", 1), ("auto", 1), ("", 1)):
        monkeypatch.setenv("DSC_KERNELS_CPP_STRATEGY", value)
        assert _strategy(*many) == want
        if value.lower() in ("direct", "gemm"):
            assert _strategy(*small_few, backward=False) == want
    assert _strategy((0, 32, 8, 8), (32, 32, 3, 3)) == -1


def test_unknown_strategy_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("DSC_KERNELS_CPP_STRATEGY", "fastest")
    x, w, _, _, _ = _tensors((1, 1, 6, 6), (2, 1, 3, 3), 2, untied=False, z0=False, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="DSC_KERNELS_CPP_STRATEGY must be direct, gemm or auto"):
        DF.conv_ista(x, w, 0.1, n_iter=2, step=0.1, backend="cpp")


def _same_nan_and_values(got, want, what):
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN at other positions"
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=1e-9, atol=1e-9, msg=what)


@pytest.mark.parametrize("strategy", ["auto", "direct"])
@pytest.mark.parametrize("where", ["x", "z0", "grad_z"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("fista", [False, True])
def test_inf_and_nan_spread_as_the_reference_spreads_them(monkeypatch, strategy, where, value, fista):
    """The direct strategy's polyphase synthesis ran a column stride's phases over the union of their windows with
    zero taps, so 0 * inf and 0 * NaN made NaN in columns the phase never reaches: the NaN region grew by a column
    per side and iteration beyond torch.nn.functional's. Non-finite inputs with a column stride now take the gemm
    strategy, even when DSC_KERNELS_CPP_STRATEGY forces direct. Gradients are compared where the forward is finite
    (a NaN code's active set is a convention of its own), with the non-finite value in grad_z."""
    monkeypatch.setenv("DSC_KERNELS_CPP_STRATEGY", strategy)
    xs, ws, stride, padding = (2, 2, 9, 30), (5, 2, 3, 6), [2, 3], [1, 2]
    x, w, we, lam, step = _tensors(xs, ws, 3, untied=False, z0=False, dtype=torch.float64)
    z0 = _z0(x, w, stride, padding, True, torch.float64)
    if where == "x":
        x[0, 1, 4, 13] = value
    elif where == "z0":
        z0[1, 2, 2, 4] = value
    inputs, geo = (x, w, we, lam, step, z0), (stride, padding, False, fista)
    out, out_ref = ops.conv_ista_fwd_cpp(*inputs, *geo, 2), conv_ista_fwd_ref(*inputs, *geo, 2)
    _same_nan_and_values(out[0], out_ref[0], "z")
    if where != "grad_z":
        return
    grad_z = torch.randn(out[0].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grad_z[0, 3, 2, 5] = value
    got = ops.conv_ista_bwd_cpp(grad_z, *inputs, out[0], out[1], *geo, 2)
    want = conv_ista_bwd_ref(grad_z, *inputs, out_ref[0], out_ref[1], *geo, 2)
    for what, a, b in zip(("x", "weight", "encoder_weight", "lam", "step", "z0"), got, want):
        _same_nan_and_values(a, b, what)


@pytest.mark.parametrize("strategy", ["auto", "direct"])
# untied with a non-finite grad_z: the zero start code's synthesis, which the fused backends skip (design.md §2)
@pytest.mark.parametrize("where,untied", [("x", False), ("x", True), ("grad_z", False)])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs_at_stride_one_reach_only_the_weight_taps_torch_reaches(
    monkeypatch, strategy, where, value, untied
):
    """The direct backward's weight-gradient tiles run code rows padded to whole vectors. At stride 1 (where the
    forward needs no input check) their zero lanes met a non-finite corner sample at taps whose sums never read it:
    0 * NaN made whole rows of dL/dW NaN where torch.nn.functional's are finite. A direct backward whose weight
    gradients are not finite is now recomputed by the gemm strategy."""
    monkeypatch.setenv("DSC_KERNELS_CPP_STRATEGY", strategy)
    xs, ws, stride, padding = (2, 1, 20, 20), (3, 1, 3, 3), [1, 1], [1, 1]  # a 400-position code map: direct
    x, w, we, lam, step = _tensors(xs, ws, 1, untied=untied, z0=False, dtype=torch.float64)
    z0 = x.new_empty(0)
    if where == "x":
        x[0, 0, 0, 19] = value
    inputs, geo = (x, w, we, lam, step, z0), (stride, padding, False, False)
    out, out_ref = ops.conv_ista_fwd_cpp(*inputs, *geo, 2), conv_ista_fwd_ref(*inputs, *geo, 2)
    _same_nan_and_values(out[0], out_ref[0], "z")
    grad_z = torch.randn(out[0].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    if where == "grad_z":
        grad_z[1, 2, 0, 19] = value
    got = ops.conv_ista_bwd_cpp(grad_z, *inputs, out[0], out[1], *geo, 2)
    want = conv_ista_bwd_ref(grad_z, *inputs, out_ref[0], out_ref[1], *geo, 2)
    for what, a, b in zip(("x", "weight", "encoder_weight"), got, want):
        _same_nan_and_values(a, b, what)
    if where == "x":  # (torch's own padded zeros times a NaN gradient make every tap NaN)
        assert got[1].isfinite().any(), "the case must leave some taps finite, or it tests nothing"


@pytest.mark.parametrize("strategy", ["auto", "direct"])
@pytest.mark.parametrize("recompute", [False, True])
def test_iterates_that_overflow_inside_the_solve_spread_as_the_reference_spreads_them(monkeypatch, strategy, recompute):
    """Finite inputs (one sample at 3e38), whose iterates overflow inside the solve: the direct strategy's column
    phases met the overflowed iterates with their zero taps, and 0 * inf made NaN where the reference has inf or a
    finite value (23 code entries here), since only non-finite inputs sent a call to gemm. A direct pass whose z_n or
    small gradients come out non-finite now runs again on gemm."""
    monkeypatch.setenv("DSC_KERNELS_CPP_STRATEGY", strategy)
    g = torch.Generator().manual_seed(83)
    x = torch.randn(1, 1, 10, 10, generator=g)
    x.view(-1)[5] = 3e38
    w = torch.rand(1, 1, 4, 4, generator=g) + 0.5
    grad = torch.randn(1, 1, 9, 5, generator=g)
    out = {}
    for backend in ("reference", "cpp"):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        kw = dict(recompute=recompute) if backend == "cpp" else {}
        z = DF.conv_ista(xx, ww, 0.01, n_iter=3, stride=(1, 2), padding=1, backend=backend, **kw)
        out[backend] = (z, *torch.autograd.grad(z, (xx, ww), grad))
    assert out["reference"][0].isinf().any() and out["reference"][0].isfinite().any()
    for what, a, b in zip(("z", "x", "weight"), out["cpp"], out["reference"]):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), what
        torch.testing.assert_close(a.nan_to_num(0, 0, 0), b.nan_to_num(0, 0, 0), rtol=1e-4, atol=0, msg=what)


def _autograd_pair(monkeypatch, strategy, x, w, z0, *, encoder_weight=None, **kw):
    """conv_ista on the reference (autograd) and on cpp with `strategy`: (z, dL/dx, dL/dweight, dL/dlam, dL/dstep
    [, dL/dz0]) for L = sum z, per backend."""
    monkeypatch.setenv("DSC_KERNELS_CPP_STRATEGY", strategy)
    out = {}
    for backend in ("reference", "cpp"):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        zz = None if z0 is None else z0.clone().requires_grad_()
        lam = torch.full((w.shape[0],), 0.1, dtype=x.dtype, requires_grad=True)
        step = torch.tensor(0.2, dtype=x.dtype, requires_grad=True)
        z = DF.conv_ista(xx, ww, lam, step=step, z0=zz, encoder_weight=encoder_weight, backend=backend, **kw)
        wrt = (xx, ww, lam, step) + (() if zz is None else (zz,))
        out[backend] = (z, *torch.autograd.grad(z.sum(), wrt))
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("where", ["x", "z0"])
@pytest.mark.parametrize("nonneg", [False, True])
@pytest.mark.parametrize("fista", [False, True])
def test_nan_codes_get_the_gradients_autograd_gives(monkeypatch, strategy, where, nonneg, fista):
    """A NaN code is active (softshrink's and relu's derivative is 1 at NaN) and counts sign 0 in a signed threshold's
    gradient (relu(u - t) counts it: 1). cpp counted sign(NaN) as -1, so dL/dlam and dL/dstep came out finite and
    different from the reference's."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64)
    w = 0.3 * torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    z0 = 0.3 * torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    (x if where == "x" else z0)[(0, 1, 4, 3) if where == "x" else (1, 2, 1, 1)] = float("nan")
    out = _autograd_pair(monkeypatch, strategy, x, w, z0, n_iter=3, stride=2, padding=1, nonneg=nonneg, fista=fista)
    for what, a, b in zip(("z", "x", "weight", "lam", "step", "z0"), out["cpp"], out["reference"]):
        _same_nan_and_values(a, b, what)


@pytest.mark.parametrize("strategy", ["auto", *STRATEGIES])
@pytest.mark.parametrize("untied", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_a_non_finite_dictionary_tap_spreads_as_the_reference_spreads_it(monkeypatch, strategy, untied, stride):
    """torch.nn.functional's conv_transpose2d of the zero start code is NaN wherever a NaN tap reaches (0 * NaN):
    the gemm strategy skipped that synthesis (4 of 12 codes NaN instead of 12, none with an untied encoder), and the
    direct strategy's zero taps spread a tap that only meets padding. A non-finite dictionary takes gemm, which then
    convolves the zero code."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 7, 9, generator=g, dtype=torch.float64)
    w = 0.3 * torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    we = 0.3 * torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64) if untied else None
    w[0, 1, 0, 2] = float("nan")
    out = _autograd_pair(monkeypatch, strategy, x, w, None, encoder_weight=we, n_iter=2, stride=stride, padding=1)
    assert out["reference"][0].isnan().any()
    for what, a, b in zip(("z", "x", "weight", "lam", "step"), out["cpp"], out["reference"]):
        _same_nan_and_values(a, b, what)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("signal_channels", [1, 0])  # 0: the empty-signal path of ops.cpp
@pytest.mark.parametrize("recompute", [False, True])
def test_fista_second_iteration_has_no_momentum_term(monkeypatch, strategy, signal_channels, recompute):
    """FISTA's beta_1 is exactly 0, and the reference then takes y_1 = z_1 itself. cpp formed z_1 + 0 (z_1 - z_0),
    NaN wherever z_1 and z_0 are both infinite: an infinite z0 entry that stays -inf on the reference became NaN on
    cpp. Its backward likewise handed -0 dL/dy_1 to dL/dz_0, NaN wherever dL/dy_1 is infinite."""
    monkeypatch.setenv("DSC_KERNELS_CPP_STRATEGY", strategy)
    out = {
        backend: fista_through_an_infinite_code(backend, recompute=recompute, signal_channels=signal_channels)
        for backend in ("reference", "cpp")
    }
    assert out["reference"][0][0, 0, 0, 2] == float("-inf")
    for what, a, b in zip(("z", "x", "z0"), out["cpp"], out["reference"]):
        _same_nan_and_values(a, b, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("item", [0, 16])
def test_an_inf_code_at_the_padding_in_one_item_chunks_of_the_weight_gradients(monkeypatch, dtype, item):
    """design.md §2, the fifth exception: torch's float32 weight gradient multiplies the padding by an inf code entry
    (NaN) for a single item and forms no product there for two or more, and the gemm backward takes its weight
    gradients per chunk of the batch. With 17 items item 0 shares its chunk and item 16 is alone in the tail one, so
    the dictionaries' gradients of the latter come out NaN at the 5 border taps (x 8 channels) where the reference,
    one call over the batch, has finite values. cpp's NaN covers the reference's, z and the other gradients agree, and
    float64 (which always multiplies) agrees everywhere."""
    monkeypatch.setenv("DSC_KERNELS_CPP_STRATEGY", "gemm")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(17, 8, 6, 7, generator=g, dtype=dtype)
    w, we = (0.1 * torch.randn(6, 8, 3, 3, generator=g, dtype=dtype) for _ in range(2))
    lam, step = torch.full((1, 6), 0.1, dtype=dtype), torch.full((1,), 0.1, dtype=dtype)
    z0 = torch.randn(17, 6, 6, 7, generator=g, dtype=dtype)
    z0[item, 2, 5, 0] = float("-inf")  # bottom-left corner: its windows reach the padding below and to the left
    inputs, geo = (x, w, we, lam, step, z0), ([1, 1], [1, 1], False, False)
    out, out_ref = ops.conv_ista_fwd_cpp(*inputs, *geo, 1), conv_ista_fwd_ref(*inputs, *geo, 1)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    same = torch.equal(out[0].isnan(), out_ref[0].isnan())
    assert same and torch.allclose(out[0].nan_to_num(0, 0, 0), out_ref[0].nan_to_num(0, 0, 0), **tol)
    grad_z = torch.ones_like(out[0])
    got = ops.conv_ista_bwd_cpp(grad_z, *inputs, out[0], out[1], *geo, 1)
    want = conv_ista_bwd_ref(grad_z, *inputs, out_ref[0], out_ref[1], *geo, 1)
    differ = 0
    for what, a, b in zip(("x", "weight", "encoder_weight", "lam", "step", "z0"), got, want):
        if what in ("weight", "encoder_weight"):
            assert not (b.isnan() & ~a.isnan()).any(), what
            differ += int((a.isnan() & ~b.isnan()).sum())
            a, b = a.masked_fill(a.isnan(), 0), b.masked_fill(a.isnan(), 0)
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), what
        assert torch.allclose(a.nan_to_num(0, 0, 0), b.nan_to_num(0, 0, 0), **tol), what
    # at most the 5 border taps x 8 channels of the inf entry's channel (40 measured on torch 2.13, item 16, float32);
    # oneDNN's choice depends on the CPU, so the count is not pinned
    assert differ <= 40 and (differ == 0 or dtype == torch.float32)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_thread_counts_and_concurrent_callers_match_reference_fp64(monkeypatch, strategy):
    """Both strategies size per-thread workspaces and partial sums by at::get_num_threads() and pick a thread's by
    at::get_thread_num(), and the direct forward runs per item with at least as many items as threads, per band
    otherwise. Thread counts other than the suite's two (1; 3 and 7, beyond this machine's cores), batches on both
    sides of them, and several Python threads calling at once (each its own OpenMP team) give the reference's
    answers."""
    monkeypatch.setenv("DSC_KERNELS_CPP_STRATEGY", strategy)
    geo = ([2, 1], [3, 2], False, True)  # stride, padding, nonneg, fista
    problems = []
    for batch in (2, 9):
        x, w, we, lam, step = _tensors((batch, 1, 13, 21), (5, 1, 7, 5), 4, untied=True, z0=False, dtype=torch.float64)
        inputs = (x, w, we, lam, step, _z0(x, w, geo[0], geo[1], True, torch.float64))
        grad_z = torch.randn(inputs[5].shape, generator=torch.Generator().manual_seed(batch), dtype=torch.float64)
        problems.append((grad_z, inputs))

    def check_all():
        for grad_z, inputs in problems:
            for checkpoint in (0, 2):
                _check_gradients(grad_z, inputs, *_forwards(inputs, geo, checkpoint), geo, checkpoint)

    before = torch.get_num_threads()
    try:
        for threads in (1, 3, 7):
            torch.set_num_threads(threads)
            check_all()
    finally:
        torch.set_num_threads(before)
    errors = []

    def caller():
        try:
            check_all()
        except Exception as exc:  # noqa: BLE001 - reported below, with the thread's failure
            errors.append(exc)

    callers = [threading.Thread(target=caller) for _ in range(3)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert not errors, errors


def test_direct_backward_workspaces_follow_the_batch_not_the_thread_count(monkeypatch):
    # one workspace per thread was allocated and zeroed whatever the batch: one item at 8 threads peaked at 7.9x its
    # 1-thread memory, for workspaces no task used (parallel_for runs min(threads, B) tasks)
    from dsc_kernels.experiments.measure import measure_memory

    monkeypatch.setenv("DSC_KERNELS_CPP_STRATEGY", "direct")
    x = torch.randn(1, 1, 32, 32, requires_grad=True)
    w = (torch.randn(16, 1, 7, 7) * 0.1).requires_grad_()

    def step():
        x.grad = w.grad = None
        DF.conv_ista(x, w, 0.05, n_iter=4, step=0.1, padding=3, backend="cpp", recompute=True).sum().backward()

    threads = torch.get_num_threads()
    peaks, grads = [], []
    try:
        for n in (1, 4):
            torch.set_num_threads(n)
            step()
            peaks.append(measure_memory(step, "cpu").peak_bytes)
            grads.append(w.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert peaks[1] == peaks[0]
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
