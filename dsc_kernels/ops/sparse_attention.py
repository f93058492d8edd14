"""torch.library registration of the fused sparse-attention ops, one forward/backward pair per backend.

Schema (identical for every backend ``<b>`` in "ref", "cpp", "triton"):

    dsc_kernels::sparse_attention_fwd_<b>(Tensor q, Tensor k, Tensor v, Tensor threshold, str mode, bool causal,
                                          float scale) -> (Tensor out, Tensor stats)
    dsc_kernels::sparse_attention_bwd_<b>(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor threshold,
                                          Tensor stats, str mode, bool causal, float scale)
                                          -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_threshold)

- q (B, H, N, d), k (B, H, M, d), v (B, H, M, dv), all one dtype and contiguous; threshold (H,) (any float dtype;
  ignored by mode "sparsemax", whose grad_threshold is zeros); mode "sparsemax" | "shrink"; causal is SDPA's
  top-left ``is_causal`` (query i sees keys j <= i); scale multiplies q k^T.
- out (B, H, N, dv) in q's dtype; stats (B, H, N, 2) = (tau_i, |S_i|) per query row in float32 (float64 for
  float64 inputs): the only thing saved for backward besides the inputs, like FlashAttention's log-sum-exp.
  tau is the row's sparsemax threshold or the head's shrink threshold; a row with no key has (+inf, 0).
- Gradients have their inputs' shapes and dtypes. The backward is itself an op, so torch.compile traces both.

Backends: "ref" is a Python custom_op over dense hand-written torch (reference/attention.py), "cpp" the C++ kernels
of csrc/cpu/sparse_attention.cpp (schemas defined there; this file adds fakes and autograd), "triton" a triton_op
over the launchers in dsc_kernels/triton/sparse_attention.py.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..reference.attention import sparse_attention_bwd_ref, sparse_attention_fwd_ref, stats_dtype

__all__ = ["sparse_attention", "get_ops", "OP_BACKENDS"]

OP_BACKENDS = ("ref", "cpp", "triton")


@dataclass(frozen=True)
class SparseAttentionOps:
    forward: Callable[..., tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]


_OPS: dict[str, SparseAttentionOps] = {}


def _fake_fwd(q: Tensor, k: Tensor, v: Tensor, threshold: Tensor, mode: str, causal: bool,
              scale: float) -> tuple[Tensor, Tensor]:
    b, h, n, _ = q.shape
    return q.new_empty((b, h, n, v.shape[-1])), q.new_empty((b, h, n, 2), dtype=stats_dtype(q.dtype))


def _fake_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, threshold: Tensor, stats: Tensor, mode: str,
              causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(threshold)


def _define_python_ops(name: str, fwd: Callable, bwd: Callable, kind: str) -> None:
    define = {"custom_op": torch.library.custom_op, "triton_op": torch.library.triton_op}[kind]

    # The annotations are the op schema; the bodies forward to the backend's implementation.
    @define(f"dsc_kernels::sparse_attention_fwd_{name}", mutates_args=())
    def forward(q: Tensor, k: Tensor, v: Tensor, threshold: Tensor, mode: str, causal: bool,
                scale: float) -> tuple[Tensor, Tensor]:
        return fwd(q, k, v, threshold, mode, causal, scale)

    @define(f"dsc_kernels::sparse_attention_bwd_{name}", mutates_args=())
    def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, threshold: Tensor, stats: Tensor, mode: str,
                 causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return bwd(grad_out, q, k, v, threshold, stats, mode, causal, scale)

    forward.register_fake(_fake_fwd)
    backward.register_fake(_fake_bwd)


def _register(name: str, fwd: Callable | None = None, bwd: Callable | None = None, *, kind: str) -> None:
    if kind == "native":
        torch.library.register_fake(f"dsc_kernels::sparse_attention_fwd_{name}")(_fake_fwd)
        torch.library.register_fake(f"dsc_kernels::sparse_attention_bwd_{name}")(_fake_bwd)
    else:
        _define_python_ops(name, fwd, bwd, kind)
    fwd_op = getattr(torch.ops.dsc_kernels, f"sparse_attention_fwd_{name}").default
    bwd_op = getattr(torch.ops.dsc_kernels, f"sparse_attention_bwd_{name}").default

    def setup_context(ctx, inputs, output):
        q, k, v, threshold, mode, causal, scale = inputs
        _, stats = output
        ctx.save_for_backward(q, k, v, threshold, stats)
        ctx.config = (mode, causal, scale)
        ctx.mark_non_differentiable(stats)

    def backward(ctx, grad_out, _grad_stats):
        q, k, v, threshold, stats = ctx.saved_tensors
        dq, dk, dv, dth = bwd_op(grad_out.contiguous(), q, k, v, threshold, stats, *ctx.config)
        return dq, dk, dv, dth, None, None, None

    torch.library.register_autograd(f"dsc_kernels::sparse_attention_fwd_{name}", backward,
                                    setup_context=setup_context)
    _OPS[name] = SparseAttentionOps(fwd_op, bwd_op)


def _register_cpp() -> None:
    if not hasattr(torch.ops.dsc_kernels, "sparse_attention_fwd_cpp"):
        from .. import _ext
        _ext.load()
    _register("cpp", kind="native")


def _register_triton() -> None:
    from ..triton import sparse_attention as tsa
    _register("triton", tsa.sparse_attention_fwd, tsa.sparse_attention_bwd, kind="triton_op")


def get_ops(backend: str) -> SparseAttentionOps:
    """The (forward, backward) ops of ``backend``, registering them on first use."""
    if backend not in _OPS:
        if backend == "cpp":
            _register_cpp()
        elif backend == "triton":
            _register_triton()
        else:
            raise ValueError(f"unknown sparse-attention op backend {backend!r}; expected one of {OP_BACKENDS}")
    return _OPS[backend]


def sparse_attention(backend: str, q: Tensor, k: Tensor, v: Tensor, threshold: Tensor, mode: str, causal: bool,
                     scale: float) -> Tensor:
    """Fused sparse attention through op backend ``backend`` on validated tensors (see the schema above).

    q (B,H,N,d), k (B,H,M,d), v (B,H,M,dv) of one float dtype and device; threshold (H,). Returns O (B,H,N,dv).
    Differentiable in q, k, v and threshold.
    """
    out, _ = get_ops(backend).forward(q.contiguous(), k.contiguous(), v.contiguous(), threshold.contiguous(),
                                      mode, bool(causal), float(scale))
    return out


def _fwd_ref(q: Tensor, k: Tensor, v: Tensor, threshold: Tensor, mode: str, causal: bool,
             scale: float) -> tuple[Tensor, Tensor]:
    out, stats = sparse_attention_fwd_ref(q, k, v, threshold, mode, causal, scale)
    return out.contiguous(), stats.contiguous()


_register("ref", _fwd_ref, sparse_attention_bwd_ref, kind="custom_op")
