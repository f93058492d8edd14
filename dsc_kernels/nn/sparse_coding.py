"""The unrolled conv-ISTA/FISTA layers ConvSparseCoding1d and ConvSparseCoding2d: each forward is one call into
``dsc_kernels.functional``.

State-dict keys are the same for every backend: ``weight`` (C_code, C_sig, *k), ``encoder_weight`` (untied only),
``lam`` ((n_iter, C_code) when learned, else the value given) and ``step`` ((n_iter,) when learned, else a scalar
buffer: the fixed step, or the tracked 1/L).

Valid values are enforced, never patched: negative or non-finite ``lam``/``step``/``threshold`` raise ``ValueError``
at construction; learned ones are kept valid by projected gradient descent after each optimiser step (see
``_projection``), so the forward uses exactly the stored value and clamps nothing.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .. import _validate as check
from .. import _warnings
from .. import functional as DF
from .._fork_safe import ForkSafeLock
from ..reference import spectrum
from ..reference.conv import value_dtype
from . import _projection
from ._args import (
    SIGNED_HINT,
    apply_keeping_fixed_values_wide,
    check_value,
    flags,
    float_dtype,
    parametrized_tensors,
    positive_int,
)

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # a torch built without distributed support has no sharded weights

    class _DTensor:
        pass


IntOrTuple = int | Sequence[int]
ValueOrTensor = float | Tensor

# Warm-started power iterations per training forward that keep step = 1/L as the dictionary changes. They run per
# frequency of the dictionary's response (reference/spectrum.py), where each small matrix changes little per
# optimiser step. One is exact when those matrices have rank 1 (one signal channel at stride 1, or one atom).
POWER_STEPS_PER_FORWARD = 3
# On the CPU, where reading the estimate costs nothing, a training forward goes on past those while an iteration
# still raises the estimate by more than POWER_TOLERANCE, up to POWER_STEPS_MAX_PER_FORWARD: under fast dictionary
# updates (Adam at lr 0.1 on 64 -> 64 channels) the three alone left step * L at 1.33, this at 1.04
# (docs/training.md). A compiled CPU forward takes the same iterations in the graph (a torch.while_loop), so that it
# computes what the eager one does. On a GPU the read would stall the device.
POWER_TOLERANCE = 1e-3
POWER_STEPS_MAX_PER_FORWARD = 20
# Power iterations of a cold estimate (construction, reset, after load_state_dict).
POWER_STEPS_COLD = 50
# A learned step is projected onto [STEP_FLOOR * initial step, inf): step > 0 is what ISTA needs. The floor is the
# buffer `step_floor`, so a run resumed from a state dict projects onto the floor it was saved with: 1/L of a module
# built from another seed is another number, and a step sitting at its floor went elsewhere (5.6% after one step).
STEP_FLOOR = 1e-3
# An all-zero training output is looked for on the first training forward and then every this many.
ZERO_CHECK_EVERY = 50
# What a copy of a module keeps of its step source when the step was up to date (ConvSparseCoding.__getstate__).
_UP_TO_DATE = "up to date"
# Serialises eval forwards' staleness checks and re-estimates (every layer's: a lock per module would not survive
# copies and pickling). Without it a second thread's eval forward could check the step between the first one's
# writing its power vector and noting the weight as estimated, re-estimate again from that vector, and rewrite the
# step while the first thread's kernel read it: outputs and step off a serial run (1e-7 relative, float32).
_STEP_LOCK = ForkSafeLock(threading.RLock)  # reentrant: a parametrization of weight may run another layer
# A parametrized weight as the forward running on this thread evaluated it, per module (id): the forward's reads of
# weight all see that one evaluation. parametrize.cached() did this process-wide: while one thread's forward was
# inside it, every parametrized tensor read on any thread (any module's: a weight_norm nn.Linear training on another
# thread) came from a cache that outlived the optimiser's steps there, stale (backward raised "Trying to backward
# through the graph a second time"; no_grad reads got old values silently).
_FORWARD_WEIGHTS = threading.local()


@contextlib.contextmanager
def _weight_read_only(module: nn.Module):
    """Reads of ``weight`` outside the forward that leave a parametrization's state as it is. spectral_norm runs a
    power iteration in place on its ``_u``/``_v`` buffers at every read of weight in training mode: state_dict(),
    deepcopy, ``.to()`` and load_state_dict (whose hook re-estimates 1/L) each moved them, so a loaded module computed
    another weight than the saved one. In eval mode it reads the stored vectors: the weight of the last forward."""
    if not parametrize.is_parametrized(module, "weight"):
        yield
        return
    holder = module.parametrizations.weight
    modes = [(m, m.training) for m in holder.modules()]
    holder.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


# ------------------------------------------------------------------------------------------------ validation
def _padding(padding: object, kernel_size: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, ...]:
    """None (k // 2: the size is kept at stride 1 for odd k), or what functional accepts: int(s) >= 0, "valid",
    "same" (stride 1 and odd kernels only)."""
    if padding is None:
        return tuple(k // 2 for k in kernel_size)
    return check.padding(padding, kernel_size, stride)


# ------------------------------------------------------------------------------------------ conv sparse coding
_CSC_DOC = """Unrolled convolutional ISTA/FISTA layer (LISTA/CSCNet style when learned): x -> sparse code z.

    Solves ``min_z 0.5 ||x - D z||^2 + sum lam |z|`` with ``n_iter`` iterations of
    ``z <- S_{{step*lam}}(z + step * E(x - D z))``, z_0 = 0, where D z = conv_transpose(z, weight) and
    E = D^T = conv(., weight) (tied) or conv(., encoder_weight) (untied). ``decode(z)`` returns ``D z``.

    Shapes: x {x_shape} -> z {z_shape}, Sz = (S + 2 padding - k) // stride + 1.

    Args:
        in_channels: C_sig, channels of x.
        code_channels: C_code, number of atoms (filters) of the dictionary.
        kernel_size: k, an int or {rank} ints; ``weight`` is (C_code, C_sig, {k_shape}).
        stride: int or {rank} ints (default 1): codes are strided (CSCNet uses stride 8).
        padding: int or {rank} ints, ``"valid"`` (0), ``"same"`` (stride 1 and odd k only) or None (default:
            k // 2, which keeps the size at stride 1 for odd k).
        n_iter: number of unrolled iterations (default 10).
        lam: the LASSO weight, threshold = step * lam; a float >= 0 (default 0.1 when ``threshold`` is not given),
            or a tensor (C_code,) or (n_iter, C_code). State-dict key ``lam``.
        threshold: the absolute threshold instead of ``lam`` (give one of the two): a float or a tensor (C_code,) or
            (n_iter, C_code). Negative values are allowed only with ``nonneg=True`` (a ReLU with bias -threshold).
            State-dict key ``threshold``.
        step: the ISTA step; a float > 0 or tensor (n_iter,), fixed. Default None: 1/L with L = ||D||_2^2 on signals of
            any size (power iteration per frequency of the dictionary on a periodic grid 8 kernels wide, never above the
            infinite-signal norm, within 1% of it on random 16-atom dictionaries, up to 2% below for a single random
            atom and 4% for a narrow-band atom), tracked as the dictionary changes: warm-started iterations in each
            training forward whose weight values changed (a replayed or repeated forward on the same weight keeps its
            step), and in eval mode a fresh estimate whenever ``weight`` changed since the last one (torch's in-place
            changes, new data, another tensor in its place such as ``torch.func.functional_call``'s; edits through
            ``weight.data`` go unseen by an eager forward: call ``refresh_step_()`` after those; a compiled one compares
            the values). Stored as the buffer ``step``; copies of the layer (deepcopy, torch.save/load, ``.to()``) keep
            it as it is. With one signal channel at stride 1 (or one atom) the tracked L is exact on its grid (closed
            form) after every optimiser step. With several channels a training forward runs three warm iterations, which
            approach L from below, and on the CPU (eager or compiled) goes on while the estimate still rises
            (POWER_TOLERANCE): Adam at lr 0.01 to 0.3 on the dictionary gave step * L up to 1.05 there on 64 -> 64 atoms
            (``bench/step_tracking.py``). GPU forwards keep the three (no host sync): up to 1.18 on 16 -> 32 and 1.33 on
            64 -> 64 (ISTA diverges beyond 2, FISTA's late iterations beyond 4/3); ``refresh_step_(30)`` after each
            optimiser step, or a fixed ``step``, removes that lag.
        learn_lam / learn_threshold: make ``lam`` / ``threshold`` a parameter of shape (n_iter, C_code) (one per
            iteration and channel, LISTA-style).
        learn_step: make ``step`` a parameter of shape (n_iter,) initialised at ``step`` (or 1/L), projected onto
            ``step >= step_floor`` (a buffer in the state dict: 1e-3 of the initial step).
        untied: learn a separate analysis filter ``encoder_weight`` (C_code, C_sig, {k_shape}) for E (LISTA-CP /
            CSCNet), initialised to ``weight``.
        nonneg: non-negative codes, ``max(u - t, 0)`` (the ReLU view of sparse coding).
        fista: FISTA momentum instead of plain ISTA.
        relative: thresholds scale with each sample's input RMS (threshold = step * lam * rms(x_b), or the given
            ``threshold`` * rms(x_b); rms over all of x_b's channels and positions), which makes
            the layer positively homogeneous, layer(c x) = c layer(x): a threshold that suits one input scale
            suits every scale. Default False (thresholds are absolute).
        recompute: the fused backends keep nothing code-sized for the backward and replay the iterations (memory
            independent of n_iter, more compute).
        backend: ``"auto"`` (default), ``"reference"``, ``"cpp"`` or ``"triton"`` (see ``dsc_kernels.functional``).
        device, dtype: factory keywords; ``device="meta"`` builds shapes only (then ``to_empty(device=...)`` and
            ``reset_parameters()``).

    Learned ``lam``, ``step`` and signed thresholds are kept valid (lam >= 0, step > 0, threshold >= 0) by
    projection after every torch.optim step, never by clamping in the forward. In training, a layer whose codes are
    all zero warns once (its thresholds are too large for the input: lower them or use ``relative=True``).

    Example::

        layer = {name}({example})
        z = layer(x)
        x_hat = layer.decode(z)
    """


class _ConvSparseCoding(_projection.Projected):
    _rank: int

    def __init__(
        self,
        in_channels: int,
        code_channels: int,
        kernel_size: IntOrTuple,
        *,
        stride: IntOrTuple = 1,
        padding: IntOrTuple | str | None = None,
        n_iter: int = 10,
        lam: ValueOrTensor | None = None,
        threshold: ValueOrTensor | None = None,
        step: ValueOrTensor | None = None,
        learn_lam: bool = False,
        learn_threshold: bool = False,
        learn_step: bool = False,
        untied: bool = False,
        nonneg: bool = False,
        fista: bool = False,
        relative: bool = False,
        recompute: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        rank = self._rank
        flags(
            learn_lam=learn_lam,
            learn_threshold=learn_threshold,
            learn_step=learn_step,
            untied=untied,
            nonneg=nonneg,
            fista=fista,
            relative=relative,
            recompute=recompute,
        )
        init_dtype = float_dtype(dtype)
        # the plain ints from here on, for the shapes and messages below (not a numpy or tensor integer)
        self.in_channels = in_channels = positive_int("in_channels", in_channels)
        self.code_channels = code_channels = positive_int("code_channels", code_channels)
        self.n_iter = n_iter = positive_int("n_iter", n_iter)
        self.kernel_size = check.ints("kernel_size", kernel_size, rank, minimum=1)
        self.stride = check.ints("stride", stride, rank, minimum=1)
        self.padding = _padding(padding, self.kernel_size, self.stride)
        self.nonneg, self.fista, self.relative, self.recompute = nonneg, fista, relative, recompute
        DF.check_backend(backend)
        self.backend = backend
        value_shapes = [(), (code_channels,), (n_iter, code_channels)]
        if threshold is not None:
            if lam is not None:
                raise ValueError("give lam (threshold = step * lam) or threshold (absolute), not both")
            if learn_lam:
                raise ValueError("learn_lam applies to lam; with threshold= use learn_threshold=True")
            self._threshold_name = "threshold"
            init_value = check_value(
                "threshold", threshold, value_shapes, allow_negative=nonneg, hint=SIGNED_HINT, dtype=init_dtype
            )
            learned = learn_threshold
        else:
            if learn_threshold:
                raise ValueError("learn_threshold applies to threshold=; with lam use learn_lam=True")
            self._threshold_name = "lam"
            init_value = check_value("lam", 0.1 if lam is None else lam, value_shapes, dtype=init_dtype)
            learned = learn_lam
        if step is not None:
            step = check_value("step", step, [(), (n_iter,)], positive=True, dtype=init_dtype)
        self._init = {"threshold": init_value, "step": step}
        self._track_step = step is None and not learn_step
        self._zero_checks = 0
        factory = dict(device=device, dtype=dtype)

        self.weight = nn.Parameter(torch.empty(code_channels, in_channels, *self.kernel_size, **factory))
        self.encoder_weight = nn.Parameter(torch.empty_like(self.weight)) if untied else None
        self._register_value(self._threshold_name, (n_iter, code_channels), learned, init_value, factory)
        self._register_value("step", (n_iter,), learn_step, 1.0 if step is None else step, factory)
        if learn_step:  # in the dtype fixed values are carried in (float32 for half precision), as below
            self.register_buffer("step_floor", torch.zeros((), device=device, dtype=value_dtype(init_dtype)))
        grid = spectrum.periodic_grid(self.kernel_size, self.stride)
        self.register_buffer("_power_vector", torch.zeros(1, code_channels, *grid, **factory), persistent=False)
        # The weight the step was last estimated from (its values): a training forward on the same values keeps
        # that step, and torch.func transforms, which cannot read version counters, compare against it.
        self.register_buffer("_estimated_weight", torch.zeros_like(self.weight), persistent=False)
        self.register_load_state_dict_pre_hook(_before_load)
        self.register_load_state_dict_post_hook(_after_load)
        self.register_projection()
        if not self.weight.is_meta:
            self.reset_parameters()

    # -------------------------------------------------------------------------------------- parameters
    def _register_value(
        self, name: str, learned_shape: tuple[int, ...], learned: bool, value: ValueOrTensor, factory
    ) -> None:
        if learned:
            full = torch.empty(learned_shape, **factory)
            self.register_parameter(name, nn.Parameter(full))
        else:
            # a fixed value (the tracked 1/L too) in float32 for a half-precision layer, as functional carries it: a
            # float16 1/L is often subnormal
            shape = tuple(value.shape) if isinstance(value, Tensor) else ()
            dtype = value_dtype(float_dtype(factory["dtype"]))
            self.register_buffer(name, torch.empty(shape, device=factory["device"], dtype=dtype))

    def _fill(self, name: str, value: ValueOrTensor) -> None:
        target = getattr(self, name)
        with torch.no_grad():
            if isinstance(value, Tensor):
                target.copy_(value.detach().to(target.dtype).expand(target.shape))
            else:
                target.fill_(float(value))

    def reset_parameters(self) -> None:
        """Random unit-norm atoms (``encoder_weight`` = ``weight`` when untied), the initial lam/threshold and
        step = the given step or 1/L of the new dictionary."""
        with torch.no_grad():
            self.weight.normal_()
            self.weight /= self.weight.flatten(1).norm(dim=1).reshape(-1, *([1] * (self.weight.dim() - 1)))
            if self.encoder_weight is not None:
                self.encoder_weight.copy_(self.weight)
        self._fill(self._threshold_name, self._init["threshold"])
        inverse_lipschitz = self._restart_power_vector()
        self._fill("step", inverse_lipschitz if self._init["step"] is None else self._init["step"])
        if isinstance(self.step, nn.Parameter):
            # formed in the floor's (wide) dtype: in float16, 1e-3 of a step of 1e-5 underflowed to a floor of 0,
            # and the step was projected onto 0, which the forward refuses
            with torch.no_grad():
                self.step_floor.copy_(STEP_FLOOR * self.step.detach().min().to(self.step_floor.dtype))
        self._note_step_source()

    # Eager even inside a compiled optimiser step or project_(): traced, the floor's value is unknown and was taken as
    # 0, so a torch.compile-d optimizer.step() projected a learned step onto 0, which the next forward refuses.
    @torch.compiler.disable
    def constraints(self) -> list[tuple[Tensor, float | None, float | None]]:
        """(parameter, lower, upper) bounds that projection after each optimiser step keeps valid."""
        out = []
        # the parameters themselves, or a pruned one's name_orig (torch.nn.utils.prune)
        values = _projection.stored_parameter(self, self._threshold_name)
        if values is not None and not (self._threshold_name == "threshold" and self.nonneg):
            out.append((values, 0.0, None))
        step = _projection.stored_parameter(self, "step")
        if step is not None and "step_floor" in self._buffers:
            # no floor where it has no values to read (a layer built under a FakeTensorMode, for shapes only) or
            # where it is not known yet (inf: to_empty() after a meta construction, before reset_parameters())
            floor = float(self.step_floor) if check.values_readable(self.step_floor) else 0.0
            out.append((step, floor if math.isfinite(floor) else 0.0, None))
        return out

    @property
    def needs_step_notice(self) -> bool:
        return self._track_step

    def after_optimizer_step(self, stepped: set[int]) -> None:
        # torch.optim's fused steps (fused=True, torch 2.13 on the CPU) write the parameters without bumping their
        # version counters, so an eval forward after one ran with the previous weight's step (4.8x its 1/L after one
        # Adam step at lr 0.5 on 4 -> 16 channels: ISTA diverged silently), and state_dict saved it
        tensors = [t for t in self._weight_tensors() if id(t) in stepped and not t.is_inference()]
        if tensors:
            torch.autograd.graph.increment_version(tensors)

    def _power_steps(self, cold: bool) -> int:
        """Power iterations of an estimate: one where each frequency's matrix has rank 1 (a closed form, which needs
        no vector), else POWER_STEPS_COLD from an old vector or POWER_STEPS_PER_FORWARD warm-started (a training
        forward)."""
        if spectrum.is_rank_one(self._weight().shape, self.stride):
            return 1
        return POWER_STEPS_COLD if cold else POWER_STEPS_PER_FORWARD

    def _restart_power_vector(self, shape: Sequence[int] | None = None) -> Tensor:
        """A fresh start vector, the same on every rank (seeded), of the buffer's shape (filled in place) or of
        ``shape`` (a new buffer); then a cold estimate into it. Returns its 1/L."""
        # Drawn on the CPU in float32 whatever torch.set_default_device / set_default_dtype say, then moved to the
        # buffer: on the default device a layer built with device="cpu" inside ``with torch.device("meta")`` raised
        # "Cannot copy out of meta tensor", and one built under set_default_device("cuda") refused the CPU generator;
        # in the default dtype a float64 default drew another start vector (another 1/L) for the same dictionary.
        fresh = torch.randn(
            tuple(shape or self._power_vector.shape),
            generator=torch.Generator().manual_seed(0),
            device="cpu",
            dtype=torch.float32,
        )
        if shape is None:
            self._power_vector.copy_(fresh)
        else:
            self._power_vector = fresh.to(self._power_vector)
        return self._power_iterate_(self._power_steps(cold=True))

    @torch.no_grad()
    def _power_iterate(self, n_steps: int, adaptive: bool = False) -> tuple[Tensor, Tensor]:
        """``n_steps`` power iterations per frequency of D's response from the stored vectors (``adaptive``: more,
        see POWER_TOLERANCE, where that needs no device sync); returns 1/L (1 for an all-zero D, or one with a NaN
        or inf) and the new vectors, leaving the module's state as it is."""
        v = self._power_vector
        # in at least float32, as real arithmetic outside autocast (which would turn the products to half precision)
        dtype = torch.promote_types(v.dtype, torch.float32)
        weight = self._weight().detach().to(dtype)
        no_autocast = (  # meta has no autocast to turn off (torch.autocast raised there); is_meta traces, unlike
            # torch.amp.is_autocast_available, which torch 2.11's dynamo cannot
            contextlib.nullcontext() if weight.is_meta else torch.autocast(weight.device.type, enabled=False)
        )
        with no_autocast:
            until = None
            # compiled too (the count is then decided on the device, spectrum.dictionary_norm_sq): a compiled CPU
            # training forward that took the three alone drifted off the eager one's trajectory
            readable = torch.compiler.is_compiling() or check.values_readable(weight)
            if adaptive and weight.device.type == "cpu" and readable:
                until = POWER_TOLERANCE
            lipschitz, v = spectrum.dictionary_norm_sq(
                weight, self.stride, v.to(dtype), n_steps, until, POWER_STEPS_MAX_PER_FORWARD
            )
        # inverted before the cast: a half-precision layer's L can exceed float16's range while 1/L does not
        # 1 stands in for an all-zero D (any step solves it) and for a D with a NaN or inf (whose codes are NaN from
        # the convolutions, as functional's default step has it); a finite non-zero D whose L underflowed to 0 has
        # no 1/L in range: inf, which the forward refuses (as functional's default step does), not a silent step 1
        finite = weight.isfinite().all()
        underflow = (lipschitz == 0) & weight.ne(0).any() & finite
        fallback = torch.where(underflow, torch.full_like(lipschitz, math.inf), torch.ones_like(lipschitz))
        inverse_lipschitz = torch.where((lipschitz > 0) & finite, 1.0 / lipschitz, fallback)
        return inverse_lipschitz.to(value_dtype(self._power_vector.dtype)), v.to(self._power_vector.dtype)

    def _power_iterate_(self, n_steps: int, adaptive: bool = False) -> Tensor:
        """``_power_iterate`` keeping the new vector (the next estimate's warm start); returns 1/L."""
        inverse_lipschitz, vector = self._power_iterate(n_steps, adaptive)
        self._power_vector.copy_(vector)
        return inverse_lipschitz

    @torch.no_grad()
    def refresh_step_(self, n_steps: int | None = None) -> Tensor:
        """Re-estimate L = ||D||^2 (power iteration warm-started from the last estimate; ``n_steps`` iterations,
        default one where that is exact, else 50) and, when the step is tracked (``step=None``, not learned), set
        ``step = 1/L``. Returns 1/L."""
        # with no iteration L stays 0, whose 1/L stands in as 1: a tracked step would silently become 1
        n_steps = self._power_steps(cold=True) if n_steps is None else positive_int("n_steps", n_steps)
        return self._refresh_step(n_steps)

    def _refresh_step(self, n_steps: int, adaptive: bool = False) -> Tensor:
        inverse_lipschitz = self._power_iterate_(n_steps, adaptive)
        if self._track_step:
            # Through a 1-element view: torch.compile (AOT autograd, torch 2.13) drops an in-place copy into a 0-dim
            # float64 buffer, so a compiled float64 training forward kept its first step forever.
            self.step.view(1).copy_(inverse_lipschitz.view(1))
        self._note_step_source()
        return inverse_lipschitz

    def _weight_state(self) -> tuple[tuple[int, int], ...] | None:
        """Where the tensors ``weight`` is made of live and their version counters: every in-place change through
        torch (an optimiser step, edits under ``torch.no_grad()``, ``load_state_dict``) bumps a counter, and
        assigning new data moves it. None when one cannot be read (an inference tensor keeps no version counter)."""
        return _tensor_state(self._weight_tensors())

    def _weight_tensors(self) -> list[Tensor]:
        """``weight`` itself, or for a parametrized one every tensor its parametrization holds: the originals
        (weight_norm keeps two) and the parametrizations' own parameters and buffers. ``torch.nn.utils.parametrize``
        makes ``weight`` a new tensor at every access, so every eval forward took it for a changed weight."""
        tensors = parametrized_tensors(self, "weight")
        if tensors is None and _projection.pruning(self, "weight") is not None:
            # pruned: weight_orig (what the optimiser steps) and weight_mask; ``weight`` is their product as of the
            # last forward, so after an optimiser step it still held the old values and state_dict() saved the old
            # dictionary's 1/L as the step (27x the new 1/L after one SGD step at lr 0.5)
            return [self.weight_orig, self.weight_mask]
        return [self.weight] if tensors is None else tensors

    def _weight(self) -> Tensor:
        """``weight``, as this thread's forward of this module evaluated it where one is running (see forward);
        outside a forward, a pruned weight's ``weight_orig * weight_mask`` (its ``weight`` is refreshed only by
        prune's forward pre-hook)."""
        if not torch.compiler.is_compiling():
            held = getattr(_FORWARD_WEIGHTS, "weights", None)
            weight = held.get(id(self)) if held else None
            if weight is not None:
                return weight
        pruning = _projection.pruning(self, "weight")
        if pruning is not None and not torch.compiler.is_compiling():
            return _whole(pruning.apply_mask(self))
        return _whole(self.weight)

    def _source(self) -> tuple[tuple[weakref.ref, ...], tuple[tuple[int, int], ...]] | None:
        """The weight a step is estimated from: the tensor object (weakly: a freed temporary's address is reused
        at once, so a later tensor with other values could sit at the same address with the same version, as
        successive ``torch.func.functional_call`` weights do) and its state."""
        state = self._weight_state()
        return None if state is None else (tuple(weakref.ref(t) for t in self._weight_tensors()), state)

    def _is_current(self, source: object) -> bool:
        if not isinstance(source, tuple):
            return False
        refs, state = source
        tensors = self._weight_tensors()
        return (
            len(refs) == len(tensors) and all(r() is t for r, t in zip(refs, tensors)) and state == self._weight_state()
        )

    def _note_step_source(self) -> None:
        # the weight the tracked step was last estimated from; an eval forward re-estimates when it has changed
        # (the source is not traced: torch.compile cannot read version counters, so compiled eval forwards compare
        # values, _compiled_eval_refresh); its values are kept for training forwards, compiled eval forwards and
        # torch.func transforms
        self._estimated_weight.copy_(self._weight().detach())
        if not torch.compiler.is_compiling():
            self._step_source = self._source()

    def _weight_in_shared_memory(self) -> bool:
        # Another process's writes (Hogwild training through torch.multiprocessing, share_memory()) change the
        # values without this process's version counters: the parent's eval forward after its workers trained ran
        # with the step of the weight before their last optimiser step (step * L = 1.66 after 3 Adam steps at lr
        # 0.3, 3 -> 16 atoms 5x5: codes 4% off), and state_dict saved it. Such a weight is compared by values.
        # CPU only: CUDA tensors count as shared always, and a value comparison there is a host sync.
        return any(t.device.type == "cpu" and t.is_shared() for t in self._weight_tensors())

    def _step_is_stale(self) -> bool:
        if self._weight_state() is None:
            return False
        if self._is_current(getattr(self, "_step_source", None)) and not self._weight_in_shared_memory():
            return False
        if self._estimated_weight.shape == self._weight().shape and not bool(self._weight_changed()):
            # Another tensor or version holding the values the step was estimated from (functional_call with
            # the same values, a tied dictionary loaded twice, an in-place no-op): the step still holds, and a
            # re-estimate would be another number (more power iterations) for the same dictionary.
            self._step_source = self._source()
            return False
        return True

    def _refresh_stale_step(self) -> None:
        """An eval forward's re-estimate for a changed weight."""
        if not self._restore_previous_step():
            # as a training forward does: a second substitute in a row (functional_call in eval mode, or after one
            # in training mode) overwrote the module's own kept step, and its weight then got a re-estimate back
            # (state_dict 0.1% off its step, 16 -> 16 channels)
            self._keep_step_of_replaced_weight()
            self.refresh_step_()

    def _restore_previous_step(self) -> bool:
        """The previous weight, back and unchanged (``torch.func.functional_call`` substituting parameters for one
        eval call, then the module's own again), gets its step and vector back, so that the round trip leaves the
        module computing exactly what it did. Called by the next eval forward and before the state is read
        (``state_dict``, copies, ``.to``): a checkpoint taken in between held the substituted weight's step."""
        previous = self.__dict__.get("_previous_step")
        if not self._track_step or previous is None or not self._is_current(previous[0]):
            return False
        current = (self._step_source, self.step.detach().clone(), self._power_vector.clone())
        with torch.no_grad():
            self.step.copy_(previous[1])
            self._power_vector.copy_(previous[2])
        self._note_step_source()
        self._previous_step = current
        return True

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        with _weight_read_only(self):
            self._save_state(destination, prefix, keep_vars)

    def _save_state(self, destination, prefix, keep_vars) -> None:
        stale = False
        if not torch.compiler.is_compiling():
            self._restore_previous_step()
            stale = self._track_step and not keep_vars and self._step_is_stale()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if stale and self._power_vector.shape[1] == self.weight.shape[0]:
            # The weight changed since the step was estimated (a state_dict taken right after an optimiser step):
            # the saved step would be the previous dictionary's 1/L, and a loaded module takes a loaded step as its
            # weight's, for good (up to 46% above 1/L after a few Adam steps). Save the current weight's 1/L,
            # without changing the module (saving must not change its training). (A weight replaced by one of
            # another shape has no vector to start from: its step is saved as it stands.)
            destination[prefix + "step"] = self._checkpoint_step()

    def _checkpoint_step(self) -> Tensor:
        """1/L of the current weight for a state dict: the training forward's warm estimate (3 power iterations from
        the stored vector, more while it still rises on the CPU), once per weight version, so that a state dict
        taken every step (an average of the parameters) costs about what the next training forward's estimate does,
        not a cold estimate's 50 iterations. Within POWER_TOLERANCE of the next eval forward's cold re-estimate."""
        cached = self.__dict__.get("_checkpoint_step_cache")
        if cached is not None and self._is_current(cached[0]) and not self._weight_in_shared_memory():
            return cached[1]
        inverse_lipschitz, _ = self._power_iterate(self._power_steps(cold=False), adaptive=True)
        # a normal tensor even when state_dict() runs under torch.inference_mode(): loaded with assign=True, an
        # inference tensor became the layer's step, which the next training forward could not update in place
        with torch.inference_mode(False):
            step = inverse_lipschitz.reshape(self.step.shape).detach().clone()
        self._checkpoint_step_cache = (self._source(), step)
        return step

    # The step source names a tensor of this process, which a copy of the module (deepcopy, pickling, .to(dtype))
    # does not share: what carries over is whether the step was up to date, so that a copy computes exactly what
    # the original does instead of re-estimating 1/L in its first eval forward.
    def __getstate__(self) -> dict:
        return self._state_to_copy()

    def _state_to_copy(self) -> dict:
        with _weight_read_only(self):
            self._restore_previous_step()
            up_to_date = not self._step_is_stale()
        state = self.__dict__.copy()
        state["_step_source"] = _UP_TO_DATE if up_to_date else None
        state.pop("_previous_step", None)
        state.pop("_kept_step", None)
        state.pop("_assigned_weight", None)
        state.pop("_checkpoint_step_cache", None)  # weak references to this module's tensors
        return state

    def __setstate__(self, state: dict) -> None:
        step = state["_parameters"].get("step")
        if step is not None and "step_floor" not in state["_buffers"]:  # pickled when the floor was an attribute
            # on the step's device, not the default one: under ``with torch.device("meta")`` the floor was formed on
            # meta and moving it to the step's device raised "Cannot copy out of meta tensor"
            floor = torch.tensor(state.pop("_step_floor", 0.0), dtype=value_dtype(step.dtype), device=step.device)
            state["_buffers"]["step_floor"] = floor
        super().__setstate__(state)  # registers the projection, which reads the floor
        with _weight_read_only(self):
            self._set_state()

    def _set_state(self) -> None:
        if "_estimated_weight" not in self._buffers:  # pickled before the buffer existed: its step stands as saved
            self.register_buffer("_estimated_weight", self.weight.detach().clone(), persistent=False)
        grid = spectrum.periodic_grid(self.kernel_size, self.stride)
        if tuple(self._power_vector.shape[2:]) != grid and not self._power_vector.is_meta:
            # pickled before the per-frequency estimate: its vector was code-sized, and estimates on that grid read
            # up to 2% lower for good. A fresh one on the grid; the saved step stands.
            self._restart_power_vector((1, self.code_channels, *grid))
        if self.__dict__.get("_step_source") == _UP_TO_DATE:
            self._note_step_source()

    def _apply(self, fn, recurse: bool = True):
        with _weight_read_only(self):
            self._restore_previous_step()
            up_to_date = not self._step_is_stale()
        self._drop_weight_references()  # noted again below; a stale step stays stale without them
        floor = self._buffers.get("step_floor")
        floor_unset = floor is not None and floor.is_meta
        apply_keeping_fixed_values_wide(self, ("step", "step_floor", self._threshold_name), super()._apply, fn, recurse)
        if floor_unset and not self.step_floor.is_meta:
            # to_empty() after a meta construction: uninitialised memory, which a load without the floor kept unless
            # above the loaded step's (0 projected the step onto 0, NaN onto NaN). Unknown until reset_parameters()
            # or a load sets it, as when the floor was an attribute a meta construction never set.
            with torch.no_grad():
                self.step_floor.fill_(math.inf)
        if up_to_date:
            with _weight_read_only(self):
                self._note_step_source()
        return self

    @torch.no_grad()
    def normalize_dictionary_(self) -> _ConvSparseCoding:
        """Rescale every atom of ``weight`` (each code channel's (C_sig, *k) filter) to unit norm, and the tracked
        step with it. Zero atoms stay zero. Call after an optimiser step when learning a dictionary."""
        pruning = _projection.pruning(self, "weight")
        # A pruned dictionary: its effective atoms' norms (weight_orig * weight_mask as it is now), divided out of
        # weight_orig, what the optimiser and prune's pre-hook read (dividing `weight`, the product as of the last
        # forward, was undone by the next forward's pre-hook). Otherwise weight itself, as it is stored: under FSDP2
        # a DTensor shard, whose norms and division stay sharded.
        atoms = pruning.apply_mask(self) if pruning is not None else self.weight
        norms = atoms.flatten(1).norm(dim=1).reshape(-1, *([1] * (atoms.dim() - 1)))
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        if pruning is not None:
            self.weight_orig /= norms
        else:
            self.weight /= norms
        # adaptive, as a training forward's estimate: the next training forward sees this weight as estimated and
        # takes no iteration of its own, so three alone left step * L at 1.10 after one call on the CPU (2 -> 8
        # atoms, 1-D) and up to 1.12 with Adam at lr 0.1 (8 -> 32), where training forwards reach 1.02
        self._refresh_step(self._power_steps(cold=False), adaptive=True)
        return self

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C_sig, *S) -> z: (B, C_code, *Sz)."""
        # Before weight is evaluated: a refused call ran spectral_norm's power iteration (training mode) first.
        self._check_input(x)
        if not parametrize.is_parametrized(self, "weight") and _projection.pruning(self, "weight") is None:
            return self._forward(x)
        # One evaluation of a parametrized weight per forward, as nn.Conv2d's: the step's estimate, its source and
        # the iterations read weight several times, and spectral_norm ran its power iteration at every read in
        # training mode (5 per forward), so ISTA ran on another weight than the one its 1/L was estimated from.
        # The one evaluation takes grad (later reads are under no_grad). A pruned weight's is the product prune's
        # pre-hook just formed (outside a forward, _weight forms it anew).
        if torch.compiler.is_compiling():  # dynamo traces parametrize's cache (fullgraph works with it)
            with parametrize.cached():
                self.weight  # noqa: B018
                return self._forward(x)
        held = _FORWARD_WEIGHTS.__dict__.setdefault("weights", {})
        if id(self) in held:  # re-entered on this thread: the outer forward's evaluation stands (and is removed)
            return self._forward(x)
        held[id(self)] = self.weight
        try:
            return self._forward(x)
        finally:
            del held[id(self)]

    def _forward(self, x: Tensor) -> Tensor:
        step = self._forward_step() if self._track_step else self.step
        scale = None
        if self.relative:
            # Each sample's RMS as peak * rms(x / peak), in at least float32: squares of x itself overflowed
            # (float32 beyond |x| ~ 1e19, float16 from 256: NaN codes) or underflowed to an RMS of 0 (below ~1e-19:
            # absolute thresholds, all-zero codes). An all-zero sample keeps scale 1; a NaN or inf makes its
            # sample's scale, so its whole code, NaN (as layer_norm does), instead of silently scale 1. The all-zero
            # sample's mean square is replaced before the sqrt, whose infinite derivative at 0 made its input
            # gradient NaN (0 * inf through the where below), and a deep stack's whole backward with it.
            # The peak is detached and x is divided in its normalised scale: x / peak and its RMS are homogeneous
            # in x, so a constant peak changes no derivative, and differentiating x / peak or x / rms formed
            # (x / peak) / peak, beyond the range (inf, then inf - inf = NaN in the sample's whole input gradient)
            # for a sample whose largest entry is near the smallest normal number (float32 ~1e-38, float64 ~1e-308).
            flat = x.flatten(1).to(torch.promote_types(x.dtype, torch.float32))
            peak = flat.abs().amax(1, keepdim=True).detach()
            peak = torch.where(peak == 0, torch.ones_like(peak), peak)
            normalised = flat / peak
            mean_square = normalised.pow(2).mean(1, keepdim=True)
            mean_square = torch.where(mean_square == 0, torch.ones_like(mean_square), mean_square)
            root = mean_square.sqrt()
            scale = (peak * root).reshape(-1, *([1] * (x.dim() - 1)))
            x = (normalised / root).to(x.dtype).reshape(x.shape)
        values = {self._threshold_name: getattr(self, self._threshold_name)}  # lam= or threshold=
        try:
            z = DF.conv_ista(
                x,
                self._weight(),
                **values,
                n_iter=self.n_iter,
                step=step,
                encoder_weight=self.encoder_weight,
                stride=self.stride,
                padding=self.padding,
                nonneg=self.nonneg,
                fista=self.fista,
                backend=self.backend,
                recompute=self.recompute,
            )
        except (ValueError, TypeError):
            # functional refuses a tracked step of inf or 0 before any kernel runs; the error is made clearer here,
            # on the error path only: checked before every call it was a third read of the step (a host sync on a
            # GPU) after functional's finite and > 0 checks
            error = self._tracked_step_error(step) if self._track_step else None
            if error is None:
                raise
            raise error from None
        if scale is not None:
            z = (z * scale).to(z.dtype)  # in the scale's dtype: a float16 sample's RMS may be below float16's range
        if self.training and not torch.compiler.is_compiling() and not check.functorch_active():
            self._warn_if_all_zero(z)
        return z

    def _forward_step(self) -> Tensor:
        """The tracked step this forward runs with. Inside torch.func transforms the module's state is left as it
        is (their wrapped values cannot be written into it): the step is computed for the call alone."""
        if check.functorch_active():
            return self._step_for_transformed_call()
        if self.training:
            if not torch.compiler.is_compiling() and not self._restore_previous_step():
                self._keep_step_of_replaced_weight()
            self._training_refresh()
        elif not torch.compiler.is_compiling():
            with _STEP_LOCK:
                if self._step_is_stale():
                    # The weight changed since the step was estimated (an optimiser step after the last training
                    # forward, a hand edit): a stale 1/L that is too large makes ISTA diverge silently.
                    self._refresh_stale_step()
        else:
            self._compiled_eval_refresh()
        return self.step

    @torch.no_grad()
    def _compiled_eval_refresh(self) -> None:
        """A compiled eval forward's check for a changed weight, decided on the device (a compiled graph cannot read
        version counters): where the weight's values differ from those the step was estimated from, the eager eval
        forward's cold re-estimate, else nothing (``torch.cond``: no iteration runs for an unchanged weight). Without
        it a compiled eval forward after an optimiser step ran with the previous weight's step (step * L = 5.1 after
        one Adam step at lr 0.1, 8 -> 16 atoms 3x3: codes 1e4 where eager's were below 1)."""
        n_steps = self._power_steps(cold=True)

        def estimate(weight, vector, step):
            inverse_lipschitz, new_vector = self._power_iterate(n_steps)
            # copies: torch.cond's branches may not return their operands, and a rank-one dictionary's estimate
            # (a closed form) hands its vector back as it is
            return inverse_lipschitz.reshape(step.shape).to(step.dtype).clone(), new_vector.clone()

        def keep(weight, vector, step):
            return step.clone(), vector.clone()

        operands = (self._weight().detach(), self._power_vector, self.step)
        inverse_lipschitz, vector = torch.cond(self._weight_changed(), estimate, keep, operands)
        self._power_vector.copy_(vector)
        # Through 1-element views: see refresh_step_
        self.step.view(1).copy_(inverse_lipschitz.view(1))
        self._note_step_source()

    @torch.no_grad()
    def _training_refresh(self) -> None:
        """A few warm-started power iterations that keep step = 1/L as training changes the dictionary, taken only
        when the weight's values changed since the step was estimated: a forward on the same weight (the replay
        of torch.utils.checkpoint, a layer applied twice before the optimiser step) runs with the same step, so the
        backward differentiates the forward that was returned. Decided on the device: no host sync (on the CPU
        the iteration count reads the estimate, see POWER_TOLERANCE). On the CPU in eager mode, where that read costs
        nothing, an unchanged weight skips the iterations whose result the device-side choice would discard (a
        gradient-accumulation loop's later micro-batches, a checkpoint replay: 3 to 20 iterations per forward)."""
        changed = self._weight_changed()
        if changed.device.type == "cpu" and check.values_readable(changed) and not bool(changed):
            self._note_step_source()
            return
        inverse_lipschitz, vector = self._power_iterate(self._power_steps(cold=False), adaptive=True)
        self._power_vector.copy_(torch.where(changed, vector, self._power_vector))
        # Through 1-element views: see refresh_step_
        self.step.view(1).copy_(torch.where(changed, inverse_lipschitz, self.step).view(1))
        self._note_step_source()

    def _keep_step_of_replaced_weight(self) -> None:
        """Before a training forward on another weight tensor than the step's (``torch.func.functional_call``'s
        substitute), keep the step and vector it overwrites, so that the module's own weight, back unchanged, gets
        them back (``_restore_previous_step``), as in eval mode. Without this its next training forward re-estimated
        warm from the substitute's vector, and where a forward takes three iterations (GPU) left the step
        up to 3.5% above the module's 1/L for good (16 -> 16 channels), since an unchanged weight is not re-estimated.
        An optimiser step changes the tensor's values, not the tensor: nothing is kept then. Successive substitutes
        keep what the first overwrote, while that weight is alive and unchanged."""
        source = getattr(self, "_step_source", None)
        if not isinstance(source, tuple) or all(r() is t for r, t in zip(source[0], self._weight_tensors())):
            return
        assigned = self.__dict__.pop("_assigned_weight", None)
        if assigned is not None and assigned() is self._weight():
            return  # the module's own new weight (register_parameter), no substitute: nothing of it to keep yet
        previous = self.__dict__.get("_previous_step")
        if previous is not None and previous is self.__dict__.get("_kept_step") and _unchanged(previous[0]):
            return
        self._previous_step = self._kept_step = (source, self.step.detach().clone(), self._power_vector.clone())

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        # A new weight assigned by the user (functional_call writes its substitutes into _parameters directly): the
        # step kept for the old one no longer stands for the module's own weight. While it was kept (that weight
        # alive and unchanged), a functional_call after the new weight's forwards kept the old one's instead of
        # the new one's, and the new weight never got its step back.
        if name == "weight" and "_step_source" in self.__dict__ and isinstance(param, Tensor):
            self.__dict__.pop("_kept_step", None)
            self._assigned_weight = weakref.ref(param)
        super().register_parameter(name, param)

    def _weight_changed(self) -> Tensor:
        """Whether the weight's values differ from those the step was estimated from: a 0-dim bool on the device."""
        return (self._weight().detach() != self._estimated_weight).any()

    def _drop_weight_references(self) -> None:
        """Forget every weight tensor the step's bookkeeping holds (after ``_restore_previous_step``): a conversion or
        load may swap the weight's tensor, which torch.utils.swap_tensors refuses while weak references to it exist
        (``torch.__future__.set_swap_module_params_on_conversion(True)``: "Couldn't swap weight", "Cannot swap t1")."""
        for name in ("_previous_step", "_kept_step", "_assigned_weight", "_checkpoint_step_cache"):
            self.__dict__.pop(name, None)
        self._step_source = None

    @torch.no_grad()
    def _step_for_transformed_call(self) -> Tensor:
        """What the forward outside a transform would run with, from values (version counters cannot be read):
        the step as it is where the weight is the one it was estimated from, else a training forward's warm-started
        re-estimate (an eval forward's cold one). Under vmap over the weights, each sample gets its own."""
        changed = self._weight_changed()
        n_steps = self._power_steps(cold=not self.training)
        return torch.where(changed, self._power_iterate(n_steps)[0], self.step)

    def _check_input(self, x: object) -> None:
        # functional reads the rank off x, so a 2-D layer given (B, C, L) was taken for per-iteration dictionaries
        # and failed on an unrelated argument (stride, or a channel count that was not x's).
        check.tensor("x", x)
        spatial = "L" if self._rank == 1 else "H, W"
        if x.dim() != self._rank + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must be (B, C_sig={self.in_channels}, {spatial}) for {type(self).__name__}, "
                f"got shape {tuple(x.shape)}"
            )

    def _tracked_step_error(self, step: Tensor) -> ValueError | None:
        # An L = ||D||^2 outside the range of the step's dtype has no 1/L there: inf for a nearly zero dictionary,
        # 0 for a huge one (float32 taps below ~1e-19 or above ~1e19). functional refused it as "step must be
        # finite" or "step must be > 0", naming a step the caller never gave. Called once functional has refused
        # the call: where the step is not the cause, its own error stands.
        values = check.checkable(step)
        if values is None or not bool((values.isinf() | (values == 0)).any()):
            return None
        value = float(values.flatten()[0])
        return ValueError(
            f"the tracked step 1/L of weight is {value}: ||D||^2 of this {'nearly zero' if value else 'very large'} "
            f"dictionary has no inverse in {values.dtype}; rescale weight, or give step="
        )

    def _warn_if_all_zero(self, z: Tensor) -> None:
        self._zero_checks += 1
        if check.storageless(z) or not z.numel() or (self._zero_checks - 1) % ZERO_CHECK_EVERY != 0:
            return
        if not bool(z.detach().any()):
            _warnings.warn(
                f"{type(self).__name__}({self.in_channels}, {self.code_channels}): every code is exactly "
                f"zero in this training batch, so no gradient reaches the layer's inputs; its thresholds "
                f"are too large for the input scale. Lower lam/threshold or use relative=True."
            )

    def decode(self, z: Tensor, signal_size: Sequence[int] | None = None) -> Tensor:
        """x_hat = D z: (B, C_code, *Sz) -> (B, C_sig, *signal_size); the default size is the smallest signal with
        codes of this size (the input's size at stride 1)."""
        if signal_size is None:
            # at least 1: where the padding exceeds what the windows need ((n - 1) s + k <= 2p, e.g. kernel 2 at
            # its default padding 1 and stride 3 on a length-1 signal) the formula gave 0 or less for a code the layer
            # had just returned, and decode(layer(x)) raised; a size-1 signal has that code then
            signal_size = [
                max(1, (n - 1) * s - 2 * p + k)
                for n, s, p, k in zip(z.shape[2:], self.stride, self.padding, self.kernel_size)
            ]
        return DF.conv_synthesis(z, self._weight(), stride=self.stride, padding=self.padding, signal_size=signal_size)

    def extra_repr(self) -> str:
        options = [
            f"{self.in_channels}, {self.code_channels}, kernel_size={self.kernel_size}",
            f"stride={self.stride}",
            f"padding={self.padding}",
            f"n_iter={self.n_iter}",
        ]
        options += [name for name in ("nonneg", "fista", "relative", "recompute") if getattr(self, name)]
        if self.encoder_weight is not None:
            options.append("untied")
        value = getattr(self, self._threshold_name)
        if not isinstance(value, nn.Parameter):
            options.append(_fixed_value(self._threshold_name, value))
        elif self._threshold_name == "threshold":
            options.append("threshold=absolute")
        options += [
            f"learn_{name}"
            for name in ("lam", "threshold", "step")
            if isinstance(getattr(self, name, None), nn.Parameter)
        ]
        if self._track_step:
            options.append("step=1/L (tracked)")
        elif not isinstance(self.step, nn.Parameter):
            options.append(_fixed_value("step", self.step))
        return ", ".join(options + [f"backend={self.backend!r}"])


