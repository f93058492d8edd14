"""Sparse attention layers: ``SparseAttention`` (a drop-in for ``nn.MultiheadAttention(batch_first=True)``) and
``SparseCodingTransformerBlock`` (sparse attention + an ISTA sparse-coding MLP, CRATE-like).

Both compute through ``dsc_kernels.functional`` only, so every backend gives the same parameters and state_dict.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as DF

__all__ = ["SparseAttention", "SparseCodingTransformerBlock"]

_MODES = ("sparsemax", "shrink")


def _causal_from_mask(attn_mask: Tensor, n: int, m: int) -> None:
    """Accept attn_mask only if it is the top-left causal mask (bool True = hidden, or float -inf = hidden)."""
    if attn_mask.shape != (n, m):
        raise ValueError(f"attn_mask must be a causal ({n}, {m}) mask, got shape {tuple(attn_mask.shape)}")
    hidden = torch.ones(n, m, dtype=torch.bool, device=attn_mask.device).triu(1)
    blocked = attn_mask if attn_mask.dtype == torch.bool else torch.isneginf(attn_mask)
    if attn_mask.dtype != torch.bool and bool((attn_mask[~hidden] != 0).any()):
        raise ValueError("attn_mask: only a causal mask is supported (0 on and below the diagonal, -inf above)")
    if not torch.equal(blocked, hidden):
        raise ValueError("attn_mask: only the causal mask is supported (hide exactly the keys j > i); "
                         "general masks cannot be expressed by the sparse attention kernels")


class SparseAttention(nn.Module):
    """Multi-head sparse attention with ``nn.MultiheadAttention``'s parameters and call convention.

    mode "sparsemax": P = sparsemax(q k^T / sqrt(d)) (exactly sparse rows summing to 1); "shrink": P =
    max(q k^T / sqrt(d) - theta_h, 0) with a learnable per-head threshold theta (initialised to ``threshold``).
    Parameters ``in_proj_weight`` (3E, E), ``in_proj_bias`` (3E,), ``out_proj`` are named as in
    ``nn.MultiheadAttention``, so its state_dict loads here (plus ``threshold`` in shrink mode).
    Dropout is applied to the attention output of each head (before ``out_proj``), not to P: the fused kernels never
    form P. Inputs (B, N, E) (``batch_first=False``: (N, B, E)); returns ``(out, None)`` like MHA with
    ``need_weights=False``; ``need_weights=True`` additionally returns the dense (B, N, M) head-averaged attention
    weights (or per head with ``average_attn_weights=False``), computed densely.
    """

    def __init__(self, embed_dim: int, num_heads: int, mode: str = "sparsemax", threshold: float = 0.5,
                 dropout: float = 0.0, bias: bool = True, batch_first: bool = True, backend: str = "auto",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        factory = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.mode, self.dropout, self.batch_first, self.backend = mode, dropout, batch_first, backend
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if mode == "shrink":
            self.threshold = nn.Parameter(torch.full((num_heads,), float(threshold), **factory))
        else:
            self.register_parameter("threshold", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MultiheadAttention's initialisation."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, mode={self.mode!r}, "
                f"dropout={self.dropout}, batch_first={self.batch_first}, backend={self.backend!r}")

    def _heads(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """(B, L, E) -> projected (B, H, L, head_dim)."""
        bsz, length, _ = x.shape
        return F.linear(x, w, b).view(bsz, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                key_padding_mask: Tensor | None = None, need_weights: bool = False,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """query (B, N, E), key/value (B, M, E) (default: query, i.e. self-attention) -> ((B, N, E), weights).

        attn_mask: only the causal (N, M) mask (bool True = hidden, or float -inf) is accepted; with
        ``is_causal=True`` it is trusted as a hint, as MultiheadAttention does. key_padding_mask is not supported.
        """
        key = query if key is None else key
        value = key if value is None else value
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask is not supported by SparseAttention")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(f"query must be (B, N, {self.embed_dim}), got {tuple(query.shape)}")
        if key.shape != value.shape or key.shape[0] != query.shape[0] or key.shape[-1] != self.embed_dim:
            raise ValueError(f"key and value must be (B, M, {self.embed_dim}) with query's batch, got "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        causal = bool(is_causal)
        if attn_mask is not None and not causal:
            if torch.compiler.is_compiling():
                raise ValueError("under torch.compile pass is_causal=True with the causal attn_mask "
                                 "(its values cannot be checked inside the graph)")
            _causal_from_mask(attn_mask, query.shape[1], key.shape[1])
            causal = True

        e = self.embed_dim
        w_q, w_k, w_v = self.in_proj_weight.split(e)
        b_q, b_k, b_v = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.split(e)
        q, k, v = self._heads(query, w_q, b_q), self._heads(key, w_k, b_k), self._heads(value, w_v, b_v)
        o = DF.sparse_attention(q, k, v, mode=self.mode, threshold=self.threshold, causal=causal,
                                backend=self.backend)
        o = F.dropout(o, self.dropout, self.training)
        out = self.out_proj(o.transpose(1, 2).reshape(query.shape[0], query.shape[1], e))
        if not self.batch_first:
            out = out.transpose(0, 1)
        weights = self._weights(q, k, causal, average_attn_weights) if need_weights else None
        return out, weights

    def _weights(self, q: Tensor, k: Tensor, causal: bool, average: bool) -> Tensor:
        """Dense attention weights P: (B, H, N, M), or (B, N, M) averaged over heads."""
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if causal:
            hidden = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1)
            s = s.masked_fill(hidden, float("-inf"))
        if self.mode == "sparsemax":
            p = DF.sparsemax(s, dim=-1)
        else:
            p = torch.clamp(s - self.threshold.view(1, -1, 1, 1), min=0)
        return p.mean(1) if average else p


class SparseCodingTransformerBlock(nn.Module):
    """Pre-norm sparse attention with a residual, then one ISTA sparse-coding layer in place of the MLP (CRATE).

        h = x + SparseAttention(LN1(x))
        u = LN2(h);  z_0 = u;  z_{t+1} = max(z_t + step D^T(u - D z_t) - step lam, 0),  t < n_iter
        returns z_{n_iter}   (B, N, dim), non-negative codes

    D is a square dictionary (dim codes -> dim features) acting on each token independently: it is
    ``functional.conv_ista`` on (B, dim, N) with a (dim, dim, 1) kernel. As in CRATE the ISTA output replaces h
    (no residual around it): the step from the normalised features is the residual update.
    """

    def __init__(self, dim: int, num_heads: int, *, mode: str = "sparsemax", threshold: float = 0.5,
                 n_iter: int = 1, lam: float = 0.1, step: float = 0.1, dropout: float = 0.0, bias: bool = True,
                 backend: str = "auto", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if n_iter < 1:
            raise ValueError(f"n_iter must be >= 1, got {n_iter}")
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if step <= 0:
            raise ValueError(f"step must be > 0, got {step}")
        factory = dict(device=device, dtype=dtype)
        self.dim, self.n_iter, self.lam, self.step, self.backend = dim, n_iter, lam, step, backend
        self.norm1 = nn.LayerNorm(dim, **factory)
        self.attn = SparseAttention(dim, num_heads, mode=mode, threshold=threshold, dropout=dropout, bias=bias,
                                    batch_first=True, backend=backend, **factory)
        self.norm2 = nn.LayerNorm(dim, **factory)
        self.dictionary = nn.Parameter(torch.empty(dim, dim, 1, **factory))
        nn.init.kaiming_uniform_(self.dictionary, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_iter={self.n_iter}, lam={self.lam}, step={self.step}, backend={self.backend!r}"

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """x (B, N, dim) -> (B, N, dim)."""
        h = self.norm1(x)
        h = x + self.attn(h, attn_mask=attn_mask, is_causal=is_causal)[0]
        u = self.norm2(h).transpose(1, 2)
        z = DF.conv_ista(u, self.dictionary, self.lam, n_iter=self.n_iter, step=self.step, z0=u, nonneg=True,
                         backend=self.backend)
        return z.transpose(1, 2)
