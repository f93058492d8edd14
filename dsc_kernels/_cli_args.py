"""Checks the command lines share (``python -m dsc_kernels report`` and ``train``, ``python -m
dsc_kernels.dictionary_learning``, the sweep): each returns why a value cannot be used, as an argparse message naming
the option, or None; the caller reports it with ``parser.error`` before any work starts."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from . import _validate, functional
from .ops.selection import ENV_VAR


def packages_problem(option: str, what: str, modules: dict[str, str]) -> str | None:
    """Why ``what`` cannot run here: the pip names of the ``modules`` ({import name: pip name}) that are not
    installed, as an argparse message naming ``option``; None when all are. Looked up without importing them."""
    missing = []
    for module, package in modules.items():
        try:
            found = sys.modules.get(module, True) is not None and importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(package)
    if not missing:
        return None
    return f"argument {option}: {what} needs {', '.join(missing)}: pip install 'dsc_kernels[train]'"


def int_problem(option: str, value: object, low: int, high: int | None = None) -> str | None:
    """Why ``value`` is not an int in [low, high] (an argparse message naming ``option``), or None when it is."""
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        return f"argument {option}: must be an integer {bound}, got {value!r}"
    return None


def int_type(option: str, low: int, high: int | None = None):
    """An argparse ``type=`` for integers in [low, high]: a bad value is reported with the option's name."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = text  # not an integer at all ("nan", "1.5", "ten"): the same message as an out-of-range one
        problem = int_problem(option, value, low, high)
        if problem is not None:
            # argparse prefixes "argument OPTION: " itself
            raise argparse.ArgumentTypeError(problem.removeprefix(f"argument {option}: "))
        return value

    parse.__name__ = option.lstrip("-")  # what argparse names in its fallback messages
    return parse


# torch.set_num_threads takes a C int, and OpenMP starts that many threads at the first parallel region: 2**31 - 1
# aborted the process in libgomp (out of memory), 100000 segfaulted it, 2**31 raised a bare ValueError (a traceback).
# No machine gains from more threads than this; they only wait for a core.
MAX_THREADS = 1024

THREADS_HELP = (
    f"torch CPU threads, 1..{MAX_THREADS} (default: torch's own, one per core); the timings in docs/training.md are "
    "1 thread, which is also faster when another job shares the cores (OpenMP's threads wait for a busy core)"
)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int_type("--threads", 1, MAX_THREADS), default=None, help=THREADS_HELP)


def threads_problem(threads: object) -> str | None:
    """Why a --threads value cannot be used (a Namespace built in Python skipped argparse's type check), or None;
    None stands for torch's default."""
    return None if threads is None else int_problem("--threads", threads, 1, MAX_THREADS)


def set_threads(threads: int | None) -> None:
    """torch.set_num_threads for an accepted --threads value; None leaves torch's default."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def device_problem(device: str) -> str | None:
    """Why ``--device`` cannot be used here (CUDA asked for where torch sees none), or None."""
    try:
        _validate.device("--device", device)
    except (TypeError, ValueError) as exc:  # "--device 'cuda' requested but ...": argparse's "OPTION: why" form
        return f"argument --device: {str(exc).removeprefix('--device ')}"
    return None


def out_folder_problem(path: Path) -> str | None:
    """Why ``path`` cannot be an output folder (it must exist as a folder or be creatable), or None when it can.
    Checked without creating anything, so a run rejected later on another argument leaves no empty folder."""
    absolute = path.absolute()
    if absolute.exists():
        if not absolute.is_dir():
            return f"{path} exists and is not a folder"
        if not os.access(absolute, os.W_OK | os.X_OK):
            return f"{path} is a folder this user cannot write to"
        return None
    for ancestor in absolute.parents:  # mkdir(parents=True) creates up to the nearest existing ancestor
        if not ancestor.exists():
            continue
        if not ancestor.is_dir():
            return f"cannot create {path}: {ancestor} is a file, not a folder"
        if not os.access(ancestor, os.W_OK | os.X_OK):
            return f"cannot create {path}: this user cannot write to {ancestor}"
        return None
    return None


def _write_problem(folder: Path) -> str | None:
    """Why no file can be written in the existing ``folder``, or None. Found by writing one (removed at once):
    os.access answers yes to root everywhere, also on a read-only mount or in /proc."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"cannot write a file in {folder}: {exc.strerror or exc}"
    return None


def create_folders_problem(paths: Iterable[Path]) -> str | None:
    """Create each output folder (parents too) and check a file can be written in it; why one cannot be, or None.
    Callers run this once every other argument is accepted, so a rejected run leaves no empty folder behind."""
    for path in paths:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"cannot create {path}: {exc.strerror or exc}"
        if (problem := _write_problem(path)) is not None:
            return problem
    return None


def figure_path(out: str) -> tuple[Path, str | None]:
    """The file matplotlib's ``savefig(out)`` writes (it appends .png to a name without a suffix), and why it cannot
    (an argparse message naming --out), or None. Checked before the work whose figure it is."""
    from matplotlib.backend_bases import FigureCanvasBase

    given = Path(out)
    if os.path.basename(out) in ("", ".", ".."):  # "", ".", "dir/", "dir/.": a folder, and Path would drop the slash
        return (
            given,
            f"argument --out: {out!r} names a folder, not a file; --out is the figure's file path "
            f"(e.g. {given / 'figure.png'})",
        )
    suffix = os.path.splitext(out)[1][1:]  # what savefig reads the format from
    default = FigureCanvasBase.get_default_filetype()
    path = given if suffix else given.with_name(given.name.rstrip(".") + "." + default)
    formats = FigureCanvasBase.get_supported_filetypes()
    if given.is_dir() or path.is_dir():
        return path, f"argument --out: {out} is a folder; --out is the figure's file path (e.g. {given / 'figure.png'})"
    if suffix and suffix.lower() not in formats:
        return path, f"argument --out: matplotlib cannot write .{suffix} files; use one of {', '.join(sorted(formats))}"
    folder = path.absolute().parent
    if not folder.is_dir():
        return path, f"argument --out: the folder {path.parent} does not exist"
    if path.exists() and not os.access(path, os.W_OK):
        return path, f"argument --out: {path} exists and this user cannot overwrite it"
    problem = _write_problem(folder)
    return path, None if problem is None else f"argument --out: {problem}"


def backend_problem(backend: object, device: str) -> tuple[str, str | None]:
    """``backend`` normalised, and why it cannot run on ``device`` here (None when it can). ``auto`` is checked
    through ENV_VAR when that is set, since an explicit backend named there raises instead of falling back."""
    try:
        name = functional.check_backend(backend)
    except (TypeError, ValueError) as exc:
        return str(backend), f"argument --backend: {exc}"
    effective, via = name, ""
    env = os.environ.get(ENV_VAR, "").strip()
    if name == "auto" and env:
        try:
            effective = functional.check_backend(env)
        except ValueError as exc:
            return name, f"argument --backend: auto follows {ENV_VAR}={env!r}, which is not a backend: {exc}"
        via = f" (--backend auto follows {ENV_VAR}={env!r})"
    if effective == "auto":  # auto falls back to the reference, which always runs
        return name, None
    reason = functional.backend_unavailable_reason(effective, device)
    if reason is not None:
        return name, f"argument --backend: {effective} cannot run on {device} here{via}: {reason}"
    return name, None
