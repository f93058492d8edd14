"""Ahead-of-time compilation: the launches the launchers really make, recorded on meta tensors (triton/launch.py).
tests/test_triton_aot.py compiles them for sm_80 and sm_90 and checks that every kernel in KERNELS is among them.
"""

from collections.abc import Sequence

import torch

from ..._precision import forward_tf32
from ...reference.conv import code_size, value_dtype
from ..launch import AotSpec, interpreting, record_launches
from .backward import conv_ista_bwd
from .forward import conv_ista_fwd
from .kernels import (
    _conv_analysis_kernel,
    _conv_ista_fwd_all_kernel,
    _conv_ista_fwd_kernel,
    _conv_synth_kernel,
    _conv_weight_grad_kernel,
)
from .strategies import strategy

KERNELS = {
    "_conv_ista_fwd_kernel": _conv_ista_fwd_kernel,
    "_conv_ista_fwd_all_kernel": _conv_ista_fwd_all_kernel,
    "_conv_synth_kernel": _conv_synth_kernel,
    "_conv_analysis_kernel": _conv_analysis_kernel,
    "_conv_weight_grad_kernel": _conv_weight_grad_kernel,
}


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
