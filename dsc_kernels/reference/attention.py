"""Pure-PyTorch sparsemax and sparse attention: the oracle for every fused backend.

Math (docs/design.md §2). For q (B, H, N, d), k (B, H, M, d), v (B, H, M, dv) and an optional additive score ``bias``
broadcastable to (B, H, N, M) (``-inf`` hides a key, as ``nn.MultiheadAttention``'s float masks):
    s_ij = scale <q_i, k_j> + bias_ij,  s_ij = -inf where causal or the bias hides key j from query i
    sparsemax: P_ij = max(s_ij - tau_i, 0), tau_i solves sum_j max(s_ij - tau_i, 0) = 1
    shrink:    P_ij = max(s_ij - theta_h, 0)
    O = P v;  a row with no visible key, or no score above the threshold, gives O_i = 0.

Causal alignment is SDPA's ``is_causal`` (top-left): query i sees keys j <= i, whatever M is.

Sparsemax is computed relative to the row maximum m_i (z = s - m_i, whose support lies in [-1, 0]), so huge or
tied scores keep their precision. Its extended values, shared by every backend:
    a row holding +inf scores shares its mass equally among them (the limit of adding c -> inf to those entries);
    a row whose scores are all -inf is all zeros (not NaN); a NaN entry makes its whole row NaN.
Non-finite inputs: O_i is NaN when q_i, or the k_j or v_j of a key that row i sees, holds a NaN or +-inf, or when
one of its scores is NaN (e.g. a NaN in a float mask); such a row passes no gradient. A row reads only the keys it
sees, so a NaN in a hidden (masked or causally later) key never reaches it. Finite float32 q, k whose scores may
overflow have them computed in float64 and rounded to float32 (``_may_overflow``): a score beyond the range is
+-inf, and finite inputs never give a NaN score (a float32 GEMM gives inf or inf - inf = NaN by its summation order).
Float64 ones, with no wider dtype, are formed from exactly scaled-down q and k and scaled back
(``_wide_float64_scores``), to the same effect.

Row statistics, what the fused backends save for the backward (like FlashAttention's log-sum-exp):
stats (B, H, N, 2) = (c_i, t_i) with the support {j : z_ij > t_i} and P_ij = z_ij - t_i on it, where
z_ij = s_ij - c_i, except z_ij = 0 where s_ij = c_i (which only matters when c_i = +inf):
    sparsemax: c_i = row max m_i, t_i = tau_i - m_i in [-1, 0);   shrink: c_i = 0, t_i = theta_h;
    a +inf row: (+inf, -1/#{s_ij = +inf}) and zero score gradient; a row without keys: (+inf, +inf);
    a NaN row (above): (NaN, NaN), which has no support.

VJP with support m_ij = [z_ij > t_i], g = dL/dO:
    dP = g v^T,  dv = P^T g
    sparsemax: ds_i = m_i * (dP_i - delta_i),  delta_i = sum_j m_ij dP_ij / |S_i|
    shrink:    ds = m * dP,  dL/dtheta_h = -sum_{b,i,j} ds
    dq = scale * ds k,  dk = scale * ds^T q  (ds = 0 on +inf rows, whose P does not move)
Only (c_i, t_i) are needed to redo this from q, k, v: ``sparse_attention_fwd_ref`` / ``sparse_attention_bwd_ref``
are the dense, hand-written version of exactly that split, ``sparse_attention_ref`` the autograd-through-eager
oracle and ``sparse_attention_weights_ref`` the dense P (``need_weights``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "MODES",
    "sparsemax_ref",
    "sparsemax_threshold",
    "sparse_attention_ref",
    "sparse_attention_weights_ref",
    "sparse_attention_fwd_ref",
    "sparse_attention_bwd_ref",
    "stats_dtype",
]

# The attention modes, defined once for the package (functional and nn use this tuple).
MODES = ("sparsemax", "shrink")

_NAN, _INF = float("nan"), float("inf")


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the saved row statistics and of the computation: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------------ sparsemax
def relative_scores(x: Tensor, c: Tensor) -> Tensor:
    """z = x - c, with z = 0 where x == c = +-inf (a +inf row: 0 at its +inf entries, -inf elsewhere).
    Differentiable in x with derivative 1 wherever c is finite."""
    return torch.where((x == c) & torch.isinf(c), torch.zeros_like(x), x - c)


@torch.no_grad()
def sparsemax_threshold(x: Tensor) -> tuple[Tensor, Tensor]:
    """The row statistics (c, t) of sparsemax along the last dim (module docstring), each (..., 1), not differentiable.

    x: (..., n), n >= 1. Sorts z = x - max(x) and takes the largest k with 1 + k z_(k) > sum_{l<=k} z_(l)."""
    nan_row = torch.isnan(x).any(-1, keepdim=True)
    x = x.masked_fill(torch.isnan(x), -_INF)  # NaN rows are computed like any other, then made NaN
    m = x.amax(-1, keepdim=True)
    finite = torch.isfinite(m)
    z = torch.where(finite, x - m, torch.zeros_like(x))
    zs = torch.sort(z, dim=-1, descending=True).values
    csum = zs.cumsum(-1)
    ks = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
    # z_(1) = 0 makes k = 1 always qualify; -inf entries never do (1 - inf > -inf is False).
    size = ((1 + ks * zs) > csum).sum(-1, keepdim=True)
    t = (csum.gather(-1, size - 1) - 1) / size.to(x.dtype)
    n_inf = torch.isposinf(x).sum(-1, keepdim=True).to(x.dtype)
    t = torch.where(m == _INF, -1 / n_inf, torch.where(m == -_INF, _INF, t))
    c = torch.where(finite, m, torch.full_like(m, _INF))
    return c.masked_fill(nan_row, _NAN), t.masked_fill(nan_row, _NAN)


def _sparsemax_from_threshold(x: Tensor, c: Tensor, t: Tensor) -> Tensor:
    """P = max(z - t, 0) with the strict support z > t, differentiable in x: the gradient of t comes from the
    support's own sum (t = (sum_S z - 1)/|S|), so the Jacobian is the sparsemax one, diag(m) - m m^T / |S|."""
    z = relative_scores(x, c)
    support = z > t
    size = support.sum(-1, keepdim=True).clamp(min=1).to(x.dtype)
    t_expr = (torch.where(support, z, torch.zeros_like(z)).sum(-1, keepdim=True) - 1) / size
    # t's value is the one the sort found (so every support entry is strictly positive), its gradient t_expr's.
    t_grad = t + (t_expr - t_expr.detach())
    return torch.where(support, z - t_grad, torch.zeros_like(z))


