"""Sparse-attention speed and memory (``pytest bench --benchmark-only``).

CPU: the ``attn`` workload (docs/design.md §6: q, k, v (2, 4, 512, 64) float32), forward and forward+backward, for
    reference  dsc_kernels' dense oracle (sort-based sparsemax through autograd)
    compile    torch.compile (inductor) of the reference
    entmax     an entmax-style dense sparsemax (sort-based threshold, hand-written backward; the ``entmax``
               package's algorithm, written here in torch so the suite does not depend on it)
    cpp        the fused C++ kernels (row statistics only, no N x M matrix)
    cpp-shrink90  the C++ kernels in shrink mode with 90% of the scores below the threshold
GPU (skipped without CUDA): N from 512 to 16384, d = 64, (B, H) = (4, 8): SDPA (dense softmax), the entmax-style
dense sparsemax and the Triton kernels (sparsemax, and shrink at several sparsity levels); results also go to
``bench/results/attention_<gpu>.json``.

``benchmark.extra_info`` holds the peak memory allocated by torch during one call (CPU: storages returned by torch ops,
tracked with a dispatch mode, so the cpp kernels' internal 64 x M score panels, 128 KiB per thread at M = 512, are
not counted; GPU: ``torch.cuda.max_memory_allocated``) and the time ratio to the entmax-style baseline.
"""
from __future__ import annotations

import json
import platform
import subprocess
import time
import weakref
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import dsc_kernels.functional as DF
from dsc_kernels.reference.attention import sparse_attention_ref

CPU_SHAPE = (2, 4, 512, 64)
GPU_BH = (4, 8)
GPU_NS = [512, 1024, 2048, 4096, 8192, 16384]


# ------------------------------------------------------------------------------------------------ the baseline
class _EntmaxSparsemax(torch.autograd.Function):
    """entmax's ``SparsemaxFunction`` along the last dim: sort for tau, then a support-masked backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        z, _ = torch.sort(x, dim=-1, descending=True)
        csum = z.cumsum(-1) - 1
        ks = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
        support = (ks * z > csum).sum(-1, keepdim=True)
        tau = csum.gather(-1, support - 1) / support.to(x.dtype)
        out = torch.clamp(x - tau, min=0)
        ctx.save_for_backward(support, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        support, out = ctx.saved_tensors
        g = grad.masked_fill(out == 0, 0)
        v_hat = g.sum(-1, keepdim=True) / support.to(g.dtype)
        return torch.where(out != 0, g - v_hat, torch.zeros_like(g))


def entmax_sparsemax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Dense sparsemax attention the way entmax users write it: (B,H,N,d) -> (B,H,N,d)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return torch.matmul(_EntmaxSparsemax.apply(s), v)


# ----------------------------------------------------------------------------------------------- measurement
class _PeakMemory(TorchDispatchMode):
    """Peak bytes of live storages created by torch ops while active (CPU has no allocator statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


def _cpu_peak_bytes(fn) -> int:
    with _PeakMemory() as mode:
        fn()
    return mode.peak


def _cpu_inputs(requires_grad: bool):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(CPU_SHAPE, generator=gen).requires_grad_(requires_grad) for _ in range(3)]


@cache
def _compiled_reference():
    return torch.compile(sparse_attention_ref)


def _cpu_call(provider: str, q, k, v, backward: bool, causal: bool):
    scale = q.shape[-1] ** -0.5
    if provider == "entmax":
        fn = lambda: entmax_sparsemax_attention(q, k, v, causal)  # noqa: E731
    elif provider == "reference":
        fn = lambda: sparse_attention_ref(q, k, v, mode="sparsemax", causal=causal)  # noqa: E731
    elif provider == "compile":
        fn = lambda: _compiled_reference()(q, k, v, mode="sparsemax", causal=causal)  # noqa: E731
    elif provider == "cpp-shrink90":
        # Scores are ~N(0, 1) for these inputs: this threshold leaves 10% of them active.
        th = torch.full((q.shape[1],), float(torch.special.ndtri(torch.tensor(0.9))))
        fn = lambda: DF.sparse_attention(q, k, v, mode="shrink", threshold=th, causal=causal, scale=scale,  # noqa: E731
                                         backend="cpp")
    else:
        fn = lambda: DF.sparse_attention(q, k, v, causal=causal, scale=scale, backend=provider)  # noqa: E731

    def run():
        out = fn()
        if backward:
            out.backward(torch.ones_like(out))
        return out

    return run


