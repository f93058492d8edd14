"""`--recipe denoise`: a CSCNet-style convolutional sparse coding denoiser for gray photographs, sigma = 25/255.

Model (Simon & Elad 2019, "Rethinking the CSC model for natural images", in small): ``ConvSparseCoding2d`` with an
untied encoder, learned per-iteration and per-channel thresholds (``learn_lam``: threshold = step * lam) and
learned steps, unrolled ``N_ITER`` times; the estimate is ``D z`` plus the image mean. Stride s > 1 is allowed:
then the s^2 shifted copies are coded and averaged, as CSCNet does. Input and output (B, 1, H, W) in [0, 1],
any H, W (> s when s > 1).

Data (scikit-learn's two photographs, gray, nothing downloaded), and what is held out:
    training   random 32x32 patches of china.jpg, columns [0, 480) only
    held out   (a) flower.jpg, the whole photograph: never seen in training (the goal is measured here)
               (b) china.jpg columns [480, 640): a region of the training photograph that no patch touched
Noise: Gaussian, sigma = 25/255, a fixed seed for the test images. Baselines on the same noisy images: the noisy
input, ISTA (FISTA, 50 iterations) on a fixed 8x8 DCT dictionary (stride 4), scikit-image's ``denoise_wavelet``
(BayesShrink, told sigma) and ``denoise_tv_chambolle``; each baseline's parameter (DCT-ISTA's lam, the wavelet family,
TV's weight) is chosen on the whole training region, noisy with its own seed: the pixels the model learns from. (The
TV weight that would be best on each test image is also reported, as an oracle.)
"""

from __future__ import annotations

import math
import numbers
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .. import _validate as check
from .. import data as dsc_data
from .. import functional as DF
from ..dictionary_learning import atom_grid
from ..nn import ConvSparseCoding2d
from . import _args, data, engine

NAME = "denoise"
# packages the recipe imports when it runs ({import name: pip name}), checked before training (recipes.cli): the
# baselines need scikit-image and PyWavelets only after the training, which then ended in an ImportError
REQUIRES = {"sklearn": "scikit-learn", "skimage": "scikit-image", "pywt": "PyWavelets"}
STRATEGIES = ("cscnet",)
DEFAULT_STRATEGY = "cscnet"
DEFAULT_EPOCHS = 8
HEADLINE = ("psnr_model", "psnr_best_skimage", "psnr_noisy", "seconds")
SIGMA = 25 / 255
TRAIN_PHOTO, TRAIN_COLUMNS = "china", (0, 480)
PATCH, PATCHES_PER_EPOCH, BATCH_SIZE = 32, 512, 16
N_ATOMS, KERNEL, N_ITER, STRIDE = 32, 7, 6, 1
LEARNING_RATE = 6e-3
# The learned ISTA step (about 0.02) trains at a tenth of LEARNING_RATE. Adam moves every parameter by about lr per
# update, whatever its scale: at 6e-3 the step changed by 30% per update, and the outcome swung with it (seeds 0-3
# gave 28.2-29.4 dB, and 26.5 once; with a tenth, 29.2-29.7 dB).
STEP_LEARNING_RATE = LEARNING_RATE / 10
# The baselines' grids. TV's best weight on the training region lies between grid points of a coarser grid (0.04
# and 0.06 gave 0.7-1.2 dB apart on flower.jpg), hence steps of 0.01 there; the wavelet families are
# scikit-image's default (db1, Haar) and the smooth ones commonly used for photographs.
TV_WEIGHTS = (0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1, 0.12, 0.15)
DCT_LAMS = (0.01, 0.02, 0.04, 0.06, 0.08, 0.12)
WAVELETS = ("db1", "db2", "db4", "sym4", "sym8", "coif1")


