"""The C++ multi-layer pursuit backend (csrc/cpu/ml_ista.cpp) against the reference: forward and every gradient on
every case of ml_ista_problems (odd shapes, strides, FISTA, signed and negative thresholds, encoders, per-step
dictionaries, the interleaved iteration, z0, 1-D), both saving modes, float64 and float32; opcheck; torch.compile.

The extension is built at import: on CI the compiler exists, so a failed build must fail this module loudly."""

from __future__ import annotations

import pytest
import torch
from ml_ista_problems import CASES, codes_and_grads, make_problem, op_arguments, run_functional, run_row
from tolerance import assert_close_by_rule

import dsc_kernels.functional as DF
from dsc_kernels import _ext
from dsc_kernels.nn import MultiLayerSparseCoding2d
from dsc_kernels.ops import ml_ista as ml_ista_ops

_ext.load()


def _assert_close(got_codes, got, want_codes, want, rtol, atol, case):
    for a, b in zip(got_codes, want_codes):
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale, msg=lambda m: f"{case}: codes: {m}")
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name]
        if w is None:
            assert g is None or not g.any(), name
            continue
        scale = max(1.0, float(w.abs().max()))
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol * scale, msg=lambda m: f"{case}: {name}: {m}")


@pytest.mark.parametrize("recompute", [False, True], ids=["save", "recompute"])
@pytest.mark.parametrize("case", list(CASES))
def test_cpp_matches_reference_float64(case, recompute):
    problem = make_problem(case)
    want_codes, want = codes_and_grads(lambda p: run_functional(p, "reference"), problem)
    got_codes, got = codes_and_grads(lambda p: run_functional(p, "cpp", recompute=recompute), problem)
    _assert_close(got_codes, got, want_codes, want, 1e-10, 1e-10, case)


@pytest.mark.parametrize(
    "case", ["mnist-like-fista", "ml-lista", "all-free-interleaved", "1d-two-layer", "signed-step-thresholds"]
)
def test_cpp_matches_reference_float32(case):
    """Against the float64 reference: float32 rounding only (the cases keep every pre-activation away from its
    threshold by more than that, so no support flips)."""
    problem64 = make_problem(case)
    problem32 = {
        k: (
            [None if t is None else t.float() for t in v]
            if isinstance(v, list) and k != "strides" and k != "paddings" and k != "grads"
            else v.float()
            if isinstance(v, torch.Tensor)
            else v
        )
        for k, v in problem64.items()
    }
    want_codes, want = codes_and_grads(lambda p: run_functional(p, "reference"), problem64)
    got_codes, got = codes_and_grads(lambda p: run_functional(p, "cpp"), problem32)
    assert all(c.dtype == torch.float32 for c in got_codes)
    _assert_close(
        [c.double() for c in got_codes],
        {k: None if g is None else g.double() for k, g in got.items()},
        want_codes,
        want,
        1e-4,
        2e-5,
        case,
    )


def test_cpp_without_grad_saves_nothing():
    problem = make_problem("mnist-like-fista")
    with torch.no_grad():
        want = run_row(problem, "reference")
        got = run_row(problem, "cpp")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _op_inputs(case: str, checkpoint: int):
    p = make_problem(case)
    args = op_arguments(p)
    req = [t.requires_grad_() for t in (p["x"], *args["weights"], *args["thresholds"], *args["steps"])]
    assert req
    return (
        p["x"],
        args["weights"],
        args["encoder_weights"],
        args["input_encoder_weights"],
        args["thresholds"],
        args["steps"],
        args["z0"],
        args["strides"],
        args["paddings"],
        p["nonneg"],
        p["fista"],
        not p["interleaved"],
        checkpoint,
    )


@pytest.mark.parametrize("checkpoint", [1, 0])
@pytest.mark.parametrize("case", ["mixed-encoders", "z0-fista", "all-free-interleaved"])
def test_cpp_ops_pass_opcheck(case, checkpoint):
    pair = ml_ista_ops.op_pair("cpp")
    inputs = _op_inputs(case, checkpoint)
    torch.library.opcheck(pair.forward, inputs)
    codes, saved = pair.forward(*inputs)
    grads = [torch.randn_like(c) for c in codes]
    grads[0] = grads[0].new_empty(0)  # a layer no gradient reached

    def detached(v):  # the backward op is not differentiable itself (double backward raises)
        if isinstance(v, (list, tuple)):
            return [t.detach() if torch.is_tensor(t) else t for t in v]
        return v.detach() if torch.is_tensor(v) else v

    bwd_inputs = (grads, *inputs[:7], codes, saved, *inputs[7:])
    torch.library.opcheck(pair.backward, tuple(detached(v) for v in bwd_inputs))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("mode", ["ml-fista", "interleaved"])
