"""Every bad input of docs/design.md §3 raises ValueError/TypeError naming the argument, before any kernel runs."""

import pytest
import torch

import dsc_kernels.functional as DF
from dsc_kernels import ops

X = torch.randn(2, 3, 10, 10)
W = torch.randn(4, 3, 3, 3)


def ista(**overrides):
    kwargs = dict(x=X, weight=W, lam=0.1, n_iter=2, padding=1, backend="reference")
    kwargs.update(overrides)
    x, weight, lam = kwargs.pop("x"), kwargs.pop("weight"), kwargs.pop("lam")
    return DF.conv_ista(x, weight, lam, **kwargs)


@pytest.mark.parametrize(
    "overrides,error,words",
    [
        (dict(x=torch.randn(2, 3, 10)), ValueError, "x must have rank 4"),  # a 1-D x: 4-D weight read as per-step
        (dict(x=torch.randn(2, 5, 10, 10)), ValueError, "C_sig=3"),
        (dict(weight=torch.randn(4, 3)), ValueError, "weight must be"),
        (dict(lam=-0.1), ValueError, "lam must be >= 0"),
        (dict(lam=torch.tensor([0.1, -0.1, 0.1, 0.1])), ValueError, "lam must be >= 0"),
        (dict(lam=torch.rand(3)), ValueError, "lam must have one of the shapes"),
        (dict(lam=torch.rand(5, 4)), ValueError, "lam must have one of the shapes"),
        (dict(lam="big"), TypeError, "lam must be a float or a tensor"),
        (dict(n_iter=0), ValueError, "n_iter must be >= 1"),
        (dict(n_iter=2.5), TypeError, "n_iter must be an int"),
        (dict(step=0.0), ValueError, "step must be > 0"),
        (dict(step=torch.tensor([0.1, -1.0])), ValueError, "step must be > 0"),
        (dict(step=torch.rand(3)), ValueError, "step must have one of the shapes"),
        (dict(x=torch.randint(0, 3, (2, 3, 10, 10))), TypeError, "x must have a floating-point dtype"),
        (dict(weight=torch.randint(0, 3, (4, 3, 3, 3))), TypeError, "weight must have a floating-point dtype"),
        (dict(x=X.double()), TypeError, "must share one dtype"),
        (dict(x=X.to("meta")), ValueError, "one device"),
        (dict(backend="fastest"), ValueError, "backend must be one of"),
        (dict(backend=3), TypeError, "backend must be a string"),
        (dict(encoder_weight=torch.randn(4, 3, 5, 5)), ValueError, "encoder_weight must have weight's shape"),
        (dict(z0=torch.randn(2, 4, 9, 9)), ValueError, "z0 must have the code's shape"),
        # a z0 of another dtype reached the kernels: torch's "Input type ... and weight type" / "conv_ista_fwd_cpp"
        (dict(z0=torch.randn(2, 4, 10, 10, dtype=torch.float64)), TypeError, "must share one dtype.*z0"),
        (dict(stride=0), ValueError, "stride"),
        (dict(padding=-1), ValueError, "padding"),
        (dict(padding=(1, 1, 1)), ValueError, "padding"),
        (dict(stride="2"), TypeError, "stride"),
        (dict(x=torch.randn(2, 3, 2, 2), padding=0), ValueError, "too small"),
        (dict(weight=torch.randn(4, 3, 3, 0)), ValueError, "weight must have a kernel of size >= 1"),
        # finite, but inf in float32 (a step of inf makes every code NaN)
        (dict(lam=1e39), ValueError, "lam must fit in torch.float32"),
        (dict(lam=torch.tensor(1e39, dtype=torch.float64)), ValueError, "lam must fit in torch.float32"),
        (dict(step=1e39), ValueError, "step must fit in torch.float32"),
        (dict(weight=W * 1e-25), ValueError, "default step 1/L .* must fit in torch.float32"),
    ],
)
def test_conv_ista_rejects_bad_input(overrides, error, words):
    with pytest.raises(error, match=words):
        ista(**overrides)


