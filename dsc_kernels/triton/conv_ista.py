"""Fused Triton kernels for convolutional ISTA / FISTA (backend "triton"). 2-D only: 1-D arrives as H = 1.

(Long, in one file on purpose: the forward strategies and the backward are one recurrence built from the same
tile helpers (`_synth_tile`, `_analysis_tile`, `_momentum_and_shrink`), and each launcher sits beside its kernel;
split, a reader would follow one iteration across files.)

Math (docs/design.md §2, §7.1). Shapes: x (B, Cs, H, W), weight W and encoder weight W_E (C, Cs, kh, kw),
codes (B, C, Hz, Wz), lam (n, C), step (n,) (float32 for half x).
    D z = conv_transpose2d(z, W, s, p, output_padding such that D z has x's size)     (synthesis)
    E r = conv2d(r, W_E, s, p)                                                          (analysis; W_E = W if tied)
    t_0 = 1, t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2,  beta_0 = 0,  beta_k = (t_{k-1} - 1) / t_k   (ISTA: beta_k = 0)
    y_k     = z_k + beta_k (z_k - z_{k-1})
    u_k     = y_k + step_k E(x - D y_k)
    z_{k+1} = S_{step_k lam_k[c]}(u_k)          S_t(u) = sign(u) max(|u| - t, 0); nonneg: max(u - t, 0)

Forward (docs/design.md §5): three strategies, chosen per problem by forward_strategy (pinned with `strategy`).
  - "two-pass" (both convolutions reduce over >= 16 channels): two implicit-GEMM kernels per iteration.
    `_conv_synth_kernel` writes the residual r = x - D y_k (FISTA's momentum formed as the codes are gathered) to
    one fp32 signal-sized buffer; `_conv_analysis_kernel` runs E r with y_k + step_k (.) and the threshold as its
    epilogue. No halo is recomputed and the tiles are 128 positions x up to 128 channels.
  - "tiles": one fused kernel per iteration, one program per (image, TH x TW tile of code positions), all code
    channels (`_ista_tile`): form the residual on the signal halo the tile's analysis window covers
    ((TH-1) s + kh rows, (TW-1) s + kw columns), park it in a per-program scratch slab (a few KiB, L1/L2
    resident, reused), run the analysis conv from the slab, add y_k, threshold and store z_{k+1}. D y and r never
    exist as full tensors. The slab is the one departure from "registers only": Triton cannot shift a register
    tile, and recomputing the residual for each of the kh*kw analysis taps would multiply the synthesis work by
    kh*kw. `_conv_ista_fwd_kernel`.
  - "single-launch": the tile kernel's iterations all in one launch, one program per image walking its tiles,
    with a CTA barrier between iterations (`_conv_ista_fwd_all_kernel`); for codes of at most
    SINGLE_LAUNCH_MAX_CODE_BYTES per image when two-pass does not apply.
Every convolution is an implicit GEMM on tl.dot with the im2col tile gathered on the fly, its reduction in one
of two orders (_synth_tile): tap-major (one tap at a time, BLOCK_K channels; the launchers pass the dictionaries
in tap-major layouts) once the reduced channels number 16 or more, else (channel, tap) flattened, which keeps the
tensor cores fed with 1-3 channels.

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

Saved for backward: z_1 .. z_{n-1} in the input dtype (`saved`), or nothing in recompute mode, where the backward
replays the forward from z_0 with the same kernels (bit-identical iterates, hence identical supports) into a ring
of two code buffers (FISTA: three, its momentum reads z_{k-1}): O(n^2) iterations of compute, memory independent
of n.

VJP of iteration k (g = dL/dz_{k+1}, gu = g [z_{k+1} != 0]; the active set needs no stored mask):
    r_k   = x - D y_k,       v = E^T gu = conv_transpose2d(gu, W_E)
    dx   += step_k v
    dy    = gu - step_k D^T v                            (D^T = conv2d with W)
    dW_E += step_k corr(r_k, gu),   dW -= step_k corr(v, y_k)
           corr(a, c)[o, i, dh, dw] = sum_{b, oh, ow} c[b, o, oh, ow] a[b, i, oh s_h - p_h + dh, ow s_w - p_w + dw]
    dth   = -sum_{b, space} gu sign(z_{k+1})  (nonneg: -sum gu),   dlam_k = step_k dth
    dstep_k = <gu, E r_k> + <lam_k, dth>,  computed as <v, r_k> + <lam_k, dth> (no analysis conv needed)
    dz_k += (1 + beta_k) dy,   dz_{k-1} -= beta_k dy
The backward runs these per iteration with three conv kernels, the elementwise work in their epilogues:
  - `_conv_synth_kernel` writes r_k ("residual"), then v ("vjp") over r_k in place (after the weight gradient
    that reads r_k), adding step_k v to dx and writing each program's share of <v, r_k> while v is in registers;
  - `_conv_weight_grad_kernel` forms both weight gradients as split-K partials summed in a fixed order
    (deterministic, no atomics);
  - `_conv_analysis_kernel` ("vjp") forms dy and, in the same pass, FISTA's split of it between z_k and z_{k-1}
    (a carried code buffer), the next iteration's gu = dL/dz_k [z_k != 0] (over the current gu: one buffer) and
    that gu's shares of dth.
Only FISTA's y_k (two passes) and the small reductions of the shares stay torch ops; the first gu and dth (from
dL/dz_n) are formed once, an eighth of the batch at a time. Per iteration this replaced about ten code- and
signal-sized torch passes (mask, where, sign, product and sum for dth; dx's update and the <v, r_k> product; FISTA's
three), which on large batches move as many bytes as the convolutions do. Temporaries: one signal-sized fp32 buffer
for r_k and then v (also the replays' residual scratch) and gu (plus the carried buffer and y_k for FISTA, y_k in
the replay ring's free slot in fp32 recompute mode); bench/triton_memory.py counts a training step's peak. All
accumulation is fp32; gradients are cast to the input dtypes at the end.

Launchers only use torch ops and `launch(...)` (`torch.library.wrap_triton`, recordable for AOT compilation: see
triton/launch.py), so they can run inside a `torch.library.triton_op` and torch.compile can trace through them.
`aot_specializations` records the launches the launchers really make on a problem (meta tensors, no GPU).
"""

import contextlib
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._precision import conv_tf32_allowed, forward_tf32
from ..reference.conv import code_size, value_dtype
from ..reference.conv_ista import NO_BACKWARD, fista_momentum, signed_share
from .grid import MAX_GRID_YZ, block_and_index
from .launch import AotSpec, interpreting, launch, record_launches

