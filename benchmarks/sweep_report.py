"""What a sweep measured, beyond the law's fit: best fraction per group and its trend with S_total
per schedule (Spearman), fused vs separate at matched fractions, the tokens that sharing saved,
and the protocol each run trained under (its QAT steps and the rate its last step saw).

    python benchmarks/sweep_report.py benchmarks/results/sweep [--out benchmarks/results/sweep/report.json]
        [--markdown benchmarks/results/sweep/report.md]
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from common import emit
from mlx_qat import config
from mlx_qat.schedule import make_schedule, plan_run
from mlx_qat.scaling_law import predicted_qat_fraction


def protocol(record: dict) -> dict:
    """The run's QAT steps and the rate of its last step (as a fraction of the peak), from its
    config under this revision's schedule (a sweep run from a fixed commit saw the same); None
    for a run whose phases that schedule refuses as too short to be whole."""
    try:
        cfg = config.TrainConfig(**record["config"])
        plan = plan_run(cfg, record["N"])
        last = make_schedule(cfg, plan).at_step(plan.total_steps - 1, plan.tokens_per_step) / cfg.learning_rate
    except ValueError:
        return None
    return {"qat_steps": plan.qat_steps, "last_step_lr_fraction": last}


def trend(groups: list) -> dict:
    """Spearman's rank correlation of the best fraction with S_total, per bit width and over all."""
    out = {}
    for name, members in [("all", groups)] + [(f"{b:g} bits", [g for g in groups if g["B"] == b])
                                               for b in sorted({g["B"] for g in groups})]:
        if len({g["S_total"] for g in members}) > 2:
            rho, p = spearmanr([g["S_total"] for g in members], [g["best_fraction"] for g in members])
            defined = np.isfinite(rho)  # undefined when every group's best fraction is the same
            out[name] = {"spearman": float(rho) if defined else None, "p_value": float(p) if defined else None,
                         "groups": len(members)}
    return out


def markdown(report: dict) -> str:
    """The best fraction of each (model, D_total, B) group under both schedules beside the paper's
    predictor, and the trend of the best fraction with S_total per schedule."""
    rows = {}
    for g in report["groups"]:
        key = (g["N"], g["D_total"], g["B"], g["quantizer"])
        rows.setdefault(key, {"model": g["model"], "S": g["S_total"]})[g["schedule"]] = g
    lines = ["| model | D_total | B | S_total | best f, separate (loss) | best f, fused (loss) | predictor f̂ |",
             "|---|---|---|---|---|---|---|"]
    for (n, d, b, quantizer), row in sorted(rows.items()):
        b = f"{b:g}" + ("" if quantizer == "affine" else f" {quantizer}")
        cell = lambda k: f"{row[k]['best_fraction']:g} ({row[k]['best_loss']:.3f})" if k in row else "—"  # noqa: E731
        predicted = f"{float(predicted_qat_fraction(row['S'])):.3f}" if row["S"] > 1 else "— (S ≤ 1)"
        lines.append(f"| {row['model']} | {d:,} | {b} | {row['S']:.2f} | {cell('separate')} | {cell('fused')} | "
                     f"{predicted} |")
    lines += ["", "| schedule | groups | Spearman ρ (best f vs S_total) | p |", "|---|---|---|---|"]
    for schedule, trends in report["trend"].items():
        for name, t in trends.items():
            rho = "undefined (one best f)" if t["spearman"] is None else f"{t['spearman']:+.2f}"
            p = "—" if t["p_value"] is None else f"{t['p_value']:.3f}"
            lines.append(f"| {schedule}, {name} | {t['groups']} | {rho} | {p} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="a sweep directory (results*.jsonl, sweep*.json)")
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument("--markdown", help="write its tables as markdown here")
    args = parser.parse_args()
    records = [json.loads(line) for f in sorted(args.sweep.glob("results*.jsonl")) for line in f.read_text().splitlines()]
    runs = defaultdict(dict)  # (model, D, B, schedule, quantizer) -> {fraction: loss}
    for r in records:
        quantizer = r["config"].get("mode", "affine") if r["B"] is not None else "fp"
        if quantizer not in ("affine", "fp"):  # an FP format's learned and derived scales are apart
            quantizer += f" ({r['config'].get('fp_scale', 'derived')} scales)"
        key = (r["config"]["model"], r["D_fp"] + r["D_qat"], r["B"], r["schedule"] if r["B"] is not None else "fp", quantizer)
        runs[key][round(r["qat_fraction"], 3)] = r["final_val_loss"]

    groups = []
    for (model, d, b, schedule, quantizer), losses in sorted(runs.items(), key=lambda kv: str(kv[0])):
        if b is None:
            continue
        best = min(losses, key=losses.get)
        n = next(r["N"] for r in records if r["config"]["model"] == model)
        fp = runs.get((model, d, None, "fp", "fp"), {}).get(0.0)
        groups.append({"model": model, "N": n, "D_total": d, "B": b, "schedule": schedule, "quantizer": quantizer,
                       "S_total": d / (n * b / 8), "best_fraction": best, "best_loss": losses[best], "fp_loss": fp,
                       "losses": losses})

    same = lambda g, h: all(g[k] == h[k] for k in ("model", "D_total", "B", "quantizer"))  # noqa: E731
    pairs = [(g["losses"][f], h["losses"][f]) for g in groups if g["schedule"] == "fused"
             for h in groups if h["schedule"] == "separate" and same(g, h) for f in g["losses"] if f in h["losses"]]
    fused, separate = np.array(pairs).T if pairs else (np.array([]), np.array([]))
    figures = {}
    for f in sorted(args.sweep.glob("sweep*.json")):
        for k, v in json.loads(f.read_text()).items():
            if isinstance(v, (int, float)):
                figures[k] = figures.get(k, 0) + v
    checks = [protocol(r) for r in records if r["B"] is not None]
    whole = [c for c in checks if c is not None]
    report = {
        "command": " ".join(["python benchmarks/sweep_report.py", *sys.argv[1:]]),
        "protocol": {"qat_runs": len(checks), "refused_as_not_whole": len(checks) - len(whole),
                     "min_qat_steps": min((c["qat_steps"] for c in whole), default=None),
                     "max_last_step_lr_fraction": max((c["last_step_lr_fraction"] for c in whole), default=None)},
        "trend": {s: trend([g for g in groups if g["schedule"] == s]) for s in ("separate", "fused")},
        "runs": len(records),
        "sweep": figures,
        "tokens_saved_by_sharing": 1 - figures["tokens_trained"] / figures["tokens_independent"] if figures.get("tokens_independent") else None,
        "fused_minus_separate": {
            "pairs": len(pairs),
            "mean": float((fused - separate).mean()) if pairs else None,
            "fused_better": int((fused < separate).sum()),
        },
        "groups": groups,
    }
    emit(report, args.out)
    if args.markdown:
        Path(args.markdown).write_text(markdown(report))


if __name__ == "__main__":
    main()
