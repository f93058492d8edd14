"""Conv-ISTA speed and memory: every docs/design.md §6 conv workload x provider, forward and forward+backward.

Providers: reference (eager), compile (torch.compile of the reference), cpp, triton, cuda — each skipped with the
reason when it cannot run here. extra_info: median ms, ratio to eager and to compile (when those ran first in the
session, which pytest's parameter order ensures), peak memory. Compile times are excluded (warm-up round).
On a CPU, Inductor needs minutes per shape on two cores, so `compile` runs on csc-gray only unless
DSC_BENCH_COMPILE=all.
"""
from __future__ import annotations

import os

import pytest

from conftest import record, run_timed
from dsc_kernels.experiments import speed as S

_MEDIANS: dict[tuple[str, str, str], float] = {}


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("provider", S.PROVIDERS)
def test_conv_ista_speed(benchmark, device, workload, provider, mode):
    why = S.available_providers(device)[provider]
    if why is not None:
        pytest.skip(f"{provider}: {why}")
    if (provider == "compile" and device == "cpu" and workload.name != "csc-gray"
            and os.environ.get("DSC_BENCH_COMPILE") != "all"):
        pytest.skip("compile on CPU runs on csc-gray only (minutes of compilation per shape); DSC_BENCH_COMPILE=all")
    inputs = S.make_inputs(workload, device, requires_grad=mode == "forward_backward")
    fn = S.provider_fn(provider, inputs)
    run = S.forward_backward(fn, inputs) if mode == "forward_backward" else fn
    benchmark.group = f"conv-ista {workload.name} {mode}"
    ms = run_timed(benchmark, run, device)
    _MEDIANS[(workload.name, mode, provider)] = ms
    info = {"workload": workload.name, "provider": provider, "mode": mode, "device": device, "median_ms": ms,
            "peak_memory_bytes": S.peak_memory_bytes(fn, device),
            "train_step_peak_bytes": S.train_step_peak_bytes(fn, inputs, device) if mode == "forward_backward" else None}
    for base in ("reference", "compile"):
        if (workload.name, mode, base) in _MEDIANS:
            info[f"speedup_vs_{'eager' if base == 'reference' else base}"] = _MEDIANS[(workload.name, mode, base)] / ms
    benchmark.extra_info.update(info)
    record(info)
