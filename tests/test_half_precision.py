"""Half precision (float16, bfloat16) by the project's rule (tests/tolerance.py): against a float64 computation of
the same problem, at most twice the error of PyTorch's own eager loop in that dtype (F.conv_transpose2d, F.conv2d
and a soft threshold, the step a Python float, which eager PyTorch multiplies in float32 for half tensors).

The problems' dictionaries are large enough that the default step 1/L (~8e-6) is subnormal in float16, where it
keeps 7 of its 11 bits: the backends carried the step and the thresholds step * lam in x's dtype, and their codes came
out at 3.7-6.2x eager's error (reference and Triton alike, the first iterations worst). They are now carried in
float32 for half inputs (``reference.value_dtype``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close_by_rule

import dsc_kernels.functional as DF
from dsc_kernels.nn import ConvSparseCoding2d, MultiLayerSparseCoding2d, SoftThreshold
from dsc_kernels.reference.conv_ista import fista_momentum

DEVICES = [
    pytest.param("reference", "cpu", id="reference"),
    pytest.param("triton", "cpu", marks=pytest.mark.interpreter, id="triton-interpreter"),
    pytest.param("triton", "cuda", marks=pytest.mark.gpu, id="triton-gpu"),
]
SIZE, PADDING = (8, 9), 1


def _problem(device: str, dtype: torch.dtype = torch.float16, seed: int = 2):
    """x (2, 3, 8, 9), a 4 x 3 x 3 x 3 dictionary of taps ~32 (L ~ 1.3e5 at this size, 1/L subnormal in float16, and
    rounded there by 0.35% on seed 2), its default step as a Python float and a lam of threshold ~3e-4."""
    g = torch.Generator().manual_seed(seed)
    w = (32 * torch.randn(4, 3, 3, 3, generator=g)).to(device=device, dtype=dtype)
    x = torch.randn(2, 3, *SIZE, generator=g).to(device=device, dtype=dtype)
    step = 1.0 / DF.lipschitz_constant(w.double(), SIZE, padding=PADDING)
    return x, w, step, 0.3e-3 / step


def _times(step: float | torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """step * t as eager PyTorch forms it for a Python-float step: in float32 for half t, rounded to t's dtype. A
    float32 step tensor (to differentiate it) is applied the same way, explicitly."""
    return step * t if isinstance(step, float) else (step * t.to(step.dtype)).to(t.dtype)


def _eager(x, w, lam, step, n_iter: int, *, nonneg=False, fista=False) -> torch.Tensor:
    """Eager conv-ISTA/FISTA in x's dtype; lam a float or a (C,) tensor, step a float or a float32 0-d tensor."""
    z = z_prev = x.new_zeros(x.shape[0], w.shape[0], *x.shape[2:])
    betas = fista_momentum(n_iter)
    for k in range(n_iter):
        y = z + betas[k] * (z - z_prev) if fista and betas[k] != 0 else z
        u = y + _times(step, F.conv2d(x - F.conv_transpose2d(y, w, padding=PADDING), w, padding=PADDING))
        t = _times(step, lam.view(1, -1, 1, 1)) if isinstance(lam, torch.Tensor) else step * lam
        z_prev, z = z, F.relu(u - t) if nonneg else u - u.clamp(-t, t)
    return z


@pytest.mark.parametrize("fista", [False, True], ids=["ista", "fista"])
@pytest.mark.parametrize("nonneg", [False, True], ids=["signed", "nonneg"])
@pytest.mark.parametrize("backend, device", DEVICES)
def test_codes_with_a_subnormal_default_step(backend, device, nonneg, fista):
    x, w, step, lam = _problem(device)
    opts = dict(n_iter=2, padding=PADDING, nonneg=nonneg, fista=fista)
    z = DF.conv_ista(x, w, lam, backend=backend, **opts)
    want = DF.conv_ista(x.double(), w.double(), lam, backend="reference", **opts)
    assert z.dtype == torch.float16
    assert_close_by_rule(z, want, _eager(x, w, lam, step, 2, nonneg=nonneg, fista=fista), name="z")


