"""Timing and memory a reader can trust, for every benchmark of the package (bench/, the report, the GPU check).

Timing (`time_interleaved`): every provider is first called `warmup` times outside the timed region (torch.compile
compiles and autotunes there, cuDNN picks its algorithms, Triton compiles). Then come rounds; each round calls every
provider once, in an order rotated by one from round to round, so a drift of the machine (clock boost, a
neighbour's load, heat) spreads over all providers instead of landing on whichever runs last. The statistic is the
median of a provider's samples; N and the raw samples are kept (`Timing`).
  GPU: a sample is one call between two CUDA events, after the L2 cache was flushed by zeroing a buffer twice its
  size (so no provider finds its inputs in L2 where the previous call left them); one synchronisation per round.
  CPU: a sample is one call timed with time.perf_counter.
Rounds stop at `rounds`, or earlier once `min_rounds` are done and `budget_s` seconds have passed.

Memory (`measure_memory`): bytes allocated while fn runs, above what was allocated before it: the peak, and what is
still held when it returns (its output and whatever autograd saved for the backward). GPU: the CUDA caching
allocator's statistics. CPU: the profiler's allocation and free events (every allocation through c10; a C++ kernel's
own malloc'd scratch is not counted), matched by address: only a block allocated inside the call counts when it is
freed. c10's CPU allocator remembers block sizes only while a profiler records, so a block allocated during one
measurement and freed outside it stays in its table; a later block at the same address, freed during a later
measurement, was reported with the old size. Summing every free event made repeated measurements of the same call
drift by megabytes (2 MiB, a dictionary gradient, on the sweep's ML-ISTA layer).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from . import records

__all__ = ["Timing", "time_interleaved", "MemoryUse", "measure_memory", "synchronize", "Candidate", "measure_providers"]


@dataclass
class Timing:
    """Samples of one provider in milliseconds (per call), in the order taken."""

    samples_ms: list[float] = field(default_factory=list)
    warmup: int = 0
    method: str = ""
    error: str | None = None

    @property
    def n(self) -> int:
        return len(self.samples_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms) if self.samples_ms else float("nan")

    def to_dict(self) -> dict:
        s = sorted(self.samples_ms)
        # nearest rank: the smallest sample with at least a fraction f of the samples at or below it
        q = (lambda f: s[max(0, math.ceil(f * len(s)) - 1)]) if s else (lambda f: float("nan"))  # noqa: E731
        return dict(
            median_ms=self.median_ms,
            n=self.n,
            min_ms=q(0.0),
            p20_ms=q(0.2),
            p80_ms=q(0.8),
            samples_ms=list(self.samples_ms),
            warmup=self.warmup,
            method=self.method,
            error=self.error,
        )


def random_cotangent(like: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """A fixed random cotangent shaped, placed and typed like ``like`` (drawn in float64 on the CPU, so every device
    and dtype sees the same values). Gradient checks use it rather than sum(z): an all-ones cotangent hides a backward
    that reads grad_output at the wrong positions (a mirrored grad_output passes exactly)."""
    g = torch.randn(like.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return g.to(like.device, like.dtype)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 0) or (128 << 20)
    return torch.empty(2 * l2 // 4, dtype=torch.int32, device=device)


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:400]


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    device: torch.device | str,
    *,
    rounds: int = 7,
    warmup: int = 2,
    min_rounds: int = 3,
    budget_s: float | None = None,
    flush_l2: bool = True,
) -> dict[str, Timing]:
    """Times every fn of `fns` interleaved (see the module docstring); returns name -> Timing. A provider that raises
    is dropped from later rounds and its Timing carries the error (its earlier samples are discarded)."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    method = (
        "cuda-events, one call per sample, L2 flushed before each, rounds interleaved"
        if gpu
        else "time.perf_counter, one call per sample, rounds interleaved"
    )
    timings = {name: Timing(warmup=warmup, method=method) for name in fns}
    live = list(fns)

    def fail(name: str, err: BaseException) -> None:
        timings[name] = Timing(warmup=warmup, method=method, error=_describe(err))
        live.remove(name)

    for name in list(live):
        try:
            for _ in range(warmup):
                fns[name]()
            synchronize(device)
        except Exception as err:  # noqa: BLE001 - one failing provider must not stop the others
            fail(name, err)
    flush = _l2_flush_buffer(device) if gpu and flush_l2 else None
    start = time.perf_counter()
    for r in range(rounds):
        if budget_s is not None and r >= min_rounds and time.perf_counter() - start > budget_s:
            break
        order = live[r % len(live) :] + live[: r % len(live)] if live else []
        events = {}
        for name in order:
            try:
                if gpu:
                    if flush is not None:
                        flush.zero_()
                    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    begin.record()
                    fns[name]()
                    end.record()
                    events[name] = (begin, end)
                else:
                    t0 = time.perf_counter()
                    fns[name]()
                    timings[name].samples_ms.append(1e3 * (time.perf_counter() - t0))
            except Exception as err:  # noqa: BLE001
                fail(name, err)
        if gpu:
            try:
                torch.cuda.synchronize(device)
            except Exception as err:  # noqa: BLE001 - an asynchronous error: no sample of this round can be trusted
                for name in list(live):
                    fail(name, err)
                break
            for name, (begin, end) in events.items():
                if name in live:
                    timings[name].samples_ms.append(begin.elapsed_time(end))
    return timings