def test_explicit_backend_that_cannot_run_raises_with_a_reason():
    with pytest.raises(RuntimeError, match="cuda.*not part of this release"):
        ista(backend="cuda")
    with pytest.raises(RuntimeError, match="CPU tensors"):
        ops.select("conv_ista", "cpp", torch.device("meta"), torch.float32)


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv("DSC_KERNELS_BACKEND", "reference")
    assert ops.select("conv_ista", "auto", torch.device("cpu"), torch.float32).name == "reference"
    monkeypatch.setenv("DSC_KERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        ops.select("conv_ista", "auto", torch.device("cpu"), torch.float32)


def test_other_functions_validate_their_inputs():
    with pytest.raises(ValueError, match="weight must have a kernel of size >= 1"):
        DF.conv_analysis(X, torch.randn(4, 3, 0, 3))
    with pytest.raises(ValueError, match=r"weights\[0\] must have a kernel of size >= 1"):
        DF.ml_ista(X, [torch.randn(4, 3, 3, 0)], [0.1], n_iter=2)
    with pytest.raises(ValueError, match=r"thresholds\[0\] must fit in torch.float32"):
        DF.ml_ista(X, [W], [1e39], n_iter=2)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        DF.soft_threshold(X, -1.0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        DF.soft_threshold([1.0], 0.1)
    with pytest.raises(ValueError, match="z has 3 channels"):
        DF.conv_synthesis(torch.randn(2, 3, 8, 8), W, signal_size=(10, 10))
    with pytest.raises(ValueError, match=r"z has spatial size \(7, 8\), but signal_size=\(10, 10\)"):
        DF.conv_synthesis(torch.randn(2, 4, 7, 8), W, signal_size=(10, 10))
    with pytest.raises(ValueError, match="signal_size"):
        DF.conv_synthesis(torch.randn(2, 4, 8, 8), W, signal_size=(10,))
    with pytest.raises(ValueError, match="n_iter"):
        DF.lipschitz_constant(W, (10, 10), n_iter=0)
    with pytest.raises(ValueError, match="z must have shape"):
        DF.lasso_objective(X, torch.randn(2, 4, 7, 7), W, 0.1, padding=1)
    with pytest.raises(ValueError, match="lam must be a float"):
        DF.lasso_objective(X, torch.randn(2, 4, 10, 10), W, torch.rand(3), padding=1)
    with pytest.raises(ValueError, match="layer 1: x has 4 channels"):
        DF.deep_conv_ista(X, [W, torch.randn(6, 5, 3, 3)], [0.1, 0.1], n_iter=2, paddings=[1, 1], backend="reference")
    with pytest.raises(ValueError, match="lams must be a list with one entry per layer"):
        DF.deep_conv_ista(X, [W], [0.1, 0.1], n_iter=2, backend="reference")
    with pytest.raises(TypeError, match="weights must be a non-empty list"):
        DF.deep_conv_ista(X, W, [0.1], n_iter=2, backend="reference")


def test_valid_geometry_raises_nothing_on_the_way(monkeypatch):
    """Valid strides and paddings pass the checks without an exception raised and caught inside them: torch.compile
    of torch 2.11 (the GPU machine's) cannot trace one, and every compiled forward failed when ``ints`` tried a
    tuple as an int first."""
    from dsc_kernels import _validate

    raised = []
    original = _validate.count

    def recording(name, value, minimum):
        try:
            return original(name, value, minimum)
        except TypeError:
            raised.append((name, value))
            raise

    monkeypatch.setattr(_validate, "count", recording)
    for value in (2, (1, 2), [3, 1], torch.tensor(2)):
        _validate.ints("stride", value, 2, minimum=1)
    _validate.geometry((10, 10), W, (2, 1), (1, 0))
    assert raised == []
    with pytest.raises(TypeError, match="stride must be an int or a sequence of 2 ints"):
        _validate.ints("stride", (1, 2.0), 2, minimum=1)
    with pytest.raises(TypeError, match="stride must be an int or a sequence of 2 ints"):
        _validate.ints("stride", "12", 2, minimum=1)
    with pytest.raises(ValueError, match="stride must be an int or have 2 entries"):
        _validate.ints("stride", (1, 2, 3), 2, minimum=1)


def test_numpy_scalars_are_real_numbers_like_python_ones():
    """np.float32 is no float subclass (np.float64 is): lam, step and scale refused it with 'got float32', while the
    layers took it. np.bool_ stays refused like bool, and a tensor scale is named as such."""
    import numpy as np

    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 3)
    want = DF.sparse_attention(q, k, v, scale=0.5, backend="reference")
    for scale in (np.float32(0.5), np.float64(0.5), np.float16(0.5)):
        torch.testing.assert_close(DF.sparse_attention(q, k, v, scale=scale, backend="reference"), want)
    shrink = DF.sparse_attention(q, k, v, mode="shrink", threshold=0.1, backend="reference")
    got = DF.sparse_attention(q, k, v, mode="shrink", threshold=np.float32(0.1), backend="reference")
    torch.testing.assert_close(got, shrink)
    x, w = torch.randn(2, 1, 8, 8), 0.3 * torch.randn(4, 1, 3, 3)
    want = DF.conv_ista(x, w, 0.1, n_iter=2, step=0.25, padding=1, backend="reference")
    got = DF.conv_ista(x, w, np.float32(0.1), n_iter=2, step=np.int64(1) / 4, padding=1, backend="reference")
    torch.testing.assert_close(got, want)
    with pytest.raises(TypeError, match="scale must be a Python float, got a tensor"):
        DF.sparse_attention(q, k, v, scale=torch.tensor(0.5), backend="reference")
    with pytest.raises(TypeError, match="lam must be a float or a tensor, got bool"):
        DF.conv_ista(x, w, np.bool_(True), n_iter=2, padding=1, backend="reference")


@pytest.mark.parametrize("scale", [True, "0.5", [0.5]])
def test_sparse_attention_scale_of_a_wrong_type_names_a_float_only(scale):
    """scale=True was refused with "scale must be a float or a tensor, got bool", and the tensor it offered is
    refused in turn ("must be a Python float"): the message now asks for the float alone."""
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 3)
    with pytest.raises(TypeError, match=r"scale must be a Python float, got \w+$"):
        DF.sparse_attention(q, k, v, scale=scale, backend="reference")
    with pytest.raises(TypeError, match=r"scale must be a Python float, got \w+$"):
        DF.sparse_attention_weights(q, k, scale=scale)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize(
    "name,values,words",
    [
        ("lam", [0.1, -0.1], "lam must be >= 0"),
        ("lam", [0.1, float("nan")], "lam must be finite"),
        ("step", [0.2, -0.2], "step must be > 0"),
        ("step", [0.2, 0.0], "step must be > 0"),
        ("threshold", [0.1, -0.1], "threshold"),
    ],
)
def test_per_sample_values_under_vmap_are_checked(backend, name, values, words):
    """vmap hides each sample's value from Python, but the batch behind it can be read: a negative lam or step of one
    sample used to run silently (reference) or fail in the kernel with a RuntimeError (cpp, NaN)."""
    batch = torch.tensor(values)

    def one(v):
        kwargs = dict(lam=0.1, step=0.2, threshold=None)
        kwargs[name] = v
        if name == "threshold":
            kwargs["lam"] = None
        return ista(backend=backend, **kwargs)

    with pytest.raises(ValueError, match=words):
        torch.func.vmap(one)(batch)
    torch.func.vmap(one)(batch.abs().clamp_min(0.05).nan_to_num(0.1))  # valid values still run


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("which", ["x", "weight", "lam"])
def test_non_strided_tensors_are_refused_by_name(backend, which):
    """Sparse (and mkldnn, nested) tensors used to fail deep inside torch's convolutions or the C++ kernels with
    messages that named no argument ("unsupported memory format option Contiguous")."""
    values = dict(x=X, weight=W, lam=torch.full((4,), 0.1))
    values[which] = values[which].to_sparse()
    with pytest.raises(TypeError, match=f"{which} must be a dense"):
        ista(backend=backend, **values)


