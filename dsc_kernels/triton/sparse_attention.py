"""Flash-style Triton kernels for sparse attention (backend "triton"): the N x M score matrix never exists.

Math (docs/design.md §2), q (B,H,N,d), k (B,H,M,d), v (B,H,M,dv), theta (H,):
    s_ij = scale <q_i, k_j>, causal (top-left, SDPA's is_causal): only keys j <= i
    sparsemax: tau_i solves sum_j max(s_ij - tau_i, 0) = 1;   shrink: tau_i = theta_h
    P_ij = max(s_ij - tau_i, 0),  O_i = sum_j P_ij v_j
Forward, one program per (query block, batch*head), fp32 accumulation:
    shrink: one pass over key blocks; a tile with no score above theta skips its v load and P v product.
    sparsemax: pass 1 finds the row max m_i and a lower bound lo <= tau_i (from a superset of the support);
        then Michelot passes lo <- (sum_{s > lo} s - 1) / |{s > lo}|, which rise monotonically to tau_i and are
        exact (no tolerance) once the set {s > lo} stops shrinking. Each such pass also accumulates
        O = max(s - lo, 0) v (skipping tiles without support), kept for a row when that pass shows lo is exact.
        Each pass recomputes the scores tile by tile; typically 2-4 passes in all.
Saved for backward: stats (B,H,N,2) = (tau_i, |S_i|) in fp32, like FlashAttention's log-sum-exp.
VJP (g = dL/dO, support m_ij = [s_ij > tau_i]):
    dP_ij = <g_i, v_j>,  delta_i = sum_j m_ij dP_ij / |S_i| (sparsemax) or 0 (shrink),  ds = m (dP - delta)
    dq = scale ds k (`_bwd_dq_kernel`, per query block; also delta_i and the per-program partial of
    dtheta_h = -sum ds), dk = scale ds^T q and dv = P^T g (`_bwd_dkdv_kernel`, per key block, reading delta).
    Each program owns its outputs: deterministic, no atomics.
Every load and store is masked (rows past N or M, head-dim padding to a power of two >= 16).
Launchers use only torch ops and `torch.library.wrap_triton` launches, so they run inside a `triton_op`.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["sparse_attention_fwd", "sparse_attention_bwd", "KERNELS", "aot_signature"]


@triton.jit
def _load_rows(base, offs_r, n_rows, offs_c, n_cols, UPCAST: tl.constexpr):
    """Rows offs_r, columns offs_c of a row-major (n_rows, n_cols) matrix, zero outside it. UPCAST (the
    interpreter) loads half precision as fp32 straight away, since the interpreter cannot compute in bf16."""
    t = tl.load(base + offs_r[:, None] * n_cols + offs_c[None, :],
                mask=(offs_r[:, None] < n_rows) & (offs_c[None, :] < n_cols), other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _scores(q, k_ptr, start_n, offs_m, offs_d, N_K, D, scale,
            CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Scores of a (BLOCK_M, BLOCK_N) tile, -inf where the key is past M or causally hidden."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(k_ptr, offs_n, N_K, offs_d, D, UPCAST)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
    valid = offs_n[None, :] < N_K
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    return tl.where(valid, s, float("-inf")), offs_n


@triton.jit
def _key_end(start_m, N_K, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """One past the last key any query of the block starting at start_m can see."""
    if CAUSAL:
        return tl.minimum(N_K, start_m + BLOCK_M)
    return N_K


@triton.jit
def _sweep(q, k_base, v_base, tau, row_ok, offs_m, offs_d, offs_dv, end_n, N_K, D, DV, scale,
           CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
           UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """One pass over the keys at per-row thresholds tau: (max(s - tau, 0) v, |{s > tau}|, sum_{s > tau} s)."""
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    cnt = tl.zeros([BLOCK_M], tl.float32)
    tot = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, end_n, BLOCK_N):
        s, offs_n = _scores(q, k_base, start_n, offs_m, offs_d, N_K, D, scale, CAUSAL, BLOCK_N, UPCAST, DOT_PREC)
        above = row_ok[:, None] & (s > tau[:, None])
        cnt += tl.sum(above.to(tl.float32), axis=1)
        tot += tl.sum(tl.where(above, s, 0.0), axis=1)
        # Exactly sparse rows make most tiles empty: skip their v traffic and the second GEMM.
        if tl.max(tl.max(above.to(tl.int32), axis=1), axis=0) > 0:
            p = tl.where(above, s - tau[:, None], 0.0)
            v = _load_rows(v_base, offs_n, N_K, offs_dv, DV, UPCAST)
            if UPCAST:
                acc += tl.dot(p, v, input_precision=DOT_PREC)
            else:
                acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, cnt, tot


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, th_ptr, o_ptr, st_ptr, N_Q, N_K, H, D, DV, scale,
                SPARSEMAX: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < N_Q
    q = _load_rows(q_ptr + bh * N_Q * D, offs_m, N_Q, offs_d, D, UPCAST)
    k_base = k_ptr + bh * N_K * D
    v_base = v_ptr + bh * N_K * DV
    end_n = _key_end(start_m, N_K, CAUSAL, BLOCK_M)

    if SPARSEMAX:
        # Pass 1: the row max m, and A = {s > (running max) - 1}, a superset of the support, so both m - 1 and
        # (sum_A s - 1) / |A| are lower bounds of tau; the second is usually within a few keys of it.
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        cnt = tl.zeros([BLOCK_M], tl.float32)
        tot = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, end_n, BLOCK_N):
            s, offs_n = _scores(q, k_base, start_n, offs_m, offs_d, N_K, D, scale, CAUSAL, BLOCK_N, UPCAST,
                                DOT_PREC)
            m = tl.maximum(m, tl.max(s, axis=1))
            above = s > (m - 1.0)[:, None]
            cnt += tl.sum(above.to(tl.float32), axis=1)
            tot += tl.sum(tl.where(above, s, 0.0), axis=1)
        has_key = m > float("-inf")
        lo = tl.where(has_key, tl.maximum(m - 1.0, (tot - 1.0) / tl.maximum(cnt, 1.0)), float("inf"))
        # Michelot passes, each also accumulating O speculatively at lo: once the set {s > lo} stops shrinking,
        # lo is the exact tau and that same pass's O is the answer, so no extra pass is spent on O.
        pending = row_ok & has_key
        prev = tl.full([BLOCK_M], -1.0, tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        support = tl.zeros([BLOCK_M], tl.float32)
        n_pending = tl.sum(pending.to(tl.int32), axis=0)
        while n_pending > 0:
            o, cnt, tot = _sweep(q, k_base, v_base, lo, row_ok, offs_m, offs_d, offs_dv, end_n, N_K, D, DV, scale,
                                 CAUSAL, BLOCK_M, BLOCK_N, BLOCK_DV, UPCAST, DOT_PREC)
            t = (tot - 1.0) / tl.maximum(cnt, 1.0)
            # Done when the set no longer shrinks (lo exact) or rounding stalls the rise.
            done = pending & ((cnt == prev) | (t <= lo))
            acc = tl.where(done[:, None], o, acc)
            support = tl.where(done, cnt, support)
            pending = pending & (done == 0)
            lo = tl.where(pending, t, lo)
            prev = cnt
            n_pending = tl.sum(pending.to(tl.int32), axis=0)
        tau = lo
    else:
        tau = tl.zeros([BLOCK_M], tl.float32) + tl.load(th_ptr + bh % H).to(tl.float32)
        acc, support, tot = _sweep(q, k_base, v_base, tau, row_ok, offs_m, offs_d, offs_dv, end_n, N_K, D, DV,
                                   scale, CAUSAL, BLOCK_M, BLOCK_N, BLOCK_DV, UPCAST, DOT_PREC)
    tl.store(o_ptr + bh * N_Q * DV + offs_m[:, None] * DV + offs_dv[None, :],
             acc.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(st_ptr + (bh * N_Q + offs_m) * 2, tau, mask=row_ok)
    tl.store(st_ptr + (bh * N_Q + offs_m) * 2 + 1, support, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, g_ptr, st_ptr, dq_ptr, delta_ptr, dth_ptr, N_Q, N_K, D, DV, scale,
                   SPARSEMAX: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < N_Q
    q = _load_rows(q_ptr + bh * N_Q * D, offs_m, N_Q, offs_d, D, UPCAST)
    g = _load_rows(g_ptr + bh * N_Q * DV, offs_m, N_Q, offs_dv, DV, UPCAST)
    tau = tl.load(st_ptr + (bh * N_Q + offs_m) * 2, mask=row_ok, other=float("inf"))
    k_base = k_ptr + bh * N_K * D
    v_base = v_ptr + bh * N_K * DV
    end_n = _key_end(start_m, N_K, CAUSAL, BLOCK_M)

    delta = tl.zeros([BLOCK_M], tl.float32)
    if SPARSEMAX:
        support = tl.load(st_ptr + (bh * N_Q + offs_m) * 2 + 1, mask=row_ok, other=1.0)
        for start_n in range(0, end_n, BLOCK_N):
            s, offs_n = _scores(q, k_base, start_n, offs_m, offs_d, N_K, D, scale, CAUSAL, BLOCK_N, UPCAST,
                                DOT_PREC)
            on = s > tau[:, None]
            if tl.max(tl.max(on.to(tl.int32), axis=1), axis=0) > 0:
                v = _load_rows(v_base, offs_n, N_K, offs_dv, DV, UPCAST)
                dp = tl.dot(g, tl.trans(v), input_precision=DOT_PREC)
                delta += tl.sum(tl.where(on, dp, 0.0), axis=1)
        delta = delta / tl.maximum(support, 1.0)
    tl.store(delta_ptr + bh * N_Q + offs_m, delta, mask=row_ok)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    ds_sum = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, end_n, BLOCK_N):
        s, offs_n = _scores(q, k_base, start_n, offs_m, offs_d, N_K, D, scale, CAUSAL, BLOCK_N, UPCAST, DOT_PREC)
        on = s > tau[:, None]
        if tl.max(tl.max(on.to(tl.int32), axis=1), axis=0) > 0:
            k = _load_rows(k_base, offs_n, N_K, offs_d, D, UPCAST)
            v = _load_rows(v_base, offs_n, N_K, offs_dv, DV, UPCAST)
            dp = tl.dot(g, tl.trans(v), input_precision=DOT_PREC)
            ds = tl.where(on, dp - delta[:, None], 0.0)
            ds_sum += tl.sum(ds, axis=1)
            if UPCAST:
                dq += tl.dot(ds, k, input_precision=DOT_PREC)
            else:
                dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    tl.store(dq_ptr + bh * N_Q * D + offs_m[:, None] * D + offs_d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
    # One partial of dtheta per program; the launcher sums them per head.
    tl.store(dth_ptr + bh * tl.num_programs(0) + pid_m, -tl.sum(tl.where(row_ok, ds_sum, 0.0), axis=0))


@triton.jit
def _bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, g_ptr, st_ptr, delta_ptr, dk_ptr, dv_ptr, N_Q, N_K, D, DV, scale,
                     CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < N_K
    k = _load_rows(k_ptr + bh * N_K * D, offs_n, N_K, offs_d, D, UPCAST)
    v = _load_rows(v_ptr + bh * N_K * DV, offs_n, N_K, offs_dv, DV, UPCAST)
    q_base = q_ptr + bh * N_Q * D
    g_base = g_ptr + bh * N_Q * DV
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    # Top-left causal: only queries i >= start_n see this block's keys.
    begin_m = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0
    for start_m in range(begin_m, N_Q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N_Q
        q = _load_rows(q_base, offs_m, N_Q, offs_d, D, UPCAST)
        tau = tl.load(st_ptr + (bh * N_Q + offs_m) * 2, mask=row_ok, other=float("inf"))
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
        on = row_ok[:, None] & col_ok[None, :] & (s > tau[:, None])
        if CAUSAL:
            on = on & (offs_n[None, :] <= offs_m[:, None])
        if tl.max(tl.max(on.to(tl.int32), axis=1), axis=0) > 0:
            g = _load_rows(g_base, offs_m, N_Q, offs_dv, DV, UPCAST)
            delta = tl.load(delta_ptr + bh * N_Q + offs_m, mask=row_ok, other=0.0)
            p = tl.where(on, s - tau[:, None], 0.0)
            dp = tl.dot(g, tl.trans(v), input_precision=DOT_PREC)
            ds = tl.where(on, dp - delta[:, None], 0.0)
            if UPCAST:
                dv += tl.dot(tl.trans(p), g, input_precision=DOT_PREC)
                dk += tl.dot(tl.trans(ds), q, input_precision=DOT_PREC)
            else:
                dv += tl.dot(tl.trans(p).to(g.dtype), g, input_precision=DOT_PREC)
                dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PREC)
    tl.store(dk_ptr + bh * N_K * D + offs_n[:, None] * D + offs_d[None, :],
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=col_ok[:, None] & (offs_d[None, :] < D))
    tl.store(dv_ptr + bh * N_K * DV + offs_n[:, None] * DV + offs_dv[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None] & (offs_dv[None, :] < DV))


KERNELS = {"fwd": _fwd_kernel, "bwd_dq": _bwd_dq_kernel, "bwd_dkdv": _bwd_dkdv_kernel}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _config(q: Tensor, v: Tensor) -> dict:
    """Compile-time constants shared by the three kernels (block sizes, padding, precision)."""
    d, dv = q.shape[-1], v.shape[-1]
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the triton sparse-attention kernels take float32/float16/bfloat16, got {q.dtype}")
    # Small tiles keep the interpreter quick; on a GPU 64 x 64 tiles with d <= 128 fit in registers/shared memory.
    block = 16 if _interpreting() else (64 if max(d, dv) <= 64 else 32)
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=max(16, triton.next_power_of_2(d)),
                BLOCK_DV=max(16, triton.next_power_of_2(dv)),
                # The interpreter's numpy has no bf16 arithmetic, so values are upcast right after loading.
                UPCAST=_interpreting(), DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")


def sparse_attention_fwd(q: Tensor, k: Tensor, v: Tensor, threshold: Tensor, mode: str, causal: bool,
                         scale: float) -> tuple[Tensor, Tensor]:
    """Launch the forward. q (B,H,N,d), k (B,H,M,d), v (B,H,M,dv) contiguous, threshold (H,).

    Returns O (B,H,N,dv) in q's dtype and stats (B,H,N,2) fp32 = (tau, |S|).
    """
    b, h, n, d = q.shape
    m, dv = k.shape[2], v.shape[3]
    cfg = _config(q, v)
    out = torch.empty((b, h, n, dv), device=q.device, dtype=q.dtype)
    stats = torch.empty((b, h, n, 2), device=q.device, dtype=torch.float32)
    th = threshold.to(torch.float32).contiguous()
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), b * h)
    torch.library.wrap_triton(_fwd_kernel)[grid](
        q, k, v, th, out, stats, n, m, h, d, dv, scale,
        SPARSEMAX=mode == "sparsemax", CAUSAL=causal, **cfg)
    return out, stats


def sparse_attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, threshold: Tensor, stats: Tensor,
                         mode: str, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the backward from the saved stats. Shapes as the forward; grad_out (B,H,N,dv).

    Returns dq, dk, dv (input dtypes) and dthreshold (H,) (zeros for sparsemax).
    """
    b, h, n, d = q.shape
    m, dv_ = k.shape[2], v.shape[3]
    cfg = _config(q, v)
    g = grad_out.to(q.dtype).contiguous()
    st = stats.to(torch.float32).contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    delta = torch.empty((b, h, n), device=q.device, dtype=torch.float32)
    n_qblocks = triton.cdiv(n, cfg["BLOCK_M"])
    dth_partial = torch.empty((b, h, n_qblocks), device=q.device, dtype=torch.float32)
    torch.library.wrap_triton(_bwd_dq_kernel)[(n_qblocks, b * h)](
        q, k, v, g, st, dq, delta, dth_partial, n, m, d, dv_, scale,
        SPARSEMAX=mode == "sparsemax", CAUSAL=causal, **cfg)
    torch.library.wrap_triton(_bwd_dkdv_kernel)[(triton.cdiv(m, cfg["BLOCK_N"]), b * h)](
        q, k, v, g, st, delta, dk, dv, n, m, d, dv_, scale, CAUSAL=causal, **cfg)
    if mode == "sparsemax":
        dth = torch.zeros_like(threshold)
    else:
        dth = dth_partial.sum(dim=(0, 2)).to(threshold.dtype)
    return dq, dk, dv, dth


