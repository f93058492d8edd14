"""torch.library registrations and the backend table: the only place op names appear (docs/design.md).

``table`` lists every (op family, backend) row; ``selection`` picks the row a call runs on; ``conv_ista`` and
``sparse_attention`` hold each family's schema, fakes and autograd and run a row; ``registry`` registers a row's
ops on first use.
"""

from . import table
from .registry import OpPair, in_float32_under_autocast
from .selection import FAMILY_MODULES, available, backend_name, select, unavailable_reason


def op_pair(family: str, backend: str) -> OpPair:
    """The registered (forward, backward) ops of ``backend`` in op family ``family``."""
    table.rows(family)  # a clear error for an unknown family
    return FAMILY_MODULES[family].op_pair(backend)


__all__ = [
    "table",
    "OpPair",
    "in_float32_under_autocast",
    "available",
    "backend_name",
    "select",
    "unavailable_reason",
    "op_pair",
]
