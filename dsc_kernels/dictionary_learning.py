"""Convolutional dictionary learning (CDL): ``min_{D, z} sum_i 0.5 ||x_i - D z_i||^2 + lam ||z_i||_1`` with every
atom in the unit ball, the problem SPORCO's ``ConvBPDNDictLearn`` solves.

Algorithm: alternating proximal gradient (PALM, Bolte–Sabach–Teboulle 2014), full batch. Each outer iteration takes
``n_code_iter`` ISTA steps on the codes (``functional.conv_ista`` warm-started from the previous codes, step 1/L_D)
and ``n_dict_iter`` projected gradient steps on the dictionary (step 1/L_z, then every atom is scaled back into the
unit ball).
With steps no larger than 1/L both half-steps can only lower the objective, so it decreases monotonically; the two
Lipschitz constants L_D = ||D||^2 and L_z = ||z (*) .||^2 are tracked by power iterations warm-started from the
previous outer iteration (a few convolutions each). SPORCO's ADMM solver converges in fewer iterations; this one
reuses the fused conv-ISTA kernels and needs no FFTs.

Codes use "full" padding (``k - 1``) by default, so atoms can sit across the border and edge pixels are represented
as well as interior ones.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import functional as DF
from .reference.conv import as_tuple, code_size

# Steps are 1/L scaled by this: power iteration approaches L from below, and a step just above 1/L could let the
# objective rise by a hair.
STEP_SAFETY = 0.98
_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight}


@dataclass
class CDLResult:
    """weight: (C_code, C_sig, *k) atoms of norm <= 1; codes: (B, C_code, *Sz); objective: per outer iteration,
    ``sum_i 0.5 ||x_i - D z_i||^2 + lam ||z_i||_1`` divided by B; padding: the codes' padding."""

    weight: Tensor
    codes: Tensor
    padding: tuple[int, ...]
    objective: list[float] = field(default_factory=list)


class _PowerIteration:
    """Largest eigenvalue of A^T A for a linear map A, warm-started across calls (the map changes slowly)."""

    def __init__(self, apply: Callable[[Tensor], Tensor], adjoint: Callable[[Tensor], Tensor], start: Tensor):
        self.apply, self.adjoint, self.vector = apply, adjoint, start / start.norm()

    def estimate(self, n_steps: int) -> float:
        value = 0.0
        for _ in range(n_steps):
            image = self.apply(self.vector)
            value = float(image.pow(2).sum())
            back = self.adjoint(image)
            norm = back.norm()
            if norm == 0:
                return 0.0
            self.vector = back / norm
        return value


