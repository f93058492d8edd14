"""Edge inputs of the functional conv-ISTA family found by a fuzz pass: each raises a ValueError naming the argument
before any kernel runs, or gives the reference's answer on every backend, where it had crashed the process, raised
an opaque internal error, or returned a silently wrong (or backend-dependent) answer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dsc_kernels.functional as DF
from dsc_kernels import _ext
from dsc_kernels.nn import ConvSparseCoding2d
from dsc_kernels.ops import op_pair
from dsc_kernels.reference.conv_ista import NO_BACKWARD
from tests.helpers import conv_problem

BACKENDS = [b for b in ("reference", "cpp") if b in DF.available_backends("cpu")]
needs_cpp = pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built here")


# ------------------------------------------------------------------------------------------------ soft_threshold
@pytest.mark.parametrize(
    "threshold,words",
    [
        (torch.ones(2), r"threshold of shape \(2,\) must broadcast to shape \(3,\)"),  # was torch's size mismatch
        (torch.ones(2, 3), r"threshold of shape \(2, 3\) must broadcast"),  # was a (2, 3) result for a (3,) x
        (torch.ones(3, device="meta"), "one device"),  # was "Tensor on device meta is not on the expected device"
    ],
)
def test_soft_threshold_rejects_thresholds_that_do_not_fit_x(threshold, words):
    with pytest.raises(ValueError, match=words):
        DF.soft_threshold(torch.tensor([1.0, 2.0, 3.0]), threshold)


def test_soft_threshold_rejects_a_threshold_beyond_x_dtype():
    # a float raised "value cannot be converted to type c10::Half without overflow"; a tensor became inf
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16)
    for threshold in (1e6, torch.tensor(1e6)):
        with pytest.raises(ValueError, match="threshold must fit in torch.float16"):
            DF.soft_threshold(x, threshold)


@pytest.mark.parametrize("threshold", [1.0, torch.tensor(1.0), "learned"])
def test_soft_threshold_gradient_is_softshrinks_under_an_infinite_upstream_gradient(threshold):
    """x - clamp(x, -t, t) handed the zeroed entries g - g: NaN for an infinite g, where F.softshrink (and the cpp
    conv-ISTA backward) give 0."""
    if threshold == "learned":
        threshold = torch.tensor(1.0, requires_grad=True)
    inf = float("inf")
    x = torch.tensor([0.5, 2.0, -3.0, float("nan"), 1.0, -0.25], requires_grad=True)
    g = torch.tensor([inf, 1.0, -inf, 1.0, -inf, float("nan")])
    got = torch.autograd.grad(DF.soft_threshold(x, threshold), x, g)[0]
    want = torch.autograd.grad(torch.nn.functional.softshrink(x, 1.0), x, g)[0]
    torch.testing.assert_close(got, want, equal_nan=True)
    assert not got[[0, 4, 5]].isnan().any()


# -------------------------------------------------------------------------------- lasso_objective, lipschitz
def test_lasso_objective_checks_lam_device_and_range():
    x, w, z = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(2, 4, 6, 6)
    with pytest.raises(ValueError, match="one device"):  # was "Cannot copy out of meta tensor"
        DF.lasso_objective(x, z, w, torch.full((4,), 0.1, device="meta"))
    z[:, 0] = 0  # inf * a zero channel's l1 norm made the objective NaN
    with pytest.raises(ValueError, match="lam must fit in torch.float32"):
        DF.lasso_objective(x, z, w, 1e39)


@pytest.mark.parametrize(
    "dtype, size",
    [(torch.float16, 300.0), (torch.bfloat16, 2e19), (torch.float32, 2e19), (torch.float64, 1.5e154)],
)
def test_lasso_objective_whose_squares_leave_the_dtype(dtype, size):
    """0.5 ||r||^2 fits the dtype while r_i^2 does not: a float16 residual of 300 gave inf for 45,000 (float32:
    2e19 gave inf for 2e38, float64: 1.5e154 for 1.1e308); the squares are summed in a wider dtype, or of the
    residual over its largest entry in float64, and the objective rounded back."""
    w, z = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(1, 2, 6, 6)
    x = torch.zeros(1, 1, 6, 6, dtype=dtype)
    x[0, 0, 2, 2] = size
    got = DF.lasso_objective(x, z.to(dtype), w.to(dtype), 0.1, padding=1)
    assert got.dtype == dtype and float(got) == pytest.approx((size * 0.5**0.5) ** 2, rel=torch.finfo(dtype).eps)
    x, z = torch.randn(2, 1, 6, 6), torch.randn(2, 2, 6, 6)  # ordinary values: the float64 objective, rounded
    want = DF.lasso_objective(x.double(), z.double(), w.double(), 0.1, padding=1)
    torch.testing.assert_close(
        DF.lasso_objective(x.to(dtype), z.to(dtype), w.to(dtype), 0.1, padding=1).double(),
        want,
        rtol=4 * torch.finfo(dtype).eps,
        atol=0,
    )


@pytest.mark.parametrize("size", [1e-160, 1e-200, 1e-310])
def test_lasso_objective_gradient_of_a_tiny_float64_residual(size):
    """The gradient of 0.5 ||x - D z||^2 is the residual, representable however small it is; the backward formed
    it as p^2 (r / p) / p with p the largest entry, and p^2 underflowed below ~1e-154: only p's own term was left,
    the whole gradient on the largest entry (8.5x off at 1e-200), and NaN for a subnormal p."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    x = (torch.randn(2, 2, 6, 6, generator=g, dtype=torch.float64) * size).requires_grad_(True)
    z = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) * size
    z[z.abs() < size / 2] = 0.0
    z.requires_grad_(True)
    grads = torch.autograd.grad(DF.lasso_objective(x, z, w, 0.1).sum(), [x, z, w])
    residual = x - torch.nn.functional.conv_transpose2d(z, w)
    want = torch.autograd.grad(residual, [x, z, w], residual.detach())  # d(0.5 ||r||^2) = <r, dr>
    want = (want[0], want[1] + 0.1 * z.detach().sign(), want[2])
    for got, expected in zip(grads, want):
        assert got.isfinite().all()
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


