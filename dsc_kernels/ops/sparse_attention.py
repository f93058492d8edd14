"""The sparse-attention op family: one schema, its fakes and autograd, and ``run`` for any row of ``ops.table``.

Every backend row defines two ops with this schema (C++ declares the same one; the Triton launchers carry it as
annotations; ``tests/test_backend_table.py`` checks all three):

    <forward_op>(Tensor q, Tensor k, Tensor v, Tensor threshold, Tensor? bias, str mode, bool causal, float scale)
        -> (Tensor out, Tensor stats)
    <backward_op>(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor threshold, Tensor? bias, Tensor stats,
                  str mode, bool causal, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v,
                  Tensor grad_threshold)

- q (B, H, N, d), k (B, H, M, d), v (B, H, M, dv), all one dtype, any strides (a backend copies only what its
  kernels cannot read in place; they read rows with a unit last stride); threshold (H,) (any float dtype; ignored
  by mode "sparsemax", whose grad_threshold is zeros); bias None or an additive score bias of shape (B, H, N, M)
  in ``stats_dtype(q.dtype)``, usually an expanded view with zero strides (a key padding mask is (B, 1, 1, M)
  expanded), -inf hiding a key, not differentiated; mode "sparsemax" | "shrink"; causal is SDPA's top-left
  ``is_causal`` (query i sees keys j <= i); scale multiplies q k^T.
- out (B, H, N, dv) contiguous in q's dtype; stats (B, H, N, 2) = (c_i, t_i) per query row in float32 (float64 for
  float64 inputs), the only thing saved for backward besides the inputs, like FlashAttention's log-sum-exp: the
  support is {z_ij > t_i} with z_ij = s_ij - c_i (reference/attention.py states the encoding of +inf, empty and
  NaN rows).
- Gradients have their inputs' shapes and dtypes (contiguous).
"""

from __future__ import annotations

from torch import Tensor

from ..reference.attention import stats_dtype
from . import table
from .registry import FamilySpec, OpPair, run_eager, traced_op_pair
from .registry import op_pair as _register_pair
from .table import Backend

FAMILY = "sparse_attention"
FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor threshold, Tensor? bias, str mode, bool causal, float scale) "
    "-> (Tensor, Tensor)"
)
BWD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor threshold, Tensor? bias, Tensor stats, "
    "str mode, bool causal, float scale) -> (Tensor, Tensor, Tensor, Tensor)"
)


def _fake_fwd(
    q: Tensor, k: Tensor, v: Tensor, threshold: Tensor, bias: Tensor | None, mode: str, causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    b, h, n, _ = q.shape
    return q.new_empty((b, h, n, v.shape[-1])), q.new_empty((b, h, n, 2), dtype=stats_dtype(q.dtype))


def _fake_bwd(
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
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), threshold.new_empty(threshold.shape))


def _make_autograd(bwd_op):
    def setup_context(ctx, inputs, output):
        q, k, v, threshold, bias, mode, causal, scale = inputs
        _, stats = output
        ctx.save_for_backward(q, k, v, threshold, bias, stats)
        ctx.config = (mode, causal, scale)
        ctx.mark_non_differentiable(stats)

    def backward(ctx, grad_out, _grad_stats):
        q, k, v, threshold, bias, stats = ctx.saved_tensors
        mode, causal, scale = ctx.config
        dq, dk, dv, dth = bwd_op(grad_out, q, k, v, threshold, bias, stats, mode, causal, scale)
        return dq, dk, dv, dth, None, None, None, None

    return setup_context, backward


SPEC = FamilySpec(FWD_SCHEMA, BWD_SCHEMA, _fake_fwd, _fake_bwd, _make_autograd)


def op_pair(backend: str) -> OpPair:
    """The (forward, backward) ops of ``backend``'s row, registered on first use."""
    return _register_pair(table.row(FAMILY, backend), SPEC)


def run(
    row: Backend,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    threshold: Tensor,
    bias: Tensor | None,
    mode: str,
    causal: bool,
    scale: float,
) -> Tensor:
    """Sparse attention on validated tensors with ``row``'s backend. q (B,H,N,d), k (B,H,M,d), v (B,H,M,dv) of one
    float dtype and device, any strides; threshold (H,); bias None or (B,H,N,M) (see the module docstring).
    Returns O (B,H,N,dv), differentiable in q, k, v and threshold."""
    if row.eager is not None:
        return run_eager(row, q, k, v, mode=mode, threshold=threshold, causal=causal, scale=scale, bias=bias)
    out, _ = traced_op_pair(row, SPEC).forward(q, k, v, threshold, bias, mode, bool(causal), float(scale))
    return out
