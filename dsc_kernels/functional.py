"""The typed public API (docs/design.md): input validation, then the backend table's choice, nothing else.

Users write ``import dsc_kernels.functional as DF``. Every function checks its inputs and raises ``ValueError`` /
``TypeError`` naming the argument before any kernel runs, then asks ``ops.select`` which backend row runs the call
(``backend=`` names one of the table's backends or ``"auto"``; the environment variable ``DSC_KERNELS_BACKEND``
overrides ``"auto"``) and hands it canonical tensors.

Shapes: x is (B, C_sig, L) for 1-D or (B, C_sig, H, W) for 2-D, chosen by the dictionary weight's rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import _attention_args as attention_args
from . import _ml_ista_args as ml_args
from . import _validate as check
from . import _warnings, ops
from . import reference as ref
from .ops import conv_ista as conv_ista_ops
from .ops import cpu_cost
from .ops import ml_ista as ml_ista_ops
from .ops import sparse_attention as sparse_attention_ops
from .reference.attention import MODES, sparse_attention_weights_ref, sparsemax_ref

IntOrPair = check.IntOrPair
Padding = check.Padding

__all__ = [
    "available_backends",
    "backend_unavailable_reason",
    "check_backend",
    "soft_threshold",
    "conv_analysis",
    "conv_synthesis",
    "lipschitz_constant",
    "lasso_objective",
    "conv_ista",
    "deep_conv_ista",
    "ml_ista",
    "sparsemax",
    "sparse_attention",
    "sparse_attention_weights",
]


# ----------------------------------------------------------------------------------------------- backend choice
def backend_unavailable_reason(backend: str, device: torch.device | str) -> str | None:
    """Why conv-ISTA backend ``backend`` cannot run on ``device`` here (with how to fix it), or None when it can
    (always for "auto", which falls back to the reference, unless ``DSC_KERNELS_BACKEND`` names a backend in its
    place: calls then run that one or raise, and so it is that one that is checked). ``backend`` is read as
    ``check_backend`` reads it."""
    name = ops.backend_name(backend, "conv_ista")
    device_type = check.any_device("device", device).type
    # auto read the variable as a call reads it (a bad value raises the call's ValueError naming it): with
    # DSC_KERNELS_BACKEND=triton on CPU this said None while every auto call there raised
    name, origin = ops.selection.requested(name)
    reason = None if name == "auto" else ops.unavailable_reason("conv_ista", name, device_type)
    if reason is None or origin == "backend=":
        return reason
    return f"{origin}{name!r} stands for backend 'auto' and {name} cannot run: {reason}"


def check_backend(
    backend: object,
    family: str | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """``backend`` checked against the backend names (TypeError / ValueError naming it) and normalised; with
    ``family`` ("conv_ista", "ml_ista", "sparse_attention") it must also have that family's kernels. Whether it can
    run is decided at the call, which knows the device and dtype; given ``device`` (and ``dtype``, default float32)
    with a family, it is decided here as that call would decide it from the device and dtype alone
    (``DSC_KERNELS_BACKEND`` read for "auto"), and the name of the backend that would run is returned, or the call's
    error raised. What "auto" also reads at the call is not known here: the CPU cost model's shapes (a
    strongly convolution-bound training call runs the reference), a mask that needs its gradient, a torch.func
    transform or a forward-mode tangent (each runs the reference)."""
    name = ops.backend_name(backend, family)
    if device is None:
        return name
    if family is None:
        raise ValueError("check_backend needs the op family to decide whether a backend can run on a device")
    dtype = torch.float32 if dtype is None else dtype
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    dtypes = sorted({d for row in ops.table.rows(family) for d in row.dtypes}, key=str)
    if dtype not in dtypes:
        # "auto" ends on the reference row whatever the dtype, and returned "reference" for an integer dtype that
        # the call itself refuses before any backend is chosen
        raise TypeError(f"dtype must be one of {', '.join(map(str, dtypes))}, got {dtype}")
    return ops.select(family, name, check.any_device("device", device), dtype).name


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The conv-ISTA backends that can run on ``device`` on this machine (``reference`` always can)."""
    return ops.available("conv_ista", check.any_device("device", device))


# ------------------------------------------------------------------------------------------------ simple ops
def soft_threshold(x: Tensor, threshold: Tensor | float, *, nonneg: bool = False) -> Tensor:
    """``S_t(x) = sign(x) max(|x| - t, 0)`` (``max(x - t, 0)`` when ``nonneg``), in x's dtype.

    x: any shape; threshold: a float or a tensor broadcastable to x, >= 0 (with ``nonneg`` a negative threshold is
    allowed: ``max(x - t, 0)`` is a ReLU with bias ``-t``). Derivative 0 at ``|x| = t``, NaN in gives NaN out,
    exactly as ``F.softshrink`` / ``F.relu``.
    """
    check.tensor("x", x)
    check.flag("nonneg", nonneg)
    if isinstance(threshold, Tensor):  # shape and device first: no value read for a call refused for them
        check.same_device(x=x, threshold=threshold)
        check.broadcasts_to("threshold", threshold, x.shape)
    threshold = check.finite_value(
        "threshold", threshold, dtype=x.dtype, nonnegative_name=None if nonneg else "threshold"
    )
    return ref.soft_threshold_ref(x, threshold, nonneg)


