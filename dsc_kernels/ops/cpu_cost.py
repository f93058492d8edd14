"""``auto``'s CPU choice for conv-ISTA between eager PyTorch (``reference``) and the fused ``cpp`` backend.

``selection.select`` asks ``prefers(candidate)`` of the hook ``hook(...)`` builds for a call; the table's order
(``cpp`` before ``reference``) stands unless this cost model says the eager path is faster for the call's key:
(signal and kernel sizes, channels, stride, padding, dtype, whether a backward will follow; the
thread count is not part of it, so the choice stays traceable under torch.compile). The
decision is a pure function of that key, so it is the same on every call and in every process.

The model, calibrated on the shape sweep (``dsc_kernels/experiments/sweep.py``; numbers in the README):

- Without a backward (inference), ``cpp``: its forward was 1.3-7.9x eager on every sweep shape.
- With a backward, ``cpp`` unless the convolution intensity
  ``I = C_sig k_h k_w * C_code |code| / (C_code |code| + C_sig |signal|)`` (multiply-adds of one convolution per
  element the elementwise passes touch, |.| a spatial size) exceeds ``INTENSITY_LIMIT``. The fused backward keeps
  memory lean by saving every other iterate and, where ``keep_residuals`` says so, the residuals, and replays the
  rest; on convolution-bound shapes the gemm strategy's channels-last oneDNN convolutions and fused passes pay that
  back, less and less as the convolutions dominate: forward + backward 1.05-1.49x eager at I = 96-384 on the sweep
  (Intel Xeon, residuals kept, bench/results/cpu-sweep-2026-12-02c), 1.02x at 768 (128 -> 256), then 0.97x at 1152
  (256 -> 256): above the limit eager is taken. (128 -> 128 at I = 576 and 128 -> 512 at I = 922 were timed in
  runs that are not committed. On the AMD EPYC, before the residuals were kept, parity came at I = 384.)
  A kernel covering the whole map is a matrix product on the ``cpp`` side (2x eager there) whatever its intensity.

``DSC_KERNELS_BACKEND`` and an explicit ``backend=`` bypass this module (``selection``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# Where forward + backward crossed eager on the Intel Xeon sweep of 2026-12-02 with kept residuals
# (bench/results/cpu-sweep-2026-12-02c): 1.02x at I = 768, 0.97x at I = 1152 (that sweep has no I = 922 shape).
INTENSITY_LIMIT = 800.0


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


def faster_on_cpu(key: ConvIstaKey) -> str:
    """``"cpp"`` or ``"reference"``: the one the model expects to run this key faster."""
    if not key.backward or key.kernel_covers_map:
        return "cpp"
    return "reference" if key.intensity > INTENSITY_LIMIT else "cpp"


def hook(
    x_size: Sequence[int],
    weight_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dtype: torch.dtype,
    backward: bool,
) -> Callable[[str], bool]:
    """For ``selection.select``: ``prefers(candidate)`` says whether auto should take ``candidate`` for this call
    (the reference always qualifies; ``cpp`` when the model expects it to be the faster).

    The sizes are kept as they come and read only when ``auto`` asks: under torch.compile / torch.export they are
    symbols, and ``int()`` of one specialises it, so every functional call (an explicit backend too) compiled
    a graph for one batch size and signal size only (dynamic=True recompiled per shape; export refused a dynamic
    batch). The model's comparisons become guards on the decision itself, which does not depend on the batch."""
    key = ConvIstaKey(tuple(x_size), tuple(weight_size), tuple(stride), tuple(padding), dtype, bool(backward))

    def prefers(candidate: str) -> bool:
        return candidate != "cpp" or faster_on_cpu(key) == "cpp"

    return prefers


def keep_residuals(
    x_size: Sequence[int], weight_size: Sequence[int], stride: Sequence[int], padding: Sequence[int]
) -> bool:
    """Whether the ``cpp`` backend's save-mode forward also keeps every residual r_k = x - D y_k
    (``reference.conv_ista.KEEP_RESIDUALS``), so that its backward never recomputes D y_k (4-D sizes).

    Kept residuals cost C_sig |signal| per item and iteration, next to the ~2 codes and a signal eager keeps. They
    are kept when that is at most a quarter of a code (under a tenth of eager's memory), or, up to a whole code, where
    the replayed convolution is GEMM-bound (>= 32 signal channels, or code maps of at most 16 x 16): measured on the
    shape sweep, forward + backward 9-18% faster there for 0.1-0.24 of eager's memory, while on few-channel large maps
    (8 -> 16 channels on 64 x 64) the direct strategy gained 2% for 0.18.
    """
    key = ConvIstaKey(tuple(x_size), tuple(weight_size), tuple(stride), tuple(padding), torch.float32, True)
    code_map = math.prod(key.code_size)
    signal, code = math.prod(x_size[1:]), weight_size[0] * code_map
    return 4 * signal <= code or (signal <= code and (x_size[1] >= 32 or code_map <= 256))