@cache
def _cpu_baseline_seconds(backward: bool, causal: bool) -> float:
    q, k, v = _cpu_inputs(backward)
    run = _cpu_call("entmax", q, k, v, backward, causal)
    run()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["entmax", "reference", "compile", "cpp", "cpp-shrink90"])
def test_attn_cpu(benchmark, provider, backward, causal):
    if provider.startswith("cpp") and (reason := DF.backend_unavailable_reason("cpp", "cpu")) is not None:
        pytest.skip(reason)
    q, k, v = _cpu_inputs(backward)
    run = _cpu_call(provider, q, k, v, backward, causal)
    run()
    benchmark.group = f"attn-cpu-{'fwd+bwd' if backward else 'fwd'}-{'causal' if causal else 'full'}"
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        workload="attn", shape=list(CPU_SHAPE), mode="shrink" if "shrink" in provider else "sparsemax",
        threads=torch.get_num_threads(),
        # Inductor's kernels bypass the dispatch mode, so compile has no comparable CPU figure.
        peak_bytes=None if provider == "compile" else _cpu_peak_bytes(run),
        ratio_to_entmax=benchmark.stats.stats.median / _cpu_baseline_seconds(backward, causal))


# --------------------------------------------------------------------------------------------------------- GPU
_GPU_RECORDS: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def _write_gpu_results():
    yield
    if not _GPU_RECORDS:
        return
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout
    except OSError:
        commit = ""
    import triton
    name = torch.cuda.get_device_name().replace(" ", "_")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), commit=commit.strip(), time=time.strftime("%Y-%m-%dT%H:%M:%SZ"))
    (root / "results").mkdir(exist_ok=True)
    (root / "results" / f"attention_{name}.json").write_text(json.dumps(dict(meta=meta, runs=_GPU_RECORDS),
                                                                        indent=1))


def _gpu_case(benchmark, provider: str, n: int, backward: bool, sparsity: float | None = None):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from triton.testing import do_bench

    b, h = GPU_BH
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, 64, device="cuda", dtype=torch.float16, generator=gen)
               .requires_grad_(backward) for _ in range(3))
    if provider == "sdpa":
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    elif provider == "entmax":
        fn = lambda: entmax_sparsemax_attention(q, k, v, True)  # noqa: E731
    else:
        mode = "shrink" if sparsity is not None else "sparsemax"
        # Scores are ~N(0, 1) for these inputs, so this threshold leaves a (1 - sparsity) fraction active.
        th = None if sparsity is None else float(torch.special.ndtri(torch.tensor(sparsity)))
        fn = lambda: DF.sparse_attention(q, k, v, mode=mode, threshold=th, causal=True, scale=0.125,  # noqa: E731
                                         backend="triton")

    def run():
        out = fn()
        if backward:
            out.backward(torch.ones_like(out))

    try:
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        ms = do_bench(run, warmup=5, rep=30)
    except torch.OutOfMemoryError:
        pytest.skip(f"{provider} runs out of GPU memory at N={n}")
    benchmark.group = f"attn-gpu-{'fwd+bwd' if backward else 'fwd'}"
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    record = dict(provider=provider, n=n, backward=backward, sparsity=sparsity, ms=ms, peak_bytes=peak)
    benchmark.extra_info.update(record)
    _GPU_RECORDS.append(record)


@pytest.mark.gpu
@pytest.mark.parametrize("n", GPU_NS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["sdpa", "triton", "entmax"])
def test_attn_gpu(benchmark, provider, backward, n):
    _gpu_case(benchmark, provider, n, backward)


@pytest.mark.gpu
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_attn_gpu_shrink_sparsity(benchmark, sparsity, backward):
    _gpu_case(benchmark, "triton-shrink", 4096, backward, sparsity)
