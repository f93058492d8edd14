"""SparseAttention against nn.MultiheadAttention's pipeline written out here with softmax replaced by a sort-based
sparsemax (or shrink's soft threshold): projections, layouts, masks, is_causal, need_weights, dropout, gradients,
state_dict, bad inputs.

``_by_hand`` follows ``F.multi_head_attention_forward``'s need_weights branch step by step; run with softmax it must
give MHA's own outputs and weights (checked on every layout and mask here), so the sparse runs compare SparseAttention
with MHA's contract, not with the package's own code. Sparsemax's documented extensions: exact zeros, and a query that
sees no key gets 0 (output = out_proj's bias, a weights row of zeros), where MHA's need_weights=True path gives
NaN.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsc_kernels.functional as DF
from dsc_kernels.nn.attention import SparseAttention

F64 = torch.float64
INF = float("inf")
BACKENDS = ["reference", "cpp"]


def _skip_unless(backend):
    if backend != "reference" and (reason := DF.backend_unavailable_reason(backend, "cpu")) is not None:
        pytest.skip(reason)


# ----------------------------------------------------------------------------------------- the independent maps
def _sparsemax(s):
    """Sparsemax along the last dim (Martins & Astudillo 2016): sort descending, k(z) = max{k : 1 + k z_(k) >
    sum_{l<=k} z_(l)}, tau = (sum_{l<=k(z)} z_(l) - 1) / k(z), p = max(s - tau, 0). A row of -inf gives zeros."""
    empty = torch.isneginf(s).all(-1, keepdim=True)
    z = s.masked_fill(empty, 0.0)
    z = z - z.amax(-1, keepdim=True).detach()  # shift-invariant; keeps the sort exact for large scores
    zs = z.sort(-1, descending=True).values
    cs = zs.cumsum(-1)
    ks = torch.arange(1, s.shape[-1] + 1, dtype=s.dtype, device=s.device)
    size = (1 + ks * zs > cs).sum(-1, keepdim=True)
    tau = (cs.gather(-1, size - 1) - 1) / size.to(s.dtype)
    return torch.clamp(z - tau, min=0.0).masked_fill(empty, 0.0)


def _softmax(s):
    return torch.softmax(s, -1)


def _shrink(theta):
    def shrink(s):  # s (B, H, N, M)
        return torch.clamp(s - theta.view(1, -1, 1, 1), min=0.0)

    return shrink


# ------------------------------------------------------------------------------- MHA's pipeline, written out
def _bool_to_float(mask, dtype):
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(mask, -INF)


def _by_hand(
    params,
    query,
    key,
    value,
    *,
    num_heads,
    batch_first,
    attention,
    key_padding_mask=None,
    attn_mask=None,
    keep=None,
    dropout=0.0,
    add_zero_attn=False,
):
    """F.multi_head_attention_forward's need_weights branch with ``attention`` in place of softmax.

    params: MHA's state_dict names -> tensors (with "bias_k"/"bias_v": add_bias_kv); attention maps scores
    (B, H, N, M') to weights, M' = M plus the appended keys; keep: a {0, 1} mask (B, H, N, M') of the weights dropout
    keeps. Returns (out, weights (B, H, N, M')), unbatched inputs without B."""
    batched = query.dim() == 3
    if batched and batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    if not batched:
        query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    n, b, e = query.shape
    m, h = key.shape[0], num_heads
    d = e // h
    if "in_proj_weight" in params:
        w_q, w_k, w_v = params["in_proj_weight"].chunk(3)
    else:
        w_q, w_k, w_v = params["q_proj_weight"], params["k_proj_weight"], params["v_proj_weight"]
    b_q, b_k, b_v = params["in_proj_bias"].chunk(3) if "in_proj_bias" in params else (None,) * 3
    q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    extra = 0
    if "bias_k" in params:  # (L, B, E) layout: one more key per sequence, every mask a visible column more
        k = torch.cat([k, params["bias_k"].repeat(1, b, 1)])
        v = torch.cat([v, params["bias_v"].repeat(1, b, 1)])
        extra += 1
    q, k, v = (t.reshape(t.shape[0], b * h, d).transpose(0, 1) for t in (q, k, v))  # (B*H, L, d), index b*H + h
    if add_zero_attn:
        k = torch.cat([k, torch.zeros(b * h, 1, d, dtype=k.dtype)], dim=1)
        v = torch.cat([v, torch.zeros(b * h, 1, d, dtype=v.dtype)], dim=1)
        extra += 1
    bias = torch.zeros(1, n, m + extra, dtype=query.dtype)
    if attn_mask is not None:
        mask = F.pad(_bool_to_float(attn_mask, query.dtype), (0, extra))
        bias = bias + (mask.unsqueeze(0) if mask.dim() == 2 else mask)
    if key_padding_mask is not None:
        pad = F.pad(_bool_to_float(key_padding_mask, query.dtype), (0, extra))
        bias = bias + pad.view(b, 1, 1, m + extra).expand(-1, h, -1, -1).reshape(b * h, 1, m + extra)
    m += extra
    s = torch.baddbmm(bias.expand(b * h, n, m), q * math.sqrt(1.0 / d), k.transpose(1, 2))
    p = attention(s.view(b, h, n, m))
    if keep is not None:
        p = p * keep / (1.0 - dropout)
    o = torch.bmm(p.reshape(b * h, n, m), v).transpose(0, 1).reshape(n * b, e)
    out = F.linear(o, params["out_proj.weight"], params.get("out_proj.bias")).view(n, b, e)
    if not batched:
        return out.squeeze(1), p.squeeze(0)
    return (out.transpose(0, 1) if batch_first else out), p


# ------------------------------------------------------------------------------------------------- the cases
# name: (embed_dim, num_heads, kdim, vdim, bias, N, M, B, self-attention); B None: unbatched
CASES = {
    "self_h2": (6, 2, None, None, True, 5, 5, 3, True),
    "cross_odd_h3": (6, 3, None, None, True, 5, 7, 2, False),
    "kdim_vdim": (4, 2, 3, 5, True, 3, 6, 2, False),
    "no_bias_h1": (5, 1, None, None, False, 7, 4, 2, False),
    "unbatched_self": (6, 2, None, None, True, 5, 5, None, True),
    "unbatched_kdim_vdim_h4": (4, 4, 3, 2, True, 3, 5, None, False),
}


def _modules(case, batch_first, backend, mode="sparsemax", dtype=F64, seed=0, **extra_keys):
    """(SparseAttention, MHA with SparseAttention's state_dict, the params dict); extra_keys: add_bias_kv,
    add_zero_attn."""
    e, h, kdim, vdim, bias, *_ = CASES[case]
    torch.manual_seed(seed)
    kw = dict(kdim=kdim, vdim=vdim, bias=bias, batch_first=batch_first, dtype=dtype, **extra_keys)
    shrink = dict(threshold=0.05) if mode == "shrink" else {}
    sa = SparseAttention(e, h, mode=mode, backend=backend, **shrink, **kw)
    if bias:  # MHA initialises the biases to 0: nonzero ones check where each is added
        with torch.no_grad():
            sa.in_proj_bias.normal_()
            sa.out_proj.bias.normal_()
    mha = nn.MultiheadAttention(e, h, **kw)
    mha.load_state_dict({k: v for k, v in sa.state_dict().items() if k != "threshold"})
    return sa, mha, dict(sa.named_parameters())


def _inputs(case, batch_first, dtype=F64, seed=1):
    """query, key, value (key is value is query for self-attention) in the layout of batch_first."""
    e, _, kdim, vdim, _, n, m, b, self_attention = CASES[case]
    gen = torch.Generator().manual_seed(seed)

    def make(length, feat):
        shape = (length, feat) if b is None else ((b, length, feat) if batch_first else (length, b, feat))
        return torch.randn(shape, generator=gen, dtype=dtype)

    if self_attention:
        x = make(n, e)
        return x, x, x
    return make(n, e), make(m, kdim or e), make(m, vdim or e)


def _masks(case, kind, seed=2):
    """Masks of one kind (MHA's conventions); none hides key 0, so every query sees a key."""
    _, h, _, _, _, n, m, b, _ = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    bb = 1 if b is None else b
    padding = torch.rand(bb, m, generator=gen) < 0.4
    padding[:, 0] = False
    hidden2 = torch.rand(n, m, generator=gen) < 0.4
    hidden2[:, 0] = False
    hidden3 = torch.rand(bb * h, n, m, generator=gen) < 0.4
    hidden3[..., 0] = False
    values2 = torch.randn(n, m, generator=gen, dtype=F64)
    values3 = torch.randn(bb * h, n, m, generator=gen, dtype=F64)
    kpm_float = torch.randn(bb, m, generator=gen, dtype=F64).masked_fill(padding, -INF)
    squeeze = (lambda t: t[0]) if b is None else (lambda t: t)
    kinds = {
        "kpm_bool": dict(key_padding_mask=squeeze(padding)),
        "kpm_float": dict(key_padding_mask=squeeze(kpm_float)),
        "attn_bool_2d": dict(attn_mask=hidden2),
        "attn_float_2d": dict(attn_mask=values2.masked_fill(hidden2, -INF)),
        "attn_bool_3d": dict(attn_mask=hidden3),
        "attn_float_3d": dict(attn_mask=values3.masked_fill(hidden3, -INF)),
        "kpm_bool_attn_float_3d": dict(key_padding_mask=squeeze(padding), attn_mask=values3),
        "kpm_float_attn_bool_2d": dict(key_padding_mask=squeeze(kpm_float), attn_mask=hidden2),
    }
    return kinds[kind]


def _check_grads(sa, params, inputs, out, want_out, w, want_w):
    gen = torch.Generator().manual_seed(5)
    g_out, g_w = torch.randn(out.shape, generator=gen, dtype=F64), torch.randn(w.shape, generator=gen, dtype=F64)
    leaves = [p for p in sa.parameters()] + [t for t in dict.fromkeys(inputs) if t.requires_grad]
    got = torch.autograd.grad((out * g_out).sum() + (w * g_w).sum(), leaves, allow_unused=True)
    want_loss = (want_out * g_out).sum() + (want_w * g_w).sum()
    want = torch.autograd.grad(want_loss, leaves, allow_unused=True, retain_graph=True)
    names = [n for n, _ in sa.named_parameters()] + ["input"] * (len(leaves) - len(params))
    for name, a, b in zip(names, got, want):
        assert a is not None and b is not None, name
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, msg=name)


# ------------------------------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("case", ["self_h2", "kdim_vdim", "no_bias_h1"])
def test_state_dict_is_multihead_attentions_both_ways(case):
    e, h, kdim, vdim, bias, *_ = CASES[case]
    kw = dict(kdim=kdim, vdim=vdim, bias=bias, dtype=F64)
    mha, sa = nn.MultiheadAttention(e, h, **kw), SparseAttention(e, h, backend="reference", **kw)
    want = {k: tuple(v.shape) for k, v in mha.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in sa.state_dict().items()} == want
    assert [n for n, _ in sa.named_parameters()] == [n for n, _ in mha.named_parameters()]
    for src, dst in ((mha, sa), (sa, mha)):
        with torch.no_grad():
            for p in src.parameters():
                p.normal_()
        dst.load_state_dict(src.state_dict())  # strict
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v), k
    for name in ("embed_dim", "num_heads", "head_dim", "kdim", "vdim", "_qkv_same_embed_dim", "batch_first", "dropout"):
        assert getattr(sa, name) == getattr(mha, name), name
    shrink = SparseAttention(e, h, mode="shrink", backend="reference", **kw)
    assert shrink.load_state_dict(mha.state_dict(), strict=False) == (["threshold"], [])


# ------------------------------------------------------------------------------- the pipeline, map by map
@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("batch_first", [False, True])
def test_pipeline_written_out_is_multihead_attentions(case, batch_first):
    """With softmax, _by_hand is MHA (outputs and per-head weights, every mask kind): it is the oracle below."""
    _, mha, params = _modules(case, batch_first, "reference")
    query, key, value = _inputs(case, batch_first)
    h = mha.num_heads
    for kind in [None, "kpm_bool", "kpm_float", "attn_bool_2d", "attn_float_3d", "kpm_bool_attn_float_3d"]:
        masks = {} if kind is None else _masks(case, kind)
        want_out, want_w = mha(query, key, value, need_weights=True, average_attn_weights=False, **masks)
        out, w = _by_hand(params, query, key, value, num_heads=h, batch_first=batch_first, attention=_softmax, **masks)
        torch.testing.assert_close(out, want_out, msg=f"{kind}")
        torch.testing.assert_close(w, want_w, msg=f"{kind}")
        # MHA's need_weights=False (SDPA) branch gives the same output
        torch.testing.assert_close(mha(query, key, value, need_weights=False, **masks)[0], want_out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("batch_first", [False, True])
def test_outputs_and_weights_match_the_sparsemax_pipeline(backend, case, batch_first):
    _skip_unless(backend)
    sa, mha, params = _modules(case, batch_first, backend)
    query, key, value = _inputs(case, batch_first)
    want_out, want_w = _by_hand(
        params, query, key, value, num_heads=sa.num_heads, batch_first=batch_first, attention=_sparsemax
    )
    nothing = (dict(need_weights=False), dict(need_weights=False, average_attn_weights=False))
    for kwargs in ({}, dict(average_attn_weights=False), *nothing):  # need_weights defaults to True, as MHA's
        out, w = sa(query, key, value, **kwargs)
        torch.testing.assert_close(out, want_out)
        if not kwargs.get("need_weights", True):
            assert w is None
        elif kwargs.get("average_attn_weights", True):
            torch.testing.assert_close(w, want_w.mean(-3))
            assert w.shape == mha(query, key, value, need_weights=True)[1].shape
        else:
            torch.testing.assert_close(w, want_w)
            assert w.shape == mha(query, key, value, need_weights=True, average_attn_weights=False)[1].shape
    assert out.shape == mha(query, key, value)[0].shape
    # sparse rows summing to 1 (every query sees every key here)
    torch.testing.assert_close(want_w.sum(-1), torch.ones(want_w.shape[:-1], dtype=F64))
    if CASES[case][-1]:  # self-attention: the defaults key = value = query
        torch.testing.assert_close(sa(query)[0], want_out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["self_h2", "cross_odd_h3", "kdim_vdim", "unbatched_kdim_vdim_h4"])
def test_shrink_matches_the_pipeline_with_a_soft_threshold(backend, case):
    _skip_unless(backend)
    sa, _, params = _modules(case, True, backend, mode="shrink")
    with torch.no_grad():
        sa.threshold.copy_(torch.linspace(-0.2, 0.3, sa.num_heads))
    query, key, value = _inputs(case, True)
    masks = _masks(case, "kpm_bool_attn_float_3d")
    want_out, want_w = _by_hand(
        params, query, key, value, num_heads=sa.num_heads, batch_first=True, attention=_shrink(sa.threshold), **masks
    )
    out, w = sa(query, key, value, need_weights=True, average_attn_weights=False, **masks)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(w, want_w)


MASK_KINDS = [
    "kpm_bool",
    "kpm_float",
    "attn_bool_2d",
    "attn_float_2d",
    "attn_bool_3d",
    "attn_float_3d",
    "kpm_bool_attn_float_3d",
    "kpm_float_attn_bool_2d",
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["self_h2", "cross_odd_h3", "kdim_vdim", "unbatched_self"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_masks_as_multihead_attention_applies_them(backend, case, batch_first):
    """bool True ignores a key (MHA's convention, the opposite of SDPA's), float masks are added; (N, M) and
    (B*num_heads, N, M) attn_mask (per-(batch, head) entries in MHA's b*H + h order); key_padding_mask (B, M)."""
    _skip_unless(backend)
    sa, _, params = _modules(case, batch_first, backend)
    query, key, value = _inputs(case, batch_first)
    for kind in MASK_KINDS:
        masks = _masks(case, kind)
        want_out, want_w = _by_hand(
            params, query, key, value, num_heads=sa.num_heads, batch_first=batch_first, attention=_sparsemax, **masks
        )
        out, w = sa(query, key, value, need_weights=True, average_attn_weights=False, **masks)
        torch.testing.assert_close(out, want_out, msg=kind)
        torch.testing.assert_close(w, want_w, msg=kind)
        torch.testing.assert_close(sa(query, key, value, **masks)[0], want_out, msg=kind)
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1], dtype=F64), msg=kind)
        hidden = torch.isneginf(
            _by_hand(
                params,
                query,
                key,
                value,
                num_heads=sa.num_heads,
                batch_first=batch_first,
                attention=lambda s: s,
                **masks,
            )[1]
        )
        assert (w[hidden] == 0).all(), kind


@pytest.mark.parametrize("case", ["self_h2", "cross_odd_h3", "unbatched_self"])
def test_a_learned_float_mask_is_differentiated_as_mha_differentiates_it(case):
    """A float attn_mask that requires grad (a learned position bias) gets MHA's gradient: the pipeline's, with
    sparsemax in softmax's place (the layer's 'auto' runs such calls on the reference backend)."""
    sa, _, params = _modules(case, False, "auto")
    query, key, value = _inputs(case, False)
    n, m = query.shape[0], key.shape[0]
    bias = (0.3 * torch.randn(n, m, dtype=F64, generator=torch.Generator().manual_seed(3))).requires_grad_()
    want_bias = bias.detach().clone().requires_grad_()
    out, _ = sa(query, key, value, attn_mask=bias)
    want, _ = _by_hand(
        params, query, key, value, num_heads=sa.num_heads, batch_first=False, attention=_sparsemax, attn_mask=want_bias
    )
    torch.testing.assert_close(out, want)
    g = torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(4))
    (out * g).sum().backward()
    (want * g).sum().backward()
    assert bias.grad.abs().sum() > 0
    torch.testing.assert_close(bias.grad, want_bias.grad)
    cpp = SparseAttention(sa.embed_dim, sa.num_heads, kdim=sa.kdim, vdim=sa.vdim, dtype=F64, backend="cpp")
    if DF.backend_unavailable_reason("cpp", "cpu") is None:
        with pytest.raises(ValueError, match="backend='cpp' cannot run mask_grad"):
            cpp(query, key, value, attn_mask=bias)


# -------------------------------------------------------------------------------------------------- is_causal
def _causal(n, m):
    return torch.ones(n, m, dtype=torch.bool).triu(1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["self_h2", "unbatched_self"])
def test_is_causal_with_attn_mask_is_the_hint_that_the_mask_is_causal(backend, case):
    """MHA reads the causal mask (need_weights, or with a key_padding_mask) or uses SDPA's is_causal: one map."""
    _skip_unless(backend)
    sa, mha, params = _modules(case, False, backend)
    query, key, value = _inputs(case, False)
    n, h = CASES[case][5], sa.num_heads
    for mask in (_causal(n, n), nn.Transformer.generate_square_subsequent_mask(n, dtype=F64)):
        for extra in ({}, _masks(case, "kpm_bool")):
            masks = dict(attn_mask=mask, **extra)
            soft, _ = _by_hand(params, query, key, value, num_heads=h, batch_first=False, attention=_softmax, **masks)
            want_out, want_w = _by_hand(
                params, query, key, value, num_heads=h, batch_first=False, attention=_sparsemax, **masks
            )
            for need in (False, True):
                torch.testing.assert_close(mha(query, key, value, is_causal=True, need_weights=need, **masks)[0], soft)
                out, w = sa(query, key, value, is_causal=True, need_weights=need, **masks)
                torch.testing.assert_close(out, want_out)
                if need:
                    torch.testing.assert_close(w, want_w.mean(-3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["self_h2", "cross_odd_h3", "no_bias_h1", "unbatched_kdim_vdim_h4"])
def test_is_causal_without_attn_mask_is_the_top_left_causal_mask(backend, case):
    """MHA refuses is_causal without attn_mask (RuntimeError); SparseAttention applies the causal mask itself,
    query i seeing keys j <= i (SDPA's top-left alignment when N != M), and documents it."""
    _skip_unless(backend)
    sa, mha, params = _modules(case, True, backend)
    query, key, value = _inputs(case, True)
    n, m = CASES[case][5:7]
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        mha(query, key, value, is_causal=True)
    for extra in ({}, _masks(case, "kpm_bool")):
        want_out, want_w = _by_hand(
            params,
            query,
            key,
            value,
            num_heads=sa.num_heads,
            batch_first=True,
            attention=_sparsemax,
            attn_mask=_causal(n, m),
            **extra,
        )
        out, w = sa(query, key, value, is_causal=True, need_weights=True, average_attn_weights=False, **extra)
        torch.testing.assert_close(out, want_out)
        torch.testing.assert_close(w, want_w)
    assert "MultiheadAttention requires an attn_mask" in SparseAttention.forward.__doc__


# ------------------------------------------------------------------------------ add_bias_kv and add_zero_attn
EXTRA_KEYS = {
    "bias_kv": dict(add_bias_kv=True),
    "zero_attn": dict(add_zero_attn=True),
    "both": dict(add_bias_kv=True, add_zero_attn=True),
}


def _extra_keys_modules(case, batch_first, backend, extra, mode="sparsemax"):
    """_modules with extra keys; the zero key's column needs add_zero_attn in _by_hand."""
    sa, mha, params = _modules(case, batch_first, backend, mode=mode, **EXTRA_KEYS[extra])
    return sa, mha, params, dict(add_zero_attn=EXTRA_KEYS[extra].get("add_zero_attn", False))


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("extra", list(EXTRA_KEYS))
@pytest.mark.parametrize("case", ["self_h2", "cross_odd_h3", "kdim_vdim", "unbatched_kdim_vdim_h4"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_pipeline_with_appended_keys_is_multihead_attentions(extra, case, batch_first):
    """With softmax, _by_hand's appended bias key/value and zero key/value are MHA's (outputs, weights with the
    extra columns, every mask kind): the oracle of the tests below."""
    _, mha, params, zero = _extra_keys_modules(case, batch_first, "reference", extra)
    assert ("bias_k" in params) == EXTRA_KEYS[extra].get("add_bias_kv", False)
    query, key, value = _inputs(case, batch_first)
    for kind in [None, "kpm_bool", "kpm_float", "attn_bool_2d", "attn_float_3d", "kpm_bool_attn_float_3d"]:
        masks = {} if kind is None else _masks(case, kind)
        want_out, want_w = mha(query, key, value, need_weights=True, average_attn_weights=False, **masks)
        out, w = _by_hand(
            params,
            query,
            key,
            value,
            num_heads=mha.num_heads,
            batch_first=batch_first,
            attention=_softmax,
            **zero,
            **masks,
        )
        torch.testing.assert_close(out, want_out, msg=f"{kind}")
        torch.testing.assert_close(w, want_w, msg=f"{kind}")
        torch.testing.assert_close(mha(query, key, value, need_weights=False, **masks)[0], want_out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extra", list(EXTRA_KEYS))
@pytest.mark.parametrize("case", ["self_h2", "cross_odd_h3", "kdim_vdim", "unbatched_kdim_vdim_h4"])
def test_appended_keys_match_the_sparsemax_pipeline_with_every_gradient(backend, extra, case):
    """Outputs, weights (M + 1 or M + 2 columns, MHA's shape), and the gradients of every parameter (bias_k and
    bias_v included) and input, with masks of both kinds."""
    _skip_unless(backend)
    sa, mha, params, zero = _extra_keys_modules(case, False, backend, extra)
    inputs = tuple(t.detach().requires_grad_() for t in dict.fromkeys(_inputs(case, False)))
    query, key, value = inputs if len(inputs) == 3 else inputs * 3
    for kind in ["kpm_bool_attn_float_3d", "kpm_float_attn_bool_2d"]:
        masks = _masks(case, kind)
        want_out, want_w = _by_hand(
            params,
            query,
            key,
            value,
            num_heads=sa.num_heads,
            batch_first=False,
            attention=_sparsemax,
            **zero,
            **masks,
        )
        out, w = sa(query, key, value, average_attn_weights=False, **masks)
        assert w.shape == mha(query, key, value, average_attn_weights=False, **masks)[1].shape
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1], dtype=F64))
        _check_grads(sa, params, inputs, out, want_out, w, want_w)
        out, _ = sa(query, key, value, need_weights=False, **masks)  # the fused path alone
        _check_grads(sa, params, inputs, out, want_out, torch.zeros(()), torch.zeros(()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extra", list(EXTRA_KEYS))
def test_appended_keys_take_the_mass_of_fully_padded_sequences(backend, extra):
    """A sequence whose keys are all padded still sees the appended keys (their mask columns are visible, as
    MHA's)."""
    _skip_unless(backend)
    sa, mha, params, zero = _extra_keys_modules("cross_odd_h3", True, backend, extra, mode="shrink")
    with torch.no_grad():
        sa.threshold.fill_(-5.0)  # below every score: each visible key, appended ones included, gets weight
    query, key, value = _inputs("cross_odd_h3", True)
    padding = torch.zeros(2, key.shape[1], dtype=torch.bool)
    padding[0] = True
    want_out, want_w = _by_hand(
        params,
        query,
        key,
        value,
        num_heads=3,
        batch_first=True,
        attention=_shrink(sa.threshold),
        **zero,
        key_padding_mask=padding,
    )
    out, w = sa(query, key, value, average_attn_weights=False, key_padding_mask=padding)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(w, want_w)
    m = key.shape[1]
    assert (w[0, ..., :m] == 0).all() and (w[0, ..., m:] > 0).all() and (w[1] > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extra", list(EXTRA_KEYS))
@pytest.mark.parametrize("case", ["self_h2", "unbatched_self"])
def test_appended_keys_stay_visible_under_is_causal(backend, extra, case):
    """is_causal (with its mask as the hint, or alone) is MHA's mask path: the causal mask plus visible columns
    for the appended keys, which sit past every query's position."""
    _skip_unless(backend)
    sa, mha, params, zero = _extra_keys_modules(case, False, backend, extra)
    query, key, value = _inputs(case, False)
    n, h = CASES[case][5], sa.num_heads
    causal = _causal(n, n)
    soft, _ = _by_hand(
        params, query, key, value, num_heads=h, batch_first=False, attention=_softmax, attn_mask=causal, **zero
    )
    torch.testing.assert_close(mha(query, key, value, is_causal=True, attn_mask=causal)[0], soft)
    want_out, want_w = _by_hand(
        params, query, key, value, num_heads=h, batch_first=False, attention=_sparsemax, attn_mask=causal, **zero
    )
    for masks in (dict(attn_mask=causal), {}):
        for need in (False, True):
            out, w = sa(query, key, value, is_causal=True, need_weights=need, average_attn_weights=False, **masks)
            torch.testing.assert_close(out, want_out)
            if need:
                torch.testing.assert_close(w, want_w)


@pytest.mark.parametrize("extra", list(EXTRA_KEYS))
def test_appended_keys_state_dict_and_repr_are_multihead_attentions(extra):
    kw = dict(EXTRA_KEYS[extra], dtype=F64)
    mha, sa = nn.MultiheadAttention(6, 2, **kw), SparseAttention(6, 2, backend="reference", **kw)
    assert {k: tuple(v.shape) for k, v in sa.state_dict().items()} == {
        k: tuple(v.shape) for k, v in mha.state_dict().items()
    }
    assert [n for n, _ in sa.named_parameters()] == [n for n, _ in mha.named_parameters()]
    with torch.no_grad():
        for p in mha.parameters():
            p.normal_()
    sa.load_state_dict(mha.state_dict())
    for name, flag in EXTRA_KEYS[extra].items():
        assert f"{name}={flag}" in repr(sa)
    if sa.bias_k is not None:  # MHA's initialisation: xavier_normal_, nonzero
        assert torch.equal(sa.bias_k, mha.bias_k)
        fresh = SparseAttention(6, 2, backend="reference", **kw)
        assert fresh.bias_k.abs().min() > 0 and fresh.bias_v.abs().min() > 0


# ------------------------------------------------------------------------------------------ fully masked rows
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["cross_odd_h3", "no_bias_h1"])
def test_a_query_that_sees_no_key_gets_zero_not_nan(backend, case):
    """MHA's need_weights=True branch gives NaN there (its SDPA branch 0 in this torch); SparseAttention's documented
    value is 0 (out = out_proj's bias, a zero weights row), with finite gradients equal to the pipeline's."""
    _skip_unless(backend)
    sa, mha, params = _modules(case, False, backend)
    query, key, value = (t.detach().requires_grad_() for t in _inputs(case, False))
    _, h, _, _, bias, n, m, b, _ = CASES[case]
    padding = torch.zeros(b, m, dtype=torch.bool)
    padding[0] = True  # every query of sequence 0
    hidden = torch.zeros(b * h, n, m, dtype=torch.bool)
    hidden[h + 1 % h, 2] = True  # query 2 of sequence 1, head 1 (or its only head)
    hidden[h:, 3, 1:] = True  # with padding[1, 0], query 3 of sequence 1 in every head
    padding[1, 0] = True
    masks = dict(key_padding_mask=padding, attn_mask=hidden)
    assert mha(query, key, value, need_weights=True, **masks)[0][:, 0].isnan().all()
    want_out, want_w = _by_hand(
        params, query, key, value, num_heads=h, batch_first=False, attention=_sparsemax, **masks
    )
    out, w = sa(query, key, value, need_weights=True, average_attn_weights=False, **masks)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(w, want_w)
    assert not out.isnan().any() and not w.isnan().any()
    zero = torch.zeros(m, dtype=F64)
    assert torch.equal(w[0], torch.zeros_like(w[0])) and torch.equal(w[1, :, 3], torch.zeros(h, m, dtype=F64))
    assert torch.equal(w[1, 1 % h, 2], zero)
    out_bias = sa.out_proj.bias if bias else torch.zeros(sa.embed_dim, dtype=F64)
    torch.testing.assert_close(out[:, 0], out_bias.expand(n, -1))
    torch.testing.assert_close(out[3, 1], out_bias)
    seen = torch.ones(b, h, n, dtype=torch.bool)
    seen[0], seen[1, :, 3] = False, False
    seen[1, 1 % h, 2] = False
    torch.testing.assert_close(w.sum(-1), seen.to(F64))
    _check_grads(sa, params, (query, key, value), out, want_out, w, want_w)
    doc = SparseAttention.forward.__doc__
    assert "0, not NaN" in doc and "weights row of zeros" in doc


# ---------------------------------------------------------------------------------------------- mask dtypes
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.int8, torch.complex128])
@pytest.mark.parametrize("name", ["key_padding_mask", "attn_mask"])
def test_integer_and_complex_masks_are_refused_by_name_as_mha_refuses_them(dtype, name):
    sa, mha, _ = _modules("self_h2", False, "reference")
    x, _, _ = _inputs("self_h2", False)
    mask = torch.zeros((3, 5) if name == "key_padding_mask" else (5, 5), dtype=dtype)
    if not dtype.is_complex:
        with pytest.raises(AssertionError, match="only bool and floating"):
            mha(x, x, x, **{name: mask})
    with pytest.raises(TypeError, match=f"{name} must be a bool or floating-point tensor"):
        sa(x, x, x, **{name: mask})


@pytest.mark.parametrize("mask_dtype", [torch.float16, torch.float32])
def test_float_masks_of_another_float_dtype_are_the_same_mask(mask_dtype):
    """MHA's SDPA branch takes a float mask of another dtype; so does SparseAttention (its values, rounded)."""
    sa, _, params = _modules("cross_odd_h3", False, "reference")
    query, key, value = _inputs("cross_odd_h3", False)
    masks = {k: v.to(mask_dtype) for k, v in _masks("cross_odd_h3", "kpm_float").items()}
    masks["attn_mask"] = _masks("cross_odd_h3", "attn_float_3d")["attn_mask"].to(mask_dtype)
    want, _ = _by_hand(
        params,
        query,
        key,
        value,
        num_heads=3,
        batch_first=False,
        attention=_sparsemax,
        **{k: v.to(F64) for k, v in masks.items()},
    )
    torch.testing.assert_close(sa(query, key, value, **masks)[0], want)


# ---------------------------------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_off_in_eval(backend):
    _skip_unless(backend)
    sa, _, params = _modules("cross_odd_h3", True, backend)
    sa.dropout = 0.5
    sa.eval()
    query, key, value = _inputs("cross_odd_h3", True)
    masks = _masks("cross_odd_h3", "kpm_bool_attn_float_3d")
    want_out, want_w = _by_hand(params, query, key, value, num_heads=3, batch_first=True, attention=_sparsemax, **masks)
    out, w = sa(query, key, value, need_weights=True, average_attn_weights=False, **masks)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(w, want_w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["cross_odd_h3", "unbatched_self"])
def test_dropout_in_training_drops_attention_weights_as_mha(backend, case):
    """MHA drops entries of the attention map (scaling the rest by 1/(1-p)) and returns the dropped map: the
    output must be the pipeline's with the map's dropped entries (read off the returned weights) removed."""
    _skip_unless(backend)
    p = 0.4
    sa, _, params = _modules(case, False, backend)
    sa.dropout = p
    sa.train()
    query, key, value = _inputs(case, False)
    masks = _masks(case, "kpm_bool")
    h = sa.num_heads
    _, full = _by_hand(params, query, key, value, num_heads=h, batch_first=False, attention=_sparsemax, **masks)
    support, kept = full > 0, 0
    for seed in range(4):
        torch.manual_seed(seed)
        out, w = sa(query, key, value, need_weights=True, average_attn_weights=False, **masks)
        keep = (w != 0).to(F64)
        torch.testing.assert_close(w, full * keep / (1 - p))
        want, _ = _by_hand(
            params,
            query,
            key,
            value,
            num_heads=h,
            batch_first=False,
            attention=_sparsemax,
            keep=keep,
            dropout=p,
            **masks,
        )
        torch.testing.assert_close(out, want)
        if seed == 0:
            _check_grads(sa, params, (), out, want, w, full * keep / (1 - p))
        kept += int(keep.bool()[support].sum())
    total = 4 * int(support.sum())
    # the fraction of the map's entries dropped: within 4 standard deviations of p
    assert abs(1 - kept / total - p) < 4 * math.sqrt(p * (1 - p) / total)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_without_need_weights_drops_attention_weights(backend):
    """Keys and values all one token: every visible key has weight 1/M and value v, so with dropout on the map
    out_i = (kept_i / (M (1 - p))) W_o W_v token, a multiple of one vector (dropout on the head outputs, what the
    layer did, scales their features independently)."""
    _skip_unless(backend)
    p = 0.5
    sa, _, params = _modules("no_bias_h1", False, backend)
    sa.dropout = p
    sa.train()
    query, key, _ = _inputs("no_bias_h1", False)
    m = key.shape[0]
    token = key[:1].expand_as(key)
    torch.manual_seed(0)
    out, w = sa(query, token, token, need_weights=False)
    assert w is None
    w_v = params["in_proj_weight"].chunk(3)[2]
    u = F.linear(F.linear(token[0], w_v), params["out_proj.weight"])  # (B, E)
    c = (out * u).sum(-1) / (u * u).sum(-1)  # (N, B)
    torch.testing.assert_close(out, c.unsqueeze(-1) * u)
    counts = c * m * (1 - p)
    torch.testing.assert_close(counts, counts.round())
    assert counts.min() >= 0 and counts.max() <= m and (counts < m - 0.5).any()


# -------------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case,mode",
    [(c, "sparsemax") for c in CASES] + [("cross_odd_h3", "shrink"), ("unbatched_kdim_vdim_h4", "shrink")],
)
def test_gradients_of_every_parameter_and_input(backend, case, mode):
    _skip_unless(backend)
    sa, _, params = _modules(case, False, backend, mode=mode)
    inputs = tuple(t.detach().requires_grad_() for t in dict.fromkeys(_inputs(case, False)))
    query, key, value = inputs if len(inputs) == 3 else inputs * 3
    masks = _masks(case, "kpm_bool_attn_float_3d")
    attention = _sparsemax if mode == "sparsemax" else _shrink(sa.threshold)
    h = sa.num_heads
    want_out, want_w = _by_hand(params, query, key, value, num_heads=h, batch_first=False, attention=attention, **masks)
    out, w = sa(query, key, value, need_weights=True, average_attn_weights=False, **masks)
    _check_grads(sa, params, inputs, out, want_out, w, want_w)
    out, _ = sa(query, key, value, **masks)  # the fused path alone
    _check_grads(sa, params, inputs, out, want_out, torch.zeros(()), torch.zeros(()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sparsemax", "shrink"])
def test_gradcheck_the_layer(backend, mode):
    """torch.autograd.gradcheck of the layer in float64, every parameter and input, with a key padding mask."""
    _skip_unless(backend)
    torch.manual_seed(0)
    shrink = dict(threshold=0.05) if mode == "shrink" else {}
    sa = SparseAttention(4, 2, kdim=3, vdim=5, batch_first=True, mode=mode, backend=backend, dtype=F64, **shrink)
    with torch.no_grad():
        sa.in_proj_bias.normal_()
    names = [n for n, _ in sa.named_parameters()]
    leaves = [
        torch.randn(2, 3, 4, dtype=F64),
        torch.randn(2, 4, 3, dtype=F64),
        torch.randn(2, 4, 5, dtype=F64),
        *(p.detach().clone() for p in sa.parameters()),
    ]
    leaves = [t.requires_grad_() for t in leaves]
    padding = torch.tensor([[False, False, True, False], [False, False, False, False]])

    def layer(query, key, value, *ps):
        return torch.func.functional_call(
            sa,
            dict(zip(names, ps)),
            (query, key, value),
            dict(key_padding_mask=padding, need_weights=True, average_attn_weights=False),
        )

    assert torch.autograd.gradcheck(layer, leaves)


# ----------------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["self_h2", "kdim_vdim", "unbatched_kdim_vdim_h4"])
def test_float32_against_the_pipeline_in_float64(backend, case):
    _skip_unless(backend)
    sa, mha, params = _modules(case, True, backend, dtype=torch.float32)
    inputs = _inputs(case, True, dtype=torch.float32)
    masks = _masks(case, "kpm_float_attn_bool_2d")
    masks = {k: v.float() if v.is_floating_point() else v for k, v in masks.items()}
    want_out, want_w = _by_hand(
        {k: v.detach().double() for k, v in params.items()},
        *(t.double() for t in inputs),
        num_heads=sa.num_heads,
        batch_first=True,
        attention=_sparsemax,
        **{k: v.double() if v.is_floating_point() else v for k, v in masks.items()},
    )
    out, w = sa(*inputs, need_weights=True, average_attn_weights=False, **masks)
    assert out.dtype == w.dtype == torch.float32 == mha(*inputs, need_weights=True, **masks)[1].dtype
    torch.testing.assert_close(out, want_out.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w, want_w.float(), atol=1e-5, rtol=1e-4)


# -------------------------------------------------------------------------------------------------- bad input
def _zeros(*shape, dtype=torch.bool, **kwargs):
    return torch.zeros(shape, dtype=dtype, **kwargs)


def _same(q, k, v):
    return q, k, v


def _unbatched(q, k, v):
    return q[:, 0], k[:, 0], v[:, 0]


# (description, inputs from query (5, 2, 6), key (4, 2, 3), value (4, 2, 5), keyword arguments, error, name in it)
BAD_CALLS = [
    ("query features", lambda q, k, v: (torch.randn(5, 2, 7, dtype=F64), k, v), {}, ValueError, "query"),
    ("query 1-D", lambda q, k, v: (q[0, 0], k, v), {}, ValueError, "query"),
    ("query 4-D", lambda q, k, v: (q[None], k, v), {}, ValueError, "query"),
    ("key features", lambda q, k, v: (q, torch.randn(4, 2, 6, dtype=F64), v), {}, ValueError, "key"),
    ("value features", lambda q, k, v: (q, k, torch.randn(4, 2, 3, dtype=F64)), {}, ValueError, "value"),
    ("key batch", lambda q, k, v: (q, torch.randn(4, 3, 3, dtype=F64), v), {}, ValueError, "key"),
    ("value batch", lambda q, k, v: (q, k, torch.randn(4, 3, 5, dtype=F64)), {}, ValueError, "value"),
    ("value length", lambda q, k, v: (q, k, v[:3]), {}, ValueError, "value"),
    ("key unbatched", lambda q, k, v: (q, k[:, 0], v), {}, ValueError, "key"),
    ("unbatched query, batched key", lambda q, k, v: (q[:, 0], k, v[:, 0]), {}, ValueError, "key"),
    ("query dtype", lambda q, k, v: (q.float(), k, v), {}, TypeError, "query"),
    ("key dtype", lambda q, k, v: (q, k.float(), v), {}, TypeError, "key"),
    ("value integer", lambda q, k, v: (q, k, v.long()), {}, TypeError, "value"),
    ("kpm length", _same, dict(key_padding_mask=_zeros(2, 5)), ValueError, "key_padding_mask"),
    ("kpm batch", _same, dict(key_padding_mask=_zeros(3, 4)), ValueError, "key_padding_mask"),
    ("kpm 1-D batched", _same, dict(key_padding_mask=_zeros(4)), ValueError, "key_padding_mask"),
    ("kpm 2-D unbatched", _unbatched, dict(key_padding_mask=_zeros(1, 4)), ValueError, "key_padding_mask"),
    ("attn_mask (N, N)", _same, dict(attn_mask=_zeros(5, 5)), ValueError, "attn_mask"),
    ("attn_mask (M, N)", _same, dict(attn_mask=_zeros(4, 5)), ValueError, "attn_mask"),
    ("attn_mask (B, N, M)", _same, dict(attn_mask=_zeros(2, 5, 4)), ValueError, "attn_mask"),
    ("attn_mask (B*H, N, N)", _same, dict(attn_mask=_zeros(4, 5, 5)), ValueError, "attn_mask"),
    ("attn_mask 4-D", _same, dict(attn_mask=_zeros(2, 2, 5, 4)), ValueError, "attn_mask"),
    ("attn_mask 1-D", _same, dict(attn_mask=_zeros(4)), ValueError, "attn_mask"),
    ("unbatched attn_mask (H+1, N, M)", _unbatched, dict(attn_mask=_zeros(3, 5, 4)), ValueError, "attn_mask"),
    # broadcastable to (B, H, N, M), so functional took them, but MHA refuses them: the layer accepted them
    ("attn_mask (1, M)", _same, dict(attn_mask=_zeros(1, 4)), ValueError, "attn_mask"),
    ("attn_mask (N, 1)", _same, dict(attn_mask=_zeros(5, 1)), ValueError, "attn_mask"),
    ("attn_mask (1, 1)", _same, dict(attn_mask=_zeros(1, 1)), ValueError, "attn_mask"),
    ("attn_mask (B*H, 1, M)", _same, dict(attn_mask=_zeros(4, 1, 4)), ValueError, "attn_mask"),
    ("attn_mask (B*H, N, 1)", _same, dict(attn_mask=_zeros(4, 5, 1)), ValueError, "attn_mask"),
    ("unbatched attn_mask (1, M)", _unbatched, dict(attn_mask=_zeros(1, 4)), ValueError, "attn_mask"),
    ("is_causal, attn_mask (1, M)", _same, dict(attn_mask=_zeros(1, 4), is_causal=True), ValueError, "attn_mask"),
    ("attn_mask integer", _same, dict(attn_mask=_zeros(5, 4, dtype=torch.int64)), TypeError, "attn_mask"),
    ("is_causal, attn_mask shape", _same, dict(attn_mask=_zeros(4, 5), is_causal=True), ValueError, "attn_mask"),
    (
        "is_causal, attn_mask integer",
        _same,
        dict(attn_mask=_zeros(5, 4, dtype=torch.int64), is_causal=True),
        TypeError,
        "attn_mask",
    ),
    ("is_causal, attn_mask list", _same, dict(attn_mask=[[0.0]], is_causal=True), TypeError, "attn_mask"),
]


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("desc,inputs,kwargs,error,name", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_is_refused_by_name_before_any_kernel_runs(
    monkeypatch, need_weights, desc, inputs, kwargs, error, name
):
    def reached(*args, **kwargs):
        raise AssertionError("the attention op ran on bad input")

    monkeypatch.setattr(DF.sparse_attention_ops, "run", reached)
    monkeypatch.setattr(DF, "sparse_attention_weights_ref", reached)
    m = SparseAttention(6, 2, kdim=3, vdim=5, backend="reference", dtype=F64)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen, dtype=F64) for shape in ((5, 2, 6), (4, 2, 3), (4, 2, 5)))
    with pytest.raises(error, match=name):
        m(*inputs(q, k, v), need_weights=need_weights, **kwargs)


# ------------------------------------------------------------------------------------- signature, attributes
def test_signature_and_attributes_are_multihead_attentions():
    """Arguments in MHA's order with its defaults (key and value default to the query here), and the attributes
    MHA's users read (nn.Transformer* read batch_first, _qkv_same_embed_dim, in_proj_bias, ...)."""
    import inspect

    def params(f):
        return [(p.name, p.default) for p in inspect.signature(f).parameters.values()]

    init = params(SparseAttention.__init__)
    assert init[: len(params(nn.MultiheadAttention.__init__))] == params(nn.MultiheadAttention.__init__)
    fwd, mha_fwd = params(SparseAttention.forward), params(nn.MultiheadAttention.forward)
    assert [n for n, _ in fwd] == [n for n, _ in mha_fwd]
    differ = {n for (n, d), (_, md) in zip(fwd, mha_fwd) if d != md and n not in ("key", "value")}
    assert differ == set()
    extra_keys = (dict(add_bias_kv=True), dict(add_zero_attn=True), dict(add_bias_kv=True, add_zero_attn=True))
    for kw in ({}, dict(kdim=3, vdim=5), dict(bias=False), *extra_keys):
        sa, mha = SparseAttention(6, 2, **kw), nn.MultiheadAttention(6, 2, **kw)
        for name in ("bias_k", "bias_v", "in_proj_weight", "in_proj_bias", "q_proj_weight"):
            assert (getattr(sa, name) is None) == (getattr(mha, name) is None), name
        assert sa.add_zero_attn is mha.add_zero_attn is kw.get("add_zero_attn", False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_a_transformer_encoder_layer_with_the_fast_path_off(backend):
    """Swapped into nn.TransformerEncoderLayer: in inference the fast path (MHA's fused softmax kernel) refuses with
    a message naming the switch; with it off the layer calls SparseAttention, as in training."""
    _skip_unless(backend)
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True, dtype=F64).eval()
    sa = SparseAttention(8, 2, batch_first=True, backend=backend, dtype=F64)
    layer.self_attn = sa
    x = torch.randn(2, 5, 8, dtype=F64)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    want = layer(x, src_key_padding_mask=padding)  # grad enabled: the slow path
    h = x + sa(x, x, x, key_padding_mask=padding)[0]
    h = layer.norm1(h)
    torch.testing.assert_close(want, layer.norm2(h + layer.linear2(F.relu(layer.linear1(h)))))
    with torch.no_grad():
        with pytest.raises(NotImplementedError, match=r"set_fastpath_enabled\(False\)"):
            layer(x, src_key_padding_mask=padding)
        enabled = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            torch.testing.assert_close(layer(x, src_key_padding_mask=padding), want)
        finally:
            torch.backends.mha.set_fastpath_enabled(enabled)
    assert "set_fastpath_enabled(False)" in SparseAttention.__doc__


# --------------------------------------------------------------------------- non-finite keys and values, masked
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["key", "value"])
@pytest.mark.parametrize("bad", [float("nan"), INF])
def test_a_masked_non_finite_key_or_value_leaves_rows_finite_where_mha_gives_nan(backend, where, bad):
    """MHA adds its masks to the scores (NaN + -inf = NaN) and multiplies hidden values by 0, so a NaN or inf at a
    padded position makes every row NaN; SparseAttention's rule (design.md: a row is NaN when a key or value row
    it sees holds NaN or inf) keeps them finite: a divergence its docstring states."""
    _skip_unless(backend)
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, dtype=F64).eval()
    sa = SparseAttention(8, 2, dtype=F64, backend=backend).eval()
    sa.load_state_dict(mha.state_dict())
    query = torch.randn(3, 2, 8, dtype=F64)
    key, value = torch.randn(4, 2, 8, dtype=F64), torch.randn(4, 2, 8, dtype=F64)
    {"key": key, "value": value}[where][3, 0] = bad
    padding = torch.zeros(2, 4, dtype=torch.bool)
    padding[0, 3] = True
    assert mha(query, key, value, key_padding_mask=padding)[0][:, 0].isnan().all()
    out, w = sa(query, key, value, key_padding_mask=padding)
    assert out.isfinite().all() and w.isfinite().all()
    assert sa(query, key, value)[0][:, 0].isnan().all()  # seen, even where its weight is 0
    assert "leaves that query's row finite" in SparseAttention.forward.__doc__
