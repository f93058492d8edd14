"""Sparse-attention speed: providers, their checked and interleaved measurement, and the report's crossover curves.

Providers (`attention_fn`):
    "<backend>"            functional.sparse_attention in sparsemax mode with that backend ("cpp", "triton",
                           "reference": the dense oracle, sort-based sparsemax through autograd)
    "<backend>-shrink<P>"  the same in shrink mode, with the threshold that leaves P% of the scores inactive
                           (scores are ~N(0, 1) for these inputs: threshold = Phi^-1(P/100))
    "compile"              torch.compile of the reference
    "dense-sparsemax"      dense sparsemax the way entmax users write it (sort for tau, a hand-written support-masked
                           backward: the `entmax` package's algorithm in torch); "entmax" is an alias
    "sdpa"                 torch's scaled_dot_product_attention (dense softmax), the backend of its choice
    "sdpa-<b>"             SDPA restricted to backend b: flash, efficient, cudnn, math
`measure_attention` checks each provider against the fp64 reference of its own function (sparsemax, shrink or
softmax) on the first and the last rows of the timed inputs (forward: those rows of O; forward+backward: every
gradient of <O[rows], G>, which only those rows produce), by the tolerance rule against the eager computation of the
same function in the same dtype, then times the providers that pass interleaved (experiments/measure.py) and measures
memory; it returns results records (experiments/records.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .. import functional as DF
from ..reference.attention import sparse_attention_ref, sparsemax_ref
from .measure import Candidate, measure_providers, random_cotangent, time_interleaved
from .tolerance import gate

__all__ = [
    "HEADS",
    "HEAD_DIM",
    "dense_sparsemax_attention",
    "attention_fn",
    "measure_attention",
    "time_vs_length",
    "time_vs_sparsity",
    "SDPA_BACKENDS",
]

HEADS, HEAD_DIM = 4, 64
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
CHECK_ROWS = 256


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


def dense_sparsemax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Dense sparsemax attention the way entmax users write it: (B,H,N,d) -> (B,H,N,d). Half-precision scores are
    projected in fp32, as the reference does: the support counts k = 1..M and their cumulative sums are not exact
    in fp16 past 2048, and a baseline must compute the same function as the kernels it is compared with."""
    s = torch.matmul(q, k.transpose(-1, -2))
    s = s.to(torch.promote_types(s.dtype, torch.float32)) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return torch.matmul(_EntmaxSparsemax.apply(s).to(v.dtype), v)


def _shrink_threshold(provider: str) -> float | None:
    """Phi^-1(P/100) for "<backend>-shrink<P>", None for sparsemax providers."""
    if "-shrink" not in provider:
        return None
    return float(torch.special.ndtri(torch.tensor(float(provider.split("-shrink")[1]) / 100.0)))


@functools.cache
def _compiled_reference():
    return torch.compile(sparse_attention_ref)


def _sdpa(backend: str | None):
    if backend is None:
        return F.scaled_dot_product_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[backend]

    def run(q, k, v, is_causal):
        with sdpa_kernel([which]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)

    return run


def attention_fn(
    provider: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> Callable[[], torch.Tensor]:
    """A zero-argument forward of `provider` (see the module docstring) on q, k, v (B, H, N, d)."""
    scale = q.shape[-1] ** -0.5
    if provider in ("dense-sparsemax", "entmax"):
        return lambda: dense_sparsemax_attention(q, k, v, causal)
    if provider == "compile":
        return lambda: _compiled_reference()(q, k, v, mode="sparsemax", causal=causal)
    if provider == "sdpa" or provider.startswith("sdpa-"):
        sdpa = _sdpa(None if provider == "sdpa" else provider.removeprefix("sdpa-"))
        return lambda: sdpa(q, k, v, is_causal=causal)
    backend = provider.split("-shrink")[0]
    th = _shrink_threshold(provider)
    if th is None:
        return lambda: DF.sparse_attention(q, k, v, mode="sparsemax", causal=causal, scale=scale, backend=backend)
    threshold = torch.full((q.shape[1],), th, device=q.device, dtype=q.dtype)
    return lambda: DF.sparse_attention(
        q, k, v, mode="shrink", threshold=threshold, causal=causal, scale=scale, backend=backend
    )


def _function_of(provider: str) -> str:
    if provider == "sdpa" or provider.startswith("sdpa-"):
        return "softmax"
    return "shrink" if "-shrink" in provider else "sparsemax"


def _reference(
    function: str, q, k, v, causal: bool, threshold: float | None, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """The exact function as PyTorch eager computes it in q's dtype: scores and P v are matmuls in that dtype (half
    results rounded, as FlashAttention's tests' reference is), P from the rounded scores in at least fp32, cast
    back. In fp64 this is the reference itself. `positions`: the query positions of q's rows (default 0, 1, ...),
    which the causal mask needs when q holds only some rows."""
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        if positions is None:
            positions = torch.arange(s.shape[-2], device=s.device)
        future = positions.to(s.device)[:, None] < torch.arange(s.shape[-1], device=s.device)[None, :]
        s = s.masked_fill(future, float("-inf"))
    s = s.to(torch.promote_types(s.dtype, torch.float32))
    if function == "softmax":
        p = torch.softmax(s, dim=-1)
    elif function == "shrink":
        p = torch.clamp(s - threshold, min=0)
    else:
        p = sparsemax_ref(s, dim=-1)
    return torch.matmul(p.to(v.dtype), v)


def _check_rows(n: int) -> torch.Tensor:
    """The query rows the gate checks: all of them up to CHECK_ROWS, else the first and the last CHECK_ROWS / 2. The
    first rows alone missed every later row block (a kernel wrong past row 256 was timed), and causal rows near the
    start see only the first keys."""
    if n <= CHECK_ROWS:
        return torch.arange(n)
    half = CHECK_ROWS // 2
    return torch.cat([torch.arange(half), torch.arange(n - half, n)])


def _rows_outputs(fn, q, k, v, rows: torch.Tensor | None, backward: bool, gen_seed: int = 7) -> list[torch.Tensor]:
    """O[:, :, rows] (forward) or the gradients of <O[:, :, rows], G> in q[:, :, rows], k, v; rows None: fn computes
    only those rows already."""

    def pick(t):
        return t if rows is None else t[:, :, rows.to(t.device)]

    if not backward:
        with torch.no_grad():
            return [pick(fn()).detach()]
    out = pick(fn())
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), random_cotangent(out, gen_seed))
    return [pick(gq).detach(), gk.detach(), gv.detach()]


