"""The multi-layer pursuit (ML-ISTA) op family: one schema, its fakes and autograd, and ``run`` for any row.

Every backend row defines two ops with this schema (the C++ ops declare the same one in C++;
``tests/test_backend_table.py`` checks both):

    <forward_op>(x, weights[], encoder_weights[], input_encoder_weights[], thresholds[], steps[], z0, strides,
                 paddings, nonneg, fista, project, checkpoint) -> (codes[], saved[])
    <backward_op>(grad_codes[], x, weights[], encoder_weights[], input_encoder_weights[], thresholds[], steps[], z0,
                  codes[], saved[], strides, paddings, nonneg, fista, project, checkpoint)
        -> (grad_x, grad_weights[], grad_encoder_weights[], grad_input_encoder_weights[], grad_thresholds[],
            grad_steps[], grad_z0)

The recurrence and its VJP are written out in ``reference/ml_ista.py``. A network of L layers has a variable number
of tensors, so every per-layer argument is a ``Tensor[]`` with one entry per layer (canonical 2-D tensors; 1-D
problems run as height-1 images):

- x (B, C_0, H, W); weights[j] (S_w, C_j, C_{j-1}, kh, kw) with S_w = 1 (shared by every step) or S (one dictionary
  per step); encoder_weights[j], input_encoder_weights[j]: the same shapes, or an empty tensor: E_j = D_j (tied), and
  no input encoder (A_j = E_j, P_j = D_j); thresholds[j] (S, C_j); steps[j] (S,), S = the number of steps; z0
  (B, C_L, Hz, Wz) in project mode, or empty (zeros); strides, paddings: two ints per layer.
- codes[j] (B, C_j, ...): the last step's codes. saved: the iterates G^1..G^{S-1} stacked per layer,
  (S-1, B, C_j, ...), for layers c-1 .. L-1 (checkpoint c >= 1, "save mode": ``run`` leaves out the first layers
  whose analysis costs at most CHEAP_ANALYSIS multiply-adds per code value, such as a first layer on grey images,
  and the backward recomputes their codes), or only for the step state (checkpoint 0, the memory-lean mode: the
  deepest layer in project mode; the backward replays each step from it), or nothing (checkpoint -1: the forward
  runs without autograd, no backward follows). The interleaved iteration's state is every layer: all are saved.
- grad_codes[j] may be empty: no gradient reached layer j. Gradients have their inputs' shapes (empty for empty).

Tensor[] keeps one tensor per parameter, as the user holds them: nothing is packed or copied per call, and
torch.library, FakeTensor, opcheck and torch.compile(fullgraph=True) all handle lists of tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._validate import requires_grad
from ..reference.ml_ista import check_z0_mode, layer_sizes, saved_layers
from . import table
from .registry import FamilySpec, OpPair, run_eager, static_kernel_size, traced_op_pair
from .registry import op_pair as _register_pair
from .table import Backend

FAMILY = "ml_ista"
FWD_SCHEMA = (
    "(Tensor x, Tensor[] weights, Tensor[] encoder_weights, Tensor[] input_encoder_weights, "
    "Tensor[] thresholds, Tensor[] steps, Tensor z0, int[] strides, int[] paddings, bool nonneg, "
    "bool fista, bool project, int checkpoint) -> (Tensor[], Tensor[])"
)
BWD_SCHEMA = (
    "(Tensor[] grad_codes, Tensor x, Tensor[] weights, Tensor[] encoder_weights, "
    "Tensor[] input_encoder_weights, Tensor[] thresholds, Tensor[] steps, Tensor z0, Tensor[] codes, "
    "Tensor[] saved, int[] strides, int[] paddings, bool nonneg, bool fista, bool project, "
    "int checkpoint) -> (Tensor, Tensor[], Tensor[], Tensor[], Tensor[], Tensor[], Tensor)"
)

NO_BACKWARD = -1  # checkpoint value of a forward that runs without autograd: nothing saved
# Save mode does not keep the codes of the first layers whose analysis costs at most this many multiply-adds per
# code value (C_{j-1} kh kw): recomputing them in the backward costs a few percent of a step (MNIST's first layer:
# 36, three quarters of the network's code memory) where keeping them would cost most of the saved memory.
CHEAP_ANALYSIS = 64


def _fake_fwd(
    x,
    weights,
    encoder_weights,
    input_encoder_weights,
    thresholds,
    steps,
    z0,
    strides,
    paddings,
    nonneg,
    fista,
    project,
    checkpoint,
):
    check_z0_mode(z0, project)
    sizes = layer_sizes(x.shape[2:], [static_kernel_size(w.shape[3:]) for w in weights], strides, paddings)
    codes = [x.new_empty((x.shape[0], w.shape[1], *sizes[j + 1])) for j, w in enumerate(weights)]
    if checkpoint == NO_BACKWARD:
        return codes, []
    n_saved = steps[0].shape[0] - 1
    return codes, [x.new_empty((n_saved, *codes[j].shape)) for j in saved_layers(len(weights), project, checkpoint)]


def _fake_bwd(
    grad_codes,
    x,
    weights,
    encoder_weights,
    input_encoder_weights,
    thresholds,
    steps,
    z0,
    codes,
    saved,
    strides,
    paddings,
    nonneg,
    fista,
    project,
    checkpoint,
):
    check_z0_mode(z0, project)

    def like(ts):
        return [torch.empty_like(t) for t in ts]

    return (
        torch.empty_like(x),
        like(weights),
        like(encoder_weights),
        like(input_encoder_weights),
        like(thresholds),
        like(steps),
        torch.empty_like(z0),
    )


def _make_autograd(bwd_op):
    def setup_context(ctx, inputs, output):
        (
            x,
            weights,
            encoder_weights,
            input_encoder_weights,
            thresholds,
            steps,
            z0,
            strides,
            paddings,
            nonneg,
            fista,
            project,
            checkpoint,
        ) = inputs
        codes, saved = output
        depth = len(weights)
        # The memory-lean mode keeps only the saved step states alive, not the output codes: the backward replays
        # the last step too.
        kept_codes = codes if checkpoint >= 1 else [c.new_empty(0) for c in codes]
        ctx.save_for_backward(
            x, z0, *weights, *encoder_weights, *input_encoder_weights, *thresholds, *steps, *kept_codes, *saved
        )
        ctx.layout = (depth, len(saved))
        ctx.config = (strides, paddings, nonneg, fista, project, checkpoint)
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)  # absent code gradients stay None (sent as empty tensors)

    def backward(ctx, grad_codes, _grad_saved):
        depth, n_saved = ctx.layout
        if all(g is None for g in grad_codes):  # the structure of the inputs: a list per Tensor[] argument
            none = [None] * depth
            return None, none, none, none, none, none, None, None, None, None, None, None, None
        x, z0, *rest = ctx.saved_tensors
        groups = [rest[i * depth : (i + 1) * depth] for i in range(6)]
        weights, encoder_weights, input_encoder_weights, thresholds, steps, codes = groups
        saved = rest[6 * depth : 6 * depth + n_saved]
        grad_codes = [x.new_empty(0) if g is None else g for g in grad_codes]
        gx, gw, gwe, gwi, gt, gs, gz0 = bwd_op(
            grad_codes,
            x,
            weights,
            encoder_weights,
            input_encoder_weights,
            thresholds,
            steps,
            z0,
            codes,
            saved,
            *ctx.config,
        )
        return gx, gw, gwe, gwi, gt, gs, gz0, None, None, None, None, None, None

    return setup_context, backward


SPEC = FamilySpec(FWD_SCHEMA, BWD_SCHEMA, _fake_fwd, _fake_bwd, _make_autograd)


def op_pair(backend: str) -> OpPair:
    """The (forward, backward) ops of ``backend``'s row, registered on first use."""
    return _register_pair(table.row(FAMILY, backend), SPEC)


