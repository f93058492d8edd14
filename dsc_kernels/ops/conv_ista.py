"""The conv-ISTA op family: one schema, its fakes and autograd, and ``run`` for any row of ``ops.table``.

Every backend row defines two ops with this schema (the C++ ops declare the same one in C++; the Triton launchers
carry it as annotations; ``tests/test_backend_table.py`` checks all three):

    <forward_op>(x, weight, encoder_weight, lam, step, z0, stride, padding, nonneg, fista, checkpoint) -> (z, saved)
    <backward_op>(grad_z, x, weight, encoder_weight, lam, step, z0, z, saved, stride, padding, nonneg, fista,
                  checkpoint) -> (grad_x, grad_weight, grad_encoder_weight, grad_lam, grad_step, grad_z0)

on canonical 2-D tensors (docs/design.md, "The fused-op contract"). The forward saves the code iterates
``reference.conv_ista.checkpoint_indices`` names (every ``checkpoint``-th; all of them for 1) or none
(``checkpoint == 0``, recompute mode; ``NO_BACKWARD``, no backward will follow); the active set of iteration k is
recovered as ``z_{k+1} != 0``, so no mask is stored. With ``KEEP_RESIDUALS`` (a row's ``residual_policy`` decides) it
keeps the residuals r_k = x - D y_k too, so the backward never recomputes D y_k. An empty ``z0`` stands for zeros
(and gets an empty gradient), so a problem started from zero allocates no code-sized z0. An empty ``(0,)``
``encoder_weight`` stands for ``weight`` itself (tied): it gets an empty gradient, and ``weight``'s is the sum of both
uses, so a tied backward holds one dictionary-sized gradient, not two plus autograd's sum of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._precision import conv_tf32_allowed, forward_tf32
from .._validate import requires_grad
from ..reference.conv import code_size, zero_unread
from ..reference.conv_ista import KEEP_RESIDUALS, NO_BACKWARD, check_n_iter, saved_shape
from . import table
from .registry import FamilySpec, OpPair, run_eager, static_kernel_size, traced_implementation, traced_op_pair
from .registry import op_pair as _register_pair
from .table import Backend

FAMILY = "conv_ista"
FWD_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor encoder_weight, Tensor lam, Tensor step, Tensor z0, int[] stride, "
    "int[] padding, bool nonneg, bool fista, int checkpoint) -> (Tensor, Tensor)"
)
BWD_SCHEMA = (
    "(Tensor grad_z, Tensor x, Tensor weight, Tensor encoder_weight, Tensor lam, Tensor step, Tensor z0, "
    "Tensor z, Tensor saved, int[] stride, int[] padding, bool nonneg, bool fista, int checkpoint) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def _fake_fwd(x, weight, encoder_weight, lam, step, z0, stride, padding, nonneg, fista, checkpoint):
    check_n_iter(step)
    kernel = static_kernel_size(weight.shape[2:])
    z_shape = (x.shape[0], weight.shape[0], *code_size(x.shape[2:], kernel, stride, padding))
    return x.new_empty(z_shape), x.new_empty(saved_shape(x.shape, z_shape, step.shape[0], checkpoint, fista))


def _fake_bwd(grad_z, x, weight, encoder_weight, lam, step, z0, z, saved, stride, padding, nonneg, fista, checkpoint):
    # contiguous, as every row returns them: empty_like kept a channels-last input's layout, which cpp's do not
    return tuple(t.new_empty(t.shape) for t in (x, weight, encoder_weight, lam, step, z0))


def _make_autograd(bwd_op):
    def setup_context(ctx, inputs, output):
        x, weight, encoder_weight, lam, step, z0, stride, padding, nonneg, fista, checkpoint = inputs
        z, saved = output
        # Recompute mode keeps nothing code-sized alive for the backward, not even the output: an empty z tells the
        # backward to replay z_n too.
        ctx.save_for_backward(x, weight, encoder_weight, lam, step, z0, z if checkpoint > 0 else z.new_empty(0), saved)
        ctx.config = (stride, padding, nonneg, fista, checkpoint)
        # the backward runs at the forward's TF32 setting (_precision.py); eager autograd only: a compiled
        # backward reads the switch when it runs
        ctx.allow_tf32 = conv_tf32_allowed()
        ctx.mark_non_differentiable(saved)
        ctx.set_materialize_grads(False)  # else autograd allocates a zero grad for `saved`

    def backward(ctx, grad_z, _grad_saved):
        if grad_z is None:  # grads are not materialised (setup_context): z did not reach the loss
            return (None,) * 11
        x, weight, encoder_weight, lam, step, z0, z, saved = ctx.saved_tensors
        # grad_z is passed as it comes (often an expanded scalar, as from sum()): backends read it through its
        # strides instead of materialising a code-sized copy.
        with forward_tf32(ctx.allow_tf32):
            grads = bwd_op(grad_z, x, weight, encoder_weight, lam, step, z0, z, saved, *ctx.config)
        return (*grads, None, None, None, None, None)

    return setup_context, backward


SPEC = FamilySpec(FWD_SCHEMA, BWD_SCHEMA, _fake_fwd, _fake_bwd, _make_autograd)


def op_pair(backend: str) -> OpPair:
    """The (forward, backward) ops of ``backend``'s row, registered on first use."""
    return _register_pair(table.row(FAMILY, backend), SPEC)


