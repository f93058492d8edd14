"""Hostile inputs to the raw C++ ops (torch.ops.dsc_kernels.*_cpp), called directly, past dsc_kernels.functional's
validation: "no input may crash the process". Each call either raises a Python exception (a TORCH_CHECK's
RuntimeError), or, for inputs that are legitimate but unusual (strides, expanded or channels-last tensors, zero-size
dimensions, non-finite values), gives the answer of the same call on contiguous inputs or of the reference op.

`make sanitize SAN_TESTS=tests/test_fuzz_raw_ops.py` runs these under ASan + UBSan, where a read out of bounds is a
report rather than a silently wrong number.
"""

from __future__ import annotations

import pytest
import torch
from helpers import flat_tensors, raw_conv_ista_args, strided_view, with_changes

from dsc_kernels import _ext
from dsc_kernels.ops import op_pair
from dsc_kernels.reference.attention import sparse_attention_bwd_ref, sparse_attention_fwd_ref
from dsc_kernels.reference.conv_ista import KEEP_RESIDUALS, conv_ista_bwd_ref, conv_ista_fwd_ref, conv_ista_ref
from dsc_kernels.reference.ml_ista import ml_ista_bwd_ref, ml_ista_fwd_ref

ops = _ext.load()
# The fakes of the ops (their Meta kernels): a meta tensor among the arguments dispatches there.
for _family in ("conv_ista", "ml_ista", "sparse_attention"):
    op_pair(_family, "cpp")

ERRORS = (RuntimeError, ValueError, TypeError)
F64 = torch.float64
HUGE = 2**62


def _assert_same(got, want, exact=True, nonfinite=False):
    """nonfinite: the inputs hold NaN or inf, so only where a value is non-finite matters beyond the finite ones
    (NaN or +-inf depends on the order of an inf - inf)."""
    got, want = flat_tensors(got), flat_tensors(want)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        if nonfinite:
            assert torch.equal(torch.isfinite(a), torch.isfinite(b))
            a, b = torch.nan_to_num(a, 0.0, 0.0, 0.0), torch.nan_to_num(b, 0.0, 0.0, 0.0)
        if exact:
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, equal_nan=True)


def _raises(op, **args):
    def check():
        with pytest.raises(ERRORS):
            op(**args)

    return check


