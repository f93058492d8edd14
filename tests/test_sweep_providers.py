"""The CPU sweep's providers (dsc_kernels/experiments/sweep.py): a forced strategy holds for the forward and its
backward alike, and every other provider runs under the rule, whatever the caller's environment."""

from __future__ import annotations

import os

import pytest
import torch

from dsc_kernels.experiments import sweep as SW

ENV = SW.STRATEGY_ENV


def test_strategy_env_forces_and_restores(monkeypatch):
    monkeypatch.setenv(ENV, "direct")
    with SW.strategy_env("cpp-gemm"):
        assert os.environ[ENV] == "gemm"
    with SW.strategy_env("cpp"):
        assert ENV not in os.environ  # the rule, not the caller's forced strategy
    with SW.strategy_env("reference"):
        assert ENV not in os.environ
    assert os.environ[ENV] == "direct"
    monkeypatch.delenv(ENV)
    with SW.strategy_env("cpp-direct"):
        assert os.environ[ENV] == "direct"
    assert ENV not in os.environ


def test_forced_strategy_covers_the_backward(monkeypatch):
    """in_strategy wraps a whole training step: the environment the backward sees is the provider's."""
    monkeypatch.delenv(ENV, raising=False)
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("forward", os.environ.get(ENV)))
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append(("backward", os.environ.get(ENV)))
            return g

    x = torch.ones(3, requires_grad=True)
    SW.in_strategy("cpp-gemm", lambda: Probe.apply(x).sum().backward())()
    assert seen == [("forward", "gemm"), ("backward", "gemm")]


@pytest.mark.parametrize(
    "option, value",
    [("--threads", "0"), ("--rounds", "0"), ("--threads", str(2**31))],  # 2**31: a traceback in set_num_threads
)
def test_main_rejects_a_count_out_of_range_before_any_work(option, value, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(SW, "run_sweep", lambda *args, **kwargs: pytest.fail("the sweep ran"))
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit) as excinfo:
        SW.main(["--out", str(tmp_path / "out"), "--quick", option, value])
    err = capsys.readouterr().err
    assert excinfo.value.code == 2 and f"argument {option}:" in err and "Traceback" not in err
    assert torch.get_num_threads() == threads and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["small-32to32", "cscnet", "1d-c8-to-64-L256-k5-s2-fista"])
def test_memory_floor_is_what_a_training_step_allocates(name):
    """The floor counts z_n and the leaves' gradients: the bytes autograd hands back from a real training step on
    the shape (x's gradient, the dictionaries', the encoder's when untied) plus the output."""
    shape = SW.BY_NAME[name]
    p = SW.make_problem(shape, requires_grad=True)
    z = SW.provider_fn("reference", shape, p)()
    z.sum().backward()
    held = z.numel() + sum(t.grad.numel() for t in (p["x"], p["weight"], p["encoder_weight"]) if t is not None)
    assert shape.floor_bytes() == 4 * held


def _cpp_is_the_reference_wrapped(monkeypatch, wrap) -> None:
    """The sweep's "cpp" provider made the reference's z passed through `wrap` (a wrong provider to refuse)."""
    real = SW.provider_fn

    def provider_fn(provider, shape, p, *, recompute=False):
        fn = real("reference" if provider == "cpp" else provider, shape, p, recompute=recompute)
        if provider != "cpp":
            return fn

        def wrong():
            return wrap(fn())

        wrong.leaves = fn.leaves
        return wrong

    monkeypatch.setattr(SW, "provider_fn", provider_fn)


TINY = SW.SweepShape("tiny", (2, 2, 8, 8), (4, 2, 3, 3), padding=1, n_iter=3)


def test_the_check_refuses_nan_in_an_active_code_entry(monkeypatch):
    """z's error is NaN when a provider puts NaN where the reference is active (no support flip, and the gradients
    of z + c are untouched); "NaN > tolerance" is False, so the check passed it and the sweep timed it."""

    def with_nan(z):
        nan = torch.zeros_like(z)
        nan.view(-1)[z.detach().flatten().nonzero()[0]] = float("nan")
        return z + nan

    _cpp_is_the_reference_wrapped(monkeypatch, with_nan)
    with pytest.raises(AssertionError, match="cpp differs from the reference"):
        SW.check_against_reference(TINY, ["cpp"])