def _whole(weight: Tensor) -> Tensor:
    """The whole dictionary of a sharded one. FSDP2 (``fully_shard``) keeps ``weight`` as a DTensor shard outside the
    forward, and 1/L, its staleness check and the power iteration need every atom: state_dict(), ``.to()``,
    ``refresh_step_()`` and ``normalize_dictionary_()`` raised "got mixed torch.Tensor and DTensor". Gathering is a
    collective, as FSDP2's own full state dicts are: every rank makes the call."""
    if isinstance(weight, _DTensor):
        return weight.full_tensor()
    return weight


def _tensor_state(tensors: list[Tensor]) -> tuple[tuple[int, int], ...] | None:
    """Where ``tensors`` live and their version counters; None when one cannot be read (storageless, an inference
    tensor, or torch.func's wrapped tensors)."""
    if any(check.storageless(t) or t.is_inference() for t in tensors):
        return None
    try:
        return tuple((t.data_ptr(), t._version) for t in tensors)
    except RuntimeError:  # torch.func's wrapped tensors (grad, vmap) have no storage: unreadable, as compiled
        return None


def _unchanged(source: tuple) -> bool:
    """Whether the tensors of a step source are alive and as they were (same storage and version)."""
    refs, state = source
    tensors = [r() for r in refs]
    return all(t is not None for t in tensors) and _tensor_state(tensors) == state