@dataclass
class MemoryUse:
    peak_bytes: int  # the most allocated at any point while fn ran, above the start
    retained_bytes: int  # still allocated when fn returned (its output alive), above the start
    method: str

    def to_dict(self) -> dict:
        return dict(peak_bytes=self.peak_bytes, retained_bytes=self.retained_bytes, method=self.method)


@contextlib.contextmanager
def _native_stderr_silenced():
    """The profiler's C++ side prints start/stop lines on file descriptor 2; keep them off the terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def measure_memory(fn: Callable[[], object], device: torch.device | str) -> MemoryUse:
    """Peak and retained bytes of one call of fn (see the module docstring). Run fn once before if its first call
    allocates caches (compilation, cuDNN workspaces) that later calls reuse."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        use = MemoryUse(
            int(torch.cuda.max_memory_allocated(device) - base),
            int(torch.cuda.memory_allocated(device) - base),
            "torch.cuda allocator statistics",
        )
        del out
        return use
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    allocations = sorted(
        (node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size)
        for node in _event_nodes(prof.profiler.kineto_results.experimental_event_tree())
        if type(node.extra_fields).__name__ == "_ExtraFields_Allocation" and node.extra_fields.device.type == "cpu"
    )
    live: dict[int, int] = {}  # address -> size of the blocks allocated during the call and not yet freed
    current = peak = 0
    for _, ptr, size in allocations:
        if size >= 0:
            live[ptr] = size
            current += size
            peak = max(peak, current)
        elif ptr in live:  # a free of a block from before the call does not count (the module docstring)
            current -= live.pop(ptr)
    return MemoryUse(int(peak), int(current), "torch.profiler allocation events (c10 allocations), by address")


def _event_nodes(roots) -> list:
    """Every node of the profiler's event tree, depth first."""
    out, stack = [], list(roots)
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children)
    return out


@dataclass
class Candidate:
    """A provider ready to be measured. `check()` calls it once (its first call: torch.compile compiles here, outside
    any timing) and returns tolerance Verdicts; `run` is the call that is timed."""

    check: Callable[[], list] | None
    run: Callable[[], object]
    # called before the memory measurement: frees what the timed calls left (a training step's gradients), which
    # the measured call would otherwise free first and the CUDA allocator's statistics count against its peak
    reset: Callable[[], None] | None = None


def measure_providers(
    base: Mapping,
    device: torch.device | str,
    candidates: Mapping[str, Callable[[], Candidate] | str],
    *,
    rounds: int = 7,
    warmup: int = 2,
    budget_s: float | None = None,
) -> list[dict]:
    """The measurement of one group of providers: check each (a provider whose output fails is recorded "wrong" and
    never timed), time the rest interleaved, then measure each one's memory. `candidates` maps a provider to a
    builder of its Candidate, or to the reason it is skipped. `base` holds the records' common fields (suite,
    workload, mode, dtype, params). Returns one records.result per provider, in `candidates`' order, each with
    `first_call_s` (the check's wall time, compilation included)."""
    out: dict[str, dict] = {}
    runs, resets, verdicts, first_call = {}, {}, {}, {}
    for p, build in candidates.items():
        if isinstance(build, str):
            out[p] = records.result(**base, provider=p, status="skipped", reason=build)
            continue
        t0 = time.perf_counter()
        try:
            candidate = build()
            if candidate.check is not None:
                verdicts[p] = candidate.check()
                synchronize(device)
            first_call[p] = time.perf_counter() - t0
            if not all(v.ok for v in verdicts.get(p, [])):
                out[p] = records.result(
                    **base,
                    provider=p,
                    status="wrong",
                    check=verdicts[p],
                    reason="output failed the correctness gate: not timed",
                    first_call_s=first_call[p],
                )
                continue
            runs[p], resets[p] = candidate.run, candidate.reset
        except Exception as err:  # noqa: BLE001 - a provider failing is a record, not a crash
            out[p] = records.result(
                **base,
                provider=p,
                status="failed",
                check=verdicts.get(p),
                reason=_describe(err),
                first_call_s=time.perf_counter() - t0,
            )
    timings = time_interleaved(runs, device, rounds=rounds, warmup=warmup, budget_s=budget_s) if runs else {}
    for p, run in runs.items():
        t, memory = timings[p], None
        if t.error is None:
            try:
                if resets[p] is not None:
                    resets[p]()
                memory = measure_memory(run, device)
            except Exception as err:  # noqa: BLE001
                t.error = f"memory: {_describe(err)}"
        out[p] = records.result(
            **base,
            provider=p,
            status="ok" if t.error is None else "failed",
            reason=t.error,
            check=verdicts.get(p),
            timing=t,
            memory=memory,
            first_call_s=first_call[p],
        )
    synchronize(device)
    return [out[p] for p in candidates]
