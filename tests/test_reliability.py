"""No crash and no silent wrong answer on edge inputs of the functional API: non-finite or signed parameters,
mixed dtypes, bad flags, padding words, zero-size batches, double backward, meta tensors, torch.compile with the
default step, and thresholds given as biases."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import dsc_kernels.functional as DF
from dsc_kernels.nn import ConvSparseCoding2d
from dsc_kernels.reference import conv_ista_ref

X = torch.randn(2, 3, 10, 10, dtype=torch.float64)
W = torch.randn(4, 3, 3, 3, dtype=torch.float64) * 0.3


def fused_backends():
    return [b for b in DF.available_backends("cpu") if b != "triton"]


@pytest.mark.parametrize("name", ["lam", "step", "threshold"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_parameters_are_rejected(name, bad):
    base = dict(lam=0.1, step=0.05) if name != "threshold" else dict(threshold=0.1, step=0.05)
    as_tensor = torch.full((2,) if name == "step" else (4,), 0.1, dtype=torch.float64)
    as_tensor[1] = bad
    for value in (bad, as_tensor):
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            DF.conv_ista(X, W, n_iter=2, padding=1, backend="reference", **{**base, name: value})


def test_attention_scale_and_threshold_must_be_finite():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="scale must be finite"):
        DF.sparse_attention(q, q, q, scale=float("nan"), backend="reference")
    with pytest.raises(ValueError, match="threshold must be finite"):
        DF.sparse_attention(q, q, q, mode="shrink", threshold=float("inf"), backend="reference")
    with pytest.raises(ValueError, match="head dim"):
        DF.sparse_attention(q[..., :0], q[..., :0], q[..., :0], backend="reference")


@pytest.mark.parametrize("flag", ["nonneg", "fista", "recompute"])
def test_flags_must_be_bools(flag):
    with pytest.raises(TypeError, match=f"{flag} must be True or False"):
        DF.conv_ista(X, W, 0.1, n_iter=1, padding=1, backend="reference", **{flag: "no"})


def test_mixed_dtypes_are_rejected_by_the_conv_operators():
    with pytest.raises(TypeError, match="share one dtype"):
        DF.conv_analysis(X.float(), W, padding=1)
    with pytest.raises(TypeError, match="share one dtype"):
        DF.conv_synthesis(torch.randn(2, 4, 10, 10), W, padding=1, signal_size=(10, 10))
    with pytest.raises(TypeError, match="share one dtype"):
        DF.lasso_objective(X, torch.randn(2, 4, 10, 10), W, 0.1, padding=1)


def test_soft_threshold_matches_softshrink_everywhere_and_keeps_the_dtype():
    x = torch.tensor([float("nan"), 0.5, -0.5, -2.0, 1.0, 0.2], requires_grad=True)
    y = DF.soft_threshold(x, 0.5)
    (g,) = torch.autograd.grad(y.sum(), x)
    x2 = x.detach().clone().requires_grad_()
    y2 = F.softshrink(x2, 0.5)
    (g2,) = torch.autograd.grad(y2.sum(), x2)
    torch.testing.assert_close(y, y2, equal_nan=True)
    torch.testing.assert_close(g, g2)
    t64 = torch.tensor([0.5], dtype=torch.float64)
    assert DF.soft_threshold(x.detach(), t64).dtype == torch.float32
    # with nonneg a negative threshold is a ReLU with a positive bias
    torch.testing.assert_close(
        DF.soft_threshold(x.detach(), -0.5, nonneg=True), torch.relu(x.detach() + 0.5), equal_nan=True
    )


def test_lipschitz_constant_of_a_zero_dictionary_is_zero_and_its_default_step_runs():
    zero = torch.zeros(4, 3, 3, 3)
    assert DF.lipschitz_constant(zero, (10, 10), padding=1) == 0.0
    z = DF.conv_ista(X.float(), zero, 0.1, n_iter=3, padding=1, backend="reference")
    assert torch.equal(z, torch.zeros_like(z))


@pytest.mark.parametrize("padding,expected", [("same", (10, 10)), ("valid", (8, 8))])
def test_padding_words(padding, expected):
    z = DF.conv_ista(X, W, 0.1, n_iter=2, padding=padding, backend="reference")
    assert z.shape[2:] == expected
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        DF.conv_ista(X, W, 0.1, n_iter=2, padding="same", stride=2, backend="reference")
    with pytest.raises(ValueError, match="padding must be an int, a sequence of ints, 'same' or 'valid'"):
        DF.conv_analysis(X, W, padding="full")


def test_the_step_warning_fires_just_above_two_over_the_largest_atom_norm():
    """The bound is 2 / max_c ||w_c||^2 (an atom inside the signal is a code with ||D e||^2 = ||w_c||^2): computed
    here from the taps, a step 1.5x above it must warn and one 1% below must not (a bound loosened to 4/L passed
    the 10x-too-large step of the test above)."""
    bound = 2.0 / float((W**2).sum(dim=(1, 2, 3)).max())
    with pytest.warns(RuntimeWarning, match="above 2/L"):
        DF.conv_ista(X, W, 0.1, n_iter=1, padding=1, step=1.5 * bound, backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DF.conv_ista(X, W, 0.1, n_iter=1, padding=1, step=0.99 * bound, backend="reference")


def test_a_step_above_two_over_L_warns():
    with pytest.warns(RuntimeWarning, match="above 2/L") as record:
        DF.conv_ista(X, W, 0.1, n_iter=2, padding=1, step=10.0, backend="reference")
    with pytest.warns(RuntimeWarning, match="above 2/L") as deep:
        DF.deep_conv_ista(X, [W], [0.1], n_iter=2, paddings=[1], steps=[10.0], backend="reference")
    # both attributed to this file: from deep_conv_ista, a fixed stacklevel pointed at functional.py
    assert record[0].filename == deep[0].filename == __file__
    with pytest.warns(RuntimeWarning, match="above 2/L"):  # the input-encoder variant (ML-LISTA's step) was silent
        DF.conv_ista(X, W, 0.1, n_iter=2, padding=1, step=10.0, input_encoder_weight=W, backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DF.conv_ista(X, W, 0.1, n_iter=2, padding=1, input_encoder_weight=W, backend="reference")
        DF.conv_ista(X, W.expand(2, *W.shape), 0.1, n_iter=2, padding=1, step=10.0, backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DF.conv_ista(X, W, 0.1, n_iter=2, padding=1, backend="reference")


def test_the_step_warning_is_silent_for_an_untied_encoder_that_converges():
    """2 / max_c ||w_c||^2 bounds ISTA's step only where E = D^T: with an untied E the iteration's linear part is
    I - step E D. E = 0.01 W makes E D = 0.01 D^T D, so at 1.5x the bound step ||E D|| = 0.09 here (< 2) and the
    steps z_{n+1} - z_n shrink instead of growing: "ISTA diverges with it" was false; an encoder equal to the
    dictionary still warns."""
    step = 1.5 * 2.0 / float((W**2).sum(dim=(1, 2, 3)).max())
    kwargs = {"step": step, "padding": 1, "encoder_weight": 0.01 * W, "backend": "reference"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moves = []
        for n in (50, 400):
            z = DF.conv_ista(X, W, 0.0, n_iter=n, **kwargs)
            moves.append(float((DF.conv_ista(X, W, 0.0, n_iter=1, z0=z, **kwargs) - z).norm()))
        DF.conv_ista(X, W, 0.0, n_iter=2, input_encoder_weight=W, **kwargs)
    assert moves[1] < moves[0]
    for extra in ({}, {"input_encoder_weight": W}):
        with pytest.warns(RuntimeWarning, match="above 2/L"):
            DF.conv_ista(X, W, 0.1, n_iter=1, **{**kwargs, "encoder_weight": W.clone()}, **extra)


def test_empty_spatial_size_is_one_clear_error_on_every_backend():
    for backend in ["reference", *fused_backends()]:
        with pytest.raises(ValueError, match="empty spatial size"):
            DF.conv_ista(torch.randn(4, 3, 4, 0), W.float(), 0.1, n_iter=2, padding=2, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpp", "auto"])
def test_zero_batch_gives_the_empty_code(backend):
    if backend != "auto" and backend not in DF.available_backends("cpu"):
        pytest.skip(DF.backend_unavailable_reason(backend, "cpu"))
    x = torch.randn(0, 3, 9, 8, requires_grad=True)
    z = DF.conv_ista(x, W.float(), 0.1, n_iter=3, padding=1, backend=backend)
    assert z.shape == (0, 4, 9, 8)
    z.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", ["cpp"])
def test_double_backward_through_a_fused_backend_raises_naming_the_reference(backend):
    if backend not in DF.available_backends("cpu"):
        pytest.skip(DF.backend_unavailable_reason(backend, "cpu"))
    x = X.clone().requires_grad_()
    z = DF.conv_ista(x, W, 0.1, n_iter=2, step=0.05, padding=1, backend=backend)
    (g,) = torch.autograd.grad(z.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="backend='reference'"):
        g.sum().backward()
    # the reference supports it
    x = X.clone().requires_grad_()
    z = DF.conv_ista(x, W, 0.1, n_iter=2, step=0.05, padding=1, backend="reference")
    (g,) = torch.autograd.grad(z.square().sum(), x, create_graph=True)
    g.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_meta_tensors_run_through_validation():
    x, w = torch.empty(2, 3, 10, 10, device="meta"), torch.empty(4, 3, 3, 3, device="meta")
    lam = torch.empty(4, device="meta")
    z = DF.conv_ista(x, w, lam, n_iter=2, padding=1, backend="reference")
    assert z.shape == (2, 4, 10, 10) and z.device.type == "meta"


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("real_inputs", [False, True])
def test_fake_tensors_propagate_shapes_through_every_function(backend, real_inputs):
    """Under a FakeTensorMode (shape propagation outside torch.compile) the checks and the default step read values,
    and every function raised DataDependentOutputException instead of giving the output's shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=real_inputs):
        x, w = torch.randn(2, 2, 9, 7), torch.randn(3, 2, 3, 3, requires_grad=True)
        x1, w1 = torch.randn(2, 2, 11), torch.randn(3, 2, 4)
        q = torch.randn(2, 3, 5, 4)
        shapes = [
            DF.conv_ista(x, w, torch.rand(3), n_iter=2, stride=2, padding=1, backend=backend).shape,
            DF.conv_ista(x1, w1, 0.1, n_iter=2, step=0.3, stride=3, padding=2, backend=backend).shape,
            DF.ml_ista(x, [w], [0.1], n_iter=2, strides=[(1, 2)], paddings=[1], backend=backend)[0].shape,
            DF.sparse_attention(q, q, q, mode="shrink", threshold=torch.rand(3), backend=backend).shape,
            DF.soft_threshold(x, torch.rand(2, 1, 1)).shape,
            DF.lasso_objective(x1, torch.randn(2, 3, 8), w1, torch.rand(3)).shape,
        ]
    assert shapes == [(2, 3, 5, 4), (2, 3, 4), (2, 3, 9, 4), (2, 3, 5, 4), (2, 2, 9, 7), (2,)]


