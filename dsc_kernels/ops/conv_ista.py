"""torch.library registration of the fused conv-ISTA ops, one forward/backward pair per backend.

For a backend ``<b>`` this defines (or, for C++ ops, completes) two ops with one schema (notes/CONTRACT.md):

    dsc_kernels::conv_ista_fwd_<b>(x, weight, encoder_weight, lam, step, z0, stride, padding, nonneg, fista,
                                   save_iterates) -> (z, iterates)
    dsc_kernels::conv_ista_bwd_<b>(grad_z, x, weight, encoder_weight, lam, step, z0, z, iterates, stride, padding,
                                   nonneg, fista) -> (grad_x, grad_weight, grad_encoder_weight, grad_lam, grad_step,
                                                      grad_z0)

and links them with ``register_autograd``: the backward is itself an op, so ``torch.compile`` traces both. The
forward saves the code iterates z_0..z_{n-1} (``save_iterates``) or nothing beyond z0 (recompute mode); the active
set of iteration k is recovered as ``z_{k+1} != 0``, so no mask is stored.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..reference.conv_ista import conv_ista_bwd_ref, conv_ista_fwd_ref
from ._pair import Family, OpPair


def _fake_fwd(x, weight, encoder_weight, lam, step, z0, stride, padding, nonneg, fista, save_iterates):
    iterates = z0.new_empty((step.shape[0], *z0.shape)) if save_iterates else z0.new_empty(0)
    return torch.empty_like(z0), iterates


def _fake_bwd(grad_z, x, weight, encoder_weight, lam, step, z0, z, iterates, stride, padding, nonneg, fista):
    return tuple(torch.empty_like(t) for t in (x, weight, encoder_weight, lam, step, z0))


def _make_autograd(bwd_op):
    def setup_context(ctx, inputs, output):
        x, weight, encoder_weight, lam, step, z0, stride, padding, nonneg, fista, _ = inputs
        z, iterates = output
        ctx.save_for_backward(x, weight, encoder_weight, lam, step, z0, z, iterates)
        ctx.config = (stride, padding, nonneg, fista)
        ctx.mark_non_differentiable(iterates)
        ctx.set_materialize_grads(False)  # else autograd allocates a zero (n_iter, *z.shape) grad for `iterates`

    def backward(ctx, grad_z, _grad_iterates):
        if grad_z is None:  # grads are not materialised (setup_context): z did not reach the loss
            return (None,) * 11
        x, weight, encoder_weight, lam, step, z0, z, iterates = ctx.saved_tensors
        grads = bwd_op(grad_z.contiguous(), x, weight, encoder_weight, lam, step, z0, z, iterates, *ctx.config)
        return (*grads, None, None, None, None, None)

    return setup_context, backward


FAMILY = Family(
    name="conv_ista",
    fwd_schema="(Tensor x, Tensor weight, Tensor encoder_weight, Tensor lam, Tensor step, Tensor z0, int[] stride, "
               "int[] padding, bool nonneg, bool fista, bool save_iterates) -> (Tensor, Tensor)",
    bwd_schema="(Tensor grad_z, Tensor x, Tensor weight, Tensor encoder_weight, Tensor lam, Tensor step, Tensor z0, "
               "Tensor z, Tensor iterates, int[] stride, int[] padding, bool nonneg, bool fista) "
               "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    fake_fwd=_fake_fwd, fake_bwd=_fake_bwd, make_autograd=_make_autograd)


def get_backend(name: str) -> OpPair:
    """The (forward, backward) ops of backend ``name`` ("ref", "cpp", "triton"), registering them on first use."""
    return FAMILY.get(name)


def conv_ista_op(backend: str, x: Tensor, weight: Tensor, encoder_weight: Tensor, lam: Tensor, step: Tensor,
                 z0: Tensor, stride: Sequence[int], padding: Sequence[int], nonneg: bool, fista: bool,
                 save_iterates: bool) -> Tensor:
    """Run backend ``backend``'s fused conv-ISTA on canonical 2-D tensors (CONTRACT.md) and return z_n."""
    z, _ = get_backend(backend).forward(x, weight, encoder_weight, lam, step, z0, list(stride), list(padding),
                                        nonneg, fista, save_iterates)
    return z


FAMILY.register("ref", "custom_op", conv_ista_fwd_ref, conv_ista_bwd_ref)
