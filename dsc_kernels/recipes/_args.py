"""Argument checks the recipes share: each raises ``TypeError`` (wrong type) or ``ValueError`` (wrong value) naming
the argument, before any data is loaded or any model is trained."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .. import _cli_args as cli_args
from .. import _validate as check
from .. import functional
from . import engine

# torch takes any 64-bit seed, but the digits split (numpy, through scikit-learn's train_test_split) only
# 0 <= seed < 2**32 and the denoise recipe seeds its test noise with seed + 1000: the narrower range, so that one
# seed means the same thing in every recipe.
SEED_RANGE = (0, 2**32 - 1)


def seed(value: object) -> int:
    value = check.count("seed", value, SEED_RANGE[0])
    if value > SEED_RANGE[1]:
        raise ValueError(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {value}")
    return value


def one_of(name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def subset(value: object, available: int) -> int | None:
    """None (everything) or how many of the ``available`` training samples to use: a slice ``[:subset]`` would take
    a negative one as "all but the last", and silently cap one that is too large."""
    if value is None:
        return None
    value = check.count("subset", value, 1)
    if value > available:
        raise ValueError(f"subset must be at most the {available} training samples there are, got {value}")
    return value


def path(name: str, value: object) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or a path, got {value!r}")
    return Path(value)


def train_arguments(
    strategy: object,
    strategies: Sequence[str],
    epochs: object,
    seed_value: object,
    out: object,
    backend: object,
    run: object,
) -> tuple[str, int, int, Path | None, str]:
    """The arguments every recipe's ``train`` takes, checked (and out and backend normalised) before training: a
    bad ``out`` or ``backend`` used to surface only after the last epoch, or to be recorded in metrics.json unused."""
    strategy = one_of("strategy", strategy, strategies)
    epochs = check.count("epochs", epochs, 1)
    seed_value = seed(seed_value)
    if not isinstance(run, engine.Run):
        raise TypeError(f"run must be an engine.Run (see engine.start), got {run!r}")
    if out is not None:
        out = path("out", out)
        if (problem := cli_args.out_folder_problem(out)) is not None:
            raise ValueError(f"out: {problem}")
    backend = functional.check_backend(backend)
    _, problem = cli_args.backend_problem(backend, run.device.type)
    if problem is not None:
        raise ValueError(problem.replace("argument --backend: ", "backend: ", 1))
    return strategy, epochs, seed_value, out, backend
