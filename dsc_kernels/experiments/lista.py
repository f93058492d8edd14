"""LISTA-CP with analytic weights: linear rate, no false positives, noise floor, error against depth (S3–S5, S7).

Rates and constants are Chen et al. 2018's (LISTA-CP, Thm 2) [L]; applying them to convolutional dictionaries and
reading iterations as CNN depth is docs/theory.md §4.2 [R]. The dictionaries are Barker codes (mu = 1/length).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .. import theory
from ..data import barker_filter, conv_dictionary, dsc_problem
from .common import ClaimResult, decay_slope, fit_slope, lista_cp, noise_eta, resolution


def _setup(ndim: int, quick: bool, sparsity: int, noise_std: float, device: str, dtype: torch.dtype, seed: int = 0):
    if ndim == 1:
        d = conv_dictionary(barker_filter(13, dtype=dtype), 40 if quick else 96)
    else:
        d = conv_dictionary(barker_filter(7, ndim=2, dtype=dtype), (12, 12) if quick else (24, 24))
    p = dsc_problem([d], sparsity, batch=8 if quick else 32, amplitude=(0.5, 1.0), noise_std=noise_std, seed=seed)
    x, truth, noise = (t.to(device) for t in (p.x, p.codes[0], p.noise))
    q = theory.lista_cp_rate(sparsity, d.mu)
    # eta bounds |<d_i, e>| for the actual noise; the machine term keeps rounding from posing as signal
    eta = noise_eta(d, noise) + resolution(dtype, float(x.abs().max()))
    return d, p, x, truth, q, eta


def _schedule(kind: str, mu: float, s: int, B: float, q: float, eta: float):
    C = theory.lista_cp_noise_gain(s, q)
    if kind == "oracle":
        return lambda k, err: theory.oracle_threshold(err.l1, mu, eta)
    if kind == "geometric":
        sched = theory.geometric_thresholds(mu * s * B, q, 10_000, floor=mu * C * eta + eta)
        return lambda k, err: float(sched[k])
    raise ValueError(f"schedule must be 'oracle' or 'geometric', got {kind!r}")


# How far below 1 q = (2s - 1) mu must be for the theorem's hypothesis to count as met: mu is a rounded ratio.
HYPOTHESIS_MARGIN = 1e-9


def linear_convergence(
    *,
    schedule: str = "oracle",
    quick: bool = False,
    backend: str = "auto",
    device: str = "cpu",
    dtype: torch.dtype = torch.float64,
) -> ClaimResult:
    """S3 + S4: err_k <= s B q^k at every k, supp(Gamma^k) within supp(Gamma*); the fitted log-error slope is
    <= log q with oracle thresholds, and log q (the schedule's own rate) with geometric ones.

    Noiseless 1-D Barker-13 dictionary (mu = 1/13), s = 4 so q = 7/13.
    """
    t0 = time.perf_counter()
    s = 4
    d, p, x, truth, q, eta = _setup(1, quick, s, 0.0, device, dtype)
    B = p.amplitude[0]
    n_iter = 30 if quick else 60
    tr = lista_cp(x, d, truth, n_iter, _schedule(schedule, d.mu, s, B, q, eta), backend=backend)
    C = theory.lista_cp_noise_gain(s, q)
    bound = theory.lista_cp_error_bound(np.arange(n_iter + 1), s, B, q, C, eta)
    sup = tr.err_l2.max(1)
    # the machine term of eta leaves a rounding plateau; the rate is that of the approach to it
    slope, used = decay_slope(sup, float(sup[-5:].mean()))
    bound_ok = bool((tr.err_l2 <= bound[:, None] * (1 + 1e-9)).all())
    no_fp = int(tr.false_pos.sum()) == 0
    if schedule == "geometric":
        # the error follows theta_k ∝ q^k, so its slope is log q by construction, even for a wrong q: this run
        # checks the bound and the support under the theorem's own schedule, and that the error tracks it (the
        # tolerance absorbs the least-squares fit); the oracle run is the evidence for the rate
        rate_ok = abs(slope - np.log(q)) <= 0.02
        rate = f"slope = log q = {np.log(q):.3f} ± 0.02 (the schedule's rate; the oracle run tests q)"
    else:
        rate_ok = slope <= np.log(q)
        rate = f"slope ≤ log q = {np.log(q):.3f}"
    # q >= 1: the theorem's hypothesis fails, its bound is inf and slope <= log q >= 0 says nothing (the margin:
    # Barker-5's q = 5 mu rounds to 1 - 2e-16, a finite C = 3e16 that bounds nothing either)
    holds = q < 1 - HYPOTHESIS_MARGIN and bound_ok and no_fp and rate_ok
    worst = float((tr.err_l2 / bound[:, None]).max())
    return ClaimResult(
        id=f"S3/S4-{schedule}",
        claim=f"LISTA-CP, analytic W = D, {schedule} thresholds: "
        + ("linear rate q, " if schedule == "oracle" else "error tracks θ_k ∝ q^k, ")
        + "bound s·B·q^k at every k, no false positives",
        theory=f"{rate} (q = (2s−1)μ = {q:.3f}, s = {s}, μ = {d.mu:.4f})",
        measured=f"slope {slope:.3f} over {used} iters; max err/bound {worst:.2g}; "
        f"false positives {int(tr.false_pos.sum())}",
        holds=bool(holds),
        source="[L] Chen et al. 2018 Thm 2; [R] per DSC layer",
        curves={
            "k": np.arange(n_iter + 1),
            "err": sup,
            "err_all": tr.err_l2,
            "bound": bound,
            "q": q,
            "thresholds": tr.thresholds,
        },
        seconds=time.perf_counter() - t0,
    )


def noise_floor(
    *, quick: bool = False, backend: str = "auto", device: str = "cpu", dtype: torch.dtype = torch.float64
) -> ClaimResult:
    """S5: the plateau of err_k grows linearly in the noise and stays below C·eta, C = 2s/(1 − q).

    Oracle thresholds, Barker-13, s = 3; the noise std sweeps a decade and a half.
    """
    t0 = time.perf_counter()
    s = 3
    sigmas = [1e-3, 4e-3, 1.6e-2] if quick else [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2]
    n_iter = 30 if quick else 50
    floors, bounds, etas, bias = [], [], [], []
    for i, sigma in enumerate(sigmas):
        # a fresh problem and noise draw per level: with one noise direction scaled by sigma, slope 1 would follow
        # from scale equivariance alone
        d, p, x, truth, q, eta = _setup(1, quick, s, sigma, device, dtype, seed=1 + i)
        sched = _schedule("oracle", d.mu, s, p.amplitude[0], q, eta)
        tr = lista_cp(x, d, truth, n_iter, sched, backend=backend)
        floors.append(float(tr.err_l2[-5:].max()))
        # the same thresholds on the clean signal: the part of the floor that is the thresholds' bias
        clean = lista_cp(p.clean.to(device), d, truth, n_iter, sched, backend=backend)
        bias.append(float(clean.err_l2[-5:].max()) / floors[-1])
        bounds.append(theory.lista_cp_noise_gain(s, q) * eta)
        etas.append(eta)
    slope = fit_slope(np.log(sigmas), np.log(floors))
    below = all(f <= b for f, b in zip(floors, bounds))
    holds = q < 1 - HYPOTHESIS_MARGIN and below and 0.8 <= slope <= 1.2  # C = inf (q >= 1) bounds nothing
    return ClaimResult(
        id="S5",
        claim="noise floor of LISTA-CP grows linearly in the noise level and stays below C·η",
        theory=f"log-log slope 1; floor ≤ C·η, C = 2s/(1−q) = {theory.lista_cp_noise_gain(s, q):.2f}",
        measured=f"slope {slope:.3f}; max floor/(C·η) {max(f / b for f, b in zip(floors, bounds)):.3g}",
        holds=bool(holds),
        source="[L] Chen et al. 2018; [R] per DSC layer",
        curves={"sigma": np.array(sigmas), "floor": np.array(floors), "bound": np.array(bounds), "eta": np.array(etas)},
        note="the oracle threshold μ‖e‖₁ + η grows with the noise, and its bias is much of the floor: on the clean "
        f"signal the same thresholds leave {min(bias):.0%}–{max(bias):.0%} of it",
        seconds=time.perf_counter() - t0,
    )


def error_vs_depth(
    *, quick: bool = False, backend: str = "auto", device: str = "cpu", dtype: torch.dtype = torch.float64
) -> ClaimResult:
    """S7: with iterations as layers, log-error falls linearly with depth, then plateaus at a noise floor.

    2-D Barker-7 ⊗ Barker-7 dictionary (mu = 1/7), s = 3 (q = 5/7), noise std 1e-3, geometric thresholds.
    """
    t0 = time.perf_counter()
    s, sigma = 3, 1e-3
    d, p, x, truth, q, eta = _setup(2, quick, s, sigma, device, dtype, seed=2)
    B = p.amplitude[0]
    n_iter = 30 if quick else 60
    tr = lista_cp(x, d, truth, n_iter, _schedule("geometric", d.mu, s, B, q, eta), backend=backend)
    sup = tr.err_l2.max(1)
    plateau = float(sup[-5:].mean())
    # from k = 1: err_0 = ||Gamma*|| (Gamma^0 = 0) is no iterate of the schedule, and its first step, 0.3 to 0.4
    # steeper than log q, tilted the 11-point fit by up to 0.023, past the 0.02 tolerance on 8 of 40 problem seeds
    # (the per-step slopes after it are log q within 0.003)
    slope, used = decay_slope(sup[1:], plateau)
    C = theory.lista_cp_noise_gain(s, q)
    bound = theory.lista_cp_error_bound(np.arange(n_iter + 1), s, B, q, C, eta)
    flat = float(np.ptp(sup[-5:]) / plateau) if plateau > 0 else 0.0
    within = bool((tr.err_l2 <= bound[:, None] * (1 + 1e-9)).all())
    # geometric thresholds: the decay follows theta_k ∝ q^k (equality up to the fit), as in S3's geometric run
    holds = abs(slope - np.log(q)) <= 0.02 and plateau <= C * eta and flat < 0.05 and within
    return ClaimResult(
        id="S7",
        claim="2-D conv ISTA as a CNN: error ≤ s·B·q^k + C·η at every depth, exponential decay, then a plateau",
        theory=f"bound at every depth; slope = log q = {np.log(q):.3f} ± 0.02 (the geometric schedule's rate); "
        f"plateau ≤ C·η = {C * eta:.3g}",
        measured=f"slope {slope:.3f} over layers 1–{used}; plateau {plateau:.3g} (spread {flat:.1%}); "
        f"bound {'holds' if within else 'violated'}",
        holds=bool(holds),
        source="[P] rates in depth; [R] form; [L] constants",
        curves={"k": np.arange(n_iter + 1), "err": sup, "bound": bound, "plateau": plateau, "q": q},
        seconds=time.perf_counter() - t0,
    )
