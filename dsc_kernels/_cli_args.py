"""Checks the command lines share (``python -m dsc_kernels report`` and ``train``): each returns why a value cannot
be used, as an argparse message naming the option, or None; the caller reports it with ``parser.error`` before any
work starts."""

from __future__ import annotations

import os
from pathlib import Path

from . import _validate, functional
from .ops.selection import ENV_VAR


def device_problem(device: str) -> str | None:
    """Why ``--device`` cannot be used here (CUDA asked for where torch sees none), or None."""
    try:
        _validate.device("--device", device)
    except (TypeError, ValueError) as exc:
        return f"argument {exc}"
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
