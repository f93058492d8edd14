"""Drop-in torch.nn layers; every forward goes through ``dsc_kernels.functional``."""

from ._projection import project_
from .attention import SparseAttention, SparseCodingTransformerBlock
from .multilayer import MultiLayerSparseCoding2d
from .sparse_coding import ConvSparseCoding1d, ConvSparseCoding2d, DeepSparseCoding2d, SoftThreshold

__all__ = [
    "SoftThreshold",
    "ConvSparseCoding1d",
    "ConvSparseCoding2d",
    "DeepSparseCoding2d",
    "MultiLayerSparseCoding2d",
    "SparseAttention",
    "SparseCodingTransformerBlock",
    "project_",
]
