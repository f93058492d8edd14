"""The main job end to end (`python -m dsc_kernels report --quick` writes REPORT.md and the figures) and the report's
sanity checks of its own timings."""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsc_kernels import report as R

FIGURES = [
    "uniqueness.png",
    "linear_rate.png",
    "noise_floor.png",
    "multilayer.png",
    "three_layer.png",
    "activations.png",
    "transformer.png",
    "ista_fista.png",
    "speed.png",
    "attention.png",
]


def row(provider, fwd, fwd_bwd, base=(100.0, 300.0), workload="csc-gray"):
    return dict(
        workload=workload,
        provider=provider,
        fwd_ms=fwd,
        fwd_bwd_ms=fwd_bwd,
        fwd_speedup=base[0] / fwd,
        fwd_bwd_speedup=base[1] / fwd_bwd,
    )


def test_sanity_checks_flag_a_forward_slower_than_its_forward_backward():
    flags = R.sanity_checks([row("reference", 100.0, 300.0), row("cpp", 65.0, 60.0)])
    assert len(flags) == 1 and "cpp" in flags[0] and "impossible" in flags[0]


def test_sanity_checks_pass_plausible_timings():
    rows = [row("reference", 100.0, 300.0), row("cpp", 20.0, 60.0), row("compile", 60.0, 350.0)]
    readme = {("csc-gray", "cpp"): (5.5, 5.1), ("csc-gray", "compile"): (1.55, 0.85)}
    attn = {"length": {"n": [256, 512], "backend": "cpp", "fused sparsemax": [1.0, 3.0]}}
    assert R.sanity_checks(rows, attn, readme=readme, load=(0.3, 0.2, 0.1), cpus=2) == []


def test_sanity_checks_flag_contradictions_noise_and_a_busy_machine():
    rows = [row("reference", 100.0, 300.0), row("compile", 400.0, 350.0 / 1.2)]
    readme = {("csc-gray", "compile"): (1.55, 0.85)}
    attn = {"length": {"n": [128, 256], "backend": "cpp", "softmax (SDPA)": [12.1, 0.74]}}
    flags = R.sanity_checks(rows, attn, readme=readme, load=(6.2, 5.0, 3.0), cpus=2)
    text = "\n".join(flags)
    assert "busy" in text
    assert "compile: forward speed-up 0.25× here contradicts the README's 1.55×" in text
    assert "forward+backward speed-up" not in text  # 1.2× vs 0.85× is within the factor 2 noise allowance
    assert "softmax (SDPA)" in text and "N = 256" in text
    nan = R.sanity_checks([row("cpp", float("nan"), 1.0)])
    assert len(nan) == 1 and "not a positive number" in nan[0]


def test_readme_speedups_reads_the_published_table():
    table = "\n".join(
        [
            "| workload (CPU size) | provider | forward ms | fwd+bwd ms | × eager (fwd / fwd+bwd) | peak |",
            "| --- | --- | --- | --- | --- | --- |",
            "| `csc-gray` (4,1,64,64), 32×7×7 | eager | 95.4 | 318.8 | 1 / 1 | 64.6 |",
            "| | `torch.compile` | 61.7 | 374.8 | 1.55 / 0.85 | 39.2 |",
            "| | `cpp`, `recompute=True` | 16.5 | 147.0 | 5.8 / 2.2 | 4.0 |",
            "| `deep-layer` (8,32,32,32) | `cpp` | 36.2 | 137.4 | **1.07 / 0.96** | 9.8 |",
            "| | something else | 1 | 2 | 3 / 4 | 5 |",
            "",
            "| a | × eager (fwd / fwd+bwd) |",
        ]
    )
    got = R.readme_speedups(table)
    assert got == {
        ("csc-gray", "reference"): (1.0, 1.0),
        ("csc-gray", "compile"): (1.55, 0.85),
        ("csc-gray", "cpp-recompute"): (5.8, 2.2),
        ("deep-layer", "cpp"): (1.07, 0.96),
    }
    assert R.readme_speedups("no table here") == {}
    readme = Path(__file__).parent.parent / "README.md"
    if readme.exists() and "× eager" in readme.read_text():  # the lead owns the README; read it when it has one
        assert R.readme_speedups(readme.read_text())


