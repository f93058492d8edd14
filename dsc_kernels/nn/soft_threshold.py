"""The soft threshold as a module, with a fixed or learned threshold (scalar or per channel)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _validate as check
from .. import functional as DF
from ..reference.conv import value_dtype
from . import _projection
from ._args import SIGNED_HINT, apply_keeping_fixed_values_wide, check_value, flags, float_dtype, positive_int


class SoftThreshold(_projection.Projected):
    """Soft threshold ``S_t(x) = sign(x) max(|x| - t, 0)`` (``max(x - t, 0)`` with ``nonneg``) as a module.

    Args:
        threshold: t, a float (default 0.1); t >= 0 for the signed soft threshold, any sign with ``nonneg``
            (``max(x - t, 0)``, a ReLU with bias -t).
        num_channels: None for one scalar threshold (any input shape), or C for one threshold per channel (input
            (B, C, *)). State-dict key ``threshold``: () or (C,).
        nonneg: the one-sided variant ``max(x - t, 0)`` (a ReLU with bias -t).
        learnable: make ``threshold`` an ``nn.Parameter``; without ``nonneg`` it is kept >= 0 by projection after
            every optimiser step (the forward uses the stored value as is).
        device, dtype: factory keywords. A fixed threshold of a float16/bfloat16 module is a float32 buffer (also
            after ``.half()``), as ``nn.Softshrink`` reads its float ``lambd``; a learnable one has the module's dtype.

    Raises ValueError for a non-finite threshold, or a negative one without ``nonneg``.
    """

    def __init__(
        self,
        threshold: float = 0.1,
        num_channels: int | None = None,
        *,
        nonneg: bool = False,
        learnable: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        flags(nonneg=nonneg, learnable=learnable)
        check_value("threshold", threshold, [()], allow_negative=nonneg, hint=SIGNED_HINT, dtype=float_dtype(dtype))
        if num_channels is not None:
            num_channels = positive_int("num_channels", num_channels)
        self.num_channels, self.nonneg = num_channels, nonneg
        shape = () if num_channels is None else (num_channels,)
        self._init_threshold = float(threshold)
        if learnable:
            self.threshold = nn.Parameter(torch.full(shape, self._init_threshold, device=device, dtype=dtype))
            self.register_projection()
        else:
            # a fixed threshold in float32 for a half-precision module, as nn.Softshrink reads its float lambd
            wide = value_dtype(float_dtype(dtype))
            self.register_buffer("threshold", torch.full(shape, self._init_threshold, device=device, dtype=wide))

    def _apply(self, fn, recurse: bool = True):
        apply_keeping_fixed_values_wide(self, ("threshold",), super()._apply, fn, recurse)
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The initial threshold again (what ``to_empty()`` after a ``device="meta"`` construction needs)."""
        self.threshold.fill_(self._init_threshold)

    def constraints(self):
        """(parameter, lower, upper) bounds kept valid by projection."""
        threshold = _projection.stored_parameter(self, "threshold")  # or a pruned one's threshold_orig
        return [(threshold, 0.0, None)] if threshold is not None and not self.nonneg else []

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, *) with ``num_channels=C``, any shape otherwise -> same shape, in x's dtype (an activation:
        a float64 x against a float32 threshold gives float64, as ``functional.soft_threshold``)."""
        check.tensor("x", x)
        t = self.threshold
        if self.num_channels is not None:
            if x.dim() < 2 or x.shape[1] != self.num_channels:
                raise ValueError(
                    f"x must be (B, {self.num_channels}, ...) for num_channels={self.num_channels}, "
                    f"got shape {tuple(x.shape)}"
                )
            t = t.reshape(1, -1, *([1] * (x.dim() - 2)))
        return DF.soft_threshold(x, t, nonneg=self.nonneg)

    def extra_repr(self) -> str:
        channels = "" if self.num_channels is None else f"num_channels={self.num_channels}, "
        learnable = isinstance(self.threshold, nn.Parameter)
        # a fixed scalar threshold is the module's one setting (nn.Softshrink prints its lambd); ConvSparseCoding
        # prints its fixed scalar lam the same way
        shown = not learnable and self.threshold.dim() == 0 and not check.storageless(self.threshold)
        value = f"threshold={float(self.threshold):.4g}, " if shown else ""
        return f"{value}{channels}nonneg={self.nonneg}, learnable={learnable}"