class CSCDenoiser(nn.Module):
    """y (B, 1, H, W) noisy -> x_hat (B, 1, H, W): x_hat = D z + mean(y), z = unrolled ISTA of y - mean(y)."""

    def __init__(
        self,
        n_atoms: int = N_ATOMS,
        kernel_size: int = KERNEL,
        n_iter: int = N_ITER,
        stride: int = STRIDE,
        backend: str = "auto",
    ):
        super().__init__()
        # one int: forward shifts by it in both directions (a pair passed ConvSparseCoding2d, then broke forward)
        self.stride = stride = check.count("stride", stride, 1)
        self.csc = ConvSparseCoding2d(
            1,
            n_atoms,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            n_iter=n_iter,
            lam=0.05,
            learn_lam=True,
            learn_step=True,
            untied=True,
            backend=backend,
        )

    def _code_decode(self, y: Tensor) -> Tensor:
        return self.csc.decode(self.csc(y), y.shape[2:])

    def forward(self, y: Tensor) -> Tensor:
        check.tensor("y", y, rank=4)
        if self.stride > 1 and min(y.shape[2:]) <= self.stride:  # the reflect padding needs more than s pixels
            raise ValueError(f"y must be larger than stride {self.stride} in H and W, got shape {tuple(y.shape)}")
        mean = y.mean(dim=(1, 2, 3), keepdim=True)
        centred = y - mean
        if self.stride == 1:
            return self._code_decode(centred) + mean
        # s^2 shifted copies, each coded on the strided grid, shifted back and averaged (CSCNet's shift averaging).
        s, (h, w) = self.stride, y.shape[2:]
        padded = nn.functional.pad(centred, (s, s, s, s), mode="reflect")
        total = torch.zeros_like(y)
        for dy in range(s):
            for dx in range(s):
                out = self._code_decode(padded[..., dy:, dx:])
                total = total + out[..., s - dy : s - dy + h, s - dx : s - dx + w]
        return total / (s * s) + mean


def build(spec: dict) -> nn.Module:
    return CSCDenoiser(
        spec["n_atoms"], spec["kernel_size"], spec["n_iter"], spec["stride"], backend=spec.get("backend", "auto")
    )