class _GradientsOffBy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        return z.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * (1 + 5e-9)


def test_the_float64_check_holds_the_gradients_to_1e_9(monkeypatch):
    """The docstring (and docs/benchmarks.md) hold z and every gradient to 1e-9 in float64; the code let the
    gradients drift to 1e-8. The real strategies sit near 1e-14 (every committed sweep)."""
    _cpp_is_the_reference_wrapped(monkeypatch, _GradientsOffBy.apply)
    with pytest.raises(AssertionError, match="in float64"):
        SW.check_against_reference(TINY, ["cpp"])


def test_compile_is_still_compiled_after_many_shapes(monkeypatch):
    """The compile provider shares one Dynamo cache across the sweep's shapes: past the recompile limit (8 graphs,
    about 3 shapes) Dynamo silently ran the reference eagerly and the sweep published eager's time as compile's.
    (Dynamo's eager backend: the tracing, without Inductor's minutes.)"""
    from torch._dynamo.utils import counters

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="eager", dynamic=kw.get("dynamic")))
    monkeypatch.setattr(SW, "_COMPILED", {})
    torch._dynamo.reset()
    for i in range(4):
        shape = SW.SweepShape(f"tiny{i}", (1, 1, 6 + i, 6 + i), (2, 1, 3, 3), padding=1, n_iter=2)
        before = counters["stats"]["unique_graphs"]
        SW.measure_shape(shape, ("reference", "compile"), rounds=1, memory=False)
    assert counters["stats"]["unique_graphs"] > before  # the last shape was compiled, not run eagerly
    torch._dynamo.reset()


def test_bench_sweep_files_name_the_thread_count_the_rows_were_measured_with(tmp_path, monkeypatch):
    """bench/test_sweep.py measures with DSC_BENCH_THREADS threads, but read the machine (and so sweep.md's
    "N threads" and sweep.json's machine.threads) after restoring the session's own count."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    bench = Path(__file__).parents[1] / "bench"
    modules = {}
    for name in ("conftest", "bench_test_sweep"):
        file = bench / ("conftest.py" if name == "conftest" else "test_sweep.py")
        spec = importlib.util.spec_from_file_location(name, file)
        modules[name] = importlib.util.module_from_spec(spec)
        if name == "conftest":  # bench/test_sweep.py imports bench's conftest by that name
            monkeypatch.setitem(sys.modules, "conftest", modules[name])
        spec.loader.exec_module(modules[name])
    rows_fixture = modules["bench_test_sweep"].rows
    rows = getattr(rows_fixture, "__pytest_wrapped__", None)
    rows = rows.obj if rows is not None else rows_fixture.__wrapped__
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    monkeypatch.setenv("DSC_BENCH_THREADS", str(wanted))
    monkeypatch.setenv("DSC_BENCH_SWEEP_OUT", str(tmp_path))
    monkeypatch.setattr(SW, "summarize", lambda rows: {})
    monkeypatch.setattr(SW, "markdown", lambda rows, summary, machine: f"{machine['threads']} threads\n")
    monkeypatch.setattr(SW, "figure", lambda rows, path: None)
    gen = rows()
    next(gen).append({"results": {}})
    with pytest.raises(StopIteration):
        next(gen)
    assert torch.get_num_threads() == before
    assert json.loads((tmp_path / "sweep.json").read_text())["machine"]["threads"] == wanted
    assert (tmp_path / "sweep.md").read_text() == f"{wanted} threads\n"


@pytest.mark.parametrize("option", ["--out", "--shapes"])
def test_main_rejects_an_empty_out_or_shapes_before_any_work(option, tmp_path, monkeypatch, capsys):
    """--out '' wrote sweep.json, .md and .png into the working directory; --shapes '' timed every shape."""
    monkeypatch.setattr(SW, "run_sweep", lambda *args, **kwargs: pytest.fail("the sweep ran"))
    monkeypatch.chdir(tmp_path)
    argv = {"--out": ["--out", ""], "--shapes": ["--out", "out", "--shapes", ""]}[option]
    with pytest.raises(SystemExit) as excinfo:
        SW.main(argv)
    err = capsys.readouterr().err
    assert excinfo.value.code == 2 and f"argument {option}:" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_main_rejects_a_shape_named_twice_before_any_work(tmp_path, monkeypatch, capsys):
    """--shapes small-32to32,small-32to32 timed the shape twice (measured: two identical rows in sweep.md) and the
    summary's geometric means counted it twice."""
    monkeypatch.setattr(SW, "run_sweep", lambda *args, **kwargs: pytest.fail("the sweep ran"))
    with pytest.raises(SystemExit) as excinfo:
        SW.main(["--out", str(tmp_path / "out"), "--shapes", "small-32to32,deep-layer,small-32to32"])
    err = capsys.readouterr().err
    assert excinfo.value.code == 2 and "argument --shapes: small-32to32 given more than once" in err
    assert not (tmp_path / "out").exists()


