"""Validation and canonical form of sparse-attention arguments for ``functional``: shapes, mode, threshold, scale
and the masks, turned into the one additive score ``bias`` every backend takes.

Masks follow ``nn.MultiheadAttention``'s convention (note: SDPA's boolean ``attn_mask`` means the opposite):
a bool mask is True where a key is ignored; a float mask is added to the scores, ``-inf`` ignoring a key.
``key_padding_mask`` is (B, M); ``attn_mask`` is broadcastable to (B, H, N, M) (e.g. (N, M)). Both may be given
(they add up). A float mask that requires grad (a learned score bias) is differentiated, as in MHA; only the
reference backend gives that gradient (table.SPARSE_ATTENTION_VARIANTS), so ``auto`` then picks it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _validate as check
from .reference.attention import MODES, stats_dtype

__all__ = ["attention_inputs", "check_masks", "score_bias", "MAX_FUSED_HEAD_DIM"]

# The widest head (d or d_v) the Triton kernels take: their tiles are (rows, next_power_of_2(d)), held in shared
# memory, and from 1024 columns on even the smallest tiles need more than a block gets on an H100/H200 (fp16, d = 1024:
# 256 KiB forward, 320 KiB dq backward, against 227 KiB; sm_90 AOT compiles), so the launch failed. Up to 512 every
# kernel compiles within an A100's 163 KiB (fp32 and fp16). A wider head is the "wide_head" variant (ops/table.py),
# which ``auto`` runs on the reference and an explicit backend='triton' refuses; the Triton launcher checks it too.
MAX_FUSED_HEAD_DIM = 512


def _check_mask(name: str, mask: object, like: Tensor) -> None:
    """A mask's type, dtype and device (like: a tensor on the scores' device)."""
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor (bool: True ignores a key; float: added to the scores), got "
            f"{type(mask).__name__}"
        )
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    check.same_device(q=like, **{name: mask})


def check_masks(like: Tensor, shape: tuple[int, int, int, int], key_padding_mask: object, attn_mask: object) -> None:
    """Check the masks of scores of shape (B, H, N, M) on like's device, without reading or converting them:
    key_padding_mask (B, M), attn_mask broadcastable to (B, H, N, M); types, dtypes, device."""
    b, h, n, m = shape
    if key_padding_mask is not None:
        _check_mask("key_padding_mask", key_padding_mask, like)
        if tuple(key_padding_mask.shape) != (b, m):
            raise ValueError(f"key_padding_mask must be (B, M)=({b}, {m}), got {tuple(key_padding_mask.shape)}")
    if attn_mask is not None:
        _check_mask("attn_mask", attn_mask, like)
        if attn_mask.dim() > 4 or any(have not in (1, want) for have, want in zip(attn_mask.shape[::-1], (m, n, h, b))):
            raise ValueError(
                f"attn_mask must be broadcastable to (B, H, N, M)=({b}, {h}, {n}, {m}), got {tuple(attn_mask.shape)}"
            )


def _mask(name: str, mask: Tensor, q: Tensor) -> Tensor:
    """A checked mask as an additive score bias in the compute dtype."""
    cd = stats_dtype(q.dtype)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=cd, device=mask.device).masked_fill(mask, -torch.inf)
    # A finite float64 entry beyond the compute dtype's range would become +-inf there: a key silently hidden, or a
    # row whose mass all goes to that key.
    check.fits_dtype(name, mask, cd, infinite_ok=True)
    return mask.to(cd)


def score_bias(q: Tensor, m: int, key_padding_mask: Tensor | None, attn_mask: Tensor | None) -> Tensor | None:
    """The additive score bias (B, H, N, M) of the masks (an expanded view: no N x M copy of a key padding mask),
    or None. q: (B, H, N, d); m: the number of keys."""
    b, h, n, _ = q.shape
    check_masks(q, (b, h, n, m), key_padding_mask, attn_mask)
    bias = None
    if key_padding_mask is not None:
        bias = _mask("key_padding_mask", key_padding_mask, q)[:, None, None, :]
    if attn_mask is not None:
        mask = _mask("attn_mask", attn_mask, q)
        bias = mask if bias is None else bias + mask
    if bias is None:
        return None
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).expand(b, h, n, m)


def attention_inputs(
    q: object, k: object, v: object | None, *, mode: object, threshold: object, causal: object, scale: object
) -> tuple[Tensor, float]:
    """Check q (B,H,N,d), k (B,H,M,d), v (B,H,M,dv) (None: not needed) and the options; returns the per-head
    threshold (H,) in q's dtype (zeros for sparsemax) and the scale as a float (default d^-1/2)."""
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    q, k, *rest = (check.tensor(name, t, rank=4) for name, t in named)
    if k.shape[:2] != q.shape[:2] or any(t.shape[:2] != q.shape[:2] for t in rest):
        raise ValueError(
            f"q, k{', v' if rest else ''} must share (B, H), got "
            f"{', '.join(str(tuple(t.shape)) for t in (q, k, *rest))}"
        )
    if q.shape[3] < 1:
        raise ValueError(f"q, k must have a head dim >= 1, got q of shape {tuple(q.shape)}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k must have q's head dim {q.shape[3]}, got {k.shape[3]}")
    if rest and rest[0].shape[2] != k.shape[2]:
        raise ValueError(f"v must have k's length {k.shape[2]}, got {rest[0].shape[2]}")
    check.same_dtype(q=q, k=k, **({"v": rest[0]} if rest else {}))
    check.flag("causal", causal)
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    heads = q.shape[1]
    if mode == "shrink":
        if threshold is None:
            raise ValueError("threshold is required for mode='shrink' (a float or a per-head (H,) tensor)")
        threshold = check.scalar_or_tensor("threshold", threshold)
        if isinstance(threshold, Tensor) and tuple(threshold.shape) not in ((), (heads,)):
            raise ValueError(
                f"threshold must be a float or a tensor of shape (H,)=({heads},), got {tuple(threshold.shape)}"
            )
        # Beyond the compute dtype's range it would become +-inf there (all-zero or all-inf weights).
        check.fits_dtype("threshold", threshold, stats_dtype(q.dtype), finite=True)
    elif threshold is not None:
        raise ValueError("threshold is only used by mode='shrink'; sparsemax finds its own per-row threshold")
    if scale is None:
        scale = q.shape[3] ** -0.5
    if isinstance(scale, Tensor):
        raise TypeError(f"scale must be a Python float, got a tensor of shape {tuple(scale.shape)}")
    try:
        scale = check.scalar_or_tensor("scale", scale)
    except TypeError:
        # its message offers "a float or a tensor", and the tensor it suggests is refused just above
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}") from None
    check.positive("scale", scale)
    # Beyond the compute dtype's range it would be inf there: every score +-inf (or NaN), and the backends' gradients
    # would each overflow their own way.
    check.fits_dtype("scale", scale, stats_dtype(q.dtype))
    check.same_device(
        q=q, k=k, **({"v": rest[0]} if rest else {}), threshold=threshold if isinstance(threshold, Tensor) else None
    )
    if isinstance(threshold, Tensor):
        threshold = threshold.expand(heads)
    else:
        # In the compute dtype, not q's: a float16 threshold would be rounded (0.1 -> 0.09998) and could overflow.
        threshold = torch.full(
            (heads,), 0.0 if threshold is None else float(threshold), dtype=stats_dtype(q.dtype), device=q.device
        )
    return threshold, float(scale)
