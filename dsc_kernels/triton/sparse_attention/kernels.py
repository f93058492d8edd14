"""The sparse-attention kernels: `_fwd_kernel`, then `_bwd_dq_kernel` and `_bwd_dkdv_kernel`.

Math (docs/design.md §2, reference/attention.py), q (B,H,N,d), k (B,H,M,d), v (B,H,M,dv), theta (H,), optional bias
(B,H,N,M):
    s_ij = scale <q_i, k_j> + bias_ij; key j hidden (s = -inf) when j > i (causal, top-left) or bias_ij = -inf
    z_ij = s_ij - c_i (z = 0 where s_ij = c_i = +inf), P_ij = max(z_ij - t_i, 0), O_i = sum_j P_ij v_j
    sparsemax: c_i = max_j s_ij, t_i = tau_i - c_i (rows relative to their max keep huge or tied scores exact);
        a +inf row: (c, t) = (+inf, -1/#{+inf}); a row without keys: (+inf, +inf)
    shrink: (c_i, t_i) = (0, theta_h)
    a row is NaN (O_i = NaN, stats (NaN, NaN), no gradient) when q_i, or the k_j / v_j of a key it sees, holds NaN or
    inf, or one of its scores is NaN. The launcher flags bad keys (B,H,M) and the kernels mark their rows. Scores
    s_ij read only q_i and k_j, and hidden ones are replaced by -inf, so raw tiles are fine for them; the operand
    of a dot that mixes rows (v in P v, k in ds k, q in ds^T q) is loaded with non-finite entries zeroed, since
    0 * NaN would otherwise reach rows that never see the key.
Forward, one program per (query block, batch*head), fp32 scores, fp64 threshold sums:
    shrink: one pass over key blocks; a tile with no score above theta skips its v load and P v product.
    sparsemax: pass 1 finds the row max m_i, the +inf count, the NaN rows and a lower bound lo <= t_i (from sets
        of keys whose (sum z - 1) / size bounds t below). Then Michelot passes lo <- (sum_{z > lo} z - 1) /
        |{z > lo}|, which rise monotonically to t_i and are exact (no tolerance) once the set {z > lo} stops
        shrinking. Each pass recomputes the scores tile by tile, so passes are the cost: each one (`_set_sweep`)
        also writes the first CAP members of its set (z and key index, ranked in key order by a product with a
        triangular matrix of ones) to the row's candidate slots, launcher scratch of (rows, CAP). A set that fits
        holds every later set, so the remaining steps run on the slots, and O = sum_j max(z_j - t, 0) v_j gathers
        the support's v rows (`_resolve`): no further pass. Simulated on N(0, sd^2) scores with 4096-8192 keys and
        sd 1-2, the first set after pass 1 fits CAP = 64 in every 64-row block: a block takes 2 passes, where the
        Michelot passes alone took 5-7 (at sd = 0.5 it takes 3). A row whose set stops shrinking with more than CAP
        members (a flat row: a wide support) gets its O from one more pass (`_output_sweep`, the pass shrink
        runs), at its exact lo.
Saved for backward: stats (B,H,N,2) = (c_i, t_i) in fp32, like FlashAttention's log-sum-exp.
VJP (g = dL/dO, support m_ij = [z_ij > t_i]):
    dP_ij = <g_i, v_j>,  delta_i = sum_j m_ij dP_ij / |S_i| (sparsemax) or 0 (shrink),  ds = m (dP - delta)
    (ds = 0 on +inf rows), dq = scale ds k (`_bwd_dq_kernel`, per query block, in one pass as
    scale (sum_j m dP k_j - delta sum_j m k_j), delta known only at its end; also delta_i and the per-program partial
    of dtheta_h = -sum ds), dk = scale ds^T q and dv = P^T g (`_bwd_dkdv_kernel`, per key block, after it).
    Each program owns its outputs: deterministic, no atomics.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..grid import block_and_index
from .tiles import (
    _any,
    _finite,
    _key_end,
    _load_rows,
    _max,
    _output_sweep,
    _relative,
    _resolve,
    _sees_bad,
    _set_sweep,
    _tile_scores,
)


@triton.jit
def _fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    th_ptr,
    b_ptr,
    badk_ptr,
    slot_ptr,
    o_ptr,
    st_ptr,
    bh0,
    sq_b,
    sq_h,
    sq_n,
    sk_b,
    sk_h,
    sk_n,
    sv_b,
    sv_h,
    sv_n,
    sb_b,
    sb_h,
    sb_n,
    sb_m,
    N_Q,
    N_K,
    H,
    D,
    DV,
    scale,
    SPARSEMAX: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_m, bh_chunk = block_and_index(N_Q, BLOCK_M)
    bh_chunk = bh_chunk.to(tl.int64)
    # The launcher runs the (batch, head) slices in chunks from bh0, each chunk with its own candidate slots.
    bh = bh0 + bh_chunk
    b, h = bh // H, bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < N_Q
    q = _load_rows(q_ptr + b * sq_b + h * sq_h, sq_n, offs_m, N_Q, offs_d, D, UPCAST)
    nan_row = tl.max(tl.where(tl.abs(q) < float("inf"), 0, 1), axis=1) > 0
    q = _finite(q)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    b_base = b_ptr + b * sb_b + h * sb_h
    badk_base = badk_ptr + bh * N_K
    o_rows = o_ptr + bh * N_Q * DV + offs_m * DV
    end_n = _key_end(start_m, N_K, CAUSAL, BLOCK_M)
    # Rows whose O was already stored (from their candidate slots).
    resolved = offs_m < 0

    if SPARSEMAX:
        # Pass 1: the row max m, the +inf count, the NaN rows, and a lower bound lo <= t to start Michelot from.
        # (sum_C z - 1) / |C| bounds t below for any set C of a row's keys (the |C| largest sum to at least as
        # much), and so does -1 (t >= max - 1). Each tile raises lo with two such sets: the tile's keys above lo,
        # and all keys so far that were above lo when seen (C, its sum kept relative to the running max and
        # shifted when the max rises). Simulated on N(0, 1) scores with 4096-8192 keys, the first Michelot set
        # then holds at most 43-64 keys per 64-row block, inside CAP: with the set of keys above max - 1 as the
        # bound, up to 76-111 (every block at 8192 keys took a third pass).
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        n_inf = tl.zeros([BLOCK_M], tl.float32)
        lo = tl.full([BLOCK_M], -1.0, tl.float32)  # relative to the running max
        cnt = tl.zeros([BLOCK_M], tl.float32)
        tot = tl.zeros([BLOCK_M], tl.float64)
        for start_n in range(0, end_n, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _load_rows(k_base, sk_n, offs_n, N_K, offs_d, D, UPCAST)
            s, visible = _tile_scores(
                q, k, offs_m, offs_n, N_Q, N_K, scale, b_base, sb_n, sb_m, CAUSAL, HAS_BIAS, DOT_PREC
            )
            nan_row = nan_row | _sees_bad(visible, s, badk_base, offs_n, N_K)
            s = tl.where(s == s, s, float("-inf"))
            m_new = _max(m, tl.max(s, axis=1))
            n_inf += tl.sum((s == float("inf")).to(tl.float32), axis=1)
            # The shift of C's sum in fp64, exact where an fp32 difference of two maxima far apart is not. lo's own
            # shift is exact or takes lo below -1 (maxima within a factor of 2, or a jump of at least 1).
            shift = tl.where(m > float("-inf"), m - m_new, 0.0)
            tot += tl.where(cnt > 0, (m.to(tl.float64) - m_new.to(tl.float64)) * cnt.to(tl.float64), 0.0)
            lo = _max(lo + shift, -1.0)
            # Rows whose max is -inf or +inf have no finite z here (NaN or -inf): they join no set.
            above = s - m_new[:, None] > lo[:, None]
            n_tile = tl.sum(above.to(tl.float32), axis=1)
            sum_tile = tl.sum(tl.where(above, s - m_new[:, None], 0.0), axis=1).to(tl.float64)
            cnt += n_tile
            tot += sum_tile
            tile_bound = tl.where(n_tile > 0, (sum_tile - 1.0) / _max(n_tile, 1.0).to(tl.float64), -1.0)
            set_bound = tl.where(cnt > 0, (tot - 1.0) / _max(cnt, 1.0).to(tl.float64), -1.0)
            lo = _max(lo, _max(tile_bound, set_bound).to(tl.float32))
            m = m_new
        has_key = m > float("-inf")
        inf_row = m == float("inf")
        # A +inf row's threshold is exact at once: (0 - 1) / #{+inf}, computed as the sweep computes it.
        inf_t = ((tl.zeros([BLOCK_M], tl.float64) - 1.0) / _max(n_inf, 1.0).to(tl.float64)).to(tl.float32)
        # The bounds are sums of fp32 z (fp32 within a tile): a margin far above their rounding keeps lo below t
        # when a set was the support itself; Michelot's steps from any lower bound end at the exact t.
        lo = tl.where(inf_row, inf_t, _max(lo - 2e-5, -1.0))
        # Michelot passes. Each writes the members of its set {z > lo} to the row's CAP candidate slots: a set that
        # fits holds the support (every later set is a subset), so the rest of the algorithm and O run on the slots
        # alone, without another pass over the keys; typically the first pass after pass 1 fits. A row whose set
        # stops shrinking while larger than CAP has its exact t = lo, and one more pass computes its O.
        cand_row = (bh_chunk * N_Q + offs_m) * CAP
        pending = row_ok & has_key & (nan_row == 0)
        wide = pending & False
        prev = tl.full([BLOCK_M], -1.0, tl.float32)
        while _any(pending[:, None]):
            cnt, tot = _set_sweep(
                q,
                k_base,
                sk_n,
                b_base,
                sb_n,
                sb_m,
                slot_ptr,
                cand_row,
                m,
                lo,
                pending,
                offs_m,
                offs_d,
                end_n,
                N_Q,
                N_K,
                D,
                scale,
                CAUSAL,
                HAS_BIAS,
                CAP,
                BLOCK_M,
                BLOCK_N,
                UPCAST,
                DOT_PREC,
            )
            fits = pending & (cnt <= CAP)
            if _any(fits[:, None]):
                # The slots were written by other threads of this program.
                tl.debug_barrier()
                lo = _resolve(
                    slot_ptr,
                    cand_row,
                    fits,
                    cnt,
                    lo,
                    prev,
                    v_base,
                    sv_n,
                    o_rows,
                    offs_dv,
                    DV,
                    CAP,
                    BLOCK_M,
                    BLOCK_DV,
                )
                resolved = resolved | fits
            t = ((tot - 1.0) / _max(cnt, 1.0).to(tl.float64)).to(tl.float32)
            # lo is exact when the set no longer shrinks, or as exact as it gets when rounding stalls the rise.
            stops = pending & (fits == 0) & ((cnt == prev) | (t <= lo))
            wide = wide | stops
            pending = pending & (fits == 0) & (stops == 0)
            lo = tl.where(pending, t, lo)
            prev = cnt
        c = tl.where(has_key, m, float("inf"))
        t_row = tl.where(has_key, lo, float("inf"))
        swept = wide  # their support outgrew the slots
    else:
        c = tl.zeros([BLOCK_M], tl.float32)
        t_row = c + tl.load(th_ptr + h).to(tl.float32)
        swept = row_ok
    # O of the rows left by one pass at their exact (c, t); shrink's pass also finds the rows that see a bad key or
    # a NaN score (sparsemax's pass 1 did).
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if not SPARSEMAX or _any(swept[:, None]):
        acc, bad = _output_sweep(
            q,
            k_base,
            sk_n,
            v_base,
            sv_n,
            b_base,
            sb_n,
            sb_m,
            badk_base,
            c,
            t_row,
            swept,
            offs_m,
            offs_d,
            offs_dv,
            end_n,
            N_Q,
            N_K,
            D,
            DV,
            scale,
            CAUSAL,
            HAS_BIAS,
            not SPARSEMAX,
            BLOCK_M,
            BLOCK_N,
            BLOCK_DV,
            UPCAST,
            DOT_PREC,
        )
        nan_row = nan_row | bad
    acc = tl.where(nan_row[:, None], float("nan"), acc)
    c = tl.where(nan_row, float("nan"), c)
    t_row = tl.where(nan_row, float("nan"), t_row)
    tl.store(
        o_rows[:, None] + offs_dv[None, :],
        acc.to(o_ptr.dtype.element_ty),
        mask=(row_ok & (resolved == 0))[:, None] & (offs_dv[None, :] < DV),
    )
    tl.store(st_ptr + (bh * N_Q + offs_m) * 2, c, mask=row_ok)
    tl.store(st_ptr + (bh * N_Q + offs_m) * 2 + 1, t_row, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    b_ptr,
    g_ptr,
    st_ptr,
    dq_ptr,
    delta_ptr,
    dth_ptr,
    sq_b,
    sq_h,
    sq_n,
    sk_b,
    sk_h,
    sk_n,
    sv_b,
    sv_h,
    sv_n,
    sb_b,
    sb_h,
    sb_n,
    sb_m,
    N_Q,
    N_K,
    H,
    D,
    DV,
    scale,
    SPARSEMAX: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_m, bh = block_and_index(N_Q, BLOCK_M)
    bh = bh.to(tl.int64)
    b, h = bh // H, bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < N_Q
    q = _finite(_load_rows(q_ptr + b * sq_b + h * sq_h, sq_n, offs_m, N_Q, offs_d, D, UPCAST))
    c = tl.load(st_ptr + (bh * N_Q + offs_m) * 2, mask=row_ok, other=float("nan"))
    t = tl.load(st_ptr + (bh * N_Q + offs_m) * 2 + 1, mask=row_ok, other=float("nan"))
    # A NaN row passes no gradient (and its g, possibly NaN, must not reach other rows through a dot).
    g = _load_rows(g_ptr + bh * N_Q * DV, DV, offs_m, N_Q, offs_dv, DV, UPCAST)
    g = tl.where((c == c)[:, None], g, tl.zeros_like(g))
    moving = c < float("inf")  # +inf rows (and rows without keys) have a constant P
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    b_base = b_ptr + b * sb_b + h * sb_h
    end_n = _key_end(start_m, N_K, CAUSAL, BLOCK_M)

    # One pass. ds = m (dP - delta) needs delta, known only at the end of the pass, so dq is accumulated as
    # sum_j m dP k_j - delta sum_j m k_j (sparsemax; delta = 0 for shrink).
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_sum = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dp_sum = tl.zeros([BLOCK_M], tl.float32)
    support = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _finite(_load_rows(k_base, sk_n, offs_n, N_K, offs_d, D, UPCAST))
        s, _ = _tile_scores(q, k, offs_m, offs_n, N_Q, N_K, scale, b_base, sb_n, sb_m, CAUSAL, HAS_BIAS, DOT_PREC)
        on = moving[:, None] & (_relative(s, c) > t[:, None])
        if _any(on):
            v = _load_rows(v_base, sv_n, offs_n, N_K, offs_dv, DV, UPCAST)
            dp = tl.where(on, tl.dot(g, tl.trans(v), input_precision=DOT_PREC), 0.0)
            dp_sum += tl.sum(dp, axis=1)
            if UPCAST:
                dq += tl.dot(dp, k, input_precision=DOT_PREC)
            else:
                dq += tl.dot(dp.to(k.dtype), k, input_precision=DOT_PREC)
            if SPARSEMAX:
                support += tl.sum(on.to(tl.float32), axis=1)
                k_sum += tl.dot(on.to(k.dtype), k, input_precision=DOT_PREC)
    if SPARSEMAX:
        delta = dp_sum / _max(support, 1.0)
        dq -= delta[:, None] * k_sum
    else:
        delta = tl.zeros([BLOCK_M], tl.float32)
    tl.store(delta_ptr + bh * N_Q + offs_m, delta, mask=row_ok)
    tl.store(
        dq_ptr + bh * N_Q * D + offs_m[:, None] * D + offs_d[None, :],
        (dq * scale).to(dq_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (offs_d[None, :] < D),
    )
    # One partial of dtheta = -sum ds per program (shrink, where ds = m dP); the launcher sums them per head.
    tl.store(dth_ptr + bh * tl.cdiv(N_Q, BLOCK_M) + pid_m, -tl.sum(tl.where(row_ok, dp_sum, 0.0), axis=0))


@triton.jit
def _bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    b_ptr,
    g_ptr,
    st_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    sq_b,
    sq_h,
    sq_n,
    sk_b,
    sk_h,
    sk_n,
    sv_b,
    sv_h,
    sv_n,
    sb_b,
    sb_h,
    sb_n,
    sb_m,
    N_Q,
    N_K,
    H,
    D,
    DV,
    scale,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_n, bh = block_and_index(N_K, BLOCK_N)
    bh = bh.to(tl.int64)
    b, h = bh // H, bh % H
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < N_K
    k = _finite(_load_rows(k_ptr + b * sk_b + h * sk_h, sk_n, offs_n, N_K, offs_d, D, UPCAST))
    v = _finite(_load_rows(v_ptr + b * sv_b + h * sv_h, sv_n, offs_n, N_K, offs_dv, DV, UPCAST))
    q_base = q_ptr + b * sq_b + h * sq_h
    b_base = b_ptr + b * sb_b + h * sb_h
    g_base = g_ptr + bh * N_Q * DV
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    # Top-left causal: only queries i >= start_n see this block's keys.
    begin_m = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0
    for start_m in range(begin_m, N_Q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N_Q
        q = _finite(_load_rows(q_base, sq_n, offs_m, N_Q, offs_d, D, UPCAST))
        c = tl.load(st_ptr + (bh * N_Q + offs_m) * 2, mask=row_ok, other=float("nan"))
        t = tl.load(st_ptr + (bh * N_Q + offs_m) * 2 + 1, mask=row_ok, other=float("nan"))
        s, _ = _tile_scores(q, k, offs_m, offs_n, N_Q, N_K, scale, b_base, sb_n, sb_m, CAUSAL, HAS_BIAS, DOT_PREC)
        on = _relative(s, c) > t[:, None]  # never on NaN rows, hidden keys or rows/keys out of range
        if _any(on):
            g = _load_rows(g_base, DV, offs_m, N_Q, offs_dv, DV, UPCAST)
            g = tl.where((c == c)[:, None], g, tl.zeros_like(g))
            delta = tl.load(delta_ptr + bh * N_Q + offs_m, mask=row_ok, other=0.0)
            p = tl.where(on, _relative(s, c) - t[:, None], 0.0)
            dp = tl.dot(g, tl.trans(v), input_precision=DOT_PREC)
            ds = tl.where(on & (c < float("inf"))[:, None], dp - delta[:, None], 0.0)
            if UPCAST:
                dv += tl.dot(tl.trans(p), g, input_precision=DOT_PREC)
                dk += tl.dot(tl.trans(ds), q, input_precision=DOT_PREC)
            else:
                dv += tl.dot(tl.trans(p).to(g.dtype), g, input_precision=DOT_PREC)
                dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PREC)
    tl.store(
        dk_ptr + bh * N_K * D + offs_n[:, None] * D + offs_d[None, :],
        (dk * scale).to(dk_ptr.dtype.element_ty),
        mask=col_ok[:, None] & (offs_d[None, :] < D),
    )
    tl.store(
        dv_ptr + bh * N_K * DV + offs_n[:, None] * DV + offs_dv[None, :],
        dv.to(dv_ptr.dtype.element_ty),
        mask=col_ok[:, None] & (offs_dv[None, :] < DV),
    )
