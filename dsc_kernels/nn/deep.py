"""A stack of conv sparse-coding layers: layered basis pursuit, each layer's code the next one's signal."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ._args import (
    SIGNED_HINT,
    check_value,
    deepest_code,
    flags,
    per_layer,
    smallest_stack_signal_size,
    stack_channels,
    stack_signal_sizes,
)
from .sparse_coding import ConvSparseCoding2d, IntOrTuple


class DeepSparseCoding2d(nn.Module):
    """Layered pursuit through a DSC model: ``G_1 = ISTA(x; D_1)``, ``G_j = ISTA(G_{j-1}; D_j)``.

    Args:
        channels: [C_0, C_1, ..., C_J], the input's channels then each layer's code channels.
        kernel_sizes, strides, paddings, lams: one value for every layer, or a list with one per layer.
        lams: LASSO weights >= 0 (default 0.1), in units of each layer's input RMS while ``relative`` is on.
        thresholds: absolute thresholds instead of ``lams`` (one or per layer; negative allowed with nonneg).
        n_iter: iterations per layer (default 10).
        nonneg: non-negative codes (default True: the ReLU CNN view of layered pursuit).
        relative: thresholds relative to each layer's input RMS (default True), so that every layer is active
            whatever the scale of the codes reaching it (with absolute thresholds deep layers of a fresh stack
            often output exactly zero and cannot recover).
        **layer_options: any other ``ConvSparseCoding2d`` keyword (untied, fista, learn_lam, backend, ...).

    forward(x): x (B, C_0, H, W) -> the list of codes ``[G_1, ..., G_J]``, G_j (B, C_j, H_j, W_j).
    decode(G_J, signal_size=None): D_1 ... D_J G_J, (B, C_0, H, W) with ``signal_size=(H, W)`` the input's size.
    """

    def __init__(
        self,
        channels: Sequence[int],
        kernel_sizes: IntOrTuple | Sequence[IntOrTuple],
        *,
        strides: IntOrTuple | Sequence[IntOrTuple] = 1,
        paddings: Sequence[IntOrTuple] | None = None,
        lams: float | Sequence[float] | None = None,
        thresholds: float | Sequence[float] | None = None,
        n_iter: int = 10,
        nonneg: bool = True,
        relative: bool = True,
        **layer_options,
    ):
        super().__init__()
        flags(nonneg=nonneg, relative=relative)
        channels = stack_channels(channels)
        depth = len(channels) - 1
        kernel_sizes, strides = per_layer("kernel_sizes", kernel_sizes, depth), per_layer("strides", strides, depth)
        lams = per_layer("lams", lams, depth, scalar=True)
        thresholds = per_layer("thresholds", thresholds, depth, scalar=True)
        paddings = [None] * depth if paddings is None else per_layer("paddings", paddings, depth)
        for lam in lams:
            if lam is not None:
                check_value("lams", lam, [tuple(getattr(lam, "shape", ()))])
        for threshold in thresholds:
            if threshold is not None:
                check_value(
                    "thresholds",
                    threshold,
                    [tuple(getattr(threshold, "shape", ()))],
                    allow_negative=nonneg,
                    hint=SIGNED_HINT,
                )
        layers = []
        for j in range(depth):
            try:
                layers.append(
                    ConvSparseCoding2d(
                        channels[j],
                        channels[j + 1],
                        kernel_sizes[j],
                        stride=strides[j],
                        padding=paddings[j],
                        lam=lams[j],
                        threshold=thresholds[j],
                        n_iter=n_iter,
                        nonneg=nonneg,
                        relative=relative,
                        **layer_options,
                    )
                )
            except (ValueError, TypeError) as err:
                raise type(err)(f"layer {j}: {err}") from None
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        """x: (B, C_0, H, W) -> the list of codes ``[G_1, ..., G_J]``, G_j (B, C_j, H_j, W_j)."""
        codes = []
        for j, layer in enumerate(self.layers):
            try:
                x = layer(x)
            except (ValueError, TypeError) as err:  # a deeper layer's error quotes sizes the caller never gave
                raise type(err)(f"layer {j}: {err}") from None
            codes.append(x)
        return codes

    def decode(self, code: Tensor, signal_size: Sequence[int] | None = None) -> Tensor:
        """The signal a deepest code G_J stands for: D_1 D_2 ... D_J G_J, (B, C_J, H_J, W_J) -> (B, C_0, *size).

        ``signal_size``: the input's (H, W), from which every layer's size follows (as in
        ``MultiLayerSparseCoding2d.decode``). Default None: the smallest input whose deepest codes have that size,
        which is the input's size only where no stride drops a row (at stride 2 an 8 x 8 input decodes to 7 x 7)."""
        code = deepest_code(code, self.layers[-1].code_channels)
        geometries = [(layer.kernel_size, layer.stride, layer.padding) for layer in self.layers]
        if signal_size is None:
            signal_size = smallest_stack_signal_size(code, geometries)
        sizes = stack_signal_sizes(signal_size, code, geometries)[:-1]
        for layer, size in zip(reversed(self.layers), reversed(sizes)):
            code = layer.decode(code, size)
        return code
