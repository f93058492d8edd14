"""S10: unrolled convolutional ISTA computed by a stack of transformer blocks.

The problem is S3's: a 1-D Barker-13 dictionary (mu = 1/13), s = 4, q = (2s - 1) mu, analytic weights W = D and the
geometric threshold schedule. The network is a stack of ordinary transformer blocks on a token stream
h: (B, N, F), one token per signal position t = 0..n-1, without layer norm:

    h <- h + sum_heads Attention(h W_Q^head, h W_K, h W_V) W_O^head      (attention sublayer, residual)
    h <- h + ReLU(h W_1 + b_1) W_2                                       (MLP sublayer, residual)

Stream channels: the signal x_t, the code z_t, b_t = (D^T x)_t, an accumulator, a padding flag (tokens t >= m,
where m is the code length, hold no code) and a positional encoding e_t = (cos, sin)(2 pi f t / n), f = 1..F.
The convolution is a sum of shifts, and one head realises one shift: its query is e_p rotated by the offset o,
so the score beta <e_{p+o}, e_t> is largest at t = p + o (mod n), by a margin Delta over every other token.
    block 0:    heads o = 0..k-1 read x, W_O adds w_o times each into b        -> b = D^T x
    block i>=1: heads o = -(k-1)..k-1 read z, W_O adds a_o into the accumulator -> acc = D^T D z
                (a_o = sum_j w_j w_{j+o}, the filter's autocorrelation); the MLP computes
                z <- S_theta_i(z + b - acc) with the ReLU pair S_t(u) = ReLU(u - t) - ReLU(-u - t), a large negative
                bias on padding tokens (their z stays 0, so shifts past the code's ends read zeros: zero padding),
                and resets the accumulator (ReLU(v) - ReLU(-v) = v).
So block i computes LISTA-CP iteration i exactly when every head's attention is the one-hot map of its shift:
- sparsemax attention at inverse temperature beta >= 1/Delta is exactly one-hot (sparsemax keeps only scores
  within 1 of the row's largest); shrink attention with threshold beta*F - 1 keeps exactly the largest score, at
  weight 1. Both: the blocks are ISTA (S10a), and the error decays at the S3 rate with no floor.
- softmax attention puts weight eps(beta) = 1 - P_target ~ 2 exp(-beta Delta) on other tokens, an error of at most
  eta(beta) = 2 eps (||w||_1 ||x||_inf + ||a||_1 Z) per iteration in the pre-activation (Z bounds |z|). LISTA-CP
  theory with that eta in place of the noise term (thresholds theta_k = mu s B q^k + mu C eta + eta) gives
  err_k <= s B q^k + C eta(beta), and the blocks stay within C eta(beta) of exact attention (S10b). The leak is one
  circulant smoothing of x and of D z alike, so it cancels at the true code: the deviation dies out, and the floor
  is the bias of the eta(beta) term in the thresholds, not an error softmax leaves.
The seed paper claims rates for "self-attention and transformer-based models" [P]; this construction is a
reconstruction [R] (docs/theory.md §5.2), the constants are LISTA-CP's [L].
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import functional as DF
from .. import theory
from ..data import ConvDictionary, barker_filter, conv_dictionary, dsc_problem
from .common import ClaimResult, decay_slope, fit_slope, lista_cp, resolution

# stream channels; the positional encoding follows
X, Z, B_CH, ACC, PAD, POS = 0, 1, 2, 3, 4, 5
ATTENTIONS = ("sparsemax", "shrink", "softmax")


@dataclass
class Block:
    """Weights of one transformer block on a stream of F channels.

    w_q: (H, F, P) per-head query projections; w_k: (F, P) key projection shared by the heads; w_v: (F, 1) value
    projection (one channel); w_o: (H, F) how each head's output enters the stream; mlp: (w_1 (F, M), b_1 (M,),
    w_2 (M, F)) or None for an attention-only block.
    """

    w_q: torch.Tensor
    w_k: torch.Tensor
    w_v: torch.Tensor
    w_o: torch.Tensor
    mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kind: str, beta: float, top: float, backend: str
) -> torch.Tensor:
    """O = P v with scores beta q k^T. q: (B, H, N, P); k: (B, H, N, P); v: (B, H, N, 1) -> (B, H, N, 1).

    kind "sparsemax" / "shrink" (threshold beta*top - 1, top = the largest possible score) go through
    functional.sparse_attention; "softmax" is dense torch softmax.
    """
    if kind == "softmax":
        return torch.softmax(beta * q @ k.transpose(-1, -2), dim=-1) @ v
    if kind == "sparsemax":
        return DF.sparse_attention(q, k, v, mode="sparsemax", scale=beta, backend=backend)
    if kind == "shrink":
        return DF.sparse_attention(q, k, v, mode="shrink", threshold=beta * top - 1.0, scale=beta, backend=backend)
    raise ValueError(f"attention must be one of {ATTENTIONS}, got {kind!r}")


def run_block(h: torch.Tensor, blk: Block, *, kind: str, beta: float, top: float, backend: str) -> torch.Tensor:
    """One block on the stream h: (B, N, F) -> (B, N, F)."""
    bsz, n, _ = h.shape
    heads = blk.w_q.shape[0]
    q = h[:, None] @ blk.w_q  # (B, H, N, P)
    k = (h @ blk.w_k)[:, None].expand(bsz, heads, n, -1).contiguous()
    v = (h @ blk.w_v)[:, None].expand(bsz, heads, n, 1).contiguous()
    o = attention(q, k, v, kind=kind, beta=beta, top=top, backend=backend)[..., 0]  # (B, H, N)
    h = h + o.transpose(1, 2) @ blk.w_o
    if blk.mlp is not None:
        w1, b1, w2 = blk.mlp
        h = h + F.relu(h @ w1 + b1) @ w2
    return h


def _frequencies(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """The fewest frequencies 1..F whose score kernel sum_f cos(2 pi f delta / n) has a margin >= 1 at delta != 0.

    Returns (frequencies (F,), margin Delta = F - max_{delta != 0} sum_f cos(2 pi f delta / n))."""
    delta = torch.arange(1, n, dtype=torch.float64)
    for top in range(1, n):
        fr = torch.arange(1, top + 1, dtype=torch.float64)
        margin = top - float(torch.cos(2 * math.pi * delta[:, None] * fr / n).sum(1).max())
        if margin >= 1.0:
            return fr.to(dtype), margin
    raise ValueError(f"no frequency set separates {n} positions")


@dataclass
class ISTATransformer:
    """The block stack for one dictionary: `embed` (b = D^T x) then one ISTA block per threshold.

    freqs: (F,) positional frequencies; margin: Delta, the score gap between a head's target token and any other;
    w_l1 = ||w||_1 and a_l1 = ||a||_1 (the filter and its autocorrelation) size the softmax error."""

    embed: Block
    iterate: list[Block]
    n_tokens: int
    code_len: int
    freqs: torch.Tensor
    margin: float
    w_l1: float
    a_l1: float

    @property
    def top(self) -> float:
        """The largest score <e_p, e_p> = F."""
        return float(self.freqs.numel())

    def positions(self, t: torch.Tensor) -> torch.Tensor:
        """Positional encoding e_t: (N,) -> (N, 2F)."""
        ang = 2 * math.pi * t[:, None] * self.freqs / self.n_tokens
        return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, n) signal -> stream (B, n, F): x, zero code, zero b and accumulator, padding flag, positions."""
        n, m = self.n_tokens, self.code_len
        t = torch.arange(n, dtype=self.freqs.dtype, device=self.freqs.device)
        h = torch.zeros(x.shape[0], n, POS + 2 * self.freqs.numel(), dtype=x.dtype, device=x.device)
        h[:, :, X] = x[:, 0]
        h[:, :, PAD] = (t >= m).to(x.dtype)
        h[:, :, POS:] = self.positions(t)
        return h

    def __call__(self, x: torch.Tensor, *, kind: str, beta: float, backend: str = "auto") -> list[torch.Tensor]:
        """x: (B, 1, n) -> the code after every ISTA block, each (B, 1, m)."""
        h = run_block(self.tokens(x), self.embed, kind=kind, beta=beta, top=self.top, backend=backend)
        out = []
        for blk in self.iterate:
            h = run_block(h, blk, kind=kind, beta=beta, top=self.top, backend=backend)
            out.append(h[:, : self.code_len, Z][:, None])
        return out


