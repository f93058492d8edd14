"""Convergence experiments: each checks claims of docs/theory.md §7 through functional.conv_ista and returns a
ClaimResult (claim, theoretical value, measured value, holds, curves for the plots).

Every experiment takes (quick, backend, device, dtype); `quick` shrinks it to seconds. EXPERIMENTS lists them in
report order; an entry may return one ClaimResult or a list of them.
"""

from __future__ import annotations

from functools import partial

from .activations import activation_floors
from .common import ClaimResult
from .deep import layer_propagation, stability
from .enumeration import uniqueness
from .exactness import backend_agreement
from .ista import lasso_bias, objective_rates
from .lista import error_vs_depth, linear_convergence, noise_floor
from .three_layer import three_layer
from .transformer import transformer_blocks

EXPERIMENTS = {
    "uniqueness": uniqueness,
    "backend_agreement": backend_agreement,
    "linear_convergence_oracle": partial(linear_convergence, schedule="oracle"),
    "linear_convergence_geometric": partial(linear_convergence, schedule="geometric"),
    "noise_floor": noise_floor,
    "error_vs_depth": error_vs_depth,
    "layer_propagation": layer_propagation,
    "three_layer": three_layer,
    "stability": stability,
    "activation_floors": activation_floors,
    "lasso_bias": lasso_bias,
    "objective_rates": objective_rates,
    "transformer_blocks": transformer_blocks,
}

__all__ = [
    "EXPERIMENTS",
    "ClaimResult",
    "activation_floors",
    "backend_agreement",
    "error_vs_depth",
    "lasso_bias",
    "layer_propagation",
    "linear_convergence",
    "noise_floor",
    "objective_rates",
    "stability",
    "three_layer",
    "transformer_blocks",
    "uniqueness",
]
