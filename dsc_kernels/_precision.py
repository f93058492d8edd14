"""The TF32 setting of fp32 convolution dots in the fused kernels: cuDNN's switch, or inside a backward the value its
forward ran at.

Recompute mode replays the forward in the backward, and a replay at another precision (the switch flipped between
the two) would differentiate another trajectory than the one the forward took. The backward's pin is a context
variable, so it holds for the thread running that backward only: setting the process-wide switch instead raced
with a second backward on another thread and left the user's setting flipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch

_FORWARD_TF32: ContextVar[bool | None] = ContextVar("dsc_kernels_forward_tf32", default=None)


def conv_tf32_allowed() -> bool:
    """torch.backends.cudnn.allow_tf32, or the forward's value inside ``forward_tf32``."""
    pinned = _FORWARD_TF32.get()
    return torch.backends.cudnn.allow_tf32 if pinned is None else pinned


@contextlib.contextmanager
def forward_tf32(allowed: bool) -> Iterator[None]:
    """Pin ``conv_tf32_allowed`` to ``allowed`` in this thread for the block."""
    token = _FORWARD_TF32.set(allowed)
    try:
        yield
    finally:
        _FORWARD_TF32.reset(token)
