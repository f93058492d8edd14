"""The measurement every benchmark relies on: interleaved timing, the memory meter, the correctness gate that keeps a
wrong provider from being timed, and the one results schema (dsc_kernels/experiments/{measure,speed,records}.py)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from dsc_kernels.experiments import measure as M
from dsc_kernels.experiments import records
from dsc_kernels.experiments import speed as S
from dsc_kernels.experiments.measure import measure_memory, time_interleaved


def test_providers_are_interleaved_and_warmed_up_outside_the_samples():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    t = time_interleaved(fns, "cpu", rounds=3, warmup=2)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up first, outside the timed rounds
    assert calls[6:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # each round rotated by one
    assert all(x.n == 3 and x.warmup == 2 and len(x.samples_ms) == 3 and x.error is None for x in t.values())
    assert t["a"].to_dict()["median_ms"] == t["a"].median_ms


def test_a_failing_provider_is_dropped_with_its_error():
    state = {"n": 0}

    def flaky():
        state["n"] += 1
        if state["n"] > 2:
            raise RuntimeError("boom")

    t = time_interleaved({"ok": lambda: None, "flaky": flaky}, "cpu", rounds=4, warmup=1)
    assert t["ok"].n == 4 and t["flaky"].n == 0 and "boom" in t["flaky"].error


def test_memory_meter_sees_peak_and_retained_bytes():
    def fn():
        scratch = torch.ones(1 << 20)  # 4 MiB freed before returning
        out = torch.ones(1 << 18)  # 1 MiB kept
        del scratch
        return out

    use = measure_memory(fn, "cpu")
    assert use.retained_bytes == 1 << 20
    assert use.peak_bytes >= (1 << 22) + (1 << 20)


def test_memory_meter_ignores_frees_of_blocks_from_before_the_call():
    """A block allocated during one measurement and freed during the next is not part of the second call's use:
    c10 reports its free (it remembers the size from the first profile), and summing every free event took the
    second measurement 4 MiB below zero here."""
    held = {}

    def allocate():
        held["block"] = torch.ones(1 << 20)  # 4 MiB, alive after the call

    assert measure_memory(allocate, "cpu").retained_bytes == 1 << 22

    def replace():
        del held["block"]
        return torch.ones(1 << 18)  # 1 MiB

    use = measure_memory(replace, "cpu")
    assert use.peak_bytes == use.retained_bytes == 1 << 20


def test_percentiles_are_nearest_rank():
    # int(f * n) read one rank high whenever f * n is whole: p80 of five samples was the maximum
    timing = M.Timing(samples_ms=[5.0, 1.0, 4.0, 2.0, 3.0]).to_dict()
    assert (timing["p20_ms"], timing["p80_ms"]) == (1.0, 4.0)


def test_memory_is_measured_without_the_timed_steps_gradients(monkeypatch):
    """The timed training steps leave their gradients; the measured step frees them first, which on CUDA counts
    against its peak (base includes them): every provider's peak came out low by the gradients' size."""
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    w = torch.randn(8, 8, 3, 3, requires_grad=True)
    fn = S.forward_backward(lambda: torch.nn.functional.conv2d(x, w, padding=1), {"x": x, "weight": w})
    alive = []

    def measure(run, device):
        alive.append(sum(t.grad is not None for t in (x, w)))
        return measure_memory(run, device)

    monkeypatch.setattr(M, "measure_memory", measure)
    candidate = {"p": lambda: M.Candidate(check=None, run=fn, reset=lambda: [setattr(t, "grad", None) for t in (x, w)])}
    base = dict(suite="s", workload="w", mode="forward_backward", dtype="float32", params={})
    (record,) = M.measure_providers(base, "cpu", candidate, rounds=2, warmup=1)
    assert record["status"] == "ok" and alive == [0]


def _scaled(monkeypatch, factors: dict, unavailable=()):
    """provider_fn with the named providers' outputs scaled (cpp computes the reference, then scaled)."""
    real = S.provider_fn

    def provider_fn(provider, inputs):
        fn = real("reference" if provider == "cpp" else provider, inputs)
        if provider not in factors:
            return fn

        def scaled():
            return fn() * factors[provider]

        scaled.leaves = fn.leaves
        return scaled

    monkeypatch.setattr(S, "provider_fn", provider_fn)
    monkeypatch.setattr(
        S, "available_providers", lambda device: {p: "absent" if p in unavailable else None for p in S.PROVIDERS}
    )


def _wrong_cpp(monkeypatch):
    _scaled(monkeypatch, {"cpp": 1.1})  # a 10% error: what a wrong kernel looks like


