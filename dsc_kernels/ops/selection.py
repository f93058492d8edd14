"""Which table row runs a call: availability, dtype support, ``DSC_KERNELS_BACKEND`` and the ``auto`` choice.

``select(family, backend, device, dtype)`` returns a row of ``ops.table`` or raises:

- an explicitly named backend runs or raises (``RuntimeError`` saying why it cannot run here and how to fix it,
  ``TypeError`` for a dtype it does not support); it never silently falls back;
- ``"auto"`` reads ``DSC_KERNELS_BACKEND`` (empty means unset, any case), else tries the rows of
  ``table.auto_preference(family, device type)`` that support the dtype, in order, and falls back to the reference
  with a one-time warning when a preferred fused backend cannot run. Dtype is checked before availability, so a dtype a
  backend cannot use never triggers its build. Under a ``torch.func`` transform (grad, jacrev, jvp, vmap) ``auto``
  takes the reference: PyTorch's custom-op autograd supports none of the gradient transforms, and vmap of eager ops
  runs batched where the fused ops would run one sample at a time. So does a call with a forward-mode tangent
  (``torch.autograd.forward_ad``), which the fused ops' reverse-mode autograd would drop; an explicit fused backend
  raises a ``ValueError`` there, and under every transform but ``vmap`` (and under ``vmap`` too for ml_ista, whose
  list-returning fused ops vmap cannot run a sample at a time).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from functools import cache

import torch

from .. import _warnings
from .._validate import functorch_active
from . import conv_ista, ml_ista, sparse_attention, table
from .registry import implementation
from .table import Backend

ENV_VAR = "DSC_KERNELS_BACKEND"
KNOWN_NAMES = ("auto", *table.BACKEND_NAMES, *table.NOT_BUILT)  # what ``backend=`` may say
# KNOWN_NAMES as error messages list them: a name without a row says it is not built
_KNOWN = ", ".join(("auto", *table.BACKEND_NAMES, *(f"{n} (not in this release)" for n in table.NOT_BUILT)))

# Each family's module: its schema, fakes, autograd, op_pair(backend) and run(row, ...).
FAMILY_MODULES = {"conv_ista": conv_ista, "sparse_attention": sparse_attention, "ml_ista": ml_ista}

# TRITON_INTERPRET as it was when Triton was imported (set at the end of this module, or by note_triton_import):
# Triton reads it then, so a later change cannot take effect in this process.
_triton_interpret_at_import: str | None = None
# Families whose fused ops return lists of tensors: vmap has no per-sample fallback for them.
VMAP_UNSUPPORTED = frozenset({"ml_ista"})
_warned: set[str] = set()


@cache
def _triton_installed() -> bool:
    # find_spec, not import: Triton fixes the interpreter setting when it is imported, so it is imported only when
    # a triton call registers its ops (note_triton_import), never by an availability check.
    return importlib.util.find_spec("triton") is not None


def _interpreting_now() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def note_triton_import() -> None:
    """Called when the Triton kernels are imported: remember the interpreter setting they were compiled under."""
    global _triton_interpret_at_import
    if _triton_interpret_at_import is None:
        _triton_interpret_at_import = os.environ.get("TRITON_INTERPRET", "")


def _triton_reason(device: torch.device) -> str | None:
    if not _triton_installed():
        return "triton is not installed (pip install triton==3.7.1)"
    imported = _triton_interpret_at_import
    if imported is not None and (imported == "1") != _interpreting_now():
        return (
            f"TRITON_INTERPRET changed after the Triton kernels were imported (it was {imported!r} then, "
            f"{os.environ.get('TRITON_INTERPRET', '')!r} now); Triton reads it once, so set it before importing "
            "dsc_kernels or torch"
        )
    if device.type == "cuda":
        # a question about CUDA tensors where torch sees no GPU: nothing here could run them
        return None if torch.cuda.is_available() else "CUDA is not available here (torch.cuda.is_available() is False)"
    if device.type == "cpu" and _interpreting_now():
        return None
    return (
        f"the triton backend needs CUDA tensors (got {device.type}); on CPU it runs only under the interpreter "
        "(set TRITON_INTERPRET=1 before importing dsc_kernels or torch)"
    )


@torch.compiler.assume_constant_result
def unavailable_reason(family: str, name: str, device_type: str) -> str | None:
    """Why backend ``name`` of ``family`` cannot run on ``device_type`` here (with how to fix it), or None.

    Availability is fixed for a process (an extension that built stays built), so torch.compile evaluates this
    once while tracing instead of stepping into the build/import checks."""
    if name in table.NOT_BUILT:
        return table.NOT_BUILT[name]
    row = table.row(family, name)
    device = torch.device(device_type)
    if row.requires == "triton":
        return _triton_reason(device)
    if row.devices is not None and device.type not in row.devices:
        return (
            f"the {name} backend runs on {'/'.join(d.upper() for d in row.devices)} tensors, got "
            f"{device.type} tensors" + ("; use backend='triton' on GPUs" if device.type == "cuda" else "")
        )
    if row.requires == "extension":
        from .. import _ext

        if not _ext.available():
            return (
                f"the C++ extension did not build: {_ext.build_error()}. Install a C++ compiler (g++) and "
                "ninja (pip install ninja), or use backend='reference'"
            )
    return None


def available(family: str, device: torch.device | str) -> list[str]:
    """The backends of ``family`` that can run on ``device`` here (``reference`` always can)."""
    device_type = torch.device(device).type
    return [r.name for r in table.rows(family) if unavailable_reason(family, r.name, device_type) is None]


def backend_name(backend: object, family: str | None = None) -> str:
    """``backend`` normalised (stripped, lower case), or TypeError/ValueError naming it: what a layer checks at
    construction, before any device or environment is known. With ``family``, a backend without kernels for that
    op family is refused too."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string such as 'auto', 'reference', 'cpp' or 'triton', got {backend!r}")
    name = backend.strip().lower()
    if name not in KNOWN_NAMES:
        raise ValueError(f"backend must be one of {_KNOWN}, got {backend!r}")
    if family is not None:
        # rows() refuses an unknown family for "auto" too: check_backend("auto", "conv-ista") returned "auto"
        names = [row.name for row in table.rows(family)]
        if name != "auto" and name not in table.NOT_BUILT and name not in names:
            raise ValueError(f"backend {backend!r} has no {family} kernels; use one of {('auto', *names)}")
    return name


