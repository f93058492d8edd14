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
