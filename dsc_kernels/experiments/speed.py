"""Conv-ISTA speed workloads (docs/design.md §6) and providers, and their measurement: checked, then timed interleaved.

Providers: "reference" (eager PyTorch: cuDNN/oneDNN in NCHW, the baseline), "reference-channels_last" (the same in
channels_last, often much faster on GPUs; GPU only), "compile" and "compile-max-autotune" (torch.compile of the
reference; max-autotune GPU only), and every fused backend functional.available_backends(device) lists ("cpp",
"triton", "cuda"), each also in recompute mode ("cpp-recompute": the backward replays the iterations instead of
saving them). Modes: "forward" (inference, under torch.no_grad) and "forward_backward" (forward, then the backward of
sum(z) into x and weight: a training step).

`measure_conv` is the measurement every benchmark uses (bench/, the GPU check): it builds the inputs, checks each
provider's output against the fp64 reference (experiments/tolerance.py's gate: forward z by its largest error,
gradients by their l2 error, each against twice PyTorch's eager error in the same dtype and precision, the less
accurate of its eager layouts, plus a floor) and drops a provider that fails (status "wrong", never timed), times the
rest interleaved after a warm-up that covers compilation (experiments/measure.py), then measures memory, and returns
one results record per provider (experiments/records.py). `time_ms`, `peak_memory_bytes` and `train_step_peak_bytes`
are the single-provider forms the report uses. (compile-max-autotune runs under CUDA graphs: the graph pool it
allocates when it records a graph, during the warm-up, is not in its measured peak.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .. import functional as DF
from ..reference import conv_ista_ref
from . import records
from .measure import Candidate, measure_memory, measure_providers, random_cotangent, time_interleaved
from .tolerance import gate

__all__ = [
    "PROVIDERS",
    "MODES",
    "Workload",
    "WORKLOADS",
    "GPU_WORKLOADS",
    "workloads",
    "make_inputs",
    "available_providers",
    "provider_fn",
    "forward_backward",
    "measure_conv",
    "time_ms",
    "peak_memory_bytes",
    "train_step_peak_bytes",
]

PROVIDERS = (
    "reference",
    "reference-channels_last",
    "compile",
    "compile-max-autotune",
    "cpp",
    "cpp-recompute",
    "triton",
    "triton-recompute",
    "cuda",
)
MODES = ("forward", "forward_backward")
_GPU_ONLY = {
    "reference-channels_last": "a GPU baseline (docs/design.md §6); on CPU the report compares with NCHW eager",
    "compile-max-autotune": "a GPU baseline (docs/design.md §6); on CPU max-autotune compiles for many minutes",
}


@dataclass(frozen=True)
class Workload:
    """x: (B, C_sig, H, W); weight: (C_code, C_sig, kh, kw); a CPU and a GPU size (docs/design.md §6), None where the
    workload has no size for that device."""

    name: str
    x_cpu: tuple[int, ...] | None
    w_cpu: tuple[int, ...] | None
    x_gpu: tuple[int, ...]
    w_gpu: tuple[int, ...]
    stride: int
    padding: int
    n_iter: int

    def shapes(self, device: str | torch.device) -> tuple[tuple[int, ...], tuple[int, ...]]:
        gpu = torch.device(device).type == "cuda"
        if not gpu and self.x_cpu is None:
            raise ValueError(f"workload {self.name} has no CPU size")
        return (self.x_gpu, self.w_gpu) if gpu else (self.x_cpu, self.w_cpu)


WORKLOADS = {
    w.name: w
    for w in (
        Workload("csc-gray", (4, 1, 64, 64), (32, 1, 7, 7), (32, 1, 128, 128), (64, 1, 7, 7), 1, 3, 10),
        Workload("csc-rgb-strided", (4, 3, 64, 64), (64, 3, 6, 6), (32, 3, 128, 128), (64, 3, 6, 6), 2, 2, 10),
        Workload("deep-layer", (8, 32, 32, 32), (64, 32, 3, 3), (64, 64, 32, 32), (128, 64, 3, 3), 1, 1, 5),
    )
}
# GPU-only workloads: a training-sized small-map problem (many images, many channels, a small map).
GPU_WORKLOADS = {
    **WORKLOADS,
    "small-map": Workload("small-map", None, None, (256, 64, 32, 32), (64, 64, 3, 3), 1, 1, 10),
}


def workloads(device: str | torch.device) -> dict[str, Workload]:
    """The workloads that have a size on `device`'s type."""
    return GPU_WORKLOADS if torch.device(device).type == "cuda" else WORKLOADS