def sparsemax_ref(x: Tensor, dim: int = -1) -> Tensor:
    """Sparsemax along ``dim``: the Euclidean projection of each slice onto the probability simplex.

    x: any shape, floating (half precision is computed in float32). Exact, sort-based, differentiable with the
    strict support {x > tau} (zero gradient on entries sitting exactly at tau). Extended values: -inf entries get
    0, an all -inf slice gives zeros, a slice with +inf entries shares its mass equally among them, a NaN makes its
    slice NaN; an empty ``dim`` gives an empty result.
    """
    if x.shape[dim] == 0:
        return x.clone()
    xt = x.movedim(dim, -1)
    cd = stats_dtype(x.dtype)
    xc = xt.to(cd)
    c, t = sparsemax_threshold(xc.detach())
    nan_row = torch.isnan(c)
    p = _sparsemax_from_threshold(xc.masked_fill(nan_row, 0.0), c.masked_fill(nan_row, 0.0), t.nan_to_num())
    return p.masked_fill(nan_row, _NAN).to(x.dtype).movedim(-1, dim)


# ---------------------------------------------------------------------------------------------- dense attention
def _finite(t: Tensor) -> Tensor:
    """t with its non-finite entries replaced by 0 (they poison rows explicitly instead, see the module doc)."""
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


def _rows_seeing(bad_key: Tensor, hidden: Tensor) -> Tensor:
    """(B,H,N): whether row i sees a key flagged in bad_key (B,H,M), given hidden (broadcastable to (B,H,N,M))."""
    return (bad_key.unsqueeze(-2) & ~hidden).any(-1)


def _may_overflow(q: Tensor, k: Tensor, scale: float, dtype: torch.dtype = torch.float32) -> bool:
    """Whether float32 scores of finite q, k may overflow: a partial sum of the GEMM may then be +inf in one
    summation order and inf - inf = NaN in another, so each backend would give its own answer. Such scores are
    computed in float64 and rounded (a score beyond float32's range is +-inf, never NaN), by every backend on the
    same bound: d max|q| max|k| max(scale, 1) > finfo.max / 4. (Read from the values: assumed not when they cannot
    be read: under torch.compile, per sample under vmap or on meta tensors; grad and jvp transforms can read them.)"""
    from .._validate import values_readable  # not at import: _validate imports this package

    if not values_readable(q) or not values_readable(k) or q.numel() == 0 or k.numel() == 0:
        return False
    bound = q.detach().abs().amax().double() * k.detach().abs().amax().double() * q.shape[-1] * max(scale, 1.0)
    return bool(bound > 0.25 * torch.finfo(dtype).max)