def _fixed_value(name: str, value: Tensor) -> str:
    """A fixed lam, threshold or step as extra_repr shows it: a scalar's value (a module's one setting, as
    nn.Softshrink prints its lambd), else the shape of the per-channel or per-iteration tensor (or of a meta one)."""
    if value.dim() == 0 and not check.storageless(value):
        return f"{name}={float(value):.4g}"
    return f"{name} of shape {tuple(value.shape)}"


def step_floor_after_load(floor: float, steps: Sequence[Tensor]) -> float:
    """The projection floor of learned steps after a load. A loaded step below it (saved by a module started from a
    smaller step) would jump up to the floor at the first optimiser step; it is a valid start, so the floor follows."""
    lowest = min(float(s.detach().min()) for s in steps)
    return STEP_FLOOR * lowest if lowest < floor else floor


def _before_load(module: _ConvSparseCoding, state_dict, prefix: str, *args) -> None:
    # Only this hook sees the module's prefix; the post hook needs to know what the load brought.
    module._loading = {name for name in ("weight", "step", "step_floor") if prefix + name in state_dict}, prefix
    # The load may swap the weight's tensor: the step given back first as in _apply; _after_load notes the new one.
    with _weight_read_only(module):
        module._restore_previous_step()
    module._drop_weight_references()


