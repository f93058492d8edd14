"""The prepared GPU run (`make gpu-check`, bench/gpu_check.py) rehearsed on the CPU: a GPU lease is minutes long, so
the orchestrator, its bench child and the results document must not meet their first error on the device."""

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import rehearse_gpu_script

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    """bench/gpu_check.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.child_process
def test_dry_run_benchmarks_checks_and_writes_the_results_document(tmp_path):
    proc = rehearse_gpu_script(
        "gpu_check.py",
        tmp_path,
        300,
        DSC_GPU_CHECK_STEPS="env,bench,summary",  # the tests and sanitizer steps have suites of their own
        DSC_GPU_CHECK_BUDGET_S="60",  # the base providers fit, torch.compile's groups report that they do not
        DSC_GPU_CHECK_WARM="0",
        DSC_GPU_CHECK_AUTOTUNE="none",
    )
    run = json.loads((tmp_path / "run.json").read_text())
    assert {step: s["status"] for step, s in run["steps"].items()} == {"env": "ok", "bench": "ok", "summary": "ok"}
    assert run["environment"]["torch"] and run["method"]
    timed = [r for r in run["results"] if r["status"] == "ok"]
    # Each conv-ISTA group is timed for eager and cpp, or the plan says the budget left it out (how much fits depends
    # on the machine's load; the first group always does).
    groups = [(w, m) for w in ("deep-layer", "csc-gray", "csc-rgb-strided") for m in ("forward", "forward_backward")]
    measured = [
        g for g in groups if {"reference", "cpp"} <= {r["provider"] for r in timed if (r["workload"], r["mode"]) == g}
    ]
    assert groups[0] in measured
    for workload, mode in set(groups) - set(measured):
        assert f"budget: {workload} {mode} not measured" in " ".join(run["plan"])
    for r in timed:  # each provider passed its check against fp64 before it was timed
        assert r["check"] and all(c["ok"] for c in r["check"])
        assert r["timing"]["median_ms"] > 0 and r["timing"]["samples_ms"]
    assert all(r["reason"] for r in run["results"] if r["status"] == "skipped")  # every skip says why
    assert (tmp_path / "run.csv").read_text().count("\n") == len(run["results"]) + 1
    summary = (tmp_path / "summary.md").read_text()
    assert "| bench | ok |" in summary and "SKIP (no GPU)" in proc.stdout


def test_the_tests_step_names_every_file_that_holds_gpu_tests():
    """The tests step runs `pytest -m gpu` on a list of files rather than on tests/ (whose other modules build the C++
    extension at import): a file with gpu tests missing from the list would never run on the device."""
    import re

    gpu_check = _gpu_check()
    holding = {
        f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py") if re.search(r"mark\.gpu\b", p.read_text())
    }
    assert holding and holding == set(gpu_check.GPU_TEST_FILES)
    assert gpu_check.GPU_TEST_FILES[0] == "tests/test_triton_conv_ista_gpu.py"  # what failed on the H200 first


def test_a_summary_over_a_cut_off_run_json_still_removes_the_side_file(tmp_path):
    """The device tool returns 8 files: env.tmp.json must go even when run.json was cut off mid-write."""
    gpu_check = _gpu_check()
    (tmp_path / "env.tmp.json").write_text('{"device": "x"}')
    (tmp_path / "run.json").write_text('{"environment": {"device": "x"}, "results": [')
    lines = []
    assert gpu_check.step_summary(tmp_path, lines.append, {"env": {"status": "ok"}})["status"] == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "summary.md"]
    assert "unreadable" in " ".join(lines)


def test_the_next_lease_command_fits_the_device_tools_600_s_per_command():
    """docs/gpu.md ran gpu-check and gpu-tune in one call at their defaults, 440 s + 300 s (plus the tune's imports
    and its last group's overrun): past the 600 s at which the device tool kills a command."""
    import re

    text = (ROOT / "docs" / "gpu.md").read_text().split("**Next lease.**", 1)[1]
    check = re.search(r"DSC_GPU_CHECK_BUDGET_S=(\d+)[^\n]*bench/gpu_check\.py", text)
    tune = re.search(r"DSC_GPU_TUNE_BUDGET_S=(\d+)[^\n]*bench/gpu_tune\.py", text)
    assert check and tune, "the next lease's command names both budgets"
    assert int(check[1]) + int(tune[1]) + 60 <= 600


def test_the_bench_planner_still_sees_which_groups_the_warm_up_compiled(tmp_path, monkeypatch):
    """gpu-check folded warm.log into gpu-check.log before the bench step, whose planner reads warm.log for the
    groups whose compile caches are warm: it saw none, and estimated every compile group cold (45-70 s, not 15)."""
    import sys
    import time

    gpu_check = _gpu_check()  # puts bench/ on sys.path
    from gpu_check_children import _warmed

    warm = tmp_path / "warm_child.py"  # the warm-up child, without its minutes of compilation
    warm.write_text("import time\nprint('warmed deep-layer forward 1.0 s', flush=True)\ntime.sleep(60)\n")
    seen = {}

    def tests_step(out, log, timeout):
        for _ in range(200):  # until the warm-up child has written its line
            if "warmed" in (out / "warm.log").read_text():
                break
            time.sleep(0.05)
        return {"status": "ok"}

    def bench_step(out, log, timeout):
        seen["warmed"] = _warmed(out)
        return {"status": "ok"}

    monkeypatch.setattr(gpu_check, "CHILDREN", warm)
    monkeypatch.setattr(gpu_check, "step_tests", tests_step)
    monkeypatch.setattr(gpu_check, "step_bench", bench_step)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py"])
    monkeypatch.setenv("DSC_GPU_CHECK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("DSC_GPU_CHECK_STEPS", "tests,bench")
    monkeypatch.setenv("DSC_GPU_CHECK_DRY_RUN", "1")
    monkeypatch.delenv("DSC_GPU_CHECK_WARM", raising=False)
    assert gpu_check.main() == 0
    assert seen["warmed"] == {("deep-layer", "forward")}
    out = tmp_path / "out"
    assert not (out / "warm.log").exists() and "warmed deep-layer forward" in (out / "gpu-check.log").read_text()


@pytest.mark.parametrize(
    "variable, value",
    [
        ("DSC_GPU_CHECK_BUDGET_S", "abc"),  # a traceback
        ("DSC_GPU_CHECK_BUDGET_S", "nan"),  # every time box nan: no step was ever cut short, the lease ran out
        ("DSC_GPU_CHECK_STEPS", "env,bnech"),  # the misspelt step was skipped silently
        ("DSC_GPU_CHECK_AUTOTUNE", "small_map"),  # the misspelt workload got no max-autotune run, silently
    ],
)
def test_a_bad_environment_setting_is_a_usage_error_before_any_step(variable, value, tmp_path, monkeypatch, capsys):
    gpu_check = _gpu_check()
    monkeypatch.setattr("sys.argv", ["gpu_check.py"])
    monkeypatch.setenv("DSC_GPU_CHECK_DRY_RUN", "1")
    monkeypatch.setenv("DSC_GPU_CHECK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv(variable, value)
    for name in ("step_env", "step_tests", "step_sanitize", "step_bench"):
        monkeypatch.setattr(gpu_check, name, lambda *args, **kwargs: pytest.fail("a step ran"))
    with pytest.raises(SystemExit) as excinfo:
        gpu_check.main()
    err = capsys.readouterr().err
    assert excinfo.value.code == 2 and variable in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