def conv_analysis(x: Tensor, weight: Tensor, *, stride: IntOrPair = 1, padding: Padding = 0) -> Tensor:
    """``D^T x``. x: (B, C_sig, *S), weight: (C_code, C_sig, *k) -> (B, C_code, *Sz)."""
    weight = check.weight("weight", weight)
    x = check.signal("x", x, weight)
    check.same_device(x=x, weight=weight)
    check.same_dtype(x=x, weight=weight)
    stride, padding, _ = check.geometry(x.shape[2:], weight, stride, padding)
    return ref.conv_analysis_ref(x, weight, stride, padding)


def conv_synthesis(
    z: Tensor, weight: Tensor, *, stride: IntOrPair = 1, padding: Padding = 0, signal_size: Sequence[int]
) -> Tensor:
    """``D z`` with spatial size ``signal_size`` (the exact adjoint of ``conv_analysis``).

    z: (B, C_code, *Sz), weight: (C_code, C_sig, *k) -> (B, C_sig, *signal_size).
    """
    weight = check.weight("weight", weight)
    z = check.tensor("z", z, rank=weight.dim())
    if z.shape[1] != weight.shape[0]:
        raise ValueError(f"z has {z.shape[1]} channels but weight expects C_code={weight.shape[0]}")
    check.same_device(z=z, weight=weight)
    check.same_dtype(z=z, weight=weight)
    signal_size = check.ints("signal_size", signal_size, weight.dim() - 2, minimum=1)
    stride, padding, code = check.geometry(signal_size, weight, stride, padding)
    if tuple(z.shape[2:]) != code:
        raise ValueError(
            # name signal_size: it is the argument a caller fixes as often as z
            f"z has spatial size {tuple(z.shape[2:])}, but signal_size={signal_size} has codes of "
            f"size {code} with this kernel, stride and padding"
        )
    return ref.conv_synthesis_ref(z, weight, signal_size, stride, padding)


def lipschitz_constant(
    weight: Tensor, signal_size: Sequence[int], *, stride: IntOrPair = 1, padding: Padding = 0, n_iter: int = 100
) -> float:
    """``L = ||D||_2^2`` at this signal size (power iteration; ISTA's default step is 1/L; 0 for a zero weight).

    Power iteration approaches ||D||_2^2 from below: a convolution's spectrum has no gap at its top, so after the
    default 100 iterations the estimate can still be a few % low (0.03-1.1% measured against an SVD on the sweep's
    problems, up to 3% on a tiny strided one: (1, 1, 3, 2) atoms on 8 x 9, stride (2, 1), padding (1, 2); more
    ``n_iter`` closes it). The default step 1/L is then that much above 1/||D||_2^2, well
    inside ISTA's convergence range (step < 2/||D||_2^2); the rates that assume step <= 1/||D||_2^2
    (docs/theory.md) need a step scaled down by that margin, or a larger ``n_iter``.

    weight: (C_code, C_sig, *k); signal_size: the spatial size of x.
    """
    weight = check.weight("weight", weight)
    check.require_values("weight", weight, "the power iteration estimating L")
    signal_size = check.ints("signal_size", signal_size, weight.dim() - 2, minimum=1)
    stride, padding, _ = check.geometry(signal_size, weight, stride, padding)
    n_iter = check.count("n_iter", n_iter, 1)
    return ref.lipschitz_constant_ref(weight, signal_size, stride, padding, n_iter)


def lasso_objective(
    x: Tensor, z: Tensor, weight: Tensor, lam: Tensor | float, *, stride: IntOrPair = 1, padding: Padding = 0
) -> Tensor:
    """Per-sample ``0.5 ||x - D z||^2 + sum_c lam_c ||z_c||_1``. lam: float or (C_code,). Returns (B,)."""
    weight = check.weight("weight", weight)
    x = check.signal("x", x, weight)
    z = check.tensor("z", z, rank=weight.dim())
    check.same_device(x=x, z=z, weight=weight)
    check.same_dtype(x=x, z=z, weight=weight)
    stride, padding, code = check.geometry(x.shape[2:], weight, stride, padding)
    if tuple(z.shape) != (x.shape[0], weight.shape[0], *code):
        raise ValueError(f"z must have shape {(x.shape[0], weight.shape[0], *code)}, got {tuple(z.shape)}")
    lam = check.scalar_or_tensor("lam", lam)
    check.nonnegative("lam", lam)
    if isinstance(lam, Tensor):
        check.same_device(x=x, lam=lam)
        if lam.shape not in ((), (weight.shape[0],)):
            raise ValueError(
                f"lam must be a float, a 0-d tensor or (C_code,)=({weight.shape[0]},), got {tuple(lam.shape)}"
            )
    check.fits_dtype("lam", lam, x.dtype)  # an inf lam times a zero code would make the objective NaN
    return ref.lasso_objective_ref(x, z, weight, lam, stride, padding)


def _tensors_in(value: object) -> tuple[Tensor, ...]:
    """The tensors in an argument dict or list, nested ones included."""
    if isinstance(value, Tensor):
        return (value,)
    if isinstance(value, dict):
        value = value.values()
    if isinstance(value, (list, tuple, type({}.values()))):
        return tuple(t for v in value for t in _tensors_in(v))
    return ()


# -------------------------------------------------------------------------------------------------- conv-ISTA
_LIPSCHITZ_CACHE = WeakIdKeyDictionary()  # tensor (a view's base) -> {view's place: (geometry, values, 1/L)}
# Views' entries kept per tensor beyond those one call uses, the least recently used dropped: each holds a copy of its
# view's values, so a bank of dictionaries used a view at a time (bank[i] for every i) kept a copy of the whole bank.
CACHED_VIEWS_PER_TENSOR = 4


