"""Projected gradient descent for the layers' constrained parameters.

Some learned values have a valid set: ``lam >= 0``, a signed soft threshold ``>= 0`` (a published bias, its
negative, ``<= 0``), ``step > 0``. The layers never
clamp them in the forward (that would silently change outputs and hide the value actually used); the forward uses the
stored value and ``functional`` rejects an invalid one. Instead every layer that owns such a parameter registers here,
and after each ``torch.optim`` optimiser step the parameters of that optimiser are projected onto their sets in
place (``p = min(max(p, lower), upper)``) — projected gradient descent. The stored value, the state dict and the
forward therefore always agree. Loops that update parameters without ``torch.optim`` call ``project_(module)``
themselves.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

_LAYERS: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_hook_handle = None


def register(module: nn.Module) -> None:
    """Project ``module.constraints()`` after every optimiser step that updates them."""
    global _hook_handle
    _LAYERS.add(module)
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_post_hook(_after_optimizer_step)


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for layer in list(_LAYERS):
        for param, lower, upper in layer.constraints():
            if id(param) in stepped:
                _project(param, lower, upper)


@torch.no_grad()
def _project(param: torch.Tensor, lower: float | None, upper: float | None) -> None:
    param.clamp_(min=lower, max=upper)


def project_(module: nn.Module) -> nn.Module:
    """Project every constrained parameter of ``module`` and its submodules onto its valid set, in place."""
    for layer in module.modules():
        if layer in _LAYERS:
            for param, lower, upper in layer.constraints():
                _project(param, lower, upper)
    return module


class Projected(nn.Module):
    """Base of modules with constrained parameters: ``constraints()`` lists (parameter, lower, upper) bounds, None
    for an open side."""

    def constraints(self) -> list[tuple[torch.Tensor, float | None, float | None]]:
        return []

    def register_projection(self) -> None:
        """Call once the parameters exist; copies (deepcopy, pickle) register themselves again."""
        if self.constraints():
            register(self)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self.register_projection()
