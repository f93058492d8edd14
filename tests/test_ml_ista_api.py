"""functional.ml_ista's validation and defaults, and conv_ista's per-iteration / input-encoder variants (a one-layer
ML-ISTA on the backend the table picks among those that run them)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import count_calls

import dsc_kernels.functional as DF
from dsc_kernels import ops
from dsc_kernels.reference import conv_analysis_ref, conv_synthesis_ref, lipschitz_constant_ref

D = torch.float64
CPP = pytest.param(
    "cpp", marks=pytest.mark.skipif("cpp" not in DF.available_backends("cpu"), reason="C++ extension unavailable")
)


def _net(dtype=D):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 12, 12, generator=g, dtype=dtype)
    ws = [
        0.3 * torch.randn(3, 1, 4, 4, generator=g, dtype=dtype),
        0.3 * torch.randn(4, 3, 3, 3, generator=g, dtype=dtype),
    ]
    return x, ws


def _call(**overrides):
    x, ws = _net()
    kwargs = dict(x=x, weights=ws, thresholds=[0.01, 0.02], n_iter=2, strides=[2, 1])
    kwargs.update(overrides)
    x = kwargs.pop("x")
    weights = kwargs.pop("weights")
    thresholds = kwargs.pop("thresholds")
    return DF.ml_ista(x, weights, thresholds, **kwargs)


@pytest.mark.parametrize(
    "overrides,error,words",
    [
        (dict(weights=torch.randn(3, 1, 4, 4)), TypeError, "weights must be a non-empty list"),
        (dict(weights=[]), TypeError, "weights must be a non-empty list"),
        (
            dict(weights=[torch.randn(3, 1, 4, 4, dtype=D), torch.randn(4, 5, 3, 3, dtype=D)]),
            ValueError,
            r"weights\[1\] expects 5 input channels",
        ),
        (
            dict(weights=[torch.randn(3, 1, 4, 4, dtype=D), torch.randn(2, 4, 3, 4, 3, 3, dtype=D)]),
            ValueError,
            r"weights\[1\] must be",
        ),
        (
            dict(weights=[torch.randn(5, 3, 1, 4, 4, dtype=D), torch.randn(4, 3, 3, 3, dtype=D)]),
            ValueError,
            r"weights\[0\] holds 5 per-step dictionaries, expected n_iter \+ 1=3",
        ),
        (dict(thresholds=[0.01]), ValueError, "thresholds must be a list with one entry per layer"),
        (dict(thresholds=[0.01, torch.zeros(5, dtype=D)]), ValueError, r"thresholds\[1\] must have shape"),
        (
            dict(thresholds=[0.01, -0.02], nonneg=False),
            ValueError,
            r"thresholds\[1\] \(negative thresholds need nonneg",
        ),
        (dict(thresholds=[0.01, float("nan")]), ValueError, r"thresholds\[1\] must be finite"),
        (dict(steps=[1.0, 0.0]), ValueError, r"steps\[1\] must be > 0"),
        (dict(steps=[1.0, torch.ones(2, dtype=D)]), ValueError, r"steps\[1\] must have shape"),
        # a per-layer value on another device than x (meta: the one other device every machine has)
        (dict(thresholds=[0.01, torch.full((4,), 0.01, dtype=D, device="meta")]), ValueError, r"thresholds\[1\] is on"),
        (dict(steps=[1.0, torch.ones((), dtype=D, device="meta")]), ValueError, r"steps\[1\] is on"),
        (dict(n_iter=-1), ValueError, "n_iter must be >= 0"),
        (dict(n_iter=1.5), TypeError, "n_iter must be an int"),
        (dict(strides=[2, "1"]), TypeError, "stride"),
        (dict(paddings=[0, 0, 0]), ValueError, "paddings must be a list with one entry per layer"),
        (dict(x=torch.randn(2, 1, 6, 6, dtype=D)), ValueError, "layer 1: the signal size"),
        (dict(x=torch.randn(2, 1, 12, 12)), TypeError, "must share one dtype"),
        (dict(x=torch.ones(2, 1, 12, 12, dtype=torch.int64)), TypeError, "x must have a floating-point dtype"),
        (dict(x=torch.randn(2, 1, 12, 12, 3, dtype=D)), ValueError, "x must be"),
        (
            dict(encoder_weights=[torch.randn(3, 1, 3, 3, dtype=D), None]),
            ValueError,
            r"encoder_weights\[0\] must have the dictionary's shape",
        ),
        (dict(input_encoder_weights=[None]), ValueError, "input_encoder_weights must be a list with one entry"),
        (dict(z0=torch.zeros(2, 4, 5, 5, dtype=D), interleaved=True), ValueError, "z0 .* needs the projected"),
        (dict(z0=torch.zeros(2, 4, 4, 4, dtype=D)), ValueError, "z0 must have the deepest code's shape"),
        (dict(fista=1), TypeError, "fista must be True or False"),
        (dict(interleaved="no"), TypeError, "interleaved must be True or False"),
        (dict(backend="gpu-fast"), ValueError, "backend must be one of"),
    ],
)
def test_ml_ista_rejects_bad_input(overrides, error, words):
    with pytest.raises(error, match=words):
        _call(**overrides)


def test_ml_ista_backend_errors_are_explicit():
    with pytest.raises(ValueError, match="backend='triton': that backend has no ml_ista kernels"):
        _call(backend="triton")
    with pytest.raises(TypeError, match="backend='cpp' supports"):
        x, ws = _net(torch.bfloat16)
        DF.ml_ista(x, ws, [0.01, 0.02], n_iter=1, strides=[2, 1], backend="cpp")


def test_ml_ista_default_steps_are_one_over_lipschitz():
    x, ws = _net()
    want = DF.ml_ista(
        x,
        ws,
        [0.01, 0.02],
        n_iter=2,
        strides=[2, 1],
        backend="reference",
        steps=[
            1 / lipschitz_constant_ref(ws[0], (12, 12), (2, 2), (0, 0)),
            1 / lipschitz_constant_ref(ws[1], (5, 5), (1, 1), (0, 0)),
        ],
    )
    got = DF.ml_ista(x, ws, [0.01, 0.02], n_iter=2, strides=[2, 1], backend="reference")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_ml_ista_default_steps_are_estimated_once_per_dictionary(monkeypatch):
    # The default 1/L_j is cached per dictionary, as conv_ista's: ml_ista passed each layer's dictionary as a new view
    # (w.unsqueeze(0)[k]) on every call, which the cache never found, so every call ran 100 power iterations per
    # layer again (400 convolutions for this two-layer call). A changed dictionary is still re-estimated.
    import dsc_kernels.reference as ref

    calls = count_calls(monkeypatch, ref, "lipschitz_power_iteration_scaled")
    x, ws = _net()
    first = DF.ml_ista(x, ws, [0.01, 0.02], n_iter=2, strides=[2, 1], backend="reference")
    assert calls[0] == 2
    again = DF.ml_ista(x, ws, [0.01, 0.02], n_iter=2, strides=[2, 1], backend="reference")
    assert calls[0] == 2
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        ws[1].mul_(2.0)
    DF.ml_ista(x, ws, [0.01, 0.02], n_iter=2, strides=[2, 1], backend="reference")
    assert calls[0] == 3
    # per-step dictionaries (All-Free) and conv_ista's per-iteration variant: one estimate per step's dictionary
    per_step = [torch.stack([w, 0.5 * w, 0.25 * w]) for w in ws]
    for _ in range(2):
        DF.ml_ista(x, per_step, [0.01, 0.02], n_iter=2, strides=[2, 1], backend="reference")
    assert calls[0] == 3 + 6
    per_iteration = per_step[0].clone()  # per_step[0]'s 1/L at this geometry are cached already
    for _ in range(2):
        DF.conv_ista(x, per_iteration, 0.01, n_iter=3, stride=2, backend="reference")
    assert calls[0] == 3 + 6 + 3


def test_ml_ista_warns_for_a_layer_step_above_two_over_lipschitz():
    x, ws = _net()
    lips = [
        lipschitz_constant_ref(ws[0], (12, 12), (2, 2), (0, 0)),
        lipschitz_constant_ref(ws[1], (5, 5), (1, 1), (0, 0)),
    ]
    # the interleaved iteration is ISTA on each layer's own code (the projected one steps the deepest code by the
    # product of the steps, which a per-layer bound cannot judge)
    with pytest.warns(RuntimeWarning, match=r"steps\[1\]=.* is above 2/L") as record:
        _call(steps=[None, 100 / lips[1]], interleaved=True, backend="reference")
    assert record[0].filename == __file__  # points at the caller, not at functional
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _call(interleaved=True, backend="reference")
        _call(steps=[1 / lips[0], 1 / lips[1]], interleaved=True, backend="reference")
        # step 0 only scales the initial encoding: with no unfolding after it nothing iterates
        step = torch.tensor([100 / lips[1], 1 / lips[1], 1 / lips[1]], dtype=D)
        _call(steps=[None, step], interleaved=True, backend="reference")
        _call(n_iter=0, steps=[100 / lips[0], 100 / lips[1]], interleaved=True, backend="reference")


def test_ml_ista_zero_unfoldings_is_a_cnn():
    x, ws = _net()
    got = DF.ml_ista(
        x,
        ws,
        [0.01, torch.tensor([0.0, -0.1, 0.1, 0.2], dtype=D)],
        n_iter=0,
        steps=[0.5, 2.0],
        strides=[2, 1],
        backend="reference",
    )
    g1 = F.relu(0.5 * F.conv2d(x, ws[0], stride=2) - 0.01)
    g2 = F.relu(2.0 * F.conv2d(g1, ws[1]) - torch.tensor([0.0, -0.1, 0.1, 0.2], dtype=D).view(1, -1, 1, 1))
    torch.testing.assert_close(got[0], g1, rtol=0, atol=1e-14)
    torch.testing.assert_close(got[1], g2, rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------------------ conv-ISTA variants
def _loop(x, weights, encoders, inputs, thresholds, steps, stride, padding, nonneg, fista, z0):
    """z_{k+1} = S(y_k + step_k (B_k x - E_k D_k y_k)) written out (B = E, E = D when absent)."""
    n = steps.shape[0]
    z = z0 if z0 is not None else torch.zeros_like(conv_analysis_ref(x, weights[0], stride, padding))
    t = [1.0]  # DESIGN: y_k = z_k + ((t_{k-1} - 1) / t_k)(z_k - z_{k-1}) for k >= 1, t_0 = 1
    for _ in range(n):
        t.append((1 + (1 + 4 * t[-1] ** 2) ** 0.5) / 2)
    z_prev = z
    for k in range(n):
        d, e, b = weights[k], encoders[k], inputs[k]
        y = z + (t[k - 1] - 1) / t[k] * (z - z_prev) if fista and k > 0 else z
        dz = conv_synthesis_ref(y, d, x.shape[2:], stride, padding)
        u = y + steps[k] * (conv_analysis_ref(x, b, stride, padding) - conv_analysis_ref(dz, e, stride, padding))
        th = thresholds[k].view(1, -1, *[1] * (x.dim() - 2))
        z_prev, z = z, (torch.relu(u - th) if nonneg else u - torch.clamp(u, -th, th))
    return z


VARIANTS = {
    "per-iteration-2d": dict(rank=2, per_iteration=("weight", "encoder_weight"), fista=True, z0=True),
    "per-iteration-weight-only-1d": dict(rank=1, per_iteration=("weight",), nonneg=True),
    "input-encoder-2d": dict(rank=2, input_encoder=True, nonneg=True, stride=2),
    "input-encoder-per-iteration-1d": dict(
        rank=1, input_encoder=True, per_iteration=("input_encoder_weight",), fista=True
    ),
}


def _variant(name):
    o = VARIANTS[name]
    rank, n = o["rank"], 3
    g = torch.Generator().manual_seed(1)
    size, kernel = ((11, 10), (3, 4)) if rank == 2 else ((23,), (5,))
    x = torch.randn(2, 2, *size, generator=g, dtype=D)

    def w(per):
        return 0.3 * torch.randn(*((n,) if per else ()), 4, 2, *kernel, generator=g, dtype=D)

    per = o.get("per_iteration", ())
    tensors = dict(
        x=x,
        weight=w("weight" in per),
        encoder_weight=w("encoder_weight" in per) if "encoder_weight" in per else None,
        input_encoder_weight=w("input_encoder_weight" in per) if o.get("input_encoder") else None,
        threshold=0.05 + 0.05 * torch.rand(n, 4, generator=g, dtype=D),
        step=0.3 + 0.1 * torch.rand(n, generator=g, dtype=D),
    )
    stride, padding = o.get("stride", 1), 1
    zs = [(s + 2 * padding - k) // stride + 1 for s, k in zip(size, kernel)]
    tensors["z0"] = 0.2 * torch.randn(2, 4, *zs, generator=g, dtype=D) if o.get("z0") else None
    return tensors, dict(stride=stride, padding=padding, nonneg=o.get("nonneg", False), fista=o.get("fista", False))


@pytest.mark.parametrize("backend", ["reference", CPP])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_conv_ista_variants_match_the_loop(name, backend):
    tensors, opts = _variant(name)
    leaves = {k: v.clone().requires_grad_() for k, v in tensors.items() if v is not None}

    def per_k(t, n=3):
        return [t[k] if t.dim() == tensors["x"].dim() + 1 else t for k in range(n)]

    got = DF.conv_ista(
        leaves["x"],
        leaves["weight"],
        n_iter=3,
        step=leaves["step"],
        threshold=leaves["threshold"],
        encoder_weight=leaves.get("encoder_weight"),
        input_encoder_weight=leaves.get("input_encoder_weight"),
        z0=leaves.get("z0"),
        backend=backend,
        **opts,
    )
    weights = per_k(leaves["weight"])
    encoders = per_k(leaves["encoder_weight"]) if "encoder_weight" in leaves else weights
    inputs = per_k(leaves["input_encoder_weight"]) if "input_encoder_weight" in leaves else encoders
    want = _loop(
        leaves["x"],
        weights,
        encoders,
        inputs,
        leaves["threshold"],
        leaves["step"],
        (opts["stride"],) * (leaves["x"].dim() - 2),
        (opts["padding"],) * (leaves["x"].dim() - 2),
        opts["nonneg"],
        opts["fista"],
        leaves.get("z0"),
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert bool((got != 0).any()) and bool((got == 0).any())
    r = torch.randn(got.shape, generator=torch.Generator().manual_seed(2), dtype=D)
    g_got = torch.autograd.grad((got * r).sum(), list(leaves.values()))
    g_want = torch.autograd.grad((want * r).sum(), list(leaves.values()))
    for key, a, b in zip(leaves, g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11, msg=lambda m: f"{key}: {m}")


def test_conv_ista_variant_with_lam_is_threshold_step_times_lam():
    tensors, opts = _variant("input-encoder-2d")
    lam = 0.1 + 0.1 * torch.rand(3, 4, dtype=D)
    a = DF.conv_ista(
        tensors["x"],
        tensors["weight"],
        lam,
        n_iter=3,
        step=tensors["step"],
        input_encoder_weight=tensors["input_encoder_weight"],
        backend="reference",
        **opts,
    )
    b = DF.conv_ista(
        tensors["x"],
        tensors["weight"],
        n_iter=3,
        step=tensors["step"],
        threshold=lam * tensors["step"][:, None],
        input_encoder_weight=tensors["input_encoder_weight"],
        backend="reference",
        **opts,
    )
    torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_conv_ista_variants_name_the_backends_that_run_them():
    tensors, opts = _variant("per-iteration-2d")
    with pytest.raises(
        ValueError, match="backend='triton' cannot run per_iteration_weight .*backends that can: reference, cpp"
    ):
        DF.conv_ista(tensors["x"], tensors["weight"], 0.1, n_iter=3, backend="triton", **opts)
    for features in [("per_iteration_weight",), ("input_encoder",), ("per_iteration_weight", "input_encoder")]:
        assert ops.select("conv_ista", "auto", torch.device("cpu"), torch.float64, features).name in (
            "cpp",
            "reference",
        )
    assert ops.select("conv_ista", "auto", torch.device("cuda"), torch.float32, ("input_encoder",)).name == "reference"


@pytest.mark.parametrize(
    "overrides,error,words",
    [
        (
            dict(weight=torch.randn(4, 4, 2, 3, 4, dtype=D)),
            ValueError,
            "weight holds 4 per-step dictionaries, expected n_iter=3",
        ),
        (
            dict(input_encoder_weight=torch.randn(4, 2, 3, 3, dtype=D)),
            ValueError,
            "input_encoder_weight must have the dictionary's shape",
        ),
        (dict(input_encoder_weight=torch.randn(4, 2, 3, 4)), TypeError, "must share one dtype"),
        (dict(z0=torch.zeros(2, 4, 3, 3, dtype=D)), ValueError, "z0 must have the code's shape"),
        (dict(step=torch.ones(2, dtype=D)), ValueError, "step must have shape"),
        (dict(threshold=torch.full((3, 4), -0.1, dtype=D)), ValueError, "negative thresholds need nonneg"),
        (dict(lam=0.1), ValueError, "exactly one of lam"),
        (dict(n_iter=0), ValueError, "n_iter must be >= 1"),
    ],
)
def test_conv_ista_variants_reject_bad_input(overrides, error, words):
    tensors, opts = _variant("input-encoder-2d")
    kwargs = dict(
        x=tensors["x"],
        weight=tensors["weight"],
        lam=None,
        n_iter=3,
        step=tensors["step"],
        threshold=tensors["threshold"],
        input_encoder_weight=tensors["input_encoder_weight"],
        backend="reference",
        **{**opts, "nonneg": False},
    )
    kwargs.update(overrides)
    x, weight, lam = kwargs.pop("x"), kwargs.pop("weight"), kwargs.pop("lam")
    with pytest.raises(error, match=words):
        DF.conv_ista(x, weight, lam, **kwargs)


def test_an_unbatched_image_with_a_2d_weight_is_told_about_x_first():
    """x (C, H, W) reads as a 1-D batch, and a 2-D weight as per-step 1-D dictionaries: the message led with the
    dictionaries' count instead of x's rank."""
    with pytest.raises(ValueError, match=r"x is 1-D \(B, C, L\).*2-D dictionary x must have rank 4: \(B, C, H, W\)"):
        DF.conv_ista(torch.randn(1, 16, 16), torch.randn(8, 1, 3, 3), 0.1, n_iter=3)


def test_an_unbatched_image_with_a_2d_weight_is_told_about_x_when_the_count_matches_n_iter():
    """As above with n_iter equal to the weight's first dimension: the count check passed and the channel check
    alone said "x has 16 channels but weight expects C_sig=3", about channels that neither tensor has."""
    with pytest.raises(ValueError, match=r"x has 16 channels.*x is 1-D \(B, C, L\).*must have rank 4: \(B, C, H, W\)"):
        DF.conv_ista(torch.randn(1, 16, 16), torch.randn(8, 1, 3, 3), 0.1, n_iter=8)


def test_a_threshold_shape_error_carries_no_sign_hint():
    """The hint about negative thresholds belongs to the sign check; a shape error quoted it too."""
    x = torch.randn(1, 1, 12, 12, dtype=D)
    weights = [torch.randn(4, 1, 3, 3, dtype=D), torch.randn(4, 4, 3, 3, dtype=D)]
    with pytest.raises(ValueError, match=r"^thresholds\[1\] must have shape") as err:
        DF.ml_ista(x, weights, [0.1, torch.zeros(4, 4, dtype=D)], n_iter=2, nonneg=False)
    assert "negative" not in str(err.value)
    with pytest.raises(ValueError, match=r"negative thresholds need nonneg=True\) must be >= 0"):
        DF.ml_ista(x, weights, [0.1, -0.2], n_iter=2, nonneg=False)
