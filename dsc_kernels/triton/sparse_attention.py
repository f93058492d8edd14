"""Flash-style Triton kernels for sparse attention (backend "triton"): the N x M score matrix never exists.

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
q, k, v are read through their (batch, head, row) strides with a unit last stride (the launchers copy only inputs
without one); every load and store is masked (rows past N or M, head-dim padding to a power of two >= 16).
Launchers use only torch ops and `launch(...)` (`torch.library.wrap_triton`, recordable for ahead-of-time
compilation: `aot_specializations` records the launches the launchers really make, on meta tensors).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._attention_args import MAX_FUSED_HEAD_DIM
from .grid import block_and_index
from .launch import AotSpec, interpreting, launch, record_launches

__all__ = ["sparse_attention_fwd", "sparse_attention_bwd", "KERNELS", "aot_specializations"]


@triton.jit
def _load_rows(base, stride_r, offs_r, n_rows, offs_c, n_cols, UPCAST: tl.constexpr):
    """Rows offs_r, columns offs_c of a (n_rows, n_cols) matrix with row stride stride_r, zero outside it. UPCAST
    (the interpreter) loads half precision as fp32 straight away, since the interpreter cannot compute in bf16."""
    t = tl.load(
        base + offs_r[:, None] * stride_r + offs_c[None, :],
        mask=(offs_r[:, None] < n_rows) & (offs_c[None, :] < n_cols),
        other=0.0,
    )
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _finite(t):
    """t with NaN and +-inf entries zeroed (the rows that see them are made NaN explicitly)."""
    return tl.where(tl.abs(t) < float("inf"), t, tl.zeros_like(t))


@triton.jit
def _tile_scores(
    q,
    k,
    offs_m,
    offs_n,
    N_Q,
    N_K,
    scale,
    b_base,
    sb_n,
    sb_m,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Scores of loaded q (BLOCK_M, d) and k (BLOCK_N, d) tiles with the bias added, -inf where hidden; and which
    entries are visible."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
    visible = (offs_m[:, None] < N_Q) & (offs_n[None, :] < N_K)
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None])
    if HAS_BIAS:
        bias = tl.load(b_base + offs_m[:, None] * sb_n + offs_n[None, :] * sb_m, mask=visible, other=0.0)
        visible = visible & (bias != float("-inf"))
        s = s + bias
    return tl.where(visible, s, float("-inf")), visible


@triton.jit
def _relative(s, c):
    """z = s - c per row, 0 where s = c (a +inf row's +inf entries)."""
    return tl.where(s == c[:, None], 0.0, s - c[:, None])


@triton.jit
def _key_end(start_m, N_K, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """One past the last key any query of the block starting at start_m can see."""
    if CAUSAL:
        return tl.minimum(N_K, start_m + BLOCK_M)
    return N_K


@triton.jit
def _any(mask):
    return tl.max(tl.max(mask.to(tl.int32), axis=1), axis=0) > 0


@triton.jit
def _sees_bad(visible, s, badk_base, offs_n, N_K):
    """Per row: whether a visible key of this tile is flagged bad or a visible score is NaN."""
    bad = tl.load(badk_base + offs_n, mask=offs_n < N_K, other=0) != 0
    return tl.max((visible & (bad[None, :] | (s != s))).to(tl.int32), axis=1) > 0


@triton.jit
def _pack(z, key):
    """A candidate slot: the fp32 z's bits above the int32 key index, one 64-bit store (one pointer per element
    where two stores held two, and spilled in the causal kernel)."""
    return (z.to(tl.int32, bitcast=True).to(tl.int64) << 32) | key.to(tl.int64)


@triton.jit
def _unpack(slot):
    """(z, key) of candidate slots written by _pack."""
    return (slot >> 32).to(tl.int32).to(tl.float32, bitcast=True), (slot & 0xFFFFFFFF).to(tl.int32)


@triton.jit
def _set_sweep(
    q,
    k_base,
    sk_n,
    b_base,
    sb_n,
    sb_m,
    slot_ptr,
    cand_row,
    c,
    lo,
    active,
    offs_m,
    offs_d,
    end_n,
    N_Q,
    N_K,
    D,
    scale,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One pass over the keys at per-row (c, lo) for the active rows: |{z > lo}| and sum_{z > lo} z (fp64 across
    tiles), writing the set's first CAP members (z and key index, in key order) to the row's candidate slots
    slot_ptr[cand_row + slot]."""
    cnt = tl.zeros([BLOCK_M], tl.float32)
    tot = tl.zeros([BLOCK_M], tl.float64)
    # Compaction: a member's slot is the row's count so far plus its rank within the tile. With tensor-core scores
    # the rank is a product with an upper-triangular matrix of ones (exact in fp16 x fp16 -> fp32), which stays in
    # the scores' layout where a scan along the row moves the tile through shared memory (1638 against 2520 SASS
    # instructions per tile). Next to fp32 IEEE scores (FMA dots) the product would double the tile's work, and
    # Triton 3.6 fails to compile the mix ("operand does not dominate this use"): a scan there.
    cols = tl.arange(0, BLOCK_N)
    upper = (cols[:, None] <= cols[None, :]).to(tl.float16)
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, sk_n, offs_n, N_K, offs_d, D, UPCAST)
        s, _ = _tile_scores(q, k, offs_m, offs_n, N_Q, N_K, scale, b_base, sb_n, sb_m, CAUSAL, HAS_BIAS, DOT_PREC)
        z = _relative(s, c)
        above = active[:, None] & (z > lo[:, None])
        if DOT_PREC == "ieee":
            rank = tl.cumsum(above.to(tl.float32), axis=1)
        else:
            rank = tl.dot(above.to(tl.float16), upper, out_dtype=tl.float32)
        slot = (cnt[:, None] + rank).to(tl.int32) - 1
        keep = above & (slot < CAP)
        tl.store(slot_ptr + cand_row[:, None] + slot, _pack(z, offs_n[None, :] + tl.zeros_like(slot)), mask=keep)
        cnt += tl.sum(above.to(tl.float32), axis=1)
        tot += tl.sum(tl.where(above, z, 0.0), axis=1).to(tl.float64)
    return cnt, tot


@triton.jit
def _output_sweep(
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
    lo,
    active,
    offs_m,
    offs_d,
    offs_dv,
    end_n,
    N_Q,
    N_K,
    D,
    DV,
    scale,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FLAG_BAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One pass over the keys at per-row (c, lo) for the active rows: O = sum_j max(z_j - lo, 0) v_j, and the rows
    seeing a bad key or a NaN score (FLAG_BAD)."""
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    bad = tl.zeros([BLOCK_M], tl.int32) != 0
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, sk_n, offs_n, N_K, offs_d, D, UPCAST)
        s, visible = _tile_scores(q, k, offs_m, offs_n, N_Q, N_K, scale, b_base, sb_n, sb_m, CAUSAL, HAS_BIAS, DOT_PREC)
        if FLAG_BAD:
            bad = bad | _sees_bad(visible, s, badk_base, offs_n, N_K)
        z = _relative(s, c)
        above = active[:, None] & (z > lo[:, None])
        # Exactly sparse rows make most tiles empty: skip their v traffic and the second GEMM.
        if _any(above):
            p = tl.where(above, z - lo[:, None], 0.0)
            v = _finite(_load_rows(v_base, sv_n, offs_n, N_K, offs_dv, DV, UPCAST))
            if UPCAST:
                acc += tl.dot(p, v, input_precision=DOT_PREC)
            else:
                acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, bad


@triton.jit
def _resolve(
    slot_ptr,
    cand_row,
    rows,
    n,
    lo,
    prev,
    v_base,
    sv_n,
    o_rows,
    offs_dv,
    DV,
    CAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """For `rows`, whose whole set {z > lo} (n <= CAP keys) sits in their candidate slots: Michelot's remaining
    steps run on the slots alone (every later set is a subset), then O = sum_j max(z_j - t, 0) v_j gathers the
    support's v rows and is stored at o_rows. Returns lo with t on these rows."""
    slots = tl.arange(0, CAP)
    held = rows[:, None] & (slots[None, :] < n[:, None])
    z, _ = _unpack(tl.load(slot_ptr + cand_row[:, None] + slots[None, :], mask=held, other=0))
    z = tl.where(held, z, float("-inf"))
    going = rows
    while _any(going[:, None]):
        # The sweeps' step, with the same exact stop: the set stopped shrinking, or rounding stalls the rise.
        above = z > lo[:, None]
        cnt = tl.sum(above.to(tl.float32), axis=1)
        tot = tl.sum(tl.where(above, z, 0.0), axis=1).to(tl.float64)
        t = ((tot - 1.0) / tl.maximum(cnt, 1.0).to(tl.float64)).to(tl.float32)
        going = going & (cnt != prev) & (t > lo)
        lo = tl.where(going, t, lo)
        prev = cnt
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for j in range(0, tl.max(tl.where(rows, n, 0.0), axis=0).to(tl.int32)):
        filled = rows & (j < n)
        zj, key = _unpack(tl.load(slot_ptr + cand_row + j, mask=filled, other=0))
        p = tl.where(filled & (zj > lo), zj - lo, 0.0)
        v = tl.load(
            v_base + key[:, None] * sv_n + offs_dv[None, :], mask=(p > 0)[:, None] & (offs_dv[None, :] < DV), other=0.0
        )
        acc += p[:, None] * v.to(tl.float32)
    tl.store(
        o_rows[:, None] + offs_dv[None, :],
        acc.to(o_rows.dtype.element_ty),
        mask=rows[:, None] & (offs_dv[None, :] < DV),
    )
    return lo


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
            m_new = tl.maximum(m, tl.max(s, axis=1))
            n_inf += tl.sum((s == float("inf")).to(tl.float32), axis=1)
            # The shift of C's sum in fp64, exact where an fp32 difference of two maxima far apart is not. lo's own
            # shift is exact or takes lo below -1 (maxima within a factor of 2, or a jump of at least 1).
            shift = tl.where(m > float("-inf"), m - m_new, 0.0)
            tot += tl.where(cnt > 0, (m.to(tl.float64) - m_new.to(tl.float64)) * cnt.to(tl.float64), 0.0)
            lo = tl.maximum(lo + shift, -1.0)
            # Rows whose max is -inf or +inf have no finite z here (NaN or -inf): they join no set.
            above = s - m_new[:, None] > lo[:, None]
            n_tile = tl.sum(above.to(tl.float32), axis=1)
            sum_tile = tl.sum(tl.where(above, s - m_new[:, None], 0.0), axis=1).to(tl.float64)
            cnt += n_tile
            tot += sum_tile
            tile_bound = tl.where(n_tile > 0, (sum_tile - 1.0) / tl.maximum(n_tile, 1.0).to(tl.float64), -1.0)
            set_bound = tl.where(cnt > 0, (tot - 1.0) / tl.maximum(cnt, 1.0).to(tl.float64), -1.0)
            lo = tl.maximum(lo, tl.maximum(tile_bound, set_bound).to(tl.float32))
            m = m_new
        has_key = m > float("-inf")
        inf_row = m == float("inf")
        # A +inf row's threshold is exact at once: (0 - 1) / #{+inf}, computed as the sweep computes it.
        inf_t = ((tl.zeros([BLOCK_M], tl.float64) - 1.0) / tl.maximum(n_inf, 1.0).to(tl.float64)).to(tl.float32)
        # The bounds are sums of fp32 z (fp32 within a tile): a margin far above their rounding keeps lo below t
        # when a set was the support itself; Michelot's steps from any lower bound end at the exact t.
        lo = tl.where(inf_row, inf_t, tl.maximum(lo - 2e-5, -1.0))
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
            t = ((tot - 1.0) / tl.maximum(cnt, 1.0).to(tl.float64)).to(tl.float32)
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
        delta = dp_sum / tl.maximum(support, 1.0)
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


KERNELS = {"fwd": _fwd_kernel, "bwd_dq": _bwd_dq_kernel, "bwd_dkdv": _bwd_dkdv_kernel}


def _block(d: int, dv: int, dtype: torch.dtype) -> int:
    """Query and key rows per tile. Small tiles keep the interpreter quick. On a GPU, half-precision tiles of 64 x 64
    with d <= 64 (32 beyond) fit in registers/shared memory; fp32 runs IEEE FMA dots whose per-thread operand slices
    are far larger, and at 64 rows the sm_90 backward spilled 8 KiB per thread (dq at d = 64), so its tiles are 32
    rows up to d = 32 and 16 beyond (no spill at d = 24 to 64; a few hundred bytes in the d = 128 dq backward)."""
    if interpreting():
        return 16
    if dtype == torch.float32:
        return 32 if max(d, dv) <= 32 else 16
    return 64 if max(d, dv) <= 64 else 32


def _slots() -> int:
    """Candidate slots per query row (sparsemax). On N(0, 1) scores (unit-variance q.k * scale), 4096-8192 keys, the
    first Michelot set after pass 1 holds 10-12 keys on average and at most 33-38 over 512 rows; 64 leaves room for
    flatter rows. Small under the interpreter so that its small tests overflow the slots too."""
    return 4 if interpreting() else 64


# Candidate slots of one launch, in slots: a (batch, head) chunk's share is rows * CAP * 8 bytes (value and key).
_SLOT_BUDGET = 2**23


def _config(q: Tensor, v: Tensor, bias: Tensor | None) -> dict:
    """Compile-time constants shared by the three kernels (block sizes, padding, precision, bias)."""
    d, dv = q.shape[-1], v.shape[-1]
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the triton sparse-attention kernels take float32/float16/bfloat16, got {q.dtype}")
    block = _block(d, dv, q.dtype)
    return dict(
        BLOCK_M=block,
        BLOCK_N=block,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_DV=max(16, triton.next_power_of_2(dv)),
        HAS_BIAS=bias is not None,
        # The interpreter's numpy has no bf16 arithmetic, so values are upcast right after loading.
        UPCAST=interpreting(),
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )


def _rows(t: Tensor) -> Tensor:
    """t itself when its rows have a unit last stride (what the kernels read), else a contiguous copy."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _strides(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _bias_args(bias: Tensor | None, dummy: Tensor) -> tuple:
    """The bias pointer and its four strides (a float32 placeholder with zero strides when there is none)."""
    if bias is None:
        return dummy, 0, 0, 0, 0
    if bias.dtype != torch.float32:
        raise TypeError(f"the triton sparse-attention kernels take a float32 bias, got {bias.dtype}")
    return (bias, *bias.stride())


def _finite_rows(t: Tensor) -> Tensor:
    """(B, H, L) bool: whether row t[b, h, l] is all finite, from its min and max (no temporary of t's size)."""
    if t.shape[-1] == 0:
        return torch.ones(t.shape[:-1], dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t, dim=-1)
    return torch.isfinite(lo) & torch.isfinite(hi)


def _bad_keys(k: Tensor, v: Tensor) -> Tensor:
    """(B, H, M) int8: 1 where k_j or v_j holds NaN or inf (the rows that see such a key are NaN)."""
    return (~(_finite_rows(k) & _finite_rows(v))).to(torch.int8).contiguous()


# Offsets inside one (batch, head) slice are int32 in the kernels (row index times row stride, tl.arange based);
# only the (batch, head) part is int64.
_MAX_INDEX = 2**31


def _extent(t: Tensor, dims: tuple[int, ...]) -> int:
    """One past the largest offset of ``t``'s dims ``dims`` (in elements): what an int32 index has to reach."""
    return 1 + sum((t.shape[i] - 1) * t.stride(i) for i in dims) if all(t.shape[i] > 0 for i in dims) else 0


def _check_inputs(op: str, q, k, v, threshold, bias, mode, scale) -> None:
    """The checks of the C++ ops (csrc/cpu/sparse_attention.cpp, check_inputs), done before any launch: the kernels
    read k, v and the bias through q's (B, H) and k's M, and theta by head, so any other shape is read out of
    bounds. Shapes, dtypes and strides only: no device synchronisation."""
    if mode not in ("sparsemax", "shrink"):
        raise ValueError(f"{op}: mode must be 'sparsemax' or 'shrink', got {mode!r}")
    # A NaN scale makes every score NaN: the C++ ops refuse it too.
    if scale != scale:
        raise ValueError(f"{op}: scale must not be NaN")
    for name, t in (("q", q), ("k", k), ("v", v), ("threshold", threshold)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise RuntimeError(
            f"{op}: q, k, v must be (B, H, L, d), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, h, n, d = q.shape
    m = k.shape[2]
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, h, d):
        raise RuntimeError(f"{op}: k must be (B, H, M, d) matching q {tuple(q.shape)}, got {tuple(k.shape)}")
    if (v.shape[0], v.shape[1], v.shape[2]) != (b, h, m):
        raise RuntimeError(f"{op}: v must be (B, H, M, dv) matching k {tuple(k.shape)}, got {tuple(v.shape)}")
    if threshold.dim() != 1 or threshold.shape[0] != h or not threshold.is_floating_point():
        raise RuntimeError(
            f"{op}: threshold must be a float tensor of shape (H,) = ({h},), got {tuple(threshold.shape)}"
        )
    if max(d, v.shape[3]) > MAX_FUSED_HEAD_DIM:
        raise RuntimeError(
            f"{op}: the triton kernels take head dims (d, d_v) up to {MAX_FUSED_HEAD_DIM}, got ({d}, {v.shape[3]}): "
            "their tiles would not fit a GPU's shared memory; use backend='reference'"
        )
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: the triton sparse-attention kernels take float32/float16/bfloat16, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise RuntimeError(f"{op}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    tensors = [("k", k), ("v", v), ("threshold", threshold)]
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"{op}: bias must be a tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (b, h, n, m):
            raise RuntimeError(f"{op}: bias must be (B, H, N, M) = {(b, h, n, m)}, got {tuple(bias.shape)}")
        tensors.append(("bias", bias))
    for name, t in tensors:
        if t.device != q.device:
            raise RuntimeError(f"{op}: all tensors must be on q's device ({q.device}); {name} is on {t.device}")
    if max(n, m) >= _MAX_INDEX or max(n * d, n * v.shape[3], m * d, m * v.shape[3]) >= _MAX_INDEX:
        raise RuntimeError(
            f"{op}: one (batch, head) slice must hold fewer than 2**31 elements (int32 kernel offsets); "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )


def _check_extents(op: str, tensors) -> None:
    """The (batch, head) slices of the tensors the kernels read through their strides (after `_rows`) must be
    addressable with int32 offsets: a row stride times a row index past 2**31 wraps around."""
    for name, t in tensors:
        if t is not None and _extent(t, (2, 3)) >= _MAX_INDEX:
            raise RuntimeError(
                f"{op}: {name} spans {_extent(t, (2, 3))} elements within one (batch, head) slice (shape "
                f"{tuple(t.shape)}, strides {t.stride()}); the kernels address fewer than 2**31: pass it contiguous"
            )


def _grid(rows: int, block: int, heads: int) -> tuple[int]:
    """The 1-D launch grid of grid.block_and_index: row blocks of every (batch, head)."""
    programs = triton.cdiv(rows, block) * heads
    if programs >= 2**31:
        raise RuntimeError(
            f"sparse_attention (triton): {programs} programs, more than a CUDA grid holds: split the batch"
        )
    return (programs,)


def sparse_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, threshold: Tensor, bias: Tensor | None, mode: str, causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    """Launch the forward. q (B,H,N,d), k (B,H,M,d), v (B,H,M,dv) with any strides, threshold (H,), bias None or
    (B,H,N,M) float32 (any strides, zero on broadcast dims).

    Returns O (B,H,N,dv) in q's dtype and stats (B,H,N,2) fp32 = (c, t).
    """
    op = "sparse_attention_fwd_triton"
    _check_inputs(op, q, k, v, threshold, bias, mode, scale)
    q, k, v = _rows(q), _rows(k), _rows(v)
    _check_extents(op, (("q", q), ("k", k), ("v", v), ("bias", bias)))
    b, h, n, d = q.shape
    m, dv = k.shape[2], v.shape[3]
    cfg = _config(q, v, bias)
    out = torch.empty((b, h, n, dv), device=q.device, dtype=q.dtype)
    stats = torch.empty((b, h, n, 2), device=q.device, dtype=torch.float32)
    th = threshold.to(torch.float32).contiguous()
    if n == 0 or b * h == 0:
        return out, stats
    bias_ptr, *bias_strides = _bias_args(bias, stats)
    bad_keys = _bad_keys(k, v)
    sparsemax = mode == "sparsemax"
    cap = _slots()
    # Sparsemax's candidate slots are scratch of rows * cap values and key indices; (batch, head) chunks of at
    # most _SLOT_BUDGET slots (one slice at least) bound it whatever the batch.
    chunk = max(1, _SLOT_BUDGET // (n * cap)) if sparsemax else b * h
    n_slots = min(chunk, b * h) * n * cap if sparsemax else 1
    slots = torch.empty(n_slots, device=q.device, dtype=torch.int64)
    for bh0 in range(0, b * h, chunk):
        launch(_fwd_kernel)[_grid(n, cfg["BLOCK_M"], min(chunk, b * h - bh0))](
            q,
            k,
            v,
            th,
            bias_ptr,
            bad_keys,
            slots,
            out,
            stats,
            bh0,
            *_strides(q),
            *_strides(k),
            *_strides(v),
            *bias_strides,
            n,
            m,
            h,
            d,
            dv,
            scale,
            SPARSEMAX=sparsemax,
            CAUSAL=causal,
            CAP=cap,
            **cfg,
        )
    return out, stats


def sparse_attention_bwd(
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
    """Launch the backward from the saved stats. Shapes as the forward; grad_out (B,H,N,dv).

    Returns dq, dk, dv (input dtypes, contiguous) and dthreshold (H,) (zeros for sparsemax).
    """
    op = "sparse_attention_bwd_triton"
    _check_inputs(op, q, k, v, threshold, bias, mode, scale)
    # Both are read as contiguous buffers of these shapes (the kernels index them by q's and v's sizes).
    out_shape, stats_shape = (*q.shape[:3], v.shape[3]), (*q.shape[:3], 2)
    for name, t, shape in (("grad_out", grad_out, out_shape), ("stats", stats, stats_shape)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape or not t.is_floating_point() or t.device != q.device:
            raise RuntimeError(
                f"{op}: {name} must be a float tensor of shape {shape} on q's device, the forward's; got "
                f"{tuple(t.shape)} ({t.dtype}, {t.device})"
            )
    q, k, v = _rows(q), _rows(k), _rows(v)
    _check_extents(op, (("q", q), ("k", k), ("v", v), ("bias", bias)))
    b, h, n, d = q.shape
    m, dv_ = k.shape[2], v.shape[3]
    cfg = _config(q, v, bias)
    g = grad_out.to(q.dtype).contiguous()
    st = stats.to(torch.float32).contiguous()
    dq = torch.zeros((b, h, n, d), device=q.device, dtype=q.dtype)
    dk = torch.zeros((b, h, m, d), device=q.device, dtype=q.dtype)
    dv = torch.zeros((b, h, m, dv_), device=q.device, dtype=q.dtype)
    delta = torch.empty((b, h, n), device=q.device, dtype=torch.float32)
    n_qblocks = triton.cdiv(n, cfg["BLOCK_M"])
    dth_partial = torch.zeros((b, h, n_qblocks), device=q.device, dtype=torch.float32)
    bias_ptr, *bias_strides = _bias_args(bias, st)
    strides = (*_strides(q), *_strides(k), *_strides(v), *bias_strides)
    if n > 0 and b * h > 0:
        launch(_bwd_dq_kernel)[_grid(n, cfg["BLOCK_M"], b * h)](
            q,
            k,
            v,
            bias_ptr,
            g,
            st,
            dq,
            delta,
            dth_partial,
            *strides,
            n,
            m,
            h,
            d,
            dv_,
            scale,
            SPARSEMAX=mode == "sparsemax",
            CAUSAL=causal,
            **cfg,
        )
        if m > 0:
            launch(_bwd_dkdv_kernel)[_grid(m, cfg["BLOCK_N"], b * h)](
                q, k, v, bias_ptr, g, st, delta, dk, dv, *strides, n, m, h, d, dv_, scale, CAUSAL=causal, **cfg
            )
    if mode == "sparsemax":
        dth = torch.zeros_like(threshold)
    else:
        dth = dth_partial.sum(dim=(0, 2)).to(threshold.dtype)
    return dq, dk, dv, dth


def aot_specializations(
    b: int,
    h: int,
    n: int,
    m: int,
    d: int,
    dv: int | None = None,
    dtype: torch.dtype = torch.float16,
    *,
    causal: bool = True,
    with_bias: bool = False,
) -> list[AotSpec]:
    """Every kernel specialisation the launchers make on one problem (both modes, forward and backward), recorded
    on meta tensors without running anything: q (b, h, n, d), k (b, h, m, d), v (b, h, m, dv or d), a key padding
    bias when ``with_bias``. Call without TRITON_INTERPRET (the interpreter's block sizes differ)."""
    if interpreting():
        raise RuntimeError("aot_specializations needs the GPU configurations: unset TRITON_INTERPRET")

    def meta(*shape, dt=dtype):
        return torch.empty(shape, device="meta", dtype=dt)

    q, k, v, th = meta(b, h, n, d), meta(b, h, m, d), meta(b, h, m, dv or d), meta(h, dt=torch.float32)
    bias = meta(b, 1, 1, m, dt=torch.float32).expand(b, h, n, m) if with_bias else None

    def run():
        for mode in ("sparsemax", "shrink"):
            out, stats = sparse_attention_fwd(q, k, v, th, bias, mode, causal, d**-0.5)
            sparse_attention_bwd(torch.empty_like(out), q, k, v, th, bias, stats, mode, causal, d**-0.5)

    return record_launches(run)
