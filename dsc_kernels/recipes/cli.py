"""`python -m dsc_kernels train --recipe R [--strategy S] [--epochs N] [--seed K] [--out DIR] [--backend B]
[--threads N] [--distributed]`: argument parsing and dispatch for the recipes.

Every argument is checked before any training starts (``validate``): a bad one is an argparse error (usage, one line
naming the option, exit status 2), never a traceback and never a run that fails after its last epoch."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .. import _cli_args as cli_args
from . import RECIPES, _args, engine, recipe

SEED_RANGE = _args.SEED_RANGE  # why this range: see _args
DEVICES = ("cpu", "cuda")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", choices=RECIPES, required=True, help="digits or denoise")
    parser.add_argument(
        "--strategy",
        default=None,
        help="digits: baseline, l1, learned-threshold, dsc (default) or all; denoise: cscnet",
    )
    parser.add_argument(
        "--epochs",
        type=cli_args.int_type("--epochs", 1),
        default=None,
        help="training epochs, >= 1 (default: the recipe's)",
    )
    parser.add_argument(
        "--seed",
        type=cli_args.int_type("--seed", *SEED_RANGE),
        default=0,
        help=f"seed of the split, the initialisation and the noise, {SEED_RANGE[0]}..{SEED_RANGE[1]} (default 0)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder, existing or creatable (default: runs/<recipe>-<strategy>)",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        help="conv-ISTA backend of the strategies that run it (digits: dsc; denoise): auto (default) or one of the "
        "names dsc_kernels.functional.check_backend accepts (reference, cpp, triton); checked against --device before "
        "training",
    )
    parser.add_argument("--device", choices=DEVICES, default=None, help="default: cuda when available")
    cli_args.add_threads_argument(parser)
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="DistributedDataParallel under torchrun (gloo on CPU, nccl on GPU); rank 0 writes",
    )


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Check the arguments together (argparse's ``type=`` checks see one value at a time) and report the first
    problem through ``parser.error``: usage, one line naming the option, exit status 2. Normalises args.backend.
    A Namespace built in Python skipped argparse's choices and types: those are checked again here. Creates nothing
    (``create_out_folders`` does, once every argument is accepted)."""
    if not isinstance(args.recipe, str) or args.recipe not in RECIPES:
        parser.error(f"argument --recipe: must be one of {RECIPES}, got {args.recipe!r}")
    module = recipe(args.recipe)
    if (problem := cli_args.packages_problem("--recipe", args.recipe, getattr(module, "REQUIRES", {}))) is not None:
        parser.error(problem)  # otherwise an ImportError after the training (denoise's baselines), no model saved
    strategy = module.DEFAULT_STRATEGY if args.strategy is None else args.strategy  # "" is not the default
    if strategy != "all" and strategy not in module.STRATEGIES:
        parser.error(
            f"argument --strategy: for {args.recipe} must be one of {module.STRATEGIES} or all, got {strategy!r}"
        )
    # the type= checks again: a Namespace built in Python (main(args) without the parser) skipped them
    for problem in (
        None if args.epochs is None else cli_args.int_problem("--epochs", args.epochs, 1),
        cli_args.int_problem("--seed", args.seed, *SEED_RANGE),
        cli_args.threads_problem(getattr(args, "threads", None)),  # absent from a Namespace built before --threads
    ):
        if problem is not None:
            parser.error(problem)
    if args.device is not None and (not isinstance(args.device, str) or args.device not in DEVICES):
        parser.error(f"argument --device: must be one of {DEVICES}, got {args.device!r}")
    if args.device is not None and (problem := cli_args.device_problem(args.device)) is not None:
        parser.error(problem)  # otherwise the first .to("cuda") raises deep inside the recipe
    device = args.device or engine.default_device()
    args.backend, problem = cli_args.backend_problem(args.backend, device)
    if problem is not None:
        parser.error(problem)
    runs_conv_ista = getattr(module, "CONV_ISTA_STRATEGIES", module.STRATEGIES)
    if args.backend != "auto" and strategy != "all" and strategy not in runs_conv_ista:
        # it used to be accepted and silently unused
        parser.error(
            f"argument --backend: {args.recipe}'s {strategy} strategy runs no conv-ISTA, so a backend does not apply "
            f"(it does to {', '.join(runs_conv_ista)})"
        )
    if not isinstance(args.distributed, bool):
        parser.error(f"argument --distributed: must be True or False, got {args.distributed!r}")
    if args.distributed and (missing := engine.torchrun_missing()) is not None:
        parser.error(f"argument --distributed: {missing.removeprefix('--distributed ')}")
    if args.out is not None and not isinstance(args.out, (str, os.PathLike)):
        parser.error(f"argument --out: must be a path, got {args.out!r}")
    if args.out is not None and not os.fspath(args.out):  # `args.out or default` wrote into runs/<recipe>-<strategy>
        parser.error("argument --out: must name a folder, got ''")
    for target in _out_folders(args):
        problem = cli_args.out_folder_problem(target)
        if problem is not None:
            parser.error(f"argument --out: {problem}")


