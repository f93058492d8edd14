"""Sparse-attention crossover curves for the report: forward time versus sequence length, and shrink-mode time
versus sparsity, for the fused backend of this device against dense baselines.

Providers: "fused sparsemax" / "fused shrink" (functional.sparse_attention with the device's fused backend: cpp on
CPU, triton on CUDA), "dense sparsemax" (the reference: the full N×M score matrix, sorted per row, like entmax's
sparsemax) and "softmax (SDPA)" (torch's scaled_dot_product_attention, the dense-softmax anchor).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import functional as DF
from .speed import time_ms

HEADS, HEAD_DIM = 4, 64


def _fused_backend(device: torch.device) -> str | None:
    fused = "cpp" if device.type == "cpu" else "triton"
    return fused if DF.backend_unavailable_reason(fused, device) is None else None


def _qkv(n: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, HEADS, n, HEAD_DIM, generator=g).to(device) for _ in range(3))


def time_vs_length(device: str | torch.device = "cpu", quick: bool = False) -> dict:
    """Forward ms per provider at each length N (q, k, v: (1, 4, N, 64), float32, non-causal).

    Returns {"n": [...], "<provider>": [ms, ...], "backend": fused backend or None}."""
    device = torch.device(device)
    if device.type == "cuda":
        lengths = [512, 1024, 2048] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    else:
        lengths = [128, 256, 512] if quick else [256, 512, 1024, 2048]
    backend = _fused_backend(device)
    curves: dict = {"n": lengths, "backend": backend, "softmax (SDPA)": [], "dense sparsemax": []}
    if backend:
        curves["fused sparsemax"] = []
    reps = 1 if quick else 3
    for n in lengths:
        q, k, v = _qkv(n, device)
        with torch.no_grad():
            curves["softmax (SDPA)"].append(time_ms(lambda: F.scaled_dot_product_attention(q, k, v), device, reps=reps))
            # The dense baseline's N×N scores stop fitting long before the fused kernels do.
            dense_fits = n * n * HEADS * 4 * 3 < (8 << 30 if device.type == "cuda" else 2 << 30)
            curves["dense sparsemax"].append(time_ms(
                lambda: DF.sparse_attention(q, k, v, backend="reference"), device, reps=reps)
                if dense_fits else float("nan"))
            if backend:
                curves["fused sparsemax"].append(time_ms(
                    lambda: DF.sparse_attention(q, k, v, backend=backend), device, reps=reps))
    return curves


def time_vs_sparsity(device: str | torch.device = "cpu", quick: bool = False) -> dict:
    """Shrink-mode forward ms as the fraction of scores below the threshold grows, against SDPA at one length.

    Returns {"sparsity": [...], "fused shrink": [ms, ...], "softmax (SDPA)": ms, "n": N, "backend": ...}."""
    device = torch.device(device)
    n = (2048 if quick else 4096) if device.type == "cuda" else (256 if quick else 1024)
    sparsities = [0.5, 0.9, 0.99] if quick else [0.0, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999]
    backend = _fused_backend(device)
    q, k, v = _qkv(n, device)
    scale = HEAD_DIM ** -0.5
    reps = 1 if quick else 3
    with torch.no_grad():
        scores = (scale * q[0, 0] @ k[0, 0].T).flatten().float().cpu()
        # Thresholds at score quantiles: that fraction of the (head-0, statistically identical) scores is inactive.
        thresholds = [float(scores.kthvalue(max(1, int(s * scores.numel()))).values) for s in sparsities]
        out = {"sparsity": sparsities, "n": n, "backend": backend,
               "softmax (SDPA)": time_ms(lambda: F.scaled_dot_product_attention(q, k, v), device, reps=reps)}
        if backend:
            out["fused shrink"] = [time_ms(lambda: DF.sparse_attention(q, k, v, mode="shrink", threshold=t,
                                                                       backend=backend), device, reps=reps)
                                   for t in thresholds]
    return out
