"""Training recipes on real data that ships with scikit-learn: ``python -m dsc_kernels train --recipe R``.

    digits   8x8 handwritten digits, four strategies (baseline, l1, learned-threshold, dsc): accuracy and the
             fraction of exact zeros in the hidden feature maps
    denoise  a CSCNet-style convolutional sparse coding denoiser for gray photographs, sigma = 25/255, against
             noisy input, ISTA on a fixed DCT dictionary and scikit-image's wavelet and TV denoisers

Each run writes DIR/metrics.json, a figure and DIR/model.pt; ``load(DIR)`` returns the trained module in eval mode.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from . import engine

RECIPES = ("digits", "denoise")


def recipe(name: str):
    """The recipe module by name."""
    if not isinstance(name, str):
        raise TypeError(f"recipe must be one of {RECIPES}, got {name!r}")
    if name == "digits":
        from . import digits

        return digits
    if name == "denoise":
        from . import denoise

        return denoise
    raise ValueError(f"recipe must be one of {RECIPES}, got {name!r}")


def load(out: str | Path) -> nn.Module:
    """The model trained by ``python -m dsc_kernels train ... --out DIR``, rebuilt from DIR/model.pt, in eval mode
    on the CPU."""
    checkpoint = engine.read_checkpoint(out)
    model = recipe(checkpoint["recipe"]).build(checkpoint["spec"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


__all__ = ["RECIPES", "recipe", "load"]