def _random_crops(x: Tensor, n: int, kernel: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """n random k-sized crops of the signals, each scaled to unit norm (Gaussian where a crop is flat): the usual
    start of dictionary learning (K-SVD, Mairal et al. 2009), so atoms begin with image structure."""
    crops = []
    for _ in range(n):
        b = int(torch.randint(0, x.shape[0], (1,), generator=generator))
        starts = [int(torch.randint(0, s - k + 1, (1,), generator=generator)) for s, k in zip(x.shape[2:], kernel)]
        crop = x[b][(slice(None), *(slice(a, a + k) for a, k in zip(starts, kernel)))].detach().cpu()
        if crop.norm() == 0:
            crop = torch.randn(crop.shape, generator=generator, dtype=crop.dtype)
        crops.append(crop / crop.norm())
    return torch.stack(crops)


def _project_atoms(weight: Tensor) -> Tensor:
    """Scale every atom with norm > 1 back onto the unit sphere (the projection onto the unit ball)."""
    norms = weight.flatten(1).norm(dim=1).clamp_min(1.0)
    return weight / norms.reshape(-1, *([1] * (weight.dim() - 1)))


def lasso_value(x: Tensor, z: Tensor, weight: Tensor, lam: float, padding: Sequence[int]) -> float:
    """``sum_i 0.5 ||x_i - D z_i||^2 + lam ||z_i||_1`` / B."""
    return float(DF.lasso_objective(x, z, weight, lam, padding=padding).mean())


@torch.no_grad()
def learn_conv_dictionary(x: Tensor, n_atoms: int, kernel_size: int | Sequence[int], lam: float, *,
                          n_outer: int = 100, n_code_iter: int = 5, n_dict_iter: int = 5,
                          padding: int | Sequence[int] | None = None, init: Tensor | None = None, seed: int = 0, backend: str = "auto",
                          callback: Callable[[int, float], None] | None = None) -> CDLResult:
    """Learn ``n_atoms`` convolutional atoms from signals ``x`` by alternating proximal gradient (module doc).

    x: (B, C_sig, *S), ideally high-passed (CDL models the detail of an image, not its smooth part);
    kernel_size: k (int or one per spatial dim); lam > 0: the l1 weight; n_code_iter / n_dict_iter: ISTA steps on
    the codes / gradient steps on the dictionary per outer iteration; padding: the codes' padding, default k - 1
    ("full"); init: a starting dictionary (C_code, C_sig, *k), default random crops of x scaled to unit norm;
    callback(iteration, objective) is called after every outer iteration (e.g. a progress bar).
    """
    if not isinstance(x, Tensor) or x.dim() not in (3, 4) or not x.is_floating_point():
        raise ValueError("x must be a floating-point (B, C, L) or (B, C, H, W) tensor")
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam!r}")
    for name, value in (("n_atoms", n_atoms), ("n_outer", n_outer), ("n_code_iter", n_code_iter),
                        ("n_dict_iter", n_dict_iter)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    rank = x.dim() - 2
    kernel = as_tuple(kernel_size, rank, "kernel_size")
    padding = tuple(k - 1 for k in kernel) if padding is None else as_tuple(padding, rank, "padding")
    generator = torch.Generator().manual_seed(seed)
    if init is None:
        init = _random_crops(x, n_atoms, kernel, generator)
    elif tuple(init.shape) != (n_atoms, x.shape[1], *kernel):
        raise ValueError(f"init must have shape {(n_atoms, x.shape[1], *kernel)}, got {tuple(init.shape)}")
    weight = _project_atoms(init.to(device=x.device, dtype=x.dtype))
    signal = tuple(x.shape[2:])
    codes = x.new_zeros(x.shape[0], n_atoms, *code_size(signal, kernel, (1,) * rank, padding))

    def synthesize(z: Tensor, w: Tensor) -> Tensor:
        return DF.conv_synthesis(z, w, padding=padding, signal_size=signal)

    def weight_adjoint(image: Tensor) -> Tensor:
        # Z^T r for the linear map w -> synthesize(codes, w): <Z w, r> = <codes, conv(r, w)>, whose gradient in w
        # is the weight gradient of that convolution.
        return _CONV_WEIGHT[rank](image, weight.shape, codes, padding=padding)

    dictionary_norm = _PowerIteration(lambda z: synthesize(z, weight),
                                      lambda image: DF.conv_analysis(image, weight, padding=padding),
                                      torch.randn(codes[:1].shape, generator=generator, dtype=x.dtype).to(x.device))
    codes_norm = _PowerIteration(lambda w: synthesize(codes, w), weight_adjoint,
                                 torch.randn(weight.shape, generator=generator, dtype=x.dtype).to(x.device))
    result = CDLResult(weight, codes, padding)
    for iteration in range(n_outer):
        warm = 30 if iteration == 0 else 3
        lipschitz_d = dictionary_norm.estimate(warm)
        codes = DF.conv_ista(x, weight, lam, n_iter=n_code_iter, step=STEP_SAFETY / lipschitz_d, padding=padding,
                             z0=codes, backend=backend)
        lipschitz_z = codes_norm.estimate(warm)
        for _ in range(n_dict_iter if lipschitz_z > 0 else 0):  # all-zero codes: the dictionary has no gradient
            gradient = weight_adjoint(synthesize(codes, weight) - x)
            weight = _project_atoms(weight - (STEP_SAFETY / lipschitz_z) * gradient)
        value = lasso_value(x, codes, weight, lam, padding)
        result.objective.append(value)
        if callback is not None:
            callback(iteration, value)
    result.weight, result.codes = weight, codes
    return result


def highpass(images: Tensor, size: int = 7) -> tuple[Tensor, Tensor]:
    """Split (B, C, H, W) images into (detail, smooth): smooth is a box blur of width ``size`` (reflect-padded),
    detail = images - smooth. CDL is run on the detail, as SPORCO's examples do with a Tikhonov high-pass."""
    pad = size // 2
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), mode="reflect")
    smooth = torch.nn.functional.avg_pool2d(padded, size, stride=1)
    return images - smooth, smooth


def plot_atoms(weight: Tensor, path, *, title: str | None = None) -> None:
    """Save the atoms of a (C_code, 1, kh, kw) dictionary as a grid of images (each scaled to its own range)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atoms = weight.detach().cpu().float()[:, 0].numpy()
    n = atoms.shape[0]
    cols = int(n ** 0.5 + 0.999)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.8, rows * 0.8 + (0.4 if title else 0)))
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            limit = float(abs(atoms[i]).max()) or 1.0
            ax.imshow(atoms[i], cmap="gray", vmin=-limit, vmax=limit)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
