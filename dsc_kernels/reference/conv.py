"""Convolutional dictionary operators in pure PyTorch (docs/design.md §2).

A dictionary ``weight`` of shape ``(C_code, C_sig, *k)`` acts in two directions:

    analysis   D^T r = conv(r, weight, stride, padding)                     (B, C_sig, *S) -> (B, C_code, *Sz)
    synthesis  D z   = conv_transpose(z, weight, stride, padding, out_pad)  (B, C_code, *Sz) -> (B, C_sig, *S)

with ``Sz = (S + 2p - k) // s + 1`` and ``out_pad = S + 2p - k - (Sz - 1) s`` (always in ``[0, s)``), so that the
pair is an exact adjoint, ``<D z, r> = <z, D^T r>``, for every stride, padding and odd size. Works for 1-D and 2-D
weights (chosen by the weight's rank) and any float dtype; everything is differentiable through autograd.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn import grad as nn_grad

_CONV = {1: F.conv1d, 2: F.conv2d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d}


def _has_plain_strides(t: torch.Tensor) -> tuple[bool, tuple[int, ...]]:
    """Whether t's strides are the plain contiguous ones (every dim, size-1 dims included), and those strides."""
    plain = tuple(math.prod(t.shape[i + 1 :]) for i in range(t.dim()))
    return t.stride() == plain, plain


def plain_strides(t: torch.Tensor) -> torch.Tensor:
    """``t`` (N, C, *S) with the plain contiguous strides when it has one channel: a view of the same memory, or a
    copy when t is not contiguous at all.

    oneDNN's CPU convolution (torch 2.13) computes a strided convolution wrongly when an operand with one channel
    carries channels-last strides (channel stride 1), which torch counts as contiguous too: a grey NHWC image permuted
    to (B, 1, H, W), or such a dictionary. conv2d of a (2, 1, 9, 8) signal with a 3 x 4 kernel at stride (1, 5), one
    code column, came out off by up to 1e34, and the input gradient of conv_transpose2d likewise; the same memory
    with the plain strides is computed right (csrc/cpu/aten_conv.h does the same for the C++ backends).

    as_strided, not view: under torch.compile a same-shape view is dropped, and the compiled conv2d of a permuted grey
    image came out NaN. Tensors that already have the plain strides pass through untouched."""
    if t.dim() <= 2 or t.shape[1] != 1:
        return t
    already, plain = _has_plain_strides(t)
    if already:
        return t
    # Not the strides of contiguous()'s result compared: under torch.compile(dynamic=True), once the kernel size is
    # specialised (_validate.geometry), Dynamo failed on that ("Cannot construct `ConstantVariable` for value of type
    # SymInt", plain torch too). A copy has the plain strides, and as_strided on one made Inductor fail on the
    # backward of a transposed one-channel signal ("cannot determine truth value of Relational").
    return t.as_strided(t.shape, plain) if t.is_contiguous() else t.contiguous()


def conv_operand(t: torch.Tensor) -> torch.Tensor:
    """``plain_strides(t)``, and an operand that reaches oneDNN in bfloat16 (bfloat16 on the CPU, or float32 under
    CPU autocast to bfloat16, whose cast keeps the layout) in the contiguous layout (a copy if it is channels-last).

    oneDNN's bfloat16 weight gradient (torch 2.13 CPU, ``aten.convolution_backward``, plain and transposed) comes out
    as garbage, off by up to 1e33 and different on every call, when the signal or the weight is channels-last: 44 of
    1,600 such calls on 800 random geometries (a (2, 2, 3, 1) signal, a 2 x 4 kernel at stride (1, 6), padding
    (0, 3)); channels-first operands gave none, nor float16 or float32 on 800 more. The backward's layout follows
    the operands', so their plain layout fixes it too."""
    if t.dim() > 2 and t.shape[1] == 1:
        # plain_strides gives the contiguous layout itself; its stride check of contiguous()'s result failed Dynamo
        # under torch.compile(dynamic=True) once the kernel size was specialised (see plain_strides)
        return plain_strides(t)
    if t.device.type == "cpu" and (
        t.dtype == torch.bfloat16
        or (
            t.dtype != torch.float64
            and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
        )
    ):
        # not contiguous() alone: a (B, C, 1, 1) operand with the channels-last strides (C, 1, C, C), such as
        # adaptive_avg_pool2d's output for a channels-last map, counts as contiguous, and contiguous() kept them;
        # its bfloat16 weight gradient came out garbage (3 of 300 random geometries off by 1e12 to inf). A copy,
        # not as_strided: that failed Inductor under torch.compile(dynamic=True) ("cannot determine truth value")
        if not _has_plain_strides(t)[0]:
            t = t.clone(memory_format=torch.contiguous_format)
    return t


