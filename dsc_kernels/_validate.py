"""Input checks shared by ``functional``: each raises ``ValueError``/``TypeError`` naming the argument.

Checks that read tensor values (signs, finiteness) sync a GPU stream; they are skipped while ``torch.compile``
traces (values are unknown there) and for meta and fake tensors (which have none).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .reference import code_size
from .reference.conv import value_dtype

IntOrPair = int | Sequence[int]
Padding = IntOrPair | str

MAX_EXTENT = 2**31 - 1


def storageless(t: Tensor) -> bool:
    """Whether t has no memory of its own to read or point at: a meta tensor or a FakeTensor (a module built under a
    FakeTensorMode for shapes only)."""
    return t.device.type == "meta" or is_fake(t)


def require_values(name: str, t: Tensor, user: str) -> None:
    """A ValueError naming ``name`` where ``t`` holds no values (meta or fake) that ``user`` needs: reading them
    failed inside torch, naming nothing (``.item()``/``.numpy()`` on a meta tensor, DataDependentOutputException)."""
    if storageless(t):
        kind = "meta" if t.device.type == "meta" else "fake"
        raise ValueError(f"{name} is a {kind} tensor: {user} needs its values")


def _valueless(t: Tensor) -> bool:
    """Whether t's values, or those computed from it, are unknown: while tracing, on meta, or a FakeTensor or any
    tensor under a FakeTensorMode (shape propagation outside torch.compile, where a read raised
    DataDependentOutputException instead of giving shapes)."""
    if torch.compiler.is_compiling() or storageless(t):
        return True
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def values_readable(t: Tensor) -> bool:
    """Whether t's values can be read into Python now: not while tracing, not on meta or fake tensors, not per sample
    under vmap."""
    return not _valueless(t) and not _batched(t)


def checkable(t: Tensor) -> Tensor | None:
    """The values to check t's entries on, or None when there are none to read (tracing, meta, fake). Under vmap a
    per-sample tensor's own values cannot be read, but the unwrapped tensor holds every sample's: a check on it sees
    them all."""
    if _valueless(t):
        return None
    functorch = torch._C._functorch
    if not _batched(t):
        return t  # grad/jvp wrappers read as their values
    while functorch.is_functorch_wrapped_tensor(t):
        t = functorch.get_unwrapped(t)
    return t


def functorch_active() -> bool:
    """Whether the call runs inside a torch.func transform (vmap, grad, jacrev, ...), whose tensors are wrappers."""
    return bool(torch._C._are_functorch_transforms_active())


def requires_grad(t: Tensor) -> bool:
    """Whether autograd will record an op on t. Under vmap a BatchedTensor reads ``requires_grad`` False even when
    the tensor it wraps requires grad: a fused op run there a sample at a time on the unwrapped tensors is still
    recorded, so a forward that decided on the wrapper saved nothing for a backward that then ran (conv-ISTA's
    "checkpoint must be >= 0") or took a mask gradient for absent (silently None)."""
    if t.requires_grad or torch.compiler.is_compiling() or not functorch_active():
        return t.requires_grad  # no wrappers: torch.compile cannot trace the unwrapping below
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if t.requires_grad:
            return True
        t = functorch.get_unwrapped(t)
    return t.requires_grad


def _batched(t: Tensor) -> bool:
    """t is, or wraps, a vmap BatchedTensor (whose float() / item() raise)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def tensor(name: str, t: object, *, rank: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_nested:
        # sparse, mkldnn and nested tensors failed deep inside torch's convolutions or the C++ kernels instead
        kind = "a nested tensor" if t.is_nested else f"layout {t.layout} (convert it with .to_dense())"
        raise TypeError(f"{name} must be a dense (strided) tensor, got {kind}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(t.shape)}")
    return t


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def weight(name: str, w: object) -> Tensor:
    w = tensor(name, w)
    if w.dim() not in (3, 4):
        raise ValueError(f"{name} must be (C_code, C_sig, k) or (C_code, C_sig, kh, kw), got {tuple(w.shape)}")
    if 0 in w.shape[2:]:
        raise ValueError(f"{name} must have a kernel of size >= 1 in every dimension, got {tuple(w.shape)}")
    return w


def device(name: str, value: object) -> torch.device:
    """A cpu or cuda device that exists here: otherwise the first ``.to(device)`` fails deep inside a run, and an int
    is read by torch as a CUDA index. The recipes and the command lines run on no other device type."""
    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"{name} must be a str or a torch.device, got {value!r}")
    try:
        parsed = torch.device(value)
    except RuntimeError:
        raise ValueError(f"{name} must be 'cpu', 'cuda' or 'cuda:N', got {value!r}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be 'cpu', 'cuda' or 'cuda:N' (the recipes run on no other), got {value!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{name} {value!r} requested but CUDA is not available on this machine "
                "(torch.cuda.is_available() is False); use cpu"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {value!r} requested but this machine has {torch.cuda.device_count()} GPU(s)")
    return parsed


def any_device(name: str, value: object) -> torch.device:
    """Any device torch can name, whether or not it exists here (what a question about availability takes):
    TypeError / ValueError naming the argument instead of torch's RuntimeError, which an int meets too."""
    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"{name} must be a str or a torch.device, got {value!r}")
    try:
        return torch.device(value)
    except RuntimeError:
        raise ValueError(f"{name} must name a torch device such as 'cpu', 'cuda' or 'cuda:1', got {value!r}") from None


