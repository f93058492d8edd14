"""Sparse-attention speed and memory (``pytest bench --benchmark-only``).

CPU: the ``attn`` workload (docs/design.md §6: q, k, v (2, 4, 512, 64) float32), forward and forward+backward, for
    entmax     an entmax-style dense sparsemax (sort-based threshold, hand-written backward; the ``entmax``
               package's algorithm, written in torch so the suite does not depend on it)
    reference  dsc_kernels' dense oracle (sort-based sparsemax through autograd)
    compile    torch.compile (inductor) of the reference
    cpp        the fused C++ kernels (row statistics only, no N x M matrix)
    cpp-shrink90  the C++ kernels in shrink mode with 90% of the scores below the threshold
GPU (skipped without CUDA): N from 512 to 16384, d = 64, (B, H) = (4, 8), float16, causal: SDPA (dense softmax, the
backend of its choice), the entmax-style dense sparsemax and the Triton kernels (sparsemax, and shrink at several
sparsity levels).

Providers are those of experiments/attention_speed.py; each (shape, causal, direction) group is measured once for all
its providers by attention_speed.measure_attention (checked against the fp64 reference, then timed interleaved, then
memory: the peak allocated during one call), and each test reports its provider with its ratio to the entmax-style
baseline (``speedup_vs_dense``). Results go into the session's run document (bench/conftest.py).
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import check_and_publish, measured_group

import dsc_kernels.functional as DF
from dsc_kernels.experiments.attention_speed import measure_attention

CPU_SHAPE = (2, 4, 512, 64)
CPU_PROVIDERS = ["entmax", "reference", "compile", "cpp", "cpp-shrink90"]
GPU_BH = (4, 8)
GPU_NS = [512, 1024, 2048, 4096, 8192, 16384]
GPU_PROVIDERS = ["sdpa", "triton", "entmax"]
GPU_SHRINK = ["triton-shrink50", "triton-shrink90", "triton-shrink99"]
GPU_SHRINK_N = 4096


def _gpu_providers(n: int) -> list[str]:
    """The providers measured together at length n. The shrink tests share N = 4096's group: measured as a group of
    their own, their records (suite, workload, mode, dtype) were those of test_attn_gpu's, and the session's run
    document (records.add_ratios over every record) ratioed them to the other group's sdpa and entmax, which were
    not timed interleaved with them."""
    return GPU_PROVIDERS + (GPU_SHRINK if n == GPU_SHRINK_N else [])


def _cpu_group(provider_list, backward, causal, smoke):
    available = [
        p for p in provider_list if not p.startswith("cpp") or DF.backend_unavailable_reason("cpp", "cpu") is None
    ]
    return measured_group(
        ("attn-cpu", backward, causal),
        lambda: measure_attention(
            CPU_SHAPE,
            "cpu",
            available,
            causal=causal,
            backward=backward,
            rounds=1 if smoke else 5,
            warmup=1,
            suite="bench-attention",
        ),
    )


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", CPU_PROVIDERS)
def test_attn_cpu(benchmark, provider, backward, causal, smoke):
    if provider.startswith("cpp") and (reason := DF.backend_unavailable_reason("cpp", "cpu")) is not None:
        pytest.skip(reason)
    benchmark.group = f"attn-cpu-{'fwd+bwd' if backward else 'fwd'}-{'causal' if causal else 'full'}"
    check_and_publish(benchmark, _cpu_group(CPU_PROVIDERS, backward, causal, smoke)[provider])


def _gpu_case(benchmark, provider: str, n: int, backward: bool, smoke: bool):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    benchmark.group = f"attn-gpu-{'fwd+bwd' if backward else 'fwd'}"
    providers = _gpu_providers(n)
    group = measured_group(
        ("attn-gpu", n, backward, tuple(providers)),
        lambda: measure_attention(
            (*GPU_BH, n, 64),
            "cuda",
            providers,
            causal=True,
            backward=backward,
            dtype=torch.float16,
            rounds=1 if smoke else 7,
            warmup=1 if smoke else 3,
            suite="bench-attention",
        ),
    )
    rec = group[provider]
    if rec["status"] == "failed" and "OutOfMemoryError" in (rec["reason"] or ""):
        pytest.skip(f"{provider} runs out of GPU memory at N={n}")
    check_and_publish(benchmark, rec)


@pytest.mark.gpu
@pytest.mark.parametrize("n", GPU_NS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
def test_attn_gpu(benchmark, provider, backward, n, smoke):
    _gpu_case(benchmark, provider, n, backward, smoke)


@pytest.mark.gpu
@pytest.mark.parametrize("provider", GPU_SHRINK)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_attn_gpu_shrink_sparsity(benchmark, provider, backward, smoke):
    _gpu_case(benchmark, provider, GPU_SHRINK_N, backward, smoke)


def test_gpu_shrink_records_keep_the_ratios_of_their_interleaved_group(monkeypatch):
    """Without a GPU (measure_attention faked): the session's run document recomputes every ratio over all records of
    a (suite, workload, mode, dtype); the shrink providers' ratios there must be those of the group they were timed
    in."""
    import conftest

    from dsc_kernels.experiments import records
    from dsc_kernels.experiments.measure import Timing

    calls = []

    def fake(shape, device, providers, *, causal, backward, dtype, suite, **_):
        calls.append(providers)
        base = dict(suite=suite, workload=f"attn-N{shape[2]}-causal", mode="forward", dtype="float16")
        ms = {"sdpa": float(len(calls))}  # each group's sdpa a different time: a mixed-up ratio shows
        return [records.result(**base, provider=p, timing=Timing([ms.get(p, 10.0)])) for p in providers]

    class Bench:
        disabled, extra_info, group = True, {}, ""

        def pedantic(self, *args, **kwargs):
            pass

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sys.modules[__name__], "measure_attention", fake)
    monkeypatch.setattr(conftest, "RESULTS", [])
    monkeypatch.setattr(conftest, "_GROUPS", {})
    test_attn_gpu(Bench(), "sdpa", False, 4096, True)
    test_attn_gpu_shrink_sparsity(Bench(), "triton-shrink90", False, True)
    timed_with = {p: next(i for i, c in enumerate(calls) if p in c) for p in ("sdpa", "triton-shrink90")}
    in_group = {r["provider"]: r["ratios"]["speedup_vs_sdpa"] for r in conftest.RESULTS}
    document = records.add_ratios([dict(r, ratios={}) for r in conftest.RESULTS])
    assert timed_with["sdpa"] == timed_with["triton-shrink90"]
    assert {r["provider"]: r["ratios"]["speedup_vs_sdpa"] for r in document} == in_group
