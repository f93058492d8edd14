"""Multi-layer DSC: layer-to-layer propagation (S8) and l0 stability of the recovered codes (S2).

Layer-wise pursuit as docs/theory.md §3.2: LISTA-CP on x with D_1, then on the estimate of Gamma_1 with D_2; the
error of layer j−1 is layer j's noise. Layer 1 is a Barker-13 code (mu = 1/13); layer 2 the pair filter [1, 1]/sqrt2
(mu = 1/2), which keeps Gamma_1 = D_2 Gamma_2 sparse: s_1 = 2 s_2, so s_2 = 1 satisfies every condition
(q = 3/13, 1/2) and s_2 = 2 breaks layer 2's (q_2 = 3/2), as docs/theory.md §4.2 describes.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .. import theory
from ..data import ConvDictionary, barker_filter, dictionary_chain, dsc_problem, golomb_filter
from .common import ClaimResult, fit_slope, lista_cp, noise_eta, resolution, support_atoms


def _chain(quick: bool, dtype: torch.dtype) -> list[ConvDictionary]:
    return dictionary_chain([barker_filter(13, dtype=dtype), golomb_filter([0, 1], dtype=dtype)], 24 if quick else 48)


def _layer(
    y: torch.Tensor, d: ConvDictionary, truth: torch.Tensor, clean: torch.Tensor, s: int, n_iter: int, backend: str
):
    """LISTA-CP with oracle thresholds on one layer; `y − clean` is the noise this layer sees."""
    eta = noise_eta(d, y - clean) + resolution(y.dtype, float(y.abs().max()))
    return lista_cp(y, d, truth, n_iter, lambda k, err: theory.oracle_threshold(err.l1, d.mu, eta), backend=backend)


def _cascade(p, s2: int, n_iter: int, backend: str, device: str):
    x = p.x.to(device)
    g1, g2 = (c.to(device) for c in p.codes)
    t1 = _layer(x, p.dictionaries[0], g1, p.clean.to(device), 2 * s2, n_iter, backend)
    t2 = _layer(t1.z, p.dictionaries[1], g2, g1, s2, n_iter, backend)
    # the rounding-level part of each layer's eta (see _layer), for the bound
    machine = [resolution(x.dtype, float(x.abs().max())), resolution(x.dtype, float(t1.z.abs().max()))]
    return float(t1.err_l2[-1].max()), float(t2.err_l2[-1].max()), machine


def layer_propagation(
    *, quick: bool = False, backend: str = "auto", device: str = "cpu", dtype: torch.dtype = torch.float64
) -> ClaimResult:
    """S8: with every q_j < 1 both layers converge linearly in the iterations per layer (rate max_j q_j);
    with q_2 ≥ 1 layer 2 may stall (the guarantee is only sufficient)."""
    t0 = time.perf_counter()
    ds = _chain(quick, dtype)
    Ks = [1, 2, 3, 4, 6, 8, 10, 12] if quick else [1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24]
    curves = {"K": np.array(Ks)}
    for s2 in (1, 2):
        p = dsc_problem(ds, s2, batch=6 if quick else 16, seed=3 + s2)
        errs = [_cascade(p, s2, K, backend, device) for K in Ks]
        machine = np.max([e[2] for e in errs], axis=0)
        qs = [theory.lista_cp_rate(p.sparsity[0], ds[0].mu), theory.lista_cp_rate(p.sparsity[1], ds[1].mu)]
        curves[f"s2={s2}"] = {
            "err1": np.array([e[0] for e in errs]),
            "err2": np.array([e[1] for e in errs]),
            "q": qs,
            "bound2": theory.deep_error_bound(np.array(Ks), p.sparsity, p.amplitude, qs, machine)
            if max(qs) < 1
            else None,
        }
    good, bad = curves["s2=1"], curves["s2=2"]
    q_max = max(good["q"])
    res = resolution(dtype)
    live = good["err2"] > 10 * res
    slope = fit_slope(np.array(Ks)[live], np.log(good["err2"][live]))
    # the recursion is an equality here (see the note): allow for rounding
    within = bool((good["err2"] <= good["bound2"] * (1 + 1e-9)).all())
    stalled = bad["err2"][-1] > 0.1 * bad["err2"][0]
    # the same 0.02 fitting tolerance as the other slope claims: the late per-step slopes equal log max q exactly
    # (an equality recursion), so an exact comparison held only by the steeper early steps outweighing the flattening
    # near the floor (1.7% margin in float64, 0.7% in float32, on every problem seed)
    holds = within and slope <= np.log(q_max) + 0.02
    return ClaimResult(
        id="S8",
        claim="2-layer DSC, layer-wise LISTA-CP: converges linearly when every q_j < 1; may stall when some q_j ≥ 1",
        theory=f"q = ({good['q'][0]:.3f}, {good['q'][1]:.3f}): slope ≤ log max q = {np.log(q_max):.3f} (+ 0.02); "
        f"layer-2 error ≤ (†) bound at every K; q = ({bad['q'][0]:.3f}, {bad['q'][1]:.3f}): no guarantee",
        measured=f"slope of layer-2 error {slope:.3f}, max err/(†) {float((good['err2'] / good['bound2']).max()):.4f}; "
        f"with q_2 = {bad['q'][1]:.2f} "
        f"layer 2 {'stalls' if stalled else 'still converges'} at {bad['err2'][-1]:.2g} "
        f"(layer 1: {bad['err1'][-1]:.2g})",
        holds=bool(holds),
        source="[R] (†) from [L] Chen et al. 2018 per layer; stall [C]",
        curves=curves,
        note="with one active atom per layer-2 code the oracle recursion is an equality, so err/(†) tends to 1",
        seconds=time.perf_counter() - t0,
    )


def _support_least_squares(y: torch.Tensor, z: torch.Tensor, d: ConvDictionary) -> torch.Tensor:
    """Least squares of y on the atoms where z != 0, per sample: a feasible s-sparse estimate when the support
    holds the true one. y: (B, C_sig, *S); z: (B, C_code, *Sz) -> same shape as z."""
    out = torch.zeros_like(z)
    for b in range(z.shape[0]):
        idx, atoms = support_atoms(z[b], d, y.shape[2:])
        if idx.numel():
            out[b].view(-1)[idx] = torch.linalg.lstsq(atoms, y[b].flatten()[:, None]).solution.flatten()
    return out


def _weakest(z: torch.Tensor, d: ConvDictionary, signal_size) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
    """D_S's weakest singular triple, S = supp(z) of one sample's code z: (C_code, *Sz).

    Returns (S as flat indices, sigma_min, u: the unit signal direction (C_sig, *signal_size), v: (|S|,))."""
    idx, atoms = support_atoms(z, d, signal_size)
    u_all, sig, vh = torch.linalg.svd(atoms, full_matrices=False)
    return idx, float(sig[-1]), u_all[:, -1].reshape(d.weight.shape[1], *signal_size), vh[-1]


def _worst_feasible(noise: torch.Tensor, z: torch.Tensor, weakest) -> torch.Tensor:
    """The feasible estimate on z's support farthest from z, for one sample's noise e (signal = D z + e).

    With (σ, u, v) D_S's weakest singular triple (`_weakest`), z + t·v with t = 2|<e, u>|/σ leaves the residual
    e − t σ u (sign(<e, u>) u), of norm ‖e‖: feasible, and with e along u it attains the largest error on the
    support, 2‖e‖/σ. noise: (C_sig, *S); z: (C_code, *Sz) -> the error vector t·v, same shape as z."""
    idx, sigma, u, v = weakest
    proj = float((u * noise).sum())
    out = torch.zeros_like(z)
    out.view(-1)[idx] = (2 * abs(proj) / sigma) * (1.0 if proj >= 0 else -1.0) * v
    return out


def stability(
    *, quick: bool = False, backend: str = "auto", device: str = "cpu", dtype: torch.dtype = torch.float64
) -> ClaimResult:
    """S2: ||Gamma_j − hat Gamma_j||_2 ≤ stability_bound(eps) (product over layers) for feasible estimates.

    Two estimates per noise level: a practical one (LISTA-CP support, then least squares on it, layer by layer,
    random noise with ||e||_2 = eps) and the worst one on the true supports (noise along D_S1's weakest direction,
    each layer's estimate moved as far along its weakest direction as feasibility allows: 2 eps / sigma_min). The
    bound is for any feasible estimate, so the second is the sharp test on layer 1. On layer 2 it is a greedy chain
    (the worst layer-2 estimate for the layer-1 error chosen), not a maximum over the chain: when D_S1's weakest
    singular value is repeated, another layer-1 direction can give layer 2 a larger error, so layer 2's ratio is a
    lower bound on how much of the bound is reachable.
    """
    t0 = time.perf_counter()
    ds = _chain(quick, dtype)
    s2, n_iter = 1, 20
    eps_list = [0.01, 0.04] if quick else [0.005, 0.01, 0.02, 0.04, 0.08]
    errs, worst, bounds = [], [], []
    for i, eps in enumerate(eps_list):
        # a fresh draw per level: one noise direction scaled by eps would make every error exactly linear in eps
        p = dsc_problem(ds, s2, batch=6 if quick else 16, noise_l2=eps, seed=11 + i)
        x = p.x.to(device)
        g1, g2 = (c.to(device) for c in p.codes)
        h1 = _support_least_squares(x, _layer(x, ds[0], g1, p.clean.to(device), 2 * s2, n_iter, backend).z, ds[0])
        h2 = _support_least_squares(h1, _layer(h1, ds[1], g2, g1, s2, n_iter, backend).z, ds[1])
        errs.append([float((h1 - g1).flatten(1).norm(dim=1).max()), float((h2 - g2).flatten(1).norm(dim=1).max())])
        w1, w2 = [], []
        for b in range(x.shape[0]):
            weakest = _weakest(g1[b], ds[0], x.shape[2:])
            d1 = _worst_feasible(eps * weakest[2], g1[b], weakest)  # noise along u_1: the worst for layer 1
            # layer 2 sees hat Gamma_1 = Gamma_1 + d1: its noise is d1
            d2 = _worst_feasible(d1, g2[b], _weakest(g2[b], ds[1], g1.shape[2:]))
            w1.append(float(d1.norm()))
            w2.append(float(d2.norm()))
        worst.append([max(w1), max(w2)])
        bounds.append(theory.stability_bound(eps, p.sparsity, [ds[0].mu, ds[1].mu]))
    errs, worst, bounds = np.array(errs), np.array(worst), np.array(bounds)
    ratio, ratio_worst = float((errs / bounds).max()), float((worst / bounds).max())
    holds = bool(np.isfinite(bounds).all()) and ratio <= 1 and ratio_worst <= 1  # an inf bound checks nothing
    return ClaimResult(
        id="S2",
        claim="l0 stability over 2 layers: every feasible estimate has ‖Γ_j − Γ̂_j‖² ≤ 4^j ε² ∏ 1/(1 − (2s_i−1)μ_i)",
        theory=f"err/bound ≤ 1 for the practical and the worst feasible estimate on the true supports "
        f"(s = {p.sparsity}, μ = ({ds[0].mu:.3f}, {ds[1].mu:.3f}))",
        measured=f"max err/bound: practical {ratio:.3g}, worst feasible "
        f"{', '.join(f'{v:.3g}' for v in (worst / bounds).max(0))} (layers 1, 2)",
        holds=bool(holds),
        source="[L] Donoho–Elad 2003 per layer; [R] product over layers (ML-CSC Thm 5 form)",
        curves={"eps": np.array(eps_list), "err": errs, "worst": worst, "bound": bounds},
        note="the bound covers every feasible estimate; the worst one on the true support reaches 2ε/σ_min(D_S), "
        "so its ratio shows how much of the bound the coherence estimate 1 − (2s−1)μ ≤ σ_min² leaves unused "
        "(on layer 2 the estimate is a greedy chain, the worst for layer 1's chosen error, so a lower bound on "
        "the reachable ratio)",
        seconds=time.perf_counter() - t0,
    )
