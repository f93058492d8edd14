"""The prepared GPU run (`make gpu-check`): everything a short lease of a bare H100/H200 needs, in one script that
finishes in under 8 minutes and writes everything into one folder.

It runs from the source tree with the machine's own python3/torch/triton (PYTHONPATH=.), installs nothing, and
needs no registry. Steps, each time-boxed (a failure or timeout is recorded and the run goes on):
    env       device, clocks (nvidia-smi), versions, commit, precision flags
    tests     the `gpu` tests, kernels compiled (pytest -m gpu tests; up to 8 xdist workers when pytest-xdist is there):
              every Triton kernel against the reference on odd shapes in fp32/fp16/bf16/TF32, opcheck, compile
    sanitize  the tiny cases of every Triton kernel once plain, then under compute-sanitizer
              memcheck (PyTorch's caching allocator off, so an out-of-bounds access leaves its allocation), then
              racecheck and synccheck on the single-launch conv kernel and the attention forward (racecheck sees
              shared-memory hazards only: the single-launch kernel hands data across its CTA barrier through global
              memory, whose ordering only the numeric `gpu` tests check; synccheck sees the barrier's misuse)
    bench     ceilings (device-to-device copy, bf16 matmul), then the docs/design.md §6 GPU workloads + small-map
              against eager cuDNN in NCHW and channels_last, torch.compile (default, max-autotune), forward and
              forward+backward, peak memory; attention against SDPA's flash/efficient/cuDNN backends and dense
              sparsemax. Every provider is checked against fp64 before it is timed; timing is interleaved CUDA-event
              medians (experiments/measure.py). Compilation is paid once per group outside the timing and only
              while it fits the budget: base providers first for every group, then groups re-measured with
              compile, then with max-autotune (DSC_GPU_CHECK_AUTOTUNE, default small-map,deep-layer); a group
              that does not fit says so.
    summary   summary.md (steps, tables, failures), printed at the end
While tests and sanitize run, a background process compiles the bench's torch.compile baselines (default mode) so
that Inductor's caches are warm when the bench starts (killed before the bench; DSC_GPU_CHECK_WARM=0 turns it off).
The sanitizer cases, the warm-up and the bench run as child processes of bench/gpu_check_children.py.
Files (six; the device tool returns at most 8, and `make gpu-tune` adds two in the same $OUT): run.json + run.csv (the
results document, experiments/records.py schema, with the steps and the plan), summary.md, gpu-check.log (this
output, the warm-up's log folded in), tests.log, sanitizer.log.

Environment: DSC_GPU_CHECK_OUT (folder; default $OUT when set, else bench/results/gpu-check-<time>),
DSC_GPU_CHECK_BUDGET_S (total seconds, default 440), DSC_GPU_CHECK_STEPS (e.g. "env,bench"),
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
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check_children import CONV_ORDER, dry_run, env_seconds  # noqa: E402

STEPS = ("env", "tests", "sanitize", "bench", "summary")
BOXES = {"env": 30, "tests": 150, "sanitize": 75, "bench": None, "summary": 10}  # bench: whatever is left
CHILDREN = Path(__file__).resolve().parent / "gpu_check_children.py"


def _out_dir() -> Path:
    if os.environ.get("DSC_GPU_CHECK_OUT"):
        return Path(os.environ["DSC_GPU_CHECK_OUT"])
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    if dry_run():  # a rehearsal's numbers are not results: keep them out of bench/results/
        return Path(tempfile.gettempdir()) / f"dsc-gpu-check-dry-run-{stamp}"
    return ROOT / "bench" / "results" / f"gpu-check-{stamp}"


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
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
        text=True,
        errors="replace",
        start_new_session=True,
    )

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

    dry = dry_run()
    env = records.environment("cpu" if dry else "cuda")
    (out / "env.tmp.json").write_text(json.dumps(env, indent=1, default=str))
    log(
        f"  device {env.get('device')}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
        f"commit {env['commit'][:12]}, source {env['source_hash']}"
    )
    if dry:
        log("  SKIP (no GPU): clocks and device properties")
    else:
        log(f"  clocks: {env.get('nvidia_smi')}")
    return {"status": "ok"}


# The files that hold gpu tests (tests/test_gpu_check.py checks the list is complete), the ones whose GPU results
# are most wanted first: the tests step names them instead of collecting tests/, whose other modules build or load
# the C++ extension at import (a minute of compilation on a bare machine before any test runs; the first H200 run's
# step ended without finishing collection) and import scipy, scikit-learn and hypothesis.
GPU_TEST_FILES = (
    "tests/test_triton_conv_ista_gpu.py",
    "tests/test_triton_tf32.py",
    "tests/test_triton_conv_ista.py",
    "tests/test_attention_ops.py",
    "tests/test_attention_nn.py",
    "tests/test_attention_reliability.py",
    "tests/test_half_precision.py",
)


def step_tests(out: Path, log: Log, timeout: float) -> dict:
    # One line per finished test (-v), so that a step cut off by its box still says what passed and failed (the
    # first H200 run's -q output held nothing after 150 s); a test past 45 s dumps every thread's stack
    # (faulthandler) and, where pytest-timeout is installed, fails at 90 s so that the others still run.
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", *GPU_TEST_FILES, "-v", "-rfE", "-p", "no:cacheprovider"]
    cmd += ["-o", "faulthandler_timeout=45", "--durations=15"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout=90"]
    if importlib.util.find_spec("xdist") is not None and not dry_run():
        # Triton compiles each kernel specialisation on one core, and most of a gpu test's time is compilation: a
        # worker per two cores (8 on the 16-core H200 machine; 4 gave no result within 150 s there).
        cmd += ["-n", str(max(2, min(8, (os.cpu_count() or 8) // 2)))]
    if dry_run():
        log("  SKIP (no GPU): the gpu tests are collected and skipped (rehearses collection without the interpreter)")
    status, rc = _run(cmd, out / "tests.log", timeout, _child_env(TRITON_INTERPRET="0"))
    lines = _tail(out / "tests.log", 100000)
    counts = {
        word.lower(): sum(1 for line in lines if re.search(rf"(::\S+|\]) {word}\b", line))
        for word in ("PASSED", "FAILED", "ERROR", "SKIPPED")
    }
    summary = (
        next(
            (
                line
                for line in reversed(lines[-40:])
                if re.search(r"\d+ (passed|failed|skipped|errors?|deselected)", line)
            ),
            "",
        ).strip()
        or ", ".join(f"{n} {k}" for k, n in counts.items()) + " when the step ended"
    )
    log(f"  {status} (rc {rc}): {summary}")
    if status != "ok":
        for line in [line for line in lines if re.search(r" (FAILED|ERROR)\b", line)][:20] or lines[-25:]:
            log("    " + line)
    return {"status": status, "rc": rc, "summary": summary, **counts}


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    for candidate in ("/usr/local/cuda/bin/compute-sanitizer", "/opt/nvidia/compute-sanitizer/compute-sanitizer"):
        if found is None and os.path.exists(candidate):
            found = candidate
    return found


def step_sanitize(out: Path, log: Log, timeout: float) -> dict:
    deadline = time.time() + timeout
    log_path = out / "sanitizer.log"
    me = [sys.executable, str(CHILDREN)]
    dry = dry_run()
    # Plain first: a functional check of the cases, and Triton's cache is warm for the sanitized runs.
    status, rc = _run(
        me + ["--sanitize-cases", "all"],
        log_path,
        deadline - time.time(),
        _child_env(TRITON_INTERPRET="1" if dry else "0"),
    )
    result = {"status": status, "plain": status}
    log(f"  cases, plain{' (interpreter)' if dry else ''}: {status}")
    tool = _sanitizer()
    if dry or tool is None:
        log(f"  SKIP ({'no GPU' if dry else 'compute-sanitizer not found'}): memcheck and racecheck")
        return result
    # racecheck sees shared-memory hazards only; synccheck sees barrier misuse (a CTA barrier inside divergent code).
    for name, cases in (("memcheck", "all"), ("racecheck", "race"), ("synccheck", "race")):
        left = deadline - time.time()
        if left < 10:
            log(f"  SKIP (time box): {name}")
            result[name] = "skipped: time box"
            continue
        cmd = [
            tool,
            "--tool",
            name,
            "--error-exitcode",
            "9",
            "--print-limit",
            "20",
            "--target-processes",
            "all",
            *me,
            "--sanitize-cases",
            cases,
        ]
        started = time.time()
        env = _child_env(TRITON_INTERPRET="0", PYTORCH_NO_CUDA_MEMORY_CACHING="1", DSC_SANITIZE_LAUNCH_ONLY="1")
        status, rc = _run(cmd, log_path, left, env)
        errors = [line for line in _tail(log_path, 400) if "ERROR SUMMARY" in line or "RACECHECK SUMMARY" in line]
        result[name] = f"{status} (rc {rc}, {time.time() - started:.0f} s) {errors[-1].strip() if errors else ''}"
        log(f"  {name}: {result[name]}")
        if status != "ok":
            result["status"] = status
    return result


def step_bench(out: Path, log: Log, timeout: float) -> dict:
    # The child starts no group it cannot finish by its deadline (by its estimates); a group that overruns them is
    # cut off at the box's end.
    cmd = [sys.executable, str(CHILDREN), "--bench-step", str(out), str(time.time() + timeout - 15)]
    # The measurements run in a child: a CUDA error there (an illegal address poisons the context) costs only the
    # group in flight, since the child rewrites run.json after every group.
    status, rc = _run(cmd, out / "gpu-check.log", timeout, _child_env(TRITON_INTERPRET="0"), echo=log)
    return {"status": status, "rc": rc}


def step_summary(out: Path, log: Log, steps: dict) -> dict:
    from dsc_kernels.experiments import records

    env_path = out / "env.tmp.json"
    env_text = env_path.read_text() if env_path.exists() else "{}"
    env_path.unlink(missing_ok=True)  # first: a summary that fails below must not leave a 9th file for the tool
    run_path = out / "run.json"
    try:
        doc = json.loads(run_path.read_text()) if run_path.exists() else None
    except json.JSONDecodeError:  # a rewrite cut off by the bench box's kill
        doc = None
        log("  run.json unreadable (cut off mid-write?): the summary lists the steps only")
    lines = ["# GPU check", ""]
    env = doc["environment"] if doc else json.loads(env_text)
    lines += [
        f"{env.get('device')} — torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
        f"commit {str(env.get('commit'))[:12]}, source {env.get('source_hash')}",
        "",
        "| step | status | seconds | detail |",
        "| --- | --- | --- | --- |",
    ]
    for name, s in steps.items():
        detail = "; ".join(f"{k}: {v}" for k, v in s.items() if k not in ("status", "seconds"))
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', 0):.0f} | {detail[:300]} |")
    if doc:
        if doc.get("ceilings"):
            lines += [
                "",
                "Ceilings: " + ", ".join(f"{k} {v:.3g}" for k, v in doc["ceilings"].items() if isinstance(v, float)),
            ]
        lines += ["", "## Benchmarks", ""] + records.markdown_table(doc["results"])
        if doc.get("plan"):
            lines += ["", "Plan:", ""] + [f"- {p}" for p in doc["plan"]]
        doc["steps"] = steps
        run_path.write_text(json.dumps(doc, indent=1, default=str))
    else:
        lines += ["", "No benchmark results (see gpu-check.log)."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    log("\n".join(lines))
    return {"status": "ok"}


def _fold(path: Path, log: Log) -> None:
    """Move a side log into gpu-check.log: the device tool returns at most 8 files, and gpu-tune's two share $OUT."""
    if path.exists():
        log(f"[gpu-check] {path.name}:")
        for line in path.read_text(errors="replace").splitlines():
            log("  " + line)
        path.unlink()


