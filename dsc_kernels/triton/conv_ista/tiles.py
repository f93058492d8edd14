"""The @triton.jit tile helpers the kernels (kernels.py) inline: D y and E r (forward.py's header) on a tile, as
implicit GEMMs, and the ISTA step's epilogue.

Every convolution is an implicit GEMM on tl.dot with the im2col tile gathered on the fly, its reduction in one
of two orders (_synth_tile): tap-major (one tap at a time, BLOCK_K channels; the launchers pass the dictionaries
in tap-major layouts) once the reduced channels number 16 or more, else (channel, tap) flattened, which keeps the
tensor cores fed with 1-3 channels.
"""

import triton
import triton.language as tl


@triton.jit
def _tf32(x, IN_PREC: tl.constexpr):
    # An fp32 operand rounded to TF32, to nearest with ties away from zero (cvt.rna.tf32.f32, what cuBLAS and cuDNN
    # do). Without it Triton hands the fp32 bits to the tensor cores, which drop the low 13 mantissa bits: a
    # truncation, biased toward zero, whose bias the recurrence accumulates over the iterations (on an H200 the
    # TF32 forward error of csc-gray was 2.6x cuDNN's; Triton's tl.dot documentation says to round explicitly).
    # Adding half a TF32 ulp to the magnitude bits and clearing the 13 dropped bits rounds; a carry into the
    # exponent is the correct round-up (to inf past the largest TF32 value) and inf keeps its bits. NaN stays as
    # it is: its mantissa could carry into the sign. Half-precision inputs are exact in TF32 and unchanged.
    # Applied to operands formed in the kernel (codes, residuals, signals); the dictionaries are rounded once by
    # the launchers (_dot_weights, the same bits), which keeps elementwise work off the weight tiles: on an H200
    # rounding every operand in the kernel made the forward 1.35-1.5x slower.
    # IN_PREC: "ieee" (no rounding, IEEE dots), "tf32" (the bit arithmetic, what the interpreter runs) or
    # "tf32-rna" (compiled kernels: the PTX conversion itself; on sm_90 the two-pass loops come out the same size
    # either way and the weight-gradient loop 15% smaller). tests/test_triton_tf32.py checks both against an exact
    # rounding.
    if IN_PREC == "tf32":
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
        x = tl.where(x == x, rounded, x)
    if IN_PREC == "tf32-rna":
        # The conversion writes a .b32 register, moved to an .f32 one (as CUDA's own __float_to_tf32 does). ptxas
        # compiles it to "add 0x1000 unless |x| is inf or NaN, then clear the 13 low bits": the bit arithmetic's
        # result for every number and for the NaNs arithmetic produces; a NaN whose payload sits only in those 13
        # bits (a hand-made signalling NaN) becomes inf, as in cuDNN's and cuBLAS's own TF32 rounding.
        x = tl.inline_asm_elementwise(
            "{ .reg .b32 t; cvt.rna.tf32.f32 t, $1; mov.b32 $0, t; }",
            "=f,f",
            [x],
            dtype=tl.float32,
            is_pure=True,
            pack=1,
        )
    return x


@triton.jit
def _dot(a, b, acc, IN_PREC: tl.constexpr):
    # acc + a @ b for operands already as the tensor cores should read them (_tf32 or the launchers' rounding).
    return tl.dot(a, b, acc, input_precision="ieee" if IN_PREC == "ieee" else "tf32")


@triton.jit
def _momentum(y, zp, beta):
    # FISTA's y = z + beta (z - z_prev), and z itself where beta = 0 (its first two iterations), as the reference
    # has it: 0 (z - z_prev) would make a code that is infinite in both iterates NaN.
    return tl.where(beta != 0.0, y + beta * (y - zp), y)


@triton.jit
def _flat_taps(kk, channels, KH: tl.constexpr, KW: tl.constexpr):
    # The flattened reduction index kk over (channel, tap row, tap column), the weight's own memory order, split into
    # those three, and whether it is in range.
    return kk // (KH * KW), (kk // KW) % KH, kk % KW, kk < channels * KH * KW


