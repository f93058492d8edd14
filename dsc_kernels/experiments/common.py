"""What every convergence experiment shares: the result record, slope fits and the LISTA-CP iteration driver."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import functional as DF
from ..data import ConvDictionary


@dataclass
class ClaimResult:
    """One checked claim. `theory`/`measured` are short human-readable values; `curves` feed the report's plots."""

    id: str
    claim: str
    theory: str
    measured: str
    holds: bool
    source: str
    curves: dict = field(default_factory=dict)
    note: str = ""
    seconds: float = 0.0


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to n inside the block, restored after. The experiments' problems are tiny
    (a few thousand entries): on a shared machine two threads that wait for each other cost a hundredfold."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_slope(x, y) -> float:
    """Least-squares slope of y against x (both 1-D, at least two points, all finite; NaN otherwise)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    # LAPACK raises (or prints to stderr) on a non-finite input instead of returning NaN.
    if x.size < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()) or np.ptp(x) == 0:
        return float("nan")
    return float(np.polyfit(x, y, 1)[0])


def resolution(dtype: torch.dtype, scale: float = 1.0) -> float:
    """Errors below this are rounding, not iteration error: fits and rates ignore them."""
    return 1e3 * torch.finfo(dtype).eps * max(scale, 1e-30)


@dataclass
class Trace:
    """Per-iteration record of a run against a known code. err_l2/err_l1/err_linf: (n_iter+1, B); false_pos:
    (n_iter+1,); iterates: z_1..z_n when the run kept them, else empty."""

    err_l2: np.ndarray
    err_l1: np.ndarray
    err_linf: np.ndarray
    false_pos: np.ndarray
    thresholds: np.ndarray
    z: torch.Tensor
    iterates: list[torch.Tensor] = field(default_factory=list)


@dataclass
class IterateError:
    """What a threshold rule may know about iterate k: sup over the batch of ||Gamma^k - Gamma*||_1 and _inf."""

    l1: float
    linf: float


def _errors(z: torch.Tensor, truth: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    d = (z - truth).flatten(1)
    fp = int(((z != 0) & (truth == 0)).sum())
    return d.norm(dim=1).cpu().numpy(), d.abs().sum(1).cpu().numpy(), d.abs().amax(1).cpu().numpy(), fp


def noise_eta(d: ConvDictionary, noise: torch.Tensor) -> float:
    """eta = max_b ||W^T e_b||_inf with analytic weights W = D: the largest correlation of the noise with an atom."""
    return float(DF.conv_analysis(noise, d.weight.to(noise), stride=d.stride, padding=d.padding).abs().max())


def lista_cp(
    x: torch.Tensor,
    d: ConvDictionary,
    truth: torch.Tensor,
    n_iter: int,
    threshold: Callable[[int, IterateError], float],
    *,
    backend: str = "auto",
    shrink: Callable[[torch.Tensor, float], torch.Tensor] | None = None,
    keep_iterates: bool = False,
) -> Trace:
    """Gamma^{k+1} = S_{theta_k}(Gamma^k + D^T (x - D Gamma^k)) from Gamma^0 = 0, one step per call.

    x: (B, C_sig, *S); truth: (B, C_code, *Sz). Analytic weights W = D (unit atoms, so <w_i, d_i> = 1 and the
    off-diagonal correlations are mu); step 1. `threshold(k, IterateError of Gamma^k)` gives theta_k, so oracle
    and fixed schedules share one driver. Steps run through functional.conv_ista (one iteration, z0 = Gamma^k), or,
    when `shrink(u, theta)` replaces the soft threshold, through conv_analysis/conv_synthesis.
    """
    w = d.weight.to(x)
    z = torch.zeros_like(truth)
    l2, l1, linf, fp = _errors(z, truth)
    e2, e1, einf, fps, ths, kept = [l2], [l1], [linf], [fp], [], []
    for k in range(n_iter):
        theta = float(threshold(k, IterateError(float(l1.max()), float(linf.max()))))
        ths.append(theta)
        if shrink is None:
            z = DF.conv_ista(x, w, theta, n_iter=1, step=1.0, z0=z, stride=d.stride, padding=d.padding, backend=backend)
        else:
            r = x - DF.conv_synthesis(z, w, stride=d.stride, padding=d.padding, signal_size=x.shape[2:])
            z = shrink(z + DF.conv_analysis(r, w, stride=d.stride, padding=d.padding), theta)
        l2, l1, linf, fp = _errors(z, truth)
        e2.append(l2), e1.append(l1), einf.append(linf), fps.append(fp)
        if keep_iterates:
            kept.append(z)
    return Trace(np.stack(e2), np.stack(e1), np.stack(einf), np.array(fps), np.array(ths), z, kept)


def support_atoms(z: torch.Tensor, d: ConvDictionary, signal_size) -> tuple[torch.Tensor, torch.Tensor]:
    """The atoms where one sample's code is non-zero.

    z: (C_code, *Sz) -> (flat indices (n,), atoms (prod S * C_sig, n))."""
    idx = torch.nonzero(z.flatten()).flatten()
    units = torch.zeros(idx.numel(), z.numel(), dtype=z.dtype, device=z.device)
    units[torch.arange(idx.numel()), idx] = 1.0
    atoms = DF.conv_synthesis(
        units.reshape(-1, *z.shape), d.weight.to(z), stride=d.stride, padding=d.padding, signal_size=tuple(signal_size)
    )
    return idx, atoms.flatten(1).T


def decay_slope(err: np.ndarray, floor: float, above: float = 2.0) -> tuple[float, int]:
    """Slope of log(err_k - floor): the rate of the model err_k = A q^k + floor that the bounds have.

    err: (n_iter+1,). Fits the initial run of iterations with err above `above` times `floor` (later points are
    the plateau, where the difference is noise). Returns (slope, number of points used).
    """
    keep = err > above * floor
    stop = int(np.argmin(keep)) if not keep.all() else err.size
    if stop < 2:
        return float("nan"), stop
    return fit_slope(np.arange(stop), np.log(err[:stop] - floor)), stop