@pytest.mark.parametrize("mode", S.MODES)
def test_a_wrong_provider_is_never_timed(mode, monkeypatch):
    _wrong_cpp(monkeypatch)
    recs = {
        r["provider"]: r
        for r in S.measure_conv(
            S.WORKLOADS["deep-layer"], "cpu", mode, ["reference", "cpp"], scale=0.125, rounds=2, warmup=1
        )
    }
    assert recs["reference"]["status"] == "ok" and recs["reference"]["timing"]["n"] == 2
    assert recs["cpp"]["status"] == "wrong" and recs["cpp"]["timing"] is None
    assert not all(c["ok"] for c in recs["cpp"]["check"])


class _MirroredGradOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        return z.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.flip(-1)


def _training_step_records(monkeypatch, provider_fn) -> dict:
    """deep-layer's training-step records of reference and cpp, cpp built by ``provider_fn``: {provider: record}."""
    monkeypatch.setattr(S, "provider_fn", provider_fn)
    monkeypatch.setattr(S, "available_providers", lambda device: {p: None for p in S.PROVIDERS})
    return {
        r["provider"]: r
        for r in S.measure_conv(
            S.WORKLOADS["deep-layer"], "cpu", "forward_backward", ["reference", "cpp"], scale=0.125, rounds=1, warmup=0
        )
    }


def test_the_gate_sees_a_backward_that_reads_grad_output_at_the_wrong_positions(monkeypatch):
    """The step was checked with the gradients of sum(z): under its all-ones cotangent a backward that reads
    grad_output mirrored (a wrong stride or layout) gave exactly the right gradients and was timed."""
    real = S.provider_fn

    def provider_fn(provider, inputs):
        fn = real("reference" if provider == "cpp" else provider, inputs)
        if provider != "cpp":
            return fn

        def mirrored():
            return _MirroredGradOutput.apply(fn())

        mirrored.leaves = fn.leaves
        return mirrored

    recs = _training_step_records(monkeypatch, provider_fn)
    assert recs["reference"]["status"] == "ok"
    assert recs["cpp"]["status"] == "wrong" and recs["cpp"]["timing"] is None


@pytest.mark.parametrize("channels_last", [True, False])
def test_the_yardstick_is_the_less_accurate_eager_layout(channels_last, monkeypatch):
    # As cuDNN on a GPU with TF32 allowed: channels_last off by 1e-3 relative, NCHW exact; a kernel at 1.5e-3 is
    # within twice PyTorch's own error only when the channels_last layout runs here.
    _scaled(
        monkeypatch,
        {"reference-channels_last": 1 + 1e-3, "cpp": 1 + 1.5e-3},
        () if channels_last else ["reference-channels_last"],
    )
    recs = {
        r["provider"]: r
        for r in S.measure_conv(S.WORKLOADS["deep-layer"], "cpu", "forward", ["cpp"], scale=0.125, rounds=2, warmup=1)
    }
    assert recs["cpp"]["status"] == ("ok" if channels_last else "wrong")
    check = recs["cpp"]["check"][0]
    assert check["eager_error"] > 1e-4 if channels_last else check["eager_error"] < 1e-5


def test_a_layout_without_a_yardstick_gives_way_to_one_with():
    # channels_last eager gone NaN must not fail a provider that NCHW eager can judge
    ref = torch.randn(1000, dtype=torch.float64)
    nchw = ref.float()
    broken = nchw.clone()
    broken[0] = float("nan")
    verdict = S._check([nchw * (1 + 1e-6)], [ref], [[nchw], [broken]], "forward")[0]
    assert verdict.ok and verdict.eager_error < 1e-5, verdict.message


def test_records_schema_ratios_and_files(tmp_path):
    recs = S.measure_conv(
        S.WORKLOADS["deep-layer"],
        "cpu",
        "forward_backward",
        ["reference", "cpp", "triton"],
        scale=0.125,
        rounds=2,
        warmup=1,
    )
    by = {r["provider"]: r for r in recs}
    assert by["triton"]["status"] == "skipped" and "interpreter" in by["triton"]["reason"]
    doc = records.run_document("test", "cpu", recs, {"timing": "test"})
    ref = by["reference"]
    assert ref["ratios"]["speedup_vs_eager"] == pytest.approx(1.0)
    assert ref["ratios"]["train_peak_ratio_vs_eager"] == pytest.approx(1.0)
    assert ref["memory"]["peak_bytes"] > 0 and ref["params"]["n_iter"] == 5
    if by["cpp"]["status"] == "ok":
        assert by["cpp"]["ratios"]["speedup_vs_eager"] == pytest.approx(
            ref["timing"]["median_ms"] / by["cpp"]["timing"]["median_ms"]
        )
    json_path, csv_path = records.write_run(doc, tmp_path, "run")
    loaded = json.loads(json_path.read_text())
    assert loaded["schema"] == records.SCHEMA and loaded["environment"]["torch"] == torch.__version__
    assert loaded["environment"]["source_hash"] and loaded["results"][0]["timing"]["samples_ms"]
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["provider"] for r in rows] == [r["provider"] for r in recs]
    assert records.load_runs(tmp_path)[0]["suite"] == "test"


