"""What bench/gpu_check.py runs in child processes (each its own process, so a CUDA error or a timeout costs only
that part): the sanitizer's cases, the background compile warm-up, and the bench step with its budget planner.

    python bench/gpu_check_children.py --sanitize-cases all|race
    python bench/gpu_check_children.py --warm-compile DEADLINE
    python bench/gpu_check_children.py --bench-step OUT DEADLINE
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONV_ORDER = ("small-map", "deep-layer", "csc-gray", "csc-rgb-strided")
# Guesses until a GPU run records first_call_s; later estimates scale with what this run measured.
EST = {
    "base": 15.0,
    "compile": {"forward": 45.0, "forward_backward": 70.0},
    "warm_compile": 15.0,
    "autotune_factor": 3.0,
}


def dry_run() -> bool:
    """DSC_GPU_CHECK_DRY_RUN=1, or no CUDA device: rehearse on the CPU."""
    if os.environ.get("DSC_GPU_CHECK_DRY_RUN") == "1":
        return True
    import torch

    return not torch.cuda.is_available()


def env_seconds(name: str, default: float) -> float:
    """The time budget in environment variable ``name`` (seconds, finite, >= 0), else ``default``. ValueError names the
    variable: "abc" was a traceback, and nan or inf disabled every deadline of a run that must end within its lease."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {text!r}")
    return value


# ------------------------------------------------------------------------------------------- sanitizer cases
# Three of the tests' launch paths, which between them run every conv kernel in both reduction orders within the
# step's time box: the tile kernel with flattened reductions, the single-launch kernel with tap-major ones
# (csc-gray's configuration: 1 signal channel, 64 code channels), and two-pass with the tap-major backward.
SANITIZED_LAUNCHES = ("tiles", "tap-major-single-launch", "tap-major-two-pass")


