"""Sparse attention layers: ``SparseAttention`` (a drop-in for ``nn.MultiheadAttention``) and
``SparseCodingTransformerBlock`` (sparse attention + an ISTA sparse-coding MLP, CRATE-like).

Both compute through ``dsc_kernels.functional`` only, so every backend gives the same parameters and state_dict.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _attention_args as attention_args
from .. import _validate as check
from .. import functional as DF
from ._args import check_value, flags, parametrized_tensors, positive_int

__all__ = ["SparseAttention", "SparseCodingTransformerBlock"]

DEFAULT_SHRINK_THRESHOLD = 0.5  # shrink mode's initial per-head threshold


def _check_like(name: str, t: Tensor, parameter: Tensor, owner: str) -> None:
    """t in the module's parameter dtype (or any float dtype while autocast casts the inputs of its projections),
    then on its device (else the projections fail inside torch, or a meta input is projected into a tensor that the
    attention then reports under an internal name)."""
    if t.dtype != parameter.dtype and not (t.is_floating_point() and check.autocasting(t.device)):
        raise TypeError(f"{name} must have the {owner}'s dtype {parameter.dtype}, got {t.dtype}")
    if t.device != parameter.device:
        raise ValueError(f"{name} must be on the {owner}'s device {parameter.device}, got {t.device}")


def _stored(module: nn.Module, name: str) -> Tensor:
    """``module``'s tensor ``name`` as stored, for its dtype and device, without computing a parametrized one (MHA
    reads its weights once a forward)."""
    tensors = parametrized_tensors(module, name)
    return getattr(module, name) if tensors is None else tensors[0]


class SparseAttention(nn.Module):
    """Multi-head sparse attention with ``nn.MultiheadAttention``'s arguments, parameters and call convention.

    ``mode="sparsemax"``: P = sparsemax(q k^T / sqrt(d)), exactly sparse rows summing to 1. ``mode="shrink"``:
    P = max(q k^T / sqrt(d) - theta_h, 0) with a learnable per-head threshold theta (one ISTA step coding each
    query on the keys). The fused backends never form P or the score matrix.

    Args (the first eleven are ``nn.MultiheadAttention``'s, in its order and with its defaults):
        embed_dim: E, the model dimension (query features and output features).
        num_heads: H; E must be divisible by it (head dim d = E / H).
        dropout: probability of zeroing an entry of the attention map while training, as MHA (the map is then
            formed densely: see ``forward``).
        bias: add biases to the input and output projections.
        add_bias_kv: learn a key and a value, ``bias_k`` and ``bias_v`` (1, 1, E), appended to every sequence's
            projected keys and values (a key every query may attend to: masks get a visible column), as MHA.
        add_zero_attn: append a key and a value of zeros after them (after ``bias_k``/``bias_v``), as MHA.
        kdim, vdim: features of key and value (default E); when they differ from E the projections are
            ``q_proj_weight`` (E, E), ``k_proj_weight`` (E, kdim), ``v_proj_weight`` (E, vdim), as in MHA.
        batch_first: False (MHA's default): inputs and output are (L, B, E); True: (B, L, E).
        device, dtype: where and in which dtype the parameters are created (``"meta"`` works).
        mode: "sparsemax" or "shrink" (keyword only).
        threshold: initial per-head shrink threshold, default 0.5 (keyword only; the learnable (H,) parameter
            ``threshold`` exists in shrink mode only, and sparsemax refuses one: it has no threshold to set). Any
            finite float: a negative one is a ReLU with bias -threshold (keys scoring in (threshold, 0] get weight
            too), and training may move it below 0 (it is not projected).
        backend: "auto", "reference", "cpp" or "triton" (keyword only; see ``functional.sparse_attention``).

    Parameters ``in_proj_weight`` (3E, E) (or the three separate weights), ``in_proj_bias`` (3E,) and
    ``out_proj`` are named as in ``nn.MultiheadAttention``, so its state_dict loads here and this one's there (plus
    ``threshold`` in shrink mode).

    In ``nn.TransformerEncoderLayer``/``nn.TransformerEncoder`` (``self_attn`` swapped for this layer), turn off
    their inference fast path, which calls MHA's fused softmax kernel instead of ``self_attn.forward``:
    ``torch.backends.mha.set_fastpath_enabled(False)`` (else ``merge_masks`` raises NotImplementedError).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        mode: str = "sparsemax",
        threshold: float | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        embed_dim, num_heads = positive_int("embed_dim", embed_dim), positive_int("num_heads", num_heads)
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if mode not in DF.ATTENTION_MODES:
            raise ValueError(f"mode must be one of {DF.ATTENTION_MODES}, got {mode!r}")
        if threshold is not None and mode != "shrink":  # it would be silently ignored (functional raises too)
            raise ValueError(f"threshold applies to mode='shrink' only, got threshold={threshold!r} with mode={mode!r}")
        threshold = DEFAULT_SHRINK_THRESHOLD if threshold is None else threshold
        for name, value in (("dropout", dropout), ("threshold", threshold)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a float, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite float, got {threshold!r}")
        DF.check_backend(backend)
        for name, flag in (
            ("bias", bias),
            ("add_bias_kv", add_bias_kv),
            ("add_zero_attn", add_zero_attn),
            ("batch_first", batch_first),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        self.kdim = embed_dim if kdim is None else positive_int("kdim", kdim)
        self.vdim = embed_dim if vdim is None else positive_int("vdim", vdim)
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        factory = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.mode, self.dropout, self.batch_first, self.backend = mode, float(dropout), batch_first, backend
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                self.register_parameter(name, None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory)) if bias else None
        # uninitialised here: reset_parameters initialises every parameter once (a deferred construction on meta,
        # to_empty and reset_parameters then give exactly what construction gives from the same seed). Built on meta
        # (no initialisation, no random draw) and given empty parameters, not by skip_init, whose to_empty cannot
        # swap parameters under a FakeTensorMode.
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, device="meta", dtype=dtype)
        self.out_proj.weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
        if bias:
            self.out_proj.bias = nn.Parameter(torch.empty(embed_dim, **factory))
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None  # plain attributes, as MHA's
        self.add_zero_attn = add_zero_attn
        self._initial_threshold = float(threshold)
        if mode == "shrink":
            self.threshold = nn.Parameter(torch.empty((num_heads,), **factory))
        else:
            self.register_parameter("threshold", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MultiheadAttention's initialisation, plus ``out_proj``'s own (MHA leaves it to construction, which would
        leave it uninitialised after ``to_empty``) and the initial shrink threshold."""
        self.out_proj.reset_parameters()
        if self.threshold is not None:
            nn.init.constant_(self.threshold, self._initial_threshold)
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def merge_masks(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, query: Tensor) -> None:
        """Refuses: ``nn.TransformerEncoderLayer``'s inference fast path calls this, then MHA's fused softmax kernel
        with this layer's weights instead of its forward."""
        raise NotImplementedError(
            "SparseAttention has no fused softmax fast path: nn.TransformerEncoderLayer/TransformerEncoder's "
            "inference fast path would bypass its forward; call torch.backends.mha.set_fastpath_enabled(False)"
        )

    def extra_repr(self) -> str:
        dims = "" if self._qkv_same_embed_dim else f", kdim={self.kdim}, vdim={self.vdim}"
        dims += ", add_bias_kv=True" if self.bias_k is not None else ""
        dims += ", add_zero_attn=True" if self.add_zero_attn else ""
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}{dims}, mode={self.mode!r}, "
            f"dropout={self.dropout}, batch_first={self.batch_first}, backend={self.backend!r}"
        )

    def _project(
        self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, *) inputs -> q, k, v (B, H, L, d) (strided views of the projections: the kernels read them in
        place). Self-attention uses one packed projection, like MHA."""
        e, h, d = self.embed_dim, self.num_heads, self.head_dim
        b_q, b_k, b_v = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.split(e)
        if self._qkv_same_embed_dim and self_attention:
            qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias).unflatten(-1, (3, h, d))
            return tuple(t.transpose(1, 2) for t in qkv.unbind(2))
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.split(e)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return tuple(
            F.linear(x, w, bias).unflatten(-1, (h, d)).transpose(1, 2)
            for x, w, bias in ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v))
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """MultiheadAttention's call, with its map replaced. Shapes (batch_first=False / True; unbatched drop B):

        query (N, B, E) / (B, N, E); key (M, B, kdim) / (B, M, kdim) and value (M, B, vdim) / (B, M, vdim), by
        default the query (self-attention). key_padding_mask (B, M); attn_mask (N, M) or (B*H, N, M) (entry
        b * H + h for batch b, head h, as in MHA); both bool (True ignores the key: MHA's convention, the opposite
        of ``F.scaled_dot_product_attention``'s) or float of any float dtype (added to the scores, -inf ignores the
        key); integer masks are refused (TypeError, as MHA refuses them). A float mask that requires grad (a
        learned score bias) is differentiated, as in MHA: such calls run on the reference backend (dense scores;
        the fused kernels do not form that gradient), and a layer built with an explicit fused backend raises.
        is_causal: query i sees keys j <= i (top-left when N != M). With an attn_mask it is, as in MHA, the hint
        that attn_mask is that causal mask: the mask is checked but not read. Without one it applies the causal
        mask itself (nn.MultiheadAttention requires an attn_mask with is_causal and raises without one).

        A query that sees no key (every key masked for it) gets 0, not NaN: its output is out_proj's bias and its
        weights row of zeros (MHA's need_weights=True path gives NaN there). Other rows of the sparsemax map sum to
        1 and hold exact zeros (shrink rows need not sum to 1). A NaN or inf in a key or value that a query cannot
        see (masked for it) leaves that query's row finite, where MHA's rows all come out NaN (it adds its masks to
        the scores and multiplies the hidden values by weight 0); one the query sees makes its row NaN, even at a
        weight of 0.

        Dropout (training only): entries of the attention map are zeroed with probability ``dropout`` and the rest
        scaled by 1 / (1 - dropout), as in MHA; the map is then formed densely, (B, H, N, M) (the fused kernels run
        in eval mode or with dropout 0), though a backend the layer was built with that cannot run here raises, as
        in eval.

        Returns (out, weights): out like query with E features; weights: with ``need_weights`` (the default, as
        MHA's) the dense (B, N, M) weights averaged over heads, or (B, H, N, M) with ``average_attn_weights=False``
        (after dropout when training, as MHA's; M counts the keys ``add_bias_kv``/``add_zero_attn`` append), else
        None. The weights cost N x M memory besides the fused output: pass ``need_weights=False`` (as
        ``nn.TransformerEncoderLayer`` does) to keep the forward lean.
        """
        key = query if key is None else key
        value = key if value is None else value
        self_attention = key is query and value is query
        # A truthy non-bool ("no", a tensor) would silently switch the option on.
        flags(need_weights=need_weights, average_attn_weights=average_attn_weights, is_causal=is_causal)
        self._check_tensors(query=query, key=key, value=value, key_padding_mask=key_padding_mask, attn_mask=attn_mask)
        unbatched = query.dim() == 2
        # the shapes as given: _check_shapes sees them unsqueezed and batch-first, which the user never wrote
        given = {name: tuple(t.shape) for name, t in (("query", query), ("key", key), ("value", value))}
        if unbatched:
            # a 3-D key beside an unbatched query became 4-D below and was refused as if it lacked "query's batch
            # size 1", which a (M, 1, kdim) key does not fix either; MHA refuses the pair the same way
            for name, t, feat in (("key", key, self.kdim), ("value", value, self.vdim)):
                if t.dim() != 2 or t.shape[-1] != feat:
                    raise ValueError(
                        f"{name} must be unbatched (M, {feat}) like the unbatched query, got {given[name]}"
                    )
            if key_padding_mask is not None and key_padding_mask.dim() != 1:
                raise ValueError(
                    f"key_padding_mask must be (M,) for an unbatched query, got {tuple(key_padding_mask.shape)}"
                )
            query, key, value = (t.unsqueeze(1 if not self.batch_first else 0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first:
            # a 1-D key or value beside a batched query raised IndexError here; _check_shapes names it
            query, key, value = (t.transpose(0, 1) if t.dim() > 1 else t for t in (query, key, value))
        self._check_shapes(query, key, value, given)
        bsz, n, m = query.shape[0], query.shape[1], key.shape[1]
        # Exactly MHA's two shapes: functional's broadcasting let (1, M), (N, 1) or (B*num_heads, 1, M) through,
        # which MHA refuses.
        if isinstance(attn_mask, Tensor) and tuple(attn_mask.shape) not in ((n, m), (bsz * self.num_heads, n, m)):
            raise ValueError(
                f"attn_mask must be (N, M)=({n}, {m}) or (B*num_heads, N, M)=({bsz * self.num_heads}, {n}, {m}), "
                f"got {tuple(attn_mask.shape)}"
            )
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unflatten(0, (bsz, self.num_heads))  # MHA's order: index b * H + h
        # Before any projection or kernel, and also the mask that is_causal then leaves unread.
        attention_args.check_masks(query, (bsz, self.num_heads, n, m), key_padding_mask, attn_mask)
        causal = is_causal
        if causal:
            attn_mask = None  # the hint: the mask is the causal one
        q, k, v = self._project(query, key, value, self_attention)
        if self.bias_k is not None or self.add_zero_attn:
            k, v, key_padding_mask, attn_mask = self._append_keys(k, v, key_padding_mask, attn_mask, causal, n)
            causal = False  # now spelled out in attn_mask, which leaves the appended keys visible
        # Checked once for the attention and its weights: a tensor threshold's values are read there (a host sync on
        # a GPU), twice per forward when the weights were checked again.
        threshold, scale, bias = DF._sparse_attention_inputs(
            q,
            k,
            v,
            mode=self.mode,
            threshold=self.threshold,
            causal=causal,
            scale=None,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
        )
        checked = (self.mode, threshold, causal, scale, bias)
        p = None
        if self.training and self.dropout > 0.0:
            # MHA's dropout: on the attention weights, which the fused kernels never form, so densely here. A
            # backend asked for that cannot run this call still raises, as in eval, rather than being silently
            # skipped (a float mask that requires grad included: the device and dtype alone let cpp through).
            DF._sparse_attention_row(self.backend, q, k, v, threshold, bias)
            p = F.dropout(DF._sparse_attention_weights_checked(q, k, *checked), self.dropout, training=True)
            o = self._dense_output(p, v, causal, bias)
        else:
            o = DF._sparse_attention_checked(self.backend, q, k, v, *checked)
            if need_weights:
                p = DF._sparse_attention_weights_checked(q, k, *checked)
        out = self.out_proj(o.transpose(1, 2).reshape(bsz, n, self.embed_dim))
        weights = None
        if need_weights:
            weights = p.mean(1) if average_attn_weights else p
            weights = weights.squeeze(0) if unbatched else weights
        if not self.batch_first:
            out = out.transpose(0, 1)
        return (out.squeeze(1 if not self.batch_first else 0) if unbatched else out), weights

    @staticmethod
    def _dense_output(p: Tensor, v: Tensor, causal: bool, bias: Tensor | None) -> Tensor:
        """O = P v from a dense (dropped-out) map with the fused kernels' rule for non-finite values: a plain
        ``p @ v`` made a query's row NaN through 0 * NaN from a value it cannot see (masked for it), where eval
        leaves the row finite; a non-finite value it sees makes its row NaN, even at a weight of 0. bias: the
        masks' score bias (``attention_args.score_bias``), -inf where a key is hidden."""
        n, m = p.shape[-2], p.shape[-1]
        with torch.no_grad():
            hidden = torch.ones(n, m, dtype=torch.bool, device=p.device).triu(1) if causal else None
            if bias is not None:
                hidden = bias == -math.inf if hidden is None else hidden | (bias == -math.inf)
            bad_v = ~torch.isfinite(v).all(-1)  # (B, H, M)
            seen_bad = bad_v.unsqueeze(-2) if hidden is None else bad_v.unsqueeze(-2) & ~hidden
            # a NaN row of the map (q_i, a key it sees or a score NaN) is zeroed for the product and NaN after it:
            # left in, dv = P^T g took 0 * NaN from it and made every key's value gradient NaN, where the fused
            # backward passes such a row no gradient
            nan_p = torch.isnan(p).any(-1, keepdim=True)
            nan_rows = seen_bad.any(-1, keepdim=True) | nan_p  # (B, H, N, 1)
        o = torch.matmul(p.masked_fill(nan_p, 0.0), v.masked_fill(bad_v.unsqueeze(-1), 0.0))
        return o.masked_fill(nan_rows, math.nan)

    def _append_keys(
        self, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None, causal: bool, n: int
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """k (B, H, M, d), v (B, H, M, d) -> (B, H, M + extra, d) with ``bias_k``/``bias_v``, then a zero key and
        value, appended (MHA's order), and the masks given ``extra`` visible columns to match. A causal attention
        (``causal``: is_causal, whose mask is then not read) becomes its explicit (N, M) mask first: the appended
        keys sit past every query's position, where a causal mask would hide them, and MHA's mask path (need_weights
        or a key_padding_mask) leaves them visible to every query."""
        bsz, h, m, d = k.shape
        appended_k, appended_v = [k], [v]
        if self.bias_k is not None:
            appended_k.append(self.bias_k.to(k.dtype).view(1, h, 1, d).expand(bsz, -1, -1, -1))
            appended_v.append(self.bias_v.to(v.dtype).view(1, h, 1, d).expand(bsz, -1, -1, -1))
        if self.add_zero_attn:
            appended_k.append(k.new_zeros(bsz, h, 1, d))
            appended_v.append(v.new_zeros(bsz, h, 1, d))
        extra = len(appended_k) - 1
        if causal:
            attn_mask = torch.ones(n, m, dtype=torch.bool, device=k.device).triu(1)

        def visible_columns(mask: Tensor | None) -> Tensor | None:
            if mask is None:
                return None
            mask = mask.expand(*mask.shape[:-1], m)  # a broadcast key axis gets its M columns first
            return torch.cat([mask, mask.new_zeros(*mask.shape[:-1], extra)], dim=-1)  # False / 0.0: visible

        return (
            torch.cat(appended_k, dim=2),
            torch.cat(appended_v, dim=2),
            visible_columns(key_padding_mask),
            visible_columns(attn_mask),
        )

    def _check_tensors(self, **tensors: object) -> None:
        """Types before any shape is read (a 1-D query used to fail inside ``transpose`` with an IndexError, an
        integer or float64 query against float32 parameters inside ``F.linear``)."""
        like = _stored(self.out_proj, "weight")  # read once per forward by out_proj itself, as in MHA
        for name, t in tensors.items():
            if t is None and name.endswith("mask"):
                continue
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if name.endswith("mask"):
                continue  # their dtypes are checked by functional
            if not t.is_floating_point():
                raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
            _check_like(name, t, like, "layer")
        if tensors["query"].dim() not in (2, 3):
            layout = "(B, L" if self.batch_first else "(L, B"
            raise ValueError(
                f"query must be {layout}, {self.embed_dim}) (batch_first={self.batch_first}) or unbatched "
                f"(L, {self.embed_dim}), got {tuple(tensors['query'].shape)}"
            )

    def _check_shapes(self, query: Tensor, key: Tensor, value: Tensor, given: dict[str, tuple[int, ...]]) -> None:
        """query, key, value batch-first; ``given``: their shapes as the caller passed them, for the messages."""
        layout = "(B, L" if self.batch_first else "(L, B"
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(
                f"query must be {layout}, {self.embed_dim}) (batch_first={self.batch_first}) or "
                f"unbatched (L, {self.embed_dim}), got {given['query']}"
            )
        for name, t, feat in (("key", key, self.kdim), ("value", value, self.vdim)):
            if t.dim() != 3 or t.shape[0] != query.shape[0] or t.shape[-1] != feat:
                raise ValueError(
                    f"{name} must be {layout}, {feat}) with query's batch size {query.shape[0]} "
                    f"(batch_first={self.batch_first}), got {given[name]}"
                )
        if key.shape[1] != value.shape[1]:
            raise ValueError(f"key and value must have one length, got {key.shape[1]} and {value.shape[1]}")


class SparseCodingTransformerBlock(nn.Module):
    """Pre-norm sparse attention with a residual, then one ISTA sparse-coding layer in place of the MLP (CRATE).

        h = x + SparseAttention(LN1(x))
        u = LN2(h);  z_0 = u;  z_{t+1} = max(z_t + step D^T(u - D z_t) - step lam, 0),  t < n_iter
        returns z_{n_iter}   (B, N, dim), non-negative codes

    D is a square dictionary (dim codes -> dim features) acting on each token independently: it is
    ``functional.conv_ista`` on (B, dim, N) with a (dim, dim, 1) kernel. As in CRATE the ISTA output replaces h
    (no residual around it): the step from the normalised features is the residual update. Inputs are batch-first
    (B, N, dim), or unbatched (N, dim) as ``nn.TransformerEncoderLayer`` takes them.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mode: str = "sparsemax",
        threshold: float | None = None,
        n_iter: int = 1,
        lam: float = 0.1,
        step: float = 0.1,
        dropout: float = 0.0,
        bias: bool = True,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dim, n_iter = positive_int("dim", dim), positive_int("n_iter", n_iter)
        if dim % positive_int("num_heads", num_heads) != 0:  # named here: SparseAttention would say embed_dim
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        lam, step = check_value("lam", lam, [()]), check_value("step", step, [()], positive=True)
        # plain numbers: a 0-dim tensor kept as an attribute was in no state_dict and stayed behind on .to()
        lam, step = float(lam), float(step)
        DF.check_backend(backend)
        factory = dict(device=device, dtype=dtype)
        self.dim, self.n_iter, self.lam, self.step, self.backend = dim, n_iter, lam, step, backend
        self.norm1 = nn.LayerNorm(dim, **factory)
        self.attn = SparseAttention(
            dim,
            num_heads,
            dropout=dropout,
            bias=bias,
            batch_first=True,
            mode=mode,
            threshold=threshold,
            backend=backend,
            **factory,
        )
        self.norm2 = nn.LayerNorm(dim, **factory)
        self.dictionary = nn.Parameter(torch.empty(dim, dim, 1, **factory))
        self._reset_dictionary()  # the attention and the norms initialised themselves

    def reset_parameters(self) -> None:
        """Every parameter's initialisation again (what ``to_empty()`` after a ``device="meta"`` construction
        needs): the norms', the attention's and the dictionary's (``nn.Conv1d``'s default)."""
        self.norm1.reset_parameters()
        self.attn.reset_parameters()
        self.norm2.reset_parameters()
        self._reset_dictionary()

    def _reset_dictionary(self) -> None:
        nn.init.kaiming_uniform_(self.dictionary, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_iter={self.n_iter}, lam={self.lam}, step={self.step}, backend={self.backend!r}"

    def forward(
        self,
        x: Tensor,
        *,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """x (B, N, dim) -> (B, N, dim), or unbatched (N, dim) -> (N, dim) as ``nn.TransformerEncoderLayer``; masks as
        ``SparseAttention.forward`` (key_padding_mask (B, N), or (N,) for an unbatched x)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        _check_like("x", x, _stored(self, "dictionary"), "block")
        if x.dim() not in (2, 3) or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, N, dim={self.dim}) or (N, dim={self.dim}), got {tuple(x.shape)}")
        unbatched = x.dim() == 2
        if unbatched:  # a batch of one: the conv-ISTA step takes batched signals only
            x = x.unsqueeze(0)
            if isinstance(key_padding_mask, Tensor):  # anything else is refused by the attention, by name
                if key_padding_mask.dim() != 1:
                    raise ValueError(
                        f"key_padding_mask must be (N,) for an unbatched x, got {tuple(key_padding_mask.shape)}"
                    )
                key_padding_mask = key_padding_mask.unsqueeze(0)
        h = self.norm1(x)
        attended, _ = self.attn(
            h, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False, is_causal=is_causal
        )
        h = x + attended
        u = self.norm2(h).transpose(1, 2)
        if u.shape[-1] == 0:  # no tokens (the attention takes them, as MHA): conv_ista refuses an empty signal
            z = u.clamp(min=0)
        else:
            z = DF.conv_ista(
                u,
                self.dictionary,
                self.lam,
                n_iter=self.n_iter,
                step=self.step,
                z0=u,
                nonneg=True,
                backend=self.backend,
            )
        return z.transpose(1, 2).squeeze(0) if unbatched else z.transpose(1, 2)
