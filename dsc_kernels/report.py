"""The main job: run the convergence experiments and a backend speed comparison, write REPORT.md and PNG figures.

`python -m dsc_kernels report [--out DIR] [--quick] [--device cpu|cuda] [--backend NAME] [--readme-figures]`.
--device and --backend apply to the convergence experiments and to the training section's short run (whose text
names the conv-ISTA backend its dsc strategy ran on); the speed sections time every backend available there.

The report states what a reader needs to trust its numbers: when and where it ran (CPU model, threads, load average
at the start), the versions, how each time was taken (repetitions, statistic), and a sanity section that flags
numbers that cannot be right (sanity_checks: a forward slower than its forward+backward, times that fall as the
problem grows, speed-ups that contradict the README's published table).
"""

from __future__ import annotations

import math
import os
import platform
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .experiments import EXPERIMENTS, ClaimResult, records
from .experiments import attention_speed as A
from .experiments import speed as S
from .experiments.common import threads

CLAIM_THREADS = 1  # the convergence problems are tiny; threads only add waiting (experiments.common.threads)
ROOT = Path(__file__).resolve().parent.parent  # the source checkout, when the package runs from one
README_PROVIDERS = {
    "eager": "reference",
    "`torch.compile`": "compile",
    "`cpp`": "cpp",
    "`cpp`, `recompute=True`": "cpp-recompute",
    "`triton`": "triton",
}


def _run_claims(quick: bool, backend: str, device: str, bar) -> list[ClaimResult]:
    dtype = torch.float64 if device == "cpu" else torch.float32
    results: list[ClaimResult] = []
    for name, fn in EXPERIMENTS.items():
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        try:
            with threads(CLAIM_THREADS):
                out = fn(quick=quick, backend=backend, device=device, dtype=dtype)
        except Exception as err:  # noqa: BLE001 - one broken experiment is reported, the others still run
            out = ClaimResult(
                id=name, claim=name, theory="—", measured=f"error: {type(err).__name__}: {err}", holds=False, source="—"
            )
        for r in out if isinstance(out, list) else [out]:
            r.seconds = r.seconds or time.perf_counter() - t0
            results.append(r)
        bar.update(1)
    return results


def speed_repetitions(quick: bool) -> int:
    """Timed rounds per provider and pass (the report quotes their median)."""
    return 3 if quick else 7


def _median_ms(record: dict | None) -> float | None:
    timing = (record or {}).get("timing") or {}
    return timing.get("median_ms") if record and record["status"] == "ok" and timing.get("n") else None


def _run_speed(quick: bool, device: str, bar) -> tuple[list[dict], dict[str, str]]:
    """Forward and forward+backward median ms and memory for every workload x available provider, measured by
    `experiments.speed.measure_conv`: each provider's output is checked against float64 first (a wrong one is not
    timed), the providers are timed interleaved after an untimed warm-up (compilation happens there), then their
    memory is measured."""
    providers = S.available_providers(device)
    skipped = {p: why for p, why in providers.items() if why is not None}
    names = ["csc-gray"] if quick else list(S.WORKLOADS)
    if quick:  # compiling takes longer than the whole quick report may
        skipped.setdefault("compile", "skipped in --quick (compilation time)")
    wanted = [p for p in S.PROVIDERS if p not in skipped]
    rows = []
    for name in names:
        bar.set_postfix_str(f"speed {name}")
        measured = {
            mode: {
                r["provider"]: r
                for r in S.measure_conv(
                    S.WORKLOADS[name],
                    device,
                    mode,
                    wanted,
                    rounds=speed_repetitions(quick),
                    scale=0.25 if quick else 1.0,
                )
            }
            for mode in ("forward", "forward_backward")
        }
        for p in wanted:
            # a recompute provider's forward is its plain provider's (only what the backward keeps differs)
            fwd = measured["forward"].get(p.removesuffix("-recompute"))
            fb = measured["forward_backward"][p]
            if _median_ms(fwd) is None or _median_ms(fb) is None:
                bad = fb if _median_ms(fb) is None else fwd
                rows.append(dict(workload=name, provider=p, error=f"{bad['status']}: {bad.get('reason')}"[:200]))
                continue
            rows.append(
                dict(
                    workload=name,
                    provider=p,
                    fwd_ms=_median_ms(fwd),
                    fwd_bwd_ms=_median_ms(fb),
                    train_peak_bytes=fb["memory"]["peak_bytes"],
                )
            )
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
    providers = [p for p in length if p not in A.CURVE_KEYS]
    out += [
        f"Forward ms, q, k, v (1, {A.HEADS}, N, {A.HEAD_DIM}) float32, fused backend: "
        f"{length['backend'] or 'none available'}.",
        "",
        "| N | " + " | ".join(providers) + " |",
        "| --- |" + " --- |" * len(providers),
    ]
    for i, n in enumerate(length["n"]):
        out.append(f"| {n} | " + " | ".join(f"{length[p][i]:.2f}" for p in providers) + " |")
    if "fused shrink" in sparsity:
        out += [
            "",
            f"Shrink mode at N = {sparsity['n']}: forward ms by the fraction of scores below the threshold "
            f"(softmax SDPA: {sparsity['softmax (SDPA)']:.2f} ms).",
            "",
            "| inactive scores | " + " | ".join(f"{s:.3g}" for s in sparsity["sparsity"]) + " |",
            "| --- |" + " --- |" * len(sparsity["sparsity"]),
            "| fused shrink ms | " + " | ".join(f"{t:.2f}" for t in sparsity["fused shrink"]) + " |",
        ]
    refused = {**length.get("refused", {}), **sparsity.get("refused", {})}
    if refused:
        out += ["", "Not timed (output failed the correctness gate, or raised; NaN above):", ""]
        out += [f"- {name}: {why}" for name, why in refused.items()]
    return out


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts(device: str) -> dict:
    """What the report records about the run's machine, taken at its start."""
    commit = records.git_commit(short=True)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    facts = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count() or 1,
        "threads": torch.get_num_threads(),
        "load": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "gpu": None,
    }
    if device == "cuda":
        facts["gpu"] = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return facts


