"""bench/triton_memory.py, the CPU count of the Triton conv-ISTA training step's memory, on small batches: it runs
(in its own process: it stubs the kernel launches) and prints a ratio per GPU workload, recompute mode under save
mode and both under eager."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_memory_count_prints_every_workload():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "triton_memory.py"), "--batch-scale", "0.05"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| ") and "MiB" in line]
    assert [r[1].strip() for r in rows] == ["csc-gray", "csc-rgb-strided", "deep-layer", "small-map"], proc.stdout
    for r in rows:
        save, recompute = float(r[3]), float(r[4])
        assert 0 < recompute < save < 1, r


@pytest.mark.parametrize("scale", ["nan", "inf", "0", "-1", "x"])
def test_a_bad_batch_scale_is_a_usage_error(scale):
    """nan and inf were a traceback from round() after the imports; 0 and negative scales silently ran batch 1."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "triton_memory.py"), "--batch-scale", scale],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "argument --batch-scale:" in proc.stderr, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "MiB" not in proc.stdout
