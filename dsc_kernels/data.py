"""Synthetic deep-sparse-coding problems with known ground-truth codes and controlled coherence.

Dictionaries follow docs/design.md §2: a weight (C_code, C_sig, k) or (C_code, C_sig, kh, kw) synthesises D z =
conv_transpose(z, weight, stride, padding) at a fixed signal size. Low coherence is what the worst-case theory needs
(docs/theory.md §4.4): Barker codes have aperiodic autocorrelation sidelobes of 1/length, Golomb-ruler filters
(sparse taps, all pairwise differences distinct) have sidelobes 1/marks and keep deeper codes sparse. Nothing is
downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .theory import mutual_coherence

__all__ = [
    "BARKER",
    "ConvDictionary",
    "DSCProblem",
    "barker_filter",
    "golomb_filter",
    "dct_filters",
    "random_filters",
    "conv_dictionary",
    "dictionary_chain",
    "sparse_codes",
    "synthesize",
    "dsc_problem",
]

BARKER = {
    2: [1, -1],
    3: [1, 1, -1],
    4: [1, 1, -1, 1],
    5: [1, 1, 1, -1, 1],
    7: [1, 1, 1, -1, -1, 1, -1],
    11: [1, 1, 1, -1, -1, -1, 1, -1, -1, 1, -1],
    13: [1, 1, 1, 1, 1, -1, -1, 1, 1, -1, 1, -1, 1],
}


@dataclass
class ConvDictionary:
    """A convolutional dictionary at a fixed size. weight: (C_code, C_sig, *k); sizes are spatial tuples."""

    weight: torch.Tensor
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    code_size: tuple[int, ...]
    signal_size: tuple[int, ...]
    mu: float
    name: str = ""

    @property
    def ndim(self) -> int:
        return self.weight.dim() - 2


@dataclass
class DSCProblem:
    """x = D_1 Gamma_1 + e, Gamma_{j-1} = D_j Gamma_j: every code known.

    x, clean, noise: (B, C_sig, *signal_size); codes[j]: (B, C_code_j, *code_size_j) for layers 1..J (index 0..J-1);
    sparsity[j] = max over the batch of ||Gamma_j||_0; amplitude[j] = max |Gamma_j|.
    """

    x: torch.Tensor
    clean: torch.Tensor
    noise: torch.Tensor
    codes: list[torch.Tensor]
    dictionaries: list[ConvDictionary]
    sparsity: list[int] = field(default_factory=list)
    amplitude: list[float] = field(default_factory=list)


def barker_filter(length: int = 13, ndim: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Unit-norm Barker code, (1, 1, k) or its outer product (1, 1, k, k); coherence 1/length at stride 1."""
    if length not in BARKER:
        raise ValueError(f"Barker codes exist for lengths {sorted(BARKER)}, got {length}")
    b = torch.tensor(BARKER[length], dtype=dtype)
    w = b if ndim == 1 else torch.outer(b, b)
    return (w / w.norm()).reshape(1, 1, *w.shape)


