"""Registers a backend row's two ops (``ops.table``) on first use and links them for autograd.

For every row the forward op returns ``(output, saved)`` and the backward op takes the output's gradient plus what
the forward saved. This module defines (or, for "native" rows whose schemas come from C++, completes) both ops
with the family's fakes, so torch.compile and FakeTensor tracing see shapes, and registers the forward's autograd
formula, which calls the backward op (so the backward is itself traceable). The backward op's own autograd raises:
fused backwards are not differentiable, and double backward must say so rather than return zeros.

Registration is lazy because building the C++ extension takes a while and Triton reads TRITON_INTERPRET when it
is first imported.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

from .._fork_safe import ForkSafeLock
from .._validate import autocasting
from .table import Backend


@dataclass(frozen=True)
class FamilySpec:
    """What every backend of one op family shares: the schemas (without the op name) of Python-implemented ops,
    the fakes, and ``make_autograd(backward_op) -> (setup_context, backward)`` for the forward op."""

    fwd_schema: str
    bwd_schema: str
    fake_fwd: Callable
    fake_bwd: Callable
    make_autograd: Callable[[Callable], tuple[Callable, Callable]]


@dataclass(frozen=True)
class OpPair:
    forward: Callable
    backward: Callable


_PAIRS: dict[tuple[str, str], OpPair] = {}
_LOCK = ForkSafeLock()  # held while the extension loads: as _ext._LOCK, a forked child must not inherit it held


_FUNCTIONS: dict[str, Callable] = {}


def static_kernel_size(weight_shape) -> list[int]:
    """A dictionary's kernel size (its trailing ``rank`` dims after the channels) for a fake, read as ints: under
    torch.compile that specialises it (a guard, like stride and padding, which are ints; another size recompiles).
    With a symbolic one a 1-D code's width is a difference of two symbols (L - k + 1), whose strides torch 2.13's
    inductor fails to order ("Exponent must be non-negative") when the squeezed output leaves the graph."""
    return [int(k) for k in weight_shape]


def implementation(path: str) -> Callable:
    """The function a table entry names as ``module:function`` (imported once, then a dict lookup)."""
    if path not in _FUNCTIONS:
        module, name = path.split(":")
        _FUNCTIONS[path] = getattr(importlib.import_module(module), name)
    return _FUNCTIONS[path]


# Inside a torch.compile trace, Dynamo copies a dict at its first read in a graph. selection._register fills
# _FUNCTIONS and _PAIRS outside the trace, per op family, when the graph reaches that family's call: a graph with two
# families (a transformer block: attention, then conv-ISTA) saw the second one's entries missing, and the import or
# lock that followed cannot be traced. Module attributes and torch.ops are read when reached, so traced calls go
# through them; _register has imported and registered everything by then.


def traced_implementation(path: str) -> Callable:
    """implementation(path) for a call torch.compile may trace (after selection._register registered its row)."""
    if not torch.compiler.is_compiling():
        return implementation(path)
    module, name = path.split(":")
    root, *parts = module.split(".")
    found = sys.modules[root]
    for part in parts:
        found = getattr(found, part)
    return getattr(found, name)


def traced_op_pair(row: Backend, spec: FamilySpec) -> OpPair:
    """op_pair(row, spec) for a call torch.compile may trace (after selection._register registered its row)."""
    if not torch.compiler.is_compiling():
        return op_pair(row, spec)
    return OpPair(_op(row.forward_op), _op(row.backward_op))


def _op(qualified: str):
    namespace, name = qualified.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


def _no_double_backward(row: Backend) -> Callable:
    def backward(ctx, *grads):
        raise RuntimeError(
            f"double backward (gradients of gradients) is not supported by backend={row.name!r} "
            f"({row.backward_op} is not differentiable); use backend='reference' for it"
        )

    return backward


def run_eager(row: Backend, *args, **kwargs):
    """Call ``row.eager`` (the reference's differentiable eager function) under the fused ops' autocast rule
    (``in_float32_under_autocast``), so that every backend returns float32 in an autocast region and computes the
    same thing. Following autocast's own rules instead, the reference returned bfloat16 (its convolutions lowered,
    its steps and thresholds applied to bfloat16 iterates) where cpp returned float32."""
    return in_float32_under_autocast(traced_implementation(row.eager), *args, **kwargs)


def in_float32_under_autocast(implementation, *args, **kwargs):
    """``implementation(*args, **kwargs)`` under the fused ops' autocast rule (``_compute_in_float32_under_autocast``):
    inside an autocast region for the inputs' device its float tensors are taken in float32 (float64 stays) and it
    runs with autocast off."""
    device = next(t.device for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
    if not autocasting(device):
        return implementation(*args, **kwargs)

    def to_float32(t):
        eligible = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(torch.float32) if eligible else t

    args, kwargs = pytree.tree_map(to_float32, (args, kwargs))
    with torch.autocast(device.type, enabled=False):
        return implementation(*args, **kwargs)


def _compute_in_float32_under_autocast(row: Backend) -> None:
    """Inside an autocast region the fused ops take their inputs in float32 (float64 stays) and run with autocast
    off, like ``torch.nn.functional``'s float32-policy ops: the kernels' own ATen calls (oneDNN convolutions in the
    C++ ops) would otherwise come back in bfloat16 next to float32 buffers and fail."""
    # Triton rows run on CPU tensors too under Triton's interpreter (TRITON_INTERPRET=1), where a CUDA-only rule
    # left the op to receive autocast's mixed dtypes and refuse them.
    devices = ("cpu", "cuda") if row.devices is None or row.requires == "triton" else row.devices
    for device in devices:
        if torch.amp.is_autocast_available(device):
            for name in row.op_names:
                torch.library.register_autocast(name, device, torch.float32)


def _no_meta_mix(fake: Callable) -> Callable:
    """``fake``, refusing a meta tensor among tensors of a real device: the dispatcher sends such a call to the fake,
    which answered with uninitialised tensors on the real device, shaped like a result."""

    @functools.wraps(fake)
    def checked(*args, **kwargs):
        devices = {t.device.type for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        if "meta" in devices and len(devices) > 1:
            raise RuntimeError(f"expected every tensor on one device, got meta and {sorted(devices - {'meta'})}")
        return fake(*args, **kwargs)

    return checked


def op_pair(row: Backend, spec: FamilySpec) -> OpPair:
    """The (forward, backward) ops of ``row``, registering them the first time."""
    key = (row.family, row.name)
    if key in _PAIRS:
        return _PAIRS[key]
    with _LOCK:
        if key in _PAIRS:
            return _PAIRS[key]
        if row.requires == "triton":
            from .selection import note_triton_import

            note_triton_import()
        if row.registration == "native":
            from .. import _ext

            _ext.load()  # its TORCH_LIBRARY_FRAGMENTs define the schemas and the CPU kernels
            torch.library.register_fake(row.forward_op)(_no_meta_mix(spec.fake_fwd))
            torch.library.register_fake(row.backward_op)(_no_meta_mix(spec.fake_bwd))
        else:
            for name, impl, schema, fake in (
                (row.forward_op, row.forward_impl, spec.fwd_schema, spec.fake_fwd),
                (row.backward_op, row.backward_impl, spec.bwd_schema, spec.fake_bwd),
            ):
                if row.registration == "custom_op":
                    op = torch.library.custom_op(name, implementation(impl), mutates_args=(), schema=schema)
                else:  # triton_op takes its schema from the launcher's annotations
                    op = torch.library.triton_op(name, implementation(impl), mutates_args=())
                op.register_fake(_no_meta_mix(fake))
        _compute_in_float32_under_autocast(row)
        pair = OpPair(_op(row.forward_op), _op(row.backward_op))
        setup_context, backward = spec.make_autograd(pair.backward)
        torch.library.register_autograd(row.forward_op, backward, setup_context=setup_context)
        torch.library.register_autograd(
            row.backward_op, _no_double_backward(row), setup_context=lambda ctx, inputs, output: None
        )
        _PAIRS[key] = pair
        return pair
