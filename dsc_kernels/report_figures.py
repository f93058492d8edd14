"""The report's PNG figures (matplotlib, headless Agg backend): one function per figure, each skipped when its
experiment did not run."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from . import theory  # noqa: E402
from .experiments import ClaimResult  # noqa: E402
from .experiments.attention_speed import CURVE_KEYS  # noqa: E402


def _not_measured(ax, why: str) -> None:
    # a blank panel reads as a plotting bug; say why it is empty instead
    ax.text(0.5, 0.5, f"not measured:\n{why}", ha="center", va="center", transform=ax.transAxes, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, out_dir: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return name


def _linear_rate(by_id: dict, out_dir: Path):
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("S3/S4-oracle", "-"), ("S3/S4-geometric", "--")):
        c = by_id[key].curves
        ax.semilogy(c["k"], np.maximum(c["err"], 1e-17), style, label=f"max error, {key.split('-')[1]} θ")
        ax.semilogy(
            c["k"], c["bound"], ":", color="k" if style == "-" else "gray", label=f"bound s·B·q^k ({key.split('-')[1]})"
        )
    rates = f"q = {by_id['S3/S4-oracle'].curves['q']:.3f}"
    if "S7" in by_id:
        c = by_id["S7"].curves
        ax.semilogy(c["k"], c["err"], "-.", label="2-D, noisy (S7): error vs depth")
        rates += f"; S7: {c['q']:.3f}"
    ax.set(xlabel="iteration k = layer", ylabel="‖Γ^k − Γ*‖₂", title=f"LISTA-CP linear rate ({rates})")
    ax.legend(fontsize=7)
    return _save(fig, out_dir, "linear_rate.png"), "log-error vs iteration with the bound"


def _noise_floor(by_id: dict, out_dir: Path):
    c = by_id["S5"].curves
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.loglog(c["sigma"], c["floor"], "o-", label="measured floor")
    ax.loglog(c["sigma"], c["bound"], "k:", label="bound C·η")
    ax.set(xlabel="noise std σ", ylabel="plateau of ‖Γ^k − Γ*‖₂", title="noise floor ∝ σ")
    ax.legend()
    return _save(fig, out_dir, "noise_floor.png"), "noise floor vs sigma"


def _multilayer(by_id: dict, out_dir: Path):
    c = by_id["S8"].curves
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, color in (("s2=1", "C0"), ("s2=2", "C3")):
        q = c[key]["q"]
        ax.semilogy(c["K"], np.maximum(c[key]["err1"], 1e-17), "--", color=color, label=f"layer 1, q1 = {q[0]:.2f}")
        ax.semilogy(c["K"], c[key]["err2"], "-o", color=color, ms=3, label=f"layer 2, q2 = {q[1]:.2f}")
        if c[key]["bound2"] is not None:
            ax.semilogy(c["K"], c[key]["bound2"], ":", color="k", label="(†) bound, layer 2")
    ax.set(
        xlabel="iterations per layer K",
        ylabel="max ‖Γ̂_j − Γ_j‖₂ over the batch",
        title="2-layer DSC: converges when all q_j < 1 (stalls here with q_2 ≥ 1)",
    )
    ax.legend(fontsize=7)
    return _save(fig, out_dir, "multilayer.png"), "multi-layer convergence"


def _activations(by_id: dict, out_dir: Path):
    c = by_id["S9a"].curves
    kink = by_id["S9b"].curves if "S9b" in by_id else None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (name, dev) in enumerate(c["deviation"].items()):
        a1.loglog(c["beta"], np.maximum(dev, 1e-17), "o--", color=f"C{i}", ms=3, label=f"{name}, margin (S9c)")
        if kink is not None:
            a1.loglog(kink["beta"], kink["deviation"][name], "s-", color=f"C{i}", ms=4, label=f"{name}, kink (S9b)")
        a1.loglog(
            c["beta"],
            [theory.activation_sup_distance(name, b) for b in c["beta"]],
            ":",
            color=f"C{i}",
            label=f"c/β ({name})",
        )
    a1.set(xlabel="β", ylabel="‖Γ_smooth − Γ_ReLU‖", title="activation floors: ∝ 1/β at a kink, faster with a margin")
    a1.legend(fontsize=6, ncol=2)
    a2.semilogy(c["relu_curve"], "k-", label="ReLU")
    for name, curve in c["curves"].items():
        a2.semilogy(curve, "--", label=f"{name} (β = {c['curve_beta']:g})" if name != "leaky_relu" else name)
    a2.set(xlabel="layer k", ylabel="max ‖Γ^k − Γ*‖₂", title="same exponential phase")
    a2.legend(fontsize=7)
    return _save(fig, out_dir, "activations.png"), "activation floors"


def _uniqueness(by_id: dict, out_dir: Path):
    rows = by_id["S1"].curves["rows"]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.5))
    for i, r in enumerate(rows):
        ax.barh(i, r["s_coh"], color="C2", label="unique by coherence, s < (1+1/μ)/2" if i == 0 else None)
        if r["spark"] is not None and math.isfinite(r["spark"]):
            top = math.ceil(r["spark"] / 2) - 1
            ax.barh(
                i,
                top - r["s_coh"],
                left=r["s_coh"],
                color="C2",
                alpha=0.35,
                label="unique by enumeration (spark)" if i == 0 else None,
            )
        if r["collision_s"]:
            ax.plot(r["collision_s"], i, "rX", ms=9, label="sparsest collision found" if i == 0 else None)
        elif r["spark"] is not None:
            ax.text(r["s_coh"] + 0.1, i, "full column rank: no collision", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=7)
    ax.set_xlim(0, max([r["collision_s"] or 0 for r in rows] + [r["s_coh"] + 2 for r in rows]) + 0.5)
    ax.set(xlabel="non-zeros per representation s", title="S1: uniqueness, coherence bound vs enumeration")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    return _save(fig, out_dir, "uniqueness.png"), "uniqueness: coherence bound, spark and the sparsest collision"


def _transformer(by_id: dict, out_dir: Path):
    a, b = by_id["S10a"].curves, by_id["S10b"].curves
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.semilogy(a["k"], a["ista"], "k-", lw=2, label="LISTA-CP (functional.conv_ista)")
    for kind, marker in (("sparsemax", "o"), ("shrink", "x")):
        left.semilogy(a["k"], np.maximum(a["exact"][kind], 1e-17), marker, ms=4, label=f"{kind} attention blocks")
    left.semilogy(a["k"], a["bound"], "k:", label="bound s·B·q^k")
    for i, (beta, err) in enumerate(b["errors"].items()):
        left.semilogy(
            b["k"],
            err,
            "-",
            color=plt.cm.viridis(i / max(1, len(b["errors"]) - 1)),
            lw=0.8,
            label=f"softmax, β·Δ = {beta * b['margin']:.0f}",
        )
    left.set(xlabel="transformer blocks", ylabel="max ‖Γ^k − Γ*‖₂", title="ISTA as transformer blocks")
    left.legend(fontsize=6)
    bd = b["beta"] * b["margin"]
    right.semilogy(bd, b["deviation"], "o-", label="max deviation from exact attention")
    right.semilogy(bd, b["floor"], "s-", ms=4, label="error floor (thresholds' η(β) bias)")
    right.semilogy(bd, b["C"] * b["eta"], "k:", label="C·η(β)")
    right.semilogy(bd, b["deviation"][0] * np.exp(-(bd - bd[0])), "r--", lw=0.8, label="slope e^(−βΔ)")
    right.set(xlabel="β·Δ", ylabel="‖·‖₂", title="softmax attention: deviation ∝ e^(−βΔ)")
    right.legend(fontsize=7)
    return _save(fig, out_dir, "transformer.png"), "transformer blocks: exact with sparse attention, softmax close"


def _three_layer(by_id: dict, out_dir: Path):
    c = by_id["S8-3"].curves
    fig, ax = plt.subplots(figsize=(6, 4))
    for j in range(c["err"].shape[1]):
        ax.semilogy(
            c["K"],
            np.maximum(c["err"][:, j], 1e-17),
            "o-",
            color=f"C{j}",
            ms=3,
            label=f"layer {j + 1}, q = {c['q'][j]:.3f} (s_st = {c['s_stripe'][j]})",
        )
        ax.semilogy(c["K"], c["bound"][:, j], ":", color=f"C{j}")
    ax.set(
        xlabel="iterations per layer K",
        ylabel="max ‖Γ̂_j − Γ_j‖∞",
        title="3-layer DSC, stripe condition at every layer (dotted: bounds)",
    )
    ax.legend(fontsize=7)
    return _save(fig, out_dir, "three_layer.png"), "three-layer DSC: layer-by-layer convergence"


def _ista(by_id: dict, out_dir: Path):
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    if "ISTA/FISTA" in by_id:
        c = by_id["ISTA/FISTA"].curves
        a1.loglog(c["k"], c["ista_gap"], label="ISTA gap")
        a1.loglog(c["k"], c["ista_bound"], "k:", label="L‖z*‖²/(2k)")
        a1.loglog(c["fista_k"], c["fista_gap"], "o-", ms=3, label="FISTA gap")
        a1.loglog(c["fista_k"], c["fista_bound"], "k--", label="2L‖z*‖²/(k+1)²")
        a1.set(xlabel="k", ylabel="F(z_k) − F*", title="Beck–Teboulle rates")
        a1.legend(fontsize=7)
    else:
        _not_measured(a1, "objective_rates failed (see its row, ISTA/FISTA)")
    if "S11" in by_id:
        c = by_id["S11"].curves
        # ista_curve[i] is the error after i + 1 steps from z = 0; the geometric curve below starts at Γ⁰ (k = 0)
        k = np.arange(1, len(c["ista_curve"]) + 1)
        a2.semilogy(k, c["ista_curve"], label=f"constant θ (ISTA, λ = {c['lam_curve']:g})")
        a2.axhline(c["predicted"][-1], color="k", ls=":", label="LASSO bias ‖λ(D_SᵀD_S)⁻¹sign‖")
        if "S3/S4-geometric" in by_id:
            g = by_id["S3/S4-geometric"].curves
            a2.semilogy(np.maximum(g["err"], 1e-17), "--", label="geometric θ_k (LISTA-CP)")
        a2.set(xlabel="k", ylabel="max ‖z_k − Γ*‖₂", title="constant threshold plateaus at the bias")
        a2.legend(fontsize=7)
    else:
        _not_measured(a2, "lasso_bias failed (see its row, S11)")
    return _save(fig, out_dir, "ista_fista.png"), "ISTA/FISTA objective gaps and the LASSO bias"


def _speed(rows: list[dict], out_dir: Path):
    ok = [r for r in rows if "fwd_speedup" in r]
    workloads = list(dict.fromkeys(r["workload"] for r in ok))
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    width = 0.8 / max(1, len(providers))
    for ax, key, title in ((axes[0], "fwd_speedup", "forward"), (axes[1], "fwd_bwd_speedup", "forward + backward")):
        for i, p in enumerate(providers):
            vals = [next((r[key] for r in ok if r["workload"] == w and r["provider"] == p), np.nan) for w in workloads]
            ax.bar(np.arange(len(workloads)) + i * width, vals, width, label=p)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(workloads)) + width * (len(providers) - 1) / 2, workloads, fontsize=8)
        ax.set(title=f"{title}: speed-up over eager", ylabel="× eager")
        ax.legend(fontsize=7)
    return _save(fig, out_dir, "speed.png"), "speed of each backend relative to eager"


def _attention(attn: dict, out_dir: Path):
    length, sparsity = attn["length"], attn["sparsity"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for p in [p for p in length if p not in CURVE_KEYS]:
        left.loglog(length["n"], length[p], "o-", label=p)
    left.set(title="sparse attention forward vs length", xlabel="N (= M)", ylabel="ms")
    # label the measured lengths: a log axis over less than a decade labels none of them
    left.set_xticks(length["n"], [str(n) for n in length["n"]])
    left.xaxis.set_minor_formatter(NullFormatter())
    left.legend(fontsize=8)
    if "fused shrink" in sparsity:
        right.plot(sparsity["sparsity"], sparsity["fused shrink"], "o-", label="fused shrink")
        right.axhline(sparsity["softmax (SDPA)"], color="k", ls="--", label="softmax (SDPA)")
        right.legend(fontsize=8)
    else:
        _not_measured(right, "no fused sparse-attention backend here")
    right.set(title=f"shrink mode at N = {sparsity['n']}", xlabel="fraction of scores below the threshold", ylabel="ms")
    return _save(fig, out_dir, "attention.png"), "sparse attention: time vs N and time vs sparsity"


def make_figures(results: list[ClaimResult], rows: list[dict], attn: dict, out_dir: Path) -> list[tuple[str, str]]:
    """Writes the PNGs into out_dir; returns (file name, title) of each figure written."""
    by_id = {r.id: r for r in results if r.curves}
    makers = [
        (_uniqueness, ("S1",)),
        (_linear_rate, ("S3/S4-oracle", "S3/S4-geometric")),
        (_noise_floor, ("S5",)),
        (_multilayer, ("S8",)),
        (_three_layer, ("S8-3",)),
        (_activations, ("S9a",)),
        (_transformer, ("S10a", "S10b")),
    ]
    figures = [maker(by_id, out_dir) for maker, needs in makers if all(n in by_id for n in needs)]
    if "ISTA/FISTA" in by_id or "S11" in by_id:  # either panel alone is worth a figure, neither is a blank one
        figures.append(_ista(by_id, out_dir))
    if any("fwd_speedup" in r for r in rows):
        figures.append(_speed(rows, out_dir))
    if "error" not in attn:
        figures.append(_attention(attn, out_dir))
    return figures
