"""Convolutional ISTA / FISTA in pure PyTorch: the oracle, the CPU fallback and the benchmark baseline.

Forward recurrence (docs/design.md §2), k = 0 .. n_iter-1, with E = conv(., encoder_weight) (E = D^T when tied):

    y_k     = z_k + beta_k (z_k - z_{k-1})            (FISTA; beta_k = (t_{k-1} - 1) / t_k, beta_0 = 0; ISTA: y_k = z_k)
    u_k     = y_k + step_k * E(x - D y_k)
    z_{k+1} = S_{step_k * lam_k}(u_k)                  (S+ when nonneg)

Two implementations live here:

* ``conv_ista_ref`` differentiates through eager PyTorch (autograd saves about five tensors per iteration). It is
  the oracle every backend is compared with, and the "eager" baseline of the benchmarks.
* ``conv_ista_fwd_ref`` / ``conv_ista_bwd_ref`` run the same forward and the hand-written VJP on the canonical
  tensors of the fused-op interface (docs/design.md §7.1). The backward needs only the code iterates z_0..z_n, which
  it restores from checkpoints (``checkpoint_indices``) or replays from z0: the active set of iteration k is
  ``z_{k+1} != 0``, and the residual is recomputed. It is the executable spec of what the fused kernels compute,
  registered as the op ``conv_ista_*_ref``.

VJP of one iteration (g = dL/dz_{k+1}, gu = g * [z_{k+1} != 0], v = E^*(gu) = conv_transpose(gu, encoder_weight)):

    dL/dx        += step_k v
    dL/dy_k       = gu - step_k D^*(v)                       (D^* = conv(., weight))
    dL/dW_E      += step_k * conv_weight_grad(x - D y_k, gu)
    dL/dW_D      -= step_k * conv_weight_grad(v, y_k)
    dL/dtheta_c   = -sum gu * sign(z_{k+1})                   (theta = step_k lam_k; -sum gu when nonneg)
    dL/dlam_k     = step_k dL/dtheta,   dL/dstep_k = <gu, E(x - D y_k)> + <lam_k, dL/dtheta>
    FISTA:  dL/dz_k += (1 + beta_k) dL/dy_k,   dL/dz_{k-1} -= beta_k dL/dy_k
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch._prims_common import make_contiguous_strides_for

from .conv import (
    as_tuple,
    code_size,
    conv_analysis_ref,
    conv_synthesis_ref,
    conv_weight_grad,
    scaled,
    soft_threshold_ref,
    spatial_rank,
)


def fista_momentum(n_iter: int) -> list[float]:
    """``beta_k = (t_{k-1} - 1) / t_k`` for k = 0..n_iter-1 (beta_0 = 0), with t_0 = 1."""
    t = [1.0]
    for _ in range(n_iter):
        t.append((1.0 + math.sqrt(1.0 + 4.0 * t[-1] ** 2)) / 2.0)
    return [0.0] + [(t[k - 1] - 1.0) / t[k] for k in range(1, n_iter)]


def signed_share(gu: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``gu sign(z)`` for a gu already masked to z's support (0 where z is 0), with a NaN code's share 0 even where its
    gradient is NaN, as softshrink's threshold gradient has it; the bare product gives 0 * NaN = NaN there. Kept a
    product and fixed up (one more pass), not selects: torch.where and masked_fill over comparison masks ran about 10x
    slower on the CPU, and a product lays its result out as gu, so a sum over it adds in the same order whatever z's
    layout (the Triton backward's save and recompute modes agree bitwise)."""
    return (gu * torch.sign(z)).masked_fill_(z.isnan(), 0.0)


def _channel_view(values: torch.Tensor, rank: int) -> torch.Tensor:
    """(C,) -> (1, C, 1[, 1]) so per-channel values broadcast over a code."""
    return values.reshape(1, -1, *([1] * rank))


