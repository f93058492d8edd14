"""Convolutional dictionary learning (CDL): ``min_{D, z} sum_i 0.5 ||x_i - D z_i||^2 + lam ||z_i||_1`` with every
atom in the unit ball, the problem SPORCO's ``ConvBPDNDictLearn`` solves.

Algorithm: alternating proximal gradient (PALM, Bolte–Sabach–Teboulle 2014), full batch. Each outer iteration takes
``n_code_iter`` ISTA steps on the codes (``functional.conv_ista`` warm-started from the previous codes, step 1/L_D
with L_D an FFT bound of ||D||^2) and ``n_dict_iter`` sweeps of
block-coordinate projected gradient over the atoms (atom j: step 1/L_j with L_j an FFT bound of ||z_j (*) .||^2,
then back into the unit ball). Both steps come from upper bounds of their Lipschitz constants (FFT bounds: a
linear convolution is a crop of a circular one), so every half-step uses a step no larger than 1/L and the objective
never rises. SPORCO's ADMM solver converges in fewer iterations; this one reuses the fused conv-ISTA kernels.

Codes use "full" padding (``k - 1``) by default, so atoms can sit across the border and edge pixels are represented
as well as interior ones.

Clean (edge- and line-like) atoms need data and lam on the right scale, as in SPORCO's examples: the images are
high-passed (atoms should not model the smooth part), each patch is scaled to unit pixel variance, and lam is large
enough that a few percent of the pixels carry a nonzero code (lam = 2 here; lam = 0.2 on unit-variance patches
codes about one coefficient per pixel, and the atoms then fit texture and noise). ``photo_dictionary`` runs that
setting on scikit-learn's photographs; ``python -m dsc_kernels.dictionary_learning --out docs/cdl_atoms.png`` draws it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import _validate as check
from . import functional as DF
from .data import _seed
from .reference.conv import code_size, row_scales
from .theory import _real

_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight}


@dataclass
class CDLResult:
    """weight: (C_code, C_sig, *k) atoms of norm <= 1; codes: (B, C_code, *Sz); objective: per outer iteration,
    ``sum_i 0.5 ||x_i - D z_i||^2 + lam ||z_i||_1`` divided by B; padding: the codes' padding."""

    weight: Tensor
    codes: Tensor
    padding: tuple[int, ...]
    objective: list[float] = field(default_factory=list)


