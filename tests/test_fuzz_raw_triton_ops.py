"""Hostile inputs to the raw Triton ops (torch.ops.dsc_kernels.*_triton), called directly, past
dsc_kernels.functional's validation: "no input may crash the process or return a silently wrong answer".

The kernels index every tensor through sizes taken from the others, so on a GPU an inconsistent shape, dtype or
stride is an illegal memory access (which kills the CUDA context) or a silently wrong result. Under Triton's
interpreter (CPU tensors, TRITON_INTERPRET=1) the same launch reads garbage or raises an IndexError. Each call here
either raises the launcher's own check, an error naming the op (so not an accident of some later torch op), or, for
legitimate but unusual inputs (strides, expanded or channels-last tensors), gives the answer of the same call on
contiguous inputs bit for bit. Sizes past the kernels' int32 offsets are checked on meta tensors, with the launches
recorded instead of run (triton/launch.py), so nothing of that size is allocated.

Interpreter only (TRITON_INTERPRET=1 pytest -m interpreter tests/test_fuzz_raw_triton_ops.py): the checks run before
any launch, so a GPU would exercise the same code.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from helpers import raw_conv_ista_args, strided_view, with_changes

ERRORS = (RuntimeError, ValueError, TypeError)
F32 = torch.float32
HUGE = 2**62
CONV_FWD, CONV_BWD = "conv_ista_fwd_triton", "conv_ista_bwd_triton"
ATT_FWD, ATT_BWD = "sparse_attention_fwd_triton", "sparse_attention_bwd_triton"


@pytest.fixture(scope="module")
def ops():
    """The registered Triton op pairs, imported only in the interpreter process (Triton reads TRITON_INTERPRET
    when first imported)."""
    from dsc_kernels.ops import op_pair

    conv, att = op_pair("conv_ista", "triton"), op_pair("sparse_attention", "triton")
    return {CONV_FWD: conv.forward, CONV_BWD: conv.backward, ATT_FWD: att.forward, ATT_BWD: att.backward}


def _expanded(t, dim=0):
    """t's first slice along dim, expanded (stride 0) to t's size there."""
    return t.narrow(dim, 0, 1).expand(t.shape)


# -------------------------------------------------------------------------------------------------------- conv_ista
def conv_args(**kw):
    return raw_conv_ista_args(**{"z0": True, "dtype": F32, **kw})


def conv_bwd_args(ops, **kw):
    args = conv_args(**kw)
    z, saved = ops[CONV_FWD](**args)
    grad_z = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=z.dtype)
    return dict(grad_z=grad_z, **args, z=z, saved=saved)


a = conv_args
CONV_FWD_RAISES = {
    "weight-channels": with_changes(a(), weight=torch.randn(3, 1, 3, 3), encoder_weight=torch.randn(3, 1, 3, 3)),
    "encoder-fewer-codes": with_changes(a(), encoder_weight=torch.randn(2, 2, 3, 3)),
    "encoder-more-codes": with_changes(a(), encoder_weight=torch.randn(4, 2, 3, 3)),
    "lam-rows": with_changes(a(), lam=torch.ones(2, 3)),
    "lam-cols": with_changes(a(), lam=torch.ones(3, 2)),
    "lam-1d": with_changes(a(), lam=torch.ones(3)),
    "step-2d": with_changes(a(), step=torch.ones(3, 1)),
    "step-0d": with_changes(a(), step=torch.tensor(0.4)),
    "step-empty": a(n=0),
    "z0-shape": with_changes(a(), z0=torch.randn(2, 3, 6, 4)),
    "z0-flat": with_changes(a(), z0=torch.randn(2 * 3 * 6 * 5)),
    "stride-one-entry": with_changes(a(), stride=[1]),
    "stride-zero": with_changes(a(), stride=[0, 1]),
    "stride-negative": with_changes(a(), stride=[1, -2]),
    "padding-negative": with_changes(a(), padding=[-1, 1]),
    "padding-huge": with_changes(a(z0=False), padding=[HUGE, HUGE]),
    "kernel-too-large": a(K=(9, 3), padding=(0, 0), z0=False),
    "kernel-zero": a(K=(0, 3), z0=False),
    "dtype-float64": a(dtype=torch.float64),
    "dtype-int": {k: v.long() if isinstance(v, torch.Tensor) else v for k, v in a().items()},
    "dtype-mixed-lam": with_changes(a(), lam=a()["lam"].double()),
    "dtype-mixed-z0": with_changes(a(), z0=a()["z0"].double()),
    "dtype-mixed-weight": with_changes(a(), weight=a()["weight"].half()),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("case", sorted(CONV_FWD_RAISES))
def test_conv_fwd_refuses(ops, case):
    with pytest.raises(ERRORS, match=CONV_FWD):
        ops[CONV_FWD](**CONV_FWD_RAISES[case])


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["x", "weight", "encoder_weight", "lam", "step"])
@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_conv_fwd_noncontiguous_matches_contiguous(ops, name, layout):
    base = a()
    hostile = with_changes(base, **{name: (strided_view if layout == "strided" else _expanded)(base[name])})
    plain = with_changes(hostile, **{name: hostile[name].contiguous()})
    for got, want in zip(ops[CONV_FWD](**hostile), ops[CONV_FWD](**plain)):
        assert torch.equal(got, want)


@pytest.mark.interpreter
def test_conv_fwd_huge_stride_is_the_single_window(ops):
    # Every stride past the last window start is the same operator (one window); the C++ ops clamp it alike. A
    # stride left unclamped sized the residual slabs by it.
    for got, want in zip(ops[CONV_FWD](**a(stride=(HUGE, HUGE))), ops[CONV_FWD](**a(stride=(6, 5)))):
        assert torch.equal(got, want)


CONV_BWD_RAISES = {
    "grad_z-batch-1": lambda b: with_changes(b, grad_z=b["grad_z"][:1]),  # broadcast silently by torch.where
    "grad_z-flat": lambda b: with_changes(b, grad_z=b["grad_z"].reshape(-1)),
    "grad_z-dtype": lambda b: with_changes(b, grad_z=b["grad_z"].double()),
    "z-batch-1": lambda b: with_changes(b, z=b["z"][:1]),
    "z-empty-in-save-mode": lambda b: with_changes(b, z=torch.empty(0)),
    "z-wrong-in-recompute-mode": lambda b: with_changes(b, checkpoint=0, saved=torch.empty(0), z=b["z"][:1]),
    "saved-short": lambda b: with_changes(b, saved=b["saved"][:1]),
    "saved-wrong-batch": lambda b: with_changes(b, saved=torch.randn(2, 1, 3, 6, 5)),
    "saved-flat": lambda b: with_changes(b, saved=b["saved"].reshape(-1)),
    "saved-float64": lambda b: with_changes(b, saved=b["saved"].double()),
    "lam-rows": lambda b: with_changes(b, lam=torch.ones(2, 3)),
    "encoder-fewer-codes": lambda b: with_changes(b, encoder_weight=torch.randn(2, 2, 3, 3)),
    "z0-shape": lambda b: with_changes(b, z0=torch.randn(2, 3, 6, 4)),
    "stride-zero": lambda b: with_changes(b, stride=[0, 1]),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("case", sorted(CONV_BWD_RAISES))
def test_conv_bwd_refuses(ops, case):
    args = CONV_BWD_RAISES[case](conv_bwd_args(ops))
    with pytest.raises(ERRORS, match=CONV_BWD):
        ops[CONV_BWD](**args)


@pytest.mark.interpreter
@pytest.mark.parametrize("checkpoint", [2, -1, -2])
def test_conv_checkpoint_outside_the_contract_is_refused(ops, checkpoint):
    # The backward reads every iterate (1) or replays from z0 (0); the forward also takes NO_BACKWARD (-1). Any
    # other value, let through, reached the backward's loop without saved iterates (an AttributeError on None).
    args = conv_bwd_args(ops)
    with pytest.raises(ValueError, match="checkpoint must be"):
        ops[CONV_BWD](**with_changes(args, checkpoint=checkpoint))
    if checkpoint != -1:
        fwd_args = {k: v for k, v in args.items() if k not in ("grad_z", "z", "saved")}
        with pytest.raises(ValueError, match="checkpoint must be"):
            ops[CONV_FWD](**with_changes(fwd_args, checkpoint=checkpoint))


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["x", "weight", "encoder_weight", "step", "z0", "saved", "channels-last"])
def test_conv_bwd_noncontiguous_matches_contiguous(ops, name):
    plain = conv_bwd_args(ops)
    if name == "channels-last":
        hostile = with_changes(
            plain,
            z=plain["z"].to(memory_format=torch.channels_last),
            grad_z=plain["grad_z"].to(memory_format=torch.channels_last),
        )
    else:
        hostile = with_changes(plain, **{name: strided_view(plain[name])})
    for got, want in zip(ops[CONV_BWD](**hostile), ops[CONV_BWD](**plain)):
        assert torch.equal(got, want)


def _meta_conv(x_shape, w_shape, n=2, stride=(1, 1), padding=(1, 1)):
    from dsc_kernels.reference.conv import code_size

    def meta(*shape):
        return torch.empty(shape, device="meta", dtype=F32)

    zs = code_size(x_shape[2:], w_shape[2:], stride, padding)
    return dict(
        x=meta(*x_shape),
        weight=meta(*w_shape),
        encoder_weight=meta(*w_shape),
        lam=meta(n, w_shape[0]),
        step=meta(n),
        z0=meta(x_shape[0], w_shape[0], *zs),
        stride=list(stride),
        padding=list(padding),
        nonneg=False,
        fista=False,
        checkpoint=0,
    )


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "case",
    [
        # a weight of 2**31 elements: (c * C_sig + ci) * kh * kw wraps around in int32
        dict(x_shape=(1, 2**16, 3, 3), w_shape=(2**15, 2**16, 1, 1), padding=(0, 0)),
        # residual slabs of (TH - 1) * 1000 + 3 by (TW - 1) * 1000 + 3 per signal channel: int32 slab offsets wrap
        # although x and the codes are small
        dict(x_shape=(1, 24, 3001, 3001), w_shape=(2, 24, 3, 3), stride=(1000, 1000), padding=(0, 0)),
    ],
    ids=["weight-2**31", "slabs-2**31"],
)
def test_conv_fwd_refuses_int32_overflow(case, ops):
    from dsc_kernels.triton.conv_ista import conv_ista_fwd
    from dsc_kernels.triton.launch import record_launches

    args = _meta_conv(**case)
    with pytest.raises(ERRORS, match="2\\*\\*31"):
        record_launches(lambda: conv_ista_fwd(**args))


# ------------------------------------------------------------------------------------------------ sparse attention
def att_args(B=2, H=2, N=5, M=6, d=4, dv=3, dtype=F32, bias=False, mode="sparsemax", **kw):
    g = torch.Generator().manual_seed(0)
    args = dict(
        q=torch.randn(B, H, N, d, generator=g, dtype=dtype),
        k=torch.randn(B, H, M, d, generator=g, dtype=dtype),
        v=torch.randn(B, H, M, dv, generator=g, dtype=dtype),
        threshold=torch.rand(H, generator=g),
        bias=torch.randn(B, H, N, M, generator=g) if bias else None,
        mode=mode,
        causal=False,
        scale=0.5,
    )
    args.update(kw)
    return args


s = att_args
ATT_RAISES = {
    "k-head-dim": with_changes(s(), k=torch.randn(2, 2, 6, 3)),
    "k-batch": with_changes(s(), k=torch.randn(1, 2, 6, 4)),
    "k-heads": with_changes(s(), k=torch.randn(2, 1, 6, 4)),
    "k-3d": with_changes(s(), k=torch.randn(2, 6, 4)),
    "v-keys": with_changes(s(), v=torch.randn(2, 2, 4, 3)),
    "v-batch": with_changes(s(), v=torch.randn(1, 2, 6, 3)),
    "threshold-short": with_changes(s(mode="shrink"), threshold=torch.rand(1)),
    "threshold-2d": with_changes(s(mode="shrink"), threshold=torch.rand(2, 1)),
    "bias-keys": with_changes(s(), bias=torch.randn(2, 2, 5, 2)),
    "bias-not-expanded": with_changes(s(), bias=torch.randn(2, 1, 1, 6)),
    "bias-3d": with_changes(s(), bias=torch.randn(2, 5, 6)),
    "mode-typo": s(mode="sparsmax"),
    "mode-softmax": s(mode="softmax"),
    "scale-nan": s(scale=math.nan),
    "dtype-mixed-k": with_changes(s(), k=s()["k"].half()),
    "dtype-mixed-v": with_changes(s(), v=s()["v"].bfloat16()),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("case", sorted(ATT_RAISES))
def test_attention_fwd_refuses(ops, case):
    with pytest.raises(ERRORS, match=ATT_FWD):
        ops[ATT_FWD](**ATT_RAISES[case])


def _att_bwd_args(ops, **kw):
    args = att_args(**kw)
    out, stats = ops[ATT_FWD](**args)
    return dict(grad_out=torch.randn(out.shape, generator=torch.Generator().manual_seed(1)), **args, stats=stats)


ATT_BWD_CASES = {
    "grad_out-rows": lambda b: with_changes(b, grad_out=torch.randn(2, 2, 4, 3)),
    "grad_out-value-dim": lambda b: with_changes(b, grad_out=torch.randn(2, 2, 5, 2)),
    "grad_out-flat": lambda b: with_changes(b, grad_out=b["grad_out"].reshape(-1)),
    "grad_out-batch-1": lambda b: with_changes(b, grad_out=b["grad_out"][:1]),
    "stats-rows": lambda b: with_changes(b, stats=b["stats"][:, :, :3]),
    "stats-flat": lambda b: with_changes(b, stats=b["stats"].reshape(-1)),
    "stats-3-columns": lambda b: with_changes(b, stats=torch.zeros(2, 2, 5, 3)),
    "k-head-dim": lambda b: with_changes(b, k=torch.randn(2, 2, 6, 3)),
    "v-keys": lambda b: with_changes(b, v=torch.randn(2, 2, 4, 3)),
    "mode-typo": lambda b: with_changes(b, mode="sparsmax"),
    "scale-nan": lambda b: with_changes(b, scale=math.nan),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("case", sorted(ATT_BWD_CASES))
def test_attention_bwd_refuses(ops, case):
    args = ATT_BWD_CASES[case](_att_bwd_args(ops))
    with pytest.raises(ERRORS, match=ATT_BWD):
        ops[ATT_BWD](**args)


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["q", "k", "v", "bias"])
@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
def test_attention_noncontiguous_matches_contiguous(ops, name, mode):
    # Every stride doubled, the last one included: the kernels read rows with a unit last stride, so the
    # launchers must copy such an input; read in place, it gives other numbers with no error.
    plain = _att_bwd_args(ops, bias=True, mode=mode)
    hostile = with_changes(plain, **{name: strided_view(plain[name])})
    fwd = {k: v for k, v in plain.items() if k not in ("grad_out", "stats")}
    for got, want in zip(ops[ATT_FWD](**with_changes(fwd, **{name: hostile[name]})), ops[ATT_FWD](**fwd)):
        assert torch.equal(got, want)
    for got, want in zip(ops[ATT_BWD](**hostile), ops[ATT_BWD](**plain)):
        assert torch.equal(got, want)


def _assert_int32_overflow_refused(q, k, v, bias, backward: bool) -> None:
    """The sparsemax forward (or backward) launch on these meta tensors raises the 2**31 error before any kernel."""
    from dsc_kernels.triton.launch import record_launches
    from dsc_kernels.triton.sparse_attention import sparse_attention_bwd, sparse_attention_fwd

    th = torch.empty(1, device="meta", dtype=F32)
    if backward:
        b, h, n, _ = q.shape
        out = torch.empty((b, h, n, v.shape[3]), device="meta", dtype=F32)
        stats = torch.empty((b, h, n, 2), device="meta", dtype=F32)

        def run():
            sparse_attention_bwd(out, q, k, v, th, bias, stats, "sparsemax", False, 0.25)
    else:

        def run():
            sparse_attention_fwd(q, k, v, th, bias, "sparsemax", False, 0.25)

    with pytest.raises(ERRORS, match="2\\*\\*31"):
        record_launches(run)


@pytest.mark.interpreter
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_attention_refuses_a_slice_reaching_2_31_through_its_head_dim(ops, backward):
    # q's last row starts below 2**31 but its last element lies beyond: the extent counts the head dim too.
    q = torch.empty((1, 1, 2, 16), device="meta", dtype=F32).as_strided((1, 1, 2, 16), (2**31, 2**31, 2**31 - 8, 1))
    k, v = (torch.empty((1, 1, 16, 16), device="meta", dtype=F32) for _ in range(2))
    _assert_int32_overflow_refused(q, k, v, None, backward)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "shapes",
    [
        # one (batch, head) slice of q with 2**31 elements: row index times row stride wraps around in int32
        dict(q=(1, 1, 2**22, 2**9), k=(1, 1, 16, 2**9), v=(1, 1, 16, 16)),
        # a contiguous (B, H, N, M) bias of 2**32 elements per head
        dict(q=(1, 1, 2**16, 16), k=(1, 1, 2**16, 16), v=(1, 1, 2**16, 16), bias=(1, 1, 2**16, 2**16)),
        # q, k and v small per slice, but the output (and grad_out) slice N x dv holds 2**31 elements
        dict(q=(1, 1, 2**23, 16), k=(1, 1, 16, 16), v=(1, 1, 16, 2**8)),
    ],
    ids=["q-slice-2**31", "bias-slice-2**32", "out-slice-2**31"],
)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_attention_refuses_int32_overflow(ops, shapes, backward):
    def meta(*shape):
        return torch.empty(shape, device="meta", dtype=F32)

    q, k, v = meta(*shapes["q"]), meta(*shapes["k"]), meta(*shapes["v"])
    _assert_int32_overflow_refused(q, k, v, meta(*shapes["bias"]) if "bias" in shapes else None, backward)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "bias, advice",
    [
        # contiguous, 2**32 elements per head: a copy is just as large, so "pass it contiguous" would mislead
        ((1, 1, 2**16, 2**16), "backend='reference'"),
        # a row stride past the row's length: the contiguous copy (2**18 elements per head) fits
        ((1, 1, 2**9, 2**9), "pass it contiguous"),
    ],
    ids=["contiguous-2**32", "strided-fits-when-copied"],
)
def test_attention_extent_error_gives_advice_that_fits(ops, bias, advice):
    from dsc_kernels.triton.launch import record_launches
    from dsc_kernels.triton.sparse_attention import sparse_attention_fwd

    b, h, n, m = bias
    q, k, v = (torch.empty((b, h, rows, 16), device="meta", dtype=F32) for rows in (n, m, m))
    t = torch.empty(bias, device="meta", dtype=F32)
    if n * m < 2**31:
        t = t.as_strided(bias, (2**32, 2**32, 2**23, 1))
    th = torch.empty(h, device="meta", dtype=F32)
    with pytest.raises(RuntimeError, match="2\\*\\*31") as err:
        record_launches(lambda: sparse_attention_fwd(q, k, v, th, t, "sparsemax", False, 0.25))
    assert advice in str(err.value)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1",
    reason="launches are recorded from compiled kernels, not interpreted ones",
)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_attention_grids_hold_more_than_65535_batch_heads(backward):
    """CUDA caps a grid's second axis at 65535; B * H sat there (B = 2048, H = 32 failed every launch). The kernels
    take (row block, batch x head) from one axis, whose cap is 2**31 - 1. Launches recorded on meta tensors, nothing
    runs (so not under the interpreter, whose kernels cannot be recorded)."""
    from dsc_kernels.triton.launch import record_launches
    from dsc_kernels.triton.sparse_attention import sparse_attention_bwd, sparse_attention_fwd

    b, h, n, m, d = 2048, 32, 40, 24, 16

    def meta(*shape):
        return torch.empty(shape, device="meta", dtype=F32)

    q, k, v, th = meta(b, h, n, d), meta(b, h, m, d), meta(b, h, m, d), meta(h)
    if backward:
        run = lambda: sparse_attention_bwd(meta(b, h, n, d), q, k, v, th, None, meta(b, h, n, 2), "shrink", False, 0.25)  # noqa: E731
    else:
        run = lambda: sparse_attention_fwd(q, k, v, th, None, "shrink", False, 0.25)  # noqa: E731
    specs = record_launches(run)
    assert specs and all(len(s.grid) == 1 and b * h <= s.grid[0] < 2**31 for s in specs)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1",
    reason="launches are recorded from compiled kernels, not interpreted ones",
)
def test_conv_backward_grids_hold_more_than_65535_items():
    """The batch sat on CUDA's second grid axis (capped at 65535) in the backward's synthesis and analysis launches;
    they take (position block, item) from the first axis now. Recorded on meta tensors, nothing runs."""
    from dsc_kernels.triton.conv_ista import conv_ista_bwd
    from dsc_kernels.triton.launch import record_launches

    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in conv_args(B=70000, n=2).items()}
    meta["checkpoint"] = 0  # recompute mode: no saved iterates
    z = torch.empty(meta["z0"].shape, device="meta", dtype=F32)
    specs = record_launches(lambda: conv_ista_bwd(z, **{**meta, "z": z.new_empty(0), "saved": z.new_empty(0)}))
    grids = {s.name: s.grid for s in specs}
    for name in ("_conv_synth_kernel", "_conv_analysis_kernel"):
        assert len(grids[name]) == 2 and grids[name][0] >= 70000 and grids[name][1] <= 65535, (name, grids[name])
