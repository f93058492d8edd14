"""The prepared GPU run (`make gpu-check`): everything a short lease of a bare H100/H200 needs, in one script that
finishes in under 8 minutes and writes everything into one folder.

It runs from the source tree with the machine's own python3/torch/triton (PYTHONPATH=.), installs nothing, and
needs no registry. Steps, each time-boxed (a failure or timeout is recorded and the run goes on):
    env       device, clocks (nvidia-smi), versions, commit, precision flags
    tests     the `gpu` tests, kernels compiled (pytest -m gpu tests; 4 xdist workers when pytest-xdist is there):
              every Triton kernel against the reference on odd shapes in fp32/fp16/bf16/TF32, opcheck, compile
    sanitize  the tiny cases of every Triton kernel (`--sanitize-cases`) once plain, then under compute-sanitizer
              memcheck (PyTorch's caching allocator off, so an out-of-bounds access leaves its allocation), then
              racecheck on the single-launch conv kernel (its CTA barrier) and the attention kernels
    bench     ceilings (device-to-device copy, bf16 matmul), then the DESIGN §6 GPU workloads + small-map against
              eager cuDNN in NCHW and channels_last, torch.compile (default, max-autotune), forward and
              forward+backward, peak memory; attention against SDPA's flash/efficient/cuDNN backends and dense
              sparsemax. Every provider is checked against fp64 before it is timed; timing is interleaved CUDA-event
              medians (experiments/measure.py). Compilation is paid once per group outside the timing and only
              while it fits the budget: base providers first for every group, then groups re-measured with
              compile, then with max-autotune (DSC_GPU_CHECK_AUTOTUNE, default small-map,deep-layer); a group
              that does not fit says so.
    summary   summary.md (steps, tables, failures), printed at the end
While tests and sanitize run, a background process compiles the bench's torch.compile baselines (default mode) so
that Inductor's caches are warm when the bench starts (`--warm-compile`; killed before the bench; DSC_GPU_CHECK_WARM=0
turns it off).
Files (at most 8, for the device tool): run.json + run.csv (the results document, experiments/records.py schema,
with the steps and the plan), summary.md, gpu-check.log (this output), tests.log, sanitizer.log, warm.log.

Environment: DSC_GPU_CHECK_OUT (folder; default $OUT when set, else bench/results/gpu-check-<time>),
DSC_GPU_CHECK_BUDGET_S (total seconds, default 450), DSC_GPU_CHECK_STEPS (e.g. "env,bench"),
DSC_GPU_CHECK_AUTOTUNE (workloads for max-autotune, or "none"), DSC_GIT_COMMIT (the commit, where the tree has no
.git). Rehearsal: DSC_GPU_CHECK_DRY_RUN=1, or no CUDA device, runs every step it can on the CPU (the tests are
collected and skipped, the sanitizer cases run under Triton's interpreter, the bench runs CPU sizes) and prints a
"SKIP (no GPU)" line for each device-only part.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS = ("env", "tests", "sanitize", "bench", "summary")
BOXES = {"env": 30, "tests": 150, "sanitize": 75, "bench": None, "summary": 10}  # bench: whatever is left
CONV_ORDER = ("small-map", "deep-layer", "csc-gray", "csc-rgb-strided")
# Guesses until a GPU run records first_call_s; later estimates scale with what this run measured.
EST = {"base": 10.0, "compile": {"forward": 30.0, "forward_backward": 50.0}, "warm_compile": 10.0,
       "autotune_factor": 3.0}


def _dry() -> bool:
    if os.environ.get("DSC_GPU_CHECK_DRY_RUN") == "1":
        return True
    import torch
    return not torch.cuda.is_available()


def _out_dir() -> Path:
    if os.environ.get("DSC_GPU_CHECK_OUT"):
        return Path(os.environ["DSC_GPU_CHECK_OUT"])
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return ROOT / "bench" / "results" / f"gpu-check-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


class Log:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self, *parts) -> None:
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def _child_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: v for k, v in extra.items() if v is not None})
    return env


def _run(cmd: list[str], log_path: Path, timeout: float, env: dict, echo: Log | None = None) -> tuple[str, int | None]:
    """Runs cmd in its own process group with its output appended to log_path (and echoed through `echo`, which
    writes gpu-check.log, when given); ("ok" | "failed" | "timeout", return code). On timeout the whole group is
    killed, so pytest-xdist workers or a sanitized python do not outlive their step."""
    with log_path.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT, text=True,
                            errors="replace", start_new_session=True)

    def pump():
        with log_path.open("a") as f:
            for line in proc.stdout:
                if echo is not None and echo.path == log_path:
                    echo(line.rstrip("\n"))
                    continue
                f.write(line)
                f.flush()
                if echo is not None:
                    echo(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(5)
        with log_path.open("a") as f:
            f.write(f"\n[gpu-check] timed out after {timeout:.0f} s: process group {proc.pid} killed\n")
        return "timeout", None
    reader.join(10)
    return ("ok" if rc == 0 else "failed"), rc


def _tail(path: Path, n: int = 15) -> list[str]:
    return path.read_text(errors="replace").splitlines()[-n:] if path.exists() else []


# ------------------------------------------------------------------------------------------------------- steps
def step_env(out: Path, log: Log, timeout: float) -> dict:
    from dsc_kernels.experiments import records
    dry = _dry()
    env = records.environment("cpu" if dry else "cuda")
    (out / "env.tmp.json").write_text(json.dumps(env, indent=1, default=str))
    log(f"  device {env.get('device')}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
        f"commit {env['commit'][:12]}, source {env['source_hash']}")
    if dry:
        log("  SKIP (no GPU): clocks and device properties")
    else:
        log(f"  clocks: {env.get('nvidia_smi')}")
    return {"status": "ok"}


def step_tests(out: Path, log: Log, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-q", "-rfE", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("xdist") is not None and not _dry():
        cmd += ["-n", "4"]
    if _dry():
        log("  SKIP (no GPU): the gpu tests are collected and skipped (rehearses collection without the interpreter)")
    status, rc = _run(cmd, out / "tests.log", timeout, _child_env(TRITON_INTERPRET="0"))
    summary = next((line for line in reversed(_tail(out / "tests.log", 40))
                    if re.search(r"\d+ (passed|failed|skipped|errors?|deselected)", line)), "")
    log(f"  {status} (rc {rc}): {summary.strip()}")
    if status != "ok":
        for line in _tail(out / "tests.log", 25):
            log("    " + line)
    return {"status": status, "rc": rc, "summary": summary.strip()}


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    for candidate in ("/usr/local/cuda/bin/compute-sanitizer", "/opt/nvidia/compute-sanitizer/compute-sanitizer"):
        if found is None and os.path.exists(candidate):
            found = candidate
    return found


def step_sanitize(out: Path, log: Log, timeout: float) -> dict:
    deadline = time.time() + timeout
    log_path = out / "sanitizer.log"
    me = [sys.executable, str(Path(__file__).resolve())]
    dry = _dry()
    # Plain first: a functional check of the cases, and Triton's cache is warm for the sanitized runs.
    status, rc = _run(me + ["--sanitize-cases", "all"], log_path, deadline - time.time(),
                      _child_env(TRITON_INTERPRET="1" if dry else "0"))
    result = {"status": status, "plain": status}
    log(f"  cases, plain{' (interpreter)' if dry else ''}: {status}")
    tool = _sanitizer()
    if dry or tool is None:
        log(f"  SKIP ({'no GPU' if dry else 'compute-sanitizer not found'}): memcheck and racecheck")
        return result
    for name, cases in (("memcheck", "all"), ("racecheck", "race")):
        left = deadline - time.time()
        if left < 10:
            log(f"  SKIP (time box): {name}")
            result[name] = "skipped: time box"
            continue
        cmd = [tool, "--tool", name, "--error-exitcode", "9", "--print-limit", "20", *me, "--sanitize-cases", cases]
        status, rc = _run(cmd, log_path, left, _child_env(TRITON_INTERPRET="0", PYTORCH_NO_CUDA_MEMORY_CACHING="1"))
        errors = [line for line in _tail(log_path, 400) if "ERROR SUMMARY" in line or "RACECHECK SUMMARY" in line]
        result[name] = f"{status} (rc {rc}) {errors[-1].strip() if errors else ''}"
        log(f"  {name}: {result[name]}")
        if status != "ok":
            result["status"] = status
    return result


def step_bench(out: Path, log: Log, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--bench-step", str(out), str(time.time() + timeout)]
    # The measurements run in a child: a CUDA error there (an illegal address poisons the context) costs only the
    # group in flight, since the child rewrites run.json after every group.
    status, rc = _run(cmd, out / "gpu-check.log", timeout + 30, _child_env(TRITON_INTERPRET="0"), echo=log)
    return {"status": status, "rc": rc}


def step_summary(out: Path, log: Log, steps: dict) -> dict:
    from dsc_kernels.experiments import records
    run_path = out / "run.json"
    doc = json.loads(run_path.read_text()) if run_path.exists() else None
    lines = ["# GPU check", ""]
    env_path = out / "env.tmp.json"
    env = doc["environment"] if doc else (json.loads(env_path.read_text()) if env_path.exists() else {})
    lines += [f"{env.get('device')} — torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
              f"commit {str(env.get('commit'))[:12]}, source {env.get('source_hash')}", "",
              "| step | status | seconds | detail |", "| --- | --- | --- | --- |"]
    for name, s in steps.items():
        detail = "; ".join(f"{k}: {v}" for k, v in s.items() if k not in ("status", "seconds"))
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', 0):.0f} | {detail[:300]} |")
    if doc:
        if doc.get("ceilings"):
            lines += ["", "Ceilings: " + ", ".join(f"{k} {v:.3g}" for k, v in doc["ceilings"].items()
                                                  if isinstance(v, float))]
        lines += ["", "## Benchmarks", ""] + records.markdown_table(doc["results"])
        if doc.get("plan"):
            lines += ["", "Plan:", ""] + [f"- {p}" for p in doc["plan"]]
        doc["steps"] = steps
        run_path.write_text(json.dumps(doc, indent=1, default=str))
    else:
        lines += ["", "No benchmark results (see gpu-check.log)."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    if env_path.exists():
        env_path.unlink()
    log("\n".join(lines))
    return {"status": "ok"}


# ------------------------------------------------------------------------------------------- sanitizer cases
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
    paths = {"single-launch": 1 << 40, "per-iteration": 0}
    for case, opts in T.HALF_CASES.items():
        opts = dict(opts)
        recompute = opts.pop("recompute", False)
        for path, limit in paths.items():
            if which == "race" and path != "single-launch":
                continue
            tci.SINGLE_LAUNCH_MAX_CODE_BYTES = limit
            T._check_at_scale(T._problem(device=device, kink_free=False, **opts), torch.bfloat16, recompute=recompute)
            print("conv case", case, "bf16", path, "ok", flush=True)
    gen = torch.Generator().manual_seed(0)
    for mode, causal, dtype in (("sparsemax", True, torch.float16), ("shrink", False, torch.bfloat16)):
        q, k, v = (torch.randn(2, 3, n, 24, generator=gen).to(device, dtype).requires_grad_() for n in (77, 50, 50))
        th = torch.full((3,), 0.3, device=device, dtype=dtype)
        o = DF.sparse_attention(q, k, v, mode=mode, threshold=th if mode == "shrink" else None, causal=causal,
                                backend="triton")
        if which != "race":
            o.float().square().sum().backward()
        assert torch.isfinite(o).all() and (which == "race" or torch.isfinite(q.grad).all())
        print("attention case", mode, "causal" if causal else "full", str(dtype).removeprefix("torch."), "ok",
              flush=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return 0


# -------------------------------------------------------------------------------------------------- the bench
def warm_compile(deadline: float) -> int:
    """torch.compile (default mode) of the conv reference on every GPU workload and mode, in the bench's order and
    exactly as measure_conv's gate first calls it, so that the bench step finds Inductor's FX-graph and AOTAutograd
    caches warm. It runs beside the tests and sanitizer steps and is killed when the bench starts, so its compiling
    overlaps them instead of the timed part (max-autotune is not warmed: its autotuning would time kernels on a busy
    GPU). Prints "warmed <workload> <mode> <seconds>" per group; the bench's planner reads those lines."""
    import torch

    from dsc_kernels.experiments import speed as S
    device = "cpu" if _dry() else "cuda"
    workloads = S.workloads(device)
    for name in [w for w in CONV_ORDER if w in workloads]:
        for mode in S.MODES:
            if time.time() > deadline:
                return 0
            t0 = time.time()
            inputs = S.make_inputs(workloads[name], device, requires_grad=mode == "forward_backward",
                                   scale=0.25 if _dry() else 1.0)
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
    return {"copy_TBps": 2 * a.numel() * 4 / (t["copy"].median_ms * 1e-3) / 1e12,
            "bf16_matmul_TFLOPps": 2 * 8192 ** 3 / (t["matmul"].median_ms * 1e-3) / 1e12,
            "samples": {k: v.to_dict() for k, v in t.items()}}


