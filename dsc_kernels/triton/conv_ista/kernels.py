"""The conv-ISTA kernels: the fused tile forward (`_conv_ista_fwd_kernel` per iteration, `_conv_ista_fwd_all_kernel`
all iterations in one launch), the per-convolution kernels of the two-pass forward and the backward (synthesis,
analysis, each with its epilogues) and the weight gradient. The forward's math and strategies are in forward.py's
header, the VJP and what each kernel does of it in backward.py's; the tiles they are built from in tiles.py.

Layout: every signal- and code-sized tensor a kernel touches is channels last ((B, H, W, C) in memory; the launchers
convert with `_nhwc`; the one exception is x in the two-pass synthesis's residual epilogue, read channels first once
per element rather than copied), so a gathered tile's channels are contiguous: one 16-byte cp.async, one address and
one mask move 4 of them, and stores are vectorised alike. z leaves contiguous; the saved iterates stay channels last
inside a tensor of the contract's shape (`saved_iterates` reads them back).

Where the time goes (sm_90 SASS of the AOT-compiled kernels, specialised as the JIT specialises a launch:
cuobjdump; no GPU timing of this yet). Instruction issue, not the tensor cores or memory, bounds these kernels: the
gathers' address and mask arithmetic runs on the integer pipes. Channels first, each gathered fp32 element cost a
4-byte cp.async plus ~12 integer instructions, ~500-630 per 4 HGMMAs in every main loop (run 1's kernels: 0.14-0.22x
eager cuDNN). Channels last, with conv_config's tiles, the two-pass loops on deep-layer issue 426 (synthesis) and
468 (analysis) instructions per 8 HGMMAs: 152 and 275 MACs per issued warp instruction, where the tile forward's
halo dots (64 x 32 x 16, over a halo 1.4-2.4x the output) get 4-8x fewer; hence two-pass for many channels. The
weight gradient gets 117: its tf32 dots want both operands contiguous along positions, which neither layout
gives, so one tile is transposed through registers. Counting issued instructions (loop size x trips x warps),
scaled by how far run 1's tile forward sat from its own count, predicts about 2-4x eager cuDNN for the two-pass
forward on deep-layer and small-map (the TF32 tensor cores' floor is about 8x), and about 2x for deep-layer's
training step. Predictions, to be timed (bench/gpu_tune.py, group conv-strategy).
"""

import triton
import triton.language as tl

from ..grid import block_and_index
from .tiles import _analysis_tile, _dot, _flat_taps, _momentum_and_shrink, _synth_tile, _tf32


