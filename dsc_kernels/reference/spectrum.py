"""``L = ||D||_2^2`` of a convolutional dictionary by power iteration per frequency: the step 1/L the layers track.

On a periodic grid of ``N = s * M`` points per dimension, the strided synthesis ``D z = conv_transpose(z, W)`` is
block diagonal in frequency. Code frequency ``nu`` (one of ``M^d``) feeds the ``s^d`` signal frequencies
``omega = nu + j * M`` through the matrices ``W_hat(omega) = sum_t W[:, :, t]^T exp(-2 pi i <omega, t / N>)``
(C_sig, C_code). Stacked over ``j`` they form ``A_nu`` ((s^d C_sig), C_code), and with unnormalised DFTs

    DFT_N(D u)(nu + j M) = W_hat(nu + j M) DFT_M(u)(nu),        ||D||^2 = max_nu sigma_max(A_nu)^2 / s^d.

A layer's D on a finite signal is a crop of this periodic operator when ``N >= s (n_z - 1) + k`` (no wrap-around,
n_z the code size). On that grid the value is therefore at least the norm on signals of that size, and at most the
norm on infinitely large ones.

Power iteration runs on the spatial periodic operator: a circular ``conv_transpose`` and ``conv``, as cheap as on
the layer's own D. Each step rescales the vector to unit norm at every frequency separately, in the DFT domain, so it
runs M^d independent power iterations on the small ``A_nu^H A_nu``, and L is the largest of their Rayleigh quotients.
One normalisation for the whole vector (plain power iteration) lets the energy gather at the peak frequency and
starves the rest. When training moves the peak of the dictionary's spectrum elsewhere, the starved frequency then
needs dozens of steps to grow back, while L is underestimated: step * L reached 1.9 with Adam at lr 0.01 on the
dictionary. Per frequency, each small matrix changes little per optimiser step. Where every ``A_nu`` is a single
row or column (one signal channel at stride 1, or one atom), L needs no iteration: it is a closed form.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .conv import conv_nd, conv_transpose_nd, row_scales


def is_rank_one(weight_shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Whether every ``A_nu`` ((s^d C_sig), C_code) is a single row or column: L then has a closed form."""
    return min(weight_shape[0], math.prod(stride) * weight_shape[1]) == 1