def sanitize_cases(which: str) -> int:
    """Tiny problems for every Triton kernel: which="all", or "race" (the single-launch conv kernel, whose CTA
    barrier orders its iterations, and the attention forward). The conv cases are test_triton_conv_ista's
    half-precision cases run through its own check (_check_at_scale: kernel vs fp64 vs eager, forward and backward,
    both save modes), with the shapes of the tests step, so Triton's cache is already warm; the attention cases
    have the shapes of test_attention_ops' GPU test."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    import test_triton_conv_ista as T

    import dsc_kernels.functional as DF
    from dsc_kernels.triton import conv_ista as tci

    device = "cuda" if torch.cuda.is_available() else "cpu"
    launch_only = os.environ.get("DSC_SANITIZE_LAUNCH_ONLY") == "1"
    failed = 0

    def case(label: str, run) -> None:  # one failing case is a line of the log, not the end of the coverage
        nonlocal failed
        try:
            run()
            print(label, "ok", flush=True)
        except Exception as err:  # noqa: BLE001
            failed += 1
            print(label, f"FAILED: {type(err).__name__}: {err}"[:400], flush=True)

    def conv(opts: dict, recompute: bool, forward: str, tap_major_min_channels: int) -> None:
        with tci.strategy(forward, tap_major_min_channels):
            problem = T._problem(device=device, kink_free=False, **opts)
            if launch_only:
                _launch_conv_kernels(T, problem, torch.bfloat16, recompute)
            else:
                T._check_at_scale(problem, torch.bfloat16, recompute=recompute)

    for name, opts in T.HALF_CASES.items():
        opts = dict(opts)
        recompute = opts.pop("recompute", False)
        for path in SANITIZED_LAUNCHES:
            forward, tap_major_min_channels = T.LAUNCHES[path]
            if which == "race" and forward != "single-launch":
                continue
            case(f"conv case {name} bf16 {path}", lambda: conv(opts, recompute, forward, tap_major_min_channels))
    gen = torch.Generator().manual_seed(0)

    def attention(mode: str, causal: bool, dtype: torch.dtype) -> None:
        q, k, v = (torch.randn(2, 3, n, 24, generator=gen).to(device, dtype).requires_grad_() for n in (77, 50, 50))
        th = torch.full((3,), 0.3, device=device, dtype=dtype)
        o = DF.sparse_attention(
            q, k, v, mode=mode, threshold=th if mode == "shrink" else None, causal=causal, backend="triton"
        )
        if which != "race":
            o.float().square().sum().backward()
        assert torch.isfinite(o).all() and (which == "race" or torch.isfinite(q.grad).all())

    for mode, causal, dtype in (("sparsemax", True, torch.float16), ("shrink", False, torch.bfloat16)):
        label = f"attention case {mode} {'causal' if causal else 'full'} {str(dtype).removeprefix('torch.')}"
        case(label, lambda: attention(mode, causal, dtype))
    if device == "cuda":
        torch.cuda.synchronize()
    return 1 if failed else 0


def _launch_conv_kernels(T, problem: dict, dtype, recompute: bool) -> None:
    """The Triton launches of T._check_at_scale alone (the forward, then the backward in the case's mode), for the
    runs under compute-sanitizer: the fp64 and eager references that the check also runs would be instrumented too
    (the first H200 run's memcheck used most of the box), and the plain run has already checked the numbers."""
    import torch

    from dsc_kernels.triton.conv_ista import conv_ista_bwd, conv_ista_fwd

    args, geo = T._canonical(problem)
    args = T._in_dtype(args, dtype)
    z, iterates = conv_ista_fwd(*args, *geo, 1)
    saved = iterates.new_empty(0) if recompute else iterates
    conv_ista_bwd(torch.ones_like(z), *args, z, saved, *geo, 0 if recompute else 1)


# -------------------------------------------------------------------------------------------------- the bench
def warm_compile(deadline: float) -> int:
    """torch.compile (default mode) of the conv reference on every GPU workload and mode, in the bench's order and
    exactly as measure_conv's gate first calls it, so that the bench step finds Inductor's FX-graph and AOTAutograd
    caches warm. It runs beside the tests and sanitizer steps and is killed when the bench starts, so its compiling
    overlaps them instead of the timed part (max-autotune is not warmed: its autotuning would time kernels on a busy
    GPU). Prints "warmed <workload> <mode> <seconds>" per group; the bench's planner reads those lines."""
    os.nice(19)  # the tests and sanitizer steps beside it come first
    import torch

    from dsc_kernels.experiments import speed as S

    device = "cpu" if dry_run() else "cuda"
    workloads = S.workloads(device)
    for name in [w for w in CONV_ORDER if w in workloads]:
        for mode in S.MODES:
            if time.time() > deadline:
                return 0
            t0 = time.time()
            inputs = S.make_inputs(
                workloads[name], device, requires_grad=mode == "forward_backward", scale=0.25 if dry_run() else 1.0
            )
            S._outputs(S.provider_fn("compile", inputs), mode)
            if device == "cuda":
                torch.cuda.synchronize()
            print(f"warmed {name} {mode} {time.time() - t0:.1f} s", flush=True)
    return 0


def _warmed(out: Path) -> set[tuple[str, str]]:
    path = out / "warm.log"
    found = re.findall(r"^warmed (\S+) (\S+) ", path.read_text(), re.M) if path.exists() else []
    return set(found)


def _ceilings(device) -> dict:
    """Device-to-device copy (bytes read + written) and a bf16 matmul, each the median of interleaved samples."""
    import torch

    from dsc_kernels.experiments.measure import time_interleaved

    a = torch.empty(1 << 29, dtype=torch.float32, device=device).normal_()  # 2 GiB
    b = torch.empty_like(a)
    m = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t = time_interleaved({"copy": lambda: b.copy_(a), "matmul": lambda: m @ m}, device, rounds=7, warmup=2)
    return {
        "copy_TBps": 2 * a.numel() * 4 / (t["copy"].median_ms * 1e-3) / 1e12,
        "bf16_matmul_TFLOPps": 2 * 8192**3 / (t["matmul"].median_ms * 1e-3) / 1e12,
        "samples": {k: v.to_dict() for k, v in t.items()},
    }


def bench_step(out: Path, deadline: float) -> int:
    import torch

    from dsc_kernels.experiments import attention_speed as A
    from dsc_kernels.experiments import records
    from dsc_kernels.experiments import speed as S

    log = print  # the parent echoes this process's output into gpu-check.log
    dry = dry_run()
    device = "cpu" if dry else "cuda"
    results: dict[tuple, list[dict]] = {}
    plan: list[str] = []
    ceilings: dict = {}
    method = {
        "timing": "experiments.measure.time_interleaved: "
        + ("CUDA events, L2 flushed before each call, rounds interleaved, median" if not dry else "perf_counter"),
        "memory": "experiments.measure.measure_memory (peak above the start)",
        "check": "experiments.tolerance.gate against fp64 before timing",
        "dry_run": dry,
    }

    def save():
        flat = [r for group in results.values() for r in group]
        doc = records.run_document("gpu-check", device, flat, method)
        doc.update(plan=plan, ceilings=ceilings)
        if not dry:
            doc["nvidia_smi_after"] = records._nvidia_smi()
        records.write_run(doc, out, "run")

    def left() -> float:
        return deadline - time.time()

    def note(line: str) -> None:
        plan.append(line)
        log("  " + line, flush=True)

    if dry:
        note("SKIP (no GPU): ceilings (device-to-device copy, bf16 matmul)")
    else:
        try:
            ceilings.update(_ceilings(device))
            note(
                f"ceilings: copy {ceilings['copy_TBps']:.2f} TB/s, bf16 matmul "
                f"{ceilings['bf16_matmul_TFLOPps']:.0f} TFLOP/s"
            )
        except Exception as err:  # noqa: BLE001
            note(f"ceilings failed: {type(err).__name__}: {err}"[:300])
    rounds, budget = (2, 10.0) if dry else (7, 20.0)

    # Attention first: cheap, and no compilation.
    if dry:
        attn = [
            (
                (1, 4, 256, 64),
                False,
                ["sdpa-flash", "sdpa-efficient", "sdpa-math", "dense-sparsemax", "cpp", "cpp-shrink90"],
                torch.float32,
            )
        ]
        note("SKIP (no GPU): attention at N = 4096/8192 in fp16 (the dry run times a CPU shape)")
    else:
        attn = [
            (
                (4, 8, 4096, 64),
                False,
                ["sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "dense-sparsemax", "triton", "triton-shrink90"],
                torch.float16,
            ),
            (
                (4, 8, 4096, 64),
                True,
                ["sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "dense-sparsemax", "triton"],
                torch.float16,
            ),
            ((4, 8, 8192, 64), False, ["sdpa-flash", "dense-sparsemax", "triton"], torch.float16),
        ]
    for shape, causal, providers, dtype in attn:
        for backward in (False, True):
            if left() < 30:
                note(
                    f"budget: attention {shape} causal={causal} backward={backward} not measured ({left():.0f} s left)"
                )
                continue
            t0 = time.time()
            recs = A.measure_attention(
                shape,
                device,
                providers,
                causal=causal,
                backward=backward,
                dtype=dtype,
                rounds=rounds,
                warmup=2,
                budget_s=budget,
                suite="gpu-check-attention",
            )
            results[("attn", shape, causal, backward)] = recs
            save()
            note(
                f"attention {shape} causal={causal} {'fwd+bwd' if backward else 'fwd'}: {time.time() - t0:.0f} s, "
                + ", ".join(f"{r['provider']} {r['status']}" for r in recs)
            )

    # Conv: every group with its base providers, then again with compile, then with max-autotune, while they fit.
    workloads = S.workloads(device)
    order = [w for w in CONV_ORDER if w in workloads]
    base = ["reference", "reference-channels_last", "cpp", "cpp-recompute", "triton", "triton-recompute"]
    autotune = os.environ.get("DSC_GPU_CHECK_AUTOTUNE", "small-map,deep-layer")
    autotune = [] if autotune == "none" else autotune.split(",")
    scale = 0.25 if dry else 1.0
    warmed = _warmed(out)
    if warmed:
        note("compile caches warmed for: " + ", ".join(f"{w} {m}" for w, m in sorted(warmed)))
    group_s: dict[tuple[str, str], float] = {}  # base group's wall time
    first_calls: dict[bool, list[float]] = {True: [], False: []}  # compile's first call, warm cache or cold

    def measure(name, mode, providers, label):
        t0 = time.time()
        recs = S.measure_conv(
            workloads[name],
            device,
            mode,
            providers,
            rounds=rounds,
            warmup=2,
            budget_s=budget,
            scale=scale,
            suite="gpu-check-conv",
        )
        results[("conv", name, mode)] = recs
        save()
        group_s.setdefault((name, mode), time.time() - t0)
        note(
            f"{label} {name} {mode}: {time.time() - t0:.0f} s, "
            + ", ".join(
                f"{r['provider']} {r['status']}"
                + (f" (first call {r['first_call_s']:.0f} s)" if r.get("first_call_s", 0) > 5 else "")
                for r in recs
                if r["status"] != "skipped"
            )
        )
        for r in recs:
            if r["provider"] == "compile" and r.get("first_call_s"):
                first_calls[(name, mode) in warmed].append(r["first_call_s"])

    def estimate(name: str, mode: str, with_autotune: bool) -> float:
        """Seconds to re-measure a group with compile (and max-autotune): its base time plus the compile's first
        call, both from what this run has seen (x1.5) or the guesses in EST."""
        warm = (name, mode) in warmed
        seen = first_calls[warm]
        compile_s = 1.5 * max(seen) if seen else (EST["warm_compile"] if warm else EST["compile"][mode])
        if with_autotune:  # the default compile is cached by then; max-autotune compiles and benchmarks anew
            cold = first_calls[False]
            compile_s = EST["autotune_factor"] * (1.5 * max(cold) if cold else EST["compile"][mode])
        return 1.2 * group_s.get((name, mode), EST["base"]) + compile_s

    groups = [(w, m) for w in order for m in S.MODES]
    for name, mode in groups:
        if left() < EST["base"]:
            note(f"budget: {name} {mode} not measured ({left():.0f} s left)")
            continue
        measure(name, mode, base, "base")
    for with_autotune in (False, True):
        for name, mode in groups:
            if with_autotune and name not in autotune:
                continue
            cost = estimate(name, mode, with_autotune)
            extra = ["compile", "compile-max-autotune"] if with_autotune else ["compile"]
            if left() < cost:
                note(
                    f"budget: {'+'.join(extra)} on {name} {mode} not measured (estimated {cost:.0f} s, "
                    f"{left():.0f} s left)"
                )
                continue
            measure(name, mode, base + extra, "+" + "+".join(extra))
    save()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sanitize-cases", choices=("all", "race"))
    parser.add_argument("--warm-compile", metavar="DEADLINE", type=float)
    parser.add_argument("--bench-step", nargs=2, metavar=("OUT", "DEADLINE"))
    args = parser.parse_args()
    if args.sanitize_cases:
        return sanitize_cases(args.sanitize_cases)
    if args.warm_compile:
        return warm_compile(args.warm_compile)
    if args.bench_step:
        return bench_step(Path(args.bench_step[0]), float(args.bench_step[1]))
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
