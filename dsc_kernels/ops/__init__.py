"""torch.library op registrations: the only place op-name strings appear (DESIGN.md §4)."""
from .conv_ista import conv_ista_op, get_backend

__all__ = ["conv_ista_op", "get_backend"]