def _rotation(freqs: torch.Tensor, offset: int, n: int) -> torch.Tensor:
    """(2F, 2F) matrix R with e_t R = e_{t+offset} for the row vector e_t = (cos, sin): a rotation per frequency."""
    ang = 2 * math.pi * freqs * offset / n
    c, s = torch.diag(torch.cos(ang)), torch.diag(torch.sin(ang))
    # cos(x + y) = cos x cos y - sin x sin y, sin(x + y) = sin x cos y + cos x sin y
    return torch.cat([torch.cat([c, s], 1), torch.cat([-s, c], 1)], 0)


def build_transformer(
    d: ConvDictionary, thresholds, *, device: str | torch.device = "cpu", big: float = 1e6
) -> ISTATransformer:
    """The block stack computing len(thresholds) LISTA-CP iterations for a single-channel 1-D dictionary, padding 0,
    stride 1 (so x has n = m + k - 1 samples for a code of length m). `big` exceeds every |u|: the bias that keeps
    padding tokens' codes at zero."""
    if d.ndim != 1 or d.weight.shape[:2] != (1, 1) or d.stride != (1,) or d.padding != (0,):
        raise ValueError("build_transformer needs a single-channel 1-D dictionary with stride 1 and padding 0")
    w = d.weight.flatten()
    dtype, k, m = w.dtype, w.numel(), d.code_size[0]
    n = m + k - 1
    freqs, margin = _frequencies(n, dtype)
    pos = 2 * freqs.numel()
    width = POS + pos
    a = {o: float((w[max(0, -o) : k - max(0, o)] * w[max(0, o) : k - max(0, -o)]).sum()) for o in range(-(k - 1), k)}

    def shift_heads(offsets, weights, source, target):
        w_q = torch.zeros(len(offsets), width, pos, dtype=dtype)
        w_o = torch.zeros(len(offsets), width, dtype=dtype)
        for i, (o, c) in enumerate(zip(offsets, weights)):
            w_q[i, POS:, :] = _rotation(freqs, o, n)  # q_p = e_{p+o}
            w_o[i, target] = c
        w_k = torch.zeros(width, pos, dtype=dtype)
        w_k[POS:, :] = torch.eye(pos, dtype=dtype)
        w_v = torch.zeros(width, 1, dtype=dtype)
        w_v[source, 0] = 1.0
        return w_q, w_k, w_v, w_o

    embed = Block(*shift_heads(list(range(k)), [float(v) for v in w], X, B_CH))
    offsets = list(a)
    w_q, w_k, w_v, w_o = shift_heads(offsets, [a[o] for o in offsets], Z, ACC)
    blocks = []
    for theta in thresholds:
        # hidden units: ReLU(u - theta - big*pad), ReLU(-u - theta - big*pad), ReLU(+-z), ReLU(+-acc); u = z + b - acc
        w1 = torch.zeros(width, 6, dtype=dtype)
        w1[Z, 0], w1[B_CH, 0], w1[ACC, 0], w1[PAD, 0] = 1.0, 1.0, -1.0, -big
        w1[Z, 1], w1[B_CH, 1], w1[ACC, 1], w1[PAD, 1] = -1.0, -1.0, 1.0, -big
        w1[Z, 2], w1[Z, 3], w1[ACC, 4], w1[ACC, 5] = 1.0, -1.0, 1.0, -1.0
        b1 = torch.tensor([-theta, -theta, 0, 0, 0, 0], dtype=dtype)
        w2 = torch.zeros(6, width, dtype=dtype)
        w2[0, Z], w2[1, Z], w2[2, Z], w2[3, Z] = 1.0, -1.0, -1.0, 1.0  # z <- S_theta(u)
        w2[4, ACC], w2[5, ACC] = -1.0, 1.0  # acc <- 0
        blocks.append(Block(w_q, w_k, w_v, w_o, (w1, b1, w2)))
    mv = lambda t: t.to(device)  # noqa: E731
    moved = [
        Block(mv(b.w_q), mv(b.w_k), mv(b.w_v), mv(b.w_o), None if b.mlp is None else tuple(map(mv, b.mlp)))
        for b in [embed, *blocks]
    ]
    return ISTATransformer(
        moved[0], moved[1:], n, m, mv(freqs), margin, float(w.abs().sum()), float(sum(abs(v) for v in a.values()))
    )


