"""The CPU conv-ISTA shape sweep (dsc_kernels/experiments/sweep.py) as benchmarks: one test per shape.

Each test checks every provider against the reference, then records in extra_info the forward and forward+backward
ratios to eager (eager time / provider time) of reference, cpp-direct, cpp-gemm, cpp and auto, and their
training-step peak memory ratios (save and recompute mode); pytest-benchmark itself times the cpp forward+backward.
The quick subset runs by default; DSC_BENCH_SWEEP=full runs every shape. DSC_BENCH_SWEEP_OUT=DIR also writes the
sweep's JSON, figure and markdown table there when the module finishes. Threads: DSC_BENCH_THREADS (default 2).
The same measurement, as a script: `python -m dsc_kernels.experiments.sweep --out DIR`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import record

from dsc_kernels.experiments import sweep as SW

NAMES = [s.name for s in SW.SHAPES] if os.environ.get("DSC_BENCH_SWEEP") == "full" else list(SW.QUICK)
PROVIDERS = tuple(p for p in SW.PROVIDERS if p != "compile" or os.environ.get("DSC_BENCH_COMPILE") == "all")


@pytest.fixture(scope="module")
def rows():
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("DSC_BENCH_THREADS", "2")))
    collected: list[dict] = []
    yield collected
    # the machine is read before the threads are restored: its thread count is the one the rows were measured with
    machine = SW.machine()
    torch.set_num_threads(threads)
    out = os.environ.get("DSC_BENCH_SWEEP_OUT")
    if out and collected:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        summary = SW.summarize(collected)
        (path / "sweep.json").write_text(
            json.dumps({"machine": machine, "rows": collected, "summary": summary}, indent=1)
        )
        (path / "sweep.md").write_text(SW.markdown(collected, summary, machine))
        SW.figure(collected, path / "sweep.png")


@pytest.mark.parametrize("name", NAMES)
def test_conv_ista_sweep(benchmark, device, rows, name):
    if device != "cpu":
        pytest.skip("the sweep measures the CPU backends")
    shape = SW.BY_NAME[name]
    row = SW.measure_shape(shape, PROVIDERS, rounds=int(os.environ.get("DSC_BENCH_ROUNDS", "5")))
    rows.append(row)
    p = SW.make_problem(shape, requires_grad=True)
    benchmark.group = f"conv-ista sweep {name}"
    benchmark.pedantic(SW.forward_backward(SW.provider_fn("cpp", shape, p), p), rounds=3, iterations=1, warmup_rounds=1)
    info = {"shape": name, "describe": row["describe"], "threads": torch.get_num_threads()}
    for k, r in row["results"].items():
        info[k] = {
            key: r[key]
            for key in ("fwd_ratio", "fwd_bwd_ratio", "mem_floor_ratio", "mem_ratio", "mem_ratio_recompute", "strategy")
            if key in r
        }
    benchmark.extra_info.update(info)
    record({"sweep": info})
    print(
        f"\n{name}: "
        + ", ".join(
            f"{k} {v['fwd_ratio']:.2f}/{v['fwd_bwd_ratio']:.2f}" for k, v in info.items() if isinstance(v, dict)
        )
    )
