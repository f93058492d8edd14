"""Argument checks the layers share: each raises ``TypeError``/``ValueError`` naming the argument at construction,
before any parameter is made."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def check_value(
    name: str,
    value: object,
    shapes: list[tuple[int, ...]],
    *,
    allow_negative: bool = False,
    positive: bool = False,
    hint: str = "",
) -> float | Tensor:
    """A float or tensor of one of ``shapes``, finite, >= 0 (> 0 when ``positive``) unless ``allow_negative``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if tuple(value.shape) not in shapes:
            raise ValueError(f"{name} must have one of the shapes {shapes}, got {tuple(value.shape)}")
        data = value.detach()
        if data.is_meta:
            return value
        finite, low = bool(torch.isfinite(data).all()), float(data.min()) if data.numel() else 0.0
    else:
        finite, low = math.isfinite(value), float(value)
    if not finite:
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and low <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if not allow_negative and low < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}{hint}")
    return value