__all__ = [
    "conv_ista_fwd",
    "conv_ista_bwd",
    "saved_iterates",
    "forward_strategy",
    "strategy",
    "KERNELS",
    "aot_specializations",
    "fwd_config",
]


# ----------------------------------------------------------------------------------------------------------------
# Tile helpers (inlined into the kernels)
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Configurations: keyed on channel counts and kernel size, never on H/W (so a new image size never changes code)
# ----------------------------------------------------------------------------------------------------------------


class FwdConfig(NamedTuple):
    TH: int  # code rows per program
    TW: int  # code columns per program
    R_CHUNK: int  # halo positions per residual GEMM tile
    BLOCK_C: int  # code channels per analysis GEMM tile (N)
    BLOCK_CI: int  # signal channels per synthesis GEMM tile (N)
    BLOCK_K: int  # reduction slice (channel x tap) of both GEMMs
    num_warps: int
    num_stages: int


class ConvConfig(NamedTuple):
    BLOCK_P: int  # positions per program (M of synthesis/analysis, K of the weight gradient)
    BLOCK_C: int
    BLOCK_CI: int
    BLOCK_K: int
    max_splits: int  # weight gradient: programs sharing one weight block, each writing its own partial
    num_warps: int
    num_stages: int


def _pow2_block(n: int, lo: int, hi: int) -> int:
    # tl.dot needs every dimension >= 16; channel counts below that are padded with masked lanes.
    return max(lo, min(hi, triton.next_power_of_2(n)))


def fwd_config(C_sig: int, C_code: int, kh: int, kw: int) -> FwdConfig:
    if interpreting():
        # The interpreter pays per program and per op, not per element: few large tiles. Test shapes taller than
        # 8 rows still span several tiles, which exercises the halo logic.
        return FwdConfig(1 if kh == 1 else 8, 64 if kh == 1 else 16, 256, 16, 16, 64, 4, 1)
    # Chosen from sm_80/sm_90 AOT compiles (cuobjdump -res-usage of the cubins): the largest tiles that spill no
    # registers on either. The gathered im2col tiles carry 2-D index arithmetic and a third pipeline stage of them
    # does not fit, hence num_stages=2. A 16x16 tile would cut the 7x7 halo overhead of the synthesis from
    # 14x22/8x16 = 2.4x to 1.9x but spills. On an H200 the fused forward ran at 0.14-0.22x eager cuDNN with this
    # configuration (bench/results/gpu-check-h200-2026-12-04*); bench/gpu_tune.py times the alternatives.
    block_c = _pow2_block(C_code, 16, 64)
    block_ci = _pow2_block(C_sig, 16, 32)
    if kh == 1:  # 1-D problems (H = 1 after reshaping) and other single-row kernels: a row tile.
        return FwdConfig(1, 128, 64, block_c, block_ci, 32, 8, 2)
    return FwdConfig(8, 16, 64, block_c, block_ci, 16, 8, 2)


def conv_config(C_sig: int, C_code: int, kh: int, kw: int) -> ConvConfig:
    """The per-convolution kernels' tiles: the backward and the two-pass forward."""
    if interpreting():
        return ConvConfig(256, 16, 16, 64, 2, 4, 1)
    # From the sm_80/sm_90 AOT compiles (SASS loop sizes, registers, shared memory; module header): channel tiles
    # up to 128 and 64-channel reduction slices give the most MACs per issued instruction (two-pass loops on
    # deep-layer: 152 and 275; weight gradient: 117) without spills. Two pipeline stages keep every kernel within
    # an A100's shared memory (the weight gradient needs 224 KiB with three). The 64-channel slice only where
    # both sides have 64 channels: fewer would run masked lanes, and the flattened weight gradient spills with it.
    block_k = 64 if min(C_sig, C_code) >= 64 else 32
    return ConvConfig(128, _pow2_block(C_code, 16, 128), _pow2_block(C_sig, 16, 128), block_k, 512, 8, 2)


# The forward's strategy (module header): "auto" chooses by the rule in forward_strategy; tests, the tune script
# and the sanitizer cases pin "two-pass", "single-launch" or "tiles" to exercise or time one.
FORWARD_STRATEGY = "auto"
# Reductions run tap-major (see _synth_tile) over a convolution whose reduced channels number at least this: then
# they fill a dot's K of 16 on their own.
TAP_MAJOR_MIN_CHANNELS = 16


def _tap_major(channels: int) -> bool:
    return channels >= TAP_MAJOR_MIN_CHANNELS


def _in_prec(dtype: torch.dtype) -> str:
    # Half inputs are exact in tf32, so tensor cores lose nothing on them (the fp32 residual and momentum formed
    # inside are rounded by _tf32); fp32 follows torch's cuDNN TF32 switch, the precision the eager convolutions we
    # replace run at. Compiled kernels round with the hardware conversion, the interpreter (no inline PTX) with
    # bit arithmetic (_tf32).
    if dtype == torch.float32 and not conv_tf32_allowed():  # cuDNN's switch, or a backward's forward's (_precision)
        return "ieee"
    return "tf32" if interpreting() else "tf32-rna"


def round_to_tf32(t: Tensor) -> Tensor:
    """An fp32 tensor rounded to TF32 on the host, the bits `_tf32` gives in a kernel (to nearest, ties away from
    zero; NaN kept)."""
    bits = (t.contiguous().view(torch.int32) + 0x1000) & -8192
    return torch.where(t.isnan(), t, bits.view(torch.float32))


def _dot_weights(weight: Tensor, encoder_weight: Tensor) -> tuple[Tensor, Tensor]:
    """The dictionaries as the convolution dots read them: fp32 ones rounded to TF32 when the dots run in TF32;
    half ones are exact in TF32 as they are."""
    if weight.dtype != torch.float32 or _in_prec(weight.dtype) == "ieee":
        return weight, encoder_weight
    w = round_to_tf32(weight)
    return w, (w if encoder_weight is weight else round_to_tf32(encoder_weight))


def _synth_weight(w: Tensor, tap_major: bool) -> Tensor:
    """The synthesis dots' layout of a dictionary (C_code, C_sig, kh, kw): tap-major (kh, kw, C_code, C_sig)."""
    return w.permute(2, 3, 0, 1).contiguous() if tap_major else w


def _analysis_weight(w: Tensor, tap_major: bool) -> Tensor:
    """The analysis dots' layout of a dictionary (C_code, C_sig, kh, kw): tap-major (kh, kw, C_sig, C_code)."""
    return w.permute(2, 3, 1, 0).contiguous() if tap_major else w