def test_lipschitz_constant_of_a_meta_weight_is_a_value_error():
    with pytest.raises(ValueError, match="weight is a meta tensor"):  # was "Tensor.item() cannot be called"
        DF.lipschitz_constant(torch.randn(4, 3, 3, 3, device="meta"), (8, 8))


def test_lipschitz_constant_of_a_huge_weight_is_inf_not_nan():
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lip = DF.lipschitz_constant(w, (8, 8), padding=1)
    assert DF.lipschitz_constant(w * 1e60, (8, 8), padding=1) == pytest.approx(lip * 1e120, rel=1e-12)
    assert DF.lipschitz_constant(w * 1e200, (8, 8), padding=1) == float("inf")  # the power iteration gave NaN
    with pytest.raises(ValueError, match="default step 1/L"):  # NaN had read as "zero dictionary": step 1
        DF.conv_ista(torch.randn(1, 3, 8, 8, dtype=torch.float64), w * 1e200, 0.1, n_iter=2, backend="reference")


# ------------------------------------------------------------------------------------------ conv_ista steps
X, W = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3) * 0.3
Z0 = torch.full((2, 4, 8, 8), 5.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs,words",
    [
        # rounds to 0 in float32: threshold / 0 gave NaN codes on reference and zeros on cpp
        (dict(threshold=1.0, step=1e-50), "step must be > 0 in torch.float32, where it underflows"),
        (dict(threshold=0.0, step=torch.tensor(1e-50, dtype=torch.float64)), "step must be > 0 in torch.float32"),
        (dict(lam=0.1, step=1e-50), "step must be > 0 in torch.float32"),
        # subnormal: threshold / step overflowed to inf and every code became 0 (instead of 3) or NaN
        (dict(threshold=1.0, step=1e-39), r"threshold / step \(the lam it runs as\) must fit in torch.float32"),
        (dict(threshold=-1.0, step=1e-39, nonneg=True), r"threshold / step .* must fit"),
    ],
)
def test_conv_ista_rejects_steps_that_vanish_in_the_dtype(backend, kwargs, words):
    lam = kwargs.pop("lam", None)
    with pytest.raises(ValueError, match=words):
        DF.conv_ista(X, W, lam, n_iter=2, padding=1, z0=Z0, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_step_that_underflows_is_rejected(backend):
    # 1/L ~ 1e-61 is 0 in float32; the iteration then multiplied 0 by an overflowed E D z0: every code NaN
    with pytest.raises(ValueError, match=r"default step 1/L \(the dictionary is very large\) must be > 0"):
        DF.conv_ista(X, W * 1e30, 0.5, n_iter=2, padding=1, z0=Z0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e-160, 1e-170])