def _machine_markdown(f: dict) -> list[str]:
    load = "unknown" if f["load"] is None else " / ".join(f"{v:.2f}" for v in f["load"])
    lines = [
        f"- {f['date']}; dsc_kernels {__version__} (git {f['commit']})",
        f"- CPU: {f['cpu']}, {f['cpus']} cores, torch threads {f['threads']}; load average at start (1/5/15 min): "
        f"{load}",
        f"- Python {f['python']}, torch {f['torch']}, triton {f['triton']}, numpy {f['numpy']}; {f['platform']}",
    ]
    if f["gpu"]:
        lines.append(f"- GPU: {f['gpu']}")
    return lines


def readme_speedups(text: str) -> dict[tuple[str, str], tuple[float, float]]:
    """The published "× eager (fwd / fwd+bwd)" column of the README's benchmark table, by (workload, provider).

    A row's workload is the first backticked name in its first cell (blank: the row above's); the provider cell
    is mapped through README_PROVIDERS (others are skipped). Returns {} when the README has no such table.
    """
    out: dict[tuple[str, str], tuple[float, float]] = {}
    column, workload = None, None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else None
        if cells is None:
            column = None
            continue
        if any("× eager" in c for c in cells):
            column = next(i for i, c in enumerate(cells) if "× eager" in c)
            continue
        if column is None or len(cells) <= column or (cells[0] and set(cells[0]) <= set("-: ")):
            continue
        name = re.search(r"`([^`]+)`", cells[0])
        workload = name.group(1) if name else (workload if not cells[0] else None)
        ratios = re.findall(r"[\d.]+", cells[column].replace("*", ""))
        provider = README_PROVIDERS.get(cells[1])
        if workload and provider and len(ratios) >= 2:
            out[(workload, provider)] = (float(ratios[0]), float(ratios[1]))
    return out


def sanity_checks(
    rows: list[dict],
    attn: dict | None = None,
    *,
    readme: dict | None = None,
    load: tuple[float, ...] | None = None,
    cpus: int = 1,
    tolerance: float = 2.0,
) -> list[str]:
    """Every number in the speed sections that cannot be right, as one sentence each ([] when all are plausible).

    rows: the speed table (workload, provider, fwd_ms, fwd_bwd_ms, fwd_speedup, fwd_bwd_speedup); attn: the
    attention curves; readme: readme_speedups() of the published table, compared ratio for ratio (a factor
    `tolerance` either way is noise, more contradicts it); load: the load average at the start (busy when the
    1-minute load exceeds half the cores).
    """
    flags = []
    if load is not None and load[0] > 0.5 * cpus:
        flags.append(
            f"the machine was busy (1-minute load {load[0]:.2f} on {cpus} cores): every time below is "
            "inflated by other processes; compare ratios measured together, not with other runs"
        )
    for r in rows:
        if "fwd_ms" not in r:
            continue
        name = f"{r['workload']} / {r['provider']}"
        times = (r["fwd_ms"], r["fwd_bwd_ms"])
        if not all(math.isfinite(t) and t > 0 for t in times):
            flags.append(f"{name}: a time that is not a positive number ({times[0]}, {times[1]} ms)")
            continue
        if r["fwd_ms"] > r["fwd_bwd_ms"]:
            flags.append(
                f"{name}: forward {r['fwd_ms']:.2f} ms is slower than forward+backward "
                f"{r['fwd_bwd_ms']:.2f} ms — impossible; timing noise"
            )
        published = (readme or {}).get((r["workload"], r["provider"]))
        if published and "fwd_speedup" in r and r["provider"] != "reference":
            for label, got, want in (
                ("forward", r["fwd_speedup"], published[0]),
                ("forward+backward", r["fwd_bwd_speedup"], published[1]),
            ):
                if not 1 / tolerance <= got / want <= tolerance:
                    flags.append(
                        f"{name}: {label} speed-up {got:.2f}× here contradicts the README's {want:.2f}× "
                        f"(more than {tolerance:g}× apart)"
                    )
    for key, curve in (attn or {}).get("length", {}).items():
        if key in A.CURVE_KEYS:
            continue
        n = (attn or {})["length"]["n"]
        for i in range(1, len(curve)):
            if math.isfinite(curve[i]) and math.isfinite(curve[i - 1]) and curve[i] * tolerance < curve[i - 1]:
                flags.append(
                    f"attention {key}: {curve[i]:.2f} ms at N = {n[i]} but {curve[i - 1]:.2f} ms at the "
                    f"shorter N = {n[i - 1]} — time cannot fall that much as N grows; timing noise"
                )
    return flags


