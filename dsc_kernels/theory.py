"""Bounds and rates of sparse-coding theory for (convolutional) deep sparse coding.

Provenance (docs/theory.md): the seed paper, Li–Feng–Zhou, "Convergence Analysis for Deep Sparse
Coding via Convolutional Neural Networks" (arXiv 2408.05540), states that uniqueness, stability and convergence-rate
results exist; its exact constants were not available. Every constant below is therefore a *standard result* it
builds on — Donoho–Elad 2003 (coherence, uniqueness, stability), Papyan–Romano–Elad 2017 (ML-CSC, product over
layers), Chen–Liu–Wang–Yin 2018 (LISTA-CP linear rate), Beck–Teboulle 2009 (ISTA/FISTA rates) — applied layer by
layer, as docs/theory.md reconstructs it. Functions say which tag ([L] literature, [R] reconstruction, [C] computed)
applies.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import _validate as check

__all__ = [
    "mutual_coherence",
    "uniqueness_bound",
    "dictionary_matrix",
    "spark",
    "sparse_collision",
    "stability_bound",
    "lista_cp_rate",
    "lista_cp_noise_gain",
    "lista_cp_error_bound",
    "deep_error_bound",
    "stripe_sparsity",
    "stripe_rate",
    "stripe_error_bound",
    "stripe_threshold",
    "oracle_threshold",
    "geometric_thresholds",
    "ista_objective_bound",
    "fista_objective_bound",
    "activation_sup_distance",
    "activation_worst_input",
    "smooth_relu",
]


def _check_weight(weight: object) -> torch.Tensor:
    """A real (C_code, C_sig, k) or (C_code, C_sig, kh, kw) tensor with kernel sizes >= 1."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() not in (3, 4):
        raise ValueError(
            f"weight must be (C_code, C_sig, k) or (C_code, C_sig, kh, kw), got shape {tuple(weight.shape)}"
        )
    if weight.is_complex() or weight.dtype == torch.bool:
        raise TypeError(f"weight must be a real (floating-point or integer) tensor, got {weight.dtype}")
    if min(weight.shape[2:]) < 1:
        raise ValueError(f"weight's kernel size must be >= 1, got {tuple(weight.shape[2:])}")
    return weight


def _real(
    name: str, value: object, *, low: float = 0.0, high: float = math.inf, finite: bool = False, positive: bool = False
) -> float:
    """A real number in [low, high] (``finite``: and not inf; ``positive``: and > low): Python or numpy reals, 0-d
    arrays and 0-d tensors. NaN, and bools (a flag passed where a number belongs), are a caller's bug: a bound
    computed from them would mean nothing."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool:
        value = value.item()
    # a 0-d array is its number, as a 0-d tensor is: counts (check.count) took 0-d integer arrays, while every real
    # argument refused a 0-d float one with "must be a real number"
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf":
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    out = float(value)
    if math.isnan(out) or not low <= out <= high or (finite and math.isinf(out)) or (positive and out == low):
        interval = f"in [{low:g}, {high:g}]" if high < math.inf else f"{'>' if positive else '>='} {low:g}"
        raise ValueError(f"{name} must be {'finite and ' if finite else ''}{interval}, got {value!r}")
    return out


def _mu(value: object, name: str = "mu") -> float:
    return _real(name, value, high=1.0)


def _sparsity(value: object, name: str = "s") -> int:
    return check.count(name, value, 0)


def _rate(s: int, mu: float) -> float:
    """(2s - 1) mu, the error each support entry takes from the other s - 1 and its own threshold; s = 0 (the zero
    code, which every iterate keeps exactly once the threshold dominates the noise) has nothing to decay: q = 0."""
    return max(2 * s - 1, 0) * mu


def _real_array(name: str, value: object, expected: str) -> np.ndarray:
    """value (a number, array or tensor of real numbers) as float64; a TypeError naming it otherwise."""
    if isinstance(value, torch.Tensor):  # .cpu() raised naming nothing
        check.require_values(name, value, "this bound")
    try:
        raw = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
        if raw.dtype.kind not in "iuf":
            raise TypeError
        return raw.astype(np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be {expected}, got {value!r}") from None


def _layers(name: str, value: object) -> list:
    """One entry per layer: any iterable but a string; a TypeError naming it otherwise."""
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        return list(value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence with one entry per layer, got {value!r}") from None


def _iterations(k: object, *, minimum: int = 0) -> np.ndarray:
    """Iteration counts as float64: whole numbers >= minimum, or inf (the limit); an int or an array of them."""
    out = _real_array("k", k, "an iteration count or an array of them")
    if not np.all((out >= minimum) & ((out == np.floor(out)) | np.isposinf(out))):
        raise ValueError(f"k must hold whole iteration counts >= {minimum} (or inf), got {k!r}")
    return out


def _nonnegative_array(name: str, value: object) -> np.ndarray:
    """float64 values >= 0 (inf allowed): a scalar or an array that broadcasts against k."""
    out = _real_array(name, value, "a real number or an array of them")
    if not np.all(out >= 0):  # NaN fails this too
        raise ValueError(f"{name} must be >= 0 (no NaN), got {value!r}")
    return out


def _bound(out: np.ndarray) -> float | np.ndarray:
    """A bound built from checked non-negative terms: NaN there can only be inf * 0 (an inf amplitude or noise
    level meeting a vanishing factor), whose honest value is the vacuous bound inf, never NaN."""
    out = np.where(np.isnan(out), np.inf, out)
    return float(out) if out.ndim == 0 else out


def _product(*factors: object) -> np.ndarray:
    """The product of non-negative float64 factors (broadcast together) without intermediate overflow or underflow:
    a bound such as s B q^k is representable while s B overflows or q^k underflows (B = 1e300, q = 0.5, k = 1100:
    7e-32, not 0). A factor is a value or a pair (q, k), the power q^k. The plain product where every partial
    product (power included) is a normal float; else, for positive finite factors, 2 to the sum of their log2s
    (relative error ~1e-13), rounded once into the range; zeros, inf and NaN keep the plain product's rules."""
    tiny = np.finfo(np.float64).tiny
    values, logs, exact = [], [], []
    with np.errstate(all="ignore"):
        for factor in factors:
            if isinstance(factor, tuple):
                base, power = np.asarray(factor[0], dtype=np.float64), np.asarray(factor[1], dtype=np.float64)
                value = np.power(base, power)
                usable = (base > 0) & np.isfinite(base) & np.isfinite(power)
                logs.append(np.where(usable, power * np.log2(base), np.nan))
                exact.append((value >= tiny) | (base == 0) | (power == 0) | ~np.isfinite(power))  # not rounded away
            else:
                value = np.asarray(factor, dtype=np.float64)
                logs.append(np.where((value > 0) & np.isfinite(value), np.log2(value), np.nan))
                exact.append(np.ones(value.shape, dtype=bool))
            values.append(value)
        values, logs, exact = np.broadcast_arrays(*values), np.broadcast_arrays(*logs), np.broadcast_arrays(*exact)
        out, normal = np.ones(values[0].shape), np.ones(values[0].shape, dtype=bool)
        for value, kept in zip(values, exact):
            out = out * value
            normal &= kept & ((value == 0) | (value >= tiny)) & ((out == 0) | ((out >= tiny) & np.isfinite(out)))
        total = np.sum(logs, axis=0) if logs else np.zeros(out.shape)
        usable = ~normal & np.isfinite(total)  # every factor positive and finite
        whole = np.floor(np.where(usable, total, 0.0))
        scaled = np.ldexp(np.exp2(np.where(usable, total, 0.0) - whole), np.clip(whole, -2000, 2000).astype(np.int64))
    return np.where(usable, scaled, out)


