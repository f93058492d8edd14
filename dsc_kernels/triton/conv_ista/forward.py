"""The conv-ISTA forward: `conv_ista_fwd` and `_Forward`, whose iterations the backward replays in recompute mode.

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

Saved for backward: z_1 .. z_{n-1} in the input dtype (`saved`), or nothing in recompute mode, where the backward
replays the forward from z_0 with the same kernels (bit-identical iterates, hence identical supports) into a ring
of two code buffers (FISTA: three, its momentum reads z_{k-1}): O(n^2) iterations of compute, memory independent
of n.
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from ...reference.conv import code_size
from ...reference.conv_ista import fista_momentum
from ..grid import MAX_GRID_YZ
from ..launch import launch
from .checks import _MAX_INDEX, _check_checkpoint, _check_inputs
from .config import (
    _analysis_weight,
    _dot_weights,
    _empty_nhwc,
    _in_prec,
    _nhwc,
    _synth_weight,
    conv_config,
    fwd_config,
)
from .kernels import _conv_analysis_kernel, _conv_ista_fwd_all_kernel, _conv_ista_fwd_kernel, _conv_synth_kernel
from .strategies import _tap_major, forward_strategy


def _fista_betas(n_iter: int, fista: bool) -> list[float]:
    return fista_momentum(n_iter) if fista else [0.0] * n_iter


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
            # The channel blocks sit on grid axis 1, which CUDA caps (the backward checks the same grids; a forward
            # alone, or a training step's forward, reached the launch and failed with an opaque CUDA error).
            if max(self.synth_grid[1], self.analysis_grid[1]) > MAX_GRID_YZ:
                raise ValueError(
                    f"the triton conv-ISTA forward needs more than CUDA's {MAX_GRID_YZ} programs on a grid axis for "
                    f"C_sig={g.C_sig}, C_code={g.C_code}: use backend='reference'"
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
        # contiguous strides, as the fake's: a clone of the expanded zeros kept their (0, 0, 0, 0)
        return z0.clone(memory_format=torch.contiguous_format), z0.new_empty((n - 1, *z0.shape) if save else (0,))
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
