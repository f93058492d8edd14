"""Fused Triton kernels for convolutional ISTA / FISTA (backend "triton"). 2-D only: 1-D arrives as H = 1.

One job per module; the math each computes opens it:
  tiles.py       the @triton.jit tile helpers every kernel inlines (implicit-GEMM synthesis and analysis tiles,
                 TF32 rounding, momentum and shrink)
  kernels.py     the kernels: the fused tile forward (per iteration or all in one launch), the synthesis and
                 analysis convolutions with their epilogues, the weight gradient
  config.py      the kernels' tile configurations, operand precision and memory layouts
  strategies.py  which forward strategy a problem runs (`strategy` pins one)
  checks.py      the input checks, done before any launch
  forward.py     the recurrence and its forward (conv_ista_fwd, max_batch_items), also replayed by the backward
  backward.py    its VJP (conv_ista_bwd)
  aot.py         the launches recorded for ahead-of-time compilation

Launchers only use torch ops and `launch(...)` (`torch.library.wrap_triton`, recordable for AOT compilation: see
triton/launch.py), so they can run inside a `torch.library.triton_op` and torch.compile can trace through them.
`aot_specializations` records the launches the launchers really make on a problem (meta tensors, no GPU).
"""

from .aot import KERNELS, aot_specializations
from .backward import conv_ista_bwd
from .config import fwd_config, round_to_tf32
from .forward import conv_ista_fwd, max_batch_items, saved_iterates
from .strategies import forward_strategy, strategy

__all__ = [
    "conv_ista_fwd",
    "conv_ista_bwd",
    "saved_iterates",
    "forward_strategy",
    "strategy",
    "KERNELS",
    "aot_specializations",
    "fwd_config",
    "max_batch_items",
    "round_to_tf32",
]
