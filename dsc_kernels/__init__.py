"""dsc_kernels: fused kernels, layers and benchmarks for deep sparse coding in PyTorch.

``import dsc_kernels.functional as DF`` for the functional API, ``dsc_kernels.nn`` for layers.
"""

from . import functional, nn, ops, reference

__version__ = "0.1.0"
__all__ = ["functional", "nn", "ops", "reference", "__version__"]
