"""The input checks of the sparse-attention launchers, before any launch: shapes, dtypes and devices of the
fused-op contract, and the int32 bound on what a kernel indexes within one (batch, head) slice.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._attention_args import MAX_FUSED_HEAD_DIM

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
            # A contiguous copy helps only when its slice fits: a (B, H, N, M) bias of N * M >= 2**31 never does.
            fix = (
                "pass it contiguous"
                if t.shape[2] * t.shape[3] < _MAX_INDEX
                else "use backend='reference', or fewer query or key rows per call"
            )
            raise RuntimeError(
                f"{op}: {name} spans {_extent(t, (2, 3))} elements within one (batch, head) slice (shape "
                f"{tuple(t.shape)}, strides {t.stride()}); the kernels address fewer than 2**31: {fix}"
            )
