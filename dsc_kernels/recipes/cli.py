"""`python -m dsc_kernels train --recipe R [--strategy S] [--epochs N] [--seed K] [--out DIR] [--backend B]
[--distributed]`: argument parsing and dispatch for the recipes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import RECIPES, engine, recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", choices=RECIPES, required=True, help="digits or denoise")
    parser.add_argument(
        "--strategy",
        default=None,
        help="digits: baseline, l1, learned-threshold, dsc (default) or all; denoise: cscnet",
    )
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and the noise")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<recipe>-<strategy>)")
    parser.add_argument("--backend", default="auto", help="conv-ISTA backend: auto (default), reference, cpp, triton")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="DistributedDataParallel under torchrun (gloo on CPU, nccl on GPU); rank 0 writes",
    )


def main(args: argparse.Namespace) -> dict:
    """Run the recipe; returns the metrics (rank 0; other ranks get {})."""
    module = recipe(args.recipe)
    strategy = args.strategy or module.DEFAULT_STRATEGY
    strategies = module.STRATEGIES if strategy == "all" else (strategy,)
    if any(s not in module.STRATEGIES for s in strategies):
        raise SystemExit(f"--strategy for {args.recipe} must be one of {module.STRATEGIES} or all, got {strategy!r}")
    epochs = module.DEFAULT_EPOCHS if args.epochs is None else args.epochs
    if epochs < 1:
        raise SystemExit(f"--epochs must be >= 1, got {epochs}")
    out = Path(args.out or f"runs/{args.recipe}-{strategy}")
    run = engine.start(args.distributed, args.device)
    try:
        results = {}
        for name in strategies:
            target = out / name if len(strategies) > 1 else out
            results[name] = module.train(name, epochs, args.seed, target, args.backend, run)
        if run.is_main:
            for name, m in results.items():
                print(
                    f"{args.recipe}/{name}: "
                    + ", ".join(f"{k} {m[k]:.4g}" for k in module.HEADLINE if k in m)
                    + f" -> {out / name if len(strategies) > 1 else out}"
                )
        if run.is_main and len(strategies) > 1:
            summary = {
                name: {k: m[k] for k in ("accuracy", "sparsity", "per_layer", "seconds")} for name, m in results.items()
            }
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return results if len(strategies) > 1 else results[strategies[0]]
    finally:
        engine.finish(run)
