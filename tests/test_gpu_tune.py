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