def same_device(**tensors: Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {where}")


# The dtypes autocast casts (float64 stays float64 inside an autocast region).
AUTOCAST_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})


def autocasting(device: torch.device) -> bool:
    """Whether autocast is on for device's type; False where it has none (meta)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know
        return False


def values_like(x: Tensor, *dictionaries: Tensor | None) -> Tensor:
    """What thresholds and steps are made like (dtype, device): x, or an empty tensor on x's device of a wider dtype:
    float32 for half-precision x (``reference.value_dtype``: a float16 step 1/L is often subnormal), and the widest
    dictionary's (inside autocast a half-precision activation meets float32 parameters), so that float32 values are
    not rounded to the activation's precision. None stands for an absent encoder."""
    dtype = x.dtype
    for w in dictionaries:
        if w is not None:
            dtype = torch.promote_types(dtype, w.dtype)
    dtype = value_dtype(dtype)
    return x if dtype == x.dtype else x.new_empty((), dtype=dtype)


def same_dtype(**tensors: Tensor | None) -> None:
    """One dtype for all, except inside an autocast region, which takes float16, bfloat16 and float32 together (an
    autocast layer's half-precision output meets float32 parameters) and casts them: the fused ops' autocast rules to
    float32, the reference's PyTorch ops by autocast's own rules."""
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        device = next(t.device for t in tensors.values() if t is not None)
        if set(dtypes.values()) <= AUTOCAST_DTYPES and autocasting(device):
            return
        raise TypeError(
            f"{', '.join(dtypes)} must share one dtype, got {', '.join(f'{n} {d}' for n, d in dtypes.items())}"
        )


def count(name: str, value: object, minimum: int) -> int:
    """An int >= minimum: Python, numpy and 0-d torch integers; floats and bools are a caller's bug, not a size."""
    try:
        # A bool tensor's __index__ gives 0 or 1, as the Python bool it stands for would; a one-element 1-D tensor's
        # gives its entry, though it is no scalar; a meta tensor has no value to give.
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, Tensor) and (value.dtype == torch.bool or value.dim() != 0 or value.is_meta):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def ints(name: str, value: IntOrPair, rank: int, *, minimum: int) -> tuple[int, ...]:
    """One int for every spatial dimension, or a sequence of ``rank`` of them, each >= minimum."""
    # A sequence is told from an int by its type, not by trying count() on it first: torch.compile (torch 2.11)
    # cannot trace a TypeError raised and caught inside the compiled region.
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != rank:
            raise ValueError(f"{name} must be an int or have {rank} entries, got {value!r}")
        try:
            return tuple(count(name, v, minimum) for v in value)
        except TypeError:
            pass
    else:
        try:
            return (count(name, value, minimum),) * rank
        except TypeError:
            pass
    raise TypeError(f"{name} must be an int or a sequence of {rank} ints, got {value!r}")


