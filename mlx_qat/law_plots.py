"""Plots of a fitted law against its sweep: loss vs QAT fraction per (N, B), the optimal fraction
vs S_total, predicted vs observed, and the tokens a 10% QAT fraction wastes."""

from pathlib import Path
from typing import List

import numpy as np

from . import scaling_law
from . import plan
from .results import Runs, bits_label, bits_order


def plot(result, runs: Runs, out: Path) -> List[Path]:
    """Loss vs fraction per group, optimal fraction vs S_total, predicted vs observed, waste vs S,
    of `result` (a fit.FitResult, not imported here: fit imports this module to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    law, paths = result.law, []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)

    if result.groups:  # one panel per (N, B); a colour per token budget, the law's curve beside its runs
        sizes, widths = sorted({g["N"] for g in result.groups}), sorted({g["B"] for g in result.groups})
        budgets = sorted({g["D_total"] for g in result.groups})
        colour = dict(zip(budgets, plt.cm.viridis(np.linspace(0, 0.85, len(budgets)))))
        fig, axes = plt.subplots(len(sizes), len(widths), figsize=(3.6 * len(widths), 2.8 * len(sizes)), squeeze=False)
        f = np.linspace(0.01, 0.99, 200)
        for g in result.groups:
            ax, idx = axes[sizes.index(g["N"]), widths.index(g["B"])], g["runs"]
            c = colour[g["D_total"]]
            ax.plot(runs.d_qat[idx] / (runs.d_fp[idx] + runs.d_qat[idx]), runs.loss[idx], "o", color=c, ms=4)
            ax.plot(f, plan.loss_at_fraction(law, g["N"], g["D_total"], g["B"], f), "-", color=c, label=f"D={g['D_total']:.3g}")
            ax.set_title(f"N={g['N']:.3g}, B={g['B']:g}", fontsize=9)
            ax.set_xlabel("QAT fraction", fontsize=8)
        for ax in axes.flat:
            if not ax.lines:
                ax.axis("off")
            else:
                ax.legend(fontsize=6)
        save(fig, "loss_vs_fraction.png")

    s = np.geomspace(2, 1e6, 200)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(s, scaling_law.predicted_qat_fraction(s), "-", label=f"predictor, a = {scaling_law.PREDICTOR_A}")
    if result.predictor_a is not None:
        ax.plot(s, scaling_law.predicted_qat_fraction(s, result.predictor_a), "--", label=f"refit, a = {result.predictor_a:.3f}")
    if result.groups:
        ax.plot([g["S_total"] for g in result.groups], [g["best_fraction"] for g in result.groups], "o", label="best run per group")
    ax.set_xscale("log")
    ax.set_xlabel("S_total (tokens per parameter byte)")
    ax.set_ylabel("optimal QAT fraction")
    ax.legend()
    save(fig, "optimal_fraction_vs_S.png")

    fig, ax = plt.subplots(figsize=(5, 5))
    pred = law(runs.n, runs.d_fp, runs.d_qat, runs.bits)
    for lab in sorted({bits_label(b) for b in runs.bits}, key=bits_order):
        sel = np.array([bits_label(b) == lab for b in runs.bits])
        ax.plot(runs.loss[sel], pred[sel], "o", ms=3, label=f"B = {lab}")
    lim = [runs.loss.min(), runs.loss.max()]
    ax.plot(lim, lim, "k--", lw=1)
    ax.set_xlabel("observed loss")
    ax.set_ylabel("predicted loss")
    ax.set_title(f"R² = {result.r2:.4f}")
    ax.legend(fontsize=7)
    save(fig, "predicted_vs_observed.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    n_ref = float(np.median(runs.n))
    s = np.geomspace(10, 1e5, 15)
    for b in sorted(set(runs.bits[runs.is_qat])):
        waste = [plan.wasted_tokens(law, n_ref, x * n_ref * b / 8, b, 0.1) for x in s]
        ax.plot(s, 100 * np.array(waste), "o-", ms=3, label=f"B = {b:g}")
    ax.set_xscale("log")
    ax.set_xlabel("S_total (tokens per parameter byte)")
    ax.set_ylabel("tokens wasted by 10% QAT (%)")
    ax.set_title(f"N = {n_ref:.2g}", fontsize=9)
    ax.legend(fontsize=7)
    save(fig, "wasted_tokens_vs_S.png")
    return paths