def _nhwc(t: Tensor) -> Tensor:
    """t: (B, C, H, W) in the kernels' memory layout, channels last ((B, H, W, C) contiguous), so that a gathered
    tile's channels are contiguous: itself when it already is, else a copy. The shape stays (B, C, H, W)."""
    if t.permute(0, 2, 3, 1).is_contiguous():
        return t
    return t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def _empty_nhwc(shape: Sequence[int], **kwargs) -> Tensor:
    """An uninitialised (B, C, H, W) tensor in the kernels' channels-last layout; with a leading ring dimension,
    (ring, B, C, H, W) stored as (ring, B, H, W, C)."""
    *lead, c, h, w = shape
    order = list(range(len(lead))) + [len(lead) + 2, len(lead), len(lead) + 1]
    return torch.empty((*lead, h, w, c), **kwargs).permute(*order)


def _fista_betas(n_iter: int, fista: bool) -> list[float]:
    return fista_momentum(n_iter) if fista else [0.0] * n_iter


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


class _Geom(NamedTuple):
    B: int
    C_sig: int
    H: int
    W: int
    C_code: int
    kh: int
    kw: int
    Hz: int
    Wz: int
    sh: int
    sw: int
    ph: int
    pw: int


def _geom(x, weight, z0, stride, padding, n_codes) -> _Geom:
    B, C_sig, H, W = x.shape
    C_code, _, kh, kw = weight.shape
    # Kernel index arithmetic is int32; n_codes covers the saved iterates, addressed as one buffer.
    if max(x.numel(), z0.numel() * n_codes) >= _MAX_INDEX:
        raise ValueError(
            f"the triton conv-ISTA kernels address at most 2**31 - 1 elements per buffer; got x "
            f"{tuple(x.shape)} and {n_codes} codes of {tuple(z0.shape)}: split the batch"
        )
    return _Geom(
        B,
        C_sig,
        H,
        W,
        C_code,
        kh,
        kw,
        z0.shape[2],
        z0.shape[3],
        int(stride[0]),
        int(stride[1]),
        int(padding[0]),
        int(padding[1]),
    )


# Between the strategies the fused kernels offer when the convolutions are too narrow for two-pass: run every
# iteration in one launch (one program per image) when an image's code is at most this large. Its working set then
# stays in L1/L2 between iterations, and n launches become one; larger codes need the per-iteration grid over
# tiles to fill the GPU. A guess until timed on a GPU: with fewer images than SMs the single launch leaves SMs
# idle, so the best limit also depends on the batch.
SINGLE_LAUNCH_MAX_CODE_BYTES = 256 * 1024


def forward_strategy(C_sig: int, C_code: int, code_bytes: int) -> str:
    """Two GEMM kernels per iteration when both convolutions reduce over enough channels to run tap-major (their
    tiles then need no halo, no slab and no 2-D index arithmetic); otherwise the fused tile kernels, whose
    flattened (channel, tap) reductions keep the tensor cores fed with 1-3 channels. code_bytes: one image's code.
    FORWARD_STRATEGY, when not "auto", decides instead."""
    if FORWARD_STRATEGY != "auto":
        return FORWARD_STRATEGY
    if _tap_major(C_sig) and _tap_major(C_code):
        return "two-pass"
    return "single-launch" if code_bytes <= SINGLE_LAUNCH_MAX_CODE_BYTES else "tiles"


def _replay_ring(fista: bool) -> int:
    """Slots of a ring that keeps only what the next iteration reads: z_k, and z_{k-1} for FISTA's momentum, plus
    the slot being written."""
    return 3 if fista else 2


def _code_zeros(x: Tensor, weight: Tensor, stride, padding) -> Tensor:
    """z0 = 0 as an expanded scalar of the code's shape (no code-sized memory), for z0s that are only copied into a
    ring slot (the forward, replays), never handed to a kernel."""
    sz = code_size(x.shape[2:], weight.shape[2:], stride, padding)
    return x.new_zeros(()).expand(x.shape[0], weight.shape[0], *sz)


def _slot(j: int, ring: int) -> int:
    """The ring slot of z_j: (j - 1) mod ring, so z_1.. z_{n-1} (the saved iterates) open the buffer and z_0 sits
    in the last slot."""
    return (j + ring - 1) % ring