def _conv_args(weight: object, signal_size: object, stride: object, padding: object) -> tuple[int, tuple, tuple, tuple]:
    """The checked rank, signal size (>= 1), stride (>= 1) and padding (>= 0) of a convolutional dictionary."""
    nd = _check_weight(weight).dim() - 2
    size = check.ints("signal_size", signal_size, nd, minimum=1)
    return nd, size, check.ints("stride", stride, nd, minimum=1), check.ints("padding", padding, nd, minimum=0)


def _windows(n_sig: int, k: int, s: int, p: int) -> list[tuple[int, int]]:
    """Filter taps [lo, hi) each code position's atom keeps inside a signal of length n_sig, for the consecutive
    code positions whose atoms keep at least one tap (atoms entirely in the padding are zero and left out).

    Synthesis is conv_transpose, so code position i puts tap j at signal index i*s - p + j (docs/design.md §2).
    Position i keeps a tap iff p - k < i*s < n_sig + p; only those are listed, so a padding far beyond k - 1 costs
    nothing: it only adds zero atoms.
    """
    n_code = (n_sig + 2 * p - k) // s + 1
    first = max(0, (p - k) // s + 1)
    last = min(n_code, -(-(n_sig + p) // s))  # exclusive: ceil((n_sig + p) / s)
    return [(max(0, p - i * s), min(k, n_sig + p - i * s)) for i in range(first, last)]


Window = tuple[int, int]


def _pair_classes(wins: list[Window], k: int, s: int) -> dict[int, list[tuple[Window, Window]]]:
    """Distinct (window of atom i, window of atom i+d) for every code offset d whose atoms can overlap.

    Interior atoms all share the full window, so each offset contributes O(k/s) classes however long the signal is.
    """
    n = len(wins)
    out: dict[int, set] = {}
    reach = (k - 1) // s
    for d in range(-reach, reach + 1):
        out[d] = {(wins[i], wins[i + d]) for i in range(max(0, -d), min(n, n - d))}
    return {d: sorted(v) for d, v in out.items() if v}


def _masks(lo: torch.Tensor, hi: torch.Tensor, k: int) -> torch.Tensor:
    """(n, k) float64 0/1 rows, row i marking the taps [lo_i, hi_i) (none when hi_i <= lo_i)."""
    taps = torch.arange(k, device=lo.device)
    return ((taps >= lo[:, None]) & (taps < hi[:, None])).to(torch.float64)


def _box_max(w: torch.Tensor, win_h: Window, win_w: Window) -> torch.Tensor:
    """(C_code, 1, 1, 1) largest |tap| of each filter inside the box win_h x win_w (1 where the box is all zero)."""
    top = w[:, :, win_h[0] : win_h[1], win_w[0] : win_w[1]].abs().amax(dim=(1, 2, 3), keepdim=True)
    return torch.where(top > 0, top, torch.ones_like(top))


def _atom_filters(w: torch.Tensor, win_h: Window, win_w: Window) -> torch.Tensor:
    """The filters cut to the taps of the box win_h x win_w, each scaled to its largest |tap| there: the atoms of
    that truncation class up to scale (the taps outside, zero, could overflow once scaled up)."""
    out = torch.zeros_like(w)
    box = (slice(None), slice(None), slice(*win_h), slice(*win_w))
    out[box] = w[box]
    return out / _box_max(w, win_h, win_w)


def _max_cosine(wa: torch.Tensor, wb: torch.Tensor, pairs_h: list, pairs_w: list, shift: tuple, same: bool) -> float:
    """max |cos| between atom a (filter wa[a], kept taps window_a) and atom b (filter wb[b], window_b, placed `shift`
    further on) over every filter pair and every (window_a, window_b) of pairs_h x pairs_w; `same`: shift 0, where
    an atom with itself is not a pair. wa and wb are the filters, each channel scaled as it likes (cosines do not
    see it). Inner products and norms are sums over exactly the boxes of taps the atoms keep (0/1 masks), not
    differences of prefix sums, which would carry the rounding of the taps outside the box."""
    c_code, _, kh, kw = wa.shape
    sh, sw = shift
    # prod[a, b, u, v] = sum_c wa[a, c, u, v] * wb[b, c, u - sh, v - sw]: tap (u, v) of atom a (signal coordinates
    # relative to atom a) meets tap (u - sh, v - sw) of atom b, which sits sh, sw further on.
    u0, u1, v0, v1 = max(0, sh), min(kh, kh + sh), max(0, sw), min(kw, kw + sw)
    if u0 >= u1 or v0 >= v1:
        return 0.0
    shifted = torch.zeros_like(wb)
    shifted[..., u0:u1, v0:v1] = wb[..., u0 - sh : u1 - sh, v0 - sw : v1 - sw]
    prod = torch.einsum("acuv,bcuv->abuv", wa, shifted)
    # every tensor here on the filters' device (the CPU), whatever torch.set_default_device says: on the default
    # device they met the CPU filters under a CUDA or meta default ("Tensor on device meta is not on the expected
    # device cpu")
    ph = torch.tensor(pairs_h, dtype=torch.long, device=wa.device)  # (n_h, 2 windows, 2 ends)
    pw = torch.tensor(pairs_w, dtype=torch.long, device=wa.device)
    # taps both atoms keep, in atom a's coordinates: window_a ∩ (window_b + shift)
    box_h = _masks(torch.maximum(ph[:, 0, 0], ph[:, 1, 0] + sh), torch.minimum(ph[:, 0, 1], ph[:, 1, 1] + sh), kh)
    box_w = _masks(torch.maximum(pw[:, 0, 0], pw[:, 1, 0] + sw), torch.minimum(pw[:, 0, 1], pw[:, 1, 1] + sw), kw)
    # inner[a, b, i, j] = sum over box_h[i] x box_w[j] of prod[a, b]: two flat matmuls (batched ones are slower)
    n_h, n_w = len(box_h), len(box_w)
    inner = (prod.reshape(-1, kw) @ box_w.T).reshape(c_code, c_code, kh, n_w).transpose(2, 3).reshape(-1, kh)
    inner = (inner @ box_h.T).reshape(c_code, c_code, n_w, n_h).transpose(2, 3)  # (C, C, n_h, n_w)

    def norms(w: torch.Tensor, end: int) -> torch.Tensor:
        # (C_code, n_h, n_w) norms of the atoms whose kept taps are window `end` (0: a, 1: b) of each pair; zero
        # exactly when all their taps are
        mask_h, mask_w = _masks(ph[:, end, 0], ph[:, end, 1], kh), _masks(pw[:, end, 0], pw[:, end, 1], kw)
        return (mask_h @ (w * w).sum(1) @ mask_w.T).clamp_min(0).sqrt()

    na, nb = norms(wa, 0), norms(wb, 1)
    valid = (na > 0)[:, None] & (nb > 0)[None, :]
    if same:
        valid &= ~torch.eye(c_code, dtype=torch.bool, device=wa.device)[:, :, None, None]
    # every atom here keeps a tap >= 1e-100 of the largest (else the caller scaled it up): no product underflows
    denom = torch.where(valid, na[:, None] * nb[None, :], torch.ones((), dtype=wa.dtype, device=wa.device))
    ratio = torch.where(valid, inner.abs_() / denom, torch.zeros((), dtype=wa.dtype, device=wa.device))
    return float(ratio.max()) if ratio.numel() else 0.0


def mutual_coherence(
    weight: torch.Tensor,
    signal_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
) -> float:
    """Exact mutual coherence mu(D) of the convolutional dictionary D defined by `weight` at a signal size.

    weight: (C_code, C_sig, k) or (C_code, C_sig, kh, kw); D z = conv_transpose(z, weight, stride, padding) cropped
    to `signal_size` (docs/design.md §2). Every atom — border atoms truncated by the padding included — is
    normalised, and mu = max over distinct atoms of |<d_a, d_b>| / (|d_a| |d_b|). Atoms that are entirely zero (e.g.
    inside a padding >= k) have no direction and are skipped; with fewer than two non-zero atoms (C_code = 0, an
    all-zero filter) there is no pair and mu = 0. NaN/inf in a tap some atom keeps gives NaN. signal_size >= 1,
    stride >= 1 and padding >= 0 (ints or one per spatial axis) are checked: TypeError/ValueError naming them.

    How: two atoms interact only through their code offset (dh, dw) and the taps each keeps at the border (its
    truncation class), so the inner products are the filters' channel-summed cross-correlations restricted to
    boxes of taps. For each offset one product tensor is formed and summed over each box that occurs (each a sum of
    exactly its own taps, so atoms of very different norms keep their precision); the cost depends on k/s and the
    channel counts, not on the signal length. A filter whose border atoms keep only taps below 1e-100 of its largest
    is done one pair of truncation classes at a time, each atom scaled to its own largest tap (exact, slower).

    Definition: Donoho–Elad 2003 [L]; its use per layer of a convolutional DSC model: Papyan–Romano–Elad 2017 [L].
    """
    nd, size, strides, pads = _conv_args(weight, signal_size, stride, padding)
    check.require_values("weight", weight, "mutual_coherence")
    code = [(n + 2 * p - k) // s + 1 for n, p, k, s in zip(size, pads, weight.shape[2:], strides)]
    if min(code) < 1:
        raise ValueError(
            f"signal_size {tuple(size)} (padding {tuple(pads)}) is smaller than the filter {tuple(weight.shape[2:])}"
        )
    w = weight.detach().to("cpu", torch.float64, copy=True)
    if nd == 1:  # a 1-D dictionary is the 2-D one with a trivial width axis
        w, size, strides, pads = w.unsqueeze(-1), (size[0], 1), (strides[0], 1), (pads[0], 0)
    c_code, _, kh, kw = w.shape
    wins = [_windows(size[0], kh, strides[0], pads[0]), _windows(size[1], kw, strides[1], pads[1])]
    # Taps no atom keeps (cropped by a large stride or padding) are not part of D: zero them, so that neither their
    # values (NaN included) nor their scale reach the sums.
    kept = [torch.zeros(k, dtype=torch.bool, device=w.device) for k in (kh, kw)]  # w's CPU, not the default device
    for axis in range(2):
        for lo, hi in wins[axis]:
            kept[axis][lo:hi] = True
    w = torch.where(kept[0][:, None] & kept[1][None, :], w, torch.zeros((), dtype=w.dtype, device=w.device))
    if not torch.isfinite(w).all():  # a NaN/inf tap makes its atoms' cosines NaN, as F.cosine_similarity does
        return math.nan
    if not w.numel():  # no code channel, or atoms with no signal channel: no atom has a direction
        return 0.0
    # mu is invariant to each atom's scale, and every atom of code channel a is a truncation of filter a: scale each
    # filter to max |tap| = 1, so that filters of very different norms neither underflow nor overflow, and a small
    # filter's cosines are not judged against a large one's. All-zero filters give only zero atoms: dropped.
    top = w.abs().amax(dim=(1, 2, 3))
    w, top = w[top > 0], top[top > 0]
    c_code = w.shape[0]
    if c_code == 0:  # no atom has a direction: no pair of atoms, mu = 0 (as for a single atom)
        return 0.0
    classes = [_pair_classes(wins[0], kh, strides[0]), _pair_classes(wins[1], kw, strides[1])]
    # An atom whose own taps are all below 1e-100 of its filter's largest (a border atom keeping only tiny taps)
    # would have its squares and products underflow once the filter is scaled: then every pair of truncation
    # classes is done on its own, each atom cut to its taps and scaled to its own largest one (slower; only then).
    log_top = top.log()
    boxes = [
        w[:, :, h0:h1, v0:v1].abs().amax(dim=(1, 2, 3)) for (h0, h1), (v0, v1) in itertools.product(*map(set, wins))
    ]
    # e^-230 = 1e-100, compared in logs: the ratio itself could underflow
    tiny = any(bool(((box > 0) & (box.log() < log_top - 230.0)).any()) for box in boxes)
    if not tiny:
        w = w / top[:, None, None, None]
    best = 0.0
    for dh, pairs_h in classes[0].items():
        for dw, pairs_w in classes[1].items():
            shift = (dh * strides[0], dw * strides[1])
            if not tiny:
                best = max(best, _max_cosine(w, w, pairs_h, pairs_w, shift, dh == dw == 0))
                continue
            for (a_h, b_h), (a_w, b_w) in itertools.product(pairs_h, pairs_w):
                wa, wb = _atom_filters(w, a_h, a_w), _atom_filters(w, b_h, b_w)
                best = max(best, _max_cosine(wa, wb, [(a_h, b_h)], [(a_w, b_w)], shift, dh == dw == 0))
    return min(best, 1.0)


def uniqueness_bound(mu: float) -> float:
    """Sparsity below which an s-sparse representation is the unique sparsest one: s < (1 + 1/mu)/2.

    Donoho–Elad 2003 via spark(D) >= 1 + 1/mu [L]; per layer of a DSC model as in ML-CSC Thm 4 (global l0) [R].
    mu is a coherence, in [0, 1] (mu = 0, orthogonal atoms: inf); anything else, NaN included, raises ValueError.
    """
    mu = _mu(mu)
    return math.inf if mu == 0 else 0.5 * (1.0 + 1.0 / mu)


def dictionary_matrix(
    weight: torch.Tensor,
    signal_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
) -> torch.Tensor:
    """The explicit matrix of a convolutional dictionary: (prod(signal_size) * C_sig, n_atoms) float64, one column
    per code entry (channel-major, then positions in row-major order), each the synthesis of a unit code.

    Only for small sizes (it forms every atom); mutual_coherence never does. C_code = 0 gives no columns, C_sig = 0
    no rows. A NaN/inf tap appears in exactly the atoms that keep it; the matrix is on weight's device.
    """
    nd, size, st, pd = _conv_args(weight, signal_size, stride, padding)
    code = tuple((n + 2 * p - k) // s + 1 for n, p, k, s in zip(size, pd, weight.shape[2:], st))
    if min(code) < 1:
        raise ValueError(f"signal_size {size} is smaller than the filter {tuple(weight.shape[2:])}")
    # Each entry is one filter tap, placed (not computed): code position i puts tap j at signal index i*s - p + j
    # (docs/design.md §2), so tap[x, i] = x - i*s + p is the tap atom i holds at signal index x, if any. Placing
    # keeps a NaN/inf tap in the atoms that hold it; a synthesis of unit codes would multiply it by the zeros of
    # every other code entry and spread NaN to every column.
    w = weight.detach().to(torch.float64)
    taps, inside = [], []
    for n, p, k, c, s in zip(size, pd, w.shape[2:], code, st):
        tap = torch.arange(n, device=w.device)[:, None] - s * torch.arange(c, device=w.device)[None, :] + p
        taps.append(tap.clamp(0, k - 1))
        inside.append((tap >= 0) & (tap < k))
    if nd == 1:
        atoms, keep = w[:, :, taps[0]], inside[0]  # (C_code, C_sig, n, c)
    else:
        atoms = w[:, :, taps[0][:, None, :, None], taps[1][None, :, None, :]]  # (C_code, C_sig, nh, nw, ch, cw)
        keep = inside[0][:, None, :, None] & inside[1][None, :, None, :]
    atoms = torch.where(keep, atoms, torch.zeros((), dtype=atoms.dtype, device=atoms.device))
    # rows: (C_sig, *signal_size) flattened; columns: (C_code, *code) flattened
    order = (1, *range(2, 2 + nd), 0, *range(2 + nd, 2 + 2 * nd))
    return atoms.permute(order).reshape(weight.shape[1] * math.prod(size), weight.shape[0] * math.prod(code))


def spark(
    matrix: torch.Tensor, *, max_size: int | None = None, tol: float = 1e-9, max_subsets: int = 2_000_000
) -> tuple[float, torch.Tensor | None]:
    """spark(D), the smallest number of linearly dependent columns, by enumerating column subsets of growing size.

    matrix: (n, A). Returns (spark, v): v (A,) a null vector of D on exactly `spark` columns, or (inf, None) when
    every subset up to `max_size` (default: all sizes) is independent — then spark > max_size. A subset counts as
    dependent when its smallest singular value is below tol times D's largest. Brute force (Donoho–Elad 2003's
    definition [L]): the cost is the number of subsets, so only small dictionaries; more than `max_subsets`
    subsets in all raises ValueError before any is tried (judged from the shape, before the matrix is read).
    matrix must be real and finite (no subset of a NaN column has a rank) and not on the meta device; max_size an
    int >= 0 (0: nothing is tried, spark > 0), tol >= 0.
    """
    if not isinstance(matrix, torch.Tensor):
        raise TypeError(f"matrix must be a torch.Tensor, got {type(matrix).__name__}")
    if matrix.is_complex() or matrix.dtype == torch.bool:
        raise TypeError(f"matrix must be a real (floating-point or integer) tensor, got {matrix.dtype}")
    if matrix.dim() != 2:
        raise ValueError(f"matrix must be (n, A), got shape {tuple(matrix.shape)}")
    tol = _real("tol", tol, finite=True)
    max_subsets = check.count("max_subsets", max_subsets, 0)
    n_rows, n_atoms = matrix.shape
    limit = n_atoms if max_size is None else min(check.count("max_size", max_size, 0), n_atoms)
    # The work is known from the shape alone: refuse before the matrix is copied, and stop counting at the limit
    # (the exact count of a large matrix's subsets is itself a sum of huge binomials).
    total = 0
    for r in range(1, min(limit, n_rows) + 1):
        total += math.comb(n_atoms, r)
        if total > max_subsets:
            raise ValueError(
                f"more than {max_subsets} column subsets of {n_atoms} columns up to size {limit}: too many to "
                f"enumerate (max_subsets = {max_subsets})"
            )
    check.require_values("matrix", matrix, "spark")
    d = matrix.detach().to(torch.float64).cpu().numpy()
    if not np.isfinite(d).all():
        raise ValueError("matrix must be finite (it holds NaN or inf)")
    floor = tol * float(np.linalg.norm(d, 2)) if d.size else 0.0
    for r in range(1, limit + 1):
        if r > n_rows:  # more columns than rows: every subset is dependent
            subset = np.arange(r)
        else:
            subset = None
            combos = itertools.combinations(range(n_atoms), r)
            while subset is None:
                chunk = np.array(list(itertools.islice(combos, 50_000)), dtype=np.int64).reshape(-1, r)
                if not len(chunk):
                    break
                smallest = np.linalg.svd(d[:, chunk].transpose(1, 0, 2), compute_uv=False)[:, -1]
                hits = np.flatnonzero(smallest <= floor)
                if hits.size:
                    subset = chunk[hits[0]]
            if subset is None:
                continue
        null = np.linalg.svd(d[:, subset], full_matrices=True)[2][-1]
        v = torch.zeros(n_atoms, dtype=torch.float64, device="cpu")  # numpy's result, on the CPU whatever the default
        v[torch.from_numpy(subset)] = torch.from_numpy(null)
        return float(r), v
    return math.inf, None


def sparse_collision(matrix: torch.Tensor, s: int, *, tol: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Two distinct codes with at most s non-zeros each and the same synthesis D z1 = D z2, or None if none exists.

    matrix: (n, A). A pair exists exactly when some 2s columns are dependent (spark(D) <= 2s): split a null vector
    on spark(D) columns into two halves of at most s entries, z1 = v on one and z2 = -v on the other. s is an int >= 0
    (s = 0: both codes would be zero, never distinct: None).
    """
    _, v = spark(matrix, max_size=2 * _sparsity(s), tol=tol)
    if v is None:
        return None
    support = torch.nonzero(v).flatten()
    half = (support.numel() + 1) // 2
    z1, z2 = torch.zeros_like(v), torch.zeros_like(v)
    z1[support[:half]] = v[support[:half]]
    z2[support[half:]] = -v[support[half:]]
    return z1, z2


def stability_bound(eps: float, sparsities: Sequence[int], mus: Sequence[float]) -> list[float]:
    """Per-layer bounds on ||Gamma_j - hat Gamma_j||_2 for any s_j-sparse estimate feasible for noise ||e|| <= eps.

    ||Gamma_j - hat Gamma_j||^2 <= 4^j eps^2 prod_{i<=j} 1/(1 - (2 s_i - 1) mu_i) (docs/theory.md §2.2 (⋆)). The
    per-layer factor is Donoho–Elad 2003's l0 stability [L]; the product over layers is the ML-CSC form
    (Papyan–Romano–Elad 2017, Thm 5) with global l0 [R]; the seed paper's own constants are unknown. A layer violating
    (2 s - 1) mu < 1 gives inf from there on. eps >= 0, every s an int >= 0 (s = 0: factor 1), every mu in [0, 1].
    """
    sparsities, mus = _layers("sparsities", sparsities), _layers("mus", mus)
    if len(sparsities) != len(mus):
        raise ValueError(f"sparsities and mus need one entry per layer, got {len(sparsities)} and {len(mus)}")
    # eps 2^j / sqrt(prod gaps), not the square root of the squared bound: eps^2 underflowed to 0 (eps = 1e-200
    # gave 0) or overflowed (eps = 1e200 raised OverflowError), though the bound itself is representable. Each layer
    # multiplies by 2 / sqrt(gap) >= 2, so the running value only grows: it overflows only if the bound does.
    out, bound = [], _real("eps", eps)
    for s, mu in zip(sparsities, mus):
        gap = 1.0 - _rate(_sparsity(s, "sparsities"), _mu(mu, "mus"))
        bound = math.inf if gap <= 0 or math.isinf(bound) else float(_product(bound, 2.0 / math.sqrt(gap)))
        out.append(bound)
    return out


def lista_cp_rate(s: int, mu: float) -> float:
    """Linear rate q = (2s - 1) mu of LISTA-CP / analytic-weight ISTA (Chen et al. 2018, Thm 2) [L]; < 1 needed.

    s an int >= 0 (s = 0, the zero code: q = 0), mu in [0, 1]; ValueError/TypeError otherwise.
    """
    return _rate(_sparsity(s), _mu(mu))


def lista_cp_noise_gain(s: int, q: float) -> float:
    """Noise gain C = 2 s / (1 - q): the floor is C * eta where eta >= max_i |<w_i, e>| (Chen et al. 2018) [L].

    Chen et al. write eta = C_W sigma (C_W a bound on the weights, sigma on the noise); the same proof holds for
    any eta bounding |<w_i, e>|, and the suite uses the sharp eta = ||W^T e||_inf. s an int >= 0, q >= 0; q >= 1
    (no linear rate) gives inf.
    """
    s, q = _sparsity(s), _real("q", q)
    return math.inf if q >= 1 else 2.0 * s / (1.0 - q)


def lista_cp_error_bound(k, s: int, B: float, q: float, C: float, sigma: float):
    """Bound s B q^k + C sigma on ||Gamma^k - Gamma*||_2 (and _1) after k iterations from Gamma^0 = 0.

    From the l1 recursion ||e^{k+1}||_1 <= q ||e^k||_1 + 2 s eta of Chen et al. 2018 (Thm 2) [L]; applied per layer
    of a DSC model it is docs/theory.md §4.2 [R]. `k` may be an int or an array of iteration counts (>= 0, or inf).
    s an int >= 0; B, C, sigma >= 0; q >= 0, and q >= 1 (no rate: the theorem bounds nothing) gives inf. An inf
    argument gives inf where it counts, never NaN.
    """
    k, s = _iterations(k), _sparsity(s)
    B, q, C, sigma = _real("B", B), _real("q", q), _real("C", C), _real("sigma", sigma)
    if q >= 1:
        return _bound(np.full_like(k, np.inf))
    return _bound(_product(s, B, (q, k)) + _product(C, sigma))


def deep_error_bound(
    k, sparsities: Sequence[int], amplitudes: Sequence[float], qs: Sequence[float], etas: Sequence[float] | None = None
):
    """Layer-wise pursuit, k iterations per layer: ||hat Gamma_J - Gamma_J||_1 <= sum_j (prod_{i>j} Cbar_i)
    (s_j B_j q_j^k + Cbar_j eta_j), Cbar_i = 2 s_i / (1 - q_i) (docs/theory.md §4.2 (†)) [R], each layer's step from
    Chen et al. 2018 [L]. eta_j: the noise layer j sees besides layer j-1's error (default 0).

    Layer j's error enters layer j+1 as noise with eta <= ||error||_1 (unit-norm atoms). `k` int or array (>= 0, or
    inf). One entry per layer (at least one) in every list: s_j ints >= 0, B_j, eta_j >= 0, q_j >= 0; a layer with
    q_j >= 1 has no guarantee, and neither has the chain: inf.
    """
    k = _iterations(k)
    sparsities, amplitudes, qs = _layers("sparsities", sparsities), _layers("amplitudes", amplitudes), _layers("qs", qs)
    etas = [0.0] * len(qs) if etas is None else _layers("etas", etas)
    if not qs or not len(sparsities) == len(amplitudes) == len(qs) == len(etas):
        raise ValueError(
            "sparsities, amplitudes, qs and etas need one entry per layer (at least one), got "
            f"{len(sparsities)}, {len(amplitudes)}, {len(qs)} and {len(etas)}"
        )
    sparsities = [_sparsity(s, "sparsities") for s in sparsities]
    amplitudes = [_real("amplitudes", b) for b in amplitudes]
    qs = [_real("qs", q) for q in qs]
    etas = [_real("etas", e) for e in etas]
    if max(qs) >= 1:
        return _bound(np.full_like(k, np.inf))
    total = np.zeros_like(k)
    for j in range(len(qs)):
        gains = [lista_cp_noise_gain(sparsities[i], qs[i]) for i in range(j + 1, len(qs))]
        own = _product(*gains, sparsities[j], amplitudes[j], (qs[j], k))
        total = total + own + _product(*gains, lista_cp_noise_gain(sparsities[j], qs[j]), etas[j])
    return _bound(total)


def stripe_sparsity(code: torch.Tensor, kernel_size: int | Sequence[int], stride: int | Sequence[int] = 1) -> int:
    """||Gamma||_{0,inf}^s: the most non-zeros of one sample (all channels together) in a stripe, the code positions
    whose atoms can overlap a given atom: per axis a window of 2*floor((k-1)/s) + 1 positions.

    code: (B, C, *S) for a dictionary with filter `kernel_size` and `stride`; returns the max over the batch (0 for
    an empty code). NaN counts as non-zero. The local sparsity measure of ML-CSC (Papyan–Romano–Elad 2017) [L];
    global ||Gamma||_0 bounds it.
    """
    if not isinstance(code, torch.Tensor) or code.dim() not in (3, 4):
        raise ValueError(f"code must be a (B, C, L) or (B, C, H, W) tensor, got {getattr(code, 'shape', code)!r}")
    nd = code.dim() - 2
    ks, st = check.ints("kernel_size", kernel_size, nd, minimum=1), check.ints("stride", stride, nd, minimum=1)
    check.require_values("code", code, "stripe_sparsity")
    counts = (code != 0).sum(1).to(torch.int64)  # (B, *S)
    if not counts.numel():
        return 0
    # Window sums along each axis by integer prefix sums: exact, and linear in the code size however wide the
    # window (a pooling kernel as wide as a large filter costs its width per position).
    for axis, (k, s) in enumerate(zip(ks, st), start=1):
        n, reach = counts.shape[axis], (k - 1) // s
        cum = F.pad(counts.cumsum(axis).movedim(axis, -1), (1, 0)).movedim(-1, axis)
        pos = torch.arange(n, device=counts.device)  # index_select wants its index on the code's device
        hi, lo = (pos + reach + 1).clamp(max=n), (pos - reach).clamp(min=0)
        counts = cum.index_select(axis, hi) - cum.index_select(axis, lo)
    return int(counts.max())


def stripe_rate(s_stripe: int, mu: float) -> float:
    """q = (2 s_st - 1) mu: the LISTA-CP rate with the stripe sparsity in place of the global one [R].

    Why: the pre-activation error of atom i is a sum over the atoms that overlap it, at most s_st - 1 of them on
    the support besides i itself, so the l_inf recursion of Chen et al. 2018's proof localises (docs/theory.md §4.3).
    s_stripe an int >= 0 (0: q = 0), mu in [0, 1].
    """
    return _rate(_sparsity(s_stripe, "s_stripe"), _mu(mu))


def stripe_threshold(err_linf: float, s_stripe: int, mu: float, eta: float) -> float:
    """theta_k = mu s_st ||Gamma^k - Gamma*||_inf + eta: no atom off the support survives, since its pre-activation is
    at most mu s_st ||e^k||_inf + eta (the stripe version of oracle_threshold) [R]. err_linf, eta >= 0."""
    s_stripe, mu = _sparsity(s_stripe, "s_stripe"), _mu(mu)
    return _bound(np.float64(mu * s_stripe * _real("err_linf", err_linf) + _real("eta", eta)))


def stripe_error_bound(k, s_stripe: int, B: float, mu: float, eta: float):
    """||Gamma^k - Gamma*||_inf <= B q^k + 2 eta (1 - q^k)/(1 - q), q = (2 s_st - 1) mu, from
    M_{k+1} <= q M_k + 2 eta, M_0 = ||Gamma*||_inf <= B, under stripe_threshold [R]. `k` int or array (>= 0, or
    inf); B, eta >= 0; q >= 1 gives inf."""
    q, k = stripe_rate(s_stripe, mu), _iterations(k)
    B, eta = _real("B", B), _real("eta", eta)
    if q >= 1:
        return _bound(np.full_like(k, np.inf))
    return _bound(_product(B, (q, k)) + _product(2.0, eta, 1 - np.power(q, k), 1 / (1 - q)))


def oracle_threshold(err_l1: float, mu: float, eta: float) -> float:
    """theta_k = mu * sup ||Gamma^k - Gamma*||_1 + eta, the threshold of Chen et al. 2018's proof [L].

    Large enough that no off-support entry survives (no false positives), small enough to keep the rate q.
    err_l1, eta >= 0; mu in [0, 1].
    """
    return _bound(np.float64(_mu(mu) * _real("err_l1", err_l1) + _real("eta", eta)))


def geometric_thresholds(theta0: float, q: float, n_iter: int, floor: float = 0.0) -> np.ndarray:
    """theta_k = theta0 q^k + floor for k = 0..n_iter-1: the data-independent schedule that dominates the oracle.

    With theta0 = mu s B and floor = mu C eta + eta it upper-bounds the oracle threshold at every k, so the
    no-false-positive argument and the rate q carry over (docs/theory.md §4.1) [L/R]. Returns (n_iter,).
    theta0, floor finite and >= 0; q in [0, 1) (q >= 1 has no schedule that dominates the oracle: ValueError);
    n_iter an int >= 0.
    """
    theta0, floor = _real("theta0", theta0, finite=True), _real("floor", floor, finite=True)
    q = _real("q", q)
    if q >= 1:
        raise ValueError(f"q must be < 1 (a linear rate), got {q!r}: the theory gives no threshold schedule")
    return _product(theta0, (q, np.arange(check.count("n_iter", n_iter, 0), dtype=np.float64))) + floor


def _objective_bound(k: object, L: object, dist0_sq: object, rate: Callable[[np.ndarray], tuple]):
    """c(k) L ||z_0 - z*||^2 for k >= 1 and inf at k = 0: the theorems bound the iterates, not the start z_0."""
    k = _iterations(k)
    L, dist0_sq = _real("L", L), _nonnegative_array("dist0_sq", dist0_sq)
    try:
        np.broadcast(k, dist0_sq)
    except ValueError:
        raise ValueError(f"k and dist0_sq must broadcast together, got shapes {k.shape} and {dist0_sq.shape}") from None
    # one product of L, dist0_sq and the rate's factors: L dist0_sq or (k + 1)^2 alone could overflow (k = 1e160:
    # a FISTA bound of 0) where the bound does not
    with np.errstate(divide="ignore"):
        return _bound(np.where(k >= 1, _product(L, dist0_sq, *rate(np.maximum(k, 1.0))), np.inf))


def ista_objective_bound(k, L: float, dist0_sq: float):
    """F(z_k) - F* <= L ||z_0 - z*||^2 / (2k) for ISTA with step 1/L (Beck–Teboulle 2009, Thm 3.1) [L].

    k: iteration counts >= 0 (k = 0, the start: inf), an int or array; L >= 0; dist0_sq >= 0 (scalar or array).
    """
    return _objective_bound(k, L, dist0_sq, lambda k: (0.5, 1.0 / k))


def fista_objective_bound(k, L: float, dist0_sq: float):
    """F(z_k) - F* <= 2 L ||z_0 - z*||^2 / (k + 1)^2 for FISTA with step 1/L (Beck–Teboulle 2009, Thm 4.4) [L].

    k: iteration counts >= 0 (k = 0, the start: inf), an int or array; L >= 0; dist0_sq >= 0 (scalar or array).
    """
    return _objective_bound(k, L, dist0_sq, lambda k: (2.0, 1.0 / (k + 1.0), 1.0 / (k + 1.0)))


def smooth_relu(name: str, beta: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The smooth activation sigma_beta that tends to ReLU as beta grows: softplus, silu or gelu (inner scale beta).

    beta finite and > 0 (ValueError otherwise: beta = 0 is no ReLU approximation, and softplus would divide by 0).
    The returned function takes a real tensor z (TypeError otherwise; integer and bool ones are activated in the
    default float dtype) and keeps its dtype, NaN giving NaN.
    """
    b = _check_activation(name, beta)
    if name == "softplus":
        # softplus returns z itself once beta z passes `threshold`, dropping log(1 + e^{-beta z}) / beta: below
        # float32's rounding from 20 on, but in float64 a relative 1e-10 at 20; from 40 on it is below float64's too
        def sigma(z: torch.Tensor) -> torch.Tensor:
            return F.softplus(z, beta=b, threshold=40.0 if z.dtype == torch.float64 else 20.0)
    elif name == "silu":

        def sigma(z: torch.Tensor) -> torch.Tensor:
            return z * torch.sigmoid(b * z)
    else:
        # gelu(b z) / b = z Phi(b z), written without the division, which a tiny beta would turn into 0 / 0; Phi(x)
        # as erfc(-x / sqrt 2) / 2, since 1 + erf(x / sqrt 2) cancels to 0 in the left tail (z Phi(b z) is tiny)
        def sigma(z: torch.Tensor) -> torch.Tensor:
            return z * 0.5 * torch.erfc(b * z * -(0.5**0.5))

    def activation(z: torch.Tensor) -> torch.Tensor:
        if not isinstance(z, torch.Tensor) or z.is_complex():
            raise TypeError(f"z must be a real torch.Tensor, got {getattr(z, 'dtype', type(z).__name__)}")
        # integer and bool inputs are activated in the default float dtype (softplus has no integer kernel)
        z = z if z.is_floating_point() else z.to(torch.get_default_dtype())
        # float16/bfloat16/float32 scale by beta in float32: a beta past float32's range made softplus raise
        # RuntimeError (beta does not convert) and SiLU/GELU NaN at z = 0 (0 * inf), one that rounds to 0 gave NaN
        # at z = inf. Such a beta is scaled in float64 and the result rounded back.
        if z.dtype != torch.float64 and not _FLOAT32_NORMAL[0] <= b <= _FLOAT32_NORMAL[1]:
            return sigma(z.to(torch.float64)).to(z.dtype)
        return sigma(z)

    return activation


# sup_z |sigma_1(z) - ReLU(z)| and where it is reached: log 2 at z = 0 for softplus; for SiLU/GELU the deepest dip
# below zero, at the stationary point of z*sigmoid(z) resp. z*Phi(z). tests/test_theory.py recomputes both.
_FLOAT32_NORMAL = (float(torch.finfo(torch.float32).tiny), float(torch.finfo(torch.float32).max))
_SUP_GAP = {"softplus": math.log(2.0), "silu": 0.278464542761074, "gelu": 0.169971207479904}
_SUP_AT = {"softplus": 0.0, "silu": -1.278464542761074, "gelu": -0.751791524693565}


def _check_activation(name: str, beta: float) -> float:
    if not isinstance(name, str) or name not in _SUP_GAP:
        raise ValueError(f"activation must be one of {sorted(_SUP_GAP)}, got {name!r}")
    return _real("beta", beta, finite=True, positive=True)


def activation_sup_distance(name: str, beta: float) -> float:
    """sup_z |sigma_beta(z) - ReLU(z)| = c / beta (softplus log 2, SiLU 0.2785, GELU 0.1700).

    The approximation floor of the smooth-activation extension: the seed paper claims rates for "diverse activation
    functions" [P]; the floor ∝ 1/beta mechanism is docs/theory.md §5.1 [R] and the constants are computed [C].
    """
    beta = _check_activation(name, beta)
    return _SUP_GAP[name] / beta


def activation_worst_input(name: str, beta: float) -> float:
    """The pre-activation z where |sigma_beta(z) - ReLU(z)| is largest: z_1 / beta (softplus 0, SiLU -1.2785,
    GELU -0.7518) [C]. A unit held there costs the full c / beta; a unit at distance m from the kink only
    sup_{|z| >= m} |sigma_beta - ReLU|, which falls exponentially in beta m."""
    beta = _check_activation(name, beta)
    return _SUP_AT[name] / beta
