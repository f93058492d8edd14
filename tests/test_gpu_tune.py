"""The Triton configuration sweep (`make gpu-tune`, bench/gpu_tune.py) rehearsed on the CPU under the interpreter.
The script must not meet its first error on a GPU lease, and every configuration it offers must compute what the
default configuration computes (conv-ISTA forward strategies and reduction orders, forward and backward tilings,
attention blocks with BLOCK_M != BLOCK_N)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import rehearse_gpu_script


@pytest.mark.slow
@pytest.mark.child_process
def test_dry_run_checks_every_variant_against_the_default(tmp_path):
    rehearse_gpu_script("gpu_tune.py", tmp_path, 600)
    doc = json.loads((tmp_path / "tune.json").read_text())
    groups = {(r["group"], r["workload"], r["mode"]) for r in doc["records"]}
    assert {g[0] for g in groups} == {"conv-strategy", "conv-fwd", "conv-bwd", "attention"} and len(groups) == 8
    variants = [r for r in doc["records"] if r["variant"] != "default"]
    for group, names in doc["variants"].items():  # every variant of every group was run
        assert len(names) >= 4
        for workload, mode in {(g[1], g[2]) for g in groups if g[0] == group}:
            ran = [r["variant"] for r in variants if (r["group"], r["workload"], r["mode"]) == (group, workload, mode)]
            assert ran == names
    for r in variants:
        assert r["status"] == "ok", r
        # the variant really ran another configuration (a different summation order), and computed the same thing
        assert 0 <= r["diff"] < 1e-5, r
    assert sum(r["diff"] > 0 for r in variants) > len(variants) // 2
    assert "| conv-fwd | tiny | forward | default | ok |" in (tmp_path / "tune.md").read_text()


def test_groups_past_the_budget_are_skipped_whole_and_the_files_still_written(tmp_path):
    """Every group's default used to run past the deadline (a first call that may compile, then timing), which could
    carry the sweep past the lease's limit; the files were written only at the end, so such a run kept nothing."""
    rehearse_gpu_script("gpu_tune.py", tmp_path, 300, DSC_GPU_TUNE_BUDGET_S="0")
    doc = json.loads((tmp_path / "tune.json").read_text())
    records = doc["records"]
    assert records and all(r["variant"] == "(group)" and r["status"] == "skipped: budget" for r in records)
    # which code ran, as in gpu-check's run.json (the commit was "" unless DSC_GIT_COMMIT was set)
    assert doc["commit"] not in ("", None) and doc["source_hash"]
    assert "skipped: budget" in (tmp_path / "tune.md").read_text()


@pytest.mark.parametrize(
    "argv, budget, code",
    [
        (["--help"], "300", 0),
        (["--budget", "10"], "300", 2),
        # nan disabled the deadline (every variant ran, past the lease), "abc" was a traceback
        ([], "nan", 2),
        ([], "abc", 2),
    ],
)
def test_options_are_parsed_before_the_sweep(argv, budget, code, tmp_path):
    """The script read no arguments: --help, or a mistyped option, ran the whole sweep and wrote its files."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), DSC_GPU_CHECK_DRY_RUN="1", DSC_GPU_CHECK_OUT=str(tmp_path / "out"))
    env["DSC_GPU_TUNE_BUDGET_S"] = budget
    proc = subprocess.run(
        [sys.executable, str(root / "bench" / "gpu_tune.py"), *argv],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == code and "usage:" in proc.stdout + proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not (tmp_path / "out").exists() and "Traceback" not in proc.stderr


def test_a_variant_is_timed_only_when_it_computes_the_default_result_and_its_speedup_is_default_over_it(monkeypatch):
    """Sweep.group with faked timings (no GPU): the default takes 4 ms; a variant 5% off is "wrong" and never timed;
    the others' speedups are the default's ms over theirs."""
    import contextlib
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location(
        "gpu_tune", Path(__file__).resolve().parents[1] / "bench" / "gpu_tune.py"
    )
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    monkeypatch.setattr(tune, "DRY", False)  # as on a lease: the variants are timed
    times = iter([4.0, 2.0, 8.0])
    monkeypatch.setattr(tune, "_time_ms", lambda fn: next(times))
    scale = {"now": 1.0}

    @contextlib.contextmanager
    def scaled(s):
        scale["now"] = s
        try:
            yield
        finally:
            scale["now"] = 1.0

    sweep = tune.Sweep(budget_s=600)
    variants = [("fast", scaled(1.0)), ("off", scaled(1.05)), ("slow", scaled(1.0 + 1e-6))]
    sweep.group("g", "w", "forward", lambda: [torch.arange(1.0, 11.0) * scale["now"]], variants)
    by = {r["variant"]: r for r in sweep.records}
    assert by["default"]["ms"] == 4.0 and by["off"]["status"] == "wrong" and "ms" not in by["off"]
    assert (by["fast"]["speedup"], by["slow"]["speedup"]) == (4.0 / 2.0, 4.0 / 8.0)