def _residual(x, y, weight, stride, padding):
    """r = x - D y."""
    return x - conv_synthesis_ref(y, weight, x.shape[2:], stride, padding)


def _ista_step(x, y, weight, encoder_weight, lam_k, step_k, stride, padding, nonneg, residuals=None):
    """z_{k+1} from y_k; the residual it forms is appended to ``residuals`` when that is a list."""
    rank = spatial_rank(weight)
    residual = _residual(x, y, weight, stride, padding)
    if residuals is not None:
        residuals.append(residual)
    u = y + scaled(conv_analysis_ref(residual, encoder_weight, stride, padding), step_k)
    return soft_threshold_ref(u, _channel_view(step_k * lam_k, rank), nonneg, select_zeros=False)


def conv_ista_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    lam: torch.Tensor,
    step: torch.Tensor,
    *,
    encoder_weight: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    z0: torch.Tensor | None = None,
    nonneg: bool = False,
    fista: bool = False,
) -> torch.Tensor:
    """Unrolled conv-ISTA/FISTA through eager PyTorch autograd.

    x: (B, C_sig, *S); weight, encoder_weight: (C_code, C_sig, *k); lam: (n_iter, C_code); step: (n_iter,)
    (float32 for half x: ``value_dtype``); z0: (B, C_code, *Sz) or None (zeros). Returns z_{n_iter}: (B, C_code, *Sz).
    """
    rank = spatial_rank(weight)
    stride, padding = as_tuple(stride, rank), as_tuple(padding, rank)
    encoder_weight = weight if encoder_weight is None else encoder_weight
    if z0 is None:
        z0 = x.new_zeros(conv_analysis_ref(x, weight, stride, padding).shape)
    betas = fista_momentum(step.shape[0])
    z_prev = z = z0
    for k in range(step.shape[0]):
        # beta_1 = 0: no momentum term at all (0 * (z - z_prev) is NaN where a code is infinite)
        y = z + betas[k] * (z - z_prev) if fista and betas[k] != 0 else z
        z_prev, z = z, _ista_step(x, y, weight, encoder_weight, lam[k], step[k], stride, padding, nonneg)
    return z


# The fused forward's checkpoint when no backward will follow (inference): nothing is saved, as in recompute mode,
# and a backend may size its workspace for speed alone.
NO_BACKWARD = -1


# A save-mode checkpoint m >= 1 with this bit set (``m | KEEP_RESIDUALS``) also keeps every residual
# r_k = x - D y_k (k < n_iter), so the backward never recomputes D y_k: a replay needs only E r_k, and only for the
# iterates that are not saved. ``saved`` is then flat: the saved iterates as without the bit, followed by the residuals
# as (n_iter, B, *S, C_sig), channels-last per item (the layout the cpp backend's gemm strategy computes them in).
KEEP_RESIDUALS = 1 << 20


def checkpoint_interval(checkpoint: int) -> int:
    """The interval m of a checkpoint (``KEEP_RESIDUALS`` cleared); 0 and ``NO_BACKWARD`` stand for themselves."""
    return checkpoint & ~KEEP_RESIDUALS if checkpoint > 0 else checkpoint


def keeps_residuals(checkpoint: int) -> bool:
    return checkpoint > 0 and bool(checkpoint & KEEP_RESIDUALS)


def checkpoint_indices(n_iter: int, checkpoint: int, fista: bool) -> list[int]:
    """Which iterates z_k the fused forward saves for the backward, with checkpoint interval ``checkpoint``.

    0 saves none (recompute mode: the backward replays from z0), and so does ``NO_BACKWARD``. m >= 1 saves z_k for
    1 <= k < n_iter with k % m == 0 (FISTA also k % m == m - 1, since a replay from z_k needs z_{k-1} too): the
    backward replays each segment [s, s + m) from its checkpoint, one forward iteration less than the segment's
    length. z_0 is the input z0 and z_n the output, so neither is saved twice. m = 1 saves every iterate.
    """
    m = checkpoint_interval(checkpoint)
    if m <= 0:
        return []
    return [k for k in range(1, n_iter) if k % m == 0 or (fista and (k + 1) % m == 0)]


