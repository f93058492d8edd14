"""Value reads per call on the hot paths: every ``.item()``, ``bool``/``float``/``int`` of a tensor, ``.tolist()`` and
``torch.equal`` is a host sync on a GPU. Counted on the CPU through the ops they dispatch to (never timed); each
check they serve still raises its own message."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from dsc_kernels import nn as dnn

READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default}


class _Dispatched(TorchDispatchMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS:
            self.counter.count += 1
        return func(*args, **(kwargs or {}))


class _Called(TorchFunctionMode):
    """``tolist`` of a CPU tensor reads its memory without a dispatched op (on a GPU it copies to the host)."""

    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) == "tolist":
            self.counter.count += 1
        return func(*args, **(kwargs or {}))


class reads:
    """``with reads() as r: ...``; then ``r.count``."""

    def __enter__(self):
        self.count = 0
        self._modes = [_Called(self), _Dispatched(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def _attention(dropout: float) -> dnn.SparseAttention:
    torch.manual_seed(0)
    return dnn.SparseAttention(8, 2, dropout=dropout, batch_first=True, mode="shrink", backend="reference")


@pytest.mark.parametrize(
    "training, need_weights, expected",
    [
        # the threshold's finite check once; the reference's overflow guard once per dense map it forms
        (True, True, 2),  # 3 before: the dropout path checked the threshold, then the weights checked it again
        (True, False, 2),
        (False, True, 3),  # 4 before: sparse_attention and sparse_attention_weights each checked it
        (False, False, 2),
    ],
)
def test_sparse_attention_checks_its_threshold_once_per_forward(training, need_weights, expected):
    layer = _attention(0.1).train(training)
    x = torch.randn(3, 5, 8)
    layer(x, x, x)  # warm
    with reads() as r:
        layer(x, x, x, need_weights=need_weights)
    assert r.count == expected


def test_sparse_coding_transformer_block_reads_the_attention_threshold_once():
    torch.manual_seed(0)
    block = dnn.SparseCodingTransformerBlock(8, 2, mode="shrink", dropout=0.1, backend="reference").train()
    x = torch.randn(3, 5, 8)
    with reads() as r:
        block(x)
    # threshold finite (4 before: checked twice); the dropout map's overflow guard; conv_ista's divergence warning
    # (the atoms' norms)
    assert r.count == 3


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_sparse_attention_still_refuses_a_non_finite_threshold(training, need_weights, bad):
    layer = _attention(0.1).train(training)
    with torch.no_grad():
        layer.threshold[0] = bad
    x = torch.randn(3, 5, 8)
    with pytest.raises(ValueError, match="threshold must be finite, got a tensor with NaN or inf entries"):
        layer(x, x, x, need_weights=need_weights)


@pytest.mark.parametrize("training, expected", [(True, 6), (False, 5)])
def test_conv_sparse_coding_reads_its_tracked_step_twice_not_three_times(training, expected):
    torch.manual_seed(0)
    layer = dnn.ConvSparseCoding2d(3, 4, 3, n_iter=3).train(training)
    x = torch.randn(2, 3, 12, 12)
    layer(x)  # warm: the step estimated
    with reads() as r:
        layer(x)
    # the step: finite, > 0 (functional); lam: finite, >= 0; the divergence warning's norms; in training the CPU's
    # "weight changed" read. One more before: the layer's own inf-or-0 check of the step, ahead of functional's.
    assert r.count == expected


@pytest.mark.parametrize(("scale", "what", "shown"), [(1e-30, "nearly zero", "inf"), (1e30, "very large", "0.0")])
@pytest.mark.parametrize("training", [True, False])
def test_a_refused_tracked_step_still_names_the_dictionary_before_any_kernel(monkeypatch, scale, what, shown, training):
    from dsc_kernels.ops import conv_ista as conv_ista_ops

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran")

    monkeypatch.setattr(conv_ista_ops, "run", no_kernel)
    layer = dnn.ConvSparseCoding1d(2, 3, 3, stride=2, padding=0).train(training)
    with torch.no_grad():
        layer.weight.mul_(scale)
    with pytest.raises(ValueError, match=f"tracked step 1/L of weight is {shown}: .* {what} dictionary") as info:
        layer(torch.randn(2, 2, 20))
    # functional's "step must be ..." is not shown beside it
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_a_tracked_layer_keeps_functional_errors_that_are_not_the_step():
    layer = dnn.ConvSparseCoding1d(2, 3, 3, lam=0.1, learn_lam=True)
    with torch.no_grad():
        layer.lam.fill_(float("nan"))
    with pytest.raises(ValueError, match="lam must be finite"):
        layer(torch.randn(2, 2, 20))


@pytest.mark.parametrize(
    "nonneg, dtype, before",
    [(False, torch.float32, 2), (True, torch.float32, 1), (False, torch.float64, 3), (True, torch.float64, 2)],
)
def test_soft_threshold_reads_a_tensor_threshold_once(nonneg, dtype, before):
    from dsc_kernels import functional as DF

    x = torch.randn(4, 6)
    with reads() as r:
        DF.soft_threshold(x, torch.tensor(0.1, dtype=dtype), nonneg=nonneg)
    assert r.count == 1  # ``before`` reads before: finite, >= 0 and (a wider threshold) the range, one each
    layer = dnn.SoftThreshold(0.1, num_channels=6, nonneg=nonneg, learnable=True)
    with reads() as r:
        layer(x)
    assert r.count == 1


@pytest.mark.parametrize(
    "value, nonneg, match",
    [
        (float("nan"), False, "threshold must be finite, got a tensor with NaN or inf entries"),
        (float("inf"), True, "threshold must be finite, got a tensor with NaN or inf entries"),
        (-0.5, False, "threshold must be >= 0, got a tensor with negative entries"),
        (1e300, False, r"threshold must fit in torch.float32 \(\|value\| <= 3.4e\+38\)"),
        (-1e300, True, r"threshold must fit in torch.float32 \(\|value\| <= 3.4e\+38\)"),
    ],
)
def test_soft_threshold_still_refuses_each_bad_threshold_with_its_message(value, nonneg, match):
    from dsc_kernels import functional as DF

    with pytest.raises(ValueError, match=match):
        DF.soft_threshold(torch.randn(2), torch.tensor([0.1, value], dtype=torch.float64), nonneg=nonneg)
    # negative and NaN together: the finite check's message first, as before
    with pytest.raises(ValueError, match="must be finite"):
        DF.soft_threshold(torch.randn(2), torch.tensor([-1.0, float("nan")]))
    assert torch.equal(DF.soft_threshold(torch.tensor([-2.0, 0.5, 3.0]), torch.tensor(1.0)), torch.tensor([-1.0, 0, 2]))


# ------------------------------------------------------------------------- multi-layer pursuit: reads per call
def _multilayer(depth: int, mode: str, **kwargs) -> dnn.MultiLayerSparseCoding2d:
    torch.manual_seed(0)
    return dnn.MultiLayerSparseCoding2d([1] + [3] * depth, 3, paddings=1, n_iter=2, mode=mode, bias=-0.01, **kwargs)


@pytest.mark.parametrize("mode, expected", [("ml-ista", 1), ("ml-fista", 1), ("interleaved", 2)])
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_multilayer_reads_do_not_grow_with_the_layers(mode, expected, backend):
    from dsc_kernels import functional as DF

    if backend not in DF.available_backends("cpu"):
        pytest.skip(DF.backend_unavailable_reason(backend, "cpu"))
    x = torch.randn(2, 1, 6, 6)
    for learn_steps, nonneg, training in [(True, True, True), (False, False, False), (True, False, False)]:
        for depth in (2, 4):
            net = _multilayer(depth, mode, learn_steps=learn_steps, nonneg=nonneg, backend=backend).train(training)
            with reads() as r:
                net(x)
            # every layer's thresholds and steps checked together; interleaved: the divergence warning's norms and
            # steps of every layer together. Before: 3 per layer (4 without nonneg), one more per layer interleaved
            assert r.count == expected, (learn_steps, nonneg, training, depth)


@pytest.mark.parametrize("steps", ["tensor", "float32 tensor", "default"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_functional_ml_ista_reads_do_not_grow_with_the_layers(steps, interleaved):
    from dsc_kernels import functional as DF

    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    counts = []
    for depth in (2, 4):
        torch.manual_seed(0)
        ws = [0.3 * torch.randn(3, 1 if j == 0 else 3, 3, 3, dtype=torch.float64) for j in range(depth)]
        thresholds = [torch.full((3,), 0.01, dtype=torch.float64) for _ in ws]
        given = {
            "tensor": [torch.tensor(0.2, dtype=torch.float64) for _ in ws],
            "float32 tensor": [torch.tensor([0.2, 0.1, 0.1]) for _ in ws],
            "default": None,
        }[steps]

        def call():
            return DF.ml_ista(
                x,
                ws,
                thresholds,
                n_iter=2,
                steps=given,
                paddings=[1] * depth,
                interleaved=interleaved,
                backend="reference",
            )

        call()  # the default 1/L estimated
        with reads() as r:
            call()
        counts.append(r.count)
    # thresholds and steps together (the cached 1/L's comparisons together), the warning's values together
    assert counts[0] == counts[1] == 1 + (steps == "default") + (interleaved and steps != "default")


def _refused_ml_ista(monkeypatch, j, bad, *, nonneg=True, mismatch=None, default=False):
    """The error of an ml_ista call with ``bad`` ("threshold" or "step" of layer j, a tensor) and no kernel run."""
    from dsc_kernels import functional as DF
    from dsc_kernels.ops import ml_ista as ml_ista_ops

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran")

    monkeypatch.setattr(ml_ista_ops, "run", no_kernel)
    torch.manual_seed(0)
    x = torch.randn(2, 1, 6, 6)
    ws = [0.3 * torch.randn(3, 1 if i == 0 else 3, 3, 3) for i in range(3)]
    thresholds = [torch.full((3,), 0.01) for _ in ws]
    steps = None if default else [torch.tensor(0.2) for _ in ws]
    if default:
        ws[j] = ws[j] * 1e-30
    elif bad[0] == "threshold":
        thresholds[j] = bad[1]
    else:
        steps[j] = bad[1]
    if mismatch is not None:
        ws[mismatch] = torch.randn(3, 2, 3, 3)
    with pytest.raises((ValueError, TypeError)) as info:
        DF.ml_ista(x, ws, thresholds, n_iter=2, steps=steps, paddings=[1] * 3, nonneg=nonneg, backend="reference")
    return f"{info.type.__name__}: {info.value}"


NAN = float("nan")


@pytest.mark.parametrize(
    "j, bad, nonneg, message",
    [
        (1, ("threshold", torch.tensor([0.1, NAN, 0.1])), True, "thresholds[1] must be finite, got a tensor with NaN"),
        (
            2,
            ("threshold", torch.tensor([0.1, -0.1, 0.1])),
            False,
            "thresholds[2] (negative thresholds need nonneg=True) must be >= 0, got a tensor with negative entries",
        ),
        (1, ("threshold", torch.tensor(1e300, dtype=torch.float64)), True, "thresholds[1] must fit in torch.float32"),
        (1, ("step", torch.tensor([0.2, 0.0, 0.2])), True, "steps[1] must be > 0, got a tensor with entries <= 0"),
        (2, ("step", torch.tensor(float("inf"))), True, "steps[2] must be finite, got a tensor with NaN or inf"),
        (
            1,
            ("step", torch.tensor(1e-300, dtype=torch.float64)),
            True,
            "steps[1] must be > 0 in torch.float32, where it underflows to 0",
        ),
        (1, ("step", torch.tensor(1e300, dtype=torch.float64)), True, "steps[1] must fit in torch.float32"),
        (1, ("step", torch.tensor(1)), True, "TypeError: steps[1] must have a floating-point dtype, got torch.int64"),
    ],
)
def test_ml_ista_values_checked_together_still_name_the_layer_before_any_kernel(monkeypatch, j, bad, nonneg, message):
    assert message in _refused_ml_ista(monkeypatch, j, bad, nonneg=nonneg)


def test_ml_ista_values_checked_together_raise_the_first_error_as_before(monkeypatch):
    # a bad value of layer 0 comes before layer 2's channel error; layer 1's channel error before a bad layer 2 value
    nan = ("threshold", torch.tensor([0.1, NAN, 0.1]))
    assert "thresholds[0] must be finite" in _refused_ml_ista(monkeypatch, 0, nan, mismatch=2)
    assert "weights[1] expects 2 input channels" in _refused_ml_ista(monkeypatch, 2, nan, mismatch=1)
    zero = ("step", torch.tensor(0.0))
    assert "steps[0] must be > 0" in _refused_ml_ista(monkeypatch, 0, zero, mismatch=1)
    # a default 1/L out of range, estimated with the others after every layer's checks, still comes first
    nearly_zero = "the default step 1/L (the dictionary is nearly zero) must fit in torch.float32"
    assert nearly_zero in _refused_ml_ista(monkeypatch, 0, None, default=True, mismatch=2)
    assert nearly_zero in _refused_ml_ista(monkeypatch, 1, None, default=True)


def test_multilayer_layer_still_names_the_layer_of_a_bad_learned_value():
    net = _multilayer(3, "ml-ista", nonneg=False)
    with torch.no_grad():
        net.biases[2][1] = 0.5  # threshold -0.5
    with pytest.raises(ValueError, match=r"thresholds\[2\] \(negative thresholds need nonneg=True\) must be >= 0"):
        net(torch.randn(2, 1, 6, 6))
    net = _multilayer(3, "interleaved")
    with torch.no_grad():
        net.steps[1].fill_(NAN)
    with pytest.raises(ValueError, match=r"steps\[1\] must be finite"):
        net(torch.randn(2, 1, 6, 6))
