"""Shared pieces of the benchmark suite: `pytest bench --benchmark-only` measures, `pytest bench --benchmark-disable`
runs it as a test suite (one timed round per group: every correctness check still runs, nothing is published).

- Device: DSC_BENCH_DEVICE=cpu|cuda (default cuda when available). Conv workloads: experiments.speed.workloads
  (docs/design.md §6; small-map on GPUs only).
- Measurement (experiments/speed.py, experiments/attention_speed.py, experiments/measure.py): every provider's output
  is checked against the fp64 reference by the tolerance rule before it is timed, and a provider that fails is
  recorded "wrong", never timed, and its test fails; the others of a group are timed interleaved (median of N, the
  raw samples kept), compilation warmed up outside the timed region; memory from the allocator (GPU) or the
  profiler's allocation events (CPU).
- pytest-benchmark's table shows those interleaved samples (`publish`): its own timer never runs.
- Records: one schema for every benchmark (experiments/records.py). At the end of the session the run document is
  written to DSC_BENCH_RESULTS (default bench/results/) as bench-<device>-<time>.json + .csv: always on a GPU, on a
  CPU only when DSC_BENCH_RESULTS is set.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dsc_kernels.experiments import records
from dsc_kernels.experiments import speed as S
from dsc_kernels.experiments.measure import Timing

RESULTS: list[dict] = []
RESULTS_DIR = Path(os.environ.get("DSC_BENCH_RESULTS") or Path(__file__).parent / "results")
_GROUPS: dict[tuple, dict[str, dict]] = {}


def bench_device() -> str:
    want = os.environ.get("DSC_BENCH_DEVICE")
    if want:
        return want
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def device() -> str:
    d = bench_device()
    if d == "cuda" and not torch.cuda.is_available():
        pytest.skip("DSC_BENCH_DEVICE=cuda but no CUDA device is visible")
    return d


@pytest.fixture(params=list(S.GPU_WORKLOADS), ids=list(S.GPU_WORKLOADS))
def workload(request, device) -> S.Workload:
    if request.param not in S.workloads(device):
        pytest.skip(f"{request.param} is a GPU workload (docs/design.md §6)")
    return S.GPU_WORKLOADS[request.param]


@pytest.fixture
def smoke(benchmark) -> bool:
    """True under --benchmark-disable: measure with one round, as a test."""
    return bool(benchmark.disabled)


def measured_group(key: tuple, measure: Callable[[], list[dict]]) -> dict[str, dict]:
    """The records of one group (e.g. a workload x mode), measured once for all its providers (interleaved timing
    needs them together) and then handed to each provider's test."""
    if key not in _GROUPS:
        _GROUPS[key] = {r["provider"]: r for r in records.add_ratios(measure())}
    return _GROUPS[key]


def publish(benchmark, timing: Timing | None) -> None:
    """Give pytest-benchmark the interleaved samples (seconds) for its table instead of timing again. Under
    --benchmark-disable, or without samples, the fixture is only marked used."""
    if benchmark.disabled or timing is None or not timing.n or not hasattr(benchmark, "_make_stats"):
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
        return
    benchmark._mode = "dsc_kernels.experiments.measure.time_interleaved"
    stats = benchmark._make_stats(1)
    for ms in timing.samples_ms:
        stats.update(ms / 1e3)


def check_and_publish(benchmark, rec: dict) -> None:
    """Record a result; fail the test when its provider's output was wrong or it failed; else show its samples."""
    record(rec)
    if rec["status"] == "skipped":
        # Not published: pytest-benchmark would list the unused fixture as a ~0 ms row, the table's 1.0 baseline.
        pytest.skip(rec["reason"])
    flat = {k: v for k, v in rec.items() if k not in ("timing", "check", "ratios")}
    benchmark.extra_info.update(flat, **rec["ratios"], check=[c["message"] for c in rec["check"]])
    if rec["timing"]:
        benchmark.extra_info.update(median_ms=rec["timing"]["median_ms"], n=rec["timing"]["n"])
    if rec["status"] != "ok":
        publish(benchmark, None)
        pytest.fail(
            f"{rec['provider']} on {rec['workload']} {rec['mode']}: {rec['status']}: {rec['reason']}; "
            + "; ".join(c["message"] for c in rec["check"] if not c["ok"])
        )
    t = rec["timing"]
    publish(benchmark, Timing(samples_ms=t["samples_ms"], warmup=t["warmup"], method=t["method"]))


def record(entry: dict) -> None:
    """Keep a result for the session's run document. Entries not in the records schema (e.g. the convergence
    claims') are wrapped into it: suite from "kind", workload from "id", status from "holds"."""
    if "suite" not in entry:
        rest = {k: v for k, v in entry.items() if k not in ("kind", "device")}
        entry = records.result(
            suite=entry.get("kind", "other"),
            workload=str(entry.get("id", "-")),
            mode="claim",
            dtype="-",
            provider="-",
            status="ok" if entry.get("holds", True) else "failed",
            **rest,
        )
    RESULTS.append(entry)


def pytest_sessionfinish(session, exitstatus):
    if not RESULTS or (bench_device() != "cuda" and "DSC_BENCH_RESULTS" not in os.environ):
        return
    if bench_device() == "cuda" and not torch.cuda.is_available():
        return
    method = {
        "timing": "dsc_kernels.experiments.measure.time_interleaved",
        "memory": "dsc_kernels.experiments.measure.measure_memory",
        "check": "dsc_kernels.experiments.tolerance (fp64 reference, 2x eager error + floor)",
        "benchmark_disabled": bool(session.config.getoption("benchmark_disable", default=False)),
    }
    doc = records.run_document("bench", bench_device(), RESULTS, method)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    records.write_run(doc, RESULTS_DIR, f"bench-{bench_device()}-{stamp}")
