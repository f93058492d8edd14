"""Pure-PyTorch, differentiable implementations: the test oracle, the CPU fallback and the benchmark baseline."""

from .conv import (
    as_tuple,
    code_size,
    conv_analysis_ref,
    conv_synthesis_ref,
    lasso_objective_ref,
    lipschitz_constant_ref,
    lipschitz_power_iteration,
    lipschitz_power_iteration_scaled,
    soft_threshold_ref,
    synthesis_output_padding,
    value_dtype,
)
from .conv_ista import conv_ista_bwd_ref, conv_ista_fwd_ref, conv_ista_ref, fista_momentum

__all__ = [
    "as_tuple",
    "code_size",
    "conv_analysis_ref",
    "conv_synthesis_ref",
    "lasso_objective_ref",
    "lipschitz_constant_ref",
    "lipschitz_power_iteration",
    "lipschitz_power_iteration_scaled",
    "soft_threshold_ref",
    "synthesis_output_padding",
    "value_dtype",
    "conv_ista_bwd_ref",
    "conv_ista_fwd_ref",
    "conv_ista_ref",
    "fista_momentum",
]
