"""The input checks of the launchers, before any launch: shapes, dtypes and strides of the fused-op contract, and
the int32 bound on what a kernel indexes.
"""

import torch
from torch import Tensor

from ...reference.conv import code_size, value_dtype
from ...reference.conv_ista import NO_BACKWARD

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
