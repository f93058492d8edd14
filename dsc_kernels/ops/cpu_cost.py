"""``auto``'s CPU choice for conv-ISTA between eager PyTorch (``reference``) and the fused ``cpp`` backend.

``selection.select`` asks ``prefers(candidate)`` of the hook ``hook(...)`` builds for a call; the table's order
(``cpp`` before ``reference``) stands unless this cost model says the eager path is faster for the call's key:
(signal and kernel sizes, channels, stride, padding, dtype, whether a backward will follow; the
thread count is not part of it, so the choice stays traceable under torch.compile). The
decision is a pure function of that key, so it is the same on every call and in every process.

The model, calibrated on the shape sweep (``dsc_kernels/experiments/sweep.py``; numbers in the README):

- Without a backward (inference), ``cpp``: its forward was 0.98-5.5x eager on the sweep, whichever strategy
  csrc/cpu/conv_ista/strategy.cpp picked, except 0.90x on one many-channel strided shape (32 -> 128, stride 2);
  one shape is too little evidence for a rule, so that loss stands and is published.
- With a backward, ``cpp`` unless the shape is convolution-bound. The fused backward is memory-lean: it replays the
  forward from checkpoints instead of keeping residuals, about 1.5 extra convolutions per iteration on top of
  eager's 6, paid back only by fusing the elementwise work. Two signs that it will not be paid back:
  - many signal channels (``C_sig >= MANY_SIGNAL_CHANNELS``): the gemm strategy then runs oneDNN's convolutions
    exactly as eager does, plus the replayed ones, and the direct strategy (1-D problems) runs its stencils at a
    fraction of oneDNN's speed on many channels; forward + backward was 0.6-1.0x eager on every such sweep shape;
  - a high convolution intensity ``I = C_sig k_h k_w * C_code |code| / (C_code |code| + C_sig |signal|)``
    (multiply-adds of one convolution per element the elementwise passes touch, |.| a spatial size) above
    ``INTENSITY_LIMIT``, where even few signal channels leave too little elementwise work to save.
  A kernel covering the whole map is a matrix product on the ``cpp`` side (2x eager there) whatever its shape.

``DSC_KERNELS_BACKEND`` and an explicit ``backend=`` bypass this module (``selection``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

# Sweep of 2026-12-02 (2 threads; bench/results/cpu-sweep-2026-12-02): with 32 or 64 signal channels forward +
# backward was 0.61-1.01x eager (nine shapes, 1-D and 2-D, intensity 96-384); with 1-8 signal channels 1.08-4.6x up
# to I = 114 and 0.98x at I = 178.
MANY_SIGNAL_CHANNELS = 32
INTENSITY_LIMIT = 165.0


@dataclass(frozen=True)
class ConvIstaKey:
    """What the choice depends on. x_size: (B, C_sig, *S); weight_size: (C_code, C_sig, *k)."""

    x_size: tuple[int, ...]
    weight_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dtype: torch.dtype
    backward: bool

    @property
    def code_size(self) -> tuple[int, ...]:
        return tuple(
            (s + 2 * p - k) // st + 1
            for s, k, st, p in zip(self.x_size[2:], self.weight_size[2:], self.stride, self.padding)
        )

    @property
    def intensity(self) -> float:
        """Multiply-adds of one convolution per element of code and signal (the elementwise passes' traffic)."""
        c_code, c_sig, *kernel = self.weight_size
        code, signal = math.prod(self.code_size), math.prod(self.x_size[2:])
        elements = c_code * code + c_sig * signal
        return c_sig * math.prod(kernel) * c_code * code / elements if elements else 0.0

    @property
    def kernel_covers_map(self) -> bool:
        return tuple(self.weight_size[2:]) == tuple(self.x_size[2:]) and not any(self.padding)


@lru_cache(maxsize=4096)
def faster_on_cpu(key: ConvIstaKey) -> str:
    """``"cpp"`` or ``"reference"``: the one the model expects to run this key faster."""
    if not key.backward or key.kernel_covers_map:
        return "cpp"
    if key.weight_size[1] >= MANY_SIGNAL_CHANNELS or key.intensity > INTENSITY_LIMIT:
        return "reference"
    return "cpp"


def hook(
    x_size: Sequence[int],
    weight_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dtype: torch.dtype,
    backward: bool,
) -> Callable[[str], bool]:
    """For ``selection.select``: ``prefers(candidate)`` says whether auto should take ``candidate`` for this call
    (the reference always qualifies; ``cpp`` when the model expects it to be the faster)."""
    key = ConvIstaKey(
        tuple(int(s) for s in x_size),
        tuple(int(s) for s in weight_size),
        tuple(stride),
        tuple(padding),
        dtype,
        bool(backward),
    )

    def prefers(candidate: str) -> bool:
        return candidate != "cpp" or faster_on_cpu(key) == "cpp"

    return prefers
