"""Conv-ISTA speed and memory: every docs/design.md §6 conv workload x provider, forward and forward+backward.

Providers (experiments/speed.py): reference (eager; NCHW, and channels_last on GPUs), compile (torch.compile of the
reference; max-autotune on GPUs), cpp, triton, cuda, and the recompute modes; each skipped with the reason when it
cannot run here. The first test of a (workload, mode) group measures all of its providers together
(speed.measure_conv: checked against the fp64 reference, then timed interleaved); each test then reports its
provider: median ms, N, ratios to eager and compile (the faster member of each baseline group), peak memory.
On a CPU, Inductor needs minutes per shape on two cores, so `compile` runs on csc-gray only unless
DSC_BENCH_COMPILE=all.
"""

from __future__ import annotations

import os

import pytest
from conftest import check_and_publish, measured_group

from dsc_kernels.experiments import speed as S


def _providers(device: str, workload: S.Workload) -> list[str]:
    available = S.available_providers(device)
    out = [p for p in S.PROVIDERS if available[p] is None]
    if device == "cpu" and workload.name != "csc-gray" and os.environ.get("DSC_BENCH_COMPILE") != "all":
        out = [p for p in out if not p.startswith("compile")]
    return out


@pytest.mark.parametrize("mode", S.MODES)
@pytest.mark.parametrize("provider", S.PROVIDERS)
def test_conv_ista_speed(benchmark, device, workload, provider, mode, smoke):
    why = S.available_providers(device)[provider]
    if why is None and provider not in _providers(device, workload):
        why = "compile on CPU runs on csc-gray only (minutes of compilation per shape); DSC_BENCH_COMPILE=all"
    if why is not None:
        pytest.skip(f"{provider}: {why}")
    benchmark.group = f"conv-ista {workload.name} {mode}"
    group = measured_group(
        ("conv", device, workload.name, mode),
        lambda: S.measure_conv(
            workload,
            device,
            mode,
            _providers(device, workload),
            rounds=1 if smoke else 7,
            warmup=1 if smoke else 2,
            suite="bench-conv-ista",
        ),
    )
    check_and_publish(benchmark, group[provider])