def periodic_grid(kernel_size: Sequence[int], stride: Sequence[int]) -> tuple[int, ...]:
    """M per dimension: a signal grid N = s M of at least 8 kernel widths, rounded up to a product of 2, 3 and 5 for
    the FFTs. W_hat is a trigonometric polynomial of degree k - 1, so its peak falls between grid frequencies by
    under 1/8 of its width: the norm comes out below the infinite-signal one, by at most 0.96% on random and smooth
    16-atom dictionaries (k = 3 to 11; a grid of 4 widths was up to 3.4% low), and by up to 4% for a single
    narrow-band atom (a separable 8 x 8 cosine, 3.6%)."""
    return tuple(_smooth(-(-8 * k // s)) for k, s in zip(kernel_size, stride))


def _smooth(n: int) -> int:
    """The smallest integer >= n with no prime factor above 5."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _pad_args(before: Sequence[int], after: Sequence[int]) -> list[int]:
    """F.pad's argument order: last dimension first, (before, after) each."""
    return [p for b, a in zip(reversed(before), reversed(after)) for p in (b, a)]


def periodic_synthesis(u: Tensor, weight: Tensor, stride: Sequence[int]) -> Tensor:
    """D u on the periodic grid: (1, C_code, *M) -> (1, C_sig, *(s M)). Output n sums the taps t and code indices i
    with ``s i + t = n`` (mod N): the code wrapped by ceil((k - 1) / s) on the left covers every i."""
    kernel, grid = weight.shape[2:], u.shape[2:]
    wrap = [-(-(k - 1) // s) for k, s in zip(kernel, stride)]
    full = conv_transpose_nd(F.pad(u, _pad_args(wrap, [0] * len(grid)), mode="circular"), weight, stride=stride)
    short = [max(0, s * (w + m) - n) for s, w, m, n in zip(stride, wrap, grid, full.shape[2:])]  # k < s
    full = F.pad(full, _pad_args([0] * len(grid), short))
    window = [slice(s * w, s * (w + m)) for s, w, m in zip(stride, wrap, grid)]
    return full[(..., *window)]


def periodic_analysis(x: Tensor, weight: Tensor, stride: Sequence[int]) -> Tensor:
    """D^T x on the periodic grid: (1, C_sig, *(s M)) -> (1, C_code, *M), the adjoint of ``periodic_synthesis``."""
    kernel = weight.shape[2:]
    wrapped = F.pad(x, _pad_args([0] * len(kernel), [k - 1 for k in kernel]), mode="circular")
    return conv_nd(wrapped, weight, stride=stride)


def _dft_matrices(size: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of the DFT's angles 2 pi n nu / M (n nu reduced mod M first, so the angles are exact)."""
    index = torch.arange(size, device=like.device, dtype=like.dtype)
    # 2 pi as a literal, not math.pi: under torch.compile(dynamic=True) dynamo lifts a float global into a graph input
    # (a 0-dim tensor read back with .item()), and inside the compiled eval forward's torch.cond branch that read
    # failed the backend ("failed with aten._local_scalar_dense"): the whole eval forward fell back to eager
    angle = (6.283185307179586 / size) * torch.outer(index, index).remainder(size)
    return angle.cos(), angle.sin()


def _dft(real: Tensor, imag: Tensor | None, inverse: bool = False) -> tuple[Tensor, Tensor | None]:
    """The DFT over every dimension after the first two (``inverse``: its inverse, of which only the real part is
    returned), on (real, imaginary) pairs; ``imag`` None is a real input. Eager calls run torch.fft. Under
    torch.compile it is real matmuls with ``_dft_matrices`` (constants of the graph): inductor generates no code for
    complex tensors, and a compiled layer warned that it ran them eagerly. The matmuls cost M times the FFT's
    M log M per dimension, which the small code grids (M ~ 8 k / s) keep below the convolutions' cost."""
    dims = list(range(2, real.dim()))
    if not torch.compiler.is_compiling():
        if inverse:
            return torch.fft.ifftn(torch.complex(real, imag), dim=dims).real, None
        transform = torch.fft.fftn(real if imag is None else torch.complex(real, imag), dim=dims)
        return transform.real, transform.imag
    for i, dim in enumerate(dims):
        m = real.shape[dim]
        cos, sin = _dft_matrices(m, real)
        sin = sin if inverse else -sin  # e^{+-i angle}
        real = real.movedim(dim, -1)
        imag = None if imag is None else imag.movedim(dim, -1)
        if imag is None:
            real, imag = real @ cos, real @ sin
        elif inverse and i == len(dims) - 1:
            real, imag = real @ cos - imag @ sin, None
        else:
            real, imag = real @ cos - imag @ sin, real @ sin + imag @ cos
        real = real.movedim(-1, dim) / (m if inverse else 1)
        imag = None if imag is None else imag.movedim(-1, dim) / (m if inverse else 1)
    return real, imag


def _unit_per_frequency(spectrum: tuple[Tensor, Tensor], fallback: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Each frequency's vector over channels (dim 1) scaled to norm 1. A zero or non-finite one (a dictionary with a
    zero or NaN there) takes ``fallback``'s, so the iteration resumes once the dictionary is valid again."""
    norm = (spectrum[0].pow(2) + spectrum[1].pow(2)).sum(dim=1, keepdim=True).sqrt()
    valid = (norm > 0) & norm.isfinite()
    safe = torch.where(valid, norm, torch.ones_like(norm))
    return tuple(torch.where(valid, part / safe, other) for part, other in zip(spectrum, fallback))


def _rank_one_norm_sq(weight: Tensor, stride: Sequence[int], grid: Sequence[int]) -> Tensor:
    """||D||^2 when every A_nu has a single row or column (one signal channel at stride 1, or one atom): sigma_max^2
    is then the squared Frobenius norm, the sum of |W_hat|^2 over channels and aliases. Exact, with no vector."""
    periods = [s * m for s, m in zip(stride, grid)]
    # taps beyond one period wrap around (a kernel longer than the grid)
    pad = [-(-k // n) * n - k for k, n in zip(weight.shape[2:], periods)]
    folded = F.pad(weight, _pad_args([0] * len(pad), pad))
    for dim, n in enumerate(periods, start=2):
        folded = folded.unflatten(dim, (-1, n)).sum(dim)
    real, imag = _dft(folded, None)
    power = (real.pow(2) + imag.pow(2)).sum(dim=(0, 1))  # (*N), frequency omega = j M + nu
    aliases = power.reshape([size for s, m in zip(stride, grid) for size in (s, m)])
    return aliases.sum(dim=tuple(range(0, aliases.dim(), 2))).amax() / math.prod(stride)


def _generic(vector: Tensor) -> Tensor:
    """A fixed real pattern of vector's shape whose DFT has no structured zeros (a quadratic Weyl sequence): mixed
    into the start so that no frequency's vector stays orthogonal to its top eigenvector. Swapping two atoms, one of
    them zero, left each frequency's vector with no component on the new atom, and the estimate at 0 for good."""
    n = torch.arange(vector.numel(), device=vector.device, dtype=torch.float64)
    return ((n * 0.6180339887498949 + n * n * 0.7548776662466927e-3) % 1.0 - 0.5).to(vector.dtype).view_as(vector)


def dictionary_norm_sq(
    weight: Tensor,
    stride: Sequence[int],
    vector: Tensor,
    n_steps: int,
    until: float | None = None,
    max_steps: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``n_steps`` (>= 1) power iterations per frequency from ``vector``; returns (||D||^2 on the periodic grid, a 0-dim
    tensor below it by the iterations' remaining error, and the new vector). Where every A_nu has rank 1 the value
    is exact (``_rank_one_norm_sq``) and the vector is returned as it is.

    ``until``: past ``n_steps``, keep iterating while the last iteration raised the estimate by more than this
    fraction, up to ``max_steps`` in all. That reads the estimate on the host once per iteration, so it is for
    CPU calls, where this costs nothing (under torch.compile the same iterations run as a ``torch.while_loop``);
    with ``until`` None nothing leaves the device.

    weight: (C_code, C_sig, *k), real; stride: d ints; vector: (1, C_code, *M), real, M from ``periodic_grid``.
    """
    # ||D||^2 is homogeneous of degree 2 in the weight, but the iteration squares images of size ~ ||D||^2 (energies
    # ~ tap^4): on the weight itself they overflowed to inf (float32 taps from ~1e9, float64 from ~1e77: L = inf,
    # step 0) or underflowed to 0 (float32 taps below ~1e-12, float64 below ~1e-77: L = 0, the zero dictionary's
    # step 1) where L itself is well inside the dtype's range. Iterate on weight / max|tap| and scale back, as
    # reference.conv.lipschitz_power_iteration does. A zero or non-finite weight keeps scale 1 (its own rules).
    scale = row_scales(weight.reshape(1, -1))[0]
    weight = weight / scale
    if is_rank_one(weight.shape, stride):
        return _rank_one_norm_sq(weight, stride, vector.shape[2:]) * scale * scale, vector
    zeros = torch.zeros_like(vector)
    generic = _unit_per_frequency(_dft(_generic(vector), None), (zeros + 1 / math.sqrt(vector.shape[1]), zeros))
    spectrum = _unit_per_frequency(_dft(vector, None), generic)  # an all-zero vector starts from generic
    spectrum = _unit_per_frequency(tuple(s + 0.01 * g for s, g in zip(spectrum, generic)), generic)
    peak = weight.new_zeros(())
    if torch.compiler.is_compiling() and (until is not None or _loop_fixed_count(n_steps)):
        # A compiled graph cannot read the estimate on the host: the same stopping rule as a torch.while_loop,
        # decided on the device. With a fixed n_steps a compiled CPU training forward took three iterations where
        # the eager one took up to 20, and compiled training drifted off eager training (codes 1e-3 apart after
        # a few Adam steps in float64). A cold estimate's fixed 50 iterations loop there too: unrolled, they made
        # compiling a layer's eval forward (its changed-weight re-estimate) take a minute.
        max_steps = n_steps if until is None else max_steps or n_steps
        peak, spectrum = _iterate_until(weight, stride, spectrum, peak, n_steps, until or 0.0, max_steps)
        return peak * scale * scale, _dft(*spectrum, inverse=True)[0]
    for steps in itertools.count(1):
        previous = peak
        peak, spectrum = _power_step(weight, stride, spectrum)
        if steps < n_steps:
            continue
        # each frequency's estimate only rises, so a small rise means its vector has (nearly) stopped turning
        if until is None or steps >= (max_steps or n_steps) or not bool(peak > previous * (1 + until)):
            break
    return peak * scale * scale, _dft(*spectrum, inverse=True)[0]


# Compiled fixed-count estimates up to this many iterations are unrolled (a training forward's warm three): a loop's
# condition is read on the host once per iteration, a sync on a GPU.
UNROLLED_STEPS_MAX = 3


def _loop_fixed_count(n_steps: int) -> bool:
    """Whether a compiled graph runs ``n_steps`` fixed iterations as a loop. torch.export unrolls them: its pass that
    rewrites grad-mode regions (torch 2.13) failed on a while_loop inside the eval forward's torch.cond ("no
    attribute 'while_loop_cond_graph_0'")."""
    return n_steps > UNROLLED_STEPS_MAX and not torch.compiler.is_exporting()


def _power_step(weight: Tensor, stride: Sequence[int], spectrum: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple]:
    """One power iteration per frequency: the estimate of ||D||^2 (of the scaled weight) and the new unit spectrum."""
    u = _dft(*spectrum, inverse=True)[0]  # real: |DFT| is symmetric, so the rescaling keeps u real
    # DFT(D^T D u)(nu) = A_nu^H A_nu U_nu / s^d =: G U: for PSD G and unit U, <U, G U> <= |G U|^2 / <U, G U> <=
    # lambda_max; the middle one is the Rayleigh quotient half a step on
    image = _dft(periodic_analysis(periodic_synthesis(u, weight, stride), weight, stride), None)
    rayleigh = (spectrum[0] * image[0] + spectrum[1] * image[1]).sum(dim=1)
    energy = (image[0].pow(2) + image[1].pow(2)).sum(dim=1)
    peak = torch.where(rayleigh == 0, 0, energy / torch.where(rayleigh == 0, 1, rayleigh)).amax()  # NaN stays
    return peak, _unit_per_frequency(image, spectrum)


def _iterate_until(
    weight: Tensor,
    stride: Sequence[int],
    spectrum: tuple[Tensor, Tensor],
    peak: Tensor,
    n_steps: int,
    until: float,
    max_steps: int,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """``dictionary_norm_sq``'s loop under torch.compile: the iterations the eager loop takes (n_steps, then on while
    the last one raised the estimate by more than ``until``, up to max_steps; exactly n_steps where max_steps is
    n_steps), counted on the device."""

    # a tensor, carried along: under torch.compile(dynamic=True) dynamo makes the float a symbol, which while_loop
    # refuses as a free variable of its functions
    rise = peak.new_full((), 1 + until)

    def go_on(steps, previous, peak, rise, real, imag):
        return (steps < n_steps) | ((steps < max_steps) & (peak > previous * rise))

    def body(steps, previous, peak, rise, real, imag):
        new_peak, (real, imag) = _power_step(weight, stride, (real, imag))
        return steps + 1, peak.clone(), new_peak, rise.clone(), real, imag

    steps = torch.zeros((), dtype=torch.int64, device=peak.device)
    _, _, peak, _, real, imag = torch.while_loop(go_on, body, (steps, peak.clone(), peak, rise, *spectrum))
    return peak, (real, imag)