def test_functions_that_need_values_name_a_fake_tensor():
    """The functions that return values (floats, counts) refuse a meta tensor by name; a fake one (FakeTensorMode)
    passed their meta-only guards and failed inside, naming nothing: DataDependentOutputException (lipschitz_constant,
    zero_fraction, mutual_coherence, stripe_sparsity) or ".numpy() is not supported for tensor subclasses" (spark,
    the theory bounds' array arguments)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dsc_kernels import sparsity, theory

    with FakeTensorMode():
        w, code = torch.randn(3, 1, 3, 3), torch.randn(2, 3, 6, 6)
        calls = {
            "weight": lambda: DF.lipschitz_constant(w, (8, 8)),
            "t": lambda: sparsity.zero_fraction(code),
            "weight ": lambda: theory.mutual_coherence(w, (8, 8)),
            "matrix": lambda: theory.spark(torch.randn(4, 3)),
            "code": lambda: theory.stripe_sparsity(code, 3),
            "k": lambda: theory.lista_cp_error_bound(torch.arange(3), 1, 1.0, 0.5, 1.0, 0.0),
        }
        for name, call in calls.items():
            with pytest.raises(ValueError, match=f"^{name.strip()} is a fake tensor"):
                call()


@pytest.mark.parametrize("training", [True, False])
def test_layers_built_under_a_fake_tensor_mode_give_shapes(training):
    """A model built under a FakeTensorMode (memory estimates, sharding plans) raised DataDependentOutputException in
    the conv sparse-coding layers' constructor (the learned step's floor), their training forward (the adaptive
    power iteration, the all-zero-codes check) and their repr."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dsc_kernels.nn import ConvSparseCoding1d, DeepSparseCoding2d, SoftThreshold, SparseAttention

    with FakeTensorMode():
        layers = [
            ConvSparseCoding2d(2, 5, 3, padding=1, learn_step=True),
            ConvSparseCoding1d(2, 5, 3, stride=2, fista=True, learn_lam=True),
            DeepSparseCoding2d([2, 4, 5], [3, 3]),
            SoftThreshold(0.2),
            SparseAttention(6, 2, kdim=3),  # its constructor raised "_apply(): Couldn't swap Linear.weight"
        ]
        x, x1 = torch.randn(3, 2, 9, 7, requires_grad=True), torch.randn(3, 2, 11)
        q, k = torch.randn(4, 3, 6), torch.randn(5, 3, 3)
        shapes = []
        for layer, inputs in zip(layers, ((x,), (x1,), (x,), (x,), (q, k, q[:1].expand(5, 3, 6)))):
            layer.train(training)
            out = layer(*inputs)
            out = out[0] if isinstance(out, tuple) else out  # SparseAttention: (out, weights)
            out = out[-1] if isinstance(out, list) else out  # DeepSparseCoding2d: every layer's code
            if training:
                out.sum().backward()
            shapes.append(tuple(out.shape))
            assert repr(layer)
    assert shapes == [(3, 5, 9, 7), (3, 5, 6), (3, 5, 9, 7), (3, 2, 9, 7), (4, 3, 6)]