# ------------------------------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()

    start = time.time()
    try:
        total = env_seconds("DSC_GPU_CHECK_BUDGET_S", 440)
    except ValueError as err:
        parser.error(str(err))
    wanted = os.environ.get("DSC_GPU_CHECK_STEPS", ",".join(STEPS)).split(",")
    if unknown := [name for name in wanted if name not in STEPS]:  # a misspelt step was skipped silently
        parser.error(f"DSC_GPU_CHECK_STEPS: unknown steps {unknown}; the steps are {','.join(STEPS)}")
    # the bench reads it minutes into the lease, where a misspelt workload silently got no max-autotune run
    autotune = os.environ.get("DSC_GPU_CHECK_AUTOTUNE")
    if autotune is not None and autotune != "none":
        if unknown := [name for name in autotune.split(",") if name not in CONV_ORDER]:
            parser.error(
                f"DSC_GPU_CHECK_AUTOTUNE: unknown workloads {unknown}; the workloads are {','.join(CONV_ORDER)} "
                "(or none)"
            )
    out = _out_dir()
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu-check.log")
    dry = dry_run()
    log(
        f"[gpu-check] {'DRY RUN (no GPU): device-only parts are skipped' if dry else 'GPU run'}; budget {total:.0f} s;"
        f" results in {out}"
    )
    steps: dict[str, dict] = {}
    warm = None
    if "bench" in wanted and {"tests", "sanitize"} & set(wanted) and os.environ.get("DSC_GPU_CHECK_WARM") != "0":
        log("[gpu-check] compiling the bench's torch.compile baselines in the background (log below, after the bench)")
        with (out / "warm.log").open("a") as f:
            warm = subprocess.Popen(
                [sys.executable, str(CHILDREN), "--warm-compile", str(start + total)],
                stdout=f,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=_child_env(
                    TRITON_INTERPRET="0", TORCHINDUCTOR_COMPILE_THREADS=str(max(1, (os.cpu_count() or 2) // 2))
                ),
                start_new_session=True,
            )
    for name in STEPS:
        if name not in wanted and name != "summary":
            continue
        if name == "bench" and warm is not None:
            if warm.poll() is None:
                os.killpg(warm.pid, signal.SIGKILL)  # no compiling beside the timed part
                warm.wait()
            warm = None
        if name == "summary":
            # Not before the bench: its planner reads warm.log to know which groups compile from a warm cache (folded
            # first, the planner saw none and estimated every compile group cold).
            _fold(out / "warm.log", log)
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
                steps[name] = {"env": step_env, "tests": step_tests, "sanitize": step_sanitize, "bench": step_bench}[
                    name
                ](out, log, box)
        except Exception as err:  # noqa: BLE001 - a broken step is a line of the summary, not the end of the run
            steps[name] = {"status": f"error: {type(err).__name__}: {err}"[:300]}
            log(f"  {steps[name]['status']}")
        steps[name]["seconds"] = time.time() - t0
    log(f"[gpu-check] done in {time.time() - start:.0f} s")
    return 0 if all(s["status"] == "ok" for s in steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
