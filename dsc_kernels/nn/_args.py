"""Argument checks the layers share: each raises ``TypeError``/``ValueError`` naming the argument at construction,
before any parameter is made."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.utils import parametrize

from .. import _validate as check
from ..reference.conv import code_size, value_dtype

# Appended to a negative threshold's error by every layer that takes one.
SIGNED_HINT = " (the signed soft threshold needs t >= 0; a negative threshold, a ReLU with bias -t, needs nonneg=True)"


def positive_int(name: str, value: object) -> int:
    return check.count(name, value, 1)


def stack_channels(channels: object) -> list[int]:
    """A stack's channel counts [C_0, C_1, ..., C_L]: the input's, then each layer's code channels (L >= 1)."""
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
        raise TypeError(f"channels must be a sequence of ints [C_0, ..., C_L], got {channels!r}")
    channels = [positive_int("channels", c) for c in channels]
    if len(channels) < 2:
        raise ValueError(f"channels must list at least two channel counts, got {channels!r}")
    return channels


def per_layer(name: str, value: object, depth: int, *, scalar: bool = False) -> list:
    """One value per layer of a stack: a list holds one per layer; anything else (an int, a (h, w) tuple, "same") is
    every layer's value. ``scalar``: the value is a number or tensor, so a tuple can only be a misspelt list."""
    if scalar and isinstance(value, tuple):
        raise TypeError(f"{name} must be a float, a tensor or a list with one per layer, got the tuple {value!r}")
    values = list(value) if isinstance(value, list) else [value] * depth
    if len(values) != depth:
        raise ValueError(f"{name} must be one value or a list of {depth} (one per layer), got {value!r}")
    return values


def flags(**values: object) -> None:
    """Each a bool: a truthy string such as "no" would otherwise silently switch an option on."""
    for name, value in values.items():
        check.flag(name, value)


def float_dtype(dtype: object) -> torch.dtype:
    """The factory ``dtype`` (None: the default dtype), which must be floating point: the layers' parameters are
    learned and their values (thresholds, steps) are real numbers."""
    if dtype is None:
        return torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    return dtype


def apply_keeping_fixed_values_wide(module: torch.nn.Module, names: Sequence[str], apply, *args) -> None:
    """Run ``apply(*args)`` (the parent's ``nn.Module._apply``: ``.half()``, ``.to(...)``) and give the buffers
    ``names`` the dtype their values are carried in (``value_dtype``: float32 for half precision), from their values
    before: a fixed step or threshold in float16 is often subnormal, and functional carries them in float32 for half
    signals anyway."""
    fixed = {name: module._buffers[name] for name in names if module._buffers.get(name) is not None}
    apply(*args)
    for name, before in fixed.items():
        after = module._buffers[name]
        if after.dtype != value_dtype(after.dtype):
            module._buffers[name] = before.to(device=after.device, dtype=value_dtype(after.dtype))


def check_value(
    name: str,
    value: object,
    shapes: list[tuple[int, ...]],
    *,
    allow_negative: bool = False,
    positive: bool = False,
    hint: str = "",
    dtype: torch.dtype | None = None,
) -> float | Tensor:
    """A float or tensor of one of ``shapes``, finite, >= 0 (> 0 when ``positive``) unless ``allow_negative``, and
    within ``dtype``'s range when given (it would be stored as inf)."""
    value = check.real_or_tensor(name, value)
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if tuple(value.shape) not in shapes:
            raise ValueError(f"{name} must have one of the shapes {shapes}, got {tuple(value.shape)}")
        data = value.detach()
        if check.storageless(data):
            return value
        finite = bool(torch.isfinite(data).all())
        low, high = (float(data.min()), float(data.abs().max())) if data.numel() else (0.0, 0.0)
    else:
        try:
            low = float(value)
        except OverflowError:  # an int beyond every float
            low = math.inf
        finite, high = math.isfinite(low), abs(low)
    if not finite:
        raise ValueError(f"{name} must be finite, got {value!r}")
    if dtype is not None and high > torch.finfo(dtype).max:
        raise ValueError(f"{name} must fit in {dtype} (|value| <= {torch.finfo(dtype).max:.3g}), got {value!r}")
    if positive and low <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if not allow_negative and low < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}{hint}")
    return value