def _wide_float64_scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """scale q k^T for finite float64 q, k whose GEMM may overflow (a partial sum inf, inf - inf = NaN): the GEMM of
    q / 2^a and k / 2^b, with a + b a shift that keeps d max|q| max|k| max(scale, 1) below a quarter of the range
    (exact power-of-two scalings, within 3 bits of the least shift, so small entries keep their bits), then times
    2^(a + b) in pieces of at most 2^1000: the intermediates only grow, so a score overflows only where it is beyond
    float64's range, to +-inf, never NaN (float32's, through float64, follow the same rule). ``sparse_attention.cpp``
    the same."""
    # exponents of each factor apart: d max(scale, 1) alone may overflow (scale 1e308)
    factors = (q.detach().abs().amax(), k.detach().abs().amax(), q.shape[-1], max(scale, 1.0))
    shift = max(0, sum(math.frexp(float(t))[1] for t in factors) - 1020)
    a = shift // 2
    with torch.no_grad():
        s = scale * torch.matmul(q * 2.0**-a, (k * 2.0 ** -(shift - a)).transpose(-1, -2))
        while shift:
            piece = min(1000, shift)
            s = s * 2.0**piece
            shift -= piece
    # The derivatives through a term whose value is exactly 0 (q - q.detach() is 0, and so is its product with a
    # finite k), so that they are scale g k and scale g^T q (double backward included), never g times 2^shift.
    return s + scale * (
        torch.matmul(q - q.detach(), k.transpose(-1, -2)) + torch.matmul(q.detach(), (k - k.detach()).transpose(-1, -2))
    )


