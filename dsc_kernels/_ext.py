"""Builds and loads the C++ CPU extension (every ``csrc/**/*.cpp`` outside ``csrc/cuda``) just in time.

The sources register their ops with TORCH_LIBRARY_FRAGMENT, so loading the shared library is all it takes for
``torch.ops.dsc_kernels.*_cpp`` to exist. The C++ sources ship inside the installed package
(``dsc_kernels/csrc``, copied in by setup.py at build time); a source checkout uses the repository's ``csrc/``.

The build is keyed and done by content only: the sources are copied into a cache folder named by the hash of their
contents, the flags, the torch version and install folder and the Python version (``~/.cache/dsc_kernels``;
``DSC_KERNELS_CACHE`` overrides) and compiled there, so ninja's files hold no checkout's path and every checkout,
install and process with the same
sources reuses one build. The first build takes about a minute on two cores and says so once.

Builds of one cache folder are serialised by an advisory file lock (``build.flock``), which the system releases when
its holder dies. torch's own marker (the folder's ``lock`` file) is not: a build killed half-way (Ctrl-C during the
first minute) leaves it behind, and every later load would wait on it forever. Holding the advisory lock, a load
knows any such marker is stale and removes it. A finished build in a folder the process cannot write (a read-only
or another user's cache) is loaded as it stands, without torch's load, which would need to write its marker there.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from ._fork_safe import ForkSafeLock

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks, torch's marker alone
    fcntl = None

_PACKAGE = Path(__file__).resolve().parent
_CSRC = _PACKAGE / "csrc" if (_PACKAGE / "csrc").is_dir() else _PACKAGE.parent / "csrc"
# Fork-safe: a DataLoader worker forked while another thread of the parent was loading the extension (held for
# the whole load: tens of ms from the cache, a minute when building) inherited this lock held, and its first fused
# call waited forever.
_LOCK = ForkSafeLock()
_error: str | None = None
_log = logging.getLogger("dsc_kernels")


def _sources() -> list[Path]:
    """Every C++ file the extension is built from (headers included), relative to the csrc folder."""
    return sorted(
        p.relative_to(_CSRC)
        for p in _CSRC.rglob("*")
        if p.suffix in (".cpp", ".h") and "cuda" not in p.relative_to(_CSRC).parts
    )


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
    extra = os.environ.get("DSC_KERNELS_EXTRA_CFLAGS", "").split()  # e.g. the sanitizer build (make sanitize)
    cpu = _cpu_flags()
    if {"avx2", "fma"} <= cpu:
        flags += ["-mavx2", "-mfma"]
        if {"avx512f", "avx512vl", "avx512dq", "avx512bw"} <= cpu:
            flags += ["-mavx512f", "-mavx512vl", "-mavx512dq", "-mavx512bw"]
    return flags + extra


def _build_dir(sources: list[Path], cflags: list[str]) -> Path:
    """The cache folder for these sources and flags, holding a copy of the sources (written once)."""
    h = hashlib.sha256()
    for rel in sources:
        h.update(str(rel).encode())
        h.update((_CSRC / rel).read_bytes())
    h.update(" ".join(cflags).encode())
    h.update(torch.__version__.encode())
    h.update(str(Path(torch.__file__).parent).encode())  # build.ninja names torch's headers by path
    h.update(sys.version.encode())
    # empty is unset, as for DSC_KERNELS_BACKEND: Path("") built a minute-long extension into the current folder
    root = Path(os.environ.get("DSC_KERNELS_CACHE") or Path.home() / ".cache" / "dsc_kernels").expanduser()
    path = root / h.hexdigest()[:16]
    for rel in sources:
        target = path / "src" / rel
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(target.suffix + f".{os.getpid()}.tmp")
            shutil.copyfile(_CSRC / rel, tmp)
            os.replace(tmp, target)  # atomic: a concurrent process never compiles a half-written file
    return path


@contextlib.contextmanager
def _exclusive(build_dir: Path):
    """Hold build_dir's advisory build lock (waiting for a live build by another process), with no stale torch
    marker left in the folder."""
    if fcntl is None:
        yield
        return
    with open(build_dir / "build.flock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            marker = build_dir / "lock"
            if marker.exists():
                _log.warning("dsc_kernels: removing %s, left by a build that was interrupted", marker)
                marker.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _first_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # "not found" before the bare "error": without a compiler, torch's "Error building extension ...: [1/9] c++ ..."
    # line (a whole compile command) came first and the shell's "c++: not found" was never shown
    for marker in (": error:", "error:", "not found", "error"):
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

    # ninja ships as a Python package in the venv; cpp_extension looks for the executable on PATH. The package
    # knows where its executable went: a `pip install --user` puts it in ~/.local/bin, often not on PATH, and
    # "Ninja is required ... (pip install ninja to get it)" was all a user with ninja installed was told.
    bindirs = [os.path.dirname(sys.executable)]
    with contextlib.suppress(ImportError):
        import ninja

        bindirs.append(getattr(ninja, "BIN_DIR", ""))
    for bindir in filter(None, bindirs):
        if bindir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    with _LOCK:
        if _error is not None:  # another thread's build failed while this one waited: not retried either
            raise RuntimeError(_error)
        try:
            sources = _sources()
            if not sources:
                raise RuntimeError(f"no C++ sources found under {_CSRC}")
            cflags = _cflags()
            build_dir = _build_dir(sources, cflags)
            built = build_dir / "dsc_kernels_cpu.so"
            if built.is_file() and not os.access(build_dir, os.W_OK):
                # a finished build in a read-only cache (a prebuilt image, another user's folder): torch's load
                # would need to create its lock marker there, so the library is loaded as it stands
                torch.ops.load_library(str(built))
                return torch.ops.dsc_kernels
            if not any(build_dir.glob("*.so")):
                _log.warning(
                    "dsc_kernels: building the C++ extension (once for these sources, about a minute on "
                    "two cores); it is cached in %s",
                    build_dir,
                )
            with _exclusive(build_dir):
                cpp_extension.load(
                    name="dsc_kernels_cpu",
                    sources=[str(build_dir / "src" / rel) for rel in sources if rel.suffix == ".cpp"],
                    extra_cflags=cflags,
                    extra_ldflags=["-fopenmp"],
                    build_directory=str(build_dir),
                    is_python_module=False,
                    verbose=False,
                )
        except Exception as exc:  # a compiler failure surfaces as RuntimeError/CalledProcessError/OSError
            detail = str(exc)
            output = getattr(exc, "output", None)
            if isinstance(output, bytes):
                detail = output.decode(errors="replace") + "\n" + detail
            if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                # the cache, not the compiler: the advice below would mislead
                _error = (
                    f"building the dsc_kernels C++ extension failed: its cache folder is not writable ({exc}); "
                    "set DSC_KERNELS_CACHE to a writable folder"
                )
                raise RuntimeError(_error) from exc
            _error = (
                f"building the dsc_kernels C++ extension failed: {_first_error_line(detail)}. "
                "It needs a C++17 compiler with OpenMP (e.g. `apt-get install g++` or `xcode-select --install` "
                "plus `brew install libomp`) and ninja (`pip install ninja`)."
            )
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