def make_inputs(
    w: Workload,
    device: str | torch.device,
    dtype: torch.dtype = torch.float32,
    *,
    requires_grad: bool = False,
    scale: float = 1.0,
    seed: int = 0,
) -> dict:
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
        if p in _GPU_ONLY and device.type != "cuda":
            out[p] = _GPU_ONLY[p]
        elif p in ("reference", "reference-channels_last"):
            out[p] = None
        elif p.startswith("compile"):
            out[p] = None if hasattr(torch, "compile") else "torch.compile missing"
        elif p.startswith("triton") and device.type == "cpu":
            out[p] = "Triton on CPU tensors is the interpreter (TRITON_INTERPRET=1), a correctness tool, not timed"
        else:
            out[p] = None if p.removesuffix("-recompute") in fused else why
    return out


@functools.cache
def _compiled(mode: str | None):
    # One Dynamo cache holds every shape x grad-mode x mode compiled here; raise its limit so that no benchmark
    # silently falls back to eager after the 8th (the default limit).
    config = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, limit):
            setattr(config, limit, max(getattr(config, limit), 64))
    return torch.compile(conv_ista_ref, dynamic=False, mode=mode)


def provider_fn(provider: str, inputs: dict) -> Callable[[], torch.Tensor]:
    """A zero-argument forward for one provider on one set of inputs. Its `leaves` attribute names the tensors the
    backward of forward_backward differentiates (channels_last providers get their own copies, made once)."""
    i = inputs
    x, weight = i["x"], i["weight"]
    if provider.endswith("channels_last"):
        rg = x.requires_grad
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(rg)
        weight = weight.detach().contiguous(memory_format=torch.channels_last).requires_grad_(rg)
    if provider in ("reference", "reference-channels_last", "compile", "compile-max-autotune"):
        fn = (
            conv_ista_ref
            if provider.startswith("reference")
            else _compiled("max-autotune" if provider.endswith("max-autotune") else None)
        )
        n = i["n_iter"]
        lam = torch.full((n, weight.shape[0]), i["lam"], dtype=x.dtype, device=x.device)
        step = torch.full((n,), i["step"], dtype=x.dtype, device=x.device)

        def run():
            return fn(x, weight, lam, step, stride=i["stride"], padding=i["padding"])
    else:
        backend, recompute = provider.removesuffix("-recompute"), provider.endswith("-recompute")

        def run():
            return DF.conv_ista(
                x,
                weight,
                i["lam"],
                n_iter=i["n_iter"],
                step=i["step"],
                stride=i["stride"],
                padding=i["padding"],
                backend=backend,
                recompute=recompute,
            )

    run.leaves = (x, weight)
    return run


def forward_backward(fn: Callable[[], torch.Tensor], inputs: dict) -> Callable[[], None]:
    """fn's forward plus the backward of sum(z) into x and weight (gradients reset first, not accumulated)."""
    leaves = getattr(fn, "leaves", (inputs["x"], inputs["weight"]))

    def run():
        for t in leaves:
            t.grad = None
        fn().sum().backward()

    return run