def _after_load(module: _ConvSparseCoding, incompatible_keys) -> None:
    """The loaded dictionary has its own top singular vector: restart the power iteration cold. A loaded step is
    kept as is, so a loaded model computes exactly what was saved; a tracked step that the state dict lacks
    (``strict=False``) becomes 1/L of the loaded dictionary, not the old one's."""
    loaded, prefix = module.__dict__.pop("_loading", ({"weight", "step", "step_floor"}, ""))
    # The floor belongs to a learned step: a state dict saved before it was state loads strictly (the module keeps
    # its own floor, lowered below for a smaller loaded step), and so does a learned-step one into a fixed-step layer.
    learned = "step_floor" in module._buffers
    keys = incompatible_keys.missing_keys if learned else incompatible_keys.unexpected_keys
    if prefix + "step_floor" in keys:
        keys.remove(prefix + "step_floor")
    with _weight_read_only(module):
        _restart_after_load(module, loaded)


def _restart_after_load(module: _ConvSparseCoding, loaded: set[str]) -> None:
    weight, vector = module.weight, module._power_vector
    if weight.is_meta:
        return
    if (vector.device, vector.dtype) != (weight.device, weight.dtype):  # assign=True onto a meta or other-dtype module
        # normal tensors even for a load under torch.inference_mode(): the loaded parameters are the state dict's,
        # and inference-tensor caches made the next training forward raise "Inplace update to inference tensor"
        with torch.inference_mode(False):
            module._power_vector = torch.empty(vector.shape, device=weight.device, dtype=weight.dtype)
            module._estimated_weight = torch.empty_like(weight)
    inverse_lipschitz = module._restart_power_vector()
    if module._track_step and "weight" in loaded and "step" not in loaded:
        with torch.no_grad():
            module.step.copy_(inverse_lipschitz)
    if isinstance(module.step, nn.Parameter) and not check.storageless(module.step):
        _floor_after_load(module, loaded)
    module._note_step_source()  # a loaded step belongs to the loaded weight: keep it