def _default_step(weight: Tensor, signal_size: tuple[int, ...], stride, padding) -> Tensor | float:
    """1/L of one dictionary at this signal size: ``_default_steps`` for one."""
    return _default_steps([(weight, signal_size, stride, padding)])[0]


def _default_steps(requests: Sequence[tuple[Tensor, tuple[int, ...], tuple, tuple]]) -> list[Tensor | float]:
    """1/L (``_inverse_lipschitz``) of each (weight, signal size, stride, padding). Eager calls cache it per weight
    tensor with a copy of the values it was computed for (a view, such as ml_ista's per-step dictionaries, per the
    tensor it views and its place there), and reuse it only while the weight still equals that copy: a comparison
    instead of a power iteration, and it sees every change (an optimiser step, but also writes through ``.data``,
    which the version counter misses, and inference tensors, which have none). The comparisons of all requests are
    read together (one host sync on a GPU, not one per dictionary). A tensor keeps the entries of the views this call
    used and of ``CACHED_VIEWS_PER_TENSOR`` more, the least recently used dropped. Under torch.compile the power
    iteration is traced, and so it is under vmap over the dictionary (one 1/L per sample)."""
    keys: list = []  # per request: its cache key, or its traced 1/L where the values cannot be read
    looked_up = {}  # (base's id, place, geometry) -> (base, weight, cached entry or None), one per distinct request
    for weight, signal_size, stride, padding in requests:
        if not check.values_readable(weight):
            carried = ref.value_dtype(weight.dtype)
            keys.append(_inverse_lipschitz(weight, signal_size, stride, padding).to(carried))
            continue
        # Keyed on the tensor a view was taken of, and the view's place in it: ml_ista and the per-iteration variants
        # pass w.unsqueeze(0)[k], a new view on every call, so a cache keyed on the view itself never hit and every
        # call ran the power iteration again (100 iterations per layer: 400 convolutions per call for a 2-layer
        # ml_ista). The values are compared all the same, so a key that names another tensor can only miss, never
        # give a wrong 1/L.
        base = weight if weight._base is None else weight._base
        place = (weight.storage_offset(), tuple(weight.shape), weight.stride(), weight.dtype, weight.device)
        key = (id(base), place, (tuple(signal_size), tuple(stride), tuple(padding)))
        if key not in looked_up:
            cached = _LIPSCHITZ_CACHE.get(base, {}).get(place)
            looked_up[key] = (base, weight, cached if cached is not None and cached[0] == key[2] else None)
        keys.append(key)
    # every cached copy compared with its weight's values, all read together
    compared = [key for key, (_, _, cached) in looked_up.items() if cached is not None]
    equal = check.read_values([(looked_up[k][2][1] == looked_up[k][1].detach()).all() for k in compared])
    same = {key for key, is_equal in zip(compared, equal) if is_equal}
    one_over_l, used = {}, {}  # used: base's id -> (its entries, the places this call used)
    for key, (base, weight, cached) in looked_up.items():
        if key not in same:
            values = weight.detach().clone()
            cached = (key[2], values, float(_inverse_lipschitz(values, *key[2])))
        entries = _LIPSCHITZ_CACHE.get(base)
        if entries is None:
            entries = _LIPSCHITZ_CACHE[base] = {}
        entries.pop(key[1], None)
        entries[key[1]] = cached  # one entry per view, a new geometry replaces it; (re)inserted last: the most recent
        one_over_l[key] = cached[2]
        used.setdefault(key[0], (entries, set()))[1].add(key[1])
    for entries, places in used.values():  # the views this call used were (re)inserted last
        while len(entries) > len(places) + CACHED_VIEWS_PER_TENSOR:
            del entries[next(iter(entries))]
    steps = []
    for (weight, *_), key in zip(requests, keys):
        if isinstance(key, Tensor):
            steps.append(key)
            continue
        step = one_over_l[key]
        carried = ref.value_dtype(weight.dtype)  # the dtype the step is carried in (float32 for half weights)
        check.fits_dtype("the default step 1/L (the dictionary is nearly zero)", step, carried)
        check.positive("the default step 1/L (the dictionary is very large)", step, carried)
        steps.append(step)
    return steps


def _inverse_lipschitz(weight: Tensor, signal_size: tuple[int, ...], stride, padding) -> Tensor:
    """1/L as a 0-d float64 tensor. Where D is the zero operator at this geometry (an all-zero weight, or atoms that
    read only padding) it is 1: every step solves that problem. Where a non-zero L underflowed (float64 taps below
    ~1e-162) no dtype holds 1/L: inf, which the eager checks refuse and which makes traced calls, which cannot
    raise, return NaN codes rather than silently run a wrong step. A weight with a NaN has no L either; it gets 1 as
    the layers give it, and its codes come out NaN from the convolutions themselves, as F.conv2d's do."""
    with torch.no_grad():
        estimate, scale = ref.lipschitz_power_iteration_scaled(weight, signal_size, stride, padding)
        lip = estimate * scale**2
        return torch.where((estimate == 0) | estimate.isnan(), 1.0, torch.where(lip > 0, 1.0 / lip, math.inf))


