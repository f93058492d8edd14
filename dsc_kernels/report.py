"""The main job: run the convergence experiments and a backend speed comparison, write REPORT.md and PNG figures.

`python -m dsc_kernels report [--out DIR] [--quick] [--device cpu|cuda] [--backend NAME]`.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .experiments import EXPERIMENTS, ClaimResult
from .experiments import attention_speed as A
from .experiments import speed as S


def _run_claims(quick: bool, backend: str, device: str, bar) -> list[ClaimResult]:
    dtype = torch.float64 if device == "cpu" else torch.float32
    results: list[ClaimResult] = []
    for name, fn in EXPERIMENTS.items():
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        try:
            out = fn(quick=quick, backend=backend, device=device, dtype=dtype)
        except Exception as err:  # noqa: BLE001 - one broken experiment is reported, the others still run
            out = ClaimResult(id=name, claim=name, theory="—", measured=f"error: {type(err).__name__}: {err}",
                              holds=False, source="—")
        for r in out if isinstance(out, list) else [out]:
            r.seconds = r.seconds or time.perf_counter() - t0
            results.append(r)
        bar.update(1)
    return results


def _run_speed(quick: bool, device: str, bar) -> tuple[list[dict], dict[str, str]]:
    """Forward and forward+backward median ms and peak memory for every workload x available provider."""
    providers = S.available_providers(device)
    skipped = {p: why for p, why in providers.items() if why is not None}
    names = ["csc-gray"] if quick else list(S.WORKLOADS)
    if quick:  # compiling takes longer than the whole quick report may
        skipped.setdefault("compile", "skipped in --quick (compilation time)")
    rows = []
    for name in names:
        w = S.WORKLOADS[name]
        inputs = S.make_inputs(w, device, requires_grad=True, scale=0.25 if quick else 1.0)
        for p in [p for p in S.PROVIDERS if p not in skipped]:
            bar.set_postfix_str(f"speed {name} {p}")
            try:
                fn = S.provider_fn(p, inputs)
                reps = 1 if quick else 3
                fwd = S.time_ms(lambda: fn().detach(), device, reps=reps)
                fb = S.time_ms(S.forward_backward(fn, inputs), device, reps=reps)
                rows.append(dict(workload=name, provider=p, fwd_ms=fwd, fwd_bwd_ms=fb,
                                 mem_bytes=S.peak_memory_bytes(fn, device),
                                 train_peak_bytes=S.train_step_peak_bytes(fn, inputs, device)))
            except Exception as err:  # noqa: BLE001 - a provider failing is a row of the report, not a crash
                rows.append(dict(workload=name, provider=p, error=f"{type(err).__name__}: {err}"[:200]))
        bar.update(1)
    for r in rows:
        base = next((b for b in rows if b["workload"] == r["workload"] and b["provider"] == "reference"), None)
        if base and "fwd_ms" in r and "fwd_ms" in base:
            r["fwd_speedup"] = base["fwd_ms"] / r["fwd_ms"]
            r["fwd_bwd_speedup"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            r["train_peak_ratio"] = r["train_peak_bytes"] / base["train_peak_bytes"]
    return rows, skipped


def _run_attention(quick: bool, device: str, bar) -> dict:
    """Sparse-attention crossover curves (time vs N, shrink time vs sparsity); an error becomes the section's text."""
    bar.set_postfix_str("attention speed")
    try:
        return {"length": A.time_vs_length(device, quick), "sparsity": A.time_vs_sparsity(device, quick)}
    except Exception as err:  # noqa: BLE001 - reported, the rest of the report still runs
        return {"error": f"{type(err).__name__}: {err}"[:300]}
    finally:
        bar.update(1)


def _attention_markdown(attn: dict) -> list[str]:
    out = ["", "## Sparse attention: crossover curves", ""]
    if "error" in attn:
        return out + [f"Not measured: {attn['error']}"]
    length, sparsity = attn["length"], attn["sparsity"]
    providers = [p for p in length if p not in ("n", "backend")]
    out += [f"Forward ms, q, k, v (1, {A.HEADS}, N, {A.HEAD_DIM}) float32, fused backend: "
            f"{length['backend'] or 'none available'}.", "",
            "| N | " + " | ".join(providers) + " |", "| --- |" + " --- |" * len(providers)]
    for i, n in enumerate(length["n"]):
        out.append(f"| {n} | " + " | ".join(f"{length[p][i]:.2f}" for p in providers) + " |")
    if "fused shrink" in sparsity:
        out += ["", f"Shrink mode at N = {sparsity['n']}: forward ms by the fraction of scores below the threshold "
                f"(softmax SDPA: {sparsity['softmax (SDPA)']:.2f} ms).", "",
                "| inactive scores | " + " | ".join(f"{s:.3g}" for s in sparsity["sparsity"]) + " |",
                "| --- |" + " --- |" * len(sparsity["sparsity"]),
                "| fused shrink ms | " + " | ".join(f"{t:.2f}" for t in sparsity["fused shrink"]) + " |"]
    return out


