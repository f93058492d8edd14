"""Convolutional dictionary learning (CDL): ``min_{D, z} sum_i 0.5 ||x_i - D z_i||^2 + lam ||z_i||_1`` with every
atom in the unit ball, the problem SPORCO's ``ConvBPDNDictLearn`` solves.

Algorithm: alternating proximal gradient (PALM, Bolte–Sabach–Teboulle 2014), full batch. Each outer iteration takes
``n_code_iter`` ISTA steps on the codes (``functional.conv_ista`` warm-started from the previous codes, step 1/L_D)
and ``n_dict_iter`` sweeps of block coordinate descent over the atoms (atom j: a gradient step of size 1/L_j, its own
block's Lipschitz constant, then the projection back into the unit ball).
With steps no larger than 1/L both half-steps can only lower the objective, so it decreases monotonically; the two
Lipschitz constants L_D = ||D||^2 and L_j = ||z_j (*) .||^2 are tracked by power iterations warm-started from the
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
from .reference.conv import as_tuple, code_size, synthesis_output_padding

# Steps are 1/L scaled by this: power iteration approaches L from below, and a step just above 1/L could let the
# objective rise by a hair.
STEP_SAFETY = 0.98
_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight}
_CONV_T = {1: torch.nn.functional.conv_transpose1d, 2: torch.nn.functional.conv_transpose2d}


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


class _AtomSteps:
    """Block coordinate descent on the atoms (Gauss-Seidel): atom j takes a projected gradient step of size 1/L_j,
    L_j = ||Z_j||^2 the norm of w -> z_j (*) w, then the residual is updated before atom j+1 moves. Rarely used
    atoms get long steps, which one global 1/L (set by the busiest atom) would deny them. Every L_j comes from one
    grouped power iteration (all atoms at once), warm-started across calls."""

    def __init__(self, start: Tensor, signal: tuple[int, ...], padding: tuple[int, ...]):
        self.vectors, self.signal, self.padding = start, signal, padding
        self.rank = len(signal)
        self.output_padding = synthesis_output_padding(signal, start.shape[2:], (1,) * self.rank, padding)

    def _apply(self, codes: Tensor, w: Tensor, groups: int) -> Tensor:
        return _CONV_T[self.rank](codes, w, padding=self.padding, output_padding=self.output_padding, groups=groups)

    def _adjoint(self, image: Tensor, codes: Tensor, shape, groups: int) -> Tensor:
        return _CONV_WEIGHT[self.rank](image, shape, codes, padding=self.padding, groups=groups)

    def lipschitz(self, codes: Tensor, n_steps: int) -> Tensor:
        """(C_code,) estimates of L_j (power iteration on each atom's map, all atoms as groups of one conv)."""
        groups, v = codes.shape[1], self.vectors
        value = v.new_zeros(groups)
        for _ in range(n_steps):
            v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).reshape(-1, *([1] * (v.dim() - 1)))
            image = self._apply(codes, v, groups)  # (B, C_code * C_sig, *S): each atom's own synthesis
            value = image.transpose(0, 1).reshape(groups, -1).pow(2).sum(1)
            v = self._adjoint(image, codes, v.shape, groups)
        self.vectors = v
        return value

    def sweep(self, codes: Tensor, weight: Tensor, residual: Tensor, lipschitz: Tensor) -> Tensor:
        """One pass over the atoms; ``residual`` (D z - x) is updated in place. Returns the new dictionary."""
        weight = weight.clone()
        for j in range(weight.shape[0]):
            if lipschitz[j] <= 0:  # an unused atom has no gradient
                continue
            code = codes[:, j:j + 1]
            gradient = self._adjoint(residual, code, weight[j:j + 1].shape, 1)
            new = _project_atoms(weight[j:j + 1] - (STEP_SAFETY / lipschitz[j]) * gradient)
            residual += self._apply(code, new - weight[j:j + 1], 1)
            weight[j:j + 1] = new
        return weight


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
                          n_outer: int = 100, n_code_iter: int = 5, n_dict_iter: int = 5, padding: int | Sequence[int] | None = None,
                          init: Tensor | None = None, seed: int = 0, backend: str = "auto",
                          callback: Callable[[int, float], None] | None = None) -> CDLResult:
    """Learn ``n_atoms`` convolutional atoms from signals ``x`` by alternating proximal gradient (module doc).

    x: (B, C_sig, *S), ideally high-passed (CDL models the detail of an image, not its smooth part);
    n_code_iter / n_dict_iter: ISTA steps on the codes / sweeps over the atoms per outer iteration; kernel_size: k (int or one per spatial dim); lam > 0: the l1 weight; padding: the codes' padding, default
    k - 1 ("full"); init: a starting dictionary (C_code, C_sig, *k), default Gaussian atoms of unit norm (seeded);
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

    dictionary_norm = _PowerIteration(lambda z: synthesize(z, weight),
                                      lambda image: DF.conv_analysis(image, weight, padding=padding),
                                      torch.randn(codes[:1].shape, generator=generator, dtype=x.dtype).to(x.device))
    atoms = _AtomSteps(torch.randn(weight.shape, generator=generator, dtype=x.dtype).to(x.device), signal, padding)
    result = CDLResult(weight, codes, padding)
    for iteration in range(n_outer):
        lipschitz_d = dictionary_norm.estimate(30 if iteration == 0 else 2)
        codes = DF.conv_ista(x, weight, lam, n_iter=n_code_iter, step=STEP_SAFETY / lipschitz_d, padding=padding,
                             z0=codes, backend=backend)
        lipschitz = atoms.lipschitz(codes, 30 if iteration == 0 else 2)
        residual = synthesize(codes, weight) - x
        for _ in range(n_dict_iter):
            weight = atoms.sweep(codes, weight, residual, lipschitz)
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

    atoms = weight.detach().cpu().float()[:, 0]
    n = atoms.shape[0]
    cols = int(n ** 0.5 + 0.999)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.8, rows * 0.8 + (0.4 if title else 0)))
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            limit = float(atoms[i].abs().max()) or 1.0
            ax.imshow(atoms[i], cmap="gray", vmin=-limit, vmax=limit)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