@pytest.mark.parametrize("env", ["", "cuda", "garbage"])
@pytest.mark.parametrize(
    "overrides,error,words",
    [
        (dict(lam=-0.1), ValueError, "lam must be >= 0"),
        (dict(lam=torch.rand(3)), ValueError, "lam must have one of the shapes"),
        (dict(lam=torch.tensor(1)), TypeError, "lam must have a floating-point dtype"),
        (dict(lam=None, threshold=-0.1), ValueError, "threshold"),
        (dict(threshold=0.1), ValueError, "give exactly one of lam"),
        (dict(step=torch.rand(3)), ValueError, "step must have one of the shapes"),
    ],
)
def test_values_are_checked_before_the_backend_whatever_it_is(monkeypatch, env, overrides, error, words):
    # the thresholds and the step's shape were checked after the backend was chosen: with backend="cuda" (or
    # "triton" on CPU tensors, or DSC_KERNELS_BACKEND naming either or garbage) a bad lam raised the backend's
    # RuntimeError, or the variable's ValueError, instead of the error naming lam
    monkeypatch.setenv("DSC_KERNELS_BACKEND", env)
    with pytest.raises(error, match=words):
        ista(backend="auto" if env else "cuda", **overrides)


@pytest.mark.parametrize(
    "overrides,words",
    [
        (dict(lams=[0.1, -0.1]), "layer 1: lam must be >= 0"),
        (dict(lams=[0.1, torch.rand(7)]), "layer 1: lam must have one of the shapes"),
        (dict(n_iter=[2, 0]), "layer 1: n_iter must be >= 1"),
        (dict(steps=[None, -1.0]), "layer 1: step must be > 0"),
        (dict(weights=[W, torch.randn(6, 5, 3, 3)]), "layer 1: x has 4 channels but weight expects C_sig=5"),
        (dict(paddings=[1, -1]), "layer 1: padding must be >= 0"),
    ],
)
@pytest.mark.parametrize("backend", ["cpp", "cuda"])
def test_deep_conv_ista_checks_every_layer_before_the_first_runs(monkeypatch, backend, overrides, words):
    # a deep layer's bad argument was found only when its turn came: after the layers above it had run, and with a
    # backend that cannot run here (cuda) never, behind that backend's RuntimeError
    kwargs = dict(weights=[W, torch.randn(6, 4, 3, 3)], lams=[0.1, 0.1], n_iter=2, paddings=[1, 1], backend=backend)
    kwargs.update(overrides)
    monkeypatch.setattr(DF, "conv_ista", None)  # no layer may run
    with pytest.raises(ValueError, match=words):
        DF.deep_conv_ista(X, **kwargs)