def _random_crops(x: Tensor, n: int, kernel: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """n random k-sized crops of the signals, each scaled to unit norm (Gaussian where a crop is flat): the usual
    start of dictionary learning (K-SVD, Mairal et al. 2009), so atoms begin with image structure."""
    # Drawn on the CPU (the generator's device) whatever torch.set_default_device says: on a meta default the draws
    # could not be read ("Tensor.item() cannot be called on meta tensors"), a CUDA default refused the CPU generator.
    crops = []
    for _ in range(n):
        b = int(torch.randint(0, x.shape[0], (1,), generator=generator, device="cpu"))
        starts = [
            int(torch.randint(0, s - k + 1, (1,), generator=generator, device="cpu"))
            for s, k in zip(x.shape[2:], kernel)
        ]
        crop = x[b][(slice(None), *(slice(a, a + k) for a, k in zip(starts, kernel)))].detach().cpu()
        # scale by the largest magnitude first: the norm of a tiny crop underflows to 0 (and it would be replaced by
        # noise), a huge one's overflows to inf (and the atom would be 0)
        top = crop.abs().max()
        if top == 0:
            crop = torch.randn(crop.shape, generator=generator, dtype=crop.dtype, device="cpu")
            top = torch.ones((), dtype=crop.dtype, device="cpu")
        crop = crop / top
        crops.append(crop / crop.norm())
    return torch.stack(crops)


def _project_atoms(weight: Tensor) -> Tensor:
    """Scale every atom with norm > 1 back onto the unit sphere (the projection onto the unit ball)."""
    # the norm of each atom scaled to its largest |tap| (in [1, sqrt(n)]), then scaled back: on the atom itself the
    # squares overflowed (float32 taps from ~1e19, float64 from ~1e154), the norm was inf and the atom became 0
    shape = (-1, *([1] * (weight.dim() - 1)))
    flat = weight.flatten(1)
    top = row_scales(flat)
    norms = (flat / top[:, None]).norm(dim=1) * top
    # an atom beyond the unit ball whose norm overflows (max|tap| near the dtype's max): divide by top first
    scaled = (weight / top.reshape(shape)) / ((norms / top).reshape(shape))
    return torch.where((norms > 1).reshape(shape), scaled, weight)


def _atom_lipschitz(codes: Tensor, kernel: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Per atom j, an upper bound of ||Z_j||^2 for the map w_j -> D_j z_j (all signals): the linear convolution is
    a crop of a circular one of size S_z + k - 1, whose squared norm is max over frequencies of sum_b |FFT(z_bj)|^2.
    codes: (B, C_code, *S_z) -> (scale, power), each (C_code,) float64: the bound is power * scale^2, scale the
    largest |code| of the atom (1 for an unused one, whose power is 0).

    |FFT|^2 is of degree 2 in the codes: in their own dtype it underflowed to 0 (float32 codes below ~1e-23: the
    atom counted as unused and never moved) or overflowed (codes from ~1e18: a step of 0). It is computed on each
    atom's codes scaled to their largest magnitude, in float64, and the scale kept apart."""
    dims = tuple(range(2, codes.dim()))
    sizes = [codes.shape[d] + k - 1 for d, k in zip(dims, kernel)]
    wide = codes.double()
    top = row_scales(wide.transpose(0, 1).flatten(1))
    power = torch.fft.rfftn(wide / top.reshape(1, -1, *([1] * len(dims))), s=sizes, dim=dims).abs().pow(2).sum(0)
    return top, power.flatten(1).amax(dim=1)


def _dictionary_lipschitz(weight: Tensor, code_spatial: Sequence[int]) -> float:
    """An upper bound of ||D||^2 for the synthesis z -> D z of codes of spatial size ``code_spatial`` (any padding:
    D crops the full convolution, a circular one of size S_z + k - 1): the max over frequencies of the largest
    squared singular value of the (C_sig, C_code) matrix of the atoms' DFTs. weight: (C_code, C_sig, *k)."""
    dims = tuple(range(2, weight.dim()))
    sizes = [n + k - 1 for n, k in zip(code_spatial, weight.shape[2:])]
    spectrum = torch.fft.rfftn(weight.double(), s=sizes, dim=dims)  # (C_code, C_sig, *frequencies)
    if weight.shape[1] == 1:  # one signal channel: the singular value of a row is its norm
        return float(spectrum.abs().pow(2).sum(dim=(0, 1)).amax())
    per_frequency = spectrum.flatten(2).permute(2, 1, 0)  # (frequencies, C_sig, C_code)
    return float(torch.linalg.matrix_norm(per_frequency, ord=2).amax()) ** 2


@torch.no_grad()
def _dictionary_sweeps(x: Tensor, codes: Tensor, weight: Tensor, n_sweeps: int, padding: tuple[int, ...]) -> Tensor:
    """Block-coordinate projected gradient on the atoms, codes fixed (Gauss-Seidel over atoms, as in Mairal et al.
    2010's dictionary update): atom j takes a step 1/L_j with its own Lipschitz bound, then the residual is updated.
    One global step 1/||Z||^2 would be set by the most used atom and leave rarely used atoms (and their initial
    noise) frozen; per-atom steps move every atom at its own rate. Each block step lowers the objective."""
    rank = x.dim() - 2
    kernel, signal = tuple(weight.shape[2:]), tuple(x.shape[2:])
    scales, powers = _atom_lipschitz(codes, kernel)
    scales = scales.to(codes.dtype)  # each the magnitude of one code entry, so exact in the codes' dtype
    weight = weight.clone()
    residual = DF.conv_synthesis(codes, weight, padding=padding, signal_size=signal) - x
    for _ in range(n_sweeps):
        for j, power in enumerate(powers.tolist()):
            if power == 0:  # an unused atom has no gradient
                continue
            code = codes[:, j : j + 1]
            # the step gradient / (power * scale^2), with the gradient (of degree 2: residual times code) taken
            # against the scaled code: on the code itself it underflowed (or overflowed) where the step does not
            gradient = _CONV_WEIGHT[rank](residual, (1, *weight.shape[1:]), code / scales[j], padding=padding)
            atom = _project_atoms(weight[j : j + 1] - gradient / scales[j] / power)
            residual += DF.conv_synthesis(code, atom - weight[j : j + 1], padding=padding, signal_size=signal)
            weight[j : j + 1] = atom
    return weight


def _zero_atoms(weight: Tensor) -> list[int]:
    """Indices of the atoms (rows of weight) that are all zero."""
    return (~(weight.flatten(1) != 0).any(dim=1)).nonzero().flatten().tolist()


def lasso_value(x: Tensor, z: Tensor, weight: Tensor, lam: float, padding: Sequence[int]) -> float:
    """``sum_i 0.5 ||x_i - D z_i||^2 + lam ||z_i||_1`` / B."""
    # in float64, the Python float's own range: lasso_objective returns x's dtype, and float32 signals of 1e-25
    # (1e25) reported an objective of 0.0 (inf) where it is 1.2e-49 (1.2e51), though the learning itself was right
    x, z, weight = x.double(), z.double(), weight.double()
    return float(DF.lasso_objective(x, z, weight, lam, padding=padding).mean())


@torch.no_grad()
def learn_conv_dictionary(
    x: Tensor,
    n_atoms: int,
    kernel_size: int | Sequence[int],
    lam: float,
    *,
    n_outer: int = 100,
    n_code_iter: int = 5,
    n_dict_iter: int = 5,
    padding: int | Sequence[int] | None = None,
    init: Tensor | None = None,
    seed: int = 0,
    backend: str = "auto",
    callback: Callable[[int, float], None] | None = None,
) -> CDLResult:
    """Learn ``n_atoms`` convolutional atoms from signals ``x`` by alternating proximal gradient (module doc).

    x: (B, C_sig, *S), ideally high-passed (CDL models the detail of an image, not its smooth part);
    kernel_size: k (int or one per spatial dim); lam > 0: the l1 weight; n_code_iter / n_dict_iter: ISTA steps on
    the codes / gradient steps on the dictionary per outer iteration; padding: the codes' padding, default k - 1
    ("full"); init: a starting dictionary (C_code, C_sig, *k) with no atom all zero in x's dtype (a zero atom is
    never used by a code, so it gets no gradient and would stay zero), default random crops of x scaled to unit norm;
    callback(iteration, objective) is called after every outer iteration (e.g. a progress bar). Needs B >= 1 and
    k <= S in every spatial dim; x float32 or float64 (half precision has neither the FFT nor the range the steps
    need); seed an int in [-2**63, 2**64).
    """
    if not isinstance(x, Tensor) or x.dim() not in (3, 4) or not x.is_floating_point():
        raise ValueError("x must be a floating-point (B, C, L) or (B, C, H, W) tensor")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x must be float32 or float64, got {x.dtype}: cast it (e.g. x.float())")
    check.require_values("x", x, "dictionary learning")
    if 0 in x.shape:
        raise ValueError(
            f"x must hold at least one signal with non-empty channels and sides, got shape {tuple(x.shape)}"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x must be finite (it holds NaN or inf)")
    lam = _real("lam", lam, finite=True, positive=True)
    n_atoms = check.count("n_atoms", n_atoms, 1)
    for name, value in (("n_outer", n_outer), ("n_code_iter", n_code_iter), ("n_dict_iter", n_dict_iter)):
        check.count(name, value, 1)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (iteration, objective) or None, got {callback!r}")
    rank = x.dim() - 2
    kernel = check.ints("kernel_size", kernel_size, rank, minimum=1)
    signal = tuple(x.shape[2:])
    if any(k > s for k, s in zip(kernel, signal)):
        # atoms larger than the signals: no crop to start from, and most of every atom would be unidentifiable
        raise ValueError(f"kernel_size {kernel} must not exceed the signal size {signal} of x")
    padding = tuple(k - 1 for k in kernel) if padding is None else check.ints("padding", padding, rank, minimum=0)
    generator = torch.Generator().manual_seed(_seed(seed))
    if init is None:
        init = _random_crops(x, n_atoms, kernel, generator)
    else:
        if not isinstance(init, Tensor) or not init.is_floating_point():
            raise ValueError("init must be a floating-point tensor")
        check.require_values("init", init, "dictionary learning")
        if tuple(init.shape) != (n_atoms, x.shape[1], *kernel):
            raise ValueError(f"init must have shape {(n_atoms, x.shape[1], *kernel)}, got {tuple(init.shape)}")
        if not bool(torch.isfinite(init).all()):
            raise ValueError("init must be finite (it holds NaN or inf)")
        # entries, not norms: a tiny atom's squared norm underflows to 0 without the atom being zero
        zero = _zero_atoms(init)
        if zero:
            raise ValueError(f"init atoms {zero} are zero: a zero atom gets no code and no gradient and never moves")
    # projected before the cast to x's dtype: a float64 init atom of 1e40 became inf in float32 x, its projection
    # NaN, and learning raised that ||D||^2 = nan, though its unit-norm direction is an ordinary atom
    wide = torch.promote_types(init.dtype, x.dtype)
    weight = _project_atoms(init.to(device=x.device, dtype=wide)).to(x.dtype)
    # a float64 init atom of 1e-50 passed the check above and became zero in float32 x: a dead atom, silently
    zero = _zero_atoms(weight)
    if zero:
        raise ValueError(f"init atoms {zero} underflow to zero in x's dtype {x.dtype}: rescale init (or cast x)")
    codes = x.new_zeros(x.shape[0], n_atoms, *code_size(signal, kernel, (1,) * rank, padding))

    result = CDLResult(weight, codes, padding)
    for iteration in range(n_outer):
        lipschitz_d = _dictionary_lipschitz(weight, codes.shape[2:])
        # e.g. init atoms so small (or large) that ||D||^2, or the step 1/||D||^2 in x's dtype, under/overflows
        if not 0 < lipschitz_d < math.inf or 1.0 / lipschitz_d > torch.finfo(x.dtype).max:
            raise ValueError(f"the dictionary's norm ||D||^2 = {lipschitz_d} gives no ISTA step; rescale init or x")
        codes = DF.conv_ista(
            x,
            weight,
            lam,
            n_iter=n_code_iter,
            step=1.0 / lipschitz_d,
            padding=padding,
            z0=codes,
            backend=backend,
        )
        weight = _dictionary_sweeps(x, codes, weight, n_dict_iter, padding)
        value = lasso_value(x, codes, weight, lam, padding)
        result.objective.append(value)
        if callback is not None:
            callback(iteration, value)
    result.weight, result.codes = weight, codes
    return result


def _box_width(size: object, name: str) -> int:
    """A box-blur width: an odd int >= 1. An even box has no centre pixel, so its blur would sit half a pixel off
    and the detail would carry a spurious gradient."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"{name} must be an odd int >= 1 (the width of a centred box blur), got {size!r}")
    return size


def highpass(images: Tensor, size: int = 7) -> tuple[Tensor, Tensor]:
    """Split (B, C, H, W) images into (detail, smooth): smooth is a box blur of odd width ``size`` (reflect-padded,
    so size // 2 < H, W), detail = images - smooth. CDL is run on the detail, as SPORCO's examples do with a
    Tikhonov high-pass."""
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError("images must be a floating-point (B, C, H, W) tensor")
    pad = _box_width(size, "size") // 2
    if pad >= min(images.shape[2:]):
        raise ValueError(f"size {size} needs images larger than {pad} pixels a side, got {tuple(images.shape[2:])}")
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), mode="reflect")
    smooth = torch.nn.functional.avg_pool2d(padded, size, stride=1)
    return images - smooth, smooth


def plot_atoms(weight: Tensor, path, *, title: str | None = None) -> None:
    """Save the atoms of a (C_code, 1, kh, kw) dictionary as a grid of images (each scaled to its own range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = atom_grid(weight)
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 10, grid.shape[0] / 10 + (0.4 if title else 0)))
    ax.imshow(grid.numpy(), cmap="gray", vmin=-1, vmax=1)
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def low_frequency_fraction(weight: Tensor, cutoff: float = 0.25) -> Tensor:
    """Per atom of a (C_code, C_sig, kh, kw) dictionary, the fraction of its non-DC spectral energy at spatial
    frequencies of radius <= cutoff (cycles per pixel): about 0.19 for white-noise 8x8 atoms, near 1 for smooth
    edges and lines (0 for an atom without non-DC energy). cutoff >= 0. Returns (C_code,)."""
    if not isinstance(weight, Tensor) or weight.dim() != 4 or 0 in weight.shape[2:]:
        raise ValueError(
            "weight must be a (C_code, C_sig, kh, kw) tensor with kh, kw >= 1, got "
            f"{getattr(weight, 'shape', weight)!r}"
        )
    check.require_values("weight", weight, "low_frequency_fraction")
    cutoff = _real("cutoff", cutoff)
    if 0 in weight.shape[:2]:
        # no atoms, or atoms without channels (no non-DC energy: 0); the FFT of an empty batch raised an MKL
        # "Inconsistent configuration parameters" error, the amax over no channels an IndexError
        return torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)  # as below
    w = weight.detach().double()
    w = w - w.mean(dim=(2, 3), keepdim=True)  # the non-DC part: exactly 0 for a constant atom
    top = w.abs().amax(dim=(1, 2, 3), keepdim=True)
    w = w / torch.where(top > 0, top, torch.ones_like(top))  # scale-free: no underflow or overflow
    power = torch.fft.fft2(w).abs().pow(2).sum(dim=1)
    power[:, 0, 0] = 0
    fy, fx = (torch.fft.fftfreq(n, dtype=torch.float64, device=w.device) for n in weight.shape[2:])
    low = (fy[:, None] ** 2 + fx[None] ** 2).sqrt() <= cutoff
    total = power.sum(dim=(1, 2))
    ratio = (power * low).sum(dim=(1, 2)) / torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(top.flatten() == 0, torch.zeros_like(ratio), ratio).float()  # NaN atoms stay NaN


def photo_patches(
    n_per_photo: int = 8, size: int = 64, *, downsample: int = 2, highpass_size: int = 9, seed: int = 0
) -> Tensor:
    """CDL training data from scikit-learn's two photographs (gray): each photograph is averaged down by
    ``downsample`` (less JPEG noise, larger structures), ``n_per_photo`` random size x size crops are high-passed
    (``highpass``) and each crop is scaled to unit pixel variance (contrast normalisation).
    Returns (2 * n_per_photo, 1, size, size). n_per_photo, size, downsample ints >= 1; size must fit the
    downsampled photographs."""
    from .recipes import data

    n_per_photo, size = check.count("n_per_photo", n_per_photo, 1), check.count("size", size, 1)
    downsample = check.count("downsample", downsample, 1)
    _box_width(highpass_size, "highpass_size")
    if size < 2:
        raise ValueError(f"size must be >= 2 (a 1x1 crop has no pixel variance to scale to 1), got {size}")
    if highpass_size // 2 >= size:
        raise ValueError(
            f"highpass_size {highpass_size} needs crops larger than {highpass_size // 2} pixels, got size {size}"
        )
    generator = torch.Generator().manual_seed(_seed(seed))
    crops = []
    for name in data.PHOTOS:
        photo = data.photo(name)
        if size * downsample > min(photo.shape):
            raise ValueError(f"size {size} x downsample {downsample} exceeds the {tuple(photo.shape)} photographs")
        image = torch.nn.functional.avg_pool2d(photo[None, None], downsample)[0, 0]
        crops.append(data.random_patches(image, n_per_photo, size, generator))
    detail, _ = highpass(torch.cat(crops), highpass_size)
    scale = detail.flatten(1).std(dim=1).clamp_min(1e-3)
    return detail / scale.reshape(-1, 1, 1, 1)


def photo_dictionary(
    n_atoms: int = 32,
    kernel_size: int = 8,
    lam: float = 2.0,
    *,
    n_per_photo: int = 8,
    size: int = 64,
    n_outer: int = 60,
    n_code_iter: int = 10,
    n_dict_iter: int = 2,
    seed: int = 0,
    backend: str = "auto",
    callback: Callable[[int, float], None] | None = None,
) -> CDLResult:
    """Learn ``n_atoms`` k x k atoms from ``photo_patches`` (defaults: about two minutes on one core)."""
    x = photo_patches(n_per_photo, size, seed=seed)
    return learn_conv_dictionary(
        x,
        n_atoms,
        kernel_size,
        lam,
        n_outer=n_outer,
        n_code_iter=n_code_iter,
        n_dict_iter=n_dict_iter,
        seed=seed,
        backend=backend,
        callback=callback,
    )


def atom_grid(weight: Tensor) -> Tensor:
    """The first input channel of (C_code, C_sig, kh, kw) atoms tiled in a square grid, one NaN pixel between atoms,
    each atom scaled to a peak of 1 (for ``imshow`` with vmin=-1, vmax=1).
    Returns (rows * (kh + 1), cols * (kw + 1))."""
    if not isinstance(weight, Tensor) or weight.dim() != 4 or 0 in weight.shape:
        raise ValueError(
            f"weight must be a (C_code, C_sig, kh, kw) tensor with C_code, C_sig, kh, kw >= 1, got "
            f"{getattr(weight, 'shape', weight)!r}"
        )
    atoms = weight.detach().cpu().float()[:, 0]
    n, (kh, kw) = atoms.shape[0], atoms.shape[1:]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    # the atoms' CPU float32, not the default device and dtype (for imshow: a meta or CUDA grid has no numpy())
    grid = torch.full((rows * (kh + 1), cols * (kw + 1)), float("nan"), dtype=atoms.dtype, device=atoms.device)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * (kh + 1) : r * (kh + 1) + kh, c * (kw + 1) : c * (kw + 1) + kw] = atoms[i] / atoms[
            i
        ].abs().max().clamp_min(1e-12)
    return grid


def plot_result(result: CDLResult, path, *, title: str) -> None:
    """Save the atoms of a 2-d CDL result as a grid, with the objective per outer iteration beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, k = result.weight.shape[0], result.weight.shape[-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4.2), gridspec_kw={"width_ratios": [1, 1.2]})
    left.imshow(atom_grid(result.weight).numpy(), cmap="gray", vmin=-1, vmax=1)
    left.set_title(f"{n} atoms {k}x{k}", fontsize=9)
    left.axis("off")
    right.plot(range(1, len(result.objective) + 1), result.objective)
    right.set_xlabel("outer iteration")
    right.set_ylabel("0.5 ||x - Dz||^2 + lam ||z||_1 per patch")
    right.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parser():
    import argparse

    from . import _cli_args as cli_args
    from .recipes._args import SEED_RANGE

    parser = argparse.ArgumentParser(
        prog="python -m dsc_kernels.dictionary_learning",
        description="learn a convolutional dictionary from scikit-learn's photographs",
    )
    parser.add_argument(
        "--out",
        default="cdl_atoms.png",
        help="the figure's file path; its suffix picks the format, .png when it has none (default: ./cdl_atoms.png)",
    )
    parser.add_argument(
        "--outer", type=cli_args.int_type("--outer", 1), default=60, help="outer iterations, >= 1 (default 60)"
    )
    parser.add_argument(
        "--seed",
        type=cli_args.int_type("--seed", *SEED_RANGE),  # the range `python -m dsc_kernels train` takes
        default=0,
        help=f"seed of the patches and the initial atoms, {SEED_RANGE[0]}..{SEED_RANGE[1]} (default 0)",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        help="conv-ISTA backend: auto (default), reference, cpp or triton; checked against the CPU before training",
    )
    cli_args.add_threads_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> CDLResult:
    """``python -m dsc_kernels.dictionary_learning [--out PNG] [--outer N] [--seed K] [--backend B] [--threads N]``: run
    ``photo_dictionary`` with a progress bar and save ``plot_result``'s figure. Bad arguments are usage errors
    (exit status 2) before the training, never a traceback after it."""
    from tqdm import tqdm

    from . import _cli_args as cli_args

    parser = _parser()
    args = parser.parse_args(argv)
    args.backend, problem = cli_args.backend_problem(args.backend, "cpu")  # photo_patches are CPU tensors
    path, out_problem = cli_args.figure_path(args.out)
    for found in (problem, out_problem):
        if found is not None:
            parser.error(found)
    cli_args.set_threads(args.threads)
    with tqdm(total=args.outer, desc="CDL", disable=None) as bar:  # None: no bar spam in a redirected log
        result = photo_dictionary(
            n_outer=args.outer,
            seed=args.seed,
            backend=args.backend,
            callback=lambda i, value: (bar.update(1), bar.set_postfix(objective=f"{value:.2f}")),
        )
    smooth = float(low_frequency_fraction(result.weight).mean())
    zeros = float((result.codes == 0).float().mean())
    summary = (
        f"objective {result.objective[0]:.2f} -> {result.objective[-1]:.2f}; {zeros:.2%} of the codes are zero; "
        f"low-frequency energy of the atoms {smooth:.2f} (white noise: 0.19)"
    )
    print(summary)
    plot_result(
        result,
        path,
        title=f"CDL on china.jpg + flower.jpg (gray, /2, high-passed, unit-variance patches), lam 2\n{summary}",
    )
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
