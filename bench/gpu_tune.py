"""Triton configuration sweep for a GPU lease (`make gpu-tune`), to run after `make gpu-check`.

The first H200 run (bench/results/gpu-check-h200-2026-12-04) measured the fused conv-ISTA kernels at 0.13-0.28x
eager cuDNN's speed and the attention kernels 6.5-25x behind SDPA. Their configurations had been chosen from
compiler reports alone. This script times alternatives on the benchmark workloads, so that a lease picks
configurations from measurements:
    conv-strategy  the forward strategies (two-pass, tiles, single-launch) and the flattened reduction order in
               place of tap-major, forward and training step: the default's choice between them is a prediction
               from the compiled kernels (triton/conv_ista/kernels.py header) until this times it
    conv-fwd   FwdConfig variants (tile rows and columns, halo chunk, reduction slice, warps, stages): the fused
               tile forward, on the workloads whose default forward it is (csc-gray)
    conv-bwd   ConvConfig variants (positions per program, reduction slice, splits, warps, stages): a training
               step (these tiles also drive the two-pass forward)
    attention  block sizes, warps and stages: sparsemax and shrink, forward and forward + backward
Each variant is first checked against the default configuration's result on the same inputs: the relative l2
difference of every output (z; the gradients of x and weight; of q, k and v). A variant past 1e-2 is "wrong" and
is not timed. The rest are timed with triton.testing.do_bench (median ms, CUDA events) and reported as a speedup
over the default. Files: tune.json and tune.md in DSC_GPU_CHECK_OUT, else $OUT, else bench/results/gpu-tune-<time>;
the table is printed last. DSC_GPU_TUNE_BUDGET_S (default 300) bounds the run: a variant that would start past it is
recorded as skipped.

Without a GPU (or with DSC_GPU_CHECK_DRY_RUN=1) it runs under Triton's interpreter on tiny shapes: every variant is
checked and none is timed. That rehearses the script, and checks that every configuration computes the same function
(tests/test_gpu_tune.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check_children import dry_run, env_seconds  # noqa: E402

DRY = dry_run()
if DRY:  # Triton reads this when its kernels are first imported, below
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import dsc_kernels.functional as DF  # noqa: E402
from dsc_kernels.experiments import measure, records, speed  # noqa: E402
from dsc_kernels.triton import conv_ista as tci  # noqa: E402
from dsc_kernels.triton.conv_ista import backward as tci_backward  # noqa: E402
from dsc_kernels.triton.conv_ista import forward as tci_forward  # noqa: E402
from dsc_kernels.triton.sparse_attention import launchers as tsa_launchers  # noqa: E402

WRONG = 1e-2
# (TH, TW, R_CHUNK, BLOCK_K, num_warps, num_stages); BLOCK_C and BLOCK_CI stay the default's (set by channel counts)
CONV_FWD = [(8, 16, 64, 32, 8, 2), (8, 16, 64, 16, 4, 2), (8, 16, 64, 16, 8, 3), (4, 16, 64, 16, 4, 2)]
CONV_FWD += [(8, 32, 128, 16, 8, 2), (16, 16, 128, 16, 8, 2)]
# (BLOCK_P, BLOCK_K, max_splits, num_warps, num_stages)
CONV_BWD = [(64, 64, 512, 8, 2), (128, 32, 512, 8, 2), (128, 64, 512, 4, 2), (128, 64, 128, 8, 2), (128, 32, 512, 8, 3)]
# (forward strategy, tap-major threshold): label
CONV_STRATEGY = {
    "two-pass": ("two-pass", None),
    "tiles": ("tiles", None),
    "single-launch": ("single-launch", None),
    "flattened reductions": (None, 1 << 30),
}
# (BLOCK_M, BLOCK_N, num_warps, num_stages)
ATTENTION = [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 2), (128, 32, 4, 3), (64, 32, 4, 3), (64, 64, 8, 3)]
# Candidate slots per query row of the sparsemax forward (default 64): fewer cost more passes on flat rows, more
# cost scratch and a wider resolve.
ATTENTION_SLOTS = [32, 128]


def _out_dir() -> Path:
    for name in ("DSC_GPU_CHECK_OUT", "OUT"):
        if os.environ.get(name):
            return Path(os.environ[name])
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    if DRY:
        return Path(tempfile.gettempdir()) / f"dsc-gpu-tune-dry-run-{stamp}"
    return ROOT / "bench" / "results" / f"gpu-tune-{stamp}"


@contextlib.contextmanager
def _patched(modules: tuple, name: str, value):
    """`name` set to `value` in every one of `modules`: each module that reads it holds its own reference."""
    saved = [getattr(module, name) for module in modules]
    for module in modules:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, old in zip(modules, saved):
            setattr(module, name, old)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _time_ms(fn) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


# ------------------------------------------------------------------------------------------------ the problems
def _conv_problems(device: str) -> dict:
    if DRY:
        return {"tiny": speed.Workload("tiny", (2, 3, 10, 9), (5, 3, 3, 3), (2, 3, 10, 9), (5, 3, 3, 3), 1, 1, 3)}
    return {name: speed.GPU_WORKLOADS[name] for name in ("small-map", "deep-layer", "csc-gray")}


def _conv_fns(w: speed.Workload, device: str) -> dict:
    """forward: () -> [z]; step: () -> [dL/dx, dL/dweight] of L = sum z."""
    inputs = speed.make_inputs(w, device, requires_grad=True)
    x, weight = inputs["x"], inputs["weight"]
    n = w.n_iter
    lam = torch.full((n, weight.shape[0]), inputs["lam"], device=device)
    step = torch.full((n,), float(inputs["step"]), device=device)
    geo = ([w.stride] * 2, [w.padding] * 2, False, False)

    def forward():
        with torch.no_grad():
            return [tci.conv_ista_fwd(x, weight, weight, lam, step, x.new_empty(0), *geo, -1)[0]]

    cotangent = []  # made once, outside the timed calls after the first

    def training_step():
        z = DF.conv_ista(
            x,
            weight,
            inputs["lam"],
            n_iter=n,
            step=inputs["step"],
            stride=w.stride,
            padding=w.padding,
            backend="triton",
        )
        if not cotangent:  # random, not sum(z) (measure.random_cotangent says why)
            cotangent.append(measure.random_cotangent(z))
        return list(torch.autograd.grad(z, (x, weight), cotangent[0]))

    return {"forward": forward, "forward_backward": training_step}


def _runs_tile_forward(w: speed.Workload) -> bool:
    """Whether the default forward of `w` is a fused tile kernel (tiles or single-launch), not two-pass."""
    c_code, c_sig = (w.w_cpu if DRY else w.w_gpu)[:2]
    return tci.forward_strategy(c_sig, c_code, code_bytes=0) != "two-pass"


def _attention_fns(device: str) -> dict:
    shape = (1, 2, 40, 16) if DRY else (4, 8, 4096, 64)
    dtype = torch.float32 if DRY else torch.float16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(shape, generator=g).to(device, dtype)
    fns = {}
    for mode in ("sparsemax", "shrink"):
        extra = dict(threshold=0.9) if mode == "shrink" else {}

        def forward(mode=mode, extra=extra):
            with torch.no_grad():
                return [DF.sparse_attention(q, k, v, mode=mode, backend="triton", **extra)]

        def step(mode=mode, extra=extra):
            out = DF.sparse_attention(q, k, v, mode=mode, backend="triton", **extra)
            return list(torch.autograd.grad(out, (q, k, v), grad))

        fns[(mode, "forward")] = forward
        fns[(mode, "forward_backward")] = step
    return fns


# ------------------------------------------------------------------------------------------------ the sweep
class Sweep:
    def __init__(self, budget_s: float):
        self.deadline = time.time() + budget_s
        self.records: list[dict] = []

    def group(
        self, group: str, workload: str, mode: str, fn, variants: list[tuple[str, contextlib.AbstractContextManager]]
    ):
        """Time `fn` at the default configuration, then under each variant's patch, each checked first. A group that
        starts past the deadline is skipped whole: its default alone (a first call that may compile, then timing)
        would overrun the lease."""
        base = dict(group=group, workload=workload, mode=mode)
        if time.time() > self.deadline:
            self.records.append(dict(base, variant="(group)", status="skipped: budget"))
            return
        try:
            expected = [t.detach().clone() for t in fn()]
            default_ms = None if DRY else _time_ms(fn)
        except Exception as err:  # noqa: BLE001 - one failing group is a line of the table, not the end of the run
            self.records.append(dict(base, variant="default", status=f"failed: {type(err).__name__}: {err}"[:300]))
            return
        self.records.append(dict(base, variant="default", status="ok", diff=0.0, ms=default_ms, speedup=1.0))
        for name, patch in variants:
            if time.time() > self.deadline:
                self.records.append(dict(base, variant=name, status="skipped: budget"))
                continue
            record = dict(base, variant=name)
            try:
                with patch:
                    got = fn()
                    record["diff"] = max(_rel(a, b) for a, b in zip(got, expected))
                    if record["diff"] > WRONG:
                        record["status"] = "wrong"
                    else:
                        record["status"] = "ok"
                        if not DRY:
                            record["ms"] = _time_ms(fn)
                            record["speedup"] = default_ms / record["ms"]
            except Exception as err:  # noqa: BLE001 - a variant that does not compile (resources) is a result too
                record["status"] = f"failed: {type(err).__name__}: {err}"[:300]
            self.records.append(record)
            print(f"  {group} {workload} {mode} {name}: {record['status']} {record.get('speedup', '')}", flush=True)


def _variants(modules: tuple, function: str, fields: tuple[str, ...], values: list[tuple]) -> list:
    """(label, patch) per entry of `values`: `function` (in every module of `modules` that calls it) returns the
    default configuration (a NamedTuple or a dict) with `fields` set to the entry's values."""
    original = getattr(modules[0], function)
    out = []
    for entry in values:
        change = dict(zip(fields, entry))

        def config(*args, change=change):
            default = original(*args)
            return dict(default, **change) if isinstance(default, dict) else default._replace(**change)

        out.append((" ".join(f"{k}={v}" for k, v in change.items()), _patched(modules, function, config)))
    return out