def saved_shape(
    x_shape: Sequence[int], z_shape: Sequence[int], n_iter: int, checkpoint: int, fista: bool
) -> tuple[int, ...]:
    """The shape of the forward's ``saved`` (x: (B, C_sig, *S), z: (B, C_code, *Sz)): (0,) without checkpoints,
    (len(idx), *z_shape) for the iterates alone, flat with the residuals (``KEEP_RESIDUALS``)."""
    if checkpoint <= 0:
        return (0,)
    count = len(checkpoint_indices(n_iter, checkpoint, fista))
    if not keeps_residuals(checkpoint):
        return (count, *z_shape)
    return (count * math.prod(z_shape) + n_iter * math.prod(x_shape),)


def saved_iterates(saved: torch.Tensor, z_shape: Sequence[int], n_iter: int, checkpoint: int, fista: bool):
    """The saved iterates (len(idx), *z_shape) of a forward's ``saved``."""
    if not keeps_residuals(checkpoint):
        return saved
    count = len(checkpoint_indices(n_iter, checkpoint, fista))
    return saved[: count * math.prod(z_shape)].view(count, *z_shape)


def saved_residuals(saved: torch.Tensor, x_shape: Sequence[int], n_iter: int) -> torch.Tensor:
    """The residuals r_0..r_{n-1} of a ``KEEP_RESIDUALS`` forward's ``saved``, as (n_iter, B, C_sig, *S) views of
    its channels-last storage."""
    b, c, *spatial = x_shape
    stored = saved[saved.numel() - n_iter * math.prod(x_shape) :].view(n_iter, b, *spatial, c)
    return stored.movedim(-1, 2)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t with a contiguous tensor's exact strides (the family's fake gives those): .contiguous() keeps the strides
    of size-1 and empty dims, which a channels-last input leaves other than the fake's."""
    return t if t.stride() == make_contiguous_strides_for(t.shape) else t.clone(memory_format=torch.contiguous_format)


def tied(encoder_weight: torch.Tensor) -> bool:
    """The contract's tied encoder: an empty ``(0,)`` ``encoder_weight`` stands for ``weight`` itself. The reference ops
    ran it as a dictionary of rank -1 and raised ("value must have -1 entries"), where cpp and triton take it."""
    return encoder_weight.dim() == 1 and encoder_weight.numel() == 0


def check_n_iter(step: torch.Tensor) -> None:
    """The fused-op contract runs n_iter >= 1 iterations (functional.conv_ista refuses n_iter < 1 first): with none,
    the reference's z_n would be z0 itself, which a custom op may not return (torch's "may not alias any inputs"),
    and the fake would promise a fresh tensor. The C++ and Triton ops refuse it too."""
    if step.dim() != 1 or step.shape[0] < 1:
        raise ValueError(f"conv_ista: step must be (n_iter,) with n_iter >= 1, got {tuple(step.shape)}")


def zeros_if_empty(z0: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride, padding) -> torch.Tensor:
    """The contract's ``z0``: an empty tensor stands for zeros of the code's shape."""
    if z0.numel() > 0:
        return z0
    sz = code_size(x.shape[2:], weight.shape[2:], stride, padding)
    return x.new_zeros((x.shape[0], weight.shape[0], *sz))