def _save_mode_checkpoint(weights: Sequence[Tensor]) -> int:
    """1 + the number of leading layers whose codes are cheap to recompute (see CHEAP_ANALYSIS)."""
    cheap = 0
    while cheap < len(weights) - 1 and weights[cheap][0, 0].numel() <= CHEAP_ANALYSIS:
        cheap += 1
    return 1 + cheap


def run(
    row: Backend,
    x: Tensor,
    weights: Sequence[Tensor],
    encoder_weights: Sequence[Tensor],
    input_encoder_weights: Sequence[Tensor],
    thresholds: Sequence[Tensor],
    steps: Sequence[Tensor],
    z0: Tensor,
    strides: Sequence[int],
    paddings: Sequence[int],
    nonneg: bool,
    fista: bool,
    project: bool,
    recompute: bool,
) -> list[Tensor]:
    """Run the multi-layer pursuit on canonical tensors (the op schema above, 1-D or 2-D) with ``row``'s backend and
    return [G_1, ..., G_L]. ``recompute`` asks for the memory-lean backward (checkpoint 0)."""
    if row.eager is None and min(x.shape[1], *(w.shape[1] for w in weights)) == 0:
        # A layer without channels leaves no work for a fused kernel, yet the codes after it are not zero (sigma(-t)
        # of an empty analysis); the reference's PyTorch ops give them and their gradients exactly.
        row = table.row(FAMILY, "reference")
    if row.eager is not None:
        return run_eager(
            row,
            x,
            list(weights),
            list(encoder_weights),
            list(input_encoder_weights),
            list(thresholds),
            list(steps),
            z0,
            list(strides),
            list(paddings),
            nonneg,
            fista,
            project,
        )
    one_d = x.dim() == 3
    if one_d:
        x, z0 = x.unsqueeze(2), (z0.unsqueeze(2) if z0.numel() else z0)
        weights, encoder_weights, input_encoder_weights = (
            [w.unsqueeze(-2) if w.numel() else w for w in ws]
            for ws in (weights, encoder_weights, input_encoder_weights)
        )
        strides = [v for s in strides for v in (1, s)]
        paddings = [v for p in paddings for v in (0, p)]
    tensors = (x, z0, *weights, *encoder_weights, *input_encoder_weights, *thresholds, *steps)
    needs_grad = torch.is_grad_enabled() and any(requires_grad(t) for t in tensors)
    checkpoint = (0 if recompute else _save_mode_checkpoint(weights)) if needs_grad else NO_BACKWARD

    def contiguous(ts):
        return [t.contiguous() for t in ts]

    codes, _ = traced_op_pair(row, SPEC).forward(
        x.contiguous(),
        contiguous(weights),
        contiguous(encoder_weights),
        contiguous(input_encoder_weights),
        contiguous(thresholds),
        contiguous(steps),
        z0.contiguous(),
        list(strides),
        list(paddings),
        nonneg,
        fista,
        project,
        checkpoint,
    )
    return [c.squeeze(2) for c in codes] if one_d else list(codes)
