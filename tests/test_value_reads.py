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