@triton.jit
def _tap_weight_tile(w_ptr, t, rows, row_mask, n_rows, cols, col_mask, n_cols):
    # w[t, rows, cols] of a tap-major dictionary (kh * kw, n_rows, n_cols) in fp32, zero outside the masks: the
    # B operand of a tap-major reduction (rows: the reduced channels, cols: the output channels).
    return tl.load(
        w_ptr + (t * n_rows + rows[:, None]) * n_cols + cols[None, :],
        mask=row_mask[:, None] & col_mask[None, :],
        other=0.0,
    ).to(tl.float32)


@triton.jit
def _synth_tile(
    acc,
    code_ptr,
    code_off,
    prev_ptr,
    prev_off,
    beta,
    w_ptr,
    b,
    h,
    w,
    valid,
    ci,
    ci_mask,
    C_code,
    C_sig,
    Hz,
    Wz,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    FISTA: tl.constexpr,
    TAP_MAJOR: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IN_PREC: tl.constexpr,
):
    # acc[q, ci] += (D y)[b, ci, h[q], w[q]] as an implicit GEMM, the im2col tile gathered on the fly: a code
    # position (hz, wz) reaches signal row h through tap a iff h + PH - a = SH hz. Two orders of the reduction:
    #   TAP_MAJOR: one tap at a time, BLOCK_K code channels per slice; the weight in tap-major layout
    #     (kh, kw, C_code, C_sig). The tap's index arithmetic is 1-D over positions, and the slice's channels are
    #     contiguous (channels last): one address and one mask per 4 of them. Needs C_code >= 16 to fill K.
    #   else: (c, a, bb) flattened in the weight's own (C_code, C_sig, kh, kw) order, so that 1-3 channels still
    #     fill K (csc-gray has C_sig = 1), at the price of 2-D index arithmetic on every gathered element: in the
    #     sm_90 SASS the tile loop issued ~500 instructions per 4 HGMMAs, ~15x the tensor cores' time.
    if TAP_MAJOR:
        n_cc = tl.cdiv(C_code, BLOCK_K)
        for it in range(KH * KW * n_cc):
            t = it // n_cc
            c = (it % n_cc) * BLOCK_K + tl.arange(0, BLOCK_K)
            km = c < C_code
            hn = h + PH - t // KW
            wn = w + PW - t % KW
            hz = hn // SH
            wz = wn // SW
            ok = valid & (hn >= 0) & (wn >= 0) & (hn == hz * SH) & (wn == wz * SW) & (hz < Hz) & (wz < Wz)
            m = ok[:, None] & km[None, :]
            off = (((b * Hz + hz) * Wz + wz) * C_code)[:, None] + c[None, :]
            y = tl.load(code_ptr + code_off + off, mask=m, other=0.0).to(tl.float32)
            if FISTA:
                zp = tl.load(prev_ptr + prev_off + off, mask=m, other=0.0).to(tl.float32)
                y = _momentum(y, zp, beta)
            wt = _tap_weight_tile(w_ptr, t, c, km, C_code, ci, ci_mask, C_sig)
            acc = _dot(_tf32(y, IN_PREC), wt, acc, IN_PREC)  # wt: rounded by the launcher
    else:
        KTOT = C_code * KH * KW
        for k0 in range(0, KTOT, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            c, a, bb, km = _flat_taps(kk, C_code, KH, KW)
            hn = h[:, None] + PH - a[None, :]
            wn = w[:, None] + PW - bb[None, :]
            hz = hn // SH
            wz = wn // SW
            m = (
                valid[:, None]
                & km[None, :]
                & (hn >= 0)
                & (wn >= 0)
                & (hn == hz * SH)
                & (wn == wz * SW)
                & (hz < Hz)
                & (wz < Wz)
            )
            off = ((b * Hz + hz) * Wz + wz) * C_code + c[None, :]
            y = tl.load(code_ptr + code_off + off, mask=m, other=0.0).to(tl.float32)
            if FISTA:
                zp = tl.load(prev_ptr + prev_off + off, mask=m, other=0.0).to(tl.float32)
                y = _momentum(y, zp, beta)
            wt = tl.load(
                w_ptr + (c[:, None] * C_sig + ci[None, :]) * (KH * KW) + (a * KW + bb)[:, None],
                mask=km[:, None] & ci_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            acc = _dot(_tf32(y, IN_PREC), wt, acc, IN_PREC)  # wt: rounded by the launcher
    return acc


@triton.jit
def _analysis_tile(
    acc,
    src_ptr,
    src_base,
    row_stride,
    col_stride,
    row0,
    col0,
    rows,
    cols,
    oh,
    ow,
    valid,
    w_ptr,
    c,
    c_mask,
    C_code,
    C_sig,
    SH: tl.constexpr,
    SW: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    TAP_MAJOR: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IN_PREC: tl.constexpr,
):
    # acc[p, c] += sum_{ci, i, j} W[c, ci, i, j] src[ci, row0 + oh SH + i, col0 + ow SW + j] (zero outside
    # [0, rows) x [0, cols)): implicit GEMM [positions x (ci, i, j)] @ [(ci, i, j) x C], im2col gathered on the fly.
    # The two reduction orders of _synth_tile; TAP_MAJOR reads the weight as (kh, kw, C_sig, C_code).
    if TAP_MAJOR:
        n_cc = tl.cdiv(C_sig, BLOCK_K)
        for it in range(KH * KW * n_cc):
            t = it // n_cc
            ci = (it % n_cc) * BLOCK_K + tl.arange(0, BLOCK_K)
            km = ci < C_sig
            hh = row0 + oh * SH + t // KW
            ww = col0 + ow * SW + t % KW
            ok = valid & (hh >= 0) & (hh < rows) & (ww >= 0) & (ww < cols)
            r = tl.load(
                src_ptr + src_base + ci[None, :] + (hh * row_stride + ww * col_stride)[:, None],
                mask=ok[:, None] & km[None, :],
                other=0.0,
            ).to(tl.float32)
            wt = _tap_weight_tile(w_ptr, t, ci, km, C_sig, c, c_mask, C_code)
            acc = _dot(_tf32(r, IN_PREC), wt, acc, IN_PREC)  # wt: rounded by the launcher
    else:
        KTOT = C_sig * KH * KW
        for k0 in range(0, KTOT, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            ci, i, j, km = _flat_taps(kk, C_sig, KH, KW)
            hh = (row0 + oh * SH)[:, None] + i[None, :]
            ww = (col0 + ow * SW)[:, None] + j[None, :]
            m = valid[:, None] & km[None, :] & (hh >= 0) & (hh < rows) & (ww >= 0) & (ww < cols)
            r = tl.load(src_ptr + src_base + ci[None, :] + hh * row_stride + ww * col_stride, mask=m, other=0.0).to(
                tl.float32
            )
            wt = tl.load(w_ptr + c[None, :] * KTOT + kk[:, None], mask=km[:, None] & c_mask[None, :], other=0.0).to(
                tl.float32
            )
            acc = _dot(_tf32(r, IN_PREC), wt, acc, IN_PREC)  # wt: rounded by the launcher
    return acc


@triton.jit
def _momentum_and_shrink(
    acc,
    z_ptr,
    z_off,
    zp_ptr,
    zp_off,
    out_ptr,
    out_off,
    off,
    m,
    beta,
    step_k,
    lam,
    NONNEG: tl.constexpr,
    FISTA: tl.constexpr,
):
    # The ISTA step's epilogue on a tile of codes: y = z + beta (z - z_prev), u = y + step_k acc (acc = E(x - D y)),
    # out = S_{step_k lam}(u). `u == u` keeps NaN flowing through like softshrink/relu do.
    y = tl.load(z_ptr + z_off + off, mask=m, other=0.0).to(tl.float32)
    if FISTA:
        zp = tl.load(zp_ptr + zp_off + off, mask=m, other=0.0).to(tl.float32)
        y = _momentum(y, zp, beta)
    u = y + step_k * acc
    th = step_k * lam[None, :]
    if NONNEG:
        zn = tl.where(u > th, u - th, tl.where(u == u, 0.0, u))
    else:
        zn = tl.where(tl.abs(u) > th, u - tl.where(u > 0, th, -th), tl.where(u == u, 0.0, u))
    tl.store(out_ptr + out_off + off, zn.to(out_ptr.dtype.element_ty), mask=m)
