"""The CPU conv-ISTA shape sweep: where the fused `cpp` backend (each of its strategies) and `auto` stand against
eager PyTorch, over the shapes DSC users run.

`python -m dsc_kernels.experiments.sweep --out DIR [--quick] [--threads 2] [--rounds 5] [--compile]` writes
DIR/sweep.json (every measurement, with the machine), DIR/sweep.png (ratio to eager per shape) and DIR/sweep.md (a
table per shape plus the worst and geometric-mean ratios per provider); bench/test_sweep.py runs the same
measurement under pytest.

Providers: "reference" (eager autograd, the baseline), "compile" (torch.compile of the reference; opt-in, Inductor
needs minutes per shape on two cores), "cpp-direct" and "cpp-gemm" (the cpp backend with
DSC_KERNELS_CPP_STRATEGY forcing one strategy), "cpp" (its own per-shape choice) and "auto" (functional's default
backend choice). Every provider's output and gradients are compared with the reference's before it is timed.

Measurement (per shape, fixed thread count): forward without grad and forward + backward of sum(z) into x and the
weights, timed in interleaved rounds (each round runs every provider once, so load drifts hit all alike) with
speed.time_ms, median over rounds; training-step peak memory with speed.train_step_peak_bytes, in save mode and (cpp
strategies) recompute mode. Ratios are eager time / provider time (> 1: faster than eager) and provider memory /
eager memory (< 1: leaner).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import _cli_args as cli_args
from .. import functional as DF
from ..reference import conv_ista_ref
from ..reference.conv import code_size
from . import measure, records
from . import speed as S

PROVIDERS = ("reference", "compile", "cpp-direct", "cpp-gemm", "cpp", "auto")
STRATEGY_ENV = "DSC_KERNELS_CPP_STRATEGY"


@dataclass(frozen=True)
class SweepShape:
    """One conv-ISTA problem: x (B, C_sig, H, W) or (B, C_sig, L); weight (C_code, C_sig, *kernel)."""

    name: str
    x: tuple[int, ...]
    weight: tuple[int, ...]
    stride: int = 1
    padding: int = 0
    n_iter: int = 10
    fista: bool = False
    untied: bool = False
    nonneg: bool = False

    @property
    def many_channel(self) -> bool:
        """GEMM-bound shapes, where the memory goals are checked too."""
        return self.x[1] >= 8 and self.weight[0] >= 32

    def floor_bytes(self, element_size: int = 4) -> int:
        """What any training step on this shape allocates and keeps: z_n and the gradients of x and the dictionaries
        (and the encoder's when untied), whatever the implementation keeps besides."""
        rank = len(self.x) - 2
        z = (
            self.x[0]
            * self.weight[0]
            * math.prod(code_size(self.x[2:], self.weight[2:], (self.stride,) * rank, (self.padding,) * rank))
        )
        return element_size * (z + math.prod(self.x) + math.prod(self.weight) * (2 if self.untied else 1))

    def describe(self) -> str:
        opts = [o for o, on in (("FISTA", self.fista), ("untied", self.untied), ("nonneg", self.nonneg)) if on]
        return (
            f"B={self.x[0]}, {self.x[1]}→{self.weight[0]}, map {'×'.join(map(str, self.x[2:]))}, "
            f"k {'×'.join(map(str, self.weight[2:]))}, s{self.stride} p{self.padding}, n={self.n_iter}"
            + (f", {', '.join(opts)}" if opts else "")
        )


def _s(name, b, cs, cc, size, k, stride=1, padding=None, n_iter=10, **opts) -> SweepShape:
    """A square 2-D shape (size an int) or a 1-D one (size a 1-tuple); padding defaults to k // 2."""
    spatial = size if isinstance(size, tuple) else (size, size)
    return SweepShape(
        name,
        (b, cs, *spatial),
        (cc, cs, *(k,) * len(spatial)),
        stride,
        k // 2 if padding is None else padding,
        n_iter,
        **opts,
    )


# A grid over C_sig in {1, 3, 8, 32, 64} (128 and 256 for the two most convolution-bound), C_code up to 256 (512 for
# the ML-ISTA layer), maps 8^2 to 128^2 and 1-D, kernels 3 to 11, strides 1 to 3, ISTA and FISTA; the named workloads
# of DESIGN §6 and issue 11/16 are in it.
SHAPES: tuple[SweepShape, ...] = (
    # issue 11: many channels on small maps (batch 64, 8x8, 3x3)
    _s("small-32to32", 64, 32, 32, 8, 3),
    _s("small-8to32", 64, 8, 32, 8, 3),
    _s("small-1to32", 64, 1, 32, 8, 3),
    # DESIGN §6 CPU workloads
    _s("deep-layer", 8, 32, 64, 32, 3, n_iter=5),
    _s("csc-gray", 4, 1, 32, 64, 7, padding=3),
    _s("csc-rgb-strided", 4, 3, 64, 64, 6, stride=2, padding=2),
    # issue 16: CSCNet (175 filters 11x11, stride 8, 12 unfoldings, untied; padding 6 makes the code cover the image)
    # and the ML-ISTA MNIST network's third layer (64 -> 512 channels on 4x4 maps, kernel 4)
    _s("cscnet", 8, 1, 175, 128, 11, stride=8, padding=6, n_iter=12, untied=True),
    _s("mlista-layer3", 128, 64, 512, 4, 4, padding=0, n_iter=6, nonneg=True),
    # the grid
    _s("c1-to-16-128px-k11", 2, 1, 16, 128, 11, n_iter=8),
    _s("c1-to-64-32px-k5-fista", 16, 1, 64, 32, 5, fista=True),
    _s("c3-to-32-32px-k5-s2", 16, 3, 32, 32, 5, stride=2),
    _s("c3-to-96-16px-k3-s3", 32, 3, 96, 16, 3, stride=3, padding=0),
    _s("c8-to-16-64px-k3", 8, 8, 16, 64, 3),
    _s("c8-to-64-16px-k5-fista-nonneg", 32, 8, 64, 16, 5, fista=True, nonneg=True),
    _s("c32-to-32-16px-k3-untied", 32, 32, 32, 16, 3, untied=True),
    _s("c32-to-64-8px-k3-fista", 64, 32, 64, 8, 3, fista=True),
    _s("c32-to-128-16px-k3-s2", 16, 32, 128, 16, 3, stride=2),
    _s("c64-to-64-8px-k3", 64, 64, 64, 8, 3),
    _s("c64-to-128-8px-k3-nonneg", 32, 64, 128, 8, 3, nonneg=True, n_iter=5),
    _s("c64-to-64-32px-k3", 4, 64, 64, 32, 3, n_iter=5),
    # the most convolution-bound, either side of auto's intensity limit (ops/cpu_cost.py): I = 768 and 1152
    _s("c128-to-256-8px-k3", 16, 128, 256, 8, 3, n_iter=5),
    _s("c256-to-256-8px-k3", 16, 256, 256, 8, 3, n_iter=5),
    _s("1d-c1-to-32-L1024-k9", 8, 1, 32, (1024,), 9),
    _s("1d-c8-to-64-L256-k5-s2-fista", 16, 8, 64, (256,), 5, stride=2, fista=True),
    _s("1d-c64-to-64-L64-k3", 32, 64, 64, (64,), 3),
)
# Shapes the strategy rule and auto's cost model were never calibrated on, to check them off the sweep (2026-12-07:
# three of them found strategy.cpp's rule taking the slower strategy): `--off-sweep`.
OFF_SWEEP: tuple[SweepShape, ...] = (
    _s("off-16to48-24px-k5", 16, 16, 48, 24, 5, n_iter=8),
    _s("off-48to48-12px-k3", 32, 48, 48, 12, 3),
    _s("off-3to128-48px-k3-s2", 8, 3, 128, 48, 3, stride=2),
    _s("off-16to16-8px-k3", 64, 16, 16, 8, 3),
    _s("off-96to192-16px-k3", 4, 96, 192, 16, 3, n_iter=5),
    _s("off-1d-16to64-L128-k7", 32, 16, 64, (128,), 7),
    _s("off-8to8-16px-k3", 128, 8, 8, 16, 3),
    _s("off-1to64-96px-k9-fista", 2, 1, 64, 96, 9, fista=True),
    _s("off-64to32-16px-k5", 16, 64, 32, 16, 5),
    _s("off-128to128-16px-k3", 8, 128, 128, 16, 3, n_iter=5),
    _s("off-24to96-8px-k3-nonneg", 48, 24, 96, 8, 3, nonneg=True),
    _s("off-1d-128to128-L32-k3", 16, 128, 128, (32,), 3, n_iter=5),
)
BY_NAME = {s.name: s for s in SHAPES + OFF_SWEEP}
QUICK = ("small-32to32", "small-1to32", "deep-layer", "csc-gray", "mlista-layer3", "1d-c8-to-64-L256-k5-s2-fista")


def make_problem(shape: SweepShape, *, requires_grad: bool, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Random x and unit-norm atoms (an untied encoder is a perturbed copy), step 1/L at x's size, lam 0.05."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.x, generator=g, dtype=dtype)
    w = torch.randn(shape.weight, generator=g, dtype=dtype)
    w = w / w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
    we = (w + 0.1 * torch.randn(shape.weight, generator=g, dtype=dtype)) if shape.untied else None
    step = 1.0 / DF.lipschitz_constant(w, shape.x[2:], stride=shape.stride, padding=shape.padding, n_iter=30)
    for t in (x, w, we):
        if t is not None:
            t.requires_grad_(requires_grad)
    return {"x": x, "weight": w, "encoder_weight": we, "lam": 0.05, "step": step}


_COMPILED: dict[str, Callable] = {}


def provider_fn(provider: str, shape: SweepShape, p: dict, *, recompute: bool = False) -> Callable[[], torch.Tensor]:
    """A zero-argument forward of one provider on problem p."""
    kw = {"stride": shape.stride, "padding": shape.padding, "nonneg": shape.nonneg, "fista": shape.fista}
    if provider == "compile":
        fn = _COMPILED.setdefault("ref", torch.compile(conv_ista_ref, dynamic=False))
        n, c = shape.n_iter, shape.weight[0]
        lam = torch.full((n, c), p["lam"], dtype=p["x"].dtype)
        step = torch.full((n,), p["step"], dtype=p["x"].dtype)

        def compiled() -> torch.Tensor:
            return fn(p["x"], p["weight"], lam, step, encoder_weight=p["encoder_weight"], **kw)

        compiled.leaves = tuple(_leaves(p))  # speed.train_step_peak_bytes resets these (the encoder's too)
        return compiled
    backend = {"reference": "reference", "auto": "auto"}.get(provider, "cpp")

    def run() -> torch.Tensor:
        return DF.conv_ista(
            p["x"],
            p["weight"],
            p["lam"],
            n_iter=shape.n_iter,
            step=p["step"],
            encoder_weight=p["encoder_weight"],
            backend=backend,
            recompute=recompute,
            **kw,
        )

    run.leaves = tuple(_leaves(p))  # speed.train_step_peak_bytes resets these (the encoder's too)
    return run


@contextlib.contextmanager
def strategy_env(provider: str):
    """DSC_KERNELS_CPP_STRATEGY as ``provider`` asks ("cpp-direct", "cpp-gemm": forced; any other: the rule), for
    everything inside: a forward and its backward must run under the same setting (the env is read on every call)."""
    old = os.environ.pop(STRATEGY_ENV, None)
    if provider.startswith("cpp-"):
        os.environ[STRATEGY_ENV] = provider.removeprefix("cpp-")
    try:
        yield
    finally:
        os.environ.pop(STRATEGY_ENV, None)
        if old is not None:
            os.environ[STRATEGY_ENV] = old


def in_strategy(provider: str, fn: Callable[[], object]) -> Callable[[], object]:
    """fn run under strategy_env(provider)."""

    def run():
        with strategy_env(provider):
            return fn()

    return run


def _leaves(p: dict) -> list[torch.Tensor]:
    return [t for t in (p["x"], p["weight"], p["encoder_weight"]) if t is not None]


def forward_backward(fn: Callable[[], torch.Tensor], p: dict) -> Callable[[], None]:
    """fn's forward plus the backward of sum(z) into x and the weights."""

    def run():
        for t in _leaves(p):
            t.grad = None
        fn().sum().backward()

    return run


def _outputs(fn: Callable[[], torch.Tensor], p: dict) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """fn's z and the gradients of <z, g> into p's leaves (g a fixed random cotangent)."""
    z = fn()
    return z.detach(), torch.autograd.grad(z, _leaves(p), measure.random_cotangent(z))


def _differences(got: tuple, want: tuple) -> dict:
    """_outputs of a provider against the reference's: the fraction of entries whose support differs, z's error
    where the supports agree and the largest gradient error, both relative to max(1, the reference's magnitude)."""
    (z, grads), (z_ref, grads_ref) = got, want
    same = (z != 0) == (z_ref != 0)
    scale = max(1.0, z_ref.abs().max().item())
    return {
        "z_err": ((z - z_ref)[same].abs().max().item() if same.any() else 0.0) / scale,
        "support_flips": 1.0 - same.float().mean().item(),
        "grad_err": max(
            ((a - b).abs().max() / max(1.0, b.abs().max().item())).item() for a, b in zip(grads, grads_ref)
        ),
    }


def check_against_reference(shape: SweepShape, providers: Sequence[str], rtol: float = 2e-3) -> dict[str, dict]:
    """Every provider against the reference before it is timed ({provider: {dtype: differences}}); raises
    AssertionError when one is off.

    float64 checks the math: z and every gradient agree to 1e-9 with no support flip. float32 (what is timed) checks
    that z agrees where the supports agree, that at most 1% of entries flip, and that no gradient is grossly off
    (0.25 relative to the reference's largest). An entry within rounding of its threshold, at any iteration, may flip
    between two float32 computations that sum in different orders (the reference's own float32 run against float64
    included), and one flip moves the gradients near it by O(1): across seeds such flips hit the reference and the
    fused strategies alike, so a tight float32 gradient bound would test luck, not the kernels."""
    out: dict[str, dict] = {k: {} for k in providers}
    for dtype, name in ((torch.float64, "float64"), (torch.float32, "float32")):
        p = make_problem(shape, requires_grad=True, dtype=dtype)
        want = _outputs(provider_fn("reference", shape, p), p)
        for provider in providers:
            with strategy_env(provider):
                got = _outputs(provider_fn(provider, shape, p), p)
            d = out[provider][name] = _differences(got, want)
            # written as "not <=": a NaN error (NaN in z where the reference is active) compares False with ">"
            if dtype == torch.float64:
                bad = not (d["support_flips"] <= 0 and d["z_err"] <= 1e-9 and d["grad_err"] <= 1e-9)
            else:
                bad = not (d["support_flips"] <= 0.01 and d["z_err"] <= rtol and d["grad_err"] <= 0.25)
            if bad:
                raise AssertionError(f"{provider} differs from the reference on {shape.name} in {name}: {d}")
    return out


def _time_interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict]:
    """Median (and spread) ms per provider over `rounds` interleaved rounds (measure.time_interleaved)."""
    timings = measure.time_interleaved(fns, "cpu", rounds=rounds, warmup=1, min_rounds=rounds)
    failed = {k: t.error for k, t in timings.items() if t.error}
    if failed:
        raise RuntimeError(f"providers failed while timed: {failed}")
    return {
        k: {"ms": t.median_ms, "min_ms": min(t.samples_ms), "max_ms": max(t.samples_ms)} for k, t in timings.items()
    }


def cpp_strategy(shape: SweepShape) -> str:
    """The strategy the cpp backend runs this shape with (after DSC_KERNELS_CPP_STRATEGY), as functional calls it:
    1-D problems as height-1 images. "direct" or "gemm" for both passes, else "<forward>+<backward>"."""
    from .. import _ext

    ops = _ext.load()
    rank = len(shape.x) - 2
    stride, padding = [shape.stride] * rank, [shape.padding] * rank
    x_size, w_size = list(shape.x), list(shape.weight)
    if rank == 1:
        x_size.insert(2, 1), w_size.insert(2, 1), stride.insert(0, 1), padding.insert(0, 0)
    # zero-stride views: the op reads sizes only, nothing is allocated
    x, w = torch.zeros(()).expand(x_size), torch.zeros(()).expand(w_size)
    names = {0: "direct", 1: "gemm", -1: "none"}
    fwd, bwd = (names[ops.conv_ista_strategy_cpp(x, w, stride, padding, backward)] for backward in (False, True))
    return fwd if fwd == bwd else f"{fwd}+{bwd}"


def measure_shape(shape: SweepShape, providers: tuple[str, ...], *, rounds: int = 5, memory: bool = True) -> dict:
    """Check, time and measure every provider on one shape. Returns {"shape": ..., "results": {provider: {...}}}."""
    results: dict[str, dict] = {k: {} for k in providers}
    if "compile" in providers:
        # Dynamo keeps one cache per code object, shared by every shape: each shape adds ~3 graphs (float64 and
        # float32 checks, no-grad forward), and past the recompile limit (8) Dynamo runs conv_ista_ref eagerly without
        # an error, so from the third shape on "compile" timed eager
        torch._dynamo.reset()
    for mode in ("forward", "forward_backward"):
        p = make_problem(shape, requires_grad=mode == "forward_backward")
        fns = {k: provider_fn(k, shape, p) for k in providers}
        if mode == "forward":
            checks = check_against_reference(shape, [k for k in providers if k != "reference"])
            for k, c in checks.items():
                results[k]["check"] = c
            timed = {k: in_strategy(k, lambda f=f: f().detach()) for k, f in fns.items()}
            with torch.no_grad():
                res = _time_interleaved(timed, rounds)
        else:
            res = _time_interleaved({k: in_strategy(k, forward_backward(f, p)) for k, f in fns.items()}, rounds)
        for k, r in res.items():
            results[k][mode] = r
        if memory and mode == "forward_backward":
            for k in providers:
                with strategy_env(k):
                    results[k]["train_peak_bytes"] = S.train_step_peak_bytes(fns[k], p, "cpu")
                    if k.startswith("cpp"):
                        rec = provider_fn(k, shape, p, recompute=True)
                        results[k]["train_peak_bytes_recompute"] = S.train_step_peak_bytes(rec, p, "cpu")
    if "cpp" in results:
        results["cpp"]["strategy"] = cpp_strategy(shape)
    base = results["reference"]
    for r in results.values():
        r["fwd_ratio"] = base["forward"]["ms"] / r["forward"]["ms"]
        r["fwd_bwd_ratio"] = base["forward_backward"]["ms"] / r["forward_backward"]["ms"]
        if memory:
            r["mem_floor_ratio"] = shape.floor_bytes() / base["train_peak_bytes"]
            r["mem_ratio"] = r["train_peak_bytes"] / base["train_peak_bytes"]
            if "train_peak_bytes_recompute" in r:
                r["mem_ratio_recompute"] = r["train_peak_bytes_recompute"] / base["train_peak_bytes"]
    return {
        "shape": asdict(shape),
        "describe": shape.describe(),
        "many_channel": shape.many_channel,
        "rounds": rounds,  # the run's documents said "medians of interleaved rounds" without how many
        "results": results,
    }


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per provider: worst and geometric-mean ratios over the shapes, and for auto its distance to the best."""
    out: dict[str, dict] = {}
    providers = [k for k in rows[0]["results"] if k != "reference"]
    for k in providers:
        s: dict = {}
        for key in ("fwd_ratio", "fwd_bwd_ratio"):
            vals = [r["results"][k][key] for r in rows]
            s[key] = {
                "worst": min(vals),
                "geomean": math.exp(statistics.fmean(math.log(v) for v in vals)),
                "worst_shape": rows[min(range(len(vals)), key=vals.__getitem__)]["shape"]["name"],
            }
        for key in ("mem_ratio", "mem_ratio_recompute"):
            vals = [r["results"][k][key] for r in rows if r["many_channel"] and key in r["results"][k]]
            if vals:
                s[key + "_many_channel"] = {"worst": max(vals)}
        out[k] = s
    if "auto" in providers:
        for mode in ("forward", "forward_backward"):
            gaps = []
            for r in rows:
                res = r["results"]
                best = min(res[k][mode]["ms"] for k in ("reference", "cpp") if k in res)
                gaps.append(res["auto"][mode]["ms"] / best)
            out["auto"][f"{mode}_vs_best"] = {
                "worst": max(gaps),
                "geomean": math.exp(statistics.fmean(map(math.log, gaps))),
            }
    return out


def machine() -> dict:
    """records.environment on the CPU, with the short keys the sweep's table prints."""
    env = records.environment("cpu")
    return {**env, "threads": env["torch_threads"], "load_average": (env["load_avg"] or [None])[0]}


def markdown(rows: list[dict], summary: dict, machine: dict) -> str:
    providers = [k for k in rows[0]["results"] if k != "reference"]
    rounds = sorted({row.get("rounds") for row in rows} - {None})
    medians = f"Medians of {rounds[0]} interleaved rounds" if len(rounds) == 1 else "Medians of interleaved rounds"
    lines = [
        (
            f"# CPU conv-ISTA sweep ({machine['threads']} threads, {machine['cpu']}, torch {machine['torch']}, "
            f"commit {machine['commit'][:10]}, load average {machine['load_average']})"
        ),
        "",
        (
            "Ratios: eager time / provider time (fwd, fwd+bwd; > 1 is faster) and training-step peak memory / "
            f"eager's (save mode; recompute mode for cpp strategies; < 1 is leaner). {medians}. "
            "Floor: what every training step allocates, z_n and the gradients of x and the dictionaries, over "
            "eager's peak; no provider's memory ratio can go below it."
        ),
        "",
        "| shape | eager fwd / fwd+bwd ms | floor | " + " | ".join(providers) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in providers) + " |",
    ]
    for r in rows:
        res = r["results"]
        cells = []
        for k in providers:
            c = f"{res[k]['fwd_ratio']:.2f} / {res[k]['fwd_bwd_ratio']:.2f}"
            if "mem_ratio" in res[k]:
                c += f", mem {res[k]['mem_ratio']:.2f}"
                if "mem_ratio_recompute" in res[k]:
                    c += f" / {res[k]['mem_ratio_recompute']:.2f}"
            cells.append(c)
        base = res["reference"]
        floor = f"{base['mem_floor_ratio']:.2f}" if "mem_floor_ratio" in base else "—"
        lines.append(
            f"| {r['shape']['name']} ({r['describe']}) | {base['forward']['ms']:.1f} / "
            f"{base['forward_backward']['ms']:.1f} | {floor} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        (
            "| provider | fwd worst | fwd geomean | fwd+bwd worst | fwd+bwd geomean | worst memory "
            "(many-channel shapes, save / recompute) |"
        ),
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for k in providers:
        s = summary[k]
        mem = s.get("mem_ratio_many_channel", {}).get("worst")
        mem_r = s.get("mem_ratio_recompute_many_channel", {}).get("worst")
        lines.append(
            f"| {k} | {s['fwd_ratio']['worst']:.2f} ({s['fwd_ratio']['worst_shape']}) | "
            f"{s['fwd_ratio']['geomean']:.2f} | {s['fwd_bwd_ratio']['worst']:.2f} "
            f"({s['fwd_bwd_ratio']['worst_shape']}) | {s['fwd_bwd_ratio']['geomean']:.2f} | "
            f"{'—' if mem is None else f'{mem:.2f}'} / {'—' if mem_r is None else f'{mem_r:.2f}'} |"
        )
    if "forward_vs_best" in summary.get("auto", {}):
        a = summary["auto"]
        lines += [
            "",
            (
                f"auto / best of (eager, cpp): forward worst {a['forward_vs_best']['worst']:.3f}, "
                f"forward+backward worst {a['forward_backward_vs_best']['worst']:.3f}."
            ),
        ]
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], path: Path) -> None:
    """Ratio to eager per shape (log scale), forward and forward+backward, one marker per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    providers = [k for k in rows[0]["results"] if k != "reference"]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.45 * len(rows)), 7), sharex=True)
    xs = range(len(rows))
    for ax, key, title in zip(axes, ("fwd_ratio", "fwd_bwd_ratio"), ("forward", "forward + backward")):
        for i, k in enumerate(providers):
            ax.scatter(
                [x + 0.08 * (i - len(providers) / 2) for x in xs], [r["results"][k][key] for r in rows], label=k, s=18
            )
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylabel(f"{title}: eager / provider")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=len(providers))
    axes[1].set_xticks(list(xs))
    axes[1].set_xticklabels([r["shape"]["name"] for r in rows], rotation=70, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_sweep(
    shapes: list[SweepShape],
    providers: tuple[str, ...],
    *,
    rounds: int,
    memory: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], dict]:
    rows = []
    for s in shapes:
        t0 = time.perf_counter()
        rows.append(measure_shape(s, providers, rounds=rounds, memory=memory))
        res = rows[-1]["results"]
        log(
            f"{s.name}: "
            + ", ".join(
                f"{k} {res[k]['fwd_ratio']:.2f}/{res[k]['fwd_bwd_ratio']:.2f}" for k in providers if k != "reference"
            )
            + f" ({time.perf_counter() - t0:.0f} s)"
        )
    return rows, summarize(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsc_kernels.experiments.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder for sweep.json, sweep.png, sweep.md")
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--shapes", help="comma-separated shape names (default: all, or the quick subset)")
    ap.add_argument("--off-sweep", action="store_true", help="the shapes off the calibration sweep (OFF_SWEEP)")
    ap.add_argument(
        "--threads",
        type=cli_args.int_type("--threads", 1, cli_args.MAX_THREADS),
        default=2,
        help=f"torch CPU threads, 1..{cli_args.MAX_THREADS} (default 2)",
    )
    ap.add_argument(
        "--rounds",
        type=cli_args.int_type("--rounds", 1),
        default=5,
        help="interleaved timing rounds per shape (median), >= 1 (default 5)",
    )
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (minutes per shape on a CPU)")
    ap.add_argument("--no-memory", action="store_true", help="skip the training-step memory measurement")
    args = ap.parse_args(argv)
    # `is not None`: an empty --shapes ran every shape (minutes) instead of being an unknown name
    if args.shapes is not None:
        names = args.shapes.split(",")
    elif args.off_sweep:
        names = [s.name for s in OFF_SWEEP]
    else:
        names = list(QUICK) if args.quick else [s.name for s in SHAPES]
    if not args.out:  # Path('') is '.': sweep.json, .md and .png landed in the working directory
        ap.error("argument --out: must name a folder, got ''")
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        ap.error(f"argument --shapes: unknown shapes {unknown}; known: {', '.join(BY_NAME)}")
    # a name given twice was timed twice: two rows, and the summary's worst and geometric mean counted it twice
    if repeated := sorted({n for n in names if names.count(n) > 1}):
        ap.error(f"argument --shapes: {', '.join(repeated)} given more than once")
    out = Path(args.out)
    # created before the sweep's minutes of timing, which used to end in a traceback at an uncreatable folder
    if (problem := cli_args.create_folders_problem([out])) is not None:
        ap.error(f"argument --out: {problem}")
    torch.set_num_threads(args.threads)
    providers = tuple(p for p in PROVIDERS if p != "compile" or args.compile)
    rows, summary = run_sweep([BY_NAME[n] for n in names], providers, rounds=args.rounds, memory=not args.no_memory)
    info = machine()
    (out / "sweep.json").write_text(json.dumps({"machine": info, "rows": rows, "summary": summary}, indent=1))
    (out / "sweep.md").write_text(markdown(rows, summary, info))
    figure(rows, out / "sweep.png")
    print((out / "sweep.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