def padding(value: Padding, kernel: Sequence[int], stride: Sequence[int]) -> tuple[int, ...]:
    """An int, one int per dimension, or nn.Conv2d's "valid" (0) / "same" (stride 1 and odd kernels only: an even
    kernel would need asymmetric padding, which conv_transpose cannot express)."""
    if isinstance(value, str):
        if value == "valid":
            return (0,) * len(kernel)
        if value == "same":
            if any(s != 1 for s in stride) or any(k % 2 == 0 for k in kernel):
                raise ValueError(
                    f"padding='same' needs stride 1 and odd kernel sizes, got stride {tuple(stride)} "
                    f"and kernel {tuple(kernel)}"
                )
            return tuple(k // 2 for k in kernel)
        raise ValueError(f"padding must be an int, a sequence of ints, 'same' or 'valid', got {value!r}")
    return ints("padding", value, len(kernel), minimum=0)


def signal(name: str, x: object, w: Tensor, weight_name: str = "weight") -> Tensor:
    x = tensor(name, x)
    if x.dim() != w.dim():
        raise ValueError(
            f"{name} must have rank {w.dim()} to match {weight_name} {tuple(w.shape)} "
            f"((B, C_sig, {'L' if w.dim() == 3 else 'H, W'})), got shape {tuple(x.shape)}"
        )
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"{name} has {x.shape[1]} channels but {weight_name} expects C_sig={w.shape[1]}")
    return x


def geometry(x_size: Sequence[int], w: Tensor, stride: IntOrPair, pad: Padding):
    """(stride, padding, code size) for a signal of spatial size x_size; an empty code is an error."""
    rank = w.dim() - 2
    # The kernel size read as ints (operator.index: under Dynamo int() keeps the symbol) specialises it under
    # torch.compile(dynamic=True), a guard as for stride and padding, as the fused ops' fakes do
    # (ops.registry.static_kernel_size). With a symbolic one, conv_synthesis's check of z's size against the code size
    # made torch 2.13's inductor fail ("Exponent must be non-negative"; plain torch too) where a code extent equals a
    # kernel extent (Dynamo's duck sizing gives both one symbol).
    kernel = tuple(operator.index(k) for k in w.shape[2:])
    stride = ints("stride", stride, rank, minimum=1)
    pad = padding(pad, kernel, stride)
    if min(x_size) < 1:
        raise ValueError(f"the signal has an empty spatial size {tuple(x_size)}")
    if max(n + 2 * p for n, p in zip(x_size, pad)) > MAX_EXTENT:
        raise ValueError(
            f"the padded signal size {tuple(n + 2 * p for n, p in zip(x_size, pad))} (padding {pad}) must be at "
            f"most {MAX_EXTENT} in every dimension: PyTorch's convolutions index it in 32 bits"
        )
    code = code_size(x_size, kernel, stride, pad)
    if min(code) < 1:
        raise ValueError(
            f"the signal size {tuple(x_size)} is too small for kernel {kernel} with "
            f"padding {pad}: the code would be empty"
        )
    # Every stride beyond the last window start n + 2p - k gives the same single window, the same operator and adjoint:
    # run the smallest, since the fused kernels size their polyphase loops and buffers by the stride (10**9 on a small
    # map had the cpp backend allocate until the process was killed).
    stride = tuple(min(s, n + 2 * p - k + 1) for s, n, p, k in zip(stride, x_size, pad, kernel))
    return stride, pad, code


