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

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..reference.conv_ista import conv_ista_bwd_ref, conv_ista_fwd_ref

FwdImpl = Callable[..., tuple[Tensor, Tensor]]
BwdImpl = Callable[..., tuple[Tensor, ...]]


@dataclass(frozen=True)
class ConvIstaOps:
    forward: Callable[..., tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, ...]]


_BACKENDS: dict[str, ConvIstaOps] = {}
# Backends whose registration lives in its own module, imported on first use: building the C++ extension and
# importing Triton are slow, and Triton reads TRITON_INTERPRET at import time.
_LAZY_MODULES = {"cpp": "dsc_kernels.ops.conv_ista_cpp", "triton": "dsc_kernels.ops.conv_ista_triton"}


def _fake_fwd(x, weight, encoder_weight, lam, step, z0, stride, padding, nonneg, fista, save_iterates):
    iterates = z0.new_empty((step.shape[0], *z0.shape)) if save_iterates else z0.new_empty(0)
    return torch.empty_like(z0), iterates


def _fake_bwd(grad_z, x, weight, encoder_weight, lam, step, z0, z, iterates, stride, padding, nonneg, fista):
    return tuple(torch.empty_like(t) for t in (x, weight, encoder_weight, lam, step, z0))


def _define_python_ops(name: str, fwd: FwdImpl, bwd: BwdImpl, kind: str):
    define = {"custom_op": torch.library.custom_op, "triton_op": torch.library.triton_op}[kind]

    # The annotations are the op schema; the bodies only forward to the backend's implementation.
    @define(f"dsc_kernels::conv_ista_fwd_{name}", mutates_args=())
    def forward(x: Tensor, weight: Tensor, encoder_weight: Tensor, lam: Tensor, step: Tensor, z0: Tensor,
                stride: Sequence[int], padding: Sequence[int], nonneg: bool, fista: bool,
                save_iterates: bool) -> tuple[Tensor, Tensor]:
        return fwd(x, weight, encoder_weight, lam, step, z0, stride, padding, nonneg, fista, save_iterates)

    @define(f"dsc_kernels::conv_ista_bwd_{name}", mutates_args=())
    def backward(grad_z: Tensor, x: Tensor, weight: Tensor, encoder_weight: Tensor, lam: Tensor, step: Tensor,
                 z0: Tensor, z: Tensor, iterates: Tensor, stride: Sequence[int], padding: Sequence[int],
                 nonneg: bool, fista: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return bwd(grad_z, x, weight, encoder_weight, lam, step, z0, z, iterates, stride, padding, nonneg, fista)

    forward.register_fake(_fake_fwd)
    backward.register_fake(_fake_bwd)


def register_conv_ista_backend(name: str, fwd: FwdImpl | None = None, bwd: BwdImpl | None = None, *,
                               kind: str = "custom_op") -> ConvIstaOps:
    """Register backend ``name``'s forward/backward as ops and link them for autograd.

    kind: "custom_op" (Python implementations), "triton_op" (launchers that use ``torch.library.wrap_triton``) or
    "native" (schemas and kernels already registered from C++ with TORCH_LIBRARY_FRAGMENT; ``fwd``/``bwd`` unused).
    """
    if name in _BACKENDS:
        return _BACKENDS[name]
    if kind == "native":
        torch.library.register_fake(f"dsc_kernels::conv_ista_fwd_{name}")(_fake_fwd)
        torch.library.register_fake(f"dsc_kernels::conv_ista_bwd_{name}")(_fake_bwd)
    else:
        _define_python_ops(name, fwd, bwd, kind)
    fwd_op = getattr(torch.ops.dsc_kernels, f"conv_ista_fwd_{name}").default
    bwd_op = getattr(torch.ops.dsc_kernels, f"conv_ista_bwd_{name}").default

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

    torch.library.register_autograd(f"dsc_kernels::conv_ista_fwd_{name}", backward, setup_context=setup_context)
    _BACKENDS[name] = ConvIstaOps(fwd_op, bwd_op)
    return _BACKENDS[name]


def get_backend(name: str) -> ConvIstaOps:
    """The registered ops of backend ``name``, importing its registration module on first use."""
    if name not in _BACKENDS and name in _LAZY_MODULES:
        importlib.import_module(_LAZY_MODULES[name])
    if name not in _BACKENDS:
        raise ValueError(f"no conv-ISTA op is registered for backend {name!r}")
    return _BACKENDS[name]


def conv_ista_op(backend: str, x: Tensor, weight: Tensor, encoder_weight: Tensor, lam: Tensor, step: Tensor,
                 z0: Tensor, stride: Sequence[int], padding: Sequence[int], nonneg: bool, fista: bool,
                 save_iterates: bool) -> Tensor:
    """Run backend ``backend``'s fused conv-ISTA on canonical 2-D tensors (CONTRACT.md) and return z_n."""
    z, _ = get_backend(backend).forward(x, weight, encoder_weight, lam, step, z0, list(stride), list(padding),
                                        nonneg, fista, save_iterates)
    return z


register_conv_ista_backend("ref", conv_ista_fwd_ref, conv_ista_bwd_ref)