def test_machine_facts_are_complete():
    f = R.machine_facts("cpu")
    assert f["cpu"] and f["threads"] >= 1 and f["torch"] and f["triton"] and "UTC" in f["date"]
    text = "\n".join(R._machine_markdown(f))
    assert "load average at start" in text and "torch threads" in text


def test_help():
    out = subprocess.run([sys.executable, "-m", "dsc_kernels", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "report" in out.stdout


def test_quick_report(tmp_path: Path):
    # a user's environment: tests/conftest.py sets TRITON_INTERPRET for the kernel tests
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DSC_KERNELS_BACKEND")}
    out = subprocess.run(
        [sys.executable, "-m", "dsc_kernels", "report", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "C++ extension" in out.stderr  # said before the progress bar, not a silent stall
    report = (tmp_path / "REPORT.md").read_text()
    for section in (
        "## Machine",
        "load average at start",
        "## Claims",
        "## Speed",
        "median of 3 rounds",
        "timed interleaved",
        "## Sparse attention",
        "## Sanity checks of the timings",
        "## Figures",
        "| S1 |",
        "| S8-3 |",
        "| S10a |",
        "| S10b |",
        "| S3/S4-oracle |",
        "| reference |",
        "fused backend: cpp",
        "| fused shrink ms |",
    ):
        assert section in report, section
    assert "error:" not in report, report
    assert "agree with the README's table" not in report  # --quick compares nothing with it (it used to say so)
    assert "THEORY.md" not in report and "DESIGN" not in report
    for name in FIGURES:
        png = tmp_path / name
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in report


def test_readme_figures_are_copied_from_this_run(tmp_path: Path, monkeypatch):
    root, out = tmp_path / "checkout", tmp_path / "run"
    (root / "docs").mkdir(parents=True)
    out.mkdir()
    (root / "README.md").write_text("![speed](docs/speed.png)\n")
    (root / "docs" / "attention.png").write_bytes(b"old")
    for name in ("speed.png", "attention.png", "uniqueness.png"):
        (out / name).write_bytes(b"new " + name.encode())
    monkeypatch.setattr(R, "ROOT", root)
    copied = R._copy_readme_figures(out, [(n, n) for n in ("speed.png", "attention.png", "uniqueness.png")])
    assert sorted(copied) == ["attention.png", "speed.png"]  # shown in the README, or already published
    assert (root / "docs" / "attention.png").read_bytes() == b"new attention.png"
    assert not (root / "docs" / "uniqueness.png").exists()


@pytest.mark.parametrize(
    "extra, option",
    [
        (["--device", "cuda"], "--device"),
        (["--backend", "bogus"], "--backend"),
        (["--backend", "triton"], "--backend"),  # CPU tensors without the interpreter
        (["--training-runs", "no-such-folder"], "--training-runs"),
        (["--training-runs", "empty"], "--training-runs"),  # a folder, but no run in it
        (["--training-runs", "denoise-run"], "--training-runs"),  # a run, but not a digits one
        (["--training-runs", "list-run"], "--training-runs"),  # a metrics.json that is not a JSON object
    ],
)
def test_report_rejects_bad_arguments_before_any_work(extra, option, tmp_path, monkeypatch, capsys):
    from dsc_kernels.__main__ import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "denoise-run").mkdir()
    (tmp_path / "denoise-run" / "metrics.json").write_text('{"recipe": "denoise", "strategy": "cscnet"}')
    (tmp_path / "list-run").mkdir()
    (tmp_path / "list-run" / "metrics.json").write_text("[]")
    monkeypatch.setattr(R, "run_report", lambda args: pytest.fail("the report ran"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("TRITON_INTERPRET", "DSC_KERNELS_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as excinfo:
        main(["report", "--quick", "--out", "out", *extra])
    err = capsys.readouterr().err
    assert excinfo.value.code == 2 and f"argument {option}:" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_report_rejects_an_empty_training_runs(tmp_path, monkeypatch, capsys):
    """'' passed the check as '.' (here: a folder holding a digits run), then the report read '' as "no runs given"
    and trained its own short run instead of reading one."""
    from dsc_kernels.__main__ import main

    (tmp_path / "metrics.json").write_text('{"recipe": "digits", "strategy": "dsc"}')
    monkeypatch.setattr(R, "run_report", lambda args: pytest.fail("the report ran"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as excinfo:
        main(["report", "--quick", "--out", "out", "--training-runs", ""])
    err = capsys.readouterr().err
    assert excinfo.value.code == 2 and "argument --training-runs: must name a folder" in err
    assert not (tmp_path / "out").exists()


def test_readme_figures_outside_a_checkout_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    # an installed package has no README.md and docs/ beside it: the report ran for minutes, then exited at its end
    from dsc_kernels.__main__ import main

    monkeypatch.setattr(R, "ROOT", tmp_path / "site-packages")
    monkeypatch.setattr(R, "run_report", lambda args: pytest.fail("the report ran"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as excinfo:
        main(["report", "--quick", "--readme-figures", "--out", "out"])
    err = capsys.readouterr().err
    assert excinfo.value.code == 2 and "argument --readme-figures: run from a source checkout" in err
    assert not (tmp_path / "out").exists()


def test_report_rejects_an_empty_out(tmp_path, monkeypatch, capsys):
    from dsc_kernels.__main__ import main

    monkeypatch.setattr(R, "run_report", lambda args: pytest.fail("the report ran"))
    monkeypatch.chdir(tmp_path)  # Path('') is '.': the report landed in the working directory
    with pytest.raises(SystemExit) as excinfo:
        main(["report", "--quick", "--out", ""])
    assert excinfo.value.code == 2 and "argument --out: must name a folder" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_report_rejects_an_out_that_is_a_file(tmp_path, capsys):
    from dsc_kernels.__main__ import main

    (tmp_path / "taken").write_text("keep me")
    with pytest.raises(SystemExit) as excinfo:
        main(["report", "--quick", "--out", str(tmp_path / "taken")])
    assert excinfo.value.code == 2 and "argument --out" in capsys.readouterr().err
    assert (tmp_path / "taken").read_text() == "keep me"


def test_report_creates_its_out_folder_before_any_work_or_says_why_not(tmp_path, monkeypatch, capsys):
    from dsc_kernels.__main__ import main

    # os.access says yes to root for any folder: as root, /proc/report passed the check and failed at the end
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: True)
    monkeypatch.setattr(R, "run_report", lambda args: pytest.fail("the report ran"))
    with pytest.raises(SystemExit) as excinfo:
        main(["report", "--quick", "--out", "/proc/dsc-kernels-report"])
    err = capsys.readouterr().err
    assert excinfo.value.code == 2 and "argument --out: cannot create /proc/dsc-kernels-report" in err
    monkeypatch.setattr(R, "run_report", lambda args: Path(args.out) / "REPORT.md")
    main(["report", "--quick", "--out", str(tmp_path / "new" / "report")])
    assert (tmp_path / "new" / "report").is_dir()


def test_report_draws_no_progress_bar_into_a_log(tmp_path, monkeypatch, capsys):
    # stderr redirected to a file (`report > log 2>&1`): every \r-redrawn update used to pile up in it
    class Stop(Exception):
        pass

    def claims(quick, backend, device, bar):
        for _ in range(3):
            bar.update(1)
        raise Stop

    monkeypatch.setattr(R, "machine_facts", lambda device: {})
    monkeypatch.setattr(R, "_load_extension", lambda device: "")
    monkeypatch.setattr(R, "_run_claims", claims)
    args = argparse.Namespace(out=str(tmp_path), quick=True, device="cpu", backend="auto")
    with pytest.raises(Stop):
        R.run_report(args)
    assert capsys.readouterr().err == ""


def test_an_interrupted_rerun_leaves_no_earlier_report_beside_its_figures(tmp_path, monkeypatch):
    """The figures are written before the training section (minutes in a full run) and REPORT.md after it: a rerun
    interrupted there left the earlier REPORT.md beside this run's figures, a folder that reads as a finished run."""
    from dsc_kernels.recipes import report_section

    (tmp_path / "REPORT.md").write_text("# dsc_kernels report\n\nan earlier run\n")
    monkeypatch.setattr(R, "machine_facts", lambda device: {})
    monkeypatch.setattr(R, "_load_extension", lambda device: "")
    monkeypatch.setattr(R, "_run_claims", lambda quick, backend, device, bar: [])
    monkeypatch.setattr(R, "_run_speed", lambda quick, device, bar: ([], {}))
    monkeypatch.setattr(R, "_run_attention", lambda quick, device, bar: {"error": "skipped"})
    monkeypatch.setattr("dsc_kernels.report_figures.make_figures", lambda *args: [])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_section, "training_section", interrupted)
    args = argparse.Namespace(out=str(tmp_path), quick=True, device="cpu", backend="auto")
    with pytest.raises(KeyboardInterrupt):
        R.run_report(args)
    assert not (tmp_path / "REPORT.md").exists()


# ------------------------------------------------------------------ the report's rendering, on canned results
# test_quick_report runs everything but cannot tell a PASS row from a FAIL one, nor which option reached which
# experiment: these feed run_report canned results (seconds) and read REPORT.md back against what was fed in.
def _canned_report(tmp_path, monkeypatch, message="boom", speed_error=None, **arg_overrides):
    """run_report with every experiment replaced; returns (REPORT.md text, what each stage was called with)."""
    from dsc_kernels.experiments import ClaimResult
    from dsc_kernels.recipes import report_section

    calls = {"claims": []}

    def holds(**kwargs):
        calls["claims"].append(kwargs)
        return ClaimResult(id="A", claim="a holds", theory="t", measured="m", holds=True, source="s")

    def fails(**kwargs):
        return ClaimResult(id="B", claim="b fails", theory="t", measured="m", holds=False, source="s")

    def raises(**kwargs):
        raise RuntimeError(message)

    def two(**kwargs):
        return [
            ClaimResult(id="D1", claim="d1", theory="t", measured="m", holds=True, source="s"),
            ClaimResult(id="D2", claim="d2", theory="t", measured="m", holds=False, source="s"),
        ]

    monkeypatch.setattr(R, "EXPERIMENTS", {"A": holds, "B": fails, "C": raises, "D": two})
    facts = dict(R.machine_facts("cpu"), load=(9.0, 1.0, 1.0), cpus=2, threads=3)
    monkeypatch.setattr(R, "machine_facts", lambda device: facts)
    monkeypatch.setattr(R, "_load_extension", lambda device: "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def speed(quick, device, bar):
        calls["speed"] = (quick, device)
        rows = [dict(workload="w", provider="reference", fwd_ms=10.0, fwd_bwd_ms=40.0, train_peak_bytes=2**20)]
        rows.append(dict(workload="w", provider="cpp", fwd_ms=2.0, fwd_bwd_ms=5.0, train_peak_bytes=2**19))
        rows[1].update(fwd_speedup=5.0, fwd_bwd_speedup=8.0, train_peak_ratio=0.5)
        if speed_error is not None:
            rows.append(dict(workload="w", provider="triton", error=speed_error))
        return rows, {}

    def attention(quick, device, bar):
        calls["attention"] = (quick, device)
        return {"error": "canned"}

    def training(out_dir, *, quick, runs=None, backend="auto", device="cpu"):
        calls["training"] = (quick, runs, backend, device)
        return ["", "## Training (canned)"], []

    monkeypatch.setattr(R, "_run_speed", speed)
    monkeypatch.setattr(R, "_run_attention", attention)
    monkeypatch.setattr("dsc_kernels.report_figures.make_figures", lambda *args: [])
    monkeypatch.setattr(report_section, "training_section", training)
    args = dict(out=str(tmp_path), quick=True, device="cuda", backend="reference", training_runs="runs-folder")
    args.update(arg_overrides)
    path = R.run_report(argparse.Namespace(**args))
    return path.read_text(), calls


def test_report_rows_say_which_claims_hold_and_count_them(tmp_path, monkeypatch):
    text, _ = _canned_report(tmp_path, monkeypatch)
    holds = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] in ("A", "B", "C", "D1", "D2"):
            holds[cells[0]] = cells[4]
    # every claim has its row, a raised experiment included (as a failure naming the error)
    assert holds == {"A": "yes", "B": "**no**", "C": "**no**", "D1": "yes", "D2": "**no**"}
    assert "error: RuntimeError: boom" in text
    assert "2/5 claims hold" in text


def _table(text: str, header: str) -> list[list[str]]:
    """The rows of the markdown table under `header`, split at the unescaped |."""
    lines = text.split(header + "\n", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]] for line in lines]


def test_report_tables_keep_a_multi_line_error_in_its_own_row(tmp_path, monkeypatch):
    """An exception's message with line breaks (torch's often has them) split its row: the claim's holds cell, and
    with a blank line every later claim, fell out of the table."""
    text, _ = _canned_report(tmp_path, monkeypatch, message="first\n\nsecond | third", speed_error="error: a\n\nb")
    claims = _table(text, "| id | claim | theory | measured | holds | source | s |")
    assert [len(r) for r in claims] == [7] * 5, claims  # was: C's row cut after "first", its holds cell lost
    assert [(r[0], r[4]) for r in claims] == [
        ("A", "yes"),
        ("B", "**no**"),
        ("C", "**no**"),
        ("D1", "yes"),
        ("D2", "**no**"),
    ]
    assert "first second \\| third" in claims[2][3]
    speed = _table(
        text,
        "| workload | provider | forward ms | fwd+bwd ms | speed-up fwd | speed-up fwd+bwd | train-step peak MiB |",
    )
    assert [r[1] for r in speed] == ["reference", "cpp", "triton"] and all(len(r) == 7 for r in speed)


def test_report_passes_its_options_on_to_every_stage(tmp_path, monkeypatch):
    text, calls = _canned_report(tmp_path, monkeypatch)
    assert calls["claims"] == [dict(quick=True, backend="reference", device="cuda", dtype=torch.float32)]
    assert calls["speed"] == (True, "cuda") and calls["attention"] == (True, "cuda")
    assert calls["training"] == (True, "runs-folder", "reference", "cuda")
    _, calls = _canned_report(tmp_path, monkeypatch, quick=False, device="cpu", backend="cpp", training_runs=None)
    assert calls["claims"] == [dict(quick=False, backend="cpp", device="cpu", dtype=torch.float64)]
    # the training section ran auto on the CPU whatever --backend and --device said
    assert calls["speed"] == (False, "cpu") and calls["training"] == (False, None, "cpp", "cpu")


def test_report_names_its_training_runs_in_its_command_line(tmp_path, monkeypatch):
    """The header's command line left out --training-runs: rerun as written it trained anew (measured: a report read
    from a 10-epoch folder named `report --quick --device cpu --backend auto`, whose short run trains 3 epochs)."""
    text, _ = _canned_report(tmp_path, monkeypatch, training_runs="runs folder")
    command = "python -m dsc_kernels report --quick --device cuda --backend reference"
    assert f"`{command} --training-runs 'runs folder'` — " in text
    text, _ = _canned_report(tmp_path, monkeypatch, training_runs=None)
    assert f"`{command}` — " in text


def test_report_speed_rows_keep_their_columns_and_the_busy_flag(tmp_path, monkeypatch):
    text, _ = _canned_report(tmp_path, monkeypatch)
    assert "| w | cpp | 2.00 | 5.00 | 5.00× | 8.00× | 0.5 (0.50×) |" in text
    assert "torch threads 3" in text and "2 cores" in text
    assert "busy (1-minute load 9.00 on 2 cores)" in text  # the load at the start reaches the sanity checks


def test_only_a_full_cpu_report_compares_its_speed_ups_with_the_readme(tmp_path, monkeypatch):
    """A --quick run (a quarter of the batch, one workload) has no speed-ups comparable with the published table."""
    (tmp_path / "checkout").mkdir()
    table = ["| workload | provider | × eager (fwd / fwd+bwd) |", "| --- | --- | --- |", "| `w` | `cpp` | 100 / 100 |"]
    (tmp_path / "checkout" / "README.md").write_text("\n".join(table) + "\n")
    monkeypatch.setattr(R, "ROOT", tmp_path / "checkout")
    text, _ = _canned_report(tmp_path / "quick", monkeypatch, device="cpu")
    assert "contradicts" not in text
    text, _ = _canned_report(tmp_path / "full", monkeypatch, device="cpu", quick=False)
    assert "w / cpp: forward speed-up 5.00× here contradicts the README's 100.00×" in text


def test_machine_facts_record_torch_threads_not_the_core_count():
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            assert R.machine_facts("cpu")["threads"] == n
    finally:
        torch.set_num_threads(threads)


def test_speed_section_times_the_quick_rounds_it_quotes(monkeypatch):
    from dsc_kernels.experiments import speed as S

    seen = []

    def measure(workload, device, mode, providers, rounds, scale):
        seen.append((device, rounds, scale))
        ok = dict(status="ok", timing=dict(median_ms=1.0 if mode == "forward" else 3.0, n=rounds))
        return [dict(ok, provider=p, memory=dict(peak_bytes=100)) for p in providers]

    available = {p: None if p in ("reference", "cpp") else "not here" for p in S.PROVIDERS}
    monkeypatch.setattr(S, "available_providers", lambda device: available)
    monkeypatch.setattr(S, "measure_conv", measure)

    class Bar:
        def set_postfix_str(self, s):
            pass

        def update(self, n):
            pass

    rows, _ = R._run_speed(True, "cpu", Bar())
    assert {(d, r) for d, r, _ in seen} == {("cpu", R.speed_repetitions(True))} and R.speed_repetitions(True) == 3
    assert [r["provider"] for r in rows] == ["reference", "cpp"] and rows[1]["fwd_speedup"] == 1.0


def test_speed_figure_labels_each_providers_bars_with_its_own_name(tmp_path, monkeypatch):
    from dsc_kernels import report_figures as RF

    figs = []
    monkeypatch.setattr(RF, "_save", lambda fig, out_dir, name: figs.append(fig) or name)
    rows = [
        dict(workload=w, provider=p, fwd_speedup=s, fwd_bwd_speedup=s / 2)
        for w, base in (("w1", 1.0), ("w2", 10.0))
        for p, s in (("reference", base), ("cpp", base * 3), ("triton", base * 7))
    ]
    RF._speed(rows, tmp_path)
    for ax, key in zip(figs[0].axes, ("fwd_speedup", "fwd_bwd_speedup")):
        bars = {c.get_label(): [b.get_height() for b in c] for c in ax.containers}
        assert bars == {p: [r[key] for r in rows if r["provider"] == p] for p in ("reference", "cpp", "triton")}


def test_lasso_bias_figure_puts_each_constant_threshold_error_at_its_iteration(tmp_path, monkeypatch):
    """S11's curve holds the error after 1, 2, ... steps from z = 0; it was drawn from k = 0, one iteration left of
    the LISTA-CP curve beside it (whose first point is Γ⁰ = 0 at k = 0)."""
    import numpy as np

    from dsc_kernels import report_figures as RF
    from dsc_kernels.experiments import ClaimResult

    figs = []
    monkeypatch.setattr(RF, "_save", lambda fig, out_dir, name: figs.append(fig) or name)
    claim = lambda i, curves: ClaimResult(id=i, claim="", theory="", measured="", holds=True, source="", curves=curves)  # noqa: E731
    by_id = {
        "S11": claim("S11", {"ista_curve": np.array([0.5, 0.2, 0.1]), "lam_curve": 0.03, "predicted": np.array([0.1])}),
        "S3/S4-geometric": claim("S3/S4-geometric", {"err": np.array([1.0, 0.5, 0.25, 0.125])}),
    }
    RF._ista(by_id, tmp_path)
    lines = {line.get_label(): line for line in figs[0].axes[1].get_lines()}
    constant = lines["constant θ (ISTA, λ = 0.03)"]
    assert list(constant.get_xdata()) == [1, 2, 3] and list(constant.get_ydata()) == [0.5, 0.2, 0.1]
    assert list(lines["geometric θ_k (LISTA-CP)"].get_xdata()) == [0, 1, 2, 3]


def test_figures_have_no_blank_panels_when_an_experiment_or_backend_is_missing(tmp_path, monkeypatch):
    """A failed objective_rates and lasso_bias left ista_fista.png as two empty frames, listed in REPORT.md; without
    a fused sparse-attention backend the shrink-mode panel of attention.png was an empty frame."""
    from dsc_kernels import report_figures as RF

    assert RF.make_figures([], [], {"error": "x"}, tmp_path) == []
    figs = []
    monkeypatch.setattr(RF, "_save", lambda fig, out_dir, name: figs.append(fig) or name)
    attn = {
        "length": {"n": [128, 256], "backend": None, "refused": {}, "softmax (SDPA)": [1.0, 2.0]},
        "sparsity": {"sparsity": [0.5, 0.9], "n": 256, "backend": None, "refused": {}, "softmax (SDPA)": 2.0},
    }
    assert [name for name, _ in RF.make_figures([], [], attn, tmp_path)] == ["attention.png"]
    right = figs[0].axes[1]
    assert "no fused sparse-attention backend" in " ".join(t.get_text() for t in right.texts)
    left = figs[0].axes[0]
    # the measured lengths are labelled: a log axis over less than a decade labelled none of them
    assert [t.get_text() for t in left.get_xticklabels()] == ["128", "256"]
    assert [t.get_text() for t in left.get_xticklabels(minor=True)] == [""] * len(left.get_xticks(minor=True))