def _warn_if_step_diverges(
    weight: Tensor, step: Tensor | float, signal_size, stride, padding, name: str = "step", encoder_weight=None
) -> None:
    """Warn when a step is certainly above 2/L, where ISTA diverges.

    L >= max_c ||w_c||^2 whenever some code position's atom lies wholly inside the signal (the atom alone is a code
    with ||D e||^2 = ||w_c||^2), a bound that costs one pass over the weight instead of a power iteration."""
    _warn_if_steps_diverge([(weight, step, signal_size, stride, padding, name, encoder_weight)])


def _warn_if_steps_diverge(cases: Sequence[tuple]) -> None:
    """``_warn_if_step_diverges`` for each (weight, step, signal_size, stride, padding, name, encoder_weight), the
    values of all read together: one host sync (a GPU's) for every layer of an ml_ista call, not one per layer."""
    reads = [(case, _divergence_reads(*case)) for case in cases]
    reads = [(case, tensors) for case, tensors in reads if tensors is not None]
    values = check.read_values([t.detach().to(torch.float64).reshape(()) for _, tensors in reads for t in tensors])
    values.reverse()
    for (weight, step, *_, name, _), _ in reads:
        lower = values.pop() ** 2 if weight.numel() else 0.0
        largest = values.pop() if isinstance(step, Tensor) else float(step)
        if not math.isfinite(lower) and not bool(weight.detach().isfinite().all()):
            continue  # a NaN or inf in the weight makes the codes NaN whatever the step
        if lower > 0 and largest > 2.0 / lower:
            _warnings.warn(
                f"{name}={largest:.4g} is above 2/L (L >= {lower:.4g}, the largest atom's squared norm): ISTA "
                f"diverges with it; use {name}=None for 1/L"
            )