def golomb_filter(marks: Sequence[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Unit-norm sparse filter (1, 1, max(marks)+1) with equal taps at `marks`; a Golomb ruler gives mu = 1/len(marks).

    As a deeper-layer dictionary it keeps Gamma_{j-1} = D_j Gamma_j sparse (len(marks) entries per atom).
    """
    marks = sorted(set(int(m) for m in marks))
    if not marks or marks[0] < 0:
        raise ValueError(f"marks must be non-negative integers, got {marks}")
    w = torch.zeros(marks[-1] + 1, dtype=dtype)
    w[marks] = 1.0 / math.sqrt(len(marks))
    return w.reshape(1, 1, -1)


def dct_filters(n_filters: int, size: int, ndim: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The first n_filters orthonormal DCT-II atoms of length `size` (2-D: separable products, lowest total
    frequency first): (n_filters, 1, size) or (n_filters, 1, size, size).
    """
    n = torch.arange(size, dtype=dtype)
    basis = torch.stack([torch.cos(math.pi * (n + 0.5) * f / size) for f in range(size)])
    basis = basis / basis.norm(dim=1, keepdim=True)
    if ndim == 1:
        if n_filters > size:
            raise ValueError(f"at most {size} 1-D DCT filters of length {size}")
        return basis[:n_filters].reshape(n_filters, 1, size)
    pairs = sorted(((a, b) for a in range(size) for b in range(size)), key=lambda p: (p[0] + p[1], p))
    if n_filters > len(pairs):
        raise ValueError(f"at most {len(pairs)} 2-D DCT filters of size {size}")
    return torch.stack([torch.outer(basis[a], basis[b]) for a, b in pairs[:n_filters]]).unsqueeze(1)


def random_filters(
    c_code: int, c_sig: int, size: int | Sequence[int], *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Gaussian filters, each code channel's (C_sig, *k) block normalised to unit norm: (c_code, c_sig, *size).

    Random dictionaries are far more coherent than the theory tolerates (docs/theory.md §4.4); pass them through
    conv_dictionary to get the coherence reported.
    """
    ks = (size,) if isinstance(size, int) else tuple(size)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c_code, c_sig, *ks, generator=g, dtype=dtype)
    return w / w.flatten(1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))


def conv_dictionary(
    weight: torch.Tensor,
    code_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    name: str = "",
) -> ConvDictionary:
    """Fix a dictionary's code size; the signal size is (code - 1) * stride + k - 2 * padding; mu is computed
    exactly."""
    nd = weight.dim() - 2
    tup = lambda v: (v,) * nd if isinstance(v, int) else tuple(int(a) for a in v)  # noqa: E731
    code, st, pd = tup(code_size), tup(stride), tup(padding)
    sig = tuple((z - 1) * s + k - 2 * p for z, s, k, p in zip(code, st, weight.shape[2:], pd))
    if min(sig) < 1:
        raise ValueError(f"code_size {code} with this filter gives an empty signal {sig}")
    mu = mutual_coherence(weight, sig, stride=st, padding=pd)
    return ConvDictionary(weight, st, pd, code, sig, mu, name)


def dictionary_chain(
    weights: Sequence[torch.Tensor], code_size: int | Sequence[int], *, strides: Sequence[int] | None = None
) -> list[ConvDictionary]:
    """Layers 1..J of a DSC model (padding 0), sized from the deepest code up: layer j's code is layer j+1's signal."""
    strides = list(strides) if strides is not None else [1] * len(weights)
    out: list[ConvDictionary] = []
    size = code_size
    for j in reversed(range(len(weights))):
        out.insert(0, conv_dictionary(weights[j], size, stride=strides[j], name=f"layer {j + 1}"))
        size = out[0].signal_size
    return out


def synthesize(z: torch.Tensor, d: ConvDictionary) -> torch.Tensor:
    """D z for z: (B, C_code, *code_size) -> (B, C_sig, *signal_size): conv_transpose with the output_padding that
    gives exactly the signal size."""
    w = d.weight.to(z.dtype)
    op = tuple(
        n + 2 * p - k - (c - 1) * s
        for n, p, k, c, s in zip(d.signal_size, d.padding, w.shape[2:], z.shape[2:], d.stride)
    )
    conv_t = F.conv_transpose1d if d.ndim == 1 else F.conv_transpose2d
    return conv_t(z, w, stride=d.stride, padding=d.padding, output_padding=op)


def sparse_codes(
    batch: int,
    channels: int,
    code_size: Sequence[int],
    sparsity: int,
    *,
    amplitude: tuple[float, float] = (0.5, 1.0),
    min_separation: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Codes (batch, channels, *code_size) with exactly `sparsity` non-zeros per sample.

    Magnitudes uniform in `amplitude`, random signs; active positions are at least `min_separation` apart
    (Chebyshev distance over the spatial axes, any channel), so atoms of a deeper layer do not overlap and
    Gamma_{j-1} = D_j Gamma_j keeps a predictable support.
    """
    lo, hi = amplitude
    if not 0 <= lo <= hi or hi == 0:
        raise ValueError(f"amplitude must be (lo, hi) with 0 <= lo <= hi, hi > 0; got {amplitude}")
    g = torch.Generator().manual_seed(seed)
    size = tuple(code_size)
    n_pos = math.prod(size)
    z = torch.zeros(batch, channels, n_pos, dtype=dtype)
    for b in range(batch):
        chosen: list[tuple[int, ...]] = []
        for _ in range(10000):
            if len(chosen) == sparsity:
                break
            flat = int(torch.randint(n_pos, (1,), generator=g))
            pos = tuple(int(a) for a in torch.unravel_index(torch.tensor(flat), size))
            if all(max(abs(a - c) for a, c in zip(pos, q)) >= min_separation for q in chosen):
                chosen.append(pos)
                ch = int(torch.randint(channels, (1,), generator=g))
                mag = lo + (hi - lo) * float(torch.rand((), generator=g, dtype=dtype))
                sign = 1.0 if float(torch.rand((), generator=g)) < 0.5 else -1.0
                z[b, ch, flat] = sign * mag
        if len(chosen) < sparsity:
            raise ValueError(f"cannot place {sparsity} entries {min_separation} apart in a code of size {size}")
    return z.reshape(batch, channels, *size)


def dsc_problem(
    dictionaries: Sequence[ConvDictionary],
    sparsity: int,
    *,
    batch: int = 8,
    amplitude: tuple[float, float] = (0.5, 1.0),
    noise_std: float = 0.0,
    noise_l2: float | None = None,
    min_separation: int | None = None,
    seed: int = 0,
) -> DSCProblem:
    """A J-layer DSC problem (J = len(dictionaries), layer 1 first) with a `sparsity`-sparse deepest code.

    Gamma_J is drawn by sparse_codes; Gamma_{j-1} = D_j Gamma_j; x = D_1 Gamma_1 + e with Gaussian e of std
    `noise_std`, or scaled to exactly ||e||_2 = noise_l2 per sample. `min_separation` defaults to the largest
    filter extent of the deeper layers so their atoms never overlap.
    """
    if noise_l2 is not None and noise_std:
        raise ValueError("give noise_std or noise_l2, not both")
    for j in range(1, len(dictionaries)):
        up, down = dictionaries[j - 1], dictionaries[j]
        if up.code_size != down.signal_size or up.weight.shape[0] != down.weight.shape[1]:
            raise ValueError(f"layer {j + 1}'s signal must be layer {j}'s code (see dictionary_chain)")
    deepest = dictionaries[-1]
    if min_separation is None:
        min_separation = max([1] + [max(d.weight.shape[2:]) for d in dictionaries[1:]])
    dtype = deepest.weight.dtype
    codes = [
        sparse_codes(
            batch,
            deepest.weight.shape[0],
            deepest.code_size,
            sparsity,
            amplitude=amplitude,
            min_separation=min_separation,
            seed=seed,
            dtype=dtype,
        )
    ]
    for d in reversed(dictionaries[1:]):
        codes.insert(0, synthesize(codes[0], d))
    clean = synthesize(codes[0], dictionaries[0])
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(clean.shape, generator=g, dtype=dtype)
    if noise_l2 is not None:
        noise = noise * (noise_l2 / noise.flatten(1).norm(dim=1)).reshape(-1, *([1] * (noise.dim() - 1)))
    else:
        noise = noise * noise_std
    return DSCProblem(
        x=clean + noise,
        clean=clean,
        noise=noise,
        codes=codes,
        dictionaries=list(dictionaries),
        sparsity=[int((c != 0).flatten(1).sum(1).max()) for c in codes],
        amplitude=[float(c.abs().max()) for c in codes],
    )