@triton.jit
def _ista_tile(
    x_ptr,
    z_ptr,
    z_off,
    zp_ptr,
    zp_off,
    out_ptr,
    out_off,
    w_ptr,
    we_ptr,
    lam_ptr,
    step_ptr,
    scratch_ptr,
    scratch_base,
    k,
    beta,
    b,
    t,
    C_code,
    C_sig,
    H,
    W,
    Hz,
    Wz,
    tiles_w,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    TH: tl.constexpr,
    TW: tl.constexpr,
    R_CHUNK: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_CI: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TAP_SYN: tl.constexpr,
    TAP_ANA: tl.constexpr,
    NONNEG: tl.constexpr,
    FISTA: tl.constexpr,
    IN_PREC: tl.constexpr,
):
    # One iteration on code tile t of image b: z_{k+1} = S(y_k + step_k E(x - D y_k)) for that tile.
    RH: tl.constexpr = (TH - 1) * SH + KH
    RW: tl.constexpr = (TW - 1) * SW + KW
    oh0 = (t // tiles_w) * TH
    ow0 = (t % tiles_w) * TW
    h0 = oh0 * SH - PH
    w0 = ow0 * SW - PW
    offs_ci = tl.arange(0, BLOCK_CI)
    offs_c = tl.arange(0, BLOCK_C)
    # The slab may still be read by other threads for the previous tile, and the codes this tile's synthesis
    # gathers may have just been written by other threads (single-launch kernel).
    tl.debug_barrier()

    # Phase 1: residual on the halo; positions outside the image hold 0 (the analysis conv's zero padding).
    for q0 in range(0, RH * RW, R_CHUNK):
        q = q0 + tl.arange(0, R_CHUNK)
        qin = q < RH * RW
        h = h0 + q // RW
        w = w0 + q % RW
        inside = qin & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        for ci0 in range(0, C_sig, BLOCK_CI):
            ci = ci0 + offs_ci
            cim = ci < C_sig
            m = inside[:, None] & cim[None, :]
            xv = tl.load(x_ptr + (((b * H + h) * W + w) * C_sig)[:, None] + ci[None, :], mask=m, other=0.0).to(
                tl.float32
            )
            dy = _synth_tile(
                tl.zeros((R_CHUNK, BLOCK_CI), tl.float32),
                z_ptr,
                z_off,
                zp_ptr,
                zp_off,
                beta,
                w_ptr,
                b,
                h,
                w,
                inside,
                ci,
                cim,
                C_code,
                C_sig,
                Hz,
                Wz,
                SH,
                SW,
                PH,
                PW,
                KH,
                KW,
                FISTA,
                TAP_SYN,
                BLOCK_K,
                IN_PREC,
            )
            tl.store(
                scratch_ptr + scratch_base + (q * C_sig)[:, None] + ci[None, :],
                tl.where(m, xv - dy, 0.0),
                mask=qin[:, None] & cim[None, :],
            )
    # The slab is written and read by different threads of this program.
    tl.debug_barrier()

    # Phase 2: analysis conv from the slab, gradient step, threshold.
    p = tl.arange(0, TH * TW)
    lh = p // TW
    lw = p % TW
    oh = oh0 + lh
    ow = ow0 + lw
    pm = (oh < Hz) & (ow < Wz)
    step_k = tl.load(step_ptr + k).to(tl.float32)
    for c0 in range(0, C_code, BLOCK_C):
        c = c0 + offs_c
        cm = c < C_code
        acc = _analysis_tile(
            tl.zeros((TH * TW, BLOCK_C), tl.float32),
            scratch_ptr,
            scratch_base,
            RW * C_sig,
            C_sig,
            0,
            0,
            RH,
            RW,
            lh,
            lw,
            pm,
            we_ptr,
            c,
            cm,
            C_code,
            C_sig,
            SH,
            SW,
            KH,
            KW,
            TAP_ANA,
            BLOCK_K,
            IN_PREC,
        )
        off = (((b * Hz + oh) * Wz + ow) * C_code)[:, None] + c[None, :]
        lam = tl.load(lam_ptr + k * C_code + c, mask=cm, other=0.0).to(tl.float32)
        _momentum_and_shrink(
            acc,
            z_ptr,
            z_off,
            zp_ptr,
            zp_off,
            out_ptr,
            out_off,
            off,
            pm[:, None] & cm[None, :],
            beta,
            step_k,
            lam,
            NONNEG,
            FISTA,
        )


@triton.jit
def _conv_ista_fwd_kernel(
    x_ptr,
    z_ptr,
    z_off,
    zp_ptr,
    zp_off,
    out_ptr,
    out_off,
    w_ptr,
    we_ptr,
    lam_ptr,
    step_ptr,
    scratch_ptr,
    k,
    beta,
    C_code,
    C_sig,
    H,
    W,
    Hz,
    Wz,
    tiles_w,
    tiles_per_img,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    TH: tl.constexpr,
    TW: tl.constexpr,
    R_CHUNK: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_CI: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TAP_SYN: tl.constexpr,
    TAP_ANA: tl.constexpr,
    NONNEG: tl.constexpr,
    FISTA: tl.constexpr,
    IN_PREC: tl.constexpr,
):
    # Iteration k; one program per (image, code tile).
    pid = tl.program_id(0)
    scratch_base = pid * (C_sig * ((TH - 1) * SH + KH) * ((TW - 1) * SW + KW))
    _ista_tile(
        x_ptr,
        z_ptr,
        z_off,
        zp_ptr,
        zp_off,
        out_ptr,
        out_off,
        w_ptr,
        we_ptr,
        lam_ptr,
        step_ptr,
        scratch_ptr,
        scratch_base,
        k,
        beta,
        pid // tiles_per_img,
        pid % tiles_per_img,
        C_code,
        C_sig,
        H,
        W,
        Hz,
        Wz,
        tiles_w,
        SH,
        SW,
        PH,
        PW,
        KH,
        KW,
        TH,
        TW,
        R_CHUNK,
        BLOCK_C,
        BLOCK_CI,
        BLOCK_K,
        TAP_SYN,
        TAP_ANA,
        NONNEG,
        FISTA,
        IN_PREC,
    )


@triton.jit
def _conv_ista_fwd_all_kernel(
    x_ptr,
    buf_ptr,
    w_ptr,
    we_ptr,
    lam_ptr,
    step_ptr,
    beta_ptr,
    scratch_ptr,
    n_iters,
    ring,
    slot,
    C_code,
    C_sig,
    H,
    W,
    Hz,
    Wz,
    tiles_w,
    tiles_per_img,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    TH: tl.constexpr,
    TW: tl.constexpr,
    R_CHUNK: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_CI: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TAP_SYN: tl.constexpr,
    TAP_ANA: tl.constexpr,
    NONNEG: tl.constexpr,
    FISTA: tl.constexpr,
    IN_PREC: tl.constexpr,
):
    # All n_iters iterations in one launch, one program per image: an image's iteration k+1 depends only on its
    # own iteration k, so a CTA barrier (inside _ista_tile) replaces the kernel boundary. z_j lives in slot
    # (j - 1) mod ring of buf (ring = n + 1 keeps every iterate, a replay ring only the last two or three; see
    # _slot and _replay_ring).
    b = tl.program_id(0)
    scratch_base = b * (C_sig * ((TH - 1) * SH + KH) * ((TW - 1) * SW + KW))
    for k in range(n_iters):
        beta = tl.load(beta_ptr + k)
        cur = ((k + ring - 1) % ring) * slot
        # ISTA has no momentum: its "previous iterate" is z_k itself, so a 2-slot ring never reads the slot it writes.
        prev = ((tl.maximum(k - 1, 0) + ring - 1) % ring) * slot if FISTA else cur
        nxt = (k % ring) * slot
        for t in range(tiles_per_img):
            _ista_tile(
                x_ptr,
                buf_ptr,
                cur,
                buf_ptr,
                prev,
                buf_ptr,
                nxt,
                w_ptr,
                we_ptr,
                lam_ptr,
                step_ptr,
                scratch_ptr,
                scratch_base,
                k,
                beta,
                b,
                t,
                C_code,
                C_sig,
                H,
                W,
                Hz,
                Wz,
                tiles_w,
                SH,
                SW,
                PH,
                PW,
                KH,
                KW,
                TH,
                TW,
                R_CHUNK,
                BLOCK_C,
                BLOCK_CI,
                BLOCK_K,
                TAP_SYN,
                TAP_ANA,
                NONNEG,
                FISTA,
                IN_PREC,
            )


@triton.jit
def _conv_synth_kernel(
    sig_ptr,
    code_ptr,
    code_off,
    prev_ptr,
    prev_off,
    beta,
    w_ptr,
    out_ptr,
    grad_x_ptr,
    dot_ptr,
    step_ptr,
    k,
    C_code,
    C_sig,
    H,
    W,
    Hz,
    Wz,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_CI: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TAP_MAJOR: tl.constexpr,
    EPILOGUE: tl.constexpr,
    FISTA: tl.constexpr,
    IN_PREC: tl.constexpr,
    SIG_NCHW: tl.constexpr,
):
    # acc = D y on a tile of signal positions, y = code (FISTA: code + beta (code - prev)); positions flattened
    # over H*W so loads run along W. Two epilogues:
    #   "residual": out = sig - acc, sig being x: r_k = x - D y_k, the first half of a two-pass forward iteration
    #     and the backward's residual;
    #   "vjp": out = acc (v = E^T gu when w is the encoder), and what the backward needs of v besides, while the
    #     tile is in registers: grad_x += step_k v, and this program's share of <v, r_k> (sig being r_k) in
    #     dot[program] (the launcher sums the shares in a fixed order). out may be sig itself (v over r_k).
    # sig is channels last like out, or with SIG_NCHW channels first (x as the caller passed it: read once per
    # element, it is not worth a channels-last copy of x, a code-sized buffer in a training step).
    pid_p, b = block_and_index(H * W, BLOCK_P)
    ci = tl.program_id(1) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    cim = ci < C_sig
    q = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    qin = q < H * W
    h = q // W
    w = q % W
    acc = _synth_tile(
        tl.zeros((BLOCK_P, BLOCK_CI), tl.float32),
        code_ptr,
        code_off,
        prev_ptr,
        prev_off,
        beta,
        w_ptr,
        b,
        h,
        w,
        qin,
        ci,
        cim,
        C_code,
        C_sig,
        Hz,
        Wz,
        SH,
        SW,
        PH,
        PW,
        KH,
        KW,
        FISTA,
        TAP_MAJOR,
        BLOCK_K,
        IN_PREC,
    )
    m = qin[:, None] & cim[None, :]
    off = ((b * (H * W) + q) * C_sig)[:, None] + ci[None, :]
    if SIG_NCHW:
        sig_off = (b * C_sig + ci)[None, :] * (H * W) + q[:, None]
    else:
        sig_off = off
    sig = tl.load(sig_ptr + sig_off, mask=m, other=0.0).to(tl.float32)
    if EPILOGUE == "residual":
        tl.store(out_ptr + off, sig - acc, mask=m)
    else:
        share = tl.sum(tl.sum(acc * sig, 1), 0)
        # The backward writes v over r_k (out = sig): v's store does not depend on r_k's load, and the two may be
        # laid out over the threads differently, so every thread's load must be done before any thread stores.
        tl.debug_barrier()
        tl.store(out_ptr + off, acc, mask=m)
        step_k = tl.load(step_ptr + k).to(tl.float32)
        gx = tl.load(grad_x_ptr + off, mask=m, other=0.0)
        tl.store(grad_x_ptr + off, gx + step_k * acc, mask=m)
        tl.store(dot_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), share)


