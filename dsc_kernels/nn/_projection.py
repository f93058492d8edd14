"""Projected gradient descent for the layers' constrained parameters.

Some learned values have a valid set: ``lam >= 0``, a signed soft threshold ``>= 0`` (a published bias, its
negative, ``<= 0``), ``step > 0``. The layers never
clamp them in the forward (that would silently change outputs and hide the value actually used); the forward uses the
stored value and ``functional`` rejects an invalid one. Instead every layer that owns such a parameter registers here,
and after each ``torch.optim`` optimiser step the parameters of that optimiser are projected onto their sets in
place (``p = min(max(p, lower), upper)``) — projected gradient descent. The stored value, the state dict and the
forward therefore always agree. Optimisers that evaluate a closure at trial points inside one step (``LBFGS``
and its line search) would otherwise run the forward on unprojected values and stop on its ``ValueError``, so a
step's closure is wrapped to project those parameters before each evaluation. Loops that update parameters without
``torch.optim`` call ``project_(module)`` themselves.
"""

from __future__ import annotations

import copy
import math
import weakref

import torch
from torch import nn
from torch.nn.utils import prune
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .._fork_safe import ForkSafeLock

_LAYERS: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_hook_handles: tuple | None = None
# Guards _LAYERS' additions and the snapshots the hooks iterate: a layer built (or deep-copied) on one thread while
# another ran optimizer.step() changed the set during that iteration, and the step raised "Set changed size during
# iteration" (within 10 steps next to a thread building layers).
_LOCK = ForkSafeLock()


def _layers() -> list[nn.Module]:
    with _LOCK:
        return list(_LAYERS)


def register(module: nn.Module) -> None:
    """Project ``module.constraints()`` after every optimiser step that updates them (and before each closure
    evaluation inside one), then call ``module.after_optimizer_step``."""
    global _hook_handles
    with _LOCK:
        _LAYERS.add(module)
        if _hook_handles is None:
            _hook_handles = (
                register_optimizer_step_pre_hook(_wrap_closure),
                register_optimizer_step_post_hook(_after_optimizer_step),
            )


def _stepped(optimizer: torch.optim.Optimizer) -> set[int]:
    """The ids of the parameters ``optimizer`` updates."""
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def _project_parameters(stepped: set[int]) -> None:
    for layer in _layers():
        for param, lower, upper in layer.constraints():
            if id(param) in stepped:
                _project(param, lower, upper)


def _wrap_closure(optimizer: torch.optim.Optimizer, args, kwargs):
    # args are step()'s own: (optimizer, closure?) — torch passes self along.
    closure = args[1] if len(args) > 1 else kwargs.get("closure")
    if closure is None:
        return None

    def projected_closure():
        _project_parameters(_stepped(optimizer))
        return closure()

    if len(args) > 1:
        return (args[0], projected_closure, *args[2:]), kwargs
    return args, {**kwargs, "closure": projected_closure}


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    stepped = _stepped(optimizer)
    _project_parameters(stepped)
    for layer in _layers():
        layer.after_optimizer_step(stepped)


@torch.no_grad()
def _project(param: torch.Tensor, lower: float | None, upper: float | None) -> None:
    if lower is not None and lower > 0 and param.is_floating_point():
        # A positive floor rounds to 0 in float16 below ~3e-8 (a learned step of 1e-5 has floor 1e-8), and the
        # projection stored step 0, which the next forward refuses: the smallest value at or above it in that dtype.
        # on the CPU, whatever torch.set_default_device says: a host number (on "meta", a step inside
        # ``with torch.device("meta")`` raised "Tensor.item() cannot be called on meta tensors"; on a GPU, a sync)
        bound = torch.tensor(lower, dtype=param.dtype, device="cpu")
        if float(bound) < lower:
            bound = torch.nextafter(bound, torch.tensor(math.inf, dtype=param.dtype, device="cpu"))
        lower = float(bound)
    param.clamp_(min=lower, max=upper)


def project_(module: nn.Module) -> nn.Module:
    """Project every constrained parameter of ``module`` and its submodules onto its valid set, in place."""
    for layer in module.modules():
        if layer in _LAYERS:
            for param, lower, upper in layer.constraints():
                _project(param, lower, upper)
    return module


def stored_parameter(module: nn.Module, name: str) -> nn.Parameter | None:
    """The parameter an optimiser updates for ``module``'s value ``name``: ``name`` itself, or for one pruned by
    ``torch.nn.utils.prune`` (whose ``name`` is then the plain tensor ``name_orig * name_mask``, recomputed before
    each forward) ``name_orig``. Projecting ``name_orig`` onto a set that holds 0 keeps the product in it. None for
    a value that is no parameter (a buffer, or a ``parametrize``-d one, whose parametrization defines its own set:
    its original is not projected). Without this a pruned learned lam or threshold was never projected, and the
    forward after an optimiser step that moved it below 0 refused it (ValueError)."""
    param = module._parameters.get(name)
    if param is not None:
        return param
    return module._parameters.get(name + "_orig") if pruning(module, name) is not None else None


def pruning_methods(module: nn.Module) -> list[prune.BasePruningMethod]:
    """The ``torch.nn.utils.prune`` methods (or containers) applied to ``module``'s values: its pruning pre-hooks."""
    return [hook for hook in module._forward_pre_hooks.values() if isinstance(hook, prune.BasePruningMethod)]


def pruning(module: nn.Module, name: str) -> prune.BasePruningMethod | None:
    """The ``torch.nn.utils.prune`` method (or container) applied to ``module``'s ``name``, or None when unpruned."""
    return next((hook for hook in pruning_methods(module) if hook._tensor_name == name), None)


class Projected(nn.Module):
    """Base of modules with constrained parameters: ``constraints()`` lists (parameter, lower, upper) bounds, None
    for an open side. A module that must also hear of optimiser steps (``needs_step_notice``) gets
    ``after_optimizer_step`` called after each."""

    needs_step_notice = False

    def constraints(self) -> list[tuple[torch.Tensor, float | None, float | None]]:
        return []

    def after_optimizer_step(self, stepped: set[int]) -> None:
        """After a ``torch.optim`` step, its constrained parameters projected: ``stepped`` holds the ids of the
        parameters it updated."""

    def register_projection(self) -> None:
        """Call once the parameters exist; copies (deepcopy, pickle) register themselves again."""
        if self.constraints() or self.needs_step_notice:
            register(self)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self.register_projection()

    def _state_to_copy(self) -> dict:
        """What a copy (deepcopy, pickle) starts from."""
        return self.__dict__.copy()

    def __deepcopy__(self, memo):
        # Defined here so that copies always go through __setstate__ (and register): torch.nn.utils.parametrize
        # gives a parametrized module whose class has no __deepcopy__ one that copies __dict__ directly.
        replica = type(self).__new__(type(self))
        memo[id(self)] = replica
        replica.__setstate__(copy.deepcopy(self._state_to_copy(), memo))
        return replica
