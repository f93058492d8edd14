"""The typed public API (DESIGN.md §3): input validation and backend choice, nothing else.

Users write ``import dsc_kernels.functional as DF``. Every function checks its inputs and raises ``ValueError`` /
``TypeError`` naming the argument before any kernel runs, then hands canonical tensors to a backend:

    "reference"  pure PyTorch through autograd (any device; supports double backward)
    "cpp"        fused C++ CPU kernels (csrc/cpu), built just in time
    "triton"     fused Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
    "auto"       CPU: cpp if it builds, else reference; CUDA: triton, else reference.
                 The environment variable DSC_KERNELS_BACKEND overrides auto's choice.

Shapes: x is (B, C_sig, L) for 1-D or (B, C_sig, H, W) for 2-D, chosen by the dictionary weight's rank.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

from . import reference as ref
from .ops import conv_ista_op

BACKENDS = ("reference", "cpp", "triton", "cuda")
_FUSED_CONV_ISTA = ("cpp", "triton")
IntOrPair = int | Sequence[int]

__all__ = [
    "available_backends", "backend_unavailable_reason", "soft_threshold", "conv_analysis", "conv_synthesis", "lipschitz_constant",
    "lasso_objective", "conv_ista", "deep_conv_ista", "sparsemax", "sparse_attention",
]


# ----------------------------------------------------------------------------------------------- backend choice
# Availability is fixed for a process (an extension that built stays built), so torch.compile may evaluate it once
# while tracing instead of stepping into the cached build/import checks.
@torch.compiler.assume_constant_result
def backend_unavailable_reason(backend: str, device: torch.device | str) -> str | None:
    """Why ``backend`` cannot run on ``device`` here (with how to fix it), or None when it can."""
    device = torch.device(device)
    if backend == "reference":
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, got {device.type} tensors; use backend='triton' on GPUs"
        from . import _ext
        if not _ext.available():
            return (f"the C++ extension did not build: {_ext.build_error()}. Install a C++ compiler (g++) and "
                    "ninja (pip install ninja), or use backend='reference'")
        return None
    if backend == "triton":
        if not _triton_importable():
            return "triton is not installed (pip install triton==3.7.1)"
        if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
            return None
        return (f"the triton backend needs CUDA tensors (got {device.type}); on CPU it runs only under the "
                "interpreter (set TRITON_INTERPRET=1 before importing dsc_kernels)")
    if backend == "cuda":
        return "the CUDA C++ backend is not part of this release; use backend='triton' on GPUs"
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")


@lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The conv-ISTA backends that can run on ``device`` on this machine (``reference`` always can)."""
    device = torch.device(device)
    return [b for b in ("reference", *_FUSED_CONV_ISTA) if backend_unavailable_reason(b, device) is None]


_warned_fallback: set[str] = set()


def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get("DSC_KERNELS_BACKEND", "auto")
    if backend == "auto":
        preferred = "cpp" if device.type == "cpu" else "triton"
        reason = backend_unavailable_reason(preferred, device)
        if preferred == "cpp" and dtype not in (torch.float32, torch.float64):
            return "reference"  # the C++ kernels are fp32/fp64 only; half precision on CPU stays in PyTorch
        if reason is None:
            return _registered(preferred)
        if preferred not in _warned_fallback:
            _warned_fallback.add(preferred)
            warnings.warn(f"dsc_kernels: using the reference backend because {reason}", RuntimeWarning,
                          stacklevel=3)
        return "reference"
    reason = backend_unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot run: {reason}")
    if backend == "cpp" and dtype not in (torch.float32, torch.float64):
        raise TypeError(f"backend='cpp' supports float32 and float64, got {dtype}")
    if backend == "triton" and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"backend='triton' supports float32, float16 and bfloat16, got {dtype}")
    return _registered(backend)