def _out_folders(args: argparse.Namespace) -> list[Path]:
    """--out, and with --strategy all the subfolder each strategy writes (each must be creatable too)."""
    module = recipe(args.recipe)
    strategy = module.DEFAULT_STRATEGY if args.strategy is None else args.strategy
    out = Path(args.out or f"runs/{args.recipe}-{strategy}")
    several = strategy == "all" and len(module.STRATEGIES) > 1  # as main: one strategy writes into --out itself
    return [out] + ([out / s for s in module.STRATEGIES] if several else [])


def _earlier_entries(out: Path, shown: int = 4) -> list[str]:
    """The first names in ``out`` (sorted) if it exists and is not empty, and how many more."""
    if not out.is_dir():
        return []
    # Empty folders hold nothing to replace, and under torchrun another rank may have just created this run's own
    # (`--strategy all`): a fresh distributed run noted "already holds baseline, dsc, l1, learned-threshold".
    names = sorted(p.name for p in out.iterdir() if not (p.is_dir() and not any(p.iterdir())))
    return names[:shown] + ([f"{len(names) - shown} more"] if len(names) > shown else [])


def create_out_folders(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Create the validated output folders, or report through ``parser.error`` why not: ``validate`` only predicts
    (os.access says yes to root even for /proc/x), and the recipe's own mkdir comes after the whole training."""
    problem = cli_args.create_folders_problem(_out_folders(args))
    if problem is not None:
        parser.error(f"argument --out: {problem}")


def parser() -> argparse.ArgumentParser:
    """The `train` arguments on their own (what ``main`` reports errors through when called without a parser)."""
    p = argparse.ArgumentParser(prog="python -m dsc_kernels train")
    add_arguments(p)
    return p


def main(args: argparse.Namespace, arg_parser: argparse.ArgumentParser | None = None) -> dict:
    """Run the recipe; returns the metrics (rank 0; other ranks get {}). The arguments are validated first, with
    errors reported through ``arg_parser`` (the `train` subparser of ``python -m dsc_kernels``)."""
    arg_parser = arg_parser or parser()
    validate(args, arg_parser)
    cli_args.set_threads(getattr(args, "threads", None))
    out = _out_folders(args)[0]
    earlier = _earlier_entries(out)
    create_out_folders(args, arg_parser)  # after every other argument is accepted: a rejected run leaves no folder
    if earlier:
        # a digits --strategy all run into a denoise run's folder left the denoiser's model.pt beside its own
        # summary, and recipes.load(folder) then returned the denoiser: say so before the run, never delete
        print(
            f"note: {out} already holds {', '.join(earlier)} from an earlier run; this run replaces the files it "
            "writes and leaves the others",
            file=sys.stderr,
        )
    module = recipe(args.recipe)
    strategy = module.DEFAULT_STRATEGY if args.strategy is None else args.strategy
    strategies = module.STRATEGIES if strategy == "all" else (strategy,)
    epochs = module.DEFAULT_EPOCHS if args.epochs is None else args.epochs
    run = engine.start(args.distributed, args.device)
    try:
        if run.is_main and len(strategies) > 1:
            # written once every strategy has run: an earlier run's summary left beside an interrupted rerun's first
            # strategies described other models than the ones in their folders
            (out / "summary.json").unlink(missing_ok=True)
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