def _inference(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def run():
        with torch.no_grad():
            return fn()

    run.leaves = getattr(fn, "leaves", ())
    return run


# ------------------------------------------------------------------------------------------------------ checking
def _outputs(fn, mode: str) -> list[torch.Tensor]:
    """What a provider computes in `mode`: [z] for the forward, [dL/dx, dL/dweight] (L = <z, G>, G a fixed random
    cotangent) for a step."""
    if mode == "forward":
        with torch.no_grad():
            return [fn().detach()]
    x, w = fn.leaves
    z = fn()
    return [t.detach() for t in torch.autograd.grad(z, (x, w), random_cotangent(z))]


def _eager_outputs(inputs: dict, mode: str, available: dict) -> list[list[torch.Tensor]]:
    """PyTorch's own outputs in the benchmark's dtype, one list per eager layout that runs here (NCHW, and
    channels_last on a GPU). cuDNN picks an algorithm per layout, and with TF32 allowed one layout may run on TF32
    tensor cores while the other does not: on an H200, csc-rgb-strided's forward was 3e-7 from fp64 in NCHW and
    2.8e-4 in channels_last. PyTorch's error in this dtype is the larger of the two; against NCHW alone PyTorch
    itself failed the gate."""
    layouts = [p for p in ("reference", "reference-channels_last") if available.get(p, "absent") is None]
    return [_outputs(provider_fn(p, inputs), mode) for p in layouts]


def _check(provider_out: list, ref64: list, eagers: list[list], mode: str) -> list:
    """Each output gated against fp64 with the least accurate eager layout as the yardstick (_eager_outputs)."""
    names = ("z",) if mode == "forward" else ("grad x", "grad weight")
    verdicts = []
    for i, name in enumerate(names):
        by_layout = [gate(provider_out[i], ref64[i], e[i], name=name, gradient=mode != "forward") for e in eagers]
        # a layout whose own result is no yardstick (NaN, or off by more than the values) gives way to one that is
        usable = [v for v in by_layout if v.bound == v.bound] or by_layout
        verdicts.append(max(usable, key=lambda v: v.eager_error))
    return verdicts


def _reference64(inputs: dict, mode: str) -> list[torch.Tensor]:
    rg = mode == "forward_backward"
    i64 = dict(
        inputs,
        x=inputs["x"].detach().double().requires_grad_(rg),
        weight=inputs["weight"].detach().double().requires_grad_(rg),
    )
    return _outputs(provider_fn("reference", i64), mode)


def measure_conv(
    workload: Workload,
    device: str | torch.device,
    mode: str,
    providers: Sequence[str],
    *,
    dtype: torch.dtype = torch.float32,
    rounds: int = 7,
    warmup: int = 2,
    budget_s: float | None = None,
    scale: float = 1.0,
    suite: str = "conv-ista",
    check: bool = True,
) -> list[dict]:
    """Check, then time interleaved, then measure memory, for `providers` on one workload and mode; returns one
    results record per provider (status ok / skipped / wrong / failed, see experiments/records.py)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    device = torch.device(device)
    xs, ws = workload.shapes(device)
    params = dict(
        x=[max(1, int(xs[0] * scale)), *xs[1:]],
        weight=list(ws),
        stride=workload.stride,
        padding=workload.padding,
        n_iter=workload.n_iter,
    )
    base = dict(suite=suite, workload=workload.name, mode=mode, dtype=str(dtype).removeprefix("torch."), params=params)
    available = available_providers(device)
    inputs = make_inputs(workload, device, dtype, requires_grad=mode == "forward_backward", scale=scale)
    try:
        ref64 = _reference64(inputs, mode) if check else None
        eagers = _eager_outputs(inputs, mode, available) if check else None
    except Exception as err:  # noqa: BLE001 - no reference, no gate: nothing may be timed
        return [
            records.result(**base, provider=p, status="failed", reason=f"reference: {type(err).__name__}: {err}"[:400])
            for p in providers
        ]

    def candidate(p: str) -> Candidate:
        fn = provider_fn(p, inputs)
        return Candidate(
            check=(lambda: _check(_outputs(fn, mode), ref64, eagers, mode)) if check else None,
            run=forward_backward(fn, inputs) if mode == "forward_backward" else _inference(fn),
            reset=lambda: [setattr(t, "grad", None) for t in fn.leaves],
        )

    candidates: dict = {}
    for p in providers:
        if available.get(p, "unknown provider") is not None:
            candidates[p] = available.get(p, "unknown provider")
        elif mode == "forward" and p.endswith("-recompute"):
            candidates[p] = "recompute changes only what the backward keeps: its forward is the one without -recompute"
        else:
            candidates[p] = functools.partial(candidate, p)
    return measure_providers(base, device, candidates, rounds=rounds, warmup=warmup, budget_s=budget_s)


# ----------------------------------------------------------------------------- single-provider forms (the report)
def time_ms(fn: Callable[[], object], device: str | torch.device, *, reps: int = 5, warmup: int = 1) -> float:
    """Median milliseconds per call of one fn over `reps` samples after `warmup` calls (measure.time_interleaved
    with a single provider: CUDA events on a GPU, perf_counter on a CPU). Raises if fn raises."""
    t = time_interleaved({"fn": fn}, device, rounds=reps, warmup=warmup, min_rounds=reps)["fn"]
    if t.error is not None:
        raise RuntimeError(t.error)
    return t.median_ms


def peak_memory_bytes(fn: Callable[[], torch.Tensor], device: str | torch.device) -> int:
    """What one forward keeps allocated: bytes still held when fn returns (its output and what autograd saved for
    the backward), above what was allocated before (measure.measure_memory's retained bytes, on CPU and GPU)."""
    return measure_memory(fn, device).retained_bytes


def train_step_peak_bytes(fn: Callable[[], torch.Tensor], inputs: dict, device: str | torch.device) -> int:
    """Peak bytes allocated during one training step (fn's forward, then the backward of sum(z)) above what was
    allocated before it (measure.measure_memory). A warm-up step runs first so one-time buffers are not counted, and
    its gradients are freed before the measured step, whose first act would otherwise be to free them: the CUDA
    allocator's statistics would count that free against the step's peak, the CPU meter would not."""
    step = forward_backward(fn, inputs)
    step()
    for t in getattr(fn, "leaves", (inputs["x"], inputs["weight"])):
        t.grad = None
    return measure_memory(step, device).peak_bytes
