"""Shared pieces of the benchmark suite (`pytest bench --benchmark-only`).

- Named conv workloads of docs/design.md §6 (`dsc_kernels.experiments.speed.WORKLOADS`): CPU sizes when the suite
  runs on a CPU, GPU sizes on CUDA (set DSC_BENCH_DEVICE=cpu|cuda to choose; default cuda when available).
- Timing: on a CPU pytest-benchmark's own timer (`benchmark.pedantic`); on CUDA the call is synchronised for
  pytest-benchmark's table and the number recorded in extra_info is `triton.testing.do_bench` (CUDA events, median).
- Memory kept by the forward (`dsc_kernels.experiments.speed.peak_memory_bytes`): GPU torch.cuda.max_memory_allocated
  above the inputs; CPU the unique storages autograd saves for the backward (saved_tensors_hooks) plus the output.
- Training-step peak (`speed.train_step_peak_bytes`, forward+backward cases): the peak allocation during forward and
  backward (CUDA allocator statistics; on a CPU the profiler's allocation events).
- GPU runs are written as JSON to bench/results/ (device, versions, git commit) at the end of the session, since the
  GPU machine keeps nothing.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import pytest
import torch

from dsc_kernels.experiments import speed as S

RESULTS: list[dict] = []
RESULTS_DIR = Path(__file__).parent / "results"


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


@pytest.fixture(params=list(S.WORKLOADS), ids=list(S.WORKLOADS))
def workload(request) -> S.Workload:
    return S.WORKLOADS[request.param]


def run_timed(benchmark, fn, device: str, *, rounds: int = 3) -> float:
    """Times fn with pytest-benchmark (synchronised on CUDA); returns the median ms of the authoritative timer."""
    if device == "cuda":
        def synced():
            fn()
            torch.cuda.synchronize()
        benchmark.pedantic(synced, rounds=rounds, iterations=1, warmup_rounds=1)
        ms = S.time_ms(fn, device)
        benchmark.extra_info["do_bench_ms"] = ms
        return ms
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    return 1e3 * benchmark.stats.stats.median


def record(entry: dict) -> None:
    """Keep one benchmark's numbers for the JSON written at the end of a GPU session."""
    RESULTS.append(entry)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pytest_sessionfinish(session, exitstatus):
    if not RESULTS or bench_device() != "cuda" or not torch.cuda.is_available():
        return
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name()
    payload = {
        "device": gpu, "cuda": torch.version.cuda, "torch": torch.__version__, "triton": triton_version,
        "python": platform.python_version(), "commit": _git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": RESULTS,
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    name = f"conv_{gpu.replace(' ', '_')}_{time.strftime('%Y%m%d_%H%M%S', time.gmtime())}.json"
    (RESULTS_DIR / name).write_text(json.dumps(payload, indent=1))