def test_module_compiles_with_fullgraph(mode, backend):
    torch.manual_seed(0)
    net = MultiLayerSparseCoding2d(
        [1, 3, 4],
        [4, 3],
        strides=[2, 1],
        n_iter=2,
        mode=mode,
        bias=-0.01,
        untied_unfoldings=mode == "interleaved",
        backend=backend,
        dtype=torch.float64,
    )
    x = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    eager = net(x)
    eager_grads = torch.autograd.grad(sum(c.sum() for c in eager), list(net.parameters()))
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")(x)
    compiled_grads = torch.autograd.grad(sum(c.sum() for c in compiled), list(net.parameters()))
    for a, b in zip(compiled + list(compiled_grads), eager + list(eager_grads)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("checkpoint", [0, 1, 2, 3])
def test_cpp_every_saving_mode_gives_the_same_gradients(checkpoint):
    """checkpoint c >= 1 saves layers c-1.. (the backward recomputes the codes of the others), 0 the deepest only."""
    problem = make_problem("mnist-like-fista")
    want_codes, want = codes_and_grads(lambda p: run_functional(p, "reference"), problem)
    inputs = list(_op_inputs("mnist-like-fista", checkpoint))
    leaves = [inputs[0], *inputs[1], *inputs[4], *inputs[5]]
    codes, saved = ml_ista_ops.op_pair("cpp").forward(*inputs)
    assert len(saved) == {0: 1, 1: 3, 2: 2, 3: 1}[checkpoint]
    g = torch.Generator().manual_seed(1)
    loss = sum((c * torch.randn(c.shape, generator=g, dtype=torch.float64)).sum() for c in codes)
    grads = torch.autograd.grad(loss, leaves)
    names = [
        "x",
        *[f"weights[{j}]" for j in range(3)],
        *[f"thresholds[{j}]" for j in range(3)],
        *[f"steps[{j}]" for j in range(3)],
    ]
    for name, got in zip(names, grads):
        w = want[name]
        got = got if got.shape == w.shape else got.sum(0)  # canonical per-step / shared stacks -> the user's shape
        torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_recompute_keeps_less_for_the_backward():
    """Save mode keeps every layer's code iterates; recompute mode only the deepest layer's."""
    problem = make_problem("mnist-like-fista")
    kept = {}
    for recompute in (False, True):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run_functional({**problem, "x": problem["x"].clone().requires_grad_()}, "cpp", recompute=recompute)
        kept[recompute] = sum(sizes)
    assert kept[True] < kept[False]


def test_auto_picks_cpp_for_float_cpu_tensors():
    from dsc_kernels import ops

    assert ops.select("ml_ista", "auto", torch.device("cpu"), torch.float32).name == "cpp"
    assert ops.select("ml_ista", "auto", torch.device("cpu"), torch.bfloat16).name == "reference"
    assert "cpp" in ops.available("ml_ista", "cpu") and DF.available_backends("cpu")


@pytest.mark.parametrize("recompute", [False, True], ids=["save", "recompute"])
@pytest.mark.parametrize("fista", [False, True], ids=["ista", "fista"])
@pytest.mark.parametrize(
    "x_shape, weight_shapes",
    [
        pytest.param((2, 0, 8, 8), [(3, 0, 3, 3), (4, 3, 3, 3)], id="no-signal-channels"),
        pytest.param((2, 3, 8, 8), [(0, 3, 3, 3), (4, 0, 3, 3)], id="empty-middle-layer"),
        pytest.param((2, 3, 8, 8), [(4, 3, 3, 3), (0, 4, 3, 3)], id="empty-deepest-layer"),
        pytest.param((2, 2, 9), [(0, 2, 3), (3, 0, 2)], id="1d-empty-layer"),
    ],
)
def test_cpp_layers_without_channels_give_the_reference(x_shape, weight_shapes, fista, recompute):
    """Codes after an empty layer are sigma(-t), not zero (negative ReLU thresholds here): the values and every
    gradient must be the reference's."""
    torch.manual_seed(0)
    x = torch.randn(x_shape, dtype=torch.float64)
    weights = [torch.randn(s, dtype=torch.float64) for s in weight_shapes]
    thresholds = [torch.full((s[0],), -0.3, dtype=torch.float64) for s in weight_shapes]
    results = []
    for backend in ("reference", "cpp"):
        leaves = [t.clone().requires_grad_() for t in (x, *weights, *thresholds)]
        depth = len(weights)
        codes = DF.ml_ista(
            leaves[0],
            leaves[1 : 1 + depth],
            leaves[1 + depth :],
            n_iter=2,
            steps=[0.2] * depth,
            fista=fista,
            nonneg=True,
            backend=backend,
            recompute=recompute,
        )
        sum((c * torch.linspace(-1, 1, c.numel(), dtype=c.dtype).view_as(c)).sum() for c in codes).backward()
        results.append(([c.detach() for c in codes], [t.grad for t in leaves]))
    (want_codes, want_grads), (got_codes, got_grads) = results
    assert any(c.numel() and c.abs().sum() > 0 for c in want_codes)
    for got, want in zip(got_codes + got_grads, want_codes + want_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shapes", [((0, 2, 5), [(3, 2, 5)]), ((0, 1, 6, 6), [(2, 1, 3, 3), (3, 2, 4, 4)])])
@pytest.mark.parametrize("n_iter", [0, 2])
def test_cpp_empty_batch_through_a_one_pixel_layer(shapes, n_iter):
    """A layer whose kernel covers its map runs as a matrix product; its reshape({B, -1}) could not infer -1 next to
    an empty batch, so ml_ista raised where the reference returns empty codes."""
    x_shape, weight_shapes = shapes
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    weights = [(0.3 * torch.randn(s, dtype=torch.float64)).requires_grad_() for s in weight_shapes]
    want = DF.ml_ista(x, weights, [0.1] * len(weights), n_iter=n_iter, backend="reference")
    got = DF.ml_ista(x, weights, [0.1] * len(weights), n_iter=n_iter, backend="cpp")
    assert [g.shape for g in got] == [w.shape for w in want]
    grads = torch.autograd.grad(sum(g.sum() for g in got), [x, *weights], allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


@pytest.mark.parametrize("x_shape,weight_shape", [((0, 2, 9), (3, 2, 3)), ((0, 2, 7, 6), (3, 2, 3, 2))])
@pytest.mark.parametrize("recompute", [False, True])
def test_cpp_empty_batch_z0_gets_a_gradient_of_its_shape(x_shape, weight_shape, recompute):
    """An empty batch's z0 (0, C_L, *Sz) has no entries, which the cpp op read as "no z0" and answered with a (0,)
    gradient: autograd raised "returned an invalid gradient ... got [0] but expected shape compatible with
    [0, 3, ...]" where the reference gives a zero gradient of z0's shape."""
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    w = 0.3 * torch.randn(weight_shape, dtype=torch.float64)
    code_size = [n - k + 1 for n, k in zip(x_shape[2:], weight_shape[2:])]
    for backend in ("reference", "cpp"):
        z0 = torch.zeros(0, weight_shape[0], *code_size, dtype=torch.float64, requires_grad=True)
        (code,) = DF.ml_ista(x, [w], [0.1], n_iter=2, z0=z0, fista=True, backend=backend, recompute=recompute)
        grad_x, grad_z0 = torch.autograd.grad(code.sum(), (x, z0))
        assert grad_x.shape == x.shape and grad_z0.shape == z0.shape


@pytest.mark.parametrize("nonneg", [False, True])
def test_cpp_nan_codes_get_the_threshold_gradient_autograd_gives(nonneg):
    """A NaN code is active, and counts sign 0 in a signed threshold's gradient and 1 in relu(u - t)'s: cpp skipped
    it in the nonneg sum (dL/dt -3.2 where the reference gives -37.5)."""
    out = {}
    for backend in ("reference", "cpp"):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 1, 5, 5, dtype=torch.float64, generator=g)
        x[0, 0, 2, 2] = float("nan")
        w = 0.3 * torch.randn(2, 1, 3, 3, dtype=torch.float64, generator=g)
        t = torch.full((2,), 0.05, dtype=torch.float64, requires_grad=True)
        (code,) = DF.ml_ista(x, [w], [t], n_iter=2, paddings=[1], nonneg=nonneg, backend=backend)
        out[backend] = (code, *torch.autograd.grad(code.sum(), t))
    for a, b in zip(out["cpp"], out["reference"]):
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(fista=True),
        dict(interleaved=True),
        dict(input_encoders=True),
        dict(signal_unread=True),
    ],
    ids=["ml-ista", "ml-fista", "interleaved", "input-encoders", "unread-signal-entry"],
)
def test_cpp_step_gradients_ignore_entries_a_layer_never_reads(variant):
    """Layer 1 (kernel 2, stride 2) never reads row and column 2 of layer 0's 3 x 3 code, where a NaN in x puts a NaN.
    cpp formed dL/dstep as <synthesis(gu), code below>, 0 * NaN there: NaN where the reference and autograd, which
    only form <gu, analysis(code below)>, give -0.368 (ml-ista). Also x itself, now left unzeroed on the Python side
    (signal_unread: a 2 x 2 stride-2 first layer that never reads x's last row and column)."""
    out = {}
    for backend in ("reference", "cpp"):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 1, 3, 3, dtype=torch.float64, generator=g)
        x[0, 0, 2, 2] = float("nan")
        w = [
            torch.randn(2, 1, 1, 1, dtype=torch.float64, generator=g),
            torch.randn(2, 2, 2, 2, dtype=torch.float64, generator=g),
        ]
        strides = [1, 2]
        if variant.get("signal_unread"):
            w, strides = w[1:2], [2]
            w[0] = w[0][:, :1].contiguous()
        steps = [torch.tensor(0.5, dtype=torch.float64, requires_grad=True) for _ in w]
        encoders = [u.clone() for u in w] if variant.get("input_encoders") else None
        codes = DF.ml_ista(
            x,
            w,
            [0.0] * len(w),
            n_iter=1,
            steps=steps,
            strides=strides,
            nonneg=False,
            fista=variant.get("fista", False),
            interleaved=variant.get("interleaved", False),
            input_encoder_weights=encoders,
            backend=backend,
        )
        out[backend] = torch.autograd.grad(codes[-1].sum(), steps)
    assert out["cpp"][-1].isfinite()  # the last layer's step: its dot meets the unread NaN (layer 0's is NaN anyway)
    for a, b in zip(out["cpp"], out["reference"]):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_compile_dynamic_1d():
    """torch.compile(dynamic=True) of a 1-D pursuit whose code width is L - k + 1: inductor failed it ("Exponent must
    be non-negative") until the op's fake specialised the kernel sizes, as conv-ISTA's does; a new kernel size
    recompiles, everything else stays dynamic."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    f = torch.compile(
        lambda x, w: DF.ml_ista(x, [w], [0.05], n_iter=2, steps=[0.3], backend="cpp"), fullgraph=True, dynamic=True
    )
    for batch, length, k in ((2, 11, 3), (3, 16, 3), (2, 13, 4)):
        x = torch.randn(batch, 2, length, dtype=torch.float64, generator=g).requires_grad_()
        w = (0.3 * torch.randn(3, 2, k, dtype=torch.float64, generator=g)).requires_grad_()
        (z,) = f(x, w)
        z.square().sum().backward()
        x_ref, w_ref = (t.detach().clone().requires_grad_() for t in (x, w))
        (want,) = DF.ml_ista(x_ref, [w_ref], [0.05], n_iter=2, steps=[0.3], backend="reference")
        want.square().sum().backward()
        for got, expected in ((z, want), (x.grad, x_ref.grad), (w.grad, w_ref.grad)):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_float32_step_gradients_within_the_tolerance_rule():
    """dL/dsteps sums <E gu, residual> over the whole signal at every step. The C++ backward took that dot with
    BLAS's float32 dot, which accumulates in float32: 5x eager float32's error at seed 0 here. The thresholds
    are 0, so no code crosses a kink between float32 and float64 and the error is summation alone."""
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(32, 3, 49, 49, generator=g, dtype=torch.float64)
        weights = [torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64) / 7]
        weights.append(torch.randn(16, 8, 3, 3, generator=g, dtype=torch.float64) / 8.5)
        grad_out = None

        def step_grads(backend, dtype):
            nonlocal grad_out
            steps = [torch.full((21,), 0.3, dtype=dtype, requires_grad=True) for _ in range(2)]
            codes = DF.ml_ista(
                x.to(dtype),
                [w.to(dtype) for w in weights],
                [torch.zeros(8, dtype=dtype), torch.zeros(16, dtype=dtype)],
                n_iter=20,
                steps=steps,
                strides=[2, 1],
                nonneg=False,
                backend=backend,
            )
            if grad_out is None:
                grad_out = [torch.randn(c.shape, generator=g, dtype=torch.float64) for c in codes]
            sum((c.double() * go).sum() for c, go in zip(codes, grad_out)).backward()
            return [s.grad for s in steps]

        want = step_grads("reference", torch.float64)
        eager = step_grads("reference", torch.float32)  # autograd through PyTorch's float32 convolutions
        got = step_grads("cpp", torch.float32)
        for j in range(2):
            assert_close_by_rule(got[j], want[j], eager[j], name=f"seed {seed} dL/dsteps[{j}]")
