"""Drop-in sparse coding layers: each forward is one call into ``dsc_kernels.functional``.

State-dict keys are the same for every backend: ``weight`` (C_code, C_sig, *k), ``encoder_weight`` (untied only),
``lam`` ((n_iter, C_code) when learned, else a scalar buffer) and ``step`` ((n_iter,) when learned, else a scalar
buffer).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import functional as DF

IntOrTuple = int | Sequence[int]


def _tuple(value: IntOrTuple, rank: int) -> tuple[int, ...]:
    return (value,) * rank if isinstance(value, int) else tuple(value)


class SoftThreshold(nn.Module):
    """``S_t(x)`` (``max(x - t, 0)`` with ``nonneg``) with a threshold per channel (``num_channels``) or a scalar.

    Input (B, C, *) when ``num_channels`` is given, any shape otherwise. ``learnable`` makes the threshold a
    parameter, kept >= 0 by clamping in the forward.
    """

    def __init__(self, threshold: float = 0.1, num_channels: int | None = None, *, nonneg: bool = False,
                 learnable: bool = False, device=None, dtype=None):
        super().__init__()
        shape = () if num_channels is None else (num_channels,)
        value = torch.full(shape, float(threshold), device=device, dtype=dtype)
        if learnable:
            self.threshold = nn.Parameter(value)
        else:
            self.register_buffer("threshold", value)
        self.num_channels, self.nonneg = num_channels, nonneg

    def forward(self, x: Tensor) -> Tensor:
        t = self.threshold.clamp(min=0)
        if self.num_channels is not None:
            t = t.reshape(1, -1, *([1] * (x.dim() - 2)))
        return DF.soft_threshold(x, t, nonneg=self.nonneg)

    def extra_repr(self) -> str:
        channels = "" if self.num_channels is None else f"num_channels={self.num_channels}, "
        return f"{channels}nonneg={self.nonneg}, learnable={isinstance(self.threshold, nn.Parameter)}"


class _ConvSparseCoding(nn.Module):
    _rank: int

    def __init__(self, in_channels: int, code_channels: int, kernel_size: IntOrTuple, *, stride: IntOrTuple = 1,
                 padding: IntOrTuple | None = None, n_iter: int = 10, lam: float = 0.1, step: float | None = None,
                 learn_lam: bool = False, learn_step: bool = False, untied: bool = False, nonneg: bool = False,
                 fista: bool = False, recompute: bool = False, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        rank = self._rank
        self.kernel_size = _tuple(kernel_size, rank)
        self.stride = _tuple(stride, rank)
        # Default padding keeps the spatial size at stride 1 (exactly for odd kernels).
        self.padding = tuple(k // 2 for k in self.kernel_size) if padding is None else _tuple(padding, rank)
        self.in_channels, self.code_channels = in_channels, code_channels
        self.n_iter, self.nonneg, self.fista, self.recompute, self.backend = n_iter, nonneg, fista, recompute, backend
        factory = dict(device=device, dtype=dtype)

        self.weight = nn.Parameter(self._unit_norm_filters(torch.empty(code_channels, in_channels,
                                                                       *self.kernel_size, **factory)))
        self.encoder_weight = nn.Parameter(self.weight.detach().clone()) if untied else None
        if step is None:
            step = 1.0 / self._lipschitz_estimate()
        self._register_value("lam", lam, (n_iter, code_channels), learn_lam, factory)
        self._register_value("step", step, (n_iter,), learn_step, factory)

    @staticmethod
    def _unit_norm_filters(weight: Tensor) -> Tensor:
        with torch.no_grad():
            weight.normal_()
            weight /= weight.flatten(1).norm(dim=1).reshape(-1, *([1] * (weight.dim() - 1)))
        return weight

    def _lipschitz_estimate(self) -> float:
        """||D||^2 at a size several kernels wide: it approaches its value on large signals from below within a
        few percent, and the forward's step must not depend on each input's size."""
        size = [max(32, 4 * k * s) for k, s in zip(self.kernel_size, self.stride)]
        return DF.lipschitz_constant(self.weight.detach(), size, stride=self.stride, padding=self.padding,
                                     n_iter=50)

    def _register_value(self, name: str, value: float, learned_shape: tuple[int, ...], learned: bool, factory):
        if learned:
            self.register_parameter(name, nn.Parameter(torch.full(learned_shape, float(value), **factory)))
        else:
            self.register_buffer(name, torch.tensor(float(value), **factory))

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C_sig, *S) -> z: (B, C_code, *Sz)."""
        # Learned lam and step are kept in their valid range by clamping rather than by re-parametrising, so
        # their state-dict values are the values used.
        return DF.conv_ista(x, self.weight, self.lam.clamp(min=0), n_iter=self.n_iter,
                            step=self.step.clamp(min=1e-12), encoder_weight=self.encoder_weight, stride=self.stride,
                            padding=self.padding, nonneg=self.nonneg, fista=self.fista, backend=self.backend,
                            recompute=self.recompute)

    def decode(self, z: Tensor, signal_size: Sequence[int] | None = None) -> Tensor:
        """x_hat = D z: (B, C_code, *Sz) -> (B, C_sig, *signal_size); the default size is the smallest signal with
        codes of this size (the input's size at stride 1)."""
        if signal_size is None:
            signal_size = [(n - 1) * s - 2 * p + k
                           for n, s, p, k in zip(z.shape[2:], self.stride, self.padding, self.kernel_size)]
        return DF.conv_synthesis(z, self.weight, stride=self.stride, padding=self.padding, signal_size=signal_size)

    def extra_repr(self) -> str:
        options = [f"{self.in_channels}, {self.code_channels}, kernel_size={self.kernel_size}",
                   f"stride={self.stride}", f"padding={self.padding}", f"n_iter={self.n_iter}"]
        options += [name for name in ("nonneg", "fista", "recompute") if getattr(self, name)]
        if self.encoder_weight is not None:
            options.append("untied")
        options += [f"learn_{name}" for name in ("lam", "step") if isinstance(getattr(self, name), nn.Parameter)]
        return ", ".join(options + [f"backend={self.backend!r}"])


