"""Synthetic deep-sparse-coding problems with known ground-truth codes and controlled coherence.

Dictionaries follow docs/design.md §2: a weight (C_code, C_sig, k) or (C_code, C_sig, kh, kw) synthesises D z =
conv_transpose(z, weight, stride, padding) at a fixed signal size. Low coherence is what the worst-case theory needs
(docs/theory.md §4.4): Barker codes have aperiodic autocorrelation sidelobes of 1/length, Golomb-ruler filters
(sparse taps, all pairwise differences distinct) have sidelobes 1/marks and keep deeper codes sparse.

Real data that ships inside scikit-learn, nothing downloaded: ``digits(seed)`` (the 8x8 digits, split as the digits
recipe splits them) and ``photo(name)`` (a grayscale sample photograph, ``PHOTOS``), the recipes' own loaders
(``recipes.data``, which needs the ``train`` extra), imported on first use.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from . import _validate as check
from .reference.conv import conv_transpose_nd
from .theory import _check_weight, _real, mutual_coherence

# The real-data loaders (recipes.data), by name: the recipes import this module, so they are imported when first
# asked for (module __getattr__ at the end).
_REAL_DATA = ("digits", "photo", "PHOTOS")

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
    *_REAL_DATA,
]

# Greedy restarts before the lattice fallback in sparse_codes (2-D, min_separation >= 2, tight requests only).
_RESTARTS = 20

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


def _float_dtype(dtype: object) -> torch.dtype:
    """Unit-norm filters and codes need a floating dtype: an integer one would round every tap to 0 or fail."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    return dtype


def _ndim(ndim: object) -> int:
    if check.count("ndim", ndim, 1) > 2:
        raise ValueError(f"ndim must be 1 or 2, got {ndim!r}")
    return ndim


def _seed(seed: object) -> int:
    """What torch.Generator.manual_seed takes: an int in [-2**63, 2**64)."""
    seed = check.count("seed", seed, -(2**63))
    if seed >= 2**64:
        raise ValueError(f"seed must be < 2**64, got {seed}")
    return seed


def _on_the_cpu(make: Callable) -> Callable:
    """Run a generator of built-in data with the CPU as the default device, whatever ``torch.set_default_device``
    or a ``with torch.device(...)`` block says: its seeded CPU generator draws there (a CUDA default device refused
    the generator, a meta one made tensors whose values the draws then read), so a seed gives the same data
    everywhere. Every random draw also names its dtype, for the same reason under ``torch.set_default_dtype``."""

    @functools.wraps(make)
    def made_on_the_cpu(*args, **kwargs):
        with torch.device("cpu"):
            return make(*args, **kwargs)

    return made_on_the_cpu


