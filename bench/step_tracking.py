"""How far a layer's tracked step 1/L falls behind while Adam trains its dictionary (docs/training.md's table).

For each dictionary shape and learning rate: 30 Adam steps on ``weight`` alone, minimising the reconstruction error
of smoothed noise images (8 of 32 x 32 per step), and after every training forward the largest step * L, with L
from an independent FFT + SVD bound on a fine grid (the infinite-signal norm). ISTA diverges where step * L > 2.

    PYTHONPATH=. python bench/step_tracking.py
"""

from __future__ import annotations

import argparse

import torch

from dsc_kernels.dictionary_learning import _dictionary_lipschitz
from dsc_kernels.nn import ConvSparseCoding2d

SHAPES = [(1, 32, 7), (3, 16, 5), (16, 32, 3), (64, 64, 3)]  # (C_sig, C_code, k)
LEARNING_RATES = [0.01, 0.1, 0.3]


def worst_step_times_lipschitz(c_sig: int, c_code: int, k: int, lr: float, steps: int = 30) -> float:
    torch.manual_seed(0)
    layer = ConvSparseCoding2d(c_sig, c_code, k, n_iter=10, lam=0.05, backend="auto")
    optimiser = torch.optim.Adam([layer.weight], lr=lr)
    generator = torch.Generator().manual_seed(2)
    worst = 0.0
    for _ in range(steps):
        x = torch.nn.functional.avg_pool2d(torch.randn(8, c_sig, 32, 32, generator=generator), 3, 1, 1)
        z = layer(x)
        worst = max(worst, float(layer.step) * _dictionary_lipschitz(layer.weight.detach(), (12 * k, 12 * k)))
        loss = (layer.decode(z, [32, 32]) - x).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return worst


def main(argv: list[str] | None = None) -> None:
    # --help used to start the whole measurement (minutes of training), as did any unknown option
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    torch.set_num_threads(2)
    print("| dictionary | " + " | ".join(f"Adam lr {lr}" for lr in LEARNING_RATES) + " |")
    print("| --- |" + " --- |" * len(LEARNING_RATES))
    for c_sig, c_code, k in SHAPES:
        row = [f"{worst_step_times_lipschitz(c_sig, c_code, k, lr):.3f}" for lr in LEARNING_RATES]
        print(f"| {c_sig} -> {c_code}, {k}x{k} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
