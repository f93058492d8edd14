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

import torch
from torch import Tensor

from ..reference.attention import sparse_attention_bwd_ref, sparse_attention_fwd_ref, stats_dtype
from ._pair import Family, OpPair

__all__ = ["sparse_attention", "get_ops", "OP_BACKENDS"]

OP_BACKENDS = ("ref", "cpp", "triton")


def _fake_fwd(q: Tensor, k: Tensor, v: Tensor, threshold: Tensor, mode: str, causal: bool,
              scale: float) -> tuple[Tensor, Tensor]:
    b, h, n, _ = q.shape
    return q.new_empty((b, h, n, v.shape[-1])), q.new_empty((b, h, n, 2), dtype=stats_dtype(q.dtype))


def _fake_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, threshold: Tensor, stats: Tensor, mode: str,
              causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(threshold)


def _make_autograd(bwd_op):
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

    return setup_context, backward


FAMILY = Family(
    name="sparse_attention",
    fwd_schema="(Tensor q, Tensor k, Tensor v, Tensor threshold, str mode, bool causal, float scale) "
               "-> (Tensor, Tensor)",
    bwd_schema="(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor threshold, Tensor stats, str mode, "
               "bool causal, float scale) -> (Tensor, Tensor, Tensor, Tensor)",
    fake_fwd=_fake_fwd, fake_bwd=_fake_bwd, make_autograd=_make_autograd)


def get_ops(backend: str) -> OpPair:
    """The (forward, backward) ops of ``backend`` ("ref", "cpp", "triton"), registering them on first use."""
    return FAMILY.get(backend)


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


FAMILY.register("ref", "custom_op", _fwd_ref, sparse_attention_bwd_ref)
