"""Ahead-of-time compilation of the sparse-attention kernels: KERNELS and the launches the launchers really make,
recorded on meta tensors (triton/launch.py); tests/test_attention_aot.py compiles them.
"""

from __future__ import annotations

import torch

from ..launch import AotSpec, interpreting, record_launches
from .kernels import _bwd_dkdv_kernel, _bwd_dq_kernel, _fwd_kernel
from .launchers import sparse_attention_bwd, sparse_attention_fwd

KERNELS = {"fwd": _fwd_kernel, "bwd_dq": _bwd_dq_kernel, "bwd_dkdv": _bwd_dkdv_kernel}


def aot_specializations(
    b: int,
    h: int,
    n: int,
    m: int,
    d: int,
    dv: int | None = None,
    dtype: torch.dtype = torch.float16,
    *,
    causal: bool = True,
    with_bias: bool = False,
) -> list[AotSpec]:
    """Every kernel specialisation the launchers make on one problem (both modes, forward and backward), recorded
    on meta tensors without running anything: q (b, h, n, d), k (b, h, m, d), v (b, h, m, dv or d), a key padding
    bias when ``with_bias``. Call without TRITON_INTERPRET (the interpreter's block sizes differ)."""
    if interpreting():
        raise RuntimeError("aot_specializations needs the GPU configurations: unset TRITON_INTERPRET")

    def meta(*shape, dt=dtype):
        return torch.empty(shape, device="meta", dtype=dt)

    q, k, v, th = meta(b, h, n, d), meta(b, h, m, d), meta(b, h, m, dv or d), meta(h, dt=torch.float32)
    bias = meta(b, 1, 1, m, dt=torch.float32).expand(b, h, n, m) if with_bias else None

    def run():
        for mode in ("sparsemax", "shrink"):
            out, stats = sparse_attention_fwd(q, k, v, th, bias, mode, causal, d**-0.5)
            sparse_attention_bwd(torch.empty_like(out), q, k, v, th, bias, stats, mode, causal, d**-0.5)

    return record_launches(run)
