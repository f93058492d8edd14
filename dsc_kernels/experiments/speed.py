"""Conv-ISTA speed workloads (DESIGN §6) and providers, shared by bench/test_speed_conv.py and the report.

Providers: "reference" (eager PyTorch, the baseline), "compile" (torch.compile of the reference), and every fused
backend functional.available_backends(device) lists ("cpp", "triton", "cuda"), each also in recompute mode
("cpp-recompute": the backward replays the iterations instead of saving them). Timing: CUDA events through
triton.testing.do_bench on a GPU (median), time.perf_counter medians on a CPU. Peak memory: on a GPU
torch.cuda.max_memory_allocated above the inputs; on a CPU the bytes autograd saves for the backward (unique storages,
counted by torch.autograd.graph.saved_tensors_hooks) plus the output — what the forward keeps alive, which is what
differs between providers (allocator peaks are not observable on CPU).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import functional as DF
from ..reference import conv_ista_ref

PROVIDERS = ("reference", "compile", "cpp", "cpp-recompute", "triton", "triton-recompute", "cuda")


@dataclass(frozen=True)
class Workload:
    """x: (B, C_sig, H, W); weight: (C_code, C_sig, kh, kw); one CPU and one GPU size (DESIGN §6)."""

    name: str
    x_cpu: tuple[int, ...]
    w_cpu: tuple[int, ...]
    x_gpu: tuple[int, ...]
    w_gpu: tuple[int, ...]
    stride: int
    padding: int
    n_iter: int

    def shapes(self, device: str | torch.device) -> tuple[tuple[int, ...], tuple[int, ...]]:
        gpu = torch.device(device).type == "cuda"
        return (self.x_gpu, self.w_gpu) if gpu else (self.x_cpu, self.w_cpu)


WORKLOADS = {
    w.name: w for w in (
        Workload("csc-gray", (4, 1, 64, 64), (32, 1, 7, 7), (32, 1, 128, 128), (64, 1, 7, 7), 1, 3, 10),
        Workload("csc-rgb-strided", (4, 3, 64, 64), (64, 3, 6, 6), (32, 3, 128, 128), (64, 3, 6, 6), 2, 2, 10),
        Workload("deep-layer", (8, 32, 32, 32), (64, 32, 3, 3), (64, 64, 32, 32), (128, 64, 3, 3), 1, 1, 5),
    )
}


def make_inputs(w: Workload, device: str | torch.device, dtype: torch.dtype = torch.float32, *,
                requires_grad: bool = False, scale: float = 1.0, seed: int = 0) -> dict:
    """Random x and unit-norm filters for a workload; `scale` < 1 shrinks the batch (quick runs)."""
    xs, ws = w.shapes(device)
    xs = (max(1, int(xs[0] * scale)), *xs[1:])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(xs, generator=g).to(device, dtype)
    weight = torch.randn(ws, generator=g)
    weight = (weight / weight.flatten(1).norm(dim=1)[:, None, None, None]).to(device, dtype)
    step = 1.0 / DF.lipschitz_constant(weight.float(), xs[2:], stride=w.stride, padding=w.padding, n_iter=30)
    x.requires_grad_(requires_grad), weight.requires_grad_(requires_grad)
    return dict(x=x, weight=weight, lam=0.05, step=step, stride=w.stride, padding=w.padding, n_iter=w.n_iter)


def available_providers(device: str | torch.device) -> dict[str, str | None]:
    """provider -> None when it runs here, else the reason it is skipped."""
    device = torch.device(device)
    try:
        fused = set(DF.available_backends(device))
    except Exception as err:  # noqa: BLE001 - a backend's import failing must not stop the others
        fused, why = {"reference"}, f"available_backends failed: {err}"
    else:
        why = f"not available on {device.type} here (functional.available_backends)"
    out: dict[str, str | None] = {}
    for p in PROVIDERS:
        if p == "reference":
            out[p] = None
        elif p == "compile":
            out[p] = None if hasattr(torch, "compile") else "torch.compile missing"
        elif p.startswith("triton") and device.type == "cpu":
            out[p] = "Triton on CPU tensors is the interpreter (TRITON_INTERPRET=1), a correctness tool, not timed"
        else:
            out[p] = None if p.removesuffix("-recompute") in fused else why
    return out


_COMPILED: dict = {}


def provider_fn(provider: str, inputs: dict) -> Callable[[], torch.Tensor]:
    """A zero-argument forward for one provider on one set of inputs."""
    i = inputs
    if provider == "compile":
        fn = _COMPILED.get("ref")
        if fn is None:
            fn = _COMPILED["ref"] = torch.compile(conv_ista_ref, dynamic=False)
        n = i["n_iter"]
        lam = torch.full((n, i["weight"].shape[0]), i["lam"], dtype=i["x"].dtype, device=i["x"].device)
        step = torch.full((n,), i["step"], dtype=i["x"].dtype, device=i["x"].device)
        return lambda: fn(i["x"], i["weight"], lam, step, stride=i["stride"], padding=i["padding"])
    backend = provider.removesuffix("-recompute")
    recompute = provider.endswith("-recompute")
    return lambda: DF.conv_ista(i["x"], i["weight"], i["lam"], n_iter=i["n_iter"], step=i["step"],
                                stride=i["stride"], padding=i["padding"], backend=backend, recompute=recompute)


def forward_backward(fn: Callable[[], torch.Tensor], inputs: dict) -> Callable[[], None]:
    """fn's forward plus the backward of sum(z) into x and weight."""
    def run():
        inputs["x"].grad = inputs["weight"].grad = None
        fn().sum().backward()
    return run


def time_ms(fn: Callable[[], object], device: str | torch.device, *, reps: int = 5, warmup: int = 1) -> float:
    """Median milliseconds per call: do_bench (CUDA events) on a GPU, perf_counter on a CPU."""
    if torch.device(device).type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def peak_memory_bytes(fn: Callable[[], torch.Tensor], device: str | torch.device) -> int:
    """What the forward keeps. GPU: peak allocated bytes during fn above what was allocated before. CPU: bytes of the unique storages
    autograd saves for the backward plus the output's (see the module docstring)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return int(peak)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return int(sum(seen.values()) + out.untyped_storage().nbytes())


@contextlib.contextmanager
def _native_stderr_silenced():
    """The profiler's C++ side prints start/stop lines on file descriptor 2; keep them out of the report's
    terminal (the step it wraps already ran once, unprofiled, with stderr intact)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def train_step_peak_bytes(fn: Callable[[], torch.Tensor], inputs: dict, device: str | torch.device) -> int:
    """Peak bytes allocated during one training step (fn's forward, then the backward of sum(z)) above what was
    allocated before it. GPU: the CUDA allocator's peak. CPU: the running sum of the profiler's allocation and free
    events (every c10 allocation, the C++ kernels' item-sized workspaces included; only their band scratch, at most
    one padded item code per thread allocated once and reused by every call, is not among them). A warm-up step runs
    first so one-time buffers and caches are not counted."""
    step = forward_backward(fn, inputs)
    step()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile
    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()  # negative for frees
        peak = max(peak, current)
    return int(peak)
