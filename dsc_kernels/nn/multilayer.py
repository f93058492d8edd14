"""Multi-layer convolutional sparse coding networks, with the parameters of the published ones (Sulam, Aberdam, Beck &
Elad, TPAMI 2019: layered BP, ML-ISTA, ML-FISTA, ML-LISTA, All-Free); every forward is one ``functional.ml_ista``
call, or in layered mode one call per layer (``conv_ista``; a one-layer ``ml_ista`` with per-unfolding filters).
docs/porting.md maps their code onto this module line by line.

State-dict keys, the same for every backend (j = 0 .. L-1):
``weights.j``         the dictionary W_j, (C_{j+1}, C_j, k, k), or per unfolding (n_iter + 1, C_{j+1}, C_j, k, k)
``biases.j``          b_j, (C_{j+1},) or per unfolding (n_iter + 1, C_{j+1}): sigma(u + b), the threshold is -b
``steps.j``           c_j, () or per unfolding (n_iter + 1,) with ``learn_steps``; else the buffer ``step_j`` (float32
                      in a half-precision network, as functional carries steps)
``input_encoders.j``  ML-LISTA's B_j, shaped like ``weights.j`` (only with ``input_encoders=True``)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import _validate as check
from .. import functional as DF
from ..reference.conv import value_dtype
from . import _projection
from ._args import (
    apply_keeping_fixed_values_wide,
    check_value,
    deepest_code,
    flags,
    float_dtype,
    per_layer,
    stack_channels,
    stack_signal_sizes,
)
from .sparse_coding import STEP_FLOOR, step_floor_after_load

IntOrPair = int | Sequence[int]
MODES = ("layered", "ml-ista", "ml-fista", "interleaved")


class MultiLayerSparseCoding2d(_projection.Projected):
    """Multi-layer pursuit through a convolutional DSC model x ~ D_1 G_1, G_1 ~ D_2 G_2, ...: forward(x) returns
    [G_1, ..., G_L].

    ``channels = [C_0, C_1, ..., C_L]``; ``kernel_sizes``, ``strides``, ``paddings``: one value for every layer (an
    int or an (h, w) tuple; paddings also "same" or "valid") or a list with one per layer.
    Every mode starts with the encoding G_j = sigma(c_j W_j^T G_{j-1} + b_j) (a CNN's forward pass: sigma is a ReLU
    with ``nonneg``, else the soft threshold with threshold -b_j >= 0), then runs n_iter unfoldings:

    - ``"layered"``: layered basis pursuit, n_iter ISTA steps on each layer before the next (``DF.conv_ista``
      per layer);
    - ``"ml-ista"`` / ``"ml-fista"``: the multi-layer pursuit, each unfolding projecting the deepest code down and
      taking one step per layer (``DF.ml_ista``, FISTA's momentum on the deepest code for ml-fista);
    - ``"interleaved"``: one step per layer and unfolding from each layer's own previous code (the All-Free network).

    ``untied_unfoldings`` gives every unfolding its own filters and biases ("All-Free"): unfolding k analyses with
    W_j[k] and reconstructs with W_j[k-1], the filters that made the code it reconstructs. ``input_encoders`` adds
    ML-LISTA's B_j (analysis of G_{j-1} and the projections use B_j, the Gram term W_j^T W_j). Initialisation is the
    published one: W_j ~ 0.1 N(0, 1) / sqrt(C_j k^2), b_j = ``bias``, c_j = ``step``.

    Learned values stay valid by projection after every optimiser step (``nn.project_``): without ``nonneg`` the
    biases stay <= 0 (thresholds -b >= 0), and learned steps stay >= 1e-3 of their initial value.

    >>> net = MultiLayerSparseCoding2d([1, 32, 64, 512], [6, 6, 4], strides=[2, 2, 1], n_iter=6, mode="ml-ista")
    >>> g1, g2, g3 = net(x)  # x: (B, 1, 28, 28); g3: (B, 512, 1, 1)
    """

    def __init__(
        self,
        channels: Sequence[int],
        kernel_sizes: IntOrPair | list[IntOrPair],
        *,
        strides: IntOrPair | list[IntOrPair] = 1,
        paddings: IntOrPair | list[IntOrPair] = 0,
        n_iter: int = 6,
        mode: str = "ml-ista",
        bias: float = 0.0,
        step: float = 1.0,
        learn_steps: bool = True,
        untied_unfoldings: bool = False,
        input_encoders: bool = False,
        nonneg: bool = True,
        recompute: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        n_iter = check.count("n_iter", n_iter, 0)
        flags(
            learn_steps=learn_steps,
            untied_unfoldings=untied_unfoldings,
            input_encoders=input_encoders,
            nonneg=nonneg,
            recompute=recompute,
        )
        channels = stack_channels(channels)
        depth = len(channels) - 1
        if input_encoders and mode == "layered":
            raise ValueError("input_encoders (ML-LISTA) need a multi-layer mode, not 'layered'")
        layer_dtype = float_dtype(dtype)
        # bias is the ReLU's bias with nonneg, else minus the soft threshold, which must be >= 0.
        check_value("bias", bias, [()], allow_negative=True, dtype=layer_dtype)
        if not nonneg and bias > 0:
            raise ValueError(f"bias must be <= 0 without nonneg (the soft threshold is -bias >= 0), got {bias!r}")
        check_value("step", step, [()], positive=True, dtype=layer_dtype)
        # layered mode runs conv-ISTA per layer, unless per-unfolding filters make it a one-layer ML-ISTA each
        DF.check_backend(backend, "conv_ista" if mode == "layered" and not untied_unfoldings else "ml_ista")
        self.channels = channels
        self.kernel_sizes = [
            check.ints("kernel_sizes", k, 2, minimum=1) for k in per_layer("kernel_sizes", kernel_sizes, depth)
        ]
        self.strides = [check.ints("strides", s, 2, minimum=1) for s in per_layer("strides", strides, depth)]
        self.paddings = [
            check.padding(p, k, s)
            for p, k, s in zip(per_layer("paddings", paddings, depth), self.kernel_sizes, self.strides)
        ]
        self.n_iter, self.mode, self.nonneg, self.recompute, self.backend = n_iter, mode, nonneg, recompute, backend
        self.untied_unfoldings = untied_unfoldings
        factory = dict(device=device, dtype=dtype)
        lead = (n_iter + 1,) if untied_unfoldings else ()

        def filters(j: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*lead, channels[j + 1], channels[j], *self.kernel_sizes[j], **factory))

        self.weights = nn.ParameterList(filters(j) for j in range(depth))
        self.input_encoders = nn.ParameterList(filters(j) for j in range(depth)) if input_encoders else None
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty((*lead, channels[j + 1]), **factory)) for j in range(depth)
        )
        if learn_steps:
            self.steps = nn.ParameterList(nn.Parameter(torch.empty(lead, **factory)) for _ in range(depth))
        else:
            # fixed steps in float32 for a half-precision network, as functional carries them (and after .half())
            wide = dict(device=device, dtype=value_dtype(layer_dtype))
            for j in range(depth):
                self.register_buffer(f"step_{j}", torch.empty(lead, **wide))
            self.steps = None
        self._init = {"bias": float(bias), "step": float(step)}
        self._step_floor = STEP_FLOOR * float(step)
        self.register_load_state_dict_post_hook(_after_load)
        self.register_projection()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The published initialisation: W_j (and B_j) ~ 0.1 N(0, 1) / sqrt(C_j k^2), b_j = ``bias``, c_j = ``step``;
        what ``to_empty()`` after a ``device="meta"`` construction needs (it leaves memory uninitialised)."""
        for filters in (self.weights, self.input_encoders or []):
            for w, c_in, k in zip(filters, self.channels, self.kernel_sizes):
                w.normal_().mul_(0.1 / math.sqrt(c_in * math.prod(k)))
        for b in self.biases:
            b.fill_(self._init["bias"])
        for c in self._steps():
            c.fill_(self._init["step"])

    def _apply(self, fn, recurse: bool = True):
        fixed_steps = [] if self.steps is not None else [f"step_{j}" for j in range(len(self.weights))]
        apply_keeping_fixed_values_wide(self, fixed_steps, super()._apply, fn, recurse)
        return self

    def constraints(self) -> list[tuple[Tensor, float | None, float | None]]:
        """(parameter, lower, upper) bounds that projection after each optimiser step keeps valid (a pruned entry's
        ``j_orig``, which the optimiser updates)."""
        out = [] if self.nonneg else [(b, None, 0.0) for b in _stored(self.biases)]
        if self.steps is not None:
            out += [(c, self._step_floor, None) for c in _stored(self.steps)]
        return out

    def _steps(self) -> list[Tensor]:
        return (
            _current(self.steps)
            if self.steps is not None
            else [getattr(self, f"step_{j}") for j in range(len(self.weights))]
        )

    def _operators(self) -> tuple[list[Tensor], list[Tensor | None]]:
        """(synthesis dictionaries, analysis encoders) of every layer: tied, or shifted by one unfolding."""
        weights = _current(self.weights)
        if not self.untied_unfoldings:
            return weights, [None] * len(weights)
        return [torch.cat([w[:1], w[:-1]]) for w in weights], weights

    def forward(self, x: Tensor) -> list[Tensor]:
        """x: (B, C_0, H, W) -> [G_1 (B, C_1, H_1, W_1), ..., G_L]."""
        # functional also takes 1-D signals, and read these 2-D filters as 1-D per-step ones for an x of rank 3.
        check.tensor("x", x)
        if x.dim() != 4 or x.shape[1] != self.channels[0]:
            raise ValueError(f"x must be (B, C_0={self.channels[0]}, H, W), got shape {tuple(x.shape)}")
        dictionaries, encoders = self._operators()
        thresholds = [-b for b in _current(self.biases)]
        steps = self._steps()
        if self.mode == "layered":
            codes, signal = [], x
            for j, (d, e) in enumerate(zip(dictionaries, encoders)):
                try:
                    signal = DF.conv_ista(
                        signal,
                        d,
                        threshold=thresholds[j],
                        n_iter=self.n_iter + 1,
                        step=steps[j],
                        encoder_weight=e,
                        stride=self.strides[j],
                        padding=self.paddings[j],
                        nonneg=self.nonneg,
                        backend=self.backend,
                        recompute=self.recompute,
                    )
                except (ValueError, TypeError) as err:  # which layer's size or value was wrong, as ml_ista says
                    raise type(err)(f"layer {j}: {err}") from None
                codes.append(signal)
            return codes
        return DF.ml_ista(
            x,
            dictionaries,
            thresholds,
            n_iter=self.n_iter,
            steps=steps,
            strides=self.strides,
            paddings=self.paddings,
            fista=self.mode == "ml-fista",
            nonneg=self.nonneg,
            backend=self.backend,
            encoder_weights=encoders,
            input_encoder_weights=None if self.input_encoders is None else _current(self.input_encoders),
            interleaved=self.mode == "interleaved",
            recompute=self.recompute,
        )

    def decode(self, code: Tensor, signal_size: Sequence[int]) -> Tensor:
        """The signal a deepest code G_L stands for, D_1 D_2 ... D_L G_L (the last unfolding's dictionaries), of
        spatial size ``signal_size``: (B, C_L, H_L, W_L) -> (B, C_0, *signal_size)."""
        code = deepest_code(code, self.channels[-1])
        sizes = stack_signal_sizes(signal_size, code, list(zip(self.kernel_sizes, self.strides, self.paddings)))
        weights = _current(self.weights)
        for j in reversed(range(len(weights))):
            w = weights[j][-1] if self.untied_unfoldings else weights[j]
            code = DF.conv_synthesis(code, w, stride=self.strides[j], padding=self.paddings[j], signal_size=sizes[j])
        return code

    def extra_repr(self) -> str:
        options = [
            f"channels={self.channels}",
            f"kernel_sizes={self.kernel_sizes}",
            f"strides={self.strides}",
            f"paddings={self.paddings}",
            f"n_iter={self.n_iter}",
            f"mode={self.mode!r}",
        ]
        options += [name for name in ("untied_unfoldings", "recompute") if getattr(self, name)]
        if self.input_encoders is not None:
            options.append("input_encoders")
        if not self.nonneg:
            options.append("nonneg=False")
        return ", ".join(options + [f"backend={self.backend!r}"])


def _current(values: nn.ParameterList) -> list[Tensor]:
    """The list's tensors as a forward must see them. ``torch.nn.utils.prune`` masks an entry (``prune.l1_unstructured(
    net.weights, "0", 0.3)``) with a forward pre-hook that recomputes it, ``0_orig * 0_mask``, before each call of its
    module; a ParameterList is never called, so its pruning hooks run here. Without them every forward used the
    product formed at pruning time: the optimiser's steps on ``0_orig`` never reached it, and the second backward
    through it failed ("backward through the graph a second time")."""
    for method in _projection.pruning_methods(values):
        method(values, ())
    return list(values)


def _stored(values: nn.ParameterList) -> list[Tensor]:
    """The parameters an optimiser updates for the list's entries: an entry's own, or a pruned one's ``j_orig`` (a
    ``parametrize``-d entry has none: its parametrization defines its set)."""
    stored = (_projection.stored_parameter(values, str(j)) for j in range(len(values)))
    return [p for p in stored if p is not None]


def _after_load(module: MultiLayerSparseCoding2d, incompatible_keys) -> None:
    """Learned steps loaded below this module's floor move the floor (``step_floor_after_load``)."""
    if module.steps is None or any(check.storageless(c) for c in module.steps):
        return
    module._step_floor = step_floor_after_load(module._step_floor, module.steps)
