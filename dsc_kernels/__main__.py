"""`python -m dsc_kernels report [--out DIR] [--quick] [--device cpu|cuda] [--backend NAME] [--readme-figures]`;
`--version`; `python -m dsc_kernels train --recipe R ...` (see dsc_kernels/recipes/cli.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__


def _training_runs_problem(runs: str | None) -> str | None:
    """Why --training-runs holds no digits run the report's training section can read, or None."""
    if runs is None:
        return None
    if not runs:  # Path('') is '.', which passed this check, but the report took '' for "no runs" and trained anew
        return "argument --training-runs: must name a folder, got ''"
    if not Path(runs).is_dir():
        return f"argument --training-runs: {runs} is not a folder"
    from .recipes.report_section import _read

    try:
        _read(Path(runs))  # what the training section reads: else it writes "Not measured" into the report
    except (OSError, ValueError, KeyError) as exc:  # also an unreadable or malformed metrics.json
        return f"argument --training-runs: {runs} holds no `train --recipe digits` run ({type(exc).__name__}: {exc})"
    return None


def _check_report_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Usage errors (exit status 2) before the report's minutes of work, never a traceback at its end."""
    from . import _cli_args as cli_args

    args.backend, backend = cli_args.backend_problem(args.backend, args.device)
    if not args.out:  # Path('') is '.': the report and its figures would land in the working directory
        parser.error("argument --out: must name a folder, got ''")
    out = cli_args.out_folder_problem(Path(args.out))
    from .report import readme_figures_problem

    # checked at the end of the run before: minutes of work, then an exit without the figures
    figures = readme_figures_problem() if getattr(args, "readme_figures", False) else None
    for problem in (
        None if figures is None else f"argument {figures}",
        cli_args.device_problem(args.device),
        backend,
        None if out is None else f"argument --out: {out}",
        _training_runs_problem(args.training_runs),
    ):
        if problem is not None:
            parser.error(problem)
    # created last, so a run rejected above leaves no empty folder; os.access above says yes to root even for /proc/x
    if (problem := cli_args.create_folders_problem([Path(args.out)])) is not None:
        parser.error(f"argument --out: {problem}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dsc_kernels",
        description="dsc_kernels main job: check the convergence claims of deep-sparse-coding theory on this "
        "machine and compare the conv-ISTA backends; writes a markdown report with figures.",
    )
    parser.add_argument("--version", action="version", version=f"dsc_kernels {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser(
        "report",
        help="run the convergence experiments and the speed comparison, write REPORT.md",
        description="Runs every claim of docs/theory.md §7 through functional.conv_ista and times "
        "the available backends; writes DIR/REPORT.md and PNG figures.",
    )
    rep.add_argument("--out", default="report", help="output folder (default: ./report)")
    rep.add_argument("--quick", action="store_true", help="small sizes: under a minute on 2 CPU cores")
    rep.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where the experiments and the training section run"
    )
    rep.add_argument(
        "--backend",
        default="auto",
        help="conv-ISTA backend for the experiments and the training section's dsc strategy (auto, reference, cpp, "
        "triton); default auto",
    )
    rep.add_argument(
        "--readme-figures",
        action="store_true",
        help="also copy the figures the README shows into the checkout's docs/ (from this same run)",
    )
    rep.add_argument(
        "--training-runs",
        default=None,
        help="a `train --recipe digits --strategy all --out DIR` folder for the training section, its runs on the "
        "backend they were trained with (default: a short run on --device and --backend)",
    )
    train = sub.add_parser(
        "train",
        help="train a recipe on bundled real data (digits, denoise)",
        description="Trains a recipe of dsc_kernels.recipes; writes DIR/metrics.json, a figure "
        "and DIR/model.pt (dsc_kernels.recipes.load(DIR) reads it back).",
    )
    from .recipes.cli import add_arguments

    add_arguments(train)
    args = parser.parse_args(argv)
    if args.command == "train":
        from .recipes.cli import main as train_main

        train_main(args, train)  # errors in the arguments are reported as `train` usage errors (exit status 2)
    if args.command == "report":
        from .report import run_report

        _check_report_arguments(args, rep)

        path = run_report(args)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
