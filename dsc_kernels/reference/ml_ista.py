"""Multi-layer pursuit in pure PyTorch: ML-ISTA / ML-FISTA (Sulam, Aberdam, Beck & Elad, "On multi-layer basis
pursuit, efficient algorithms and convolutional neural networks", TPAMI 2019), their learned variants (ML-LISTA's
input encoders, "All-Free" per-step filters) and the interleaved layer-by-layer iteration of the All-Free network.

Layers j = 1..L; G_0 = x. Layer j has a dictionary D_j (``weights[j]``, shape (C_j, C_{j-1}, *k_j), the layout of a
conv weight with out_channels = C_j) acting between layer j-1 (the "signal" of layer j) and layer j (its code):

    analysis   D_j^T r = conv(r, W, stride_j, padding_j)
    synthesis  D_j z   = conv_transpose(z, W, stride_j, padding_j, output_padding)   (sized to layer j-1: exact adjoint)

with ``output_padding`` chosen so that D_j z has exactly layer j-1's spatial size (reference/conv.py); code sizes follow
from x's size layer by layer: Sz_j = (Sz_{j-1} + 2 p_j - k_j) // s_j + 1.

Per layer and step k the operators are
    D_{j,k}: synthesis with weights[j]                  E_{j,k}: analysis with encoder_weights[j] (default D's weight)
    A_{j,k}: analysis with input_encoder_weights[j]     P_{j,k}: synthesis with input_encoder_weights[j]
             (default E_{j,k})                                   (default D_{j,k}): the projection
each weight either shared by every step or given per step (a leading dimension of length S = number of steps).

Recurrence, k = 0 .. S-1 (``functional.ml_ista`` runs S = n_iter + 1 steps: step 0 is the initial encoding, then
n_iter = T unfoldings; ``functional.conv_ista``'s one-layer variants run S = n_iter). Start: G_j^0 = 0 (or G_L^0 = z0).

    project (ML-ISTA):  Z = G_L^k + beta_k (G_L^k - G_L^{k-1});  Y_L = Z;  Y_{j-1} = P_{j,k} Y_j   (j = L..2)
    interleaved:        Y_j = G_j^k + beta_k (G_j^k - G_j^{k-1})                                 (every j)
    every layer, j = 1..L in order:
                        G_j^{k+1} = sigma_{t_{j,k}}( Y_j + c_{j,k} (A_{j,k} G_{j-1}^{k+1} - E_{j,k} D_{j,k} Y_j) )

returning [G_1^S, ..., G_L^S]. beta_k is FISTA's momentum (reference.conv_ista.fista_momentum; 0 without FISTA, and
beta_0 = beta_1 = 0). sigma_t(u) = max(u - t, 0) when ``nonneg`` (a ReLU with bias b = -t: the published networks'
F.relu(... + b), any sign), else S_t(u) = sign(u) max(|u| - t, 0) with t >= 0. t_{j,k}: ``thresholds[j]`` (S, C_j),
c_{j,k}: ``steps[j]`` (S,).

Without input encoders A = E, so the drive is one analysis of a residual, c E(G_{j-1} - D Y_j) (Sulam et al.'s
gamma_j = sigma(gamma~_j - c_j D_j^T(D_j gamma~_j - gamma_{j-1}) + b_j)); step 0 from zero is their initial encoding
gamma_j = sigma(c_j D_j^T gamma_{j-1} + b_j). With input encoders B_j it is ML-LISTA: G_j = sigma(Y_j - W_j^T W_j Y_j
+ B_j^T G_{j-1} + b_j) with the projections made by B_j. With project=False each layer restarts from its own previous
code: the All-Free network's iteration. One layer is conv-ISTA with an input encoder: z <- sigma(z + c(B x - E D z)).

Two implementations:

* ``ml_ista_ref``: the recurrence written plainly, differentiated by autograd: the oracle.
* ``ml_ista_fwd_ref`` / ``ml_ista_bwd_ref``: the fused-op interface (ops/ml_ista.py) with the hand-written VJP, the
  executable spec of the C++ backend. The forward reuses the projections: with P_j = D_j (no input encoder) and
  project, D_j Y_j = Y_{j-1} is already computed, so a step costs L syntheses and L analyses instead of 2L - 1 and L.
  It saves the code iterates G^1..G^{S-1} of layers c..L (checkpoint c >= 1: every layer for c = 1; the ops layer
  leaves out first layers that are cheap to recompute; ``saved_layers`` counts from 0: c-1..L-1) or only the step
  state (checkpoint 0: the deepest code in project mode), every layer in the interleaved iteration; the backward
  replays each step from its saved state, recomputing the codes it did not save, and the active set of layer j in
  step k is G_j^{k+1} != 0, so no mask is stored.

VJP of one step (g_j = dL/dG_j^{k+1}, gu = g_j [G_j^{k+1} != 0], c = c_{j,k}, R = G_{j-1}^{k+1} - D Y_j):
    v_A = A^* gu, v_E = E^* gu (syntheses; one when A = E)
    dL/dG_{j-1}^{k+1} += c v_A       dL/dW_A += c wgrad(G_{j-1}, gu)      dL/dW_E -= c wgrad(D Y_j, gu)
    (A = E: dL/dW_E += c wgrad(R, gu))                dL/dc = <v_A, G_{j-1}> - <v_E, D Y_j>   (A = E: <v_E, R>)
    dL/dt_c = -sum gu sign(G_j^{k+1}) (nonneg: -sum gu; NaN codes: sign 0, nonneg 1)     dL/dY_j += gu
    h = -c v_E = dL/d(D Y_j):  reused projection: dL/dY_{j-1} += h;  else dL/dY_j += D^* h, dL/dW_D += wgrad(h, Y_j)
    projections, j = 2..L upwards: dL/dY_j += P^* dL/dY_{j-1},  dL/dW_P += wgrad(dL/dY_{j-1}, Y_j)
    momentum: dL/dG^k += (1 + beta_k) dL/dY,  dL/dG^{k-1} -= beta_k dL/dY   (deepest layer only in project mode)
where wgrad(a, b) = conv_weight_grad(input=a, grad_output=b), the weight gradient of an analysis a -> b.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .conv import code_size, conv_analysis_ref, conv_synthesis_ref, conv_weight_grad, scaled, soft_threshold_ref
from .conv_ista import fista_momentum, signed_share


def given(t: Tensor) -> bool:
    """The op interface's optional tensors: an empty tensor stands for "absent" (tied encoder, zero z0/gradient)."""
    return t.numel() > 0


