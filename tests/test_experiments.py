"""Each convergence claim in its quick form (the report and bench/test_convergence.py run the larger ones)."""
import math

import numpy as np
import pytest
import torch

from dsc_kernels import experiments as E


@pytest.mark.parametrize("name", [n for n in E.EXPERIMENTS if n != "activation_floors"])
def test_claim_holds_quick(name):
    r = E.EXPERIMENTS[name](quick=True, backend="reference")
    assert isinstance(r, E.ClaimResult)
    assert r.holds, f"{r.id}: {r.claim} — theory {r.theory}, measured {r.measured}"
    assert r.curves


def test_linear_rate_bound_is_pointwise_and_support_is_clean():
    r = E.linear_convergence(quick=True, backend="reference")
    assert (r.curves["err_all"] <= r.curves["bound"][:, None] * (1 + 1e-9)).all()
    assert "false positives 0" in r.measured


def test_activation_floors():
    bound, proportional = E.activation_floors(quick=True, backend="reference")
    assert bound.holds, bound.measured
    # documented finding, not a tuned pass: with every unit off its kink the floor falls faster than 1/β
    assert not proportional.holds and proportional.note
    for dev in bound.curves["deviation"].values():
        assert np.all(np.diff(dev) < 0)


def test_layer_propagation_stalls_beyond_the_condition():
    r = E.layer_propagation(quick=True, backend="reference")
    bad = r.curves["s2=2"]
    assert bad["q"][1] >= 1 and bad["bound2"] is None
    assert bad["err2"][-1] > 0.1 and "stalls" in r.measured
    assert math.isfinite(float(r.curves["s2=1"]["err2"][-1]))


def test_speed_helpers_measure_time_and_saved_memory():
    from dsc_kernels.experiments import speed as S

    w = S.WORKLOADS["deep-layer"]
    inputs = S.make_inputs(w, "cpu", requires_grad=True, scale=0.125)
    fn = S.provider_fn("reference", inputs)
    assert S.time_ms(fn, "cpu", reps=1) > 0
    out_bytes = fn().untyped_storage().nbytes()
    # eager autograd keeps every iteration's intermediates: far more than the output alone
    assert S.peak_memory_bytes(fn, "cpu") > 2 * out_bytes
    with torch.no_grad():
        assert S.peak_memory_bytes(fn, "cpu") == out_bytes
    assert S.available_providers("cpu")["reference"] is None
