"""The conv-ISTA backward: `conv_ista_bwd`, from the iterates the forward saved or from its replays (forward.py's
header, "Saved for backward").

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
"""

from collections.abc import Sequence

import torch
import triton
from torch import Tensor

from ...reference.conv import code_size
from ...reference.conv_ista import signed_share
from ..grid import MAX_GRID_YZ
from ..launch import launch
from .checks import _MAX_INDEX, _check_checkpoint, _check_code_like, _check_inputs, _tied
from .config import _analysis_weight, _dot_weights, _empty_nhwc, _in_prec, _nhwc, _synth_weight, conv_config
from .forward import _code_zeros, _fista_betas, _Forward, _geom, _replay_ring, _slot, saved_iterates
from .kernels import _conv_analysis_kernel, _conv_synth_kernel, _conv_weight_grad_kernel
from .strategies import _tap_major


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
        # contiguous, as the fake's and the other path's (zeros_like kept a channels-last input's strides)
        return tuple(t.new_zeros(t.shape) for t in (x, weight, given_encoder, lam, step, z0))
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
