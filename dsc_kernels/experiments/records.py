"""The one results schema of every benchmark (bench/ suites, the GPU check), and its writer.

A run is one JSON document, written with a flat CSV beside it:

    {"schema": "dsc_kernels.bench", "version": 1, "suite": "...", "created": "2026-...Z",
     "environment": {device, clocks, versions, commit, precision flags, threads, ...},
     "method": {how the numbers were taken: timing, memory, correctness gate},
     "results": [one record per (workload, mode, dtype, provider)]}

A record (`result`) holds what identifies it (suite, workload, mode, dtype, provider, params), its status
("ok", "skipped" with the reason, "failed" with the error, "wrong" when its output failed the correctness gate and
was therefore not timed), the check (tolerance verdicts), the timing (median, N, raw samples: measure.Timing), the
memory (measure.MemoryUse; the training-step peak for forward_backward) and ratios to the baselines of its group
(`add_ratios`: speedup_vs_<baseline> = the best baseline's median / this median).

bench/results/ keeps committed runs; bench/results_table.py turns them into the README's summaries
(`summary_table`) and docs/benchmarks.md's full tables (`markdown_table`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

__all__ = [
    "SCHEMA",
    "VERSION",
    "BASELINES",
    "environment",
    "result",
    "add_ratios",
    "run_document",
    "write_run",
    "CSV_COLUMNS",
    "load_runs",
    "markdown_table",
    "summary_table",
]

SCHEMA, VERSION = "dsc_kernels.bench", 1
ROOT = Path(__file__).resolve().parents[2]
# Baseline groups: the fastest member of a group present in a record's group is that baseline (eager PyTorch in its
# best layout, the best torch.compile mode, SDPA's fastest backend, dense sparsemax as entmax users write it).
BASELINES = {
    "eager": ("reference", "reference-channels_last"),
    "compile": ("compile", "compile-max-autotune"),
    "sdpa": ("sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math"),
    "dense": ("dense-sparsemax", "entmax"),
}
CSV_COLUMNS = [
    "suite",
    "workload",
    "mode",
    "dtype",
    "provider",
    "status",
    "median_ms",
    "n",
    "min_ms",
    "p80_ms",
    *[f"speedup_vs_{b}" for b in BASELINES],
    "peak_bytes",
    "retained_bytes",
    "train_peak_ratio_vs_eager",
    "check",
    "reason",
]


def git_commit(short: bool = False) -> str:
    """The commit of the code that runs: DSC_GIT_COMMIT (set where the tree is copied without .git), else git's
    HEAD of this checkout (``short``: abbreviated), else "unknown"."""
    if os.environ.get("DSC_GIT_COMMIT"):
        return os.environ["DSC_GIT_COMMIT"]
    if not (ROOT / ".git").exists():
        # an installed package: ROOT is site-packages, and git answered for whatever repository held the
        # environment (a project's .venv), recording that project's commit as this code's
        return "unknown"
    try:
        command = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
        out = subprocess.run(command, capture_output=True, text=True, timeout=10, cwd=ROOT)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_hash() -> str:
    """sha256 over the package's and csrc/'s sources: identifies the code that ran where git is not available."""
    h = hashlib.sha256()
    for base in ("dsc_kernels", "csrc"):
        for path in sorted((ROOT / base).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".cpp", ".h", ".cu", ".cuh"):
                h.update(str(path.relative_to(ROOT)).encode())
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _nvidia_smi() -> dict:
    fields = [
        "driver_version",
        "clocks.sm",
        "clocks.mem",
        "clocks.max.sm",
        "clocks.max.mem",
        "power.draw",
        "power.limit",
        "temperature.gpu",
        "pstate",
    ]
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError) as err:
        return {"error": str(err)[:200]}
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip()[:200]}
    values = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]
    return dict(zip(fields, values))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str) -> dict:
    """Where and with what the numbers were taken. Clocks are read from nvidia-smi when it answers."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import numpy

    env = dict(
        commit=git_commit(),
        source_hash=source_hash(),
        python=platform.python_version(),
        platform=platform.platform(),
        torch=torch.__version__,
        triton=triton_version,
        numpy=numpy.__version__,
        cuda=torch.version.cuda,
        cpu=_cpu_model(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        load_avg=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        device_type=device.type,
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_bytes=props.total_memory,
            l2_bytes=getattr(props, "L2_cache_size", None),
            cudnn=torch.backends.cudnn.version(),
            precision=dict(
                cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
            ),
            nvidia_smi=_nvidia_smi(),
        )
    else:
        env.update(device=env["cpu"])
    return env


def result(
    *,
    suite: str,
    workload: str,
    mode: str,
    dtype: str,
    provider: str,
    params: Mapping | None = None,
    status: str = "ok",
    reason: str | None = None,
    check: Iterable | None = None,
    timing=None,
    memory=None,
    **extra,
) -> dict:
    """One record (see the module docstring). `check`: tolerance Verdicts; `timing`: measure.Timing;
    `memory`: measure.MemoryUse."""
    record = dict(
        suite=suite,
        workload=workload,
        mode=mode,
        dtype=dtype,
        provider=provider,
        params=dict(params or {}),
        status=status,
        reason=reason,
        check=[
            dict(ok=v.ok, error=v.error, eager_error=v.eager_error, bound=v.bound, message=v.message)
            for v in (check or [])
        ],
        timing=timing.to_dict() if timing is not None else None,
        memory=memory.to_dict() if memory is not None else None,
        ratios={},
    )
    record.update(extra)
    return record


def _median(r: dict) -> float | None:
    t = r.get("timing")
    return t["median_ms"] if r["status"] == "ok" and t and t.get("n") else None


def add_ratios(results: list[dict]) -> list[dict]:
    """Fills each record's ratios against the baselines of its (suite, workload, mode, dtype) group."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["suite"], r["workload"], r["mode"], r["dtype"]), []).append(r)
    for members in groups.values():
        for name, providers in BASELINES.items():
            base = [(m, r) for r in members if r["provider"] in providers and (m := _median(r)) is not None]
            if not base:
                continue
            best_ms, best = min(base, key=lambda mr: mr[0])
            best_peak = (best.get("memory") or {}).get("peak_bytes")
            for r in members:
                ms = _median(r)
                if ms:
                    r["ratios"][f"speedup_vs_{name}"] = best_ms / ms
                    r["ratios"][f"{name}_baseline"] = best["provider"]
                peak = (r.get("memory") or {}).get("peak_bytes")
                if name == "eager" and peak and best_peak and r["mode"] == "forward_backward":
                    r["ratios"]["train_peak_ratio_vs_eager"] = peak / best_peak
    return results


def run_document(suite: str, device: torch.device | str, results: list[dict], method: Mapping) -> dict:
    return dict(
        schema=SCHEMA,
        version=VERSION,
        suite=suite,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        environment=environment(device),
        method=dict(method),
        results=add_ratios(results),
    )


def _csv_row(r: dict) -> dict:
    t, m = r.get("timing") or {}, r.get("memory") or {}
    return dict(
        suite=r["suite"],
        workload=r["workload"],
        mode=r["mode"],
        dtype=r["dtype"],
        provider=r["provider"],
        status=r["status"],
        median_ms=t.get("median_ms"),
        n=t.get("n"),
        min_ms=t.get("min_ms"),
        p80_ms=t.get("p80_ms"),
        **{f"speedup_vs_{b}": r["ratios"].get(f"speedup_vs_{b}") for b in BASELINES},
        peak_bytes=m.get("peak_bytes"),
        retained_bytes=m.get("retained_bytes"),
        train_peak_ratio_vs_eager=r["ratios"].get("train_peak_ratio_vs_eager"),
        check="; ".join(c["message"] for c in r["check"]),
        reason=r.get("reason"),
    )


def write_run(doc: dict, directory: str | Path, stem: str) -> tuple[Path, Path]:
    """<directory>/<stem>.json (the document) and <stem>.csv (one flat row per record)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = directory / f"{stem}.json", directory / f"{stem}.csv"
    json_path.write_text(json.dumps(doc, indent=1, default=str))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in doc["results"]:
            writer.writerow(_csv_row(r))
    return json_path, csv_path


def load_runs(directory: str | Path) -> list[dict]:
    """Every results document of this schema under `directory` (recursively), oldest first."""
    docs = []
    for path in sorted(Path(directory).rglob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(doc, dict) and doc.get("schema") == SCHEMA:
            doc["path"] = str(path)
            docs.append(doc)
    return sorted(docs, key=lambda d: d.get("created", ""))


def _fmt_bytes(n) -> str:
    return "" if n is None else f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _ratio_table(rows: list[dict], full: bool) -> list[str]:
    """The markdown table of timed records: their speedups against each baseline group present and the
    training-step memory ratio; ``full`` adds the median ms (N) and the peak memory."""
    present = [b for b in BASELINES if any(f"speedup_vs_{b}" in r["ratios"] for r in rows)]
    head = ["workload", "mode", "dtype", "provider", *(["median ms (N)"] if full else [])]
    head += [f"× vs {b}" for b in present] + (["peak memory"] if full else []) + ["train peak / eager"]
    lines = ["| " + " | ".join(head) + " |", "| --- " * len(head) + "|"]
    for r in rows:
        t, m = r["timing"], r.get("memory") or {}
        cells = [
            r["workload"],
            r["mode"],
            r["dtype"],
            r["provider"],
            *([f"{t['median_ms']:.3f} ({t['n']})"] if full else []),
        ]
        cells += [f"{r['ratios'][f'speedup_vs_{b}']:.2f}" if f"speedup_vs_{b}" in r["ratios"] else "" for b in present]
        train = r["ratios"].get("train_peak_ratio_vs_eager")
        cells += ([_fmt_bytes(m.get("peak_bytes"))] if full else []) + ["" if train is None else f"{train:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _timed(results: Iterable[dict]) -> list[dict]:
    return [r for r in results if r.get("timing") and r["status"] == "ok"]


def markdown_table(results: Iterable[dict]) -> list[str]:
    """One markdown table of timed records: median ms (N), speedups against each baseline group present, peak
    memory and the training-step memory ratio; records that were not timed are listed with their status."""
    results = list(results)
    rows = _timed(results)
    lines = _ratio_table(rows, full=True)
    others = [r for r in results if r not in rows]
    if others:
        lines += ["", "Not timed:", ""]
        for r in others:
            reason = (r.get("reason") or "").splitlines()[0][:160] if r.get("reason") else ""
            # convergence checks and sweep entries are "ok" with no timing and no reason: no empty "()"
            lines.append(
                f"- {r['workload']} {r['mode']} {r['provider']}: {r['status']}" + (f" ({reason})" if reason else "")
            )
    return lines


def _is_baseline(provider: str) -> bool:
    return any(provider in members for members in BASELINES.values())


def summary_table(results: Iterable[dict]) -> list[str]:
    """The short form of `markdown_table`: only our providers' timed records, as ratios (speedup against each
    baseline group present, training-step memory against eager), then the records of ours that failed or failed the
    correctness gate (skipped ones are left to the full table)."""
    ours = [r for r in results if not _is_baseline(r["provider"])]
    lines = _ratio_table(_timed(ours), full=False)
    bad = [r for r in ours if r["status"] in ("wrong", "failed")]
    if bad:
        failed = "; ".join(f"{r['workload']} {r['mode']} {r['provider']} ({r['status']})" for r in bad)
        lines += ["", "Not timed: " + failed]
    return lines