def _divergence_reads(
    weight: Tensor, step: Tensor | float, signal_size, stride, padding, name: str, encoder_weight
) -> list[Tensor] | None:
    """What ``_warn_if_step_diverges`` reads (the largest atom's norm, the largest step where it is a tensor), or
    None where it cannot warn."""
    if isinstance(step, Tensor) and not check.values_readable(step) or not check.values_readable(weight):
        return None
    # An untied encoder E iterates with I - step E D, which the atoms' norms do not bound: a LISTA-CP layer's
    # learned step far above 2/max ||w_c||^2 converges with a small E (the warning said "diverges" there).
    if encoder_weight is not None and not (
        check.values_readable(encoder_weight)
        and encoder_weight.shape == weight.shape
        and torch.equal(encoder_weight.detach(), weight.detach())
    ):
        return None
    for size, k, s, p in zip(signal_size, weight.shape[2:], stride, padding):
        first = -(-p // s)  # the first code position whose atom starts inside the signal
        if first * s - p + k > size:
            return None
    # a reduction, not a weight-sized square: this runs on every call
    read = [torch.linalg.vector_norm(weight.detach().flatten(1), dim=1).max()] if weight.numel() else []
    if isinstance(step, Tensor):
        read.append(step.detach().max())
    return read


def _checked_values(
    lam, threshold, step, n_iter: int, c_code: int, nonneg: bool, like: Tensor
) -> tuple[Tensor | None, Tensor, bool]:
    """A conv-ISTA call's step and thresholds, checked and broadcast before any backend is chosen: (step (n_iter,),
    or None for the default 1/L; the thresholds (n_iter, C_code) in like's dtype; True when they are absolute).

    Either ``lam`` (threshold = step·lam >= 0) or an absolute ``threshold`` (negative only with nonneg, where
    max(u - t, 0) is a ReLU with bias -t); step > 0 in like's dtype, the one steps are carried in (float32 for
    half precision)."""
    step_full = None
    if step is not None:
        step = check.scalar_or_tensor("step", step)
        check.positive("step", step, like.dtype)
        step_full = check.per_iteration("step", step, n_iter, None, like, finite=True)
    if (lam is None) == (threshold is None):
        raise ValueError("give exactly one of lam (threshold = step * lam) and threshold (absolute)")
    if lam is not None:
        lam = check.scalar_or_tensor("lam", lam)
        check.nonnegative("lam", lam)
        return step_full, check.per_iteration("lam", lam, n_iter, c_code, like, finite=True), False
    threshold = check.scalar_or_tensor("threshold", threshold)
    if not nonneg:
        check.nonnegative("threshold (negative thresholds need nonneg=True)", threshold)
    return step_full, check.per_iteration("threshold", threshold, n_iter, c_code, like, finite=True), True


def _as_lam(thresholds: Tensor, absolute: bool, step_full: Tensor) -> Tensor:
    """The canonical (n_iter, C_code) lam the kernels take (lam = threshold / step for absolute thresholds)."""
    if not absolute:
        return thresholds
    lam = thresholds / step_full.unsqueeze(1)
    # an inf lam would make the kernels' threshold step * lam inf instead of the threshold given
    check.fits_dtype("threshold / step (the lam it runs as)", lam, thresholds.dtype)
    return lam


def conv_ista(
    x: Tensor,
    weight: Tensor,
    lam: Tensor | float | None = None,
    *,
    n_iter: int,
    step: Tensor | float | None = None,
    threshold: Tensor | float | None = None,
    encoder_weight: Tensor | None = None,
    stride: IntOrPair = 1,
    padding: Padding = 0,
    z0: Tensor | None = None,
    nonneg: bool = False,
    fista: bool = False,
    backend: str = "auto",
    recompute: bool = False,
    input_encoder_weight: Tensor | None = None,
) -> Tensor:
    """Unrolled convolutional ISTA (or FISTA) for ``min_z 0.5||x - D z||^2 + lam ||z||_1``.

    x: (B, C_sig, *S); weight, encoder_weight: (C_code, C_sig, *k); exactly one of lam >= 0 (threshold step·lam:
    float, (C_code,) or (n_iter, C_code)) and threshold (absolute, same shapes; negative allowed with nonneg);
    step > 0: float, (n_iter,), or None for 1/L at x's size; z0: (B, C_code, *Sz) or None for zeros; padding: ints,
    "valid" or "same". ``recompute``: fused backends keep nothing code-sized for the backward and replay the
    iterations (memory independent of n_iter) instead of saving code iterates. Returns z: (B, C_code, *Sz).

    Variants (see ``_conv_ista_variant``): weight / encoder_weight of shape (n_iter, C_code, C_sig, *k), one
    dictionary per iteration (x's rank tells them from shared 2-D ones), and ``input_encoder_weight`` B for
    ``z <- S(z + step (B x - E D z))`` (ML-LISTA's iteration).
    """
    if _is_conv_ista_variant(x, weight, encoder_weight, input_encoder_weight):
        return _conv_ista_variant(
            x,
            weight,
            lam,
            n_iter=n_iter,
            step=step,
            threshold=threshold,
            encoder_weight=encoder_weight,
            input_encoder_weight=input_encoder_weight,
            stride=stride,
            padding=padding,
            z0=z0,
            nonneg=nonneg,
            fista=fista,
            backend=backend,
            recompute=recompute,
        )
    weight = check.weight("weight", weight)
    x = check.signal("x", x, weight)
    if encoder_weight is not None:
        encoder_weight = check.tensor("encoder_weight", encoder_weight)
        if encoder_weight.shape != weight.shape:
            raise ValueError(
                f"encoder_weight must have weight's shape {tuple(weight.shape)}, got {tuple(encoder_weight.shape)}"
            )
    n_iter = check.count("n_iter", n_iter, 1)
    for name, value in (("nonneg", nonneg), ("fista", fista), ("recompute", recompute)):
        check.flag(name, value)
    stride, padding, code = check.geometry(x.shape[2:], weight, stride, padding)
    z_shape = (x.shape[0], weight.shape[0], *code)
    if z0 is not None:
        z0 = check.tensor("z0", z0)
        if tuple(z0.shape) != z_shape:
            raise ValueError(f"z0 must have the code's shape {z_shape}, got {tuple(z0.shape)}")
    value_tensors = {
        name: v for name, v in (("lam", lam), ("step", step), ("threshold", threshold)) if isinstance(v, Tensor)
    }
    check.same_device(x=x, weight=weight, encoder_weight=encoder_weight, z0=z0, **value_tensors)
    check.same_dtype(x=x, weight=weight, encoder_weight=encoder_weight, z0=z0)
    # every value is checked before the backend is chosen: a bad one raises the error naming it whichever backend
    # was asked for, one that cannot run here (triton on CPU tensors, DSC_KERNELS_BACKEND) included
    values = check.values_like(x, weight, encoder_weight)
    step_full, thresholds, absolute = _checked_values(lam, threshold, step, n_iter, weight.shape[0], nonneg, values)
    backward = torch.is_grad_enabled() and any(
        t is not None and check.requires_grad(t) for t in (x, weight, encoder_weight, z0, *value_tensors.values())
    )
    row = ops.select(
        "conv_ista",
        backend,
        x.device,
        x.dtype,
        prefers=cpu_cost.hook(x.shape, weight.shape, stride, padding, x.dtype, backward),
        memory_lean=recompute and backward,  # only a fused backward can replay instead of keeping
        inputs=(x, weight, encoder_weight, z0, *value_tensors.values()),
    )

    if step is not None:
        _warn_if_step_diverges(weight, step, x.shape[2:], stride, padding, encoder_weight=encoder_weight)
    else:
        default = _default_step(weight, tuple(x.shape[2:]), stride, padding)
        step_full = check.per_iteration("step", default, n_iter, None, values)
    lam_full = _as_lam(thresholds, absolute, step_full)
    return conv_ista_ops.run(
        row, x, weight, encoder_weight, lam_full, step_full, z0, stride, padding, nonneg, fista, recompute
    )


def deep_conv_ista(
    x: Tensor,
    weights: Sequence[Tensor],
    lams: Sequence[Tensor | float] | None = None,
    *,
    n_iter: int | Sequence[int],
    thresholds: Sequence[Tensor | float] | None = None,
    strides: Sequence[IntOrPair] | None = None,
    paddings: Sequence[Padding] | None = None,
    steps: Sequence[Tensor | float | None] | None = None,
    nonneg: bool = False,
    backend: str = "auto",
    recompute: bool = False,
) -> list[Tensor]:
    """Layered pursuit: ``G_1 = ISTA(x; D_1)``, ``G_j = ISTA(G_{j-1}; D_j)``. Returns ``[G_1, ..., G_J]``.

    x: (B, C_0, *S); weights[j]: (C_{j+1}, C_j, *k_j); one of lams[j] / thresholds[j], steps[j], n_iter (int or
    one per layer), strides[j], paddings[j] as in ``conv_ista`` for layer j.
    """
    if isinstance(weights, Tensor) or not isinstance(weights, Sequence) or len(weights) == 0:
        raise TypeError("weights must be a non-empty list of dictionary tensors")
    depth = len(weights)
    lams = check.per_layer("lams", lams, depth, None)
    thresholds = check.per_layer("thresholds", thresholds, depth, None)
    # anything but a list is one n_iter for all layers, for conv_ista to check (a numpy or 0-d tensor int is one)
    one_each = isinstance(n_iter, Sequence) and not isinstance(n_iter, str)
    n_iters = check.per_layer("n_iter", n_iter, depth, None) if one_each else [n_iter] * depth
    strides, paddings = check.per_layer("strides", strides, depth, 1), check.per_layer("paddings", paddings, depth, 0)
    steps = check.per_layer("steps", steps, depth, None)
    _check_layers(x, weights, lams, thresholds, n_iters, strides, paddings, steps, nonneg)
    codes, signal = [], x
    for j in range(depth):
        try:
            signal = conv_ista(
                signal,
                weights[j],
                lams[j],
                n_iter=n_iters[j],
                step=steps[j],
                threshold=thresholds[j],
                stride=strides[j],
                padding=paddings[j],
                nonneg=nonneg,
                backend=backend,
                recompute=recompute,
            )
        except (ValueError, TypeError) as err:
            raise type(err)(f"layer {j}: {err}") from None
        codes.append(signal)
    return codes


def _check_layers(x, weights, lams, thresholds, n_iters, strides, paddings, steps, nonneg: bool) -> None:
    """What conv_ista checks of each layer's arguments, for every layer before the first one runs (a bad lams[1]
    raised only after layer 0 had run, or a backend that cannot run raised first). Layer j's input is layer j-1's
    code, whose shape the geometry gives: a stand-in of that shape (no memory) is checked in its place. A layer with
    per-iteration dictionaries is left to conv_ista, and so are the layers below it."""
    signal = x
    for j in range(len(weights)):
        if _is_conv_ista_variant(signal, weights[j], None, None):
            return
        try:
            weight = check.weight("weight", weights[j])
            signal = check.signal("x", signal, weight)
            n_iter = check.count("n_iter", n_iters[j], 1)
            _, _, code = check.geometry(signal.shape[2:], weight, strides[j], paddings[j])
            like = check.values_like(signal, weight)
            _checked_values(lams[j], thresholds[j], steps[j], n_iter, weight.shape[0], nonneg, like)
        except (ValueError, TypeError) as err:
            raise type(err)(f"layer {j}: {err}") from None
        signal = signal.new_empty(()).expand(signal.shape[0], weight.shape[0], *code)


# ------------------------------------------- conv-ISTA variants: per-iteration dictionaries, input encoder
def _is_conv_ista_variant(x, weight, encoder_weight, input_encoder_weight) -> bool:
    if input_encoder_weight is not None:
        return True
    if not isinstance(x, Tensor) or x.dim() not in (3, 4):
        return False
    return ml_args.is_per_step(weight, x.dim() - 2) or ml_args.is_per_step(encoder_weight, x.dim() - 2)


def _conv_ista_variant(
    x,
    weight,
    lam,
    *,
    n_iter,
    step,
    threshold,
    encoder_weight,
    input_encoder_weight,
    stride,
    padding,
    z0,
    nonneg,
    fista,
    backend,
    recompute,
) -> Tensor:
    """conv-ISTA with per-iteration dictionaries and/or an input encoder B:
    ``z_{k+1} = S(y_k + step_k (B_k x - E_k D_k y_k))`` (B = E without an input encoder): a one-layer ML-ISTA of
    n_iter steps from z0, run by the ml_ista row of the backend the table picks among those that run the variant."""
    args = ml_args.conv_ista_variant_arguments(
        x,
        weight,
        lam,
        n_iter=n_iter,
        step=step,
        threshold=threshold,
        encoder_weight=encoder_weight,
        input_encoder_weight=input_encoder_weight,
        stride=stride,
        padding=padding,
        z0=z0,
        nonneg=nonneg,
        fista=fista,
        recompute=recompute,
        default_steps=_default_steps,
    )
    dictionaries = args["weights"][0]
    if step is not None and dictionaries.shape[0] == 1:  # one shared D: ISTA on it, where step > 2/L diverges
        _warn_if_step_diverges(
            dictionaries[0],
            args["steps"][0],
            x.shape[2:],
            args["strides"],
            args["paddings"],
            encoder_weight=encoder_weight,
        )
    row = ops.select("conv_ista", backend, x.device, x.dtype, args.pop("features"), inputs=(x, *_tensors_in(args)))
    # Asked as the caller asked, so that the one error only the ml_ista row raises (vmap) names backend= or
    # DSC_KERNELS_BACKEND as the conv_ista row's errors do; passing row.name told a caller of backend='auto' with
    # the variable set that backend='cpp' was refused, to use 'auto'. A fused row is what ml_ista's auto also
    # picks (same preference, no transform or tangent, or the conv_ista row would be the reference).
    ml_row = ops.select("ml_ista", row.name if row.eager is not None else backend, x.device, x.dtype)
    return ml_ista_ops.run(ml_row, x, nonneg=nonneg, fista=fista, project=True, recompute=recompute, **args)[0]


# ----------------------------------------------------------------------------------------- multi-layer pursuit
def ml_ista(
    x: Tensor,
    weights: Sequence[Tensor],
    thresholds: Sequence[Tensor | float],
    *,
    n_iter: int,
    steps: Sequence[Tensor | float | None] | None = None,
    strides: Sequence[IntOrPair] | None = None,
    paddings: Sequence[Padding] | None = None,
    fista: bool = False,
    nonneg: bool = True,
    backend: str = "auto",
    encoder_weights: Sequence[Tensor | None] | None = None,
    input_encoder_weights: Sequence[Tensor | None] | None = None,
    z0: Tensor | None = None,
    interleaved: bool = False,
    recompute: bool = False,
) -> list[Tensor]:
    """Multi-layer pursuit: ML-ISTA / ML-FISTA (Sulam, Aberdam, Beck & Elad, TPAMI 2019). Returns [G_1, ..., G_L].

    The initial encoding ``G_j = sigma(c_j D_j^T G_{j-1} - t_j)`` (G_0 = x), then n_iter unfoldings, each projecting
    the deepest code down (``Y_L = G_L`` plus FISTA's momentum, ``Y_{j-1} = D_j Y_j``) and taking one ISTA step per
    layer from its projection: ``G_j = sigma(Y_j - c_j D_j^T (D_j Y_j - G_{j-1}) - t_j)``. sigma is a ReLU
    (``nonneg``: max(u - t, 0), so a published bias b is the threshold t = -b, any sign) or the soft threshold
    (t >= 0). Exact conventions, variants and their backward: dsc_kernels/reference/ml_ista.py and docs/porting.md.

    x: (B, C_0, *S) (1-D or 2-D); weights[j]: (C_j, C_{j-1}, *k_j), or one dictionary per step
    (n_iter + 1, C_j, C_{j-1}, *k_j) ("All-Free"); thresholds[j]: float, (), (C_j,) or (n_iter + 1, C_j);
    steps[j] (c_j): float, (), (n_iter + 1,) or None (1/L_j, L_j = ||D_j||^2 at layer j-1's size);
    strides[j], paddings[j]: as in ``conv_ista`` (synthesis is sized to layer j-1 with the matching
    output_padding, the exact adjoint); encoder_weights[j]: untied analysis E_j (default D_j);
    input_encoder_weights[j]: ML-LISTA's B_j, used for G_{j-1} and the projection (default: E_j and D_j);
    n_iter >= 0 (0: the initial encoding alone, the plain CNN forward pass);
    z0: a starting deepest code (B, C_L, *Sz_L) instead of the initial encoding from zero (projected iteration
    only: the interleaved one restarts every layer from its own code); interleaved: each layer
    restarts from its own previous code instead of the projection (the All-Free network's iteration);
    recompute: the fused backward keeps only the deepest code iterates and replays each step.
    """
    check.flag("nonneg", nonneg)
    check.flag("fista", fista)
    check.flag("interleaved", interleaved)
    check.flag("recompute", recompute)
    x = check.tensor("x", x)
    args = ml_args.ml_ista_arguments(
        x,
        weights,
        thresholds,
        n_iter=n_iter,
        steps=steps,
        strides=strides,
        paddings=paddings,
        encoder_weights=encoder_weights,
        input_encoder_weights=input_encoder_weights,
        z0=z0,
        nonneg=nonneg,
        interleaved=interleaved,
        default_steps=_default_steps,
    )
    row = ops.select("ml_ista", backend, x.device, x.dtype, inputs=(x, *_tensors_in(args)))
    geometry = args.pop("geometry")
    # Only the interleaved iteration runs ISTA on each layer's own code, where c_j > 2/L_j diverges. The projected one
    # steps the deepest code by c_1 ... c_L on D_1 ... D_L: a per-layer bound neither implies nor rules out its
    # divergence. Step 0 (the initial encoding) only scales; per-step dictionaries repeat no one operator.
    if interleaved:  # every layer's values read at once
        cases = []
        for j, given in enumerate(check.per_layer("steps", steps, len(geometry), None)):
            w, step = args["weights"][j], args["steps"][j]
            if given is not None and w.shape[0] == 1 and step.shape[0] > 1:
                cases.append((w[0], step[1:], *geometry[j], f"steps[{j}]", None))
        _warn_if_steps_diverge(cases)
    return ml_ista_ops.run(row, x, nonneg=nonneg, fista=fista, project=not interleaved, recompute=recompute, **args)


# ----------------------------------------------------------------------------------------------- sparse attention
ATTENTION_MODES = MODES  # ("sparsemax", "shrink"), defined once in reference.attention


def sparsemax(x: Tensor, dim: int = -1) -> Tensor:
    """Sparsemax along ``dim``: the Euclidean projection onto the probability simplex (exactly sparse).

    x: any shape (half precision is computed in float32). Computed relative to each slice's maximum, so huge or
    tied values keep their precision. -inf entries get 0 and a slice that is entirely -inf gives zeros; a slice
    with +inf entries shares its mass equally among them; a NaN makes its slice NaN (as ``F.softmax``); an empty
    ``dim`` gives an empty result. The gradient uses the strict support {x > tau}: an entry sitting exactly at the
    threshold gets none (as entmax's sparsemax). A NaN slice passes no gradient back (zeros, where ``F.softmax``'s
    backward gives NaN), as sparse attention's NaN rows do.
    """
    x = check.tensor("x", x)
    rank = max(x.dim(), 1)  # a 0-d tensor is one slice of one entry, as for torch.softmax
    dim = check.count("dim", dim, -rank)  # the types torch.softmax takes: numpy and 0-d tensor ints, no bool
    if dim >= rank:
        raise ValueError(f"dim must be an int in [{-rank}, {rank}), got {dim}")
    if x.dim() == 0:
        return sparsemax_ref(x.reshape(1), 0).reshape(())
    return sparsemax_ref(x, dim)


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mode: str = "sparsemax",
    threshold: Tensor | float | None = None,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Attention with exactly sparse maps, ``O = P v`` with ``s = scale q k^T`` (+ float masks) and

    - ``mode="sparsemax"``: ``P = max(s - tau, 0)``, tau per row so that rows sum to 1;
    - ``mode="shrink"``: ``P = max(s - threshold, 0)`` (one ISTA step coding the query on the keys). A negative
      threshold is a ReLU with bias ``-threshold`` (as ``conv_ista``'s with ``nonneg=True``): keys whose scores lie
      in (threshold, 0] get weight too; a key a mask or ``causal`` hides stays hidden.

    q: (B, H, N, d); k: (B, H, M, d); v: (B, H, M, d_v), any strides; threshold: float or (H,) (shrink only);
    causal: query i sees keys j <= i (SDPA's top-left ``is_causal``); scale defaults to d^-1/2.
    key_padding_mask: (B, M); attn_mask: broadcastable to (B, H, N, M), e.g. (N, M); both with
    ``nn.MultiheadAttention``'s convention (bool: True ignores the key; float: added to the scores, -inf ignores
    it). A float mask that requires grad (a learned score bias) is differentiated: only the reference backend
    does that (dense scores), so ``auto`` picks it and an explicit fused backend raises. A row with no visible or
    no active key gives 0 (and zero gradients), never NaN; a row is NaN when q_i or a key/value it sees holds NaN
    or inf. A score of +inf (a +inf float mask, or finite inputs whose product overflows the compute dtype):
    sparsemax shares the row's mass among such keys; shrink gives that key an infinite weight, so the row's output
    is inf times its value (NaN where the value is 0). Returns (B, H, N, d_v).
    """
    threshold, scale, bias = _sparse_attention_inputs(
        q,
        k,
        v,
        mode=mode,
        threshold=threshold,
        causal=causal,
        scale=scale,
        key_padding_mask=key_padding_mask,
        attn_mask=attn_mask,
    )
    return _sparse_attention_checked(backend, q, k, v, mode, threshold, causal, scale, bias)


def _sparse_attention_inputs(
    q, k, v, *, mode, threshold, causal, scale, key_padding_mask, attn_mask
) -> tuple[Tensor, float, Tensor | None]:
    """The checked (threshold (H,), scale, score bias) of a ``sparse_attention`` call (v None: of a
    ``sparse_attention_weights`` call). A tensor threshold's values are read here (a host sync on a GPU): a layer that
    runs both the attention and its weights checks once and passes these to the ``_checked`` functions below."""
    threshold, scale = attention_args.attention_inputs(
        q, k, v, mode=mode, threshold=threshold, causal=causal, scale=scale
    )
    return threshold, scale, attention_args.score_bias(q, k.shape[2], key_padding_mask, attn_mask)


def _sparse_attention_checked(
    backend: str, q: Tensor, k: Tensor, v: Tensor, mode: str, threshold: Tensor, causal: bool, scale: float, bias
) -> Tensor:
    """``sparse_attention`` on arguments ``_sparse_attention_inputs`` checked."""
    row = _sparse_attention_row(backend, q, k, v, threshold, bias)
    return sparse_attention_ops.run(row, q, k, v, threshold, bias, mode, causal, scale)


def _sparse_attention_row(backend: str, q: Tensor, k: Tensor, v: Tensor, threshold: Tensor, bias: Tensor | None):
    """The backend row that runs this ``sparse_attention`` call (or its error): also what SparseAttention's dense
    dropout path checks, so that it refuses what the call would refuse."""
    features = ("mask_grad",) if bias is not None and check.requires_grad(bias) and torch.is_grad_enabled() else ()
    if max(q.shape[-1], v.shape[-1]) > attention_args.MAX_FUSED_HEAD_DIM:
        features += ("wide_head",)
    return ops.select("sparse_attention", backend, q.device, q.dtype, features, inputs=(q, k, v, threshold, bias))


def sparse_attention_weights(
    q: Tensor,
    k: Tensor,
    *,
    mode: str = "sparsemax",
    threshold: Tensor | float | None = None,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """The dense attention weights P (B, H, N, M) of ``sparse_attention`` with the same arguments (what
    ``need_weights=True`` returns). Computed densely in plain PyTorch whatever the backend: it costs N x M memory,
    which the fused kernels avoid. q: (B, H, N, d); k: (B, H, M, d)."""
    threshold, scale, bias = _sparse_attention_inputs(
        q,
        k,
        None,
        mode=mode,
        threshold=threshold,
        causal=causal,
        scale=scale,
        key_padding_mask=key_padding_mask,
        attn_mask=attn_mask,
    )
    return _sparse_attention_weights_checked(q, k, mode, threshold, causal, scale, bias)


def _sparse_attention_weights_checked(
    q: Tensor, k: Tensor, mode: str, threshold: Tensor, causal: bool, scale: float, bias: Tensor | None
) -> Tensor:
    """``sparse_attention_weights`` on arguments ``_sparse_attention_inputs`` checked."""
    # in autocast, the float32 computation on the given values that sparse_attention runs: autocast's bfloat16
    # scores gave a map 0.034 off the one sparse_attention applied, its support moved
    return ops.in_float32_under_autocast(
        sparse_attention_weights_ref, q, k, mode=mode, threshold=threshold, causal=causal, scale=scale, bias=bias
    )