def off_target_weight(net: ISTATransformer, beta: float) -> float:
    """eps(beta) = 1 - softmax weight on the target token (the same for every head and row: the scores are
    circulant)."""
    e = net.positions(torch.arange(net.n_tokens, dtype=net.freqs.dtype, device=net.freqs.device)).double()
    p = torch.softmax(beta * e[0] @ e.T, dim=-1)
    return float(p[1:].sum())


def _problem(quick: bool, dtype: torch.dtype):
    d = conv_dictionary(barker_filter(13, dtype=dtype), 40 if quick else 96)
    s = 4
    p = dsc_problem([d], s, batch=4 if quick else 8, seed=0)
    return d, s, p


def transformer_blocks(
    *, quick: bool = False, backend: str = "auto", device: str = "cpu", dtype: torch.dtype = torch.float64
) -> list[ClaimResult]:
    """S10a: sparsemax and shrink attention blocks reproduce LISTA-CP exactly; S10b: softmax blocks at inverse
    temperature beta stay within C eta(beta) ∝ exp(-beta Delta) of exact attention, and with thresholds that absorb
    eta(beta) decay at the same rate to those thresholds' floor <= C eta(beta)."""
    t0 = time.perf_counter()
    d, s, p = _problem(quick, dtype)
    x, truth = p.x.to(device, dtype), p.codes[0].to(device, dtype)
    B = p.amplitude[0]
    q = theory.lista_cp_rate(s, d.mu)
    C = theory.lista_cp_noise_gain(s, q)
    n_blocks = 30 if quick else 40
    machine = resolution(dtype, float(x.abs().max()))

    def schedule(eta: float) -> np.ndarray:
        return theory.geometric_thresholds(d.mu * s * B, q, n_blocks, floor=d.mu * C * eta + eta)

    def errors(codes: list[torch.Tensor]) -> tuple[np.ndarray, int]:
        err = [float(truth.flatten(1).norm(dim=1).max())]
        err += [float((c - truth).flatten(1).norm(dim=1).max()) for c in codes]
        fp = sum(int(((c != 0) & (truth == 0)).sum()) for c in codes)
        return np.array(err), fp

    # (a) exact attention against LISTA-CP through functional.conv_ista, same thresholds
    sched = schedule(machine)
    bound = theory.lista_cp_error_bound(np.arange(n_blocks + 1), s, B, q, C, machine)
    ista = lista_cp(x, d, truth, n_blocks, lambda k, err: float(sched[k]), backend=backend, keep_iterates=True)
    net = build_transformer(d, sched, device=device)
    beta_exact = 2.0 / net.margin
    exact, diffs, fps = {}, {}, {}
    for kind in ("sparsemax", "shrink"):
        codes = net(x, kind=kind, beta=beta_exact, backend=backend)
        exact[kind], fps[kind] = errors(codes)
        diffs[kind] = max(float((c - z).abs().max()) for c, z in zip(codes, ista.iterates))
    slopes = {kind: decay_slope(e, float(e[-3:].mean()))[0] for kind, e in exact.items()}
    tol = resolution(dtype, B)
    within = all(bool((e <= bound * (1 + 1e-9)).all()) for e in exact.values())
    final = max(e[-1] for e in exact.values())
    holds_a = (
        all(v <= tol for v in diffs.values())
        and within
        and sum(fps.values()) == 0
        # the geometric schedule sets the rate (S3); the evidence here is the equality with conv_ista
        and all(abs(v - np.log(q)) <= 0.02 for v in slopes.values())
    )
    res_a = ClaimResult(
        id="S10a",
        claim="transformer blocks (shift attention + shrink MLP) compute unrolled conv ISTA exactly with sparsemax "
        "or shrink attention: exponential decay in the number of blocks, no floor",
        theory=f"blocks = LISTA-CP iterations (difference ≤ {tol:.1e}); error ≤ s·B·q^k, slope = log q = "
        f"{np.log(q):.3f} ± 0.02 (the geometric schedule's rate); Δ = {net.margin:.3f}, β = 2/Δ",
        measured="max |blocks − ISTA| "
        + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
        + "; slopes "
        + ", ".join(f"{v:.3f}" for v in slopes.values())
        + f"; error after {n_blocks} blocks {final:.1e}; false positives {sum(fps.values())}",
        holds=bool(holds_a),
        source="[P] existence; [R] construction; [L] rate (Chen et al. 2018)",
        curves={"k": np.arange(n_blocks + 1), "exact": exact, "ista": ista.err_l2.max(1), "bound": bound, "q": q},
        seconds=time.perf_counter() - t0,
    )

    # (b) softmax at several beta: thresholds carry the attention error eta(beta) as LISTA-CP's noise term. The
    # attention error itself is measured as the distance to exact attention run with the same thresholds.
    t1 = time.perf_counter()
    # eta(beta) from ~0.1 (above that the thresholds zero every code) down to well above rounding: e^(-18) in
    # float64, e^(-10) in float32
    beta_deltas = [6.0, 9.0, 12.0, 15.0, 18.0] if dtype == torch.float64 else [5.5, 7.0, 8.5, 10.0]
    if quick:
        beta_deltas = beta_deltas[:4]
    betas = [bd / net.margin for bd in beta_deltas]
    z_bound = 2.0 * B
    x_max = float(x.abs().max())
    floors, etas, eps_list, devs, last_devs, curves_b, ok, biggest = [], [], [], [], [], {}, True, 0.0
    for beta in betas:
        eps = off_target_weight(net, beta)
        eta = 2 * eps * (net.w_l1 * x_max + net.a_l1 * z_bound) + machine
        soft = build_transformer(d, schedule(eta), device=device)
        codes = soft(x, kind="softmax", beta=beta, backend=backend)
        reference = soft(x, kind="sparsemax", beta=beta_exact, backend=backend)
        err, fp = errors(codes)
        dev = [float((c - r).flatten(1).norm(dim=1).max()) for c, r in zip(codes, reference)]
        bound_b = theory.lista_cp_error_bound(np.arange(n_blocks + 1), s, B, q, C, eta)
        biggest = max(biggest, max(float(c.abs().max()) for c in codes))
        ok = ok and fp == 0 and bool((err <= bound_b * (1 + 1e-9)).all())
        floors.append(float(err[-1]))
        devs.append(max(dev))
        last_devs.append(dev[-1])
        etas.append(eta)
        eps_list.append(eps)
        curves_b[beta] = err
    floors_a, etas_a, devs_a = np.array(floors), np.array(etas), np.array(devs)
    below = bool((floors_a <= C * etas_a).all()) and bool((devs_a <= C * etas_a).all())
    # the deviation is linear in eps(beta), whose log-slope tends to -Delta from below as the nearest competitors
    # dominate; exact attention in place of softmax (no deviation) or a wrong temperature fails this
    eps_slope = fit_slope(betas, np.log(np.array(eps_list)))
    dev_slope = fit_slope(betas, np.log(np.maximum(devs_a, np.finfo(float).tiny)))
    rel = abs(dev_slope / eps_slope - 1)
    # the leak is one circulant smoothing of x and of D z alike, so the true code stays a fixed point: the floor is
    # the bias of the thresholds' eta(beta) term, and the last block sits on exact attention's result
    own_floor = float(max(dv / f for dv, f in zip(last_devs, floors)))
    holds_b = ok and below and biggest <= z_bound and rel <= 0.1 and own_floor <= 0.05
    res_b = ClaimResult(
        id="S10b",
        claim="softmax attention at inverse temperature β: the blocks stay within C·η(β) ∝ e^(−βΔ) of exact attention; "
        "with thresholds that absorb η(β), the same decay down to the thresholds' floor",
        theory=f"max_k ‖Γ_softmax^k − Γ_exact^k‖ ≤ C·η(β), η(β) = 2ε(β)(‖w‖₁‖x‖∞ + ‖a‖₁·2B), ε(β) ≈ 2e^(−βΔ), "
        f"d log(deviation)/dβ = d log ε/dβ = {eps_slope:.3f} here (±10%), → −Δ = {-net.margin:.3f} as β grows; "
        "error ≤ s·B·q^k + C·η(β) at every block; softmax adds no floor of its own (last-block deviation ≤ 5% "
        "of the floor)",
        measured=f"deviation slope {dev_slope:.3f} over β·Δ ∈ [{beta_deltas[0]:g}, {beta_deltas[-1]:g}]; "
        f"max deviation/(C·η) {float((devs_a / (C * etas_a)).max()):.2g}; "
        f"max floor/(C·η) {float((floors_a / (C * etas_a)).max()):.2g}; last-block deviation/floor {own_floor:.1e}; "
        f"bound at every block {'holds' if ok else 'violated'}; max |z| {biggest:.2f} ≤ 2B = {z_bound:.2f}",
        holds=bool(holds_b),
        source="[P] existence; [R] construction, deviation and fixed point; [L] LISTA-CP constants",
        curves={
            "beta": np.array(betas),
            "floor": floors_a,
            "deviation": devs_a,
            "eta": etas_a,
            "eps": np.array(eps_list),
            "C": C,
            "margin": net.margin,
            "errors": curves_b,
            "k": np.arange(n_blocks + 1),
        },
        note=f"ε(β) is the softmax weight off the target token (Δ = {net.margin:.3f}: the score margin of the "
        "positional encoding). The deviation from exact attention (same thresholds) is largest in the first blocks "
        "and dies out: the leak smooths x and D z alike, so it cancels at the true code. The floor is the bias of "
        "thresholds that include η(β), the price of a support that stays clean while the blocks deviate",
        seconds=time.perf_counter() - t1,
    )
    return [res_a, res_b]