def check_z0_mode(z0: Tensor, project: bool) -> None:
    """A starting code exists for the projected iteration only, whose state is the deepest code; the interleaved
    iteration's state is every layer. The C++ ops refuse it too, so no backend's raw op reads it differently."""
    if z0.numel() and not project:
        raise ValueError("ml_ista: z0 must be empty outside project mode (the interleaved state is every layer)")


def at_step(w: Tensor, k: int) -> Tensor:
    """Step k's entry of a per-step stack whose leading dimension is 1 (shared by every step) or S."""
    return w[0] if w.shape[0] == 1 else w[k]


def layer_sizes(
    x_size: Sequence[int], kernel_sizes: Sequence[Sequence[int]], strides: Sequence[int], paddings: Sequence[int]
) -> list[tuple[int, ...]]:
    """Spatial sizes [S_0 = x's, S_1, ..., S_L] of every layer; kernel_sizes[j] is layer j's k (weights[j] is
    (S_w, C_j, C_{j-1}, *k)) and strides / paddings are flat lists of rank ints per layer."""
    rank = len(x_size)
    sizes = [tuple(x_size)]
    for j, k in enumerate(kernel_sizes):
        sizes.append(code_size(sizes[-1], k, strides[rank * j : rank * (j + 1)], paddings[rank * j : rank * (j + 1)]))
    return sizes


