"""The sparse-attention launchers: tile configuration, the sparsemax forward's candidate slots, the key flags and
strides the kernels (kernels.py) read, then `sparse_attention_fwd` and `sparse_attention_bwd`.

q, k, v are read through their (batch, head, row) strides with a unit last stride (the launchers copy only inputs
without one); every load and store is masked (rows past N or M, head-dim padding to a power of two >= 16).
Launchers use only torch ops and `launch(...)` (`torch.library.wrap_triton`, recordable for ahead-of-time
compilation: `aot_specializations` records the launches the launchers really make, on meta tensors).
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ..launch import interpreting, launch
from .checks import _check_extents, _check_inputs
from .kernels import _bwd_dkdv_kernel, _bwd_dq_kernel, _fwd_kernel


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
