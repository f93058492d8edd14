"""`--recipe digits`: sparse features for scikit-learn's 8x8 handwritten digits, four training strategies.

Data: ``load_digits`` scaled to [0, 1] as pixels / 16, shape (B, 1, 8, 8); split exactly
``train_test_split(images, target, test_size=0.25, stratify=target, random_state=seed)`` (1,347 train, 450 test).
Every strategy has the same shape: two feature layers (16 channels at 8x8, then 32 at 4x4) and a linear head on
the 512 features of layer 2 -> logits (B, 10).

    baseline           conv 3x3 -> ReLU -> conv 3x3 stride 2 -> ReLU -> linear
    l1                 the same, plus an activation-l1 penalty (weight 0.3) on both ReLU outputs (``ActivationL1``)
    learned-threshold  the same convs with one-sided ``SoftThreshold`` activations max(u - t, 0), a learned
                       threshold t per channel (a ReLU with a learned bias), under an activation-l1 penalty (0.2) that
                       makes the thresholds rise (the signed soft threshold with 0.03 kept only 11% zeros)
    dsc                ``DeepSparseCoding2d([1, 16, 32])``: two unrolled ISTA layers (non-negative codes, learned
                       per-iteration lam relative to the input RMS, untied encoders, dictionaries renormalised to unit
                       atoms after every step, 1/L tracked), i.e. layered sparse coding with a linear head; 10
                       iterations (the layer's default) and the l1 strategy's penalty (0.3) on both codes.
                       LASSO codes are sparse through ISTA's explaining-away (-step E D z), which 3 iterations from
                       z = 0 barely reach: training then made each layer a bias-free ReLU conv on non-negative inputs
                       (layer 2's L = ||D||^2 up 14x, so step = 1/L and the inhibition shrank; encoders 3x longer).
                       A light penalty (0.03) also lost the lam gradient to the cross-entropy 20-60:1, so lam fell
                       towards 0: 0.896 accuracy and 12% zeros, the least sparse strategy

``sparsity`` in metrics.json is the mean fraction of exact zeros in the two hidden feature maps (the activations'
outputs; for dsc the two layers' codes) over the test set; ``per_layer`` gives each.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validate as check
from .. import functional, sparsity
from ..nn import DeepSparseCoding2d, SoftThreshold
from . import _args, data, engine

NAME = "digits"
# packages the recipe imports when it runs ({import name: pip name}), checked before training (recipes.cli)
REQUIRES = {"sklearn": "scikit-learn"}
STRATEGIES = ("baseline", "l1", "learned-threshold", "dsc")
CONV_ISTA_STRATEGIES = ("dsc",)  # the others are plain convolutions: --backend does not apply to them
DEFAULT_STRATEGY = "dsc"
DEFAULT_EPOCHS = 10
CHANNELS = (16, 32)
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
# ActivationL1 weights on the sum of the two hidden maps' mean |activation|: the l1 strategy's penalty, also dsc's
# (under 0.03 its learned lam lost to the cross-entropy and fell to 0), and the lighter pressure under which the
# learned thresholds of learned-threshold rise instead of collapsing to zero.
L1_WEIGHT = {"l1": 0.3, "learned-threshold": 0.2, "dsc": 0.3}
# ISTA iterations per dsc layer: DeepSparseCoding2d's default. Sparse codes come from the explaining-away between
# atoms that only a longer unroll carries out; 3 iterations trained into near feed-forward, dense layers. Saved in
# the model's spec (models saved before it was, with 3, still load).
DSC_ITERATIONS = 10
FEATURES = ("layer1", "layer2")
HEADLINE = ("accuracy", "sparsity", "seconds")


class DigitsNet(nn.Module):
    """(B, 1, 8, 8) -> logits (B, 10); ``features(x)`` returns the two hidden feature maps."""

    def __init__(self, strategy: str, backend: str = "auto", n_iter: int = DSC_ITERATIONS):
        super().__init__()
        self.strategy = _args.one_of("strategy", strategy, STRATEGIES)
        backend = functional.check_backend(backend)  # the conv strategies ignore it, but it is saved in the spec
        c1, c2 = CHANNELS
        if strategy == "dsc":
            self.sparse_coding = DeepSparseCoding2d(
                [1, c1, c2], 3, strides=[1, 2], n_iter=n_iter, lams=0.1, learn_lam=True, untied=True, backend=backend
            )
        else:
            self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
            self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
            if strategy == "learned-threshold":
                self.act1 = SoftThreshold(0.1, c1, nonneg=True, learnable=True)
                self.act2 = SoftThreshold(0.1, c2, nonneg=True, learnable=True)
            else:
                self.act1, self.act2 = nn.ReLU(), nn.ReLU()
        self.head = nn.Linear(c2 * 4 * 4, 10)

    def feature_modules(self) -> dict[str, nn.Module]:
        """The modules whose outputs are the hidden feature maps, by layer name."""
        if self.strategy == "dsc":
            return dict(zip(FEATURES, self.sparse_coding.layers))
        return dict(zip(FEATURES, (self.act1, self.act2)))

    def forward(self, x: Tensor) -> Tensor:
        check.tensor("x", x, rank=4)
        if tuple(x.shape[1:]) != (1, 8, 8):  # the head is sized for 8x8 digits
            raise ValueError(f"x must be (B, 1, 8, 8), got shape {tuple(x.shape)}")
        if self.strategy == "dsc":
            hidden = self.sparse_coding(x)[-1]
        else:
            hidden = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.head(hidden.flatten(1))


def build(spec: dict) -> nn.Module:
    return DigitsNet(spec["strategy"], backend=spec.get("backend", "auto"), n_iter=spec.get("n_iter", 3))


@torch.no_grad()
def evaluate(model: DigitsNet, x: Tensor, y: Tensor) -> dict:
    """Test accuracy and the exact-zero fractions of the hidden feature maps (eval mode). x (B, 1, 8, 8) and labels
    y (B,), B >= 1."""
    if not isinstance(model, DigitsNet):
        raise TypeError(f"model must be a DigitsNet, got {type(model).__name__}")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"x and y must be torch.Tensors, got {type(x).__name__} and {type(y).__name__}")
    # a y of another length or shape would broadcast against the predictions into a wrong accuracy
    if x.dim() == 0 or len(x) == 0 or y.shape != x.shape[:1]:
        raise ValueError(f"x must hold B >= 1 samples and y their B labels, got {tuple(x.shape)} and {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")  # 1.5 matched no class silently
    with engine.eval_mode(model), sparsity.SparsityMonitor(model, model.feature_modules()) as monitor:
        logits = torch.cat([model(chunk) for chunk in x.split(256)])
    per_layer = monitor.summary("eval")
    return {
        "accuracy": float((logits.argmax(1) == y).float().mean()),
        "sparsity": monitor.mean(per_layer),
        "per_layer": per_layer,
    }


def train(
    strategy: str, epochs: int, seed: int, out: Path | None, backend: str, run: engine.Run, subset: int | None = None
) -> dict:
    """Train one strategy; returns metrics (and writes out/ on rank 0 when ``out`` is given). ``subset``: the first
    ``subset`` training samples and at most that many test samples (all when None). torch's global RNG is left as
    the caller had it (the seeding happens in a fork of it)."""
    strategy, epochs, seed, out, backend = _args.train_arguments(strategy, STRATEGIES, epochs, seed, out, backend, run)
    with engine.forked_rng(run):
        return _train(strategy, epochs, seed, out, backend, run, subset)


def _train(
    strategy: str, epochs: int, seed: int, out: Path | None, backend: str, run: engine.Run, subset: int | None
) -> dict:
    engine.seed_rng(run, seed)
    x_train, y_train, x_test, y_test = data.digits(seed)
    subset = _args.subset(subset, len(x_train))
    if subset is not None:
        x_train, y_train, x_test, y_test = x_train[:subset], y_train[:subset], x_test[:subset], y_test[:subset]
    model = DigitsNet(strategy, backend=backend).to(run.device)
    penalty = (
        sparsity.ActivationL1(model.feature_modules(), weight=L1_WEIGHT[strategy]) if strategy in L1_WEIGHT else None
    )
    trained = engine.wrap(model, run)
    optimizer = torch.optim.Adam(trained.parameters(), lr=LEARNING_RATE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs, 1))

    def loss_fn(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        loss = F.cross_entropy(net(x), y)
        return loss + penalty.pop() if penalty is not None else loss

    def after_epoch(epoch: int, loss: float) -> dict:
        if run.is_main and ((epoch + 1) % 10 == 0 or epoch + 1 == epochs):
            result = evaluate(model, x_test.to(run.device), y_test.to(run.device))
            return {k: v for k, v in result.items() if k != "per_layer"}
        return {}

    def unit_atoms() -> None:  # dictionary learning keeps atoms on the unit sphere (and 1/L tracked)
        for layer in model.sparse_coding.layers:
            layer.normalize_dictionary_()

    start = time.perf_counter()
    loader = engine.train_loader(x_train, y_train, BATCH_SIZE, seed, run)
    history = engine.fit(
        trained,
        loader,
        loss_fn,
        optimizer,
        epochs,
        run,
        desc=f"digits/{strategy}",
        scheduler=scheduler,
        after_step=unit_atoms if strategy == "dsc" else None,
        after_epoch=after_epoch,
    )
    metrics = {}
    if run.is_main:
        result = evaluate(model, x_test.to(run.device), y_test.to(run.device))
        metrics = {
            "recipe": NAME,
            "strategy": strategy,
            "accuracy": result["accuracy"],
            "sparsity": result["sparsity"],
            "per_layer": result["per_layer"],
            "epochs": epochs,
            "seed": seed,
            "seconds": time.perf_counter() - start,
            "seconds_per_epoch": sum(h["seconds"] for h in history) / max(len(history), 1),
            "backend": backend,
            "world_size": run.world_size,
            "history": history,
        }
        if out is not None:
            spec = {"strategy": strategy, "backend": backend, "n_iter": DSC_ITERATIONS}
            engine.save(out, NAME, spec, model, metrics)
            plot(metrics, out / "digits.png")
    if penalty is not None:
        penalty.remove()
    run.barrier()
    return metrics


def plot(metrics: dict, path: Path) -> None:
    """Training loss and test accuracy per epoch, and the per-layer exact-zero fractions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = metrics["history"]
    fig, (ax_loss, ax_zero) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax_loss.plot([h["epoch"] for h in history], [h["loss"] for h in history], label="training loss")
    evaluated = [h for h in history if "accuracy" in h]
    ax_acc = ax_loss.twinx()
    ax_acc.plot(
        [h["epoch"] for h in evaluated], [h["accuracy"] for h in evaluated], "o-", color="C1", label="test accuracy"
    )
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_acc.set_ylabel("test accuracy")
    ax_loss.set_title(f"digits / {metrics['strategy']}: accuracy {metrics['accuracy']:.3f}")
    names = list(metrics["per_layer"])
    ax_zero.bar(names, [metrics["per_layer"][n] for n in names], color="C2")
    ax_zero.set_ylim(0, 1)
    ax_zero.set_ylabel("fraction of exact zeros (test)")
    ax_zero.set_title(f"hidden feature maps: mean {metrics['sparsity']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