def requested(backend: object) -> tuple[str, str]:
    """(the backend a call asks for, how it asked: "backend=" or the environment variable, for error messages)."""
    name = backend_name(backend)
    if name != "auto":
        return name, "backend="
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env and env not in KNOWN_NAMES:
        raise ValueError(
            f"the environment variable {ENV_VAR} must be one of {_KNOWN} (or empty), got {os.environ[ENV_VAR]!r}"
        )
    return (env, f"{ENV_VAR}=") if env else ("auto", "backend=")


def _supports(row: Backend, dtype: torch.dtype) -> bool:
    return dtype in row.dtypes


def _missing(row: Backend, features: tuple[str, ...]) -> list[str]:
    return [f for f in features if f not in row.features]


def _running_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype an op runs in: inside an autocast region every op's autocast rule (registry) casts float16 and
    bfloat16 inputs to float32, so a half-precision input there (an autocast projection's output) runs on a fused
    backend that takes only float32 and float64."""
    # torch.amp.is_autocast_available is not traceable by torch 2.11's dynamo; meta is the type without autocast
    if dtype not in (torch.float16, torch.bfloat16) or device.type == "meta":
        return dtype
    return torch.float32 if torch.is_autocast_enabled(device.type) else dtype


def select(
    family: str,
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    features: tuple[str, ...] = (),
    *,
    prefers: Callable[[str], bool] | None = None,
    memory_lean: bool = False,
    inputs: tuple[object, ...] = (),
) -> Backend:
    """The row that runs a ``family`` call with this ``backend`` argument on ``device``/``dtype`` tensors, among the
    rows that run every variant in ``features`` (table.CONV_ISTA_VARIANTS and the like).

    ``prefers(name)``, when given, is the call's cost model (e.g. ``cpu_cost.hook``): ``auto`` skips a candidate
    it declines. ``memory_lean`` (a backward in recompute mode was asked for): ``auto`` skips the rows whose
    backward is autograd through eager ops (they keep every intermediate) whatever the cost model says, and falls
    back to the reference only where no fused row runs. ``inputs``: the call's tensors, read for forward-mode
    tangents (``_autodiff_need``)."""
    name, origin = requested(backend)
    need = _autodiff_need(inputs)
    dtype = _running_dtype(device, dtype)
    names = {r.name for r in table.rows(family)}
    if name != "auto":
        # an explicit request, by argument or by the environment variable, runs as asked or raises; the
        # messages say which of the two asked
        asked = f"{origin}{name!r}" + (" (the backend argument was 'auto')" if origin != "backend=" else "")
        if name not in table.NOT_BUILT:
            if name not in names:
                raise ValueError(f"{asked}: that backend has no {family} kernels; backends that have: {sorted(names)}")
            missing = _missing(table.row(family, name), features)
            if missing:
                able = [r.name for r in table.rows(family) if not _missing(r, features)]
                what = " and ".join(f"{m} ({table.VARIANT_MEANING[m]})" for m in missing)
                raise ValueError(f"{asked} cannot run {what} in {family}; backends that can: {', '.join(able)}")
        reason = unavailable_reason(family, name, device.type)
        if reason is not None:
            raise RuntimeError(f"{asked} cannot run: {reason}")
        row = table.row(family, name)
        if not _supports(row, dtype):
            raise TypeError(f"{asked} supports {', '.join(map(str, row.dtypes))}, got {dtype}")
        if need is not None and row.eager is None:
            raise ValueError(
                f"{asked} cannot run {need}: the fused ops support reverse-mode autograd (backward(), "
                "torch.autograd.grad) and vmap only, and a forward-mode tangent through them would be dropped (a "
                "silently zero derivative); use backend='reference' or 'auto'"
            )
        if row.eager is None and family in VMAP_UNSUPPORTED and functorch_active():
            # vmap runs an op without a batching rule one sample at a time only when it returns plain tensors:
            # for the ml_ista ops' lists PyTorch raised "Batching rule not implemented ... could not generate a
            # fallback", which named neither the argument nor a way out
            raise ValueError(
                f"{asked} cannot run under torch.func.vmap for a multi-layer pursuit ({family}, and conv_ista with "
                "per-iteration dictionaries or an input encoder): its fused op returns lists of tensors, which vmap "
                "cannot run one sample at a time; use backend='reference' or 'auto', which run it batched"
            )
        return _registered(row)
    if need is not None or functorch_active():
        return table.row(family, "reference")
    for candidate in table.auto_preference(family, device.type):
        if candidate not in names:  # a family need not have a row for every backend
            continue
        row = table.row(family, candidate)
        if not _supports(row, dtype) or _missing(row, features):
            continue
        if (row.eager is not None) if memory_lean else (prefers is not None and not prefers(candidate)):
            continue
        reason = unavailable_reason(family, candidate, device.type)
        if reason is None:
            return _registered(row)
        if candidate not in _warned and row.name != "reference":
            _warned.add(candidate)
            _warnings.warn(f"dsc_kernels: backend 'auto' is not using {candidate} because {reason}")
    return table.row(family, "reference")


def _autodiff_need(inputs: tuple[object, ...]) -> str | None:
    """What only an eager row's autograd gives this call, or None: forward-mode AD (an input carries a tangent of
    torch.autograd.forward_ad) or a torch.func gradient transform (grad, jacrev, jvp, ...). The fused ops' autograd
    is reverse-mode only: a tangent passes through them dropped, so jvp returned zeros, and grad raised PyTorch's
    own "must override the setup_context staticmethod". vmap alone runs them one sample at a time."""
    if functorch_active():
        stack = torch._C._functorch.get_interpreter_stack() or []
        if any(i.key() != torch._C._functorch.TransformType.Vmap for i in stack):
            return "a torch.func gradient transform (grad, jacrev, jvp, jacfwd, hessian)"
    if torch.autograd.forward_ad._current_level >= 0:
        unpack = torch.autograd.forward_ad.unpack_dual
        if any(isinstance(t, torch.Tensor) and unpack(t).tangent is not None for t in inputs):
            return "forward-mode AD (an input carries a torch.autograd.forward_ad tangent)"
    return None


@torch.compiler.assume_constant_result
def _register(family: str, name: str) -> str:
    """Register the row's ops outside any trace: torch.compile evaluates this once and finds them registered."""
    row = table.row(family, name)
    if row.eager is None:
        FAMILY_MODULES[family].op_pair(name)
    else:
        implementation(row.eager)
    for rule in (row.residual_policy, row.batch_limit):
        if rule is not None:
            implementation(rule)  # looked up on every call: its import must not happen inside a trace
    return name


def _registered(row: Backend) -> Backend:
    _register(row.family, row.name)
    return row


# torch._dynamo (imported by the assume_constant_result decorators above) imports Triton when it is installed.
if "triton" in sys.modules:
    note_triton_import()