def conv_nd(x: torch.Tensor, weight: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.conv1d or F.conv2d by the weight's rank, on operands oneDNN computes right (``conv_operand``)."""
    return _CONV[weight.dim() - 2](conv_operand(x), conv_operand(weight), **kwargs)


def conv_transpose_nd(z: torch.Tensor, weight: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.conv_transpose1d or F.conv_transpose2d by the weight's rank (``conv_operand`` operands, see there)."""
    return _CONV_T[weight.dim() - 2](conv_operand(z), conv_operand(weight), **kwargs)


def conv_weight_grad(
    signal: torch.Tensor, weight_shape: Sequence[int], code_grad: torch.Tensor, **kwargs
) -> torch.Tensor:
    """The weight gradient of an analysis ``signal -> code`` (torch.nn.grad's conv{1,2}d_weight) on ``conv_operand``
    operands: the bfloat16 one is where oneDNN went wrong on channels-last signals."""
    grad = nn_grad.conv1d_weight if len(weight_shape) == 3 else nn_grad.conv2d_weight
    return grad(conv_operand(signal), weight_shape, conv_operand(code_grad), **kwargs)


def spatial_rank(weight: torch.Tensor) -> int:
    """1 for a ``(C_code, C_sig, k)`` weight, 2 for ``(C_code, C_sig, kh, kw)``."""
    return weight.dim() - 2


def as_tuple(value: int | Sequence[int], rank: int, name: str = "value") -> tuple[int, ...]:
    """Expand an int (or check a sequence) to one entry per spatial dimension."""
    if isinstance(value, int):
        return (value,) * rank
    value = tuple(int(v) for v in value)
    if len(value) != rank:
        raise ValueError(f"{name} must have {rank} entries, got {value}")
    return value


def code_size(
    signal_size: Sequence[int], kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int]
) -> tuple[int, ...]:
    """Spatial size of the code ``D^T x`` for a signal of spatial size ``signal_size``."""
    return tuple((s + 2 * p - k) // st + 1 for s, k, st, p in zip(signal_size, kernel_size, stride, padding))


def synthesis_output_padding(
    signal_size: Sequence[int], kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int]
) -> tuple[int, ...]:
    """The ``output_padding`` that makes ``conv_transpose`` return exactly ``signal_size`` (the adjoint of conv)."""
    sz = code_size(signal_size, kernel_size, stride, padding)
    return tuple(s + 2 * p - k - (n - 1) * st for s, k, st, p, n in zip(signal_size, kernel_size, stride, padding, sz))


def zero_unread(
    x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int]
) -> torch.Tensor:
    """x: (B, C_sig, *S) with the entries no atom reads set to 0, or x itself when every entry is read (a stride at
    most the kernel, whose last window reaches the end of the signal).

    Unread entries (the gaps of a stride above the kernel, the tail after the last window) change no code. But the
    fused backwards form dL/dstep_k as <E* gu, r_k>, where 0 * NaN at an unread NaN or inf entry of r_k = x - D y_k
    is NaN, while eager autograd's <gu, E r_k> never reads it. A select, so their gradient stays 0; on the CPU, outside
    traces and torch.func, only when an unread entry is not finite (else the copy would be saved for the backward
    beside the caller's x)."""
    read = None
    for axis, (n, k, s, p) in enumerate(zip(x.shape[2:], kernel_size, stride, padding)):
        n_code = (n + 2 * p - k) // s + 1
        if k >= s and (n_code - 1) * s - p + k >= n:
            continue
        # entry i sits at i + p in the padded signal; code j reads [j s, j s + k): the entry is read when some j in
        # [0, n_code) lies in [ceil((i + p - k + 1) / s), floor((i + p) / s)]
        at = torch.arange(n, device=x.device) + p
        first = torch.div(at - k + s, s, rounding_mode="floor").clamp(min=0)
        last = torch.div(at, s, rounding_mode="floor").clamp(max=n_code - 1)
        shape = [1] * x.dim()
        shape[2 + axis] = n
        axis_read = (first <= last).view(shape)
        read = axis_read if read is None else read & axis_read
    if read is None:
        return x
    from .._validate import values_readable  # not at import: _validate imports this package

    # Looking first costs a pass over x (freed at once); on a GPU it would also cost a host synchronisation.
    if x.device.type == "cpu" and values_readable(x) and bool(torch.where(read, 0, x.detach()).isfinite().all()):
        return x
    return torch.where(read, x, 0)


