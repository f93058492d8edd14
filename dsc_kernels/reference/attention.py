"""Pure-PyTorch sparse attention: the oracle for every fused backend.

Math (docs/design.md §2). For q (B, H, N, d), k and v (B, H, M, d):
    s_ij = scale * <q_i, k_j>,  s_ij = -inf where causal masks it out
    sparsemax: P_ij = max(s_ij - tau_i, 0), tau_i solves sum_j max(s_ij - tau_i, 0) = 1
    shrink:    P_ij = max(s_ij - theta_h, 0)
    O = P v;  a row with no active key (all -inf, or every score <= theta) gives O_i = 0.

Causal alignment is SDPA's ``is_causal`` (top-left): query i sees keys j <= i, whatever M is. So with
M != N, queries i >= M see every key, and row 0 always sees key 0.

VJP with support m_ij = [s_ij > tau_i] (sparsemax) or [s_ij > theta_h] (shrink), g = dL/dO:
    dP = g v^T,  dv = P^T g
    sparsemax: ds_i = m_i * (dP_i - delta_i),  delta_i = sum_j m_ij dP_ij / |S_i|
    shrink:    ds = m * dP,  dL/dtheta_h = -sum_{b,i,j} ds
    dq = scale * ds k,  dk = scale * ds^T q
Only the per-row statistics (tau_i, |S_i|) are needed to redo this from q, k, v, which is what the fused
backends save; ``sparse_attention_fwd_ref`` / ``sparse_attention_bwd_ref`` are the dense, hand-written version of
exactly that split, ``sparse_attention_ref`` the autograd-through-eager oracle.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "sparsemax_ref",
    "sparse_attention_ref",
    "sparse_attention_fwd_ref",
    "sparse_attention_bwd_ref",
    "stats_dtype",
]

MODES = ("sparsemax", "shrink")


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the saved row statistics: float64 for float64 inputs, else float32 (fp32 accumulation)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sparsemax_tau_last(x: Tensor) -> tuple[Tensor, Tensor]:
    """Threshold and support size of sparsemax along the last dim, by sorting.

    x: (..., n), may hold -inf but no row may be all -inf. Returns tau (..., 1) and |S| (..., 1) (x.dtype).
    Differentiable: the gradient reaches x through the cumulative sum of the support only.
    """
    z, _ = torch.sort(x, dim=-1, descending=True)
    ks = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
    csum = z.cumsum(-1)
    # -inf entries give 1 + k*(-inf) = -inf > -inf: False, and sums of -inf never make NaN.
    support = (1 + ks * z) > csum
    size = support.sum(-1, keepdim=True)
    tau = (csum.gather(-1, size - 1) - 1) / size.to(x.dtype)
    return tau, size.to(x.dtype)


def sparsemax_ref(x: Tensor, dim: int = -1) -> Tensor:
    """Sparsemax along ``dim``: the Euclidean projection of each slice onto the probability simplex.

    x: any shape, floating. Sort-based, exact and differentiable. -inf entries get 0; a slice that is entirely
    -inf gives all zeros (not NaN) and zero gradient.
    """
    xt = x.movedim(dim, -1)
    dead = torch.isneginf(xt).all(-1, keepdim=True)
    # Dead slices are computed on zeros so no inf - inf appears, then zeroed.
    safe = xt.masked_fill(dead, 0.0)
    tau, _ = _sparsemax_tau_last(safe)
    out = torch.clamp(safe - tau, min=0).masked_fill(dead, 0.0)
    return out.movedim(-1, dim)


def _threshold_per_head(threshold: float | Tensor, h: int, like: Tensor) -> Tensor:
    """threshold as a (1, H, 1, 1) tensor in like's dtype/device (differentiable if a tensor)."""
    if isinstance(threshold, Tensor):
        t = threshold.to(like.dtype)
        if t.dim() == 0:
            t = t.expand(h)
        return t.reshape(1, h, 1, 1)
    return torch.full((1, h, 1, 1), float(threshold), dtype=like.dtype, device=like.device)