@torch.compiler.assume_constant_result
def _registered(backend: str) -> str:
    """Register ``backend``'s ops on first use (building the extension or importing Triton), outside any trace:
    torch.compile evaluates this once and then finds the ops already registered."""
    if backend != "reference":
        from .ops import conv_ista, sparse_attention
        conv_ista.get_backend(backend)
        sparse_attention.get_ops(backend)
    return backend


# --------------------------------------------------------------------------------------------------- validation
def _check_tensor(name: str, t: object, *, rank: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(t.shape)}")
    return t


def _check_weight(name: str, weight: object) -> Tensor:
    weight = _check_tensor(name, weight)
    if weight.dim() not in (3, 4):
        raise ValueError(f"{name} must be (C_code, C_sig, k) or (C_code, C_sig, kh, kw), got {tuple(weight.shape)}")
    return weight


def _check_same_device(**tensors: Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {', '.join(f'{n} on {d}' for n, d in devices.items())}")


def _check_ints(name: str, value: IntOrPair, rank: int, *, minimum: int) -> tuple[int, ...]:
    if isinstance(value, bool) or not (isinstance(value, int) or (
            isinstance(value, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in value))):
        raise TypeError(f"{name} must be an int or a sequence of {rank} ints, got {value!r}")
    values = (value,) * rank if isinstance(value, int) else tuple(value)
    if len(values) != rank or min(values) < minimum:
        raise ValueError(f"{name} must be {rank} int(s) >= {minimum}, got {value!r}")
    return values


def _check_signal(name: str, x: object, weight: Tensor, weight_name: str = "weight") -> Tensor:
    x = _check_tensor(name, x)
    if x.dim() != weight.dim():
        raise ValueError(f"{name} must have rank {weight.dim()} to match {weight_name} {tuple(weight.shape)} "
                         f"((B, C_sig, {'L' if weight.dim() == 3 else 'H, W'})), got shape {tuple(x.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"{name} has {x.shape[1]} channels but {weight_name} expects C_sig={weight.shape[1]}")
    return x


def _check_geometry(x_size: Sequence[int], weight: Tensor, stride: IntOrPair, padding: IntOrPair):
    rank = weight.dim() - 2
    stride = _check_ints("stride", stride, rank, minimum=1)
    padding = _check_ints("padding", padding, rank, minimum=0)
    code = ref.code_size(x_size, weight.shape[2:], stride, padding)
    if min(code) < 1:
        raise ValueError(f"the signal size {tuple(x_size)} is too small for kernel {tuple(weight.shape[2:])} with "
                         f"padding {padding}: the code would be empty")
    return stride, padding, code


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_nonnegative(name: str, value: Tensor | float) -> None:
    # Reading tensor values syncs a GPU stream; skip it while tracing, where values are unknown anyway.
    if isinstance(value, Tensor):
        if not _is_compiling() and bool((value < 0).any()):
            raise ValueError(f"{name} must be >= 0, got a tensor with negative entries")
    elif value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_scalar_or_tensor(name: str, value: object) -> Tensor | float:
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if isinstance(value, Tensor):
        _check_tensor(name, value)
    return value


# ------------------------------------------------------------------------------------------------ simple ops
def soft_threshold(x: Tensor, threshold: Tensor | float, *, nonneg: bool = False) -> Tensor:
    """``S_t(x) = sign(x) max(|x| - t, 0)`` (``max(x - t, 0)`` when ``nonneg``).

    x: any shape; threshold: a float or a tensor broadcastable to x, >= 0. Derivative 0 at ``|x| = t``, NaN in gives
    NaN out (matches ``F.softshrink`` / ``relu``).
    """
    _check_tensor("x", x)
    _check_scalar_or_tensor("threshold", threshold)
    _check_nonnegative("threshold", threshold)
    return ref.soft_threshold_ref(x, threshold, nonneg)


def conv_analysis(x: Tensor, weight: Tensor, *, stride: IntOrPair = 1, padding: IntOrPair = 0) -> Tensor:
    """``D^T x``. x: (B, C_sig, *S), weight: (C_code, C_sig, *k) -> (B, C_code, *Sz)."""
    weight = _check_weight("weight", weight)
    x = _check_signal("x", x, weight)
    _check_same_device(x=x, weight=weight)
    stride, padding, _ = _check_geometry(x.shape[2:], weight, stride, padding)
    return ref.conv_analysis_ref(x, weight, stride, padding)


def conv_synthesis(z: Tensor, weight: Tensor, *, stride: IntOrPair = 1, padding: IntOrPair = 0,
                   signal_size: Sequence[int]) -> Tensor:
    """``D z`` with spatial size ``signal_size`` (the exact adjoint of ``conv_analysis``).

    z: (B, C_code, *Sz), weight: (C_code, C_sig, *k) -> (B, C_sig, *signal_size).
    """
    weight = _check_weight("weight", weight)
    z = _check_tensor("z", z, rank=weight.dim())
    if z.shape[1] != weight.shape[0]:
        raise ValueError(f"z has {z.shape[1]} channels but weight expects C_code={weight.shape[0]}")
    _check_same_device(z=z, weight=weight)
    signal_size = _check_ints("signal_size", signal_size, weight.dim() - 2, minimum=1)
    stride, padding, code = _check_geometry(signal_size, weight, stride, padding)
    if tuple(z.shape[2:]) != code:
        raise ValueError(f"z has spatial size {tuple(z.shape[2:])}, but a signal of size {signal_size} has codes of "
                         f"size {code} with this kernel, stride and padding")
    return ref.conv_synthesis_ref(z, weight, signal_size, stride, padding)


def lipschitz_constant(weight: Tensor, signal_size: Sequence[int], *, stride: IntOrPair = 1,
                       padding: IntOrPair = 0, n_iter: int = 100) -> float:
    """``L = ||D||_2^2`` at this signal size (power iteration; ISTA's default step is 1/L).

    weight: (C_code, C_sig, *k); signal_size: the spatial size of x.
    """
    weight = _check_weight("weight", weight)
    signal_size = _check_ints("signal_size", signal_size, weight.dim() - 2, minimum=1)
    stride, padding, _ = _check_geometry(signal_size, weight, stride, padding)
    if not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be an int >= 1, got {n_iter!r}")
    return ref.lipschitz_constant_ref(weight, signal_size, stride, padding, n_iter)


def lasso_objective(x: Tensor, z: Tensor, weight: Tensor, lam: Tensor | float, *, stride: IntOrPair = 1,
                    padding: IntOrPair = 0) -> Tensor:
    """Per-sample ``0.5 ||x - D z||^2 + sum_c lam_c ||z_c||_1``. lam: float or (C_code,). Returns (B,)."""
    weight = _check_weight("weight", weight)
    x = _check_signal("x", x, weight)
    z = _check_tensor("z", z, rank=weight.dim())
    _check_same_device(x=x, z=z, weight=weight)
    stride, padding, code = _check_geometry(x.shape[2:], weight, stride, padding)
    if tuple(z.shape) != (x.shape[0], weight.shape[0], *code):
        raise ValueError(f"z must have shape {(x.shape[0], weight.shape[0], *code)}, got {tuple(z.shape)}")
    lam = _check_scalar_or_tensor("lam", lam)
    _check_nonnegative("lam", lam)
    if isinstance(lam, Tensor) and lam.shape not in ((), (weight.shape[0],)):
        raise ValueError(f"lam must be a float, a 0-d tensor or (C_code,)=({weight.shape[0]},), got {tuple(lam.shape)}")
    return ref.lasso_objective_ref(x, z, weight, lam, stride, padding)


# -------------------------------------------------------------------------------------------------- conv-ISTA
def _per_iteration(name: str, value: Tensor | float, n_iter: int, c_code: int | None, like: Tensor) -> Tensor:
    """Broadcast lam (scalar, (C_code,), (n_iter, C_code)) or step (scalar, (n_iter,)) to its canonical shape.

    Broadcasting keeps autograd: the gradient of a shared scalar is the sum over the canonical entries."""
    full = (n_iter, c_code) if c_code is not None else (n_iter,)
    allowed = [(), (n_iter,)] if c_code is None else [(), (c_code,), (n_iter, c_code)]
    if not isinstance(value, Tensor):
        return torch.full(full, float(value), dtype=like.dtype, device=like.device)
    if tuple(value.shape) not in allowed:
        raise ValueError(f"{name} must have one of the shapes {allowed} (n_iter={n_iter}"
                         f"{'' if c_code is None else f', C_code={c_code}'}), got {tuple(value.shape)}")
    return value.to(like.dtype).expand(full).contiguous()


def conv_ista(x: Tensor, weight: Tensor, lam: Tensor | float, *, n_iter: int, step: Tensor | float | None = None,
              encoder_weight: Tensor | None = None, stride: IntOrPair = 1, padding: IntOrPair = 0,
              z0: Tensor | None = None, nonneg: bool = False, fista: bool = False, backend: str = "auto",
              recompute: bool = False) -> Tensor:
    """Unrolled convolutional ISTA (or FISTA) for ``min_z 0.5||x - D z||^2 + lam ||z||_1``.

    x: (B, C_sig, *S); weight, encoder_weight: (C_code, C_sig, *k); lam >= 0: float, (C_code,) or (n_iter, C_code);
    step > 0: float, (n_iter,), or None for 1/L at x's size; z0: (B, C_code, *Sz) or None for zeros.
    ``recompute``: fused backends keep nothing code-sized for the backward and replay the iterations (memory
    independent of n_iter) instead of saving code iterates (cpp: every other one, replaying the rest; triton: all).
    Returns z: (B, C_code, *Sz).
    """
    weight = _check_weight("weight", weight)
    x = _check_signal("x", x, weight)
    if encoder_weight is not None:
        encoder_weight = _check_tensor("encoder_weight", encoder_weight)
        if encoder_weight.shape != weight.shape:
            raise ValueError(f"encoder_weight must have weight's shape {tuple(weight.shape)}, got "
                             f"{tuple(encoder_weight.shape)}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be an int >= 1, got {n_iter!r}")
    stride, padding, code = _check_geometry(x.shape[2:], weight, stride, padding)
    z_shape = (x.shape[0], weight.shape[0], *code)
    if z0 is not None:
        z0 = _check_tensor("z0", z0)
        if tuple(z0.shape) != z_shape:
            raise ValueError(f"z0 must have the code's shape {z_shape}, got {tuple(z0.shape)}")
    lam = _check_scalar_or_tensor("lam", lam)
    _check_nonnegative("lam", lam)
    if step is not None:
        step = _check_scalar_or_tensor("step", step)
        if (isinstance(step, Tensor) and not _is_compiling() and bool((step <= 0).any())) or (
                not isinstance(step, Tensor) and step <= 0):
            raise ValueError(f"step must be > 0, got {step if not isinstance(step, Tensor) else 'a tensor with entries <= 0'}")
    tensors = dict(x=x, weight=weight, encoder_weight=encoder_weight, z0=z0,
                   lam=lam if isinstance(lam, Tensor) else None, step=step if isinstance(step, Tensor) else None)
    _check_same_device(**tensors)
    dtypes = {t.dtype for t in (x, weight, encoder_weight, z0) if t is not None}
    if len(dtypes) > 1:
        raise TypeError(f"x, weight, encoder_weight and z0 must share one dtype, got {sorted(map(str, dtypes))}")
    backend = _resolve_backend(backend, x.device, x.dtype)

    if step is None:
        step = 1.0 / lipschitz_constant(weight, x.shape[2:], stride=stride, padding=padding)
    lam_full = _per_iteration("lam", lam, n_iter, weight.shape[0], x)
    step_full = _per_iteration("step", step, n_iter, None, x)
    if backend == "reference":
        return ref.conv_ista_ref(x, weight, lam_full, step_full, encoder_weight=encoder_weight, stride=stride,
                                 padding=padding, z0=z0, nonneg=nonneg, fista=fista)
    return _fused_conv_ista(backend, x, weight, encoder_weight, lam_full, step_full, z0, z_shape, stride, padding,
                            nonneg, fista, recompute)


def _fused_conv_ista(backend, x, weight, encoder_weight, lam, step, z0, z_shape, stride, padding, nonneg, fista,
                     recompute) -> Tensor:
    """Fused kernels are 2-D: a 1-D problem runs as height-1 images, which is the same computation."""
    one_d = weight.dim() == 3
    if one_d:
        x, weight = x.unsqueeze(2), weight.unsqueeze(2)
        encoder_weight = None if encoder_weight is None else encoder_weight.unsqueeze(2)
        z0 = None if z0 is None else z0.unsqueeze(2)
        stride, padding = (1, *stride), (0, *padding)
    z0 = x.new_empty(0) if z0 is None else z0.contiguous()  # empty: zeros, never materialised
    encoder_weight = weight if encoder_weight is None else encoder_weight
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, weight, encoder_weight, lam, step, z0))
    checkpoint = 0 if recompute or not needs_grad else _save_interval(backend, fista)
    z = conv_ista_op(backend, x.contiguous(), weight.contiguous(), encoder_weight.contiguous(), lam, step,
                     z0, stride, padding, nonneg, fista, checkpoint)
    return z.squeeze(2) if one_d else z