def _markdown(results, rows, skipped, attn, figures, flags, facts, args, seconds, published=None) -> str:
    held = sum(r.holds for r in results)
    reps = speed_repetitions(args.quick)
    # the command line a reader reruns: without it, a report whose training table was read from earlier runs named a
    # command that trains anew (other epochs, other numbers)
    runs = getattr(args, "training_runs", None)
    training_runs = f" --training-runs {shlex.quote(str(runs))}" if runs else ""
    out = [
        "# dsc_kernels report",
        "",
        f"`python -m dsc_kernels report{' --quick' if args.quick else ''} --device {args.device} "
        f"--backend {args.backend}{training_runs}` — {seconds:.0f} s, {held}/{len(results)} claims hold, "
        f"{len(flags)} timing sanity flag{'s' if len(flags) != 1 else ''}.",
        "",
        "## Machine",
        "",
        *_machine_markdown(facts),
        "",
        "## Claims (docs/theory.md §7)",
        "",
        "Constants are the standard results the seed paper (Li–Feng–Zhou, arXiv 2408.05540) builds on — Donoho–Elad, "
        "Papyan–Romano–Elad, Chen et al. 2018, Beck–Teboulle 2009 — not the paper's own, which were unavailable. "
        "Tags: [P] paper, [L] literature, [R] reconstruction, [C] computed. docs/theory.md states each claim, "
        f"its provenance and the experiment that checks it. The experiments run on {CLAIM_THREADS} torch thread "
        "(their problems are tiny); the last column is each one's wall time in seconds.",
        "",
        "| id | claim | theory | measured | holds | source | s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    # a bare | would end the table cell, a line break the row (an error's message: its holds cell left the table)
    cell = lambda v: " ".join(str(v).split()).replace("|", "\\|")  # noqa: E731
    for r in results:
        out.append(
            f"| {cell(r.id)} | {cell(r.claim)} | {cell(r.theory)} | {cell(r.measured)} | "
            f"{'yes' if r.holds else '**no**'} | {cell(r.source)} | {r.seconds:.1f} |"
        )
    notes = [r for r in results if r.note]
    if notes:
        out += ["", "Notes:", ""] + [f"- **{r.id}**: {r.note}" for r in notes]
    out += ["", "## Speed of the conv-ISTA backends", ""]
    clock = "CUDA events" if args.device == "cuda" else "time.perf_counter"
    timer = (
        f"{clock}; every provider's output is first checked against a float64 reference (a wrong one is not "
        f"timed), then the providers are timed interleaved (one call of each per round, the order rotating), "
        f"median of {reps} rounds after untimed warm-up calls (for `compile` the compilation happens there)"
    )
    out += [
        f"Timer: {timer}. Speed-up = eager (reference) time / provider time; train-step peak: "
        f"peak allocation during forward + backward (× eager). "
        f"float32.{' Quick run: batch ×0.25, one workload.' if args.quick else ''}",
        "",
        "| workload | provider | forward ms | fwd+bwd ms | speed-up fwd | speed-up fwd+bwd | train-step peak MiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['workload']} | {r['provider']} | error: {cell(r['error'])} | | | | |")
        else:
            out.append(
                f"| {r['workload']} | {r['provider']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
                f"{r.get('fwd_speedup', float('nan')):.2f}× | {r.get('fwd_bwd_speedup', float('nan')):.2f}× | "
                f"{r['train_peak_bytes'] / 2**20:.1f} "
                f"({r.get('train_peak_ratio', float('nan')):.2f}×) |"
            )
    if skipped:
        out += ["", "Skipped providers: " + "; ".join(f"{p}: {why}" for p, why in skipped.items())]
    out += _attention_markdown(attn)
    out += ["", "## Sanity checks of the timings", ""]
    out += (
        [f"- ⚠ {f}" for f in flags]
        if flags
        else [
            "None flagged: every forward is faster than its forward+backward, no attention time falls by more "
            "than 2× as N grows"
            + (
                f", and the speed-ups agree with the README's table within 2× (compared with {len(published)} "
                "published entries)."
                if published
                else "; the speed-ups were not compared with the README's table (only a full CPU run is)."
            )
        ]
    )
    out += ["", "## Figures", ""] + [f"![{title}]({name})" for name, title in figures]
    return "\n".join(out) + "\n"


def _load_extension(device: str) -> str:
    """Load (the first time: build, which _ext announces) the fused CPU backends before the progress bar starts, so
    the wait is never a silent stall under the bar; says how long it took."""
    if device != "cpu":
        return ""
    from . import functional as DF

    t0 = time.perf_counter()
    backends = DF.available_backends("cpu")
    status = "ready" if "cpp" in backends else "unavailable (the experiments use the reference)"
    print(f"dsc_kernels report: C++ extension {status} after {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return status


def readme_figures_problem() -> str | None:
    """Why --readme-figures cannot copy into a checkout's docs/ (the package does not run from one), or None."""
    if not (ROOT / "README.md").exists() or not (ROOT / "docs").is_dir():
        return "--readme-figures: run from a source checkout (README.md and docs/ beside the package)"
    return None


def _copy_readme_figures(out_dir: Path, figures: list[tuple[str, str]]) -> list[str]:
    """Copy this run's figures into the checkout's docs/: those the README shows (its docs/*.png links) and those
    docs/ already holds, so no published figure is left from an older run."""
    readme = ROOT / "README.md"
    if (problem := readme_figures_problem()) is not None:
        raise SystemExit(problem)
    shown = set(re.findall(r"\(docs/([\w.-]+\.png)\)", readme.read_text()))
    shown |= {p.name for p in (ROOT / "docs").glob("*.png")}
    copied = [name for name, _ in figures if name in shown]
    for name in copied:
        shutil.copyfile(out_dir / name, ROOT / "docs" / name)
    return copied


def run_report(args) -> Path:
    """Run everything, write DIR/REPORT.md and the figures; returns the report's path."""
    from tqdm import tqdm

    from .report_figures import make_figures

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    facts = machine_facts(args.device)  # the load average before this run adds its own
    t0 = time.perf_counter()
    _load_extension(args.device)
    n_speed = 1 if args.quick else len(S.WORKLOADS)
    # disable=None: no bar when stderr is not a terminal, where each \r-redrawn update would pile up in a log
    with tqdm(total=len(EXPERIMENTS) + n_speed + 2, desc="dsc_kernels report", file=sys.stderr, disable=None) as bar:
        results = _run_claims(args.quick, args.backend, args.device, bar)
        rows, skipped = _run_speed(args.quick, args.device, bar)
        attn = _run_attention(args.quick, args.device, bar)
        bar.set_postfix_str("figures")
        # this run's figures replace those an earlier REPORT.md shows, and its training section can take minutes:
        # an interrupted rerun left that report beside them, read as a finished run. Gone first, written whole last.
        (out_dir / "REPORT.md").unlink(missing_ok=True)
        figures = make_figures(results, rows, attn, out_dir)
        bar.update(1)
        from .recipes.report_section import training_section  # the training helper's section (recipes/)

        training, training_figures = training_section(
            out_dir,
            quick=args.quick,
            runs=getattr(args, "training_runs", None),
            backend=args.backend,
            device=args.device,
        )
    readme = ROOT / "README.md"
    published = (
        readme_speedups(readme.read_text()) if readme.exists() and not args.quick and args.device == "cpu" else {}
    )
    flags = sanity_checks(rows, attn, readme=published, load=facts["load"], cpus=facts["cpus"])
    path = out_dir / "REPORT.md"
    partial = out_dir / "REPORT.md.partial"
    partial.write_text(
        _markdown(results, rows, skipped, attn, figures, flags, facts, args, time.perf_counter() - t0, published)
        + "\n".join(training + [""] + [f"![{title}]({name})" for name, title in training_figures])
        + "\n"
    )
    os.replace(partial, path)
    if getattr(args, "readme_figures", False):
        copied = _copy_readme_figures(out_dir, figures)
        print(f"dsc_kernels report: copied {', '.join(copied) or 'no figure'} into {ROOT / 'docs'}", file=sys.stderr)
    return path