def _scores(q: Tensor, k: Tensor, causal: bool, scale: float) -> Tensor:
    """s = scale * q k^T with the top-left causal mask as -inf. q (B,H,N,d), k (B,H,M,d) -> (B,H,N,M)."""
    s = scale * torch.matmul(q, k.transpose(-1, -2))
    if causal:
        n, m = q.shape[-2], k.shape[-2]
        keep = torch.ones(n, m, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return s


def sparse_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mode: str = "sparsemax",
    threshold: float | Tensor = 0.0,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Dense sparse attention, autograd through eager torch (the oracle).

    q: (B, H, N, d); k, v: (B, H, M, d) (v may have its own last dim); threshold: float or (H,) tensor (shrink only).
    Returns O (B, H, N, d_v). Half inputs are computed in float32 and cast back.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out_dtype = q.dtype
    cd = stats_dtype(q.dtype)
    q, k, v = q.to(cd), k.to(cd), v.to(cd)
    s = _scores(q, k, causal, scale)
    if mode == "sparsemax":
        p = sparsemax_ref(s, dim=-1)
    else:
        p = torch.clamp(s - _threshold_per_head(threshold, q.shape[1], s), min=0)
    return torch.matmul(p, v).to(out_dtype)


def _row_stats(s: Tensor, threshold: Tensor, mode: str) -> Tensor:
    """Per-row (tau, |S|) of dense scores s (B,H,N,M) -> (B,H,N,2). Rows without a key get tau = +inf, |S| = 0."""
    if mode == "sparsemax":
        dead = torch.isneginf(s).all(-1, keepdim=True)
        tau, size = _sparsemax_tau_last(s.masked_fill(dead, 0.0))
        tau = tau.masked_fill(dead, float("inf"))
        size = size.masked_fill(dead, 0.0)
    else:
        tau = threshold.to(s.dtype).reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        size = (s > tau).sum(-1, keepdim=True).to(s.dtype)
    return torch.cat([tau, size], dim=-1)


def sparse_attention_fwd_ref(
    q: Tensor, k: Tensor, v: Tensor, threshold: Tensor, mode: str, causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    """Hand-written dense forward. Shapes as ``sparse_attention_ref``; threshold (H,).

    Returns O (B,H,N,d_v) in q's dtype and stats (B,H,N,2) = (tau, |S|) in ``stats_dtype(q.dtype)``.
    """
    cd = stats_dtype(q.dtype)
    s = _scores(q.to(cd), k.to(cd), causal, scale)
    stats = _row_stats(s, threshold, mode)
    p = torch.clamp(s - stats[..., :1], min=0)
    return torch.matmul(p, v.to(cd)).to(q.dtype), stats


def sparse_attention_bwd_ref(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    threshold: Tensor,
    stats: Tensor,
    mode: str,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Hand-written dense VJP from the saved row statistics (see the module docstring).

    grad_out (B,H,N,d_v); stats (B,H,N,2). Returns grads of q, k, v (their dtypes) and threshold (H,)
    (zeros for sparsemax).
    """
    cd = stats_dtype(q.dtype)
    qc, kc, vc, g = q.to(cd), k.to(cd), v.to(cd), grad_out.to(cd)
    s = _scores(qc, kc, causal, scale)
    tau = stats[..., :1].to(cd)
    p = torch.clamp(s - tau, min=0)
    mask = (s > tau).to(cd)
    dp = torch.matmul(g, vc.transpose(-1, -2)) * mask
    if mode == "sparsemax":
        size = stats[..., 1:].to(cd).clamp(min=1)
        ds = dp - mask * dp.sum(-1, keepdim=True) / size
        gth = torch.zeros_like(threshold)
    else:
        ds = dp
        gth = (-ds.sum(dim=(0, 2, 3))).to(threshold.dtype)
    dq = scale * torch.matmul(ds, kc)
    dk = scale * torch.matmul(ds.transpose(-1, -2), qc)
    dv = torch.matmul(p.transpose(-1, -2), g)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), gth
