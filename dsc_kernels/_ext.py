"""Builds and loads the C++ CPU extension (every ``csrc/**/*.cpp`` outside ``csrc/cuda``) just in time.

The sources register their ops with TORCH_LIBRARY_FRAGMENT, so loading the shared library is all it takes for
``torch.ops.dsc_kernels.*_cpp`` to exist. The build directory is keyed on the sources, the flags and the torch
version, under ``~/.cache/dsc_kernels`` (``DSC_KERNELS_CACHE`` overrides), so every process reuses one build.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
import threading
from pathlib import Path

import torch

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_LOCK = threading.Lock()
_error: str | None = None


def _sources() -> list[Path]:
    return sorted(p for p in _CSRC.rglob("*.cpp") if "cuda" not in p.relative_to(_CSRC).parts)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cflags() -> list[str]:
    # The build is cached per machine (the flags are part of the key), so the ISA the running CPU has is safe to
    # use; -march=native is avoided because a shared cache could meet a different CPU with the same flags line.
    flags = ["-O3", "-fopenmp", "-ffp-contract=fast"]
    cpu = _cpu_flags()
    if {"avx2", "fma"} <= cpu:
        flags += ["-mavx2", "-mfma"]
        if {"avx512f", "avx512vl", "avx512dq", "avx512bw"} <= cpu:
            flags += ["-mavx512f", "-mavx512vl", "-mavx512dq", "-mavx512bw"]
    return flags


def _build_dir(sources: list[Path], cflags: list[str]) -> Path:
    h = hashlib.sha256()
    for p in sources:
        h.update(str(p.relative_to(_CSRC)).encode())
        h.update(p.read_bytes())
    for header in sorted(_CSRC.rglob("*.h")):
        h.update(header.read_bytes())
    h.update(" ".join(cflags).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    root = Path(os.environ.get("DSC_KERNELS_CACHE", Path.home() / ".cache" / "dsc_kernels"))
    path = root / h.hexdigest()[:16]
    path.mkdir(parents=True, exist_ok=True)
    return path


def _first_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for marker in (": error:", "error:", "error"):
        for line in lines:
            if marker in line.lower():
                return line
    return lines[0] if lines else "unknown error"


@functools.cache
def load():
    """Build (once per source version) and load the extension; returns the ``torch.ops.dsc_kernels`` namespace.

    Raises RuntimeError naming the compiler's first error line and what to install when the build fails."""
    global _error
    from torch.utils import cpp_extension

    if _error is not None:  # a failed build is not retried within a process
        raise RuntimeError(_error)

    # ninja ships as a Python package in the venv; cpp_extension looks for the executable on PATH.
    bindir = os.path.dirname(sys.executable)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    sources = _sources()
    cflags = _cflags()
    with _LOCK:
        try:
            cpp_extension.load(
                name="dsc_kernels_cpu",
                sources=[str(p) for p in sources],
                extra_cflags=cflags,
                extra_ldflags=["-fopenmp"],
                build_directory=str(_build_dir(sources, cflags)),
                is_python_module=False,
                verbose=False,
            )
        except Exception as exc:  # a compiler failure surfaces as RuntimeError/CalledProcessError/OSError
            detail = str(exc)
            output = getattr(exc, "output", None)
            if isinstance(output, bytes):
                detail = output.decode(errors="replace") + "\n" + detail
            _error = (f"building the dsc_kernels C++ extension failed: {_first_error_line(detail)}. "
                      "It needs a C++17 compiler with OpenMP (e.g. `apt-get install g++` or `xcode-select --install` "
                      "plus `brew install libomp`) and ninja (`pip install ninja`).")
            raise RuntimeError(_error) from exc
    return torch.ops.dsc_kernels


@functools.cache
def available() -> bool:
    """Whether the extension builds and loads here (cached; never raises)."""
    try:
        load()
        return True
    except Exception as exc:  # noqa: BLE001 - availability must never raise
        global _error
        if _error is None:
            _error = f"loading the dsc_kernels C++ extension failed: {exc}"
        return False


def build_error() -> str | None:
    """The reason the extension is unavailable (after a failed ``load``/``available``), else None."""
    return _error