def test_default_step_of_a_nonzero_dictionary_whose_l_underflows_is_rejected(backend, scale):
    # taps of 1e-160 gave L subnormal, 1/L = inf: rejected; at 1e-170 L itself rounded to 0.0 and the call ran
    # silently with the zero dictionary's step 1 instead of raising the same error
    x, w = X.double(), W.double() * scale
    with pytest.raises(ValueError, match=r"default step 1/L \(the dictionary is nearly zero\) must fit"):
        DF.conv_ista(x, w, 0.5, n_iter=2, padding=1, backend=backend)
    assert float(DF.conv_ista(x, torch.zeros_like(w), 0.5, n_iter=2, padding=1, backend=backend).abs().sum()) == 0


def test_traced_default_step_of_a_nonzero_dictionary_whose_l_underflows_gives_nan():
    # a traced call cannot raise on values: NaN codes, not the zero dictionary's step 1 run on a non-zero one
    def f(x, w):
        return DF.conv_ista(x, w, 0.5, n_iter=2, padding=1, backend="reference")

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    x, w = X.double(), W.double()
    assert bool(compiled(x, w * 1e-170).isnan().all())
    assert float(compiled(x, torch.zeros_like(w)).abs().sum()) == 0
    torch.testing.assert_close(compiled(x, w), f(x, w))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_default_step_of_a_non_finite_dictionary_gives_nan_codes(backend, value, recwarn):
    # NaN propagates as F.conv2d's: the call raised "the dictionary is nearly zero" for a NaN tap (its L is NaN, no
    # 1/L), and a layer's tracked step warned "step=1 is above 2/L (L >= inf)" for an inf one
    x, w = X.double(), W.double()
    w[1, 0, 1, 1] = value
    z = DF.conv_ista(x, w, 0.5, n_iter=2, padding=1, backend=backend)
    (code,) = DF.ml_ista(x, [w], [0.5], n_iter=2, paddings=[1], backend=backend)
    layer = ConvSparseCoding2d(3, 4, 3, n_iter=2, padding=1, dtype=torch.float64, backend=backend)
    with torch.no_grad():
        layer.weight.copy_(w)
    assert z.isnan().all() and code.isnan().all() and layer(x).isnan().all()
    assert float(layer.step) == 1.0 and not [w for w in recwarn if "2/L" in str(w.message)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("traced", [False, True])
def test_default_step_where_the_geometry_makes_the_operator_zero(backend, traced):
    # a unit-norm dictionary whose 1x1 atoms all land in the padding (one signal row, padding 1, stride 2): D is the
    # zero operator, L = 0 as for an all-zero weight, and any step solves the problem (z = 0); the call raised
    # "the dictionary is nearly zero" (traced: NaN codes), the underflow case's answer
    x, w = torch.randn(4, 8, 1, 17, dtype=torch.float64), torch.randn(17, 8, 1, 1, dtype=torch.float64)
    w = w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)

    def f(x, w):
        return DF.conv_ista(x, w, 0.1, n_iter=3, stride=2, padding=1, backend=backend)

    z = torch.compile(f, backend="eager", fullgraph=True)(x, w) if traced else f(x, w)
    assert z.shape == (4, 17, 2, 10) and float(z.abs().sum()) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_underflow_bound_is_where_torch_rounds_a_float_to_zero(dtype):
    """The step check compares with a bound (a cast cannot be read under torch.compile(dynamic=True)): it must say
    "underflows" exactly where torch's own conversion gives 0, around every edge, float32's double rounding for the
    16-bit types included."""
    from dsc_kernels._validate import largest_rounding_to_zero

    bound = largest_rounding_to_zero(dtype)
    smallest = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    values = [1e-300, 1e-50, 1e-46, 1e-45, 1e-8, 0.5]
    for edge in (bound, smallest / 2, smallest, smallest / 2 + 2.0**-150, smallest / 2 * (1 + 2.0**-24)):
        below = above = edge
        for _ in range(4):
            values += [below, above]
            below, above = math.nextafter(below, 0.0), math.nextafter(above, 1.0)
    for value in filter(None, values):
        assert (value <= bound) == (float(torch.full((), value, dtype=dtype)) == 0), value