@pytest.mark.parametrize("backend, device", DEVICES)
def test_gradients_with_a_subnormal_default_step(backend, device):
    """Gradients of <z, G> for x, the dictionary, a float16 lam and a float32 step (each returned in its own dtype);
    the eager yardstick is autograd through the loop above, its step applied in float32 as for a Python float."""
    x, w, step, lam = _problem(device)
    lam = torch.full((4,), lam, device=device, dtype=torch.float16)
    step = torch.tensor(step, device=device)
    gz = torch.randn(2, 4, *SIZE, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(device)

    def gradients(run, *leaves):
        leaves = [t.detach().requires_grad_() for t in leaves]
        z = run(*leaves)
        return [z, *torch.autograd.grad((z * gz.to(z.dtype)).sum(), leaves)]

    def solve(x, w, lam, step, backend=backend):
        return DF.conv_ista(x, w, lam, n_iter=2, step=step, padding=PADDING, backend=backend)

    got = gradients(solve, x, w, lam, step)
    want = gradients(lambda *t: solve(*t, backend="reference"), *(t.double() for t in (x, w, lam, step)))
    eager = gradients(lambda *t: _eager(*t, 2), x, w, lam, step)
    for name, a, b, e, leaf in zip(("z", "x", "weight", "lam", "step"), got, want, eager, (x, x, w, lam, step)):
        assert a.dtype == leaf.dtype, name
        assert_close_by_rule(a, b, e, name=name)


@pytest.mark.parametrize("variant", ["ml_ista", "per-iteration-dictionaries"])
def test_multi_layer_pursuit_with_a_subnormal_default_step(variant):
    """The ml_ista op family (the reference is its one half-precision backend): one layer of ML-ISTA (initial
    encoding, then one unfolding) is two conv-ISTA iterations from zero; conv_ista with a dictionary per iteration
    runs through it too."""
    x, w, step, lam = _problem("cpu")
    threshold = step * lam

    def solve(x, w):
        if variant == "ml_ista":
            return DF.ml_ista(x, [w], [threshold], n_iter=1, paddings=[PADDING], nonneg=False, backend="reference")[0]
        return DF.conv_ista(x, w.expand(2, *w.shape), threshold=threshold, n_iter=2, padding=PADDING)

    z = solve(x, w)
    assert z.dtype == torch.float16
    assert_close_by_rule(z, solve(x.double(), w.double()), _eager(x, w, lam, step, 2), name="z")


@pytest.mark.parametrize("made", ["dtype=float16", "half()"])
def test_a_half_precision_layer_keeps_its_tracked_step_in_float32(made):
    """ConvSparseCoding2d's tracked step 1/L (a buffer) was stored in the layer's dtype, subnormal in float16 here
    (0.32% off on this seed, 3.7x eager's error). Built with dtype=float16 or converted by .half(), the layer keeps
    it, and its fixed lam, in float32; the float64 layer on the same dictionary is the reference (its L is the
    infinite-signal norm, not functional's)."""
    x, w, _, lam = _problem("cpu", seed=3)

    def layer(dtype):
        build = dict(n_iter=2, padding=PADDING, lam=lam, backend="reference")
        if made == "half()" and dtype == torch.float16:
            module = ConvSparseCoding2d(3, 4, 3, **build).half()
        else:
            module = ConvSparseCoding2d(3, 4, 3, **build, dtype=dtype)
        with torch.no_grad():
            module.weight.copy_(w)
        return module.eval()

    half, exact = layer(torch.float16), layer(torch.float64)
    z, want = half(x), exact(x.double())
    assert z.dtype == torch.float16 and half.step.dtype == half.lam.dtype == torch.float32
    assert_close_by_rule(z, want, _eager(x, w, lam, float(exact.step), 2), name="z")


@pytest.mark.parametrize("made", ["dtype=float16", "half()"])
def test_a_half_precision_multi_layer_network_keeps_its_fixed_steps_in_float32(made):
    """MultiLayerSparseCoding2d's fixed steps (learn_steps=False) were float16 buffers: a step of 1e-5 was stored as
    the subnormal 1.0014e-5. They are float32 buffers now, as ConvSparseCoding's fixed values, also after .half(),
    and the float16 network's codes match the float64 one's by the half-precision rule. n_iter=0: the encoding
    G_j = S(c W_j^T G_{j-1}) alone, which eager PyTorch writes as two convolutions."""
    torch.manual_seed(0)
    build = dict(kernel_sizes=[3, 3], paddings=1, n_iter=0, learn_steps=False, step=1e-5, nonneg=False)
    exact = MultiLayerSparseCoding2d([3, 4, 5], **build, dtype=torch.float64)
    if made == "half()":
        half = MultiLayerSparseCoding2d([3, 4, 5], **build).half()
    else:
        half = MultiLayerSparseCoding2d([3, 4, 5], **build, dtype=torch.float16)
    half.load_state_dict(exact.state_dict())
    assert [half.step_0.dtype, half.step_1.dtype] == [torch.float32] * 2 and float(half.step_0) == pytest.approx(1e-5)
    x = 1000 * torch.randn(2, 3, 9, 9, dtype=torch.float64)
    (_, got), (_, want) = half(x.half()), exact(x)
    eager = x.half()
    for w in exact.weights:
        eager = F.softshrink(1e-5 * F.conv2d(eager, w.half(), padding=1), 0.0)
    assert got.dtype == torch.float16
    assert_close_by_rule(got, want, eager, name="G_2")


@pytest.mark.parametrize("backend, device", DEVICES)
def test_an_absolute_threshold_over_a_small_step_runs(backend, device):
    """threshold= runs as lam = threshold / step, which was formed in float16 too: 0.01 / 7.7e-6 = 1300 fits, but
    threshold 1 gives 1.3e5, beyond float16's 65504, and a valid call raised "threshold / step ... must fit in
    torch.float16". lam now lives in float32 (the codes are then all zero: the threshold exceeds every entry)."""
    x, w, step, _ = _problem(device)
    for threshold in (0.01, 1.0):
        z = DF.conv_ista(x, w, threshold=threshold, n_iter=2, padding=PADDING, backend=backend)
        want = DF.conv_ista(x.double(), w.double(), threshold=threshold, n_iter=2, padding=PADDING)
        assert_close_by_rule(z, want, _eager(x, w, threshold / step, step, 2), name=f"z at threshold {threshold}")


@pytest.mark.parametrize("made", ["dtype=float16", "half()"])
@pytest.mark.parametrize("nonneg", [False, True])
def test_a_half_precision_soft_threshold_equals_softshrink(made, nonneg):
    """SoftThreshold's fixed threshold was a float16 buffer: 3e-5 stored as the subnormal 2.998e-5, so the module
    differed from F.softshrink, which reads its float lambd in float32. It is a float32 buffer now, and the one-sided
    variant is max(x - t, 0) formed in float32 too (eager's x - 3e-5 would round 3e-5 to float16 first)."""
    x = 1e-4 * torch.randn(4096, generator=torch.Generator().manual_seed(0)).half()
    if made == "half()":
        module = SoftThreshold(3e-5, nonneg=nonneg).half()
    else:
        module = SoftThreshold(3e-5, nonneg=nonneg, dtype=torch.float16)
    want = F.relu(x.float() - 3e-5).half() if nonneg else F.softshrink(x, 3e-5)
    assert module.threshold.dtype == torch.float32 and torch.equal(module(x), want)


@pytest.mark.parametrize("lam_as", ["float", "tensor"])
@pytest.mark.parametrize("lam", [1e-6, 1e-7])
def test_a_float16_lasso_objective_keeps_a_small_lam_in_float32(lam, lam_as):
    """lasso_objective cast lam to float16, where 1e-7 rounds to the subnormal 1.19e-7: the l1 term came out 19% off
    at lam = 1e-7 and 1.4% at 1e-6, 70-1700x eager's error (lam * ||z||_1, a Python-float lam, formed in float32)."""
    torch.manual_seed(0)
    z = (torch.randn(2, 8, 8, 8) * 20).half()
    x, w = torch.zeros(2, 3, 10, 10, dtype=torch.float16), torch.zeros(8, 3, 3, 3, dtype=torch.float16)
    given = lam if lam_as == "float" else torch.full((8,), lam)
    l1 = z.abs().flatten(2).sum(-1)
    eager = (lam * l1).sum(-1).half()
    exact = (lam * l1.double()).sum(-1)  # x = D z = 0: the objective is the l1 term alone
    assert_close_by_rule(DF.lasso_objective(x, z, w, given), exact, eager, name="objective")


def test_a_float16_lasso_objective_whose_l1_norm_overflows_float16_is_finite():
    """||z_c||_1 was summed in float16: 1024 codes of 100 in a channel gave inf, where the objective is 20,480."""
    z = torch.full((1, 2, 32, 32), 100.0, dtype=torch.float16)
    x, w = torch.zeros(1, 1, 34, 34, dtype=torch.float16), torch.zeros(2, 1, 3, 3, dtype=torch.float16)
    assert DF.lasso_objective(x, z, w, 0.1).tolist() == [20480.0]


def _channels_last_problem(layout: str):
    """bfloat16 x (2, 2, 3, 1) and a 1 x 2 x 2 x 4 dictionary at stride (1, 6), padding (0, 3): one code column. With
    the signal or the dictionary channels-last, oneDNN's bfloat16 weight gradient (aten.convolution_backward) came
    out as garbage, off by up to 1e33 and different on every call; channels-first operands were right."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 3, 1, generator=g).to(torch.bfloat16)
    w = (torch.randn(1, 2, 2, 4, generator=g) / 3).to(torch.bfloat16)
    cl = torch.channels_last
    return (x.contiguous(memory_format=cl), w) if layout == "signal" else (x, w.contiguous(memory_format=cl))


@pytest.mark.parametrize("layout", ["signal", "dictionary"])
@pytest.mark.parametrize("op", ["conv_analysis", "conv_synthesis", "conv_ista", "ml_ista"])
def test_bfloat16_weight_gradients_of_channels_last_operands(op, layout):
    """The eager yardstick runs channels-first: an analysis (conv_ista from zero, one iteration, and ml_ista's
    initial encoding are its soft threshold / ReLU), a synthesis of the analysis' code size."""
    x, w = _channels_last_problem(layout)
    geometry = dict(stride=(1, 6), padding=(0, 3))
    step, lam = 0.5, 0.1

    def solve(a, w, eager=False):
        if op == "conv_synthesis":
            if eager:
                return F.conv_transpose2d(a, w, output_padding=(0, 3), **geometry)
            return DF.conv_synthesis(a, w, signal_size=(3, 1), **geometry)
        if eager:
            u = step * F.conv2d(a, w, **geometry)
            return u if op == "conv_analysis" else F.relu(u - step * lam) if op == "ml_ista" else F.softshrink(u, 0.05)
        if op == "conv_analysis":
            return DF.conv_analysis(a, w, **geometry) * step
        if op == "conv_ista":
            return DF.conv_ista(a, w, lam, n_iter=1, step=step, backend="reference", **geometry)
        opts = dict(n_iter=0, steps=[step], strides=[geometry["stride"]], paddings=[geometry["padding"]])
        return DF.ml_ista(a, [w], [step * lam], backend="reference", **opts)[0]

    a = x if op != "conv_synthesis" else torch.randn(2, 1, 2, 1, generator=torch.Generator().manual_seed(1)).bfloat16()
    gz = torch.randn(2, w.shape[0] if op != "conv_synthesis" else 2, 2 if op != "conv_synthesis" else 3, 1)
    gz = gz.double()
    if op == "conv_synthesis" and layout == "signal":  # the signal side of a synthesis is its incoming gradient
        gz = gz.contiguous(memory_format=torch.channels_last)

    def gradients(run, a, w):
        a, w = a.detach().requires_grad_(), w.detach().requires_grad_()
        z = run(a, w)
        return [z, *torch.autograd.grad((z * gz.to(z.dtype)).sum(), (a, w))]

    want = gradients(solve, a.double(), w.double())
    eager = gradients(lambda a, w: solve(a, w, eager=True), a.contiguous(), w.contiguous())
    for _ in range(3):  # the wrong values changed from call to call, and were sometimes right
        for name, got, b, e in zip(("z", "input", "weight"), gradients(solve, a, w), want, eager):
            assert_close_by_rule(got, b, e, name=name)


@pytest.mark.parametrize("op", ["conv_analysis", "conv_synthesis"])
def test_weight_gradients_of_channels_last_operands_under_bfloat16_autocast(op):
    """CPU autocast casts float32 operands to bfloat16 and keeps their layout, so the analysis and the synthesis met
    the same oneDNN weight gradient there (conv_ista and ml_ista run in float32 under autocast)."""
    x, w = (t.float() for t in _channels_last_problem("dictionary"))
    z = torch.randn(2, 1, 2, 1, generator=torch.Generator().manual_seed(1))
    geometry = dict(stride=(1, 6), padding=(0, 3))

    def weight_gradient(w, eager=False):
        w = w.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=w.dtype == torch.float32):
            if op == "conv_analysis":
                out = (F.conv2d if eager else DF.conv_analysis)(x.to(w.dtype), w, **geometry)
            elif eager:
                out = F.conv_transpose2d(z.to(w.dtype), w, output_padding=(0, 3), **geometry)
            else:
                out = DF.conv_synthesis(z.to(w.dtype), w, signal_size=(3, 1), **geometry)
        return torch.autograd.grad(out.sum(), w)[0]

    want, eager = weight_gradient(w.double()), weight_gradient(w.contiguous(), eager=True)
    for _ in range(3):
        assert_close_by_rule(weight_gradient(w), want, eager, name="weight")