def aot_signature(dtype: str, d: int, mode: str, causal: bool, kernel: str = "fwd") -> tuple[dict, dict]:
    """(signature, constexprs) for compiling ``KERNELS[kernel]`` ahead of time with `triton.compile`.

    dtype: "fp32" | "fp16" | "bf16"; d: head dim (also used as dv).
    """
    blk = 64 if d <= 64 else 32
    pd = max(16, triton.next_power_of_2(d))
    ptr = f"*{dtype}"
    common = dict(CAUSAL=causal, BLOCK_M=blk, BLOCK_N=blk, BLOCK_D=pd, BLOCK_DV=pd, UPCAST=False,
                  DOT_PREC="ieee" if dtype == "fp32" else "tf32")
    if kernel == "fwd":
        sig = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, th_ptr="*fp32", o_ptr=ptr, st_ptr="*fp32", N_Q="i32",
                   N_K="i32", H="i32", D="i32", DV="i32", scale="fp32")
        const = dict(common, SPARSEMAX=mode == "sparsemax")
    elif kernel == "bwd_dq":
        sig = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, g_ptr=ptr, st_ptr="*fp32", dq_ptr=ptr, delta_ptr="*fp32",
                   dth_ptr="*fp32", N_Q="i32", N_K="i32", D="i32", DV="i32", scale="fp32")
        const = dict(common, SPARSEMAX=mode == "sparsemax")
    else:
        sig = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, g_ptr=ptr, st_ptr="*fp32", delta_ptr="*fp32", dk_ptr=ptr,
                   dv_ptr=ptr, N_Q="i32", N_K="i32", D="i32", DV="i32", scale="fp32")
        const = common
    for name in const:
        sig[name] = "constexpr"
    return sig, const