def _conv_fwd_variants():
    return _variants(
        (tci_forward,), "fwd_config", ("TH", "TW", "R_CHUNK", "BLOCK_K", "num_warps", "num_stages"), CONV_FWD
    )


def _conv_bwd_variants():
    return _variants(
        (tci_forward, tci_backward),
        "conv_config",
        ("BLOCK_P", "BLOCK_K", "max_splits", "num_warps", "num_stages"),
        CONV_BWD,
    )


def _conv_strategy_variants():
    return [(label, tci.strategy(*pinned)) for label, pinned in CONV_STRATEGY.items()]


def _attention_variants():
    tiles = _variants((tsa_launchers,), "_config", ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), ATTENTION)
    slots = [(f"CAP={cap}", _patched((tsa_launchers,), "_slots", lambda cap=cap: cap)) for cap in ATTENTION_SLOTS]
    return tiles + slots


def _markdown(records: list[dict]) -> list[str]:
    lines = ["| group | workload | mode | variant | status | rel. diff | median ms | × default |"]
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in records:
        ms = f"{r['ms']:.3f}" if r.get("ms") is not None else ""
        speedup = f"{r['speedup']:.2f}" if r.get("speedup") is not None else ""
        diff = f"{r['diff']:.1e}" if r.get("diff") is not None else ""
        cells = (r["group"], r["workload"], r["mode"], r["variant"], r["status"], diff, ms, speedup)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    # --help (or any mistyped option) used to start the whole sweep, minutes of a GPU lease, as gpu_check.py's did
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    try:
        budget = env_seconds("DSC_GPU_TUNE_BUDGET_S", 300)
    except ValueError as err:
        parser.error(str(err))
    device = "cpu" if DRY else "cuda"
    out = _out_dir()
    out.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(budget)
    print(f"[gpu-tune] {'DRY RUN (interpreter, nothing timed)' if DRY else 'GPU run'}; results in {out}", flush=True)
    variants = {
        "conv-strategy": _conv_strategy_variants,
        "conv-fwd": _conv_fwd_variants,
        "conv-bwd": _conv_bwd_variants,
        "attention": _attention_variants,
    }
    doc = dict(
        schema="dsc_kernels.gpu-tune",
        device=torch.cuda.get_device_name() if not DRY else "cpu (interpreter)",
        torch=torch.__version__,
        # as gpu-check's run.json records them (DSC_GIT_COMMIT, else git): this file is committed beside it
        commit=records.git_commit(),
        source_hash=records.source_hash(),
        wrong_above=WRONG,
        variants={group: [name for name, _ in make()] for group, make in variants.items()},
        records=sweep.records,
    )

    def write() -> list[str]:  # after every group: a run cut off by the lease's limit keeps what it measured
        (out / "tune.json").write_text(json.dumps(doc, indent=1))
        table = _markdown(sweep.records)
        (out / "tune.md").write_text("\n".join(["# Triton configuration sweep", "", *table, ""]))
        return table

    for name, w in _conv_problems(device).items():
        fns = _conv_fns(w, device)
        for mode in ("forward", "forward_backward"):
            sweep.group("conv-strategy", name, mode, fns[mode], variants["conv-strategy"]())
            write()
        if _runs_tile_forward(w):  # FwdConfig tiles only the fused tile kernels: elsewhere its variants change nothing
            sweep.group("conv-fwd", name, "forward", fns["forward"], variants["conv-fwd"]())
            write()
        sweep.group("conv-bwd", name, "forward_backward", fns["forward_backward"], variants["conv-bwd"]())
        write()
    for (mode, pass_), fn in _attention_fns(device).items():
        sweep.group("attention", mode, pass_, fn, variants["attention"]())
        write()
    print("\n".join(write()))
    # A variant that does not compile (too many registers or too much shared memory) is a result; a wrong one is not.
    return 1 if any(r["status"] == "wrong" for r in sweep.records) else 0


if __name__ == "__main__":
    sys.exit(main())