class ConvSparseCoding1d(_ConvSparseCoding):
    """Unrolled conv-ISTA/FISTA layer on 1-D signals: (B, C_sig, L) -> codes (B, C_code, L_z)."""

    _rank = 1


class ConvSparseCoding2d(_ConvSparseCoding):
    """Unrolled conv-ISTA/FISTA layer on images: (B, C_sig, H, W) -> codes (B, C_code, H_z, W_z).

    >>> layer = ConvSparseCoding2d(1, 32, 7, n_iter=10, lam=0.1)
    >>> z = layer(x); x_hat = layer.decode(z)
    """

    _rank = 2


class DeepSparseCoding2d(nn.Module):
    """Layered pursuit through a DSC model: ``G_1 = ISTA(x; D_1)``, ``G_j = ISTA(G_{j-1}; D_j)``.

    ``channels = [C_0, C_1, ..., C_J]``; ``kernel_sizes``, ``strides``, ``paddings``, ``lams``: one value for every
    layer, or a list with one per layer; other keyword options go to every ``ConvSparseCoding2d`` layer. forward(x) returns the list
    of codes ``[G_1, ..., G_J]``.
    """

    def __init__(self, channels: Sequence[int], kernel_sizes: IntOrTuple | Sequence[IntOrTuple], *,
                 strides: IntOrTuple | Sequence[IntOrTuple] = 1, paddings: Sequence[IntOrTuple] | None = None,
                 lams: float | Sequence[float] = 0.1, n_iter: int = 10, nonneg: bool = True, **layer_options):
        super().__init__()
        depth = len(channels) - 1
        if depth < 1:
            raise ValueError(f"channels must list at least two channel counts, got {channels!r}")

        def per_layer(name, value):
            values = list(value) if isinstance(value, list) else [value] * depth
            if len(values) != depth:
                raise ValueError(f"{name} must be one value or a list of {depth}, got {value!r}")
            return values

        kernel_sizes, strides, lams = per_layer("kernel_sizes", kernel_sizes), per_layer("strides", strides), \
            per_layer("lams", lams)
        paddings = [None] * depth if paddings is None else per_layer("paddings", paddings)
        self.layers = nn.ModuleList(
            ConvSparseCoding2d(channels[j], channels[j + 1], kernel_sizes[j], stride=strides[j], padding=paddings[j],
                               lam=lams[j], n_iter=n_iter, nonneg=nonneg, **layer_options)
            for j in range(depth))

    def forward(self, x: Tensor) -> list[Tensor]:
        codes = []
        for layer in self.layers:
            x = layer(x)
            codes.append(x)
        return codes

    def decode(self, code: Tensor) -> Tensor:
        """The signal a deepest code G_J stands for: D_1 D_2 ... D_J G_J."""
        for layer in reversed(self.layers):
            code = layer.decode(code)
        return code
