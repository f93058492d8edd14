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
from .common import ClaimResult
from .tolerance import FACTOR, judge


def backend_agreement(
    *, quick: bool = False, backend: str = "auto", device: str = "cpu", dtype: torch.dtype = torch.float64
) -> ClaimResult:
    """Each available fused backend's float32 codes against the float64 reference (same inputs, 10 iterations),
    judged by the tolerance rule: error at most twice eager PyTorch's own float32 error (on a GPU that includes TF32
    convolutions, which the Triton kernels' fp32 dots match) plus a few fp32 ulps.

    `backend` and `dtype` are unused: every backend available on `device` is compared in float32, the dtype they
    all support (Triton on CPU tensors is the interpreter, a test tool, and is left to the test suite).
    """
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    size = (2, 3, 20, 22) if quick else (4, 3, 40, 44)
    x64 = torch.randn(size, generator=g, dtype=torch.float64).to(device)
    w64 = random_filters(8, 3, (5, 5), seed=1, dtype=torch.float64).to(device)
    x, w = x64.float(), w64.float()
    x64, w64 = x.double(), w.double()  # the reference sees exactly the rounded inputs
    try:
        backends = [
            b
            for b in DF.available_backends(device)
            if b != "reference" and not (b == "triton" and torch.device(device).type == "cpu")
        ]
    except Exception:  # noqa: BLE001 - no fused backend importable is a result, not a crash
        backends = []
    verdicts = {}
    for name in backends:
        checks = []
        for fista, nonneg in ((False, False), (True, False), (False, True)):
            kw = dict(n_iter=10, stride=2, padding=2, fista=fista, nonneg=nonneg)
            ref = DF.conv_ista(x64, w64, 0.1, backend="reference", **kw)
            eager = DF.conv_ista(x, w, 0.1, backend="reference", **kw)
            got = DF.conv_ista(x, w, 0.1, backend=name, **kw)
            checks.append(judge(got, ref, eager, name=f"{name} fista={fista} nonneg={nonneg}"))
        failing = [v for v in checks if not v.ok]
        verdicts[name] = failing[0] if failing else max(checks, key=lambda v: v.error)
    holds = bool(verdicts) and all(v.ok for v in verdicts.values())  # nothing compared is not agreement
    return ClaimResult(
        id="S6",
        claim="fused conv-ISTA layers (transposed conv + conv + shrink) reproduce the ISTA reference",
        theory=f"error vs float64 ≤ {FACTOR:g}× eager float32's + 16 fp32 ulps",
        measured=(
            "; ".join(f"{n}: {v.error:.1e} (eager {v.eager_error:.1e})" for n, v in verdicts.items())
            or "no fused backend available here (nothing to compare)"
        ),
        holds=bool(holds),
        source="[R] CNN = ISTA identities (docs/theory.md §3.3), [C]",
        curves={"diffs": {n: v.error for n, v in verdicts.items()}},
        seconds=time.perf_counter() - t0,
    )