def test_steps_of_the_multilayer_pursuit_are_checked_in_the_dtype():
    with pytest.raises(ValueError, match=r"steps\[0\] must be > 0 in torch.float32"):
        DF.ml_ista(X, [W], [0.1], steps=[1e-50], n_iter=1, paddings=[1], backend="reference")
    with pytest.raises(ValueError, match="step must be > 0 in torch.float32"):
        DF.conv_ista(X, W.expand(2, 4, 3, 3, 3), threshold=1.0, step=1e-50, n_iter=2, padding=1, backend="reference")


# ------------------------------------------------------------------------- entries no atom reads
# (1-D: kernel 3, stride 2 on 8 samples leaves the last one unread; 2-D: kernel 2, stride 3 leaves gaps)
UNREAD = [((1, 2, 8), (3, 2, 3), 2, 0, (0, 1, 7)), ((2, 1, 7, 8), (3, 1, 2, 2), 3, 0, (1, 0, 2, 5))]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("geometry", UNREAD)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_entry_no_atom_reads_leaves_every_gradient_finite(backend, geometry, value):
    """Such an entry changes no code, and autograd's dL/dstep = <gu, E r_k> never reads it; the fused backwards form
    <E* gu, r_k>, which met 0 * NaN there: dL/dstep was NaN on cpp (and on triton, tested under the interpreter).
    The same for the multi-layer pursuit's first step."""
    xs, ws, stride, padding, unread = geometry
    g = torch.Generator().manual_seed(0)
    x = torch.randn(xs, generator=g, dtype=torch.float64)
    x[unread] = value
    w = 0.4 * torch.randn(ws, generator=g, dtype=torch.float64)
    got, want = {}, {}
    for b, out in ((backend, got), ("reference", want)):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        step = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        z = DF.conv_ista(xx, ww, 0.1, n_iter=3, step=step, stride=stride, padding=padding, backend=b)
        out["conv_ista"] = (z, *torch.autograd.grad(z.sum(), (xx, ww, step)))
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        steps = [torch.tensor(0.3, dtype=torch.float64, requires_grad=True)]
        (code,) = DF.ml_ista(xx, [ww], [0.05], steps=steps, n_iter=2, strides=[stride], paddings=[padding], backend=b)
        out["ml_ista"] = (code, *torch.autograd.grad(code.sum(), (xx, ww, *steps)))
    for op in got:
        for what, a, b in zip(("z", "dL/dx", "dL/dweight", "dL/dstep"), got[op], want[op]):
            assert a.isfinite().all(), f"{op} {what}"
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"{op} {what}")


def test_finite_unread_entries_cost_no_copy_of_x():
    """Zeroing the entries no atom reads made a copy of x on every call with such a geometry, which the fused op then
    saved for the backward beside the caller's x; a finite x now reaches the op itself."""
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    w = (0.1 * torch.randn(4, 3, 2, 2)).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        DF.conv_ista(x, w, 0.1, n_iter=2, stride=3, backend=BACKENDS[-1])
    assert x.untyped_storage().data_ptr() in saved