def _zeros_in_graph(shape: Sequence[int], *operands: torch.Tensor) -> torch.Tensor:
    """The zero result of a convolution that sums over nothing or produces nothing (no channels on either side, an
    empty map), which torch's convolutions reject; 0 * sum(operand) keeps the operands in the autograd graph so they
    get (zero) gradients, and NaN/inf in them still propagate."""
    out = operands[0].new_zeros(tuple(shape))
    return out + sum(t.sum() for t in operands) * 0


def _empty_conv(x_or_z: torch.Tensor, weight: torch.Tensor) -> bool:
    return 0 in tuple(x_or_z.shape[1:]) or 0 in tuple(weight.shape[:2])


def _one_window_axes(code: Sequence[int], stride: Sequence[int]) -> list[int]:
    """The spatial axes where the code has one entry under a stride above 1. The stride is moot there, and oneDNN's
    float32 convolution goes wrong on exactly such an axis (one code column, column stride above 1) for a one-channel
    operand with channels-last strides; plain_strides avoids it in eager code, but under torch.compile Inductor picks
    the layouts of the backward's convolutions itself (the compiled input gradient of conv_transpose2d was off by
    3.8 there, plain torch too). So on such axes the analysis convolves the one window and the synthesis places the
    one atom at stride 1, outside that region: the same products and sums."""
    return [a for a, (n, s) in enumerate(zip(code, stride)) if n == 1 and s > 1]


def _pad_axis(t: torch.Tensor, axis: int, before: int, after: int) -> torch.Tensor:
    """t zero-padded on spatial axis ``axis`` (F.pad lists the last axis first)."""
    pads = [0] * (2 * (t.dim() - 2))
    pads[2 * (t.dim() - 3 - axis) : 2 * (t.dim() - 2 - axis)] = [before, after]
    return F.pad(t, pads)


def _at_stride_one(values: Sequence[int], axes: Sequence[int], value: int = 1) -> tuple[int, ...]:
    return tuple(value if a in axes else v for a, v in enumerate(values))


def conv_analysis_ref(
    x: torch.Tensor, weight: torch.Tensor, stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0
) -> torch.Tensor:
    """``D^T x``. x: (B, C_sig, *S), weight: (C_code, C_sig, *k) -> (B, C_code, *Sz)."""
    rank = spatial_rank(weight)
    stride, padding = as_tuple(stride, rank), as_tuple(padding, rank)
    sz = code_size(x.shape[2:], weight.shape[2:], stride, padding)
    if _empty_conv(x, weight):
        return _zeros_in_graph((x.shape[0], weight.shape[0], *sz), x, weight)
    axes = _one_window_axes(sz, stride)
    if axes:  # the one window itself, cut out and padded, at stride 1 (see _one_window_axes)
        for a in axes:
            # the window [-p, k - p) cut out of x, then padded: under torch.compile(dynamic=True), padding x first and
            # cutting a constant size out of its symbolic one made inductor fail the backward of a channels-last x
            # ("cannot determine truth value of Relational", plain torch too)
            n, k, p = x.shape[2 + a], weight.shape[2 + a], padding[a]
            inside = max(0, min(n, k - p))
            x = _pad_axis(x.narrow(2 + a, 0, inside), a, min(p, k), k - min(p, k) - inside)
        stride, padding = _at_stride_one(stride, axes), _at_stride_one(padding, axes, 0)
    return conv_nd(x, weight, stride=stride, padding=padding)


def conv_synthesis_ref(
    z: torch.Tensor,
    weight: torch.Tensor,
    signal_size: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
) -> torch.Tensor:
    """``D z``. z: (B, C_code, *Sz), weight: (C_code, C_sig, *k) -> (B, C_sig, *signal_size)."""
    rank = spatial_rank(weight)
    stride, padding = as_tuple(stride, rank), as_tuple(padding, rank)
    if _empty_conv(z, weight) or 0 in tuple(signal_size):
        return _zeros_in_graph((z.shape[0], weight.shape[1], *signal_size), z, weight)
    out_pad = synthesis_output_padding(signal_size, weight.shape[2:], stride, padding)
    axes = _one_window_axes(z.shape[2:], stride)
    if not axes:
        return conv_transpose_nd(z, weight, stride=stride, padding=padding, output_padding=out_pad)
    # the one atom placed at stride 1 (see _one_window_axes), then moved to its place in the signal
    atom = conv_transpose_nd(
        z,
        weight,
        stride=_at_stride_one(stride, axes),
        padding=_at_stride_one(padding, axes, 0),
        output_padding=_at_stride_one(out_pad, axes, 0),
    )
    for a in axes:
        n, k, p = signal_size[a], weight.shape[2 + a], padding[a]
        atom = _pad_axis(atom, a, 0, max(0, n + p - k)).narrow(2 + a, p, n)
    return atom