def test_check_backend_on_a_device_decides_as_a_call_there(monkeypatch):
    monkeypatch.delenv("DSC_KERNELS_BACKEND", raising=False)
    assert DF.check_backend("Reference", "sparse_attention", device="cpu") == "reference"
    assert DF.check_backend("auto", "conv_ista", device="cpu", dtype=torch.float16) == "reference"
    with pytest.raises(RuntimeError, match="not part of this release"):
        DF.check_backend("cuda", "sparse_attention", device="cpu")
    with pytest.raises(ValueError, match="family"):
        DF.check_backend("reference", device="cpu")
    monkeypatch.setenv("DSC_KERNELS_BACKEND", "reference")
    assert DF.check_backend("auto", "ml_ista", device=torch.device("cpu")) == "reference"


def test_check_backend_refuses_what_a_call_refuses(monkeypatch):
    # "auto" skipped the family check ("auto" with family "conv-ista" came back "auto") and, given a device, ended on
    # the reference row for any dtype ("reference" for int32), while the call itself raises a TypeError naming x
    monkeypatch.delenv("DSC_KERNELS_BACKEND", raising=False)
    with pytest.raises(ValueError, match="family must be one of"):
        DF.check_backend("auto", "conv-ista")
    for dtype in (torch.int32, torch.complex64):
        with pytest.raises(TypeError, match="dtype must be one of"):
            DF.check_backend("auto", "conv_ista", device="cpu", dtype=dtype)
    with pytest.raises(TypeError, match="floating-point"):
        DF.conv_ista(X.int(), W, 0.1, n_iter=1)
    assert DF.check_backend("auto", "ml_ista", device="cpu", dtype=torch.float64) in ("cpp", "reference")


def test_conv_ista_reads_tensor_values_once_per_check():
    """Every value read (``bool``/``float`` of a tensor) is a host sync on a GPU. A tensor lam and step took 9 per
    conv_ista call: the step's underflow check cast a float32 step to float32, and the dtype-range checks re-read
    values already checked finite in a dtype no wider; the divergence warning read the atom norms and the step
    apart. 4 now, and every check still raises."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                Reads.count += 1
            return func(*args, **(kwargs or {}))

    x, w = torch.randn(2, 3, 8, 8), 0.3 * torch.randn(4, 3, 3, 3)
    lam, step = torch.full((5, 4), 0.1), torch.full((5,), 0.1)
    with Reads():
        DF.conv_ista(x, w, lam, n_iter=5, step=step, padding=1, backend="reference")
    assert Reads.count == 4  # lam: finite, >= 0; step: finite, > 0 (the divergence warning's read: norms and step)
    for bad, match in [(float("nan"), "finite"), (-1.0, ">= 0")]:
        with pytest.raises(ValueError, match=match):
            DF.conv_ista(x, w, torch.full((5, 4), bad), n_iter=5, step=step, padding=1)
    for bad, match in [(float("inf"), "finite"), (0.0, "> 0")]:
        with pytest.raises(ValueError, match=match):
            DF.conv_ista(x, w, lam, n_iter=5, step=torch.full((5,), bad), padding=1)
    # a float64 step that a float32 problem would round to 0 is still refused, and a lam beyond float32's range too
    with pytest.raises(ValueError, match="underflows"):
        DF.conv_ista(x, w, 0.1, n_iter=5, step=torch.full((5,), 1e-50, dtype=torch.float64), padding=1)
    with pytest.raises(ValueError, match="fit in"):
        DF.conv_ista(x, w, torch.full((5, 4), 1e300, dtype=torch.float64), n_iter=5, step=step, padding=1)