def test_default_step_under_fullgraph_compile():
    x, w = X.float(), W.float()

    def run(x, w):
        return DF.conv_ista(x, w, 0.1, n_iter=3, padding=1, backend="reference")

    torch.testing.assert_close(
        torch.compile(run, fullgraph=True, backend="aot_eager")(x, w), run(x, w), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("how", ["no_grad", "data", "assign_data"])
def test_default_step_follows_an_in_place_change_of_the_weight(how):
    """A write through ``.data`` does not bump the version counter, which the cached 1/L used to key on: the old
    step was reused silently (ISTA then diverged after a weight was scaled up)."""
    w = W.clone()
    before = DF.conv_ista(X, w, 0.0, n_iter=1, padding=1, backend="reference")
    if how == "no_grad":
        with torch.no_grad():
            w.mul_(2.0)
    elif how == "data":
        w.data.mul_(2.0)
    else:
        w.data = 2.0 * W
    after = DF.conv_ista(X, w, 0.0, n_iter=1, padding=1, backend="reference")
    # one step from zero with step 1/L: z_1 = D^T x / L; doubling D doubles D^T x and quadruples L
    torch.testing.assert_close(after, before / 2, rtol=1e-3, atol=1e-8)


def test_default_step_of_an_inference_tensor():
    """Inference tensors have no version counter; the default step used to raise on reading it."""
    with torch.inference_mode():
        w = W.clone()
        inside = DF.conv_ista(X, w, 0.1, n_iter=3, padding=1)
    outside = DF.conv_ista(X, w, 0.1, n_iter=3, padding=1)
    want = DF.conv_ista(X, W.clone(), 0.1, n_iter=3, padding=1)
    torch.testing.assert_close(inside, want)
    torch.testing.assert_close(outside, want)


# ------------------------------------------------------------------------------------- thresholds as biases
@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("shape", [(), (4,), (3, 4)])
def test_absolute_thresholds_equal_lam_times_step(backend, shape):
    if backend not in DF.available_backends("cpu"):
        pytest.skip(DF.backend_unavailable_reason(backend, "cpu"))
    step = torch.tensor([0.05, 0.08, 0.06], dtype=torch.float64)
    threshold = (torch.rand(shape, dtype=torch.float64) * 0.05).requires_grad_()
    z = DF.conv_ista(X, W, threshold=threshold, n_iter=3, step=step, padding=1, backend=backend)
    lam = threshold.detach().expand(3, 4) / step[:, None]
    want = conv_ista_ref(X, W, lam, step, padding=1)
    torch.testing.assert_close(z, want, rtol=1e-10, atol=1e-12)
    z.sum().backward()
    assert threshold.grad.shape == threshold.shape and torch.isfinite(threshold.grad).all()


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_negative_thresholds_are_relu_biases_with_nonneg(backend):
    if backend not in DF.available_backends("cpu"):
        pytest.skip(DF.backend_unavailable_reason(backend, "cpu"))
    threshold = torch.tensor([-0.02, 0.03, -0.01, 0.0], dtype=torch.float64, requires_grad=True)
    x = X.clone().requires_grad_()
    z = DF.conv_ista(x, W, threshold=threshold, n_iter=3, step=0.05, padding=1, nonneg=True, backend=backend)
    # the same recurrence written out by hand: z <- relu(z + step D^T(x - D z) - t)
    want = torch.zeros_like(z)
    for _ in range(3):
        r = x - F.conv_transpose2d(want, W, padding=1)
        want = torch.relu(want + 0.05 * F.conv2d(r, W, padding=1) - threshold.view(1, -1, 1, 1))
    torch.testing.assert_close(z, want, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(z)
    got = torch.autograd.grad(z, (x, threshold), g)
    exp = torch.autograd.grad(want, (x, threshold), g)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_threshold_errors():
    with pytest.raises(ValueError, match="exactly one of lam"):
        DF.conv_ista(X, W, 0.1, threshold=0.1, n_iter=1, padding=1)
    with pytest.raises(ValueError, match="exactly one of lam"):
        DF.conv_ista(X, W, n_iter=1, padding=1)
    with pytest.raises(ValueError, match="negative thresholds need nonneg=True"):
        DF.conv_ista(X, W, threshold=-0.1, n_iter=1, padding=1)


def _run_in_fresh_process(script: str, **env_overrides: str):
    """``script`` run by a new interpreter on this source tree, TRITON_INTERPRET unset (a CompletedProcess)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parent.parent), **env_overrides)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)


def test_setting_triton_interpret_after_import_is_a_clear_error():
    script = (
        "import os, torch, dsc_kernels.functional as DF\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "try:\n"
        "    DF.conv_ista(torch.randn(1, 1, 8, 8), torch.randn(2, 1, 3, 3), 0.1, n_iter=1, backend='triton')\n"
        "except RuntimeError as err:\n"
        "    print(err)\n"
    )
    out = _run_in_fresh_process(script, CUDA_VISIBLE_DEVICES="")
    assert "TRITON_INTERPRET changed after" in out.stdout, out.stdout + out.stderr[-2000:]


def test_compile_fullgraph_of_a_training_step_in_a_fresh_process():
    # The first call of a process resolves the table's Python paths (the cpp row's residual policy among them);
    # inside a torch.compile trace that import used to be an Unsupported graph break.
    script = (
        "import torch\n"
        "from dsc_kernels.nn import ConvSparseCoding2d\n"
        "layer = ConvSparseCoding2d(2, 3, 3, n_iter=2, backend='cpp')\n"
        "x = torch.randn(2, 2, 7, 7, requires_grad=True)\n"
        "torch.compile(layer, fullgraph=True, backend='aot_eager')(x).sum().backward()\n"
        "print('compiled', tuple(layer.weight.grad.shape))\n"
    )
    out = _run_in_fresh_process(script)
    assert "compiled (3, 2, 3, 3)" in out.stdout, out.stdout + out.stderr[-2000:]


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("half", [False, True], ids=["float32-inputs", "bfloat16-signal"])
@pytest.mark.parametrize("family", ["conv_ista", "ml_ista", "sparse_attention"])
def test_ops_under_bfloat16_autocast_compute_what_they_compute_without_it(family, half, backend):
    """One rule on every backend (docs/design.md §7): inside autocast the ops take float32 (float64 stays), run
    with autocast off and return float32. Autocast reached the oneDNN convolutions inside the C++ ops: bfloat16
    results next to float32 buffers raised ("expected scalar type Float", "ml_ista_shrink not implemented for
    BFloat16"). The reference followed autocast's own rules: bfloat16 codes and attention outputs for a bfloat16
    signal (an autocast Conv2d's output) where cpp and auto returned float32."""
    torch.manual_seed(0)
    if family == "sparse_attention":
        inputs = [torch.randn(2, 2, 5, 4, requires_grad=True) for _ in range(3)]
        run = lambda q, k, v: DF.sparse_attention(q, k, v, backend=backend)  # noqa: E731
    else:
        inputs = [torch.randn(2, 2, 9, 8, requires_grad=True), torch.randn(3, 2, 3, 3, requires_grad=True)]
        if family == "conv_ista":
            run = lambda x, w: DF.conv_ista(x, w, 0.1, n_iter=3, padding=1, backend=backend)  # noqa: E731
        else:
            run = lambda x, w: DF.ml_ista(x, [w], [0.1], n_iter=2, paddings=[1], backend=backend)[-1]  # noqa: E731
    if half:  # the signal (or the queries) as an autocast layer hands it on
        inputs[0] = inputs[0].detach().bfloat16().requires_grad_()

    def outputs(*leaves):
        out = run(*leaves)
        return (out, *torch.autograd.grad(out.square().sum(), leaves))

    plain = outputs(*(t.detach().float().requires_grad_() for t in inputs))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if backend == "cpp":  # the backward op too has the float32 rule
            autocast = outputs(*inputs)
        else:  # eager autograd's backward ops follow the region they run in: backward outside it, as torch advises
            out = run(*inputs)
    if backend != "cpp":
        autocast = (out, *torch.autograd.grad(out.square().sum(), inputs))
    assert autocast[0].dtype == torch.float32
    for a, b, leaf in zip(autocast, plain, (autocast[0], *inputs)):
        assert a.dtype == leaf.dtype  # gradients in their inputs' dtypes
        torch.testing.assert_close(a, b.to(a.dtype), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
def test_attention_weights_under_autocast_are_the_map_sparse_attention_applies(mode):
    """sparse_attention_weights documents the P of sparse_attention with the same arguments (need_weights=True).
    Inside autocast sparse_attention computes in float32 on the given values, but the weights followed autocast's
    own rules: bfloat16 scores, a map 0.034 off the applied one with 4 entries of another support (64 x 64, d=32)."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 64, 32) * 2, torch.randn(1, 2, 64, 32) * 2
    identity = torch.eye(64).expand(1, 2, 64, 64)  # O = P I = P
    threshold = 0.1 if mode == "shrink" else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        applied = DF.sparse_attention(q, k, identity, mode=mode, threshold=threshold, backend="reference")
        weights = DF.sparse_attention_weights(q, k, mode=mode, threshold=threshold)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, applied, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_layers_take_an_autocast_layers_half_precision_output(backend):
    """Under autocast a Conv2d before a sparse-coding layer gives bfloat16 codes to its float32 parameters, as it does
    to the next Conv2d; the dtype check raised "x, weight must share one dtype". The fused ops compute in float32
    (their autocast rule), and so does the reference: exactly the float32 run on the bfloat16 values (the reference
    followed autocast's own rules and returned bfloat16). Outside autocast, and with float64 (which autocast leaves
    alone), mixed dtypes still raise."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 9, 8)
    layer = ConvSparseCoding2d(3, 5, 3, n_iter=3, padding=1, backend=backend)
    twin = copy.deepcopy(layer)  # a training forward advances the step's power iteration
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = torch.nn.Conv2d(3, 3, 1)(x)
        assert h.dtype == torch.bfloat16
        z = layer(h)
        (weight_grad,) = torch.autograd.grad(z.float().square().sum(), layer.weight)
    plain = twin(h.detach().float())
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, plain, rtol=0, atol=0)
    assert weight_grad.dtype == torch.float32 and torch.isfinite(weight_grad).all() and weight_grad.abs().sum() > 0
    w = torch.randn(5, 3, 3, 3)
    # the multi-layer op too, its thresholds and default steps kept in float32

    def pursuit(signal):
        return DF.ml_ista(signal, [w], [0.1], n_iter=2, paddings=[1], backend=backend)[-1]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = pursuit(h.detach())
    torch.testing.assert_close(mixed, pursuit(h.detach().float()), rtol=0, atol=0)

    # a float32 encoder beside a bfloat16 dictionary keeps lam and step in float32 too
    def untied(signal, dictionary):
        return DF.conv_ista(signal, dictionary, 0.1, n_iter=2, step=0.1, padding=1, encoder_weight=w, backend=backend)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = untied(h.detach(), (0.1 * w).bfloat16())
    torch.testing.assert_close(mixed, untied(h.detach().float(), (0.1 * w).bfloat16().float()), rtol=0, atol=0)
    with pytest.raises(TypeError, match="must share one dtype"):
        DF.conv_ista(h.detach(), w, 0.1, n_iter=2, padding=1, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="must share one dtype"):
        DF.conv_ista(x.double(), w, 0.1, n_iter=2, padding=1, backend=backend)


def test_forward_tf32_pins_the_switch_in_this_thread_for_the_block_only(monkeypatch):
    # The recompute backward replays the forward at the forward's TF32 setting (_precision.py). Nothing on a CPU run
    # checked the pin: a conv_tf32_allowed that ignored it, or a block that left it set after an exception, passed.
    import threading

    from dsc_kernels._precision import conv_tf32_allowed, forward_tf32

    for switch in (True, False):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", switch)
        assert conv_tf32_allowed() is switch
        with forward_tf32(not switch):
            assert conv_tf32_allowed() is (not switch)
            assert torch.backends.cudnn.allow_tf32 is switch  # the process-wide switch is left alone
            seen = []
            other = threading.Thread(target=lambda: seen.append(conv_tf32_allowed()))
            other.start()
            other.join()
            assert seen == [switch]  # another thread (another backward) is not pinned
            with forward_tf32(switch):
                assert conv_tf32_allowed() is switch
            assert conv_tf32_allowed() is (not switch)
        assert conv_tf32_allowed() is switch
        with pytest.raises(RuntimeError, match="in the backward"):
            with forward_tf32(not switch):
                raise RuntimeError("in the backward")
        assert conv_tf32_allowed() is switch