def _gate(
    provider: str, fn, q, k, v, causal: bool, backward: bool, *, function: str | None = None, threshold=None
) -> list:
    """`function`/`threshold` override what the provider's name says (the sparsity curve's quantile thresholds)."""
    rows = _check_rows(q.shape[2])
    function = function or _function_of(provider)
    th = threshold if threshold is not None else _shrink_threshold(provider)
    got = _rows_outputs(fn, q, k, v, rows, backward)

    def exact(dtype):
        qs = q.detach()[:, :, rows.to(q.device)].to(dtype).requires_grad_(backward)
        ks, vs = (t.detach().to(dtype).requires_grad_(backward) for t in (k, v))
        return _rows_outputs(lambda: _reference(function, qs, ks, vs, causal, th, rows), qs, ks, vs, None, backward)

    names = ["grad q", "grad k", "grad v"] if backward else ["O"]
    return [
        gate(a, r, e, name=f"{n} ({function})", gradient=backward)
        for n, a, r, e in zip(names, got, exact(torch.float64), exact(q.dtype))
    ]


def measure_attention(
    shape: Sequence[int],
    device: str | torch.device,
    providers: Sequence[str],
    *,
    causal: bool,
    backward: bool,
    dtype: torch.dtype = torch.float32,
    rounds: int = 7,
    warmup: int = 2,
    budget_s: float | None = None,
    suite: str = "attention",
    check: bool = True,
) -> list[dict]:
    """Check, then time interleaved, then measure memory, for `providers` on q, k, v of `shape` (B, H, N, d);
    returns one results record per provider."""
    device = torch.device(device)
    mode = "forward_backward" if backward else "forward"
    b, h, n, d = shape
    base = dict(
        suite=suite,
        workload=f"attn-N{n}{'-causal' if causal else ''}",
        mode=mode,
        dtype=str(dtype).removeprefix("torch."),
        params=dict(shape=list(shape), causal=causal),
    )
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen).to(device, dtype).requires_grad_(backward) for _ in range(3))

    def candidate(p: str) -> Candidate:
        fn = attention_fn(p, q, k, v, causal)

        def checked():
            try:
                return _gate(p, fn, q, k, v, causal, backward)
            finally:
                for t in (q, k, v):
                    t.grad = None

        return Candidate(
            check=checked if check else None,
            run=_step(fn, (q, k, v)) if backward else _no_grad(fn),
            reset=lambda: [setattr(t, "grad", None) for t in (q, k, v)],
        )

    return measure_providers(
        base,
        device,
        {p: functools.partial(candidate, p) for p in providers},
        rounds=rounds,
        warmup=warmup,
        budget_s=budget_s,
    )


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()

    return run


def _step(fn, leaves):
    def run():
        for t in leaves:
            t.grad = None
        out = fn()
        out.backward(torch.ones_like(out))

    return run


# ------------------------------------------------------------------------------------ the report's curves
def _fused_backend(device: torch.device) -> str | None:
    fused = "cpp" if device.type == "cpu" else "triton"
    return fused if DF.backend_unavailable_reason(fused, device) is None else None