def _floor_after_load(module: _ConvSparseCoding, loaded: set[str]) -> None:
    """A loaded floor stands: moved for a loaded step a rounding below it (saved after .half(): 1e-4 below), it went
    1000x lower, where the saving run projects the step back up at its next optimiser step. A state dict without
    one (saved before the floor was state) keeps the module's own, lowered for a smaller loaded step."""
    old = module.step_floor
    readable = check.values_readable(old)
    if "step_floor" in loaded and readable:
        return
    floor = step_floor_after_load(float(old) if readable else math.inf, [module.step])
    if check.storageless(old):  # loaded with assign=True onto a meta module
        with torch.inference_mode(False):  # a normal tensor, as above: a later load fills it in place
            module.step_floor = torch.tensor(floor, device=module.step.device, dtype=old.dtype)
    else:  # in place: DDP keeps references to the module's buffers
        with torch.no_grad():
            old.fill_(floor)


class ConvSparseCoding1d(_ConvSparseCoding):
    _rank = 1
    __doc__ = _CSC_DOC.format(
        x_shape="(B, C_sig, L)",
        z_shape="(B, C_code, L_z)",
        rank=1,
        k_shape="k",
        name="ConvSparseCoding1d",
        example="1, 16, 9, n_iter=10, lam=0.1",
    )


class ConvSparseCoding2d(_ConvSparseCoding):
    _rank = 2
    __doc__ = _CSC_DOC.format(
        x_shape="(B, C_sig, H, W)",
        z_shape="(B, C_code, H_z, W_z)",
        rank=2,
        k_shape="kh, kw",
        name="ConvSparseCoding2d",
        example="1, 32, 7, n_iter=10, lam=0.1",
    )


# Classes that lived in this module before ccd7f48 moved them out: whole modules pickled then (torch.save(module))
# name them here, and torch.load raised "Can't get attribute 'SoftThreshold' on <module
# 'dsc_kernels.nn.sparse_coding'>" for them and for any model that held one. Imported lazily: both modules import this.
_MOVED = {"SoftThreshold": ".soft_threshold", "DeepSparseCoding2d": ".deep"}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name], __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