def bench_step(out: Path, deadline: float) -> int:
    import torch

    from dsc_kernels.experiments import attention_speed as A
    from dsc_kernels.experiments import records
    from dsc_kernels.experiments import speed as S
    log = print  # the parent echoes this process's output into gpu-check.log
    dry = _dry()
    device = "cpu" if dry else "cuda"
    results: dict[tuple, list[dict]] = {}
    plan: list[str] = []
    ceilings: dict = {}
    method = {"timing": "experiments.measure.time_interleaved: " + (
        "CUDA events, L2 flushed before each call, rounds interleaved, median" if not dry else "perf_counter"),
              "memory": "experiments.measure.measure_memory (peak above the start)",
              "check": "experiments.tolerance.gate against fp64 before timing",
              "dry_run": dry}

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
            note(f"ceilings: copy {ceilings['copy_TBps']:.2f} TB/s, bf16 matmul "
                 f"{ceilings['bf16_matmul_TFLOPps']:.0f} TFLOP/s")
        except Exception as err:  # noqa: BLE001
            note(f"ceilings failed: {type(err).__name__}: {err}"[:300])
    rounds, budget = (2, 10.0) if dry else (7, 20.0)

    # Attention first: cheap, and no compilation.
    if dry:
        attn = [((1, 4, 256, 64), False, ["sdpa-flash", "sdpa-efficient", "sdpa-math", "dense-sparsemax", "cpp",
                                          "cpp-shrink90"], torch.float32)]
        note("SKIP (no GPU): attention at N = 4096/8192 in fp16 (the dry run times a CPU shape)")
    else:
        attn = [((4, 8, 4096, 64), False, ["sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "dense-sparsemax", "triton",
                                           "triton-shrink90"], torch.float16),
                ((4, 8, 4096, 64), True, ["sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "dense-sparsemax", "triton"],
                 torch.float16),
                ((4, 8, 8192, 64), False, ["sdpa-flash", "dense-sparsemax", "triton"], torch.float16)]
    for shape, causal, providers, dtype in attn:
        for backward in (False, True):
            if left() < 30:
                note(f"budget: attention {shape} causal={causal} backward={backward} not measured "
                     f"({left():.0f} s left)")
                continue
            t0 = time.time()
            recs = A.measure_attention(shape, device, providers, causal=causal, backward=backward, dtype=dtype,
                                       rounds=rounds, warmup=2, budget_s=budget, suite="gpu-check-attention")
            results[("attn", shape, causal, backward)] = recs
            save()
            note(f"attention {shape} causal={causal} {'fwd+bwd' if backward else 'fwd'}: {time.time() - t0:.0f} s, "
                 + ", ".join(f"{r['provider']} {r['status']}" for r in recs))

    # Conv: every group with its base providers, then again with compile, then with max-autotune, while they fit.
    workloads = S.workloads(device)
    order = [w for w in CONV_ORDER if w in workloads]
    base = ["reference", "reference-channels_last", "cpp", "cpp-recompute", "triton", "triton-recompute"]
    autotune = os.environ.get("DSC_GPU_CHECK_AUTOTUNE", "small-map,deep-layer")
    autotune = [] if autotune == "none" else autotune.split(",")
    scale = 0.25 if dry else 1.0
    compile_seen: dict[str, list[float]] = {"forward": [], "forward_backward": []}

    def measure(name, mode, providers, label):
        t0 = time.time()
        recs = S.measure_conv(workloads[name], device, mode, providers, rounds=rounds, warmup=2, budget_s=budget,
                              scale=scale, suite="gpu-check-conv")
        results[("conv", name, mode)] = recs
        save()
        note(f"{label} {name} {mode}: {time.time() - t0:.0f} s, "
             + ", ".join(f"{r['provider']} {r['status']}"
                         + (f" (first call {r['first_call_s']:.0f} s)" if r.get("first_call_s", 0) > 5 else "")
                         for r in recs if r["status"] != "skipped"))
        for r in recs:
            if r["provider"] == "compile" and r.get("first_call_s") and (name, mode) not in warmed:
                compile_seen[mode].append(r["first_call_s"])

    warmed = _warmed(out)
    if warmed:
        note("compile caches warmed for: " + ", ".join(f"{w} {m}" for w, m in sorted(warmed)))

    def compile_estimate(name: str, mode: str) -> float:
        if (name, mode) in warmed:
            return EST["warm_compile"]
        seen = compile_seen[mode]
        return 1.5 * max(seen) if seen else EST["compile"][mode]

    groups = [(w, m) for w in order for m in S.MODES]
    for i, (name, mode) in enumerate(groups):
        if left() < EST["base"]:
            note(f"budget: {name} {mode} not measured ({left():.0f} s left)")
            continue
        measure(name, mode, base, "base")
    for with_autotune in (False, True):
        for name, mode in groups:
            if with_autotune and name not in autotune:
                continue
            cost = compile_estimate(name, mode) * (EST["autotune_factor"] if with_autotune else 1.0) + EST["base"]
            extra = ["compile", "compile-max-autotune"] if with_autotune else ["compile"]
            if left() < cost:
                note(f"budget: {'+'.join(extra)} on {name} {mode} not measured (estimated {cost:.0f} s, "
                     f"{left():.0f} s left)")
                continue
            measure(name, mode, base + extra, "+" + "+".join(extra))
    save()
    return 0


# ------------------------------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sanitize-cases", choices=("all", "race"))
    parser.add_argument("--bench-step", nargs=2, metavar=("OUT", "DEADLINE"))
    parser.add_argument("--warm-compile", metavar="DEADLINE", type=float)
    args = parser.parse_args()
    if args.sanitize_cases:
        return sanitize_cases(args.sanitize_cases)
    if args.warm_compile:
        return warm_compile(args.warm_compile)
    if args.bench_step:
        return bench_step(Path(args.bench_step[0]), float(args.bench_step[1]))

    start = time.time()
    total = float(os.environ.get("DSC_GPU_CHECK_BUDGET_S", 450))
    wanted = os.environ.get("DSC_GPU_CHECK_STEPS", ",".join(STEPS)).split(",")
    out = _out_dir()
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu-check.log")
    dry = _dry()
    log(f"[gpu-check] {'DRY RUN (no GPU): device-only parts are skipped' if dry else 'GPU run'}; budget {total:.0f} s;"
        f" results in {out}")
    steps: dict[str, dict] = {}
    warm = None
    if "bench" in wanted and {"tests", "sanitize"} & set(wanted) and os.environ.get("DSC_GPU_CHECK_WARM") != "0":
        log("[gpu-check] compiling the bench's torch.compile baselines in the background (warm.log)")
        with (out / "warm.log").open("a") as f:
            warm = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--warm-compile",
                                     str(start + total)], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env=_child_env(TRITON_INTERPRET="0"), start_new_session=True)
    for name in STEPS:
        if name not in wanted and name != "summary":
            continue
        if name == "bench" and warm is not None and warm.poll() is None:
            os.killpg(warm.pid, signal.SIGKILL)  # no compiling beside the timed part
            warm.wait()
        t0 = time.time()
        remaining = start + total - t0 - BOXES["summary"]
        box = remaining if BOXES[name] is None else min(BOXES[name], remaining)
        log(f"[gpu-check] step {name} (box {box:.0f} s, {start + total - t0:.0f} s left)")
        try:
            if name == "summary":
                steps[name] = {"status": "ok", "seconds": 0.0}
                step_summary(out, log, steps)
                continue
            if box < 5:
                steps[name] = {"status": "skipped: no time left"}
            else:
                steps[name] = {"env": step_env, "tests": step_tests, "sanitize": step_sanitize,
                               "bench": step_bench}[name](out, log, box)
        except Exception as err:  # noqa: BLE001 - a broken step is a line of the summary, not the end of the run
            steps[name] = {"status": f"error: {type(err).__name__}: {err}"[:300]}
            log(f"  {steps[name]['status']}")
        steps[name]["seconds"] = time.time() - t0
    log(f"[gpu-check] done in {time.time() - start:.0f} s")
    return 0 if all(s["status"] == "ok" for s in steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