def _median_ms(fns: dict, device, reps: int, q, k, v, functions: dict, refused: dict) -> dict[str, float]:
    """Interleaved medians of the providers that pass the gate; NaN for one that failed it (its reason goes into
    `refused`) or raised. `functions`: name -> (function, shrink threshold) each is checked against. The curves
    timed every provider unchecked, unlike every other benchmark: a wrong kernel's time was plotted as its speed."""
    checked = {}
    for name, fn in fns.items():
        function, th = functions[name]
        try:
            failing = [x for x in _gate(name, fn, q, k, v, False, False, function=function, threshold=th) if not x.ok]
        except Exception as err:  # noqa: BLE001 - a provider that raises is refused, the others still run
            failing = [f"{type(err).__name__}: {err}"[:300]]
        if failing:
            refused.setdefault(name, getattr(failing[0], "message", failing[0]))
        else:
            checked[name] = fn
    with torch.no_grad():
        t = time_interleaved(checked, device, rounds=reps, warmup=1, min_rounds=reps) if checked else {}
    return {name: (t[name].median_ms if name in t and t[name].error is None else float("nan")) for name in fns}


CURVE_KEYS = ("n", "backend", "refused")  # the curves' entries that are not a provider's times


def time_vs_length(device: str | torch.device = "cpu", quick: bool = False) -> dict:
    """Forward ms per provider at each length N (q, k, v: (1, 4, N, 64), float32, non-causal), providers timed
    interleaved at each N, each checked first (experiments/tolerance.py's gate on the first and last rows of O).
    Returns {"n": [...], "<provider>": [ms, ...], "backend": fused backend or None, "refused": {provider: why}};
    a provider refused at some N has NaN there."""
    device = torch.device(device)
    if device.type == "cuda":
        lengths = [512, 1024, 2048] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    else:
        lengths = [128, 256, 512] if quick else [256, 512, 1024, 2048]
    backend = _fused_backend(device)
    curves: dict = {"n": lengths, "backend": backend, "refused": {}, "softmax (SDPA)": [], "dense sparsemax": []}
    if backend:
        curves["fused sparsemax"] = []
    reps = 1 if quick else 3
    for n in lengths:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, generator=gen).to(device) for _ in range(3))
        fns = {"softmax (SDPA)": attention_fn("sdpa", q, k, v, False)}
        # The dense baseline's N×N scores stop fitting long before the fused kernels do.
        if n * n * HEADS * 4 * 3 < (8 << 30 if device.type == "cuda" else 2 << 30):
            fns["dense sparsemax"] = attention_fn("reference", q, k, v, False)
        if backend:
            fns["fused sparsemax"] = attention_fn(backend, q, k, v, False)
        functions = {name: ("softmax" if name == "softmax (SDPA)" else "sparsemax", None) for name in fns}
        ms = _median_ms(fns, device, reps, q, k, v, functions, curves["refused"])
        for name in curves:
            if name not in CURVE_KEYS:
                curves[name].append(ms.get(name, float("nan")))
    return curves


def time_vs_sparsity(device: str | torch.device = "cpu", quick: bool = False) -> dict:
    """Shrink-mode forward ms as the fraction of scores below the threshold grows, against SDPA at one length.

    Each provider is checked before it is timed, as in time_vs_length.
    Returns {"sparsity": [...], "fused shrink": [ms, ...], "softmax (SDPA)": ms, "n": N, "backend": ...,
    "refused": {provider: why}}."""
    device = torch.device(device)
    n = (2048 if quick else 4096) if device.type == "cuda" else (256 if quick else 1024)
    sparsities = [0.5, 0.9, 0.99] if quick else [0.0, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999]
    backend = _fused_backend(device)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, generator=gen).to(device) for _ in range(3))
    scale = HEAD_DIM**-0.5
    with torch.no_grad():
        scores = (scale * q[0, 0] @ k[0, 0].T).flatten().float().cpu()
        # Thresholds at score quantiles: that fraction of the (head-0, statistically identical) scores is inactive.
        thresholds = [float(scores.kthvalue(max(1, int(s * scores.numel()))).values) for s in sparsities]
        fns = {"softmax (SDPA)": attention_fn("sdpa", q, k, v, False)}
        functions = {"softmax (SDPA)": ("softmax", None)}
        if backend:
            for s, t in zip(sparsities, thresholds):
                functions[f"shrink {s}"] = ("shrink", t)
                th = torch.full((HEADS,), t, device=device)
                fns[f"shrink {s}"] = functools.partial(
                    DF.sparse_attention, q, k, v, mode="shrink", threshold=th, backend=backend
                )
    refused: dict = {}
    ms = _median_ms(fns, device, 1 if quick else 3, q, k, v, functions, refused)
    out = {"sparsity": sparsities, "n": n, "backend": backend, "refused": refused}
    out["softmax (SDPA)"] = ms["softmax (SDPA)"]
    if backend:
        out["fused shrink"] = [ms[f"shrink {s}"] for s in sparsities]
    return out