def conv_ista_fwd_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    encoder_weight: torch.Tensor,
    lam: torch.Tensor,
    step: torch.Tensor,
    z0: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    nonneg: bool,
    fista: bool,
    checkpoint: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of the fused-op interface: returns ``(z_n, saved)``, ``saved`` (len(idx), *z.shape) holding z_k for k
    in ``checkpoint_indices(n_iter, checkpoint, fista)``, or an empty (0,) tensor when ``checkpoint <= 0``; with
    ``KEEP_RESIDUALS`` flat, the residuals after the iterates (``saved_shape``). An empty ``z0`` means zeros, an
    empty ``(0,)`` ``encoder_weight`` the dictionary itself (tied)."""
    check_n_iter(step)
    z0 = zeros_if_empty(z0, x, weight, stride, padding)
    encoder_weight = weight if tied(encoder_weight) else encoder_weight
    residuals = [] if keeps_residuals(checkpoint) else None
    with torch.no_grad():
        iterates = _run_iterates(
            x, weight, encoder_weight, lam, step, z0, stride, padding, nonneg, fista, residuals=residuals
        )
    # contiguous whatever the inputs' layout, as the other rows and the family's fake give it (a channels-last x
    # came out as a channels-last z and saved, where the fake said contiguous)
    z = _dense(iterates[-1])
    if checkpoint <= 0:
        return z, x.new_empty(0)
    idx = checkpoint_indices(step.shape[0], checkpoint, fista)
    saved = torch.stack([iterates[k] for k in idx]) if idx else z.new_empty((0, *z.shape))
    if residuals is not None:
        saved = torch.cat([saved.flatten(), torch.stack(residuals).movedim(2, -1).flatten()])
    return z, _dense(saved)


def _run_iterates(
    x,
    weight,
    encoder_weight,
    lam,
    step,
    z0,
    stride,
    padding,
    nonneg,
    fista,
    first: int = 0,
    stop: int | None = None,
    z_prev: torch.Tensor | None = None,
    residuals: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """[z_first, ..., z_stop] from z_first = z0 (and z_{first-1} = z_prev for FISTA); stop defaults to n_iter.
    ``residuals`` (a list) collects r_first .. r_{stop-1} on the way."""
    betas = fista_momentum(step.shape[0])
    stop = step.shape[0] if stop is None else stop
    zs = [z0]
    prev = z_prev
    for k in range(first, stop):
        y = zs[-1] + betas[k] * (zs[-1] - prev) if fista and betas[k] != 0 else zs[-1]
        prev = zs[-1]
        zs.append(_ista_step(x, y, weight, encoder_weight, lam[k], step[k], stride, padding, nonneg, residuals))
    return zs


def _restore_iterates(
    x, weight, encoder_weight, lam, step, z0, z, saved, stride, padding, nonneg, fista, checkpoint
) -> list[torch.Tensor]:
    """[z_0, ..., z_n] from the checkpoints, replaying each segment from its start (what the fused backward does
    one segment at a time)."""
    n = step.shape[0]
    if checkpoint == 0:
        return _run_iterates(x, weight, encoder_weight, lam, step, z0, stride, padding, nonneg, fista)
    zs: list[torch.Tensor | None] = [None] * (n + 1)
    zs[0], zs[n] = z0, z
    iterates = saved_iterates(saved, z.shape, n, checkpoint, fista)
    for k, zk in zip(checkpoint_indices(n, checkpoint, fista), iterates.unbind(0)):
        zs[k] = zk
    m = checkpoint_interval(checkpoint)
    for s in range(0, n, m):
        e = min(s + m, n)
        if e - s > 1:
            zs[s + 1 : e] = _run_iterates(
                x,
                weight,
                encoder_weight,
                lam,
                step,
                zs[s],
                stride,
                padding,
                nonneg,
                fista,
                first=s,
                stop=e - 1,
                z_prev=zs[s - 1] if s > 0 else None,
            )[1:]
    return zs


def conv_ista_bwd_ref(
    grad_z: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    encoder_weight: torch.Tensor,
    lam: torch.Tensor,
    step: torch.Tensor,
    z0: torch.Tensor,
    z: torch.Tensor,
    saved: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    nonneg: bool,
    fista: bool,
    checkpoint: int,
) -> tuple[torch.Tensor, ...]:
    """Hand-written VJP of ``conv_ista_fwd_ref``. Returns grads for (x, weight, encoder_weight, lam, step, z0);
    the last is empty when ``z0`` is (zeros). The iterates are restored from the checkpoints (or, when
    ``checkpoint == 0``, replayed from z0), the residuals read from ``saved`` when the forward kept them; this
    reference keeps all iterates during the backward, which the fused backends do not."""
    check_n_iter(step)
    rank = spatial_rank(weight)
    stride, padding = as_tuple(stride, rank), as_tuple(padding, rank)
    n_iter = step.shape[0]
    given_encoder = encoder_weight
    encoder_weight = weight if tied(encoder_weight) else encoder_weight
    given_z0 = z0
    z0 = zeros_if_empty(z0, x, weight, stride, padding)
    with torch.no_grad():
        zs = _restore_iterates(
            x, weight, encoder_weight, lam, step, z0, z, saved, stride, padding, nonneg, fista, checkpoint
        )
        betas = fista_momentum(n_iter)
        grad_x = torch.zeros_like(x)
        grad_w = torch.zeros_like(weight)
        grad_we = torch.zeros_like(encoder_weight)
        grad_lam = torch.zeros_like(lam)
        grad_step = torch.zeros_like(step)
        reduce_dims = [0] + list(range(2, 2 + rank))
        g_next = grad_z.clone()  # dL/dz_{k+1}
        g_carry = torch.zeros_like(z0)  # FISTA: the part of dL/dz_k coming from y_{k+1}
        kept = saved_residuals(saved, x.shape, n_iter) if keeps_residuals(checkpoint) else None
        for k in reversed(range(n_iter)):
            z_new = zs[k + 1]
            use_momentum = fista and betas[k] != 0
            y = zs[k] + betas[k] * (zs[k] - zs[k - 1]) if use_momentum else zs[k]
            active = z_new != 0
            gu = torch.where(active, g_next, torch.zeros_like(g_next))
            residual = _residual(x, y, weight, stride, padding) if kept is None else kept[k]
            e = conv_analysis_ref(residual, encoder_weight, stride, padding)
            v = conv_synthesis_ref(gu, encoder_weight, x.shape[2:], stride, padding)
            grad_x += scaled(v, step[k])
            grad_we += scaled(
                conv_weight_grad(residual, encoder_weight.shape, gu, stride=stride, padding=padding), step[k]
            )
            grad_w -= scaled(conv_weight_grad(v, weight.shape, y, stride=stride, padding=padding), step[k])
            # lam and step may be wider than the codes (float32 for half ones: value_dtype)
            grad_theta = -(gu if nonneg else signed_share(gu, z_new)).sum(reduce_dims, dtype=lam.dtype)
            grad_lam[k] = step[k] * grad_theta
            grad_step[k] = (gu * e).sum(dtype=step.dtype) + (lam[k] * grad_theta).sum()
            grad_y = gu - scaled(conv_analysis_ref(v, weight, stride, padding), step[k])
            if use_momentum:
                g_next = g_carry + (1 + betas[k]) * grad_y
                g_carry = -betas[k] * grad_y
            else:
                g_next = g_carry + grad_y
                g_carry = torch.zeros_like(z0)
        # the gradient has z0's shape, also for a given z0 of an empty batch, whose numel is 0 too
        grad_z0 = g_next if given_z0.numel() > 0 else given_z0.new_empty(given_z0.shape)
        if tied(given_encoder):  # the contract: weight's gradient holds both uses, the empty encoder gets an empty one
            grad_w, grad_we = grad_w + grad_we, torch.empty_like(given_encoder)
    # contiguous, as the fake and the other rows give them (zeros_like kept a channels-last or strided input's layout)
    return tuple(_dense(g) for g in (grad_x, grad_w, grad_we, grad_lam, grad_step, grad_z0))