def real_or_tensor(name: str, value: object) -> Tensor | int | float:
    """A tensor, or a real number as a Python int or float: numpy scalars convert (np.float32 is no float subclass,
    np.float64 is); bools, np.bool_ included, are refused."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    return value if isinstance(value, (int, float, Tensor)) else float(value)


def scalar_or_tensor(name: str, value: object) -> Tensor | float:
    """A float or a float tensor with finite entries (NaN or inf would silently give all-NaN or all-zero codes)."""
    value = real_or_tensor(name, value)
    if isinstance(value, Tensor):
        tensor(name, value)
        values = checkable(value)
        if values is not None and not bool(torch.isfinite(values).all()):
            raise ValueError(f"{name} must be finite, got a tensor with NaN or inf entries")
    elif not float("-inf") < value < float("inf"):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def finite_value(
    name: str, value: object, *, dtype: torch.dtype, nonnegative_name: str | None = None
) -> Tensor | float:
    """``scalar_or_tensor``, then ``nonnegative(nonnegative_name, ...)`` when a name is given, then ``fits_dtype``
    (finite=True), with one value read for a tensor (a host sync on a GPU; three before): the checks' flags are read
    together and raised in that order, each with its own message."""
    value = real_or_tensor(name, value)
    values = checkable(tensor(name, value)) if isinstance(value, Tensor) else None
    if values is None:  # a float, or a tensor whose values cannot be read: the checks one by one, as before
        value = scalar_or_tensor(name, value)
        if nonnegative_name is not None:
            nonnegative(nonnegative_name, value)
        fits_dtype(name, value, dtype, finite=True)
        return value
    data = values.detach()
    flags = [~torch.isfinite(data).all()]
    if nonnegative_name is not None:
        flags.append((data < 0).any())
    largest = torch.finfo(dtype).max
    if not data.is_floating_point() or torch.finfo(data.dtype).max > largest:
        flags.append((data.abs() > largest).any())
    bits = int(sum(flag.to(torch.int64) << i for i, flag in enumerate(flags)))
    if bits & 1:
        raise ValueError(f"{name} must be finite, got a tensor with NaN or inf entries")
    if nonnegative_name is not None and bits & 2:
        raise ValueError(f"{nonnegative_name} must be >= 0, got a tensor with negative entries")
    if bits >> (2 if nonnegative_name is not None else 1):
        raise ValueError(f"{name} must fit in {dtype} (|value| <= {largest:.3g})")
    return value


def value_flags(
    value: Tensor, dtype: torch.dtype, *, nonnegative: bool = False, positive: bool = False
) -> Tensor | None:
    """Whether any of ``scalar_or_tensor``'s finiteness check, ``nonnegative``, ``positive(dtype)`` (as asked) and
    ``fits_dtype(dtype, finite=True)`` fails on the float tensor ``value``, as a 0-d bool tensor not yet read: for
    ``none_true`` to read with other values' flags at once, and only where that finds one to run the checks themselves
    for their messages. None where they read nothing (values unknown: tracing, meta, fake)."""
    values = checkable(value)
    if values is None:
        return None
    data = values.detach()
    flags = [~torch.isfinite(data).all()]
    if nonnegative:
        flags.append((data < 0).any())
    if positive:
        flags.append((data <= 0).any())
        if torch.promote_types(data.dtype, dtype) != dtype:
            flags.append((data.to(dtype) == 0).any())
    largest = torch.finfo(dtype).max
    if torch.finfo(data.dtype).max > largest:
        flags.append((data.abs() > largest).any())
    return torch.stack(flags).any()


def read_values(tensors: Sequence[Tensor]) -> list:
    """The 0-dim tensors' values as Python numbers, in order: one read (a host sync on a GPU) per device they lie on."""
    values: list = [None] * len(tensors)
    for device in {t.device for t in tensors}:
        at = [i for i, t in enumerate(tensors) if t.device == device]
        for i, value in zip(at, torch.stack([tensors[i] for i in at]).tolist()):
            values[i] = value
    return values


def none_true(flags: Sequence[Tensor]) -> bool:
    """Whether every flag is False: one value read (a host sync on a GPU) for all on one device; False without a read
    where they lie on several devices (the checks that run then say which value is wrong, or on the wrong device)."""
    if not flags:
        return True
    if len({flag.device for flag in flags}) > 1:
        return False
    return not bool(torch.stack(list(flags)).any())


def nonnegative(name: str, value: Tensor | float) -> None:
    if isinstance(value, Tensor):
        values = checkable(value)
        if values is not None and bool((values < 0).any()):
            raise ValueError(f"{name} must be >= 0, got a tensor with negative entries")
    elif value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def largest_rounding_to_zero(dtype: torch.dtype) -> float:
    """The bound below which (inclusive) a positive Python float becomes 0 in ``dtype``. Round to nearest sends
    everything up to half the smallest subnormal to 0, the tie included (0 is even); torch converts a Python float to
    a 16-bit type through float32, so for those whatever float32 rounds onto that half counts too."""
    info = torch.finfo(dtype)
    half_smallest = info.smallest_normal * info.eps / 2
    if info.bits > 16:
        return half_smallest
    float32 = torch.finfo(torch.float32)
    float32_ulp = max(float32.smallest_normal * float32.eps, half_smallest * float32.eps)
    return half_smallest + float32_ulp / 2


def positive(name: str, value: Tensor | float, dtype: torch.dtype | None = None) -> None:
    """> 0, and with ``dtype`` still > 0 once cast to it: a step that underflows to 0 there would turn a threshold into
    lam = threshold / 0, NaN codes on one backend and zeros on another."""
    if isinstance(value, Tensor):
        values = checkable(value)
        if values is None:
            return
        if bool((values <= 0).any()):
            raise ValueError(f"{name} must be > 0, got a tensor with entries <= 0")
        # a positive value cannot underflow in a dtype at least as wide as its own: no read (a host sync on a GPU)
        narrows = dtype is not None and torch.promote_types(values.dtype, dtype) != dtype
        underflows = narrows and bool((values.detach().to(dtype) == 0).any())
    elif value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    else:
        # Compared, not cast: a float that torch.compile(dynamic=True) traces symbolically cannot be read back from a
        # tensor, and a comparison becomes a guard, checked again for each new value.
        underflows = dtype is not None and value <= largest_rounding_to_zero(dtype)
    if underflows:
        raise ValueError(f"{name} must be > 0 in {dtype}, where it underflows to 0")