def _row(name, many_channel, **ratios):
    """A measured row as measure_shape returns it, with the given ratios per provider."""
    res = {"reference": {"forward": {"ms": 1.0}, "forward_backward": {"ms": 1.0}}}
    for k, (fwd, fwd_bwd, mem) in ratios.items():
        res[k] = {"fwd_ratio": fwd, "fwd_bwd_ratio": fwd_bwd, "mem_ratio": mem}
    return {"shape": {"name": name}, "many_channel": many_channel, "results": res}


def test_summary_worst_is_the_smallest_speedup_and_the_largest_memory_ratio():
    import math

    rows = [
        _row("a", True, cpp=(2.0, 0.5, 0.8)),
        _row("b", False, cpp=(0.5, 8.0, 3.0)),
        _row("c", True, cpp=(4.0, 1.0, 1.2)),
    ]
    s = SW.summarize(rows)["cpp"]
    # by hand: worst = min over shapes; geomean = (2 * 0.5 * 4) ** (1/3) = (0.5 * 8 * 1) ** (1/3) = 4 ** (1/3)
    assert s["fwd_ratio"]["worst"] == 0.5 and s["fwd_ratio"]["worst_shape"] == "b"
    assert s["fwd_bwd_ratio"]["worst"] == 0.5 and s["fwd_bwd_ratio"]["worst_shape"] == "a"
    assert math.isclose(s["fwd_ratio"]["geomean"], 4 ** (1 / 3)) and math.isclose(
        s["fwd_bwd_ratio"]["geomean"], 4 ** (1 / 3)
    )
    # memory over the many-channel shapes only ("b" is not one): the worst is the largest ratio
    assert s["mem_ratio_many_channel"] == {"worst": 1.2}


def test_measure_shape_ratios_are_eager_time_over_provider_time_and_memory_over_eager(monkeypatch):
    from dsc_kernels.experiments import speed as S

    ms = {"forward": {"reference": 10.0, "cpp": 5.0}, "forward_backward": {"reference": 20.0, "cpp": 40.0}}
    calls = iter(["forward", "forward_backward"])

    def timed(fns, rounds):
        mode = next(calls)
        return {k: {"ms": ms[mode][k], "min_ms": 0.0, "max_ms": 0.0} for k in fns}

    peaks = iter([1000, 500, 300])  # reference; cpp; cpp in recompute mode
    monkeypatch.setattr(SW, "_time_interleaved", timed)
    monkeypatch.setattr(SW, "check_against_reference", lambda shape, providers: {})
    monkeypatch.setattr(SW, "cpp_strategy", lambda shape: "direct")
    monkeypatch.setattr(S, "train_step_peak_bytes", lambda fn, p, device: next(peaks))
    shape = SW.SweepShape("tiny", (1, 2, 8, 8), (4, 2, 3, 3))
    row = SW.measure_shape(shape, ("reference", "cpp"), rounds=3)
    cpp = row["results"]["cpp"]
    assert (cpp["fwd_ratio"], cpp["fwd_bwd_ratio"]) == (10.0 / 5.0, 20.0 / 40.0)
    assert (cpp["mem_ratio"], cpp["mem_ratio_recompute"]) == (500 / 1000, 300 / 1000)
    # the documents say how many rounds each median is of (they said "medians of interleaved rounds")
    machine = dict(threads=2, cpu="cpu", torch="t", commit="c" * 10, load_average=0.0)
    assert row["rounds"] == 3 and "Medians of 3 interleaved rounds." in SW.markdown([row], SW.summarize([row]), machine)