@_on_the_cpu
def barker_filter(length: int = 13, ndim: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Unit-norm Barker code, (1, 1, k) or its outer product (1, 1, k, k); coherence 1/length at stride 1.

    length an int (Python, numpy or 0-d tensor), ndim 1 or 2 and a floating dtype (ValueError/TypeError otherwise)."""
    # the dict lookup took 13.0 for 13 and refused torch.tensor(13) as "not a Barker length"
    length = check.count("length", length, 1)
    if length not in BARKER:
        raise ValueError(f"Barker codes exist for lengths {sorted(BARKER)}, got {length!r}")
    ndim, dtype = _ndim(ndim), _float_dtype(dtype)
    b = torch.tensor(BARKER[length], dtype=dtype)
    w = b if ndim == 1 else torch.outer(b, b)
    return (w / w.norm()).reshape(1, 1, *w.shape)


@_on_the_cpu
def golomb_filter(marks: Sequence[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Unit-norm sparse filter (1, 1, max(marks)+1) with equal taps at `marks`; a Golomb ruler gives mu = 1/len(marks).

    As a deeper-layer dictionary it keeps Gamma_{j-1} = D_j Gamma_j sparse (len(marks) entries per atom). marks: a
    non-empty collection of ints >= 0 (a float would be truncated to another ruler: TypeError).
    """
    if isinstance(marks, (str, bytes)) or not isinstance(marks, Iterable):
        raise TypeError(f"marks must be a collection of ints, got {marks!r}")
    marks = sorted(set(check.count("marks", m, 0) for m in marks))
    if not marks:
        raise ValueError("marks must hold at least one mark")
    dtype = _float_dtype(dtype)
    w = torch.zeros(marks[-1] + 1, dtype=dtype)
    w[marks] = 1.0 / math.sqrt(len(marks))
    return w.reshape(1, 1, -1)


@_on_the_cpu
def dct_filters(n_filters: int, size: int, ndim: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The first n_filters orthonormal DCT-II atoms of length `size` (2-D: separable products, lowest total
    frequency first): (n_filters, 1, size) or (n_filters, 1, size, size). n_filters an int >= 0, size >= 1.
    """
    n_filters, size = check.count("n_filters", n_filters, 0), check.count("size", size, 1)
    ndim, dtype = _ndim(ndim), _float_dtype(dtype)
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
    atoms = [torch.outer(basis[a], basis[b]) for a, b in pairs[:n_filters]]
    return torch.stack(atoms).unsqueeze(1) if atoms else basis.new_zeros(0, 1, size, size)


@_on_the_cpu
def random_filters(
    c_code: int, c_sig: int, size: int | Sequence[int], *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Gaussian filters, each code channel's (C_sig, *k) block normalised to unit norm: (c_code, c_sig, *size).

    Random dictionaries are far more coherent than the theory tolerates (docs/theory.md §4.4); pass them through
    conv_dictionary to get the coherence reported. c_code, c_sig ints >= 0; size an int (1-D) or one or two ints,
    each >= 1.
    """
    c_code, c_sig = check.count("c_code", c_code, 0), check.count("c_sig", c_sig, 0)
    try:
        ks = (check.count("size", size, 1),)
    except TypeError:
        if isinstance(size, (str, bytes)) or not isinstance(size, Sequence) or len(size) not in (1, 2):
            raise TypeError(f"size must be an int or a sequence of 1 or 2 ints, got {size!r}") from None
        ks = check.ints("size", size, len(size), minimum=1)
    dtype = _float_dtype(dtype)
    g = torch.Generator().manual_seed(_seed(seed))
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
    exactly. weight: a floating (C_code, C_sig, *k); code_size, stride >= 1 and padding >= 0, ints or one per
    spatial axis (ValueError/TypeError naming them otherwise)."""
    if not _check_weight(weight).is_floating_point():
        raise TypeError(f"weight must have a floating-point dtype, got {weight.dtype}")
    nd = weight.dim() - 2
    code = check.ints("code_size", code_size, nd, minimum=1)
    st, pd = check.ints("stride", stride, nd, minimum=1), check.ints("padding", padding, nd, minimum=0)
    sig = tuple((z - 1) * s + k - 2 * p for z, s, k, p in zip(code, st, weight.shape[2:], pd))
    if min(sig) < 1:
        raise ValueError(f"code_size {code} with this filter gives an empty signal {sig}")
    mu = mutual_coherence(weight, sig, stride=st, padding=pd)
    return ConvDictionary(weight, st, pd, code, sig, mu, name)


def dictionary_chain(
    weights: Sequence[torch.Tensor], code_size: int | Sequence[int], *, strides: Sequence[int] | None = None
) -> list[ConvDictionary]:
    """Layers 1..J of a DSC model (padding 0), sized from the deepest code up: layer j's code is layer j+1's signal.

    Every weight has the same rank, and layer j's C_code is layer j+1's C_sig; strides: one per layer (default 1).
    weights: a non-empty sequence of tensors (TypeError/ValueError otherwise).
    """
    # A bare weight iterates as its rows: a (C, C, k, k) 2-D weight with C == k passed every check below as a
    # silent C-layer 1-D chain.
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Iterable):
        raise TypeError(f"weights must be a sequence of weight tensors, one per layer, got {type(weights).__name__}")
    weights = list(weights)
    if not weights:
        raise ValueError("weights must hold at least one layer")  # [] was returned, code_size never checked
    for j, w in enumerate(weights):
        _check_weight(w)
        if w.dim() != weights[0].dim():
            raise ValueError(
                f"weights must share one rank: layer 1 is {weights[0].dim() - 2}-D, layer {j + 1} {w.dim() - 2}-D"
            )
        if j and w.shape[1] != weights[j - 1].shape[0]:
            raise ValueError(
                f"layer {j + 1}'s C_sig ({w.shape[1]}) must be layer {j}'s C_code ({weights[j - 1].shape[0]})"
            )
    if strides is not None and not isinstance(strides, (list, tuple)):
        raise TypeError(f"strides must be a list with one stride per layer, got {strides!r}")
    strides = list(strides) if strides is not None else [1] * len(weights)
    if len(strides) != len(weights):
        raise ValueError(f"strides needs one entry per layer ({len(weights)}), got {len(strides)}")
    out: list[ConvDictionary] = []
    size = code_size
    for j in reversed(range(len(weights))):
        out.insert(0, conv_dictionary(weights[j], size, stride=strides[j], name=f"layer {j + 1}"))
        size = out[0].signal_size
    return out


def synthesize(z: torch.Tensor, d: ConvDictionary) -> torch.Tensor:
    """D z for z: (B, C_code, *code_size) -> (B, C_sig, *signal_size): conv_transpose with the output_padding that
    gives exactly the signal size."""
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        raise TypeError(f"z must be a floating-point torch.Tensor, got {getattr(z, 'dtype', type(z).__name__)}")
    if not isinstance(d, ConvDictionary):  # a raw weight failed with "'Tensor' object has no attribute 'weight'"
        raise TypeError(f"d must be a ConvDictionary (see conv_dictionary), got {type(d).__name__}")
    want = (d.weight.shape[0], *d.code_size)
    if z.dim() != d.ndim + 2 or tuple(z.shape[1:]) != want:
        raise ValueError(f"z must be (B, {', '.join(map(str, want))}) for this dictionary, got {tuple(z.shape)}")
    w = d.weight.to(z.dtype)
    op = tuple(
        n + 2 * p - k - (c - 1) * s
        for n, p, k, c, s in zip(d.signal_size, d.padding, w.shape[2:], z.shape[2:], d.stride)
    )
    return conv_transpose_nd(z, w, stride=d.stride, padding=d.padding, output_padding=op)


def _ravel(pos: Sequence[int], size: Sequence[int]) -> int:
    flat = 0
    for p, n in zip(pos, size):
        flat = flat * n + p
    return flat


def _unravel(flat: int, size: Sequence[int]) -> tuple[int, ...]:
    pos = []
    for n in reversed(size):
        flat, p = divmod(flat, n)
        pos.append(p)
    return tuple(reversed(pos))


def _block(free: torch.Tensor, pos: Sequence[int], sep: int) -> None:
    """Mark every position closer than sep (Chebyshev) to pos as taken."""
    free[tuple(slice(max(p - sep + 1, 0), p + sep) for p in pos)] = False


def _spaced(length: int, count: int, sep: int, g: torch.Generator) -> torch.Tensor:
    """count sorted positions in [0, length), consecutive ones >= sep >= 1 apart, uniform over all such placements
    ("stars and bars"): a uniform count-subset of the length - (count - 1)(sep - 1) slots, the i-th shifted right
    by i (sep - 1). Needs (count - 1) sep < length."""
    slots = length - (count - 1) * (sep - 1)
    chosen = torch.randperm(slots, generator=g)[:count].sort().values
    return chosen + torch.arange(count) * (sep - 1)


def _sequential(
    g: torch.Generator, size: tuple[int, ...], channels: int, sparsity: int, sep: int, lo: float, hi: float, dtype
) -> list[tuple[int, int, float]] | None:
    """Rejection sampling, draw for draw the sampler of earlier versions (so seeds that worked give the same codes):
    uniform positions, rejected when closer than sep to a chosen one (sep 0: when the (channel, position) slot is
    taken). Returns [(channel, flat position, value)], or None when it gets stuck or runs out of tries."""
    n_pos = math.prod(size)
    free = torch.ones(size, dtype=torch.bool)
    taken: set[tuple[int, int]] = set()
    entries: list[tuple[int, int, float]] = []
    for _ in range(10000):
        if len(entries) == sparsity:
            break
        if sep > 0 and not free.any():
            return None  # greedy placement painted itself into a corner
        flat = int(torch.randint(n_pos, (1,), generator=g))
        pos = _unravel(flat, size)
        if sep > 0 and not free[pos]:
            continue
        ch = int(torch.randint(channels, (1,), generator=g))
        if (ch, flat) in taken:  # only possible at sep 0
            continue
        mag = lo + (hi - lo) * float(torch.rand((), generator=g, dtype=dtype))
        sign = 1.0 if float(torch.rand((), generator=g, dtype=torch.float32)) < 0.5 else -1.0
        taken.add((ch, flat))
        if sep > 0:
            _block(free, pos, sep)
        entries.append((ch, flat, sign * mag))
    return entries if len(entries) == sparsity else None


def _positions(g: torch.Generator, size: tuple[int, ...], channels: int, sparsity: int, sep: int) -> list[int]:
    """sparsity (channel * n_pos + flat position) slots pairwise >= sep apart, for any feasible request (see
    sparse_codes): a uniform subset at sep 0 or 1, stars and bars in 1-D, else greedy placement among the free
    positions with restarts and, should every restart get stuck, a random subset of a jittered lattice (per axis
    ceil(n / sep) stars-and-bars coordinates; distinct lattice points differ by >= sep on some axis)."""
    n_pos = math.prod(size)
    if sep == 0:
        return torch.randperm(channels * n_pos, generator=g)[:sparsity].tolist()
    if sep == 1:
        flats = torch.randperm(n_pos, generator=g)[:sparsity].tolist()
    elif len(size) == 1:
        flats = _spaced(size[0], sparsity, sep, g).tolist()
    else:
        flats = None
        for _ in range(_RESTARTS):
            free, flats = torch.ones(size, dtype=torch.bool), []
            for _ in range(sparsity):
                options = torch.nonzero(free.flatten()).flatten()
                if len(options) == 0:
                    flats = None
                    break
                flat = int(options[int(torch.randint(len(options), (1,), generator=g))])
                _block(free, _unravel(flat, size), sep)
                flats.append(flat)
            if flats is not None:
                break
        if flats is None:
            axes = [_spaced(n, -(-n // sep), sep, g) for n in size]
            lattice = torch.cartesian_prod(*axes)
            picked = lattice[torch.randperm(len(lattice), generator=g)[:sparsity]].tolist()
            flats = [_ravel(p, size) for p in picked]
    chans = torch.randint(channels, (sparsity,), generator=g).tolist()
    return [c * n_pos + f for c, f in zip(chans, flats)]


@_on_the_cpu
def sparse_codes(
    batch: int,
    channels: int,
    code_size: int | Sequence[int],
    sparsity: int,
    *,
    amplitude: tuple[float, float] = (0.5, 1.0),
    min_separation: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Codes (batch, channels, *code_size) with exactly `sparsity` non-zeros per sample (per batch entry).

    Magnitudes uniform in `amplitude` (never 0), random signs; active positions are at least `min_separation`
    apart (Chebyshev distance over the spatial axes, any channel), so atoms of a deeper layer do not overlap and
    Gamma_{j-1} = D_j Gamma_j keeps a predictable support. min_separation 0 lets channels share a position (but not
    a (channel, position) slot). Feasible iff sparsity <= prod ceil(n_i / min_separation) (channels * prod n_i at
    0): a min_separation-sided box holds at most one entry, and the lattice min_separation * Z^d reaches the
    bound; every feasible request succeeds, an infeasible one raises ValueError. Reproducible from `seed`.
    """
    for name, value, minimum in (("batch", batch, 0), ("channels", channels, 1), ("sparsity", sparsity, 0)):
        check.count(name, value, minimum)
    sep = check.count("min_separation", min_separation, 0)
    _seed(seed)
    # one int (numpy and 0-d tensor ints too: check.count takes them) or a sequence of them
    size = tuple(code_size) if isinstance(code_size, (list, tuple)) else (code_size,)
    if not size:
        raise ValueError("code_size must have at least one spatial axis")
    size = tuple(check.count("code_size", n, 1) for n in size)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    try:
        lo, hi = (float(a) for a in amplitude)
    except (TypeError, ValueError):
        raise ValueError(f"amplitude must be a pair (lo, hi) of numbers, got {amplitude!r}") from None
    if not (0 <= lo <= hi and 0 < hi < math.inf):
        raise ValueError(f"amplitude must be (lo, hi) with 0 <= lo <= hi, 0 < hi < inf; got {amplitude}")
    if not 0 < float(torch.tensor(hi, dtype=dtype)) < math.inf:
        raise ValueError(f"amplitude hi = {hi} rounds to {float(torch.tensor(hi, dtype=dtype))} in {dtype}")
    n_pos = math.prod(size)
    capacity = channels * n_pos if sep == 0 else math.prod(-(-n // sep) for n in size)
    if sparsity > capacity:
        raise ValueError(
            f"cannot place sparsity={sparsity} non-zeros pairwise >= min_separation={sep} apart in a code of "
            f"code_size {size} with {channels} channels: at most {capacity} fit"
        )
    g = torch.Generator().manual_seed(seed)
    z = torch.zeros(batch, channels * n_pos, dtype=dtype)
    for b in range(batch):
        entries = _sequential(g, size, channels, sparsity, sep, lo, hi, dtype)
        if entries is None:  # a tight request: place by a method that cannot get stuck
            slots = _positions(g, size, channels, sparsity, sep)
            mags = lo + (hi - lo) * torch.rand(sparsity, generator=g, dtype=dtype)
            signs = torch.where(torch.rand(sparsity, generator=g, dtype=torch.float32) < 0.5, 1.0, -1.0)
            entries = [(s // n_pos, s % n_pos, float(v)) for s, v in zip(slots, (signs * mags).tolist())]
        for ch, flat, value in entries:
            # lo = 0 with a draw of exactly 0, or a tiny lo underflowing in dtype, would lose a non-zero
            z[b, ch * n_pos + flat] = value if float(torch.tensor(value, dtype=dtype)) else math.copysign(hi, value)
    return z.reshape(batch, channels, *size)


@_on_the_cpu
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
    filter extent of the deeper layers so their atoms never overlap. Every dictionary shares one dtype.
    """
    if isinstance(dictionaries, ConvDictionary) or not isinstance(dictionaries, Iterable):
        raise TypeError(f"dictionaries must be a sequence of ConvDictionary, got {type(dictionaries).__name__}")
    dictionaries = list(dictionaries)
    if not dictionaries:
        raise ValueError("dictionaries must hold at least one layer")
    for d in dictionaries:
        if not isinstance(d, ConvDictionary):
            raise TypeError(f"dictionaries must hold ConvDictionary (see conv_dictionary), got {type(d).__name__}")
    if len({d.weight.dtype for d in dictionaries}) > 1:
        # synthesize casts each weight to the codes' dtype: a mixed chain would silently compute in the deepest one
        raise TypeError(f"dictionaries must share one dtype, got {[d.weight.dtype for d in dictionaries]}")
    check.count("batch", batch, 1)  # the per-layer sparsity and amplitude are maxima over the batch
    noise_std = _real("noise_std", noise_std, finite=True)
    noise_l2 = None if noise_l2 is None else _real("noise_l2", noise_l2, finite=True)
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
    g = torch.Generator().manual_seed((seed + 1) % 2**64)  # the same stream as seed + 1, and valid at 2**64 - 1
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


def __getattr__(name: str):
    if name in _REAL_DATA:
        from .recipes import data as real_data

        return getattr(real_data, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