# -------------------------------------------------------------------------------------------- geometry
def _grads(backend, p, stride, padding, **kw):
    leaves = [p[k].detach().clone().requires_grad_() for k in ("x", "weight", "lam", "step")]
    z = DF.conv_ista(*leaves[:3], step=leaves[3], n_iter=3, stride=stride, padding=padding, backend=backend, **kw)
    return [z.detach(), *torch.autograd.grad((z * torch.linspace(-1, 1, z.numel()).view_as(z)).sum(), leaves)]


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("stride", [2**31 - 1, 2**31, 2**63 - 1, 2**64])
def test_a_stride_beyond_the_padded_map_is_the_single_window_it_means(rank, stride):
    """Every stride past the last window start is the same operator. 2**31 - 1 had the cpp backend allocate until the
    process was killed; larger ones reached torch's 32-bit convolution arguments ("stride should be greater than
    zero ... -2147483648") or its int64 parsing (a TypeError)."""
    p = conv_problem(rank, size=(9, 8), kernel=(3, 4), padding=1, untied=False, n_iter=3)
    canonical = tuple(n + 2 - k + 1 for n, k in zip((9, 8)[-rank:], (3, 4)[-rank:]))
    want = _grads("reference", p, canonical, 1)
    assert want[0].shape[2:] == (1,) * rank
    for backend in BACKENDS:
        for got, ref in zip(_grads(backend, p, stride, 1), want):
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert DF.conv_analysis(p["x"], p["weight"], stride=stride, padding=1).shape == want[0].shape
    codes = DF.ml_ista(p["x"], [p["weight"]], [0.05], n_iter=1, strides=[stride], paddings=[1], backend=BACKENDS[-1])
    assert codes[0].shape == want[0].shape


@pytest.mark.parametrize("padding", [2**30, 2**31, 2**62, 2**63])
def test_padding_beyond_32_bit_convolutions_is_a_value_error(padding):
    # was torch's "stride should be greater than zero", "expected padding to be at most ..." or an int64 overflow
    x, w = torch.randn(2, 3, 9), torch.randn(4, 3, 3)
    with pytest.raises(ValueError, match="padded signal size .* must be at most 2147483647"):
        DF.conv_ista(x, w, 0.1, n_iter=2, stride=2**62, padding=padding, backend="reference")
    with pytest.raises(ValueError, match="padded signal size"):
        DF.lipschitz_constant(w, (9,), stride=2**62, padding=padding)


@needs_cpp
def test_cpp_runs_padding_beyond_the_kernel_on_aten_convolutions():
    """The direct strategy's buffers and polyphase loops grow with the padded map: a 9 x 9 map padded by 10**6 ran
    for minutes. Padding that reaches the kernel's size now runs the gemm strategy, in both passes."""
    strategy = _ext.load().conv_ista_strategy_cpp  # 0 direct, 1 gemm
    x, w = torch.empty(1, 1, 9, 9), torch.empty(2, 1, 3, 3)
    for padding in ([3, 3], [1, 3], [10**6, 10**6]):
        assert [strategy(x, w, [1, 1], padding, backward) for backward in (False, True)] == [1, 1]
    p = conv_problem(2, batch=1, c_sig=1, c_code=2, size=(9, 9), kernel=(3, 3), untied=False, n_iter=3)
    want = _grads("reference", p, 10**12, 10**5)
    for got, ref in zip(_grads("cpp", p, 10**12, 10**5), want):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@needs_cpp
def test_cpp_op_called_directly_with_a_huge_stride():
    # functional passes the smallest equivalent stride; the op clamps one it is given directly (was killed)
    fwd = op_pair("conv_ista", "cpp").forward
    p = conv_problem(2, size=(9, 8), kernel=(3, 4), padding=1, untied=False, n_iter=2)
    args = (p["x"], p["weight"], p["weight"], p["lam"], p["step"], p["x"].new_empty(0))
    z, _ = fwd(*args, [2**31 - 1, 2**40], [1, 1], False, False, NO_BACKWARD)
    want, _ = fwd(*args, [9, 7], [1, 1], False, False, NO_BACKWARD)
    torch.testing.assert_close(z, want, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="padded signal must be at most"):
        fwd(*args, [1, 1], [2**62, 1], False, False, NO_BACKWARD)


# ------------------------------------------------------------------------------------------ integer arguments
INTEGRAL_TWOS = [np.int64(2), np.int32(2), torch.tensor(2)]
NOT_INTS = [
    2.0,
    True,
    torch.tensor(True),
    torch.tensor(2.0),
    torch.tensor([2]),
    torch.tensor(2, device="meta"),
    "2",
    None,
]


