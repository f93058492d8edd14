"""The cached default step 1/L: bounded memory per dictionary tensor, and never stale (ground truth: a fresh power
iteration in float64, ``lipschitz_constant_ref``, on a copy of the current values)."""

from __future__ import annotations

import pytest
import torch
from helpers import count_calls

import dsc_kernels.functional as DF
import dsc_kernels.reference as ref
from dsc_kernels.reference import lipschitz_constant_ref

D = torch.float64
SIZE = (7, 7)


def _entries(base: torch.Tensor) -> dict:
    return DF._LIPSCHITZ_CACHE.get(base, {})


def _step_used(x, w) -> float:
    """The default step a conv_ista call ran with: one ISTA step from zero with lam=0 is step * D^T x."""
    z = DF.conv_ista(x, w, 0.0, n_iter=1, padding=1, backend="reference")
    return float(
        z.flatten()[z.flatten().abs().argmax()]
        / DF.conv_analysis(x, w, padding=1).flatten()[z.flatten().abs().argmax()]
    )


def _want(w) -> float:
    return 1.0 / float(lipschitz_constant_ref(w.detach().clone().to(D), SIZE, (1, 1), (1, 1)))


def test_a_bank_used_a_view_at_a_time_keeps_a_bounded_number_of_copies(monkeypatch):
    calls = count_calls(monkeypatch, ref, "lipschitz_power_iteration_scaled")
    torch.manual_seed(0)
    bank = torch.randn(24, 3, 2, 3, 3, dtype=D)
    x = torch.randn(2, 2, *SIZE, dtype=D)
    for i in range(len(bank)):
        DF.conv_ista(x, bank[i], 0.1, n_iter=1, padding=1, backend="reference")
    assert calls[0] == len(bank)
    held = _entries(bank)
    # one copy per view of the whole bank before (24 entries, the bank's size again)
    assert len(held) == 1 + DF.CACHED_VIEWS_PER_TENSOR
    assert sum(entry[1].nbytes for entry in held.values()) == len(held) * bank[0].nbytes
    # the most recent views hit, the dropped ones are estimated again
    DF.conv_ista(x, bank[-1], 0.1, n_iter=1, padding=1, backend="reference")
    DF.conv_ista(x, bank[-3], 0.1, n_iter=1, padding=1, backend="reference")
    assert calls[0] == len(bank)
    DF.conv_ista(x, bank[0], 0.1, n_iter=1, padding=1, backend="reference")
    assert calls[0] == len(bank) + 1
    assert len(_entries(bank)) == 1 + DF.CACHED_VIEWS_PER_TENSOR


def test_one_call_keeps_every_view_it_uses(monkeypatch):
    # an All-Free ml_ista of 8 steps uses 8 views of each per-step dictionary, more than the views kept beyond a call
    calls = count_calls(monkeypatch, ref, "lipschitz_power_iteration_scaled")
    torch.manual_seed(0)
    n_iter = 2 * DF.CACHED_VIEWS_PER_TENSOR - 1
    per_step = [0.3 * torch.randn(n_iter + 1, 3, c, 3, 3, dtype=D) for c in (2, 3)]
    x = torch.randn(2, 2, *SIZE, dtype=D)
    for _ in range(3):
        DF.ml_ista(x, per_step, [0.01, 0.01], n_iter=n_iter, paddings=[1, 1], backend="reference")
    assert calls[0] == 2 * (n_iter + 1)
    assert [len(_entries(w)) for w in per_step] == [n_iter + 1] * 2


def _sgd_step(bank):
    bank.grad = torch.ones_like(bank)
    torch.optim.SGD([bank], lr=0.5).step()


CHANGES = {
    "in place": lambda bank, i: bank.mul_(2.0),
    "through .data": lambda bank, i: bank.data.mul_(2.0),
    "assigning .data": lambda bank, i: setattr(bank, "data", 2.0 * bank.data),
    "through another view": lambda bank, i: bank[i : i + 1].mul_(2.0),
    "through the view itself": lambda bank, i: bank[i].mul_(2.0),
    "an optimiser step": lambda bank, i: _sgd_step(bank),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_the_cached_step_of_a_view_follows_every_change(change):
    torch.manual_seed(0)
    bank = torch.nn.Parameter(torch.randn(8, 3, 2, 3, 3, dtype=D))
    x = torch.randn(1, 2, *SIZE, dtype=D)
    with torch.no_grad():
        for i in range(len(bank)):  # cached for every view, the oldest dropped
            DF.conv_ista(x, bank[i], 0.1, n_iter=1, padding=1, backend="reference")
        i = len(bank) - 2  # a view still cached
        assert _step_used(x, bank[i]) == pytest.approx(_want(bank[i]), rel=1e-6)
        CHANGES[change](bank, i)
        assert _step_used(x, bank[i]) == pytest.approx(_want(bank[i]), rel=1e-6)
