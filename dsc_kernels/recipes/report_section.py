"""The report's training section: the digits strategy table (accuracy, exact zeros) and the per-layer sparsity
figure, from a `python -m dsc_kernels train --recipe digits --strategy all --out DIR` folder or from a short run."""

from __future__ import annotations

import json
from pathlib import Path

from . import digits, engine

QUICK_EPOCHS = 3
TABLE_FIELDS = ("accuracy", "sparsity", "per_layer", "epochs", "seconds")  # what the section reads of each run


def _read(runs: Path) -> dict[str, dict]:
    """{strategy: metrics} from DIR/<strategy>/metrics.json (a --strategy all run) or DIR/metrics.json."""
    found, sources = {}, {}
    for path in [runs / engine.METRICS_FILE, *sorted(runs.glob(f"*/{engine.METRICS_FILE}"))]:
        if path.is_file():
            metrics = json.loads(path.read_text())
            # a JSON list, string or number is no run's metrics (.get raised AttributeError, a traceback in
            # --training-runs' check instead of its usage error)
            if isinstance(metrics, dict) and metrics.get("recipe") == digits.NAME:
                strategy = metrics["strategy"]
                if strategy in found:
                    # one row per strategy: the run read last replaced the others silently, so a folder of several
                    # runs gave a table mixing epochs and seeds (its "zeros vs baseline" across them)
                    raise ValueError(
                        f"{runs} holds more than one digits {strategy} run ({sources[strategy]} and {path}): "
                        "pass a folder with one run per strategy"
                    )
                found[strategy], sources[strategy] = metrics, path
    if not found:
        raise FileNotFoundError(f"no digits metrics.json under {runs}")
    # one seed, one split: an interrupted --strategy all rerun with another --seed left its first strategies beside
    # the earlier run's others, and the table compared accuracies (and zeros vs baseline) on different test sets
    if len({m.get("seed") for m in found.values()}) > 1:
        raise ValueError(
            f"{runs} holds digits runs of different seeds ("
            + ", ".join(f"{sources[s]}: {m.get('seed')}" for s, m in found.items())
            + "): pass a folder of one `--strategy all` run"
        )
    for strategy, metrics in found.items():
        # checked here, where --training-runs' check sees it too: the table below raised KeyError outside the
        # section's try, a traceback at the end of the whole report run
        if missing := [k for k in TABLE_FIELDS if k not in metrics]:
            raise ValueError(f"{sources[strategy]} lacks {', '.join(missing)}: not a complete digits run")
    return found


def _run(quick: bool, backend: str, device: str) -> dict[str, dict]:
    epochs = QUICK_EPOCHS if quick else digits.DEFAULT_EPOCHS
    run = engine.start(False, device)
    return {s: digits.train(s, epochs, 0, None, backend, run) for s in digits.STRATEGIES}


def _backend_that_runs(backend: str, device: str) -> str:
    """The conv-ISTA row the dsc strategy's layers (float32) take for ``backend`` on ``device``, auto resolved."""
    import torch

    from .. import functional

    return functional.check_backend(backend, "conv_ista", device=device, dtype=torch.float32)


def _figure(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = list(digits.FEATURES)
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    width = 0.8 / len(results)
    for i, (strategy, metrics) in enumerate(results.items()):
        ax.bar(
            np.arange(len(layers)) + i * width,
            [metrics["per_layer"].get(n, np.nan) for n in layers],
            width,
            label=f"{strategy} (acc {metrics['accuracy']:.3f})",
        )
    ax.set_xticks(np.arange(len(layers)) + 0.4 - width / 2, layers)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of exact zeros (test set)")
    ax.set_title("digits: sparsity of the hidden feature maps per strategy")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_section(
    out_dir: Path, *, quick: bool, runs: str | Path | None = None, backend: str = "auto", device: str = "cpu"
) -> tuple[list[str], list[tuple[str, str]]]:
    """Markdown lines and [(figure file, title)] of the training section; an error becomes the section's text. A
    short run trains on ``device`` with ``backend`` (the report's --device and --backend); runs read from ``runs``
    keep the backend they were trained with, which metrics.json records."""
    lines = ["", "## Training for sparse features (digits)", ""]
    try:
        if runs:
            results = _read(Path(runs))
            ran = results.get("dsc", {}).get("backend")
        else:
            ran = _backend_that_runs(backend, device)
            results = _run(quick, backend, device)
    except Exception as err:  # noqa: BLE001 - reported; the rest of the report still stands
        return lines + [f"Not measured: {type(err).__name__}: {err}"[:300]], []
    on = f"the dsc strategy's conv-ISTA on `{ran}`" if ran else "no dsc run's backend recorded"
    source = (
        f"read from `{runs}` ({on})"
        if runs
        else (
            f"a short run here ({QUICK_EPOCHS if quick else digits.DEFAULT_EPOCHS} epochs per strategy, seed 0, on "
            f"{device}, `--backend {backend}`: {on})"
        )
    )
    baseline = results.get("baseline")
    lines += [
        f"scikit-learn's 8x8 digits, split `train_test_split(test_size=0.25, stratify=y, random_state=seed)`; "
        f"{source}. Sparsity: fraction of exact zeros in the two hidden feature maps on the test set.",
        "",
        "| strategy | accuracy | exact zeros | layer 1 | layer 2 | zeros vs baseline | epochs | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for strategy, m in results.items():
        delta = f"{100 * (m['sparsity'] - baseline['sparsity']):+.1f} pts" if baseline else "—"
        per_layer = [m["per_layer"].get(n) for n in digits.FEATURES]
        lines.append(
            f"| {strategy} | {m['accuracy']:.3f} | {m['sparsity']:.3f} | "
            + " | ".join("—" if v is None else f"{v:.3f}" for v in per_layer)
            + f" | {delta} | {m['epochs']} | {m['seconds']:.0f} |"
        )
    if missing := [s for s in digits.STRATEGIES if s not in results]:
        # an interrupted `--strategy all` run reads like a finished one with fewer strategies
        lines += ["", f"Not in `{runs}`: {', '.join(missing)} (no metrics.json; an interrupted run?)."]
    name = "training_sparsity.png"
    _figure(results, Path(out_dir) / name)
    return lines, [(name, "digits: per-layer exact zeros per training strategy")]
