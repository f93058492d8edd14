"""Registers the fused Triton conv-ISTA kernels as backend "triton" (torch.library.triton_op + wrap_triton, so
torch.compile traces into the launchers). Imported lazily by dsc_kernels.ops.conv_ista.get_backend."""
from ..triton.conv_ista import conv_ista_bwd, conv_ista_fwd
from .conv_ista import register_conv_ista_backend

register_conv_ista_backend("triton", conv_ista_fwd, conv_ista_bwd, kind="triton_op")