class _Forward:
    """The forward iterations of one problem, as launched by the forward and replayed by the backward. Both paths
    keep z_j in slot _slot(j, ring) of a (ring, B, C, Hz, Wz) buffer, so a replay reproduces the forward bit for
    bit."""

    def __init__(self, x, weight, encoder_weight, lam, step, z0, g: _Geom, nonneg, fista, residual=None):
        self.lam, self.step, self.z0 = lam, step, z0
        self.weight, self.encoder_weight = _dot_weights(weight, encoder_weight)  # (C_code, C_sig, kh, kw) order
        self.g = g
        self.tap_syn, self.tap_ana = _tap_major(g.C_code), _tap_major(g.C_sig)
        self.synth_w = _synth_weight(self.weight, self.tap_syn)
        self.analysis_w = _analysis_weight(self.encoder_weight, self.tap_ana)
        self.strategy = forward_strategy(g.C_sig, g.C_code, z0[0].numel() * z0.element_size())
        # x: (B, C_sig, H, W) contiguous (_check_inputs). The two-pass synthesis reads it channels first; the tile
        # kernels gather it channels last.
        self.x = x if self.strategy == "two-pass" else _nhwc(x)
        self.betas = _fista_betas(step.shape[0], fista)
        self.dims = (g.C_code, g.C_sig, g.H, g.W, g.Hz, g.Wz)
        geometry = dict(SH=g.sh, SW=g.sw, PH=g.ph, PW=g.pw, KH=g.kh, KW=g.kw)
        flags = dict(FISTA=bool(fista), IN_PREC=_in_prec(x.dtype))
        if self.strategy == "two-pass":
            cfg = conv_config(g.C_sig, g.C_code, g.kh, g.kw)
            # The residual x - D y_k of the current iteration, read by the analysis kernel (`residual`: a signal-sized
            # fp32 channels-last buffer to use, as the backward lends its own r to its replays).
            if residual is None:
                residual = _empty_nhwc((g.B, g.C_sig, g.H, g.W), device=x.device, dtype=torch.float32)
            self.residual = residual
            common = dict(**geometry, **flags, BLOCK_P=cfg.BLOCK_P, BLOCK_K=cfg.BLOCK_K)
            common.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            self.synth_meta = dict(
                common, BLOCK_CI=cfg.BLOCK_CI, TAP_MAJOR=self.tap_syn, EPILOGUE="residual", SIG_NCHW=True
            )
            self.analysis_meta = dict(common, BLOCK_C=cfg.BLOCK_C, TAP_MAJOR=self.tap_ana, EPILOGUE="shrink")
            self.analysis_meta["NONNEG"] = bool(nonneg)
            self.synth_grid = (triton.cdiv(g.H * g.W, cfg.BLOCK_P) * g.B, triton.cdiv(g.C_sig, cfg.BLOCK_CI))
            self.analysis_grid = (triton.cdiv(g.Hz * g.Wz, cfg.BLOCK_P) * g.B, triton.cdiv(g.C_code, cfg.BLOCK_C))
            if max(self.synth_grid[0], self.analysis_grid[0]) >= _MAX_INDEX:
                raise ValueError(
                    f"the triton conv-ISTA forward needs 2**31 or more programs for {g.B} items: split the batch"
                )
            return
        cfg = fwd_config(g.C_sig, g.C_code, g.kh, g.kw)
        self.tiles_w = triton.cdiv(g.Wz, cfg.TW)
        self.tiles_per_img = triton.cdiv(g.Hz, cfg.TH) * self.tiles_w
        programs = g.B if self.strategy == "single-launch" else g.B * self.tiles_per_img
        rh, rw = (cfg.TH - 1) * g.sh + g.kh, (cfg.TW - 1) * g.sw + g.kw
        # The kernels index the residual slabs (one per program) in int32 too.
        if programs * g.C_sig * rh * rw >= _MAX_INDEX:
            raise ValueError(
                f"the triton conv-ISTA forward needs {programs} residual slabs of {g.C_sig} x {rh} x {rw} elements, "
                f"more than the 2**31 - 1 its kernels address: split the batch"
            )
        self.scratch = torch.empty(programs * g.C_sig * rh * rw, device=x.device, dtype=torch.float32)
        self.tile_meta = dict(
            **geometry,
            **flags,
            TH=cfg.TH,
            TW=cfg.TW,
            R_CHUNK=cfg.R_CHUNK,
            BLOCK_C=cfg.BLOCK_C,
            BLOCK_CI=cfg.BLOCK_CI,
            BLOCK_K=cfg.BLOCK_K,
            TAP_SYN=self.tap_syn,
            TAP_ANA=self.tap_ana,
            NONNEG=bool(nonneg),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )

    def run(self, n_iters, ring, last_out=None, out=None):
        """Iterations 0..n_iters-1 from z0; returns the ring buffer (`out` when given: a replay reuses the last
        one). With `last_out` (per-iteration paths only; channels last) z_{n_iters} goes there instead of into the
        ring. The ring is (ring, B, C, Hz, Wz) stored channels last."""
        shape = (ring,) + tuple(self.z0.shape)
        buf = _empty_nhwc(shape, device=self.z0.device, dtype=self.z0.dtype) if out is None else out
        buf.select(0, _slot(0, ring)).copy_(self.z0)
        slot = self.z0.numel()
        if self.strategy == "single-launch":
            betas = torch.tensor(self.betas, dtype=torch.float32, device=self.z0.device)
            launch(_conv_ista_fwd_all_kernel)[(self.g.B,)](
                self.x,
                buf,
                self.synth_w,
                self.analysis_w,
                self.lam,
                self.step,
                betas,
                self.scratch,
                n_iters,
                ring,
                slot,
                *self.dims,
                self.tiles_w,
                self.tiles_per_img,
                **self.tile_meta,
            )
            return buf
        for k in range(n_iters):
            last = k == n_iters - 1 and last_out is not None
            cur = _slot(k, ring) * slot
            # ISTA (beta = 0) reads no previous iterate: pointing at z_k keeps a 2-slot ring off the slot it writes.
            prev = _slot(max(k - 1, 0), ring) * slot if self.betas[k] != 0.0 else cur
            dest, dest_off = (last_out, 0) if last else (buf, _slot(k + 1, ring) * slot)
            if self.strategy == "two-pass":
                launch(_conv_synth_kernel)[self.synth_grid](
                    self.x,
                    buf,
                    cur,
                    buf,
                    prev,
                    self.betas[k],
                    self.synth_w,
                    self.residual,
                    self.residual,  # grad_x, dot, step, k: read by the backward's epilogue only
                    self.residual,
                    self.step,
                    k,
                    *self.dims,
                    **self.synth_meta,
                )
                launch(_conv_analysis_kernel)[self.analysis_grid](
                    buf,
                    cur,
                    buf,
                    prev,
                    self.betas[k],
                    self.residual,
                    self.analysis_w,
                    self.lam,
                    self.step,
                    k,
                    dest,
                    dest_off,
                    dest,  # z_k, dth: read by the backward's epilogues only
                    self.lam,
                    *self.dims,
                    **self.analysis_meta,
                )
                continue
            launch(_conv_ista_fwd_kernel)[(self.g.B * self.tiles_per_img,)](
                self.x,
                buf,
                cur,
                buf,
                prev,
                dest,
                dest_off,
                self.synth_w,
                self.analysis_w,
                self.lam,
                self.step,
                self.scratch,
                k,
                self.betas[k],
                *self.dims,
                self.tiles_w,
                self.tiles_per_img,
                **self.tile_meta,
            )
        return buf


# Kernel offsets are int32 (tl.arange and the i32 size arguments): no buffer may hold 2**31 elements or more.
_MAX_INDEX = 2**31
# The dtypes the kernels are compiled for (ops.table's row): fp64 has no tensor-core dot, integers no threshold.
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _tied(encoder_weight: Tensor) -> bool:
    """An empty (0,) encoder_weight stands for the dictionary itself (the fused-op contract)."""
    return encoder_weight.shape == (0,)


