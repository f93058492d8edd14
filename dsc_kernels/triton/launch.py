"""What the Triton kernel modules share: whether the interpreter is on, and the one way their launchers launch a
kernel, so that the launches can be recorded and compiled ahead of time from the launchers' real configurations.

- `interpreting()`: TRITON_INTERPRET=1 (kernels run on CPU tensors under Triton's interpreter, a correctness tool).
- `launch(kernel)[grid](*args, **meta)`: what the launchers write instead of
  `torch.library.wrap_triton(kernel)[grid](...)`; it is exactly that call, except inside `record_launches`.
- `record_launches(run)`: runs `run()` (typically a launcher on `meta` tensors, which need no GPU) with every launch
  recorded instead of executed, and returns one `AotSpec` per distinct specialisation: the kernel, the signature
  Triton would see (pointer dtypes, i32/i64 scalars), its constexprs and its compile options (num_warps, ...).
- `aot_compile(spec, capability)`: `triton.compile` of one spec for a GPU target without a GPU (ptxas ships with
  Triton), for the AOT tests.

How a kernel module offers AOT specialisations (tests/test_triton_aot.py compiles them for sm_80 and sm_90):
  1. launch every kernel through `launch(...)`;
  2. define `aot_specializations(...) -> list[AotSpec]` that builds small `meta` tensors for a problem and calls
     `record_launches(lambda: my_fwd(...))` and the same for the backward (see triton/conv_ista/aot.py);
  3. keep `KERNELS = {name: kernel}`; the AOT test checks that the recorded specs cover every entry.
Call `aot_specializations` without TRITON_INTERPRET (in a subprocess of the test session): block sizes differ
under the interpreter.
Both kernel packages (triton/conv_ista/, triton/sparse_attention/) do this; tests/test_triton_aot.py and
tests/test_attention_aot.py compile what they record.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

__all__ = ["interpreting", "launch", "record_launches", "AotSpec", "aot_compile"]

_TYPE_NAMES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}


def interpreting() -> bool:
    """True when Triton runs kernels under its interpreter (TRITON_INTERPRET=1, read when triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class AotSpec(NamedTuple):
    name: str  # the kernel's function name
    fn: Any  # the triton.runtime.JITFunction
    signature: dict  # argument name -> Triton type ("*fp32", "i32", ..., "constexpr")
    constexprs: dict  # constexpr argument name -> value
    options: dict  # compile options of the launch (num_warps, num_stages, ...)
    grid: tuple = ()  # the launch grid (recorded, not part of the specialisation)
    divisible: tuple = ()  # names of the arguments the JIT would mark divisible by 16 (see _jit_specialisation)

    def key(self) -> tuple:
        return (
            self.name,
            tuple(sorted(self.signature.items())),
            tuple(sorted(self.constexprs.items())),
            tuple(sorted(self.options.items())),
            self.divisible,
        )


_recorded: list[AotSpec] | None = None


def _scalar_type(value: Any, arg: str) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPE_NAMES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot derive a Triton type for argument {arg}={value!r}")


def _jit_specialisation(value: Any) -> str | None:
    """What Triton's JIT specialises a launch argument on (runtime/jit.py, native_specialize_impl): an int equal to 1
    becomes a constant ("one"); ints and pointers divisible by 16 get a divisibility attribute ("divisible"), which
    lets the compiler prove alignment and vectorise loads; floats and bools are not specialised. The AOT compile
    applies the same, so that its machine code is the one a GPU launch compiles (meta tensors have address 0,
    like the caching allocator's aligned blocks)."""
    if isinstance(value, (bool, float)):
        return None
    if isinstance(value, int):
        return "one" if value == 1 else ("divisible" if value % 16 == 0 else None)
    if isinstance(value, torch.Tensor):
        return "divisible" if value.data_ptr() % 16 == 0 else None
    return None


def _spec(kernel, args: tuple, meta: dict) -> AotSpec:
    params = kernel.params
    if len(args) > len(params):
        raise TypeError(f"{kernel.__name__}: {len(args)} positional arguments for {len(params)} parameters")
    values = {p.name: v for p, v in zip(params, args)}
    names = {p.name for p in params}
    values.update({k: v for k, v in meta.items() if k in names})
    options = {k: v for k, v in meta.items() if k not in names}
    missing = [p.name for p in params if p.name not in values and not p.has_default]
    if missing:
        raise TypeError(f"{kernel.__name__}: no value for {missing}")
    signature, constexprs, divisible = {}, {}, []
    for p in params:
        if p.name not in values:
            continue
        special = None if p.is_constexpr else _jit_specialisation(values[p.name])
        if p.is_constexpr or special == "one":
            signature[p.name] = "constexpr"
            constexprs[p.name] = values[p.name]
        else:
            signature[p.name] = _scalar_type(values[p.name], p.name)
            if special == "divisible":
                divisible.append(p.name)
    return AotSpec(kernel.__name__, kernel, signature, constexprs, options, divisible=tuple(divisible))


class _Recorder:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def record(*args, **meta):
            _recorded.append(_spec(self.kernel, args, meta)._replace(grid=tuple(grid)))

        return record


def launch(kernel):
    """`torch.library.wrap_triton(kernel)`, or a recorder of the launch inside `record_launches`."""
    if _recorded is not None:
        return _Recorder(kernel)
    if interpreting() and not isinstance(kernel, (JITFunction, Autotuner)):
        # Triton < 3.7 under its interpreter makes @triton.jit return an InterpretedFunction, which wrap_triton
        # refuses (torch 2.11 with triton 3.6, the GPU machine's stack); launched directly it runs the same way.
        return kernel
    return torch.library.wrap_triton(kernel)


def record_launches(run: Callable[[], object]) -> list[AotSpec]:
    """The distinct kernel specialisations `run()` launches, in first-launch order; nothing is executed."""
    global _recorded
    if _recorded is not None:
        raise RuntimeError("record_launches does not nest")
    _recorded = []
    try:
        run()
        specs = _recorded
    finally:
        _recorded = None
    unique: dict[tuple, AotSpec] = {}
    for s in specs:
        unique.setdefault(s.key(), s)
    return list(unique.values())


def aot_compile(spec: AotSpec, capability: int):
    """Compile one spec for CUDA compute capability `capability` (80, 90, ...) without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(spec.fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec.divisible}
    return triton.compile(
        ASTSource(spec.fn, spec.signature, spec.constexprs, attrs),
        target=GPUTarget("cuda", capability, 32),
        options=spec.options,
    )
