"""The law fitted to a sweep per schedule, with and without FP anchors, each tested as a predictor
(held out: the largest budget of each model size, and each size in turn).

    python benchmarks/sweep_fits.py benchmarks/results/sweep [--bootstrap 100]

Writes into the sweep directory: law_<schedule>.json, fit_<schedule>.txt (its report) and
plots_<schedule>/ for the default fit (FP anchors on, with bootstrap intervals), fits.json with
the numbers of all four fits and fits.md with their tables (the fits without anchors have no intervals: they are there
for their R² and held-out errors beside the anchored ones).
"""

import argparse
import sys
from pathlib import Path

import mlx_qat  # noqa: F401  (fast BLAS first)
from common import emit
from mlx_qat import fit
from mlx_qat.law_plots import plot
from mlx_qat.results import read_results
from mlx_qat.scaling_law import PARAMS, save_law

SCHEDULES = ("separate", "fused")


def summary(result: fit.FitResult, schedule: str, anchors: bool) -> dict:
    law = result.law
    return {"schedule": schedule, "fp_anchors": anchors, "runs": law.meta["n_runs"],
            "fp_anchor_points": law.meta["n_fp_anchors"], "r2": result.r2, "r2_by_bits": result.r2_by_bits,
            "predictor_a": result.predictor_a, "at_bounds": result.bounds, "converged": result.converged,
            "params": {k: getattr(law, k) for k in PARAMS}, "ci95": result.ci, "held_out": result.held_out}


def markdown(fits: list) -> str:
    """The fits side by side: R² (overall and per bit width), the refitted predictor constant,
    parameters at a bound, and each held-out split's errors."""
    widths = sorted({b for f in fits for b in f["r2_by_bits"]}, key=lambda b: (b == "fp", b))
    lines = ["| schedule | FP anchors | runs | R² | " + " | ".join(f"R² {b}" for b in widths)
             + " | predictor a | at a bound |", "|---" * (6 + len(widths)) + "|"]
    for f in fits:
        bounds = ", ".join(f"{k} ({v})" for k, v in f["at_bounds"].items()) or "none"
        lines.append(f"| {f['schedule']} | {'on' if f['fp_anchors'] else 'off'} | {f['runs']} | {f['r2']:.3f} | "
                     + " | ".join(f"{f['r2_by_bits'].get(b, float('nan')):.3f}" for b in widths)
                     + f" | {f['predictor_a']:.3f} | {bounds} |")
    lines += ["", "| schedule | FP anchors | held out | runs | loss MAE (max) | best-fraction MAE: law | predictor |",
              "|---|---|---|---|---|---|---|"]
    for f in fits:
        for h in f["held_out"]:
            head = f"| {f['schedule']} | {'on' if f['fp_anchors'] else 'off'} | {h['held_out']} |"
            if "error" in h:
                lines.append(f"{head} — | not fitted: {h['error'].split(';')[0]} | | |")
            else:
                lines.append(f"{head} {h['runs']} | {h['loss_mae']:.4f} ({h['loss_max_error']:.4f}) | "
                             f"{h['fraction_mae_law']:.3f} | {h['fraction_mae_predictor']:.3f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="a sweep directory (results.jsonl)")
    parser.add_argument("--bootstrap", type=fit.whole_number, default=fit.DEFAULT_BOOTSTRAP)
    args = parser.parse_args()
    fits = []
    for schedule in SCHEDULES:
        for anchors in (True, False):
            runs = read_results(args.sweep, schedule=schedule, fp_anchors=anchors)
            label = f"{args.sweep.name} sweep, schedule {schedule}, FP anchors {'on' if anchors else 'off'}"
            result = fit.fit(runs, bootstrap=args.bootstrap if anchors else 0, label=label)
            result.held_out = fit.held_out(runs)
            result.law.meta["held_out"] = result.held_out
            fits.append(summary(result, schedule, anchors))
            print(f"== {label}\n{result.report()}", file=sys.stderr)
            if anchors:
                save_law(result.law, args.sweep / f"law_{schedule}.json")
                (args.sweep / f"fit_{schedule}.txt").write_text(result.report() + "\n")
                plot(result, runs, args.sweep / f"plots_{schedule}")
    emit({"command": f"python benchmarks/sweep_fits.py {args.sweep} --bootstrap {args.bootstrap}", "fits": fits},
         args.sweep / "fits.json")
    (args.sweep / "fits.md").write_text(markdown(fits))


if __name__ == "__main__":
    main()