def _meta_or_raises(op, **args):
    """A meta tensor among the arguments dispatches to the op's fake (Python, ops/*.py), and no C++ kernel runs. With
    every tensor on meta the fake answers with meta tensors of the result's shapes; mixed with tensors of a real
    device it raises (it answered with uninitialised tensors on the real device)."""

    def check():
        tensors = [t for v in args.values() for t in (v if isinstance(v, list) else [v]) if isinstance(t, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        if devices == {"meta"}:
            assert all(t.device.type == "meta" for t in flat_tensors(op(**args)))
        else:
            with pytest.raises(RuntimeError, match="expected every tensor on one device"):
                op(**args)

    return check


def _same(op, hostile, plain, exact=True):
    """The call on `hostile` (strided, expanded, ... views) equals the call on `plain` (their contiguous copies)."""

    def check():
        _assert_same(op(**hostile), op(**plain), exact)

    return check


def _like_ref(op, ref, args, exact=False, nonfinite=False):
    def check():
        _assert_same(op(**args), ref(**args), exact, nonfinite)

    return check


def _shapes_like(op, args, shapes_of):
    """Inputs without a reference answer (arbitrary saved statistics): outputs shaped like the named inputs."""

    def check():
        out = flat_tensors(op(**args))
        assert [t.shape for t in out] == [args[name].shape for name in shapes_of]

    return check


def _expanded(t, dim=0):
    """t (size 1 along dim) as an expanded view of size 3 there (stride 0)."""
    shape = list(t.shape)
    shape[dim] = 3
    return t.narrow(dim, 0, 1).expand(shape)


def _contig(args):
    return {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


# -------------------------------------------------------------------------------------------------------- conv_ista
def conv_args(**kw):
    return raw_conv_ista_args(**kw)


def conv_bwd_args(**kw):
    args = conv_args(**kw)
    z, saved = ops.conv_ista_fwd_cpp(**args)
    g = torch.Generator().manual_seed(1)
    grad_z = torch.randn(z.shape, generator=g, dtype=z.dtype)
    return dict(grad_z=grad_z, **args, z=z, saved=saved)


CONV_FWD = ops.conv_ista_fwd_cpp
CONV_BWD = ops.conv_ista_bwd_cpp


def _conv_fwd_cases():
    a = conv_args
    m = torch.device("meta")
    yield "x-3d", _raises(CONV_FWD, **with_changes(a(), x=torch.randn(2, 2, 6, dtype=F64)))
    yield "x-5d", _raises(CONV_FWD, **with_changes(a(), x=torch.randn(2, 2, 6, 5, 1, dtype=F64)))
    yield "x-0d", _raises(CONV_FWD, **with_changes(a(), x=torch.tensor(1.0, dtype=F64)))
    yield "weight-3d", _raises(CONV_FWD, **with_changes(a(), weight=torch.randn(3, 2, 3, dtype=F64)))
    yield "weight-0d", _raises(CONV_FWD, **with_changes(a(), weight=torch.tensor(1.0, dtype=F64)))
    yield "weight-channels", _raises(CONV_FWD, **a(Cs=3, **{"x": torch.randn(2, 2, 6, 5, dtype=F64)}))
    yield "encoder-shape", _raises(CONV_FWD, **with_changes(a(), encoder_weight=torch.randn(3, 2, 2, 3, dtype=F64)))
    # An empty (0,) encoder is the tied dictionary (test_cpp_conv_ista.py); an empty one of another shape is not.
    yield "encoder-empty-4d", _raises(CONV_FWD, **with_changes(a(), encoder_weight=torch.empty(0, 2, 2, 3, dtype=F64)))
    yield "lam-1d", _raises(CONV_FWD, **with_changes(a(), lam=torch.ones(3, dtype=F64)))
    yield "lam-rows", _raises(CONV_FWD, **with_changes(a(), lam=torch.ones(2, 3, dtype=F64)))
    yield "lam-cols", _raises(CONV_FWD, **with_changes(a(), lam=torch.ones(3, 2, dtype=F64)))
    yield "step-2d", _raises(CONV_FWD, **with_changes(a(), step=torch.ones(3, 1, dtype=F64)))
    yield "step-empty", _raises(CONV_FWD, **a(n=0))
    yield "step-0d", _raises(CONV_FWD, **with_changes(a(), step=torch.tensor(0.4, dtype=F64)))
    yield "z0-shape", _raises(CONV_FWD, **with_changes(a(), z0=torch.randn(2, 3, 6, 4, dtype=F64)))
    yield "z0-flat", _raises(CONV_FWD, **with_changes(a(), z0=torch.randn(2 * 3 * 6 * 5, dtype=F64)))
    yield "stride-one-entry", _raises(CONV_FWD, **with_changes(a(), stride=[1]))
    yield "stride-empty-list", _raises(CONV_FWD, **with_changes(a(), stride=[]))
    yield "padding-empty-list", _raises(CONV_FWD, **with_changes(a(), padding=[]))
    yield "stride-zero", _raises(CONV_FWD, **with_changes(a(), stride=[0, 1]))
    yield "stride-negative", _raises(CONV_FWD, **with_changes(a(), stride=[1, -2]))
    yield "stride-int64-min", _raises(CONV_FWD, **with_changes(a(), stride=[-(2**63), 1]))
    yield "padding-negative", _raises(CONV_FWD, **with_changes(a(), padding=[-1, 1]))
    yield "padding-huge", _raises(CONV_FWD, **with_changes(a(), padding=[HUGE, HUGE]))
    yield "padding-int64-max", _raises(CONV_FWD, **with_changes(a(), padding=[2**63 - 1, 0]))
    yield "kernel-too-large", _raises(CONV_FWD, **a(K=(9, 3), padding=(0, 0)))
    yield "kernel-zero", _raises(CONV_FWD, **a(K=(0, 3)))
    yield "checkpoint-minus-2", _raises(CONV_FWD, **a(checkpoint=-2))
    yield "checkpoint-int64-min", _raises(CONV_FWD, **a(checkpoint=-(2**63)))
    yield "checkpoint-residuals-alone", _raises(CONV_FWD, **a(checkpoint=KEEP_RESIDUALS))
    yield "dtype-int", _raises(CONV_FWD, **{k: v.long() if isinstance(v, torch.Tensor) else v for k, v in a().items()})
    yield "dtype-half", _raises(CONV_FWD, **a(dtype=torch.float16))
    yield "dtype-bfloat16", _raises(CONV_FWD, **a(dtype=torch.bfloat16))
    yield "dtype-complex", _raises(CONV_FWD, **a(dtype=torch.complex64))
    yield "dtype-mixed-lam", _raises(CONV_FWD, **with_changes(a(), lam=a()["lam"].float()))
    yield "dtype-mixed-weight", _raises(CONV_FWD, **with_changes(a(), weight=a()["weight"].float()))
    yield "dtype-mixed-z0", _raises(CONV_FWD, **with_changes(a(z0=True), z0=a(z0=True)["z0"].float()))
    yield "dtype-int-step", _raises(CONV_FWD, **with_changes(a(), step=torch.ones(3, dtype=torch.int64)))
    yield "meta-x", _meta_or_raises(CONV_FWD, **with_changes(a(), x=a()["x"].to(m)))
    yield "meta-lam", _meta_or_raises(CONV_FWD, **with_changes(a(), lam=a()["lam"].to(m)))
    yield (
        "meta-all",
        _meta_or_raises(CONV_FWD, **{k: v.to(m) if isinstance(v, torch.Tensor) else v for k, v in a().items()}),
    )
    # legitimate but unusual: the contiguous call's answer
    base = a(z0=True)
    for name in ("x", "weight", "encoder_weight", "lam", "z0"):
        yield f"strided-{name}", _same(CONV_FWD, with_changes(base, **{name: strided_view(base[name])}), base)
    yield (
        "channels-last-x",
        _same(CONV_FWD, with_changes(base, x=base["x"].to(memory_format=torch.channels_last)), base),
    )
    yield (
        "channels-last-weights",
        _same(
            CONV_FWD,
            with_changes(
                base,
                weight=base["weight"].to(memory_format=torch.channels_last),
                encoder_weight=base["encoder_weight"].to(memory_format=torch.channels_last),
            ),
            base,
        ),
    )
    yield (
        "transposed-x",
        _same(CONV_FWD, with_changes(base, x=base["x"].transpose(2, 3).contiguous().transpose(2, 3)), base),
    )
    ex = {
        "x": _expanded(base["x"]),
        "z0": _expanded(base["z0"]),
        "step": _expanded(base["step"]),
        "lam": _expanded(base["lam"]),
    }
    for name, t in ex.items():
        hostile = with_changes(base, **{name: t})
        if name == "x":
            hostile["z0"] = _expanded(base["z0"])
        if name == "z0":
            hostile["x"] = _expanded(base["x"])
        if name in ("x", "z0"):
            hostile = with_changes(
                hostile, x=hostile["x"].expand(3, -1, -1, -1), z0=hostile["z0"].expand(3, -1, -1, -1)
            )
        yield f"expanded-{name}", _same(CONV_FWD, hostile, _contig(hostile))
    yield "stride-huge", _same(CONV_FWD, a(stride=(HUGE, HUGE)), a(stride=(6, 5)))
    yield "checkpoint-huge", _same(CONV_FWD, a(checkpoint=2**62), a(checkpoint=2**62 + 7))
    # zero-size dimensions in every position: the reference's answer
    for name, kw in {
        "batch-0": dict(B=0),
        "signal-channels-0": dict(Cs=0),
        "code-channels-0": dict(Cc=0),
        "height-0": dict(H=0, padding=(2, 1)),
        "width-0": dict(W=0, padding=(1, 2)),
        "all-0": dict(B=0, Cs=0, Cc=0, H=0, W=0, padding=(2, 2)),
    }.items():
        for ck in (-1, 0, 1, 2 | KEEP_RESIDUALS):
            yield f"{name}-ck{ck}", _like_ref(CONV_FWD, conv_ista_fwd_ref, a(**kw, checkpoint=ck))
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        for arg in ("x", "weight", "encoder_weight", "z0", "lam", "step"):
            args = a(z0=True)
            t = args[arg].clone()
            t.view(-1)[1] = value
            if arg in ("lam", "step"):  # a NaN threshold had given finite codes where the reference's are NaN
                yield f"{name}-{arg}", _raises(CONV_FWD, **with_changes(args, **{arg: t}))
                yield f"bwd-{name}-{arg}", _raises(CONV_BWD, **with_changes(conv_bwd_args(z0=True), **{arg: t}))
            else:
                yield (
                    f"{name}-{arg}",
                    _like_ref(CONV_FWD, conv_ista_fwd_ref, with_changes(args, **{arg: t}), nonfinite=True),
                )


def _like_autograd(args):
    """The backward op against autograd through the unrolled reference (conv_ista_bwd_ref does not take every
    zero-size problem)."""

    def check():
        got = CONV_BWD(**args)
        names = ("x", "weight", "encoder_weight", "lam", "step", "z0")
        leaves = {n: args[n].detach().clone().requires_grad_() for n in names}
        z = conv_ista_ref(
            leaves["x"],
            leaves["weight"],
            leaves["lam"],
            leaves["step"],
            encoder_weight=leaves["encoder_weight"],
            stride=args["stride"],
            padding=args["padding"],
            z0=leaves["z0"] if args["z0"].numel() else None,
            nonneg=args["nonneg"],
            fista=args["fista"],
        )
        grads = torch.autograd.grad(z, list(leaves.values()), args["grad_z"], allow_unused=True)
        want = [torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads)]
        _assert_same(got, want, exact=False)

    return check


def _conv_bwd_cases():
    b = conv_bwd_args
    base = b()
    m = torch.device("meta")
    f64 = dict(dtype=F64)
    yield "grad-z-3d", _raises(CONV_BWD, **with_changes(base, grad_z=base["grad_z"][0]))
    yield "grad-z-shape", _raises(CONV_BWD, **with_changes(base, grad_z=base["grad_z"][:, :, :3]))
    yield "grad-z-dtype", _raises(CONV_BWD, **with_changes(base, grad_z=base["grad_z"].float()))
    yield "grad-z-int", _raises(CONV_BWD, **with_changes(base, grad_z=base["grad_z"].long()))
    yield "z-shape", _raises(CONV_BWD, **with_changes(base, z=base["z"][:1]))
    yield "z-dtype", _raises(CONV_BWD, **with_changes(base, z=base["z"].float()))
    yield "z-missing", _raises(CONV_BWD, **with_changes(base, z=torch.empty(0, **f64)))
    yield "saved-short", _raises(CONV_BWD, **with_changes(base, saved=base["saved"][:1]))
    yield "saved-empty", _raises(CONV_BWD, **with_changes(base, saved=torch.empty(0, **f64)))
    # saved with the right number of elements but not x's dtype: was read as x's dtype (float32: out of bounds)
    yield "saved-float32", _raises(CONV_BWD, **with_changes(base, saved=base["saved"].float()))
    yield "saved-int64", _raises(CONV_BWD, **with_changes(base, saved=base["saved"].long()))
    yield "saved-meta", _meta_or_raises(CONV_BWD, **with_changes(base, saved=base["saved"].to(m)))
    b32 = b(dtype=torch.float32)
    yield "saved-float64-for-float32", _raises(CONV_BWD, **with_changes(b32, saved=b32["saved"].double()))
    yield "z-float64-for-float32", _raises(CONV_BWD, **with_changes(b32, z=b32["z"].double()))
    yield "checkpoint-negative", _raises(CONV_BWD, **with_changes(base, checkpoint=-1))
    yield "checkpoint-other", _raises(CONV_BWD, **with_changes(base, checkpoint=3))
    yield "checkpoint-residuals", _raises(CONV_BWD, **with_changes(base, checkpoint=1 | KEEP_RESIDUALS))
    yield "x-shape", _raises(CONV_BWD, **with_changes(base, x=base["x"][:, :, :5]))
    yield "lam-shape", _raises(CONV_BWD, **with_changes(base, lam=base["lam"][:2]))
    yield "z0-shape", _raises(CONV_BWD, **with_changes(base, z0=torch.randn(2, 3, 6, 4, **f64)))
    yield "stride-empty-list", _raises(CONV_BWD, **with_changes(base, stride=[]))
    yield "padding-negative", _raises(CONV_BWD, **with_changes(base, padding=[0, -1]))
    yield "meta-grad-z", _meta_or_raises(CONV_BWD, **with_changes(base, grad_z=base["grad_z"].to(m)))
    # legitimate: strided, expanded, channels-last
    bz = b(z0=True)
    for name in ("grad_z", "x", "weight", "encoder_weight", "lam", "z0", "z", "saved"):
        yield f"strided-{name}", _same(CONV_BWD, with_changes(bz, **{name: strided_view(bz[name])}), bz)
    for name in ("grad_z", "x", "z"):
        cl = with_changes(bz, **{name: bz[name].to(memory_format=torch.channels_last)})
        yield f"channels-last-{name}", _same(CONV_BWD, cl, bz)
    scalar = torch.ones((), **f64).expand(bz["grad_z"].shape)
    yield (
        "expanded-grad-z",
        _same(CONV_BWD, with_changes(bz, grad_z=scalar), with_changes(bz, grad_z=scalar.contiguous())),
    )
    saved = bz["saved"][:1].expand(bz["saved"].shape)
    yield "expanded-saved", _same(CONV_BWD, with_changes(bz, saved=saved), with_changes(bz, saved=saved.contiguous()))
    for ck in (0, 2, 3 | KEEP_RESIDUALS):
        args = b(checkpoint=ck, z0=True)
        yield f"ck{ck}", _like_ref(CONV_BWD, conv_ista_bwd_ref, args)
    for name, kw in {
        "batch-0": dict(B=0),
        "signal-channels-0": dict(Cs=0),
        "code-channels-0": dict(Cc=0),
        "height-0": dict(H=0, padding=(2, 1)),
        "width-0": dict(W=0, padding=(1, 2)),
    }.items():
        for ck in (0, 1, 2 | KEEP_RESIDUALS):
            for z0 in (False, True) if name != "batch-0" else (False,):
                yield f"{name}-ck{ck}-z0{int(z0)}", _like_autograd(b(**kw, checkpoint=ck, z0=z0))
    args = b(z0=True)
    g = args["grad_z"].clone()
    g.view(-1)[3] = float("nan")
    yield "nan-grad-z", _like_ref(CONV_BWD, conv_ista_bwd_ref, with_changes(args, grad_z=g))


def _conv_strategy_cases():
    op = ops.conv_ista_strategy_cpp
    x, w = torch.randn(1, 2, 5, 5, dtype=F64), torch.randn(3, 2, 3, 3, dtype=F64)
    yield "strategy-weight-0d", _raises(op, x=x, weight=torch.tensor(1.0, dtype=F64), stride=[1, 1], padding=[0, 0])
    yield "strategy-weight-1d", _raises(op, x=x, weight=torch.ones(3, dtype=F64), stride=[1, 1], padding=[0, 0])
    yield "strategy-x-0d", _raises(op, x=torch.tensor(1.0, dtype=F64), weight=w, stride=[1, 1], padding=[0, 0])
    yield "strategy-stride-zero", _raises(op, x=x, weight=w, stride=[0, 0], padding=[0, 0])
    yield "strategy-padding-huge", _raises(op, x=x, weight=w, stride=[1, 1], padding=[HUGE, HUGE])
    yield "strategy-int", _raises(op, x=x.long(), weight=w.long(), stride=[1, 1], padding=[0, 0])

    def in_range():
        for bw in (False, True):
            assert op(x=x, weight=w, stride=[1, 1], padding=[0, 0], backward=bw) in (0, 1)
        assert op(x=x[:0], weight=w, stride=[1, 1], padding=[0, 0]) == -1

    yield "strategy-ok", in_range


# --------------------------------------------------------------------------------------------------------- ml_ista
def ml_args(
    B=2,
    C=(1, 3, 4),
    H=8,
    W=8,
    K=((3, 3), (3, 3)),
    S=3,
    strides=(1, 1, 2, 2),
    paddings=(0, 0, 0, 0),
    shared=(True, False),
    z0=False,
    dtype=F64,
    encoders=False,
    **kw,
):
    g = torch.Generator().manual_seed(0)
    L = len(C) - 1

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    weights = [0.3 * rnd(1 if shared[j] else S, C[j + 1], C[j], *K[j]) for j in range(L)]
    enc = [0.3 * rnd(*w.shape) if encoders else torch.empty(0, dtype=dtype) for w in weights]
    h, w_ = H, W
    for j in range(L):
        h = (h + 2 * paddings[2 * j] - K[j][0]) // strides[2 * j] + 1
        w_ = (w_ + 2 * paddings[2 * j + 1] - K[j][1]) // strides[2 * j + 1] + 1
    args = dict(
        x=rnd(B, C[0], H, W),
        weights=weights,
        encoder_weights=enc,
        input_encoder_weights=[torch.empty(0, dtype=dtype) for _ in range(L)],
        thresholds=[0.05 * torch.rand(S, C[j + 1], generator=g, dtype=dtype) for j in range(L)],
        steps=[torch.full((S,), 0.4, dtype=dtype) for _ in range(L)],
        z0=rnd(B, C[-1], h, w_) if z0 else torch.empty(0, dtype=dtype),
        strides=list(strides),
        paddings=list(paddings),
        nonneg=False,
        fista=True,
        project=True,
        checkpoint=1,
    )
    args.update(kw)
    return args


def ml_bwd_args(**kw):
    args = ml_args(**kw)
    codes, saved = ops.ml_ista_fwd_cpp(**args)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(c.shape, generator=g, dtype=c.dtype) for c in codes]
    return dict(grad_codes=grads, **args, codes=codes, saved=saved)


ML_FWD = ops.ml_ista_fwd_cpp
ML_BWD = ops.ml_ista_bwd_cpp


def _replace(lst, j, t):
    out = list(lst)
    out[j] = t
    return out


def _ml_common_cases(op, base, prefix):
    """Argument errors both ml_ista ops share."""
    d = F64
    m = torch.device("meta")
    yield f"{prefix}-x-3d", _raises(op, **with_changes(base, x=base["x"][0]))
    yield f"{prefix}-x-0d", _raises(op, **with_changes(base, x=torch.tensor(1.0, dtype=d)))
    yield (
        f"{prefix}-weights-empty-list",
        _raises(
            op, **with_changes(base, weights=[], encoder_weights=[], input_encoder_weights=[], thresholds=[], steps=[])
        ),
    )
    yield f"{prefix}-steps-empty-list", _raises(op, **with_changes(base, steps=[]))
    yield f"{prefix}-thresholds-empty-list", _raises(op, **with_changes(base, thresholds=[]))
    yield f"{prefix}-encoders-short", _raises(op, **with_changes(base, encoder_weights=base["encoder_weights"][:1]))
    yield f"{prefix}-strides-short", _raises(op, **with_changes(base, strides=[1, 1]))
    yield f"{prefix}-paddings-empty", _raises(op, **with_changes(base, paddings=[]))
    yield f"{prefix}-stride-zero", _raises(op, **with_changes(base, strides=[1, 1, 0, 2]))
    yield f"{prefix}-stride-zero-first", _raises(op, **with_changes(base, strides=[0, 0, 2, 2]))
    yield f"{prefix}-stride-negative", _raises(op, **with_changes(base, strides=[1, 1, -1, 2]))
    yield f"{prefix}-stride-int64-min", _raises(op, **with_changes(base, strides=[-(2**63), 1, 2, 2]))
    yield f"{prefix}-padding-negative", _raises(op, **with_changes(base, paddings=[0, -1, 0, 0]))
    yield f"{prefix}-padding-huge", _raises(op, **with_changes(base, paddings=[HUGE, HUGE, 0, 0]))
    yield f"{prefix}-padding-int64-max", _raises(op, **with_changes(base, paddings=[2**63 - 1, 0, 0, 0]))
    yield f"{prefix}-padding-int64-min", _raises(op, **with_changes(base, paddings=[-(2**63), 0, 0, 0]))
    w0 = base["weights"][0]
    yield f"{prefix}-weight-4d", _raises(op, **with_changes(base, weights=_replace(base["weights"], 0, w0[0])))
    yield (
        f"{prefix}-weight-0d",
        _raises(op, **with_changes(base, weights=_replace(base["weights"], 0, torch.tensor(1.0, dtype=d)))),
    )
    yield (
        f"{prefix}-weight-channels",
        _raises(op, **with_changes(base, weights=_replace(base["weights"], 1, torch.randn(1, 4, 2, 3, 3, dtype=d)))),
    )
    yield (
        f"{prefix}-weight-steps",
        _raises(op, **with_changes(base, weights=_replace(base["weights"], 0, torch.randn(2, 3, 1, 3, 3, dtype=d)))),
    )
    yield (
        f"{prefix}-weight-kernel-too-large",
        _raises(op, **with_changes(base, weights=_replace(base["weights"], 0, torch.randn(1, 3, 1, 9, 3, dtype=d)))),
    )
    yield (
        f"{prefix}-weight-kernel-zero",
        _raises(op, **with_changes(base, weights=_replace(base["weights"], 0, torch.randn(1, 3, 1, 0, 3, dtype=d)))),
    )
    yield (
        f"{prefix}-encoder-shape",
        _raises(
            op,
            **with_changes(
                base, encoder_weights=_replace(base["encoder_weights"], 0, torch.randn(1, 3, 1, 2, 3, dtype=d))
            ),
        ),
    )
    yield (
        f"{prefix}-input-encoder-shape",
        _raises(
            op,
            **with_changes(
                base,
                input_encoder_weights=_replace(base["input_encoder_weights"], 1, torch.randn(1, 4, 3, 3, 2, dtype=d)),
            ),
        ),
    )
    yield (
        f"{prefix}-threshold-shape",
        _raises(op, **with_changes(base, thresholds=_replace(base["thresholds"], 0, torch.ones(3, 2, dtype=d)))),
    )
    yield (
        f"{prefix}-threshold-1d",
        _raises(op, **with_changes(base, thresholds=_replace(base["thresholds"], 0, torch.ones(3, dtype=d)))),
    )
    yield (
        f"{prefix}-step-length",
        _raises(op, **with_changes(base, steps=_replace(base["steps"], 1, torch.ones(2, dtype=d)))),
    )
    yield f"{prefix}-step-0d", _raises(op, **with_changes(base, steps=[torch.tensor(0.4, dtype=d)] * 2))
    yield (
        f"{prefix}-threshold-float32",
        _raises(op, **with_changes(base, thresholds=[t.float() for t in base["thresholds"]])),
    )
    yield f"{prefix}-weights-float32", _raises(op, **with_changes(base, weights=[w.float() for w in base["weights"]]))
    yield (
        f"{prefix}-encoder-float32",
        _raises(op, **with_changes(base, encoder_weights=[w.float() for w in base["weights"]])),
    )
    yield f"{prefix}-x-float32", _raises(op, **with_changes(base, x=base["x"].float()))
    yield f"{prefix}-z0-shape", _raises(op, **with_changes(base, z0=torch.randn(2, 4, 3, 2, dtype=d)))
    yield (
        f"{prefix}-z0-interleaved",
        _raises(op, **with_changes(base, z0=torch.randn(2, 4, 2, 2, dtype=d), project=False)),
    )
    yield f"{prefix}-z0-float32", _raises(op, **with_changes(base, z0=torch.randn(2, 4, 2, 2)))
    yield f"{prefix}-meta-x", _meta_or_raises(op, **with_changes(base, x=base["x"].to(m)))
    yield (
        f"{prefix}-meta-threshold",
        _meta_or_raises(
            op, **with_changes(base, thresholds=_replace(base["thresholds"], 0, base["thresholds"][0].to(m)))
        ),
    )


def _cast(args, dtype):
    def c(v):
        if isinstance(v, torch.Tensor):
            return v.to(dtype)
        if isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            return [t.to(dtype) for t in v]
        return v

    return {k: c(v) for k, v in args.items()}


def _ml_fwd_cases():
    a = ml_args
    base = a()
    yield from _ml_common_cases(ML_FWD, base, "fwd")
    for name, dt in (("int", torch.int64), ("half", torch.float16), ("bfloat16", torch.bfloat16)):
        yield f"fwd-dtype-{name}", _raises(ML_FWD, **_cast(base, dt))
        yield f"fwd-dtype-{name}-dense", _raises(ML_FWD, **_cast(a(H=3, W=3, K=((3, 3), (1, 1)), strides=(1,) * 4), dt))
    yield "fwd-dtype-complex", _raises(ML_FWD, **_cast(base, torch.complex128))
    yield "fwd-no-steps", _raises(ML_FWD, **a(S=0))
    yield "fwd-no-steps-no-backward", _raises(ML_FWD, **a(S=0, checkpoint=-1))
    # legitimate but unusual
    bz = a(z0=True, encoders=True, shared=(True, False))
    yield "fwd-strided-x", _same(ML_FWD, with_changes(bz, x=strided_view(bz["x"])), bz)
    yield (
        "fwd-channels-last-x",
        _same(ML_FWD, with_changes(bz, x=bz["x"].to(memory_format=torch.channels_last)), bz, exact=False),
    )
    yield "fwd-strided-z0", _same(ML_FWD, with_changes(bz, z0=strided_view(bz["z0"])), bz)
    for key in ("weights", "encoder_weights", "thresholds", "steps"):
        yield (
            f"fwd-strided-{key}",
            _same(ML_FWD, with_changes(bz, **{key: [strided_view(t) for t in bz[key]]}), bz, exact=False),
        )
    ex = with_changes(
        bz, weights=[_expanded(bz["weights"][0]), bz["weights"][1]], steps=[_expanded(s) for s in bz["steps"]]
    )
    ex["weights"][0] = ex["weights"][0][:3]  # (3, ...) stride 0: one dictionary per step, all equal
    yield (
        "fwd-expanded",
        _same(
            ML_FWD,
            ex,
            {**ex, "weights": [w.contiguous() for w in ex["weights"]], "steps": [s.contiguous() for s in ex["steps"]]},
            exact=False,
        ),
    )
    yield (
        "fwd-expanded-x",
        _same(
            ML_FWD,
            with_changes(a(), x=_expanded(a()["x"])),
            with_changes(a(), x=_expanded(a()["x"]).contiguous()),
            exact=False,
        ),
    )
    for name, kw in {
        "batch-0": dict(B=0),
        "dense-last": dict(H=5, W=5, K=((3, 3), (3, 3)), strides=(1, 1, 1, 1)),
        "padded": dict(paddings=(1, 2, 1, 0)),
        "interleaved": dict(project=False),
        "encoders": dict(encoders=True),
    }.items():
        for ck in (-1, 0, 1, 2):
            yield f"fwd-{name}-ck{ck}", _like_ref(ML_FWD, ml_ista_fwd_ref, a(**kw, checkpoint=ck))
    # every stride past the last window start is one window (ATen takes strides as int: 2^62 had become 0)
    huge = dict(K=((3, 3), (1, 1)))
    yield "fwd-stride-huge", _same(ML_FWD, a(**huge, strides=(HUGE, HUGE, 1, 1)), a(**huge, strides=(6, 6, 1, 1)))
    yield (
        "bwd-stride-huge",
        _same(ML_BWD, ml_bwd_args(**huge, strides=(HUGE, HUGE, 1, 1)), ml_bwd_args(**huge, strides=(6, 6, 1, 1))),
    )
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        args = a(z0=True)
        for arg in ("x", "z0"):
            t = args[arg].clone()
            t.view(-1)[5] = value
            yield (
                f"fwd-{name}-{arg}",
                _like_ref(ML_FWD, ml_ista_fwd_ref, with_changes(args, **{arg: t}), nonfinite=True),
            )
        w = [t.clone() for t in args["weights"]]
        w[1].view(-1)[4] = value
        yield f"fwd-{name}-weight", _like_ref(ML_FWD, ml_ista_fwd_ref, with_changes(args, weights=w), nonfinite=True)
        # a NaN threshold had given finite codes where the reference's are NaN
        th = [t.clone() for t in args["thresholds"]]
        th[1][0, 0] = value
        yield f"fwd-{name}-threshold", _raises(ML_FWD, **with_changes(args, thresholds=th))
        st = [t.clone() for t in args["steps"]]
        st[0][1] = value
        yield f"fwd-{name}-step", _raises(ML_FWD, **with_changes(args, steps=st))
        yield f"bwd-{name}-step", _raises(ML_BWD, **with_changes(ml_bwd_args(), steps=st))


def _ml_bwd_cases():
    b = ml_bwd_args
    base = b()
    d = F64
    yield from _ml_common_cases(ML_BWD, base, "bwd")
    yield "bwd-checkpoint-negative", _raises(ML_BWD, **with_changes(base, checkpoint=-1))
    yield "bwd-checkpoint-other", _raises(ML_BWD, **with_changes(base, checkpoint=0))
    yield "bwd-grad-codes-short", _raises(ML_BWD, **with_changes(base, grad_codes=base["grad_codes"][:1]))
    yield "bwd-grad-codes-empty-list", _raises(ML_BWD, **with_changes(base, grad_codes=[]))
    yield "bwd-codes-empty-list", _raises(ML_BWD, **with_changes(base, codes=[]))
    yield "bwd-saved-empty-list", _raises(ML_BWD, **with_changes(base, saved=[]))
    gc, cs, sv = base["grad_codes"], base["codes"], base["saved"]
    # sizes that do not match the problem: were read (and written) out of bounds
    yield "bwd-grad-code-small", _raises(ML_BWD, **with_changes(base, grad_codes=_replace(gc, 1, gc[1][:1])))
    yield "bwd-grad-code-channels", _raises(ML_BWD, **with_changes(base, grad_codes=_replace(gc, 0, gc[0][:, :2])))
    yield "bwd-grad-code-flat", _raises(ML_BWD, **with_changes(base, grad_codes=_replace(gc, 0, gc[0].reshape(-1))))
    yield (
        "bwd-grad-code-large",
        _raises(ML_BWD, **with_changes(base, grad_codes=_replace(gc, 1, torch.randn(2, 4, 3, 3, dtype=d)))),
    )
    yield "bwd-grad-code-float32", _raises(ML_BWD, **with_changes(base, grad_codes=_replace(gc, 1, gc[1].float())))
    yield "bwd-code-small", _raises(ML_BWD, **with_changes(base, codes=_replace(cs, 1, cs[1][:, :2])))
    yield (
        "bwd-code-large",
        _raises(ML_BWD, **with_changes(base, codes=_replace(cs, 1, torch.randn(2, 5, 2, 2, dtype=d)))),
    )
    yield "bwd-code-batch", _raises(ML_BWD, **with_changes(base, codes=_replace(cs, 0, cs[0][:1])))
    yield "bwd-code-float32", _raises(ML_BWD, **with_changes(base, codes=_replace(cs, 1, cs[1].float())))
    yield "bwd-saved-steps", _raises(ML_BWD, **with_changes(base, saved=_replace(sv, 0, sv[0][:1])))
    yield "bwd-saved-code-shape", _raises(ML_BWD, **with_changes(base, saved=_replace(sv, 1, sv[1][:, :, :2])))
    yield "bwd-saved-flat", _raises(ML_BWD, **with_changes(base, saved=_replace(sv, 1, sv[1].reshape(-1))))
    yield "bwd-saved-float32", _raises(ML_BWD, **with_changes(base, saved=_replace(sv, 1, sv[1].float())))
    yield "bwd-z0-given", _raises(ML_BWD, **with_changes(base, z0=torch.randn(2, 4, 3, 3, dtype=d)))
    bi = b(project=False)
    yield "bwd-interleaved-z0", _raises(ML_BWD, **with_changes(bi, z0=torch.randn(2, 4, 2, 2, dtype=d)))
    yield "bwd-dtype-int", _raises(ML_BWD, **_cast(base, torch.int64))
    yield "bwd-dtype-half", _raises(ML_BWD, **_cast(base, torch.float16))
    yield (
        "bwd-no-steps",
        _raises(
            ML_BWD,
            **with_changes(
                b(),
                steps=[torch.empty(0, dtype=d)] * 2,
                thresholds=[torch.empty(0, 3, dtype=d), torch.empty(0, 4, dtype=d)],
            ),
        ),
    )
    # legitimate
    bz = b(z0=True, encoders=True)
    for key in ("grad_codes", "codes", "saved"):
        yield f"bwd-strided-{key}", _same(ML_BWD, with_changes(bz, **{key: [strided_view(t) for t in bz[key]]}), bz)
    yield "bwd-strided-x", _same(ML_BWD, with_changes(bz, x=strided_view(bz["x"])), bz)
    yield "bwd-strided-z0", _same(ML_BWD, with_changes(bz, z0=strided_view(bz["z0"])), bz)
    ones = [torch.ones((), dtype=d).expand(c.shape) for c in bz["codes"]]
    yield (
        "bwd-expanded-grad-codes",
        _same(ML_BWD, with_changes(bz, grad_codes=ones), with_changes(bz, grad_codes=[o.contiguous() for o in ones])),
    )
    yield (
        "bwd-absent-grad-code",
        _like_ref(
            ML_BWD, ml_ista_bwd_ref, with_changes(bz, grad_codes=_replace(bz["grad_codes"], 0, torch.empty(0, dtype=d)))
        ),
    )
    for name, kw in {
        "batch-0": dict(B=0),
        "dense-last": dict(H=5, W=5, strides=(1, 1, 1, 1)),
        "padded": dict(paddings=(1, 2, 1, 0)),
        "interleaved": dict(project=False),
        "one-step": dict(S=1),
    }.items():
        for ck in (0, 1, 2):
            yield f"bwd-{name}-ck{ck}", _like_ref(ML_BWD, ml_ista_bwd_ref, b(**kw, checkpoint=ck))


# ------------------------------------------------------------------------------------------------ sparse attention
def att_args(B=1, H=2, N=5, M=6, D=4, DV=3, dtype=F64, bias=False, **kw):
    g = torch.Generator().manual_seed(0)
    args = dict(
        q=torch.randn(B, H, N, D, generator=g, dtype=dtype),
        k=torch.randn(B, H, M, D, generator=g, dtype=dtype),
        v=torch.randn(B, H, M, DV, generator=g, dtype=dtype),
        threshold=torch.full((H,), 0.2, dtype=dtype),
        bias=torch.randn(B, H, N, M, generator=g, dtype=dtype) if bias else None,
        mode="sparsemax",
        causal=False,
        scale=0.5,
    )
    args.update(kw)
    return args


def att_bwd_args(**kw):
    args = att_args(**kw)
    out, stats = ops.sparse_attention_fwd_cpp(**args)
    g = torch.Generator().manual_seed(1)
    return dict(grad_out=torch.randn(out.shape, generator=g, dtype=out.dtype), **args, stats=stats)


ATT_FWD = ops.sparse_attention_fwd_cpp
ATT_BWD = ops.sparse_attention_bwd_cpp


def _att_common_cases(op, base, prefix):
    d = F64
    m = torch.device("meta")
    q, k, v = base["q"], base["k"], base["v"]
    yield f"{prefix}-q-3d", _raises(op, **with_changes(base, q=q[0]))
    yield f"{prefix}-k-5d", _raises(op, **with_changes(base, k=k[None]))
    yield f"{prefix}-v-0d", _raises(op, **with_changes(base, v=torch.tensor(1.0, dtype=d)))
    yield f"{prefix}-k-dim", _raises(op, **with_changes(base, k=k[..., :3]))
    yield f"{prefix}-k-heads", _raises(op, **with_changes(base, k=k[:, :1]))
    yield f"{prefix}-v-keys", _raises(op, **with_changes(base, v=v[:, :, :4]))
    yield f"{prefix}-v-batch", _raises(op, **with_changes(base, v=torch.cat([v, v])))
    yield f"{prefix}-threshold-shape", _raises(op, **with_changes(base, threshold=torch.ones(3, dtype=d)))
    yield f"{prefix}-threshold-0d", _raises(op, **with_changes(base, threshold=torch.tensor(0.2, dtype=d)))
    yield f"{prefix}-mode", _raises(op, **with_changes(base, mode="softmax"))
    yield f"{prefix}-mode-empty", _raises(op, **with_changes(base, mode=""))
    # a NaN scale had given zero rows where the reference's are NaN
    yield f"{prefix}-scale-nan", _raises(op, **with_changes(base, scale=float("nan")))
    yield f"{prefix}-bias-shape", _raises(op, **with_changes(base, bias=torch.zeros(1, 2, 5, 5, dtype=d)))
    yield f"{prefix}-bias-3d", _raises(op, **with_changes(base, bias=torch.zeros(2, 5, 6, dtype=d)))
    yield f"{prefix}-bias-dtype", _raises(op, **with_changes(base, bias=torch.zeros(1, 2, 5, 6)))
    yield f"{prefix}-bias-int", _raises(op, **with_changes(base, bias=torch.zeros(1, 2, 5, 6, dtype=torch.int64)))
    yield f"{prefix}-dtype-int", _raises(op, **_cast(base, torch.int64))
    yield f"{prefix}-dtype-half", _raises(op, **_cast(base, torch.float16))
    yield f"{prefix}-dtype-mixed-k", _raises(op, **with_changes(base, k=k.float()))
    yield f"{prefix}-dtype-mixed-v", _raises(op, **with_changes(base, v=v.float()))
    yield f"{prefix}-meta-q", _meta_or_raises(op, **with_changes(base, q=q.to(m)))
    yield f"{prefix}-meta-threshold", _meta_or_raises(op, **with_changes(base, threshold=base["threshold"].to(m)))
    yield (
        f"{prefix}-meta-bias",
        _meta_or_raises(op, **with_changes(base, bias=torch.zeros(1, 2, 5, 6, dtype=d, device=m))),
    )


def _att_fwd_cases():
    a = att_args
    base = a()
    yield from _att_common_cases(ATT_FWD, base, "att-fwd")
    for mode in ("sparsemax", "shrink"):
        for causal in (False, True):
            tag = f"{mode}-{'causal' if causal else 'full'}"
            bb = a(bias=True, mode=mode, causal=causal)
            for name in ("q", "k", "v", "bias"):
                yield (
                    f"att-fwd-strided-{name}-{tag}",
                    _same(ATT_FWD, with_changes(bb, **{name: strided_view(bb[name])}), bb, exact=False),
                )
                yield (
                    f"att-fwd-transposed-{name}-{tag}",
                    _same(
                        ATT_FWD,
                        with_changes(bb, **{name: bb[name].transpose(-1, -2).contiguous().transpose(-1, -2)}),
                        bb,
                        exact=False,
                    ),
                )
            bias = torch.randn(1, 1, 1, 6, dtype=F64).expand(1, 2, 5, 6)
            yield (
                f"att-fwd-expanded-bias-{tag}",
                _same(ATT_FWD, with_changes(bb, bias=bias), with_changes(bb, bias=bias.contiguous())),
            )
            ex = {n: _expanded(bb[n], 2) for n in ("q",)}
            yield (
                f"att-fwd-expanded-q-{tag}",
                _same(
                    ATT_FWD,
                    with_changes(bb, q=ex["q"], bias=bb["bias"][:, :, :3]),
                    with_changes(bb, q=ex["q"].contiguous(), bias=bb["bias"][:, :, :3]),
                    exact=False,
                ),
            )
            kx = bb["k"][:, :1].expand(1, 2, 6, 4)
            yield (
                f"att-fwd-expanded-k-{tag}",
                _same(ATT_FWD, with_changes(bb, k=kx), with_changes(bb, k=kx.contiguous()), exact=False),
            )
            for name, kw in {
                "batch-0": dict(B=0),
                "heads-0": dict(H=0),
                "queries-0": dict(N=0),
                "keys-0": dict(M=0),
                "dim-0": dict(D=0),
                "value-dim-0": dict(DV=0),
                "all-0": dict(B=0, H=0, N=0, M=0, D=0, DV=0),
            }.items():
                yield (
                    f"att-fwd-{name}-{tag}",
                    _like_ref(ATT_FWD, sparse_attention_fwd_ref, a(**kw, mode=mode, causal=causal)),
                )
            for vname, value in (("nan", float("nan")), ("inf", float("inf")), ("-inf", float("-inf"))):
                for arg in ("q", "k", "v", "bias"):
                    args = a(bias=True, mode=mode, causal=causal)
                    t = args[arg].clone()
                    t.view(-1)[2] = value
                    yield (
                        f"att-fwd-{vname}-{arg}-{tag}",
                        _like_ref(ATT_FWD, sparse_attention_fwd_ref, with_changes(args, **{arg: t})),
                    )
            for sname, scale in (
                ("scale-0", 0.0),
                ("scale-negative", -3.0),
                ("scale-huge", 1e300),
                ("scale-inf", float("inf")),
                ("scale-minus-inf", float("-inf")),
            ):
                yield (
                    f"att-fwd-{sname}-{tag}",
                    _like_ref(ATT_FWD, sparse_attention_fwd_ref, a(mode=mode, causal=causal, scale=scale)),
                )
    yield (
        "att-fwd-threshold-int",
        _same(
            ATT_FWD,
            a(mode="shrink", threshold=torch.zeros(2, dtype=torch.int64)),
            a(mode="shrink", threshold=torch.zeros(2, dtype=F64)),
        ),
    )


def _att_bwd_cases():
    b = att_bwd_args
    base = b()
    d = F64
    yield from _att_common_cases(ATT_BWD, base, "att-bwd")
    g, st = base["grad_out"], base["stats"]
    # grad_out and stats that do not match q, v: were read out of bounds
    yield "att-bwd-grad-out-short", _raises(ATT_BWD, **with_changes(base, grad_out=g[:, :, :2]))
    yield "att-bwd-grad-out-narrow", _raises(ATT_BWD, **with_changes(base, grad_out=g[..., :1]))
    yield "att-bwd-grad-out-wide", _raises(ATT_BWD, **with_changes(base, grad_out=torch.randn(1, 2, 5, 7, dtype=d)))
    yield "att-bwd-grad-out-heads", _raises(ATT_BWD, **with_changes(base, grad_out=g[:, :1]))
    yield "att-bwd-grad-out-3d", _raises(ATT_BWD, **with_changes(base, grad_out=g[0]))
    yield "att-bwd-grad-out-flat", _raises(ATT_BWD, **with_changes(base, grad_out=g.reshape(-1)))
    yield "att-bwd-stats-short", _raises(ATT_BWD, **with_changes(base, stats=st[:, :, :2]))
    yield "att-bwd-stats-one", _raises(ATT_BWD, **with_changes(base, stats=st[..., :1]))
    yield "att-bwd-stats-flat", _raises(ATT_BWD, **with_changes(base, stats=st.reshape(-1)))
    yield "att-bwd-stats-empty", _raises(ATT_BWD, **with_changes(base, stats=torch.empty(0, dtype=d)))
    yield "att-bwd-grad-out-meta", _meta_or_raises(ATT_BWD, **with_changes(base, grad_out=g.to("meta")))
    yield "att-bwd-stats-meta", _meta_or_raises(ATT_BWD, **with_changes(base, stats=st.to("meta")))
    for mode in ("sparsemax", "shrink"):
        for causal in (False, True):
            tag = f"{mode}-{'causal' if causal else 'full'}"
            bb = b(bias=True, mode=mode, causal=causal)
            for name in ("grad_out", "q", "k", "v", "bias", "stats"):
                yield (
                    f"att-bwd-strided-{name}-{tag}",
                    _same(ATT_BWD, with_changes(bb, **{name: strided_view(bb[name])}), bb, exact=False),
                )
            gx = torch.ones((), dtype=d).expand(bb["grad_out"].shape)
            yield (
                f"att-bwd-expanded-grad-{tag}",
                _same(ATT_BWD, with_changes(bb, grad_out=gx), with_changes(bb, grad_out=gx.contiguous()), exact=False),
            )
            for name, kw in {
                "batch-0": dict(B=0),
                "heads-0": dict(H=0),
                "queries-0": dict(N=0),
                "keys-0": dict(M=0),
                "dim-0": dict(D=0),
                "value-dim-0": dict(DV=0),
            }.items():
                yield (
                    f"att-bwd-{name}-{tag}",
                    _like_ref(ATT_BWD, sparse_attention_bwd_ref, b(**kw, mode=mode, causal=causal)),
                )
            args = b(mode=mode, causal=causal)
            st = args["stats"].clone()
            st[0, 0, 1] = float("nan")
            st[0, 1, 2, 0] = float("-inf")
            st[0, 1, 3, 1] = float("inf")
            yield (
                f"att-bwd-hostile-stats-{tag}",
                _shapes_like(ATT_BWD, with_changes(args, stats=st), ("q", "k", "v", "threshold")),
            )


def _cases():
    for prefix, gen in (
        ("conv-fwd-", _conv_fwd_cases),
        ("conv-bwd-", _conv_bwd_cases),
        ("conv-", _conv_strategy_cases),
        ("ml-", _ml_fwd_cases),
        ("ml-", _ml_bwd_cases),
        ("", _att_fwd_cases),
        ("", _att_bwd_cases),
    ):
        for name, case in gen():
            yield prefix + name, case


CASES = dict(_cases())
assert len(CASES) == len(list(_cases())), "duplicate case names"


@pytest.mark.parametrize("name", list(CASES))
def test_raw_op(name):
    CASES[name]()


@pytest.mark.parametrize("op", ["reference", "fake"])
def test_ml_ista_z0_outside_project_mode_refused_like_cpp(op):
    """Every row's raw ops and their fakes refuse a z0 the interleaved iteration has no place for, as the C++ ops do:
    the reference's had used it as the deepest layer's start and the fake answered with shapes."""
    fwd = ml_args(z0=True, project=False)
    bwd = dict(grad_codes=[torch.ones(1)] * 2, **fwd, codes=[torch.ones(1)] * 2, saved=[])
    with pytest.raises(RuntimeError):  # the C++ ops' TORCH_CHECK
        ML_FWD(**fwd)
    if op == "fake":  # meta tensors dispatch to the fakes
        fwd = {k: _to_meta(v) for k, v in fwd.items()}
        bwd = {k: _to_meta(v) for k, v in bwd.items()}
    reference = op_pair("ml_ista", "reference")
    for call, args in ((reference.forward, fwd), (reference.backward, bwd)):
        with pytest.raises(ValueError, match="z0 must be empty outside project mode"):
            call(**args)
    if op == "fake":
        with pytest.raises(ValueError, match="z0 must be empty outside project mode"):
            ML_FWD(**fwd)


def _to_meta(v):
    if isinstance(v, torch.Tensor):
        return v.to("meta")
    if isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
        return [t.to("meta") for t in v]
    return v


@pytest.mark.parametrize("op", ["reference", "fake"])
def test_conv_ista_without_iterations_refused_like_cpp(op):
    """functional refuses n_iter = 0 before any op runs; called directly, the reference's raw forward returned z0
    itself, which torch refused as an alias ("may not alias any inputs", no word of n_iter), and the fake promised
    shapes."""
    args = raw_conv_ista_args(n=0, z0=True, lam=torch.empty(0, 3, dtype=F64), step=torch.empty(0, dtype=F64))
    with pytest.raises(RuntimeError, match="n_iter >= 1"):  # the C++ ops' TORCH_CHECK
        CONV_FWD(**args)
    if op == "fake":  # meta tensors dispatch to the fakes
        args = {k: _to_meta(v) for k, v in args.items()}
    reference = op_pair("conv_ista", "reference")
    with pytest.raises(ValueError, match=r"step must be \(n_iter,\) with n_iter >= 1"):
        reference.forward(**args)
    backward = dict(raw_conv_ista_args(n=0), grad_z=torch.ones(1), z=torch.ones(1), saved=torch.ones(1))
    with pytest.raises(ValueError, match=r"step must be \(n_iter,\) with n_iter >= 1"):
        conv_ista_bwd_ref(**backward)