@pytest.mark.parametrize("autocast", [False, True])
def test_bfloat16_weight_gradients_of_a_pooled_channels_last_signal(autocast):
    """adaptive_avg_pool2d of a channels-last map gives (B, C, 1, 1) with the strides (C, 1, C, C), which torch
    counts as contiguous, so contiguous() kept them and oneDNN's bfloat16 weight gradient came out garbage (off by
    1e12 to inf on 7 to 13 of 20 calls here)."""
    geometry = dict(stride=(4, 2), padding=(0, 3))
    for seed in range(10):  # the wrong values changed from call to call, and were sometimes right
        g = torch.Generator().manual_seed(seed)
        x = F.adaptive_avg_pool2d(torch.randn(2, 3, 2, 2, generator=g).contiguous(memory_format=torch.channels_last), 1)
        w = torch.randn(2, 3, 1, 5, generator=g) / 3
        assert x.stride() == (3, 1, 3, 3)

        def weight_gradient(x, w, eager=False):
            w = w.detach().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast and w.dtype == torch.float32):
                z = (F.conv2d if eager else DF.conv_analysis)(x, w, **geometry)
            return torch.autograd.grad(z.float().sum(), w)[0]

        dtype = torch.float32 if autocast else torch.bfloat16
        want = weight_gradient(x.double(), w.double())
        plain = torch.empty(x.shape, dtype=dtype).copy_(x)  # the strides (3, 1, 1, 1): torch's own error
        eager = weight_gradient(plain, w.to(dtype), eager=True)
        assert_close_by_rule(weight_gradient(x.to(dtype), w.to(dtype)), want, eager, name="weight")
