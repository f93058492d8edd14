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

    monkeypatch.setattr(S, "provider_fn", provider_fn)
    monkeypatch.setattr(S, "available_providers", lambda device: {p: None for p in S.PROVIDERS})
    recs = {
        r["provider"]: r
        for r in S.measure_conv(
            S.WORKLOADS["deep-layer"], "cpu", "forward_backward", ["reference", "cpp"], scale=0.125, rounds=1, warmup=0
        )
    }
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
