"""Training for sparse features: sparsity metrics, activation and coherence regularisers, threshold warm-up,
and ``SparsityMonitor``.

Metrics (any float tensor):
    zero_fraction(t)      fraction of entries that are exactly 0
    hoyer(t, dim)         Hoyer's measure (sqrt(n) - |t|_1/|t|_2) / (sqrt(n) - 1): 0 for equal magnitudes, 1 for
                          a single non-zero (Hoyer 2004)
    channel_activity(t)   (C,) fraction of non-zero entries per channel of a (B, C, *) map

Regularisers (differentiable):
    ActivationL1          weight * mean |output| of chosen modules, collected by forward hooks
    coherence_penalty     ||W^T W - I||_F^2 on the unfolded filters (optionally at every shift: the convolutional
                          dictionary's Gram matrix)
    max_coherence         mu(D) of ``theory.mutual_coherence`` (exact, not differentiable)

Schedules: ``warmup_factor`` and ``ThresholdWarmup`` (ramp fixed thresholds up from a fraction of their targets).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _validate as check
from . import theory
from .nn import (
    ConvSparseCoding1d,
    ConvSparseCoding2d,
    MultiLayerSparseCoding2d,
    SoftThreshold,
    SparseCodingTransformerBlock,
)

__all__ = [
    "zero_fraction",
    "hoyer",
    "channel_activity",
    "ActivationL1",
    "coherence_penalty",
    "max_coherence",
    "warmup_factor",
    "ThresholdWarmup",
    "SparsityMonitor",
    "SPARSE_MODULES",
]

# Modules whose outputs are the hidden feature maps whose sparsity is watched by default (the multi-layer pursuit's
# output is its list of codes, counted together; the transformer block's output is its ISTA MLP's non-negative codes).
SPARSE_MODULES = (
    nn.ReLU,
    nn.Softshrink,
    nn.Hardshrink,
    SoftThreshold,
    ConvSparseCoding1d,
    ConvSparseCoding2d,
    MultiLayerSparseCoding2d,
    SparseCodingTransformerBlock,
)


# ---------------------------------------------------------------------------------------------------- metrics
def _tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_nested:
        # a sparse tensor failed inside torch (NotImplementedError for aten::eq), a nested one in hoyer with "Internal
        # error: NestedTensorImpl doesn't support sizes. Please file an issue."
        kind = "a nested tensor" if t.is_nested else f"layout {t.layout} (convert it with .to_dense())"
        raise TypeError(f"{name} must be a dense (strided) tensor, got {kind}")
    return t


def _reduced_dims(t: Tensor, dim: int | Sequence[int] | None) -> tuple[int, ...]:
    """``dim`` as distinct non-negative axes of ``t`` (a 0-d tensor has the one axis 0, as in torch reductions)."""
    if dim is None:
        return tuple(range(t.dim()))
    rank = max(t.dim(), 1)
    raw = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
    if not raw:
        raise ValueError("dim must name at least one dimension (None reduces over all of them)")
    given = [check.count("dim", d, -rank) for d in raw]
    if max(given) >= rank:
        raise ValueError(f"dim must be in [-{rank}, {rank - 1}] for a tensor of shape {tuple(t.shape)}, got {dim!r}")
    dims = tuple(d % rank for d in given)
    if len(set(dims)) != len(dims):
        raise ValueError(f"dim names a dimension twice: {dim!r}")
    return dims


def zero_fraction(t: Tensor) -> float:
    """Fraction of entries of ``t`` that are exactly zero (NaN counts as non-zero); 0.0 for an empty tensor. A meta
    tensor has no values to count: ValueError."""
    t = _tensor("t", t)
    check.require_values("t", t, "zero_fraction")
    return float((t == 0).sum()) / t.numel() if t.numel() else 0.0


def hoyer(t: Tensor, dim: int | Sequence[int] | None = None) -> Tensor:
    """Hoyer's sparsity ``(sqrt(n) - |t|_1 / |t|_2) / (sqrt(n) - 1)`` in [0, 1] over ``dim`` (all entries when None).

    1 for a vector with one non-zero entry (and, by convention, for an all-zero one and an empty one), 0 when every
    entry has the same magnitude; rounding never takes it outside [0, 1]. n = 1 gives 1. Scale invariant at every
    scale (hoyer(c t) == hoyer(t) for c > 0, tiny t included); NaN (or inf) in a slice gives NaN there.
    Differentiable, with finite gradients (0 at an all-zero slice). Integer and bool tensors are measured in the
    default float dtype; float16 and bfloat16 ones in float32, the result in their dtype. ``dim``: an int or
    distinct ints (negative from the end); TypeError/ValueError otherwise. Returns a tensor with ``dim`` reduced.
    """
    t = _tensor("t", t)
    dims = _reduced_dims(t, dim)
    if not (t.is_floating_point() or t.is_complex()):
        t = t.to(torch.get_default_dtype())  # abs() of a bool is not implemented, and the ratio is not an integer
    n = math.prod(t.shape[d] for d in dims) if t.dim() else 1
    a = t.abs()
    if n <= 1:
        total = a.sum(dim=dims)
        return torch.ones_like(total) + total * 0  # * 0 keeps NaN/inf and the graph
    # sqrt(n) - |t|_1/|t|_2 cancels: in float16/bfloat16 a single non-zero of two gave 0.9995 and [1, 2, 3] 3% off.
    # Measure those in float32 and return their dtype.
    low = a.dtype if a.dtype in (torch.float16, torch.bfloat16) else None
    if low is not None:
        a = a.float()
    # Divide by the largest magnitude: |t|_1 / |t|_2 does not change, and nothing underflows or overflows, so no eps
    # is needed. The scale is detached: the ratio is the same for every scale, so its gradient stays exact.
    top = a.amax(dim=dims, keepdim=True).detach()
    a = a / torch.where(top == 0, torch.ones_like(top), top)
    l1 = a.sum(dim=dims)
    sq = a.pow(2).sum(dim=dims)  # >= 1 (the largest entry is now exactly 1) unless the slice is all zero; NaN stays
    zero = sq == 0
    # where() on both sides: the all-zero branch must not see 0/0 or sqrt'(0), whose NaN/inf would leak into grads
    ratio = l1 / torch.where(zero, torch.ones_like(sq), sq).sqrt()
    # equal magnitudes give ratio = sqrt(n) up to rounding, which can land a hair outside [0, 1]; clamp keeps NaN
    # The last step in float64: in float32 a single non-zero (ratio exactly 1) gave 0.99999994, the numerator
    # rounded to float32 and the denominator not. One value per slice, so this costs nothing.
    wide = ratio.double() if ratio.dtype == torch.float32 else ratio
    value = ((math.sqrt(n) - wide) / (math.sqrt(n) - 1)).clamp(0.0, 1.0).to(ratio.dtype)
    value = torch.where(zero, torch.ones_like(ratio), value)
    return value if low is None else value.to(low)


def channel_activity(t: Tensor) -> Tensor:
    """t: (B, C, *) -> (C,) fraction of non-zero entries of each channel over batch and space (NaN counts as non-zero;
    a channel with no entries, B = 0 or an empty spatial axis, gives NaN: a fraction of nothing)."""
    if _tensor("t", t).dim() < 2:
        raise ValueError(f"t must be (B, C, ...), got shape {tuple(t.shape)}")
    return (t != 0).transpose(0, 1).flatten(1).float().mean(1)


def _tensors(output) -> list[Tensor]:
    """The tensors of a module output (a tensor, or a list/tuple of them, e.g. DeepSparseCoding2d's codes)."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    return []


def _recomputing() -> bool:
    """Whether a forward runs inside a backward: activation checkpointing (``torch.utils.checkpoint``) rerunning a
    forward that was recorded already. Recording the rerun counted it twice, and left a term with a consumed graph
    for the next ``pop`` (whose backward then failed)."""
    # Dynamo cannot trace the query (a graph break per hook); a compiled graph's own recomputation runs no hooks.
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def _named(modules: Mapping[str, nn.Module] | Iterable[nn.Module] | nn.Module) -> dict[str, nn.Module]:
    # ModuleDict and ModuleList are modules with no forward of their own: a hook on them would never fire, so they
    # stand for the modules they hold.
    if isinstance(modules, nn.ModuleDict):
        named = dict(modules.items())
    elif isinstance(modules, nn.ModuleList):
        named = {str(i): m for i, m in enumerate(modules)}
    elif isinstance(modules, nn.Module):
        return {"": modules}
    elif isinstance(modules, Mapping):
        named = dict(modules)
    elif isinstance(modules, Iterable) and not isinstance(modules, (str, bytes)):
        named = {str(i): m for i, m in enumerate(modules)}
    else:
        raise TypeError(f"modules must be a module, a dict of modules or an iterable of them, got {modules!r}")
    flat = {}
    for name, m in named.items():
        if not isinstance(m, nn.Module):
            raise TypeError(f"modules[{name!r}] must be an nn.Module, got {type(m).__name__}")
        if isinstance(m, (nn.ModuleDict, nn.ModuleList)):
            # a container inside the dict or list stands for its modules too: hooked itself it never fired, and the
            # penalty was 0.0 (the monitor's summary empty) without a word
            flat.update({f"{name}.{inner}": module for inner, module in _named(m).items()})
        else:
            flat[name] = m
    return flat


# ----------------------------------------------------------------------------------------------- regularisers
class ActivationL1:
    """Activation-l1 penalty ``weight * sum_m mean|output_m|`` over chosen modules, collected by forward hooks.

    >>> reg = ActivationL1({"act1": model.act1, "act2": model.act2}, weight=1e-3)
    >>> loss = F.cross_entropy(model(x), y) + reg.pop()   # the penalty of the forwards since the last pop

    ``modules``: a module, a dict or ``nn.ModuleDict`` name -> module, or a list or ``nn.ModuleList`` of modules (a
    container, there or inside the dict or list, stands for the modules it holds: it has no forward of its own to
    hook). Outputs are recorded only while grad is enabled (training forwards). Empty outputs (an empty batch) and
    non-float ones (indices) hold no activations to penalise and are skipped. ``remove()`` (or leaving a ``with``
    block) detaches the hooks; entering a ``with`` block again attaches them again.
    Under ``torch.utils.checkpoint`` the recomputation in the backward is not recorded again; with
    ``use_reentrant=True`` the checkpointed forward itself runs without grad, so its modules add nothing (use
    ``use_reentrant=False``).

    Under ``torch.compile``: Dynamo does not guard on submodules' hooks by default, so a graph compiled before the
    hooks were added (for this model, or another instance of its class) runs without them and the penalty is 0.0.
    Add the hooks before the first compiled call, or set ``torch._dynamo.config.skip_nnmodule_hook_guards = False``.
    """

    def __init__(self, modules: Mapping[str, nn.Module] | Iterable[nn.Module], weight: float):
        # numbers.Real: numpy scalars are weights too (np.float32 is no float subclass)
        if isinstance(weight, bool) or not (isinstance(weight, numbers.Real) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"weight must be a finite float >= 0, got {weight!r}")
        self.weight = float(weight)
        self._terms: list[Tensor] = []
        self._modules = list(_named(modules).values())
        self._attach()

    def _attach(self) -> None:
        self._handles = [m.register_forward_hook(self._record) for m in self._modules]

    def _record(self, module: nn.Module, inputs, output) -> None:
        if torch.is_grad_enabled():
            # the mean of an empty output is NaN, and one empty batch would make the whole loss NaN
            terms = [t.abs().mean() for t in _tensors(output) if t.numel() and t.is_floating_point()]
            # A checkpoint's rerun forms the terms again, as the checkpoint expects the tensors they save for their
            # backward (it fails on a different count), but they were recorded in the first run.
            if not _recomputing():
                self._terms.extend(terms)

    def pop(self) -> Tensor | float:
        """The penalty of the outputs recorded since the last call (0.0 when none), and forget them."""
        terms, self._terms = self._terms, []
        return self.weight * torch.stack(terms).sum() if terms else 0.0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._terms = [], []

    def __enter__(self) -> ActivationL1:
        # the hooks exist from construction; a block left before (or remove()) took them away: an epoch loop around
        # `with reg:` penalised nothing from its second epoch on
        if not self._handles:
            self._attach()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _unfolded(weight: Tensor, normalize: bool) -> Tensor:
    atoms = weight.flatten(1)  # (C_code, C_sig * prod(k)): one atom per row
    if normalize:
        # Divide by each atom's largest magnitude first (detached: the unit atom does not depend on its scale), so
        # that the norm of a tiny atom does not underflow to 0, nor a huge one's overflow to inf.
        top = atoms.abs().amax(dim=1, keepdim=True).detach() if atoms.shape[1] else atoms.new_zeros(len(atoms), 1)
        zero = top == 0
        # An all-zero atom is the constant 0, selected after normalising ones in its place: the norm's second
        # derivative at 0 is NaN (torch's norm), which made a Hessian-vector product of the penalty NaN in that row.
        safe = torch.where(zero, torch.ones_like(atoms), atoms / torch.where(zero, torch.ones_like(top), top))
        atoms = torch.where(zero, torch.zeros_like(atoms), safe / safe.norm(dim=1, keepdim=True))
    return atoms


def coherence_penalty(
    weight: Tensor, *, normalize: bool = True, shifts: bool = False, stride: int | Sequence[int] = 1
) -> Tensor:
    """``||W^T W - I||_F^2`` of a conv dictionary, W's columns the unfolded filters (differentiable).

    weight: (C_code, C_sig, k) or (C_code, C_sig, kh, kw). ``normalize``: use unit-norm atoms, so the penalty is the sum
    of squared cosines between distinct atoms (with False the atoms' norms are pushed to 1 too). ``shifts``: also
    penalise atoms against every shifted copy that overlaps them by a multiple of ``stride`` (the Gram matrix of the
    convolutional dictionary, whose largest off-diagonal entry is the mutual coherence of interior atoms); each distinct
    pair is counted twice, like the unshifted Gram's off-diagonal. ``stride``: an int >= 1 or one per spatial axis
    (ValueError/TypeError otherwise). weight must be floating-point (TypeError). Returns a 0-d tensor; NaN in ``weight``
    gives NaN. An all-zero atom (C_sig = 0 included) has no direction: it stays zero, orthogonal to every atom, and
    misses its unit self-product, adding 1 (a constant, with zero gradient).
    """
    theory._check_weight(_tensor("weight", weight))
    if not weight.is_floating_point():
        raise TypeError(f"weight must have a floating-point dtype, got {weight.dtype}")
    check.flag("normalize", normalize)
    check.flag("shifts", shifts)
    rank = weight.dim() - 2
    strides = check.ints("stride", stride, rank, minimum=1)  # checked even unused, so a bad call fails at once
    atoms = _unfolded(weight, normalize)
    eye = torch.eye(len(atoms), dtype=atoms.dtype, device=atoms.device)
    if not shifts or weight.shape[0] == 0:  # no atoms: the (0, 0) Gram matrix, conv would reject the empty weight
        gram = atoms @ atoms.T
        return (gram - eye).pow(2).sum()
    w = atoms.reshape(weight.shape)
    kernel = w.shape[2:]
    conv = F.conv1d if rank == 1 else F.conv2d
    # gram[a, b, shift] = <d_a, d_b shifted>: cross-correlation of every pair of filters at every overlap.
    if w.shape[1]:
        gram = conv(w, w, padding=tuple(k - 1 for k in kernel))  # (C_code, C_code, *(2k - 1))
    else:  # no signal channels: every atom is empty, all products 0 (torch's conv rejects 0 input channels)
        gram = w.new_zeros((w.shape[0], w.shape[0], *(2 * k - 1 for k in kernel))) + w.sum() * 0
    index = tuple(slice((k - 1) % s, None, s) for k, s in zip(kernel, strides))
    gram = gram[(slice(None), slice(None), *index)]
    centre = tuple((k - 1) // s for k, s in zip(kernel, strides))
    identity = torch.zeros_like(gram)
    identity[(slice(None), slice(None), *centre)] = eye
    return (gram - identity).pow(2).sum()


def max_coherence(
    weight: Tensor,
    signal_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
) -> float:
    """The mutual coherence mu(D) of the convolutional dictionary at this signal size (``theory.mutual_coherence``):
    the largest |cosine| between two distinct atoms, border atoms included (zero atoms, e.g. inside a padding >= k,
    skipped; 0.0 without two non-zero atoms; NaN for a NaN filter tap). Not differentiable; a monitor."""
    return theory.mutual_coherence(_tensor("weight", weight), signal_size, stride=stride, padding=padding)


# -------------------------------------------------------------------------------------------------- schedules
def warmup_factor(step: int, warmup_steps: int, *, start: float = 0.0, shape: str = "linear") -> float:
    """A multiplier that rises from ``start`` at step 0 to 1 at ``warmup_steps`` (and stays 1 after).

    shape: "linear" or "cosine" (half a cosine: slow at both ends). step and warmup_steps are ints >= 0
    (warmup_steps = 0: no warm-up, 1 at once); start is finite and in [0, 1] (a negative factor would make thresholds
    negative). TypeError/ValueError otherwise.
    """
    if shape not in ("linear", "cosine"):
        raise ValueError(f"shape must be 'linear' or 'cosine', got {shape!r}")
    step, warmup_steps = check.count("step", step, 0), check.count("warmup_steps", warmup_steps, 0)
    start = theory._real("start", start, high=1.0)
    if step >= warmup_steps:
        return 1.0
    progress = step / warmup_steps
    if shape == "cosine":
        progress = 0.5 - 0.5 * math.cos(math.pi * progress)
    return start + (1.0 - start) * progress


# Modules whose fixed threshold is a Python float attribute rather than a buffer, and that attribute.
_FLOAT_THRESHOLDS = ((nn.Softshrink, "lambd"), (nn.Hardshrink, "lambd"), (SparseCodingTransformerBlock, "lam"))


class ThresholdWarmup:
    """Ramps the fixed thresholds (``lam``/``threshold`` buffers, ``nn.Softshrink``/``nn.Hardshrink``'s ``lambd`` and
    ``SparseCodingTransformerBlock``'s ``lam``) of a model's sparse layers from ``start`` times their values to their
    values over ``warmup_steps`` calls of ``step()``: training starts dense, where gradients reach every unit, and
    reaches the target sparsity at the end of the warm-up. ``lambd`` and the block's ``lam`` are Python floats: a
    compiled model recompiles once when they first change, a ``SoftThreshold`` (a buffer) not at all.

    Learned thresholds (parameters) are left to the optimiser. ``targets`` holds the final values ({name: tensor}),
    read from the buffers at construction: build it on the model before any warm-up, and to resume from a checkpoint
    save ``state_dict()`` beside the model's and ``load_state_dict`` it into the new warm-up (built on the loaded
    model, whose buffers hold warmed-down values), as for an LR scheduler. The buffers are looked up at every step,
    so moving or casting the model (``.to``, ``.double()``) after construction is fine.
    """

    def __init__(self, model: nn.Module, warmup_steps: int, *, start: float = 0.0, shape: str = "linear"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        warmup_factor(0, warmup_steps, start=start, shape=shape)  # bad arguments fail before any buffer is touched
        self.warmup_steps, self.start, self.shape, self.count = warmup_steps, start, shape, 0
        self.targets: dict[str, Tensor] = {}
        # module.to() replaces its buffers by new tensors: keep where each lives, not the tensor of the moment
        self._slots: dict[str, tuple[nn.Module, str]] = {}
        for name, module in model.named_modules():
            # thresholds held as Python floats, read at every forward (the block's lam was skipped as lambd had been:
            # a model with a SoftThreshold beside it ramped that alone, and the block coded at its target throughout)
            attr = next((a for kind, a in _FLOAT_THRESHOLDS if isinstance(module, kind)), None)
            if attr is not None:
                key = f"{name}.{attr}" if name else attr
                # on the CPU whatever torch.set_default_device says: read back at every step (inside
                # ``with torch.device("meta")`` that raised "Tensor.item() cannot be called on meta tensors"; under
                # set_default_device("cuda") it was a host sync per step)
                self.targets[key] = torch.tensor(float(getattr(module, attr)), dtype=torch.float64, device="cpu")
                self._slots[key] = (module, attr)
            elif isinstance(module, SPARSE_MODULES):
                for attr in ("lam", "threshold"):
                    value = module._buffers.get(attr)
                    if value is not None:
                        key = f"{name}.{attr}" if name else attr
                        self.targets[key], self._slots[key] = value.detach().clone(), (module, attr)
        if not self.targets:
            raise ValueError("model has no fixed lam/threshold buffers, shrink lambd or block lam to warm up")
        self._apply()

    @property
    def factor(self) -> float:
        return warmup_factor(self.count, self.warmup_steps, start=self.start, shape=self.shape)

    @torch.no_grad()
    def _apply(self) -> None:
        for key, (module, attr) in self._slots.items():
            if attr not in module._buffers:  # a float threshold (_FLOAT_THRESHOLDS), read at every forward
                setattr(module, attr, float(self.targets[key]) * self.factor)
                continue
            buffer = module._buffers[attr]
            buffer.copy_(self.targets[key].to(buffer.device) * self.factor)

    def step(self) -> float:
        """Advance one step and set every threshold to factor * target; returns the factor."""
        self.count += 1
        try:
            self._apply()
        except BaseException:
            # a failure part-way (an interrupt, a buffer that became an inference tensor) left the count ahead of the
            # thresholds: the retried step() skipped a step of the ramp (factor 0.5 after one step of 4)
            self.count -= 1
            raise
        return self.factor

    def state_dict(self) -> dict:
        """The schedule (warmup_steps, start, shape), the step count and the targets (copies), for
        ``load_state_dict``."""
        schedule = {"warmup_steps": self.warmup_steps, "start": self.start, "shape": self.shape}
        return {**schedule, "count": self.count, "targets": {k: v.clone() for k, v in self.targets.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        """Resume a warm-up from ``state_dict()``: its schedule, targets and count, then set the thresholds to match.
        The saved schedule wins over the constructor's, as an LR scheduler's does: a resume built with another
        ``warmup_steps`` otherwise jumped to another point of the ramp. (States saved before the schedule was part of
        them keep the constructor's.)"""
        schedule = {key: state.get(key, getattr(self, key)) for key in ("warmup_steps", "start", "shape")}
        warmup_factor(0, schedule["warmup_steps"], start=schedule["start"], shape=schedule["shape"])
        targets = state["targets"]
        if set(targets) != set(self.targets):
            raise ValueError(f"state holds targets for {sorted(targets)}, this warm-up has {sorted(self.targets)}")
        loaded = {k: torch.as_tensor(v).detach().clone() for k, v in targets.items()}
        for key, value in loaded.items():
            if value.shape != self.targets[key].shape:  # copy_ into the buffer would broadcast it silently
                raise ValueError(
                    f"state's target {key} has shape {tuple(value.shape)}, its buffer {tuple(self.targets[key].shape)}"
                )
        self.count = check.count("count", state["count"], 0)
        self.warmup_steps, self.start, self.shape = schedule["warmup_steps"], schedule["start"], schedule["shape"]
        self.targets = loaded
        self._apply()


# ---------------------------------------------------------------------------------------------------- monitor
class SparsityMonitor:
    """Records per-layer fractions of exact zeros of module outputs (floating-point ones: indices are skipped, as
    in ``ActivationL1``), separately for training and eval forwards.

    >>> with SparsityMonitor(model) as monitor:
    ...     for epoch in range(n):
    ...         train(...); evaluate(...)
    ...         monitor.end_epoch()           # appends {"train": {...}, "eval": {...}} to monitor.history
    >>> monitor.summary("eval")                # {layer name: zero fraction} of the forwards since the last epoch end

    ``modules``: the modules to watch (a dict or ``nn.ModuleDict`` name -> module, a ``ModuleList``/``ModuleDict``
    value standing for its modules, named ``name.i``/``name.key``; or None for every ``SPARSE_MODULES`` instance in
    ``model``, named as in ``named_modules``). Counts accumulate on the tensors' device (no sync per forward); a
    ``torch.utils.checkpoint`` recomputation in the backward is not counted again.
    A monitor can be entered again after its block ends (history and counts carry on), but not inside its own
    block: that raises RuntimeError. Hooks are removed whenever the block is left, by an exception too. Under
    ``torch.compile`` the hooks must exist before the first compiled call, as for ``ActivationL1``.
    """

    def __init__(self, model: nn.Module, modules: Mapping[str, nn.Module] | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if modules is not None and not isinstance(modules, (Mapping, nn.ModuleDict)):
            raise TypeError(
                f"modules must be a dict (or nn.ModuleDict) name -> module, or None, got {type(modules).__name__}"
            )
        if modules is None:
            modules = {
                name or type(model).__name__: m for name, m in model.named_modules() if isinstance(m, SPARSE_MODULES)
            }
        self.modules = _named(modules)
        if not self.modules:
            raise ValueError("no modules to monitor: pass modules={name: module}")
        self.history: list[dict[str, dict[str, float]]] = []
        self._counts: dict[tuple[str, str], list] = {}
        self._handles: list = []

    def __enter__(self) -> SparsityMonitor:
        # Not re-entrant: a nested entry would register a second set of hooks (every forward counted twice) and
        # overwrite the handles of the first, which then could never be removed.
        if self._handles:
            raise RuntimeError("SparsityMonitor is already active: leave its with block before entering it again")
        try:
            for name, m in self.modules.items():
                self._handles.append(m.register_forward_hook(self._hook(name)))
        except BaseException:
            self._remove_hooks()  # the hooks registered before the failure
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove_hooks()  # on every exit, the body's exceptions included (they propagate)

    def _remove_hooks(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def _hook(self, name: str):
        def record(module: nn.Module, inputs, output) -> None:
            if _recomputing():
                return
            phase = "train" if module.training else "eval"
            # integer and bool outputs (indices, masks) are no activations: an index 0 counted as an exact zero
            for t in (t for t in _tensors(output) if t.is_floating_point() or t.is_complex()):
                entry = self._counts.setdefault((phase, name), [0, 0])
                entry[0] = entry[0] + (t.detach() == 0).sum()
                # a tensor, as the zeros: under torch.compile a Python int here is a constant that Dynamo guards on,
                # so every forward recompiled (fullgraph=True raised FailOnRecompileLimitHit at the 9th forward;
                # without it the model ran eager from then on)
                entry[1] = entry[1] + torch.full((), t.numel(), dtype=torch.int64, device=t.device)

        return record

    def summary(self, phase: str = "eval") -> dict[str, float]:
        """{layer: fraction of exact zeros} over the ``phase`` forwards ("train" or "eval") since the last
        ``end_epoch``; layers not run in that phase are left out."""
        if phase not in ("train", "eval"):
            raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
        return {
            name: float(zeros) / float(total)
            for (p, name), (zeros, total) in self._counts.items()
            if p == phase and total
        }

    @staticmethod
    def mean(per_layer: Mapping[str, float]) -> float:
        """The unweighted mean over layers of a ``summary``."""
        return sum(per_layer.values()) / len(per_layer) if per_layer else float("nan")

    def end_epoch(self) -> dict[str, dict[str, float]]:
        """Close the current epoch: append and return {"train": summary, "eval": summary}; start new counts."""
        record = {"train": self.summary("train"), "eval": self.summary("eval")}
        self.history.append(record)
        self._counts = {}
        return record