def value_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype steps and thresholds are carried and applied in for signals and codes of ``dtype``: float32 for
    float16 and bfloat16, else ``dtype`` itself. In float16 a default step 1/L below 6.1e-5 (L ~ 3e4 for 64 -> 64
    randn 3x3 atoms) is subnormal, a handful of bits; eager PyTorch reads a Python-float step in float32 there."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def scaled(t: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``factor * t`` in t's dtype, the product formed in ``value_dtype``: a 0-d float32 factor times a half tensor
    is rounded to the half dtype first (to a subnormal for a small float16 step), where ``factor * t`` with a Python
    float factor is not. A no-op cast for float32/float64, whose results stay bit for bit."""
    return (factor * t.to(value_dtype(t.dtype))).to(t.dtype)


def soft_threshold_ref(
    x: torch.Tensor, threshold: torch.Tensor | float, nonneg: bool = False, *, select_zeros: bool = True
) -> torch.Tensor:
    """``S_t(x) = sign(x) max(|x| - t, 0)``, or ``max(x - t, 0)`` when ``nonneg``; the result has x's dtype.

    Written as ``x - clamp(x, -t, t)`` (and ``relu(x - t)``) so that the derivative is exactly that of
    ``F.softshrink`` (``F.relu``): 0 for ``|x| <= t``, 1 elsewhere, NaN included, and NaN in gives NaN out;
    ``threshold`` broadcasts against ``x`` and receives gradients, ``-sign(x)`` where ``|x| > t``. A threshold that
    receives gradients is clamped in two steps: one ``clamp(x, -t, t)`` sends the gradient of an entry below -t to
    the upper bound when the bounds tie (t = 0), so negative entries added nothing to dL/dt at t = 0 instead of +1.
    ``select_zeros`` selects the zeroed entries instead of computing them: ``x - clamp(x)`` alone hands them g - g,
    NaN for an infinite upstream gradient g, where ``F.softshrink`` (and the fused backends) give 0. The eager
    recurrences pass False: the selection is two more passes per iteration, 5-43% of eager conv-ISTA's time on the
    design workloads, and they are the baseline the benchmarks time; only an infinite gradient tells the two apart.
    """
    dtype = x.dtype
    # half precision is thresholded in float32 (value_dtype), as F.softshrink reads its float lambd: a threshold
    # step * lam cast to float16 is often subnormal
    x = x.to(value_dtype(dtype))
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.to(x.dtype)
    if nonneg:
        return torch.relu(x - threshold).to(dtype)
    from .._validate import requires_grad  # not at import: _validate imports this package

    # Through vmap's wrappers: a BatchedTensor reads requires_grad False for a threshold that requires grad (a
    # per-sample or ensemble threshold), and the one clamp then dropped negative entries' share at t = 0. Under
    # torch.compile the wrappers cannot be unwrapped (requires_grad reads the wrapper's False): a compiled vmap lost
    # that share there, so traced code always takes the two clamps (the same values; inductor fuses them).
    if isinstance(threshold, torch.Tensor) and (torch.compiler.is_compiling() or requires_grad(threshold)):
        shrunk = x - x.clamp_min(-threshold).clamp_max(threshold)
    else:
        shrunk = x - torch.clamp(x, -threshold, threshold)
    return (torch.where(shrunk != 0, shrunk, 0.0) if select_zeros else shrunk).to(dtype)


def row_scales(rows: torch.Tensor) -> torch.Tensor:
    """Each row's largest |entry|, to divide it by before squaring (norms, energies, power iterations), whose
    intermediates leave the dtype's range long before the result does: (R, n) -> (R,). 1 for a row that is empty,
    all zero or not finite, which keeps its own rules (0 stays 0, NaN stays NaN)."""
    top = rows.abs().amax(dim=1) if rows.shape[1] else rows.new_ones(rows.shape[0])
    return torch.where((top > 0) & top.isfinite(), top, torch.ones_like(top))


def lipschitz_power_iteration(
    weight: torch.Tensor,
    signal_size: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    n_iter: int = 100,
) -> torch.Tensor:
    """``L = ||D||_2^2``, the largest eigenvalue of ``D^T D`` at this signal size, by power iteration: a 0-d
    float64 tensor on weight's device, not differentiable.

    The start vector is a fixed pseudo-random sequence (a sine hash of the index, no random generator), so results
    are reproducible and the computation traces under ``torch.compile``. The Rayleigh quotient of the last iterate
    is returned, a lower bound that converges to L from below; an all-zero dictionary gives 0.
    """
    estimate, scale = lipschitz_power_iteration_scaled(weight, signal_size, stride, padding, n_iter)
    return estimate * scale**2


def lipschitz_power_iteration_scaled(
    weight: torch.Tensor,
    signal_size: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    n_iter: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``lipschitz_power_iteration`` before its last product: (the estimate of ``||D / s||_2^2``, s = max |tap|), 0-d
    float64 tensors, with L = estimate * s^2. The estimate is 0 exactly when D is the zero operator at this geometry
    (an all-zero weight, or atoms that read only padding), which L = 0 cannot tell from a non-zero L that underflowed.
    """
    rank = spatial_rank(weight)
    stride, padding = as_tuple(stride, rank), as_tuple(padding, rank)
    sz = code_size(signal_size, weight.shape[2:], stride, padding)
    w = weight.detach().to(torch.float64)
    # Iterate on w / max|w| and scale back at the end: on w itself ||D^T D z|| overflowed float64 for entries beyond
    # ~1e77, and the estimate became NaN (inf / inf) instead of the honest inf.
    scale = w.abs().amax() if w.numel() else w.new_ones(())
    w = w / torch.where(scale > 0, scale, torch.ones_like(scale))
    shape = (1, weight.shape[0], *sz)
    index = torch.arange(math.prod(shape), dtype=torch.float64, device=weight.device)
    z = (torch.sin(index * 12.9898 + 78.233) * 43758.5453).frac().sub(0.5).reshape(shape)
    estimate = z.new_zeros(())
    for _ in range(n_iter):
        z = z / z.norm().clamp_min(torch.finfo(torch.float64).tiny)
        dz = conv_synthesis_ref(z, w, signal_size, stride, padding)
        estimate = dz.pow(2).sum()  # <z, D^T D z> with ||z|| = 1
        z = conv_analysis_ref(dz, w, stride, padding)
    return estimate, scale


