"""One-axis launch grids. CUDA caps a grid's second and third axes at 65535 and its first at 2**31 - 1: a batch (or
batch x heads) on the second axis failed every launch past 65535, so the kernels take (block, outer index) from the
first axis, blocks fastest (the order a 2-D grid ran them in)."""

from __future__ import annotations

import triton
import triton.language as tl

# CUDA's cap on a grid's second and third axes.
MAX_GRID_YZ = 65535


@triton.jit
def block_and_index(n, BLOCK: tl.constexpr):
    """(block of n positions, outer index) of this program, on a grid of cdiv(n, BLOCK) * outer programs."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(n, BLOCK)
    return pid % blocks, pid // blocks