def _n_iter_calls(n_iter):
    """Every functional entry point that takes n_iter, called with it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    w = 0.3 * torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    return {
        "conv_ista": lambda: DF.conv_ista(x, w, 0.1, n_iter=n_iter, padding=1, backend="reference"),
        "conv_ista per-iteration": lambda: DF.conv_ista(
            x, w.expand(2, *w.shape), 0.1, n_iter=n_iter, padding=1, backend="reference"
        ),
        "deep_conv_ista": lambda: DF.deep_conv_ista(x, [w], [0.1], n_iter=n_iter, paddings=[1], backend="reference"),
        "ml_ista": lambda: DF.ml_ista(x, [w], [0.1], n_iter=n_iter, paddings=[1], backend="reference"),
        "lipschitz_constant": lambda: DF.lipschitz_constant(w, (8, 8), n_iter=n_iter),
    }


@pytest.mark.parametrize("name", list(_n_iter_calls(2)))
@pytest.mark.parametrize("n_iter", INTEGRAL_TWOS, ids=repr)
def test_n_iter_takes_numpy_and_0d_tensor_integers(name, n_iter):
    # were "n_iter must be an int >= 1" ValueErrors (or, for deep_conv_ista, "n_iter must be a list")
    got, want = _n_iter_calls(n_iter)[name](), _n_iter_calls(2)[name]()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(_n_iter_calls(2)))
@pytest.mark.parametrize("n_iter", NOT_INTS, ids=repr)
def test_n_iter_of_a_non_integer_type_is_a_type_error_naming_it(name, n_iter):
    with pytest.raises(TypeError, match="n_iter must be an int"):
        _n_iter_calls(n_iter)[name]()


@pytest.mark.parametrize("dim", INTEGRAL_TWOS[:2] + [torch.tensor(-1)], ids=repr)
def test_sparsemax_takes_integral_dims_like_softmax(dim):
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(DF.sparsemax(x, dim), DF.sparsemax(x, int(dim)), rtol=0, atol=0)


@pytest.mark.parametrize("dim", [1.5, 1.0, "1", None, True, torch.tensor(True)], ids=repr)
def test_sparsemax_dim_of_a_non_integer_type_is_a_type_error(dim):
    # was a ValueError; torch.softmax raises a TypeError for these too (bool included)
    with pytest.raises(TypeError, match="dim must be an int"):
        DF.sparsemax(torch.randn(2, 3), dim)


@pytest.mark.parametrize("dim", [2, -3, np.int64(2)], ids=repr)
def test_sparsemax_dim_out_of_range_is_a_value_error(dim):
    with pytest.raises(ValueError, match=r"dim must be (an int in \[-2, 2\)|>= -2), got (2|-3)$"):
        DF.sparsemax(torch.randn(2, 3), dim)


@pytest.mark.parametrize("lams", [0.1, torch.tensor([0.1]), "0.1"], ids=repr)
def test_per_layer_values_of_a_non_list_type_are_a_type_error(lams):
    # were ValueErrors; a list of the wrong length stays a ValueError (tests/test_validation.py)
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    with pytest.raises(TypeError, match="lams must be a list with one entry per layer"):
        DF.deep_conv_ista(x, [w], lams, n_iter=2, paddings=[1], backend="reference")


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("fista", [False, True])
def test_conv_ista_starts_from_z0(backend, fista):
    # the docstring's z0 is the starting code: one iteration from it (FISTA's first step has no momentum) is
    # S_{step*lam}(z0 + step D^T(x - D z0)), written here with conv2d / conv_transpose2d
    if backend == "cpp" and "cpp" not in DF.available_backends():
        pytest.skip("the C++ extension is not available")
    torch.manual_seed(0)
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64) * 0.3
    z0 = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    step, lam = 0.2, 0.1
    z = DF.conv_ista(x, w, lam, n_iter=1, step=step, padding=1, z0=z0, fista=fista, backend=backend)
    residual = x - torch.nn.functional.conv_transpose2d(z0, w, padding=1)
    u = z0 + step * torch.nn.functional.conv2d(residual, w, padding=1)
    torch.testing.assert_close(z, torch.sign(u) * torch.clamp(u.abs() - step * lam, min=0))