def test_single_provider_forms_used_by_the_report():
    inputs = S.make_inputs(S.WORKLOADS["deep-layer"], "cpu", requires_grad=True, scale=0.125)
    fn = S.provider_fn("reference", inputs)
    assert S.time_ms(fn, "cpu", reps=1) > 0
    out_bytes = fn().untyped_storage().nbytes()
    assert S.peak_memory_bytes(fn, "cpu") > 2 * out_bytes  # autograd keeps every iteration's intermediates
    with torch.no_grad():
        assert S.peak_memory_bytes(fn, "cpu") == out_bytes
    assert S.train_step_peak_bytes(fn, inputs, "cpu") > S.peak_memory_bytes(fn, "cpu")


def test_readme_table_is_generated_from_committed_runs(tmp_path):
    import importlib.util
    from pathlib import Path

    recs = S.measure_conv(
        S.WORKLOADS["deep-layer"], "cpu", "forward", ["reference", "cpp"], scale=0.125, rounds=2, warmup=1
    )
    records.write_run(records.run_document("bench", "cpu", recs, {"timing": "test"}), tmp_path, "run")
    dry = records.run_document("gpu-check", "cpu", recs, {"timing": "test", "dry_run": True})
    records.write_run(dry, tmp_path, "dry")
    readme, full = tmp_path / "README.md", tmp_path / "benchmarks.md"
    for f in (readme, full):
        f.write_text("intro\n<!-- bench-results:start -->\nold\n<!-- bench-results:end -->\nend\n")
    spec = importlib.util.spec_from_file_location(
        "results_table", Path(__file__).parents[1] / "bench" / "results_table.py"
    )
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    assert table.main(["--results", str(tmp_path), "--readme", str(readme), "--full", str(full)]) == 0
    for f in (readme, full):
        text = f.read_text()
        assert "old" not in text and text.startswith("intro\n") and text.endswith("end\n")
        assert "| deep-layer | forward | float32 | cpp |" in text and "gpu-check" not in text  # dry runs left out
    # the full table has every provider with its median; the summary only ours, as ratios
    cpp = next(r for r in recs if r["provider"] == "cpp")
    assert "| deep-layer | forward | float32 | reference |" in full.read_text()
    assert "| deep-layer | forward | float32 | reference |" not in readme.read_text()
    assert f"| {cpp['ratios']['speedup_vs_eager']:.2f} |" in readme.read_text()
    unmarked = tmp_path / "unmarked.md"
    unmarked.write_text("no markers\n")
    assert table.main(["--results", str(tmp_path), "--readme", str(unmarked)]) == 1