def psnr(clean: Tensor, estimate: Tensor) -> float:
    """PSNR in dB of an estimate of an image in [0, 1] (the estimate is clipped to [0, 1] first; a clean image outside
    [0, 1] is a ValueError); inf when they are equal. Both floating tensors of one non-empty shape: broadcasting
    would average over pairs that do not match."""
    check.tensor("clean", clean)
    check.tensor("estimate", estimate)
    if clean.shape != estimate.shape or clean.numel() == 0:
        raise ValueError(
            f"clean and estimate must have one non-empty shape, got {tuple(clean.shape)} and {tuple(estimate.shape)}"
        )
    # only the estimate is clipped: a clean image on another scale (0..255, or centred) was scored against the
    # clipped estimate, and an exact estimate of flower.jpg * 255 got -38.5 dB instead of inf. NaN passes, to the mse
    if bool(((clean < 0) | (clean > 1)).any()):
        raise ValueError(f"clean must lie in [0, 1], got values in [{float(clean.min())}, {float(clean.max())}]")
    mse = float((estimate.clamp(0, 1) - clean).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def noisy_copy(clean: Tensor, seed: int) -> Tensor:
    check.tensor("clean", clean)
    generator = torch.Generator().manual_seed(dsc_data._seed(seed))
    # drawn on the CPU in float32 whatever torch.set_default_device / set_default_dtype say (the draws a plain run
    # makes): a float64 default drew other noise and made the noisy image float64, a meta default a meta image
    noise = torch.randn(clean.shape, generator=generator, dtype=torch.float32, device="cpu")
    return clean + SIGMA * noise.to(clean.device)


def test_images(seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """{name: (clean, noisy)} of the held-out images, (1, 1, H, W) each, with fixed noise."""
    seed = _args.seed(seed)
    china, flower = data.photo("china"), data.photo("flower")
    images = {"flower (unseen photograph)": flower, "china right part (unseen region)": china[:, TRAIN_COLUMNS[1] :]}
    return {
        name: (im[None, None], noisy_copy(im[None, None], seed + 1000 + i))
        for i, (name, im) in enumerate(images.items())
    }


def tuning_image(seed: int) -> tuple[Tensor, Tensor]:
    """The whole training region (1, 1, 427, 480) with fixed noise: where the baselines' parameters are chosen, on the
    pixels the model learns from. (A 160x160 textured crop of it had chosen TV's weight 0.04, which left TV 0.7-1.2
    dB below its choice on the whole region, 0.06, on flower.jpg: the model's lead over TV came from the crop.)"""
    seed = _args.seed(seed)
    clean = data.photo(TRAIN_PHOTO)[:, TRAIN_COLUMNS[0] : TRAIN_COLUMNS[1]][None, None]
    return clean, noisy_copy(clean, seed + 999)


# ------------------------------------------------------------------------------------------------- baselines
@torch.no_grad()
def dct_ista(noisy: Tensor, lam: float, n_iter: int = 50) -> Tensor:
    """FISTA on a fixed convolutional 8x8 DCT dictionary (64 atoms, DC included) at stride 4 (4x redundant), each
    image's mean removed. noisy: (B, 1, H, W)."""
    check.tensor("noisy", noisy, rank=4)
    if noisy.shape[1] != 1:
        raise ValueError(f"noisy must be gray images (B, 1, H, W), got shape {tuple(noisy.shape)}")
    weight = dsc_data.dct_filters(64, 8, ndim=2, dtype=noisy.dtype)
    mean = noisy.mean(dim=(2, 3), keepdim=True)  # per image: one mean over a batch shifted every image by the others'
    z = DF.conv_ista(noisy - mean, weight, lam, n_iter=n_iter, stride=4, padding=4, fista=True)
    return DF.conv_synthesis(z, weight, stride=4, padding=4, signal_size=noisy.shape[2:]) + mean


def _skimage():
    try:
        # denoise_wavelet imports PyWavelets only when called, which raised scikit-image's own ImportError
        import pywt  # noqa: F401
        from skimage.restoration import denoise_tv_chambolle, denoise_wavelet
    except ImportError as err:
        raise ImportError(
            "the denoise recipe's baselines need scikit-image and PyWavelets: pip install 'dsc_kernels[train]'"
        ) from err
    return denoise_wavelet, denoise_tv_chambolle


def _one_image(noisy: object) -> Tensor:
    """The skimage baselines denoise one gray image: more of them would be dropped silently."""
    check.tensor("noisy", noisy, rank=4)
    if noisy.shape[:2] != (1, 1):
        raise ValueError(f"noisy must be one gray image (1, 1, H, W), got shape {tuple(noisy.shape)}")
    return noisy


def wavelet(noisy: Tensor, family: str = "db1") -> Tensor:
    """BayesShrink soft thresholding in the wavelet ``family`` (one of WAVELETS; db1 is scikit-image's default)."""
    noisy = _one_image(noisy)
    _args.one_of("family", family, WAVELETS)
    denoise_wavelet, _ = _skimage()
    out = denoise_wavelet(
        noisy[0, 0].double().numpy(),
        sigma=SIGMA,
        wavelet=family,
        method="BayesShrink",
        mode="soft",
        rescale_sigma=True,
    )
    return torch.from_numpy(np.asarray(out, dtype=np.float32))[None, None]


def tv(noisy: Tensor, weight: float) -> Tensor:
    noisy = _one_image(noisy)
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise TypeError(f"weight must be a real number, got {weight!r}")
    if not 0 < weight < math.inf:  # 0 divides by zero in skimage, NaN and negative weights return garbage
        raise ValueError(f"weight must be finite and > 0, got {weight}")
    _, denoise_tv_chambolle = _skimage()
    out = denoise_tv_chambolle(noisy[0, 0].double().numpy(), weight=weight)
    return torch.from_numpy(np.asarray(out, dtype=np.float32))[None, None]


def baselines(seed: int) -> dict:
    """Baseline PSNRs on every test image, each baseline's parameter chosen on the training region (tuning_image)."""
    clean, noisy = tuning_image(seed)
    tv_weight = max(TV_WEIGHTS, key=lambda w: psnr(clean, tv(noisy, w)))
    dct_lam = max(DCT_LAMS, key=lambda lam: psnr(clean, dct_ista(noisy, lam)))
    family = max(WAVELETS, key=lambda f: psnr(clean, wavelet(noisy, f)))
    results = {}
    for name, (clean, noisy) in test_images(seed).items():
        tv_scores = {w: psnr(clean, tv(noisy, w)) for w in TV_WEIGHTS}  # the oracle's grid holds the chosen weight
        results[name] = {
            "noisy": psnr(clean, noisy),
            "dct_ista": psnr(clean, dct_ista(noisy, dct_lam)),
            "wavelet_bayes": psnr(clean, wavelet(noisy, family)),
            "tv_chambolle": tv_scores[tv_weight],
            "tv_chambolle_oracle": max(tv_scores.values()),
        }
    return {"tv_weight": tv_weight, "dct_lam": dct_lam, "wavelet": family, "images": results}


# -------------------------------------------------------------------------------------------------- training
def training_patches(seed: int) -> Tensor:
    """The clean training patches, (PATCHES_PER_EPOCH, 1, PATCH, PATCH), from the training region only; an epoch
    visits each once, with fresh noise every time."""
    seed = _args.seed(seed)
    region = data.photo(TRAIN_PHOTO)[:, TRAIN_COLUMNS[0] : TRAIN_COLUMNS[1]]
    return data.random_patches(region, PATCHES_PER_EPOCH, PATCH, torch.Generator().manual_seed(seed))


@torch.no_grad()
def evaluate(model: nn.Module, seed: int) -> dict[str, float]:
    """PSNR (dB) of the model's output on each test photograph, noisy at SIGMA with ``seed``'s noise. The model runs
    in eval mode on its own device; the caller's mode is restored (a loaded model stays in eval)."""
    with engine.eval_mode(model):
        return {name: psnr(clean, _denoised(model, noisy)) for name, (clean, noisy) in test_images(seed).items()}


def _denoised(model: nn.Module, noisy: Tensor) -> Tensor:
    """The model's output on a (float32, CPU) photograph, run on the model's device in its dtype (a float64 model
    refused float32 photographs), back as float32 on the CPU. A model without parameters (``nn.Identity()``, the noisy
    baseline) gets the photograph as it is."""
    parameter = next(model.parameters(), noisy)
    with torch.no_grad():
        return model(noisy.to(device=parameter.device, dtype=parameter.dtype)).to("cpu", noisy.dtype)


def train(
    strategy: str, epochs: int, seed: int, out: Path | None, backend: str, run: engine.Run, subset: int | None = None
) -> dict:
    """Train the denoiser on fresh noisy patches every epoch; returns metrics (writes out/ on rank 0). ``subset``: the
    first ``subset`` of the PATCHES_PER_EPOCH training patches (all when None). torch's global RNG is left as the
    caller had it (the seeding happens in a fork of it)."""
    strategy, epochs, seed, out, backend = _args.train_arguments(strategy, STRATEGIES, epochs, seed, out, backend, run)
    with engine.forked_rng(run):
        return _train(strategy, epochs, seed, out, backend, run, subset)


def _train(
    strategy: str, epochs: int, seed: int, out: Path | None, backend: str, run: engine.Run, subset: int | None
) -> dict:
    subset = _args.subset(subset, PATCHES_PER_EPOCH)
    # The baselines run after the training: import them first (on every rank, so none waits for a rank that
    # raised). The CLI's REQUIRES check only finds packages; one that is installed but fails to import (and a
    # call of train() from Python) otherwise ended the training's minutes in an ImportError, with no model.pt.
    _skimage()
    engine.seed_rng(run, seed)
    spec = {"n_atoms": N_ATOMS, "kernel_size": KERNEL, "n_iter": N_ITER, "stride": STRIDE, "backend": backend}
    model = build(spec).to(run.device)
    if run.rank:
        # every rank seeded alike so the replicas start equal; the noise drawn below must differ per rank, or each
        # global batch adds world_size copies of one noise draw. Rank 0 keeps a single process's stream.
        engine.seed_rng(run, (seed + run.rank) % 2**64)
    clean = training_patches(seed)
    if subset is not None:
        clean = clean[:subset]
    trained = engine.wrap(model, run)
    named = list(trained.named_parameters())
    steps = [p for name, p in named if name.endswith("csc.step")]
    rest = [p for name, p in named if not name.endswith("csc.step")]
    optimizer = torch.optim.Adam([{"params": rest}, {"params": steps, "lr": STEP_LEARNING_RATE}], lr=LEARNING_RATE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs, 1))

    def loss_fn(net: nn.Module, x: Tensor, _: Tensor) -> Tensor:
        noisy = x + SIGMA * torch.randn_like(x)  # fresh noise at every step
        return (net(noisy) - x).pow(2).mean()

    start = time.perf_counter()
    loader = engine.train_loader(clean, clean, BATCH_SIZE, seed, run)
    history = engine.fit(
        trained, loader, loss_fn, optimizer, epochs, run, desc=f"denoise/{strategy}", scheduler=scheduler
    )
    metrics = {}
    if run.is_main:
        model_psnr = evaluate(model, seed)
        base = baselines(seed)
        headline_image = "flower (unseen photograph)"
        best_skimage = max(base["images"][headline_image][k] for k in ("wavelet_bayes", "tv_chambolle"))
        metrics = {
            "recipe": NAME,
            "strategy": strategy,
            "epochs": epochs,
            "seed": seed,
            "sigma": SIGMA,
            "held_out": {
                "flower (unseen photograph)": "flower.jpg, whole, gray 427x640; not used in training",
                "china right part (unseen region)": "china.jpg columns 480-639; training patches "
                "come from columns 0-479 only",
            },
            "psnr_model": model_psnr[headline_image],
            "psnr_noisy": base["images"][headline_image]["noisy"],
            "psnr_best_skimage": best_skimage,
            "images": {name: {"model": model_psnr[name], **values} for name, values in base["images"].items()},
            "tv_weight": base["tv_weight"],
            "dct_lam": base["dct_lam"],
            "wavelet": base["wavelet"],
            "seconds": time.perf_counter() - start,
            "seconds_per_epoch": sum(h["seconds"] for h in history) / max(len(history), 1),
            "backend": backend,
            "world_size": run.world_size,
            "history": history,
        }
        if out is not None:
            engine.save(out, NAME, spec, model, metrics)
            plot(model, metrics, seed, out / "denoise.png")
    run.barrier()
    return metrics


def plot(model: nn.Module, metrics: dict, seed: int, path: Path) -> None:
    """A crop of the unseen photograph: clean, noisy, model, the better of the two scikit-image baselines on it; and
    the learned atoms. The model runs on its own device (its parameters'), and is left in the mode it came in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = "flower (unseen photograph)"
    clean, noisy = test_images(seed)[image]
    crop = (slice(None), slice(None), slice(150, 310), slice(240, 400))
    with engine.eval_mode(model):
        estimate = _denoised(model, noisy)[crop]  # a CUDA model got the CPU photograph, after training had finished
    scores = metrics["images"][image]
    baselines = {  # metrics key: (title, denoiser)
        "wavelet_bayes": (f"wavelet ({metrics['wavelet']})", lambda noisy: wavelet(noisy, metrics["wavelet"])),
        "tv_chambolle": ("TV", lambda noisy: tv(noisy, metrics["tv_weight"])),
    }
    best = max(baselines, key=scores.__getitem__)
    title, denoiser = baselines[best]
    panels = [
        ("clean", clean[crop]),
        (f"noisy {metrics['psnr_noisy']:.2f} dB", noisy[crop]),
        (f"model {metrics['psnr_model']:.2f} dB", estimate),
        (f"{title} {scores[best]:.2f} dB", denoiser(noisy)[crop]),
    ]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3 * (len(panels) + 1), 3.2))
    for ax, (title, image) in zip(axes, panels):
        ax.imshow(image[0, 0].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    axes[-1].imshow(atom_grid(model.csc.weight).numpy(), cmap="gray", vmin=-1, vmax=1)
    axes[-1].set_title("learned dictionary D", fontsize=9)
    axes[-1].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