def _save_interval(backend: str, fista: bool) -> int:
    """The checkpoint interval of save mode (reference.conv_ista.checkpoint_indices). The cpp backward replays each
    segment per batch item from its checkpoint and keeps the residuals it computes on the way, so every other
    iterate (FISTA: two of three, as a replay needs z_{k-1} too) costs it about one forward iteration per segment;
    the Triton backward reads every iterate."""
    if backend == "cpp":
        return 3 if fista else 2
    return 1


def deep_conv_ista(x: Tensor, weights: Sequence[Tensor], lams: Sequence[Tensor | float], *,
                   n_iter: int | Sequence[int], strides: Sequence[IntOrPair] | None = None,
                   paddings: Sequence[IntOrPair] | None = None, steps: Sequence[Tensor | float | None] | None = None,
                   nonneg: bool = False, backend: str = "auto", recompute: bool = False) -> list[Tensor]:
    """Layered pursuit: ``G_1 = ISTA(x; D_1)``, ``G_j = ISTA(G_{j-1}; D_j)``. Returns ``[G_1, ..., G_J]``.

    x: (B, C_0, *S); weights[j]: (C_{j+1}, C_j, *k_j); lams[j], steps[j], n_iter (int or one per layer), strides[j],
    paddings[j] as in ``conv_ista`` for layer j.
    """
    if isinstance(weights, Tensor) or not isinstance(weights, Sequence) or len(weights) == 0:
        raise TypeError("weights must be a non-empty list of dictionary tensors")
    depth = len(weights)

    def per_layer(name, values, default):
        if values is None:
            return [default] * depth
        if isinstance(values, (Tensor, int, float)) or len(values) != depth:
            raise ValueError(f"{name} must be a list with one entry per layer ({depth}), got {values!r}")
        return list(values)

    lams = per_layer("lams", lams, None)
    n_iters = [n_iter] * depth if isinstance(n_iter, int) else per_layer("n_iter", n_iter, None)
    strides, paddings = per_layer("strides", strides, 1), per_layer("paddings", paddings, 0)
    steps = per_layer("steps", steps, None)
    codes, signal = [], x
    for j in range(depth):
        try:
            signal = conv_ista(signal, weights[j], lams[j], n_iter=n_iters[j], step=steps[j], stride=strides[j],
                               padding=paddings[j], nonneg=nonneg, backend=backend, recompute=recompute)
        except (ValueError, TypeError) as err:
            raise type(err)(f"layer {j}: {err}") from None
        codes.append(signal)
    return codes