def lipschitz_constant_ref(
    weight: torch.Tensor,
    signal_size: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    n_iter: int = 100,
) -> float:
    """``lipschitz_power_iteration`` as a Python float."""
    with torch.no_grad():
        return float(lipschitz_power_iteration(weight, signal_size, stride, padding, n_iter))


def lasso_objective_ref(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    lam: torch.Tensor | float,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
) -> torch.Tensor:
    """Per-sample ``0.5 ||x - D z||^2 + sum_c lam_c ||z_c||_1``. lam: scalar or (C_code,). Returns (B,)."""
    residual = x - conv_synthesis_ref(z, weight, x.shape[2:], stride, padding)
    # (B, C_code), summed in value_dtype: 1024 float16 codes of 100 in one channel summed to inf, where lam = 0.1
    # makes that channel's term 10,240
    l1 = z.abs().flatten(2).sum(-1, dtype=value_dtype(z.dtype))
    # lam in value_dtype (float32 for half z), as eager reads a Python-float lam: cast to float16, a lam below 6.1e-5
    # is subnormal, a few bits (1e-7 put float16 objectives 19% off)
    lam = torch.as_tensor(lam, dtype=value_dtype(z.dtype), device=z.device)
    # The squares in a dtype of wider range (float16 in float32, bfloat16 and float32 in float64), the objective
    # rounded back: ||r||^2 is twice the objective, and a single square can be far more, so in x's own dtype a
    # float16 residual of 300 gave inf for an objective of 45,000 (bfloat16 and float32 from residuals of ~2e19).
    # float64 has none wider: each sample's residual is divided by its largest entry p, and p^2 * (0.5 ||r/p||^2) is
    # formed as (p * half) * p, whose first product is at most the result, else residuals from ~1.3e154 gave inf
    # where the objective fits. (It is 0.5 ||r||^2 for every p, so p is detached: its gradient term is zero.) Only
    # a p above 1 is divided out: the backward multiplies by p^2 before dividing by p, and for p below ~1e-154 that
    # p^2 underflowed to 0, leaving only p's own term, every gradient on the largest entry (8.5x off at 1e-200),
    # and NaN for a subnormal p ((r / p) / p = inf).
    wide = {torch.float16: torch.float32, torch.bfloat16: torch.float64, torch.float32: torch.float64}
    r = residual.to(wide.get(residual.dtype, residual.dtype)).flatten(1)
    peak = row_scales(r.detach()).clamp(min=1)  # inf and NaN stay as they are
    half_energy = peak * (0.5 * (r / peak[:, None]).pow(2).sum(-1)) * peak
    return (half_energy + (l1 * lam).sum(-1).to(half_energy.dtype)).to(residual.dtype)