def broadcasts_to(name: str, t: Tensor, shape: Sequence[int]) -> None:
    """t broadcasts to ``shape`` without enlarging it (a larger result would silently change the output's shape)."""
    try:
        fits = torch.broadcast_shapes(t.shape, tuple(shape)) == tuple(shape)
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"{name} of shape {tuple(t.shape)} must broadcast to shape {tuple(shape)}")


def fits_dtype(
    name: str, value: Tensor | float, dtype: torch.dtype, *, infinite_ok: bool = False, finite: bool = False
) -> None:
    """A finite value beyond dtype's range would silently become inf there (a step of inf makes every code NaN).
    infinite_ok: +-inf itself is a meaningful value (a -inf mask entry hides a key); only finite entries are checked.
    finite: the caller has checked every entry finite (``scalar_or_tensor``), so a tensor of a dtype no wider than
    ``dtype`` fits without a read (one host sync on a GPU fewer)."""
    largest = torch.finfo(dtype).max
    if isinstance(value, Tensor):
        if (infinite_ok or finite) and value.is_floating_point() and torch.finfo(value.dtype).max <= largest:
            return  # no finite value of a narrower dtype can exceed dtype's range
        too_large = False
        values = checkable(value)
        if values is not None:
            beyond = values.detach().abs() > largest
            too_large = bool((beyond & torch.isfinite(values) if infinite_ok else beyond).any())
    else:
        too_large = abs(value) > largest and not (infinite_ok and math.isinf(value))
    if too_large:
        what = f"{name}'s finite entries" if infinite_ok else name
        raise ValueError(f"{what} must fit in {dtype} (|value| <= {largest:.3g})")


def per_iteration(
    name: str, value: Tensor | float, n_iter: int, c_code: int | None, like: Tensor, *, finite: bool = False
) -> Tensor:
    """Broadcast lam/threshold (scalar, (C_code,), (n_iter, C_code)) or step (scalar, (n_iter,)) to its canonical
    shape in like's dtype. Broadcasting keeps autograd: a shared scalar's gradient is the sum over the entries.
    finite: value has passed ``scalar_or_tensor`` (see ``fits_dtype``)."""
    full = (n_iter, c_code) if c_code is not None else (n_iter,)
    allowed = [(), (n_iter,)] if c_code is None else [(), (c_code,), (n_iter, c_code)]
    if isinstance(value, Tensor) and tuple(value.shape) not in allowed:
        raise ValueError(
            f"{name} must have one of the shapes {allowed} (n_iter={n_iter}"
            f"{'' if c_code is None else f', C_code={c_code}'}), got {tuple(value.shape)}"
        )
    fits_dtype(name, value, like.dtype, finite=finite)
    if not isinstance(value, Tensor):
        return torch.full(full, float(value), dtype=like.dtype, device=like.device)
    return broadcast_copy(value.to(like.dtype), full)


def broadcast_copy(value: Tensor, full: tuple[int, ...]) -> Tensor:
    """``value`` broadcast to ``full`` as a tensor of its own (autograd sums the gradient back); one of that shape
    already is passed as it is (made contiguous).

    .expand(full).contiguous() would keep a view where a size-1 dim makes the expansion contiguous (n_iter = 1): that
    view shares the version counter of the caller's tensor, e.g. a layer's tracked step, which every training forward
    rewrites in place with the same value, so a ConvSparseCoding layer with n_iter=1 applied twice before backward
    raised "modified by an inplace operation" where n_iter >= 2 got a copy and ran."""
    if tuple(value.shape) == full:
        return value.contiguous()
    return value.expand(full).clone(memory_format=torch.contiguous_format)


def per_layer(name: str, values: object, depth: int, default: object) -> list:
    """One entry per layer of a deep pursuit (``default`` for every layer when ``values`` is None)."""
    if values is None:
        return [default] * depth
    if isinstance(values, (Tensor, str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list with one entry per layer ({depth}), got {values!r}")
    if len(values) != depth:
        raise ValueError(f"{name} must be a list with one entry per layer ({depth}), got {values!r}")
    return list(values)
