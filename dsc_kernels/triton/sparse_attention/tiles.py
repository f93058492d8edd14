"""The @triton.jit helpers the sparse-attention kernels (kernels.py, whose header has the math) inline: row loads,
score tiles and their flags, and the sparsemax forward's sweeps over the keys (`_set_sweep`, `_output_sweep`)
and its finish from the candidate slots (`_resolve`).
"""

from __future__ import annotations

import triton
import triton.language as tl


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
def _max(a, b):
    """tl.maximum of floats with NaN propagated. tl.maximum's default (PropagateNan.NONE) compiles to max.f32,
    which returns the other operand where one is NaN, while the interpreter's numpy (np.maximum) returns NaN: a NaN
    the interpreter tests see propagate would vanish on a GPU. ALL computes on a GPU what the interpreter tests."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


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
        return tl.minimum(N_K, start_m + BLOCK_M)  # ints
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
        t = ((tot - 1.0) / _max(cnt, 1.0).to(tl.float64)).to(tl.float32)
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
