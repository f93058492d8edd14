"""The main job end to end: `python -m dsc_kernels report --quick` writes REPORT.md and the figures."""
import os
import subprocess
import sys
from pathlib import Path

FIGURES = ["linear_rate.png", "noise_floor.png", "multilayer.png", "activations.png", "ista_fista.png", "speed.png",
           "attention.png"]


def test_help():
    out = subprocess.run([sys.executable, "-m", "dsc_kernels", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "report" in out.stdout


def test_quick_report(tmp_path: Path):
    # a user's environment: tests/conftest.py sets TRITON_INTERPRET for the kernel tests
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DSC_KERNELS_BACKEND")}
    out = subprocess.run([sys.executable, "-m", "dsc_kernels", "report", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = (tmp_path / "REPORT.md").read_text()
    for section in ("## Machine", "## Claims", "## Speed", "## Sparse attention", "## Figures", "| S3/S4-oracle |",
                    "| reference |", "fused backend: cpp", "| fused shrink ms |"):
        assert section in report
    assert "error:" not in report, report
    for name in FIGURES:
        png = tmp_path / name
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in report