def test_results_table_refuses_a_results_folder_without_runs_before_rewriting(tmp_path, capsys):
    """A mistyped --results (no such folder, or one without runs) exited 0 after replacing the README's published
    tables with "No benchmark runs under ..."; a missing --readme file was a traceback."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "results_table", Path(__file__).parents[1] / "bench" / "results_table.py"
    )
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    readme = tmp_path / "README.md"
    marked = "intro\n<!-- bench-results:start -->\npublished\n<!-- bench-results:end -->\nend\n"
    readme.write_text(marked)
    (tmp_path / "empty").mkdir()
    for argv, option in [
        (["--results", str(tmp_path / "typo"), "--readme", str(readme)], "--results"),
        (["--results", str(tmp_path / "empty"), "--full", str(readme)], "--results"),
        (["--results", str(tmp_path / "empty"), "--readme", str(tmp_path / "missing.md")], "--readme"),
        (["--results", str(tmp_path / "empty"), "--full", str(tmp_path)], "--full"),
    ]:
        with pytest.raises(SystemExit) as excinfo:
            table.main(argv)
        err = capsys.readouterr().err
        assert excinfo.value.code == 2 and f"argument {option}:" in err, (argv, err)
        assert readme.read_text() == marked


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_attention_gate_sees_a_provider_wrong_only_in_the_last_rows(backward, monkeypatch):
    """The attention gate checked O's first 256 rows only: a kernel wrong past them (its later row blocks, or the
    causal rows that see every key) passed and was timed."""
    from dsc_kernels.experiments import attention_speed as A

    real = A.attention_fn

    def attention_fn(provider, q, k, v, causal):
        fn = real("reference" if provider == "cpp" else provider, q, k, v, causal)
        if provider != "cpp":
            return fn
        return lambda: fn() * torch.where(torch.arange(q.shape[2]) >= q.shape[2] - 8, 1.5, 1.0)[:, None]

    monkeypatch.setattr(A, "attention_fn", attention_fn)
    recs = A.measure_attention(
        (1, 2, 320, 8), "cpu", ["reference", "cpp"], causal=True, backward=backward, rounds=1, warmup=0
    )
    assert [r["status"] for r in recs] == ["ok", "wrong"] and recs[1]["timing"] is None


def test_untimed_records_are_listed_with_their_reason_only_when_they_have_one():
    base = {"workload": "w", "mode": "fwd", "dtype": "float32", "timing": None}
    lines = records.markdown_table(
        [
            {**base, "provider": "claim", "status": "ok"},
            {**base, "provider": "cpp", "status": "wrong", "reason": "z off"},
        ]
    )
    assert "- w fwd claim: ok" in lines and "- w fwd cpp: wrong (z off)" in lines


def test_attention_curves_refuse_a_wrong_provider_instead_of_timing_it(monkeypatch):
    """The report's time-vs-length and time-vs-sparsity curves timed every provider without any check: a fused
    kernel off by 50% in O was plotted as its speed. Now each is gated first, as measure_attention does."""
    from dsc_kernels import functional as DF
    from dsc_kernels.experiments import attention_speed as A

    real_fn, real_attention = A.attention_fn, DF.sparse_attention
    monkeypatch.setattr(A, "_fused_backend", lambda device: "reference")

    def attention_fn(provider, q, k, v, causal):
        fn = real_fn(provider, q, k, v, causal)
        return fn if provider == "sdpa" else (lambda: fn() * 1.5)

    monkeypatch.setattr(A, "attention_fn", attention_fn)
    monkeypatch.setattr(DF, "sparse_attention", lambda *a, **kw: real_attention(*a, **kw) * 1.5)
    length = A.time_vs_length("cpu", quick=True)
    assert all(math.isnan(t) for t in length["fused sparsemax"] + length["dense sparsemax"])
    assert all(math.isfinite(t) for t in length["softmax (SDPA)"])
    assert set(length["refused"]) == {"fused sparsemax", "dense sparsemax"}
    sparsity = A.time_vs_sparsity("cpu", quick=True)
    assert all(math.isnan(t) for t in sparsity["fused shrink"]) and math.isfinite(sparsity["softmax (SDPA)"])
    assert set(sparsity["refused"]) == {f"shrink {s}" for s in sparsity["sparsity"]}


def test_attention_curves_time_providers_that_pass_the_gate(monkeypatch):
    from dsc_kernels.experiments import attention_speed as A

    monkeypatch.setattr(A, "_fused_backend", lambda device: "reference")
    length, sparsity = A.time_vs_length("cpu", quick=True), A.time_vs_sparsity("cpu", quick=True)
    assert not length["refused"] and not sparsity["refused"]
    assert all(math.isfinite(t) for p in length if p not in A.CURVE_KEYS for t in length[p])
    assert all(math.isfinite(t) for t in sparsity["fused shrink"])


def test_median_is_the_middle_sample_or_the_mean_of_the_two_middle_ones():
    # by hand: sorted [1, 2, 3, 4] -> (2 + 3) / 2; sorted [1, 5, 100] -> 5 (the mean would be 35.3)
    assert M.Timing(samples_ms=[4.0, 1.0, 3.0, 2.0]).median_ms == 2.5
    assert M.Timing(samples_ms=[100.0, 1.0, 5.0]).median_ms == 5.0
    assert math.isnan(M.Timing().median_ms)


def test_the_budget_stops_the_rounds_only_after_min_rounds():
    fns = {name: (lambda: None) for name in "ab"}
    t = time_interleaved(fns, "cpu", rounds=6, warmup=0, min_rounds=2, budget_s=0.0)  # the budget is spent at once
    assert [x.n for x in t.values()] == [2, 2]
    t = time_interleaved(fns, "cpu", rounds=6, warmup=0, min_rounds=2, budget_s=None)
    assert [x.n for x in t.values()] == [6, 6]


def test_a_provider_with_one_failing_verdict_of_several_is_never_timed():
    """A step is checked by its gradient into x and into the weight: one of them wrong is a wrong provider."""
    from dsc_kernels.experiments.tolerance import Verdict

    calls = []
    verdicts = [Verdict(True, 0.0, 0.0, 1.0, "grad x ok"), Verdict(False, 2.0, 0.0, 1.0, "grad weight off")]
    candidates = {
        "reference": lambda: M.Candidate(check=lambda: verdicts[:1], run=lambda: calls.append("reference")),
        "cpp": lambda: M.Candidate(check=lambda: verdicts, run=lambda: calls.append("cpp")),
    }
    base = dict(suite="s", workload="w", mode="forward_backward", dtype="float32", params={})
    ref, cpp = M.measure_providers(base, "cpu", candidates, rounds=1, warmup=0)
    assert ref["status"] == "ok" and cpp["status"] == "wrong" and cpp["timing"] is None
    assert "cpp" not in calls and [c["ok"] for c in cpp["check"]] == [True, False]


class _WrongWeightGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight):
        return weight.clone()

    @staticmethod
    def backward(ctx, grad):
        return 1.1 * grad


def test_the_gate_checks_the_weight_gradient_too(monkeypatch):
    """A step whose forward and gradient into x are right but whose gradient into the weight is 10% off."""
    from dsc_kernels.reference import conv_ista_ref

    real = S.provider_fn

    def provider_fn(provider, inputs):
        if provider != "cpp":
            return real(provider, inputs)
        i, x, w = inputs, inputs["x"], inputs["weight"]
        lam = torch.full((i["n_iter"], w.shape[0]), i["lam"], dtype=x.dtype)
        step = torch.full((i["n_iter"],), i["step"], dtype=x.dtype)

        def run():
            return conv_ista_ref(x, _WrongWeightGradient.apply(w), lam, step, stride=i["stride"], padding=i["padding"])

        run.leaves = (x, w)
        return run

    recs = _training_step_records(monkeypatch, provider_fn)
    assert recs["reference"]["status"] == "ok"
    assert recs["cpp"]["status"] == "wrong" and recs["cpp"]["timing"] is None
    assert [c["ok"] for c in recs["cpp"]["check"]] == [True, False]


def test_ratios_are_against_the_fastest_baseline_of_the_group():
    def rec(provider, ms, peak, status="ok", mode="forward_backward"):
        t = M.Timing(samples_ms=[ms]) if ms is not None else None
        base = dict(suite="s", workload="w", mode=mode, dtype="float32", params={})
        return records.result(**base, provider=provider, status=status, timing=t, memory=M.MemoryUse(peak, 0, "m"))

    recs = [
        rec("reference", 10.0, 400),
        rec("reference-channels_last", 5.0, 200),  # the eager baseline: the faster layout
        rec("cpp", 2.0, 100),
        rec("triton", 1.0, 50, status="wrong"),  # not timed: no ratio
    ]
    records.add_ratios(recs)
    ref, cl, cpp, wrong = (r["ratios"] for r in recs)
    # by hand: speedup = baseline ms / provider ms, memory = provider peak / baseline peak
    assert cpp["speedup_vs_eager"] == 5.0 / 2.0 and cpp["eager_baseline"] == "reference-channels_last"
    assert ref["speedup_vs_eager"] == 5.0 / 10.0 and cl["speedup_vs_eager"] == 1.0
    assert cpp["train_peak_ratio_vs_eager"] == 100 / 200 and ref["train_peak_ratio_vs_eager"] == 400 / 200
    assert "speedup_vs_eager" not in wrong


def test_the_gpu_meter_resets_the_peak_before_the_call(monkeypatch):
    """The CUDA allocator's peak is a running maximum: without a reset, a provider measured after a hungrier one
    reported the other's peak. Faked allocator statistics (no GPU needed): 1000 bytes peaked before, 100 by fn."""
    state = {"allocated": 50, "peak": 1000}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    monkeypatch.setattr(
        torch.cuda, "reset_peak_memory_stats", lambda device=None: state.update(peak=state["allocated"])
    )

    def fn():
        state["allocated"] += 100  # scratch
        state["peak"] = max(state["peak"], state["allocated"])
        state["allocated"] -= 60  # 40 kept
        return "out"

    use = measure_memory(fn, "cuda")
    assert (use.peak_bytes, use.retained_bytes) == (100, 40)


def test_the_records_name_the_commit_given_where_the_tree_has_no_git(monkeypatch):
    """A GPU lease gets the tree copied without .git and DSC_GIT_COMMIT set: the run document must name it."""
    monkeypatch.setenv("DSC_GIT_COMMIT", "0123456789abcdef")
    assert records.git_commit() == "0123456789abcdef" and records.environment("cpu")["commit"] == "0123456789abcdef"