def run(
    row: Backend,
    x: Tensor,
    weight: Tensor,
    encoder_weight: Tensor | None,
    lam: Tensor,
    step: Tensor,
    z0: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    nonneg: bool,
    fista: bool,
    recompute: bool,
) -> Tensor:
    """Run conv-ISTA on validated tensors with ``row``'s backend and return z_n.

    x: (B, C_sig, *S); weight, encoder_weight (None: tied): (C_code, C_sig, *k); lam: (n_iter, C_code);
    step: (n_iter,); z0: (B, C_code, *Sz) or None (zeros). 1-D problems run as height-1 images on the fused
    backends, which is the same computation. ``recompute`` asks for the memory-lean backward (checkpoint 0).
    """
    if row.eager is not None:
        return run_eager(
            row,
            x,
            weight,
            lam,
            step,
            encoder_weight=encoder_weight,
            stride=stride,
            padding=padding,
            z0=z0,
            nonneg=nonneg,
            fista=fista,
        )
    x = zero_unread(x, weight.shape[2:], stride, padding)
    if encoder_weight is weight:  # the dictionary passed as its own encoder: the tied op, one gradient
        encoder_weight = None
    one_d = weight.dim() == 3
    if one_d:
        x, weight = x.unsqueeze(2), weight.unsqueeze(2)
        encoder_weight = None if encoder_weight is None else encoder_weight.unsqueeze(2)
        z0 = None if z0 is None else z0.unsqueeze(2)
        stride, padding = (1, *stride), (0, *padding)
    z0 = x.new_empty(0) if z0 is None else z0.contiguous()  # empty: zeros, never materialised
    encoder_weight = weight.new_empty(0) if encoder_weight is None else encoder_weight  # empty: tied
    needs_grad = torch.is_grad_enabled() and any(requires_grad(t) for t in (x, weight, encoder_weight, lam, step, z0))
    checkpoint = NO_BACKWARD if not needs_grad else 0 if recompute else row.save_interval[int(fista)]
    keep = row.residual_policy is not None and checkpoint > 0
    if keep and traced_implementation(row.residual_policy)(x.shape, weight.shape, stride, padding):
        checkpoint |= KEEP_RESIDUALS
    x, weight, encoder_weight = x.contiguous(), weight.contiguous(), encoder_weight.contiguous()
    forward = traced_op_pair(row, SPEC).forward
    batch = x.shape[0]
    items = batch
    if row.batch_limit is not None:
        items = traced_implementation(row.batch_limit)(x, weight, stride, padding, step.shape[0], fista, checkpoint)
        if items < 1 and batch > 0:
            raise ValueError(
                f"conv_ista: backend={row.name!r} addresses fewer than 2**31 elements per buffer, and a single item "
                f"of x {tuple(x.shape)} with weight {tuple(weight.shape)} and {step.shape[0]} iterations needs more; "
                "use backend='reference' or split the signal"
            )

    def solve(xb: Tensor, z0b: Tensor) -> Tensor:
        return forward(
            xb, weight, encoder_weight, lam, step, z0b, list(stride), list(padding), nonneg, fista, checkpoint
        )[0]

    if batch <= items:
        z = solve(x, z0)
    else:
        # Items are independent problems: the batch runs as several calls, whose gradients autograd sums for the
        # shared tensors (dictionaries, lam, step).
        z = torch.cat(
            [solve(x[b : b + items], z0[b : b + items] if z0.numel() > 0 else z0) for b in range(0, batch, items)]
        )
    return z.squeeze(2) if one_d else z