# ----------------------------------------------------------------------------------------------- sparse attention
ATTENTION_MODES = ("sparsemax", "shrink")


def sparsemax(x: Tensor, dim: int = -1) -> Tensor:
    """Sparsemax along ``dim``: the Euclidean projection onto the probability simplex (exactly sparse).

    x: any shape; -inf entries get 0 and a slice that is entirely -inf gives zeros.
    """
    x = _check_tensor("x", x)
    if not isinstance(dim, int) or not -x.dim() <= dim < max(x.dim(), 1):
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}), got {dim!r}")
    from .reference.attention import sparsemax_ref
    return sparsemax_ref(x, dim)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, *, mode: str = "sparsemax",
                     threshold: Tensor | float | None = None, causal: bool = False, scale: float | None = None,
                     backend: str = "auto") -> Tensor:
    """Attention with exactly sparse maps, ``O = P v`` with ``s = scale q k^T`` and

    - ``mode="sparsemax"``: ``P = max(s - tau, 0)``, tau per row so that rows sum to 1;
    - ``mode="shrink"``: ``P = max(s - threshold, 0)`` (one ISTA step coding the query on the keys).

    q: (B, H, N, d); k: (B, H, M, d); v: (B, H, M, d_v); threshold: float or (H,) (shrink only); causal: query i
    sees keys j <= i; scale defaults to d^-1/2. A row with no active key gives 0. Returns (B, H, N, d_v).
    """
    q, k, v = (_check_tensor(name, t, rank=4) for name, t in (("q", q), ("k", k), ("v", v)))
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"q, k and v must share (B, H), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k must have q's head dim {q.shape[3]}, got {k.shape[3]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have k's length {k.shape[2]}, got {v.shape[2]}")
    if len({q.dtype, k.dtype, v.dtype}) > 1:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if mode not in ATTENTION_MODES:
        raise ValueError(f"mode must be one of {ATTENTION_MODES}, got {mode!r}")
    heads = q.shape[1]
    if mode == "shrink":
        if threshold is None:
            raise ValueError("threshold is required for mode='shrink' (a float or a per-head (H,) tensor)")
        threshold = _check_scalar_or_tensor("threshold", threshold)
        if isinstance(threshold, Tensor) and tuple(threshold.shape) not in ((), (heads,)):
            raise ValueError(f"threshold must be a float or a tensor of shape (H,)=({heads},), "
                             f"got {tuple(threshold.shape)}")
    elif threshold is not None:
        raise ValueError("threshold is only used by mode='shrink'; sparsemax finds its own per-row threshold")
    if scale is None:
        scale = q.shape[3] ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
        raise ValueError(f"scale must be a positive float, got {scale!r}")
    _check_same_device(q=q, k=k, v=v, threshold=threshold if isinstance(threshold, Tensor) else None)
    backend = _resolve_backend(backend, q.device, q.dtype)

    from .reference.attention import sparse_attention_ref
    if backend == "reference":
        return sparse_attention_ref(q, k, v, mode=mode, threshold=0.0 if threshold is None else threshold,
                                    causal=causal, scale=scale)
    from .ops.sparse_attention import sparse_attention as sparse_attention_op
    if isinstance(threshold, Tensor):
        threshold = threshold.expand(heads)
    else:
        threshold = torch.full((heads,), 0.0 if threshold is None else float(threshold), dtype=q.dtype,
                               device=q.device)
    return sparse_attention_op(backend, q, k, v, threshold, mode, causal, float(scale))