@dataclass(frozen=True)
class Problem:
    """The op's arguments in one place, with the per-layer operators of step k."""

    x: Tensor
    weights: Sequence[Tensor]
    encoder_weights: Sequence[Tensor]
    input_encoder_weights: Sequence[Tensor]
    thresholds: Sequence[Tensor]
    steps: Sequence[Tensor]
    strides: Sequence[int]
    paddings: Sequence[int]
    nonneg: bool
    fista: bool
    project: bool

    @property
    def depth(self) -> int:
        return len(self.weights)

    @property
    def n_steps(self) -> int:
        return self.steps[0].shape[0]

    @property
    def rank(self) -> int:
        return self.x.dim() - 2

    def geometry(self, j: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        r = self.rank
        return tuple(self.strides[r * j : r * (j + 1)]), tuple(self.paddings[r * j : r * (j + 1)])

    def sizes(self) -> list[tuple[int, ...]]:
        return layer_sizes(self.x.shape[2:], [w.shape[3:] for w in self.weights], self.strides, self.paddings)

    def has_input_encoder(self, j: int) -> bool:
        return given(self.input_encoder_weights[j])

    def reuses_projection(self, j: int) -> bool:
        """D_j Y_j is the projection Y_{j-1} already computed (project mode, P_j = D_j)."""
        return self.project and j > 0 and not self.has_input_encoder(j)

    def dictionary(self, j: int, k: int) -> Tensor:
        return at_step(self.weights[j], k)

    def encoder(self, j: int, k: int) -> Tensor:
        w = self.encoder_weights[j]
        return at_step(w, k) if given(w) else self.dictionary(j, k)

    def input_encoder(self, j: int, k: int) -> Tensor:
        w = self.input_encoder_weights[j]
        return at_step(w, k) if given(w) else self.encoder(j, k)

    def projector(self, j: int, k: int) -> Tensor:
        w = self.input_encoder_weights[j]
        return at_step(w, k) if given(w) else self.dictionary(j, k)

    def synthesis(self, z: Tensor, w: Tensor, j: int, signal_size) -> Tensor:
        stride, padding = self.geometry(j)
        return conv_synthesis_ref(z, w, signal_size, stride, padding)

    def analysis(self, r: Tensor, w: Tensor, j: int) -> Tensor:
        stride, padding = self.geometry(j)
        return conv_analysis_ref(r, w, stride, padding)

    def weight_grad(self, signal_side: Tensor, code_side: Tensor, w: Tensor, j: int) -> Tensor:
        stride, padding = self.geometry(j)
        return conv_weight_grad(signal_side, w.shape, code_side, stride=stride, padding=padding)

    def shrink(self, u: Tensor, j: int, k: int) -> Tensor:
        t = self.thresholds[j][k].reshape(1, -1, *([1] * self.rank))
        return soft_threshold_ref(u, t, self.nonneg)  # F.softshrink's gradient: 0 where the code is 0, even for inf g

    def starts_at_zero(self, k: int, z0: Tensor) -> bool:
        """Step k starts from the zero codes: the first step, without a z0 (interleaved: never given)."""
        return k == 0 and z0.dim() <= 1

    def initial_codes(self, z0: Tensor) -> list[Tensor]:
        check_z0_mode(z0, self.project)
        sizes = self.sizes()
        codes = [self.x.new_zeros((self.x.shape[0], w.shape[1], *sizes[j + 1])) for j, w in enumerate(self.weights)]
        if z0.dim() > 1:  # a z0 of an empty batch has no entries, yet it is given (and gets a gradient)
            codes[-1] = z0
        return codes


def _momentum(p: Problem, k: int, code: Tensor, previous: Tensor | None, betas: list[float]) -> Tensor:
    return code + betas[k] * (code - previous) if p.fista and betas[k] != 0 else code  # 0 * inf would be NaN


def ml_ista_ref(
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
) -> list[Tensor]:
    """The recurrence of the module docstring through eager autograd (every D_j Y_j computed, nothing saved).

    x: (B, C_0, *S); weights[j], encoder_weights[j], input_encoder_weights[j]: (S_w, C_j, C_{j-1}, *k_j) with S_w
    1 or S (the encoders may be empty: tied / absent); thresholds[j]: (S, C_j); steps[j]: (S,); z0: (B, C_L, *Sz_L)
    or empty (zeros); strides, paddings: rank ints per layer. Returns [G_1, ..., G_L].
    """
    p = Problem(
        x, weights, encoder_weights, input_encoder_weights, thresholds, steps, strides, paddings, nonneg, fista, project
    )
    sizes = p.sizes()
    betas = fista_momentum(p.n_steps)
    codes = p.initial_codes(z0)
    previous = list(codes)
    for k in range(p.n_steps):
        zero = p.starts_at_zero(k, z0)
        previous, codes = codes, _step(p, k, codes, previous, sizes, betas, reuse=False, zero=zero)[2]
    return codes


def _step(p: Problem, k: int, state: list, previous: list, sizes, betas, reuse: bool = True, zero: bool = False):
    """One step from ``state`` (the codes G^k; only the deepest is read in project mode), with the projection reuse
    of the fused kernels (``reuse``) or without (the oracle). ``zero``: every start is the zero code (step 0 without
    z0), so no synthesis runs, as in the fused kernels: D 0 is 0 even for a dictionary holding NaN or inf (the
    initial encoding sigma(c E^T G_{j-1} - t) never reads D). Returns (starts Y_j, reconstructions D_j Y_j, new
    codes G^{k+1})."""
    if p.project:
        starts = [None] * p.depth
        starts[-1] = _momentum(p, k, state[-1], previous[-1], betas)
        for j in reversed(range(1, p.depth)):
            starts[j - 1] = (
                p.x.new_zeros((p.x.shape[0], p.weights[j - 1].shape[1], *sizes[j]))
                if zero
                else p.synthesis(starts[j], p.projector(j, k), j, sizes[j])
            )
    else:
        starts = [_momentum(p, k, c, prev, betas) for c, prev in zip(state, previous)]
    reconstructions, codes, below = [], [], p.x
    for j in range(p.depth):
        if zero:  # D 0 = 0 and E D 0 = 0 without reading E or D
            dy = p.x.new_zeros((p.x.shape[0], p.weights[j].shape[2], *sizes[j]))
            drive = p.analysis(below, p.input_encoder(j, k), j)
        else:
            dy = (
                starts[j - 1]
                if reuse and p.reuses_projection(j)
                else p.synthesis(starts[j], p.dictionary(j, k), j, sizes[j])
            )
            if p.has_input_encoder(j):
                drive = p.analysis(below, p.input_encoder(j, k), j) - p.analysis(dy, p.encoder(j, k), j)
            else:
                drive = p.analysis(below - dy, p.encoder(j, k), j)
        below = p.shrink(starts[j] + scaled(drive, p.steps[j][k]), j, k)
        reconstructions.append(dy)
        codes.append(below)
    return starts, reconstructions, codes


def saved_layers(depth: int, project: bool, checkpoint: int) -> list[int]:
    """The layers (0-based) whose iterates G^1..G^{S-1} the forward saves: layers c-1 .. L-1 for checkpoint c >= 1
    (the deepest always: it is a project-mode step's state), the deepest only for checkpoint 0, none for checkpoint -1
    (no backward follows); every layer in the interleaved iteration, whose state is every layer."""
    if checkpoint < 0:
        return []
    if not project:
        return list(range(depth))
    first = depth - 1 if checkpoint == 0 else min(checkpoint - 1, depth - 1)
    return list(range(first, depth))


def ml_ista_fwd_ref(
    x: Tensor,
    weights: list[Tensor],
    encoder_weights: list[Tensor],
    input_encoder_weights: list[Tensor],
    thresholds: list[Tensor],
    steps: list[Tensor],
    z0: Tensor,
    strides: list[int],
    paddings: list[int],
    nonneg: bool,
    fista: bool,
    project: bool,
    checkpoint: int,
) -> tuple[list[Tensor], list[Tensor]]:
    """Forward of the op interface: (codes [G_1^S..G_L^S], saved), saved[i] = (S-1, B, C_j, *Sz_j) holding G_j^1..
    G_j^{S-1} for the layers ``saved_layers`` names."""
    p = Problem(
        x, weights, encoder_weights, input_encoder_weights, thresholds, steps, strides, paddings, nonneg, fista, project
    )
    sizes, betas = p.sizes(), fista_momentum(p.n_steps)
    keep = saved_layers(p.depth, project, checkpoint)
    history: list[list[Tensor]] = []
    with torch.no_grad():
        state = p.initial_codes(z0)
        previous = state
        for k in range(p.n_steps):
            if k > 0 and keep:
                history.append(state)
            _, _, new = _step(p, k, state, previous, sizes, betas, zero=p.starts_at_zero(k, z0))
            previous, state = state, new
    saved = [
        torch.stack([h[j] for h in history]) if history else state[j].new_empty((0, *state[j].shape)) for j in keep
    ]
    return state, saved


def _restore_states(p: Problem, z0: Tensor, saved: list[Tensor], checkpoint: int) -> list[list[Tensor | None]]:
    """The step inputs G^0..G^{S-1} from the saved iterates (None where a project-mode step does not read them)."""
    keep = saved_layers(p.depth, p.project, checkpoint)
    initial = p.initial_codes(z0)
    states = [initial]
    for k in range(1, p.n_steps):
        state: list[Tensor | None] = [None] * p.depth
        for j, stack in zip(keep, saved):
            state[j] = stack[k - 1]
        states.append(state)
    return states


def ml_ista_bwd_ref(
    grad_codes: list[Tensor],
    x: Tensor,
    weights: list[Tensor],
    encoder_weights: list[Tensor],
    input_encoder_weights: list[Tensor],
    thresholds: list[Tensor],
    steps: list[Tensor],
    z0: Tensor,
    codes: list[Tensor],
    saved: list[Tensor],
    strides: list[int],
    paddings: list[int],
    nonneg: bool,
    fista: bool,
    project: bool,
    checkpoint: int,
):
    """Hand-written VJP of ``ml_ista_fwd_ref``: (grad_x, grad_weights, grad_encoder_weights,
    grad_input_encoder_weights, grad_thresholds, grad_steps, grad_z0), each shaped like its input (empty for empty
    inputs). grad_codes[j] may be empty (no gradient reached G_j). ``codes`` is not read: each step is replayed from
    its saved state, the last one included."""
    p = Problem(
        x, weights, encoder_weights, input_encoder_weights, thresholds, steps, strides, paddings, nonneg, fista, project
    )
    sizes, betas = p.sizes(), fista_momentum(p.n_steps)
    reduce_dims = [0, *range(2, 2 + p.rank)]
    with torch.no_grad():
        states = _restore_states(p, z0, saved, checkpoint)
        grad_x = torch.zeros_like(x)
        grad_w = [torch.zeros_like(w) for w in weights]
        grad_we = [torch.zeros_like(w) for w in encoder_weights]
        grad_wi = [torch.zeros_like(w) for w in input_encoder_weights]
        grad_t = [torch.zeros_like(t) for t in thresholds]
        grad_c = [torch.zeros_like(c) for c in steps]
        initial = states[0]
        g_state = [g.clone() if given(g) else torch.zeros_like(c) for g, c in zip(grad_codes, initial)]
        carry = [torch.zeros_like(c) for c in initial]

        def slot(grads: list[Tensor], j: int, k: int) -> Tensor:
            return grads[j][0] if grads[j].shape[0] == 1 else grads[j][k]

        for k in reversed(range(p.n_steps)):
            previous = states[k - 1] if k > 0 else states[k]
            zero = p.starts_at_zero(k, z0)  # Y = 0 and D Y = 0 are constants: no term reads them (0 * NaN)
            starts, recon, outs = _step(p, k, states[k], previous, sizes, betas, zero=zero)
            g = g_state
            g_start = [torch.zeros_like(s) for s in starts]
            for j in reversed(range(p.depth)):
                below = x if j == 0 else outs[j - 1]
                c = steps[j][k]
                gu = torch.where(outs[j] != 0, g[j], torch.zeros_like(g[j]))
                # thresholds and steps may be wider than the codes (float32 for half ones: value_dtype)
                grad_t[j][k] -= (gu if p.nonneg else signed_share(gu, outs[j])).sum(reduce_dims, dtype=c.dtype)
                e_grad = slot(grad_we, j, k) if given(encoder_weights[j]) else slot(grad_w, j, k)
                v_e = p.synthesis(gu, p.encoder(j, k), j, sizes[j])
                if p.has_input_encoder(j):
                    v_a = p.synthesis(gu, p.input_encoder(j, k), j, sizes[j])
                    slot(grad_wi, j, k).add_(scaled(p.weight_grad(below, gu, weights[j][0], j), c))
                    grad_c[j][k] += (v_a * below).sum(dtype=c.dtype)
                    if not zero:
                        e_grad.sub_(scaled(p.weight_grad(recon[j], gu, weights[j][0], j), c))
                        grad_c[j][k] -= (v_e * recon[j]).sum(dtype=c.dtype)
                else:
                    v_a = v_e
                    residual = below - recon[j]
                    e_grad.add_(scaled(p.weight_grad(residual, gu, weights[j][0], j), c))
                    grad_c[j][k] += (v_e * residual).sum(dtype=c.dtype)
                if j == 0:
                    grad_x += scaled(v_a, c)
                else:
                    g[j - 1] = g[j - 1] + scaled(v_a, c)
                g_start[j] += gu
                if zero:
                    continue
                h = scaled(v_e, -c)  # dL/d(D_j Y_j)
                if p.reuses_projection(j):
                    g_start[j - 1] += h
                else:
                    g_start[j] += p.analysis(h, p.dictionary(j, k), j)
                    slot(grad_w, j, k).add_(p.weight_grad(h, starts[j], weights[j][0], j))
            if p.project:
                for j in range(1, 1 if zero else p.depth):
                    g_start[j] += p.analysis(g_start[j - 1], p.projector(j, k), j)
                    p_grad = slot(grad_wi, j, k) if p.has_input_encoder(j) else slot(grad_w, j, k)
                    p_grad.add_(p.weight_grad(g_start[j - 1], starts[j], weights[j][0], j))
                moving = [p.depth - 1]
                g_state = [torch.zeros_like(c) for c in initial]
            else:
                moving = list(range(p.depth))
                g_state = [None] * p.depth
            beta = betas[k] if p.fista and k > 0 else 0.0
            for j in moving:
                g_state[j] = carry[j] + (1 + beta) * g_start[j]
                carry[j] = -beta * g_start[j]
        grad_z0 = g_state[-1] if z0.dim() > 1 else z0.new_empty(0)
    return grad_x, grad_w, grad_we, grad_wi, grad_t, grad_c, grad_z0