def _machine(device: str) -> list[str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    lines = [
        f"- dsc_kernels {__version__} (git {commit}), Python {platform.python_version()}, torch {torch.__version__}, "
        f"numpy {np.__version__}",
        f"- {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}",
    ]
    try:
        import triton
        lines[0] += f", triton {triton.__version__}"
    except ImportError:
        pass
    if device == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    return lines


def _markdown(results, rows, skipped, attn, figures, args, seconds) -> str:
    held = sum(r.holds for r in results)
    out = [
        "# dsc_kernels report", "",
        f"`python -m dsc_kernels report{' --quick' if args.quick else ''} --device {args.device} "
        f"--backend {args.backend}` — {seconds:.0f} s, {held}/{len(results)} claims hold.", "",
        "## Machine", "", *_machine(args.device), "",
        "## Claims (THEORY.md §7)", "",
        "Constants are the standard results the seed paper (Li–Feng–Zhou, arXiv 2408.05540) builds on — Donoho–Elad, "
        "Papyan–Romano–Elad, Chen et al. 2018, Beck–Teboulle 2009 — not the paper's own, which were unavailable. "
        "Tags: [P] paper, [L] literature, [R] reconstruction, [C] computed.", "",
        "| id | claim | theory | measured | holds | source | s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731 - a bare | would end the table cell
    for r in results:
        out.append(f"| {cell(r.id)} | {cell(r.claim)} | {cell(r.theory)} | {cell(r.measured)} | "
                   f"{'yes' if r.holds else '**no**'} | {cell(r.source)} | {r.seconds:.1f} |")
    notes = [r for r in results if r.note]
    if notes:
        out += ["", "Notes:", ""] + [f"- **{r.id}**: {r.note}" for r in notes]
    out += ["", "## Speed of the conv-ISTA backends", ""]
    timer = "CUDA events (triton.testing.do_bench, median)" if args.device == "cuda" else "perf_counter, median"
    kept = "peak allocated by the forward" if args.device == "cuda" else "autograd-saved bytes + output"
    out += [f"Timer: {timer}; speed-up = eager (reference) time / provider time; kept: {kept}; train-step peak: "
            f"peak allocation during forward + backward (× eager). "
            f"float32.{' Quick run: batch ×0.25, one workload.' if args.quick else ''}", "",
            "| workload | provider | forward ms | fwd+bwd ms | speed-up fwd | speed-up fwd+bwd | kept MiB | "
            "train-step peak MiB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['workload']} | {r['provider']} | error: {r['error']} | | | | | |")
        else:
            out.append(f"| {r['workload']} | {r['provider']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
                       f"{r.get('fwd_speedup', float('nan')):.2f}× | {r.get('fwd_bwd_speedup', float('nan')):.2f}× | "
                       f"{r['mem_bytes'] / 2**20:.1f} | {r['train_peak_bytes'] / 2**20:.1f} "
                       f"({r.get('train_peak_ratio', float('nan')):.2f}×) |")
    if skipped:
        out += ["", "Skipped providers: " + "; ".join(f"{p}: {why}" for p, why in skipped.items())]
    out += _attention_markdown(attn)
    out += ["", "## Figures", ""] + [f"![{title}]({name})" for name, title in figures]
    return "\n".join(out) + "\n"


def run_report(args) -> Path:
    """Run everything, write DIR/REPORT.md and the figures; returns the report's path."""
    from tqdm import tqdm

    from .report_figures import make_figures

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_speed = 1 if args.quick else len(S.WORKLOADS)
    with tqdm(total=len(EXPERIMENTS) + n_speed + 2, desc="dsc_kernels report", file=sys.stderr) as bar:
        results = _run_claims(args.quick, args.backend, args.device, bar)
        rows, skipped = _run_speed(args.quick, args.device, bar)
        attn = _run_attention(args.quick, args.device, bar)
        bar.set_postfix_str("figures")
        figures = make_figures(results, rows, attn, out_dir)
        bar.update(1)
        from .recipes.report_section import training_section  # the training helper's section (recipes/)
        training, training_figures = training_section(out_dir, quick=args.quick,
                                                      runs=getattr(args, "training_runs", None))
    path = out_dir / "REPORT.md"
    path.write_text(_markdown(results, rows, skipped, attn, figures, args, time.perf_counter() - t0)
                    + "\n".join(training + [""] + [f"![{title}]({name})" for name, title in training_figures]) + "\n")
    return path