@triton.jit
def _conv_analysis_kernel(
    base_ptr,
    base_off,
    prev_ptr,
    prev_off,
    beta,
    src_ptr,
    w_ptr,
    lam_ptr,
    step_ptr,
    k,
    out_ptr,
    out_off,
    zk_ptr,
    dth_ptr,
    C_code,
    C_sig,
    H,
    W,
    Hz,
    Wz,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TAP_MAJOR: tl.constexpr,
    EPILOGUE: tl.constexpr,
    NONNEG: tl.constexpr,
    FISTA: tl.constexpr,
    IN_PREC: tl.constexpr,
):
    # acc = conv2d(src, W) on a tile of code positions, then one of three epilogues:
    #   "shrink": out = S_{step_k lam_k}(y + step_k acc), y = base (FISTA: base + beta (base - prev)): the second
    #     half of a two-pass forward iteration, src being its residual x - D y;
    #   "vjp": the backward's step from dL/dz_{k+1} to dL/dz_k, src = v and W the synthesis dictionary (D^T v):
    #     dy = gu - step_k acc (base = gu = dL/dz_{k+1} on the support of z_{k+1}); FISTA splits dy between z_k
    #     and z_{k-1}: gz = (1 + beta_k) dy + prev, prev <- -beta_k dy (prev carries the part dL/dz_k got through
    #     y_{k+1}); then gu_k = gz [z_k != 0] goes to out (iteration k-1's gu) and this program's share of
    #     dth_{k-1} = -sum gu_k sign(z_k) (nonneg: -sum gu_k) to dth[program row] (summed by the launcher);
    #   "vjp-z0": the same for k = 0, whose gz is dL/dz_0 and goes to out whole.
    # out may be base and prev is updated in place: every element is read and written by one program only.
    pid_p, b = block_and_index(Hz * Wz, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C_code
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pin = p < Hz * Wz
    oh = p // Wz
    ow = p % Wz
    acc = _analysis_tile(
        tl.zeros((BLOCK_P, BLOCK_C), tl.float32),
        src_ptr,
        b * H * W * C_sig,
        W * C_sig,
        C_sig,
        -PH,
        -PW,
        H,
        W,
        oh,
        ow,
        pin,
        w_ptr,
        c,
        cm,
        C_code,
        C_sig,
        SH,
        SW,
        KH,
        KW,
        TAP_MAJOR,
        BLOCK_K,
        IN_PREC,
    )
    m = pin[:, None] & cm[None, :]
    off = ((b * (Hz * Wz) + p) * C_code)[:, None] + c[None, :]
    step_k = tl.load(step_ptr + k).to(tl.float32)
    if EPILOGUE == "shrink":
        lam = tl.load(lam_ptr + k * C_code + c, mask=cm, other=0.0).to(tl.float32)
        _momentum_and_shrink(
            acc, base_ptr, base_off, prev_ptr, prev_off, out_ptr, out_off, off, m, beta, step_k, lam, NONNEG, FISTA
        )
    else:
        dy = tl.load(base_ptr + base_off + off, mask=m, other=0.0).to(tl.float32) - step_k * acc
        gz = dy
        if FISTA:
            carried = tl.load(prev_ptr + prev_off + off, mask=m, other=0.0)
            # The store below does not depend on this load, so the compiler may give them different layouts,
            # i.e. another thread stores an element than the one that loaded it: the barrier makes every load of
            # the tile happen before any store. (gu, overwritten below, needs none: its store depends on its load.)
            tl.debug_barrier()
            tl.store(prev_ptr + prev_off + off, tl.where(beta != 0.0, -beta * dy, 0.0), mask=m)  # as _momentum
            gz = (1.0 + beta) * dy + carried
        if EPILOGUE == "vjp":
            zk = tl.load(zk_ptr + off, mask=m, other=0.0).to(tl.float32)
            gz = tl.where(zk != 0, gz, 0.0)  # NaN codes count as active, as in the reference's mask
            if NONNEG:
                share = gz
            else:
                # A select, not gz * sign(zk): a NaN code's share is 0 even where its gradient is NaN, as in
                # softshrink's threshold gradient (and the cpp backend).
                share = tl.where(zk > 0, gz, tl.where(zk < 0, -gz, 0.0))
            tl.store(dth_ptr + tl.program_id(0) * C_code + c, -tl.sum(share, 0), mask=cm)
        tl.store(out_ptr + out_off + off, gz, mask=m)


@triton.jit
def _conv_weight_grad_kernel(
    part_ptr,
    sig_ptr,
    code_ptr,
    B,
    C_code,
    C_sig,
    H,
    W,
    Hz,
    Wz,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TAP_MAJOR: tl.constexpr,
    IN_PREC: tl.constexpr,
):
    # part[split, c, (ci, i, j)] = sum over this split's (image, position block) work items of
    #     code[b, c, p] * sig[b, ci, oh SH - PH + i, ow SW - PW + j]
    # i.e. code^T @ im2col(sig) with the weight's memory order as columns. Splits write disjoint partials that the
    # launcher sums in a fixed order: deterministic without atomics, and enough programs to fill a GPU although
    # the weight itself is small. The columns of one program: TAP_MAJOR, BLOCK_K signal channels at one tap
    # (program_id(1) = tap * n_ci_blocks + ci block), whose gather offsets are 1-D over positions plus a channel
    # stride; else BLOCK_K consecutive (ci, i, j) columns, for 1-3 signal channels.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(2)
    n_split = tl.num_programs(2)
    KTOT = C_sig * KH * KW
    cm = c < C_code
    if TAP_MAJOR:
        n_cc = tl.cdiv(C_sig, BLOCK_K)
        t = tl.program_id(1) // n_cc
        ci = (tl.program_id(1) % n_cc) * BLOCK_K + tl.arange(0, BLOCK_K)
        km = ci < C_sig
        col = ci * (KH * KW) + t
        i = t // KW
        j = t % KW
    else:
        col = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        ci, i, j, km = _flat_taps(col, C_sig, KH, KW)
    n_pb = tl.cdiv(Hz * Wz, BLOCK_P)
    acc = tl.zeros((BLOCK_C, BLOCK_K), tl.float32)
    for item in range(split, B * n_pb, n_split):
        b = item // n_pb
        p = (item % n_pb) * BLOCK_P + tl.arange(0, BLOCK_P)
        pin = p < Hz * Wz
        oh = p // Wz
        ow = p % Wz
        if TAP_MAJOR:
            hh = oh * SH - PH + i
            ww = ow * SW - PW + j
            ok = pin & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            sg = tl.load(
                sig_ptr + (((b * H + hh) * W + ww) * C_sig)[:, None] + ci[None, :],
                mask=ok[:, None] & km[None, :],
                other=0.0,
            ).to(tl.float32)
        else:
            hh = (oh * SH - PH)[:, None] + i[None, :]
            ww = (ow * SW - PW)[:, None] + j[None, :]
            m = pin[:, None] & km[None, :] & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            sg = tl.load(sig_ptr + ((b * H + hh) * W + ww) * C_sig + ci[None, :], mask=m, other=0.0).to(tl.float32)
        cd = tl.load(
            code_ptr + ((b * (Hz * Wz) + p) * C_code)[:, None] + c[None, :], mask=pin[:, None] & cm[None, :], other=0.0
        ).to(tl.float32)
        acc = _dot(tl.trans(_tf32(cd, IN_PREC)), _tf32(sg, IN_PREC), acc, IN_PREC)
    tl.store(part_ptr + (split * C_code + c[:, None]) * KTOT + col[None, :], acc, mask=cm[:, None] & km[None, :])
