"""The kernels' configurations, keyed on channel counts and kernel size, never on H/W (so a new image size never
changes code); the precision their dots run at (TF32 or IEEE) and the memory layouts the launchers hand them:
dictionaries rounded to TF32 and in tap-major order, signals and codes channels last (kernels.py's header).
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from ..._precision import conv_tf32_allowed
from ..launch import interpreting


class FwdConfig(NamedTuple):
    TH: int  # code rows per program
    TW: int  # code columns per program
    R_CHUNK: int  # halo positions per residual GEMM tile
    BLOCK_C: int  # code channels per analysis GEMM tile (N)
    BLOCK_CI: int  # signal channels per synthesis GEMM tile (N)
    BLOCK_K: int  # reduction slice (channel x tap) of both GEMMs
    num_warps: int
    num_stages: int


class ConvConfig(NamedTuple):
    BLOCK_P: int  # positions per program (M of synthesis/analysis, K of the weight gradient)
    BLOCK_C: int
    BLOCK_CI: int
    BLOCK_K: int
    max_splits: int  # weight gradient: programs sharing one weight block, each writing its own partial
    num_warps: int
    num_stages: int


def _pow2_block(n: int, lo: int, hi: int) -> int:
    # tl.dot needs every dimension >= 16; channel counts below that are padded with masked lanes.
    return max(lo, min(hi, triton.next_power_of_2(n)))


def fwd_config(C_sig: int, C_code: int, kh: int, kw: int) -> FwdConfig:
    if interpreting():
        # The interpreter pays per program and per op, not per element: few large tiles. Test shapes taller than
        # 8 rows still span several tiles, which exercises the halo logic.
        return FwdConfig(1 if kh == 1 else 8, 64 if kh == 1 else 16, 256, 16, 16, 64, 4, 1)
    # Chosen from sm_80/sm_90 AOT compiles (cuobjdump -res-usage of the cubins): the largest tiles that spill no
    # registers on either at the workloads' channel counts (the 16-channel tiles of few-channel problems, fp32 IEEE
    # FISTA, keep a 32-byte stack frame on sm_80: a small spill, left as is). The gathered im2col tiles carry 2-D
    # index arithmetic and a third pipeline stage of them does not fit, hence num_stages=2. A 16x16 tile would cut
    # the 7x7 halo overhead of the synthesis from 14x22/8x16 = 2.4x to 1.9x but spills. On an H200 the fused forward
    # ran at 0.14-0.22x eager cuDNN with this configuration (bench/results/gpu-check-h200-2026-12-04*);
    # bench/gpu_tune.py times the alternatives.
    block_c = _pow2_block(C_code, 16, 64)
    block_ci = _pow2_block(C_sig, 16, 32)
    if kh == 1:  # 1-D problems (H = 1 after reshaping) and other single-row kernels: a row tile.
        return FwdConfig(1, 128, 64, block_c, block_ci, 32, 8, 2)
    return FwdConfig(8, 16, 64, block_c, block_ci, 16, 8, 2)


def conv_config(C_sig: int, C_code: int, kh: int, kw: int) -> ConvConfig:
    """The per-convolution kernels' tiles: the backward and the two-pass forward."""
    if interpreting():
        return ConvConfig(256, 16, 16, 64, 2, 4, 1)
    # From the sm_80/sm_90 AOT compiles (SASS loop sizes, registers, shared memory; kernels.py's header): channel
    # tiles up to 128 and 64-channel reduction slices give the most MACs per issued instruction (two-pass loops on
    # deep-layer: 152 and 275; weight gradient: 117) without spills. Two pipeline stages keep every kernel within
    # an A100's shared memory (the weight gradient needs 224 KiB with three). The 64-channel slice only where
    # both sides have 64 channels: fewer would run masked lanes, and the flattened weight gradient spills with it.
    block_k = 64 if min(C_sig, C_code) >= 64 else 32
    return ConvConfig(128, _pow2_block(C_code, 16, 128), _pow2_block(C_sig, 16, 128), block_k, 512, 8, 2)


def _in_prec(dtype: torch.dtype) -> str:
    # Half inputs are exact in tf32, so tensor cores lose nothing on them (the fp32 residual and momentum formed
    # inside are rounded by _tf32); fp32 follows torch's cuDNN TF32 switch, the precision the eager convolutions we
    # replace run at. Compiled kernels round with the hardware conversion, the interpreter (no inline PTX) with
    # bit arithmetic (_tf32).
    if dtype == torch.float32 and not conv_tf32_allowed():  # cuDNN's switch, or a backward's forward's (_precision)
        return "ieee"
    return "tf32" if interpreting() else "tf32-rna"


def round_to_tf32(t: Tensor) -> Tensor:
    """An fp32 tensor rounded to TF32 on the host, the bits `_tf32` gives in a kernel (to nearest, ties away from
    zero; NaN kept)."""
    bits = (t.contiguous().view(torch.int32) + 0x1000) & -8192
    return torch.where(t.isnan(), t, bits.view(torch.float32))


def _dot_weights(weight: Tensor, encoder_weight: Tensor) -> tuple[Tensor, Tensor]:
    """The dictionaries as the convolution dots read them: fp32 ones rounded to TF32 when the dots run in TF32;
    half ones are exact in TF32 as they are."""
    if weight.dtype != torch.float32 or _in_prec(weight.dtype) == "ieee":
        return weight, encoder_weight
    w = round_to_tf32(weight)
    return w, (w if encoder_weight is weight else round_to_tf32(encoder_weight))


def _synth_weight(w: Tensor, tap_major: bool) -> Tensor:
    """The synthesis dots' layout of a dictionary (C_code, C_sig, kh, kw): tap-major (kh, kw, C_code, C_sig)."""
    return w.permute(2, 3, 0, 1).contiguous() if tap_major else w


def _analysis_weight(w: Tensor, tap_major: bool) -> Tensor:
    """The analysis dots' layout of a dictionary (C_code, C_sig, kh, kw): tap-major (kh, kw, C_sig, C_code)."""
    return w.permute(2, 3, 1, 0).contiguous() if tap_major else w


def _nhwc(t: Tensor) -> Tensor:
    """t: (B, C, H, W) in the kernels' memory layout, channels last ((B, H, W, C) contiguous), so that a gathered
    tile's channels are contiguous: itself when it already is, else a copy. The shape stays (B, C, H, W)."""
    if t.permute(0, 2, 3, 1).is_contiguous():
        return t
    return t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def _empty_nhwc(shape: Sequence[int], **kwargs) -> Tensor:
    """An uninitialised (B, C, H, W) tensor in the kernels' channels-last layout; with a leading ring dimension,
    (ring, B, C, H, W) stored as (ring, B, H, W, C)."""
    *lead, c, h, w = shape
    order = list(range(len(lead))) + [len(lead) + 2, len(lead), len(lead) + 1]
    return torch.empty((*lead, h, w, c), **kwargs).permute(*order)
