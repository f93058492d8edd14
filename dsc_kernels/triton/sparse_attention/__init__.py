"""Flash-style Triton kernels for sparse attention (backend "triton"): the N x M score matrix never exists.

One job per module:
  tiles.py      the @triton.jit helpers the kernels inline (score tiles, row flags, the sparsemax threshold's
                sweeps over the keys and its candidate slots)
  kernels.py    the kernels (forward; backward dq, then dk and dv) and the math they compute
  checks.py     the input checks, done before any launch
  launchers.py  the launches: tile configuration, candidate slots, strides, the forward and the backward
  aot.py        the launches recorded for ahead-of-time compilation
"""

from .aot import KERNELS, aot_specializations
from .launchers import sparse_attention_bwd, sparse_attention_fwd

__all__ = ["sparse_attention_fwd", "sparse_attention_bwd", "KERNELS", "aot_specializations"]
