"""S6: the fused "CNN" layers compute exactly the ISTA iteration: every available backend against the reference.

A conv-transpose + conv + shrink block is one ISTA step (docs/theory.md §3.3) [R, identities C]; the fused kernels
must reproduce the reference to rounding on a multi-channel, strided 2-D problem: ISTA, FISTA, and non-negative
codes (the ReLU-with-bias CNN).
"""
from __future__ import annotations

import time

import torch

from .. import functional as DF
from ..data import random_filters
from .common import ClaimResult, resolution


def backend_agreement(*, quick: bool = False, backend: str = "auto", device: str = "cpu",
                      dtype: torch.dtype = torch.float64) -> ClaimResult:
    """Max relative difference of each available backend's codes from the reference (same inputs, 10 iterations).

    `backend` and `dtype` are unused: every backend available on `device` is compared in float32, the dtype they
    all support (Triton on CPU tensors is the interpreter, a test tool, and is left to the test suite).
    """
    t0 = time.perf_counter()
    dtype = torch.float32
    g = torch.Generator().manual_seed(0)
    size = (2, 3, 20, 22) if quick else (4, 3, 40, 44)
    x = torch.randn(size, generator=g, dtype=dtype).to(device)
    w = random_filters(8, 3, (5, 5), seed=1, dtype=dtype).to(device)
    try:
        backends = [b for b in DF.available_backends(device)
                    if b != "reference" and not (b == "triton" and torch.device(device).type == "cpu")]
    except Exception:  # noqa: BLE001 - no fused backend importable is a result, not a crash
        backends = []
    diffs = {}
    for name in backends:
        worst = 0.0
        for fista, nonneg in ((False, False), (True, False), (False, True)):
            kw = dict(n_iter=10, stride=2, padding=2, fista=fista, nonneg=nonneg)
            ref = DF.conv_ista(x, w, 0.1, backend="reference", **kw)
            got = DF.conv_ista(x, w, 0.1, backend=name, **kw)
            worst = max(worst, float((got - ref).abs().max()) / float(ref.abs().max()))
        diffs[name] = worst
    # GPU kernels accumulate in fp32 (docs/design.md §5), so fp32 rounding is the yardstick for every backend
    tol = resolution(torch.float32)
    holds = all(d <= tol for d in diffs.values())
    return ClaimResult(
        id="S6",
        claim="fused conv-ISTA layers (transposed conv + conv + shrink) reproduce the ISTA reference",
        theory=f"max relative difference ≤ {tol:.1e} (10³ fp32 eps)",
        measured=("; ".join(f"{n}: {d:.1e}" for n, d in diffs.items())
                  or "no fused backend available here (nothing to compare)"),
        holds=bool(holds),
        source="[R] CNN = ISTA identities (docs/theory.md §3.3), [C]",
        curves={"diffs": diffs},
        seconds=time.perf_counter() - t0,
    )
