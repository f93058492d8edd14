"""torch.library registration of the fused conv-ISTA ops, one forward/backward pair per backend.

For a backend ``<b>`` this defines (or, for C++ ops, completes) two ops with one schema (notes/CONTRACT.md):

    dsc_kernels::conv_ista_fwd_<b>(x, weight, encoder_weight, lam, step, z0, stride, padding, nonneg, fista,
                                   checkpoint) -> (z, saved)
    dsc_kernels::conv_ista_bwd_<b>(grad_z, x, weight, encoder_weight, lam, step, z0, z, saved, stride, padding,
                                   nonneg, fista, checkpoint) -> (grad_x, grad_weight, grad_encoder_weight, grad_lam,
                                                                  grad_step, grad_z0)

and links them with ``register_autograd``: the backward is itself an op, so ``torch.compile`` traces both. The
forward saves the code iterates ``reference.conv_ista.checkpoint_indices`` names (every ``checkpoint``-th; all of
them for 1) or none (``checkpoint == 0``, recompute mode); the active set of iteration k is recovered as
``z_{k+1} != 0``, so no mask is stored. An empty ``z0`` stands for zeros (and gets an empty gradient), so a problem
started from zero allocates no code-sized z0.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..reference.conv import code_size
from ..reference.conv_ista import checkpoint_indices, conv_ista_bwd_ref, conv_ista_fwd_ref
from ._pair import Family, OpPair


def _fake_fwd(x, weight, encoder_weight, lam, step, z0, stride, padding, nonneg, fista, checkpoint):
    z_shape = (x.shape[0], weight.shape[0], *code_size(x.shape[2:], weight.shape[2:], stride, padding))
    z = x.new_empty(z_shape)
    if checkpoint == 0:
        return z, x.new_empty(0)
    return z, x.new_empty((len(checkpoint_indices(step.shape[0], checkpoint, fista)), *z_shape))


def _fake_bwd(grad_z, x, weight, encoder_weight, lam, step, z0, z, saved, stride, padding, nonneg, fista,
              checkpoint):
    return tuple(torch.empty_like(t) for t in (x, weight, encoder_weight, lam, step, z0))


def _make_autograd(bwd_op):
    def setup_context(ctx, inputs, output):
        x, weight, encoder_weight, lam, step, z0, stride, padding, nonneg, fista, checkpoint = inputs
        z, saved = output
        # Recompute mode keeps nothing code-sized alive for the backward, not even the output: an empty z tells the
        # backward to replay z_n too.
        ctx.save_for_backward(x, weight, encoder_weight, lam, step, z0, z if checkpoint else z.new_empty(0), saved)
        ctx.config = (stride, padding, nonneg, fista, checkpoint)
        ctx.mark_non_differentiable(saved)
        ctx.set_materialize_grads(False)  # else autograd allocates a zero grad for `saved`

    def backward(ctx, grad_z, _grad_saved):
        if grad_z is None:  # grads are not materialised (setup_context): z did not reach the loss
            return (None,) * 11
        x, weight, encoder_weight, lam, step, z0, z, saved = ctx.saved_tensors
        # grad_z is passed as it comes (often an expanded scalar, as from sum()): backends read it through its
        # strides instead of materialising a code-sized copy.
        grads = bwd_op(grad_z, x, weight, encoder_weight, lam, step, z0, z, saved, *ctx.config)
        return (*grads, None, None, None, None, None)

    return setup_context, backward


FAMILY = Family(
    name="conv_ista",
    fwd_schema="(Tensor x, Tensor weight, Tensor encoder_weight, Tensor lam, Tensor step, Tensor z0, int[] stride, "
               "int[] padding, bool nonneg, bool fista, int checkpoint) -> (Tensor, Tensor)",
    bwd_schema="(Tensor grad_z, Tensor x, Tensor weight, Tensor encoder_weight, Tensor lam, Tensor step, Tensor z0, "
               "Tensor z, Tensor saved, int[] stride, int[] padding, bool nonneg, bool fista, int checkpoint) "
               "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    fake_fwd=_fake_fwd, fake_bwd=_fake_bwd, make_autograd=_make_autograd)


def get_backend(name: str) -> OpPair:
    """The (forward, backward) ops of backend ``name`` ("ref", "cpp", "triton"), registering them on first use."""
    return FAMILY.get(name)


def conv_ista_op(backend: str, x: Tensor, weight: Tensor, encoder_weight: Tensor, lam: Tensor, step: Tensor,
                 z0: Tensor, stride: Sequence[int], padding: Sequence[int], nonneg: bool, fista: bool,
                 checkpoint: int) -> Tensor:
    """Run backend ``backend``'s fused conv-ISTA on canonical 2-D tensors (CONTRACT.md) and return z_n."""
    z, _ = get_backend(backend).forward(x, weight, encoder_weight, lam, step, z0, list(stride), list(padding),
                                        nonneg, fista, checkpoint)
    return z


FAMILY.register("ref", "custom_op", conv_ista_fwd_ref, conv_ista_bwd_ref)