def _check_inputs(op, x, weight, encoder_weight, lam, step, z0, stride, padding):
    """The checks of the C++ ops (csrc/cpu/conv_ista/ops.cpp, check_inputs), done before any launch: the kernels
    index every tensor as a dense buffer of the shape the others imply (signals and codes channels last: the
    launchers convert them), so any other shape or dtype is read (or written) out of bounds. Shapes, dtypes and
    strides only: no device synchronisation. Returns the tensors made contiguous (a no-op for contiguous ones; an
    empty encoder_weight, tied, replaced by weight) and the stride, clamped like the C++ ops clamp it: every stride
    beyond the last window start gives the same single window, and a huge one would size the residual slabs by it."""
    tensors = dict(x=x, weight=weight, encoder_weight=encoder_weight, lam=lam, step=step, z0=z0)
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if x.dim() != 4 or weight.dim() != 4:
        raise RuntimeError(
            f"{op}: x and weight must be 4-D (2-D problems), got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if len(stride) != 2 or len(padding) != 2:
        raise RuntimeError(f"{op}: stride and padding need 2 entries, got {list(stride)} and {list(padding)}")
    (sh, sw), (ph, pw) = (int(s) for s in stride), (int(p) for p in padding)
    if sh < 1 or sw < 1 or ph < 0 or pw < 0:
        raise RuntimeError(f"{op}: stride must be >= 1 and padding >= 0, got {list(stride)} and {list(padding)}")
    B, C_sig, H, W = x.shape
    C_code, _, kh, kw = weight.shape
    if kh < 1 or kw < 1:
        raise RuntimeError(f"{op}: the kernel must have a non-zero size, got {tuple(weight.shape[2:])}")
    limit = _MAX_INDEX - 1
    if ph > (limit - H) // 2 or pw > (limit - W) // 2:
        raise RuntimeError(f"{op}: the padded signal must be at most 2^31 - 1 in every dimension")
    if H + 2 * ph < kh or W + 2 * pw < kw:
        raise RuntimeError(f"{op}: kernel larger than the padded signal")
    sh, sw = min(sh, H + 2 * ph - kh + 1), min(sw, W + 2 * pw - kw + 1)
    tied = _tied(encoder_weight)
    if weight.shape[1] != C_sig or not (tied or encoder_weight.shape == weight.shape):
        raise RuntimeError(
            f"{op}: weight/encoder_weight must be (C_code, C_sig, kh, kw) with C_sig = {C_sig} (encoder_weight "
            f"(0,): tied), got {tuple(weight.shape)} and {tuple(encoder_weight.shape)}"
        )
    if step.dim() != 1 or step.shape[0] < 1:
        raise RuntimeError(f"{op}: step must be (n_iter,) with n_iter >= 1, got {tuple(step.shape)}")
    n = step.shape[0]
    if tuple(lam.shape) != (n, C_code):
        raise RuntimeError(f"{op}: lam must be (n_iter, C_code) = {(n, C_code)}, got {tuple(lam.shape)}")
    hz, wz = code_size((H, W), (kh, kw), (sh, sw), (ph, pw))
    if z0.numel() != 0 and tuple(z0.shape) != (B, C_code, hz, wz):
        raise RuntimeError(
            f"{op}: z0 must be (B, C_code, Hz, Wz) = {(B, C_code, hz, wz)} or empty (zeros), got {tuple(z0.shape)}"
        )
    for name, t in tensors.items():
        # lam and step in float32 for half x (value_dtype): the kernels read them as float32 either way, and a
        # float16 step 1/L is often subnormal
        dtype = value_dtype(x.dtype) if name in ("lam", "step") else x.dtype
        if t.device != x.device or t.dtype != dtype:
            raise RuntimeError(
                f"{op}: all tensors must be on x's device with x's dtype ({x.device}, {x.dtype}; lam and step "
                f"{value_dtype(x.dtype)}); {name} is {t.device}, {t.dtype}"
            )
    if x.dtype not in _DTYPES:
        raise RuntimeError(f"{op}: float32, float16 or bfloat16 only, got {x.dtype}")
    for name in ("weight", "lam"):
        if tensors[name].numel() >= _MAX_INDEX:
            raise RuntimeError(f"{op}: {name} must hold fewer than 2**31 elements (int32 kernel offsets)")
    checked = [t.contiguous() for t in tensors.values()]
    if tied:  # the dictionary itself, the same tensor (_dot_weights and the launchers share what they derive from it)
        checked[2] = checked[1]
    return checked, [sh, sw], [ph, pw]


def _check_code_like(op, name, t, shape, x):
    """A code-sized tensor of the backward (grad_z, z, saved): shape, dtype and device, before any launch."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape) or t.dtype != x.dtype or t.device != x.device:
        raise RuntimeError(
            f"{op}: {name} must be {tuple(shape)} of x's dtype and device ({x.dtype}, {x.device}), got "
            f"{tuple(t.shape)} ({t.dtype}, {t.device})"
        )


def _check_checkpoint(checkpoint: int, *, backward: bool) -> None:
    if checkpoint not in (0, 1) and (backward or checkpoint != NO_BACKWARD):
        raise ValueError(
            f"the triton conv-ISTA backward reads every iterate or replays from z0: checkpoint must be "
            f"0 or 1 (or NO_BACKWARD, -1, for a forward without backward), got {checkpoint}"
        )


def max_batch_items(
    x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int], n_iter: int, fista: bool, checkpoint: int
) -> int:
    """The most batch items one call of conv_ista_fwd / conv_ista_bwd can take: every buffer a kernel indexes holds
    fewer than 2**31 elements (int32 offsets). ops.conv_ista.run splits a larger batch into calls of at most this
    many items (0: a single item is too large). x: (B, C_sig, H, W); weight: (C_code, C_sig, kh, kw); the rest as
    the ops take them. Per item: the signal-sized buffers (x, r, grad_x), the code buffer of the saved iterates
    (n + 1 codes) or of the replay ring, the programs of the per-position grids, and the tile forward's residual
    slabs; the checks of _geom, _Forward and conv_ista_bwd are the same bounds on the whole batch."""
    _, C_sig, H, W = x.shape
    C_code, _, kh, kw = weight.shape
    ph, pw = int(padding[0]), int(padding[1])
    # The stride as _check_inputs clamps it: the slabs are sized by it.
    sh, sw = min(int(stride[0]), H + 2 * ph - kh + 1), min(int(stride[1]), W + 2 * pw - kw + 1)
    hz, wz = code_size((H, W), (kh, kw), (sh, sw), (ph, pw))
    code_item = C_code * hz * wz
    n_codes = n_iter + 1 if checkpoint == 1 else _replay_ring(fista)
    block_p = conv_config(C_sig, C_code, kh, kw).BLOCK_P
    per_item = [C_sig * H * W, code_item * n_codes, triton.cdiv(hz * wz, block_p) * C_code, triton.cdiv(H * W, block_p)]
    strategy = forward_strategy(C_sig, C_code, code_item * x.element_size())
    if strategy != "two-pass":
        cfg = fwd_config(C_sig, C_code, kh, kw)
        programs = 1 if strategy == "single-launch" else triton.cdiv(hz, cfg.TH) * triton.cdiv(wz, cfg.TW)
        per_item.append(programs * C_sig * ((cfg.TH - 1) * sh + kh) * ((cfg.TW - 1) * sw + kw))
    return (_MAX_INDEX - 1) // max(1, *per_item)


def conv_ista_fwd(
    x: Tensor,
    weight: Tensor,
    encoder_weight: Tensor,
    lam: Tensor,
    step: Tensor,
    z0: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    nonneg: bool,
    fista: bool,
    checkpoint: int,
) -> tuple[Tensor, Tensor]:
    """Forward of the fused-op interface (docs/design.md §7.1). x: (B, C_sig, H, W); weight, encoder_weight:
    (C_code, C_sig, kh, kw); lam: (n_iter, C_code); step: (n_iter,); z0: (B, C_code, Hz, Wz) or empty (zeros).
    Returns (z_n, saved): z_1..z_{n-1} (n_iter - 1, B, C_code, Hz, Wz) for checkpoint 1, an empty (0,) tensor for
    checkpoint 0 (recompute mode)."""
    _check_checkpoint(checkpoint, backward=False)
    (x, weight, encoder_weight, lam, step, z0), stride, padding = _check_inputs(
        "conv_ista_fwd_triton", x, weight, encoder_weight, lam, step, z0, stride, padding
    )
    z0 = z0 if z0.numel() > 0 else _code_zeros(x, weight, stride, padding)
    n = step.shape[0]
    save = checkpoint == 1
    if z0.numel() == 0:  # an empty batch or no code channels: nothing to compute
        return z0.clone(), z0.new_empty((n - 1, *z0.shape) if save else (0,))
    g = _geom(x, weight, z0, stride, padding, n + 1 if save else _replay_ring(fista))
    fwd = _Forward(x, weight, encoder_weight, lam, step, z0, g, nonneg, fista)
    # The single-launch kernel also writes z_n into the ring; the per-iteration paths write it straight into z.
    # z leaves in the usual contiguous layout (a copy: never an alias of saved).
    single = fwd.strategy == "single-launch"
    ring = (n + 1 if single else n) if save else _replay_ring(fista)
    if single:
        buf = fwd.run(n, ring)
        z = buf.select(0, _slot(n, ring)).clone(memory_format=torch.contiguous_format)
    else:
        z = _empty_nhwc(z0.shape, device=z0.device, dtype=z0.dtype)
        buf = fwd.run(n, ring, last_out=z)
        z = z.contiguous()
    if not save:
        return z, z0.new_empty((0,))
    # saved has the contract's shape and contiguous strides (the op's fake), and holds each iterate channels last:
    # the ring's own memory, read back by saved_iterates.
    return z, buf.narrow(0, 0, n - 1).permute(0, 1, 3, 4, 2).view(n - 1, *z0.shape)


def saved_iterates(saved: Tensor) -> Tensor:
    """conv_ista_fwd's saved (n - 1, B, C, Hz, Wz), whose items are stored channels last, as (n - 1, B, C, Hz, Wz)
    views of that memory."""
    m, b, c, h, w = saved.shape
    return saved.reshape(m, b, h, w, c).permute(0, 1, 4, 2, 3)


def _last_step_grads(grad_z: Tensor, z: Tensor, nonneg: bool) -> tuple[Tensor, Tensor]:
    """gu = dL/dz_n on the support of z_n, fp32 channels last, and the last threshold's gradient
    dth = -sum gu sign(z_n) (nonneg: -sum gu) per code channel. grad_z and z in any layout (grad_z often an
    expanded scalar). Formed a few items at a time, so that the masks and products take an eighth of a code."""
    gu = _empty_nhwc(tuple(z.shape), device=z.device, dtype=torch.float32)
    dth = torch.zeros(z.shape[1], device=z.device, dtype=torch.float32)
    chunk = max(1, triton.cdiv(z.shape[0], 8))
    for b0 in range(0, z.shape[0], chunk):
        zb, gb = z[b0 : b0 + chunk], gu[b0 : b0 + chunk]
        gb.copy_(grad_z[b0 : b0 + chunk]).masked_fill_(zb == 0, 0.0)
        dth -= (gb if nonneg else signed_share(gb, zb)).sum(dim=(0, 2, 3))
    return gu, dth


def conv_ista_bwd(
    grad_z: Tensor,
    x: Tensor,
    weight: Tensor,
    encoder_weight: Tensor,
    lam: Tensor,
    step: Tensor,
    z0: Tensor,
    z: Tensor,
    saved: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    nonneg: bool,
    fista: bool,
    checkpoint: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of the fused-op interface: grads of (x, weight, encoder_weight, lam, step, z0), each of its
    input's shape (an empty z0's grad is empty; an empty encoder_weight's too, weight's then sums both uses).
    ``saved`` holds z_1..z_{n-1} (checkpoint 1); checkpoint 0 is recompute mode: the forward is replayed from z0,
    z_n included (z is then empty)."""
    _check_checkpoint(checkpoint, backward=True)
    op = "conv_ista_bwd_triton"
    given_encoder = encoder_weight
    (x, weight, encoder_weight, lam, step, z0), stride, padding = _check_inputs(
        op, x, weight, encoder_weight, lam, step, z0, stride, padding
    )
    tied = _tied(given_encoder)
    code_shape = (x.shape[0], weight.shape[0], *code_size(x.shape[2:], weight.shape[2:], stride, padding))
    # grad_z, z and saved are read through torch ops (any strides) and made channels last where a kernel reads them.
    _check_code_like(op, "grad_z", grad_z, code_shape, x)
    if z.numel() != 0 or checkpoint == 1:
        _check_code_like(op, "z (z_n; empty only in recompute mode)", z, code_shape, x)
    if checkpoint == 1:
        _check_code_like(op, "saved (z_1..z_{n-1} of the forward)", saved, (step.shape[0] - 1, *code_shape), x)
    if grad_z.numel() == 0:  # an empty code (conv_ista_fwd): every gradient is zero
        return tuple(torch.zeros_like(t) for t in (x, weight, given_encoder, lam, step, z0))
    z0_given = z0.numel() > 0
    recompute = checkpoint == 0
    if z0_given:
        z0 = _nhwc(z0)
    elif recompute:  # only copied into the replay ring
        z0 = _code_zeros(x, weight, stride, padding)
    else:  # read by the kernels as z_0
        z0 = _empty_nhwc(code_shape, device=x.device, dtype=x.dtype).zero_()
    n_iter = step.shape[0]
    ring_size = _replay_ring(fista)
    g = _geom(x, weight, z0, stride, padding, n_iter if checkpoint == 1 else ring_size)
    ccfg = conv_config(g.C_sig, g.C_code, g.kh, g.kw)
    in_prec = _in_prec(x.dtype)
    betas = _fista_betas(n_iter, fista)
    tap_syn, tap_ana = _tap_major(g.C_code), _tap_major(g.C_sig)
    geo = dict(
        SH=g.sh,
        SW=g.sw,
        PH=g.ph,
        PW=g.pw,
        KH=g.kh,
        KW=g.kw,
        BLOCK_P=ccfg.BLOCK_P,
        BLOCK_K=ccfg.BLOCK_K,
        IN_PREC=in_prec,
        num_warps=ccfg.num_warps,
        num_stages=ccfg.num_stages,
    )
    sig_grid = (triton.cdiv(g.H * g.W, ccfg.BLOCK_P) * g.B, triton.cdiv(g.C_sig, ccfg.BLOCK_CI))
    code_grid = (triton.cdiv(g.Hz * g.Wz, ccfg.BLOCK_P) * g.B, triton.cdiv(g.C_code, ccfg.BLOCK_C))
    if max(sig_grid[0], code_grid[0]) >= _MAX_INDEX:
        raise ValueError(
            f"the triton conv-ISTA backward needs more than 2**31 - 1 programs for {g.B} items: split the batch"
        )
    k_tot = g.C_sig * g.kh * g.kw
    # Bound the partials to ~16 MiB; beyond that more splits buy no parallelism worth the memory.
    n_split = max(
        1, min(ccfg.max_splits, g.B * triton.cdiv(g.Hz * g.Wz, ccfg.BLOCK_P), (1 << 22) // max(1, g.C_code * k_tot))
    )
    columns = g.kh * g.kw * triton.cdiv(g.C_sig, ccfg.BLOCK_K) if tap_ana else triton.cdiv(k_tot, ccfg.BLOCK_K)
    w_grid = (triton.cdiv(g.C_code, ccfg.BLOCK_C), columns, n_split)
    if max(columns, sig_grid[1], code_grid[1]) > MAX_GRID_YZ:  # the launch would fail with an opaque error
        raise ValueError(
            f"the triton conv-ISTA backward needs more than CUDA's {MAX_GRID_YZ} programs on a grid axis for "
            f"C_sig={g.C_sig}, C_code={g.C_code} and a {g.kh}x{g.kw} kernel: use backend='reference'"
        )
    partials = torch.empty((n_split, g.C_code, k_tot), device=x.device, dtype=torch.float32)
    sig_shape = (g.B, g.C_sig, g.H, g.W)
    f32 = dict(device=x.device, dtype=torch.float32)
    dims = dict(C_code=g.C_code, C_sig=g.C_sig, H=g.H, W=g.W, Hz=g.Hz, Wz=g.Wz)

    grad_x = _empty_nhwc(sig_shape, **f32).zero_()
    # r_k, then v in the same buffer (v = E^T gu overwrites r_k once r_k's last reader is done), reused by every
    # iteration.
    r = _empty_nhwc(sig_shape, **f32)
    dot_shares = torch.empty(sig_grid[0] * sig_grid[1], **f32)  # <v, r_k>: one share per synthesis program
    dth_shares = torch.empty((code_grid[0], g.C_code), **f32)  # dth_{k-1}: one row per analysis program row

    def synth(code, w, out, epilogue, sig, k):
        code = _nhwc(code)
        launch(_conv_synth_kernel)[sig_grid](
            sig,
            code,
            0,
            code,
            0,
            0.0,
            w,
            out,
            grad_x,
            dot_shares,
            step,
            k,
            **dims,
            BLOCK_CI=ccfg.BLOCK_CI,
            TAP_MAJOR=tap_syn,
            EPILOGUE=epilogue,
            FISTA=False,
            SIG_NCHW=epilogue == "residual",  # x as passed, channels first; r_k channels last
            **geo,
        )

    def weight_grad(sig, code):
        launch(_conv_weight_grad_kernel)[w_grid](
            partials, _nhwc(sig), _nhwc(code), g.B, **dims, BLOCK_C=ccfg.BLOCK_C, TAP_MAJOR=tap_ana, **geo
        )
        return partials.sum(0).view(tuple(weight.shape))

    ring = None  # recompute mode: the one buffer of 2 (FISTA: 3) codes every replay writes
    if recompute:
        # The replays read x channels first (two-pass) or make their own channels-last copy (tile kernels); their
        # residual scratch is r, which each step rewrites after its replay.
        fwd = _Forward(x, weight, encoder_weight, lam, step, z0, g, nonneg, fista, residual=r)
        dot_w, dot_we = fwd.weight, fwd.encoder_weight  # already as the dots read them
        if z.numel() == 0:  # the autograd link keeps no z in recompute mode
            ring = fwd.run(n_iter, ring_size)
            z = ring.select(0, _slot(n_iter, ring_size))
    else:
        dot_w, dot_we = _dot_weights(weight, encoder_weight)
    synth_w = _synth_weight(dot_w, tap_syn)
    synth_we = synth_w if dot_we is dot_w else _synth_weight(dot_we, tap_syn)  # tied: one tap-major copy
    analysis_w = _analysis_weight(dot_w, tap_ana)  # D^T v: the analysis conv with the synthesis dictionary

    iterates = saved_iterates(saved) if checkpoint == 1 else None

    def saved_iterate(j):
        return z0 if j == 0 else iterates.select(0, j - 1)

    grad_w = torch.zeros(tuple(weight.shape), **f32)
    grad_we = grad_w if tied else torch.zeros(tuple(encoder_weight.shape), **f32)  # both sums in one when tied
    grad_lam, grad_step = [], []
    # gu = dL/dz_{k+1} on the support of z_{k+1}, in one fp32 buffer that the analysis kernel's "vjp" epilogue
    # overwrites with the next gu (and, at k = 0, with dL/dz_0); dth its threshold gradient. Here for k = n - 1.
    gu, dth = _last_step_grads(grad_z, z, nonneg)
    # FISTA: the part of dL/dz_k that iteration k+1 sent through y_{k+1}, carried by the analysis kernel (ISTA
    # passes gu in its place, never read).
    carried = _empty_nhwc(gu.shape, **f32).zero_() if fista else gu
    # FISTA's y_k: in recompute mode with fp32 codes, the ring slot the replay left free (it held z_{k-2}).
    spare_slot = recompute and x.dtype == torch.float32
    y_buf = _empty_nhwc(gu.shape, **f32) if fista and not spare_slot else None
    z_k = z_km1 = y = y_out = v = None
    for k in reversed(range(n_iter)):
        if recompute:
            # Replaying k iterations per step makes the backward O(n^2) iterations; memory stays 2-3 codes (one
            # ring, reused: a fresh ring per replay held two while z_{k+1} pinned the last one, and recompute
            # then peaked above save mode on an H200's deep-layer training step). Nothing reads z_{k+1} any more:
            # the previous iteration's analysis kernel already turned it into gu.
            ring = fwd.run(k, ring_size, out=ring)
            z_k = ring.select(0, _slot(k, ring_size))
            z_km1 = ring.select(0, _slot(max(k - 1, 0), ring_size))  # FISTA only: a 2-slot ring holds no z_{k-1}
        else:
            z_k = saved_iterate(k)
            z_km1 = saved_iterate(max(k - 1, 0))
        # y_k = z_k + beta_k (z_k - z_{k-1}) as the forward formed it, in one reused fp32 buffer; ISTA's y_k is z_k,
        # read in its own dtype.
        if betas[k] != 0.0:
            y_out = ring.select(0, _slot(k + 1, ring_size)) if spare_slot else y_buf
            y = torch.sub(z_k.to(torch.float32), z_km1, out=y_out)
            y = torch.add(z_k, y, alpha=betas[k], out=y_out)
        else:
            y = z_k
        step_k = step[k].to(torch.float32)

        synth(y, synth_w, r, "residual", x, k)
        grad_we += step_k * weight_grad(r, gu)
        v = r
        synth(gu, synth_we, v, "vjp", r, k)  # in place; also grad_x += step_k v and the shares of <v, r_k>
        grad_lam.append(step_k * dth)
        grad_step.append(dot_shares.sum() + (lam[k].to(torch.float32) * dth).sum())
        grad_w -= step_k * weight_grad(v, y)

        launch(_conv_analysis_kernel)[code_grid](
            gu,
            0,
            carried,
            0,
            betas[k],
            v,
            analysis_w,
            lam,
            step,
            k,
            gu,
            0,
            z_k,
            dth_shares,
            **dims,
            BLOCK_C=ccfg.BLOCK_C,
            TAP_MAJOR=tap_ana,
            EPILOGUE="vjp" if k > 0 else "vjp-z0",
            NONNEG=bool(nonneg),
            FISTA=bool(fista),
            **geo,
        )
        if k > 0:
            dth = dth_shares.sum(0)

    grad_lam = torch.stack(grad_lam[::-1]).to(lam.dtype)
    grad_step = torch.stack(grad_step[::-1]).to(step.dtype)
    # Every iteration buffer (and view into one) goes before the outputs are converted, so that the conversions'
    # copies do not add to the peak.
    del r, v, ring, y_buf, carried, z, z_k, z_km1, y, y_out
    if recompute:
        del fwd
    return (
        grad_x.to(x.dtype).contiguous(),
        grad_w.to(weight.dtype),
        torch.empty_like(given_encoder) if tied else grad_we.to(encoder_weight.dtype),
        grad_lam,
        grad_step,
        gu.to(z0.dtype).contiguous() if z0_given else z0.new_empty((0,)),
    )


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation: the launches the launchers really make, recorded on meta tensors (triton/launch.py).
# tests/test_triton_aot.py compiles them for sm_80 and sm_90 and checks that every kernel in KERNELS is among them.
# ----------------------------------------------------------------------------------------------------------------

KERNELS = {
    "_conv_ista_fwd_kernel": _conv_ista_fwd_kernel,
    "_conv_ista_fwd_all_kernel": _conv_ista_fwd_all_kernel,
    "_conv_synth_kernel": _conv_synth_kernel,
    "_conv_analysis_kernel": _conv_analysis_kernel,
    "_conv_weight_grad_kernel": _conv_weight_grad_kernel,
}


@contextlib.contextmanager
def strategy(forward: str | None = None, tap_major_min_channels: int | None = None):
    """Pin the forward strategy ("two-pass", "single-launch", "tiles" or "auto") and/or the tap-major threshold
    for the launches inside the block (tests, the tune script, the sanitizer cases, the AOT recording)."""
    global FORWARD_STRATEGY, TAP_MAJOR_MIN_CHANNELS
    saved = FORWARD_STRATEGY, TAP_MAJOR_MIN_CHANNELS
    if forward is not None:
        if forward not in ("auto", "two-pass", "single-launch", "tiles"):
            raise ValueError(f"forward strategy must be auto, two-pass, single-launch or tiles, got {forward!r}")
        FORWARD_STRATEGY = forward
    if tap_major_min_channels is not None:
        TAP_MAJOR_MIN_CHANNELS = tap_major_min_channels
    try:
        yield
    finally:
        FORWARD_STRATEGY, TAP_MAJOR_MIN_CHANNELS = saved


def aot_specializations(
    x_shape: Sequence[int],
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    n_iter: int = 3,
    nonneg: bool = False,
    fista: bool = False,
    allow_tf32: bool = True,
) -> list[AotSpec]:
    """Every kernel specialisation the launchers make on one problem, recorded without running it: the forward in
    both save modes with each strategy (two-pass, tiles and single-launch, whatever the shape) and the backward in
    both modes. x_shape: (B, C_sig, H, W); weight_shape: (C_code, C_sig, kh, kw). fp32 dots follow
    `allow_tf32` (torch.backends.cudnn.allow_tf32, as at run time). Call without TRITON_INTERPRET."""
    if interpreting():
        raise RuntimeError("aot_specializations needs the GPU configurations: unset TRITON_INTERPRET")
    B, C_code = x_shape[0], weight_shape[0]
    zs = code_size(x_shape[2:], weight_shape[2:], stride, padding)

    def meta(*shape):
        return torch.empty(shape, device="meta", dtype=dtype)

    x, w, z0 = meta(*x_shape), meta(*weight_shape), meta(B, C_code, *zs)
    lam, step = (torch.empty(shape, device="meta", dtype=value_dtype(dtype)) for shape in ((n_iter, C_code), (n_iter,)))

    def run():
        for forward in ("two-pass", "tiles", "single-launch"):
            with strategy(forward):
                for checkpoint in (1, 0):
                    z, saved = conv_ista_fwd(x, w, w, lam, step, z0, stride, padding, nonneg, fista, checkpoint)
                    conv_ista_bwd(
                        torch.empty_like(z),
                        x,
                        w,
                        w,
                        lam,
                        step,
                        z0,
                        z if checkpoint else z.new_empty(0),
                        saved,
                        stride,
                        padding,
                        nonneg,
                        fista,
                        checkpoint,
                    )

    with forward_tf32(allow_tf32):
        return record_launches(run)
