"""Warnings attributed to the user's code: the first frame outside this package and torch (what Python 3.12's
``warnings.warn(skip_file_prefixes=...)`` does). A fixed ``stacklevel`` pointed at our own files when one entry point
calls another (``deep_conv_ista`` -> ``conv_ista``) and at torch's ``Module.__call__`` for a layer's forward."""

from __future__ import annotations

import os
import sys
import warnings

import torch

_INTERNAL = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    frame, level = sys._getframe(1), 2  # stacklevel 2 is warn's caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