def test_main_measures_with_the_thread_count_it_is_given(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    seen = []
    monkeypatch.setattr(SW, "run_sweep", lambda *a, **kw: seen.append(torch.get_num_threads()) or ([], {}))
    monkeypatch.setattr(SW, "machine", lambda: {})
    monkeypatch.setattr(SW, "markdown", lambda rows, summary, machine: "")
    monkeypatch.setattr(SW, "figure", lambda rows, path: None)
    try:
        assert SW.main(["--out", str(tmp_path), "--quick", "--threads", str(wanted)]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == [wanted]


def test_off_sweep_runs_the_shapes_the_rules_were_not_calibrated_on(tmp_path, monkeypatch):
    """--off-sweep measures OFF_SWEEP, none of which is a calibration shape (by name or by geometry)."""
    seen = []
    monkeypatch.setattr(SW, "run_sweep", lambda shapes, *a, **kw: seen.extend(shapes) or ([], {}))
    monkeypatch.setattr(SW, "machine", lambda: {})
    monkeypatch.setattr(SW, "markdown", lambda rows, summary, machine: "")
    monkeypatch.setattr(SW, "figure", lambda rows, path: None)
    threads = torch.get_num_threads()
    try:
        assert SW.main(["--out", str(tmp_path), "--off-sweep", "--threads", str(threads)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert seen == list(SW.OFF_SWEEP)
    calibration = {(s.x[1:], s.weight, s.stride, s.padding, s.n_iter) for s in SW.SHAPES}
    assert not {(s.x[1:], s.weight, s.stride, s.padding, s.n_iter) for s in SW.OFF_SWEEP} & calibration
    assert not {s.name for s in SW.OFF_SWEEP} & {s.name for s in SW.SHAPES}


class _WeightGradientOff(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight):
        return weight.clone()

    @staticmethod
    def backward(ctx, grad):
        return 1.5 * grad


def test_the_check_holds_the_weight_gradient_too(monkeypatch):
    """z and the gradient into x exact, the gradient into the dictionary 50% off."""
    from dsc_kernels import functional as DF

    real = SW.provider_fn

    def provider_fn(provider, shape, p, *, recompute=False):
        if provider != "cpp":
            return real(provider, shape, p, recompute=recompute)

        def wrong():
            w = _WeightGradientOff.apply(p["weight"])
            kw = dict(n_iter=shape.n_iter, step=p["step"], stride=shape.stride, padding=shape.padding)
            return DF.conv_ista(p["x"], w, p["lam"], backend="reference", **kw)

        return wrong

    monkeypatch.setattr(SW, "provider_fn", provider_fn)
    with pytest.raises(AssertionError, match="cpp differs from the reference"):
        SW.check_against_reference(TINY, ["cpp"])


def test_the_float32_check_refuses_z_off_by_one_percent(monkeypatch):
    """float32 z is held to rtol (2e-3) where the supports agree: an active entry 1% off is a wrong provider."""

    def off_in_float32(z):
        if z.dtype != torch.float32:
            return z
        return z + 1e-2 * max(1.0, z.detach().abs().max().item()) * (z.detach() != 0)

    _cpp_is_the_reference_wrapped(monkeypatch, off_in_float32)
    with pytest.raises(AssertionError, match="in float32"):
        SW.check_against_reference(TINY, ["cpp"])


def test_bench_network_speed_restores_the_thread_count(monkeypatch):
    """bench/test_speed_networks.py set DSC_BENCH_THREADS threads and kept them: the session's run document, written
    at its end, then named that count for the conv and attention records measured before with the session's own."""
    import importlib.util
    from pathlib import Path
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location(
        "bench_test_speed_networks", Path(__file__).parents[1] / "bench" / "test_speed_networks.py"
    )
    networks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(networks)
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    monkeypatch.setenv("DSC_BENCH_THREADS", str(wanted))
    seen = []
    monkeypatch.setattr(networks, "measure", lambda workload, rounds: seen.append(torch.get_num_threads()) or {})
    monkeypatch.setattr(networks, "table", lambda workload, result: "")
    monkeypatch.setattr(networks, "build", lambda workload, provider: networks.Built(None, lambda: None, None, None))
    benchmark = SimpleNamespace(extra_info={}, pedantic=lambda fn, **kw: fn())
    try:
        networks.test_published_network_speed(benchmark, "cpu", "cscnet")
    finally:
        after = torch.get_num_threads()
        torch.set_num_threads(before)
    assert seen == [wanted] and after == before
