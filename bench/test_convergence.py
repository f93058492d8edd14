"""One benchmark per convergence experiment (the claims of docs/theory.md §7): asserts each claim and records the
measured value next to the theoretical one in benchmark.extra_info. Runs the experiments at full size
(DSC_BENCH_QUICK=1 for the quick ones) through functional.conv_ista with backend DSC_BENCH_BACKEND (default auto)
on the suite's device.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import record

from dsc_kernels import experiments as E
from dsc_kernels.experiments.common import threads

QUICK = os.environ.get("DSC_BENCH_QUICK") == "1"
BACKEND = os.environ.get("DSC_BENCH_BACKEND", "auto")


def _run(benchmark, device, name):
    dtype = torch.float64 if device == "cpu" else torch.float32
    box = {}

    def once():
        with threads(1):  # as in the report: tiny problems, where threads only wait for each other
            box["out"] = E.EXPERIMENTS[name](quick=QUICK, backend=BACKEND, device=device, dtype=dtype)

    benchmark.group = "convergence claims"
    benchmark.pedantic(once, rounds=1, iterations=1)
    out = box["out"]
    results = out if isinstance(out, list) else [out]
    for r in results:
        info = {
            "id": r.id,
            "claim": r.claim,
            "theory": r.theory,
            "measured": r.measured,
            "holds": r.holds,
            "source": r.source,
        }
        benchmark.extra_info[r.id] = info
        record({"kind": "convergence", "device": device, **info})
    return results


@pytest.mark.parametrize("name", list(E.EXPERIMENTS))
def test_claim(benchmark, device, name):
    """One benchmark per experiment; experiments with several claims (S9a–c, S10a–b) assert each of them."""
    for r in _run(benchmark, device, name):
        assert r.holds, f"{r.id}: {r.claim}\n  theory:   {r.theory}\n  measured: {r.measured}"