def stack_signal_sizes(
    signal_size: object, code: Tensor, geometries: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]]
) -> list[tuple[int, ...]]:
    """The signal size each layer of a 2-D stack decodes to, from the input's ``signal_size``: layer j's signal is
    layer j - 1's code (``reference.conv.code_size`` of each (kernel_size, stride, padding) in ``geometries``).

    Checked against the user's own numbers: a signal_size that leaves some layer no codes, or whose deepest codes are
    not ``code``'s size, is a ValueError naming signal_size. Left to each layer's decode, the error quoted a layer's
    intermediate size ("signal_size must be >= 1, got -1" for signal_size=(1, 1)). ``code``: checked by
    ``deepest_code``."""
    sizes = [check.ints("signal_size", signal_size, 2, minimum=1)]
    for j, (kernel_size, stride, padding) in enumerate(geometries):  # layer j counted from 0, as forward's errors
        codes = code_size(sizes[-1], kernel_size, stride, padding)
        if min(codes) < 1:
            raise ValueError(
                f"signal_size {sizes[0]} has no codes: layer {j}'s input would be {sizes[-1]}, smaller than its "
                f"kernel {tuple(kernel_size)} with padding {tuple(padding)}"
            )
        sizes.append(codes)
    if tuple(code.shape[2:]) != sizes[-1]:
        raise ValueError(
            f"code has spatial size {tuple(code.shape[2:])}, but an input of signal_size {sizes[0]} has deepest "
            f"codes of size {sizes[-1]}"
        )
    return sizes


def deepest_code(code: object, channels: int) -> Tensor:
    """A stack's decode input, (B, C_L, H_L, W_L) with the deepest layer's C_L channels. Checked here so that the
    error names ``code``: the deepest layer's own decode named its ``z`` and a ``weight`` the caller never passed."""
    code = check.tensor("code", code, rank=4)
    if code.shape[1] != channels:
        raise ValueError(
            f"code must be (B, C_L={channels}, H_L, W_L) (the deepest layer's channels), got shape {tuple(code.shape)}"
        )
    return code


def smallest_stack_signal_size(
    code: Tensor, geometries: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]]
) -> tuple[int, ...]:
    """The smallest input size (2-D) whose deepest codes through the stack's ``geometries`` have ``code``'s size.

    Each layer's own smallest signal, chosen from the deepest layer up, can be one that no signal of the layer above
    codes to: for kernel 2 at its default padding 1 every signal has at least 2 codes, so a deeper layer that decoded
    its codes to a size-1 signal left decode(forward(x)) raising on the model's own output. The stack's code size is
    non-decreasing in the input size and grows by at most one per input row, so the smallest input that reaches the
    code's size has exactly that size, or no input has (a code smaller than the 1-pixel input's). ``code``: checked
    by ``deepest_code``."""

    def deepest(n: int, axis: int) -> int:  # 0 where some layer has no codes (inputs smaller than a kernel)
        for kernel_size, stride, padding in geometries:
            n = (n + 2 * padding[axis] - kernel_size[axis]) // stride[axis] + 1
            if n < 1:
                return 0
        return n

    size = []
    for axis, want in enumerate(code.shape[2:]):
        high = 1
        while deepest(high, axis) < want:
            high *= 2
        low = high // 2 + 1 if high > 1 else 1
        while low < high:
            middle = (low + high) // 2
            low, high = (middle + 1, high) if deepest(middle, axis) < want else (low, middle)
        # an empty code (want 0) "matched" the 1-pixel input that has no codes, and the error then named that
        # signal_size, which the caller never gave
        if want < 1 or deepest(low, axis) != want:
            raise ValueError(
                f"code has spatial size {tuple(code.shape[2:])}, which no input of this stack codes to (a 1 x 1 "
                f"input has deepest codes of size {tuple(deepest(1, a) for a in range(2))}, 0 where it has none)"
            )
        size.append(low)
    return tuple(size)


def parametrized_tensors(module: torch.nn.Module, name: str) -> list[Tensor] | None:
    """The tensors a parametrized ``name`` of ``module`` is computed from (the originals, weight_norm keeps two, and
    the parametrizations' own parameters and buffers), or None when ``name`` is a plain tensor. Reading ``name``
    itself computes it anew, and spectral_norm's runs its power iteration in place in training mode."""
    if not parametrize.is_parametrized(module, name):
        return None
    holder = getattr(module.parametrizations, name)
    return [*holder.parameters(), *holder.buffers()]
