"""Drop-in torch.nn layers; every forward goes through ``dsc_kernels.functional``."""

from ._projection import project_
from .attention import SparseAttention, SparseCodingTransformerBlock
from .deep import DeepSparseCoding2d
from .multilayer import MultiLayerSparseCoding2d
from .soft_threshold import SoftThreshold
from .sparse_coding import ConvSparseCoding1d, ConvSparseCoding2d

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