def _scores(q: Tensor, k: Tensor, causal: bool, scale: float, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Scores s (B,H,N,M) in q's dtype with -inf where hidden, the hidden mask, and the rows made NaN by q, k or a
    NaN score. Computed from finite-cleaned q and k, so a row never picks up NaN from a key it does not see."""
    n, m = q.shape[-2], k.shape[-2]
    qf, kf = _finite(q), _finite(k)
    if q.dtype == torch.float32 and _may_overflow(qf, kf, scale):
        s = (scale * torch.matmul(qf.double(), kf.double().transpose(-1, -2))).float()
    elif q.dtype == torch.float64 and 0 < scale < math.inf and _may_overflow(qf, kf, scale, torch.float64):
        s = _wide_float64_scores(qf, kf, scale)
    else:
        s = scale * torch.matmul(qf, kf.transpose(-1, -2))
    hidden = torch.zeros(n, m, dtype=torch.bool, device=q.device)
    if causal:
        hidden = torch.ones(n, m, dtype=torch.bool, device=q.device).triu(1)
    if bias is not None:
        hidden = hidden | (bias == -_INF)
        s = s + bias.to(s.dtype)
    s = s.masked_fill(hidden, -_INF)
    bad_q = ~torch.isfinite(q).all(-1)
    bad_k = ~torch.isfinite(k).all(-1)
    nan_rows = bad_q | _rows_seeing(bad_k, hidden) | torch.isnan(s).any(-1)
    return s, hidden, nan_rows


def _threshold_per_head(threshold: float | Tensor, h: int, like: Tensor) -> Tensor:
    """threshold as a (1, H, 1, 1) tensor in like's dtype/device (differentiable if a tensor)."""
    if isinstance(threshold, Tensor):
        return threshold.to(like.dtype).expand(h).reshape(1, h, 1, 1)
    return torch.full((1, h, 1, 1), float(threshold), dtype=like.dtype, device=like.device)


def _weights(
    q: Tensor,
    k: Tensor,
    mode: str,
    threshold: float | Tensor,
    causal: bool,
    scale: float,
    bias: Tensor | None,
    v: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Dense P (B,H,N,M) in the compute dtype (zero on NaN rows), the hidden mask and the NaN rows of P (counting
    the rows that see a non-finite value row when v is given)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    cd = stats_dtype(q.dtype)
    s, hidden, nan_rows = _scores(q.to(cd), k.to(cd), causal, scale, bias)
    if v is not None:
        nan_rows = nan_rows | _rows_seeing(~torch.isfinite(v).all(-1), hidden)
    # Computed as rows without keys, made NaN by the caller. A NaN row must have P = 0 here, not just a NaN output:
    # an infinite P (shrink on a +inf score) would turn the zero gradient the masked output passes back into
    # inf * 0 = NaN in dv.
    s = s.masked_fill(nan_rows.unsqueeze(-1), -_INF)
    if mode == "sparsemax":
        p = sparsemax_ref(s, dim=-1)
    else:
        th = _threshold_per_head(threshold, q.shape[1], s)
        p = torch.where(s > th, s - th, torch.zeros_like(s))
    return p, hidden, nan_rows


def sparse_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mode: str = "sparsemax",
    threshold: float | Tensor = 0.0,
    causal: bool = False,
    scale: float | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """Dense sparse attention, autograd through eager torch (the oracle; supports double backward).

    q: (B, H, N, d); k: (B, H, M, d); v: (B, H, M, dv); threshold: float or (H,) tensor (shrink only); bias: additive
    scores broadcastable to (B, H, N, M), -inf hides a key (not differentiated). Returns O (B, H, N, dv) in q's
    dtype; half inputs are computed in float32.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    cd = stats_dtype(q.dtype)
    p, _, nan_rows = _weights(q, k, mode, threshold, causal, scale, bias, v)
    out = torch.matmul(p, _finite(v.to(cd)))
    return out.masked_fill(nan_rows.unsqueeze(-1), _NAN).to(q.dtype)


def sparse_attention_weights_ref(
    q: Tensor,
    k: Tensor,
    *,
    mode: str = "sparsemax",
    threshold: float | Tensor = 0.0,
    causal: bool = False,
    scale: float | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """The dense attention weights P (B, H, N, M) of ``sparse_attention_ref`` (NaN rows where q_i or a key it sees
    is non-finite), in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    p, _, nan_rows = _weights(q, k, mode, threshold, causal, scale, bias)
    return p.masked_fill(nan_rows.unsqueeze(-1), _NAN).to(q.dtype)


# ------------------------------------------------------------------------------ hand-written forward and backward
def _row_stats(s: Tensor, threshold: Tensor, mode: str, nan_rows: Tensor) -> Tensor:
    """Per-row (c, t) of dense scores s (B,H,N,M) (module docstring) -> (B,H,N,2)."""
    if mode == "sparsemax":
        if s.shape[-1] == 0:
            c = t = torch.full((*s.shape[:-1], 1), _INF, dtype=s.dtype, device=s.device)
        else:
            c, t = sparsemax_threshold(s)
    else:
        c = torch.zeros((*s.shape[:-1], 1), dtype=s.dtype, device=s.device)
        t = threshold.to(s.dtype).reshape(1, -1, 1, 1).expand_as(c)
    stats = torch.cat([c, t], dim=-1)
    return stats.masked_fill(nan_rows.unsqueeze(-1), _NAN)


def _support(s: Tensor, stats: Tensor) -> tuple[Tensor, Tensor]:
    """(P, support mask) of scores s (B,H,N,M) at the saved row statistics."""
    c, t = stats[..., :1], stats[..., 1:]
    z = relative_scores(s, c)
    on = z > t
    return torch.where(on, z - t, torch.zeros_like(z)), on


def sparse_attention_fwd_ref(
    q: Tensor, k: Tensor, v: Tensor, threshold: Tensor, bias: Tensor | None, mode: str, causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    """Hand-written dense forward. Shapes as ``sparse_attention_ref``; threshold (H,).

    Returns O (B,H,N,dv) in q's dtype and stats (B,H,N,2) = (c, t) in ``stats_dtype(q.dtype)``.
    """
    cd = stats_dtype(q.dtype)
    s, hidden, nan_rows = _scores(q.to(cd), k.to(cd), causal, scale, bias)
    nan_rows = nan_rows | _rows_seeing(~torch.isfinite(v).all(-1), hidden)
    stats = _row_stats(s, threshold, mode, nan_rows)
    p, _ = _support(s, stats)
    out = torch.matmul(p, _finite(v.to(cd))).masked_fill(nan_rows.unsqueeze(-1), _NAN)
    return out.to(q.dtype), stats


def sparse_attention_bwd_ref(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    threshold: Tensor,
    bias: Tensor | None,
    stats: Tensor,
    mode: str,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Hand-written dense VJP from the saved row statistics (see the module docstring).

    grad_out (B,H,N,dv); stats (B,H,N,2). Returns grads of q, k, v (their dtypes) and threshold (H,)
    (zeros for sparsemax). NaN rows (stats NaN) pass no gradient.
    """
    cd = stats_dtype(q.dtype)
    qc, kc, vc = _finite(q.to(cd)), _finite(k.to(cd)), _finite(v.to(cd))
    st = stats.to(cd)
    s, _, _ = _scores(qc, kc, causal, scale, bias)
    p, on = _support(s, st)
    g = torch.where(torch.isnan(st[..., :1]), 0.0, grad_out.to(cd))
    moving = on & (st[..., :1] < _INF)  # +inf rows have a constant P
    dp = torch.where(moving, torch.matmul(g, vc.transpose(-1, -2)), 0.0)
    if mode == "sparsemax":
        size = moving.sum(-1, keepdim=True).clamp(min=1).to(cd)
        ds = torch.where(moving, dp - dp.sum(-1, keepdim=True) / size, 0.0)
        gth = torch.zeros_like(threshold)
    else:
        ds = dp
        gth = (-ds.sum(dim=(0, 2, 3))).to(threshold.dtype)
    dq = scale * torch.matmul(ds, kc)
    dk = scale * torch.matmul(ds.transpose(-1, -2), qc)
    dv = torch.matmul(p.transpose(-1, -2), g)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), gth
