"""Registers the fused C++ CPU conv-ISTA kernels (csrc/cpu/conv_ista.cpp) as backend "cpp".

The schemas and CPU kernels come from the extension's TORCH_LIBRARY_FRAGMENT; this adds the fakes and the autograd
link. Importing it builds the extension (or raises with the compiler's first error line).
"""
from .. import _ext
from .conv_ista import register_conv_ista_backend

_ext.load()
register_conv_ista_backend("cpp", kind="native")
